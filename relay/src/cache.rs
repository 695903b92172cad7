//! The relay's durable cache, as the rest of the relay sees it.
//!
//! One **writer thread** owns appends: it takes every append request queued (a batch),
//! appends them, writes and syncs once (group commit: latency is about one `fdatasync`
//! whatever the load), then publishes each stream's new durable sequence number on its
//! `durable` watch channel, which ingest turns into acks to the agent.
//!
//! When the cache is full (its configured capacity, or its filesystem short of room for
//! the next batch and a 4 MiB reserve) the writer commits what it has and waits until
//! trimming frees space. Ingest meanwhile waits on a byte budget for queued appends, stops reading its
//! QUIC stream, and the agent, whose records go unacknowledged, runs out of credit:
//! backpressure, and nothing is dropped.
//!
//! Forwarders read payloads back from disk ([`RecordSource::read_batch`]) with the log's
//! lock held only to look records up, and acknowledge what the master target confirmed
//! ([`RelayCache::ack`]), which deletes fully acknowledged segments.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use fbr_cache::{
    now_ms, read_entry, CacheConfig, CacheError, FileStorage, RecoveryReport, SegmentLog,
    StreamStats,
};
use fbr_protocol::placement::{Admission, Placement};
use fbr_protocol::stream::SourcePosition;
use fbr_protocol::{Record, StreamId};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::forwarder::ForwardSource;
use crate::reduce::RecordSource;

/// Bytes of appends that may wait for the writer (bounds the relay's memory).
const PENDING_APPEND_BYTES: usize = 32 << 20;
/// Most bytes the writer puts in one commit.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// A record read back from the cache, with when it was appended.
#[derive(Debug, Clone)]
pub struct CachedRecord {
    pub record: Record,
    /// Unix milliseconds of the durable append (the start of its replication lag).
    pub appended_ms: u64,
}

/// Per-stream notifications.
#[derive(Debug)]
pub struct StreamWatch {
    /// Highest sequence number durable in the cache.
    pub durable: watch::Sender<u64>,
    /// Highest sequence number durable at the master target.
    pub applied: watch::Sender<u64>,
    /// Bumped when a commit containing this stream's records failed: its ingest session
    /// must end so the agent resends from the durable point.
    pub broken: watch::Sender<u64>,
}

struct AppendRequest {
    stream: StreamId,
    disk_size: u64,
    record: Record,
    _permit: OwnedSemaphorePermit,
}

/// How long [`RelayCache::retire`] waits for the writer to be between two commits.
const RETIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Room the writer leaves free on the cache's filesystem, whatever the configured
/// capacity: segment footers and the seal of a segment are written after its records.
const DISK_RESERVE_BYTES: u64 = 4 << 20;

/// The cache filesystem's space (see [`RelayCache::disk_space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    pub available_bytes: u64,
    pub size_bytes: u64,
}

/// The cache shared by the relay's tasks.
#[derive(Debug)]
pub struct RelayCache {
    log: Mutex<SegmentLog<FileStorage>>,
    watches: Mutex<HashMap<StreamId, Arc<StreamWatch>>>,
    requests: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    pending_budget: Arc<Semaphore>,
    /// Signalled when trimming frees space (the writer may be waiting for it).
    space: (Mutex<()>, Condvar),
    /// Set while the writer waits for space (for health and tests).
    pub full: AtomicBool,
    /// Sequence numbers of the recovery points (tags) appended per stream and not yet
    /// acknowledged by the master target: where coalescing intervals end. In memory only
    /// (after a restart, intervals are found again as new tags arrive); nothing depends
    /// on it for correctness.
    tags: Mutex<HashMap<StreamId, std::collections::BTreeSet<u64>>>,
    /// Each stream's placement and the first segment of its current path (the
    /// `placements` file in the cache directory): see [`RelayCache::retire`].
    placements: fbr_daemon::placements::PlacementStore,
    /// Held by [`RelayCache::retire`].
    retiring: Mutex<()>,
    _lock: File,
}

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppendRequest({} #{})", self.stream, self.record.seq())
    }
}

impl RelayCache {
    /// Opens (and recovers) the cache in `dir` and starts the writer thread. Fails if
    /// another relay holds the directory.
    pub fn open(dir: &Path, config: CacheConfig) -> anyhow::Result<(Arc<Self>, RecoveryReport)> {
        std::fs::create_dir_all(dir)?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                anyhow::anyhow!(
                    "cache directory {} is in use by another relay ({} is locked)",
                    dir.display(),
                    lock_path.display()
                )
            },
        )?;
        let placements = fbr_daemon::placements::PlacementStore::open(dir)?;
        // Records of a stream's earlier paths stay forgotten (see `retire`).
        let fences = placements
            .entries()
            .into_iter()
            .filter(|(_, p)| p.since > 0)
            .map(|(s, p)| (s, p.since))
            .collect();
        let (log, report) = SegmentLog::open_fenced(FileStorage::new(dir)?, config, fences)?;
        let (tx, rx) = mpsc::channel();
        let cache = Arc::new(RelayCache {
            log: Mutex::new(log),
            watches: Mutex::new(HashMap::new()),
            requests: Mutex::new(Some(tx)),
            pending_budget: Arc::new(Semaphore::new(PENDING_APPEND_BYTES)),
            space: (Mutex::new(()), Condvar::new()),
            full: AtomicBool::new(false),
            tags: Mutex::new(HashMap::new()),
            placements,
            retiring: Mutex::new(()),
            _lock: lock,
        });
        let writer = cache.clone();
        std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || writer.run_writer(rx))?;
        Ok((cache, report))
    }

    /// What the cache's filesystem still offers this relay (`statvfs`: blocks available
    /// to unprivileged users), and its whole size, in bytes; `None` if it cannot say.
    pub fn disk_space(&self) -> Option<DiskSpace> {
        let s = rustix::fs::fstatvfs(&self._lock).ok()?;
        Some(DiskSpace {
            available_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            size_bytes: s.f_blocks.saturating_mul(s.f_frsize),
        })
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, SegmentLog<FileStorage>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notifications of `stream` (created on first use).
    pub fn watch(&self, stream: &StreamId) -> Arc<StreamWatch> {
        let mut w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(stream.clone())
            .or_insert_with(|| {
                let durable = self
                    .lock_log()
                    .stream_stats(stream)
                    .map(|s| s.durable_seq)
                    .unwrap_or(0);
                Arc::new(StreamWatch {
                    durable: watch::channel(durable).0,
                    applied: watch::channel(0).0,
                    broken: watch::channel(0).0,
                })
            })
            .clone()
    }

    /// Queues a validated record for a durable append. Waits while too many bytes are
    /// queued (backpressure). Returns `false` if the cache is shutting down.
    pub async fn append(&self, stream: &StreamId, disk_size: u64, record: Record) -> bool {
        if let Record::Tag { seq, .. } = record {
            self.lock_tags()
                .entry(stream.clone())
                .or_default()
                .insert(seq);
        }
        let cost = (record.encoded_len() as u32).min(PENDING_APPEND_BYTES as u32);
        let Ok(permit) = self.pending_budget.clone().acquire_many_owned(cost).await else {
            return false;
        };
        let tx = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tx {
            Some(tx) => tx
                .send(AppendRequest {
                    stream: stream.clone(),
                    disk_size,
                    record,
                    _permit: permit,
                })
                .is_ok(),
            None => false,
        }
    }

    /// Accounting of one stream, if the cache knows it.
    pub fn stats(&self, stream: &StreamId) -> Option<StreamStats> {
        self.lock_log().stream_stats(stream)
    }

    /// Accounting of every stream the cache knows.
    pub fn all_stats(&self) -> Vec<(StreamId, StreamStats)> {
        self.lock_log().all_stream_stats()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.lock_log().capacity_bytes()
    }

    /// Every stream with something in the cache.
    pub fn streams(&self) -> Vec<(StreamId, u64)> {
        self.lock_log().streams()
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock_log().used_bytes()
    }

    /// The master target holds `stream` up to `seq`.
    pub fn ack(&self, stream: &StreamId, seq: u64) -> Result<(), CacheError> {
        let freed = self.lock_log().ack(stream, seq)?;
        if let Some(tags) = self.lock_tags().get_mut(stream) {
            *tags = tags.split_off(&(seq + 1));
        }
        self.watch(stream).applied.send_if_modified(|v| {
            let changed = seq > *v;
            *v = (*v).max(seq);
            changed
        });
        if freed > 0 {
            self.space.1.notify_all();
        }
        Ok(())
    }

    /// Stops forwarding `stream` from the cache (corruption); frees its space.
    pub fn drop_stream(&self, stream: &StreamId, reason: String) -> Result<(), CacheError> {
        self.lock_log().drop_stream(stream, reason)?;
        self.space.1.notify_all();
        Ok(())
    }

    /// Forgets `stream`'s records and continues it at `next_seq` (after corruption,
    /// with a resync asked of its source): see [`fbr_cache::SegmentLog::reset_stream`].
    pub fn reset_stream(&self, stream: &StreamId, next_seq: u64) -> Result<(), CacheError> {
        self.lock_log().reset_stream(stream, next_seq)?;
        self.watch(stream).durable.send_replace(next_seq.max(1) - 1);
        self.space.1.notify_all();
        Ok(())
    }

    /// What a `Hello` at `placement` means for `stream` here: the path on record, a
    /// move to this relay (raise it with [`RelayCache::retire`] before accepting), or a
    /// stale path.
    pub fn check_placement(&self, stream: &StreamId, placement: u64) -> Admission {
        self.placements.check(stream, placement)
    }

    /// The placement on record for `stream` (0 if it never moved).
    pub fn placement(&self, stream: &StreamId) -> u64 {
        self.placements.get(stream)
    }

    /// Forgets everything this cache holds of `stream`, for good, and records
    /// `placement` as its current one: the VM moved here from another relay (what was
    /// cached came by a path since superseded), or moved away (the master target
    /// refused this relay's copy as stale; `placement` is then one past ours). Blocks
    /// (briefly) until the writer is between two commits.
    ///
    /// Order, for crashes: the log seals its active segment and forgets the stream,
    /// then the new placement and that fence are made durable. A crash between the two
    /// brings the old records back at the old placement, which the master target
    /// judges (refused if the stream moved on); after both, recovery skips them.
    ///
    /// Retirements are serialized, and one to a placement not above the one on record
    /// does nothing: a late "moved away" of an old forwarder must not forget the
    /// records of the path that replaced it. Returns whether it retired.
    pub fn retire(&self, stream: &StreamId, placement: u64) -> anyhow::Result<bool> {
        let _one_at_a_time = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        if self.placements.get(stream) >= placement {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let fence = loop {
            match self.lock_log().retire_stream(stream) {
                Ok(fence) => break fence,
                Err(CacheError::Busy { .. }) if started.elapsed() < RETIRE_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.lock_tags().remove(stream);
        let watch = self.watch(stream);
        watch.durable.send_replace(0);
        watch.applied.send_replace(0);
        self.space.1.notify_all();
        self.placements.raise(
            stream,
            Placement {
                placement,
                since: fence,
            },
        )?;
        Ok(true)
    }

    /// One durable record and its entry's size, checked; `None` if it is not cached.
    /// The log's lock is held only to find it, not for the read.
    fn read_one(
        &self,
        stream: &StreamId,
        seq: u64,
    ) -> Result<Option<(CachedRecord, usize)>, CacheError> {
        let located = self.lock_log().locate(stream, seq);
        let Some((file, offset, len)) = located else {
            return Ok(None);
        };
        let entry = read_entry(&*file, offset, len, stream, seq)?;
        let record = CachedRecord {
            record: entry.record,
            appended_ms: entry.appended_ms,
        };
        Ok(Some((record, len as usize)))
    }

    fn lock_tags(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<StreamId, std::collections::BTreeSet<u64>>> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first recovery point of `stream` at or after `from`, if one was appended.
    pub fn next_tag(&self, stream: &StreamId, from: u64) -> Option<u64> {
        self.lock_tags()
            .get(stream)
            .and_then(|t| t.range(from..).next().copied())
    }

    /// Stops the writer after it has committed what is queued.
    pub fn shutdown(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.space.1.notify_all();
    }

    fn run_writer(&self, rx: mpsc::Receiver<AppendRequest>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut bytes = batch[0].record.encoded_len();
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.record.encoded_len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let mut in_batch: HashSet<StreamId> = HashSet::new();
            // Appended and not yet written by a commit.
            let mut uncommitted = 0u64;
            for req in batch {
                // The disk may hold less than the configured capacity (or be shared):
                // never buffer what it has no room for. Commit what we have, then wait,
                // as when full, until trimming frees room.
                let len = req.record.encoded_len() as u64;
                while !self.disk_has_room(uncommitted + len) {
                    self.full.store(true, Ordering::SeqCst);
                    if uncommitted > 0 {
                        self.commit(&mut in_batch);
                        uncommitted = 0;
                    } else if !self.wait_for_space() {
                        return;
                    }
                }
                uncommitted += len;
                loop {
                    let result =
                        self.lock_log()
                            .append(&req.stream, req.disk_size, &req.record, now_ms());
                    match result {
                        Ok(()) => {
                            self.full.store(false, Ordering::SeqCst);
                            in_batch.insert(req.stream.clone());
                            break;
                        }
                        Err(CacheError::OutOfOrder { last, got, .. }) if got <= last => {
                            // A duplicate: a superseded session's queued append racing the
                            // new session's resend of the same record. Already cached.
                            break;
                        }
                        Err(CacheError::Full { .. }) => {
                            // Commit what we have, then wait for the forwarders to free space.
                            self.full.store(true, Ordering::SeqCst);
                            self.commit(&mut in_batch);
                            uncommitted = 0;
                            if !self.wait_for_space() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::error!(stream = %req.stream, "cache append refused: {e}");
                            self.break_stream(&req.stream);
                            break;
                        }
                    }
                }
            }
            self.commit(&mut in_batch);
        }
    }

    /// Group commit: one write and one `fdatasync` for everything appended.
    fn commit(&self, in_batch: &mut HashSet<StreamId>) {
        let pending = self.lock_log().begin_commit();
        let Some(pending) = pending else {
            in_batch.clear();
            return;
        };
        let io = pending.run();
        let result = self.lock_log().finish_commit(pending, io);
        match result {
            Ok(advanced) => {
                for (stream, seq) in advanced {
                    self.watch(&stream).durable.send_replace(seq);
                }
            }
            Err(e) => {
                tracing::error!(
                    "cache commit failed, {} streams must resend: {e}",
                    in_batch.len()
                );
                for s in in_batch.iter() {
                    self.break_stream(s);
                }
            }
        }
        in_batch.clear();
    }

    fn break_stream(&self, stream: &StreamId) {
        self.watch(stream).broken.send_modify(|g| *g += 1);
    }

    /// Whether the cache's filesystem has room for `bytes` more and the reserve.
    fn disk_has_room(&self, bytes: u64) -> bool {
        self.disk_space()
            .is_none_or(|d| d.available_bytes >= bytes.saturating_add(DISK_RESERVE_BYTES))
    }

    /// Waits until trimming frees space; `false` on shutdown.
    fn wait_for_space(&self) -> bool {
        // Acks trim only when a segment's last holder lets go; a full trim here too
        // makes sure a full cache never waits on that hint.
        if let Ok(freed) = self.lock_log().trim() {
            if freed > 0 {
                return true;
            }
        }
        let guard = self.space.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.space.1.wait_timeout(guard, Duration::from_millis(100));
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl RecordSource for RelayCache {
    /// Reads durable records of `stream` from `from` on, up to about `max_bytes`.
    /// Payloads are checked (CRC32C); corruption is an error, never returned data (the
    /// records before a damaged one are returned first; the error comes when the read
    /// starts at it).
    fn read_batch(
        &self,
        stream: &StreamId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<CachedRecord>, CacheError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut seq = from;
        while bytes < max_bytes {
            let read = match self.read_one(stream, seq) {
                // The records before a damaged one are good: send them first; the next
                // read starts at the damage and reports it.
                Err(CacheError::Corrupt { .. }) if !out.is_empty() => break,
                other => other?,
            };
            let Some((record, len)) = read else {
                break;
            };
            out.push(record);
            bytes += len;
            seq += 1;
        }
        Ok(out)
    }

    /// Reads the durable records `seqs` (increasing) of `stream`, checked like
    /// `read_batch`; stops at the first one no longer cached.
    fn read_seqs(&self, stream: &StreamId, seqs: &[u64]) -> Result<Vec<CachedRecord>, CacheError> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let Some((record, _)) = self.read_one(stream, seq)? else {
                break;
            };
            out.push(record);
        }
        Ok(out)
    }
}

impl ForwardSource for RelayCache {
    fn position(&self, stream: &StreamId) -> SourcePosition {
        match self.stats(stream) {
            // The master target is the authority: it may hold more than this cache
            // (a relay whose cache is newer than the stream's history).
            Some(s) => SourcePosition {
                resend_from: s.first_cached_seq,
                produced: s.durable_seq,
                receiver_may_lead: true,
            },
            None => SourcePosition::empty(),
        }
    }

    fn needs_resync(&self, stream: &StreamId) -> Option<String> {
        self.stats(stream).and_then(|s| s.needs_resync)
    }

    fn durable(&self, stream: &StreamId) -> watch::Receiver<u64> {
        self.watch(stream).durable.subscribe()
    }

    fn next_tag(&self, stream: &StreamId, from: u64) -> Option<u64> {
        RelayCache::next_tag(self, stream, from)
    }

    fn backlog_bytes(&self, stream: &StreamId) -> u64 {
        self.stats(stream).map_or(0, |s| s.backlog_bytes)
    }

    fn ack(&self, stream: &StreamId, seq: u64) -> Result<(), CacheError> {
        RelayCache::ack(self, stream, seq)
    }

    fn reset_stream(&self, stream: &StreamId, next_seq: u64) -> Result<(), CacheError> {
        RelayCache::reset_stream(self, stream, next_seq)
    }

    fn placement(&self, stream: &StreamId) -> u64 {
        RelayCache::placement(self, stream)
    }

    fn retire(&self, stream: &StreamId, placement: u64) -> Result<bool, String> {
        RelayCache::retire(self, stream, placement).map_err(|e| format!("{e:#}"))
    }
}
