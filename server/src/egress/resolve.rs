//! Name resolution for egress, off the executor and under a deadline.
//!
//! Names are resolved with the system resolver (`getaddrinfo` through
//! [`std::net::ToSocketAddrs`]) on the `blocking` thread pool, so `/etc/hosts`,
//! `nsswitch.conf` and the VPC resolver behave as for any other program. A lookup that
//! outlives its deadline is answered [`RefusalReason::TimedOut`]; its thread runs on until
//! the C library gives up (glibc: `timeout` × `attempts` from `resolv.conf`), holding one of
//! a bounded number of lookup slots, so a flood of slow lookups cannot grow the thread pool
//! without bound.
//!
//! # How failures are told apart
//!
//! std reports a `getaddrinfo` failure as an [`io::Error`] whose message carries
//! `gai_strerror`'s text, so the reason is read from that text (glibc and musl wording):
//!
//! | `getaddrinfo` result | message | reason |
//! |---|---|---|
//! | `EAI_NONAME` (NXDOMAIN, or a name glibc rejects without asking) | "Name or service not known" | [`NoSuchHost`](RefusalReason::NoSuchHost) |
//! | `EAI_NODATA` (the name exists but has no A/AAAA) | "No address associated with hostname" | [`NoSuchHost`](RefusalReason::NoSuchHost) |
//! | `EAI_AGAIN` (no answer from the resolver, or SERVFAIL) | "Temporary failure in name resolution" | [`TimedOut`](RefusalReason::TimedOut) |
//! | anything else, including `EAI_FAIL` and `EAI_SYSTEM` | | [`Other`](RefusalReason::Other) |
//!
//! A lookup that returns no address at all is also `NoSuchHost`.
//!
//! Where the resolver cannot be reached (a sandbox without network, a VPC resolver that is
//! down), glibc answers `EAI_AGAIN` or takes until the deadline: either way the refusal is
//! `TimedOut`, not `NoSuchHost`, which is the honest answer since nobody said the name does
//! not exist.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_io::Timer;
use fluidity_proto::{Host, OpenRefusal, RefusalReason, Target};
use futures_lite::FutureExt;
use smol::lock::Semaphore;

/// Default time allowed for one name lookup.
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default number of lookups that may run at once.
pub const DEFAULT_MAX_LOOKUPS: usize = 64;

/// Most addresses kept from one lookup; more are never needed to find one that answers.
pub const MAX_ADDRESSES: usize = 16;

/// Resolves targets to socket addresses; cheap to clone (clones share the lookup slots).
#[derive(Debug, Clone)]
pub struct Resolver {
    timeout: Duration,
    slots: Arc<Semaphore>,
    max_lookups: usize,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new(DEFAULT_RESOLVE_TIMEOUT, DEFAULT_MAX_LOOKUPS)
    }
}

impl Resolver {
    /// A resolver that gives each lookup `timeout` (waiting for a slot included) and runs at
    /// most `max_lookups` (at least one) at a time.
    pub fn new(timeout: Duration, max_lookups: usize) -> Self {
        Resolver {
            timeout,
            slots: Arc::new(Semaphore::new(max_lookups.max(1))),
            max_lookups: max_lookups.max(1),
        }
    }

    /// The time allowed for one lookup.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The addresses of `target`, in the resolver's order, without duplicates and at most
    /// [`MAX_ADDRESSES`]. An IP literal is returned as is, without any lookup.
    pub async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, OpenRefusal> {
        let name = match &target.host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
            Host::Name(name) => name.clone(),
        };
        if is_special_invalid(&name) {
            // RFC 6761 §6.4: `.invalid` never resolves; answer without asking DNS.
            return Err(OpenRefusal::new(
                RefusalReason::NoSuchHost,
                format!("{target}: names under .invalid never resolve (RFC 6761)"),
            ));
        }
        let port = target.port;
        let slots = self.slots.clone();
        // Whether the lookup got a slot: a timeout before it did is the slots' doing
        // (other lookups hanging), not this name's.
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started_in = started.clone();
        let lookup = async move {
            let slot = slots.acquire_arc().await;
            started_in.store(true, std::sync::atomic::Ordering::Relaxed);
            blocking::unblock(move || {
                // The slot is held until getaddrinfo returns, even if the caller gave up.
                let _slot = slot;
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|addrs| addrs.collect::<Vec<_>>())
            })
            .await
        };
        let timeout = self.timeout;
        let outcome = async { Some(lookup.await) }
            .or(async {
                Timer::after(timeout).await;
                None
            })
            .await;
        match outcome {
            Some(Ok(found)) => {
                let mut addrs = Vec::with_capacity(found.len().min(MAX_ADDRESSES));
                for a in found {
                    if !addrs.contains(&a) && addrs.len() < MAX_ADDRESSES {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    return Err(OpenRefusal::new(
                        RefusalReason::NoSuchHost,
                        format!("{target}: the name has no addresses"),
                    ));
                }
                Ok(addrs)
            }
            None if !started.load(std::sync::atomic::Ordering::Relaxed) => {
                let busy = self.max_lookups;
                // Debug, like every refusal here: during a DNS outage each request meets it.
                tracing::debug!(%target, ?timeout, busy, "no name lookup slot free in time");
                Err(OpenRefusal::new(
                    RefusalReason::TimedOut,
                    format!(
                        "{target}: no name lookup could start within {timeout:?}: all {busy} \
                         were waiting on slow answers from the DNS server"
                    ),
                ))
            }
            None => {
                tracing::debug!(%target, ?timeout, "name lookup timed out");
                Err(OpenRefusal::new(
                    RefusalReason::TimedOut,
                    format!("{target}: name lookup took longer than {timeout:?}"),
                ))
            }
            Some(Err(e)) => {
                let reason = classify_lookup_error(&e);
                tracing::debug!(%target, error = %e, ?reason, "name lookup failed");
                Err(OpenRefusal::new(
                    reason,
                    format!("{target}: name lookup failed: {}", lookup_message(&e)),
                ))
            }
        }
    }
}

/// Whether `name` is `invalid` or under the `.invalid` special-use domain.
fn is_special_invalid(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("invalid")
        || name
            .len()
            .checked_sub(".invalid".len())
            .is_some_and(|i| name[i..].eq_ignore_ascii_case(".invalid"))
}

/// The refusal reason for a failed lookup; see the [module documentation](self).
pub fn classify_lookup_error(e: &io::Error) -> RefusalReason {
    if e.raw_os_error().is_some() {
        // EAI_SYSTEM: std hands over errno, which says nothing about the name.
        return RefusalReason::Other;
    }
    let msg = e.to_string().to_ascii_lowercase();
    const NO_SUCH_HOST: &[&str] = &[
        "name or service not known",
        "no address associated with hostname",
        "nodename nor servname provided",
        "name does not resolve",
        "name has no usable address",
    ];
    const TEMPORARY: &[&str] = &["temporary failure in name resolution", "try again"];
    if NO_SUCH_HOST.iter().any(|m| msg.contains(m)) {
        RefusalReason::NoSuchHost
    } else if TEMPORARY.iter().any(|m| msg.contains(m)) {
        RefusalReason::TimedOut
    } else {
        RefusalReason::Other
    }
}

/// `gai_strerror`'s text without std's "failed to lookup address information: " prefix.
fn lookup_message(e: &io::Error) -> String {
    let msg = e.to_string();
    match msg.split_once(": ") {
        Some((prefix, rest)) if prefix.starts_with("failed to lookup") => rest.to_owned(),
        _ => msg,
    }
}

#[cfg(test)]
mod special_use_tests {
    use super::*;

    #[test]
    fn invalid_names_fail_without_a_lookup() {
        assert!(is_special_invalid("nonexistent.invalid"));
        assert!(is_special_invalid("A.B.INVALID."));
        assert!(is_special_invalid("invalid"));
        assert!(!is_special_invalid("invalid.example.com"));
        assert!(!is_special_invalid("notinvalid"));
        let r = Resolver::default();
        let t = Target::parse("nonexistent.invalid:80").unwrap();
        let err = smol::block_on(r.resolve(&t)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::NoSuchHost);
    }

    #[test]
    fn a_lookup_that_finds_no_free_slot_says_so() {
        let r = Resolver::new(Duration::from_millis(200), 1);
        // The one slot held, as a lookup hanging on the DNS server would.
        let _held = smol::block_on(r.slots.acquire_arc());
        let t = Target::parse("example.com:80").unwrap();
        let err = smol::block_on(r.resolve(&t)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::TimedOut);
        assert!(
            err.detail.contains("no name lookup could start") && err.detail.contains("all 1"),
            "{}",
            err.detail
        );
    }
}
