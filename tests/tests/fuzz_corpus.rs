//! Replays the checked-in fuzz corpus of the protocol core (`fuzz/corpus/<target>/`)
//! through the same entry points the cargo-fuzz targets call, so that `cargo test`
//! exercises every seed and every crash input kept there, even where cargo-fuzz is not
//! installed.
//!
//! The AWS targets' corpus is replayed by `fluidity-aws`'s own tests (its entry points
//! exist only in its test and fuzzing builds); the proxy parsers' corpus by the fuzz run
//! itself (`.ci/fuzz.sh`), which replays every corpus file before fuzzing.

use std::path::{Path, PathBuf};

use fluidity_proto::fuzzing;
use fluidity_proto::Side;

/// A fuzz entry point.
type Entry = fn(&[u8]);

/// The protocol targets and their entry points.
const TARGETS: [(&str, Entry); 5] = [
    ("frame_decode", fuzzing::frame_decode),
    ("frame_round_trip", fuzzing::frame_round_trip),
    ("connection_agent", |d| fuzzing::connection(Side::Agent, d)),
    ("connection_server", |d| {
        fuzzing::connection(Side::Server, d)
    }),
    ("stream_ops", fuzzing::stream_ops),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, entry: Entry) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for file in files {
        let data = std::fs::read(&file).expect("corpus file");
        // Printed before the call, so a panic names its input.
        eprintln!("{target}: {}", file.display());
        entry(&data);
    }
}

#[test]
fn frame_decode_corpus() {
    replay(TARGETS[0].0, TARGETS[0].1);
}

#[test]
fn frame_round_trip_corpus() {
    replay(TARGETS[1].0, TARGETS[1].1);
}

#[test]
fn connection_agent_corpus() {
    replay(TARGETS[2].0, TARGETS[2].1);
}

#[test]
fn connection_server_corpus() {
    replay(TARGETS[3].0, TARGETS[3].1);
}

#[test]
fn stream_ops_corpus() {
    replay(TARGETS[4].0, TARGETS[4].1);
}

/// Every corpus directory belongs to a fuzz target, so no seed is silently orphaned.
#[test]
fn every_corpus_has_a_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for entry in std::fs::read_dir(fuzz.join("corpus")).expect("fuzz/corpus") {
        let name = entry.expect("directory entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/corpus/{name} has no target in fuzz/Cargo.toml"
        );
    }
    for (target, _) in TARGETS {
        assert!(corpus_dir(target).is_dir(), "{target} has no corpus");
    }
}
