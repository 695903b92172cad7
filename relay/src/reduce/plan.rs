//! Interval plans: coalescing a backlogged stream's whole interval up to its next
//! recovery point, in bounded memory.
//!
//! The plan is made from the records' ranges alone: the interval's records are read
//! once (checksums verified) and only `(seq, range)` is kept, then
//! [`super::coalesce`]'s survivor computation decides what is sent. Sending reads the
//! survivors again, a batch at a time, and checks they are still what was planned. The
//! records come through [`RecordSource`], so plans are tested without a cache on disk.

use std::collections::VecDeque;

use fbr_cache::CacheError;
use fbr_protocol::{Record, StreamId};

use super::coalesce::{apply_keep, range, survivors, Keep};
use super::encode::BATCH_RECORD_BYTES;
use super::{RecordSource, StageBytes};

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

/// The next part of a plan to encode: the span it covers, the surviving records (cut
/// down, with their append times) and the bytes of them blanked.
#[derive(Debug)]
pub struct PlannedBatch {
    pub first_seq: u64,
    pub last_seq: u64,
    pub kept: Vec<(Record, u64)>,
    pub blanked: u64,
    /// Bytes of the survivors (what counts against the read budget).
    pub bytes: usize,
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
        source: &impl RecordSource,
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
            let chunk = source.read_batch(stream, next, 4 << 20)?;
            if chunk.is_empty() {
                break;
            }
            for r in chunk {
                let seq = r.record.seq();
                if seq > to || seqs.len() >= MAX_PLAN_RECORDS {
                    break;
                }
                stats.add_input(&r.record);
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

    /// Reads the next batch's worth of survivors (at most [`BATCH_RECORD_BYTES`], at
    /// least one) and cuts them down; `None` when the plan is done. A record that is no
    /// longer cached, or no longer fits what was planned, is reported as corruption.
    pub fn next_batch(
        &mut self,
        source: &impl RecordSource,
        stream: &StreamId,
    ) -> Result<Option<PlannedBatch>, CacheError> {
        if self.survivors.is_empty() {
            return Ok(None);
        }
        let mut group = Vec::new();
        let mut bytes = 0usize;
        while let Some(s) = self.survivors.front() {
            if !group.is_empty() && bytes + s.bytes() > BATCH_RECORD_BYTES {
                break;
            }
            bytes += s.bytes();
            group.extend(self.survivors.pop_front());
        }
        let seqs: Vec<u64> = group.iter().map(|s| s.seq).collect();
        let records = source.read_seqs(stream, &seqs)?;
        if records.len() != group.len() {
            return Err(CacheError::Corrupt {
                where_: format!("{stream} records {seqs:?}"),
                reason: "planned records are no longer cached".into(),
            });
        }
        let mut kept = Vec::with_capacity(group.len());
        let mut blanked = 0;
        let mut last = self.next_first;
        for (s, r) in group.into_iter().zip(records) {
            let fits = match &s.keep {
                Some(k) => range(&r.record).is_some_and(|(a, b)| a <= k.hull.0 && k.hull.1 <= b),
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
        let batch = PlannedBatch {
            first_seq: self.next_first,
            last_seq: last,
            kept,
            blanked,
            bytes,
        };
        self.next_first = last + 1;
        Ok(Some(batch))
    }
}
