//! # fbr-churn: agent emulator, load generator and verifier
//!
//! Emulates the source agents of many failed-over Azure VMs, streaming realistic,
//! deterministic disk churn into a relay, and *knows exactly what each source disk holds
//! at every tag*, so every replica at the master target can be checked byte for byte.
//!
//! ## Layout
//! - [`workload`]: deterministic generators: profiles (where) and content (what).
//! - [`writelog`]: the recorded write-log format, for replaying captured workloads.
//! - [`image`]: what a disk holds before its stream starts (empty, a file, generated "as
//!   at failover", or diverged from another image), in sparse files of any size.
//! - [`source`]: a disk's change source (generated or replayed) and the run manifest.
//! - [`agent`]: the emulator: QUIC streams per disk, credit, acks, reconnects, tags at
//!   consistent cuts, lag measurement.
//! - [`moves`]: follows the configuration server's assignment and moves VMs between
//!   relays when an operator asks (drain the old relay, or resync off a lost one).
//! - [`dirty`]: the regions a killed agent may have written unacknowledged (resynced
//!   when it comes back).
//! - [`verify`]: rebuilds sources and replicas and compares them at every recovery point.
//! - [`harness`]: a loopback site of real `master-target` and `relay` processes.
//! - [`resyncbench`]: `churn bench-resync`, a reprotect's speed, cost and ETA.
//! - [`drill`]: `churn drill` and `churn bench` on top of all of the above.
#![forbid(unsafe_code)]

pub mod agent;
pub mod dirty;
pub mod drill;
pub mod failbackdrill;
pub mod harness;
pub mod hostile;
pub mod image;
pub mod impair;
pub mod moves;
pub mod netem;
pub mod platform;
pub mod resyncbench;
pub mod retentionbench;
pub mod scalebench;
pub mod soak;
pub mod source;
pub mod verify;
pub mod wanbench;
pub mod wanemu;
pub mod workload;
pub mod writelog;

pub use fbr_daemon::parse_size;
