//! Lambda: the events the functions receive, the answers function URLs expect, and a
//! small client of the Lambda Runtime API for the `bootstrap` binary.
//!
//! Why a custom runtime rather than the `lambda_runtime` crate: that crate is built on
//! tokio and hyper, which this project keeps out of its binaries; the Runtime API is three
//! plain HTTP calls on a local address (`GET …/invocation/next`, `POST …/response`,
//! `POST …/error`), which the `ureq` client already in this crate does in a few lines,
//! and the handlers are blocking anyway.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};

use super::error::ControlError;
use super::handlers::{Caller, Control};
use super::types::Function;

/// Where an event came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A function URL (payload format 2.0): answered with `statusCode`, `headers`, `body`.
    FunctionUrl,
    /// An EventBridge schedule (Sleep).
    Scheduled,
    /// A direct `Invoke` whose payload is the request itself.
    Direct,
}

/// An event reduced to what the handlers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Where it came from.
    pub kind: EventKind,
    /// The caller's address (function URLs only).
    pub source_ip: Option<IpAddr>,
    /// The caller's IAM identity as the function URL's `AWS_IAM` authorisation saw it
    /// (`requestContext.authorizer.iam.userArn`; function URLs only).
    pub caller_arn: Option<String>,
    /// The request body.
    pub body: Vec<u8>,
}

/// Reads a Lambda event: a function-URL request (`requestContext.http`), a scheduled
/// event (`source` = `aws.events`), or else a direct invocation whose payload is the body.
pub fn parse_event(event: &Value) -> Result<Invocation, ControlError> {
    if let Some(http) = event.pointer("/requestContext/http") {
        let method = http.get("method").and_then(Value::as_str).unwrap_or("");
        if !method.eq_ignore_ascii_case("POST") {
            return Err(ControlError::bad_request(format!(
                "the control functions take POST, not {method:?}"
            )));
        }
        let source_ip = http
            .get("sourceIp")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<IpAddr>().ok());
        let caller_arn = event
            .pointer("/requestContext/authorizer/iam/userArn")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let raw = event.get("body").and_then(Value::as_str).unwrap_or("");
        let body = if event.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
            base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|_| ControlError::bad_request("the body is marked base64 but is not"))?
        } else {
            raw.as_bytes().to_vec()
        };
        return Ok(Invocation {
            kind: EventKind::FunctionUrl,
            source_ip,
            caller_arn,
            body,
        });
    }
    if event.get("source").and_then(Value::as_str) == Some("aws.events")
        || event.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event")
    {
        return Ok(Invocation {
            kind: EventKind::Scheduled,
            source_ip: None,
            caller_arn: None,
            body: Vec::new(),
        });
    }
    let body = match event {
        Value::Null => Vec::new(),
        other => serde_json::to_vec(other)
            .map_err(|e| ControlError::bad_request(format!("unreadable event: {e}")))?,
    };
    Ok(Invocation {
        kind: EventKind::Direct,
        source_ip: None,
        caller_arn: None,
        body,
    })
}

/// A function-URL answer: the status, a JSON content type and the body as a string.
pub fn function_url_response(status: u16, body: &Value) -> Value {
    json!({
        "statusCode": status,
        "headers": { "content-type": "application/json" },
        "body": body.to_string(),
    })
}

/// Handles one event. Function-URL events always get an HTTP answer (refusals carry their
/// status and [`ErrorResponse`](super::types::ErrorResponse)); scheduled and direct
/// invocations return the answer itself, or the error, which the runtime reports as a
/// failed invocation.
pub fn handle_event(
    control: &Control,
    function: Function,
    event: &Value,
    now: SystemTime,
) -> Result<Value, ControlError> {
    let inv = match parse_event(event) {
        Ok(inv) => inv,
        Err(e) if event.pointer("/requestContext/http").is_some() => {
            return Ok(function_url_response(e.status, &json!(e.to_response())))
        }
        Err(e) => return Err(e),
    };
    let caller = Caller {
        ip: inv.source_ip,
        arn: inv.caller_arn,
    };
    let result = control.dispatch(function, &caller, &inv.body, now);
    match inv.kind {
        EventKind::FunctionUrl => Ok(match result {
            Ok(v) => function_url_response(200, &v),
            Err(e) => {
                tracing::warn!(%function, status = e.status, error = %e, "refused");
                function_url_response(e.status, &json!(e.to_response()))
            }
        }),
        EventKind::Scheduled | EventKind::Direct => result,
    }
}

/// A client of the Lambda Runtime API at `AWS_LAMBDA_RUNTIME_API` (`host:port`).
#[derive(Debug)]
pub struct RuntimeApi {
    base: String,
    agent: ureq::Agent,
}

/// One invocation handed out by the Runtime API.
#[derive(Clone, Debug)]
pub struct NextEvent {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: String,
    /// The event.
    pub event: Value,
}

impl RuntimeApi {
    /// A client of the Runtime API at `host_port`.
    pub fn new(host_port: &str) -> Self {
        // No global deadline: `next` blocks until the next invocation, which may be long.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        RuntimeApi {
            base: format!("http://{host_port}/2018-06-01/runtime"),
            agent,
        }
    }

    /// Waits for the next invocation.
    pub fn next(&self) -> Result<NextEvent, String> {
        let url = format!("{}/invocation/next", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let request_id = resp
            .headers()
            .get("lambda-runtime-aws-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_request_id(v))
            .ok_or_else(|| format!("GET {url}: no usable Lambda-Runtime-Aws-Request-Id"))?
            .to_string();
        let body = resp
            .body_mut()
            .with_config()
            .limit(6 * 1024 * 1024)
            .read_to_vec()
            .map_err(|e| format!("GET {url}: {e}"))?;
        // An event that is not JSON is handed on as null and refused by the handler.
        let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(NextEvent { request_id, event })
    }

    fn post(&self, path: &str, body: &Value, error_type: Option<&str>) -> Result<(), String> {
        let url = format!("{}/{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("content-type", "application/json");
        if let Some(t) = error_type {
            req = req.header("lambda-runtime-function-error-type", t);
        }
        let resp = req
            .send(body.to_string().as_bytes())
            .map_err(|e| format!("POST {url}: {e}"))?;
        if !(200..300).contains(&resp.status().as_u16()) {
            return Err(format!("POST {url}: HTTP {}", resp.status()));
        }
        Ok(())
    }

    /// Sends the answer of invocation `request_id`.
    pub fn respond(&self, request_id: &str, answer: &Value) -> Result<(), String> {
        self.post(&format!("invocation/{request_id}/response"), answer, None)
    }

    /// Reports invocation `request_id` as failed.
    pub fn fail(&self, request_id: &str, err: &ControlError) -> Result<(), String> {
        self.post(
            &format!("invocation/{request_id}/error"),
            &json!({ "errorMessage": err.message, "errorType": err.code }),
            Some(err.code),
        )
    }

    /// Reports that the function could not start.
    pub fn init_error(&self, message: &str) -> Result<(), String> {
        self.post(
            "init/error",
            &json!({ "errorMessage": message, "errorType": "configuration" }),
            Some("configuration"),
        )
    }

    /// Serves invocations of `function` until the Runtime API fails.
    pub fn run(&self, control: &Control, function: Function) -> Result<(), String> {
        loop {
            let next = self.next()?;
            match handle_event(control, function, &next.event, SystemTime::now()) {
                Ok(answer) => self.respond(&next.request_id, &answer)?,
                Err(e) => {
                    tracing::warn!(%function, error = %e, "invocation failed");
                    self.fail(&next.request_id, &e)?
                }
            }
        }
    }
}

/// Whether `id` can be a request id: it goes into the path of the answer's URL, so only
/// the letters, digits and dashes the runtime uses (a UUID), not `/`, `?` or `..`.
fn is_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_a_uuid_like_word() {
        assert!(is_request_id("8476a536-e9f4-11e8-9739-2dfe598c3fcd"));
        for bad in ["", "../next", "a/b", "a?b", "a b", &"a".repeat(129)] {
            assert!(!is_request_id(bad), "{bad}");
        }
    }

    #[test]
    fn function_url_events_give_source_ip_and_body() {
        let event = json!({
            "version": "2.0",
            "requestContext": {
                "http": { "method": "POST", "sourceIp": "203.0.113.9" },
                "authorizer": { "iam": {
                    "accountId": "123456789012",
                    "userArn": "arn:aws:sts::123456789012:assumed-role/fluidity-server/0a1b",
                } },
            },
            "body": "eyJjc3IiOiJ4In0=",
            "isBase64Encoded": true,
        });
        let inv = parse_event(&event).unwrap();
        assert_eq!(inv.kind, EventKind::FunctionUrl);
        assert_eq!(inv.source_ip, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(
            inv.caller_arn.as_deref(),
            Some("arn:aws:sts::123456789012:assumed-role/fluidity-server/0a1b")
        );
        assert_eq!(inv.body, br#"{"csr":"x"}"#);
        let get = json!({ "requestContext": { "http": { "method": "GET" } } });
        assert!(parse_event(&get).unwrap_err().message.contains("POST"));
    }

    #[test]
    fn scheduled_and_direct_events() {
        let sched =
            json!({ "source": "aws.events", "detail-type": "Scheduled Event", "detail": {} });
        assert_eq!(parse_event(&sched).unwrap().kind, EventKind::Scheduled);
        let direct = json!({ "csr": "x", "role": "agent" });
        let inv = parse_event(&direct).unwrap();
        assert_eq!(inv.kind, EventKind::Direct);
        assert_eq!(inv.caller_arn, None, "a direct invocation names no caller");
        assert_eq!(serde_json::from_slice::<Value>(&inv.body).unwrap(), direct);
    }
}
