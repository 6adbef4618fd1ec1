//! The local control host: the control functions over HTTP/1.1 in the shape of function
//! URLs (`POST /wake`, `/query`, `/kill`, `/sleep`, `/ca` with JSON bodies), the caller's
//! address taken from the TCP peer as a function URL takes it from the connection. It lets
//! the whole lifecycle run on one machine against moto.
//!
//! One request per connection, a thread per connection, bounded heads and bodies, and
//! read deadlines: it serves tests and development, not the internet.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fluidity_runtime_smol::listener::AcceptErrors;
use serde_json::{json, Value};

use super::error::ControlError;
use super::handlers::{canonical_ip, Caller, Control, MAX_BODY_LEN};
use super::types::Function;

/// Largest request head accepted.
pub(crate) const MAX_HEAD_LEN: usize = 16 * 1024;
/// Headers parsed at most.
const MAX_HEADERS: usize = 64;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once rather than given a thread each.
const MAX_CONNECTIONS: usize = 64;

/// Settings of the local control host.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalOptions {
    /// Refuse (403) requests without a SigV4 `Authorization` header for service `lambda`,
    /// as a function URL under `AWS_IAM` does. The signature itself is not verified: only
    /// AWS could, knowing the caller's secret.
    pub require_signature: bool,
}

/// Serves `control` on `listener`; a failing accept pauses the loop (see
/// [`AcceptErrors`]) instead of ending it.
pub fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    options: LocalOptions,
) -> std::io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let mut errors = AcceptErrors::new("control");
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                std::thread::sleep(errors.record(&e));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%peer, "too many control connections; closing this one");
            continue;
        }
        let control = Arc::clone(&control);
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            if let Err(e) = handle_connection(stream, peer.ip(), &control, options) {
                tracing::debug!(%peer, error = %e, "control connection ended");
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A parsed request.
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) authorization: Option<String>,
    pub(crate) body: Vec<u8>,
}

pub(crate) fn read_request(stream: &mut TcpStream) -> Result<Request, ControlError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, authorization, content_length) = loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| ControlError::bad_request(format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(ControlError::bad_request(
                "the connection closed mid-request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::to_string)
                };
                let content_length = match header("content-length") {
                    None => 0,
                    Some(v) => v.trim().parse::<usize>().map_err(|_| {
                        ControlError::bad_request("the Content-Length is not a number")
                    })?,
                };
                if header("transfer-encoding").is_some() {
                    return Err(ControlError::bad_request(
                        "chunked bodies are not supported; send a Content-Length",
                    ));
                }
                break (
                    len,
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    header("authorization"),
                    content_length,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_LEN => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ControlError::bad_request("the request head is too large"))
            }
            Err(e) => return Err(ControlError::bad_request(format!("malformed request: {e}"))),
        }
    };
    if content_length > MAX_BODY_LEN {
        return Err(ControlError::bad_request(format!(
            "the body is {content_length} bytes, more than {MAX_BODY_LEN}"
        )));
    }
    let mut body = buf.split_off(head_len);
    body.truncate(content_length);
    while body.len() < content_length {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| ControlError::bad_request(format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(ControlError::bad_request("the connection closed mid-body"));
        }
        let take = n.min(content_length - body.len());
        body.extend_from_slice(&chunk[..take]);
    }
    Ok(Request {
        method,
        path,
        authorization,
        body,
    })
}

/// Whether `auth` is a SigV4 Authorization header scoped to service `lambda`.
pub(crate) fn signed_for_lambda(auth: Option<&str>) -> bool {
    auth.is_some_and(|a| {
        a.starts_with("AWS4-HMAC-SHA256 ")
            && a.split("Credential=")
                .nth(1)
                .and_then(|c| c.split(',').next())
                .is_some_and(|scope| scope.ends_with("/lambda/aws4_request"))
    })
}

fn route(
    req: &Request,
    peer: IpAddr,
    control: &Control,
    options: LocalOptions,
) -> Result<Value, ControlError> {
    let path = req.path.split('?').next().unwrap_or("");
    let function: Function = path
        .trim_matches('/')
        .parse()
        .map_err(|_| ControlError::not_found(format!("no control function at {path:?}")))?;
    if req.method != "POST" {
        return Err(ControlError {
            status: 405,
            code: "method_not_allowed",
            message: format!("{path} takes POST, not {}", req.method),
        });
    }
    if options.require_signature && !signed_for_lambda(req.authorization.as_deref()) {
        return Err(ControlError::forbidden(
            "the request is not signed with SigV4 for service lambda",
        ));
    }
    let caller = Caller {
        ip: Some(canonical_ip(peer)),
        arn: None,
    };
    control.dispatch(function, &caller, &req.body, SystemTime::now())
}

fn handle_connection(
    mut stream: TcpStream,
    peer: IpAddr,
    control: &Control,
    options: LocalOptions,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let (status, body) = match read_request(&mut stream)
        .and_then(|req| route(&req, peer, control, options).map(|v| (req, v)))
    {
        Ok((req, v)) => {
            tracing::info!(%peer, path = %req.path, "served");
            (200, v)
        }
        Err(e) => {
            tracing::info!(%peer, status = e.status, error = %e, "refused");
            (e.status, json!(e.to_response()))
        }
    };
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Bad Gateway",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_sigv4_for_lambda_only() {
        let ok = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=abc";
        assert!(signed_for_lambda(Some(ok)));
        assert!(!signed_for_lambda(Some(&ok.replace("lambda", "sts"))));
        assert!(!signed_for_lambda(Some("Basic dXNlcjpwYXNz")));
        assert!(!signed_for_lambda(None));
    }
}
