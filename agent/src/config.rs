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

/// The agent's AWS identity, the `[aws]` table: where credentials and the region come
/// from. Used by IAM tunnel authentication (`auth = "iam"`) and by anything else the
/// agent calls AWS for. Credentials always come from the default chain (environment,
/// `AWS_PROFILE` and the shared files, container credentials, instance metadata), never
/// from this file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// AWS region. Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, then the profile's region;
    /// in AWS mode then the region the function URLs name.
    pub region: Option<String>,
    /// Profile of the shared credentials and config files. Default: `AWS_PROFILE`, else
    /// `default`.
    pub profile: Option<String>,
    /// Role to assume (STS AssumeRole) on top of the chain's credentials. Default: none.
    pub iam_role_arn: Option<String>,
    /// External id the role's trust policy asks for. Default: none.
    pub external_id: Option<String>,
    /// Session name of the assumed role. Default: `fluidity-<unix time>`.
    pub role_session_name: Option<String>,
    /// STS endpoint: AssumeRole goes there, and the tunnel authentication request is
    /// signed for it (it must equal the server's `[iam] sts_endpoint`). Default:
    /// `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL`, else `https://sts.REGION.amazonaws.com`.
    pub sts_endpoint: Option<String>,
}

/// IAM tunnel authentication settings (`auth = "iam"`), the `[iam]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IamAuthSettings {
    /// The server's id, signed into every authentication request so that it is good for
    /// that server only; must equal the server's `[iam] server_id` (by default its
    /// certificate CN; in AWS mode the server ARN). Default: `expected_server_cn`.
    pub server_id: Option<String>,
    /// Seconds to get credentials, sign, and hear the server's verdict, after the TLS
    /// handshake. Default 30.
    pub timeout_secs: u64,
}

impl Default for IamAuthSettings {
    fn default() -> Self {
        IamAuthSettings {
            server_id: None,
            timeout_secs: 30,
        }
    }
}

/// How the agent finds its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// Dial `server` with the certificates in `cert`, `key` and `ca`.
    #[default]
    Direct,
    /// Wake an on-demand server in AWS, wait for it, get a certificate from the CA
    /// function, connect, and stop the server on exit (see `[lifecycle]`).
    Aws,
}

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `direct` or `aws`. Default `direct`.
    pub mode: AgentMode,
    /// The AWS-mode lifecycle (control functions, waiting limit), for `mode = "aws"`.
    pub lifecycle: crate::aws::LifecycleSettings,
    /// Local proxy listener (HTTP, CONNECT, WebSocket and SOCKS5 on one port). Any
    /// address other than loopback requires `proxy_username` and `proxy_password`.
    /// Default `127.0.0.1:8080`; `localhost:PORT` means `127.0.0.1:PORT`.
    #[serde(deserialize_with = "fluidity_runtime_smol::listener::deserialize_listen_addr")]
    pub listen: SocketAddr,
    /// Server address, `host:port`: a name is looked up at every connection attempt, its
    /// addresses raced as RFC 8305 says, and the next ones tried beside a TLS handshake
    /// still unfinished after 2 s (or four times as long as the TCP race took, if
    /// longer). Default `127.0.0.1:8443`.
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
    /// Username proxy clients must present (not empty, no `:`, at most 255 bytes).
    /// Default: none.
    pub proxy_username: Option<String>,
    /// Password proxy clients must present (not empty, at most 255 bytes). Default: none.
    pub proxy_password: Option<String>,
    /// Seconds for the TCP connect, and for the TLS handshake, to one of the server's
    /// addresses (up to three are tried), and for looking up its name. Default 10.
    pub connect_timeout_secs: u64,
    /// Seconds a client may take to send its request head. Default 30.
    pub head_timeout_secs: u64,
    /// Tunnel authentication. Default `none`.
    pub auth: AgentAuth,
    /// AWS identity (region, profile, role, STS endpoint).
    pub aws: AwsSettings,
    /// IAM tunnel authentication, for `auth = "iam"`.
    pub iam: IamAuthSettings,
    /// Executor threads; 0 = one per CPU. Default 1: the agent drives one tunnel, and one
    /// thread spends less CPU per byte and per request than several handing work over.
    pub threads: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            mode: AgentMode::Direct,
            lifecycle: crate::aws::LifecycleSettings::default(),
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
            aws: AwsSettings::default(),
            iam: IamAuthSettings::default(),
            threads: 1,
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

    /// The host part of `server`, without brackets or an IPv6 scope (`%2`), which no
    /// certificate names: the server name the TLS handshake checks by default.
    pub fn server_host(&self) -> &str {
        let host = self
            .server
            .rsplit_once(':')
            .map_or(self.server.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.split_once('%').map_or(host, |(ip, _scope)| ip)
    }
}
