//! Streams' durable records in memory, as a [`RecordSource`] and a [`ForwardSource`]:
//! what tests drive interval plans and forwarders with, without a cache on disk.
//!
//! It behaves like [`crate::cache::RelayCache`] where forwarders can tell: records are
//! durable once appended, consecutive per stream, and freed when acknowledged; the
//! master target may lead (it is the authority on what arrived).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use fbr_cache::CacheError;
use fbr_protocol::stream::SourcePosition;
use fbr_protocol::{Record, StreamId};
use tokio::sync::watch;

use crate::cache::CachedRecord;
use crate::forwarder::ForwardSource;
use crate::reduce::RecordSource;

/// One stream's records and positions.
#[derive(Debug)]
struct MemStream {
    records: Vec<CachedRecord>,
    durable: watch::Sender<u64>,
    acked: u64,
    /// Records whose reads fail their checksum.
    corrupt: Vec<u64>,
}

/// Durable records of any number of streams, in memory.
#[derive(Debug, Default)]
pub struct MemSource {
    streams: Mutex<BTreeMap<StreamId, MemStream>>,
}

impl MemSource {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<StreamId, MemStream>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, stream: &StreamId, f: impl FnOnce(&mut MemStream) -> T) -> T {
        let mut streams = self.lock();
        let s = streams.entry(stream.clone()).or_insert_with(|| MemStream {
            records: Vec::new(),
            durable: watch::channel(0).0,
            acked: 0,
            corrupt: Vec::new(),
        });
        f(s)
    }

    /// Appends `record` (the stream's next sequence number), durable at once, stamped
    /// as appended at `appended_ms`.
    pub fn append(&self, stream: &StreamId, record: Record, appended_ms: u64) {
        self.with(stream, |s| {
            let seq = record.seq();
            assert_eq!(seq, *s.durable.borrow() + 1, "records are consecutive");
            s.records.push(CachedRecord {
                record,
                appended_ms,
            });
            s.durable.send_replace(seq);
        });
    }

    /// Removes record `seq` as if it had been trimmed (tests of plans whose records
    /// disappear).
    pub fn forget(&self, stream: &StreamId, seq: u64) {
        self.with(stream, |s| s.records.retain(|r| r.record.seq() != seq));
    }

    /// Reads of record `seq` fail as a corrupt cache entry would.
    pub fn corrupt(&self, stream: &StreamId, seq: u64) {
        self.with(stream, |s| s.corrupt.push(seq));
    }

    /// The highest sequence number the master target acknowledged.
    pub fn acked(&self, stream: &StreamId) -> u64 {
        self.with(stream, |s| s.acked)
    }
}

impl RecordSource for MemSource {
    fn read_batch(
        &self,
        stream: &StreamId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<CachedRecord>, CacheError> {
        self.with(stream, |s| {
            let mut out = Vec::new();
            let mut bytes = 0;
            let newer = s.records.iter().filter(|r| r.record.seq() >= from);
            // Consecutive from `from` on, as the cache serves them.
            for (expected, r) in (from..).zip(newer) {
                if bytes >= max_bytes || r.record.seq() != expected {
                    break;
                }
                if s.corrupt.contains(&expected) {
                    // As the cache does: the good records first, the damage next time.
                    if out.is_empty() {
                        return Err(corrupt(stream, expected));
                    }
                    break;
                }
                bytes += r.record.encoded_len();
                out.push(r.clone());
            }
            Ok(out)
        })
    }

    fn read_seqs(&self, stream: &StreamId, seqs: &[u64]) -> Result<Vec<CachedRecord>, CacheError> {
        self.with(stream, |s| {
            if let Some(bad) = seqs.iter().find(|q| s.corrupt.contains(q)) {
                return Err(corrupt(stream, *bad));
            }
            Ok(seqs
                .iter()
                .map_while(|seq| s.records.iter().find(|r| r.record.seq() == *seq).cloned())
                .collect())
        })
    }
}

impl ForwardSource for MemSource {
    fn position(&self, stream: &StreamId) -> SourcePosition {
        self.with(stream, |s| SourcePosition {
            resend_from: s.records.first().map_or(0, |r| r.record.seq()),
            produced: *s.durable.borrow(),
            receiver_may_lead: true,
        })
    }

    fn needs_resync(&self, _: &StreamId) -> Option<String> {
        None
    }

    fn durable(&self, stream: &StreamId) -> watch::Receiver<u64> {
        self.with(stream, |s| s.durable.subscribe())
    }

    fn next_tag(&self, stream: &StreamId, from: u64) -> Option<u64> {
        self.with(stream, |s| {
            s.records
                .iter()
                .map(|r| &r.record)
                .find(|r| r.seq() >= from && matches!(r, Record::Tag { .. }))
                .map(Record::seq)
        })
    }

    fn ack(&self, stream: &StreamId, seq: u64) -> Result<(), CacheError> {
        self.with(stream, |s| {
            s.acked = s.acked.max(seq);
            s.records.retain(|r| r.record.seq() > seq);
        });
        Ok(())
    }

    fn reset_stream(&self, stream: &StreamId, next_seq: u64) -> Result<(), CacheError> {
        self.with(stream, |s| {
            s.records.clear();
            s.corrupt.clear();
            s.durable.send_replace(next_seq.max(1) - 1);
        });
        Ok(())
    }

    fn placement(&self, _: &StreamId) -> u64 {
        0
    }

    fn retire(&self, stream: &StreamId, _: u64) -> Result<bool, String> {
        self.with(stream, |s| {
            s.records.clear();
            s.corrupt.clear();
            s.durable.send_replace(0);
        });
        Ok(true)
    }
}

fn corrupt(stream: &StreamId, seq: u64) -> CacheError {
    CacheError::Corrupt {
        where_: format!("{stream} record {seq}"),
        reason: "CRC32C mismatch (injected)".into(),
    }
}
