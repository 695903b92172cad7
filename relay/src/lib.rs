//! # fbr-relay: the process server
//!
//! Runs on an Azure VM next to the failed-over VMs. Accepts each source disk's change
//! stream from the agents, makes it durable in its disk cache and acknowledges it, then
//! forwards it in write order to the on-premises master target, freeing the cache as the
//! master target acknowledges.
//!
//! ## Layout
//! - [`server`]: the relay as one piece ([`Relay`]: both sides, the master-target link,
//!   health) and the agent-facing server (role checks, a session per stream).
//! - [`ingest`]: one agent disk stream, a thin driver of
//!   `fbr_protocol::stream::StreamReceiver`: durable append, `Ack`/`Applied`;
//!   [`ingest::IngestContext`] is all a session uses.
//! - [`hashproxy`]: resync hash streams, passed between agents and the master target.
//! - [`resync`]: where each resyncing disk stands (progress, ETA), from the marks.
//! - [`cache`]: the durable cache (`fbr-cache`) behind a group-commit writer thread.
//! - [`egress`]: rate limit (weekly schedule) and weighted fair sharing of the WAN leg.
//! - [`reduce`]: WAN reductions per batch: coalescing, zero elision, dedup, LZ4.
//! - [`forwarder`]: one task per stream draining the cache to the master target, a thin
//!   driver of `fbr_protocol::stream::StreamSender`; [`forwarder::ForwardContext`] is
//!   all it uses (the master target and the cache behind traits, so a forwarder runs in
//!   a test without QUIC, metrics or cache files).
//! - [`memsource`]: streams' records in memory, as the forwarders' and plans' source in
//!   tests (no cache files).
//! - [`control`]: the control socket: operator requests (`relay resync`).
//! - [`error`]: [`RelayError`], where a failure came from and whether to retry.
//! - [`health`]: health conditions and ingest throttling under cache pressure (sans-IO).
//! - [`observe`]: the health task and the `/metrics`, `/healthz`, `/readyz` endpoints.
//! - [`settings`]: every configuration key, its default and its checks.
//! - [`bench`]: `relay bench-cache`, the cache benchmark.
//!
//! ## Invariants
//! - A record is acknowledged to its source only once it is durable in the cache; cache
//!   space is freed only once the master target acknowledged the record.
//! - Per stream, records leave in the order they arrived, with no gaps; an invalid record
//!   ends only its own stream, after the valid records before it.
//! - Payloads live on disk, not in memory: memory is bounded by the append budget
//!   (32 MiB), the agents' credit (`ingest.memory`, shared by all agent streams), the
//!   master target's credit (its `memory`, shared by all WAN streams) and the read
//!   windows of the forwarders reducing at once, plus the cache index (16 bytes per
//!   cached record).
#![forbid(unsafe_code)]

pub mod api;
pub mod bench;
pub mod cache;
pub mod control;
pub mod ctl;
pub mod egress;
pub mod error;
pub mod failback;
pub mod forwarder;
pub mod hashproxy;
pub mod health;
pub mod ingest;
pub mod memsource;
pub mod observe;
pub mod reduce;
pub mod resync;
pub mod server;
pub mod settings;
pub mod target;

pub use error::RelayError;
pub use server::{PeerLimits, Relay, RelayConfig};
