//! The tunnel server: accepts TLS connections, runs one tunnel per agent, and dials the
//! streams the agent opens under the egress policy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use fluidity_proto::{Connection, ErrorCode, Limits, StreamId, Target};
use fluidity_runtime_smol::app;
use fluidity_runtime_smol::listener::AcceptErrors;
use fluidity_runtime_smol::relay::{relay, reset_on_close, Connections, Direction};
use fluidity_runtime_smol::tls::{self, PeerCheck, TlsSession};
use fluidity_runtime_smol::{Tunnel, TunnelEvent};
use futures_lite::FutureExt;
use smol::Executor;

use crate::config::{AuthMode, ServerConfig};
use crate::egress::Dialer;
use crate::give_way::{GiveWay, Yield};
use crate::health::Metrics;
use crate::Error;

/// An agent admitted by an [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Who the agent is (for IAM, the normalised ARN); logged and told to the agent.
    pub principal: String,
    /// How long the admission holds; when it ends the tunnel is asked to go away and the
    /// agent authenticates again on a new connection. `None`: the connection's life.
    pub lifetime: Option<Duration>,
}

/// Why an agent was refused: the typed reason for the wire and one line for humans
/// (sent to the agent and logged, so it never holds a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The typed reason.
    pub failure: fluidity_proto::AuthFailure,
    /// What happened and what to check.
    pub detail: String,
}

/// Decides whether an agent that presented credentials is admitted (IAM mode).
pub trait Authenticator: Send + Sync + 'static {
    /// Checks the credentials (`method`, `payload`) an agent at `peer` presented on a TLS
    /// session whose channel binding is `binding`. Runs on a blocking thread; may call out
    /// to STS, within [`Authenticator::deadline`].
    fn authenticate(
        &self,
        method: &str,
        payload: &[u8],
        binding: &[u8],
        peer: SocketAddr,
    ) -> Result<Admission, Denial>;

    /// How long the server waits for [`Authenticator::authenticate`] before it refuses
    /// the agent as "verifier unavailable" on its own.
    fn deadline(&self) -> Duration;
}

/// What woke the tunnel's event loop.
enum Next {
    /// A tunnel event, or `None` when the tunnel's events have ended.
    Event(Option<TunnelEvent>),
    /// The agent was admitted for this long.
    Admitted(Duration),
    /// The admission (or, second time, its drain) ran out.
    Expired,
}

/// A running server's shared state.
pub struct Server {
    cfg: ServerConfig,
    /// Replaced when the certificate is renewed ([`Server::reload_certificate`]); a
    /// handshake takes the one current when it starts.
    tls: Mutex<Arc<rustls::ServerConfig>>,
    proto: Arc<fluidity_proto::Config>,
    dialer: Dialer,
    metrics: Arc<Metrics>,
    authenticator: Option<Arc<dyn Authenticator>>,
    tunnels: Mutex<HashMap<u64, Tunnel>>,
    next_tunnel: AtomicU64,
    /// The connections to targets being relayed, to reset those an exit cuts (the drain
    /// deadline, a second signal): a clean close would pass a cut upload for a whole one.
    origins: Connections,
    handshakes: Mutex<Handshakes>,
    /// Tunnel drivers still running: a closed tunnel's driver is still sending its close.
    drivers: AtomicUsize,
    /// Connections dropped for the handshake limits are logged once in a while, per
    /// limit: a flood of them would otherwise flood the log, and one limit's flood must
    /// not hide the other's.
    dropped_total: app::LogThrottle,
    dropped_per_source: app::LogThrottle,
    /// Handshakes that gave way to new connections, logged once in a while.
    gave_way: app::LogThrottle,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.cfg.listen)
            .finish_non_exhaustive()
    }
}

/// How long closed tunnels have, at the exit, to send their close (those closed at the
/// drain deadline) or to hear their agents end (those drained).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One of a count of things running, counted out when dropped.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn count(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Running(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often connections dropped for the handshake limits are logged.
const DROPPED_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a TLS handshake may sit before, with every handshake slot taken, it gives
/// way to a new connection. An agent's handshake takes a few round trips; connections
/// that hold slots open without finishing (slowloris, from several sources at their
/// per-source limit) would otherwise keep every agent out until the handshake deadline,
/// and again after it.
const GIVE_WAY_AFTER: Duration = Duration::from_secs(2);

/// Connections in the TLS handshake, in all and by source.
#[derive(Debug, Default)]
struct Handshakes {
    total: usize,
    by_source: HashMap<Source, usize>,
    /// The handshakes that may give way: when one must, it is told (or its place dropped),
    /// which ends its wait.
    pending: GiveWay,
}

/// Where a connection comes from, for the per-source handshake limit: an IPv4 address, or
/// the /64 of an IPv6 one (a single host usually has a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6Net([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                Source::V6Net(net)
            }
        }
    }
}

/// Which handshake limit a new connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeLimit {
    Total,
    PerSource,
}

impl Handshakes {
    /// Counts a connection from `source` in at `now`, unless a limit is reached. With every
    /// slot taken, the oldest handshake gives way if it has sat for [`GIVE_WAY_AFTER`]
    /// (its slot is given back when its task ends; until then the count may exceed the
    /// limit by the handshakes just told).
    fn take(
        &mut self,
        source: Source,
        total: usize,
        per_source: usize,
        now: Instant,
    ) -> Result<Yield, HandshakeLimit> {
        // Looked up before inserting: a refused source leaves no entry behind.
        if self.by_source.get(&source).copied().unwrap_or(0) >= per_source {
            return Err(HandshakeLimit::PerSource);
        }
        if self.total >= total && !self.pending.give_way(now, GIVE_WAY_AFTER) {
            return Err(HandshakeLimit::Total);
        }
        *self.by_source.entry(source).or_insert(0) += 1;
        self.total += 1;
        Ok(self.pending.add(now))
    }

    /// Counts a connection in whatever the limits (a refusal on its way out).
    fn force(&mut self, source: Source) {
        *self.by_source.entry(source).or_insert(0) += 1;
        self.total += 1;
    }

    /// Gives back the slot of a connection from `source`; `id` is its place among those
    /// that may give way, if it has one still.
    fn give_back(&mut self, source: Source, id: Option<u64>) {
        if let Some(id) = id {
            self.pending.remove(id);
        }
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// A connection's place among the handshakes, given back when dropped.
struct HandshakeSlot {
    server: Arc<Server>,
    source: Source,
    /// Its place among those that may give way.
    id: Option<u64>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.server.handshakes().give_back(self.source, self.id);
    }
}

impl Server {
    /// Loads certificates and builds everything the listener needs.
    pub fn new(
        cfg: ServerConfig,
        metrics: Arc<Metrics>,
        authenticator: Option<Arc<dyn Authenticator>>,
    ) -> Result<Arc<Server>, Error> {
        let tls = Self::tls_config(&cfg)?;
        if cfg.auth == AuthMode::Iam && authenticator.is_none() {
            return Err(Error::Config(
                "auth = \"iam\" needs an authenticator; configure [iam]".into(),
            ));
        }
        let proto = Arc::new(fluidity_proto::Config {
            limits: Limits {
                max_streams: cfg.max_streams,
                ..Limits::default()
            },
            handshake_timeout: cfg.tunnel_handshake_timeout(),
            require_auth: cfg.auth == AuthMode::Iam,
            ..fluidity_proto::Config::default()
        });
        let dialer = Dialer::new(cfg.egress.clone())
            .with_connect_timeout(Duration::from_secs(cfg.connect_timeout_secs.max(1)));
        Ok(Arc::new(Server {
            cfg,
            tls: Mutex::new(tls),
            proto,
            dialer,
            metrics,
            authenticator,
            tunnels: Mutex::new(HashMap::new()),
            next_tunnel: AtomicU64::new(1),
            origins: Connections::default(),
            handshakes: Mutex::new(Handshakes::default()),
            drivers: AtomicUsize::new(0),
            dropped_total: app::LogThrottle::new(DROPPED_LOG_EVERY),
            dropped_per_source: app::LogThrottle::new(DROPPED_LOG_EVERY),
            gave_way: app::LogThrottle::new(DROPPED_LOG_EVERY),
        }))
    }

    /// The TLS configuration from the certificate, key and client CA files `cfg` names.
    fn tls_config(cfg: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, Error> {
        let identity = cfg.load_identity()?;
        let roots = cfg.load_client_ca()?;
        let check = PeerCheck {
            expected_cn: cfg.expected_client_cn.clone(),
            expected_ip: None,
        };
        Ok(tls::server_config(&identity, &roots, &check)?)
    }

    /// Loads the certificate, key and client CA files again (after a renewal wrote new
    /// ones): handshakes from now on present the new certificate; tunnels already up go
    /// on. On an error the current configuration stays.
    pub fn reload_certificate(&self) -> Result<(), Error> {
        let tls = Self::tls_config(&self.cfg)?;
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
        Ok(())
    }

    /// Binds the tunnel listener from the configuration.
    pub fn bind(&self) -> Result<Async<TcpListener>, Error> {
        Async::<TcpListener>::bind(self.cfg.listen).map_err(|source| Error::Bind {
            addr: self.cfg.listen,
            source,
        })
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tunnel>> {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handshakes(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts agents until `shutdown` completes, then asks every tunnel to go away and
    /// waits up to the drain deadline for their streams to finish.
    pub async fn run(
        self: &Arc<Self>,
        ex: &Arc<Executor<'static>>,
        listener: Async<TcpListener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        self.origins.reset_on_forced_exit();
        let local = listener.get_ref().local_addr().unwrap_or(self.cfg.listen);
        tracing::info!(listen = %local, auth = %self.cfg.auth, "fluidity-server listening");
        let accept_loop = async {
            let mut errors = AcceptErrors::new("tunnel");
            loop {
                match listener.accept().await {
                    Ok((sock, peer)) => {
                        errors.accepted();
                        self.clone().admit(ex, sock, peer);
                    }
                    Err(e) => errors.failed(&e).await,
                }
            }
        };
        accept_loop.or(shutdown).await;
        drop(listener);
        self.metrics.set_draining();
        let tunnels: Vec<Tunnel> = self.tunnels().values().cloned().collect();
        tracing::info!(tunnels = tunnels.len(), "draining");
        for t in &tunnels {
            t.go_away();
        }
        let drained = app::wait_until(self.cfg.drain_timeout(), || self.tunnels().is_empty()).await;
        if !drained {
            let left = self.tunnels();
            let streams: usize = left.values().map(|t| t.stats().streams_active).sum();
            tracing::warn!(
                tunnels = left.len(),
                streams,
                drain_secs = self.cfg.drain_timeout().as_secs(),
                "drain deadline reached; closing the tunnels left, and their streams with them"
            );
        }
        // Not NO_ERROR: that is a goaway, which these tunnels have had; the agent would
        // see only its connection end and report it lost for no reason.
        for t in self.tunnels().values() {
            t.close(
                ErrorCode::CANCEL,
                "server stopped: its drain deadline passed with streams still open",
            );
        }
        if !drained {
            // The process may exit before the relays of the streams just cut run again.
            self.origins.reset_all();
        }
        // The closes need their drivers' turns: an agent told why says so, where one whose
        // connection just ends reports it lost. After a drain, a driver keeps its socket
        // until the agent ends its side, so that the exit does not reset a connection
        // whose last bytes the kernel still holds. A peer that reads nothing does not hold
        // the exit back for longer.
        app::wait_until(CLOSE_GRACE, || self.drivers.load(Ordering::SeqCst) == 0).await;
        tracing::info!("stopped");
    }

    fn admit(
        self: Arc<Self>,
        ex: &Arc<Executor<'static>>,
        sock: Async<std::net::TcpStream>,
        peer: SocketAddr,
    ) {
        // Only a bounded number of connections may sit in the TLS handshake, and only a
        // few from one source; they have earned nothing yet (slowloris), so the excess is
        // dropped at once.
        let source = Source::of(peer.ip());
        let taken = self.handshakes().take(
            source,
            self.cfg.max_handshakes,
            self.cfg.max_handshakes_per_source,
            Instant::now(),
        );
        let place = match taken {
            Ok(place) => place,
            Err(limit) => {
                let (setting, value, throttle) = match limit {
                    HandshakeLimit::Total => (
                        "max_handshakes",
                        self.cfg.max_handshakes,
                        &self.dropped_total,
                    ),
                    HandshakeLimit::PerSource => (
                        "max_handshakes_per_source",
                        self.cfg.max_handshakes_per_source,
                        &self.dropped_per_source,
                    ),
                };
                if let Some(also) = throttle.allow(Instant::now()) {
                    tracing::warn!(%peer, setting, limit = value, dropped_since_last_line = also,
                    "too many connections in the TLS handshake; dropped (logged at most every \
                     10 s)");
                }
                return;
            }
        };
        let slot = HandshakeSlot {
            server: self.clone(),
            source,
            id: Some(place.id),
        };
        let ex2 = ex.clone();
        ex.spawn(async move {
            if let Err(e) = self.serve_tunnel(&ex2, sock, peer, slot, place.told).await {
                tracing::info!(%peer, error = %e, "tunnel ended with an error");
            }
        })
        .detach();
    }

    async fn serve_tunnel(
        self: &Arc<Self>,
        ex: &Arc<Executor<'static>>,
        sock: Async<std::net::TcpStream>,
        peer: SocketAddr,
        slot: HandshakeSlot,
        give_way: async_channel::Receiver<()>,
    ) -> Result<(), Error> {
        let check = PeerCheck {
            expected_cn: self.cfg.expected_client_cn.clone(),
            expected_ip: self.cfg.check_client_ip.then_some(peer.ip()),
        };
        let handshake = {
            let _slot = slot;
            let accept = fluidity_runtime_smol::accept(
                sock,
                TlsSession::server(self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone())?,
                &check,
                self.cfg.tls_handshake_timeout(),
            );
            async { Some(accept.await) }
                .or(async {
                    // Told, or its place dropped: either way it is to give way.
                    let _ = give_way.recv().await;
                    None
                })
                .await
        };
        let h = match handshake {
            Some(Ok(h)) => h,
            None => {
                if let Some(also) = self.gave_way.allow(Instant::now()) {
                    tracing::warn!(%peer, after_secs = GIVE_WAY_AFTER.as_secs(),
                        gave_way_since_last_line = also,
                        "every TLS handshake slot was taken: the oldest handshake, unfinished, \
                         gave way to a new connection (logged at most every 10 s)");
                }
                return Ok(());
            }
            Some(Err(e)) => {
                match handshake_advice(&e) {
                    Some(advice) => {
                        tracing::warn!(%peer, error = %e, advice, "TLS handshake failed")
                    }
                    None => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                }
                // A peer that timed out or hung up proved nothing either way; one whose
                // certificate or protocol was refused failed to authenticate.
                use fluidity_runtime_smol::Error as E;
                let refused = matches!(
                    e,
                    E::Tls(_)
                        | E::PeerIdentity { .. }
                        | E::NoPeerCertificate { .. }
                        | E::AlpnMismatch { .. }
                );
                if refused {
                    self.metrics.record_auth_failure();
                }
                return Ok(());
            }
        };
        if self.tunnels().len() >= self.cfg.max_tunnels {
            tracing::warn!(%peer, limit = self.cfg.max_tunnels, "tunnel limit reached; connection refused");
            // Counted among the handshakes until it is gone: refusals cannot pile up.
            let source = Source::of(peer.ip());
            self.handshakes().force(source);
            let _slot = HandshakeSlot {
                server: self.clone(),
                source,
                id: None,
            };
            // Told why, in the tunnel's own close, the agent can say so; a bare close
            // would leave its user guessing.
            let conn = Connection::server(self.proto.clone(), Instant::now());
            let (tunnel, _events, driver) = fluidity_runtime_smol::start(h.sock, h.tls, conn)?;
            tunnel.close(
                ErrorCode::EXCESSIVE_LOAD,
                &format!(
                    "the server is at its tunnel limit (max_tunnels = {}); retry later, or \
                     raise the limit",
                    self.cfg.max_tunnels
                ),
            );
            // The close needs one driver turn; a peer that reads nothing gets the driver's
            // CLOSE_LIMIT.
            let _ = driver.await;
            drop(tunnel);
            return Ok(());
        }
        let binding = h.established.channel_binding;
        let agent_cn = h.established.peer.common_name.clone().unwrap_or_default();
        let conn = Connection::server(self.proto.clone(), Instant::now());
        let (tunnel, events, driver) = fluidity_runtime_smol::start(h.sock, h.tls, conn)?;
        let id = self.next_tunnel.fetch_add(1, Ordering::Relaxed);
        self.tunnels().insert(id, tunnel.clone());
        // A handshake that finished after the drain began: the drain told only the
        // tunnels it found to go away, and this one would take streams until the deadline
        // (and hold the exit back to it). Checked after the insert, under the map's lock
        // the drain takes after marking itself, so that one of the two sees the other.
        if self.metrics.is_draining() {
            tracing::info!(%peer, tunnel = id, "the server is draining: the new tunnel is told to go away");
            tunnel.go_away();
        }
        let active = self.metrics.track_tunnel();
        let _running = Running::count(&self.drivers);
        let driver = ex.spawn(driver);
        tracing::info!(%peer, tunnel = id, agent = %agent_cn, "tunnel connected");
        let dialer = self.dialer.for_tunnel();

        // The auth task reports an admission's lifetime here; the loop enforces it.
        let (admitted_tx, admitted_rx) = async_channel::bounded::<Duration>(1);
        let mut expiry: Option<(Instant, bool)> = None;
        loop {
            let next = async { Next::Event(events.recv().await.ok()) }
                .or(async {
                    match admitted_rx.recv().await {
                        Ok(d) => Next::Admitted(d),
                        Err(_) => std::future::pending().await,
                    }
                })
                .or(async {
                    match expiry {
                        Some((at, _)) => {
                            Timer::at(at).await;
                            Next::Expired
                        }
                        None => std::future::pending().await,
                    }
                })
                .await;
            let event = match next {
                Next::Event(Some(event)) => event,
                Next::Event(None) => break,
                Next::Admitted(lifetime) => {
                    expiry = Some((app::deadline_in(lifetime), false));
                    continue;
                }
                Next::Expired => {
                    match expiry {
                        Some((_, false)) => {
                            tracing::info!(%peer, tunnel = id,
                                "admission expired; asking the agent to authenticate again");
                            tunnel.go_away();
                            expiry = Some((app::deadline_in(self.cfg.drain_timeout()), true));
                        }
                        _ => {
                            // After its goaway: only another code says why it ends.
                            tunnel.close(
                                ErrorCode::CANCEL,
                                "admission expired and the agent did not authenticate again",
                            );
                            expiry = None;
                        }
                    }
                    continue;
                }
            };
            match event {
                TunnelEvent::AuthRequested(req) => {
                    let Some(auth) = self.authenticator.clone() else {
                        tunnel.reject_auth(
                            req,
                            fluidity_proto::AuthFailure::UnsupportedMethod,
                            "this server does not take tunnel authentication".into(),
                        );
                        continue;
                    };
                    let (tunnel, metrics) = (tunnel.clone(), self.metrics.clone());
                    let admitted_tx = admitted_tx.clone();
                    ex.spawn(async move {
                        let limit = auth.deadline();
                        let (method, payload) = (req.method.clone(), req.payload.clone());
                        // The verification blocks (STS); a stuck one is abandoned at the
                        // deadline and the agent told so, rather than left waiting.
                        let verdict = blocking::unblock(move || {
                            auth.authenticate(&method, &payload, &binding, peer)
                        })
                        .or(async {
                            Timer::after(limit).await;
                            Err(Denial {
                                failure: fluidity_proto::AuthFailure::VerifierUnavailable,
                                detail: format!(
                                    "the server could not verify the request within {limit:?}"
                                ),
                            })
                        })
                        .await;
                        match verdict {
                            Ok(Admission {
                                principal,
                                lifetime,
                            }) => {
                                let secs = lifetime.map_or(0, |d| {
                                    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
                                });
                                tracing::info!(%peer, tunnel = id, %principal,
                                    expires_in_secs = secs, "agent authentication approved");
                                tunnel.accept_auth(req, principal, secs);
                                if let Some(d) = lifetime {
                                    let _ = admitted_tx.try_send(d);
                                }
                            }
                            Err(Denial { failure, detail }) => {
                                tracing::warn!(%peer, tunnel = id, reason = %failure, %detail,
                                    "agent authentication denied");
                                metrics.record_auth_failure();
                                tunnel.reject_auth(req, failure, detail);
                            }
                        }
                    })
                    .detach();
                }
                // mTLS admits no principal of its own: `tunnel connected` named the agent.
                TunnelEvent::Ready { principal } if principal.is_empty() => {
                    tracing::info!(%peer, tunnel = id, "tunnel ready");
                }
                TunnelEvent::Ready { principal } => {
                    tracing::info!(%peer, tunnel = id, %principal, "tunnel ready");
                }
                TunnelEvent::OpenRequested { id: sid, target } => {
                    let this = self.clone();
                    let (tunnel, dialer) = (tunnel.clone(), dialer.clone());
                    ex.spawn(async move { this.serve_stream(tunnel, &dialer, sid, target).await })
                        .detach();
                }
                // Probes are the agent's.
                TunnelEvent::GoAway | TunnelEvent::Unresponsive { .. } => {}
                TunnelEvent::Closed { reason } => {
                    match reason {
                        None => tracing::info!(%peer, tunnel = id, "tunnel closed"),
                        Some(r) => tracing::info!(%peer, tunnel = id, reason = %r, "tunnel lost"),
                    }
                    break;
                }
            }
        }
        self.tunnels().remove(&id);
        // Closed for the metrics now, though its driver may linger (below).
        drop(active);
        // Its goaway or close_notify may still be on the way out, to a peer that may never
        // read it, and after a drain the driver reads until the peer's end: it gives up
        // after CLOSE_LIMIT.
        let _ = driver.await;
        Ok(())
    }

    async fn serve_stream(
        self: Arc<Self>,
        tunnel: Tunnel,
        dialer: &Dialer,
        id: StreamId,
        target: Target,
    ) {
        self.metrics.touch();
        let started = Instant::now();
        // An open the agent resets while it is dialled (its client went away) stops the
        // dial: dials that outlived their streams would escape max_streams.
        // Polled first: an open reset before this task ran starts no lookup or connect.
        let dialled = async {
            tunnel.open_abandoned(id).await;
            None
        }
        .or(async { Some(dialer.dial(&target).await) })
        .await;
        let Some(dialled) = dialled else {
            tracing::debug!(stream = %id, %target, "open given up by the agent while dialling");
            return;
        };
        match dialled {
            Err(refusal) => {
                tracing::info!(stream = %id, %target, %refusal, "open refused");
                self.metrics.record_refusal(refusal.reason);
                let _ = tunnel.refuse_open(id, refusal);
            }
            Ok((tcp, addr)) => {
                let Ok(stream) = tunnel.accept_open(id) else {
                    return; // The tunnel is gone.
                };
                let _origin = self.origins.track(&tcp);
                let _active = self.metrics.track_stream();
                let metrics = self.metrics.clone();
                let sock = tcp.clone();
                let result = relay(stream, tcp, |dir, n| {
                    match dir {
                        // Agent → target is "in" (received from the agent), as in Metrics.
                        Direction::StreamToSocket => metrics.add_bytes_in(n as u64),
                        Direction::SocketToStream => metrics.add_bytes_out(n as u64),
                    }
                    metrics.touch();
                })
                .await;
                match result {
                    Ok((up, down)) => tracing::debug!(
                        stream = %id, %target, %addr, up, down,
                        ms = started.elapsed().as_millis() as u64, "stream done"
                    ),
                    Err(e) => {
                        // The target sees the abort (the agent's client went away, or the
                        // stream was reset) as a failure, not as a complete upload.
                        reset_on_close(&sock);
                        tracing::debug!(stream = %id, %target, error = %e, "stream aborted")
                    }
                }
            }
        }
    }
}

/// What to check when an agent's TLS handshake failed for a reason a setting or a
/// certificate explains; `None` when the peer timed out, hung up, or sent no TLS.
fn handshake_advice(e: &fluidity_runtime_smol::Error) -> Option<&'static str> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as T};
    let fluidity_runtime_smol::Error::Tls(e) = e else {
        return None;
    };
    let advice = match e {
        T::InvalidCertificate(C::BadSignature | C::UnknownIssuer) => {
            "the agent's certificate was not issued by the CA this server trusts for agents \
             (client_ca): give the agent one from that CA, or point client_ca at the CA that \
             issued it"
        }
        T::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the agent's certificate has expired: issue it a new one (or check this machine's \
             clock)"
        }
        T::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the agent's certificate is not valid yet: check the clocks of this machine and \
             the agent's"
        }
        T::AlertReceived(A::CertificateExpired) => {
            "the agent found a certificate expired: renew this server's certificate, or check \
             the clocks of both machines"
        }
        T::AlertReceived(
            A::DecryptError | A::UnknownCA | A::BadCertificate | A::CertificateUnknown,
        ) => {
            "the agent refused this server's certificate: its ca must be the CA that issued \
             this server's certificate, which must name the server as the agent knows it \
             (server_name)"
        }
        _ => return None,
    };
    Some(advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS handshake in memory; the certificate the server presented, or why it
    /// failed.
    fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Result<Vec<u8>, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        Ok(c.peer_certificates().unwrap()[0].to_vec())
    }

    /// A renewal writes new files; once reloaded, new handshakes present the new
    /// certificate and trust the client CA written with it.
    #[test]
    fn a_reloaded_certificate_is_presented_to_new_handshakes() {
        use fluidity_runtime_smol::pki::{self, CertInitOptions};
        use fluidity_runtime_smol::tls::{certs_from_pem, CaRoots, Identity};
        let dir = tempfile::tempdir().unwrap();
        let init = |server_cn: &str| {
            let opts = CertInitOptions {
                server_cn: server_cn.into(),
                force: true,
                ..CertInitOptions::default()
            };
            let paths = pki::init_dir(dir.path(), &opts).unwrap();
            let client = tls::client_config(
                &Identity::load(&paths.client_cert, &paths.client_key).unwrap(),
                &CaRoots::load(&paths.ca_cert).unwrap(),
                &PeerCheck::default(),
            )
            .unwrap();
            let pem = std::fs::read_to_string(&paths.server_cert).unwrap();
            let presented = certs_from_pem(&pem, "server").unwrap()[0].to_vec();
            (paths, client, presented)
        };
        let (paths, first_client, first) = init("first");
        let cfg = ServerConfig {
            cert: paths.server_cert.clone(),
            key: paths.server_key.clone(),
            client_ca: paths.ca_cert.clone(),
            ..ServerConfig::default()
        };
        let server = Server::new(cfg, Arc::new(Metrics::new()), None).unwrap();
        let current = || server.tls.lock().unwrap().clone();
        assert_eq!(handshake(current(), first_client.clone()).unwrap(), first);

        let (_, renewed_client, renewed) = init("renewed");
        assert!(handshake(current(), renewed_client.clone()).is_err());
        server.reload_certificate().unwrap();
        assert_eq!(handshake(current(), renewed_client).unwrap(), renewed);
        assert!(handshake(current(), first_client).is_err());
    }

    fn source(ip: &str) -> Source {
        Source::of(ip.parse().unwrap())
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        assert_eq!(source("192.0.2.1"), source("::ffff:192.0.2.1"));
        assert_ne!(source("192.0.2.1"), source("192.0.2.2"));
        assert_eq!(source("2001:db8:1:2::1"), source("2001:db8:1:2:ffff::9"));
        assert_ne!(source("2001:db8:1:2::1"), source("2001:db8:1:3::1"));
    }

    #[test]
    fn handshakes_are_limited_in_all_and_per_source() {
        let mut h = Handshakes::default();
        let now = Instant::now();
        let (a, b) = (source("192.0.2.1"), source("192.0.2.2"));
        let take = |h: &mut Handshakes, s: Source, total: usize, per_source: usize| {
            h.take(s, total, per_source, now).map(|y| y.id)
        };
        assert_eq!(take(&mut h, a, 3, 2), Ok(1));
        assert_eq!(take(&mut h, a, 3, 2), Ok(2));
        assert_eq!(take(&mut h, a, 3, 2), Err(HandshakeLimit::PerSource));
        assert_eq!(
            take(&mut h, source("192.0.2.9"), 3, 0),
            Err(HandshakeLimit::PerSource)
        );
        assert_eq!(h.by_source.len(), 1, "a refused source leaves no entry");
        assert_eq!(take(&mut h, b, 3, 2), Ok(3));
        assert_eq!(take(&mut h, b, 3, 2), Err(HandshakeLimit::Total));
        h.give_back(a, Some(1));
        assert_eq!(take(&mut h, b, 3, 2), Ok(4));
        // A refusal on its way out is counted whatever the limits, and given back.
        h.force(a);
        assert_eq!(h.total, 4);
        for (s, id) in [(a, None), (a, Some(2)), (b, Some(3)), (b, Some(4))] {
            h.give_back(s, id);
        }
        assert_eq!(h.total, 0);
        assert!(h.by_source.is_empty(), "no source is remembered once gone");
        assert!(
            h.pending.ids().is_empty(),
            "no handshake is remembered once gone"
        );
    }

    /// With every slot taken, the oldest handshake gives way to a new connection once it
    /// has sat for [`GIVE_WAY_AFTER`], and only then; a source at its own limit never
    /// makes another give way.
    #[test]
    fn the_oldest_stalled_handshake_gives_way_when_every_slot_is_taken() {
        let mut h = Handshakes::default();
        let start = Instant::now();
        let (a, b, c) = (
            source("192.0.2.1"),
            source("192.0.2.2"),
            source("192.0.2.3"),
        );
        let first = h.take(a, 2, 2, start).expect("a slot");
        let second = h
            .take(b, 2, 2, start + Duration::from_secs(1))
            .expect("a slot");
        let early = start + GIVE_WAY_AFTER - Duration::from_millis(1);
        assert_eq!(
            h.take(c, 2, 2, early).map(|y| y.id),
            Err(HandshakeLimit::Total)
        );
        assert!(first.told.try_recv().is_err(), "not told yet");
        let late = start + GIVE_WAY_AFTER;
        assert_eq!(
            h.take(a, 2, 1, late).map(|y| y.id),
            Err(HandshakeLimit::PerSource)
        );
        let third = h.take(c, 2, 2, late).expect("the oldest gave way");
        assert_eq!(first.told.try_recv(), Ok(()), "the oldest is told");
        assert!(second.told.try_recv().is_err(), "the younger one is not");
        // Until the told one's task ends, its slot still counts.
        assert_eq!(h.total, 3);
        h.give_back(a, Some(first.id));
        assert_eq!(h.total, 2);
        assert_eq!(h.pending.ids(), [second.id, third.id]);
    }
}
