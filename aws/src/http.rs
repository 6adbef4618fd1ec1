//! The HTTP transport: one ureq agent with Fluidity's crypto provider, deadlines on every
//! call, bounded response bodies, and jittered retries.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig, TlsProvider};

use crate::env::Env;
use crate::error::{Error, Result};

/// Default deadline of one HTTP exchange, connection included.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connection deadline (the SDKs use 3.1 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// Default limit on a response body; AWS answers of the calls made here are far smaller.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

/// Settings of an [`HttpClient`].
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Deadline of one HTTP exchange (connect, send, receive the whole body).
    pub call_timeout: Duration,
    /// Deadline of connection setup, TLS included.
    pub connect_timeout: Duration,
    /// Responses larger than this fail instead of being buffered.
    pub max_response_bytes: u64,
    /// Forward proxy URL (`http://host:port`), or `None` for direct connections.
    pub proxy: Option<String>,
    /// Hosts that bypass the proxy (NO_PROXY syntax: `host`, `.suffix`, `*.suffix`, `*`).
    pub no_proxy: Vec<String>,
    /// PEM file of trusted roots replacing the built-in Mozilla roots (`AWS_CA_BUNDLE`).
    pub ca_bundle: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            proxy: None,
            no_proxy: Vec::new(),
            ca_bundle: None,
        }
    }
}

impl HttpConfig {
    /// Settings from the environment: `HTTPS_PROXY`/`https_proxy`/`ALL_PROXY`, `NO_PROXY`,
    /// and `AWS_CA_BUNDLE`. `localhost`, `127.0.0.1`, `[::1]` and the link-local metadata
    /// addresses always bypass the proxy; container credentials over plain HTTP never
    /// use it ([`HttpClient::without_proxy`]).
    pub fn from_env(env: &Env) -> Self {
        let proxy = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .find_map(|name| env.get(name))
            .map(str::to_string);
        let no_proxy = env
            .get("NO_PROXY")
            .or_else(|| env.get("no_proxy"))
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        HttpConfig {
            proxy,
            no_proxy,
            ca_bundle: env.get("AWS_CA_BUNDLE").map(|p| env.expand_home(p)),
            ..HttpConfig::default()
        }
    }
}

/// A blocking HTTP client for AWS calls. Cheap to clone; clones share connections.
///
/// Calls block the thread: from async code run them with `blocking::unblock`.
#[derive(Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
    config: Arc<HttpConfig>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("config", &self.config)
            .finish()
    }
}

/// One HTTP request, fully formed (headers signed if it is to be signed).
#[derive(Clone)]
pub(crate) struct HttpRequest {
    pub(crate) method: &'static str,
    pub(crate) url: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// Overrides the client's call deadline.
    pub(crate) timeout: Option<Duration>,
}

/// A buffered response.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The start of the body as text, for error messages, without what an AWS signature
    /// error adds after its first words ([`without_signing_details`]).
    pub(crate) fn body_snippet(&self) -> String {
        let end = self.body.len().min(512);
        without_signing_details(&String::from_utf8_lossy(&self.body[..end])).to_string()
    }
}

/// `text` up to the canonical request or string to sign that AWS appends to some
/// `SignatureDoesNotMatch` messages: the canonical request holds the session token.
fn without_signing_details(text: &str) -> &str {
    let cut = text
        .find("The Canonical String")
        .or_else(|| text.find("The String-to-Sign"))
        .unwrap_or(text.len());
    &text[..cut]
}

/// The part of an AWS error message that is safe to log and pass on: its first line
/// before any signing details ([`without_signing_details`]), at most 300 characters.
pub(crate) fn message_for_humans(message: &str) -> String {
    // By characters: `String::truncate` panics inside a multi-byte character.
    without_signing_details(message)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// The URL without its query string, which is what errors and logs show.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_string()
}

/// The largest `AWS_CA_BUNDLE` read: several times a whole system trust store.
const MAX_CA_BUNDLE: u64 = 4 * 1024 * 1024;

impl HttpClient {
    /// A client with these settings, TLS through rustls with Fluidity's crypto provider.
    pub fn new(config: HttpConfig) -> Result<Self> {
        let provider = fluidity_runtime_smol::tls::crypto_provider();
        let roots = match &config.ca_bundle {
            None => RootCerts::WebPki,
            Some(path) => {
                let pem = fluidity_runtime_smol::files::read_limited(path, MAX_CA_BUNDLE)
                    .map_err(|source| Error::Io {
                        path: path.display().to_string(),
                        source,
                    })?
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "CA bundle {} is larger than {MAX_CA_BUNDLE} bytes",
                            path.display()
                        ))
                    })?;
                let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    return Err(Error::Config(format!(
                        "CA bundle {} holds no certificate",
                        path.display()
                    )));
                }
                RootCerts::new_with_certs(&certs)
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider)
            .root_certs(roots)
            .build();
        let proxy = match &config.proxy {
            None => None,
            Some(url) => Some(build_proxy(url, &config.no_proxy)?),
        };
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(proxy)
            .http_status_as_error(false)
            // A signed request must never be replayed to another host.
            .max_redirects(0)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_global(Some(config.call_timeout))
            .user_agent(concat!("fluidity/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(HttpClient {
            agent,
            config: Arc::new(config),
        })
    }

    /// A client with default settings and no proxy, for link-local metadata services.
    pub fn direct() -> Result<Self> {
        HttpClient::new(HttpConfig::default())
    }

    /// A client with this one's settings that never uses a proxy: for plain HTTP to a
    /// local credential endpoint, whose token a proxy must not see.
    pub fn without_proxy(&self) -> Result<Self> {
        if self.config.proxy.is_none() {
            return Ok(self.clone());
        }
        HttpClient::new(HttpConfig {
            proxy: None,
            no_proxy: Vec::new(),
            ..(*self.config).clone()
        })
    }

    /// The settings this client was built with.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Sends one request, without retries.
    pub(crate) fn send(&self, req: &HttpRequest) -> Result<HttpResponse> {
        let url_for_errors = redact_url(&req.url);
        let mut builder = ureq::http::Request::builder()
            .method(req.method)
            .uri(req.url.as_str());
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder
            .body(req.body.clone())
            .map_err(|e| Error::Transport {
                url: url_for_errors.clone(),
                message: format!("invalid request: {e}"),
                connection_refused: false,
            })?;
        let timeout = req.timeout.unwrap_or(self.config.call_timeout);
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        let map_err = |e: ureq::Error| map_ureq_error(e, &url_for_errors, timeout);
        let mut response = self.agent.run(request).map_err(map_err)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(self.config.max_response_bytes)
            .read_to_vec()
            .map_err(map_err)?;
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

fn build_proxy(url: &str, no_proxy: &[String]) -> Result<ureq::Proxy> {
    let parsed = ureq::Proxy::new(url)
        .map_err(|e| Error::Config(format!("invalid proxy URL {}: {e}", redact_url(url))))?;
    let mut builder = ureq::Proxy::builder(parsed.protocol())
        .host(parsed.host())
        .port(parsed.port());
    if let Some(user) = parsed.username() {
        builder = builder.username(user);
    }
    if let Some(password) = parsed.password() {
        builder = builder.password(password);
    }
    for host in [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "169.254.169.254",
        "169.254.170.2",
    ] {
        builder = builder.no_proxy(host);
    }
    for host in no_proxy {
        builder = builder.no_proxy(host);
    }
    builder
        .build()
        .map_err(|e| Error::Config(format!("invalid proxy URL {}: {e}", redact_url(url))))
}

fn map_ureq_error(e: ureq::Error, url: &str, timeout: Duration) -> Error {
    match e {
        ureq::Error::Timeout(_) => Error::Timeout {
            url: url.to_string(),
            timeout,
        },
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Error::Timeout {
            url: url.to_string(),
            timeout,
        },
        ureq::Error::Io(io) => Error::Transport {
            url: url.to_string(),
            connection_refused: io.kind() == std::io::ErrorKind::ConnectionRefused,
            message: io.to_string(),
        },
        other => Error::Transport {
            url: url.to_string(),
            message: other.to_string(),
            connection_refused: false,
        },
    }
}

/// How failed calls are retried: capped exponential backoff with full jitter, as the AWS
/// SDKs' standard retry mode does.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// The backoff ceiling of the first retry; it doubles with each further retry.
    pub base_delay: Duration,
    /// The largest backoff.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The delay before retry number `retry` (0 for the first retry): uniform in
    /// `[0, min(max_delay, base_delay * 2^retry)]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random_u64() % (nanos + 1))
    }

    /// Runs `attempt` until it succeeds, fails with an error `retryable` rejects, or the
    /// attempts run out. `attempt` receives the attempt number, starting at 0.
    pub(crate) fn run<T>(
        &self,
        what: &str,
        retryable: impl Fn(&Error) -> bool,
        mut attempt: impl FnMut(u32) -> Result<T>,
    ) -> Result<T> {
        let mut n = 0;
        loop {
            match attempt(n) {
                Ok(v) => return Ok(v),
                Err(e) if n + 1 < self.max_attempts.max(1) && retryable(&e) => {
                    let delay = self.backoff(n);
                    tracing::debug!(what, attempt = n + 1, ?delay, error = %e, "retrying");
                    std::thread::sleep(delay);
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Randomness for jitter; it need not be unpredictable, only spread out between processes.
pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_past_the_size_limit_is_refused_unread() {
        let config = HttpConfig {
            ca_bundle: Some(PathBuf::from("/dev/zero")),
            ..HttpConfig::default()
        };
        let err = HttpClient::new(config).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("is larger than"), "{err}");
    }

    #[test]
    fn aws_messages_lose_the_canonical_request() {
        let aws = "The request signature we calculated does not match the signature you \
                   provided. Check your AWS Secret Access Key and signing method.\n\nThe \
                   Canonical String for this request should have been\n'POST\n/\n\n\
                   x-amz-security-token:SESSIONTOKEN\n'\n\nThe String-to-Sign should have been";
        let m = message_for_humans(aws);
        assert!(m.starts_with("The request signature we calculated"), "{m}");
        assert!(
            !m.contains("SESSIONTOKEN") && !m.contains("Canonical"),
            "{m}"
        );
        let inline =
            "Signature expired. The Canonical String for this request: x-amz-security-token:T";
        assert_eq!(message_for_humans(inline), "Signature expired.");
        assert_eq!(message_for_humans(&"é".repeat(400)).chars().count(), 300);
        assert_eq!(message_for_humans(""), "");
    }

    #[test]
    fn error_answers_lose_the_canonical_request() {
        let body = br#"{"message":"The request signature we calculated does not match. The Canonical String for this request should have been 'POST / x-amz-security-token:SESSIONTOKEN'"}"#;
        let resp = HttpResponse {
            status: 403,
            headers: vec![(
                "x-amzn-errortype".into(),
                "InvalidSignatureException".into(),
            )],
            body: body.to_vec(),
        };
        assert!(
            !resp.body_snippet().contains("SESSIONTOKEN"),
            "{}",
            resp.body_snippet()
        );
        let e = crate::client::service_error("lambda", "Invoke", &resp).to_string();
        assert!(
            !e.contains("SESSIONTOKEN") && e.contains("does not match"),
            "{e}"
        );
    }

    #[test]
    fn backoff_stays_under_the_ceiling() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        for retry in 0..40 {
            let d = p.backoff(retry);
            let ceiling = Duration::from_millis(100 << retry.min(2)).min(p.max_delay);
            assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn run_stops_on_non_retryable_errors() {
        let p = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        let mut calls = 0;
        let r: Result<()> = p.run(
            "t",
            |_| false,
            |_| {
                calls += 1;
                Err(Error::NoRegion)
            },
        );
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r: Result<()> = p.run(
            "t",
            |_| true,
            |_| {
                calls += 1;
                Err(Error::NoRegion)
            },
        );
        assert!(r.is_err());
        assert_eq!(calls, 4);
    }

    #[test]
    fn urls_in_errors_lose_their_query() {
        assert_eq!(redact_url("http://h/p?X-Amz-Signature=abc"), "http://h/p");
    }
}
