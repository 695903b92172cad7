//! An in-memory [`DurableFile`] with crash simulation and fault injection.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::DurableFile;

/// The unit a torn crash keeps or loses: one disk sector.
pub const SECTOR: usize = 512;

/// Injected failures, shared by every file of one simulated disk.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<FaultCounters>);

#[derive(Debug, Default)]
struct FaultCounters {
    writes: AtomicU32,
    syncs: AtomicU32,
}

impl Faults {
    /// The next `n` writes (on any file sharing these faults) fail, writing nothing.
    pub fn fail_writes(&self, n: u32) {
        self.0.writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` syncs fail, syncing nothing.
    pub fn fail_syncs(&self, n: u32) {
        self.0.syncs.store(n, Ordering::SeqCst);
    }

    /// Forgets pending faults (they belong to the run that crashed).
    pub fn clear(&self) {
        self.fail_writes(0);
        self.fail_syncs(0);
    }

    fn take(counter: &AtomicU32, what: &str) -> io::Result<()> {
        if counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::other(format!("injected {what} failure")));
        }
        Ok(())
    }
}

/// What a simulated crash leaves of a file (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// kill -9: the page cache survives, nothing is lost.
    ProcessKill,
    /// Power cut: everything not synced is lost.
    PowerLoss,
    /// Power cut with writeback in any order: each unsynced sector survives or not
    /// (drawn from `seed`), and the length lands between the synced and current one.
    TornPowerLoss { seed: u64 },
}

/// One in-memory file: the bytes as reads see them, and the bytes as of the last sync.
/// Clones share the same file.
#[derive(Debug, Clone, Default)]
pub struct MemFile {
    state: Arc<Mutex<FileState>>,
    faults: Faults,
}

#[derive(Debug, Default)]
struct FileState {
    /// What reads return (the page cache).
    data: Vec<u8>,
    /// What survives a power cut (as of the last successful sync).
    synced: Vec<u8>,
}

impl MemFile {
    /// An empty file failing as `faults` says.
    pub fn new(faults: Faults) -> Self {
        MemFile {
            state: Arc::default(),
            faults,
        }
    }

    fn lock(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a crash to this file.
    pub fn crash(&self, crash: Crash) {
        let mut s = self.lock();
        match crash {
            // The page cache outlives the process: what it holds is still unsynced and
            // a later power cut can lose it.
            Crash::ProcessKill => return,
            Crash::PowerLoss => s.data = s.synced.clone(),
            Crash::TornPowerLoss { seed } => {
                let mut rng = SplitMix(seed);
                let (lo, hi) = (
                    s.synced.len().min(s.data.len()),
                    s.synced.len().max(s.data.len()),
                );
                let len = lo + (rng.next() as usize) % (hi - lo + 1);
                let mut out = Vec::with_capacity(len);
                for start in (0..len).step_by(SECTOR) {
                    let end = (start + SECTOR).min(len);
                    let new = sector(&s.data, start, end);
                    let old = sector(&s.synced, start, end);
                    out.extend_from_slice(if new == old || rng.next() & 1 == 0 {
                        &old
                    } else {
                        &new
                    });
                }
                s.data = out;
            }
        }
        // What is on the medium now is what a later power cut keeps.
        s.synced = s.data.clone();
    }

    /// Flips one byte durably (corruption on the medium). Out of range: nothing.
    pub fn corrupt(&self, offset: usize) {
        let mut s = self.lock();
        let s = &mut *s;
        for buf in [&mut s.data, &mut s.synced] {
            if let Some(b) = buf.get_mut(offset) {
                *b ^= 0xFF;
            }
        }
    }

    /// A copy of what reads return now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }
}

/// Bytes `start..end` of `buf`, zeros where `buf` is shorter.
fn sector(buf: &[u8], start: usize, end: usize) -> Vec<u8> {
    let mut out = vec![0u8; end - start];
    if start < buf.len() {
        let have = buf.len().min(end) - start;
        out[..have].copy_from_slice(&buf[start..start + have]);
    }
    out
}

/// A tiny deterministic generator, so a crash is reproducible from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl DurableFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(buf.len()).filter(|e| *e <= s.data.len());
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        };
        buf.copy_from_slice(&s.data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Faults::take(&self.faults.0.writes, "write")?;
        let mut s = self.lock();
        let start = offset as usize;
        let end = start + buf.len();
        if s.data.len() < end {
            s.data.resize(end, 0);
        }
        s.data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Faults::take(&self.faults.0.syncs, "sync")?;
        let mut s = self.lock();
        s.synced = s.data.clone();
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.lock().data.resize(len as usize, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn power_loss_keeps_only_what_was_synced() {
        let f = MemFile::default();
        f.write_at(&[1; 1024], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 1024], 512).unwrap();
        f.crash(Crash::ProcessKill);
        assert_eq!(f.size().unwrap(), 1536, "kill -9 loses nothing");
        f.crash(Crash::PowerLoss);
        assert_eq!(
            f.contents(),
            vec![1; 1024],
            "what a killed process left unsynced is lost by a later power cut"
        );
        f.write_at(&[3; 512], 1024).unwrap();
        f.sync().unwrap();
        f.crash(Crash::PowerLoss);
        assert_eq!(f.size().unwrap(), 1536);
    }

    #[test]
    fn torn_power_loss_keeps_a_mix_of_sectors_and_a_length_in_between() {
        let mut seen_mixed = false;
        for seed in 0..64 {
            let f = MemFile::default();
            f.write_at(&[1; 2048], 0).unwrap();
            f.sync().unwrap();
            f.write_at(&[2; 4096], 1024).unwrap();
            f.crash(Crash::TornPowerLoss { seed });
            let c = f.contents();
            assert!((2048..=5120).contains(&c.len()), "length {}", c.len());
            assert!(
                c[..1024].iter().all(|b| *b == 1),
                "synced sectors untouched"
            );
            for s in c[1024..].chunks(SECTOR) {
                assert!(s.iter().all(|b| *b == s[0]), "sectors are atomic");
            }
            seen_mixed |= c[1024..].chunks(SECTOR).any(|s| s[0] == 1)
                && c[1024..].chunks(SECTOR).any(|s| s[0] == 2);
        }
        assert!(
            seen_mixed,
            "some crash kept new and old sectors side by side"
        );
    }

    #[test]
    fn injected_faults_fail_once_each_and_clear() {
        let faults = Faults::default();
        let f = MemFile::new(faults.clone());
        faults.fail_writes(1);
        assert!(f.write_at(&[1], 0).is_err());
        f.write_at(&[1], 0).unwrap();
        faults.fail_syncs(2);
        faults.clear();
        f.sync().unwrap();
        let mut b = [0u8; 2];
        assert_eq!(
            f.read_at(&mut b, 0).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
