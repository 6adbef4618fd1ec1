//! The shared core of the typed clients: configuration, signing, the query and JSON
//! protocols, AWS error documents, retries.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::chain::{ChainOptions, ProvideCredentials};
use crate::endpoints::{Endpoints, Service};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::http::{redact_url, HttpClient, HttpConfig, HttpRequest, HttpResponse, RetryPolicy};
use crate::sign::{host_header, sign_headers, PayloadHash, Signer};
use crate::xml::{self, XmlNode};

/// Everything a client needs to call AWS: region, credentials, endpoints, transport and
/// retry policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AwsConfig {
    /// The region calls go to and are signed for.
    pub region: String,
    /// Where credentials come from (usually the cached default chain).
    pub credentials: Arc<dyn ProvideCredentials>,
    /// Endpoint overrides.
    pub endpoints: Endpoints,
    /// The HTTP transport.
    pub http: HttpClient,
    /// How throttled and failed calls are retried.
    pub retry: RetryPolicy,
}

impl AwsConfig {
    /// A configuration from its parts, with the default retry policy.
    pub fn new(
        region: impl Into<String>,
        credentials: Arc<dyn ProvideCredentials>,
        endpoints: Endpoints,
        http: HttpClient,
    ) -> Self {
        AwsConfig {
            region: region.into(),
            credentials,
            endpoints,
            http,
            retry: RetryPolicy::default(),
        }
    }

    /// Resolves everything as the AWS SDKs do from `env` and `options`: region
    /// (`options.region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's region, then
    /// `options.fallback_region`), the
    /// default credential chain (with AssumeRole on top when `options.iam_role_arn` is set),
    /// endpoints (`options.endpoints` over `AWS_ENDPOINT_URL*`), proxy and CA bundle.
    ///
    /// Reads local files only; no network call is made until credentials are first needed.
    pub fn from_env(env: &Env, options: &ChainOptions) -> Result<Self> {
        let http = HttpClient::new(HttpConfig::from_env(env))?;
        let region = match &options.region {
            Some(r) => r.clone(),
            None => crate::profile::resolve_region(env, options.profile.as_deref())?
                .or_else(|| options.fallback_region.clone())
                .ok_or(Error::NoRegion)?,
        };
        let endpoints = options.endpoints.clone().over(Endpoints::from_env(env));
        let credentials = crate::chain::default_chain(env, &http, &region, &endpoints, options)?;
        Ok(AwsConfig::new(region, credentials, endpoints, http))
    }

    /// Returns a copy with a different retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Returns a copy with different credentials.
    pub fn with_credentials(mut self, credentials: Arc<dyn ProvideCredentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Calls a query-protocol action (STS, EC2, IAM, CloudWatch) and returns the parsed
    /// answer. `params` excludes `Action` and `Version`, which are added here.
    pub fn call_query(
        &self,
        service: Service,
        action: &str,
        params: &[(&str, &str)],
    ) -> Result<XmlNode> {
        let version = match service {
            Service::Sts => "2011-06-15",
            Service::Ec2 => "2016-11-15",
            Service::Iam => "2010-05-08",
            Service::CloudWatch => "2010-08-01",
            other => {
                return Err(Error::Config(format!(
                    "{} does not speak the query protocol",
                    other.signing_name()
                )))
            }
        };
        let mut body = format!("Action={}&Version={version}", form_encode(action));
        for (k, v) in params {
            body.push('&');
            body.push_str(&form_encode(k));
            body.push('=');
            body.push_str(&form_encode(v));
        }
        let headers = vec![(
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        )];
        let resp = self.call(service, action, headers, body.into_bytes())?;
        xml::parse(&resp.body).map_err(|message| Error::MalformedResponse {
            service: service.signing_name(),
            operation: action.to_string(),
            message,
        })
    }

    /// Calls a JSON-protocol operation (ECS, DynamoDB, Secrets Manager) and returns the
    /// answer (an empty object when the body is empty).
    pub fn call_json(&self, service: Service, operation: &str, input: &Value) -> Result<Value> {
        let (content_type, prefix) = match service {
            Service::DynamoDb => ("application/x-amz-json-1.0", "DynamoDB_20120810"),
            Service::Ecs => (
                "application/x-amz-json-1.1",
                "AmazonEC2ContainerServiceV20141113",
            ),
            Service::SecretsManager => ("application/x-amz-json-1.1", "secretsmanager"),
            other => {
                return Err(Error::Config(format!(
                    "{} does not speak the JSON protocol",
                    other.signing_name()
                )))
            }
        };
        let headers = vec![
            ("content-type".to_string(), content_type.to_string()),
            ("x-amz-target".to_string(), format!("{prefix}.{operation}")),
        ];
        let body = serde_json::to_vec(input).map_err(|e| Error::Config(e.to_string()))?;
        let resp = self.call(service, operation, headers, body)?;
        if resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(Default::default()));
        }
        serde_json::from_slice(&resp.body).map_err(|e| Error::MalformedResponse {
            service: service.signing_name(),
            operation: operation.to_string(),
            message: e.to_string(),
        })
    }

    /// Signs and sends a POST to the service's endpoint root, retrying per the policy
    /// (AWS API calls are safe to retry on throttling and 5xx), and turns error statuses
    /// into [`Error::Service`].
    fn call(
        &self,
        service: Service,
        operation: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<HttpResponse> {
        let base = self.endpoints.resolve(service, &self.region)?;
        let url = format!("{base}/");
        let signing_region = self.endpoints.signing_region(service, &self.region);
        let host = host_header(&url)?;
        self.retry.run(operation, Error::is_retryable, |attempt| {
            let creds = self.credentials.provide()?;
            let mut h = Vec::with_capacity(headers.len() + 4);
            h.push(("host".to_string(), host.clone()));
            h.extend(headers.iter().cloned());
            let signer = Signer {
                creds: &creds,
                region: signing_region,
                service: service.signing_name(),
                time: SystemTime::now(),
                payload_hash: PayloadHash::Implicit,
            };
            sign_headers(&signer, "POST", &url, &mut h, &body)?;
            let req = HttpRequest {
                method: "POST",
                url: url.clone(),
                headers: h,
                body: body.clone(),
                timeout: None,
            };
            let resp = self.http.send(&req)?;
            tracing::debug!(
                service = service.signing_name(),
                operation,
                status = resp.status,
                attempt,
                "AWS call"
            );
            if (200..300).contains(&resp.status) {
                Ok(resp)
            } else {
                Err(service_error(service.signing_name(), operation, &resp))
            }
        })
    }
}

/// Builds [`Error::Service`] from an AWS error answer in any of the protocols' shapes.
pub(crate) fn service_error(service: &'static str, operation: &str, resp: &HttpResponse) -> Error {
    let mut code = None;
    let mut message = None;
    let mut request_id = resp
        .header("x-amzn-requestid")
        .or_else(|| resp.header("x-amz-request-id"))
        .map(str::to_string);
    let first = resp.body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'{') {
        if let Ok(v) = serde_json::from_slice::<Value>(&resp.body) {
            code = ["__type", "code", "Code"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .map(str::to_string);
            message = ["message", "Message", "errorMessage"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .map(str::to_string);
        }
    } else if first == Some(b'<') {
        if let Ok(root) = xml::parse(&resp.body) {
            code = root.find("Code").map(|n| n.text.clone());
            message = root.find("Message").map(|n| n.text.clone());
            if request_id.is_none() {
                request_id = root
                    .find("RequestId")
                    .or_else(|| root.find("RequestID"))
                    .map(|n| n.text.clone());
            }
        }
    }
    let code = code
        .or_else(|| resp.header("x-amzn-errortype").map(str::to_string))
        .map(|c| normalize_code(&c))
        .unwrap_or_else(|| format!("Http{}", resp.status));
    Error::Service {
        service,
        operation: operation.to_string(),
        status: resp.status,
        code,
        message: message
            .map(|m| crate::http::message_for_humans(&m))
            .unwrap_or_else(|| resp.body_snippet()),
        request_id,
    }
}

/// `com.amazonaws.dynamodb.v20120810#ResourceNotFoundException:extra` → `ResourceNotFoundException`.
fn normalize_code(code: &str) -> String {
    let code = code.rsplit('#').next().unwrap_or(code);
    code.split(':').next().unwrap_or(code).trim().to_string()
}

/// Encodes a query-protocol form value: RFC 3986 unreserved characters as they are, space
/// as `+`, everything else percent-encoded (`application/x-www-form-urlencoded`).
///
/// AWS hashes the raw body, so `%20` would do as well; but moto rebuilds the body from the
/// parsed form with Python's `urlencode` before checking the signature, and that writes
/// `+`. Writing what both accept keeps signatures valid against moto too.
pub(crate) fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sends a signed request to a URL that is not a regular AWS API (Lambda function URLs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn signed_call(
    http: &HttpClient,
    creds: &dyn ProvideCredentials,
    region: &str,
    service: &str,
    method: &'static str,
    url: &str,
    mut headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
) -> Result<HttpResponse> {
    let creds = creds.provide()?;
    headers.insert(0, ("host".to_string(), host_header(url)?));
    let signer = Signer {
        creds: &creds,
        region,
        service,
        time: SystemTime::now(),
        payload_hash: PayloadHash::Header,
    };
    sign_headers(&signer, method, url, &mut headers, &body)?;
    let resp = http.send(&HttpRequest {
        method,
        url: url.to_string(),
        headers,
        body,
        timeout,
    })?;
    tracing::debug!(url = %redact_url(url), status = resp.status, "signed call");
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn parses_query_json_and_header_errors() {
        let e = service_error(
            "sts",
            "GetCallerIdentity",
            &resp(
                403,
                &[],
                "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>bad sig</Message></Error><RequestId>r1</RequestId></ErrorResponse>",
            ),
        );
        assert_eq!(e.code(), Some("SignatureDoesNotMatch"));
        assert!(e.to_string().contains("bad sig"));
        assert!(e.to_string().contains("r1"));
        assert!(
            e.to_string().contains("AWS_SECRET_ACCESS_KEY"),
            "the message says what to check: {e}"
        );
        let e = service_error(
            "dynamodb",
            "PutItem",
            &resp(
                400,
                &[("x-amzn-RequestId", "abc")],
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"slow"}"#,
            ),
        );
        assert_eq!(e.code(), Some("ProvisionedThroughputExceededException"));
        assert!(e.is_throttling());
        assert!(e.is_retryable());
        let e = service_error("ecs", "X", &resp(503, &[], ""));
        assert_eq!(e.code(), Some("Http503"));
        assert!(e.is_retryable());
        let e = service_error(
            "ecs",
            "X",
            &resp(
                400,
                &[("x-amzn-ErrorType", "ClientException:http://x")],
                "garbage",
            ),
        );
        assert_eq!(e.code(), Some("ClientException"));
        assert!(!e.is_retryable());
    }

    #[test]
    fn form_encoding_keeps_unreserved_only() {
        assert_eq!(form_encode("a b/c=d&e~+"), "a+b%2Fc%3Dd%26e~%2B");
        assert_eq!(form_encode("é"), "%C3%A9");
    }
}
