//! Waiting for the woken server: Query until it runs and has an address, showing the phase
//! and the time spent, and giving up at a limit.
//!
//! A Fargate task takes 60–90 s to start (the earlier implementation gave up after about
//! 35 s), so the default limit is generous and the person waiting sees what is happening:
//! `waking the server… 3s`, `waiting for the server to start… 25s (task PENDING)`,
//! `waiting for an address… 40s`.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use fluidity_aws::control::types::{QueryResponse, ServerStatus};

/// Where the agent is in bringing its server up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The Wake call is under way.
    Waking,
    /// The service wants a task, which is not running yet.
    Starting {
        /// ECS's last status of the task, if one exists.
        task_status: Option<String>,
    },
    /// The task runs but its address is not known yet.
    Addressing,
    /// Getting the agent's certificate from the CA function.
    Certifying,
    /// The server the agent used went away (its tunnel keeps failing): waiting for the
    /// service's replacement task.
    Gone,
    /// Connecting to the server and authenticating.
    Connecting {
        /// The address dialled.
        server_ip: IpAddr,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Waking => f.write_str("waking the server"),
            Phase::Starting { task_status: None } => f.write_str("waiting for the server to start"),
            Phase::Starting {
                task_status: Some(s),
            } => write!(f, "waiting for the server to start (task {s})"),
            Phase::Addressing => f.write_str("waiting for an address"),
            Phase::Certifying => f.write_str("getting a certificate"),
            Phase::Gone => f.write_str("the server went away; waiting for a new one"),
            Phase::Connecting { server_ip } => write!(f, "connecting to the server at {server_ip}"),
        }
    }
}

/// Shows progress: a line on stderr (`fluidity: waking the server… 3s`), or an info log
/// event when quiet, when the phase changes and then every `every`, each with the time
/// since the lifecycle began.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    every: Duration,
    last: Option<(Phase, Instant)>,
    quiet: bool,
}

impl Progress {
    /// Progress starting now, repeating every `every`; `quiet` makes it info log events
    /// instead of stderr lines.
    pub fn new(every: Duration, quiet: bool) -> Self {
        Progress {
            started: Instant::now(),
            every,
            last: None,
            quiet,
        }
    }

    /// Time since the lifecycle began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The line shown for `phase` now, e.g. `waiting for an address… 40s`.
    pub fn line(&self, phase: &Phase) -> String {
        format!("{phase}… {}s", self.elapsed().as_secs())
    }

    /// Reports `phase`: shown if it is new or `every` has passed since it was last shown.
    pub fn report(&mut self, phase: Phase) {
        let now = Instant::now();
        let due = match &self.last {
            Some((p, at)) => *p != phase || now.duration_since(*at) >= self.every,
            None => true,
        };
        if !due {
            return;
        }
        let line = self.line(&phase);
        let elapsed_s = self.elapsed().as_secs();
        if self.quiet {
            tracing::info!(phase = %phase, elapsed_s, "{line}");
        } else {
            // Shown once, as a plain line; the log keeps it at debug level.
            eprintln!("fluidity: {line}");
            tracing::debug!(phase = %phase, elapsed_s, "{line}");
        }
        self.last = Some((phase, now));
    }
}

/// A running server as Query reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The address to dial.
    pub server_ip: IpAddr,
    /// The server's ARN: the CN both certificates carry.
    pub server_arn: String,
    /// The agent IP the control plane stored for this server, if Query reported one.
    pub agent_ip: Option<IpAddr>,
}

/// Why waiting ended without a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    /// How long it waited.
    pub waited: Duration,
    /// The last phase seen.
    pub phase: Phase,
    /// The last Query failure or note, if any.
    pub last_note: Option<String>,
}

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {}s without a usable server (still {})",
            self.waited.as_secs(),
            self.phase
        )?;
        if let Some(n) = &self.last_note {
            write!(f, "; last note: {n}")?;
        }
        Ok(())
    }
}

/// What one Query answer means for the waiting agent.
pub fn interpret(q: &QueryResponse) -> Result<Located, Phase> {
    match (q.status, q.server_ip, q.server_arn.as_ref()) {
        (ServerStatus::Running, Some(ip), Some(arn)) => Ok(Located {
            server_ip: ip,
            server_arn: arn.clone(),
            agent_ip: q.agent_public_ip,
        }),
        (ServerStatus::Running, _, _) => Err(Phase::Addressing),
        // The task runs; only its public address is missing.
        (ServerStatus::Starting, _, _) if q.task_status.as_deref() == Some("RUNNING") => {
            Err(Phase::Addressing)
        }
        _ => Err(Phase::Starting {
            task_status: q.task_status.clone(),
        }),
    }
}

/// A failed control call, as the waiting agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailed {
    /// What failed, in words.
    pub message: String,
    /// Whether retrying cannot help: the function refused the call (4xx other than 408
    /// and 429: a permission or URL the user must fix) or there are no credentials to
    /// sign with.
    pub lasting: bool,
}

impl CallFailed {
    /// `err` from a control call.
    pub fn of(err: &fluidity_aws::Error) -> CallFailed {
        use fluidity_aws::Error as E;
        let lasting = match err {
            E::HttpStatus { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            E::Credentials { .. } | E::Config(_) => true,
            _ => false,
        };
        CallFailed {
            message: err.to_string(),
            lasting,
        }
    }
}

impl fmt::Display for CallFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if self.lasting {
            f.write_str(" (retrying cannot help: check the agent's AWS credentials and its permission to call the function URLs)")?;
        }
        Ok(())
    }
}

/// Calls `query` every `poll` until it reports a running server with an address and an
/// ARN, or `limit` has passed since `progress` began. Failed queries are retried (the
/// control plane may throttle) unless the failure is lasting, which ends the wait at
/// once; each wait is a timer, never a busy loop.
pub async fn wait_until_running<Q, F>(
    mut query: Q,
    limit: Duration,
    poll: Duration,
    progress: &mut Progress,
) -> Result<Located, GaveUp>
where
    Q: FnMut() -> F,
    F: Future<Output = Result<QueryResponse, CallFailed>>,
{
    let mut phase = Phase::Starting { task_status: None };
    loop {
        let last_note = match query().await {
            Ok(q) => match interpret(&q) {
                Ok(found) => return Ok(found),
                Err(p) => {
                    phase = p;
                    q.detail.clone()
                }
            },
            Err(e) if e.lasting => {
                return Err(GaveUp {
                    waited: progress.elapsed(),
                    phase,
                    last_note: Some(format!("Query failed: {e}")),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Query failed; retrying");
                Some(format!("Query failed: {e}"))
            }
        };
        progress.report(phase.clone());
        if progress.elapsed() + poll > limit {
            return Err(GaveUp {
                waited: progress.elapsed(),
                phase,
                last_note,
            });
        }
        async_io::Timer::after(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    fn q(status: ServerStatus, ip: Option<&str>, arn: Option<&str>) -> QueryResponse {
        QueryResponse {
            status,
            server_ip: ip.map(|s| s.parse().unwrap()),
            server_ip_kind: None,
            server_arn: arn.map(str::to_owned),
            agent_public_ip: Some("203.0.113.9".parse().unwrap()),
            desired_count: 1,
            task_status: Some("PENDING".into()),
            detail: Some("task is PENDING".into()),
        }
    }

    const ARN: &str = "arn:aws:ecs:eu-west-1:1:task/c/abc";

    #[test]
    fn waits_through_starting_and_addressing() {
        let answers = RefCell::new(VecDeque::from(vec![
            Ok(q(ServerStatus::Starting, None, None)),
            Err(CallFailed {
                message: "throttled".to_owned(),
                lasting: false,
            }),
            Ok(q(ServerStatus::Running, None, Some(ARN))),
            Ok(q(ServerStatus::Running, Some("198.51.100.7"), Some(ARN))),
        ]));
        let calls = RefCell::new(0);
        let mut progress = Progress::new(Duration::from_secs(10), true);
        let found = smol::block_on(wait_until_running(
            || {
                *calls.borrow_mut() += 1;
                let a = answers.borrow_mut().pop_front().unwrap();
                async move { a }
            },
            Duration::from_secs(60),
            Duration::from_millis(1),
            &mut progress,
        ))
        .unwrap();
        assert_eq!(found.server_ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(found.server_arn, ARN);
        assert_eq!(*calls.borrow(), 4);
    }

    #[test]
    fn gives_up_at_the_limit_and_says_where_it_was() {
        let mut progress = Progress::new(Duration::from_secs(10), true);
        let calls = RefCell::new(0u32);
        let err = smol::block_on(wait_until_running(
            || {
                *calls.borrow_mut() += 1;
                async { Ok(q(ServerStatus::Running, None, Some(ARN))) }
            },
            Duration::from_millis(100),
            Duration::from_millis(10),
            &mut progress,
        ))
        .unwrap_err();
        assert_eq!(err.phase, Phase::Addressing);
        let text = err.to_string();
        assert!(text.contains("waiting for an address"), "{text}");
        assert!(*calls.borrow() >= 2, "it polled more than once");
    }

    /// A refusal that retrying cannot mend (a 403: no permission) ends the wait at once,
    /// saying so; a throttled or failed call is retried.
    #[test]
    fn a_lasting_failure_ends_the_wait_at_once() {
        let refused = fluidity_aws::Error::HttpStatus {
            url: "https://q.lambda-url.eu-west-1.on.aws/".into(),
            status: 403,
            body: "forbidden".into(),
        };
        let throttled = fluidity_aws::Error::HttpStatus {
            url: "https://q.lambda-url.eu-west-1.on.aws/".into(),
            status: 429,
            body: String::new(),
        };
        assert!(CallFailed::of(&refused).lasting);
        assert!(!CallFailed::of(&throttled).lasting);
        let calls = RefCell::new(0u32);
        let mut progress = Progress::new(Duration::from_secs(10), true);
        let err = smol::block_on(wait_until_running(
            || {
                *calls.borrow_mut() += 1;
                let failed = CallFailed::of(&refused);
                async move { Err(failed) }
            },
            Duration::from_secs(600),
            Duration::from_millis(1),
            &mut progress,
        ))
        .unwrap_err();
        assert_eq!(*calls.borrow(), 1, "not retried");
        let text = err.to_string();
        assert!(
            text.contains("403") && text.contains("retrying cannot help"),
            "{text}"
        );
    }

    #[test]
    fn phases_read_well() {
        let p = Progress::new(Duration::from_secs(1), true);
        assert!(p.line(&Phase::Waking).starts_with("waking the server… "));
        assert_eq!(
            Phase::Starting {
                task_status: Some("PENDING".into())
            }
            .to_string(),
            "waiting for the server to start (task PENDING)"
        );
        assert_eq!(
            interpret(&q(ServerStatus::Stopping, Some("198.51.100.7"), Some(ARN))),
            Err(Phase::Starting {
                task_status: Some("PENDING".into())
            })
        );
    }
}
