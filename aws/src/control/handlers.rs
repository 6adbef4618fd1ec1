//! The handlers: Wake, Query, Kill, Sleep and CA as plain functions of a [`Control`] (the
//! settings and the AWS clients), a request and the time.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use fluidity_runtime_smol::pki::{self, CaBundle};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::agent_ip::{live_agent_ip, put_agent_ip, read_agent_ip};
use super::ca;
use super::config::ControlConfig;
use super::error::ControlError;
use super::types::{
    CertRole, CertificateRequest, CertificateResponse, Function, IpKind, KillRequest, KillResponse,
    QueryRequest, QueryResponse, ServerId, ServerStatus, SleepAction, SleepResponse, WakeRequest,
    WakeResponse, METRIC_ACTIVE_TUNNELS, METRIC_DIMENSION, METRIC_PERIOD,
};
use crate::clients::cloudwatch::CloudWatchClient;
use crate::clients::dynamodb::DynamoDbClient;
use crate::clients::ec2::Ec2Client;
use crate::clients::ecs::{EcsClient, EcsService, EcsTask, TaskFilter};
use crate::clients::secrets::SecretsManagerClient;
use crate::iam_auth::{allows, normalize_arn};
use crate::AwsConfig;

/// How long the CA is kept in memory between invocations: long enough to spare Secrets
/// Manager a call per certificate, short enough that a rotated CA is picked up soon.
const CA_CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// Largest request body accepted (a CSR is about 1 KiB).
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// What the control functions run with: settings, AWS configuration and a cache of the CA.
#[derive(Debug)]
pub struct Control {
    config: ControlConfig,
    aws: AwsConfig,
    ca_cache: Mutex<Option<(Instant, CaBundle)>>,
}

/// Who calls a function, as its function URL saw them (the local control host knows the
/// address only; a scheduled or direct invocation, neither).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// The caller's source address.
    pub ip: Option<IpAddr>,
    /// The caller's IAM ARN, from the function URL's `AWS_IAM` authorisation.
    pub arn: Option<String>,
}

/// The server's task, its addresses, and the service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerState {
    /// The ECS service.
    pub service: EcsService,
    /// The task serving, if one exists (a running one in preference).
    pub task: Option<EcsTask>,
    /// Tasks ECS is stopping that have not stopped yet (a server draining its tunnels).
    pub draining: usize,
    /// The public IP of the task's network interface, if any.
    pub public_ip: Option<IpAddr>,
    /// The private IP of the task, if known.
    pub private_ip: Option<IpAddr>,
}

/// The public and private IPs of `task`'s network interface (the private one from the
/// task's own attachment while the interface has none): how Query finds the address to
/// dial, the CA the addresses a server certificate may name, and the server its own.
pub fn task_ips(
    ec2: &Ec2Client,
    task: &EcsTask,
) -> crate::Result<(Option<IpAddr>, Option<IpAddr>)> {
    let ip = |s: Option<&str>| s.and_then(|s| s.parse::<IpAddr>().ok());
    let attached = ip(task.private_ipv4.as_deref());
    let Some(eni) = task.network_interface_id.as_deref() else {
        return Ok((None, attached));
    };
    let found = ec2.describe_network_interfaces(&[eni])?;
    Ok(match found.into_iter().find(|n| n.id == eni) {
        Some(ni) => (
            ip(ni.public_ip.as_deref()),
            ip(ni.private_ip.as_deref()).or(attached),
        ),
        None => (None, attached),
    })
}

/// Unmaps IPv4-mapped IPv6 addresses (a dual-stack listener's view of an IPv4 caller),
/// so the address stored and certified is the one the server will see.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

pub(crate) fn parse_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ControlError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ControlError::bad_request(format!("the request body is not the expected JSON: {e}"))
    })
}

/// The point in [`Control::wake_observed`] where a concurrent Sleep matters.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeStep {
    /// Wake has read the service's desired count and will store the agent's address.
    ServiceRead,
}

/// The points in [`Control::sleep_observed`] where a concurrent Wake matters.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepStep {
    /// Sleep has read the last wake and the metric and will set 0.
    Decided,
    /// Sleep has set 0 and will read the last wake again.
    ScaledToZero,
}

/// Whether `task`, listed as a task of `id`'s service, has not stopped (it may be
/// draining) and is not another service's: ListTasks filters by service in AWS, and a
/// group naming another service drops the task where that filter is ignored (moto).
fn of_service(task: &EcsTask, id: &ServerId) -> bool {
    let own_group = format!("service:{}", id.service());
    task.last_status != "STOPPED"
        && task
            .group
            .as_deref()
            .is_none_or(|g| !g.starts_with("service:") || g == own_group)
}

/// Whether `task` serves `id`: a task of the service that ECS is not stopping.
fn serves(task: &EcsTask, id: &ServerId) -> bool {
    of_service(task, id) && task.desired_status != "STOPPED"
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::config(format!("unserialisable answer: {e}")))
}

impl Control {
    /// Handlers over `config` calling AWS with `aws`.
    pub fn new(config: ControlConfig, aws: AwsConfig) -> Self {
        Control {
            config,
            aws,
            ca_cache: Mutex::new(None),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Runs `function` on a raw request body: what the Lambda entry point and the local
    /// control host call, for `caller`.
    pub fn dispatch(
        &self,
        function: Function,
        caller: &Caller,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Value, ControlError> {
        if body.len() > MAX_BODY_LEN {
            return Err(ControlError::bad_request(format!(
                "the request body is {} bytes, more than {MAX_BODY_LEN}",
                body.len()
            )));
        }
        match function {
            Function::Wake => {
                let req: WakeRequest = parse_body(body)?;
                let ip = caller.ip.ok_or_else(|| {
                    ControlError::bad_request(
                        "Wake needs the caller's source IP: call it through its function URL",
                    )
                })?;
                to_value(&self.wake(&req, ip, now)?)
            }
            Function::Query => to_value(&self.query(&parse_body::<QueryRequest>(body)?, now)?),
            Function::Kill => to_value(&self.kill(&parse_body::<KillRequest>(body)?)?),
            Function::Sleep => to_value(&self.sleep(now)?),
            Function::Ca => {
                if body.iter().all(u8::is_ascii_whitespace) {
                    return Err(ControlError::bad_request(
                        "the CA needs a JSON body with csr and role",
                    ));
                }
                let req: CertificateRequest = serde_json::from_slice(body).map_err(|e| {
                    ControlError::bad_request(format!(
                        "the request body is not {{\"csr\": PEM, \"role\": \"agent\"|\"server\"}}: {e}"
                    ))
                })?;
                to_value(&self.sign_certificate(&req, caller, now)?)
            }
        }
    }

    fn ecs(&self) -> EcsClient {
        EcsClient::new(&self.aws)
    }

    fn ddb(&self) -> DynamoDbClient {
        DynamoDbClient::new(&self.aws)
    }

    /// The ECS service, or a clear error when it or its cluster does not exist.
    fn service(&self, id: &ServerId) -> Result<EcsService, ControlError> {
        let (found, failures) = self
            .ecs()
            .describe_services(id.cluster(), &[id.service()])
            .map_err(|e| ControlError::aws(&format!("could not read ECS service {id}"), &e))?;
        match found.into_iter().find(|s| s.status != "INACTIVE") {
            Some(s) => Ok(s),
            None => {
                let reason = failures
                    .iter()
                    .find_map(|f| f.reason.clone())
                    .unwrap_or_else(|| "INACTIVE".into());
                Err(ControlError {
                    status: 502,
                    code: "service_not_found",
                    message: format!(
                        "ECS service {} does not exist in cluster {} ({reason}); check FLUIDITY_CLUSTER and FLUIDITY_SERVICE",
                        id.service(),
                        id.cluster()
                    ),
                })
            }
        }
    }

    /// The tasks of `id`'s service that have not stopped, draining ones included: listed by
    /// service and described.
    ///
    /// ListTasks filters by service in AWS (moto ignores that filter), and tasks whose
    /// group names another service are dropped as well, so a cluster shared with other
    /// services cannot lend this one a task.
    fn service_tasks(&self, id: &ServerId) -> Result<Vec<EcsTask>, ControlError> {
        let ecs = self.ecs();
        let filter = TaskFilter {
            service_name: Some(id.service().to_string()),
            ..TaskFilter::default()
        };
        let what = format!("could not list the tasks of ECS service {id}");
        let arns = ecs
            .list_tasks(id.cluster(), &filter)
            .map_err(|e| ControlError::aws(&what, &e))?;
        let mut tasks = Vec::new();
        for chunk in arns.chunks(100) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let (found, _) = ecs
                .describe_tasks(id.cluster(), &refs)
                .map_err(|e| ControlError::aws(&what, &e))?;
            tasks.extend(found);
        }
        tasks.retain(|t| of_service(t, id));
        Ok(tasks)
    }

    /// The service, its task and the task's addresses.
    pub fn server_state(&self, id: &ServerId) -> Result<ServerState, ControlError> {
        let service = self.service(id)?;
        let mut tasks = self.service_tasks(id)?;
        let draining = tasks.iter().filter(|t| !serves(t, id)).count();
        tasks.retain(|t| serves(t, id));
        tasks.sort_by_key(|t| t.last_status != "RUNNING");
        let task = tasks.into_iter().next();
        let (public_ip, private_ip) = match &task {
            Some(t) => self.task_ips(t)?,
            None => (None, None),
        };
        Ok(ServerState {
            service,
            task,
            draining,
            public_ip,
            private_ip,
        })
    }

    /// [`task_ips`], or a clear error.
    fn task_ips(&self, task: &EcsTask) -> Result<(Option<IpAddr>, Option<IpAddr>), ControlError> {
        task_ips(&Ec2Client::new(&self.aws), task).map_err(|e| {
            ControlError::aws(
                &format!(
                    "could not read the network interface of task {}",
                    task.task_arn
                ),
                &e,
            )
        })
    }

    /// The address to dial and its kind, per the private-IP fallback setting.
    fn dial_ip(&self, state: &ServerState) -> Option<(IpAddr, IpKind)> {
        match (state.public_ip, state.private_ip) {
            (Some(ip), _) => Some((ip, IpKind::Public)),
            (None, Some(ip)) if self.config.private_ip_fallback => Some((ip, IpKind::Private)),
            _ => None,
        }
    }

    /// The status and, when not usable yet, why.
    fn status(&self, state: &ServerState) -> (ServerStatus, Option<String>) {
        let task = state.task.as_ref();
        if state.service.desired_count == 0 {
            return match task {
                Some(t) => (
                    ServerStatus::Stopping,
                    Some(format!("task is {} and being stopped", t.last_status)),
                ),
                None if state.draining > 0 => (
                    ServerStatus::Stopping,
                    Some("a task ECS is stopping has not stopped yet".into()),
                ),
                None => (ServerStatus::Stopped, None),
            };
        }
        match task {
            None => (
                ServerStatus::Starting,
                Some("no task yet: ECS is placing one".into()),
            ),
            Some(t) if t.last_status != "RUNNING" => (
                ServerStatus::Starting,
                Some(format!("task is {}", t.last_status)),
            ),
            Some(_) if self.dial_ip(state).is_none() => (
                ServerStatus::Starting,
                Some(match state.private_ip {
                    Some(p) => format!(
                        "task is RUNNING but its network interface has no public IP (private {p}; set FLUIDITY_PRIVATE_IP_FALLBACK=true to use it)"
                    ),
                    None => "task is RUNNING but has no network interface address yet".into(),
                }),
            ),
            Some(_) => (ServerStatus::Running, None),
        }
    }

    /// Wake: stores the caller's IP for the server (one-hour TTL), then sets the
    /// service's desired count to 1, and reports the task if one exists. The IP is
    /// stored first so that a server never starts without it; a missing service or
    /// table fails the call before anything changes.
    ///
    /// The count is set even when the service already read 1: a Sleep may have read the
    /// last wake before this one stored its record and set 0 since, and only the order
    /// "record, then count" lets Sleep and Wake together always end at 1 (see
    /// [`Control::sleep`]). `changed` reports whether the count read before was not 1.
    pub fn wake(
        &self,
        req: &WakeRequest,
        source_ip: IpAddr,
        now: SystemTime,
    ) -> Result<WakeResponse, ControlError> {
        self.wake_observed(req, source_ip, now, |_| {})
    }

    /// [`Control::wake`], calling `at` at the [`WakeStep`] where another function's call
    /// can land: for tests of that race.
    #[doc(hidden)]
    pub fn wake_observed(
        &self,
        _req: &WakeRequest,
        source_ip: IpAddr,
        now: SystemTime,
        mut at: impl FnMut(WakeStep),
    ) -> Result<WakeResponse, ControlError> {
        let id = self.config.server()?;
        let table = self.config.table()?;
        let agent_ip = canonical_ip(source_ip);
        let service = self.service(id)?;
        at(WakeStep::ServiceRead);
        put_agent_ip(
            &self.ddb(),
            table,
            id,
            agent_ip,
            now,
            self.config.agent_ip_ttl,
        )
        .map_err(|e| {
            ControlError::aws(
                &format!("could not store the agent IP in DynamoDB table {table}"),
                &e,
            )
        })?;
        let changed = service.desired_count != 1;
        self.scale(id, 1)?;
        let mut state = self.server_state(id)?;
        state.service.desired_count = 1;
        let (status, _) = self.status(&state);
        tracing::info!(server = %id, %agent_ip, changed, %status, "wake");
        Ok(WakeResponse {
            status,
            server_arn: state.task.as_ref().map(|t| t.task_arn.clone()),
            server_public_ip: state.public_ip,
            agent_public_ip_as_seen: agent_ip,
            desired_count: 1,
            changed,
        })
    }

    /// Query: the server's status, ARN and address, and the agent IP stored for it.
    pub fn query(
        &self,
        _req: &QueryRequest,
        now: SystemTime,
    ) -> Result<QueryResponse, ControlError> {
        let id = self.config.server()?;
        let table = self.config.table()?;
        let state = self.server_state(id)?;
        let agent = live_agent_ip(&self.ddb(), table, id, now).map_err(|e| {
            ControlError::aws(
                &format!("could not read the agent IP from DynamoDB table {table}"),
                &e,
            )
        })?;
        let (status, detail) = self.status(&state);
        let dial = self.dial_ip(&state);
        Ok(QueryResponse {
            status,
            server_ip: dial.map(|(ip, _)| ip),
            server_ip_kind: dial.map(|(_, kind)| kind),
            server_arn: state.task.as_ref().map(|t| t.task_arn.clone()),
            agent_public_ip: agent.map(|r| r.agent_ip),
            desired_count: state.service.desired_count,
            task_status: state.task.as_ref().map(|t| t.last_status.clone()),
            detail,
        })
    }

    /// Kill: sets the desired count to 0 unless it already is; "stopping" while a task of the
    /// service has not stopped (draining ones too), "stopped" once none is left.
    pub fn kill(&self, _req: &KillRequest) -> Result<KillResponse, ControlError> {
        let id = self.config.server()?;
        let service = self.service(id)?;
        let changed = service.desired_count != 0;
        if changed {
            self.scale(id, 0)?;
        }
        // A task ECS is stopping still runs (and bills) until it has drained.
        let status = if self.service_tasks(id)?.is_empty() {
            ServerStatus::Stopped
        } else {
            ServerStatus::Stopping
        };
        tracing::info!(server = %id, changed, %status, "kill");
        Ok(KillResponse {
            status,
            desired_count: 0,
            changed,
        })
    }

    /// Sleep: scales the service to zero when no tunnel was active for the idle timeout.
    ///
    /// The decision, in order: nothing to do if the desired count is 0; keep a server
    /// woken within the idle timeout (a server that just started has published nothing
    /// yet, so an empty metric must not kill it); keep it if any `ActiveTunnels` sample in
    /// the window is above zero; otherwise stop it, whether the samples were all zero or
    /// there were none at all (a server that long after its wake publishes nothing is not
    /// serving). Any failure to read leaves the server running (or wanted again) and
    /// fails the call.
    ///
    /// A Wake may land while Sleep decides: after setting 0, Sleep reads the last wake
    /// again and, if a newer one is stored, sets 1 back and keeps the server. With Wake
    /// storing its record before it sets 1, either Sleep sees the new record or Wake sets
    /// 1 after Sleep's 0 (ECS applies a service's updates in order), so the service ends
    /// wanted either way.
    pub fn sleep(&self, now: SystemTime) -> Result<SleepResponse, ControlError> {
        self.sleep_observed(now, |_| {})
    }

    /// [`Control::sleep`], calling `at` at each [`SleepStep`] where another function's
    /// call can land: for tests of those races.
    #[doc(hidden)]
    pub fn sleep_observed(
        &self,
        now: SystemTime,
        mut at: impl FnMut(SleepStep),
    ) -> Result<SleepResponse, ControlError> {
        let id = self.config.server()?;
        let table = self.config.table()?;
        let idle = self.config.idle_timeout;
        let idle_minutes = idle.as_secs() / 60;
        let answer = |action, reason: String| {
            tracing::info!(server = %id, ?action, %reason, "sleep");
            Ok(SleepResponse {
                action,
                reason,
                idle_timeout_secs: idle.as_secs(),
            })
        };
        let service = self.service(id)?;
        if service.desired_count == 0 {
            return answer(
                SleepAction::AlreadyStopped,
                "the desired count is already 0".into(),
            );
        }
        // The record's time counts even past its TTL: it is the last wake either way.
        let record = read_agent_ip(&self.ddb(), table, id).map_err(|e| {
            ControlError::aws(
                &format!("could not read the last wake from DynamoDB table {table}"),
                &e,
            )
        })?;
        if let Some(r) = &record {
            let since = now.duration_since(r.updated_at).unwrap_or(Duration::ZERO);
            if since < idle {
                return answer(
                    SleepAction::Kept,
                    format!(
                        "woken {}s ago, less than the {idle_minutes}-minute idle timeout",
                        since.as_secs()
                    ),
                );
            }
        }
        let start = now.checked_sub(idle).unwrap_or(SystemTime::UNIX_EPOCH);
        let key = id.key();
        let points = CloudWatchClient::new(&self.aws)
            .get_metric_statistics(
                &self.config.metric_namespace,
                METRIC_ACTIVE_TUNNELS,
                &[(METRIC_DIMENSION, key.as_str())],
                start,
                now,
                sleep_period(idle),
                &["Maximum"],
            )
            .map_err(|e| {
                ControlError::aws(
                    &format!("could not read the {METRIC_ACTIVE_TUNNELS} metric"),
                    &e,
                )
            })?;
        let busiest = points
            .iter()
            .filter_map(|p| p.maximum)
            .fold(0.0_f64, f64::max);
        if busiest > 0.0 {
            return answer(
                SleepAction::Kept,
                format!("up to {busiest} active tunnels in the last {idle_minutes} minutes"),
            );
        }
        let reason = if points.is_empty() {
            format!(
                "no {METRIC_ACTIVE_TUNNELS} data in the last {idle_minutes} minutes and no wake in that time"
            )
        } else {
            format!("no active tunnel in the last {idle_minutes} minutes")
        };
        at(SleepStep::Decided);
        self.scale(id, 0)?;
        at(SleepStep::ScaledToZero);
        // Strongly consistent: a Wake whose record is not seen here sets 1 after the 0
        // above. A record gone since (its TTL) is no wake. When the record cannot be read,
        // the server is wanted again too: a server left idle until the next Sleep costs
        // less than a wake lost.
        let again = read_agent_ip(&self.ddb(), table, id);
        let woken = match &again {
            Ok(after) => after.is_some() && *after != record,
            Err(_) => true,
        };
        if !woken {
            return answer(SleepAction::ScaledToZero, reason);
        }
        let restored = self.scale(id, 1).map_err(|e| {
            format!(
                "{}; the service is left at 0 tasks until an agent wakes it again",
                e.message
            )
        });
        match (again, restored) {
            (Ok(_), Ok(())) => answer(
                SleepAction::Kept,
                "an agent woke the server while it was being stopped".into(),
            ),
            (Ok(_), Err(failed)) => Err(ControlError::aws_told(format!(
                "an agent woke the server while it was being stopped, and setting it back \
                 failed: {failed}"
            ))),
            (Err(e), restored) => Err(ControlError::aws(
                &format!(
                    "set ECS service {id} to 0 tasks, then could not read the last wake again \
                     from DynamoDB table {table}, {}",
                    match restored {
                        Ok(()) => "so set it back to 1".to_string(),
                        Err(failed) => format!("and setting it back to 1 failed too ({failed})"),
                    }
                ),
                &e,
            )),
        }
    }

    /// Sets the desired count of the service `id` to `count`.
    fn scale(&self, id: &ServerId, count: u32) -> Result<(), ControlError> {
        self.ecs()
            .update_service(id.cluster(), id.service(), Some(count), false)
            .map_err(|e| {
                let tasks = if count == 1 { "task" } else { "tasks" };
                ControlError::aws(
                    &format!("could not set ECS service {id} to {count} {tasks}"),
                    &e,
                )
            })?;
        Ok(())
    }

    /// CA: checks the request against the policy, an agent certificate against its
    /// caller's address and a server certificate against the service's task (before
    /// touching the CA), and signs it.
    pub fn sign_certificate(
        &self,
        req: &CertificateRequest,
        caller: &Caller,
        now: SystemTime,
    ) -> Result<CertificateResponse, ControlError> {
        let max_days = self.config.max_cert_days(req.role);
        ca::check_request(req, max_days)?;
        ca::check_caller(req, caller.ip)?;
        if req.role == CertRole::Server {
            self.check_server_request(req, caller, now)?;
        }
        let bundle = self.ca()?;
        let resp = ca::sign(&bundle, req, max_days)?;
        tracing::info!(role = %req.role, not_after = resp.not_after, "certificate issued");
        Ok(resp)
    }

    /// Checks that a server certificate names what only the service's own task can claim:
    /// its CN a live task of the service, its first IP SAN that task's address (public or
    /// private) and its second the agent address Wake stored; and, with
    /// `server_callers` set, that the caller is on that list. Without this, whoever may
    /// call the CA could have a certificate agents trust for any task and address.
    fn check_server_request(
        &self,
        req: &CertificateRequest,
        caller: &Caller,
        now: SystemTime,
    ) -> Result<(), ControlError> {
        if !self.config.server_callers.is_empty() {
            let Some(arn) = caller.arn.as_deref() else {
                return Err(ControlError::csr_refused(
                    "FLUIDITY_SERVER_CALLERS is set and this call names no caller: the CA's \
                     function URL with AWS_IAM authorisation names it (the local control host \
                     does not)",
                ));
            };
            let who = normalize_arn(arn);
            if !allows(&self.config.server_callers, &who) {
                return Err(ControlError::csr_refused(format!(
                    "{who} may not have a server certificate: it is not in \
                     FLUIDITY_SERVER_CALLERS"
                )));
            }
        }
        let id = self.config.server().map_err(|_| {
            ControlError::config(
                "the CA checks a server certificate against the service's task: set \
                 FLUIDITY_CLUSTER, FLUIDITY_SERVICE and FLUIDITY_TABLE",
            )
        })?;
        let table = self.config.table()?;
        let names = pki::csr_names(&req.csr)
            .map_err(|e| ControlError::csr_refused(format!("the CSR is not acceptable: {e}")))?;
        let cn = names.common_name.as_deref().unwrap_or_default();
        let [server_ip, agent_ip] = names.ip_sans.as_slice() else {
            return Err(ControlError::csr_refused(
                "a server certificate needs exactly two IP SANs (the server's and the agent's)",
            ));
        };
        let (server_ip, agent_ip) = (canonical_ip(*server_ip), canonical_ip(*agent_ip));
        let (found, _) = self
            .ecs()
            .describe_tasks(id.cluster(), &[cn])
            .map_err(|e| ControlError::aws(&format!("could not read task {cn}"), &e))?;
        // DescribeTasks takes any task of the cluster: only one the service started (its
        // group names it) is the server's.
        let own_group = format!("service:{}", id.service());
        let Some(task) = found.into_iter().find(|t| {
            t.task_arn == cn && serves(t, id) && t.group.as_deref() == Some(own_group.as_str())
        }) else {
            return Err(ControlError::csr_refused(format!(
                "a server certificate is for a live task of ECS service {id}, and {cn} is not one"
            )));
        };
        let (public, private) = self.task_ips(&task)?;
        let addresses: Vec<IpAddr> = public.into_iter().chain(private).collect();
        if !addresses.iter().any(|a| canonical_ip(*a) == server_ip) {
            return Err(ControlError::csr_refused(format!(
                "a server certificate's first IP SAN is its task's address, and {server_ip} is \
                 not one of task {cn}'s ({})",
                if addresses.is_empty() {
                    "it has none yet".to_string()
                } else {
                    addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        let stored = live_agent_ip(&self.ddb(), table, id, now).map_err(|e| {
            ControlError::aws(
                &format!("could not read the agent IP from DynamoDB table {table}"),
                &e,
            )
        })?;
        match stored.map(|r| canonical_ip(r.agent_ip)) {
            Some(ip) if ip == agent_ip => Ok(()),
            Some(ip) => Err(ControlError::csr_refused(format!(
                "a server certificate's second IP SAN is the agent address Wake stored, {ip}, \
                 and this CSR names {agent_ip}"
            ))),
            None => Err(ControlError::csr_refused(format!(
                "a server certificate names the agent address Wake stores, and none is stored \
                 for ECS service {id} (a Wake's address lasts an hour)"
            ))),
        }
    }

    /// The CA from Secrets Manager, cached for [`CA_CACHE_TTL`].
    fn ca(&self) -> Result<CaBundle, ControlError> {
        let mut cache = self.ca_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bundle)) = cache.as_ref() {
            if at.elapsed() < CA_CACHE_TTL {
                return Ok(bundle.clone());
            }
        }
        let secret_id = self.config.ca_secret()?;
        let secret = SecretsManagerClient::new(&self.aws)
            .get_secret_value(secret_id)
            .map_err(|e| {
                ControlError::aws(&format!("could not read the CA secret {secret_id}"), &e)
            })?;
        let text = secret.secret_string.as_deref().ok_or_else(|| {
            ControlError::config(format!("the CA secret {secret_id} holds no string"))
        })?;
        let bundle = ca::parse_ca_secret(text)?;
        *cache = Some((Instant::now(), bundle.clone()));
        Ok(bundle)
    }
}

/// The period in which Sleep reads the metric over `idle`: the one it is published in,
/// or a multiple of it that keeps the answer well within GetMetricStatistics' 1,440
/// datapoints (CloudWatch rounds the start down, so an idle timeout of 1,440 periods
/// would ask for 1,441). A period's maximum is the maximum of the samples in it.
fn sleep_period(idle: Duration) -> Duration {
    const MAX_POINTS: u64 = 1000;
    let periods = idle.as_secs().div_ceil(METRIC_PERIOD.as_secs());
    METRIC_PERIOD
        * u32::try_from(periods.div_ceil(MAX_POINTS))
            .unwrap_or(u32::MAX)
            .max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sleep_reads_at_most_a_thousand_periods() {
        use super::{sleep_period, METRIC_PERIOD};
        use std::time::Duration;
        let minutes = |m: u64| Duration::from_secs(60 * m);
        for (idle, period) in [
            (minutes(1), METRIC_PERIOD),
            (minutes(15), METRIC_PERIOD),
            (minutes(1000), METRIC_PERIOD),
            (minutes(1001), METRIC_PERIOD * 2),
            (minutes(24 * 60), METRIC_PERIOD * 2),
        ] {
            assert_eq!(sleep_period(idle), period, "{idle:?}");
            assert!(idle.as_secs() / period.as_secs() < 1440);
        }
    }

    use std::sync::Arc;

    use super::*;
    use crate::{Credentials, Endpoints, HttpClient};

    /// Handlers whose AWS calls would go nowhere: every case here must be decided before
    /// any call is made.
    fn offline(config: ControlConfig) -> Control {
        let aws = AwsConfig::new(
            "us-east-1",
            Arc::new(Credentials::new("AKIDTEST", "secret", None, None, "test")),
            Endpoints::global("http://127.0.0.1:9"),
            HttpClient::direct().unwrap(),
        );
        Control::new(config, aws)
    }

    #[test]
    fn bad_requests_are_refused_before_any_aws_call() {
        let c = offline(ControlConfig::default());
        let now = SystemTime::now();
        let ip = &Caller {
            ip: Some("203.0.113.9".parse().unwrap()),
            arn: None,
        };
        for (function, body, why) in [
            (Function::Ca, &b""[..], "needs a JSON body"),
            (Function::Ca, b"{\"csr\": 1}", "not {\"csr\""),
            (Function::Query, b"[1, 2]", "not the expected JSON"),
            (Function::Wake, b"nonsense", "not the expected JSON"),
        ] {
            let e = c.dispatch(function, ip, body, now).unwrap_err();
            assert_eq!(e.code, "bad_request", "{function}: {e}");
            assert!(e.message.contains(why), "{function}: {e}");
        }
        let e = c
            .dispatch(Function::Wake, &Caller::default(), b"{}", now)
            .unwrap_err();
        assert!(e.message.contains("source IP"), "{e}");
        let big = vec![b' '; MAX_BODY_LEN + 1];
        let e = c.dispatch(Function::Kill, ip, &big, now).unwrap_err();
        assert!(e.message.contains("more than"), "{e}");
        let e = c.dispatch(Function::Query, ip, b"", now).unwrap_err();
        assert_eq!((e.status, e.code), (500, "configuration"));
        assert!(e.message.contains("FLUIDITY_CLUSTER"), "{e}");
    }

    /// After a Kill, ECS marks the task to stop at once but it runs on while the server
    /// drains: that is "stopping", not "stopped".
    #[test]
    fn a_draining_task_is_stopping_not_stopped() {
        let c = offline(ControlConfig::default());
        let id = ServerId::new("c", "s");
        let task = |last: &str, desired: &str| EcsTask {
            task_arn: "arn:aws:ecs:us-east-1:123456789012:task/c/0a1b".into(),
            last_status: last.into(),
            desired_status: desired.into(),
            group: Some("service:s".into()),
            ..EcsTask::default()
        };
        assert!(of_service(&task("RUNNING", "STOPPED"), &id));
        assert!(!serves(&task("RUNNING", "STOPPED"), &id));
        assert!(!of_service(&task("STOPPED", "STOPPED"), &id));
        let other = EcsTask {
            group: Some("service:other".into()),
            ..task("RUNNING", "RUNNING")
        };
        assert!(!of_service(&other, &id));
        let stopped = ServerState::default();
        assert_eq!(c.status(&stopped).0, ServerStatus::Stopped);
        let draining = ServerState {
            draining: 1,
            ..ServerState::default()
        };
        let (status, detail) = c.status(&draining);
        assert_eq!(status, ServerStatus::Stopping);
        assert!(detail.unwrap_or_default().contains("not stopped yet"));
    }

    /// The caller and the settings are checked before the task, the addresses or the CA
    /// are read: these handlers reach no AWS.
    #[test]
    fn a_server_certificate_is_refused_to_callers_off_the_list() {
        let arn = "arn:aws:ecs:us-east-1:123456789012:task/fluidity/0a1b";
        let ips: Vec<IpAddr> = vec![
            "198.51.100.7".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
        ];
        let req = CertificateRequest {
            csr: pki::create_csr(arn, &ips).unwrap().csr_pem,
            role: CertRole::Server,
            validity_days: None,
        };
        let c = offline(ControlConfig {
            server_callers: vec!["arn:aws:iam::123456789012:role/fluidity-server"
                .parse()
                .unwrap()],
            ..ControlConfig::default()
        });
        let now = SystemTime::now();
        let as_caller = |arn: Option<&str>| {
            let caller = Caller {
                ip: Some(ips[0]),
                arn: arn.map(str::to_string),
            };
            c.sign_certificate(&req, &caller, now).unwrap_err()
        };
        let e = as_caller(None);
        assert_eq!(e.code, "csr_refused", "{e}");
        assert!(e.message.contains("names no caller"), "{e}");
        let e = as_caller(Some(
            "arn:aws:sts::123456789012:assumed-role/fluidity-agent/s",
        ));
        assert_eq!(e.code, "csr_refused", "{e}");
        assert!(
            e.message.contains(
                "arn:aws:iam::123456789012:role/fluidity-agent may not have a server certificate"
            ),
            "{e}"
        );
        // The server's own role passes the list and goes on to the task, which these
        // settings cannot name.
        let e = as_caller(Some(
            "arn:aws:sts::123456789012:assumed-role/fluidity-server/0a1b",
        ));
        assert_eq!(e.code, "configuration", "{e}");
        assert!(
            e.message.contains("FLUIDITY_CLUSTER, FLUIDITY_SERVICE"),
            "{e}"
        );
    }

    #[test]
    fn function_url_refusals_are_http_answers() {
        let c = offline(ControlConfig::default());
        let event = serde_json::json!({
            "requestContext": { "http": { "method": "POST", "sourceIp": "203.0.113.9" } },
            "body": "{\"csr\": \"x\", \"role\": \"agent\"}",
        });
        let answer =
            super::super::lambda::handle_event(&c, Function::Ca, &event, SystemTime::now())
                .unwrap();
        assert_eq!(answer["statusCode"], 400);
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["error"], "csr_refused");
        // A scheduled invocation that fails is an error for the runtime to report.
        let sched = serde_json::json!({ "source": "aws.events" });
        let e = super::super::lambda::handle_event(&c, Function::Sleep, &sched, SystemTime::now())
            .unwrap_err();
        assert_eq!(e.code, "configuration");
    }
}
