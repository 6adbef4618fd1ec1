//! Running the agent: the proxy listener in front of a [`TunnelDialer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fluidity_runtime_smol::listener::{out_of_descriptors, AcceptErrors};
use fluidity_runtime_smol::relay::{reset_on_close, take_socket_error, Connections};
use fluidity_runtime_smol::tls::{self, CaRoots, Identity, PeerCheck};
use fluidity_runtime_smol::PeerRole;
use futures_lite::FutureExt;
use smol::Executor;

use fluidity_aws::Env;

use crate::config::{AgentAuth, AgentConfig};
use crate::error::{Error, Result};
use crate::iam::IamSigner;
use crate::proxy::{self, Credentials, ProxyConfig};
use crate::tunnel::{CredentialSource, ServerAddr, TunnelDialer, TunnelSettings};

/// The tunnel credentials `cfg` asks for: `None` for `auth = "none"`; for `auth = "iam"`,
/// an [`IamSigner`] over the default AWS credential chain read from `env`.
pub fn credential_source(cfg: &AgentConfig, env: &Env) -> Result<Option<CredentialSource>> {
    match cfg.auth {
        AgentAuth::None => Ok(None),
        AgentAuth::Iam => {
            let signer = IamSigner::from_config(cfg, env)?;
            tracing::info!(server_id = %signer.server_id(), sts = %signer.sts_endpoint(),
                region = %signer.region(), "IAM tunnel authentication on");
            Ok(Some(signer.into_source()))
        }
    }
}

/// Builds the tunnel settings from the configuration: loads certificates and parses the
/// server's address (its name is looked up at each connection attempt; targets are never
/// looked up here).
pub fn tunnel_settings(
    cfg: &AgentConfig,
    credentials: Option<CredentialSource>,
) -> Result<TunnelSettings> {
    if cfg.auth == AgentAuth::Iam && credentials.is_none() {
        return Err(Error::Config(
            "auth = \"iam\" needs a credential source (see run::credential_source)".into(),
        ));
    }
    let server_name = cfg
        .server_name
        .clone()
        .unwrap_or_else(|| cfg.server_host().to_owned());
    // Checked per connection too, but a name no connection can use is a setting to fix,
    // not a server to wait for.
    if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return Err(Error::Config(match cfg.server_name {
            Some(_) => format!(
                "server_name {server_name:?} (--server-name, FLUIDITY_SERVER_NAME) is not a \
                 DNS name or an IP address; give the name or address the server's \
                 certificate is issued for, or leave it out to use the host of server"
            ),
            None => format!(
                "server {:?} (--server, FLUIDITY_SERVER): its host {server_name:?} is not a \
                 DNS name or an IP address",
                cfg.server
            ),
        }));
    }
    let identity = Identity::load_as(&cfg.cert, &cfg.key, PeerRole::Client).map_err(|source| {
        Error::Certificates {
            what: "the agent's certificate and key (cert, key)",
            source,
        }
    })?;
    let roots = CaRoots::load(&cfg.ca).map_err(|source| Error::Certificates {
        what: "the CA certificate that signed the server's (ca)",
        source,
    })?;
    let check = PeerCheck {
        expected_cn: cfg.expected_server_cn.clone(),
        expected_ip: None,
    };
    let tls = tls::client_config(&identity, &roots, &check)?;
    let server = ServerAddr::parse(&cfg.server).ok_or_else(|| {
        Error::Config(format!(
            "server address {:?} is not HOST:PORT (a name or an IP address, and a port)",
            cfg.server
        ))
    })?;
    let proto = fluidity_proto::Config {
        // Bounds the whole tunnel handshake, IAM credentials and verdict included.
        handshake_timeout: Duration::from_secs(cfg.iam.timeout_secs.max(1)),
        ..fluidity_proto::Config::default()
    };
    Ok(TunnelSettings {
        server,
        server_name,
        tls,
        ca_file: cfg.ca.clone(),
        peer_check: check,
        presented_cert: identity.cert_chain().first().cloned(),
        proto: Arc::new(proto),
        connect_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
        credentials,
        min_backoff: Duration::from_millis(250),
        // Requests within the backoff get the last error at once, so this is also how
        // long traffic may still fail after the server is back: at most 5 s (it was
        // 30 s). A dead server then costs one attempt per 5 s, each bounded by the
        // connect timeout per address tried.
        max_backoff: Duration::from_secs(5),
        server_may_move: false,
    })
}

/// The proxy front end's settings from the configuration; refuses a non-loopback
/// listener without credentials, and settings the proxy cannot run with.
pub fn proxy_config(cfg: &AgentConfig) -> Result<ProxyConfig> {
    if cfg.head_timeout_secs == 0 {
        return Err(Error::Config(
            "head_timeout_secs must be at least 1: it is how long a client gets to send a \
             request head"
                .into(),
        ));
    }
    let auth = match (&cfg.proxy_username, &cfg.proxy_password) {
        (Some(u), Some(p)) => {
            check_credentials(u, p)?;
            Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            })
        }
        (None, None) => None,
        _ => {
            return Err(Error::Config(
                "set both proxy_username and proxy_password (--proxy-username, and \
                 FLUIDITY_PROXY_PASSWORD or --proxy-password), or neither"
                    .into(),
            ))
        }
    };
    let pc = ProxyConfig {
        auth,
        head_timeout: Duration::from_secs(cfg.head_timeout_secs),
        ..ProxyConfig::default()
    };
    pc.validate_for(cfg.listen)?;
    Ok(pc)
}

/// Refuses proxy credentials that clients could not send or that protect nothing: an
/// empty one (an unset variable in a service file, say, which would leave the proxy
/// open), a username with a colon (HTTP Basic cannot carry it), or either longer than
/// SOCKS5's 255 bytes.
fn check_credentials(username: &str, password: &str) -> Result<()> {
    let problem = if username.is_empty() || password.is_empty() {
        "proxy_username and proxy_password must not be empty (is a variable that sets them \
         unset?)"
    } else if username.contains(':') {
        "proxy_username must not contain ':', which HTTP Basic authentication cannot carry"
    } else if username.len() > 255 || password.len() > 255 {
        "proxy_username and proxy_password must be at most 255 bytes each, as SOCKS5 carries them"
    } else {
        return Ok(());
    };
    Err(Error::Config(problem.into()))
}

/// Binds the proxy listener.
pub fn bind(listen: SocketAddr) -> Result<async_net::TcpListener> {
    smol::block_on(async_net::TcpListener::bind(listen)).map_err(|source| Error::Bind {
        addr: listen,
        source,
    })
}

/// Serves proxy clients until `shutdown` completes, then lets the tunnel drain: new
/// clients are refused from then on, and clients whose streams the drain deadline cuts
/// short get a reset, never a clean end they could take for the whole of the data.
pub async fn serve(
    ex: &Arc<Executor<'static>>,
    listener: async_net::TcpListener,
    dialer: TunnelDialer,
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cfg = Arc::new(cfg);
    // The client connections being served, to reset those still open when the tunnel
    // closes under them.
    let clients = Connections::default();
    // A second signal exits at once: those connections are reset first, or they would end
    // with a clean close a client could take for the whole of its data.
    clients.reset_on_forced_exit();
    let accept_loop = async {
        let mut errors = AcceptErrors::new("proxy");
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    errors.accepted();
                    let _ = client.set_nodelay(true);
                    let (dialer, cfg) = (dialer.clone(), cfg.clone());
                    let tracked = clients.track(&client);
                    ex.spawn(async move {
                        let sock = client.clone();
                        let served = proxy::serve_connection(client, peer, &dialer, &cfg)
                            .or(client_reset(&sock));
                        match served.await {
                            Ok(()) => {}
                            Err(e) => {
                                if matches!(e, Error::Aborted(_)) {
                                    reset_on_close(&sock);
                                }
                                tracing::debug!(%peer, error = %e, "client connection ended");
                            }
                        }
                        drop(tracked);
                    })
                    .detach();
                }
                Err(e) => {
                    if out_of_descriptors(&e) {
                        dialer.close_idle_clients();
                    }
                    errors.failed(&e).await
                }
            }
        }
    };
    accept_loop.or(shutdown).await;
    // Refused from now on, rather than accepted into a backlog nobody serves.
    drop(listener);
    dialer.shutdown(SHUTDOWN_GRACE).await;
    // Connections write their last bytes and end; those that have not by then are
    // reset, as the process may exit right after: a client must not take a cut stream
    // for a whole one.
    fluidity_runtime_smol::app::wait_until(CLIENTS_GRACE, || clients.is_empty()).await;
    clients.reset_all();
}

/// How long client connections get to end on their own once the tunnel is gone.
const CLIENTS_GRACE: Duration = Duration::from_secs(1);

/// Resolves when `sock`'s connection has been reset, checked every [`CLIENT_CHECK`]. A
/// relay whose upload waits for a full stream reads nothing from the client, and would
/// never see it go; its stream would stay open for good. The pending error is taken
/// here, and the connection then abandoned at once, so no reader can mistake its absence
/// for a clean end.
async fn client_reset(sock: &async_net::TcpStream) -> Result<()> {
    loop {
        smol::Timer::after(CLIENT_CHECK).await;
        // An ICMP unreachable is advisory on a connection that still works; any other
        // pending error ended it (and, taken here, no read will report it again).
        let reset = take_socket_error(sock).filter(|e| {
            !matches!(
                e.kind(),
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable
            )
        });
        if let Some(e) = reset {
            return Err(Error::Aborted(format!(
                "the client's connection failed: {e}"
            )));
        }
    }
}

/// How often a client connection is checked for a reset nobody has read (see
/// [`client_reset`]).
const CLIENT_CHECK: Duration = Duration::from_secs(5);

/// Time open streams get to finish when the agent stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn with_credentials(username: &str, password: &str) -> AgentConfig {
        AgentConfig {
            listen: "192.0.2.1:8080".parse().unwrap(),
            proxy_username: Some(username.into()),
            proxy_password: Some(password.into()),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn a_server_name_no_certificate_can_hold_is_refused_at_start() {
        for name in ["", "bad name", "a..b"] {
            let cfg = AgentConfig {
                server_name: Some(name.into()),
                ..AgentConfig::default()
            };
            let err = tunnel_settings(&cfg, None)
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("server_name") && err.contains("--server-name"),
                "{name:?}: {err}"
            );
        }
        let cfg = AgentConfig {
            server: "bad host:8443".into(),
            ..AgentConfig::default()
        };
        let err = tunnel_settings(&cfg, None)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("--server,") && err.contains("\"bad host\""),
            "{err}"
        );
    }

    #[test]
    fn proxy_credentials_that_protect_nothing_or_cannot_be_sent_are_refused() {
        assert!(proxy_config(&with_credentials("bob", "secret")).is_ok());
        for (user, pass, says) in [
            ("", "", "must not be empty"),
            ("bob", "", "must not be empty"),
            ("", "secret", "must not be empty"),
            ("b:ob", "secret", "must not contain ':'"),
            (&"u".repeat(256), "secret", "at most 255 bytes"),
            ("bob", &"p".repeat(256), "at most 255 bytes"),
        ] {
            let err = proxy_config(&with_credentials(user, pass))
                .expect_err("refused")
                .to_string();
            assert!(err.contains(says), "{user:?}/{pass:?}: {err}");
        }
    }
}
