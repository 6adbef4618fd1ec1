//! The crate's error type.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// Everything that can go wrong in this crate.
///
/// New variants are added as the crate grows, so match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}{}", permission_hint(.source))]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}{}", permission_hint(.source))]
    WriteFile {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// PEM or certificate contents were not what was expected.
    ///
    /// `origin` names the file, or says which in-memory input it was.
    #[error("{origin}: {problem}")]
    BadPem {
        /// The file path or a description of the input.
        origin: String,
        /// What is wrong with it.
        problem: String,
    },

    /// Generating or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    CertGeneration(#[from] rcgen::Error),

    /// Certificate parameters supplied by the caller are unusable (empty name, zero validity, ...).
    #[error("invalid certificate parameters: {0}")]
    InvalidCertParams(String),

    /// A certificate signing request was malformed or asked for something unsupported.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),

    /// `certs init` found files that it would overwrite.
    #[error(
        "refusing to overwrite existing {}; pass --force to replace them",
        list_paths(.paths)
    )]
    WouldOverwrite {
        /// The files that already exist.
        paths: Vec<PathBuf>,
    },

    /// A certificate directory holds some of the expected files but not all of them.
    #[error(
        "certificate directory {dir} is incomplete (missing {}); \
         run `fluidity certs init --force --dir {dir}` to recreate it",
        list_paths(.missing)
    )]
    IncompleteCertDir {
        /// The directory.
        dir: PathBuf,
        /// The files that are missing.
        missing: Vec<PathBuf>,
    },

    /// Local mode's certificates are near their end in a folder it did not fill, which it
    /// does not replace.
    #[error(
        "the certificates in {dir} end on {ends}, and local mode made none of them (the \
         folder has no {marker}), so it does not replace them: renew them with `fluidity \
         certs init --dir {dir} --force` (which makes a new CA too: give it to every agent \
         and server that trusts this one), or give local mode a folder of its own (--dir)",
        dir = dir.display(),
        marker = crate::pki::LOCAL_MARKER
    )]
    NotLocalDir {
        /// The folder.
        dir: PathBuf,
        /// The earliest end of its certificates, as a date.
        ends: String,
    },

    /// A folder for keys belongs to another user, or every user may write to it: what
    /// they put there (a CA of their own) would be trusted.
    #[error("{} {why}; keys and certificates are kept only in a folder of your own that others cannot write to ({fix})", .path.display())]
    UnsafeFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
        /// What to do.
        fix: &'static str,
    },

    /// A path given as a folder is something else (a file).
    #[error("{} is not a folder; give a folder's path (it is created if missing)", .0.display())]
    NotAFolder(PathBuf),

    /// A private key does not belong to the certificate it was paired with.
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },

    /// A TLS configuration or protocol error from rustls.
    ///
    /// A peer rejected by a [`crate::tls::PeerCheck`] during the handshake is reported
    /// as [`Error::PeerIdentity`] instead.
    #[error("TLS: {0}")]
    Tls(rustls::Error),

    /// The set of trusted CA certificates could not be turned into a verifier.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    /// The name or address to connect to is not a valid TLS server name.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),

    /// An operation that needs a finished handshake was called too early.
    #[error("the TLS handshake has not finished")]
    HandshakeIncomplete,

    /// The peer did not negotiate the Fluidity ALPN protocol.
    #[error("peer did not negotiate ALPN protocol \"fluidity/1\" (got {})", alpn_display(.got))]
    AlpnMismatch {
        /// What the peer negotiated, if anything.
        got: Option<Vec<u8>>,
    },

    /// The peer presented no certificate.
    #[error("{peer} presented no certificate")]
    NoPeerCertificate {
        /// Which side the peer is.
        peer: PeerRole,
    },

    /// The peer's certificate is valid but names the wrong identity.
    #[error("{peer} certificate rejected: {source}")]
    PeerIdentity {
        /// Which side the peer is.
        peer: PeerRole,
        /// What did not match.
        #[source]
        source: IdentityError,
    },

    /// A socket operation failed.
    #[error("network: {0}")]
    Io(#[source] std::io::Error),

    /// Something took longer than its deadline; the text says what.
    #[error("{0} timed out")]
    Timeout(&'static str),

    /// The tunnel connection refused the call or was lost.
    #[error("tunnel: {0}")]
    Tunnel(#[source] fluidity_proto::Error),

    /// The server refused to open the stream.
    #[error("stream refused: {0}")]
    Refused(fluidity_proto::OpenRefusal),

    /// The peer reset the stream.
    #[error("stream reset by the peer ({0})")]
    StreamReset(fluidity_proto::ErrorCode),
}

impl Error {
    /// Whether a file was refused to this process for lack of permission, so that making
    /// new certificates is the wrong advice: the message already says to check the
    /// file's owner and mode.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Error::ReadFile { source, .. } | Error::WriteFile { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied)
    }
}

impl From<Error> for std::io::Error {
    /// Deliberate, as in quinn: tunnel errors surface through `AsyncRead`/`AsyncWrite`.
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            Error::Io(io) => io.kind(),
            Error::Timeout(_) => ErrorKind::TimedOut,
            Error::Refused(_) => ErrorKind::ConnectionRefused,
            Error::StreamReset(_) => ErrorKind::ConnectionReset,
            Error::Tunnel(_) => ErrorKind::ConnectionAborted,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

impl From<rustls::Error> for Error {
    /// Unwraps identity rejections that our verifiers passed through rustls, so callers
    /// see `Error::PeerIdentity` with its clear message rather than rustls's debug text.
    fn from(err: rustls::Error) -> Self {
        if let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = &err {
            if let Some(Error::PeerIdentity { peer, source }) = other.0.downcast_ref::<Error>() {
                return Error::PeerIdentity {
                    peer: *peer,
                    source: source.clone(),
                };
            }
        }
        Error::Tls(err)
    }
}

/// Which end of a TLS connection a peer is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The tunnel server.
    Server,
    /// The agent, as seen by the server.
    Client,
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerRole::Server => "server",
            PeerRole::Client => "client",
        })
    }
}

/// Why a certificate's names did not satisfy a [`crate::tls::PeerCheck`].
///
/// This is the detail carried by [`Error::PeerIdentity`], not a second error type
/// for callers to handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate's common name differs from the expected one.
    #[error("CN is {found:?}, expected {expected:?}")]
    CommonNameMismatch {
        /// The CN in the certificate.
        found: String,
        /// The CN that was required.
        expected: String,
    },
    /// The certificate has no common name but one was required.
    #[error("certificate has no CN, expected {expected:?}")]
    CommonNameMissing {
        /// The CN that was required.
        expected: String,
    },
    /// The peer's address is not among the certificate's IP SANs.
    #[error("address {address} is not in its IP SANs {}", ips_display(.sans))]
    AddressNotInSan {
        /// The peer's address.
        address: IpAddr,
        /// The IP SANs the certificate does carry.
        sans: Vec<IpAddr>,
    },
    /// The certificate could not be parsed for its names.
    #[error("cannot parse certificate names: {0}")]
    Unparsable(String),
}

/// The advice for a file that exists but is not this process's to read or write.
fn permission_hint(source: &std::io::Error) -> String {
    if source.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    format!(
        " (this process runs as uid {}: check the owner and mode of the file and of the \
         folders above it, or run as the user the file belongs to)",
        rustix::process::getuid().as_raw()
    )
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ips_display(ips: &[IpAddr]) -> String {
    let inner = ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!("[{inner}]")
}

fn alpn_display(got: &Option<Vec<u8>>) -> String {
    match got {
        None => "none".to_owned(),
        Some(p) => format!("{:?}", String::from_utf8_lossy(p)),
    }
}
