//! The EC2 instance metadata service, IMDSv2 only (session tokens; IMDSv1 is never used).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::env::Env;
use crate::error::{Error, Result};
use crate::http::{HttpClient, HttpConfig, HttpRequest};

const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
const DEFAULT_ENDPOINT_IPV6: &str = "http://[fd00:ec2::254]";
/// Token lifetime asked for; the SDKs use six hours.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// Refresh the token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(120);

/// A client of the instance metadata service.
#[derive(Debug)]
pub struct Imds {
    endpoint: String,
    http: HttpClient,
    token: Mutex<Option<(String, Instant)>>,
}

impl Imds {
    /// The service at `endpoint` (e.g. `http://169.254.169.254`), with short deadlines
    /// (1 s to connect, 2 s per call) as metadata answers fast or not at all.
    pub fn new(endpoint: impl Into<String>) -> Result<Self> {
        let http = HttpClient::new(HttpConfig {
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_response_bytes: 64 * 1024,
            ..HttpConfig::default()
        })?;
        Ok(Imds {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            http,
            token: Mutex::new(None),
        })
    }

    /// The service as the SDKs configure it: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE` (`IPv4`/`IPv6`); `None` when
    /// `AWS_EC2_METADATA_DISABLED` is true.
    pub fn from_env(env: &Env) -> Result<Option<Self>> {
        if env.is_true("AWS_EC2_METADATA_DISABLED") {
            return Ok(None);
        }
        let endpoint = match env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
            Some(e) => e.to_string(),
            None => match env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE") {
                Some(m) if m.eq_ignore_ascii_case("ipv6") => DEFAULT_ENDPOINT_IPV6.to_string(),
                Some(m) if m.eq_ignore_ascii_case("ipv4") => DEFAULT_ENDPOINT.to_string(),
                Some(m) => {
                    return Err(Error::Config(format!(
                        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE must be IPv4 or IPv6, not {m:?}"
                    )))
                }
                None => DEFAULT_ENDPOINT.to_string(),
            },
        };
        crate::sign::host_header(&endpoint)?;
        Imds::new(endpoint).map(Some)
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn token(&self, force_new: bool) -> Result<String> {
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if !force_new {
            if let Some((token, expires)) = cached.as_ref() {
                if Instant::now() + TOKEN_MARGIN < *expires {
                    return Ok(token.clone());
                }
            }
        }
        let requested = Instant::now();
        let resp = self.http.send(&HttpRequest {
            method: "PUT",
            url: format!("{}/latest/api/token", self.endpoint),
            headers: vec![(
                "x-aws-ec2-metadata-token-ttl-seconds".into(),
                TOKEN_TTL.as_secs().to_string(),
            )],
            body: Vec::new(),
            timeout: None,
        })?;
        if resp.status != 200 {
            return Err(Error::HttpStatus {
                url: format!("{}/latest/api/token", self.endpoint),
                status: resp.status,
                body: resp.body_snippet(),
            });
        }
        let token = String::from_utf8(resp.body)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty() && t.len() <= 1024 && !t.contains(['\r', '\n']))
            .ok_or_else(|| Error::Credentials {
                provider: "imds",
                message: "metadata service returned an unusable session token".into(),
            })?;
        let ttl = resp
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-aws-ec2-metadata-token-ttl-seconds"))
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            .map_or(TOKEN_TTL, Duration::from_secs);
        *cached = Some((token.clone(), requested + ttl));
        Ok(token)
    }

    /// GETs `path` (e.g. `/latest/meta-data/public-ipv4`) with a session token and returns
    /// the body. A 404 is [`Error::HttpStatus`] with status 404.
    pub fn get(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.endpoint);
        let fetch = |token: String| {
            self.http.send(&HttpRequest {
                method: "GET",
                url: url.clone(),
                headers: vec![("x-aws-ec2-metadata-token".into(), token)],
                body: Vec::new(),
                timeout: None,
            })
        };
        let mut resp = fetch(self.token(false)?)?;
        if resp.status == 401 {
            // The token expired or the instance was restarted: get a new one, once.
            resp = fetch(self.token(true)?)?;
        }
        if resp.status != 200 {
            return Err(Error::HttpStatus {
                url,
                status: resp.status,
                body: resp.body_snippet(),
            });
        }
        String::from_utf8(resp.body).map_err(|_| Error::Credentials {
            provider: "imds",
            message: format!("{path} is not UTF-8"),
        })
    }
}
