//! The master target's control socket (`fbr_daemon::control`: a Unix socket, mode 0600,
//! one JSON request and answer per line): test failovers while replication goes on.
//!
//! ```text
//! {"op":"test_failover_create","group":"g","tag":42,"name":"drill"} -> {"ok":true,"test_failover":{...}}
//! {"op":"test_failover_create",...,"vm":"vm1"}  (only that VM's disks)
//! {"op":"test_failover_list"}                                      -> {"ok":true,"test_failovers":[...]}
//! {"op":"test_failover_delete","name":"drill"}                     -> {"ok":true,"test_failover":{...}}
//! {"op":"points"}                                                  -> {"ok":true,"points":{...}}
//! {"op":"status"}                                  -> {"ok":true,"status":{"free_bytes":..,"disks":[..]},"points":{...}}
//! anything else                                                    -> {"ok":false,"error":"..."}
//! ```
//!
//! `master-target test-failover create|list|delete` are its local clients. The same
//! requests come from the relay's failback controller over the relay's QUIC connection
//! (a `Control` frame, answered by one `ControlAnswer`: docs/PROTOCOL.md), where a
//! request naming a VM is checked against the relay's entitlement first
//! ([`serve_remote`]).
//!
//! Creating a test failover that exists already, at the same point and of the same
//! VMs, returns it: a controller that lost the answer to a crash asks again and gets
//! the same copy, never a second one. A directory left unfinished by a crash is made
//! afresh.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fbr_daemon::control::ControlLimits;
use serde::{Deserialize, Serialize};

use crate::accept::MasterTarget;
use crate::testcopy::{self, TestFailover};

/// A test failover copies disks: a request may take minutes.
pub const LIMITS: ControlLimits = ControlLimits {
    max_clients: 4,
    max_line: 4096,
    timeout: Duration::from_secs(3600),
};

pub use fbr_controller::target::{Request, Status, StatusDisk};

/// An answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<TestFailover>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_failovers: Option<Vec<TestFailover>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    fn from(result: Result<Response, String>) -> Self {
        result.unwrap_or_else(|e| Response {
            error: Some(e),
            ..Response::default()
        })
    }

    fn one(tf: TestFailover) -> Self {
        Response {
            ok: true,
            test_failover: Some(tf),
            ..Response::default()
        }
    }
}

/// Carries out one request.
pub async fn handle(mt: &Arc<MasterTarget>, request: Request) -> Response {
    let data = mt.files.root().to_path_buf();
    Response::from(match request {
        Request::TestFailoverCreate {
            group,
            tag,
            name,
            vm,
        } => {
            let made = testcopy::create(mt, &group, tag, &name, vm.as_deref()).await;
            if let Ok(tf) = &made {
                tracing::info!(name = %tf.name, group = %tf.group, tag = tf.tag_id, seconds = tf.seconds, "test failover created");
            }
            made.map(Response::one)
        }
        Request::TestFailoverList => testcopy::list(&data).map(|all| Response {
            ok: true,
            test_failovers: Some(all),
            ..Response::default()
        }),
        Request::Points => points_listing(mt).map(|listing| Response {
            ok: true,
            points: Some(listing),
            ..Response::default()
        }),
        Request::Status => status(mt).and_then(|status| {
            let points =
                serde_json::to_value(recovery_points_per_vm(mt)?).map_err(|e| e.to_string())?;
            Ok(Response {
                ok: true,
                points: Some(points),
                status: Some(status),
                ..Response::default()
            })
        }),
        Request::TestFailoverDelete { name } => testcopy::delete(&data, &name).map(Response::one),
        Request::SetRetention { window_s, .. }
            if !(1..=fbr_controller::target::MAX_RETENTION_S).contains(&window_s) =>
        {
            Err(format!(
                "a retention window of {window_s} s is out of range 1..={}",
                fbr_controller::target::MAX_RETENTION_S
            ))
        }
        Request::SetRetention {
            group,
            window_s,
            max_bytes,
        } => {
            let policy = crate::retention::RetentionPolicy {
                window: std::time::Duration::from_secs(window_s),
                max_bytes: (max_bytes > 0).then_some(max_bytes),
            };
            mt.choose_retention(&group, policy)
                .map_err(|e| e.to_string())
                .map(|()| {
                    tracing::info!(%group, window_s, max_bytes, "retention chosen");
                    Response {
                        ok: true,
                        ..Response::default()
                    }
                })
        }
    })
}

fn points_listing(mt: &MasterTarget) -> Result<serde_json::Value, String> {
    let points = mt.store.recovery_points().map_err(|e| e.to_string())?;
    serde_json::to_value(crate::points::PointsListing::new(points)).map_err(|e| e.to_string())
}

/// Every VM's recovery points (complete ones only), the compact form a status carries:
/// a VM's point is a few dozen bytes, where the full listing names every landing.
fn recovery_points_per_vm(mt: &MasterTarget) -> Result<fbr_controller::target::Points, String> {
    use fbr_controller::target::{Points, VmPoint, VmPoints};
    let mut vms: std::collections::BTreeMap<String, Vec<VmPoint>> = Default::default();
    for p in mt.store.recovery_points().map_err(|e| e.to_string())? {
        if !p.complete {
            continue;
        }
        let mut names: Vec<&str> = p.landed.iter().map(|l| l.vm.as_str()).collect();
        names.dedup();
        for vm in names {
            vms.entry(vm.to_owned()).or_default().push(VmPoint {
                group: p.group.clone(),
                tag_id: p.tag_id,
                kind: p.kind.to_owned(),
                time_ms: p.time_ms,
                complete: true,
            });
        }
    }
    Ok(Points {
        vms: vms
            .into_iter()
            .map(|(vm, points)| VmPoints { vm, points })
            .collect(),
    })
}

fn status(mt: &MasterTarget) -> Result<Status, String> {
    let root = mt.files.root();
    let fs = rustix::fs::statvfs(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let disks = mt
        .store
        .disks()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(id, c)| StatusDisk {
            vm: id.vm,
            disk: id.disk,
            disk_size: c.disk_size,
            state: c.sync.replica_state().name().to_owned(),
            seq: c.seq,
        })
        .collect();
    Ok(Status {
        free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
        disks,
    })
}

/// The VM a request concerns, if it names one (checked against a relay's entitlement).
fn vm_of(request: &Request) -> Option<&str> {
    match request {
        Request::TestFailoverCreate { vm, .. } => vm.as_deref(),
        _ => None,
    }
}

/// Answers one control stream from a relay (its `Control` frame's request), as
/// [`handle`] does for the local socket. Only a request for a single VM the relay is
/// entitled to may make a copy: a relay entitled to some VMs may not copy a whole group.
pub async fn serve_remote(
    mt: &Arc<MasterTarget>,
    entitlement: &fbr_protocol::stream::Entitlement,
    request: &[u8],
) -> Response {
    let request = match fbr_controller::target::parse_request(request) {
        Ok(r) => r,
        Err(e) => return Response::from(Err(e)),
    };
    let allowed = match (&request, vm_of(&request)) {
        (Request::TestFailoverCreate { .. }, None) => entitlement.all_vms,
        // A group's retention concerns every VM with a disk in it.
        (Request::SetRetention { group, .. }, _) => {
            entitlement.all_vms
                || mt.store.recovery_points().is_ok_and(|points| {
                    points
                        .iter()
                        .filter(|p| &p.group == group)
                        .flat_map(|p| p.landed.iter())
                        .all(|l| entitlement.may_write(&l.vm))
                })
        }
        (Request::TestFailoverDelete { name }, _) => {
            let data = mt.files.root();
            match testcopy::list(data).map(|all| all.into_iter().find(|t| &t.name == name)) {
                Ok(Some(tf)) => tf
                    .vm
                    .as_deref()
                    .map_or(entitlement.all_vms, |vm| entitlement.may_write(vm)),
                // Nothing to delete: the answer says so.
                Ok(None) | Err(_) => true,
            }
        }
        (_, Some(vm)) => entitlement.may_write(vm),
        (_, None) => true,
    };
    if !allowed {
        return Response::from(Err(
            "the relay's certificate does not entitle it to this VM".into(),
        ));
    }
    handle(mt, request).await
}

/// Binds the control socket at `path` and serves it.
pub fn serve(path: &Path, mt: Arc<MasterTarget>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    fbr_daemon::control::serve(path, LIMITS, move |request: Result<Request, String>| {
        let mt = mt.clone();
        async move {
            match request {
                Ok(r) => handle(&mt, r).await,
                Err(e) => Response::from(Err(e)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller reads these answers as `fbr_controller::target::Answer`: a real
    /// answer must parse, and keep the fields it reads.
    #[test]
    fn answers_parse_as_the_controller_reads_them() {
        let tf = TestFailover {
            version: testcopy::TEST_FAILOVER_VERSION,
            name: "fo-1-vm1".into(),
            group: "g".into(),
            tag_id: 7,
            vm: Some("vm1".into()),
            created_ms: 1,
            disks: vec![testcopy::TestDisk {
                vm: "vm1".into(),
                disk: 0,
                path: "/data/test-failovers/fo-1-vm1/vm1-disk0.raw".into(),
                disk_size: 4096,
                method: crate::replica::CopyMethod::SparseCopy,
                records_undone: 2,
                restored_bytes: 512,
                put_back_bytes: 512,
            }],
            seconds: 0.5,
        };
        let point = crate::store::RecoveryPoint {
            group: "g".into(),
            tag_id: 7,
            kind: "app",
            members: 1,
            landed: vec![crate::store::LandedOn {
                vm: "vm1".into(),
                disk: 0,
                seq: 9,
                journal_end: 100,
                landed_at_ms: Some(5),
            }],
            consistent: true,
            complete: true,
            time_ms: Some(5),
        };
        let listing = serde_json::to_value(crate::points::PointsListing::new(vec![point])).unwrap();
        let answer = Response {
            ok: true,
            test_failover: Some(tf),
            points: Some(listing),
            status: Some(Status {
                free_bytes: 10,
                disks: vec![StatusDisk {
                    vm: "vm1".into(),
                    disk: 0,
                    disk_size: 4096,
                    state: "consistent".into(),
                    seq: 9,
                }],
            }),
            ..Response::default()
        };
        let read: fbr_controller::target::Answer =
            serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
        let copy = read.test_failover.unwrap();
        assert_eq!((copy.tag_id, copy.vm.as_deref()), (7, Some("vm1")));
        assert_eq!(copy.disks[0].disk_size, 4096);
        let points = read.points.unwrap();
        let p = fbr_controller::target::choose_point(
            &points,
            "vm1",
            &fbr_controller::PointChoice::LatestAppConsistent,
        )
        .unwrap();
        assert_eq!((p.tag_id, p.time_ms), (7, Some(5)));
        assert_eq!(read.status.unwrap().free_bytes, 10);
        let refused: fbr_controller::target::Answer =
            serde_json::from_slice(&serde_json::to_vec(&Response::from(Err("no".into()))).unwrap())
                .unwrap();
        assert_eq!((refused.ok, refused.error.as_deref()), (false, Some("no")));
    }

    #[test]
    fn requests_parse_strictly() {
        let r: Result<Request, _> =
            serde_json::from_str(r#"{"op":"test_failover_create","group":"g","tag":4,"name":"d"}"#);
        assert_eq!(
            r.ok(),
            Some(Request::TestFailoverCreate {
                group: "g".into(),
                tag: 4,
                name: "d".into(),
                vm: None,
            })
        );
        for bad in [
            r#"{"op":"test_failover_create","group":"g","tag":-1,"name":"d"}"#,
            r#"{"op":"test_failover_delete","name":"d","extra":1}"#,
            r#"{"op":"format_disks"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    /// A retention chosen at reprotect applies at once, outlives a restart (the store
    /// keeps it) and wins over the configured one for its group only.
    #[tokio::test]
    async fn a_chosen_retention_applies_and_outlives_a_restart() {
        use crate::retention::{Retention, RetentionPolicy};
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let configured = Retention::uniform(RetentionPolicy {
            window: Duration::from_secs(86_400),
            max_bytes: None,
        });
        let open = |retention: Retention| {
            MasterTarget::new(
                crate::files::DataDir::new(dir.path()),
                crate::store::Store::open(dir.path()).unwrap(),
                crate::accept::CreditBudget {
                    memory: 16 << 20,
                    per_stream: 1 << 20,
                },
                1024,
                0,
                fbr_daemon::placements::PlacementStore::open(dir.path()).unwrap(),
                retention,
            )
        };
        let mt = open(configured.clone());
        let set = |window_s| Request::SetRetention {
            group: "g".into(),
            window_s,
            max_bytes: 1 << 30,
        };
        let refused = handle(&mt, set(0)).await;
        assert!(refused.error.unwrap().contains("out of range"));
        assert!(handle(&mt, set(3600)).await.ok);
        let chosen = RetentionPolicy {
            window: Duration::from_secs(3600),
            max_bytes: Some(1 << 30),
        };
        assert_eq!(mt.retention().for_group("g"), chosen);
        assert_eq!(mt.retention().for_group("other"), configured.default);
        drop(mt);
        // Restarted: the store gives it back over the configuration.
        let store = crate::store::Store::open(dir.path()).unwrap();
        let again = configured
            .clone()
            .with_chosen(store.chosen_retention().unwrap());
        assert_eq!(again.for_group("g"), chosen);
        assert_eq!(again.for_group("other"), configured.default);
    }
}
