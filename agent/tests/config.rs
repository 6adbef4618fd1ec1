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
    assert_eq!(cfg.cert, std::path::PathBuf::from("/abs/c.pem"));
    assert_eq!(cfg.connect_timeout_secs, 3);

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
