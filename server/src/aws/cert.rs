//! Certificates issued by the CA function, kept on disk between restarts.
//!
//! Both ends of an AWS-mode tunnel hold a certificate whose CN is the server's ARN and
//! whose IP SANs name the addresses it may be used from. A cached certificate is reused
//! only if it still names exactly that ARN and those addresses and has more than
//! [`RENEW_BEFORE`] left; anything else (another server, another address, near expiry,
//! a missing or unreadable file) means a new key, a new CSR and a new signature. The agent
//! uses this module too, so the two sides can never disagree on what "usable" means.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fluidity_aws::control::types::{CertRole, CertificateRequest};
use fluidity_aws::control::ControlClient;
use fluidity_runtime_smol::pki;
#[cfg(doc)]
use fluidity_runtime_smol::pki::RENEW_BEFORE;
use fluidity_runtime_smol::tls::{certs_from_pem, Identity, PeerIdentity};
use fluidity_runtime_smol::PeerRole;

use crate::Error;

/// A certificate signed by the CA function, with the CA certificate that signed it (the
/// trust anchor for the peer's certificate, which the same CA signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCertificate {
    /// The issued certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

/// Signs CSRs: in production the CA function behind its function URL; in tests anything
/// that answers like it.
pub trait CertificateAuthority: Send + Sync {
    /// Submits `csr_pem` and returns the certificate, or the CA's reason for refusing.
    fn sign(&self, csr_pem: &str) -> Result<SignedCertificate, String>;
}

/// The CA function, reached through the control client, asked for certificates of one
/// role (the server's or the agent's).
#[derive(Debug, Clone)]
pub struct ControlCa {
    /// The control client (only its CA URL is used).
    pub client: ControlClient,
    /// Which certificate to ask for.
    pub role: CertRole,
}

impl CertificateAuthority for ControlCa {
    fn sign(&self, csr_pem: &str) -> Result<SignedCertificate, String> {
        let answer = self
            .client
            .sign_certificate(&CertificateRequest {
                csr: csr_pem.to_owned(),
                role: self.role,
                validity_days: None,
            })
            .map_err(|e| e.to_string())?;
        Ok(SignedCertificate {
            cert_pem: answer.certificate,
            ca_pem: answer.ca_certificate,
        })
    }
}

/// The three files of a cached certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// `STEM.pem`: the certificate.
    pub cert: PathBuf,
    /// `STEM-key.pem`: its private key (mode 0600).
    pub key: PathBuf,
    /// `STEM-ca.pem`: the CA certificate that signed it.
    pub ca: PathBuf,
}

impl CertFiles {
    /// The files named after `stem` (`server`, `agent`) inside `dir`.
    pub fn in_dir(dir: &Path, stem: &str) -> CertFiles {
        CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            ca: dir.join(format!("{stem}-ca.pem")),
        }
    }
}

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtained {
    /// The cached certificate was still right for this ARN and these addresses.
    Cached,
    /// A new certificate was issued (none cached, or the cached one did not fit).
    Issued,
}

/// Returns why the cached certificate in `files` cannot be used for `cn` and `ips`, as
/// `role`'s certificate, at `now` (it must have more than `renew_before` left), or `None`
/// if it can.
pub fn cached_unusable(
    files: &CertFiles,
    cn: &str,
    ips: &[IpAddr],
    role: PeerRole,
    now: SystemTime,
    renew_before: Duration,
) -> Option<String> {
    let read = |p: &Path| pki::read_pem_file(p).map_err(|e| e.to_string());
    let (cert_pem, key_pem, ca_pem) = match (read(&files.cert), read(&files.key), read(&files.ca)) {
        (Ok(c), Ok(k), Ok(a)) => (c, k, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Some(e),
    };
    if let Err(e) = certs_from_pem(&ca_pem, &files.ca.display().to_string()) {
        return Some(e.to_string());
    }
    let identity = match Identity::from_pem(&cert_pem, &key_pem) {
        Ok(i) => i,
        Err(e) => return Some(e.to_string()),
    };
    if let Some(why) = identity.usage_problem(role) {
        return Some(why);
    }
    let names = match identity.names() {
        Ok(n) => n,
        Err(e) => return Some(e.to_string()),
    };
    if let Some(why) = names_differ(&names, cn, ips) {
        return Some(why);
    }
    match pki::not_after(&cert_pem) {
        Err(e) => Some(e.to_string()),
        Ok(end) if end <= now + renew_before => Some(format!(
            "it expires within the renewal window ({} days)",
            renew_before.as_secs() / 86_400
        )),
        Ok(_) => None,
    }
}

/// Whether a certificate's names are exactly `cn` and the IP SANs `ips` (in any order).
fn names_differ(names: &PeerIdentity, cn: &str, ips: &[IpAddr]) -> Option<String> {
    if names.common_name.as_deref() != Some(cn) {
        return Some(format!(
            "it was issued for {:?}, not {cn}",
            names.common_name.as_deref().unwrap_or("no CN")
        ));
    }
    let mut have = names.ip_sans.clone();
    let mut want = ips.to_vec();
    have.sort();
    have.dedup();
    want.sort();
    want.dedup();
    if have != want || !names.dns_sans.is_empty() {
        return Some(format!("it names the addresses {have:?}, not {want:?}"));
    }
    None
}

/// Returns a certificate for `cn` and `ips`, to serve as `role`'s, in `files`: the cached
/// one if it still fits and has more than `renew_before` left (the agent uses
/// [`RENEW_BEFORE`], 30 days), else a fresh key and CSR signed by `ca` and written to
/// `files` (key first, mode 0600).
///
/// The answer of the CA is checked before it is stored: a certificate for other names
/// than were asked for, or whose extended key usage does not allow `role`, is refused
/// rather than cached.
pub fn obtain(
    files: &CertFiles,
    cn: &str,
    ips: &[IpAddr],
    role: PeerRole,
    ca: &dyn CertificateAuthority,
    renew_before: Duration,
) -> Result<Obtained, Error> {
    // Before anything in it is read: a folder someone else made is refused, not trusted.
    if let Some(dir) = files.cert.parent() {
        pki::create_private_dir(dir)?;
    }
    match cached_unusable(files, cn, ips, role, SystemTime::now(), renew_before) {
        None => {
            tracing::info!(cert = %files.cert.display(), cn, "using the cached certificate");
            return Ok(Obtained::Cached);
        }
        Some(why) => tracing::info!(
            cert = %files.cert.display(), reason = %why, "requesting a new certificate"
        ),
    }
    let csr = pki::create_csr(cn, ips)?;
    let signed = ca
        .sign(&csr.csr_pem)
        .map_err(|e| Error::AwsStartup(format!("the CA function refused the CSR: {e}")))?;
    let identity = Identity::from_pem(&signed.cert_pem, &csr.key_pem).map_err(|e| {
        Error::AwsStartup(format!(
            "the CA function returned a certificate that does not match the request: {e}"
        ))
    })?;
    let names = identity.names().map_err(|e| {
        Error::AwsStartup(format!(
            "the CA function returned an unreadable certificate: {e}"
        ))
    })?;
    if let Some(why) = names_differ(&names, cn, ips).or_else(|| identity.usage_problem(role)) {
        return Err(Error::AwsStartup(format!(
            "the CA function returned a certificate that does not match the request: {why}"
        )));
    }
    certs_from_pem(&signed.ca_pem, "the CA function's CA certificate")?;
    pki::write_atomic(&files.key, csr.key_pem.as_bytes(), pki::KEY_MODE)?;
    pki::write_atomic(&files.cert, signed.cert_pem.as_bytes(), pki::CERT_MODE)?;
    pki::write_atomic(&files.ca, signed.ca_pem.as_bytes(), pki::CERT_MODE)?;
    tracing::info!(cert = %files.cert.display(), cn, ?ips, "certificate issued by the CA function");
    Ok(Obtained::Issued)
}

/// [`obtain`]s this server's certificate, naming `server_ip` and the agent's address,
/// renewing one with less than `renew_before` left; when the CA refuses, asks
/// `latest_agent_ip` once more and, if the agent's address changed, asks the CA again. The
/// CA certifies only the address Wake stored last, and a Wake from another address may land
/// between the server's read and its request. Returns where the certificate came from and
/// the agent address it names.
pub fn obtain_server(
    files: &CertFiles,
    cn: &str,
    server_ip: IpAddr,
    agent_ip: IpAddr,
    ca: &dyn CertificateAuthority,
    renew_before: Duration,
    latest_agent_ip: impl FnOnce() -> Option<IpAddr>,
) -> Result<(Obtained, IpAddr), Error> {
    let e = match obtain(
        files,
        cn,
        &[server_ip, agent_ip],
        PeerRole::Server,
        ca,
        renew_before,
    ) {
        Ok(obtained) => return Ok((obtained, agent_ip)),
        Err(e) => e,
    };
    match latest_agent_ip() {
        Some(now) if now != agent_ip => {
            tracing::info!(was = %agent_ip, %now, "the agent's address changed: asking the CA again");
            let obtained = obtain(
                files,
                cn,
                &[server_ip, now],
                PeerRole::Server,
                ca,
                renew_before,
            )?;
            Ok((obtained, now))
        }
        _ => Err(e),
    }
}

/// How long before its end a certificate valid from `not_before` to `not_after` is
/// renewed while the server runs: when a third of its life is left, and at most
/// [`SERVER_RENEW_BEFORE`](super::SERVER_RENEW_BEFORE) before its end (the last day of a
/// 7-day server certificate).
pub fn renewal_window(not_before: SystemTime, not_after: SystemTime) -> Duration {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    (life / 3).min(super::SERVER_RENEW_BEFORE)
}

/// How long after a failed renewal it is tried again while the certificate is valid.
const RETRY_WHILE_VALID: Duration = Duration::from_secs(5 * 60);

/// How long after a failed renewal it is tried again once the certificate has expired,
/// and the least time between two attempts. New tunnels fail until it is renewed; the CA
/// may have refused for want of an agent address stored in the last hour, which an agent
/// that looks for the server again stores with its Wake, and that agent should not wait
/// long.
const RETRY_EXPIRED: Duration = Duration::from_secs(30);

/// Keeps the certificate in `files` renewed for as long as it runs (drop it to stop): once
/// within its [`renewal_window`], `renew(window)` is run on a thread (it should [`obtain`]
/// a certificate with that `renew_before`), then `reload` so that new handshakes present
/// the new one. A failure is logged and tried again, after 5 minutes while the
/// certificate is valid and 30 s once it has ended. Tunnels already up are not affected
/// by the certificate's end.
pub async fn keep_renewed(
    files: CertFiles,
    renew: impl Fn(Duration) -> Result<Obtained, Error> + Send + Sync + 'static,
    reload: impl Fn() -> Result<(), Error>,
) {
    let renew = std::sync::Arc::new(renew);
    // A renewal that waits for an agent's address may fail every 30 s for long: said once
    // an hour.
    let failures = fluidity_runtime_smol::app::LogThrottle::new(Duration::from_secs(3600));
    // The least wait before the next attempt: the retry interval after a failure.
    let mut pause = Duration::ZERO;
    // A new certificate was written but could not be loaded: it is loaded again after
    // `pause`, however far off its own renewal is.
    let mut unloaded = false;
    loop {
        let validity = pki::read_pem_file(&files.cert).and_then(|pem| pki::validity_period(&pem));
        // An unreadable certificate is renewed at once: `obtain` writes a new one.
        let (window, not_after) = match &validity {
            Ok((not_before, not_after)) => (renewal_window(*not_before, *not_after), *not_after),
            Err(_) => (super::SERVER_RENEW_BEFORE, SystemTime::UNIX_EPOCH),
        };
        let due = not_after
            .checked_sub(window)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let until_due = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        // Only loading is tried again while the certificate written is readable and not
        // due itself.
        let load_only = unloaded && validity.is_ok() && !until_due.is_zero();
        let wait = if load_only { Duration::ZERO } else { until_due };
        async_io::Timer::after(wait.max(pause)).await;
        let obtained = if load_only {
            Ok(Obtained::Issued)
        } else {
            let r = renew.clone();
            blocking::unblock(move || r(window)).await
        };
        let result = match obtained {
            Ok(Obtained::Issued) => {
                let loaded =
                    reload().map_err(|e| format!("a renewed certificate could not be loaded: {e}"));
                unloaded = loaded.is_err();
                loaded.map(|()| true)
            }
            // Not due yet by the wall clock (a timer may fire a little early).
            Ok(Obtained::Cached) => Ok(false),
            Err(e) => Err(format!("could not renew the server certificate: {e}")),
        };
        match result {
            Ok(renewed) => {
                pause = RETRY_EXPIRED;
                if renewed {
                    tracing::info!(cert = %files.cert.display(), "server certificate renewed");
                }
            }
            Err(e) => {
                // Every 30 s from the certificate's end, however soon that is.
                let until_end = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                pause = if unloaded {
                    RETRY_EXPIRED
                } else {
                    RETRY_WHILE_VALID.min(until_end).max(RETRY_EXPIRED)
                };
                match failures.allow(std::time::Instant::now()) {
                    Some(held_back) => tracing::warn!(error = %e, retry_secs = pause.as_secs(),
                        held_back, "trying again"),
                    None => tracing::debug!(error = %e, "trying again"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidity_runtime_smol::pki::{generate_ca, sign_csr, CaBundle, CertUsage, RENEW_BEFORE};
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/fluidity/0123456789abcdef";
    const OTHER_ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/fluidity/fedcba9876543210";

    /// A CA that signs everything with a real CA key, for `life`, and counts its calls.
    struct TestCa {
        ca: CaBundle,
        life: Duration,
        /// The end every certificate it issues is for.
        usage: CertUsage,
        calls: AtomicUsize,
    }

    impl TestCa {
        /// A CA issuing server certificates.
        fn new(days: u64) -> TestCa {
            TestCa {
                ca: generate_ca("test CA", Duration::from_secs(3650 * 86400)).unwrap(),
                life: Duration::from_secs(days * 86400),
                usage: CertUsage::Server,
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl CertificateAuthority for TestCa {
        fn sign(&self, csr_pem: &str) -> Result<SignedCertificate, String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let cert_pem =
                sign_csr(&self.ca, csr_pem, self.usage, self.life).map_err(|e| e.to_string())?;
            Ok(SignedCertificate {
                cert_pem,
                ca_pem: self.ca.cert_pem().to_owned(),
            })
        }
    }

    /// A CA that answers with a certificate for other names than asked.
    struct LyingCa(TestCa);

    impl CertificateAuthority for LyingCa {
        fn sign(&self, _csr_pem: &str) -> Result<SignedCertificate, String> {
            let other = pki::create_csr(OTHER_ARN, &["192.0.2.1".parse().unwrap()]).unwrap();
            self.0.sign(&other.csr_pem)
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// A CA that signs only CSRs naming `agent` (the address Wake stored last).
    struct WakeBoundCa(TestCa, IpAddr);

    impl CertificateAuthority for WakeBoundCa {
        fn sign(&self, csr_pem: &str) -> Result<SignedCertificate, String> {
            let names = pki::csr_names(csr_pem).map_err(|e| e.to_string())?;
            if !names.ip_sans.contains(&self.1) {
                return Err("csr_refused: not the agent address Wake stored".into());
            }
            self.0.sign(csr_pem)
        }
    }

    #[test]
    fn a_wake_from_another_address_during_start_up_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "server");
        let [server, old, new] = [
            ips(&["198.51.100.7"]),
            ips(&["203.0.113.9"]),
            ips(&["203.0.113.10"]),
        ]
        .map(|v| v[0]);
        let ca = WakeBoundCa(TestCa::new(7), new);
        let got = obtain_server(
            &files,
            ARN,
            server,
            old,
            &ca,
            super::super::SERVER_RENEW_BEFORE,
            || Some(new),
        )
        .unwrap();
        assert_eq!(got, (Obtained::Issued, new));
        let names = Identity::load(&files.cert, &files.key)
            .unwrap()
            .names()
            .unwrap();
        assert_eq!(names.ip_sans, vec![server, new]);
        // An address that did not change is the CA's refusal, not a race.
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "server");
        let ca = WakeBoundCa(TestCa::new(7), new);
        let e = obtain_server(
            &files,
            ARN,
            server,
            old,
            &ca,
            super::super::SERVER_RENEW_BEFORE,
            || Some(old),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("not the agent address Wake stored"),
            "{e}"
        );
        assert_eq!(
            ca.0.calls.load(Ordering::Relaxed),
            0,
            "asked once, refused before signing"
        );
    }

    #[test]
    fn issues_then_reuses_and_reissues_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(&dir.path().join("cache"), "server");
        let ca = TestCa::new(365);
        let addrs = ips(&["198.51.100.7", "203.0.113.9"]);

        assert_eq!(
            obtain(&files, ARN, &addrs, PeerRole::Server, &ca, RENEW_BEFORE).unwrap(),
            Obtained::Issued
        );
        assert_eq!(ca.calls.load(Ordering::Relaxed), 1);
        let names = Identity::load(&files.cert, &files.key)
            .unwrap()
            .names()
            .unwrap();
        assert_eq!(names.common_name.as_deref(), Some(ARN));
        assert_eq!(names.ip_sans, addrs);

        // Same names in another order: the cache fits.
        let reversed: Vec<IpAddr> = addrs.iter().rev().copied().collect();
        assert_eq!(
            obtain(&files, ARN, &reversed, PeerRole::Server, &ca, RENEW_BEFORE).unwrap(),
            Obtained::Cached
        );
        assert_eq!(ca.calls.load(Ordering::Relaxed), 1);

        // Another server or another agent address: a new certificate.
        assert_eq!(
            obtain(
                &files,
                OTHER_ARN,
                &addrs,
                PeerRole::Server,
                &ca,
                RENEW_BEFORE
            )
            .unwrap(),
            Obtained::Issued
        );
        let moved = ips(&["198.51.100.7", "203.0.113.10"]);
        assert_eq!(
            obtain(
                &files,
                OTHER_ARN,
                &moved,
                PeerRole::Server,
                &ca,
                RENEW_BEFORE
            )
            .unwrap(),
            Obtained::Issued
        );
        assert_eq!(ca.calls.load(Ordering::Relaxed), 3);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key must not be readable by others");
        }
    }

    /// A cache folder that someone else made (in a shared /tmp, say) holds what they put
    /// there, a CA of their own among it: it is refused before anything in it is read.
    #[cfg(unix)]
    #[test]
    fn a_cache_folder_of_another_user_or_writable_by_all_is_refused_unread() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "server");
        let ca = TestCa::new(365);
        let addrs = ips(&["198.51.100.7"]);
        let get = || obtain(&files, ARN, &addrs, PeerRole::Server, &ca, RENEW_BEFORE);
        assert_eq!(get().unwrap(), Obtained::Issued);
        assert_eq!(get().unwrap(), Obtained::Cached);

        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = get().unwrap_err().to_string();
        assert!(err.contains("may be written to by every user"), "{err}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o770)).unwrap();
        assert_eq!(get().unwrap(), Obtained::Cached);

        // Another owner: only root can make one here (as CI runs).
        if std::os::unix::fs::chown(dir.path(), Some(65534), None).is_ok() {
            let err = get().unwrap_err().to_string();
            assert!(err.contains("belongs to another user"), "{err}");
        }
        assert_eq!(ca.calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_running_server_renews_its_certificate_in_the_last_third_of_its_life() {
        let day = Duration::from_secs(86_400);
        let t0 = SystemTime::UNIX_EPOCH + 1000 * day;
        assert_eq!(renewal_window(t0, t0 + 7 * day), day);
        assert_eq!(renewal_window(t0, t0 + 2 * day), 2 * day / 3);
        assert_eq!(
            renewal_window(t0, t0 + Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(renewal_window(t0, t0), Duration::ZERO);
    }

    /// While the server runs, a certificate in its renewal window is replaced by a new one
    /// from the CA, and the server is told to load it.
    #[test]
    fn keep_renewed_replaces_a_certificate_before_it_ends_and_reloads() {
        use futures_lite::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "server");
        let addrs = ips(&["198.51.100.7", "203.0.113.9"]);
        // A certificate 6 s from its end, well inside its window (a third of a life that
        // began 5 minutes back, as issued certificates do); the CA then issues for a day.
        let short = TestCa {
            life: Duration::from_secs(6),
            ..TestCa::new(1)
        };
        obtain(
            &files,
            ARN,
            &addrs,
            PeerRole::Server,
            &short,
            Duration::ZERO,
        )
        .unwrap();
        let first = fs::read_to_string(&files.cert).unwrap();
        let ca = std::sync::Arc::new(TestCa::new(1));
        let (renewer, renew_files, renew_addrs) = (ca.clone(), files.clone(), addrs.clone());
        let renew = move |window| {
            obtain(
                &renew_files,
                ARN,
                &renew_addrs,
                PeerRole::Server,
                &*renewer,
                window,
            )
        };
        // The reload reads what the renewal wrote, as the server's does.
        let (loaded_tx, loaded_rx) = async_channel::unbounded();
        let reload_files = files.clone();
        let reload = move || {
            let loaded = Identity::load(&reload_files.cert, &reload_files.key)?;
            let names = loaded
                .names()
                .map_err(|e| Error::AwsStartup(e.to_string()))?;
            let _ = loaded_tx.try_send(names.common_name);
            Ok(())
        };
        let renewing = async {
            keep_renewed(files.clone(), renew, reload).await;
            None
        };
        let loaded =
            futures_lite::future::block_on(renewing.or(async { loaded_rx.recv().await.ok() }).or(
                async {
                    async_io::Timer::after(Duration::from_secs(60)).await;
                    None
                },
            ));
        assert_eq!(loaded, Some(Some(ARN.to_owned())), "no renewal was loaded");
        assert_eq!(ca.calls.load(Ordering::Relaxed), 1);
        let second = fs::read_to_string(&files.cert).unwrap();
        assert_ne!(first, second);
        assert!(pki::not_after(&second).unwrap() > pki::not_after(&first).unwrap());
    }

    #[test]
    fn renews_within_thirty_days_of_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "agent");
        let addrs = ips(&["203.0.113.9"]);
        let short = TestCa::new(20);
        assert_eq!(
            obtain(&files, ARN, &addrs, PeerRole::Server, &short, RENEW_BEFORE).unwrap(),
            Obtained::Issued
        );
        let why = cached_unusable(
            &files,
            ARN,
            &addrs,
            PeerRole::Server,
            SystemTime::now(),
            RENEW_BEFORE,
        )
        .unwrap();
        assert!(why.contains("renewal window"), "{why}");
        assert_eq!(
            obtain(&files, ARN, &addrs, PeerRole::Server, &short, RENEW_BEFORE).unwrap(),
            Obtained::Issued
        );
        assert_eq!(short.calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refuses_a_certificate_for_other_names_and_a_broken_cache() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "agent");
        let addrs = ips(&["203.0.113.9"]);
        let err = obtain(
            &files,
            ARN,
            &addrs,
            PeerRole::Server,
            &LyingCa(TestCa::new(365)),
            RENEW_BEFORE,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not match the request"), "{err}");
        assert!(
            !files.cert.exists(),
            "a wrong certificate must not be cached"
        );

        let ca = TestCa::new(365);
        obtain(&files, ARN, &addrs, PeerRole::Server, &ca, RENEW_BEFORE).unwrap();
        fs::write(&files.key, "garbage").unwrap();
        assert!(cached_unusable(
            &files,
            ARN,
            &addrs,
            PeerRole::Server,
            SystemTime::now(),
            RENEW_BEFORE
        )
        .is_some());
        assert_eq!(
            obtain(&files, ARN, &addrs, PeerRole::Server, &ca, RENEW_BEFORE).unwrap(),
            Obtained::Issued
        );
    }

    #[test]
    fn refuses_and_replaces_a_certificate_for_the_other_end() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path(), "server");
        let addrs = ips(&["203.0.113.9"]);
        // A CA that issues every certificate for the agent's end (clientAuth).
        let agents = TestCa {
            usage: CertUsage::Client,
            ..TestCa::new(365)
        };
        let err = obtain(&files, ARN, &addrs, PeerRole::Server, &agents, RENEW_BEFORE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the request"), "{err}");
        assert!(err.contains("extended key usage"), "{err}");
        assert!(
            !files.cert.exists(),
            "a wrong certificate must not be cached"
        );

        // An agent's certificate left where the server's belongs is not used: it is
        // replaced by one for the server.
        obtain(&files, ARN, &addrs, PeerRole::Client, &agents, RENEW_BEFORE).unwrap();
        let now = SystemTime::now();
        let why = cached_unusable(&files, ARN, &addrs, PeerRole::Server, now, RENEW_BEFORE);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("extended key usage")),
            "{why:?}"
        );
        let ca = TestCa::new(365);
        assert_eq!(
            obtain(&files, ARN, &addrs, PeerRole::Server, &ca, RENEW_BEFORE).unwrap(),
            Obtained::Issued
        );
        assert_eq!(
            cached_unusable(&files, ARN, &addrs, PeerRole::Server, now, RENEW_BEFORE),
            None
        );
    }
}
