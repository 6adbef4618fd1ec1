//! Name lookups off the executor and under a deadline: the server's for the targets it
//! dials, the agent's for the server it connects to.
//!
//! Names are resolved with the system resolver (`getaddrinfo` through
//! [`std::net::ToSocketAddrs`]) on the blocking thread pool, so `/etc/hosts`,
//! `nsswitch.conf` and the VPC resolver behave as for any other program. A lookup that
//! outlives its deadline is answered [`LookupError::TimedOut`]; its thread runs on until
//! the C library gives up (glibc: `timeout` × `attempts` from `resolv.conf`), holding one of
//! a bounded number of lookup slots, so a flood of slow lookups cannot grow the thread pool
//! without bound.
//!
//! # How failures are told apart
//!
//! std reports a `getaddrinfo` failure as an [`io::Error`] whose message carries
//! `gai_strerror`'s text, so the kind is read from that text (glibc and musl wording):
//!
//! | `getaddrinfo` result | message | [`LookupFailure`] |
//! |---|---|---|
//! | `EAI_NONAME` (NXDOMAIN, or a name glibc rejects without asking) | "Name or service not known" | `NoSuchHost` |
//! | `EAI_NODATA` (the name exists but has no A/AAAA) | "No address associated with hostname" | `NoSuchHost` |
//! | `EAI_AGAIN` (no answer from the resolver, or SERVFAIL) | "Temporary failure in name resolution" | `Temporary` |
//! | anything else, including `EAI_FAIL` and `EAI_SYSTEM` | | `Other` |
//!
//! Where the resolver cannot be reached (a sandbox without network, a VPC resolver that is
//! down), glibc answers `EAI_AGAIN` or takes until the deadline: either way the answer is
//! a temporary failure or a timeout, not "no such host", which is the honest answer since
//! nobody said the name does not exist.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_io::Timer;
use futures_lite::FutureExt;
use smol::lock::Semaphore;

use crate::happy_eyeballs::interleave_families;

/// Resolves names to socket addresses; cheap to clone (clones share the lookup slots).
#[derive(Debug, Clone)]
pub struct Resolver {
    timeout: Duration,
    slots: Arc<Semaphore>,
    max_lookups: usize,
    /// The slots of one user of shared slots ([`Resolver::share`]), taken before one of
    /// `slots`, and how many there are.
    share: Option<(Arc<Semaphore>, usize)>,
}

/// Why a lookup gave no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name is `invalid` or under `.invalid`, which never resolves (RFC 6761 §6.4);
    /// nobody was asked.
    #[error("names under .invalid never resolve (RFC 6761)")]
    Invalid,
    /// The lookup succeeded with no address.
    #[error("the name has no addresses")]
    NoAddresses,
    /// `getaddrinfo` failed.
    #[error("name lookup failed: {message}")]
    Failed {
        /// What kind of failure, read from the message.
        kind: LookupFailure,
        /// `gai_strerror`'s text.
        message: String,
    },
    /// The lookup took longer than the resolver's timeout.
    #[error("name lookup took longer than {0:?}")]
    TimedOut(Duration),
    /// Every lookup slot open to this lookup stayed taken for the whole timeout: other
    /// lookups hang, not necessarily this name's.
    #[error(
        "no name lookup could start within {timeout:?}: all {busy} {} were waiting on slow \
         answers from the DNS server",
        if *own_share { "lookups this tunnel may run at once" } else { "lookup slots" }
    )]
    NoSlot {
        /// The resolver's timeout.
        timeout: Duration,
        /// The number of lookup slots, all taken.
        busy: usize,
        /// Whether the slots taken were this user's share ([`Resolver::share`]) rather
        /// than the resolver's.
        own_share: bool,
    },
}

/// The kind of a failed `getaddrinfo`; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFailure {
    /// The name does not exist, or has no address.
    NoSuchHost,
    /// The DNS server gave no answer in time, or a temporary error.
    Temporary,
    /// Anything else.
    Other,
}

impl Resolver {
    /// A resolver that gives each lookup `timeout` (waiting for a slot included) and runs at
    /// most `max_lookups` (at least one) at a time.
    pub fn new(timeout: Duration, max_lookups: usize) -> Self {
        Resolver {
            timeout,
            slots: Arc::new(Semaphore::new(max_lookups.max(1))),
            max_lookups: max_lookups.max(1),
            share: None,
        }
    }

    /// A resolver over the same slots for one of their users (a tunnel), which holds at
    /// most `limit` (at least one) of them at a time: a user whose lookups all hang
    /// leaves the other slots to the others. Clones of the result share its limit.
    pub fn share(&self, limit: usize) -> Resolver {
        let limit = limit.clamp(1, self.max_lookups);
        Resolver {
            share: Some((Arc::new(Semaphore::new(limit)), limit)),
            ..self.clone()
        }
    }

    /// How many lookups may run at once (over all users of shared slots).
    pub fn max_lookups(&self) -> usize {
        self.max_lookups
    }

    /// The time allowed for one lookup.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The addresses of `host` with `port`, without duplicates, IPv6 and IPv4 alternating
    /// from the family of the resolver's first (RFC 8305 §4; each family in the resolver's
    /// order), at most `max_addresses`. An IP literal is returned as is, without a lookup
    /// (one address, whatever `max_addresses`).
    pub async fn lookup(
        &self,
        host: &str,
        port: u16,
        max_addresses: usize,
    ) -> Result<Vec<SocketAddr>, LookupError> {
        if let Ok(ip) = host.parse() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if is_special_invalid(host) {
            return Err(LookupError::Invalid);
        }
        let name = host.to_owned();
        let slots = self.slots.clone();
        let share = self.share.as_ref().map(|(s, _)| s.clone());
        // Whether the lookup got its share's slot and then one of the resolver's: a
        // timeout before it did is the slots' doing (other lookups hanging), not this
        // name's.
        let shared = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let (shared_in, started_in) = (shared.clone(), started.clone());
        let lookup = async move {
            let own = match share {
                Some(share) => Some(share.acquire_arc().await),
                None => None,
            };
            shared_in.store(true, Ordering::Relaxed);
            let slot = slots.acquire_arc().await;
            started_in.store(true, Ordering::Relaxed);
            smol::unblock(move || {
                // The slots are held until getaddrinfo returns, even if the caller gave up.
                let _slots = (own, slot);
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
                let mut addrs = Vec::with_capacity(found.len());
                for a in found {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    return Err(LookupError::NoAddresses);
                }
                // Cut after interleaving, so that many addresses of one family do not
                // crowd out the other.
                let mut addrs = interleave_families(addrs);
                addrs.truncate(max_addresses);
                Ok(addrs)
            }
            None if !started.load(Ordering::Relaxed) => Err(match &self.share {
                Some((_, limit)) if !shared.load(Ordering::Relaxed) => LookupError::NoSlot {
                    timeout,
                    busy: *limit,
                    own_share: true,
                },
                _ => LookupError::NoSlot {
                    timeout,
                    busy: self.max_lookups,
                    own_share: false,
                },
            }),
            None => Err(LookupError::TimedOut(timeout)),
            Some(Err(e)) => Err(LookupError::Failed {
                kind: classify(&e),
                message: lookup_message(&e),
            }),
        }
    }
}

/// Whether `name` is `invalid` or under the `.invalid` special-use domain.
fn is_special_invalid(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    // By bytes: a name that is not ASCII must not be cut inside a character.
    let name = name.as_bytes();
    name.eq_ignore_ascii_case(b"invalid")
        || name
            .len()
            .checked_sub(b".invalid".len())
            .is_some_and(|i| name[i..].eq_ignore_ascii_case(b".invalid"))
}

/// The kind of a failed lookup; see the [module documentation](self).
pub fn classify(e: &io::Error) -> LookupFailure {
    if e.raw_os_error().is_some() {
        // EAI_SYSTEM: std hands over errno, which says nothing about the name.
        return LookupFailure::Other;
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
        LookupFailure::NoSuchHost
    } else if TEMPORARY.iter().any(|m| msg.contains(m)) {
        LookupFailure::Temporary
    } else {
        LookupFailure::Other
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
mod tests {
    use super::*;

    #[test]
    fn a_name_that_is_not_ascii_is_judged_without_a_panic() {
        assert!(!is_special_invalid("\u{e9}aaaaaaa"));
        assert!(!is_special_invalid("\u{e9}"));
        assert!(is_special_invalid("x\u{e9}.INVALID."));
        assert!(is_special_invalid("invalid"));
    }

    #[test]
    fn invalid_names_fail_without_a_lookup() {
        assert!(is_special_invalid("nonexistent.invalid"));
        assert!(is_special_invalid("A.B.INVALID."));
        assert!(is_special_invalid("invalid"));
        assert!(!is_special_invalid("invalid.example.com"));
        assert!(!is_special_invalid("notinvalid"));
        // No slot: a lookup would time out, so only the shortcut can answer.
        let r = Resolver::new(Duration::from_millis(50), 1);
        let _held = smol::block_on(r.slots.acquire_arc());
        let err = smol::block_on(r.lookup("nonexistent.invalid", 80, 4)).unwrap_err();
        assert_eq!(err, LookupError::Invalid);
    }

    #[test]
    fn an_ip_literal_is_its_own_address() {
        let r = Resolver::new(Duration::from_millis(50), 1);
        let _held = smol::block_on(r.slots.acquire_arc());
        let got = smol::block_on(r.lookup("::1", 8443, 4)).expect("literal");
        assert_eq!(got, vec!["[::1]:8443".parse().unwrap()]);
    }

    #[test]
    fn localhost_resolves_to_loopback_addresses_without_duplicates() {
        let r = Resolver::new(Duration::from_secs(5), 2);
        let got = smol::block_on(r.lookup("localhost", 80, 16)).expect("localhost");
        assert!(!got.is_empty() && got.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "{got:?}");
        let one = smol::block_on(r.lookup("localhost", 80, 1)).expect("localhost");
        assert_eq!(one, got[..1]);
    }

    #[test]
    fn a_lookup_that_finds_no_free_slot_says_so() {
        let r = Resolver::new(Duration::from_millis(200), 1);
        // The one slot held, as a lookup hanging on the DNS server would.
        let _held = smol::block_on(r.slots.acquire_arc());
        let err = smol::block_on(r.lookup("example.com", 80, 4)).unwrap_err();
        assert!(
            matches!(
                err,
                LookupError::NoSlot {
                    busy: 1,
                    own_share: false,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("no name lookup could start") && text.contains("all 1"),
            "{text}"
        );
    }

    #[test]
    fn a_user_whose_share_is_taken_leaves_the_other_slots_to_the_others() {
        let r = Resolver::new(Duration::from_millis(200), 4);
        let greedy = r.share(2);
        // The greedy user's two lookups hang on the DNS server.
        let (_one, _two) = smol::block_on(async {
            let own = greedy.share.as_ref().unwrap().0.clone();
            let held = (own.acquire_arc().await, own.acquire_arc().await);
            let slots = (r.slots.acquire_arc().await, r.slots.acquire_arc().await);
            (held, slots)
        });
        let err = smol::block_on(greedy.lookup("localhost", 80, 4)).unwrap_err();
        assert!(
            matches!(
                err,
                LookupError::NoSlot {
                    busy: 2,
                    own_share: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("this tunnel may run"), "{err}");
        // Another user, and a clone of the greedy one's, meet the same slots as before.
        let other = r.share(2);
        let got = smol::block_on(other.lookup("localhost", 80, 4)).expect("localhost");
        assert!(got.iter().all(|a| a.ip().is_loopback()), "{got:?}");
        let again = greedy.clone();
        assert!(smol::block_on(again.lookup("localhost", 80, 4)).is_err());
    }

    #[test]
    fn failures_are_classified_by_their_message() {
        let e = |m: &str| io::Error::other(format!("failed to lookup address information: {m}"));
        assert_eq!(
            classify(&e("Name or service not known")),
            LookupFailure::NoSuchHost
        );
        assert_eq!(
            classify(&e("No address associated with hostname")),
            LookupFailure::NoSuchHost
        );
        assert_eq!(
            classify(&e("Temporary failure in name resolution")),
            LookupFailure::Temporary
        );
        assert_eq!(
            classify(&e("Non-recoverable failure in name resolution")),
            LookupFailure::Other
        );
        assert_eq!(
            classify(&io::Error::from_raw_os_error(12)),
            LookupFailure::Other
        );
        assert_eq!(
            lookup_message(&e("Name or service not known")),
            "Name or service not known"
        );
    }
}
