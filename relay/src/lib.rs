//! # fbr-relay: the process server
//!
//! Runs on an Azure VM next to the failed-over VMs. Accepts each source disk's change
//! stream from the agents, and forwards it in write order to the on-premises master
//! target, carrying acknowledgements back.
//!
//! ## Layout
//! - [`server`]: accepts agent connections, checks roles, shared state and counters.
//! - [`session`]: one disk stream: ingest (checks), queue, forwarder, acks.
//! - [`queue`]: the bounded buffer between ingest and forwarder, where the durable cache
//!   slots in.
//!
//! ## Invariants
//! - A record is acknowledged to its source only once it is durable downstream (today:
//!   at the master target, since the queue is memory).
//! - Per stream, records leave in the order they arrived, with no gaps; an invalid record
//!   ends only its own stream, after the valid records before it.
//! - Memory per stream is bounded by the queue size plus the QUIC stream window.
#![forbid(unsafe_code)]

pub mod queue;
pub mod server;
pub mod session;

pub use server::{Relay, RelayConfig};
