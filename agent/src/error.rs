//! The agent's error type.

use std::io;
use std::net::SocketAddr;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket or stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A proxy client sent nothing, or only part of a request, within the head timeout.
    #[error("the client sent no complete request within {0:?}")]
    ClientTimeout(std::time::Duration),
    /// What the client's connection carried failed mid-stream (the origin or the tunnel
    /// broke off, or the client went away); the connection is reset, so that the client
    /// sees a failure rather than a clean end of what it received.
    #[error("the relayed connection broke off: {0}")]
    Aborted(String),
    /// A proxy client broke HTTP/1.1 or SOCKS5; it has been answered and disconnected.
    #[error("proxy client protocol error: {0}")]
    ClientProtocol(String),
    /// The proxy would listen on a non-loopback address without credentials.
    #[error(
        "refusing to listen on {0} without proxy credentials: anyone who can reach that \
         address could use the tunnel; set a proxy username and password, or listen on 127.0.0.1"
    )]
    UnauthenticatedListener(SocketAddr),
    /// The configuration is unusable; the text says what to fix.
    #[error("{0}")]
    Config(String),
    /// Certificates or TLS setup failed.
    #[error("{0}")]
    Tls(#[from] fluidity_runtime_smol::Error),
    /// Local mode's own certificate folder is unusable.
    #[error(
        "the local-mode certificates in {}: {source}; remove that folder (or give --dir \
         another) and new ones are made",
        dir.display()
    )]
    LocalCertificates {
        /// The folder.
        dir: std::path::PathBuf,
        /// What is wrong in it.
        #[source]
        source: fluidity_runtime_smol::Error,
    },
    /// The configured certificate files could not be loaded.
    #[error("{what}: {source}{}", certificates_advice(.source))]
    Certificates {
        /// Which files, and the settings that name them.
        what: &'static str,
        /// Why they could not be loaded.
        #[source]
        source: fluidity_runtime_smol::Error,
    },
    /// A listener could not be bound.
    #[error(
        "cannot listen on {addr}: {source}{}",
        fluidity_runtime_smol::listener::bind_hint(source)
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// AWS mode could not bring the server up or reach it (Wake, Query, the certificate,
    /// the connection); the text says which step and why.
    #[error("{0}")]
    Lifecycle(String),
    /// The local server failed to start.
    #[error("local server: {0}")]
    Server(#[from] fluidity_server::Error),
}

/// Result with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about certificate files that could not be loaded: make new ones, unless they
/// are there but this process may not read them (the message says so already).
fn certificates_advice(source: &fluidity_runtime_smol::Error) -> &'static str {
    if source.is_permission_denied() {
        ""
    } else {
        "; `fluidity certs init --dir DIR` creates a CA and certificates, or `fluidity local` \
         runs everything on this machine with its own"
    }
}
