//! The master target's index: an embedded transactional database (`redb`).
//!
//! It holds, per disk, the last *checkpoint* (journal offset and sequence number up to
//! which the disk image is known flushed) and, per tag, where it landed. The journals
//! remain the source of truth: anything the index lacks after a crash is rebuilt by
//! scanning the journals from their checkpoints, so index commits need only be durable
//! where an acknowledgement depends on them (tags, checkpoints).
//!
//! Tables (do not change key or value types without a migration):
//! - `disks`: `"vm/disk"` -> `(disk_size, checkpoint_offset, checkpoint_seq)`
//! - `disk_state`: `"vm/disk"` -> the sync state as of the checkpoint
//!   ([`crate::sync::SyncRow`]); no row means consistent (data directories made before
//!   resync existed)
//! - `tags`: `(group, tag_id, "vm/disk")` -> `(seq, kind, members, journal_end)`
//! - `inconsistent_tags`: `(group, tag_id, "vm/disk")` -> `()`: tags that landed while
//!   the disk was stale or resyncing, so they are no recovery point
//! - `tag_times`: `(group, tag_id, "vm/disk")` -> UNIX time in milliseconds when the tag
//!   first became durable here (kept when recovery indexes the tag again); no row: a
//!   tag indexed before times were recorded
//! - `trims`: `"vm/disk"` -> `(journal_offset, seq)`: the journal before that offset is
//!   trimmed (holes); it starts at the entry just past the tag `seq` ([`crate::retention`])
//! - `rollbacks`: `"vm/disk"` -> `(journal_end, seq)`: a rollback in place under way,
//!   back to the point whose tag ends there ([`crate::rollback`]); opening the replica
//!   completes it
//! - `chosen_retention`: `group` -> `(window_seconds, max_bytes)`: the retention an
//!   operator chose for the group at reprotect (`max_bytes` 0: no cap); it overrides
//!   the configuration's ([`crate::retention::Retention::with_chosen`])

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fbr_protocol::{StreamId, TagKind};
use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::sync::{SyncRow, SyncState};

const DISKS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("disks");
const DISK_STATE: TableDefinition<&str, SyncRow> = TableDefinition::new("disk_state");
const INCONSISTENT_TAGS: TableDefinition<TagKey, ()> = TableDefinition::new("inconsistent_tags");
/// `(group, tag_id, "vm/disk")`.
type TagKey<'a> = (&'a str, u64, &'a str);
/// `(seq, kind, members, journal_end)`.
type TagValue = (u64, u8, u32, u64);
const TAGS: TableDefinition<TagKey, TagValue> = TableDefinition::new("tags");
const TAG_TIMES: TableDefinition<TagKey, u64> = TableDefinition::new("tag_times");
const ROLLBACKS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("rollbacks");
const TRIMS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("trims");
const CHOSEN_RETENTION: TableDefinition<&str, (u64, u64)> =
    TableDefinition::new("chosen_retention");

/// Errors from the index.
#[derive(Debug, thiserror::Error)]
#[error("master-target index: {0}")]
pub struct StoreError(String);

fn e(err: impl std::fmt::Display) -> StoreError {
    StoreError(err.to_string())
}

/// Where a disk's image is known to be flushed up to, and its sync state there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCheckpoint {
    pub disk_size: u64,
    pub journal_offset: u64,
    pub seq: u64,
    pub sync: SyncState,
}

impl DiskCheckpoint {
    /// From a `disks` row, `(disk_size, checkpoint_offset, checkpoint_seq)`, and the
    /// disk's `disk_state` row if it has one.
    fn from_rows(
        (disk_size, journal_offset, seq): (u64, u64, u64),
        sync: Option<SyncRow>,
    ) -> Result<Self, StoreError> {
        let sync = match sync {
            None => SyncState::Consistent,
            Some(row) => SyncState::from_row(row)
                .ok_or_else(|| StoreError(format!("unknown disk state row {row:?}")))?,
        };
        Ok(DiskCheckpoint {
            disk_size,
            journal_offset,
            seq,
            sync,
        })
    }
}

/// Where a rollback in place takes a disk: just past the target tag's journal entry,
/// and that tag's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RollbackTarget {
    pub journal_end: u64,
    pub seq: u64,
}

/// A tag as it landed on one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagLanding {
    pub group: String,
    pub id: u64,
    pub stream: StreamId,
    pub seq: u64,
    pub kind: TagKind,
    pub members: u32,
    /// Journal offset just past the tag's entry.
    pub journal_end: u64,
    /// Whether the disk was in step when the tag landed (not stale, not resyncing).
    pub consistent: bool,
    /// When it became durable here, UNIX milliseconds (an earlier landing of the same
    /// tag, already indexed, keeps its time).
    pub landed_at_ms: u64,
}

/// One recovery point of a replication group, as known to this master target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryPoint {
    pub group: String,
    pub tag_id: u64,
    pub kind: &'static str,
    /// Disks the tag was inserted on.
    pub members: u32,
    /// Disks on which the tag is durable here, with the tag's sequence number on each.
    pub landed: Vec<LandedOn>,
    /// Every landing was on a disk in step (none stale or resyncing).
    pub consistent: bool,
    /// Landed on every member and consistent: the point can be failed over to.
    pub complete: bool,
    /// When the last of its landings became durable here (for a complete point: since
    /// when it can be failed over to), UNIX milliseconds; `None` for points indexed
    /// before times were recorded. The master target's clock, so the source's moment
    /// plus the replication lag.
    pub time_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandedOn {
    pub vm: String,
    pub disk: u32,
    pub seq: u64,
    /// Journal offset just past the tag's entry (where a rollback to it cuts).
    #[serde(skip)]
    pub journal_end: u64,
    /// When the tag became durable on this disk, UNIX milliseconds.
    pub landed_at_ms: Option<u64>,
}

pub fn stream_key(id: &StreamId) -> String {
    format!("{}/{}", id.vm, id.disk)
}

fn parse_stream_key(key: &str) -> Option<StreamId> {
    let (vm, disk) = key.rsplit_once('/')?;
    Some(StreamId {
        vm: vm.to_owned(),
        disk: disk.parse().ok()?,
    })
}

/// What a replica needs of the index: its checkpoint, and durable commits of
/// checkpoints and tags. [`Store`] (redb) in the daemon, [`MemIndex`] in the model test.
pub trait ReplicaIndex: Send + Sync {
    /// The last checkpoint of disk `id`, if it has one.
    fn checkpoint(&self, id: &StreamId) -> Result<Option<DiskCheckpoint>, StoreError>;
    /// Durably records a checkpoint (if given) and tags, in one transaction: when this
    /// returns `Ok`, they survive any crash.
    fn commit(
        &self,
        id: &StreamId,
        checkpoint: Option<DiskCheckpoint>,
        tags: &[TagLanding],
    ) -> Result<(), StoreError>;
    /// The rollback in place of disk `id` under way, if any.
    fn rollback_target(&self, id: &StreamId) -> Result<Option<RollbackTarget>, StoreError>;
    /// Durably records (`Some`) or clears (`None`) the rollback under way.
    fn set_rollback_target(
        &self,
        id: &StreamId,
        target: Option<RollbackTarget>,
    ) -> Result<(), StoreError>;
    /// Once the image is back at a point: records `checkpoint` there and forgets every
    /// tag of disk `id` past it, in one transaction.
    fn roll_back_index(&self, id: &StreamId, checkpoint: DiskCheckpoint) -> Result<(), StoreError>;
}

/// The index database of one data directory (exclusively locked while open).
#[derive(Debug)]
pub struct Store {
    db: Database,
    /// Commits of checkpoints and tags waiting for one shared transaction.
    group: Mutex<GroupCommit>,
}

/// One queued [`ReplicaIndex::commit`]: a disk's checkpoint and tag landings.
type QueuedRows = (StreamId, Option<DiskCheckpoint>, Vec<TagLanding>);

/// Group commit of [`ReplicaIndex::commit`]: every disk that lands a tag needs a durable
/// index commit before its batch is acknowledged, and with hundreds of disks tagged
/// together that was hundreds of `fsync`ed transactions per recovery point. A caller
/// queues its rows in the open [`CommitGroup`]; whoever finds no commit running writes
/// everything queued in one transaction (one `fsync`). When it is done it wakes only
/// that group's callers, and hands the lead to one caller of the group queued
/// meanwhile: each caller is woken about once, whatever the number of disks (one
/// condition variable for all, woken in full at every commit, had cost in proportion
/// to the disks waiting, at every commit). Different disks write different keys, and a
/// disk has one batch in flight at a time, so merging them changes nothing but the cost.
#[derive(Debug)]
struct GroupCommit {
    /// Rows of the open group, not yet taken by a leader.
    queued: Vec<QueuedRows>,
    /// The group `queued` belongs to: its callers wait on it.
    open: Arc<CommitGroup>,
    /// A leader is writing a transaction.
    running: bool,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            queued: Vec::new(),
            open: Arc::new(CommitGroup::default()),
            running: false,
        }
    }
}

/// The callers whose rows go into one transaction, waiting for its outcome.
#[derive(Debug, Default)]
struct CommitGroup {
    state: Mutex<CommitGroupState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct CommitGroupState {
    /// The transaction's outcome, once written (the error as text: every caller gets it).
    outcome: Option<Result<(), String>>,
    /// The previous leader finished and this group's rows wait: one caller leads.
    lead: bool,
}

impl CommitGroup {
    fn lock(&self) -> MutexGuard<'_, CommitGroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// Opens or creates `<data>/index.redb`. Fails if another process holds it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("index.redb");
        let db = Database::create(&path).map_err(|err| {
            StoreError(format!(
                "{}: {err} (is another master-target using this data directory?)",
                path.display()
            ))
        })?;
        let tx = db.begin_write().map_err(e)?;
        tx.open_table(DISKS).map_err(e)?;
        tx.open_table(DISK_STATE).map_err(e)?;
        tx.open_table(TAGS).map_err(e)?;
        tx.open_table(INCONSISTENT_TAGS).map_err(e)?;
        tx.open_table(TAG_TIMES).map_err(e)?;
        tx.open_table(ROLLBACKS).map_err(e)?;
        tx.open_table(TRIMS).map_err(e)?;
        tx.open_table(CHOSEN_RETENTION).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(Store {
            db,
            group: Mutex::new(GroupCommit::default()),
        })
    }

    fn lock_group(&self) -> MutexGuard<'_, GroupCommit> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// As the leader of `group` (the open one: no other leader runs, so nothing took
    /// its rows): writes its rows in one transaction, gives every caller of the group
    /// the outcome, and hands the lead to the group queued meanwhile, if any.
    fn lead_group(&self, group: &Arc<CommitGroup>) -> Result<(), StoreError> {
        let queued = {
            let mut g = self.lock_group();
            debug_assert!(
                Arc::ptr_eq(&g.open, group),
                "the leader's group is the open one"
            );
            g.open = Arc::new(CommitGroup::default());
            std::mem::take(&mut g.queued)
        };
        let outcome = self.commit_group(&queued).map_err(|err| err.0);
        group.lock().outcome = Some(outcome.clone());
        group.changed.notify_all();
        let next = {
            let mut g = self.lock_group();
            if g.queued.is_empty() {
                g.running = false;
                None
            } else {
                Some(g.open.clone())
            }
        };
        if let Some(next) = next {
            next.lock().lead = true;
            // Every waiter on `next` is one of its callers: any one of them can lead.
            next.changed.notify_one();
        }
        outcome.map_err(StoreError)
    }

    /// Writes queued checkpoints and tags in one durable transaction.
    fn commit_group(&self, queued: &[QueuedRows]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut disks = tx.open_table(DISKS).map_err(e)?;
            let mut states = tx.open_table(DISK_STATE).map_err(e)?;
            let mut t = tx.open_table(TAGS).map_err(e)?;
            let mut inconsistent = tx.open_table(INCONSISTENT_TAGS).map_err(e)?;
            let mut times = tx.open_table(TAG_TIMES).map_err(e)?;
            for (id, checkpoint, tags) in queued {
                if let Some(c) = checkpoint {
                    let key = stream_key(id);
                    disks
                        .insert(key.as_str(), (c.disk_size, c.journal_offset, c.seq))
                        .map_err(e)?;
                    states.insert(key.as_str(), c.sync.to_row()).map_err(e)?;
                }
                for tag in tags {
                    let key = stream_key(&tag.stream);
                    let tag_key = (tag.group.as_str(), tag.id, key.as_str());
                    t.insert(
                        tag_key,
                        (tag.seq, tag.kind as u8, tag.members, tag.journal_end),
                    )
                    .map_err(e)?;
                    if tag.consistent {
                        inconsistent.remove(tag_key).map_err(e)?;
                    } else {
                        inconsistent.insert(tag_key, ()).map_err(e)?;
                    }
                    if times.get(tag_key).map_err(e)?.is_none() {
                        times.insert(tag_key, tag.landed_at_ms).map_err(e)?;
                    }
                }
            }
        }
        tx.commit().map_err(e)
    }

    /// Records (durably) the retention chosen for `group`.
    pub fn set_chosen_retention(
        &self,
        group: &str,
        policy: crate::retention::RetentionPolicy,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(CHOSEN_RETENTION).map_err(e)?;
            let row = (policy.window.as_secs(), policy.max_bytes.unwrap_or(0));
            t.insert(group, row).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Every group's chosen retention.
    pub fn chosen_retention(
        &self,
    ) -> Result<BTreeMap<String, crate::retention::RetentionPolicy>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(CHOSEN_RETENTION).map_err(e)?;
        let mut out = BTreeMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let (window_s, max) = v.value();
            out.insert(
                k.value().to_owned(),
                crate::retention::RetentionPolicy {
                    window: std::time::Duration::from_secs(window_s),
                    max_bytes: (max > 0).then_some(max),
                },
            );
        }
        Ok(out)
    }

    /// Every disk known to this master target.
    pub fn disks(&self) -> Result<Vec<(StreamId, DiskCheckpoint)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(DISKS).map_err(e)?;
        let states = tx.open_table(DISK_STATE).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            if let Some(id) = parse_stream_key(k.value()) {
                let sync = states.get(k.value()).map_err(e)?.map(|s| s.value());
                out.push((id, DiskCheckpoint::from_rows(v.value(), sync)?));
            }
        }
        Ok(out)
    }

    /// Every recovery point, complete or not, ordered by group then tag id.
    pub fn recovery_points(&self) -> Result<Vec<RecoveryPoint>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TAGS).map_err(e)?;
        let inconsistent = tx.open_table(INCONSISTENT_TAGS).map_err(e)?;
        let times = tx.open_table(TAG_TIMES).map_err(e)?;
        let mut points: BTreeMap<(String, u64), RecoveryPoint> = BTreeMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let (group, id, stream) = k.value();
            let (seq, kind, members, journal_end) = v.value();
            let Some(stream) = parse_stream_key(stream) else {
                continue;
            };
            let p = points
                .entry((group.to_owned(), id))
                .or_insert_with(|| RecoveryPoint {
                    group: group.to_owned(),
                    tag_id: id,
                    kind: if kind == TagKind::App as u8 {
                        "app"
                    } else {
                        "crash"
                    },
                    members,
                    landed: vec![],
                    consistent: true,
                    complete: false,
                    time_ms: None,
                });
            if inconsistent.get(k.value()).map_err(e)?.is_some() {
                p.consistent = false;
            }
            p.landed.push(LandedOn {
                vm: stream.vm,
                disk: stream.disk,
                seq,
                journal_end,
                landed_at_ms: times.get(k.value()).map_err(e)?.map(|t| t.value()),
            });
        }
        Ok(points
            .into_values()
            .map(|mut p| {
                p.complete = p.landed.len() == p.members as usize && p.consistent;
                p.time_ms = p
                    .landed
                    .iter()
                    .map(|l| l.landed_at_ms)
                    .collect::<Option<Vec<u64>>>()
                    .and_then(|t| t.into_iter().max());
                p
            })
            .collect())
    }
}

impl Store {
    /// Records rollback targets for several disks in one transaction: a group's disks
    /// are rolled back all or none, whatever a crash interrupts.
    pub fn record_rollbacks(
        &self,
        targets: &[(StreamId, RollbackTarget)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(ROLLBACKS).map_err(e)?;
            for (id, r) in targets {
                t.insert(stream_key(id).as_str(), (r.journal_end, r.seq))
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Where disk `id`'s journal starts now: `(offset, seq)` of the entry boundary just
    /// past the oldest kept point's tag; `None`: never trimmed (it starts after the
    /// header).
    pub fn trim_point(&self, id: &StreamId) -> Result<Option<(u64, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TRIMS).map_err(e)?;
        let row = t.get(stream_key(id).as_str()).map_err(e)?;
        Ok(row.map(|r| r.value()))
    }

    /// Records that the journals of `disks` now start at `(offset, seq)` each and
    /// forgets their tags before that (older than the oldest kept point), in one
    /// transaction: a group's disks are trimmed together. Called before the bytes are
    /// punched out, so nothing ever reads where a hole may be.
    pub fn record_trims(&self, disks: &[(StreamId, u64, u64)]) -> Result<usize, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let mut dropped = 0;
        {
            let mut trims = tx.open_table(TRIMS).map_err(e)?;
            let mut tags = tx.open_table(TAGS).map_err(e)?;
            let mut inconsistent = tx.open_table(INCONSISTENT_TAGS).map_err(e)?;
            let mut times = tx.open_table(TAG_TIMES).map_err(e)?;
            for (id, offset, seq) in disks {
                let key = stream_key(id);
                trims.insert(key.as_str(), (*offset, *seq)).map_err(e)?;
                let mut old: Vec<(String, u64)> = Vec::new();
                for row in tags.iter().map_err(e)? {
                    let (k, v) = row.map_err(e)?;
                    let (group, tag_id, stream) = k.value();
                    if stream == key && v.value().3 < *offset {
                        old.push((group.to_owned(), tag_id));
                    }
                }
                for (group, tag_id) in &old {
                    let k = (group.as_str(), *tag_id, key.as_str());
                    tags.remove(k).map_err(e)?;
                    inconsistent.remove(k).map_err(e)?;
                    times.remove(k).map_err(e)?;
                }
                dropped += old.len();
            }
        }
        tx.commit().map_err(e)?;
        Ok(dropped)
    }

    /// Disks with a rollback under way (interrupted), and where to.
    pub fn pending_rollbacks(&self) -> Result<Vec<(StreamId, RollbackTarget)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(ROLLBACKS).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            if let Some(id) = parse_stream_key(k.value()) {
                let (journal_end, seq) = v.value();
                out.push((id, RollbackTarget { journal_end, seq }));
            }
        }
        Ok(out)
    }
}

impl ReplicaIndex for Store {
    fn checkpoint(&self, id: &StreamId) -> Result<Option<DiskCheckpoint>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(DISKS).map_err(e)?;
        let states = tx.open_table(DISK_STATE).map_err(e)?;
        let key = stream_key(id);
        let Some(row) = t.get(key.as_str()).map_err(e)? else {
            return Ok(None);
        };
        let sync = states.get(key.as_str()).map_err(e)?.map(|s| s.value());
        DiskCheckpoint::from_rows(row.value(), sync).map(Some)
    }

    /// Group commit (see [`GroupCommit`]): returns once a transaction holding these
    /// rows is durable.
    fn commit(
        &self,
        id: &StreamId,
        checkpoint: Option<DiskCheckpoint>,
        tags: &[TagLanding],
    ) -> Result<(), StoreError> {
        let group = {
            let mut g = self.lock_group();
            g.queued.push((id.clone(), checkpoint, tags.to_vec()));
            let group = g.open.clone();
            if !g.running {
                g.running = true;
                drop(g);
                return self.lead_group(&group);
            }
            group
        };
        let mut state = group.lock();
        loop {
            if let Some(outcome) = &state.outcome {
                return outcome.clone().map_err(StoreError);
            }
            if state.lead {
                state.lead = false;
                drop(state);
                return self.lead_group(&group);
            }
            state = group.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn rollback_target(&self, id: &StreamId) -> Result<Option<RollbackTarget>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(ROLLBACKS).map_err(e)?;
        let row = t.get(stream_key(id).as_str()).map_err(e)?;
        Ok(row.map(|r| {
            let (journal_end, seq) = r.value();
            RollbackTarget { journal_end, seq }
        }))
    }

    fn set_rollback_target(
        &self,
        id: &StreamId,
        target: Option<RollbackTarget>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(ROLLBACKS).map_err(e)?;
            let key = stream_key(id);
            match target {
                Some(r) => t.insert(key.as_str(), (r.journal_end, r.seq)).map(drop),
                None => t.remove(key.as_str()).map(drop),
            }
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    fn roll_back_index(&self, id: &StreamId, c: DiskCheckpoint) -> Result<(), StoreError> {
        let key = stream_key(id);
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(DISKS).map_err(e)?;
            t.insert(key.as_str(), (c.disk_size, c.journal_offset, c.seq))
                .map_err(e)?;
            let mut t = tx.open_table(DISK_STATE).map_err(e)?;
            t.insert(key.as_str(), c.sync.to_row()).map_err(e)?;
            let mut tags = tx.open_table(TAGS).map_err(e)?;
            let mut past: Vec<(String, u64)> = Vec::new();
            for row in tags.iter().map_err(e)? {
                let (k, v) = row.map_err(e)?;
                let (group, tag_id, stream) = k.value();
                if stream == key && v.value().3 > c.journal_offset {
                    past.push((group.to_owned(), tag_id));
                }
            }
            let mut inconsistent = tx.open_table(INCONSISTENT_TAGS).map_err(e)?;
            let mut times = tx.open_table(TAG_TIMES).map_err(e)?;
            for (group, tag_id) in &past {
                let k = (group.as_str(), *tag_id, key.as_str());
                tags.remove(k).map_err(e)?;
                inconsistent.remove(k).map_err(e)?;
                times.remove(k).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }
}

/// An in-memory index (the model test): a commit is durable when it returns, as with
/// redb, so a crash loses nothing committed; commits fail on request.
#[derive(Debug, Default)]
pub struct MemIndex {
    state: Mutex<MemIndexState>,
    fail_commits: AtomicU32,
}

#[derive(Debug, Default)]
struct MemIndexState {
    checkpoints: BTreeMap<StreamId, DiskCheckpoint>,
    /// By `(group, tag id, disk)`, as in the `tags` table.
    tags: BTreeMap<(String, u64, StreamId), TagLanding>,
    rollbacks: BTreeMap<StreamId, RollbackTarget>,
}

impl MemIndex {
    fn lock(&self) -> MutexGuard<'_, MemIndexState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails (committing nothing) while injected failures are left.
    fn injected_failure(&self) -> Result<(), StoreError> {
        if self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError("injected commit failure".into()));
        }
        Ok(())
    }

    /// The next `n` commits fail, committing nothing.
    pub fn fail_commits(&self, n: u32) {
        self.fail_commits.store(n, Ordering::SeqCst);
    }

    /// Every tag recorded for disk `id`, by sequence number.
    pub fn tags_of(&self, id: &StreamId) -> Vec<TagLanding> {
        let mut tags: Vec<TagLanding> = self
            .lock()
            .tags
            .values()
            .filter(|t| t.stream == *id)
            .cloned()
            .collect();
        tags.sort_by_key(|t| t.seq);
        tags
    }
}

impl ReplicaIndex for MemIndex {
    fn checkpoint(&self, id: &StreamId) -> Result<Option<DiskCheckpoint>, StoreError> {
        Ok(self.lock().checkpoints.get(id).copied())
    }

    fn commit(
        &self,
        id: &StreamId,
        checkpoint: Option<DiskCheckpoint>,
        tags: &[TagLanding],
    ) -> Result<(), StoreError> {
        self.injected_failure()?;
        let mut s = self.lock();
        if let Some(c) = checkpoint {
            s.checkpoints.insert(id.clone(), c);
        }
        for t in tags {
            let key = (t.group.clone(), t.id, t.stream.clone());
            s.tags.insert(key, t.clone());
        }
        Ok(())
    }

    fn rollback_target(&self, id: &StreamId) -> Result<Option<RollbackTarget>, StoreError> {
        Ok(self.lock().rollbacks.get(id).copied())
    }

    fn set_rollback_target(
        &self,
        id: &StreamId,
        target: Option<RollbackTarget>,
    ) -> Result<(), StoreError> {
        self.injected_failure()?;
        let mut s = self.lock();
        match target {
            Some(t) => s.rollbacks.insert(id.clone(), t),
            None => s.rollbacks.remove(id),
        };
        Ok(())
    }

    fn roll_back_index(&self, id: &StreamId, checkpoint: DiskCheckpoint) -> Result<(), StoreError> {
        self.injected_failure()?;
        let mut s = self.lock();
        s.checkpoints.insert(id.clone(), checkpoint);
        s.tags
            .retain(|_, t| t.stream != *id || t.journal_end <= checkpoint.journal_offset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn landing(disk: u32, members: u32, at: u64) -> TagLanding {
        TagLanding {
            group: "g".into(),
            id: 7,
            stream: StreamId {
                vm: "vm1".into(),
                disk,
            },
            seq: 10,
            kind: TagKind::App,
            members,
            journal_end: 100,
            consistent: true,
            landed_at_ms: at,
        }
    }

    /// A point's time is when its last landing became durable; recovery indexing a tag
    /// again (after a crash) does not move it.
    #[test]
    fn a_point_keeps_the_time_it_landed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = landing(0, 2, 1_000);
        store
            .commit(&t0.stream, None, std::slice::from_ref(&t0))
            .unwrap();
        let p = &store.recovery_points().unwrap()[0];
        assert!(!p.complete);
        assert_eq!(p.time_ms, Some(1_000));
        let t1 = landing(1, 2, 1_250);
        store
            .commit(&t1.stream, None, std::slice::from_ref(&t1))
            .unwrap();
        // Re-indexed by recovery, later.
        store
            .commit(&t0.stream, None, &[landing(0, 2, 9_000)])
            .unwrap();
        let p = &store.recovery_points().unwrap()[0];
        assert!(p.complete);
        assert_eq!(p.kind, "app");
        assert_eq!(p.time_ms, Some(1_250));
        let times: Vec<Option<u64>> = p.landed.iter().map(|l| l.landed_at_ms).collect();
        assert_eq!(times, vec![Some(1_000), Some(1_250)]);
    }

    /// Many disks landing tags at once share transactions, the lead passing from group to
    /// group, and each caller returns only once its own rows are committed: every landing
    /// and checkpoint is there after, and no caller is left waiting.
    #[test]
    fn concurrent_commits_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let disks = 48u32;
        std::thread::scope(|scope| {
            for disk in 0..disks {
                let store = &store;
                scope.spawn(move || {
                    for round in 1..=20u64 {
                        let t = landing(disk, disks, 1_000 + u64::from(disk));
                        let checkpoint = DiskCheckpoint {
                            disk_size: 1 << 20,
                            journal_offset: 100 * round,
                            seq: 10 * round,
                            sync: SyncState::Consistent,
                        };
                        store
                            .commit(&t.stream, Some(checkpoint), std::slice::from_ref(&t))
                            .unwrap();
                        // Ours is durable when commit returns, whoever wrote the group.
                        assert_eq!(store.checkpoint(&t.stream).unwrap(), Some(checkpoint));
                    }
                });
            }
        });
        let points = store.recovery_points().unwrap();
        assert_eq!(points.len(), 1);
        assert!(points[0].complete);
        assert_eq!(points[0].landed.len(), disks as usize);
        let g = store.lock_group();
        assert!(g.queued.is_empty() && !g.running);
    }
}
