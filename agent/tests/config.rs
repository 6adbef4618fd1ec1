//! The configuration as a user gets it: from a file, with documented defaults.

use std::io::Write;

use fluidity_agent::config::{AgentAuth, AgentConfig};

fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    (dir, path)
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let (dir, path) = file("");
    let cfg = AgentConfig::load(&path).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.server, "127.0.0.1:8443");
    assert_eq!(cfg.connect_timeout_secs, 10);
    assert_eq!(cfg.head_timeout_secs, 30);
    assert_eq!(cfg.auth, AgentAuth::None);
    assert!(cfg.proxy_username.is_none());
    // Certificate paths are relative to the file's folder.
    assert_eq!(cfg.cert, dir.path().join("client.pem"));
    assert_eq!(cfg.ca, dir.path().join("ca.pem"));
}

#[test]
fn keys_override_defaults_and_unknown_keys_are_errors() {
    let (_d, path) = file(
        "listen = \"127.0.0.1:9000\"\nserver = \"vpn.example.com:443\"\ncert = \"/abs/c.pem\"\nconnect_timeout_secs = 3\n",
    );
    let cfg = AgentConfig::load(&path).unwrap();
    assert_eq!(cfg.listen.port(), 9000);
    assert_eq!(cfg.server_host(), "vpn.example.com");
    for (server, host) in [
        ("[fe80::1%2]:8443", "fe80::1"),
        ("[2001:db8::1]:8443", "2001:db8::1"),
        ("192.0.2.1:8443", "192.0.2.1"),
    ] {
        let cfg = AgentConfig {
            server: server.into(),
            ..AgentConfig::default()
        };
        assert_eq!(cfg.server_host(), host, "{server}");
    }
    assert_eq!(cfg.cert, std::path::PathBuf::from("/abs/c.pem"));
    assert_eq!(cfg.connect_timeout_secs, 3);

    let (_d, path) = file("listen = \"localhost:9001\"\n");
    let cfg = AgentConfig::load(&path).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
    let (_d, path) = file("listen = \"proxy.example:9001\"\n");
    let err = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("localhost:PORT"), "{err}");

    let (_d, path) = file("listen_addr = \"127.0.0.1:9000\"\n");
    let err = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn help_documents_every_command() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidity"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["local", "certs", "--listen", "--server", "--proxy-username"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn iam_and_aws_settings_have_documented_defaults_and_are_read() {
    let (_d, path) = file("");
    let cfg = AgentConfig::load(&path).unwrap();
    assert_eq!(cfg.iam.timeout_secs, 30);
    assert!(cfg.iam.server_id.is_none());
    assert!(cfg.aws.region.is_none() && cfg.aws.iam_role_arn.is_none());
    assert!(cfg.aws.sts_endpoint.is_none() && cfg.aws.profile.is_none());

    let (_d, path) = file(
        "auth = \"iam\"\n[aws]\nregion = \"eu-west-1\"\nprofile = \"work\"\niam_role_arn = \"arn:aws:iam::123456789012:role/fluidity-agent\"\nsts_endpoint = \"https://sts.eu-west-1.amazonaws.com\"\n[iam]\nserver_id = \"srv\"\ntimeout_secs = 12\n",
    );
    let cfg = AgentConfig::load(&path).unwrap();
    assert_eq!(cfg.auth, AgentAuth::Iam);
    assert_eq!(cfg.aws.region.as_deref(), Some("eu-west-1"));
    assert_eq!(cfg.aws.profile.as_deref(), Some("work"));
    assert_eq!(
        cfg.aws.iam_role_arn.as_deref(),
        Some("arn:aws:iam::123456789012:role/fluidity-agent")
    );
    assert_eq!(cfg.iam.server_id.as_deref(), Some("srv"));
    assert_eq!(cfg.iam.timeout_secs, 12);
    let (_d, path) = file("[aws]\nrole_arn = \"x\"\n");
    assert!(
        AgentConfig::load(&path).is_err(),
        "a misspelt key must not be ignored"
    );
}

#[test]
fn help_documents_the_iam_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidity"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--auth",
        "--region",
        "--iam-role-arn",
        "--sts-endpoint",
        "--iam-server-id",
        "--auth-timeout-secs",
    ] {
        assert!(help.contains(word), "run --help lacks {word}:\n{help}");
    }
}
