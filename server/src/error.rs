//! The crate's error type.

use std::io;

/// Everything that can go wrong in the server outside of a single stream's open (those are
/// answered with a [`fluidity_proto::OpenRefusal`] instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CIDR block in the egress policy could not be parsed.
    #[error("invalid CIDR block {input:?}: {why}")]
    InvalidCidr {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A host pattern in the egress policy could not be parsed.
    #[error("invalid host pattern {input:?}: {why}")]
    InvalidHostPattern {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A port or port range in the egress policy could not be parsed.
    #[error("invalid port rule {input:?}: {why}")]
    InvalidPortRule {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An egress rule given on the command line could not be parsed.
    #[error("invalid egress rule {input:?}: {why}")]
    InvalidEgressRule {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// A socket operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The configuration is unusable; the text says what to fix.
    #[error("{0}")]
    Config(String),
    /// Loading certificates or building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] fluidity_runtime_smol::Error),
    /// The configured certificate files could not be loaded.
    #[error("{what}: {source}{}", certificates_advice(.source))]
    Certificates {
        /// Which files, and the settings that name them.
        what: &'static str,
        /// Why they could not be loaded.
        #[source]
        source: fluidity_runtime_smol::Error,
    },
    /// AWS-mode start-up failed (discovery, the agent's address, the certificate); the
    /// text says which step and why.
    #[error("AWS mode: {0}")]
    AwsStartup(String),
    /// An AWS call failed.
    #[error("AWS: {0}")]
    Aws(#[from] fluidity_aws::Error),
    /// A listener could not be bound.
    #[error(
        "cannot listen on {addr}: {source}{}",
        fluidity_runtime_smol::listener::bind_hint(source)
    )]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
}

/// What to do about certificate files that could not be loaded: make new ones, unless they
/// are there but this process may not read them (the message says so already).
fn certificates_advice(source: &fluidity_runtime_smol::Error) -> &'static str {
    if source.is_permission_denied() {
        ""
    } else {
        "; `fluidity certs init --dir DIR` creates a CA and certificates (server.pem, \
         server-key.pem, ca.pem)"
    }
}
