//! Seeding a replica from an existing disk: the *original location* of a reprotect.
//!
//! When VMs fail back to the disks they left, those disks still hold the data of the day
//! of the failover. `master-target seed-disk` adopts such a disk image as a replica:
//! the image is copied (sparsely: all-zero 1 MiB runs become holes) into the replica's
//! `image.raw`, and the index records the disk as **stale**: it offers no recovery point
//! until a delta resync (only the blocks that differ travel) has made it equal to its
//! source and the next tag has arrived (`crate::sync`).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use fbr_protocol::{StreamId, SECTOR_SIZE};
use fbr_storage::DurableFile;

use crate::files::{DataDir, ReplicaFiles, IMAGE_FILE};
use crate::journal::JOURNAL_HEADER_LEN;
use crate::replica::{DiskReplica, ReplicaError};
use crate::store::{DiskCheckpoint, ReplicaIndex, Store};
use crate::sync::SyncState;

const CHUNK: usize = 1 << 20;

/// Why a disk could not be seeded.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("disk {0} already has a replica here; seeding would overwrite it")]
    Exists(StreamId),
    #[error("{path}: {size} bytes is not a positive multiple of {SECTOR_SIZE}")]
    BadSize { path: String, size: u64 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Replica(#[from] ReplicaError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// What was seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Seeded {
    pub disk_size: u64,
    /// Bytes copied (the rest were all-zero runs, left as holes).
    pub copied_bytes: u64,
}

/// Seeds the replica of `id` under `data_dir` (daemon stopped) from the image at
/// `from`, and records it stale.
pub fn seed_disk(data_dir: &Path, id: &StreamId, from: &Path) -> Result<Seeded, SeedError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SeedError::Io { path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let store = Store::open(data_dir)?;
    if store.checkpoint(id)?.is_some() {
        return Err(SeedError::Exists(id.clone()));
    }
    let mut source = File::open(from).map_err(io(from))?;
    let disk_size = source.metadata().map_err(io(from))?.len();
    if disk_size == 0 || disk_size % SECTOR_SIZE != 0 {
        return Err(SeedError::BadSize {
            path: from.display().to_string(),
            size: disk_size,
        });
    }
    let files = DataDir::new(data_dir);
    let image_name = files.describe(id, IMAGE_FILE);
    let image = files.open(id, IMAGE_FILE).map_err(|source| SeedError::Io {
        path: image_name.clone(),
        source,
    })?;
    let image_io = |source| SeedError::Io {
        path: image_name.clone(),
        source,
    };
    image.truncate(0).map_err(image_io)?;
    image.truncate(disk_size).map_err(image_io)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut copied_bytes = 0u64;
    while offset < disk_size {
        let n = ((disk_size - offset) as usize).min(CHUNK);
        source.read_exact(&mut buf[..n]).map_err(io(from))?;
        if !fbr_protocol::wan::is_zero(&buf[..n]) {
            image.write_at(&buf[..n], offset).map_err(image_io)?;
            copied_bytes += n as u64;
        }
        offset += n as u64;
    }
    image.sync().map_err(image_io)?;
    store.commit(
        id,
        Some(DiskCheckpoint {
            disk_size,
            journal_offset: JOURNAL_HEADER_LEN,
            seq: 0,
            sync: SyncState::Stale,
        }),
        &[],
    )?;
    // Creates the journal and takes the first checkpoint (still stale).
    DiskReplica::open(&files, &store, id, disk_size)?;
    Ok(Seeded {
        disk_size,
        copied_bytes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::files::image_path;

    #[test]
    fn a_seeded_disk_is_stale_sparse_and_never_seeded_twice() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("disk.img");
        let mut content = vec![0u8; 3 << 20];
        content[(1 << 20) + 7] = 9;
        std::fs::write(&from, &content).unwrap();
        let data = dir.path().join("mt");
        let id = StreamId {
            vm: "vm1".into(),
            disk: 0,
        };
        let seeded = seed_disk(&data, &id, &from).unwrap();
        assert_eq!(
            seeded,
            Seeded {
                disk_size: 3 << 20,
                copied_bytes: 1 << 20
            }
        );
        assert_eq!(std::fs::read(image_path(&data, &id)).unwrap(), content);
        let store = Store::open(&data).unwrap();
        assert_eq!(
            store.checkpoint(&id).unwrap().unwrap().sync,
            SyncState::Stale
        );
        drop(store);
        assert!(matches!(
            seed_disk(&data, &id, &from),
            Err(SeedError::Exists(_))
        ));
        std::fs::write(&from, [0u8; 100]).unwrap();
        let other = StreamId {
            vm: "vm2".into(),
            disk: 0,
        };
        assert!(matches!(
            seed_disk(&data, &other, &from),
            Err(SeedError::BadSize { .. })
        ));
    }
}
