//! AWS mode (`mode = "aws"`): the agent brings its own server up, trusts exactly that
//! instance, and stops it when it is done.
//!
//! 1. **Wake** (signed call to the Wake function): the service is wanted; the answer
//!    carries the agent's public IP as the control plane saw it.
//! 2. **Query** until the server runs and has an address, showing the phase and the time
//!    spent ([`wait`]), and giving up after `[lifecycle] wait_secs`.
//! 3. **Certificate**: a key and CSR with CN = the server's ARN and the one IP SAN the
//!    agent's public IP, signed by the CA function and cached in the state folder (reused
//!    only for the same ARN and address, and renewed 30 days before expiry).
//! 4. **Connect** to the server's IP; the server's certificate must chain to the CA, carry
//!    CN = the ARN, and name the dialled IP among its SANs. Then IAM authentication (when
//!    `auth = "iam"`), then ready: the proxy serves.
//!
//! 5. **Watch**: while the proxy serves, the agent keeps its tunnel up. When reconnecting
//!    fails [`GONE_AFTER_FAILURES`] times in a row, the server may have been replaced (its
//!    task crashed and ECS started another, with another ARN and address): the agent calls
//!    Wake again (idempotent; it refreshes the stored agent address, whose TTL is an hour,
//!    so that the new task finds it) and Queries until a server runs. The same ARN and
//!    address: it reconnects. Another one: a certificate for the new ARN, then the dialer
//!    is pointed at it ([`TunnelDialer::retarget`]); the local proxy keeps listening and
//!    answers clients 502/503 in the meantime. A service whose desired count is 0 (Sleep,
//!    or someone stopped it) is woken again, since the user still runs the agent. No
//!    usable server within `wait_secs`: the agent says so, calls Kill and exits with an
//!    error, as at start-up.
//!
//! The server's IP is held in memory only: it is never written to disk, and there is no
//! option to pin or force it. On a clean exit (Ctrl-C, SIGTERM) and on an unrecoverable
//! error the agent calls **Kill**, once ([`KillOnce`]).

pub mod wait;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fluidity_aws::control::types::{CertRole, WakeResponse};
use fluidity_aws::control::{ControlClient, ControlUrls};
use fluidity_aws::Env;
use fluidity_runtime_smol::app;
use fluidity_runtime_smol::pki::RENEW_BEFORE;
use fluidity_runtime_smol::tls::{self, CaRoots, Identity, PeerCheck};
use fluidity_runtime_smol::PeerRole;
use fluidity_server::aws::cert::{self as certs, CertFiles, ControlCa};
use futures_lite::FutureExt;
use serde::Deserialize;
use smol::Executor;

use self::wait::{CallFailed, Located, Phase, Progress};

/// Reconnect attempts that fail in a row before the agent asks the control plane whether
/// its server is still there. With the dialer's backoff (250 ms, doubling) three failures
/// take about two seconds: a brief drop reconnects before that, a replaced server is
/// looked for soon after.
pub const GONE_AFTER_FAILURES: u32 = 3;

/// How often the agent looks at its tunnel while serving.
const WATCH_EVERY: Duration = Duration::from_secs(1);
use crate::config::{AgentAuth, AgentConfig};
use crate::error::{Error, Result};
use crate::iam::IamSigner;
use crate::run;
use crate::tunnel::{CredentialSource, ServerAddr, TunnelDialer, TunnelSettings};

/// The `[lifecycle]` section: where the control functions are and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleSettings {
    /// Base URL of one control host serving `/wake`, `/query`, `/kill`, `/ca`
    /// (`fluidity-control`). Default: `FLUIDITY_CONTROL_URL`.
    pub control_url: Option<String>,
    /// The Wake function URL. Default: `FLUIDITY_WAKE_URL`, else under `control_url`.
    pub wake_url: Option<String>,
    /// The Query function URL. Default: `FLUIDITY_QUERY_URL`, else under `control_url`.
    pub query_url: Option<String>,
    /// The Kill function URL. Default: `FLUIDITY_KILL_URL`, else under `control_url`.
    pub kill_url: Option<String>,
    /// The CA function URL. Default: `FLUIDITY_CA_URL`, else under `control_url`.
    pub ca_url: Option<String>,
    /// The server's tunnel port. Default 8443.
    pub server_port: u16,
    /// Seconds to wait for the server to run with an address, and again to connect to
    /// it, before giving up (and calling Kill). Default 300.
    pub wait_secs: u64,
    /// Seconds between Query calls while waiting. Default 3.
    pub poll_secs: u64,
    /// Folder of the cached agent certificate. Default: `$XDG_CACHE_HOME/fluidity/aws`,
    /// else `~/.cache/fluidity/aws`.
    pub state_dir: Option<PathBuf>,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            control_url: None,
            wake_url: None,
            query_url: None,
            kill_url: None,
            ca_url: None,
            server_port: 8443,
            wait_secs: 300,
            poll_secs: 3,
            state_dir: None,
        }
    }
}

impl LifecycleSettings {
    /// The four function URLs: each explicit setting, else the environment
    /// (`FLUIDITY_*_URL`), else a path under `control_url` / `FLUIDITY_CONTROL_URL`.
    pub fn urls(&self, env: &Env) -> Result<ControlUrls> {
        let host = self
            .control_url
            .as_deref()
            .or_else(|| env.get("FLUIDITY_CONTROL_URL"))
            .map(ControlUrls::on_host);
        let pick = |set: &Option<String>, var: &str, under: Option<&String>| {
            set.clone()
                .or_else(|| env.get(var).map(str::to_owned))
                .or_else(|| under.cloned())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "AWS mode needs the control functions: set [lifecycle] control_url \
                         (or FLUIDITY_CONTROL_URL), or {var}"
                    ))
                })
        };
        Ok(ControlUrls {
            wake: pick(
                &self.wake_url,
                "FLUIDITY_WAKE_URL",
                host.as_ref().map(|h| &h.wake),
            )?,
            query: pick(
                &self.query_url,
                "FLUIDITY_QUERY_URL",
                host.as_ref().map(|h| &h.query),
            )?,
            kill: pick(
                &self.kill_url,
                "FLUIDITY_KILL_URL",
                host.as_ref().map(|h| &h.kill),
            )?,
            ca: pick(
                &self.ca_url,
                "FLUIDITY_CA_URL",
                host.as_ref().map(|h| &h.ca),
            )?,
        })
    }

    /// The folder of the cached certificate.
    pub fn state_dir(&self, env: &Env) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(x) = env.get("XDG_CACHE_HOME") {
            return PathBuf::from(x).join("fluidity").join("aws");
        }
        match env.home_dir() {
            Some(h) => h.join(".cache").join("fluidity").join("aws"),
            None => PathBuf::from(".fluidity-aws"),
        }
    }
}

/// Calls Kill at most once, however many exit paths ask for it (the earlier
/// implementation called it twice on exit).
pub struct KillOnce {
    kill: Box<dyn Fn() -> std::result::Result<String, String> + Send + Sync>,
    done: AtomicBool,
}

impl std::fmt::Debug for KillOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KillOnce")
            .field("done", &self.done.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl KillOnce {
    /// Wraps a Kill call that returns a description of the outcome.
    pub fn new(
        kill: impl Fn() -> std::result::Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        KillOnce {
            kill: Box::new(kill),
            done: AtomicBool::new(false),
        }
    }

    /// Calls Kill unless it was called before; says why on stderr and in the log.
    /// Returns whether this call made the request.
    pub fn kill(&self, why: &str) -> bool {
        if self.done.swap(true, Ordering::SeqCst) {
            return false;
        }
        eprintln!("fluidity: stopping the server ({why})");
        match (self.kill)() {
            Ok(outcome) => tracing::info!(reason = why, outcome = %outcome, "Kill called"),
            Err(e) => {
                tracing::error!(reason = why, error = %e, "Kill failed; the Sleep function will stop the idle server");
                eprintln!("fluidity: Kill failed: {e}");
            }
        }
        true
    }
}

/// Makes the IAM tunnel credentials for a server id (its ARN, learnt from Query).
pub type CredentialsFor = Arc<dyn Fn(&str) -> Result<CredentialSource> + Send + Sync>;

/// Everything AWS mode needs besides the agent configuration.
#[derive(Clone)]
pub struct AwsRun {
    /// The control client (signed calls to the four functions).
    pub control: ControlClient,
    /// Lifecycle settings.
    pub lifecycle: LifecycleSettings,
    /// The environment snapshot (state folder).
    pub env: Env,
    /// IAM tunnel credentials for a given server id (the ARN), when `auth = "iam"`.
    pub credentials: Option<CredentialsFor>,
    /// Keep progress off stderr (the log still has it).
    pub quiet: bool,
    /// The Wake calls under way, which Kill waits for.
    pub wakes: Arc<WakesInFlight>,
}

/// Wake calls under way. A Wake runs to its end on its blocking thread even when the agent
/// stops waiting for it (a stop while it wakes the server); Kill waits for it, since a Wake
/// that lands after Kill would leave the server wanted until Sleep finds it idle.
#[derive(Debug, Default)]
pub struct WakesInFlight {
    count: Mutex<usize>,
    ended: Condvar,
}

impl WakesInFlight {
    /// Counts a Wake call until the guard is dropped.
    fn enter(self: &Arc<Self>) -> WakeInFlight {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        WakeInFlight(self.clone())
    }

    /// Waits up to `limit` for the Wake calls under way to end; returns whether they did.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .ended
            .wait_timeout_while(count, limit, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

/// One Wake call under way ([`WakesInFlight`]).
struct WakeInFlight(Arc<WakesInFlight>);

impl Drop for WakeInFlight {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        self.0.ended.notify_all();
    }
}

/// How long Kill waits for a Wake under way: longer than a control call may take.
const WAKE_WAIT: Duration = Duration::from_secs(40);

impl std::fmt::Debug for AwsRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsRun")
            .field("urls", self.control.urls())
            .field("lifecycle", &self.lifecycle)
            .field("iam", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// Runs the agent in AWS mode from its configuration until Ctrl-C or SIGTERM: the control
/// client signs with the `[aws]` identity (the default credential chain), and with
/// `auth = "iam"` the tunnel authentication names the server's ARN learnt from Query.
/// `quiet` keeps progress lines off stderr (they stay log events), for JSON logs.
pub fn run_configured(cfg: AgentConfig, quiet: bool) -> Result<()> {
    let defaults = AgentConfig::default();
    let ignored: Vec<&str> = [
        ("server", cfg.server != defaults.server),
        ("server_name", cfg.server_name.is_some()),
        ("expected_server_cn", cfg.expected_server_cn.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            settings = %ignored.join(", "),
            "ignored in AWS mode: the agent dials the server it wakes, at the address Query \
             gives, and trusts the certificate of that server's ARN"
        );
    }
    let env = Env::process();
    let urls = cfg.lifecycle.urls(&env)?;
    let aws_config = crate::iam::aws_config(&cfg, &env, urls.region())?;
    let control = ControlClient::new(&aws_config, urls);
    let credentials: Option<CredentialsFor> = match cfg.auth {
        AgentAuth::None => None,
        AgentAuth::Iam => {
            if cfg.iam.server_id.is_some() {
                tracing::warn!("[iam] server_id is ignored in AWS mode: the server id is its ARN");
            }
            let signer = IamSigner::new(aws_config, "", cfg.aws.iam_role_arn.clone())?;
            Some(Arc::new(move |arn: &str| {
                Ok(signer.for_server(arn).into_source())
            }))
        }
    };
    let aws = AwsRun {
        control,
        lifecycle: cfg.lifecycle.clone(),
        env,
        credentials,
        quiet,
        wakes: Arc::default(),
    };
    app::run(app::threads(cfg.threads), |ex| async move {
        // A second Ctrl-C (people press it twice) must not skip the Kill that follows the
        // drain: the server would run on until Sleep. It says what the agent waits for; a
        // third leaves at once.
        let later = |count: u32| {
            if count == 2 {
                eprintln!(
                    "fluidity: still stopping: the server is stopped before the agent exits; \
                     press Ctrl-C again to exit now and leave it running until Sleep finds it idle"
                );
            } else {
                eprintln!(
                    "fluidity: exiting without stopping the server; Sleep stops it once idle"
                );
                tracing::warn!("third signal: exiting without stopping the server");
                app::exit_now();
            }
        };
        run_aws(&ex, cfg, aws, app::shutdown_signal_then(later)).await
    })
}

/// Runs the agent in AWS mode until `shutdown` completes or an unrecoverable error, and
/// calls Kill (once) either way.
pub async fn run_aws(
    ex: &Arc<Executor<'static>>,
    cfg: AgentConfig,
    aws: AwsRun,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // Bind first: a taken port is found before a server is started for nothing.
    let proxy_cfg = run::proxy_config(&cfg)?;
    let listener = run::bind(cfg.listen)?;
    let control = aws.control.clone();
    let killer = KillOnce::new(move || {
        control
            .kill()
            .map(|k| format!("status {}, desired count {}", k.status, k.desired_count))
            .map_err(|e| e.to_string())
    });
    // One shutdown signal, shared by the waiting phases and the proxy.
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    ex.spawn(async move {
        shutdown.await;
        drop(stop_tx);
    })
    .detach();
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let rx = rx.clone();
            async move {
                let _ = rx.recv().await;
            }
        }
    };

    let up = async { Some(bring_up(ex, &cfg, &aws).await) }
        .or(async {
            stopped().await;
            None
        })
        .await;
    let outcome: Result<&str> = match up {
        None => Ok("stopped before the server was ready"),
        Some(Err(e)) => Err(e),
        Some(Ok((dialer, located, agent_ip))) => {
            let listen = listener.local_addr().map_err(Error::Io)?;
            eprintln!(
                "fluidity: ready; proxy on {listen} (HTTP, HTTPS via CONNECT, WebSocket, SOCKS5)"
            );
            tracing::info!(%listen, "fluidity proxy listening");
            // The watcher ends with an error only when no usable server came back; its
            // channel closes then, and the proxy stops as on a signal. It also ends with the
            // signal: while the proxy drains, a tunnel going away is the agent's own doing,
            // not a server to look for.
            let (gone_tx, gone_rx) = async_channel::bounded::<()>(1);
            let watched = watch(
                cfg.clone(),
                aws.clone(),
                dialer.clone(),
                located,
                agent_ip,
                ADDRESS_REFRESH,
            );
            let signal = stopped();
            let watcher = ex.spawn(async move {
                let _gone = gone_tx;
                async { Some(watched.await) }
                    .or(async {
                        signal.await;
                        None
                    })
                    .await
            });
            let stop = stopped().or(async move {
                let _ = gone_rx.recv().await;
            });
            // The proxy drains its streams when told to stop, so it gets the signal itself.
            run::serve(ex, listener, dialer, proxy_cfg, stop).await;
            match watcher.await {
                Some(e) => Err(e),
                None => Ok("the agent stopped"),
            }
        }
    };
    let why = match &outcome {
        Ok(why) => why.to_string(),
        Err(e) => format!("unrecoverable error: {e}"),
    };
    let wakes = aws.wakes.clone();
    blocking::unblock(move || {
        if !wakes.wait_idle(Duration::ZERO) {
            tracing::info!("waiting for the Wake under way before stopping the server");
            if !wakes.wait_idle(WAKE_WAIT) {
                tracing::warn!(
                    waited_secs = WAKE_WAIT.as_secs(),
                    "a Wake is still under way; stopping the server anyway"
                );
            }
        }
        killer.kill(&why)
    })
    .await;
    outcome.map(|_| ())
}

/// Wake, wait, certificate, connect: returns a dialer with a ready tunnel, the server it
/// reaches and the agent's address as the control plane saw it.
async fn bring_up(
    ex: &Arc<Executor<'static>>,
    cfg: &AgentConfig,
    aws: &AwsRun,
) -> Result<(TunnelDialer, Located, IpAddr)> {
    let s = &aws.lifecycle;
    let limit = Duration::from_secs(s.wait_secs.max(1));
    let poll = Duration::from_secs(s.poll_secs.max(1));
    let mut progress = Progress::new(Duration::from_secs(10), aws.quiet);

    progress.report(Phase::Waking);
    // Wake is idempotent: a failure that may pass (a 5xx, a timeout, a network error) is
    // tried again a few times before the agent gives up.
    let mut tries = 0;
    let woke = loop {
        tries += 1;
        match wake(aws).await {
            Ok(w) => break w,
            Err(e) if !e.lasting && tries < WAKE_TRIES => {
                tracing::warn!(error = %e, "Wake failed; trying again");
                async_io::Timer::after(poll * tries).await;
            }
            Err(e) => return Err(Error::Lifecycle(format!("Wake failed: {e}"))),
        }
    };

    let control = aws.control.clone();
    let located = wait::wait_until_running(
        || {
            let c = control.clone();
            async move {
                let q = blocking::unblock(move || c.query())
                    .await
                    .map_err(|e| CallFailed::of(&e))?;
                // Sleep (or someone) stopped the service since the Wake: waiting would
                // not bring it up.
                if q.desired_count == 0 {
                    tracing::info!("the service has no task wanted; waking it again");
                    if let Err(e) = wake(aws).await {
                        tracing::warn!(error = %e, "Wake failed; retrying");
                    }
                }
                Ok(q)
            }
        },
        limit,
        poll,
        &mut progress,
    )
    .await
    .map_err(|g| {
        eprintln!("fluidity: {g}");
        Error::Lifecycle(format!("the server did not become usable: {g}"))
    })?;
    let agent_ip = woke.agent_public_ip_as_seen;
    tracing::info!(server_arn = %located.server_arn, server_ip = %located.server_ip, "server located");

    progress.report(Phase::Certifying);
    let files = certify(aws, &located, agent_ip).await?;
    let settings = tunnel_settings(cfg, aws, &files, &located)?;
    let dialer = TunnelDialer::new(settings, ex.clone());
    // A server that does not answer may be gone already (its task replaced since Query
    // named it): looked for again, as one that goes away later is, within `wait_secs`.
    if let Err(e) = connect(&dialer, &located, limit, CONNECT_PATIENCE, &mut progress).await {
        tracing::info!(error = %e, "the server Query named does not answer; asking again");
        let (found, ip) = find_again(cfg, aws, &dialer, &located, agent_ip).await?;
        return Ok((dialer, found, ip));
    }
    Ok((dialer, located, agent_ip))
}

/// How long the agent keeps dialling a server Query named that does not answer before it
/// asks again: a task starts listening a few seconds after ECS reports it running.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// How many times the first Wake is tried when it fails in a way that may pass.
const WAKE_TRIES: u32 = 3;

/// Calls Wake; the answer carries the agent's address as the control plane saw it.
async fn wake(aws: &AwsRun) -> std::result::Result<WakeResponse, CallFailed> {
    let woke = call_wake(aws).await?;
    tracing::info!(status = %woke.status, agent_ip = %woke.agent_public_ip_as_seen,
        changed = woke.changed, "server woken");
    Ok(woke)
}

/// Calls Wake, counted among the Wakes under way (which a stop waits for).
async fn call_wake(aws: &AwsRun) -> std::result::Result<WakeResponse, CallFailed> {
    let control = aws.control.clone();
    let wakes = aws.wakes.clone();
    blocking::unblock(move || {
        let _counted = wakes.enter();
        control.wake()
    })
    .await
    .map_err(|e| CallFailed::of(&e))
}

/// Whether the agent's cached certificate is within [`RENEW_BEFORE`] of its end (or
/// unreadable): a tunnel up keeps working past it, but a new one would be refused, so a
/// reconnection renews it first.
fn certificate_due(aws: &AwsRun) -> bool {
    fluidity_runtime_smol::pki::read_pem_file(&agent_cert_files(aws).cert)
        .ok()
        .and_then(|pem| fluidity_runtime_smol::pki::not_after(&pem).ok())
        .is_none_or(|end| end <= std::time::SystemTime::now() + RENEW_BEFORE)
}

/// Where the agent keeps its certificate, key and CA.
fn agent_cert_files(aws: &AwsRun) -> CertFiles {
    CertFiles::in_dir(&aws.lifecycle.state_dir(&aws.env), "agent")
}

/// The agent's certificate for `located` (CN = its ARN, SAN = `agent_ip`), from the cache
/// or the CA function. Only the ARN and the agent's address go into it: the server's
/// address is never written down.
async fn certify(aws: &AwsRun, located: &Located, agent_ip: IpAddr) -> Result<CertFiles> {
    if let Some(stored) = located.agent_ip.filter(|ip| *ip != agent_ip) {
        tracing::warn!(%stored, seen = %agent_ip,
            "the control plane holds another agent address for this server; the server will refuse this agent");
    }
    let files = agent_cert_files(aws);
    let ca = ControlCa {
        client: aws.control.clone(),
        role: CertRole::Agent,
    };
    let (f, arn) = (files.clone(), located.server_arn.clone());
    blocking::unblock(move || {
        certs::obtain(&f, &arn, &[agent_ip], PeerRole::Client, &ca, RENEW_BEFORE)
    })
    .await
    .map_err(|e| Error::Lifecycle(format!("agent certificate: {e}")))?;
    Ok(files)
}

/// How often an agent whose tunnel is up calls Wake again, which stores its address: the
/// CA certifies a server only for an agent address stored in the last hour, and a server
/// that an agent keeps up renews its certificate a day before it ends.
const ADDRESS_REFRESH: Duration = Duration::from_secs(30 * 60);

/// How soon a Wake of [`ADDRESS_REFRESH`] that failed is tried again.
const STORE_RETRY: Duration = Duration::from_secs(60);

/// Keeps the tunnel up while the proxy serves, calling Wake every `refresh` while it is
/// up (see [`ADDRESS_REFRESH`]), and, when reconnecting keeps failing, finds the server
/// again ([`find_again`]). Ends, with the reason, only when no usable server came within
/// `wait_secs`.
async fn watch(
    cfg: AgentConfig,
    aws: AwsRun,
    dialer: TunnelDialer,
    mut current: Located,
    mut agent_ip: IpAddr,
    refresh: Duration,
) -> Error {
    let mut next_store = std::time::Instant::now() + refresh;
    loop {
        async_io::Timer::after(WATCH_EVERY).await;
        if dialer.is_up() {
            if std::time::Instant::now() >= next_store {
                next_store = match call_wake(&aws).await {
                    Ok(w) => {
                        tracing::debug!(agent_ip = %w.agent_public_ip_as_seen,
                            "this agent's address stored again");
                        std::time::Instant::now() + refresh
                    }
                    Err(e) => {
                        let retry = refresh.min(STORE_RETRY);
                        tracing::warn!(error = %e, retry_secs = retry.as_secs(),
                            "could not store this agent's address again (the server needs \
                             it to renew its certificate); trying again");
                        std::time::Instant::now() + retry
                    }
                };
            }
            continue;
        }
        // Reconnect between clients too, so that a server that went away is noticed
        // before a client needs it. The dialer's breaker spaces the attempts.
        if dialer.tunnel().await.is_ok() || dialer.consecutive_failures() < GONE_AFTER_FAILURES {
            continue;
        }
        match find_again(&cfg, &aws, &dialer, &current, agent_ip).await {
            // It called Wake.
            Ok((found, ip)) => {
                (current, agent_ip) = (found, ip);
                next_store = std::time::Instant::now() + refresh;
            }
            Err(e) => return e,
        }
    }
}

/// The server `current` cannot be reached: Wake (refreshing the agent's stored address),
/// then Query every `poll_secs` until a server runs; reconnect to it if it is the same and
/// the agent's address is the one its certificate names (`agent_ip`), otherwise certify
/// for the server and the agent's address now and point the dialer at it. Gives up after
/// `wait_secs`. Returns the server now used and the agent's certified address.
async fn find_again(
    cfg: &AgentConfig,
    aws: &AwsRun,
    dialer: &TunnelDialer,
    current: &Located,
    mut agent_ip: IpAddr,
) -> Result<(Located, IpAddr)> {
    let s = &aws.lifecycle;
    let limit = Duration::from_secs(s.wait_secs.max(1));
    let poll = Duration::from_secs(s.poll_secs.max(1));
    let mut progress = Progress::new(Duration::from_secs(10), aws.quiet);
    tracing::warn!(server_arn = %current.server_arn, server_ip = %current.server_ip,
        failures = dialer.consecutive_failures(), "the server went away; looking for it again");
    progress.report(Phase::Gone);
    // The address the agent's certificate names: a laptop that moved to another network
    // is refused by the same server until it has one for its new address.
    let certified_ip = agent_ip;
    let mut need_wake = true;
    let mut wake_error: Option<String> = None;
    loop {
        let last_note: Option<String>;
        if need_wake {
            match wake(aws).await {
                Ok(w) => {
                    agent_ip = w.agent_public_ip_as_seen;
                    need_wake = false;
                    wake_error = None;
                }
                Err(e) if e.lasting => {
                    let msg = format!("Wake failed: {e}");
                    eprintln!("fluidity: {msg}");
                    return Err(Error::Lifecycle(msg));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Wake failed; retrying");
                    wake_error = Some(format!("Wake failed: {e}"));
                }
            }
        }
        let control = aws.control.clone();
        match blocking::unblock(move || control.query()).await {
            Ok(q) => match wait::interpret(&q) {
                Ok(found)
                    if found.server_arn == current.server_arn
                        && found.server_ip == current.server_ip
                        && agent_ip == certified_ip
                        && !certificate_due(aws) =>
                {
                    // Still the same server: a drop, not a replacement.
                    match dialer.tunnel().await {
                        Ok(_) => {
                            eprintln!("fluidity: reconnected to the server");
                            tracing::info!(server_arn = %found.server_arn, "reconnected to the same server");
                            return Ok((found, agent_ip));
                        }
                        Err(e) => last_note = Some(e),
                    }
                }
                Ok(found) => {
                    let same = found.server_arn == current.server_arn;
                    if same && agent_ip == certified_ip {
                        tracing::info!(%agent_ip,
                            "the agent's certificate nears its end (or cannot be read); renewing it");
                    } else if same {
                        tracing::info!(%agent_ip, %certified_ip,
                            "the agent's address changed; certifying it for the same server");
                    } else {
                        tracing::info!(server_arn = %found.server_arn, server_ip = %found.server_ip,
                            "a new server runs");
                    }
                    progress.report(Phase::Certifying);
                    // A CA call that fails is retried within the limit, like Query.
                    match certify(aws, &found, agent_ip).await {
                        Err(e) => {
                            tracing::warn!(error = %e, "no certificate for the new server yet; retrying");
                            last_note = Some(e.to_string());
                        }
                        Ok(files) => {
                            dialer
                                .retarget(tunnel_settings(cfg, aws, &files, &found)?)
                                .await;
                            let left = limit.saturating_sub(progress.elapsed());
                            let connected = connect(
                                dialer,
                                &found,
                                left.max(poll),
                                CONNECT_PATIENCE,
                                &mut progress,
                            )
                            .await;
                            match connected {
                                // Perhaps replaced again: the next Query says.
                                Err(e) => {
                                    tracing::warn!(error = %e, "the server does not answer; asking again");
                                    last_note = Some(e);
                                }
                                Ok(()) => {
                                    if same && agent_ip == certified_ip {
                                        eprintln!("fluidity: reconnected to the server");
                                        tracing::info!(server_arn = %found.server_arn,
                                            "reconnected with a renewed certificate");
                                    } else if same {
                                        eprintln!(
                                            "fluidity: reconnected to the server from this network's address ({agent_ip})"
                                        );
                                        tracing::info!(server_arn = %found.server_arn, %agent_ip,
                                            "reconnected with a certificate for the new address");
                                    } else {
                                        eprintln!("fluidity: ready again with the new server");
                                        tracing::info!(server_arn = %found.server_arn, "switched to the new server");
                                    }
                                    return Ok((found, agent_ip));
                                }
                            }
                        }
                    }
                }
                Err(_) => {
                    if q.desired_count == 0 {
                        // Sleep or someone stopped the service, but this agent still runs:
                        // the user wants a server.
                        tracing::info!("the service has no task wanted; waking it again");
                        need_wake = true;
                    }
                    last_note = q.detail.clone();
                }
            },
            Err(e) => {
                let e = CallFailed::of(&e);
                if e.lasting {
                    let msg = format!("Query failed: {e}");
                    eprintln!("fluidity: {msg}");
                    return Err(Error::Lifecycle(msg));
                }
                tracing::warn!(error = %e, "Query failed; retrying");
                last_note = Some(format!("Query failed: {e}"));
            }
        }
        progress.report(Phase::Gone);
        if progress.elapsed() + poll > limit {
            let mut msg = format!(
                "gave up after {}s without a usable server (the server went away and no new one came)",
                progress.elapsed().as_secs()
            );
            if let Some(n) = wake_error.or(last_note) {
                msg.push_str(&format!("; last note: {n}"));
            }
            eprintln!("fluidity: {msg}");
            return Err(Error::Lifecycle(format!(
                "the server did not come back: {msg}"
            )));
        }
        async_io::Timer::after(poll).await;
    }
}

/// The tunnel towards the located server: its IP (never written anywhere), its ARN as the
/// required CN, the dialled IP as the name its certificate must hold.
fn tunnel_settings(
    cfg: &AgentConfig,
    aws: &AwsRun,
    files: &CertFiles,
    located: &Located,
) -> Result<TunnelSettings> {
    let identity = Identity::load_as(&files.cert, &files.key, PeerRole::Client)?;
    let roots = CaRoots::load(&files.ca)?;
    let check = PeerCheck::cn(located.server_arn.clone());
    let credentials = match &aws.credentials {
        Some(make) => Some(make(&located.server_arn)?),
        None => None,
    };
    Ok(TunnelSettings {
        server: ServerAddr::Ip(SocketAddr::new(
            located.server_ip,
            aws.lifecycle.server_port,
        )),
        // WebPKI checks the dialled IP against the certificate's IP SANs.
        server_name: located.server_ip.to_string(),
        tls: tls::client_config(&identity, &roots, &check)?,
        ca_file: files.ca.clone(),
        peer_check: check,
        presented_cert: identity.cert_chain().first().cloned(),
        proto: Arc::new(fluidity_proto::Config {
            // Bounds the whole tunnel handshake, IAM credentials and verdict included.
            handshake_timeout: Duration::from_secs(cfg.iam.timeout_secs.max(1)),
            ..fluidity_proto::Config::default()
        }),
        connect_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
        credentials,
        min_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(5),
        // A server replaced is found again (`find_again`).
        server_may_move: true,
    })
}

/// Connects the dialer to `located` until it is up, `limit` has passed, or it has failed
/// [`GONE_AFTER_FAILURES`] times in a row (after at least `patience`): a server that does
/// not answer may have been replaced since Query named it, and the caller asks again. The
/// error says why it stopped.
async fn connect(
    dialer: &TunnelDialer,
    located: &Located,
    limit: Duration,
    patience: Duration,
    progress: &mut Progress,
) -> std::result::Result<(), String> {
    let started = std::time::Instant::now();
    let phase = Phase::Connecting {
        server_ip: located.server_ip,
    };
    loop {
        progress.report(phase.clone());
        match dialer.tunnel().await {
            Ok(_) => return Ok(()),
            Err(e)
                if started.elapsed() + Duration::from_secs(1) > limit
                    || (started.elapsed() >= patience
                        && dialer.consecutive_failures() >= GONE_AFTER_FAILURES) =>
            {
                return Err(format!(
                    "cannot connect to the server {} at {} ({}s): {e}",
                    located.server_arn,
                    located.server_ip,
                    started.elapsed().as_secs()
                ));
            }
            Err(e) => tracing::debug!(error = %e, "not connected yet"),
        }
        async_io::Timer::after(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn kill_is_called_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let k = KillOnce::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok("stopped".into())
        });
        assert!(k.kill("Ctrl-C"));
        assert!(!k.kill("exit"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn urls_and_state_dir() {
        let s = LifecycleSettings::default();
        let env = Env::from_pairs([("FLUIDITY_CONTROL_URL", "http://127.0.0.1:9000")]);
        let u = s.urls(&env).unwrap();
        assert_eq!(u.wake, "http://127.0.0.1:9000/wake");
        assert_eq!(u.ca, "http://127.0.0.1:9000/ca");
        let s2 = LifecycleSettings {
            kill_url: Some("https://k.lambda-url.eu-west-1.on.aws/".into()),
            ..LifecycleSettings::default()
        };
        assert_eq!(
            s2.urls(&env).unwrap().kill,
            "https://k.lambda-url.eu-west-1.on.aws/"
        );
        let err = s.urls(&Env::empty()).unwrap_err().to_string();
        assert!(err.contains("FLUIDITY_WAKE_URL"), "{err}");
        let env = Env::from_pairs([("HOME", "/home/u")]);
        assert_eq!(
            s.state_dir(&env),
            PathBuf::from("/home/u/.cache/fluidity/aws")
        );
        let parsed: LifecycleSettings = toml::from_str("wait_secs = 20").unwrap();
        assert_eq!(parsed.wait_secs, 20);
        assert_eq!(parsed.server_port, 8443);
        assert!(toml::from_str::<LifecycleSettings>("server_ip = \"1.2.3.4\"").is_err());
    }

    use fluidity_runtime_smol::pki::{generate_ca, issue_client, issue_server, CaBundle, SanEntry};
    use fluidity_server::health::Metrics;
    use fluidity_server::{Server, ServerConfig};

    use crate::proxy::{DialError, Dialer};

    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    /// The agent's certificate for `arn` and 127.0.0.1, with the CA, in `dir`.
    fn agent_files(dir: &std::path::Path, ca: &CaBundle, arn: &str) -> CertFiles {
        let agent_cert = issue_client(ca, arn, &["127.0.0.1".parse().unwrap()], YEAR).unwrap();
        write_agent_files(dir, ca, &agent_cert)
    }

    /// `cert` as the agent's certificate, with the CA, in `dir`.
    fn write_agent_files(
        dir: &std::path::Path,
        ca: &CaBundle,
        cert: &fluidity_runtime_smol::pki::CertifiedKeyPem,
    ) -> CertFiles {
        let files = CertFiles::in_dir(dir, "agent");
        std::fs::write(&files.cert, &cert.cert_pem).unwrap();
        std::fs::write(&files.key, &cert.key_pem).unwrap();
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        files
    }

    /// The one server of the tests that reconnect to it: at 127.0.0.2 for [`ARN`],
    /// admitting agents from `admitted`; the agent's run against the control host that
    /// `control` makes with the CA (giving up after `wait_secs`), and the server it knows.
    fn one_server(
        dir: &std::path::Path,
        ca: CaBundle,
        files: &CertFiles,
        admitted: &[&str],
        control: impl FnOnce(CaBundle) -> String,
        wait_secs: u64,
    ) -> (
        Arc<Server>,
        async_io::Async<std::net::TcpListener>,
        AwsRun,
        Located,
    ) {
        let mut server_ips = vec!["127.0.0.2"];
        server_ips.extend_from_slice(admitted);
        let (server, listener, port) =
            test_server(dir, &ca, "127.0.0.2", ARN, &server_ips, &files.ca);
        let control = control(ca);
        let aws = test_aws_with_control(port, &control, dir, wait_secs);
        let current = Located {
            server_ip: "127.0.0.2".parse().unwrap(),
            server_arn: ARN.to_owned(),
            agent_ip: None,
        };
        (server, listener, aws, current)
    }

    /// A server listening on `ip` with a certificate for `server_cn` and `server_ips`,
    /// admitting agents with CN = `server_cn`; returns it, its listener and its port.
    fn test_server(
        dir: &std::path::Path,
        ca: &CaBundle,
        ip: &str,
        server_cn: &str,
        server_ips: &[&str],
        client_ca: &std::path::Path,
    ) -> (Arc<Server>, async_io::Async<std::net::TcpListener>, u16) {
        let sans: Vec<SanEntry> = server_ips
            .iter()
            .map(|ip| SanEntry::Ip(ip.parse().unwrap()))
            .collect();
        let server_cert = issue_server(ca, &sans, server_cn, YEAR).unwrap();
        let (cert, key) = (
            dir.join(format!("s-{ip}.pem")),
            dir.join(format!("s-{ip}-key.pem")),
        );
        std::fs::write(&cert, &server_cert.cert_pem).unwrap();
        std::fs::write(&key, &server_cert.key_pem).unwrap();
        let server = Server::new(
            ServerConfig {
                listen: format!("{ip}:0").parse().unwrap(),
                cert,
                key,
                client_ca: client_ca.to_path_buf(),
                expected_client_cn: Some(server_cn.to_owned()),
                check_client_ip: true,
                ..ServerConfig::default()
            },
            Arc::new(Metrics::new()),
            None,
        )
        .unwrap();
        let listener = server.bind().unwrap();
        let port = listener.get_ref().local_addr().unwrap().port();
        (server, listener, port)
    }

    /// AWS mode settings with the server on `port`; the control host is never called.
    fn test_aws(port: u16) -> AwsRun {
        AwsRun {
            control: ControlClient::new(
                &fluidity_aws::AwsConfig::new(
                    "us-east-1",
                    Arc::new(fluidity_aws::Credentials::new("a", "b", None, None, "test")),
                    fluidity_aws::Endpoints::none(),
                    fluidity_aws::HttpClient::direct().unwrap(),
                ),
                ControlUrls::on_host("http://127.0.0.1:9"),
            ),
            lifecycle: LifecycleSettings {
                server_port: port,
                ..LifecycleSettings::default()
            },
            env: Env::empty(),
            credentials: None,
            quiet: true,
            wakes: Arc::default(),
        }
    }

    /// Runs `server` on `listener` while `body` runs on the same executor, then stops it;
    /// returns what `body` returns.
    fn with_server<T, F>(
        server: Arc<Server>,
        listener: async_io::Async<std::net::TcpListener>,
        body: impl FnOnce(Arc<Executor<'static>>) -> F,
    ) -> T
    where
        F: std::future::Future<Output = T>,
    {
        let ex = Arc::new(Executor::new());
        smol::block_on(ex.run(async {
            let (stop, task) = spawn_server(&ex, server, listener);
            let out = body(ex.clone()).await;
            drop(stop);
            task.await;
            out
        }))
    }

    /// Runs `server` on `listener` on `ex` until the returned sender is dropped; the task
    /// ends once the server has stopped.
    fn spawn_server(
        ex: &Arc<Executor<'static>>,
        server: Arc<Server>,
        listener: async_io::Async<std::net::TcpListener>,
    ) -> (async_channel::Sender<()>, smol::Task<()>) {
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let ex2 = ex.clone();
        let task = ex.spawn(async move {
            server
                .run(&ex2, listener, async move {
                    let _ = stopped.recv().await;
                })
                .await
        });
        (stop, task)
    }

    /// [`test_aws`] with the control host at `base`, the state in `dir`, Query every
    /// second for up to `wait_secs`.
    fn test_aws_with_control(
        port: u16,
        base: &str,
        dir: &std::path::Path,
        wait_secs: u64,
    ) -> AwsRun {
        let mut aws = test_aws(port);
        aws.control = ControlClient::new(
            &fluidity_aws::AwsConfig::new(
                "us-east-1",
                Arc::new(fluidity_aws::Credentials::new("a", "b", None, None, "test")),
                fluidity_aws::Endpoints::none(),
                fluidity_aws::HttpClient::direct().unwrap(),
            ),
            ControlUrls::on_host(base),
        );
        aws.lifecycle.state_dir = Some(dir.to_path_buf());
        aws.lifecycle.wait_secs = wait_secs;
        aws.lifecycle.poll_secs = 1;
        aws
    }

    /// A server in this process with a certificate for `server_cn` and `server_ips`, on
    /// 127.0.0.2, and an agent's tunnel settings for `located` with a certificate for
    /// `arn` and 127.0.0.1; returns the agent's verdict on the server.
    fn dial(server_cn: &str, server_ips: &[&str], arn: &str) -> std::result::Result<(), DialError> {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let files = agent_files(dir.path(), &ca, arn);
        let (server, listener, port) = test_server(
            dir.path(),
            &ca,
            "127.0.0.2",
            server_cn,
            server_ips,
            &files.ca,
        );
        let located = Located {
            server_ip: "127.0.0.2".parse().unwrap(),
            server_arn: arn.to_owned(),
            agent_ip: None,
        };
        let aws = test_aws(port);
        let settings = tunnel_settings(&AgentConfig::default(), &aws, &files, &located).unwrap();
        assert_eq!(
            settings.server,
            ServerAddr::Ip(SocketAddr::new(located.server_ip, port))
        );
        assert_eq!(settings.server_name, "127.0.0.2");
        assert_eq!(settings.peer_check, PeerCheck::cn(arn));

        with_server(server, listener, |ex| async move {
            let dialer = TunnelDialer::new(settings, ex);
            let verdict = Dialer::ready(&dialer).await;
            dialer.shutdown(Duration::from_millis(100)).await;
            verdict
        })
    }

    /// A server replaced by another (new ARN, new address, new port): the dialer counts
    /// the failed reconnects, and once retargeted with the new server's settings it
    /// reaches the new one, under the new identity check.
    #[test]
    fn a_retargeted_dialer_reaches_the_replacement_server() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let second = "arn:aws:ecs:us-east-1:123456789012:task/c/two";
        let files = agent_files(dir.path(), &ca, ARN);
        let (first_server, first_listener, first_port) = test_server(
            dir.path(),
            &ca,
            "127.0.0.2",
            ARN,
            &["127.0.0.2", "127.0.0.1"],
            &files.ca,
        );
        let first = Located {
            server_ip: "127.0.0.2".parse().unwrap(),
            server_arn: ARN.to_owned(),
            agent_ip: None,
        };
        let cfg = AgentConfig::default();
        let settings = tunnel_settings(&cfg, &test_aws(first_port), &files, &first).unwrap();

        let ex = Arc::new(Executor::new());
        smol::block_on(ex.run(async {
            let (stop_first, first_task) = spawn_server(&ex, first_server, first_listener);
            let dialer = TunnelDialer::new(settings, ex.clone());
            dialer.tunnel().await.expect("the first server");
            assert!(dialer.is_up());

            // The first server goes away.
            drop(stop_first);
            first_task.await;
            let mut errors = Vec::new();
            while dialer.consecutive_failures() < GONE_AFTER_FAILURES {
                if let Err(e) = dialer.tunnel().await {
                    errors.push(e);
                }
                async_io::Timer::after(Duration::from_millis(50)).await;
            }
            assert!(!dialer.is_up());
            assert!(errors.iter().any(|e| e.contains("127.0.0.2")), "{errors:?}");

            // Its replacement: another ARN and address. The agent's certificate for it.
            let files = agent_files(dir.path(), &ca, second);
            let (server, listener, port) = test_server(
                dir.path(),
                &ca,
                "127.0.0.4",
                second,
                &["127.0.0.4", "127.0.0.1"],
                &files.ca,
            );
            let (stop, task) = spawn_server(&ex, server, listener);
            let found = Located {
                server_ip: "127.0.0.4".parse().unwrap(),
                server_arn: second.to_owned(),
                agent_ip: None,
            };
            dialer
                .retarget(tunnel_settings(&cfg, &test_aws(port), &files, &found).unwrap())
                .await;
            assert_eq!(
                dialer.consecutive_failures(),
                0,
                "the old failures are forgotten"
            );
            assert_eq!(dialer.settings().peer_check, PeerCheck::cn(second));
            dialer.tunnel().await.expect("the replacement server");
            assert!(dialer.is_up());
            dialer.shutdown(Duration::from_millis(100)).await;
            drop(stop);
            task.await;
        }));
    }

    const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/c/one";

    /// Query's answer naming the server `arn` at `ip`, running, and the agent at 127.0.0.1.
    fn running(arn: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({"status": "running", "server_ip": ip, "server_arn": arn,
            "agent_public_ip": "127.0.0.1", "desired_count": 1, "task_status": "RUNNING"})
    }

    /// A stand-in control host on 127.0.0.1: Wake reports the agent seen at 127.0.0.1,
    /// Query answers `query(n)` to its `n`th call (from 0), the CA signs agent CSRs with
    /// `ca`, and anything else answers as Kill does. Returns its base URL.
    fn control_host(
        ca: CaBundle,
        query: impl Fn(usize) -> serde_json::Value + Send + 'static,
    ) -> String {
        control_host_counting_wakes(ca, query).0
    }

    /// [`control_host`], and how many times Wake was called.
    fn control_host_counting_wakes(
        ca: CaBundle,
        query: impl Fn(usize) -> serde_json::Value + Send + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use fluidity_aws::control::types::CertificateRequest;
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = wakes.clone();
        std::thread::spawn(move || {
            let mut queries = 0;
            for conn in listener.incoming().flatten() {
                let (path, body) = fluidity_runtime_smol::testing::read_http_request(&conn);
                if path == "/wake" {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let json = match path.as_str() {
                    "/wake" => serde_json::json!({"status": "starting",
                        "agent_public_ip_as_seen": "127.0.0.1", "desired_count": 1,
                        "changed": false}),
                    "/query" => {
                        queries += 1;
                        query(queries - 1)
                    }
                    "/ca" => {
                        let req: CertificateRequest = serde_json::from_slice(&body).unwrap();
                        let cert = fluidity_runtime_smol::pki::sign_csr(
                            &ca,
                            &req.csr,
                            fluidity_runtime_smol::pki::CertUsage::Client,
                            YEAR,
                        )
                        .unwrap();
                        serde_json::json!({"certificate": cert, "ca_certificate": ca.cert_pem(),
                            "not_after": 4_000_000_000u64})
                    }
                    _ => serde_json::json!({"status": "stopping", "desired_count": 0, "changed": true}),
                }
                .to_string();
                let mut w = conn;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
            }
        });
        (base, wakes)
    }

    /// The laptop moved to another network: its certificate names its old address
    /// (127.0.0.5), it now connects from 127.0.0.1, which Wake reports, and the server is
    /// the same task, which refuses the old certificate. The agent gets one for its new
    /// address and reconnects; before, it retried the old one until it gave up, and
    /// stopped the server on its way out.
    #[test]
    fn an_agent_whose_address_changed_is_certified_again_for_the_same_server() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let old = issue_client(&ca, ARN, &["127.0.0.5".parse().unwrap()], YEAR).unwrap();
        let files = write_agent_files(dir.path(), &ca, &old);
        let (server, listener, aws, current) = one_server(
            dir.path(),
            ca,
            &files,
            &["127.0.0.5"],
            |ca| control_host(ca, |_| running(ARN, "127.0.0.2")),
            10,
        );
        let cfg = AgentConfig::default();
        let settings = tunnel_settings(&cfg, &aws, &files, &current).unwrap();
        with_server(server, listener, |ex| async move {
            let dialer = TunnelDialer::new(settings, ex);
            let refused = dialer.tunnel().await.map(|_| ());
            assert!(refused.is_err(), "the old address's certificate is refused");
            let (found, agent_ip) =
                find_again(&cfg, &aws, &dialer, &current, "127.0.0.5".parse().unwrap())
                    .await
                    .expect("certified again and reconnected");
            assert_eq!(
                (found.server_arn.as_str(), agent_ip),
                (ARN, "127.0.0.1".parse().unwrap())
            );
            assert!(dialer.is_up());
            dialer.shutdown(Duration::from_millis(100)).await;
        });
    }

    /// While its tunnel is up, the agent calls Wake again every refresh period (not every
    /// turn of its watch, once a second), so that an agent address stored in the last
    /// hour is there when the server renews its certificate.
    #[test]
    fn an_agent_with_its_tunnel_up_stores_its_address_again() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let agent_ip: IpAddr = "127.0.0.1".parse().unwrap();
        let files = agent_files(dir.path(), &ca, ARN);
        let mut wakes = None;
        let (server, listener, aws, current) = one_server(
            dir.path(),
            ca,
            &files,
            &["127.0.0.1"],
            |ca| {
                let (control, counted) =
                    control_host_counting_wakes(ca, |_| running(ARN, "127.0.0.2"));
                wakes = Some(counted);
                control
            },
            8,
        );
        let wakes = wakes.unwrap();
        let cfg = AgentConfig::default();
        let settings = tunnel_settings(&cfg, &aws, &files, &current).unwrap();
        let counted = wakes.clone();
        with_server(server, listener, |ex| async move {
            let dialer = TunnelDialer::new(settings, ex.clone());
            assert!(dialer.tunnel().await.is_ok());
            let watched = async {
                let e = watch(
                    cfg.clone(),
                    aws.clone(),
                    dialer.clone(),
                    current,
                    agent_ip,
                    Duration::from_secs(2),
                )
                .await;
                panic!("the watch ended: {e}");
            };
            let stored_twice = async {
                while counted.load(Ordering::SeqCst) < 2 {
                    async_io::Timer::after(Duration::from_millis(50)).await;
                }
                // The next is 2 s after the second: a watch that called Wake at every turn
                // would have called it again within a second.
                async_io::Timer::after(Duration::from_secs(1)).await;
            };
            let limit = async {
                async_io::Timer::after(Duration::from_secs(30)).await;
                panic!("Wake was not called again within 30 s");
            };
            watched.or(stored_twice).or(limit).await;
        });
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
    }

    /// The agent's certificate ends while it runs (same server, same address): the next
    /// reconnection asks the CA for a new one instead of retrying the expired one until
    /// `wait_secs`, then giving up on the server.
    #[test]
    fn a_reconnection_renews_an_agent_certificate_that_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let agent_ip: IpAddr = "127.0.0.1".parse().unwrap();
        let short = issue_client(&ca, ARN, &[agent_ip], Duration::from_secs(2)).unwrap();
        let files = write_agent_files(dir.path(), &ca, &short);
        let (server, listener, aws, current) = one_server(
            dir.path(),
            ca,
            &files,
            &["127.0.0.1"],
            |ca| control_host(ca, |_| running(ARN, "127.0.0.2")),
            8,
        );
        let cfg = AgentConfig::default();
        let settings = tunnel_settings(&cfg, &aws, &files, &current).unwrap();
        with_server(server, listener, |ex| async move {
            let dialer = TunnelDialer::new(settings, ex.clone());
            // Past its end.
            async_io::Timer::after(Duration::from_secs(3)).await;
            assert!(dialer.tunnel().await.is_err(), "an ended certificate works");
            let (found, _) = find_again(&cfg, &aws, &dialer, &current, agent_ip)
                .await
                .expect("the agent renews its certificate and reconnects");
            assert_eq!(found.server_arn, ARN);
            assert!(dialer.tunnel().await.is_ok());
            let pem = std::fs::read_to_string(&files.cert).unwrap();
            assert_ne!(pem, short.cert_pem, "the certificate was not renewed");
        });
    }

    /// The server Query names at start-up is gone before the agent reaches it (its task
    /// replaced meanwhile: nothing listens at its address); the next Query names its
    /// replacement, which the agent certifies for and reaches. Before, the agent dialled
    /// the first address until `wait_secs` had passed, then stopped the service.
    #[test]
    fn a_server_gone_before_the_first_connection_is_looked_for_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let files = CertFiles::in_dir(dir.path(), "agent");
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        let (server, listener, port) = test_server(
            dir.path(),
            &ca,
            "127.0.0.2",
            ARN,
            &["127.0.0.2", "127.0.0.1"],
            &files.ca,
        );
        let gone = "arn:aws:ecs:us-east-1:123456789012:task/c/gone";
        let control = control_host(ca, move |n| match n {
            0 => running(gone, "127.0.0.6"),
            _ => running(ARN, "127.0.0.2"),
        });
        let aws = test_aws_with_control(port, &control, dir.path(), 60);
        let cfg = AgentConfig::default();
        with_server(server, listener, |ex| async move {
            let (dialer, located, _) = bring_up(&ex, &cfg, &aws)
                .await
                .expect("the replacement is reached");
            assert_eq!(located.server_arn, ARN);
            assert!(dialer.is_up());
            dialer.shutdown(Duration::from_millis(100)).await;
        });
    }

    /// A server with nothing listening at its address is a failure that may pass: clients
    /// are told that the agent reconnects, not that something must be fixed.
    #[test]
    fn a_server_not_listening_is_a_passing_failure() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA", YEAR).unwrap();
        let files = agent_files(dir.path(), &ca, ARN);
        let port = std::net::TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let located = Located {
            server_ip: "127.0.0.2".parse().unwrap(),
            server_arn: ARN.to_owned(),
            agent_ip: None,
        };
        let settings =
            tunnel_settings(&AgentConfig::default(), &test_aws(port), &files, &located).unwrap();
        let ex = Arc::new(Executor::new());
        let verdict = smol::block_on(ex.run(async {
            let dialer = TunnelDialer::new(settings, ex.clone());
            Dialer::ready(&dialer).await
        }));
        assert!(
            matches!(verdict, Err(DialError::TunnelDown(_))),
            "{verdict:?}"
        );
    }

    #[test]
    fn connects_only_to_this_arn_at_the_dialled_address() {
        dial(ARN, &["127.0.0.2", "127.0.0.1"], ARN).expect("the right server is accepted");

        // In AWS mode a certificate for another identity or address is most likely a
        // replaced server, which the agent finds by itself: clients are told it
        // reconnects, not that something must be fixed.
        let lasting = |e: DialError| match e {
            DialError::TunnelDown(why) => why,
            other => panic!("not a passing failure: {other}"),
        };
        let other = "arn:aws:ecs:us-east-1:123456789012:task/c/two";
        let err = lasting(dial(other, &["127.0.0.2", "127.0.0.1"], ARN).unwrap_err());
        assert!(
            err.contains(&format!("CN is \"{other}\", expected \"{ARN}\"")),
            "{err}"
        );

        let err = lasting(dial(ARN, &["127.0.0.9", "127.0.0.1"], ARN).unwrap_err());
        assert!(
            err.contains("certificate not valid for name \"127.0.0.2\""),
            "the dialled address is not in the server's SANs: {err}"
        );
        assert!(!err.contains("CN is"), "{err}");
    }
}
