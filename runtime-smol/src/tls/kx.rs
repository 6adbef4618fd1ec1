//! X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem), the hybrid post-quantum key exchange the
//! tunnel's TLS prefers, from ring's X25519 and libcrux's ML-KEM-768.
//!
//! ring, the crypto provider, has no ML-KEM; without this group the key exchange would be
//! X25519 alone (as it was before this module: rustls on aws-lc-rs lists X25519 first),
//! and traffic recorded today could be decrypted once a quantum computer can break X25519. As the draft lays it out, the ML-KEM part comes first everywhere: the
//! client's share is its encapsulation key then its X25519 share, the server's share is
//! its ciphertext then its X25519 share, and the secret is the ML-KEM secret then the
//! X25519 one. Whoever breaks one half still faces the other.

use libcrux_ml_kem::mlkem768::{self, MlKem768Ciphertext, MlKem768PrivateKey, MlKem768PublicKey};
use libcrux_ml_kem::{KEY_GENERATION_SEED_SIZE, SHARED_SECRET_SIZE};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::ring::kx_group::X25519;
use rustls::crypto::{
    ActiveKeyExchange, CompletedKeyExchange, GetRandomFailed, SharedSecret, SupportedKxGroup,
};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::{Zeroize, Zeroizing};

/// The X25519MLKEM768 key exchange group (code point 0x11ec), TLS 1.3 only.
pub(super) static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

const X25519_LEN: usize = 32;
/// An ML-KEM-768 encapsulation (public) key.
const ENCAPSULATION_KEY_LEN: usize = 1184;
/// An ML-KEM-768 ciphertext.
const CIPHERTEXT_LEN: usize = 1088;

const INVALID_KEY_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// The client's side: a fresh X25519 key and ML-KEM key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let x25519 = X25519.start()?;
        // The seed determines the key pair, so it is wiped once used. (The copies libcrux
        // makes of it and of the key pair on the stack cannot be reached from here.)
        let seed = random::<KEY_GENERATION_SEED_SIZE>()?;
        let (decapsulation_key, encapsulation_key) =
            mlkem768::generate_key_pair(*seed).into_parts();
        let mut pub_key = Vec::with_capacity(ENCAPSULATION_KEY_LEN + X25519_LEN);
        pub_key.extend_from_slice(encapsulation_key.as_slice());
        pub_key.extend_from_slice(x25519.pub_key());
        Ok(Box::new(Active {
            x25519,
            decapsulation_key: DecapsulationKey(decapsulation_key),
            pub_key,
        }))
    }

    /// The server's side: encapsulates to the client's key and completes X25519 with its
    /// share, in one step.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let (encapsulation_key, x25519_share) = split(client_share, ENCAPSULATION_KEY_LEN)?;
        let encapsulation_key =
            MlKem768PublicKey::try_from(encapsulation_key).map_err(|_| INVALID_KEY_SHARE)?;
        // FIPS 203 §7.2: an encapsulation key whose coefficients are not reduced is refused.
        if !mlkem768::validate_public_key(&encapsulation_key) {
            return Err(INVALID_KEY_SHARE);
        }
        let x25519 = X25519.start_and_complete(x25519_share)?;
        let seed = random::<SHARED_SECRET_SIZE>()?;
        let (ciphertext, mut ml_kem_secret) = mlkem768::encapsulate(&encapsulation_key, *seed);
        let mut pub_key = Vec::with_capacity(CIPHERTEXT_LEN + X25519_LEN);
        pub_key.extend_from_slice(ciphertext.as_slice());
        pub_key.extend_from_slice(&x25519.pub_key);
        let secret = combine(&ml_kem_secret, x25519.secret.secret_bytes());
        ml_kem_secret.zeroize();
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret,
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The client's key exchange in progress.
struct Active {
    x25519: Box<dyn ActiveKeyExchange>,
    decapsulation_key: DecapsulationKey,
    /// The client's share: encapsulation key, then X25519 share.
    pub_key: Vec<u8>,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        let (ciphertext, x25519_share) = split(server_share, CIPHERTEXT_LEN)?;
        let ciphertext = MlKem768Ciphertext::try_from(ciphertext).map_err(|_| INVALID_KEY_SHARE)?;
        let Active {
            x25519,
            decapsulation_key,
            ..
        } = *self;
        let x25519_secret = x25519.complete(x25519_share)?;
        // Decapsulation never fails: a forged ciphertext yields an unrelated secret
        // (implicit rejection), and the handshake's Finished check fails instead.
        let mut ml_kem_secret = mlkem768::decapsulate(&decapsulation_key.0, &ciphertext);
        let secret = combine(&ml_kem_secret, x25519_secret.secret_bytes());
        ml_kem_secret.zeroize();
        Ok(secret)
    }

    /// Offers the X25519 half as a key share of its own, so that a server without
    /// X25519MLKEM768 (an AWS endpoint, an older server) picks it without another round trip.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((self.x25519.group(), self.x25519.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.x25519.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.pub_key
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// An ML-KEM decapsulation (private) key, wiped when dropped.
struct DecapsulationKey(MlKem768PrivateKey);

impl Drop for DecapsulationKey {
    fn drop(&mut self) {
        self.0[0..].zeroize();
    }
}

/// Splits a share into its ML-KEM part (`ml_kem_len` bytes) and its X25519 part.
fn split(share: &[u8], ml_kem_len: usize) -> Result<(&[u8], &[u8]), Error> {
    if share.len() != ml_kem_len + X25519_LEN {
        return Err(INVALID_KEY_SHARE);
    }
    Ok(share.split_at(ml_kem_len))
}

/// The hybrid secret: the ML-KEM secret, then the X25519 one.
fn combine(ml_kem: &[u8], x25519: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(ml_kem.len() + x25519.len());
    secret.extend_from_slice(ml_kem);
    secret.extend_from_slice(x25519);
    SharedSecret::from(secret)
}

/// `N` random bytes, wiped when dropped.
fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, Error> {
    let mut bytes = Zeroizing::new([0; N]);
    SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| Error::from(GetRandomFailed))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls's own X25519MLKEM768, on aws-lc-rs: the reference this one must agree with.
    fn reference() -> &'static dyn SupportedKxGroup {
        rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768
    }

    fn exchange(
        client: &dyn SupportedKxGroup,
        server: &dyn SupportedKxGroup,
    ) -> (Vec<u8>, Vec<u8>) {
        let active = client.start().expect("client start");
        assert_eq!(active.pub_key().len(), ENCAPSULATION_KEY_LEN + X25519_LEN);
        let completed = server
            .start_and_complete(active.pub_key())
            .expect("server completes");
        assert_eq!(completed.group, NamedGroup::X25519MLKEM768);
        assert_eq!(completed.pub_key.len(), CIPHERTEXT_LEN + X25519_LEN);
        let client_secret = active
            .complete(&completed.pub_key)
            .expect("client completes");
        (
            client_secret.secret_bytes().to_vec(),
            completed.secret.secret_bytes().to_vec(),
        )
    }

    #[test]
    fn both_ends_agree_on_a_64_byte_secret() {
        let (client, server) = exchange(X25519MLKEM768, X25519MLKEM768);
        assert_eq!(client.len(), 64);
        assert_eq!(client, server);
    }

    #[test]
    fn both_halves_are_fresh_every_time() {
        // Each half on its own: a fixed ML-KEM seed would leave the X25519 half changing
        // and the post-quantum half protecting nothing.
        let a = X25519MLKEM768.start().expect("client start");
        let b = X25519MLKEM768.start().expect("client start");
        let (a_kem, a_x) = a.pub_key().split_at(ENCAPSULATION_KEY_LEN);
        let (b_kem, b_x) = b.pub_key().split_at(ENCAPSULATION_KEY_LEN);
        assert_ne!(a_kem, b_kem, "ML-KEM key pairs must differ");
        assert_ne!(a_x, b_x, "X25519 keys must differ");

        let one = X25519MLKEM768
            .start_and_complete(a.pub_key())
            .expect("server completes");
        let two = X25519MLKEM768
            .start_and_complete(a.pub_key())
            .expect("server completes");
        assert_ne!(
            one.pub_key[..CIPHERTEXT_LEN],
            two.pub_key[..CIPHERTEXT_LEN],
            "encapsulations to one key must differ"
        );
        assert_ne!(
            one.secret.secret_bytes()[..32],
            two.secret.secret_bytes()[..32],
            "their ML-KEM secrets must differ"
        );
    }

    #[test]
    fn it_agrees_with_the_reference_implementation_in_both_roles() {
        let (client, server) = exchange(X25519MLKEM768, reference());
        assert_eq!(client, server, "our client, reference server");
        let (client, server) = exchange(reference(), X25519MLKEM768);
        assert_eq!(client, server, "reference client, our server");
    }

    #[test]
    fn the_secret_is_the_ml_kem_secret_then_the_x25519_secret() {
        // Completing only the X25519 half with the same server share gives the last 32
        // bytes of the hybrid secret, whichever implementation is the server: the order
        // the draft fixes.
        for server in [X25519MLKEM768, reference()] {
            let active = X25519MLKEM768.start().expect("client start");
            let completed = server
                .start_and_complete(active.pub_key())
                .expect("server completes");
            let server_x25519 = &completed.pub_key[CIPHERTEXT_LEN..];
            let x25519_only = active
                .complete_hybrid_component(server_x25519)
                .expect("X25519 half");
            assert_eq!(
                &completed.secret.secret_bytes()[32..],
                x25519_only.secret_bytes(),
                "{server:?}"
            );
        }
    }

    #[test]
    fn it_is_for_tls_1_3_only() {
        assert!(X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
        assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
        assert_eq!(X25519MLKEM768.name(), NamedGroup::X25519MLKEM768);
        assert!(X25519MLKEM768.ffdhe_group().is_none());
    }

    #[test]
    fn the_x25519_half_is_offered_alone_too() {
        let active = X25519MLKEM768.start().expect("client start");
        let (group, share) = active.hybrid_component().expect("hybrid component");
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(share, &active.pub_key()[ENCAPSULATION_KEY_LEN..]);
    }

    #[test]
    fn malformed_shares_are_refused() {
        let active = X25519MLKEM768.start().expect("client start");
        let share = active.pub_key().to_vec();
        for bad in [
            &share[..share.len() - 1],
            &[],
            &[share.as_slice(), &[0]].concat()[..],
        ] {
            assert!(matches!(
                X25519MLKEM768.start_and_complete(bad),
                Err(e) if e == INVALID_KEY_SHARE
            ));
        }
        // An encapsulation key with an unreduced coefficient (12 bits of ones ≥ q = 3329).
        let mut unreduced = share.clone();
        unreduced[0] = 0xff;
        unreduced[1] |= 0x0f;
        assert!(matches!(
            X25519MLKEM768.start_and_complete(&unreduced),
            Err(e) if e == INVALID_KEY_SHARE
        ));

        // An all-zero X25519 share (a low-order point) in the client's share.
        let mut zero_x25519 = share.clone();
        zero_x25519[ENCAPSULATION_KEY_LEN..].fill(0);
        assert!(X25519MLKEM768.start_and_complete(&zero_x25519).is_err());

        let completed = X25519MLKEM768
            .start_and_complete(&share)
            .expect("server completes");
        let server_share = &completed.pub_key;
        for bad in [
            &server_share[..server_share.len() - 1],
            &[server_share.as_slice(), &[0]].concat()[..],
        ] {
            let active = X25519MLKEM768.start().expect("client start");
            assert!(matches!(active.complete(bad), Err(e) if e == INVALID_KEY_SHARE));
        }
        // An all-zero X25519 part in the server's share.
        let mut zero_x25519 = server_share.clone();
        zero_x25519[CIPHERTEXT_LEN..].fill(0);
        assert!(active.complete(&zero_x25519).is_err());
    }

    #[test]
    fn a_forged_ciphertext_gives_an_unrelated_secret() {
        let active = X25519MLKEM768.start().expect("client start");
        let completed = X25519MLKEM768
            .start_and_complete(active.pub_key())
            .expect("server completes");
        let mut forged = completed.pub_key.clone();
        forged[0] ^= 1;
        let client = active.complete(&forged).expect("implicit rejection");
        assert_ne!(client.secret_bytes(), completed.secret.secret_bytes());
        assert_eq!(
            &client.secret_bytes()[32..],
            &completed.secret.secret_bytes()[32..],
            "the X25519 half is untouched"
        );
    }
}
