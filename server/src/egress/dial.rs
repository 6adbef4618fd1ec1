//! Dialling a stream's target: policy, resolution, and one TCP connection attempt per
//! allowed address, staggered as RFC 8305 says.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::Timer;
use async_net::TcpStream;
use fluidity_proto::{Host, OpenRefusal, RefusalReason, Target};
use fluidity_runtime_smol::app::LogThrottle;
use fluidity_runtime_smol::happy_eyeballs::{first_to_connect, Won, ATTEMPT_DELAY};
use fluidity_runtime_smol::listener::out_of_descriptors;
use futures_lite::FutureExt;

use super::policy::EgressPolicy;
use super::resolve::{self, Resolver};

/// Default time allowed for one connection attempt to one address.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time allowed for a whole dial: resolution and every attempt.
pub const DEFAULT_DIAL_DEADLINE: Duration = Duration::from_secs(30);

/// Dials targets under an [`EgressPolicy`]; cheap to clone (clones share the policy and
/// the resolver's lookup slots).
#[derive(Debug, Clone)]
pub struct Dialer {
    policy: Arc<EgressPolicy>,
    resolver: Resolver,
    connect_timeout: Duration,
    deadline: Duration,
}

impl Dialer {
    /// A dialer with the default resolver, connect timeout and deadline.
    pub fn new(policy: EgressPolicy) -> Self {
        Dialer {
            policy: Arc::new(policy),
            resolver: resolve::default_resolver(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            deadline: DEFAULT_DIAL_DEADLINE,
        }
    }

    /// Sets the time allowed for one connection attempt.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the time allowed for a whole dial.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the resolver (and so the lookup timeout and concurrency).
    pub fn with_resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// A dialer for one tunnel: the same policy and lookup slots, of which its lookups
    /// hold at most half at a time, so one tunnel whose names all hang cannot stall
    /// every other tunnel's lookups.
    pub fn for_tunnel(&self) -> Dialer {
        Dialer {
            resolver: self.resolver.share(self.resolver.max_lookups() / 2),
            ..self.clone()
        }
    }

    /// The policy this dialer enforces.
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The time allowed for one connection attempt.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The time allowed for a whole dial.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Connects to `target`: checks the policy, resolves the name, drops every address the
    /// policy refuses, then tries the rest (IPv6 and IPv4 alternating, starting with the
    /// resolver's first; each attempt [`ATTEMPT_DELAY`] after the one before or when it
    /// fails, as RFC 8305 says) until one connects. Returns the connected socket, with
    /// `TCP_NODELAY` set, and the address it reached.
    ///
    /// A refusal carries the reason of the last failed attempt (a refused connection,
    /// unreachable network, timeout) or of the policy or lookup, and a detail line that names
    /// the target and the last error.
    pub async fn dial(&self, target: &Target) -> Result<(TcpStream, SocketAddr), OpenRefusal> {
        let start = Instant::now();
        let give_up_at = start + self.deadline;

        if let Err(denied) = self.policy.check_target(target) {
            tracing::debug!(%target, %denied, "egress denied before resolution");
            return Err(denied.to_refusal());
        }

        let deadline = self.deadline;
        let resolved = resolve::resolve(&self.resolver, target)
            .or(async {
                Timer::at(give_up_at).await;
                Err(OpenRefusal::new(
                    RefusalReason::TimedOut,
                    format!("not resolved within the dial deadline of {deadline:?}"),
                ))
            })
            .await?;

        let mut allowed = Vec::with_capacity(resolved.len());
        let mut first_denial = None;
        for addr in resolved {
            match self.policy.check_resolved(target, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(denied) => {
                    tracing::debug!(%target, %addr, %denied, "skipping denied address");
                    first_denial.get_or_insert(denied);
                }
            }
        }
        if allowed.is_empty() {
            let why = first_denial.map(|d| d.to_string()).unwrap_or_default();
            return Err(OpenRefusal::new(
                RefusalReason::DeniedByPolicy,
                format!("every address it resolves to is denied: {why}"),
            ));
        }

        let connect_timeout = self.connect_timeout;
        let outcome = first_to_connect(allowed, ATTEMPT_DELAY, |addr| async move {
            let limit = connect_timeout.min(give_up_at.saturating_duration_since(Instant::now()));
            if limit.is_zero() {
                return Err(Attempt::TooLate);
            }
            tracing::debug!(%target, %addr, "connecting");
            let result = TcpStream::connect(addr)
                .or(async {
                    Timer::after(limit).await;
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {limit:?}"),
                    ))
                })
                .await;
            result.map_err(|e| {
                tracing::debug!(%target, %addr, error = %e, "connection attempt failed");
                Attempt::Failed(e)
            })
        })
        .await;
        let failed = match outcome {
            Ok(Won {
                addr, conn: stream, ..
            }) => {
                if let Err(e) = stream.set_nodelay(true) {
                    // Only latency suffers; the connection itself is fine.
                    tracing::debug!(%target, %addr, error = %e, "could not set TCP_NODELAY");
                }
                tracing::debug!(%target, %addr, elapsed = ?start.elapsed(), "dialled");
                return Ok((stream, addr));
            }
            Err(failed) => failed,
        };
        let tried: Vec<(SocketAddr, io::Error)> = failed
            .into_iter()
            .filter_map(|(addr, a)| match a {
                Attempt::Failed(e) => Some((addr, e)),
                Attempt::TooLate => None,
            })
            .collect();
        if let Some((_, e)) = tried.iter().find(|(_, e)| out_of_descriptors(e)) {
            // The server's own shortage, not the target's: said once in a while, with
            // what to do, and to the agent too.
            if let Some(held_back) = DESCRIPTORS_LOG.allow(Instant::now()) {
                tracing::warn!(%target, error = %e, held_back,
                    "out of file descriptors: cannot connect to targets; raise the \
                     limit (ulimit -n, or LimitNOFILE for a service) or lower \
                     max_tunnels and max_streams");
            }
            return Err(OpenRefusal::new(
                RefusalReason::Other,
                format!(
                    "the server is out of file descriptors ({e}); its operator can raise \
                     its limit"
                ),
            ));
        }
        let count = tried.len();
        let Some((addr, e)) = tried.into_iter().last() else {
            return Err(OpenRefusal::new(
                RefusalReason::TimedOut,
                format!("the dial deadline of {deadline:?} passed before an address was tried"),
            ));
        };
        let (reason, why) = (classify_connect_error(&e), e.to_string());
        // The agent's answer names the target already: the detail names the address
        // only where it says more (a name's address, or the last of several).
        let which = match (count, &target.host) {
            (1, Host::Ip(_)) => None,
            (1, Host::Name(_)) => Some(addr.to_string()),
            _ => Some(format!("{count} addresses tried; the last, {addr}")),
        };
        // A refused or unreachable address is all the reason says; a timeout's or another
        // error's text says more.
        let says_more = !matches!(
            reason,
            RefusalReason::ConnectionRefused | RefusalReason::Unreachable
        );
        let detail = match (which, says_more) {
            (None, true) => why,
            (None, false) => String::new(),
            (Some(which), true) => format!("{which}: {why}"),
            (Some(which), false) => which,
        };
        Err(OpenRefusal::new(reason, detail))
    }
}

/// Why one address gave no connection.
enum Attempt {
    /// The connection attempt failed or timed out.
    Failed(io::Error),
    /// The dial deadline had passed when its turn came: not tried.
    TooLate,
}

/// One warning per this long about running out of descriptors when dialling.
static DESCRIPTORS_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// The refusal reason for a failed connection attempt.
pub fn classify_connect_error(e: &io::Error) -> RefusalReason {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
            RefusalReason::ConnectionRefused
        }
        io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkDown => RefusalReason::Unreachable,
        io::ErrorKind::TimedOut => RefusalReason::TimedOut,
        _ => RefusalReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn maps_connect_errors() {
        let os = io::Error::from_raw_os_error;
        // Linux errno values: the mapping must hold for what the kernel really returns.
        assert_eq!(
            classify_connect_error(&os(111)),
            RefusalReason::ConnectionRefused
        );
        assert_eq!(classify_connect_error(&os(101)), RefusalReason::Unreachable);
        assert_eq!(classify_connect_error(&os(113)), RefusalReason::Unreachable);
        assert_eq!(classify_connect_error(&os(110)), RefusalReason::TimedOut);
        assert_eq!(
            classify_connect_error(&os(104)),
            RefusalReason::ConnectionRefused
        );
        assert_eq!(classify_connect_error(&os(99)), RefusalReason::Other);
    }
}
