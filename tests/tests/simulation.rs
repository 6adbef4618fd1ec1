//! Deterministic simulation of an agent and a server `Connection` over a faulty link.
//!
//! Each seed stands for a scenario (configurations, link faults, streams and how they end,
//! how the connection ends); invariants are checked after every step. Environment:
//!
//! - `FLUIDITY_SIM_SEEDS=N`: how many seeds the sweep runs (default 400; CI: 1000);
//! - `FLUIDITY_SIM_SEED=S` (decimal or `0x…`): replays only that seed.
//!
//! A failure prints its seed, the options it stands for, the last events and the command
//! that replays it.

mod sim;

use std::time::{Duration, Instant};

use fluidity_proto::{Config, Error, ErrorCode, Limits, Side};

use sim::options::{AuthPlan, DirPlan, Ending, LinkOptions, ReaderPlan, StreamPlan};
use sim::rng::{mix, Rng};
use sim::world::DETECTION_SLACK;
use sim::Options;

/// Seeds in the sweep when `FLUIDITY_SIM_SEEDS` is not set.
const DEFAULT_SEEDS: u64 = 400;
/// The sweep is split into this many tests so that the runner spreads it over cores.
const SHARDS: u64 = 4;
/// A shard at least this large must exercise every fault and outcome at least once.
const MIN_SEEDS_FOR_COVERAGE: usize = 100;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// The `i`-th seed of the sweep.
fn sweep_seed(i: u64) -> u64 {
    mix(0xF1D1_D17E_0000_0000 ^ i)
}

/// Runs this shard's part of the sweep (or the one seed to replay) and fails with the
/// report of the first failing seed.
fn sweep(shard: u64) {
    let replay = env_u64("FLUIDITY_SIM_SEED");
    let seeds: Vec<u64> = match replay {
        Some(seed) if shard == 0 => vec![seed],
        Some(_) => return,
        None => {
            let n = env_u64("FLUIDITY_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
            (0..n)
                .filter(|i| i % SHARDS == shard)
                .map(sweep_seed)
                .collect()
        }
    };
    let wall = Instant::now();
    let mut failures = Vec::new();
    let (mut completed, mut bytes, mut steps, mut lost) = (0usize, 0u64, 0u64, 0usize);
    let mut window_use = 0.0f64;
    let mut coverage = sim::world::Coverage::default();
    for &seed in &seeds {
        let opts = Options::generate(seed);
        match sim::run(&opts) {
            Ok(o) => {
                if replay.is_some() {
                    println!("{opts:#?}\n{o:#?}");
                }
                completed += o.completed;
                bytes += o.bytes_read;
                steps += o.steps;
                lost += usize::from(o.agent_lost.is_some()) + usize::from(o.server_lost.is_some());
                window_use = window_use.max(o.max_window_use);
                coverage.add(&o.coverage);
            }
            Err(report) => failures.push((seed, report)),
        }
    }
    println!(
        "shard {shard}: {} seeds in {:?}: {completed} streams completed, {bytes} bytes read, \
         {steps} steps, {lost} connection losses, fullest window {:.0}%",
        seeds.len(),
        wall.elapsed(),
        window_use * 100.0
    );
    let counts: Vec<String> = coverage
        .fields()
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("shard {shard} exercised: {}", counts.join(", "));
    if let Some((_, report)) = failures.first() {
        let seeds: Vec<String> = failures.iter().map(|(s, _)| format!("{s:#x}")).collect();
        panic!(
            "{} of {} seeds failed ({})\n{report}",
            failures.len(),
            seeds.len(),
            seeds.join(", ")
        );
    }
    // A sweep of this size has always hit every one of these; none at all means the
    // generator or the harness stopped exercising it.
    if seeds.len() >= MIN_SEEDS_FOR_COVERAGE {
        let missing: Vec<&str> = coverage
            .fields()
            .iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| *name)
            .collect();
        assert!(missing.is_empty(), "the sweep never exercised: {missing:?}");
    }
}

#[test]
fn seeds_sweep_part_1() {
    sweep(0);
}

#[test]
fn seeds_sweep_part_2() {
    sweep(1);
}

#[test]
fn seeds_sweep_part_3() {
    sweep(2);
}

#[test]
fn seeds_sweep_part_4() {
    sweep(3);
}

/// A seed replays exactly: two runs hash the same bytes, events and instants.
#[test]
fn a_seed_replays_to_the_same_trace() {
    let mut traces = Vec::new();
    for i in 0..8 {
        let opts = Options::generate(sweep_seed(i));
        let first = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
        let second = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
        assert_eq!(
            (first.trace, first.steps, first.elapsed),
            (second.trace, second.steps, second.elapsed),
            "seed {:#x} is not deterministic",
            opts.seed
        );
        traces.push(first.trace);
    }
    traces.sort_unstable();
    traces.dedup();
    assert!(
        traces.len() > 1,
        "every seed hashed to the same trace: the hash covers nothing"
    );
}

/// A link that goes silent (no bytes, no EOF) is noticed by both sides through the
/// keepalive, within the configured idle timeout of the last byte, whatever was going on.
#[test]
fn a_silent_peer_is_detected_within_the_idle_timeout() {
    let mut rng = Rng::new(0xDEAD);
    for i in 0..40u64 {
        let mut opts = Options::generate(mix(0xDEAD_0000 ^ i));
        opts.server.require_auth = false;
        opts.auth = AuthPlan::Accept(Duration::ZERO);
        // Cut after the handshake (the worst link delay is far below a second), while
        // streams may still be running.
        let at = Duration::from_secs(1)
            + opts.worst_delay() * 4
            + rng.duration(Duration::ZERO, Duration::from_secs(3));
        opts.ending = Ending::Silent { at };
        let o = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
        for (side, detected, cfg) in [
            (Side::Agent, o.detection[0], &opts.agent),
            (Side::Server, o.detection[1], &opts.server),
        ] {
            let detected = detected.unwrap_or_else(|| {
                panic!(
                    "seed {:#x}: the {side:?} never noticed the silent peer",
                    opts.seed
                )
            });
            assert!(
                detected <= cfg.idle_timeout + DETECTION_SLACK,
                "seed {:#x}: the {side:?} noticed after {detected:?}, idle timeout {:?}",
                opts.seed,
                cfg.idle_timeout
            );
        }
    }
}

/// Cut during the handshake (the server application never gets the auth request in
/// time): both sides give up at their handshake deadline.
#[test]
fn a_peer_silent_during_the_handshake_is_detected_at_the_deadline() {
    for i in 0..20u64 {
        let mut opts = Options::generate(mix(0xBEEF_0000 ^ i));
        opts.server.require_auth = true;
        opts.auth = AuthPlan::Accept(opts.server.handshake_timeout);
        opts.ending = Ending::Silent {
            at: Duration::from_millis(i * 10),
        };
        let o = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
        // The run itself checks that each side gave up by its deadline.
        for lost in [&o.agent_lost, &o.server_lost] {
            assert!(
                matches!(lost, Some(Error::HandshakeTimeout(_))),
                "seed {:#x}: {o:?}",
                opts.seed
            );
        }
    }
}

fn quiet_link() -> LinkOptions {
    LinkOptions {
        latency: Duration::from_millis(5),
        jitter: Duration::ZERO,
        split_per_mille: 300,
        split_max: 100,
        stall_per_mille: 0,
        stall_max: Duration::ZERO,
        capacity: None,
    }
}

/// Runs `opts` and checks that every stream completed and neither side lost the
/// connection.
fn all_complete(opts: &Options) -> sim::Outcome {
    let o = sim::run(opts).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(o.completed, opts.streams.len(), "{o:?}");
    assert!(o.agent_lost.is_none() && o.server_lost.is_none(), "{o:?}");
    o
}

/// Small windows: a reader that stops holds exactly its stream's window and no more,
/// while the other streams, sharing a connection window smaller than all their stream
/// windows together, carry on to the end. Windows do not grow here (see
/// `a_reader_that_keeps_up_widens_its_window_and_a_slow_one_does_not`).
#[test]
fn a_stopped_reader_holds_only_its_own_window() {
    const WINDOW: u32 = 1000;
    const PAUSE: Duration = Duration::from_secs(5);
    let config = |conn_window: u32| Config {
        limits: Limits {
            max_frame_len: 16 * 1024,
            stream_window: WINDOW,
            connection_window: conn_window,
            max_streams: 8,
        },
        require_auth: false,
        data_frame_len: 300,
        keepalive_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        max_stream_window: WINDOW,
        ..Config::default()
    };
    let eager = ReaderPlan {
        chunk: 64 * 1024,
        interval: Duration::ZERO,
        pause_at: None,
        pause_for: None,
    };
    let dir = |reader: ReaderPlan| DirPlan {
        len: 30_000,
        write_chunk: 4096,
        reader,
    };
    let stream = |reader: ReaderPlan| StreamPlan {
        open_at: Duration::ZERO,
        answer_delay: Duration::ZERO,
        refuse: None,
        up: dir(reader),
        down: dir(eager),
        reset: None,
    };
    let stopped = ReaderPlan {
        pause_at: Some(Duration::ZERO),
        pause_for: Some(PAUSE),
        ..eager
    };
    let opts = Options {
        seed: 0xF10,
        agent: config(2500),
        server: config(2500),
        up_link: quiet_link(),
        down_link: quiet_link(),
        auth: AuthPlan::Accept(Duration::ZERO),
        streams: vec![stream(stopped), stream(eager), stream(eager)],
        ending: Ending::GoAway {
            by: Side::Agent,
            at: None,
        },
    };
    let o = all_complete(&opts);
    // The stalled stream filled its window exactly: the writer neither stopped short nor
    // overran it.
    assert_eq!(o.max_in_flight[0][0], u64::from(WINDOW), "{o:?}");
    for k in 0..3 {
        assert!(
            o.max_in_flight[k][0] <= u64::from(WINDOW)
                && o.max_in_flight[k][1] <= u64::from(WINDOW),
            "{o:?}"
        );
    }
    let done = |k: usize| o.done_at[k].unwrap_or_else(|| panic!("plan {k} never ended: {o:?}"));
    assert!(
        done(1) < PAUSE && done(2) < PAUSE,
        "the other streams waited for the stopped reader: {o:?}"
    );
    assert!(done(0) > PAUSE, "{o:?}");
}

/// Every stream is reset by the agent at once with its own code; the server sees each
/// reset with that code and nothing is left behind.
#[test]
fn resets_reach_the_peer_with_their_codes() {
    let mut opts = Options::generate(0x5E5E7);
    opts.ending = Ending::GoAway {
        by: Side::Server,
        at: None,
    };
    opts.auth = AuthPlan::Accept(Duration::ZERO);
    for (k, s) in opts.streams.iter_mut().enumerate() {
        s.refuse = None;
        s.reset = Some(sim::options::ResetPlan {
            by: Side::Agent,
            after: Duration::from_millis(20 * k as u64),
            code: ErrorCode(100 + k as u32),
        });
    }
    let o = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
    // Each stream either completed before its reset time or was reset; the run checked
    // that every Reset event carried the code of the side that reset.
    assert!(o.coverage.resets > 0, "{o:?}");
    assert_eq!(
        o.completed as u64 + o.coverage.resets,
        opts.streams.len() as u64,
        "{o:?}"
    );
    assert!(o.agent_lost.is_none() && o.server_lost.is_none(), "{o:?}");
}

/// Window growth: streams whose readers take everything at once widen their windows
/// (within the largest window and, together, the growth budget, which the simulation
/// checks after every step), while a reader that takes a little now and then, and one
/// that stops, keep the initial window: their streams never have more in flight.
#[test]
fn a_reader_that_keeps_up_widens_its_window_and_a_slow_one_does_not() {
    const WINDOW: u32 = 1000;
    const MAX_WINDOW: u32 = 64_000;
    let config = Config {
        limits: Limits {
            max_frame_len: 16 * 1024,
            stream_window: WINDOW,
            connection_window: 1_000_000,
            max_streams: 8,
        },
        require_auth: false,
        data_frame_len: 300,
        keepalive_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        max_stream_window: MAX_WINDOW,
        // Less than two streams' growth to the largest window.
        window_growth_budget: 100_000,
        ..Config::default()
    };
    let eager = ReaderPlan {
        chunk: 64 * 1024,
        interval: Duration::ZERO,
        pause_at: None,
        pause_for: None,
    };
    let slow = ReaderPlan {
        chunk: 100,
        interval: Duration::from_millis(200),
        ..eager
    };
    let stopped = ReaderPlan {
        pause_at: Some(Duration::ZERO),
        pause_for: Some(Duration::from_secs(2)),
        chunk: 100,
        interval: Duration::from_millis(200),
    };
    let stream = |len: u64, reader: ReaderPlan| StreamPlan {
        open_at: Duration::ZERO,
        answer_delay: Duration::ZERO,
        refuse: None,
        up: DirPlan {
            len,
            write_chunk: 4096,
            reader,
        },
        down: DirPlan {
            len: 0,
            write_chunk: 4096,
            reader: eager,
        },
        reset: None,
    };
    let opts = Options {
        seed: 0xF11,
        agent: config.clone(),
        server: config,
        up_link: quiet_link(),
        down_link: quiet_link(),
        auth: AuthPlan::Accept(Duration::ZERO),
        streams: vec![
            stream(3000, slow),
            stream(3000, stopped),
            stream(2_000_000, eager),
            stream(2_000_000, eager),
            stream(2_000_000, eager),
        ],
        ending: Ending::GoAway {
            by: Side::Agent,
            at: None,
        },
    };
    let o = all_complete(&opts);
    for k in 0..2 {
        assert_eq!(
            o.max_in_flight[k][0],
            u64::from(WINDOW),
            "stream {k}: {o:?}"
        );
    }
    for k in 2..5 {
        assert!(
            o.max_in_flight[k][0] <= u64::from(MAX_WINDOW),
            "stream {k}: {o:?}"
        );
    }
    // The budget lets at least one eager stream reach the largest window.
    let widest = (2..5).map(|k| o.max_in_flight[k][0]).max().unwrap_or(0);
    assert!(widest > u64::from(MAX_WINDOW) / 2, "{o:?}");
}

/// Both sides push bulk data at once through transports whose buffers hold only 2 KiB,
/// so each side's driver spends most of the transfer unable to write: both directions
/// must still complete. (With a control backlog below a couple of frames this
/// deadlocks: neither side may transmit, so neither consumes input; the simulation
/// reports it as an idle timeout. The sweep therefore keeps the backlog at or above
/// `MIN_BACKLOG_WITH_FULL_TRANSPORTS` when transports can fill up.)
#[test]
fn bulk_transfer_both_ways_through_full_transports() {
    let config = Config {
        limits: Limits {
            max_frame_len: 64 * 1024,
            stream_window: 256 * 1024,
            connection_window: 1024 * 1024,
            max_streams: 8,
        },
        require_auth: false,
        max_control_backlog: sim::options::MIN_BACKLOG_WITH_FULL_TRANSPORTS,
        ..Config::default()
    };
    let link = LinkOptions {
        latency: Duration::from_millis(1),
        capacity: Some(2048),
        ..quiet_link()
    };
    let eager = ReaderPlan {
        chunk: 1 << 20,
        interval: Duration::ZERO,
        pause_at: None,
        pause_for: None,
    };
    let dir = DirPlan {
        len: 1_000_000,
        write_chunk: 1 << 20,
        reader: eager,
    };
    let stream = StreamPlan {
        open_at: Duration::ZERO,
        answer_delay: Duration::ZERO,
        refuse: None,
        up: dir,
        down: dir,
        reset: None,
    };
    let opts = Options {
        seed: 0xB0B,
        agent: config.clone(),
        server: config,
        up_link: link,
        down_link: link,
        auth: AuthPlan::Accept(Duration::ZERO),
        streams: vec![stream.clone(), stream],
        ending: Ending::GoAway {
            by: Side::Agent,
            at: None,
        },
    };
    let o = sim::run(&opts).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(o.completed, 2, "{o:?}");
    assert_eq!(o.bytes_read, 4 * 1_000_000, "{o:?}");
    assert!(
        o.coverage.full_transports > 0,
        "the transports never filled up: {o:?}"
    );
}
