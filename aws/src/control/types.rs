//! The JSON shapes of the control functions: one definition of each request and response,
//! shared by the handlers, the Lambda entry point, the local control host and
//! [`ControlClient`](super::ControlClient).
//!
//! Optional fields are omitted when unknown rather than sent as `null`, and every request
//! and response ignores fields it does not know, so either side can grow a field without
//! breaking the other.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// DynamoDB attribute holding the server identity (the table's partition key).
pub const SERVER_ID_ATTR: &str = "server_id";
/// DynamoDB attribute holding the agent's public IP as Wake saw it.
pub const AGENT_IP_ATTR: &str = "agent_ip";
/// DynamoDB attribute holding when Wake last wrote the item (epoch seconds).
pub const UPDATED_AT_ATTR: &str = "updated_at";
/// DynamoDB attribute DynamoDB's TTL deletes the item by (epoch seconds).
pub const TTL_ATTR: &str = "ttl";
/// How long an agent IP stays valid after Wake wrote it.
pub const AGENT_IP_TTL: Duration = Duration::from_secs(60 * 60);

/// CloudWatch namespace of the server's metrics.
pub const METRIC_NAMESPACE: &str = "Fluidity";
/// The metric Sleep reads: tunnels open at the time of the sample.
pub const METRIC_ACTIVE_TUNNELS: &str = "ActiveTunnels";
/// The one dimension of the server's metrics; its value is [`ServerId::key`].
pub const METRIC_DIMENSION: &str = "Service";
/// How often the server publishes its metrics.
pub const METRIC_PERIOD: Duration = Duration::from_secs(60);

/// The identity of a Fluidity server that exists before any of its tasks: the ECS cluster
/// and service. Wake stores the agent's IP under [`ServerId::key`], and the server, which
/// knows its cluster and service from its configuration, reads it under the same key at
/// start-up; a task ARN cannot be the key because it does not exist when Wake runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerId {
    cluster: String,
    service: String,
}

impl ServerId {
    /// The identity of `service` in `cluster`; either may be a name or an ARN
    /// (`arn:aws:ecs:…:cluster/NAME`, `arn:aws:ecs:…:service/CLUSTER/NAME`), so that the key
    /// is the same whichever form a component was configured with.
    pub fn new(cluster: &str, service: &str) -> Self {
        let last = |s: &str| s.rsplit('/').next().unwrap_or(s).trim().to_string();
        ServerId {
            cluster: last(cluster),
            service: last(service),
        }
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// `CLUSTER/SERVICE`: the DynamoDB key and the value of the metrics' dimension.
    pub fn key(&self) -> String {
        format!("{}/{}", self.cluster, self.service)
    }

    /// The dimensions the server's metrics carry (`Service=CLUSTER/SERVICE`), which is
    /// what Sleep reads them by.
    pub fn metric_dimensions(&self) -> Vec<(String, String)> {
        vec![(METRIC_DIMENSION.to_string(), self.key())]
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.cluster, self.service)
    }
}

/// Where the server is in its life, as the control functions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    /// Desired count 0 and no task left.
    Stopped,
    /// Desired count 1, but no running task with a usable IP yet.
    Starting,
    /// A task is running and its IP is known.
    Running,
    /// Desired count 0 while a task still exists.
    Stopping,
}

impl fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerStatus::Stopped => "stopped",
            ServerStatus::Starting => "starting",
            ServerStatus::Running => "running",
            ServerStatus::Stopping => "stopping",
        })
    }
}

/// The body of a Wake call. The agent's IP is never taken from the body: Wake uses the
/// source address of the call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WakeRequest {}

/// Wake's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeResponse {
    /// The server's state after the call.
    pub status: ServerStatus,
    /// The ARN of the server's task, when one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_arn: Option<String>,
    /// The server's public IP, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_public_ip: Option<IpAddr>,
    /// The caller's address as Wake saw it: what the agent's certificate must name.
    pub agent_public_ip_as_seen: IpAddr,
    /// The service's desired count after the call (1).
    pub desired_count: u32,
    /// Whether the desired count this call read was not 1 (false when the server was
    /// already wanted); Wake sets 1 either way.
    pub changed: bool,
}

/// The body of a Query call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryRequest {}

/// Query's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResponse {
    /// The server's state.
    pub status: ServerStatus,
    /// The address to dial: the task's public IP (or its private IP when the deployment
    /// allows that fallback, see `server_ip_kind`). Absent until known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ip: Option<IpAddr>,
    /// `public` or `private`: which of the task's addresses `server_ip` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ip_kind: Option<IpKind>,
    /// The ARN of the server's task, when one exists: the CN both certificates carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_arn: Option<String>,
    /// The agent IP Wake stored for this server (unexpired), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_public_ip: Option<IpAddr>,
    /// The service's desired count.
    pub desired_count: u32,
    /// ECS's last status of the task (`PROVISIONING`, `PENDING`, `RUNNING`, …), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_status: Option<String>,
    /// A human-readable note on why the server is not usable yet, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which of a task's addresses an IP is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpKind {
    /// The public IPv4 address associated with the task's network interface.
    Public,
    /// The task's private address in its VPC.
    Private,
}

/// The body of a Kill call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KillRequest {}

/// Kill's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillResponse {
    /// The server's state after the call: `stopping` while a task remains, else `stopped`.
    pub status: ServerStatus,
    /// The service's desired count after the call (0).
    pub desired_count: u32,
    /// Whether this call changed the desired count (false when it was already 0).
    pub changed: bool,
}

/// What Sleep decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SleepAction {
    /// The server was idle: its desired count is now 0.
    ScaledToZero,
    /// The server is in use, was woken too recently to judge, or was woken while Sleep
    /// stopped it: left alone, or wanted again.
    Kept,
    /// The desired count was already 0: nothing to do.
    AlreadyStopped,
}

/// Sleep's answer (also logged by the scheduled function).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SleepResponse {
    /// The decision.
    pub action: SleepAction,
    /// Why, in words.
    pub reason: String,
    /// The idle time after which the server is put to sleep, in seconds.
    pub idle_timeout_secs: u64,
}

/// Which certificate a CSR asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertRole {
    /// The agent: a client certificate whose one IP SAN is the agent's public IP.
    Agent,
    /// The server: a server certificate whose two IP SANs are the server's and the agent's
    /// public IPs.
    Server,
}

impl CertRole {
    /// How many IP SANs a CSR for this role must carry.
    pub fn ip_san_count(self) -> usize {
        match self {
            CertRole::Agent => 1,
            CertRole::Server => 2,
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Agent => "agent",
            CertRole::Server => "server",
        })
    }
}

/// The body of a CA call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The CSR, PEM (`CERTIFICATE REQUEST`).
    pub csr: String,
    /// Which certificate it asks for.
    pub role: CertRole,
    /// Validity wanted, in days; the CA's maximum for the role when absent. Asking for
    /// more than the maximum is refused rather than silently shortened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_days: Option<u32>,
}

/// The CA's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The signed certificate, PEM.
    pub certificate: String,
    /// The CA certificate, PEM: what the peer's certificate must chain to.
    pub ca_certificate: String,
    /// When the certificate expires, in seconds since the Unix epoch.
    pub not_after: u64,
}

/// The JSON body of every refusal and failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// A stable machine-readable code (`bad_request`, `csr_refused`, `aws_error`, …).
    pub error: String,
    /// What went wrong, in words, for the person reading the agent's output.
    pub message: String,
}

/// The control functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    /// Start the server (desired count 1) and record the agent's IP.
    Wake,
    /// Report the server's state, ARN and IPs.
    Query,
    /// Stop the server (desired count 0).
    Kill,
    /// Stop the server if it has been idle (scheduled).
    Sleep,
    /// Sign a CSR.
    Ca,
}

impl Function {
    /// Every function.
    pub const ALL: [Function; 5] = [
        Function::Wake,
        Function::Query,
        Function::Kill,
        Function::Sleep,
        Function::Ca,
    ];

    /// The lowercase name (`wake`, …): the value of `FLUIDITY_FUNCTION` and the local
    /// control host's path.
    pub fn name(self) -> &'static str {
        match self {
            Function::Wake => "wake",
            Function::Query => "query",
            Function::Kill => "kill",
            Function::Sleep => "sleep",
            Function::Ca => "ca",
        }
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Function {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Function::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown control function {s:?}; expected wake, query, kill, sleep or ca")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_id_is_the_same_from_names_and_arns() {
        let a = ServerId::new("fluidity", "tunnel");
        let b = ServerId::new(
            "arn:aws:ecs:eu-west-1:123456789012:cluster/fluidity",
            "arn:aws:ecs:eu-west-1:123456789012:service/fluidity/tunnel",
        );
        assert_eq!(a, b);
        assert_eq!(a.key(), "fluidity/tunnel");
    }

    #[test]
    fn optional_fields_are_omitted_and_unknown_ones_ignored() {
        let r = WakeResponse {
            status: ServerStatus::Starting,
            server_arn: None,
            server_public_ip: None,
            agent_public_ip_as_seen: "203.0.113.9".parse().unwrap(),
            desired_count: 1,
            changed: true,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "starting");
        assert!(v.get("server_arn").is_none());
        let mut v2 = v.clone();
        v2["future_field"] = serde_json::json!(1);
        assert_eq!(serde_json::from_value::<WakeResponse>(v2).unwrap(), r);
        let req: CertificateRequest =
            serde_json::from_str(r#"{"csr":"x","role":"server"}"#).unwrap();
        assert_eq!(req.role, CertRole::Server);
        assert_eq!(req.validity_days, None);
    }

    #[test]
    fn function_names_round_trip() {
        for f in Function::ALL {
            assert_eq!(f.name().parse::<Function>(), Ok(f));
        }
        assert!("sleepy".parse::<Function>().unwrap_err().contains("sleepy"));
    }
}
