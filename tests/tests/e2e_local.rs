//! `fluidity local`: certificates, an in-process server and the proxy from one command.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use fluidity_runtime_smol::pki::CertPaths;
use fluidity_tests::e2e::bin::binaries;
use fluidity_tests::e2e::client::{curl_status, payload_sha256, sha256_hex};
use fluidity_tests::e2e::origin::HttpOrigin;
use fluidity_tests::e2e::proc::{wait_for, Proc};
use fluidity_tests::e2e::tunnel::free_port;
use fluidity_tests::e2e::{curl, watchdog};

/// Starts `fluidity local` with `extra` arguments and waits for its usage lines; retries
/// if the port was taken.
fn start_local(
    dir: &std::path::Path,
    logs: &std::path::Path,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    for attempt in 1..=5 {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(&binaries().agent);
        cmd.arg("local")
            .arg("--dir")
            .arg(dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(extra);
        let mut p = Proc::spawn("fluidity-local", cmd, logs);
        let printed = wait_for("fluidity local to start", Duration::from_secs(30), || {
            if p.stdout().contains("stop with Ctrl-C") {
                return Some(true);
            }
            p.exited().map(|_| false)
        });
        if printed {
            return (p, listen);
        }
        assert!(
            attempt < 5 && p.log().contains("bind"),
            "fluidity local exited while starting:\n{}",
            p.log()
        );
    }
    unreachable!("the last attempt panics or returns")
}

#[test]
fn local_mode_generates_certificates_prints_usage_and_proxies() {
    let _wd = watchdog("local_mode", Duration::from_secs(120));
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("local-certs");
    assert!(!dir.exists());
    // No egress rule: local mode allows this machine by itself.
    let (local, listen) = start_local(&dir, tmp.path(), &[]);

    let paths = CertPaths::in_dir(&dir);
    for p in [
        &paths.ca_cert,
        &paths.server_cert,
        &paths.server_key,
        &paths.client_cert,
        &paths.client_key,
    ] {
        assert!(p.is_file(), "local mode did not write {}", p.display());
    }
    let usage = local.stdout();
    for expected in [
        format!("proxy on {listen}"),
        format!("curl -x http://{listen} "),
        format!("curl --socks5-hostname {listen} "),
        format!("certificates in {}", dir.display()),
        "egress: this machine (127.0.0.1, ::1)".to_owned(),
    ] {
        assert!(
            usage.contains(&expected),
            "usage lacks {expected:?}:\n{usage}"
        );
    }

    let origin = HttpOrigin::start("local-origin");
    let proxy = format!("http://{listen}");
    let out = curl(["-x", &proxy, &origin.url("/hello")]);
    out.assert_ok();
    assert_eq!(out.text(), "hello from local-origin\n");
    let len = 1024 * 1024;
    let out = curl(["-x", &proxy, &origin.url(&format!("/bytes/{len}"))]);
    out.assert_ok();
    assert_eq!(sha256_hex(&out.stdout), payload_sha256(len));
    let out = curl([
        "--socks5-hostname",
        &listen.to_string(),
        &format!("http://localhost:{}/hello", origin.addr().port()),
    ]);
    out.assert_ok();
    assert_eq!(out.text(), "hello from local-origin\n");
    drop(local);

    // A second start keeps the certificates it made.
    let ca_before = std::fs::read(&paths.ca_cert).expect("CA");
    let (local, listen) = start_local(&dir, tmp.path(), &[]);
    assert_eq!(std::fs::read(&paths.ca_cert).expect("CA"), ca_before);
    let out = curl(["-x", &format!("http://{listen}"), &origin.url("/hello")]);
    out.assert_ok();
    assert_eq!(out.text(), "hello from local-origin\n");
    drop(local);

    // A deny rule takes this machine back.
    let (local, listen) = start_local(
        &dir,
        tmp.path(),
        &["--egress", "deny_cidrs=127.0.0.0/8,::1"],
    );
    let (status, body) = curl_status(&format!("http://{listen}"), &origin.url("/hello"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("egress policy") && body.contains("remove the matching `--egress deny_"),
        "{body}"
    );
    let usage = local.stdout();
    assert!(
        usage.contains("then your rules: deny_cidrs=127.0.0.0/8,::1/128"),
        "the usage should name the rules given:\n{usage}"
    );
    drop(local);

    // Proxy credentials, as `fluidity run` takes them: other users of this machine reach
    // its loopback addresses too.
    let (local, listen) = start_local(
        &dir,
        tmp.path(),
        &["--proxy-username", "alice", "--proxy-password", "s3cr3t pw"],
    );
    let (status, _) = curl_status(&format!("http://{listen}"), &origin.url("/hello"));
    assert_eq!(status, 407);
    let out = curl([
        "-x",
        &format!("http://{listen}"),
        "--proxy-user",
        "alice:s3cr3t pw",
        &origin.url("/hello"),
    ]);
    assert_eq!(out.assert_ok().text(), "hello from local-origin\n");
    assert!(
        local
            .stdout()
            .contains(&format!("curl -x http://alice:PASSWORD@{listen} ")),
        "{}",
        local.stdout()
    );
    // Without the deny rule, a private address is refused by default, and the answer
    // gives the option that allows it.
    drop(local);
    let (local, listen) = start_local(&dir, tmp.path(), &[]);
    let (status, body) = curl_status(&format!("http://{listen}"), "http://10.1.2.3:8/");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("private range 10.0.0.0/8")
            && body.contains("`fluidity local --egress allow_cidrs=10.1.2.3/32` allows it"),
        "{body}"
    );
    drop(local);
}

/// A damaged file in local mode's certificate folder stops it with what is wrong, in
/// words, and what to do; once the folder is gone, new certificates are made and it runs.
#[test]
fn a_damaged_local_certificate_folder_is_named_with_the_way_out() {
    let _wd = watchdog("local_damaged_certificates", Duration::from_secs(120));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("certs");
    let (mut p, _) = start_local(&dir, tmp.path(), &[]);
    p.kill();
    let client = CertPaths::in_dir(&dir).client_cert;
    let pem = std::fs::read_to_string(&client).expect("the client certificate");
    std::fs::write(&client, &pem[..pem.len() / 2]).expect("cutting it short");

    let out = Command::new(&binaries().agent)
        .arg("local")
        .arg("--dir")
        .arg(&dir)
        .arg("--listen")
        .arg(SocketAddr::from(([127, 0, 0, 1], free_port())).to_string())
        .output()
        .expect("running fluidity local");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cut short") && err.contains("remove that folder"),
        "{err}"
    );

    std::fs::remove_dir_all(&dir).expect("removing the folder");
    let (mut p, _) = start_local(&dir, tmp.path(), &[]);
    p.kill();
}

/// Runs `fluidity local --dir DIR` expecting it to refuse the folder; returns its stderr.
fn local_refusing(dir: &std::path::Path) -> String {
    let mut cmd = Command::new(&binaries().agent);
    cmd.arg("local").arg("--dir").arg(dir);
    refusal(cmd)
}

/// Runs `cmd` (`fluidity local` with its folder) expecting a refusal; returns its stderr.
fn refusal(mut cmd: Command) -> String {
    let out = cmd
        .arg("--listen")
        .arg(SocketAddr::from(([127, 0, 0, 1], free_port())).to_string())
        .output()
        .expect("running fluidity local");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    err
}

/// A folder of the user's own certificates given to local mode is never replaced: not
/// when they near their end (their CA would be lost to every agent and server trusting
/// it), and one made for a server elsewhere is refused at start, not at every tunnel.
#[test]
fn local_mode_never_replaces_a_users_own_certificates() {
    let _wd = watchdog("local_users_certificates", Duration::from_secs(120));
    let tmp = tempfile::tempdir().expect("temp dir");
    let init = |dir: &std::path::Path, extra: &[&str]| {
        let out = Command::new(&binaries().agent)
            .args(["certs", "init", "--dir"])
            .arg(dir)
            .args(extra)
            .output()
            .expect("running certs init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        init_files(dir)
    };

    // A set for this machine (what `certs init` makes by default), near its end.
    let ending = tmp.path().join("ending");
    let before = init(&ending, &["--days", "20"]);
    let err = local_refusing(&ending);
    assert!(
        err.contains("local mode made none of them") && err.contains("certs init --dir"),
        "{err}"
    );
    assert_eq!(
        init_files(&ending),
        before,
        "local mode changed the user's files"
    );

    let elsewhere = tmp.path().join("elsewhere");
    let before = init(&elsewhere, &["--server-name", "vpn.example.com"]);
    // The CN (an IAM server's id by default) follows the first --server-name.
    let server_pem =
        std::fs::read_to_string(CertPaths::in_dir(&elsewhere).server_cert).expect("server.pem");
    let der = fluidity_runtime_smol::tls::certs_from_pem(&server_pem, "server.pem")
        .expect("a certificate");
    let names = fluidity_runtime_smol::tls::PeerIdentity::from_der(&der[0]).expect("names");
    assert_eq!(names.common_name.as_deref(), Some("vpn.example.com"));
    let err = local_refusing(&elsewhere);
    assert!(
        err.contains("not valid for 127.0.0.1") && err.contains("vpn.example.com"),
        "{err}"
    );
    assert_eq!(
        init_files(&elsewhere),
        before,
        "local mode changed the user's files"
    );

    // A set made for another server, near its end, in local mode's default folder:
    // refused too, before anything could renew it.
    let cache = tmp.path().join("cache");
    let default = cache.join("fluidity").join("local");
    let before = init(
        &default,
        &["--server-name", "vpn.example.com", "--days", "20"],
    );
    let mut cmd = Command::new(&binaries().agent);
    cmd.arg("local").env("XDG_CACHE_HOME", &cache);
    let err = refusal(cmd);
    assert!(
        err.contains("not valid for 127.0.0.1") && !err.contains("leave out --dir"),
        "{err}"
    );
    assert_eq!(
        init_files(&default),
        before,
        "local mode changed the user's files"
    );
    assert!(!default
        .join(fluidity_runtime_smol::pki::LOCAL_MARKER)
        .exists());
}

/// The contents of the six files of the certificate folder `dir`.
fn init_files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    CertPaths::in_dir(dir)
        .files()
        .iter()
        .map(|f| std::fs::read(f).expect("a certificate file"))
        .collect()
}
