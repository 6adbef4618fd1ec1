//! Buffered reading and byte relays shared by the HTTP and SOCKS5 front ends.

use std::io;
use std::pin::pin;
use std::sync::Mutex;
use std::time::Duration;

use fluidity_runtime_smol::relay::{copy_from_stream, try_join2, ReadChunks, SharedHalf};
use fluidity_runtime_smol::timer::LazyTimer;
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::chunked::{ChunkedDecoder, ChunkedError};
use super::head::{leading_empty_lines, HeadError, MAX_HEAD_LEN};

/// Largest capacity of a read buffer: a maximal head plus room to notice that it is too
/// long.
const BUF_CAP: usize = MAX_HEAD_LEN + 8 * 1024;

/// Capacity a read buffer starts with. Most heads and small bodies fit; a buffer grows
/// towards [`BUF_CAP`] only for a longer head or a bulk transfer, so that many short
/// connections at once stay cheap in memory.
const BUF_START: usize = 16 * 1024;

/// Capacity a client connection's read buffer starts with: most request heads fit, and a
/// request body makes it grow like any other. Smaller than [`BUF_START`] because every
/// open client connection, idle or not, holds one.
pub(crate) const CLIENT_BUF_START: usize = 4 * 1024;

/// A reader with a fixed-size buffer whose unread bytes can be inspected and consumed.
pub(crate) struct Inbound<R> {
    io: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Whether the last read filled the buffer to the end (more was probably waiting).
    filled: bool,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub(crate) fn new(io: R) -> Self {
        Inbound::with_capacity(io, BUF_START)
    }

    /// A reader whose buffer starts at `capacity` bytes (at most [`BUF_CAP`]).
    pub(crate) fn with_capacity(io: R, capacity: usize) -> Self {
        Inbound {
            io,
            buf: vec![0; capacity.clamp(1, BUF_CAP)].into_boxed_slice(),
            start: 0,
            end: 0,
            filled: false,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes after the buffered ones; `Ok(0)` means end of stream.
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                if self.buf.len() >= BUF_CAP {
                    return Err(io::Error::other("read buffer full"));
                }
                self.grow();
            } else {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
        } else if self.end == 0 && self.filled && self.buf.len() < BUF_CAP {
            // Empty, and the last read filled it: a bulk transfer; read larger pieces.
            self.grow();
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        self.filled = n > 0 && self.end == self.buf.len();
        Ok(n)
    }

    /// Doubles the buffer (up to [`BUF_CAP`]), keeping the unread bytes.
    fn grow(&mut self) {
        let mut bigger = vec![0; (self.buf.len() * 2).min(BUF_CAP)].into_boxed_slice();
        let kept = self.end - self.start;
        bigger[..kept].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = bigger;
        self.start = 0;
        self.end = kept;
    }
}

/// Why a head could not be read.
#[derive(Debug)]
pub(crate) enum ReadHeadError {
    /// The peer closed the connection in the middle of a head.
    Truncated,
    /// The head is invalid or too large.
    Head(HeadError),
    /// Reading failed.
    Io(io::Error),
}

type ParseFn<T> = fn(&[u8]) -> Result<Option<(T, usize)>, HeadError>;

/// Reads and consumes one head. `Ok(None)` means the peer closed the connection cleanly
/// before sending any byte of it.
pub(crate) async fn read_head<R: AsyncRead + Unpin, T>(
    inb: &mut Inbound<R>,
    parse: ParseFn<T>,
) -> Result<Option<T>, ReadHeadError> {
    // Parse only when a new line has arrived: the number of lines is bounded by the
    // header-count limit, so the total parsing work stays bounded even for a client that
    // sends one byte at a time.
    let mut parse_now = !inb.buffered().is_empty();
    loop {
        let skip = leading_empty_lines(inb.buffered());
        inb.consume(skip);
        if parse_now {
            if let Some((head, len)) = parse(inb.buffered()).map_err(ReadHeadError::Head)? {
                inb.consume(len);
                return Ok(Some(head));
            }
        }
        if inb.buffered().len() > MAX_HEAD_LEN {
            return Err(ReadHeadError::Head(HeadError::TooLarge));
        }
        let before = inb.buffered().len();
        let n = inb.fill().await.map_err(ReadHeadError::Io)?;
        if n == 0 {
            return if inb.buffered().is_empty() {
                Ok(None)
            } else {
                Err(ReadHeadError::Truncated)
            };
        }
        parse_now = inb.buffered()[before..].contains(&b'\n');
    }
}

/// Runs `fut`, giving up with `None` after `limit`. For a limit set again and again on
/// one connection, keep a [`LazyTimer`] instead. Pin a large future where it is made
/// (`pin!`) and pass that, as for [`LazyTimer::run`].
pub(crate) async fn timeout<F: std::future::Future + Unpin>(
    limit: Duration,
    fut: F,
) -> Option<F::Output> {
    LazyTimer::new().run(limit, fut).await
}

/// Why a body could not be copied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    /// The reading side ended before the body did.
    #[error("connection closed before the end of the body")]
    Eof,
    /// The reading side failed.
    #[error("read failed: {0}")]
    Read(io::Error),
    /// The writing side failed.
    #[error("write failed: {0}")]
    Write(io::Error),
    /// The chunked coding is invalid.
    #[error("{0}")]
    Chunked(ChunkedError),
    /// Passing a stream's bytes to the client failed: reading the stream, or writing.
    #[error("{0}")]
    Relay(io::Error),
}

/// Sends `head` (a message head) before a body that `from` delivers. When body bytes
/// are already buffered, the head stays in `head` and goes out with them in one write
/// ([`write_after`]): for a small message one system call instead of two. Otherwise it
/// goes out now, so that a head whose body has not arrived (a slow origin, a client
/// waiting for `100 Continue`) is never held back.
async fn start_message<R, W>(
    from: &Inbound<R>,
    to: &mut W,
    head: &mut Vec<u8>,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if head.is_empty() || !from.buffered().is_empty() {
        return Ok(());
    }
    to.write_all(head).await.map_err(CopyError::Write)?;
    to.flush().await.map_err(CopyError::Write)?;
    head.clear();
    Ok(())
}

/// Writes what is left of `head`, then `data`, as one vectored write where the writer
/// takes it (one system call for a socket, and no copy of the body behind the head);
/// `head` ends empty.
async fn write_after<W>(to: &mut W, head: &mut Vec<u8>, data: &[u8]) -> Result<(), CopyError>
where
    W: AsyncWrite + Unpin,
{
    let mut sent = 0;
    let mut data_sent = 0;
    while sent < head.len() {
        let bufs = [io::IoSlice::new(&head[sent..]), io::IoSlice::new(data)];
        let n = to.write_vectored(&bufs).await.map_err(CopyError::Write)?;
        if n == 0 {
            return Err(CopyError::Write(io::ErrorKind::WriteZero.into()));
        }
        let from_head = n.min(head.len() - sent);
        sent += from_head;
        data_sent = n - from_head;
    }
    head.clear();
    to.write_all(&data[data_sent..])
        .await
        .map_err(CopyError::Write)
}

/// Sends `head`, then copies exactly `len` body bytes. `head` is emptied once sent, so
/// after an error the caller can tell whether anything reached `to`.
pub(crate) async fn copy_exact<R, W>(
    from: &mut Inbound<R>,
    to: &mut W,
    head: &mut Vec<u8>,
    mut len: u64,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if len > 0 {
        start_message(from, to, head).await?;
    }
    while len > 0 {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Eof);
        }
        let n = from
            .buffered()
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX));
        write_after(to, head, &from.buffered()[..n]).await?;
        from.consume(n);
        len -= n as u64;
    }
    write_after(to, head, &[]).await?;
    to.flush().await.map_err(CopyError::Write)
}

/// Sends `head`, then copies one chunked body unchanged, stopping exactly at its end;
/// returns the body's length. `head` is emptied once sent, as in [`copy_exact`]. Invalid
/// coding is found before the bytes buffered with it are written, so a body invalid
/// within the bytes that arrived with the head leaves `head` unsent.
pub(crate) async fn copy_chunked<R, W>(
    from: &mut Inbound<R>,
    to: &mut W,
    head: &mut Vec<u8>,
) -> Result<u64, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    start_message(from, to, head).await?;
    let mut decoder = ChunkedDecoder::new();
    let mut total = 0u64;
    while !decoder.is_done() {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Eof);
        }
        // Find how much of the buffer belongs to the body, then forward it in one write.
        let buf = from.buffered();
        let mut used = 0;
        while used < buf.len() && !decoder.is_done() {
            let step = decoder.feed(&buf[used..]).map_err(CopyError::Chunked)?;
            if step.consumed == 0 {
                break;
            }
            used += step.consumed;
        }
        write_after(to, head, &buf[..used]).await?;
        from.consume(used);
        total += used as u64;
    }
    to.flush().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// Copies everything until `from` ends, then closes the write side of `to` (a half-close:
/// the other direction carries on). Returns the number of bytes copied.
pub(crate) async fn pipe<R, W>(from: &mut Inbound<R>, to: &mut W) -> Result<u64, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            break;
        }
        let n = from.buffered().len();
        to.write_all(from.buffered())
            .await
            .map_err(CopyError::Write)?;
        to.flush().await.map_err(CopyError::Write)?;
        from.consume(n);
        total += n as u64;
    }
    to.close().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// Relays between a client connection and a tunnel stream until both directions have
/// ended; returns the bytes moved each way (client to stream, stream to client). The
/// stream's bytes reach the client in the chunks they arrived in, with no buffer of their
/// own and no copy ([`copy_from_stream`]). An error in either direction ends both: the
/// caller drops both ends, which resets them.
pub(crate) async fn relay_stream<R, W, S>(
    cin: &mut Inbound<R>,
    cw: &mut W,
    stream: S,
) -> Result<(u64, u64), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncWrite + ReadChunks + Unpin,
{
    // Both directions run in this one task, so the lock is never contended.
    let stream = Mutex::new(stream);
    try_join2(pipe(cin, &mut SharedHalf(&stream)), async {
        copy_from_stream(&stream, &mut *cw, BUF_CAP, |_| {})
            .await
            .map_err(CopyError::Relay)
    })
    .await
}

/// Relays both directions until each has ended; returns (a→b, b→a) byte counts. An error
/// in either direction ends both: the caller drops both ends, which resets them.
pub(crate) async fn relay<AR, AW, BR, BW>(
    a_in: &mut Inbound<AR>,
    a_out: &mut AW,
    b_in: &mut Inbound<BR>,
    b_out: &mut BW,
) -> Result<(u64, u64), CopyError>
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    try_join2(pipe(a_in, b_out), pipe(b_in, a_out)).await
}

/// Ends a connection after an error answer: closes our sending side, then reads and drops
/// what the client still sends (bounded in time and size) so that closing with unread
/// data does not reset the connection before the client has read the answer.
pub(crate) async fn linger_close<R, W>(inb: &mut Inbound<R>, w: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 4 * 1024 * 1024;
    if w.close().await.is_err() {
        return;
    }
    let drain = async {
        let mut dropped = inb.buffered().len();
        inb.consume(dropped);
        while dropped < LINGER_BYTES {
            match inb.fill().await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    dropped += n;
                    inb.consume(n);
                }
            }
        }
    };
    let _ = timeout(LINGER_TIME, pin!(drain)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `per_call` bytes per call, across the slices of a
    /// vectored write, and counts its calls.
    struct Trickle {
        out: Vec<u8>,
        per_call: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.per_call - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer with only `poll_write` (so vectored writes take the first slice only),
    /// like a split tunnel stream.
    struct Plain(Vec<u8>);

    impl AsyncWrite for Plain {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(5);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_head_and_its_body_leave_whole_through_a_writer_without_vectored_writes() {
        let cases: [(&[u8], &[u8]); 3] =
            [(b"HEAD\r\n\r\n", b"body bytes"), (b"", b"x"), (b"h", b"")];
        for (head, body) in cases {
            let mut w = Plain(Vec::new());
            let mut h = head.to_vec();
            futures_lite::future::block_on(write_after(&mut w, &mut h, body)).unwrap();
            assert_eq!(w.0, [head, body].concat());
            assert!(h.is_empty());
        }
    }

    #[test]
    fn a_head_and_its_body_leave_whole_and_in_order_whatever_the_writer_takes() {
        let body: Vec<u8> = (0..100u8).collect();
        for per_call in [1, 3, 7, 10, 11, 50, 110, 1000] {
            let mut w = Trickle {
                out: Vec::new(),
                per_call,
                calls: 0,
            };
            let mut head = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            let expected: Vec<u8> = head.iter().chain(&body).copied().collect();
            futures_lite::future::block_on(write_after(&mut w, &mut head, &body)).unwrap();
            assert_eq!(w.out, expected, "per_call {per_call}");
            assert!(head.is_empty());
            if per_call >= expected.len() {
                assert_eq!(w.calls, 1, "head and body in one write");
            }
        }
    }
}
