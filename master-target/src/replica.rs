//! One replicated disk at the master target: its image, its journal, its high-water mark.
//!
//! ## Durability protocol (write-ahead)
//! 1. A batch of validated records is appended to the journal and `fdatasync`ed.
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
    self, apply_record, encode_entry, ImageSink, JournalReader, JOURNAL_HEADER_LEN,
};
use crate::store::{DiskCheckpoint, ReplicaIndex, StoreError, TagLanding};
use crate::sync::SyncState;

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
        if journal_len < JOURNAL_HEADER_LEN {
            // New (or torn before its header was complete, which means empty).
            journal.truncate(0).map_err(io_err(&journal_name))?;
            journal
                .write_at(&journal::encode_header(), 0)
                .map_err(io_err(&journal_name))?;
            journal.sync().map_err(io_err(&journal_name))?;
            files.sync_dir(id).map_err(io_err(&journal_name))?;
            journal_len = JOURNAL_HEADER_LEN;
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
        Ok(replica)
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
        for r in records {
            debug_assert!(r.seq() > prev, "caller validates order");
            prev = r.seq();
            // entry = len u32 | crc u32 | frame header (8) | seq u64 | offset u64 | data
            payloads.push(self.journal_len + self.encode_buf.len() as u64 + 32);
            encode_entry(r, &mut self.encode_buf);
            ends.push(self.journal_len + self.encode_buf.len() as u64);
        }
        self.journal
            .write_at(&self.encode_buf, self.journal_len)
            .map_err(io_err(&self.journal_name))?;
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
        self.journal_len += self.encode_buf.len() as u64;
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
