//! Rolling a replica back in place to an earlier recovery point.
//!
//! A failover to a point older than the newest must not cost time in proportion to the
//! disk or to the whole history. Since journal format 2, every `Write` and `Zero` is
//! journaled after its *before-image* (undo entries: what the image held there just
//! before). The image is the newest state. Rolling back to the point whose tag ends at
//! journal offset `E` therefore reads only the journal past `E` and puts back the
//! before-images, newest record first. The cost is proportional to what changed since
//! the point. The journal is then cut at `E`, and the disk goes on from there as if
//! nothing had come after.
//!
//! ## Crash safety
//! The steps, each durable before the next:
//! 1. the target is recorded in the index (`rollbacks` table);
//! 2. the before-images are put back, newest first, and the image is synced;
//! 3. the index gets the checkpoint at `E` and forgets the disk's tags past it;
//! 4. the journal is truncated at `E` and synced;
//! 5. the target is cleared.
//!
//! [`crate::replica::DiskReplica::open`] completes a rollback it finds recorded. The
//! ordinary recovery comes first: it re-applies the journal from the checkpoint, which
//! brings every block changed past `E` to its newest value. Then steps 2 to 5 run
//! again. Putting back every before-image past `E`, newest first, leaves each such
//! block with the oldest one, its value at the point, whatever state a crash left. Blocks
//! not changed past `E` are never touched. So a kill -9 at any step resumes and
//! completes.
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

use crate::journal::{record_range, undo_entry_view, JournalEntry, JournalReader};
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

/// Where one undo entry lies in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UndoRef {
    offset: u64,
    len: u32,
}

/// The before-images past a point, checked and ready to put back.
#[derive(Debug)]
pub struct UndoPlan {
    entries: Vec<UndoRef>,
    /// Bytes of the image they restore.
    pub restored_bytes: u64,
    /// Records past the point that they undo.
    pub records: u64,
}

impl UndoPlan {
    /// Undo entries to put back.
    pub fn entries(&self) -> usize {
        self.entries.len()
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
        entries: Vec::new(),
        restored_bytes: 0,
        records: 0,
    };
    // The undo entries seen since the last record: (seq, offset, len), in order.
    let mut pending: Vec<(u64, u64, u64)> = Vec::new();
    loop {
        let start = reader.offset();
        let Some((entry, end)) = reader.next_entry()? else {
            break;
        };
        match entry {
            JournalEntry::Undo(u) => {
                pending.push((u.seq, u.offset, u.len()));
                plan.entries.push(UndoRef {
                    offset: start,
                    len: (end - start) as u32,
                });
                plan.restored_bytes += u.len();
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

/// Puts the plan's before-images back into `image`, newest first (at most `limit` of
/// them: a test's interrupted rollback).
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
    for r in plan.entries.iter().rev().take(limit) {
        buf.resize(r.len as usize, 0);
        journal
            .read_at(&mut buf, r.offset)
            .map_err(io(journal_name))?;
        let undo = undo_entry_view(&buf, r.offset).map_err(|d| RollbackError::Damaged {
            file: journal_name.to_owned(),
            offset: r.offset,
            reason: d.to_string(),
        })?;
        undo.apply(&mut sink).map_err(io("the image"))?;
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
    /// Before-images put back, and the image bytes they covered.
    pub undo_entries: usize,
    pub restored_bytes: u64,
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
