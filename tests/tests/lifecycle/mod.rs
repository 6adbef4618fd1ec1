//! The on-demand lifecycle on one machine: moto (IAM checks on) as AWS, the real
//! `fluidity-control` as the control functions, a thread of this test playing ECS, and the
//! real `fluidity` and `fluidity-server` binaries.
//!
//! Addresses are distinct loopback addresses so that every IP check is real: the server
//! listens on 127.0.0.2 (its "public IP", an Elastic IP with that address is associated
//! with its task's network interface in moto); the agent's public IP is 127.0.0.1, the
//! source address Linux gives every loopback connection, which is what the control host
//! sees as the caller of Wake and what the server sees as the tunnel's source.
//!
//! ECS is played by [`EcsPlayer`]: when moto shows the service's desired count at 1 it runs
//! a task in moto, gives its interface the server's address, serves ECS task metadata v4
//! for it on 127.0.0.1 and starts `fluidity-server` with `ECS_CONTAINER_METADATA_URI_V4`
//! pointing there and every AWS endpoint pointing at moto; when the desired count drops to
//! 0 it stops the task and the server.

pub mod metadata;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fluidity_aws::clients::ecs::EcsClient;
use fluidity_aws::control::ca::ca_secret_json;
use fluidity_aws::control::types::{SERVER_ID_ATTR, TTL_ATTR};
use fluidity_aws::Service;
use fluidity_runtime_smol::pki::generate_ca;
use fluidity_tests::e2e::bin::{binaries, workspace_root};
use fluidity_tests::e2e::proc::{wait_for, Proc};
use fluidity_tests::e2e::tunnel::free_port;
use fluidity_tests::moto::{EcsFixture, Moto, TestUser};
use serde_json::{json, Value};
use tempfile::TempDir;

use self::metadata::MetadataServer;

/// The server's public IP in these tests.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The agent's public IP as every loopback peer sees it.
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Cluster and service of the server.
pub const CLUSTER: &str = "fluidity";
/// The service.
pub const SERVICE: &str = "tunnel";
/// The agent-IP table.
pub const TABLE: &str = "fluidity-agent-ips";

/// Generous limit for processes to come up on a busy machine (readiness, never timing).
pub const LIMIT: Duration = Duration::from_secs(120);

/// `fluidity-control`, built once per test process like the other binaries.
pub fn control_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let agent = &binaries().agent;
        let dir = agent.parent().expect("the binaries' folder");
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_owned();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "fluidity-aws",
            "--bin",
            "fluidity-control",
        ]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd.env(
            "CARGO_TARGET_DIR",
            dir.parent().expect("the profile folder has a parent"),
        );
        cmd.current_dir(workspace_root());
        let status = cmd
            .status()
            .expect("running cargo to build fluidity-control");
        assert!(
            status.success(),
            "building fluidity-control failed ({status})"
        );
        let bin = dir.join(format!("fluidity-control{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "{} is missing after the build",
            bin.display()
        );
        bin
    })
}

/// The server's permissions, exactly as docs/AWS.md lists them: a server that needs one
/// more fails to start here (moto checks IAM). The function URL actions are not checked
/// (the control host plays Lambda), nor is moto's signing-name alias of CloudWatch's
/// action one AWS knows.
fn server_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": [
                "ecs:DescribeTasks",
                "ec2:DescribeNetworkInterfaces",
                "dynamodb:GetItem",
                // AWS names the action cloudwatch:…; moto 5.2 checks it under the
                // signing name, monitoring:….
                "cloudwatch:PutMetricData", "monitoring:PutMetricData",
                "lambda:InvokeFunctionUrl"
            ],
            "Resource": "*"
        }, {
            "Effect": "Allow",
            "Action": "lambda:InvokeFunction",
            "Resource": "*",
            "Condition": {"Bool": {"lambda:InvokedViaFunctionUrl": "true"}}
        }]
    })
}

/// How the played ECS behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A task with the server's address; the server is started.
    Normal,
    /// A task whose interface never gets a public address; no server.
    NoAddress,
    /// The service's task has the server's address, but the process listening there
    /// believes it is another task (a decoy in the same cluster): its certificate names
    /// another ARN.
    ImpostorServer,
}

/// Everything one lifecycle test needs.
pub struct World {
    /// moto.
    pub moto: Arc<Moto>,
    /// The cluster, service and network.
    pub ecs: EcsFixture,
    /// The user the agent signs with (tunnel IAM principal).
    pub agent_user: TestUser,
    /// The user the server runs as.
    pub server_user: TestUser,
    /// The control host, alive as long as the world (its log is printed on failure).
    pub _control: Proc,
    /// `http://127.0.0.1:PORT` of the control host.
    pub control_url: String,
    /// The server's tunnel port (on [`SERVER_IP`]).
    pub server_port: u16,
    /// Scratch folder: configs, logs, caches.
    pub dir: TempDir,
    /// The CA the CA function signs with (in its secret).
    pub ca: fluidity_runtime_smol::pki::CaBundle,
}

impl World {
    /// moto with the cluster, service (desired count 0), table and CA secret, and the
    /// control host serving them.
    pub fn start() -> World {
        let moto = Moto::start();
        moto.keep_tasks_running();
        let ecs = moto.create_ecs_service(CLUSTER, SERVICE, 0);
        moto.create_table(TABLE, SERVER_ID_ATTR, Some(TTL_ATTR));
        let ca = generate_ca(
            "Fluidity lifecycle test CA",
            Duration::from_secs(3650 * 86_400),
        )
        .expect("generating the test CA");
        moto.create_secret("fluidity-ca", &ca_secret_json(&ca));
        let control_user = moto.create_user("fluidity-control");
        let agent_user = moto.create_user("fluidity-agent");
        let server_user = moto.create_user_with_policy("fluidity-server", Some(&server_policy()));
        let dir = tempfile::Builder::new()
            .prefix("fluidity-lifecycle-")
            .tempdir()
            .expect("creating a temporary folder");

        let mut last = None;
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(control_binary());
            Moto::clear_aws_env(&mut cmd);
            cmd.envs(moto.env_vars(&control_user))
                .env("FLUIDITY_CLUSTER", CLUSTER)
                .env("FLUIDITY_SERVICE", SERVICE)
                .env("FLUIDITY_TABLE", TABLE)
                .env("FLUIDITY_CA_SECRET", "fluidity-ca")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--require-signature");
            let mut proc = Proc::spawn("fluidity-control", cmd, dir.path());
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + LIMIT;
            while Instant::now() < deadline && proc.exited().is_none() {
                if TcpStream::connect(addr).is_ok() {
                    return World {
                        moto: Arc::new(moto),
                        ecs,
                        agent_user,
                        server_user,
                        _control: proc,
                        control_url: format!("http://{addr}"),
                        server_port: free_port(),
                        dir,
                        ca,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last = Some(proc.log());
        }
        panic!(
            "fluidity-control did not start: {}",
            last.unwrap_or_default()
        );
    }

    /// The service's desired count in moto.
    pub fn desired_count(&self) -> u32 {
        desired_count(&self.moto, &self.ecs)
    }

    /// A path in the scratch folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent in AWS mode with `wait_secs` as its waiting limit; `iam` turns on
    /// IAM tunnel authentication against moto's STS.
    pub fn start_agent(&self, wait_secs: u64, iam: bool) -> (Proc, SocketAddr) {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut config = format!(
            "mode = \"aws\"\nlisten = \"{listen}\"\n{auth}\n\
             [lifecycle]\ncontrol_url = \"{control}\"\nserver_port = {port}\n\
             wait_secs = {wait_secs}\npoll_secs = 1\nstate_dir = \"{state}\"\n",
            auth = if iam { "auth = \"iam\"" } else { "" },
            control = self.control_url,
            port = self.server_port,
            state = self.path("agent-state").display(),
        );
        if iam {
            config.push_str(&format!(
                "[aws]\nsts_endpoint = \"{}\"\n",
                self.moto.endpoint()
            ));
        }
        let path = self.path("agent.toml");
        std::fs::write(&path, config).expect("writing the agent config");
        let mut cmd = Command::new(&binaries().agent);
        Moto::clear_aws_env(&mut cmd);
        // A setting AWS mode ignores, which it must say.
        cmd.envs(self.moto.env_vars(&self.agent_user))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .args(["--server-name", "ignored.example"]);
        (Proc::spawn("fluidity", cmd, self.dir.path()), listen)
    }

    /// Starts playing ECS with `scenario`; `iam` configures the server for IAM tunnel
    /// authentication admitting the agent's user.
    pub fn play_ecs(&self, scenario: Scenario, iam: bool) -> EcsPlayer {
        let stop = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Mutex::new(ServerSlot::default()));
        let ctx = PlayerCtx {
            moto: self.moto.clone(),
            ecs: self.ecs.clone(),
            scenario,
            iam,
            server_user: self.server_user.clone(),
            agent_arn: self.agent_user.arn.clone(),
            control_url: self.control_url.clone(),
            server_port: self.server_port,
            dir: self.dir.path().to_path_buf(),
            ca: self.ca.clone(),
        };
        let (s, srv) = (stop.clone(), server.clone());
        let thread = std::thread::spawn(move || ctx.run(&s, &srv));
        EcsPlayer {
            stop,
            server,
            thread: Some(thread),
        }
    }
}

/// The service's desired count in moto.
pub fn desired_count(moto: &Moto, ecs: &EcsFixture) -> u32 {
    let (services, _) = EcsClient::new(moto.admin_config())
        .describe_services(&ecs.cluster, &[ecs.service.as_str()])
        .expect("DescribeServices");
    services
        .first()
        .map(|s| s.desired_count)
        .expect("the service exists")
}

/// What the played ECS is running.
#[derive(Default)]
pub struct ServerSlot {
    /// The service's task, while it runs.
    pub task_arn: Option<String>,
    /// The ARN the running server believes it has.
    pub server_arn: Option<String>,
    /// The server process, while the task runs.
    pub proc: Option<Proc>,
    /// Its task metadata endpoint.
    pub metadata: Option<MetadataServer>,
    /// Servers stopped so far, kept for their logs.
    pub stopped: Vec<Proc>,
    /// Tasks started so far.
    pub tasks_started: usize,
    /// The running task's public address ([`SERVER_IP`] unless replaced).
    pub address: Option<Ipv4Addr>,
    /// A request to the played ECS: the running task crashes (stopped in moto, its server
    /// killed), and ECS starts a replacement whose interface gets this address.
    pub replace_with: Option<Ipv4Addr>,
    /// Tasks started from now on never get an address (as in [`Scenario::NoAddress`]).
    pub withhold_address: bool,
}

/// The thread playing ECS; stops (and stops the server) on drop.
pub struct EcsPlayer {
    stop: Arc<AtomicBool>,
    /// What it runs.
    pub server: Arc<Mutex<ServerSlot>>,
    thread: Option<JoinHandle<()>>,
}

impl EcsPlayer {
    /// Locks the slot.
    pub fn slot(&self) -> std::sync::MutexGuard<'_, ServerSlot> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running server's stderr so far (or the last stopped one's).
    pub fn server_log(&self) -> String {
        let slot = self.slot();
        slot.proc
            .as_ref()
            .or(slot.stopped.last())
            .map(Proc::log)
            .unwrap_or_default()
    }

    /// Waits until the server's log satisfies `pred`.
    pub fn wait_server_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        wait_for(what, LIMIT, || pred(&self.server_log()).then_some(()));
    }
}

impl Drop for EcsPlayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct PlayerCtx {
    moto: Arc<Moto>,
    ecs: EcsFixture,
    scenario: Scenario,
    iam: bool,
    server_user: TestUser,
    agent_arn: String,
    control_url: String,
    server_port: u16,
    dir: PathBuf,
    ca: fluidity_runtime_smol::pki::CaBundle,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {v}"))
}

fn eni_of(task: &Value) -> String {
    task["attachments"][0]["details"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|x| x["name"] == "networkInterfaceId")
                .and_then(|x| x["value"].as_str())
        })
        .unwrap_or_else(|| panic!("the task has no network interface: {task}"))
        .to_owned()
}

impl PlayerCtx {
    fn run(&self, stop: &AtomicBool, slot: &Mutex<ServerSlot>) {
        let lock = || slot.lock().unwrap_or_else(|e| e.into_inner());
        while !stop.load(Ordering::SeqCst) {
            let replace = lock().replace_with.take();
            if let Some(ip) = replace {
                self.crash_task(&mut lock(), ip);
            }
            let desired = desired_count(&self.moto, &self.ecs);
            let running = lock().task_arn.is_some();
            if desired >= 1 && !running {
                self.start_task(&mut lock());
            } else if desired == 0 && running {
                self.stop_task(&mut lock());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut s = lock();
        if s.task_arn.is_some() {
            self.stop_task(&mut s);
        }
    }

    /// An Elastic IP with address `ip`, on `eni`.
    fn give_address(&self, eni: &str, ip: Ipv4Addr) {
        let root = self.moto.ec2(
            "AllocateAddress",
            &[("Domain", "vpc"), ("Address", &ip.to_string())],
        );
        let allocation = root
            .find("allocationId")
            .map(|n| n.text.clone())
            .expect("AllocateAddress gave an allocation id");
        self.moto.ec2(
            "AssociateAddress",
            &[("AllocationId", &allocation), ("NetworkInterfaceId", eni)],
        );
    }

    fn start_task(&self, slot: &mut ServerSlot) {
        let task = self.moto.run_fargate_task(&self.ecs, "ecs-player");
        let task_arn = str_at(&task, &["taskArn"]).to_owned();
        slot.tasks_started += 1;
        slot.task_arn = Some(task_arn.clone());
        if self.scenario == Scenario::NoAddress || slot.withhold_address {
            return;
        }
        let ip = *slot.address.get_or_insert(SERVER_IP);
        self.give_address(&eni_of(&task), ip);
        let server_arn = if self.scenario == Scenario::ImpostorServer {
            // Another task in the cluster, with the same address, that Query never picks
            // (its group names another service): the server believes it is that one.
            let out = self.moto.json(
                Service::Ecs,
                "RunTask",
                &json!({
                    "cluster": self.ecs.cluster,
                    "taskDefinition": self.ecs.task_definition_arn,
                    "launchType": "FARGATE",
                    "count": 1,
                    "startedBy": "decoy",
                    "group": "service:decoy",
                    "networkConfiguration": Moto::awsvpc(&self.ecs.network),
                }),
            );
            let decoy = &out["tasks"][0];
            self.give_address(&eni_of(decoy), ip);
            let decoy_arn = str_at(decoy, &["taskArn"]).to_owned();
            // The CA function issues no certificate for another service's task, so the
            // impostor's comes from the CA itself, cached where the server looks first.
            self.cache_server_certificate(&decoy_arn, ip);
            decoy_arn
        } else {
            task_arn
        };
        let metadata = MetadataServer::start(json!({
            "Cluster": self.ecs.cluster_arn,
            "TaskARN": server_arn,
            "Family": format!("{}-task", self.ecs.service),
            "Revision": "1",
            "ServiceName": self.ecs.service,
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "LaunchType": "FARGATE",
            "Containers": [{
                "Name": "server",
                "Networks": [{ "NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.1.23"] }]
            }]
        }));
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut config = format!(
            "mode = \"aws\"\nlisten = \"{ip}:{port}\"\nhealth_listen = \"{health}\"\n\
             [aws]\ncache_dir = \"{cache}\"\nstartup_wait_secs = 60\nmetrics_period_secs = 2\n",
            port = self.server_port,
            cache = self.dir.join("server-cache").display(),
        );
        if self.iam {
            config = format!(
                "auth = \"iam\"\n{config}[iam]\nallowed_principals = [\"{}\"]\nsts_endpoint = \"{}\"\n",
                self.agent_arn,
                self.moto.endpoint()
            );
        }
        let path = self.dir.join("server.toml");
        std::fs::write(&path, config).expect("writing the server config");
        let mut cmd = Command::new(&binaries().server);
        Moto::clear_aws_env(&mut cmd);
        cmd.envs(self.moto.env_vars(&self.server_user))
            .env("ECS_CONTAINER_METADATA_URI_V4", metadata.url())
            .env("FLUIDITY_TABLE", TABLE)
            .env("FLUIDITY_CONTROL_URL", &self.control_url)
            .arg("--config")
            .arg(&path)
            .arg("--egress")
            .arg("allow_cidrs=127.0.0.1/32");
        slot.proc = Some(Proc::spawn("fluidity-server", cmd, &self.dir));
        slot.metadata = Some(metadata);
        slot.server_arn = Some(server_arn);
    }

    /// Writes a server certificate for `arn`, `ip` and the agent's address, made with the
    /// CA itself, into the server's certificate cache.
    fn cache_server_certificate(&self, arn: &str, ip: Ipv4Addr) {
        use fluidity_runtime_smol::pki::{issue_server, SanEntry};
        let names = [SanEntry::Ip(ip.into()), SanEntry::Ip(AGENT_IP.into())];
        let made = issue_server(&self.ca, &names, arn, Duration::from_secs(7 * 86_400))
            .expect("a server certificate from the CA");
        let dir = self.dir.join("server-cache");
        std::fs::create_dir_all(&dir).expect("the server's cache folder");
        for (name, pem) in [
            ("server.pem", &made.cert_pem),
            ("server-key.pem", &made.key_pem),
            ("server-ca.pem", &self.ca.cert_pem().to_owned()),
        ] {
            std::fs::write(dir.join(name), pem).expect("writing the cached certificate");
        }
    }

    /// The task crashes: ECS marks it stopped and its server dies at once (SIGKILL, no
    /// draining); the next task gets `next_ip`.
    fn crash_task(&self, slot: &mut ServerSlot, next_ip: Ipv4Addr) {
        if let Some(arn) = slot.task_arn.take() {
            self.moto.json(
                Service::Ecs,
                "StopTask",
                &json!({ "cluster": self.ecs.cluster, "task": arn, "reason": "essential container exited" }),
            );
        }
        if let Some(mut p) = slot.proc.take() {
            p.kill();
            slot.stopped.push(p);
        }
        slot.metadata = None;
        slot.server_arn = None;
        slot.address = Some(next_ip);
    }

    fn stop_task(&self, slot: &mut ServerSlot) {
        if let Some(arn) = slot.task_arn.take() {
            self.moto.json(
                Service::Ecs,
                "StopTask",
                &json!({ "cluster": self.ecs.cluster, "task": arn, "reason": "desired count 0" }),
            );
        }
        if let Some(mut p) = slot.proc.take() {
            // SIGTERM first, as ECS does, so the server drains.
            let _ = Command::new("kill")
                .args(["-TERM", &p.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while p.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            slot.stopped.push(p);
        }
        slot.metadata = None;
        slot.server_arn = None;
    }
}

/// Sends SIGTERM to `proc` and waits (up to [`LIMIT`]) for it to exit.
pub fn terminate(proc: &mut Proc) -> std::process::ExitStatus {
    proc.terminate(LIMIT)
}

/// Opens a TLS connection to the server at `addr` from this machine with `cert`/`key`
/// (signed by the CA in `ca_pem`) and reports whether the server kept it (it answers
/// the tunnel hello) or dropped it.
pub fn server_accepts(addr: SocketAddr, cert: &str, key: &str, ca_pem: &str) -> bool {
    use fluidity_runtime_smol::tls::{client_config, CaRoots, Identity, PeerCheck};
    let identity = Identity::from_pem(cert, key).expect("the test certificate");
    let roots = CaRoots::from_pem(ca_pem).expect("the CA certificate");
    let config = client_config(&identity, &roots, &PeerCheck::default()).expect("a TLS config");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(config, name).expect("a TLS client");
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("TCP connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The server speaks first after the handshake (its hello): a byte means admitted; an
    // alert, a reset or the end of the stream means refused.
    let mut b = [0u8; 1];
    matches!(tls.read(&mut b), Ok(1))
}

/// `IpAddr` of [`SERVER_IP`].
pub fn server_ip() -> IpAddr {
    IpAddr::V4(SERVER_IP)
}
