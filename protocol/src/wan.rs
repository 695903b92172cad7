//! The WAN batch: how the relay packs records for the master target so that every byte
//! on the link counts (sans-IO codec; `docs/PROTOCOL.md` has the byte tables).
//!
//! A `Batch` frame (type `0x13`, relay -> master target only) carries the records of one
//! stream from `first_seq` to `last_seq`, reduced:
//!
//! - **zero elision**: a `Write` whose payload is all zero travels as a `Zero` item; in
//!   other writes every all-zero 4 KiB block is one marker byte;
//! - **dedup**: a 4 KiB block the master target already holds travels as its SHA-256
//!   ([`block_hash`]); the master target looks it up in its content index, re-verifies
//!   the hash of what it reads, and answers [`crate::ErrorCode::UnknownReference`] if it
//!   cannot produce it (the relay then resends that record in full);
//! - **coalescing**: records superseded within the batch may be left out, so sequence
//!   numbers inside a batch may skip; a batch never spans a recovery point (`Tag`), so
//!   the state after `last_seq` is exact;
//! - **compression** of the body: LZ4 (block format, this batch alone) when that makes it
//!   smaller, or the next flushed piece of the stream's zstd context
//!   ([`crate::codec`]), whose history spans every zstd-coded batch of the stream.
//!
//! ```text
//! payload = version u8 (1 or 2) | flags u8 | reserved u16 (=0)
//!         | first_seq u64 | last_seq u64 | item_count u32 | body_len u32 | coded body
//! flags   = bit 0: body is LZ4 | bit 1 (version 2 only): body is the stream's next zstd piece
//!           (at most one bit set; none: the body as is)
//! item    = 1 Write | seq u64 | offset u64 | len u32 | block*   (len/4096 rounded up)
//!         | 2 Zero  | seq u64 | offset u64 | len u64
//!         | 3 Tag   | seq u64 | id u64 | kind u8 | members u32 | group_len u8 | group
//!         | 4 Resync | the Resync record's 52 payload bytes (docs/PROTOCOL.md)
//! block   = 0 literal | bytes (4096, or what remains of len)
//!         | 1 zero
//!         | 2 ref     | sha256 (32)
//! ```
//!
//! Invariants checked by [`decode_batch`]: items' sequence numbers strictly increase
//! from `first_seq` and the last one is `last_seq`; the body is at most
//! [`MAX_BATCH_BODY`] bytes and writes reconstruct at most [`MAX_BATCH_DATA`] bytes, so
//! a hostile batch cannot make the receiver allocate without bound.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::codec::{CodecError, StreamCompressor, StreamDecompressor};
use crate::error::DecodeError;
use crate::frame::{Record, TagKind, MAX_WRITE_BYTES};
use crate::names::validate_name;

/// Version byte of a batch payload without zstd (what a master target that grants no
/// zstd window receives, byte for byte what relays before zstd sent).
pub const BATCH_VERSION: u8 = 1;
/// Version byte of a batch whose body continues the stream's zstd context.
pub const BATCH_VERSION_ZSTD: u8 = 2;
/// Dedup and zero-elision granularity.
pub const BLOCK_SIZE: usize = 4096;
/// Most bytes of (uncompressed) body in one batch.
pub const MAX_BATCH_BODY: usize = 4 << 20;
/// Most bytes the writes of one batch may reconstruct (literal, zero and referenced).
pub const MAX_BATCH_DATA: usize = 16 << 20;
/// Bytes before the body.
pub const BATCH_HEADER_LEN: usize = 28;
/// The largest `Batch` frame payload.
pub const MAX_BATCH_FRAME_PAYLOAD: usize = BATCH_HEADER_LEN + MAX_BATCH_BODY;

const FLAG_LZ4: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_TAG: u8 = 3;
const KIND_RESYNC: u8 = 4;
const BLOCK_LITERAL: u8 = 0;
const BLOCK_ZERO: u8 = 1;
const BLOCK_REF: u8 = 2;

/// SHA-256 of a block: the dedup key (hardware-accelerated where the CPU has SHA).
pub fn block_hash(block: &[u8]) -> [u8; 32] {
    Sha256::digest(block).into()
}

/// Whether `bytes` are all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
        && rest.iter().all(|b| *b == 0)
}

/// One 4 KiB (or shorter, last) block of a reduced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    Literal(Bytes),
    Zero,
    Ref([u8; 32]),
}

/// One record of a batch, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A write of `len` bytes at `offset`, as blocks.
    Write {
        seq: u64,
        offset: u64,
        len: u32,
        blocks: Vec<Block>,
    },
    /// A record that travels whole: `Zero` or `Tag`.
    Plain(Record),
}

impl Item {
    pub fn seq(&self) -> u64 {
        match self {
            Item::Write { seq, .. } => *seq,
            Item::Plain(r) => r.seq(),
        }
    }

    /// Bytes of disk this item writes when reconstructed (0 for zero ranges and tags).
    fn data_len(&self) -> usize {
        match self {
            Item::Write { len, .. } => *len as usize,
            Item::Plain(_) => 0,
        }
    }
}

/// A decoded batch (references not yet resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    pub last_seq: u64,
    pub items: Vec<Item>,
}

/// How a batch body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCoding {
    None,
    Lz4,
    Zstd,
}

/// What the encoder may do to a body.
#[derive(Debug)]
pub enum Compressor<'a> {
    /// Send it as is.
    None,
    /// LZ4 it, kept only if smaller.
    Lz4,
    /// Feed it to the stream's zstd context; always kept (the receiver's history must
    /// see every byte the sender's did).
    Zstd(&'a mut StreamCompressor),
}

/// Sizes of an encoded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Bytes of the body before compression.
    pub body_len: usize,
    /// Bytes of the frame payload (what travels, before QUIC/TLS).
    pub payload_len: usize,
    /// How the body travels.
    pub coding: BodyCoding,
}

/// Size of an item in the body.
pub fn item_body_len(item: &Item) -> usize {
    match item {
        Item::Write { blocks, .. } => {
            21 + blocks
                .iter()
                .map(|b| match b {
                    Block::Literal(d) => 1 + d.len(),
                    Block::Zero => 1,
                    Block::Ref(_) => 33,
                })
                .sum::<usize>()
        }
        Item::Plain(Record::Zero { .. }) => 25,
        Item::Plain(Record::Tag { group, .. }) => 23 + group.len(),
        Item::Plain(Record::Resync { .. }) => 1 + crate::frame::RESYNC_PAYLOAD_LEN,
        Item::Plain(Record::Write { data, .. }) => {
            21 + data.len().div_ceil(BLOCK_SIZE) + data.len()
        }
    }
}

/// Encodes a batch into `out` as a frame payload, compressing the body as `compressor`
/// says. `body` is scratch space (reused between calls).
///
/// Panics on a caller bug: items out of order or over the limits (the relay builds
/// batches within them). A zstd failure (memory) is an error: the stream's context is
/// then unusable and the stream must end.
pub fn encode_batch(
    batch: &Batch,
    compressor: Compressor<'_>,
    body: &mut Vec<u8>,
    out: &mut BytesMut,
) -> Result<Encoded, CodecError> {
    body.clear();
    for item in &batch.items {
        encode_item(item, body);
    }
    assert!(body.len() <= MAX_BATCH_BODY, "batch body over the limit");
    let zstd = matches!(compressor, Compressor::Zstd(_));
    out.put_u8(if zstd {
        BATCH_VERSION_ZSTD
    } else {
        BATCH_VERSION
    });
    let flags_at = out.len();
    out.put_u8(0);
    out.put_u16_le(0);
    out.put_u64_le(batch.first_seq);
    out.put_u64_le(batch.last_seq);
    out.put_u32_le(batch.items.len() as u32);
    out.put_u32_le(body.len() as u32);
    let start = out.len();
    let mut coding = BodyCoding::None;
    match compressor {
        Compressor::None => {}
        Compressor::Lz4 => {
            let bound = lz4_flex::block::get_maximum_output_size(body.len());
            out.resize(start + bound, 0);
            match lz4_flex::block::compress_into(body, &mut out[start..]) {
                Ok(n) if n < body.len() => {
                    out.truncate(start + n);
                    out[flags_at] = FLAG_LZ4;
                    coding = BodyCoding::Lz4;
                }
                _ => out.truncate(start),
            }
        }
        Compressor::Zstd(context) => {
            let mut piece = Vec::new();
            context.compress(body, &mut piece)?;
            out.put_slice(&piece);
            out[flags_at] = FLAG_ZSTD;
            coding = BodyCoding::Zstd;
        }
    }
    if coding == BodyCoding::None {
        out.put_slice(body);
    }
    Ok(Encoded {
        body_len: body.len(),
        payload_len: out.len() - (start - BATCH_HEADER_LEN),
        coding,
    })
}

fn encode_item(item: &Item, out: &mut Vec<u8>) {
    let write_header = |out: &mut Vec<u8>, seq: u64, offset: u64, len: usize| {
        out.put_u8(KIND_WRITE);
        out.put_u64_le(seq);
        out.put_u64_le(offset);
        out.put_u32_le(len as u32);
    };
    match item {
        Item::Write {
            seq,
            offset,
            len,
            blocks,
        } => {
            write_header(out, *seq, *offset, *len as usize);
            for b in blocks {
                match b {
                    Block::Literal(d) => {
                        out.put_u8(BLOCK_LITERAL);
                        out.put_slice(d);
                    }
                    Block::Zero => out.put_u8(BLOCK_ZERO),
                    Block::Ref(h) => {
                        out.put_u8(BLOCK_REF);
                        out.put_slice(h);
                    }
                }
            }
        }
        Item::Plain(Record::Write { seq, offset, data }) => {
            // Whole, as literal blocks.
            write_header(out, *seq, *offset, data.len());
            for chunk in data.chunks(BLOCK_SIZE) {
                out.put_u8(BLOCK_LITERAL);
                out.put_slice(chunk);
            }
        }
        Item::Plain(r) => {
            let kind = match r {
                Record::Zero { .. } => KIND_ZERO,
                Record::Tag { .. } => KIND_TAG,
                Record::Resync { .. } => KIND_RESYNC,
                Record::Write { .. } => unreachable!("writes are encoded above"),
            };
            out.put_u8(kind);
            crate::frame::put_marker_fields(r, out);
        }
    }
}

fn malformed(reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        frame: "Batch",
        reason: reason.into(),
    }
}

fn need(p: &impl Buf, n: usize, what: &str) -> Result<(), DecodeError> {
    if p.remaining() < n {
        return Err(malformed(format!(
            "truncated {what}: {n} bytes needed, {} remain",
            p.remaining()
        )));
    }
    Ok(())
}

/// Decodes a `Batch` frame payload of a stream without a zstd context. References are
/// left for the receiver to resolve ([`resolve`]); everything else is checked here.
pub fn decode_batch(p: Bytes) -> Result<Batch, DecodeError> {
    decode_batch_with(p, None)
}

/// Decodes a `Batch` frame payload; a zstd-coded body continues `zstd`, the stream's
/// context (refused when the stream has none). After an error the context is unusable:
/// the stream ends.
pub fn decode_batch_with(
    mut p: Bytes,
    zstd: Option<&mut StreamDecompressor>,
) -> Result<Batch, DecodeError> {
    need(&p, BATCH_HEADER_LEN, "header")?;
    let version = p.get_u8();
    if version != BATCH_VERSION && version != BATCH_VERSION_ZSTD {
        return Err(malformed(format!("unknown batch version {version}")));
    }
    let flags = p.get_u8();
    let known = if version == BATCH_VERSION_ZSTD {
        FLAG_LZ4 | FLAG_ZSTD
    } else {
        FLAG_LZ4
    };
    if flags & !known != 0 || flags == FLAG_LZ4 | FLAG_ZSTD {
        return Err(malformed(format!(
            "unknown flags {flags:#04x} for version {version}"
        )));
    }
    let _reserved = p.get_u16_le();
    let first_seq = p.get_u64_le();
    let last_seq = p.get_u64_le();
    let count = p.get_u32_le() as usize;
    let body_len = p.get_u32_le() as usize;
    if first_seq == 0 || last_seq < first_seq {
        return Err(malformed(format!(
            "sequence span {first_seq}..={last_seq} is empty or starts at 0"
        )));
    }
    if body_len > MAX_BATCH_BODY {
        return Err(malformed(format!(
            "body of {body_len} bytes exceeds {MAX_BATCH_BODY}"
        )));
    }
    if count == 0 || count > body_len {
        return Err(malformed(format!(
            "{count} items cannot fit a {body_len}-byte body"
        )));
    }
    let mut body = if flags & FLAG_ZSTD != 0 {
        let Some(context) = zstd else {
            return Err(malformed(
                "zstd-coded body on a stream that was granted no zstd window",
            ));
        };
        let out = context
            .decompress(&p, body_len)
            .map_err(|e| malformed(format!("zstd body: {}", e.0)))?;
        Bytes::from(out)
    } else if flags & FLAG_LZ4 != 0 {
        let mut out = vec![0u8; body_len];
        let n = lz4_flex::block::decompress_into(&p, &mut out)
            .map_err(|e| malformed(format!("LZ4 body: {e}")))?;
        if n != body_len {
            return Err(malformed(format!(
                "LZ4 body decompressed to {n} bytes, header says {body_len}"
            )));
        }
        Bytes::from(out)
    } else {
        if p.len() != body_len {
            return Err(malformed(format!(
                "body is {} bytes, header says {body_len}",
                p.len()
            )));
        }
        p
    };
    let mut items = Vec::with_capacity(count.min(4096));
    let mut data = 0usize;
    let mut prev = first_seq - 1;
    for _ in 0..count {
        let item = decode_item(&mut body)?;
        let seq = item.seq();
        if seq <= prev || seq > last_seq {
            return Err(malformed(format!(
                "item sequence {seq} out of order (after {prev}, span ends {last_seq})"
            )));
        }
        prev = seq;
        data += item.data_len();
        if data > MAX_BATCH_DATA {
            return Err(malformed(format!(
                "writes reconstruct more than {MAX_BATCH_DATA} bytes"
            )));
        }
        items.push(item);
    }
    if body.has_remaining() {
        return Err(malformed(format!(
            "{} bytes after the last item",
            body.remaining()
        )));
    }
    if prev != last_seq {
        return Err(malformed(format!(
            "last item is sequence {prev}, span ends at {last_seq}"
        )));
    }
    Ok(Batch {
        first_seq,
        last_seq,
        items,
    })
}

fn decode_item(p: &mut Bytes) -> Result<Item, DecodeError> {
    need(p, 1, "item kind")?;
    match p.get_u8() {
        KIND_WRITE => {
            need(p, 20, "write item")?;
            let seq = p.get_u64_le();
            let offset = p.get_u64_le();
            let len = p.get_u32_le();
            if seq == 0 || len == 0 || len as usize > MAX_WRITE_BYTES {
                return Err(malformed(format!(
                    "write {seq}: length {len} outside 1..={MAX_WRITE_BYTES} or sequence 0"
                )));
            }
            let mut blocks = Vec::with_capacity((len as usize).div_ceil(BLOCK_SIZE));
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(BLOCK_SIZE);
                need(p, 1, "block tag")?;
                blocks.push(match p.get_u8() {
                    BLOCK_LITERAL => {
                        need(p, n, "literal block")?;
                        Block::Literal(p.split_to(n))
                    }
                    BLOCK_ZERO => Block::Zero,
                    BLOCK_REF => {
                        need(p, 32, "block hash")?;
                        let mut h = [0u8; 32];
                        p.copy_to_slice(&mut h);
                        Block::Ref(h)
                    }
                    t => return Err(malformed(format!("write {seq}: unknown block tag {t}"))),
                });
                left -= n;
            }
            Ok(Item::Write {
                seq,
                offset,
                len,
                blocks,
            })
        }
        KIND_ZERO => {
            need(p, 24, "zero item")?;
            let seq = p.get_u64_le();
            let offset = p.get_u64_le();
            let len = p.get_u64_le();
            if seq == 0 || len == 0 {
                return Err(malformed(format!(
                    "zero item {seq}: length 0 or sequence 0"
                )));
            }
            Ok(Item::Plain(Record::Zero { seq, offset, len }))
        }
        KIND_TAG => {
            need(p, 22, "tag item")?;
            let seq = p.get_u64_le();
            let id = p.get_u64_le();
            let kind = match p.get_u8() {
                1 => TagKind::Crash,
                2 => TagKind::App,
                k => return Err(malformed(format!("tag {seq}: unknown kind {k}"))),
            };
            let members = p.get_u32_le();
            let group_len = p.get_u8() as usize;
            need(p, group_len, "tag group")?;
            let group = std::str::from_utf8(&p[..group_len])
                .map_err(|_| malformed(format!("tag {seq}: group is not UTF-8")))?
                .to_owned();
            validate_name(&group).map_err(|r| malformed(format!("tag {seq}: {r}")))?;
            p.advance(group_len);
            if seq == 0 || members == 0 {
                return Err(malformed(format!("tag {seq}: no members or sequence 0")));
            }
            Ok(Item::Plain(Record::Tag {
                seq,
                id,
                kind,
                members,
                group,
            }))
        }
        KIND_RESYNC => Ok(Item::Plain(crate::frame::get_resync_fields("Batch", p)?)),
        k => Err(malformed(format!("unknown item kind {k}"))),
    }
}

/// Turns an item back into the record the agent sent. `lookup` returns the bytes of a
/// referenced block (already checked against its hash and length) or `None`; a missing
/// block is `Err(seq)`.
pub fn resolve(
    item: Item,
    mut lookup: impl FnMut(&[u8; 32], usize) -> Option<Bytes>,
) -> Result<Record, u64> {
    match item {
        Item::Plain(r) => Ok(r),
        Item::Write {
            seq,
            offset,
            len,
            blocks,
        } => {
            let mut data = BytesMut::with_capacity(len as usize);
            let mut left = len as usize;
            for b in blocks {
                let n = left.min(BLOCK_SIZE);
                match b {
                    Block::Literal(d) => data.put_slice(&d),
                    Block::Zero => data.put_bytes(0, n),
                    Block::Ref(h) => match lookup(&h, n) {
                        Some(d) if d.len() == n => data.put_slice(&d),
                        _ => return Err(seq),
                    },
                }
                left -= n;
            }
            Ok(Record::Write {
                seq,
                offset,
                data: data.freeze(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Batch {
        let lit = Bytes::from(vec![7u8; BLOCK_SIZE]);
        Batch {
            first_seq: 10,
            last_seq: 13,
            items: vec![
                Item::Write {
                    seq: 10,
                    offset: 8192,
                    len: (2 * BLOCK_SIZE + 512) as u32,
                    blocks: vec![
                        Block::Literal(lit.clone()),
                        Block::Zero,
                        Block::Ref(block_hash(&[1u8; 512])),
                    ],
                },
                Item::Plain(Record::Zero {
                    seq: 12,
                    offset: 0,
                    len: 1 << 20,
                }),
                Item::Plain(Record::Tag {
                    seq: 13,
                    id: 5,
                    kind: TagKind::App,
                    members: 2,
                    group: "g".into(),
                }),
            ],
        }
    }

    #[test]
    fn batches_round_trip_with_and_without_lz4() {
        for (compressor, coding) in [
            (Compressor::None, BodyCoding::None),
            (Compressor::Lz4, BodyCoding::Lz4),
        ] {
            let mut out = BytesMut::new();
            let enc = encode_batch(&sample(), compressor, &mut Vec::new(), &mut out).unwrap();
            assert_eq!(enc.payload_len, out.len());
            assert_eq!(enc.coding, coding, "repetitive body compresses");
            assert_eq!(out[0], BATCH_VERSION);
            assert_eq!(decode_batch(out.freeze()).unwrap(), sample());
        }
    }

    fn zstd_pair() -> (StreamCompressor, StreamDecompressor) {
        crate::codec::stream_pair(20, 3).unwrap()
    }

    #[test]
    fn zstd_batches_continue_the_stream_and_need_its_context() {
        let (mut c, mut d) = zstd_pair();
        let mut pieces = Vec::new();
        for _ in 0..3 {
            let mut out = BytesMut::new();
            let enc = encode_batch(
                &sample(),
                Compressor::Zstd(&mut c),
                &mut Vec::new(),
                &mut out,
            )
            .unwrap();
            assert_eq!(enc.coding, BodyCoding::Zstd);
            assert_eq!(out[0], BATCH_VERSION_ZSTD);
            pieces.push(out.freeze());
        }
        assert!(
            pieces[2].len() < pieces[0].len(),
            "a repeated batch is a match into the history"
        );
        let e = decode_batch(pieces[0].clone()).unwrap_err().to_string();
        assert!(e.contains("no zstd window"), "{e}");
        for p in &pieces {
            assert_eq!(
                decode_batch_with(p.clone(), Some(&mut d)).unwrap(),
                sample()
            );
        }
        // A version-1 batch may not claim zstd, nor any batch both codecs.
        let mut v = pieces[0].to_vec();
        v[0] = BATCH_VERSION;
        let (_, mut fresh) = zstd_pair();
        assert!(decode_batch_with(Bytes::from(v.clone()), Some(&mut fresh))
            .unwrap_err()
            .to_string()
            .contains("unknown flags"));
        v[0] = BATCH_VERSION_ZSTD;
        v[1] = FLAG_LZ4 | FLAG_ZSTD;
        assert!(decode_batch_with(Bytes::from(v), Some(&mut fresh))
            .unwrap_err()
            .to_string()
            .contains("unknown flags"));
    }

    #[test]
    fn references_resolve_or_name_the_record() {
        let item = sample().items[0].clone();
        let rec = resolve(item.clone(), |_, n| Some(Bytes::from(vec![1u8; n]))).unwrap();
        let Record::Write { data, seq, .. } = rec else {
            panic!("a write")
        };
        assert_eq!(seq, 10);
        assert_eq!(data.len(), 2 * BLOCK_SIZE + 512);
        assert!(data[BLOCK_SIZE..2 * BLOCK_SIZE].iter().all(|b| *b == 0));
        assert_eq!(&data[2 * BLOCK_SIZE..], &[1u8; 512][..]);
        assert_eq!(resolve(item, |_, _| None), Err(10));
    }

    #[test]
    fn hostile_batches_are_refused() {
        let mut out = BytesMut::new();
        encode_batch(&sample(), Compressor::None, &mut Vec::new(), &mut out).unwrap();
        let good = out.freeze();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = good.to_vec();
            f(&mut v);
            decode_batch(Bytes::from(v)).unwrap_err().to_string()
        };
        assert!(with(&|v| v[0] = 9).contains("version"));
        assert!(with(&|v| v[1] = 0x80).contains("flags"));
        assert!(with(&|v| v[20..24].copy_from_slice(&0u32.to_le_bytes())).contains("items"));
        assert!(with(&|v| v.truncate(v.len() - 1)).contains("body is"));
        assert!(with(&|v| v[12..20].copy_from_slice(&14u64.to_le_bytes())).contains("span ends"));
        // Claimed body far beyond the limit.
        assert!(with(&|v| v[24..28].copy_from_slice(&u32::MAX.to_le_bytes())).contains("exceeds"));
        // LZ4 flag on an uncompressed body.
        assert!(with(&|v| v[1] = 1).contains("LZ4"));
    }

    #[test]
    fn zero_detection_and_hash_are_exact() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        // FIPS 180-2 test vector.
        assert_eq!(block_hash(b"abc")[..4], [0xba, 0x78, 0x16, 0xbf],);
    }
}
