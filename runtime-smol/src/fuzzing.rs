//! Entry points for fuzzing (`fuzz/fuzz_targets/`): certificates and keys as a peer or a
//! file hands them over. Each must never panic, whatever the bytes.

use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use crate::{pki, tls};

/// `data` as a peer's DER certificate, and as PEM text: certificates, a key, a CA bundle,
/// an identity (certificate and key in one text), a validity period.
pub fn certificates(data: &[u8]) {
    let now = SystemTime::now();
    let _ = tls::PeerIdentity::from_der(data);
    let der = CertificateDer::from(data.to_vec());
    let _ = pki::validity_problem(&der, now);
    let _ = pki::outside_validity(&der, now);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(certs) = tls::certs_from_pem(text, "fuzz") {
        for cert in &certs {
            let _ = tls::PeerIdentity::from_der(cert);
            let _ = pki::validity_problem(cert, now);
        }
    }
    let _ = tls::key_from_pem(text, "fuzz");
    let _ = tls::CaRoots::from_pem(text);
    let _ = pki::validity_period(text);
    if let Ok(identity) = tls::Identity::from_pem(text, text) {
        let _ = identity.names();
    }
}

#[cfg(test)]
mod tests {
    /// The seeds of `fuzz/corpus/certificates` go through the entry point, and each is a
    /// certificate that parses (as DER or as PEM), so the fuzzer starts from real ones; one
    /// holds its key too, so the key and identity parsers start from real input as well.
    #[test]
    fn the_seeds_replay_and_are_certificates() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/certificates");
        let mut seeds = 0;
        let mut identities = 0;
        for entry in std::fs::read_dir(&dir).expect("the corpus") {
            let path = entry.expect("an entry").path();
            let data = std::fs::read(&path).expect("a seed");
            super::certificates(&data);
            let parses = crate::tls::PeerIdentity::from_der(&data).is_ok()
                || std::str::from_utf8(&data).is_ok_and(|pem| {
                    crate::tls::certs_from_pem(pem, "seed")
                        .is_ok_and(|c| crate::tls::PeerIdentity::from_der(&c[0]).is_ok())
                });
            assert!(parses, "{} is no certificate", path.display());
            if let Ok(pem) = std::str::from_utf8(&data) {
                if crate::tls::key_from_pem(pem, "seed").is_ok()
                    && crate::tls::Identity::from_pem(pem, pem).is_ok()
                {
                    identities += 1;
                }
            }
            seeds += 1;
        }
        assert!(seeds >= 4, "{seeds} seeds");
        assert!(identities >= 1, "no seed holds a certificate with its key");
    }

    #[test]
    fn the_entry_point_takes_real_and_broken_certificates() {
        let ca = crate::pki::generate_ca("fuzz CA", std::time::Duration::from_secs(86_400))
            .expect("a CA");
        let pem = ca.cert_pem().to_owned();
        let der = crate::tls::certs_from_pem(&pem, "CA").expect("its certificate")[0].to_vec();
        super::certificates(pem.as_bytes());
        super::certificates(&der);
        super::certificates(&der[..der.len() / 2]);
        super::certificates(&pem.as_bytes()[..pem.len() / 2]);
        super::certificates(b"");
    }
}
