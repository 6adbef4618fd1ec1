//! Bidirectional byte relay with half-close, where a tunnel stream meets a socket.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_io::Timer;
use bytes::{Buf, Bytes};
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_lite::FutureExt;

use fluidity_proto::ErrorCode;

use crate::driver::lock;
use crate::stream::TunnelStream;

/// Read buffer of the socket-to-stream direction to start with (the other direction has
/// none): enough for a typical web response in one piece, and small enough that many idle
/// or short connections stay cheap.
const RELAY_BUF_MIN: usize = 16 * 1024;

/// Largest read buffer, and most bytes taken from the stream at once. Reads that keep
/// filling the buffer (a bulk transfer) grow it up to this, so that each piece costs fewer
/// system calls and wake-ups:
/// from 64 KiB to 256 KiB, the server's CPU time for a download fell by about 8%
/// (docs/PERFORMANCE.md, change 20). A fast stream's window grows to 4 MiB, far larger.
const RELAY_BUF_MAX: usize = 256 * 1024;

/// Which way bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the tunnel stream to the socket.
    StreamToSocket,
    /// From the socket to the tunnel stream.
    SocketToStream,
}

/// Copies between a tunnel stream and a socket, both ways at once, until both directions
/// have ended. When one source ends, the other side's write half is closed (half-close)
/// and the other direction goes on. Returns the bytes moved each way (stream to socket,
/// socket to stream), or the first error, with the end it happened at. On an error the stream is reset after the
/// bytes already passed to it, so what the socket sent before it failed still arrives.
///
/// A socket that takes no more bytes (its peer closed or reset the connection) fails only
/// the stream-to-socket direction at first: what the peer sent before it went still goes
/// the other way, as long as it keeps moving (it may stand still for [`LAST_BYTES_TIME`]
/// at most). An origin that answers an upload it
/// will not take (a 413) and closes with the upload unread resets the connection, and
/// its answer must arrive. The socket's end of file then counts as the reset it follows,
/// never as a clean end.
///
/// In a bulk transfer the socket's bytes reach the stream without a copy: they are read
/// into buffers that the stream sends from (see [`TunnelStream::poll_write_bytes`]) and
/// that are read into again once the driver has encrypted them.
pub async fn relay<S>(
    stream: TunnelStream,
    sock: S,
    on_bytes: impl Fn(Direction, usize) + Send + Sync,
) -> Result<(u64, u64), RelayError>
where
    S: AsyncRead + AsyncWrite + Clone + Unpin,
{
    // Both directions run in this one task, so the lock is never contended.
    let stream = Mutex::new(stream);
    // Two handles on the socket rather than `split`, whose write half sends only the
    // first slice of a vectored write.
    let (sr, sw) = (sock.clone(), sock);
    // Linux reports a reset once: to the writer here, and the reader then sees only the
    // end of file.
    let socket_failed = AtomicBool::new(false);
    // Told when the stream has ended towards the socket: the socket's direction is then
    // all that is left, and a reset of the stream or the tunnel's loss must end it too, or
    // a socket that sends nothing (a long poll whose request is complete) would keep its
    // connection for ever.
    let (ended, ended_rx) = async_channel::bounded::<()>(1);
    let to_socket = async {
        let copied = copy_from_stream(SharedHalf(&stream), sw, RELAY_BUF_MAX, |n| {
            on_bytes(Direction::StreamToSocket, n)
        });
        match copied.await {
            Ok(n) => {
                let _ = ended.try_send(());
                Ok(Ok(n))
            }
            Err(e @ RelayError::Stream(_)) => Err(e),
            Err(e @ RelayError::Socket(_)) => {
                tracing::debug!(error = %e, "the socket takes no more; relaying its last bytes");
                socket_failed.store(true, Ordering::Relaxed);
                Ok(Err(e))
            }
        }
    };
    let moved = AtomicU64::new(0);
    let from_socket = copy_into_stream(sr, &stream, &socket_failed, |n| {
        moved.fetch_add(n as u64, Ordering::Relaxed);
        on_bytes(Direction::SocketToStream, n)
    })
    .or(async {
        if ended_rx.recv().await.is_err() {
            return std::future::pending().await;
        }
        // Nothing reads the stream any more: its reader's waker is free to watch it.
        Err(RelayError::Stream(
            std::future::poll_fn(|cx| SharedHalf(&stream).poll_given_up(cx)).await,
        ))
    });
    let result = join_with_grace(
        to_socket,
        from_socket,
        LAST_BYTES_TIME,
        Some(&moved),
        || {
            RelayError::Socket(io::Error::new(
                io::ErrorKind::TimedOut,
                "its last bytes did not get through in time",
            ))
        },
    )
    .await;
    if result.is_err() {
        // Ignored when the stream is gone already (the peer reset it).
        lock(&stream).reset_after_sent(ErrorCode::CANCEL);
    }
    result
}

/// How long one direction of a relay may go on without moving a byte once the other has
/// failed softly (see [`join_with_grace`]): a bound where both ends wait on each other (a
/// client that sends its whole upload before reading, behind a direction that no longer
/// reads it), long enough for any link that still moves.
pub const LAST_BYTES_TIME: Duration = Duration::from_secs(5);

/// A relay's failure, by the end it happened at.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The tunnel stream: reset by the peer, the tunnel lost, or its reader gone.
    #[error("the tunnel stream: {0}")]
    Stream(io::Error),
    /// The socket: its peer reset or left, or it stopped taking or giving bytes.
    #[error("the socket: {0}")]
    Socket(io::Error),
}

/// Makes closing `sock` abort its connection (a TCP reset, not a FIN) once its last
/// handle is dropped. For a relay that failed mid-stream: the socket's peer then sees a
/// failure, as it would have from the far end, never a clean end it could take for the
/// whole of the data.
pub fn reset_on_close(sock: &impl std::os::fd::AsFd) {
    // Best effort: a socket the system has already closed needs nothing more.
    let _ = socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO));
}

/// The connections a process is relaying, to reset those a stop cuts ([`reset_on_close`]):
/// ended by the exit, they would close plainly, and their peers could take a cut transfer
/// for a whole one. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<ConnectionSet>>,
}

#[derive(Debug, Default)]
struct ConnectionSet {
    next: u64,
    open: std::collections::HashMap<u64, async_net::TcpStream>,
}

impl Connections {
    /// Counts `sock` among them until the returned guard is dropped.
    pub fn track(&self, sock: &async_net::TcpStream) -> Tracked {
        let mut set = lock(&self.inner);
        let id = set.next;
        set.next += 1;
        set.open.insert(id, sock.clone());
        Tracked {
            inner: self.inner.clone(),
            id,
        }
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        lock(&self.inner).open.is_empty()
    }

    /// Makes every one still open reset when it closes.
    pub fn reset_all(&self) {
        for sock in lock(&self.inner).open.values() {
            reset_on_close(sock);
        }
    }

    /// Has a second signal, which ends the process at once, reset them first
    /// ([`crate::app::on_forced_exit`]).
    pub fn reset_on_forced_exit(&self) {
        let set = Arc::downgrade(&self.inner);
        crate::app::on_forced_exit(move || {
            if let Some(inner) = set.upgrade() {
                Connections { inner }.reset_all();
            }
        });
    }
}

/// One connection counted by [`Connections::track`], until dropped.
#[derive(Debug)]
pub struct Tracked {
    inner: Arc<Mutex<ConnectionSet>>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.inner).open.remove(&self.id);
    }
}

/// Takes `sock`'s pending error (`SO_ERROR`), such as the reset of its connection,
/// without reading: found this way, it is no longer reported to the next read, so the
/// caller must treat the connection as failed.
pub fn take_socket_error(sock: &impl std::os::fd::AsFd) -> Option<io::Error> {
    socket2::SockRef::from(sock).take_error().ok().flatten()
}

/// Most chunks one [`ReadChunks::poll_read_chunks`] hands out: a read of many tiny frames
/// (a peer trickling bytes) then stays a short list, which a reader can take from the
/// front of in time linear in the bytes; full frames reach `max` long before.
pub const MAX_READ_CHUNKS: usize = 64;

/// A byte stream whose received bytes can be taken without a copy, as shared chunks.
pub trait ReadChunks {
    /// Appends up to `max` (more than 0) received bytes to `out` as shared chunks, at
    /// most [`MAX_READ_CHUNKS`] of them, and returns how many bytes that was; `Ok(0)` is
    /// the end of the stream. `out` changes only when `Ready(Ok(n))` is returned, by
    /// chunks of `n` bytes in all. Waits only when nothing has been received.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>>;

    /// Waits until the peer has given the stream up (a reset, or the whole connection
    /// lost), whatever is still unread, and returns why; never while the stream lives.
    /// For a reader busy elsewhere (writing what it read to a socket that takes nothing
    /// more), so that it lets go of a stream nobody wants. Call it only between reads: it
    /// may take the reader's waker. A stream that cannot be given up waits for ever.
    fn poll_given_up(&mut self, _cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Pending
    }

    /// With `on`, until the next bytes arrive, a read that finds nothing fails with
    /// `ConnectionAborted` once the peer is found unresponsive: for a request that is
    /// safe to send again elsewhere, whose answer would otherwise wait for the whole
    /// connection's idle timeout. A stream that cannot tell ignores it.
    fn give_up_if_unresponsive(&mut self, _on: bool) {}
}

/// Copies from `stream` to `w` until the stream ends, then closes `w` (a half-close). The
/// stream's received chunks are written as they are, several per vectored write, with no
/// buffer of its own and no copy; at most `max` bytes are taken from the stream at a
/// time, as a read buffer of that size would (what the stream has handed out is no
/// longer within its window, and keeps its receive memory alive until written). An
/// error says which end failed.
async fn copy_from_stream<R, W>(
    mut stream: R,
    mut w: W,
    max: usize,
    on_bytes: impl Fn(usize),
) -> Result<u64, RelayError>
where
    R: ReadChunks,
    W: AsyncWrite + Unpin,
{
    let mut chunks = Vec::new();
    let mut total = 0u64;
    loop {
        let n = std::future::poll_fn(|cx| stream.poll_read_chunks(cx, &mut chunks, max.max(1)))
            .await
            .map_err(RelayError::Stream)?;
        if n == 0 {
            w.close().await.map_err(RelayError::Socket)?;
            return Ok(total);
        }
        // A socket that takes nothing (a peer that reads nothing) must not keep the stream
        // once the other side has given it up.
        async {
            write_chunks(&mut w, &mut chunks)
                .await
                .map_err(RelayError::Socket)
        }
        .or(async {
            let why = std::future::poll_fn(|cx| stream.poll_given_up(cx)).await;
            Err(RelayError::Stream(why))
        })
        .await?;
        total += n as u64;
        on_bytes(n);
    }
}

/// Most slices given to one vectored write: enough for 1 MiB of full frames, and a fixed
/// array, where a list of every remaining chunk rebuilt for each write would cost time
/// quadratic in a read's many tiny chunks.
const MAX_SLICES: usize = 64;

/// Writes every chunk, in order, with vectored writes, then flushes. Written chunks leave
/// `chunks` as they go: on an error, it holds what was not written.
pub async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut Vec<Bytes>,
) -> io::Result<()> {
    // An empty chunk would make a write of nothing look like a closed writer.
    chunks.retain(|c| !c.is_empty());
    while !chunks.is_empty() {
        let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
        let k = chunks.len().min(MAX_SLICES);
        for (slice, chunk) in slices.iter_mut().zip(chunks.iter()) {
            *slice = io::IoSlice::new(chunk);
        }
        let n = w.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        consume_chunks(chunks, n);
    }
    w.flush().await
}

/// Removes the first `n` bytes from `chunks`: whole chunks, then a prefix of the next.
/// What a vectored write took leaves its queue this way (rustls's in the driver, a socket's in
/// [`write_chunks`]).
pub fn consume_chunks(chunks: &mut Vec<Bytes>, mut n: usize) {
    let mut whole = 0;
    while let Some(c) = chunks.get(whole) {
        if c.len() > n {
            break;
        }
        n -= c.len();
        whole += 1;
    }
    chunks.drain(..whole);
    if let Some(first) = chunks.first_mut() {
        first.advance(n.min(first.len()));
    }
}

/// One direction's handle on a stream that two directions share in one task (a relay's),
/// through a lock that is therefore never contended.
pub struct SharedHalf<'a, T>(pub &'a Mutex<T>);

impl<T: AsyncWrite + Unpin> AsyncWrite for SharedHalf<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(self.0)).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(self.0)).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(self.0)).poll_close(cx)
    }
}

impl<T: ReadChunks> ReadChunks for SharedHalf<'_, T> {
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        lock(self.0).poll_read_chunks(cx, out, max)
    }

    fn poll_given_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        lock(self.0).poll_given_up(cx)
    }

    fn give_up_if_unresponsive(&mut self, on: bool) {
        lock(self.0).give_up_if_unresponsive(on);
    }
}

/// Runs two fallible futures at once until both have finished or one has failed (the
/// first error is returned and both are dropped), like `futures_lite::future::try_zip`,
/// except that each is polled only when its own waker has fired. A relay direction
/// waiting for its socket is then not polled, which for an `async-io` socket means a read
/// system call bound to fail, every time the other direction makes progress.
pub async fn try_join2<A, B, T, U, E>(a: A, b: B) -> Result<(T, U), E>
where
    A: Future<Output = Result<T, E>>,
    B: Future<Output = Result<U, E>>,
{
    let first = async { a.await.map(Ok) };
    let (t, u) = join2(first, b, None::<(Duration, Option<&AtomicU64>, fn() -> E)>).await?;
    Ok((t?, u))
}

/// Like [`try_join2`], except that `first` may fail softly, by returning `Ok(Err(e))`:
/// then `second` goes on alone for `grace`, after which it fails with `late()`; `e` is
/// returned once it has finished. With `moved` (a count `second` raises as it moves
/// bytes), the grace starts again whenever the count changes: `second` goes on as long
/// as it makes progress. For a relay direction whose
/// writer failed while the other direction still has bytes to pass on: what is left is
/// finite (a socket's receive buffer, a stream's window), so a slow link gets it all and
/// a stalled one gives up.
pub async fn join_with_grace<A, B, T, U, E>(
    first: A,
    second: B,
    grace: Duration,
    moved: Option<&AtomicU64>,
    late: impl FnOnce() -> E,
) -> Result<(T, U), E>
where
    A: Future<Output = Result<Result<T, E>, E>>,
    B: Future<Output = Result<U, E>>,
{
    let (t, u) = join2(first, second, Some((grace, moved, late))).await?;
    Ok((t?, u))
}

/// The one loop behind [`try_join2`] and [`join_with_grace`]: each future polled only
/// when its own waker fired, and a deadline for `b` once `a` has failed softly (armed
/// when `grace` is given), moved on whenever `b`'s count of bytes moved changes.
async fn join2<A, B, T, U, E, L>(
    a: A,
    b: B,
    grace: Option<(Duration, Option<&AtomicU64>, L)>,
) -> Result<(Result<T, E>, U), E>
where
    A: Future<Output = Result<Result<T, E>, E>>,
    B: Future<Output = Result<U, E>>,
    L: FnOnce() -> E,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut ra, mut rb) = (None, None);
    let (wa, wb) = (OwnWaker::new(), OwnWaker::new());
    let (grace, mut late) = match grace {
        Some((time, moved, late)) => (Some((time, moved)), Some(late)),
        None => (None, None),
    };
    let mut deadline: Option<IdleDeadline<'_>> = None;
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            match wa.poll(cx, a.as_mut()) {
                Some(Poll::Ready(Ok(t))) => {
                    if t.is_err() {
                        deadline = grace.map(|(time, moved)| IdleDeadline::new(time, moved));
                    }
                    ra = Some(t);
                }
                Some(Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
                Some(Poll::Pending) | None => {}
            }
        }
        if rb.is_none() {
            match wb.poll(cx, b.as_mut()) {
                Some(Poll::Ready(Ok(u))) => rb = Some(u),
                Some(Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
                Some(Poll::Pending) | None => {}
            }
        }
        if let (None, Some(d)) = (&rb, deadline.as_mut()) {
            if d.poll(cx).is_ready() {
                if let Some(late) = late.take() {
                    return Poll::Ready(Err(late()));
                }
            }
        }
        match (ra.take(), rb.take()) {
            (Some(t), Some(u)) => Poll::Ready(Ok((t, u))),
            (t, u) => {
                (ra, rb) = (t, u);
                Poll::Pending
            }
        }
    })
    .await
}

/// A time limit that starts again whenever a count of bytes moved changes: a bound on a
/// wait that may still be making progress. Without a count, a fixed limit.
#[derive(Debug)]
pub struct IdleDeadline<'a> {
    timer: Timer,
    limit: Duration,
    /// The count, and its value when the timer was last set.
    progress: Option<(&'a AtomicU64, u64)>,
}

impl<'a> IdleDeadline<'a> {
    /// A deadline `limit` from now, moved on by changes of `moved`.
    pub fn new(limit: Duration, moved: Option<&'a AtomicU64>) -> Self {
        IdleDeadline {
            timer: Timer::after(limit),
            limit,
            progress: moved.map(|m| (m, m.load(Ordering::Relaxed))),
        }
    }

    /// `Ready` once `limit` has passed without the count changing.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some((count, seen)) = &mut self.progress {
            let now = count.load(Ordering::Relaxed);
            if now != *seen {
                *seen = now;
                self.timer.set_after(self.limit);
            }
        }
        Pin::new(&mut self.timer).poll(cx).map(|_| ())
    }
}

/// A future's own waker within a task that polls several, so that it is polled only when
/// it was woken: a future waiting on a socket is then not polled (for `async-io`, a read
/// system call bound to fail) every time another one makes progress.
pub struct OwnWaker {
    branch: Arc<Branch>,
    waker: Waker,
}

impl OwnWaker {
    /// A waker that counts as woken, so that the first [`poll`](Self::poll) polls.
    pub fn new() -> OwnWaker {
        let branch = Arc::new(Branch::new());
        let waker = Waker::from(branch.clone());
        OwnWaker { branch, waker }
    }

    /// Counts as woken again: for reuse with a new future, whose first poll must happen.
    pub fn rewind(&self) {
        self.branch.woken.store(true, Ordering::Release);
    }

    /// Polls `f` with its own waker if it was woken since its last poll (or never
    /// polled), and returns what it gave; `None`, without polling, otherwise.
    pub fn poll<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        f: Pin<&mut F>,
    ) -> Option<Poll<F::Output>> {
        if !self.branch.take(cx.waker()) {
            return None;
        }
        Some(f.poll(&mut Context::from_waker(&self.waker)))
    }
}

impl Default for OwnWaker {
    fn default() -> Self {
        OwnWaker::new()
    }
}

impl std::fmt::Debug for OwnWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnWaker").finish_non_exhaustive()
    }
}

/// The waker of one branch of [`try_join2`]: notes that the branch was woken, then wakes
/// the task.
struct Branch {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Branch {
    fn new() -> Branch {
        Branch {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        }
    }

    /// Records the task's current waker, then whether the branch was woken since the last
    /// call (clearing it). In this order, a wake between the two is never lost: it sets
    /// the flag again and wakes the task.
    fn take(&self, task: &Waker) -> bool {
        {
            let mut slot = lock(&self.task);
            if !slot.as_ref().is_some_and(|w| w.will_wake(task)) {
                *slot = Some(task.clone());
            }
        }
        self.woken.swap(false, Ordering::AcqRel)
    }
}

impl Wake for Branch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        // Woken outside the lock: a waker may do anything, even poll the task at once.
        let task = lock(&self.task).clone();
        if let Some(w) = task {
            w.wake();
        }
    }
}

/// Copies from `r` into `stream` until EOF, then finishes the stream (FIN). An EOF after
/// `socket_failed` was set is not one: the socket's writer failed first, and Linux
/// reports a reset once, to whichever call sees it first, so the reader sees an end of
/// file where the connection was reset. The copy then fails without finishing the
/// stream, so that the peer sees a reset and never a clean end.
///
/// In a bulk transfer (once reads have filled the buffer and grown it), a read that fills
/// at least half its buffer is handed to the stream as it is, and the buffer is lent out:
/// the stream sends from it, and the pool takes it back once its last slice is dropped
/// (encrypted by the driver, or discarded by a reset). Other reads are copied and the
/// buffer stays: a short read lent would keep a whole buffer alive for a few bytes (a lent
/// buffer is at most half empty), and a small exchange (a request, a 10 KiB response)
/// would hold a second buffer per connection while the first one waits for the driver,
/// for a copy that costs little.
///
/// Memory: the buffer being read into, at most one free buffer, and those still being
/// sent from. The stream's send buffer (256 KiB by default) and the driver's transmit
/// batch each span at most three buffers (each at least half full, one of them perhaps
/// nearly sent), so at worst eight buffers (2 MiB at 256 KiB each), usually two or
/// three. A reader that stops stops the relay at the stream's credit.
async fn copy_into_stream<R, S>(
    mut r: R,
    stream: &Mutex<S>,
    socket_failed: &AtomicBool,
    on_bytes: impl Fn(usize),
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    S: WriteBytes + AsyncWrite + Unpin,
{
    let pool = Pool::default();
    let mut size = RELAY_BUF_MIN;
    let mut buf = Vec::new();
    let mut total = 0u64;
    loop {
        if buf.len() != size {
            buf = pool.take(size);
        }
        let n = r.read(&mut buf).await.map_err(RelayError::Socket)?;
        if n == 0 && socket_failed.load(Ordering::Relaxed) {
            return Err(RelayError::Socket(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the connection was reset (its writer failed first)",
            )));
        }
        if n == 0 {
            SharedHalf(stream)
                .close()
                .await
                .map_err(RelayError::Stream)?;
            return Ok(total);
        }
        if size > RELAY_BUF_MIN && n >= size / 2 {
            let lent = Lent {
                buf: std::mem::take(&mut buf),
                len: n,
                pool: pool.clone(),
            };
            write_all_bytes(stream, Bytes::from_owner(lent))
                .await
                .map_err(RelayError::Stream)?;
        } else {
            SharedHalf(stream)
                .write_all(&buf[..n])
                .await
                .map_err(RelayError::Stream)?;
        }
        total += n as u64;
        on_bytes(n);
        if n == size && size < RELAY_BUF_MAX {
            // A full read: more is probably waiting; grow.
            size = (size * 2).min(RELAY_BUF_MAX);
        }
    }
}

/// A byte stream that takes shared chunks without a copy.
trait WriteBytes {
    /// Takes as much of `data` as it can now, without a copy, and returns how many bytes
    /// that was; waits while it can take none.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>>;
}

impl WriteBytes for TunnelStream {
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        TunnelStream::poll_write_bytes(self, cx, data)
    }
}

/// Offers `data` to the stream until it has taken all of it.
async fn write_all_bytes<S: WriteBytes>(stream: &Mutex<S>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| lock(stream).poll_write_bytes(cx, &data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data.advance(n);
    }
    Ok(())
}

/// Free read buffers to lend again. A buffer stays initialised while it is lent, so it is
/// read into again without being cleared.
#[derive(Debug, Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

/// How many free buffers a pool keeps; others are freed as they come back. One is enough
/// for the next read, which is all the relay needs at a time.
const POOL_KEEP: usize = 1;

impl Pool {
    /// A buffer of `len` bytes: a free one, or a new one. Free buffers of another size
    /// (from before the relay's reads grew) are let go.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = lock(&self.0);
        free.retain(|buf| buf.len() == len);
        free.pop().unwrap_or_else(|| vec![0; len])
    }
}

/// The first `len` bytes of a pooled buffer, as the owner of a [`Bytes`]; when the last
/// slice of it is dropped, the buffer goes back to its pool, or is freed if the pool has
/// enough.
struct Lent {
    buf: Vec<u8>,
    len: usize,
    pool: Pool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut free = lock(&self.pool.0);
        if free.len() < POOL_KEEP {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Batches, Trickle};
    use futures_lite::future::{block_on, yield_now};
    use std::cell::Cell;

    /// What a vectored write took leaves the queue; the rest stays, in order,
    /// however the count falls across chunk boundaries.
    #[test]
    fn consumed_chunks_leave_the_queue_and_the_rest_stays_in_order() {
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let sizes = [9, 300, 1, 450, 240];
        for n in 0..=all.len() {
            let mut chunks = Vec::new();
            let mut at = 0;
            for len in sizes {
                chunks.push(Bytes::copy_from_slice(&all[at..at + len]));
                at += len;
            }
            consume_chunks(&mut chunks, n);
            assert!(
                chunks.iter().all(|c| !c.is_empty()),
                "n = {n}: empty chunk kept"
            );
            let rest: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(rest, all[n..], "n = {n}");
        }
    }

    #[test]
    fn try_join2_gives_both_results_or_the_first_error() {
        let both = block_on(try_join2(async { Ok::<_, ()>(1) }, async { Ok(2) }));
        assert_eq!(both, Ok((1, 2)));
        // The other future is dropped with the error, not left behind.
        let dropped = Cell::new(false);
        let guard = DropFlag(&dropped);
        let pending = async move {
            let _guard = guard;
            std::future::pending::<Result<(), &str>>().await
        };
        let failed = block_on(try_join2(pending, async { Err::<(), _>("b failed") }));
        assert_eq!(failed, Err("b failed"));
        assert!(dropped.get(), "the pending future outlived the error");
    }

    #[test]
    fn a_soft_failure_leaves_the_other_future_a_bounded_time_then_its_error() {
        let grace = Duration::from_millis(20);
        // The other future finishes in time: the soft failure is the result.
        let done = block_on(join_with_grace(
            async { Ok::<Result<u8, &str>, &str>(Err("writer failed")) },
            async { Ok(2) },
            grace,
            None,
            || "late",
        ));
        assert_eq!(done, Err("writer failed"));
        // It never finishes: it gets the grace, then the late error.
        let stuck = block_on(join_with_grace(
            async { Ok::<Result<u8, &str>, &str>(Err("writer failed")) },
            std::future::pending::<Result<(), &str>>(),
            grace,
            None,
            || "late",
        ));
        assert_eq!(stuck, Err("late"));
        // No soft failure: both results, whatever the grace.
        let both = block_on(join_with_grace(
            async { Ok::<Result<u8, &str>, &str>(Ok(1)) },
            async { Ok(2) },
            Duration::ZERO,
            None,
            || "late",
        ));
        assert_eq!(both, Ok((1, 2)));
        // A hard failure of either is returned at once.
        let hard = block_on(join_with_grace(
            async { Err::<Result<u8, &str>, &str>("reader failed") },
            std::future::pending::<Result<(), &str>>(),
            grace,
            None,
            || "late",
        ));
        assert_eq!(hard, Err("reader failed"));
    }

    /// A stream end that keeps what it is given and whether it was finished.
    #[derive(Default)]
    struct Recorder {
        got: Vec<u8>,
        finished: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.got.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.finished = true;
            Poll::Ready(Ok(()))
        }
    }

    impl WriteBytes for Recorder {
        fn poll_write_bytes(
            &mut self,
            _: &mut Context<'_>,
            data: &Bytes,
        ) -> Poll<io::Result<usize>> {
            self.got.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
    }

    /// The socket's last bytes reach the stream either way; the end of file after them
    /// finishes the stream, unless the socket's writer had failed: then it is the reset
    /// Linux reported to the writer, and the stream is left unfinished for the relay to
    /// reset, so that its peer never takes a broken connection for a clean end.
    #[test]
    fn an_end_of_file_after_the_socket_writer_failed_is_a_reset() {
        for writer_failed in [false, true] {
            let stream = Mutex::new(Recorder::default());
            let flag = AtomicBool::new(writer_failed);
            let socket = futures_lite::io::Cursor::new(b"last bytes".to_vec());
            let copied = block_on(copy_into_stream(socket, &stream, &flag, |_| {}));
            let end = lock(&stream);
            assert_eq!(end.got, b"last bytes", "writer failed: {writer_failed}");
            if writer_failed {
                let err = copied.expect_err("an end of file after a failed write");
                let RelayError::Socket(err) = err else {
                    panic!("not the socket's failure: {err}");
                };
                assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
                assert!(
                    !end.finished,
                    "the stream was finished as if the socket ended cleanly"
                );
            } else {
                assert_eq!(copied.expect("a clean end"), 10);
                assert!(
                    end.finished,
                    "a clean end of file did not finish the stream"
                );
            }
        }
    }

    /// A lent buffer comes back when its last slice is dropped, and is read into again
    /// (the same memory); a pool keeps at most [`POOL_KEEP`], and only of the size asked.
    #[test]
    fn lent_buffers_come_back_to_their_pool_when_their_last_slice_is_dropped() {
        let pool = Pool::default();
        let buf = pool.take(1024);
        let addr = buf.as_ptr();
        let lend = |buf, len| {
            Bytes::from_owner(Lent {
                buf,
                len,
                pool: pool.clone(),
            })
        };
        let mut data = lend(buf, 600);
        assert_eq!(data.len(), 600);
        let front = data.split_to(100);
        drop(data);
        assert!(lock(&pool.0).is_empty(), "returned while a slice lives");
        drop(front);
        let again = pool.take(1024);
        assert_eq!(again.as_ptr(), addr, "the buffer was not reused");
        // Three come back; one is kept.
        let lent: Vec<Bytes> = (0..3).map(|_| lend(pool.take(1024), 1024)).collect();
        drop(lent);
        assert_eq!(lock(&pool.0).len(), POOL_KEEP);
        // A larger size lets the smaller free ones go.
        assert_eq!(pool.take(2048).len(), 2048);
        assert!(lock(&pool.0).is_empty());
        drop(again);
    }

    /// Chunks go out whole and in order whatever the writer takes per call: a write that
    /// ends inside a chunk, on a boundary, or spans several.
    #[test]
    fn write_chunks_writes_every_chunk_in_order_through_partial_writes() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for per_call in [1, 7, 100, 1000, 4096, 10_000] {
            let mut chunks: Vec<Bytes> = [0, 1, 1, 300, 301, 2000, 4999, 5000]
                .windows(2)
                .map(|w| Bytes::copy_from_slice(&data[w[0]..w[1]]))
                .collect();
            // More chunks than one vectored write takes.
            chunks.extend(data.chunks(3).map(Bytes::copy_from_slice));
            let mut w = Trickle::new(per_call);
            block_on(write_chunks(&mut w, &mut chunks)).unwrap();
            assert!(
                w.out == [&data[..], &data[..]].concat(),
                "{per_call} bytes per call"
            );
            assert!(chunks.is_empty());
        }
    }

    /// A read of many chunks goes out in few vectored writes (64 slices each), whole and in
    /// order; the end of the stream closes the writer.
    #[test]
    fn copy_from_stream_writes_many_chunks_per_call_and_closes_at_the_end() {
        let frame = |i: u8| Bytes::from(vec![i; 16 * 1024]);
        let batches = vec![(0..100).map(frame).collect(), vec![frame(200)]];
        let expected: Vec<u8> = batches.iter().flatten().flat_map(|c| c.to_vec()).collect();
        let mut w = Trickle::new(usize::MAX);
        let total = block_on(copy_from_stream(
            Batches::new(batches),
            &mut w,
            1 << 20,
            |_| {},
        ))
        .unwrap();
        assert_eq!(total, expected.len() as u64);
        assert!(w.out == expected);
        assert!(
            w.closed,
            "the writer was not closed at the end of the stream"
        );
        // 100 chunks: 64, then 36; then the last batch's one.
        assert_eq!(w.calls, 3);
    }

    /// Sets its flag when dropped.
    struct DropFlag<'a>(&'a Cell<bool>);

    impl Drop for DropFlag<'_> {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    #[test]
    fn a_branch_is_polled_only_when_its_own_waker_fired() {
        let (tx, rx) = async_channel::bounded::<()>(1);
        let polls = Cell::new(0);
        let mut recv = pin!(rx.recv());
        // Waits for a message, counting its polls.
        let waiting = std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            recv.as_mut().poll(cx).map(|r| r.map_err(|_| "closed"))
        });
        // Makes progress a hundred times (each yield wakes its own branch), then sends.
        let busy = async {
            for _ in 0..100 {
                yield_now().await;
            }
            tx.send(()).await.map_err(|_| "send failed")
        };
        assert_eq!(block_on(try_join2(waiting, busy)), Ok(((), ())));
        // Once at the start, once for the message (try_zip would have polled it ~100 times).
        assert!(
            polls.get() <= 3,
            "the waiting branch was polled {} times",
            polls.get()
        );
    }
}
