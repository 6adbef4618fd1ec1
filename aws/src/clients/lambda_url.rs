//! SigV4-signed calls to Lambda function URLs (`AuthType: AWS_IAM`).

use std::time::Duration;

use serde_json::Value;

use crate::client::{signed_call, AwsConfig};
use crate::error::{Error, Result};
use crate::http::redact_url;

/// Default deadline of a function-URL call; Wake and Kill do several AWS calls in turn.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for Lambda function URLs.
#[derive(Clone, Debug)]
pub struct FunctionUrlClient {
    config: AwsConfig,
    timeout: Duration,
}

/// The region of a function URL (`https://ID.lambda-url.REGION.on.aws/`), if it has the
/// standard shape.
pub fn region_of_function_url(url: &str) -> Option<&str> {
    let host = url.split("://").nth(1)?.split(['/', ':', '?']).next()?;
    let mut labels = host.split('.');
    let _id = labels.next()?;
    (labels.next()? == "lambda-url").then_some(())?;
    labels.next().filter(|r| !r.is_empty())
}

impl FunctionUrlClient {
    /// A client using `config` (its region is used when the URL does not name one).
    pub fn new(config: &AwsConfig) -> Self {
        FunctionUrlClient {
            config: config.clone(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Returns a copy with a different per-call deadline (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// POSTs `body` as JSON to the function URL, signed for service `lambda`, and returns
    /// the JSON answer (`Value::Null` for an empty body).
    ///
    /// A POST may have side effects, so it is retried only when it surely did not run:
    /// throttling (HTTP 429) or a refused connection.
    pub fn post_json(&self, url: &str, body: &Value) -> Result<Value> {
        let region = region_of_function_url(url).unwrap_or(&self.config.region);
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Config(e.to_string()))?;
        let retryable = |e: &Error| e.is_throttling() || e.is_connection_refused();
        let resp = self.config.retry.run("function URL", retryable, |_| {
            let resp = signed_call(
                &self.config.http,
                self.config.credentials.as_ref(),
                region,
                "lambda",
                "POST",
                url,
                vec![("content-type".into(), "application/json".into())],
                bytes.clone(),
                Some(self.timeout),
            )?;
            if (200..300).contains(&resp.status) {
                Ok(resp)
            } else {
                Err(Error::HttpStatus {
                    url: redact_url(url),
                    status: resp.status,
                    body: resp.body_snippet(),
                })
            }
        })?;
        function_url_answer(url, &resp.body)
    }
}

/// The JSON answer of the function at `url` (which errors name, without its query):
/// `Value::Null` for an empty or blank body.
pub(crate) fn function_url_answer(url: &str, body: &[u8]) -> Result<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| Error::MalformedResponse {
        service: "lambda",
        operation: redact_url(url),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_url_region() {
        assert_eq!(
            region_of_function_url("https://abc123.lambda-url.eu-west-2.on.aws/wake"),
            Some("eu-west-2")
        );
        assert_eq!(region_of_function_url("http://127.0.0.1:9000/"), None);
    }

    #[test]
    fn function_url_answers() {
        let url = "https://abc.lambda-url.eu-west-1.on.aws/wake?token=x";
        assert_eq!(function_url_answer(url, b" \r\n").unwrap(), Value::Null);
        assert_eq!(
            function_url_answer(url, br#"{"status":"running"}"#).unwrap()["status"],
            "running"
        );
        let e = function_url_answer(url, b"<html>").unwrap_err().to_string();
        assert!(e.contains("malformed response from lambda"), "{e}");
        assert!(!e.contains("token=x"), "{e}");
    }
}
