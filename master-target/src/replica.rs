//! One replicated disk at the master target: its image, its journal, its high-water mark.
//!
//! ## Durability protocol (write-ahead)
//! 1. A batch of validated records is appended to the journal and `fdatasync`ed, each
//!    `Write` and `Zero` preceded by its before-image (undo entries, read from the image
//!    before the batch, with the batch's earlier records laid over it): one sync covers
//!    both, and the image is never changed before what it held is durable.
//! 2. Tags in the batch are committed to the index durably.
//! 3. Only then is the batch acknowledged (the caller does that).
//! 4. The records are applied to the sparse image file in place (page cache).
//! 5. At a checkpoint the image is `fdatasync`ed, then the index records
//!    `(journal offset, seq)` as flushed.
//!
//! Recovery ([`DiskReplica::open`]) re-applies every journal entry after the checkpoint to
//! the image (re-applying a contiguous suffix of absolute-offset writes in order is
//! idempotent), truncates a torn tail with a warning naming file and offset, re-indexes
//! any tags found, syncs the journal (what a killed process left in the page cache is
//! not durable yet, and a checkpoint must never claim more than the journal holds
//! durably), and takes a fresh checkpoint. The high-water mark is the last valid journal
//! entry's sequence number, so a replay from the relay after a crash is recognised and
//! skipped: records are applied exactly once in effect.
//!
//! Files are reached through [`ReplicaFiles`] and the index through [`ReplicaIndex`], so
//! `tests/model.rs` runs this code on memory with crashes and injected faults.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fbr_protocol::{Record, StreamId};
use fbr_storage::DurableFile;

use crate::files::{ReplicaFiles, IMAGE_FILE, JOURNAL_FILE};
use crate::journal::{
    self, apply_record, encode_entry, encode_undo, record_range, ImageSink, JournalReader,
    JOURNAL_HEADER_LEN, JOURNAL_VERSION, MAX_UNDO_CHUNK,
};
use crate::rollback::{self, RollbackError, RollbackStop, RolledBack};
use crate::store::{DiskCheckpoint, ReplicaIndex, RollbackTarget, StoreError, TagLanding};
use crate::sync::SyncState;

/// A batch's journal bytes are written out (not yet synced) once this many are
/// buffered, so a batch of large before-images stays bounded in memory.
const JOURNAL_WRITE_CHUNK: usize = 8 << 20;

/// Take a checkpoint after this many journal bytes...
const CHECKPOINT_BYTES: u64 = 512 << 20;
/// ...or this long, whichever comes first.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Why a replica could not be opened or updated.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("disk {id} has size {on_record} on record, the sender says {announced}")]
    DiskSizeMismatch {
        id: StreamId,
        on_record: u64,
        announced: u64,
    },
    #[error("{file}: {source}")]
    Io { file: String, source: io::Error },
    #[error("{0}")]
    Journal(#[from] journal::JournalError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{file}: corrupt journal: {reason}")]
    Corrupt { file: String, reason: String },
    #[error("{0}")]
    Rollback(#[from] RollbackError),
}

/// A disk image file as an [`ImageSink`]; zeroing punches holes where the file system
/// supports it ([`DurableFile::zero_range`]), so trims keep the image sparse.
#[derive(Debug)]
pub struct FileImage<'a, F = File>(pub &'a F);

impl<F: DurableFile> ImageSink for FileImage<'_, F> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.0.zero_range(offset, len)
    }
}

/// An open, recovered replica of one source disk.
#[derive(Debug)]
pub struct DiskReplica<F = File> {
    pub id: StreamId,
    pub disk_size: u64,
    journal_name: String,
    image_name: String,
    image: F,
    /// Shared with the content index, which reads referenced blocks from it.
    journal: Arc<F>,
    journal_len: u64,
    hwm: u64,
    /// Whether tags landing now are recovery points (stale, resyncing, ...).
    sync: SyncState,
    checkpoint: DiskCheckpoint,
    last_checkpoint_at: Instant,
    encode_buf: BytesMut,
}

/// An I/O error on the file named `file`.
fn io_err(file: &str) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io {
        file: file.to_owned(),
        source,
    }
}

impl<F: DurableFile> DiskReplica<F> {
    /// Opens (creating if new) and recovers the replica of `id`.
    pub fn open<S: ReplicaFiles<File = F>>(
        files: &S,
        index: &impl ReplicaIndex,
        id: &StreamId,
        disk_size: u64,
    ) -> Result<Self, ReplicaError> {
        let image_name = files.describe(id, IMAGE_FILE);
        let journal_name = files.describe(id, JOURNAL_FILE);
        let existing = index.checkpoint(id)?;
        if let Some(c) = existing {
            if c.disk_size != disk_size {
                return Err(ReplicaError::DiskSizeMismatch {
                    id: id.clone(),
                    on_record: c.disk_size,
                    announced: disk_size,
                });
            }
        }
        let image = files.open(id, IMAGE_FILE).map_err(io_err(&image_name))?;
        if image.size().map_err(io_err(&image_name))? != disk_size {
            image.truncate(disk_size).map_err(io_err(&image_name))?;
        }
        let journal = files
            .open(id, JOURNAL_FILE)
            .map_err(io_err(&journal_name))?;
        let mut journal_len = journal.size().map_err(io_err(&journal_name))?;
        let new_journal = journal_len < JOURNAL_HEADER_LEN;
        if new_journal {
            // New (or torn before its header was complete, which means empty).
            journal.truncate(0).map_err(io_err(&journal_name))?;
            journal
                .write_at(&journal::encode_header(), 0)
                .map_err(io_err(&journal_name))?;
            journal.sync().map_err(io_err(&journal_name))?;
            journal_len = JOURNAL_HEADER_LEN;
        } else {
            upgrade_header(&journal, &journal_name)?;
        }
        // A journal made just now, or files the index does not know yet (a process
        // killed after creating them may not have synced their directories).
        if new_journal || existing.is_none() {
            files.sync_dir(id).map_err(io_err(&journal_name))?;
        }
        let checkpoint = existing.unwrap_or(DiskCheckpoint {
            disk_size,
            journal_offset: JOURNAL_HEADER_LEN,
            seq: 0,
            sync: SyncState::Consistent,
        });
        if journal_len < checkpoint.journal_offset {
            return Err(ReplicaError::Corrupt {
                file: journal_name,
                reason: format!(
                    "{journal_len} bytes long, but its checkpoint is at offset {}",
                    checkpoint.journal_offset
                ),
            });
        }

        // Recovery: re-apply everything after the checkpoint.
        let journal = Arc::new(journal);
        let mut reader = JournalReader::new(
            journal.clone(),
            journal_name.clone(),
            checkpoint.journal_offset,
        )?;
        let mut hwm = checkpoint.seq;
        let mut sync = checkpoint.sync;
        let mut tags = Vec::new();
        let mut sink = FileImage(&image);
        while let Some((record, end)) = reader.next_record()? {
            if record.seq() <= hwm {
                return Err(ReplicaError::Corrupt {
                    file: journal_name.clone(),
                    reason: format!(
                        "sequence {} follows {hwm} before offset {end}",
                        record.seq()
                    ),
                });
            }
            apply_record(&record, &mut sink).map_err(io_err(&image_name))?;
            let consistent = sync.follow(&record);
            if let Some(t) = landing(id, &record, end, consistent) {
                tags.push(t);
            }
            hwm = record.seq();
        }
        let valid_end = reader.offset();
        if let Some(damage) = reader.damage() {
            tracing::warn!(
                file = %journal_name,
                offset = damage.offset(),
                "truncating journal: {damage}"
            );
        }
        if valid_end != journal_len {
            journal.truncate(valid_end).map_err(io_err(&journal_name))?;
            journal_len = valid_end;
        }
        // Entries past the checkpoint, and a truncation, may live only in the page
        // cache (a killed process wrote them): make them durable before a checkpoint
        // or an acknowledgement counts on them.
        if valid_end != checkpoint.journal_offset || hwm != checkpoint.seq {
            journal.sync().map_err(io_err(&journal_name))?;
        }
        let mut replica = DiskReplica {
            id: id.clone(),
            disk_size,
            journal_name,
            image_name,
            image,
            journal,
            journal_len,
            hwm,
            sync,
            checkpoint,
            last_checkpoint_at: Instant::now(),
            encode_buf: BytesMut::new(),
        };
        replica.take_checkpoint(index, &tags)?;
        if let Some(target) = index.rollback_target(id)? {
            // Recovery brought the image to the journal's end; the rollback a crash
            // interrupted goes from there (see crate::rollback).
            tracing::warn!(disk = %id, ?target, "completing an interrupted rollback");
            replica.roll_back_until(index, target, RollbackStop::Never)?;
        }
        Ok(replica)
    }

    /// Rolls the image back in place to the point whose tag ends at
    /// `target.journal_end` (a recovery point of this disk; the caller checks that),
    /// in time proportional to what changed since: see [`crate::rollback`]. Crash-safe:
    /// opening the replica again completes an interrupted rollback.
    pub fn roll_back(
        &mut self,
        index: &impl ReplicaIndex,
        target: RollbackTarget,
    ) -> Result<RolledBack, ReplicaError> {
        self.roll_back_until(index, target, RollbackStop::Never)
    }

    /// [`Self::roll_back`], stopping where `stop` says (tests: a kill -9 there).
    #[doc(hidden)]
    pub fn roll_back_until(
        &mut self,
        index: &impl ReplicaIndex,
        target: RollbackTarget,
        stop: RollbackStop,
    ) -> Result<RolledBack, ReplicaError> {
        // Checked before anything changes: every record past the point can be undone.
        let plan = rollback::plan(self.journal.clone(), &self.journal_name, target.journal_end)?;
        self.roll_back_planned(index, target, plan, stop)
    }

    /// [`Self::roll_back_until`] with the journal past the point already checked
    /// (`plan`, from [`rollback::plan`] on this replica as it is now).
    pub fn roll_back_planned(
        &mut self,
        index: &impl ReplicaIndex,
        target: RollbackTarget,
        plan: rollback::UndoPlan,
        stop: RollbackStop,
    ) -> Result<RolledBack, ReplicaError> {
        let done = RolledBack {
            records_undone: plan.records,
            undo_entries: plan.entries(),
            restored_bytes: plan.restored_bytes,
            put_back_bytes: plan.put_back_bytes,
            journal_bytes_cut: self.journal_len - target.journal_end,
        };
        index.set_rollback_target(&self.id, Some(target))?;
        if stop == RollbackStop::Recorded {
            return Ok(done);
        }
        let limit = match stop {
            RollbackStop::PutBack(n) => n,
            _ => usize::MAX,
        };
        rollback::put_back(
            &*self.journal,
            &self.journal_name,
            &plan,
            &self.image,
            limit,
        )?;
        if matches!(stop, RollbackStop::PutBack(_)) {
            return Ok(done);
        }
        self.image.sync().map_err(io_err(&self.image_name))?;
        // At a recovery point the disk is in step.
        let checkpoint = DiskCheckpoint {
            disk_size: self.disk_size,
            journal_offset: target.journal_end,
            seq: target.seq,
            sync: SyncState::Consistent,
        };
        index.roll_back_index(&self.id, checkpoint)?;
        if stop == RollbackStop::IndexRolledBack {
            return Ok(done);
        }
        self.journal
            .truncate(target.journal_end)
            .map_err(io_err(&self.journal_name))?;
        self.journal.sync().map_err(io_err(&self.journal_name))?;
        if stop == RollbackStop::Truncated {
            return Ok(done);
        }
        index.set_rollback_target(&self.id, None)?;
        self.journal_len = target.journal_end;
        self.hwm = target.seq;
        self.sync = SyncState::Consistent;
        self.checkpoint = checkpoint;
        self.last_checkpoint_at = Instant::now();
        Ok(done)
    }

    /// The highest sequence number durably held.
    pub fn hwm(&self) -> u64 {
        self.hwm
    }

    /// Whether the replica is in step, stale or resyncing (as of [`Self::hwm`]).
    pub fn sync_state(&self) -> SyncState {
        self.sync
    }

    /// Durably appends `records` (validated by the caller: sequence numbers increasing
    /// from `hwm + 1`, skipping only what the relay coalesced away; in bounds) and
    /// applies them. When this returns `Ok`, they may be acknowledged. Returns, per
    /// record, the journal offset where its payload bytes start (for the content index).
    ///
    /// After an error the replica must be dropped and opened again (recovery decides
    /// what of the batch is held).
    pub fn apply_batch(
        &mut self,
        index: &impl ReplicaIndex,
        records: &[Record],
    ) -> Result<Vec<u64>, ReplicaError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.encode_buf.clear();
        let mut tags = Vec::new();
        let mut ends = Vec::with_capacity(records.len());
        let mut payloads = Vec::with_capacity(records.len());
        let mut prev = self.hwm;
        // Journal bytes of this batch already written (not synced) to bound memory.
        let mut flushed = 0u64;
        let mut before = BeforeImages::default();
        for (i, r) in records.iter().enumerate() {
            debug_assert!(r.seq() > prev, "caller validates order");
            prev = r.seq();
            if let Some(range) = record_range(r) {
                before
                    .encode(
                        &self.image,
                        &records[..i],
                        r.seq(),
                        range,
                        &mut self.encode_buf,
                    )
                    .map_err(io_err(&self.image_name))?;
            }
            // entry = len u32 | crc u32 | frame header (8) | seq u64 | offset u64 | data
            let at = self.journal_len + flushed + self.encode_buf.len() as u64;
            payloads.push(at + 32);
            encode_entry(r, &mut self.encode_buf);
            ends.push(self.journal_len + flushed + self.encode_buf.len() as u64);
            if self.encode_buf.len() >= JOURNAL_WRITE_CHUNK {
                self.journal
                    .write_at(&self.encode_buf, self.journal_len + flushed)
                    .map_err(io_err(&self.journal_name))?;
                flushed += self.encode_buf.len() as u64;
                self.encode_buf.clear();
            }
        }
        self.journal
            .write_at(&self.encode_buf, self.journal_len + flushed)
            .map_err(io_err(&self.journal_name))?;
        let batch_len = flushed + self.encode_buf.len() as u64;
        self.journal.sync().map_err(io_err(&self.journal_name))?;
        let mut sync = self.sync;
        for (r, end) in records.iter().zip(ends) {
            let consistent = sync.follow(r);
            if let Some(t) = landing(&self.id, r, end, consistent) {
                tags.push(t);
            }
        }
        if !tags.is_empty() {
            index.commit(&self.id, None, &tags)?;
        }
        self.sync = sync;
        self.journal_len += batch_len;
        self.hwm = records.last().map(Record::seq).unwrap_or(self.hwm);
        let mut sink = FileImage(&self.image);
        for r in records {
            apply_record(r, &mut sink).map_err(io_err(&self.image_name))?;
        }
        if self.journal_len - self.checkpoint.journal_offset >= CHECKPOINT_BYTES
            || self.last_checkpoint_at.elapsed() >= CHECKPOINT_INTERVAL
        {
            self.take_checkpoint(index, &[])?;
        }
        Ok(payloads)
    }

    /// The journal file (the content index reads referenced blocks from it).
    pub fn journal(&self) -> &Arc<F> {
        &self.journal
    }

    /// The image file (the latest state of the disk).
    pub fn image(&self) -> &F {
        &self.image
    }

    /// Flushes the image and records that the journal up to here is applied.
    pub fn take_checkpoint(
        &mut self,
        index: &impl ReplicaIndex,
        tags: &[TagLanding],
    ) -> Result<(), ReplicaError> {
        self.image.sync().map_err(io_err(&self.image_name))?;
        let c = DiskCheckpoint {
            disk_size: self.disk_size,
            journal_offset: self.journal_len,
            seq: self.hwm,
            sync: self.sync,
        };
        index.commit(&self.id, Some(c), tags)?;
        self.checkpoint = c;
        self.last_checkpoint_at = Instant::now();
        Ok(())
    }
}

/// How a snapshot of an image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    /// A reflink clone (`FICLONE`: XFS, Btrfs): extents shared, copy-on-write, instant.
    Reflink,
    /// A sparse copy (the file system cannot clone): holes and zero runs skipped, every
    /// data block read and written once.
    SparseCopy,
}

impl DiskReplica<File> {
    /// Copies the image, as it is now (a batch boundary: the state at the journal's
    /// end), to a new file `dest`, and returns that journal offset. A reflink clone where
    /// the file system supports it, else a sparse copy. `dest` is synced.
    pub fn snapshot_image(&self, dest: &std::path::Path) -> io::Result<(u64, CopyMethod)> {
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dest)?;
        let method = match rustix::fs::ioctl_ficlone(&out, &self.image) {
            Ok(()) => CopyMethod::Reflink,
            Err(_) => {
                // Refuse up front rather than fill the file system the replicas live on.
                use std::os::unix::fs::MetadataExt;
                let need = self.image.metadata()?.blocks() * 512;
                let fs = rustix::fs::fstatvfs(&out)?;
                let free = fs.f_bavail.saturating_mul(fs.f_frsize);
                if need > free {
                    return Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        format!(
                            "a sparse copy of {} needs {need} bytes, and {free} are free (a file system with reflinks, XFS or Btrfs, needs next to none)",
                            self.image_name
                        ),
                    ));
                }
                sparse_copy(&self.image, &out, self.disk_size)?;
                CopyMethod::SparseCopy
            }
        };
        out.sync_all()?;
        Ok((self.journal_len, method))
    }
}

/// Copies `len` bytes of `from` to `to`, leaving holes where `from` has holes or zeros.
pub fn sparse_copy(from: &File, to: &File, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    to.set_len(len)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK);
        if !from.is_hole(at, n) {
            let b = &mut buf[..n as usize];
            DurableFile::read_at(from, b, at)?;
            if b.iter().any(|&x| x != 0) {
                DurableFile::write_at(to, b, at)?;
            }
        }
        at += n;
    }
    Ok(())
}

/// Rewrites a version 1 journal's header as version 2 (its entries are valid version 2
/// entries; only records journaled from now on have before-images). Synced at once.
fn upgrade_header<F: DurableFile>(journal: &F, name: &str) -> Result<(), ReplicaError> {
    let mut version = [0u8; 4];
    journal.read_at(&mut version, 8).map_err(io_err(name))?;
    let version = u32::from_le_bytes(version);
    if (journal::OLDEST_JOURNAL_VERSION..JOURNAL_VERSION).contains(&version) {
        tracing::info!(file = %name, "journal format {version} upgraded to {JOURNAL_VERSION}: records from here on keep before-images");
        journal
            .write_at(&JOURNAL_VERSION.to_le_bytes(), 8)
            .map_err(io_err(name))?;
        journal.sync().map_err(io_err(name))?;
    }
    Ok(())
}

/// Builds each record's before-image for a batch: the image as it is before the batch
/// (nothing of the batch is applied until its journal is durable), with the batch's
/// earlier records laid over the ranges they touched.
#[derive(Debug, Default)]
struct BeforeImages {
    /// Ranges the batch's earlier records changed, merged: start -> end.
    changed: std::collections::BTreeMap<u64, u64>,
    chunk: Vec<u8>,
}

impl BeforeImages {
    /// Appends the undo entries of record `seq` (changing `range`) to `out` and notes the
    /// range as changed for the records after it.
    fn encode<F: DurableFile>(
        &mut self,
        image: &F,
        earlier: &[Record],
        seq: u64,
        (offset, len): (u64, u64),
        out: &mut BytesMut,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_UNDO_CHUNK as u64);
            let overlaps = self.overlaps(at, at + n);
            if !overlaps && image.is_hole(at, n) {
                // Never written (or trimmed): zeros, known without reading.
                encode_undo(seq, at, n, None, out);
                at += n;
                continue;
            }
            self.chunk.resize(n as usize, 0);
            image.read_at(&mut self.chunk, at)?;
            if overlaps {
                for r in earlier {
                    overlay(r, at, &mut self.chunk);
                }
            }
            let data = self
                .chunk
                .iter()
                .any(|&b| b != 0)
                .then_some(&self.chunk[..]);
            encode_undo(seq, at, n, data, out);
            at += n;
        }
        self.note(offset, end);
        Ok(())
    }

    /// Whether `start..end` meets a range an earlier record of the batch changed.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.changed
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn note(&mut self, mut start: u64, mut end: u64) {
        // Merge with every range it touches.
        let touching: Vec<(u64, u64)> = self
            .changed
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.changed.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.changed.insert(start, end);
    }
}

/// Lays what `record` wrote over `chunk`, which holds the image from `chunk_at` on.
fn overlay(record: &Record, chunk_at: u64, chunk: &mut [u8]) {
    let Some((offset, len)) = record_range(record) else {
        return;
    };
    let chunk_end = chunk_at + chunk.len() as u64;
    let (from, to) = (offset.max(chunk_at), (offset + len).min(chunk_end));
    if from >= to {
        return;
    }
    let dst = &mut chunk[(from - chunk_at) as usize..(to - chunk_at) as usize];
    match record {
        Record::Write { data, .. } => {
            dst.copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize])
        }
        _ => dst.fill(0),
    }
}

/// The landing of `record` if it is a tag (`consistent`: whether it is a recovery point
/// of this disk, from [`SyncState::follow`]).
fn landing(
    id: &StreamId,
    record: &Record,
    journal_end: u64,
    consistent: Option<bool>,
) -> Option<TagLanding> {
    match record {
        Record::Tag {
            seq,
            id: tag_id,
            kind,
            members,
            group,
        } => Some(TagLanding {
            group: group.clone(),
            id: *tag_id,
            stream: id.clone(),
            seq: *seq,
            kind: *kind,
            members: *members,
            journal_end,
            consistent: consistent.unwrap_or(true),
            landed_at_ms: unix_ms(std::time::SystemTime::now()),
        }),
        _ => None,
    }
}

/// Milliseconds since the UNIX epoch (0 for a clock set before it).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
