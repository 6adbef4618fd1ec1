//! Bidirectional byte relay with half-close, used where a tunnel stream meets a socket.

use std::io;

use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};

/// Buffer per direction to start with: enough for a typical web response or request in
/// one piece, and small enough that many idle or short connections stay cheap.
const RELAY_BUF_MIN: usize = 16 * 1024;

/// Largest buffer per direction. A direction whose reads keep filling its buffer (a bulk
/// transfer) grows up to this, so that each piece costs fewer system calls and wake-ups.
const RELAY_BUF_MAX: usize = 64 * 1024;

/// Which way bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first argument of [`relay`] to the second.
    AToB,
    /// From the second argument to the first.
    BToA,
}

/// Copies `a` → `b` and `b` → `a` at once until both directions have ended. When one
/// source ends, the other side's write half is closed (half-close) and the other
/// direction goes on. Returns the bytes moved each way, or the first error; on error both
/// ends are dropped by the caller, which aborts them.
pub async fn relay<A, B>(
    a: A,
    b: B,
    on_bytes: impl Fn(Direction, usize) + Send + Sync,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = futures_lite::io::split(a);
    let (br, bw) = futures_lite::io::split(b);
    futures_lite::future::try_zip(
        copy_half(ar, bw, |n| on_bytes(Direction::AToB, n)),
        copy_half(br, aw, |n| on_bytes(Direction::BToA, n)),
    )
    .await
}

/// Copies until EOF, then closes the writer (a FIN or a TCP half-close).
pub async fn copy_half<R, W>(mut r: R, mut w: W, on_bytes: impl Fn(usize)) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF_MIN];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.close().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        on_bytes(n);
        if n == buf.len() && buf.len() < RELAY_BUF_MAX {
            // A full read: more is probably waiting; grow (the bytes in it are sent).
            buf = vec![0u8; (buf.len() * 2).min(RELAY_BUF_MAX)];
        }
    }
}
