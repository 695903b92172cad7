//! The JSON documents of the configuration server's enrollment API (docs/API.md), and
//! the checks every request passes before anything acts on it.
//!
//! Version 1. Fields are only ever added; a document with a `version` other than 1 is
//! refused with code `unsupported_version`.

use serde::{Deserialize, Serialize};

/// Version of every document here.
pub const API_VERSION: u32 = 1;
/// Largest enrollment body the server reads (a bigger one is refused, unread).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest heartbeat body (a relay with thousands of disks reports each).
pub const MAX_HEARTBEAT_BODY: usize = 4 << 20;
/// Most streams one heartbeat reports.
pub const MAX_STREAMS: usize = 20_000;
/// Heartbeat intervals a component may declare, seconds.
pub const HEARTBEAT_INTERVALS_S: std::ops::RangeInclusive<u64> = 1..=3600;
/// Missed heartbeats after which the configuration server marks a component
/// disconnected.
pub const MISSED_HEARTBEATS: u64 = 3;
/// Largest certificate request accepted.
pub const MAX_CSR: usize = 16 * 1024;
/// Most VMs, DNS names or IP addresses one request may name.
pub const MAX_LIST: usize = 256;

/// `GET /v1/enroll/params`: what a component needs to derive the verifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollParams {
    pub version: u32,
    /// The site's identity (random, made by `config-server init`).
    pub site_id: String,
    /// PBKDF2 salt, hex.
    pub salt: String,
    pub iterations: u32,
}

/// `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub version: u32,
    /// `relay`, `master-target` or `agent`.
    pub role: String,
    /// The component's name: its certificate's common name and file stem.
    pub name: String,
    /// Agents: the VMs whose disks it writes.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Names and addresses its certificate must carry (servers: relays, master targets).
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// Where others reach it (`host:port`), e.g. the master target's address for relays.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Agents: the relay the operator chose (its name); none: the server places it.
    #[serde(default)]
    pub relay: Option<String>,
    /// PKCS#10 certificate request, PEM: the key stays with the component.
    pub csr_pem: String,
    /// The client proof, hex ([`crate::proof`]).
    pub proof: String,
}

/// The answer to a successful `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub version: u32,
    pub site_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// The server proof, hex: over the certificate issued.
    pub proof: String,
    pub assignment: Assignment,
}

/// What the configuration server assigns a component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Relays: the master target to forward to, as it advertised itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_target: Option<String>,
    /// Agents: the VMs it may write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    /// Agents: the relay to write to, its name and address (the one named, or the one
    /// with the most headroom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_address: Option<String>,
    /// Agents: where each of its VMs writes now (a VM moved by an operator writes to
    /// its own relay, at a higher placement); VMs not listed write to `relay`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<VmPlacement>,
}

/// Where a VM writes after a move ([`Assignment::placements`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlacement {
    pub vm: String,
    /// The relay's name (its certificate's DNS name) and address.
    pub relay: String,
    pub relay_address: Option<String>,
    /// How many times the VM moved: sent in every `Hello`, so that the old path is
    /// refused once the new one is in use.
    pub placement: u64,
    /// The move that put it there, while it is not finished.
    #[serde(default)]
    pub move_id: Option<u64>,
    /// Whether the agent first drains the old relay's backlog of the VM (the old relay
    /// was connected when the move was asked), or moves at once and resyncs what the
    /// master target lacks (it was not).
    #[serde(default)]
    pub drain: bool,
}

/// The phases of a move, in order (`failed` can end any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Asked for; the agent has not reported yet.
    Requested,
    /// The agent stopped new writes to the old relay and waits until the master target
    /// has everything the old relay held of the VM.
    Draining,
    /// The agent points the VM's disks at the new relay.
    Switching,
    /// The old relay was lost with records the master target lacked: a delta resync
    /// of the VM's disks through the new relay replaces them.
    Resyncing,
    Done,
    Failed,
}

impl MovePhase {
    pub fn name(self) -> &'static str {
        match self {
            MovePhase::Requested => "requested",
            MovePhase::Draining => "draining",
            MovePhase::Switching => "switching",
            MovePhase::Resyncing => "resyncing",
            MovePhase::Done => "done",
            MovePhase::Failed => "failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, MovePhase::Done | MovePhase::Failed)
    }
}

/// `POST /v1/moves/{id}/progress` (the moving VM's agent): where its side of the move
/// stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveProgress {
    pub version: u32,
    pub phase: Option<MovePhase>,
    /// Bytes of the VM's writes the old relay held and the master target did not when
    /// the drain began, and how many of them have reached it since.
    pub bytes_to_drain: u64,
    pub bytes_drained: u64,
    /// How long the drain took (or has taken so far), ms.
    pub drain_ms: u64,
    /// Why the move fell back to a resync (the old relay was lost), if it did.
    #[serde(default)]
    pub fell_back: Option<String>,
    /// Why the move failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// A request document of this API version.
trait Versioned {
    fn version(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(impl Versioned for $t { fn version(&self) -> u32 { self.version } })*};
}
versioned!(MoveProgress, MoveRequest, Heartbeat, EnrollRequest);

/// Decodes a JSON request body of at most `limit` bytes (`what` names it in errors) and
/// checks its version: the steps every request decoder starts with.
fn decode_document<T: serde::de::DeserializeOwned + Versioned>(
    body: &[u8],
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    if body.len() > limit {
        return Err(ApiError::new(
            "body_too_large",
            format!("the body is {} bytes, over {limit}", body.len()),
        ));
    }
    let doc: T = serde_json::from_slice(body)
        .map_err(|e| ApiError::new("bad_json", format!("not {what}: {e}")))?;
    if doc.version() != API_VERSION {
        return Err(ApiError::new(
            "unsupported_version",
            format!(
                "version {} (this server speaks {API_VERSION})",
                doc.version()
            ),
        ));
    }
    Ok(doc)
}

/// Decodes and checks a `POST /v1/moves/{id}/progress` body.
pub fn parse_move_progress(body: &[u8]) -> Result<MoveProgress, ApiError> {
    let p: MoveProgress = decode_document(body, MAX_BODY, "a move progress report")?;
    let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > 1024);
    if long(&p.fell_back) || long(&p.error) {
        return Err(ApiError::new("too_long", "a reason over 1024 bytes"));
    }
    if p.bytes_drained > p.bytes_to_drain {
        return Err(ApiError::new(
            "bad_progress",
            format!(
                "bytes_drained {} is more than bytes_to_drain {}",
                p.bytes_drained, p.bytes_to_drain
            ),
        ));
    }
    Ok(p)
}

/// `POST /v1/moves` (an operator): move `vm` to the relay named `relay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub version: u32,
    pub vm: String,
    pub relay: String,
}

/// Decodes and checks a `POST /v1/moves` body.
pub fn parse_move_request(body: &[u8]) -> Result<MoveRequest, ApiError> {
    let r: MoveRequest = decode_document(body, MAX_BODY, "a move request")?;
    fbr_protocol::names::validate_name(&r.vm)
        .map_err(|e| ApiError::new("bad_name", format!("vm {:?}: {e}", r.vm)))?;
    fbr_protocol::names::validate_name(&r.relay)
        .map_err(|e| ApiError::new("bad_name", format!("relay {:?}: {e}", r.relay)))?;
    Ok(r)
}

/// `POST /v1/heartbeat` (client certificate required): what a component reports every
/// `interval_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub version: u32,
    /// The component's software version.
    pub software_version: String,
    /// How often it reports: 3 intervals without one and it is disconnected.
    pub interval_s: u64,
    pub health: HealthSummary,
    #[serde(default)]
    pub cache: Option<CacheUsage>,
    #[serde(default)]
    pub streams: Vec<StreamReport>,
    /// Relays: bytes written by agents per second since the last heartbeat (the churn
    /// it carries).
    #[serde(default)]
    pub ingest_bytes_per_s: Option<f64>,
    /// Master targets: every disk replica held.
    #[serde(default)]
    pub disks: Vec<DiskReport>,
    /// Master targets: every replication group's newest recovery point.
    #[serde(default)]
    pub groups: Vec<GroupReport>,
    /// Where others reach it now (`host:port`: agents a relay, relays a master
    /// target), if it knows; the server keeps the component's address up to date.
    #[serde(default)]
    pub advertise: Option<String>,
}

impl Heartbeat {
    /// A healthy component's heartbeat that reports nothing else (fields are then
    /// filled in with struct update syntax).
    pub fn healthy(interval_s: u64) -> Self {
        Heartbeat {
            version: API_VERSION,
            software_version: env!("CARGO_PKG_VERSION").into(),
            interval_s,
            health: HealthSummary {
                state: "healthy".into(),
                reasons: vec![],
            },
            cache: None,
            streams: vec![],
            ingest_bytes_per_s: None,
            disks: vec![],
            groups: vec![],
            advertise: None,
        }
    }
}

/// A disk replica, as its master target reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub vm: String,
    pub disk: u32,
    pub size_bytes: u64,
    /// The replication group of its newest recovery point, if it has one.
    #[serde(default)]
    pub group: Option<String>,
    /// `consistent`, `resynced`, `resyncing` or `stale`.
    pub sync: String,
}

/// A replication group, as its master target reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    pub group: String,
    /// Complete recovery points held, and the newest one's time (UNIX ms).
    pub recovery_points: u64,
    #[serde(default)]
    pub newest_point_ms: Option<u64>,
}

/// A component's health as it sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// `healthy`, `warning` or `critical`.
    pub state: String,
    #[serde(default)]
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUsage {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

/// One disk stream through the component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub vm: String,
    pub disk: u32,
    /// Bytes received but not yet durable at the master target.
    pub backlog_bytes: u64,
    /// Age of the oldest of them, seconds (the stream's RPO, as the relay sees it).
    #[serde(default)]
    pub rpo_s: Option<u64>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub version: u32,
    pub site_id: String,
    /// Relays: the SHA-256 (hex) of the site's operator token, which the relay's
    /// controller API accepts (`Authorization: Bearer`). Absent for other components,
    /// and before a token exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_token_sha256: Option<String>,
}

/// Decodes and checks a `POST /v1/heartbeat` body.
pub fn parse_heartbeat(body: &[u8]) -> Result<Heartbeat, ApiError> {
    let h: Heartbeat = decode_document(body, MAX_HEARTBEAT_BODY, "a heartbeat")?;
    if !HEARTBEAT_INTERVALS_S.contains(&h.interval_s) {
        return Err(ApiError::new(
            "bad_interval",
            format!("interval_s {} is outside 1..=3600", h.interval_s),
        ));
    }
    if !["healthy", "warning", "critical"].contains(&h.health.state.as_str()) {
        return Err(ApiError::new(
            "bad_health",
            format!("health state {:?}", h.health.state),
        ));
    }
    if h.streams.len() > MAX_STREAMS
        || h.disks.len() > MAX_STREAMS
        || h.groups.len() > MAX_STREAMS
        || h.health.reasons.len() > MAX_LIST
    {
        return Err(ApiError::new("too_many", "too many streams or reasons"));
    }
    if let Some(a) = &h.advertise {
        if a.len() > 255 || !a.contains(':') {
            return Err(ApiError::new(
                "bad_address",
                format!("advertise {a:?}: must be host:port"),
            ));
        }
    }
    let vms = h
        .streams
        .iter()
        .map(|s| &s.vm)
        .chain(h.disks.iter().map(|d| &d.vm));
    for vm in vms {
        fbr_protocol::names::validate_name(vm)
            .map_err(|r| ApiError::new("bad_name", format!("vm {vm:?}: {r}")))?;
    }
    Ok(h)
}

/// Every error answer: `{"error": {"code": ..., "message": ...}}` with an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable (docs/API.md lists them).
    pub code: String,
    pub message: String,
    /// What to do about it (the relay's controller API says it for every refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError {
            error: ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                remedy: None,
            },
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(&self) -> u16 {
        match self.error.code.as_str() {
            "wrong_passphrase" | "certificate_required" | "token_required" | "wrong_token" => 401,
            "not_enrolled" | "forbidden" => 403,
            "not_found" | "unknown_move" | "unknown_vm" | "unknown_relay" => 404,
            "method_not_allowed" => 405,
            "name_taken" | "move_in_progress" | "move_finished" | "already_there" => 409,
            "body_too_large" => 413,
            "internal" => 500,
            _ => 400,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error.message, self.error.code)?;
        if let Some(r) = &self.error.remedy {
            write!(f, "; {r}")?;
        }
        Ok(())
    }
}

/// A checked enrollment request: decoded, version 1, names valid, lists bounded, the
/// proof 32 bytes. The certificate request's signature is checked when it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRequest {
    pub request: EnrollRequest,
    pub role: fbr_transport::Role,
    pub proof: [u8; 32],
}

/// Decodes and checks a `POST /v1/enroll` body (a fuzz target: any bytes get a value or
/// a coded error, never a panic).
pub fn parse_enroll_request(body: &[u8]) -> Result<CheckedRequest, ApiError> {
    let request: EnrollRequest = decode_document(body, MAX_BODY, "an enrollment request")?;
    let role = match fbr_transport::Role::parse(&request.role) {
        Some(
            r @ (fbr_transport::Role::Relay
            | fbr_transport::Role::MasterTarget
            | fbr_transport::Role::Agent),
        ) => r,
        _ => {
            return Err(ApiError::new(
                "bad_role",
                format!(
                    "role {:?}: must be relay, master-target or agent",
                    request.role
                ),
            ))
        }
    };
    let bad_name = |what: &str, name: &str, reason: String| {
        ApiError::new("bad_name", format!("{what} {name:?}: {reason}"))
    };
    fbr_protocol::names::validate_name(&request.name)
        .map_err(|r| bad_name("name", &request.name, r))?;
    for (what, n) in [
        ("vms", request.vms.len()),
        ("dns_names", request.dns_names.len()),
        ("ip_addresses", request.ip_addresses.len()),
    ] {
        if n > MAX_LIST {
            return Err(ApiError::new(
                "too_many",
                format!("{n} {what}, over {MAX_LIST}"),
            ));
        }
    }
    for vm in &request.vms {
        fbr_protocol::names::validate_name(vm).map_err(|r| bad_name("vm", vm, r))?;
    }
    for dns in &request.dns_names {
        let ok = !dns.is_empty()
            && dns.len() <= 253
            && dns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !ok {
            return Err(bad_name("dns name", dns, "not a host name".into()));
        }
    }
    if let Some(r) = &request.relay {
        fbr_protocol::names::validate_name(r).map_err(|e| bad_name("relay", r, e))?;
    }
    if let Some(a) = &request.advertise {
        if a.is_empty() || a.len() > 260 || !a.contains(':') || a.chars().any(char::is_whitespace) {
            return Err(ApiError::new(
                "bad_address",
                format!("advertise {a:?}: must be host:port"),
            ));
        }
    }
    if request.csr_pem.len() > MAX_CSR {
        return Err(ApiError::new(
            "bad_csr",
            format!("the certificate request is over {MAX_CSR} bytes"),
        ));
    }
    let proof: [u8; 32] = crate::proof::from_hex(&request.proof)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| ApiError::new("bad_proof", "the proof must be 64 hex digits"))?;
    Ok(CheckedRequest {
        request,
        role,
        proof,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "role": "relay",
            "name": "relay-1",
            "dns_names": ["relay-1.example"],
            "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----",
            "proof": "00".repeat(32),
        })
    }

    fn code(v: &serde_json::Value) -> String {
        parse_enroll_request(&serde_json::to_vec(v).unwrap())
            .unwrap_err()
            .error
            .code
    }

    #[test]
    fn a_good_request_passes_and_each_bad_field_gets_its_code() {
        let ok = parse_enroll_request(&serde_json::to_vec(&request()).unwrap()).unwrap();
        assert_eq!(ok.role, fbr_transport::Role::Relay);
        let cases: [(&str, serde_json::Value, &str); 7] = [
            ("version", 2.into(), "unsupported_version"),
            ("role", "config-server".into(), "bad_role"),
            ("name", "../etc".into(), "bad_name"),
            ("proof", "abc".into(), "bad_proof"),
            ("advertise", "nowhere".into(), "bad_address"),
            ("dns_names", serde_json::json!(["a b"]), "bad_name"),
            ("surprise", 1.into(), "bad_json"),
        ];
        for (field, value, want) in cases {
            let mut r = request();
            r[field] = value;
            assert_eq!(code(&r), want, "{field}");
        }
        assert_eq!(
            parse_enroll_request(b"{not json").unwrap_err().error.code,
            "bad_json"
        );
        let beat = serde_json::json!({
            "version": 1, "software_version": "0.1.0", "interval_s": 30,
            "health": {"state": "warning", "reasons": ["cache 28% free"]},
            "streams": [{"vm": "vm1", "disk": 0, "backlog_bytes": 4096, "rpo_s": 2}],
        });
        assert!(parse_heartbeat(&serde_json::to_vec(&beat).unwrap()).is_ok());
        for (field, value, want) in [
            ("interval_s", serde_json::json!(0), "bad_interval"),
            ("health", serde_json::json!({"state": "fine"}), "bad_health"),
            (
                "streams",
                serde_json::json!([{"vm": "a/b", "disk": 0, "backlog_bytes": 0}]),
                "bad_name",
            ),
        ] {
            let mut b = beat.clone();
            b[field] = value;
            let e = parse_heartbeat(&serde_json::to_vec(&b).unwrap()).unwrap_err();
            assert_eq!(e.error.code, want, "{field}");
        }
        let big = vec![b' '; MAX_BODY + 1];
        let e = parse_enroll_request(&big).unwrap_err();
        assert_eq!((e.error.code.as_str(), e.status()), ("body_too_large", 413));
    }
}
