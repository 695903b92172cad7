//! Disk images an emulated disk starts from, and the sparse files that hold them.
//!
//! An emulated disk of any size (Azure's 32 GiB to 4 TiB) lives in a **sparse file**: only
//! blocks ever written take space, so a 4 TiB disk with 1 GiB of data costs 1 GiB. What a
//! disk holds before its stream starts is an [`ImageSpec`]:
//! - `zeros`: an empty disk (an alternate location, or a new VM);
//! - `file`: a given image file (a capture of a real disk);
//! - `generated`: the disk "as it was at failover", deterministic from a seed: each 4 KiB
//!   block is used with a given probability and then holds pseudo-random bytes;
//! - `diverged`: another image with a fraction of its blocks rewritten since (what the
//!   Azure VM wrote after the failover): the source of an original-location reprotect
//!   whose stale replica is the base.
//!
//! Both the agent (its source disk) and the verifier (its scratch images) build images
//! from a spec, so a test can set up an original-location replica that is stale by a
//! chosen fraction and prove the resynced replica byte for byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fbr_storage::DurableFile;
use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

/// The unit images are generated in.
pub const BLOCK: u64 = 4096;
/// How much of an image is built in memory at once.
const STRIPE: u64 = 1 << 20;

/// What a disk holds before its stream starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageSpec {
    #[default]
    Zeros,
    File {
        path: PathBuf,
    },
    Generated {
        seed: u64,
        /// Parts per million of the 4 KiB blocks that hold data (the rest are zero).
        used_ppm: u32,
    },
    Diverged {
        base: Box<ImageSpec>,
        seed: u64,
        /// Parts per million of the 4 KiB blocks rewritten since the base.
        changed_ppm: u32,
    },
}

/// A deterministic coin per block: true with probability `ppm` / 1,000,000.
fn chosen(seed: u64, block: u64, ppm: u32) -> bool {
    (mix(seed, block) % 1_000_000) < ppm as u64
}

/// splitmix64 of `seed` and `block`: a well-spread 64-bit value per pair.
pub(crate) fn mix(seed: u64, block: u64) -> u64 {
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn random_block(seed: u64, block: u64, out: &mut [u8]) {
    Xoshiro256PlusPlus::seed_from_u64(mix(seed, block) ^ 0xB10C).fill_bytes(out);
}

impl ImageSpec {
    /// Fills `buf` with the image's bytes at `offset` (a multiple of 4 KiB).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            ImageSpec::Zeros => buf.fill(0),
            ImageSpec::File { path } => {
                buf.fill(0);
                let f = File::open(path)?;
                let len = DurableFile::size(&f)?;
                if offset < len {
                    let n = ((len - offset) as usize).min(buf.len());
                    DurableFile::read_at(&f, &mut buf[..n], offset)?;
                }
            }
            ImageSpec::Generated { seed, used_ppm } => {
                for (i, b) in buf.chunks_mut(BLOCK as usize).enumerate() {
                    let block = offset / BLOCK + i as u64;
                    if chosen(*seed, block, *used_ppm) {
                        random_block(*seed, block, b);
                    } else {
                        b.fill(0);
                    }
                }
            }
            ImageSpec::Diverged {
                base,
                seed,
                changed_ppm,
            } => {
                base.read(offset, buf)?;
                for (i, b) in buf.chunks_mut(BLOCK as usize).enumerate() {
                    let block = offset / BLOCK + i as u64;
                    if chosen(*seed, block, *changed_ppm) {
                        // New content, whatever seed the base has (never the base's).
                        random_block(mix(*seed, 0xD1FF_0000_D1FF), block, b);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` may hold data (`false`: certainly all zeros),
    /// without building it: lets a terabyte image with little data be created fast.
    fn may_have_data(&self, offset: u64, len: u64) -> bool {
        let blocks = offset / BLOCK..(offset + len).div_ceil(BLOCK);
        match self {
            ImageSpec::Zeros => false,
            ImageSpec::File { .. } => true,
            ImageSpec::Generated { seed, used_ppm } => {
                *used_ppm > 0 && blocks.into_iter().any(|b| chosen(*seed, b, *used_ppm))
            }
            ImageSpec::Diverged {
                base,
                seed,
                changed_ppm,
            } => {
                base.may_have_data(offset, len)
                    || (*changed_ppm > 0
                        && blocks.into_iter().any(|b| chosen(*seed, b, *changed_ppm)))
            }
        }
    }

    /// Whether the image holds nothing but zeros (an empty disk needs no resync).
    pub fn is_empty(&self) -> bool {
        match self {
            ImageSpec::Zeros => true,
            ImageSpec::Generated { used_ppm, .. } => *used_ppm == 0,
            ImageSpec::Diverged {
                base, changed_ppm, ..
            } => base.is_empty() && *changed_ppm == 0,
            ImageSpec::File { .. } => false,
        }
    }

    /// Writes the image into a new sparse file of `disk_size` bytes at `path` (all-zero
    /// stretches stay holes). Refuses to overwrite an existing file.
    pub fn create_file(&self, path: &Path, disk_size: u64) -> io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        f.set_len(disk_size)?;
        if !self.is_empty() {
            let mut buf = vec![0u8; STRIPE as usize];
            let mut offset = 0;
            while offset < disk_size {
                let n = (disk_size - offset).min(STRIPE) as usize;
                if self.may_have_data(offset, n as u64) {
                    self.read(offset, &mut buf[..n])?;
                    if !fbr_protocol::wan::is_zero(&buf[..n]) {
                        DurableFile::write_at(&f, &buf[..n], offset)?;
                    }
                }
                offset += n as u64;
            }
        }
        f.sync_data()?;
        Ok(f)
    }
}

/// Compares two sparse files of `len` bytes stripe by stripe; the first differing
/// offset, if any. Memory: two stripes.
pub fn first_difference(
    a: &impl DurableFile,
    b: &impl DurableFile,
    len: u64,
) -> io::Result<Option<u64>> {
    let mut x = vec![0u8; STRIPE as usize];
    let mut y = vec![0u8; STRIPE as usize];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(STRIPE) as usize;
        if a.is_hole(offset, n as u64) && b.is_hole(offset, n as u64) {
            offset += n as u64;
            continue;
        }
        read_padded(a, offset, &mut x[..n])?;
        read_padded(b, offset, &mut y[..n])?;
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            return Ok(Some(offset + i as u64));
        }
        offset += n as u64;
    }
    Ok(None)
}

/// Reads at `offset`, zeros past the file's end (a sparse disk's tail may be unwritten)
/// and in holes (not read at all: a terabyte disk with little data scans fast).
pub fn read_padded(f: &impl DurableFile, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = f.size()?;
    buf.fill(0);
    if offset < len && !f.is_hole(offset, buf.len() as u64) {
        let n = ((len - offset) as usize).min(buf.len());
        f.read_at(&mut buf[..n], offset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_images_are_deterministic_sparse_and_diverge_by_the_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 20;
        let base = ImageSpec::Generated {
            seed: 3,
            used_ppm: 500_000,
        };
        let source = ImageSpec::Diverged {
            base: Box::new(base.clone()),
            seed: 4,
            changed_ppm: 100_000,
        };
        // A diverged image differs even when its seed is chosen to cancel out the base's.
        let tricky = ImageSpec::Diverged {
            base: Box::new(ImageSpec::Generated {
                seed: 7,
                used_ppm: 1_000_000,
            }),
            seed: 7 ^ 0xD1FF,
            changed_ppm: 1_000_000,
        };
        let mut x0 = vec![0u8; BLOCK as usize];
        let mut y0 = vec![0u8; BLOCK as usize];
        tricky.read(0, &mut x0).unwrap();
        ImageSpec::Generated {
            seed: 7,
            used_ppm: 1_000_000,
        }
        .read(0, &mut y0)
        .unwrap();
        assert_ne!(x0, y0);
        let a = base.create_file(&dir.path().join("a"), size).unwrap();
        let b = source.create_file(&dir.path().join("b"), size).unwrap();
        let mut x = vec![0u8; BLOCK as usize];
        let mut y = vec![0u8; BLOCK as usize];
        let (mut used, mut changed) = (0, 0);
        for block in 0..size / BLOCK {
            a.read_at(&mut x, block * BLOCK).unwrap();
            b.read_at(&mut y, block * BLOCK).unwrap();
            used += usize::from(x.iter().any(|v| *v != 0));
            changed += usize::from(x != y);
        }
        let blocks = (size / BLOCK) as f64;
        assert!((used as f64 / blocks - 0.5).abs() < 0.02, "{used}");
        assert!((changed as f64 / blocks - 0.1).abs() < 0.01, "{changed}");
        assert!(first_difference(&a, &b, size).unwrap().is_some());
        let again = base.create_file(&dir.path().join("c"), size).unwrap();
        assert_eq!(first_difference(&a, &again, size).unwrap(), None);
        assert!(
            base.create_file(&dir.path().join("a"), size).is_err(),
            "never overwrites"
        );
    }
}
