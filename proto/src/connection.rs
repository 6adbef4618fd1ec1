//! The connection state machine: one per tunnel, the same type on both sides.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{
    encode_data_header, Decoder, Frame, HEADER_LEN, MAX_AUTH_METHOD_LEN, MIN_MAX_FRAME_LEN,
};
use crate::handshake::{AuthFailure, AuthRequest, AuthResult, Credentials, Hello, Phase};
use crate::stream::flow::{RecvWindow, SendWindow};
use crate::stream::recv::{Allocation, RecvState};
use crate::stream::send::{Fin, SendBuf};
use crate::stream::{OpenPhase, RecvStream, SendStream, StreamEvent, StreamInfo, StreamState};
use crate::{
    deadline, Config, Error, ErrorCode, Host, Limits, OpenRefusal, RefusalReason, Side, StreamId,
    Target, PROBE_QUIET,
};

/// The round trip window growth assumes until a ping has measured one (the first goes out
/// as the connection becomes ready).
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// The least round trip window growth assumes. An idle loopback tunnel measures tens of
/// microseconds, which says nothing of how long its processes take to be scheduled under
/// load.
const MIN_GROWTH_RTT: Duration = Duration::from_millis(1);

/// Round trips over which a reader's pace is measured for its window
/// ([`Connection::resize_window`]).
const RATE_HORIZON_RTTS: u32 = 8;

/// The least horizon over which a reader's pace is measured. A reader behind a loopback
/// socket takes what the socket's buffer frees, up to megabytes at once, at intervals of
/// a tenth of a second or more when its client reads a few megabytes a second: shorter
/// horizons take such a burst for the reader's pace.
const MIN_RATE_HORIZON: Duration = Duration::from_millis(100);

/// How much input `handle_input` decodes between checks of the control backlog.
const INPUT_SLICE: usize = 16 * 1024;

/// Initial capacity of the receive buffer, which `BytesMut` also uses as its smallest
/// allocation. Decoded payloads share the buffer's allocation (no copy), so while any of
/// them is alive the buffer cannot grow in place: each growth allocates anew and copies
/// the partial frame it holds. Allocating at least this much keeps those copies to one per
/// several frames instead of one or two per frame, while an allocation that a stalled
/// stream's chunks keep alive stays small.
const RX_ALLOC: usize = 64 * 1024;
/// How many earlier receive allocations a connection keeps to take back (see
/// [`Connection::reserve_rx`]).
const RX_SPARES: usize = 16;

/// Room reserved at once for DATA headers handed out as chunks.
const HEADERS_ALLOC: usize = 4 * 1024;

/// Where the transmit scheduler puts frames: one implementation copies (`poll_transmit`),
/// one shares chunks (`poll_transmit_chunks`); the scheduling is the same.
trait Transmit {
    /// Takes every encoded control frame out of `ctrl`.
    fn control(&mut self, ctrl: &mut Vec<u8>);
    /// Emits one DATA frame carrying the first `n` bytes of `payload`, removing them.
    fn data(&mut self, id: StreamId, fin: bool, payload: &mut SendBuf, n: usize);
}

impl Transmit for Vec<u8> {
    fn control(&mut self, ctrl: &mut Vec<u8>) {
        self.append(ctrl);
    }

    fn data(&mut self, id: StreamId, fin: bool, payload: &mut SendBuf, n: usize) {
        encode_data_header(self, id, fin, n);
        payload.copy_to(n, self);
    }
}

/// Frames as shared chunks, for `poll_transmit_chunks`.
struct ChunkSink<'a> {
    out: &'a mut Vec<Bytes>,
    /// Headers are encoded here and split off, many to an allocation.
    headers: BytesMut,
}

impl Transmit for ChunkSink<'_> {
    fn control(&mut self, ctrl: &mut Vec<u8>) {
        if !ctrl.is_empty() {
            self.out.push(Bytes::from(std::mem::take(ctrl)));
        }
    }

    fn data(&mut self, id: StreamId, fin: bool, payload: &mut SendBuf, n: usize) {
        if self.headers.capacity() < HEADER_LEN {
            self.headers.reserve(HEADERS_ALLOC);
        }
        encode_data_header(&mut self.headers, id, fin, n);
        self.out.push(self.headers.split().freeze());
        payload.split_to(n, self.out);
    }
}

/// Something the application must know about.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Server: the agent presented credentials; answer with [`Connection::accept_auth`]
    /// or [`Connection::reject_auth`].
    AuthRequested(AuthRequest),
    /// The handshake is complete; streams may be opened.
    Ready {
        /// Agent: the principal the server admitted. Server: the principal it accepted.
        principal: String,
    },
    /// A stream event.
    Stream(StreamEvent),
    /// The peer takes no new streams; open ones may finish.
    GoAway {
        /// Always `NO_ERROR` (an error goaway arrives as [`Event::ConnectionLost`]).
        code: ErrorCode,
        /// The peer's explanation.
        detail: String,
    },
    /// Agent: the server answered nothing for `silent` after a stream was opened or
    /// written to (`Config::probe_timeout`). This connection takes no new streams (a
    /// GOAWAY went to the server); opens it had not answered were refused with
    /// `GOING_AWAY` (and reset towards the server) so that they can go elsewhere; the
    /// streams under way go on until they end, or the idle timeout ends the connection.
    /// Raised at most once, before the refusals of those opens.
    Unresponsive {
        /// How long the server had been silent.
        silent: Duration,
    },
    /// The connection is over; every stream is gone. Raised once.
    ConnectionLost {
        /// Why.
        reason: Error,
    },
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stream payload bytes transmitted.
    pub bytes_sent: u64,
    /// Stream payload bytes received.
    pub bytes_received: u64,
    /// Frames transmitted.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Streams opened over the connection's life (by either side's count).
    pub streams_opened: u64,
    /// Streams alive now.
    pub streams_active: usize,
    /// Stream bytes written by the application and not yet transmitted.
    pub send_buffered: usize,
    /// Stream bytes received and not yet read by the application.
    pub recv_buffered: usize,
    /// Times the receive buffer needed a fresh allocation after its first; the other
    /// times it took back an earlier one.
    pub rx_allocations: u64,
    /// Payload bytes copied out of the receive buffer: payloads under 1 KiB, and those
    /// whose stream's unread chunks kept enough of its allocations alive already.
    pub rx_copied: u64,
    /// Smoothed round-trip time from pings, once measured.
    pub rtt: Option<Duration>,
    /// How far the streams' receive windows have grown beyond the initial one, together
    /// (within `Config::window_growth_budget`).
    pub windows_grown: u64,
}

/// A probe under way (see `Connection::probe`).
#[derive(Debug, Clone, Copy)]
struct Probe {
    opaque: u64,
    sent: Instant,
    deadline: Instant,
}

/// Why the connection is closing.
#[derive(Debug)]
enum Closing {
    /// Not closing.
    No,
    /// The last frames (goaway) are being flushed; then the connection is drained.
    Flushing,
    /// Nothing more will be sent or received.
    Drained,
}

/// One end of a Fluidity tunnel, as a pure state machine.
///
/// Inputs: [`handle_input`](Self::handle_input) (bytes from the peer),
/// [`handle_eof`](Self::handle_eof), [`handle_timeout`](Self::handle_timeout), and the
/// application calls (open, accept, write, read, ...). Outputs:
/// [`poll_transmit`](Self::poll_transmit), [`poll_timeout`](Self::poll_timeout) and
/// [`poll`](Self::poll). After every input, drain the outputs in that order (see the crate
/// documentation for the run loop). No method reads a clock or panics on peer input.
#[derive(Debug)]
pub struct Connection {
    side: Side,
    config: Arc<Config>,
    limits: Limits,
    phase: Phase,
    peer: Option<Hello>,
    decoder: Decoder,
    rx: BytesMut,
    /// The allocation `rx` decodes from.
    rx_allocation: Allocation,
    /// The number the next receive allocation gets.
    next_allocation: u64,
    /// The largest receive allocation so far (for the invariant checks).
    largest_allocation: usize,
    /// The receive buffer's previous allocations, oldest first, each taken back once the
    /// payloads that share it are gone (see [`Connection::reserve_rx`]).
    rx_spares: VecDeque<BytesMut>,
    /// Encoded control frames not yet handed to `poll_transmit`.
    ctrl: Vec<u8>,
    /// Spare room for the DATA headers `poll_transmit_chunks` hands out, so they do not
    /// take one allocation each.
    headers: BytesMut,
    events: VecDeque<Event>,
    streams: BTreeMap<StreamId, StreamState>,
    /// Round-robin of streams with output.
    sendable: VecDeque<StreamId>,
    /// Agent: the next id to open. Server: two past the highest id the agent opened. Wider
    /// than an id, so that the last one (`u32::MAX`) leaves no room to open it again.
    next_stream: u64,
    conn_send: SendWindow,
    conn_recv: RecvWindow,
    handshake_deadline: Instant,
    last_recv: Instant,
    next_ping: Option<Instant>,
    ping_outstanding: Option<(u64, Instant)>,
    ping_counter: u64,
    /// The probe under way (`Config::probe_timeout`): its ping's `opaque`, when that ping
    /// went out, and when the probe gives up on the server. Only that ping's answer ends
    /// it: the server's own pings arriving say nothing of whether what the agent sends
    /// reaches it.
    probe: Option<Probe>,
    /// Agent: when to look again at opens that went without a probe (the server had just
    /// been heard): one still unanswered [`PROBE_QUIET`] later starts the probe then, so
    /// that a path dead only towards the server is found while the open waits.
    open_check: Option<Instant>,
    go_away_sent: bool,
    go_away_received: bool,
    closing: Closing,
    lost: bool,
    /// The peer drained and closed the transport after a goaway; the streams left are
    /// complete and only wait for the application to read them.
    peer_done: bool,
    /// The latest time the application gave (never earlier than one given before). Stream
    /// reads take no time of their own; window growth measures with this.
    now: Instant,
    /// How far the streams' receive windows have grown beyond the initial one, together
    /// (bounded by `Config::window_growth_budget`).
    windows_grown: u64,
    stats: Stats,
}

impl Connection {
    /// The agent end. It sends its hello and `credentials` at once. Credentials no AUTH
    /// frame can carry (a method name out of bounds, a frame over 16 KiB) end the
    /// connection at once ([`Error::InvalidAuthMethod`], [`Error::CredentialsTooLarge`],
    /// reported as [`Event::ConnectionLost`]).
    pub fn agent(config: Arc<Config>, credentials: Credentials, now: Instant) -> Connection {
        let mut c = Connection::new(Side::Agent, config, now);
        let m = credentials.method.as_bytes();
        if m.is_empty() || m.len() > MAX_AUTH_METHOD_LEN || !m.iter().all(u8::is_ascii_graphic) {
            // The frame would be cut or refused by the server; say why here instead, and
            // send nothing, not even the hello.
            c.ctrl.clear();
            c.fail(Error::InvalidAuthMethod(credentials.method), false);
            return c;
        }
        let len = 1 + m.len() + credentials.payload.len();
        if len > MIN_MAX_FRAME_LEN as usize {
            // AUTH goes out before the server's limits are known: only the least any
            // server takes is sure to arrive.
            c.ctrl.clear();
            c.fail(Error::CredentialsTooLarge(len), false);
            return c;
        }
        c.queue(&Frame::Auth {
            method: credentials.method,
            payload: credentials.payload,
        });
        c
    }

    /// The server end. It sends its hello at once.
    pub fn server(config: Arc<Config>, now: Instant) -> Connection {
        Connection::new(Side::Server, config, now)
    }

    fn new(side: Side, config: Arc<Config>, now: Instant) -> Connection {
        let limits = config.limits.sanitized();
        let mut c = Connection {
            side,
            limits,
            phase: Phase::AwaitHello,
            peer: None,
            decoder: Decoder::new(limits.max_frame_len),
            rx: BytesMut::with_capacity(RX_ALLOC),
            rx_allocation: Allocation {
                id: 0,
                size: RX_ALLOC,
            },
            next_allocation: 1,
            largest_allocation: RX_ALLOC,
            rx_spares: VecDeque::new(),
            ctrl: Vec::new(),
            headers: BytesMut::new(),
            events: VecDeque::new(),
            streams: BTreeMap::new(),
            sendable: VecDeque::new(),
            next_stream: 1,
            // Zero until the peer's hello says what it allows.
            conn_send: SendWindow::new(0),
            conn_recv: RecvWindow::new(limits.connection_window),
            handshake_deadline: deadline(now, config.handshake_timeout),
            last_recv: now,
            next_ping: None,
            ping_outstanding: None,
            ping_counter: 0,
            probe: None,
            open_check: None,
            go_away_sent: false,
            go_away_received: false,
            closing: Closing::No,
            lost: false,
            peer_done: false,
            now,
            windows_grown: 0,
            stats: Stats::default(),
            config,
        };
        c.queue(&Frame::Hello(Hello::ours(limits)));
        c
    }

    // ----- getters -----

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the handshake is complete and the connection not closing.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready && matches!(self.closing, Closing::No)
    }

    /// Whether the connection has finished: nothing more to send, nothing more accepted.
    /// The driver closes the transport once this is true.
    pub fn is_drained(&self) -> bool {
        matches!(self.closing, Closing::Drained)
    }

    /// Whether the connection is closing or closed: its last frames (a goaway) may still
    /// wait to be sent, and no timer of its own runs any more.
    pub fn is_closing(&self) -> bool {
        !matches!(self.closing, Closing::No)
    }

    /// Whether this side may open streams now (agent, ready, no goaway either way).
    pub fn can_open(&self) -> bool {
        self.side == Side::Agent && self.is_ready() && !self.go_away_received && !self.go_away_sent
    }

    /// Whether a goaway was sent or received: no new streams, ever, on this connection.
    pub fn is_going_away(&self) -> bool {
        self.go_away_sent || self.go_away_received
    }

    /// How many more streams the peer's stream limit leaves room for (0 before its hello).
    /// An [`open`](Self::open) without room fails with [`Error::TooManyStreams`]; room comes
    /// back as streams end.
    pub fn stream_room(&self) -> usize {
        self.peer_limits().map_or(0, |p| {
            (p.max_streams as usize).saturating_sub(self.streams.len())
        })
    }

    /// The limits the peer advertised, once its hello has arrived.
    pub fn peer_limits(&self) -> Option<Limits> {
        self.peer.map(|h| h.limits)
    }

    /// The limits this side advertised.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.streams_active = self.streams.len();
        s.send_buffered = self.streams.values().map(|st| st.send.buf.len()).sum();
        s.recv_buffered = self.streams.values().map(|st| st.recv.buffered()).sum();
        s.windows_grown = self.windows_grown;
        s
    }

    /// The configuration this side was made with (for the fuzz targets' checks).
    #[cfg(any(fuzzing, feature = "fuzzing"))]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// A snapshot of one stream, if it exists.
    pub fn stream_info(&self, id: StreamId) -> Option<StreamInfo> {
        self.streams.get(&id).map(|s| StreamInfo {
            send_buffered: s.send.buf.len(),
            send_credit: s.send.window.credit(),
            sent: s.send.sent,
            recv_buffered: s.recv.buffered(),
            recv_window: s.recv.window.window(),
            received: s.recv.received,
            read: s.recv.read,
            fin_received: s.recv.fin_received,
            fin_sent: s.send.fin == Fin::Sent,
        })
    }

    /// Ids of the streams alive now, in order.
    pub fn stream_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.keys().copied()
    }

    // ----- inputs -----

    /// Feeds bytes received from the peer and returns how many were consumed. Fewer than
    /// `data.len()` means the control backlog is full: call `poll_transmit`, then offer
    /// the rest again. Protocol violations close the connection and surface as
    /// [`Event::ConnectionLost`]; they are never returned.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> usize {
        self.advance(now);
        if !matches!(self.closing, Closing::No) {
            // Nothing more is accepted once closing; the bytes are discarded.
            return data.len();
        }
        let mut consumed = 0;
        while consumed < data.len() {
            // A zero backlog would stop input for good; one frame's worth is the least that works.
            if self.ctrl.len() >= self.config.max_control_backlog.max(1) {
                break;
            }
            // Only bytes taken are word from the peer: input offered again while the
            // backlog is full must not keep a silent peer's connection alive.
            self.heard(now);
            let end = (consumed + INPUT_SLICE).min(data.len());
            self.reserve_rx(end - consumed);
            self.rx.extend_from_slice(&data[consumed..end]);
            consumed = end;
            loop {
                match self.decoder.decode_shared(&mut self.rx) {
                    Ok(Some(frame)) => {
                        self.stats.frames_received += 1;
                        self.on_frame(now, frame, self.rx_allocation);
                        if !matches!(self.closing, Closing::No) {
                            return data.len();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(Error::protocol(e.code(), e.to_string()), true);
                        return data.len();
                    }
                }
            }
        }
        self.check_invariants();
        consumed
    }

    /// Like [`handle_input`](Self::handle_input), taking the bytes out of `data` instead
    /// of copying them: decoded DATA payloads share `data`'s allocation (unless their
    /// stream's unread payloads keep too much alive already, or they are under 1 KiB: see
    /// the crate's notes on flow control; `data`'s capacity from its start counts as the
    /// allocation's size), and a trailing
    /// partial frame is kept the same way. Only the rest of a frame begun in an earlier
    /// input is copied (at most one frame per call). Consumed bytes are removed from the
    /// front of `data` and their count is returned; the two input calls may be mixed.
    /// Bytes left in `data` (only when the control backlog is full, as with
    /// `handle_input`) were not looked at: call `poll_transmit`, then offer them again.
    /// Once the connection is closing everything is consumed and discarded.
    pub fn handle_input_bytes(&mut self, now: Instant, data: &mut BytesMut) -> usize {
        self.advance(now);
        let total = data.len();
        if !matches!(self.closing, Closing::No) {
            data.clear();
            return total;
        }
        let input = self.new_allocation(data.capacity());
        // The backlog is checked first, then after every `INPUT_SLICE` bytes or so (frames
        // are not cut here, so a check may come up to one frame later than in `handle_input`).
        let mut since_check = INPUT_SLICE;
        while !data.is_empty() {
            if since_check >= INPUT_SLICE {
                // A zero backlog would stop input for good; one frame's worth is the least that works.
                if self.ctrl.len() >= self.config.max_control_backlog.max(1) {
                    break;
                }
                // As in `handle_input`: only bytes taken are word from the peer.
                self.heard(now);
                since_check = 0;
            }
            let before = data.len();
            let (decoded, from) = if self.rx.is_empty() {
                let decoded = self.decoder.decode_shared(data);
                if matches!(decoded, Ok(None)) {
                    // A partial frame: keep it, sharing the allocation; the next input
                    // completes it.
                    self.rx.unsplit(data.split());
                    self.rx_allocation = input;
                }
                (decoded, input)
            } else {
                // Finish the frame begun earlier, copying no more than it needs.
                let k = self.decoder.missing(self.rx.len()).min(data.len());
                self.reserve_rx(k);
                self.rx.extend_from_slice(&data[..k]);
                data.advance(k);
                (self.decoder.decode_shared(&mut self.rx), self.rx_allocation)
            };
            since_check += before - data.len();
            match decoded {
                Ok(Some(frame)) => {
                    self.stats.frames_received += 1;
                    self.on_frame(now, frame, from);
                    if !matches!(self.closing, Closing::No) {
                        data.clear();
                        return total;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail(Error::protocol(e.code(), e.to_string()), true);
                    data.clear();
                    return total;
                }
            }
        }
        self.check_invariants();
        total - data.len()
    }

    /// Makes room for `n` more bytes in the receive buffer, and for the rest of a frame
    /// begun, so that a large frame moves at most once. Decoded payloads share the
    /// buffer's allocation, so a full buffer can rarely be reused in place, and a fresh
    /// allocation for every 64 KiB received, freed when its payloads are read, makes the
    /// allocator hand the memory back to the system and fault it in again for the next
    /// one (a tenth of the agent's CPU time during a download). Instead, the earlier
    /// allocations are kept, and the oldest one whose payloads are all gone is taken back.
    /// A reader that lags by several allocations (a download whose client is slower than
    /// the tunnel, or one stream of many left unread) still finds one free, so the spares
    /// are many, not one: with 8, a download still faulted in a few thousand pages per
    /// GiB, with 16 a few hundred. A fresh allocation is made only while every spare is
    /// still shared; past [`RX_SPARES`] the oldest is let go, to be freed by its last
    /// payload. A connection thus keeps at most [`RX_SPARES`] more allocations (usually
    /// [`RX_ALLOC`] bytes each, more when a large frame or an input handed over whole by
    /// `handle_input_bytes` needed it), and gives back the free ones at every keepalive
    /// tick ([`Connection::release_free_rx_spares`]).
    fn reserve_rx(&mut self, n: usize) {
        let n = n.max(self.decoder.missing(self.rx.len()));
        if self.rx.capacity() - self.rx.len() >= n {
            return;
        }
        let needed = self.rx.len() + n;
        let free = self
            .rx_spares
            .iter_mut()
            .position(|spare| spare.try_reclaim(needed));
        let mut next = match free.and_then(|i| self.rx_spares.remove(i)) {
            Some(spare) => spare,
            None => {
                self.stats.rx_allocations += 1;
                BytesMut::with_capacity(needed.max(RX_ALLOC))
            }
        };
        // At most the start of one frame moves.
        next.extend_from_slice(&self.rx);
        let mut previous = std::mem::replace(&mut self.rx, next);
        self.rx_allocation = self.new_allocation(self.rx.capacity());
        previous.clear();
        if self.rx_spares.len() >= RX_SPARES {
            self.rx_spares.pop_front();
        }
        self.rx_spares.push_back(previous);
    }

    /// Numbers a receive allocation of `size` bytes that payloads will be decoded from.
    fn new_allocation(&mut self, size: usize) -> Allocation {
        let id = self.next_allocation;
        self.next_allocation += 1;
        self.largest_allocation = self.largest_allocation.max(size);
        Allocation { id, size }
    }

    /// Gives back the spare receive allocations no payload uses any more, so that a quiet
    /// connection does not keep the memory of its last burst. Called at each keepalive
    /// tick: during a transfer that costs one fresh allocation per tick, nothing more.
    fn release_free_rx_spares(&mut self) {
        // A spare that can be reclaimed is unique (or has room of its own): dropping it frees
        // its memory, or at worst only a reference.
        self.rx_spares
            .retain_mut(|spare| !spare.try_reclaim(RX_ALLOC));
    }

    /// The transport ended (EOF or error). Unless the connection was drained, it is lost,
    /// with one exception: after a goaway, a peer that drained closes the transport while
    /// streams it completed may still hold unread data here; they stay readable and the
    /// connection drains once they have been read.
    pub fn handle_eof(&mut self, now: Instant) {
        self.transport_ended(now, Error::TransportClosed);
    }

    /// The transport failed, as `why` says: like [`handle_eof`](Self::handle_eof), and a
    /// lost connection reports `why` as its reason.
    pub fn handle_transport_error(&mut self, now: Instant, why: String) {
        self.transport_ended(now, Error::TransportFailed(why));
    }

    fn transport_ended(&mut self, now: Instant, reason: Error) {
        self.advance(now);
        match self.closing {
            Closing::No => {
                // After a goaway the peer drains and closes the transport once it has sent
                // everything and read our FINs, while streams it completed may still hold
                // unread data here. Those stay readable, and the connection drains when
                // they have been read. Anything short of that is a broken transport.
                let peer_drained = (self.go_away_received || self.go_away_sent)
                    && self.rx.is_empty()
                    && self.decoder.is_idle()
                    && self
                        .streams
                        .values()
                        .all(|s| s.recv.fin_received && s.send.fin == Fin::Sent);
                if peer_drained {
                    self.peer_done = true;
                } else {
                    self.fail(reason, false);
                }
            }
            Closing::Flushing => self.closing = Closing::Drained,
            Closing::Drained => {}
        }
    }

    /// Processes timers due at `now`: the handshake deadline, keepalive pings, the idle
    /// timeout and the probe's deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        // A peer that drained sends nothing more: no keepalive, no idle timeout.
        if !matches!(self.closing, Closing::No) || self.peer_done {
            return;
        }
        if self.phase != Phase::Ready {
            if now >= self.handshake_deadline {
                self.fail(Error::HandshakeTimeout(self.config.handshake_timeout), true);
            }
            return;
        }
        if now >= deadline(self.last_recv, self.config.idle_timeout) {
            self.fail(Error::IdleTimeout(self.config.idle_timeout), true);
            return;
        }
        if let Some(probe) = self.probe.filter(|p| now >= p.deadline) {
            self.probe = None;
            self.give_up_new_streams(now, probe.sent);
            if !matches!(self.closing, Closing::No) {
                return;
            }
        }
        if self.open_check.is_some_and(|at| now >= at) {
            self.open_check = None;
            // An OPEN_RESULT can take a while (the server dials the target first): the
            // probe's ping, which the server answers at once, tells a slow target from a
            // path that lost the open.
            if self.streams.values().any(|s| s.phase == OpenPhase::Opening) {
                self.start_probe();
            }
        }
        if let Some(at) = self.next_ping {
            if now >= at {
                self.release_free_rx_spares();
                self.ping(now);
                self.next_ping = Some(deadline(now, self.config.keepalive_interval));
            }
        }
    }

    /// Sends a ping unless one is outstanding (whose pong serves as well).
    fn ping(&mut self, now: Instant) {
        if self.ping_outstanding.is_none() {
            self.ping_counter += 1;
            self.ping_outstanding = Some((self.ping_counter, now));
            self.queue(&Frame::Ping {
                ack: false,
                opaque: self.ping_counter,
            });
        }
    }

    /// Bytes came from the peer: it is alive.
    fn heard(&mut self, now: Instant) {
        self.last_recv = self.last_recv.max(now);
    }

    /// Agent: a stream is being opened or sent data. If the server has been silent for
    /// [`PROBE_QUIET`], or the agent's keepalive ping is still unanswered (the server's own
    /// pings may keep arriving over a path that has died the other way), ping it now and
    /// give it `Config::probe_timeout` to answer that ping, so that a dead path is found
    /// while the stream waits rather than after `idle_timeout`.
    fn probe(&mut self) {
        let now = self.now;
        let quiet = now.saturating_duration_since(self.last_recv) >= PROBE_QUIET;
        // A keepalive ping out for a moment is every connection's lot; one unanswered for
        // as long as the server may be quiet is a sign.
        let unanswered = self
            .ping_outstanding
            .is_some_and(|(_, sent)| now.saturating_duration_since(sent) >= PROBE_QUIET);
        if quiet || unanswered {
            self.start_probe();
        }
    }

    /// Agent: pings the server and gives it `Config::probe_timeout` to answer that ping,
    /// unless a probe is under way, probes are off, or no stream could go elsewhere.
    fn start_probe(&mut self) {
        let now = self.now;
        let timeout = self.config.probe_timeout;
        if timeout.is_zero() || self.side != Side::Agent || self.probe.is_some() || !self.can_open()
        {
            return;
        }
        let rtt = self.stats.rtt.unwrap_or(INITIAL_RTT);
        // A ping of its own, beside an outstanding keepalive ping (a peer answers every
        // ping): only an answer to a ping sent now says the open got through.
        self.ping_counter += 1;
        let opaque = self.ping_counter;
        self.ping_outstanding.get_or_insert((opaque, now));
        self.queue(&Frame::Ping { ack: false, opaque });
        self.probe = Some(Probe {
            opaque,
            sent: now,
            deadline: deadline(now, timeout.max(rtt.saturating_mul(4))),
        });
    }

    /// The probe found the server silent. A dead path and a live one whose bytes wait in
    /// a queue look alike from here, so nothing under way is cut: only new streams go
    /// elsewhere (see [`Event::Unresponsive`]). The opens not yet answered carried no
    /// more than what the application wrote behind them; they are reset towards the
    /// server, which drops them if it is alive after all.
    fn give_up_new_streams(&mut self, now: Instant, probe_sent: Instant) {
        // Since the probe's ping (the server may have sent other things meanwhile), in
        // whole milliseconds: it is read by people.
        let silent = now.saturating_duration_since(probe_sent).as_millis();
        let silent = Duration::from_millis(u64::try_from(silent).unwrap_or(u64::MAX));
        self.events.push_back(Event::Unresponsive { silent });
        let pending: Vec<(StreamId, bool)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.phase == OpenPhase::Opening)
            .map(|(id, s)| (*id, !s.let_go()))
            .collect();
        for (id, told) in pending {
            self.remove_stream(id);
            self.queue(&Frame::Reset {
                id,
                code: ErrorCode::CANCEL,
            });
            // A stream the application has reset hears no more about it.
            if told {
                self.events.push_back(Event::Stream(StreamEvent::Refused {
                    id,
                    refusal: OpenRefusal::new(
                        RefusalReason::GoingAway,
                        format!("the server answered nothing for {silent:?}"),
                    ),
                }));
            }
        }
        self.go_away_with(now, "the server answered nothing; new streams go elsewhere");
        // Already going away (the agent stopping): the opens just removed may have been
        // all that kept it from draining.
        self.check_drain();
    }

    // ----- outputs -----

    /// Appends frames to send to `buf` and returns how many bytes were appended (0 when
    /// there is nothing to send). Emits all pending control frames and at most
    /// `Config::transmit_batch` bytes of stream data, round-robin across streams.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        self.advance(now);
        let start = buf.len();
        self.transmit(buf);
        buf.len() - start
    }

    /// Like [`poll_transmit`](Self::poll_transmit), without copying stream data: appends
    /// the same frames to `out` as shared chunks and returns how many bytes they hold (0
    /// when there is nothing to send). Pending control frames come first as one chunk;
    /// each DATA frame is a header chunk followed by its payload as zero (a bare FIN) or
    /// more slices of the written bytes. Concatenated in order, the chunks are exactly the
    /// bytes `poll_transmit` would have appended, so the two may be mixed freely; a
    /// runtime can hand them to a vectored write.
    pub fn poll_transmit_chunks(&mut self, now: Instant, out: &mut Vec<Bytes>) -> usize {
        self.advance(now);
        let start = out.len();
        let mut sink = ChunkSink {
            out,
            headers: std::mem::take(&mut self.headers),
        };
        self.transmit(&mut sink);
        self.headers = sink.headers;
        out[start..].iter().map(Bytes::len).sum()
    }

    /// The one scheduler behind both transmit calls: control frames first, then stream
    /// data within the batch budget.
    fn transmit<T: Transmit>(&mut self, out: &mut T) {
        if !self.sendable.is_empty() && matches!(self.closing, Closing::No) {
            // Stream data is about to go: its probe, if any, goes first.
            self.probe();
        }
        out.control(&mut self.ctrl);
        if self.phase == Phase::Ready && matches!(self.closing, Closing::No) {
            self.transmit_data(out);
        }
        if matches!(self.closing, Closing::Flushing) && self.ctrl.is_empty() {
            self.closing = Closing::Drained;
        }
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !matches!(self.closing, Closing::No) || self.peer_done {
            return None;
        }
        if self.phase != Phase::Ready {
            return Some(self.handshake_deadline);
        }
        let idle = deadline(self.last_recv, self.config.idle_timeout);
        let idle = self.probe.map_or(idle, |p| p.deadline.min(idle));
        let idle = self.open_check.map_or(idle, |at| at.min(idle));
        Some(match self.next_ping {
            Some(p) if self.ping_outstanding.is_none() => p.min(idle),
            _ => idle,
        })
    }

    /// The next event, if any.
    pub fn poll(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- handshake answers (server) -----

    /// Admits the agent as `principal` (may be empty), valid for `lifetime_secs` (0: for
    /// the connection's life). The connection becomes ready.
    pub fn accept_auth(
        &mut self,
        now: Instant,
        request: AuthRequest,
        principal: String,
        lifetime_secs: u32,
    ) {
        self.advance(now);
        drop(request);
        if self.phase != Phase::AuthPending || !matches!(self.closing, Closing::No) {
            return;
        }
        self.queue(&Frame::AuthResult(AuthResult::Accepted {
            principal: principal.clone(),
            lifetime_secs,
        }));
        self.become_ready(now, principal);
    }

    /// Refuses the agent; the connection closes after telling it why.
    pub fn reject_auth(
        &mut self,
        now: Instant,
        request: AuthRequest,
        failure: AuthFailure,
        detail: String,
    ) {
        self.advance(now);
        drop(request);
        if self.phase != Phase::AuthPending || !matches!(self.closing, Closing::No) {
            return;
        }
        self.queue(&Frame::AuthResult(AuthResult::Rejected {
            failure,
            detail: detail.clone(),
        }));
        self.fail(Error::AuthRejected { failure, detail }, true);
    }

    // ----- streams -----

    /// Agent: opens a stream to `target`. Data may be written at once (it is carried
    /// behind the open); reading waits for [`StreamEvent::Opened`]. A host name is taken
    /// in its normal form ([`Host::name`]), and one without any is refused
    /// ([`Error::InvalidTarget`]).
    pub fn open(&mut self, now: Instant, mut target: Target) -> Result<StreamId, Error> {
        self.advance(now);
        if self.side != Side::Agent {
            return Err(Error::WrongSide);
        }
        if let Host::Name(name) = &target.host {
            // The server refuses a name not in its normal form as a malformed frame, which
            // ends the whole tunnel, and a longer one would be cut into another name.
            target.host = Host::name(name).ok_or_else(|| Error::InvalidTarget(name.clone()))?;
        }
        self.check_alive()?;
        if self.phase != Phase::Ready {
            return Err(Error::NotReady);
        }
        if self.go_away_received || self.go_away_sent {
            return Err(Error::GoingAway);
        }
        let peer = self.peer_limits().ok_or(Error::NotReady)?;
        if self.stream_room() == 0 {
            return Err(Error::TooManyStreams);
        }
        let Some(id) = u32::try_from(self.next_stream)
            .ok()
            .filter(|&id| id != u32::MAX)
            .map(StreamId)
        else {
            return Err(Error::StreamIdsExhausted);
        };
        self.next_stream += 2;
        self.streams.insert(
            id,
            StreamState::new(
                OpenPhase::Opening,
                peer.stream_window,
                self.limits.stream_window,
                self.now,
            ),
        );
        self.stats.streams_opened += 1;
        self.queue(&Frame::Open { id, target });
        self.probe();
        if self.probe.is_none() && !self.config.probe_timeout.is_zero() {
            self.open_check.get_or_insert(self.now + PROBE_QUIET);
        }
        Ok(id)
    }

    /// Server: accepts the stream the agent asked for; its buffered data becomes readable.
    pub fn accept_open(&mut self, id: StreamId) -> Result<(), Error> {
        self.check_alive()?;
        let s = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
        if s.phase != OpenPhase::PendingAccept {
            return Err(Error::NotPendingOpen(id));
        }
        s.phase = OpenPhase::Open;
        let readable = s.recv.buffered() > 0 || s.recv.fin_received;
        self.queue(&Frame::OpenResult { id, result: Ok(()) });
        if readable {
            self.signal_readable(id);
        }
        Ok(())
    }

    /// Server: refuses the stream the agent asked for; it no longer exists.
    pub fn refuse_open(&mut self, id: StreamId, refusal: OpenRefusal) -> Result<(), Error> {
        self.check_alive()?;
        let s = self.streams.get(&id).ok_or(Error::UnknownStream(id))?;
        if s.phase != OpenPhase::PendingAccept {
            return Err(Error::NotPendingOpen(id));
        }
        self.remove_stream(id);
        self.queue(&Frame::OpenResult {
            id,
            result: Err(refusal),
        });
        self.check_drain();
        Ok(())
    }

    /// The sending half of stream `id`.
    pub fn send_stream(&mut self, id: StreamId) -> SendStream<'_> {
        SendStream { conn: self, id }
    }

    /// The receiving half of stream `id`.
    pub fn recv_stream(&mut self, id: StreamId) -> RecvStream<'_> {
        RecvStream { conn: self, id }
    }

    // ----- shutdown -----

    /// Graceful shutdown: tells the peer no new streams will be taken; the connection is
    /// drained once every open stream has ended.
    pub fn go_away(&mut self, now: Instant) {
        self.go_away_with(now, "shutting down");
    }

    fn go_away_with(&mut self, now: Instant, detail: &str) {
        self.advance(now);
        if self.go_away_sent || !matches!(self.closing, Closing::No) {
            return;
        }
        self.go_away_sent = true;
        let last = self.last_stream_id();
        self.queue(&Frame::GoAway {
            last_stream: last,
            code: ErrorCode::NO_ERROR,
            detail: detail.into(),
        });
        if self.phase != Phase::Ready {
            self.closing = Closing::Flushing;
            self.streams.clear();
            self.windows_grown = 0;
            return;
        }
        self.check_drain();
    }

    /// Immediate close: every stream is dropped and the peer told `code` and `detail`.
    pub fn close(&mut self, now: Instant, code: ErrorCode, detail: &str) {
        self.advance(now);
        if !matches!(self.closing, Closing::No) {
            return;
        }
        let last = self.last_stream_id();
        self.queue(&Frame::GoAway {
            last_stream: last,
            code,
            detail: detail.to_owned(),
        });
        self.fail(Error::LocallyClosed(code), false);
    }

    // ----- internals: streams -----

    fn check_alive(&self) -> Result<(), Error> {
        if matches!(self.closing, Closing::No) {
            Ok(())
        } else {
            Err(Error::ConnectionClosed)
        }
    }

    pub(crate) fn stream_write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, Error> {
        let n = self.stream_write_len(id, data.len())?;
        if let Some(s) = self.streams.get_mut(&id) {
            s.send.buf.extend_from_slice(&data[..n]);
        }
        self.schedule(id);
        Ok(n)
    }

    pub(crate) fn stream_write_bytes(
        &mut self,
        id: StreamId,
        mut data: Bytes,
    ) -> Result<usize, Error> {
        let n = self.stream_write_len(id, data.len())?;
        if let Some(s) = self.streams.get_mut(&id) {
            // Splitting shares the allocation: the bytes past `n` stay with the caller.
            let taken = if n == data.len() {
                data
            } else {
                data.split_to(n)
            };
            s.send.buf.push(taken);
        }
        self.schedule(id);
        Ok(n)
    }

    /// Checks that stream `id` may take a write of `len` bytes and returns how many it
    /// takes now (0 only when `len` is 0). Shared by both write calls, so they refuse and
    /// block alike.
    fn stream_write_len(&mut self, id: StreamId, len: usize) -> Result<usize, Error> {
        self.check_alive()?;
        let side = self.side;
        let send_buffer = self.config.sanitized_send_buffer();
        let s = self.app_stream_mut(id)?;
        if side == Side::Server && s.phase != OpenPhase::Open {
            return Err(Error::NotOpen(id));
        }
        if s.send.fin != Fin::Open {
            return Err(Error::StreamFinished(id));
        }
        if len == 0 {
            return Ok(0);
        }
        let n = s.send.writable(send_buffer).min(len);
        if n == 0 {
            s.send.blocked = true;
            return Err(Error::Blocked);
        }
        Ok(n)
    }

    pub(crate) fn stream_writable(&self, id: StreamId) -> Result<usize, Error> {
        self.check_alive()?;
        let s = self
            .streams
            .get(&id)
            .filter(|s| !s.let_go())
            .ok_or(Error::UnknownStream(id))?;
        // As `stream_write_len` judges it, so that room promised is room a write gets.
        if self.side == Side::Server && s.phase != OpenPhase::Open {
            return Err(Error::NotOpen(id));
        }
        if s.send.fin != Fin::Open {
            return Err(Error::StreamFinished(id));
        }
        Ok(s.send.writable(self.config.sanitized_send_buffer()))
    }

    pub(crate) fn stream_finish(&mut self, id: StreamId) -> Result<(), Error> {
        self.check_alive()?;
        let side = self.side;
        let s = self.app_stream_mut(id)?;
        if side == Side::Server && s.phase != OpenPhase::Open {
            return Err(Error::NotOpen(id));
        }
        if s.send.fin != Fin::Open {
            return Err(Error::StreamFinished(id));
        }
        s.send.fin = Fin::Queued;
        self.schedule(id);
        Ok(())
    }

    pub(crate) fn stream_reset(&mut self, id: StreamId, code: ErrorCode) -> Result<(), Error> {
        self.check_alive()?;
        if !self.streams.contains_key(&id) {
            return Err(Error::UnknownStream(id));
        }
        self.remove_stream(id);
        self.queue(&Frame::Reset { id, code });
        self.check_drain();
        Ok(())
    }

    pub(crate) fn stream_reset_after_sent(
        &mut self,
        id: StreamId,
        code: ErrorCode,
    ) -> Result<(), Error> {
        self.check_alive()?;
        let s = self.app_stream_mut(id)?;
        if !s.send.has_output() {
            return self.stream_reset(id, code);
        }
        s.send.reset_after = Some(code);
        s.send.blocked = false;
        // Nobody will read them: their memory goes now, and the peer gets no more credit.
        s.recv.clear();
        self.schedule(id);
        Ok(())
    }

    /// A stream the application may still use: not one whose reset waits for its last
    /// bytes to go out, which the application has let go of.
    fn app_stream_mut(&mut self, id: StreamId) -> Result<&mut StreamState, Error> {
        self.streams
            .get_mut(&id)
            .filter(|s| !s.let_go())
            .ok_or(Error::UnknownStream(id))
    }

    pub(crate) fn stream_read(&mut self, id: StreamId, max: usize) -> Result<Option<Bytes>, Error> {
        self.check_alive()?;
        let s = self.app_stream_mut(id)?;
        if s.phase != OpenPhase::Open {
            return Err(Error::NotOpen(id));
        }
        if max == 0 {
            // Nothing is taken, and a reader told Blocked waits for `Readable`: only true
            // when nothing waits, and then that event must come.
            if s.recv.buffered() > 0 || s.recv.fin_received {
                return Ok(Some(Bytes::new()));
            }
            s.recv.signalled = false;
            return Err(Error::Blocked);
        }
        if let Some(chunk) = s.recv.take(max) {
            let n = chunk.len() as u64;
            // No credit after FIN: the peer cannot use it.
            if !s.recv.fin_received {
                if let Some(released) = s.recv.window.on_release(n) {
                    let increment = self.resize_window(id, released);
                    // All of it held back: the window shrank by what was released.
                    if increment > 0 {
                        self.queue(&Frame::WindowUpdate { id, increment });
                    }
                }
            }
            return Ok(Some(chunk));
        }
        if s.recv.fin_received {
            s.recv.fin_read = true;
            if s.is_done() {
                self.remove_stream(id);
                self.check_drain();
            }
            return Ok(None);
        }
        s.recv.signalled = false;
        Err(Error::Blocked)
    }

    fn schedule(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.scheduled && s.send.has_output() {
                s.scheduled = true;
                self.sendable.push_back(id);
            }
        }
    }

    fn signal_readable(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.recv.signalled {
                s.recv.signalled = true;
                self.events
                    .push_back(Event::Stream(StreamEvent::Readable { id }));
            }
        }
    }

    /// Server: whether the agent's streams fill `max_streams`. The agent forgets a stream
    /// once its FIN has gone both ways; this side keeps it until its application has read
    /// the agent's FIN as well, which can come after the agent's next OPEN. Those streams
    /// do not count, or an open the agent was entitled to would be refused; but no more
    /// than `max_streams` of them, so that an application that never reads cannot let the
    /// streams (and their sockets) grow without bound.
    fn at_stream_limit(&self) -> bool {
        let max = self.limits.max_streams as usize;
        if self.streams.len() < max {
            return false;
        }
        if self.streams.len() >= max.saturating_mul(2) {
            return true;
        }
        let counted = self
            .streams
            .values()
            .filter(|s| !(s.send.is_done() && s.recv.fin_received))
            .count();
        counted >= max
    }

    fn remove_stream(&mut self, id: StreamId) {
        self.take_stream(id);
    }

    /// Removes stream `id`, giving its window's growth back to the budget.
    fn take_stream(&mut self, id: StreamId) -> Option<StreamState> {
        let s = self.streams.remove(&id)?;
        if s.scheduled {
            // The round-robin skips ids that are gone, but only those it reaches: one
            // starved of connection credit stops at its first stream, and ids gone behind
            // it would pile up for as long as the peer withholds credit.
            self.sendable.retain(|&queued| queued != id);
        }
        let grown = u64::from(s.recv.window.window() - self.limits.stream_window);
        debug_assert!(self.windows_grown >= grown, "window growth counted short");
        self.windows_grown -= grown;
        Some(s)
    }

    /// Called as stream `id` returns `released` bytes of credit; returns the increment to
    /// send. The window follows the pace of the stream's reader, measured over a horizon
    /// of [`RATE_HORIZON_RTTS`] round trips (at least [`MIN_RATE_HORIZON`]), not over one
    /// update: a reader behind a socket takes what its socket buffer frees, a megabyte or
    /// more at once, between long pauses, so two quick updates in a row do not show that
    /// the window holds it back. When the window is smaller than what the reader takes in
    /// `WINDOW_GROWTH_RTTS` round trips at that pace, it grows by up to its size (up to
    /// `Config::max_stream_window`, within `Config::window_growth_budget`), added to the
    /// update; when it is more than four times that, it halves (not below the initial
    /// window), held back from the update, and gives that back to the budget; in between,
    /// it stays.
    fn resize_window(&mut self, id: StreamId, released: u32) -> u32 {
        let rtt = self.stats.rtt.unwrap_or(INITIAL_RTT).max(MIN_GROWTH_RTT);
        let horizon = (rtt * RATE_HORIZON_RTTS).max(MIN_RATE_HORIZON).as_nanos();
        let max = self.config.sanitized_max_stream_window();
        let initial = self.limits.stream_window;
        let room = self
            .config
            .window_growth_budget
            .saturating_sub(self.windows_grown)
            .min(u64::from(u32::MAX)) as u32;
        let now = self.now;
        let Some(s) = self.streams.get_mut(&id) else {
            return released;
        };
        let since = now.saturating_duration_since(s.recv.last_update).as_nanos();
        s.recv.last_update = now;
        // What was taken `since` ago counts `horizon / (since + horizon)`: about what the
        // reader took in the last horizon, without keeping a history.
        let lately =
            (u128::from(s.recv.taken_lately) + u128::from(released)) * horizon / (since + horizon);
        s.recv.taken_lately = lately.min(u128::from(u64::MAX)) as u64;
        // What the reader takes in `WINDOW_GROWTH_RTTS` round trips at that pace.
        let wanted = lately * (rtt * crate::config::WINDOW_GROWTH_RTTS).as_nanos() / horizon;
        let window = s.recv.window.window();
        let increment = if wanted > u128::from(window) {
            let grown = s.recv.window.grow(window.min(room), max);
            self.windows_grown += u64::from(grown);
            released + grown
        } else if wanted < u128::from(window / 4) {
            let shrunk = s.recv.window.shrink(window / 2, initial, released);
            self.windows_grown -= u64::from(shrunk);
            released - shrunk
        } else {
            released
        };
        self.check_invariants();
        increment
    }

    /// Moves the connection's clock to `now`, never back.
    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Whether `id` names a stream that existed once and is gone (late frames for it are
    /// ignored), as opposed to one that never existed (a protocol error).
    fn was_opened(&self, id: StreamId) -> bool {
        id.is_agent_initiated() && u64::from(id.0) < self.next_stream
    }

    fn last_stream_id(&self) -> StreamId {
        StreamId(u32::try_from(self.next_stream.saturating_sub(2)).unwrap_or(u32::MAX))
    }

    fn transmit_data<T: Transmit>(&mut self, out: &mut T) {
        let max_frame = self
            .peer
            .map_or(MIN_MAX_FRAME_LEN, |p| p.limits.max_frame_len)
            .min(self.config.data_frame_len.max(1)) as usize;
        // A zero batch would never send stream data.
        let mut budget = self.config.transmit_batch.max(1);
        let mut rounds = self.sendable.len();
        while budget > 0 && rounds > 0 {
            let Some(id) = self.sendable.pop_front() else {
                break;
            };
            rounds -= 1;
            let conn_credit = self.conn_send.credit();
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.scheduled = false;
            if !s.send.has_output() {
                continue;
            }
            let avail = s.send.buf.len();
            let n = avail
                .min(max_frame)
                .min(usize::try_from(conn_credit).unwrap_or(usize::MAX))
                .min(budget);
            if n == 0 && avail > 0 {
                // Out of connection credit (or budget): keep its turn for later.
                s.scheduled = true;
                self.sendable.push_front(id);
                break;
            }
            let fin = s.send.fin == Fin::Queued && n == avail;
            out.data(id, fin, &mut s.send.buf, n);
            s.send.window.consume(n as u64);
            s.send.sent += n as u64;
            if s.send.blocked
                && s.send.fin == Fin::Open
                && s.send.writable(self.config.sanitized_send_buffer()) > 0
            {
                // Blocked by a full send buffer rather than by credit: room again.
                s.send.blocked = false;
                self.events
                    .push_back(Event::Stream(StreamEvent::Writable { id }));
            }
            self.conn_send.consume(n as u64);
            self.stats.bytes_sent += n as u64;
            self.stats.frames_sent += 1;
            budget = budget.saturating_sub(n + HEADER_LEN);
            if fin {
                s.send.fin = Fin::Sent;
                if s.is_done() {
                    self.remove_stream(id);
                    self.check_drain();
                    continue;
                }
            }
            if let (Some(code), false) = (s.send.reset_after, s.send.has_output()) {
                self.remove_stream(id);
                self.queue(&Frame::Reset { id, code });
                // Right behind the stream's last frame: queued control frames would
                // otherwise go out first, at the start of the next transmit.
                out.control(&mut self.ctrl);
                self.check_drain();
                continue;
            }
            if s.send.has_output() {
                s.scheduled = true;
                self.sendable.push_back(id);
                rounds += 1;
            }
        }
    }

    // ----- internals: frames -----

    fn queue(&mut self, frame: &Frame) {
        frame.encode(&mut self.ctrl);
        self.stats.frames_sent += 1;
    }

    fn violation(&mut self, code: ErrorCode, detail: impl Into<String>) {
        self.fail(Error::protocol(code, detail), true);
    }

    /// Ends the connection: drops every stream, tells the peer (when `tell`), and raises
    /// [`Event::ConnectionLost`] once.
    fn fail(&mut self, reason: Error, tell: bool) {
        if !matches!(self.closing, Closing::No) {
            return;
        }
        if tell {
            let last = self.last_stream_id();
            self.queue(&Frame::GoAway {
                last_stream: last,
                code: reason.code(),
                detail: reason.to_string(),
            });
        }
        tracing::debug!(side = ?self.side, %reason, "tunnel connection lost");
        self.streams.clear();
        self.windows_grown = 0;
        self.sendable.clear();
        self.closing = Closing::Flushing;
        if !self.lost {
            self.lost = true;
            self.events.push_back(Event::ConnectionLost { reason });
        }
    }

    fn become_ready(&mut self, now: Instant, principal: String) {
        self.phase = Phase::Ready;
        // The idle clock starts now: while the server application decides on the auth,
        // the agent has nothing to send, and the handshake deadline covers that wait.
        self.heard(now);
        // The first ping goes out at once: its round trip sizes the streams' windows.
        self.next_ping = Some(now);
        self.events.push_back(Event::Ready { principal });
    }

    fn check_drain(&mut self) {
        if (self.go_away_sent || self.go_away_received)
            && self.streams.is_empty()
            && matches!(self.closing, Closing::No)
        {
            self.closing = Closing::Flushing;
        }
    }

    /// Handles one decoded frame; a DATA payload shares receive allocation `from`.
    fn on_frame(&mut self, now: Instant, frame: Frame, from: Allocation) {
        match frame {
            Frame::Hello(h) => self.on_hello(h),
            _ if self.phase == Phase::AwaitHello => {
                self.violation(ErrorCode::PROTOCOL, "frame before hello")
            }
            Frame::Auth { method, payload } => self.on_auth(now, method, payload),
            Frame::AuthResult(r) => self.on_auth_result(now, r),
            Frame::Ping { ack: false, opaque } => self.queue(&Frame::Ping { ack: true, opaque }),
            Frame::Ping { ack: true, opaque } => self.on_pong(now, opaque),
            Frame::GoAway {
                last_stream,
                code,
                detail,
            } => self.on_go_away(last_stream, code, detail),
            Frame::WindowUpdate { id, increment } if id == StreamId::CONNECTION => {
                if self.conn_send.grant(increment).is_err() {
                    self.violation(ErrorCode::FLOW_CONTROL, "connection window above 2^31-1");
                }
            }
            _ if self.phase != Phase::Ready => self.violation(
                ErrorCode::PROTOCOL,
                "stream frame before the handshake completed",
            ),
            Frame::Open { id, target } => self.on_open(id, target),
            Frame::OpenResult { id, result } => self.on_open_result(id, result),
            Frame::Data { id, fin, payload } => self.on_data(id, fin, payload, from),
            Frame::WindowUpdate { id, increment } => self.on_window_update(id, increment),
            Frame::Reset { id, code } => self.on_reset(id, code),
        }
    }

    fn on_hello(&mut self, h: Hello) {
        if self.phase != Phase::AwaitHello {
            return self.violation(ErrorCode::PROTOCOL, "second hello");
        }
        let ours = Hello::ours(self.limits);
        if let Err(e) = ours.negotiate(&h) {
            return self.fail(e, true);
        }
        if h.limits.max_frame_len < MIN_MAX_FRAME_LEN
            || h.limits.stream_window == 0
            || h.limits.stream_window > crate::MAX_WINDOW
            || h.limits.connection_window == 0
            || h.limits.connection_window > crate::MAX_WINDOW
            // An agent could open nothing through the tunnel, and would wait for ever.
            || (self.side == Side::Agent && h.limits.max_streams == 0)
        {
            return self.violation(ErrorCode::PROTOCOL, "hello limits out of range");
        }
        self.conn_send = SendWindow::new(h.limits.connection_window);
        self.peer = Some(h);
        self.phase = match self.side {
            Side::Agent => Phase::AwaitAuthResult,
            Side::Server => Phase::AwaitAuth,
        };
    }

    fn on_auth(&mut self, now: Instant, method: String, payload: Bytes) {
        if self.side != Side::Server || self.phase != Phase::AwaitAuth {
            return self.violation(ErrorCode::PROTOCOL, "unexpected auth frame");
        }
        if self.config.require_auth {
            self.phase = Phase::AuthPending;
            self.events
                .push_back(Event::AuthRequested(AuthRequest { method, payload }));
        } else {
            self.queue(&Frame::AuthResult(AuthResult::Accepted {
                principal: String::new(),
                lifetime_secs: 0,
            }));
            self.become_ready(now, String::new());
        }
    }

    fn on_auth_result(&mut self, now: Instant, r: AuthResult) {
        if self.side != Side::Agent || self.phase != Phase::AwaitAuthResult {
            return self.violation(ErrorCode::PROTOCOL, "unexpected auth result");
        }
        match r {
            AuthResult::Accepted { principal, .. } => self.become_ready(now, principal),
            // The server closes the connection itself; nothing to tell it.
            AuthResult::Rejected { failure, detail } => {
                self.fail(Error::AuthRejected { failure, detail }, false)
            }
        }
    }

    fn on_pong(&mut self, now: Instant, opaque: u64) {
        if self.probe.is_some_and(|p| p.opaque == opaque) {
            self.probe = None;
        }
        if let Some((sent_id, at)) = self.ping_outstanding {
            if sent_id == opaque {
                self.ping_outstanding = None;
                let sample = now.saturating_duration_since(at);
                self.stats.rtt = Some(match self.stats.rtt {
                    None => sample,
                    Some(r) => (r * 7 + sample) / 8,
                });
            }
        }
    }

    fn on_go_away(&mut self, last_stream: StreamId, code: ErrorCode, detail: String) {
        if code != ErrorCode::NO_ERROR {
            return self.fail(Error::PeerClosed { code, detail }, false);
        }
        if self.side == Side::Agent {
            // Opens the server will never process: refuse them here instead of waiting.
            let unprocessed: Vec<(StreamId, bool)> = self
                .streams
                .iter()
                .filter(|(id, s)| id.0 > last_stream.0 && s.phase == OpenPhase::Opening)
                .map(|(id, s)| (*id, !s.let_go()))
                .collect();
            for (id, told) in unprocessed {
                self.remove_stream(id);
                // A stream the application has reset hears no more about it.
                if told {
                    self.events.push_back(Event::Stream(StreamEvent::Refused {
                        id,
                        refusal: OpenRefusal::new(
                            RefusalReason::GoingAway,
                            "server is shutting down",
                        ),
                    }));
                }
            }
        }
        if !self.go_away_received {
            self.go_away_received = true;
            self.events.push_back(Event::GoAway { code, detail });
        }
        if self.phase != Phase::Ready {
            self.closing = Closing::Flushing;
            return;
        }
        self.check_drain();
    }

    fn on_open(&mut self, id: StreamId, target: Target) {
        if self.side != Side::Server {
            return self.violation(ErrorCode::PROTOCOL, "the server cannot open streams");
        }
        if !id.is_agent_initiated() || u64::from(id.0) < self.next_stream {
            return self.violation(
                ErrorCode::PROTOCOL,
                format!("stream id {id} is not a new agent stream id"),
            );
        }
        self.next_stream = u64::from(id.0) + 2;
        self.stats.streams_opened += 1;
        let refusal = if self.go_away_sent {
            Some(OpenRefusal::new(
                RefusalReason::GoingAway,
                "server is shutting down",
            ))
        } else if self.at_stream_limit() {
            Some(OpenRefusal::new(
                RefusalReason::TooManyStreams,
                format!("limit of {} streams reached", self.limits.max_streams),
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.queue(&Frame::OpenResult {
                id,
                result: Err(refusal),
            });
            return;
        }
        let peer = self.peer_limits().unwrap_or_default();
        self.streams.insert(
            id,
            StreamState::new(
                OpenPhase::PendingAccept,
                peer.stream_window,
                self.limits.stream_window,
                self.now,
            ),
        );
        self.events
            .push_back(Event::Stream(StreamEvent::OpenRequested { id, target }));
    }

    fn on_open_result(&mut self, id: StreamId, result: Result<(), OpenRefusal>) {
        if self.side != Side::Agent {
            return self.violation(ErrorCode::PROTOCOL, "the agent does not answer opens");
        }
        let Some(s) = self.streams.get_mut(&id) else {
            if self.was_opened(id) {
                return; // We reset it meanwhile.
            }
            return self.violation(
                ErrorCode::PROTOCOL,
                format!("open result for unknown stream {id}"),
            );
        };
        if s.phase != OpenPhase::Opening {
            return self.violation(
                ErrorCode::PROTOCOL,
                format!("second open result for stream {id}"),
            );
        }
        // A stream the application has reset (its last bytes still going out) hears no
        // more about it.
        let told = !s.let_go();
        match result {
            Ok(()) => {
                s.phase = OpenPhase::Open;
                if told {
                    self.events
                        .push_back(Event::Stream(StreamEvent::Opened { id }));
                }
            }
            Err(refusal) => {
                self.remove_stream(id);
                if told {
                    self.events
                        .push_back(Event::Stream(StreamEvent::Refused { id, refusal }));
                }
                self.check_drain();
            }
        }
    }

    fn on_data(&mut self, id: StreamId, fin: bool, payload: Bytes, from: Allocation) {
        let n = payload.len() as u64;
        if self.conn_recv.on_receive(n).is_err() {
            return self.violation(ErrorCode::FLOW_CONTROL, "data beyond the connection window");
        }
        // Connection credit comes back as soon as the bytes are processed: the stream
        // windows bound what is buffered, so a stalled stream cannot starve the others.
        if let Some(increment) = self.conn_recv.on_release(n) {
            self.queue(&Frame::WindowUpdate {
                id: StreamId::CONNECTION,
                increment,
            });
        }
        self.stats.bytes_received += n;
        let side = self.side;
        let Some(s) = self.streams.get_mut(&id) else {
            if self.was_opened(id) {
                return; // Crossed our reset; dropped.
            }
            return self.violation(ErrorCode::PROTOCOL, format!("data on unknown stream {id}"));
        };
        if side == Side::Agent && s.phase == OpenPhase::Opening {
            return self.violation(
                ErrorCode::PROTOCOL,
                format!("data on stream {id} before its open result"),
            );
        }
        if s.recv.fin_received {
            return self.violation(
                ErrorCode::STREAM_CLOSED,
                format!("data on stream {id} after its FIN"),
            );
        }
        if s.recv.window.on_receive(n).is_err() {
            return self.violation(
                ErrorCode::FLOW_CONTROL,
                format!("data beyond the window of stream {id}"),
            );
        }
        s.recv.received += n;
        // Recorded on a stream let go too, so that DATA after its FIN is still refused.
        if fin {
            s.recv.fin_received = true;
        }
        if s.let_go() {
            return; // Reset by the application; only its last bytes still go out.
        }
        if !payload.is_empty() {
            self.stats.rx_copied += s.recv.push(payload, from) as u64;
        }
        if s.phase == OpenPhase::Open && (n > 0 || fin) {
            self.signal_readable(id);
        }
    }

    fn on_window_update(&mut self, id: StreamId, increment: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            if self.was_opened(id) {
                return;
            }
            return self.violation(
                ErrorCode::PROTOCOL,
                format!("window update for unknown stream {id}"),
            );
        };
        if s.send.window.grant(increment).is_err() {
            return self.violation(
                ErrorCode::FLOW_CONTROL,
                format!("window of stream {id} above 2^31-1"),
            );
        }
        if s.send.blocked && s.send.fin == Fin::Open {
            s.send.blocked = false;
            self.events
                .push_back(Event::Stream(StreamEvent::Writable { id }));
        }
    }

    fn on_reset(&mut self, id: StreamId, code: ErrorCode) {
        if !self.streams.contains_key(&id) {
            if self.was_opened(id) {
                return;
            }
            return self.violation(ErrorCode::PROTOCOL, format!("reset of unknown stream {id}"));
        }
        let Some(s) = self.take_stream(id) else {
            return;
        };
        if !s.let_go() {
            let unread = s.recv.into_unread();
            self.events
                .push_back(Event::Stream(StreamEvent::Reset { id, code, unread }));
        }
        self.check_drain();
    }

    /// Internal consistency, checked in debug builds after every input.
    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            for (id, s) in &self.streams {
                debug_assert!(
                    s.send.buf.len() as u64 <= s.send.window.credit(),
                    "stream {id}: buffered beyond credit"
                );
                debug_assert!(
                    s.recv.buffered() as u64 <= u64::from(s.recv.window.window()),
                    "stream {id}: received beyond the window"
                );
                debug_assert!(
                    s.recv.window.window() <= self.config.sanitized_max_stream_window()
                        && s.recv.window.window() >= self.limits.stream_window,
                    "stream {id}: window outside its range"
                );
                debug_assert!(
                    s.recv.window.holds(s.recv.buffered()),
                    "stream {id}: window accounting"
                );
                debug_assert!(
                    s.recv.pinned() as u64
                        <= RecvState::pin_limit(
                            self.largest_allocation,
                            self.config.sanitized_max_stream_window()
                        ),
                    "stream {id}: its unread chunks keep too much alive"
                );
            }
            let grown: u64 = self
                .streams
                .values()
                .map(|s| u64::from(s.recv.window.window() - self.limits.stream_window))
                .sum();
            debug_assert_eq!(grown, self.windows_grown, "window growth accounting");
            debug_assert!(
                grown <= self.config.window_growth_budget,
                "window growth beyond the budget"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's HELLO that allows no stream ends the agent's connection with a
    /// protocol error, rather than leaving it ready with nothing it could open.
    #[test]
    fn a_server_hello_allowing_no_stream_is_refused() {
        let now = Instant::now();
        for max_streams in [0, 1] {
            let mut a = Connection::agent(Arc::new(Config::default()), Credentials::none(), now);
            let mut wire = Vec::new();
            let limits = Limits {
                max_streams,
                ..Limits::default()
            };
            Frame::Hello(Hello::ours(limits)).encode(&mut wire);
            a.handle_input(now, &wire);
            let lost = std::iter::from_fn(|| a.poll()).find_map(|e| match e {
                Event::ConnectionLost { reason } => Some(reason.code()),
                _ => None,
            });
            let want = (max_streams == 0).then_some(ErrorCode::PROTOCOL);
            assert_eq!(lost, want, "max_streams {max_streams}");
        }
    }

    /// Streams that end while the round-robin is starved of connection credit leave no
    /// ids behind in it: a peer that withholds credit must not make it grow with every
    /// stream the application abandons.
    #[test]
    fn streams_gone_while_connection_credit_is_withheld_leave_no_ids_queued() {
        let now = Instant::now();
        let mut a = Connection::agent(Arc::new(Config::default()), Credentials::none(), now);
        let mut wire = Vec::new();
        let limits = Limits {
            connection_window: 1,
            ..Limits::default()
        };
        Frame::Hello(Hello::ours(limits)).encode(&mut wire);
        Frame::AuthResult(AuthResult::Accepted {
            principal: String::new(),
            lifetime_secs: 0,
        })
        .encode(&mut wire);
        assert_eq!(a.handle_input(now, &wire), wire.len());
        assert!(a.is_ready());
        let target = || crate::Target::parse("example.com:80").expect("a target");
        let stuck = a.open(now, target()).expect("open");
        a.send_stream(stuck)
            .write(b"waits for credit")
            .expect("write");
        let mut out = Vec::new();
        for _ in 0..1000 {
            let id = a.open(now, target()).expect("open");
            a.send_stream(id).write(b"request").expect("write");
            a.send_stream(id).reset(ErrorCode::CANCEL).expect("reset");
            out.clear();
            a.poll_transmit(now, &mut out);
        }
        assert_eq!(a.streams.len(), 1);
        assert!(a.sendable.len() <= 1, "{} ids queued", a.sendable.len());
    }

    #[test]
    fn the_receive_allocation_is_taken_back_once_its_payloads_are_gone() {
        let mut c = Connection::server(Arc::new(Config::default()), Instant::now());
        c.rx.extend_from_slice(&[1; RX_ALLOC]);
        let first = c.rx.as_ptr();
        // A decoded payload shares the allocation, as DATA payloads do.
        let payload = c.rx.split_to(RX_ALLOC - 3).freeze();
        c.reserve_rx(100);
        assert_eq!(&c.rx[..], [1, 1, 1], "the partial frame moves along");
        assert!(c.rx.capacity() >= 103);
        assert_ne!(c.rx.as_ptr(), first, "still shared: a fresh allocation");

        let room = c.rx.capacity() - c.rx.len();
        c.rx.extend_from_slice(&vec![2; room]);
        let len = c.rx.len();
        let payload2 = c.rx.split_to(len - 1).freeze();
        drop(payload);
        c.reserve_rx(100);
        assert_eq!(c.rx.as_ptr(), first, "the first allocation came back");
        assert_eq!(&c.rx[..], [2]);
        assert!(payload2.iter().all(|&b| b == 1 || b == 2));
    }

    /// Fills the receive buffer with `byte` and takes all but its last byte out as one
    /// payload, as decoding DATA frames does; returns the payload and the allocation it
    /// came from.
    fn fill_and_split(c: &mut Connection, byte: u8) -> (Bytes, *const u8) {
        c.reserve_rx(RX_ALLOC / 2);
        let room = c.rx.capacity() - c.rx.len();
        c.rx.extend_from_slice(&vec![byte; room]);
        let start = c.rx.as_ptr();
        let len = c.rx.len();
        (c.rx.split_to(len - 1).freeze(), start)
    }

    /// Whether each payload still holds only the bytes it was filled with (apart from the
    /// first, the previous fill's last byte, moved along as a partial frame is).
    fn intact(payloads: &[(Bytes, u8)]) -> bool {
        payloads
            .iter()
            .all(|(p, byte)| p[1..].iter().all(|b| b == byte))
    }

    #[test]
    fn a_reader_several_allocations_behind_still_gets_them_back() {
        let mut c = Connection::server(Arc::new(Config::default()), Instant::now());
        let mut unread: VecDeque<_> = (0..4u8)
            .map(|i| {
                let (payload, start) = fill_and_split(&mut c, i);
                (payload, i, start)
            })
            .collect();
        let made = c.stats().rx_allocations;
        assert_eq!(
            made, 3,
            "the first fill uses the first allocation, the others fresh ones"
        );
        // The reader catches up with the oldest allocation only: the next fill reuses it
        // instead of making another.
        let (payload, _, oldest) = unread.pop_front().unwrap_or_else(|| unreachable!());
        drop(payload);
        let (fifth, start) = fill_and_split(&mut c, 4);
        assert_eq!(c.stats().rx_allocations, made, "no new allocation");
        assert_eq!(start, oldest, "the oldest allocation came back");
        // Nothing read since: the next fill needs a fresh one.
        let (sixth, _) = fill_and_split(&mut c, 5);
        assert_eq!(c.stats().rx_allocations, made + 1);
        // One stream left unread holds the oldest; a newer one freed is taken back.
        let (payload, _, middle) = unread.remove(1).unwrap_or_else(|| unreachable!());
        drop(payload);
        let (seventh, start) = fill_and_split(&mut c, 6);
        assert_eq!(c.stats().rx_allocations, made + 1, "no new allocation");
        assert_eq!(start, middle, "the freed allocation came back");
        // Reuse never touched what a payload still holds.
        let mut held: Vec<_> = unread.into_iter().map(|(p, i, _)| (p, i)).collect();
        held.extend([(fifth, 4), (sixth, 5), (seventh, 6)]);
        assert!(intact(&held));
    }

    #[test]
    fn the_spare_allocations_stay_bounded_and_free_ones_are_given_back() {
        let mut c = Connection::server(Arc::new(Config::default()), Instant::now());
        let mut held: Vec<_> = (0..RX_SPARES as u8 * 3)
            .map(|i| (fill_and_split(&mut c, i).0, i))
            .collect();
        assert!(
            c.rx_spares.len() <= RX_SPARES,
            "{} spares",
            c.rx_spares.len()
        );
        assert!(intact(&held));
        // Half the payloads read: their allocations are free, the others still shared.
        let read = held.len() / 2;
        held.drain(..read);
        c.release_free_rx_spares();
        let kept = c.rx_spares.len();
        for (payload, _) in held.drain(..) {
            drop(payload);
        }
        c.release_free_rx_spares();
        assert!(kept > 0, "spares still shared were given back");
        assert!(
            c.rx_spares.is_empty(),
            "{} free spares kept",
            c.rx_spares.len()
        );
    }

    #[test]
    fn a_large_frame_moves_at_most_once_while_it_arrives() {
        const LEN: usize = 1 << 20;
        let config = Config {
            limits: Limits {
                max_frame_len: LEN as u32,
                ..Limits::default()
            },
            ..Config::default()
        };
        let mut c = Connection::server(Arc::new(config), Instant::now());
        let mut input = Vec::new();
        crate::frame::encode_data_header(&mut input, StreamId(1), false, LEN);
        input.extend((0..LEN).map(|i| i as u8));
        let mut moves = 0;
        let mut frame = None;
        // As `handle_input` feeds it: slices of INPUT_SLICE bytes, decoding after each.
        for piece in input.chunks(INPUT_SLICE) {
            let before = c.rx.as_ptr();
            let buffered = c.rx.len();
            c.reserve_rx(piece.len());
            moves += usize::from(buffered > 0 && c.rx.as_ptr() != before);
            c.rx.extend_from_slice(piece);
            if let Some(f) = c.decoder.decode_shared(&mut c.rx).unwrap() {
                frame = Some(f);
            }
        }
        assert!(moves <= 1, "the partial frame moved {moves} times");
        let Some(Frame::Data { payload, .. }) = frame else {
            panic!("no DATA frame decoded: {frame:?}");
        };
        assert_eq!(payload.len(), LEN);
        assert!(payload.iter().enumerate().all(|(i, &b)| b == i as u8));
    }
}
