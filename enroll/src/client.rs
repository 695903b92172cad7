//! `relay register`, `master-target register` and `churn enroll`: a component enrolls
//! with the configuration server.
//!
//! 1. TLS 1.3 to the server. Its certificate cannot be checked yet (the component has
//!    no CA): it is recorded, and the session's exporter value taken.
//! 2. `GET /v1/enroll/params`: the salt and iterations; the component derives `K` from
//!    its passphrase file.
//! 3. The component's key (made here, or the one it already has: enrolling again keeps
//!    its identity) and a certificate request for it. The key never leaves.
//! 4. `POST /v1/enroll` on the same session with the client proof. The answer's server
//!    proof must hold for this session, or nothing is kept: the server, or a man in
//!    the middle, does not know the passphrase. The issued certificate must be for the
//!    component's key and chain to the CA sent, and so must the certificate the server
//!    presented in step 1.
//! 5. `ca.pem` and `<name>.pem` are written (replacing older ones whole). A `ca.pem` of
//!    another site is never replaced: that is an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::proof;
use crate::wire::{ApiError, Assignment, EnrollParams, EnrollRequest, EnrollResponse, API_VERSION};

/// How long each step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to enroll as.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The configuration server's HTTPS address.
    pub server: SocketAddr,
    /// The TLS server name to ask for (its certificate is checked against the site CA
    /// once enrolled).
    pub server_name: String,
    pub passphrase_file: PathBuf,
    /// Where the key, the certificate and `ca.pem` go.
    pub pki_dir: PathBuf,
    pub name: String,
    pub role: fbr_transport::Role,
    pub vms: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    pub advertise: Option<String>,
    /// Agents: the relay chosen by the operator.
    pub relay: Option<String>,
}

/// A finished enrollment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registration {
    pub site_id: String,
    pub name: String,
    pub role: &'static str,
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub assignment: Assignment,
    /// Whether the key existed before (enrolling again).
    pub kept_key: bool,
}

/// Why an enrollment failed; nothing is written but the component's own key.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Refused(ApiError),
    #[error("the configuration server at {0} did not prove it knows the site passphrase: a man in the middle, or another site's server (nothing was kept)")]
    ServerNotProven(SocketAddr),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("configuration server {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Pki(#[from] fbr_transport::pki::PkiError),
}

impl EnrollError {
    /// The server's error code, when it refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            EnrollError::Refused(e) => Some(&e.error.code),
            _ => None,
        }
    }
}

/// Reads a passphrase file: its first line, trimmed; refused when empty.
pub fn read_passphrase(path: &Path) -> Result<String, EnrollError> {
    let text = std::fs::read_to_string(path).map_err(|e| EnrollError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        return Err(EnrollError::File {
            path: path.to_owned(),
            reason: "empty: the passphrase is its first line".into(),
        });
    }
    Ok(line)
}

/// Enrolls (see the module docs).
pub async fn register(o: &RegisterOptions) -> Result<Registration, EnrollError> {
    let passphrase = read_passphrase(&o.passphrase_file)?;
    let key_path = o.pki_dir.join(format!("{}.key", o.name));
    let kept_key = key_path.exists();
    let csr_pem = fbr_transport::pki::key_and_request(&o.pki_dir, &o.name)?;

    let seen = Arc::new(RecordingVerifier::default());
    let mut session = Session::connect(o, seen.clone()).await?;
    let params: EnrollParams = session.call("GET", "/v1/enroll/params", None).await?;
    if params.version != API_VERSION {
        return Err(EnrollError::Invalid(format!(
            "the configuration server speaks version {}, this component {API_VERSION}",
            params.version
        )));
    }
    if !(proof::MIN_ITERATIONS..=proof::MAX_ITERATIONS).contains(&params.iterations) {
        return Err(EnrollError::Invalid(format!(
            "the configuration server asks for {} PBKDF2 iterations, outside {}..={}",
            params.iterations,
            proof::MIN_ITERATIONS,
            proof::MAX_ITERATIONS
        )));
    }
    let salt = proof::from_hex(&params.salt)
        .filter(|s| s.len() == proof::SALT_LEN)
        .ok_or_else(|| {
            EnrollError::Invalid("the configuration server's salt is not 16 hex bytes".into())
        })?;
    let k =
        tokio::task::spawn_blocking(move || proof::derive(&passphrase, &salt, params.iterations))
            .await
            .map_err(|e| EnrollError::Invalid(format!("deriving the verifier: {e}")))?;
    let request = EnrollRequest {
        version: API_VERSION,
        role: o.role.as_str().to_owned(),
        name: o.name.clone(),
        vms: o.vms.clone(),
        dns_names: o.dns_names.clone(),
        ip_addresses: o.ip_addresses.clone(),
        advertise: o.advertise.clone(),
        relay: o.relay.clone(),
        proof: proof::to_hex(&proof::client_proof(&k, &session.exporter, &csr_pem)),
        csr_pem,
    };
    let body = serde_json::to_vec(&request).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let answer: EnrollResponse = session.call("POST", "/v1/enroll", Some(body)).await?;
    let server_proof = proof::from_hex(&answer.proof).unwrap_or_default();
    if !proof::check_server_proof(
        &k,
        &session.exporter,
        &answer.certificate_pem,
        &server_proof,
    ) {
        return Err(EnrollError::ServerNotProven(o.server));
    }
    check_issued(&answer, &key_path, &seen, &o.server_name)?;

    let ca_path = o.pki_dir.join("ca.pem");
    match std::fs::read_to_string(&ca_path) {
        Ok(old) if old.trim() != answer.ca_pem.trim() => {
            return Err(EnrollError::Invalid(format!(
                "{} holds another site's CA: this component is enrolled elsewhere (remove the directory deliberately to move it)",
                ca_path.display()
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fbr_transport::pki::replace_file(&ca_path, answer.ca_pem.as_bytes())?
        }
        Err(e) => {
            return Err(EnrollError::File {
                path: ca_path,
                reason: e.to_string(),
            })
        }
    }
    let cert_path = o.pki_dir.join(format!("{}.pem", o.name));
    fbr_transport::pki::replace_file(&cert_path, answer.certificate_pem.as_bytes())?;
    Ok(Registration {
        site_id: answer.site_id,
        name: o.name.clone(),
        role: o.role.as_str(),
        certificate: cert_path,
        key: key_path,
        ca: ca_path,
        assignment: answer.assignment,
        kept_key,
    })
}

/// The issued certificate is for our key and chains to the CA sent; the server's own
/// TLS certificate does too.
fn check_issued(
    answer: &EnrollResponse,
    key_path: &Path,
    seen: &RecordingVerifier,
    server_name: &str,
) -> Result<(), EnrollError> {
    let invalid = |what: String| EnrollError::Invalid(what);
    let ca = der_of(&answer.ca_pem)
        .ok_or_else(|| invalid("the CA sent is not a PEM certificate".into()))?;
    let cert = der_of(&answer.certificate_pem)
        .ok_or_else(|| invalid("the certificate sent is not a PEM certificate".into()))?;
    let key_pem = std::fs::read_to_string(key_path).map_err(|e| EnrollError::File {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("our key: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| invalid(format!("the certificate sent: {e}")))?;
    if parsed.public_key().raw != key.public_key_der().as_slice() {
        return Err(invalid(
            "the certificate sent is not for this component's key".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.clone()))
        .map_err(|e| invalid(format!("the CA sent: {e}")))?;
    let roots = Arc::new(roots);
    let verifier = rustls::client::WebPkiServerVerifier::builder(roots.clone())
        .build()
        .map_err(|e| invalid(format!("the CA sent: {e}")))?;
    let presented = seen
        .end_entity
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| invalid("the server presented no certificate".into()))?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| invalid(format!("server name {server_name:?}: {e}")))?;
    verifier
        .verify_server_cert(
            &CertificateDer::from(presented),
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
            invalid(format!(
                "the server's TLS certificate does not chain to the site CA it sent: {e}"
            ))
        })?;
    // Our certificate must verify as a client of that CA.
    let client_verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .build()
        .map_err(|e| invalid(format!("the CA sent: {e}")))?;
    client_verifier
        .verify_client_cert(&CertificateDer::from(cert), &[], UnixTime::now())
        .map_err(|e| {
            invalid(format!(
                "the certificate sent does not chain to the CA sent: {e}"
            ))
        })?;
    Ok(())
}

/// The DER of a PEM certificate (x509-parser's PEM reader).
fn der_of(pem: &str) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    Some(p.contents)
}

/// One HTTP/1.1 connection over TLS to the configuration server.
struct Session {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    exporter: [u8; 32],
    addr: SocketAddr,
    host: String,
}

impl Session {
    async fn connect(
        o: &RegisterOptions,
        seen: Arc<RecordingVerifier>,
    ) -> Result<Self, EnrollError> {
        let err = |reason: String| EnrollError::Connect {
            addr: o.server,
            reason,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        *seen.provider.lock().unwrap_or_else(|p| p.into_inner()) = Some(provider.clone());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(seen)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(o.server))
            .await
            .map_err(|_| err("connecting timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let name = ServerName::try_from(o.server_name.clone())
            .map_err(|e| err(format!("server name {:?}: {e}", o.server_name)))?;
        let tls = tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| err("the TLS handshake timed out".into()))?
            .map_err(|e| err(format!("TLS: {e}")))?;
        let mut exporter = [0u8; 32];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, proof::EXPORTER_LABEL, None)
            .map_err(|e| err(format!("TLS exporter: {e}")))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| err(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Session {
            sender,
            exporter,
            addr: o.server,
            host: o.server_name.clone(),
        })
    }

    /// One request; a JSON answer, or the server's coded error.
    async fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, EnrollError> {
        let addr = self.addr;
        let err = move |reason: String| EnrollError::Connect { addr, reason };
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| err(e.to_string()))?;
        let answer = tokio::time::timeout(STEP_TIMEOUT, async {
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let bytes = http_body_util::Limited::new(response.into_body(), 1 << 20)
                .collect()
                .await
                .map(|c| c.to_bytes());
            Ok::<_, hyper::Error>((status, bytes))
        })
        .await
        .map_err(|_| err(format!("{method} {path} timed out")))?
        .map_err(|e| err(format!("{method} {path}: {e}")))?;
        let (status, bytes) = answer;
        let bytes = bytes.map_err(|e| err(format!("{method} {path}: reading the answer: {e}")))?;
        if status != 200 {
            let e: ApiError = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                ApiError::new(
                    "http_error",
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                )
            });
            return Err(EnrollError::Refused(e));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            err(format!(
                "{method} {path}: the answer is not what was expected: {e}"
            ))
        })
    }
}

/// Accepts the server's certificate unchecked (there is no CA yet: the passphrase proofs
/// authenticate the session), keeps it for the check against the CA received, and still
/// checks that the server holds its key (the handshake signature).
#[derive(Debug, Default)]
struct RecordingVerifier {
    end_entity: Mutex<Option<Vec<u8>>>,
    provider: Mutex<Option<Arc<rustls::crypto::CryptoProvider>>>,
}

impl RecordingVerifier {
    fn algorithms(&self) -> rustls::crypto::WebPkiSupportedAlgorithms {
        self.provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|p| p.signature_verification_algorithms)
            .unwrap_or(rustls::crypto::ring::default_provider().signature_verification_algorithms)
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.end_entity.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
