//! The placements file a receiver keeps (the relay in its cache directory, the master
//! target in its data directory): the highest placement accepted per stream, so that a
//! stream's old path is refused after its VM moved ([`fbr_protocol::placement`] has the
//! rule and the byte format).
//!
//! ## Invariants
//! - A raised placement is on disk (written whole to a temporary file, synced, renamed
//!   over the old one, directory synced) before [`PlacementStore::admit`] returns it:
//!   a receiver never accepts a stream at a placement a crash could forget.
//! - Checks and raises are serialized, so two `Hello`s of one stream cannot both pass
//!   on a stale reading.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fbr_protocol::placement::{Admission, Placement, PlacementTable};
use fbr_protocol::StreamId;

/// The file's name inside the daemon's directory.
pub const PLACEMENTS_FILE: &str = "placements";

/// A durable [`PlacementTable`].
#[derive(Debug)]
pub struct PlacementStore {
    path: PathBuf,
    table: Mutex<PlacementTable>,
}

impl PlacementStore {
    /// Opens `dir/placements` (a missing file: nothing ever moved). A damaged file is
    /// an error naming it: starting without it could let a stale path write.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(PLACEMENTS_FILE);
        let table = match std::fs::read(&path) {
            Ok(bytes) => PlacementTable::decode(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => PlacementTable::default(),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        Ok(PlacementStore {
            path,
            table: Mutex::new(table),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PlacementTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The placement on record for `stream` (0 if it never moved).
    pub fn get(&self, stream: &StreamId) -> u64 {
        self.lock().get(stream)
    }

    /// Checks `placement` against the one on record; a higher one is made durable
    /// before this returns [`Admission::Raised`].
    pub fn admit(&self, stream: &StreamId, placement: u64) -> io::Result<Admission> {
        let mut table = self.lock();
        let admission = table.check(stream, placement);
        if let Admission::Raised { .. } = admission {
            self.write(
                &mut table,
                stream,
                Placement {
                    placement,
                    since: 0,
                },
            )?;
        }
        Ok(admission)
    }

    /// What [`PlacementStore::admit`] would decide, changing nothing.
    pub fn check(&self, stream: &StreamId, placement: u64) -> Admission {
        self.lock().check(stream, placement)
    }

    /// The entry of `stream`, if it ever moved.
    pub fn entry(&self, stream: &StreamId) -> Option<Placement> {
        self.lock().entry(stream)
    }

    /// Every stream that moved, with its entry.
    pub fn entries(&self) -> Vec<(StreamId, Placement)> {
        self.lock().iter().map(|(s, p)| (s.clone(), p)).collect()
    }

    /// Records `entry` for `stream` durably, if it is not below the one on record
    /// (returns whether it was recorded).
    pub fn raise(&self, stream: &StreamId, entry: Placement) -> io::Result<bool> {
        let mut table = self.lock();
        if entry.placement < table.get(stream) {
            return Ok(false);
        }
        self.write(&mut table, stream, entry)?;
        Ok(true)
    }

    /// Sets `entry` and writes the table; on failure the table is as it was.
    fn write(
        &self,
        table: &mut PlacementTable,
        stream: &StreamId,
        entry: Placement,
    ) -> io::Result<()> {
        let before = table.entry(stream);
        table.set(stream, entry);
        replace_synced(&self.path, &table.encode()).map_err(|e| {
            table.set(
                stream,
                before.unwrap_or(Placement {
                    placement: 0,
                    since: 0,
                }),
            );
            io::Error::new(
                e.kind(),
                format!("recording placement in {}: {e}", self.path.display()),
            )
        })
    }
}

/// Writes `bytes` to `path` whole or not at all, synced.
fn replace_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_placements_survive_a_reopen_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let id = StreamId {
            vm: "vm1".into(),
            disk: 0,
        };
        let store = PlacementStore::open(dir.path()).unwrap();
        assert_eq!(store.admit(&id, 0).unwrap(), Admission::Current);
        assert!(!dir.path().join(PLACEMENTS_FILE).exists(), "nothing moved");
        assert_eq!(store.admit(&id, 2).unwrap(), Admission::Raised { from: 0 });
        drop(store);
        let store = PlacementStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&id), 2);
        assert_eq!(
            store.admit(&id, 1).unwrap(),
            Admission::Stale { on_record: 2 }
        );
        std::fs::write(dir.path().join(PLACEMENTS_FILE), b"garbage").unwrap();
        let e = PlacementStore::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("placements"), "{e}");
    }
}
