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
        "max_tunnels = 2\nauth = \"iam\"\n[egress]\nallow_cidrs = [\"127.0.0.1/32\"]\nallow_ports = [80, \"8000-8100\"]\n",
    );
    let cfg = ServerConfig::load(&path).unwrap();
    assert_eq!(cfg.max_tunnels, 2);
    assert_eq!(cfg.auth, AuthMode::Iam);
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
