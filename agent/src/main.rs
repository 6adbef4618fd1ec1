//! `fluidity`: the agent. A local proxy whose every connection goes through one mutually
//! authenticated TLS tunnel to `fluidity-server`.

// The argument docs below are clap's help text, read in a terminal, not rustdoc markup.
#![allow(rustdoc::bare_urls, rustdoc::broken_intra_doc_links)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use fluidity_agent::config::{AgentAuth, AgentConfig, AgentMode};
use fluidity_agent::error::{Error, Result};
use fluidity_agent::local::{self, LocalOptions};
use fluidity_agent::run;
use fluidity_agent::tunnel::TunnelDialer;
use fluidity_aws::Env;
use fluidity_runtime_smol::app::{self, LogFormat};
use fluidity_runtime_smol::listener::parse_listen_addr;
use fluidity_runtime_smol::pki::{init_dir, CertInitOptions, SanEntry};
use fluidity_server::egress::EgressRule;

/// Fluidity agent: a local proxy (HTTP, HTTPS via CONNECT, WebSocket, SOCKS5) that carries
/// every connection through one mutually authenticated TLS 1.3 tunnel to your server.
#[derive(Debug, Parser)]
#[command(name = "fluidity", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log format. What is logged comes from FLUIDITY_LOG: a level (debug), targets with
    /// levels (fluidity_agent=debug), or both, comma-separated; info when unset.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "FLUIDITY_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy against a configured server (the default command).
    Run(Box<RunArgs>),
    /// Try Fluidity on this machine: generate certificates, start a server on loopback
    /// and the proxy, all in this process.
    Local(LocalArgs),
    /// Certificate tools.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "FLUIDITY_CONFIG")]
    config: Option<PathBuf>,
    /// direct (dial --server) or aws (wake an on-demand server; see [lifecycle])
    /// [default: direct].
    #[arg(long, value_enum, env = "FLUIDITY_MODE")]
    mode: Option<AgentMode>,
    /// Proxy listener, IP:port or localhost:port [default: 127.0.0.1:8080]; non-loopback
    /// needs proxy credentials.
    #[arg(long, env = "FLUIDITY_LISTEN", value_parser = parse_listen_addr)]
    listen: Option<SocketAddr>,
    /// Server address host:port [default: 127.0.0.1:8443].
    #[arg(long, env = "FLUIDITY_SERVER")]
    server: Option<String>,
    /// Name or IP the server certificate must be valid for [default: the server's host].
    #[arg(long, env = "FLUIDITY_SERVER_NAME")]
    server_name: Option<String>,
    /// Agent certificate, PEM [default: client.pem].
    #[arg(long, env = "FLUIDITY_CERT")]
    cert: Option<PathBuf>,
    /// Agent private key, PEM [default: client-key.pem].
    #[arg(long, env = "FLUIDITY_KEY")]
    key: Option<PathBuf>,
    /// CA that issued the server certificate, PEM [default: ca.pem].
    #[arg(long, env = "FLUIDITY_CA")]
    ca: Option<PathBuf>,
    /// Username proxy clients must present.
    #[arg(long, env = "FLUIDITY_PROXY_USERNAME")]
    proxy_username: Option<String>,
    /// Password proxy clients must present (prefer the environment variable).
    #[arg(long, env = "FLUIDITY_PROXY_PASSWORD", hide_env_values = true)]
    proxy_password: Option<String>,
    /// Tunnel authentication beyond the client certificate: none, or iam (sign an STS
    /// request with the AWS credential chain) [default: none].
    #[arg(long, value_enum, env = "FLUIDITY_AUTH")]
    auth: Option<AgentAuth>,
    /// AWS region [default: AWS_REGION, AWS_DEFAULT_REGION, the profile's region; in AWS
    /// mode then the function URLs' region].
    #[arg(long, env = "FLUIDITY_AWS_REGION")]
    region: Option<String>,
    /// AWS profile of the shared credentials and config files [default: AWS_PROFILE].
    #[arg(long)]
    aws_profile: Option<String>,
    /// Role to assume on top of the AWS credential chain.
    #[arg(long, env = "FLUIDITY_IAM_ROLE_ARN")]
    iam_role_arn: Option<String>,
    /// STS endpoint to sign for; must equal the server's [default: AWS_ENDPOINT_URL_STS,
    /// AWS_ENDPOINT_URL, else https://sts.REGION.amazonaws.com].
    #[arg(long, env = "FLUIDITY_STS_ENDPOINT")]
    sts_endpoint: Option<String>,
    /// The server's IAM server id (its certificate CN unless it sets one)
    /// [default: expected_server_cn].
    #[arg(long, env = "FLUIDITY_IAM_SERVER_ID")]
    iam_server_id: Option<String>,
    /// Seconds to get credentials and hear the server's IAM verdict [default: 30].
    #[arg(long, env = "FLUIDITY_AUTH_TIMEOUT_SECS")]
    auth_timeout_secs: Option<u64>,
    /// Executor threads, 0 for one per CPU [default: 1].
    #[arg(long, env = "FLUIDITY_THREADS")]
    threads: Option<usize>,
}

#[derive(Debug, Args)]
struct LocalArgs {
    /// Certificate folder [default: $XDG_CACHE_HOME/fluidity/local, else
    /// ~/.cache/fluidity/local]. Local mode renews the certificates of a folder it filled
    /// itself (it writes made-by-fluidity-local.txt there) and never replaces others.
    #[arg(long, env = "FLUIDITY_LOCAL_DIR")]
    dir: Option<PathBuf>,
    /// Proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080", env = "FLUIDITY_LISTEN", value_parser = parse_listen_addr)]
    listen: SocketAddr,
    /// The in-process server's listener (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_listen_addr)]
    server_listen: SocketAddr,
    /// Egress rule for the in-process server, repeatable. Local mode allows this machine
    /// (127.0.0.1 and ::1) on top of the server's default policy; deny_cidrs=127.0.0.0/8,::1
    /// takes that back, allow_private=true opens private networks.
    #[arg(long = "egress", value_name = "KEY=VALUE")]
    egress: Vec<EgressRule>,
    /// Username proxy clients must present (other users of this machine can reach its
    /// loopback addresses too) [default: none].
    #[arg(long, env = "FLUIDITY_PROXY_USERNAME")]
    proxy_username: Option<String>,
    /// Password proxy clients must present (prefer the environment variable).
    #[arg(long, env = "FLUIDITY_PROXY_PASSWORD", hide_env_values = true)]
    proxy_password: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a private CA and server and agent certificates in a folder.
    Init(CertsInitArgs),
}

#[derive(Debug, Args)]
struct CertsInitArgs {
    /// Folder to write ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem,
    /// client-key.pem into.
    #[arg(long)]
    dir: PathBuf,
    /// Server certificate names: DNS names or IPs, repeatable
    /// [default: localhost, 127.0.0.1, ::1].
    #[arg(long = "server-name")]
    server_names: Vec<SanEntry>,
    /// Server certificate CN, which an IAM server also takes as its id [default: the first
    /// --server-name, else localhost].
    #[arg(long)]
    server_cn: Option<String>,
    /// Agent certificate CN [default: fluidity-agent].
    #[arg(long)]
    client_cn: Option<String>,
    /// Agent certificate IP SANs, repeatable [default: 127.0.0.1, ::1].
    #[arg(long = "client-ip")]
    client_ips: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli: Cli = app::parse_cli();
    app::init_logging(cli.log_format, "info");
    let result = match cli.command {
        None => run_agent(cli.run, cli.log_format),
        Some(Command::Run(args)) => run_agent(*args, cli.log_format),
        Some(Command::Local(args)) => run_local(args),
        Some(Command::Certs(CertsCommand::Init(args))) => certs_init(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            app::report_exit("fluidity", cli.log_format, &e);
            ExitCode::FAILURE
        }
    }
}

fn agent_config(args: RunArgs) -> Result<AgentConfig> {
    let mut cfg = match &args.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(v) = args.mode {
        cfg.mode = v;
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.server {
        cfg.server = v;
    }
    if let Some(v) = args.server_name {
        cfg.server_name = Some(v);
    }
    if let Some(v) = args.cert {
        cfg.cert = v;
    }
    if let Some(v) = args.key {
        cfg.key = v;
    }
    if let Some(v) = args.ca {
        cfg.ca = v;
    }
    if let Some(v) = args.proxy_username {
        cfg.proxy_username = Some(v);
    }
    if let Some(v) = args.proxy_password {
        cfg.proxy_password = Some(v);
    }
    if let Some(v) = args.auth {
        cfg.auth = v;
    }
    if let Some(v) = args.region {
        cfg.aws.region = Some(v);
    }
    if let Some(v) = args.aws_profile {
        cfg.aws.profile = Some(v);
    }
    if let Some(v) = args.iam_role_arn {
        cfg.aws.iam_role_arn = Some(v);
    }
    if let Some(v) = args.sts_endpoint {
        cfg.aws.sts_endpoint = Some(v);
    }
    if let Some(v) = args.iam_server_id {
        cfg.iam.server_id = Some(v);
    }
    if let Some(v) = args.auth_timeout_secs {
        cfg.iam.timeout_secs = v;
    }
    if let Some(v) = args.threads {
        cfg.threads = v;
    }
    // Checked before any mode starts its threads.
    app::check_threads(cfg.threads).map_err(Error::Config)?;
    Ok(cfg)
}

fn run_agent(args: RunArgs, log_format: LogFormat) -> Result<()> {
    let cfg = agent_config(args)?;
    if cfg.mode == AgentMode::Aws {
        // Progress lines would break JSON logs; they are log events there.
        return fluidity_agent::aws::run_configured(cfg, log_format == LogFormat::Json);
    }
    let proxy_cfg = run::proxy_config(&cfg)?;
    let credentials = run::credential_source(&cfg, &Env::process())?;
    let settings = run::tunnel_settings(&cfg, credentials)?;
    let listener = run::bind(cfg.listen)?;
    app::run(app::threads(cfg.threads), |ex| async move {
        let dialer = TunnelDialer::new(settings, ex.clone());
        // The bound address: port 0 picks one.
        let listen = listener.local_addr().unwrap_or(cfg.listen);
        tracing::info!(%listen, server = %cfg.server, "fluidity proxy listening");
        // The first tunnel is made beside the proxy, not before it: clients are served
        // (they wait for that attempt) and a stop is heard from the start, not only once
        // the attempt ends, up to a connect timeout and a handshake later.
        let first = dialer.clone();
        ex.spawn(async move {
            if let Err(e) = first.tunnel().await {
                tracing::warn!(error = %e, "server not reachable yet; will retry when a client connects");
            }
        })
        .detach();
        run::serve(&ex, listener, dialer, proxy_cfg, app::shutdown_signal()).await;
    });
    Ok(())
}

fn run_local(args: LocalArgs) -> Result<()> {
    let opts = LocalOptions {
        dir: args.dir.unwrap_or_else(local::default_dir),
        listen: args.listen,
        server_listen: args.server_listen,
        egress: args.egress,
        proxy_username: args.proxy_username,
        proxy_password: args.proxy_password,
    };
    app::run(app::default_threads(), |ex| async move {
        local::run_local(&ex, opts, app::shutdown_signal()).await
    })
}

fn certs_init(args: CertsInitArgs) -> Result<()> {
    let mut opts = CertInitOptions {
        validity_days: args.days,
        force: args.force,
        ..CertInitOptions::default()
    };
    // The CN follows the name the server is known by, so that the IAM server id (the CN
    // by default) is the name agents dial.
    if let Some(first) = args.server_names.first() {
        opts.server_cn = first.to_string();
    }
    if !args.server_names.is_empty() {
        opts.server_names = args.server_names;
    }
    if let Some(cn) = args.server_cn {
        opts.server_cn = cn;
    }
    if let Some(cn) = args.client_cn {
        opts.client_cn = cn;
    }
    if !args.client_ips.is_empty() {
        opts.client_ips = args.client_ips;
    }
    let paths = init_dir(&args.dir, &opts)?;
    println!(
        "wrote {}, {}, {}, {}, {}, {}",
        paths.ca_cert.display(),
        paths.ca_key.display(),
        paths.server_cert.display(),
        paths.server_key.display(),
        paths.client_cert.display(),
        paths.client_key.display()
    );
    Ok(())
}
