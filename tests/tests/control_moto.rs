//! The control plane against moto with IAM checks on: Wake, Query, Kill, Sleep and CA over
//! ECS (cluster, service, FARGATE tasks), EC2 network interfaces with Elastic IPs,
//! DynamoDB with TTL, CloudWatch metrics and Secrets Manager; then the same handlers
//! through the real `fluidity-control` binary with `ControlClient`, and the real
//! `bootstrap` binary against a small local Lambda Runtime API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use fluidity_aws::clients::cloudwatch::{CloudWatchClient, MetricDatum};
use fluidity_aws::clients::dynamodb::DynamoDbClient;
use fluidity_aws::clients::ec2::Ec2Client;
use fluidity_aws::clients::ecs::EcsClient;
use fluidity_aws::control::agent_ip::read_agent_ip;
use fluidity_aws::control::ca::ca_secret_json;
use fluidity_aws::control::{
    Caller, CertRole, CertificateRequest, Control, ControlClient, ControlConfig, ControlError,
    ControlUrls, IpKind, ServerId, ServerStatus, SleepAction, SleepStep, WakeRequest, WakeResponse,
    WakeStep, AGENT_IP_TTL, METRIC_ACTIVE_TUNNELS, METRIC_NAMESPACE, SERVER_ID_ATTR, TTL_ATTR,
};
use fluidity_aws::{AwsConfig, Env, Service};
use fluidity_runtime_smol::pki::{self, CaBundle};
use fluidity_runtime_smol::tls::PeerIdentity;
use fluidity_tests::e2e::bin::workspace_root;
use fluidity_tests::e2e::proc::{wait_for, Proc};
use fluidity_tests::moto::{EcsFixture, Moto, TestUser};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

const CLUSTER: &str = "fluidity";
const SERVICE: &str = "tunnel";
const TABLE: &str = "fluidity-agent-ips";
const CA_SECRET: &str = "fluidity/ca";
const TASK_ARN_CN: &str = "arn:aws:ecs:us-east-1:123456789012:task/fluidity/0123456789abcdef";

/// The permissions the control functions need, and nothing else: the tests run the
/// handlers as a user with exactly this policy, so a missing permission would show.
fn control_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": [
                "ecs:DescribeServices", "ecs:UpdateService", "ecs:ListTasks", "ecs:DescribeTasks",
                "ec2:DescribeNetworkInterfaces",
                "dynamodb:PutItem", "dynamodb:GetItem",
                // AWS names the action cloudwatch:…; moto 5.2 checks it under the
                // signing name, monitoring:….
                "cloudwatch:GetMetricStatistics", "monitoring:GetMetricStatistics",
                "secretsmanager:GetSecretValue"
            ],
            "Resource": "*"
        }]
    })
}

/// moto with the service (desired 0), the table with TTL, the CA secret, and a user with
/// [`control_policy`].
struct World {
    moto: Moto,
    ecs: EcsFixture,
    ca: CaBundle,
    user: TestUser,
}

impl World {
    fn new() -> World {
        let moto = Moto::start();
        let ecs = moto.create_ecs_service(CLUSTER, SERVICE, 0);
        moto.create_table(TABLE, SERVER_ID_ATTR, Some(TTL_ATTR));
        let ca = pki::generate_ca("Fluidity test CA", Duration::from_secs(400 * 86400))
            .expect("generating a CA");
        moto.create_secret(CA_SECRET, &ca_secret_json(&ca));
        let user = moto.create_user_with_policy("fluidity-control", Some(&control_policy()));
        World {
            moto,
            ecs,
            ca,
            user,
        }
    }

    fn config(&self) -> ControlConfig {
        ControlConfig {
            server: Some(ServerId::new(CLUSTER, SERVICE)),
            table: Some(TABLE.into()),
            ca_secret: Some(CA_SECRET.into()),
            ..ControlConfig::default()
        }
    }

    fn control(&self) -> Control {
        self.control_with(self.config())
    }

    fn control_with(&self, config: ControlConfig) -> Control {
        Control::new(config, self.moto.aws_config(&self.user))
    }

    fn admin(&self) -> &AwsConfig {
        self.moto.admin_config()
    }

    /// The service's desired count, as moto has it.
    fn desired_count(&self) -> u64 {
        let out = self.moto.json(
            Service::Ecs,
            "DescribeServices",
            &json!({ "cluster": CLUSTER, "services": [SERVICE] }),
        );
        out.pointer("/services/0/desiredCount")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no desiredCount in {out}"))
    }

    /// A RUNNING FARGATE task of the service: (task ARN, ENI id, private IP).
    fn run_task(&self) -> (String, String, String) {
        let task = self.moto.run_fargate_task(&self.ecs, "fluidity-test");
        let arn = task["taskArn"].as_str().expect("taskArn").to_string();
        let detail = |name: &str| {
            task.pointer("/attachments/0/details")
                .and_then(Value::as_array)
                .and_then(|d| d.iter().find(|x| x["name"] == name))
                .and_then(|x| x["value"].as_str())
                .unwrap_or_else(|| panic!("no {name} in {task}"))
                .to_string()
        };
        (
            arn,
            detail("networkInterfaceId"),
            detail("privateIPv4Address"),
        )
    }

    /// A RUNNING FARGATE task in the cluster that the service did not start: its ECS
    /// group is `group` (another service's `service:NAME`, or none for a task run by
    /// hand). Returns its ARN.
    fn run_foreign_task(&self, group: Option<&str>) -> String {
        let mut input = json!({
            "cluster": CLUSTER,
            "taskDefinition": self.ecs.task_definition_arn,
            "launchType": "FARGATE",
            "networkConfiguration": Moto::awsvpc(&self.ecs.network),
        });
        if let Some(group) = group {
            input["group"] = group.into();
        }
        let out = self.moto.json(Service::Ecs, "RunTask", &input);
        out.pointer("/tasks/0/taskArn")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no task in {out}"))
            .to_string()
    }

    fn stop_task(&self, arn: &str) {
        self.moto.json(
            Service::Ecs,
            "StopTask",
            &json!({ "cluster": CLUSTER, "task": arn, "reason": "test" }),
        );
    }

    fn put_active_tunnels(&self, value: f64, at: SystemTime) {
        CloudWatchClient::new(self.admin())
            .put_metric_data(
                METRIC_NAMESPACE,
                &[MetricDatum {
                    name: METRIC_ACTIVE_TUNNELS.into(),
                    value,
                    unit: "Count".into(),
                    dimensions: ServerId::new(CLUSTER, SERVICE).metric_dimensions(),
                    timestamp: Some(at),
                }],
            )
            .expect("PutMetricData");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP literal")
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}

fn wake(control: &Control, from: &str, now: SystemTime) -> WakeResponse {
    control
        .wake(&WakeRequest::default(), ip(from), now)
        .unwrap_or_else(|e| panic!("wake: {e}"))
}

fn csr(cn: &str, ips: &[&str], role: CertRole) -> CertificateRequest {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    CertificateRequest {
        csr: pki::create_csr(cn, &ips).expect("a CSR").csr_pem,
        role,
        validity_days: None,
    }
}

/// A CSR with a DNS SAN, made by OpenSSL (the project's PKI makes IP SANs only).
fn openssl_csr(cn: &str, san: &str) -> String {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
        ])
        .arg(dir.path().join("key.pem"))
        .args([
            "-subj",
            &format!("/CN={}", cn.replace('/', "\\/")),
            "-addext",
            &format!("subjectAltName={san}"),
        ])
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("PEM is text")
}

/// A caller from `ip` that the function URL names no IAM identity for.
fn from(ip_literal: &str) -> Caller {
    Caller {
        ip: Some(ip(ip_literal)),
        arn: None,
    }
}

fn refused(r: Result<impl std::fmt::Debug, ControlError>) -> ControlError {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e,
    }
}

fn names_of(cert_pem: &str) -> PeerIdentity {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("a PEM certificate");
    PeerIdentity::from_der(&der).expect("readable names")
}

#[test]
fn wake_scales_up_once_stores_the_agent_ip_and_reports_the_task() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();

    let first = wake(&control, "203.0.113.9", now);
    assert!(first.changed, "{first:?}");
    assert_eq!(first.status, ServerStatus::Starting);
    assert_eq!(first.server_arn, None, "no task exists yet");
    assert_eq!(first.agent_public_ip_as_seen, ip("203.0.113.9"));
    assert_eq!(w.desired_count(), 1);

    // The agent IP is stored under CLUSTER/SERVICE with a one-hour TTL.
    let id = ServerId::new(CLUSTER, SERVICE);
    let record = read_agent_ip(&DynamoDbClient::new(w.admin()), TABLE, &id)
        .expect("GetItem")
        .expect("an item");
    assert_eq!(record.agent_ip, ip("203.0.113.9"));
    assert_eq!(
        record.expires_at.duration_since(record.updated_at).unwrap(),
        AGENT_IP_TTL
    );

    // Idempotent: a second wake changes nothing but the stored IP.
    let again = wake(&control, "203.0.113.10", now);
    assert!(!again.changed, "{again:?}");
    assert_eq!(w.desired_count(), 1);

    // Once ECS runs a task with a public IP, Wake names it.
    let (arn, eni, _) = w.run_task();
    let public = w.moto.associate_public_ip(&eni);
    let third = wake(&control, "203.0.113.10", now);
    assert_eq!(third.status, ServerStatus::Running);
    assert_eq!(third.server_arn.as_deref(), Some(arn.as_str()));
    assert_eq!(third.server_public_ip, Some(ip(&public)));
    // IPv4-mapped IPv6 callers are recorded as the IPv4 address the server will see.
    let mapped = wake(&control, "::ffff:198.51.100.4", now);
    assert_eq!(mapped.agent_public_ip_as_seen, ip("198.51.100.4"));
}

#[test]
fn query_follows_the_task_its_interface_and_the_stored_agent_ip() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();

    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Stopped);
    assert_eq!(
        (q.server_ip, q.server_arn, q.agent_public_ip),
        (None, None, None)
    );

    wake(&control, "203.0.113.9", now);
    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Starting);
    assert_eq!(q.agent_public_ip, Some(ip("203.0.113.9")));
    assert!(
        q.detail.as_deref().unwrap_or("").contains("no task"),
        "{q:?}"
    );

    // A running task without a public IP: not usable, and the answer says why…
    let (arn, eni, private) = w.run_task();
    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Starting);
    assert_eq!(q.server_arn.as_deref(), Some(arn.as_str()));
    assert_eq!(q.server_ip, None);
    assert_eq!(q.task_status.as_deref(), Some("RUNNING"));
    assert!(
        q.detail.as_deref().unwrap_or("").contains("no public IP"),
        "{q:?}"
    );
    // …unless the deployment allows the private address.
    let fallback = w.control_with(ControlConfig {
        private_ip_fallback: true,
        ..w.config()
    });
    let q = fallback.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Running);
    assert_eq!(q.server_ip, Some(ip(&private)));
    assert_eq!(q.server_ip_kind, Some(IpKind::Private));

    let public = w.moto.associate_public_ip(&eni);
    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Running);
    assert_eq!(q.server_ip, Some(ip(&public)));
    assert_eq!(q.server_ip_kind, Some(IpKind::Public));
    assert_eq!(q.detail, None);

    // moto never deletes expired items: Query must not report an expired agent IP.
    let later = now + AGENT_IP_TTL + minutes(1);
    let q = control.query(&Default::default(), later).expect("query");
    assert_eq!(q.agent_public_ip, None, "an expired agent IP is ignored");

    // A task of another service in the same cluster is never this server's.
    w.stop_task(&arn);
    w.run_foreign_task(Some("service:another"));
    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.server_arn, None, "{q:?}");
    assert_eq!(q.status, ServerStatus::Starting);
}

/// The server finds the address its certificate names where Query finds the one agents
/// dial: the task's public IP, or with the private-IP fallback (both sides' setting) its
/// private IP while it has no public one.
#[test]
fn a_server_without_a_public_ip_serves_on_its_private_one_only_with_the_fallback() {
    use fluidity_server::aws::discover::{discover_public_ip, ArnSource, ServerIdentity};
    let w = World::new();
    let (arn, eni, private) = w.run_task();
    let identity = ServerIdentity {
        arn,
        source: ArnSource::EcsTaskArn,
        task: None,
    };
    let aws = w.moto.aws_config(&w.user);
    let discover = |fallback: bool| {
        discover_public_ip(
            &identity,
            &Env::from_pairs([("AWS_EC2_METADATA_DISABLED", "true")]),
            &EcsClient::new(&aws),
            &Ec2Client::new(&aws),
            Some(CLUSTER),
            Duration::from_millis(1),
            fallback,
        )
    };
    let e = discover(false).expect_err("no public IP").to_string();
    assert!(e.contains("got no public IP"), "{e}");
    assert!(
        e.contains("private_ip_fallback"),
        "the message names the way out: {e}"
    );
    assert_eq!(discover(true).expect("the private IP"), ip(&private));
    let public = w.moto.associate_public_ip(&eni);
    assert_eq!(discover(true).expect("the public IP"), ip(&public));
    assert_eq!(discover(false).expect("the public IP"), ip(&public));
}

#[test]
fn kill_scales_to_zero_and_is_idempotent() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();
    wake(&control, "203.0.113.9", now);
    let (arn, _, _) = w.run_task();

    let k = control.kill(&Default::default()).expect("kill");
    assert!(k.changed);
    assert_eq!(k.desired_count, 0);
    assert_eq!(k.status, ServerStatus::Stopping, "the task still exists");
    assert_eq!(w.desired_count(), 0);
    let q = control.query(&Default::default(), now).expect("query");
    assert_eq!(q.status, ServerStatus::Stopping);

    w.stop_task(&arn);
    let k = control.kill(&Default::default()).expect("kill");
    assert!(!k.changed, "already at zero: {k:?}");
    assert_eq!(k.status, ServerStatus::Stopped);
    assert_eq!(w.desired_count(), 0);
}

#[test]
fn sleep_keeps_a_busy_or_fresh_server_and_stops_an_idle_one() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();

    let s = control.sleep(now).expect("sleep");
    assert_eq!(s.action, SleepAction::AlreadyStopped);
    assert_eq!(s.idle_timeout_secs, 15 * 60);

    // Just woken, no datapoint yet: the guard keeps it.
    wake(&control, "203.0.113.9", now);
    let s = control.sleep(now + minutes(5)).expect("sleep");
    assert_eq!(s.action, SleepAction::Kept, "{s:?}");
    assert!(s.reason.contains("woken"), "{s:?}");
    assert_eq!(w.desired_count(), 1);

    // Woken long ago, a tunnel active 5 minutes ago: kept.
    let t1 = now + minutes(60);
    w.put_active_tunnels(0.0, t1 - minutes(10));
    w.put_active_tunnels(1.0, t1 - minutes(5));
    let s = control.sleep(t1).expect("sleep");
    assert_eq!(s.action, SleepAction::Kept, "{s:?}");
    assert!(s.reason.contains("active tunnels"), "{s:?}");
    assert_eq!(w.desired_count(), 1);

    // Half an hour later only zeros were published: stopped.
    let t2 = t1 + minutes(30);
    w.put_active_tunnels(0.0, t2 - minutes(12));
    w.put_active_tunnels(0.0, t2 - minutes(2));
    let s = control.sleep(t2).expect("sleep");
    assert_eq!(s.action, SleepAction::ScaledToZero, "{s:?}");
    assert!(s.reason.contains("no active tunnel"), "{s:?}");
    assert_eq!(w.desired_count(), 0);

    // Woken again, and long after that wake still no datapoint at all: stopped too.
    let t3 = t2 + minutes(120);
    wake(&control, "203.0.113.9", t3 - minutes(20));
    assert_eq!(w.desired_count(), 1);
    let s = control.sleep(t3).expect("sleep");
    assert_eq!(s.action, SleepAction::ScaledToZero, "{s:?}");
    assert!(s.reason.contains("no ActiveTunnels data"), "{s:?}");
    assert_eq!(w.desired_count(), 0);

    // The idle timeout is configurable: with 60 minutes, that same wake is still fresh.
    wake(&control, "203.0.113.9", t3 - minutes(20));
    let patient = w.control_with(ControlConfig {
        idle_timeout: minutes(60),
        ..w.config()
    });
    assert_eq!(patient.sleep(t3).expect("sleep").action, SleepAction::Kept);
}

/// A Wake landing while Sleep stops an idle server, before Sleep sets 0 (it has read the
/// old wake and decided) or after (before it reads the wake again): either way the
/// service ends wanted and Sleep says it kept the server. And a whole Sleep landing inside
/// a Wake, after Wake read the count: Wake still sets 1. Before, a Wake of the first kind
/// found the count still 1, left it, and Sleep's 0 undid it.
#[test]
fn a_wake_landing_while_sleep_stops_the_server_keeps_it_wanted() {
    let w = World::new();
    let control = w.control();
    let long_ago = SystemTime::now();
    let now = long_ago + minutes(60);
    for step in [SleepStep::Decided, SleepStep::ScaledToZero] {
        wake(&control, "203.0.113.9", long_ago);
        assert_eq!(w.desired_count(), 1);
        let mut landed = None;
        let s = control
            .sleep_observed(now, |at| {
                if at == step {
                    landed = Some(wake(&control, "203.0.113.10", now));
                }
            })
            .expect("sleep");
        assert!(landed.is_some(), "Sleep never reached {step:?}: {s:?}");
        assert_eq!(s.action, SleepAction::Kept, "{step:?}: {s:?}");
        assert!(s.reason.contains("woke the server while"), "{s:?}");
        assert_eq!(w.desired_count(), 1, "a wake at {step:?} was lost");
    }

    // A whole Sleep between Wake's reading the count (1) and its storing the address:
    // Sleep sees only the old wake and sets 0, and Wake's 1 comes after it.
    wake(&control, "203.0.113.9", long_ago);
    let mut slept = None;
    control
        .wake_observed(&WakeRequest::default(), ip("203.0.113.10"), now, |at| {
            assert_eq!(at, WakeStep::ServiceRead);
            slept = Some(control.sleep(now).expect("sleep"));
        })
        .expect("wake");
    let s = slept.expect("Wake never read the count");
    assert_eq!(s.action, SleepAction::ScaledToZero, "{s:?}");
    assert_eq!(
        w.desired_count(),
        1,
        "the wake was lost to the Sleep inside it"
    );

    // With no wake in between, the same Sleep stops it.
    wake(&control, "203.0.113.9", long_ago);
    let s = control.sleep_observed(now, |_| {}).expect("sleep");
    assert_eq!(s.action, SleepAction::ScaledToZero, "{s:?}");
    assert_eq!(w.desired_count(), 0);

    // A record gone between the two reads (DynamoDB's TTL) is no wake.
    wake(&control, "203.0.113.9", long_ago);
    let s = control
        .sleep_observed(now, |at| {
            if at == SleepStep::ScaledToZero {
                let key = ServerId::new(CLUSTER, SERVICE).key();
                w.moto.json(
                    Service::DynamoDb,
                    "DeleteItem",
                    &json!({ "TableName": TABLE, "Key": { SERVER_ID_ATTR: { "S": key } } }),
                );
            }
        })
        .expect("sleep");
    assert_eq!(s.action, SleepAction::ScaledToZero, "{s:?}");
    assert_eq!(w.desired_count(), 0);

    // When the wake cannot be read again, the service is wanted again and Sleep fails.
    wake(&control, "203.0.113.9", long_ago);
    let e = control
        .sleep_observed(now, |at| {
            if at == SleepStep::ScaledToZero {
                w.moto.json(
                    Service::DynamoDb,
                    "DeleteTable",
                    &json!({ "TableName": TABLE }),
                );
            }
        })
        .expect_err("the table is gone");
    assert!(e.to_string().contains("set it back to 1"), "{e}");
    assert_eq!(w.desired_count(), 1);
}

#[test]
fn ca_signs_agent_and_server_csrs_with_the_ca_from_secrets_manager() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();

    let agent = control
        .sign_certificate(
            &csr(TASK_ARN_CN, &["203.0.113.9"], CertRole::Agent),
            &from("203.0.113.9"),
            now,
        )
        .expect("agent certificate");
    assert_eq!(agent.ca_certificate, w.ca.cert_pem());
    let names = names_of(&agent.certificate);
    assert_eq!(names.common_name.as_deref(), Some(TASK_ARN_CN));
    assert_eq!(names.ip_sans, vec![ip("203.0.113.9")]);
    let life =
        Duration::from_secs(agent.not_after) - now.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    assert!(life <= Duration::from_secs(90 * 86400 + 600), "{life:?}");
    assert!(life > Duration::from_secs(89 * 86400), "{life:?}");

    // A server certificate names the service's task, its address and the agent's.
    wake(&control, "203.0.113.9", now);
    let (arn, eni, _) = w.run_task();
    let public = w.moto.associate_public_ip(&eni);
    let server = control
        .sign_certificate(
            &csr(&arn, &[&public, "203.0.113.9"], CertRole::Server),
            &from(&public),
            now,
        )
        .expect("server certificate");
    let names = names_of(&server.certificate);
    assert_eq!(names.common_name.as_deref(), Some(arn.as_str()));
    assert_eq!(names.ip_sans, vec![ip(&public), ip("203.0.113.9")]);
    let life =
        Duration::from_secs(server.not_after) - now.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    assert!(
        life <= Duration::from_secs(7 * 86400 + 600),
        "server certificates are short: {life:?}"
    );
}

/// A server certificate is what agents trust the server by, so the CA issues one only for
/// what the service's own task can claim: a caller that may invoke the CA cannot have one
/// for another task, another address or another agent.
#[test]
fn ca_issues_a_server_certificate_only_for_the_services_task_and_addresses() {
    let w = World::new();
    let control = w.control();
    let now = SystemTime::now();
    let (arn, eni, private) = w.run_task();
    let public = w.moto.associate_public_ip(&eni);
    let agent = "203.0.113.9";
    let server_csr = |cn: &str, ips: &[&str]| csr(cn, ips, CertRole::Server);
    let sign = |req: &CertificateRequest| control.sign_certificate(req, &from(&public), now);

    // No agent address stored yet: nothing to bind the certificate to.
    let e = refused(sign(&server_csr(&arn, &[&public, agent])));
    assert_eq!((e.status, e.code), (400, "csr_refused"), "{e}");
    assert!(e.message.contains("none is stored for ECS service"), "{e}");

    wake(&control, agent, now);
    let cases: Vec<(CertificateRequest, String)> = vec![
        (
            server_csr(TASK_ARN_CN, &[&public, agent]),
            format!("{TASK_ARN_CN} is not one"),
        ),
        (
            server_csr(&arn, &["198.51.100.99", agent]),
            format!("198.51.100.99 is not one of task {arn}'s"),
        ),
        (
            server_csr(&arn, &[&public, "203.0.113.10"]),
            format!("the agent address Wake stored, {agent}, and this CSR names 203.0.113.10"),
        ),
        (
            server_csr(&arn, &[agent, &public]),
            format!("{agent} is not one of task {arn}'s"),
        ),
    ];
    for (req, why) in &cases {
        let e = refused(sign(req));
        assert_eq!((e.status, e.code), (400, "csr_refused"), "{e}");
        assert!(e.message.contains(why.as_str()), "want {why:?} in: {e}");
    }
    // The task's private address is its own too (agents that reach the VPC privately).
    sign(&server_csr(&arn, &[&private, agent])).expect("the task's private address");
    sign(&server_csr(&arn, &[&public, agent])).expect("the task's public address");

    // With a caller list, the server's role goes on to the same checks; another does not.
    let listed = w.control_with(ControlConfig {
        server_callers: vec!["arn:aws:iam::123456789012:role/fluidity-server"
            .parse()
            .expect("a principal pattern")],
        ..w.config()
    });
    let role = |name: &str| Caller {
        ip: Some(ip(&public)),
        arn: Some(format!(
            "arn:aws:sts::123456789012:assumed-role/{name}/0a1b"
        )),
    };
    let own = server_csr(&arn, &[&public, agent]);
    listed
        .sign_certificate(&own, &role("fluidity-server"), now)
        .expect("the server's role");
    let e = refused(listed.sign_certificate(&own, &role("fluidity-agent"), now));
    assert!(
        e.message.contains("may not have a server certificate"),
        "{e}"
    );
    let e = refused(listed.sign_certificate(
        &server_csr(TASK_ARN_CN, &[&public, agent]),
        &role("fluidity-server"),
        now,
    ));
    assert!(
        e.message.contains(&format!("{TASK_ARN_CN} is not one")),
        "{e}"
    );

    // A task of another service in the cluster, or a stopped one, is not the server.
    let other_arn = w.run_foreign_task(Some("service:another"));
    let e = refused(sign(&server_csr(&other_arn, &[&public, agent])));
    assert!(
        e.message.contains(&format!("{other_arn} is not one")),
        "{e}"
    );
    // Nor is a task started by hand in the cluster (a group of its own, or none).
    let by_hand = w.run_foreign_task(None);
    let e = refused(sign(&server_csr(&by_hand, &[&public, agent])));
    assert!(e.message.contains(&format!("{by_hand} is not one")), "{e}");
    w.stop_task(&arn);
    let e = refused(sign(&server_csr(&arn, &[&public, agent])));
    assert!(e.message.contains(&format!("{arn} is not one")), "{e}");
}

#[test]
fn ca_refuses_what_its_policy_does_not_allow_with_a_clear_reason() {
    let w = World::new();
    let control = w.control();
    let cases: Vec<(CertificateRequest, &str)> = vec![
        (
            csr("fluidity-server", &["203.0.113.9"], CertRole::Agent),
            "is not a well-formed ARN",
        ),
        (
            CertificateRequest {
                // OpenSSL's default configuration limits a CN to 64 characters.
                csr: openssl_csr(
                    "arn:aws:ecs:us-east-1:123456789012:task/f/0a1b",
                    "DNS:vpn.example.com",
                ),
                role: CertRole::Agent,
                validity_days: None,
            },
            "only IP address SANs are allowed",
        ),
        (
            csr(
                TASK_ARN_CN,
                &["203.0.113.9", "203.0.113.10"],
                CertRole::Agent,
            ),
            "needs exactly one IP SAN (the agent's public IP); the CSR has 2",
        ),
        (
            csr(
                TASK_ARN_CN,
                &["1.1.1.1", "2.2.2.2", "3.3.3.3"],
                CertRole::Server,
            ),
            "the CSR has 3",
        ),
        (
            csr(TASK_ARN_CN, &["198.51.100.7"], CertRole::Server),
            "needs exactly two IP SANs",
        ),
        (
            CertificateRequest {
                validity_days: Some(365),
                ..csr(TASK_ARN_CN, &["203.0.113.9"], CertRole::Agent)
            },
            "365 days is outside 1..=90",
        ),
    ];
    for (req, why) in cases {
        let e = refused(control.sign_certificate(&req, &from("203.0.113.9"), SystemTime::now()));
        assert_eq!((e.status, e.code), (400, "csr_refused"), "{e}");
        assert!(e.message.contains(why), "want {why:?} in: {e}");
    }

    // A CA that cannot be read is a clear error too, not a panic or a vague failure.
    let no_ca = w.control_with(ControlConfig {
        ca_secret: Some("fluidity/missing".into()),
        ..w.config()
    });
    let e = refused(no_ca.sign_certificate(
        &csr(TASK_ARN_CN, &["203.0.113.9"], CertRole::Agent),
        &from("203.0.113.9"),
        SystemTime::now(),
    ));
    assert_eq!(e.code, "aws_error");
    assert!(
        e.message
            .contains("could not read the CA secret fluidity/missing"),
        "{e}"
    );
    assert!(e.message.contains("ResourceNotFoundException"), "{e}");
}

#[test]
fn wake_fails_clearly_when_dynamodb_or_ecs_fail_and_changes_nothing() {
    let w = World::new();

    let no_table = w.control_with(ControlConfig {
        table: Some("no-such-table".into()),
        ..w.config()
    });
    let e = refused(no_table.wake(
        &WakeRequest::default(),
        ip("203.0.113.9"),
        SystemTime::now(),
    ));
    assert_eq!((e.status, e.code), (502, "aws_error"), "{e}");
    assert!(
        e.message
            .contains("could not store the agent IP in DynamoDB table no-such-table"),
        "{e}"
    );
    assert!(e.message.contains("ResourceNotFoundException"), "{e}");
    assert_eq!(
        w.desired_count(),
        0,
        "no server starts without its agent IP"
    );

    let no_service = w.control_with(ControlConfig {
        server: Some(ServerId::new(CLUSTER, "no-such-service")),
        ..w.config()
    });
    let e = refused(no_service.wake(
        &WakeRequest::default(),
        ip("203.0.113.9"),
        SystemTime::now(),
    ));
    assert_eq!(e.code, "service_not_found", "{e}");
    assert!(
        e.message
            .contains("ECS service no-such-service does not exist in cluster fluidity"),
        "{e}"
    );

    let no_cluster = w.control_with(ControlConfig {
        server: Some(ServerId::new("no-such-cluster", SERVICE)),
        ..w.config()
    });
    let e = refused(no_cluster.wake(
        &WakeRequest::default(),
        ip("203.0.113.9"),
        SystemTime::now(),
    ));
    assert!(e.message.contains("no-such-cluster"), "{e}");

    // Without the permissions, moto (IAM checks on) denies, and the error says so.
    let nobody = w.moto.create_user_with_policy("nobody", None);
    let denied = Control::new(w.config(), w.moto.aws_config(&nobody));
    let e = refused(denied.wake(
        &WakeRequest::default(),
        ip("203.0.113.9"),
        SystemTime::now(),
    ));
    assert_eq!(e.code, "aws_error");
    assert!(
        e.message
            .contains("could not read ECS service fluidity/tunnel"),
        "{e}"
    );
    assert!(e.message.contains("AccessDenied"), "{e}");
    assert_eq!(w.desired_count(), 0);
}

// ---- the binaries ----

/// `bootstrap` and `fluidity-control`, built once per test process into the test's own
/// target folder and profile.
fn control_binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let deps = exe.parent().expect("a folder");
        let dir = if deps.file_name().is_some_and(|n| n == "deps") {
            deps.parent().expect("deps has a parent")
        } else {
            deps
        };
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "fluidity-aws", "--bins"]);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd.env("CARGO_TARGET_DIR", dir.parent().expect("a target folder"))
            .current_dir(workspace_root());
        let status = cmd.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p fluidity-aws --bins failed ({status})"
        );
        let bins = (dir.join("bootstrap"), dir.join("fluidity-control"));
        assert!(
            bins.0.is_file() && bins.1.is_file(),
            "the binaries are missing after the build"
        );
        bins
    })
}

/// The environment of a control function: moto, the user's keys, the settings.
fn function_command(w: &World, exe: &PathBuf) -> Command {
    let mut cmd = Command::new(exe);
    Moto::clear_aws_env(&mut cmd);
    cmd.envs(w.moto.env_vars(&w.user))
        .env("FLUIDITY_CLUSTER", CLUSTER)
        .env("FLUIDITY_SERVICE", SERVICE)
        .env("FLUIDITY_TABLE", TABLE)
        .env("FLUIDITY_CA_SECRET", CA_SECRET)
        .env("FLUIDITY_LOG", "debug");
    cmd
}

#[test]
fn fluidity_control_serves_the_functions_to_control_client() {
    let w = World::new();
    let logs = tempfile::tempdir().expect("a temporary folder");
    let mut cmd = function_command(&w, &control_binaries().1);
    cmd.args(["--listen", "127.0.0.1:0", "--require-signature"]);
    let mut host = Proc::spawn("fluidity-control", cmd, logs.path());
    let base = wait_for(
        "fluidity-control to print its address",
        Duration::from_secs(30),
        || {
            assert!(
                host.exited().is_none(),
                "fluidity-control exited:\n{}",
                host.log()
            );
            host.stdout().lines().find_map(|l| {
                l.strip_prefix("fluidity-control listening on ")
                    .map(str::to_string)
            })
        },
    );

    let client = ControlClient::new(&w.moto.aws_config(&w.user), ControlUrls::on_host(&base));
    let woke = client.wake().expect("wake over HTTP");
    assert!(woke.changed);
    assert_eq!(
        woke.agent_public_ip_as_seen,
        ip("127.0.0.1"),
        "the TCP peer"
    );
    assert_eq!(w.desired_count(), 1);
    assert!(!client.wake().expect("wake again").changed);

    let (arn, eni, _) = w.run_task();
    let public = w.moto.associate_public_ip(&eni);
    let q = client.query().expect("query over HTTP");
    assert_eq!(q.status, ServerStatus::Running);
    assert_eq!(q.server_arn.as_deref(), Some(arn.as_str()));
    assert_eq!(q.server_ip, Some(ip(&public)));
    assert_eq!(q.agent_public_ip, Some(ip("127.0.0.1")));

    let cert = client
        .sign_certificate(&csr(&arn, &["127.0.0.1"], CertRole::Agent))
        .expect("agent certificate over HTTP");
    assert_eq!(
        names_of(&cert.certificate).common_name.as_deref(),
        Some(arn.as_str())
    );
    // An agent certificate for an address other than the caller's: refused.
    let e = client
        .sign_certificate(&csr(&arn, &["203.0.113.50"], CertRole::Agent))
        .expect_err("a refusal");
    let text = e.to_string();
    assert!(
        text.contains("csr_refused") && text.contains("203.0.113.50") && text.contains("127.0.0.1"),
        "{text}"
    );
    let e = client
        .sign_certificate(&csr("not-an-arn", &["127.0.0.1"], CertRole::Agent))
        .expect_err("a refusal");
    let text = e.to_string();
    assert!(
        text.contains("HTTP 400") && text.contains("csr_refused: the CN \"not-an-arn\""),
        "{text}"
    );

    let k = client.kill().expect("kill over HTTP");
    assert!(k.changed);
    assert_eq!(w.desired_count(), 0);
    assert!(!client.kill().expect("kill again").changed);

    // An unsigned call is refused as a function URL under AWS_IAM would refuse it.
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.write_all(b"POST /wake HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .expect("sending");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("reading");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("not signed with SigV4"), "{answer}");
    assert_eq!(w.desired_count(), 0, "the unsigned wake did nothing");
}

/// A one-connection-at-a-time Lambda Runtime API on 127.0.0.1: hands out `events` in
/// order, then holds `next` open; reports every POST (path, body) on the channel.
fn runtime_api(events: Vec<Value>) -> (String, mpsc::Receiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the Runtime API");
    let addr = listener.local_addr().expect("its address").to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut events = events.into_iter().enumerate();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("cloning the socket"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if method == "GET" && path == "/2018-06-01/runtime/invocation/next" {
                let Some((i, event)) = events.next() else {
                    // No more events: keep the runtime waiting, as Lambda does.
                    std::thread::sleep(Duration::from_secs(3600));
                    return;
                };
                let body = event.to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nconnection: close\r\nlambda-runtime-aws-request-id: req-{i}\r\nlambda-runtime-deadline-ms: 0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            } else {
                let _ = conn.write_all(
                    b"HTTP/1.1 202 Accepted\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                );
                let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let _ = tx.send((path.to_string(), value));
            }
        }
    });
    (addr, rx)
}

fn url_event(source_ip: &str, method: &str, body: &str) -> Value {
    json!({
        "version": "2.0",
        "rawPath": "/",
        "headers": { "content-type": "application/json" },
        "requestContext": { "http": { "method": method, "path": "/", "sourceIp": source_ip } },
        "body": body,
        "isBase64Encoded": false,
    })
}

#[test]
fn bootstrap_answers_runtime_api_invocations() {
    let w = World::new();
    let logs = tempfile::tempdir().expect("a temporary folder");
    let (api, posts) = runtime_api(vec![
        url_event("198.51.100.20", "POST", "{}"),
        url_event("198.51.100.20", "GET", ""),
    ]);
    let mut cmd = function_command(&w, &control_binaries().0);
    cmd.env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("FLUIDITY_FUNCTION", "wake");
    let _bootstrap = Proc::spawn("bootstrap", cmd, logs.path());
    let limit = Duration::from_secs(60);

    let (path, answer) = posts
        .recv_timeout(limit)
        .expect("a response to the first event");
    assert_eq!(path, "/2018-06-01/runtime/invocation/req-0/response");
    assert_eq!(answer["statusCode"], 200, "{answer}");
    assert_eq!(answer["headers"]["content-type"], "application/json");
    let body: WakeResponse = serde_json::from_str(answer["body"].as_str().expect("a string body"))
        .expect("a WakeResponse");
    assert_eq!(body.agent_public_ip_as_seen, ip("198.51.100.20"));
    assert!(body.changed);
    assert_eq!(w.desired_count(), 1);

    let (path, answer) = posts
        .recv_timeout(limit)
        .expect("a response to the second event");
    assert_eq!(path, "/2018-06-01/runtime/invocation/req-1/response");
    assert_eq!(answer["statusCode"], 400, "{answer}");
    let body: Value = serde_json::from_str(answer["body"].as_str().unwrap_or("")).expect("JSON");
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"].as_str().unwrap_or("").contains("POST"),
        "{body}"
    );
}

#[test]
fn bootstrap_reports_a_configuration_error_as_an_init_error() {
    let w = World::new();
    let logs = tempfile::tempdir().expect("a temporary folder");
    let (api, posts) = runtime_api(Vec::new());
    let mut cmd = function_command(&w, &control_binaries().0);
    cmd.env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("FLUIDITY_FUNCTION", "hibernate");
    let _bootstrap = Proc::spawn("bootstrap", cmd, logs.path());
    let (path, body) = posts
        .recv_timeout(Duration::from_secs(60))
        .expect("an init error");
    assert_eq!(path, "/2018-06-01/runtime/init/error");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("unknown control function \"hibernate\""),
        "{body}"
    );
}
