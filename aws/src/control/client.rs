//! The typed client of the control functions, for the agent and the server: SigV4-signed
//! (service `lambda`) POSTs to the function URLs, or to the local control host's paths,
//! with the request and response types of [`super::types`].

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{
    CertificateRequest, CertificateResponse, ErrorResponse, Function, KillRequest, KillResponse,
    QueryRequest, QueryResponse, WakeRequest, WakeResponse,
};
use crate::clients::lambda_url::{region_of_function_url, FunctionUrlClient};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::AwsConfig;

/// Where the control functions are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlUrls {
    /// The Wake function URL.
    pub wake: String,
    /// The Query function URL.
    pub query: String,
    /// The Kill function URL.
    pub kill: String,
    /// The CA function URL.
    pub ca: String,
}

impl ControlUrls {
    /// The paths of one control host serving every function (`fluidity-control`):
    /// `BASE/wake`, `BASE/query`, `BASE/kill`, `BASE/ca`.
    pub fn on_host(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        let url = |f: Function| format!("{base}/{}", f.name());
        ControlUrls {
            wake: url(Function::Wake),
            query: url(Function::Query),
            kill: url(Function::Kill),
            ca: url(Function::Ca),
        }
    }

    /// The region the function URLs name (`https://ID.lambda-url.REGION.on.aws/`), when
    /// every URL that names one names the same; `None` for a local control host.
    pub fn region(&self) -> Option<&str> {
        let mut named = [&self.wake, &self.query, &self.kill, &self.ca]
            .into_iter()
            .filter_map(|u| region_of_function_url(u));
        let first = named.next()?;
        named.all(|r| r == first).then_some(first)
    }

    /// From the environment: `FLUIDITY_WAKE_URL`, `FLUIDITY_QUERY_URL`, `FLUIDITY_KILL_URL`
    /// and `FLUIDITY_CA_URL` (the four function URLs of a deployment), each falling back to
    /// a path under `FLUIDITY_CONTROL_URL` (one control host). `None` when neither names
    /// all four.
    pub fn from_env(env: &Env) -> Option<Self> {
        let host = env.get("FLUIDITY_CONTROL_URL").map(ControlUrls::on_host);
        let pick = |var: &str, fallback: Option<&String>| {
            env.get(var)
                .map(str::to_string)
                .or_else(|| fallback.cloned())
        };
        Some(ControlUrls {
            wake: pick("FLUIDITY_WAKE_URL", host.as_ref().map(|h| &h.wake))?,
            query: pick("FLUIDITY_QUERY_URL", host.as_ref().map(|h| &h.query))?,
            kill: pick("FLUIDITY_KILL_URL", host.as_ref().map(|h| &h.kill))?,
            ca: pick("FLUIDITY_CA_URL", host.as_ref().map(|h| &h.ca))?,
        })
    }
}

/// A client of the control functions. Cheap to clone; calls block (use
/// `blocking::unblock` from async code).
#[derive(Clone, Debug)]
pub struct ControlClient {
    urls: ControlUrls,
    http: FunctionUrlClient,
}

impl ControlClient {
    /// A client signing with `config`'s credentials (and its region, unless a URL is a
    /// standard function URL that names its own).
    pub fn new(config: &AwsConfig, urls: ControlUrls) -> Self {
        ControlClient {
            urls,
            http: FunctionUrlClient::new(config),
        }
    }

    /// Returns a copy with a different per-call deadline (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.http = self.http.with_timeout(timeout);
        self
    }

    /// The URLs this client calls.
    pub fn urls(&self) -> &ControlUrls {
        &self.urls
    }

    /// Wake: the server is wanted (desired count 1); the caller's IP is recorded for it.
    pub fn wake(&self) -> Result<WakeResponse> {
        self.call(&self.urls.wake, &WakeRequest::default())
    }

    /// Query: the server's state, ARN and IPs.
    pub fn query(&self) -> Result<QueryResponse> {
        self.call(&self.urls.query, &QueryRequest::default())
    }

    /// Kill: the server is no longer wanted (desired count 0).
    pub fn kill(&self) -> Result<KillResponse> {
        self.call(&self.urls.kill, &KillRequest::default())
    }

    /// CA: signs a CSR for the agent or the server.
    pub fn sign_certificate(&self, request: &CertificateRequest) -> Result<CertificateResponse> {
        self.call(&self.urls.ca, request)
    }

    fn call<Req: Serialize, Resp: DeserializeOwned>(&self, url: &str, body: &Req) -> Result<Resp> {
        let body = serde_json::to_value(body).map_err(|e| Error::Config(e.to_string()))?;
        let answer = self.http.post_json(url, &body).map_err(explain)?;
        serde_json::from_value(answer).map_err(|e| Error::MalformedResponse {
            service: "lambda",
            operation: crate::http::redact_url(url),
            message: e.to_string(),
        })
    }
}

/// Replaces a refusal's JSON body by its message, so the error reads
/// `… answered HTTP 400: csr_refused: the CN "x" is not an ARN`.
pub(crate) fn explain(err: Error) -> Error {
    match err {
        Error::HttpStatus { url, status, body } => {
            let body = match serde_json::from_str::<ErrorResponse>(&body) {
                Ok(e) => format!("{}: {}", e.error, e.message),
                Err(_) => body,
            };
            Error::HttpStatus { url, status, body }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_the_function_urls_agree_on() {
        let url = |f: &str, r: &str| format!("https://{f}123.lambda-url.{r}.on.aws/");
        let mut u = ControlUrls {
            wake: url("w", "eu-west-2"),
            query: url("q", "eu-west-2"),
            kill: url("k", "eu-west-2"),
            ca: url("c", "eu-west-2"),
        };
        assert_eq!(u.region(), Some("eu-west-2"));
        u.ca = url("c", "us-east-1");
        assert_eq!(u.region(), None);
        u.ca = "https://ca.example.com/".into();
        assert_eq!(u.region(), Some("eu-west-2"));
        assert_eq!(ControlUrls::on_host("http://127.0.0.1:9000").region(), None);
    }

    #[test]
    fn urls_from_a_host_and_from_the_environment() {
        let u = ControlUrls::on_host("http://127.0.0.1:9000/");
        assert_eq!(u.wake, "http://127.0.0.1:9000/wake");
        assert_eq!(u.ca, "http://127.0.0.1:9000/ca");
        let env = Env::from_pairs([
            ("FLUIDITY_CONTROL_URL", "http://127.0.0.1:9000"),
            (
                "FLUIDITY_CA_URL",
                "https://abc.lambda-url.eu-west-1.on.aws/",
            ),
        ]);
        let u = ControlUrls::from_env(&env).unwrap();
        assert_eq!(u.kill, "http://127.0.0.1:9000/kill");
        assert_eq!(u.ca, "https://abc.lambda-url.eu-west-1.on.aws/");
        let partial = Env::from_pairs([("FLUIDITY_WAKE_URL", "https://w/")]);
        assert_eq!(ControlUrls::from_env(&partial), None);
    }

    #[test]
    fn refusal_bodies_become_their_message() {
        let e = explain(Error::HttpStatus {
            url: "http://h/ca".into(),
            status: 400,
            body: r#"{"error":"csr_refused","message":"the CN is not an ARN"}"#.into(),
        });
        assert!(
            e.to_string().ends_with("csr_refused: the CN is not an ARN"),
            "{e}"
        );
    }
}
