//! Enrolling a site through its configuration server, end to end: real `config-server`,
//! `master-target`, `relay` and `churn` processes on loopback.
//!
//! - The three components enroll with the site's passphrase (enrolling again keeps the
//!   key), and replicate with the certificates they got: every point byte-exact.
//! - A wrong passphrase gets a coded error, nothing but the component's own key is
//!   kept, and each further attempt waits longer.
//! - A man in the middle is detected by both sides: a server holding another site's
//!   passphrase refuses the component's proof, and the component refuses its answer
//!   (its server proof does not hold); one relaying every byte between its own two TLS
//!   sessions gets the component's proof refused by the real server.
//! - Heartbeats: the relay and the master target report every second; the inventory
//!   shows them connected; the configuration server's loss shows in the relay's health
//!   (and clears when it is back), and a killed relay shows disconnected.
//! - Hostile API input (oversized bodies, bad JSON, unknown paths and methods, the
//!   endpoints past enrollment without a certificate) gets coded errors.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fbr_churn::harness::{bin_path, Site};
use fbr_churn::workload::Content;
use fbr_tests::{agent_options, churn, eventually, plans, site_options, stop_and_verify};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A configuration server on loopback, with its site made fresh.
struct ConfigServer {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    metrics: SocketAddr,
    child: Child,
}

impl ConfigServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = Command::new(bin_path("config-server").unwrap())
            .args([
                "init",
                "--ip",
                "127.0.0.1",
                "--iterations",
                "10000",
                "--data",
            ])
            .arg(&data)
            .arg("--passphrase-out")
            .arg(dir.path().join("passphrase"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port_file = dir.path().join("port");
        let metrics_file = dir.path().join("metrics");
        // Hermetic: an empty config file, not /etc's.
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        let child = Command::new(bin_path("config-server").unwrap())
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--metrics-port-file")
            .arg(&metrics_file)
            .arg("--config")
            .arg(dir.path().join("none.toml"))
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        let read = |f: &Path| -> SocketAddr {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(s) = std::fs::read_to_string(f) {
                    if let Ok(a) = s.trim().parse() {
                        return a;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the configuration server did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let addr = read(&port_file);
        let metrics = read(&metrics_file);
        ConfigServer {
            dir,
            addr,
            metrics,
            child,
        }
    }

    fn passphrase(&self) -> PathBuf {
        self.dir.path().join("passphrase")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn metric(&self, series: &str) -> f64 {
        let text = fbr_churn::harness::http_get(self.metrics, "/metrics").1;
        fbr_churn::harness::sample(&text, series).unwrap_or(0.0)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `<program> register|enroll` with `args`.
fn enroll(
    program: &str,
    server: SocketAddr,
    passphrase: &Path,
    pki: &Path,
    args: &[&str],
) -> Output {
    let verb = if program == "churn" {
        "enroll"
    } else {
        "register"
    };
    Command::new(bin_path(program).unwrap())
        .arg(verb)
        .arg("--config-server")
        .arg(server.to_string())
        .arg("--passphrase-file")
        .arg(passphrase)
        .arg("--pki-dir")
        .arg(pki)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_enrolled_with_the_passphrase_replicate_byte_exact() {
    let mut cs = ConfigServer::start();
    let mut site = Site::create(None, site_options(&["vm1"])).unwrap();
    // The site's certificates come from the configuration server, not `relay pki`.
    std::fs::remove_dir_all(&site.pki_dir).unwrap();
    let pki = site.pki_dir.clone();
    let loopback = ["--ip", "127.0.0.1", "--dns", "localhost"];
    let mt = ok(enroll(
        "master-target",
        cs.addr,
        &cs.passphrase(),
        &pki,
        &[
            &loopback[..],
            &[
                "--dns",
                "master-target",
                "--advertise",
                "127.0.0.1:9444",
                "--json",
            ],
        ]
        .concat(),
    ));
    assert!(mt.contains("\"kept_key\": false"), "{mt}");
    let relay: serde_json::Value = serde_json::from_str(&ok(enroll(
        "relay",
        cs.addr,
        &cs.passphrase(),
        &pki,
        &[
            &loopback[..],
            &["--dns", "relay", "--advertise", "127.0.0.1:9443", "--json"],
        ]
        .concat(),
    )))
    .unwrap();
    assert_eq!(relay["assignment"]["master_target"], "127.0.0.1:9444");
    let agent: serde_json::Value = serde_json::from_str(&ok(enroll(
        "churn",
        cs.addr,
        &cs.passphrase(),
        &pki,
        &["--vm", "vm1", "--json"],
    )))
    .unwrap();
    assert_eq!(agent["assignment"]["vms"], serde_json::json!(["vm1"]));
    assert_eq!(agent["assignment"]["relay"], "relay", "{agent}");
    assert_eq!(agent["assignment"]["relay_address"], "127.0.0.1:9443");
    // A second relay: a new agent goes where the operator says, and a relay that is
    // not enrolled is refused.
    let elsewhere = tempfile::tempdir().unwrap();
    ok(enroll(
        "relay",
        cs.addr,
        &cs.passphrase(),
        &elsewhere.path().join("relay-b"),
        &["--name", "relay-b", "--advertise", "127.0.0.1:19443"],
    ));
    let placed: serde_json::Value = serde_json::from_str(&ok(enroll(
        "churn",
        cs.addr,
        &cs.passphrase(),
        &elsewhere.path().join("agent-b"),
        &[
            "--name", "agent-b", "--vm", "vm2", "--relay", "relay-b", "--json",
        ],
    )))
    .unwrap();
    assert_eq!(placed["assignment"]["relay_address"], "127.0.0.1:19443");
    let refused = enroll(
        "churn",
        cs.addr,
        &cs.passphrase(),
        &elsewhere.path().join("agent-c"),
        &["--name", "agent-c", "--relay", "nobody"],
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("(unknown_relay)"));
    // Enrolling again keeps the identity: the same key, a fresh certificate.
    let key_before = std::fs::read(pki.join("relay.key")).unwrap();
    let again: serde_json::Value = serde_json::from_str(&ok(enroll(
        "relay",
        cs.addr,
        &cs.passphrase(),
        &pki,
        &[
            &loopback[..],
            &["--dns", "relay", "--advertise", "127.0.0.1:9443", "--json"],
        ]
        .concat(),
    )))
    .unwrap();
    assert_eq!(again["kept_key"], true);
    assert_eq!(std::fs::read(pki.join("relay.key")).unwrap(), key_before);
    assert_eq!(cs.metric("fbr_config_server_components"), 5.0);
    // Past enrollment, a component asks for its assignment with its certificate.
    let (status, body) = https_as(
        cs.addr,
        request("GET", "/v1/assignment", b""),
        Some((&pki, "agent")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"relay_address\": \"127.0.0.1:9443\""),
        "{body}"
    );

    // The data path on those certificates. The master target, once it listens,
    // enrolls again to advertise where (same key, same identity); the relay takes its
    // master target from the configuration server.
    let mt_addr = site.start_master_target().unwrap().to_string();
    ok(enroll(
        "master-target",
        cs.addr,
        &cs.passphrase(),
        &pki,
        &[
            &loopback[..],
            &["--dns", "master-target", "--advertise", &mt_addr],
        ]
        .concat(),
    ));
    site.relay_args_mut()
        .extend(["--config-server".to_owned(), cs.addr.to_string()]);
    site.relay_asks_for_master_target();
    site.start_relay().unwrap();
    let log = std::fs::read_to_string(site.root.join("logs/relay.log")).unwrap();
    assert!(
        log.contains("master target assigned by the configuration server"),
        "{log}"
    );
    let opts = agent_options(&site, Duration::from_secs(3), Duration::from_millis(200));
    let report = churn(opts, plans(1, 1, 4 << 20, Content::Mixed, 61), 61).await;
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));

    // The inventory survives the server's kill -9 (it is in the state database).
    cs.stop();
    let listed: serde_json::Value =
        serde_json::from_str(&ok(Command::new(bin_path("config-server").unwrap())
            .args(["components", "--json", "--data"])
            .arg(cs.data())
            .output()
            .unwrap()))
        .unwrap();
    let names: Vec<(&str, u64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["enrollments"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("agent", 1),
            ("agent-b", 1),
            ("master-target", 2),
            ("relay", 2),
            ("relay-b", 1)
        ]
    );
}

#[test]
fn a_wrong_passphrase_gets_a_coded_error_and_every_retry_waits_longer() {
    let cs = ConfigServer::start();
    let scratch = tempfile::tempdir().unwrap();
    let wrong = scratch.path().join("wrong");
    std::fs::write(&wrong, "not-the-site-passphrase\n").unwrap();
    let pki = scratch.path().join("pki");
    let mut waited = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = enroll("relay", cs.addr, &wrong, &pki, &[]);
        waited.push(t.elapsed());
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("(wrong_passphrase)"), "{err}");
    }
    // Nothing but the component's own key is kept.
    assert!(pki.join("relay.key").exists());
    assert!(!pki.join("relay.pem").exists() && !pki.join("ca.pem").exists());
    assert!(
        waited[1] >= Duration::from_millis(500) && waited[2] >= Duration::from_millis(1000),
        "each failure makes the next attempt wait longer: {waited:?}"
    );
    assert_eq!(
        cs.metric("fbr_config_server_enrollments_total{outcome=\"wrong_passphrase\"}"),
        3.0
    );
    // The right passphrase still works (after its wait), and clears the count.
    ok(enroll("relay", cs.addr, &cs.passphrase(), &pki, &[]));
    let t = Instant::now();
    ok(enroll("relay", cs.addr, &cs.passphrase(), &pki, &[]));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // An empty passphrase file is refused before anything is sent.
    std::fs::write(&wrong, "\n").unwrap();
    let out = enroll("relay", cs.addr, &wrong, &pki, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

/// A TLS client that accepts any server certificate (what a man in the middle, or a
/// component before it knows the CA, faces).
fn trusting_client() -> tokio_rustls::TlsConnector {
    trusting_client_as(None)
}

/// [`trusting_client`], presenting the certificate `<name>` of `pki` when given.
fn trusting_client_as(cert: Option<(&Path, &str)>) -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("no TLS 1.2".into()))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)));
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((pki, name)) => {
            let creds = fbr_transport::Credentials::load(pki, name).unwrap();
            builder
                .with_client_auth_cert(creds.chain, creds.key)
                .unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS (any certificate accepted): (status, body).
async fn https(addr: SocketAddr, request: Vec<u8>) -> (u16, String) {
    https_as(addr, request, None).await
}

/// [`https`], presenting a site certificate when given.
async fn https_as(
    addr: SocketAddr,
    request: Vec<u8>,
    cert: Option<(&Path, &str)>,
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("config-server").unwrap();
    let mut tls = trusting_client_as(cert).connect(name, tcp).await.unwrap();
    tls.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: config-server\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A man in the middle that terminates TLS on both sides with its own certificate
/// (the impostor site's) and relays every byte between the two sessions.
async fn relaying_mitm(real: SocketAddr, own_pki: PathBuf) -> SocketAddr {
    let creds = fbr_transport::Credentials::load(&own_pki, "config-server").unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(creds.chain, creds.key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut from_client) = acceptor.accept(tcp).await else {
                    return;
                };
                let upstream = tokio::net::TcpStream::connect(real).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("config-server").unwrap();
                let Ok(mut to_server) = trusting_client().connect(name, upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut from_client, &mut to_server).await;
            });
        }
    });
    addr
}

/// Reads one HTTP/1.1 request (head and `content-length` body) from `s`.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

/// A configuration server of another site that answers every enrollment without
/// checking the component's proof, with a server proof made from its own passphrase
/// for its own session, and a certificate of its own CA.
async fn answering_impostor(own_pki: PathBuf) -> SocketAddr {
    use fbr_enroll::proof;
    let creds = fbr_transport::Credentials::load(&own_pki, "config-server").unwrap();
    let cert_pem = std::fs::read_to_string(own_pki.join("config-server.pem")).unwrap();
    let ca_pem = std::fs::read_to_string(own_pki.join("ca.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(creds.chain, creds.key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let salt = [9u8; 16];
    let k = proof::derive("the impostor's passphrase", &salt, 10_000);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut exporter = [0u8; 32];
            tls.get_ref()
                .1
                .export_keying_material(&mut exporter, proof::EXPORTER_LABEL, None)
                .unwrap();
            while let Some((head, _body)) = read_request(&mut tls).await {
                let answer = if head.starts_with("GET /v1/enroll/params") {
                    serde_json::json!({"version": 1, "site_id": "impostor", "salt": proof::to_hex(&salt), "iterations": 10000})
                } else {
                    serde_json::json!({
                        "version": 1, "site_id": "impostor",
                        "certificate_pem": cert_pem, "ca_pem": ca_pem,
                        "proof": proof::to_hex(&proof::server_proof(&k, &exporter, &cert_pem)),
                        "assignment": {},
                    })
                };
                let body = answer.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if tls.write_all(response.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_with_another_passphrase_is_detected_by_both_sides() {
    let real = ConfigServer::start();
    let impostor = ConfigServer::start();
    let scratch = tempfile::tempdir().unwrap();

    // The component holds the real passphrase and reaches the impostor: the impostor
    // cannot prove it, and the component's proof does not hold for the impostor.
    let pki = scratch.path().join("pki");
    let out = tokio::task::block_in_place(|| {
        enroll("relay", impostor.addr, &real.passphrase(), &pki, &[])
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("(wrong_passphrase)"), "{err}");
    assert!(!pki.join("ca.pem").exists());

    // An impostor that skips checking the component's proof and answers with a proof
    // made with its own passphrase: the component refuses it and keeps nothing.
    let fake = answering_impostor(impostor.data().join("pki")).await;
    let pki = scratch.path().join("pki1");
    let out = tokio::task::block_in_place(|| enroll("relay", fake, &real.passphrase(), &pki, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not prove it knows the site passphrase"),
        "{err}"
    );
    assert!(!pki.join("ca.pem").exists() && !pki.join("relay.pem").exists());

    // A man in the middle relaying every byte between its two TLS sessions: the
    // component's proof is bound to its own session, and the real server refuses it.
    let mitm = relaying_mitm(real.addr, impostor.data().join("pki")).await;
    let pki = scratch.path().join("pki2");
    let out = tokio::task::block_in_place(|| enroll("relay", mitm, &real.passphrase(), &pki, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("(wrong_passphrase)") && err.contains("man in the middle"),
        "{err}"
    );
    assert!(!pki.join("ca.pem").exists() && !pki.join("relay.pem").exists());
    assert_eq!(
        real.metric("fbr_config_server_enrollments_total{outcome=\"wrong_passphrase\"}"),
        1.0,
        "the real server saw the relayed proof and refused it"
    );
    // Directly, the same component enrolls.
    tokio::task::block_in_place(|| ok(enroll("relay", real.addr, &real.passphrase(), &pki, &[])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_api_input_gets_coded_errors() {
    let cs = ConfigServer::start();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            request("POST", "/v1/enroll", &vec![b'{'; 70 * 1024]),
            413,
            "body_too_large",
        ),
        (
            request("POST", "/v1/enroll", b"{\"version\": 1, \"role\": "),
            400,
            "bad_json",
        ),
        (
            request(
                "POST",
                "/v1/enroll",
                br#"{"version":1,"role":"relay","name":"r","csr_pem":"x","proof":"zz"}"#,
            ),
            400,
            "bad_proof",
        ),
        (
            request("GET", "/v1/components/nobody", b""),
            404,
            "not_found",
        ),
        (
            request("DELETE", "/v1/enroll", b""),
            405,
            "method_not_allowed",
        ),
    ];
    for (req, status, code) in cases {
        let (got, body) = https(cs.addr, req).await;
        assert_eq!(got, status, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
    }
    let (status, body) = https(cs.addr, request("GET", "/v1/enroll/params", b"")).await;
    assert_eq!(status, 200);
    let params: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(params["iterations"], 10000);
    assert!(!body.contains(
        &std::fs::read_to_string(cs.passphrase())
            .unwrap()
            .trim()
            .to_owned()
    ));
}

/// The inventory, as the agent's certificate sees it: name -> (state, report).
async fn inventory(site: &Site) -> std::collections::BTreeMap<String, (String, serde_json::Value)> {
    let (status, body) = https_as(
        site.config_server_addr().unwrap(),
        request("GET", "/v1/components", b""),
        Some((&site.pki_dir, "agent")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (c["state"].as_str().unwrap().to_owned(), c["report"].clone()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_mark_components_connected_and_their_loss_shows_on_both_sides() {
    let mut site = Site::create(None, site_options(&["vm1"])).unwrap();
    let server = tokio::task::block_in_place(|| site.enroll_through_config_server()).unwrap();
    let heartbeat_args = [
        "--config-server".to_owned(),
        server.to_string(),
        "--heartbeat-interval-s".to_owned(),
        "1".to_owned(),
    ];
    site.relay_args_mut().extend(heartbeat_args.clone());
    site.master_target_args_mut().extend(heartbeat_args);
    tokio::task::block_in_place(|| {
        site.start_master_target().unwrap();
        site.start_relay().unwrap();
    });
    eventually(10, "both daemons connected", || async {
        let inv = inventory(&site).await;
        let state = |n: &str| inv.get(n).map(|c| c.0.clone()).unwrap_or_default();
        match (
            state("relay").as_str(),
            state("master-target").as_str(),
            state("agent").as_str(),
        ) {
            ("connected", "connected", "never") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let inv = inventory(&site).await;
    let report = &inv["relay"].1;
    assert_eq!(report["health"]["state"], "healthy", "{report}");
    assert!(
        report["cache"]["capacity_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );

    // After some churn the site's inventory knows the VM's disk: its size, group and
    // sync state from the master target, the relay carrying it, and the group's points.
    let opts = agent_options(&site, Duration::from_secs(2), Duration::from_millis(200));
    churn(opts, plans(1, 1, 4 << 20, Content::Mixed, 67), 67).await;
    eventually(10, "the inventory shows the disk and its group", || async {
        let (status, body) = https_as(
            site.config_server_addr().unwrap(),
            request("GET", "/v1/inventory", b""),
            Some((&site.pki_dir, "agent")),
        )
        .await;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {e}"))?;
        let disk = &v["vms"][0]["disks"][0];
        let group = &v["groups"][0];
        let ok = v["vms"][0]["vm"] == "vm1"
            && v["vms"][0]["agent"] == "agent"
            && disk["size_bytes"] == 4 << 20
            && disk["group"] == "group1"
            && disk["sync"] == "consistent"
            && disk["master_target"] == "master-target"
            && disk["relay"] == "relay"
            && group["group"] == "group1"
            && group["recovery_points"].as_u64().is_some_and(|n| n > 0);
        if ok {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;

    // The configuration server goes away: the relay's health says so (a warning: it
    // still replicates), and recovers when the server is back.
    tokio::task::block_in_place(|| site.stop_config_server(true)).unwrap();
    let relay_metrics = site.relay_metrics_addr().unwrap();
    eventually(
        15,
        "the relay's health shows the configuration server lost",
        || async {
            let (status, body) = tokio::task::block_in_place(|| {
                fbr_churn::harness::http_get(relay_metrics, "/readyz")
            });
            let text = tokio::task::block_in_place(|| {
                fbr_churn::harness::http_get(relay_metrics, "/metrics").1
            });
            let gauge = fbr_churn::harness::sample(
                &text,
                "fbr_relay_health_condition{condition=\"config_server\"}",
            );
            if status == 200
                && body.contains("configuration server unreachable for")
                && gauge == Some(1.0)
            {
                Ok(())
            } else {
                Err(format!("{status} {body} {gauge:?}"))
            }
        },
    )
    .await;
    tokio::task::block_in_place(|| site.start_config_server()).unwrap();
    eventually(15, "the relay's health recovers", || async {
        let (_, body) =
            tokio::task::block_in_place(|| fbr_churn::harness::http_get(relay_metrics, "/readyz"));
        if body.contains("config_server") {
            Err(body)
        } else {
            Ok(())
        }
    })
    .await;

    // A relay that stops reporting is marked disconnected after 3 intervals.
    tokio::task::block_in_place(|| site.stop_relay(true)).unwrap();
    eventually(15, "the killed relay shown disconnected", || async {
        let inv = inventory(&site).await;
        match (inv["relay"].0.as_str(), inv["master-target"].0.as_str()) {
            ("disconnected", "connected") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let text = tokio::task::block_in_place(|| {
        fbr_churn::harness::http_get(site.config_server_metrics_addr().unwrap(), "/metrics").1
    });
    assert_eq!(
        fbr_churn::harness::sample(&text, "fbr_config_server_components_disconnected"),
        Some(1.0),
        "the relay (agents send no heartbeats and do not count)"
    );
}
