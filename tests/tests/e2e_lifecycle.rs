//! The on-demand lifecycle end to end, on one machine: the real agent wakes its server
//! through the real control host (`fluidity-control`) against moto with IAM checks on;
//! this test plays ECS and starts the real `fluidity-server` with task metadata served
//! locally; the server discovers itself, reads the agent's address, gets its certificate;
//! the agent queries, gets its certificate, connects, checks, authenticates through moto's
//! STS; curl works through it; on SIGTERM the agent calls Kill and the service's desired
//! count is 0 again. Then the refusals: another server's ARN (both directions), a source
//! address that is not in the agent certificate, a server that never gets an address.
//! And a server replaced while the agent runs: the agent finds the new task, certifies
//! for its ARN and carries traffic again through the same proxy port; or, when the
//! replacement never becomes usable, gives up at its limit and calls Kill once.
//!
//! Addresses: server 127.0.0.2, agent 127.0.0.1 (see `lifecycle/mod.rs`).

mod lifecycle;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use fluidity_aws::clients::cloudwatch::CloudWatchClient;
use fluidity_aws::control::types::{
    CertRole, CertificateRequest, METRIC_ACTIVE_TUNNELS, METRIC_DIMENSION, METRIC_NAMESPACE,
};
use fluidity_aws::control::{ControlClient, ControlUrls};
use fluidity_runtime_smol::pki::create_csr;
use fluidity_runtime_smol::tls::Identity;
use fluidity_tests::e2e::client::curl_status;
use fluidity_tests::e2e::origin::HttpOrigin;
use fluidity_tests::e2e::proc::wait_for;
use fluidity_tests::e2e::watchdog;

use lifecycle::{server_accepts, server_ip, terminate, Scenario, World, AGENT_IP, LIMIT};

/// IAM tunnel authentication through moto's STS on both sides.
const IAM: bool = true;

/// A certificate from the CA function (through the control host) for `cn` and `ip`, as
/// an agent would get one; returns (certificate, key, CA certificate).
fn agent_certificate(w: &World, cn: &str, ip: IpAddr) -> (String, String, String) {
    let control = ControlClient::new(
        &w.moto.aws_config(&w.agent_user),
        ControlUrls::on_host(&w.control_url),
    );
    let csr = create_csr(cn, &[ip]).expect("a CSR");
    let answer = control
        .sign_certificate(&CertificateRequest {
            csr: csr.csr_pem.clone(),
            role: CertRole::Agent,
            validity_days: None,
        })
        .expect("the CA function signs an agent CSR");
    (answer.certificate, csr.key_pem, answer.ca_certificate)
}

#[test]
fn wake_discover_certify_connect_curl_and_kill_on_exit() {
    let _wd = watchdog("wake_discover_certify_connect", Duration::from_secs(600));
    let w = World::start();
    let player = w.play_ecs(Scenario::Normal, IAM);
    let origin = HttpOrigin::start("origin");
    let (mut agent, proxy) = w.start_agent(180, IAM);

    let ready = agent.wait_log(LIMIT * 2, |l| l.contains("fluidity: ready"));
    if !ready {
        agent.print_log();
        eprintln!("---- server ----\n{}", player.server_log());
        panic!("the agent did not become ready");
    }
    let log = agent.log();
    assert!(
        log.contains("waking the server… "),
        "progress is shown:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("ignored in AWS mode") && l.contains("server_name")),
        "the ignored --server-name is named:\n{log}"
    );
    assert!(
        log.contains("connecting to the server at 127.0.0.2"),
        "{log}"
    );
    assert_eq!(player.slot().tasks_started, 1, "one wake, one task");
    let asked = player.slot().metadata.as_ref().map_or(0, |m| m.requests());
    assert!(asked >= 1, "the server read its task metadata");

    // The server found itself, the agent's address and its certificate.
    let task_arn = player.slot().task_arn.clone().expect("a task runs");
    let server_log = player.server_log();
    assert!(
        server_log.contains(&task_arn) && server_log.contains("AWS mode ready"),
        "the server discovered its ARN {task_arn}:\n{server_log}"
    );
    assert!(
        server_log.contains("agent address read from DynamoDB")
            && server_log.contains("agent_ip=127.0.0.1"),
        "{server_log}"
    );
    // Both certificates name this server's ARN; the server's names its address and the
    // agent's, the agent's names the agent's address.
    let names = |dir: &str, stem: &str| {
        Identity::load(
            &w.path(dir).join(format!("{stem}.pem")),
            &w.path(dir).join(format!("{stem}-key.pem")),
        )
        .expect("a cached certificate")
        .names()
        .expect("its names")
    };
    let server_names = names("server-cache", "server");
    assert_eq!(server_names.common_name.as_deref(), Some(task_arn.as_str()));
    assert_eq!(server_names.ip_sans, [server_ip(), IpAddr::V4(AGENT_IP)]);
    let agent_names = names("agent-state", "agent");
    assert_eq!(agent_names.common_name.as_deref(), Some(task_arn.as_str()));
    assert_eq!(agent_names.ip_sans, [IpAddr::V4(AGENT_IP)]);

    // Traffic flows.
    let (status, body) = curl_status(&format!("http://{proxy}"), &origin.url("/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from origin\n"));

    // The server refuses another server's certificate, and a certificate for another
    // source address; it admits a certificate for its ARN from the right address.
    let server = SocketAddr::new(server_ip(), w.server_port);
    let other_arn = task_arn.replace("task/", "task/other-");
    let (cert, key, ca) = agent_certificate(&w, &other_arn, IpAddr::V4(AGENT_IP));
    assert!(!server_accepts(server, &cert, &key, &ca));
    player.wait_server_log("the CN refusal", |l| {
        l.contains(&format!("CN is \"{other_arn}\", expected \"{task_arn}\""))
    });
    // The CA function issues no certificate for an address other than its caller's;
    // the server refuses one all the same (made here with the CA itself).
    let elsewhere: IpAddr = "127.0.0.3".parse().unwrap();
    let refused = ControlClient::new(
        &w.moto.aws_config(&w.agent_user),
        ControlUrls::on_host(&w.control_url),
    )
    .sign_certificate(&CertificateRequest {
        csr: create_csr(&task_arn, &[elsewhere]).expect("a CSR").csr_pem,
        role: CertRole::Agent,
        validity_days: None,
    })
    .expect_err("a certificate for another address");
    assert!(refused.to_string().contains("csr_refused"), "{refused}");
    let made = fluidity_runtime_smol::pki::issue_client(
        &w.ca,
        &task_arn,
        &[elsewhere],
        Duration::from_secs(86_400),
    )
    .expect("a certificate");
    let (cert, key, ca) = (made.cert_pem, made.key_pem, w.ca.cert_pem().to_owned());
    assert!(!server_accepts(server, &cert, &key, &ca));
    player.wait_server_log("the source address refusal", |l| {
        l.contains("address 127.0.0.1 is not in its IP SANs")
    });
    let (cert, key, ca) = agent_certificate(&w, &task_arn, IpAddr::V4(AGENT_IP));
    assert!(
        server_accepts(server, &cert, &key, &ca),
        "a certificate for this server from the right address is admitted to the handshake"
    );

    // The server publishes its metrics for Sleep.
    let cw = CloudWatchClient::new(w.moto.admin_config());
    let key = format!("{}/{}", lifecycle::CLUSTER, lifecycle::SERVICE);
    wait_for("ActiveTunnels in CloudWatch", LIMIT, || {
        let now = SystemTime::now();
        let points = cw
            .get_metric_statistics(
                METRIC_NAMESPACE,
                METRIC_ACTIVE_TUNNELS,
                &[(METRIC_DIMENSION, key.as_str())],
                now - Duration::from_secs(600),
                now + Duration::from_secs(60),
                Duration::from_secs(60),
                &["Maximum"],
            )
            .ok()?;
        points
            .iter()
            .any(|p| p.maximum.is_some_and(|m| m >= 1.0))
            .then_some(())
    });

    // A clean exit calls Kill: the desired count is 0 again.
    let status = terminate(&mut agent);
    let log = agent.log();
    assert!(status.success(), "the agent exits cleanly: {status}\n{log}");
    assert!(log.contains("stopping the server"), "{log}");
    assert_eq!(w.desired_count(), 0, "Kill set the desired count to 0");
    wait_for("the played ECS to stop the server", LIMIT, || {
        player.slot().proc.is_none().then_some(())
    });
    drop(player);
    // The agent keeps its certificate, key and CA, and nothing else: the server's address
    // is never written down.
    let mut kept: Vec<String> = std::fs::read_dir(w.path("agent-state"))
        .expect("the agent's state folder")
        .map(|e| {
            e.expect("a folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    kept.sort();
    assert_eq!(kept, ["agent-ca.pem", "agent-key.pem", "agent.pem"]);
}

#[test]
fn agent_gives_up_on_a_server_without_an_address_and_kills_it() {
    let _wd = watchdog("agent_gives_up", Duration::from_secs(400));
    let w = World::start();
    let player = w.play_ecs(Scenario::NoAddress, IAM);
    let (mut agent, _) = w.start_agent(20, IAM);
    let status = wait_for("the agent to give up", LIMIT, || agent.exited());
    let log = agent.log();
    assert!(!status.success(), "giving up is a failure: {status}\n{log}");
    assert!(log.contains("waiting for an address"), "{log}");
    assert!(log.contains("gave up after"), "{log}");
    assert!(log.contains("stopping the server"), "{log}");
    assert_eq!(
        log.matches("stopping the server").count(),
        1,
        "Kill is called once:\n{log}"
    );
    assert_eq!(w.desired_count(), 0, "Kill set the desired count to 0");
    assert_eq!(player.slot().tasks_started, 1);
}

#[test]
fn agent_refuses_a_server_whose_certificate_names_another_arn() {
    let _wd = watchdog("agent_refuses_impostor", Duration::from_secs(500));
    let w = World::start();
    let player = w.play_ecs(Scenario::ImpostorServer, IAM);
    let (mut agent, _) = w.start_agent(25, IAM);
    let (task_arn, impostor) = wait_for("the played ECS to start the server", LIMIT, || {
        let slot = player.slot();
        Some((slot.task_arn.clone()?, slot.server_arn.clone()?))
    });
    assert_ne!(task_arn, impostor);
    let status = wait_for("the agent to give up", LIMIT * 2, || agent.exited());
    let log = agent.log();
    assert!(!status.success(), "{status}\n{log}");
    // The CN appears in the log escaped or not, depending on the log format.
    let plain = format!("CN is \"{impostor}\", expected \"{task_arn}\"");
    assert!(
        log.contains(&plain) || log.contains(&plain.replace('"', "\\\"")),
        "the agent names both ARNs:\n{log}\n---- server ----\n{}",
        player.server_log()
    );
    assert!(log.contains("stopping the server"), "{log}");
    assert_eq!(w.desired_count(), 0);
}

#[test]
fn sigterm_while_waiting_stops_the_server_too() {
    let _wd = watchdog("sigterm_while_waiting", Duration::from_secs(400));
    let w = World::start();
    let _player = w.play_ecs(Scenario::NoAddress, IAM);
    let (mut agent, _) = w.start_agent(300, IAM);
    assert!(
        agent.wait_log(LIMIT, |l| l.contains("waiting for an address")),
        "the agent waits for the address:\n{}",
        agent.log()
    );
    assert_eq!(w.desired_count(), 1, "the agent woke the server");
    let status = terminate(&mut agent);
    let log = agent.log();
    assert!(
        status.success(),
        "Ctrl-C or SIGTERM is a clean exit: {status}\n{log}"
    );
    assert!(
        log.contains("stopping the server (stopped before the server was ready)"),
        "{log}"
    );
    assert_eq!(w.desired_count(), 0, "Kill set the desired count to 0");
}

#[test]
fn agent_follows_a_replaced_server_to_its_new_address_and_arn() {
    let _wd = watchdog("agent_follows_a_replaced_server", Duration::from_secs(600));
    let w = World::start();
    let player = w.play_ecs(Scenario::Normal, IAM);
    let origin = HttpOrigin::start("origin");
    let (mut agent, proxy) = w.start_agent(120, IAM);
    if !agent.wait_log(LIMIT * 2, |l| l.contains("fluidity: ready")) {
        agent.print_log();
        eprintln!("---- server ----\n{}", player.server_log());
        panic!("the agent did not become ready");
    }
    let first_arn = player.slot().task_arn.clone().expect("a task runs");
    let (status, body) = curl_status(&format!("http://{proxy}"), &origin.url("/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from origin\n"));

    // The task crashes; ECS starts another, with another ARN and another address.
    let new_ip = Ipv4Addr::new(127, 0, 0, 4);
    player.slot().replace_with = Some(new_ip);
    wait_for("the played ECS to replace the task", LIMIT, || {
        (player.slot().tasks_started == 2).then_some(())
    });
    // Meanwhile a client gets an answer at once: through the new server if the agent
    // already switched, else an honest error from the proxy, never a hang.
    let (status, _) = curl_status(&format!("http://{proxy}"), &origin.url("/hello"));
    assert!(
        [200, 502, 503].contains(&status),
        "an honest answer during the gap, got {status}"
    );

    if !agent.wait_log(LIMIT * 2, |l| l.contains("ready again with the new server")) {
        agent.print_log();
        eprintln!("---- server ----\n{}", player.server_log());
        panic!("the agent did not switch to the new server");
    }
    let second_arn = player.slot().task_arn.clone().expect("the new task runs");
    assert_ne!(first_arn, second_arn);
    let log = agent.log();
    assert!(
        log.contains("the server went away; waiting for a new one… "),
        "progress is shown while the server is away:\n{log}"
    );
    assert!(
        log.contains("connecting to the server at 127.0.0.4"),
        "{log}"
    );
    // The agent's certificate now names the new server's ARN, and still only the agent's
    // own address.
    let agent_names = Identity::load(
        &w.path("agent-state").join("agent.pem"),
        &w.path("agent-state").join("agent-key.pem"),
    )
    .expect("the cached certificate")
    .names()
    .expect("its names");
    assert_eq!(
        agent_names.common_name.as_deref(),
        Some(second_arn.as_str())
    );
    assert_eq!(agent_names.ip_sans, [IpAddr::V4(AGENT_IP)]);

    // Traffic flows again through the same proxy port.
    let (status, body) = curl_status(&format!("http://{proxy}"), &origin.url("/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from origin\n"));

    let status = terminate(&mut agent);
    let log = agent.log();
    assert!(status.success(), "the agent exits cleanly: {status}\n{log}");
    assert_eq!(
        log.matches("stopping the server").count(),
        1,
        "Kill is called once:\n{log}"
    );
    assert_eq!(w.desired_count(), 0, "Kill set the desired count to 0");
    drop(player);
    let mut kept: Vec<String> = std::fs::read_dir(w.path("agent-state"))
        .expect("the agent's state folder")
        .map(|e| {
            e.expect("a folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    kept.sort();
    assert_eq!(kept, ["agent-ca.pem", "agent-key.pem", "agent.pem"]);
}

#[test]
fn agent_gives_up_when_no_replacement_server_comes_and_kills_it() {
    let _wd = watchdog(
        "agent_gives_up_without_a_replacement",
        Duration::from_secs(500),
    );
    let w = World::start();
    let player = w.play_ecs(Scenario::Normal, IAM);
    let origin = HttpOrigin::start("origin");
    let (mut agent, proxy) = w.start_agent(15, IAM);
    if !agent.wait_log(LIMIT * 2, |l| l.contains("fluidity: ready")) {
        agent.print_log();
        eprintln!("---- server ----\n{}", player.server_log());
        panic!("the agent did not become ready");
    }
    let (status, _) = curl_status(&format!("http://{proxy}"), &origin.url("/hello"));
    assert_eq!(status, 200);

    // The task crashes and its replacement never gets an address.
    {
        let mut slot = player.slot();
        slot.withhold_address = true;
        slot.replace_with = Some(Ipv4Addr::new(127, 0, 0, 4));
    }
    let status = wait_for("the agent to give up", LIMIT * 2, || agent.exited());
    let log = agent.log();
    assert!(!status.success(), "giving up is a failure: {status}\n{log}");
    assert!(
        log.contains("the server went away; waiting for a new one… "),
        "{log}"
    );
    assert!(log.contains("gave up after"), "{log}");
    assert!(!log.contains("ready again"), "{log}");
    assert_eq!(
        log.matches("stopping the server").count(),
        1,
        "Kill is called once:\n{log}"
    );
    assert_eq!(w.desired_count(), 0, "Kill set the desired count to 0");
    assert_eq!(
        player.slot().tasks_started,
        2,
        "the replacement was started"
    );
}

/// A stand-in control host on 127.0.0.1 that answers each path (`/wake`, `/query`,
/// `/kill`) with what `answer` returns, after it pushed its events to the list returned.
fn stand_in_control(
    answer: fn(&str, &dyn Fn(&'static str)) -> &'static str,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a control host");
    let addr = listener.local_addr().expect("its address");
    let events: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>> = Default::default();
    let seen = events.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let (path, _) = fluidity_runtime_smol::testing::read_http_request(&conn);
                let push = |e| seen.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                let json = answer(&path, &push);
                let mut w = conn;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
            });
        }
    });
    (addr, events)
}

/// Starts the agent in AWS mode against the control host at `control`.
fn agent_against(control: SocketAddr, dir: &std::path::Path) -> fluidity_tests::e2e::proc::Proc {
    let listen = SocketAddr::from(([127, 0, 0, 1], fluidity_tests::e2e::tunnel::free_port()));
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"aws\"\nlisten = \"{listen}\"\n[lifecycle]\ncontrol_url = \"http://{control}\"\n\
             wait_secs = 60\npoll_secs = 1\nstate_dir = \"{}\"\n",
            dir.join("state").display()
        ),
    )
    .expect("writing the config");
    let mut cmd = std::process::Command::new(&fluidity_tests::e2e::bin::binaries().agent);
    fluidity_tests::moto::Moto::clear_aws_env(&mut cmd);
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .arg("run")
        .arg("--config")
        .arg(&config);
    fluidity_tests::e2e::proc::Proc::spawn("fluidity-stand-in", cmd, dir)
}

/// Waits until `events` holds `n` copies of `event`.
fn wait_events(events: &std::sync::Mutex<Vec<&'static str>>, event: &str, n: usize) {
    wait_for(event, LIMIT, || {
        let seen = events.lock().unwrap_or_else(|p| p.into_inner());
        (seen.iter().filter(|e| **e == event).count() >= n).then_some(())
    });
}

/// A stop while Wake is under way (a slow control plane): Kill waits for the Wake, which
/// would otherwise land after it and leave the server wanted until Sleep finds it idle.
/// The control host's Wake takes two seconds.
#[test]
fn a_stop_during_wake_kills_after_the_wake_lands() {
    let _wd = watchdog("stop_during_wake", Duration::from_secs(120));
    let (control, events) = stand_in_control(|path, push| match path {
        "/wake" => {
            push("wake begins");
            std::thread::sleep(Duration::from_secs(2));
            push("wake ends");
            r#"{"status":"starting","agent_public_ip_as_seen":"127.0.0.1","desired_count":1,"changed":true}"#
        }
        "/kill" => {
            push("kill");
            r#"{"status":"stopped","desired_count":0,"changed":true}"#
        }
        _ => r#"{"status":"starting","desired_count":1}"#,
    });
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut agent = agent_against(control, dir.path());
    wait_events(&events, "wake begins", 1);
    terminate(&mut agent);
    assert_eq!(
        *events.lock().unwrap_or_else(|p| p.into_inner()),
        ["wake begins", "wake ends", "kill"],
        "{}",
        agent.log()
    );
}

/// Ctrl-C three times while the agent stops: the second does not skip the Kill (it says
/// what the agent waits for), the third exits at once and says the server was left to
/// Sleep. Before, the signals after the first did nothing, and the agent waited for a
/// slow Kill whatever its user pressed. The control host's Kill takes 20 s, far longer
/// than the test needs.
#[test]
fn a_third_ctrl_c_leaves_a_slow_kill_behind() {
    let _wd = watchdog("ctrl_c_thrice", Duration::from_secs(120));
    let (control, events) = stand_in_control(|path, push| match path {
        "/wake" => {
            push("wake");
            r#"{"status":"starting","agent_public_ip_as_seen":"127.0.0.1","desired_count":1,"changed":true}"#
        }
        "/kill" => {
            push("kill begins");
            std::thread::sleep(Duration::from_secs(20));
            push("kill ends");
            r#"{"status":"stopped","desired_count":0,"changed":true}"#
        }
        _ => r#"{"status":"starting","desired_count":1}"#,
    });
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut agent = agent_against(control, dir.path());
    let interrupt = |agent: &fluidity_tests::e2e::proc::Proc| {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &agent.pid().to_string()])
            .status();
    };
    wait_events(&events, "wake", 1);
    interrupt(&agent);
    wait_events(&events, "kill begins", 1);
    interrupt(&agent);
    assert!(
        agent.wait_log(LIMIT, |l| l.contains("still stopping")),
        "{}",
        agent.log()
    );
    assert!(
        agent.exited().is_none(),
        "the second Ctrl-C does not end it"
    );
    interrupt(&agent);
    let status = wait_for("the agent to exit", LIMIT, || agent.exited());
    assert_eq!(status.code(), Some(130), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("exiting without stopping the server; Sleep stops it once idle"),
        "{}",
        agent.log()
    );
    assert_eq!(
        *events.lock().unwrap_or_else(|p| p.into_inner()),
        ["wake", "kill begins"],
        "the agent left before the Kill answered"
    );
}

/// The service stopped between the agent's Wake and the task's start (Sleep, or someone
/// else's Kill): the waiting agent wakes it again instead of waiting its whole limit for
/// a server nobody wants.
#[test]
fn a_service_stopped_while_the_agent_waits_is_woken_again() {
    let _wd = watchdog("rewake_while_waiting", Duration::from_secs(120));
    let (control, events) = stand_in_control(|path, push| match path {
        "/wake" => {
            push("wake");
            r#"{"status":"starting","agent_public_ip_as_seen":"127.0.0.1","desired_count":1,"changed":true}"#
        }
        "/kill" => r#"{"status":"stopped","desired_count":0,"changed":false}"#,
        _ => r#"{"status":"stopped","desired_count":0}"#,
    });
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut agent = agent_against(control, dir.path());
    wait_events(&events, "wake", 2);
    assert!(agent.log().contains("waking it again"), "{}", agent.log());
    terminate(&mut agent);
}
