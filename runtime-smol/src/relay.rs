//! Bidirectional byte relay with half-close, used where a tunnel stream meets a socket.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};

/// Buffer per direction to start with: enough for a typical web response or request in
/// one piece, and small enough that many idle or short connections stay cheap.
const RELAY_BUF_MIN: usize = 16 * 1024;

/// Largest buffer per direction. A direction whose reads keep filling its buffer (a bulk
/// transfer) grows up to this, so that each piece costs fewer system calls and wake-ups:
/// from 64 KiB to 256 KiB, the server's CPU time for a download fell by about 8%
/// (docs/PERFORMANCE.md, change 20). A stream's window (4 MiB by default) is far larger.
const RELAY_BUF_MAX: usize = 256 * 1024;

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
    try_join2(
        copy_half(ar, bw, |n| on_bytes(Direction::AToB, n)),
        copy_half(br, aw, |n| on_bytes(Direction::BToA, n)),
    )
    .await
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
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut ra, mut rb) = (None, None);
    let (wa, wb) = (Arc::new(Branch::new()), Arc::new(Branch::new()));
    let (waker_a, waker_b) = (Waker::from(wa.clone()), Waker::from(wb.clone()));
    std::future::poll_fn(|cx| {
        if ra.is_none() && wa.take(cx.waker()) {
            match a.as_mut().poll(&mut Context::from_waker(&waker_a)) {
                Poll::Ready(Ok(t)) => ra = Some(t),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if rb.is_none() && wb.take(cx.waker()) {
            match b.as_mut().poll(&mut Context::from_waker(&waker_b)) {
                Poll::Ready(Ok(u)) => rb = Some(u),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
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
            let mut slot = self.task.lock().unwrap_or_else(PoisonError::into_inner);
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
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(w) = task {
            w.wake();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, yield_now};
    use std::cell::Cell;

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
