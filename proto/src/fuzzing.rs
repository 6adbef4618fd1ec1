//! Entry points for fuzzing this crate's readers of network input: the frame decoder, the
//! frame codec, and the [`Connection`] state machine on either side and as a connected
//! pair. Each takes raw fuzzer bytes and must never panic, whatever they are; the
//! assertions inside are the protocol's own invariants, so a failing one is a bug.
//!
//! Not a stable API: it exists for the `fuzz/` targets and for the tests that replay the
//! checked-in corpus (`fuzz/corpus/<target>/`), which call the same functions.

#![cfg(feature = "arbitrary")]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::frame::{HEADER_LEN, MAX_AUTH_METHOD_LEN, MAX_PRINCIPAL_LEN, MIN_MAX_FRAME_LEN};
use crate::handshake::Hello;
use crate::{
    AuthFailure, AuthResult, Config, Connection, Credentials, Decoder, Error, ErrorCode, Event,
    Frame, Host, Limits, OpenRefusal, RefusalReason, Side, StreamEvent, StreamId, Target,
    MAX_DETAIL_LEN,
};

/// Operations per fuzz input, so that one input stays fast whatever its size.
const MAX_OPS: usize = 400;

// ----- frame decoding -----

/// Feeds `data` into a [`Decoder`] whole and again in pieces, and checks that both give
/// the same frames and the same error, and that every decoded frame re-encodes to bytes
/// that decode to the same frame.
///
/// The first byte picks the decoder's payload limit, the second seeds the piece sizes;
/// the rest is the wire.
pub fn frame_decode(data: &[u8]) {
    let (max_sel, seed, wire) = match data {
        [a, b, rest @ ..] => (*a, *b, rest),
        _ => return,
    };
    let max_payload = [0, 8, 20, MIN_MAX_FRAME_LEN, 64 * 1024, u32::MAX][usize::from(max_sel) % 6];
    let whole = decode_pieces(max_payload, &[wire]);
    let mut pieces = Vec::new();
    let mut rest = wire;
    let mut state = u32::from(seed) | 1;
    while !rest.is_empty() {
        // A small LCG: piece sizes from 1 to 32 bytes, different for every seed.
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 32 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    let split = decode_pieces(max_payload, &pieces);
    assert_eq!(
        whole, split,
        "splitting the input changed the decoded frames"
    );
    for frame in &whole.0 {
        let mut wire = Vec::new();
        frame.encode(&mut wire);
        let again = decode_pieces(u32::MAX, &[&wire]);
        assert_eq!(
            again,
            (vec![frame.clone()], None, 0),
            "a decoded frame did not survive re-encoding"
        );
    }
}

/// Decodes `pieces` in turn until the first error: the frames, the error, and how many
/// bytes were left over.
fn decode_pieces(max_payload: u32, pieces: &[&[u8]]) -> (Vec<Frame>, Option<Error>, usize) {
    let mut decoder = Decoder::new(max_payload);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => {
                    if let Frame::Data { payload, .. } = &f {
                        assert!(payload.len() as u64 <= u64::from(max_payload));
                    }
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e), 0),
            }
        }
    }
    let left = buf.len();
    (frames, None, left)
}

// ----- frame round trip -----

/// Builds a sequence of well-formed frames from `data`, encodes them, decodes the bytes
/// split at arbitrary points, and checks that exactly the same frames come back.
pub fn frame_round_trip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut frames = Vec::new();
    while !u.is_empty() && frames.len() < 64 {
        match arb_frame(&mut u, &[]) {
            Ok(f) => frames.push(f),
            Err(_) => break,
        }
    }
    let mut wire = Vec::new();
    for f in &frames {
        let before = wire.len();
        f.encode(&mut wire);
        let len = u32::from_be_bytes([
            wire[before + 8],
            wire[before + 9],
            wire[before + 10],
            wire[before + 11],
        ]);
        assert_eq!(
            len as usize,
            wire.len() - before - HEADER_LEN,
            "length field is wrong"
        );
    }
    let mut cuts: Vec<usize> = Vec::new();
    while let Ok(true) = u.arbitrary::<bool>() {
        match u.int_in_range(0..=wire.len()) {
            Ok(c) => cuts.push(c),
            Err(_) => break,
        }
    }
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut last = 0;
    for c in cuts {
        pieces.push(&wire[last..c]);
        last = c;
    }
    pieces.push(&wire[last..]);
    let (decoded, err, left) = decode_pieces(u32::MAX, &pieces);
    assert_eq!(err, None, "a well-formed frame was refused");
    assert_eq!(left, 0, "bytes left over");
    assert_eq!(decoded, frames, "frames changed on the wire");
}

/// A string of at most `max` bytes (cut at a character boundary).
fn arb_text(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let mut s: String = u.arbitrary()?;
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    Ok(s)
}

/// 1..=`max` characters from `alphabet`.
fn arb_word(u: &mut Unstructured<'_>, alphabet: &[u8], max: usize) -> Result<String> {
    let n = u.int_in_range(1..=max)?;
    let mut s = String::with_capacity(n);
    for _ in 0..n {
        s.push(char::from(*u.choose(alphabet)?));
    }
    Ok(s)
}

const HOST_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789.-_~!$&'()*+,;=%";
const METHOD_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!#";

/// A target as the codec carries it: lower-case names or addresses.
fn arb_target(u: &mut Unstructured<'_>) -> Result<Target> {
    let host = match u.int_in_range(0..=2)? {
        0 => Host::Name(arb_word(u, HOST_CHARS, 64)?),
        1 => Host::Ip(IpAddr::V4(u.arbitrary::<[u8; 4]>()?.into())),
        _ => Host::Ip(IpAddr::V6(u.arbitrary::<[u8; 16]>()?.into())),
    };
    Ok(Target::new(host, u.arbitrary()?))
}

/// A stream id: one of `known` when there are some (so that frames hit live streams),
/// a small odd id, or any non-zero id.
fn arb_id(u: &mut Unstructured<'_>, known: &[StreamId]) -> Result<StreamId> {
    Ok(match u.int_in_range(0..=3)? {
        0 | 1 if !known.is_empty() => *u.choose(known)?,
        0 | 1 => StreamId(u.int_in_range(0..=7)? * 2 + 1),
        2 => StreamId(u.int_in_range(0..=7)? * 2 + 1),
        _ => StreamId(u.int_in_range(1..=u32::MAX)?),
    })
}

/// Limits that are mostly acceptable to a peer, sometimes anything.
fn arb_limits(u: &mut Unstructured<'_>) -> Result<Limits> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Limits::default(),
        1 => Limits {
            max_frame_len: *u.choose(&[MIN_MAX_FRAME_LEN, 64 * 1024, u32::MAX])?,
            stream_window: *u.choose(&[1, 7, 1000, 256 * 1024, crate::MAX_WINDOW])?,
            connection_window: *u.choose(&[1, 100, 4096, 4 * 1024 * 1024, crate::MAX_WINDOW])?,
            max_streams: *u.choose(&[0, 1, 2, 256])?,
        },
        2 => u.arbitrary::<Limits>()?.sanitized(),
        _ => u.arbitrary()?,
    })
}

/// A well-formed frame: one that the decoder must give back exactly. Stream ids come from
/// `known` some of the time.
fn arb_frame(u: &mut Unstructured<'_>, known: &[StreamId]) -> Result<Frame> {
    Ok(match u.int_in_range(0..=10)? {
        0 => Frame::Hello(Hello {
            min_version: if u.ratio(1, 8)? { u.arbitrary()? } else { 1 },
            max_version: if u.ratio(1, 8)? { u.arbitrary()? } else { 1 },
            limits: arb_limits(u)?,
        }),
        1 => Frame::Auth {
            method: if u.arbitrary()? {
                "none".to_owned()
            } else {
                arb_word(u, METHOD_CHARS, MAX_AUTH_METHOD_LEN)?
            },
            payload: Bytes::from(u.arbitrary::<Vec<u8>>()?),
        },
        2 => Frame::AuthResult(AuthResult::Accepted {
            principal: arb_text(u, MAX_PRINCIPAL_LEN)?,
            lifetime_secs: u.arbitrary()?,
        }),
        3 => Frame::AuthResult(AuthResult::Rejected {
            failure: AuthFailure::from_code(u.arbitrary()?),
            detail: arb_text(u, MAX_DETAIL_LEN)?,
        }),
        4 => Frame::Open {
            id: arb_id(u, known)?,
            target: arb_target(u)?,
        },
        5 => Frame::OpenResult {
            id: arb_id(u, known)?,
            result: if u.arbitrary()? {
                Ok(())
            } else {
                Err(OpenRefusal {
                    reason: RefusalReason::from_code(u.int_in_range(1..=u16::MAX)?),
                    detail: arb_text(u, MAX_DETAIL_LEN)?,
                })
            },
        },
        6 | 7 => Frame::Data {
            id: arb_id(u, known)?,
            fin: u.arbitrary()?,
            payload: Bytes::from(u.arbitrary::<Vec<u8>>()?),
        },
        8 => Frame::WindowUpdate {
            id: if u.arbitrary()? {
                StreamId::CONNECTION
            } else {
                arb_id(u, known)?
            },
            increment: *u.choose(&[1, 100, 65536, crate::MAX_WINDOW, u32::MAX])?,
        },
        9 => Frame::Reset {
            id: arb_id(u, known)?,
            code: ErrorCode(u.int_in_range(0..=12)?),
        },
        _ => {
            if u.arbitrary()? {
                Frame::Ping {
                    ack: u.arbitrary()?,
                    opaque: u.int_in_range(0..=3)?,
                }
            } else {
                Frame::GoAway {
                    last_stream: StreamId(u.arbitrary()?),
                    code: ErrorCode(u.int_in_range(0..=12)?),
                    detail: arb_text(u, MAX_DETAIL_LEN)?,
                }
            }
        }
    })
}

// ----- one connection fed by a fuzzed peer -----

/// A configuration with small or default limits and timers, chosen by the fuzzer.
/// `max_control_backlog` and `transmit_batch` are never 0: the connection would then
/// never read or never send stream data, by configuration rather than by input.
fn arb_config(u: &mut Unstructured<'_>) -> Result<Config> {
    Ok(Config {
        limits: arb_limits(u)?,
        handshake_timeout: Duration::from_millis(*u.choose(&[0, 500, 30_000])?),
        keepalive_interval: Duration::from_millis(*u.choose(&[10, 1000, 5000])?),
        idle_timeout: Duration::from_millis(*u.choose(&[100, 3000, 15_000])?),
        require_auth: u.arbitrary()?,
        data_frame_len: *u.choose(&[16 * 1024, 0, 1, 5])?,
        max_control_backlog: *u.choose(&[256 * 1024, 1, 64])?,
        transmit_batch: *u.choose(&[256 * 1024, 1, 100])?,
        send_buffer: *u.choose(&[256 * 1024, 0, 100])?,
        max_stream_window: *u.choose(&[4 * 1024 * 1024, 0, 1000, crate::MAX_WINDOW])?,
        window_growth_budget: *u.choose(&[32 * 1024 * 1024, 0, 5000, u64::MAX])?,
        // Last, so that the inputs of the corpus keep choosing what they chose before.
        probe_timeout: Duration::from_millis(*u.choose(&[5000, 0, 50])?),
    })
}

/// Checks everything a connection transmits: our own output must always be well-formed
/// and within the peer's limits.
struct OutputCheck {
    decoder: Decoder,
    buf: BytesMut,
}

impl OutputCheck {
    fn new() -> Self {
        OutputCheck {
            decoder: Decoder::new(u32::MAX),
            buf: BytesMut::new(),
        }
    }

    /// Drains `conn`'s transmit queue and checks the frames; returns the bytes.
    fn drain(&mut self, conn: &mut Connection, now: Instant, cfg: &Config) -> Vec<u8> {
        let mut out = Vec::new();
        // Until it has nothing more: one call may emit as little as one byte of data
        // (`transmit_batch`), and a pair must drain completely for the final check.
        // Alternating with the zero-copy transmit, whose chunks must add up to the same
        // well-formed frames.
        for i in 0..1_000_000 {
            let n = if i % 2 == 1 {
                let mut chunks = Vec::new();
                let n = conn.poll_transmit_chunks(now, &mut chunks);
                let before = out.len();
                for c in &chunks {
                    out.extend_from_slice(c);
                }
                assert_eq!(n, out.len() - before, "chunks and their count disagree");
                n
            } else {
                conn.poll_transmit(now, &mut out)
            };
            if n == 0 {
                break;
            }
        }
        self.buf.extend_from_slice(&out);
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(Frame::Data { payload, .. })) => {
                    let peer_max = conn
                        .peer_limits()
                        .map_or(MIN_MAX_FRAME_LEN, |l| l.max_frame_len);
                    assert!(
                        payload.len() as u64 <= u64::from(peer_max),
                        "DATA beyond the peer's frame limit"
                    );
                    assert!(
                        payload.len() <= cfg.data_frame_len.max(1) as usize,
                        "DATA beyond data_frame_len"
                    );
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("the connection sent a malformed frame: {e}"),
            }
        }
        out
    }
}

/// Checks the flow-control invariants visible from outside.
fn check_streams(conn: &Connection) {
    let window = conn.limits().stream_window;
    let max = conn.config().sanitized_max_stream_window();
    let mut grown = 0u64;
    for id in conn.stream_ids() {
        let Some(info) = conn.stream_info(id) else {
            panic!("listed stream {id} has no info");
        };
        assert!(
            info.recv_buffered as u64 <= u64::from(info.recv_window),
            "stream {id} buffers beyond its window"
        );
        assert!(
            info.recv_window >= window && info.recv_window <= max,
            "stream {id}'s window {} is outside {window}..={max}",
            info.recv_window
        );
        grown += u64::from(info.recv_window - window);
        assert!(
            info.send_buffered as u64 <= info.send_credit,
            "stream {id} buffers beyond its credit"
        );
        assert!(
            info.read + info.recv_buffered as u64 == info.received,
            "stream {id} lost bytes"
        );
    }
    assert_eq!(
        grown,
        conn.stats().windows_grown,
        "window growth miscounted"
    );
    assert!(
        grown <= conn.config().window_growth_budget,
        "windows grew beyond the budget"
    );
}

/// The application around one connection: answers what it must and remembers what it
/// may act on later.
#[derive(Default)]
struct App {
    auth: Option<crate::AuthRequest>,
    pending_opens: Vec<StreamId>,
    lost: bool,
}

impl App {
    fn take_events(&mut self, conn: &mut Connection) {
        while let Some(ev) = conn.poll() {
            match ev {
                Event::AuthRequested(r) => {
                    assert_eq!(conn.side(), Side::Server);
                    self.auth = Some(r);
                }
                Event::Stream(StreamEvent::OpenRequested { id, .. }) => {
                    assert_eq!(conn.side(), Side::Server);
                    self.pending_opens.push(id);
                }
                Event::ConnectionLost { .. } => {
                    assert!(!self.lost, "ConnectionLost raised twice");
                    self.lost = true;
                }
                _ => {}
            }
        }
    }
}

/// A well-behaved peer of the opposite side, run beside the fuzzed connection: its output
/// is one of the sources of input, so the fuzzer gets through the handshake and into
/// streams in one step and can then corrupt, cut or reorder from there.
struct Shadow {
    conn: Connection,
    out: Vec<u8>,
}

impl Shadow {
    fn new(side: Side, now: Instant) -> Self {
        let cfg = Arc::new(Config {
            require_auth: false,
            ..Config::default()
        });
        let conn = match side {
            Side::Agent => Connection::agent(cfg, Credentials::none(), now),
            Side::Server => Connection::server(cfg, now),
        };
        Shadow {
            conn,
            out: Vec::new(),
        }
    }

    /// Takes the fuzzed connection's output, answers opens, reads everything.
    fn receive(&mut self, now: Instant, mut data: &[u8]) {
        for _ in 0..64 {
            let n = self.conn.handle_input(now, data);
            data = &data[n..];
            self.settle(now);
            if data.is_empty() {
                break;
            }
        }
    }

    fn settle(&mut self, now: Instant) {
        self.conn.poll_transmit(now, &mut self.out);
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::Stream(StreamEvent::OpenRequested { id, .. }) => {
                    let _ = self.conn.accept_open(id);
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    while let Ok(Some(_)) = self.conn.recv_stream(id).read(usize::MAX) {}
                }
                _ => {}
            }
        }
        self.conn.poll_transmit(now, &mut self.out);
    }
}

/// One connection on `side`, fed arbitrary peer input (a real peer's output, raw bytes
/// and well-formed frames, in arbitrary pieces), with time advancing and the application
/// calling every method, answering auth requests and opens. After every step its output
/// is decoded and checked.
pub fn connection(side: Side, data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(cfg) = arb_config(&mut u) else { return };
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let mut now = start;
    let mut conn = match side {
        Side::Agent => Connection::agent(cfg.clone(), Credentials::none(), now),
        Side::Server => Connection::server(cfg.clone(), now),
    };
    let peer_side = match side {
        Side::Agent => Side::Server,
        Side::Server => Side::Agent,
    };
    let mut shadow = Shadow::new(peer_side, now);
    shadow.settle(now);
    let mut app = App::default();
    let mut check = OutputCheck::new();
    let mut pending: Vec<u8> = Vec::new();
    let out = check.drain(&mut conn, now, &cfg);
    shadow.receive(now, &out);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let r = if u.ratio(1, 3).unwrap_or(false) {
            shadow_step(&mut u, &mut shadow, &mut pending, now)
        } else {
            step(&mut u, &mut conn, &mut app, &mut pending, &mut now)
        };
        if r.is_err() {
            break;
        }
        // Offer what the peer sent; a full control backlog is drained between offers.
        for _ in 0..8 {
            if pending.is_empty() {
                break;
            }
            let n = conn.handle_input(now, &pending);
            assert!(n <= pending.len());
            pending.drain(..n);
            let out = check.drain(&mut conn, now, &cfg);
            shadow.receive(now, &out);
            app.take_events(&mut conn);
        }
        if let Some(at) = conn.poll_timeout() {
            if at <= now {
                conn.handle_timeout(now);
            }
        }
        let out = check.drain(&mut conn, now, &cfg);
        shadow.receive(now, &out);
        app.take_events(&mut conn);
        check_streams(&conn);
        if conn.is_drained() {
            assert!(
                conn.poll_timeout().is_none(),
                "a drained connection still wants a timer"
            );
        }
    }
}

/// One action of the well-behaved peer: deliver some of its output (whole, cut, or with
/// a byte flipped), or open, write to or finish a stream.
fn shadow_step(
    u: &mut Unstructured<'_>,
    shadow: &mut Shadow,
    pending: &mut Vec<u8>,
    now: Instant,
) -> Result<()> {
    let ids: Vec<StreamId> = shadow.conn.stream_ids().collect();
    match u.int_in_range(0..=5)? {
        0 | 1 => {
            pending.append(&mut shadow.out);
        }
        2 => {
            let n = u.int_in_range(0..=shadow.out.len())?;
            pending.extend(shadow.out.drain(..n));
        }
        3 => {
            let mut bytes = std::mem::take(&mut shadow.out);
            if !bytes.is_empty() {
                let i = u.choose_index(bytes.len())?;
                bytes[i] ^= u.int_in_range(1..=255)?;
            }
            pending.extend_from_slice(&bytes);
        }
        4 => {
            let _ = shadow.conn.open(now, arb_target(u)?);
        }
        _ => {
            let id = arb_id(u, &ids)?;
            if u.arbitrary()? {
                let n = *u.choose(&[0, 1, 100, 1500, 20_000])?;
                let _ = shadow.conn.send_stream(id).write(&vec![0xa5; n]);
            } else {
                let _ = shadow.conn.send_stream(id).finish();
            }
        }
    }
    shadow.settle(now);
    Ok(())
}

/// One fuzzer-chosen action on a single connection.
fn step(
    u: &mut Unstructured<'_>,
    conn: &mut Connection,
    app: &mut App,
    pending: &mut Vec<u8>,
    now: &mut Instant,
) -> Result<()> {
    let ids: Vec<StreamId> = conn.stream_ids().collect();
    match u.int_in_range(0..=15)? {
        0 | 1 => {
            let n = u.int_in_range(0..=64)?;
            pending.extend_from_slice(u.bytes(n.min(u.len()))?);
        }
        2..=5 => arb_frame(u, &ids)?.encode(pending),
        6 => *now += Duration::from_millis(u.int_in_range(0..=20_000)?),
        7 => conn.handle_timeout(*now),
        8 => {
            if let Some(req) = app.auth.take() {
                if u.arbitrary()? {
                    conn.accept_auth(*now, req, arb_text(u, 64)?, u.arbitrary()?);
                } else {
                    let failure = AuthFailure::from_code(u.arbitrary()?);
                    conn.reject_auth(*now, req, failure, arb_text(u, 64)?);
                }
            }
        }
        9 => {
            if !app.pending_opens.is_empty() {
                let i = u.choose_index(app.pending_opens.len())?;
                let id = app.pending_opens.swap_remove(i);
                let _ = if u.arbitrary()? {
                    conn.accept_open(id)
                } else {
                    let reason = RefusalReason::from_code(u.arbitrary()?);
                    conn.refuse_open(id, OpenRefusal::new(reason, arb_text(u, 600)?))
                };
            } else {
                let _ = conn.open(*now, arb_target(u)?);
            }
        }
        10 => {
            let id = arb_id(u, &ids)?;
            let n = *u.choose(&[0, 1, 100, 1500, 20_000])?;
            let _ = conn.send_stream(id).write(&vec![0x5a; n]);
        }
        11 => {
            let id = arb_id(u, &ids)?;
            let max = u.int_in_range(0..=70_000)?;
            // A read of nothing returns an empty chunk while bytes wait: it takes none.
            while let Ok(Some(chunk)) = conn.recv_stream(id).read(max) {
                if chunk.is_empty() {
                    break;
                }
            }
        }
        12 => {
            let id = arb_id(u, &ids)?;
            let _ = match u.int_in_range(0..=2)? {
                0 => conn.send_stream(id).finish(),
                1 => conn.send_stream(id).reset(ErrorCode(u.arbitrary()?)),
                _ => conn.recv_stream(id).stop(ErrorCode(u.arbitrary()?)),
            };
        }
        13 => conn.go_away(*now),
        14 => {
            if u.ratio(1, 4)? {
                conn.close(*now, ErrorCode(u.arbitrary()?), &arb_text(u, 600)?);
            } else {
                conn.handle_eof(*now);
            }
        }
        _ => {
            let id = arb_id(u, &ids)?;
            let _ = conn.send_stream(id).writable();
        }
    }
    Ok(())
}

// ----- stream operations on a connected pair -----

/// Codes that say one of our two implementations broke the protocol: never acceptable
/// between an agent and a server of this crate.
const VIOLATIONS: [ErrorCode; 4] = [
    ErrorCode::PROTOCOL,
    ErrorCode::FLOW_CONTROL,
    ErrorCode::FRAME_SIZE,
    ErrorCode::STREAM_CLOSED,
];

/// The byte at `offset` of the data sent in direction `dir` of stream `id`: reads can
/// check exactly what arrives.
fn pattern(id: StreamId, dir: usize, offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 8) ^ u64::from(id.0) ^ (dir as u64 * 0x55)) as u8
}

/// What the test knows of one stream. Direction 0 is agent → server, 1 server → agent.
#[derive(Default, Debug)]
struct Track {
    target: Option<Target>,
    accepted: bool,
    opened: bool,
    gone: bool,
    written: [u64; 2],
    read: [u64; 2],
    finished: [bool; 2],
    eof: [bool; 2],
}

struct End {
    conn: Connection,
    check: OutputCheck,
    /// Bytes on their way to the other end.
    outbound: Vec<u8>,
    lost: bool,
}

struct Pair {
    cfg: [Arc<Config>; 2],
    ends: [End; 2],
    streams: BTreeMap<StreamId, Track>,
    pending_opens: Vec<StreamId>,
    now: Instant,
}

const AGENT: usize = 0;
const SERVER: usize = 1;

impl Pair {
    /// Moves output into the outbound queues and handles every event.
    fn settle(&mut self) {
        for side in [AGENT, SERVER] {
            let end = &mut self.ends[side];
            let out = end.check.drain(&mut end.conn, self.now, &self.cfg[side]);
            end.outbound.extend_from_slice(&out);
            while let Some(ev) = end.conn.poll() {
                match ev {
                    Event::AuthRequested(r) => {
                        end.conn.accept_auth(self.now, r, "fuzz".into(), 0);
                    }
                    Event::Ready { .. } | Event::GoAway { .. } => {}
                    Event::Unresponsive { .. } => assert_eq!(side, AGENT, "only agents probe"),
                    Event::ConnectionLost { reason } => {
                        assert!(!end.lost, "ConnectionLost raised twice");
                        assert!(
                            !VIOLATIONS.contains(&reason.code()),
                            "side {side} saw a protocol violation between two correct ends: {reason}"
                        );
                        end.lost = true;
                    }
                    Event::Stream(StreamEvent::OpenRequested { id, target }) => {
                        assert_eq!(side, SERVER);
                        let t = self.streams.entry(id).or_default();
                        assert_eq!(
                            t.target.as_ref(),
                            Some(&target),
                            "stream {id} opened to another target"
                        );
                        self.pending_opens.push(id);
                    }
                    Event::Stream(StreamEvent::Opened { id }) => {
                        let t = self.streams.entry(id).or_default();
                        assert!(t.accepted, "stream {id} opened without an accept");
                        t.opened = true;
                    }
                    Event::Stream(
                        StreamEvent::Refused { id, .. } | StreamEvent::Reset { id, .. },
                    ) => {
                        self.streams.entry(id).or_default().gone = true;
                    }
                    Event::Stream(StreamEvent::Readable { .. } | StreamEvent::Writable { .. }) => {}
                }
            }
            let end = &self.ends[side];
            check_streams(&end.conn);
        }
        // Whatever settles again happens on the next call; output is drained once more
        // so answers produced by events (auth accepted) are queued.
        for side in [AGENT, SERVER] {
            let end = &mut self.ends[side];
            let out = end.check.drain(&mut end.conn, self.now, &self.cfg[side]);
            end.outbound.extend_from_slice(&out);
        }
    }

    /// Delivers up to `n` bytes from `from`'s outbound queue to the other end.
    fn deliver(&mut self, from: usize, n: usize) {
        let to = 1 - from;
        let n = n.min(self.ends[from].outbound.len());
        let chunk: Vec<u8> = self.ends[from].outbound.drain(..n).collect();
        let mut off = 0;
        for i in 0..64 {
            if off == chunk.len() {
                break;
            }
            // Odd deliveries go through the zero-copy input, which must consume alike.
            let k = if (n + i) % 2 == 1 {
                let mut input = BytesMut::from(&chunk[off..]);
                let k = self.ends[to].conn.handle_input_bytes(self.now, &mut input);
                assert_eq!(&input[..], &chunk[off + k..], "unconsumed input lost");
                k
            } else {
                self.ends[to].conn.handle_input(self.now, &chunk[off..])
            };
            off += k;
            self.settle();
        }
        // Not consumed (backlog still full): back to the front of the queue.
        if off < chunk.len() {
            let rest = chunk[off..].to_vec();
            self.ends[from].outbound.splice(0..0, rest);
        }
    }

    fn write(&mut self, side: usize, id: StreamId, n: usize) {
        let t = self.streams.entry(id).or_default();
        let dir = side;
        let start = t.written[dir];
        let buf: Vec<u8> = (0..n as u64).map(|k| pattern(id, dir, start + k)).collect();
        // Odd sizes go through the zero-copy write.
        let written = if n % 2 == 1 {
            self.ends[side]
                .conn
                .send_stream(id)
                .write_bytes(Bytes::from(buf))
        } else {
            self.ends[side].conn.send_stream(id).write(&buf)
        };
        if let Ok(k) = written {
            assert!(k <= n);
            self.streams.entry(id).or_default().written[dir] += k as u64;
        }
    }

    fn read(&mut self, side: usize, id: StreamId, max: usize) {
        let dir = 1 - side;
        // Until blocked: with one-byte frames every read returns one byte.
        for _ in 0..1_000_000 {
            match self.ends[side].conn.recv_stream(id).read(max) {
                Ok(Some(bytes)) => {
                    assert!(!bytes.is_empty() && bytes.len() <= max);
                    let t = self.streams.entry(id).or_default();
                    for (k, b) in bytes.iter().enumerate() {
                        assert_eq!(
                            *b,
                            pattern(id, dir, t.read[dir] + k as u64),
                            "stream {id} delivered a wrong byte"
                        );
                    }
                    t.read[dir] += bytes.len() as u64;
                    assert!(
                        t.read[dir] <= t.written[dir],
                        "stream {id} delivered more than was written"
                    );
                }
                Ok(None) => {
                    let t = self.streams.entry(id).or_default();
                    assert!(t.finished[dir], "stream {id} ended without a finish");
                    assert_eq!(t.read[dir], t.written[dir], "stream {id} ended early");
                    t.eof[dir] = true;
                    break;
                }
                Err(_) => break,
            }
        }
    }

    fn alive(&self) -> bool {
        !self.ends[AGENT].lost && !self.ends[SERVER].lost
    }
}

/// An agent and a server of this crate, connected by an in-memory link whose bytes move
/// in fuzzer-chosen pieces, with arbitrary stream operations (open, accept, refuse,
/// write, read, finish, reset, stop, goaway) and time advancing. Checks that every byte
/// read is the byte written at that offset, that no end sees a protocol violation, that
/// flow-control invariants hold, and finally that every finished stream nobody aborted
/// is delivered completely once the link is drained.
pub fn stream_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(base) = arb_config(&mut u) else { return };
    // Timers long enough that the handshake and the pump below cannot time out on their
    // own; the fuzzer still advances time explicitly.
    let cfg = Arc::new(Config {
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(15),
        keepalive_interval: Duration::from_secs(5),
        ..base
    });
    let now = Instant::now();
    let end = |conn| End {
        conn,
        check: OutputCheck::new(),
        outbound: Vec::new(),
        lost: false,
    };
    let mut p = Pair {
        cfg: [cfg.clone(), cfg.clone()],
        ends: [
            end(Connection::agent(cfg.clone(), Credentials::none(), now)),
            end(Connection::server(cfg, now)),
        ],
        streams: BTreeMap::new(),
        pending_opens: Vec::new(),
        now,
    };
    for _ in 0..8 {
        p.settle();
        p.deliver(AGENT, usize::MAX);
        p.deliver(SERVER, usize::MAX);
    }
    assert!(
        p.ends[AGENT].conn.is_ready() && p.ends[SERVER].conn.is_ready(),
        "handshake did not complete"
    );

    for _ in 0..MAX_OPS {
        if u.is_empty() || pair_step(&mut u, &mut p).is_err() {
            break;
        }
        p.settle();
    }

    // Drain: no more time passes; both applications read everything until nothing moves.
    // With one-byte windows this takes a round trip per byte, so it is bounded, and the
    // completeness check below runs only when the pair did come to rest.
    let mut quiet = false;
    for _ in 0..1_000 {
        let ids: Vec<StreamId> = p.streams.keys().copied().collect();
        for id in ids {
            p.read(AGENT, id, usize::MAX);
            p.read(SERVER, id, usize::MAX);
        }
        p.settle();
        if p.ends[AGENT].outbound.is_empty() && p.ends[SERVER].outbound.is_empty() {
            quiet = true;
            break;
        }
        p.deliver(AGENT, usize::MAX);
        p.deliver(SERVER, usize::MAX);
    }
    if !quiet {
        return;
    }
    if !p.alive() {
        return;
    }
    for (id, t) in &p.streams {
        if !t.accepted || t.gone {
            continue;
        }
        for dir in 0..2 {
            if t.finished[dir] {
                assert!(
                    t.eof[dir],
                    "stream {id} direction {dir} was finished but never ended: {t:?} (agent {:?}, server {:?})",
                    p.ends[AGENT].conn.stream_info(*id),
                    p.ends[SERVER].conn.stream_info(*id)
                );
            }
        }
    }
}

/// One fuzzer-chosen action on a connected pair.
fn pair_step(u: &mut Unstructured<'_>, p: &mut Pair) -> Result<()> {
    let ids: Vec<StreamId> = p.streams.keys().copied().collect();
    let pick = |u: &mut Unstructured<'_>| -> Result<StreamId> {
        if ids.is_empty() {
            Ok(StreamId(1))
        } else {
            Ok(*u.choose(&ids)?)
        }
    };
    let side = if u.arbitrary()? { AGENT } else { SERVER };
    match u.int_in_range(0..=12)? {
        0 => {
            let target = arb_target(u)?;
            if let Ok(id) = p.ends[AGENT].conn.open(p.now, target.clone()) {
                let t = p.streams.entry(id).or_default();
                assert!(t.target.is_none(), "stream id {id} reused");
                t.target = Some(target);
            }
        }
        1 => {
            if !p.pending_opens.is_empty() {
                let i = u.choose_index(p.pending_opens.len())?;
                let id = p.pending_opens.swap_remove(i);
                if u.ratio(3, 4)? {
                    if p.ends[SERVER].conn.accept_open(id).is_ok() {
                        p.streams.entry(id).or_default().accepted = true;
                    }
                } else {
                    let reason = RefusalReason::from_code(u.int_in_range(1..=9)?);
                    if p.ends[SERVER]
                        .conn
                        .refuse_open(id, OpenRefusal::new(reason, "no"))
                        .is_ok()
                    {
                        p.streams.entry(id).or_default().gone = true;
                    }
                }
            }
        }
        2 | 3 => {
            let id = pick(u)?;
            let n = *u.choose(&[1, 7, 100, 1500, 20_000])?;
            p.write(side, id, n);
        }
        4 | 5 => {
            let id = pick(u)?;
            let max = *u.choose(&[1, 7, 1000, usize::MAX])?;
            p.read(side, id, max);
        }
        6 => {
            let id = pick(u)?;
            if p.ends[side].conn.send_stream(id).finish().is_ok() {
                p.streams.entry(id).or_default().finished[side] = true;
            }
        }
        7 => {
            let id = pick(u)?;
            let code = ErrorCode(u.int_in_range(0..=20)?);
            let r = if u.arbitrary()? {
                p.ends[side].conn.send_stream(id).reset(code)
            } else {
                p.ends[side].conn.recv_stream(id).stop(code)
            };
            if r.is_ok() {
                p.streams.entry(id).or_default().gone = true;
            }
        }
        8 | 9 => {
            let n = u.int_in_range(0..=40_000)?;
            p.deliver(side, n);
        }
        10 => p.deliver(side, usize::MAX),
        11 => {
            p.now += Duration::from_millis(u.int_in_range(0..=3000)?);
            for s in [AGENT, SERVER] {
                p.ends[s].conn.handle_timeout(p.now);
            }
        }
        _ => p.ends[side].conn.go_away(p.now),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_accept_empty_and_short_input() {
        for data in [&[][..], &[0], &[1, 2, 3], &[0xff; 40]] {
            frame_decode(data);
            frame_round_trip(data);
            connection(Side::Agent, data);
            connection(Side::Server, data);
            stream_ops(data);
        }
    }

    /// Deterministic filler bytes for seeds of the structure-driven targets.
    fn blob(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// What a real agent and server send each other: handshake, a stream each way with
    /// data and FIN, window updates and a graceful goaway.
    fn transcript() -> (Vec<u8>, Vec<u8>) {
        let now = Instant::now();
        let cfg = Arc::new(Config::default());
        let mut agent = Connection::agent(cfg.clone(), Credentials::none(), now);
        let mut server = Connection::server(cfg, now);
        let (mut a_all, mut s_all) = (Vec::new(), Vec::new());
        let mut opened = false;
        for round in 0..12 {
            let (mut a, mut s) = (Vec::new(), Vec::new());
            agent.poll_transmit(now, &mut a);
            server.poll_transmit(now, &mut s);
            server.handle_input(now, &a);
            agent.handle_input(now, &s);
            a_all.extend_from_slice(&a);
            s_all.extend_from_slice(&s);
            while let Some(ev) = server.poll() {
                match ev {
                    Event::AuthRequested(r) => server.accept_auth(now, r, "seed".into(), 0),
                    Event::Stream(StreamEvent::OpenRequested { id, .. }) => {
                        server.accept_open(id).unwrap();
                        server
                            .send_stream(id)
                            .write(b"HTTP/1.1 200 OK\r\n\r\n")
                            .unwrap();
                        server.send_stream(id).finish().unwrap();
                    }
                    Event::Stream(StreamEvent::Readable { id }) => {
                        while let Ok(Some(_)) = server.recv_stream(id).read(usize::MAX) {}
                    }
                    _ => {}
                }
            }
            while let Some(ev) = agent.poll() {
                if let Event::Stream(StreamEvent::Readable { id }) = ev {
                    while let Ok(Some(_)) = agent.recv_stream(id).read(usize::MAX) {}
                }
            }
            if agent.is_ready() && !opened {
                opened = true;
                let id = agent
                    .open(now, Target::parse("example.com:443").unwrap())
                    .unwrap();
                agent.send_stream(id).write(&[0x16; 3000]).unwrap();
                agent.send_stream(id).finish().unwrap();
            }
            if round == 8 {
                server.handle_timeout(now + Duration::from_secs(6));
                agent.go_away(now);
            }
        }
        (a_all, s_all)
    }

    /// Writes the seed corpus of this crate's targets into `fuzz/corpus/`. Run by hand
    /// after a wire change:
    /// `cargo test -p fluidity-proto --features fuzzing write_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to refresh the seeds"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let (a, s) = transcript();
        assert!(a.len() > 3000 && !s.is_empty());
        let prefixed = |p: [u8; 2], w: &[u8]| [&p[..], w].concat();
        write("frame_decode", "agent-transcript", &prefixed([3, 1], &a));
        write("frame_decode", "server-transcript", &prefixed([4, 7], &s));
        write(
            "frame_decode",
            "agent-transcript-small-limit",
            &prefixed([2, 3], &a[..200]),
        );
        write(
            "frame_decode",
            "bad-version",
            &[3, 0, 2, 5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        );
        write(
            "frame_decode",
            "oversize",
            &[3, 0, 1, 5, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
        );
        for (i, len) in [64, 300, 1500].into_iter().enumerate() {
            write(
                "frame_round_trip",
                &format!("blob-{len}"),
                &blob(i as u64 + 1, len),
            );
            write(
                "stream_ops",
                &format!("blob-{len}"),
                &blob(i as u64 + 11, len),
            );
            write(
                "connection_agent",
                &format!("blob-{len}"),
                &blob(i as u64 + 21, len),
            );
            write(
                "connection_server",
                &format!("blob-{len}"),
                &blob(i as u64 + 31, len),
            );
        }
        // Raw peer transcripts as the fuzzed side's input bytes (the ops read them as a
        // mix of actions and payloads).
        write("connection_agent", "server-transcript", &s);
        write(
            "connection_server",
            "agent-transcript",
            &a[..a.len().min(2000)],
        );
        for target in [
            "frame_decode",
            "frame_round_trip",
            "connection_agent",
            "connection_server",
            "stream_ops",
        ] {
            for entry in std::fs::read_dir(root.join(target)).unwrap() {
                let data = std::fs::read(entry.unwrap().path()).unwrap();
                match target {
                    "frame_decode" => frame_decode(&data),
                    "frame_round_trip" => frame_round_trip(&data),
                    "connection_agent" => connection(Side::Agent, &data),
                    "connection_server" => connection(Side::Server, &data),
                    _ => stream_ops(&data),
                }
            }
        }
    }
}
