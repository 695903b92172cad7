//! Property tests: every frame survives encode -> decode, in any split of the bytes, and
//! no byte string makes the decoder panic or over-read.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_protocol::{
    decode_frame, encode_frame, ErrorCode, Frame, Record, ReplicaState, ResyncMark, ResyncMode,
    ResyncPhase, StreamId, TagKind,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,63}"
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (name(), any::<u32>(), 1u64..1 << 40, any::<u64>()).prop_map(|(vm, disk, s, p)| {
            Frame::Hello {
                stream: StreamId { vm, disk },
                disk_size: s * 512,
                placement: p,
            }
        }),
        (1u64.., any::<u64>(), prop_oneof![Just(0u8), 17u8..=27]).prop_map(|(n, c, w)| {
            Frame::Accept {
                next_seq: n,
                credit_bytes: c,
                zstd_window_log: w,
            }
        }),
        (
            1u64..,
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 1..4096)
        )
            .prop_map(|(seq, offset, d)| Frame::Record(Record::Write {
                seq,
                offset,
                data: Bytes::from(d)
            })),
        (1u64.., any::<u64>(), 1u64..).prop_map(|(seq, offset, len)| Frame::Record(Record::Zero {
            seq,
            offset,
            len
        })),
        (1u64.., any::<u64>(), any::<bool>(), 1u32.., name()).prop_map(
            |(seq, id, app, members, group)| Frame::Record(Record::Tag {
                seq,
                id,
                kind: if app { TagKind::App } else { TagKind::Crash },
                members,
                group
            })
        ),
        (
            1u64..,
            any::<u64>(),
            1u8..4,
            any::<bool>(),
            any::<[u64; 4]>()
        )
            .prop_map(|(seq, id, phase, full, [a, b, c, d])| Frame::Record(
                Record::Resync {
                    seq,
                    mark: ResyncMark {
                        id,
                        phase: [ResyncPhase::Begin, ResyncPhase::Progress, ResyncPhase::End]
                            [phase as usize - 1],
                        mode: if full {
                            ResyncMode::Full
                        } else {
                            ResyncMode::Delta
                        },
                        next_region: a.min(b),
                        regions: a.max(b),
                        compared_bytes: c,
                        sent_bytes: d,
                    },
                }
            )),
        (any::<bool>(), "\\PC{0,100}").prop_map(|(full, reason)| Frame::ResyncRequest {
            mode: if full {
                ResyncMode::Full
            } else {
                ResyncMode::Delta
            },
            reason
        }),
        (name(), any::<u32>(), 1u64..1 << 40, any::<[u8; 32]>()).prop_map(|(vm, disk, s, key)| {
            Frame::HashHello {
                stream: StreamId { vm, disk },
                disk_size: s * 512,
                key,
            }
        }),
        (1u8..5, any::<[u64; 3]>()).prop_map(|(state, [id, next, hwm])| Frame::HashAccept {
            replica: [
                ReplicaState::New,
                ReplicaState::Stale,
                ReplicaState::Consistent,
                ReplicaState::Resyncing
            ][state as usize - 1],
            resync_id: id,
            mode: ResyncMode::Delta,
            next_region: next,
            hwm
        }),
        (0u8..3, any::<u64>(), 1u32..=4096).prop_map(|(level, first, count)| {
            Frame::HashRequest {
                level,
                first,
                count,
            }
        }),
        (
            0u8..3,
            any::<u64>(),
            prop::collection::vec(any::<[u8; 16]>(), 1..64)
        )
            .prop_map(|(level, first, hashes)| Frame::Hashes {
                level,
                first,
                hashes
            }),
        any::<u64>().prop_map(|seq| Frame::Ack { seq }),
        any::<u64>().prop_map(|seq| Frame::Applied { seq }),
        any::<u64>().prop_map(|credit_bytes| Frame::Credit { credit_bytes }),
        (any::<u16>(), "\\PC{0,100}").prop_map(|(c, m)| Frame::error(ErrorCode::from_u16(c), m)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip_in_any_split(frames in prop::collection::vec(frame(), 1..8), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        for f in &frames { encode_frame(f, &mut wire); }
        let cut = cut.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut decoded = Vec::new();
        while let Some(f) = decode_frame(&mut buf).unwrap() { decoded.push(f); }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(f) = decode_frame(&mut buf).unwrap() { decoded.push(f); }
        prop_assert_eq!(decoded, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_frame(&mut buf) {}
    }

    #[test]
    fn mutated_frames_never_panic(f in frame(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut wire = BytesMut::new();
        encode_frame(&f, &mut wire);
        let i = pos.index(wire.len());
        wire[i] = byte;
        while let Ok(Some(_)) = decode_frame(&mut wire) {}
    }
}

mod batches {
    use super::*;
    use fbr_protocol::codec::{StreamCompressor, StreamDecompressor};
    use fbr_protocol::wan::{
        decode_batch, decode_batch_with, encode_batch, Batch, Block, Compressor, Item, BLOCK_SIZE,
    };

    fn lz4_or_none(compress: bool) -> Compressor<'static> {
        if compress {
            Compressor::Lz4
        } else {
            Compressor::None
        }
    }

    fn zstd_pair() -> (StreamCompressor, StreamDecompressor) {
        fbr_protocol::codec::stream_pair(18, 3).unwrap()
    }

    fn block(n: usize) -> impl Strategy<Value = Block> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), n..=n).prop_map(|d| Block::Literal(Bytes::from(d))),
            Just(Block::Zero),
            any::<[u8; 32]>().prop_map(Block::Ref),
        ]
    }

    fn write_item() -> impl Strategy<Value = (u64, u32, Vec<Block>)> {
        (any::<u64>(), 1u32..=20).prop_flat_map(|(offset, sectors)| {
            let len = sectors * 512;
            let blocks: Vec<_> = (0..(len as usize).div_ceil(BLOCK_SIZE))
                .map(|i| block((len as usize - i * BLOCK_SIZE).min(BLOCK_SIZE)))
                .collect();
            (Just(offset), Just(len), blocks)
        })
    }

    fn batch() -> impl Strategy<Value = Batch> {
        (
            1u64..1 << 40,
            prop::collection::vec((1u64..4, write_item()), 1..6),
        )
            .prop_map(|(first, writes)| {
                let mut seq = first - 1;
                let items = writes
                    .into_iter()
                    .map(|(skip, (offset, len, blocks))| {
                        seq += skip;
                        Item::Write {
                            seq,
                            offset,
                            len,
                            blocks,
                        }
                    })
                    .collect::<Vec<_>>();
                Batch {
                    first_seq: first,
                    last_seq: seq,
                    items,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn batches_round_trip(b in batch(), compress in any::<bool>()) {
            let mut out = BytesMut::new();
            encode_batch(&b, lz4_or_none(compress), &mut Vec::new(), &mut out).unwrap();
            prop_assert_eq!(decode_batch(out.freeze()).unwrap(), b);
        }

        #[test]
        fn mutated_batches_never_panic(b in batch(), compress in any::<bool>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut out = BytesMut::new();
            encode_batch(&b, lz4_or_none(compress), &mut Vec::new(), &mut out).unwrap();
            let i = pos.index(out.len());
            out[i] = byte;
            let _ = decode_batch(out.freeze());
        }

        /// A run of batches through one zstd context decodes, in order, through the
        /// receiver's context, whatever codec each batch used.
        #[test]
        fn zstd_streams_round_trip(batches in prop::collection::vec((batch(), 0u8..3), 1..6)) {
            let (mut c, mut d) = zstd_pair();
            for (b, codec) in &batches {
                let mut out = BytesMut::new();
                let compressor = match codec {
                    0 => Compressor::Zstd(&mut c),
                    1 => Compressor::Lz4,
                    _ => Compressor::None,
                };
                encode_batch(b, compressor, &mut Vec::new(), &mut out).unwrap();
                prop_assert_eq!(&decode_batch_with(out.freeze(), Some(&mut d)).unwrap(), b);
            }
        }

        /// A mutated byte anywhere in a zstd stream is an error or a batch that decodes
        /// (the batch checks still hold), never a panic or a body longer than announced.
        #[test]
        fn mutated_zstd_streams_never_panic(batches in prop::collection::vec(batch(), 1..4), which in any::<prop::sample::Index>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (mut c, mut d) = zstd_pair();
            let target = which.index(batches.len());
            for (n, b) in batches.iter().enumerate() {
                let mut out = BytesMut::new();
                encode_batch(b, Compressor::Zstd(&mut c), &mut Vec::new(), &mut out).unwrap();
                if n == target {
                    let i = pos.index(out.len());
                    out[i] = byte;
                }
                if decode_batch_with(out.freeze(), Some(&mut d)).is_err() {
                    break;
                }
            }
        }
    }
}
