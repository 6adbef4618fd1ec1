//! The server's configuration: a TOML file, overridden by flags and environment variables.
//! Every setting and its default is documented here and in `--help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::egress::EgressPolicy;
use crate::Error;

/// How agents authenticate beyond their TLS client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The client certificate is the only credential (local mode, private setups).
    #[default]
    Mtls,
    /// The agent must also prove an IAM identity through STS (see `[iam]`).
    Iam,
}

/// IAM authentication settings (`auth = "iam"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IamSettings {
    /// Principals admitted: exact ARNs, `account:123456789012`, or ARN patterns ending
    /// in `*`. Empty admits nobody.
    pub allowed_principals: Vec<String>,
    /// STS endpoint the signed requests are forwarded to. Default: the regional endpoint.
    pub sts_endpoint: Option<String>,
    /// AWS region. Default: from the environment (`AWS_REGION`).
    pub region: Option<String>,
    /// This server's identity as agents name it (`x-fluidity-server-id`). Default: the
    /// server certificate's CN.
    pub server_id: Option<String>,
}

/// The server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Tunnel listener. Default `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// `/healthz` and `/metrics` listener. Default `0.0.0.0:8080`.
    pub health_listen: SocketAddr,
    /// Server certificate chain (PEM). Default `server.pem`.
    pub cert: PathBuf,
    /// Server private key (PEM). Default `server-key.pem`.
    pub key: PathBuf,
    /// CA that issues agent certificates (PEM). Default `ca.pem`.
    pub client_ca: PathBuf,
    /// CN every agent certificate must carry (in AWS mode: this server's ARN). Default: any.
    pub expected_client_cn: Option<String>,
    /// Require the agent's source address among its certificate's IP SANs. Turn off for
    /// agents behind changing NAT. Default `false` (set by AWS mode).
    pub check_client_ip: bool,
    /// Tunnels served at once. Default 64.
    pub max_tunnels: usize,
    /// Connections allowed in the TLS handshake at once (before they earn a tunnel
    /// slot). Default 64.
    pub max_handshakes: usize,
    /// Streams per tunnel. Default 256.
    pub max_streams: u32,
    /// Seconds for the TLS handshake. Default 10.
    pub tls_handshake_secs: u64,
    /// Seconds for the tunnel handshake (hello, authentication). Default 30.
    pub tunnel_handshake_secs: u64,
    /// Seconds per outbound connection attempt. Default 10.
    pub connect_timeout_secs: u64,
    /// Seconds open streams get to finish on shutdown. Default 30.
    pub drain_secs: u64,
    /// Authentication mode. Default `mtls`.
    pub auth: AuthMode,
    /// IAM settings, for `auth = "iam"`.
    pub iam: IamSettings,
    /// Egress policy (allow/deny lists); loopback, private, link-local and similar
    /// ranges are refused unless allowed here.
    pub egress: EgressPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            health_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            cert: "server.pem".into(),
            key: "server-key.pem".into(),
            client_ca: "ca.pem".into(),
            expected_client_cn: None,
            check_client_ip: false,
            max_tunnels: 64,
            max_handshakes: 64,
            max_streams: 256,
            tls_handshake_secs: 10,
            tunnel_handshake_secs: 30,
            connect_timeout_secs: 10,
            drain_secs: 30,
            auth: AuthMode::Mtls,
            iam: IamSettings::default(),
            egress: EgressPolicy::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; relative certificate paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<ServerConfig, Error> {
        fluidity_runtime_smol::app::load_toml(path, |c: &mut ServerConfig| {
            [&mut c.cert, &mut c.key, &mut c.client_ca].into()
        })
        .map_err(Error::Config)
    }

    /// The TLS handshake deadline.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_secs.max(1))
    }

    /// The graceful shutdown deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
}
