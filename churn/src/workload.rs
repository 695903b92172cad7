//! Deterministic workloads: what an emulated VM writes to one of its disks.
//!
//! A [`DiskGenerator`] is a pure function of `(seed, vm index, disk index, profile,
//! content, disk size)` and the number of changes drawn so far. That is what lets churn
//! *know exactly what each source disk holds*: the verifier rebuilds any disk at any
//! sequence number by drawing the same changes again, instead of keeping copies.
//!
//! Profiles (where and how much):
//! - `random`: 4-64 KiB writes at 4 KiB-aligned blocks drawn from a Zipf(1.1) hot set
//!   (database-like).
//! - `sequential`: 4-256 KiB log appends, wrapping at the end of the disk.
//! - `mixed`: 512 B to 1 MiB writes (log-uniform sizes) anywhere on the disk.
//! - `trim`: 4-64 KiB writes with 30% of changes zeroing 64 KiB-1 MiB ranges.
//!
//! Content models (what bytes): `zeros`, `dup` (4 KiB blocks from a small pool shared
//! by every disk of the run), `text` (compressible text-like), `random`
//! (incompressible), `mixed` (a weighted mix of the four, per write).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

/// Where writes land and how large they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Random,
    Sequential,
    Mixed,
    Trim,
}

impl Profile {
    pub const ALL: [Profile; 4] = [
        Profile::Random,
        Profile::Sequential,
        Profile::Mixed,
        Profile::Trim,
    ];
}

/// What the written bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    Zeros,
    Dup,
    Text,
    Random,
    Mixed,
}

/// One change to a disk, before it gets a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
}

impl Change {
    /// Turns the change into a record at position `seq`.
    pub fn into_record(self, seq: u64) -> fbr_protocol::Record {
        match self {
            Change::Write { offset, data } => fbr_protocol::Record::Write { seq, offset, data },
            Change::Zero { offset, len } => fbr_protocol::Record::Zero { seq, offset, len },
        }
    }
}

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const DUP_POOL_BLOCKS: usize = 64;
const TEXT_CORPUS_BYTES: usize = 1 << 20;
const HOT_SET_BLOCKS: u64 = 16 * 1024;

/// Shared, read-only material for content generation (built once per run).
#[derive(Debug)]
pub struct ContentPools {
    dup_blocks: Vec<Bytes>,
    text: Bytes,
}

impl ContentPools {
    pub fn new(seed: u64) -> Arc<Self> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0xD0B1_E5EE_D000_0001);
        let dup_blocks = (0..DUP_POOL_BLOCKS)
            .map(|_| {
                let mut b = vec![0u8; BLOCK as usize];
                rng.fill_bytes(&mut b);
                Bytes::from(b)
            })
            .collect();
        // A vocabulary of pseudo-words, then lines of them: compresses like logs or text.
        let words: Vec<String> = (0..512)
            .map(|_| {
                let len = rng.gen_range(2..10);
                (0..len)
                    .map(|_| (b'a' + rng.gen_range(0..26u8)) as char)
                    .collect()
            })
            .collect();
        let mut text = Vec::with_capacity(TEXT_CORPUS_BYTES + 64);
        while text.len() < TEXT_CORPUS_BYTES {
            let w = &words[rng.gen_range(0..words.len())];
            text.extend_from_slice(w.as_bytes());
            text.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
        }
        text.truncate(TEXT_CORPUS_BYTES);
        Arc::new(ContentPools {
            dup_blocks,
            text: Bytes::from(text),
        })
    }
}

/// Draws the changes of one emulated disk, deterministically.
#[derive(Debug)]
pub struct DiskGenerator {
    rng: Xoshiro256PlusPlus,
    profile: Profile,
    content: Content,
    disk_size: u64,
    pools: Arc<ContentPools>,
    zipf: Option<Zipf<f64>>,
    hot_blocks: u64,
    append_cursor: u64,
}

/// Mixes the run seed with the disk's position into the disk's own seed.
fn disk_seed(seed: u64, vm_index: u32, disk_index: u32) -> u64 {
    crate::image::mix(seed, (vm_index as u64) << 32 | disk_index as u64)
}

impl DiskGenerator {
    /// `disk_size` must be a multiple of 4 KiB and at least 1 MiB.
    pub fn new(
        seed: u64,
        vm_index: u32,
        disk_index: u32,
        profile: Profile,
        content: Content,
        disk_size: u64,
        pools: Arc<ContentPools>,
    ) -> Self {
        assert!(
            disk_size % BLOCK == 0 && disk_size >= 1 << 20,
            "disk size must be >= 1 MiB and 4 KiB aligned"
        );
        let hot_blocks = (disk_size / BLOCK).min(HOT_SET_BLOCKS);
        DiskGenerator {
            rng: Xoshiro256PlusPlus::seed_from_u64(disk_seed(seed, vm_index, disk_index)),
            profile,
            content,
            disk_size,
            pools,
            zipf: Zipf::new(hot_blocks, 1.1).ok(),
            hot_blocks,
            append_cursor: 0,
        }
    }

    /// The next change.
    pub fn next_change(&mut self) -> Change {
        match self.profile {
            Profile::Random => {
                let len = BLOCK << self.rng.gen_range(0..5); // 4..64 KiB
                let rank = match &self.zipf {
                    Some(z) => z.sample(&mut self.rng) as u64 - 1,
                    None => self.rng.gen_range(0..self.hot_blocks),
                };
                // Scatter hot ranks over the disk with a fixed odd multiplier.
                let blocks = self.disk_size / BLOCK;
                let block = rank.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) % blocks;
                let offset = (block * BLOCK).min(self.disk_size - len);
                self.write(offset, len)
            }
            Profile::Sequential => {
                let mut len = BLOCK * self.rng.gen_range(1..=64);
                if self.append_cursor >= self.disk_size {
                    self.append_cursor = 0;
                }
                len = len.min(self.disk_size - self.append_cursor);
                let offset = self.append_cursor;
                self.append_cursor += len;
                self.write(offset, len)
            }
            Profile::Mixed => {
                // Log-uniform from 512 B (2^9) to 1 MiB (2^20), in whole sectors.
                let exp = self.rng.gen_range(9.0..=20.0f64);
                let len = (((2f64.powf(exp)) as u64 / SECTOR).max(1) * SECTOR)
                    .min(fbr_protocol::MAX_WRITE_BYTES as u64);
                let offset = self.rng.gen_range(0..=(self.disk_size - len) / SECTOR) * SECTOR;
                self.write(offset, len)
            }
            Profile::Trim => {
                if self.rng.gen_ratio(3, 10) {
                    let len = BLOCK * self.rng.gen_range(16..=256);
                    let offset = self.rng.gen_range(0..=(self.disk_size - len) / BLOCK) * BLOCK;
                    Change::Zero { offset, len }
                } else {
                    let len = BLOCK * self.rng.gen_range(1..=16);
                    let offset = self.rng.gen_range(0..=(self.disk_size - len) / BLOCK) * BLOCK;
                    self.write(offset, len)
                }
            }
        }
    }

    fn write(&mut self, offset: u64, len: u64) -> Change {
        let content = match self.content {
            Content::Mixed => match self.rng.gen_range(0..10) {
                0 => Content::Zeros,
                1..=3 => Content::Dup,
                4..=7 => Content::Text,
                _ => Content::Random,
            },
            c => c,
        };
        let len = len as usize;
        let data = match content {
            Content::Zeros => Bytes::from(vec![0u8; len]),
            Content::Random => {
                let mut b = BytesMut::zeroed(len);
                self.rng.fill_bytes(&mut b);
                b.freeze()
            }
            Content::Dup => {
                let mut b = BytesMut::with_capacity(len);
                while b.len() < len {
                    let block = &self.pools.dup_blocks[self.rng.gen_range(0..DUP_POOL_BLOCKS)];
                    let take = (len - b.len()).min(block.len());
                    b.extend_from_slice(&block[..take]);
                }
                b.freeze()
            }
            Content::Text => {
                let text = &self.pools.text;
                let mut b = BytesMut::with_capacity(len);
                while b.len() < len {
                    let start = self.rng.gen_range(0..text.len());
                    let take = (len - b.len()).min(text.len() - start);
                    b.extend_from_slice(&text[start..start + take]);
                }
                b.freeze()
            }
            Content::Mixed => unreachable!("resolved above"),
        };
        Change::Write { offset, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_in_bounds() {
        for profile in Profile::ALL {
            for content in [
                Content::Zeros,
                Content::Dup,
                Content::Text,
                Content::Random,
                Content::Mixed,
            ] {
                let size = 8 << 20;
                let pools = ContentPools::new(7);
                let mut a = DiskGenerator::new(7, 1, 2, profile, content, size, pools.clone());
                let mut b = DiskGenerator::new(7, 1, 2, profile, content, size, pools);
                for _ in 0..200 {
                    let (x, y) = (a.next_change(), b.next_change());
                    assert_eq!(x, y);
                    let (offset, len) = match &x {
                        Change::Write { offset, data } => (*offset, data.len() as u64),
                        Change::Zero { offset, len } => (*offset, *len),
                    };
                    assert!(len > 0 && len <= 1 << 20);
                    assert_eq!(offset % 512, 0);
                    assert_eq!(len % 512, 0);
                    assert!(offset + len <= size, "{profile:?} {offset}+{len}");
                }
            }
        }
    }

    #[test]
    fn different_disks_differ() {
        let pools = ContentPools::new(1);
        let mut a = DiskGenerator::new(
            1,
            0,
            0,
            Profile::Random,
            Content::Random,
            4 << 20,
            pools.clone(),
        );
        let mut b = DiskGenerator::new(1, 0, 1, Profile::Random, Content::Random, 4 << 20, pools);
        assert_ne!(a.next_change(), b.next_change());
    }
}
