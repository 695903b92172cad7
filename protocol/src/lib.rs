//! # fbr-protocol: the wire format of the failback relay
//!
//! Every byte that crosses a network between a source agent, the relay and the master
//! target is a *frame* defined here. The crate is **sans-IO**: it encodes frames into
//! buffers and decodes them out of buffers, and knows nothing about sockets, QUIC or
//! tokio. The async shells (`fbr-transport`, the daemons) feed it bytes.
//!
//! The byte tables live in `docs/PROTOCOL.md`; `tests/golden.rs` pins them.
//!
//! ## Layout
//! - [`frame`]: the frame header, every frame type, the encoder and the decoder.
//! - [`error`]: numeric error codes carried by `Error` frames, and decode errors.
//! - [`names`]: validation of VM and replication-group names.
//! - [`placement`]: which path of a stream is current after its VM moved between
//!   relays, and the small file each receiver keeps it in.
//! - [`wan`]: the WAN batch codec (relay -> master target).
//! - [`codec`]: the zstd streaming contexts a WAN stream may carry its batches through,
//!   and the memory pool that caps them.
//! - [`resync`]: the hash tree a resync compares, the agent's scanner and the ETA
//!   estimator (sans-IO).
//! - [`stream`]: the per-stream protocol as two state machines, [`stream::StreamSender`]
//!   and [`stream::StreamReceiver`], driven by the daemons' async loops.
//!
//! ## Invariants
//! - A frame is decoded only once it is completely buffered; "not enough bytes yet" is
//!   `Ok(None)`, never an error (as in mini-redis's `parse_frame`).
//! - A header announcing more than [`MAX_FRAME_PAYLOAD`] bytes is rejected as soon as
//!   the 8 header bytes arrive, so a hostile peer cannot make a receiver buffer more.
//! - Decoding never panics on any input (fuzzed by `fuzz/fuzz_targets/decode_frame.rs`).
//! - All integers are little-endian.
#![forbid(unsafe_code)]

pub mod codec;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod names;
pub mod placement;
pub mod resync;
pub mod stream;
pub mod wan;

pub use error::{DecodeError, ErrorCode, Recovery};
pub use frame::{
    decode_frame, encode_frame, encode_to_bytes, frame_len, Frame, FrameType, Record, ReplicaState,
    ResyncMark, ResyncMode, ResyncPhase, StreamId, TagKind, FRAME_HEADER_LEN, MAGIC,
    MAX_FRAME_PAYLOAD, MAX_HASH_NODES, MAX_WRITE_BYTES, NODE_HASH_LEN, PROTOCOL_VERSION,
    SECTOR_SIZE,
};
