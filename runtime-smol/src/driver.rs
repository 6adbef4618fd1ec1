//! The connection driver: one task owns the socket, the TLS session and the
//! `fluidity-proto` connection, and moves bytes between them.
//!
//! Each turn of the driver (see [`Driver`]'s `poll`):
//! 1. read path: socket → `read_tls` → `process_new_packets` → `reader()` →
//!    `handle_input` from rustls's buffer, keeping any plaintext the connection did not
//!    consume;
//! 2. write path: `poll_transmit_chunks` → one vectored `writer()` write → `write_tls`
//!    while the socket takes it;
//! 3. events: wake the stream handles and tell the application;
//! 4. re-arm the one timer at `poll_timeout`.
//!
//! Handles ([`Tunnel`], [`TunnelStream`]) share the state
//! under one mutex; they register their wakers under that lock, so no wakeup is lost, and
//! wake the driver after every change.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use bytes::Bytes;
use event_listener::IntoNotification;
use fluidity_proto::{
    AuthFailure, AuthRequest, Connection, ErrorCode, Event, OpenRefusal, Side, Stats, StreamEvent,
    StreamId, Target,
};
use futures_lite::FutureExt;

use crate::app::LogThrottle;
use crate::relay::consume_chunks;
use crate::stream::TunnelStream;
use crate::timer::LazyTimer;
use crate::tls::{Established, PeerCheck, TlsSession};
use crate::Error;

/// Plaintext or ciphertext handled per driver turn before yielding, so one busy tunnel
/// cannot starve other tasks on the executor.
const TURN_BUDGET: usize = 1024 * 1024;

/// Limit on TLS records waiting for the socket; beyond it the driver stops asking the
/// connection for more output (backpressure to the streams).
const TLS_SEND_LIMIT: usize = 512 * 1024;

/// Size of the driver's socket read buffer. rustls sizes its own reads at 4–16 KiB, one
/// system call each; reading the socket in large pieces and feeding rustls from memory
/// cuts the system calls (and the wake-ups they come with) several times over.
const SOCK_READ_BUF: usize = 64 * 1024;

/// What the application learns from the tunnel, in order.
#[derive(Debug)]
pub enum TunnelEvent {
    /// Server: the agent presented credentials; answer with [`Tunnel::accept_auth`] or
    /// [`Tunnel::reject_auth`].
    AuthRequested(AuthRequest),
    /// The tunnel is ready for streams.
    Ready {
        /// The principal the server admitted.
        principal: String,
    },
    /// Server: the agent asks for a stream; answer with [`Tunnel::accept_open`] or
    /// [`Tunnel::refuse_open`].
    OpenRequested {
        /// The stream.
        id: StreamId,
        /// Where to connect.
        target: Target,
    },
    /// The peer takes no new streams.
    GoAway,
    /// Agent: the server answered nothing for `silent` after a stream was opened or
    /// written to; the tunnel takes no new streams, its unanswered opens were refused so
    /// that they go elsewhere (`fluidity_proto::Event::Unresponsive`), and reads of
    /// streams armed with `ReadChunks::give_up_if_unresponsive` fail.
    Unresponsive {
        /// How long the server had been silent.
        silent: Duration,
    },
    /// The tunnel is over.
    Closed {
        /// Why; `None` after a graceful drain.
        reason: Option<fluidity_proto::Error>,
    },
}

/// What became of a stream's open, as far as its handle knows.
#[derive(Debug, Clone)]
pub(crate) enum SlotState {
    Opening,
    Open,
    Refused(OpenRefusal),
    Reset(ErrorCode),
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) state: SlotState,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// Agent: what the server sent before it reset the stream, still to be read.
    unread: VecDeque<Bytes>,
}

impl Slot {
    fn new(state: SlotState) -> Slot {
        Slot {
            state,
            read_waker: None,
            write_waker: None,
            unread: VecDeque::new(),
        }
    }

    /// Takes up to `max` (more than 0) of the bytes that arrived before a reset.
    pub(crate) fn take_unread(&mut self, max: usize) -> Option<Bytes> {
        let front = self.unread.front_mut()?;
        if front.len() <= max {
            self.unread.pop_front()
        } else {
            Some(front.split_to(max))
        }
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// State shared by the driver and the handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) conn: Connection,
    pub(crate) slots: HashMap<StreamId, Slot>,
    pub(crate) driver_waker: Option<Waker>,
    /// Set once the connection is lost or drained.
    pub(crate) closed: Option<Option<fluidity_proto::Error>>,
    pub(crate) ready: bool,
    /// Set when the server was found unresponsive (`Event::Unresponsive`): reads armed
    /// with `TunnelStream::give_up_if_unresponsive` fail from then on.
    pub(crate) unresponsive: bool,
    ready_wakers: Vec<Waker>,
    events: async_channel::Sender<TunnelEvent>,
    /// Room for streams, for opens that found the server's stream limit reached.
    room: Room,
}

/// Opens waiting for the tunnel to carry fewer streams than the server allows.
#[derive(Debug)]
struct Room {
    /// How many opens wait.
    waiting: usize,
    /// Notified, one waiting open per stream of room (roughly longest waiting first: one
    /// that loses a race queues again), when streams have ended while opens wait; all at
    /// once when no stream can be opened any more (a goaway) and when the tunnel closes.
    freed: event_listener::Event,
    /// Notified once per open that starts waiting for lack of room, and for all when the
    /// tunnel closes: whoever holds an idle stream for reuse may give it up (see
    /// [`Tunnel::room_wanted`]).
    wanted: event_listener::Event,
    /// A tunnel at its limit says so once in a while, not once per open.
    logged: LogThrottle,
}

impl Default for Room {
    fn default() -> Self {
        Room {
            waiting: 0,
            freed: event_listener::Event::new(),
            wanted: event_listener::Event::new(),
            logged: LogThrottle::new(ROOM_LOG_EVERY),
        }
    }
}

impl Room {
    /// Says that the tunnel is at its stream limit, at most once per [`ROOM_LOG_EVERY`].
    fn log_full(&mut self, conn: &Connection) {
        if self.logged.allow(Instant::now()).is_none() {
            return;
        }
        tracing::info!(
            max_streams = conn.peer_limits().map_or(0, |l| l.max_streams),
            "the tunnel carries as many streams as the server allows; new ones wait for one \
             to end (the server's max_streams sets the limit)"
        );
    }
}

/// How often a tunnel at its stream limit says so.
const ROOM_LOG_EVERY: Duration = Duration::from_secs(10);

impl Shared {
    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }

    /// The error a handle reports once the tunnel is gone.
    pub(crate) fn closed_error(&self) -> io::Error {
        match &self.closed {
            Some(Some(reason)) => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("tunnel lost: {reason}"),
            ),
            _ => io::Error::new(io::ErrorKind::ConnectionAborted, "tunnel closed"),
        }
    }

    fn send_event(&self, e: TunnelEvent) {
        // Unbounded, and the receiver may be gone: both fine.
        let _ = self.events.try_send(e);
    }

    /// Moves every proto event to the handles and the application.
    fn dispatch_events(&mut self) {
        while let Some(event) = self.conn.poll() {
            match event {
                Event::AuthRequested(req) => self.send_event(TunnelEvent::AuthRequested(req)),
                // A handshake completed by input that also ended the connection (a
                // server turning the agent away says hello, then goes away at once) is
                // not reported: a tunnel that never carried a stream was never ready.
                Event::Ready { .. } if !self.conn.is_ready() => {}
                Event::Ready { principal } => {
                    self.ready = true;
                    for w in self.ready_wakers.drain(..) {
                        w.wake();
                    }
                    self.send_event(TunnelEvent::Ready { principal });
                }
                Event::Stream(se) => self.on_stream_event(se),
                Event::GoAway { .. } => {
                    self.room.wanted.notify(usize::MAX);
                    self.send_event(TunnelEvent::GoAway);
                }
                Event::Unresponsive { silent } => {
                    // Idle streams kept for reuse are let go, as at a goaway; readers
                    // that would rather go elsewhere are told.
                    self.room.wanted.notify(usize::MAX);
                    self.unresponsive = true;
                    for slot in self.slots.values_mut() {
                        slot.wake_all();
                    }
                    self.send_event(TunnelEvent::Unresponsive { silent });
                }
                Event::ConnectionLost { reason } => self.finish(Some(reason)),
            }
        }
    }

    fn on_stream_event(&mut self, se: StreamEvent) {
        match se {
            StreamEvent::OpenRequested { id, target } => {
                self.slots.insert(id, Slot::new(SlotState::Opening));
                self.send_event(TunnelEvent::OpenRequested { id, target });
            }
            StreamEvent::Opened { id } => {
                if let Some(s) = self.slots.get_mut(&id) {
                    s.state = SlotState::Open;
                    s.wake_all();
                }
            }
            StreamEvent::Refused { id, refusal } => {
                if let Some(s) = self.slots.get_mut(&id) {
                    s.state = SlotState::Refused(refusal);
                    s.wake_all();
                }
            }
            StreamEvent::Readable { id } => {
                if let Some(w) = self.slots.get_mut(&id).and_then(|s| s.read_waker.take()) {
                    w.wake();
                }
            }
            StreamEvent::Writable { id } => {
                if let Some(w) = self.slots.get_mut(&id).and_then(|s| s.write_waker.take()) {
                    w.wake();
                }
            }
            StreamEvent::Reset { id, code, unread } => {
                let side = self.conn.side();
                if let Some(s) = self.slots.get_mut(&id) {
                    s.state = SlotState::Reset(code);
                    // The agent reads what the server sent before the reset (an origin's
                    // answer just before its connection was reset: a 413 to an upload it
                    // would not take) and then learns of the reset: at most a window per
                    // client connection, held until its client reads it (or the agent's
                    // relay gives up on a client that does not, LAST_BYTES_TIME). The server
                    // drops it: the agent resets when its client has gone, and a stream
                    // the peer has forgotten no longer counts towards the stream limit
                    // that bounds the server's memory.
                    if side == Side::Agent {
                        s.unread = unread.into();
                    }
                    s.wake_all();
                }
            }
        }
    }

    /// The tunnel is over: every handle learns it.
    fn finish(&mut self, reason: Option<fluidity_proto::Error>) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason.clone());
        let stats = self.conn.stats();
        tracing::debug!(
            bytes_sent = stats.bytes_sent,
            bytes_received = stats.bytes_received,
            frames_sent = stats.frames_sent,
            frames_received = stats.frames_received,
            streams = stats.streams_opened,
            rx_allocations = stats.rx_allocations,
            rx_copied = stats.rx_copied,
            "tunnel counters at its end"
        );
        for s in self.slots.values_mut() {
            s.wake_all();
        }
        for w in self.ready_wakers.drain(..) {
            w.wake();
        }
        self.room.freed.notify(usize::MAX);
        self.room.wanted.notify(usize::MAX);
        self.send_event(TunnelEvent::Closed { reason });
        self.events.close();
    }
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

/// Locks `m`. A panic while holding a lock is a bug elsewhere; the state itself stays
/// usable, so a poisoned lock is taken as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A handle on a running tunnel: open or answer streams, answer authentication, shut down.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tunnel {
    shared: SharedRef,
    peer: SocketAddr,
}

impl Tunnel {
    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Waits until the handshake is complete. Errors if the tunnel closes first.
    pub async fn ready(&self) -> Result<(), Error> {
        futures_lite::future::poll_fn(|cx| {
            let mut s = lock(&self.shared);
            if let Some(reason) = &s.closed {
                return Poll::Ready(Err(match reason {
                    Some(r) => Error::Tunnel(r.clone()),
                    None => Error::Tunnel(fluidity_proto::Error::ConnectionClosed),
                }));
            }
            if s.ready {
                return Poll::Ready(Ok(()));
            }
            s.ready_wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether `other` is a handle on the same tunnel.
    pub fn is_same(&self, other: &Tunnel) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Streams the tunnel keeps state for beside the protocol's: those with a handle, and
    /// (server) those requested and not answered yet.
    pub fn stream_slots(&self) -> usize {
        lock(&self.shared).slots.len()
    }

    /// Whether the tunnel has closed (lost or drained).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).closed.is_some()
    }

    /// Whether new streams can be opened now.
    pub fn can_open(&self) -> bool {
        let s = lock(&self.shared);
        s.closed.is_none() && s.conn.can_open()
    }

    /// Agent: opens a stream to `target` and waits for the server's answer. When the tunnel
    /// already carries as many streams as the server allows, it first waits for one to end
    /// (bound it with a timeout); meanwhile [`room_wanted`](Self::room_wanted) is true.
    pub async fn open(&self, target: Target) -> Result<TunnelStream, Error> {
        // Counted among the opens waiting for room from the first refusal until it is done.
        let mut waiting: Option<WaitingForRoom<'_>> = None;
        let id = loop {
            let freed = {
                let mut guard = lock(&self.shared);
                let s = &mut *guard;
                if s.closed.is_some() {
                    return Err(Error::Tunnel(fluidity_proto::Error::ConnectionClosed));
                }
                // A newcomer queues behind the opens already waiting rather than take the
                // room freed for them.
                let queue = waiting.is_none() && s.room.waiting > 0 && s.conn.can_open();
                if !queue {
                    match s.conn.open(Instant::now(), target.clone()) {
                        Ok(id) => {
                            s.slots.insert(id, Slot::new(SlotState::Opening));
                            s.wake_driver();
                            break id;
                        }
                        Err(fluidity_proto::Error::TooManyStreams) => {}
                        Err(e) => return Err(Error::Tunnel(e)),
                    }
                }
                // Listening under the lock that the driver notifies under: no room freed
                // after this check goes unnoticed.
                let freed = s.room.freed.listen();
                if waiting.is_none() {
                    s.room.waiting += 1;
                    waiting = Some(WaitingForRoom(&self.shared));
                    if s.conn.stream_room() > 0 {
                        // Room the earlier opens have not taken yet: the driver hands it out.
                        s.wake_driver();
                    } else {
                        s.room.wanted.notify(1.additional());
                        s.room.log_full(&s.conn);
                    }
                }
                freed
            };
            freed.await;
        };
        drop(waiting);
        // From here the handle owns the stream: dropping it (say, on cancellation) resets it.
        let stream = TunnelStream::new(self.shared.clone(), id);
        futures_lite::future::poll_fn(|cx| {
            let mut s = lock(&self.shared);
            let closed = s.closed.is_some();
            let Some(slot) = s.slots.get_mut(&id) else {
                return Poll::Ready(Err(Error::Tunnel(fluidity_proto::Error::UnknownStream(id))));
            };
            match &slot.state {
                SlotState::Open => Poll::Ready(Ok(())),
                SlotState::Refused(r) => Poll::Ready(Err(Error::Refused(r.clone()))),
                SlotState::Reset(code) => Poll::Ready(Err(Error::StreamReset(*code))),
                SlotState::Opening if closed => Poll::Ready(Err(Error::Io(s.closed_error()))),
                SlotState::Opening => {
                    slot.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        Ok(stream)
    }

    /// Whether an open is waiting for a stream to end (see [`open`](Self::open)): a holder
    /// of an idle stream kept for reuse should give it up.
    pub fn room_wanted(&self) -> bool {
        lock(&self.shared).room.waiting > 0
    }

    /// Whether a new stream could open now without waiting for another to end.
    pub fn has_room(&self) -> bool {
        let s = lock(&self.shared);
        s.room.waiting == 0 && s.conn.stream_room() > 0
    }

    /// Returns once an open is waiting for a stream to end (at once if one is), or the
    /// tunnel takes no new streams (a goaway either way, or closed): either way, a stream
    /// kept idle for reuse should be let go. Each open that starts waiting wakes one
    /// caller; a goaway wakes all.
    pub async fn wait_room_wanted(&self) {
        loop {
            let wanted = {
                let s = lock(&self.shared);
                if s.room.waiting > 0 || s.closed.is_some() || s.conn.is_going_away() {
                    return;
                }
                s.room.wanted.listen()
            };
            wanted.await;
        }
    }

    /// Server: accepts stream `id` and returns its handle.
    pub fn accept_open(&self, id: StreamId) -> Result<TunnelStream, Error> {
        let mut s = lock(&self.shared);
        if let Err(e) = s.conn.accept_open(id) {
            // Reset by the agent meanwhile (or the tunnel is gone): nothing will use the
            // slot, which would stay as long as the tunnel does. A stream accepted before
            // keeps its slot, which its handle uses.
            if s.slots
                .get(&id)
                .is_some_and(|slot| matches!(slot.state, SlotState::Reset(_)))
            {
                s.slots.remove(&id);
            }
            return Err(Error::Tunnel(e));
        }
        if let Some(slot) = s.slots.get_mut(&id) {
            slot.state = SlotState::Open;
        }
        s.wake_driver();
        drop(s);
        Ok(TunnelStream::new(self.shared.clone(), id))
    }

    /// Server: resolves when stream `id`, requested and not answered yet, is reset by the
    /// agent, or the tunnel ends; its slot is then let go. The work of answering it (a
    /// dial) can stop there: a stream reset while pending no longer counts towards
    /// `max_streams`, so work that went on would escape that limit.
    pub async fn open_abandoned(&self, id: StreamId) {
        futures_lite::future::poll_fn(|cx| {
            let mut s = lock(&self.shared);
            if s.closed.is_some() {
                return Poll::Ready(());
            }
            match s.slots.get(&id).map(|slot| &slot.state) {
                Some(SlotState::Opening) => {
                    if let Some(slot) = s.slots.get_mut(&id) {
                        slot.read_waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                // Reset while pending: nothing will use the slot.
                Some(SlotState::Reset(_)) => {
                    s.slots.remove(&id);
                    Poll::Ready(())
                }
                // Answered (its handle owns the slot now), or unknown: nothing to wait for.
                Some(_) | None => Poll::Ready(()),
            }
        })
        .await
    }

    /// Server: refuses stream `id` with a typed reason.
    pub fn refuse_open(&self, id: StreamId, refusal: OpenRefusal) -> Result<(), Error> {
        let mut s = lock(&self.shared);
        s.slots.remove(&id);
        s.conn.refuse_open(id, refusal).map_err(Error::Tunnel)?;
        s.wake_driver();
        Ok(())
    }

    /// Server: admits the agent as `principal`.
    pub fn accept_auth(&self, request: AuthRequest, principal: String, lifetime_secs: u32) {
        let mut s = lock(&self.shared);
        s.conn
            .accept_auth(Instant::now(), request, principal, lifetime_secs);
        s.wake_driver();
    }

    /// Server: refuses the agent; the tunnel closes after telling it why.
    pub fn reject_auth(&self, request: AuthRequest, failure: AuthFailure, detail: String) {
        let mut s = lock(&self.shared);
        s.conn.reject_auth(Instant::now(), request, failure, detail);
        s.wake_driver();
    }

    /// Graceful shutdown: no new streams; the driver ends once open streams finish.
    pub fn go_away(&self) {
        let mut s = lock(&self.shared);
        s.conn.go_away(Instant::now());
        // Streams kept idle for reuse are worth nothing now: their holders let them go.
        s.room.wanted.notify(usize::MAX);
        s.wake_driver();
    }

    /// Immediate shutdown with `code`; open streams fail.
    pub fn close(&self, code: ErrorCode, detail: &str) {
        let mut s = lock(&self.shared);
        s.conn.close(Instant::now(), code, detail);
        s.wake_driver();
    }

    /// The connection's counters.
    pub fn stats(&self) -> Stats {
        lock(&self.shared).conn.stats()
    }
}

/// The future that runs a tunnel; spawn it on an executor. It completes when the
/// tunnel is drained or lost; the reason is also reported as [`TunnelEvent::Closed`].
pub struct Driver {
    shared: SharedRef,
    sock: Async<TcpStream>,
    tls: TlsSession,
    timer: LazyTimer,
    /// Plaintext from TLS that the connection has not consumed yet.
    plain_in: Vec<u8>,
    /// Frames from the connection that TLS has not taken yet, as the connection's shared
    /// chunks: stream data reaches rustls without a copy of its own on the way.
    plain_out: Vec<Bytes>,
    /// Ciphertext read from the socket; `rx[rx_start..rx_end]` is not yet given to rustls.
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    eof: bool,
    done: bool,
    /// The peer's close_notify has been processed: the transport has ended for reading.
    peer_closed: bool,
    /// Our write side is shut down after a drain; reading goes on until the peer's end.
    shut: bool,
    /// When the connection began to close (or was lost), or its peer last took bytes
    /// since: its last words get [`CLOSE_LIMIT`] from then.
    closing_since: Option<Instant>,
}

/// How long a closing tunnel's peer may take nothing of its last words (a goaway, the
/// last stream data, TLS's close_notify) before the transport is dropped: a peer that
/// reads nothing would hold it, its socket and its buffers for ever, the connection's own
/// timers having stopped.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

/// Starts a tunnel over an established TLS session (see [`crate::handshake`]). Returns the
/// handle, the events receiver, and the driver future to spawn.
pub fn start(
    sock: Async<TcpStream>,
    mut tls: TlsSession,
    conn: Connection,
) -> Result<(Tunnel, async_channel::Receiver<TunnelEvent>, Driver), Error> {
    let peer = sock.get_ref().peer_addr().map_err(Error::Io)?;
    tls.set_buffer_limit(Some(TLS_SEND_LIMIT));
    let (tx, rx) = async_channel::unbounded();
    let shared = Arc::new(Mutex::new(Shared {
        conn,
        slots: HashMap::new(),
        driver_waker: None,
        closed: None,
        ready: false,
        unresponsive: false,
        ready_wakers: Vec::new(),
        events: tx,
        room: Room::default(),
    }));
    let mut driver = Driver {
        shared: shared.clone(),
        sock,
        tls,
        timer: LazyTimer::new(),
        plain_in: Vec::new(),
        plain_out: Vec::new(),
        rx: vec![0; SOCK_READ_BUF].into_boxed_slice(),
        rx_start: 0,
        rx_end: 0,
        eof: false,
        done: false,
        closing_since: None,
        peer_closed: false,
        shut: false,
    };
    // The handshake may have decrypted the peer's first frames along with its last
    // handshake message; they wait in rustls, not in the socket.
    {
        let shared = driver.shared.clone();
        let mut s = lock(&shared);
        let (_, closed) = driver
            .take_plaintext(&mut s.conn, Instant::now())
            .map_err(Error::Io)?;
        driver.peer_closed = closed;
    }
    Ok((Tunnel { shared, peer }, rx, driver))
}

impl Driver {
    /// One turn; `Ready` when the tunnel is over.
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let shared = self.shared.clone();
        let mut s = lock(&shared);
        s.driver_waker = Some(cx.waker().clone());
        let now = Instant::now();

        let mut budget = TURN_BUDGET;
        // Whether reading stopped with more possibly waiting (budget or backpressure).
        let mut more_to_read = false;
        // Whether it stopped for the turn's budget alone: the next turn reads on, whatever
        // the writes wait for (two peers each waiting to write would otherwise each wait
        // for the other to read, until a timer).
        let mut budget_spent = false;
        // Read path.
        loop {
            if !self.plain_in.is_empty() {
                let n = s.conn.handle_input(now, &self.plain_in);
                self.plain_in.drain(..n);
                if !self.plain_in.is_empty() {
                    more_to_read = true; // Backpressure: the connection must transmit first.
                    break;
                }
            }
            if self.eof {
                break;
            }
            if budget == 0 {
                more_to_read = true;
                budget_spent = true;
                break;
            }
            match self.read_tls(&mut s.conn, now) {
                Ok(0) => {
                    self.eof = true;
                    s.conn.handle_eof(now);
                    break;
                }
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel transport failed");
                    self.eof = true;
                    s.conn.handle_transport_error(now, e.to_string());
                    break;
                }
            }
        }
        if s.conn.poll_timeout().is_some_and(|t| t <= now) {
            s.conn.handle_timeout(now);
        }

        // Write path.
        let mut write_blocked = false;
        loop {
            if !self.plain_out.is_empty() {
                if let Err(e) = self.encrypt_out() {
                    return self.fail(&mut s, Error::Io(e));
                }
            }
            match self.flush_tls() {
                Ok(true) => {}
                Ok(false) => {
                    write_blocked = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel transport failed");
                    self.eof = true;
                    s.conn.handle_transport_error(now, e.to_string());
                    break;
                }
            }
            if write_blocked {
                break;
            }
            if !self.plain_out.is_empty() {
                // rustls took part (its buffer limit), and its records are out now: it
                // takes the rest on the next pass.
                continue;
            }
            let n = s.conn.poll_transmit_chunks(now, &mut self.plain_out);
            if n == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                // Let other tasks run; come back at once.
                cx.waker().wake_by_ref();
                break;
            }
        }

        s.dispatch_events();
        // As many waiting opens as there is room try again, longest waiting first; all get
        // their answer at once when no stream can be opened any more (a goaway either way).
        if s.room.waiting > 0 {
            let room = if s.conn.can_open() {
                s.conn.stream_room()
            } else {
                usize::MAX
            };
            if room > 0 {
                s.room.freed.notify(room);
            }
        }

        if s.conn.is_drained() && self.plain_out.is_empty() {
            if !self.done {
                self.done = true;
                self.tls.send_close_notify();
            }
            match self.flush_tls() {
                Ok(false) => write_blocked = true,
                Ok(true) | Err(_) => {
                    if !self.shut {
                        self.shut = true;
                        let _ = self.sock.get_ref().shutdown(std::net::Shutdown::Write);
                        s.finish(None);
                    }
                    // Closing now with input unread (or arriving later) would make the
                    // kernel reset the connection and discard what it still holds of
                    // ours: read (and discard) until the peer's end, within CLOSE_LIMIT.
                    if self.eof {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
        if self.eof && s.closed.is_some() {
            return Poll::Ready(Ok(()));
        }

        let mut deadline = s.conn.poll_timeout();
        if s.conn.is_closing() || s.closed.is_some() {
            let give_up = *self.closing_since.get_or_insert(now) + CLOSE_LIMIT;
            if now >= give_up {
                if self.shut {
                    tracing::debug!(
                        limit_secs = CLOSE_LIMIT.as_secs(),
                        "the peer did not end its side of the closed tunnel within the limit; \
                         dropping it"
                    );
                } else {
                    tracing::debug!(
                        limit_secs = CLOSE_LIMIT.as_secs(),
                        "the peer took nothing of the closing tunnel's last words for the \
                         limit; dropping it"
                    );
                }
                // Already finished (with no error) when only the peer's end was awaited.
                s.finish(Some(fluidity_proto::Error::TransportFailed(format!(
                    "the peer took nothing for {} s while the tunnel closed",
                    CLOSE_LIMIT.as_secs()
                ))));
                return Poll::Ready(Ok(()));
            }
            deadline = Some(deadline.map_or(give_up, |d| d.min(give_up)));
        }
        // Wait for the next reason to run. The connection's deadline moves later with
        // almost every input (the idle timeout), which a lazy timer follows without
        // re-arming the reactor each time.
        drop(s);
        match deadline {
            Some(at) => {
                if self.timer.poll_until(cx, at).is_ready() {
                    cx.waker().wake_by_ref();
                }
            }
            None => self.timer.clear(),
        }
        if !self.eof && !more_to_read {
            if let Poll::Ready(r) = self.sock.poll_readable(cx) {
                if r.is_err() {
                    self.eof = true;
                }
                cx.waker().wake_by_ref();
            }
        }
        if write_blocked {
            if self.sock.poll_writable(cx).is_ready() || budget_spent {
                cx.waker().wake_by_ref();
            }
        } else if more_to_read {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Reads ciphertext, decrypts it and hands it to `conn`. `Ok(0)` is the end of the
    /// transport (EOF or the peer's close_notify).
    fn read_tls(&mut self, conn: &mut Connection, now: Instant) -> io::Result<usize> {
        if self.peer_closed {
            return Ok(0);
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
            self.rx_end = SockIo(&self.sock).read(&mut self.rx)?;
            if self.rx_end == 0 {
                return Ok(0);
            }
        }
        let n = self
            .tls
            .read_tls(&mut &self.rx[self.rx_start..self.rx_end])?;
        self.rx_start += n;
        if n == 0 {
            return Ok(0);
        }
        let (got, closed) = self.take_plaintext(conn, now)?;
        if closed {
            // Reported now, or by the next call when plaintext came with it.
            self.peer_closed = true;
            if got == 0 {
                return Ok(0);
            }
        }
        Ok(n.max(got))
    }

    /// Hands decrypted bytes from rustls to the connection, straight from rustls's buffer;
    /// what the connection does not take yet (backpressure) waits in `plain_in`. Also says
    /// whether the peer has sent close_notify and nothing is left to read.
    fn take_plaintext(&mut self, conn: &mut Connection, now: Instant) -> io::Result<(usize, bool)> {
        let state = self
            .tls
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let want = state.plaintext_bytes_to_read();
        let mut left = want;
        let mut reader = self.tls.reader();
        // rustls holds each record's plaintext as its own chunk; feeding the connection
        // from those chunks saves copying every byte into `plain_in` first.
        while left > 0 {
            let chunk = reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            let taken = if self.plain_in.is_empty() {
                conn.handle_input(now, chunk)
            } else {
                0
            };
            self.plain_in.extend_from_slice(&chunk[taken..]);
            let len = chunk.len();
            reader.consume(len);
            left = left.saturating_sub(len);
        }
        Ok((want - left, state.peer_has_closed()))
    }

    /// Hands `plain_out` to rustls in one vectored write, so that records are filled across
    /// frame boundaries; keeps what rustls did not take (its buffer limit).
    fn encrypt_out(&mut self) -> io::Result<()> {
        let slices: Vec<io::IoSlice<'_>> =
            self.plain_out.iter().map(|c| io::IoSlice::new(c)).collect();
        let n = self.tls.writer().write_vectored(&slices)?;
        drop(slices);
        consume_chunks(&mut self.plain_out, n);
        Ok(())
    }

    /// Writes pending TLS records; `Ok(true)` when all were written.
    fn flush_tls(&mut self) -> io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut SockIo(&self.sock)) {
                // A closing tunnel whose peer still takes bytes, however slowly, keeps them
                // coming: CLOSE_LIMIT counts from the last it took.
                Ok(n) if n > 0 && self.closing_since.is_some() => {
                    self.closing_since = Some(Instant::now());
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn fail(&mut self, s: &mut Shared, e: Error) -> Poll<Result<(), Error>> {
        s.conn.handle_transport_error(Instant::now(), e.to_string());
        s.dispatch_events();
        s.finish(Some(fluidity_proto::Error::TransportFailed(e.to_string())));
        Poll::Ready(Err(e))
    }
}

/// An open counted among those waiting for room, until it is done or dropped.
struct WaitingForRoom<'a>(&'a SharedRef);

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        let mut s = lock(self.0);
        s.room.waiting = s.room.waiting.saturating_sub(1);
    }
}

impl Future for Driver {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.turn(cx)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A driver dropped mid-flight (task cancelled) must not leave handles hanging.
        let mut s = lock(&self.shared);
        if s.closed.is_none() {
            s.conn.handle_eof(Instant::now());
            s.dispatch_events();
            s.finish(Some(fluidity_proto::Error::TransportClosed));
        }
    }
}

/// Non-blocking std I/O on the async socket (async-io put it in non-blocking mode).
struct SockIo<'a>(&'a Async<TcpStream>);

impl Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut self.0.get_ref()).read(buf)
    }
}

impl Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut self.0.get_ref()).write(buf)
    }

    // rustls hands over all its queued records at once; without this the default would
    // write only the first one, one system call per record.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&mut self.0.get_ref()).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Completes a TLS handshake on `sock` within `timeout`.
pub async fn handshake(
    sock: &Async<TcpStream>,
    tls: &mut TlsSession,
    timeout: Duration,
) -> Result<(), Error> {
    let work = async {
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut SockIo(sock)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        sock.writable().await.map_err(Error::Io)?
                    }
                    Err(e) => return Err(Error::Io(e)),
                }
            }
            if !tls.is_handshaking() {
                return Ok(());
            }
            match tls.read_tls(&mut SockIo(sock)) {
                Ok(0) => {
                    return Err(Error::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    )))
                }
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Send the alert so the peer learns why.
                        while tls.wants_write() {
                            if tls.write_tls(&mut SockIo(sock)).is_err() {
                                break;
                            }
                        }
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sock.readable().await.map_err(Error::Io)?
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
    };
    work.or(async {
        Timer::after(timeout).await;
        Err(Error::Timeout("TLS handshake"))
    })
    .await
}

/// A TCP connection whose TLS handshake is complete and checked.
#[derive(Debug)]
pub struct Handshaken {
    /// The socket.
    pub sock: Async<TcpStream>,
    /// The TLS session.
    pub tls: TlsSession,
    /// The peer's checked names and this session's channel binding.
    pub established: Established,
}

/// Agent side: connects to `addr`, completes the TLS handshake within `timeout` and checks
/// ALPN and the server's names against `check`.
pub async fn connect(
    addr: SocketAddr,
    tls: TlsSession,
    check: &PeerCheck,
    timeout: Duration,
) -> Result<Handshaken, Error> {
    let sock = tcp_connect(addr, timeout).await.map_err(Error::Io)?;
    client_handshake(sock, tls, check, timeout).await
}

/// Agent side: the TCP connection to `addr`, within `timeout`, with `TCP_NODELAY` set.
pub async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> io::Result<Async<TcpStream>> {
    let sock = Async::<TcpStream>::connect(addr)
        .or(async {
            Timer::after(timeout).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TCP connect to {addr} timed out after {timeout:?}"),
            ))
        })
        .await?;
    sock.get_ref().set_nodelay(true)?;
    Ok(sock)
}

/// Agent side: completes the TLS handshake on a connected socket within `timeout` and
/// checks ALPN and the server's names against `check`.
pub async fn client_handshake(
    sock: Async<TcpStream>,
    mut tls: TlsSession,
    check: &PeerCheck,
    timeout: Duration,
) -> Result<Handshaken, Error> {
    handshake(&sock, &mut tls, timeout).await?;
    let established = tls.established(check)?;
    Ok(Handshaken {
        sock,
        tls,
        established,
    })
}

/// Server side: completes the TLS handshake on an accepted socket within `timeout` and
/// checks ALPN and the agent's names against `check` (which may require the socket's
/// peer address among the certificate's IP SANs).
pub async fn accept(
    sock: Async<TcpStream>,
    mut tls: TlsSession,
    check: &PeerCheck,
    timeout: Duration,
) -> Result<Handshaken, Error> {
    sock.get_ref().set_nodelay(true).map_err(Error::Io)?;
    handshake(&sock, &mut tls, timeout).await?;
    let established = tls.established(check)?;
    Ok(Handshaken {
        sock,
        tls,
        established,
    })
}
