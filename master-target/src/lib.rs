//! # fbr-master-target: the on-premises receiver
//!
//! Receives each disk's records from the relay and applies them, in sequence order and
//! exactly once, to a sparse raw image per disk, keeping a retention journal from which
//! any recovery point can be materialised.
//!
//! ## Layout
//! - [`journal`]: the per-disk write-ahead/retention journal (format, reader, replay).
//! - [`store`]: the `redb` index of checkpoints and recovery points.
//! - [`replica`]: one disk's image + journal + high-water mark; durability and recovery.
//! - [`server`]: QUIC sessions from relays, the reader/applier pipeline per disk.
//!
//! ## Data directory
//! ```text
//! <data>/index.redb                         checkpoints and tags (exclusively locked)
//! <data>/disks/<vm>/disk<N>/image.raw       the replica, sparse, latest state
//! <data>/disks/<vm>/disk<N>/journal.fbrj    every record applied, in order
//! ```
//!
//! ## Invariants
//! - A record is acknowledged only after its journal entry is `fdatasync`ed (and, for a
//!   tag, after the index commit that records it).
//! - Records are applied in sequence order; the high-water mark (last durable sequence)
//!   makes replays after reconnects or crashes no-ops.
//! - Nothing of an invalid record is applied; the records before it are.
#![forbid(unsafe_code)]

pub mod content;
pub mod journal;
pub mod replica;
pub mod server;
pub mod settings;
pub mod store;

pub use replica::DiskReplica;
pub use server::MasterTarget;
pub use store::{RecoveryPoint, Store};
