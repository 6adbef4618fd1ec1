//! Local mode: certificates in a cache folder, a server on loopback and the agent proxy,
//! all in one process. The embedded default for trying Fluidity on one machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use fluidity_runtime_smol::pki::{self, ensure_dir, CertInitOptions, CertPaths, EnsureOutcome};
use fluidity_runtime_smol::tls::Identity;
use fluidity_runtime_smol::PeerRole;
use fluidity_server::egress::{Cidr, EgressRule};
use fluidity_server::health::Metrics;
use fluidity_server::{Server, ServerConfig};
use smol::Executor;

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::proxy::ProxyConfig;
use crate::run;
use crate::tunnel::TunnelDialer;

/// Settings of local mode.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Where certificates are generated and kept.
    pub dir: PathBuf,
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The in-process server's listener (port 0 picks a free port).
    pub server_listen: SocketAddr,
    /// Egress rules for the in-process server, applied after [`LOCAL_ALLOWED`] is
    /// allowed (a deny rule takes precedence over it).
    pub egress: Vec<EgressRule>,
    /// Username proxy clients must present, with `proxy_password` (other users of this
    /// machine reach its loopback addresses too).
    pub proxy_username: Option<String>,
    /// Password proxy clients must present, with `proxy_username`.
    pub proxy_password: Option<String>,
}

/// What local mode allows on top of the server's default egress policy: this machine's
/// loopback addresses, since the server runs on the same machine as the user. Private
/// networks and the other default-denied ranges stay refused.
pub const LOCAL_ALLOWED: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// The default certificate folder: `$XDG_CACHE_HOME/fluidity/local`, else
/// `~/.cache/fluidity/local`, else `./.fluidity-local`.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("fluidity").join("local");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h)
            .join(".cache")
            .join("fluidity")
            .join("local");
    }
    PathBuf::from(".fluidity-local")
}

/// Runs local mode until `shutdown` completes.
pub async fn run_local(
    ex: &Arc<Executor<'static>>,
    opts: LocalOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    // Local mode takes no proxy credentials, which any other address would need.
    if !opts.listen.ip().to_canonical().is_loopback() {
        return Err(Error::Config(format!(
            "local mode listens on a loopback address only, not {}; to serve other machines \
             run `fluidity run` with a server and proxy_username and proxy_password",
            opts.listen
        )));
    }
    // Its certificate names localhost, 127.0.0.1 and ::1, and the agent dials the address
    // the server binds: anything else could not work (and 0.0.0.0 would open the server
    // to the network).
    let server_ip = opts.server_listen.ip().to_canonical();
    if !LOCAL_ALLOWED.contains(&server_ip) {
        return Err(Error::Config(format!(
            "local mode's server listens on 127.0.0.1 or ::1 (any port), the addresses its \
             certificate names, not {}",
            opts.server_listen
        )));
    }
    // A set someone made for a server elsewhere (`certs init --server-name vpn…`) would
    // fail every tunnel on the certificate's names; it is refused before anything could
    // renew it. (A damaged one is left to ensure_dir, which says what is wrong.)
    let paths = CertPaths::in_dir(&opts.dir);
    let complete = paths.files().iter().all(|f| f.is_file());
    if complete {
        // Nothing in a folder others may have filled is read or written.
        pki::check_private_dir(&opts.dir)?;
        if let Ok(names) =
            Identity::load_as(&paths.server_cert, &paths.server_key, PeerRole::Server)
                .map_err(|_| ())
                .and_then(|id| id.names().map_err(|_| ()))
        {
            if !names.ip_sans.contains(&server_ip) {
                return Err(Error::Config(format!(
                    "the server certificate {} is not valid for {server_ip}, where local \
                     mode's server listens (it names {}): local mode needs a set made for \
                     this machine; give it a folder of its own (--dir){}",
                    paths.server_cert.display(),
                    names
                        .dns_sans
                        .iter()
                        .cloned()
                        .chain(names.ip_sans.iter().map(ToString::to_string))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if opts.dir == default_dir() {
                        ""
                    } else {
                        ", or leave out --dir"
                    }
                )));
            }
        }
    }
    // The default folder is local mode's own, marked or not (sets made before the marker
    // was have none): only a folder given with --dir must carry the mark to be renewed.
    if complete && !pki::is_local_dir(&opts.dir) && opts.dir == default_dir() {
        pki::mark_local_dir(&opts.dir)?;
    }
    let own = pki::is_local_dir(&opts.dir);
    let (paths, outcome) =
        ensure_dir(&opts.dir, &CertInitOptions::default()).map_err(|source| match source {
            // A damaged file among the ones local mode made: making them anew fixes it.
            // Anything else (a folder it cannot write, one holding other files, which it
            // never overwrites) is reported as it is.
            fluidity_runtime_smol::Error::BadPem { .. }
            | fluidity_runtime_smol::Error::KeyMismatch { .. }
                if own =>
            {
                Error::LocalCertificates {
                    dir: opts.dir.clone(),
                    source,
                }
            }
            other => other.into(),
        })?;
    match outcome {
        EnsureOutcome::Created => {
            tracing::info!(dir = %opts.dir.display(), "generated certificates")
        }
        EnsureOutcome::Renewed => tracing::info!(dir = %opts.dir.display(), "renewed certificates"),
        EnsureOutcome::Kept => {
            tracing::info!(dir = %opts.dir.display(), "using cached certificates")
        }
    }
    let mut scfg = ServerConfig {
        listen: opts.server_listen,
        cert: paths.server_cert.clone(),
        key: paths.server_key.clone(),
        client_ca: paths.ca_cert.clone(),
        ..ServerConfig::default()
    };
    for ip in LOCAL_ALLOWED {
        scfg.egress = scfg.egress.allowing(Cidr::host(ip));
    }
    for rule in &opts.egress {
        scfg.egress.apply(rule.clone());
    }
    let server = Server::new(scfg, Arc::new(Metrics::new()), None)?;
    let listener = server.bind()?;
    let server_addr = listener
        .get_ref()
        .local_addr()
        .map_err(crate::error::Error::Io)?;
    let (stop_server, server_stopped) = async_channel::bounded::<()>(1);
    let server_task = {
        let ex2 = ex.clone();
        ex.spawn(async move {
            server
                .run(&ex2, listener, async move {
                    let _ = server_stopped.recv().await;
                })
                .await
        })
    };

    let acfg = AgentConfig {
        listen: opts.listen,
        server: server_addr.to_string(),
        server_name: Some(server_addr.ip().to_string()),
        cert: paths.client_cert.clone(),
        key: paths.client_key.clone(),
        ca: paths.ca_cert.clone(),
        proxy_username: opts.proxy_username.clone(),
        proxy_password: opts.proxy_password.clone(),
        ..AgentConfig::default()
    };
    let proxy_cfg = ProxyConfig {
        local_server: true,
        ..run::proxy_config(&acfg)?
    };
    let settings = run::tunnel_settings(&acfg, None)?;
    let listener = run::bind(opts.listen)?;
    let listen = listener.local_addr().map_err(crate::error::Error::Io)?;
    let dialer = TunnelDialer::new(settings, ex.clone());
    if let Err(e) = dialer.tunnel().await {
        tracing::error!(error = %e, "the local server is not reachable");
    }
    let egress = if opts.egress.is_empty() {
        "this machine (127.0.0.1, ::1) and public addresses; private networks are refused \
         unless allowed with --egress"
            .to_owned()
    } else {
        let rules: Vec<String> = opts.egress.iter().map(ToString::to_string).collect();
        format!(
            "this machine (127.0.0.1, ::1) and public addresses, then your rules: {} (a deny \
             rule wins over any allow)",
            rules.join(" ")
        )
    };
    let (user, auth) = match &opts.proxy_username {
        Some(u) => (
            format!("{u}:PASSWORD@"),
            " (with the proxy username and password)",
        ),
        None => (String::new(), ""),
    };
    println!(
        "fluidity local mode: proxy on {listen} (HTTP, HTTPS via CONNECT, WebSocket, SOCKS5), \
         server on {server_addr}, certificates in {}\n\
         try:   curl -x http://{user}{listen} https://example.com/\n\
         or:    curl --socks5-hostname {user}{listen} https://example.com/\n\
         browser: set the HTTP and HTTPS proxy (or SOCKS v5 with remote DNS) to {listen}{auth}\n\
         egress: {egress}\n\
         stop with Ctrl-C",
        opts.dir.display()
    );
    run::serve(ex, listener, dialer, proxy_cfg, shutdown).await;
    drop(stop_server);
    server_task.await;
    Ok(())
}
