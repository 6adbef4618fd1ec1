//! What an accept loop does when accepting fails.
//!
//! The usual cause is running out of file descriptors (`EMFILE`), which lasts until
//! connections close, and comes and goes while they do. Retrying at once would spin on the
//! error, and logging every failure would flood the log; so a failure pauses the loop
//! briefly, a run of failures is logged when it starts (with what to do) and when
//! accepting works again, and a run that starts soon after a logged one is only counted.

use std::io;
use std::time::{Duration, Instant};

/// How long an accept loop waits after a failure before accepting again.
const PAUSE: Duration = Duration::from_millis(100);
/// How long after one logged run of failures another one is only counted.
const QUIET: Duration = Duration::from_secs(10);

/// Linux's "too many open files" errors: the process's limit (`EMFILE`) and the system's
/// (`ENFILE`).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// The failures of one listener's accept loop.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    /// When the current run of failures began; `None` while accepting works.
    failing_since: Option<Instant>,
    /// Failures not yet reported by an "accepting again" line.
    failures: u64,
    /// When a run was last logged.
    logged: Option<Instant>,
}

impl AcceptErrors {
    /// Failures of the listener named `listener` (for the log: "proxy", "tunnel"...).
    pub fn new(listener: &'static str) -> Self {
        AcceptErrors {
            listener,
            failing_since: None,
            failures: 0,
            logged: None,
        }
    }

    /// Records a failed accept and waits before the loop accepts again.
    pub async fn failed(&mut self, e: &io::Error) {
        self.failures += 1;
        if self.failing_since.is_none() {
            let now = Instant::now();
            self.failing_since = Some(now);
            if self.logged.is_none_or(|t| now.duration_since(t) >= QUIET) {
                self.logged = Some(now);
                let advice = if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
                    "out of file descriptors: raise the limit (ulimit -n, or LimitNOFILE for \
                     a service) or lower the connection limits; retrying until connections close"
                } else {
                    "retrying"
                };
                tracing::warn!(listener = self.listener, error = %e, advice, "accept failed");
            }
        }
        async_io::Timer::after(PAUSE).await;
    }

    /// Records a successful accept, logging the end of a logged run of failures.
    pub fn accepted(&mut self) {
        let Some(since) = self.failing_since.take() else {
            return;
        };
        if self.logged.is_some_and(|t| t >= since) {
            tracing::info!(
                listener = self.listener,
                failures = self.failures,
                for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "accepting connections again"
            );
            self.failures = 0;
        }
    }
}
