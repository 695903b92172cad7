//! The master target's control documents: what the controller asks of it (over the
//! relay's QUIC connection, a `Control` frame; or `master-target test-failover` on the
//! local socket) and the parts of its answers the controller reads.
//!
//! [`Request`] is the one definition both sides use. The master target's answer has
//! more than the controller reads; [`Answer`] takes the fields it needs and ignores the
//! rest (fields are only ever added). `master-target/src/control.rs` pins that its real
//! answers parse as [`Answer`].
//!
//! [`choose_point`] is the rule that turns a [`PointChoice`] into a point of the
//! listing: pure, so it is unit-tested here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::job::PointChoice;

/// A request to the master target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Make a copy of a group's disks (or only `vm`'s) at point `tag`, named `name`.
    TestFailoverCreate {
        group: String,
        tag: u64,
        name: String,
        /// Only this VM's disks of the point (default: the whole group).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    TestFailoverList,
    TestFailoverDelete {
        name: String,
    },
    /// The recovery points, as `master-target points --json` lists them.
    Points,
    /// What the failback controller checks its preconditions against: free space, the
    /// disks held, and the points.
    Status,
    /// Keep `window_s` seconds of history for replication group `group` (and at most
    /// `max_bytes` of journal, 0: no cap): the retention chosen at reprotect.
    SetRetention {
        group: String,
        window_s: u64,
        #[serde(default)]
        max_bytes: u64,
    },
}

/// The longest retention window a master target keeps (its configuration's limit).
pub const MAX_RETENTION_S: u64 = 15 * 86_400;

/// The largest request document (a `Control` frame's body).
pub const MAX_REQUEST: usize = 64 * 1024;

/// Decodes a request as the master target receives it: bounded, strict (unknown
/// operations and fields refused), the VM named plainly; any bytes give a request or a
/// reason, never a panic (a fuzz target).
pub fn parse_request(body: &[u8]) -> Result<Request, String> {
    if body.len() > MAX_REQUEST {
        return Err(format!(
            "the request is {} bytes, limit {MAX_REQUEST}",
            body.len()
        ));
    }
    let request: Request =
        serde_json::from_slice(body).map_err(|e| format!("bad control request: {e}"))?;
    if let Request::TestFailoverCreate { vm: Some(vm), .. } = &request {
        if vm.is_empty() || vm.len() > 255 || vm.contains('/') || vm.chars().any(char::is_control) {
            return Err(format!("bad control request: VM name {vm:?}"));
        }
    }
    if let Request::SetRetention {
        group, window_s, ..
    } = &request
    {
        if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
            return Err(format!("bad control request: group name {group:?}"));
        }
        if !(1..=MAX_RETENTION_S).contains(window_s) {
            return Err(format!(
                "bad control request: a retention window of {window_s} s is out of range 1..={MAX_RETENTION_S}"
            ));
        }
    }
    Ok(request)
}

/// The master target's state as the controller needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Bytes free for this process on the data directory's file system.
    pub free_bytes: u64,
    /// Every disk replica held.
    pub disks: Vec<StatusDisk>,
}

/// One replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDisk {
    pub vm: String,
    pub disk: u32,
    pub disk_size: u64,
    /// `consistent` (in step: its tags are recovery points), `stale` (seeded, not
    /// resynced yet) or `resyncing`.
    pub state: String,
    /// The last sequence number checkpointed.
    pub seq: u64,
}

/// What the controller reads of an answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub test_failover: Option<Copy>,
    #[serde(default)]
    pub points: Option<Points>,
    #[serde(default)]
    pub status: Option<Status>,
}

/// A copy of disks at a point (a test failover, or a failover's disks).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Copy {
    pub name: String,
    pub group: String,
    pub tag_id: u64,
    #[serde(default)]
    pub vm: Option<String>,
    pub disks: Vec<CopyDisk>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CopyDisk {
    pub vm: String,
    pub disk: u32,
    pub path: PathBuf,
    pub disk_size: u64,
}

/// The points listing, per VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Points {
    pub vms: Vec<VmPoints>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmPoints {
    pub vm: String,
    pub points: Vec<VmPoint>,
}

/// One point covering a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmPoint {
    pub group: String,
    pub tag_id: u64,
    /// `crash` or `app`.
    pub kind: String,
    #[serde(default)]
    pub time_ms: Option<u64>,
    /// A recovery point of the whole group (landed everywhere, consistent).
    pub complete: bool,
}

impl Points {
    /// The recovery points (complete ones) of `vm`, oldest first.
    pub fn of(&self, vm: &str) -> Vec<&VmPoint> {
        self.vms
            .iter()
            .filter(|v| v.vm == vm)
            .flat_map(|v| v.points.iter())
            .filter(|p| p.complete)
            .collect()
    }
}

/// The point `choice` means for `vm`: the newest recovery point for *latest* and
/// *latest processed* (after a drain, the newest is the latest), the newest
/// application-consistent one, or the tag named. `None` when there is none.
pub fn choose_point<'a>(points: &'a Points, vm: &str, choice: &PointChoice) -> Option<&'a VmPoint> {
    let mine = points.of(vm);
    match choice {
        PointChoice::Latest | PointChoice::LatestProcessed => {
            mine.into_iter().max_by_key(|p| p.tag_id)
        }
        PointChoice::LatestAppConsistent => mine
            .into_iter()
            .filter(|p| p.kind == "app")
            .max_by_key(|p| p.tag_id),
        PointChoice::Tag(t) => mine.into_iter().find(|p| p.tag_id == *t),
    }
}

/// The app-consistent point common to every VM of a plan: the newest tag that is a
/// recovery point of each of them (a plan's VMs share a replication group).
pub fn common_app_point<'a>(points: &'a Points, vms: &[String]) -> Option<&'a VmPoint> {
    let first = vms.first()?;
    points
        .of(first)
        .into_iter()
        .filter(|p| p.kind == "app")
        .filter(|p| {
            vms.iter().all(|vm| {
                points
                    .of(vm)
                    .iter()
                    .any(|q| q.group == p.group && q.tag_id == p.tag_id)
            })
        })
        .max_by_key(|p| p.tag_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Points {
        let p = |group: &str, tag_id, kind: &str, complete| VmPoint {
            group: group.into(),
            tag_id,
            kind: kind.into(),
            time_ms: Some(tag_id * 1000),
            complete,
        };
        Points {
            vms: vec![
                VmPoints {
                    vm: "vm1".into(),
                    points: vec![
                        p("g", 1, "crash", true),
                        p("g", 2, "app", true),
                        p("g", 3, "crash", true),
                        p("g", 4, "app", false),
                    ],
                },
                VmPoints {
                    vm: "vm2".into(),
                    points: vec![p("g", 2, "app", true), p("g", 3, "crash", true)],
                },
            ],
        }
    }

    #[test]
    fn choices_pick_the_point_they_name() {
        let l = listing();
        let tag = |c: PointChoice| choose_point(&l, "vm1", &c).map(|p| p.tag_id);
        // Point 4 is not complete: never chosen.
        assert_eq!(tag(PointChoice::Latest), Some(3));
        assert_eq!(tag(PointChoice::LatestProcessed), Some(3));
        assert_eq!(tag(PointChoice::LatestAppConsistent), Some(2));
        assert_eq!(tag(PointChoice::Tag(1)), Some(1));
        assert_eq!(tag(PointChoice::Tag(4)), None);
        assert_eq!(choose_point(&l, "vm9", &PointChoice::Latest), None);
    }

    #[test]
    fn a_plans_app_point_is_common_to_every_vm() {
        let l = listing();
        let vms = ["vm1".to_string(), "vm2".to_string()];
        assert_eq!(common_app_point(&l, &vms).map(|p| p.tag_id), Some(2));
        assert_eq!(common_app_point(&l, &["vm1".into(), "vm9".into()]), None);
    }

    #[test]
    fn requests_are_strict() {
        let r: Request = serde_json::from_str(
            r#"{"op":"test_failover_create","group":"g","tag":4,"name":"d","vm":"vm1"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::TestFailoverCreate {
                group: "g".into(),
                tag: 4,
                name: "d".into(),
                vm: Some("vm1".into())
            }
        );
        for bad in [
            r#"{"op":"format_disks"}"#,
            r#"{"op":"test_failover_create","group":"g","tag":-1,"name":"d"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_request(br#"{"op":"set_retention","group":"g","window_s":3600}"#),
            Ok(Request::SetRetention {
                group: "g".into(),
                window_s: 3600,
                max_bytes: 0
            })
        );
        for bad in [
            &br#"{"op":"set_retention","group":"g","window_s":0}"#[..],
            br#"{"op":"set_retention","group":"g","window_s":9999999}"#,
            br#"{"op":"set_retention","group":"","window_s":60}"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
