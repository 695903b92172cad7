//! The retention journal: a per-disk write-ahead log of every record applied.
//!
//! The journal is the master target's source of truth. A batch of records is appended
//! and `fdatasync`ed **before** it is acknowledged; the disk image is then updated in
//! place and only flushed at checkpoints, and recovery re-applies the journal from the
//! last checkpoint. Until retention trims it ([`crate::retention`]), it keeps every
//! record, so a recovery point can be materialised by replaying it up to that point
//! ([`replay`]); from a trimmed journal's start, by putting before-images back.
//!
//! ## Format (version 2, little-endian; `docs/JOURNAL-FORMAT.md` has the byte tables)
//!
//! ```text
//! file   = header entry*
//! header = magic "FBRJOURN" (8) | version u32 = 2 | reserved u32 = 0        (16 bytes)
//! entry  = frame_len u32 | crc32c(frame) u32 | frame (frame_len bytes)
//! frame  = record frame | undo frame
//! undo   = "UN" | kind u8 | 0 u8 | 0 u32 | seq u64 | offset u64 | len u64 | data
//! ```
//!
//! A record frame is the record's wire encoding (`fbr_protocol`), header included, so
//! the journal needs no second record format. An undo frame (version 2) holds a
//! *before-image*: what the image held at `offset..offset + len` just before record
//! `seq` changed it, as bytes (`kind` 1) or as zeros (`kind` 2, no data). Every `Write`
//! and `Zero` record journaled by version 2 is preceded by the undo entries that cover
//! its range, in offset order, so the image can be rolled back in place from its
//! newest state to any point, newest record first, in time proportional to what
//! changed since ([`crate::rollback`]). Version 1 files (no undo entries) still read;
//! opening one for writing upgrades its header to 2. Do not change this layout without
//! bumping [`JOURNAL_VERSION`]; `tests/golden.rs` pins it.
//!
//! ## Invariants
//! - Entries hold `Write`, `Zero` and `Tag` records with strictly increasing sequence
//!   numbers. They increase by one except where the relay coalesced records superseded
//!   between two recovery points (docs/WAN.md); a `Tag` is never skipped.
//! - An undo entry names the record that follows it (`seq`) and lies inside that
//!   record's range; together, a record's undo entries cover its range exactly.
//! - A reader stops at the first entry that is incomplete or fails its CRC and reports
//!   its offset; the writer's owner truncates there (a torn tail from a crash).

use std::fs::File;
use std::io;
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use fbr_protocol::{
    decode_frame, encode_frame, Frame, Record, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD,
};
use fbr_storage::DurableFile;

/// First eight bytes of every journal file.
pub const JOURNAL_MAGIC: [u8; 8] = *b"FBRJOURN";
/// The journal format version written by this code.
pub const JOURNAL_VERSION: u32 = 2;
/// The oldest version this code reads (version 1 has no undo entries).
pub const OLDEST_JOURNAL_VERSION: u32 = 1;
/// First two bytes of an undo entry's frame (a record frame starts with the wire
/// protocol's magic instead).
pub const UNDO_MAGIC: [u8; 2] = *b"UN";
/// Bytes of an undo frame before its data.
pub const UNDO_HEADER_LEN: usize = 32;
/// Most bytes of before-image one undo entry carries (larger ranges take several).
pub const MAX_UNDO_CHUNK: usize = 512 * 1024;
const UNDO_KIND_DATA: u8 = 1;
const UNDO_KIND_ZEROS: u8 = 2;
/// Bytes before the first entry.
pub const JOURNAL_HEADER_LEN: u64 = 16;
/// Bytes of an entry before its frame.
pub const ENTRY_HEADER_LEN: usize = 8;
const MAX_ENTRY_FRAME: usize = FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD;

/// The 16-byte file header.
pub fn encode_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h
}

/// Appends one entry for `record` to `out`.
pub fn encode_entry(record: &Record, out: &mut BytesMut) {
    let start = out.len();
    out.put_u64_le(0); // frame_len and crc, patched below
    encode_frame(&Frame::Record(record.clone()), out);
    let frame = &out[start + ENTRY_HEADER_LEN..];
    let len = frame.len() as u32;
    let crc = crc32c::crc32c(frame);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What the image held before a record changed it (version 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoEntry {
    /// The record whose change this undoes (the next record in the journal).
    pub seq: u64,
    pub offset: u64,
    pub before: Before,
}

/// A before-image's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    Data(Bytes),
    /// `len` zero bytes (a hole, or zeros written).
    Zeros(u64),
}

impl UndoEntry {
    /// Bytes of the image it covers.
    pub fn len(&self) -> u64 {
        match &self.before {
            Before::Data(d) => d.len() as u64,
            Before::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts the before-image back into `sink`.
    pub fn apply(&self, sink: &mut impl ImageSink) -> io::Result<()> {
        match &self.before {
            Before::Data(d) => sink.write_at(self.offset, d),
            Before::Zeros(n) => sink.zero(self.offset, *n),
        }
    }
}

/// One entry of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEntry {
    Record(Record),
    Undo(UndoEntry),
}

/// Appends one undo entry to `out`: `data` as the before-image of `offset..` for record
/// `seq`, or `None` for `len` zeros. At most [`MAX_UNDO_CHUNK`] bytes.
pub fn encode_undo(seq: u64, offset: u64, len: u64, data: Option<&[u8]>, out: &mut BytesMut) {
    debug_assert!(len as usize <= MAX_UNDO_CHUNK);
    debug_assert!(data.is_none_or(|d| d.len() as u64 == len));
    let start = out.len();
    out.put_u64_le(0); // frame_len and crc, patched below
    out.put_slice(&UNDO_MAGIC);
    out.put_u8(if data.is_some() {
        UNDO_KIND_DATA
    } else {
        UNDO_KIND_ZEROS
    });
    out.put_u8(0);
    out.put_u32_le(0);
    out.put_u64_le(seq);
    out.put_u64_le(offset);
    out.put_u64_le(len);
    if let Some(d) = data {
        out.put_slice(d);
    }
    let frame = &out[start + ENTRY_HEADER_LEN..];
    let frame_len = frame.len() as u32;
    let crc = crc32c::crc32c(frame);
    out[start..start + 4].copy_from_slice(&frame_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// An undo entry read in place: its data borrowed from the buffer it was read into
/// (a rollback puts it back without copying it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoView<'a> {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    /// `None`: zeros.
    pub data: Option<&'a [u8]>,
}

impl UndoView<'_> {
    /// Puts the before-image back into `sink`.
    pub fn apply(&self, sink: &mut impl ImageSink) -> io::Result<()> {
        match self.data {
            Some(d) => sink.write_at(self.offset, d),
            None => sink.zero(self.offset, self.len),
        }
    }
}

/// Checks and reads a whole undo entry (entry header, CRC, frame) in place.
pub fn undo_entry_view(bytes: &[u8], offset: u64) -> Result<UndoView<'_>, JournalDamage> {
    let corrupt = |reason: String| JournalDamage::Corrupt { offset, reason };
    if bytes.len() < ENTRY_HEADER_LEN {
        return Err(corrupt("not an undo entry: too short".into()));
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if bytes.len() != ENTRY_HEADER_LEN + len {
        return Err(corrupt(format!(
            "not an undo entry of {} bytes",
            bytes.len()
        )));
    }
    let frame = &bytes[ENTRY_HEADER_LEN..];
    let actual = crc32c::crc32c(frame);
    if actual != crc {
        return Err(corrupt(format!(
            "CRC32C mismatch (stored {crc:#010x}, computed {actual:#010x})"
        )));
    }
    if frame.len() < 2 || frame[..2] != UNDO_MAGIC {
        return Err(corrupt("not an undo entry".into()));
    }
    undo_view(frame, offset)
}

fn undo_view(frame: &[u8], offset: u64) -> Result<UndoView<'_>, JournalDamage> {
    let corrupt = |reason: String| JournalDamage::Corrupt { offset, reason };
    if frame.len() < UNDO_HEADER_LEN {
        return Err(corrupt(format!(
            "undo entry of {} bytes is too short",
            frame.len()
        )));
    }
    let u64_at = |i: usize| u64::from_le_bytes(frame[i..i + 8].try_into().expect("8 bytes"));
    let (kind, seq, at, len) = (frame[2], u64_at(8), u64_at(16), u64_at(24));
    if frame[3] != 0 || frame[4..8] != [0; 4] {
        return Err(corrupt("undo entry: reserved bytes are not zero".into()));
    }
    if len == 0 || len as usize > MAX_UNDO_CHUNK || at.checked_add(len).is_none() {
        return Err(corrupt(format!(
            "undo entry: length {len} at {at} is out of range"
        )));
    }
    let data = &frame[UNDO_HEADER_LEN..];
    let data = match kind {
        UNDO_KIND_DATA if data.len() as u64 == len => Some(data),
        UNDO_KIND_ZEROS if data.is_empty() => None,
        UNDO_KIND_DATA | UNDO_KIND_ZEROS => {
            return Err(corrupt(format!(
                "undo entry: {} data bytes for kind {kind} of length {len}",
                data.len()
            )))
        }
        other => return Err(corrupt(format!("undo entry: unknown kind {other}"))),
    };
    Ok(UndoView {
        seq,
        offset: at,
        len,
        data,
    })
}

fn decode_undo(frame: &[u8], offset: u64) -> Result<UndoEntry, JournalDamage> {
    let v = undo_view(frame, offset)?;
    Ok(UndoEntry {
        seq: v.seq,
        offset: v.offset,
        before: match v.data {
            Some(d) => Before::Data(Bytes::copy_from_slice(d)),
            None => Before::Zeros(v.len),
        },
    })
}

/// Why reading stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalDamage {
    #[error("incomplete entry at offset {offset} (torn tail)")]
    Incomplete { offset: u64 },
    #[error("entry at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
}

impl JournalDamage {
    pub fn offset(&self) -> u64 {
        match self {
            JournalDamage::Incomplete { offset } | JournalDamage::Corrupt { offset, .. } => *offset,
        }
    }
}

/// Errors opening or reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{file}: {source}")]
    Io { file: String, source: io::Error },
    #[error("{file}: not a journal (bad magic)")]
    BadMagic { file: String },
    #[error(
        "{file}: journal version {version} is not supported (this build reads {JOURNAL_VERSION})"
    )]
    Version { file: String, version: u32 },
}

/// Decodes one record entry from the front of `bytes` (an undo entry is damage here:
/// see [`decode_any_entry`]).
///
/// Returns the record and the entry's length, `Ok(None)` if `bytes` holds only part of an
/// entry, or the damage found.
pub fn decode_entry(bytes: &[u8], offset: u64) -> Result<Option<(Record, usize)>, JournalDamage> {
    match decode_any_entry(bytes, offset)? {
        None => Ok(None),
        Some((JournalEntry::Record(r), used)) => Ok(Some((r, used))),
        Some((JournalEntry::Undo(_), _)) => Err(JournalDamage::Corrupt {
            offset,
            reason: "an undo entry where a record was expected".into(),
        }),
    }
}

/// Decodes one entry, record or undo, from the front of `bytes`: the entry and its
/// length, `Ok(None)` if `bytes` holds only part of an entry, or the damage found.
pub fn decode_any_entry(
    bytes: &[u8],
    offset: u64,
) -> Result<Option<(JournalEntry, usize)>, JournalDamage> {
    if bytes.len() < ENTRY_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if !(FRAME_HEADER_LEN..=MAX_ENTRY_FRAME).contains(&len) {
        return Err(JournalDamage::Corrupt {
            offset,
            reason: format!("entry length {len} is out of range"),
        });
    }
    if bytes.len() < ENTRY_HEADER_LEN + len {
        return Ok(None);
    }
    let frame = &bytes[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + len];
    let actual = crc32c::crc32c(frame);
    if actual != crc {
        return Err(JournalDamage::Corrupt {
            offset,
            reason: format!("CRC32C mismatch (stored {crc:#010x}, computed {actual:#010x})"),
        });
    }
    let used = ENTRY_HEADER_LEN + len;
    if frame[..2] == UNDO_MAGIC {
        return Ok(Some((
            JournalEntry::Undo(decode_undo(frame, offset)?),
            used,
        )));
    }
    let mut buf = BytesMut::from(frame);
    match decode_frame(&mut buf) {
        Ok(Some(Frame::Record(r))) if buf.is_empty() => Ok(Some((JournalEntry::Record(r), used))),
        Ok(_) => Err(JournalDamage::Corrupt {
            offset,
            reason: "entry does not hold exactly one record frame".into(),
        }),
        Err(e) => Err(JournalDamage::Corrupt {
            offset,
            reason: e.to_string(),
        }),
    }
}

/// How much of a journal a reader asks for at once.
const READ_AHEAD: usize = 1 << 20;

/// Reads a journal's entries in order, from the header or from a given offset, through
/// [`DurableFile`] (a real file, or memory in the model test).
#[derive(Debug)]
pub struct JournalReader<F = File> {
    /// The file's name, for messages.
    name: String,
    file: F,
    /// The file's size when opened: nothing past it is read.
    len: u64,
    /// Offset of the next entry.
    offset: u64,
    /// Bytes read ahead; `buf[pos..]` starts at `offset`.
    buf: Vec<u8>,
    pos: usize,
    /// Where reading stopped, if the file did not end cleanly.
    damage: Option<JournalDamage>,
}

impl JournalReader<File> {
    /// Opens the journal at `path` (see [`JournalReader::new`]).
    pub fn open(path: &Path, start: u64) -> Result<Self, JournalError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| JournalError::Io {
            file: name.clone(),
            source,
        })?;
        JournalReader::new(file, name, start)
    }
}

impl<F: DurableFile> JournalReader<F> {
    /// Checks `file`'s header and positions at `start` (an entry boundary;
    /// [`JOURNAL_HEADER_LEN`] for the first entry). `name` is used in messages.
    pub fn new(file: F, name: String, start: u64) -> Result<Self, JournalError> {
        let io_err = |source| JournalError::Io {
            file: name.clone(),
            source,
        };
        let len = file.size().map_err(io_err)?;
        let mut header = [0u8; 16];
        file.read_at(&mut header, 0).map_err(io_err)?;
        if header[..8] != JOURNAL_MAGIC {
            return Err(JournalError::BadMagic { file: name });
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if !(OLDEST_JOURNAL_VERSION..=JOURNAL_VERSION).contains(&version) {
            return Err(JournalError::Version {
                file: name,
                version,
            });
        }
        Ok(JournalReader {
            name,
            file,
            len,
            offset: start.max(JOURNAL_HEADER_LEN),
            buf: Vec::new(),
            pos: 0,
            damage: None,
        })
    }

    /// Makes at least `want` bytes from `offset` on available in `buf[pos..]`, or as
    /// many as the file holds; returns how many are available.
    fn fill(&mut self, want: usize) -> Result<usize, JournalError> {
        let have = self.buf.len() - self.pos;
        if have >= want {
            return Ok(have);
        }
        // Keep what is left of the read-ahead, then read the next stretch after it.
        self.buf.drain(..self.pos);
        self.pos = 0;
        let from = self.offset + have as u64;
        let left = usize::try_from(self.len.saturating_sub(from)).unwrap_or(usize::MAX);
        let n = (want.max(READ_AHEAD) - have).min(left);
        self.buf.resize(have + n, 0);
        self.file
            .read_at(&mut self.buf[have..], from)
            .map_err(|source| JournalError::Io {
                file: self.name.clone(),
                source,
            })?;
        Ok(self.buf.len())
    }

    /// The next record and the offset just past it, undo entries skipped; `Ok(None)` at
    /// the end of the valid entries (see [`Self::damage`] for why, if not a clean end).
    pub fn next_record(&mut self) -> Result<Option<(Record, u64)>, JournalError> {
        loop {
            match self.next_entry()? {
                Some((JournalEntry::Record(r), end)) => return Ok(Some((r, end))),
                Some((JournalEntry::Undo(_), _)) => {}
                None => return Ok(None),
            }
        }
    }

    /// The next entry, record or undo, and the offset just past it; `Ok(None)` at the
    /// end of the valid entries.
    pub fn next_entry(&mut self) -> Result<Option<(JournalEntry, u64)>, JournalError> {
        if self.damage.is_some() {
            return Ok(None);
        }
        let got = self.fill(ENTRY_HEADER_LEN)?;
        if got == 0 {
            return Ok(None);
        }
        if got >= ENTRY_HEADER_LEN {
            let head = &self.buf[self.pos..self.pos + 4];
            let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
            if len <= MAX_ENTRY_FRAME {
                self.fill(ENTRY_HEADER_LEN + len)?;
            }
        }
        match decode_any_entry(&self.buf[self.pos..], self.offset) {
            Ok(Some((entry, used))) => {
                self.pos += used;
                self.offset += used as u64;
                Ok(Some((entry, self.offset)))
            }
            Ok(None) => {
                self.damage = Some(JournalDamage::Incomplete {
                    offset: self.offset,
                });
                Ok(None)
            }
            Err(d) => {
                self.damage = Some(d);
                Ok(None)
            }
        }
    }

    /// Reads nothing at or past `end` (entries appended after a snapshot, say).
    pub fn limit(&mut self, end: u64) {
        self.len = self.len.min(end);
    }

    /// Offset of the next entry (the end of the valid prefix once reading has stopped).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Why reading stopped early, if it did.
    pub fn damage(&self) -> Option<&JournalDamage> {
        self.damage.as_ref()
    }

    /// The journal's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Something a journal can be replayed into: a file, or memory in the verifier.
pub trait ImageSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// The image range `record` changes, if any: `(offset, len)`.
pub fn record_range(record: &Record) -> Option<(u64, u64)> {
    match record {
        Record::Write { offset, data, .. } if !data.is_empty() => {
            Some((*offset, data.len() as u64))
        }
        Record::Zero { offset, len, .. } if *len > 0 => Some((*offset, *len)),
        _ => None,
    }
}

/// Applies one record to `sink` (tags change nothing).
pub fn apply_record(record: &Record, sink: &mut impl ImageSink) -> io::Result<()> {
    match record {
        Record::Write { offset, data, .. } => sink.write_at(*offset, data),
        Record::Zero { offset, len, .. } => sink.zero(*offset, *len),
        Record::Tag { .. } | Record::Resync { .. } => Ok(()),
    }
}

/// Replays the journal at `path` into `sink` up to and including sequence number
/// `upto_seq` (see [`replay_from`]).
pub fn replay(path: &Path, upto_seq: u64, sink: &mut impl ImageSink) -> Result<u64, String> {
    let reader = JournalReader::open(path, JOURNAL_HEADER_LEN).map_err(|e| e.to_string())?;
    replay_from(reader, upto_seq, sink)
}

/// Replays `reader`'s entries into `sink` up to and including sequence number
/// `upto_seq`; returns the last sequence number applied. Errors if the journal ends (or
/// is damaged) before `upto_seq`.
pub fn replay_from<F: DurableFile>(
    mut reader: JournalReader<F>,
    upto_seq: u64,
    sink: &mut impl ImageSink,
) -> Result<u64, String> {
    let mut last = 0;
    while last < upto_seq {
        match reader.next_record().map_err(|e| e.to_string())? {
            Some((record, _)) => {
                // Sequence numbers increase; they may skip where the relay coalesced
                // superseded records away, but never past a recovery point.
                if record.seq() <= last || record.seq() > upto_seq {
                    return Err(format!(
                        "{}: sequence {} follows {last} (replaying up to {upto_seq})",
                        reader.name(),
                        record.seq()
                    ));
                }
                apply_record(&record, sink)
                    .map_err(|e| format!("applying record {}: {e}", record.seq()))?;
                last = record.seq();
            }
            None => {
                let why = reader
                    .damage()
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "end of journal".into());
                return Err(format!(
                    "{}: {why} before sequence {upto_seq} (last {last})",
                    reader.name()
                ));
            }
        }
    }
    Ok(last)
}

/// An in-memory disk image, for verification and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage(pub Vec<u8>);

impl ImageSink for MemoryImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start
            .checked_add(data.len())
            .filter(|&e| e <= self.0.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond image end"))?;
        self.0[start..end].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let start = offset as usize;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= self.0.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "zero beyond image end"))?;
        self.0[start..end].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn entry_round_trips_and_detects_corruption() {
        let r = Record::Write {
            seq: 1,
            offset: 512,
            data: Bytes::from(vec![7; 512]),
        };
        let mut buf = BytesMut::new();
        encode_entry(&r, &mut buf);
        let (back, used) = decode_entry(&buf, 16).unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(used, buf.len());
        assert_eq!(decode_entry(&buf[..buf.len() - 1], 16), Ok(None));
        let mut bad = buf.to_vec();
        bad[100] ^= 1;
        assert!(matches!(
            decode_entry(&bad, 16),
            Err(JournalDamage::Corrupt { offset: 16, .. })
        ));
    }

    #[test]
    fn memory_image_refuses_out_of_range() {
        let mut m = MemoryImage(vec![0; 1024]);
        assert!(m.write_at(1024, &[1]).is_err());
        assert!(m.zero(512, 1024).is_err());
        m.write_at(512, &[1; 512]).unwrap();
        m.zero(512, 256).unwrap();
        assert_eq!(&m.0[512..768], &[0; 256][..]);
        assert_eq!(&m.0[768..1024], &[1; 256][..]);
    }
}
