//! IAM authentication of tunnel clients, as HashiCorp Vault's AWS IAM method does it.
//!
//! The server cannot check a SigV4 signature itself (it does not know the caller's secret),
//! so the agent signs an STS `GetCallerIdentity` request and the server forwards it to STS,
//! which answers with the signer's ARN. Two extra signed headers tie the request to one
//! server (`x-fluidity-server-id`) and one TLS session (`x-fluidity-channel-binding`, the
//! hex of a TLS exporter value), so a captured request is useless anywhere else. The server
//! also checks a time window and refuses signatures it has seen before, and only ever
//! forwards to its own configured STS endpoint.
//!
//! These are pure functions over bytes plus one HTTPS call to STS; the tunnel carries
//! [`AWS_STS_METHOD`] and [`AuthPayload::encode`]'s bytes.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::clients::sts::CallerIdentity;
use crate::credentials::Credentials;
use crate::error::{Error, Result};
use crate::http::{HttpClient, HttpConfig, HttpRequest};
use crate::sign::{host_header, sign_headers, PayloadHash, Signer};

/// The tunnel's name for this authentication method.
pub const AWS_STS_METHOD: &str = "aws-sts-v1";
/// Signed header naming the server the request is meant for.
pub const SERVER_ID_HEADER: &str = "x-fluidity-server-id";
/// Signed header carrying the hex of the TLS exporter value of the session.
pub const CHANNEL_BINDING_HEADER: &str = "x-fluidity-channel-binding";
/// The only body an auth request may have.
pub const GET_CALLER_IDENTITY_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";

/// Limits on an encoded payload (it is read from the network before any authentication).
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Largest payload this crate signs: its AUTH frame (a length byte, a method name of at
/// most 64 bytes, the payload) then fits the 16 KiB every server takes before the agent
/// knows its limits.
pub const MAX_SIGNED_PAYLOAD_BYTES: usize = MAX_PAYLOAD_BYTES - 1 - 64;
/// At most this many headers.
pub const MAX_HEADERS: usize = 16;
/// Longest header name.
pub const MAX_HEADER_NAME: usize = 64;
/// Longest header value (session tokens of temporary credentials run to a few KiB).
pub const MAX_HEADER_VALUE: usize = 8 * 1024;
/// Longest URL.
pub const MAX_URL: usize = 512;
/// Longest server id.
pub const MAX_SERVER_ID: usize = 512;
/// Longest channel binding, in bytes.
pub const MAX_CHANNEL_BINDING: usize = 64;

/// Headers that must be covered by the signature, or a captured request could be
/// re-pointed at another server or session.
const REQUIRED_SIGNED: [&str; 4] = [
    "host",
    "x-amz-date",
    SERVER_ID_HEADER,
    CHANNEL_BINDING_HEADER,
];

/// A signed STS GetCallerIdentity request, as carried in the tunnel's auth frame.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthPayload {
    /// The HTTP method (always `POST`).
    pub method: String,
    /// The STS URL the request was signed for.
    pub url: String,
    /// Header name (lower case) and value pairs, signature headers included.
    pub headers: Vec<(String, String)>,
    /// The body ([`GET_CALLER_IDENTITY_BODY`]).
    pub body: String,
}

impl std::fmt::Debug for AuthPayload {
    // The Authorization header (signature) and session token stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| match k.as_str() {
                "authorization" | "x-amz-security-token" => (k.as_str(), "** redacted **"),
                _ => (k.as_str(), v.as_str()),
            })
            .collect();
        f.debug_struct("AuthPayload")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .finish()
    }
}

impl AuthPayload {
    /// The value of header `name` (names are lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The bytes to put in the auth frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing strings and a vector of string pairs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a payload from the network: total size, header count, header
    /// name and value lengths and characters, no duplicate headers, method and body.
    pub fn decode(bytes: &[u8]) -> Result<AuthPayload, AuthDenied> {
        let bad = |m: &str| AuthDenied::Malformed(m.to_string());
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(AuthDenied::Malformed(format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                bytes.len()
            )));
        }
        // The size bound above also bounds what serde_json allocates.
        let p: AuthPayload = serde_json::from_slice(bytes)
            .map_err(|e| AuthDenied::Malformed(format!("payload is not valid: {e}")))?;
        if p.method != "POST" {
            return Err(bad("method must be POST"));
        }
        if p.body != GET_CALLER_IDENTITY_BODY {
            return Err(bad("body must be a GetCallerIdentity call"));
        }
        if p.url.len() > MAX_URL || !p.url.starts_with("https://") && !p.url.starts_with("http://")
        {
            return Err(bad("URL is too long or not http(s)"));
        }
        if p.headers.len() > MAX_HEADERS {
            return Err(AuthDenied::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        for (i, (k, v)) in p.headers.iter().enumerate() {
            if k.is_empty()
                || k.len() > MAX_HEADER_NAME
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(bad(
                    "header name is empty, too long or not lower-case token characters",
                ));
            }
            if v.len() > MAX_HEADER_VALUE
                || !v
                    .bytes()
                    .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
            {
                return Err(bad("header value is too long or has control characters"));
            }
            if matches!(
                k.as_str(),
                "content-length" | "transfer-encoding" | "connection" | "expect" | "te" | "upgrade"
            ) {
                return Err(AuthDenied::Malformed(format!("header {k} is not allowed")));
            }
            if p.headers[..i].iter().any(|(other, _)| other == k) {
                return Err(AuthDenied::Malformed(format!("duplicate header {k}")));
            }
        }
        Ok(p)
    }
}

/// Agent side: signs an STS GetCallerIdentity request for `server_id` and this TLS
/// session's `channel_binding`, addressed to `sts_endpoint` (e.g.
/// `https://sts.eu-west-1.amazonaws.com`) and signed for `region`.
pub fn sign_auth_request(
    creds: &Credentials,
    region: &str,
    sts_endpoint: &str,
    server_id: &str,
    channel_binding: &[u8],
) -> Result<AuthPayload> {
    sign_auth_request_at(
        creds,
        region,
        sts_endpoint,
        server_id,
        channel_binding,
        SystemTime::now(),
    )
}

/// [`sign_auth_request`] with an explicit signing time.
pub fn sign_auth_request_at(
    creds: &Credentials,
    region: &str,
    sts_endpoint: &str,
    server_id: &str,
    channel_binding: &[u8],
    time: SystemTime,
) -> Result<AuthPayload> {
    if server_id.is_empty()
        || server_id.len() > MAX_SERVER_ID
        || !server_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::Config(
            "server id must be 1..=512 visible ASCII characters".into(),
        ));
    }
    if channel_binding.is_empty() || channel_binding.len() > MAX_CHANNEL_BINDING {
        return Err(Error::Config(format!(
            "channel binding must be 1..={MAX_CHANNEL_BINDING} bytes"
        )));
    }
    let url = format!("{}/", sts_endpoint.trim_end_matches('/'));
    let mut headers = vec![
        ("host".to_string(), host_header(&url)?),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        ),
        (SERVER_ID_HEADER.to_string(), server_id.to_string()),
        (
            CHANNEL_BINDING_HEADER.to_string(),
            hex::encode(channel_binding),
        ),
    ];
    let signer = Signer {
        creds,
        region,
        service: "sts",
        time,
        payload_hash: PayloadHash::Implicit,
    };
    sign_headers(
        &signer,
        "POST",
        &url,
        &mut headers,
        GET_CALLER_IDENTITY_BODY.as_bytes(),
    )?;
    let payload = AuthPayload {
        method: "POST".into(),
        url,
        headers,
        body: GET_CALLER_IDENTITY_BODY.into(),
    };
    if payload.encode().len() > MAX_SIGNED_PAYLOAD_BYTES {
        return Err(Error::Config(
            "signed auth request exceeds the payload limit".into(),
        ));
    }
    Ok(payload)
}

/// Why a client was not admitted. Messages are for humans and never hold secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthDenied {
    /// STS refused the signed request (wrong secret, unknown or expired key…).
    #[error("STS rejected the signature: {code}: {message}")]
    SignatureRejected {
        /// STS's error code, e.g. `SignatureDoesNotMatch` or `ExpiredToken`.
        code: String,
        /// STS's message.
        message: String,
    },
    /// The signature is valid but the principal is not on the allow list.
    #[error("principal {arn} is not allowed on this server")]
    NotAllowed {
        /// The (normalised) ARN STS reported.
        arn: String,
    },
    /// This exact signed request was presented before.
    #[error("replayed authentication request")]
    Replay,
    /// `X-Amz-Date` is outside the accepted window.
    #[error("request is signed {skew_secs} s away from the server's clock (window is {window_secs} s); check the clock")]
    ClockSkew {
        /// Signed time minus server time, in seconds.
        skew_secs: i64,
        /// The accepted distance.
        window_secs: u64,
    },
    /// The request names another server.
    #[error("request was signed for server {got:?}, not this one")]
    WrongServer {
        /// The server id in the request.
        got: String,
    },
    /// The request was signed for another TLS session.
    #[error("channel binding does not match this TLS session")]
    BindingMismatch,
    /// STS could not be asked in time, or failed.
    #[error("STS unreachable: {0}")]
    StsUnreachable(String),
    /// Too many failed attempts from this address.
    #[error("too many failed authentication attempts from this address; try again later")]
    RateLimited,
    /// The payload is not a well-formed auth request.
    #[error("malformed authentication request: {0}")]
    Malformed(String),
}

impl AuthDenied {
    /// A short stable code for the wire and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthDenied::SignatureRejected { .. } => "signature-rejected",
            AuthDenied::NotAllowed { .. } => "not-allowed",
            AuthDenied::Replay => "replay",
            AuthDenied::ClockSkew { .. } => "clock-skew",
            AuthDenied::WrongServer { .. } => "wrong-server",
            AuthDenied::BindingMismatch => "binding-mismatch",
            AuthDenied::StsUnreachable(_) => "sts-unreachable",
            AuthDenied::RateLimited => "rate-limited",
            AuthDenied::Malformed(_) => "malformed",
        }
    }

    /// Whether trying again later (with a fresh signature) may succeed without the client
    /// changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AuthDenied::StsUnreachable(_) | AuthDenied::RateLimited
        )
    }
}

/// An allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrincipalPattern {
    /// Exactly this ARN (after normalisation of assumed-role ARNs).
    Exact(String),
    /// Any principal of this 12-digit account (`account:123456789012`).
    Account(String),
    /// ARNs starting with this prefix (`arn:aws:iam::123456789012:role/name*`).
    Prefix(String),
}

impl FromStr for PrincipalPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(acct) = s.strip_prefix("account:") {
            if acct.len() == 12 && acct.bytes().all(|b| b.is_ascii_digit()) {
                return Ok(PrincipalPattern::Account(acct.to_string()));
            }
            return Err(Error::Config(format!("{s:?}: an account id has 12 digits")));
        }
        let (body, wildcard) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let fields: Vec<&str> = body.splitn(6, ':').collect();
        let account_ok = fields.len() == 6
            && fields[0] == "arn"
            && !fields[1].is_empty()
            && fields[4].len() == 12
            && fields[4].bytes().all(|b| b.is_ascii_digit());
        // A wildcard must not reach into the account, so no pattern admits other accounts.
        if !account_ok || body.contains('*') || (wildcard && fields[5].is_empty()) {
            return Err(Error::Config(format!(
                "{s:?}: expected an ARN, an ARN prefix ending in * after the account, or account:ID"
            )));
        }
        Ok(if wildcard {
            PrincipalPattern::Prefix(body.to_string())
        } else {
            PrincipalPattern::Exact(normalize_arn(body))
        })
    }
}

impl PrincipalPattern {
    /// Whether the (normalised) `arn` in `account` matches.
    pub fn matches(&self, arn: &str, account: &str) -> bool {
        match self {
            PrincipalPattern::Exact(a) => a == arn,
            PrincipalPattern::Account(a) => a == account && arn_account(arn) == Some(account),
            PrincipalPattern::Prefix(p) => arn.starts_with(p.as_str()),
        }
    }
}

fn arn_account(arn: &str) -> Option<&str> {
    arn.split(':').nth(4)
}

/// Whether any of `patterns` admits the normalised `arn` ([`normalize_arn`]), in the
/// account it names.
pub fn allows(patterns: &[PrincipalPattern], arn: &str) -> bool {
    let account = arn_account(arn).unwrap_or_default();
    patterns.iter().any(|p| p.matches(arn, account))
}

/// `arn:aws:sts::ACCT:assumed-role/ROLE/SESSION` → `arn:aws:iam::ACCT:role/ROLE`; other
/// ARNs unchanged.
pub fn normalize_arn(arn: &str) -> String {
    let fields: Vec<&str> = arn.splitn(6, ':').collect();
    if fields.len() == 6 && fields[0] == "arn" && fields[2] == "sts" {
        if let Some(rest) = fields[5].strip_prefix("assumed-role/") {
            if let Some((role, _session)) = rest.split_once('/') {
                return format!("arn:{}:iam::{}:role/{role}", fields[1], fields[4]);
            }
        }
    }
    arn.to_string()
}

/// An admitted client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The normalised ARN (roles as `…:role/NAME`).
    pub arn: String,
    /// The ARN exactly as STS reported it (with the session name for assumed roles).
    pub caller_arn: String,
    /// The account id.
    pub account: String,
    /// STS's unique id of the caller.
    pub user_id: String,
}

/// Settings of a [`Verifier`].
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    /// This server's id; requests must name it.
    pub server_id: String,
    /// Who may connect.
    pub allowed: Vec<PrincipalPattern>,
    /// The STS endpoint requests are forwarded to (and must be signed for).
    pub sts_endpoint: String,
    /// Accepted distance between `X-Amz-Date` and the server's clock.
    pub time_window: Duration,
    /// How many recent signatures are remembered.
    pub replay_cache_size: usize,
    /// Deadline of the STS call.
    pub sts_timeout: Duration,
    /// Failed attempts allowed per address (IPv6: per /64) within `failure_window`.
    pub max_failures: u32,
    /// The window of the failure count.
    pub failure_window: Duration,
    /// Addresses tracked by the rate limiter.
    pub max_tracked_addresses: usize,
    /// Transport settings of the STS call (proxy, CA bundle); timeouts come from above.
    pub http: HttpConfig,
}

impl VerifierConfig {
    /// Defaults: 5 minute window, 10 000 remembered signatures, 5 s STS deadline, 10
    /// failures a minute per address.
    pub fn new(
        server_id: impl Into<String>,
        sts_endpoint: impl Into<String>,
        allowed: Vec<PrincipalPattern>,
    ) -> Self {
        VerifierConfig {
            server_id: server_id.into(),
            allowed,
            sts_endpoint: sts_endpoint.into(),
            time_window: Duration::from_secs(300),
            replay_cache_size: 10_000,
            sts_timeout: Duration::from_secs(5),
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            max_tracked_addresses: 10_000,
            http: HttpConfig::default(),
        }
    }
}

/// Remembered signatures with their expiry, oldest first.
#[derive(Default)]
struct ReplayCache {
    seen: HashMap<String, SystemTime>,
    order: VecDeque<(String, SystemTime)>,
}

impl ReplayCache {
    /// Records `sig` until `expires`; false if it is already recorded.
    fn insert(&mut self, sig: &str, expires: SystemTime, now: SystemTime, capacity: usize) -> bool {
        while let Some((s, exp)) = self.order.front() {
            if *exp > now {
                break;
            }
            if self.seen.get(s) == Some(exp) {
                self.seen.remove(s);
            }
            self.order.pop_front();
        }
        if self.seen.contains_key(sig) {
            return false;
        }
        let capacity = capacity.max(1);
        // The queue also holds entries of removed signatures; bound it too.
        while self.seen.len() >= capacity || self.order.len() >= capacity.saturating_mul(2) {
            // Full of live entries: forget the oldest. The channel binding still stops a
            // replay onto another TLS session; this cache is the second line.
            match self.order.pop_front() {
                Some((s, exp)) => {
                    if self.seen.get(&s) == Some(&exp) {
                        self.seen.remove(&s);
                        tracing::warn!("replay cache full; forgetting the oldest signature early");
                    }
                }
                None => break,
            }
        }
        self.seen.insert(sig.to_string(), expires);
        self.order.push_back((sig.to_string(), expires));
        true
    }

    fn remove(&mut self, sig: &str) {
        // The queue entry stays and is skipped when it comes up (its expiry no longer matches
        // or the key is gone).
        self.seen.remove(sig);
    }
}

/// Failed attempts per address.
#[derive(Default)]
struct FailureTracker {
    by_addr: HashMap<IpAddr, (SystemTime, u32)>,
}

/// IPv6 clients get a /64 each; counting single addresses would be trivially evaded.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Server side: checks auth payloads. Usable from many threads at once.
pub struct Verifier {
    config: VerifierConfig,
    sts_url: String,
    sts_host: String,
    http: HttpClient,
    replay: Mutex<ReplayCache>,
    failures: Mutex<FailureTracker>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("server_id", &self.config.server_id)
            .field("sts_url", &self.sts_url)
            .field("allowed", &self.config.allowed)
            .finish()
    }
}

impl Verifier {
    /// A verifier with these settings.
    pub fn new(config: VerifierConfig) -> Result<Self> {
        if config.allowed.is_empty() {
            return Err(Error::Config(
                "the allow list of principals is empty".into(),
            ));
        }
        if config.server_id.is_empty() {
            return Err(Error::Config("the server id is empty".into()));
        }
        let sts_url = format!("{}/", config.sts_endpoint.trim_end_matches('/'));
        let sts_host = host_header(&sts_url)?;
        let http = HttpClient::new(HttpConfig {
            call_timeout: config.sts_timeout,
            connect_timeout: config.sts_timeout,
            max_response_bytes: 64 * 1024,
            ..config.http.clone()
        })?;
        Ok(Verifier {
            config,
            sts_url,
            sts_host,
            http,
            replay: Mutex::new(ReplayCache::default()),
            failures: Mutex::new(FailureTracker::default()),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Checks `payload` from a client at `source_ip` on a TLS session whose exporter value
    /// is `channel_binding`, and returns the admitted principal. Blocks for up to the STS
    /// deadline; run it off an async executor.
    pub fn verify(
        &self,
        payload: &[u8],
        channel_binding: &[u8],
        source_ip: IpAddr,
        now: SystemTime,
    ) -> Result<Principal, AuthDenied> {
        let key = rate_key(source_ip);
        if self.is_rate_limited(key, now) {
            // The caller (the server) logs the verdict; this is the detail for debugging.
            tracing::debug!(%source_ip, "authentication refused: rate limited");
            return Err(AuthDenied::RateLimited);
        }
        let result = self.verify_inner(payload, channel_binding, now);
        match &result {
            Ok(p) => {
                tracing::debug!(arn = %p.arn, caller = %p.caller_arn, %source_ip, "STS vouched for the client")
            }
            Err(denied) => {
                if !matches!(denied, AuthDenied::StsUnreachable(_)) {
                    self.record_failure(key, now);
                }
                tracing::debug!(%source_ip, reason = denied.code(), error = %denied, "verification failed");
            }
        }
        result
    }

    fn verify_inner(
        &self,
        payload: &[u8],
        channel_binding: &[u8],
        now: SystemTime,
    ) -> Result<Principal, AuthDenied> {
        let p = AuthPayload::decode(payload)?;
        // Never send a client's request anywhere but our own STS endpoint.
        if p.url != self.sts_url || p.header("host") != Some(self.sts_host.as_str()) {
            return Err(AuthDenied::Malformed(format!(
                "request is addressed to {:?}, but this server verifies with {}",
                p.url, self.sts_url
            )));
        }
        let auth = p
            .header("authorization")
            .ok_or_else(|| AuthDenied::Malformed("no Authorization header".into()))?;
        let parsed = parse_authorization(auth)?;
        for h in REQUIRED_SIGNED {
            if !parsed.signed_headers.contains(&h) {
                return Err(AuthDenied::Malformed(format!("header {h} is not signed")));
            }
        }
        for (k, _) in &p.headers {
            if k != "authorization" && !parsed.signed_headers.contains(&k.as_str()) {
                return Err(AuthDenied::Malformed(format!("header {k} is not signed")));
            }
        }
        let server = p.header(SERVER_ID_HEADER).unwrap_or_default();
        if server != self.config.server_id {
            let mut got = server.to_string();
            got.truncate(MAX_SERVER_ID);
            return Err(AuthDenied::WrongServer { got });
        }
        let binding = p
            .header(CHANNEL_BINDING_HEADER)
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| AuthDenied::Malformed("channel binding is not hex".into()))?;
        if !constant_time_eq(&binding, channel_binding) {
            return Err(AuthDenied::BindingMismatch);
        }
        let date = p
            .header("x-amz-date")
            .and_then(parse_amz_date)
            .ok_or_else(|| {
                AuthDenied::Malformed("X-Amz-Date is missing or not YYYYMMDDTHHMMSSZ".into())
            })?;
        let skew = signed_secs_between(now, date);
        let window = self.config.time_window.as_secs();
        if skew.unsigned_abs() > window {
            return Err(AuthDenied::ClockSkew {
                skew_secs: skew,
                window_secs: window,
            });
        }
        // Remember the signature before asking STS, so two copies racing cannot both pass;
        // it is forgotten again if STS does not vouch for it.
        // A window beyond what the clock counts (a setting of u64::MAX seconds) keeps the
        // signature for a century instead of panicking.
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
        let expires = date
            .checked_add(self.config.time_window)
            .unwrap_or(date + CENTURY);
        let fresh = self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                parsed.signature,
                expires,
                now,
                self.config.replay_cache_size,
            );
        if !fresh {
            return Err(AuthDenied::Replay);
        }
        let identity = match self.ask_sts(&p) {
            Ok(id) => id,
            Err(e) => {
                self.replay
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(parsed.signature);
                return Err(e);
            }
        };
        let arn = normalize_arn(&identity.arn);
        if arn_account(&arn) != Some(identity.account.as_str()) {
            return Err(AuthDenied::Malformed(
                "STS answered an ARN of another account".into(),
            ));
        }
        // The ARN's account is STS's (checked above).
        if !allows(&self.config.allowed, &arn) {
            return Err(AuthDenied::NotAllowed { arn });
        }
        Ok(Principal {
            arn,
            caller_arn: identity.arn,
            account: identity.account,
            user_id: identity.user_id,
        })
    }

    fn ask_sts(&self, p: &AuthPayload) -> Result<CallerIdentity, AuthDenied> {
        let req = HttpRequest {
            method: "POST",
            url: self.sts_url.clone(),
            headers: p.headers.clone(),
            body: p.body.clone().into_bytes(),
            timeout: Some(self.config.sts_timeout),
        };
        // No retry: the caller's deadline bounds the whole verification.
        let resp = self
            .http
            .send(&req)
            .map_err(|e| AuthDenied::StsUnreachable(e.to_string()))?;
        if resp.status >= 500 {
            return Err(AuthDenied::StsUnreachable(format!(
                "STS answered HTTP {}",
                resp.status
            )));
        }
        if resp.status != 200 {
            let e = crate::client::service_error("sts", "GetCallerIdentity", &resp);
            let (code, mut message) = match e {
                Error::Service { code, message, .. } => (code, message),
                other => (format!("Http{}", resp.status), other.to_string()),
            };
            // Throttled (by whatever name) is STS busy, not the caller's signature wrong.
            let throttled = resp.status == 429
                || matches!(
                    code.as_str(),
                    "Throttling" | "ThrottlingException" | "RequestLimitExceeded"
                );
            if throttled {
                return Err(AuthDenied::StsUnreachable(format!(
                    "STS throttled the call: {message}"
                )));
            }
            message = crate::http::message_for_humans(&message);
            return Err(AuthDenied::SignatureRejected { code, message });
        }
        let root = crate::xml::parse(&resp.body)
            .map_err(|e| AuthDenied::StsUnreachable(format!("unreadable STS answer: {e}")))?;
        CallerIdentity::from_xml(&root)
            .filter(|id| id.arn.len() <= 2048 && id.arn.starts_with("arn:"))
            .ok_or_else(|| AuthDenied::StsUnreachable("STS answer has no caller ARN".into()))
    }

    fn is_rate_limited(&self, key: IpAddr, now: SystemTime) -> bool {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match f.by_addr.get(&key) {
            Some((start, count)) => {
                *count >= self.config.max_failures
                    && now.duration_since(*start).unwrap_or_default() < self.config.failure_window
            }
            None => false,
        }
    }

    fn record_failure(&self, key: IpAddr, now: SystemTime) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.config.failure_window;
        if f.by_addr.len() >= self.config.max_tracked_addresses && !f.by_addr.contains_key(&key) {
            f.by_addr
                .retain(|_, (start, _)| now.duration_since(*start).unwrap_or_default() < window);
            if f.by_addr.len() >= self.config.max_tracked_addresses {
                // Still full: drop the entry with the oldest window rather than grow.
                if let Some(oldest) = f
                    .by_addr
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(k, _)| *k)
                {
                    f.by_addr.remove(&oldest);
                }
            }
        }
        let entry = f.by_addr.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0).unwrap_or_default() >= window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

struct ParsedAuthorization<'a> {
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

/// Reads `AWS4-HMAC-SHA256 Credential=…/sts/aws4_request, SignedHeaders=a;b, Signature=hex`.
fn parse_authorization(auth: &str) -> Result<ParsedAuthorization<'_>, AuthDenied> {
    let bad = |m: &str| AuthDenied::Malformed(m.to_string());
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| bad("Authorization is not AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let credential = credential.ok_or_else(|| bad("Authorization has no Credential"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[3] != "sts" || scope[4] != "aws4_request" {
        return Err(bad("credential scope is not for STS"));
    }
    let signature = signature
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| bad("Authorization has no valid Signature"))?;
    let signed_headers = signed
        .ok_or_else(|| bad("Authorization has no SignedHeaders"))?
        .split(';')
        .collect();
    Ok(ParsedAuthorization {
        signed_headers,
        signature,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `b - a` in whole seconds, negative when `b` is earlier.
fn signed_secs_between(a: SystemTime, b: SystemTime) -> i64 {
    match b.duration_since(a) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Parses `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let (y, mo) = (i64::from(y), i64::from(mo));
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG",
            Some("SESSIONTOKEN".into()),
            None,
            "test",
        )
    }

    #[test]
    fn amz_dates_parse() {
        let t = parse_amz_date("20240102T030405Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        for bad in [
            "20241302T030405Z",
            "2024-01-02T03:04",
            "20240102T030405",
            "+0240102T030405Z",
        ] {
            assert!(parse_amz_date(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn payload_round_trips_and_redacts() {
        let p = sign_auth_request(
            &creds(),
            "us-east-1",
            "https://sts.amazonaws.com",
            "srv",
            &[7; 32],
        )
        .unwrap();
        let decoded = AuthPayload::decode(&p.encode()).unwrap();
        assert_eq!(decoded, p);
        let auth = parse_authorization(p.header("authorization").unwrap()).unwrap();
        for h in REQUIRED_SIGNED {
            assert!(auth.signed_headers.contains(&h), "{h} unsigned");
        }
        assert!(auth.signed_headers.contains(&"x-amz-security-token"));
        let dbg = format!("{p:?}");
        assert!(!dbg.contains(auth.signature));
        assert!(!dbg.contains("SESSIONTOKEN"));
    }

    #[test]
    fn decode_enforces_limits() {
        let p = sign_auth_request(
            &creds(),
            "us-east-1",
            "https://sts.amazonaws.com",
            "srv",
            &[7; 32],
        )
        .unwrap();
        let mut too_many = p.clone();
        for i in 0..MAX_HEADERS {
            too_many.headers.push((format!("x-extra-{i}"), "v".into()));
        }
        assert!(AuthPayload::decode(&too_many.encode()).is_err());
        let mut long = p.clone();
        long.headers
            .push(("x-long".into(), "v".repeat(MAX_HEADER_VALUE + 1)));
        assert!(AuthPayload::decode(&long.encode()).is_err());
        let mut crlf = p.clone();
        crlf.headers.push(("x-evil".into(), "a\r\nb".into()));
        assert!(AuthPayload::decode(&crlf.encode()).is_err());
        let mut dup = p.clone();
        dup.headers.push(("host".into(), "evil.example".into()));
        assert!(AuthPayload::decode(&dup.encode()).is_err());
        let mut body = p.clone();
        body.body = "Action=AssumeRole".into();
        assert!(AuthPayload::decode(&body.encode()).is_err());
        assert!(AuthPayload::decode(&vec![b' '; MAX_PAYLOAD_BYTES + 1]).is_err());
        assert!(AuthPayload::decode(b"{\"method\":\"POST\",\"extra\":1}").is_err());
    }

    #[test]
    fn patterns_parse_and_match() {
        let role: PrincipalPattern = "arn:aws:iam::123456789012:role/fluidity-*".parse().unwrap();
        let acct: PrincipalPattern = "account:123456789012".parse().unwrap();
        let exact: PrincipalPattern = "arn:aws:sts::123456789012:assumed-role/r/s"
            .parse()
            .unwrap();
        assert_eq!(
            exact,
            PrincipalPattern::Exact("arn:aws:iam::123456789012:role/r".into())
        );
        let arn = normalize_arn("arn:aws:sts::123456789012:assumed-role/fluidity-agent/laptop");
        assert_eq!(arn, "arn:aws:iam::123456789012:role/fluidity-agent");
        assert!(role.matches(&arn, "123456789012"));
        assert!(acct.matches(&arn, "123456789012"));
        assert!(!acct.matches("arn:aws:iam::999999999999:user/x", "999999999999"));
        assert!(!role.matches("arn:aws:iam::123456789012:user/fluidity-x", "123456789012"));
        for bad in [
            "*",
            "arn:*",
            "arn:aws:iam::*",
            "account:12",
            "arn:aws:iam::123456789012:*",
            "arn:aws:iam::12:role/x",
        ] {
            assert!(bad.parse::<PrincipalPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn replay_cache_expires_and_stays_bounded() {
        let mut c = ReplayCache::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(c.insert("a", t0 + Duration::from_secs(10), t0, 2));
        assert!(!c.insert("a", t0 + Duration::from_secs(10), t0, 2));
        assert!(c.insert(
            "a",
            t0 + Duration::from_secs(30),
            t0 + Duration::from_secs(11),
            2
        ));
        assert!(c.insert(
            "b",
            t0 + Duration::from_secs(30),
            t0 + Duration::from_secs(11),
            2
        ));
        assert!(c.insert(
            "c",
            t0 + Duration::from_secs(30),
            t0 + Duration::from_secs(11),
            2
        ));
        assert!(c.seen.len() <= 2);
        c.remove("c");
        assert!(c.insert(
            "c",
            t0 + Duration::from_secs(30),
            t0 + Duration::from_secs(11),
            2
        ));
    }
}
