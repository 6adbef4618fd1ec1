//! The configuration as a user gets it: from a file, with documented defaults.

use std::io::Write;

use fluidity_server::config::AuthMode;
use fluidity_server::ServerConfig;

fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    (dir, path)
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let (dir, path) = file("");
    let cfg = ServerConfig::load(&path).unwrap();
    assert_eq!(cfg.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(cfg.health_listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(cfg.max_tunnels, 64);
    assert_eq!(cfg.max_streams, 256);
    assert_eq!(cfg.connect_timeout_secs, 10);
    assert_eq!(cfg.auth, AuthMode::Mtls);
    assert!(!cfg.egress.allow_private);
    assert_eq!(cfg.client_ca, dir.path().join("ca.pem"));
}

#[test]
fn egress_rules_and_overrides_are_read() {
    let (_d, path) = file(
        "max_tunnels = 2\nauth = \"iam\"\nhealth_listen = \"localhost:9090\"\n[egress]\nallow_cidrs = [\"127.0.0.1/32\"]\nallow_ports = [80, \"8000-8100\"]\n",
    );
    let cfg = ServerConfig::load(&path).unwrap();
    assert_eq!(cfg.max_tunnels, 2);
    assert_eq!(cfg.auth, AuthMode::Iam);
    assert_eq!(cfg.health_listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(cfg.egress.allow_cidrs.len(), 1);
    assert_eq!(cfg.egress.allow_ports.len(), 2);
    let (_d, path) = file("[egress]\nallow_cidr = [\"127.0.0.1/32\"]\n");
    assert!(
        ServerConfig::load(&path).is_err(),
        "a misspelt key must not be ignored"
    );
}

#[test]
fn help_documents_the_settings() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidity-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--listen", "--cert", "--client-ca", "--egress", "--auth"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn iam_settings_have_documented_defaults_and_are_read() {
    let (_d, path) = file("");
    let iam = ServerConfig::load(&path).unwrap().iam;
    assert!(iam.allowed_principals.is_empty());
    assert_eq!(iam.time_window_secs, 300);
    assert_eq!(iam.sts_timeout_secs, 5);
    assert_eq!(iam.session_secs, 3600);
    assert_eq!(iam.max_failures, 10);
    assert_eq!(iam.failure_window_secs, 60);
    assert!(iam.sts_endpoint.is_none() && iam.region.is_none() && iam.server_id.is_none());

    let (_d, path) = file(
        "auth = \"iam\"\n[iam]\nallowed_principals = [\"account:123456789012\", \"arn:aws:iam::123456789012:role/fluidity-*\"]\nsts_endpoint = \"https://sts.eu-west-1.amazonaws.com\"\nregion = \"eu-west-1\"\nserver_id = \"srv\"\ntime_window_secs = 120\nsts_timeout_secs = 3\nsession_secs = 0\n",
    );
    let cfg = ServerConfig::load(&path).unwrap();
    assert_eq!(cfg.auth, AuthMode::Iam);
    assert_eq!(cfg.iam.allowed_principals.len(), 2);
    assert_eq!(cfg.iam.server_id.as_deref(), Some("srv"));
    assert_eq!(cfg.iam.time_window_secs, 120);
    assert_eq!(cfg.iam.session_secs, 0);
    let (_d, path) = file("[iam]\nallowed_principal = [\"account:123456789012\"]\n");
    assert!(
        ServerConfig::load(&path).is_err(),
        "a misspelt [iam] key must not be ignored"
    );
}

#[test]
fn iam_without_an_allow_list_refuses_to_start_and_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let certs = fluidity_runtime_smol::pki::init_dir(
        &dir.path().join("certs"),
        &fluidity_runtime_smol::pki::CertInitOptions::default(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidity-server"))
        .args([
            "--auth",
            "iam",
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(&certs.server_cert)
        .arg("--key")
        .arg(&certs.server_key)
        .arg("--client-ca")
        .arg(&certs.ca_cert)
        .env("AWS_REGION", "eu-west-1")
        .env_remove("FLUIDITY_SERVER_IAM_ALLOW")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allowed_principals"), "{err}");
}

#[test]
fn help_documents_the_iam_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidity-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--iam-allow",
        "--iam-server-id",
        "--sts-endpoint",
        "--region",
        "FLUIDITY_SERVER_IAM_ALLOW",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}
