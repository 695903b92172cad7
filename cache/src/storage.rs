//! Where segments live: a directory of files, or memory (for tests).
//!
//! The cache core only touches segments through [`Storage`] and [`SegmentFile`], so the
//! model-based property test can run it against [`MemStorage`], which keeps what was
//! written apart from what was synced (a simulated crash loses the difference) and can
//! be told to fail writes or syncs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// One segment file.
pub trait SegmentFile: Send + Sync + 'static {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    fn truncate(&self, len: u64) -> io::Result<()>;
}

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

impl SegmentFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
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
    faults: Arc<Faults>,
}

#[derive(Debug, Default)]
struct Faults {
    fail_writes: AtomicU32,
    fail_syncs: AtomicU32,
}

/// One in-memory segment: bytes written, and the prefix state as of the last sync.
#[derive(Debug, Clone, Default)]
pub struct MemFile {
    data: Arc<Mutex<Vec<u8>>>,
    synced: Arc<Mutex<Vec<u8>>>,
    faults: Arc<Faults>,
}

fn injected(counter: &AtomicU32, what: &str) -> io::Result<()> {
    if counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(io::Error::other(format!("injected {what} failure")));
    }
    Ok(())
}

impl MemStorage {
    /// Loses everything not synced, as a power cut or kill -9 would. Pending injected
    /// faults are cleared (they model errors of the run that crashed).
    pub fn crash(&self) {
        self.faults.fail_writes.store(0, Ordering::SeqCst);
        self.faults.fail_syncs.store(0, Ordering::SeqCst);
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for f in files.values() {
            let synced = f.synced.lock().unwrap_or_else(|p| p.into_inner()).clone();
            *f.data.lock().unwrap_or_else(|p| p.into_inner()) = synced;
        }
    }

    /// The next `n` writes fail.
    pub fn fail_writes(&self, n: u32) {
        self.faults.fail_writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` syncs fail (and sync nothing).
    pub fn fail_syncs(&self, n: u32) {
        self.faults.fail_syncs.store(n, Ordering::SeqCst);
    }

    /// Flips one byte of a segment (durably), to test corruption handling.
    pub fn corrupt(&self, id: u64, offset: usize) {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&id) {
            for buf in [&f.data, &f.synced] {
                let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                if offset < b.len() {
                    b[offset] ^= 0xFF;
                }
            }
        }
    }
}

impl SegmentFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        let end = start + buf.len();
        if end > d.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        buf.copy_from_slice(&d[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        injected(&self.faults.fail_writes, "write")?;
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset as usize + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        injected(&self.faults.fail_syncs, "sync")?;
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner()).clone();
        *self.synced.lock().unwrap_or_else(|p| p.into_inner()) = d;
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
}

impl Storage for MemStorage {
    type File = MemFile;

    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect())
    }
    fn create(&self, id: u64) -> io::Result<MemFile> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "segment exists",
            ));
        }
        let f = MemFile {
            faults: self.faults.clone(),
            ..MemFile::default()
        };
        files.insert(id, f.clone());
        Ok(f)
    }
    fn open(&self, id: u64) -> io::Result<MemFile> {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such segment"))
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self, id: u64) -> String {
        format!("mem:seg-{id}")
    }
}
