//! The on-disk format of cache segments (version 1, little-endian), sans-IO.
//!
//! `docs/CACHE-FORMAT.md` has the byte tables; `tests/golden.rs` pins them. Do not change
//! any layout here without bumping [`CACHE_VERSION`].
//!
//! ```text
//! segment  = header entry* [footer trailer]      footer + trailer only once sealed
//! header   = magic "FBRCACHE" | version u32 | reserved u32 | segment_id u64 | created_ms u64   (32 B)
//! entry    = body_len u32 | crc32c(body) u32 | body
//! body     = kind u8 (=1) | vm_len u8 | reserved u16 | disk u32 | seq u64 | disk_size u64
//!            | appended_ms u64 | vm | frame          (frame = the record's wire encoding)
//! footer   = stream_count u32 | (vm_len u8 | vm | disk u32 | disk_size u64)*
//!            | entry_count u32 | (stream_ref u32 | seq u64 | offset u32 | len u32 | appended_ms u64)*
//! trailer  = footer_offset u64 | footer_len u32 | crc32c(footer) u32 | magic "FBRCFOOT"   (24 B)
//! ```

use bytes::{Buf, BufMut, BytesMut};
use fbr_protocol::{decode_frame, encode_frame, Frame, Record, StreamId};

pub const SEGMENT_MAGIC: [u8; 8] = *b"FBRCACHE";
pub const FOOTER_MAGIC: [u8; 8] = *b"FBRCFOOT";
pub const CACHE_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: u64 = 32;
pub const ENTRY_PREFIX_LEN: usize = 8;
pub const ENTRY_FIXED_BODY_LEN: usize = 32;
pub const TRAILER_LEN: u64 = 24;
const KIND_RECORD: u8 = 1;
/// Largest entry body: fixed fields, a 64-byte VM name and a maximal frame.
pub const MAX_BODY_LEN: usize =
    ENTRY_FIXED_BODY_LEN + 64 + fbr_protocol::FRAME_HEADER_LEN + fbr_protocol::MAX_FRAME_PAYLOAD;

/// The 32-byte segment header.
pub fn encode_segment_header(segment_id: u64, created_ms: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&CACHE_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&segment_id.to_le_bytes());
    h[24..32].copy_from_slice(&created_ms.to_le_bytes());
    h
}

/// Checks a segment header; returns `(segment_id, created_ms)`.
pub fn decode_segment_header(h: &[u8]) -> Result<(u64, u64), String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err("segment shorter than its header".into());
    }
    if h[..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != CACHE_VERSION {
        return Err(format!(
            "cache format version {version} is not supported (this build reads {CACHE_VERSION})"
        ));
    }
    Ok((
        u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
        u64::from_le_bytes(h[24..32].try_into().expect("8 bytes")),
    ))
}

/// One cached record with the fields recovery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub stream: StreamId,
    pub disk_size: u64,
    pub appended_ms: u64,
    pub record: Record,
}

/// Appends the encoding of `e` to `out`; returns the entry's length.
pub fn encode_entry(e: &CacheEntry, out: &mut BytesMut) -> usize {
    let start = out.len();
    out.put_u64_le(0); // body_len and crc, patched below
    out.put_u8(KIND_RECORD);
    out.put_u8(e.stream.vm.len() as u8);
    out.put_u16_le(0);
    out.put_u32_le(e.stream.disk);
    out.put_u64_le(e.record.seq());
    out.put_u64_le(e.disk_size);
    out.put_u64_le(e.appended_ms);
    out.put_slice(e.stream.vm.as_bytes());
    encode_frame(&Frame::Record(e.record.clone()), out);
    let body = &out[start + ENTRY_PREFIX_LEN..];
    let (len, crc) = (body.len() as u32, crc32c::crc32c(body));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The fixed part of an entry, readable without the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHead {
    pub body_len: usize,
    pub crc: u32,
}

/// Reads an entry's 8-byte prefix. Errors on an impossible length.
pub fn decode_entry_prefix(b: &[u8]) -> Result<EntryHead, String> {
    let body_len = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if !(ENTRY_FIXED_BODY_LEN + 1..=MAX_BODY_LEN).contains(&body_len) {
        return Err(format!("entry body length {body_len} is out of range"));
    }
    Ok(EntryHead { body_len, crc })
}

/// Decodes a whole entry (prefix + body); checks the CRC and every field.
pub fn decode_entry(b: &[u8]) -> Result<CacheEntry, String> {
    if b.len() < ENTRY_PREFIX_LEN {
        return Err("entry shorter than its prefix".into());
    }
    let head = decode_entry_prefix(b)?;
    if b.len() != ENTRY_PREFIX_LEN + head.body_len {
        return Err(format!(
            "entry is {} bytes, its prefix says {}",
            b.len(),
            ENTRY_PREFIX_LEN + head.body_len
        ));
    }
    let mut body = &b[ENTRY_PREFIX_LEN..];
    let actual = crc32c::crc32c(body);
    if actual != head.crc {
        return Err(format!(
            "CRC32C mismatch (stored {:#010x}, computed {actual:#010x})",
            head.crc
        ));
    }
    let kind = body.get_u8();
    if kind != KIND_RECORD {
        return Err(format!("unknown entry kind {kind}"));
    }
    let vm_len = body.get_u8() as usize;
    let reserved = body.get_u16_le();
    if reserved != 0 {
        return Err(format!("reserved field is {reserved}, must be 0"));
    }
    let disk = body.get_u32_le();
    let seq = body.get_u64_le();
    let disk_size = body.get_u64_le();
    let appended_ms = body.get_u64_le();
    if body.len() < vm_len {
        return Err("entry ends inside its VM name".into());
    }
    let vm =
        std::str::from_utf8(&body[..vm_len]).map_err(|_| "VM name is not UTF-8".to_string())?;
    fbr_protocol::names::validate_name(vm)?;
    let vm = vm.to_owned();
    body.advance(vm_len);
    let mut frame = BytesMut::from(body);
    let record = match decode_frame(&mut frame) {
        Ok(Some(Frame::Record(r))) if frame.is_empty() => r,
        Ok(_) => return Err("entry does not hold exactly one record frame".into()),
        Err(e) => return Err(e.to_string()),
    };
    if record.seq() != seq {
        return Err(format!(
            "entry says seq {seq}, its record says {}",
            record.seq()
        ));
    }
    Ok(CacheEntry {
        stream: StreamId { vm, disk },
        disk_size,
        appended_ms,
        record,
    })
}

/// Where one entry sits, as listed in a footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FooterEntry {
    pub stream_ref: u32,
    pub seq: u64,
    pub offset: u32,
    pub len: u32,
    pub appended_ms: u64,
}

/// A sealed segment's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Footer {
    /// `(stream, disk_size)`, indexed by `stream_ref`.
    pub streams: Vec<(StreamId, u64)>,
    pub entries: Vec<FooterEntry>,
}

/// Encodes `footer` followed by its trailer; `footer_offset` is where it will be written.
pub fn encode_footer(footer: &Footer, footer_offset: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32_le(footer.streams.len() as u32);
    for (id, size) in &footer.streams {
        b.put_u8(id.vm.len() as u8);
        b.put_slice(id.vm.as_bytes());
        b.put_u32_le(id.disk);
        b.put_u64_le(*size);
    }
    b.put_u32_le(footer.entries.len() as u32);
    for e in &footer.entries {
        b.put_u32_le(e.stream_ref);
        b.put_u64_le(e.seq);
        b.put_u32_le(e.offset);
        b.put_u32_le(e.len);
        b.put_u64_le(e.appended_ms);
    }
    let footer_len = b.len() as u32;
    let crc = crc32c::crc32c(&b);
    b.put_u64_le(footer_offset);
    b.put_u32_le(footer_len);
    b.put_u32_le(crc);
    b.put_slice(&FOOTER_MAGIC);
    b.to_vec()
}

/// Reads a trailer; returns `(footer_offset, footer_len, crc)`.
pub fn decode_trailer(t: &[u8]) -> Option<(u64, u32, u32)> {
    if t.len() != TRAILER_LEN as usize || t[16..24] != FOOTER_MAGIC {
        return None;
    }
    Some((
        u64::from_le_bytes(t[0..8].try_into().ok()?),
        u32::from_le_bytes(t[8..12].try_into().ok()?),
        u32::from_le_bytes(t[12..16].try_into().ok()?),
    ))
}

/// Decodes a footer body (CRC already checked by the caller).
pub fn decode_footer(mut b: &[u8]) -> Result<Footer, String> {
    let err = |what: &str| format!("footer truncated in {what}");
    if b.remaining() < 4 {
        return Err(err("stream count"));
    }
    let n = b.get_u32_le() as usize;
    let mut streams = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        if b.remaining() < 1 {
            return Err(err("stream table"));
        }
        let vm_len = b.get_u8() as usize;
        if b.remaining() < vm_len + 12 {
            return Err(err("stream table"));
        }
        let vm = std::str::from_utf8(&b[..vm_len])
            .map_err(|_| "footer VM name is not UTF-8".to_string())?
            .to_owned();
        fbr_protocol::names::validate_name(&vm)?;
        b.advance(vm_len);
        let disk = b.get_u32_le();
        let size = b.get_u64_le();
        streams.push((StreamId { vm, disk }, size));
    }
    if b.remaining() < 4 {
        return Err(err("entry count"));
    }
    let m = b.get_u32_le() as usize;
    if b.remaining() != m * 28 {
        return Err(format!(
            "footer lists {m} entries but holds {} bytes for them",
            b.remaining()
        ));
    }
    let mut entries = Vec::with_capacity(m);
    for _ in 0..m {
        let e = FooterEntry {
            stream_ref: b.get_u32_le(),
            seq: b.get_u64_le(),
            offset: b.get_u32_le(),
            len: b.get_u32_le(),
            appended_ms: b.get_u64_le(),
        };
        if e.stream_ref as usize >= streams.len() {
            return Err(format!(
                "footer entry names stream {} of {}",
                e.stream_ref,
                streams.len()
            ));
        }
        entries.push(e);
    }
    Ok(Footer { streams, entries })
}
