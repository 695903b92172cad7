//! The project's small PKI: one CA per site, and a certificate per daemon or agent.
//!
//! Every certificate carries URI subject-alternative names that say what its holder may
//! do; the daemons read them back with [`crate::identity`]:
//!
//! | URI SAN                   | meaning                                               |
//! |---------------------------|-------------------------------------------------------|
//! | `urn:fbr:role:agent`      | a source agent (writes VM disks into the relay)       |
//! | `urn:fbr:role:relay`      | a relay (process server)                              |
//! | `urn:fbr:role:master-target` | a master target                                    |
//! | `urn:fbr:role:config-server` | the site's configuration server                    |
//! | `urn:fbr:vm:<name>`       | may write the disks of VM `<name>`                    |
//! | `urn:fbr:vm:*`            | may write the disks of any VM (relays)                |
//!
//! A PKI directory holds `ca.pem` and `ca.key` plus `<name>.pem` and `<name>.key` for
//! each issued certificate. Nothing is ever overwritten: issuing a name that exists is an
//! error, so keys are never regenerated silently.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{Role, ROLE_URI_PREFIX, VM_URI_PREFIX};

/// What can go wrong managing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "{0} already exists; refusing to overwrite a key (remove it deliberately to re-issue)"
    )]
    Exists(PathBuf),
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates a new CA in `dir` (`ca.pem`, `ca.key`). Fails if one exists.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// What to put in a certificate being issued.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// File stem in the PKI directory and the certificate's common name.
    pub name: String,
    pub role: Role,
    /// VMs the holder may write; `["*"]` for any.
    pub vms: Vec<String>,
    /// DNS names the holder serves under (server certificates), e.g. `relay`.
    pub dns_names: Vec<String>,
    /// IP addresses the holder serves under.
    pub ip_addresses: Vec<IpAddr>,
}

/// Issues `<name>.pem` and `<name>.key` in `dir`, signed by the CA there.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<(), PkiError> {
    validate_request(req)?;
    let cert_path = dir.join(format!("{}.pem", req.name));
    let key_path = dir.join(format!("{}.key", req.name));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let (ca_cert, ca_key) = load_ca(dir)?;
    let key = KeyPair::generate()?;
    let cert = certificate_params(req)?.signed_by(&key, &ca_cert, &ca_key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Signs a certificate for the key of `csr_pem` (a PKCS#10 request, its signature
/// checked) with the CA in `dir`. What the certificate says comes from `req` alone,
/// never from the request: a requester cannot grant itself a role or a VM. Returns the
/// certificate's PEM; nothing is written.
pub fn issue_from_csr(dir: &Path, req: &IssueRequest, csr_pem: &str) -> Result<String, PkiError> {
    validate_request(req)?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    let (ca_cert, ca_key) = load_ca(dir)?;
    let cert = certificate_params(req)?.signed_by(&csr.public_key, &ca_cert, &ca_key)?;
    Ok(cert.pem())
}

/// The key `<name>.key` in `dir`, made (mode 0600) if there is none yet, and a
/// certificate request for it: what a component sends when it enrolls. An existing key
/// is kept, so enrolling again keeps the identity.
pub fn key_and_request(dir: &Path, name: &str) -> Result<String, PkiError> {
    fbr_protocol::names::validate_name(name).map_err(|reason| PkiError::BadName {
        name: name.to_owned(),
        reason,
    })?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key_path = dir.join(format!("{name}.key"));
    let key = match fs::read_to_string(&key_path) {
        Ok(pem) => KeyPair::from_pem(&pem)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate()?;
            write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
            key
        }
        Err(e) => return Err(io_err(&key_path)(e)),
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Writes `contents` to `path` whole or not at all (a temporary file renamed over it),
/// synced: a certificate replaced by a newer one.
pub fn replace_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, false)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

fn validate_request(req: &IssueRequest) -> Result<(), PkiError> {
    fbr_protocol::names::validate_name(&req.name).map_err(|reason| PkiError::BadName {
        name: req.name.clone(),
        reason,
    })?;
    for vm in &req.vms {
        if vm != "*" {
            fbr_protocol::names::validate_name(vm).map_err(|reason| PkiError::BadName {
                name: vm.clone(),
                reason,
            })?;
        }
    }
    Ok(())
}

/// The CA of `dir`, ready to sign.
fn load_ca(dir: &Path) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_cert_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    // Rebuilding the CA certificate object from its PEM keeps its subject and key, which
    // is all that issuing needs; the CA file itself is untouched.
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca_cert_pem)?.self_signed(&ca_key)?;
    Ok((ca_cert, ca_key))
}

/// What a certificate for `req` says: its name, addresses, role and VMs.
fn certificate_params(req: &IssueRequest) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(req.dns_names.clone())?;
    params
        .distinguished_name
        .push(DnType::CommonName, &req.name);
    for ip in &req.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let mut uris = vec![format!("{ROLE_URI_PREFIX}{}", req.role.as_str())];
    uris.extend(req.vms.iter().map(|vm| format!("{VM_URI_PREFIX}{vm}")));
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// Writes a file that must not exist yet; keys get mode 0600.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Creates a CA and the three usual certificates for a loopback deployment: `relay`,
/// `master-target`, and `agent` entitled to `agent_vms`. Used by the drill and tests.
pub fn init_loopback_site(dir: &Path, agent_vms: &[String]) -> Result<(), PkiError> {
    init_ca(dir, "failback-relay site CA")?;
    let loopback = vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
    issue(
        dir,
        &IssueRequest {
            name: "relay".into(),
            role: Role::Relay,
            vms: vec!["*".into()],
            dns_names: vec!["relay".into(), "localhost".into()],
            ip_addresses: loopback.clone(),
        },
    )?;
    issue(
        dir,
        &IssueRequest {
            name: "master-target".into(),
            role: Role::MasterTarget,
            vms: vec![],
            dns_names: vec!["master-target".into(), "localhost".into()],
            ip_addresses: loopback,
        },
    )?;
    issue(
        dir,
        &IssueRequest {
            name: "agent".into(),
            role: Role::Agent,
            vms: agent_vms.to_vec(),
            dns_names: vec![],
            ip_addresses: vec![],
        },
    )?;
    Ok(())
}
