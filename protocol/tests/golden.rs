//! Golden bytes: these tests pin the wire format documented in `docs/PROTOCOL.md`.
//! If one fails, the format changed: bump `PROTOCOL_VERSION` and update the document,
//! never just the expected bytes.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_protocol::{decode_frame, encode_frame, ErrorCode, Frame, Record, StreamId, TagKind};

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    buf.to_vec()
}

fn check(frame: Frame, golden: &[u8]) {
    assert_eq!(encode(&frame), golden, "encoding of {frame:?}");
    let mut buf = BytesMut::from(golden);
    assert_eq!(decode_frame(&mut buf).unwrap(), Some(frame));
    assert!(buf.is_empty());
}

#[test]
fn hello() {
    check(
        Frame::Hello {
            stream: StreamId {
                vm: "vm1".into(),
                disk: 2,
            },
            disk_size: 0x4000_0000,
            placement: 0,
        },
        &[
            b'F', b'B', 0x01, 0x01, 16, 0, 0, 0, // header: magic, version 1, Hello, len 16
            2, 0, 0, 0, // disk 2
            0, 0, 0, 0x40, 0, 0, 0, 0, // disk size 1 GiB
            3, b'v', b'm', b'1', // vm name
        ],
    );
}

#[test]
fn hello_of_a_moved_stream_carries_its_placement() {
    check(
        Frame::Hello {
            stream: StreamId {
                vm: "vm1".into(),
                disk: 2,
            },
            disk_size: 0x4000_0000,
            placement: 3,
        },
        &[
            b'F', b'B', 0x01, 0x01, 24, 0, 0, 0, // header: Hello, len 24
            2, 0, 0, 0, // disk 2
            0, 0, 0, 0x40, 0, 0, 0, 0, // disk size 1 GiB
            3, b'v', b'm', b'1', // vm name
            3, 0, 0, 0, 0, 0, 0, 0, // placement 3 (optional trailer)
        ],
    );
    // Placement 0 is the absence of the trailer, never an explicit 0; other lengths
    // are malformed.
    for payload in [
        &[
            2, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 3, b'v', b'm', b'1', 0, 0, 0, 0, 0, 0, 0, 0,
        ][..],
        &[
            2, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 3, b'v', b'm', b'1', 3, 0, 0, 0,
        ][..],
    ] {
        let mut buf = BytesMut::from(&[b'F', b'B', 0x01, 0x01, payload.len() as u8, 0, 0, 0][..]);
        buf.extend_from_slice(payload);
        assert!(decode_frame(&mut buf).is_err(), "{payload:?}");
    }
}

#[test]
fn accept() {
    check(
        Frame::Accept {
            next_seq: 5,
            credit_bytes: 0x0100_0000,
            zstd_window_log: 0,
        },
        &[
            b'F', b'B', 1, 0x02, 16, 0, 0, 0, //
            5, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 1, 0, 0, 0, 0,
        ],
    );
    // With a zstd window granted: a 4-byte trailer (window log, 3 reserved zeros).
    check(
        Frame::Accept {
            next_seq: 5,
            credit_bytes: 0x0100_0000,
            zstd_window_log: 27,
        },
        &[
            b'F', b'B', 1, 0x02, 20, 0, 0, 0, //
            5, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 1, 0, 0, 0, 0, //
            27, 0, 0, 0,
        ],
    );
}

#[test]
fn write() {
    let mut golden = vec![b'F', b'B', 1, 0x10, 0x10, 0x02, 0, 0]; // len 16 + 512 = 0x210
    golden.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // seq 1
    golden.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // offset 4096
    golden.extend_from_slice(&[0x5A; 512]);
    check(
        Frame::Record(Record::Write {
            seq: 1,
            offset: 4096,
            data: Bytes::from(vec![0x5A; 512]),
        }),
        &golden,
    );
}

#[test]
fn zero() {
    check(
        Frame::Record(Record::Zero {
            seq: 2,
            offset: 512,
            len: 1024,
        }),
        &[
            b'F', b'B', 1, 0x11, 24, 0, 0, 0, //
            2, 0, 0, 0, 0, 0, 0, 0, //
            0, 2, 0, 0, 0, 0, 0, 0, //
            0, 4, 0, 0, 0, 0, 0, 0,
        ],
    );
}

#[test]
fn tag() {
    check(
        Frame::Record(Record::Tag {
            seq: 3,
            id: 7,
            kind: TagKind::Crash,
            members: 6,
            group: "g1".into(),
        }),
        &[
            b'F', b'B', 1, 0x12, 24, 0, 0, 0, //
            3, 0, 0, 0, 0, 0, 0, 0, // seq
            7, 0, 0, 0, 0, 0, 0, 0, // tag id
            1, // crash
            6, 0, 0, 0, // members
            2, b'g', b'1',
        ],
    );
}

#[test]
fn ack_credit_error() {
    check(
        Frame::Ack { seq: 258 },
        &[b'F', b'B', 1, 0x20, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0],
    );
    check(
        Frame::Credit { credit_bytes: 1 },
        &[b'F', b'B', 1, 0x21, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    );
    check(
        Frame::error(ErrorCode::SequenceGap, "gap"),
        &[b'F', b'B', 1, 0x30, 5, 0, 0, 0, 20, 0, b'g', b'a', b'p'],
    );
    check(
        Frame::error(ErrorCode::TooSlow, "slow"),
        &[
            b'F', b'B', 1, 0x30, 6, 0, 0, 0, 5, 0, b's', b'l', b'o', b'w',
        ],
    );
}

#[test]
fn batch() {
    let batch = golden_batch();
    use fbr_protocol::wan::{decode_batch, encode_batch, Compressor};
    let mut golden = vec![
        1, 0, 0, 0, // version 1, flags 0 (no LZ4), reserved
        3, 0, 0, 0, 0, 0, 0, 0, // first_seq 3
        5, 0, 0, 0, 0, 0, 0, 0, // last_seq 5 (4 was coalesced away)
        2, 0, 0, 0, // 2 items
    ];
    let mut body = vec![1]; // Write
    body.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // seq 3
    body.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // offset 4096
    body.extend_from_slice(&[0, 0x22, 0, 0]); // len 8704
    body.push(1); // block 0: zero
    body.push(2); // block 1: reference
    body.extend_from_slice(&[0xAA; 32]);
    body.push(0); // block 2 (512 bytes): literal
    body.extend_from_slice(&[0x5A; 512]);
    body.push(3); // Tag
    body.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]); // seq 5
    body.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0]); // id 9
    body.extend_from_slice(&[1, 1, 0, 0, 0, 1, b'g']); // crash, 1 member, "g"
    golden.extend_from_slice(&(body.len() as u32).to_le_bytes());
    golden.extend_from_slice(&body);
    let mut out = BytesMut::new();
    encode_batch(&batch, Compressor::None, &mut Vec::new(), &mut out).unwrap();
    assert_eq!(&out[..], &golden[..]);
    assert_eq!(decode_batch(Bytes::from(golden.clone())).unwrap(), batch);
    // In a frame: type 0x13.
    check(
        Frame::Batch(Bytes::from(golden.clone())),
        &[
            &[b'F', b'B', 1, 0x13][..],
            &(golden.len() as u32).to_le_bytes(),
            &golden,
        ]
        .concat(),
    );
}

#[test]
fn resync_mark() {
    use fbr_protocol::{ResyncMark, ResyncMode, ResyncPhase};
    check(
        Frame::Record(Record::Resync {
            seq: 9,
            mark: ResyncMark {
                id: 0x0102,
                phase: ResyncPhase::Progress,
                mode: ResyncMode::Delta,
                next_region: 3,
                regions: 16,
                compared_bytes: 0x30_0000,
                sent_bytes: 0x1000,
            },
        }),
        &[
            b'F', b'B', 1, 0x14, 52, 0, 0, 0, // header: Resync, len 52
            9, 0, 0, 0, 0, 0, 0, 0, // seq 9
            2, 1, 0, 0, 0, 0, 0, 0, // id 0x0102
            2, 1, 0, 0, // phase progress, mode delta, reserved
            3, 0, 0, 0, 0, 0, 0, 0, // next region 3
            16, 0, 0, 0, 0, 0, 0, 0, // of 16 regions
            0, 0, 0x30, 0, 0, 0, 0, 0, // 3 MiB compared
            0, 0x10, 0, 0, 0, 0, 0, 0, // 4 KiB sent
        ],
    );
}

#[test]
fn resync_request() {
    check(
        Frame::ResyncRequest {
            mode: fbr_protocol::ResyncMode::Full,
            reason: "lost".into(),
        },
        &[b'F', b'B', 1, 0x24, 5, 0, 0, 0, 2, b'l', b'o', b's', b't'],
    );
}

#[test]
fn hash_stream_frames() {
    let mut golden = vec![b'F', b'B', 1, 0x03, 48, 0, 0, 0]; // HashHello, len 48
    golden.extend_from_slice(&[1, 0, 0, 0]); // disk 1
    golden.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // disk size 1 MiB
    golden.extend_from_slice(&[0xAA; 32]); // key
    golden.extend_from_slice(&[3, b'v', b'm', b'1']);
    check(
        Frame::HashHello {
            stream: StreamId {
                vm: "vm1".into(),
                disk: 1,
            },
            disk_size: 1 << 20,
            key: [0xAA; 32],
        },
        &golden,
    );
    check(
        Frame::HashAccept {
            replica: fbr_protocol::ReplicaState::Resyncing,
            resync_id: 7,
            mode: fbr_protocol::ResyncMode::Delta,
            next_region: 2,
            hwm: 40,
        },
        &[
            b'F', b'B', 1, 0x04, 26, 0, 0, 0, // HashAccept, len 26
            4, 1, // resyncing, delta
            7, 0, 0, 0, 0, 0, 0, 0, // resync id 7
            2, 0, 0, 0, 0, 0, 0, 0, // next region 2
            40, 0, 0, 0, 0, 0, 0, 0, // high-water mark 40
        ],
    );
    check(
        Frame::HashRequest {
            level: 1,
            first: 32,
            count: 16,
        },
        &[
            b'F', b'B', 1, 0x05, 13, 0, 0, 0, //
            1, // level 1
            32, 0, 0, 0, 0, 0, 0, 0, // first node 32
            16, 0, 0, 0, // 16 nodes
        ],
    );
    let mut golden = vec![b'F', b'B', 1, 0x23, 45, 0, 0, 0]; // Hashes, len 13 + 2 * 16
    golden.extend_from_slice(&[2, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
    golden.extend_from_slice(&[0x11; 16]);
    golden.extend_from_slice(&[0x22; 16]);
    check(
        Frame::Hashes {
            level: 2,
            first: 5,
            hashes: vec![[0x11; 16], [0x22; 16]],
        },
        &golden,
    );
}

#[test]
fn hostile_hash_frames_are_refused() {
    let bad = [
        // HashRequest for level 3 (there are three levels, 0-2).
        vec![
            b'F', b'B', 1, 0x05, 13, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
        ],
        // HashRequest for 0 nodes.
        vec![
            b'F', b'B', 1, 0x05, 13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        // Hashes announcing 2 nodes with one hash.
        {
            let mut v = vec![
                b'F', b'B', 1, 0x23, 29, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0,
            ];
            v.extend_from_slice(&[0; 16]);
            v
        },
        // A resync mark with an unknown phase.
        {
            let mut v = vec![b'F', b'B', 1, 0x14, 52, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
            v.extend_from_slice(&[0; 8]);
            v.extend_from_slice(&[9, 1, 0, 0]);
            v.extend_from_slice(&[0; 32]);
            v
        },
    ];
    for frame in bad {
        let mut buf = BytesMut::from(&frame[..]);
        let err = decode_frame(&mut buf).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame, "{err}");
    }
}

#[test]
fn control_request_and_answer() {
    check(
        Frame::Control {
            request: bytes::Bytes::from_static(br#"{"op":"status"}"#),
        },
        &[
            b'F', b'B', 1, 0x06, 15, 0, 0, 0, // Control, len 15
            b'{', b'"', b'o', b'p', b'"', b':', b'"', b's', b't', b'a', b't', b'u', b's', b'"',
            b'}',
        ],
    );
    check(
        Frame::ControlAnswer {
            answer: bytes::Bytes::from_static(br#"{"ok":true}"#),
        },
        &[
            b'F', b'B', 1, 0x25, 11, 0, 0, 0, // ControlAnswer, len 11
            b'{', b'"', b'o', b'k', b'"', b':', b't', b'r', b'u', b'e', b'}',
        ],
    );
    // Empty, or a request over 64 KiB, is malformed.
    for (ty, len) in [(0x06u8, 0usize), (0x25, 0), (0x06, 64 * 1024 + 1)] {
        let mut raw = vec![b'F', b'B', 1, ty];
        raw.extend_from_slice(&(len as u32).to_le_bytes());
        raw.resize(8 + len, b' ');
        let mut buf = bytes::BytesMut::from(&raw[..]);
        assert!(
            matches!(
                fbr_protocol::decode_frame(&mut buf),
                Err(fbr_protocol::DecodeError::Malformed { .. })
            ),
            "type {ty:#x}, {len} bytes"
        );
    }
}

/// The batch the golden tests encode.
fn golden_batch() -> fbr_protocol::wan::Batch {
    use fbr_protocol::wan::{Batch, Block, Item};
    Batch {
        first_seq: 3,
        last_seq: 5,
        items: vec![
            Item::Write {
                seq: 3,
                offset: 0x1000,
                len: 8192 + 512,
                blocks: vec![
                    Block::Zero,
                    Block::Ref([0xAA; 32]),
                    Block::Literal(Bytes::from(vec![0x5A; 512])),
                ],
            },
            Item::Plain(Record::Tag {
                seq: 5,
                id: 9,
                kind: TagKind::Crash,
                members: 1,
                group: "g".into(),
            }),
        ],
    }
}
/// The header of a version-2 batch of [`golden_batch`].
const ZSTD_GOLDEN_HEADER: [u8; 28] = [
    2, 2, 0, 0, // version 2 (zstd), flags: bit 1 (zstd), reserved
    3, 0, 0, 0, 0, 0, 0, 0, // first_seq 3
    5, 0, 0, 0, 0, 0, 0, 0, // last_seq 5
    2, 0, 0, 0, // 2 items
    80, 2, 0, 0, // body_len 592 (before compression)
];

/// [`golden_batch`] as one whole zstd frame (framed, level 3), as libzstd 1.5.7 makes it:
/// magic 28 b5 2f fd, window descriptor 0x00 (2^10: zstd sizes the window to the
/// 592-byte body), one compressed block flagged last (header 3d 01 00).
const ZSTD_FRAMED_GOLDEN: [u8; 48] = [
    40, 181, 47, 253, 0, 0, 61, 1, 0, 200, 1, 3, 0, 16, 0, 34, 0, 0, 1, 2, 170, 0, 90, 3, 5, 0, 9,
    0, 1, 1, 0, 0, 0, 1, 103, 6, 16, 0, 3, 15, 131, 95, 197, 173, 12, 156, 13, 1,
];

/// [`golden_batch`] encoded twice through `c`: the two payloads.
fn two_zstd_pieces(c: &mut fbr_protocol::codec::StreamCompressor) -> Vec<Vec<u8>> {
    use fbr_protocol::wan::{encode_batch, Compressor};
    (0..2)
        .map(|_| {
            let mut out = BytesMut::new();
            encode_batch(
                &golden_batch(),
                Compressor::Zstd(c),
                &mut Vec::new(),
                &mut out,
            )
            .unwrap();
            out.to_vec()
        })
        .collect()
}

/// Two batches through one zstd context (window 2^17, level 3): version 2, flag bit 1,
/// and pieces that decode only in order, through the stream's context. The pieces are
/// what libzstd 1.5.7 produced; their decoding is pinned whatever a later libzstd
/// encodes (and the encoding too, while the pinned libzstd is the one linked).
#[test]
fn zstd_batches() {
    use fbr_protocol::codec::{
        compressor_cost, decompressor_cost, CodecMemory, StreamCompressor, StreamDecompressor,
    };
    use fbr_protocol::wan::decode_batch_with;
    let pool = CodecMemory::new(1 << 30);
    let mut c = StreamCompressor::new(
        3,
        17,
        pool.reserve(1, 17, |w| compressor_cost(w, 3)).unwrap(),
    )
    .unwrap();
    let pieces = two_zstd_pieces(&mut c);
    let header = ZSTD_GOLDEN_HEADER;
    // The first piece opens the endless zstd frame (magic 28 b5 2f fd, window
    // descriptor 0x38: 2^17); the second is a repeat of the first body: a 3-byte block
    // header and one match into the history.
    let golden: [&[u8]; 2] = [
        &[
            40, 181, 47, 253, 0, 56, 60, 1, 0, 200, 1, 3, 0, 16, 0, 34, 0, 0, 1, 2, 170, 0, 90, 3,
            5, 0, 9, 0, 1, 1, 0, 0, 0, 1, 103, 6, 16, 0, 3, 15, 131, 95, 197, 173, 12, 156, 13, 1,
        ],
        &[68, 0, 0, 0, 1, 0, 77, 166, 84, 2, 8],
    ];
    for (piece, golden) in pieces.iter().zip(golden) {
        assert_eq!(&piece[..28], &header[..]);
        assert_eq!(&piece[28..], golden, "libzstd 1.5.7 encodes as pinned");
    }
    // Decoding is pinned for good: the second piece alone is meaningless.
    let mut fresh =
        StreamDecompressor::new(pool.reserve(1, 17, decompressor_cost).unwrap()).unwrap();
    let second = [&header[..], golden[1]].concat();
    assert!(decode_batch_with(Bytes::from(second), Some(&mut fresh)).is_err());
    let mut d = StreamDecompressor::new(pool.reserve(1, 17, decompressor_cost).unwrap()).unwrap();
    for g in golden {
        let p = [&header[..], g].concat();
        assert_eq!(
            decode_batch_with(Bytes::from(p), Some(&mut d)).unwrap(),
            golden_batch()
        );
    }
}

/// Framed zstd (a relay stream whose share buys no context of its own): each piece is a
/// whole frame (the same bytes for the same body: no history), and a decoder reads them
/// one after another as it reads a continued stream.
#[test]
fn zstd_framed_batches() {
    use fbr_protocol::codec::{
        decompressor_cost, CodecMemory, FramePool, StreamCompressor, StreamDecompressor,
    };
    use fbr_protocol::wan::decode_batch_with;
    let pool = CodecMemory::new(1 << 30);
    let mut c = StreamCompressor::framed(FramePool::new(pool.clone(), 3));
    let pieces = two_zstd_pieces(&mut c);
    let header = ZSTD_GOLDEN_HEADER;
    // The second piece is the very same frame.
    let golden: &[u8] = &ZSTD_FRAMED_GOLDEN;
    for piece in &pieces {
        assert_eq!(&piece[..28], &header[..]);
        assert_eq!(&piece[28..], golden, "libzstd 1.5.7 encodes as pinned");
    }
    // Any decoder of the stream reads them in turn; a fresh one reads either.
    let mut d = StreamDecompressor::new(pool.reserve(1, 17, decompressor_cost).unwrap()).unwrap();
    for piece in &pieces {
        assert_eq!(
            decode_batch_with(Bytes::from(piece.clone()), Some(&mut d)).unwrap(),
            golden_batch()
        );
    }
    let mut fresh =
        StreamDecompressor::new(pool.reserve(1, 17, decompressor_cost).unwrap()).unwrap();
    assert_eq!(
        decode_batch_with(Bytes::from(pieces[1].clone()), Some(&mut fresh)).unwrap(),
        golden_batch()
    );
}

/// A continued stream that outgrew its share hands over to a framed successor: the
/// successor's first piece closes the open frame (an empty last block, `01 00 00`),
/// then is a whole frame of its own; the stream's decoder reads across the change.
#[test]
fn zstd_handover_batch() {
    use fbr_protocol::codec::{
        compressor_cost, decompressor_cost, CodecMemory, FramePool, StreamCompressor,
        StreamDecompressor,
    };
    use fbr_protocol::wan::decode_batch_with;
    let pool = CodecMemory::new(1 << 30);
    let mut own = StreamCompressor::new(
        3,
        17,
        pool.reserve_fair(1, 17, 17, |w| compressor_cost(w, 3))
            .unwrap(),
    )
    .unwrap();
    let first = two_zstd_pieces(&mut own).remove(0);
    let tail = own.end().unwrap();
    let mut framed = StreamCompressor::framed(FramePool::new(pool.clone(), 3)).succeed(tail);
    let pieces = two_zstd_pieces(&mut framed);
    let header = ZSTD_GOLDEN_HEADER;
    let framed_golden: &[u8] = &ZSTD_FRAMED_GOLDEN;
    let handover = [&[1u8, 0, 0][..], framed_golden].concat();
    assert_eq!(&pieces[0][..28], &header[..]);
    assert_eq!(
        &pieces[0][28..],
        &handover[..],
        "libzstd 1.5.7 encodes as pinned"
    );
    assert_eq!(
        &pieces[1][28..],
        framed_golden,
        "only the first piece closes the frame"
    );
    let mut d = StreamDecompressor::new(pool.reserve(1, 17, decompressor_cost).unwrap()).unwrap();
    for piece in [first, [&header[..], &handover].concat(), pieces[1].clone()] {
        assert_eq!(
            decode_batch_with(Bytes::from(piece), Some(&mut d)).unwrap(),
            golden_batch()
        );
    }
}
