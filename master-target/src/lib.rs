//! # fbr-master-target: the on-premises receiver
//!
//! Receives each disk's records from the relay and applies them, in sequence order and
//! exactly once, to a sparse raw image per disk, keeping a retention journal from which
//! any recovery point can be materialised.
//!
//! ## Layout
//! - [`journal`]: the per-disk write-ahead/retention journal (format, reader, replay).
//! - [`store`]: the `redb` index of checkpoints and recovery points, behind
//!   [`store::ReplicaIndex`] (with an in-memory twin for the model test).
//! - [`files`]: where a replica's files live, behind [`files::ReplicaFiles`] (the data
//!   directory, or memory with crashes and injected faults for the model test).
//! - [`replica`]: one disk's image + journal + high-water mark; durability and recovery.
//! - [`seed`]: adopting an existing disk image as a stale replica (original location).
//! - [`sync`]: whether a replica offers recovery points (consistent, stale, resyncing).
//! - [`accept`]: QUIC connections from relays, one session per disk stream (a thin
//!   driver of `fbr_protocol::stream::StreamReceiver`), one owner per disk.
//! - [`unpack`]: frames through the receiver machine into checked records; WAN batches'
//!   references resolved against the [`content`] index.
//! - [`apply`]: group commit of queued records into the replica, then `Ack`.
//! - [`hashes`]: hash streams: the replica described as keyed node hashes, for a
//!   resync's comparison.
//! - [`content`]: which blocks the master target holds, for the relay's dedup.
//! - [`points`]: the recovery points an operator can fail back to, per group and VM,
//!   and the window they span (`master-target points`).
//! - [`rollback`]: rolling a replica back in place to an earlier point from the
//!   journal's before-images, crash-safe (`master-target rollback`).
//! - [`retention`]: the bounded window (time and size per group) and trimming the
//!   oldest history.
//! - [`testcopy`]: test failovers: writable copies of a group's disks at a recovery
//!   point, made while replication goes on; [`control`] is the socket that asks for them.
//!
//! ## Data directory
//! ```text
//! <data>/index.redb                         checkpoints and tags (exclusively locked)
//! <data>/disks/<vm>/disk<N>/image.raw       the replica, sparse, latest state
//! <data>/disks/<vm>/disk<N>/journal.fbrj    every record applied, in order, each
//!                                           change after its before-image
//! <data>/test-failovers/<name>/             a test failover's copies and description
//! ```
//!
//! ## Invariants
//! - A record is acknowledged only after its journal entry is `fdatasync`ed (and, for a
//!   tag, after the index commit that records it).
//! - Records are applied in sequence order; the high-water mark (last durable sequence)
//!   makes replays after reconnects or crashes no-ops.
//! - Nothing of an invalid record is applied; the records before it are.
#![forbid(unsafe_code)]

pub mod accept;
pub mod apply;
pub mod content;
pub mod control;
pub mod files;
pub mod hashes;
pub mod journal;
pub mod points;
pub mod replica;
pub mod retention;
pub mod rollback;
pub mod seed;
pub mod settings;
pub mod store;
pub mod sync;
pub mod testcopy;
pub mod unpack;

pub use accept::MasterTarget;
pub use replica::DiskReplica;
pub use store::{RecoveryPoint, Store};
