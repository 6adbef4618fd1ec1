//! The frame codec: a 12-byte header and typed payloads.
//!
//! ```text
//!  0        1        2                 4                                 8                                12
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! |version |  type  |      flags      |             stream id             |           payload length          |
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! ```
//!
//! All integers are big-endian. The length always counts the payload bytes that follow,
//! whatever the type, so a reader can bound or skip any frame before understanding it.
//! `docs/PROTOCOL.md` is the full specification.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::handshake::{AuthFailure, AuthResult, Hello};
use crate::stream::target::{Host, OpenRefusal, RefusalReason, Target, MAX_DETAIL_LEN};
use crate::{Error, ErrorCode, Limits, StreamId};

/// Length of every frame header.
pub const HEADER_LEN: usize = 12;

/// The framing version written in every header.
pub const FRAMING_VERSION: u8 = 1;

/// Every implementation accepts frames of at least this payload length, so frames sent
/// before the peer's limits are known must not be longer.
pub const MIN_MAX_FRAME_LEN: u32 = 16 * 1024;

/// Longest authentication method name.
pub const MAX_AUTH_METHOD_LEN: usize = 64;

/// Longest principal name in an accepted auth result.
pub const MAX_PRINCIPAL_LEN: usize = 1024;

/// A frame type code. An open newtype so that unknown codes can be reported.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Version and limits; the first frame each side sends.
    pub const HELLO: FrameType = FrameType(0x0);
    /// Agent → server: authentication method and payload.
    pub const AUTH: FrameType = FrameType(0x1);
    /// Server → agent: authentication accepted or rejected.
    pub const AUTH_RESULT: FrameType = FrameType(0x2);
    /// Agent → server: open a stream to a target.
    pub const OPEN: FrameType = FrameType(0x3);
    /// Server → agent: the open succeeded or was refused.
    pub const OPEN_RESULT: FrameType = FrameType(0x4);
    /// Stream bytes; the FIN flag half-closes the sender's direction.
    pub const DATA: FrameType = FrameType(0x5);
    /// Credit for a stream, or for the connection on stream 0.
    pub const WINDOW_UPDATE: FrameType = FrameType(0x6);
    /// Abort a stream in both directions with a code.
    pub const RESET: FrameType = FrameType(0x7);
    /// Keepalive probe; with the ACK flag, its answer.
    pub const PING: FrameType = FrameType(0x8);
    /// No new streams; with an error code, the connection is closing.
    pub const GOAWAY: FrameType = FrameType(0x9);

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "HELLO",
            1 => "AUTH",
            2 => "AUTH_RESULT",
            3 => "OPEN",
            4 => "OPEN_RESULT",
            5 => "DATA",
            6 => "WINDOW_UPDATE",
            7 => "RESET",
            8 => "PING",
            9 => "GOAWAY",
            _ => return None,
        })
    }
}

impl fmt::Debug for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "FrameType({:#04x})", self.0),
        }
    }
}

/// Frame flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Flags(pub u16);

impl Flags {
    /// On DATA: the sender will send no more bytes on this stream.
    pub const FIN: Flags = Flags(0x1);
    /// On PING: this is the answer to a ping.
    pub const ACK: Flags = Flags(0x2);

    /// Whether all bits of `other` are set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// Frame type.
    pub ty: FrameType,
    /// Flags.
    pub flags: Flags,
    /// Stream id; 0 for frames about the connection.
    pub stream: StreamId,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Reads a header from the first [`HEADER_LEN`] bytes, checking the framing version.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, Error> {
        if b[0] != FRAMING_VERSION {
            return Err(Error::BadFramingVersion(b[0]));
        }
        Ok(Header {
            ty: FrameType(b[1]),
            flags: Flags(u16::from_be_bytes([b[2], b[3]])),
            stream: StreamId(u32::from_be_bytes([b[4], b[5], b[6], b[7]])),
            len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    /// Appends the header.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u8(FRAMING_VERSION);
        out.put_u8(self.ty.0);
        out.put_u16(self.flags.0);
        out.put_u32(self.stream.0);
        out.put_u32(self.len);
    }
}

/// A typed frame.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Frame {
    /// Version range and limits.
    Hello(Hello),
    /// Authentication method and opaque payload.
    Auth {
        /// Method name, 1..=64 bytes of visible ASCII (for example `none` or `aws-sts-v1`).
        method: String,
        /// Method-specific payload.
        payload: Bytes,
    },
    /// The server's answer to [`Frame::Auth`].
    AuthResult(AuthResult),
    /// Open `id` to `target`.
    Open {
        /// New stream id (odd, increasing).
        id: StreamId,
        /// Where the server should connect.
        target: Target,
    },
    /// The answer to an open.
    OpenResult {
        /// The stream.
        id: StreamId,
        /// Success or the refusal.
        result: Result<(), OpenRefusal>,
    },
    /// Stream bytes.
    Data {
        /// The stream.
        id: StreamId,
        /// The last bytes the sender will send on this stream.
        fin: bool,
        /// The bytes.
        payload: Bytes,
    },
    /// Credit.
    WindowUpdate {
        /// The stream, or 0 for the connection.
        id: StreamId,
        /// Bytes added to the window (never zero).
        increment: u32,
    },
    /// Abort a stream.
    Reset {
        /// The stream.
        id: StreamId,
        /// Why.
        code: ErrorCode,
    },
    /// Keepalive.
    Ping {
        /// Whether this answers a ping.
        ack: bool,
        /// Echoed back by the answer.
        opaque: u64,
    },
    /// No new streams after `last_stream`.
    GoAway {
        /// The highest stream id the sender has processed or will process.
        last_stream: StreamId,
        /// `NO_ERROR` for a graceful shutdown, otherwise why the connection closes.
        code: ErrorCode,
        /// Explanation for humans.
        detail: String,
    },
}

fn malformed(frame: FrameType, what: &'static str) -> Error {
    Error::Malformed { frame, what }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn utf8(frame: FrameType, b: Bytes, max: usize) -> Result<String, Error> {
    if b.len() > max {
        return Err(malformed(frame, "text too long"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| malformed(frame, "text is not UTF-8"))
}

impl Frame {
    /// The frame's type code.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Auth { .. } => FrameType::AUTH,
            Frame::AuthResult(_) => FrameType::AUTH_RESULT,
            Frame::Open { .. } => FrameType::OPEN,
            Frame::OpenResult { .. } => FrameType::OPEN_RESULT,
            Frame::Data { .. } => FrameType::DATA,
            Frame::WindowUpdate { .. } => FrameType::WINDOW_UPDATE,
            Frame::Reset { .. } => FrameType::RESET,
            Frame::Ping { .. } => FrameType::PING,
            Frame::GoAway { .. } => FrameType::GOAWAY,
        }
    }

    /// Appends the encoded frame (header and payload). Text fields longer than their limit
    /// are truncated at a character boundary, so encoding never fails.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        let mut body = BytesMut::new();
        let mut flags = Flags::default();
        let stream = match self {
            Frame::Hello(h) => {
                body.put_u8(h.min_version);
                body.put_u8(h.max_version);
                body.put_u16(0);
                body.put_u32(h.limits.max_frame_len);
                body.put_u32(h.limits.stream_window);
                body.put_u32(h.limits.connection_window);
                body.put_u32(h.limits.max_streams);
                StreamId::CONNECTION
            }
            Frame::Auth { method, payload } => {
                let m = truncate_utf8(method, MAX_AUTH_METHOD_LEN);
                body.put_u8(m.len() as u8);
                body.put_slice(m.as_bytes());
                body.put_slice(payload);
                StreamId::CONNECTION
            }
            Frame::AuthResult(AuthResult::Accepted {
                principal,
                lifetime_secs,
            }) => {
                let p = truncate_utf8(principal, MAX_PRINCIPAL_LEN);
                body.put_u8(0);
                body.put_u32(*lifetime_secs);
                body.put_u16(p.len() as u16);
                body.put_slice(p.as_bytes());
                StreamId::CONNECTION
            }
            Frame::AuthResult(AuthResult::Rejected { failure, detail }) => {
                body.put_u8(1);
                body.put_u16(failure.code());
                body.put_slice(truncate_utf8(detail, MAX_DETAIL_LEN).as_bytes());
                StreamId::CONNECTION
            }
            Frame::Open { id, target } => {
                body.put_u16(target.port);
                match &target.host {
                    Host::Name(n) => {
                        let n = truncate_utf8(n, crate::MAX_HOST_LEN);
                        body.put_u8(0);
                        body.put_u8(n.len() as u8);
                        body.put_slice(n.as_bytes());
                    }
                    Host::Ip(IpAddr::V4(a)) => {
                        body.put_u8(4);
                        body.put_slice(&a.octets());
                    }
                    Host::Ip(IpAddr::V6(a)) => {
                        body.put_u8(6);
                        body.put_slice(&a.octets());
                    }
                }
                *id
            }
            Frame::OpenResult { id, result } => {
                match result {
                    Ok(()) => body.put_u16(0),
                    Err(r) => {
                        // Code 0 means success on the wire; a refusal can never use it.
                        let code = match r.reason.code() {
                            0 => RefusalReason::Other.code(),
                            c => c,
                        };
                        body.put_u16(code);
                        body.put_slice(truncate_utf8(&r.detail, MAX_DETAIL_LEN).as_bytes());
                    }
                }
                *id
            }
            Frame::Data { id, fin, payload } => {
                if *fin {
                    flags = Flags::FIN;
                }
                Header {
                    ty: FrameType::DATA,
                    flags,
                    stream: *id,
                    len: payload.len() as u32,
                }
                .encode(out);
                out.put_slice(payload);
                return;
            }
            Frame::WindowUpdate { id, increment } => {
                body.put_u32(*increment);
                *id
            }
            Frame::Reset { id, code } => {
                body.put_u32(code.0);
                *id
            }
            Frame::Ping { ack, opaque } => {
                if *ack {
                    flags = Flags::ACK;
                }
                body.put_u64(*opaque);
                StreamId::CONNECTION
            }
            Frame::GoAway {
                last_stream,
                code,
                detail,
            } => {
                body.put_u32(last_stream.0);
                body.put_u32(code.0);
                body.put_slice(truncate_utf8(detail, MAX_DETAIL_LEN).as_bytes());
                StreamId::CONNECTION
            }
        };
        Header {
            ty: self.frame_type(),
            flags,
            stream,
            len: body.len() as u32,
        }
        .encode(out);
        out.put_slice(&body);
    }

    /// Parses a payload whose header has already been read and length-checked.
    pub fn decode(header: Header, mut p: Bytes) -> Result<Frame, Error> {
        let ty = header.ty;
        let on_connection = header.stream == StreamId::CONNECTION;
        let need = |p: &Bytes, n: usize| {
            if p.remaining() < n {
                Err(malformed(ty, "payload too short"))
            } else {
                Ok(())
            }
        };
        let frame = match ty {
            FrameType::HELLO => {
                if !on_connection {
                    return Err(malformed(ty, "must be on stream 0"));
                }
                need(&p, 20)?;
                let min_version = p.get_u8();
                let max_version = p.get_u8();
                let _reserved = p.get_u16();
                let limits = Limits {
                    max_frame_len: p.get_u32(),
                    stream_window: p.get_u32(),
                    connection_window: p.get_u32(),
                    max_streams: p.get_u32(),
                };
                // Trailing bytes are reserved for later versions and ignored.
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    limits,
                })
            }
            FrameType::AUTH => {
                if !on_connection {
                    return Err(malformed(ty, "must be on stream 0"));
                }
                need(&p, 1)?;
                let n = p.get_u8() as usize;
                if n == 0 || n > MAX_AUTH_METHOD_LEN {
                    return Err(malformed(ty, "method name length out of range"));
                }
                need(&p, n)?;
                let m = p.split_to(n);
                if !m.iter().all(|b| b.is_ascii_graphic()) {
                    return Err(malformed(ty, "method name is not visible ASCII"));
                }
                let method = utf8(ty, m, MAX_AUTH_METHOD_LEN)?;
                Frame::Auth { method, payload: p }
            }
            FrameType::AUTH_RESULT => {
                if !on_connection {
                    return Err(malformed(ty, "must be on stream 0"));
                }
                need(&p, 1)?;
                match p.get_u8() {
                    0 => {
                        need(&p, 6)?;
                        let lifetime_secs = p.get_u32();
                        let n = p.get_u16() as usize;
                        if p.remaining() != n {
                            return Err(malformed(ty, "principal length mismatch"));
                        }
                        let principal = utf8(ty, p, MAX_PRINCIPAL_LEN)?;
                        Frame::AuthResult(AuthResult::Accepted {
                            principal,
                            lifetime_secs,
                        })
                    }
                    1 => {
                        need(&p, 2)?;
                        let failure = AuthFailure::from_code(p.get_u16());
                        let detail = utf8(ty, p, MAX_DETAIL_LEN)?;
                        Frame::AuthResult(AuthResult::Rejected { failure, detail })
                    }
                    _ => return Err(malformed(ty, "unknown status")),
                }
            }
            FrameType::OPEN => {
                if on_connection {
                    return Err(malformed(ty, "must be on a stream"));
                }
                need(&p, 3)?;
                let port = p.get_u16();
                let host = match p.get_u8() {
                    0 => {
                        need(&p, 1)?;
                        let n = p.get_u8() as usize;
                        if p.remaining() != n {
                            return Err(malformed(ty, "host name length mismatch"));
                        }
                        let name = utf8(ty, p.split_to(n), crate::MAX_HOST_LEN)?;
                        match Host::name(&name) {
                            Some(h) if h == Host::Name(name.clone()) => h,
                            _ => return Err(malformed(ty, "invalid host name")),
                        }
                    }
                    4 => {
                        if p.remaining() != 4 {
                            return Err(malformed(ty, "bad IPv4 length"));
                        }
                        let mut o = [0u8; 4];
                        p.copy_to_slice(&mut o);
                        Host::Ip(IpAddr::V4(Ipv4Addr::from(o)))
                    }
                    6 => {
                        if p.remaining() != 16 {
                            return Err(malformed(ty, "bad IPv6 length"));
                        }
                        let mut o = [0u8; 16];
                        p.copy_to_slice(&mut o);
                        Host::Ip(IpAddr::V6(Ipv6Addr::from(o)))
                    }
                    _ => return Err(malformed(ty, "unknown host kind")),
                };
                Frame::Open {
                    id: header.stream,
                    target: Target { host, port },
                }
            }
            FrameType::OPEN_RESULT => {
                if on_connection {
                    return Err(malformed(ty, "must be on a stream"));
                }
                need(&p, 2)?;
                let code = p.get_u16();
                let result = if code == 0 {
                    if p.has_remaining() {
                        return Err(malformed(ty, "success carries no detail"));
                    }
                    Ok(())
                } else {
                    Err(OpenRefusal {
                        reason: RefusalReason::from_code(code),
                        detail: utf8(ty, p, MAX_DETAIL_LEN)?,
                    })
                };
                Frame::OpenResult {
                    id: header.stream,
                    result,
                }
            }
            FrameType::DATA => {
                if on_connection {
                    return Err(malformed(ty, "must be on a stream"));
                }
                Frame::Data {
                    id: header.stream,
                    fin: header.flags.contains(Flags::FIN),
                    payload: p,
                }
            }
            FrameType::WINDOW_UPDATE => {
                if p.remaining() != 4 {
                    return Err(malformed(ty, "payload must be 4 bytes"));
                }
                let increment = p.get_u32();
                if increment == 0 {
                    return Err(malformed(ty, "zero increment"));
                }
                Frame::WindowUpdate {
                    id: header.stream,
                    increment,
                }
            }
            FrameType::RESET => {
                if on_connection {
                    return Err(malformed(ty, "must be on a stream"));
                }
                if p.remaining() != 4 {
                    return Err(malformed(ty, "payload must be 4 bytes"));
                }
                Frame::Reset {
                    id: header.stream,
                    code: ErrorCode(p.get_u32()),
                }
            }
            FrameType::PING => {
                if !on_connection {
                    return Err(malformed(ty, "must be on stream 0"));
                }
                if p.remaining() != 8 {
                    return Err(malformed(ty, "payload must be 8 bytes"));
                }
                Frame::Ping {
                    ack: header.flags.contains(Flags::ACK),
                    opaque: p.get_u64(),
                }
            }
            FrameType::GOAWAY => {
                if !on_connection {
                    return Err(malformed(ty, "must be on stream 0"));
                }
                need(&p, 8)?;
                let last_stream = StreamId(p.get_u32());
                let code = ErrorCode(p.get_u32());
                let detail = utf8(ty, p, MAX_DETAIL_LEN)?;
                Frame::GoAway {
                    last_stream,
                    code,
                    detail,
                }
            }
            FrameType(other) => return Err(Error::UnknownFrameType(other)),
        };
        Ok(frame)
    }
}

/// Incremental frame decoder with a payload limit checked before any buffering.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: u32,
    header: Option<Header>,
}

impl Decoder {
    /// A decoder that refuses payloads longer than `max_payload` bytes.
    pub fn new(max_payload: u32) -> Decoder {
        Decoder {
            max_payload,
            header: None,
        }
    }

    /// Whether no frame is part-way through: a header taken off the input waits for its
    /// payload otherwise, and the input alone no longer shows it.
    pub fn is_idle(&self) -> bool {
        self.header.is_none()
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` when more bytes are needed. After
    /// an error the input is unusable (the stream of frames has lost its framing).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        self.decode_inner(buf, true)
    }

    /// Like [`decode`](Self::decode), but never reserves room in `buf` for a partial
    /// payload: for callers that make room themselves (when `buf` shares its allocation
    /// with payloads already taken, reserving would allocate and copy the partial frame).
    pub(crate) fn decode_shared(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        self.decode_inner(buf, false)
    }

    /// How many bytes beyond the `buffered` ones the next step needs: the rest of the
    /// header, or of the payload once the header is decoded.
    pub(crate) fn missing(&self, buffered: usize) -> usize {
        self.header
            .map_or(HEADER_LEN, |h| h.len as usize)
            .saturating_sub(buffered)
    }

    fn decode_inner(&mut self, buf: &mut BytesMut, reserve: bool) -> Result<Option<Frame>, Error> {
        let header = match self.header {
            Some(h) => h,
            None => {
                let Some(raw) = buf.get(..HEADER_LEN) else {
                    return Ok(None);
                };
                let mut arr = [0u8; HEADER_LEN];
                arr.copy_from_slice(raw);
                let h = Header::decode(&arr)?;
                if h.len > self.max_payload {
                    return Err(Error::FrameTooLarge {
                        len: h.len,
                        max: self.max_payload,
                    });
                }
                buf.advance(HEADER_LEN);
                self.header = Some(h);
                h
            }
        };
        let len = header.len as usize;
        if buf.len() < len {
            if reserve {
                // Bounded: `len` was checked against the limit above.
                buf.reserve(len - buf.len());
            }
            return Ok(None);
        }
        self.header = None;
        let payload = buf.split_to(len).freeze();
        Frame::decode(header, payload).map(Some)
    }
}

/// Appends a DATA header for `len` payload bytes that the caller appends next.
pub(crate) fn encode_data_header<B: BufMut>(out: &mut B, id: StreamId, fin: bool, len: usize) {
    Header {
        ty: FrameType::DATA,
        flags: if fin { Flags::FIN } else { Flags::default() },
        stream: id,
        len: len as u32,
    }
    .encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_text(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..8)
            .prop_map(move |v| truncate_utf8(&v.into_iter().collect::<String>(), max).to_owned())
    }

    fn arb_target() -> impl Strategy<Value = Target> {
        let host = prop_oneof![
            "[a-z0-9.-]{1,40}".prop_map(Host::Name),
            any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(o.into()))),
            any::<[u8; 16]>().prop_map(|o| Host::Ip(IpAddr::V6(o.into()))),
        ];
        (host, any::<u16>()).prop_map(|(host, port)| Target { host, port })
    }

    fn arb_id() -> impl Strategy<Value = StreamId> {
        (1u32..).prop_map(StreamId)
    }

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u8>(), any::<u8>(), any::<[u32; 4]>()).prop_map(|(a, b, l)| Frame::Hello(
                Hello {
                    min_version: a,
                    max_version: b,
                    limits: Limits {
                        max_frame_len: l[0],
                        stream_window: l[1],
                        connection_window: l[2],
                        max_streams: l[3],
                    }
                }
            )),
            (
                "[a-z0-9-]{1,64}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(method, p)| Frame::Auth {
                    method,
                    payload: p.into()
                }),
            (arb_text(64), any::<u32>()).prop_map(|(principal, lifetime_secs)| {
                Frame::AuthResult(AuthResult::Accepted {
                    principal,
                    lifetime_secs,
                })
            }),
            (1u16.., arb_text(64)).prop_map(|(c, detail)| Frame::AuthResult(
                AuthResult::Rejected {
                    failure: AuthFailure::from_code(c),
                    detail
                }
            )),
            (arb_id(), arb_target()).prop_map(|(id, target)| Frame::Open { id, target }),
            (arb_id(), proptest::option::of((1u16.., arb_text(64)))).prop_map(|(id, r)| {
                Frame::OpenResult {
                    id,
                    result: match r {
                        None => Ok(()),
                        Some((c, detail)) => Err(OpenRefusal {
                            reason: RefusalReason::from_code(c),
                            detail,
                        }),
                    },
                }
            }),
            (
                arb_id(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(id, fin, p)| Frame::Data {
                    id,
                    fin,
                    payload: p.into()
                }),
            (any::<u32>(), 1u32..).prop_map(|(id, increment)| Frame::WindowUpdate {
                id: StreamId(id),
                increment
            }),
            (arb_id(), any::<u32>()).prop_map(|(id, c)| Frame::Reset {
                id,
                code: ErrorCode(c)
            }),
            (any::<bool>(), any::<u64>()).prop_map(|(ack, opaque)| Frame::Ping { ack, opaque }),
            (any::<u32>(), any::<u32>(), arb_text(64)).prop_map(|(l, c, detail)| {
                Frame::GoAway {
                    last_stream: StreamId(l),
                    code: ErrorCode(c),
                    detail,
                }
            }),
        ]
    }

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<Frame>, Error> {
        let mut d = Decoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(f) = d.decode(&mut buf)? {
                out.push(f);
            }
        }
        assert!(buf.is_empty(), "leftover bytes");
        Ok(out)
    }

    proptest! {
        #[test]
        fn encode_decode_identity(f in arb_frame()) {
            let mut out = Vec::new();
            f.encode(&mut out);
            let header = Header::decode(out[..HEADER_LEN].try_into().unwrap()).unwrap();
            prop_assert_eq!(header.len as usize, out.len() - HEADER_LEN);
            prop_assert_eq!(decode_all(&[&out]).unwrap(), vec![f]);
        }

        #[test]
        fn any_split_gives_same_frames(
            frames in proptest::collection::vec(arb_frame(), 1..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut wire = Vec::new();
            for f in &frames { f.encode(&mut wire); }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points { chunks.push(&wire[last..p]); last = p; }
            chunks.push(&wire[last..]);
            prop_assert_eq!(decode_all(&chunks).unwrap(), frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::new(1024);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }

    #[test]
    fn oversize_frame_is_refused_before_buffering() {
        let mut d = Decoder::new(MIN_MAX_FRAME_LEN);
        let mut buf = BytesMut::new();
        Header {
            ty: FrameType::DATA,
            flags: Flags::default(),
            stream: StreamId(1),
            len: u32::MAX,
        }
        .encode(&mut buf);
        let err = d.decode(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FRAME_SIZE);
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn rejects_bad_version_unknown_type_and_misplaced_frames() {
        let mut buf = BytesMut::from(&[2u8, 5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            Decoder::new(100).decode(&mut buf),
            Err(Error::BadFramingVersion(2))
        );
        let mut buf = BytesMut::from(&[1u8, 0x42, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            Decoder::new(100).decode(&mut buf),
            Err(Error::UnknownFrameType(0x42))
        );
        // DATA on stream 0.
        let mut buf = BytesMut::from(&[1u8, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            Decoder::new(100).decode(&mut buf),
            Err(Error::Malformed { .. })
        ));
        // WINDOW_UPDATE of zero.
        let mut buf = BytesMut::from(&[1u8, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0][..]);
        assert!(matches!(
            Decoder::new(100).decode(&mut buf),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn refusal_with_code_zero_is_sent_as_other() {
        let f = Frame::OpenResult {
            id: StreamId(1),
            result: Err(OpenRefusal::new(RefusalReason::Unknown(0), "x")),
        };
        let mut out = Vec::new();
        f.encode(&mut out);
        let back = decode_all(&[&out]).unwrap();
        assert!(matches!(
            &back[0],
            Frame::OpenResult { result: Err(r), .. } if r.reason == RefusalReason::Other
        ));
    }
}
