//! Batch encoding: the [`Reducer`] turns records (a read window, or a planned part of
//! an interval) into `Batch` frames: coalescing of a window, zero elision, dedup against
//! [`KnownBlocks`], and compression (`fbr_protocol::wan`): the session's zstd context
//! when it has one and the stream is not CPU-bound ([`CodecChooser`]), LZ4 otherwise,
//! paused after a batch that did not shrink.
//!
//! One `Reducer` lives exactly as long as one session with the master target: its zstd
//! context is the relay's half of that session's history, and every batch it encodes
//! is sent in that session (the forwarder sends all of them, in order).

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fbr_cache::CacheError;
use fbr_protocol::wan::{self, block_hash, is_zero, Block, Item, BLOCK_SIZE};
use fbr_protocol::{Record, StreamId};

use fbr_protocol::codec::StreamCompressor;
use fbr_protocol::wan::{BodyCoding, Compressor};

use super::choose::CodecChooser;
use super::coalesce::coalesce_with;
use super::plan::IntervalPlan;
use super::stages::BatchCompression;
use super::{Compression, KnownBlocks, RecordSource, StageBytes, WanConfig};
use crate::cache::CachedRecord;

/// Batches not tried for compression after one that compressed poorly.
pub const SKIP_AFTER_POOR: u32 = 32;
/// The same, for a session with a zstd context: skipped batches are also missing from
/// its history, and zstd gives up on incompressible blocks quickly, so it retries soon.
pub const SKIP_AFTER_POOR_ZSTD: u32 = 4;
/// Most record bytes per batch: keeps the body under `wan::MAX_BATCH_BODY`.
pub const BATCH_RECORD_BYTES: usize = 3 << 20;

/// One encoded batch, ready to send.
#[derive(Debug)]
pub struct ReducedBatch {
    pub payload: bytes::Bytes,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hashes of the blocks sent as bytes: known to the master target once it acks.
    pub literal_hashes: Vec<[u8; 32]>,
    /// Per input record: when it was appended to the cache, and whether it is a tag.
    pub records: Vec<(u64, bool)>,
}

/// Scratch space for encoding one batch: its uncompressed body and its payload as
/// encoded (sized for the worst case: LZ4's bound over the body).
#[derive(Default)]
struct EncodeScratch {
    body: Vec<u8>,
    payload: BytesMut,
}

thread_local! {
    /// Per thread, not per session: encoding runs on the few threads that reduce (the
    /// async workers and at most `REDUCE_SLOTS` blocking threads), so a thousand
    /// sessions do not each keep a body of up to [`BATCH_RECORD_BYTES`] they are not
    /// encoding, and the pages of the worst-case payload are not faulted in anew for
    /// every batch.
    static SCRATCH: std::cell::RefCell<EncodeScratch> = std::cell::RefCell::new(EncodeScratch::default());
}

/// `wan::encode_batch` through this thread's scratch. The payload is copied out at its
/// own size: it waits in the QUIC send buffer until the master target acknowledges it,
/// and the worst-case buffer it was encoded in would wait with it.
fn encode_batch(
    batch: &wan::Batch,
    compressor: Compressor<'_>,
) -> Result<(wan::Encoded, Bytes), fbr_protocol::codec::CodecError> {
    SCRATCH.with_borrow_mut(|s| {
        s.payload.clear();
        let enc = wan::encode_batch(batch, compressor, &mut s.body, &mut s.payload)?;
        Ok((enc, Bytes::copy_from_slice(&s.payload)))
    })
}

/// Per-session reducer state.
#[derive(Debug)]
pub struct Reducer {
    config: WanConfig,
    skip_compression: u32,
    /// The session's zstd context (none when the master target granted no window, the
    /// relay's pool was spent, or zstd is off).
    zstd: Option<StreamCompressor>,
    chooser: CodecChooser,
}

impl Reducer {
    /// A reducer without zstd (LZ4 or nothing).
    pub fn new(config: WanConfig) -> Self {
        Self::with_zstd(config, None)
    }

    /// A reducer for a session whose batches may continue `zstd`.
    pub fn with_zstd(config: WanConfig, zstd: Option<StreamCompressor>) -> Self {
        Reducer {
            config,
            skip_compression: 0,
            zstd,
            chooser: CodecChooser::default(),
        }
    }

    /// Gives the session's own zstd context back when it holds more than one of
    /// `streams` streams' fair share of the relay's codec memory (streams joined since
    /// it was reserved): its frame ends, and `successor` (reserved at today's share, or
    /// framed) takes over, its first piece closing the old frame. Without this the
    /// first streams of a thousand would keep the windows they got while alone.
    /// Returns whether the context was given up.
    pub fn make_way(
        &mut self,
        streams: usize,
        successor: impl FnOnce() -> Option<StreamCompressor>,
    ) -> bool {
        if !self
            .zstd
            .as_ref()
            .is_some_and(|z| z.exceeds_fair_share(streams))
        {
            return false;
        }
        let Some(old) = self.zstd.take() else {
            return false;
        };
        match old.end() {
            Ok(tail) => self.zstd = successor().map(|next| next.succeed(tail)),
            // The frame cannot be closed: no new one may open in this session (it
            // goes on with LZ4, as after any failure of its context).
            Err(e) => tracing::warn!("zstd failed, the session continues with LZ4: {e}"),
        }
        true
    }

    /// What the last round cost on each side (see [`CodecChooser::observe`]).
    pub fn observe(&mut self, cpu: std::time::Duration, link: std::time::Duration, backlog: bool) {
        self.chooser.observe(cpu, link, backlog);
    }

    /// Turns `records` (consecutive sequence numbers, as read from the cache) into
    /// batches, adding to `stats`. A batch never spans a recovery point.
    pub fn reduce(
        &mut self,
        records: Vec<CachedRecord>,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> Vec<ReducedBatch> {
        let mut out = Vec::new();
        let mut window: Vec<(Record, u64)> = Vec::new();
        let mut window_bytes = 0usize;
        for r in records {
            stats.add_input(&r.record);
            let is_tag = matches!(r.record, Record::Tag { .. });
            window_bytes += r.record.encoded_len();
            window.push((r.record, r.appended_ms));
            // A batch never spans a recovery point, and stays under the size limits.
            if is_tag || window_bytes >= BATCH_RECORD_BYTES {
                out.push(self.reduce_window(std::mem::take(&mut window), known, stats));
                window_bytes = 0;
            }
        }
        if !window.is_empty() {
            out.push(self.reduce_window(window, known, stats));
        }
        out
    }

    fn reduce_window(
        &mut self,
        records: Vec<(Record, u64)>,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> ReducedBatch {
        let first_seq = records[0].0.seq();
        let last_seq = records[records.len() - 1].0.seq();
        let (kept, blanked) = if self.config.coalesce {
            coalesce_with(records)
        } else {
            (records, 0)
        };
        self.encode(first_seq, last_seq, kept, blanked, known, stats)
    }

    /// Sends the next part of an interval plan: reads the surviving records (about
    /// `budget` bytes of them), cuts them down, and encodes them. The plan is done when
    /// [`IntervalPlan::is_done`].
    pub fn next_from_plan(
        &mut self,
        plan: &mut IntervalPlan,
        source: &impl RecordSource,
        stream: &StreamId,
        budget: usize,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> Result<Vec<ReducedBatch>, CacheError> {
        let mut out = Vec::new();
        let mut produced = 0usize;
        while produced < budget {
            let Some(part) = plan.next_batch(source, stream)? else {
                break;
            };
            produced += part.bytes;
            out.push(self.encode(
                part.first_seq,
                part.last_seq,
                part.kept,
                part.blanked,
                known,
                stats,
            ));
        }
        Ok(out)
    }

    /// Reduces and encodes the records kept for the span `first_seq..=last_seq` (the
    /// rest of the span was coalesced away, and `blanked` bytes of the kept writes are
    /// rewritten later in it): zero elision, dedup, LZ4.
    fn encode(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        kept: Vec<(Record, u64)>,
        blanked: u64,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> ReducedBatch {
        let kept_bytes: u64 = kept.iter().map(|(r, _)| r.logical_bytes()).sum();
        stats.add_kept(kept.len() as u64, kept_bytes - blanked);
        let meta: Vec<(u64, bool)> = kept
            .iter()
            .map(|(r, t)| (*t, matches!(r, Record::Tag { .. })))
            .collect();
        let mut items = Vec::with_capacity(kept.len());
        let mut literal_hashes = Vec::new();
        let (mut data_bytes, mut literal_bytes, mut hits) = (0u64, 0u64, 0u64);
        for (record, _) in kept {
            let Record::Write { seq, offset, data } = record else {
                items.push(Item::Plain(record));
                continue;
            };
            if is_zero(&data) {
                items.push(Item::Plain(Record::Zero {
                    seq,
                    offset,
                    len: data.len() as u64,
                }));
                continue;
            }
            let mut blocks = Vec::with_capacity(data.len().div_ceil(BLOCK_SIZE));
            for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
                if is_zero(chunk) {
                    blocks.push(Block::Zero);
                    continue;
                }
                data_bytes += chunk.len() as u64;
                if self.config.dedup {
                    let h = block_hash(chunk);
                    if known.contains(&h) {
                        hits += 1;
                        blocks.push(Block::Ref(h));
                        continue;
                    }
                    literal_hashes.push(h);
                }
                literal_bytes += chunk.len() as u64;
                let start = i * BLOCK_SIZE;
                blocks.push(Block::Literal(data.slice(start..start + chunk.len())));
            }
            items.push(Item::Write {
                seq,
                offset,
                len: data.len() as u32,
                blocks,
            });
        }
        stats.add_blocks(data_bytes, literal_bytes, hits);

        let compress = match self.config.compression {
            Compression::Off => false,
            Compression::Always => true,
            // Skipping saves CPU, which only matters while the CPU is the bottleneck:
            // while the link is, every batch is compressed (a skipped batch is also
            // missing from the zstd history).
            Compression::Adaptive => {
                if self.skip_compression > 0 {
                    self.skip_compression -= 1;
                    !self.chooser.cpu_bound()
                } else {
                    true
                }
            }
        };
        let batch = wan::Batch {
            first_seq,
            last_seq,
            items,
        };
        // `always` spends the CPU for ratio whatever it costs; `adaptive` may fall back
        // to LZ4 while the stream is CPU-bound ([`CodecChooser`]).
        let use_zstd = compress
            && self.zstd.is_some()
            && (self.config.compression == Compression::Always || self.chooser.next_is_zstd());
        let started = Instant::now();
        let (enc, payload) = match self.zstd.as_mut().filter(|_| use_zstd) {
            Some(zstd) => match encode_batch(&batch, Compressor::Zstd(zstd)) {
                Ok(encoded) => encoded,
                Err(e) if zstd.is_framed() => {
                    // No frame context to be had just now (or zstd failed on this
                    // body): this batch goes with LZ4; the next is a new frame.
                    tracing::debug!("zstd frame failed, this batch goes with LZ4: {e}");
                    self.encode_plain(&batch, compress)
                }
                Err(e) => {
                    // The context may hold part of a body the master target never
                    // sees: it is dropped, and the session goes on without zstd
                    // (the master target's context simply receives nothing more).
                    tracing::warn!("zstd failed, the session continues with LZ4: {e}");
                    self.zstd = None;
                    self.encode_plain(&batch, compress)
                }
            },
            None => self.encode_plain(&batch, compress),
        };
        let compression = if compress {
            // Judged on bodies of a block or more: a tag alone never shrinks, and
            // says nothing about the data.
            let poor = enc.body_len >= BLOCK_SIZE && enc.payload_len * 10 > enc.body_len * 9;
            if poor && self.config.compression == Compression::Adaptive {
                self.skip_compression = if self.zstd.is_some() {
                    SKIP_AFTER_POOR_ZSTD
                } else {
                    SKIP_AFTER_POOR
                };
            }
            let nanos = started.elapsed().as_nanos() as u64;
            self.chooser.record_batch(
                enc.coding == BodyCoding::Zstd,
                enc.body_len,
                enc.payload_len,
                nanos,
            );
            BatchCompression::Tried {
                coding: enc.coding,
                nanos,
            }
        } else if self.config.compression == Compression::Adaptive {
            BatchCompression::Skipped
        } else {
            BatchCompression::Off
        };
        stats.add_batch(enc.payload_len as u64, enc.body_len as u64, compression);
        ReducedBatch {
            payload,
            first_seq,
            last_seq,
            literal_hashes,
            records: meta,
        }
    }
}

impl Reducer {
    /// LZ4 (when `compress`) or nothing: cannot fail.
    fn encode_plain(&mut self, batch: &wan::Batch, compress: bool) -> (wan::Encoded, Bytes) {
        let compressor = if compress {
            Compressor::Lz4
        } else {
            Compressor::None
        };
        match encode_batch(batch, compressor) {
            Ok(encoded) => encoded,
            Err(e) => unreachable!("LZ4 and plain encoding do not fail: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use fbr_protocol::wan::{self, block_hash, Block, Item, BLOCK_SIZE};
    use std::sync::atomic::Ordering;

    fn cached(r: Record) -> CachedRecord {
        CachedRecord {
            record: r,
            appended_ms: 0,
        }
    }

    #[test]
    fn rewrites_zeros_and_known_blocks_shrink_the_batch() {
        let known = KnownBlocks::new(16);
        let stats = StageBytes::default();
        let mut reducer = Reducer::new(WanConfig::default());
        let block = |b: u8| vec![b; BLOCK_SIZE];
        let mut data = block(1);
        data.extend(block(0));
        data.extend(block(2));
        known.insert_all(&[block_hash(&block(2))]);
        let records = vec![
            cached(Record::Write {
                seq: 1,
                offset: 0,
                data: Bytes::from(block(9)),
            }),
            cached(Record::Write {
                seq: 2,
                offset: 0,
                data: Bytes::from(data),
            }),
            cached(Record::Write {
                seq: 3,
                offset: 65536,
                data: Bytes::from(block(0)),
            }),
            cached(Record::Tag {
                seq: 4,
                id: 1,
                kind: fbr_protocol::TagKind::Crash,
                members: 1,
                group: "g".into(),
            }),
            cached(Record::Write {
                seq: 5,
                offset: 0,
                data: Bytes::from(block(3)),
            }),
        ];
        let batches = reducer.reduce(records, &known, &stats);
        assert_eq!(batches.len(), 2, "split after the tag");
        assert_eq!((batches[0].first_seq, batches[0].last_seq), (1, 4));
        let b = wan::decode_batch(batches[0].payload.clone()).unwrap();
        assert_eq!(b.items.len(), 3, "record 1 was rewritten by record 2");
        let Item::Write { blocks, .. } = &b.items[0] else {
            panic!()
        };
        assert!(matches!(
            blocks[..],
            [Block::Literal(_), Block::Zero, Block::Ref(_)]
        ));
        assert!(matches!(
            b.items[1],
            Item::Plain(Record::Zero { seq: 3, .. })
        ));
        assert_eq!(batches[0].literal_hashes, vec![block_hash(&block(1))]);
        let s = stats.stages();
        assert_eq!(s[0], ("logical", 6 * BLOCK_SIZE as u64));
        assert_eq!(s[1].1, 5 * BLOCK_SIZE as u64);
        assert_eq!(s[2].1, 3 * BLOCK_SIZE as u64);
        assert_eq!(s[3].1, 2 * BLOCK_SIZE as u64);
        assert_eq!(stats.dedup_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn incompressible_batches_pause_compression_of_a_cpu_bound_stream() {
        for cpu_bound in [true, false] {
            let (tried, skipped) = compress_random(cpu_bound);
            if cpu_bound {
                assert_eq!((tried, skipped), (1, 4), "one try, then skips");
            } else {
                assert_eq!((tried, skipped), (5, 0), "the link limits: always try");
            }
        }
    }

    /// Five incompressible batches: (batches tried, batches skipped).
    fn compress_random(cpu_bound: bool) -> (u64, u64) {
        let known = KnownBlocks::new(0);
        let stats = StageBytes::default();
        let mut reducer = Reducer::new(WanConfig {
            dedup: false,
            ..WanConfig::default()
        });
        for _ in 0..10 {
            let ms = std::time::Duration::from_millis;
            if cpu_bound {
                reducer.observe(ms(40), ms(1), true);
            } else {
                reducer.observe(ms(1), ms(40), true);
            }
        }
        let mut x = 0x9E3779B97F4A7C15u64;
        let mut random = || {
            let v: Vec<u8> = (0..BLOCK_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            Bytes::from(v)
        };
        for seq in 1..=5 {
            reducer.reduce(
                vec![cached(Record::Write {
                    seq,
                    offset: 0,
                    data: random(),
                })],
                &known,
                &stats,
            );
        }
        assert_eq!(stats.batches_compressed.load(Ordering::Relaxed), 0);
        let skipped = stats.compression_skipped.load(Ordering::Relaxed);
        (5 - skipped, skipped)
    }
}
