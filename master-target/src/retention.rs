//! Bounded retention: per replication group, the recovery points of the last `window`
//! (default 24 h, at most 15 days), and at most `max_bytes` of journal. Whichever binds
//! first trims the oldest history.
//!
//! A trim pass (every [`trim_interval`] in the daemon, off the apply path) picks, per
//! group, the oldest recovery point to keep ([`keep_from`], pure). For every disk of the
//! group, the journal then starts just past that point's tag. It is still a full
//! undo log from there: the newest state is the image, and rollbacks and test failovers
//! reach every kept point. Trimming is
//! 1. recorded in the index first (`trims`, and the older tags forgotten), for all the
//!    group's disks in one transaction, then
//! 2. done with `fallocate(PUNCH_HOLE)` on whole 4 KiB blocks below the new start: the
//!    journal keeps its length and offsets (the content index refers to them), only its
//!    blocks are freed.
//!
//! So nothing reads where a hole may be: every reader starts at the recorded start or
//! later. A crash between the two steps leaves blocks unfreed until the daemon starts
//! again ([`punch_recorded`] punches every disk up to its recorded start; punching is
//! idempotent). A content index entry pointing into a hole reads zeros,
//! fails its re-hash and is dropped: the relay resends. A dedup reference therefore never
//! resolves to trimmed bytes. Trimming never touches the newest state (the image) and
//! never waits for, or holds up, applying. A group is trimmed only as far as its newest
//! point at or before every disk's last checkpoint (the rest at a later pass): recovery
//! starts at the checkpoint, so the journal must keep everything after it.

use std::path::Path;
use std::time::Duration;

use fbr_protocol::StreamId;
use fbr_storage::DurableFile;

use crate::files::journal_path;
use crate::journal::JOURNAL_HEADER_LEN;
use crate::store::{RecoveryPoint, ReplicaIndex, Store};

/// How often the daemon trims under `policy`: four times a window, between 1 s and 10 s
/// apart, and every 2 s under a size cap (so the journals exceed it by little more than
/// what was written since each disk's last checkpoint).
pub fn trim_interval(policy: RetentionPolicy) -> Duration {
    let interval = (policy.window / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    match policy.max_bytes {
        Some(_) => interval.min(Duration::from_secs(2)),
        None => interval,
    }
}

/// Every group's policy: the daemon-wide one, and those of the groups configured apart
/// (`retention_groups`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub default: RetentionPolicy,
    pub groups: std::collections::BTreeMap<String, RetentionPolicy>,
}

impl Retention {
    /// One policy for every group.
    pub fn uniform(default: RetentionPolicy) -> Self {
        Retention {
            default,
            groups: Default::default(),
        }
    }

    /// The policy of group `group`.
    pub fn for_group(&self, group: &str) -> RetentionPolicy {
        self.groups.get(group).copied().unwrap_or(self.default)
    }

    /// These policies with those chosen at reprotect (`chosen`, from the store) in
    /// place of the configured ones for their groups: the operator's later choice wins.
    pub fn with_chosen(
        mut self,
        chosen: std::collections::BTreeMap<String, RetentionPolicy>,
    ) -> Self {
        self.groups.extend(chosen);
        self
    }

    /// How often the daemon trims: as often as the most demanding policy needs.
    pub fn trim_interval(&self) -> Duration {
        self.groups
            .values()
            .chain([&self.default])
            .map(|p| trim_interval(*p))
            .min()
            .unwrap_or(Duration::from_secs(10))
    }
}
/// The unit of freed journal space (a file system block).
const PUNCH_ALIGN: u64 = 4096;

/// How much history a group keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub window: Duration,
    /// Journal bytes kept per group (all its disks), `None`: no cap.
    pub max_bytes: Option<u64>,
}

/// A group's complete recovery point, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPoint {
    pub tag_id: u64,
    pub time_ms: Option<u64>,
    /// Per disk: `(id, journal_end of its tag, seq)`.
    pub disks: Vec<(StreamId, u64, u64)>,
}

/// The point to trim to (an index into `points`, oldest first), or `None` when neither
/// bound binds (nothing is trimmed, not even what came before the first point). The
/// window binds when the oldest point is older than it: keep from the oldest point
/// inside it (or the newest). The cap binds when the journals hold more than it from
/// where they start now (`kept_now`, over the group's disks): keep from the oldest point
/// whose journal bytes from it (`journal_len` minus its tag's end) fit, or the newest.
/// The later of the two wins.
pub fn keep_from(
    points: &[KeptPoint],
    now_ms: u64,
    policy: RetentionPolicy,
    journal_len: impl Fn(&StreamId) -> u64,
    kept_now: u64,
) -> Option<usize> {
    let newest = points.len().checked_sub(1)?;
    let horizon = now_ms.saturating_sub(policy.window.as_millis() as u64);
    // Points without a time (indexed before times were kept) count as old.
    let inside = |p: &KeptPoint| p.time_ms.is_some_and(|t| t >= horizon);
    let by_window = (!inside(&points[0])).then(|| points.iter().position(inside).unwrap_or(newest));
    let by_cap = policy.max_bytes.filter(|cap| kept_now > *cap).map(|cap| {
        let kept = |p: &KeptPoint| -> u64 {
            p.disks
                .iter()
                .map(|(id, end, _)| journal_len(id).saturating_sub(*end))
                .sum()
        };
        (0..newest)
            .find(|&i| kept(&points[i]) <= cap)
            .unwrap_or(newest)
    });
    by_window.max(by_cap)
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrimPass {
    pub disks_trimmed: usize,
    pub tags_dropped: usize,
    /// Journal bytes punched out this pass (whole blocks).
    pub bytes_punched: u64,
}

/// Where [`trim_pass_until`] stops: the states a kill -9 can leave (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimStop {
    /// The trims recorded in the index, no block punched yet.
    Recorded,
    /// The whole pass.
    Done,
}

/// One trim pass over every group of the data directory's index `store`, each to its
/// policy in `retention` (see the module docs). `now_ms`: the clock, for the window.
pub fn trim_pass(
    data_dir: &Path,
    store: &Store,
    retention: &Retention,
    now_ms: u64,
) -> Result<TrimPass, String> {
    trim_pass_until(data_dir, store, retention, now_ms, TrimStop::Done)
}

/// [`trim_pass`], stopping at `stop`.
pub fn trim_pass_until(
    data_dir: &Path,
    store: &Store,
    retention: &Retention,
    now_ms: u64,
    stop: TrimStop,
) -> Result<TrimPass, String> {
    let err = |e: crate::store::StoreError| e.to_string();
    let mut by_group: std::collections::BTreeMap<String, Vec<KeptPoint>> = Default::default();
    for p in store.recovery_points().map_err(err)? {
        if let Some(k) = kept_point(&p) {
            by_group.entry(p.group.clone()).or_default().push(k);
        }
    }
    let mut pass = TrimPass::default();
    for (group, points) in &by_group {
        let policy = retention.for_group(group);
        let len =
            |id: &StreamId| std::fs::metadata(journal_path(data_dir, id)).map_or(0, |m| m.len());
        let mut kept_now = 0;
        for (id, _, _) in &points[points.len() - 1].disks {
            let start = store
                .trim_point(id)
                .map_err(err)?
                .map_or(JOURNAL_HEADER_LEN, |(o, _)| o);
            kept_now += len(id).saturating_sub(start);
        }
        let Some(keep) = keep_from(points, now_ms, policy, len, kept_now) else {
            continue;
        };
        // Recovery replays each disk's journal from its last checkpoint: trim only as far
        // as the newest point at or before every disk's checkpoint (the rest at a later
        // pass).
        let mut checkpoints = std::collections::HashMap::new();
        for (id, _, _) in &points[keep].disks {
            let c = store
                .checkpoint(id)
                .map_err(err)?
                .map_or(0, |c| c.journal_offset);
            checkpoints.insert(id.clone(), c);
        }
        let allowed = (0..=keep).rev().find(|&i| {
            points[i]
                .disks
                .iter()
                .all(|(id, end, _)| checkpoints.get(id).is_some_and(|c| end <= c))
        });
        let Some(keep) = allowed else {
            continue;
        };
        let mut trims = Vec::new();
        for (id, end, seq) in &points[keep].disks {
            let start = store
                .trim_point(id)
                .map_err(err)?
                .map_or(JOURNAL_HEADER_LEN, |(o, _)| o);
            if *end > start {
                trims.push((id.clone(), *end, *seq));
            }
        }
        if trims.is_empty() {
            continue;
        }
        pass.tags_dropped += store.record_trims(&trims).map_err(err)?;
        pass.disks_trimmed += trims.len();
        if stop == TrimStop::Recorded {
            continue;
        }
        for (id, end, _) in &trims {
            pass.bytes_punched += punch(&journal_path(data_dir, id), *end)?;
        }
    }
    Ok(pass)
}

/// Frees what a kill between a trim's two steps left allocated: every disk's journal is
/// punched up to where its index says it now starts. Idempotent (holes stay holes); the
/// daemon runs it as it starts. Returns the bytes punched (freed now or before).
pub fn punch_recorded(data_dir: &Path, store: &Store) -> Result<u64, String> {
    let err = |e: crate::store::StoreError| e.to_string();
    let mut punched = 0;
    for (id, _) in store.disks().map_err(err)? {
        if let Some((start, _)) = store.trim_point(&id).map_err(err)? {
            punched += punch(&journal_path(data_dir, &id), start)?;
        }
    }
    Ok(punched)
}

/// Punches the whole blocks of `path` between its header's block and `end`; returns the
/// bytes punched (freed now or before).
fn punch(path: &Path, end: u64) -> Result<u64, String> {
    let to = end / PUNCH_ALIGN * PUNCH_ALIGN;
    if to <= PUNCH_ALIGN {
        return Ok(0);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.zero_range(PUNCH_ALIGN, to - PUNCH_ALIGN)
        .map_err(|e| format!("{}: trimming: {e}", path.display()))?;
    Ok(to - PUNCH_ALIGN)
}

/// A complete, consistent point, with where its tag ends on each disk.
fn kept_point(p: &RecoveryPoint) -> Option<KeptPoint> {
    (p.complete && p.consistent).then(|| KeptPoint {
        tag_id: p.tag_id,
        time_ms: p.time_ms,
        disks: p
            .landed
            .iter()
            .map(|l| {
                (
                    StreamId {
                        vm: l.vm.clone(),
                        disk: l.disk,
                    },
                    l.journal_end,
                    l.seq,
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(tag: u64, time: u64, end: u64) -> KeptPoint {
        KeptPoint {
            tag_id: tag,
            time_ms: Some(time),
            disks: vec![(
                StreamId {
                    vm: "vm1".into(),
                    disk: 0,
                },
                end,
                tag,
            )],
        }
    }

    #[test]
    fn the_window_keeps_the_points_inside_it() {
        let points: Vec<KeptPoint> = (0..10).map(|i| point(i, i * 1000, i * 100)).collect();
        let policy = RetentionPolicy {
            window: Duration::from_secs(3),
            max_bytes: None,
        };
        // Now is 9.5 s: points at 6.5 s or later are kept.
        assert_eq!(keep_from(&points, 9_500, policy, |_| 1000, 984), Some(7));
        // All older than the window: the newest stays.
        assert_eq!(keep_from(&points, 60_000, policy, |_| 1000, 984), Some(9));
        // All inside: nothing is trimmed, not even what came before the first point.
        assert_eq!(keep_from(&points, 2_000, policy, |_| 1000, 984), None);
        assert_eq!(keep_from(&[], 0, policy, |_| 0, 0), None);
    }

    #[test]
    fn the_cap_binds_when_it_is_tighter() {
        let points: Vec<KeptPoint> = (0..10).map(|i| point(i, i * 1000, i * 100)).collect();
        let policy = RetentionPolicy {
            window: Duration::from_secs(3600),
            max_bytes: Some(250),
        };
        // The journal is 1000 bytes: keeping from point i keeps 1000 - 100 i.
        assert_eq!(keep_from(&points, 9_500, policy, |_| 1000, 984), Some(8));
        // Under the cap: nothing to do.
        assert_eq!(keep_from(&points, 9_500, policy, |_| 1000, 200), None);
        // A cap nothing meets keeps the newest point only.
        let tiny = RetentionPolicy {
            max_bytes: Some(0),
            ..policy
        };
        assert_eq!(keep_from(&points, 9_500, tiny, |_| 1000, 984), Some(9));
        // Both bind: the later point wins.
        let both = RetentionPolicy {
            window: Duration::from_secs(5),
            max_bytes: Some(450),
        };
        assert_eq!(keep_from(&points, 9_500, both, |_| 1000, 984), Some(6));
    }

    #[test]
    fn a_group_configured_apart_keeps_its_own_policy() {
        let day = RetentionPolicy {
            window: Duration::from_secs(86_400),
            max_bytes: None,
        };
        let tight = RetentionPolicy {
            window: Duration::from_secs(8),
            max_bytes: Some(1 << 30),
        };
        let retention = Retention {
            default: day,
            groups: [("sql".to_string(), tight)].into(),
        };
        assert_eq!(retention.for_group("sql"), tight);
        assert_eq!(retention.for_group("web"), day);
        // The tightest policy sets the pace: a 2 s window/4, capped groups every 2 s.
        assert_eq!(retention.trim_interval(), Duration::from_secs(2));
        assert_eq!(
            Retention::uniform(day).trim_interval(),
            Duration::from_secs(10)
        );
    }
}
