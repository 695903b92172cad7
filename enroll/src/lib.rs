//! # fbr-enroll: joining a site through its configuration server
//!
//! Every relay, master target and agent of a site enrolls once with the site's
//! configuration server (`config-server`), on port 443, with the site's passphrase:
//!
//! - [`proof`]: both sides prove they know the passphrase, bound to the one TLS session
//!   they share, so a server or a client without it, or a man in the middle, is
//!   detected; the passphrase never crosses the wire, not even hashed alone.
//! - [`wire`]: the API's JSON documents (docs/API.md) and the checks every request
//!   passes (decoding is a fuzz target).
//! - [`cli`]: the `register` subcommand of every component's binary.
//! - [`heartbeat`]: an enrolled component's reports to the server (mutual TLS), and
//!   what it knows of them (unreachable after three silent intervals).
//! - [`client`]: the component's side: its key made or kept locally, a certificate
//!   request, the proofs, then the certificate and the site CA written.
//! - [`https`]: serving an HTTPS JSON API within limits (the configuration server's, and
//!   the relay controller's operator API).
//!
//! Invariant: a component keeps nothing from an enrollment whose server proof does not
//! hold, and its key never leaves it.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod heartbeat;
pub mod https;
pub mod proof;
pub mod wire;

pub use client::{register, EnrollError, RegisterOptions, Registration};
