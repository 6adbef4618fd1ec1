//! Who and where this server is: its ARN, its cluster and service, its public address.
//!
//! The ARN comes from, in order: ECS task metadata v4 (`ECS_CONTAINER_METADATA_URI_V4`,
//! `GET ${uri}/task`), the `ECS_TASK_ARN` and `SERVER_ARN` variables, and the EC2 instance
//! identity document (IMDSv2). The public address comes from the task's network
//! interface (ECS DescribeTasks, then EC2 DescribeNetworkInterfaces) or, on EC2, from the
//! instance metadata.

use std::net::IpAddr;
use std::time::Duration;

use fluidity_aws::clients::ec2::Ec2Client;
use fluidity_aws::clients::ecs::EcsClient;
use fluidity_aws::endpoints::Partition;
use fluidity_aws::imds::Imds;
use fluidity_aws::Env;
use serde::Deserialize;

use crate::Error;

/// Deadline of one task-metadata request; the endpoint is local to the task.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest task-metadata document read.
const METADATA_LIMIT: u64 = 1024 * 1024;

/// Where the ARN was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArnSource {
    /// ECS task metadata v4.
    TaskMetadata,
    /// The `ECS_TASK_ARN` variable.
    EcsTaskArn,
    /// The `SERVER_ARN` variable.
    ServerArn,
    /// The EC2 instance identity document.
    Ec2Metadata,
}

/// The parts of the ECS task metadata v4 `/task` document that the server reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct TaskMetadata {
    /// The cluster, usually as an ARN.
    #[serde(rename = "Cluster")]
    pub cluster: String,
    /// The task ARN.
    #[serde(rename = "TaskARN")]
    pub task_arn: String,
    /// The service the task belongs to (recent agents fill it in).
    #[serde(rename = "ServiceName")]
    pub service_name: Option<String>,
    /// The containers, with their networks.
    #[serde(rename = "Containers")]
    pub containers: Vec<ContainerMetadata>,
}

/// One container of [`TaskMetadata`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ContainerMetadata {
    /// The container's networks.
    #[serde(rename = "Networks")]
    pub networks: Vec<NetworkMetadata>,
}

/// One network of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetworkMetadata {
    /// `awsvpc`, `bridge`, `host`, …
    #[serde(rename = "NetworkMode")]
    pub network_mode: String,
    /// The private IPv4 addresses.
    #[serde(rename = "IPv4Addresses")]
    pub ipv4_addresses: Vec<String>,
}

impl TaskMetadata {
    /// The task's private addresses, for logging.
    pub fn private_ips(&self) -> Vec<IpAddr> {
        self.containers
            .iter()
            .flat_map(|c| &c.networks)
            .flat_map(|n| &n.ipv4_addresses)
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// What the server knows about itself after discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// The server's ARN: the CN of both certificates.
    pub arn: String,
    /// Where it was found.
    pub source: ArnSource,
    /// The task metadata, when running as an ECS task with metadata v4.
    pub task: Option<TaskMetadata>,
}

impl ServerIdentity {
    /// The cluster name from the task metadata (an ARN is shortened to its name).
    pub fn cluster(&self) -> Option<String> {
        self.task
            .as_ref()
            .map(|t| resource_name(&t.cluster).to_owned())
            .filter(|c| !c.is_empty())
    }

    /// The service name from the task metadata.
    pub fn service(&self) -> Option<String> {
        self.task
            .as_ref()
            .and_then(|t| t.service_name.clone())
            .filter(|s| !s.is_empty())
    }
}

/// The last path segment of an ARN (`arn:…:cluster/NAME` → `NAME`); a name stays as it is.
pub fn resource_name(name_or_arn: &str) -> &str {
    if name_or_arn.starts_with("arn:") {
        name_or_arn.rsplit('/').next().unwrap_or(name_or_arn)
    } else {
        name_or_arn
    }
}

/// Whether `s` has the shape `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE` with a
/// non-empty partition, service and resource, and no whitespace or control characters.
pub fn is_well_formed_arn(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && !parts[2].is_empty()
        && !parts[5].is_empty()
        && s.len() <= 1024
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Whether `arn` names an ECS task (`arn:…:ecs:…:task/…`).
pub fn is_ecs_task_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6 && parts[2] == "ecs" && parts[5].starts_with("task/")
}

/// GETs `url` without a proxy (metadata endpoints are link-local) and returns the body of
/// a 200 answer.
pub fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(METADATA_LIMIT)
        .read_to_string()
        .map_err(|e| format!("GET {url}: reading the answer: {e}"))?;
    if status != 200 {
        let snippet: String = body.chars().take(200).collect();
        return Err(format!("GET {url} answered HTTP {status}: {snippet}"));
    }
    Ok(body)
}

/// Fetches and parses `${base}/task` of ECS task metadata v4.
pub fn task_metadata(base: &str) -> Result<TaskMetadata, Error> {
    let url = format!("{}/task", base.trim_end_matches('/'));
    let body = http_get(&url, METADATA_TIMEOUT)
        .map_err(|e| Error::AwsStartup(format!("cannot read the ECS task metadata: {e}")))?;
    let md: TaskMetadata = serde_json::from_str(&body).map_err(|e| {
        Error::AwsStartup(format!(
            "the ECS task metadata at {url} is not what ECS serves: {e}"
        ))
    })?;
    if !is_well_formed_arn(&md.task_arn) {
        return Err(Error::AwsStartup(format!(
            "the ECS task metadata at {url} has no usable TaskARN ({:?})",
            md.task_arn
        )));
    }
    Ok(md)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceIdentity {
    account_id: String,
    region: String,
    instance_id: String,
}

/// Discovers the server's ARN (see the module documentation for the order).
pub fn discover_identity(env: &Env) -> Result<ServerIdentity, Error> {
    if let Some(base) = env.get("ECS_CONTAINER_METADATA_URI_V4") {
        let md = task_metadata(base)?;
        return Ok(ServerIdentity {
            arn: md.task_arn.clone(),
            source: ArnSource::TaskMetadata,
            task: Some(md),
        });
    }
    for (var, source) in [
        ("ECS_TASK_ARN", ArnSource::EcsTaskArn),
        ("SERVER_ARN", ArnSource::ServerArn),
    ] {
        if let Some(arn) = env.get(var) {
            if !is_well_formed_arn(arn) {
                return Err(Error::AwsStartup(format!(
                    "{var} is set but is not an ARN: {arn:?}"
                )));
            }
            return Ok(ServerIdentity {
                arn: arn.to_owned(),
                source,
                task: None,
            });
        }
    }
    let imds = Imds::from_env(env)?.ok_or_else(|| {
        Error::AwsStartup(
            "cannot tell this server's ARN: no ECS_CONTAINER_METADATA_URI_V4, ECS_TASK_ARN or \
             SERVER_ARN, and the EC2 metadata service is disabled"
                .into(),
        )
    })?;
    let doc = imds
        .get("/latest/dynamic/instance-identity/document")
        .map_err(|e| {
            Error::AwsStartup(format!(
                "cannot tell this server's ARN: no ECS_CONTAINER_METADATA_URI_V4, ECS_TASK_ARN \
                 or SERVER_ARN, and the EC2 metadata service did not answer: {e}"
            ))
        })?;
    let id: InstanceIdentity = serde_json::from_str(&doc).map_err(|e| {
        Error::AwsStartup(format!(
            "the EC2 instance identity document is unreadable: {e}"
        ))
    })?;
    Ok(ServerIdentity {
        arn: instance_arn(&id)?,
        source: ArnSource::Ec2Metadata,
        task: None,
    })
}

/// The ARN of the instance an identity document describes, whose parts must be what
/// AWS writes there: a region of letters, digits and dashes, an account of digits, an
/// instance id of letters, digits and dashes. Anything else would make another ARN (a
/// `:` or `/` moves its fields), and the ARN is the name agents must find in certificates.
fn instance_arn(id: &InstanceIdentity) -> Result<String, Error> {
    let word = |s: &str, ok: fn(char) -> bool| !s.is_empty() && s.len() <= 64 && s.chars().all(ok);
    let name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !word(&id.region, name)
        || !word(&id.account_id, |c| c.is_ascii_digit())
        || !word(&id.instance_id, name)
    {
        return Err(Error::AwsStartup(format!(
            "the EC2 instance identity document names region {:?}, account {:?} and instance \
             {:?}, which do not make an ARN",
            id.region, id.account_id, id.instance_id
        )));
    }
    Ok(format!(
        "arn:{}:ec2:{}:{}:instance/{}",
        Partition::of(&id.region).name(),
        id.region,
        id.account_id,
        id.instance_id
    ))
}

/// The addresses of task `task_arn`: (public, private), each `None` while not attached
/// ([`fluidity_aws::control::task_ips`], which Query and the CA read too).
pub fn task_ips(
    ecs: &EcsClient,
    ec2: &Ec2Client,
    cluster: &str,
    task_arn: &str,
) -> Result<(Option<IpAddr>, Option<IpAddr>), Error> {
    let (tasks, failures) = ecs.describe_tasks(cluster, &[task_arn])?;
    let task = tasks
        .into_iter()
        .find(|t| t.task_arn == task_arn)
        .ok_or_else(|| {
            Error::AwsStartup(format!(
                "ECS does not know this task ({task_arn} in cluster {cluster}): {failures:?}"
            ))
        })?;
    Ok(fluidity_aws::control::task_ips(ec2, &task)?)
}

/// The instance's public IPv4 address from the EC2 metadata service.
pub fn instance_public_ip(imds: &Imds) -> Result<IpAddr, Error> {
    let text = imds
        .get("/latest/meta-data/public-ipv4")
        .map_err(|e| Error::AwsStartup(format!("the instance has no public IPv4 address: {e}")))?;
    text.trim().parse().map_err(|_| {
        Error::AwsStartup(format!(
            "the EC2 metadata gave an unreadable public IP {text:?}"
        ))
    })
}

/// The server's address: the public IP of the task's interface when running on ECS
/// (waiting up to `limit` for it to be attached), or with `private_fallback` its private
/// IP when it has no public one (agents that reach the VPC privately, whose Query answers
/// the same with `FLUIDITY_PRIVATE_IP_FALLBACK`); else the instance metadata.
pub fn discover_public_ip(
    identity: &ServerIdentity,
    env: &Env,
    ecs: &EcsClient,
    ec2: &Ec2Client,
    cluster: Option<&str>,
    limit: Duration,
    private_fallback: bool,
) -> Result<IpAddr, Error> {
    // An ECS task ARN (from the metadata or either variable) has a network interface to
    // look up; anything else is an instance, which the metadata service describes.
    let is_task = identity.task.is_some() || is_ecs_task_arn(&identity.arn);
    if let (true, Some(cluster)) = (is_task, cluster) {
        let deadline = fluidity_runtime_smol::app::deadline_in(limit);
        let mut delay = Duration::from_millis(500);
        loop {
            match task_ips(ecs, ec2, cluster, &identity.arn) {
                Ok((Some(ip), _)) => return Ok(ip),
                Ok((None, Some(ip))) if private_fallback => {
                    tracing::info!(%ip, "the task's network interface has no public IP: serving on its private IP (private_ip_fallback)");
                    return Ok(ip);
                }
                Ok(_) => tracing::info!("the task's network interface has no public IP yet"),
                Err(Error::Aws(e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, "looking up the task's public IP")
                }
                Err(e) => return Err(e),
            }
            if fluidity_runtime_smol::app::deadline_in(delay) > deadline {
                return Err(Error::AwsStartup(if private_fallback {
                    format!(
                        "the task's network interface got neither a public nor a private IP \
                         within {limit:?}"
                    )
                } else {
                    format!(
                        "the task's network interface got no public IP within {limit:?}; run \
                         the service with assignPublicIp ENABLED, or set private_ip_fallback \
                         for agents that reach the VPC privately"
                    )
                }));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
    let imds = Imds::from_env(env)?.ok_or_else(|| {
        Error::AwsStartup(
            "cannot tell this server's public IP: not an ECS task with a known cluster, and the \
             EC2 metadata service is disabled"
                .into(),
        )
    })?;
    instance_public_ip(&imds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arn_shapes() {
        assert!(is_well_formed_arn(
            "arn:aws:ecs:us-east-1:123456789012:task/fluidity/abc"
        ));
        assert!(is_well_formed_arn("arn:aws:ec2:us-east-1:1:instance/i-1"));
        let doc = |region: &str, account: &str, instance: &str| InstanceIdentity {
            region: region.into(),
            account_id: account.into(),
            instance_id: instance.into(),
        };
        assert_eq!(
            instance_arn(&doc("cn-north-1", "123456789012", "i-0abc")).unwrap(),
            "arn:aws-cn:ec2:cn-north-1:123456789012:instance/i-0abc"
        );
        assert_eq!(
            instance_arn(&doc("us-isob-east-1", "123456789012", "i-0abc")).unwrap(),
            "arn:aws-iso-b:ec2:us-isob-east-1:123456789012:instance/i-0abc"
        );
        for bad in [
            doc("us-east-1:999", "123456789012", "i-0abc"),
            doc("us-east-1", "1234/5", "i-0abc"),
            doc("us-east-1", "123456789012", "i-0abc/../x"),
            doc("us-east-1", "123456789012", ""),
            doc("US EAST", "123456789012", "i-0abc"),
        ] {
            assert!(instance_arn(&bad).is_err(), "{:?}", bad.region);
        }
        assert!(!is_well_formed_arn("fluidity-server"));
        assert!(!is_well_formed_arn("arn:aws:ecs:us-east-1:1"));
        assert!(!is_well_formed_arn("arn::ecs:r:1:task/x"));
        assert!(!is_well_formed_arn("arn:aws:ecs:r:1:task/x y"));
        assert_eq!(
            resource_name("arn:aws:ecs:us-east-1:1:cluster/fluidity"),
            "fluidity"
        );
        assert_eq!(resource_name("fluidity"), "fluidity");
        assert!(is_ecs_task_arn("arn:aws:ecs:r:1:task/c/abc"));
        assert!(!is_ecs_task_arn("arn:aws:ec2:r:1:instance/i-1"));
        assert!(!is_ecs_task_arn("arn:aws:ecs:r:1:service/c/s"));
    }

    #[test]
    fn env_variables_in_order_and_refuses_a_non_arn() {
        let env = Env::from_pairs([
            ("ECS_TASK_ARN", "arn:aws:ecs:r:1:task/c/one"),
            ("SERVER_ARN", "arn:aws:ecs:r:1:task/c/two"),
        ]);
        let id = discover_identity(&env).unwrap();
        assert_eq!(id.arn, "arn:aws:ecs:r:1:task/c/one");
        assert_eq!(id.source, ArnSource::EcsTaskArn);
        let env = Env::from_pairs([("SERVER_ARN", "arn:aws:ecs:r:1:task/c/two")]);
        assert_eq!(
            discover_identity(&env).unwrap().source,
            ArnSource::ServerArn
        );
        let env = Env::from_pairs([("SERVER_ARN", "my-server")]);
        let err = discover_identity(&env).unwrap_err().to_string();
        assert!(err.contains("not an ARN"), "{err}");
        let env = Env::from_pairs([("AWS_EC2_METADATA_DISABLED", "true")]);
        let err = discover_identity(&env).unwrap_err().to_string();
        assert!(err.contains("cannot tell this server's ARN"), "{err}");
    }

    #[test]
    fn parses_task_metadata_v4() {
        let doc = r#"{
            "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/fluidity",
            "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/fluidity/158d1c8083dd49d6",
            "Family": "fluidity-server", "Revision": "3", "ServiceName": "fluidity-server",
            "Containers": [{"Name": "server", "Networks": [
                {"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.0.108"]}]}],
            "LaunchType": "FARGATE"
        }"#;
        let md: TaskMetadata = serde_json::from_str(doc).unwrap();
        let id = ServerIdentity {
            arn: md.task_arn.clone(),
            source: ArnSource::TaskMetadata,
            task: Some(md.clone()),
        };
        assert_eq!(id.cluster().as_deref(), Some("fluidity"));
        assert_eq!(id.service().as_deref(), Some("fluidity-server"));
        assert_eq!(
            md.private_ips(),
            vec!["10.0.0.108".parse::<IpAddr>().unwrap()]
        );
    }

    /// The seeds of `fuzz/corpus/ecs_task_metadata` are read as ECS would serve them:
    /// the documents of a Fargate task and of an EC2 task in bridge mode are accepted
    /// (so the fuzzer starts from ones that get through), the one without a TaskARN
    /// refused. A seed not listed here fails the test, so that each says what it is.
    #[test]
    fn the_task_metadata_seeds_are_read_as_they_should_be() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/ecs_task_metadata");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let accepted = match name.as_str() {
                "fargate" | "ec2-bridge" => true,
                "no-task-arn" => false,
                other => panic!("seed {other} is not listed in this test"),
            };
            let doc = std::fs::read_to_string(&path).unwrap();
            let got = task_metadata(&serve(vec![(200, doc)]));
            assert_eq!(got.is_ok(), accepted, "{name}: {:?}", got.err());
            if let Ok(md) = got {
                assert!(!md.private_ips().is_empty(), "{name} names no address");
            }
            seen += 1;
        }
        assert_eq!(seen, 3);
    }

    /// Serves one canned HTTP answer per connection on 127.0.0.1, `n` times.
    fn serve(answers: Vec<(u16, String)>) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for (status, body) in answers {
                let Ok((conn, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://{addr}/v4/abc")
    }

    #[test]
    fn reads_task_metadata_over_http_before_the_variables() {
        let doc = r#"{"Cluster":"arn:aws:ecs:eu-west-1:1:cluster/c","TaskARN":"arn:aws:ecs:eu-west-1:1:task/c/t1","ServiceName":"s"}"#;
        let uri = serve(vec![(200, doc.to_owned())]);
        let env = Env::from_pairs([
            ("ECS_CONTAINER_METADATA_URI_V4", uri.as_str()),
            ("SERVER_ARN", "arn:aws:ecs:eu-west-1:1:task/c/other"),
        ]);
        let id = discover_identity(&env).unwrap();
        assert_eq!(id.arn, "arn:aws:ecs:eu-west-1:1:task/c/t1");
        assert_eq!(id.source, ArnSource::TaskMetadata);
        assert_eq!(id.cluster().as_deref(), Some("c"));
        assert_eq!(id.service().as_deref(), Some("s"));

        let uri = serve(vec![
            (404, "no".into()),
            (200, r#"{"TaskARN":"nope"}"#.into()),
        ]);
        let env = Env::from_pairs([("ECS_CONTAINER_METADATA_URI_V4", uri.as_str())]);
        let err = discover_identity(&env).unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
        let err = discover_identity(&env).unwrap_err().to_string();
        assert!(err.contains("no usable TaskARN"), "{err}");
    }
}
