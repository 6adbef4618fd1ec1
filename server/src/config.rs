//! The server's configuration: a TOML file, overridden by flags and environment variables.
//! Every setting and its default is documented here and in `--help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fluidity_runtime_smol::tls::{CaRoots, Identity};
use fluidity_runtime_smol::PeerRole;
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

impl std::fmt::Display for AuthMode {
    /// As the setting is written (`mtls`, `iam`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMode::Mtls => "mtls",
            AuthMode::Iam => "iam",
        })
    }
}

/// IAM authentication settings (`auth = "iam"`), the `[iam]` table.
///
/// The agent signs an STS `GetCallerIdentity` request naming this server and its TLS
/// session; the server checks those, the time window and replays, forwards the request to
/// its STS endpoint, and admits the ARN STS reports if it is on `allowed_principals`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IamSettings {
    /// Principals admitted: exact ARNs (`arn:aws:iam::123456789012:user/alice`; an
    /// assumed-role ARN counts as its role), `account:123456789012`, or ARN prefixes
    /// ending in `*` after the account (`arn:aws:iam::123456789012:role/fluidity-*`).
    /// Required: an empty list is a configuration error.
    pub allowed_principals: Vec<String>,
    /// STS endpoint the signed requests are forwarded to; agents must sign for the same
    /// URL. Default: `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL`, else the regional
    /// endpoint `https://sts.REGION.amazonaws.com`.
    pub sts_endpoint: Option<String>,
    /// AWS region, for the default STS endpoint. Default: `AWS_REGION`,
    /// `AWS_DEFAULT_REGION`, then the shared config file's profile.
    pub region: Option<String>,
    /// This server's identity as agents name it (`x-fluidity-server-id`). Default: the
    /// server certificate's CN (in AWS mode, the server ARN).
    pub server_id: Option<String>,
    /// Accepted distance in seconds between the request's `X-Amz-Date` and this server's
    /// clock; signatures are remembered this long to refuse replays. Default 300.
    pub time_window_secs: u64,
    /// Deadline in seconds of the call to STS. Must be shorter than
    /// `tunnel_handshake_secs`. Default 5.
    pub sts_timeout_secs: u64,
    /// Seconds an admission is valid; when it ends the tunnel is asked to go away (open
    /// streams get `drain_secs` to finish) and the agent reconnects and authenticates
    /// again, so a principal removed from the allow list loses access. 0: for the life of
    /// the connection. Default 3600.
    pub session_secs: u64,
    /// Failed attempts allowed per source address (IPv6: per /64) within
    /// `failure_window_secs`; more are refused without asking STS. Default 10.
    pub max_failures: u32,
    /// The window of the failure count, in seconds. Default 60.
    pub failure_window_secs: u64,
}

impl Default for IamSettings {
    fn default() -> Self {
        IamSettings {
            allowed_principals: Vec::new(),
            sts_endpoint: None,
            region: None,
            server_id: None,
            time_window_secs: 300,
            sts_timeout_secs: 5,
            session_secs: 3600,
            max_failures: 10,
            failure_window_secs: 60,
        }
    }
}

/// Where the server's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServerMode {
    /// Certificates from files (`cert`, `key`, `client_ca`).
    #[default]
    Standalone,
    /// An on-demand server in AWS: it discovers its ARN and address, reads the agent's
    /// address from DynamoDB and gets its certificate from the CA function (see `[aws]`).
    Aws,
}

/// The server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `standalone` or `aws`. Default `standalone`.
    pub mode: ServerMode,
    /// AWS mode settings, for `mode = "aws"`.
    pub aws: crate::aws::AwsSettings,
    /// Tunnel listener. Default `0.0.0.0:8443`.
    #[serde(deserialize_with = "fluidity_runtime_smol::listener::deserialize_listen_addr")]
    pub listen: SocketAddr,
    /// `/healthz` and `/metrics` listener. Default `0.0.0.0:8080`.
    #[serde(deserialize_with = "fluidity_runtime_smol::listener::deserialize_listen_addr")]
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
    /// slot); beyond it the oldest, if stalled for two seconds, gives way to a new one.
    /// Default 64.
    pub max_handshakes: usize,
    /// Of those, from one source at once: an IPv4 address or an IPv6 /64. Default 8, so
    /// that one host holding connections open cannot lock every agent out.
    pub max_handshakes_per_source: usize,
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
    /// Executor threads; 0 = one per CPU. Default 1, which serves one agent's tunnel with
    /// the least CPU; raise it for many busy tunnels on a machine with several CPUs.
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: ServerMode::Standalone,
            aws: crate::aws::AwsSettings::default(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            health_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            cert: "server.pem".into(),
            key: "server-key.pem".into(),
            client_ca: "ca.pem".into(),
            expected_client_cn: None,
            check_client_ip: false,
            max_tunnels: 64,
            max_handshakes: 64,
            max_handshakes_per_source: 8,
            max_streams: 256,
            tls_handshake_secs: 10,
            tunnel_handshake_secs: 30,
            connect_timeout_secs: 10,
            drain_secs: 30,
            auth: AuthMode::Mtls,
            iam: IamSettings::default(),
            egress: EgressPolicy::default(),
            threads: 1,
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

    /// The tunnel handshake deadline (hello, authentication).
    pub fn tunnel_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tunnel_handshake_secs.max(1))
    }

    /// The graceful shutdown deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }

    /// Loads the server's certificate and key (`cert`, `key`), naming those settings if
    /// they cannot be loaded.
    pub fn load_identity(&self) -> Result<Identity, Error> {
        Identity::load_as(&self.cert, &self.key, PeerRole::Server).map_err(|source| {
            Error::Certificates {
                what: "the server's certificate and key (cert, key)",
                source,
            }
        })
    }

    /// Loads the CA that signs agents' certificates (`client_ca`), naming that setting if
    /// it cannot be loaded.
    pub fn load_client_ca(&self) -> Result<CaRoots, Error> {
        CaRoots::load(&self.client_ca).map_err(|source| Error::Certificates {
            what: "the CA certificate that signs agents' certificates (client_ca)",
            source,
        })
    }
}
