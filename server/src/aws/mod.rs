//! AWS mode (`mode = "aws"`): the server finds out who and where it is, which agent it
//! serves, and gets its certificate from the CA function before it listens.
//!
//! Start-up, in order:
//! 1. its ARN ([`discover::discover_identity`]): ECS task metadata v4, `ECS_TASK_ARN`,
//!    `SERVER_ARN`, EC2 metadata;
//! 2. its identity in the control plane, `CLUSTER/SERVICE` ([`ServerId`]): `[aws]`
//!    `cluster`/`service`, else `FLUIDITY_CLUSTER`/`FLUIDITY_SERVICE`, else the task
//!    metadata's `Cluster` and `ServiceName`;
//! 3. its public IP ([`discover::discover_public_ip`]): the task's network interface, else
//!    the instance metadata;
//! 4. the agent's public IP, which Wake stored in DynamoDB under `CLUSTER/SERVICE`
//!    ([`agent_ip::wait_for_agent_ip`], with retries and backoff);
//! 5. a key and CSR with CN = its ARN and IP SANs = [its IP, the agent's IP], signed by the
//!    CA function and cached ([`cert::obtain`]);
//! 6. the tunnel listener then requires CN = its ARN on every agent certificate and, unless
//!    `check_agent_ip = false` (agents behind NAT whose address changes), the connection's
//!    source address among that certificate's IP SANs.
//!
//! While it runs, it publishes its counters to CloudWatch every 60 s ([`metrics`]) for the
//! Sleep function.

pub mod agent_ip;
pub mod cert;
pub mod discover;
pub mod metrics;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fluidity_aws::chain::ChainOptions;
use fluidity_aws::clients::dynamodb::DynamoDbClient;
use fluidity_aws::clients::ec2::Ec2Client;
use fluidity_aws::clients::ecs::EcsClient;
use fluidity_aws::control::types::{CertRole, METRIC_NAMESPACE};
use fluidity_aws::control::{ControlClient, ControlUrls, ServerId};
use fluidity_aws::{AwsConfig, Env};
use serde::Deserialize;

use self::cert::{CertFiles, ControlCa};
use self::discover::ServerIdentity;
use crate::{Error, ServerConfig};

/// How long before its expiry a cached server certificate is replaced. Server
/// certificates live days (they name one task), so the agent's 30-day window would never
/// reuse one.
pub const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(24 * 60 * 60);

/// The `[aws]` section of the server configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// ECS cluster of the service. Default: `FLUIDITY_CLUSTER`, else the task metadata.
    pub cluster: Option<String>,
    /// ECS service. Default: `FLUIDITY_SERVICE`, else the task metadata.
    pub service: Option<String>,
    /// DynamoDB table of agent IPs. Default: `FLUIDITY_TABLE`.
    pub table: Option<String>,
    /// The CA function URL. Default: `FLUIDITY_CA_URL`, else `FLUIDITY_CONTROL_URL` + `/ca`.
    pub ca_url: Option<String>,
    /// AWS region. Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile.
    pub region: Option<String>,
    /// Folder of the cached certificate. Default: `fluidity-server` in the temporary folder.
    pub cache_dir: Option<PathBuf>,
    /// Require the agent's source address among its certificate's IP SANs. Turn off only
    /// for agents behind NAT whose public address changes. Default `true`.
    pub check_agent_ip: bool,
    /// Serve on the task's private IP when its interface has no public one, as Query
    /// answers it with the same setting. Default: `FLUIDITY_PRIVATE_IP_FALLBACK`, else
    /// `false`.
    pub private_ip_fallback: Option<bool>,
    /// Seconds to wait for the public IP and the agent's IP at start-up. Default 300.
    pub startup_wait_secs: u64,
    /// Seconds between CloudWatch samples. Default 60 (what Sleep expects).
    pub metrics_period_secs: u64,
    /// CloudWatch namespace. Default: `FLUIDITY_METRIC_NAMESPACE`, else `Fluidity`.
    pub metric_namespace: Option<String>,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            cluster: None,
            service: None,
            table: None,
            ca_url: None,
            region: None,
            cache_dir: None,
            check_agent_ip: true,
            private_ip_fallback: None,
            startup_wait_secs: 300,
            metrics_period_secs: 60,
            metric_namespace: None,
        }
    }
}

/// What start-up found; the server runs with it.
#[derive(Debug, Clone)]
pub struct AwsStartup {
    /// The server's ARN and how it was found.
    pub identity: ServerIdentity,
    /// `CLUSTER/SERVICE`.
    pub server_id: ServerId,
    /// The server's public IP.
    pub server_ip: IpAddr,
    /// The agent's public IP (from Wake).
    pub agent_ip: IpAddr,
    /// The AWS configuration (region, credentials, endpoints), for the metrics publisher.
    pub aws: AwsConfig,
    /// The CloudWatch namespace.
    pub metric_namespace: String,
    /// The sample period.
    pub metrics_period: Duration,
    renewal: Renewal,
}

impl AwsStartup {
    /// Renews the server's certificate before it ends, for as long as the server runs
    /// (see [`cert::keep_renewed`]), naming the agent address Wake stored last (the CA
    /// certifies no other); `server` then presents the new one. A task kept up past its
    /// first certificate (an agent stays connected) keeps taking new tunnels. Spawn it on
    /// the executor and drop (cancel) the task at shutdown.
    pub fn keep_certificate_renewed(
        &self,
        server: Arc<crate::Server>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let r = self.renewal.clone();
        let (aws, server_id) = (self.aws.clone(), self.server_id.clone());
        let renew = move |window| {
            let ddb = DynamoDbClient::new(&aws);
            let latest = || live_agent_ip(&ddb, &r.table, &server_id);
            // The CA certifies only an address stored in the last hour: without one, it is
            // not asked. An agent stores its address with each Wake: every 30 minutes while
            // its tunnel is up, and when it looks for the server again.
            let Some(agent_ip) = latest() else {
                return Err(Error::AwsStartup(
                    "no agent address stored in the last hour, which the CA needs (an \
                     agent's Wake stores one)"
                        .into(),
                ));
            };
            let (obtained, _) = cert::obtain_server(
                &r.files,
                &r.arn,
                r.server_ip,
                agent_ip,
                &r.ca,
                window,
                latest,
            )?;
            Ok(obtained)
        };
        cert::keep_renewed(self.renewal.files.clone(), renew, move || {
            server.reload_certificate()
        })
    }

    /// Publishes `metrics` to CloudWatch every period, forever: spawn it on the executor
    /// and drop (cancel) the task at shutdown.
    pub fn publish_metrics(
        &self,
        metrics: std::sync::Arc<crate::health::Metrics>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        metrics::publish_loop(
            fluidity_aws::clients::cloudwatch::CloudWatchClient::new(&self.aws),
            self.metric_namespace.clone(),
            metrics,
            self.server_id.clone(),
            Some(self.metrics_period),
            futures_lite::future::pending::<()>(),
        )
    }
}

fn setting(
    configured: &Option<String>,
    env: &Env,
    var: &str,
    fallback: Option<String>,
) -> Option<String> {
    configured
        .clone()
        .or_else(|| env.get(var).map(str::to_owned))
        .or(fallback)
        .filter(|s| !s.trim().is_empty())
}

/// The CA function URL from the settings or the environment.
fn ca_url(settings: &AwsSettings, env: &Env) -> Option<String> {
    let host = env
        .get("FLUIDITY_CONTROL_URL")
        .map(|h| ControlUrls::on_host(h).ca);
    setting(&settings.ca_url, env, "FLUIDITY_CA_URL", host)
}

/// Runs AWS-mode start-up (see the module documentation) and points `cfg` at the issued
/// certificate: `cert`, `key`, `client_ca`, `expected_client_cn` = the ARN and
/// `check_client_ip` = `check_agent_ip`. Blocks; call it before the server starts.
pub fn start_up(
    cfg: &mut ServerConfig,
    settings: &AwsSettings,
    env: &Env,
) -> Result<AwsStartup, Error> {
    let identity = discover::discover_identity(env)?;
    tracing::info!(arn = %identity.arn, source = ?identity.source, "server identity");
    let missing = |what: &str, var: &str| {
        Error::AwsStartup(format!(
            "AWS mode needs the {what}: set [aws] {} or {var}",
            var.trim_start_matches("FLUIDITY_").to_lowercase()
        ))
    };
    let cluster = setting(
        &settings.cluster,
        env,
        "FLUIDITY_CLUSTER",
        identity.cluster(),
    )
    .ok_or_else(|| missing("ECS cluster", "FLUIDITY_CLUSTER"))?;
    let service = setting(
        &settings.service,
        env,
        "FLUIDITY_SERVICE",
        identity.service(),
    )
    .ok_or_else(|| missing("ECS service", "FLUIDITY_SERVICE"))?;
    let table = setting(&settings.table, env, "FLUIDITY_TABLE", None)
        .ok_or_else(|| missing("DynamoDB table of agent IPs", "FLUIDITY_TABLE"))?;
    let ca_url = ca_url(settings, env).ok_or_else(|| {
        Error::AwsStartup(
            "AWS mode needs the CA function: set [aws] ca_url, FLUIDITY_CA_URL or \
             FLUIDITY_CONTROL_URL"
                .into(),
        )
    })?;
    let server_id = ServerId::new(&cluster, &service);
    let aws = AwsConfig::from_env(
        env,
        &ChainOptions {
            region: settings.region.clone(),
            ..ChainOptions::default()
        },
    )?;
    let wait = Duration::from_secs(settings.startup_wait_secs.max(1));

    let server_ip = discover::discover_public_ip(
        &identity,
        env,
        &EcsClient::new(&aws),
        &Ec2Client::new(&aws),
        Some(&cluster),
        wait,
        settings
            .private_ip_fallback
            .unwrap_or_else(|| env.is_true("FLUIDITY_PRIVATE_IP_FALLBACK")),
    )?;
    tracing::info!(server = %server_id, %server_ip, "server public address");
    let ddb = DynamoDbClient::new(&aws);
    let agent_ip =
        agent_ip::wait_for_agent_ip(&ddb, &table, &server_id, wait, Duration::from_millis(500))?;

    let cache_dir = settings
        .cache_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("fluidity-server"));
    let files = CertFiles::in_dir(&cache_dir, "server");
    let urls = ControlUrls {
        // The server calls only the CA function.
        wake: String::new(),
        query: String::new(),
        kill: String::new(),
        ca: ca_url,
    };
    let ca = ControlCa {
        client: ControlClient::new(&aws, urls),
        role: CertRole::Server,
    };
    let (_, agent_ip) = cert::obtain_server(
        &files,
        &identity.arn,
        server_ip,
        agent_ip,
        &ca,
        SERVER_RENEW_BEFORE,
        || live_agent_ip(&ddb, &table, &server_id),
    )?;
    let renewal = Renewal {
        files: files.clone(),
        arn: identity.arn.clone(),
        server_ip,
        ca,
        table: table.clone(),
    };

    cfg.cert = files.cert;
    cfg.key = files.key;
    cfg.client_ca = files.ca;
    cfg.expected_client_cn = Some(identity.arn.clone());
    cfg.check_client_ip = settings.check_agent_ip;
    if !settings.check_agent_ip {
        tracing::warn!(
            "check_agent_ip = false: agents are not held to the address in their certificate"
        );
    }
    tracing::info!(arn = %identity.arn, %server_ip, %agent_ip, check_agent_ip = settings.check_agent_ip,
        "AWS mode ready: agents must present CN = this ARN");
    Ok(AwsStartup {
        identity,
        server_id,
        server_ip,
        agent_ip,
        aws,
        metric_namespace: setting(
            &settings.metric_namespace,
            env,
            "FLUIDITY_METRIC_NAMESPACE",
            None,
        )
        .unwrap_or_else(|| METRIC_NAMESPACE.to_owned()),
        metrics_period: Duration::from_secs(settings.metrics_period_secs.max(1)),
        renewal,
    })
}

/// The agent address Wake stored for `server_id` in the last hour, if any.
fn live_agent_ip(ddb: &DynamoDbClient, table: &str, server_id: &ServerId) -> Option<IpAddr> {
    agent_ip::live_agent_ip(ddb, table, server_id, std::time::SystemTime::now())
        .ok()
        .flatten()
        .map(|r| r.agent_ip)
}

/// What renewing the server's certificate while it runs needs.
#[derive(Debug, Clone)]
struct Renewal {
    files: CertFiles,
    arn: String,
    server_ip: IpAddr,
    ca: ControlCa,
    table: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_and_parse() {
        let s: AwsSettings = toml::from_str("").unwrap();
        assert_eq!(s, AwsSettings::default());
        assert!(
            s.check_agent_ip,
            "the agent IP check is on unless turned off"
        );
        let s: AwsSettings =
            toml::from_str("check_agent_ip = false\ncluster = \"c\"\nstartup_wait_secs = 5")
                .unwrap();
        assert!(!s.check_agent_ip);
        assert_eq!(s.cluster.as_deref(), Some("c"));
        assert!(toml::from_str::<AwsSettings>("clustre = \"c\"").is_err());
    }

    #[test]
    fn ca_url_from_settings_or_environment() {
        let env = Env::from_pairs([("FLUIDITY_CONTROL_URL", "http://127.0.0.1:9000")]);
        assert_eq!(
            ca_url(&AwsSettings::default(), &env).as_deref(),
            Some("http://127.0.0.1:9000/ca")
        );
        let env = env.with("FLUIDITY_CA_URL", "https://x.lambda-url.eu-west-1.on.aws/");
        assert_eq!(
            ca_url(&AwsSettings::default(), &env).as_deref(),
            Some("https://x.lambda-url.eu-west-1.on.aws/")
        );
        let s = AwsSettings {
            ca_url: Some("http://ca/".into()),
            ..AwsSettings::default()
        };
        assert_eq!(ca_url(&s, &env).as_deref(), Some("http://ca/"));
        assert_eq!(ca_url(&AwsSettings::default(), &Env::empty()), None);
    }

    #[test]
    fn start_up_says_what_is_missing() {
        let mut cfg = ServerConfig::default();
        let env = Env::from_pairs([("SERVER_ARN", "arn:aws:ecs:eu-west-1:1:task/c/abc")]);
        let err = start_up(&mut cfg, &AwsSettings::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLUIDITY_CLUSTER"), "{err}");
    }
}
