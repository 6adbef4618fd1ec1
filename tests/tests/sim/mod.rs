//! The deterministic simulation harness: see `world` for how a run goes and
//! `options` for what a seed decides.

pub mod link;
pub mod model;
pub mod options;
pub mod rng;
pub mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

pub use options::Options;
pub use world::{Outcome, World};

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("FLUIDITY_SIM_SEED={seed:#x} cargo nextest run -p fluidity-tests --test simulation")
}

/// Runs `opts` once. On failure the message names the seed, the replay command, the
/// options and the last lines of the trace. A panic inside the protocol (a debug
/// assertion) is reported the same way.
pub fn run(opts: &Options) -> Result<Outcome, String> {
    // The only clock read of a run: everything after is this instant plus durations.
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| World::new(opts, start).run()));
    let (message, recent) = match result {
        Ok(Ok(outcome)) => return Ok(outcome),
        Ok(Err(failure)) => (failure.message, failure.recent),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            (format!("panicked: {what}"), Vec::new())
        }
    };
    Err(format!(
        "simulation seed {seed:#x} failed: {message}\n\
         replay: {replay}\n\
         options: {opts:#?}\n\
         last events:\n  {recent}\n\
         replay: {replay}",
        seed = opts.seed,
        replay = replay_command(opts.seed),
        recent = recent.join("\n  "),
    ))
}
