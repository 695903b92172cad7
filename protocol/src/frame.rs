//! Frames: the header, every frame type, the encoder and the decoder.
//!
//! ```text
//! frame  = header payload
//! header = magic "FB" (2) | version u8 (1) | type u8 (1) | payload_len u32 LE (4)
//! ```
//!
//! One QUIC stream carries one disk (a *stream* in the data model). Its first frame from
//! the sender is `Hello`; the receiver answers `Accept` (or `Error` and closes). Then the
//! sender sends records (`Write`, `Zero`, `Tag`) with sequence numbers increasing by one,
//! and the receiver sends cumulative `Ack`s and, when it changes its mind about how much
//! may be in flight, `Credit`. See `docs/PROTOCOL.md` for the byte tables.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};
use crate::names::validate_name;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"FB";
/// The protocol version this crate speaks. A peer speaking another is refused.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Disk writes are aligned to, and sized in multiples of, this many bytes.
pub const SECTOR_SIZE: u64 = 512;
/// The largest payload of one `Write` record (1 MiB).
pub const MAX_WRITE_BYTES: usize = 1 << 20;
/// The largest frame payload: a maximal `Write` plus its 16 bytes of fields.
pub const MAX_FRAME_PAYLOAD: usize = MAX_WRITE_BYTES + 16;
/// The longest message an `Error` frame may carry, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// The frame type byte. Do not renumber: it is on the wire and in journals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Accept = 0x02,
    HashHello = 0x03,
    HashAccept = 0x04,
    HashRequest = 0x05,
    Control = 0x06,
    Write = 0x10,
    Zero = 0x11,
    Tag = 0x12,
    Batch = 0x13,
    Resync = 0x14,
    Ack = 0x20,
    Credit = 0x21,
    Applied = 0x22,
    Hashes = 0x23,
    ResyncRequest = 0x24,
    ControlAnswer = 0x25,
    Error = 0x30,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Accept,
            0x03 => FrameType::HashHello,
            0x04 => FrameType::HashAccept,
            0x05 => FrameType::HashRequest,
            0x06 => FrameType::Control,
            0x10 => FrameType::Write,
            0x11 => FrameType::Zero,
            0x12 => FrameType::Tag,
            0x13 => FrameType::Batch,
            0x14 => FrameType::Resync,
            0x20 => FrameType::Ack,
            0x21 => FrameType::Credit,
            0x22 => FrameType::Applied,
            0x23 => FrameType::Hashes,
            0x24 => FrameType::ResyncRequest,
            0x25 => FrameType::ControlAnswer,
            0x30 => FrameType::Error,
            _ => return None,
        })
    }
}

/// One source disk: the unit of ordering. Sequence numbers are per `StreamId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    /// The VM the disk belongs to (a name checked by [`validate_name`]).
    pub vm: String,
    /// The disk's index within the VM.
    pub disk: u32,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/disk{}", self.vm, self.disk)
    }
}

/// Whether a recovery point is crash-consistent or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagKind {
    Crash = 1,
    App = 2,
}

impl TagKind {
    pub fn name(self) -> &'static str {
        match self {
            TagKind::Crash => "crash",
            TagKind::App => "app",
        }
    }
}

/// Where a resync stands, as a `Resync` record says it (see [`ResyncMark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncPhase {
    /// The resync starts (or resumes) here: the replica is inconsistent from now on.
    Begin = 1,
    /// Every region before `next_region` has been compared, and its differing blocks sent
    /// before this record.
    Progress = 2,
    /// Every region was compared and sent: the next tag is a recovery point again.
    End = 3,
}

/// How a resync finds what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncMode {
    /// Compare hashes of regions with the replica, send only the blocks that differ
    /// (reprotect to the original location).
    Delta = 1,
    /// Send every block, zero runs as `Zero` records (an alternate location: an empty
    /// disk).
    Full = 2,
}

impl ResyncMode {
    pub fn name(self) -> &'static str {
        match self {
            ResyncMode::Delta => "delta",
            ResyncMode::Full => "full",
        }
    }
}

/// A resync marker on a disk's ordered stream: where the resync `id` stands. Carried
/// through the relay's cache and the master target's journal like any record, so the
/// master target knows durably where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResyncMark {
    pub id: u64,
    pub phase: ResyncPhase,
    pub mode: ResyncMode,
    /// Regions (of [`crate::resync::REGION_BYTES`]) before this one are done.
    pub next_region: u64,
    /// Regions the resync covers in all.
    pub regions: u64,
    /// Disk bytes compared (hashed) so far, and bytes of blocks sent so far.
    pub compared_bytes: u64,
    pub sent_bytes: u64,
}

/// What a master target knows of its replica of a disk (in `HashAccept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// Never seen: empty.
    New = 1,
    /// Seeded from an existing disk (the original location) and never resynced.
    Stale = 2,
    /// In step with its stream: no resync needed as far as it knows.
    Consistent = 3,
    /// A resync began and has not ended (`HashAccept` says which, and how far).
    Resyncing = 4,
}

impl ReplicaState {
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::New => "new",
            ReplicaState::Stale => "stale",
            ReplicaState::Consistent => "consistent",
            ReplicaState::Resyncing => "resyncing",
        }
    }
}

/// A change to a disk, or a recovery-point marker, at one position of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `data` written at byte `offset`.
    Write { seq: u64, offset: u64, data: Bytes },
    /// `len` bytes from `offset` are now zero (trim, or a zeroing write).
    Zero { seq: u64, offset: u64, len: u64 },
    /// A recovery-point marker: tag `id` of replication group `group`, inserted at one
    /// consistent cut across the group's `members` disks.
    Tag {
        seq: u64,
        id: u64,
        kind: TagKind,
        members: u32,
        group: String,
    },
    /// A resync marker (begin, progress, end): changes nothing on the disk.
    Resync { seq: u64, mark: ResyncMark },
}

impl Record {
    /// The record's position in its stream.
    pub fn seq(&self) -> u64 {
        match self {
            Record::Write { seq, .. }
            | Record::Zero { seq, .. }
            | Record::Tag { seq, .. }
            | Record::Resync { seq, .. } => *seq,
        }
    }

    /// Bytes of disk content this record changes (what "logical churn" counts).
    pub fn logical_bytes(&self) -> u64 {
        match self {
            Record::Write { data, .. } => data.len() as u64,
            Record::Zero { len, .. } => *len,
            Record::Tag { .. } | Record::Resync { .. } => 0,
        }
    }

    /// Whether the record changes the disk (a write or a zero range), as opposed to a
    /// marker (tag or resync mark) that only says where the stream stands.
    pub fn is_marker(&self) -> bool {
        matches!(self, Record::Tag { .. } | Record::Resync { .. })
    }

    /// Bytes this record occupies encoded as a frame (header included). Credit (the
    /// window of unacknowledged bytes) is counted in these.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN
            + match self {
                Record::Write { data, .. } => 16 + data.len(),
                Record::Zero { .. } => 24,
                Record::Tag { group, .. } => 22 + group.len(),
                Record::Resync { .. } => RESYNC_PAYLOAD_LEN,
            }
    }

    /// Checks the record against the disk it targets: 512-byte alignment and the end of
    /// the disk. Structural validity is the decoder's job; this is the receiver's.
    pub fn check_against_disk(&self, disk_size: u64) -> Result<(), (ErrorCode, String)> {
        let (offset, len) = match self {
            Record::Write { offset, data, .. } => (*offset, data.len() as u64),
            Record::Zero { offset, len, .. } => (*offset, *len),
            Record::Tag { .. } | Record::Resync { .. } => return Ok(()),
        };
        if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
            return Err((
                ErrorCode::Misaligned,
                format!(
                    "record {} at offset {offset} length {len} is not aligned to {SECTOR_SIZE} bytes",
                    self.seq()
                ),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= disk_size => Ok(()),
            _ => Err((
                ErrorCode::OutOfBounds,
                format!(
                    "record {} at offset {offset} length {len} ends beyond the disk size {disk_size}",
                    self.seq()
                ),
            )),
        }
    }
}

/// Everything that can travel on a disk stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sender -> receiver, first frame of a stream: which disk, how large it is, and
    /// its placement (how many times its VM moved between relays, as the
    /// configuration server counts; 0 if never). A receiver that knows a higher
    /// placement refuses the stream with `StreamMoved`: see [`crate::stream`].
    Hello {
        stream: StreamId,
        disk_size: u64,
        placement: u64,
    },
    /// Receiver -> sender, answer to `Hello`: the next sequence number it expects
    /// (its durable high-water mark plus one), the initial credit, and the largest zstd
    /// window (log2) the receiver decodes for this stream ([`crate::codec`]; 0: none,
    /// batches may not be zstd-coded).
    Accept {
        next_seq: u64,
        credit_bytes: u64,
        zstd_window_log: u8,
    },
    /// Sender -> receiver: a change or a tag.
    Record(Record),
    /// Relay -> master target only: several records reduced for the WAN (zero blocks
    /// elided, known blocks referenced by hash, superseded writes coalesced, zstd or LZ4). The
    /// payload is decoded by [`crate::wan::decode_batch`].
    Batch(Bytes),
    /// Receiver -> sender: every record with a sequence number `<= seq` is durable at
    /// the receiver (for the relay: in its cache). The sender may forget them.
    Ack { seq: u64 },
    /// Relay -> agent: every record `<= seq` is durable at the master target (the end
    /// of the path). Informational: it is what recovery-point objectives are measured by.
    Applied { seq: u64 },
    /// Receiver -> sender: from now on at most `credit_bytes` of encoded records may be
    /// unacknowledged. Zero withholds all credit (backpressure).
    Credit { credit_bytes: u64 },
    /// Relay -> agent on a disk stream: the relay lost records it had acknowledged
    /// (cache corruption) or an operator asked for it: start a resync of `mode`.
    ResyncRequest { mode: ResyncMode, reason: String },
    /// Agent -> relay -> master target, first frame of a *hash stream*: describe the
    /// replica of this disk as hashes keyed with `key` (chosen by the agent, so nobody
    /// can prepare colliding blocks).
    HashHello {
        stream: StreamId,
        disk_size: u64,
        key: [u8; 32],
    },
    /// Master target -> agent, answer to `HashHello`: what it knows of the replica, and
    /// where an unfinished resync stands (its id, mode, next region; zeros if none).
    HashAccept {
        replica: ReplicaState,
        resync_id: u64,
        mode: ResyncMode,
        next_region: u64,
        hwm: u64,
    },
    /// Agent -> master target on a hash stream: the hashes of `count` nodes of `level`
    /// from index `first` (see [`crate::resync`]).
    HashRequest { level: u8, first: u64, count: u32 },
    /// Master target -> agent: the answer to one `HashRequest`, 16 bytes per node.
    Hashes {
        level: u8,
        first: u64,
        hashes: Vec<[u8; 16]>,
    },
    /// Relay -> master target, first and only frame of a *control stream*: one request
    /// of the failback controller, a JSON document of at most [`MAX_CONTROL_REQUEST`]
    /// bytes (its schema is the master target's; this layer only carries it).
    Control { request: Bytes },
    /// Master target -> relay, the answer to a control stream's request: the bodies of
    /// the stream's `ControlAnswer` frames, in order, make one JSON document (each at
    /// most a frame's payload); the stream's end closes it.
    ControlAnswer { answer: Bytes },
    /// Either way: the stream is refused or closed, and why.
    Error { code: ErrorCode, message: String },
}

/// The largest control request, in bytes.
pub const MAX_CONTROL_REQUEST: usize = 64 << 10;

/// Bytes of a `Resync` record's payload.
pub const RESYNC_PAYLOAD_LEN: usize = 52;
/// Bytes of one node hash in `Hashes`.
pub const NODE_HASH_LEN: usize = 16;
/// Most nodes one `HashRequest` may ask for (a `Hashes` frame of 64 KiB of hashes).
pub const MAX_HASH_NODES: u32 = 4096;

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Accept { .. } => FrameType::Accept,
            Frame::Record(Record::Write { .. }) => FrameType::Write,
            Frame::Record(Record::Zero { .. }) => FrameType::Zero,
            Frame::Record(Record::Tag { .. }) => FrameType::Tag,
            Frame::Record(Record::Resync { .. }) => FrameType::Resync,
            Frame::Batch(_) => FrameType::Batch,
            Frame::ResyncRequest { .. } => FrameType::ResyncRequest,
            Frame::HashHello { .. } => FrameType::HashHello,
            Frame::HashAccept { .. } => FrameType::HashAccept,
            Frame::HashRequest { .. } => FrameType::HashRequest,
            Frame::Control { .. } => FrameType::Control,
            Frame::ControlAnswer { .. } => FrameType::ControlAnswer,
            Frame::Hashes { .. } => FrameType::Hashes,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Applied { .. } => FrameType::Applied,
            Frame::Credit { .. } => FrameType::Credit,
            Frame::Error { .. } => FrameType::Error,
        }
    }

    /// Builds an `Error` frame, truncating the message to the limit on a char boundary.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Frame::Error { code, message }
    }
}

/// Appends the encoding of `frame` to `out`.
///
/// Panics only on a caller bug: a name longer than 255 bytes or a write larger than
/// [`MAX_WRITE_BYTES`] (names and sizes are validated where they enter the program).
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_slice(&MAGIC);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(frame.frame_type() as u8);
    out.put_u32_le(0); // patched below
    match frame {
        Frame::Hello {
            stream,
            disk_size,
            placement,
        } => {
            out.put_u32_le(stream.disk);
            out.put_u64_le(*disk_size);
            put_short_str(out, &stream.vm);
            // Optional trailer: absent means placement 0, so a Hello of a stream that
            // never moved is byte for byte what peers before placements sent.
            if *placement != 0 {
                out.put_u64_le(*placement);
            }
        }
        Frame::Accept {
            next_seq,
            credit_bytes,
            zstd_window_log,
        } => {
            out.put_u64_le(*next_seq);
            out.put_u64_le(*credit_bytes);
            // Optional trailer: absent means no zstd, so an Accept without it is byte
            // for byte what receivers before zstd sent (and what older relays expect).
            if *zstd_window_log != 0 {
                out.put_u8(*zstd_window_log);
                out.put_bytes(0, 3);
            }
        }
        Frame::Record(Record::Write { seq, offset, data }) => {
            assert!(data.len() <= MAX_WRITE_BYTES, "write larger than the limit");
            out.put_u64_le(*seq);
            out.put_u64_le(*offset);
            out.put_slice(data);
        }
        Frame::Record(r @ (Record::Zero { .. } | Record::Tag { .. } | Record::Resync { .. })) => {
            put_marker_fields(r, out)
        }
        Frame::Batch(payload) => {
            assert!(
                payload.len() <= crate::wan::MAX_BATCH_FRAME_PAYLOAD,
                "batch larger than the limit"
            );
            out.put_slice(payload);
        }
        Frame::Ack { seq } | Frame::Applied { seq } => out.put_u64_le(*seq),
        Frame::Credit { credit_bytes } => out.put_u64_le(*credit_bytes),
        Frame::ResyncRequest { mode, reason } => {
            out.put_u8(*mode as u8);
            out.put_slice(reason.as_bytes());
        }
        Frame::HashHello {
            stream,
            disk_size,
            key,
        } => {
            out.put_u32_le(stream.disk);
            out.put_u64_le(*disk_size);
            out.put_slice(key);
            put_short_str(out, &stream.vm);
        }
        Frame::HashAccept {
            replica,
            resync_id,
            mode,
            next_region,
            hwm,
        } => {
            out.put_u8(*replica as u8);
            out.put_u8(*mode as u8);
            out.put_u64_le(*resync_id);
            out.put_u64_le(*next_region);
            out.put_u64_le(*hwm);
        }
        Frame::HashRequest {
            level,
            first,
            count,
        } => {
            out.put_u8(*level);
            out.put_u64_le(*first);
            out.put_u32_le(*count);
        }
        Frame::Hashes {
            level,
            first,
            hashes,
        } => {
            assert!(hashes.len() <= MAX_HASH_NODES as usize, "too many hashes");
            out.put_u8(*level);
            out.put_u64_le(*first);
            out.put_u32_le(hashes.len() as u32);
            for h in hashes {
                out.put_slice(h);
            }
        }
        Frame::Control { request } => {
            assert!(
                request.len() <= MAX_CONTROL_REQUEST,
                "control request too large"
            );
            out.put_slice(request);
        }
        Frame::ControlAnswer { answer } => out.put_slice(answer),
        Frame::Error { code, message } => {
            out.put_u16_le(code.as_u16());
            out.put_slice(message.as_bytes());
        }
    }
    let payload_len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    out[start + 4..start + 8].copy_from_slice(&payload_len.to_le_bytes());
}

/// The fields of a `Zero`, `Tag` or `Resync` record, as in its frame's payload (WAN
/// batch items carry the same bytes). Writes nothing for a `Write`.
pub(crate) fn put_marker_fields(record: &Record, out: &mut impl BufMut) {
    match record {
        Record::Zero { seq, offset, len } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*offset);
            out.put_u64_le(*len);
        }
        Record::Tag {
            seq,
            id,
            kind,
            members,
            group,
        } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*id);
            out.put_u8(*kind as u8);
            out.put_u32_le(*members);
            put_short_str(out, group);
        }
        Record::Resync { seq, mark } => {
            out.put_u64_le(*seq);
            out.put_u64_le(mark.id);
            out.put_u8(mark.phase as u8);
            out.put_u8(mark.mode as u8);
            out.put_u16_le(0);
            out.put_u64_le(mark.next_region);
            out.put_u64_le(mark.regions);
            out.put_u64_le(mark.compared_bytes);
            out.put_u64_le(mark.sent_bytes);
        }
        Record::Write { .. } => {}
    }
}

/// Decodes the fields of a `Resync` record (its frame payload, or a WAN batch item after
/// the kind byte): exactly [`RESYNC_PAYLOAD_LEN`] bytes.
pub(crate) fn get_resync_fields(
    frame: &'static str,
    p: &mut impl Buf,
) -> Result<Record, DecodeError> {
    if p.remaining() < RESYNC_PAYLOAD_LEN {
        return Err(malformed(
            frame,
            format!(
                "resync mark is {} bytes, expected {RESYNC_PAYLOAD_LEN}",
                p.remaining()
            ),
        ));
    }
    let seq = p.get_u64_le();
    check_seq(frame, seq)?;
    let id = p.get_u64_le();
    let phase = match p.get_u8() {
        1 => ResyncPhase::Begin,
        2 => ResyncPhase::Progress,
        3 => ResyncPhase::End,
        k => return Err(malformed(frame, format!("unknown resync phase {k}"))),
    };
    let mode = get_mode(frame, p.get_u8())?;
    if p.get_u16_le() != 0 {
        return Err(malformed(frame, "reserved bytes are not zero"));
    }
    let next_region = p.get_u64_le();
    let regions = p.get_u64_le();
    let compared_bytes = p.get_u64_le();
    let sent_bytes = p.get_u64_le();
    if next_region > regions {
        return Err(malformed(
            frame,
            format!("next region {next_region} is beyond the {regions} regions"),
        ));
    }
    Ok(Record::Resync {
        seq,
        mark: ResyncMark {
            id,
            phase,
            mode,
            next_region,
            regions,
            compared_bytes,
            sent_bytes,
        },
    })
}

fn get_mode(frame: &'static str, b: u8) -> Result<ResyncMode, DecodeError> {
    match b {
        1 => Ok(ResyncMode::Delta),
        2 => Ok(ResyncMode::Full),
        k => Err(malformed(frame, format!("unknown resync mode {k}"))),
    }
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    encode_frame(frame, &mut out);
    out.freeze()
}

fn put_short_str(out: &mut impl BufMut, s: &str) {
    let len = u8::try_from(s.len()).expect("names are validated to at most 64 bytes");
    out.put_u8(len);
    out.put_slice(s.as_bytes());
}

/// The length (header included) of the frame at the front of `buf`, once its header
/// is in: `Ok(None)` while it is not. The header is checked (magic, version, type,
/// length limit) as soon as its bytes are there, so a reader refuses a bad frame before
/// it waits for, or makes room for, its payload. What [`decode_frame`] checks first.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        // Even a partial header can be refused early when its first bytes are wrong.
        if !buf.is_empty() && buf[0] != MAGIC[0] || buf.len() >= 2 && buf[1] != MAGIC[1] {
            return Err(bad_magic(&buf[..buf.len().min(2)]));
        }
        return Ok(None);
    }
    if buf[0..2] != MAGIC {
        return Err(bad_magic(&buf[0..2]));
    }
    if buf[2] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[2]));
    }
    let ty = FrameType::from_u8(buf[3]).ok_or(DecodeError::UnknownType(buf[3]))?;
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let max = match ty {
        FrameType::Batch => crate::wan::MAX_BATCH_FRAME_PAYLOAD,
        _ => MAX_FRAME_PAYLOAD,
    };
    if len as usize > max {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max as u32,
        });
    }
    Ok(Some(FRAME_HEADER_LEN + len as usize))
}

/// Decodes the frame at the front of `buf`, removing its bytes.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call
/// again), and an error as soon as the bytes cannot become a valid frame: the header is
/// checked ([`frame_len`]) before the payload is waited for. `Write` data is a
/// zero-copy slice of `buf`'s allocation.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let ty = FrameType::from_u8(buf[3]).ok_or(DecodeError::UnknownType(buf[3]))?;
    let mut frame_bytes = buf.split_to(total).freeze();
    frame_bytes.advance(FRAME_HEADER_LEN);
    decode_payload(ty, frame_bytes).map(Some)
}

fn bad_magic(seen: &[u8]) -> DecodeError {
    let mut b = [0u8; 2];
    b[..seen.len()].copy_from_slice(seen);
    DecodeError::BadMagic {
        found: u16::from_be_bytes(b),
        expected: u16::from_be_bytes(MAGIC),
    }
}

fn malformed(frame: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        frame,
        reason: reason.into(),
    }
}

/// Checks that a fixed-size payload has exactly `want` bytes.
fn exact(frame: &'static str, p: &Bytes, want: usize) -> Result<(), DecodeError> {
    if p.len() != want {
        return Err(malformed(
            frame,
            format!("payload is {} bytes, expected {want}", p.len()),
        ));
    }
    Ok(())
}

fn get_short_str(frame: &'static str, p: &mut Bytes) -> Result<String, DecodeError> {
    if p.remaining() < 1 {
        return Err(malformed(frame, "missing name length"));
    }
    let len = p.get_u8() as usize;
    if p.remaining() != len {
        return Err(malformed(
            frame,
            format!("name length {len} but {} bytes remain", p.remaining()),
        ));
    }
    let s = std::str::from_utf8(&p[..]).map_err(|_| malformed(frame, "name is not UTF-8"))?;
    validate_name(s).map_err(|reason| malformed(frame, reason))?;
    let s = s.to_owned();
    p.advance(len);
    Ok(s)
}

fn decode_payload(ty: FrameType, mut p: Bytes) -> Result<Frame, DecodeError> {
    Ok(match ty {
        FrameType::Hello => {
            const F: &str = "Hello";
            if p.len() < 13 {
                return Err(malformed(
                    F,
                    format!("payload is {} bytes, at least 13 expected", p.len()),
                ));
            }
            let disk = p.get_u32_le();
            let disk_size = p.get_u64_le();
            // The name, then an optional 8-byte placement.
            let name_end = 1 + p[0] as usize;
            let placement = if p.len() == name_end + 8 {
                let mut trailer = p.split_off(name_end);
                match trailer.get_u64_le() {
                    0 => return Err(malformed(F, "placement 0 is sent as no placement")),
                    n => n,
                }
            } else {
                0
            };
            let vm = get_short_str(F, &mut p)?;
            check_disk_size(F, disk_size)?;
            Frame::Hello {
                stream: StreamId { vm, disk },
                disk_size,
                placement,
            }
        }
        FrameType::Accept => {
            if p.len() != 16 && p.len() != 20 {
                return Err(malformed(
                    "Accept",
                    format!("payload is {} bytes, 16 or 20 expected", p.len()),
                ));
            }
            let next_seq = p.get_u64_le();
            let credit_bytes = p.get_u64_le();
            if next_seq == 0 {
                return Err(malformed(
                    "Accept",
                    "next sequence number is 0 (sequences start at 1)",
                ));
            }
            let zstd_window_log = if p.has_remaining() {
                let w = p.get_u8();
                let reserved = [p.get_u8(), p.get_u8(), p.get_u8()];
                if !(crate::codec::MIN_WINDOW_LOG..=crate::codec::MAX_WINDOW_LOG).contains(&w)
                    || reserved != [0; 3]
                {
                    return Err(malformed(
                        "Accept",
                        format!(
                            "zstd window 2^{w} outside 2^{}..=2^{} (sent as no trailer when none), or reserved bytes set",
                            crate::codec::MIN_WINDOW_LOG,
                            crate::codec::MAX_WINDOW_LOG
                        ),
                    ));
                }
                w
            } else {
                0
            };
            Frame::Accept {
                next_seq,
                credit_bytes,
                zstd_window_log,
            }
        }
        FrameType::Write => {
            const F: &str = "Write";
            if p.len() < 16 + 1 {
                return Err(malformed(
                    F,
                    format!("payload is {} bytes, at least 17 expected", p.len()),
                ));
            }
            let seq = p.get_u64_le();
            let offset = p.get_u64_le();
            check_seq(F, seq)?;
            Frame::Record(Record::Write {
                seq,
                offset,
                data: p,
            })
        }
        FrameType::Zero => {
            exact("Zero", &p, 24)?;
            let seq = p.get_u64_le();
            let offset = p.get_u64_le();
            let len = p.get_u64_le();
            check_seq("Zero", seq)?;
            if len == 0 {
                return Err(malformed("Zero", "length is 0"));
            }
            Frame::Record(Record::Zero { seq, offset, len })
        }
        FrameType::Tag => {
            const F: &str = "Tag";
            if p.len() < 22 {
                return Err(malformed(
                    F,
                    format!("payload is {} bytes, at least 22 expected", p.len()),
                ));
            }
            let seq = p.get_u64_le();
            let id = p.get_u64_le();
            let kind = match p.get_u8() {
                1 => TagKind::Crash,
                2 => TagKind::App,
                k => return Err(malformed(F, format!("unknown tag kind {k}"))),
            };
            let members = p.get_u32_le();
            let group = get_short_str(F, &mut p)?;
            check_seq(F, seq)?;
            if members == 0 {
                return Err(malformed(F, "a tag must name at least one member disk"));
            }
            Frame::Record(Record::Tag {
                seq,
                id,
                kind,
                members,
                group,
            })
        }
        FrameType::Batch => Frame::Batch(p),
        FrameType::Control => {
            if p.is_empty() || p.len() > MAX_CONTROL_REQUEST {
                return Err(malformed(
                    "Control",
                    format!("request is {} bytes (1 to {MAX_CONTROL_REQUEST})", p.len()),
                ));
            }
            Frame::Control { request: p }
        }
        FrameType::ControlAnswer => {
            if p.is_empty() {
                return Err(malformed("ControlAnswer", "the answer is empty"));
            }
            Frame::ControlAnswer { answer: p }
        }
        FrameType::Resync => {
            exact("Resync", &p, RESYNC_PAYLOAD_LEN)?;
            Frame::Record(get_resync_fields("Resync", &mut p)?)
        }
        FrameType::ResyncRequest => {
            const F: &str = "ResyncRequest";
            if p.is_empty() {
                return Err(malformed(F, "missing resync mode"));
            }
            let mode = get_mode(F, p.get_u8())?;
            if p.len() > MAX_ERROR_MESSAGE {
                return Err(malformed(
                    F,
                    format!("reason is {} bytes, limit {MAX_ERROR_MESSAGE}", p.len()),
                ));
            }
            let reason = std::str::from_utf8(&p)
                .map_err(|_| malformed(F, "reason is not UTF-8"))?
                .to_owned();
            Frame::ResyncRequest { mode, reason }
        }
        FrameType::HashHello => {
            const F: &str = "HashHello";
            if p.len() < 45 {
                return Err(malformed(
                    F,
                    format!("payload is {} bytes, at least 45 expected", p.len()),
                ));
            }
            let disk = p.get_u32_le();
            let disk_size = p.get_u64_le();
            let mut key = [0u8; 32];
            p.copy_to_slice(&mut key);
            let vm = get_short_str(F, &mut p)?;
            check_disk_size(F, disk_size)?;
            Frame::HashHello {
                stream: StreamId { vm, disk },
                disk_size,
                key,
            }
        }
        FrameType::HashAccept => {
            const F: &str = "HashAccept";
            exact(F, &p, 26)?;
            let replica = match p.get_u8() {
                1 => ReplicaState::New,
                2 => ReplicaState::Stale,
                3 => ReplicaState::Consistent,
                4 => ReplicaState::Resyncing,
                k => return Err(malformed(F, format!("unknown replica state {k}"))),
            };
            let mode = get_mode(F, p.get_u8())?;
            Frame::HashAccept {
                replica,
                mode,
                resync_id: p.get_u64_le(),
                next_region: p.get_u64_le(),
                hwm: p.get_u64_le(),
            }
        }
        FrameType::HashRequest => {
            const F: &str = "HashRequest";
            exact(F, &p, 13)?;
            let level = p.get_u8();
            let first = p.get_u64_le();
            let count = p.get_u32_le();
            check_hash_range(F, level, count)?;
            Frame::HashRequest {
                level,
                first,
                count,
            }
        }
        FrameType::Hashes => {
            const F: &str = "Hashes";
            if p.len() < 13 {
                return Err(malformed(
                    F,
                    format!("payload is {} bytes, at least 13 expected", p.len()),
                ));
            }
            let level = p.get_u8();
            let first = p.get_u64_le();
            let count = p.get_u32_le();
            check_hash_range(F, level, count)?;
            if p.len() != count as usize * NODE_HASH_LEN {
                return Err(malformed(
                    F,
                    format!("{count} hashes announced, {} bytes follow", p.len()),
                ));
            }
            let hashes = p
                .chunks_exact(NODE_HASH_LEN)
                .map(|c| c.try_into().expect("16-byte chunks"))
                .collect();
            Frame::Hashes {
                level,
                first,
                hashes,
            }
        }
        FrameType::Ack => {
            exact("Ack", &p, 8)?;
            Frame::Ack {
                seq: p.get_u64_le(),
            }
        }
        FrameType::Applied => {
            exact("Applied", &p, 8)?;
            Frame::Applied {
                seq: p.get_u64_le(),
            }
        }
        FrameType::Credit => {
            exact("Credit", &p, 8)?;
            Frame::Credit {
                credit_bytes: p.get_u64_le(),
            }
        }
        FrameType::Error => {
            const F: &str = "Error";
            if p.len() < 2 {
                return Err(malformed(F, "missing error code"));
            }
            let code = ErrorCode::from_u16(p.get_u16_le());
            if p.len() > MAX_ERROR_MESSAGE {
                return Err(malformed(
                    F,
                    format!("message is {} bytes, limit {MAX_ERROR_MESSAGE}", p.len()),
                ));
            }
            let message = std::str::from_utf8(&p)
                .map_err(|_| malformed(F, "message is not UTF-8"))?
                .to_owned();
            Frame::Error { code, message }
        }
    })
}

fn check_disk_size(frame: &'static str, disk_size: u64) -> Result<(), DecodeError> {
    if disk_size == 0 || disk_size % SECTOR_SIZE != 0 {
        return Err(malformed(
            frame,
            format!("disk size {disk_size} is not a positive multiple of {SECTOR_SIZE}"),
        ));
    }
    Ok(())
}

fn check_hash_range(frame: &'static str, level: u8, count: u32) -> Result<(), DecodeError> {
    if level as usize >= crate::resync::LEVELS {
        return Err(malformed(
            frame,
            format!(
                "level {level} (levels are 0 to {})",
                crate::resync::LEVELS - 1
            ),
        ));
    }
    if count == 0 || count > MAX_HASH_NODES {
        return Err(malformed(
            frame,
            format!("{count} nodes (1 to {MAX_HASH_NODES} per request)"),
        ));
    }
    Ok(())
}

fn check_seq(frame: &'static str, seq: u64) -> Result<(), DecodeError> {
    if seq == 0 {
        return Err(malformed(frame, "sequence number 0 (sequences start at 1)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut buf = BytesMut::new();
        encode_frame(&frame, &mut buf);
        // Feeding byte by byte must give None until the last byte.
        let full = buf.clone();
        let mut partial = BytesMut::new();
        for (i, b) in full.iter().enumerate() {
            partial.put_u8(*b);
            let got = decode_frame(&mut partial).expect("valid prefix");
            if i + 1 < full.len() {
                assert!(got.is_none(), "decoded early at byte {i}");
            } else {
                assert_eq!(got, Some(frame.clone()));
                assert!(partial.is_empty());
            }
        }
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Hello {
            placement: 0,
            stream: StreamId {
                vm: "vm-1".into(),
                disk: 3,
            },
            disk_size: 1 << 30,
        });
        round_trip(Frame::Accept {
            next_seq: 7,
            credit_bytes: 1 << 20,
            zstd_window_log: 0,
        });
        round_trip(Frame::Accept {
            next_seq: 7,
            credit_bytes: 1 << 20,
            zstd_window_log: 27,
        });
        round_trip(Frame::Record(Record::Write {
            seq: 1,
            offset: 4096,
            data: Bytes::from(vec![0xAB; 1024]),
        }));
        round_trip(Frame::Record(Record::Zero {
            seq: 2,
            offset: 0,
            len: 8192,
        }));
        round_trip(Frame::Record(Record::Tag {
            seq: 3,
            id: 42,
            kind: TagKind::App,
            members: 6,
            group: "payroll".into(),
        }));
        round_trip(Frame::Ack { seq: 99 });
        round_trip(Frame::Applied { seq: 98 });
        round_trip(Frame::Credit { credit_bytes: 0 });
        round_trip(Frame::error(ErrorCode::SequenceGap, "expected 5, got 9"));
    }

    #[test]
    fn encoded_len_matches_encoding() {
        let records = [
            Record::Write {
                seq: 1,
                offset: 0,
                data: Bytes::from(vec![1; 512]),
            },
            Record::Zero {
                seq: 2,
                offset: 0,
                len: 512,
            },
            Record::Tag {
                seq: 3,
                id: 1,
                kind: TagKind::Crash,
                members: 2,
                group: "g".into(),
            },
        ];
        for r in records {
            let mut buf = BytesMut::new();
            encode_frame(&Frame::Record(r.clone()), &mut buf);
            assert_eq!(buf.len(), r.encoded_len());
        }
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let mut buf = BytesMut::from(&b"FB\x01\x10"[..]);
        buf.put_u32_le(MAX_FRAME_PAYLOAD as u32 + 1);
        assert!(matches!(
            decode_frame(&mut buf),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn bad_magic_is_refused_from_the_first_byte() {
        let mut buf = BytesMut::from(&b"G"[..]);
        assert!(matches!(
            decode_frame(&mut buf),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn wrong_version_and_type_are_refused() {
        let mut buf = BytesMut::from(&b"FB\x02\x10\0\0\0\0"[..]);
        assert_eq!(
            decode_frame(&mut buf),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut buf = BytesMut::from(&b"FB\x01\x77\0\0\0\0"[..]);
        assert_eq!(decode_frame(&mut buf), Err(DecodeError::UnknownType(0x77)));
    }

    #[test]
    fn fixed_frames_with_trailing_bytes_are_malformed() {
        let mut buf = BytesMut::from(&b"FB\x01\x20\x09\0\0\0"[..]);
        buf.put_slice(&[0; 9]);
        assert!(matches!(
            decode_frame(&mut buf),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn record_checks_against_disk() {
        let w = |offset, len| Record::Write {
            seq: 1,
            offset,
            data: Bytes::from(vec![0; len]),
        };
        assert!(w(0, 512).check_against_disk(1024).is_ok());
        assert!(w(512, 512).check_against_disk(1024).is_ok());
        assert_eq!(
            w(1024, 512).check_against_disk(1024).unwrap_err().0,
            ErrorCode::OutOfBounds
        );
        assert_eq!(
            w(100, 512).check_against_disk(1024).unwrap_err().0,
            ErrorCode::Misaligned
        );
        assert_eq!(
            w(0, 100).check_against_disk(1024).unwrap_err().0,
            ErrorCode::Misaligned
        );
        let z = Record::Zero {
            seq: 1,
            offset: u64::MAX - 511,
            len: 1024,
        };
        assert_eq!(
            z.check_against_disk(u64::MAX).unwrap_err().0,
            ErrorCode::OutOfBounds
        );
    }
}
