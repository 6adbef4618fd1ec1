//! Stand-ins for a client socket and a tunnel stream, for the tests and fuzz targets of
//! this crate and the crates above it: built for tests, for fuzzing, and with the
//! `testing` feature (which the agent's tests enable).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_io::AsyncWrite;

use crate::relay::ReadChunks;

/// A writer that takes at most `per_call` bytes per write, across the slices of a
/// vectored write; counts its writes and notes its close.
#[derive(Debug, Default)]
pub struct Trickle {
    /// Every byte written, in order.
    pub out: Vec<u8>,
    /// Most bytes one write takes; 0 (the default) makes every write take nothing, so
    /// set it.
    pub per_call: usize,
    /// Writes made, vectored or not.
    pub calls: usize,
    /// Whether it was closed.
    pub closed: bool,
}

impl Trickle {
    /// A writer taking at most `per_call` bytes per write.
    pub fn new(per_call: usize) -> Self {
        Trickle {
            per_call,
            ..Trickle::default()
        }
    }
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
        _: &mut Context<'_>,
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

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.closed = true;
        Poll::Ready(Ok(()))
    }
}

/// A stream that hands out fixed batches of chunks, one batch per read (whatever `max`
/// asks), then ends: at the first empty batch, or when none is left.
#[derive(Debug, Default)]
pub struct Batches(VecDeque<Vec<Bytes>>);

impl Batches {
    /// A stream handing out these batches.
    pub fn new(batches: Vec<Vec<Bytes>>) -> Self {
        Batches(batches.into())
    }

    /// The bytes of `all`, in chunks of the given sizes (cycled), `per_read` chunks a
    /// read; the cutting stops at a size of 0, and gives nothing for no sizes.
    pub fn cut(all: &[u8], sizes: &[usize], per_read: usize) -> Self {
        let mut chunks = Vec::new();
        let mut at = 0;
        for &size in sizes.iter().cycle() {
            if at == all.len() || size == 0 {
                break;
            }
            let end = (at + size).min(all.len());
            chunks.push(Bytes::copy_from_slice(&all[at..end]));
            at = end;
        }
        Batches(
            chunks
                .chunks(per_read.max(1))
                .map(<[Bytes]>::to_vec)
                .collect(),
        )
    }
}

impl ReadChunks for Batches {
    fn poll_read_chunks(
        &mut self,
        _: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        _max: usize,
    ) -> Poll<io::Result<usize>> {
        let batch = self.0.pop_front().unwrap_or_default();
        let n = batch.iter().map(Bytes::len).sum();
        out.extend(batch);
        Poll::Ready(Ok(n))
    }
}

/// Reads one HTTP/1.1 request from `conn` as a stand-in server needs it: its path and its
/// body (by its Content-Length). Anything it cannot read gives what it has (an empty path
/// or body); for test servers, not for the network.
pub fn read_http_request(conn: &std::net::TcpStream) -> (String, Vec<u8>) {
    use std::io::{BufRead, BufReader, Read};
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = r.read_exact(&mut body);
    (path, body)
}
