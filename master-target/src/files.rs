//! Where a replica's files live: under the data directory, or in memory (the model test).
//!
//! [`crate::replica::DiskReplica`] opens its journal and its image only through
//! [`ReplicaFiles`], so `tests/model.rs` runs the real recovery and apply code on
//! [`MemFiles`], whose files lose or tear what was not synced when told to crash and
//! fail writes or syncs on request.
//!
//! On disk: `<data>/disks/<vm>/disk<N>/<name>` ([`JOURNAL_FILE`], [`IMAGE_FILE`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use fbr_protocol::StreamId;
use fbr_storage::{Crash, DurableFile, Faults, MemFile};

/// The journal of a disk: every record applied, in order.
pub const JOURNAL_FILE: &str = "journal.fbrj";
/// The image of a disk: its latest state, sparse.
pub const IMAGE_FILE: &str = "image.raw";

/// The files of every replicated disk.
pub trait ReplicaFiles: Send + Sync + 'static {
    type File: DurableFile;
    /// Opens file `name` of disk `id` for reading and writing, creating it (empty, with
    /// its directory) if it does not exist.
    fn open(&self, id: &StreamId, name: &str) -> io::Result<Self::File>;
    /// Makes the creation of disk `id`'s files durable (their directory entries, and
    /// those of the directories holding them).
    fn sync_dir(&self, id: &StreamId) -> io::Result<()>;
    /// A name for messages (a path, or `mem:` and the disk).
    fn describe(&self, id: &StreamId, name: &str) -> String;
}

/// Where a disk's files live under the data directory.
pub fn disk_dir(data_dir: &Path, id: &StreamId) -> PathBuf {
    data_dir
        .join("disks")
        .join(&id.vm)
        .join(format!("disk{}", id.disk))
}

/// The path of a disk's image file.
pub fn image_path(data_dir: &Path, id: &StreamId) -> PathBuf {
    disk_dir(data_dir, id).join(IMAGE_FILE)
}

/// The path of a disk's journal file.
pub fn journal_path(data_dir: &Path, id: &StreamId) -> PathBuf {
    disk_dir(data_dir, id).join(JOURNAL_FILE)
}

/// The replicas' files under a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        DataDir {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl ReplicaFiles for DataDir {
    type File = File;

    fn open(&self, id: &StreamId, name: &str) -> io::Result<File> {
        let dir = disk_dir(&self.root, id);
        std::fs::create_dir_all(&dir)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(name))
    }

    /// Syncs the disk's directory and each one above it up to the data directory:
    /// `create_dir_all` may have made `<vm>` and `disk<N>` just now (or another disk of
    /// the VM may have, without having synced yet), and a power cut must not lose their
    /// entries while the index holds the disk's checkpoint.
    fn sync_dir(&self, id: &StreamId) -> io::Result<()> {
        // `disk<N>`, `<vm>`, `disks` and the data directory (see `disk_dir`).
        for dir in disk_dir(&self.root, id).ancestors().take(4) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn describe(&self, id: &StreamId, name: &str) -> String {
        disk_dir(&self.root, id).join(name).display().to_string()
    }
}

/// Replicas' files in memory, with crashes and injected faults (tests).
#[derive(Debug, Clone, Default)]
pub struct MemFiles {
    files: Arc<Mutex<HashMap<(StreamId, String), MemFile>>>,
    faults: Faults,
}

impl MemFiles {
    fn lock(&self) -> MutexGuard<'_, HashMap<(StreamId, String), MemFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Crashes every file (see [`Crash`]); pending injected faults are cleared.
    pub fn crash(&self, crash: Crash) {
        self.faults.clear();
        let files = self.lock();
        // A fixed order, so a torn crash is reproducible from its seed.
        let mut all: Vec<_> = files.iter().collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (_, f)) in all.into_iter().enumerate() {
            f.crash(match crash {
                Crash::TornPowerLoss { seed } => Crash::TornPowerLoss {
                    seed: seed.wrapping_add(i as u64),
                },
                other => other,
            });
        }
    }

    /// The faults the files fail with.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// File `name` of disk `id`, if it exists.
    pub fn file(&self, id: &StreamId, name: &str) -> Option<MemFile> {
        self.lock().get(&(id.clone(), name.to_owned())).cloned()
    }
}

impl ReplicaFiles for MemFiles {
    type File = MemFile;

    fn open(&self, id: &StreamId, name: &str) -> io::Result<MemFile> {
        Ok(self
            .lock()
            .entry((id.clone(), name.to_owned()))
            .or_insert_with(|| MemFile::new(self.faults.clone()))
            .clone())
    }

    fn sync_dir(&self, _id: &StreamId) -> io::Result<()> {
        Ok(())
    }

    fn describe(&self, id: &StreamId, name: &str) -> String {
        format!("mem:{id}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disks of one VM opened at once each get their directory, however the creations
    /// interleave, and their files land under `<data>/disks/<vm>/disk<N>`.
    #[test]
    fn disks_of_one_vm_opened_together_all_get_their_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        std::thread::scope(|s| {
            for disk in 0..8 {
                let data = &data;
                s.spawn(move || {
                    let id = StreamId {
                        vm: "vm-a".into(),
                        disk,
                    };
                    data.open(&id, JOURNAL_FILE).unwrap();
                    data.sync_dir(&id).unwrap();
                });
            }
        });
        for disk in 0..8 {
            let id = StreamId {
                vm: "vm-a".into(),
                disk,
            };
            assert!(journal_path(tmp.path(), &id).is_file());
        }
    }
}
