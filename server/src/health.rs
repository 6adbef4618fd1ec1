//! Health and metrics: the server's counters and a tiny HTTP/1.1 endpoint that shows them.
//!
//! `GET /healthz` answers `200` with a JSON object (`"status": "ok"`, uptime and the
//! counters), or `503` with `"status": "draining"` once shutdown has begun, so that a load
//! balancer or ECS health check stops sending work. `GET /metrics` answers the same counters
//! in the Prometheus text format. `HEAD` is accepted on both; another method gets `405`,
//! another path `404`, a malformed request `400`, an oversized head `431` and a client that
//! does not finish its request head in time `408`. One request per connection.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_io::Timer;
use async_net::{TcpListener, TcpStream};
use fluidity_proto::RefusalReason;
use fluidity_runtime_smol::listener::AcceptErrors;

use crate::give_way::{GiveWay, Yield};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use serde::Serialize;

/// The refusal reasons counted separately, in wire-code order; an unknown code counts as
/// `Other`.
const REFUSAL_REASONS: [RefusalReason; 8] = [
    RefusalReason::NoSuchHost,
    RefusalReason::ConnectionRefused,
    RefusalReason::Unreachable,
    RefusalReason::TimedOut,
    RefusalReason::DeniedByPolicy,
    RefusalReason::TooManyStreams,
    RefusalReason::GoingAway,
    RefusalReason::Other,
];

fn refusal_index(reason: RefusalReason) -> usize {
    REFUSAL_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REFUSAL_REASONS.len() - 1)
}

fn refusal_label(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::NoSuchHost => "no_such_host",
        RefusalReason::ConnectionRefused => "connection_refused",
        RefusalReason::Unreachable => "unreachable",
        RefusalReason::TimedOut => "timed_out",
        RefusalReason::DeniedByPolicy => "denied_by_policy",
        RefusalReason::TooManyStreams => "too_many_streams",
        RefusalReason::GoingAway => "going_away",
        RefusalReason::Other | RefusalReason::Unknown(_) => "other",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The server's counters, shared by every task through an `Arc` and updated with relaxed
/// atomics (each counter is independent; a reader may see one a moment ahead of another).
///
/// Every update that reflects traffic (a tunnel or stream opening, bytes moving) also sets
/// the last-activity time, which idle detection reads.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    tunnels_active: AtomicU64,
    tunnels_total: AtomicU64,
    streams_active: AtomicU64,
    streams_total: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    open_refusals: [AtomicU64; REFUSAL_REASONS.len()],
    auth_failures: AtomicU64,
    last_activity: AtomicU64,
    draining: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Zeroed counters; uptime and the last-activity time start now.
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            tunnels_active: AtomicU64::new(0),
            tunnels_total: AtomicU64::new(0),
            streams_active: AtomicU64::new(0),
            streams_total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            open_refusals: Default::default(),
            auth_failures: AtomicU64::new(0),
            last_activity: AtomicU64::new(unix_now()),
            draining: AtomicBool::new(false),
        }
    }

    /// Counts a tunnel that has been admitted (after authentication).
    pub fn tunnel_opened(&self) {
        self.tunnels_active.fetch_add(1, Ordering::Relaxed);
        self.tunnels_total.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Counts the end of a tunnel counted by [`tunnel_opened`](Metrics::tunnel_opened).
    pub fn tunnel_closed(&self) {
        saturating_decrement(&self.tunnels_active);
        self.touch();
    }

    /// Counts a tunnel as open until the returned guard is dropped.
    pub fn track_tunnel(self: &Arc<Self>) -> ActiveGuard {
        self.tunnel_opened();
        ActiveGuard {
            metrics: self.clone(),
            kind: GuardKind::Tunnel,
        }
    }

    /// Counts a stream that has been opened (dialled successfully).
    pub fn stream_opened(&self) {
        self.streams_active.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Counts the end of a stream counted by [`stream_opened`](Metrics::stream_opened).
    pub fn stream_closed(&self) {
        saturating_decrement(&self.streams_active);
        self.touch();
    }

    /// Counts a stream as open until the returned guard is dropped.
    pub fn track_stream(self: &Arc<Self>) -> ActiveGuard {
        self.stream_opened();
        ActiveGuard {
            metrics: self.clone(),
            kind: GuardKind::Stream,
        }
    }

    /// Adds stream payload bytes received from agents (on their way to targets).
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    /// Adds stream payload bytes sent to agents (received from targets).
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    /// Counts a refused stream open.
    pub fn record_refusal(&self, reason: RefusalReason) {
        self.open_refusals[refusal_index(reason)].fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Counts a failed authentication (bad TLS client, bad signature, principal not allowed).
    pub fn record_auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the server as used now.
    pub fn touch(&self) {
        self.last_activity.fetch_max(unix_now(), Ordering::Relaxed);
    }

    /// Marks the server as shutting down: `/healthz` answers `503` from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the server is shutting down ([`Metrics::set_draining`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The counters as they are now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let now = unix_now();
        let last_activity = self.last_activity.load(Ordering::Relaxed);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            status: if self.draining.load(Ordering::Relaxed) {
                "draining"
            } else {
                "ok"
            },
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            tunnels_active: load(&self.tunnels_active),
            tunnels_total: load(&self.tunnels_total),
            streams_active: load(&self.streams_active),
            streams_total: load(&self.streams_total),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            open_refusals: OpenRefusals(REFUSAL_REASONS.map(|r| {
                (
                    refusal_label(r),
                    load(&self.open_refusals[refusal_index(r)]),
                )
            })),
            auth_failures: load(&self.auth_failures),
            last_activity_unix: last_activity,
            idle_seconds: now.saturating_sub(last_activity),
        }
    }
}

fn saturating_decrement(a: &AtomicU64) {
    // A decrement without a matching increment is a bug elsewhere; never wrap to 2^64.
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
}

#[derive(Debug, Clone, Copy)]
enum GuardKind {
    Tunnel,
    Stream,
}

/// Keeps a tunnel or stream counted as active; dropping it counts the close.
#[derive(Debug)]
#[must_use = "the tunnel or stream counts as closed as soon as the guard is dropped"]
pub struct ActiveGuard {
    metrics: Arc<Metrics>,
    kind: GuardKind,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        match self.kind {
            GuardKind::Tunnel => self.metrics.tunnel_closed(),
            GuardKind::Stream => self.metrics.stream_closed(),
        }
    }
}

/// A point-in-time copy of [`Metrics`], serialized as the `/healthz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// `"ok"`, or `"draining"` once shutdown has begun.
    pub status: &'static str,
    /// The server's version.
    pub version: &'static str,
    /// Seconds since the counters were created.
    pub uptime_seconds: u64,
    /// Tunnels open now.
    pub tunnels_active: u64,
    /// Tunnels admitted since start.
    pub tunnels_total: u64,
    /// Streams open now.
    pub streams_active: u64,
    /// Streams opened since start.
    pub streams_total: u64,
    /// Stream payload bytes received from agents.
    pub bytes_in: u64,
    /// Stream payload bytes sent to agents.
    pub bytes_out: u64,
    /// Refused opens by reason.
    pub open_refusals: OpenRefusals,
    /// Failed authentications.
    pub auth_failures: u64,
    /// When the server was last used, in Unix seconds.
    pub last_activity_unix: u64,
    /// Seconds since the server was last used.
    pub idle_seconds: u64,
}

/// Refused opens by reason label (`no_such_host`, `denied_by_policy`, ...); serialized as
/// a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRefusals(pub [(&'static str, u64); REFUSAL_REASONS.len()]);

impl OpenRefusals {
    /// The count for `reason`.
    pub fn get(&self, reason: RefusalReason) -> u64 {
        self.0[refusal_index(reason)].1
    }
}

impl Serialize for OpenRefusals {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (label, n) in &self.0 {
            map.serialize_entry(label, n)?;
        }
        map.end()
    }
}

impl MetricsSnapshot {
    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "fluidity_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            self.uptime_seconds,
        );
        metric(
            "fluidity_tunnels_active",
            "gauge",
            "Tunnels open now.",
            self.tunnels_active,
        );
        metric(
            "fluidity_tunnels_total",
            "counter",
            "Tunnels admitted since start.",
            self.tunnels_total,
        );
        metric(
            "fluidity_streams_active",
            "gauge",
            "Streams open now.",
            self.streams_active,
        );
        metric(
            "fluidity_streams_total",
            "counter",
            "Streams opened since start.",
            self.streams_total,
        );
        metric(
            "fluidity_bytes_in_total",
            "counter",
            "Stream payload bytes received from agents.",
            self.bytes_in,
        );
        metric(
            "fluidity_bytes_out_total",
            "counter",
            "Stream payload bytes sent to agents.",
            self.bytes_out,
        );
        metric(
            "fluidity_auth_failures_total",
            "counter",
            "Failed authentications.",
            self.auth_failures,
        );
        metric(
            "fluidity_last_activity_timestamp_seconds",
            "gauge",
            "When the server was last used, in Unix seconds.",
            self.last_activity_unix,
        );
        let _ = writeln!(
            out,
            "# HELP fluidity_open_refusals_total Refused stream opens by reason."
        );
        let _ = writeln!(out, "# TYPE fluidity_open_refusals_total counter");
        for (label, n) in &self.open_refusals.0 {
            let _ = writeln!(
                out,
                "fluidity_open_refusals_total{{reason=\"{label}\"}} {n}"
            );
        }
        out
    }
}

/// Limits of the health endpoint.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// Time a client has to send its whole request head.
    pub read_timeout: Duration,
    /// Time a client has to take the whole response.
    pub write_timeout: Duration,
    /// Largest request head accepted, in bytes.
    pub max_head: usize,
    /// Connections served at once. Beyond it, the oldest connection already answered (and
    /// waiting for its client to close) is closed to make room, else the oldest that has
    /// spent `give_way_after` without finishing its request head; when there is neither,
    /// the new connection is closed at once.
    pub max_connections: usize,
    /// How long a connection may sit on an unfinished request head before a new one may
    /// take its place when every place is taken.
    pub give_way_after: Duration,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_head: 8 * 1024,
            max_connections: 32,
            give_way_after: Duration::from_secs(1),
        }
    }
}

/// Serves `/healthz` and `/metrics` on `listener` with the default [`HealthOptions`] until
/// `shutdown` completes; connections still open then are dropped.
///
/// The returned future is not `Send` (connections run on a local executor inside it): run
/// it with `block_on` or on a `LocalExecutor`.
pub async fn serve_health(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future) {
    serve_health_with(listener, metrics, HealthOptions::default(), shutdown).await
}

/// As [`serve_health`], with explicit limits.
pub async fn serve_health_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    options: HealthOptions,
    shutdown: impl Future,
) {
    // Connection tasks live on an executor owned by this future, so dropping or finishing
    // it cancels them and nothing outlives the endpoint.
    let executor = smol::LocalExecutor::new();
    let active = Rc::new(Cell::new(0usize));
    // The connections still reading their request heads, and those answered (which only
    // wait for their client to close).
    let reading = Rc::new(RefCell::new(GiveWay::default()));
    let answered = Rc::new(RefCell::new(GiveWay::default()));
    let options = Rc::new(options);
    let accept_loop = async {
        let mut errors = AcceptErrors::new("health");
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    errors.accepted();
                    // Slow clients holding every place must not keep health checks out
                    // (a task whose checks fail is replaced): the oldest answered one gives
                    // way at once, else the oldest still reading its head.
                    let now = Instant::now();
                    if active.get() >= options.max_connections
                        && !answered.borrow_mut().give_way(now, Duration::ZERO)
                        && !reading.borrow_mut().give_way(now, options.give_way_after)
                    {
                        tracing::debug!(%peer, "health endpoint busy; closing connection");
                        continue;
                    }
                    let slot = ConnectionSlot::take(&active);
                    let (metrics, options) = (metrics.clone(), options.clone());
                    let places = Places {
                        reading: reading.clone(),
                        answered: answered.clone(),
                    };
                    executor
                        .spawn(async move {
                            let _slot = slot;
                            let served = handle_connection(stream, &metrics, &options, &places);
                            if let Err(e) = served.await {
                                tracing::debug!(%peer, error = %e, "health connection failed");
                            }
                        })
                        .detach();
                }
                Err(e) => errors.failed(&e).await,
            }
        }
    };
    executor
        .run(accept_loop.or(async {
            shutdown.await;
        }))
        .await;
}

/// The queues of connections that may give way to a new one: those still reading their
/// request heads (after [`HealthOptions::give_way_after`]), and those answered (at once).
struct Places {
    reading: Rc<RefCell<GiveWay>>,
    answered: Rc<RefCell<GiveWay>>,
}

/// A connection's place in one of the [`Places`], left when dropped.
struct Place<'a> {
    queue: &'a RefCell<GiveWay>,
    id: u64,
}

impl<'a> Place<'a> {
    /// Takes a place at the end of `queue`; the future completes when it must give way.
    fn take(queue: &'a RefCell<GiveWay>) -> (Place<'a>, impl Future<Output = ()>) {
        let Yield { id, told } = queue.borrow_mut().add(Instant::now());
        // The channel also closes when the place is left, which says nothing.
        let give_way = async move {
            if told.recv().await.is_err() {
                std::future::pending::<()>().await
            }
        };
        (Place { queue, id }, give_way)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.queue.borrow_mut().remove(self.id);
    }
}

struct ConnectionSlot(Rc<Cell<usize>>);

impl ConnectionSlot {
    fn take(active: &Rc<Cell<usize>>) -> Self {
        active.set(active.get() + 1);
        ConnectionSlot(active.clone())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

enum HeadError {
    TooLarge,
    Malformed,
    TimedOut,
    GaveWay,
    Io(io::Error),
}

/// A parsed request line; headers are checked for well-formedness and otherwise ignored.
struct RequestLine {
    method: String,
    path: String,
}

async fn read_head(stream: &mut TcpStream, max_head: usize) -> Result<RequestLine, HeadError> {
    let mut buf = vec![0u8; max_head];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(RequestLine {
                    method: req.method.unwrap_or_default().to_owned(),
                    path: req.path.unwrap_or_default().to_owned(),
                })
            }
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: format!("{body}\n"),
        }
    }
}

fn route(req: &RequestLine, metrics: &Metrics) -> Response {
    let path = req.path.split(['?', '#']).next().unwrap_or_default();
    let known = matches!(path, "/healthz" | "/metrics");
    if !known {
        return Response::text("404 Not Found", "not found");
    }
    if !matches!(req.method.as_str(), "GET" | "HEAD") {
        return Response {
            extra: "Allow: GET, HEAD\r\n",
            ..Response::text("405 Method Not Allowed", "method not allowed")
        };
    }
    let snapshot = metrics.snapshot();
    if path == "/metrics" {
        return Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            extra: "",
            body: snapshot.to_prometheus(),
        };
    }
    let status = if snapshot.status == "ok" {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = match serde_json::to_string(&snapshot) {
        Ok(json) => json + "\n",
        Err(e) => {
            tracing::error!(error = %e, "could not serialize health snapshot");
            return Response::text("500 Internal Server Error", "internal error");
        }
    };
    Response {
        status,
        content_type: "application/json",
        extra: "",
        body,
    }
}

/// Serves one connection, which holds a place among `places` that gives way: while it
/// reads its request head it then ends without an answer, and once answered it ends
/// without waiting for its client to close.
async fn handle_connection(
    mut stream: TcpStream,
    metrics: &Metrics,
    options: &HealthOptions,
    places: &Places,
) -> io::Result<()> {
    let (reading, give_way) = Place::take(&places.reading);
    let read_timeout = options.read_timeout;
    // Polled first, a head already there wins over a late eviction.
    let head = read_head(&mut stream, options.max_head)
        .or(async {
            Timer::after(read_timeout).await;
            Err(HeadError::TimedOut)
        })
        .or(async {
            give_way.await;
            Err(HeadError::GaveWay)
        })
        .await;
    drop(reading);
    let (_answered, give_way) = Place::take(&places.answered);
    let (response, head_only) = match head {
        Ok(req) => (route(&req, metrics), req.method == "HEAD"),
        Err(HeadError::TooLarge) => (
            Response::text(
                "431 Request Header Fields Too Large",
                "request head too large",
            ),
            false,
        ),
        Err(HeadError::Malformed) => (Response::text("400 Bad Request", "bad request"), false),
        Err(HeadError::TimedOut) => (
            Response::text("408 Request Timeout", "request head not received in time"),
            false,
        ),
        Err(HeadError::Io(e)) => return Err(e),
        Err(HeadError::GaveWay) => return Err(io::Error::other("gave way to a new connection")),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        response.extra,
    );
    if !head_only {
        out.push_str(&response.body);
    }
    let write_timeout = options.write_timeout;
    async {
        stream.write_all(out.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown(Shutdown::Write)?;
        // Closing with unread input makes the kernel send a reset, which can destroy the
        // response before the client reads it; so read (a bounded amount) until the client
        // closes too.
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        let drain = async {
            while drained < 64 * 1024 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok(())
        };
        // Answered: a client that does not close gives way to a new connection at once.
        drain
            .or(async {
                give_way.await;
                Ok(())
            })
            .await
    }
    .or(async {
        Timer::after(write_timeout).await;
        Err(io::ErrorKind::TimedOut.into())
    })
    .await
}

/// Entry points for cargo-fuzz (`fuzz/fuzz_targets/health_request.rs`).
#[cfg(any(fuzzing, test))]
pub mod fuzzing {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use super::{serve_health_with, HealthOptions, Metrics};

    /// The endpoint's address; started once, on its own thread, with the default limits
    /// but a short read deadline, so that a head that never ends costs one second.
    fn endpoint() -> SocketAddr {
        static ADDR: OnceLock<SocketAddr> = OnceLock::new();
        *ADDR.get_or_init(|| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
            let addr = listener.local_addr().expect("local address");
            std::thread::spawn(move || {
                let listener = async_net::TcpListener::try_from(listener).expect("async listener");
                let options = HealthOptions {
                    read_timeout: Duration::from_secs(1),
                    ..HealthOptions::default()
                };
                smol::block_on(serve_health_with(
                    listener,
                    Arc::new(Metrics::new()),
                    options,
                    std::future::pending::<()>(),
                ))
            });
            addr
        })
    }

    /// Sends `data` to the health endpoint over a socket on 127.0.0.1, closes the
    /// sending side and reads the answer. There is none only for a head cut short; any
    /// other answer is one of the endpoint's, whole: a status it gives, `Connection:
    /// close`, and a body of the length it announces (none for HEAD). Returns the status,
    /// or `None` when nothing was answered (or the socket failed).
    pub fn health_request(data: &[u8]) -> Option<String> {
        // Past the 8 KiB head limit, and small enough that the write never waits.
        let data = &data[..data.len().min(16 * 1024)];
        // Running out of local ports (each run leaves one in TIME_WAIT) says nothing of
        // the endpoint.
        let Ok(mut client) = TcpStream::connect(endpoint()) else {
            return None;
        };
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        // The endpoint may answer and close before it has read everything.
        if client.write_all(data).is_err() {
            return None;
        }
        let _ = client.shutdown(Shutdown::Write);
        let mut answer = Vec::new();
        if client.read_to_end(&mut answer).is_err() {
            return None; // A reset: the endpoint closed with input unread.
        }
        if answer.is_empty() {
            return None;
        }
        let text = std::str::from_utf8(&answer).expect("the answer is text");
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
        let status = head.get(9..12).unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        assert!(
            ["200", "503", "400", "404", "405", "408", "431"].contains(&status),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("a Content-Length");
        // A HEAD request that was read (not refused for its form) gets no body; read as
        // the endpoint reads it (empty lines before the request line are skipped).
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_request = matches!(req.parse(data), Ok(httparse::Status::Complete(_)))
            && req.method == Some("HEAD")
            && !matches!(status, "400" | "408" | "431");
        assert_eq!(body.len(), if head_request { 0 } else { length }, "{head}");
        Some(status.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs a test future with a hard limit, so that a hang fails instead of blocking CI.
    fn run<T>(fut: impl Future<Output = T>) -> T {
        smol::block_on(fut.or(async {
            Timer::after(Duration::from_secs(30)).await;
            panic!("test did not finish within 30 s")
        }))
    }

    /// Serves `metrics` on 127.0.0.1 while `client` runs with the endpoint's address, then
    /// shuts the endpoint down and checks that it stops.
    fn with_endpoint<T>(
        metrics: Arc<Metrics>,
        options: HealthOptions,
        client: impl AsyncFnOnce(SocketAddr) -> T,
    ) -> T {
        run(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = async_channel::bounded::<()>(1);
            let server = serve_health_with(listener, metrics, options, async move {
                let _ = stopped.recv().await;
            });
            let client = async {
                let out = client(addr).await;
                stop.send(()).await.unwrap();
                out
            };
            let ((), out) = futures_lite::future::zip(server, client).await;
            out
        })
    }

    use std::net::SocketAddr;

    /// Runs curl with `args` against `url`; returns (status code, headers, body).
    async fn curl(args: &[&str], url: String) -> (u16, String, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-D", "-", "-o", "-"])
            .args(args)
            .arg(url);
        let out = blocking::unblock(move || cmd.output()).await.unwrap();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    fn busy_metrics() -> Arc<Metrics> {
        let m = Arc::new(Metrics::new());
        m.tunnel_opened();
        m.stream_opened();
        m.stream_opened();
        m.stream_closed();
        m.add_bytes_in(100);
        m.add_bytes_out(2500);
        m.record_refusal(RefusalReason::DeniedByPolicy);
        m.record_refusal(RefusalReason::DeniedByPolicy);
        m.record_refusal(RefusalReason::NoSuchHost);
        m.record_refusal(RefusalReason::Unknown(99));
        m.record_auth_failure();
        m
    }

    #[test]
    fn healthz_answers_json_with_the_counters() {
        let (status, head, body) =
            with_endpoint(busy_metrics(), HealthOptions::default(), async |addr| {
                curl(&[], format!("http://{addr}/healthz")).await
            });
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["tunnels_active"], 1);
        assert_eq!(v["tunnels_total"], 1);
        assert_eq!(v["streams_active"], 1);
        assert_eq!(v["streams_total"], 2);
        assert_eq!(v["bytes_in"], 100);
        assert_eq!(v["bytes_out"], 2500);
        assert_eq!(v["auth_failures"], 1);
        assert_eq!(v["open_refusals"]["denied_by_policy"], 2);
        assert_eq!(v["open_refusals"]["no_such_host"], 1);
        assert_eq!(v["open_refusals"]["other"], 1);
        assert_eq!(v["open_refusals"]["timed_out"], 0);
        assert!(v["uptime_seconds"].is_u64());
        assert!(v["last_activity_unix"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["idle_seconds"].is_u64());
    }

    #[test]
    fn metrics_answers_prometheus_text() {
        let (status, head, body) =
            with_endpoint(busy_metrics(), HealthOptions::default(), async |addr| {
                curl(&[], format!("http://{addr}/metrics?x=1")).await
            });
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        for line in [
            "# TYPE fluidity_tunnels_active gauge",
            "fluidity_tunnels_active 1",
            "fluidity_tunnels_total 1",
            "fluidity_streams_active 1",
            "fluidity_streams_total 2",
            "fluidity_bytes_in_total 100",
            "fluidity_bytes_out_total 2500",
            "fluidity_auth_failures_total 1",
            "# TYPE fluidity_open_refusals_total counter",
            "fluidity_open_refusals_total{reason=\"denied_by_policy\"} 2",
            "fluidity_open_refusals_total{reason=\"too_many_streams\"} 0",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in\n{body}"
            );
        }
        // Every sample line is `name value` or `name{labels} value` with an integer value.
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("fluidity_"), "{line}");
            value.parse::<u64>().unwrap();
        }
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let metrics = Arc::new(Metrics::new());
        let results = with_endpoint(metrics, HealthOptions::default(), async |addr| {
            vec![
                curl(&[], format!("http://{addr}/")).await,
                curl(&[], format!("http://{addr}/healthz/x")).await,
                curl(
                    &["-X", "POST", "-d", "x=1"],
                    format!("http://{addr}/healthz"),
                )
                .await,
                curl(&["-X", "DELETE"], format!("http://{addr}/metrics")).await,
                curl(&["-I"], format!("http://{addr}/healthz")).await,
            ]
        });
        assert_eq!(results[0].0, 404);
        assert_eq!(results[1].0, 404);
        assert_eq!(results[2].0, 405);
        assert!(
            results[2].1.contains("allow: get, head"),
            "{}",
            results[2].1
        );
        assert_eq!(results[3].0, 405);
        // HEAD: the headers of a GET and no body.
        assert_eq!(results[4].0, 200);
        assert!(results[4].1.contains("content-type: application/json"));

        // HEAD on the wire: a Content-Length and nothing after the head.
        let answer = with_endpoint(
            Arc::new(Metrics::new()),
            HealthOptions::default(),
            async |addr| raw(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await,
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(length > 0);
        assert_eq!(body, "");
    }

    #[test]
    fn draining_server_is_unavailable() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_draining();
        let (status, _, body) = with_endpoint(metrics, HealthOptions::default(), async |addr| {
            curl(&[], format!("http://{addr}/healthz")).await
        });
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "draining");
    }

    /// Sends `request` on a raw connection and returns everything the server answers.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn bad_requests_are_bounded_and_answered() {
        let options = HealthOptions {
            read_timeout: Duration::from_millis(300),
            ..HealthOptions::default()
        };
        let answers = with_endpoint(Arc::new(Metrics::new()), options, async |addr| {
            let huge = format!(
                "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(9000)
            );
            let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
            vec![
                raw(addr, huge.as_bytes()).await,
                raw(
                    addr,
                    format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes(),
                )
                .await,
                raw(addr, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await,
                // Never finishes its head: answered 408 once the read deadline passes.
                raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await,
                raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await,
            ]
        });
        assert!(answers[0].starts_with("HTTP/1.1 431 "), "{}", answers[0]);
        assert!(answers[1].starts_with("HTTP/1.1 431 "), "{}", answers[1]);
        assert!(answers[2].starts_with("HTTP/1.1 400 "), "{}", answers[2]);
        assert!(answers[3].starts_with("HTTP/1.1 408 "), "{}", answers[3]);
        assert!(answers[4].starts_with("HTTP/1.1 200 "), "{}", answers[4]);
    }

    #[test]
    fn clients_sitting_on_every_place_give_way_to_a_health_check() {
        let options = HealthOptions {
            max_connections: 2,
            give_way_after: Duration::ZERO,
            read_timeout: Duration::from_secs(20),
            ..HealthOptions::default()
        };
        let (answer, first, second) =
            with_endpoint(Arc::new(Metrics::new()), options, async |addr| {
                // Two clients that send half a head and then nothing, as a slow attack
                // would; the third connection is accepted after them.
                let mut first = TcpStream::connect(addr).await.unwrap();
                first.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
                let mut second = TcpStream::connect(addr).await.unwrap();
                second
                    .write_all(b"GET /healthz HTTP/1.1\r\n")
                    .await
                    .unwrap();
                let answer = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
                let mut first_out = Vec::new();
                first.read_to_end(&mut first_out).await.unwrap();
                second.write_all(b"\r\n").await.unwrap();
                let mut second_out = Vec::new();
                second.read_to_end(&mut second_out).await.unwrap();
                (answer, first_out, String::from_utf8(second_out).unwrap())
            });
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        // The oldest gave way without an answer; the second, one place being enough, was
        // still served.
        assert!(first.is_empty(), "{first:?}");
        assert!(second.starts_with("HTTP/1.1 200 "), "{second}");
    }

    /// Clients that keep their answered connections open hold no place a new connection
    /// needs: the oldest gives way at once, though none of them would give way as a slow
    /// reader (`give_way_after` is an hour).
    #[test]
    fn answered_connections_left_open_give_way_to_a_health_check() {
        let options = HealthOptions {
            max_connections: 2,
            give_way_after: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(60),
            ..HealthOptions::default()
        };
        let answers = with_endpoint(Arc::new(Metrics::new()), options, async |addr| {
            let mut kept = Vec::new();
            for _ in 0..2 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
                // The whole answer, then the endpoint's end of the connection: it is
                // answered and only waits for this client to close, which it does not.
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.unwrap();
                kept.push((s, String::from_utf8(out).unwrap()));
            }
            let third = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
            let mut answers: Vec<String> = kept.into_iter().map(|(_, a)| a).collect();
            answers.push(third);
            answers
        });
        for answer in &answers {
            assert!(answer.starts_with("HTTP/1.1 200 "), "{answers:?}");
        }
    }

    #[test]
    fn a_served_connection_is_drained_not_dropped() {
        let (answer, after) = with_endpoint(
            Arc::new(Metrics::new()),
            HealthOptions::default(),
            async |addr| {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.unwrap();
                // The endpoint reads on until this client closes, so that bytes it sent
                // after its head cannot turn into a reset that destroys the answer: a
                // socket it had closed would answer the first bytes with a reset, and
                // the next write would fail.
                s.write_all(b"more").await.unwrap();
                let _ = s.read(&mut [0u8; 16]).await;
                let after = s.write_all(b"more").await;
                (String::from_utf8(out).unwrap(), after.map_err(|e| e.kind()))
            },
        );
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(after, Ok(()));
    }

    #[test]
    fn the_fuzz_entry_point_takes_answers_and_refusals() {
        for (input, status) in [
            (&b"GET /healthz HTTP/1.1\r\n\r\n"[..], Some("200")),
            (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Some("200")),
            (b"POST /healthz HTTP/1.1\r\n\r\n", Some("405")),
            (b"HEAD /nowhere HTTP/1.1\r\n\r\n", Some("404")),
            (b"\n\nHEAD /metrics HTTP/1.0\r\n\r\ne", Some("200")),
            (b"\x16\x03\x01\x00\x05hello\r\n\r\n", Some("400")),
            (b"GET /healthz HTTP/1.1\r\n", None),
            (b"", None),
            (&[b'a'; 9000], Some("431")),
        ] {
            let got = fuzzing::health_request(input);
            assert_eq!(
                got.as_deref(),
                status,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// The seeds of `fuzz/corpus/health_request` get the answers they were written for,
    /// so the fuzzer starts from requests the endpoint serves. A seed not listed here
    /// fails the test, so that each says what it is.
    #[test]
    fn the_health_request_seeds_get_their_answers() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/health_request");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let status = match name.as_str() {
                "get_healthz" | "get_metrics_query" | "head_metrics" | "head_after_empty_lines" => {
                    Some("200")
                }
                "delete" => Some("405"),
                "cut_short" => None,
                other => panic!("seed {other} is not listed in this test"),
            };
            let got = fuzzing::health_request(&std::fs::read(&path).unwrap());
            assert_eq!(got.as_deref(), status, "{name}");
            seen += 1;
        }
        assert_eq!(seen, 6);
    }

    #[test]
    fn shutdown_stops_the_endpoint_with_a_connection_open() {
        run(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = async_channel::bounded::<()>(1);
            let server = serve_health(listener, Arc::new(Metrics::new()), async move {
                let _ = stopped.recv().await;
            });
            let client = async {
                // An idle connection that has sent nothing; then a request on another one
                // proves the first is being served (accepted) before shutdown.
                let idle = TcpStream::connect(addr).await.unwrap();
                let answer = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
                assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
                stop.send(()).await.unwrap();
                idle
            };
            let ((), mut idle) = futures_lite::future::zip(server, client).await;
            // The endpoint is gone: the idle connection was closed without an answer.
            let mut buf = Vec::new();
            let n = idle.read_to_end(&mut buf).await.unwrap_or(0);
            assert_eq!(n, 0);
            assert!(TcpStream::connect(addr).await.is_err());
        });
    }

    #[test]
    fn guards_count_until_dropped() {
        let m = Arc::new(Metrics::new());
        {
            let _t = m.track_tunnel();
            let _s1 = m.track_stream();
            let _s2 = m.track_stream();
            let s = m.snapshot();
            assert_eq!(
                (s.tunnels_active, s.streams_active, s.streams_total),
                (1, 2, 2)
            );
        }
        let s = m.snapshot();
        assert_eq!((s.tunnels_active, s.tunnels_total), (0, 1));
        assert_eq!((s.streams_active, s.streams_total), (0, 2));
        // An unmatched close never wraps the gauge.
        m.stream_closed();
        assert_eq!(m.snapshot().streams_active, 0);
        assert_eq!(m.snapshot().open_refusals.get(RefusalReason::GoingAway), 0);
    }
}
