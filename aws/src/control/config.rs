//! The control functions' settings, read from the environment the Lambda functions (or
//! `fluidity-control`) run with.

use std::time::Duration;

use super::error::ControlError;
use super::types::{CertRole, ServerId, AGENT_IP_TTL, METRIC_NAMESPACE};
use crate::env::Env;
use crate::iam_auth::PrincipalPattern;

/// Default idle time after which Sleep stops the server.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default (and largest) validity of an agent certificate, in days.
pub const DEFAULT_AGENT_CERT_MAX_DAYS: u32 = 90;
/// Default (and largest) validity of a server certificate, in days. A server certificate
/// names one task's ARN, which lives hours, so it need not live long.
pub const DEFAULT_SERVER_CERT_MAX_DAYS: u32 = 7;
/// Upper bound of any configured validity: well under the CA's own life.
const MAX_CONFIGURABLE_DAYS: u32 = 397;

/// Settings of the control functions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// The ECS cluster and service of the server (`FLUIDITY_CLUSTER`, `FLUIDITY_SERVICE`);
    /// needed by Wake, Query, Kill and Sleep.
    pub server: Option<ServerId>,
    /// The DynamoDB table of agent IPs (`FLUIDITY_TABLE`); needed by Wake, Query and Sleep.
    pub table: Option<String>,
    /// The Secrets Manager secret (name or ARN) holding the CA (`FLUIDITY_CA_SECRET`);
    /// needed by the CA function.
    pub ca_secret: Option<String>,
    /// CloudWatch namespace of the server's metrics (`FLUIDITY_METRIC_NAMESPACE`,
    /// default `Fluidity`).
    pub metric_namespace: String,
    /// Idle time after which Sleep stops the server (`FLUIDITY_IDLE_MINUTES`, default 15).
    pub idle_timeout: Duration,
    /// How long a stored agent IP stays valid (one hour).
    pub agent_ip_ttl: Duration,
    /// Largest validity of an agent certificate (`FLUIDITY_AGENT_CERT_MAX_DAYS`, default 90).
    pub agent_cert_max_days: u32,
    /// Largest validity of a server certificate (`FLUIDITY_SERVER_CERT_MAX_DAYS`, default 7).
    pub server_cert_max_days: u32,
    /// Whether Query may answer the task's private IP when it has no public one
    /// (`FLUIDITY_PRIVATE_IP_FALLBACK=true`), for agents that reach the VPC privately.
    pub private_ip_fallback: bool,
    /// Who may have a server certificate (`FLUIDITY_SERVER_CALLERS`: ARNs, ARN prefixes
    /// ending in `*` or `account:ID`, comma-separated, matched against the caller the
    /// function URL's IAM authorisation names, assumed roles as their role's ARN). Empty:
    /// any caller, the task and addresses being checked all the same.
    pub server_callers: Vec<PrincipalPattern>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            server: None,
            table: None,
            ca_secret: None,
            metric_namespace: METRIC_NAMESPACE.to_string(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            agent_ip_ttl: AGENT_IP_TTL,
            agent_cert_max_days: DEFAULT_AGENT_CERT_MAX_DAYS,
            server_cert_max_days: DEFAULT_SERVER_CERT_MAX_DAYS,
            private_ip_fallback: false,
            server_callers: Vec::new(),
        }
    }
}

fn number(env: &Env, name: &str, min: u32, max: u32) -> Result<Option<u32>, ControlError> {
    let Some(raw) = env.get(name) else {
        return Ok(None);
    };
    match raw.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(ControlError::config(format!(
            "{name}={raw:?} is not a whole number from {min} to {max}"
        ))),
    }
}

impl ControlConfig {
    /// Reads the settings from `env`. Missing names are reported when a function that
    /// needs them runs, so one host can serve every function with partial settings.
    pub fn from_env(env: &Env) -> Result<Self, ControlError> {
        let mut c = ControlConfig::default();
        match (env.get("FLUIDITY_CLUSTER"), env.get("FLUIDITY_SERVICE")) {
            (Some(cluster), Some(service)) => c.server = Some(ServerId::new(cluster, service)),
            (None, None) => {}
            _ => {
                return Err(ControlError::config(
                    "set both FLUIDITY_CLUSTER and FLUIDITY_SERVICE, or neither",
                ))
            }
        }
        c.table = env.get("FLUIDITY_TABLE").map(str::to_string);
        c.ca_secret = env.get("FLUIDITY_CA_SECRET").map(str::to_string);
        if let Some(ns) = env.get("FLUIDITY_METRIC_NAMESPACE") {
            c.metric_namespace = ns.to_string();
        }
        if let Some(m) = number(env, "FLUIDITY_IDLE_MINUTES", 1, 24 * 60)? {
            c.idle_timeout = Duration::from_secs(u64::from(m) * 60);
        }
        if let Some(d) = number(
            env,
            "FLUIDITY_AGENT_CERT_MAX_DAYS",
            1,
            MAX_CONFIGURABLE_DAYS,
        )? {
            c.agent_cert_max_days = d;
        }
        if let Some(d) = number(
            env,
            "FLUIDITY_SERVER_CERT_MAX_DAYS",
            1,
            MAX_CONFIGURABLE_DAYS,
        )? {
            c.server_cert_max_days = d;
        }
        c.private_ip_fallback = env.is_true("FLUIDITY_PRIVATE_IP_FALLBACK");
        if let Some(list) = env.get("FLUIDITY_SERVER_CALLERS") {
            c.server_callers = list
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    p.parse().map_err(|e: crate::Error| {
                        ControlError::config(format!("FLUIDITY_SERVER_CALLERS: {e}"))
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        Ok(c)
    }

    /// The server identity, or a configuration error naming the variables.
    pub fn server(&self) -> Result<&ServerId, ControlError> {
        self.server.as_ref().ok_or_else(|| {
            ControlError::config("FLUIDITY_CLUSTER and FLUIDITY_SERVICE are not set")
        })
    }

    /// The agent-IP table, or a configuration error naming the variable.
    pub fn table(&self) -> Result<&str, ControlError> {
        self.table
            .as_deref()
            .ok_or_else(|| ControlError::config("FLUIDITY_TABLE is not set"))
    }

    /// The CA secret id, or a configuration error naming the variable.
    pub fn ca_secret(&self) -> Result<&str, ControlError> {
        self.ca_secret
            .as_deref()
            .ok_or_else(|| ControlError::config("FLUIDITY_CA_SECRET is not set"))
    }

    /// The largest validity, in days, of a certificate for `role`.
    pub fn max_cert_days(&self, role: CertRole) -> u32 {
        match role {
            CertRole::Agent => self.agent_cert_max_days,
            CertRole::Server => self.server_cert_max_days,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_checks_the_environment() {
        let env = Env::from_pairs([
            ("FLUIDITY_CLUSTER", "c"),
            ("FLUIDITY_SERVICE", "s"),
            ("FLUIDITY_TABLE", "t"),
            ("FLUIDITY_IDLE_MINUTES", "20"),
        ]);
        let c = ControlConfig::from_env(&env).unwrap();
        assert_eq!(c.server().unwrap().key(), "c/s");
        assert_eq!(c.idle_timeout, Duration::from_secs(1200));
        assert_eq!(c.max_cert_days(CertRole::Agent), 90);
        let e = c.ca_secret().unwrap_err();
        assert!(e.message.contains("FLUIDITY_CA_SECRET"));
        let bad = env.clone().with("FLUIDITY_IDLE_MINUTES", "0");
        let e = ControlConfig::from_env(&bad).unwrap_err();
        assert!(e.message.contains("FLUIDITY_IDLE_MINUTES"), "{e}");
        let half = Env::from_pairs([("FLUIDITY_CLUSTER", "c")]);
        assert!(ControlConfig::from_env(&half).is_err());
        assert!(c.server_callers.is_empty());
        let callers = env.clone().with(
            "FLUIDITY_SERVER_CALLERS",
            "arn:aws:iam::123456789012:role/fluidity-server, account:210987654321",
        );
        let c = ControlConfig::from_env(&callers).unwrap();
        assert_eq!(c.server_callers.len(), 2);
        let bad = env.with("FLUIDITY_SERVER_CALLERS", "fluidity-server");
        let e = ControlConfig::from_env(&bad).unwrap_err();
        assert!(e.message.contains("FLUIDITY_SERVER_CALLERS"), "{e}");
    }
}
