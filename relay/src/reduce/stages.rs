//! What each WAN reduction saved, per stream: the one place each stage's bytes are
//! counted. Monotonic counters (atomics, so the metrics endpoint reads them while the
//! forwarder adds), exported per VM and in total by `crate::observe`.

use std::sync::atomic::{AtomicU64, Ordering};

use fbr_protocol::wan::BodyCoding;
use fbr_protocol::Record;

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
    /// Batches whose body travelled compressed (either codec).
    pub batches_compressed: AtomicU64,
    /// Of those, batches that continued the session's zstd context.
    pub batches_zstd: AtomicU64,
    /// Body bytes (before compression) of the zstd and of the LZ4 batches.
    pub zstd_body: AtomicU64,
    pub lz4_body: AtomicU64,
    pub compression_skipped: AtomicU64,
    pub compress_ns: AtomicU64,
}

impl StageBytes {
    /// A record read for forwarding (before any reduction).
    pub fn add_input(&self, record: &Record) {
        add(&self.logical, record.logical_bytes());
        add(&self.records_in, 1);
    }

    /// What coalescing kept of a span: `records`, changing `bytes` of disk.
    pub fn add_kept(&self, records: u64, bytes: u64) {
        add(&self.coalesced, bytes);
        add(&self.records_out, records);
    }

    /// Data blocks encoded: `data` bytes carried after zero elision, `literal` of them
    /// sent as bytes, `refs` blocks sent as references.
    pub fn add_blocks(&self, data: u64, literal: u64, refs: u64) {
        add(&self.zero_elided, data);
        add(&self.deduplicated, literal);
        add(&self.dedup_hits, refs);
    }

    /// One batch of `payload` bytes: whether compression was skipped (adaptive), tried
    /// (and how long it took), and which codec the body travelled with.
    /// `body` is the batch body's size before compression.
    pub fn add_batch(&self, payload: u64, body: u64, compression: BatchCompression) {
        add(&self.batches, 1);
        add(&self.compressed, payload);
        match compression {
            BatchCompression::Skipped => add(&self.compression_skipped, 1),
            BatchCompression::Tried { coding, nanos } => {
                add(&self.compress_ns, nanos);
                add(
                    &self.batches_compressed,
                    (coding != BodyCoding::None) as u64,
                );
                add(&self.batches_zstd, (coding == BodyCoding::Zstd) as u64);
                match coding {
                    BodyCoding::Zstd => add(&self.zstd_body, body),
                    BodyCoding::Lz4 => add(&self.lz4_body, body),
                    BodyCoding::None => {}
                }
            }
            BatchCompression::Off => {}
        }
    }

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

/// What happened to one batch's compression, for [`StageBytes::add_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchCompression {
    /// Compression is off for this batch by configuration.
    Off,
    /// Not tried: a recent batch compressed poorly (adaptive).
    Skipped,
    /// Tried for `nanos`; `coding` is what the body travelled with (`None` when LZ4
    /// did not make it smaller).
    Tried { coding: BodyCoding, nanos: u64 },
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}
