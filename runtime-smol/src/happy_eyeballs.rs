//! Connecting to the first of several addresses that answers, as RFC 8305 ("Happy
//! Eyeballs") describes: attempts start one after another, [`ATTEMPT_DELAY`] apart or at
//! once when the one before fails, and run side by side, so that an address that never
//! answers (a family without a route, a host that drops packets) costs a quarter of a
//! second, not a connect timeout.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use async_io::Timer;

/// Time between the starts of two attempts while the earlier one has not finished
/// (RFC 8305 §5 recommends 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Runs `attempt` on each address of `addrs`, IPv6 and IPv4 alternating from the family
/// of the first (RFC 8305 §4), the next one starting `delay` after the one before or as
/// soon as one fails. Returns the first that succeeds, with its address and the attempts
/// that had failed by then; the attempts still running are dropped, which cancels them.
/// If every attempt fails, returns each address with its error, in the order they failed
/// (those found failed together, in the order they started).
pub async fn first_to_connect<T, E, F, Fut>(
    addrs: Vec<SocketAddr>,
    delay: Duration,
    mut attempt: F,
) -> Result<Won<T, E>, Vec<(SocketAddr, E)>>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut waiting = interleave_families(addrs).into_iter().peekable();
    let mut running: Vec<(SocketAddr, Pin<Box<Fut>>)> = Vec::new();
    let mut failed = Vec::new();
    let mut next_start = Timer::never();
    poll_fn(move |cx| loop {
        let mut failed_now = 0;
        let mut i = 0;
        while i < running.len() {
            match running[i].1.as_mut().poll(cx) {
                Poll::Ready(Ok(conn)) => {
                    return Poll::Ready(Ok(Won {
                        addr: running[i].0,
                        conn,
                        failed: std::mem::take(&mut failed),
                    }))
                }
                Poll::Ready(Err(e)) => {
                    // Removed in place: failures found together keep their starts' order.
                    let (addr, _) = running.remove(i);
                    failed.push((addr, e));
                    failed_now += 1;
                }
                Poll::Pending => i += 1,
            }
        }
        if waiting.peek().is_none() {
            return match running.is_empty() {
                true => Poll::Ready(Err(std::mem::take(&mut failed))),
                false => Poll::Pending,
            };
        }
        // One new attempt per failure, one if none runs, else one when the delay has
        // passed. The timer is polled (and so wakes this task) only in that last case;
        // starting an attempt re-arms it.
        let starts = match (failed_now, running.is_empty()) {
            (0, false) => usize::from(Pin::new(&mut next_start).poll(cx).is_ready()),
            (n, _) => n.max(1),
        };
        if starts == 0 {
            return Poll::Pending;
        }
        for addr in waiting.by_ref().take(starts) {
            running.push((addr, Box::pin(attempt(addr))));
        }
        // A timer is armed only while an address waits: most targets have one.
        if waiting.peek().is_some() {
            next_start.set_after(delay);
        }
        // Round again: the new attempts are polled (and register their wakers) at once.
    })
    .await
}

/// The first attempt of a race to succeed.
#[derive(Debug)]
pub struct Won<T, E> {
    /// The address it connected to.
    pub addr: SocketAddr,
    /// What the attempt gave.
    pub conn: T,
    /// The attempts that had failed before it, with their errors.
    pub failed: Vec<(SocketAddr, E)>,
}

/// Alternates IPv6 and IPv4 addresses (keeping each family's order), starting with the
/// family of the first address, so that a broken family costs one attempt, not all.
pub fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_is_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (mut a, mut b): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|s| s.is_ipv6() == first_is_v6);
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(a.len() + b.len());
    loop {
        match (a.pop(), b.pop()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::net::TcpListener;

    use async_net::TcpStream;

    fn s(t: &str) -> SocketAddr {
        t.parse().unwrap()
    }

    /// Runs `race`, failing the test if it hangs (an attempt that never started).
    fn run<T>(race: impl Future<Output = T>) -> T {
        use futures_lite::FutureExt;
        smol::block_on(race.or(async {
            Timer::after(Duration::from_secs(60)).await;
            panic!("the next attempt never started");
        }))
    }

    #[test]
    fn interleaves_families_from_the_first() {
        let got = interleave_families(vec![
            s("[2001:4860::1]:80"),
            s("[2001:4860::2]:80"),
            s("[2001:4860::3]:80"),
            s("8.8.8.8:80"),
        ]);
        assert_eq!(
            got,
            vec![
                s("[2001:4860::1]:80"),
                s("8.8.8.8:80"),
                s("[2001:4860::2]:80"),
                s("[2001:4860::3]:80"),
            ]
        );
        let got = interleave_families(vec![s("1.1.1.1:1"), s("1.0.0.1:1"), s("[2606::1]:1")]);
        assert_eq!(got, vec![s("1.1.1.1:1"), s("[2606::1]:1"), s("1.0.0.1:1")]);
        assert!(interleave_families(Vec::new()).is_empty());
    }

    /// A port on 127.0.0.1 that refuses connections (bound, not listening, so it stays
    /// taken while the test runs).
    fn refusing() -> (socket2::Socket, SocketAddr) {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&s("127.0.0.1:0").into()).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        (sock, addr)
    }

    /// An address whose attempt never ends stands for one that drops packets: the
    /// next address is tried after the delay and wins while the first still waits.
    #[test]
    fn an_address_that_never_answers_does_not_hold_up_the_next() {
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        let silent = s("127.0.0.1:9");
        let mut started = Vec::new();
        let got = run(first_to_connect(
            vec![silent, live_addr],
            Duration::from_millis(10),
            |addr| {
                started.push(addr);
                async move {
                    if addr == silent {
                        std::future::pending::<()>().await;
                    }
                    TcpStream::connect(addr).await
                }
            },
        ));
        let won = got.expect("the live address connects");
        assert_eq!(won.addr, live_addr);
        assert_eq!(won.conn.peer_addr().unwrap(), live_addr);
        assert!(won.failed.is_empty());
        assert_eq!(started, vec![silent, live_addr]);
    }

    /// A refused address lets the next start at once: with a delay no test would sit
    /// out, the test ends only if a failure starts the next attempt.
    #[test]
    fn a_failed_attempt_starts_the_next_at_once_and_all_failures_are_returned() {
        let (_a, refused_a) = refusing();
        let (_b, refused_b) = refusing();
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        let hour = Duration::from_secs(3600);

        let got = run(first_to_connect(
            vec![refused_a, live_addr],
            hour,
            TcpStream::connect,
        ));
        let won = got.expect("the second address connects");
        assert_eq!(won.addr, live_addr);
        let failed: Vec<_> = won.failed.iter().map(|(a, e)| (*a, e.kind())).collect();
        assert_eq!(failed, vec![(refused_a, io::ErrorKind::ConnectionRefused)]);

        let got = run(first_to_connect(
            vec![refused_a, refused_b],
            hour,
            TcpStream::connect,
        ));
        let failed = got.expect_err("both addresses refuse");
        let failed: Vec<_> = failed.iter().map(|(a, e)| (*a, e.kind())).collect();
        assert_eq!(
            failed,
            vec![
                (refused_a, io::ErrorKind::ConnectionRefused),
                (refused_b, io::ErrorKind::ConnectionRefused)
            ]
        );

        let got = run(first_to_connect(Vec::new(), hour, TcpStream::connect));
        assert!(got.expect_err("no address").is_empty());
    }

    /// Attempts that run side by side are all polled: a later one that fails while an
    /// earlier one still waits does not end the race, and the earlier one can still win
    /// (it finishes only once the later one has failed), the failure reported with it.
    #[test]
    fn an_earlier_attempt_can_win_after_a_later_one_fails() {
        let (_r, refused) = refusing();
        let slow = s("127.0.0.1:7");
        let (go, wait) = async_channel::bounded::<()>(1);
        let got = run(async {
            let race = first_to_connect(vec![slow, refused], Duration::from_millis(1), |addr| {
                let (go, wait) = (go.clone(), wait.clone());
                async move {
                    if addr == slow {
                        let _ = wait.recv().await;
                        return Ok::<_, io::Error>(addr);
                    }
                    let e = TcpStream::connect(addr).await.expect_err("refused");
                    // The failure is in: let the slow attempt finish.
                    let _ = go.try_send(());
                    Err(e)
                }
            });
            race.await
        });
        let won = got.expect("the slow attempt wins");
        assert_eq!(won.addr, slow);
        assert_eq!(won.failed.len(), 1);
        assert_eq!(won.failed[0].0, refused);
    }
}
