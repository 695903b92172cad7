//! # fbr-storage: durable files behind a trait
//!
//! The relay's cache and the master target's replicas touch their files only through
//! [`DurableFile`], so their model-based property tests can run the real code on
//! [`MemFile`]: memory that keeps what was written apart from what was synced, so that a
//! simulated power cut loses (or tears) exactly what a real one could, and that fails
//! writes or syncs on request ([`Faults`]).
//!
//! ## Layout
//! - [`DurableFile`]: positioned reads and writes, `fdatasync`, size, truncate, zeroing;
//!   implemented by [`std::fs::File`] (zeroing punches holes, so images stay sparse).
//! - [`MemFile`], [`Faults`], [`Crash`]: the in-memory file for tests.
//!
//! ## What a crash does to a [`MemFile`]
//! - [`Crash::ProcessKill`] (kill -9): nothing is lost; the page cache survives the
//!   process, only the process's memory is gone.
//! - [`Crash::PowerLoss`]: everything written since the last successful sync is lost.
//! - [`Crash::TornPowerLoss`]: each 512-byte sector written since the last sync
//!   independently survives or not, and the file's length lands anywhere between its
//!   synced and its current length: what page writeback in any order can leave behind.
//!
//! Injected faults model errors of the run that crashed, so a crash clears them.
#![forbid(unsafe_code)]

mod file;
mod mem;

pub use file::DurableFile;
pub use mem::{Crash, Faults, MemFile};
