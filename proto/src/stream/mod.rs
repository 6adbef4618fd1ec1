//! Multiplexed streams: state per stream, the events they raise, and the borrowing views
//! through which the application writes and reads.

pub(crate) mod flow;
pub(crate) mod recv;
pub(crate) mod send;
pub mod target;

use bytes::Bytes;

use crate::connection::Connection;
use crate::{Error, ErrorCode, OpenRefusal, StreamId, Target};

use recv::RecvState;
use send::SendState;

/// Chunks shorter than this are copied into a buffer that gathers them instead of queued
/// one by one (written ones by `SendBuf::push`, received ones by `RecvState::push`), so
/// tiny writes or frames cannot grow a stream's queue to one entry per byte of its window.
const MIN_CHUNK: usize = 1024;

/// Where a stream is in its opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenPhase {
    /// Agent: open sent, no answer yet. Data may already flow out (within credit).
    Opening,
    /// Server: open received; the application has not answered.
    PendingAccept,
    /// Accepted.
    Open,
}

#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) phase: OpenPhase,
    pub(crate) send: SendState,
    pub(crate) recv: RecvState,
    /// Queued in the connection's round-robin of streams with output.
    pub(crate) scheduled: bool,
}

impl StreamState {
    pub(crate) fn new(
        phase: OpenPhase,
        send_credit: u32,
        recv_window: u32,
        now: std::time::Instant,
    ) -> Self {
        StreamState {
            phase,
            send: SendState::new(send_credit),
            recv: RecvState::new(recv_window, now),
            scheduled: false,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.send.is_done() && self.recv.is_done()
    }

    /// The application has reset the stream after its last bytes and let go of it: it
    /// hears no more about the stream, and only those bytes still go out.
    pub(crate) fn let_go(&self) -> bool {
        self.send.reset_after.is_some()
    }
}

/// Something that happened to a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Server: the agent asks for a stream to `target`. Answer with
    /// `Connection::accept_open` or `Connection::refuse_open`.
    OpenRequested {
        /// The stream.
        id: StreamId,
        /// Where to connect.
        target: Target,
    },
    /// Agent: the server accepted the stream.
    Opened {
        /// The stream.
        id: StreamId,
    },
    /// Agent: the server refused the stream; it no longer exists.
    Refused {
        /// The stream.
        id: StreamId,
        /// Why.
        refusal: OpenRefusal,
    },
    /// New bytes or the end of the stream can be read. Edge-triggered: raised again only
    /// after a read has returned [`Error::Blocked`].
    Readable {
        /// The stream.
        id: StreamId,
    },
    /// Credit arrived after a write returned [`Error::Blocked`].
    Writable {
        /// The stream.
        id: StreamId,
    },
    /// The peer aborted the stream in both directions; it no longer exists.
    Reset {
        /// The stream.
        id: StreamId,
        /// The peer's code.
        code: ErrorCode,
        /// What had arrived before the reset and was not read yet, in order. The peer
        /// sent these bytes before it aborted (say, an origin's answer just before its
        /// connection was reset); an application may still deliver them, or drop them.
        unread: Vec<Bytes>,
    },
}

/// A snapshot of one stream's counters, for tests, metrics and invariant checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// Bytes written but not yet transmitted.
    pub send_buffered: usize,
    /// Bytes the peer still allows this side to send.
    pub send_credit: u64,
    /// Bytes transmitted.
    pub sent: u64,
    /// Bytes received and buffered, not yet read.
    pub recv_buffered: usize,
    /// The stream's receive window now: the most of it this side buffers. It starts at
    /// `Limits::stream_window` and grows while the reader keeps up
    /// (`Config::max_stream_window`).
    pub recv_window: u32,
    /// Bytes received from the wire.
    pub received: u64,
    /// Bytes handed to the application.
    pub read: u64,
    /// Whether the peer's FIN has arrived.
    pub fin_received: bool,
    /// Whether this side's FIN was transmitted.
    pub fin_sent: bool,
}

/// The sending half of a stream, borrowed from its connection.
#[derive(Debug)]
pub struct SendStream<'a> {
    pub(crate) conn: &'a mut Connection,
    pub(crate) id: StreamId,
}

impl SendStream<'_> {
    /// Buffers as much of `data` as the stream's credit allows and returns how much that
    /// was. [`Error::Blocked`] (not fatal) means no credit: wait for
    /// [`StreamEvent::Writable`].
    pub fn write(&mut self, data: &[u8]) -> Result<usize, Error> {
        self.conn.stream_write(self.id, data)
    }

    /// Like [`write`](Self::write), without copying: takes the first bytes of `data`, as
    /// many as the stream's credit allows, and returns how many that was. The rest of
    /// `data` is not kept; offer `data.slice(n..)` again later. Errors as for `write`.
    /// Chunks under 1 KiB are copied, to keep the send queue short; larger ones are sent
    /// as they are.
    pub fn write_bytes(&mut self, data: Bytes) -> Result<usize, Error> {
        self.conn.stream_write_bytes(self.id, data)
    }

    /// Ends this direction: FIN goes out after the buffered bytes. Reading continues.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.conn.stream_finish(self.id)
    }

    /// Aborts the stream in both directions with `code`; buffered data is dropped.
    pub fn reset(&mut self, code: ErrorCode) -> Result<(), Error> {
        self.conn.stream_reset(self.id, code)
    }

    /// Aborts the stream with `code` after what was written, and the FIN if the stream
    /// was finished, has been transmitted: the peer gets those bytes, then the reset.
    /// Written bytes are within the stream's credit, so this never waits for the peer's
    /// application to read. From now on the stream takes no writes or reads, and bytes
    /// that arrive for it are dropped; it is forgotten once the reset is sent (or, if
    /// the application had read the peer's FIN, once its own FIN is: the stream then
    /// ends normally).
    pub fn reset_after_sent(&mut self, code: ErrorCode) -> Result<(), Error> {
        self.conn.stream_reset_after_sent(self.id, code)
    }

    /// How many bytes a write would take now.
    pub fn writable(&self) -> Result<usize, Error> {
        self.conn.stream_writable(self.id)
    }
}

/// The receiving half of a stream, borrowed from its connection.
#[derive(Debug)]
pub struct RecvStream<'a> {
    pub(crate) conn: &'a mut Connection,
    pub(crate) id: StreamId,
}

impl RecvStream<'_> {
    /// Takes up to `max` buffered bytes. `Ok(None)` is the end of the stream (the peer's
    /// FIN). [`Error::Blocked`] (not fatal) means nothing yet: wait for
    /// [`StreamEvent::Readable`]. Reading returns credit to the peer. A read of 0 bytes
    /// takes nothing: an empty chunk when bytes or the end wait, else `Blocked` (so a loop
    /// that reads until `Blocked` must ask for at least one byte).
    pub fn read(&mut self, max: usize) -> Result<Option<Bytes>, Error> {
        self.conn.stream_read(self.id, max)
    }

    /// Aborts the stream in both directions with `code` (the reader's way to say "no more").
    pub fn stop(&mut self, code: ErrorCode) -> Result<(), Error> {
        self.conn.stream_reset(self.id, code)
    }
}
