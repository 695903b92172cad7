//! The failback controller's operator API: HTTPS (TLS 1.3, the relay's certificate),
//! JSON documents, every endpoint listed in docs/API.md.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /v1/vms` | every VM, its protection state, its job, its last error |
//! | `GET /v1/jobs?vm=&state=&operation=&limit=` | jobs, newest first, filtered |
//! | `GET /v1/jobs/{id}` | one job: steps, percent, live ETA, estimate and actual |
//! | `POST /v1/jobs` | start a job (`{"operation": {...}, "vms": [...], "idempotency_key", "boot", "boot_delay_s"}`) |
//! | `POST /v1/jobs/{id}/cancel` | cancel where safe; says what was undone |
//! | `POST /v1/estimate` | a failover's estimate (`{"vms", "point", "planned"}`) |
//! | `GET /v1/points` | the recovery points of every VM, as the master target holds them |
//!
//! Who may call: an operator with a client certificate of the site CA with the role
//! `operator` (`relay pki issue --role operator`), or with the site's operator token
//! (`Authorization: Bearer`), which the configuration server made and whose SHA-256 it
//! sends this relay with every heartbeat answer. Anything else is refused (401) before
//! the request is read. Bodies over [`MAX_BODY`] are refused unread; at most
//! [`MAX_CONNECTIONS`] connections are served at once, each for at most
//! [`CONNECTION_TIMEOUT`], and a request's headers must arrive within 10 s.

use std::sync::Arc;
use std::time::Duration;

use fbr_controller::{Job, JobRequest, Operation, PointChoice, Refusal, RefusalCode};
use fbr_enroll::wire::ApiError;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::net::TcpListener;

use crate::failback::Failback;
use crate::server::Relay;
use fbr_cache::now_ms;

/// Version of the API's documents.
pub const API_VERSION: u32 = 1;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest one connection is served.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most jobs one listing returns.
const MAX_LIMIT: usize = 1000;

/// `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobPost {
    pub operation: Operation,
    /// One VM, or a plan's VMs.
    pub vms: Vec<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// A plan's boot order: groups of VMs powered on together, in order.
    #[serde(default)]
    pub boot: Option<Vec<Vec<String>>>,
    #[serde(default)]
    pub boot_delay_s: u64,
}

/// `POST /v1/estimate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimatePost {
    pub vms: Vec<String>,
    pub point: PointChoice,
    #[serde(default)]
    pub planned: bool,
}

/// A job as the API shows it: the job, with what follows from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// Percent done, weighted by the steps' estimates when every step has one (half way
    /// is half the expected time), else by steps.
    pub percent: f64,
    /// Seconds left, when known.
    pub eta_s: Option<f64>,
    /// How long it took, once finished.
    pub actual_s: Option<f64>,
}

impl JobView {
    pub fn of(job: Job, now_ms: u64) -> Self {
        JobView {
            percent: job.percent_at(now_ms),
            eta_s: job.eta_s(now_ms),
            actual_s: job.actual_s(),
            job,
        }
    }
}

/// The HTTP status of a refusal.
fn status_of(code: RefusalCode) -> StatusCode {
    match code {
        RefusalCode::BadRequest => StatusCode::BAD_REQUEST,
        RefusalCode::UnknownVm | RefusalCode::UnknownJob => StatusCode::NOT_FOUND,
        RefusalCode::JobRunning | RefusalCode::WrongState | RefusalCode::NotCancellable => {
            StatusCode::CONFLICT
        }
        RefusalCode::NoRecoveryPoint => StatusCode::UNPROCESSABLE_ENTITY,
        RefusalCode::NotEnoughSpace => StatusCode::INSUFFICIENT_STORAGE,
        RefusalCode::ConfigServerDisconnected | RefusalCode::MasterTargetUnreachable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        RefusalCode::NotConfigured => StatusCode::NOT_IMPLEMENTED,
        RefusalCode::StepFailed | RefusalCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn refusal(r: Refusal) -> (StatusCode, ApiError) {
    let mut e = ApiError::new(r.code.name(), r.message);
    e.error.remedy = Some(r.remedy);
    (status_of(r.code), e)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> (StatusCode, ApiError) {
    (status, ApiError::new(code, message))
}

type Answer = Result<serde_json::Value, (StatusCode, ApiError)>;

fn document(v: impl Serialize) -> Answer {
    serde_json::to_value(v)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// The API: the controller and what authenticates operators.
#[derive(Debug)]
pub struct Api {
    pub failback: Arc<Failback>,
    pub relay: Arc<Relay>,
}

impl Api {
    /// Whether the caller is an operator: a site certificate with the `operator` role,
    /// or the token the configuration server vouches for.
    fn authenticate(
        &self,
        req: &Request<Incoming>,
        peer: Option<&fbr_transport::PeerIdentity>,
    ) -> Result<(), (StatusCode, ApiError)> {
        if peer.is_some_and(|p| p.has_role(fbr_transport::Role::Operator)) {
            return Ok(());
        }
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "token_required",
                "this API needs an operator certificate (role operator) or the site's operator token (Authorization: Bearer, from the configuration server's <data>/operator.token)",
            ));
        };
        let expected = self
            .relay
            .config_server_status()
            .and_then(|s| s.operator_token_sha256);
        let Some(expected) = expected else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "config_server_disconnected",
                "the relay has not heard the operator token from its configuration server yet: check [config_server] and that config-server runs, or use an operator certificate",
            ));
        };
        let presented = hex(&sha2::Sha256::digest(token.as_bytes()));
        if presented != expected.to_ascii_lowercase() {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "wrong_token",
                "the operator token is not the site's (it may have been rotated)",
            ));
        }
        Ok(())
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Option<&fbr_transport::PeerIdentity>,
    ) -> (StatusCode, Vec<u8>) {
        let answer = match self.authenticate(&req, peer) {
            Err(e) => Err(e),
            Ok(()) => self.route(req).await,
        };
        match answer {
            Ok(v) => (StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default()),
            Err((status, e)) => (status, serde_json::to_vec(&e).unwrap_or_default()),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Answer {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "vms"]) => {
                let vms: Vec<serde_json::Value> = self
                    .failback
                    .vms()
                    .into_iter()
                    .map(|(name, rec)| {
                        serde_json::json!({
                            "vm": name,
                            "protection": rec.protection.name(),
                            "job": rec.job,
                            "test_copy": rec.test_copy,
                            "on_premises": rec.on_premises,
                            "test_disks": rec.test_disks,
                            "last_error": rec.last_error,
                        })
                    })
                    .collect();
                document(serde_json::json!({"version": API_VERSION, "vms": vms}))
            }
            (&Method::GET, ["v1", "jobs"]) => self.list_jobs(&query),
            (&Method::GET, ["v1", "points"]) => match self.failback.facts(false).await.1 {
                Some(view) => {
                    document(serde_json::json!({"version": API_VERSION, "points": view.points}))
                }
                None => Err(refusal(Refusal::new(
                    RefusalCode::MasterTargetUnreachable,
                    "the master target did not answer",
                ))),
            },
            (&Method::GET, ["v1", "jobs", id]) => {
                let id = job_id(id)?;
                match self.failback.job(id) {
                    Some(job) => document(serde_json::json!({
                        "version": API_VERSION,
                        "job": JobView::of(job, now_ms()),
                    })),
                    None => Err(refusal(Refusal::new(
                        RefusalCode::UnknownJob,
                        format!("no job {id}"),
                    ))),
                }
            }
            (&Method::POST, ["v1", "jobs"]) => {
                let header_key = req
                    .headers()
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = read_body(req).await?;
                let mut post: JobPost = decode(&body, "a job request")?;
                if post.idempotency_key.is_none() {
                    post.idempotency_key = header_key;
                }
                self.start_job(post).await
            }
            (&Method::POST, ["v1", "jobs", id, "cancel"]) => {
                let id = job_id(id)?;
                let said = self.failback.cancel(id).map_err(refusal)?;
                let job = self.failback.job(id).map(|j| JobView::of(j, now_ms()));
                document(serde_json::json!({"version": API_VERSION, "said": said, "job": job}))
            }
            (&Method::POST, ["v1", "estimate"]) => {
                let body = read_body(req).await?;
                let post: EstimatePost = decode(&body, "an estimate request")?;
                if post.vms.is_empty() {
                    return Err(refusal(Refusal::new(
                        RefusalCode::BadRequest,
                        "the request names no VM",
                    )));
                }
                let estimate = self
                    .failback
                    .estimate(&post.vms, &post.point, post.planned)
                    .await;
                document(serde_json::json!({"version": API_VERSION, "estimate": estimate}))
            }
            (
                _,
                ["v1", "vms"] | ["v1", "jobs"] | ["v1", "jobs", _] | ["v1", "estimate"]
                | ["v1", "points"],
            )
            | (_, ["v1", "jobs", _, "cancel"]) => Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "GET /v1/vms, GET /v1/points, GET and POST /v1/jobs, GET /v1/jobs/{id}, POST /v1/jobs/{id}/cancel, POST /v1/estimate",
            )),
            _ => Err(error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            )),
        }
    }

    fn list_jobs(&self, query: &str) -> Answer {
        let mut vm = None;
        let mut state = None;
        let mut operation = None;
        let mut limit = 100usize;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "vm" => vm = Some(v.to_owned()),
                "state" => state = Some(v.to_owned()),
                "operation" => operation = Some(v.to_owned()),
                "limit" => {
                    limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("limit {v:?}: 1 to {MAX_LIMIT}"),
                            )
                        })?
                }
                other => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("unknown filter {other:?} (vm, state, operation, limit)"),
                    ))
                }
            }
        }
        let now = now_ms();
        let jobs: Vec<JobView> = self
            .failback
            .jobs()
            .into_iter()
            .rev()
            .filter(|j| vm.as_ref().is_none_or(|vm| j.vms.contains(vm)))
            .filter(|j| {
                state.as_ref().is_none_or(|s| {
                    serde_json::to_value(j.state).is_ok_and(|v| v.as_str() == Some(s))
                })
            })
            .filter(|j| operation.as_ref().is_none_or(|o| j.operation.name() == o))
            .take(limit)
            .map(|j| JobView::of(j, now))
            .collect();
        document(serde_json::json!({"version": API_VERSION, "jobs": jobs}))
    }

    /// Checks and starts a job; a failover gets its estimate first, kept for the
    /// actual (and counted step by step by the live ETA).
    async fn start_job(&self, post: JobPost) -> Answer {
        let mut step_estimates_s = std::collections::BTreeMap::new();
        let mut estimate_s = None;
        let point = match &post.operation {
            Operation::Failover { point, .. }
            | Operation::ChangePoint { point }
            | Operation::TestFailover { point } => Some(point.clone()),
            _ => None,
        };
        if let (Some(point), false) = (point, post.vms.is_empty()) {
            let planned = matches!(post.operation, Operation::Failover { planned: true, .. });
            let e = self.failback.estimate(&post.vms, &point, planned).await;
            let est = &e.estimate;
            estimate_s = est.total_s;
            step_estimates_s.insert("choose_point".to_owned(), 0.0);
            if planned {
                step_estimates_s.insert("shut_down_source".to_owned(), e.shut_down_s);
            }
            if let Some(d) = est.drain_s {
                step_estimates_s.insert("drain".to_owned(), d);
            }
            if let Some(r) = est.rollback_s {
                step_estimates_s.insert("roll_back".to_owned(), r);
                step_estimates_s.insert("materialize_test_copy".to_owned(), r);
            }
            // The VMs of a boot group start together; the groups one after another,
            // the plan's delay apart.
            let groups = post.boot.as_ref().map_or(1, |b| b.len().max(1)) as f64;
            let boot = e.boot_s_per_vm * groups + post.boot_delay_s as f64 * (groups - 1.0);
            estimate_s = estimate_s.map(|t| t - est.boot_s + boot);
            step_estimates_s.insert("power_on".to_owned(), boot);
            step_estimates_s.insert("power_on_test".to_owned(), e.boot_s_per_vm);
        }
        let req = JobRequest {
            operation: post.operation,
            vms: post.vms,
            idempotency_key: post.idempotency_key,
            estimate_s,
            boot: post.boot,
            boot_delay_s: post.boot_delay_s,
            step_estimates_s,
        };
        let job = self.failback.request(req).await.map_err(refusal)?;
        document(serde_json::json!({
            "version": API_VERSION,
            "job": JobView::of(job, now_ms()),
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn job_id(s: &str) -> Result<u64, (StatusCode, ApiError)> {
    s.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("job id {s:?} is not a number"),
        )
    })
}

/// Decodes a request document: bounded, strict, with a clear error.
pub fn decode<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    what: &str,
) -> Result<T, (StatusCode, ApiError)> {
    if body.len() > MAX_BODY {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{what} is {} bytes, limit {MAX_BODY}", body.len()),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{what}: {e}"),
        )
    })
}

async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, (StatusCode, ApiError)> {
    use fbr_enroll::https::BodyError;
    fbr_enroll::https::read_body(req, MAX_BODY)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(_) => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is over {MAX_BODY} bytes"),
            ),
            BodyError::TooSlow => error(StatusCode::REQUEST_TIMEOUT, "bad_request", e.to_string()),
            BodyError::Broken(_) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        })
}

/// Serves the API on `listener` until the task is dropped, admitting connections
/// through `gate` (of [`MAX_CONNECTIONS`] slots: [`gate`]).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    api: Arc<Api>,
    gate: fbr_daemon::gate::ConnectionGate,
) {
    let limits = fbr_enroll::https::Limits {
        connection_timeout: CONNECTION_TIMEOUT,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    fbr_enroll::https::serve(listener, tls, limits, gate, move |req, caller| {
        let api = api.clone();
        async move { api.handle(req, caller.peer.as_ref()).await }
    })
    .await;
}

/// The API's admission gate: [`MAX_CONNECTIONS`] slots.
pub fn gate() -> fbr_daemon::gate::ConnectionGate {
    fbr_daemon::gate::ConnectionGate::new(MAX_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_requests_are_strict() {
        let ok: JobPost = decode(
            br#"{"operation":{"operation":"failover","point":"latest","planned":true},"vms":["vm1"],"idempotency_key":"k1"}"#,
            "a job request",
        )
        .unwrap();
        assert_eq!(
            ok.operation,
            Operation::Failover {
                point: PointChoice::Latest,
                planned: true
            }
        );
        let tag: JobPost = decode(
            br#"{"operation":{"operation":"test_failover","point":{"tag":17}},"vms":["vm1"]}"#,
            "a job request",
        )
        .unwrap();
        assert_eq!(
            tag.operation,
            Operation::TestFailover {
                point: PointChoice::Tag(17)
            }
        );
        for bad in [
            &br#"{"operation":{"operation":"format"},"vms":["vm1"]}"#[..],
            br#"{"operation":{"operation":"commit"},"vms":["vm1"],"extra":1}"#,
            br#"{"vms":["vm1"]}"#,
            b"not json",
        ] {
            let (status, e) = decode::<JobPost>(bad, "a job request").unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(e.error.code, "bad_request");
        }
        let big = vec![b' '; MAX_BODY + 1];
        assert_eq!(
            decode::<JobPost>(&big, "a job request").unwrap_err().0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn every_refusal_has_a_status_and_remedy() {
        for code in [
            RefusalCode::BadRequest,
            RefusalCode::UnknownVm,
            RefusalCode::JobRunning,
            RefusalCode::NoRecoveryPoint,
            RefusalCode::NotEnoughSpace,
            RefusalCode::MasterTargetUnreachable,
            RefusalCode::Internal,
        ] {
            let (status, e) = refusal(Refusal::new(code, "x"));
            assert!(status.as_u16() >= 400);
            assert!(e.error.remedy.is_some_and(|r| !r.is_empty()));
        }
    }
}
