//! The passphrase proofs of enrollment, bound to one TLS session.
//!
//! Both sides know the site's passphrase (the configuration server only as its salted
//! verifier `K`). Neither sends it, nor any hash of it alone: each sends an HMAC under
//! `K` of the TLS session's exporter value and of what it vouches for. A peer on another
//! TLS session (a man in the middle terminating TLS on each side) sees a different
//! exporter value, so it can neither reuse a proof nor make one without `K`.
//!
//! ## Byte layout (version 1)
//!
//! `K = PBKDF2-HMAC-SHA256(passphrase as UTF-8, salt, iterations, 32 bytes)`; the salt is
//! 16 random bytes made by `config-server init`, the iterations at least
//! [`MIN_ITERATIONS`].
//!
//! `exporter = TLS-Exporter(label "EXPORTER-fbr-enroll-v1", no context, 32 bytes)` (RFC
//! 8446 section 7.5), the same on both ends of one TLS 1.3 session.
//!
//! A proof is `HMAC-SHA256(K, message)`, 32 bytes, sent as 64 lowercase hex digits, with
//! `message`:
//!
//! | bytes | field |
//! |---|---|
//! | 20 | label: `fbr-enroll-v1 client` (from the component) or `fbr-enroll-v1 server` (from the configuration server) |
//! | 1 | 0x00 |
//! | 32 | exporter |
//! | 32 | SHA-256 of what it vouches for: the certificate request's PEM (client), the issued certificate's PEM (server) |
//!
//! Pinned by `tests::proofs_are_pinned` (golden values).

use ring::{digest, hmac, pbkdf2};

/// The TLS exporter label both ends derive the session binding with.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-fbr-enroll-v1";
/// Fewest PBKDF2 iterations a client accepts (a server offering fewer is refused).
pub const MIN_ITERATIONS: u32 = 10_000;
/// Most PBKDF2 iterations a client accepts (a server cannot make it spin for minutes).
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// What `config-server init` uses.
pub const DEFAULT_ITERATIONS: u32 = 200_000;
/// Bytes of salt.
pub const SALT_LEN: usize = 16;

const CLIENT_LABEL: &[u8; 20] = b"fbr-enroll-v1 client";
const SERVER_LABEL: &[u8; 20] = b"fbr-enroll-v1 server";

/// The site's passphrase verifier: what the configuration server stores instead of the
/// passphrase.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier(pub [u8; 32]);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

/// `K` of a passphrase, a salt and an iteration count (see the module docs).
pub fn derive(passphrase: &str, salt: &[u8], iterations: u32) -> Verifier {
    let mut k = [0u8; 32];
    let n = std::num::NonZeroU32::new(iterations.max(1)).expect("at least one");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        n,
        salt,
        passphrase.as_bytes(),
        &mut k,
    );
    Verifier(k)
}

fn message(label: &[u8; 20], exporter: &[u8; 32], vouched: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(85);
    m.extend_from_slice(label);
    m.push(0);
    m.extend_from_slice(exporter);
    m.extend_from_slice(digest::digest(&digest::SHA256, vouched).as_ref());
    m
}

fn sign(k: &Verifier, m: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &k.0);
    let tag = hmac::sign(&key, m);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn check(k: &Verifier, m: &[u8], proof: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &k.0);
    hmac::verify(&key, m, proof).is_ok()
}

/// The component's proof for its certificate request `csr_pem`.
pub fn client_proof(k: &Verifier, exporter: &[u8; 32], csr_pem: &str) -> [u8; 32] {
    sign(k, &message(CLIENT_LABEL, exporter, csr_pem.as_bytes()))
}

/// Whether `proof` is the component's proof (constant time).
pub fn check_client_proof(k: &Verifier, exporter: &[u8; 32], csr_pem: &str, proof: &[u8]) -> bool {
    check(
        k,
        &message(CLIENT_LABEL, exporter, csr_pem.as_bytes()),
        proof,
    )
}

/// The configuration server's proof for the certificate `cert_pem` it issues.
pub fn server_proof(k: &Verifier, exporter: &[u8; 32], cert_pem: &str) -> [u8; 32] {
    sign(k, &message(SERVER_LABEL, exporter, cert_pem.as_bytes()))
}

/// Whether `proof` is the configuration server's proof (constant time).
pub fn check_server_proof(k: &Verifier, exporter: &[u8; 32], cert_pem: &str, proof: &[u8]) -> bool {
    check(
        k,
        &message(SERVER_LABEL, exporter, cert_pem.as_bytes()),
        proof,
    )
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of lowercase or uppercase hex; `None` if it is not hex of whole bytes.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values, computed independently (Python's hashlib and hmac) from the byte
    /// layout in the module docs: a change to it breaks enrollment between versions, so
    /// it must be deliberate (and bump the labels).
    #[test]
    fn proofs_are_pinned() {
        let k = derive("correct horse battery staple", &[7u8; 16], 10_000);
        assert_eq!(
            to_hex(&k.0),
            "7e703448b5c6647c928c72efe4d05ebdf0002419fef92dfbdaed1e872fcb1651"
        );
        let exporter = [0x42u8; 32];
        assert_eq!(
            to_hex(&client_proof(&k, &exporter, "CSR")),
            "a054b9d1af0dcfdd9f92eb1ed5b270ed9eadf1a9e6b22dfb985f16c6abf5bea8"
        );
        assert_eq!(
            to_hex(&server_proof(&k, &exporter, "CERT")),
            "9ee31d639f37ccf46d69c21b7b0116fbe1da7f154966861acf1014992956daf3"
        );
    }

    #[test]
    fn a_proof_holds_only_for_its_key_session_side_and_content() {
        let k = derive("site passphrase", b"0123456789abcdef", 10_000);
        let other = derive("another passphrase", b"0123456789abcdef", 10_000);
        let session = [1u8; 32];
        let p = client_proof(&k, &session, "csr");
        assert!(check_client_proof(&k, &session, "csr", &p));
        assert!(!check_client_proof(&other, &session, "csr", &p), "key");
        assert!(!check_client_proof(&k, &[2u8; 32], "csr", &p), "session");
        assert!(!check_client_proof(&k, &session, "csr2", &p), "content");
        assert!(!check_server_proof(&k, &session, "csr", &p), "side");
        assert!(!check_client_proof(&k, &session, "csr", &p[..31]), "length");
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        for bad in ["0", "zz", "0g", "é0"] {
            assert!(from_hex(bad).is_none(), "{bad}");
        }
    }
}
