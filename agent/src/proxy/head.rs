//! Sans-IO HTTP/1.1 head parsing for the forward proxy: request and response heads with
//! explicit size limits, message framing (RFC 9112 §6), and absolute-form targets.

use fluidity_proto::{Host, Target};
use std::fmt::Write as _;

/// Largest request or response head accepted, request line and headers included.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Most header fields accepted in a request head.
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Most header fields accepted in a response head (origins send many `Set-Cookie`s).
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// One header field of a parsed head, borrowed from it; the value is bytes because HTTP
/// allows obs-text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Field name as sent (compare case-insensitively); a token, so ASCII.
    pub name: &'a [u8],
    /// Field value without surrounding whitespace.
    pub value: &'a [u8],
}

impl Header<'_> {
    /// Whether this field is called `name` (ASCII case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// A parser result that does not point into the parsed bytes (not seen with httparse
/// 1.10; refused rather than trusted).
const PARSER_OUTPUT: HeadError = HeadError::Malformed("unexpected parser output");

/// Where one piece of a head lies in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The span of `part` within `whole`, for the slices the parser returns. An empty
    /// `part` is the empty span (the parser may return a constant `""`, as for a missing
    /// reason phrase); `None` if a non-empty `part` does not lie within `whole`.
    fn of(whole: &[u8], part: &[u8]) -> Option<Span> {
        if part.is_empty() {
            return Some(Span::default());
        }
        let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
        let end = start.checked_add(part.len())?;
        if end > whole.len() {
            return None;
        }
        // Heads are at most MAX_HEAD_LEN bytes, so offsets fit in u32.
        Some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    fn get(self, bytes: &[u8]) -> &[u8] {
        bytes
            .get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }

    fn get_str(self, bytes: &[u8]) -> &str {
        std::str::from_utf8(self.get(bytes)).unwrap_or_default()
    }
}

/// The bytes of one head as received and where its fields lie in them: two allocations
/// per head whatever its number of fields (one per field name and value would be most of
/// the agent's allocations per request).
#[derive(Clone, PartialEq, Eq)]
pub struct Headers {
    bytes: Box<[u8]>,
    /// Name and value of each field, in order.
    fields: Vec<(Span, Span)>,
}

impl Headers {
    /// Copies a head (`bytes`, its whole text) and the positions of the fields the
    /// parser found in it.
    fn new(bytes: &[u8], parsed: &[httparse::Header<'_>]) -> Result<Headers, HeadError> {
        // Sized up front: collecting through `Option` would grow the vector step by step.
        let mut fields = Vec::with_capacity(parsed.len());
        for h in parsed {
            fields.push((
                Span::of(bytes, h.name.as_bytes()).ok_or(PARSER_OUTPUT)?,
                Span::of(bytes, h.value).ok_or(PARSER_OUTPUT)?,
            ));
        }
        Ok(Headers {
            bytes: bytes.into(),
            fields,
        })
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = Header<'_>> + '_ {
        self.fields.iter().map(|&(name, value)| Header {
            name: name.get(&self.bytes),
            value: value.get(&self.bytes),
        })
    }

    /// The fields called `name` (ASCII case-insensitive), in order.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Header<'a>> + 'a {
        self.iter().filter(move |h| h.is(name))
    }

    /// Comma-separated tokens of every field called `name`, trimmed, empty ones left out.
    pub fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.named(name)
            .flat_map(|h| h.value.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
    }

    /// Whether a field called `name` lists `token` (both ASCII case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.tokens(name)
            .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    }

    fn span_str(&self, span: Span) -> &str {
        span.get_str(&self.bytes)
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|h| {
                (
                    String::from_utf8_lossy(h.name),
                    String::from_utf8_lossy(h.value),
                )
            }))
            .finish()
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    method: Span,
    target: Span,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Header fields in order (and the head's bytes, which the spans above point into).
    pub headers: Headers,
}

impl RequestHead {
    /// Method token, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.headers.span_str(self.method)
    }

    /// Request target exactly as sent.
    pub fn target(&self) -> &str {
        self.headers.span_str(self.target)
    }
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Status code.
    pub status: u16,
    reason: Span,
    /// Header fields in order (and the head's bytes).
    pub headers: Headers,
}

impl ResponseHead {
    /// Reason phrase (may be empty).
    pub fn reason(&self) -> &str {
        self.headers.span_str(self.reason)
    }
}

/// Why a head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// The head is longer than [`MAX_HEAD_LEN`].
    TooLarge,
    /// The head has more header fields than allowed.
    TooManyHeaders,
    /// The head is not valid HTTP/1.x; the text says what is wrong.
    Malformed(&'static str),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::TooLarge => write!(f, "head larger than {MAX_HEAD_LEN} bytes"),
            HeadError::TooManyHeaders => f.write_str("too many header fields"),
            HeadError::Malformed(why) => f.write_str(why),
        }
    }
}

/// Number of bytes of leading empty lines (`\r\n` or `\n`) that RFC 9112 §2.2 lets a
/// recipient skip before a start line. Callers drop them before parsing so that a stream
/// of empty lines cannot make them parse the same bytes again and again.
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        if buf[i..].starts_with(b"\r\n") {
            i += 2;
        } else if buf[i..].starts_with(b"\n") {
            i += 1;
        } else {
            return i;
        }
    }
}

fn map_err(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status line"),
        httparse::Error::Token => HeadError::Malformed("invalid method or token"),
        httparse::Error::Version => HeadError::Malformed("unsupported HTTP version"),
    }
}

/// Parses a request head at the start of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((head, len)))` gives the head and its length in bytes.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    // Uninitialised: filling the whole array on every attempt would cost more than
    // parsing a typical head.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut headers,
    );
    let Some(len) = complete_len(parsed, buf)? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let bytes = &buf[..len];
    let (Some(method), Some(target)) = (
        Span::of(bytes, method.as_bytes()),
        Span::of(bytes, target.as_bytes()),
    ) else {
        return Err(PARSER_OUTPUT);
    };
    Ok(Some((
        RequestHead {
            method,
            target,
            minor_version,
            headers: Headers::new(bytes, req.headers)?,
        },
        len,
    )))
}

/// Parses a response head at the start of `buf`, like [`parse_request_head`].
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    // A proxy must take whitespace between a response field's name and its colon out
    // rather than fail the response (RFC 9112 §5.1); the rebuilt head has none.
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .parse_response_with_uninit_headers(&mut resp, buf, &mut headers);
    let Some(len) = complete_len(parsed, buf)? else {
        return Ok(None);
    };
    let (Some(minor_version), Some(status)) = (resp.version, resp.code) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(HeadError::Malformed("invalid status code"));
    }
    let bytes = &buf[..len];
    let reason = Span::of(bytes, resp.reason.unwrap_or("").as_bytes()).ok_or(PARSER_OUTPUT)?;
    Ok(Some((
        ResponseHead {
            minor_version,
            status,
            reason,
            headers: Headers::new(bytes, resp.headers)?,
        },
        len,
    )))
}

/// The length of a complete head, `None` while more bytes are needed, with the size
/// limit applied to both (`buffered` is how many bytes the parser was given).
fn complete_len(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, HeadError> {
    let buffered = buf.len();
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_LEN => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > MAX_HEAD_LEN => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::HeaderName) if folded(buf) => Err(HeadError::Malformed(
            "obsolete line folding (a header line that starts with a space or tab)",
        )),
        Err(e) => Err(map_err(e)),
    }
}

/// Whether the first line of `buf` after the start line that is not a plain field
/// (`name:value`) starts with a space or a tab: obsolete line folding (RFC 9112 §5.2),
/// refused with its own reason. Only lines up to that one are read, which the parser had
/// to read too before it failed, so the answer does not depend on how much of the message
/// has arrived.
fn folded(buf: &[u8]) -> bool {
    let is_token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let is_field = |line: &[u8]| {
        line.iter()
            .position(|&b| b == b':')
            .is_some_and(|colon| colon > 0 && line[..colon].iter().all(is_token))
    };
    buf.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        // Empty lines before the start line are allowed; the start line is not a field.
        .skip_while(|l| l.is_empty())
        .skip(1)
        .find(|line| !is_field(line))
        .is_some_and(|line| matches!(line.first(), Some(b' ' | b'\t')))
}

/// How the body of a message is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, ending with the last chunk and trailer section.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// The one Content-Length value of a message, if it has one. Repeated identical values
/// are one value (RFC 9110 §8.6); anything else is an error, since two recipients could
/// disagree on where the message ends.
pub(crate) fn content_length(headers: &Headers) -> Result<Option<u64>, &'static str> {
    let mut found: Option<u64> = None;
    for h in headers.named("content-length") {
        for part in h.value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(prev) if prev != n => return Err("conflicting Content-Length values"),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// `Some(true)` if the message has Transfer-Encoding with chunked last, `Some(false)` if it
/// has Transfer-Encoding without that, `None` if it has none. Chunked anywhere but last is
/// an error (RFC 9112 §6.1).
fn transfer_chunked(headers: &Headers) -> Result<Option<bool>, &'static str> {
    let mut chunked_count = 0;
    let mut chunked_last = false;
    let mut any = false;
    for coding in headers.tokens("transfer-encoding") {
        any = true;
        chunked_last = coding.eq_ignore_ascii_case(b"chunked");
        chunked_count += usize::from(chunked_last);
    }
    if !any {
        return Ok(headers.named("transfer-encoding").next().map(|_| false));
    }
    if chunked_count > 1 || (chunked_count == 1 && !chunked_last) {
        return Err("chunked must be the last transfer coding, applied once");
    }
    Ok(Some(chunked_last))
}

/// Whether chunked is among the transfer codings more than once (RFC 9112 §6.1 forbids
/// it).
fn chunked_twice(headers: &Headers) -> bool {
    headers
        .tokens("transfer-encoding")
        .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
        .nth(1)
        .is_some()
}

/// Framing of a request body (RFC 9112 §6.3, rules 4-7 for requests). Transfer-Encoding
/// together with Content-Length is refused: it is the classic request smuggling vector.
pub fn request_framing(head: &RequestHead) -> Result<Framing, &'static str> {
    let te = transfer_chunked(&head.headers)?;
    let cl = content_length(&head.headers)?;
    match (te, cl) {
        (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length"),
        (Some(_), None) if head.minor_version == 0 => {
            Err("Transfer-Encoding in an HTTP/1.0 request")
        }
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err("a request's last transfer coding must be chunked"),
        (None, Some(0)) | (None, None) => Ok(Framing::Empty),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// Framing of a response body to a request with `method` (RFC 9112 §6.3). Methods are
/// case-sensitive (RFC 9110 §9.1): the origin answers `head` as a method of its own.
pub fn response_framing(method: &str, head: &ResponseHead) -> Result<Framing, &'static str> {
    if method == "HEAD"
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        return Ok(Framing::Empty);
    }
    // HTTP/1.0 knows no transfer coding: a message that names one has faulty framing
    // (RFC 9112 §6.1).
    if head.minor_version == 0 && head.headers.named("transfer-encoding").next().is_some() {
        return Err("Transfer-Encoding in an HTTP/1.0 response");
    }
    match transfer_chunked(&head.headers) {
        Ok(Some(true)) => return Ok(Framing::Chunked),
        Ok(Some(false)) => return Ok(Framing::UntilClose),
        // A response whose last coding is not chunked is read until the close (RFC 9112
        // §6.3 rule 4), chunked inside it or not; chunked applied twice stays an error.
        Err(_) if !chunked_twice(&head.headers) => return Ok(Framing::UntilClose),
        Err(e) => return Err(e),
        Ok(None) => {}
    }
    match content_length(&head.headers)? {
        Some(0) => Ok(Framing::Empty),
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::UntilClose),
    }
}

/// An absolute-form request target split into what the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteTarget {
    /// Where to open the stream.
    pub target: Target,
    /// The `Host` value for the origin: host, plus `:port` when not the default.
    pub authority: String,
    /// Origin-form path and query, never empty (at least `/`).
    pub path: String,
    /// Whether the URL had neither path nor query (`http://host[:port]`): an `OPTIONS`
    /// for it asks about the server as a whole, `OPTIONS *` (RFC 9112 §3.2.4).
    pub bare: bool,
}

/// Why a request target cannot be proxied; the text is shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// The request was meant for a server, not a proxy (`GET /path`).
    OriginForm,
    /// `https://` and `wss://` must use CONNECT; other schemes are not HTTP.
    Scheme(String),
    /// Host or port is not valid.
    Authority,
    /// The URL carries a user name or password (`http://user@host/`).
    UserInfo,
}

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetError::OriginForm => f.write_str(
                "this is the fluidity forward proxy, not a web server: configure it as your \
                 HTTP proxy so that requests carry an absolute URL (http://host/path)",
            ),
            TargetError::Scheme(s) if s == "https" || s == "wss" => write!(
                f,
                "{s}:// URLs go through the proxy with CONNECT; configure the proxy for HTTPS too"
            ),
            TargetError::Scheme(s) => write!(f, "the {s}:// scheme cannot be proxied; use http://"),
            TargetError::Authority => f.write_str("the URL has no valid host and port"),
            TargetError::UserInfo => f.write_str(
                "the URL carries a user name or password (user@host), which HTTP does not send \
                 to the origin; remove it, and send credentials in a header if the site needs them",
            ),
        }
    }
}

/// Parses an absolute-form request target (`http://host[:port]/path?query`).
pub fn parse_absolute_target(s: &str) -> Result<AbsoluteTarget, TargetError> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(TargetError::OriginForm);
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("ws") {
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(TargetError::OriginForm);
        }
        return Err(TargetError::Scheme(scheme.to_ascii_lowercase()));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    // Credentials in the URL would be dropped on the way to the origin; refuse them openly.
    if authority.contains('@') {
        return Err(TargetError::UserInfo);
    }
    if authority.is_empty() {
        return Err(TargetError::Authority);
    }
    let (host, port) = if let Some(v6_end) = authority.strip_prefix('[').and_then(|a| a.find(']')) {
        let host = &authority[..v6_end + 2];
        (host, &authority[v6_end + 2..])
    } else {
        match authority.find(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        }
    };
    let port = match port {
        "" | ":" => 80,
        p => match p
            .strip_prefix(':')
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
        {
            Some(p) if p != 0 => p,
            _ => return Err(TargetError::Authority),
        },
    };
    let host = Host::parse(host).ok_or(TargetError::Authority)?;
    // One allocation of about the right size: formatting into a new string would grow it
    // step by step, on every request.
    let mut host_field = String::with_capacity(authority.len() + 8);
    let _ = write!(host_field, "{host}");
    if port != 80 {
        let _ = write!(host_field, ":{port}");
    }
    let tail = tail.split('#').next().unwrap_or("");
    let path = if tail.is_empty() {
        "/".to_owned()
    } else if tail.starts_with('?') {
        format!("/{tail}")
    } else {
        tail.to_owned()
    };
    Ok(AbsoluteTarget {
        target: Target::new(host, port),
        authority: host_field,
        path,
        bare: tail.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> RequestHead {
        parse_request_head(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn parses_request_and_reports_length() {
        let raw = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\nBODY";
        let (head, len) = parse_request_head(raw).unwrap().unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "http://a.example/x");
        assert_eq!(&raw[len..], b"BODY");
        assert_eq!(parse_request_head(&raw[..20]).unwrap(), None);
    }

    #[test]
    fn fields_and_tokens_read_back_as_sent() {
        let raw = b"HTTP/1.1 200 Fine Thanks\r\nX-A: 1\r\nConnection: Keep-Alive ,, X-A\r\n\
            x-empty:\r\nconnection: close\r\n\r\nBODY";
        let (head, len) = parse_response_head(raw).unwrap().unwrap();
        assert_eq!(&raw[len..], b"BODY");
        assert_eq!(head.reason(), "Fine Thanks");
        let fields: Vec<(&[u8], &[u8])> = head.headers.iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(
            fields,
            [
                (&b"X-A"[..], &b"1"[..]),
                (b"Connection", b"Keep-Alive ,, X-A"),
                (b"x-empty", b""),
                (b"connection", b"close"),
            ]
        );
        let tokens: Vec<&[u8]> = head.headers.tokens("CONNECTION").collect();
        assert_eq!(tokens, [&b"Keep-Alive"[..], b"X-A", b"close"]);
        assert!(head.headers.has_token("connection", "keep-alive"));
        assert!(head.headers.has_token("connection", "CLOSE"));
        assert!(!head.headers.has_token("x-a", "2"));
        assert_eq!(head.headers.named("x-a").count(), 1);
        // The head owns its bytes: the buffer it came from can be reused.
        let copy = head.clone();
        drop(head);
        assert_eq!(copy.reason(), "Fine Thanks");
        assert!(format!("{copy:?}").contains("\"x-empty\""));
    }

    #[test]
    fn spans_point_into_the_head_or_are_refused() {
        let head = b"GET http://a/ HTTP/1.1\r\n\r\n";
        let span = Span::of(head, &head[4..12]).unwrap();
        assert_eq!(span.get(head), b"http://a");
        assert_eq!(Span::of(head, b""), Some(Span::default()));
        assert_eq!(Span::of(head, b"elsewhere"), None);
        assert_eq!(Span::of(&head[4..], &head[..3]), None);
        assert_eq!(Span::of(&head[..8], &head[4..12]), None);
    }

    #[test]
    fn a_response_field_with_space_before_its_colon_is_taken_and_folding_is_named() {
        let (head, _) = parse_response_head(b"HTTP/1.1 200 OK\r\nX-Bad : v\r\nA: b\r\n\r\n")
            .unwrap()
            .unwrap();
        let fields: Vec<_> = head.headers.iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(fields, [(&b"X-Bad"[..], &b"v"[..]), (b"A", b"b")]);
        let folded = parse_response_head(b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\n\r\n");
        assert!(
            matches!(folded, Err(HeadError::Malformed(why)) if why.contains("line folding")),
            "{folded:?}"
        );
        let folded = parse_request_head(b"GET http://a/ HTTP/1.1\r\nX-A: one\r\n\ttwo\r\n\r\n");
        assert!(
            matches!(folded, Err(HeadError::Malformed(why)) if why.contains("line folding")),
            "{folded:?}"
        );
        // A request still may not put space before a colon (RFC 9112 §5.1: rejected).
        assert!(parse_request_head(b"GET http://a/ HTTP/1.1\r\nX-Bad : v\r\n\r\n").is_err());
    }

    #[test]
    fn limits_head_size_and_header_count() {
        let mut big = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_LEN + 10, b'a');
        assert_eq!(parse_request_head(&big), Err(HeadError::TooLarge));
        let mut many = "GET http://a/ HTTP/1.1\r\n".to_owned();
        for i in 0..=MAX_REQUEST_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            parse_request_head(many.as_bytes()),
            Err(HeadError::TooManyHeaders)
        );
        assert!(matches!(
            parse_request_head(b"GARBAGE\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn request_framing_rules() {
        assert_eq!(
            request_framing(&req("GET http://a/ HTTP/1.1\r\n\r\n")),
            Ok(Framing::Empty)
        );
        assert_eq!(
            request_framing(&req(
                "POST http://a/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"
            )),
            Ok(Framing::Length(5))
        );
        assert!(request_framing(&req(
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        ))
        .is_err());
        assert_eq!(
            request_framing(&req(
                "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
            )),
            Ok(Framing::Chunked)
        );
        assert!(request_framing(&req(
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        ))
        .is_err());
        assert!(request_framing(&req(
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
        ))
        .is_err());
        assert!(request_framing(&req(
            "POST http://a/ HTTP/1.1\r\nContent-Length: +5\r\n\r\n"
        ))
        .is_err());
    }

    #[test]
    fn response_framing_rules() {
        let resp = |raw: &str| parse_response_head(raw.as_bytes()).unwrap().unwrap().0;
        let r200 = resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(response_framing("GET", &r200), Ok(Framing::Length(10)));
        assert_eq!(response_framing("HEAD", &r200), Ok(Framing::Empty));
        assert_eq!(
            response_framing(
                "GET",
                &resp("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n")
            ),
            Ok(Framing::Empty)
        );
        assert_eq!(
            response_framing("GET", &resp("HTTP/1.1 304 Not Modified\r\n\r\n")),
            Ok(Framing::Empty)
        );
        assert_eq!(
            response_framing("GET", &resp("HTTP/1.1 200 OK\r\n\r\n")),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(
                "GET",
                &resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
            ),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            response_framing(
                "GET",
                &resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
            ),
            Ok(Framing::UntilClose)
        );
        // Chunked not last: read until the close (RFC 9112 §6.3 rule 4), as a request
        // is not; chunked twice stays an error.
        let inside = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n");
        assert_eq!(response_framing("GET", &inside), Ok(Framing::UntilClose));
        let twice = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n");
        assert!(response_framing("GET", &twice).is_err());
        let old = resp("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(response_framing("GET", &old).is_err());
    }

    #[test]
    fn absolute_targets() {
        let t = parse_absolute_target("http://Example.COM/a?b#frag").unwrap();
        assert_eq!(t.target.to_string(), "example.com:80");
        assert_eq!(t.authority, "example.com");
        assert_eq!(t.path, "/a?b");
        let t = parse_absolute_target("http://[::1]:8080?q").unwrap();
        assert_eq!(t.target.to_string(), "[::1]:8080");
        assert_eq!(t.authority, "[::1]:8080");
        assert_eq!(t.path, "/?q");
        let t = parse_absolute_target("HTTP://10.0.0.1:").unwrap();
        assert_eq!(t.target.port, 80);
        assert_eq!(t.path, "/");
        assert!(t.bare);
        assert!(!parse_absolute_target("http://a/").unwrap().bare);
        assert!(!parse_absolute_target("http://a?q").unwrap().bare);
        assert_eq!(
            parse_absolute_target("/health"),
            Err(TargetError::OriginForm)
        );
        assert_eq!(parse_absolute_target("*"), Err(TargetError::OriginForm));
        assert_eq!(
            parse_absolute_target("https://a/"),
            Err(TargetError::Scheme("https".into()))
        );
        assert_eq!(
            parse_absolute_target("http://u:p@a/"),
            Err(TargetError::UserInfo)
        );
        assert_eq!(
            parse_absolute_target("http://a:0/"),
            Err(TargetError::Authority)
        );
        assert_eq!(
            parse_absolute_target("http://a:99999/"),
            Err(TargetError::Authority)
        );
        assert_eq!(
            parse_absolute_target("http:///x"),
            Err(TargetError::Authority)
        );
        assert_eq!(
            parse_absolute_target("http://a:+80/"),
            Err(TargetError::Authority)
        );
    }
}
