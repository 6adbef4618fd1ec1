//! Buffered reading and byte relays shared by the HTTP and SOCKS5 front ends.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fluidity_runtime_smol::relay::{
    consume_chunks, join_with_grace, ReadChunks, SharedHalf, LAST_BYTES_TIME,
};
use fluidity_runtime_smol::timer::LazyTimer;
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::AsyncWriteExt;

use super::chunked::{ChunkedDecoder, ChunkedError};
use super::head::{leading_empty_lines, HeadError, Header, MAX_HEAD_LEN};

/// Largest capacity of a read buffer, and most bytes taken from a stream at once: a
/// maximal head plus room to notice that it is too long.
const BUF_CAP: usize = MAX_HEAD_LEN + 8 * 1024;

/// Capacity a client connection's read buffer starts with: most request heads fit, and a
/// request body makes it grow towards [`BUF_CAP`] (doubling when a read fills it). Small,
/// because every open client connection, idle or not, holds one.
pub(crate) const CLIENT_BUF_START: usize = 4 * 1024;

/// Where a front end reads a peer's bytes: received bytes that can be inspected and
/// consumed, and a way to receive more.
pub(crate) trait Source {
    /// The first unread bytes, contiguous. A [`fill`](Source::fill) that returns more
    /// than 0 makes this longer, so that a message head can be parsed whole.
    fn buffered(&self) -> &[u8];

    /// Every unread byte, in order, up to `limit` bytes, as at most `out.len()` slices
    /// (the first is [`buffered`](Source::buffered)); returns how many slices were set.
    fn buffered_slices<'a>(&'a self, out: &mut [IoSlice<'a>], limit: usize) -> usize {
        let b = self.buffered();
        let b = &b[..b.len().min(limit)];
        match out.first_mut() {
            Some(slot) if !b.is_empty() => {
                *slot = IoSlice::new(b);
                1
            }
            _ => 0,
        }
    }

    /// Drops the first `n` unread bytes.
    fn consume(&mut self, n: usize);

    /// Makes [`buffered`](Source::buffered) longer, receiving more bytes if it must, and
    /// returns a count above 0 (not necessarily by how much it grew); `Ready(Ok(0))` is
    /// the end of the input.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>;

    /// Makes [`buffered`](Source::buffered) longer, as [`poll_fill`](Source::poll_fill);
    /// `Ok(0)` is the end of the input.
    fn fill(&mut self) -> Fill<'_, Self>
    where
        Self: Sized,
    {
        Fill(self)
    }
}

/// The future of [`Source::fill`].
pub(crate) struct Fill<'a, S>(&'a mut S);

impl<S: Source> Future for Fill<'_, S> {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_fill(cx)
    }
}

/// A socket's bytes read into a buffer of its own, which grows up to [`BUF_CAP`].
pub(crate) struct Inbound<R> {
    io: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Whether the last read filled the buffer to the end (more was probably waiting).
    filled: bool,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
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

    /// Doubles the buffer (up to [`BUF_CAP`]), keeping the unread bytes.
    fn grow(&mut self) {
        let mut bigger = vec![0; (self.buf.len() * 2).min(BUF_CAP)].into_boxed_slice();
        let kept = self.end - self.start;
        bigger[..kept].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = bigger;
        self.start = 0;
        self.end = kept;
        self.filled = false;
    }
}

impl<R: AsyncRead + Unpin> Source for Inbound<R> {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                if self.buf.len() >= BUF_CAP {
                    return Poll::Ready(Err(io::Error::other("read buffer full")));
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
        let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut self.buf[self.end..]))?;
        self.end += n;
        self.filled = n > 0 && self.end == self.buf.len();
        Poll::Ready(Ok(n))
    }
}

/// Bytes taken from a tunnel stream and not yet used, kept with the stream between
/// messages.
#[derive(Default)]
struct Received {
    /// Chunks joined into one piece, before `chunks`: a message head that arrived in
    /// several (rare). The piece grows geometrically, so joining costs time linear in
    /// the head's length however it was cut.
    joined: BytesMut,
    /// The stream's own chunks, none empty; a short list, since a read hands out at most
    /// [`MAX_READ_CHUNKS`](fluidity_runtime_smol::relay::MAX_READ_CHUNKS).
    chunks: Vec<Bytes>,
}

impl Received {
    /// Whether nothing is left unread.
    fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.chunks.is_empty()
    }

    /// Makes the first piece longer by the next chunk; returns that chunk's length.
    fn join_next(&mut self) -> usize {
        let take = if self.joined.is_empty() { 2 } else { 1 };
        let mut added = 0;
        for c in self.chunks.drain(..take.min(self.chunks.len())) {
            added = c.len();
            self.joined.extend_from_slice(&c);
        }
        added
    }
}

/// A tunnel stream's bytes as the stream hands them out: its own chunks, with no read
/// buffer and no copy (a body goes to the client as it arrived, several chunks per
/// vectored write). What is left unread stays in `rx`, with the stream.
pub(crate) struct StreamInbound<'a, S> {
    stream: SharedHalf<'a, S>,
    rx: &'a mut Received,
}

/// A tunnel stream that one task reads and writes at once, its two directions sharing
/// it through a lock that is therefore never contended, with what was taken from it and
/// not yet used.
pub(crate) struct SharedStream<S> {
    stream: Mutex<S>,
    rx: Received,
}

impl<S> SharedStream<S> {
    pub(crate) fn new(stream: S) -> Self {
        SharedStream {
            stream: Mutex::new(stream),
            rx: Received::default(),
        }
    }

    /// See [`ReadChunks::give_up_if_unresponsive`].
    pub(crate) fn give_up_if_unresponsive(&mut self, on: bool)
    where
        S: ReadChunks,
    {
        let stream = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        stream.give_up_if_unresponsive(on);
    }

    /// Whether bytes taken from the stream are left unread.
    pub(crate) fn has_unread(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The reading and the writing side.
    pub(crate) fn halves(&mut self) -> (StreamInbound<'_, S>, SharedHalf<'_, S>) {
        (
            StreamInbound {
                stream: SharedHalf(&self.stream),
                rx: &mut self.rx,
            },
            SharedHalf(&self.stream),
        )
    }
}

impl<S: ReadChunks> Source for StreamInbound<'_, S> {
    fn buffered(&self) -> &[u8] {
        if self.rx.joined.is_empty() {
            self.rx.chunks.first().map_or(&[], |c| c)
        } else {
            &self.rx.joined
        }
    }

    fn buffered_slices<'b>(&'b self, out: &mut [IoSlice<'b>], limit: usize) -> usize {
        let pieces =
            std::iter::once(&self.rx.joined[..]).chain(self.rx.chunks.iter().map(|c| &c[..]));
        let mut room = limit;
        let mut k = 0;
        for (slot, piece) in out.iter_mut().zip(pieces.filter(|p| !p.is_empty())) {
            if room == 0 {
                break;
            }
            let piece = &piece[..piece.len().min(room)];
            room -= piece.len();
            *slot = IoSlice::new(piece);
            k += 1;
        }
        k
    }

    fn consume(&mut self, n: usize) {
        let from_joined = n.min(self.rx.joined.len());
        self.rx.joined.advance(from_joined);
        if self.rx.joined.is_empty() && self.rx.joined.capacity() > 0 {
            // Joining is rare: give its memory back rather than keep it with the stream.
            self.rx.joined = BytesMut::new();
        }
        consume_chunks(&mut self.rx.chunks, n - from_joined);
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let rx = &mut *self.rx;
        let had = !rx.is_empty();
        // Unread bytes mean the caller needs them longer (a head in several chunks): join
        // the next chunk to them, from those already taken if there is one.
        if had && rx.chunks.len() > usize::from(rx.joined.is_empty()) {
            return Poll::Ready(Ok(rx.join_next()));
        }
        let n = ready!(self.stream.poll_read_chunks(cx, &mut rx.chunks, BUF_CAP))?;
        rx.chunks.retain(|c| !c.is_empty());
        if had && n > 0 {
            rx.join_next();
        }
        Poll::Ready(Ok(n))
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
pub(crate) async fn read_head<S: Source, T>(
    inb: &mut S,
    parse: ParseFn<T>,
) -> Result<Option<T>, ReadHeadError> {
    // Parse only when a new line has arrived, and once more before giving up: the number
    // of lines is bounded by the header-count limit, so the total parsing work stays
    // bounded even for a peer that sends one byte at a time. Parsing before giving up
    // makes the verdict on a head the same however its bytes were cut.
    let mut parse_now = !inb.buffered().is_empty();
    loop {
        // Skipped lines may have uncovered unparsed bytes (the next of a stream's chunks).
        loop {
            let skip = leading_empty_lines(inb.buffered());
            if skip == 0 {
                break;
            }
            inb.consume(skip);
            parse_now = !inb.buffered().is_empty();
        }
        let too_large = inb.buffered().len() > MAX_HEAD_LEN;
        if parse_now || too_large {
            if let Some((head, len)) = parse(head_view(inb)).map_err(ReadHeadError::Head)? {
                inb.consume(len);
                return Ok(Some(head));
            }
        }
        if too_large {
            return Err(ReadHeadError::Head(HeadError::TooLarge));
        }
        let before = inb.buffered().len();
        let n = inb.fill().await.map_err(ReadHeadError::Io)?;
        if n == 0 {
            if inb.buffered().is_empty() {
                return Ok(None);
            }
            // The last bytes may be an invalid head without a line end: say so rather
            // than that it was cut short.
            parse(head_view(inb)).map_err(ReadHeadError::Head)?;
            return Err(ReadHeadError::Truncated);
        }
        parse_now = inb.buffered()[before..].contains(&b'\n');
    }
}

/// What a head is parsed from: the buffered bytes, never more than one past the head
/// limit, so that the parser's verdict on a head too large does not depend on how many
/// bytes came with it.
fn head_view<S: Source>(inb: &S) -> &[u8] {
    let b = inb.buffered();
    &b[..b.len().min(MAX_HEAD_LEN + 1)]
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
}

impl CopyError {
    /// Whether a relay ended this way as connections end every day: one side reset or
    /// hung up (a browser closing a tab ends its tunnels so). Logged at debug, not info.
    pub(crate) fn is_routine(&self) -> bool {
        use io::ErrorKind as K;
        match self {
            CopyError::Eof => true,
            CopyError::Read(e) | CopyError::Write(e) => matches!(
                e.kind(),
                K::ConnectionReset | K::NotConnected | K::BrokenPipe | K::UnexpectedEof
            ),
            CopyError::Chunked(_) => false,
        }
    }
}

/// A relay's failure, by the end it happened at.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// The local client's connection: it failed, left, or did not take the last bytes.
    #[error("the client's connection: {0}")]
    Client(CopyError),
    /// The tunnel stream: the server reset it, or the tunnel was lost.
    #[error("the tunnel stream: {0}")]
    Tunnel(CopyError),
}

impl RelayError {
    /// Whether the relay ended as connections end every day ([`CopyError::is_routine`]).
    pub(crate) fn is_routine(&self) -> bool {
        match self {
            RelayError::Client(e) | RelayError::Tunnel(e) => e.is_routine(),
        }
    }
}

/// Sends `head` (a message head) before a body that `from` delivers. When body bytes
/// are already buffered, the head stays in `head` and goes out with them in one write
/// ([`write_after`]): for a small message one system call instead of two. Otherwise it
/// goes out now, so that a head whose body has not arrived (a slow origin, a client
/// waiting for `100 Continue`) is never held back.
async fn start_message<S, W>(from: &S, to: &mut W, head: &mut Vec<u8>) -> Result<(), CopyError>
where
    S: Source,
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

/// Most body slices given to one vectored write. Few: the array lives in every
/// connection's task while it writes, and a read from a stream takes at most
/// [`BUF_CAP`] bytes, a handful of full frames.
const MAX_SLICES: usize = 8;

/// Writes what is left of `head`, then up to `limit` of the bytes `from` has buffered,
/// consuming them, with vectored writes where the writer takes them (one system call for
/// a head and its body, no copy of the body); returns the body bytes written. `head`
/// ends empty.
async fn write_after<S, W>(
    to: &mut W,
    head: &mut Vec<u8>,
    from: &mut S,
    limit: u64,
) -> Result<u64, CopyError>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let mut sent = 0;
    let mut body = 0u64;
    loop {
        let room = usize::try_from(limit.saturating_sub(body)).unwrap_or(usize::MAX);
        let mut slices = [IoSlice::new(&[]); 1 + MAX_SLICES];
        let mut k = 0;
        if sent < head.len() {
            slices[0] = IoSlice::new(&head[sent..]);
            k = 1;
        }
        k += from.buffered_slices(&mut slices[k..], room);
        if k == 0 {
            break;
        }
        let n = to
            .write_vectored(&slices[..k])
            .await
            .map_err(CopyError::Write)?;
        if n == 0 {
            return Err(CopyError::Write(io::ErrorKind::WriteZero.into()));
        }
        let from_head = n.min(head.len() - sent);
        sent += from_head;
        from.consume(n - from_head);
        body += (n - from_head) as u64;
    }
    head.clear();
    Ok(body)
}

/// Sends `head`, then copies exactly `len` body bytes. `head` is emptied once sent, so
/// after an error the caller can tell whether anything reached `to`.
pub(crate) async fn copy_exact<S, W>(
    from: &mut S,
    to: &mut W,
    head: &mut Vec<u8>,
    mut len: u64,
) -> Result<(), CopyError>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    if len > 0 {
        start_message(from, to, head).await?;
    }
    while len > 0 {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Eof);
        }
        len -= write_after(to, head, from, len).await?;
    }
    write_after(to, head, from, 0).await?;
    to.flush().await.map_err(CopyError::Write)
}

/// Sends `head`, then copies one chunked body, stopping exactly at its end; returns the
/// body's length as sent. Chunks go unchanged; a trailer section that keeps every field
/// goes unchanged with them, and one that does not (bounded by the decoder) is held and
/// sent with only the fields `keep_trailer` keeps, since a proxy must not pass on
/// hop-by-hop fields there either (RFC 9110 §7.6.1). `head` is emptied once sent, as in
/// [`copy_exact`]. Invalid coding, trailers included, is found before the bytes buffered
/// with it are written, so a body invalid within the bytes that arrived with the head (in
/// its first [`MAX_SLICES`] pieces) leaves `head` unsent.
pub(crate) async fn copy_chunked<S, W>(
    from: &mut S,
    to: &mut W,
    head: &mut Vec<u8>,
    keep_trailer: &(dyn Fn(&Header<'_>) -> bool + Sync),
) -> Result<u64, CopyError>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    start_message(from, to, head).await?;
    let mut decoder = ChunkedDecoder::new();
    let mut total = 0u64;
    // The trailer section so far, held apart from the chunks.
    let mut trailers = Vec::new();
    while !decoder.is_done() {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Eof);
        }
        // How much of the buffered bytes are chunks (`used`, forwarded in one write) and
        // trailer section after them (`held`).
        let (mut used, mut held) = (0, 0);
        {
            let mut pieces = [IoSlice::new(&[]); MAX_SLICES];
            let k = from.buffered_slices(&mut pieces, usize::MAX);
            'pieces: for piece in &pieces[..k] {
                let mut at = 0;
                while at < piece.len() && !decoder.is_done() {
                    // A step never crosses into the trailer section: it stops there.
                    let in_trailers = decoder.in_trailers();
                    let step = decoder.feed(&piece[at..]).map_err(CopyError::Chunked)?;
                    if step.consumed == 0 {
                        break 'pieces;
                    }
                    if in_trailers {
                        trailers.extend_from_slice(&piece[at..at + step.consumed]);
                        held += step.consumed;
                    } else {
                        used += step.consumed;
                    }
                    at += step.consumed;
                }
                if decoder.is_done() {
                    break;
                }
            }
        }
        // A whole section in these bytes that keeps every field goes as it came.
        if decoder.is_done()
            && held == trailers.len()
            && kept_trailers(&trailers, keep_trailer) == trailers
        {
            used += held;
            held = 0;
            trailers.clear();
        }
        total += write_after(to, head, from, used as u64).await?;
        from.consume(held);
    }
    if !trailers.is_empty() {
        let kept = kept_trailers(&trailers, keep_trailer);
        write_after(to, head, from, 0).await?;
        to.write_all(&kept).await.map_err(CopyError::Write)?;
        total += kept.len() as u64;
    }
    to.flush().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// A trailer section (field lines and the final empty line, as the decoder checked them)
/// with only the fields `keep` keeps.
fn kept_trailers(section: &[u8], keep: &dyn Fn(&Header<'_>) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(section.len());
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let header = Header {
            name: &line[..colon],
            value: line[colon + 1..].trim_ascii(),
        };
        if keep(&header) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `head`, then the payload of one chunked body without its coding (sizes,
/// extensions and trailers left out), stopping exactly at the body's end; returns the
/// payload's length. For a client that cannot read the coding: the close must end it.
pub(crate) async fn copy_unchunked<S, W>(
    from: &mut S,
    to: &mut W,
    head: &mut Vec<u8>,
) -> Result<u64, CopyError>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    to.write_all(head).await.map_err(CopyError::Write)?;
    head.clear();
    let mut decoder = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut total = 0u64;
    while !decoder.is_done() {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Eof);
        }
        let buf = from.buffered();
        let mut at = 0;
        while at < buf.len() && !decoder.is_done() {
            let step = decoder.feed(&buf[at..]).map_err(CopyError::Chunked)?;
            if step.consumed == 0 {
                break;
            }
            payload.extend_from_slice(&buf[at + step.data.start..at + step.data.end]);
            at += step.consumed;
        }
        from.consume(at);
        if !payload.is_empty() {
            to.write_all(&payload).await.map_err(CopyError::Write)?;
            total += payload.len() as u64;
            payload.clear();
        }
    }
    to.flush().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// Copies everything until `from` ends, then closes the write side of `to` (a half-close:
/// the other direction carries on). Returns the number of bytes copied.
pub(crate) async fn pipe<S, W>(from: &mut S, to: &mut W) -> Result<u64, CopyError>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        if from.buffered().is_empty() && from.fill().await.map_err(CopyError::Read)? == 0 {
            break;
        }
        total += write_after(to, &mut Vec::new(), from, u64::MAX).await?;
        to.flush().await.map_err(CopyError::Write)?;
    }
    to.close().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// Relays between a client connection and a tunnel stream until both directions have
/// ended; returns the bytes moved each way (client to stream, stream to client). The
/// stream's bytes reach the client in the chunks they arrived in ([`StreamInbound`]).
/// An error in either direction ends both: the caller drops both ends, which resets them.
pub(crate) async fn relay_stream<C, W, S>(
    cin: &mut C,
    cw: &mut W,
    stream: S,
) -> Result<(u64, u64), RelayError>
where
    C: Source,
    W: AsyncWrite + Unpin,
    S: AsyncWrite + ReadChunks + Unpin,
{
    let mut stream = SharedStream::new(stream);
    let (mut from, mut to) = stream.halves();
    relay(cin, cw, &mut from, &mut to).await
}

/// Relays between a client (`a`) and a tunnel stream (`b`) until each direction has
/// ended; returns (a→b, b→a) byte counts, or the first error with the end it happened at
/// (`a` is the client's). An error in either direction ends both: the
/// caller drops both ends, which resets them. Except one: a stream that takes no more
/// (the server reset it) ends only the client's direction at first, because what the
/// server sent before the reset (an origin's answer to an upload it refused) still reaches
/// the client, for at most [`LAST_BYTES_TIME`]; the error is returned after that.
pub(crate) async fn relay<A, AW, B, BW>(
    a_in: &mut A,
    a_out: &mut AW,
    b_in: &mut B,
    b_out: &mut BW,
) -> Result<(u64, u64), RelayError>
where
    A: Source,
    AW: AsyncWrite + Unpin,
    B: Source,
    BW: AsyncWrite + Unpin,
{
    let up = async {
        match pipe(a_in, b_out).await {
            Ok(n) => Ok(Ok(n)),
            Err(e @ CopyError::Write(_)) => Ok(Err(RelayError::Tunnel(e))),
            Err(e) => Err(RelayError::Client(e)),
        }
    };
    let down = async {
        pipe(b_in, a_out).await.map_err(|e| match e {
            CopyError::Write(_) => RelayError::Client(e),
            _ => RelayError::Tunnel(e),
        })
    };
    // A local client takes the last bytes (at most a stream window) at once or not at all:
    // a fixed time, not moved on by progress.
    join_with_grace(up, down, LAST_BYTES_TIME, None, || {
        RelayError::Client(CopyError::Write(io::Error::new(
            io::ErrorKind::TimedOut,
            "the stream's last bytes did not reach it in time",
        )))
    })
    .await
}

/// Ends a connection after an error answer: closes our sending side, then reads and drops
/// what the client still sends (bounded in time and size) so that closing with unread
/// data does not reset the connection before the client has read the answer.
pub(crate) async fn linger_close<S, W>(inb: &mut S, w: &mut W)
where
    S: Source,
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
    use fluidity_runtime_smol::testing::{Batches, Trickle};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer with only `poll_write` (so vectored writes take the first slice only),
    /// like a tunnel stream's [`SharedHalf`].
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

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    /// Everything `from` still delivers, to its end.
    fn rest_of(from: &mut impl Source) -> Vec<u8> {
        let mut rest = Vec::new();
        loop {
            let n = from.buffered().len();
            if n == 0 {
                if block_on(from.fill()).unwrap() == 0 {
                    return rest;
                }
                continue;
            }
            rest.extend_from_slice(from.buffered());
            from.consume(n);
        }
    }

    /// A connection that fails every read and write.
    struct Broken(io::ErrorKind);

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.0.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    /// A relay's error names the end that failed, reading or writing: the client's or
    /// the tunnel stream's.
    #[test]
    fn a_relay_error_names_the_end_that_failed() {
        use io::ErrorKind::{BrokenPipe, ConnectionReset};
        let ends = |e: &RelayError| match e {
            RelayError::Client(CopyError::Read(_)) => "client read",
            RelayError::Client(CopyError::Write(_)) => "client write",
            RelayError::Tunnel(CopyError::Read(_)) => "tunnel read",
            RelayError::Tunnel(CopyError::Write(_)) => "tunnel write",
            _ => "other",
        };
        // The client's reads fail; the stream ends at once.
        let mut a_in = Inbound::with_capacity(Broken(ConnectionReset), 64);
        let mut b_in = Inbound::with_capacity(&b""[..], 64);
        let err = block_on(relay(
            &mut a_in,
            &mut Vec::new(),
            &mut b_in,
            &mut Vec::new(),
        ));
        assert_eq!(ends(&err.unwrap_err()), "client read");
        // The stream's reads fail; the client ends at once.
        let mut a_in = Inbound::with_capacity(&b""[..], 64);
        let mut b_in = Inbound::with_capacity(Broken(ConnectionReset), 64);
        let err = block_on(relay(
            &mut a_in,
            &mut Vec::new(),
            &mut b_in,
            &mut Vec::new(),
        ));
        assert_eq!(ends(&err.unwrap_err()), "tunnel read");
        // The client takes nothing of what the stream sends.
        let mut a_in = Inbound::with_capacity(&b""[..], 64);
        let mut b_in = Inbound::with_capacity(&b"answer"[..], 64);
        let mut a_out = Broken(BrokenPipe);
        let err = block_on(relay(&mut a_in, &mut a_out, &mut b_in, &mut Vec::new()));
        assert_eq!(ends(&err.unwrap_err()), "client write");
        // The stream takes nothing of what the client sends; its own bytes still end.
        let mut a_in = Inbound::with_capacity(&b"upload"[..], 64);
        let mut b_in = Inbound::with_capacity(&b""[..], 64);
        let mut b_out = Broken(ConnectionReset);
        let err = block_on(relay(&mut a_in, &mut Vec::new(), &mut b_in, &mut b_out));
        let err = err.unwrap_err();
        assert_eq!(ends(&err), "tunnel write");
        assert!(err.to_string().starts_with("the tunnel stream: "), "{err}");
    }

    #[test]
    fn a_head_and_its_body_leave_whole_through_a_writer_without_vectored_writes() {
        let cases: [(&[u8], &[u8]); 3] =
            [(b"HEAD\r\n\r\n", b"body bytes"), (b"", b"x"), (b"h", b"")];
        for (head, body) in cases {
            let mut w = Plain(Vec::new());
            let mut h = head.to_vec();
            let mut from = Inbound::with_capacity(body, 64);
            block_on(from.fill()).unwrap();
            let n = block_on(write_after(&mut w, &mut h, &mut from, u64::MAX)).unwrap();
            assert_eq!(w.0, [head, body].concat());
            assert_eq!(n, body.len() as u64);
            assert!(h.is_empty());
            assert!(from.buffered().is_empty());
        }
    }

    #[test]
    fn a_head_and_its_body_leave_whole_and_in_order_whatever_the_writer_takes() {
        let body: Vec<u8> = (0..100u8).collect();
        for per_call in [1, 3, 7, 10, 11, 50, 110, 1000] {
            for chunk in [100, 30, 1] {
                let mut w = Trickle::new(per_call);
                let mut head = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
                let expected: Vec<u8> = head.iter().chain(&body).copied().collect();
                let mut stream = SharedStream::new(Batches::cut(&body, &[chunk], 100));
                let (mut from, _) = stream.halves();
                block_on(from.fill()).unwrap();
                let mut left = body.len() as u64;
                while left > 0 {
                    left -= block_on(write_after(&mut w, &mut head, &mut from, left)).unwrap();
                }
                assert_eq!(w.out, expected, "per_call {per_call}, chunks of {chunk}");
                assert!(head.is_empty());
                assert!(!stream.has_unread());
                if per_call >= expected.len() && 100 / chunk < MAX_SLICES {
                    assert_eq!(w.calls, 1, "head and body in one write");
                }
            }
        }
    }

    /// A chunked body goes to a client that cannot read the coding as its payload alone,
    /// however its bytes are cut and whatever the writer takes per call; what follows
    /// the body stays unread.
    #[test]
    fn an_unchunked_copy_sends_the_payload_alone_and_stops_at_the_body_end() {
        let body: &[u8] =
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        for sizes in [&[1][..], &[2, 3], &[7, 4096], &[body.len()]] {
            for per_call in [1, 3, 1000] {
                let mut w = Trickle::new(per_call);
                let mut head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                let expected = [&head[..], b"hello world"].concat();
                let mut stream = SharedStream::new(Batches::cut(body, sizes, 100));
                let (mut from, _) = stream.halves();
                let n = block_on(copy_unchunked(&mut from, &mut w, &mut head)).unwrap();
                assert_eq!(n, 11, "{sizes:?} {per_call}");
                assert_eq!(w.out, expected, "{sizes:?} {per_call}");
                assert!(head.is_empty());
                assert_eq!(rest_of(&mut from), b"NEXT", "{sizes:?} {per_call}");
            }
        }
        // An invalid size is an error, not a silently short body.
        let mut w = Trickle::new(100);
        let mut stream = SharedStream::new(Batches::cut(b"zz\r\n", &[5], 100));
        let (mut from, _) = stream.halves();
        let err = block_on(copy_unchunked(&mut from, &mut w, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, CopyError::Chunked(_)), "{err:?}");
        // A body cut short is an error too.
        let mut stream = SharedStream::new(Batches::cut(b"5\r\nhel", &[8], 100));
        let (mut from, _) = stream.halves();
        let err = block_on(copy_unchunked(&mut from, &mut w, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, CopyError::Eof), "{err:?}");
    }

    /// A chunked body's trailer section reaches the other side with only the fields kept,
    /// however its bytes are cut; chunks go unchanged and what follows the body stays.
    #[test]
    fn a_chunked_copy_passes_on_only_the_trailer_fields_kept() {
        let body: &[u8] = b"5\r\nhello\r\n0\r\nX-Keep: a\r\nX-Secret: s\r\nKeep-Alive: 1\r\n\
            X-Also:  b c \r\n\r\nNEXT";
        let keep = |h: &Header<'_>| !(h.is("x-secret") || h.is("keep-alive"));
        let want: &[u8] = b"5\r\nhello\r\n0\r\nX-Keep: a\r\nX-Also:  b c \r\n\r\n";
        for sizes in [&[1][..], &[2, 3], &[14, 4096], &[body.len()]] {
            let mut stream = SharedStream::new(Batches::cut(body, sizes, 100));
            let (mut from, _) = stream.halves();
            let mut out = Vec::new();
            let n = block_on(copy_chunked(&mut from, &mut out, &mut Vec::new(), &keep)).unwrap();
            assert_eq!(out, want, "{sizes:?}: {}", String::from_utf8_lossy(&out));
            assert_eq!(n, out.len() as u64, "{sizes:?}");
            assert_eq!(rest_of(&mut from), b"NEXT", "{sizes:?}");
        }
        // An invalid trailer that arrived with the head is found before anything is
        // written: the caller can still answer in its place.
        let bad: &[u8] = b"3\r\nabc\r\n0\r\nBad\x00Trailer: x\r\n\r\n";
        let mut stream = SharedStream::new(Batches::cut(bad, &[bad.len()], 100));
        let (mut from, _) = stream.halves();
        let (mut out, mut head) = (Vec::new(), b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
        block_on(from.fill()).unwrap();
        let got = block_on(copy_chunked(&mut from, &mut out, &mut head, &keep));
        assert!(matches!(got, Err(CopyError::Chunked(_))), "{got:?}");
        assert!(out.is_empty() && !head.is_empty(), "sent before the check");
        // Without trailers, the body goes unchanged.
        let plain: &[u8] = b"3\r\nabc\r\n0\r\n\r\n";
        let mut stream = SharedStream::new(Batches::cut(plain, &[1], 100));
        let (mut from, _) = stream.halves();
        let mut out = Vec::new();
        block_on(copy_chunked(&mut from, &mut out, &mut Vec::new(), &keep)).unwrap();
        assert_eq!(out, plain);
    }

    /// Two responses on one kept stream, cut into chunks anywhere (a head in many pieces,
    /// a chunk holding the end of one message and the start of the next): each is read
    /// whole and byte-exact, and what belongs to the next stays for it.
    #[test]
    fn messages_read_from_a_streams_chunks_are_exact_however_they_are_cut() {
        let first_body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut first = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            first_body.len()
        )
        .into_bytes();
        first.extend_from_slice(&first_body);
        let second: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: t\r\n\r\n";
        let all = [&first[..], second].concat();
        for sizes in [&[1][..], &[2, 3], &[7, 4096], &[20, 1, 900], &[all.len()]] {
            for per_read in [1, 3, 100] {
                let mut stream = SharedStream::new(Batches::cut(&all, sizes, per_read));
                let (mut from, _) = stream.halves();
                let case = format!("chunks of {sizes:?}, {per_read} a read");

                let head = block_on(read_head(
                    &mut from,
                    super::super::head::parse_response_head,
                ))
                .unwrap()
                .unwrap();
                assert_eq!(head.status, 200, "{case}");
                let mut out = Vec::new();
                block_on(copy_exact(
                    &mut from,
                    &mut out,
                    &mut Vec::new(),
                    first_body.len() as u64,
                ))
                .unwrap();
                assert_eq!(out, first_body, "{case}");

                let head = block_on(read_head(
                    &mut from,
                    super::super::head::parse_response_head,
                ))
                .unwrap()
                .unwrap();
                assert!(
                    head.headers.has_token("transfer-encoding", "chunked"),
                    "{case}"
                );
                let mut out = Vec::new();
                let n = block_on(copy_chunked(&mut from, &mut out, &mut Vec::new(), &|_| {
                    true
                }))
                .unwrap();
                let body_start = second.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                assert_eq!(out, &second[body_start..], "{case}");
                assert_eq!(n, out.len() as u64, "{case}");

                assert_eq!(block_on(from.fill()).unwrap(), 0, "{case}: the end");
                assert!(!stream.has_unread(), "{case}");
                assert_eq!(
                    stream.rx.joined.capacity(),
                    0,
                    "{case}: joined memory given back"
                );
            }
        }
    }

    /// A head that never ends, trickling in one byte per chunk, is refused at the head
    /// limit: the joined bytes never exceed it by more than a chunk.
    #[test]
    fn a_head_in_endless_tiny_chunks_is_refused_at_the_limit() {
        let mut all = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        all.resize(MAX_HEAD_LEN + 100, b'a');
        let mut stream = SharedStream::new(Batches::cut(&all, &[1], 1));
        let (mut from, _) = stream.halves();
        let r = block_on(read_head(
            &mut from,
            super::super::head::parse_response_head,
        ));
        assert!(matches!(r, Err(ReadHeadError::Head(HeadError::TooLarge))));
        assert!(stream.rx.joined.len() <= MAX_HEAD_LEN + 1);
    }
}
