//! The CA function's policy and signing: a CSR is signed only when its CN is a
//! well-formed ARN (the server's identity), its SANs are IP addresses only, exactly one
//! for an agent and exactly two for a server, and the validity asked for is within the
//! role's bound. Parsing, the self-signature check and the signing itself are the
//! project's PKI ([`fluidity_runtime_smol::pki`]); this module adds the naming policy.
//!
//! The CA lives in a Secrets Manager secret whose string is JSON:
//! `{"ca_cert_pem": "-----BEGIN CERTIFICATE-----…", "ca_key_pem": "-----BEGIN PRIVATE KEY-----…"}`
//! (see [`ca_secret_json`]).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fluidity_runtime_smol::pki::{self, CaBundle, CertUsage};
use serde::{Deserialize, Serialize};

use super::error::ControlError;
use super::types::{CertRole, CertificateRequest, CertificateResponse};

/// Longest ARN accepted as a CN (the PKI's own CN bound).
const MAX_ARN_LEN: usize = 1024;

/// The JSON stored in the CA secret.
#[derive(Serialize, Deserialize)]
struct CaSecret {
    ca_cert_pem: String,
    ca_key_pem: String,
}

/// The secret string that holds `ca` for the CA function.
pub fn ca_secret_json(ca: &CaBundle) -> String {
    serde_json::json!({ "ca_cert_pem": ca.cert_pem(), "ca_key_pem": ca.key_pem() }).to_string()
}

/// Reads a CA secret string (see [`ca_secret_json`]), checking that the certificate is a
/// CA and the key is its key. Errors never quote the secret.
pub fn parse_ca_secret(secret: &str) -> Result<CaBundle, ControlError> {
    let s: CaSecret = serde_json::from_str(secret).map_err(|_| {
        ControlError::config(
            "the CA secret is not JSON with string fields ca_cert_pem and ca_key_pem",
        )
    })?;
    CaBundle::from_pem(s.ca_cert_pem, s.ca_key_pem)
        .map_err(|e| ControlError::config(format!("the CA secret holds no usable CA: {e}")))
}

/// Checks that `cn` is a well-formed ARN: `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE`
/// with partition `aws` or `aws-…`, a lowercase service, a non-empty region (a server is
/// a regional resource), a 12-digit account and a non-empty resource of printable ASCII
/// without spaces. Returns why not.
pub fn check_arn(cn: &str) -> Result<(), String> {
    if cn.len() > MAX_ARN_LEN {
        return Err(format!("it is longer than {MAX_ARN_LEN} characters"));
    }
    let parts: Vec<&str> = cn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Err(
            "an ARN has six colon-separated parts (arn:partition:service:region:account:resource)"
                .into(),
        );
    };
    let lower = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if prefix != "arn" {
        return Err("it does not start with \"arn:\"".into());
    }
    let partition_ok = partition == "aws"
        || partition
            .strip_prefix("aws-")
            .is_some_and(|rest| lower(rest) && !rest.ends_with('-'));
    if !partition_ok {
        return Err(format!("{partition:?} is not an AWS partition"));
    }
    if !lower(service) {
        return Err(format!("{service:?} is not a service name"));
    }
    if !lower(region) {
        return Err(format!("{region:?} is not a region"));
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{account:?} is not a 12-digit account id"));
    }
    if resource.is_empty() || !resource.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the resource part is empty or holds spaces or non-ASCII characters".into());
    }
    Ok(())
}

/// Whether `ip` can be a peer's address at all.
fn usable_ip(ip: &IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || *ip == IpAddr::from([255, 255, 255, 255]))
}

/// `role` with its article, for messages: "an agent", "a server".
fn a_role(role: CertRole) -> &'static str {
    match role {
        CertRole::Agent => "an agent",
        CertRole::Server => "a server",
    }
}

/// Applies the naming and validity policy to `req`; returns the validity to sign with.
pub fn check_request(req: &CertificateRequest, max_days: u32) -> Result<Duration, ControlError> {
    let names = pki::csr_names(&req.csr)
        .map_err(|e| ControlError::csr_refused(format!("the CSR is not acceptable: {e}")))?;
    let cn = names.common_name.as_deref().ok_or_else(|| {
        ControlError::csr_refused("the CSR has no CN; it must be the server's ARN")
    })?;
    check_arn(cn).map_err(|why| {
        ControlError::csr_refused(format!(
            "the CN {cn:?} is not a well-formed ARN: {why}; it must be the server's ARN"
        ))
    })?;
    if !names.dns_sans.is_empty() {
        return Err(ControlError::csr_refused(format!(
            "the CSR names DNS SANs ({}); only IP address SANs are allowed",
            names.dns_sans.join(", ")
        )));
    }
    let want = req.role.ip_san_count();
    let got = names.ip_sans.len();
    if got != want {
        let what = match req.role {
            CertRole::Agent => "exactly one IP SAN (the agent's public IP)",
            CertRole::Server => "exactly two IP SANs (the server's and the agent's public IPs)",
        };
        return Err(ControlError::csr_refused(format!(
            "{} certificate needs {what}; the CSR has {got}",
            a_role(req.role)
        )));
    }
    if let Some(ip) = names.ip_sans.iter().find(|ip| !usable_ip(ip)) {
        return Err(ControlError::csr_refused(format!(
            "the IP SAN {ip} is unspecified, multicast or broadcast"
        )));
    }
    let days = req.validity_days.unwrap_or(max_days);
    if days == 0 || days > max_days {
        return Err(ControlError::csr_refused(format!(
            "a validity of {days} days is outside 1..={max_days} days for {} certificate",
            a_role(req.role)
        )));
    }
    Ok(Duration::from_secs(u64::from(days) * 24 * 60 * 60))
}

/// Checks that an agent certificate names the address its caller calls from (`source`,
/// as the function URL saw it, the address Wake records): an agent may not have a
/// certificate for another's address. Server certificates are checked against the
/// service's task by the CA handler (`Control::sign_certificate`).
pub fn check_caller(req: &CertificateRequest, source: Option<IpAddr>) -> Result<(), ControlError> {
    if req.role != CertRole::Agent {
        return Ok(());
    }
    let Some(source) = source.map(super::handlers::canonical_ip) else {
        return Err(ControlError::bad_request(
            "an agent certificate needs the caller's source IP: call the CA through its \
             function URL",
        ));
    };
    let names = pki::csr_names(&req.csr)
        .map_err(|e| ControlError::csr_refused(format!("the CSR is not acceptable: {e}")))?;
    match names.ip_sans.as_slice() {
        [ip] if super::handlers::canonical_ip(*ip) == source => Ok(()),
        ips => Err(ControlError::csr_refused(format!(
            "an agent certificate names the address its caller calls from, {source}, and \
             this CSR names {}",
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Checks `req` and signs it with `ca`.
pub fn sign(
    ca: &CaBundle,
    req: &CertificateRequest,
    max_days: u32,
) -> Result<CertificateResponse, ControlError> {
    let validity = check_request(req, max_days)?;
    // A certificate cannot be trusted past its CA's end: an expired CA issues nothing, and
    // a leaf ends with its CA at the latest.
    let ca_end = pki::not_after(ca.cert_pem())
        .map_err(|e| ControlError::config(format!("the CA certificate is unreadable: {e}")))?;
    let left = ca_end.duration_since(SystemTime::now()).map_err(|_| {
        ControlError::config(
            "the CA in the secret has expired: make a new one (ca_secret_json) and give \
                 its certificate to the agents and servers",
        )
    })?;
    let validity = validity.min(left);
    let usage = match req.role {
        CertRole::Agent => CertUsage::Client,
        CertRole::Server => CertUsage::Server,
    };
    let certificate = pki::sign_csr(ca, &req.csr, usage, validity)
        .map_err(|e| ControlError::csr_refused(format!("the CSR could not be signed: {e}")))?;
    let not_after = pki::not_after(&certificate)
        .map_err(|e| ControlError::config(format!("the issued certificate is unreadable: {e}")))?;
    Ok(CertificateResponse {
        certificate,
        ca_certificate: ca.cert_pem().to_string(),
        not_after: not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// Seconds from `now` until a certificate answered by the CA expires (0 if it has).
pub fn remaining(resp: &CertificateResponse, now: SystemTime) -> Duration {
    // A `not_after` beyond what `SystemTime` can hold is "far in the future", not a panic.
    match UNIX_EPOCH.checked_add(Duration::from_secs(resp.not_after)) {
        Some(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
        None => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidity_runtime_smol::tls::PeerIdentity;

    const ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/fluidity/0123456789abcdef";

    fn req(cn: &str, ips: &[&str], role: CertRole) -> CertificateRequest {
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        CertificateRequest {
            csr: pki::create_csr(cn, &ips).unwrap().csr_pem,
            role,
            validity_days: None,
        }
    }

    #[test]
    fn arns_are_checked_part_by_part() {
        assert!(check_arn(ARN).is_ok());
        assert!(check_arn("arn:aws-us-gov:ec2:us-gov-west-1:123456789012:instance/i-0abc").is_ok());
        for (bad, why) in [
            ("fluidity-server", "six"),
            ("urn:aws:ecs:eu-west-1:123456789012:task/x", "arn:"),
            ("arn:gcp:ecs:eu-west-1:123456789012:task/x", "partition"),
            ("arn:aws:ECS:eu-west-1:123456789012:task/x", "service"),
            ("arn:aws:ecs::123456789012:task/x", "region"),
            ("arn:aws:ecs:eu-west-1:1234:task/x", "account"),
            ("arn:aws:ecs:eu-west-1:123456789012:", "resource"),
            ("arn:aws:ecs:eu-west-1:123456789012:task/a b", "resource"),
        ] {
            let e = check_arn(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn signs_agent_and_server_requests_within_policy() {
        let ca = pki::generate_ca("test CA", Duration::from_secs(86400 * 400)).unwrap();
        let now = SystemTime::now();
        let agent = sign(&ca, &req(ARN, &["203.0.113.9"], CertRole::Agent), 90).unwrap();
        let d = remaining(&agent, now);
        assert!(d > Duration::from_secs(89 * 86400) && d <= Duration::from_secs(90 * 86400 + 60));
        let der = rustls_pki_der(&agent.certificate);
        let id = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.common_name.as_deref(), Some(ARN));
        assert_eq!(id.ip_sans, vec!["203.0.113.9".parse::<IpAddr>().unwrap()]);
        let server = sign(
            &ca,
            &req(ARN, &["198.51.100.7", "203.0.113.9"], CertRole::Server),
            7,
        )
        .unwrap();
        assert!(remaining(&server, now) <= Duration::from_secs(7 * 86400 + 60));
        assert_eq!(server.ca_certificate, ca.cert_pem());
    }

    #[test]
    fn remaining_saturates_on_a_not_after_beyond_system_time() {
        let resp = CertificateResponse {
            certificate: String::new(),
            ca_certificate: String::new(),
            not_after: u64::MAX,
        };
        assert_eq!(remaining(&resp, SystemTime::now()), Duration::MAX);
        let past = CertificateResponse {
            not_after: 1,
            ..resp
        };
        assert_eq!(remaining(&past, SystemTime::now()), Duration::ZERO);
    }

    fn rustls_pki_der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    #[test]
    fn refuses_what_the_policy_does_not_allow() {
        let cases = [
            (
                req("fluidity-server", &["203.0.113.9"], CertRole::Agent),
                "not a well-formed ARN",
            ),
            (req(ARN, &[], CertRole::Agent), "exactly one IP SAN"),
            (
                req(ARN, &["203.0.113.9", "203.0.113.10"], CertRole::Agent),
                "the CSR has 2",
            ),
            (
                req(ARN, &["203.0.113.9"], CertRole::Server),
                "exactly two IP SANs",
            ),
            (
                req(ARN, &["1.1.1.1", "2.2.2.2", "3.3.3.3"], CertRole::Server),
                "the CSR has 3",
            ),
            (req(ARN, &["0.0.0.0"], CertRole::Agent), "unspecified"),
        ];
        for (r, why) in cases {
            let e = check_request(&r, 90).unwrap_err();
            assert_eq!(e.code, "csr_refused");
            assert!(e.message.contains(why), "{why}: {e}");
        }
        let mut long = req(ARN, &["203.0.113.9"], CertRole::Agent);
        long.validity_days = Some(91);
        assert!(check_request(&long, 90)
            .unwrap_err()
            .message
            .contains("91 days"));
        let garbage = CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
            role: CertRole::Agent,
            validity_days: None,
        };
        assert!(check_request(&garbage, 90)
            .unwrap_err()
            .message
            .contains("not acceptable"));
    }

    #[test]
    fn a_certificate_ends_with_its_ca_at_the_latest() {
        let day = Duration::from_secs(86_400);
        let ca = pki::generate_ca("short-lived CA", 2 * day).unwrap();
        let resp = sign(&ca, &req(ARN, &["203.0.113.9"], CertRole::Agent), 90).unwrap();
        let ca_end = pki::not_after(ca.cert_pem()).unwrap();
        assert!(
            resp.not_after <= ca_end.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            "the agent certificate outlives its CA"
        );
    }

    #[test]
    fn an_agent_certificate_names_the_callers_own_address() {
        let caller: IpAddr = "203.0.113.9".parse().unwrap();
        let own = req(ARN, &["203.0.113.9"], CertRole::Agent);
        assert!(check_caller(&own, Some(caller)).is_ok());
        // The same caller seen through a dual-stack listener.
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert!(check_caller(&own, Some(mapped)).is_ok());
        let other = req(ARN, &["198.51.100.7"], CertRole::Agent);
        let e = check_caller(&other, Some(caller)).unwrap_err();
        assert_eq!(e.code, "csr_refused");
        assert!(
            e.message.contains("198.51.100.7") && e.message.contains("203.0.113.9"),
            "{e}"
        );
        let e = check_caller(&own, None).unwrap_err();
        assert!(e.message.contains("function URL"), "{e}");
        // A server certificate names the server's address too: the policy counts them.
        let server = req(ARN, &["198.51.100.7", "203.0.113.9"], CertRole::Server);
        assert!(check_caller(&server, Some(caller)).is_ok());
    }

    #[test]
    fn the_ca_secret_round_trips_and_bad_secrets_are_not_quoted() {
        let ca = pki::generate_ca("test CA", Duration::from_secs(86400)).unwrap();
        let back = parse_ca_secret(&ca_secret_json(&ca)).unwrap();
        assert_eq!(back.cert_pem(), ca.cert_pem());
        let e = parse_ca_secret("{\"ca_key_pem\":\"SECRETKEY\"}").unwrap_err();
        assert!(!e.message.contains("SECRETKEY"));
    }
}
