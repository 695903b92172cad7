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
//! any tags found, and takes a fresh checkpoint. The high-water mark is the last valid
//! journal entry's sequence number, so a replay from the relay after a crash is
//! recognised and skipped: records are applied exactly once in effect.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fbr_protocol::{Record, StreamId};

use crate::journal::{
    self, apply_record, encode_entry, ImageSink, JournalReader, JOURNAL_HEADER_LEN,
};
use crate::store::{DiskCheckpoint, Store, StoreError, TagLanding};

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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Journal(#[from] journal::JournalError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{path}: corrupt journal: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Where a disk's files live under the data directory.
pub fn disk_dir(data_dir: &Path, id: &StreamId) -> PathBuf {
    data_dir
        .join("disks")
        .join(&id.vm)
        .join(format!("disk{}", id.disk))
}
pub fn image_path(data_dir: &Path, id: &StreamId) -> PathBuf {
    disk_dir(data_dir, id).join("image.raw")
}
pub fn journal_path(data_dir: &Path, id: &StreamId) -> PathBuf {
    disk_dir(data_dir, id).join("journal.fbrj")
}

/// A disk image file as an [`ImageSink`]; zeroing punches holes where the file system
/// supports it, so trims keep the image sparse.
#[derive(Debug)]
pub struct FileImage<'a>(pub &'a File);

impl ImageSink for FileImage<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if fallocate(
            self.0,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
        {
            return Ok(());
        }
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// An open, recovered replica of one source disk.
#[derive(Debug)]
pub struct DiskReplica {
    pub id: StreamId,
    pub disk_size: u64,
    journal_path: PathBuf,
    image_path: PathBuf,
    image: File,
    journal: File,
    journal_len: u64,
    hwm: u64,
    checkpoint: DiskCheckpoint,
    last_checkpoint_at: Instant,
    encode_buf: BytesMut,
}

impl DiskReplica {
    /// Opens (creating if new) and recovers the replica of `id`.
    pub fn open(
        data_dir: &Path,
        store: &Store,
        id: &StreamId,
        disk_size: u64,
    ) -> Result<Self, ReplicaError> {
        let dir = disk_dir(data_dir, id);
        let image_path = image_path(data_dir, id);
        let journal_path = journal_path(data_dir, id);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ReplicaError::Io { path, source }
        };
        let existing = store.checkpoint(id)?;
        if let Some(c) = existing {
            if c.disk_size != disk_size {
                return Err(ReplicaError::DiskSizeMismatch {
                    id: id.clone(),
                    on_record: c.disk_size,
                    announced: disk_size,
                });
            }
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&image_path)
            .map_err(io_err(&image_path))?;
        if image.metadata().map_err(io_err(&image_path))?.len() != disk_size {
            image.set_len(disk_size).map_err(io_err(&image_path))?;
        }
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)
            .map_err(io_err(&journal_path))?;
        let mut journal_len = journal.metadata().map_err(io_err(&journal_path))?.len();
        if journal_len < JOURNAL_HEADER_LEN {
            // New (or torn before its header was complete, which means empty).
            journal.set_len(0).map_err(io_err(&journal_path))?;
            journal
                .write_all_at(&journal::encode_header(), 0)
                .map_err(io_err(&journal_path))?;
            journal.sync_all().map_err(io_err(&journal_path))?;
            if let Some(parent) = journal_path.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(parent))?;
            }
            journal_len = JOURNAL_HEADER_LEN;
        }
        let checkpoint = existing.unwrap_or(DiskCheckpoint {
            disk_size,
            journal_offset: JOURNAL_HEADER_LEN,
            seq: 0,
        });

        // Recovery: re-apply everything after the checkpoint.
        let mut reader = JournalReader::open(&journal_path, checkpoint.journal_offset)?;
        let mut hwm = checkpoint.seq;
        let mut tags = Vec::new();
        let mut sink = FileImage(&image);
        while let Some((record, end)) = reader.next_record()? {
            if record.seq() <= hwm {
                return Err(ReplicaError::Corrupt {
                    path: journal_path.clone(),
                    reason: format!(
                        "sequence {} follows {hwm} before offset {end}",
                        record.seq()
                    ),
                });
            }
            apply_record(&record, &mut sink).map_err(io_err(&image_path))?;
            if let Some(t) = landing(id, &record, end) {
                tags.push(t);
            }
            hwm = record.seq();
        }
        let valid_end = reader.offset();
        if let Some(damage) = reader.damage() {
            tracing::warn!(
                file = %journal_path.display(),
                offset = damage.offset(),
                "truncating journal: {damage}"
            );
        }
        if valid_end != journal_len {
            journal.set_len(valid_end).map_err(io_err(&journal_path))?;
            journal_len = valid_end;
        }
        let mut replica = DiskReplica {
            id: id.clone(),
            disk_size,
            journal_path,
            image_path,
            image,
            journal,
            journal_len,
            hwm,
            checkpoint,
            last_checkpoint_at: Instant::now(),
            encode_buf: BytesMut::new(),
        };
        replica.take_checkpoint(store, &tags)?;
        Ok(replica)
    }

    /// The highest sequence number durably held.
    pub fn hwm(&self) -> u64 {
        self.hwm
    }

    /// Durably appends `records` (validated by the caller: sequence numbers increasing
    /// from `hwm + 1`, skipping only what the relay coalesced away; in bounds) and
    /// applies them. When this returns `Ok`, they may be acknowledged. Returns, per
    /// record, the journal offset where its payload bytes start (for the content index).
    pub fn apply_batch(
        &mut self,
        store: &Store,
        records: &[Record],
    ) -> Result<Vec<u64>, ReplicaError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ReplicaError::Io { path, source }
        };
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
            .write_all_at(&self.encode_buf, self.journal_len)
            .map_err(io_err(&self.journal_path))?;
        self.journal
            .sync_data()
            .map_err(io_err(&self.journal_path))?;
        for (r, end) in records.iter().zip(ends) {
            if let Some(t) = landing(&self.id, r, end) {
                tags.push(t);
            }
        }
        if !tags.is_empty() {
            store.commit(&self.id, None, &tags)?;
        }
        self.journal_len += self.encode_buf.len() as u64;
        self.hwm = records.last().map(Record::seq).unwrap_or(self.hwm);
        let mut sink = FileImage(&self.image);
        for r in records {
            apply_record(r, &mut sink).map_err(io_err(&self.image_path))?;
        }
        if self.journal_len - self.checkpoint.journal_offset >= CHECKPOINT_BYTES
            || self.last_checkpoint_at.elapsed() >= CHECKPOINT_INTERVAL
        {
            self.take_checkpoint(store, &[])?;
        }
        Ok(payloads)
    }

    /// The journal file (the content index reads referenced blocks from it).
    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// Flushes the image and records that the journal up to here is applied.
    pub fn take_checkpoint(
        &mut self,
        store: &Store,
        tags: &[TagLanding],
    ) -> Result<(), ReplicaError> {
        self.image.sync_data().map_err(|source| ReplicaError::Io {
            path: self.image_path.clone(),
            source,
        })?;
        let c = DiskCheckpoint {
            disk_size: self.disk_size,
            journal_offset: self.journal_len,
            seq: self.hwm,
        };
        store.commit(&self.id, Some(c), tags)?;
        self.checkpoint = c;
        self.last_checkpoint_at = Instant::now();
        Ok(())
    }
}

fn landing(id: &StreamId, record: &Record, journal_end: u64) -> Option<TagLanding> {
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
        }),
        _ => None,
    }
}
