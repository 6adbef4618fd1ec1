//! HTTP/1.1 forward proxy: absolute-form requests, CONNECT, and WebSocket upgrades.
//!
//! Each request is rewritten to origin-form and sent over a stream to its origin. A stream
//! is kept for the next request when it goes to the same origin and both messages were
//! cleanly delimited; otherwise it is dropped and a new one is opened. Bodies are streamed
//! in both directions, never buffered whole.

use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use fluidity_proto::{Host, RefusalReason, Target};
use fluidity_runtime_smol::relay::{IdleDeadline, OwnWaker, ReadChunks, LAST_BYTES_TIME};
use fluidity_runtime_smol::timer::LazyTimer;
use fluidity_server::egress::embedded_ipv4;
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncWriteExt, FutureExt};

use super::head::{
    self, parse_absolute_target, AbsoluteTarget, Framing, HeadError, Header, Headers, RequestHead,
    ResponseHead,
};
use super::io::{
    copy_chunked, copy_exact, copy_unchunked, linger_close, read_head, relay, relay_stream,
    CopyError, Inbound, ReadHeadError, SharedStream, Source,
};
use super::{dial, one_line, watch_client, DialError, Dialer, ProxyConfig, WATCH_AFTER};
use crate::error::{Error, Result};

/// An open stream to an origin, kept between requests.
struct Upstream<S> {
    target: Target,
    /// Read and written by one task: the response while the request is sent.
    stream: SharedStream<S>,
    /// Whether it has carried a request before (so that a failure may just mean the origin
    /// closed an idle connection, and one retry is safe).
    reused: bool,
    /// Its exchange ended whole, but it carries no further request (the origin or the
    /// client closes the connection after it): it is let go plainly, not reset.
    spent: bool,
    /// When a request's client is watched (see [`WATCH_AFTER`]): one timer for all the
    /// requests the stream carries, armed again about once a second at most.
    watch: LazyTimer,
    /// The request side's own waker in [`exchange`], for all the requests the stream
    /// carries: watching the client, it is polled only when the client's socket moves.
    send_waker: OwnWaker,
}

impl<S> Upstream<S> {
    fn new(target: Target, stream: S) -> Self {
        Upstream {
            target,
            stream: SharedStream::new(stream),
            reused: false,
            spent: false,
            watch: LazyTimer::new(),
            send_waker: OwnWaker::new(),
        }
    }
}

/// What to do with the client connection after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    KeepAlive,
    /// Close after lingering (the client may still be sending).
    Close,
    /// The connection was already ended (relayed); just drop it.
    Done,
    /// What the connection carried broke off mid-message: reset it (see
    /// [`Error::Aborted`]).
    Abort(String),
}

/// Serves HTTP/1.1 requests from one client until it closes.
pub(super) async fn serve<D, R, W>(
    cin: &mut Inbound<R>,
    cw: &mut W,
    peer: SocketAddr,
    dialer: &D,
    cfg: &ProxyConfig,
) -> Result<()>
where
    D: Dialer,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut upstream: Option<Upstream<D::Stream>> = None;
    let mut first = true;
    // A request is arriving: idle connections that close do not include this one.
    let mut arriving = false;
    let mut head_deadline = LazyTimer::new();
    let mut head_due = None;
    loop {
        let (kept, inb) = (&mut upstream, &mut *cin);
        let reading = async move {
            if kept.as_ref().is_some_and(|k| k.spent) {
                // Let go while the client's next request comes; if the client leaves
                // instead, nothing waits, and the stream ends plainly.
                let next = read_head(inb, head::parse_request_head);
                let release_all = |r: &Result<Option<_>, _>| matches!(r, Ok(None));
                return Some(while_releasing_unless(kept.take(), next, release_all).await);
            }
            if kept.is_some() {
                let next = async { Some(read_head(inb, head::parse_request_head).await) };
                let room_wanted = async {
                    dialer.wait_room_wanted().await;
                    None
                };
                if let Some(r) = next.or(room_wanted).await {
                    return Some(r);
                }
                if dialer.room_wanted() {
                    // Another client waits for a stream: an idle one kept for this client's
                    // next request is worth less, and its room is wanted now. The next
                    // request opens a new one.
                    *kept = None;
                } else {
                    // The tunnel is going away: let the stream go plainly while the next
                    // request comes, which must not wait for it (over a dead path, the
                    // origin's end never comes).
                    return Some(
                        while_releasing(kept.take(), read_head(inb, head::parse_request_head))
                            .await,
                    );
                }
            }
            Some(read_head(inb, head::parse_request_head).await)
        };
        // Between requests the connection may be closed, as a server closes an idle
        // kept-alive one, when the agent stops or runs out of descriptors (see
        // `Dialer::wait_close_idle`). A new connection is not idle: its first request is
        // on its way.
        let close_idle = async {
            if first || arriving {
                std::future::pending::<()>().await;
            }
            dialer.wait_close_idle().await;
            None
        };
        // One limit for a head, however often an idle close was declined meanwhile.
        let due = match head_due {
            Some(due) if arriving => due,
            _ => *head_due.insert(fluidity_runtime_smol::app::deadline_in(cfg.head_timeout)),
        };
        let head = head_deadline
            .run_until(due, pin!(reading.or(close_idle)))
            .await;
        let head = match head {
            Some(None) if cin.buffered().is_empty() => {
                tracing::debug!(%peer, "idle client connection closed");
                release(upstream.take()).await;
                return Ok(());
            }
            Some(None) => {
                // Part of a request came meanwhile: it is read and answered.
                arriving = true;
                continue;
            }
            Some(Some(r)) => Some(r),
            // The next head began while the connection sat idle, whose limit it shared: it
            // gets its own, from now, instead of a 408 after what was left of the wait.
            None if !first && !arriving && !cin.buffered().is_empty() => {
                arriving = true;
                head_due = None;
                continue;
            }
            None => None,
        };
        arriving = false;
        let head = match head {
            // An idle keep-alive connection simply expires.
            None if !first && cin.buffered().is_empty() => {
                release(upstream.take()).await;
                return Ok(());
            }
            None => {
                tracing::debug!(%peer, "client sent no complete request head in time");
                // Part of a head came: the client is there, and is told (RFC 9110 §15.5.9).
                if !cin.buffered().is_empty() {
                    let told = answer(
                        cw,
                        408,
                        &format!(
                            "fluidity proxy: the request head did not arrive within {:?}",
                            cfg.head_timeout
                        ),
                        true,
                        &[],
                        false,
                    )
                    .await;
                    // What the client still sends must not turn the close into a reset
                    // that destroys the answer (RFC 9112 §9.6).
                    if told.is_ok() {
                        futures_lite::future::zip(release(upstream.take()), linger_close(cin, cw))
                            .await;
                    }
                }
                return Err(Error::ClientTimeout(cfg.head_timeout));
            }
            Some(Ok(Some(head))) => head,
            Some(Ok(None)) => {
                release(upstream.take()).await;
                return Ok(());
            }
            Some(Err(ReadHeadError::Io(e))) => return Err(e.into()),
            Some(Err(ReadHeadError::Truncated)) => {
                return Err(Error::ClientProtocol(
                    "connection closed mid-request".into(),
                ))
            }
            Some(Err(ReadHeadError::Head(e))) => {
                let (status, why) = match e {
                    // Not even the request line fits: it is the target that is too long.
                    HeadError::TooLarge
                        if cin
                            .buffered()
                            .iter()
                            .position(|&b| b == b'\n')
                            .is_none_or(|end| end >= head::MAX_HEAD_LEN) =>
                    {
                        (
                            414,
                            format!("request line longer than {} bytes", head::MAX_HEAD_LEN),
                        )
                    }
                    HeadError::TooLarge | HeadError::TooManyHeaders => (431, e.to_string()),
                    HeadError::Malformed(_) => (400, format!("malformed request: {e}")),
                };
                tracing::info!(%peer, status, error = %why, "bad request head");
                let _ = answer(
                    cw,
                    status,
                    &format!("fluidity proxy: {why}"),
                    true,
                    &[],
                    false,
                )
                .await;
                linger_close(cin, cw).await;
                return Err(Error::ClientProtocol(why));
            }
        };
        first = false;
        match request(head, cin, cw, &mut upstream, peer, dialer, cfg).await? {
            Next::KeepAlive => {}
            Next::Close => {
                // Side by side: the client's close must not wait for the origin's.
                futures_lite::future::zip(release(upstream.take()), linger_close(cin, cw)).await;
                return Ok(());
            }
            Next::Done => return Ok(()),
            Next::Abort(why) => return Err(Error::Aborted(why)),
        }
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Answers a client that began a TLS handshake: 400, saying the proxy speaks plain HTTP.
pub(crate) async fn refuse_tls<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    answer(
        w,
        400,
        "fluidity proxy: this port speaks plain HTTP and SOCKS5; use a proxy URL that \
         starts with http://",
        true,
        &[],
        false,
    )
    .await
}

/// Writes a complete plain-text answer from the proxy itself; to a HEAD request
/// (`to_head`), its head alone, whose Content-Length is the body's a GET would get (RFC
/// 9110 §9.3.2): a body there would be read as the start of the next answer.
async fn answer<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    line: &str,
    close: bool,
    extra: &[(&str, &str)],
    to_head: bool,
) -> std::io::Result<()> {
    let body = format!("{}\n", one_line(line, 1000));
    // The proxy is the origin of its own answers, which carry a Date (RFC 9110 §6.6.1).
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n",
        status_text(status),
        http_date(SystemTime::now()),
        body.len()
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if !to_head {
        out.push_str(&body);
    }
    w.write_all(out.as_bytes()).await?;
    w.flush().await
}

/// Status and one-line explanation for a failed open.
fn dial_failure(target: &Target, e: &DialError, cfg: &ProxyConfig) -> (u16, String) {
    match e {
        DialError::TunnelDown(why) => (
            502,
            format!(
                "fluidity: cannot reach {target}: the tunnel to the fluidity server is down ({}); \
                 the agent reconnects on its own, retry in a moment",
                one_line(why, 300)
            ),
        ),
        DialError::TunnelUnusable(why) => (
            502,
            format!(
                "fluidity: cannot reach {target}: no tunnel to the fluidity server can be made \
                 until this is fixed: {}",
                one_line(why, 400)
            ),
        ),
        DialError::Stopping => (
            503,
            format!("fluidity: the proxy is stopping and takes no new requests (for {target})"),
        ),
        DialError::NoStream(waited) => {
            let advice = if cfg.local_server {
                "retry when some have ended"
            } else {
                "retry later, or raise the server's max_streams"
            };
            (
                504,
                format!(
                    "fluidity: no stream to {target} within {waited:?}: the tunnel's streams all \
                     stayed in use (the server's max_streams), or the tunnel gave no answer; \
                     {advice}"
                ),
            )
        }
        DialError::Refused(r) => {
            let allow;
            let (status, advice) = match r.reason {
                RefusalReason::NoSuchHost => (502, "check the host name"),
                RefusalReason::ConnectionRefused => (502, "is the service running on that port?"),
                RefusalReason::Unreachable => (502, "the server has no route to it"),
                RefusalReason::TimedOut => (504, "retry later"),
                RefusalReason::DeniedByPolicy => {
                    allow = allow_advice(target, cfg.local_server, &r.detail);
                    (403, allow.as_str())
                }
                RefusalReason::TooManyStreams => {
                    (503, "the tunnel is at its stream limit; retry shortly")
                }
                RefusalReason::GoingAway => (503, "the server is shutting down; retry in a moment"),
                RefusalReason::Other | RefusalReason::Unknown(_) => (502, "see the server's log"),
            };
            let reason = r.reason.to_string();
            // A detail that only says the reason again ("Connection refused (os error
            // 111)" after "connection refused") is left out.
            let repeats = r
                .detail
                .get(..reason.len())
                .is_some_and(|d| d.eq_ignore_ascii_case(&reason));
            // After a colon, not in parentheses: details have their own.
            let detail = if r.detail.is_empty() || repeats {
                String::new()
            } else {
                format!(": {}", one_line(&r.detail, 300))
            };
            (
                status,
                format!("fluidity: cannot reach {target}: {reason}{detail}; {advice}"),
            )
        }
    }
}

/// How a destination the egress policy denies could be allowed, given the server's
/// `detail` (which names the rule that matched): in local mode, the option that allows
/// exactly this target; otherwise the server's settings, which its operator keeps.
fn allow_advice(target: &Target, local: bool, detail: &str) -> String {
    // A deny rule wins over any allow (README, egress): only removing it helps.
    if !local && detail.contains("deny_") {
        return "if it should be allowed, the matching deny rule must be removed from the \
                server's egress settings (an allow rule cannot override it)"
            .into();
    }
    if !local {
        return "if it should be allowed, the server's egress settings (allow_cidrs, \
                allow_hosts, allow_ports) can allow it"
            .into();
    }
    // Local mode's rules are the user's own options: a deny rule they gave wins over any
    // allow (README, egress), and a port list of theirs must name the port.
    if detail.contains("deny_") {
        return "remove the matching `--egress deny_...` option of `fluidity local` to allow it"
            .into();
    }
    let rule = if detail.contains("allow_ports") {
        format!("allow_ports={}", target.port)
    } else {
        match &target.host {
            Host::Ip(IpAddr::V4(ip)) => format!("allow_cidrs={ip}/32"),
            // A NAT64 or 6to4 address is judged as the IPv4 address it embeds too.
            Host::Ip(IpAddr::V6(ip)) => match embedded_ipv4(*ip) {
                Some(v4) => format!("allow_cidrs={ip}/128,{v4}/32"),
                None => format!("allow_cidrs={ip}/128"),
            },
            Host::Name(name) => format!("allow_hosts={name}"),
        }
    };
    format!("`fluidity local --egress {rule}` allows it")
}

/// Whether a request with `method` may be repeated without changing more than once
/// (RFC 9110 §9.2.2). Methods are case-sensitive (§9.1): `put` is not PUT.
fn is_idempotent(method: &str) -> bool {
    ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"].contains(&method)
}

/// A request target without its path and query, which can carry secrets: the scheme and
/// authority of an absolute URL, an authority as is, nothing of an origin-form path.
fn head_origin(target: &str) -> Cow<'_, str> {
    let origin = match target.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            &target[..scheme.len() + 3 + end]
        }
        None if target.starts_with('/') => "(a path without a host)",
        None => target,
    };
    one_line(origin, 200)
}

/// Header fields that concern only one connection and are never forwarded (RFC 9110 §7.6.1),
/// plus every field the `Connection` header names. Framing fields are handled separately.
/// `Trailer` is not among them: it announces the trailer fields, which pass through.
fn is_hop_by_hop(h: &Header<'_>, connection_tokens: &[&[u8]]) -> bool {
    // Compared without a lowercased copy: this runs for every field of every message.
    const ALWAYS: [&str; 5] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ];
    const NEVER_BY_CONNECTION: [&str; 3] = ["host", "content-length", "transfer-encoding"];
    let name = h.name;
    ALWAYS.iter().any(|n| h.is(n))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"proxy-"))
        || (connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
            && !NEVER_BY_CONNECTION.iter().any(|n| h.is(n)))
}

/// Whether a trailer field goes on: not hop-by-hop (named in the message's `Connection`
/// tokens, or always), and not a field that frames or routes a message, which has no
/// meaning in a trailer (RFC 9110 §6.5.1) and which a careless recipient could merge into
/// the head.
fn keeps_trailer(h: &Header<'_>, connection_tokens: &[&[u8]]) -> bool {
    const FRAMING: [&str; 5] = [
        "content-length",
        "transfer-encoding",
        "host",
        "trailer",
        "content-encoding",
    ];
    !is_hop_by_hop(h, connection_tokens) && !FRAMING.iter().any(|n| h.is(n))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Ends a rewritten head with the connection fields of this hop: the `Upgrade` fields of
/// `headers` and `Connection: Upgrade` for an upgrade, else `Connection: close` if the
/// connection ends after this message; then the empty line.
fn end_head(out: &mut Vec<u8>, headers: &Headers, upgrade: bool, close: bool) {
    if upgrade {
        for h in headers.named("upgrade") {
            push_header(out, b"Upgrade", h.value);
        }
        push_header(out, b"Connection", b"Upgrade");
    } else if close {
        push_header(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether the request asks for a WebSocket upgrade (RFC 6455 §4.1).
fn is_websocket(head: &RequestHead) -> bool {
    head.minor_version == 1
        && head.method() == "GET"
        && head.headers.has_token("upgrade", "websocket")
        && head.headers.has_token("connection", "upgrade")
}

/// The request as sent to the origin: origin-form target, Host from the URL, no
/// hop-by-hop or proxy fields.
fn origin_request(
    head: &RequestHead,
    abs: &AbsoluteTarget,
    websocket: bool,
    close: bool,
) -> Vec<u8> {
    let hops_left = max_forwards(head);
    let tokens: Vec<&[u8]> = head.headers.tokens("connection").collect();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    if abs.bare && head.method() == "OPTIONS" {
        out.push(b'*');
    } else {
        out.extend_from_slice(abs.path.as_bytes());
    }
    // An intermediary sends its own version (RFC 9110 §2.5), whatever the client's; an
    // HTTP/1.0 client's request carries `Connection: close` instead (`close`).
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(&mut out, b"Host", abs.authority.as_bytes());
    for h in head.headers.iter() {
        if h.is("max-forwards") {
            if let Some(n) = hops_left {
                // This proxy is one hop (RFC 9110 §7.6.2); 0 was answered here.
                push_header(&mut out, h.name, n.saturating_sub(1).to_string().as_bytes());
                continue;
            }
        }
        if !h.is("host")
            && !h.is("content-length")
            && !h.is("transfer-encoding")
            && !is_hop_by_hop(&h, &tokens)
        {
            push_header(&mut out, h.name, h.value);
        }
    }
    push_content_length(&mut out, &head.headers);
    push_transfer_encoding(&mut out, &head.headers);
    end_head(&mut out, &head.headers, websocket, close);
    out
}

/// The message's Content-Length as one field with one value. Equal values in a list or
/// in several fields (which the framing check allows) become one, as RFC 9110 §8.6
/// permits: the next recipient must not be left to read `3, 3` its own way.
fn push_content_length(out: &mut Vec<u8>, headers: &head::Headers) {
    if let Ok(Some(n)) = head::content_length(headers) {
        push_header(out, b"Content-Length", n.to_string().as_bytes());
    }
}

/// The message's Transfer-Encoding as one field listing its codings as the framing check
/// read them: `chunked` followed by an empty field, or `, chunked`, would leave the next
/// recipient to read the message's framing its own way.
fn push_transfer_encoding(out: &mut Vec<u8>, headers: &head::Headers) {
    let mut value = Vec::new();
    for coding in headers.tokens("transfer-encoding") {
        if !value.is_empty() {
            value.extend_from_slice(b", ");
        }
        value.extend_from_slice(coding);
    }
    if !value.is_empty() {
        push_header(out, b"Transfer-Encoding", &value);
    }
}

/// The `Max-Forwards` of an OPTIONS or TRACE request, the only methods it applies to
/// (RFC 9110 §7.6.2); `None` for other methods, or without one valid value. Anything
/// else (several fields, a list, more than 18 digits) is forwarded as it came: counting
/// it down would mean guessing what the sender meant.
fn max_forwards(head: &RequestHead) -> Option<u64> {
    let method = head.method();
    if method != "OPTIONS" && method != "TRACE" {
        return None;
    }
    let mut fields = head.headers.named("max-forwards");
    let v = fields.next()?.value;
    // One field of 1*DIGIT; 18 digits always fit.
    if fields.next().is_some() || v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The response as sent to the client.
fn client_response(resp: &ResponseHead, upgrade: bool, close: bool) -> Vec<u8> {
    client_response_head(resp, upgrade, close, false)
}

/// [`client_response`], and with `no_coding` for an HTTP/1.0 client, which knows no
/// transfer coding: no `Transfer-Encoding` (a chunked body then goes without its coding,
/// with no length, and the close ends it).
fn client_response_head(
    resp: &ResponseHead,
    upgrade: bool,
    close: bool,
    no_coding: bool,
) -> Vec<u8> {
    let tokens: Vec<&[u8]> = resp.headers.tokens("connection").collect();
    let chunked = resp.headers.named("transfer-encoding").next().is_some();
    // A 1xx or 204 has no body, and must not say it has one (RFC 9110 §8.6, RFC 9112
    // §6.1): a client that believed its length would read the next answer as this body.
    // A 304 and the answer to a HEAD keep theirs: they describe the representation.
    let bodiless = (100..200).contains(&resp.status) || resp.status == 204;
    let mut out = Vec::with_capacity(512);
    // The status is 100..=999 (checked by the parser): three digits.
    let status = [100, 10, 1].map(|d| b'0' + ((resp.status / d) % 10) as u8);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&status);
    out.push(b' ');
    out.extend_from_slice(one_line(resp.reason(), 200).as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let dropped =
            is_hop_by_hop(&h, &tokens) || h.is("content-length") || h.is("transfer-encoding");
        if !dropped {
            push_header(&mut out, h.name, h.value);
        }
    }
    // A recipient with a clock adds the Date an origin left out (RFC 9110 §6.6.1).
    if resp.status >= 200 && resp.headers.named("date").next().is_none() {
        push_header(&mut out, b"Date", http_date(SystemTime::now()).as_bytes());
    }
    // With Transfer-Encoding, Content-Length is wrong by definition (RFC 9112 §6.3).
    if !bodiless {
        if !chunked {
            push_content_length(&mut out, &resp.headers);
        } else if !no_coding {
            push_transfer_encoding(&mut out, &resp.headers);
        }
    }
    end_head(&mut out, &resp.headers, upgrade, close);
    out
}

/// `t` as an HTTP date (RFC 9110 §5.6.7, IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // The civil date of a day count (H. Hinnant's algorithm), in eras of 400 years.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rest / 3_600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Handles one request whose head has been read.
#[allow(clippy::too_many_arguments)]
async fn request<D, R, W>(
    head: RequestHead,
    cin: &mut Inbound<R>,
    cw: &mut W,
    upstream: &mut Option<Upstream<D::Stream>>,
    peer: SocketAddr,
    dialer: &D,
    cfg: &ProxyConfig,
) -> Result<Next>
where
    D: Dialer,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let method = head.method();
    let is_connect = method == "CONNECT";
    // RFC 9112 §3.2: a server must answer 400 to more than one Host field, CONNECT too,
    // and to an HTTP/1.1 request without one. A CONNECT without one is let through: some
    // clients send none, and its target says all there is to say.
    let hosts = head.headers.named("host").count();
    let host_problem = if hosts > 1 {
        Some("more than one Host field")
    } else if hosts == 0 && head.minor_version == 1 && !is_connect {
        Some("an HTTP/1.1 request without a Host field")
    } else {
        None
    };
    if let Some(problem) = host_problem {
        tracing::info!(%peer, %method, status = 400, problem, "bad Host field");
        answer(
            cw,
            400,
            &format!("fluidity proxy: {problem}"),
            true,
            &[],
            method == "HEAD",
        )
        .await?;
        return Ok(Next::Close);
    }
    let framing = if is_connect {
        Framing::Empty
    } else {
        match head::request_framing(&head) {
            Ok(f) => f,
            Err(why) => {
                tracing::info!(%peer, %method, status = 400, error = why, "bad request framing");
                answer(
                    cw,
                    400,
                    &format!("fluidity proxy: {why}"),
                    true,
                    &[],
                    method == "HEAD",
                )
                .await?;
                return Ok(Next::Close);
            }
        }
    };
    // An answer from the proxy keeps the connection only if no request body follows and
    // the client did not ask to close it.
    // Proxy-Connection is not standard, but clients that send it mean it. An HTTP/1.0
    // client's `Connection: keep-alive` is not honoured: RFC 9112 §9.3 lets only a
    // recipient that is not a proxy keep a 1.0 request's connection.
    let client_close = head.minor_version == 0
        || head.headers.has_token("connection", "close")
        || head.headers.has_token("proxy-connection", "close");
    // Bytes already behind a CONNECT are its tunnel's (a TLS hello sent early), not a
    // next request: after a refusal they could only be misread, so the connection ends.
    let tunnel_bytes = is_connect && !cin.buffered().is_empty();
    let keep = framing == Framing::Empty && !client_close && !tunnel_bytes;
    let next_after_answer = if keep { Next::KeepAlive } else { Next::Close };

    if let Some(creds) = &cfg.auth {
        let ok = head
            .headers
            .named("proxy-authorization")
            .any(|h| creds.matches_basic(h.value));
        if !ok {
            // The origin only: a URL's path and query can carry tokens. Credentials that
            // do not match are worth an info line; none at all is how browsers and curl
            // start every session (they send them once asked).
            let origin = head_origin(head.target());
            if head.headers.named("proxy-authorization").next().is_some() {
                tracing::info!(%peer, %method, %origin, status = 407,
                    "wrong proxy username or password");
            } else {
                tracing::debug!(%peer, %method, %origin, status = 407,
                    "proxy authentication required");
            }
            answer(
                cw,
                407,
                "fluidity proxy: authentication required; configure the proxy username and password",
                !keep,
                &[("Proxy-Authenticate", "Basic realm=\"fluidity\"")],
                method == "HEAD",
            )
            .await?;
            return Ok(next_after_answer);
        }
    }

    if is_connect {
        // The connection becomes a tunnel of its own: a stream kept for its next request
        // will not be used again, and the CONNECT may be waiting for its very room.
        *upstream = None;
        return connect(&head, cin, cw, peer, dialer, cfg).await;
    }

    let abs = match parse_absolute_target(head.target()) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(%peer, %method, target = %one_line(head.target(), 200), status = 400, error = %e, "not a proxy request");
            answer(
                cw,
                400,
                &format!("fluidity proxy: {e}"),
                true,
                &[],
                method == "HEAD",
            )
            .await?;
            return Ok(Next::Close);
        }
    };
    if max_forwards(&head) == Some(0) {
        // The request may go no further: the proxy answers as its final recipient (RFC
        // 9110 §7.6.2), one that takes OPTIONS and does not reflect requests for TRACE.
        let (status, line) = if method == "OPTIONS" {
            (
                200,
                "fluidity proxy: Max-Forwards is 0; answered by the proxy",
            )
        } else {
            (
                405,
                "fluidity proxy: Max-Forwards is 0, and the proxy does not answer TRACE",
            )
        };
        tracing::debug!(%peer, %method, status, "Max-Forwards 0 answered by the proxy");
        let allow = "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, PATCH";
        answer(
            cw,
            status,
            line,
            !keep,
            &[("Allow", allow)],
            method == "HEAD",
        )
        .await?;
        return Ok(next_after_answer);
    }
    let websocket = is_websocket(&head);
    let head_bytes = origin_request(&head, &abs, websocket, client_close);
    let ctx = Exchange {
        method,
        request: &head.headers,
        framing,
        websocket,
        client_close,
        client_minor: head.minor_version,
    };

    // One retry, only for an idempotent request without a body that failed before any
    // answer, on a reused stream (the origin most likely closed the idle connection just
    // then) or because the tunnel ended under it (its server gone, or its path dead past
    // the idle timeout) or its server stopped answering the tunnel's probe: a new tunnel
    // may well carry it. Anything else might have taken effect and must not be replayed
    // (RFC 9110 §9.2.2).
    let retryable = framing == Framing::Empty && is_idempotent(method);
    // Why the first attempt failed, when it is sent again.
    let mut first_failure = None;
    for attempt in 0..2 {
        // A stream kept for another origin is let go plainly while the new one opens,
        // unless the new one would wait for its room: then it is reset, as is one that is
        // no longer usable.
        let mut previous = None;
        if upstream.as_ref().is_some_and(|u| u.target != abs.target) {
            previous = upstream.take().filter(|_| dialer.has_room());
        } else if !still_usable(upstream) {
            *upstream = None;
        }
        if upstream.is_none() {
            let opened = while_releasing(previous.take(), dial(dialer, &abs.target, cfg, cin));
            match opened.await {
                Ok(Ok(s)) => *upstream = Some(Upstream::new(abs.target.clone(), s)),
                Err(left) => {
                    tracing::debug!(%peer, %method, target = %abs.target, how = left.0, "client gone before its stream opened");
                    return Ok(Next::Abort(format!("open of {}: {}", abs.target, left.0)));
                }
                Ok(Err(e)) => {
                    // The agent stopping is why the first attempt's tunnel closed: the
                    // request may have reached the origin, which "takes no new requests"
                    // would deny.
                    if let (DialError::Stopping, Some(first)) = (&e, first_failure.take()) {
                        return fail(first, cw, peer, method, &abs.target).await;
                    }
                    let (status, line) = dial_failure(&abs.target, &e, cfg);
                    tracing::info!(%peer, %method, target = %abs.target, status, error = %e, "open refused");
                    if e == DialError::Stopping {
                        answer(cw, status, &line, true, &[], method == "HEAD").await?;
                        return Ok(Next::Close);
                    }
                    answer(cw, status, &line, !keep, &[], method == "HEAD").await?;
                    return Ok(next_after_answer);
                }
            }
        }
        let Some(up) = upstream.as_mut() else {
            return Ok(Next::Close);
        };
        let reused = up.reused;
        up.reused = true;
        // A request that may go again does not wait for a tunnel whose server stopped
        // answering to time out: its answer's first bytes would have to come through it.
        up.stream.give_up_if_unresponsive(retryable && attempt == 0);
        let result = exchange(&ctx, &head_bytes, cin, cw, up).await;
        let outcome = match result {
            Err(ref e @ (ExchangeError::NoResponse(_) | ExchangeError::TunnelLost(_)))
                if retryable
                    && attempt == 0
                    && (reused || matches!(e, ExchangeError::TunnelLost(_))) =>
            {
                tracing::debug!(%peer, %method, target = %abs.target, error = %e, "sending the request again");
                *upstream = None;
                first_failure = result.err();
                continue;
            }
            Err(e) => {
                *upstream = None;
                return fail(e, cw, peer, method, &abs.target).await;
            }
            Ok(o) => o,
        };
        // Per-request lines are debug: at info, a busy browser would flood the terminal
        // and every request would pay for a formatted, unbuffered write to stderr.
        tracing::debug!(
            %peer, %method, target = %abs.target, status = outcome.status,
            up = outcome.up, down = outcome.down, "request"
        );
        match outcome.end {
            End::Upgraded => {
                let Some(mut up) = upstream.take() else {
                    return Ok(Next::Done);
                };
                let (mut uin, mut uw) = up.stream.halves();
                return Ok(match relay(cin, cw, &mut uin, &mut uw).await {
                    Ok((up, down)) => {
                        tracing::debug!(%peer, target = %abs.target, up, down, "websocket closed");
                        Next::Done
                    }
                    Err(e) => {
                        tracing::info!(%peer, target = %abs.target, error = %e, "websocket aborted");
                        Next::Abort(format!("websocket to {}: {e}", abs.target))
                    }
                });
            }
            End::Delimited {
                client_keep,
                upstream_keep,
            } => {
                // Kept for this client's next request, unless another client waits for a
                // stream (the tunnel is at the server's stream limit), or the origin sent
                // more than its answer (its next one could not be trusted, and what it
                // sent would hold received memory while the client is idle).
                let extra = upstream.as_ref().is_some_and(|u| u.stream.has_unread());
                if extra || dialer.room_wanted() {
                    *upstream = None;
                } else if !upstream_keep {
                    // Its origin closes it, or this client's close does: with a FIN, as the
                    // origin would see it directly, not a reset (see `release`).
                    if let Some(u) = upstream.as_mut() {
                        u.spent = true;
                    }
                }
                return Ok(if client_keep {
                    Next::KeepAlive
                } else {
                    Next::Close
                });
            }
            End::Aborted => {
                *upstream = None;
                return Ok(Next::Abort(format!(
                    "{} switched protocols before the request's body was sent",
                    abs.target
                )));
            }
        }
    }
    // Both attempts ended in `continue`, which the match above allows only once.
    *upstream = None;
    answer(
        cw,
        502,
        &format!(
            "fluidity: {} closed the connection without answering",
            abs.target
        ),
        true,
        &[],
        method == "HEAD",
    )
    .await?;
    Ok(Next::Close)
}

/// Lets go of a stream kept between messages: closes our side (a FIN, which the server
/// passes on as the end of the origin's connection) and waits for the origin's end, so
/// that the origin sees a plain close, not a reset, for a connection that was idle. An
/// origin that does not close within [`LAST_BYTES_TIME`] gets the reset.
async fn release<S>(upstream: Option<Upstream<S>>)
where
    S: AsyncWrite + ReadChunks + Unpin,
{
    let Some(mut up) = upstream else {
        return;
    };
    let (mut from, mut to) = up.stream.halves();
    let closing = async {
        if to.close().await.is_err() {
            return;
        }
        loop {
            let n = from.buffered().len();
            from.consume(n);
            if !matches!(from.fill().await, Ok(n) if n > 0) {
                return;
            }
        }
    };
    let _ = super::io::timeout(LAST_BYTES_TIME, pin!(closing)).await;
}

/// Runs `f`, releasing `old` (see [`release`]) while it runs; what is not released by
/// then is reset, so that the new request never waits for the old origin.
async fn while_releasing<S, F>(old: Option<Upstream<S>>, f: F) -> F::Output
where
    S: AsyncWrite + ReadChunks + Unpin,
    F: Future,
{
    while_releasing_unless(old, f, |_| false).await
}

/// [`while_releasing`], except that when `f`'s output is one after which nothing waits
/// (`release_all` says so: the client left), the release runs to its end.
async fn while_releasing_unless<S, F>(
    old: Option<Upstream<S>>,
    f: F,
    release_all: impl FnOnce(&F::Output) -> bool,
) -> F::Output
where
    S: AsyncWrite + ReadChunks + Unpin,
    F: Future,
{
    let mut releasing = pin!(release(old));
    let mut released = false;
    let mut f = pin!(f);
    let out = futures_lite::future::poll_fn(|cx| {
        if !released {
            released = releasing.as_mut().poll(cx).is_ready();
        }
        f.as_mut().poll(cx)
    })
    .await;
    if !released && release_all(&out) {
        releasing.await;
    }
    out
}

/// Whether a kept stream can take another request: the origin has sent nothing and not
/// closed it meanwhile, and its tunnel's server has not stopped answering (checked
/// without waiting; a stream is kept only with nothing left unread).
fn still_usable<S: ReadChunks>(upstream: &mut Option<Upstream<S>>) -> bool {
    let Some(up) = upstream else {
        return true;
    };
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    // Armed, the read fails if the server stopped answering: a new tunnel takes the
    // request rather than one that may never carry it.
    up.stream.give_up_if_unresponsive(true);
    // Data or EOF from an idle origin: either way its next answer cannot be trusted.
    up.stream.halves().0.poll_fill(&mut cx).is_pending()
}

async fn fail<W: AsyncWrite + Unpin>(
    e: ExchangeError,
    cw: &mut W,
    peer: SocketAddr,
    method: &str,
    target: &Target,
) -> Result<Next> {
    if let ExchangeError::ClientGone(how) = e {
        // Routine: a browser or a download tool cancelling what it no longer needs.
        tracing::debug!(%peer, %method, %target, how, "client gone before the exchange ended");
    } else {
        tracing::info!(%peer, %method, %target, error = %e, "request failed");
    }
    let line = match &e {
        ExchangeError::NoResponse(None) => {
            format!("fluidity: {target} closed the connection without answering")
        }
        // The server resets the stream when its connection to the origin fails: a reset
        // by the origin most often, a timeout or a lost route at times.
        ExchangeError::NoResponse(Some(_)) => {
            format!("fluidity: the connection to {target} broke off before it answered")
        }
        ExchangeError::TunnelLost(why) => format!(
            "fluidity: the tunnel to the server ended before {target} answered ({}){}",
            one_line(why, 300),
            if is_idempotent(method) {
                "; retry"
            } else {
                "; the request may have taken effect"
            }
        ),
        ExchangeError::BadResponse(why) => {
            format!("fluidity: {target} sent an invalid response ({why})")
        }
        ExchangeError::BadRequestBody(why) => {
            answer(
                cw,
                400,
                &format!("fluidity proxy: invalid request body: {why}"),
                true,
                &[],
                method == "HEAD",
            )
            .await?;
            return Ok(Next::Close);
        }
        ExchangeError::Aborted(why) => {
            return Ok(Next::Abort(format!("exchange with {target}: {why}")))
        }
        ExchangeError::ClientGone(how) => {
            return Ok(Next::Abort(format!("exchange with {target}: {how}")))
        }
        ExchangeError::CutShort => return Ok(Next::Close),
    };
    answer(cw, 502, &line, true, &[], method == "HEAD").await?;
    Ok(Next::Close)
}

/// [`ExchangeError::ClientGone`]: the client's connection failed or ended mid-request.
const LEFT: &str = "the client left before the exchange ended";

/// [`ExchangeError::ClientGone`]: the client closed its side after its request (as a
/// browser closing a tab does, or a script that half-closes) and no answer moved within
/// [`LAST_BYTES_TIME`].
const CLOSED_SIDE: &str =
    "the client closed its side of the connection, and the answer then stopped moving";

/// What a request needs to know while its response is relayed.
struct Exchange<'a> {
    method: &'a str,
    /// The request's fields; its `Connection` tokens name fields its trailers must not
    /// pass on either.
    request: &'a Headers,
    framing: Framing,
    websocket: bool,
    client_close: bool,
    client_minor: u8,
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    /// The origin closed the connection (`None`) or broke it off (`Some`, why) before any
    /// response; nothing was sent to the client.
    #[error("no response from the origin: {}", .0.as_deref().unwrap_or("closed"))]
    NoResponse(Option<String>),
    /// The tunnel ended (lost, or the server shut down), or its server stopped answering
    /// a request that may go again, before any response; nothing was sent to the client.
    #[error("no response: {0}")]
    TunnelLost(String),
    /// The origin's response head or framing is invalid; nothing was sent to the client.
    #[error("invalid response from the origin: {0}")]
    BadResponse(String),
    /// The client's body is invalid; nothing was sent to the client.
    #[error("invalid request body: {0}")]
    BadRequestBody(String),
    /// The client went away (a read or write on its connection failed, or it closed mid
    /// request), or closed its side and the answer stopped moving: nothing more reaches
    /// it. Browsers and download tools do this every day. The text says which.
    #[error("{0}")]
    ClientGone(&'static str),
    /// The exchange broke off after the response began (or the body stalled), on the
    /// origin's or the tunnel's side: the client connection must be dropped without an
    /// answer.
    #[error("{0}")]
    Aborted(String),
    /// The origin closed its connection in the middle of a response whose framing says
    /// where it ends: the client's connection is closed as plainly, and its framing tells
    /// the client the response is incomplete, as it would directly.
    #[error("the origin closed the connection before the end of its response")]
    CutShort,
}

#[derive(Debug)]
enum End {
    Delimited {
        client_keep: bool,
        upstream_keep: bool,
    },
    Upgraded,
    Aborted,
}

struct Outcome {
    status: u16,
    up: u64,
    down: u64,
    end: End,
}

/// Sends the request head and body while relaying the response(s); the two run at once so
/// that `Expect: 100-continue` and early answers (an origin refusing a large upload) work.
async fn exchange<S, R, W>(
    ctx: &Exchange<'_>,
    head_bytes: &[u8],
    cin: &mut Inbound<R>,
    cw: &mut W,
    up: &mut Upstream<S>,
) -> Result<Outcome, ExchangeError>
where
    S: AsyncWrite + ReadChunks + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Atomic only so that the future stays Send; all users run in this one task.
    let started = AtomicBool::new(false);
    // The request's body length once it has all been sent.
    let body_sent = AtomicU64::new(u64::MAX);
    // Bytes written to the client and to the origin so far, to tell what still moves.
    let (moved, body_moved) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut sent: Option<Result<u64, CopyError>> = None;
    // A complete answer that came before the whole request body: the body still goes to
    // the origin (it may read it, as it would from the client directly) while it moves.
    let mut answered: Option<Outcome> = None;
    // Bounds on waiting, each with the count whose progress moves it on (or none):
    // - the stream takes no more of the request (the server reset it): the answer gets a
    //   bounded time, since the client may be blocked sending the body we no longer read,
    //   and not read the answer until it has sent it;
    // - the client has closed its side: the answer gets as long as it keeps moving;
    // - the answer is complete and the body is not: the body, as long as it moves.
    let arm = |count| Some(IdleDeadline::new(LAST_BYTES_TIME, count));
    // Whether the client closed its side (then an answer that stops moving means it was
    // abandoned, as by a browser closing its tab).
    let mut client_closed = false;
    let stalled = |client_closed| {
        if client_closed {
            ExchangeError::ClientGone(CLOSED_SIDE)
        } else {
            ExchangeError::Aborted(format!(
                "the stream took no more of the request, and nothing moved for \
                 {LAST_BYTES_TIME:?}"
            ))
        }
    };
    let mut deadline: Option<IdleDeadline<'_>> = None;
    let (mut uin, mut uw) = up.stream.halves();
    let watch = &mut up.watch;
    let send_waker = &up.send_waker;
    send_waker.rewind();
    let result = {
        let mut send = pin!(async {
            let mut counted = Counted {
                w: &mut uw,
                n: &body_moved,
            };
            let n = send_request(head_bytes, ctx, cin, &mut counted).await?;
            body_sent.store(n, Ordering::Relaxed);
            // Then the client is watched: one that goes away abandons the request, and
            // must not leave its stream waiting for an origin that may never answer. Not
            // at once: most answers come sooner, and a watch costs each a read of the
            // client's socket bound to fail.
            let at = std::time::Instant::now() + WATCH_AFTER;
            futures_lite::future::poll_fn(|cx| watch.poll_until(cx, at)).await;
            watch_client(cin).await
        });
        let mut counted = Counted { w: cw, n: &moved };
        let mut recv = pin!(relay_response(
            ctx,
            &mut uin,
            &mut counted,
            &started,
            &body_sent
        ));
        futures_lite::future::poll_fn(|cx| {
            let body_done = || body_sent.load(Ordering::Relaxed) != u64::MAX;
            // Once the request is sent, a poll would be a read of the client's socket bound
            // to fail each time the answer moves: only when its own waker fired.
            if sent.is_none() {
                if let Some(Poll::Ready(r)) = send_waker.poll(cx, send.as_mut()) {
                    match &r {
                        // The answer is complete: however the body ended, so does this.
                        _ if answered.is_some() => {}
                        // It closed its side: it may still read (a half-close), so the
                        // answer gets its time.
                        Err(CopyError::Eof) if body_done() => {
                            client_closed = true;
                            deadline = arm(Some(&moved));
                        }
                        Err(CopyError::Read(_) | CopyError::Eof | CopyError::Chunked(_)) => {
                            sent = Some(r);
                            return Poll::Ready(None);
                        }
                        Err(CopyError::Write(_)) => deadline = arm(None),
                        Ok(_) => {}
                    }
                    sent = Some(r);
                }
            }
            if answered.is_some() && (body_done() || sent.is_some()) {
                return Poll::Ready(answered.take().map(Ok));
            }
            if answered.is_none() {
                match recv.as_mut().poll(cx) {
                    Poll::Ready(Ok(o))
                        if !body_done()
                            && sent.is_none()
                            && matches!(o.end, End::Delimited { .. }) =>
                    {
                        answered = Some(o);
                        deadline = arm(Some(&body_moved));
                    }
                    Poll::Ready(r) => return Poll::Ready(Some(r)),
                    Poll::Pending => {}
                }
            }
            if let Some(d) = deadline.as_mut() {
                if d.poll(cx).is_ready() {
                    // A complete answer stands; the body that stopped moving is dropped
                    // with the connection.
                    return Poll::Ready(Some(
                        answered.take().ok_or_else(|| stalled(client_closed)),
                    ));
                }
            }
            Poll::Pending
        })
        .await
    };
    // The body went out whole even when the client left after it.
    if matches!(sent, Some(Err(CopyError::Eof)) | None)
        && body_sent.load(Ordering::Relaxed) != u64::MAX
    {
        sent = Some(Ok(body_sent.load(Ordering::Relaxed)));
    }
    let up_bytes = match &sent {
        Some(Ok(n)) => *n,
        _ => 0,
    };
    let Some(result) = result else {
        // The client's body failed: answer if nothing was sent yet, else just drop.
        return Err(match sent {
            Some(Err(CopyError::Chunked(e))) if !started.load(Ordering::Relaxed) => {
                ExchangeError::BadRequestBody(e.to_string())
            }
            Some(Err(CopyError::Chunked(e))) => {
                ExchangeError::Aborted(format!("invalid request body: {e}"))
            }
            // Only the client's side ends the request this way (a read that failed or
            // ended early).
            _ => ExchangeError::ClientGone(LEFT),
        });
    };
    let mut outcome = result?;
    outcome.up = up_bytes;
    if let End::Delimited {
        client_keep,
        upstream_keep,
    } = &mut outcome.end
    {
        // The request body is not fully read (or not fully sent): neither connection is
        // at a message boundary.
        if !matches!(sent, Some(Ok(_))) {
            *client_keep = false;
            *upstream_keep = false;
        }
    }
    if matches!(outcome.end, End::Upgraded) && !matches!(sent, Some(Ok(_))) {
        outcome.end = End::Aborted;
    }
    Ok(outcome)
}

/// A writer that counts what it has written, to tell a response that still moves.
struct Counted<'a, W> {
    w: &'a mut W,
    n: &'a AtomicU64,
}

impl<W: AsyncWrite + Unpin> Counted<'_, W> {
    fn count(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            self.n.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.w).poll_write(cx, buf);
        self.count(r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.w).poll_write_vectored(cx, bufs);
        self.count(r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.w).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.w).poll_close(cx)
    }
}

async fn send_request<R, W>(
    head_bytes: &[u8],
    ctx: &Exchange<'_>,
    cin: &mut Inbound<R>,
    uw: &mut W,
) -> Result<u64, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match ctx.framing {
        Framing::Empty | Framing::UntilClose => {
            uw.write_all(head_bytes).await.map_err(CopyError::Write)?;
            uw.flush().await.map_err(CopyError::Write)?;
            Ok(0)
        }
        Framing::Length(n) => copy_exact(cin, uw, &mut head_bytes.to_vec(), n)
            .await
            .map(|()| n),
        Framing::Chunked => {
            // Collected only here: most requests have no chunked body.
            let tokens: Vec<&[u8]> = ctx.request.tokens("connection").collect();
            let keep = |h: &Header<'_>| keeps_trailer(h, &tokens);
            copy_chunked(cin, uw, &mut head_bytes.to_vec(), &keep).await
        }
    }
}

/// Relays the origin's answer: interim responses, then the final one. `body_sent` is
/// the request body's length once all of it has gone to the origin (`u64::MAX` before).
async fn relay_response<U, W>(
    ctx: &Exchange<'_>,
    uin: &mut U,
    cw: &mut W,
    started: &AtomicBool,
    body_sent: &AtomicU64,
) -> Result<Outcome, ExchangeError>
where
    U: Source,
    W: AsyncWrite + Unpin,
{
    let mut down = 0u64;
    loop {
        let resp = match read_head(uin, head::parse_response_head).await {
            Ok(Some(r)) => r,
            // No final answer yet (an interim one, as `100 Continue`, may have gone out: a
            // final one can still follow it, the proxy's own).
            Ok(None) => return Err(ExchangeError::NoResponse(None)),
            Err(ReadHeadError::Truncated) => {
                return Err(ExchangeError::BadResponse("response head cut short".into()))
            }
            // The stream's read fails this way only when the whole tunnel ended, or when
            // its server stopped answering and the read was armed to give up then.
            Err(ReadHeadError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                return Err(ExchangeError::TunnelLost(e.to_string()))
            }
            Err(ReadHeadError::Io(e)) => {
                return Err(ExchangeError::NoResponse(Some(e.to_string())))
            }
            Err(ReadHeadError::Head(e)) => return Err(ExchangeError::BadResponse(e.to_string())),
        };
        if resp.status == 101 {
            if !ctx.websocket {
                return Err(ExchangeError::BadResponse(
                    "101 Switching Protocols without an upgrade request".into(),
                ));
            }
            // RFC 9110 §15.2.2 and RFC 6455 §4.2.2: the switch names the protocol. An
            // answer that does not say websocket switched to something the client never
            // asked for, and relaying raw bytes after it would hand the client a stream it
            // cannot read.
            if !resp.headers.has_token("upgrade", "websocket") {
                return Err(ExchangeError::BadResponse(
                    "101 Switching Protocols without 'Upgrade: websocket'".into(),
                ));
            }
            let bytes = client_response(&resp, true, false);
            started.store(true, Ordering::Relaxed);
            cw.write_all(&bytes)
                .await
                .map_err(|_| ExchangeError::ClientGone(LEFT))?;
            cw.flush()
                .await
                .map_err(|_| ExchangeError::ClientGone(LEFT))?;
            return Ok(Outcome {
                status: 101,
                up: 0,
                down: down + bytes.len() as u64,
                end: End::Upgraded,
            });
        }
        if resp.status < 200 {
            // RFC 9110 §15.2: interim responses are not forwarded to HTTP/1.0 clients.
            if ctx.client_minor == 1 {
                let bytes = client_response(&resp, false, false);
                cw.write_all(&bytes)
                    .await
                    .map_err(|_| ExchangeError::ClientGone(LEFT))?;
                cw.flush()
                    .await
                    .map_err(|_| ExchangeError::ClientGone(LEFT))?;
                down += bytes.len() as u64;
            }
            continue;
        }
        let framing = head::response_framing(ctx.method, &resp)
            .map_err(|why| ExchangeError::BadResponse(why.into()))?;
        // An answer before the whole request body cannot promise the connection a next
        // message (RFC 9110 §9.3.1 asks the server to say whether it will close): the body
        // may yet fail or stop, and the client is told now.
        let early = body_sent.load(Ordering::Relaxed) == u64::MAX;
        let close = ctx.client_close || framing == Framing::UntilClose || early;
        // An origin that sent both Transfer-Encoding and Content-Length may frame its
        // next answer no better (RFC 9112 §6.3): its connection carries no other.
        let both_lengths = resp.headers.named("transfer-encoding").next().is_some()
            && resp.headers.named("content-length").next().is_some();
        let upstream_keep = !close
            && !both_lengths
            && resp.minor_version == 1
            && !resp.headers.has_token("connection", "close");
        // An HTTP/1.0 client knows no chunked coding: it gets the payload alone, ended by
        // the close (its request asked for the close anyway).
        let unchunk = framing == Framing::Chunked && ctx.client_minor == 0;
        // Taking the chunked coding off leaves any other (gzip, say), which nothing
        // could then name: the origin used one no request of ours asked for (TE is
        // not forwarded), and the HTTP/1.0 client gets an honest 502 instead.
        if unchunk && resp.headers.tokens("transfer-encoding").nth(1).is_some() {
            return Err(ExchangeError::BadResponse(
                "a transfer coding besides chunked, which an HTTP/1.0 client cannot take".into(),
            ));
        }
        // Read until the close with a transfer coding (gzip, say): the HTTP/1.0 client
        // could not undo it and would keep the coded bytes as the body.
        let coded = resp
            .headers
            .tokens("transfer-encoding")
            .any(|c| !c.eq_ignore_ascii_case(b"identity"));
        if ctx.client_minor == 0 && framing == Framing::UntilClose && coded {
            return Err(ExchangeError::BadResponse(
                "a transfer coding, which an HTTP/1.0 client cannot take".into(),
            ));
        }
        // No Transfer-Encoding ever goes to an HTTP/1.0 client (RFC 9112 §6.1), not even
        // on an answer without a body (HEAD, 304).
        let mut bytes = if unchunk || ctx.client_minor == 0 {
            client_response_head(&resp, false, close || unchunk, true)
        } else {
            client_response(&resp, false, close)
        };
        started.store(true, Ordering::Relaxed);
        down += bytes.len() as u64;
        // The head goes out with the body's first bytes where it can (one write).
        let body = match framing {
            Framing::Empty => copy_exact(uin, cw, &mut bytes, 0).await.map(|()| 0),
            Framing::Length(n) => copy_exact(uin, cw, &mut bytes, n).await.map(|()| n),
            Framing::Chunked if unchunk => copy_unchunked(uin, cw, &mut bytes).await,
            Framing::Chunked => {
                let tokens: Vec<&[u8]> = resp.headers.tokens("connection").collect();
                let keep = |h: &Header<'_>| keeps_trailer(h, &tokens);
                copy_chunked(uin, cw, &mut bytes, &keep).await
            }
            Framing::UntilClose => {
                cw.write_all(&bytes)
                    .await
                    .map_err(|_| ExchangeError::ClientGone(LEFT))?;
                super::io::pipe(uin, cw).await
            }
        };
        let body = match body {
            Ok(n) => n,
            // Nothing reached the client yet: it can still get an honest answer.
            Err(CopyError::Chunked(e)) if !bytes.is_empty() => {
                return Err(ExchangeError::BadResponse(format!(
                    "invalid chunked body: {e}"
                )))
            }
            Err(CopyError::Eof) => {
                // What the origin sent reaches the client, its head included.
                if !bytes.is_empty() {
                    let _ = cw.write_all(&bytes).await;
                }
                // Unchunked for an HTTP/1.0 client, the body ends where the connection
                // does: a plain close would pass for the whole response.
                if unchunk {
                    return Err(ExchangeError::Aborted(
                        "the origin closed the connection in the middle of a chunked \
                         response, which an HTTP/1.0 client gets delimited by the close"
                            .into(),
                    ));
                }
                return Err(ExchangeError::CutShort);
            }
            Err(CopyError::Write(_)) => return Err(ExchangeError::ClientGone(LEFT)),
            Err(e) => {
                return Err(ExchangeError::Aborted(format!(
                    "the response broke off: {e}"
                )))
            }
        };
        return Ok(Outcome {
            status: resp.status,
            up: 0,
            down: down + body,
            end: End::Delimited {
                client_keep: !close,
                upstream_keep,
            },
        });
    }
}

/// CONNECT: open the stream, answer 200, then relay raw bytes both ways.
async fn connect<D, R, W>(
    head: &RequestHead,
    cin: &mut Inbound<R>,
    cw: &mut W,
    peer: SocketAddr,
    dialer: &D,
    cfg: &ProxyConfig,
) -> Result<Next>
where
    D: Dialer,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(target) = Target::parse(head.target()).filter(|t| t.port != 0) else {
        let line = format!(
            "fluidity proxy: CONNECT needs host:port, got {:?}",
            one_line(head.target(), 200)
        );
        tracing::info!(%peer, method = "CONNECT", target = %one_line(head.target(), 200),
            status = 400, "bad CONNECT target: host:port needed");
        answer(cw, 400, &line, true, &[], false).await?;
        return Ok(Next::Close);
    };
    let stream = match dial(dialer, &target, cfg, cin).await {
        Ok(Ok(s)) => s,
        Err(left) => {
            tracing::debug!(%peer, method = "CONNECT", %target, how = left.0, "client gone before its stream opened");
            return Ok(Next::Abort(format!("CONNECT to {target}: {}", left.0)));
        }
        Ok(Err(e)) => {
            let (status, line) = dial_failure(&target, &e, cfg);
            tracing::info!(%peer, method = "CONNECT", %target, status, error = %e, "open refused");
            // The connection ends with the refusal: a client may have sent its first bytes
            // for the tunnel (a TLS hello) behind the request, and those are no request.
            answer(cw, status, &line, true, &[], false).await?;
            return Ok(Next::Close);
        }
    };
    let established = format!(
        "HTTP/1.1 200 Connection established\r\nDate: {}\r\n\r\n",
        http_date(SystemTime::now())
    );
    cw.write_all(established.as_bytes()).await?;
    cw.flush().await?;
    Ok(match relay_stream(cin, cw, stream).await {
        Ok((up, down)) => {
            tracing::debug!(%peer, method = "CONNECT", %target, status = 200, up, down, "tunnel closed");
            Next::Done
        }
        Err(e) => {
            if e.is_routine() {
                tracing::debug!(%peer, method = "CONNECT", %target, status = 200, error = %e, "tunnel aborted");
            } else {
                tracing::info!(%peer, method = "CONNECT", %target, status = 200, error = %e, "tunnel aborted");
            }
            Next::Abort(format!("CONNECT to {target}: {e}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Local mode's 403 names a rule; given to the server's default policy, that rule
    /// lets the request through (for an address embedding IPv4, both forms are judged).
    #[test]
    fn the_rule_a_local_403_gives_allows_the_target() {
        use fluidity_server::egress::{EgressPolicy, EgressRule};
        let cases = [
            ("10.1.2.3:80", None),
            ("[fd00::1]:80", None),
            ("[::ffff:10.1.2.3]:80", None),
            ("[64:ff9b::a01:203]:80", None),
            ("[2002:a01:203::1]:80", None),
            ("db.internal:80", Some("10.0.0.5".parse().unwrap())),
        ];
        for (target, resolved) in cases {
            let t = Target::parse(target).unwrap();
            let check = |policy: &EgressPolicy| match resolved {
                Some(ip) => policy.check_resolved(&t, ip),
                None => policy.check_target(&t),
            };
            let mut policy = EgressPolicy::default();
            let denied = check(&policy).expect_err(target).to_string();
            let advice = allow_advice(&t, true, &denied);
            let rule = advice
                .strip_prefix("`fluidity local --egress ")
                .and_then(|r| r.strip_suffix("` allows it"))
                .unwrap_or_else(|| panic!("{target}: {advice}"));
            policy.apply(rule.parse::<EgressRule>().unwrap());
            assert!(check(&policy).is_ok(), "{target}: {rule} did not allow it");
        }
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        let at =
            |secs: u64| http_date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(1_798_761_599), "Thu, 31 Dec 2026 23:59:59 GMT");
        assert_eq!(at(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
    }

    /// Trailer fields go on unless hop-by-hop (always, or named in the message's
    /// `Connection`) or framing fields, which mean nothing in a trailer.
    #[test]
    fn trailers_keep_only_end_to_end_fields() {
        let h = |name: &'static str| Header {
            name: name.as_bytes(),
            value: b"v",
        };
        let tokens: [&[u8]; 1] = [b"X-Secret"];
        for (name, kept) in [
            ("X-Checksum", true),
            ("Server-Timing", true),
            ("x-secret", false),
            ("Keep-Alive", false),
            ("Proxy-Status", false),
            ("Content-Length", false),
            ("Transfer-Encoding", false),
            ("Host", false),
        ] {
            assert_eq!(keeps_trailer(&h(name), &tokens), kept, "{name}");
        }
    }

    /// A standalone server's 403 points at the rule that would change the verdict: an
    /// allow rule for a default refusal, removing the deny rule for one of the server's
    /// deny rules (an allow cannot override it).
    #[test]
    fn a_servers_403_advises_what_can_change_it() {
        use fluidity_server::egress::{EgressPolicy, EgressRule};
        let t = Target::parse("127.0.0.1:8000").unwrap();
        let mut policy = EgressPolicy::default();
        let denied = policy.check_target(&t).expect_err("loopback").to_string();
        let advice = allow_advice(&t, false, &denied);
        assert!(advice.contains("allow_cidrs"), "{advice}");
        for rule in ["allow_cidrs=127.0.0.1/32", "deny_ports=8000-8100"] {
            policy.apply(rule.parse::<EgressRule>().unwrap());
        }
        let denied = policy
            .check_target(&t)
            .expect_err("denied port")
            .to_string();
        let advice = allow_advice(&t, false, &denied);
        assert!(
            advice.contains("deny rule must be removed") && !advice.contains("allow_cidrs"),
            "{denied}: {advice}"
        );
    }

    #[test]
    fn a_logged_target_keeps_its_origin_and_loses_its_path_and_query() {
        assert_eq!(
            head_origin("http://example.com:8080/p?access_token=SECRET"),
            "http://example.com:8080"
        );
        assert_eq!(
            head_origin("http://example.com?token=SECRET"),
            "http://example.com"
        );
        assert_eq!(head_origin("http://example.com#frag"), "http://example.com");
        assert_eq!(head_origin("example.com:443"), "example.com:443");
        assert_eq!(
            head_origin("/login?password=SECRET"),
            "(a path without a host)"
        );
    }

    /// The header names of a message head as the agent rewrote it, lowercased.
    fn names(head: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(head);
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_ascii_lowercase()))
            .collect()
    }

    const HOP_BY_HOP: &str = "Connection: keep-alive, X-Named, Content-Length, Host\r\n\
        Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
        Trailer: X-T\r\nUpgrade: h2c\r\nPROXY-Authorization: Basic Zm9vOmJhcg==\r\n\
        Proxy-Whatever: 1\r\nX-Named: dropped\r\nX-Kept: yes\r\n";

    #[test]
    fn requests_lose_hop_by_hop_and_proxy_fields_and_keep_the_rest() {
        let raw = format!(
            "POST http://example.com:8080/a?b HTTP/1.1\r\nHost: wrong.example\r\n\
             {HOP_BY_HOP}Content-Length: 3\r\n\r\n"
        );
        let (head, _) = head::parse_request_head(raw.as_bytes()).unwrap().unwrap();
        let abs = parse_absolute_target(head.target()).unwrap();
        let out = origin_request(&head, &abs, false, false);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("POST /a?b HTTP/1.1\r\nHost: example.com:8080\r\n"),
            "{text}"
        );
        // Named by Connection, but framing and Host are never dropped for that.
        assert_eq!(
            names(&out),
            ["host", "trailer", "x-kept", "content-length"],
            "{text}"
        );
    }

    #[test]
    fn an_options_request_for_a_bare_url_asks_the_server_as_a_whole() {
        let forwarded = |target: &str| {
            let raw = format!("OPTIONS {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            let (head, _) = head::parse_request_head(raw.as_bytes()).unwrap().unwrap();
            let abs = parse_absolute_target(head.target()).unwrap();
            let out = origin_request(&head, &abs, false, false);
            let text = String::from_utf8_lossy(&out).into_owned();
            text.lines().next().unwrap_or_default().to_owned()
        };
        assert_eq!(forwarded("http://a:8080"), "OPTIONS * HTTP/1.1");
        assert_eq!(forwarded("http://a/"), "OPTIONS / HTTP/1.1");
        assert_eq!(forwarded("http://a?x"), "OPTIONS /?x HTTP/1.1");
    }

    #[test]
    fn a_content_length_list_or_repeated_field_goes_on_as_one_value() {
        for fields in [
            "Content-Length: 3, 3\r\n",
            "Content-Length: 3\r\nContent-Length: 3\r\n",
        ] {
            let raw = format!("POST http://a/ HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let (head, _) = head::parse_request_head(raw.as_bytes()).unwrap().unwrap();
            let abs = parse_absolute_target(head.target()).unwrap();
            let out = String::from_utf8(origin_request(&head, &abs, false, false)).unwrap();
            assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
            assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out}");

            let raw = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
            let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
            let out = String::from_utf8(client_response(&head, false, false)).unwrap();
            assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
            assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out}");
        }
        // A 304 (or the answer to a HEAD) keeps the length of the body it does not carry.
        let raw = "HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n";
        let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
        let out = String::from_utf8(client_response(&head, false, false)).unwrap();
        assert!(out.contains("\r\nContent-Length: 42\r\n"), "{out}");
    }

    /// A 1xx or a 204 says nothing of a body it cannot have: a client believing a length
    /// there would read the next answer (perhaps another origin's) as this one's body.
    #[test]
    fn bodiless_answers_lose_their_length_fields() {
        for raw in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\nX-Kept: 1\r\nDate: x\r\n\r\n",
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\nDate: x\r\n\r\n",
            "HTTP/1.1 103 Early Hints\r\nContent-Length: 7\r\nX-Kept: 1\r\n\r\n",
        ] {
            let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
            let out = client_response(&head, false, false);
            let want: &[&str] = if head.status < 200 {
                &["x-kept"]
            } else {
                &["x-kept", "date"]
            };
            assert_eq!(names(&out), want, "{raw}");
        }
    }

    /// A final answer without a Date gets one (RFC 9110 §6.6.1), an interim one does
    /// not, and one with a Date keeps its own.
    #[test]
    fn a_missing_date_is_added_to_final_answers() {
        let date = |raw: &str| {
            let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
            let out = String::from_utf8(client_response(&head, false, false)).unwrap();
            let dates: Vec<String> = out
                .lines()
                .filter_map(|l| l.strip_prefix("Date: ").map(str::to_owned))
                .collect();
            dates
        };
        let added = date("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(added.len(), 1);
        assert!(
            added[0].ends_with(" GMT") && added[0].len() == 29,
            "{added:?}"
        );
        assert!(date("HTTP/1.1 100 Continue\r\n\r\n").is_empty());
        assert_eq!(
            date("HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"),
            ["Sun, 06 Nov 1994 08:49:37 GMT"]
        );
    }

    /// Transfer-Encoding goes on as one field of the codings the framing check read, in
    /// both directions: an empty second field or an empty list member could make the next
    /// recipient read no chunking where this proxy read some.
    #[test]
    fn transfer_encoding_goes_on_as_one_field_of_its_codings() {
        for fields in [
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n",
            "Transfer-Encoding: ,chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let want = if fields.contains("gzip") {
                "\r\nTransfer-Encoding: gzip, chunked\r\n"
            } else {
                "\r\nTransfer-Encoding: chunked\r\n"
            };
            let raw = format!("POST http://a/ HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let (head, _) = head::parse_request_head(raw.as_bytes()).unwrap().unwrap();
            assert_eq!(head::request_framing(&head), Ok(head::Framing::Chunked));
            let abs = parse_absolute_target(head.target()).unwrap();
            let out = String::from_utf8(origin_request(&head, &abs, false, false)).unwrap();
            assert_eq!(out.matches("Transfer-Encoding").count(), 1, "{out}");
            assert!(out.contains(want), "{out}");

            let raw = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
            let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
            let out = String::from_utf8(client_response(&head, false, false)).unwrap();
            assert_eq!(out.matches("Transfer-Encoding").count(), 1, "{out}");
            assert!(out.contains(want), "{out}");
            // An HTTP/1.0 client gets the payload alone: no coding named.
            let out = String::from_utf8(client_response_head(&head, false, true, true)).unwrap();
            assert!(!out.contains("Transfer-Encoding"), "{out}");
        }
    }

    #[test]
    fn max_forwards_is_counted_down_for_options_and_trace_only() {
        let forwarded = |method: &str, fields: &str| {
            let raw = format!("{method} http://a/ HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let (head, _) = head::parse_request_head(raw.as_bytes()).unwrap().unwrap();
            let abs = parse_absolute_target(head.target()).unwrap();
            (
                max_forwards(&head),
                String::from_utf8_lossy(&origin_request(&head, &abs, false, false)).into_owned(),
            )
        };
        let (n, out) = forwarded("OPTIONS", "Max-Forwards: 5\r\n");
        assert_eq!(n, Some(5));
        assert!(out.contains("Max-Forwards: 4\r\n"), "{out}");
        let (n, out) = forwarded("TRACE", "Max-Forwards: 1\r\n");
        assert_eq!(n, Some(1));
        assert!(out.contains("Max-Forwards: 0\r\n"), "{out}");
        assert_eq!(forwarded("OPTIONS", "Max-Forwards: 0\r\n").0, Some(0));
        // Other methods, and values that are not one number, pass unchanged.
        for (method, field) in [
            ("GET", "Max-Forwards: 5"),
            ("OPTIONS", "Max-Forwards: -1"),
            ("OPTIONS", "Max-Forwards: 1x"),
            ("OPTIONS", "Max-Forwards: 99999999999999999999"),
        ] {
            let (n, out) = forwarded(method, &format!("{field}\r\n"));
            assert_eq!(n, None, "{method} {field}");
            assert!(out.contains(&format!("{field}\r\n")), "{out}");
        }
    }

    #[test]
    fn responses_lose_hop_by_hop_fields_and_keep_the_rest() {
        let raw = format!("HTTP/1.1 200 OK\r\n{HOP_BY_HOP}Content-Length: 3\r\nDate: x\r\n\r\n");
        let (head, _) = head::parse_response_head(raw.as_bytes()).unwrap().unwrap();
        let out = client_response(&head, false, false);
        assert_eq!(names(&out), ["trailer", "x-kept", "date", "content-length"]);
        let out = client_response(&head, false, true);
        assert_eq!(
            names(&out),
            ["trailer", "x-kept", "date", "content-length", "connection"]
        );
    }

    /// A kept stream to the server's side of the tunnel, as `still_usable` sees it.
    #[derive(Default)]
    struct Kept {
        /// The tunnel's server has stopped answering its probe.
        unresponsive: bool,
        /// Armed by `give_up_if_unresponsive`.
        give_up: bool,
        /// Bytes the idle origin sent.
        sent: Option<bytes::Bytes>,
        /// The origin closed the connection.
        ended: bool,
    }

    impl ReadChunks for Kept {
        fn poll_read_chunks(
            &mut self,
            _: &mut Context<'_>,
            out: &mut Vec<bytes::Bytes>,
            _: usize,
        ) -> Poll<std::io::Result<usize>> {
            if let Some(b) = self.sent.take() {
                let n = b.len();
                out.push(b);
                return Poll::Ready(Ok(n));
            }
            if self.ended {
                return Poll::Ready(Ok(0));
            }
            if self.give_up && self.unresponsive {
                return Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
            }
            Poll::Pending
        }

        fn give_up_if_unresponsive(&mut self, on: bool) {
            self.give_up = on;
        }
    }

    /// A stream kept between requests carries the next one only while its origin has sent
    /// nothing and its tunnel's server still answers: the check arms the stream's give-up,
    /// so a tunnel found unresponsive sends the request to a new stream (and tunnel)
    /// rather than into one that may never carry its answer.
    #[test]
    fn a_kept_stream_is_reused_only_while_its_origin_is_quiet_and_its_tunnel_answers() {
        let target = Target::parse("example.com:80").unwrap();
        let usable = |kept: Kept| still_usable(&mut Some(Upstream::new(target.clone(), kept)));
        assert!(still_usable::<Kept>(&mut None));
        assert!(usable(Kept::default()));
        assert!(!usable(Kept {
            unresponsive: true,
            ..Kept::default()
        }));
        assert!(!usable(Kept {
            sent: Some(bytes::Bytes::from_static(
                b"HTTP/1.1 408 Request Timeout\r\n"
            )),
            ..Kept::default()
        }));
        assert!(!usable(Kept {
            ended: true,
            ..Kept::default()
        }));
    }
}
