//! A timer for deadlines that move often, and usually later.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Timer;

/// One async-io timer for a deadline set again and again, each time a little later (a
/// connection's idle timeout, the wait for the next request head on a kept-alive
/// connection), and rarely reached.
///
/// Arming an async-io timer queues it in the reactor and wakes the reactor (a system call
/// and an extra turn of its loop). This one is only ever moved earlier: when it fires
/// before the current deadline, it is armed again for that deadline, so a deadline that
/// keeps moving later re-arms it about once per its length.
#[derive(Debug)]
pub struct LazyTimer {
    timer: Timer,
    armed: Option<Instant>,
}

impl Default for LazyTimer {
    fn default() -> Self {
        LazyTimer::new()
    }
}

impl LazyTimer {
    /// A timer with nothing armed.
    pub fn new() -> Self {
        LazyTimer {
            timer: Timer::never(),
            armed: None,
        }
    }

    /// `Ready` once `deadline` has passed; until then the task is woken at `deadline` (or
    /// at an earlier one still armed, which re-arms for `deadline` without waking it).
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        loop {
            if self.armed.is_none_or(|at| at > deadline) {
                self.timer.set_at(deadline);
                self.armed = Some(deadline);
            }
            match Pin::new(&mut self.timer).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => {
                    // Fired: for this deadline, or for an earlier one (then re-armed).
                    self.armed = None;
                    if Instant::now() >= deadline {
                        return Poll::Ready(());
                    }
                }
            }
        }
    }

    /// Forgets the deadline armed, if any.
    pub fn clear(&mut self) {
        if self.armed.take().is_some() {
            self.timer = Timer::never();
        }
    }

    /// Runs `fut`, giving up with `None` once `limit` (from now) has passed.
    ///
    /// `fut` is taken pinned where the caller holds it (`pin!`), not moved in: a future
    /// moved into an async fn is stored in its state as an argument and again where it is
    /// pinned, so every task that ever awaits the call would carry two or three copies of
    /// it (a tunnel open's future, 4 KiB, made each proxied connection's task 9 KiB
    /// larger).
    pub async fn run<F: Future + Unpin>(&mut self, limit: Duration, fut: F) -> Option<F::Output> {
        self.run_until(crate::app::deadline_in(limit), fut).await
    }

    /// Runs `fut`, giving up with `None` once `deadline` has passed (see [`Self::run`]).
    pub async fn run_until<F: Future + Unpin>(
        &mut self,
        deadline: Instant,
        mut fut: F,
    ) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_until(cx, deadline).map(|()| None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    /// Runs a wait that ends after `after` within `limit`; it must give its result.
    async fn met(d: &mut LazyTimer, limit: Duration, after: Duration) {
        let got = d
            .run(limit, pin!(async { Timer::after(after).await }))
            .await;
        assert!(got.is_some(), "a wait within its limit gave up");
    }

    /// Runs a wait that never ends; it must give up at `limit`, never before.
    async fn expires(d: &mut LazyTimer, limit: Duration) {
        let start = Instant::now();
        let got = d.run(limit, futures_lite::future::pending::<()>()).await;
        assert_eq!(got, None);
        assert!(start.elapsed() >= limit, "gave up before its limit");
    }

    #[test]
    fn a_lazy_timer_gives_the_result_or_none_at_its_limit_never_before() {
        smol::block_on(async {
            let mut d = LazyTimer::new();
            let ms = Duration::from_millis;
            // A long limit armed first, then a shorter one: the timer moves earlier.
            met(&mut d, Duration::from_secs(30), ms(5)).await;
            expires(&mut d, ms(50)).await;
            // A short limit armed, then a longer one: the early timer fires first and is
            // armed again; the wait still lasts its whole limit.
            met(&mut d, ms(20), ms(1)).await;
            expires(&mut d, ms(120)).await;
            // A limit the clock cannot count is no limit, not a panic.
            met(&mut d, Duration::MAX, ms(1)).await;
        });
    }
}
