//! Heartbeats: an enrolled component reports to the configuration server every
//! `interval` (30 s by default) over HTTPS with its site certificate (mutual TLS, the
//! server checked against the site CA). The server marks a component that misses
//! [`MISSED_HEARTBEATS`] in a row disconnected; the component, when none has been
//! acknowledged for as long, knows the configuration server is unreachable
//! ([`HeartbeatStatus::unreachable_for`]) and says so in its health.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;

use crate::wire::{ApiError, Heartbeat, HeartbeatAck, MISSED_HEARTBEATS};

/// How long one heartbeat may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the configuration server's API: where, and as whom (a component with
/// its site certificate, or an operator with the token).
#[derive(Clone)]
pub struct HeartbeatClient {
    server: SocketAddr,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    /// The operator token, sent as `Authorization: Bearer`.
    bearer: Option<String>,
}

impl std::fmt::Debug for HeartbeatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatClient")
            .field("server", &self.server)
            .finish()
    }
}

impl HeartbeatClient {
    /// With the certificate `<name>.pem`/`.key` and `ca.pem` of `pki_dir` (what
    /// `register` wrote).
    pub fn new(
        server: SocketAddr,
        server_name: &str,
        pki_dir: &Path,
        name: &str,
    ) -> Result<Self, String> {
        let creds = fbr_transport::Credentials::load(pki_dir, name).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(creds.roots)
            .with_client_auth_cert(creds.chain, creds.key)
            .map_err(|e| e.to_string())?;
        Ok(HeartbeatClient {
            server,
            server_name: ServerName::try_from(server_name.to_owned())
                .map_err(|e| format!("server name {server_name:?}: {e}"))?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            bearer: None,
        })
    }

    /// An operator's client: the server checked against the CA certificate `ca_pem`,
    /// no client certificate, the operator `token` on every request.
    pub fn operator(
        server: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        token: String,
    ) -> Result<Self, String> {
        let roots = fbr_transport::load_roots(ca_pem).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(HeartbeatClient {
            server,
            server_name: ServerName::try_from(server_name.to_owned())
                .map_err(|e| format!("server name {server_name:?}: {e}"))?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            bearer: Some(token),
        })
    }

    /// One request (`GET` with an empty body, or `POST` of a JSON document); the
    /// answer's body, or why not (the server's coded error).
    pub async fn request(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Bytes, String> {
        self.call(method, path, body).await
    }

    /// Sends one heartbeat; the server's acknowledgement, or why not.
    pub async fn send(&self, beat: &Heartbeat) -> Result<HeartbeatAck, String> {
        let body = serde_json::to_vec(beat).map_err(|e| e.to_string())?;
        let answer = self.call("POST", "/v1/heartbeat", body).await?;
        serde_json::from_slice(&answer).map_err(|e| format!("{}: the answer: {e}", self.server))
    }

    /// This component's assignment as the configuration server has it now.
    pub async fn assignment(&self) -> Result<crate::wire::Assignment, String> {
        #[derive(serde::Deserialize)]
        struct Answer {
            assignment: crate::wire::Assignment,
        }
        let answer = self.call("GET", "/v1/assignment", Vec::new()).await?;
        serde_json::from_slice::<Answer>(&answer)
            .map(|a| a.assignment)
            .map_err(|e| format!("{}: the answer: {e}", self.server))
    }

    /// One request on a new connection; the answer's body, or why not.
    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Bytes, String> {
        tokio::time::timeout(TIMEOUT, self.call_once(method, path, body))
            .await
            .map_err(|_| format!("no answer from {} within {TIMEOUT:?}", self.server))?
    }

    async fn call_once(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Bytes, String> {
        let at = |e: String| format!("{}: {e}", self.server);
        let tcp = tokio::net::TcpStream::connect(self.server)
            .await
            .map_err(|e| at(e.to_string()))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| at(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| at(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "config-server")
            .header("content-type", "application/json");
        if let Some(token) = &self.bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| at(format!("HTTP: {e}")))?;
        let status = response.status().as_u16();
        let bytes = http_body_util::Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| at(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != 200 {
            let e: Option<ApiError> = serde_json::from_slice(&bytes).ok();
            return Err(at(match e {
                Some(e) => e.to_string(),
                None => format!("HTTP {status}"),
            }));
        }
        Ok(bytes)
    }
}

/// What the component knows of its heartbeats.
#[derive(Debug, Clone)]
pub struct HeartbeatStatus {
    pub interval: Duration,
    pub started: Instant,
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
    pub sent: u64,
    pub failed: u64,
    /// What the last acknowledgement said of the operator token (relays).
    pub operator_token_sha256: Option<String>,
}

impl HeartbeatStatus {
    pub fn new(interval: Duration) -> Self {
        HeartbeatStatus {
            interval,
            started: Instant::now(),
            last_ok: None,
            last_error: None,
            sent: 0,
            failed: 0,
            operator_token_sha256: None,
        }
    }

    /// How long no heartbeat has been acknowledged, once that is more than
    /// [`MISSED_HEARTBEATS`] intervals (the server then counts the component
    /// disconnected too); `None` while it is connected.
    pub fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        let since = self.last_ok.unwrap_or(self.started);
        let quiet = now.saturating_duration_since(since);
        (quiet > self.interval * MISSED_HEARTBEATS as u32).then_some(quiet)
    }
}

/// Sends a heartbeat built by `report` every `status.interval`, forever, recording each
/// outcome in `status`.
pub async fn run(
    client: HeartbeatClient,
    status: Arc<Mutex<HeartbeatStatus>>,
    report: impl Fn() -> Heartbeat + Send + 'static,
) {
    let interval = status.lock().unwrap_or_else(|p| p.into_inner()).interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = true;
    loop {
        tick.tick().await;
        let outcome = client.send(&report()).await;
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(ack) => {
                s.operator_token_sha256 = ack.operator_token_sha256;
                if !was_ok {
                    tracing::info!("configuration server reachable again");
                }
                was_ok = true;
                s.sent += 1;
                s.last_ok = Some(Instant::now());
                s.last_error = None;
            }
            Err(e) => {
                if was_ok {
                    tracing::warn!("heartbeat to the configuration server failed: {e}");
                }
                was_ok = false;
                s.failed += 1;
                s.last_error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_after_three_silent_intervals() {
        let mut s = HeartbeatStatus::new(Duration::from_secs(30));
        let t0 = s.started;
        assert_eq!(s.unreachable_for(t0 + Duration::from_secs(90)), None);
        assert_eq!(
            s.unreachable_for(t0 + Duration::from_secs(91)),
            Some(Duration::from_secs(91))
        );
        s.last_ok = Some(t0 + Duration::from_secs(60));
        assert_eq!(s.unreachable_for(t0 + Duration::from_secs(91)), None);
        assert_eq!(
            s.unreachable_for(t0 + Duration::from_secs(160)),
            Some(Duration::from_secs(100))
        );
    }
}

/// The `[config_server]` settings of a relay or master target: where its site's
/// configuration server is, and how often to report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigServerSettings {
    /// `IP:PORT` of the configuration server; empty: none (certificates made by hand,
    /// no heartbeats).
    pub address: String,
    /// The name its certificate carries.
    pub name: String,
    /// Seconds between heartbeats, 1 to 3600.
    pub heartbeat_interval_s: u64,
    /// `host:port` where others reach this component (a relay: its agents; a master
    /// target: its relays), reported in every heartbeat; empty: the address it listens
    /// on, when that is a specific IP (not 0.0.0.0 or ::).
    pub advertise: String,
}

impl Default for ConfigServerSettings {
    fn default() -> Self {
        ConfigServerSettings {
            address: String::new(),
            name: "config-server".into(),
            heartbeat_interval_s: 30,
            advertise: String::new(),
        }
    }
}

impl ConfigServerSettings {
    /// The address, `None` when there is no configuration server; the error names the
    /// key at fault.
    pub fn address(&self) -> Result<Option<SocketAddr>, (&'static str, String)> {
        if !crate::wire::HEARTBEAT_INTERVALS_S.contains(&self.heartbeat_interval_s) {
            return Err((
                "config_server.heartbeat_interval_s",
                format!("{} is out of range 1..=3600", self.heartbeat_interval_s),
            ));
        }
        if self.address.is_empty() {
            return Ok(None);
        }
        self.address.parse().map(Some).map_err(|e| {
            (
                "config_server.address",
                format!("{:?} is not IP:PORT: {e}", self.address),
            )
        })
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_s)
    }

    /// What heartbeats advertise: the configured address, else `listening` when it is
    /// a specific IP.
    pub fn advertised(&self, listening: SocketAddr) -> Option<String> {
        if !self.advertise.is_empty() {
            Some(self.advertise.clone())
        } else if listening.ip().is_unspecified() {
            None
        } else {
            Some(listening.to_string())
        }
    }
}

/// A daemon's heartbeats: the task sending them and what it knows of them.
pub type Reporting = (tokio::task::JoinHandle<()>, Arc<Mutex<HeartbeatStatus>>);

/// Starts reporting to the configuration server `settings` name, when it has an address,
/// as the certificate `<cert_name>` of `pki_dir`, with heartbeats built by `report`.
/// `None` when there is no configuration server; an error names the key at fault.
pub fn start(
    settings: &ConfigServerSettings,
    pki_dir: &Path,
    cert_name: &str,
    report: impl Fn() -> Heartbeat + Send + 'static,
) -> Result<Option<Reporting>, String> {
    let Some(addr) = settings
        .address()
        .map_err(|(key, e)| format!("{key}: {e}"))?
    else {
        return Ok(None);
    };
    let client = HeartbeatClient::new(addr, &settings.name, pki_dir, cert_name)
        .map_err(|e| format!("config_server: {e}"))?;
    let status = Arc::new(Mutex::new(HeartbeatStatus::new(settings.interval())));
    let task = tokio::spawn(run(client, status.clone(), report));
    Ok(Some((task, status)))
}
