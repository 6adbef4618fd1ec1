//! The agent's side of the tunnel: one TLS connection to the server, opened on demand,
//! reconnected with backoff when lost, behind a circuit breaker so that a dead server
//! gives clients a fast, honest error instead of a hang.

use std::future::{poll_fn, Future};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use fluidity_proto::{Credentials, RefusalReason, Target};
use fluidity_runtime_smol::driver::{client_handshake, tcp_connect};
use fluidity_runtime_smol::happy_eyeballs::{first_to_connect, Won, ATTEMPT_DELAY};
use fluidity_runtime_smol::pki;
use fluidity_runtime_smol::resolve::{LookupError, Resolver};
use fluidity_runtime_smol::tls::{PeerCheck, TlsSession};
use fluidity_runtime_smol::{Handshaken, Tunnel, TunnelEvent, TunnelStream};
use futures_lite::FutureExt;
use smol::Executor;

use crate::proxy::{DialError, Dialer};

/// Produces the tunnel credentials for a TLS session from its channel-binding value.
/// Runs on a blocking thread (it may fetch AWS credentials).
pub type CredentialSource = Arc<dyn Fn(&[u8]) -> Result<Credentials, String> + Send + Sync>;

/// Most addresses of the server's name one connection attempt tries, each within the
/// connect timeout: with the lookup's own limit, an attempt stays well within the time a
/// client waits for a stream.
pub const MAX_SERVER_ADDRESSES: usize = 3;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// An address.
    Ip(SocketAddr),
    /// A name, looked up again for every connection attempt (so that a changed address
    /// is followed, and a name that does not resolve yet is not fatal), its addresses
    /// tried as RFC 8305 says.
    Name {
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl ServerAddr {
    /// Parses `name:port`, `ip:port` or `[ipv6]:port`. `None` unless the port is 1 to
    /// 65535 in digits and the name is letters, digits, `.`, `-` and `_` (brackets only
    /// around an IPv6 address).
    pub fn parse(s: &str) -> Option<ServerAddr> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return (addr.port() != 0).then_some(ServerAddr::Ip(addr));
        }
        let (host, port) = s.rsplit_once(':')?;
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
        let name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
        if host.is_empty() || host.len() > 253 || !host.bytes().all(name_byte) {
            return None;
        }
        Some(ServerAddr::Name {
            host: host.to_owned(),
            port,
        })
    }

    /// The addresses to try, IPv6 and IPv4 alternating, at most [`MAX_SERVER_ADDRESSES`];
    /// a lookup gets `limit`.
    async fn resolve(&self, limit: Duration) -> Result<Vec<SocketAddr>, String> {
        let (host, port) = match self {
            ServerAddr::Ip(addr) => return Ok(vec![*addr]),
            ServerAddr::Name { host, port } => (host, *port),
        };
        // One lookup at a time: the agent looks up only its server, once per attempt.
        Resolver::new(limit, 1)
            .lookup(host, port, MAX_SERVER_ADDRESSES)
            .await
            .map_err(|e| {
                let what = if matches!(e, LookupError::TimedOut(_) | LookupError::NoSlot { .. }) {
                    "check this machine's DNS"
                } else {
                    "check the server setting and this machine's network"
                };
                format!("cannot look up the server name {host}: {e}; {what}")
            })
    }

    /// How the server is named in messages about `addr`, one of its addresses.
    fn at(&self, addr: SocketAddr) -> String {
        match self {
            ServerAddr::Ip(_) => addr.to_string(),
            ServerAddr::Name { .. } => format!("{self} ({addr})"),
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Ip(addr) => write!(f, "{addr}"),
            ServerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How to reach and trust the server.
#[derive(Clone)]
pub struct TunnelSettings {
    /// Where the server listens.
    pub server: ServerAddr,
    /// Name or IP the server certificate must be valid for.
    pub server_name: String,
    /// TLS client configuration (identity, CA, server checks).
    pub tls: Arc<rustls::ClientConfig>,
    /// The file the trusted CA came from, named when the server's certificate is not
    /// from it.
    pub ca_file: std::path::PathBuf,
    /// Extra checks on the server certificate after the handshake.
    pub peer_check: PeerCheck,
    /// The certificate this agent presents (its leaf), to say why the server refused it.
    pub presented_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    /// Protocol configuration. Its `handshake_timeout` also bounds, after the TLS
    /// handshake, getting credentials, signing and hearing the server's verdict.
    pub proto: Arc<fluidity_proto::Config>,
    /// Limit on TCP connect plus TLS handshake to one address, and on looking up the
    /// server's name.
    pub connect_timeout: Duration,
    /// Tunnel credentials (IAM), or `None` for mTLS only.
    pub credentials: Option<CredentialSource>,
    /// First reconnect delay; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Whether the server is found anew when it is replaced (AWS mode): a certificate for
    /// another identity or address is then most likely a replacement under way, which
    /// the agent follows by itself, not a setting to fix.
    pub server_may_move: bool,
}

impl std::fmt::Debug for TunnelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSettings")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("iam", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// Consecutive failures and when the next attempt is allowed.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Failure,
}

/// Why no tunnel could be made, and whether that lasts until something the text names is
/// changed (a certificate, a setting, the server's allow list): retrying alone does not
/// help then, and clients are told so rather than to retry in a moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Failure {
    why: String,
    lasting: bool,
}

impl Failure {
    /// A failure that may pass by itself (the network, a server starting or stopping).
    fn passing(why: impl Into<String>) -> Failure {
        Failure {
            why: why.into(),
            lasting: false,
        }
    }
}

struct Inner {
    /// Swapped whole by [`TunnelDialer::retarget`] when the server is replaced.
    settings: Mutex<Arc<TunnelSettings>>,
    ex: Arc<Executor<'static>>,
    current: Mutex<Option<Tunnel>>,
    /// Tunnels replaced while streams may still use them (after a goaway, or a server
    /// found unresponsive): a stop gives their streams the same grace as the current
    /// one's.
    retired: Mutex<Vec<Tunnel>>,
    connecting: smol::lock::Mutex<()>,
    breaker: Mutex<Breaker>,
    /// Closed when the agent begins to stop: from then on no tunnel is made and no
    /// stream opened, and idle client connections are closed.
    stopping: (async_channel::Sender<()>, async_channel::Receiver<()>),
    /// Until when idle client connections close to give their descriptors back (see
    /// [`TunnelDialer::close_idle_clients`]).
    shed_until: Mutex<Option<Instant>>,
    /// Notified when idle client connections should close.
    shed: event_listener::Event,
}

impl Inner {
    fn is_stopping(&self) -> bool {
        self.stopping.0.is_closed()
    }

    fn shedding(&self) -> bool {
        lock(&self.shed_until).is_some_and(|t| Instant::now() < t)
    }
}

/// How long after the last accept that failed for want of descriptors idle client
/// connections keep closing (those that become idle meanwhile too).
const SHED_FOR: Duration = Duration::from_secs(1);

/// Opens streams through the tunnel, connecting and reconnecting as needed. Cheap to
/// clone.
#[derive(Clone)]
pub struct TunnelDialer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TunnelDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelDialer")
            .field("settings", &*self.settings())
            .finish_non_exhaustive()
    }
}

/// Locks `m`; a lock poisoned by a panicking holder is taken over, not passed on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TunnelDialer {
    /// A dialer that connects on first use; tunnel tasks are spawned on `ex`.
    pub fn new(settings: TunnelSettings, ex: Arc<Executor<'static>>) -> TunnelDialer {
        TunnelDialer {
            inner: Arc::new(Inner {
                settings: Mutex::new(Arc::new(settings)),
                ex,
                current: Mutex::new(None),
                retired: Mutex::new(Vec::new()),
                connecting: smol::lock::Mutex::new(()),
                breaker: Mutex::new(Breaker::default()),
                stopping: async_channel::bounded(1),
                shed_until: Mutex::new(None),
                shed: event_listener::Event::new(),
            }),
        }
    }

    /// A ready tunnel for an open, connecting if there is none; given up when the agent
    /// stops (its clients get their 503 now, not a reset when the process exits before
    /// the attempt ends).
    async fn ready_tunnel(&self) -> Result<Tunnel, DialError> {
        if self.is_stopping() {
            return Err(DialError::Stopping);
        }
        let stopping = self.inner.stopping.1.clone();
        let stopped = async move {
            let _ = stopping.recv().await;
            Err(Failure::default())
        };
        match self.ready_or_failure().or(stopped).await {
            Ok(t) => Ok(t),
            Err(_) if self.is_stopping() => Err(DialError::Stopping),
            Err(Failure { why, lasting: true }) => Err(DialError::TunnelUnusable(why)),
            Err(Failure { why, .. }) => Err(DialError::TunnelDown(why)),
        }
    }

    /// Returns a ready tunnel, connecting if there is none.
    pub async fn tunnel(&self) -> Result<Tunnel, String> {
        self.ready_or_failure().await.map_err(|f| f.why)
    }

    async fn ready_or_failure(&self) -> Result<Tunnel, Failure> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        if self.is_stopping() {
            return Err(Failure::passing("the agent is stopping"));
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        if self.is_stopping() {
            return Err(Failure::passing("the agent is stopping"));
        }
        {
            let b = lock(&self.inner.breaker);
            if let Some(at) = b.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(Failure {
                        why: format!(
                            "{} (next attempt in {:.1} s)",
                            b.last_error.why,
                            (at - now).as_secs_f32()
                        ),
                        lasting: b.last_error.lasting,
                    });
                }
            }
        }
        match self.connect().await {
            Ok(t) => {
                *lock(&self.inner.breaker) = Breaker::default();
                // Checked under the lock shutdown() takes after it signals the stop: a
                // tunnel installed here is one shutdown() will find and let go.
                let mut current = lock(&self.inner.current);
                if self.is_stopping() {
                    drop(current);
                    t.close(fluidity_proto::ErrorCode::NO_ERROR, "agent stopped");
                    return Err(Failure::passing("the agent is stopping"));
                }
                if let Some(old) = current.replace(t.clone()) {
                    self.retire(old);
                }
                Ok(t)
            }
            Err(e) => {
                let mut b = lock(&self.inner.breaker);
                b.failures = b.failures.saturating_add(1);
                let settings = self.settings();
                let s = &*settings;
                let backoff = s
                    .min_backoff
                    .saturating_mul(1u32 << b.failures.min(16).saturating_sub(1))
                    .min(s.max_backoff);
                b.retry_at = Some(Instant::now() + backoff);
                b.last_error = e.clone();
                // The next attempt is made by the next client that needs the tunnel, no
                // sooner than this.
                tracing::warn!(server = %s.server, error = %e.why, lasting = e.lasting, failures = b.failures,
                    next_attempt_after_ms = backoff.as_millis() as u64,
                    "cannot reach the server; the next client to need it tries again");
                Err(e)
            }
        }
    }

    /// Whether the agent is stopping: no tunnel is made and no stream opened any more.
    pub fn is_stopping(&self) -> bool {
        self.inner.is_stopping()
    }

    /// Lets `tunnel` go as the current one, so that the next open makes another. Only
    /// that tunnel: the current one may already be its replacement (an open can wait long
    /// for room).
    fn forget(&self, tunnel: &Tunnel) {
        let mut current = lock(&self.inner.current);
        if current.as_ref().is_some_and(|t| t.is_same(tunnel)) {
            if let Some(old) = current.take() {
                self.retire(old);
            }
        }
    }

    /// Keeps `old`, replaced, among the tunnels a stop waits for while it has streams;
    /// those that have closed are let go.
    fn retire(&self, old: Tunnel) {
        let mut retired = lock(&self.inner.retired);
        retired.retain(|t| !t.is_closed());
        if !old.is_closed() {
            retired.push(old);
        }
    }

    /// Accepting a client failed for want of file descriptors: client connections that
    /// wait for their next request close, now and for a second after, so that clients
    /// waiting to connect get their turn (the proxy listener's backlog).
    pub fn close_idle_clients(&self) {
        *lock(&self.inner.shed_until) = Some(Instant::now() + SHED_FOR);
        self.inner.shed.notify(usize::MAX);
    }

    /// Graceful shutdown: no new streams; waits up to `grace` for open streams to
    /// finish, then closes the tunnel.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.0.close();
        // The current tunnel and those it replaced whose streams go on.
        let mut all: Vec<Tunnel> = std::mem::take(&mut *lock(&self.inner.retired));
        all.extend(lock(&self.inner.current).take());
        all.retain(|t| !t.is_closed());
        if all.is_empty() {
            return;
        }
        for t in &all {
            t.go_away();
        }
        if !fluidity_runtime_smol::app::wait_until(grace, || all.iter().all(|t| t.is_closed()))
            .await
        {
            let streams: usize = all.iter().map(|t| t.stats().streams_active).sum();
            tracing::warn!(
                streams,
                "streams still open at the shutdown deadline; closing"
            );
            // Not NO_ERROR, a goaway: the server would see only the connection end.
            for t in &all {
                t.close(
                    fluidity_proto::ErrorCode::CANCEL,
                    "agent stopped: its shutdown deadline passed with streams still open",
                );
            }
        }
    }

    /// The current settings (the server dialled and how it is trusted).
    pub fn settings(&self) -> Arc<TunnelSettings> {
        lock(&self.inner.settings).clone()
    }

    /// Whether a tunnel is up and can open streams now.
    pub fn is_up(&self) -> bool {
        self.usable().is_some()
    }

    /// Connection attempts that failed in a row since the last success (0 when the
    /// last attempt succeeded): a server that keeps failing them may be gone for good.
    pub fn consecutive_failures(&self) -> u32 {
        lock(&self.inner.breaker).failures
    }

    /// Points the dialer at another server (a replaced one: new address, new identity):
    /// waits for an attempt under way, closes the tunnel to the old server, forgets its
    /// failures, and dials `settings` from the next use on. Clients keep the same dialer,
    /// so the local proxy never restarts.
    pub async fn retarget(&self, settings: TunnelSettings) {
        // Under the connect lock: an attempt on the old settings cannot install its
        // tunnel after the swap.
        let _one_at_a_time = self.inner.connecting.lock().await;
        tracing::info!(from = %self.settings().server, to = %settings.server, "switching to another server");
        *lock(&self.inner.settings) = Arc::new(settings);
        *lock(&self.inner.breaker) = Breaker::default();
        if let Some(old) = lock(&self.inner.current).take() {
            old.close(fluidity_proto::ErrorCode::NO_ERROR, "server replaced");
        }
    }

    fn usable(&self) -> Option<Tunnel> {
        let cur = lock(&self.inner.current);
        cur.as_ref().filter(|t| t.can_open()).cloned()
    }

    /// A tunnel to the first of the server's addresses that completes the tunnel
    /// handshake: an address whose TLS or tunnel handshake fails gives way to the next.
    async fn connect(&self) -> Result<Tunnel, Failure> {
        let settings = self.settings();
        let s = &*settings;
        tracing::info!(server = %s.server, "connecting to the server");
        let mut addrs = s
            .server
            .resolve(s.connect_timeout)
            .await
            .map_err(Failure::passing)?;
        let mut why = Vec::new();
        loop {
            let (server, h) = match connect_to_one(s, &mut addrs).await {
                Ok(found) => found,
                Err(failed) => {
                    why.extend(failed);
                    return Err(all_failed(s, why));
                }
            };
            match self.start_tunnel(s, server, h).await {
                Ok(tunnel) => return Ok(tunnel),
                Err((e, Next::Address)) if !addrs.is_empty() => {
                    tracing::warn!(%server, error = %e.why, "the tunnel handshake failed; trying the server's next address");
                    why.push(e);
                }
                Err((e, _)) => {
                    why.push(e);
                    return Err(all_failed(s, why));
                }
            }
        }
    }

    /// Runs the tunnel handshake on a TLS connection to `server`; on failure, says whether
    /// another of the server's addresses might do better.
    async fn start_tunnel(
        &self,
        s: &TunnelSettings,
        server: SocketAddr,
        h: Handshaken,
    ) -> Result<Tunnel, (Failure, Next)> {
        // One deadline covers credentials, signing and the server's verdict: no wait of
        // the tunnel handshake is unbounded.
        let limit = s.proto.handshake_timeout;
        let auth_deadline = fluidity_runtime_smol::app::deadline_in(limit);
        let credentials = match &s.credentials {
            None => Credentials::none(),
            Some(source) => {
                let source = source.clone();
                let binding = h.established.channel_binding;
                blocking::unblock(move || source(&binding))
                    .or(async {
                        smol::Timer::at(auth_deadline).await;
                        Err(format!(
                            "no AWS credentials within {limit:?}; check the credential chain \
                             (environment, profile, container or instance role) and, with a \
                             role to assume, that the STS endpoint is reachable"
                        ))
                    })
                    .await
                    // Passing: an instance or container endpoint, or STS for a role, may
                    // fail for a moment; the chain's own advice says what to check.
                    .map_err(|e| {
                        let why = format!("cannot build tunnel credentials: {e}");
                        (Failure::passing(why), Next::Stop)
                    })?
            }
        };
        let conn = fluidity_proto::Connection::agent(s.proto.clone(), credentials, Instant::now());
        let (tunnel, events, driver) = fluidity_runtime_smol::start(h.sock, h.tls, conn)
            .map_err(|e| (Failure::passing(e.to_string()), Next::Stop))?;
        self.inner.ex.spawn(driver).detach();
        self.inner
            .ex
            .spawn(async move {
                let mut was_ready = false;
                while let Ok(ev) = events.recv().await {
                    match ev {
                        // mTLS admits no principal of its own (the certificates say who).
                        TunnelEvent::Ready { principal } if principal.is_empty() => {
                            was_ready = true;
                            tracing::info!(%server, "tunnel ready")
                        }
                        TunnelEvent::Ready { principal } => {
                            was_ready = true;
                            tracing::info!(%server, %principal, "tunnel ready")
                        }
                        TunnelEvent::GoAway => tracing::info!(%server, "server is going away"),
                        TunnelEvent::Unresponsive { silent } => tracing::warn!(
                            %server, ?silent,
                            "the server answered nothing; new connections go through a new \
                             tunnel, those under way keep this one while it lasts"
                        ),
                        // Drained, or closed by the agent itself (stopping, replacing it).
                        TunnelEvent::Closed {
                            reason: None | Some(fluidity_proto::Error::LocallyClosed(_)),
                        } => tracing::info!(%server, "tunnel closed"),
                        // A tunnel refused in its handshake was never there to lose: the
                        // failed attempt's warning says why.
                        TunnelEvent::Closed { reason: Some(r) } if !was_ready => {
                            tracing::debug!(%server, reason = %r, "tunnel handshake ended")
                        }
                        TunnelEvent::Closed { reason: Some(r) } => {
                            tracing::warn!(%server, reason = %r, "tunnel lost")
                        }
                        _ => {}
                    }
                }
            })
            .detach();
        let ready = tunnel
            .ready()
            .or(async {
                smol::Timer::at(auth_deadline).await;
                Err(fluidity_runtime_smol::Error::Timeout("tunnel handshake"))
            })
            .await;
        if let Err(e) = ready {
            // Nothing more will come of this connection; do not leave it half open.
            tunnel.close(fluidity_proto::ErrorCode::NO_ERROR, "handshake abandoned");
            let lasting = is_lasting(&e, s.server_may_move);
            let why = handshake_error(server, s, e);
            return Err((Failure { why, lasting }, Next::Address));
        }
        Ok(tunnel)
    }
}

/// Whether a failed attempt should go on to the server's next address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The failure was this address's (its server refused, hung or broke the handshake).
    Address,
    /// The failure was this agent's (no credentials): no address would do better.
    Stop,
}

/// One message for the failures of every address tried.
/// Lasting only if every address's failure lasts.
fn all_failed(s: &TunnelSettings, mut why: Vec<Failure>) -> Failure {
    why.dedup();
    let lasting = !why.is_empty() && why.iter().all(|f| f.lasting);
    match why.len() {
        1 => why.remove(0),
        _ => Failure {
            why: format!(
                "cannot connect to the server {} at any of its addresses: {}",
                s.server,
                why.iter()
                    .map(|f| f.why.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            lasting,
        },
    }
}

/// TLS alerts by which a server refuses what it will keep refusing: this agent's
/// certificate, or the protocol it speaks.
const LASTING_ALERTS: [rustls::AlertDescription; 11] = {
    use rustls::AlertDescription as A;
    [
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::CertificateUnknown,
        A::UnknownCA,
        A::AccessDenied,
        A::CertificateRequired,
        A::NoApplicationProtocol,
        A::ProtocolVersion,
        A::HandshakeFailure,
    ]
};

/// Whether a failure to connect or to complete the tunnel handshake lasts until a
/// certificate, a setting or the server's configuration changes: the server's certificate
/// or name is not what this agent trusts, the server refuses this agent's certificate or
/// credentials, or the two do not speak the same protocol. When unsure, passing: clients
/// are then told that the agent reconnects, which it does. With `server_may_move`, a
/// certificate for another identity or address is passing too (a replaced server).
fn is_lasting(e: &fluidity_runtime_smol::Error, server_may_move: bool) -> bool {
    use fluidity_proto::AuthFailure as F;
    use fluidity_runtime_smol::Error as E;
    use rustls::CertificateError as C;
    match e {
        E::Tls(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ))
        | E::PeerIdentity { .. } => !server_may_move,
        E::Tls(rustls::Error::InvalidCertificate(_))
        | E::Tls(rustls::Error::PeerIncompatible(_))
        | E::Tls(rustls::Error::NoApplicationProtocol)
        | E::Tls(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
        | E::InvalidServerName(_)
        | E::AlpnMismatch { .. }
        | E::NoPeerCertificate { .. } => true,
        E::Tls(rustls::Error::AlertReceived(alert)) => LASTING_ALERTS.contains(alert),
        E::Tunnel(fluidity_proto::Error::AuthRejected { failure, .. }) => matches!(
            failure,
            F::InvalidCredentials
                | F::NotAllowed
                | F::ClockSkew
                | F::WrongServer
                | F::UnsupportedMethod
                | F::Malformed
        ),
        E::Tunnel(
            fluidity_proto::Error::VersionMismatch { .. }
            | fluidity_proto::Error::InvalidAuthMethod(_)
            | fluidity_proto::Error::CredentialsTooLarge(_),
        ) => true,
        // In TLS 1.3 the server's refusal of this agent's certificate arrives after the
        // handshake, as an alert the transport reports by name (see `handshake_error`).
        E::Tunnel(fluidity_proto::Error::TransportFailed(why)) => why
            .split_once("received fatal alert: ")
            .is_some_and(|(_, rest)| {
                // The whole name: `BadCertificate` is not `BadCertificateHashValue`.
                let end = rest
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(rest.len());
                LASTING_ALERTS
                    .iter()
                    .any(|a| format!("{a:?}") == rest[..end])
            }),
        _ => false,
    }
}

/// How long a TLS handshake with the server may take (or four times the TCP race that
/// led to it, if longer) before the next address is tried beside it.
const HANDSHAKE_FALLBACK: Duration = Duration::from_secs(2);

/// A checked TLS connection to one of `addrs`, or why each failed. As a browser does
/// (RFC 8305), TCP connections are raced, so that an address this machine cannot reach
/// (IPv6 without a route, say) neither hides nor holds up one it can; TLS runs on the
/// first to connect only (a race of whole handshakes would open a second connection
/// whenever two round trips exceed the attempt delay). If TLS fails there, the addresses
/// not yet known to fail are raced again at once; if it is still under way after
/// [`HANDSHAKE_FALLBACK`] (a middlebox that lets TCP through and swallows TLS), they are
/// raced beside it, and the first handshake to finish wins.
async fn connect_to_one(
    s: &TunnelSettings,
    addrs: &mut Vec<SocketAddr>,
) -> Result<(SocketAddr, Handshaken), Vec<Failure>> {
    type Raced = Result<Won<Async<TcpStream>, io::Error>, Vec<(SocketAddr, io::Error)>>;
    type Race<'a> = Pin<Box<dyn Future<Output = Raced> + Send + 'a>>;
    type Handshook = Box<Result<Handshaken, fluidity_runtime_smol::Error>>;
    type Handshake<'a> = Pin<Box<dyn Future<Output = (SocketAddr, Handshook)> + Send + 'a>>;
    enum Step {
        /// A race's outcome, and when it started.
        Raced(Instant, Raced),
        Handshake(SocketAddr, Handshook),
        Fallback,
    }
    // Before any connection: a name rustls refuses fails here, with no socket opened.
    TlsSession::client(s.tls.clone(), &s.server_name).map_err(|e| {
        vec![Failure {
            lasting: is_lasting(&e, s.server_may_move),
            why: e.to_string(),
        }]
    })?;
    let race = |addrs: Vec<SocketAddr>| -> (Instant, Race<'_>) {
        let raced = first_to_connect(addrs, ATTEMPT_DELAY, |addr| {
            tcp_connect(addr, s.connect_timeout)
        });
        (Instant::now(), Box::pin(raced))
    };
    let mut why = Vec::new();
    let mut failed = |addr: SocketAddr, e| {
        let lasting = is_lasting(&e, s.server_may_move);
        let e = connect_error(&s.server.at(addr), &s.ca_file, e);
        tracing::debug!(%addr, error = %e, lasting, "server address failed");
        why.push(Failure { why: e, lasting });
    };
    let mut racing = (!addrs.is_empty()).then(|| race(addrs.clone()));
    let mut handshakes: Vec<Handshake<'_>> = Vec::new();
    let mut fallback = Timer::never();
    loop {
        if racing.is_none() && handshakes.is_empty() {
            return Err(why);
        }
        let step = poll_fn(|cx| {
            if let Some((started, r)) = racing.as_mut() {
                if let Poll::Ready(out) = r.as_mut().poll(cx) {
                    let started = *started;
                    racing = None;
                    return Poll::Ready(Step::Raced(started, out));
                }
            }
            for i in 0..handshakes.len() {
                if let Poll::Ready((addr, out)) = handshakes[i].as_mut().poll(cx) {
                    drop(handshakes.swap_remove(i));
                    return Poll::Ready(Step::Handshake(addr, out));
                }
            }
            match Pin::new(&mut fallback).poll(cx) {
                Poll::Ready(_) => Poll::Ready(Step::Fallback),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let mut next_race = false;
        match step {
            Step::Raced(started, raced) => {
                let (won, lost) = match raced {
                    Ok(won) => (Some((won.addr, won.conn)), won.failed),
                    Err(lost) => (None, lost),
                };
                // Addresses that failed are not raced again.
                for (addr, e) in lost {
                    addrs.retain(|a| *a != addr);
                    failed(addr, fluidity_runtime_smol::Error::Io(e));
                }
                if let Some((addr, sock)) = won {
                    addrs.retain(|a| *a != addr);
                    let set_up = started.elapsed();
                    handshakes.push(Box::pin(async move {
                        let tls = TlsSession::client(s.tls.clone(), &s.server_name);
                        let out = match tls {
                            Ok(tls) => {
                                client_handshake(sock, tls, &s.peer_check, s.connect_timeout).await
                            }
                            Err(e) => Err(e),
                        };
                        (addr, Box::new(out))
                    }));
                    if !addrs.is_empty() {
                        fallback.set_after(HANDSHAKE_FALLBACK.max(set_up * 4));
                    }
                }
            }
            Step::Handshake(addr, out) => match *out {
                Ok(h) => return Ok((addr, h)),
                Err(e) => {
                    failed(addr, e);
                    next_race = true;
                }
            },
            Step::Fallback => {
                tracing::debug!(
                    waiting = handshakes.len(),
                    "the TLS handshake with the server is slow; trying its next address beside it"
                );
                next_race = true;
            }
        }
        if next_race && racing.is_none() && !addrs.is_empty() {
            fallback = Timer::never();
            racing = Some(race(addrs.clone()));
        }
    }
}

/// Why the TCP connection or the TLS handshake to the server failed, with what to check
/// where the cause is a setting.
fn connect_error(
    server: &str,
    ca_file: &std::path::Path,
    e: fluidity_runtime_smol::Error,
) -> String {
    use rustls::CertificateError as C;
    match e {
        fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidCertificate(
            C::BadSignature | C::UnknownIssuer,
        )) => format!(
            "cannot connect to the server at {server}: its certificate was not issued by the CA \
             this agent trusts, from {} ({e}); point the agent's ca at the CA that issued the \
             server's certificate (the ca.pem made with it)",
            ca_file.display()
        ),
        fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. },
        )) => format!(
            "cannot connect to the server at {server}: its certificate has expired ({e}); \
             renew the server's certificate (or check this machine's clock)"
        ),
        fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidCertificate(
            C::NotValidYet | C::NotValidYetContext { .. },
        )) => format!(
            "cannot connect to the server at {server}: its certificate is not valid yet ({e}); \
             check the clocks of this machine and the server"
        ),
        fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            "cannot connect to the server at {server}: its certificate is not issued for the \
             name this agent expects ({e}); set server_name (--server-name) to a name the \
             certificate names, or give the server a certificate for that name \
             (`fluidity certs init --dir DIR --server-name NAME`)"
        ),
        // What a plain HTTP service (the server's health port, say) sends back to a TLS
        // hello: not a TLS record at all.
        fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        )) => format!(
            "cannot connect to the server at {server}: it does not speak TLS ({e}); check \
             that the server setting names a fluidity-server's tunnel port (8443 by default), \
             not its health port or another service"
        ),
        e => format!("cannot connect to the server at {server}: {e}"),
    }
}

/// What went wrong in the tunnel handshake, with what to check.
fn handshake_error(
    server: SocketAddr,
    s: &TunnelSettings,
    e: fluidity_runtime_smol::Error,
) -> String {
    use fluidity_proto::AuthFailure as F;
    let iam = s.credentials.is_some();
    let limit = s.proto.handshake_timeout;
    match e {
        fluidity_runtime_smol::Error::Timeout(_) if iam => format!(
            "no answer to IAM authentication from the server at {server} within {limit:?}; \
             check that the server can reach its STS endpoint, that this principal is on its \
             allow list, and the clocks of both machines"
        ),
        fluidity_runtime_smol::Error::Timeout(_) => format!(
            "the server at {server} did not complete the tunnel handshake within {limit:?}; \
             check that it is a fluidity-server and that authentication is configured alike"
        ),
        fluidity_runtime_smol::Error::Tunnel(fluidity_proto::Error::AuthRejected {
            failure,
            detail,
        }) => {
            let check = match failure {
                F::InvalidCredentials => {
                    "check the AWS credentials (access key, secret key, session token)"
                }
                F::NotAllowed => {
                    "ask for this principal to be added to the server's allowed_principals"
                }
                F::ClockSkew => "check the clocks of this machine and the server",
                F::WrongServer => "set [iam] server_id to the server's id",
                F::ChannelBindingMismatch | F::Replayed => {
                    "the request was not signed for this connection; retrying signs anew"
                }
                F::VerifierUnavailable => {
                    "the server could not reach STS; check its sts_endpoint and network"
                }
                F::UnsupportedMethod => "check that auth is configured alike on both sides",
                F::Malformed => {
                    "check that [aws] sts_endpoint and region match the server's STS endpoint"
                }
                F::RateLimited => "wait a minute before trying again",
                _ => "check the server's log",
            };
            format!("the server at {server} denied authentication: {failure}: {detail}; {check}")
        }
        // In TLS 1.3 the server judges the client certificate after the client has
        // finished its handshake, so its refusal arrives as an alert on the first read.
        // rustls sends one alert for a certificate expired and one not valid yet: which it
        // is, if either, this machine's clock can tell.
        fluidity_runtime_smol::Error::Tunnel(fluidity_proto::Error::TransportFailed(why))
            if why.contains("received fatal alert: CertificateExpired") =>
        {
            let now = std::time::SystemTime::now();
            refused_as_expired(server, s.presented_cert.as_ref(), &why, now)
        }
        fluidity_runtime_smol::Error::Tunnel(fluidity_proto::Error::TransportFailed(why))
            if why.contains("received fatal alert") =>
        {
            format!(
                "the server at {server} refused this agent's certificate ({why}); check that \
                 cert and key were issued by the CA the server trusts (its client_ca) and have \
                 not expired, and see the server's log"
            )
        }
        e => format!("the server at {server} refused the tunnel: {e}"),
    }
}

/// The server's refusal of the agent's certificate `presented` as out of its validity
/// period (`why`, the alert): expired, or not valid yet, by this machine's clock at `now`;
/// or valid by it, which puts one of the two clocks in doubt.
fn refused_as_expired(
    server: SocketAddr,
    presented: Option<&rustls::pki_types::CertificateDer<'static>>,
    why: &str,
    now: std::time::SystemTime,
) -> String {
    match presented.and_then(|c| pki::outside_validity(c, now)) {
        Some(problem) => {
            format!("the server at {server} refused this agent's certificate ({why}): it {problem}")
        }
        None => format!(
            "the server at {server} refused this agent's certificate as expired or not valid \
             yet ({why}), though by this machine's clock it is valid now; check the clocks of \
             this machine and the server"
        ),
    }
}

impl Dialer for TunnelDialer {
    type Stream = TunnelStream;

    async fn open(&self, target: Target) -> Result<TunnelStream, DialError> {
        // One retry: a tunnel that died between the check and the open is replaced.
        for attempt in 0..2 {
            let tunnel = self.ready_tunnel().await?;
            match tunnel.open(target.clone()).await {
                Ok(s) => return Ok(s),
                // Refused unprocessed by a tunnel that takes no new streams (the server's
                // goaway crossed it, or the server stopped answering): it went nowhere, and
                // a new tunnel may take it.
                Err(fluidity_runtime_smol::Error::Refused(r))
                    if r.reason == RefusalReason::GoingAway
                        && attempt == 0
                        && !self.is_stopping() =>
                {
                    tracing::debug!(refusal = %r, "open refused by a tunnel going away; reconnecting");
                    self.forget(&tunnel);
                }
                Err(fluidity_runtime_smol::Error::Refused(r)) => return Err(DialError::Refused(r)),
                Err(e) if attempt == 0 && !tunnel.can_open() => {
                    tracing::debug!(error = %e, "tunnel unusable; reconnecting");
                    self.forget(&tunnel);
                }
                Err(e) => return Err(DialError::TunnelDown(e.to_string())),
            }
        }
        Err(DialError::TunnelDown("the tunnel keeps failing".into()))
    }

    async fn ready(&self) -> Result<(), DialError> {
        self.ready_tunnel().await.map(|_| ())
    }

    fn wait_close_idle(&self) -> impl std::future::Future<Output = ()> + Send {
        let inner = self.inner.clone();
        async move {
            loop {
                let shed = inner.shed.listen();
                if inner.is_stopping() || inner.shedding() {
                    return;
                }
                // Nothing is ever sent on `stopping`: its close is the signal.
                let stopping = inner.stopping.1.recv();
                shed.or(async {
                    let _ = stopping.await;
                })
                .await;
            }
        }
    }

    fn room_wanted(&self) -> bool {
        lock(&self.inner.current)
            .as_ref()
            .is_some_and(Tunnel::room_wanted)
    }

    fn has_room(&self) -> bool {
        lock(&self.inner.current)
            .as_ref()
            .is_none_or(Tunnel::has_room)
    }

    async fn wait_room_wanted(&self) {
        let current = lock(&self.inner.current).clone();
        match current {
            Some(tunnel) => tunnel.wait_room_wanted().await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse_as_addresses_or_names_with_a_port() {
        let ip = |s: &str| Some(ServerAddr::Ip(s.parse().unwrap()));
        let name = |h: &str, port| {
            Some(ServerAddr::Name {
                host: h.into(),
                port,
            })
        };
        assert_eq!(ServerAddr::parse("192.0.2.1:8443"), ip("192.0.2.1:8443"));
        assert_eq!(ServerAddr::parse("[::1]:8443"), ip("[::1]:8443"));
        assert_eq!(
            ServerAddr::parse("vpn.example.com:8443"),
            name("vpn.example.com", 8443)
        );
        assert_eq!(
            ServerAddr::parse("vpn_1.example:1"),
            name("vpn_1.example", 1)
        );
        for bad in [
            "vpn.example.com",
            "vpn.example.com:",
            "vpn:port",
            ":8443",
            "::1:8443",
            "h:70000",
            "h:0",
            "h:+1",
            "h :1",
            "[vpn.example.com]:1",
            "[h:8443",
            "h]:8443",
            "[1.2.3.4]:80",
            "192.0.2.1:0",
        ] {
            assert_eq!(ServerAddr::parse(bad), None, "{bad}");
        }
        assert_eq!(
            name("vpn.example.com", 8443).unwrap().to_string(),
            "vpn.example.com:8443"
        );
    }

    #[test]
    fn a_refusal_of_this_agents_certificate_as_expired_says_which_clock_to_check() {
        let day = Duration::from_secs(24 * 3600);
        let ca = pki::generate_ca("test CA", 10 * day).unwrap();
        let issued = pki::issue_client(&ca, "agent", &[], 2 * day).unwrap();
        let der = fluidity_runtime_smol::tls::certs_from_pem(&issued.cert_pem, "test").unwrap();
        let server: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let alert = "TLS: received fatal alert: CertificateExpired";
        let now = std::time::SystemTime::now();
        let say = |at| refused_as_expired(server, der.first(), alert, at);
        let expired = say(now + 3 * day);
        assert!(
            expired.contains("expired on") && expired.contains("certs init --dir DIR --force"),
            "{expired}"
        );
        let early = say(now - 3 * day);
        assert!(
            early.contains("not valid until") && early.contains("this machine's clock"),
            "{early}"
        );
        let valid = say(now);
        assert!(
            valid.contains("valid now") && valid.contains("clocks of this machine and the server"),
            "{valid}"
        );
        assert!(refused_as_expired(server, None, alert, now).contains("valid now"));
    }

    /// What lasts until something is fixed, and what may pass (clients are told to retry
    /// in a moment): an alert is judged by its name, however it arrives.
    #[test]
    fn failures_that_last_are_told_from_those_that_may_pass() {
        use fluidity_runtime_smol::Error as E;
        use rustls::AlertDescription as A;
        let alert = |a: A| E::Tls(rustls::Error::AlertReceived(a));
        let reported = |name: &str| {
            E::Tunnel(fluidity_proto::Error::TransportFailed(format!(
                "TLS: received fatal alert: {name}"
            )))
        };
        let not_for_name = || {
            E::Tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        };
        for (e, lasting) in [
            (alert(A::CertificateExpired), true),
            (alert(A::InternalError), false),
            (reported("CertificateExpired"), true),
            (reported("UnknownCA"), true),
            (reported("InternalError"), false),
            (reported("DecodeError"), false),
            (reported("BadCertificateHashValue"), false),
            (reported("BadCertificate"), true),
            (
                E::Tunnel(fluidity_proto::Error::InvalidAuthMethod("".into())),
                true,
            ),
            (
                E::Tunnel(fluidity_proto::Error::CredentialsTooLarge(20_000)),
                true,
            ),
            (E::Io(std::io::ErrorKind::ConnectionRefused.into()), false),
            (E::Timeout("tunnel handshake"), false),
            (not_for_name(), true),
        ] {
            assert_eq!(is_lasting(&e, false), lasting, "{e}");
        }
        // A server that may have been replaced: another name is a replacement under way.
        assert!(!is_lasting(&not_for_name(), true));
        assert!(is_lasting(&alert(A::CertificateExpired), true));
    }

    #[test]
    fn a_server_certificate_out_of_its_validity_or_for_another_name_says_what_to_check() {
        use rustls::CertificateError as C;
        let say = |c: C| {
            connect_error(
                "127.0.0.1:8443",
                std::path::Path::new("ca.pem"),
                fluidity_runtime_smol::Error::Tls(rustls::Error::InvalidCertificate(c)),
            )
        };
        let expired = say(C::Expired);
        assert!(
            expired.contains("has expired") && expired.contains("renew"),
            "{expired}"
        );
        let early = say(C::NotValidYet);
        assert!(
            early.contains("not valid yet") && early.contains("clocks"),
            "{early}"
        );
        let named = say(C::NotValidForName);
        assert!(
            named.contains("--server-name") && named.contains("certs init"),
            "{named}"
        );
    }
}
