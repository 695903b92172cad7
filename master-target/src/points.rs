//! What `master-target points` tells an operator choosing where to fail back to: per
//! replication group, its points in time and the window they span; per VM, the points
//! that cover it.
//!
//! A point is *common* when its tag landed on every disk of the group (the disks were
//! cut together at the source, so the group can be failed over to it as one), and a
//! *recovery point* when it is common and consistent (no disk was stale or resyncing
//! when it landed). The window runs from the oldest recovery point to the newest.
//! Times are the master target's clock when the point became durable here
//! ([`crate::store::RecoveryPoint::time_ms`]).
//!
//! The JSON form is versioned ([`POINTS_VERSION`]); fields are only ever added.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{LandedOn, RecoveryPoint};

/// Version of the `points --json` document.
pub const POINTS_VERSION: u32 = 1;

/// The whole listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PointsListing {
    pub version: u32,
    pub groups: Vec<GroupPoints>,
    pub vms: Vec<VmPoints>,
}

/// One replication group's points, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupPoints {
    pub group: String,
    pub window: Window,
    pub points: Vec<Point>,
}

/// The span of a group's recovery points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    pub recovery_points: usize,
    pub oldest_tag: Option<u64>,
    pub newest_tag: Option<u64>,
    pub oldest_time_ms: Option<u64>,
    pub newest_time_ms: Option<u64>,
    pub oldest_time: Option<String>,
    pub newest_time: Option<String>,
}

/// One point of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub tag_id: u64,
    /// `crash` or `app`.
    pub kind: &'static str,
    pub time_ms: Option<u64>,
    /// RFC 3339, UTC, milliseconds.
    pub time: Option<String>,
    /// Disks the tag was cut on.
    pub members: u32,
    /// Landed on every disk of the group.
    pub common: bool,
    /// No disk was stale or resyncing when it landed.
    pub consistent: bool,
    /// Common and consistent: a point the group can be failed over to.
    pub complete: bool,
    pub landed: Vec<LandedOn>,
}

/// The points that cover one VM (a tag that landed on at least one of its disks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmPoints {
    pub vm: String,
    pub points: Vec<VmPoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmPoint {
    pub group: String,
    pub tag_id: u64,
    pub kind: &'static str,
    pub time_ms: Option<u64>,
    pub time: Option<String>,
    /// Whether the point is complete for the whole group (see [`Point::complete`]).
    pub complete: bool,
    /// This VM's disks it landed on.
    pub disks: Vec<u32>,
}

impl PointsListing {
    /// From the index's points (ordered by group, then tag id).
    pub fn new(points: Vec<RecoveryPoint>) -> Self {
        let mut groups: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut vms: BTreeMap<String, Vec<VmPoint>> = BTreeMap::new();
        for p in points {
            let time = p.time_ms.map(rfc3339_utc);
            let mut per_vm: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for l in &p.landed {
                per_vm.entry(&l.vm).or_default().push(l.disk);
            }
            for (vm, disks) in per_vm {
                vms.entry(vm.to_owned()).or_default().push(VmPoint {
                    group: p.group.clone(),
                    tag_id: p.tag_id,
                    kind: p.kind,
                    time_ms: p.time_ms,
                    time: time.clone(),
                    complete: p.complete,
                    disks,
                });
            }
            groups.entry(p.group.clone()).or_default().push(Point {
                tag_id: p.tag_id,
                kind: p.kind,
                time_ms: p.time_ms,
                time,
                members: p.members,
                common: p.landed.len() == p.members as usize,
                consistent: p.consistent,
                complete: p.complete,
                landed: p.landed,
            });
        }
        PointsListing {
            version: POINTS_VERSION,
            groups: groups
                .into_iter()
                .map(|(group, points)| GroupPoints {
                    group,
                    window: Window::of(&points),
                    points,
                })
                .collect(),
            vms: vms
                .into_iter()
                .map(|(vm, points)| VmPoints { vm, points })
                .collect(),
        }
    }
}

impl Window {
    fn of(points: &[Point]) -> Self {
        let complete: Vec<&Point> = points.iter().filter(|p| p.complete).collect();
        let (oldest, newest) = (complete.first(), complete.last());
        Window {
            recovery_points: complete.len(),
            oldest_tag: oldest.map(|p| p.tag_id),
            newest_tag: newest.map(|p| p.tag_id),
            oldest_time_ms: oldest.and_then(|p| p.time_ms),
            newest_time_ms: newest.and_then(|p| p.time_ms),
            oldest_time: oldest.and_then(|p| p.time.clone()),
            newest_time: newest.and_then(|p| p.time.clone()),
        }
    }
}

/// `ms` since the UNIX epoch as RFC 3339 in UTC with milliseconds,
/// e.g. `2026-12-01T12:00:00.250Z`.
pub fn rfc3339_utc(ms: u64) -> String {
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, in eras of
    // 400 years = 146,097 days).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year), 23:59:59.999.
        assert_eq!(rfc3339_utc(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_utc(1_796_126_400_250), "2026-12-01T12:00:00.250Z");
        assert_eq!(rfc3339_utc(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    fn landed(vm: &str, disk: u32, at: u64) -> LandedOn {
        LandedOn {
            vm: vm.into(),
            disk,
            seq: 1,
            journal_end: 100,
            landed_at_ms: Some(at),
        }
    }

    fn point(tag_id: u64, landed: Vec<LandedOn>, consistent: bool) -> RecoveryPoint {
        let complete = landed.len() == 2 && consistent;
        RecoveryPoint {
            group: "g".into(),
            tag_id,
            kind: "crash",
            members: 2,
            time_ms: landed.iter().filter_map(|l| l.landed_at_ms).max(),
            landed,
            consistent,
            complete,
        }
    }

    /// The window spans complete points only; a VM lists the points on its disks.
    #[test]
    fn the_window_spans_the_recovery_points() {
        let listing = PointsListing::new(vec![
            point(1, vec![landed("a", 0, 1_000), landed("b", 0, 1_500)], false),
            point(2, vec![landed("a", 0, 2_000), landed("b", 0, 2_100)], true),
            point(3, vec![landed("a", 0, 3_000), landed("b", 0, 3_200)], true),
            point(4, vec![landed("a", 0, 4_000)], true),
        ]);
        let g = &listing.groups[0];
        assert_eq!(g.window.recovery_points, 2);
        assert_eq!(
            (g.window.oldest_tag, g.window.newest_tag),
            (Some(2), Some(3))
        );
        assert_eq!(g.window.oldest_time_ms, Some(2_100));
        assert_eq!(
            g.window.newest_time.as_deref(),
            Some("1970-01-01T00:00:03.200Z")
        );
        let common: Vec<bool> = g.points.iter().map(|p| p.common).collect();
        assert_eq!(common, vec![true, true, true, false]);
        let b = listing.vms.iter().find(|v| v.vm == "b").unwrap();
        assert_eq!(
            b.points.iter().map(|p| p.tag_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
}
