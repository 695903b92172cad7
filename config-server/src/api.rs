//! The HTTPS API (docs/API.md): TLS 1.3 only, HTTP/1.1, JSON.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/enroll/params` | the site id, the PBKDF2 salt and iterations |
//! | `POST /v1/enroll` | enroll: a certificate request and the client proof in, the certificate, the CA, the server proof and the assignment out |
//! | `POST /v1/heartbeat` | an enrolled component's report (its site certificate required) |
//! | `GET /v1/assignment` | the caller's assignment (its site certificate required) |
//! | `GET /v1/components` | every component, connected or not, with its last report (a site certificate required) |
//! | `GET /v1/inventory` | the site: VMs and disks, groups, relays, master targets (a site certificate required) |
//! | `POST /v1/moves` | an operator moves a VM to another relay (the operator token required) |
//! | `GET /v1/moves`, `GET /v1/moves/{id}` | every move, or one, with its phase and progress (the operator token or a site certificate) |
//! | `POST /v1/moves/{id}/progress` | the moving VM's agent reports (its site certificate, entitled to the VM) |
//!
//! Operators authenticate with `Authorization: Bearer <token>`: the token made by
//! `config-server init` (or the first `run` of a site without one) in
//! `<data>/operator.token`, readable by the server's user only; only its SHA-256 is in
//! the state.
//!
//! Client certificates are asked for, not required: enrolling components have none
//! yet. The endpoints past enrollment refuse a request without one (401
//! `certificate_required`); the TLS layer has checked any it got against the site CA.
//! Every error is `{"error": {"code", "message"}}` with its status. Bodies over
//! [`MAX_BODY`] are refused unread (413). At most [`MAX_CONNECTIONS`] connections are
//! served at once, each for at most [`CONNECTION_TIMEOUT`].
//!
//! Wrong passphrases: each failure from an address makes its next attempts wait longer
//! before they are even checked ([`failure_delay`]: 0.5 s, 1 s, 2 s... up to 30 s); a
//! success clears the count. The counts are in the state database, so a restart does
//! not reset them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use x509_parser::prelude::FromDer;

use fbr_enroll::proof::{self, Verifier};
use fbr_enroll::wire::{
    parse_enroll_request, ApiError, Assignment, EnrollParams, EnrollResponse, API_VERSION,
    MAX_BODY, MAX_HEARTBEAT_BODY,
};

use crate::site::{now_ms, pki_dir, SERVER_CERT_NAME};
use crate::state::{Component, SiteRecord, State};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest a connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the next attempt from an address waits after `failures` wrong passphrases
/// in a row.
pub fn failure_delay(failures: u64) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_millis(500u64.saturating_mul(1 << (n - 1).min(6)))
            .min(Duration::from_secs(30)),
    }
}

/// The configuration server's metrics.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    pub registry: Registry,
    /// By outcome: `enrolled`, `wrong_passphrase`, `refused` (any other coded error).
    pub enrollments_total: IntCounterVec,
    pub components: IntGauge,
    pub heartbeats_total: prometheus::IntCounter,
    /// Relays and master targets not connected (no heartbeat for 3 of their intervals,
    /// or never).
    pub components_disconnected: IntGauge,
    /// Moves of VMs between relays, by the phase they reached: `requested`,
    /// `draining`, `switching`, `resyncing`, `done`, `failed`.
    pub moves_total: IntCounterVec,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let enrollments_total = IntCounterVec::new(
            Opts::new(
                "fbr_config_server_enrollments_total",
                "Enrollment attempts, by outcome: enrolled, wrong_passphrase, refused (any other coded error).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let components = IntGauge::with_opts(Opts::new(
            "fbr_config_server_components",
            "Components (relays, master targets, agents) enrolled in the site.",
        ))
        .expect("valid metric");
        let heartbeats_total = prometheus::IntCounter::with_opts(Opts::new(
            "fbr_config_server_heartbeats_total",
            "Heartbeats received from enrolled components.",
        ))
        .expect("valid metric");
        let components_disconnected = IntGauge::with_opts(Opts::new(
            "fbr_config_server_components_disconnected",
            "Enrolled relays and master targets not connected: no heartbeat for 3 of their intervals, or none yet.",
        ))
        .expect("valid metric");
        let moves_total = IntCounterVec::new(
            Opts::new(
                "fbr_config_server_moves_total",
                "Moves of VMs between relays, by the phase they reached: requested, draining, switching, resyncing, done, failed.",
            ),
            &["phase"],
        )
        .expect("valid metric");
        for phase in [
            "requested",
            "draining",
            "switching",
            "resyncing",
            "done",
            "failed",
        ] {
            moves_total.with_label_values(&[phase]);
        }
        registry
            .register(Box::new(moves_total.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(heartbeats_total.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(components_disconnected.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(enrollments_total.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(components.clone()))
            .expect("unique metric");
        ApiMetrics {
            registry,
            enrollments_total,
            components,
            heartbeats_total,
            components_disconnected,
            moves_total,
        }
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the API serves from.
#[derive(Debug)]
pub struct Server {
    pub state: State,
    pub site: SiteRecord,
    verifier: Verifier,
    pki: std::path::PathBuf,
    pub metrics: ApiMetrics,
    /// Enrollments one at a time past their proof: a name is checked and recorded
    /// together, so two components cannot both take it.
    enrolling: tokio::sync::Mutex<()>,
    /// Moves are planned and recorded one at a time (a VM has one unfinished move).
    moving: tokio::sync::Mutex<()>,
}

impl Server {
    /// From an initialised data directory.
    pub fn open(data_dir: &std::path::Path) -> anyhow::Result<Arc<Self>> {
        let state = State::open(data_dir)?;
        let site = state.site()?.ok_or_else(|| {
            anyhow::anyhow!(
                "{} holds no site: run `config-server init --data {}` first",
                data_dir.display(),
                data_dir.display()
            )
        })?;
        if crate::site::ensure_operator_token(data_dir, &state)? {
            tracing::info!(
                "made a new operator token in {}",
                data_dir.join(crate::site::OPERATOR_TOKEN_FILE).display()
            );
        }
        let verifier = proof::from_hex(&site.verifier)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .map(Verifier)
            .ok_or_else(|| anyhow::anyhow!("the site's verifier is damaged"))?;
        let metrics = ApiMetrics::new();
        metrics.components.set(state.components()?.len() as i64);
        Ok(Arc::new(Server {
            state,
            site,
            verifier,
            pki: pki_dir(data_dir),
            metrics,
            enrolling: tokio::sync::Mutex::new(()),
            moving: tokio::sync::Mutex::new(()),
        }))
    }

    /// TLS 1.3 with the server's certificate; a client certificate of the site CA
    /// asked for, not required.
    pub fn tls_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let creds = fbr_transport::Credentials::load(&self.pki, SERVER_CERT_NAME)?;
        Ok(creds.https_server_config()?)
    }

    /// One request on a TLS session whose exporter value is `exporter`, from `peer`
    /// when it presented a site certificate.
    async fn handle(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
        exporter: [u8; 32],
        peer: Option<&fbr_transport::PeerIdentity>,
    ) -> (StatusCode, Vec<u8>) {
        let path = req.uri().path().to_owned();
        if let Some(rest) = path.strip_prefix("/v1/moves/") {
            let result = self.move_endpoint(req, rest, peer).await;
            return answer(result);
        }
        let result = match (req.method(), path.as_str()) {
            (&Method::GET, "/v1/enroll/params") => Ok(json(&EnrollParams {
                version: API_VERSION,
                site_id: self.site.site_id.clone(),
                salt: self.site.salt.clone(),
                iterations: self.site.iterations,
            })),
            (&Method::POST, "/v1/enroll") => match read_body(req).await {
                Ok(body) => self.enroll(&body, client, exporter).await,
                Err(e) => Err(e),
            },
            (&Method::POST, "/v1/heartbeat") => match peer {
                None => Err(certificate_required()),
                Some(p) => match read_body_limited(req, MAX_HEARTBEAT_BODY).await {
                    Ok(body) => self.heartbeat(p, &body),
                    Err(e) => Err(e),
                },
            },
            (&Method::GET, "/v1/assignment") => match peer {
                None => Err(certificate_required()),
                Some(p) => self.assignment(p),
            },
            (&Method::GET, "/v1/inventory") => match peer {
                None => Err(certificate_required()),
                Some(_) => self
                    .state
                    .site_inventory(now_ms())
                    .map(|inv| json(&inv))
                    .map_err(|e| ApiError::new("internal", e.to_string())),
            },
            (&Method::GET, "/v1/components") => match peer {
                None => Err(certificate_required()),
                Some(_) => self
                    .state
                    .inventory(now_ms())
                    .map(|inv| json(&serde_json::json!({"version": API_VERSION, "components": inv})))
                    .map_err(|e| ApiError::new("internal", e.to_string())),
            },
            (&Method::POST, "/v1/moves") => match self.operator(&req) {
                Err(e) => Err(e),
                Ok(()) => match read_body(req).await {
                    Ok(body) => self.request_move(&body).await,
                    Err(e) => Err(e),
                },
            },
            (&Method::GET, "/v1/moves") => match (self.operator(&req), peer) {
                (Err(e), None) => Err(e),
                _ => self
                    .state
                    .moves()
                    .map(|m| json(&serde_json::json!({"version": API_VERSION, "moves": m})))
                    .map_err(|e| ApiError::new("internal", e.to_string())),
            },
            (
                _,
                "/v1/enroll/params" | "/v1/enroll" | "/v1/heartbeat" | "/v1/components"
                | "/v1/assignment" | "/v1/inventory" | "/v1/moves",
            ) => {
                Err(ApiError::new(
                    "method_not_allowed",
                    "GET /v1/enroll/params, POST /v1/enroll, POST /v1/heartbeat, GET /v1/assignment, GET /v1/components, GET /v1/inventory, GET and POST /v1/moves",
                ))
            }
            (_, path) => Err(ApiError::new("not_found", format!("no endpoint {path}"))),
        };
        answer(result)
    }

    /// Whether the request carries the operator token (`Authorization: Bearer`). Asked
    /// only by the endpoints that take it (it reads the state).
    fn operator(&self, req: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
            return Err(ApiError::new(
                "token_required",
                "this endpoint needs the operator token (Authorization: Bearer, from <data>/operator.token)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        let expected = self
            .state
            .operator_token_sha256()
            .map_err(|e| ApiError::new("internal", e.to_string()))?;
        match expected {
            Some(h) if !token.is_empty() && h == crate::site::token_sha256_hex(token) => Ok(()),
            _ => Err(ApiError::new(
                "wrong_token",
                "the operator token is not this site's",
            )),
        }
    }

    /// `GET /v1/moves/{id}` and `POST /v1/moves/{id}/progress`.
    async fn move_endpoint(
        &self,
        req: Request<Incoming>,
        rest: &str,
        peer: Option<&fbr_transport::PeerIdentity>,
    ) -> Result<Vec<u8>, ApiError> {
        let internal = |e: crate::state::StateError| ApiError::new("internal", e.to_string());
        let (id, progress) = match rest.split_once('/') {
            None => (rest, false),
            Some((id, "progress")) => (id, true),
            Some(_) => {
                return Err(ApiError::new(
                    "not_found",
                    format!("no endpoint /v1/moves/{rest}"),
                ))
            }
        };
        let id: u64 = id
            .parse()
            .map_err(|_| ApiError::new("unknown_move", format!("{id:?} is not a move id")))?;
        let unknown = || ApiError::new("unknown_move", format!("there is no move {id}"));
        match (req.method(), progress) {
            (&Method::GET, false) => {
                if let (Err(e), None) = (self.operator(&req), peer) {
                    return Err(e);
                }
                let m = self
                    .state
                    .move_by_id(id)
                    .map_err(internal)?
                    .ok_or_else(unknown)?;
                Ok(json(
                    &serde_json::json!({"version": API_VERSION, "move": m}),
                ))
            }
            (&Method::POST, true) => {
                let Some(peer) = peer else {
                    return Err(certificate_required());
                };
                let me = self.enrolled(peer)?;
                let body = read_body(req).await?;
                let report = fbr_enroll::wire::parse_move_progress(&body)?;
                let _one_at_a_time = self.moving.lock().await;
                let m = self
                    .state
                    .move_by_id(id)
                    .map_err(internal)?
                    .ok_or_else(unknown)?;
                if me.role != "agent" || !peer.entitlement.may_write(&m.vm) {
                    return Err(ApiError::new(
                        "forbidden",
                        format!(
                            "{} does not write VM {}: only its agent reports its move",
                            me.name, m.vm
                        ),
                    ));
                }
                let next = crate::moves::apply_progress(&m, &report, now_ms())?;
                let placement = if next.phase.is_finished() {
                    // The move is over: the VM stays where it went, at its placement.
                    self.state
                        .placements()
                        .map_err(internal)?
                        .remove(&m.vm)
                        .filter(|p| p.move_id == Some(id))
                        .map(|p| crate::moves::VmPlacementRecord { move_id: None, ..p })
                } else {
                    None
                };
                self.state
                    .record_move(&next, placement.as_ref())
                    .map_err(internal)?;
                if next.phase != m.phase {
                    tracing::info!(id, vm = %m.vm, to = %m.to_relay, phase = next.phase.name(), drained = next.bytes_drained, "move progress");
                    self.metrics
                        .moves_total
                        .with_label_values(&[next.phase.name()])
                        .inc();
                }
                Ok(json(
                    &serde_json::json!({"version": API_VERSION, "move": next}),
                ))
            }
            _ => Err(ApiError::new(
                "method_not_allowed",
                "GET /v1/moves/{id}, POST /v1/moves/{id}/progress",
            )),
        }
    }

    /// `POST /v1/moves`: plans and records the move; the agent learns of it from its
    /// assignment.
    async fn request_move(&self, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let internal = |e: crate::state::StateError| ApiError::new("internal", e.to_string());
        let req = fbr_enroll::wire::parse_move_request(body)?;
        let _one_at_a_time = self.moving.lock().await;
        let components = self.state.components().map_err(internal)?;
        let heartbeats = self.state.heartbeats().map_err(internal)?;
        let placements = self.state.placements().map_err(internal)?;
        let moves = self.state.moves().map_err(internal)?;
        let unfinished = moves
            .iter()
            .rev()
            .find(|m| m.vm == req.vm && !m.phase.is_finished());
        let site = crate::moves::Site {
            components: &components,
            heartbeats: &heartbeats,
            placement: placements.get(&req.vm),
            unfinished,
            now_ms: now_ms(),
        };
        let id = self.state.next_move_id().map_err(internal)?;
        let (m, placement) = crate::moves::plan(&req, id, &site)?;
        self.state
            .record_move(&m, Some(&placement))
            .map_err(internal)?;
        self.metrics
            .moves_total
            .with_label_values(&["requested"])
            .inc();
        tracing::info!(id, vm = %m.vm, from = ?m.from_relay, to = %m.to_relay, placement = m.placement, drain = m.drain, "move requested");
        Ok(json(
            &serde_json::json!({"version": API_VERSION, "move": m}),
        ))
    }

    /// `peer`'s assignment as it stands now (what enrollment answered, with addresses
    /// as advertised since).
    fn assignment(&self, peer: &fbr_transport::PeerIdentity) -> Result<Vec<u8>, ApiError> {
        let internal = |e: crate::state::StateError| ApiError::new("internal", e.to_string());
        let me = self.enrolled(peer)?;
        let components = self.state.components().map_err(internal)?;
        let mut assignment = assignment_of(&me, &components);
        if me.role == "agent" {
            let placements = self.state.placements().map_err(internal)?;
            assignment.placements = me
                .vms
                .iter()
                .filter_map(|vm| placements.get(vm))
                .map(|p| fbr_enroll::wire::VmPlacement {
                    vm: p.vm.clone(),
                    relay: p.relay.clone(),
                    relay_address: components
                        .iter()
                        .find(|c| c.role == "relay" && c.name == p.relay)
                        .and_then(|c| c.advertise.clone()),
                    placement: p.placement,
                    move_id: p.move_id,
                    drain: p.drain,
                })
                .collect();
        }
        Ok(json(&serde_json::json!({
            "version": API_VERSION,
            "assignment": assignment,
        })))
    }

    /// The enrolled component `peer`'s certificate names (name and role).
    fn enrolled(&self, peer: &fbr_transport::PeerIdentity) -> Result<Component, ApiError> {
        self.state
            .component(&peer.common_name)
            .map_err(|e| ApiError::new("internal", e.to_string()))?
            .filter(|c| fbr_transport::Role::parse(&c.role).is_some_and(|r| peer.has_role(r)))
            .ok_or_else(|| {
                ApiError::new(
                    "not_enrolled",
                    format!(
                        "{} is not enrolled in this site (run `register`)",
                        peer.common_name
                    ),
                )
            })
    }

    /// Records `peer`'s heartbeat: it must be enrolled, under the name and role its
    /// certificate says.
    fn heartbeat(
        &self,
        peer: &fbr_transport::PeerIdentity,
        body: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        let internal = |e: crate::state::StateError| ApiError::new("internal", e.to_string());
        let report = fbr_enroll::wire::parse_heartbeat(body)?;
        let mut me = self.enrolled(peer)?;
        if report.advertise.is_some() && report.advertise != me.advertise {
            // Where others reach it now (a daemon restarted on another port).
            me.advertise = report.advertise.clone();
            self.state.update_component(&me).map_err(internal)?;
        }
        let beat = crate::state::LastHeartbeat {
            received_ms: now_ms(),
            report,
        };
        self.state
            .record_heartbeat(&peer.common_name, &beat)
            .map_err(internal)?;
        self.metrics.heartbeats_total.inc();
        // A relay's controller authenticates operators with the site's token.
        let operator_token_sha256 = if peer.roles.contains(&fbr_transport::Role::Relay) {
            self.state.operator_token_sha256().map_err(internal)?
        } else {
            None
        };
        Ok(json(&fbr_enroll::wire::HeartbeatAck {
            version: API_VERSION,
            site_id: self.site.site_id.clone(),
            operator_token_sha256,
        }))
    }

    async fn enroll(
        &self,
        body: &[u8],
        client: IpAddr,
        exporter: [u8; 32],
    ) -> Result<Vec<u8>, ApiError> {
        let outcome = self.try_enroll(body, client, exporter).await;
        let label = match &outcome {
            Ok(_) => "enrolled",
            Err(e) if e.error.code == "wrong_passphrase" => "wrong_passphrase",
            Err(_) => "refused",
        };
        self.metrics
            .enrollments_total
            .with_label_values(&[label])
            .inc();
        outcome
    }

    async fn try_enroll(
        &self,
        body: &[u8],
        client: IpAddr,
        exporter: [u8; 32],
    ) -> Result<Vec<u8>, ApiError> {
        let internal = |e: crate::state::StateError| ApiError::new("internal", e.to_string());
        let checked = parse_enroll_request(body)?;
        let who = client.to_string();
        let failures = self.state.failures(&who).map_err(internal)?;
        tokio::time::sleep(failure_delay(failures)).await;
        if !proof::check_client_proof(
            &self.verifier,
            &exporter,
            &checked.request.csr_pem,
            &checked.proof,
        ) {
            let n = self
                .state
                .record_failure(&who, now_ms())
                .map_err(internal)?;
            tracing::warn!(client = %who, failures = n, name = %checked.request.name, "enrollment with a wrong passphrase");
            return Err(ApiError::new(
                "wrong_passphrase",
                format!(
                    "the passphrase proof does not hold for this session (wrong passphrase, or a man in the middle); the next attempt from {who} waits {:?}",
                    failure_delay(n)
                ),
            ));
        }
        let _one_at_a_time = self.enrolling.lock().await;
        let r = &checked.request;
        let key_sha256 = csr_key_sha256(&r.csr_pem)?;
        let existing = self.state.component(&r.name).map_err(internal)?;
        if let Some(c) = &existing {
            if c.key_sha256 != key_sha256 || c.role != r.role {
                return Err(ApiError::new(
                    "name_taken",
                    format!(
                        "{} is enrolled already, as a {} with another key: pick another name (or keep the component's key to enroll it again)",
                        r.name, c.role
                    ),
                ));
            }
        }
        let vms = match checked.role {
            fbr_transport::Role::Relay => vec!["*".to_owned()],
            fbr_transport::Role::Agent => r.vms.clone(),
            _ => vec![],
        };
        // Servers carry their own name too: agents moved to a relay, and relays given
        // a master target, know it by name.
        let mut dns_names = r.dns_names.clone();
        if matches!(
            checked.role,
            fbr_transport::Role::Relay | fbr_transport::Role::MasterTarget
        ) && !dns_names.contains(&r.name)
        {
            dns_names.insert(0, r.name.clone());
        }
        let issue = fbr_transport::pki::IssueRequest {
            name: r.name.clone(),
            role: checked.role,
            vms: vms.clone(),
            dns_names,
            ip_addresses: r.ip_addresses.clone(),
        };
        let certificate_pem = fbr_transport::pki::issue_from_csr(&self.pki, &issue, &r.csr_pem)
            .map_err(|e| ApiError::new("bad_csr", format!("the certificate request: {e}")))?;
        let ca_pem = std::fs::read_to_string(self.pki.join("ca.pem"))
            .map_err(|e| ApiError::new("internal", format!("the site CA: {e}")))?;
        let placed = match checked.role {
            fbr_transport::Role::Agent => {
                let inventory = self.state.inventory(now_ms()).map_err(internal)?;
                crate::placement::choose_relay(&inventory, r.relay.as_deref())
                    .map_err(|e| ApiError::new("unknown_relay", e))?
            }
            _ => None,
        };
        let now = now_ms();
        let component = Component {
            name: r.name.clone(),
            role: r.role.clone(),
            vms: r.vms.clone(),
            advertise: r.advertise.clone(),
            key_sha256,
            enrolled_ms: existing.as_ref().map_or(now, |c| c.enrolled_ms),
            last_enrolled_ms: now,
            enrollments: existing.as_ref().map_or(0, |c| c.enrollments) + 1,
            assigned_relay: placed.as_ref().map(|p| p.0.clone()),
        };
        self.state
            .record_enrollment(&component, &who)
            .map_err(internal)?;
        let components = self.state.components().map_err(internal)?;
        self.metrics.components.set(components.len() as i64);
        let assignment = assignment_of(&component, &components);
        tracing::info!(name = %r.name, role = %r.role, client = %who, again = existing.is_some(), "enrolled");
        Ok(json(&EnrollResponse {
            version: API_VERSION,
            site_id: self.site.site_id.clone(),
            proof: proof::to_hex(&proof::server_proof(
                &self.verifier,
                &exporter,
                &certificate_pem,
            )),
            certificate_pem,
            ca_pem,
            assignment,
        }))
    }
}

/// What `component` is assigned, given every enrolled component: a relay, the first
/// master target that advertised an address; an agent, its VMs and the relay it was
/// placed on (with that relay's address as it advertises it now).
fn assignment_of(component: &Component, components: &[Component]) -> Assignment {
    let advertised = |role: &str, name: Option<&str>| {
        components
            .iter()
            .filter(|c| c.role == role && name.is_none_or(|n| c.name == n))
            .find_map(|c| c.advertise.clone())
    };
    match component.role.as_str() {
        "relay" => Assignment {
            master_target: advertised("master-target", None),
            ..Assignment::default()
        },
        "agent" => Assignment {
            vms: component.vms.clone(),
            relay: component.assigned_relay.clone(),
            relay_address: component
                .assigned_relay
                .as_deref()
                .and_then(|r| advertised("relay", Some(r))),
            ..Assignment::default()
        },
        _ => Assignment::default(),
    }
}

/// SHA-256 of the certificate request's public key, hex (the component's identity).
fn csr_key_sha256(csr_pem: &str) -> Result<String, ApiError> {
    let bad = |e: String| ApiError::new("bad_csr", format!("the certificate request: {e}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(e.to_string()))?;
    let spki = csr.certification_request_info.subject_pki.raw;
    Ok(proof::to_hex(
        ring::digest::digest(&ring::digest::SHA256, spki).as_ref(),
    ))
}

/// The status and body of an answer.
fn answer(result: Result<Vec<u8>, ApiError>) -> (StatusCode, Vec<u8>) {
    match result {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => (
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            json(&e),
        ),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec())
}

async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, ApiError> {
    read_body_limited(req, MAX_BODY).await
}

async fn read_body_limited(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, ApiError> {
    use fbr_enroll::https::BodyError;
    fbr_enroll::https::read_body(req, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(_) => ApiError::new(
                "body_too_large",
                format!("bodies are at most {limit} bytes"),
            ),
            e => ApiError::new("bad_request", e.to_string()),
        })
}

fn certificate_required() -> ApiError {
    ApiError::new(
        "certificate_required",
        "this endpoint needs the component's site certificate (mutual TLS): enroll first",
    )
}

/// Serves the API on `listener` until the task is dropped, admitting connections
/// through `gate` (of [`MAX_CONNECTIONS`] slots: [`gate`]).
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    gate: fbr_daemon::gate::ConnectionGate,
) -> anyhow::Result<()> {
    let limits = fbr_enroll::https::Limits {
        connection_timeout: CONNECTION_TIMEOUT,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    let tls = server.tls_config()?;
    fbr_enroll::https::serve(listener, tls, limits, gate, move |req, caller| {
        let server = server.clone();
        async move {
            server
                .handle(
                    req,
                    caller.remote.ip(),
                    caller.exporter,
                    caller.peer.as_ref(),
                )
                .await
        }
    })
    .await;
    Ok(())
}

/// The API's admission gate: [`MAX_CONNECTIONS`] slots.
pub fn gate() -> fbr_daemon::gate::ConnectionGate {
    fbr_daemon::gate::ConnectionGate::new(MAX_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::failure_delay;
    use std::time::Duration;

    #[test]
    fn each_failure_doubles_the_wait_up_to_half_a_minute() {
        let waits: Vec<u64> = (0..10)
            .map(|n| failure_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [0, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(failure_delay(u64::MAX), Duration::from_secs(30));
    }
}
