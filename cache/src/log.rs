//! The segmented log: appends, group commit, read-back, acknowledgement, trimming and
//! recovery. Synchronous and single-writer; the relay drives it from one writer thread
//! and reads through [`SegmentLog::locate`] + [`read_entry`] without holding its lock
//! during I/O.
//!
//! ## Invariants
//! - Per stream, the indexed records have contiguous sequence numbers
//!   `first_seq ..= appended_seq`; `durable_seq <= appended_seq`.
//! - A record is reported durable (by [`SegmentLog::commit`]) only after the bytes
//!   holding it were written and synced.
//! - A segment is deleted only when it is sealed, every record in it is acknowledged by
//!   the master target (or belongs to a stream dropped for resync), and no older
//!   segment still holds records of its streams (per stream, oldest first).
//! - `used_bytes` is the sum of the lengths of the segment files; appends fail with
//!   [`CacheError::Full`] rather than exceed the capacity.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fbr_protocol::{Record, StreamId};

use crate::format::{
    self, CacheEntry, Footer, FooterEntry, ENTRY_PREFIX_LEN, SEGMENT_HEADER_LEN, TRAILER_LEN,
};
use crate::storage::{SegmentFile, Storage};

/// Sizes of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// A segment is sealed once it holds this many bytes (at most 1 GiB).
    pub segment_bytes: u64,
    /// Total bytes of segment files the cache may use.
    pub capacity_bytes: u64,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache full: {used} of {capacity} bytes used, {needed} more needed")]
    Full {
        used: u64,
        capacity: u64,
        needed: u64,
    },
    #[error("{stream}: record {got} does not follow {last}")]
    OutOfOrder {
        stream: StreamId,
        last: u64,
        got: u64,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{where_}: corrupt cache entry: {reason}")]
    Corrupt { where_: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("{stream}: the cache is committing; retry")]
    Busy { stream: StreamId },
}

/// One stream no longer points into `segment`; `true` if no stream does any more (a
/// trim may free it).
fn release_holder<F>(segments: &mut BTreeMap<u64, Segment<F>>, segment: u32) -> bool {
    match segments.get_mut(&u64::from(segment)) {
        Some(seg) => {
            seg.holders = seg.holders.saturating_sub(1);
            seg.holders == 0
        }
        None => false,
    }
}

/// A stream's index is dropped: it no longer points into any of its segments.
fn release_holders_of<F>(segments: &mut BTreeMap<u64, Segment<F>>, entries: &VecDeque<Loc>) {
    let mut last = None;
    for loc in entries {
        if last != Some(loc.segment) {
            release_holder(segments, loc.segment);
            last = Some(loc.segment);
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError {
    let what = what.into();
    move |source| CacheError::Io { what, source }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where one record sits: 16 bytes per cached record is the index's memory cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: u32,
    offset: u32,
    len: u32,
    appended_s: u32,
}

/// Per-stream index and accounting.
#[derive(Debug)]
struct StreamIndex {
    disk_size: u64,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    entries: VecDeque<Loc>,
    appended_seq: u64,
    durable_seq: u64,
    acked_seq: u64,
    /// Bytes of every entry in `entries` (kept incrementally: stats are read per scrape).
    cached_bytes: u64,
    /// Bytes of entries appended but not yet durable (the tail of `entries`).
    pending_bytes: u64,
    /// Why the stream can no longer be forwarded from the cache, if it cannot.
    needs_resync: Option<String>,
}

impl StreamIndex {
    fn new(disk_size: u64, first_seq: u64) -> Self {
        StreamIndex {
            disk_size,
            first_seq,
            entries: VecDeque::new(),
            appended_seq: first_seq - 1,
            durable_seq: first_seq - 1,
            acked_seq: first_seq - 1,
            cached_bytes: 0,
            pending_bytes: 0,
            needs_resync: None,
        }
    }

    fn push(&mut self, loc: Loc) {
        self.entries.push_back(loc);
        self.appended_seq += 1;
        self.cached_bytes += loc.len as u64;
        self.pending_bytes += loc.len as u64;
    }
}

/// What one stream looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    pub disk_size: u64,
    /// Highest sequence number durable in the cache (0: none yet).
    pub durable_seq: u64,
    /// Highest sequence number the master target acknowledged, as far as we know.
    pub acked_seq: u64,
    /// Lowest sequence number still readable from the cache.
    pub first_cached_seq: u64,
    /// Bytes of durable records not yet acknowledged by the master target.
    pub backlog_bytes: u64,
    /// Append time (Unix seconds) of the oldest unacknowledged durable record.
    pub oldest_unacked_s: Option<u64>,
    pub needs_resync: Option<String>,
}

#[derive(Debug)]
struct Segment<F> {
    file: Arc<F>,
    /// Bytes in the file (header, entries, footer).
    len: u64,
    /// No longer appended to (sealed with a footer, or recovered at start).
    sealed: bool,
    /// Highest sequence number of each stream in this segment.
    max_seq: HashMap<StreamId, u64>,
    /// Streams whose index still points into this segment (unacknowledged cached
    /// records). Only a hint of when trimming may free something: [`SegmentLog::ack`]
    /// trims when it drops to zero instead of scanning every segment on every ack
    /// (which costs in proportion to the number of streams); [`SegmentLog::trim`]
    /// itself decides from `max_seq`.
    holders: usize,
}

/// What recovery found.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Segments read from their footer (without reading payloads).
    pub sealed_segments: usize,
    /// `(file, offset)` where a torn tail was truncated.
    pub torn_tail: Option<(String, u64)>,
    /// Corruption found (file, offset and reason), other than a torn tail.
    pub corruption: Vec<String>,
    /// Streams flagged for resync because of corruption.
    pub resync: Vec<StreamId>,
    pub elapsed_s: f64,
}

/// A commit's I/O, done outside the lock (see [`SegmentLog::begin_commit`]).
#[derive(Debug)]
pub struct PendingCommit<F> {
    file: Arc<F>,
    offset: u64,
    bytes: bytes::Bytes,
}

impl<F: SegmentFile> PendingCommit<F> {
    /// Writes and syncs the batch: the one `fdatasync` for all its records.
    pub fn run(&self) -> std::io::Result<()> {
        self.file.write_at(&self.bytes, self.offset)?;
        self.file.sync()
    }
}

/// The durable cache log.
#[derive(Debug)]
pub struct SegmentLog<S: Storage> {
    storage: S,
    config: CacheConfig,
    segments: BTreeMap<u64, Segment<S::File>>,
    active: u64,
    /// Appended, not yet committed bytes, to be written at `active`'s `len`.
    write_buf: BytesMut,
    /// Table of contents of the active segment, written when it is sealed.
    footer: Footer,
    footer_refs: HashMap<StreamId, u32>,
    streams: HashMap<StreamId, StreamIndex>,
    /// Streams retired (their VM moved away, or here from elsewhere), with the first
    /// segment of their current path: their records in older segments are never
    /// indexed again ([`SegmentLog::retire_stream`]).
    fences: HashMap<StreamId, u64>,
    /// Streams with records appended since the last commit.
    dirty: Vec<StreamId>,
    /// A commit's write is under way (between `begin_commit` and `finish_commit`).
    commit_in_flight: bool,
    used_bytes: u64,
    /// The next ack trims whatever holders say (set after recovery, whose segments
    /// may hold nothing anybody waits for).
    trim_pending: bool,
}

impl<S: Storage> SegmentLog<S> {
    /// Opens the log in `storage`, recovering whatever is there, and starts a new
    /// active segment.
    pub fn open(storage: S, config: CacheConfig) -> Result<(Self, RecoveryReport), CacheError> {
        Self::open_fenced(storage, config, HashMap::new())
    }

    /// [`SegmentLog::open`], skipping the records of each stream in `fences` held by
    /// segments older than its fence (what [`SegmentLog::retire_stream`] returned, kept
    /// by the caller): they came by a path the stream has since moved away from.
    pub fn open_fenced(
        storage: S,
        config: CacheConfig,
        fences: HashMap<StreamId, u64>,
    ) -> Result<(Self, RecoveryReport), CacheError> {
        if config.segment_bytes < 64 * 1024 || config.segment_bytes > 1 << 30 {
            return Err(CacheError::Config(format!(
                "segment size {} must be between 64 KiB and 1 GiB",
                config.segment_bytes
            )));
        }
        if config.capacity_bytes < 2 * config.segment_bytes {
            return Err(CacheError::Config(format!(
                "capacity {} must be at least two segments ({})",
                config.capacity_bytes,
                2 * config.segment_bytes
            )));
        }
        let started = Instant::now();
        let mut log = SegmentLog {
            storage,
            config,
            segments: BTreeMap::new(),
            active: 0,
            write_buf: BytesMut::new(),
            footer: Footer::default(),
            footer_refs: HashMap::new(),
            streams: HashMap::new(),
            fences,
            dirty: Vec::new(),
            commit_in_flight: false,
            used_bytes: 0,
            trim_pending: false,
        };
        let mut report = RecoveryReport::default();
        let ids = log
            .storage
            .list()
            .map_err(io_err("listing cache segments"))?;
        let last = ids.last().copied();
        for id in &ids {
            log.recover_segment(*id, Some(*id) == last, &mut report)?;
        }
        report.segments = log.segments.len();
        report.bytes = log.used_bytes;
        log.active = last.map(|l| l + 1).unwrap_or(1);
        log.start_segment(log.active)?;
        // Recovered segments nobody holds (empty, or only records of fenced streams)
        // are trimmed at the first ack, as before holders were counted.
        log.trim_pending = true;
        report.resync = log
            .streams
            .iter()
            .filter(|(_, s)| s.needs_resync.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        report.resync.sort();
        report.elapsed_s = started.elapsed().as_secs_f64();
        Ok((log, report))
    }

    fn recover_segment(
        &mut self,
        id: u64,
        is_last: bool,
        report: &mut RecoveryReport,
    ) -> Result<(), CacheError> {
        let name = self.storage.describe(id);
        let file = self
            .storage
            .open(id)
            .map_err(io_err(format!("opening {name}")))?;
        let len = file.size().map_err(io_err(format!("reading {name}")))?;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        if len < SEGMENT_HEADER_LEN
            || file.read_at(&mut header, 0).is_err()
            || format::decode_segment_header(&header).is_err()
        {
            if is_last && len <= SEGMENT_HEADER_LEN {
                // Crashed while creating it: nothing in it was ever acknowledged.
                tracing::warn!(file = %name, "removing a segment torn during creation");
                self.storage
                    .remove(id)
                    .map_err(io_err(format!("removing {name}")))?;
                report.torn_tail = Some((name, 0));
                return Ok(());
            }
            let reason = format::decode_segment_header(&header)
                .err()
                .unwrap_or_else(|| "unreadable header".into());
            report
                .corruption
                .push(format!("{name}: offset 0: {reason}; segment skipped"));
            return Ok(());
        }
        let file = Arc::new(file);
        let mut segment = Segment {
            file: file.clone(),
            len,
            sealed: false,
            max_seq: HashMap::new(),
            holders: 0,
        };
        if let Some(footer) = read_footer(&*file, len) {
            segment.sealed = true;
            report.sealed_segments += 1;
            for e in &footer.entries {
                let (stream, disk_size) = &footer.streams[e.stream_ref as usize];
                let loc = Loc {
                    segment: id as u32,
                    offset: e.offset,
                    len: e.len,
                    appended_s: (e.appended_ms / 1000) as u32,
                };
                self.index_recovered(stream, *disk_size, e.seq, loc, &name, &mut segment);
                report.records += 1;
            }
        } else {
            // Unsealed: scan entry by entry, checking every CRC.
            let mut offset = SEGMENT_HEADER_LEN;
            let mut stop: Option<String> = None;
            let mut buf = Vec::new();
            while offset < len {
                let mut prefix = [0u8; ENTRY_PREFIX_LEN];
                if offset + ENTRY_PREFIX_LEN as u64 > len {
                    stop = Some("incomplete entry".into());
                    break;
                }
                file.read_at(&mut prefix, offset)
                    .map_err(io_err(format!("reading {name}")))?;
                let head = match format::decode_entry_prefix(&prefix) {
                    Ok(h) => h,
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                };
                let total = (ENTRY_PREFIX_LEN + head.body_len) as u64;
                if offset + total > len {
                    stop = Some("incomplete entry".into());
                    break;
                }
                buf.resize(total as usize, 0);
                file.read_at(&mut buf, offset)
                    .map_err(io_err(format!("reading {name}")))?;
                match format::decode_entry(&buf) {
                    Ok(entry) => {
                        let loc = Loc {
                            segment: id as u32,
                            offset: offset as u32,
                            len: total as u32,
                            appended_s: (entry.appended_ms / 1000) as u32,
                        };
                        self.index_recovered(
                            &entry.stream,
                            entry.disk_size,
                            entry.record.seq(),
                            loc,
                            &name,
                            &mut segment,
                        );
                        report.records += 1;
                        offset += total;
                    }
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                }
            }
            if let Some(reason) = stop {
                if is_last {
                    tracing::warn!(file = %name, offset, "truncating torn tail of the cache: {reason}");
                    file.truncate(offset)
                        .map_err(io_err(format!("truncating {name}")))?;
                    file.sync().map_err(io_err(format!("syncing {name}")))?;
                    segment.len = offset;
                    report.torn_tail = Some((name.clone(), offset));
                } else {
                    let msg = format!(
                        "{name}: offset {offset}: {reason}; the rest of this segment is unreadable"
                    );
                    tracing::error!("cache corruption: {msg}");
                    report.corruption.push(msg);
                }
            }
        }
        // Whatever was recovered is never appended to again (a new active segment is
        // started), so it is as good as sealed: trimming may delete it once acknowledged.
        segment.sealed = true;
        self.used_bytes += segment.len;
        self.segments.insert(id, segment);
        Ok(())
    }

    fn index_recovered(
        &mut self,
        stream: &StreamId,
        disk_size: u64,
        seq: u64,
        loc: Loc,
        name: &str,
        segment: &mut Segment<S::File>,
    ) {
        if self
            .fences
            .get(stream)
            .is_some_and(|f| u64::from(loc.segment) < *f)
        {
            // From the path the stream moved away from: not this placement's records.
            return;
        }
        let s = self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| StreamIndex::new(disk_size, seq));
        if s.needs_resync.is_some() {
            return;
        }
        if seq != s.appended_seq + 1 {
            // Trimming is oldest-first per stream, so surviving records are contiguous:
            // a gap means records were lost (corruption, or a segment removed by hand).
            let reason = format!(
                "{name}: record {seq} follows {} (records lost)",
                s.appended_seq
            );
            tracing::error!(stream = %stream, "stream needs resync: {reason}");
            s.needs_resync = Some(reason);
            return;
        }
        if s.entries.back().map(|l| l.segment) != Some(loc.segment) {
            segment.holders += 1;
        }
        s.push(loc);
        s.durable_seq = seq;
        s.pending_bytes = 0;
        let m = segment.max_seq.entry(stream.clone()).or_insert(0);
        *m = (*m).max(seq);
    }

    fn start_segment(&mut self, id: u64) -> Result<(), CacheError> {
        let name = self.storage.describe(id);
        let file = self
            .storage
            .create(id)
            .map_err(io_err(format!("creating {name}")))?;
        file.write_at(&format::encode_segment_header(id, now_ms()), 0)
            .map_err(io_err(format!("writing {name}")))?;
        file.sync().map_err(io_err(format!("syncing {name}")))?;
        self.storage
            .sync_dir()
            .map_err(io_err("syncing the cache directory"))?;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: SEGMENT_HEADER_LEN,
                sealed: false,
                max_seq: HashMap::new(),
                holders: 0,
            },
        );
        self.used_bytes += SEGMENT_HEADER_LEN;
        self.active = id;
        self.footer = Footer::default();
        self.footer_refs.clear();
        Ok(())
    }

    /// Appends a record of `stream` (not yet durable: see [`Self::begin_commit`]).
    /// Sequence numbers must follow on from the stream's last one; the first record of
    /// a stream the cache does not know may start anywhere.
    pub fn append(
        &mut self,
        stream: &StreamId,
        disk_size: u64,
        record: &Record,
        now_ms: u64,
    ) -> Result<(), CacheError> {
        let seq = record.seq();
        if let Some(s) = self.streams.get(stream) {
            if seq != s.appended_seq + 1 {
                return Err(CacheError::OutOfOrder {
                    stream: stream.clone(),
                    last: s.appended_seq,
                    got: seq,
                });
            }
        }
        let entry_len = format::ENTRY_PREFIX_LEN
            + format::ENTRY_FIXED_BODY_LEN
            + stream.vm.len()
            + record.encoded_len();
        // Room for this entry, the active segment's whole footer once this entry and its
        // stream are listed in it, and the next segment's header: sealing never
        // overshoots the capacity.
        let new_stream = if self.footer_refs.contains_key(stream) {
            0
        } else {
            13 + stream.vm.len() as u64
        };
        let needed =
            entry_len as u64 + self.footer_len_estimate() + 28 + new_stream + SEGMENT_HEADER_LEN;
        if self.used_bytes + self.write_buf.len() as u64 + needed > self.config.capacity_bytes {
            return Err(CacheError::Full {
                used: self.used_bytes + self.write_buf.len() as u64,
                capacity: self.config.capacity_bytes,
                needed,
            });
        }
        let active = self
            .segments
            .get(&self.active)
            .expect("active segment exists");
        let offset = active.len + self.write_buf.len() as u64;
        let entry = CacheEntry {
            stream: stream.clone(),
            disk_size,
            appended_ms: now_ms,
            record: record.clone(),
        };
        let written = format::encode_entry(&entry, &mut self.write_buf);
        debug_assert_eq!(written, entry_len);
        let loc = Loc {
            segment: self.active as u32,
            offset: offset as u32,
            len: written as u32,
            appended_s: (now_ms / 1000) as u32,
        };
        let index = self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| StreamIndex::new(disk_size, seq));
        if index.entries.back().map(|l| l.segment) != Some(loc.segment) {
            if let Some(active) = self.segments.get_mut(&self.active) {
                active.holders += 1;
            }
        }
        // A stream with nothing pending is not in `dirty` yet (every entry has bytes;
        // commits and rollbacks zero `pending_bytes` as they drain `dirty`): O(1)
        // where searching `dirty` cost in proportion to the streams in the commit. An
        // ack or reset that zeroed it early can list a stream twice, which is harmless:
        // draining `dirty` does the same for a stream however often it is listed.
        let newly_dirty = index.pending_bytes == 0;
        index.push(loc);
        if newly_dirty {
            self.dirty.push(stream.clone());
        }
        let next_ref = self.footer_refs.len() as u32;
        let stream_ref = *self.footer_refs.entry(stream.clone()).or_insert_with(|| {
            self.footer.streams.push((stream.clone(), disk_size));
            next_ref
        });
        self.footer.entries.push(FooterEntry {
            stream_ref,
            seq,
            offset: offset as u32,
            len: written as u32,
            appended_ms: now_ms,
        });
        Ok(())
    }

    /// Bytes the active segment's footer and trailer take as they stand.
    fn footer_len_estimate(&self) -> u64 {
        let streams: u64 = self
            .footer
            .streams
            .iter()
            .map(|(id, _)| 13 + id.vm.len() as u64)
            .sum();
        8 + streams + 28 * self.footer.entries.len() as u64 + TRAILER_LEN
    }

    /// Takes the appended bytes for writing; run the returned commit's I/O (without
    /// holding any lock around the log) and hand the result to [`Self::finish_commit`].
    /// `None` when nothing was appended.
    pub fn begin_commit(&mut self) -> Option<PendingCommit<S::File>> {
        if self.write_buf.is_empty() {
            return None;
        }
        let active = self
            .segments
            .get(&self.active)
            .expect("active segment exists");
        self.commit_in_flight = true;
        Some(PendingCommit {
            file: active.file.clone(),
            offset: active.len,
            bytes: self.write_buf.split().freeze(),
        })
    }

    /// Completes a commit: on success the records are durable and the streams whose
    /// durable sequence advanced are returned; on failure every record not yet durable
    /// is dropped again (its senders must resend) and the error is returned.
    /// Seals the active segment when it is full.
    pub fn finish_commit(
        &mut self,
        commit: PendingCommit<S::File>,
        result: std::io::Result<()>,
    ) -> Result<Vec<(StreamId, u64)>, CacheError> {
        self.commit_in_flight = false;
        let name = self.storage.describe(self.active);
        if let Err(e) = result {
            self.rollback_undurable();
            // Best effort: cut the file back to what is known durable.
            let len = self.segments[&self.active].len;
            let _ = commit.file.truncate(len);
            return Err(CacheError::Io {
                what: format!("committing to {name}"),
                source: e,
            });
        }
        let active = self
            .segments
            .get_mut(&self.active)
            .expect("active segment exists");
        active.len += commit.bytes.len() as u64;
        self.used_bytes += commit.bytes.len() as u64;
        let mut advanced = Vec::new();
        for id in self.dirty.drain(..) {
            if let Some(s) = self.streams.get_mut(&id) {
                s.durable_seq = s.appended_seq;
                s.pending_bytes = 0;
                let m = active.max_seq.entry(id.clone()).or_insert(0);
                *m = (*m).max(s.durable_seq);
                advanced.push((id, s.durable_seq));
            }
        }
        if active.len >= self.config.segment_bytes {
            self.seal_and_roll()?;
        }
        Ok(advanced)
    }

    /// Appends and commits in one call (tests, tools).
    pub fn commit(&mut self) -> Result<Vec<(StreamId, u64)>, CacheError> {
        match self.begin_commit() {
            None => Ok(vec![]),
            Some(c) => {
                let r = c.run();
                self.finish_commit(c, r)
            }
        }
    }

    fn rollback_undurable(&mut self) {
        self.write_buf.clear();
        for id in self.dirty.drain(..) {
            if let Some(s) = self.streams.get_mut(&id) {
                while s.appended_seq > s.durable_seq {
                    if let Some(loc) = s.entries.pop_back() {
                        s.cached_bytes -= loc.len as u64;
                        if s.entries.back().map(|l| l.segment) != Some(loc.segment) {
                            release_holder(&mut self.segments, loc.segment);
                        }
                    }
                    s.appended_seq -= 1;
                }
                s.pending_bytes = 0;
            }
        }
        let active_len = self.segments[&self.active].len;
        self.footer
            .entries
            .retain(|e| (e.offset as u64) < active_len);
    }

    fn seal_and_roll(&mut self) -> Result<(), CacheError> {
        let id = self.active;
        let name = self.storage.describe(id);
        let seg = self.segments.get_mut(&id).expect("active segment exists");
        let footer = format::encode_footer(&self.footer, seg.len);
        seg.file
            .write_at(&footer, seg.len)
            .map_err(io_err(format!("sealing {name}")))?;
        seg.file.sync().map_err(io_err(format!("sealing {name}")))?;
        seg.len += footer.len() as u64;
        seg.sealed = true;
        self.used_bytes += footer.len() as u64;
        self.start_segment(id + 1)?;
        self.trim()?;
        Ok(())
    }

    /// Where a durable record is: `(file, offset, len)`; `None` if not cached.
    pub fn locate(&self, stream: &StreamId, seq: u64) -> Option<(Arc<S::File>, u64, u32)> {
        let s = self.streams.get(stream)?;
        if s.needs_resync.is_some() || seq < s.first_seq || seq > s.durable_seq {
            return None;
        }
        let loc = s.entries.get((seq - s.first_seq) as usize)?;
        let seg = self.segments.get(&(loc.segment as u64))?;
        Some((seg.file.clone(), loc.offset as u64, loc.len))
    }

    /// Reads a durable record back, checking its CRC and identity.
    pub fn read(&self, stream: &StreamId, seq: u64) -> Result<Option<Record>, CacheError> {
        match self.locate(stream, seq) {
            None => Ok(None),
            Some((file, offset, len)) => {
                read_entry(&*file, offset, len, stream, seq).map(|e| Some(e.record))
            }
        }
    }

    /// The master target holds everything of `stream` up to `seq`: free it. Returns
    /// the bytes freed by deleting segments.
    pub fn ack(&mut self, stream: &StreamId, seq: u64) -> Result<u64, CacheError> {
        let mut trim_due = false;
        if let Some(s) = self.streams.get_mut(stream) {
            if seq > s.acked_seq {
                s.acked_seq = seq;
                while s.first_seq <= seq {
                    let Some(loc) = s.entries.pop_front() else {
                        break;
                    };
                    s.cached_bytes -= loc.len as u64;
                    s.first_seq += 1;
                    // The stream's last record in that segment: it no longer holds it.
                    if s.entries.front().map(|l| l.segment) != Some(loc.segment) {
                        trim_due |= release_holder(&mut self.segments, loc.segment);
                    }
                }
                s.pending_bytes = s.pending_bytes.min(s.cached_bytes);
                if s.entries.is_empty() {
                    s.first_seq = seq + 1;
                }
                if s.appended_seq < seq {
                    // The master target is ahead of this cache (e.g. the VM moved
                    // between relays): the stream continues after what it holds.
                    s.appended_seq = seq;
                    s.durable_seq = seq;
                    trim_due = true;
                }
            }
        }
        if trim_due || std::mem::take(&mut self.trim_pending) {
            self.trim()
        } else {
            Ok(0)
        }
    }

    /// Gives up on forwarding `stream` from the cache (corruption): its records no
    /// longer hold segments back. It must be resynchronised from the source.
    pub fn drop_stream(&mut self, stream: &StreamId, reason: String) -> Result<u64, CacheError> {
        if let Some(s) = self.streams.get_mut(stream) {
            release_holders_of(&mut self.segments, &s.entries);
            s.entries.clear();
            s.cached_bytes = 0;
            s.pending_bytes = 0;
            s.acked_seq = s.appended_seq;
            s.first_seq = s.appended_seq + 1;
            s.needs_resync = Some(reason);
        }
        self.trim()
    }

    /// Forgets `stream` entirely, for good: its VM moved to another relay (the master
    /// target refused this relay's copy as stale), or moved here from another relay
    /// (whatever this cache held of it came by a path since superseded). The active
    /// segment is sealed first, so every record of the old path is in a segment older
    /// than the one returned: the caller keeps that fence durably and passes it to
    /// [`SegmentLog::open_fenced`], so a restart never brings those records back. The
    /// stream is then unknown (its next record may start anywhere). `Busy` while some
    /// of its records are not durable yet.
    pub fn retire_stream(&mut self, stream: &StreamId) -> Result<u64, CacheError> {
        // Sealing needs the active segment at rest: nothing appended and no commit
        // writing (the caller retries between two commits).
        if self.commit_in_flight || !self.write_buf.is_empty() {
            return Err(CacheError::Busy {
                stream: stream.clone(),
            });
        }
        let active_len = self.segments.get(&self.active).map_or(0, |s| s.len);
        if active_len > SEGMENT_HEADER_LEN {
            self.seal_and_roll()?;
        }
        if let Some(s) = self.streams.remove(stream) {
            release_holders_of(&mut self.segments, &s.entries);
        }
        for seg in self.segments.values_mut() {
            seg.max_seq.remove(stream);
        }
        self.fences.insert(stream.clone(), self.active);
        self.trim()?;
        Ok(self.active)
    }

    /// Forgets `stream`'s records and makes it continue at `next_seq` (where the master
    /// target stands): after corruption, once the source has been asked for a resync
    /// that replaces what was lost. Appends of the old numbering are refused from here
    /// on (out of order).
    pub fn reset_stream(&mut self, stream: &StreamId, next_seq: u64) -> Result<u64, CacheError> {
        if let Some(s) = self.streams.get_mut(stream) {
            let last = next_seq.max(1) - 1;
            release_holders_of(&mut self.segments, &s.entries);
            s.entries.clear();
            s.cached_bytes = 0;
            s.pending_bytes = 0;
            s.first_seq = last + 1;
            s.appended_seq = last;
            s.durable_seq = last;
            s.acked_seq = last;
            s.needs_resync = None;
        }
        self.trim()
    }

    /// Deletes sealed segments whose records are all acknowledged, oldest first per
    /// stream: a segment is kept while an older segment still holds records of any of its
    /// streams. So the records of a stream that survive are always the newest ones, and
    /// after a restart the cache's idea of where each stream ends is exact (or the
    /// stream is unknown, and the master target says where it stands). Returns bytes
    /// freed.
    pub fn trim(&mut self) -> Result<u64, CacheError> {
        let mut freed = 0;
        let mut removable = Vec::new();
        let mut held_back: std::collections::HashSet<&StreamId> = std::collections::HashSet::new();
        for (id, seg) in &self.segments {
            let deletable = *id != self.active
                && seg.sealed
                && seg.max_seq.iter().all(|(stream, max)| {
                    !held_back.contains(stream)
                        && self.streams.get(stream).is_none_or(|s| *max <= s.acked_seq)
                });
            if deletable {
                removable.push(*id);
            } else {
                held_back.extend(seg.max_seq.keys());
            }
        }
        for id in &removable {
            self.storage
                .remove(*id)
                .map_err(io_err(format!("removing {}", self.storage.describe(*id))))?;
            let seg = self.segments.remove(id).expect("listed above");
            self.used_bytes -= seg.len;
            freed += seg.len;
        }
        if !removable.is_empty() {
            self.storage
                .sync_dir()
                .map_err(io_err("syncing the cache directory"))?;
        }
        Ok(freed)
    }

    /// Bytes of segment files in use.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes
    }

    /// Accounting of one stream. O(1): the relay reads it on every scrape and health
    /// evaluation.
    pub fn stream_stats(&self, stream: &StreamId) -> Option<StreamStats> {
        self.streams.get(stream).map(Self::stats_of)
    }

    /// Accounting of every stream the cache knows, sorted by stream.
    pub fn all_stream_stats(&self) -> Vec<(StreamId, StreamStats)> {
        let mut v: Vec<_> = self
            .streams
            .iter()
            .map(|(id, s)| (id.clone(), Self::stats_of(s)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn stats_of(s: &StreamIndex) -> StreamStats {
        let has_durable_backlog = s.durable_seq >= s.first_seq && !s.entries.is_empty();
        // The incremental sums must agree with the index (checked in every debug build,
        // so the model-based tests exercise it after every step).
        debug_assert_eq!(
            s.cached_bytes - s.pending_bytes,
            s.entries
                .iter()
                .take((s.durable_seq + 1).saturating_sub(s.first_seq) as usize)
                .map(|l| l.len as u64)
                .sum::<u64>()
        );
        StreamStats {
            disk_size: s.disk_size,
            durable_seq: s.durable_seq,
            acked_seq: s.acked_seq,
            first_cached_seq: s.first_seq,
            backlog_bytes: s.cached_bytes - s.pending_bytes,
            oldest_unacked_s: has_durable_backlog
                .then(|| s.entries.front().map(|l| l.appended_s as u64))
                .flatten(),
            needs_resync: s.needs_resync.clone(),
        }
    }

    /// Every stream the cache knows, with its disk size.
    pub fn streams(&self) -> Vec<(StreamId, u64)> {
        let mut v: Vec<_> = self
            .streams
            .iter()
            .map(|(id, s)| (id.clone(), s.disk_size))
            .collect();
        v.sort();
        v
    }

    /// Segments currently on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn read_footer<F: SegmentFile>(file: &F, len: u64) -> Option<Footer> {
    if len < SEGMENT_HEADER_LEN + TRAILER_LEN {
        return None;
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_at(&mut trailer, len - TRAILER_LEN).ok()?;
    let (offset, flen, crc) = format::decode_trailer(&trailer)?;
    if offset < SEGMENT_HEADER_LEN || offset + flen as u64 + TRAILER_LEN != len {
        return None;
    }
    let mut body = vec![0u8; flen as usize];
    file.read_at(&mut body, offset).ok()?;
    if crc32c::crc32c(&body) != crc {
        return None;
    }
    format::decode_footer(&body).ok()
}

/// Reads and checks one entry: CRC, stream and sequence number must match.
pub fn read_entry<F: SegmentFile>(
    file: &F,
    offset: u64,
    len: u32,
    stream: &StreamId,
    seq: u64,
) -> Result<CacheEntry, CacheError> {
    let mut buf = vec![0u8; len as usize];
    file.read_at(&mut buf, offset)
        .map_err(io_err(format!("reading cached record {seq} of {stream}")))?;
    let where_ = format!("{stream} record {seq} at offset {offset}");
    let entry = format::decode_entry(&buf).map_err(|reason| CacheError::Corrupt {
        where_: where_.clone(),
        reason,
    })?;
    if &entry.stream != stream || entry.record.seq() != seq {
        return Err(CacheError::Corrupt {
            where_,
            reason: format!(
                "entry belongs to {} record {}",
                entry.stream,
                entry.record.seq()
            ),
        });
    }
    Ok(entry)
}
