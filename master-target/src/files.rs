//! Where a replica's files live: under the data directory, or in memory (the model test).
//!
//! [`crate::replica::DiskReplica`] opens its journal and its image only through
//! [`ReplicaFiles`], so `tests/model.rs` runs the real recovery and apply code on
//! [`MemFiles`], whose files lose or tear what was not synced when told to crash and
//! fail writes or syncs on request.
//!
//! On disk: `<data>/disks/<vm>/disk<N>/<name>` ([`JOURNAL_FILE`], [`IMAGE_FILE`]).
//!
//! A new disk's directories are synced before its first acknowledgement. Disks come in
//! hundreds at once (a VM's four disks share `<vm>`, every disk shares `disks` and the
//! data directory), so the syncs are grouped per directory ([`DirSyncs`]): one `fsync`
//! that starts after a request covers every request made before it started.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

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
    dir_syncs: Arc<DirSyncs>,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        DataDir {
            root: root.to_owned(),
            dir_syncs: Arc::default(),
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
            self.dir_syncs
                .sync_with(dir, |d| File::open(d).and_then(|f| f.sync_all()))?;
        }
        Ok(())
    }

    fn describe(&self, id: &StreamId, name: &str) -> String {
        disk_dir(&self.root, id).join(name).display().to_string()
    }
}

/// Group syncs of directories: [`DirSyncs::sync_with`] returns once a sync of the
/// directory that *started after the call* has completed, so it covers every entry
/// the caller made in it; callers that arrive while a sync runs share the next one.
///
/// Invariants: at most one sync per directory runs at a time; a directory's entry in
/// the map lives only while someone waits on it (the map stays as small as the number
/// of directories being synced right now).
#[derive(Debug, Default)]
pub struct DirSyncs {
    dirs: Mutex<HashMap<PathBuf, Arc<DirSync>>>,
}

#[derive(Debug, Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct DirSyncState {
    /// Requests made so far (each caller's ticket is the count after its own).
    requested: u64,
    /// Every ticket up to this one is covered by a completed sync.
    synced: u64,
    /// A sync is running (its caller is the leader).
    running: bool,
}

impl DirSyncs {
    /// Syncs `dir` with `sync` (`fsync` of the directory), grouped with concurrent
    /// callers. An error is returned to the caller whose sync failed; the others
    /// waiting on it try again themselves.
    pub fn sync_with(&self, dir: &Path, sync: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
        let entry = {
            let mut dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
            dirs.entry(dir.to_owned()).or_default().clone()
        };
        let result = entry.sync(dir, sync);
        let mut dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        // Clones are taken under the map's lock, so the count is stable here: two is
        // the map's and ours.
        if Arc::strong_count(&entry) == 2 {
            dirs.remove(dir);
        }
        result
    }

    /// Directories with a sync requested or running (tests).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.dirs.lock().unwrap().len()
    }
}

impl DirSync {
    fn sync(&self, dir: &Path, sync: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.synced >= ticket {
                return Ok(());
            }
            if st.running {
                st = self
                    .finished
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: this sync covers every request made until now.
            st.running = true;
            let covers = st.requested;
            drop(st);
            let result = sync(dir);
            st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.running = false;
            if result.is_ok() {
                st.synced = st.synced.max(covers);
            }
            self.finished.notify_all();
            result?;
        }
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

    /// A sync that was already running when a caller arrived does not count for it: the
    /// caller waits for the next one, which also serves everyone who came meanwhile.
    #[test]
    fn a_dir_sync_counts_only_if_it_started_after_the_request() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::mpsc;
        let syncs = DirSyncs::default();
        let dir = Path::new("/d");
        let runs = AtomicU32::new(0);
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let gated = |_: &Path| {
            runs.fetch_add(1, Ordering::SeqCst);
            started_tx.send(()).unwrap();
            release_rx.lock().unwrap().recv().unwrap();
            Ok(())
        };
        std::thread::scope(|s| {
            let first = s.spawn(|| syncs.sync_with(dir, gated));
            started_rx.recv().unwrap(); // the first sync runs
            let late: Vec<_> = (0..4)
                .map(|_| s.spawn(|| syncs.sync_with(dir, gated)))
                .collect();
            // Let the latecomers queue behind the running sync.
            while syncs.dirs.lock().unwrap()[dir]
                .state
                .lock()
                .unwrap()
                .requested
                < 5
            {
                std::thread::yield_now();
            }
            release_tx.send(()).unwrap();
            first.join().unwrap().unwrap();
            started_rx.recv().unwrap(); // one more sync, for all four latecomers
            release_tx.send(()).unwrap();
            for l in late {
                l.join().unwrap().unwrap();
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(syncs.pending(), 0, "idle directories leave the map");
    }

    /// A failed sync fails its caller; a caller that waited on it syncs again itself.
    #[test]
    fn a_failed_dir_sync_is_retried_by_the_next_caller() {
        let syncs = DirSyncs::default();
        let dir = Path::new("/d");
        let err = syncs.sync_with(dir, |_| Err(io::Error::other("EIO")));
        assert_eq!(err.unwrap_err().to_string(), "EIO");
        syncs.sync_with(dir, |_| Ok(())).unwrap();
        assert_eq!(syncs.pending(), 0);
    }

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
