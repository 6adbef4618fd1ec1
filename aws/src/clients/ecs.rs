//! ECS: UpdateService, DescribeServices, ListTasks, DescribeTasks.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::AwsConfig;
use crate::clients::decode;
use crate::endpoints::Service;
use crate::error::Result;

/// Pages of ListTasks followed at most (100 tasks a page).
const MAX_PAGES: usize = 50;

/// The parts of an ECS service Fluidity reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EcsService {
    /// The service ARN.
    pub service_arn: String,
    /// The service name.
    pub service_name: String,
    /// The cluster ARN.
    pub cluster_arn: String,
    /// `ACTIVE`, `DRAINING` or `INACTIVE`.
    pub status: String,
    /// Tasks wanted.
    pub desired_count: u32,
    /// Tasks running.
    pub running_count: u32,
    /// Tasks starting.
    pub pending_count: u32,
}

/// A DescribeServices/DescribeTasks failure entry (e.g. `MISSING`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Failure {
    /// The resource.
    pub arn: Option<String>,
    /// Why it failed.
    pub reason: Option<String>,
}

/// The parts of an ECS task Fluidity reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EcsTask {
    /// The task ARN.
    pub task_arn: String,
    /// `PROVISIONING`, `PENDING`, `RUNNING`, `STOPPED`, …
    pub last_status: String,
    /// `RUNNING` or `STOPPED`.
    pub desired_status: String,
    /// `startedBy`, if set.
    pub started_by: Option<String>,
    /// `service:NAME` for service tasks.
    pub group: Option<String>,
    /// The id of the task's elastic network interface (awsvpc mode).
    pub network_interface_id: Option<String>,
    /// The task's private IPv4 address (awsvpc mode).
    pub private_ipv4: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawTask {
    task_arn: String,
    last_status: String,
    desired_status: String,
    started_by: Option<String>,
    group: Option<String>,
    attachments: Vec<RawAttachment>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawAttachment {
    r#type: String,
    details: Vec<RawDetail>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawDetail {
    name: String,
    value: String,
}

impl From<RawTask> for EcsTask {
    fn from(t: RawTask) -> Self {
        let detail = |name: &str| {
            t.attachments
                .iter()
                .filter(|a| a.r#type == "ElasticNetworkInterface")
                .flat_map(|a| a.details.iter())
                .find(|d| d.name == name)
                .map(|d| d.value.clone())
        };
        EcsTask {
            network_interface_id: detail("networkInterfaceId"),
            private_ipv4: detail("privateIPv4Address"),
            task_arn: t.task_arn,
            last_status: t.last_status,
            desired_status: t.desired_status,
            started_by: t.started_by,
            group: t.group,
        }
    }
}

/// Which tasks ListTasks returns.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    /// Tasks of this service.
    pub service_name: Option<String>,
    /// Tasks of this task-definition family.
    pub family: Option<String>,
    /// Tasks with this `startedBy`.
    pub started_by: Option<String>,
    /// `RUNNING` (the API's default), `PENDING` or `STOPPED`.
    pub desired_status: Option<String>,
}

/// The ECS client.
#[derive(Clone, Debug)]
pub struct EcsClient {
    config: AwsConfig,
}

impl EcsClient {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        EcsClient {
            config: config.clone(),
        }
    }

    /// UpdateService: sets the desired count (if given) and optionally forces a new
    /// deployment. Setting an absolute count is idempotent, unlike incrementing one.
    pub fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired_count: Option<u32>,
        force_new_deployment: bool,
    ) -> Result<EcsService> {
        let mut input = json!({ "cluster": cluster, "service": service });
        if let Some(n) = desired_count {
            input["desiredCount"] = json!(n);
        }
        if force_new_deployment {
            input["forceNewDeployment"] = json!(true);
        }
        let out = self
            .config
            .call_json(Service::Ecs, "UpdateService", &input)?;
        decode(
            "ecs",
            "UpdateService",
            out.get("service").cloned().unwrap_or(Value::Null),
        )
    }

    /// DescribeServices: the services found and the failures (missing services).
    pub fn describe_services(
        &self,
        cluster: &str,
        services: &[&str],
    ) -> Result<(Vec<EcsService>, Vec<Failure>)> {
        let out = self.config.call_json(
            Service::Ecs,
            "DescribeServices",
            &json!({ "cluster": cluster, "services": services }),
        )?;
        services_answer(&out)
    }

    /// ListTasks, following pagination (up to 5000 tasks).
    pub fn list_tasks(&self, cluster: &str, filter: &TaskFilter) -> Result<Vec<String>> {
        let mut input = json!({ "cluster": cluster });
        for (key, value) in [
            ("serviceName", &filter.service_name),
            ("family", &filter.family),
            ("startedBy", &filter.started_by),
            ("desiredStatus", &filter.desired_status),
        ] {
            if let Some(v) = value {
                input[key] = json!(v);
            }
        }
        let mut arns = Vec::new();
        for _ in 0..MAX_PAGES {
            let out = self.config.call_json(Service::Ecs, "ListTasks", &input)?;
            let page: Vec<String> = list(&out, "ListTasks", "taskArns")?;
            arns.extend(page);
            match out.get("nextToken").and_then(Value::as_str) {
                Some(token) if !token.is_empty() => input["nextToken"] = json!(token),
                _ => break,
            }
        }
        Ok(arns)
    }

    /// DescribeTasks (at most 100 tasks per call, as the API allows).
    pub fn describe_tasks(
        &self,
        cluster: &str,
        tasks: &[&str],
    ) -> Result<(Vec<EcsTask>, Vec<Failure>)> {
        if tasks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let out = self.config.call_json(
            Service::Ecs,
            "DescribeTasks",
            &json!({ "cluster": cluster, "tasks": tasks }),
        )?;
        tasks_answer(&out)
    }
}

/// The list under `key` of `operation`'s answer `out` (absent: empty).
fn list<T: serde::de::DeserializeOwned>(out: &Value, operation: &str, key: &str) -> Result<Vec<T>> {
    decode("ecs", operation, out.get(key).cloned().unwrap_or(json!([])))
}

/// The services and failures of a DescribeServices answer.
pub(crate) fn services_answer(out: &Value) -> Result<(Vec<EcsService>, Vec<Failure>)> {
    Ok((
        list(out, "DescribeServices", "services")?,
        list(out, "DescribeServices", "failures")?,
    ))
}

/// The tasks and failures of a DescribeTasks answer.
pub(crate) fn tasks_answer(out: &Value) -> Result<(Vec<EcsTask>, Vec<Failure>)> {
    let raw: Vec<RawTask> = list(out, "DescribeTasks", "tasks")?;
    Ok((
        raw.into_iter().map(EcsTask::from).collect(),
        list(out, "DescribeTasks", "failures")?,
    ))
}
