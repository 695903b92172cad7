//! Coalescing: which bytes of a window of records survive to the window's end.
//!
//! Pure functions over records (no I/O): [`coalesce`] for a window in memory, and the
//! survivor computation the interval plans ([`super::plan`]) use on records' ranges
//! alone. Each byte's last writer survives; a record whose bytes are all rewritten later
//! is dropped, one partly rewritten is cut to the hull of its surviving bytes, and its
//! 4 KiB blocks that later records rewrite are blanked (sent as zero markers: their value
//! is never seen at a recovery point). Records keep their order, so the state after the
//! window's last record is exact.

use std::collections::BTreeMap;

use bytes::BytesMut;
use fbr_protocol::wan::BLOCK_SIZE;
use fbr_protocol::Record;

/// The disk range a record writes or zeroes (`None` for markers: tags, resync marks).
pub(super) fn range(r: &Record) -> Option<(u64, u64)> {
    match r {
        Record::Write { offset, data, .. } => Some((*offset, offset + data.len() as u64)),
        Record::Zero { offset, len, .. } => Some((*offset, offset + len)),
        Record::Tag { .. } | Record::Resync { .. } => None,
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
pub(super) fn coalesce_with<T>(records: Vec<(Record, T)>) -> (Vec<(Record, T)>, u64) {
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
pub(super) struct Keep {
    pub(super) hull: (u64, u64),
    pub(super) rewritten: Vec<(u64, u64)>,
}

/// For each record's range (`None`: a tag, always kept whole), whether it survives:
/// `None` dropped, `Some(None)` kept whole, `Some(Some(keep))` cut down to `keep`.
pub(super) fn survivors(ranges: &[Option<(u64, u64)>]) -> Vec<Option<Option<Keep>>> {
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
pub(super) fn apply_keep(r: Record, keep: &Option<Keep>) -> (Record, u64) {
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
            Record::Tag { .. } | Record::Resync { .. } => {}
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
}
