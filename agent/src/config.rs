//! The agent's configuration: a TOML file, overridden by flags and environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// How the agent authenticates the tunnel beyond its client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentAuth {
    /// Client certificate only.
    #[default]
    None,
    /// Also sign an STS request with the default AWS credential chain.
    Iam,
}

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Local proxy listener (HTTP, CONNECT, WebSocket and SOCKS5 on one port). Any
    /// address other than loopback requires `proxy_username` and `proxy_password`.
    /// Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Server address, `host:port`. Default `127.0.0.1:8443`.
    pub server: String,
    /// Name or IP the server certificate must be valid for. Default: the host of `server`.
    pub server_name: Option<String>,
    /// CN the server certificate must carry (in AWS mode, the server ARN). Default: any.
    pub expected_server_cn: Option<String>,
    /// Agent certificate chain, PEM. Default `client.pem`.
    pub cert: PathBuf,
    /// Agent private key, PEM. Default `client-key.pem`.
    pub key: PathBuf,
    /// CA that issued the server certificate, PEM. Default `ca.pem`.
    pub ca: PathBuf,
    /// Username proxy clients must present. Default: none.
    pub proxy_username: Option<String>,
    /// Password proxy clients must present. Default: none.
    pub proxy_password: Option<String>,
    /// Seconds for TCP connect plus TLS handshake to the server. Default 10.
    pub connect_timeout_secs: u64,
    /// Seconds a client may take to send its request head. Default 30.
    pub head_timeout_secs: u64,
    /// Tunnel authentication. Default `none`.
    pub auth: AgentAuth,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            server: "127.0.0.1:8443".into(),
            server_name: None,
            expected_server_cn: None,
            cert: "client.pem".into(),
            key: "client-key.pem".into(),
            ca: "ca.pem".into(),
            proxy_username: None,
            proxy_password: None,
            connect_timeout_secs: 10,
            head_timeout_secs: 30,
            auth: AgentAuth::None,
        }
    }
}

impl AgentConfig {
    /// Reads a TOML file; relative certificate paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        fluidity_runtime_smol::app::load_toml(path, |c: &mut AgentConfig| {
            [&mut c.cert, &mut c.key, &mut c.ca].into()
        })
        .map_err(Error::Config)
    }

    /// The host part of `server`, without brackets.
    pub fn server_host(&self) -> &str {
        let host = self
            .server
            .rsplit_once(':')
            .map_or(self.server.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}
