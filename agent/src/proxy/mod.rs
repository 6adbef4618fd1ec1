//! The local proxy front end: turns each client connection (HTTP/1.1 forward proxy,
//! CONNECT, WebSocket upgrade, or SOCKS5) into streams opened through a [`Dialer`].
//!
//! The front end knows nothing of the tunnel: a [`Dialer`] opens a byte stream to
//! `host:port` (the server resolves names and dials), or says why it could not, and the
//! front end turns that into an honest answer for the client (HTTP status or SOCKS5 reply).
//! Parsers of client and origin bytes are sans-IO ([`head`], [`chunked`], [`socks5`]) with
//! explicit limits, and are exposed for fuzzing through the `fuzzing` module (built for
//! fuzzing and tests only).

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use fluidity_proto::{OpenRefusal, Target};
use fluidity_runtime_smol::app::LogThrottle;
use fluidity_runtime_smol::relay::{ReadChunks, LAST_BYTES_TIME};
use futures_io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};
use io::{CopyError, Inbound, Source};

mod auth;
pub mod chunked;
pub mod head;
mod http;
mod io;
mod socks;
pub mod socks5;

#[cfg(any(fuzzing, test))]
pub mod fuzzing;

/// Opens streams to targets. Implemented by the tunnel; tests use a direct TCP dialer.
pub trait Dialer: Send + Sync + 'static {
    /// A reliable byte stream to the target. `poll_close` means "I finished sending"
    /// (a half-close): reading continues until the other side finishes too. Reads and
    /// writes may be pending at the same time from one task (separate wakers).
    type Stream: AsyncRead + AsyncWrite + ReadChunks + Unpin + Send + 'static;

    /// Opens a stream to `target`. Must finish in bounded time, with a stream or a reason.
    fn open(&self, target: Target) -> impl Future<Output = Result<Self::Stream, DialError>> + Send;

    /// Returns when [`open`](Self::open) can start at once (a tunnel is up), or why it
    /// cannot. Work done here (connecting a tunnel) serves every client that waits for
    /// it, so it is not given up with the client that happened to start it. Ready at
    /// once unless the dialer says otherwise.
    fn ready(&self) -> impl Future<Output = Result<(), DialError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Whether an open is waiting for another stream to end (the tunnel is at its stream
    /// limit). A client connection that keeps an idle stream for its next request gives
    /// it up then. Never, unless the dialer has such a limit.
    fn room_wanted(&self) -> bool {
        false
    }

    /// Whether a new stream could open now without waiting for another to end. Always,
    /// unless the dialer has a stream limit.
    fn has_room(&self) -> bool {
        true
    }

    /// Returns when an open starts waiting for another stream to end (see
    /// [`room_wanted`](Self::room_wanted)). Never, unless the dialer has such a limit.
    fn wait_room_wanted(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Returns when client connections that wait for their next request should close:
    /// the agent is stopping (the client then sends it elsewhere, not into a proxy about
    /// to exit), or it ran out of file descriptors (idle connections make room for
    /// clients waiting to connect, as a web server's do). Never, unless the dialer says so.
    fn wait_close_idle(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The server answered the open with a refusal.
    #[error("refused: {0}")]
    Refused(OpenRefusal),
    /// There is no working tunnel to the server right now; the text says why.
    #[error("the tunnel is down: {0}")]
    TunnelDown(String),
    /// No tunnel can be made until what the text names is fixed (a certificate, a
    /// setting, the server's allow list): retrying alone does not help.
    #[error("no tunnel can be made: {0}")]
    TunnelUnusable(String),
    /// The agent is stopping and opens no more streams.
    #[error("the agent is stopping")]
    Stopping,
    /// No stream came within the dial timeout: the tunnel's streams all stayed in use,
    /// or the tunnel gave no answer.
    #[error("no stream within {0:?}")]
    NoStream(Duration),
}

/// Username and password that proxy clients must present.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Settings of the proxy front end.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Credentials required from clients (HTTP Basic or SOCKS5 username/password), if any.
    pub auth: Option<Credentials>,
    /// How long a client may take to send a complete request head (or SOCKS5 handshake),
    /// and how long an idle keep-alive connection is kept. Relays have no idle timeout.
    pub head_timeout: Duration,
    /// Upper bound on opening a stream, in case the dialer never answers.
    pub dial_timeout: Duration,
    /// The server runs in this process (`fluidity local`): advice in answers names local
    /// mode's options, not the server's configuration.
    pub local_server: bool,
}

impl Default for ProxyConfig {
    /// No credentials, 30 s head timeout, 60 s dial timeout, a server elsewhere.
    fn default() -> Self {
        ProxyConfig {
            auth: None,
            head_timeout: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(60),
            local_server: false,
        }
    }
}

impl ProxyConfig {
    /// Checks that listening on `listen` is safe with this configuration: any address
    /// other than loopback requires credentials.
    pub fn validate_for(&self, listen: SocketAddr) -> Result<()> {
        if self.auth.is_none() && !listen.ip().to_canonical().is_loopback() {
            return Err(Error::UnauthenticatedListener(listen));
        }
        Ok(())
    }
}

/// The first byte of a TLS ClientHello (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves one client connection to the end: sniffs the protocol from the first byte
/// (0x05 is SOCKS5, 0x04 SOCKS4, which is refused, 0x16 a TLS client, refused with a
/// line in the log, anything else HTTP/1.1) and proxies
/// through `dialer`. `client` is cloned into a reading and a writing handle of the same
/// connection (as `async_net::TcpStream` clones are).
pub async fn serve_connection<D, C>(
    client: C,
    peer: SocketAddr,
    dialer: &D,
    cfg: &ProxyConfig,
) -> Result<()>
where
    D: Dialer,
    C: AsyncRead + AsyncWrite + Clone + Unpin,
{
    // Two handles on one socket rather than `split`: no lock around every read and write,
    // and vectored writes reach the socket (a message head and body in one system call).
    let mut inb = io::Inbound::with_capacity(client.clone(), io::CLIENT_BUF_START);
    let mut w = client;
    let first = io::timeout(cfg.head_timeout, pin!(inb.fill())).await;
    let first = match first {
        None => {
            tracing::debug!(%peer, "client sent nothing; closing");
            return Err(Error::ClientTimeout(cfg.head_timeout));
        }
        Some(Ok(0)) => return Ok(()),
        Some(Ok(_)) => inb.buffered()[0],
        Some(Err(e)) => return Err(e.into()),
    };
    if first == socks5::VERSION {
        socks::serve(&mut inb, &mut w, peer, dialer, cfg).await
    } else if first == TLS_HANDSHAKE_RECORD {
        // A TLS client cannot read an answer in words (it reports a bad record, which
        // points at the mismatch); the log says what to change, once in a while (a
        // misconfigured browser tries again and again).
        static TLS_CLIENTS: LogThrottle = LogThrottle::new(Duration::from_secs(60));
        if TLS_CLIENTS.allow(std::time::Instant::now()).is_some() {
            tracing::info!(%peer, "a client began a TLS handshake: this proxy speaks plain \
                HTTP and SOCKS5 (HTTPS goes through CONNECT), so its proxy URL must start \
                with http://, not https:// (logged at most once a minute)");
        }
        http::refuse_tls(&mut w).await?;
        Ok(())
    } else if first == socks5::SOCKS4_VERSION {
        socks::refuse_socks4(&mut inb, &mut w, peer).await
    } else {
        http::serve(&mut inb, &mut w, peer, dialer, cfg).await
    }
}

/// Opens a stream, bounded by the configured dial timeout, for a client that waits for it
/// on `cin`. The open is given up (its stream reset, so the server stops dialling) when
/// the client leaves meanwhile: at once when its connection fails, and after
/// [`LAST_BYTES_TIME`] when it has closed its side (a close and a half-close look alike,
/// and a half-closed client still reads its answer). Otherwise an abandoned open would
/// hold its stream while the server dialled, up to its connect timeout, and opens queued
/// for room would all be dialled in turn. The client is watched after [`WATCH_AFTER`], as
/// for a request; what it sends meanwhile stays buffered. A tunnel being connected
/// ([`Dialer::ready`]) is waited for whatever the client does, since other clients may
/// wait for it too; a client that left meanwhile is let go once it is up.
async fn dial<D: Dialer, R: AsyncRead + Unpin>(
    dialer: &D,
    target: &Target,
    cfg: &ProxyConfig,
    cin: &mut Inbound<R>,
) -> Result<std::result::Result<D::Stream, DialError>, ClientLeft> {
    let start = std::time::Instant::now();
    let mut watched = pin!(async {
        async_io::Timer::after(WATCH_AFTER).await;
        watch_client(cin).await
    });
    let mut gone = None;
    // On the heap while they run: these futures are large (they may connect a new
    // tunnel), and inline they would make every client connection's task that much larger
    // for the whole life of the connection, though it opens a stream only now and then.
    let mut ready = pin!(io::timeout(cfg.dial_timeout, Box::pin(dialer.ready())));
    let ready = std::future::poll_fn(|cx| {
        note_departure(watched.as_mut(), &mut gone, cx);
        ready.as_mut().poll(cx)
    })
    .await;
    match ready {
        None => return Ok(Err(DialError::NoStream(cfg.dial_timeout))),
        Some(Err(e)) => return Ok(Err(e)),
        Some(Ok(())) => {}
    }
    let left = cfg.dial_timeout.saturating_sub(start.elapsed());
    let mut open = pin!(io::timeout(left, Box::pin(dialer.open(target.clone()))));
    std::future::poll_fn(|cx| {
        note_departure(watched.as_mut(), &mut gone, cx);
        let why = match &mut gone {
            Some(Departure::Failed) => {
                Some("the client's connection failed while its stream opened")
            }
            Some(Departure::Closed(grace)) => Pin::new(grace).poll(cx).is_ready().then_some(
                "the client closed its side while its stream opened, and did not wait for it",
            ),
            None => None,
        };
        if let Some(why) = why {
            return Poll::Ready(Err(ClientLeft(why)));
        }
        open.as_mut()
            .poll(cx)
            .map(|opened| Ok(opened.unwrap_or(Err(DialError::NoStream(cfg.dial_timeout)))))
    })
    .await
}

/// How a client waiting for its stream left.
enum Departure {
    /// Its connection failed.
    Failed,
    /// It closed its side; the open gets until the timer fires.
    Closed(async_io::Timer),
}

/// Notes how the client left once `watched` ([`watch_client`]) ends, into `gone`.
fn note_departure(
    watched: Pin<&mut impl Future<Output = std::result::Result<u64, CopyError>>>,
    gone: &mut Option<Departure>,
    cx: &mut Context<'_>,
) {
    if gone.is_none() {
        if let Poll::Ready(how) = watched.poll(cx) {
            *gone = Some(match how {
                Err(CopyError::Eof) => Departure::Closed(async_io::Timer::after(LAST_BYTES_TIME)),
                _ => Departure::Failed,
            });
        }
    }
}

/// A client that left while its stream opened; the text says how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientLeft(&'static str);

/// Waits while a client that waits for an answer stays connected: returns
/// `Err(CopyError::Eof)` when the client closes its side and `Err(CopyError::Read(_))`
/// when its connection fails. What the client sends meanwhile (a pipelined request, a
/// tunnel's first bytes) stays buffered for later; once [`WATCH_LIMIT`] bytes wait there,
/// it stops reading and only waits.
async fn watch_client<R: AsyncRead + Unpin>(
    cin: &mut Inbound<R>,
) -> std::result::Result<u64, CopyError> {
    while cin.buffered().len() < WATCH_LIMIT {
        match cin.fill().await {
            Ok(0) => return Err(CopyError::Eof),
            Ok(_) => {}
            Err(e) => return Err(CopyError::Read(e)),
        }
    }
    std::future::pending().await
}

/// How long a client waits for its answer before it is watched (see [`watch_client`]):
/// most answers come sooner, and a watch costs a read of the client's socket bound to
/// fail.
const WATCH_AFTER: Duration = Duration::from_secs(1);

/// How much of a client's next bytes [`watch_client`] reads ahead: the client
/// connection's first buffer, so that a pipelining client costs no more memory.
const WATCH_LIMIT: usize = 4096;

/// One printable line of at most `max` characters, for putting peer-supplied text in an
/// answer or a log. Borrowed when `s` already is one, as a response's reason usually is.
fn one_line(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that never moves a byte.
    #[derive(Clone)]
    struct NoIo;

    impl AsyncRead for NoIo {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for NoIo {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl ReadChunks for NoIo {
        fn poll_read_chunks(
            &mut self,
            _: &mut Context<'_>,
            _: &mut Vec<bytes::Bytes>,
            _: usize,
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
    }

    /// A dialer whose open keeps 64 KiB in its future while it waits.
    struct LargeOpen;

    impl Dialer for LargeOpen {
        type Stream = NoIo;

        async fn open(&self, _: Target) -> Result<NoIo, DialError> {
            let large = [1u8; 64 * 1024];
            futures_lite::future::yield_now().await;
            std::hint::black_box(&large);
            Ok(NoIo)
        }
    }

    /// Every open client connection is a task holding its future for as long as the client
    /// stays connected; an open, which happens now and then, must not be part of it.
    #[test]
    fn a_client_connection_task_does_not_hold_a_large_open() {
        let cfg = ProxyConfig::default();
        let peer = "127.0.0.1:1".parse().unwrap();
        let task = serve_connection(NoIo, peer, &LargeOpen, &cfg);
        let size = std::mem::size_of_val(&task);
        assert!(
            size < 16 * 1024,
            "the connection's future takes {size} bytes"
        );
    }

    /// A dialer whose tunnel is being connected until `up` closes; it counts the opens
    /// and whether getting ready ran to its end.
    struct Connecting {
        up: async_channel::Receiver<()>,
        ready_done: std::sync::atomic::AtomicBool,
        opened: std::sync::atomic::AtomicUsize,
    }

    impl Dialer for Connecting {
        type Stream = NoIo;

        async fn open(&self, _: Target) -> Result<NoIo, DialError> {
            self.opened
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(NoIo)
        }

        async fn ready(&self) -> Result<(), DialError> {
            let _ = self.up.recv().await;
            self.ready_done
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    /// A client connection that fails (a reset) once its timer fires.
    struct FailsAt(async_io::Timer);

    impl AsyncRead for FailsAt {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0)
                .poll(cx)
                .map(|_| Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    /// A tunnel being connected is not given up when the client that needed it leaves
    /// (other clients may wait for it), but that client's stream is then not opened; a
    /// client that stays gets its stream once the tunnel is up.
    #[test]
    fn a_client_gone_while_the_tunnel_connects_lets_the_connection_finish_and_opens_nothing() {
        use std::sync::atomic::Ordering;
        let cfg = ProxyConfig::default();
        let target = Target::parse("example.com:443").unwrap();
        let outcome = |client_fails: bool| {
            let (release, up) = async_channel::bounded::<()>(1);
            let dialer = Connecting {
                up,
                ready_done: false.into(),
                opened: 0.into(),
            };
            let dialled = futures_lite::future::block_on(async {
                // The tunnel comes up 2 s on; a leaving client fails after 1.5 s (its
                // watch starts after 1 s).
                let connecting = async {
                    async_io::Timer::after(Duration::from_secs(2)).await;
                    drop(release);
                    std::future::pending().await
                };
                let dial = async {
                    if client_fails {
                        let reader = FailsAt(async_io::Timer::after(Duration::from_millis(1500)));
                        let mut cin = io::Inbound::with_capacity(reader, 64);
                        dial(&dialer, &target, &cfg, &mut cin)
                            .await
                            .map(|r| r.is_ok())
                    } else {
                        let mut cin = io::Inbound::with_capacity(NoIo, 64);
                        dial(&dialer, &target, &cfg, &mut cin)
                            .await
                            .map(|r| r.is_ok())
                    }
                };
                futures_lite::future::or(dial, connecting).await
            });
            (
                dialled,
                dialer.ready_done.load(Ordering::SeqCst),
                dialer.opened.load(Ordering::SeqCst),
            )
        };
        let (dialled, ready_done, opened) = outcome(true);
        assert!(dialled.is_err(), "the leaving client got a stream");
        assert!(
            ready_done,
            "the tunnel's connection was given up with its client"
        );
        assert_eq!(opened, 0, "a stream was opened for a client that had left");
        assert_eq!(outcome(false), (Ok(true), true, 1));
    }

    #[test]
    fn one_line_borrows_clean_text_and_cleans_the_rest() {
        assert!(matches!(
            one_line("Not Found", 200),
            Cow::Borrowed("Not Found")
        ));
        assert_eq!(one_line("a\r\nb\tc", 200), "a  b c");
        assert_eq!(one_line("abcdef", 3), "abc");
        assert_eq!(one_line("ééé", 2), "éé");
        assert_eq!(one_line("", 0), "");
    }

    #[test]
    fn non_loopback_listen_needs_credentials() {
        let open = ProxyConfig::default();
        assert!(open.validate_for("127.0.0.1:8080".parse().unwrap()).is_ok());
        assert!(open.validate_for("[::1]:8080".parse().unwrap()).is_ok());
        assert!(open
            .validate_for("[::ffff:127.0.0.1]:8080".parse().unwrap())
            .is_ok());
        let err = open
            .validate_for("0.0.0.0:8080".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0.0.0.0:8080") && err.contains("password"),
            "{err}"
        );
        let locked = ProxyConfig {
            auth: Some(Credentials {
                username: "u".into(),
                password: "p".into(),
            }),
            ..ProxyConfig::default()
        };
        assert!(locked
            .validate_for("192.168.1.2:8080".parse().unwrap())
            .is_ok());
        assert!(!format!("{locked:?}").contains("\"p\""));
    }
}
