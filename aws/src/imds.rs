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
        let (token, ttl) = session_token(
            &resp.body,
            resp.header("x-aws-ec2-metadata-token-ttl-seconds"),
        )?;
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

/// The longest session token accepted.
const MAX_TOKEN_LEN: usize = 1024;

/// Reads the answer to a token request. The token is the body, trimmed: not empty, at
/// most [`MAX_TOKEN_LEN`] bytes, printable ASCII (it goes into a header). Its lifetime is
/// `ttl_header` (the `x-aws-ec2-metadata-token-ttl-seconds` header) capped at the
/// lifetime asked for, or that lifetime when the header is missing or not a number.
pub(crate) fn session_token(body: &[u8], ttl_header: Option<&str>) -> Result<(String, Duration)> {
    let token = std::str::from_utf8(body)
        .ok()
        .map(str::trim)
        .filter(|t| {
            !t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| Error::Credentials {
            provider: "imds",
            message: "metadata service returned an unusable session token".into(),
        })?;
    // The cap keeps the token's deadline within what the clock can hold: the service
    // grants what was asked for, and a longer lifetime is not believed.
    let ttl = ttl_header
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(TOKEN_TTL, |secs| Duration::from_secs(secs).min(TOKEN_TTL));
    Ok((token.to_string(), ttl))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A metadata service on 127.0.0.1 that answers each of `answers` (head and body) to
    /// one connection in turn.
    fn metadata_service(answers: Vec<String>) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            for answer in answers {
                let (mut conn, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                conn.write_all(answer.as_bytes()).unwrap();
            }
        });
        (url, server)
    }

    fn answer(extra_header: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\n{extra_header}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A token TTL beyond what a clock can hold (`u64::MAX` seconds) is capped at the
    /// lifetime asked for, rather than overflowing the token's deadline.
    #[test]
    fn a_token_ttl_past_the_clock_is_capped() {
        let (url, server) = metadata_service(vec![
            answer(
                "x-aws-ec2-metadata-token-ttl-seconds: 18446744073709551615\r\n",
                "token",
            ),
            answer("", "role-name"),
        ]);
        let imds = Imds::new(url).unwrap();
        assert_eq!(
            imds.get("/latest/meta-data/iam/security-credentials/")
                .unwrap(),
            "role-name"
        );
        server.join().unwrap();
    }

    #[test]
    fn session_token_answers() {
        assert_eq!(
            session_token(b" tok\n", Some("60")).unwrap(),
            ("tok".to_string(), Duration::from_secs(60))
        );
        assert_eq!(session_token(b"tok", None).unwrap().1, TOKEN_TTL);
        assert_eq!(session_token(b"tok", Some("soon")).unwrap().1, TOKEN_TTL);
        assert_eq!(
            session_token(b"tok", Some("18446744073709551615"))
                .unwrap()
                .1,
            TOKEN_TTL
        );
        for bad in [
            &b""[..],
            b" \r\n",
            b"a\nb",
            b"a\x01b",
            b"a b",
            b"\xff",
            &[b'a'; MAX_TOKEN_LEN + 1],
        ] {
            assert!(session_token(bad, None).is_err(), "{bad:?}");
        }
    }
}
