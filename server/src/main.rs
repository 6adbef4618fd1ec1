//! `fluidity-server`: the cloud end of the Fluidity tunnel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fluidity_aws::Env;
use fluidity_runtime_smol::app::{self, LogFormat};
use fluidity_runtime_smol::listener::parse_listen_addr;
use fluidity_server::config::{AuthMode, ServerMode};
use fluidity_server::egress::EgressRule;
use fluidity_server::health::{serve_health, Metrics};
use fluidity_server::iam::IamAuthenticator;
use fluidity_server::serve::Authenticator;
use fluidity_server::{Error, Server, ServerConfig};
use futures_lite::FutureExt;

/// Terminates Fluidity tunnels from agents and makes their outbound connections.
///
/// Settings come from the config file (TOML; see docs in README.md), then from these
/// flags and their environment variables, which win.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "FLUIDITY_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// Tunnel listener [default: 0.0.0.0:8443].
    #[arg(long, env = "FLUIDITY_SERVER_LISTEN", value_parser = parse_listen_addr)]
    listen: Option<SocketAddr>,
    /// Health and metrics listener (/healthz, /metrics) [default: 0.0.0.0:8080].
    #[arg(long, env = "FLUIDITY_SERVER_HEALTH_LISTEN", value_parser = parse_listen_addr)]
    health_listen: Option<SocketAddr>,
    /// Server certificate chain, PEM [default: server.pem].
    #[arg(long, env = "FLUIDITY_SERVER_CERT")]
    cert: Option<PathBuf>,
    /// Server private key, PEM [default: server-key.pem].
    #[arg(long, env = "FLUIDITY_SERVER_KEY")]
    key: Option<PathBuf>,
    /// CA certificate that issues agent certificates, PEM [default: ca.pem].
    #[arg(long, env = "FLUIDITY_SERVER_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// Tunnels served at once [default: 64].
    #[arg(long)]
    max_tunnels: Option<usize>,
    /// Streams per tunnel [default: 256].
    #[arg(long)]
    max_streams: Option<u32>,
    /// Executor threads, 0 for one per CPU [default: 1].
    #[arg(long, env = "FLUIDITY_SERVER_THREADS")]
    threads: Option<usize>,
    /// Authentication beyond the client certificate [default: mtls].
    #[arg(long, value_enum, env = "FLUIDITY_SERVER_AUTH")]
    auth: Option<AuthMode>,
    /// standalone (certificates from files) or aws (discover, certificate from the CA
    /// function; see [aws]) [default: standalone].
    #[arg(long, value_enum, env = "FLUIDITY_SERVER_MODE")]
    mode: Option<ServerMode>,
    /// IAM: a principal admitted (exact ARN, account:123456789012, or an ARN prefix
    /// ending in *); repeatable or comma-separated; replaces [iam] allowed_principals.
    #[arg(
        long = "iam-allow",
        value_name = "PRINCIPAL",
        env = "FLUIDITY_SERVER_IAM_ALLOW",
        value_delimiter = ','
    )]
    iam_allow: Vec<String>,
    /// IAM: this server's id as agents must name it [default: the certificate's CN].
    #[arg(long, env = "FLUIDITY_SERVER_IAM_SERVER_ID")]
    iam_server_id: Option<String>,
    /// IAM: STS endpoint signed requests are forwarded to [default: AWS_ENDPOINT_URL_STS,
    /// AWS_ENDPOINT_URL, else https://sts.REGION.amazonaws.com].
    #[arg(long, env = "FLUIDITY_SERVER_STS_ENDPOINT")]
    sts_endpoint: Option<String>,
    /// IAM: AWS region for the default STS endpoint [default: AWS_REGION,
    /// AWS_DEFAULT_REGION, the shared config file].
    #[arg(long, env = "FLUIDITY_SERVER_REGION")]
    region: Option<String>,
    /// Egress rule, repeatable: allow_cidrs=127.0.0.1/32, deny_cidrs=..., allow_hosts=*.example.com,
    /// deny_hosts=..., allow_ports=80,443, deny_ports=25, allow_private=true.
    #[arg(long = "egress", value_name = "KEY=VALUE")]
    egress: Vec<EgressRule>,
    /// Log format. What is logged comes from FLUIDITY_LOG: a level (debug), targets with
    /// levels (fluidity_server=debug), or both, comma-separated; info when unset.
    #[arg(long, value_enum, default_value = "text", env = "FLUIDITY_LOG_FORMAT")]
    log_format: LogFormat,
}

fn config(cli: &Cli) -> Result<ServerConfig, Error> {
    let mut cfg = match &cli.config {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.health_listen {
        cfg.health_listen = v;
    }
    if let Some(v) = &cli.cert {
        cfg.cert = v.clone();
    }
    if let Some(v) = &cli.key {
        cfg.key = v.clone();
    }
    if let Some(v) = &cli.client_ca {
        cfg.client_ca = v.clone();
    }
    if let Some(v) = cli.max_tunnels {
        cfg.max_tunnels = v;
    }
    if let Some(v) = cli.max_streams {
        cfg.max_streams = v;
    }
    if let Some(v) = cli.threads {
        cfg.threads = v;
    }
    if let Some(v) = cli.auth {
        cfg.auth = v;
    }
    if let Some(v) = cli.mode {
        cfg.mode = v;
    }
    if !cli.iam_allow.is_empty() {
        cfg.iam.allowed_principals = cli.iam_allow.clone();
    }
    if let Some(v) = &cli.iam_server_id {
        cfg.iam.server_id = Some(v.clone());
    }
    if let Some(v) = &cli.sts_endpoint {
        cfg.iam.sts_endpoint = Some(v.clone());
    }
    if let Some(v) = &cli.region {
        cfg.iam.region = Some(v.clone());
    }
    for rule in &cli.egress {
        cfg.egress.apply(rule.clone());
    }
    app::check_threads(cfg.threads).map_err(Error::Config)?;
    for (name, value) in [
        ("max_tunnels", cfg.max_tunnels),
        ("max_handshakes", cfg.max_handshakes),
        ("max_handshakes_per_source", cfg.max_handshakes_per_source),
        ("max_streams", cfg.max_streams as usize),
    ] {
        if value == 0 {
            return Err(Error::Config(format!(
                "{name} = 0 would turn every agent away; give at least 1"
            )));
        }
    }
    // Port 0 asks the system for a free port, which can never clash.
    if cfg.listen.port() == cfg.health_listen.port()
        && cfg.listen.port() != 0
        && (cfg.listen.ip() == cfg.health_listen.ip()
            || cfg.listen.ip().is_unspecified()
            || cfg.health_listen.ip().is_unspecified())
    {
        return Err(Error::Config(format!(
            "listen ({}) and health_listen ({}) overlap; give them different ports",
            cfg.listen, cfg.health_listen
        )));
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli: Cli = app::parse_cli();
    app::init_logging(cli.log_format, "info");
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            app::report_exit("fluidity-server", cli.log_format, &e);
            return ExitCode::from(2);
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            app::report_exit("fluidity-server", cli.log_format, &e);
            ExitCode::FAILURE
        }
    }
}

fn run(mut cfg: ServerConfig) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    // AWS mode finds out who it is and gets its certificate before anything listens.
    let aws = match cfg.mode {
        ServerMode::Standalone => None,
        ServerMode::Aws => {
            let settings = cfg.aws.clone();
            Some(fluidity_server::aws::start_up(
                &mut cfg,
                &settings,
                &Env::process(),
            )?)
        }
    };
    let health_addr = cfg.health_listen;
    let threads = app::threads(cfg.threads);
    let authenticator: Option<Arc<dyn Authenticator>> = match cfg.auth {
        AuthMode::Mtls => None,
        AuthMode::Iam => {
            let iam = IamAuthenticator::from_config(&cfg, &Env::process())?;
            let vc = iam.verifier_config();
            tracing::info!(server_id = %vc.server_id, sts = %vc.sts_endpoint,
                allowed = vc.allowed.len(), "IAM authentication on");
            Some(Arc::new(iam))
        }
    };
    let server = Server::new(cfg, metrics.clone(), authenticator)?;
    let listener = server.bind()?;
    let health = match smol::block_on(async_net::TcpListener::bind(health_addr)) {
        Ok(l) => Some(l),
        // A server still draining keeps answering health checks on its port until it
        // exits. Its replacement serves tunnels at once (the old one no longer takes
        // them) and health checks once the port is free.
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && held_by_a_draining_server(health_addr) =>
        {
            tracing::warn!(addr = %health_addr,
                "the health port is in use (by a fluidity-server still draining?); serving \
                 tunnels now, /healthz and /metrics once the port is free");
            None
        }
        Err(source) => {
            return Err(Error::Bind {
                addr: health_addr,
                source,
            })
        }
    };
    app::run(threads, |ex| async move {
        // Dropped (cancelled) when the server has stopped.
        let _publisher = aws
            .as_ref()
            .map(|a| ex.spawn(a.publish_metrics(metrics.clone())));
        let _renewer = aws
            .as_ref()
            .map(|a| ex.spawn(a.keep_certificate_renewed(server.clone())));
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        // The health endpoint runs on this (main) task: it is not Send.
        let stopped = stop_rx.clone();
        let health = async move {
            let listener = match health {
                Some(l) => Some(l),
                None => {
                    bind_when_free(health_addr)
                        .or(async {
                            let _ = stopped.recv().await;
                            None
                        })
                        .await
                }
            };
            if let Some(listener) = listener {
                serve_health(listener, metrics, async move {
                    let _ = stop_rx.recv().await;
                })
                .await;
            }
        };
        let tunnels = async {
            server.run(&ex, listener, app::shutdown_signal()).await;
            drop(stop_tx);
        };
        futures_lite::future::zip(tunnels, health).await;
    });
    Ok(())
}

/// Binds `addr` once the process holding it lets go (checked every 250 ms); `None` if
/// binding fails for another reason, which is logged.
async fn bind_when_free(addr: SocketAddr) -> Option<async_net::TcpListener> {
    loop {
        async_io::Timer::after(std::time::Duration::from_millis(250)).await;
        match async_net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "health endpoint listening");
                return Some(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for health checks");
                return None;
            }
        }
    }
}

/// Whether what holds `addr` is a fluidity-server that is draining: its `/healthz`
/// answers `503` with `draining` (asked with one-second limits). Anything else holding the
/// port is a conflict to report, not to wait out.
fn held_by_a_draining_server(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let limit = std::time::Duration::from_secs(1);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, limit) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: fluidity\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.take(4096).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer.starts_with("HTTP/1.1 503") && answer.contains("draining")
}
