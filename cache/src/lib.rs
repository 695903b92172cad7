//! # fbr-cache: the relay's durable cache
//!
//! An append-only log of bounded-size segment files on the relay's cache disk, shared by
//! every stream. The relay acknowledges a record to its source once it is durable here,
//! forwards it from here to the master target, and frees the space once the master
//! target has acknowledged it, so a slow or broken WAN link does not stop replication.
//!
//! ## Layout
//! - [`format`]: the on-disk format (segment header, entries, footer), sans-IO.
//! - [`storage`]: the [`Storage`] trait; files for real, memory with crash simulation
//!   and fault injection for tests.
//! - [`log`]: [`SegmentLog`]: append, group commit, read-back, ack, trim, recovery.
//!
//! ## Design constraints
//! - An entry never spans segments; the writer creates segments and trimming deletes
//!   whole segments, never parts of them.
//! - Every entry carries a CRC32C (Castagnoli); a read that fails it is reported as
//!   corruption and the bytes are never returned.
//! - Recovery reads sealed segments' footers, not their payloads; only the last,
//!   unsealed segment is scanned, and a torn tail there is truncated with a warning.
//! - Memory: payloads stay on disk; the index costs 16 bytes per cached record.
#![forbid(unsafe_code)]

pub mod format;
pub mod log;
pub mod storage;

pub use log::{
    now_ms, read_entry, CacheConfig, CacheError, PendingCommit, RecoveryReport, SegmentLog,
    StreamStats,
};
pub use storage::{FileStorage, MemStorage, SegmentFile, Storage};
