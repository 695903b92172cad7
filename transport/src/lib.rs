//! # fbr-transport: QUIC with mutual TLS, certificates, and frames over streams
//!
//! Shared by the relay, the master target and the agent emulator, so all three speak the
//! same secured transport:
//!
//! - [`pki`]: a site CA and certificates made with `rcgen`, stored in a directory and
//!   never regenerated silently. Roles and VM entitlements are URI SANs.
//! - [`identity`]: reads a verified peer's role and entitlements from its certificate.
//! - [`quic`]: `quinn` endpoints over `rustls` TLS 1.3, client certificates required,
//!   flow-control windows and UDP buffers sized for a high bandwidth-delay product.
//! - [`link`]: a self-healing client connection to a peer of a given role.
//! - [`credit`]: a fair share of one memory budget as each stream's credit, so that
//!   what many streams hold in flight stays bounded.
//! - [`framed`]: reading and writing [`fbr_protocol::Frame`]s on a QUIC stream (or any
//!   byte pipe), and the [`fbr_protocol::stream::Incoming`] the stream machines take.
//!
//! Invariant: no endpoint built here accepts a peer whose certificate does not chain to
//! the site CA; role and entitlement checks happen in the daemons with [`identity`].
#![forbid(unsafe_code)]

pub mod credit;
pub mod framed;
pub mod identity;
pub mod link;
pub mod pki;
pub mod quic;

pub use framed::{ChunkWrite, FrameReader, FrameWriter, IoWriter, ReadError};
pub use identity::{peer_identity, require_role, PeerIdentity, Role};
pub use link::{LinkError, LinkStatus, PeerLink};
pub use quic::{
    any_addr_for, client_endpoint, load_roots, server_endpoint, Congestion, Credentials, QuicTuning,
};
