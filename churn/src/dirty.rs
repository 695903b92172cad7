//! Which regions of an emulated disk may hold writes the relay never acknowledged: what
//! an agent killed mid-stream must resync when it comes back.
//!
//! A real agent tracks the blocks it changed in a bitmap that survives its own crash;
//! this is churn's version, one bit per 1 MiB region ([`REGION_BYTES`]), in two
//! generations persisted in a small file next to the disk (`<disk>.dirty`):
//! - every change sets its regions' bits in the *current* generation (written through to
//!   the file the first time a bit is set, before the change is sent);
//! - when everything produced while the *previous* generation was current is
//!   acknowledged, the previous generation is forgotten, the current one becomes
//!   previous, and a new one starts;
//! - a file found at start (an agent came back after a crash) is held whole until the
//!   resync of its regions is done ([`DirtyRegions::release`]), so a second crash in
//!   the middle of that resync forgets nothing.
//!
//! So the file always covers every write not yet acknowledged (and a little more), and
//! its size is two bits per MiB of disk (1 MiB of file for a 4 TiB disk).
//!
//! ```text
//! file = current bitmap (regions/8 bytes, rounded up) | previous bitmap (same size)
//! bit  = region r: byte r/8, bit r%8 (LSB first)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use fbr_protocol::resync::{regions, REGION_BYTES};
use fbr_storage::DurableFile;

/// The dirty regions of one disk.
#[derive(Debug)]
pub struct DirtyRegions {
    file: File,
    current: Vec<u8>,
    previous: Vec<u8>,
    /// The last sequence number produced while `previous` was current: once it is
    /// acknowledged, `previous` may go.
    previous_upto: u64,
}

impl DirtyRegions {
    /// Opens (or creates, empty) the dirty file of a disk of `disk_size` bytes. What it
    /// holds is kept until [`Self::release`].
    pub fn open(path: &Path, disk_size: u64) -> io::Result<Self> {
        let len = regions(disk_size).div_ceil(8) as usize;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut both = vec![0u8; 2 * len];
        let have = (DurableFile::size(&file)? as usize).min(both.len());
        if have > 0 {
            DurableFile::read_at(&file, &mut both[..have], 0)?;
        }
        let previous = both.split_off(len);
        for (c, p) in both.iter_mut().zip(&previous) {
            *c |= p;
        }
        Ok(DirtyRegions {
            file,
            current: both,
            previous: vec![0; len],
            previous_upto: u64::MAX,
        })
    }

    /// The regions found at start were resynced: generations may rotate from now on.
    pub fn release(&mut self) {
        self.previous_upto = 0;
    }

    /// Marks the regions `[offset, offset + len)` touches, before the change is sent.
    pub fn mark(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for r in offset / REGION_BYTES..=(offset + len - 1) / REGION_BYTES {
            let (byte, bit) = ((r / 8) as usize, r % 8);
            if byte < self.current.len() && self.current[byte] & (1 << bit) == 0 {
                self.current[byte] |= 1 << bit;
                DurableFile::write_at(&self.file, &self.current[byte..=byte], byte as u64)?;
            }
        }
        Ok(())
    }

    /// Everything up to `acked` is durable at the relay; `produced` is the newest
    /// sequence number assigned. Rotates the generations when the previous one is fully
    /// acknowledged.
    pub fn acked(&mut self, acked: u64, produced: u64) -> io::Result<()> {
        if acked < self.previous_upto {
            return Ok(());
        }
        self.previous = std::mem::replace(&mut self.current, vec![0; self.previous.len()]);
        self.previous_upto = produced;
        let mut both = self.current.clone();
        both.extend_from_slice(&self.previous);
        DurableFile::write_at(&self.file, &both, 0)
    }

    /// Regions that may hold unacknowledged writes, as runs `[start, end)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, (c, p)) in self.current.iter().zip(&self.previous).enumerate() {
            let byte = c | p;
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let r = i as u64 * 8 + bit;
                    match out.last_mut() {
                        Some(last) if last.1 == r => last.1 = r + 1,
                        _ => out.push((r, r + 1)),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn marks_survive_a_crash_and_go_two_acknowledged_generations_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.dirty");
        let size = 40 * REGION_BYTES;
        let mut d = DirtyRegions::open(&path, size).unwrap();
        d.mark(3 * REGION_BYTES + 10, REGION_BYTES).unwrap(); // regions 3 and 4
        d.mark(9 * REGION_BYTES, 512).unwrap();
        drop(d); // kill -9: the file is all there is
        let mut d = DirtyRegions::open(&path, size).unwrap();
        assert_eq!(d.runs(), vec![(3, 5), (9, 10)]);
        d.acked(100, 100).unwrap();
        assert_eq!(d.runs().len(), 2, "held until the restart's resync is done");
        d.release();
        d.acked(10, 20).unwrap(); // records up to 20 were produced meanwhile
        d.mark(30 * REGION_BYTES, 1).unwrap();
        assert_eq!(
            d.runs(),
            vec![(3, 5), (9, 10), (30, 31)],
            "20 not acked yet"
        );
        d.acked(15, 25).unwrap();
        assert_eq!(d.runs().len(), 3);
        d.acked(20, 26).unwrap();
        assert_eq!(d.runs(), vec![(30, 31)]);
        let d = DirtyRegions::open(&path, size).unwrap();
        assert_eq!(d.runs(), vec![(30, 31)], "rotations are persisted");
        drop(d);
        let mut d = DirtyRegions::open(&path, size).unwrap();
        d.release();
        d.acked(26, 30).unwrap();
        d.acked(30, 30).unwrap();
        assert!(d.runs().is_empty());
    }
}
