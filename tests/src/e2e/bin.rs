//! Building and finding the binaries under test.
//!
//! A test crate cannot use `CARGO_BIN_EXE_*` for another package's binaries, so the first
//! test in a process runs `cargo build` for the agent and server packages in the same
//! profile and target folder as the test executable. Cargo's own lock on the target folder
//! serialises concurrent test processes, and a second build is a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the two binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `fluidity`, the agent.
    pub agent: PathBuf,
    /// `fluidity-server`.
    pub server: PathBuf,
}

static BINARIES: OnceLock<Binaries> = OnceLock::new();

/// The binaries, built on first use in this process.
pub fn binaries() -> &'static Binaries {
    BINARIES.get_or_init(build)
}

/// The profile folder of the test executable: `…/target/debug/deps/e2e_x-hash` gives
/// `…/target/debug`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable has a folder");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

fn build() -> Binaries {
    let dir = profile_dir();
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    // The target folder is the profile folder's parent, unless the build used an explicit
    // --target triple, in which case there is one more level; cargo is told the same
    // folder so that it reuses what the test build already compiled.
    let target_dir = dir.parent().expect("the profile folder has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "fluidity-agent",
        "-p",
        "fluidity-server",
        "--bins",
    ]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    cmd.current_dir(workspace_root());
    let status = cmd
        .status()
        .expect("running cargo to build the binaries under test");
    assert!(
        status.success(),
        "cargo build -p fluidity-agent -p fluidity-server failed ({status}); \
         if another change is being made to those crates, retry in a minute"
    );
    let bins = Binaries {
        agent: dir.join(exe_name("fluidity")),
        server: dir.join(exe_name("fluidity-server")),
    };
    for p in [&bins.agent, &bins.server] {
        assert!(p.is_file(), "{} is missing after the build", p.display());
    }
    bins
}

fn exe_name(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// The workspace root: this crate's parent folder.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
}
