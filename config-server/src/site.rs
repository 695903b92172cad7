//! `config-server init`: a new site. Its CA and the server's own certificate (in
//! `<data>/pki/`), a random passphrase shown once, and the salted verifier stored in its
//! place.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

use crate::state::{SiteRecord, State};
use fbr_enroll::proof;

/// The PKI directory of a data directory.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// File stem of the server's certificate.
pub const SERVER_CERT_NAME: &str = "config-server";

/// Passphrase letters: no look-alikes (0/o, 1/l/i).
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
/// Letters in a passphrase: 4 groups of 5, about 99 bits.
const PASSPHRASE_LETTERS: usize = 20;

/// What `init` made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewSite {
    pub site_id: String,
    /// Shown once; stored nowhere.
    pub passphrase: String,
    pub ca: PathBuf,
}

fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(b)
}

/// A random passphrase like `k7dzq-m3tpa-x9wce-h2nrf`.
pub fn new_passphrase() -> anyhow::Result<String> {
    let mut letters = String::new();
    while letters.len() < PASSPHRASE_LETTERS {
        for b in random_bytes(32)? {
            // Rejection sampling: no bias towards the first letters.
            let limit = 256 - 256 % ALPHABET.len();
            if (b as usize) < limit && letters.len() < PASSPHRASE_LETTERS {
                letters.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    let groups: Vec<&str> = (0..PASSPHRASE_LETTERS)
        .step_by(5)
        .map(|i| &letters[i..i + 5])
        .collect();
    Ok(groups.join("-"))
}

/// Creates the site in `data_dir`: refused if one is there.
pub fn init(
    data_dir: &Path,
    dns_names: &[String],
    ip_addresses: &[IpAddr],
    iterations: u32,
) -> anyhow::Result<NewSite> {
    let state = State::open(data_dir)?;
    anyhow::ensure!(
        state.site()?.is_none(),
        "{} already holds a site (config-server init runs once)",
        data_dir.display()
    );
    let pki = pki_dir(data_dir);
    fbr_transport::pki::init_ca(&pki, "failback site CA")?;
    let mut names = vec![SERVER_CERT_NAME.to_owned()];
    names.extend(dns_names.iter().cloned());
    fbr_transport::pki::issue(
        &pki,
        &fbr_transport::pki::IssueRequest {
            name: SERVER_CERT_NAME.into(),
            role: fbr_transport::Role::ConfigServer,
            vms: vec![],
            dns_names: names,
            ip_addresses: ip_addresses.to_vec(),
        },
    )?;
    let passphrase = new_passphrase()?;
    let salt = random_bytes(proof::SALT_LEN)?;
    let verifier = proof::derive(&passphrase, &salt, iterations);
    let site_id = proof::to_hex(&random_bytes(8)?);
    state.create_site(&SiteRecord {
        version: 1,
        site_id: site_id.clone(),
        salt: proof::to_hex(&salt),
        iterations,
        verifier: proof::to_hex(&verifier.0),
        created_ms: now_ms(),
    })?;
    ensure_operator_token(data_dir, &state)?;
    Ok(NewSite {
        site_id,
        passphrase,
        ca: pki.join("ca.pem"),
    })
}

/// The operator token's file in the data directory (mode 0600).
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// Makes a new operator token when `<data>/operator.token` is missing (a new site, or
/// an operator who deleted it to rotate it): 32 random bytes, hex, in the file; only
/// its SHA-256 in the state. Returns whether it made one.
pub fn ensure_operator_token(data_dir: &Path, state: &State) -> anyhow::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(OPERATOR_TOKEN_FILE);
    if path.exists() {
        return Ok(false);
    }
    let token = proof::to_hex(&random_bytes(32)?);
    state.set_operator_token_sha256(&token_sha256_hex(&token))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// What the state keeps of an operator token: its SHA-256, hex.
pub fn token_sha256_hex(token: &str) -> String {
    proof::to_hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Reads the operator token of a data directory.
pub fn read_operator_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(OPERATOR_TOKEN_FILE);
    let token = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (the operator token: run as the configuration server's user)",
            path.display()
        )
    })?;
    Ok(token.trim().to_owned())
}

/// The clock, UNIX milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn passphrases_are_four_groups_of_unambiguous_letters_and_differ() {
        let a = new_passphrase().unwrap();
        let b = new_passphrase().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 23);
        assert!(a
            .split('-')
            .all(|g| g.len() == 5 && g.bytes().all(|c| ALPHABET.contains(&c))));
    }

    #[test]
    fn init_runs_once_and_stores_no_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let site = init(dir.path(), &[], &[], proof::MIN_ITERATIONS).unwrap();
        assert!(site.ca.exists());
        let err = init(dir.path(), &[], &[], proof::MIN_ITERATIONS).unwrap_err();
        assert!(err.to_string().contains("already"), "{err}");
        let stored = std::fs::read(dir.path().join(crate::state::STATE_FILE)).unwrap();
        let needle = site.passphrase.as_bytes();
        assert!(!stored.windows(needle.len()).any(|w| w == needle));
    }
}
