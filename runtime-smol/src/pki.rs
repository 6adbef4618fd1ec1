//! Fluidity's private PKI: CA and certificate generation, CSRs, and local certificate
//! directories.
//!
//! Every certificate is X.509 v3 with extensions (rustls rejects v1) and an ECDSA P-256
//! key. Keys are written as PKCS#8 PEM (`PRIVATE KEY`), the one form that both rcgen
//! (for the CA key) and rustls (for TLS identities) read back; a round trip through
//! these functions is tested so the two can never disagree.
//!
//! Usage is decided by the issuer, never by the requester: [`sign_csr`] copies only the
//! CN and the DNS/IP SANs out of a CSR and sets key usage, extended key usage and basic
//! constraints itself, so a CSR cannot obtain a CA certificate or a dual-use one.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use crate::tls::{self, PeerIdentity};
use crate::Error;

/// Certificates are renewed when they expire within this time.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Default validity of certificates made by [`init_dir`], in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// Largest PEM input accepted, from a file or from the network (a CSR).
///
/// Fluidity's certificates, keys and CSRs are well under 2 KiB; the limit only stops a
/// wrong file or a hostile request from being read into memory whole.
pub const MAX_PEM_LEN: usize = 64 * 1024;

/// Longest common name accepted. ARNs exceed X.509's suggested 64 characters, so the
/// limit is only a sanity bound.
const MAX_CN_LEN: usize = 1024;

/// Certificates start to be valid a little in the past so that a peer whose clock is
/// slightly behind does not reject a freshly issued certificate.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// One subject alternative name: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanEntry {
    /// A DNS name, such as `localhost`.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

impl FromStr for SanEntry {
    type Err = Error;

    /// Parses an IP address, or else a DNS name (ASCII letters, digits, `-`, `.`, `*`).
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(SanEntry::Ip(ip));
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*'));
        if !valid {
            return Err(Error::InvalidCertParams(format!(
                "{s:?} is neither an IP address nor a DNS name"
            )));
        }
        Ok(SanEntry::Dns(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for SanEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanEntry::Dns(name) => f.write_str(name),
            SanEntry::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl SanEntry {
    fn to_san_type(&self) -> Result<SanType, Error> {
        Ok(match self {
            SanEntry::Dns(name) => SanType::DnsName(Ia5String::try_from(name.as_str())?),
            SanEntry::Ip(ip) => SanType::IpAddress(*ip),
        })
    }
}

/// What an issued certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUsage {
    /// TLS client authentication (the agent).
    Client,
    /// TLS server authentication (the tunnel server).
    Server,
}

impl CertUsage {
    fn eku(self) -> ExtendedKeyUsagePurpose {
        match self {
            CertUsage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            CertUsage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }
    }
}

/// A CA certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CaBundle {
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

impl CaBundle {
    /// Builds a bundle from PEM text, checking that the certificate is a CA and that the
    /// key belongs to it.
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Self, Error> {
        Self::checked(cert_pem, key_pem, "CA certificate", "CA key")
    }

    /// Loads a bundle from a certificate file and a key file, with the checks of
    /// [`CaBundle::from_pem`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let cert_pem = read_pem_file(cert_path)?;
        let key_pem = read_pem_file(key_path)?;
        Self::checked(
            cert_pem,
            key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn checked(
        cert_pem: String,
        key_pem: String,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, Error> {
        let der = single_cert(&cert_pem, cert_origin)?;
        let cert = parse_x509(&der, cert_origin)?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(Error::BadPem {
                origin: cert_origin.to_owned(),
                problem: "certificate is not a CA certificate (basicConstraints CA:false)".into(),
            });
        }
        check_key_matches(&cert, &key_pem, cert_origin, key_origin)?;
        Ok(CaBundle { cert_pem, key_pem })
    }

    /// The CA certificate, PEM: what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, Error> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }
}

/// An issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKeyPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A certificate signing request and the private key it was made with, both PEM.
#[derive(Clone)]
pub struct CsrPem {
    /// The CSR, PEM (`CERTIFICATE REQUEST`), to send to the CA.
    pub csr_pem: String,
    /// The private key, PKCS#8 PEM. Secret; stays with the requester.
    pub key_pem: String,
}

impl fmt::Debug for CsrPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsrPem")
            .field("csr_pem", &self.csr_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// Generates a self-signed CA: key usage keyCertSign and cRLSign, basicConstraints
/// CA:true with path length 0 (it signs leaf certificates only).
pub fn generate_ca(cn: &str, validity: Duration) -> Result<CaBundle, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(cn)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, validity)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a server certificate (extended key usage serverAuth) for `names`.
pub fn issue_server(
    ca: &CaBundle,
    names: &[SanEntry],
    cn: &str,
    validity: Duration,
) -> Result<CertifiedKeyPem, Error> {
    let sans = names
        .iter()
        .map(SanEntry::to_san_type)
        .collect::<Result<Vec<_>, _>>()?;
    issue(ca, cn, sans, CertUsage::Server, validity)
}

/// Issues a client certificate (extended key usage clientAuth) with the given IP SANs.
pub fn issue_client(
    ca: &CaBundle,
    cn: &str,
    ip_sans: &[IpAddr],
    validity: Duration,
) -> Result<CertifiedKeyPem, Error> {
    let sans = ip_sans.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    issue(ca, cn, sans, CertUsage::Client, validity)
}

fn issue(
    ca: &CaBundle,
    cn: &str,
    sans: Vec<SanType>,
    usage: CertUsage,
    validity: Duration,
) -> Result<CertifiedKeyPem, Error> {
    let params = leaf_params(cn, sans, usage, validity)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer()?)?;
    Ok(CertifiedKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    usage: CertUsage,
    validity: Duration,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(cn)?;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage.eku()];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, validity)?;
    Ok(params)
}

/// Creates a new key and a CSR for it with the given CN and IP SANs.
///
/// The CSR asks for no usage: the CA decides that (see [`sign_csr`]).
pub fn create_csr(cn: &str, ip_sans: &[IpAddr]) -> Result<CsrPem, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(cn)?;
    params.subject_alt_names = ip_sans.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok(CsrPem {
        csr_pem: csr.pem()?,
        key_pem: key.serialize_pem(),
    })
}

/// Parses a CSR, verifies its self-signature, and returns its CN and SANs, so that a CA
/// can apply its naming policy before calling [`sign_csr`].
///
/// Rejects input over [`MAX_PEM_LEN`] and SAN types other than DNS and IP.
pub fn csr_names(csr_pem: &str) -> Result<PeerIdentity, Error> {
    let req = parse_csr(csr_pem)?;
    names_of_request(&req.params)
}

/// Signs a CSR with the CA for `usage`.
///
/// Only the CN and the DNS/IP SANs are taken from the request; everything else (key
/// usage, extended key usage, CA flag, validity, serial) is set here. Naming policy
/// (which CN and SANs are acceptable) is the caller's: check [`csr_names`] first.
pub fn sign_csr(
    ca: &CaBundle,
    csr_pem: &str,
    usage: CertUsage,
    validity: Duration,
) -> Result<String, Error> {
    let req = parse_csr(csr_pem)?;
    let names = names_of_request(&req.params)?;
    let cn = names
        .common_name
        .as_deref()
        .ok_or_else(|| Error::InvalidCsr("the request has no CN".into()))?;
    let mut sans = Vec::with_capacity(names.dns_sans.len() + names.ip_sans.len());
    for dns in &names.dns_sans {
        sans.push(SanType::DnsName(Ia5String::try_from(dns.as_str())?));
    }
    sans.extend(names.ip_sans.iter().map(|ip| SanType::IpAddress(*ip)));
    let params = leaf_params(cn, sans, usage, validity)?;
    let cert = params.signed_by(&req.public_key, &ca.issuer()?)?;
    Ok(cert.pem())
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, Error> {
    if csr_pem.len() > MAX_PEM_LEN {
        return Err(Error::InvalidCsr(format!(
            "{} bytes, more than the {MAX_PEM_LEN}-byte limit",
            csr_pem.len()
        )));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| Error::InvalidCsr(e.to_string()))
}

fn names_of_request(params: &CertificateParams) -> Result<PeerIdentity, Error> {
    let common_name = match params.distinguished_name.get(&DnType::CommonName) {
        None => None,
        Some(value) => Some(dn_value_string(value).ok_or_else(|| {
            Error::InvalidCsr("the CN is not a UTF-8, printable or IA5 string".into())
        })?),
    };
    let mut identity = PeerIdentity {
        common_name,
        ip_sans: Vec::new(),
        dns_sans: Vec::new(),
    };
    for san in &params.subject_alt_names {
        match san {
            SanType::IpAddress(ip) => identity.ip_sans.push(*ip),
            SanType::DnsName(name) => identity.dns_sans.push(name.as_str().to_owned()),
            other => {
                return Err(Error::InvalidCsr(format!(
                    "unsupported subject alternative name {other:?}; only DNS names and IP addresses are allowed"
                )))
            }
        }
    }
    Ok(identity)
}

fn dn_value_string(value: &DnValue) -> Option<String> {
    match value {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// When a PEM certificate stops being valid (its notAfter), for renewal decisions.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, Error> {
    Ok(validity_period(cert_pem)?.1)
}

/// When a PEM certificate starts and stops being valid (notBefore, notAfter).
pub fn validity_period(cert_pem: &str) -> Result<(SystemTime, SystemTime), Error> {
    let der = single_cert(cert_pem, "certificate")?;
    let cert = parse_x509(&der, "certificate")?;
    let secs = cert.validity().not_before.timestamp();
    let not_before = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((not_before, cert_not_after(&cert)))
}

/// How long before its end a certificate in use is reported as expiring.
pub const EXPIRY_NOTICE: Duration = Duration::from_secs(14 * 24 * 3600);

/// What is wrong with the validity period of the certificate `der` at `now`, for the
/// user, to follow "certificate FILE": expired, not valid yet, or ending within
/// [`EXPIRY_NOTICE`]. `None` when it is fine, or cannot be parsed (loading it reports
/// that).
pub fn validity_problem(der: &CertificateDer<'_>, now: SystemTime) -> Option<String> {
    validity_check(der, now, EXPIRY_NOTICE)
}

/// What [`validity_problem`] says when the certificate `der` is outside its validity
/// period at `now` (expired, or not valid yet); `None` within it, however soon it ends.
pub fn outside_validity(der: &CertificateDer<'_>, now: SystemTime) -> Option<String> {
    validity_check(der, now, Duration::ZERO)
}

fn validity_check(der: &CertificateDer<'_>, now: SystemTime, notice: Duration) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = cert.validity();
    let days = |d: Duration| d.as_secs().div_ceil(24 * 3600);
    let not_after = cert_not_after(&cert);
    let not_before = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
    if let Ok(ago) = now.duration_since(not_after) {
        return Some(format!(
            "expired on {} ({} days ago): peers refuse it; issue a new one ({REISSUE})",
            validity.not_after,
            days(ago)
        ));
    }
    if let Ok(ahead) = not_before.duration_since(now) {
        return Some(format!(
            "is not valid until {} ({} from now by this machine's clock): peers with \
             the right time refuse it until then; check this machine's clock",
            validity.not_before,
            span(ahead)
        ));
    }
    let left = not_after.duration_since(now).unwrap_or_default();
    (left < notice).then(|| {
        format!(
            "expires on {} (in {} days); issue a new one before then ({REISSUE})",
            validity.not_after,
            days(left)
        )
    })
}

/// How to replace a certificate, for [`validity_problem`]'s messages.
const REISSUE: &str = "`fluidity certs init --dir DIR --force` remakes the set it made in DIR, \
     with a new CA that every agent and server must then be given; `fluidity local` renews \
     its own";

/// `d` in the largest unit that keeps it readable: seconds, minutes, hours or days.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7_200 => format!("{} min", s / 60),
        7_200..172_800 => format!("{} h", s / 3_600),
        _ => format!("{} days", s / 86_400),
    }
}

fn cert_not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    // A notAfter before 1970 means "already expired"; the epoch says so just as well.
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Options for [`init_dir`] (`fluidity certs init`) and [`ensure_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInitOptions {
    /// Common name of the CA.
    pub ca_cn: String,
    /// Common name of the server certificate.
    pub server_cn: String,
    /// SANs of the server certificate.
    pub server_names: Vec<SanEntry>,
    /// Common name of the client (agent) certificate.
    pub client_cn: String,
    /// IP SANs of the client certificate, so a server can check the agent's address.
    pub client_ips: Vec<IpAddr>,
    /// Validity of every certificate, in days.
    pub validity_days: u32,
    /// Replace existing files instead of refusing.
    pub force: bool,
}

impl Default for CertInitOptions {
    /// Loopback names: server `localhost`, `127.0.0.1`, `::1`; client `127.0.0.1`, `::1`;
    /// one year of validity; no overwriting.
    fn default() -> Self {
        CertInitOptions {
            ca_cn: "Fluidity local CA".into(),
            server_cn: "localhost".into(),
            server_names: vec![
                SanEntry::Dns("localhost".into()),
                SanEntry::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanEntry::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
            client_cn: "fluidity-agent".into(),
            client_ips: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            validity_days: DEFAULT_VALIDITY_DAYS,
            force: false,
        }
    }
}

impl CertInitOptions {
    fn validity(&self) -> Duration {
        Duration::from_secs(u64::from(self.validity_days) * 24 * 60 * 60)
    }
}

/// The files of a certificate directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The directory.
    pub dir: PathBuf,
    /// `ca.pem`
    pub ca_cert: PathBuf,
    /// `ca-key.pem`
    pub ca_key: PathBuf,
    /// `server.pem`
    pub server_cert: PathBuf,
    /// `server-key.pem`
    pub server_key: PathBuf,
    /// `client.pem`
    pub client_cert: PathBuf,
    /// `client-key.pem`
    pub client_key: PathBuf,
}

impl CertPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// The six files, CA first.
    pub fn files(&self) -> [&PathBuf; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// Creates a CA, a server certificate and a client certificate in `dir`
/// (`fluidity certs init --dir DIR`).
///
/// Writes `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `client.pem` and
/// `client-key.pem`; keys are created with mode 0600. Without `force`, refuses (before
/// writing anything) if any of these files exists.
pub fn init_dir(dir: &Path, opts: &CertInitOptions) -> Result<CertPaths, Error> {
    let paths = CertPaths::in_dir(dir);
    if !opts.force {
        let existing: Vec<PathBuf> = paths
            .files()
            .into_iter()
            .filter(|p| p.exists())
            .cloned()
            .collect();
        if !existing.is_empty() {
            return Err(Error::WouldOverwrite { paths: existing });
        }
    }

    let validity = opts.validity();
    let ca = generate_ca(&opts.ca_cn, validity)?;
    let server = issue_server(&ca, &opts.server_names, &opts.server_cn, validity)?;
    let client = issue_client(&ca, &opts.client_cn, &opts.client_ips, validity)?;
    // Only now, with the options found good: a refused one leaves no empty folder behind.
    create_private_dir(dir)?;

    // Keys first: a certificate without its key is useless, but a key written before a
    // failure is harmless and replaced on the next run.
    write_atomic(&paths.ca_key, ca.key_pem.as_bytes(), KEY_MODE)?;
    write_atomic(&paths.server_key, server.key_pem.as_bytes(), KEY_MODE)?;
    write_atomic(&paths.client_key, client.key_pem.as_bytes(), KEY_MODE)?;
    write_atomic(&paths.ca_cert, ca.cert_pem.as_bytes(), CERT_MODE)?;
    write_atomic(&paths.server_cert, server.cert_pem.as_bytes(), CERT_MODE)?;
    write_atomic(&paths.client_cert, client.cert_pem.as_bytes(), CERT_MODE)?;

    tracing::info!(
        dir = %dir.display(),
        server_cn = %opts.server_cn,
        client_cn = %opts.client_cn,
        validity_days = opts.validity_days,
        "created certificate directory"
    );
    Ok(paths)
}

/// What [`ensure_dir`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureOutcome {
    /// The directory had no certificates; a new set was created.
    Created,
    /// A certificate was expiring within [`RENEW_BEFORE`]; the whole set was replaced.
    Renewed,
    /// The existing certificates are valid and were kept.
    Kept,
}

/// The file that marks a certificate folder as local mode's own: [`ensure_dir`] writes it
/// beside the sets it makes, and replaces no set without it.
pub const LOCAL_MARKER: &str = "made-by-fluidity-local.txt";

/// Marks `dir` as local mode's own ([`LOCAL_MARKER`]), so that [`ensure_dir`] renews its
/// certificates when they near their end.
pub fn mark_local_dir(dir: &Path) -> Result<(), Error> {
    write_atomic(
        &dir.join(LOCAL_MARKER),
        b"`fluidity local` made the certificates in this folder and replaces them (a new CA \
          with them) when they near their end. In a folder given to it with --dir, deleting \
          this file keeps it from doing so; its default folder is always its own.\n",
        CERT_MODE,
    )
}

/// Whether `dir` is marked as local mode's own ([`mark_local_dir`]).
pub fn is_local_dir(dir: &Path) -> bool {
    dir.join(LOCAL_MARKER).is_file()
}

/// Makes sure `dir` holds a usable certificate set: creates one if none of the files
/// exist; otherwise loads and checks them (parsable, keys match, leaves signed by the
/// CA) and replaces the whole set if any certificate expires within [`RENEW_BEFORE`] and
/// the folder is local mode's own ([`LOCAL_MARKER`], written beside a set it creates).
///
/// A directory holding only some of the files, files that fail the checks, or a set near
/// its end that local mode did not make, is an error rather than being overwritten, so a
/// user's own certificates (and CA) are never lost. `opts.force` is ignored.
pub fn ensure_dir(dir: &Path, opts: &CertInitOptions) -> Result<(CertPaths, EnsureOutcome), Error> {
    let paths = CertPaths::in_dir(dir);
    let missing: Vec<PathBuf> = paths
        .files()
        .into_iter()
        .filter(|p| !p.exists())
        .cloned()
        .collect();
    let no_force = CertInitOptions {
        force: false,
        ..opts.clone()
    };
    if missing.len() == paths.files().len() {
        let paths = init_dir(dir, &no_force)?;
        mark_local_dir(dir)?;
        return Ok((paths, EnsureOutcome::Created));
    }
    if !missing.is_empty() {
        return Err(Error::IncompleteCertDir {
            dir: dir.to_path_buf(),
            missing,
        });
    }

    check_private_dir(dir)?;
    let expires = check_dir(&paths)?;
    let renew_at = expires.checked_sub(RENEW_BEFORE).unwrap_or(UNIX_EPOCH);
    if SystemTime::now() < renew_at {
        return Ok((paths, EnsureOutcome::Kept));
    }
    if !is_local_dir(dir) {
        return Err(Error::NotLocalDir {
            dir: dir.to_path_buf(),
            ends: time::OffsetDateTime::from(expires).date().to_string(),
        });
    }
    tracing::info!(dir = %dir.display(), "certificates expire within 30 days; renewing");
    let force = CertInitOptions {
        force: true,
        ..opts.clone()
    };
    Ok((init_dir(dir, &force)?, EnsureOutcome::Renewed))
}

/// Checks a complete certificate directory and returns the earliest notAfter.
fn check_dir(paths: &CertPaths) -> Result<SystemTime, Error> {
    let ca = CaBundle::load(&paths.ca_cert, &paths.ca_key)?;
    let ca_origin = paths.ca_cert.display().to_string();
    let ca_der = single_cert(&ca.cert_pem, &ca_origin)?;
    let ca_cert = parse_x509(&ca_der, &ca_origin)?;
    let mut earliest = cert_not_after(&ca_cert);

    for (cert_path, key_path) in [
        (&paths.server_cert, &paths.server_key),
        (&paths.client_cert, &paths.client_key),
    ] {
        let origin = cert_path.display().to_string();
        let der = single_cert(&read_pem_file(cert_path)?, &origin)?;
        let cert = parse_x509(&der, &origin)?;
        cert.verify_signature(Some(ca_cert.public_key()))
            .map_err(|_| Error::BadPem {
                origin: origin.clone(),
                problem: format!("certificate is not signed by the CA in {ca_origin}"),
            })?;
        check_key_matches(
            &cert,
            &read_pem_file(key_path)?,
            &origin,
            &key_path.display().to_string(),
        )?;
        earliest = earliest.min(cert_not_after(&cert));
    }
    Ok(earliest)
}

/// Reads a PEM file of at most [`MAX_PEM_LEN`] bytes.
pub fn read_pem_file(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let Some(buf) = crate::files::read_limited(path, MAX_PEM_LEN as u64).map_err(read_err)? else {
        return Err(Error::BadPem {
            origin: path.display().to_string(),
            problem: format!("file is larger than the {MAX_PEM_LEN}-byte limit for PEM files"),
        });
    };
    String::from_utf8(buf).map_err(|_| Error::BadPem {
        origin: path.display().to_string(),
        problem: "file is not text (PEM expected)".into(),
    })
}

fn single_cert(pem: &str, origin: &str) -> Result<CertificateDer<'static>, Error> {
    let mut certs = tls::certs_from_pem(pem, origin)?;
    // The first certificate is the subject; any others are chain certificates.
    Ok(certs.swap_remove(0))
}

fn parse_x509<'a>(der: &'a CertificateDer<'_>, origin: &str) -> Result<X509Certificate<'a>, Error> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| Error::BadPem {
            origin: origin.to_owned(),
            problem: format!("not a valid X.509 certificate: {e}"),
        })
}

fn check_key_matches(
    cert: &X509Certificate<'_>,
    key_pem: &str,
    cert_origin: &str,
    key_origin: &str,
) -> Result<(), Error> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| Error::BadPem {
        origin: key_origin.to_owned(),
        problem: format!(
            "not a usable private key ({e}); it must be PKCS#8 (\"BEGIN PRIVATE KEY\"; \
             `openssl pkcs8 -topk8 -nocrypt -in KEY` converts others) and {}",
            crate::tls::USABLE_KEY_KINDS
        ),
    })?;
    if key.subject_public_key_info() != cert.public_key().raw {
        return Err(Error::KeyMismatch {
            cert: PathBuf::from(cert_origin),
            key: PathBuf::from(key_origin),
        });
    }
    Ok(())
}

fn distinguished_name(cn: &str) -> Result<DistinguishedName, Error> {
    if cn.is_empty() || cn.len() > MAX_CN_LEN || cn.chars().any(char::is_control) {
        return Err(Error::InvalidCertParams(format!(
            "common name {cn:?} must be 1 to {MAX_CN_LEN} bytes without control characters"
        )));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    Ok(dn)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), Error> {
    if validity.is_zero() {
        return Err(Error::InvalidCertParams("validity must be positive".into()));
    }
    let now = OffsetDateTime::now_utc();
    let too_long = || Error::InvalidCertParams(format!("validity {validity:?} is too long"));
    let span = time::Duration::try_from(validity).map_err(|_| too_long())?;
    params.not_after = now.checked_add(span).ok_or_else(too_long)?;
    params.not_before = now - BACKDATE;
    Ok(())
}

/// A random positive serial: RFC 5280 wants serials unique per CA, and rcgen's default
/// (a hash of the public key) repeats whenever a key is re-certified.
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    // Top bit clear keeps the INTEGER positive; the next bit set keeps it 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// File mode of a private key: readable by its owner only.
pub const KEY_MODE: u32 = 0o600;
/// File mode of a certificate.
pub const CERT_MODE: u32 = 0o644;

/// Creates `dir` and its parents, readable by their owner only; a `dir` that exists must
/// belong to this user and not be writable by every user ([`Error::UnsafeFolder`]).
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| {
        // "File exists" would not say that the path is taken by something else.
        if source.kind() == std::io::ErrorKind::AlreadyExists && !dir.is_dir() {
            Error::NotAFolder(dir.to_path_buf())
        } else {
            Error::WriteFile {
                path: dir.to_path_buf(),
                source,
            }
        }
    })?;
    // A folder made earlier, perhaps by someone else (in a shared /tmp).
    check_private_dir(dir)
}

/// Refuses a folder that belongs to another user, or that every user may write to, or
/// that is reached through a link another user made, or that is inside a folder another
/// user could move it out of ([`Error::UnsafeFolder`]): the keys and certificates in it
/// are trusted, so what others put there (a CA of their own) would be too.
pub fn check_private_dir(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| Error::ReadFile {
            path: dir.to_path_buf(),
            source,
        };
        let refuse = |why: String, fix: &'static str| Error::UnsafeFolder {
            path: dir.to_path_buf(),
            why,
            fix,
        };
        let me = rustix::process::geteuid().as_raw();
        // Root's are the system's own.
        let trusted = |uid: u32| uid == me || uid == 0;
        // A trailing slash would make the lookup follow a final link; the link is judged.
        let bytes = dir.as_os_str().as_bytes();
        let end = bytes.len() - bytes.iter().rev().take_while(|&&b| b == b'/').count();
        let path = match end {
            // An empty path stays empty, and fails to be read below; slashes alone are `/`.
            0 if !bytes.is_empty() => Path::new("/"),
            _ => Path::new(std::ffi::OsStr::from_bytes(&bytes[..end])),
        };
        let link = fs::symlink_metadata(path).map_err(read_err)?;
        let meta = fs::metadata(path).map_err(read_err)?;
        // A link's owner may point it elsewhere at any time, so the folder it leads to
        // today says nothing of tomorrow's (in /tmp, anyone may make the link).
        if link.file_type().is_symlink() && !trusted(link.uid()) {
            return Err(refuse(
                "is a link made by another user".into(),
                "give the folder it leads to by its own path, or a folder of your own",
            ));
        }
        if meta.uid() != me {
            return Err(refuse(
                "belongs to another user".into(),
                "give a folder of your own, or have its owner give it to you",
            ));
        }
        if meta.mode() & 0o002 != 0 {
            // Group-writable is let be: many systems give each user a group of their own.
            return Err(refuse(
                "may be written to by every user".into(),
                "`chmod o-w` it if nobody else has put files there, or give another folder",
            ));
        }
        // The links on the way as written, the last one included (`link/.` reads as the
        // folder it leads to): their owners may point them elsewhere.
        let absolute = std::path::absolute(path).map_err(read_err)?;
        for parent in absolute.ancestors() {
            let link = fs::symlink_metadata(parent).map_err(read_err)?;
            if link.file_type().is_symlink() && !trusted(link.uid()) {
                return Err(refuse(
                    format!(
                        "is reached through {}, a link made by another user",
                        parent.display()
                    ),
                    "give a folder whose path holds no link of another user's",
                ));
            }
        }
        // The folders it is in, as written (where its links are) and really: whoever may
        // rename entries in one of them could move this folder, or a link to it, aside and
        // put one of their own in its place. A folder every user may write to is safe
        // only with the sticky bit (as /tmp), which keeps each user's entries their own.
        let real = fs::canonicalize(path).map_err(read_err)?;
        for parent in absolute.ancestors().skip(1).chain(real.ancestors().skip(1)) {
            let shown = parent.display();
            let meta = fs::metadata(parent).map_err(read_err)?;
            if !trusted(meta.uid()) {
                return Err(refuse(
                    format!("is inside {shown}, a folder of another user, who could replace it"),
                    "give a folder inside folders of your own (your home, say), or have that \
                     folder given to you",
                ));
            }
            if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
                return Err(refuse(
                    format!(
                        "is inside {shown}, which every user may write to without the sticky bit"
                    ),
                    "`chmod +t` that folder (as /tmp is), or give a folder inside folders of \
                     your own (your home, say)",
                ));
            }
        }
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees a half-written
/// file and a key never exists, even briefly, with looser permissions than `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let write_err = |source| Error::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use base64::Engine;
    use x509_parser::x509::X509Version;

    use super::*;
    use crate::tls::tests::handshake;
    use crate::tls::{client_config, server_config, CaRoots, Identity, PeerCheck, TlsSession};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/fluidity/0123456789abcdef";
    const AGENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    fn der_of(pem: &str) -> CertificateDer<'static> {
        single_cert(pem, "test").expect("certificate PEM")
    }

    fn handshake_ok(
        server: &Identity,
        client: &Identity,
        roots: &CaRoots,
        dial: &str,
        server_check: &PeerCheck,
        client_check: &PeerCheck,
    ) {
        let server_cfg = server_config(server, roots, client_check).expect("server config");
        let client_cfg = client_config(client, roots, server_check).expect("client config");
        let mut s = TlsSession::server(server_cfg).expect("server");
        let mut c = TlsSession::client(client_cfg, dial).expect("client");
        let outcome = handshake(&mut c, &mut s);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );
        c.established(server_check).expect("client established");
        s.established(client_check).expect("server established");
    }

    #[test]
    fn ca_and_leaves_are_v3_with_the_right_extensions() {
        let ca = generate_ca("test CA", 30 * DAY).expect("CA");
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        let ca_der = der_of(ca.cert_pem());
        let ca_cert = parse_x509(&ca_der, "ca").expect("parse");
        assert_eq!(ca_cert.version(), X509Version::V3);
        let bc = ca_cert
            .basic_constraints()
            .expect("bc")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = ca_cert.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());

        let names = [SanEntry::Dns("localhost".into()), SanEntry::Ip(AGENT_IP)];
        let server = issue_server(&ca, &names, "srv", 30 * DAY).expect("server");
        let client = issue_client(&ca, "cli", &[AGENT_IP], 30 * DAY).expect("client");
        let mut serials = Vec::new();
        for (pem, server_auth) in [(&server.cert_pem, true), (&client.cert_pem, false)] {
            let der = der_of(pem);
            let cert = parse_x509(&der, "leaf").expect("parse");
            assert_eq!(cert.version(), X509Version::V3);
            assert!(
                !cert
                    .basic_constraints()
                    .expect("bc")
                    .expect("present")
                    .value
                    .ca
            );
            let eku = cert
                .extended_key_usage()
                .expect("eku")
                .expect("present")
                .value;
            assert_eq!(
                (eku.server_auth, eku.client_auth),
                (server_auth, !server_auth)
            );
            assert!(!eku.any);
            cert.verify_signature(Some(ca_cert.public_key()))
                .expect("signed by CA");
            serials.push(cert.raw_serial().to_vec());
        }
        assert_ne!(serials[0], serials[1]);

        let id = PeerIdentity::from_der(&der_of(&server.cert_pem)).expect("names");
        assert_eq!(id.common_name.as_deref(), Some("srv"));
        assert_eq!(id.dns_sans, vec!["localhost".to_owned()]);
        assert_eq!(id.ip_sans, vec![AGENT_IP]);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(matches!(
            generate_ca("", DAY),
            Err(Error::InvalidCertParams(_))
        ));
        assert!(matches!(
            generate_ca("ca", Duration::ZERO),
            Err(Error::InvalidCertParams(_))
        ));
        assert!(matches!(
            generate_ca("ca\n", DAY),
            Err(Error::InvalidCertParams(_))
        ));
    }

    #[test]
    fn san_entries_parse_addresses_and_names() {
        assert_eq!(
            "127.0.0.1".parse::<SanEntry>().expect("v4"),
            SanEntry::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            "::1".parse::<SanEntry>().expect("v6"),
            SanEntry::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(
            "Tunnel.Example.COM".parse::<SanEntry>().expect("dns"),
            SanEntry::Dns("tunnel.example.com".into())
        );
        assert!("".parse::<SanEntry>().is_err());
        assert!("not a name".parse::<SanEntry>().is_err());
        assert!("ünïcode.example".parse::<SanEntry>().is_err());
    }

    /// A P-256 CA made by openssl, with its key in SEC1 form ("EC PRIVATE KEY").
    const OPENSSL_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBhzCCAS2gAwIBAgIULiBHMnhLqTBFkl6yGgFk8MWN7BcwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGdGVzdGNhMB4XDTI2MTIwNjIwMzUxOVoXDTI3MDEwNTIwMzUx
OVowETEPMA0GA1UEAwwGdGVzdGNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
Kx95x7V1grrWGtq5Jr6fKDKb3Q5SXFV7GF20xk0MohgU/fMW+7I86wuRSfy3WaXV
bpkIdc1EGe4NIhXpOWBAS6NjMGEwHQYDVR0OBBYEFFPSB5J1ddv7aZWDpH/XqI4V
MqsyMB8GA1UdIwQYMBaAFFPSB5J1ddv7aZWDpH/XqI4VMqsyMA8GA1UdEwEB/wQF
MAMBAf8wDgYDVR0PAQH/BAQDAgIEMAoGCCqGSM49BAMCA0gAMEUCIQCeabbkviBI
NcizMaVS6r2lREJj3GgD0vpEu/NUUYN6UQIgHQdcUy221Q4ewYHypRsHRJpekw30
nY05RDbjuAz/KgQ=
-----END CERTIFICATE-----
";
    const OPENSSL_CA_SEC1_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDv5z5HXfD/U3R//F/xcF/esccerIRnwynvujjyHDRGioAoGCCqGSM49
AwEHoUQDQgAEKx95x7V1grrWGtq5Jr6fKDKb3Q5SXFV7GF20xk0MohgU/fMW+7I8
6wuRSfy3WaXVbpkIdc1EGe4NIhXpOWBASw==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn a_ca_key_that_is_not_pkcs8_is_refused_with_the_way_to_convert_it() {
        let err = CaBundle::from_pem(OPENSSL_CA.into(), OPENSSL_CA_SEC1_KEY.into())
            .expect_err("SEC1 key")
            .to_string();
        assert!(
            err.contains("must be PKCS#8")
                && err.contains("openssl pkcs8 -topk8")
                && err.contains(crate::tls::USABLE_KEY_KINDS),
            "{err}"
        );
    }

    #[test]
    fn ca_bundle_checks_what_it_loads() {
        let ca = generate_ca("test CA", DAY).expect("CA");
        let other = generate_ca("other CA", DAY).expect("CA");
        let leaf = issue_client(&ca, "cli", &[], DAY).expect("leaf");

        let err = CaBundle::from_pem(leaf.cert_pem.clone(), leaf.key_pem.clone())
            .expect_err("leaf is no CA");
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
        let err = CaBundle::from_pem(ca.cert_pem().into(), other.key_pem().into())
            .expect_err("wrong key");
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");
        CaBundle::from_pem(ca.cert_pem().into(), ca.key_pem().into()).expect("genuine");
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn csr_round_trip_yields_a_working_client_certificate() {
        let ca = generate_ca("fluidity CA", 30 * DAY).expect("CA");
        let csr = create_csr(ARN, &[AGENT_IP]).expect("CSR");
        assert!(csr
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!format!("{csr:?}").contains("PRIVATE KEY"));

        let names = csr_names(&csr.csr_pem).expect("names");
        assert_eq!(
            names,
            PeerIdentity {
                common_name: Some(ARN.into()),
                ip_sans: vec![AGENT_IP],
                dns_sans: vec![],
            }
        );

        let cert_pem = sign_csr(&ca, &csr.csr_pem, CertUsage::Client, 30 * DAY).expect("sign");
        let der = der_of(&cert_pem);
        let cert = parse_x509(&der, "signed").expect("parse");
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(PeerIdentity::from_der(&der).expect("names"), names);

        // The agent's certificate from the CSR and the key that never left it work in an
        // AWS-mode handshake.
        let client = Identity::from_pem(&cert_pem, &csr.key_pem).expect("identity");
        let server_names = [
            SanEntry::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanEntry::Ip(AGENT_IP),
        ];
        let server = Identity::from_certified(
            &issue_server(&ca, &server_names, ARN, 30 * DAY).expect("server"),
        )
        .expect("server identity");
        let roots = CaRoots::from_pem(ca.cert_pem()).expect("roots");
        handshake_ok(
            &server,
            &client,
            &roots,
            "127.0.0.1",
            &PeerCheck::cn(ARN),
            &PeerCheck::cn(ARN).with_ip(AGENT_IP),
        );
    }

    #[test]
    fn sign_csr_decides_usage_itself() {
        let ca = generate_ca("fluidity CA", DAY).expect("CA");
        // A request that asks to be a CA with server and client usage.
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(ARN).expect("dn");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let csr_pem = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");

        let cert_pem = sign_csr(&ca, &csr_pem, CertUsage::Server, DAY).expect("sign");
        let der = der_of(&cert_pem);
        let cert = parse_x509(&der, "signed").expect("parse");
        assert!(
            !cert
                .basic_constraints()
                .expect("bc")
                .expect("present")
                .value
                .ca
        );
        let ku = cert.key_usage().expect("ku").expect("present").value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.server_auth && !eku.client_auth);
    }

    #[test]
    fn bad_csrs_are_refused() {
        let ca = generate_ca("fluidity CA", DAY).expect("CA");
        let csr = create_csr(ARN, &[AGENT_IP]).expect("CSR");

        // Tamper with the signed subject: the self-signature no longer verifies.
        let body: String = csr
            .csr_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let engine = base64::engine::general_purpose::STANDARD;
        let mut der = engine.decode(body).expect("base64");
        let at = der
            .windows(ARN.len())
            .position(|w| w == ARN.as_bytes())
            .expect("CN in DER");
        der[at] ^= 0x01;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            engine.encode(&der)
        );
        let err = sign_csr(&ca, &tampered, CertUsage::Client, DAY).expect_err("tampered");
        assert!(matches!(err, Error::InvalidCsr(_)), "{err:?}");
        assert!(matches!(csr_names(&tampered), Err(Error::InvalidCsr(_))));

        let huge = "A".repeat(MAX_PEM_LEN + 1);
        let err = csr_names(&huge).expect_err("too large");
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(matches!(csr_names("garbage"), Err(Error::InvalidCsr(_))));

        // No CN.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::IpAddress(AGENT_IP)];
        let key = KeyPair::generate().expect("key");
        let no_cn = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let err = sign_csr(&ca, &no_cn, CertUsage::Client, DAY).expect_err("no CN");
        assert_eq!(
            err.to_string(),
            "invalid certificate signing request: the request has no CN"
        );

        // A SAN type the tunnel never uses.
        params.distinguished_name = distinguished_name(ARN).expect("dn");
        params.subject_alt_names = vec![SanType::Rfc822Name(
            Ia5String::try_from("someone@example.com").expect("ia5"),
        )];
        let email = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let err = csr_names(&email).expect_err("email SAN");
        assert!(
            err.to_string()
                .contains("unsupported subject alternative name"),
            "{err}"
        );
    }

    #[test]
    fn validity_problems_are_named_with_what_to_do() {
        let ca = generate_ca("validity test", 100 * DAY).expect("CA");
        let der = single_cert(ca.cert_pem(), "CA").expect("one certificate");
        let end = not_after(ca.cert_pem()).expect("not_after");
        let now = SystemTime::now();
        assert_eq!(validity_problem(&der, now), None);
        let soon = validity_problem(&der, end - 3 * DAY).expect("expiring soon");
        assert!(
            soon.contains("expires on") && soon.contains("in 3 days"),
            "{soon}"
        );
        let expired = validity_problem(&der, end + 2 * DAY).expect("expired");
        assert!(
            expired.contains("expired on") && expired.contains("2 days ago"),
            "{expired}"
        );
        assert!(
            expired.contains("certs init --dir DIR --force"),
            "{expired}"
        );
        let early = validity_problem(&der, now - 2 * DAY).expect("not valid yet");
        assert!(
            early.contains("not valid until") && early.contains("clock"),
            "{early}"
        );
        // Two days less the five minutes every certificate is backdated by.
        assert!(early.contains("(47 h from now"), "{early}");
        assert_eq!(
            validity_problem(&CertificateDer::from(vec![1, 2, 3]), now),
            None
        );
        // Outside the period only: ending soon is still inside it.
        assert_eq!(outside_validity(&der, end - 3 * DAY), None);
        assert_eq!(outside_validity(&der, end + 2 * DAY), Some(expired));
        assert_eq!(outside_validity(&der, now - 2 * DAY), Some(early));
    }

    #[test]
    fn not_after_reports_the_validity_end() {
        let ca = generate_ca("test CA", 10 * DAY).expect("CA");
        let end = not_after(ca.cert_pem()).expect("not_after");
        let expected = SystemTime::now() + 10 * DAY;
        let slack = Duration::from_secs(3600);
        assert!(end > expected - slack && end < expected + slack, "{end:?}");
        assert!(not_after("nothing here").is_err());
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn init_dir_writes_a_working_set_with_private_keys() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let paths = init_dir(&dir, &CertInitOptions::default()).expect("init");
        assert_eq!(paths, CertPaths::in_dir(&dir));
        for file in paths.files() {
            assert!(file.is_file(), "{} missing", file.display());
        }
        #[cfg(unix)]
        {
            for key in [&paths.ca_key, &paths.server_key, &paths.client_key] {
                assert_eq!(mode(key), 0o600, "{}", key.display());
            }
            assert_eq!(mode(&dir), 0o700);
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).expect("read_dir").count(), 6);

        // What was written loads back through the TLS module and works, by name and by
        // either loopback address.
        let roots = CaRoots::load(&paths.ca_cert).expect("roots");
        let server = Identity::load(&paths.server_cert, &paths.server_key).expect("server");
        let client = Identity::load(&paths.client_cert, &paths.client_key).expect("client");
        for dial in ["localhost", "127.0.0.1", "::1"] {
            handshake_ok(
                &server,
                &client,
                &roots,
                dial,
                &PeerCheck::cn("localhost"),
                &PeerCheck::cn("fluidity-agent").with_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            );
        }

        // The CA key on disk can issue more certificates that the same roots accept.
        let ca = CaBundle::load(&paths.ca_cert, &paths.ca_key).expect("CA");
        let another =
            Identity::from_certified(&issue_client(&ca, "second-agent", &[], DAY).expect("issue"))
                .expect("identity");
        handshake_ok(
            &server,
            &another,
            &roots,
            "localhost",
            &PeerCheck::default(),
            &PeerCheck::cn("second-agent"),
        );
    }

    #[test]
    fn init_dir_refuses_to_overwrite_without_force() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let paths = init_dir(dir, &CertInitOptions::default()).expect("init");
        let before = fs::read(&paths.ca_cert).expect("read");

        let err = init_dir(dir, &CertInitOptions::default()).expect_err("second init");
        let Error::WouldOverwrite { paths: existing } = &err else {
            panic!("expected WouldOverwrite, got {err:?}");
        };
        assert_eq!(existing.len(), 6);
        let msg = err.to_string();
        assert!(msg.starts_with("refusing to overwrite existing "), "{msg}");
        assert!(
            msg.contains("ca.pem") && msg.ends_with("pass --force to replace them"),
            "{msg}"
        );
        assert_eq!(fs::read(&paths.ca_cert).expect("read"), before);

        let force = CertInitOptions {
            force: true,
            ..CertInitOptions::default()
        };
        init_dir(dir, &force).expect("forced init");
        assert_ne!(fs::read(&paths.ca_cert).expect("read"), before);
        #[cfg(unix)]
        assert_eq!(mode(&paths.server_key), 0o600);
    }

    #[test]
    fn init_dir_refuses_a_single_existing_file_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::write(dir.join("client-key.pem"), "mine").expect("write");
        let err = init_dir(dir, &CertInitOptions::default()).expect_err("refused");
        assert!(
            matches!(&err, Error::WouldOverwrite { paths } if paths.len() == 1),
            "{err:?}"
        );
        assert_eq!(fs::read_dir(dir).expect("read_dir").count(), 1);
        assert_eq!(fs::read(dir.join("client-key.pem")).expect("read"), b"mine");
    }

    #[test]
    fn ensure_dir_creates_keeps_and_renews() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("local");
        let opts = CertInitOptions::default();

        let (paths, outcome) = ensure_dir(&dir, &opts).expect("create");
        assert_eq!(outcome, EnsureOutcome::Created);
        let first = fs::read(&paths.ca_cert).expect("read");

        let (_, outcome) = ensure_dir(&dir, &opts).expect("keep");
        assert_eq!(outcome, EnsureOutcome::Kept);
        assert_eq!(fs::read(&paths.ca_cert).expect("read"), first);

        // A set that expires within 30 days is replaced, in a folder local mode made.
        let short = CertInitOptions {
            validity_days: 10,
            force: true,
            ..opts.clone()
        };
        init_dir(&dir, &short).expect("short-lived set");
        assert!(is_local_dir(&dir));
        let (_, outcome) = ensure_dir(&dir, &opts).expect("renew");
        assert_eq!(outcome, EnsureOutcome::Renewed);
        let renewed = read_pem_file(&paths.server_cert).expect("read");
        assert!(not_after(&renewed).expect("not_after") > SystemTime::now() + 300 * DAY);
        let (_, outcome) = ensure_dir(&dir, &opts).expect("keep");
        assert_eq!(outcome, EnsureOutcome::Kept);

        // A folder every user may write to is not read from: its CA may be anyone's.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
            let err = ensure_dir(&dir, &opts).expect_err("a folder anyone may write to");
            assert!(matches!(err, Error::UnsafeFolder { .. }), "{err}");
        }
    }

    /// A folder of one's own passes, directly or through one's own link; one every user
    /// may write to does not, nor (where the test may hand things to another user, as
    /// root) one of another user's or a link another user made.
    #[cfg(unix)]
    #[test]
    fn only_a_folder_of_ones_own_is_trusted() {
        use std::os::unix::fs::{lchown, symlink, PermissionsExt};
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mine");
        fs::create_dir(&dir).expect("mkdir");
        check_private_dir(&dir).expect("a folder of one's own");
        assert!(
            matches!(
                check_private_dir(Path::new("")),
                Err(Error::ReadFile { .. })
            ),
            "an empty path is no folder"
        );
        let link = tmp.path().join("link");
        symlink(&dir, &link).expect("symlink");
        check_private_dir(&link).expect("one's own link to one's own folder");
        let refused = |path: &Path, why: &str| match check_private_dir(path) {
            Err(Error::UnsafeFolder { why: got, .. }) => assert_eq!(got, why),
            other => panic!("{} not refused for {why}: {other:?}", path.display()),
        };
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        refused(&dir, "may be written to by every user");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        // A trailing slash does not hide the link.
        let slashed = PathBuf::from(format!("{}/", link.display()));
        check_private_dir(&slashed).expect("one's own link, with a slash");
        // Inside a folder every user may write to: only with the sticky bit.
        let open = tmp.path().join("open");
        let inner = open.join("certs");
        fs::create_dir_all(&inner).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).expect("chmod");
        check_private_dir(&inner).expect("inside a sticky folder");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let why = format!(
            "is inside {}, which every user may write to without the sticky bit",
            open.display()
        );
        refused(&inner, &why);
        // One's own link to one's own folder, but inside that folder: whoever may write
        // there could swap the link.
        let swappable = open.join("link");
        symlink(&dir, &swappable).expect("symlink");
        let why = format!(
            "is inside {}, which every user may write to without the sticky bit",
            open.display()
        );
        refused(&swappable, &why);
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).expect("chmod");
        if rustix::process::geteuid().is_root() {
            let nobody = Some(65534);
            lchown(&link, nobody, nobody).expect("lchown");
            refused(&link, "is a link made by another user");
            refused(&slashed, "is a link made by another user");
            let why = format!(
                "is reached through {}, a link made by another user",
                link.display()
            );
            refused(&link.join("."), &why);
            let through = link.join("sub");
            fs::create_dir(dir.join("sub")).expect("mkdir");
            let why = format!(
                "is reached through {}, a link made by another user",
                link.display()
            );
            refused(&through, &why);
            std::os::unix::fs::chown(&open, nobody, nobody).expect("chown");
            let why = format!(
                "is inside {}, a folder of another user, who could replace it",
                open.display()
            );
            refused(&inner, &why);
            std::os::unix::fs::chown(&dir, nobody, nobody).expect("chown");
            refused(&dir, "belongs to another user");
        }
    }

    #[test]
    fn ensure_dir_never_replaces_a_set_it_did_not_make() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mine");
        let short = CertInitOptions {
            validity_days: 10,
            ..CertInitOptions::default()
        };
        let paths = init_dir(&dir, &short).expect("a user's own short-lived set");
        let before: Vec<Vec<u8>> = paths.files().iter().map(|f| fs::read(f).unwrap()).collect();
        let err = ensure_dir(&dir, &CertInitOptions::default()).expect_err("not local mode's");
        let text = err.to_string();
        assert!(matches!(err, Error::NotLocalDir { .. }), "{err:?}");
        assert!(
            text.contains(LOCAL_MARKER)
                && text.contains("certs init --dir")
                && text.contains("--force"),
            "{text}"
        );
        let after: Vec<Vec<u8>> = paths.files().iter().map(|f| fs::read(f).unwrap()).collect();
        assert_eq!(before, after, "the user's files were changed");
        // Marked as local mode's own, the same set is renewed.
        mark_local_dir(&dir).expect("mark");
        let (_, outcome) = ensure_dir(&dir, &CertInitOptions::default()).expect("renew");
        assert_eq!(outcome, EnsureOutcome::Renewed);
    }

    #[test]
    fn init_dir_refusing_its_options_or_a_file_in_the_way_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let zero = CertInitOptions {
            validity_days: 0,
            ..CertInitOptions::default()
        };
        init_dir(&dir, &zero).expect_err("zero days");
        assert!(!dir.exists(), "a refused set left its folder");
        let file = tmp.path().join("a-file");
        fs::write(&file, b"not a folder").expect("write");
        let err = init_dir(&file, &CertInitOptions::default()).expect_err("a file");
        assert!(err.to_string().contains("not a folder"), "{err}");
    }

    #[test]
    fn ensure_dir_reports_broken_directories_instead_of_overwriting() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let opts = CertInitOptions::default();
        let paths = init_dir(dir, &opts).expect("init");

        // A key that belongs to another certificate.
        fs::copy(&paths.server_key, &paths.client_key).expect("copy");
        let err = ensure_dir(dir, &opts).expect_err("mismatch");
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");

        // A leaf from another CA.
        let other = tmp.path().join("other");
        let other_paths = init_dir(&other, &opts).expect("other");
        init_dir(
            dir,
            &CertInitOptions {
                force: true,
                ..opts.clone()
            },
        )
        .expect("reinit");
        fs::copy(&other_paths.client_cert, &paths.client_cert).expect("copy");
        fs::copy(&other_paths.client_key, &paths.client_key).expect("copy");
        let err = ensure_dir(dir, &opts).expect_err("foreign leaf");
        assert!(err.to_string().contains("not signed by the CA"), "{err}");
        assert_eq!(
            fs::read(&paths.client_cert).expect("read"),
            fs::read(&other_paths.client_cert).expect("read")
        );

        // A missing file.
        fs::remove_file(&paths.client_key).expect("remove");
        let err = ensure_dir(dir, &opts).expect_err("incomplete");
        assert!(matches!(err, Error::IncompleteCertDir { .. }), "{err:?}");
        assert!(err.to_string().contains("client-key.pem"), "{err}");
        assert!(err.to_string().contains("certs init --force"), "{err}");
    }
}
