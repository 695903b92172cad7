//! Where segments live: a directory of files, or memory (for tests).
//!
//! The cache core only touches segments through [`Storage`] and [`SegmentFile`] (the
//! workspace's [`DurableFile`]), so the model-based property test can run it against
//! [`MemStorage`], whose files ([`MemFile`]) keep what was written apart from what was
//! synced (a simulated crash loses the difference) and can be told to fail writes or
//! syncs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use fbr_storage::DurableFile as SegmentFile;
use fbr_storage::{Crash, Faults, MemFile};

/// A set of numbered segments.
pub trait Storage: Send + Sync + 'static {
    type File: SegmentFile;
    /// Segment ids present, ascending.
    fn list(&self) -> io::Result<Vec<u64>>;
    fn create(&self, id: u64) -> io::Result<Self::File>;
    fn open(&self, id: u64) -> io::Result<Self::File>;
    fn remove(&self, id: u64) -> io::Result<()>;
    /// Makes creations and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// A name for messages (file path or `mem:<id>`).
    fn describe(&self, id: u64) -> String;
}

/// Segments as files `seg-<id, 20 digits>.fbrc` in a directory.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(FileStorage {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id:020}.fbrc"))
    }
}

impl Storage for FileStorage {
    type File = File;

    fn list(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_prefix("seg-")
                .and_then(|s| s.strip_suffix(".fbrc"))
            {
                if let Ok(id) = id.parse() {
                    ids.push(id);
                }
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }
    fn create(&self, id: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(id))
    }
    fn open(&self, id: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(id))
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        std::fs::remove_file(self.path(id))
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn describe(&self, id: u64) -> String {
        self.path(id).display().to_string()
    }
}

/// In-memory segments with crash simulation and fault injection.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    files: Arc<Mutex<BTreeMap<u64, MemFile>>>,
    faults: Faults,
}

impl MemStorage {
    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, MemFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loses everything not synced, as a power cut would. Pending injected faults are
    /// cleared (they model errors of the run that crashed).
    pub fn crash(&self) {
        self.faults.clear();
        for f in self.files().values() {
            f.crash(Crash::PowerLoss);
        }
    }

    /// The next `n` writes fail.
    pub fn fail_writes(&self, n: u32) {
        self.faults.fail_writes(n);
    }

    /// The next `n` syncs fail (and sync nothing).
    pub fn fail_syncs(&self, n: u32) {
        self.faults.fail_syncs(n);
    }

    /// Flips one byte of a segment (durably), to test corruption handling.
    pub fn corrupt(&self, id: u64, offset: usize) {
        if let Some(f) = self.files().get(&id) {
            f.corrupt(offset);
        }
    }
}

impl Storage for MemStorage {
    type File = MemFile;

    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(self.files().keys().copied().collect())
    }
    fn create(&self, id: u64) -> io::Result<MemFile> {
        let mut files = self.files();
        if files.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "segment exists",
            ));
        }
        let f = MemFile::new(self.faults.clone());
        files.insert(id, f.clone());
        Ok(f)
    }
    fn open(&self, id: u64) -> io::Result<MemFile> {
        self.files()
            .get(&id)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        self.files().remove(&id);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self, id: u64) -> String {
        format!("mem:seg-{id}")
    }
}
