//! Bad input and failures, each answered honestly and each leaving the tunnel working:
//! garbage and oversized heads at the proxy, strangers at the server's TLS port, targets
//! that cannot be reached or may not be, and the server dying mid-transfer.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fluidity_runtime_smol::pki::{self, CertPaths};
use fluidity_runtime_smol::tls::{certs_from_pem, key_from_pem};
use fluidity_tests::e2e::bin::binaries;
use fluidity_tests::e2e::client::{
    connect_via, curl_status, read_all_lossy, ws_crash_client, KeptAlive, LiveStream, WsVia,
};
use fluidity_tests::e2e::origin::{
    refused_port, AbruptOrigin, BlackHole, DeafOrigin, EchoOrigin, FloodOrigin, HttpOrigin,
    SilentOrigin, TlsOrigin,
};
use fluidity_tests::e2e::proc::{wait_for, Proc};
use fluidity_tests::e2e::tunnel::{certs_init, ALLOW_LOOPBACK};
use fluidity_tests::e2e::{
    watchdog, Agent, AgentOptions, PathRelay, Server, ServerOptions, Tunnel,
};

const MIB: u64 = 1024 * 1024;

/// A GET through the tunnel still works.
fn assert_tunnel_works(t: &Tunnel, origin: &HttpOrigin, after: &str) {
    let (status, body) = curl_status(&t.proxy_url(), &origin.url("/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, format!("hello from {}\n", origin.name()).as_str()),
        "the tunnel should still work after {after}"
    );
}

/// Sends `bytes` to the proxy (from a separate thread, so that a proxy that answers
/// early is not blocked by our write) and returns what it answered.
fn send_raw(proxy: SocketAddr, bytes: Vec<u8>) -> String {
    let s = TcpStream::connect(proxy).expect("connecting to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        // The proxy may close before taking everything; that is its right.
        let _ = w.write_all(&bytes);
    });
    let mut r = s;
    let answer = read_all_lossy(&mut r);
    let _ = writer.join();
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn garbage_a_huge_head_and_a_huge_request_line_get_400_431_and_414() {
    let _wd = watchdog("garbage_and_huge_head", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("after-garbage");
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());

    let garbage =
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xde\xad\xbe\xef garbage\x00\xff\r\n\r\n";
    let answer = send_raw(t.proxy(), garbage.to_vec());
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("http://"),
        "garbage that looks like TLS should get 400 with the hint, got {answer:?}"
    );
    let answer = send_raw(t.proxy(), b"\x00\xff\x7f garbage\r\n\r\n".to_vec());
    assert!(
        answer.starts_with("HTTP/1.1 400 "),
        "garbage should get 400, got {answer:?}"
    );
    assert_tunnel_works(&t, &origin, "garbage");

    let mut huge = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nX-Filler: ",
        origin.url("/hello"),
        origin.addr()
    )
    .into_bytes();
    huge.resize(huge.len() + MIB as usize, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = send_raw(t.proxy(), huge);
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "a 1 MiB request head should get 431, got {answer:?}"
    );
    assert_eq!(
        origin.connections(),
        1,
        "only the check request reached the origin"
    );
    assert_tunnel_works(&t, &origin, "a 1 MiB head");

    // A request line that alone exceeds the head limit (64 KiB) by a little, so that its
    // end is among what the proxy read: the target is what is too long.
    let mut long_url = format!("GET {}?q=", origin.url("/hello")).into_bytes();
    long_url.resize(64 * 1024 + 100, b'a');
    long_url.extend_from_slice(format!(" HTTP/1.1\r\nHost: {}\r\n\r\n", origin.addr()).as_bytes());
    let answer = send_raw(t.proxy(), long_url);
    assert!(
        answer.starts_with("HTTP/1.1 414 "),
        "a request line over 64 KiB should get 414, got {answer:?}"
    );
    assert_tunnel_works(&t, &origin, "a request line over 64 KiB");
    live.assert_alive("garbage, a 1 MiB head and a long request line");
}

/// Connects to the server's tunnel port with a TLS client that trusts the server's CA and
/// presents `client` (or nothing), and returns what the server did: `Ok(bytes)` with
/// what it sent after the handshake, or the error that ended the connection. The client is
/// rustls on aws-lc-rs offering X25519MLKEM768 first: another implementation of the key
/// exchange the server prefers.
fn stranger(
    server: SocketAddr,
    ca: &Path,
    client: Option<&pki::CertifiedKeyPem>,
) -> Result<Vec<u8>, String> {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read_to_string(ca).expect("reading the CA");
    for c in certs_from_pem(&ca_pem, "ca").expect("CA certificate") {
        roots.add(c).expect("adding the CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let config = match client {
        Some(k) => builder
            .with_client_auth_cert(
                certs_from_pem(&k.cert_pem, "client").expect("client chain"),
                key_from_pem(&k.key_pem, "client key").expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let sock = TcpStream::connect(server).expect("connecting to the server");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // A client speaks first in the tunnel protocol; send something that looks like it.
    tls.write_all(&[0u8; 12]).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(format!(
                    "no answer within the read timeout after {} bytes",
                    got.len()
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn clients_without_a_valid_certificate_are_turned_away() {
    let _wd = watchdog("tls_strangers", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("after-strangers");
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    let failures_before = t.server.metric("fluidity_auth_failures_total");

    let no_cert = stranger(t.server.listen, &t.certs.ca_cert, None);
    let day = Duration::from_secs(24 * 3600);
    let other_ca = pki::generate_ca("some other CA", day).expect("CA");
    let other = pki::issue_client(
        &other_ca,
        "fluidity-agent",
        &["127.0.0.1".parse().unwrap()],
        day,
    )
    .expect("client certificate");
    let wrong_ca = stranger(t.server.listen, &t.certs.ca_cert, Some(&other));
    eprintln!("no certificate: {no_cert:?}; another CA: {wrong_ca:?}");
    for (who, result) in [
        ("no certificate", &no_cert),
        ("another CA's certificate", &wrong_ca),
    ] {
        match result {
            Err(e) => assert!(
                !e.contains("no answer within"),
                "a client with {who}: the server neither refused nor served it: {e}"
            ),
            Ok(bytes) => assert!(
                bytes.is_empty(),
                "a client with {who} got {} bytes of tunnel traffic",
                bytes.len()
            ),
        }
    }
    // Both refusals are counted (the wait fails the test otherwise).
    wait_for(
        "the refusals to be counted",
        Duration::from_secs(20),
        || {
            let n = t.server.metric("fluidity_auth_failures_total");
            (n >= failures_before + 2.0).then_some(())
        },
    );
    // The log says what to check for the certificate from another CA.
    let log = t.server.proc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains("client_ca")),
        "no advice for the other CA's certificate:\n{log}"
    );
    assert_eq!(
        t.server.metric("fluidity_tunnels_total"),
        1.0,
        "no tunnel for a stranger"
    );
    assert_tunnel_works(&t, &origin, "strangers at the TLS port");
    live.assert_alive("strangers at the TLS port");
}

/// Starts an agent against `t`'s server presenting `identity` (written to a folder
/// `name` of its own, the agent named `fluidity-NAME`); returns it and the certificate's
/// file.
fn agent_presenting(
    t: &Tunnel,
    identity: &pki::CertifiedKeyPem,
    name: &str,
) -> (fluidity_tests::e2e::Agent, std::path::PathBuf) {
    let dir = t.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("a folder for the certificate");
    let mut certs = t.certs.clone();
    certs.client_cert = dir.join("client.pem");
    certs.client_key = dir.join("client-key.pem");
    std::fs::write(&certs.client_cert, &identity.cert_pem).expect("writing the certificate");
    std::fs::write(&certs.client_key, &identity.key_pem).expect("writing the key");
    let opts = fluidity_tests::e2e::AgentOptions {
        name: format!("fluidity-{name}"),
        ..Default::default()
    };
    let agent = fluidity_tests::e2e::Agent::spawn(&certs, t.server.listen, &opts, t.dir.path());
    (agent, certs.client_cert)
}

/// An agent whose certificate the server refuses (issued by another CA) says so, in its
/// log and in the answer its clients get, with what to check; not just that the
/// connection closed.
#[test]
fn an_agent_whose_certificate_is_refused_is_told_what_to_check() {
    let _wd = watchdog("agent_certificate_refused", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("unreachable");
    let day = Duration::from_secs(24 * 3600);
    let other_ca = pki::generate_ca("some other CA", day).expect("CA");
    let other = pki::issue_client(&other_ca, "fluidity-agent", &[], day).expect("certificate");
    let (mut agent, _) = agent_presenting(&t, &other, "other-ca");
    let said = "refused this agent's certificate";
    assert!(
        agent
            .proc
            .wait_log(Duration::from_secs(30), |l| l.contains(said)),
        "the agent did not say why:\n{}",
        agent.proc.log()
    );
    let listen = agent.listen;
    wait_for("the agent's proxy port", Duration::from_secs(30), || {
        TcpStream::connect(listen).ok()
    });
    let (status, body) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
    assert!(
        status == 502 && body.contains(said) && body.contains("client_ca"),
        "{status} {body}"
    );
    // The refusal is one warning per attempt, not also a tunnel "lost" that never was up.
    let log = agent.proc.log();
    let attempts = log.matches("cannot reach the server").count();
    assert!(
        attempts >= 1 && !log.contains("tunnel lost"),
        "{attempts} attempts:\n{log}"
    );
}

/// An agent whose certificate is not valid yet (a clock behind, a certificate made on a
/// machine whose clock is ahead) is refused by the server with the alert TLS has for an
/// expired one; the agent tells its clients which it is and what to check, not "expired".
#[test]
fn an_agent_whose_certificate_is_not_valid_yet_says_so_not_expired() {
    let _wd = watchdog("agent_certificate_not_yet_valid", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("unreachable");
    let ca = pki::CaBundle::load(&t.certs.ca_cert, &t.certs.ca_key).expect("the tunnel's CA");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        ca.cert_pem(),
        rcgen::KeyPair::from_pem(ca.key_pem()).expect("the CA's key"),
    )
    .expect("an issuer");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("parameters");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fluidity-agent");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2099, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, &issuer).expect("a certificate");
    let early = pki::CertifiedKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    let (agent, _) = agent_presenting(&t, &early, "not-yet-valid");
    let listen = agent.listen;
    wait_for("the agent's proxy port", Duration::from_secs(30), || {
        TcpStream::connect(listen).ok()
    });
    let (status, body) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
    assert!(
        status == 502
            && body.contains("refused this agent's certificate")
            && body.contains("is not valid until")
            && body.contains("clock")
            && !body.contains("client_ca"),
        "{status} {body}\n{}",
        agent.proc.log()
    );
}

/// An agent whose own certificate expires within two weeks says so at start, naming the
/// file and what to do, and still works until then.
#[test]
fn an_agent_whose_certificate_expires_soon_warns_at_start_and_works() {
    let _wd = watchdog("agent_certificate_expiring", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("expiring");
    let ca = pki::CaBundle::load(&t.certs.ca_cert, &t.certs.ca_key).expect("the tunnel's CA");
    let three_days = Duration::from_secs(3 * 24 * 3600);
    let short = pki::issue_client(&ca, "fluidity-agent", &[], three_days).expect("certificate");
    let (mut agent, cert_file) = agent_presenting(&t, &short, "expiring");
    let file = cert_file.display().to_string();
    assert!(
        agent.proc.wait_log(Duration::from_secs(30), |l| {
            l.contains(&file)
                && l.contains("expires on")
                && l.contains("certs init --dir DIR --force")
        }),
        "the agent did not warn of its certificate's end:\n{}",
        agent.proc.log()
    );
    let listen = agent.listen;
    wait_for("the agent's proxy port", Duration::from_secs(30), || {
        TcpStream::connect(listen).ok()
    });
    let (status, body) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from expiring\n"));
}

/// The server's name is looked up at every connection attempt, not once at start: an
/// agent whose server name does not resolve keeps running and tells its clients why;
/// one given a name reaches the server through it; one pointed at something that does
/// not speak TLS (the server's health port) is told to check the setting.
#[test]
fn a_server_name_is_looked_up_when_connecting_and_a_server_setting_that_cannot_work_is_reported() {
    let _wd = watchdog("server_name_lookup", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("by-name");
    let port = t.server.listen.port();
    for (name, server, works) in [
        (
            "fluidity-no-such-name",
            format!("no-such-server.invalid:{port}"),
            false,
        ),
        ("fluidity-by-name", format!("localhost:{port}"), true),
        // Not a fluidity-server at all: the server's own health port.
        ("fluidity-health-port", t.server.health.to_string(), false),
    ] {
        let opts = fluidity_tests::e2e::AgentOptions {
            name: name.into(),
            server_arg: Some(server.clone()),
            ..Default::default()
        };
        let mut agent =
            fluidity_tests::e2e::Agent::spawn(&t.certs, t.server.listen, &opts, t.dir.path());
        let listen = agent.listen;
        wait_for("the agent's proxy port", Duration::from_secs(30), || {
            TcpStream::connect(listen).ok()
        });
        let (status, body) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
        if works {
            assert_eq!(
                (status, body.as_str()),
                (200, "hello from by-name\n"),
                "{server}"
            );
        } else {
            let says = if name == "fluidity-health-port" {
                "does not speak TLS"
            } else {
                "cannot look up the server name"
            };
            assert!(
                status == 502 && body.contains(says),
                "{server}: {status} {body}"
            );
            assert!(
                agent.proc.exited().is_none(),
                "the agent exited:\n{}",
                agent.proc.log()
            );
        }
    }
}

/// An agent that trusts another CA than the one that issued the server's certificate
/// says so, names the file it trusts, and what to point its `ca` setting at.
#[test]
fn an_agent_trusting_another_ca_is_told_what_to_check() {
    let _wd = watchdog("agent_trusts_another_ca", Duration::from_secs(120));
    let t = Tunnel::start();
    let day = Duration::from_secs(24 * 3600);
    let other_ca = pki::generate_ca("some other CA", day).expect("CA");
    let dir = t.dir.path().join("other-trust");
    std::fs::create_dir_all(&dir).expect("a folder for the CA");
    let mut certs = t.certs.clone();
    certs.ca_cert = dir.join("ca.pem");
    std::fs::write(&certs.ca_cert, other_ca.cert_pem()).expect("writing the CA");
    let opts = fluidity_tests::e2e::AgentOptions {
        name: "fluidity-other-trust".into(),
        ..Default::default()
    };
    let mut agent = fluidity_tests::e2e::Agent::spawn(&certs, t.server.listen, &opts, t.dir.path());
    let trusted = certs.ca_cert.display().to_string();
    assert!(
        agent.proc.wait_log(Duration::from_secs(30), |l| {
            l.contains("not issued by the CA this agent trusts")
                && l.contains(&format!("from {trusted}"))
        }),
        "the agent did not say what to check:\n{}",
        agent.proc.log()
    );
}

#[test]
fn unreachable_targets_get_502_and_504() {
    let _wd = watchdog("unreachable_targets", Duration::from_secs(180));
    // A short dial timeout, so that the black hole answers 504 soon.
    let t = Tunnel::with(ServerOptions {
        config: Some("connect_timeout_secs = 2\n".into()),
        ..ServerOptions::default()
    });
    let origin = HttpOrigin::start("after-unreachable");
    let echo = EchoOrigin::start();
    let mut live = LiveStream::open(t.proxy(), echo.addr());
    let proxy = t.proxy_url();

    let (status, body) = curl_status(&proxy, "http://nonexistent.invalid/");
    assert_eq!(status, 502, "unresolvable name: {body}");
    assert_tunnel_works(&t, &origin, "an unresolvable name");

    let port = refused_port();
    let (status, body) = curl_status(&proxy, &format!("http://127.0.0.1:{port}/"));
    assert_eq!(status, 502, "refused port: {body}");
    // Said once: the target by the agent, the reason without its echo in the detail.
    assert_eq!(
        body.trim_end(),
        format!(
            "fluidity: cannot reach 127.0.0.1:{port}: connection refused; is the service \
             running on that port?"
        )
    );
    assert_tunnel_works(&t, &origin, "a refused port");
    // The answer to a HEAD is its head alone, and the connection goes on: a body would be
    // read as the start of the next answer.
    let head_then_get = format!(
        "HEAD http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n\
         GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.url("/hello"),
        origin.addr()
    );
    let answers = send_raw(t.proxy(), head_then_get.into_bytes());
    let (first, rest) = answers
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head: {answers:?}"));
    assert!(
        first.starts_with("HTTP/1.1 502 ") && !first.contains("Content-Length: 0"),
        "{first}"
    );
    assert!(
        rest.starts_with("HTTP/1.1 200 ") && rest.ends_with("hello from after-unreachable\n"),
        "after the HEAD's 502: {rest:?}"
    );

    let hole = BlackHole::start();
    let (status, body) = curl_status(&proxy, &format!("http://{}/", hole.addr()));
    assert_eq!(status, 504, "a port that never answers: {body}");
    assert_tunnel_works(&t, &origin, "a port that never answers");

    // The same through CONNECT.
    let out = fluidity_tests::e2e::curl([
        "-x",
        &proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "https://nonexistent.invalid/",
    ]);
    assert_eq!(
        out.text(),
        "502",
        "CONNECT to an unresolvable name: {}",
        out.stderr
    );
    assert_tunnel_works(&t, &origin, "a CONNECT to an unresolvable name");
    live.assert_alive("unreachable targets");
}

/// A name whose first address never answers is reached through its next one without
/// waiting for the first (RFC 8305). The server's hosts file gives `twofold.test` [::1], a
/// black hole, before 127.0.0.1, the origin; its connect timeout is longer than the dial's
/// 30 s deadline, so a dial that waited for the first address would never try the second.
/// Needs `unshare` with user namespaces (for the hosts file), `::1` on the loopback
/// interface, and the resolver's usual order (RFC 6724: `::1` before `127.0.0.1`).
#[test]
fn a_name_whose_first_address_never_answers_is_reached_through_the_next() {
    let _wd = watchdog("happy_eyeballs", Duration::from_secs(120));
    let origin = HttpOrigin::start("the second address");
    let port = origin.addr().port();
    let _hole = BlackHole::on(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    let t = Tunnel::with(ServerOptions {
        config: Some("connect_timeout_secs = 600\n".into()),
        egress: vec![ALLOW_LOOPBACK.into(), "allow_cidrs=::1/128".into()],
        hosts: Some("127.0.0.1 localhost\n::1 twofold.test\n127.0.0.1 twofold.test\n".into()),
        log: Some("info,fluidity_server=debug".into()),
        ..ServerOptions::default()
    });
    let (status, body) = curl_status(&t.proxy_url(), &format!("http://twofold.test:{port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from the second address\n"),
        "{}",
        t.server.proc.log()
    );
    // The black hole was tried, and first: the answer came by the race, not by order.
    let log = t.server.proc.log();
    let attempt = |addr: &str| {
        log.find(&format!(
            "connecting target=twofold.test:{port} addr={addr}:{port}"
        ))
    };
    let (hole_at, origin_at) = (attempt("[::1]"), attempt("127.0.0.1"));
    assert!(
        matches!((hole_at, origin_at), (Some(h), Some(o)) if h < o),
        "the server should have tried [::1] first, then 127.0.0.1:\n{log}"
    );
}

/// An agent for the server `server` whose hosts file gives `twofold.test` [::1] (where
/// the test puts something at the server's port that is not the server) before 127.0.0.1,
/// the server; `args` and `log` as [`AgentOptions`] take them.
fn twofold_agent(
    certs: &CertPaths,
    server: &Server,
    args: &[String],
    log: Option<&str>,
    dir: &Path,
) -> Agent {
    let mut all = vec!["--server-name".to_string(), "localhost".to_string()];
    all.extend_from_slice(args);
    Agent::start_with(
        certs,
        server.listen,
        &AgentOptions {
            server_arg: Some(format!("twofold.test:{}", server.listen.port())),
            hosts: Some("127.0.0.1 localhost\n::1 twofold.test\n127.0.0.1 twofold.test\n".into()),
            args: all,
            log: log.map(str::to_string),
            ..AgentOptions::default()
        },
        dir,
    )
}

/// Fetches a page through `agent` and checks the tunnel came through 127.0.0.1 at the
/// server's `port` (the second address of `twofold.test`); returns the agent's log.
fn fetch_through_the_second_address(agent: &Agent, port: u16) -> String {
    let origin = HttpOrigin::start("behind the second address");
    let (status, body) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from behind the second address\n")
    );
    let log = agent.proc.log();
    assert!(
        log.contains(&format!("tunnel ready server=127.0.0.1:{port}")),
        "the tunnel should have come through 127.0.0.1:\n{log}"
    );
    log
}

/// A server name whose first address takes TCP connections and answers no TLS (a
/// middlebox that swallows TLS, a process that stopped reading) is reached through its
/// next address while that handshake still hangs. The agent's hosts file gives
/// `twofold.test` [::1], a listener never accepted from (the kernel completes the TCP
/// handshake; nothing answers the TLS hello), before 127.0.0.1, the server. The agent's
/// connect timeout, which bounds each TLS handshake too, is longer than the test waits, so
/// an agent that waited for the first handshake would never try the second. Needs what
/// the test above needs.
#[test]
fn a_server_address_that_answers_no_tls_is_passed_over_for_the_next() {
    let _wd = watchdog("tls_fallback", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = certs_init(dir.path());
    let server = Server::start(&certs, &ServerOptions::default(), dir.path());
    let port = server.listen.port();
    let swallower = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port))
        .expect("a listener on [::1] at the server's port");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "connect_timeout_secs = 600\n").expect("agent config");
    let agent = twofold_agent(
        &certs,
        &server,
        &["--config".into(), config.display().to_string()],
        Some("info,fluidity_agent=debug"),
        dir.path(),
    );
    let log = fetch_through_the_second_address(&agent, port);
    // The swallowing address was tried first and got a TCP connection: the tunnel came
    // through the fallback, not by order or by a refused connection.
    assert!(
        log.contains(
            "the TLS handshake with the server is slow; trying its next address beside it"
        ),
        "the agent should have tried the next address beside a hanging handshake:\n{log}"
    );
    drop(swallower);
}

/// A server name whose first address completes TLS and then breaks the tunnel handshake
/// (another service with a certificate from the same CA, a server that cannot speak this
/// protocol) is passed over for its next address. The agent's hosts file gives
/// `twofold.test` [::1], where a TLS endpoint with the server's own certificate answers
/// the agent's hello with bytes that are no tunnel frame, before 127.0.0.1, the server.
#[test]
fn a_server_address_that_breaks_the_tunnel_handshake_is_passed_over_for_the_next() {
    use fluidity_runtime_smol::tls::{server_config, CaRoots, Identity, PeerCheck};
    let _wd = watchdog("handshake_fallback", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = certs_init(dir.path());
    let server = Server::start(&certs, &ServerOptions::default(), dir.path());
    let port = server.listen.port();
    let listener = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port))
        .expect("a listener on [::1] at the server's port");
    let config = server_config(
        &Identity::load(&certs.server_cert, &certs.server_key).expect("the server's identity"),
        &CaRoots::load(&certs.ca_cert).expect("the CA"),
        &PeerCheck::default(),
    )
    .expect("a TLS configuration");
    // It breaks every attempt, for as long as the test runs: an agent that kept to the
    // first address would never get through.
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&served);
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let conn = rustls::ServerConnection::new(Arc::clone(&config)).expect("a TLS session");
            let mut tls = rustls::StreamOwned::new(conn, sock);
            // The handshake completes with the first write; what follows is no tunnel frame.
            if tls.write_all(&[0xff; 64]).is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    let agent = twofold_agent(&certs, &server, &[], None, dir.path());
    let log = fetch_through_the_second_address(&agent, port);
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the agent should have tried [::1] first and completed TLS there"
    );
    assert!(
        log.contains("the tunnel handshake failed; trying the server's next address"),
        "the agent should have gone on to the next address:\n{log}"
    );
}

#[test]
fn a_private_address_is_refused_under_the_default_policy() {
    let _wd = watchdog("default_policy", Duration::from_secs(120));
    let t = Tunnel::with(ServerOptions::default_policy());
    let origin = HttpOrigin::start("private");
    let (status, body) = curl_status(&t.proxy_url(), &origin.url("/hello"));
    assert_eq!(status, 403, "loopback must be refused by default: {body}");
    let (status, body) = curl_status(&t.proxy_url(), "http://10.1.2.3/");
    assert_eq!(status, 403, "a private address must be refused by default");
    assert_eq!(
        body.trim_end(),
        "fluidity: cannot reach 10.1.2.3:80: denied by the server's egress policy: address \
         10.1.2.3 is in the private range 10.0.0.0/8; if it should be allowed, the server's \
         egress settings (allow_cidrs, allow_hosts, allow_ports) can allow it"
    );
    assert_eq!(origin.connections(), 0, "nothing reached the origin");
    assert_eq!(
        t.server.metric("fluidity_tunnels_active"),
        1.0,
        "the tunnel stays up"
    );
}

/// Starts curl in the background, writing the body to `out`.
fn background_curl(name: &str, args: &[&str], out: &Path, log_dir: &Path) -> Proc {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--no-buffer", "--max-time", "120", "-o"])
        .arg(out)
        .args(args);
    Proc::spawn(name, cmd, log_dir)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn killing_the_server_mid_transfer_fails_transfers_then_the_agent_reconnects() {
    let _wd = watchdog("server_killed", Duration::from_secs(180));
    let mut t = Tunnel::start();
    let origin = HttpOrigin::start("hangs");
    let tls = TlsOrigin::start("hangs-tls", t.dir.path());
    let sent = 4 * MIB;
    let total = 1024 * MIB;
    let proxy = t.proxy_url();
    let plain_out = t.path("plain.part");
    let tls_out = t.path("tls.part");
    let mut plain = background_curl(
        "curl-plain",
        &["-x", &proxy, &origin.url(&format!("/hang/{sent}/{total}"))],
        &plain_out,
        t.dir.path(),
    );
    let tls_url = format!(
        "https://127.0.0.1:{}/hang/{sent}/{total}",
        tls.addr().port()
    );
    let mut https = background_curl(
        "curl-connect",
        &[
            "-x",
            &proxy,
            "--cacert",
            tls.ca_file().to_str().unwrap(),
            &tls_url,
        ],
        &tls_out,
        t.dir.path(),
    );
    // A third request waits for an answer that never comes: a POST, which is not sent
    // again through a new tunnel as a GET would be.
    let silent = SilentOrigin::start();
    let waiting_out = t.path("waiting.body");
    let mut waiting = background_curl(
        "curl-waiting",
        &["-x", &proxy, "-d", "x", &silent.url("/never")],
        &waiting_out,
        t.dir.path(),
    );
    // Both transfers are under way (curl may hold back a buffer's worth of what it
    // received, so half of what the origins send is the sign), and the request has reached
    // its origin.
    wait_for("both transfers to start", Duration::from_secs(60), || {
        (file_len(&plain_out) >= sent / 2
            && file_len(&tls_out) >= sent / 2
            && silent.accepted() == 1)
            .then_some(())
    });

    t.server.proc.kill();

    // The waiting request is told the tunnel ended, not that its origin hung up.
    wait_for(
        "the waiting request to end",
        Duration::from_secs(100),
        || waiting.exited(),
    );
    let body = std::fs::read_to_string(&waiting_out).unwrap_or_default();
    assert!(
        body.contains("the tunnel to the server ended before") && !body.contains("closed the"),
        "the waiting request's answer: {body:?}"
    );

    for c in [&mut plain, &mut https] {
        let status = wait_for("curl to give up", Duration::from_secs(100), || c.exited());
        let code = status.code();
        assert!(
            code.is_some_and(|c| c != 0 && c != 28),
            "{}: a transfer cut by the server's death must fail at once, not succeed or \
             hang until the timeout; exit {status}: {}",
            c.name(),
            c.log()
        );
    }
    assert!(file_len(&plain_out) < total && file_len(&tls_out) < total);
    assert!(
        t.agent.proc.exited().is_none(),
        "the agent survives its server"
    );

    // With no server, a new request gets an error status, not a hang.
    let (status, _) = curl_status(&proxy, &origin.url("/hello"));
    assert!(
        (500..600).contains(&status),
        "a request with the server gone should get a 5xx, got {status}"
    );

    // A server back at the same address: the agent reconnects on its own.
    std::fs::create_dir_all(t.path("second-server")).expect("log folder");
    let back = Server::start(
        &t.certs,
        &ServerOptions {
            listen: Some(t.server.listen),
            ..ServerOptions::default()
        },
        &t.path("second-server"),
    );
    let (status, body) = wait_for("the agent to reconnect", Duration::from_secs(90), || {
        let (status, body) = curl_status(&proxy, &origin.url("/hello"));
        (status == 200).then_some((status, body))
    });
    assert_eq!((status, body.as_str()), (200, "hello from hangs\n"));
    assert_eq!(back.metric("fluidity_tunnels_total"), 1.0);
}

/// A path to the server that dies without a word (a laptop that changed networks): the
/// tunnel's probe finds it within seconds of the next request, which goes through a new
/// tunnel; a GET under way when it died goes again through the new tunnel as soon as the
/// probe has found the old one dead, not when the idle timeout ends it.
#[test]
fn a_path_that_dies_silently_is_found_by_the_probe_and_a_get_goes_through_a_new_tunnel() {
    let _wd = watchdog("silent_path", Duration::from_secs(180));
    let dir = tempfile::tempdir().expect("temporary folder");
    let certs = certs_init(&dir.path().join("certs"));
    let server = Server::start(&certs, &ServerOptions::default(), dir.path());
    let path = PathRelay::start(server.listen);
    let mut agent = Agent::start_with(
        &certs,
        path.addr(),
        &AgentOptions {
            log: Some("info,fluidity_agent::proxy=debug".into()),
            ..AgentOptions::default()
        },
        dir.path(),
    );
    let origin = HttpOrigin::start("after-the-cut");
    let proxy = agent.proxy_url();
    assert_eq!(curl_status(&proxy, &origin.url("/hello")).0, 200);
    assert_eq!(path.accepted(), 1);
    // A client keeps its connection, and so its stream to the origin, between requests.
    let mut kept = KeptAlive::open(agent.listen);
    assert_eq!(kept.get(&origin.url("/hello")).0, 200);
    // A request is under way when the path dies: its origin has it and has not answered
    // (it answers the request's second coming).
    let slow = SilentOrigin::answering_from(1);
    let in_flight_out = dir.path().join("in-flight.body");
    let mut in_flight = background_curl(
        "curl-in-flight",
        &["-x", &proxy, &slow.url("/slow")],
        &in_flight_out,
        dir.path(),
    );
    wait_for(
        "the request to reach its origin",
        Duration::from_secs(60),
        || (slow.accepted() == 1).then_some(()),
    );

    // The network under the tunnel dies without a word (a laptop's Wi-Fi changed), and a
    // moment passes before the next request: the tunnel has heard nothing since.
    path.cut_silently();
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = curl_status(&proxy, &origin.url("/hello"));

    // The tunnel's probe found the dead path (before its idle timeout) and the new request
    // went through a new tunnel; the one under way did too (a GET, safe to send again).
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from after-the-cut\n"),
        "{}",
        agent.proc.log()
    );
    assert_eq!(path.accepted(), 2);
    // The kept client's next request, a POST (never sent twice), takes a new stream
    // through the new tunnel: the kept stream was let go when its tunnel stopped taking
    // streams (and would be found unusable if it had not been).
    let (status, sum) = kept.post(&origin.url("/sha256"), b"kept");
    assert_eq!(
        (status, sum.as_str()),
        (
            200,
            fluidity_tests::e2e::client::sha256_hex(b"kept").as_str()
        ),
        "{}",
        agent.proc.log()
    );
    let exit = wait_for(
        "the request under way to end",
        Duration::from_secs(60),
        || in_flight.exited(),
    );
    let answer = std::fs::read_to_string(&in_flight_out).unwrap_or_default();
    assert!(
        exit.success() && answer == "answered",
        "the request under way: exit {exit}, body {answer:?}\n{}",
        agent.proc.log()
    );
    assert_eq!(slow.accepted(), 2);
    let log = agent.proc.log();
    assert!(
        log.contains("answered nothing"),
        "the agent should say the server stopped answering:\n{log}"
    );
    // Sent again because the probe found the server gone, not because the idle timeout
    // ended the tunnel later ("tunnel lost").
    let again: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sending the request again"))
        .collect();
    assert!(
        again.len() == 1 && again[0].contains("stopped answering"),
        "the request under way should have gone again when the probe found the server \
         gone:\n{log}"
    );
    assert!(agent.proc.exited().is_none());
}

/// A path that dies towards the server only, right after the server was heard: its
/// pings keep arriving, so the agent's idle timeout does not end the tunnel, and nothing
/// the agent sends says the path is dead. The next request's open, unanswered a second
/// later, starts the probe, and the request goes through a new tunnel within seconds,
/// not when the server's idle timeout (15 s) ends the old one (the log tells which).
#[test]
fn a_path_dead_towards_the_server_only_is_found_while_a_request_waits() {
    let _wd = watchdog("one_way_path", Duration::from_secs(180));
    let dir = tempfile::tempdir().expect("temporary folder");
    let certs = certs_init(&dir.path().join("certs"));
    let server = Server::start(&certs, &ServerOptions::default(), dir.path());
    let path = PathRelay::start(server.listen);
    let agent = Agent::start(&certs, path.addr(), dir.path());
    let origin = HttpOrigin::start("after-the-one-way-cut");
    let proxy = agent.proxy_url();
    assert_eq!(curl_status(&proxy, &origin.url("/hello")).0, 200);
    // The answer was just heard; from now on what the agent sends is lost.
    path.cut_towards_server();
    let (status, body) = curl_status(&proxy, &origin.url("/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from after-the-one-way-cut\n"),
        "{}",
        agent.proc.log()
    );
    assert_eq!(path.accepted(), 2, "a new tunnel carried it");
    let log = agent.proc.log();
    assert!(
        log.contains("answered nothing"),
        "the probe should have found the server gone:\n{log}"
    );
}

/// An origin that crashes mid-response (a body delimited by the connection's end, cut
/// by a TCP reset) fails the client through the proxy as it fails it directly: the same
/// curl exit code, a receive error, through absolute-form HTTP, CONNECT and SOCKS5; never
/// a success with a silently shortened body. The agent resets the client's connection
/// when what it carried broke off. The tunnel keeps working.
#[test]
fn an_origin_reset_mid_response_fails_the_client_as_it_would_directly() {
    let _wd = watchdog("origin_reset_mid_response", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = AbruptOrigin::start();
    let other = HttpOrigin::start("after-crash");
    let (proxy, socks) = (t.proxy_url(), t.proxy().to_string());
    let url = origin.url("/crash/100000");
    let direct = fluidity_tests::e2e::curl(["-o", "/dev/null", &url]);
    assert!(
        direct.code.is_some_and(|c| c != 0),
        "directly, curl should fail: {direct:?}"
    );
    let ways: [&[&str]; 3] = [
        &["-x", &proxy],
        &["-p", "-x", &proxy],
        &["--socks5-hostname", &socks],
    ];
    for via in ways {
        let out = fluidity_tests::e2e::curl(via.iter().chain(&["-o", "/dev/null", &url]));
        assert_eq!(
            out.code, direct.code,
            "through {via:?}, curl should fail as it does directly ({}); stderr: {}",
            direct.stderr, out.stderr
        );
    }
    wait_for(
        "the origin to have reset all four responses",
        Duration::from_secs(30),
        || (origin.resets() == 4).then_some(()),
    );
    assert_tunnel_works(&t, &other, "origins reset mid-response");
}

/// A WebSocket origin that dies mid-session (its connection reset, no close frame) ends
/// the client's session through the proxy as it does directly: the Python `websockets`
/// client reports an abnormal closure caused by a connection reset, through an
/// absolute-form upgrade and through CONNECT; not a clean close, not an end that looks
/// like the server hanging up, and not a wait for ever. The tunnel keeps working.
#[test]
fn a_websocket_origin_reset_mid_session_fails_the_client_as_it_would_directly() {
    let _wd = watchdog("websocket_origin_reset", Duration::from_secs(150));
    let t = Tunnel::start();
    let origin = AbruptOrigin::start();
    let other = HttpOrigin::start("after-websocket-crash");
    let target = origin.addr().to_string();
    let ended = |via: WsVia| {
        let (code, stdout, stderr) = ws_crash_client(t.proxy(), &target, via);
        assert_eq!(
            code,
            Some(0),
            "via {via:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        stdout.lines().last().unwrap_or_default().to_owned()
    };
    let direct = ended(WsVia::Direct);
    assert_eq!(
        direct, "closed abnormally: no close frame (ConnectionResetError)",
        "directly"
    );
    for via in [WsVia::AbsoluteForm, WsVia::Connect] {
        assert_eq!(
            ended(via),
            direct,
            "via {via:?}, the session should end as it does directly"
        );
    }
    wait_for(
        "the origin to have reset all three sessions",
        Duration::from_secs(30),
        || (origin.resets() == 3).then_some(()),
    );
    assert_tunnel_works(&t, &other, "a WebSocket origin reset mid-session");
}

/// A client that goes away before its answer releases its stream and the origin
/// connection behind it, even when the origin never answers: after a few silent seconds,
/// since a close looks like a half-close (a half-closed client may still be reading, and
/// one whose origin answers gets the whole answer), and such a client is then reset.
/// Abandoned requests to a stalled origin would otherwise pile up until the tunnel's
/// stream limit stopped every other client.
#[test]
fn a_client_that_leaves_before_its_answer_releases_the_stream_and_the_origin() {
    let _wd = watchdog("client_leaves_early", Duration::from_secs(120));
    let t = Tunnel::start();
    let silent = SilentOrigin::start();
    let answers = HttpOrigin::start("answers");
    let proxy = t.proxy();
    let get = |url: &str| format!("GET {url} HTTP/1.1\r\nHost: origin\r\n\r\n");
    let send = |url: &str| {
        let mut s = TcpStream::connect(proxy).expect("connecting to the proxy");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        s.write_all(get(url).as_bytes()).expect("the request");
        s
    };

    // Closed while waiting: released.
    for i in 1..=3 {
        let s = send(&silent.url("/never"));
        wait_for(
            "the request to reach the origin",
            Duration::from_secs(30),
            || (silent.accepted() == i).then_some(()),
        );
        drop(s);
    }
    wait_for(
        "the three origin connections to be released",
        Duration::from_secs(30),
        || (silent.released() == 3).then_some(()),
    );
    wait_for("the streams to close", Duration::from_secs(30), || {
        (t.server.metric("fluidity_streams_active") == 0.0).then_some(())
    });

    // Half-closed, and the origin answers: the whole answer arrives.
    let mut s = send(&answers.url("/hello"));
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let answer = read_all_lossy(&mut s);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("hello from answers\n"),
        "a half-closed client: {answer}"
    );

    // Half-closed, and the origin stays silent: released, and the client told so.
    let mut s = send(&silent.url("/never"));
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    wait_for(
        "the silent origin's connection to be released",
        Duration::from_secs(30),
        || (silent.released() == 4).then_some(()),
    );
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the abandoned half-closed client saw {other:?}, not a reset"),
    }
    wait_for("the streams to close", Duration::from_secs(30), || {
        (t.server.metric("fluidity_streams_active") == 0.0).then_some(())
    });

    // Gone in the middle of a download, as a cancelled one is.
    let mut s = send(&answers.url(&format!("/bytes/{}", 64 * MIB)));
    let mut some = [0u8; 1000];
    s.read_exact(&mut some).expect("the download's start");
    drop(s);
    wait_for("the streams to close", Duration::from_secs(30), || {
        (t.server.metric("fluidity_streams_active") == 0.0).then_some(())
    });
    assert_tunnel_works(&t, &answers, "clients left before their answers");
    // Clients leave every day: nothing of it is logged at info, as a failure.
    let log = t.agent.proc.log();
    assert!(!log.contains("request failed"), "{log}");
}

/// A client that resets its connection while its upload waits on a full stream (the
/// origin reads nothing, and sends nothing) releases its stream: the agent reads nothing
/// from that client then, and still notices the reset, within seconds. Through CONNECT
/// and SOCKS5. Otherwise such streams would stay open for good, and enough of them would
/// stop every other client at the tunnel's stream limit.
#[test]
fn a_client_reset_during_a_stalled_upload_releases_its_stream() {
    let _wd = watchdog("reset_during_stalled_upload", Duration::from_secs(120));
    let t = Tunnel::start();
    let deaf = DeafOrigin::start();
    let target = deaf.addr();
    let open_connect = || {
        let (status, s) = connect_via(t.proxy(), &target.to_string()).expect("CONNECT");
        assert_eq!(status, 200, "CONNECT to the deaf origin");
        s
    };
    let open_socks = || {
        let mut s = TcpStream::connect(t.proxy()).expect("connecting to the proxy");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(&[5, 1, 0]).expect("SOCKS5 greeting");
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).expect("SOCKS5 method");
        assert_eq!(reply, [5, 0]);
        let std::net::IpAddr::V4(ip) = target.ip() else {
            panic!("an IPv4 origin")
        };
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&ip.octets());
        request.extend_from_slice(&target.port().to_be_bytes());
        s.write_all(&request).expect("SOCKS5 request");
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).expect("SOCKS5 reply");
        assert_eq!(reply[1], 0, "SOCKS5 reply {reply:?}");
        s
    };
    for (via, open) in [
        ("CONNECT", &open_connect as &dyn Fn() -> TcpStream),
        ("SOCKS5", &open_socks),
    ] {
        let s = open();
        // Upload until nothing more is taken: every buffer to the origin is full.
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let chunk = vec![b'u'; 64 * 1024];
        let mut w = &s;
        while w.write_all(&chunk).is_ok() {}
        assert_eq!(
            t.server.metric("fluidity_streams_active"),
            1.0,
            "{via}: the stalled stream"
        );
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(s);
        wait_for(
            &format!("{via}: the reset client's stream to close"),
            Duration::from_secs(60),
            || (t.server.metric("fluidity_streams_active") == 0.0).then_some(()),
        );
    }
    let origin = HttpOrigin::start("after-stalled-uploads");
    assert_tunnel_works(&t, &origin, "clients reset during stalled uploads");
}

/// An origin that drops a request without answering gets the client a 502 that says how:
/// closed, or broken off (reset, as by a crashing server). The tunnel keeps working.
#[test]
fn an_origin_that_drops_a_request_unanswered_gets_a_502_saying_how() {
    let _wd = watchdog("origin_drops_request", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = AbruptOrigin::start();
    let other = HttpOrigin::start("after-dropped-requests");
    let target = origin.addr();
    for (path, says) in [
        (
            "/close-now",
            format!("{target} closed the connection without answering"),
        ),
        (
            "/reset-now",
            format!("the connection to {target} broke off before it answered"),
        ),
    ] {
        let (status, body) = curl_status(&t.proxy_url(), &origin.url(path));
        assert_eq!(
            (status, body.trim_end()),
            (502, format!("fluidity: {says}").as_str()),
            "{path}"
        );
    }
    assert_tunnel_works(&t, &other, "origins that dropped requests");
}

/// An origin that closes its connection plainly (a FIN) in the middle of a response whose
/// length is known (Content-Length or chunked) fails the client through the proxy as it
/// does directly: curl sees the response cut short (exit 18), not a reset (56), and never
/// a success.
#[test]
fn an_origin_that_closes_mid_response_fails_the_client_as_it_would_directly() {
    let _wd = watchdog("origin_closes_mid_response", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("cut");
    let (proxy, socks) = (t.proxy_url(), t.proxy().to_string());
    for path in ["/cut/100000/200000", "/cut-chunked"] {
        let url = origin.url(path);
        let direct = fluidity_tests::e2e::curl(["-o", "/dev/null", &url]);
        assert_eq!(direct.code, Some(18), "{path} directly: {}", direct.stderr);
        let ways: [&[&str]; 3] = [
            &["-x", &proxy],
            &["-p", "-x", &proxy],
            &["--socks5-hostname", &socks],
        ];
        for via in ways {
            let out = fluidity_tests::e2e::curl(via.iter().chain(&["-o", "/dev/null", &url]));
            assert_eq!(
                out.code, direct.code,
                "{path} through {via:?}: {} (directly: {})",
                out.stderr, direct.stderr
            );
        }
    }
    assert_tunnel_works(&t, &origin, "origins closed mid-response");
}

/// Uploads to the origin's `/flood-then-reset` through `proxy` (directly when `None`,
/// through CONNECT when `connect`), as a client that sends its whole body before it
/// reads anything would, and returns the error that stopped it.
fn upload_until_it_fails(
    proxy: Option<SocketAddr>,
    connect: bool,
    origin: SocketAddr,
) -> std::io::Error {
    let mut s = TcpStream::connect(proxy.unwrap_or(origin)).expect("connecting");
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let target = if proxy.is_some() && !connect {
        format!("http://{origin}/flood-then-reset")
    } else {
        "/flood-then-reset".to_owned()
    };
    if connect {
        write!(s, "CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").expect("CONNECT");
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("the CONNECT answer");
            answer.push(byte[0]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }
    write!(
        s,
        "POST {target} HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\n\r\n",
        1u64 << 40
    )
    .expect("the request head");
    let chunk = vec![b'u'; 64 * 1024];
    loop {
        if let Err(e) = s.write_all(&chunk) {
            return e;
        }
    }
}

/// A client that sends its whole upload before it reads, to an origin that answers with
/// a body the client does not take and then resets the connection, gets the reset as it
/// does directly, through absolute-form HTTP and CONNECT, rather than waiting for ever:
/// the client and the tunnel stream are then blocked on each other, and the origin's
/// last bytes get only a bounded time to pass before the relay gives up.
#[test]
fn a_reset_reaches_a_client_that_sends_before_it_reads() {
    let _wd = watchdog("reset_to_a_sending_client", Duration::from_secs(180));
    let t = Tunnel::start();
    let origin = AbruptOrigin::start();
    let other = HttpOrigin::start("after-flood");
    let addr = origin.addr();
    let reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    let direct = upload_until_it_fails(None, false, addr);
    assert!(reset(&direct), "directly: {direct:?}");
    let proxy = t.proxy();
    std::thread::scope(|scope| {
        let runs = [false, true].map(|connect| {
            scope.spawn(move || (connect, upload_until_it_fails(Some(proxy), connect, addr)))
        });
        for run in runs {
            let (connect, e) = run.join().expect("an upload thread");
            assert!(
                reset(&e),
                "through the proxy (CONNECT: {connect}), the upload should end with the reset, \
                 as it does directly ({direct:?}), not with {e:?}"
            );
        }
    });
    assert_tunnel_works(&t, &other, "resets to clients blocked sending");
}

#[test]
fn socks5_refusals_get_the_matching_reply_codes() {
    let _wd = watchdog("socks5_refusals", Duration::from_secs(120));
    let t = Tunnel::start();
    let origin = HttpOrigin::start("after-socks");
    let proxy = t.proxy().to_string();
    // curl reports the SOCKS5 reply code in parentheses: 4 host unreachable, 5 connection
    // refused, 2 not allowed by the ruleset.
    for (url, reply) in [
        ("http://nonexistent.invalid/".to_owned(), "(4)"),
        (format!("http://localhost:{}/", refused_port()), "(5)"),
        ("http://10.1.2.3/".to_owned(), "(2)"),
    ] {
        let out = fluidity_tests::e2e::curl(["--socks5-hostname", &proxy, &url]);
        assert_eq!(out.code, Some(97), "{url}: {}", out.stderr);
        assert!(
            out.stderr.contains(reply),
            "{url}: expected SOCKS5 reply {reply}: {}",
            out.stderr
        );
    }
    assert_tunnel_works(&t, &origin, "SOCKS5 refusals");
}

/// How many descriptors process `pid` holds, once the count stops moving.
fn settled_descriptors(pid: u32) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("listing the agent's descriptors")
            .count()
    };
    wait_for(
        "the agent's descriptors to settle",
        Duration::from_secs(30),
        || {
            let before = count();
            std::thread::sleep(Duration::from_millis(50));
            (count() == before).then_some(before)
        },
    )
}

/// Sets process `pid`'s descriptor limit (soft and hard) to `limit`.
fn limit_descriptors(pid: u32, limit: usize) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("running prlimit (util-linux; .ci/setup-e2e.sh installs it)");
    assert!(status.success(), "prlimit failed: {status}");
}

#[test]
fn running_out_of_descriptors_pauses_accepting_logs_once_and_recovers() {
    let _wd = watchdog("out_of_descriptors", Duration::from_secs(120));
    let origin = HttpOrigin::start("fd");
    let mut t = Tunnel::start();
    // Counted once the agent is idle: while it connects the tunnel it holds descriptors
    // it gives back soon after, which would end the shortage below after one failure.
    let ready = t
        .agent
        .proc
        .wait_log(Duration::from_secs(30), |l| l.contains("tunnel ready"));
    assert!(ready, "the tunnel did not come up:\n{}", t.agent.proc.log());
    let pid = t.agent.proc.pid();
    let open = settled_descriptors(pid);
    limit_descriptors(pid, open + 4);

    // The first few clients take the last descriptors; the rest wait in the backlog.
    let clients: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(t.proxy()).expect("connecting to the proxy"))
        .collect();
    let warned = t
        .agent
        .proc
        .wait_log(Duration::from_secs(30), |l| l.contains("accept failed"));
    assert!(warned, "no accept failure logged:\n{}", t.agent.proc.log());
    // The shortage lasts a while, long enough for the loop to retry several times.
    std::thread::sleep(Duration::from_secs(1));
    drop(clients);
    let recovered = t.agent.proc.wait_log(Duration::from_secs(30), |l| {
        l.contains("accepting connections again")
    });
    let log = t.agent.proc.log();
    assert!(recovered, "accepting did not resume:\n{log}");
    // Freed descriptors let the queued connections in, which can run the agent out again
    // at once: that relapse, soon after a logged run, is counted and not logged again.
    assert_eq!(log.matches("accept failed").count(), 1, "{log}");
    assert!(log.contains("out of file descriptors"), "{log}");
    let failures: u64 = log
        .lines()
        .find(|l| l.contains("accepting connections again"))
        .and_then(|l| l.split("failures=").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in the log:\n{log}"));
    assert!(
        failures >= 2,
        "{failures} failures: the loop did not retry\n{log}"
    );
    assert_tunnel_works(&t, &origin, "running out of descriptors");
}

/// A kept-alive client connection that waits for its next request holds a descriptor a
/// new client may need: when accepting fails for want of them, such idle connections are
/// closed (as a web server closes them) and the waiting client is served.
#[test]
fn idle_kept_alive_clients_make_room_when_descriptors_run_out() {
    let _wd = watchdog("idle_clients_make_room", Duration::from_secs(120));
    let origin = HttpOrigin::start("room");
    // Idle connections kept far longer than the test: any that closes was closed to make
    // room, not because it expired.
    let config = tempfile::tempdir().expect("config folder");
    let path = config.path().join("agent.toml");
    std::fs::write(&path, "head_timeout_secs = 600\n").expect("writing the agent config");
    let mut t = Tunnel::with_agent(
        ServerOptions::default(),
        AgentOptions {
            args: vec!["--config".into(), path.display().to_string()],
            ..AgentOptions::default()
        },
    );
    let ready = t
        .agent
        .proc
        .wait_log(Duration::from_secs(30), |l| l.contains("tunnel ready"));
    assert!(ready, "the tunnel did not come up:\n{}", t.agent.proc.log());
    let hello = origin.url("/hello");
    let answered = |k: &mut KeptAlive| {
        assert_eq!(k.get(&hello), (200, "hello from room\n".to_owned()));
    };
    let mut idle: Vec<KeptAlive> = (0..4)
        .map(|_| {
            let mut k = KeptAlive::open(t.proxy());
            answered(&mut k);
            k
        })
        .collect();
    let pid = t.agent.proc.pid();
    let open = settled_descriptors(pid);
    // Not one descriptor to spare.
    limit_descriptors(pid, open);

    answered(&mut KeptAlive::open(t.proxy()));
    for k in &mut idle {
        let seen = k.closed_plainly();
        assert!(
            matches!(seen, Ok(true)),
            "an idle kept-alive client saw {seen:?}, not a close"
        );
    }
    let log = t.agent.proc.log();
    assert!(log.contains("out of file descriptors"), "{log}");
}

/// A TCP connection to `to` from the loopback address `from` (all of 127/8 is this host,
/// each address a source of its own to the server).
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from((from, 0)).into())
        .unwrap_or_else(|e| panic!("binding {from:?}: {e}"));
    sock.connect(&to.into()).expect("connect");
    TcpStream::from(sock)
}

/// Whether the server has ended `c` (it reads its end), without waiting.
fn ended(c: &TcpStream) -> bool {
    c.set_nonblocking(true).expect("nonblocking");
    match (&*c).read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Connections from several hosts, each within its per-source limit, that open and say
/// nothing take every handshake slot. The oldest of them gives way to a new connection
/// once it has sat for two seconds, so an agent gets through long before their TLS
/// handshakes time out; before, every agent was turned away until then, and again as
/// soon as the holders reconnected.
#[test]
fn idle_connections_holding_every_handshake_slot_give_way_to_an_agent() {
    let _wd = watchdog("handshake_slots", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = certs_init(dir.path());
    // Held handshakes time out long after the checks below, however slow the machine.
    let server = Server::start(
        &certs,
        &ServerOptions {
            config: Some("tls_handshake_secs = 600\n".into()),
            ..ServerOptions::default()
        },
        dir.path(),
    );
    // The default limits: 8 per source, 64 in all. Eight hosts hold all 64.
    let mut held = Vec::new();
    for host in 2..10 {
        for _ in 0..8 {
            held.push(connect_from([127, 0, 0, host], server.listen));
        }
    }
    // A ninth host's connection, at once, is dropped: the slots are full and young.
    let late = connect_from([127, 0, 0, 10], server.listen);
    wait_for(
        "a connection beyond the slots to be dropped",
        Duration::from_secs(30),
        || ended(&late).then_some(()),
    );
    assert!(!held.iter().any(ended), "all 64 are held");

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("log folder");
    // Its first attempt may come before any held handshake is old enough to give way;
    // the requests below make it try again.
    let agent = Agent::spawn(&certs, server.listen, &AgentOptions::default(), &agent_dir);
    let origin = HttpOrigin::start("past the stalled handshakes");
    // A 200 comes within the minute (the wait fails the test otherwise).
    wait_for("the agent to get through", Duration::from_secs(60), || {
        let (status, _) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
        (status == 200).then_some(())
    });
    assert!(
        held.iter().filter(|c| ended(c)).count() >= 1,
        "a held connection gave way"
    );
    let log = server.proc.log();
    assert!(
        log.contains("gave way to a new connection"),
        "the server says why it dropped a held connection:\n{log}"
    );
}

/// Connections that open and then say nothing hold handshake slots until the TLS
/// handshake times out. From one source they get at most `max_handshakes_per_source` of
/// them: an agent elsewhere still connects, and the server logs the drops once, not once
/// per connection.
#[test]
fn idle_connections_from_one_host_do_not_lock_agents_out() {
    let _wd = watchdog("handshake_flood", Duration::from_secs(120));
    // Held handshakes time out long after the checks below, however slow the machine.
    let t = Tunnel::with(ServerOptions {
        config: Some("tls_handshake_secs = 60\n".into()),
        ..ServerOptions::default()
    });
    let origin = HttpOrigin::start("flood");
    // 127.0.0.2 is another source on loopback; the agents connect from 127.0.0.1.
    let connect_from_elsewhere = || connect_from([127, 0, 0, 2], t.server.listen);
    // The default limits are 8 per source and 64 in all; 8 are held, and the 64 after
    // them dropped. (Without the per-source limit 64 would be held, and the agent below
    // turned away.)
    let mut held = Vec::new();
    for _ in 0..72 {
        held.push(connect_from_elsewhere());
    }
    // A dropped connection reads its end; a held one has nothing to read until its TLS
    // handshake times out.
    let mut closed = vec![false; held.len()];
    let mut count_closed = || {
        for (c, done) in held.iter().zip(closed.iter_mut()) {
            *done = *done || ended(c);
        }
        closed.iter().filter(|d| **d).count()
    };
    wait_for(
        "64 idle connections to be dropped",
        Duration::from_secs(30),
        || (count_closed() >= 64).then_some(()),
    );
    assert_eq!(
        count_closed(),
        64,
        "all but 8 of the idle connections are dropped"
    );

    // A new agent from 127.0.0.1 is not kept out by them.
    let dir = t.path("second-agent");
    std::fs::create_dir_all(&dir).expect("log folder");
    let agent = fluidity_tests::e2e::tunnel::Agent::start(&t.certs, t.server.listen, &dir);
    let (status, _) = curl_status(&agent.proxy_url(), &origin.url("/hello"));
    assert_eq!(status, 200, "an agent from another host gets through");

    let log = t.server.proc.log();
    let lines = log
        .matches("too many connections in the TLS handshake")
        .count();
    assert!(
        (1..=2).contains(&lines) && log.contains("max_handshakes_per_source"),
        "the drops are logged once in a while, with the setting: {lines} lines"
    );
    // Hanging up in the handshake is no failed authentication.
    drop(held);
    wait_for(
        "the held handshakes to end",
        Duration::from_secs(30),
        || (t.server.proc.log().matches("TLS handshake failed").count() >= 8).then_some(()),
    );
    assert_eq!(t.server.metric("fluidity_auth_failures_total"), 0.0);
}

/// A client that starts a request head and does not finish it in time gets 408 and the
/// close (one that sends nothing is closed quietly: agent/tests/proxy_http.rs).
#[test]
fn a_request_head_that_stalls_gets_408() {
    let _wd = watchdog("head_408", Duration::from_secs(60));
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("agent.toml");
    std::fs::write(&cfg, "head_timeout_secs = 1\n").expect("config");
    let t = Tunnel::with_agent(
        ServerOptions::default(),
        fluidity_tests::e2e::tunnel::AgentOptions {
            args: vec!["--config".into(), cfg.to_str().expect("path").into()],
            ..Default::default()
        },
    );
    let mut sock = TcpStream::connect(t.proxy()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    sock.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1")
        .expect("part of a head");
    let mut answer = String::new();
    sock.read_to_string(&mut answer)
        .expect("the answer, then the close");
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n")
            && answer.contains("did not arrive within"),
        "{answer:?}"
    );
}

/// A keep-alive connection's next head that begins while the connection sits idle gets
/// a head's whole limit (from the end of the idle wait), not what was left of that wait:
/// here it begins 2 s into a 10 s wait and ends 9 s later, past the wait's end but well
/// within its own.
#[test]
fn a_head_begun_late_in_an_idle_wait_gets_its_own_time() {
    let _wd = watchdog("head_after_idle", Duration::from_secs(90));
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("agent.toml");
    std::fs::write(&cfg, "head_timeout_secs = 10\n").expect("config");
    let t = Tunnel::with_agent(
        ServerOptions::default(),
        fluidity_tests::e2e::tunnel::AgentOptions {
            args: vec!["--config".into(), cfg.to_str().expect("path").into()],
            ..Default::default()
        },
    );
    let origin = HttpOrigin::start("after-idle");
    let mut client = KeptAlive::open(t.proxy());
    assert_eq!(
        client.get(&origin.url("/hello")),
        (200, "hello from after-idle\n".to_owned())
    );
    std::thread::sleep(Duration::from_secs(2));
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/hello"),
        origin.addr()
    );
    let (start, rest) = head.split_at(20);
    client
        .s
        .write_all(start.as_bytes())
        .expect("the head's start");
    std::thread::sleep(Duration::from_secs(9));
    client
        .s
        .write_all(rest.as_bytes())
        .expect("the head's rest");
    assert_eq!(
        client.read_response(),
        (200, "hello from after-idle\n".to_owned())
    );
}

/// A client that speaks TLS to the proxy (a proxy URL starting with https://) cannot be
/// answered in words; the agent's log says what to change.
#[test]
fn a_tls_client_at_the_proxy_port_is_named_in_the_log() {
    let _wd = watchdog("tls_to_proxy", Duration::from_secs(60));
    let mut t = Tunnel::start();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy-insecure", "-x"])
        .arg(format!("https://{}", t.proxy()))
        .arg("http://127.0.0.1:1/")
        .output()
        .expect("running curl");
    assert!(!out.status.success(), "a TLS client cannot get an answer");
    assert!(
        t.agent.proc.wait_log(Duration::from_secs(20), |l| l
            .contains("must start with http://")),
        "the agent's log: {}",
        t.agent.proc.log()
    );
}

/// Limits that cannot work are refused at start with the reason, before any certificate is
/// read: a server that would turn every agent away, thread counts that would exhaust
/// memory, a request head timeout of nothing.
#[test]
fn settings_that_cannot_work_are_refused_at_start() {
    let _wd = watchdog("settings_refused", Duration::from_secs(60));
    let bins = binaries();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "server = \"127.0.0.1:1\"\nhead_timeout_secs = 0\n").expect("config");
    let config = config.to_str().expect("path");
    let cases: [(&Path, &[&str], &str); 8] = [
        (&bins.server, &["--max-tunnels", "0"], "max_tunnels = 0"),
        (&bins.server, &["--max-streams", "0"], "max_streams = 0"),
        (&bins.server, &["--threads", "100000"], "is more than 256"),
        (
            &bins.server,
            &["--egress", "allow_private=maybe"],
            "yes or no",
        ),
        (
            &bins.agent,
            &["--server", "127.0.0.1:1", "--threads", "100000"],
            "is more than 256",
        ),
        (
            &bins.agent,
            &["--config", config],
            "head_timeout_secs must be at least 1",
        ),
        (
            &bins.agent,
            &["--mode", "aws", "--threads", "100000"],
            "is more than 256",
        ),
        (
            &bins.agent,
            &["local", "--listen", "0.0.0.0:0"],
            "local mode listens on a loopback address only",
        ),
    ];
    for (bin, args, says) in cases {
        let out = Command::new(bin)
            .args(args)
            .env("HOME", dir.path())
            .output()
            .expect("running");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: exit {}, {err}",
            out.status
        );
    }
}

/// Runs the agent and the server, `extra` arguments first and `env` set, with every
/// certificate file at `missing`; returns what each printed, with the words that name its
/// failed setting.
fn both_without_certificates(
    missing: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<(std::process::Output, &'static str)> {
    let bins = binaries();
    let agent = Command::new(&bins.agent)
        .envs(env.iter().copied())
        .arg("run")
        .args(extra)
        .args(["--server", "127.0.0.1:9", "--cert", missing])
        .args(["--key", missing, "--ca", missing])
        .output()
        .expect("running the agent");
    let server = Command::new(&bins.server)
        .envs(env.iter().copied())
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"])
        .args(["--cert", missing, "--key", missing, "--client-ca", missing])
        .output()
        .expect("running the server");
    vec![
        (agent, "the agent's certificate and key (cert, key)"),
        (server, "the server's certificate and key (cert, key)"),
    ]
}

#[test]
fn missing_certificate_files_are_named_with_their_setting_and_a_way_out() {
    let _wd = watchdog("missing_certificates", Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("a UTF-8 path");
    for (output, what) in both_without_certificates(missing, &[], &[]) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
        assert!(stderr.contains(missing), "{stderr}");
        assert!(stderr.contains("fluidity certs init"), "{stderr}");
    }
}

/// With JSON logs, the error that stops a binary is a JSON line too (a log collector
/// parses every line), at level ERROR, naming what failed.
#[test]
fn with_json_logs_the_error_that_stops_a_binary_is_a_json_line() {
    let _wd = watchdog("json_exit_error", Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("a UTF-8 path");
    // Also with a filter that silences errors: the reason for stopping is not a log line
    // to filter out.
    let runs = [
        both_without_certificates(missing, &["--log-format", "json"], &[]),
        both_without_certificates(
            missing,
            &["--log-format", "json"],
            &[("FLUIDITY_LOG", "off")],
        ),
    ];
    for (output, what) in runs.into_iter().flatten() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{stderr}")))
            .collect();
        let last = lines.last().expect("an error line");
        assert_eq!(last["level"], "ERROR", "{stderr}");
        let error = last["fields"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(missing) && error.contains(what), "{stderr}");
    }
}

#[test]
fn an_unreadable_key_file_is_reported_as_a_permission_problem_not_a_missing_certificate() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let _wd = watchdog("unreadable_key", Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let certs = dir.path().join("certs");
    certs_init(&certs);
    let bins = binaries();
    // Root reads any file, so as root the binaries run as `nobody`, from copies in a folder
    // that user may enter, with the key left readable by its owner alone.
    let as_root = std::fs::metadata("/proc/self").expect("/proc").uid() == 0;
    let run_dir = dir.path().join("bin");
    std::fs::create_dir(&run_dir).expect("a folder for the binaries");
    let mut commands = Vec::new();
    for (bin, args, key) in [
        (
            &bins.agent,
            vec!["run", "--server", "127.0.0.1:9", "--cert", "client.pem"],
            "client-key.pem",
        ),
        (
            &bins.server,
            vec!["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"],
            "server-key.pem",
        ),
    ] {
        let name = bin.file_name().expect("a binary's name");
        let copy = run_dir.join(name);
        std::fs::copy(bin, &copy).expect("copying the binary");
        let mut cmd = Command::new(&copy);
        cmd.args(args).current_dir(&certs);
        if bin == &bins.agent {
            cmd.args(["--key", key, "--ca", "ca.pem"]);
        } else {
            cmd.args([
                "--cert",
                "server.pem",
                "--key",
                key,
                "--client-ca",
                "ca.pem",
            ]);
        }
        commands.push((cmd, key));
    }
    for folder in [dir.path(), &certs, &run_dir] {
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for entry in std::fs::read_dir(&certs).expect("the certificates") {
        let path = entry.expect("an entry").path();
        let key = path.to_string_lossy().ends_with("-key.pem");
        let mode = match (key, as_root) {
            (true, true) => 0o600,
            (true, false) => 0o000,
            (false, _) => 0o644,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    for (mut cmd, key) in commands {
        if as_root {
            cmd.uid(65534).gid(65534);
        }
        let output = cmd.output().expect("running the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
        assert!(stderr.contains("check the owner and mode"), "{stderr}");
        assert!(!stderr.contains("certs init"), "{stderr}");
    }
}

/// A peer with a valid certificate that fills its receive buffers and then breaks the
/// protocol gets its tunnel closed; the close (a goaway, TLS's close_notify) cannot be
/// sent to a peer that never reads, and the server gives up on it after the driver's
/// CLOSE_LIMIT (10 s) instead of holding the socket, its buffers and a tunnel count for
/// ever.
#[test]
fn a_closed_tunnel_whose_peer_never_reads_is_let_go() {
    use fluidity_proto::frame::Frame;
    use fluidity_proto::{Config, Connection, Credentials, Event, Limits, StreamEvent, Target};
    use fluidity_runtime_smol::tls::{client_config, CaRoots, Identity, PeerCheck};
    use std::time::Instant;

    let _wd = watchdog("closed_tunnel_never_read", Duration::from_secs(180));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let certs = certs_init(&dir.path().join("certs"));
    let mut server = Server::start(&certs, &ServerOptions::default(), dir.path());
    let flood = FloodOrigin::start();

    // The tunnel handshake and the opens, through the protocol's own state machine.
    let identity = Identity::load_as(
        &certs.client_cert,
        &certs.client_key,
        fluidity_runtime_smol::PeerRole::Client,
    )
    .expect("the agent's identity");
    let roots = CaRoots::load(&certs.ca_cert).expect("the CA");
    let tls = client_config(&identity, &roots, &PeerCheck::default()).expect("TLS");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
    let conn = rustls::ClientConnection::new(tls, name).expect("a TLS client");
    let sock = TcpStream::connect(server.listen).expect("connecting to the server");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("a read timeout");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let big = 64 * 1024 * 1024;
    let config = Config {
        limits: Limits {
            stream_window: big,
            connection_window: big,
            ..Limits::default()
        },
        ..Config::default()
    };
    let mut agent = Connection::agent(Arc::new(config), Credentials::none(), Instant::now());
    let target = Target::parse(&flood.addr().to_string()).expect("the flood's address");
    let (mut opened, mut asked) = (0, false);
    let mut unread = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while opened < 4 {
        assert!(Instant::now() < deadline, "the streams did not open");
        if agent.is_ready() && !asked {
            for _ in 0..4 {
                agent.open(Instant::now(), target.clone()).expect("an open");
            }
            asked = true;
        }
        let mut out = Vec::new();
        agent.poll_transmit(Instant::now(), &mut out);
        tls.write_all(&out).expect("sending");
        let mut buf = [0u8; 16 * 1024];
        match tls.read(&mut buf) {
            Ok(0) => panic!("the server closed the tunnel"),
            Ok(n) => unread.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading: {e}"),
        }
        let taken = agent.handle_input(Instant::now(), &unread);
        unread.drain(..taken);
        agent.handle_timeout(Instant::now());
        while let Some(ev) = agent.poll() {
            if matches!(ev, Event::Stream(StreamEvent::Opened { .. })) {
                opened += 1;
            }
        }
    }
    assert_eq!(server.metric("fluidity_tunnels_active"), 1.0);

    // From now on nothing is read: the server sends into full buffers until it can send
    // no more, which the flood, stopping, tells.
    let mut last = flood.written();
    wait_for(
        "the server to stop sending",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let now = flood.written();
            let stopped = now == last && now > 0;
            last = now;
            stopped.then_some(())
        },
    );
    // A zero increment is a protocol error: the server closes the tunnel.
    let mut bad = Vec::new();
    Frame::WindowUpdate {
        id: fluidity_proto::StreamId(0),
        increment: 0,
    }
    .encode(&mut bad);
    tls.write_all(&bad).expect("sending the bad frame");
    tls.flush().expect("flushing");
    let logged = server
        .proc
        .wait_log(Duration::from_secs(30), |l| l.contains("tunnel lost"));
    assert!(logged, "{}", server.proc.log());
    wait_for(
        "the server to let the tunnel go",
        Duration::from_secs(60),
        || (server.metric("fluidity_tunnels_active") == 0.0).then_some(()),
    );
    drop(tls);
}

/// A bad value in an environment variable is refused naming the variable, not only the
/// flag it stands for: the user looks for it where they set it.
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let bins = binaries();
    for (exe, var) in [
        (&bins.agent, "FLUIDITY_THREADS"),
        (&bins.server, "FLUIDITY_SERVER_THREADS"),
    ] {
        let out = Command::new(exe)
            .env(var, "abc")
            .output()
            .expect("running the binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("invalid value 'abc' for '--threads"), "{err}");
        assert!(
            err.contains(&format!("the environment variable {var}")),
            "{err}"
        );
        // The same value on the command line is the command line's own mistake.
        let out = Command::new(exe)
            .env(var, "abc")
            .args(["--threads", "abc"])
            .output()
            .expect("running the binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(!err.contains("environment variable"), "{err}");
    }
}

/// The name in a DNS query datagram (RFC 1035 §4.1.2), lowercased; `None` if malformed.
fn query_name(datagram: &[u8]) -> Option<String> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*datagram.get(at)?);
        if len == 0 {
            return Some(labels.join(".").to_ascii_lowercase());
        }
        let label = datagram.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len;
    }
}

/// A tunnel whose names all hang at the DNS server leaves name lookups to the other
/// tunnels. The server's resolv.conf names a DNS server that never answers (a UDP socket
/// on 127.53.0.1:53 whose queries the test reads and drops, glibc asked to wait 30 s), and
/// its hosts file gives `quick.test`. One agent asks for 70 names only that DNS server
/// could answer, more than the server's 64 lookup slots; the server lets its tunnel hold
/// 32 of them, so a second agent's request for `quick.test` still gets a slot and goes
/// through. Needs root (port 53) and `unshare` with user namespaces.
#[test]
fn a_tunnel_whose_names_all_hang_leaves_lookups_to_the_others() {
    let _wd = watchdog("lookup_share", Duration::from_secs(120));
    let dns = match std::net::UdpSocket::bind("127.53.0.1:53") {
        Ok(s) => s,
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && std::env::var_os("CI").is_none() =>
        {
            eprintln!("skipped: binding a DNS server on port 53 needs root ({e})");
            return;
        }
        Err(e) => panic!("binding the test's DNS server on 127.53.0.1:53: {e}"),
    };
    dns.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let origin = HttpOrigin::start("quick");
    let t = Tunnel::with(ServerOptions {
        hosts: Some("127.0.0.1 localhost\n127.0.0.1 quick.test\n".into()),
        resolv_conf: Some("nameserver 127.53.0.1\noptions timeout:30 attempts:1\n".into()),
        ..ServerOptions::default()
    });
    let other = Agent::start_with(
        &t.certs,
        t.server.listen,
        &AgentOptions {
            name: "other".into(),
            ..AgentOptions::default()
        },
        t.dir.path(),
    );
    let mut hanging: Vec<TcpStream> = (0..70)
        .map(|i| {
            let mut s = TcpStream::connect(t.proxy()).expect("connect to the proxy");
            write!(
                s,
                "CONNECT hang-{i}.test:80 HTTP/1.1\r\nHost: hang-{i}.test:80\r\n\r\n"
            )
            .expect("send CONNECT");
            s
        })
        .collect();
    // Every name that got a lookup slot reaches the DNS server. Wait for the tunnel's
    // share, then until no new name comes for 1 s (or all the slots are taken, as they
    // would be without shares).
    let mut names = std::collections::HashSet::new();
    let mut buf = [0u8; 1500];
    let started = std::time::Instant::now();
    let mut last_new = started;
    while names.len() < 64 && (names.len() < 32 || last_new.elapsed() < Duration::from_secs(1)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the DNS server was asked for only {} names in 30 s: {names:?}\n{}",
            names.len(),
            t.server.proc.log()
        );
        if let Ok(n) = dns.recv(&mut buf) {
            if let Some(name) = query_name(&buf[..n]) {
                if names.insert(name) {
                    last_new = std::time::Instant::now();
                }
            }
        }
    }
    let port = origin.addr().port();
    let (status, body) = curl_status(
        &other.proxy_url(),
        &format!("http://quick.test:{port}/hello"),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from quick\n"),
        "{}",
        t.server.proc.log()
    );
    assert_eq!(names.len(), 32, "names asked of the DNS server: {names:?}");
    // The hung lookups time out, and the rest find no slot in the tunnel's share: each
    // CONNECT gets 504 with the reason.
    let answers: Vec<String> = hanging
        .iter_mut()
        .map(|s| String::from_utf8_lossy(&read_all_lossy(s)).into_owned())
        .collect();
    let starved = answers
        .iter()
        .filter(|a| a.contains("lookups this tunnel may run at once"))
        .count();
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 504 ")),
        "{answers:#?}"
    );
    assert_eq!(starved, 38, "{answers:#?}");
}
