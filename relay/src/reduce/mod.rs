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
//!    reproduced (they are no recovery point). A backlogged stream whose next recovery
//!    point is already durable gets an [`IntervalPlan`]: the whole interval is
//!    coalesced from its records' ranges before any data is read for sending.
//! 2. **Zero elision**: an all-zero write becomes a `Zero` item; all-zero 4 KiB blocks of
//!    other writes become one marker byte.
//! 3. **Dedup**: a block whose SHA-256 is in [`KnownBlocks`] (blocks the master target
//!    acknowledged holding) travels as that hash.
//! 4. **Compression** of the batch body: the session's zstd context (its history spans
//!    the session's batches, `fbr_protocol::codec`) unless the stream is CPU-bound
//!    ([`choose`]), LZ4 then; after a batch that compressed by less than 10%, the next
//!    [`SKIP_AFTER_POOR`] batches of the stream are not tried.
//!
//! ## Layout
//! - [`coalesce`]: pure coalescing of a window (which bytes survive), property-tested.
//! - [`plan`]: interval plans, reading records through [`RecordSource`] (the cache in
//!   production, memory in tests).
//! - [`encode`]: the [`Reducer`]: zero elision, dedup and LZ4 into [`ReducedBatch`]es.
//! - [`choose`]: [`CodecChooser`], zstd or LZ4 from where the stream's time goes.
//! - [`known`]: [`KnownBlocks`], the hashes the master target holds.
//! - [`stages`]: [`StageBytes`], the one place each stage's bytes are counted (per
//!   stream, exported as metrics).

pub mod choose;
pub mod coalesce;
pub mod encode;
pub mod known;
pub mod plan;
pub mod stages;

use fbr_cache::CacheError;
use fbr_protocol::StreamId;

use crate::cache::CachedRecord;

pub use choose::CodecChooser;
pub use coalesce::coalesce;
pub use encode::{ReducedBatch, Reducer, BATCH_RECORD_BYTES, SKIP_AFTER_POOR};
pub use known::KnownBlocks;
pub use plan::{IntervalPlan, MAX_PLAN_RECORDS};
pub use stages::StageBytes;

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
    /// Level of the sessions' zstd contexts, 1..=9; 0: no zstd (LZ4 only).
    pub zstd_level: i32,
    /// Memory all sessions' zstd contexts may take together (bytes).
    pub codec_memory: u64,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            coalesce: true,
            dedup: true,
            compression: Compression::Adaptive,
            zstd_level: fbr_protocol::codec::DEFAULT_ZSTD_LEVEL,
            codec_memory: fbr_protocol::codec::DEFAULT_CODEC_MEMORY,
        }
    }
}

/// Where reductions read durable records from: the relay's cache implements it (payloads
/// checked by CRC32C on every read); tests use memory.
pub trait RecordSource: Send + Sync + 'static {
    /// Durable records of `stream` from `from` on, consecutive, up to about `max_bytes`
    /// (at least one if any is cached). Corruption is an error, never returned data.
    fn read_batch(
        &self,
        stream: &StreamId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<CachedRecord>, CacheError>;

    /// The durable records `seqs` (increasing) of `stream`, checked like
    /// [`Self::read_batch`]; stops at the first one no longer cached.
    fn read_seqs(&self, stream: &StreamId, seqs: &[u64]) -> Result<Vec<CachedRecord>, CacheError>;
}
