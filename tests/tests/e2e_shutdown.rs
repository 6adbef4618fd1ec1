//! A server told to stop (SIGTERM, as ECS and systemd do) drains: it stops taking
//! agents, tells `/healthz` callers it is going, refuses new streams with an answer the
//! client can act on, lets open streams finish, and exits once they have, or at its drain
//! deadline, ending the rest visibly. An agent told to stop does the same for its
//! clients. Real binaries, curl and sockets on 127.0.0.1.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use fluidity_tests::e2e::bin::binaries;
use fluidity_tests::e2e::client::{curl_status, KeptAlive, LiveStream};
use fluidity_tests::e2e::origin::{EchoOrigin, HttpOrigin, SilentOrigin};
use fluidity_tests::e2e::proc::{wait_for, Proc};
use fluidity_tests::e2e::tunnel::{plain_get, ALLOW_LOOPBACK};
use fluidity_tests::e2e::{watchdog, Agent, AgentOptions, PathRelay, ServerOptions, Tunnel};

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

/// A server with this drain deadline.
fn server_draining_for(secs: u64) -> ServerOptions {
    ServerOptions {
        config: Some(format!("drain_secs = {secs}\n")),
        ..ServerOptions::default()
    }
}

/// Waits until the server's `/healthz` says it is draining.
fn wait_draining(t: &Tunnel) {
    let health = t.server.health;
    wait_for(
        "/healthz to report draining",
        Duration::from_secs(30),
        || match plain_get(health, "/healthz") {
            Ok((503, body)) if body.contains("draining") => Some(()),
            _ => None,
        },
    );
}

/// Open streams finish after SIGTERM; new requests get an answer at once that says why
/// and to retry; the server exits cleanly as soon as the last stream has ended, long
/// before its drain deadline.
#[test]
fn sigterm_lets_open_streams_finish_refuses_new_ones_and_exits_when_drained() {
    let _wd = watchdog("sigterm_drains", Duration::from_secs(120));
    // A deadline far beyond the test's: an exit proves the drain ended, not the deadline.
    let mut t = Tunnel::with(server_draining_for(600));
    let echo = EchoOrigin::start();
    let origin = HttpOrigin::start("before-shutdown");
    let (status, _) = curl_status(&t.proxy_url(), &origin.url("/hello"));
    assert_eq!(status, 200, "the tunnel works before the shutdown");
    let mut live = LiveStream::open(t.proxy(), echo.addr());

    terminate(t.server.proc.pid());
    wait_draining(&t);
    live.assert_alive("the server began to drain");

    // The agent hears the server's goaway and reconnects, which the stopping server
    // refuses: 503 (the open met the goaway: the server is shutting down) or 502 (the
    // reconnection was refused: the tunnel is down), each with its one-line reason and
    // the advice to retry.
    let (status, body) = curl_status(&t.proxy_url(), &origin.url("/hello"));
    assert!(
        (status == 503 || status == 502)
            && body.trim_end().lines().count() == 1
            && body.contains("retry in a moment"),
        "a new request while the server drains: {status} {body}"
    );
    live.assert_alive("a request was refused");
    assert!(
        t.server.proc.exited().is_none(),
        "the server exited with a stream still open"
    );

    drop(live);
    let status = wait_for(
        "the drained server to exit",
        Duration::from_secs(60),
        || t.server.proc.exited(),
    );
    assert!(status.success(), "the drained server's exit: {status}");
    let log = t.server.proc.log();
    assert!(log.contains("draining"), "no drain in the log:\n{log}");
    assert!(log.contains("stopped"), "no clean stop in the log:\n{log}");
}

/// An agent whose TLS handshake was under way when SIGTERM came, and finishes after, is
/// told to go away as the tunnels already there were: it takes no streams on the
/// stopping server, and the server exits once the tunnels it had are drained, not at its
/// deadline.
#[test]
fn a_tunnel_whose_handshake_ends_during_the_drain_is_told_to_go_away() {
    let _wd = watchdog("late_handshake_drain", Duration::from_secs(150));
    // A deadline far beyond the test's: an exit proves the drain ended, not the deadline.
    let mut t = Tunnel::with(server_draining_for(600));
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    // A second agent's connection reaches the server, and its TLS hello waits.
    let path = PathRelay::start(t.server.listen);
    path.hold_new();
    let late = Agent::spawn(
        &t.certs,
        path.addr(),
        &AgentOptions::default(),
        t.dir.path(),
    );
    wait_for(
        "the second agent's connection to reach the server",
        Duration::from_secs(60),
        || (path.accepted() == 1).then_some(()),
    );
    terminate(t.server.proc.pid());
    wait_draining(&t);
    path.release();
    assert!(
        t.server.proc.wait_log(Duration::from_secs(60), |l| l
            .matches("tunnel connected")
            .count()
            == 2),
        "the second agent's tunnel did not connect:\n{}",
        t.server.proc.log()
    );
    live.assert_alive("a tunnel connected during the drain");
    // The stream the drain waits for ends: nothing else may hold the server.
    drop(live);
    let status = wait_for(
        "the drained server to exit",
        Duration::from_secs(60),
        || t.server.proc.exited(),
    );
    let log = t.server.proc.log();
    assert!(status.success(), "the server's exit: {status}\n{log}");
    assert!(!log.contains("drain deadline reached"), "{log}");
    assert!(
        log.contains("the server is draining: the new tunnel is told to go away"),
        "{log}"
    );
    drop(late);
}

/// A stream still open at the drain deadline is cut, and its client sees a reset: not a
/// clean end, not a hang. The server exits at the deadline.
#[test]
fn streams_open_at_the_drain_deadline_are_ended_and_the_server_exits() {
    let _wd = watchdog("drain_deadline", Duration::from_secs(120));
    // Long enough for the checks below on a loaded machine; the exit comes at its end.
    let mut t = Tunnel::with(server_draining_for(8));
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());

    terminate(t.server.proc.pid());
    wait_draining(&t);
    live.assert_alive("the server began to drain");
    let status = wait_for(
        "the server to exit at its drain deadline",
        Duration::from_secs(60),
        || t.server.proc.exited(),
    );
    assert!(
        status.success(),
        "the server's exit at the deadline: {status}"
    );
    let log = t.server.proc.log();
    assert!(
        log.contains("drain deadline reached") && log.contains("streams=1"),
        "the server says what it cut:\n{log}"
    );
    // The client's connection is reset: cut short, it must not look like a clean end
    // (the agent resets a client connection whose stream broke off), nor wait for ever.
    assert_reset(live);
    origin_reset(&echo);
    // The server's close reached the agent before the exit: it says the server stopped,
    // not that its connection was lost for no reason.
    let lost = wait_for(
        "the agent to lose the tunnel",
        Duration::from_secs(30),
        || {
            let log = t.agent.proc.log();
            log.lines()
                .find(|l| l.contains("tunnel lost"))
                .map(str::to_string)
        },
    );
    assert!(lost.contains("server stopped"), "{lost}");
}

/// Waits until `t`'s agent, stopping, refuses new clients.
fn wait_refusing(t: &Tunnel) {
    let proxy = t.proxy();
    wait_for(
        "the agent to refuse new clients",
        Duration::from_secs(30),
        || match std::net::TcpStream::connect(proxy) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
}

/// Checks that `live`'s connection was reset: a cut stream must not look like a clean
/// end, nor wait for ever.
fn assert_reset(live: LiveStream) {
    let mut sock = live.into_socket();
    let mut byte = [0u8; 1];
    match sock.read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the cut stream's client saw {other:?}, not a reset"),
    }
}

/// Waits until `echo`'s one connection has ended, and checks it ended in a reset: a
/// target whose upload the server cut must not take it for a complete one.
fn origin_reset(echo: &EchoOrigin) {
    let ended = wait_for(
        "the origin's connection to end",
        Duration::from_secs(30),
        || {
            let e = echo.ended();
            (e.closed + e.reset + e.other > 0).then_some(e)
        },
    );
    assert_eq!(
        (ended.reset, ended.closed),
        (1, 0),
        "the cut upload reached the origin as {ended:?}"
    );
}

/// A second signal during the drain stops the server at once (Ctrl-C pressed again), with
/// the exit status of an interrupted program, instead of waiting for the drain deadline.
#[test]
fn a_second_signal_during_the_drain_stops_the_server_at_once() {
    let _wd = watchdog("second_signal", Duration::from_secs(120));
    // A deadline far beyond the test's: an exit proves the second signal, not the deadline.
    let mut t = Tunnel::with(server_draining_for(600));
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());

    terminate(t.server.proc.pid());
    wait_draining(&t);
    live.assert_alive("the server began to drain");
    assert!(
        t.server.proc.exited().is_none(),
        "the drain waits for the stream"
    );

    terminate(t.server.proc.pid());
    let status = wait_for(
        "the server to stop at the second signal",
        Duration::from_secs(30),
        || t.server.proc.exited(),
    );
    assert_eq!(
        status.code(),
        Some(143),
        "128 + SIGTERM after a second SIGTERM"
    );
    assert!(t.server.proc.log().contains("second signal"));
    origin_reset(&echo);
}

/// A second signal stops the agent at once too, and the clients whose streams it cuts
/// get a reset, not a clean end (the exit would close their connections plainly).
#[test]
fn a_second_signal_to_the_agent_resets_the_clients_it_cuts() {
    let _wd = watchdog("agent_second_signal", Duration::from_secs(120));
    let mut t = Tunnel::start();
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    terminate(t.agent.proc.pid());
    wait_refusing(&t);
    live.assert_alive("the agent began to stop");
    terminate(t.agent.proc.pid());
    let status = wait_for("the agent to exit", Duration::from_secs(30), || {
        t.agent.proc.exited()
    });
    assert_eq!(
        status.code(),
        Some(143),
        "128 + SIGTERM after a second SIGTERM"
    );
    assert_reset(live);
}

/// Tells `t`'s server to drain, starts a replacement on its ports, and waits until the
/// agent's next tunnel goes to the replacement (a request to `origin` through it).
fn drain_and_replace(t: &Tunnel, origin: &HttpOrigin) -> Proc {
    terminate(t.server.proc.pid());
    wait_draining(t);
    let mut cmd = Command::new(&binaries().server);
    cmd.arg("--listen")
        .arg(t.server.listen.to_string())
        .arg("--health-listen")
        .arg(t.server.health.to_string())
        .arg("--cert")
        .arg(&t.certs.server_cert)
        .arg("--key")
        .arg(&t.certs.server_key)
        .arg("--client-ca")
        .arg(&t.certs.ca_cert)
        .arg("--egress")
        .arg(ALLOW_LOOPBACK);
    let mut replacement = Proc::spawn("fluidity-server-replacement", cmd, t.dir.path());
    assert!(
        replacement.wait_log(Duration::from_secs(30), |l| l
            .contains("the health port is in use")),
        "the replacement did not start:\n{}",
        replacement.log()
    );
    let body = wait_for(
        "a request through the replacement",
        Duration::from_secs(30),
        || match curl_status(&t.proxy_url(), &origin.url("/hello")) {
            (200, body) => Some(body),
            _ => None,
        },
    );
    assert_eq!(body, format!("hello from {}\n", origin.name()));
    replacement
}

/// A stream on a tunnel the agent replaced (its server went away with a goaway) gets the
/// same grace at the agent's stop as one on the current tunnel: it goes on and ends
/// cleanly within it, instead of being reset a second after the stop.
#[test]
fn a_stopping_agent_gives_streams_on_a_replaced_tunnel_their_grace() {
    let _wd = watchdog("stop_with_replaced_tunnel", Duration::from_secs(120));
    let mut t = Tunnel::with(server_draining_for(600));
    let echo = EchoOrigin::start();
    let origin = HttpOrigin::start("replacement");
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    let mut replacement = drain_and_replace(&t, &origin);

    terminate(t.agent.proc.pid());
    wait_refusing(&t);
    // A client that goes on working for a while (well within the 5 s grace, beyond the
    // 1 s the old tunnel's streams got), then ends its stream.
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        live.assert_alive(&format!("round {round} of the agent's grace"));
    }
    let mut sock = live.into_socket();
    sock.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    let end = sock.read_to_end(&mut rest);
    assert!(
        matches!(end, Ok(0)),
        "the stream's end: {end:?}\n{}",
        t.agent.proc.log()
    );
    let status = wait_for("the agent to exit", Duration::from_secs(60), || {
        t.agent.proc.exited()
    });
    assert!(status.success(), "the agent's exit: {status}");
    replacement.kill();
}

/// A restart: a replacement started on the same ports while the old server drains
/// serves tunnels at once (the old one no longer takes them), and its health endpoint as
/// soon as the old one has exited and let go of the port. Meanwhile the stream the old
/// server drains goes on.
#[test]
fn a_replacement_started_during_a_drain_serves_at_once_and_takes_the_health_port_after() {
    let _wd = watchdog("replacement_during_drain", Duration::from_secs(120));
    let mut t = Tunnel::with(server_draining_for(600));
    let echo = EchoOrigin::start();
    let origin = HttpOrigin::start("replacement");
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    let mut replacement = drain_and_replace(&t, &origin);
    live.assert_alive("the replacement took over new requests");

    drop(live);
    let status = wait_for("the old server to exit", Duration::from_secs(60), || {
        t.server.proc.exited()
    });
    assert!(status.success(), "the old server's exit: {status}");
    let health = t.server.health;
    wait_for(
        "the replacement's /healthz",
        Duration::from_secs(30),
        || matches!(plain_get(health, "/healthz"), Ok((200, _))).then_some(()),
    );
    assert!(
        replacement.log().contains("health endpoint listening"),
        "{}",
        replacement.log()
    );
    assert!(replacement.exited().is_none(), "the replacement exited");
    replacement.kill();
}

/// A health port held by anything but a draining fluidity-server is a conflict: the
/// server says so and exits, rather than run without health checks. A health port that
/// is the tunnel port is refused as a setting.
#[test]
fn a_health_port_held_by_something_else_stops_the_server_with_the_reason() {
    let _wd = watchdog("health_port_conflict", Duration::from_secs(120));
    let t = Tunnel::start();
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let held = held.local_addr().expect("its address");
    let tunnel_port = format!("127.0.0.1:{}", fluidity_tests::e2e::tunnel::free_port());
    for (health, says) in [
        (held.to_string(), format!("cannot listen on {held}")),
        (tunnel_port.clone(), "overlap".to_owned()),
    ] {
        let out = Command::new(&binaries().server)
            .args([
                "--listen",
                &tunnel_port,
                "--health-listen",
                &health,
                "--cert",
            ])
            .arg(&t.certs.server_cert)
            .arg("--key")
            .arg(&t.certs.server_key)
            .arg("--client-ca")
            .arg(&t.certs.ca_cert)
            .output()
            .expect("running the server");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&says),
            "{health}: {err}"
        );
    }
}

/// An agent told to stop refuses new clients at once, closes the kept-alive connections
/// that wait for a next request (as a server closes idle ones: the client sends it
/// elsewhere), lets open streams go on for its grace period, then resets the clients
/// whose streams it cut: a reset, never a clean end a client could take for the whole of
/// the data.
#[test]
fn an_agent_told_to_stop_refuses_new_clients_and_resets_the_ones_it_cuts() {
    let _wd = watchdog("agent_sigterm", Duration::from_secs(120));
    let mut t = Tunnel::start();
    let echo = EchoOrigin::start();
    let origin = HttpOrigin::start("kept");
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    let mut kept = KeptAlive::open(t.proxy());
    assert_eq!(
        kept.get(&origin.url("/hello")),
        (200, "hello from kept\n".to_owned())
    );

    terminate(t.agent.proc.pid());
    // Closed plainly, at once: before the grace period ends, and not with the reset the
    // connections still open at the agent's exit get.
    let seen = kept.closed_plainly();
    assert!(
        matches!(seen, Ok(true)),
        "the idle kept-alive client saw {seen:?}, not a close"
    );
    assert!(
        t.agent.proc.exited().is_none(),
        "closed by the agent's exit, not by its stopping"
    );
    wait_refusing(&t);
    // Still running: the open stream works while new clients are refused.
    live.assert_alive("the agent began to stop");

    let status = wait_for("the agent to exit", Duration::from_secs(60), || {
        t.agent.proc.exited()
    });
    assert!(status.success(), "the agent's exit: {status}");
    assert_reset(live);
}

/// A GET under way when the agent is told to stop, whose origin has it and has not
/// answered by the end of the grace period, is not answered as if it had never been sent:
/// the tunnel ending is a reason to send a GET again, but the stopping agent opens no
/// new stream for it, and the client hears why the first one failed.
#[test]
fn a_request_cut_by_the_agent_stopping_is_not_called_unsent() {
    let _wd = watchdog("agent_stop_in_flight", Duration::from_secs(120));
    let t = Tunnel::start();
    let silent = SilentOrigin::start();
    let (proxy, url) = (t.proxy_url(), silent.url("/slow"));
    let client = std::thread::spawn(move || curl_status(&proxy, &url));
    wait_for(
        "the request to reach its origin",
        Duration::from_secs(60),
        || (silent.accepted() == 1).then_some(()),
    );
    terminate(t.agent.proc.pid());
    let (status, body) = client.join().expect("the client thread");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("ended before") && !body.contains("no new requests"),
        "the cut request's answer: {body}"
    );
    assert_eq!(silent.accepted(), 1, "sent again through a stopping agent");
}

/// A stop that comes while the agent makes its first tunnel (a server slow to answer) is
/// heard at once and handled as any stop, not left to the signal's default action, which
/// killed the agent and reset the clients waiting for that tunnel.
#[test]
fn a_stop_during_the_first_tunnel_attempt_is_a_graceful_stop() {
    let _wd = watchdog("stop_during_first_attempt", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temporary folder");
    let certs = fluidity_tests::e2e::tunnel::certs_init(&dir.path().join("certs"));
    let server = fluidity_tests::e2e::Server::start(&certs, &ServerOptions::default(), dir.path());
    let path = PathRelay::start(server.listen);
    // The agent's TLS hello waits in the path: its first attempt lasts.
    path.hold_new();
    let opts = AgentOptions {
        name: "fluidity-first-attempt".into(),
        ..AgentOptions::default()
    };
    let mut agent = Agent::spawn(&certs, path.addr(), &opts, dir.path());
    wait_for(
        "the agent's attempt to reach the path",
        Duration::from_secs(30),
        || (path.accepted() >= 1).then_some(()),
    );
    let listen = agent.listen;
    wait_for("the proxy port", Duration::from_secs(30), || {
        std::net::TcpStream::connect(listen).ok()
    });
    terminate(agent.proc.pid());
    let status = wait_for("the agent to stop", Duration::from_secs(60), || {
        agent.proc.exited()
    });
    assert!(
        status.success(),
        "stopped by the signal's default action ({status}), not by the agent:\n{}",
        agent.proc.log()
    );
    path.release();
}
