//! Rolling a replica back in place to an earlier recovery point.
//!
//! A failover to a point older than the newest must not cost time in proportion to the
//! disk or to the whole history. Since journal format 2, every `Write` and `Zero` is
//! journaled after its *before-image* (undo entries: what the image held there just
//! before). The image is the newest state. Rolling back to the point whose tag ends at
//! journal offset `E` therefore reads only the journal past `E`: the oldest
//! before-image of each byte changed past `E` is that byte's value at the point. Those
//! are put back, each byte once, in image order. The cost is proportional to what
//! changed since the point (less when the same blocks were written over and over).
//! The journal is then cut at `E`, and the disk goes on from there as if nothing had
//! come after.
//!
//! ## Crash safety
//! The steps, each durable before the next:
//! 1. the target is recorded in the index (`rollbacks` table);
//! 2. the oldest before-image of each changed byte is put back, and the image synced;
//! 3. the index gets the checkpoint at `E` and forgets the disk's tags past it;
//! 4. the journal is truncated at `E` and synced;
//! 5. the target is cleared.
//!
//! [`crate::replica::DiskReplica::open`] completes a rollback it finds recorded. The
//! ordinary recovery comes first: it re-applies the journal from the checkpoint, which
//! brings every block changed past `E` to its newest value. Then steps 2 to 5 run
//! again. Step 2 writes every byte changed past `E` with its value at the point,
//! whatever state a crash left it in; blocks not changed past `E` are never touched. So
//! a kill -9 at any step resumes and completes.
//!
//! Before anything changes, the journal past `E` is checked: each record there must
//! have before-images covering exactly its range. Records journaled in format 1 have
//! none, and a rollback over them is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fbr_protocol::StreamId;
use fbr_storage::DurableFile;

use crate::files::{DataDir, ReplicaFiles, JOURNAL_FILE};
use crate::replica::{DiskReplica, ReplicaError};
use crate::store::{ReplicaIndex, RollbackTarget, Store, StoreError};

use crate::journal::{
    record_range, Before, ImageSink, JournalEntry, JournalReader, ENTRY_HEADER_LEN, UNDO_HEADER_LEN,
};
use crate::replica::FileImage;

/// Why a disk cannot be rolled back.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{file}: record {seq} has no before-image (journaled before format 2, or damaged): cannot roll back past it")]
    NoBeforeImage { file: String, seq: u64 },
    #[error("{file}: the journal ends at {len}, before the point at offset {target}")]
    PointBeyondJournal { file: String, len: u64, target: u64 },
    #[error("{file}: damaged at offset {offset}: {reason}")]
    Damaged {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Journal(#[from] crate::journal::JournalError),
}

/// A run of image bytes to put back: the oldest before-image of each of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// Where it goes in the image.
    image_offset: u64,
    len: u64,
    /// Where its bytes are in the journal; `None`: zeros.
    journal_offset: Option<u64>,
}

/// The image ranges already claimed by an older before-image (disjoint; start -> end).
#[derive(Debug, Default)]
struct Claimed(std::collections::BTreeMap<u64, u64>);

impl Claimed {
    /// The parts of `start..end` no older before-image covers, oldest first; they are
    /// claimed from now on.
    fn claim(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut overlapping: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.0.range(..start).next_back() {
            if e > start {
                overlapping.push((s, e));
            }
        }
        overlapping.extend(self.0.range(start..end).map(|(&s, &e)| (s, e)));
        let mut gaps = Vec::new();
        let mut at = start;
        for &(s, e) in &overlapping {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            gaps.push((at, end));
        }
        let merged_start = overlapping.first().map_or(start, |o| o.0.min(start));
        let merged_end = overlapping.last().map_or(end, |o| o.1.max(end));
        for (s, _) in &overlapping {
            self.0.remove(s);
        }
        self.0.insert(merged_start, merged_end);
        gaps
    }
}

/// The before-images past a point, checked and ready to put back.
///
/// Each image byte changed past the point gets back the **oldest** before-image of it
/// past the point: its value at the point. So each byte is written once, whatever how
/// often it was overwritten since, and the pieces go in image order.
#[derive(Debug)]
pub struct UndoPlan {
    /// In image order.
    pieces: Vec<Piece>,
    /// Undo entries past the point.
    pub entries: usize,
    /// Bytes their before-images hold: what was written since the point (repeats
    /// counted).
    pub restored_bytes: u64,
    /// Distinct image bytes put back (each changed byte once).
    pub put_back_bytes: u64,
    /// Records past the point that they undo.
    pub records: u64,
}

impl UndoPlan {
    /// Undo entries to put back.
    pub fn entries(&self) -> usize {
        self.entries
    }
}

/// Reads the journal past `target_end` (an entry boundary just past the target tag) and
/// checks that every record there has before-images that cover exactly its range.
pub fn plan<F: DurableFile>(
    journal: Arc<F>,
    name: &str,
    target_end: u64,
) -> Result<UndoPlan, RollbackError> {
    plan_until(journal, name, target_end, u64::MAX)
}

/// [`plan`] for the journal up to `until` only (an entry boundary: where a snapshot of
/// the image was taken while the journal goes on growing).
pub fn plan_until<F: DurableFile>(
    journal: Arc<F>,
    name: &str,
    target_end: u64,
    until: u64,
) -> Result<UndoPlan, RollbackError> {
    let len = journal
        .size()
        .map_err(|source| RollbackError::Io {
            file: name.to_owned(),
            source,
        })?
        .min(until);
    if len < target_end {
        return Err(RollbackError::PointBeyondJournal {
            file: name.to_owned(),
            len,
            target: target_end,
        });
    }
    let mut reader = JournalReader::new(journal, name.to_owned(), target_end)?;
    reader.limit(len);
    let mut plan = UndoPlan {
        pieces: Vec::new(),
        entries: 0,
        restored_bytes: 0,
        put_back_bytes: 0,
        records: 0,
    };
    let mut claimed = Claimed::default();
    // The undo entries seen since the last record: (seq, offset, len), in order.
    let mut pending: Vec<(u64, u64, u64)> = Vec::new();
    loop {
        let start = reader.offset();
        let Some((entry, _end)) = reader.next_entry()? else {
            break;
        };
        match entry {
            JournalEntry::Undo(u) => {
                pending.push((u.seq, u.offset, u.len()));
                plan.entries += 1;
                plan.restored_bytes += u.len();
                // The before-image's bytes follow the entry and undo headers.
                let data_at = start + (ENTRY_HEADER_LEN + UNDO_HEADER_LEN) as u64;
                for (from, to) in claimed.claim(u.offset, u.offset + u.len()) {
                    plan.pieces.push(Piece {
                        image_offset: from,
                        len: to - from,
                        journal_offset: match u.before {
                            Before::Data(_) => Some(data_at + (from - u.offset)),
                            Before::Zeros(_) => None,
                        },
                    });
                    plan.put_back_bytes += to - from;
                }
            }
            JournalEntry::Record(r) => {
                let covered = match record_range(&r) {
                    Some((offset, len)) => covers(&pending, r.seq(), offset, len),
                    None => pending.is_empty(),
                };
                if !covered {
                    return Err(RollbackError::NoBeforeImage {
                        file: name.to_owned(),
                        seq: r.seq(),
                    });
                }
                pending.clear();
                plan.records += 1;
            }
        }
    }
    if let Some(d) = reader.damage() {
        return Err(RollbackError::Damaged {
            file: name.to_owned(),
            offset: d.offset(),
            reason: d.to_string(),
        });
    }
    if !pending.is_empty() {
        return Err(RollbackError::Damaged {
            file: name.to_owned(),
            offset: reader.offset(),
            reason: "before-images at the end of the journal with no record after them".into(),
        });
    }
    plan.pieces.sort_unstable_by_key(|p| p.image_offset);
    Ok(plan)
}

/// Whether `undo` (in journal order) names record `seq` and covers `offset..offset+len`
/// exactly, in order.
fn covers(undo: &[(u64, u64, u64)], seq: u64, offset: u64, len: u64) -> bool {
    let mut at = offset;
    for &(s, o, l) in undo {
        if s != seq || o != at {
            return false;
        }
        at += l;
    }
    at == offset + len && !undo.is_empty()
}

/// Puts the plan's before-images back into `image`, in image order (at most `limit`
/// pieces: a test's interrupted rollback). The plan's entries were checked (CRC
/// included) as it was made, and the journal before its end never changes.
pub fn put_back<F: DurableFile>(
    journal: &F,
    journal_name: &str,
    plan: &UndoPlan,
    image: &F,
    limit: usize,
) -> Result<(), RollbackError> {
    let io = |file: &str| {
        let file = file.to_owned();
        move |source| RollbackError::Io { file, source }
    };
    let mut buf = Vec::new();
    let mut sink = FileImage(image);
    for p in plan.pieces.iter().take(limit) {
        match p.journal_offset {
            Some(at) => {
                // A piece is at most one before-image (512 KiB).
                buf.resize(p.len as usize, 0);
                journal.read_at(&mut buf, at).map_err(io(journal_name))?;
                sink.write_at(p.image_offset, &buf)
                    .map_err(io("the image"))?;
            }
            None => sink.zero(p.image_offset, p.len).map_err(io("the image"))?,
        }
    }
    Ok(())
}

/// Where a test stops a rollback, as a kill -9 would ([`crate::replica::DiskReplica::roll_back_until`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackStop {
    /// Done.
    Never,
    /// After the target is recorded (step 1).
    Recorded,
    /// After putting back this many before-images (during step 2).
    PutBack(usize),
    /// After the index is rolled back (step 3).
    IndexRolledBack,
    /// After the journal is cut (step 4).
    Truncated,
}

/// What a rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RolledBack {
    /// Records past the point that were undone.
    pub records_undone: u64,
    /// Before-images past the point, and the image bytes they covered (what was
    /// written since the point, repeats counted).
    pub undo_entries: usize,
    pub restored_bytes: u64,
    /// Distinct image bytes put back (each changed byte once).
    pub put_back_bytes: u64,
    /// Journal bytes cut.
    pub journal_bytes_cut: u64,
}

/// Why a group could not be rolled back.
#[derive(Debug, thiserror::Error)]
pub enum GroupRollbackError {
    #[error("no point {tag} in group {group} (see `master-target points`)")]
    NoSuchPoint { group: String, tag: u64 },
    #[error("point {tag} of group {group} landed while a disk was stale or resyncing: it is no recovery point")]
    Inconsistent { group: String, tag: u64 },
    #[error("point {tag} of group {group} has landed on {landed} of its {members} disks: it is no recovery point yet")]
    Incomplete {
        group: String,
        tag: u64,
        landed: usize,
        members: u32,
    },
    #[error("disk {0} is not known here")]
    UnknownDisk(StreamId),
    #[error("disk {disk}: {source}")]
    Disk {
        disk: StreamId,
        source: ReplicaError,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// One disk of a group rollback.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskRollback {
    pub vm: String,
    pub disk: u32,
    #[serde(flatten)]
    pub done: RolledBack,
    pub seconds: f64,
}

/// A replication group rolled back in place to one of its recovery points.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupRollback {
    pub group: String,
    pub tag_id: u64,
    pub disks: Vec<DiskRollback>,
    pub seconds: f64,
}

/// Rolls every disk of `group` back in place to its recovery point `tag` (daemon
/// stopped: the index is locked while it runs). Every disk is checked first (the point
/// is a complete, consistent recovery point; each disk's journal past it can be
/// undone), then all targets are recorded in one transaction, then each disk is rolled
/// back: a crash anywhere leaves targets that the next open of each disk completes
/// ([`complete_pending`] does it for all at once).
pub fn roll_back_group(
    data_dir: &Path,
    group: &str,
    tag: u64,
) -> Result<GroupRollback, GroupRollbackError> {
    let started = Instant::now();
    let store = Store::open(data_dir)?;
    complete_pending(data_dir, &store)?;
    let point = store
        .recovery_points()?
        .into_iter()
        .find(|p| p.group == group && p.tag_id == tag)
        .ok_or_else(|| GroupRollbackError::NoSuchPoint {
            group: group.to_owned(),
            tag,
        })?;
    if !point.consistent {
        return Err(GroupRollbackError::Inconsistent {
            group: group.to_owned(),
            tag,
        });
    }
    if !point.complete {
        return Err(GroupRollbackError::Incomplete {
            group: group.to_owned(),
            tag,
            landed: point.landed.len(),
            members: point.members,
        });
    }
    let files = DataDir::new(data_dir);
    let disk_err = |disk: &StreamId| {
        let disk = disk.clone();
        move |source: ReplicaError| GroupRollbackError::Disk { disk, source }
    };
    let mut replicas = Vec::new();
    for l in &point.landed {
        let id = StreamId {
            vm: l.vm.clone(),
            disk: l.disk,
        };
        let c = store
            .checkpoint(&id)?
            .ok_or_else(|| GroupRollbackError::UnknownDisk(id.clone()))?;
        let replica = DiskReplica::open(&files, &store, &id, c.disk_size).map_err(disk_err(&id))?;
        let target = RollbackTarget {
            journal_end: l.journal_end,
            seq: l.seq,
        };
        // Nothing changes before every disk is known to roll back.
        let undo = plan(
            replica.journal().clone(),
            &files.describe(&id, JOURNAL_FILE),
            target.journal_end,
        )
        .map_err(|e| disk_err(&id)(e.into()))?;
        replicas.push((id, replica, target, undo));
    }
    let targets: Vec<(StreamId, RollbackTarget)> = replicas
        .iter()
        .map(|(id, _, t, _)| (id.clone(), *t))
        .collect();
    store.record_rollbacks(&targets)?;
    let mut disks = Vec::new();
    for (id, mut replica, target, undo) in replicas {
        let t = Instant::now();
        let done = replica
            .roll_back_planned(&store, target, undo, RollbackStop::Never)
            .map_err(disk_err(&id))?;
        disks.push(DiskRollback {
            vm: id.vm.clone(),
            disk: id.disk,
            done,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(GroupRollback {
        group: group.to_owned(),
        tag_id: tag,
        disks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Completes every rollback a crash interrupted (by opening its disk's replica), so the
/// index and the files agree before anything reads them. Returns the disks completed.
pub fn complete_pending(
    data_dir: &Path,
    store: &Store,
) -> Result<Vec<StreamId>, GroupRollbackError> {
    let files = DataDir::new(data_dir);
    let mut done = Vec::new();
    for (id, _) in store.pending_rollbacks()? {
        let c = store
            .checkpoint(&id)?
            .ok_or_else(|| GroupRollbackError::UnknownDisk(id.clone()))?;
        DiskReplica::open(&files, store, &id, c.disk_size).map_err(|source| {
            GroupRollbackError::Disk {
                disk: id.clone(),
                source,
            }
        })?;
        done.push(id);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::Claimed;

    /// Each byte is claimed by the first (oldest) range that covers it, exactly once.
    #[test]
    fn the_oldest_before_image_of_each_byte_claims_it() {
        let mut c = Claimed::default();
        assert_eq!(c.claim(100, 200), vec![(100, 200)]);
        assert_eq!(c.claim(150, 250), vec![(200, 250)]);
        assert_eq!(c.claim(0, 300), vec![(0, 100), (250, 300)]);
        assert_eq!(c.claim(10, 20), vec![]);
        assert_eq!(c.claim(400, 500), vec![(400, 500)]);
        assert_eq!(c.claim(350, 450), vec![(350, 400)]);
        assert_eq!(c.claim(300, 350), vec![(300, 350)]);
        assert_eq!(c.claim(0, 600), vec![(500, 600)]);
        assert_eq!(c.0.len(), 1, "{:?}", c.0);
    }

    /// Against a byte map: random ranges, every byte claimed once, by the first.
    #[test]
    fn claims_match_a_byte_map() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut c = Claimed::default();
        let mut owner = vec![None; 4096];
        for i in 0..500 {
            let start = next(4000);
            let end = start + 1 + next(96);
            for (from, to) in c.claim(start, end) {
                for (b, o) in owner
                    .iter_mut()
                    .enumerate()
                    .take(to as usize)
                    .skip(from as usize)
                {
                    assert_eq!(*o, None, "byte {b} claimed twice");
                    *o = Some(i);
                }
            }
            for (b, o) in owner
                .iter()
                .enumerate()
                .take(end as usize)
                .skip(start as usize)
            {
                assert!(o.is_some_and(|o| o <= i), "byte {b} of range {i} unclaimed");
            }
        }
    }
}
