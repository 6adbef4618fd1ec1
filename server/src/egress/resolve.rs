//! Name resolution for egress: the shared [`Resolver`] (system resolver, off the executor,
//! under a deadline, with bounded lookup slots) with the server's defaults, and its
//! failures turned into the typed refusals a stream open is answered with.

use std::net::SocketAddr;
use std::time::Duration;

use fluidity_proto::{Host, OpenRefusal, RefusalReason, Target};
pub use fluidity_runtime_smol::resolve::Resolver;
use fluidity_runtime_smol::resolve::{LookupError, LookupFailure};

/// Default time allowed for one name lookup.
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default number of lookups that may run at once.
pub const DEFAULT_MAX_LOOKUPS: usize = 64;

/// Most addresses kept from one lookup; more are never needed to find one that answers.
pub const MAX_ADDRESSES: usize = 16;

/// The resolver with the server's defaults.
pub fn default_resolver() -> Resolver {
    Resolver::new(DEFAULT_RESOLVE_TIMEOUT, DEFAULT_MAX_LOOKUPS)
}

/// The addresses of `target`, IPv6 and IPv4 alternating, without duplicates and at most
/// [`MAX_ADDRESSES`]; a failure is the refusal the stream open is answered with.
pub async fn resolve(resolver: &Resolver, target: &Target) -> Result<Vec<SocketAddr>, OpenRefusal> {
    let name = match &target.host {
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => name,
    };
    resolver
        .lookup(name, target.port, MAX_ADDRESSES)
        .await
        .map_err(|e| {
            // Debug, like every refusal here: during a DNS outage each request meets it.
            tracing::debug!(%target, error = %e, "name lookup gave no address");
            OpenRefusal::new(refusal_reason(&e), e.to_string())
        })
}

/// The refusal reason for a lookup that gave no address.
fn refusal_reason(e: &LookupError) -> RefusalReason {
    match e {
        LookupError::Invalid
        | LookupError::NoAddresses
        | LookupError::Failed {
            kind: LookupFailure::NoSuchHost,
            ..
        } => RefusalReason::NoSuchHost,
        LookupError::TimedOut(_)
        | LookupError::NoSlot { .. }
        | LookupError::Failed {
            kind: LookupFailure::Temporary,
            ..
        } => RefusalReason::TimedOut,
        LookupError::Failed {
            kind: LookupFailure::Other,
            ..
        } => RefusalReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_are_no_such_host_with_the_reason() {
        let t = Target::parse("nonexistent.invalid:80").unwrap();
        let err = smol::block_on(resolve(&default_resolver(), &t)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::NoSuchHost);
        assert!(
            err.detail == "names under .invalid never resolve (RFC 6761)",
            "{}",
            err.detail
        );
    }

    #[test]
    fn every_lookup_failure_has_its_refusal() {
        let failed = |kind| LookupError::Failed {
            kind,
            message: String::new(),
        };
        let cases = [
            (LookupError::Invalid, RefusalReason::NoSuchHost),
            (LookupError::NoAddresses, RefusalReason::NoSuchHost),
            (failed(LookupFailure::NoSuchHost), RefusalReason::NoSuchHost),
            (failed(LookupFailure::Temporary), RefusalReason::TimedOut),
            (failed(LookupFailure::Other), RefusalReason::Other),
            (
                LookupError::TimedOut(Duration::from_secs(1)),
                RefusalReason::TimedOut,
            ),
            (
                LookupError::NoSlot {
                    timeout: Duration::from_secs(1),
                    busy: 1,
                    own_share: false,
                },
                RefusalReason::TimedOut,
            ),
        ];
        for (e, reason) in cases {
            assert_eq!(refusal_reason(&e), reason, "{e:?}");
        }
    }
}
