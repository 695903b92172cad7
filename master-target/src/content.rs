//! The content index: which 4 KiB blocks the master target holds, and where to read
//! them, so the relay can send a block's SHA-256 instead of its bytes (WAN dedup).
//!
//! - A block's *place* is a byte offset in a disk's journal. Journals are append-only
//!   and keep every record, so a place stays valid even after the block is overwritten
//!   on the disk image; a block is indexed only once its record is durable (after the
//!   journal `fdatasync`, before the relay's ack), so the relay never learns of a block
//!   the master target could lose in a crash.
//! - Every read is **re-verified**: the bytes read must hash to the key, or the entry is
//!   dropped and the lookup fails. A failed lookup makes the stream end with
//!   `UnknownReference`, and the relay resends the data: correctness never depends on
//!   this index, which is a bounded (FIFO eviction) in-memory map rebuilt from traffic
//!   after a restart.
//! - Memory: about 100 bytes per entry; `content_index_entries` bounds it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fbr_protocol::wan::{block_hash, is_zero, BLOCK_SIZE};
use fbr_protocol::StreamId;
use fbr_storage::DurableFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    /// Index into `journals`.
    journal: u32,
    offset: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<[u8; 32], Place>,
    order: VecDeque<[u8; 32]>,
    /// Each disk's journal, as its replica last opened it.
    journals: Vec<Arc<dyn DurableFile>>,
    journal_ids: HashMap<StreamId, u32>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("blocks", &self.map.len())
            .field("journals", &self.journal_ids.len())
            .finish()
    }
}

/// Lookup outcomes, for metrics.
#[derive(Debug, Default)]
pub struct ContentStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Entries whose bytes no longer matched their hash (dropped).
    pub stale: AtomicU64,
}

/// The master target's bounded content index.
#[derive(Debug)]
pub struct ContentIndex {
    inner: Mutex<Inner>,
    capacity: usize,
    pub stats: ContentStats,
}

impl ContentIndex {
    /// An empty index of at most `capacity` blocks (0 disables dedup resolution).
    pub fn new(capacity: usize) -> Self {
        ContentIndex {
            inner: Mutex::new(Inner::default()),
            capacity,
            stats: ContentStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that the blocks of `data`, written in disk `stream`'s `journal` at
    /// `offset`, are there. Zero blocks are not indexed (they travel as markers anyway).
    /// `literal` says which blocks arrived as bytes (`None`: all): only those need
    /// hashing.
    pub fn insert_write<F: DurableFile>(
        &self,
        stream: &StreamId,
        journal: &Arc<F>,
        offset: u64,
        data: &[u8],
        literal: Option<&[bool]>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut hashed = Vec::new();
        for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
            if literal.is_some_and(|l| !l.get(i).copied().unwrap_or(true)) || is_zero(block) {
                continue;
            }
            hashed.push((block_hash(block), offset + (i * BLOCK_SIZE) as u64));
        }
        if hashed.is_empty() {
            return;
        }
        let journal: Arc<dyn DurableFile> = journal.clone();
        let mut g = self.lock();
        let id = match g.journal_ids.get(stream) {
            Some(id) => {
                // The replica may have reopened its journal: read through the newest
                // handle (same file; every read is re-verified anyway).
                let id = *id;
                g.journals[id as usize] = journal;
                id
            }
            None => {
                let id = g.journals.len() as u32;
                g.journals.push(journal);
                g.journal_ids.insert(stream.clone(), id);
                id
            }
        };
        for (hash, offset) in hashed {
            let place = Place {
                journal: id,
                offset,
            };
            if g.map.insert(hash, place).is_none() {
                g.order.push_back(hash);
            }
        }
        while g.map.len() > self.capacity {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.map.remove(&old);
        }
    }

    /// The `len` bytes of the block whose SHA-256 is `hash`, read and re-verified; `None`
    /// when unknown, unreadable or no longer matching.
    pub fn lookup(&self, hash: &[u8; 32], len: usize) -> Option<Bytes> {
        self.lookup_block(hash, len).ok()
    }

    /// Like [`ContentIndex::lookup`], saying why a block was not found.
    pub fn lookup_block(&self, hash: &[u8; 32], len: usize) -> Result<Bytes, LookupMiss> {
        let (place, file) = {
            let g = self.lock();
            let Some(place) = g.map.get(hash).copied() else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Err(LookupMiss::Unknown);
            };
            (place, g.journals[place.journal as usize].clone())
        };
        let mut buf = vec![0u8; len];
        let ok = file.read_at(&mut buf, place.offset).is_ok() && block_hash(&buf) == *hash;
        if !ok {
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
            let mut g = self.lock();
            if g.map.get(hash) == Some(&place) {
                g.map.remove(hash);
            }
            return Err(LookupMiss::Stale);
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Bytes::from(buf))
    }
}

/// Why a block was not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupMiss {
    /// Never indexed, or evicted.
    Unknown,
    /// Indexed, but its place no longer holds it (its journal history trimmed by
    /// retention, or unreadable): the entry is dropped.
    Stale,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Retention punches the oldest journal blocks out: a reference to them is never
    /// resolved (zeros fail the re-hash), so the relay resends the data.
    #[test]
    fn a_block_in_a_trimmed_journal_range_is_never_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("journal"))
            .unwrap();
        let journal = Arc::new(file);
        let data = vec![5u8; BLOCK_SIZE];
        journal.write_at(&data, 8192).unwrap();
        let index = ContentIndex::new(8);
        let disk = StreamId {
            vm: "vm".into(),
            disk: 0,
        };
        index.insert_write(&disk, &journal, 8192, &data, None);
        let hash = block_hash(&data);
        assert!(index.lookup(&hash, BLOCK_SIZE).is_some());
        journal.zero_range(4096, 8192).unwrap();
        assert!(index.lookup(&hash, BLOCK_SIZE).is_none());
        assert_eq!(index.stats.stale.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn finds_verifies_and_evicts() {
        let journal = Arc::new(fbr_storage::MemFile::default());
        let disk = StreamId {
            vm: "vm".into(),
            disk: 0,
        };
        let mut data = vec![0u8; 3 * BLOCK_SIZE];
        data[..BLOCK_SIZE].fill(1);
        data[2 * BLOCK_SIZE..].fill(3);
        journal.write_at(&[9u8; 100], 0).unwrap();
        journal.write_at(&data, 100).unwrap();
        let index = ContentIndex::new(2);
        index.insert_write(&disk, &journal, 100, &data, None);
        assert_eq!(index.len(), 2, "the zero block is not indexed");
        let one = block_hash(&data[..BLOCK_SIZE]);
        assert_eq!(
            &index.lookup(&one, BLOCK_SIZE).unwrap()[..],
            &data[..BLOCK_SIZE]
        );
        assert!(index.lookup(&[7; 32], BLOCK_SIZE).is_none());
        // The journal changed under the index (it never does, but the index checks).
        journal.write_at(&[2], 100).unwrap();
        assert!(index.lookup(&one, BLOCK_SIZE).is_none());
        assert_eq!(index.stats.stale.load(Ordering::Relaxed), 1);
        // FIFO eviction beyond capacity.
        let other = vec![5u8; BLOCK_SIZE];
        index.insert_write(&disk, &journal, 0, &other, None);
        index.insert_write(&disk, &journal, 0, &[6u8; BLOCK_SIZE], None);
        assert_eq!(index.len(), 2);
    }
}
