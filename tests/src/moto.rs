//! A real AWS API emulator for tests: moto's server mode on 127.0.0.1, with IAM checks on.
//!
//! [`Moto::start`] finds `moto_server` (installed by `bash .ci/setup-moto.sh` into
//! `~/.cache/fluidity-venv`), starts it on a free port and creates one administrator
//! ([`Moto::admin`]) during moto's unchecked start-up window (`INITIAL_NO_AUTH_ACTION_COUNT`).
//! From then on **every request must carry a valid SigV4 signature** of a user moto knows,
//! and the user's IAM policies must allow the action: a wrong secret gets
//! `SignatureDoesNotMatch`, a missing permission `AccessDenied`. The server is killed when the
//! [`Moto`] is dropped; its log is printed if the test is failing.
//!
//! Each test process starts its own moto (nextest runs every test in its own process), so
//! tests never see each other's state. Start-up takes about a second.
//!
//! ```no_run
//! use fluidity_aws::clients::sts::StsClient;
//! use fluidity_tests::moto::Moto;
//!
//! let moto = Moto::start();
//! let alice = moto.create_user("alice");              // allowed to do anything
//! let config = moto.aws_config(&alice);               // static keys, endpoint = moto
//! let me = StsClient::new(&config).get_caller_identity().unwrap();
//! assert_eq!(me.arn, alice.arn);
//!
//! // A child process (agent, server) gets the same through its environment:
//! let vars = moto.env_vars(&alice); // AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_REGION, …
//! # let _ = vars;
//! ```
//!
//! Fixtures for the control plane are one call each: [`Moto::create_network`] (VPC with DNS
//! hostnames, subnet, security group), [`Moto::create_ecs_service`] (cluster, FARGATE task
//! definition, awsvpc service), [`Moto::run_fargate_task`] (a RUNNING task with an ENI),
//! [`Moto::create_table`] (a DynamoDB table with TTL), [`Moto::create_secret`]. Anything
//! else is one [`AwsConfig::call_query`] or [`AwsConfig::call_json`] away with
//! [`Moto::admin_config`].
//!
//! Moto quirks worth knowing (checked on moto 5.2):
//! - `UpdateService(desiredCount)` only changes counters; it starts no task. Use
//!   [`Moto::run_fargate_task`] to get a task (with `startedBy` and `group` as you like).
//!   ListTasks ignores its `serviceName` filter (filter on `startedBy` or `family`).
//! - Tasks stay RUNNING here until StopTask ([`Moto::keep_tasks_running`]); moto's own
//!   default moves a task towards STOPPED on every DescribeTasks.
//! - A FARGATE task's ENI has no public IP unless an Elastic IP is associated
//!   ([`Moto::associate_public_ip`]).
//! - DynamoDB TTL is accepted but expired items are never deleted: filter on read.
//! - Lambda function URLs are not served.
//! - moto does not check `X-Amz-Date` freshness nor replays.
//!
//! Everything here panics with a message on a setup failure: it is test code, and a panic is
//! how a test reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fluidity_aws::chain::ProvideCredentials;
use fluidity_aws::xml::XmlNode;
use fluidity_aws::{AwsConfig, Credentials, Endpoints, Env, HttpClient, HttpConfig, Service};
use serde_json::{json, Value};

use crate::e2e::bin::workspace_root;
use crate::e2e::proc::{wait_for, Proc};
use crate::e2e::tunnel::free_port;

/// The account moto puts everything in.
pub const ACCOUNT_ID: &str = "123456789012";
/// The region the harness configures (moto serves every region).
pub const REGION: &str = "us-east-1";
/// The name of the administrator the harness creates at start (and after [`Moto::reset`]).
pub const ADMIN_USER: &str = "fluidity-test-admin";

/// IAM requests moto lets through unchecked at start: CreateUser, PutUserPolicy and
/// CreateAccessKey of the administrator. Every later request is checked.
const BOOTSTRAP_REQUESTS: u32 = 3;

/// How long moto may take to start (it is usually ready in about a second).
const START_LIMIT: Duration = Duration::from_secs(60);

/// A policy document allowing every action on every resource.
pub fn allow_all_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": "*", "Resource": "*" }]
    })
}

/// A trust policy letting `principal_arn` (a user, role or account root ARN) assume a role.
pub fn trust_policy(principal_arn: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "AWS": principal_arn },
            "Action": "sts:AssumeRole"
        }]
    })
}

/// An IAM user with an access key.
#[derive(Clone)]
pub struct TestUser {
    /// The user name.
    pub name: String,
    /// `arn:aws:iam::123456789012:user/NAME`, what STS GetCallerIdentity reports for it.
    pub arn: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for TestUser {
    // The secret stays out of test output even though it is only moto's.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestUser")
            .field("name", &self.name)
            .field("arn", &self.arn)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl TestUser {
    /// The user's keys as [`Credentials`] (static, provider `"test"`).
    pub fn credentials(&self) -> Credentials {
        Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "test",
        )
    }

    /// The same user with a wrong secret key: moto answers `SignatureDoesNotMatch`.
    pub fn with_wrong_secret(&self) -> TestUser {
        TestUser {
            secret_access_key: format!("{}x", self.secret_access_key),
            ..self.clone()
        }
    }
}

/// An IAM role.
#[derive(Clone, Debug)]
pub struct TestRole {
    /// The role name.
    pub name: String,
    /// `arn:aws:iam::123456789012:role/NAME`, what AssumeRole takes.
    pub arn: String,
}

impl TestRole {
    /// The ARN GetCallerIdentity reports for a session of this role:
    /// `arn:aws:sts::123456789012:assumed-role/NAME/SESSION`.
    pub fn assumed_arn(&self, session: &str) -> String {
        format!(
            "arn:aws:sts::{ACCOUNT_ID}:assumed-role/{}/{session}",
            self.name
        )
    }
}

/// A VPC with DNS hostnames on, one subnet and one security group.
#[derive(Clone, Debug)]
pub struct Network {
    /// `vpc-…`.
    pub vpc_id: String,
    /// `subnet-…`.
    pub subnet_id: String,
    /// `sg-…`.
    pub security_group_id: String,
}

/// An ECS cluster with a FARGATE awsvpc service.
#[derive(Clone, Debug)]
pub struct EcsFixture {
    /// The cluster name.
    pub cluster: String,
    /// The cluster ARN.
    pub cluster_arn: String,
    /// The service name.
    pub service: String,
    /// The service ARN.
    pub service_arn: String,
    /// The task definition ARN (`family:1`).
    pub task_definition_arn: String,
    /// The network the service's tasks run in.
    pub network: Network,
}

/// A running moto server, killed on drop.
pub struct Moto {
    proc: Proc,
    addr: SocketAddr,
    endpoint: String,
    admin: TestUser,
    admin_config: AwsConfig,
    // Holds moto's logs until the server is gone.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("endpoint", &self.endpoint)
            .field("pid", &self.proc.pid())
            .finish_non_exhaustive()
    }
}

/// Finds `moto_server`: `$FLUIDITY_MOTO_SERVER`, else the project's virtual environment
/// (`$FLUIDITY_VENV`, default `~/.cache/fluidity-venv`).
pub fn moto_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLUIDITY_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("FLUIDITY_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fluidity-venv")))
        .unwrap_or_else(|| PathBuf::from(".cache/fluidity-venv"));
    let path = venv.join("bin").join("moto_server");
    assert!(
        path.is_file(),
        "moto_server not found at {}: run `bash .ci/setup-moto.sh` (from {}) to install \
         moto[server] into the test virtual environment",
        path.display(),
        workspace_root().display()
    );
    path
}

impl Moto {
    /// Starts moto with IAM checks on and creates the administrator. Panics with a clear
    /// message if moto is not installed (run `bash .ci/setup-moto.sh`) or does not start.
    pub fn start() -> Moto {
        let server = moto_server_path();
        // The free port is found by binding and releasing it; another process could take it
        // in between, so a server that exits at once is retried on a new port.
        for attempt in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("fluidity-moto-")
                .tempdir()
                .expect("creating a temporary folder");
            let port = free_port();
            let mut cmd = Command::new(&server);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env(
                    "INITIAL_NO_AUTH_ACTION_COUNT",
                    BOOTSTRAP_REQUESTS.to_string(),
                )
                // No real AWS configuration of the developer's may leak into moto.
                .env_remove("AWS_PROFILE")
                .env("AWS_ACCESS_KEY_ID", "bootstrap")
                .env("AWS_SECRET_ACCESS_KEY", "bootstrap")
                .env("AWS_DEFAULT_REGION", REGION)
                .env("PYTHONUNBUFFERED", "1");
            let mut proc = Proc::spawn("moto_server", cmd, dir.path());
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let ready = wait_for("moto_server to accept connections", START_LIMIT, || {
                if proc.exited().is_some() {
                    return Some(false);
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| true)
            });
            if !ready {
                eprintln!(
                    "moto_server exited at start (attempt {attempt}):\n{}",
                    proc.log()
                );
                continue;
            }
            let endpoint = format!("http://{addr}");
            let admin = bootstrap_admin(&endpoint);
            let admin_config = config_for(&endpoint, admin.credentials());
            let moto = Moto {
                proc,
                addr,
                endpoint,
                admin,
                admin_config,
                _dir: dir,
            };
            moto.keep_tasks_running();
            return moto;
        }
        panic!("moto_server did not start after 5 attempts; see its logs above");
    }

    /// The URL every service is reachable at, e.g. `http://127.0.0.1:40123` (what
    /// `AWS_ENDPOINT_URL` should be).
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// moto's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The region the harness uses ([`REGION`]).
    pub fn region(&self) -> &str {
        REGION
    }

    /// The administrator created at start: allowed everything. Tests that check who
    /// called should make their own users with [`Moto::create_user`].
    pub fn admin(&self) -> &TestUser {
        &self.admin
    }

    /// A configuration signing as the administrator, for fixtures and checks.
    pub fn admin_config(&self) -> &AwsConfig {
        &self.admin_config
    }

    /// An [`AwsConfig`] signing with `user`'s static keys, every service at moto, region
    /// [`REGION`], default retry policy.
    pub fn aws_config(&self, user: &TestUser) -> AwsConfig {
        config_for(&self.endpoint, user.credentials())
    }

    /// An [`AwsConfig`] with any credential provider (a chain, AssumeRole, …), every service
    /// at moto.
    pub fn aws_config_with(&self, credentials: Arc<dyn ProvideCredentials>) -> AwsConfig {
        AwsConfig::new(
            REGION,
            credentials,
            Endpoints::global(&self.endpoint),
            http_client(),
        )
    }

    /// The environment a process signing as `user` needs: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (moto), and settings that
    /// keep the developer's own AWS configuration out: no instance metadata
    /// (`AWS_EC2_METADATA_DISABLED`) and empty shared files (`AWS_CONFIG_FILE`,
    /// `AWS_SHARED_CREDENTIALS_FILE` = `/dev/null`).
    ///
    /// Pass these to a child process with `Command::envs`, after `env_remove` of any other
    /// `AWS_*` variable the parent may have (see [`Moto::clear_aws_env`]).
    pub fn env_vars(&self, user: &TestUser) -> Vec<(String, String)> {
        let mut vars = self.env_vars_without_keys();
        vars.push(("AWS_ACCESS_KEY_ID".into(), user.access_key_id.clone()));
        vars.push((
            "AWS_SECRET_ACCESS_KEY".into(),
            user.secret_access_key.clone(),
        ));
        vars
    }

    /// [`Moto::env_vars`] for any credentials, temporary ones included
    /// (`AWS_SESSION_TOKEN` is set when they have a session token).
    pub fn env_vars_for(&self, credentials: &Credentials) -> Vec<(String, String)> {
        let mut vars = self.env_vars_without_keys();
        vars.push((
            "AWS_ACCESS_KEY_ID".into(),
            credentials.access_key_id().into(),
        ));
        vars.push((
            "AWS_SECRET_ACCESS_KEY".into(),
            credentials.secret_access_key().into(),
        ));
        if let Some(token) = credentials.session_token() {
            vars.push(("AWS_SESSION_TOKEN".into(), token.into()));
        }
        vars
    }

    /// [`Moto::env_vars`] without the keys: region, endpoint and isolation only, for tests
    /// that supply credentials another way (profile files, container endpoint).
    pub fn env_vars_without_keys(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ]
    }

    /// [`Moto::env_vars`] as an [`Env`] snapshot, for `AwsConfig::from_env`.
    pub fn env(&self, user: &TestUser) -> Env {
        Env::from_pairs(self.env_vars(user))
    }

    /// Removes every `AWS_*` variable a child process would inherit, so that only what the
    /// test sets reaches it.
    pub fn clear_aws_env(cmd: &mut Command) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }

    /// Creates user `name` with an access key and an inline policy allowing everything.
    pub fn create_user(&self, name: &str) -> TestUser {
        self.create_user_with_policy(name, Some(&allow_all_policy()))
    }

    /// Creates user `name` with an access key and `policy` as its only inline policy (`None`:
    /// no policy, so every call but what moto never checks is denied).
    pub fn create_user_with_policy(&self, name: &str, policy: Option<&Value>) -> TestUser {
        let (arn, access_key_id, secret_access_key) =
            create_user_calls(&self.admin_config, name, policy);
        TestUser {
            name: name.to_string(),
            arn,
            access_key_id,
            secret_access_key,
        }
    }

    /// Creates role `name` that `trusted_principal_arn` may assume, with an inline policy
    /// allowing everything (moto checks the assumed role's policies on every call).
    pub fn create_role(&self, name: &str, trusted_principal_arn: &str) -> TestRole {
        let trust = trust_policy(trusted_principal_arn).to_string();
        let root = self.iam(
            "CreateRole",
            &[("RoleName", name), ("AssumeRolePolicyDocument", &trust)],
        );
        let arn = text(&root, &["CreateRoleResult", "Role", "Arn"], "CreateRole");
        let policy = allow_all_policy().to_string();
        self.iam(
            "PutRolePolicy",
            &[
                ("RoleName", name),
                ("PolicyName", "allow-all"),
                ("PolicyDocument", &policy),
            ],
        );
        TestRole {
            name: name.to_string(),
            arn,
        }
    }

    /// Temporary credentials of `role` for session `session`, obtained by `user` with STS
    /// AssumeRole (one hour). GetCallerIdentity with them reports
    /// [`TestRole::assumed_arn`]`(session)`.
    pub fn assume_role(&self, user: &TestUser, role: &TestRole, session: &str) -> Credentials {
        fluidity_aws::clients::sts::StsClient::new(&self.aws_config(user))
            .assume_role(&role.arn, session, None, None)
            .unwrap_or_else(|e| panic!("{} assuming {}: {e}", user.name, role.arn))
    }

    /// Clears all of moto's state (`POST /moto-api/reset`) and creates a new administrator:
    /// every [`TestUser`] and [`TestRole`] made before is gone, and so are their keys.
    pub fn reset(&mut self) {
        self.moto_api("/moto-api/reset", "application/json", "");
        // A reset drops the administrator too: reopen the unchecked window just long enough
        // to create a new one.
        self.moto_api(
            "/moto-api/reset-auth",
            "text/plain",
            &BOOTSTRAP_REQUESTS.to_string(),
        );
        self.admin = bootstrap_admin(&self.endpoint);
        self.admin_config = config_for(&self.endpoint, self.admin.credentials());
        self.keep_tasks_running();
    }

    /// Sets how moto moves a model through its states
    /// (`POST /moto-api/state-manager/set-transition`), e.g. model `ecs::task` with
    /// `{"progression": "manual", "times": 3}` (advance one state every 3 DescribeTasks) or
    /// `{"progression": "time", "seconds": 5}`.
    pub fn set_transition(&self, model: &str, transition: Value) {
        let body = json!({ "model_name": model, "transition": transition }).to_string();
        self.moto_api(
            "/moto-api/state-manager/set-transition",
            "application/json",
            &body,
        );
    }

    /// Keeps ECS tasks RUNNING until StopTask. moto's default advances a task one state
    /// (RUNNING, DEACTIVATING, STOPPING, DEPROVISIONING, STOPPED) on every DescribeTasks,
    /// which a control plane that polls would see as a crash. [`Moto::start`] and
    /// [`Moto::reset`] call this; use [`Moto::set_transition`] to test stopping tasks.
    pub fn keep_tasks_running(&self) {
        self.set_transition(
            "ecs::task",
            json!({ "progression": "manual", "times": 1_000_000_000u64 }),
        );
    }

    /// Sends a POST to moto's own API (`/moto-api/...`) and returns the body; panics on a
    /// non-2xx answer.
    pub fn moto_api(&self, path: &str, content_type: &str, body: &str) -> String {
        let (status, body) = raw_post(self.addr, path, content_type, body);
        assert!(
            (200..300).contains(&status),
            "moto {path} answered {status}: {body}"
        );
        body
    }

    /// An IAM query call as the administrator; panics on failure.
    pub fn iam(&self, action: &str, params: &[(&str, &str)]) -> XmlNode {
        self.admin_config
            .call_query(Service::Iam, action, params)
            .unwrap_or_else(|e| panic!("IAM {action} failed: {e}"))
    }

    /// An EC2 query call as the administrator; panics on failure.
    pub fn ec2(&self, action: &str, params: &[(&str, &str)]) -> XmlNode {
        self.admin_config
            .call_query(Service::Ec2, action, params)
            .unwrap_or_else(|e| panic!("EC2 {action} failed: {e}"))
    }

    /// A JSON-protocol call (ECS, DynamoDB, Secrets Manager) as the administrator; panics
    /// on failure.
    pub fn json(&self, service: Service, operation: &str, input: &Value) -> Value {
        self.admin_config
            .call_json(service, operation, input)
            .unwrap_or_else(|e| panic!("{service:?} {operation} failed: {e}"))
    }

    /// A VPC `10.0.0.0/16` with DNS support and hostnames (which FARGATE tasks need), a
    /// subnet `10.0.1.0/24` and a security group.
    pub fn create_network(&self) -> Network {
        let root = self.ec2("CreateVpc", &[("CidrBlock", "10.0.0.0/16")]);
        let vpc_id = text(&root, &["vpc", "vpcId"], "CreateVpc");
        for attr in ["EnableDnsSupport.Value", "EnableDnsHostnames.Value"] {
            self.ec2("ModifyVpcAttribute", &[("VpcId", &vpc_id), (attr, "true")]);
        }
        let root = self.ec2(
            "CreateSubnet",
            &[
                ("VpcId", &vpc_id),
                ("CidrBlock", "10.0.1.0/24"),
                ("AvailabilityZone", "us-east-1a"),
            ],
        );
        let subnet_id = text(&root, &["subnet", "subnetId"], "CreateSubnet");
        let root = self.ec2(
            "CreateSecurityGroup",
            &[
                ("GroupName", "fluidity-test"),
                ("GroupDescription", "fluidity test"),
                ("VpcId", &vpc_id),
            ],
        );
        let security_group_id = text(&root, &["groupId"], "CreateSecurityGroup");
        Network {
            vpc_id,
            subnet_id,
            security_group_id,
        }
    }

    /// The `awsvpcConfiguration` for `network`, as ECS CreateService and RunTask take it.
    pub fn awsvpc(network: &Network) -> Value {
        json!({
            "awsvpcConfiguration": {
                "subnets": [network.subnet_id],
                "securityGroups": [network.security_group_id],
                "assignPublicIp": "ENABLED"
            }
        })
    }

    /// Cluster `cluster`, a FARGATE task definition (family `SERVICE-task`, one container
    /// `server` with memory, as moto requires) and service `service` in a new
    /// [`Moto::create_network`], with `desired_count` (moto starts no task for it).
    pub fn create_ecs_service(
        &self,
        cluster: &str,
        service: &str,
        desired_count: u32,
    ) -> EcsFixture {
        let network = self.create_network();
        let out = self.json(
            Service::Ecs,
            "CreateCluster",
            &json!({ "clusterName": cluster }),
        );
        let cluster_arn = json_str(&out, &["cluster", "clusterArn"], "CreateCluster");
        let out = self.json(
            Service::Ecs,
            "RegisterTaskDefinition",
            &json!({
                "family": format!("{service}-task"),
                "networkMode": "awsvpc",
                "requiresCompatibilities": ["FARGATE"],
                "cpu": "256",
                "memory": "512",
                "containerDefinitions": [{
                    "name": "server",
                    "image": "fluidity-server:test",
                    "memory": 512,
                    "essential": true,
                    "portMappings": [{ "containerPort": 8443, "protocol": "tcp" }]
                }]
            }),
        );
        let task_definition_arn = json_str(
            &out,
            &["taskDefinition", "taskDefinitionArn"],
            "RegisterTaskDefinition",
        );
        let out = self.json(
            Service::Ecs,
            "CreateService",
            &json!({
                "cluster": cluster,
                "serviceName": service,
                "taskDefinition": task_definition_arn,
                "desiredCount": desired_count,
                "launchType": "FARGATE",
                "networkConfiguration": Moto::awsvpc(&network),
            }),
        );
        let service_arn = json_str(&out, &["service", "serviceArn"], "CreateService");
        EcsFixture {
            cluster: cluster.to_string(),
            cluster_arn,
            service: service.to_string(),
            service_arn,
            task_definition_arn,
            network,
        }
    }

    /// Runs one FARGATE task of `ecs`'s task definition in its network, with `group`
    /// `service:NAME` (so it looks like a task of the service) and `startedBy`
    /// `started_by`. moto makes it RUNNING at once, with an ENI attachment. Returns the
    /// task as RunTask answered it.
    pub fn run_fargate_task(&self, ecs: &EcsFixture, started_by: &str) -> Value {
        let out = self.json(
            Service::Ecs,
            "RunTask",
            &json!({
                "cluster": ecs.cluster,
                "taskDefinition": ecs.task_definition_arn,
                "launchType": "FARGATE",
                "count": 1,
                "startedBy": started_by,
                "group": format!("service:{}", ecs.service),
                "networkConfiguration": Moto::awsvpc(&ecs.network),
            }),
        );
        match out.get("tasks").and_then(|t| t.get(0)) {
            Some(task) => task.clone(),
            None => panic!("RunTask started no task: {out}"),
        }
    }

    /// Allocates an Elastic IP and associates it with ENI `eni_id`, so that
    /// DescribeNetworkInterfaces reports a public IP for it. Returns the public IP.
    pub fn associate_public_ip(&self, eni_id: &str) -> String {
        let root = self.ec2("AllocateAddress", &[("Domain", "vpc")]);
        let allocation = text(&root, &["allocationId"], "AllocateAddress");
        let public_ip = text(&root, &["publicIp"], "AllocateAddress");
        self.ec2(
            "AssociateAddress",
            &[
                ("AllocationId", &allocation),
                ("NetworkInterfaceId", eni_id),
            ],
        );
        public_ip
    }

    /// A DynamoDB table `name` with string hash key `key`, on-demand billing, and TTL on
    /// attribute `ttl_attribute` when given.
    pub fn create_table(&self, name: &str, key: &str, ttl_attribute: Option<&str>) {
        self.json(
            Service::DynamoDb,
            "CreateTable",
            &json!({
                "TableName": name,
                "AttributeDefinitions": [{ "AttributeName": key, "AttributeType": "S" }],
                "KeySchema": [{ "AttributeName": key, "KeyType": "HASH" }],
                "BillingMode": "PAY_PER_REQUEST",
            }),
        );
        if let Some(attr) = ttl_attribute {
            self.json(
                Service::DynamoDb,
                "UpdateTimeToLive",
                &json!({
                    "TableName": name,
                    "TimeToLiveSpecification": { "AttributeName": attr, "Enabled": true },
                }),
            );
        }
    }

    /// A Secrets Manager secret `name` with string `value`; returns its ARN.
    pub fn create_secret(&self, name: &str, value: &str) -> String {
        let out = self.json(
            Service::SecretsManager,
            "CreateSecret",
            &json!({ "Name": name, "SecretString": value }),
        );
        json_str(&out, &["ARN"], "CreateSecret")
    }

    /// Lets Lambda `Invoke` run without Docker (moto then echoes instead of running code).
    pub fn lambda_without_docker(&self) {
        self.moto_api(
            "/moto-api/config",
            "application/json",
            r#"{"lambda":{"use_docker":false}}"#,
        );
    }
}

/// The HTTP transport of harness configurations: defaults, no proxy even if the developer
/// has one (moto is on loopback).
fn http_client() -> HttpClient {
    HttpClient::new(HttpConfig::default()).expect("building the HTTP client")
}

fn config_for(endpoint: &str, credentials: Credentials) -> AwsConfig {
    AwsConfig::new(
        REGION,
        Arc::new(credentials),
        Endpoints::global(endpoint),
        http_client(),
    )
}

/// Creates the administrator during the unchecked window; the signature of these requests
/// is not verified, so any keys sign them.
fn bootstrap_admin(endpoint: &str) -> TestUser {
    let anyone = config_for(
        endpoint,
        Credentials::new("bootstrap", "bootstrap", None, None, "test"),
    )
    .with_retry(fluidity_aws::RetryPolicy::none());
    let (arn, access_key_id, secret_access_key) =
        create_user_calls(&anyone, ADMIN_USER, Some(&allow_all_policy()));
    TestUser {
        name: ADMIN_USER.to_string(),
        arn,
        access_key_id,
        secret_access_key,
    }
}

/// CreateUser, PutUserPolicy (if any), CreateAccessKey: exactly [`BOOTSTRAP_REQUESTS`]
/// requests with a policy. Returns the ARN, key id and secret.
fn create_user_calls(
    config: &AwsConfig,
    name: &str,
    policy: Option<&Value>,
) -> (String, String, String) {
    let call = |action: &str, params: &[(&str, &str)]| {
        config
            .call_query(Service::Iam, action, params)
            .unwrap_or_else(|e| panic!("IAM {action} for user {name} failed: {e}"))
    };
    let root = call("CreateUser", &[("UserName", name)]);
    let arn = text(&root, &["CreateUserResult", "User", "Arn"], "CreateUser");
    if let Some(policy) = policy {
        let doc = policy.to_string();
        call(
            "PutUserPolicy",
            &[
                ("UserName", name),
                ("PolicyName", "test-policy"),
                ("PolicyDocument", &doc),
            ],
        );
    }
    let root = call("CreateAccessKey", &[("UserName", name)]);
    let key = |field| {
        text(
            &root,
            &["CreateAccessKeyResult", "AccessKey", field],
            "CreateAccessKey",
        )
    };
    (arn, key("AccessKeyId"), key("SecretAccessKey"))
}

fn text(root: &XmlNode, path: &[&str], what: &str) -> String {
    match root.text_at(path) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => panic!("{what}: no {} in moto's answer: {root:?}", path.join("/")),
    }
}

fn json_str(v: &Value, path: &[&str], what: &str) -> String {
    let mut cur = v;
    for p in path {
        cur = match cur.get(p) {
            Some(c) => c,
            None => panic!("{what}: no {} in moto's answer: {v}", path.join(".")),
        };
    }
    match cur.as_str() {
        Some(s) => s.to_string(),
        None => panic!("{what}: {} is not a string: {v}", path.join(".")),
    }
}

/// A minimal HTTP/1.1 POST for moto's own API (not AWS, so not signed).
fn raw_post(addr: SocketAddr, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to moto at {addr}: {e}"));
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("sending {path} to moto: {e}"));
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .unwrap_or_else(|e| panic!("reading moto's answer to {path}: {e}"));
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
