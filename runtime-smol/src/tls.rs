//! Mutual TLS 1.3 for the tunnel: configurations, peer identity checks, the
//! channel-binding exporter, and a thin wrapper over a rustls connection.
//!
//! This is the only module of the data plane that uses rustls. Every configuration is
//! built with [`crypto_provider`] passed explicitly, never the process default: ring,
//! with the hybrid post-quantum key exchange X25519MLKEM768 first (module `kx`).
//!
//! Identity model (DESIGN.md, Security):
//! - both sides present a certificate from the private CA (WebPKI chain checks, and
//!   the extended key usage: serverAuth for the server, clientAuth for the agent);
//! - the agent checks the server's certificate against the name or address it dialled
//!   (the standard WebPKI name check, so a dialled IP must be in the IP SANs) and then
//!   against a [`PeerCheck`] (in AWS mode: CN = server ARN);
//! - the server checks the agent's CN during the handshake and, once it knows the TCP
//!   source address, that address against the agent's IP SANs ([`check_client`]).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, CommonState, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

use crate::error::{IdentityError, PeerRole};
use crate::pki::{read_pem_file, CertifiedKeyPem};
use crate::Error;

/// The ALPN protocol both sides require.
pub const ALPN_PROTOCOL: &[u8] = b"fluidity/1";

/// The TLS exporter label of the channel-binding value (RFC 5705 / RFC 8446 §7.5).
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-fluidity-channel-binding";

/// Length of the channel-binding value in bytes.
pub const CHANNEL_BINDING_LEN: usize = 32;

/// The kinds of private key the crypto provider signs with, for messages.
pub const USABLE_KEY_KINDS: &str =
    "ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 4096 bits with exponent 65537";

/// Largest certificate whose names are parsed. Fluidity's certificates are under 1 KiB;
/// rustls bounds what a peer can send, and this bounds what we parse.
const MAX_CERT_DER_LEN: usize = 16 * 1024;

mod kx;

/// The crypto provider of every TLS configuration of Fluidity (the tunnel, its test
/// origins, the AWS calls): ring's algorithms, AES-128-GCM first, and X25519MLKEM768
/// ahead of ring's key exchange groups.
///
/// ring rather than aws-lc-rs: in measurements on the tunnel it cost no more CPU per
/// byte or per request, and its smaller code keeps each process about 1.3 MiB smaller
/// (docs/PERFORMANCE.md, change 30).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (the provider lists AES-256-GCM first): it is the fastest suite
    // where AES runs in hardware, and 128-bit keys are well within TLS 1.3's security
    // margin. Both ends run this code and the server follows the client's order, so the
    // tunnel uses it; the other suites stay available.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    // The hybrid first, so that both ends of a tunnel agree on it; X25519 alone and the
    // NIST curves remain for peers without it.
    provider.kx_groups.insert(0, kx::X25519MLKEM768);
    Arc::new(provider)
}

// ---------------------------------------------------------------------------------------
// PEM loading

/// Parses every certificate in PEM text; `origin` (a path or a description) names the
/// input in errors. Fails if there is none, so the result is never empty.
pub fn certs_from_pem(pem: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |problem: String| Error::BadPem {
        origin: origin.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate found (expected a \"BEGIN CERTIFICATE\" block)".into(),
        ));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in PEM text; `origin` names the
/// input in errors.
pub fn key_from_pem(pem: &str, origin: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::BadPem {
        origin: origin.to_owned(),
        problem: match e {
            // PKCS#8 with a passphrase: nothing here could ask for it.
            rustls_pki_types::pem::Error::NoItemsFound
                if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") =>
            {
                "the private key is encrypted (\"BEGIN ENCRYPTED PRIVATE KEY\"), and \
                 Fluidity takes keys without a passphrase: `openssl pkcs8 -in KEY -out \
                 KEY.plain` asks for it and writes one (keep it readable by its owner only)"
                    .into()
            }
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key found (expected a \"BEGIN PRIVATE KEY\" block)".into()
            }
            other => pem_problem(&other),
        },
    })
}

/// What is wrong with PEM text, in words (the library's own text shows markers and lines
/// as lists of byte values).
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "invalid PEM: a block has no \"-----END {}-----\" line (is the file cut short?)",
            text(end_marker)
        ),
        E::IllegalSectionStart { line } => {
            format!("invalid PEM: a malformed BEGIN line: \"{}\"", text(line))
        }
        E::Base64Decode(why) => format!("invalid PEM: a block's base64 is damaged ({why})"),
        other => format!("invalid PEM: {other}"),
    }
}

/// A certificate chain (leaf first) and its private key: what one side presents.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("chain_len", &self.chain.len())
            .field("key", &"[elided]")
            .finish()
    }
}

impl Identity {
    /// Builds an identity from PEM text: a certificate chain (leaf first) and a key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        Self::checked(
            certs_from_pem(cert_pem, "certificate")?,
            key_from_pem(key_pem, "private key")?,
            "certificate and private key",
        )
    }

    /// Builds an identity from a certificate issued by [`crate::pki`].
    pub fn from_certified(certified: &CertifiedKeyPem) -> Result<Self, Error> {
        Self::from_pem(&certified.cert_pem, &certified.key_pem)
    }

    /// Loads an identity from a certificate chain file and a key file.
    /// A certificate that has expired, is not valid yet or expires soon is logged as a
    /// warning naming the file: peers decide by their own clocks, so it still loads.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let chain = certs_from_pem(&read_pem_file(cert_path)?, &cert_path.display().to_string())?;
        if let Some(leaf) = chain.first() {
            warn_validity(leaf, cert_path);
        }
        let key = key_from_pem(&read_pem_file(key_path)?, &key_path.display().to_string())?;
        Self::checked(
            chain,
            key,
            &format!("{} and {}", cert_path.display(), key_path.display()),
        )
    }

    /// [`Identity::load`] for one end of the tunnel: also refuses a certificate whose
    /// extended key usage does not allow that end (the server's certificate given to the
    /// agent, say), which peers would refuse with an alert that says little.
    pub fn load_as(cert_path: &Path, key_path: &Path, role: PeerRole) -> Result<Self, Error> {
        let identity = Self::load(cert_path, key_path)?;
        if let Some(problem) = identity.usage_problem(role) {
            let made = match role {
                PeerRole::Server => "server.pem",
                PeerRole::Client => "client.pem",
            };
            return Err(Error::BadPem {
                origin: cert_path.display().to_string(),
                problem: format!(
                    "{problem}; use the {made} that `fluidity certs init` makes for it"
                ),
            });
        }
        Ok(identity)
    }

    /// Why this identity's certificate cannot serve as `role`'s, if it cannot: its
    /// extended key usage allows neither that end's usage nor any (a certificate without
    /// the extension may serve either).
    pub fn usage_problem(&self, role: PeerRole) -> Option<String> {
        self.chain
            .first()
            .and_then(|leaf| usage_problem(leaf, role))
    }

    /// Rejects a key that does not belong to the leaf certificate here, where the files
    /// can still be named, instead of as an obscure handshake failure later.
    fn checked(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        origin: &str,
    ) -> Result<Self, Error> {
        let bad = |problem: String| Error::BadPem {
            origin: origin.to_owned(),
            problem,
        };
        // openssl makes version 1 certificates unless told otherwise; webpki refuses
        // them with a code that says little.
        let version = chain
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
            .map(|(_, cert)| cert.version());
        if version.is_some_and(|v| v != x509_parser::x509::X509Version::V3) {
            return Err(bad(
                "the certificate is not X.509 version 3, which TLS peers require; issue a \
                 version 3 certificate (with extensions, as `fluidity certs init` makes them)"
                    .into(),
            ));
        }
        if let Some(alg) = chain
            .first()
            .and_then(|leaf| unverifiable(leaf, CertAlgorithm::Signature))
        {
            return Err(bad(format!(
                "the certificate is signed with {alg}, which TLS peers of Fluidity cannot \
                 verify; issue it with ECDSA (SHA-256 or SHA-384), Ed25519 or RSA"
            )));
        }
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| {
                bad(format!(
                    "unusable private key ({e}); keys may be {USABLE_KEY_KINDS}"
                ))
            })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    bad(format!("key does not belong to the certificate: {e}"))
                }
                // Matching parses the certificate: what fails here is the certificate.
                e => bad(format!("the certificate cannot be used: {e}")),
            })?;
        Ok(Identity { chain, key })
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The names in the leaf certificate.
    pub fn names(&self) -> Result<PeerIdentity, IdentityError> {
        match self.chain.first() {
            Some(leaf) => PeerIdentity::from_der(leaf),
            None => Err(IdentityError::Unparsable("empty certificate chain".into())),
        }
    }
}

/// Logs what is wrong with the validity of `cert`, loaded from `path`, if anything.
fn warn_validity(cert: &CertificateDer<'_>, path: &Path) {
    if let Some(problem) = crate::pki::validity_problem(cert, std::time::SystemTime::now()) {
        tracing::warn!("certificate {} {problem}", path.display());
    }
}

/// The CA certificates one side trusts for the other's certificates.
#[derive(Debug, Clone)]
pub struct CaRoots {
    store: Arc<RootCertStore>,
}

impl CaRoots {
    /// Parses one or more CA certificates from PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        Self::from_certs(certs_from_pem(pem, "CA certificate")?, "CA certificate")
    }

    /// Loads one or more CA certificates from a PEM file.
    /// Validity problems are logged as for [`Identity::load`].
    pub fn load(path: &Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let certs = certs_from_pem(&read_pem_file(path)?, &origin)?;
        for cert in &certs {
            warn_validity(cert, path);
        }
        Self::from_certs(certs, &origin)
    }

    fn from_certs(certs: Vec<CertificateDer<'static>>, origin: &str) -> Result<Self, Error> {
        let mut store = RootCertStore::empty();
        for cert in certs {
            // Such a CA would load, and then every handshake would fail with an alert
            // that says little.
            if let Some(key) = unverifiable(&cert, CertAlgorithm::Key) {
                return Err(Error::BadPem {
                    origin: origin.to_owned(),
                    problem: format!(
                        "a CA certificate has a {key} key, and certificates it signs cannot \
                         be verified here; use a CA with an ECDSA P-256 or P-384, Ed25519 or \
                         RSA key"
                    ),
                });
            }
            store.add(cert).map_err(|e| Error::BadPem {
                origin: origin.to_owned(),
                problem: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(CaRoots {
            store: Arc::new(store),
        })
    }
}

/// Why `leaf` cannot serve as `role`'s certificate, if it cannot: its extended key usage
/// allows neither that end's usage nor any. A certificate without the extension may serve
/// either.
fn usage_problem(leaf: &CertificateDer<'_>, role: PeerRole) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let eku = cert.extended_key_usage().ok()??.value;
    let (allowed, needed, who) = match role {
        PeerRole::Server => (eku.server_auth, "serverAuth", "a server"),
        PeerRole::Client => (eku.client_auth, "clientAuth", "an agent"),
    };
    if eku.any || allowed {
        return None;
    }
    let has = if eku.server_auth {
        "serverAuth: it is a server's"
    } else if eku.client_auth {
        "clientAuth: it is an agent's"
    } else {
        "neither serverAuth nor clientAuth"
    };
    Some(format!(
        "the certificate's extended key usage is {has}, and {who} needs {needed}"
    ))
}

/// The element at the start of `der`: its tag, its contents, and the bytes after it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The contents of `cert`'s public key AlgorithmIdentifier, and of its signatureAlgorithm.
fn algorithm_ids(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, after_tbs) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, signature_alg, _) = der_element(after_tbs)? else {
        return None;
    };
    // TBSCertificate: [0] version (absent in version 1), serial, signature, issuer,
    // validity, subject, SPKI.
    const VERSION: u8 = 0xa0;
    let before_spki = if tbs.first() == Some(&VERSION) { 6 } else { 5 };
    let mut rest = tbs;
    for _ in 0..before_spki {
        rest = der_element(rest)?.2;
    }
    let (SEQUENCE, spki, _) = der_element(rest)? else {
        return None;
    };
    let (SEQUENCE, key_alg, _) = der_element(spki)? else {
        return None;
    };
    Some((key_alg, signature_alg))
}

/// Which algorithm of a certificate a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertAlgorithm {
    /// Its key's, which verifies what the certificate's holder signs (for a CA: the
    /// certificates it issues).
    Key,
    /// The one it is signed with, which its peers verify.
    Signature,
}

/// The algorithm's OIDs by their names, as x509-parser knows them.
fn describe_algorithm(cert: &[u8], which: CertAlgorithm) -> String {
    let registry = x509_parser::objects::oid_registry();
    let name = |oid: &x509_parser::der_parser::oid::Oid<'_>| {
        x509_parser::objects::oid2sn(oid, registry)
            .map(str::to_owned)
            .unwrap_or_else(|_| oid.to_id_string())
    };
    match (x509_parser::parse_x509_certificate(cert), which) {
        (Ok((_, c)), CertAlgorithm::Key) => {
            let alg = &c.public_key().algorithm;
            match alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
                Some(curve) => format!("{} {}", name(&alg.algorithm), name(&curve)),
                None => name(&alg.algorithm),
            }
        }
        (Ok((_, c)), CertAlgorithm::Signature) => name(&c.signature_algorithm.algorithm),
        (Err(_), _) => "unknown algorithm".to_owned(),
    }
}

/// Names `cert`'s algorithm `which` if the crypto provider cannot verify with it (a CA
/// whose key is P-521, a certificate signed with ECDSA and SHA-512, say).
fn unverifiable(cert: &CertificateDer<'_>, which: CertAlgorithm) -> Option<String> {
    let (key_alg, signature_alg) = algorithm_ids(cert)?;
    let provider = crypto_provider();
    let known = provider
        .signature_verification_algorithms
        .all
        .iter()
        .any(|alg| match which {
            CertAlgorithm::Key => alg.public_key_alg_id().as_ref() == key_alg,
            CertAlgorithm::Signature => alg.signature_alg_id().as_ref() == signature_alg,
        });
    (!known).then(|| describe_algorithm(cert, which))
}

// ---------------------------------------------------------------------------------------
// Identities and checks

/// The names in a certificate (or CSR) that identity checks look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// IP address SANs.
    pub ip_sans: Vec<IpAddr>,
    /// DNS name SANs.
    pub dns_sans: Vec<String>,
}

impl PeerIdentity {
    /// Reads the names of a DER certificate.
    ///
    /// A certificate with more than one CN is refused: which one counts would be
    /// ambiguous, and Fluidity's CA never issues such a certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        if der.len() > MAX_CERT_DER_LEN {
            return Err(IdentityError::Unparsable(format!(
                "certificate is {} bytes, more than the {MAX_CERT_DER_LEN}-byte limit",
                der.len()
            )));
        }
        let unparsable = |e: &dyn fmt::Display| IdentityError::Unparsable(e.to_string());
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| unparsable(&e))?;

        let mut cns = cert.subject().iter_common_name();
        let common_name = match cns.next() {
            None => None,
            Some(attr) => Some(attr.as_str().map_err(|e| unparsable(&e))?.to_owned()),
        };
        if cns.next().is_some() {
            return Err(IdentityError::Unparsable(
                "certificate has more than one CN".into(),
            ));
        }

        let mut identity = PeerIdentity {
            common_name,
            ..PeerIdentity::default()
        };
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| unparsable(&e))?
        {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => identity.dns_sans.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => identity.ip_sans.push(ip_from_san(bytes)?),
                    _ => {}
                }
            }
        }
        Ok(identity)
    }
}

fn ip_from_san(bytes: &[u8]) -> Result<IpAddr, IdentityError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6));
    }
    Err(IdentityError::Unparsable(format!(
        "IP address SAN of {} bytes",
        bytes.len()
    )))
}

/// What a peer's certificate must name, beyond being issued by the trusted CA.
///
/// In AWS mode both sides expect CN = the server's ARN, and the server also expects
/// the agent's source address among the agent's IP SANs. In local mode the default
/// (no extra requirement) leaves the standard checks alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCheck {
    /// The CN the certificate must carry, if any.
    pub expected_cn: Option<String>,
    /// An address the certificate's IP SANs must contain, if any.
    pub expected_ip: Option<IpAddr>,
}

impl PeerCheck {
    /// Requires CN = `cn` (in AWS mode, the server ARN).
    pub fn cn(cn: impl Into<String>) -> Self {
        PeerCheck {
            expected_cn: Some(cn.into()),
            expected_ip: None,
        }
    }

    /// Also requires `ip` among the IP SANs.
    pub fn with_ip(mut self, ip: IpAddr) -> Self {
        self.expected_ip = Some(ip);
        self
    }

    /// Checks a certificate's names against this requirement.
    pub fn check(&self, id: &PeerIdentity) -> Result<(), IdentityError> {
        if let Some(expected) = &self.expected_cn {
            match &id.common_name {
                None => {
                    return Err(IdentityError::CommonNameMissing {
                        expected: expected.clone(),
                    })
                }
                Some(found) if found != expected => {
                    return Err(IdentityError::CommonNameMismatch {
                        found: found.clone(),
                        expected: expected.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some(address) = self.expected_ip {
            // An IPv4 peer reaching a dual-stack socket shows up as ::ffff:a.b.c.d.
            let address = canonical_ip(address);
            if !id.ip_sans.iter().any(|ip| canonical_ip(*ip) == address) {
                return Err(IdentityError::AddressNotInSan {
                    address,
                    sans: id.ip_sans.clone(),
                });
            }
        }
        Ok(())
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Turns a failed identity check into the rustls error a verifier returns, so the
/// handshake fails with a certificate alert and the local error says exactly why.
fn reject(peer: PeerRole, source: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        Error::PeerIdentity { peer, source },
    ))))
}

/// Applies `check` to the names of a chain-verified end-entity certificate, as a rustls
/// verdict that says which peer's identity failed.
fn check_verified(
    check: &PeerCheck,
    end_entity: &CertificateDer<'_>,
    peer: PeerRole,
) -> Result<(), rustls::Error> {
    let identity = PeerIdentity::from_der(end_entity).map_err(|e| reject(peer, e))?;
    check.check(&identity).map_err(|e| reject(peer, e))
}

fn peer_identity_of(state: &CommonState, peer: PeerRole) -> Result<PeerIdentity, Error> {
    if state.is_handshaking() {
        return Err(Error::HandshakeIncomplete);
    }
    let leaf = state
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(Error::NoPeerCertificate { peer })?;
    PeerIdentity::from_der(leaf).map_err(|source| Error::PeerIdentity { peer, source })
}

/// Applies `check` to the agent's certificate once the handshake is done, when the
/// server knows the TCP source address (put it in `check.expected_ip`).
pub fn check_client(conn: &ServerConnection, check: &PeerCheck) -> Result<PeerIdentity, Error> {
    let identity = peer_identity_of(conn, PeerRole::Client)?;
    check
        .check(&identity)
        .map_err(|source| Error::PeerIdentity {
            peer: PeerRole::Client,
            source,
        })?;
    Ok(identity)
}

/// Fails unless the handshake negotiated ALPN `fluidity/1`.
///
/// rustls already aborts when both sides offer protocols and none match; this catches
/// a peer that offered none.
pub fn check_alpn(state: &CommonState) -> Result<(), Error> {
    if state.is_handshaking() {
        return Err(Error::HandshakeIncomplete);
    }
    match state.alpn_protocol() {
        Some(p) if p == ALPN_PROTOCOL => Ok(()),
        other => Err(Error::AlpnMismatch {
            got: other.map(<[u8]>::to_vec),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Configurations and verifiers

/// Builds the server's TLS configuration: TLS 1.3 only, ALPN `fluidity/1`, client
/// certificates required and verified against `client_ca`, and `client_check` applied
/// to them during the handshake.
///
/// The agent's source address is known only per connection: check it after the
/// handshake with [`check_client`] or [`TlsSession::established`].
pub fn server_config(
    identity: &Identity,
    client_ca: &CaRoots,
    client_check: &PeerCheck,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = crypto_provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&client_ca.store),
        Arc::clone(&provider),
    )
    .build()?;
    let verifier = Arc::new(CheckingClientVerifier {
        inner: webpki,
        check: client_check.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // No resumption: a resumed session skips the certificate checks, and would carry a
    // certificate past its expiry (or its CA's replacement) for as long as the agent
    // reconnects. A tunnel lives long; a full handshake now and then costs nothing.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Builds the agent's TLS configuration: TLS 1.3 only, ALPN `fluidity/1`, presenting
/// `identity`, and accepting a server certificate only if it chains to `server_ca`,
/// is valid for the dialled name or address, and passes `server_check`.
pub fn client_config(
    identity: &Identity,
    server_ca: &CaRoots,
    server_check: &PeerCheck,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = crypto_provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(
        Arc::clone(&server_ca.store),
        Arc::clone(&provider),
    )
    .build()?;
    let verifier = Arc::new(CheckingServerVerifier {
        inner: webpki,
        check: server_check.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // No resumption, as on the server (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// WebPKI verification (chain, validity, serverAuth, dialled name) followed by a
/// [`PeerCheck`].
#[derive(Debug)]
struct CheckingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check: PeerCheck,
}

impl ServerCertVerifier for CheckingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_verified(&self.check, end_entity, PeerRole::Server)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// WebPKI client verification (chain, validity, clientAuth; certificate mandatory)
/// followed by a [`PeerCheck`].
#[derive(Debug)]
struct CheckingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: PeerCheck,
}

impl ClientCertVerifier for CheckingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_verified(&self.check, end_entity, PeerRole::Client)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Channel binding

mod sealed {
    pub trait Sealed {}
    impl Sealed for rustls::ClientConnection {}
    impl Sealed for rustls::ServerConnection {}
    impl Sealed for rustls::Connection {}
    impl Sealed for super::TlsSession {}
}

/// A TLS connection that can export keying material (RFC 5705 / RFC 8446 §7.5).
pub trait KeyingMaterialExporter: sealed::Sealed {
    /// Fills `out` with the exporter value for `label` and no context.
    fn export(
        &self,
        out: [u8; CHANNEL_BINDING_LEN],
        label: &[u8],
    ) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error>;
}

impl KeyingMaterialExporter for ClientConnection {
    fn export(
        &self,
        out: [u8; CHANNEL_BINDING_LEN],
        label: &[u8],
    ) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error> {
        self.export_keying_material(out, label, None)
    }
}

impl KeyingMaterialExporter for ServerConnection {
    fn export(
        &self,
        out: [u8; CHANNEL_BINDING_LEN],
        label: &[u8],
    ) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error> {
        self.export_keying_material(out, label, None)
    }
}

impl KeyingMaterialExporter for rustls::Connection {
    fn export(
        &self,
        out: [u8; CHANNEL_BINDING_LEN],
        label: &[u8],
    ) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error> {
        self.export_keying_material(out, label, None)
    }
}

impl KeyingMaterialExporter for TlsSession {
    fn export(
        &self,
        out: [u8; CHANNEL_BINDING_LEN],
        label: &[u8],
    ) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error> {
        self.conn.export(out, label)
    }
}

/// The channel-binding value of a finished handshake: 32 bytes exported with label
/// [`CHANNEL_BINDING_LABEL`] and no context. Both ends get the same bytes; every
/// session gets different ones. Tunnel authentication signs it so that a signature
/// cannot be replayed on another TLS session.
pub fn channel_binding(
    conn: &(impl KeyingMaterialExporter + ?Sized),
) -> Result<[u8; CHANNEL_BINDING_LEN], Error> {
    Ok(conn.export([0u8; CHANNEL_BINDING_LEN], CHANNEL_BINDING_LABEL)?)
}

// ---------------------------------------------------------------------------------------
// Session wrapper

/// One side of a Fluidity TLS connection, for a driver using rustls's buffered API
/// (`read_tls` → `process_new_packets` → `reader()`; `writer()` → `write_tls`).
///
/// Once [`is_handshaking`](Self::is_handshaking) turns false, call
/// [`established`](Self::established) before trusting the connection.
///
/// In TLS 1.3 the client finishes its handshake before the server has judged the
/// client's certificate: a rejection reaches the client only as an alert on its next
/// read. The client should therefore treat the first message from the server (the
/// tunnel's hello), not the end of the TLS handshake, as proof of acceptance.
#[derive(Debug)]
pub struct TlsSession {
    conn: rustls::Connection,
}

/// What a finished, checked handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The names in the peer's certificate.
    pub peer: PeerIdentity,
    /// The channel-binding value (see [`channel_binding`]).
    pub channel_binding: [u8; CHANNEL_BINDING_LEN],
}

impl TlsSession {
    /// Starts a client session to `server`, an IP address or a DNS name. The server's
    /// certificate must be valid for it (an IP must be among its IP SANs).
    pub fn client(config: Arc<ClientConfig>, server: &str) -> Result<Self, Error> {
        let name = ServerName::try_from(server.to_owned())
            .map_err(|_| Error::InvalidServerName(server.to_owned()))?;
        Ok(TlsSession {
            conn: ClientConnection::new(config, name)?.into(),
        })
    }

    /// Starts a server session.
    pub fn server(config: Arc<ServerConfig>) -> Result<Self, Error> {
        Ok(TlsSession {
            conn: ServerConnection::new(config)?.into(),
        })
    }

    /// Whether this is the client (agent) side.
    pub fn is_client(&self) -> bool {
        matches!(self.conn, rustls::Connection::Client(_))
    }

    fn peer_role(&self) -> PeerRole {
        if self.is_client() {
            PeerRole::Server
        } else {
            PeerRole::Client
        }
    }

    /// Reads TLS records from `rd` (see `rustls::Connection::read_tls`).
    pub fn read_tls(&mut self, rd: &mut dyn io::Read) -> io::Result<usize> {
        self.conn.read_tls(rd)
    }

    /// Processes records read so far. Errors are fatal; the alert still waits in
    /// [`write_tls`](Self::write_tls).
    pub fn process_new_packets(&mut self) -> Result<rustls::IoState, Error> {
        Ok(self.conn.process_new_packets()?)
    }

    /// Decrypted application data.
    pub fn reader(&mut self) -> rustls::Reader<'_> {
        self.conn.reader()
    }

    /// Where application data to encrypt is written.
    pub fn writer(&mut self) -> rustls::Writer<'_> {
        self.conn.writer()
    }

    /// Writes pending TLS records to `wr`.
    pub fn write_tls(&mut self, wr: &mut dyn io::Write) -> io::Result<usize> {
        self.conn.write_tls(wr)
    }

    /// Whether rustls wants more TLS input.
    pub fn wants_read(&self) -> bool {
        self.conn.wants_read()
    }

    /// Whether rustls has TLS output pending.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether the handshake is still in progress.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Queues a close_notify alert.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// Bounds rustls's buffer of outgoing TLS records, and of plaintext written before
    /// the handshake ends (`None` = unbounded). Received plaintext has rustls's own fixed
    /// bound; the driver empties it on every read.
    pub fn set_buffer_limit(&mut self, limit: Option<usize>) {
        self.conn.set_buffer_limit(limit);
    }

    /// The negotiated ALPN protocol, once the handshake is done.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Fails unless ALPN `fluidity/1` was negotiated (see [`check_alpn`]).
    pub fn check_alpn(&self) -> Result<(), Error> {
        check_alpn(&self.conn)
    }

    /// The names in the peer's certificate.
    pub fn peer_identity(&self) -> Result<PeerIdentity, Error> {
        peer_identity_of(&self.conn, self.peer_role())
    }

    /// The channel-binding value (see [`channel_binding`]).
    pub fn channel_binding(&self) -> Result<[u8; CHANNEL_BINDING_LEN], Error> {
        channel_binding(self)
    }

    /// Everything to check once the handshake is done: ALPN, then the peer's
    /// certificate names against `peer_check` (on the server, a check carrying the
    /// agent's CN and TCP source address), then the channel-binding value.
    pub fn established(&self, peer_check: &PeerCheck) -> Result<Established, Error> {
        self.check_alpn()?;
        let peer = self.peer_identity()?;
        peer_check
            .check(&peer)
            .map_err(|source| Error::PeerIdentity {
                peer: self.peer_role(),
                source,
            })?;
        Ok(Established {
            peer,
            channel_binding: self.channel_binding()?,
        })
    }

    /// The underlying rustls connection.
    pub fn connection(&self) -> &rustls::Connection {
        &self.conn
    }

    /// The underlying rustls connection, mutably.
    pub fn connection_mut(&mut self) -> &mut rustls::Connection {
        &mut self.conn
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    use rustls::{AlertDescription, PeerIncompatible};

    use super::*;
    use crate::pki::{self, CaBundle, SanEntry};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/fluidity/0123456789abcdef";
    const AGENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    /// Bounds the in-memory handshakes; a TLS 1.3 handshake needs three or four rounds.
    const MAX_ROUNDS: usize = 32;
    /// Bounds every blocking socket operation of the TCP tests.
    const IO_TIMEOUT: Duration = Duration::from_secs(10);

    struct Pki {
        ca: CaBundle,
        roots: CaRoots,
    }

    impl Pki {
        fn new(name: &str) -> Self {
            let ca = pki::generate_ca(name, 30 * DAY).expect("CA");
            let roots = CaRoots::from_pem(ca.cert_pem()).expect("roots");
            Pki { ca, roots }
        }

        fn server(&self, cn: &str, names: &[&str]) -> Identity {
            let names: Vec<SanEntry> = names.iter().map(|n| n.parse().expect("name")).collect();
            let issued = pki::issue_server(&self.ca, &names, cn, 30 * DAY).expect("server cert");
            Identity::from_certified(&issued).expect("server identity")
        }

        fn client(&self, cn: &str, ips: &[IpAddr]) -> Identity {
            let issued = pki::issue_client(&self.ca, cn, ips, 30 * DAY).expect("client cert");
            Identity::from_certified(&issued).expect("client identity")
        }

        fn local_server(&self) -> Identity {
            self.server("localhost", &["localhost", "127.0.0.1", "::1"])
        }

        fn local_client(&self) -> Identity {
            self.client("fluidity-agent", &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        }
    }

    fn server_session(pki: &Pki, identity: &Identity, check: &PeerCheck) -> TlsSession {
        TlsSession::server(server_config(identity, &pki.roots, check).expect("server config"))
            .expect("server session")
    }

    fn client_session(
        roots: &CaRoots,
        identity: &Identity,
        check: &PeerCheck,
        server: &str,
    ) -> TlsSession {
        let config = client_config(identity, roots, check).expect("client config");
        TlsSession::client(config, server).expect("client session")
    }

    #[derive(Debug)]
    pub(crate) struct Outcome {
        pub(crate) client: Result<(), Error>,
        pub(crate) server: Result<(), Error>,
    }

    impl Outcome {
        fn client_tls_error(&self) -> &rustls::Error {
            match &self.client {
                Err(Error::Tls(e)) => e,
                other => panic!("expected a client TLS error, got {other:?} ({self:?})"),
            }
        }

        fn server_tls_error(&self) -> &rustls::Error {
            match &self.server {
                Err(Error::Tls(e)) => e,
                other => panic!("expected a server TLS error, got {other:?} ({self:?})"),
            }
        }
    }

    /// Moves every pending record from `from` to `to`; returns how many bytes moved.
    fn move_records(
        from: &mut TlsSession,
        to: &mut TlsSession,
        to_err: &mut Option<Error>,
    ) -> usize {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).expect("write_tls to a Vec");
        }
        if to_err.is_some() {
            return buf.len();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("read_tls from a slice");
            if let Err(e) = to.process_new_packets() {
                *to_err = Some(e);
                break;
            }
        }
        buf.len()
    }

    /// Runs a handshake in memory until both sides are done or have failed and no
    /// bytes are left in flight (so a late alert reaches the other side).
    pub(crate) fn handshake(client: &mut TlsSession, server: &mut TlsSession) -> Outcome {
        let mut client_err = None;
        let mut server_err = None;
        for _ in 0..MAX_ROUNDS {
            let moved = move_records(client, server, &mut server_err)
                + move_records(server, client, &mut client_err);
            let done = !client.is_handshaking() && !server.is_handshaking();
            let failed = client_err.is_some() || server_err.is_some();
            if moved == 0 && (done || failed) {
                return Outcome {
                    client: client_err.map_or(Ok(()), Err),
                    server: server_err.map_or(Ok(()), Err),
                };
            }
        }
        panic!("handshake did not settle within {MAX_ROUNDS} rounds");
    }

    fn assert_rejected_identity(err: &Result<(), Error>, peer: PeerRole, expected: &IdentityError) {
        match err {
            Err(Error::PeerIdentity { peer: p, source }) => {
                assert_eq!(*p, peer);
                assert_eq!(source, expected);
            }
            other => panic!("expected Error::PeerIdentity, got {other:?}"),
        }
    }

    #[test]
    fn local_mutual_tls_succeeds_in_memory_and_carries_data() {
        let pki = Pki::new("test CA");
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = client_session(
            &pki.roots,
            &pki.local_client(),
            &PeerCheck::default(),
            "localhost",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );

        assert_eq!(client.alpn_protocol(), Some(ALPN_PROTOCOL));
        assert_eq!(server.alpn_protocol(), Some(ALPN_PROTOCOL));
        assert_eq!(
            client.connection().protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        for end in [client.connection(), server.connection()] {
            assert_eq!(
                end.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            assert_eq!(
                end.negotiated_key_exchange_group().map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768),
                "the tunnel's key exchange must be the post-quantum hybrid"
            );
        }

        let at_client = client
            .established(&PeerCheck::cn("localhost"))
            .expect("client side");
        let at_server = server
            .established(&PeerCheck::cn("fluidity-agent").with_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .expect("server side");
        assert_eq!(at_client.peer.common_name.as_deref(), Some("localhost"));
        assert_eq!(at_client.peer.dns_sans, vec!["localhost".to_owned()]);
        assert_eq!(
            at_client.peer.ip_sans,
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(
            at_server.peer.common_name.as_deref(),
            Some("fluidity-agent")
        );
        assert_eq!(at_client.channel_binding, at_server.channel_binding);
        assert_ne!(at_client.channel_binding, [0u8; CHANNEL_BINDING_LEN]);

        client
            .writer()
            .write_all(b"hello over fluidity/1")
            .expect("write");
        let mut none = None;
        move_records(&mut client, &mut server, &mut none);
        assert!(none.is_none(), "{none:?}");
        let mut got = vec![0u8; 64];
        let n = server.reader().read(&mut got).expect("read");
        assert_eq!(&got[..n], b"hello over fluidity/1");
    }

    #[test]
    fn channel_binding_matches_across_ends_and_differs_across_sessions() {
        let pki = Pki::new("test CA");
        let server_cfg = server_config(&pki.local_server(), &pki.roots, &PeerCheck::default())
            .expect("server config");
        let client_cfg = client_config(&pki.local_client(), &pki.roots, &PeerCheck::default())
            .expect("client config");
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut server = TlsSession::server(Arc::clone(&server_cfg)).expect("server");
            let mut client =
                TlsSession::client(Arc::clone(&client_cfg), "127.0.0.1").expect("client");
            let outcome = handshake(&mut client, &mut server);
            assert!(
                outcome.client.is_ok() && outcome.server.is_ok(),
                "{outcome:?}"
            );

            // The free function works on the raw rustls connections too.
            let rustls::Connection::Client(raw_client) = client.connection() else {
                panic!("client session holds a server connection");
            };
            let rustls::Connection::Server(raw_server) = server.connection() else {
                panic!("server session holds a client connection");
            };
            let a = channel_binding(raw_client).expect("client exporter");
            let b = channel_binding(raw_server).expect("server exporter");
            assert_eq!(a, b);
            assert_eq!(a, client.channel_binding().expect("session exporter"));
            assert!(
                !seen.contains(&a),
                "exporter value repeated across sessions"
            );
            seen.push(a);
            // Never resumed, though both ends keep their configurations: every handshake
            // checks the certificates in full.
            for end in [client.connection(), server.connection()] {
                assert_eq!(end.handshake_kind(), Some(rustls::HandshakeKind::Full));
            }
        }
    }

    #[test]
    fn exporter_and_identity_refuse_before_handshake() {
        let pki = Pki::new("test CA");
        let client = client_session(
            &pki.roots,
            &pki.local_client(),
            &PeerCheck::default(),
            "localhost",
        );
        assert!(matches!(client.channel_binding(), Err(Error::Tls(_))));
        assert!(matches!(
            client.peer_identity(),
            Err(Error::HandshakeIncomplete)
        ));
        assert!(matches!(
            client.check_alpn(),
            Err(Error::HandshakeIncomplete)
        ));
    }

    #[test]
    fn aws_mode_checks_arn_and_addresses() {
        let pki = Pki::new("fluidity CA");
        // The server's SAN holds its own and the agent's public IPs; the agent's holds its own.
        let server_id = pki.server(ARN, &["127.0.0.1", &AGENT_IP.to_string()]);
        let client_id = pki.client(ARN, &[AGENT_IP]);

        let mut server = server_session(&pki, &server_id, &PeerCheck::cn(ARN));
        let mut client = client_session(&pki.roots, &client_id, &PeerCheck::cn(ARN), "127.0.0.1");
        let outcome = handshake(&mut client, &mut server);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );
        server
            .established(&PeerCheck::cn(ARN).with_ip(AGENT_IP))
            .expect("agent address is in its SAN");
        let rustls::Connection::Server(raw_server) = server.connection() else {
            panic!("server session holds a client connection");
        };
        check_client(raw_server, &PeerCheck::cn(ARN).with_ip(AGENT_IP)).expect("check_client");

        // The same agent seen from another source address is refused, with a clear reason.
        let elsewhere = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        let err = check_client(raw_server, &PeerCheck::cn(ARN).with_ip(elsewhere))
            .expect_err("address not in SAN");
        assert_eq!(
            err.to_string(),
            "client certificate rejected: address 203.0.113.9 is not in its IP SANs [198.51.100.7]"
        );
    }

    #[test]
    fn client_rejects_server_with_wrong_cn() {
        let pki = Pki::new("fluidity CA");
        let other_arn = "arn:aws:ecs:us-east-1:123456789012:task/fluidity/ffffffffffffffff";
        let server_id = pki.server(other_arn, &["127.0.0.1"]);
        let mut server = server_session(&pki, &server_id, &PeerCheck::default());
        let mut client = client_session(
            &pki.roots,
            &pki.client(ARN, &[AGENT_IP]),
            &PeerCheck::cn(ARN),
            "127.0.0.1",
        );
        let outcome = handshake(&mut client, &mut server);
        assert_rejected_identity(
            &outcome.client,
            PeerRole::Server,
            &IdentityError::CommonNameMismatch {
                found: other_arn.into(),
                expected: ARN.into(),
            },
        );
        assert_eq!(
            outcome.client.as_ref().map_err(ToString::to_string),
            Err(format!(
                "server certificate rejected: CN is {other_arn:?}, expected {ARN:?}"
            ))
        );
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::AlertReceived(AlertDescription::CertificateUnknown)
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn server_rejects_client_with_wrong_cn() {
        let pki = Pki::new("fluidity CA");
        let mut server =
            server_session(&pki, &pki.server(ARN, &["127.0.0.1"]), &PeerCheck::cn(ARN));
        let mut client = client_session(
            &pki.roots,
            &pki.client("someone-else", &[AGENT_IP]),
            &PeerCheck::cn(ARN),
            "127.0.0.1",
        );
        let outcome = handshake(&mut client, &mut server);
        assert_rejected_identity(
            &outcome.server,
            PeerRole::Client,
            &IdentityError::CommonNameMismatch {
                found: "someone-else".into(),
                expected: ARN.into(),
            },
        );
        assert_eq!(
            outcome.server.as_ref().map_err(ToString::to_string),
            Err(format!(
                "client certificate rejected: CN is \"someone-else\", expected {ARN:?}"
            ))
        );
        // TLS 1.3 clients finish before the server has judged them: they learn of the
        // rejection from the alert.
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::AlertReceived(AlertDescription::CertificateUnknown)
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn client_rejects_server_not_valid_for_dialled_address() {
        let pki = Pki::new("fluidity CA");
        let mut server = server_session(
            &pki,
            &pki.server(ARN, &["127.0.0.1"]),
            &PeerCheck::default(),
        );
        let mut client = client_session(
            &pki.roots,
            &pki.client(ARN, &[AGENT_IP]),
            &PeerCheck::cn(ARN),
            "127.0.0.2",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn client_check_can_require_an_ip_san() {
        let pki = Pki::new("fluidity CA");
        let mut server = server_session(
            &pki,
            &pki.server("srv", &["localhost"]),
            &PeerCheck::default(),
        );
        let check = PeerCheck::default().with_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut client = client_session(&pki.roots, &pki.local_client(), &check, "localhost");
        let outcome = handshake(&mut client, &mut server);
        assert_rejected_identity(
            &outcome.client,
            PeerRole::Server,
            &IdentityError::AddressNotInSan {
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                sans: vec![],
            },
        );
    }

    #[test]
    fn server_rejects_client_without_certificate() {
        let pki = Pki::new("test CA");
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(Arc::clone(&pki.roots.store))
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        let mut client = TlsSession::client(Arc::new(config), "localhost").expect("client");
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::NoCertificatesPresented
            ),
            "{outcome:?}"
        );
        assert!(outcome.client.is_err(), "{outcome:?}");
    }

    #[test]
    fn server_rejects_client_certificate_from_another_ca() {
        let pki = Pki::new("test CA");
        let rogue = Pki::new("rogue CA");
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        // The client trusts the real CA but presents a certificate from the rogue one.
        let mut client = client_session(
            &pki.roots,
            &rogue.local_client(),
            &PeerCheck::default(),
            "localhost",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{outcome:?}"
        );
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::AlertReceived(AlertDescription::UnknownCA)
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn client_rejects_server_certificate_from_another_ca() {
        let pki = Pki::new("test CA");
        let rogue = Pki::new("rogue CA");
        let mut server = TlsSession::server(
            server_config(&rogue.local_server(), &pki.roots, &PeerCheck::default())
                .expect("config"),
        )
        .expect("server");
        let mut client = client_session(
            &pki.roots,
            &pki.local_client(),
            &PeerCheck::default(),
            "localhost",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{outcome:?}"
        );
        assert!(outcome.server.is_err(), "{outcome:?}");
    }

    #[test]
    fn certificates_are_not_accepted_in_the_wrong_role() {
        let pki = Pki::new("test CA");
        // A server certificate presented by a client (serverAuth only) is refused...
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = client_session(
            &pki.roots,
            &pki.local_server(),
            &PeerCheck::default(),
            "localhost",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                )
            ),
            "{outcome:?}"
        );

        // ...and so is a client certificate (clientAuth only) presented by a server.
        let client_as_server = pki.client("localhost", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let mut server = server_session(&pki, &client_as_server, &PeerCheck::default());
        let mut client = client_session(
            &pki.roots,
            &pki.local_client(),
            &PeerCheck::default(),
            "127.0.0.1",
        );
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                )
            ),
            "{outcome:?}"
        );
    }

    /// A tunnel client on another implementation: rustls on aws-lc-rs, offering `groups`.
    fn aws_lc_client(
        pki: &Pki,
        groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
    ) -> TlsSession {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = groups.to_vec();
        let identity = pki.local_client();
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(Arc::clone(&pki.roots.store))
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .expect("client cert");
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        TlsSession::client(Arc::new(config), "localhost").expect("client")
    }

    #[test]
    fn another_implementation_of_the_hybrid_key_exchange_completes_a_handshake() {
        use rustls::crypto::aws_lc_rs::kx_group;
        let pki = Pki::new("test CA");
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = aws_lc_client(&pki, &[kx_group::X25519MLKEM768]);
        let outcome = handshake(&mut client, &mut server);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );
        for end in [client.connection(), server.connection()] {
            assert_eq!(
                end.negotiated_key_exchange_group().map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768)
            );
        }
        let (a, b) = (
            client.channel_binding().expect("client binding"),
            server.channel_binding().expect("server binding"),
        );
        assert_eq!(a, b, "both ends must derive the same keys");

        // A client with X25519 alone (an agent built before the hybrid) still connects,
        // in one round trip.
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = aws_lc_client(&pki, &[kx_group::X25519]);
        let outcome = handshake(&mut client, &mut server);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );
        assert_eq!(
            server
                .connection()
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
            Some(rustls::NamedGroup::X25519)
        );
        assert_eq!(
            server.connection().handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "no HelloRetryRequest"
        );
    }

    #[test]
    fn server_rejects_tls12_only_client() {
        let pki = Pki::new("test CA");
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let identity = pki.local_client();
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(Arc::clone(&pki.roots.store))
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .expect("client cert");
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        let mut client = TlsSession::client(Arc::new(config), "localhost").expect("client");
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled)
            ),
            "{outcome:?}"
        );
        assert!(
            matches!(
                outcome.client_tls_error(),
                rustls::Error::AlertReceived(AlertDescription::ProtocolVersion)
            ),
            "{outcome:?}"
        );
        assert!(client.is_handshaking() && server.is_handshaking());
    }

    #[test]
    fn alpn_mismatch_is_detected() {
        let pki = Pki::new("test CA");
        let identity = pki.local_client();
        let config_with = |alpn: Vec<Vec<u8>>| {
            let mut config = ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_root_certificates(Arc::clone(&pki.roots.store))
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .expect("client cert");
            config.alpn_protocols = alpn;
            Arc::new(config)
        };

        // A client offering only another protocol is refused during the handshake.
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = TlsSession::client(config_with(vec![b"http/1.1".to_vec()]), "localhost")
            .expect("client");
        let outcome = handshake(&mut client, &mut server);
        assert!(
            matches!(
                outcome.server_tls_error(),
                rustls::Error::NoApplicationProtocol
            ),
            "{outcome:?}"
        );

        // A client offering nothing completes TLS, and the ALPN check catches it.
        let mut server = server_session(&pki, &pki.local_server(), &PeerCheck::default());
        let mut client = TlsSession::client(config_with(vec![]), "localhost").expect("client");
        let outcome = handshake(&mut client, &mut server);
        assert!(
            outcome.client.is_ok() && outcome.server.is_ok(),
            "{outcome:?}"
        );
        let err = server
            .established(&PeerCheck::default())
            .expect_err("no ALPN");
        assert!(matches!(err, Error::AlpnMismatch { got: None }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "peer did not negotiate ALPN protocol \"fluidity/1\" (got none)"
        );
    }

    #[test]
    fn invalid_server_name_is_refused() {
        let pki = Pki::new("test CA");
        let config =
            client_config(&pki.local_client(), &pki.roots, &PeerCheck::default()).expect("config");
        let err = TlsSession::client(config, "not a host name").expect_err("bad name");
        assert!(matches!(err, Error::InvalidServerName(_)), "{err:?}");
    }

    /// A self-signed X.509 version 1 certificate and its key, as `openssl x509 -req
    /// -signkey` makes without an extension file (valid until 2126).
    const V1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBFjCBvQIUO2QTZ5wYhRVuUld7MK87bjpANCkwCgYIKoZIzj0EAwIwDTELMAkG
A1UEAwwCdjEwIBcNMjYxMjA2MTgzMDI2WhgPMjEyNjExMTIxODMwMjZaMA0xCzAJ
BgNVBAMMAnYxMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEg9YzEZO75NmW7V2/
3edntPWyR8zjCeUKGklEbrJNo2Bkqe6RfDksYJTKiZIstsoUHq337yFSMAiKcVma
c7r5eTAKBggqhkjOPQQDAgNIADBFAiEAgwvgpjV2mS9lVF/+e3X71Ish+lSD670d
mZRz0WbRZWACIFvYo5wHcMQxaUHEWhDJbldJGdzZ9wdDmTh+JFZLOTvi
-----END CERTIFICATE-----
";
    const V1_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7ijvmhK7XzW43C01
78WKmJp6RSt+N5BFYtaW93MHnD+hRANCAASD1jMRk7vk2ZbtXb/d52e09bJHzOMJ
5QoaSURusk2jYGSp7pF8OSxglMqJkiy2yhQerffvIVIwCIpxWZpzuvl5
-----END PRIVATE KEY-----
";

    /// A P-521 key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521), which
    /// the crypto provider cannot sign with.
    const P521_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIHuAgEAMBAGByqGSM49AgEGBSuBBAAjBIHWMIHTAgEBBEIARt+/zaL/iAAxiX/i
ZuCb3OjTGGqGAe0PqvNdmIATWpsyYjDqvXpVTrDeCZyUbjphrq9QBygDNppKaMkq
Xwu0UuahgYkDgYYABAEhYsnlkYTVJuzUJvu4hSZSh7ErlOrYMnpipgt75USzkKdT
M5Z8tDbzgL5fooKHe/xStz5CrhdDYJMEhZTf1wSd0QBbjDlx1p21rgcNfdIPW6aF
N3lFoNjmAW570DqqC56LLv0hU2CqyfvuoAgqZjKdLIxU50JgV2AlM++AOzNG2nGr
7Q==
-----END PRIVATE KEY-----
";

    /// A self-signed CA certificate with a P-521 key (openssl req -x509 -newkey ec
    /// -pkeyopt ec_paramgen_curve:P-521), which the crypto provider cannot verify with.
    const P521_CA: &str = "-----BEGIN CERTIFICATE-----
MIICDzCCAXCgAwIBAgIUXyz286o4zwNlK2yMIKd2bEJIOkMwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGcDUyMWNhMB4XDTI2MTIwNjIwNTAxOVoXDTM2MTIwMzIwNTAx
OVowETEPMA0GA1UEAwwGcDUyMWNhMIGbMBAGByqGSM49AgEGBSuBBAAjA4GGAAQA
xadZw4IDohzH+LuBd8fYyHRfuK4XhjGvM94xz7efSIFI9lvfZ4Yw/FwYCsPS2sFn
UN+eLUYqDZ/zo0AeoXR9biAB71+YzHUwcz5GPDYqyGdqe5tdI8zhvuHLiUX/7BYC
KFNxukDCIxTMHVXXMpKz/+vEN+ATBFJSatXa6dQqU17ycgqjYzBhMB0GA1UdDgQW
BBT2S8+NQSE7P49uBBn/EiOxUcCSHjAfBgNVHSMEGDAWgBT2S8+NQSE7P49uBBn/
EiOxUcCSHjAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwICBDAKBggqhkjO
PQQDAgOBjAAwgYgCQgHMKi4TI8VvTqScQqNKSyYxflZz9oTuzj1kNRe/Pbzx+iT3
4vK1jV0eD/K4I+D9Ka+hzzcKOC9AkAPGRfP3EolexwJCAThb7bM0BHatB8QED2AX
bnpb8hu9o5Hb0KmSXK6Ry4kkYBEZJLjOdYCZzRGE8z811qa6v3XRvxPDOS7JTXlq
Hv01
-----END CERTIFICATE-----
";

    /// A P-256 client certificate signed with ecdsa-with-SHA512 (openssl x509 -req
    /// -sha512), and its key.
    const SHA512_SIGNED: &str = "-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgIUZOKQjaS72sC2EW/ETJmaeruMTKcwCgYIKoZIzj0EAwQw
DTELMAkGA1UEAwwCY2EwHhcNMjYxMjA2MjA1MDE5WhcNMzYxMjAzMjA1MDE5WjAU
MRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASx
9fOyngvKjLOsabNUC5n64XiV6MMq76HBK1rTlhVeCtieV93YyTckJPPGFv/qdz2u
PskPvWGGFG/FfO881liDo3gwdjAJBgNVHRMEAjAAMBMGA1UdJQQMMAoGCCsGAQUF
BwMCMBQGA1UdEQQNMAuCCWxvY2FsaG9zdDAdBgNVHQ4EFgQUT28AAZbCYnweMQzq
m3dPmYgNefkwHwYDVR0jBBgwFoAUIGs/a1jRHd6xH7Z0CAM89OP3jE4wCgYIKoZI
zj0EAwQDRwAwRAIgTOPfiITkNflwm1+YUWCLFiI9b6+pdrn+x6GLEHuGhdMCIG34
VQGo46YYSE4Bp0GF1TzTJtD1epBAjRbVYMkpxQD2
-----END CERTIFICATE-----
";
    const SHA512_SIGNED_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgLjqcGlOBu/Mp3OW1
tlawY37idy5pM6QNcghMb1vY/EyhRANCAASx9fOyngvKjLOsabNUC5n64XiV6MMq
76HBK1rTlhVeCtieV93YyTckJPPGFv/qdz2uPskPvWGGFG/FfO881liD
-----END PRIVATE KEY-----
";

    #[test]
    fn algorithms_are_read_from_a_certificate() {
        let pki = Pki::new("test CA");
        let a = pki::issue_client(&pki.ca, "a", &[], DAY).expect("a");
        let der = &certs_from_pem(&a.cert_pem, "a").expect("a")[0];
        // Made here: P-256, signed with ECDSA and SHA-256.
        let (key, signature) = algorithm_ids(der).expect("algorithm ids");
        assert_eq!(key, rustls_pki_types::alg_id::ECDSA_P256.as_ref());
        assert_eq!(signature, rustls_pki_types::alg_id::ECDSA_SHA256.as_ref());
        assert_eq!(unverifiable(der, CertAlgorithm::Key), None);
        assert_eq!(unverifiable(der, CertAlgorithm::Signature), None);
        assert_eq!(
            algorithm_ids(&der[..der.len() - 1]),
            None,
            "a cut certificate"
        );
        assert_eq!(algorithm_ids(&[]), None);
    }

    #[test]
    fn a_ca_whose_signatures_cannot_be_verified_is_refused_at_load() {
        let Err(err) = CaRoots::from_pem(P521_CA) else {
            panic!("a P-521 CA must be refused");
        };
        let err = err.to_string();
        assert!(
            err.contains("secp521r1") && err.contains("cannot be verified here"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_signed_in_a_way_peers_cannot_verify_is_refused_at_load() {
        let Err(err) = Identity::from_pem(SHA512_SIGNED, SHA512_SIGNED_KEY) else {
            panic!("a certificate signed with SHA-512 must be refused");
        };
        let err = err.to_string();
        assert!(
            err.contains("ecdsa-with-SHA512") && err.contains("cannot verify"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_for_the_other_end_is_refused_at_load_with_the_right_file_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new("test CA");
        let server =
            pki::issue_server(&pki.ca, &["localhost".parse().unwrap()], "s", DAY).expect("server");
        let client = pki::issue_client(&pki.ca, "c", &[], DAY).expect("client");
        let write = |name: &str, issued: &CertifiedKeyPem| {
            let cert = dir.path().join(format!("{name}.pem"));
            let key = dir.path().join(format!("{name}-key.pem"));
            std::fs::write(&cert, &issued.cert_pem).expect("write");
            std::fs::write(&key, &issued.key_pem).expect("write");
            (cert, key)
        };
        let (server_cert, server_key) = write("server", &server);
        let (client_cert, client_key) = write("client", &client);
        Identity::load_as(&server_cert, &server_key, PeerRole::Server).expect("server's own");
        Identity::load_as(&client_cert, &client_key, PeerRole::Client).expect("agent's own");
        let Err(err) = Identity::load_as(&server_cert, &server_key, PeerRole::Client) else {
            panic!("a server certificate for the agent must be refused");
        };
        let err = err.to_string();
        assert!(
            err.contains("server.pem")
                && err.contains("it is a server's")
                && err.contains("client.pem"),
            "{err}"
        );
        let Err(err) = Identity::load_as(&client_cert, &client_key, PeerRole::Server) else {
            panic!("an agent certificate for the server must be refused");
        };
        let err = err.to_string();
        assert!(
            err.contains("it is an agent's") && err.contains("server.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_key_of_a_kind_the_provider_cannot_use_is_refused_with_the_kinds_it_can() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new("test CA");
        let a = pki::issue_client(&pki.ca, "a", &[], DAY).expect("a");
        let cert = dir.path().join("client.pem");
        let key = dir.path().join("client-key.pem");
        std::fs::write(&cert, &a.cert_pem).expect("write");
        std::fs::write(&key, P521_KEY).expect("write");
        let err = Identity::load(&cert, &key).expect_err("P-521").to_string();
        assert!(
            err.contains("client-key.pem")
                && err.contains("unusable private key")
                && err.contains(USABLE_KEY_KINDS),
            "{err}"
        );
    }

    #[test]
    fn a_cut_or_damaged_pem_file_is_described_in_words() {
        let pki = Pki::new("test CA");
        let a = pki::issue_client(&pki.ca, "a", &[], DAY).expect("a");
        let cut = &a.cert_pem[..a.cert_pem.len() / 2];
        let err = certs_from_pem(cut, "client.pem")
            .expect_err("cut short")
            .to_string();
        assert!(
            err.contains("client.pem")
                && err.contains("no \"-----END CERTIFICATE-----\" line")
                && err.contains("cut short"),
            "{err}"
        );
        let damaged = a.cert_pem.replacen('M', "*", 1);
        let err = certs_from_pem(&damaged, "client.pem")
            .expect_err("damaged")
            .to_string();
        assert!(err.contains("base64 is damaged"), "{err}");
    }

    #[test]
    fn identity_names_a_version_1_certificate_as_such() {
        let err = Identity::from_pem(V1_CERT, V1_KEY).expect_err("version 1");
        assert!(err.to_string().contains("not X.509 version 3"), "{err}");
    }

    #[test]
    fn identity_rejects_mismatched_key_and_bad_pem() {
        let pki = Pki::new("test CA");
        let a = pki::issue_client(&pki.ca, "a", &[], DAY).expect("a");
        let b = pki::issue_client(&pki.ca, "b", &[], DAY).expect("b");
        let err = Identity::from_pem(&a.cert_pem, &b.key_pem).expect_err("mismatch");
        assert!(
            err.to_string()
                .contains("key does not belong to the certificate"),
            "{err}"
        );

        let err = Identity::from_pem(&a.key_pem, &a.key_pem).expect_err("no cert");
        assert!(err.to_string().contains("no certificate found"), "{err}");
        let err = Identity::from_pem(&a.cert_pem, &a.cert_pem).expect_err("no key");
        assert!(err.to_string().contains("no private key found"), "{err}");
        // The block an encrypted PKCS#8 key comes in (only its label matters here).
        let encrypted = a.key_pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
        let err = Identity::from_pem(&a.cert_pem, &encrypted).expect_err("encrypted");
        assert!(
            err.to_string().contains("is encrypted") && err.to_string().contains("openssl pkcs8"),
            "{err}"
        );
    }

    #[test]
    fn loading_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let err = CaRoots::load(&missing).expect_err("missing file");
        assert!(matches!(err, Error::ReadFile { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").expect("write");
        let err = CaRoots::load(&garbage).expect_err("garbage");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no certificate found (expected a \"BEGIN CERTIFICATE\" block)",
                garbage.display()
            )
        );
        let err = Identity::load(&garbage, &garbage).expect_err("garbage");
        assert!(
            err.to_string().starts_with(&garbage.display().to_string()),
            "{err}"
        );

        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'A'; pki::MAX_PEM_LEN + 1]).expect("write");
        let err = CaRoots::load(&huge).expect_err("too large");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    // ---- over real TCP on 127.0.0.1 -------------------------------------------------

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        for sock in [&client, &server] {
            sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            sock.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        }
        (client, server)
    }

    fn flush(session: &mut TlsSession, sock: &mut TcpStream) {
        while session.wants_write() {
            session.write_tls(sock).expect("write_tls");
        }
    }

    /// Flushes, then reads and processes one batch of records. An error is returned
    /// after the alert it queued has been sent.
    fn read_once(session: &mut TlsSession, sock: &mut TcpStream) -> Result<(), Error> {
        flush(session, sock);
        if session.read_tls(sock).expect("read_tls (timed out?)") == 0 {
            return Err(Error::HandshakeIncomplete);
        }
        let processed = session.process_new_packets();
        flush(session, sock);
        processed.map(|_| ())
    }

    fn complete_handshake(session: &mut TlsSession, sock: &mut TcpStream) -> Result<(), Error> {
        while session.is_handshaking() {
            read_once(session, sock)?;
        }
        flush(session, sock);
        Ok(())
    }

    fn read_message(
        session: &mut TlsSession,
        sock: &mut TcpStream,
        len: usize,
    ) -> Result<Vec<u8>, Error> {
        let mut got = Vec::new();
        while got.len() < len {
            let mut buf = [0u8; 256];
            match session.reader().read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_once(session, sock)?,
                Err(e) => panic!("read: {e}"),
            }
        }
        Ok(got)
    }

    /// The server side of a TCP test: handshake, check the agent against its source
    /// address, echo one message back.
    fn serve_one(
        mut sock: TcpStream,
        config: Arc<ServerConfig>,
        expected_cn: &'static str,
    ) -> thread::JoinHandle<Result<Established, Error>> {
        thread::spawn(move || {
            let peer: SocketAddr = sock.peer_addr().expect("peer addr");
            let mut session = TlsSession::server(config)?;
            complete_handshake(&mut session, &mut sock)?;
            let established =
                session.established(&PeerCheck::cn(expected_cn).with_ip(peer.ip()))?;
            let msg = read_message(&mut session, &mut sock, 4)?;
            session.writer().write_all(&msg).expect("write");
            session.send_close_notify();
            flush(&mut session, &mut sock);
            Ok(established)
        })
    }

    #[test]
    fn tcp_handshake_checks_source_address_and_carries_data() {
        let pki = Pki::new("test CA");
        let (mut client_sock, server_sock) = tcp_pair();
        let server_cfg = server_config(
            &pki.local_server(),
            &pki.roots,
            &PeerCheck::cn("fluidity-agent"),
        )
        .expect("server config");
        let server = serve_one(server_sock, server_cfg, "fluidity-agent");

        let mut client = client_session(
            &pki.roots,
            &pki.local_client(),
            &PeerCheck::cn("localhost"),
            "127.0.0.1",
        );
        complete_handshake(&mut client, &mut client_sock).expect("handshake");
        let at_client = client
            .established(&PeerCheck::default())
            .expect("client side");
        client.writer().write_all(b"ping").expect("write");
        flush(&mut client, &mut client_sock);
        assert_eq!(
            read_message(&mut client, &mut client_sock, 4).expect("echo"),
            b"ping"
        );

        let at_server = server.join().expect("server thread").expect("server side");
        assert_eq!(at_client.channel_binding, at_server.channel_binding);
        assert_eq!(
            at_server.peer.ip_sans,
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
    }

    #[test]
    fn tcp_server_refuses_agent_whose_address_is_not_in_its_san() {
        let pki = Pki::new("fluidity CA");
        let (mut client_sock, server_sock) = tcp_pair();
        let server_cfg = server_config(
            &pki.server(ARN, &["127.0.0.1"]),
            &pki.roots,
            &PeerCheck::cn(ARN),
        )
        .expect("server config");
        let server = serve_one(server_sock, server_cfg, ARN);

        // A genuine agent certificate, but for another public address.
        let mut client = client_session(
            &pki.roots,
            &pki.client(ARN, &[AGENT_IP]),
            &PeerCheck::cn(ARN),
            "127.0.0.1",
        );
        complete_handshake(&mut client, &mut client_sock).expect("handshake");
        let err = server
            .join()
            .expect("server thread")
            .expect_err("address check");
        assert_eq!(
            err.to_string(),
            "client certificate rejected: address 127.0.0.1 is not in its IP SANs [198.51.100.7]"
        );
    }

    #[test]
    fn tcp_server_refuses_client_certificate_from_another_ca() {
        let pki = Pki::new("test CA");
        let rogue = Pki::new("rogue CA");
        let (mut client_sock, server_sock) = tcp_pair();
        let server_cfg = server_config(&pki.local_server(), &pki.roots, &PeerCheck::default())
            .expect("server config");
        let server = serve_one(server_sock, server_cfg, "fluidity-agent");

        let mut client = client_session(
            &pki.roots,
            &rogue.local_client(),
            &PeerCheck::default(),
            "127.0.0.1",
        );
        complete_handshake(&mut client, &mut client_sock).expect("client finishes first");
        // The rejection reaches the client as an alert on its next read.
        let err = read_once(&mut client, &mut client_sock).expect_err("alert");
        assert!(
            matches!(
                err,
                Error::Tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA))
            ),
            "{err:?}"
        );
        let err = server
            .join()
            .expect("server thread")
            .expect_err("unknown CA");
        assert!(
            matches!(
                err,
                Error::Tls(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{err:?}"
        );
    }
}
