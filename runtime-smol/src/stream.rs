//! Stream handles: async byte pipes over one tunnel stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fluidity_proto::{Error as ProtoError, ErrorCode, SendStream, StreamId};
use futures_io::{AsyncRead, AsyncWrite};

use crate::driver::{lock, SharedRef, SlotState};
use crate::relay::{ReadChunks, MAX_READ_CHUNKS};

/// One tunnel stream as `AsyncRead + AsyncWrite`.
///
/// Backpressure is end to end: a write waits for the peer's credit, and credit returns
/// only as the peer's application reads. `poll_close` half-closes (FIN); reading goes on.
/// Dropping the handle before both directions have ended resets the stream
/// ([`ErrorCode::CANCEL`]), so the peer sees an abort, never a silent truncation; after a
/// close, the bytes written and the FIN go out before the reset. On the agent, bytes the
/// server sent before it reset the stream are read before the reset's error.
#[derive(Debug)]
pub struct TunnelStream {
    shared: SharedRef,
    id: StreamId,
    finished: bool,
    eof: bool,
    /// Reads fail once the server is found unresponsive, until bytes arrive
    /// ([`ReadChunks::give_up_if_unresponsive`]).
    give_up: bool,
}

impl TunnelStream {
    pub(crate) fn new(shared: SharedRef, id: StreamId) -> Self {
        TunnelStream {
            shared,
            id,
            finished: false,
            eof: false,
            give_up: false,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Aborts the stream in both directions with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        self.abort(code, false);
    }

    /// Aborts the stream with `code` once the bytes already written (and the FIN, if
    /// closed) have gone out: the peer reads them, then learns of the reset. For a relay
    /// whose socket failed after it had passed on what the socket sent.
    pub fn reset_after_sent(&mut self, code: ErrorCode) {
        self.abort(code, true);
    }

    fn abort(&mut self, code: ErrorCode, after_sent: bool) {
        {
            let mut s = lock(&self.shared);
            send_reset(&mut s, self.id, code, after_sent);
            s.slots.remove(&self.id);
            s.wake_driver();
        }
        // A later drop does nothing more.
        self.finished = true;
        self.eof = true;
    }
}

fn reset_error(code: ErrorCode) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset by the peer ({code})"),
    )
}

impl TunnelStream {
    /// Takes up to `max` received bytes in at most [`MAX_READ_CHUNKS`] payloads, handing
    /// each to `take`, in order.
    fn poll_read_with(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        mut take: impl FnMut(Bytes),
    ) -> Poll<io::Result<usize>> {
        if self.eof || max == 0 {
            return Poll::Ready(Ok(0));
        }
        let id = self.id;
        let shared = self.shared.clone();
        let mut s = lock(&shared);
        // The connection hands out one received frame's payload per read; take as many as
        // fit, so that the reader makes one large write (one system call) instead of one
        // per frame, and the driver is woken once.
        let mut filled = 0;
        let mut taken = 0;
        while filled < max && taken < MAX_READ_CHUNKS {
            match s.conn.recv_stream(id).read(max - filled) {
                Ok(Some(bytes)) => {
                    filled += bytes.len();
                    taken += 1;
                    take(bytes);
                }
                Ok(None) => {
                    // The end of the stream; reported now, or by the next read when bytes
                    // come first (the connection forgets the stream once FIN is read).
                    self.eof = true;
                    break;
                }
                Err(ProtoError::Blocked) if filled > 0 => break,
                Err(ProtoError::Blocked) if self.give_up && s.unresponsive => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server stopped answering (no answer to the tunnel's probe)",
                    )));
                }
                Err(ProtoError::Blocked) => {
                    if let Some(slot) = s.slots.get_mut(&id) {
                        slot.read_waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Err(_) => {
                    // Reset by the peer: what arrived before the reset comes first.
                    let max = max - filled;
                    if let Some(bytes) = s.slots.get_mut(&id).and_then(|t| t.take_unread(max)) {
                        filled += bytes.len();
                        taken += 1;
                        take(bytes);
                        continue;
                    }
                    // Bytes already taken are delivered; the error comes with the next read.
                    if filled > 0 {
                        break;
                    }
                    return Poll::Ready(Err(gone(&s, id)));
                }
            }
        }
        if filled > 0 {
            // The server is heard: what it sends is no longer given up on.
            self.give_up = false;
        }
        s.wake_driver();
        Poll::Ready(Ok(filled))
    }

    /// Like `poll_write`, without copying: the stream takes the first bytes of `data`, as
    /// many as its credit allows, as shared slices, and returns how many that was. The
    /// memory stays alive until the driver has encrypted them; offer `data.slice(n..)`
    /// for the rest. Chunks under 1 KiB are copied (see proto's `write_bytes`).
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |send| send.write_bytes(data.clone()))
    }

    /// One write, copying or not: `write` is proto's call on the stream's sending half.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut SendStream<'_>) -> Result<usize, ProtoError>,
    ) -> Poll<io::Result<usize>> {
        if self.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream already closed for writing",
            )));
        }
        let id = self.id;
        let mut s = lock(&self.shared);
        match write(&mut s.conn.send_stream(id)) {
            Ok(n) => {
                s.wake_driver();
                Poll::Ready(Ok(n))
            }
            Err(ProtoError::Blocked) => {
                if let Some(slot) = s.slots.get_mut(&id) {
                    slot.write_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(_) => Poll::Ready(Err(gone(&s, id))),
        }
    }
}

impl ReadChunks for TunnelStream {
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_with(cx, max, |bytes| out.push(bytes))
    }

    fn poll_given_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let id = self.id;
        let mut s = lock(&self.shared);
        if s.closed.is_some() {
            return Poll::Ready(s.closed_error());
        }
        match s.slots.get_mut(&id) {
            Some(slot) if matches!(slot.state, SlotState::Reset(_)) => Poll::Ready(gone(&s, id)),
            Some(slot) => {
                slot.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            // Forgotten once it ended both ways: nothing to give up.
            None => Poll::Pending,
        }
    }

    fn give_up_if_unresponsive(&mut self, on: bool) {
        self.give_up = on;
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut at = 0;
        self.poll_read_with(cx, buf.len(), |bytes| {
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
            at += bytes.len();
        })
    }
}

/// Resets stream `id` with `code`, after the bytes written (and a FIN) when `after_sent`.
/// Ignored when proto already forgot the stream (it ended or was reset).
fn send_reset(s: &mut crate::driver::Shared, id: StreamId, code: ErrorCode, after_sent: bool) {
    let mut send = s.conn.send_stream(id);
    let _ = if after_sent {
        send.reset_after_sent(code)
    } else {
        send.reset(code)
    };
}

/// Why a stream that proto no longer knows cannot be used.
fn gone(s: &crate::driver::Shared, id: StreamId) -> io::Error {
    match s.slots.get(&id).map(|slot| &slot.state) {
        Some(SlotState::Reset(code)) => reset_error(*code),
        Some(SlotState::Refused(r)) => {
            io::Error::new(io::ErrorKind::ConnectionRefused, r.to_string())
        }
        _ => s.closed_error(),
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |send| send.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already the driver's to send.
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let id = self.id;
        let shared = self.shared.clone();
        let mut s = lock(&shared);
        match s.conn.send_stream(id).finish() {
            Ok(()) => {
                self.finished = true;
                s.wake_driver();
                Poll::Ready(Ok(()))
            }
            Err(ProtoError::StreamFinished(_)) => {
                self.finished = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => Poll::Ready(Err(gone(&s, id))),
        }
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.slots.remove(&self.id);
        if !(self.finished && self.eof) && s.closed.is_none() {
            // After a close, the bytes written still go out, with the FIN, before the
            // reset.
            send_reset(&mut s, self.id, ErrorCode::CANCEL, self.finished);
        }
        s.wake_driver();
    }
}
