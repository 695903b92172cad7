//! Making every byte on the WAN count: how a forwarder turns a run of cached records into
//! `Batch` frames (`fbr_protocol::wan`), and what each reduction saved.
//!
//! In order:
//! 1. **Coalescing** ([`coalesce`], when on): within a window of records that contains
//!    no recovery point except possibly as its last record, a write (or zero range)
//!    whose bytes are all rewritten later in the window is dropped, and one partly
//!    rewritten is cut down to the smallest range holding its surviving bytes. Each
//!    byte's last writer in the window survives, records stay in order, so the state
//!    after the window's last record is exact; the states in between are not
//!    reproduced (they are no recovery point). A window is what a forwarder reads at
//!    once, so coalescing only happens when the stream has a backlog.
//! 2. **Zero elision**: an all-zero write becomes a `Zero` item; all-zero 4 KiB blocks of
//!    other writes become one marker byte.
//! 3. **Dedup**: a block whose SHA-256 is in [`KnownBlocks`] (blocks the master target
//!    acknowledged holding) travels as that hash.
//! 4. **LZ4** of the batch body, skipped adaptively: after a batch that compressed by
//!    less than 10%, the next [`SKIP_AFTER_POOR`] batches of the stream are not tried.
//!
//! Accounting per stage is kept per stream ([`StageBytes`]) and exported as metrics.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bytes::BytesMut;
use dashmap::DashMap;
use fbr_protocol::wan::{self, block_hash, is_zero, Block, Item, BLOCK_SIZE};
use fbr_protocol::Record;

use fbr_cache::CacheError;
use fbr_protocol::StreamId;

use crate::cache::{CachedRecord, RelayCache};

/// Batches not tried for compression after one that compressed poorly.
pub const SKIP_AFTER_POOR: u32 = 32;
/// Most record bytes per batch: keeps the body under `wan::MAX_BATCH_BODY`.
pub const BATCH_RECORD_BYTES: usize = 3 << 20;

/// When to compress batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Off,
    /// Try, but skip for a while after a batch that did not shrink by 10%.
    Adaptive,
    Always,
}

/// The WAN reductions in force (config `[wan]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanConfig {
    pub coalesce: bool,
    pub dedup: bool,
    pub compression: Compression,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            coalesce: true,
            dedup: true,
            compression: Compression::Adaptive,
        }
    }
}

/// Blocks the master target is known to hold: hashes of blocks it acknowledged.
/// Bounded (oldest forgotten first); cleared whenever the master target says it lost a
/// block, so a stale entry costs one resend, never a wrong byte.
#[derive(Debug)]
pub struct KnownBlocks {
    set: DashMap<[u8; 32], ()>,
    order: Mutex<VecDeque<[u8; 32]>>,
    capacity: usize,
}

impl KnownBlocks {
    pub fn new(capacity: usize) -> Self {
        KnownBlocks {
            set: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    pub fn contains(&self, h: &[u8; 32]) -> bool {
        self.set.contains_key(h)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The master target acknowledged records holding these blocks.
    pub fn insert_all(&self, hashes: &[[u8; 32]]) {
        if self.capacity == 0 || hashes.is_empty() {
            return;
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        for h in hashes {
            if self.set.insert(*h, ()).is_none() {
                order.push_back(*h);
            }
        }
        while self.set.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    self.set.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Forgets everything (the master target lost blocks, e.g. it restarted).
    pub fn clear(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.set.clear();
        order.clear();
    }
}

/// Bytes after each reduction stage (monotonic counters, per stream).
#[derive(Debug, Default)]
pub struct StageBytes {
    /// Disk bytes the records write or zero.
    pub logical: AtomicU64,
    /// ... once superseded records are left out.
    pub coalesced: AtomicU64,
    /// ... of those, bytes still carried as data (zero ranges and blocks removed).
    pub zero_elided: AtomicU64,
    /// ... of those, bytes still sent as literal blocks (references removed).
    pub deduplicated: AtomicU64,
    /// Batch payload bytes after LZ4 (what the WAN carries, before QUIC/TLS).
    pub compressed: AtomicU64,
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub batches: AtomicU64,
    pub batches_compressed: AtomicU64,
    pub compression_skipped: AtomicU64,
    pub compress_ns: AtomicU64,
}

impl StageBytes {
    /// `(stage name, value)` for every byte stage, in order.
    pub fn stages(&self) -> [(&'static str, u64); 5] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("logical", l(&self.logical)),
            ("coalesced", l(&self.coalesced)),
            ("zero_elided", l(&self.zero_elided)),
            ("deduplicated", l(&self.deduplicated)),
            ("compressed", l(&self.compressed)),
        ]
    }
}

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

/// Per-stream reducer state.
#[derive(Debug)]
pub struct Reducer {
    config: WanConfig,
    skip_compression: u32,
    body: Vec<u8>,
}

impl Reducer {
    pub fn new(config: WanConfig) -> Self {
        Reducer {
            config,
            skip_compression: 0,
            body: Vec::new(),
        }
    }

    /// Turns `records` (consecutive sequence numbers, as read from the cache) into
    /// batches, adding to `stats`.
    pub fn reduce(
        &mut self,
        records: Vec<CachedRecord>,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> Vec<ReducedBatch> {
        let mut out = Vec::new();
        let mut window: Vec<CachedRecord> = Vec::new();
        let mut window_bytes = 0usize;
        for r in records {
            let is_tag = matches!(r.record, Record::Tag { .. });
            window_bytes += r.record.encoded_len();
            window.push(r);
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
        window: Vec<CachedRecord>,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> ReducedBatch {
        let first_seq = window[0].record.seq();
        let last_seq = window[window.len() - 1].record.seq();
        let records: Vec<(Record, u64)> = window
            .into_iter()
            .map(|r| (r.record, r.appended_ms))
            .collect();
        add(
            &stats.logical,
            records.iter().map(|(r, _)| r.logical_bytes()).sum(),
        );
        add(&stats.records_in, records.len() as u64);
        let (kept, blanked) = if self.config.coalesce {
            coalesce_with(records)
        } else {
            (records, 0)
        };
        self.encode(first_seq, last_seq, kept, blanked, known, stats)
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
        add(&stats.coalesced, kept_bytes - blanked);
        add(&stats.records_out, kept.len() as u64);
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
        add(&stats.zero_elided, data_bytes);
        add(&stats.deduplicated, literal_bytes);
        add(&stats.dedup_hits, hits);

        let compress = match self.config.compression {
            Compression::Off => false,
            Compression::Always => true,
            Compression::Adaptive => {
                if self.skip_compression > 0 {
                    self.skip_compression -= 1;
                    add(&stats.compression_skipped, 1);
                    false
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
        let mut payload = BytesMut::new();
        let started = Instant::now();
        let enc = wan::encode_batch(&batch, compress, &mut self.body, &mut payload);
        if compress {
            add(&stats.compress_ns, started.elapsed().as_nanos() as u64);
            let poor = enc.payload_len * 10 > enc.body_len * 9;
            if poor && self.config.compression == Compression::Adaptive {
                self.skip_compression = SKIP_AFTER_POOR;
            }
        }
        add(&stats.batches, 1);
        add(&stats.batches_compressed, enc.compressed as u64);
        add(&stats.compressed, enc.payload_len as u64);
        ReducedBatch {
            payload: payload.freeze(),
            first_seq,
            last_seq,
            literal_hashes,
            records: meta,
        }
    }

    /// Sends the next part of an interval plan: reads the surviving records (about
    /// `budget` bytes of them), cuts them down, and encodes them. The plan is done when
    /// [`IntervalPlan::is_done`].
    pub fn next_from_plan(
        &mut self,
        plan: &mut IntervalPlan,
        cache: &RelayCache,
        stream: &StreamId,
        budget: usize,
        known: &KnownBlocks,
        stats: &StageBytes,
    ) -> Result<Vec<ReducedBatch>, CacheError> {
        let mut out = Vec::new();
        let mut produced = 0usize;
        while produced < budget && !plan.survivors.is_empty() {
            let mut group = Vec::new();
            let mut bytes = 0usize;
            while let Some(s) = plan.survivors.front() {
                if !group.is_empty() && bytes + s.bytes() > BATCH_RECORD_BYTES {
                    break;
                }
                bytes += s.bytes();
                group.extend(plan.survivors.pop_front());
            }
            let seqs: Vec<u64> = group.iter().map(|s| s.seq).collect();
            let records = cache.read_seqs(stream, &seqs)?;
            if records.len() != group.len() {
                return Err(CacheError::Corrupt {
                    where_: format!("{stream} records {seqs:?}"),
                    reason: "planned records are no longer cached".into(),
                });
            }
            let mut kept = Vec::with_capacity(group.len());
            let mut blanked = 0;
            let mut last = plan.next_first;
            for (s, r) in group.into_iter().zip(records) {
                let fits = match &s.keep {
                    Some(k) => {
                        range(&r.record).is_some_and(|(a, b)| a <= k.hull.0 && k.hull.1 <= b)
                    }
                    None => range(&r.record).is_none(),
                };
                if !fits {
                    return Err(CacheError::Corrupt {
                        where_: format!("{stream} record {}", s.seq),
                        reason: "record changed since it was planned".into(),
                    });
                }
                let (record, b) = apply_keep(r.record, &s.keep);
                blanked += b;
                last = s.seq;
                kept.push((record, r.appended_ms));
            }
            let batch = self.encode(plan.next_first, last, kept, blanked, known, stats);
            plan.next_first = last + 1;
            produced += bytes;
            out.push(batch);
        }
        Ok(out)
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Most records one interval plan covers (its memory is ~24 bytes per survivor); a
/// longer interval is planned in parts, each exact at its end.
pub const MAX_PLAN_RECORDS: usize = 65_536;

/// A record that survives coalescing: send `seq`, cut down to `keep` (`None`: whole).
#[derive(Debug, Clone)]
struct Survivor {
    seq: u64,
    keep: Option<Keep>,
}

impl Survivor {
    fn bytes(&self) -> usize {
        self.keep
            .as_ref()
            .map_or(64, |k| (k.hull.1 - k.hull.0) as usize)
    }
}

/// The coalescing decision for a whole interval of a backlogged stream, made from the
/// records' ranges before any data is read for sending: only each interval's final
/// content crosses the WAN, whatever the interval's size, in bounded memory.
#[derive(Debug)]
pub struct IntervalPlan {
    survivors: VecDeque<Survivor>,
    /// First sequence number of the next batch's span.
    next_first: u64,
}

impl IntervalPlan {
    pub fn is_done(&self) -> bool {
        self.survivors.is_empty()
    }

    /// Plans `from..=to` of `stream` (at most [`MAX_PLAN_RECORDS`] records): reads the
    /// records once (checksums verified) for their ranges, and decides what survives.
    pub fn new(
        cache: &RelayCache,
        stream: &StreamId,
        from: u64,
        to: u64,
        stats: &StageBytes,
    ) -> Result<Self, CacheError> {
        let mut seqs = Vec::new();
        let mut ranges = Vec::new();
        let mut next = from;
        // The interval ends at the first recovery point actually found in the records:
        // `to` is only a hint (the cache's list of tags misses those appended before a
        // restart), and coalescing across a tag would lose that recovery point.
        let mut at_tag = false;
        while next <= to && !at_tag && seqs.len() < MAX_PLAN_RECORDS {
            let chunk = cache.read_batch(stream, next, 4 << 20)?;
            if chunk.is_empty() {
                break;
            }
            for r in chunk {
                let seq = r.record.seq();
                if seq > to || seqs.len() >= MAX_PLAN_RECORDS {
                    break;
                }
                add(&stats.logical, r.record.logical_bytes());
                add(&stats.records_in, 1);
                seqs.push(seq);
                ranges.push(range(&r.record));
                next = seq + 1;
                if matches!(r.record, Record::Tag { .. }) {
                    at_tag = true;
                    break;
                }
            }
        }
        let survivors = survivors(&ranges)
            .into_iter()
            .zip(seqs)
            .filter_map(|(keep, seq)| keep.map(|keep| Survivor { seq, keep }))
            .collect();
        Ok(IntervalPlan {
            survivors,
            next_first: from,
        })
    }
}

/// The disk range a record writes or zeroes (`None` for tags).
fn range(r: &Record) -> Option<(u64, u64)> {
    match r {
        Record::Write { offset, data, .. } => Some((*offset, offset + data.len() as u64)),
        Record::Zero { offset, len, .. } => Some((*offset, offset + len)),
        Record::Tag { .. } => None,
    }
}

/// Leaves out what later records of the window rewrite (see the module documentation).
/// `records` must not contain a tag except as the last record.
pub fn coalesce(records: Vec<Record>) -> Vec<Record> {
    let tagged = records.into_iter().map(|r| (r, ())).collect();
    coalesce_with(tagged)
        .0
        .into_iter()
        .map(|(r, ())| r)
        .collect()
}

/// [`coalesce`] for records carrying a value along (e.g. their append time); also
/// returns how many bytes of the kept writes were blanked.
fn coalesce_with<T>(records: Vec<(Record, T)>) -> (Vec<(Record, T)>, u64) {
    let plan = survivors(&records.iter().map(|(r, _)| range(r)).collect::<Vec<_>>());
    let mut blanked = 0;
    let kept = records
        .into_iter()
        .zip(plan)
        .filter_map(|((r, t), keep)| {
            keep.map(|k| {
                let (r, b) = apply_keep(r, &k);
                blanked += b;
                (r, t)
            })
        })
        .collect();
    (kept, blanked)
}

/// What survives of a record: the range to keep, and the parts of it that later
/// records of the window rewrite (their 4 KiB blocks need not travel).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Keep {
    hull: (u64, u64),
    rewritten: Vec<(u64, u64)>,
}

/// For each record's range (`None`: a tag, always kept whole), whether it survives:
/// `None` dropped, `Some(None)` kept whole, `Some(Some(keep))` cut down to `keep`.
fn survivors(ranges: &[Option<(u64, u64)>]) -> Vec<Option<Option<Keep>>> {
    // Ranges written by later records, merged: start -> end.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = vec![None; ranges.len()];
    for (i, r) in ranges.iter().enumerate().rev() {
        let Some((start, end)) = *r else {
            out[i] = Some(None);
            continue;
        };
        if let Some((lo, hi)) = surviving_hull(&covered, start, end) {
            let mut rewritten: Vec<(u64, u64)> = covered
                .range(..hi)
                .rev()
                .take_while(|(_, &e)| e > lo)
                .map(|(&s, &e)| (s.max(lo), e.min(hi)))
                .collect();
            rewritten.reverse();
            out[i] = Some(Some(Keep {
                hull: (lo, hi),
                rewritten,
            }));
        }
        insert_range(&mut covered, start, end);
    }
    out
}

/// `r` cut down to what survives; returns it with the bytes blanked (4 KiB blocks of a
/// write that later records rewrite: sent as zero markers, their value is never seen at
/// a recovery point).
fn apply_keep(r: Record, keep: &Option<Keep>) -> (Record, u64) {
    let Some(keep) = keep else {
        return (r, 0);
    };
    match shrink(r, keep.hull.0, keep.hull.1) {
        Record::Write { seq, offset, data } if !keep.rewritten.is_empty() => {
            let mut blanked = 0u64;
            let mut out: Option<BytesMut> = None;
            for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
                let a = offset + (i * BLOCK_SIZE) as u64;
                let b = a + chunk.len() as u64;
                if keep.rewritten.iter().any(|&(s, e)| s <= a && b <= e) {
                    let buf = out.get_or_insert_with(|| BytesMut::from(&data[..]));
                    buf[i * BLOCK_SIZE..i * BLOCK_SIZE + chunk.len()].fill(0);
                    blanked += chunk.len() as u64;
                }
            }
            let data = out.map_or(data, BytesMut::freeze);
            (Record::Write { seq, offset, data }, blanked)
        }
        other => (other, 0),
    }
}

/// The smallest range holding every byte of `[start, end)` not in `covered`.
///
/// `covered` holds disjoint, non-touching ranges (see [`insert_range`]), so the byte
/// right after a covered range, and the byte right before one, are not covered.
fn surviving_hull(covered: &BTreeMap<u64, u64>, start: u64, end: u64) -> Option<(u64, u64)> {
    let lo = match covered.range(..=start).next_back() {
        Some((_, &e)) if e > start => e,
        _ => start,
    };
    if lo >= end {
        return None;
    }
    let hi = match covered.range(..end).next_back() {
        Some((&s, &e)) if e >= end => s,
        _ => end,
    };
    Some((lo, hi))
}

/// Adds `[start, end)` to the merged set.
fn insert_range(covered: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    let overlapping: Vec<(u64, u64)> = covered
        .range(..=end)
        .rev()
        .take_while(|(_, &e)| e >= start)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, e) in overlapping {
        covered.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    covered.insert(start, end);
}

/// `r` cut down to `[lo, hi)` (a sub-range of its own).
fn shrink(r: Record, lo: u64, hi: u64) -> Record {
    match r {
        Record::Write { seq, offset, data } => Record::Write {
            seq,
            offset: lo,
            data: data.slice((lo - offset) as usize..(hi - offset) as usize),
        },
        Record::Zero { seq, .. } => Record::Zero {
            seq,
            offset: lo,
            len: hi - lo,
        },
        tag => tag,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn apply(img: &mut [u8], r: &Record) {
        match r {
            Record::Write { offset, data, .. } => {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Record::Zero { offset, len, .. } => {
                img[*offset as usize..(*offset + *len) as usize].fill(0)
            }
            Record::Tag { .. } => {}
        }
    }

    fn record() -> impl Strategy<Value = (bool, u64, u64, u8)> {
        (any::<bool>(), 0u64..64, 1u64..32, 1u8..)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Coalescing never changes the state at the end of the window, keeps order,
        /// never grows a record, and never keeps more records than it was given.
        #[test]
        fn coalescing_keeps_the_final_state_exact(specs in prop::collection::vec(record(), 1..40)) {
            let records: Vec<Record> = specs.iter().enumerate().map(|(i, (zero, off, len, fill))| {
                let (offset, len) = (off * 512, len * 512);
                if *zero {
                    Record::Zero { seq: i as u64 + 1, offset, len }
                } else {
                    Record::Write { seq: i as u64 + 1, offset, data: Bytes::from(vec![*fill; len as usize]) }
                }
            }).collect();
            let mut want = vec![0xEEu8; 96 * 512];
            let mut got = want.clone();
            for r in &records { apply(&mut want, r); }
            let kept = coalesce(records.clone());
            for r in &kept { apply(&mut got, r); }
            prop_assert_eq!(got, want);
            prop_assert!(kept.len() <= records.len());
            prop_assert!(kept.windows(2).all(|w| w[0].seq() < w[1].seq()));
            prop_assert_eq!(kept.last().map(Record::seq), records.last().map(Record::seq));
            for k in &kept {
                let orig = &records[k.seq() as usize - 1];
                let (ks, ke) = range(k).unwrap();
                let (os, oe) = range(orig).unwrap();
                prop_assert!(os <= ks && ke <= oe && ks < ke);
            }
        }
    }

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
    fn incompressible_batches_pause_compression() {
        let known = KnownBlocks::new(0);
        let stats = StageBytes::default();
        let mut reducer = Reducer::new(WanConfig {
            dedup: false,
            ..WanConfig::default()
        });
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
        assert_eq!(
            stats.compression_skipped.load(Ordering::Relaxed),
            4,
            "one try, then skips"
        );
    }
}
