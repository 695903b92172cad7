//! Placements: which path of a stream is the current one, after its VM moved between
//! relays (sans-IO: the table and its bytes; the daemons keep it in a file).
//!
//! A VM's *placement* is a number the configuration server raises each time it moves
//! the VM to another relay; the agent sends it in every `Hello`, and the relay in its
//! own `Hello` to the master target. Each receiver keeps, per stream, the highest
//! placement it has accepted, **durably, before** it accepts a higher one, and refuses a
//! lower one with `StreamMoved` ([`crate::stream::StreamReceiver::check_placement`]).
//! So once the master target has accepted a stream from the new relay, the old relay's
//! copy can never write again, even if it restarts later with records the agent moved
//! away from: it is told the stream moved, and forgets it.
//!
//! ## Invariants
//! - A stream's placement on record only grows.
//! - Placement 0 (never moved) is not stored: a table of streams that never moved is
//!   empty, and a missing file means every placement is 0.
//! - Decoding never panics and never allocates more than the bytes given justify
//!   (fuzzed: `fuzz/fuzz_targets/decode_placements.rs`).
//!
//! `since` is the receiver's own mark of where the placement's data starts: for the
//! relay, the first cache segment written at this placement (records of the stream in
//! older segments came by the path it moved away from, and recovery skips them); 0 for
//! the master target.
//!
//! ## File format (version 1), all integers little-endian
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FBRPLACE` |
//! | 8 | 2 | version: u16 = 1 |
//! | 10 | 2 | reserved: 0 |
//! | 12 | 4 | count: u32, entries that follow |
//! | 16 | … | `count` entries, in stream order: disk u32, placement u64 (≥ 1), since u64, n u8, VM name (n bytes) |
//! | end − 4 | 4 | CRC-32C of every byte before it |

use std::collections::BTreeMap;

use bytes::{Buf, BufMut};

use crate::frame::StreamId;
use crate::names::validate_name;

/// The file's first bytes.
pub const PLACEMENTS_MAGIC: [u8; 8] = *b"FBRPLACE";
/// The version this code writes and reads.
pub const PLACEMENTS_VERSION: u16 = 1;
/// The smallest entry: disk, placement, since, name length, a 1-byte name.
const MIN_ENTRY: usize = 4 + 8 + 8 + 1 + 1;

/// One stream's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The highest placement accepted.
    pub placement: u64,
    /// Where this placement's data starts, in the receiver's own terms (see the module
    /// documentation).
    pub since: u64,
}

/// What [`PlacementTable::admit`] decided about a `Hello`'s placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The placement on record: nothing changes.
    Current,
    /// Higher than the one on record (the VM moved here): the table now holds it and
    /// must be made durable before the stream is accepted.
    Raised { from: u64 },
    /// Lower than the one on record: the stream moved away from this path.
    Stale { on_record: u64 },
}

/// The highest placement accepted per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementTable {
    placements: BTreeMap<StreamId, Placement>,
}

impl PlacementTable {
    /// The placement on record for `stream` (0 if it never moved).
    pub fn get(&self, stream: &StreamId) -> u64 {
        self.placements.get(stream).map_or(0, |p| p.placement)
    }

    /// What [`PlacementTable::admit`] would decide, without changing anything.
    pub fn check(&self, stream: &StreamId, placement: u64) -> Admission {
        let on_record = self.get(stream);
        if placement < on_record {
            Admission::Stale { on_record }
        } else if placement > on_record {
            Admission::Raised { from: on_record }
        } else {
            Admission::Current
        }
    }

    /// Checks `placement` against the one on record, raising it (with `since` 0) if
    /// higher.
    pub fn admit(&mut self, stream: &StreamId, placement: u64) -> Admission {
        let admission = self.check(stream, placement);
        if let Admission::Raised { .. } = admission {
            self.set(
                stream,
                Placement {
                    placement,
                    since: 0,
                },
            );
        }
        admission
    }

    /// Records `entry` for `stream` (the caller checked it is not lower).
    pub fn set(&mut self, stream: &StreamId, entry: Placement) {
        if entry.placement == 0 {
            self.placements.remove(stream);
        } else {
            self.placements.insert(stream.clone(), entry);
        }
    }

    /// The entry of `stream`, if it ever moved.
    pub fn entry(&self, stream: &StreamId) -> Option<Placement> {
        self.placements.get(stream).copied()
    }

    /// Every stream that moved, with its entry.
    pub fn iter(&self) -> impl Iterator<Item = (&StreamId, Placement)> {
        self.placements.iter().map(|(s, p)| (s, *p))
    }

    /// The file's bytes (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.placements.len() * 32);
        out.put_slice(&PLACEMENTS_MAGIC);
        out.put_u16_le(PLACEMENTS_VERSION);
        out.put_u16_le(0);
        out.put_u32_le(self.placements.len() as u32);
        for (stream, entry) in &self.placements {
            out.put_u32_le(stream.disk);
            out.put_u64_le(entry.placement);
            out.put_u64_le(entry.since);
            out.put_u8(stream.vm.len() as u8);
            out.put_slice(stream.vm.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.put_u32_le(crc);
        out
    }

    /// Reads the file's bytes; the error says what is wrong with them.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 20 {
            return Err(format!("{} bytes, at least 20 expected", bytes.len()));
        }
        if bytes[..8] != PLACEMENTS_MAGIC {
            return Err("bad magic: not a placements file".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32c::crc32c(body) != crc {
            return Err("checksum mismatch: the file is damaged".into());
        }
        let mut p = &body[8..];
        let version = p.get_u16_le();
        if version != PLACEMENTS_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        if p.get_u16_le() != 0 {
            return Err("reserved bytes are not zero".into());
        }
        let count = p.get_u32_le() as usize;
        if count > p.remaining() / MIN_ENTRY {
            return Err(format!(
                "{count} entries cannot fit in {} bytes",
                p.remaining()
            ));
        }
        let mut placements = BTreeMap::new();
        for i in 0..count {
            if p.remaining() < MIN_ENTRY - 1 {
                return Err(format!("entry {i} is truncated"));
            }
            let disk = p.get_u32_le();
            let placement = p.get_u64_le();
            let since = p.get_u64_le();
            let n = p.get_u8() as usize;
            if p.remaining() < n {
                return Err(format!("entry {i}: name of {n} bytes is truncated"));
            }
            let vm = std::str::from_utf8(&p[..n])
                .map_err(|_| format!("entry {i}: name is not UTF-8"))?
                .to_owned();
            p.advance(n);
            validate_name(&vm).map_err(|e| format!("entry {i}: {e}"))?;
            if placement == 0 {
                return Err(format!("entry {i}: placement 0 is never stored"));
            }
            let stream = StreamId { vm, disk };
            if placements
                .last_key_value()
                .is_some_and(|(last, _)| *last >= stream)
            {
                return Err(format!(
                    "entry {i}: {stream} is out of order (entries are sorted, each once)"
                ));
            }
            placements.insert(stream, Placement { placement, since });
        }
        if p.has_remaining() {
            return Err(format!("{} bytes after the last entry", p.remaining()));
        }
        Ok(PlacementTable { placements })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(vm: &str, disk: u32) -> StreamId {
        StreamId {
            vm: vm.into(),
            disk,
        }
    }

    #[test]
    fn placements_only_grow_and_stale_ones_are_named() {
        let mut t = PlacementTable::default();
        assert_eq!(t.admit(&id("vm1", 0), 0), Admission::Current);
        assert_eq!(t.admit(&id("vm1", 0), 2), Admission::Raised { from: 0 });
        assert_eq!(t.admit(&id("vm1", 0), 2), Admission::Current);
        assert_eq!(t.admit(&id("vm1", 0), 1), Admission::Stale { on_record: 2 });
        assert_eq!(t.get(&id("vm1", 0)), 2);
        assert_eq!(t.get(&id("vm1", 1)), 0);
        assert_eq!(t.check(&id("vm1", 0), 3), Admission::Raised { from: 2 });
        assert_eq!(t.get(&id("vm1", 0)), 2, "check changes nothing");
        t.set(
            &id("vm1", 0),
            Placement {
                placement: 0,
                since: 0,
            },
        );
        assert_eq!(t.get(&id("vm1", 0)), 0);
        assert_eq!(t.iter().count(), 0);
    }

    #[test]
    fn golden_bytes_round_trip() {
        let mut t = PlacementTable::default();
        t.set(
            &id("vm1", 2),
            Placement {
                placement: 3,
                since: 9,
            },
        );
        let golden: &[u8] = &[
            b'F', b'B', b'R', b'P', b'L', b'A', b'C', b'E', // magic
            1, 0, 0, 0, // version 1, reserved
            1, 0, 0, 0, // one entry
            2, 0, 0, 0, // disk 2
            3, 0, 0, 0, 0, 0, 0, 0, // placement 3
            9, 0, 0, 0, 0, 0, 0, 0, // since: segment 9
            3, b'v', b'm', b'1', // VM name
            0x66, 0xab, 0x4b, 0xbe, // CRC-32C
        ];
        assert_eq!(t.encode(), golden);
        assert_eq!(PlacementTable::decode(golden).unwrap(), t);
        let empty = PlacementTable::default().encode();
        assert_eq!(empty.len(), 20);
        assert_eq!(
            PlacementTable::decode(&empty).unwrap(),
            PlacementTable::default()
        );
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let mut t = PlacementTable::default();
        t.admit(&id("vm1", 0), 1);
        t.admit(&id("vm2", 1), 7);
        let good = t.encode();
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(PlacementTable::decode(&flipped)
            .unwrap_err()
            .contains("checksum"));
        assert!(PlacementTable::decode(&good[..good.len() - 1]).is_err());
        assert!(PlacementTable::decode(b"not a placements file at all")
            .unwrap_err()
            .contains("magic"));
        // A count that the bytes cannot hold is refused before anything is allocated.
        let mut huge = good[..16].to_vec();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&huge);
        huge.extend_from_slice(&crc.to_le_bytes());
        assert!(PlacementTable::decode(&huge)
            .unwrap_err()
            .contains("cannot fit"));
    }
}
