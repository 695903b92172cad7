//! The write-log format: a recorded workload that `churn replay` feeds through the path.
//!
//! Captured from a real system (or made by `churn make-log`), it lists, in the order they
//! happened, every change to every disk, and the system's consistency points. Version 2,
//! little-endian (`docs/WRITE-LOG-FORMAT.md` has the byte tables; `tests/golden.rs` pins
//! them):
//!
//! ```text
//! file   = header record*
//! header = magic "FBRWLOG1" (8) | version u32 = 2 | reserved u32 = 0     (16 bytes)
//! record = kind u8, then by kind:
//!   1 DISK  : index u32 | size u64 | vm_len u8 | vm | disk u32   declares disk `index`
//!   2 WRITE : index u32 | offset u64 | len u32 | data[len]       len <= 1 MiB
//!   3 ZERO  : index u32 | offset u64 | len u64
//!   4 TAG   : tag_kind u8 (1 crash, 2 app) | name_len u8 | name   (version 2 only)
//! ```
//!
//! A disk must be declared before it is written. Offsets and lengths must be multiples
//! of 512 and stay inside the declared size; [`LogReader`] checks all of it and names the
//! record that breaks a rule. A TAG is a consistency point of every disk declared before
//! it: each disk's state after exactly the changes before the TAG. Version 1 files (no
//! TAG) still read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fbr_protocol::{names::validate_name, StreamId, MAX_WRITE_BYTES, SECTOR_SIZE};

use crate::workload::{Change, Content, ContentPools, DiskGenerator, Profile};

pub const LOG_MAGIC: [u8; 8] = *b"FBRWLOG1";
/// The version this code writes; it reads 1 and 2.
pub const LOG_VERSION: u32 = 2;
/// The first version with TAG records.
const FIRST_VERSION_WITH_TAGS: u32 = 2;
const KIND_DISK: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_ZERO: u8 = 3;
const KIND_TAG: u8 = 4;
/// Longest tag name, bytes.
pub const MAX_TAG_NAME: usize = 128;

/// One record of a write log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    Disk { index: u32, size: u64, id: StreamId },
    Change { index: u32, change: Change },
    Tag(LogTag),
}

/// A consistency point of the captured system (a TAG record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTag {
    /// App-consistent (the applications were quiesced) rather than crash-consistent.
    pub app: bool,
    /// What the capture called it (e.g. a snapshot's name); may be empty.
    pub name: String,
}

/// A malformed log, with the position of the offending record.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("write log: {0}")]
    Io(#[from] io::Error),
    #[error("write log record {record} (byte {offset}): {reason}")]
    Invalid {
        record: u64,
        offset: u64,
        reason: String,
    },
}

/// The 16-byte header.
pub fn encode_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&LOG_MAGIC);
    h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// Appends one record's encoding to `out`.
pub fn encode_record(r: &LogRecord, out: &mut BytesMut) {
    match r {
        LogRecord::Disk { index, size, id } => {
            out.put_u8(KIND_DISK);
            out.put_u32_le(*index);
            out.put_u64_le(*size);
            out.put_u8(id.vm.len() as u8);
            out.put_slice(id.vm.as_bytes());
            out.put_u32_le(id.disk);
        }
        LogRecord::Change {
            index,
            change: Change::Write { offset, data },
        } => {
            out.put_u8(KIND_WRITE);
            out.put_u32_le(*index);
            out.put_u64_le(*offset);
            out.put_u32_le(data.len() as u32);
            out.put_slice(data);
        }
        LogRecord::Change {
            index,
            change: Change::Zero { offset, len },
        } => {
            out.put_u8(KIND_ZERO);
            out.put_u32_le(*index);
            out.put_u64_le(*offset);
            out.put_u64_le(*len);
        }
        LogRecord::Tag(tag) => {
            out.put_u8(KIND_TAG);
            out.put_u8(if tag.app { 2 } else { 1 });
            out.put_u8(tag.name.len() as u8);
            out.put_slice(tag.name.as_bytes());
        }
    }
}

/// Decodes one record from the front of `b` (structure only; [`LogReader`] checks the
/// rules that need context). `Ok(None)`: `b` holds only part of a record.
pub fn decode_record(b: &[u8]) -> Result<Option<(LogRecord, usize)>, String> {
    let mut p = b;
    if p.is_empty() {
        return Ok(None);
    }
    let kind = p.get_u8();
    let need = |p: &[u8], n: usize| p.len() >= n;
    let rec = match kind {
        KIND_DISK => {
            if !need(p, 13) {
                return Ok(None);
            }
            let index = p.get_u32_le();
            let size = p.get_u64_le();
            let vm_len = p.get_u8() as usize;
            if !need(p, vm_len + 4) {
                return Ok(None);
            }
            let vm = std::str::from_utf8(&p[..vm_len])
                .map_err(|_| "VM name is not UTF-8".to_string())?
                .to_owned();
            validate_name(&vm)?;
            p.advance(vm_len);
            let disk = p.get_u32_le();
            LogRecord::Disk {
                index,
                size,
                id: StreamId { vm, disk },
            }
        }
        KIND_WRITE => {
            if !need(p, 16) {
                return Ok(None);
            }
            let index = p.get_u32_le();
            let offset = p.get_u64_le();
            let len = p.get_u32_le() as usize;
            if len == 0 || len > MAX_WRITE_BYTES {
                return Err(format!(
                    "write length {len} is not in 1..={MAX_WRITE_BYTES}"
                ));
            }
            if !need(p, len) {
                return Ok(None);
            }
            let data = Bytes::copy_from_slice(&p[..len]);
            p.advance(len);
            LogRecord::Change {
                index,
                change: Change::Write { offset, data },
            }
        }
        KIND_ZERO => {
            if !need(p, 20) {
                return Ok(None);
            }
            let index = p.get_u32_le();
            let offset = p.get_u64_le();
            let len = p.get_u64_le();
            if len == 0 {
                return Err("zero length is 0".into());
            }
            LogRecord::Change {
                index,
                change: Change::Zero { offset, len },
            }
        }
        KIND_TAG => {
            if !need(p, 2) {
                return Ok(None);
            }
            let app = match p.get_u8() {
                1 => false,
                2 => true,
                k => return Err(format!("tag kind {k} is neither 1 (crash) nor 2 (app)")),
            };
            let name_len = p.get_u8() as usize;
            if name_len > MAX_TAG_NAME {
                return Err(format!(
                    "tag name of {name_len} bytes, at most {MAX_TAG_NAME}"
                ));
            }
            if !need(p, name_len) {
                return Ok(None);
            }
            let name = std::str::from_utf8(&p[..name_len])
                .map_err(|_| "tag name is not UTF-8".to_string())?;
            if name.chars().any(char::is_control) {
                return Err("tag name holds control characters".into());
            }
            let name = name.to_owned();
            p.advance(name_len);
            LogRecord::Tag(LogTag { app, name })
        }
        k => return Err(format!("unknown record kind {k}")),
    };
    Ok(Some((rec, b.len() - p.len())))
}

/// Writes a log file.
#[derive(Debug)]
pub struct LogWriter {
    out: BufWriter<File>,
    buf: BytesMut,
}

impl LogWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&encode_header())?;
        Ok(LogWriter {
            out,
            buf: BytesMut::new(),
        })
    }

    pub fn append(&mut self, r: &LogRecord) -> io::Result<()> {
        self.buf.clear();
        encode_record(r, &mut self.buf);
        self.out.write_all(&self.buf)
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// Reads and checks a log file record by record.
#[derive(Debug)]
pub struct LogReader {
    input: BufReader<File>,
    buf: BytesMut,
    offset: u64,
    record: u64,
    disks: HashMap<u32, (StreamId, u64)>,
    version: u32,
    eof: bool,
}

impl LogReader {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut header = [0u8; 16];
        input
            .read_exact(&mut header)
            .map_err(|_| invalid(0, 0, "file shorter than the 16-byte header"))?;
        if header[..8] != LOG_MAGIC {
            return Err(invalid(0, 0, "bad magic: not a write log"));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if !(1..=LOG_VERSION).contains(&version) {
            return Err(invalid(
                0,
                8,
                &format!("unsupported version {version} (this churn reads 1 to {LOG_VERSION})"),
            ));
        }
        Ok(LogReader {
            input,
            buf: BytesMut::new(),
            offset: 16,
            record: 0,
            disks: HashMap::new(),
            version,
            eof: false,
        })
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The next checked record; `Ok(None)` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<LogRecord>, LogError> {
        loop {
            match decode_record(&self.buf).map_err(|r| invalid(self.record, self.offset, &r))? {
                Some((rec, used)) => {
                    self.check(&rec)?;
                    self.buf.advance(used);
                    self.offset += used as u64;
                    self.record += 1;
                    return Ok(Some(rec));
                }
                None if self.eof => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(invalid(
                        self.record,
                        self.offset,
                        "file ends in the middle of a record",
                    ));
                }
                None => {
                    let mut chunk = vec![0u8; 256 * 1024];
                    let n = self.input.read(&mut chunk)?;
                    if n == 0 {
                        self.eof = true;
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    fn check(&mut self, rec: &LogRecord) -> Result<(), LogError> {
        let (record, offset) = (self.record, self.offset);
        match rec {
            LogRecord::Disk { index, size, id } => {
                if *size == 0 || size % 4096 != 0 || *size < 1 << 20 {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("disk size {size} must be a multiple of 4096 and at least 1 MiB"),
                    ));
                }
                if self.disks.insert(*index, (id.clone(), *size)).is_some() {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("disk index {index} declared twice"),
                    ));
                }
            }
            LogRecord::Change { index, change } => {
                let Some((_, size)) = self.disks.get(index) else {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("disk index {index} used before it is declared"),
                    ));
                };
                let (o, l) = match change {
                    Change::Write { offset, data } => (*offset, data.len() as u64),
                    Change::Zero { offset, len } => (*offset, *len),
                };
                if o % SECTOR_SIZE != 0 || l % SECTOR_SIZE != 0 {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("offset {o} / length {l} not aligned to 512 bytes"),
                    ));
                }
                if o.checked_add(l).is_none_or(|end| end > *size) {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("range {o}+{l} ends beyond the disk size {size}"),
                    ));
                }
            }
            LogRecord::Tag(_) => {
                if self.version < FIRST_VERSION_WITH_TAGS {
                    return Err(invalid(
                        record,
                        offset,
                        &format!("a TAG record in a version {} log", self.version),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn invalid(record: u64, offset: u64, reason: &str) -> LogError {
    LogError::Invalid {
        record,
        offset,
        reason: reason.to_owned(),
    }
}

/// What a whole log holds (read once, so also a full validation pass).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSummary {
    /// Every disk declared, with its index and size.
    pub disks: Vec<(u32, StreamId, u64)>,
    /// Every TAG, in order: the `n`-th (from 1) is the log's tag number `n`.
    pub tags: Vec<LogTag>,
    pub version: u32,
}

/// Reads a whole log: its disks and its tags.
pub fn scan_log(path: &Path) -> Result<LogSummary, LogError> {
    let mut r = LogReader::open(path)?;
    let mut summary = LogSummary {
        version: r.version(),
        ..LogSummary::default()
    };
    while let Some(rec) = r.next_record()? {
        match rec {
            LogRecord::Disk { index, size, id } => summary.disks.push((index, id, size)),
            LogRecord::Tag(tag) => summary.tags.push(tag),
            LogRecord::Change { .. } => {}
        }
    }
    Ok(summary)
}

impl LogSummary {
    /// One agent plan per disk of the log at `path` (`path` as the plans will name
    /// it), all in replication group `group`.
    pub fn plans(&self, path: &Path, group: &str) -> Vec<crate::agent::DiskPlan> {
        self.disks
            .iter()
            .map(|(index, id, size)| crate::agent::DiskPlan {
                id: id.clone(),
                disk_size: *size,
                group: group.to_owned(),
                source: crate::source::SourceSpec::Log {
                    path: path.to_owned(),
                    index: *index,
                },
                start: Default::default(),
            })
            .collect()
    }
}

/// Every disk declared in a log, with its index and size.
pub fn scan_disks(path: &Path) -> Result<Vec<(u32, StreamId, u64)>, LogError> {
    Ok(scan_log(path)?.disks)
}

/// What one disk's reader of a log meets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogItem {
    Change(Change),
    /// The log's tag number `n` (from 1): the disk's changes before it are all drawn,
    /// and none after it may be until the tag is cut.
    Tag(u64),
}

/// The changes of one disk of a log, in order, and the tags that cover it.
#[derive(Debug)]
pub struct LogDiskSource {
    reader: LogReader,
    index: u32,
    /// Whether this disk was declared yet (a tag before its declaration is not its own).
    declared: bool,
    tags_seen: u64,
}

impl LogDiskSource {
    pub fn open(path: &Path, index: u32) -> Result<Self, LogError> {
        Ok(LogDiskSource {
            reader: LogReader::open(path)?,
            index,
            declared: false,
            tags_seen: 0,
        })
    }

    /// The next change of this disk, or the next tag that covers it; `Ok(None)` at the
    /// end of the log.
    pub fn next_item(&mut self) -> Result<Option<LogItem>, LogError> {
        while let Some(rec) = self.reader.next_record()? {
            match rec {
                LogRecord::Change { index, change } if index == self.index => {
                    return Ok(Some(LogItem::Change(change)));
                }
                LogRecord::Disk { index, .. } if index == self.index => self.declared = true,
                LogRecord::Tag(_) => {
                    self.tags_seen += 1;
                    if self.declared {
                        return Ok(Some(LogItem::Tag(self.tags_seen)));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// The next change of this disk, passing over tags.
    pub fn next_change(&mut self) -> Result<Option<Change>, LogError> {
        while let Some(item) = self.next_item()? {
            if let LogItem::Change(change) = item {
                return Ok(Some(change));
            }
        }
        Ok(None)
    }
}

/// How often a generated log has TAG records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeneratedTags {
    /// A TAG after every this many changes (0: none).
    pub every: u64,
    /// Every this many TAGs is app-consistent (0: none).
    pub app_every: u64,
}

/// Writes a log of `records` generated changes over `vms` x `disks` disks named
/// `vm<N>`/`<disk>`, interleaved round-robin (`profile: None` cycles every profile), with
/// TAG records as `tags` says.
#[allow(clippy::too_many_arguments)]
pub fn generate_log(
    out: &Path,
    vms: u32,
    disks: u32,
    disk_size: u64,
    profile: Option<Profile>,
    content: Content,
    seed: u64,
    records: u64,
    tags: GeneratedTags,
) -> io::Result<()> {
    let pools = ContentPools::new(seed);
    let mut log = LogWriter::create(out)?;
    let mut gens = Vec::new();
    for v in 0..vms {
        for d in 0..disks {
            let index = gens.len() as u32;
            let p = profile.unwrap_or(Profile::ALL[index as usize % Profile::ALL.len()]);
            let id = StreamId {
                vm: format!("vm{}", v + 1),
                disk: d,
            };
            log.append(&LogRecord::Disk {
                index,
                size: disk_size,
                id,
            })?;
            gens.push(DiskGenerator::new(
                seed,
                v,
                d,
                p,
                content,
                disk_size,
                pools.clone(),
            ));
        }
    }
    for i in 0..records {
        let index = (i % gens.len() as u64) as usize;
        let change = gens[index].next_change();
        log.append(&LogRecord::Change {
            index: index as u32,
            change,
        })?;
        if tags.every > 0 && (i + 1) % tags.every == 0 {
            let n = (i + 1) / tags.every;
            let app = tags.app_every > 0 && n % tags.app_every == 0;
            log.append(&LogRecord::Tag(LogTag {
                app,
                name: format!("{}-{n}", if app { "app" } else { "crash" }),
            }))?;
        }
    }
    log.finish()
}
