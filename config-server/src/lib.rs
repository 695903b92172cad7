//! # fbr-config-server: the site's configuration server
//!
//! On-premises, it is what every relay, master target and agent of a site enrolls
//! with, on port 443, using the site's passphrase (Azure Site Recovery's model):
//!
//! - [`site`]: `config-server init` makes the site: its CA, the server's certificate,
//!   a random passphrase shown once and stored only as a salted verifier.
//! - [`state`]: the site and its components in one redb database, changed one
//!   transaction at a time.
//! - [`api`]: the HTTPS API (TLS 1.3): enrollment, with the passphrase proofs of
//!   [`fbr_enroll::proof`] bound to each TLS session, coded errors, and a growing delay
//!   after wrong passphrases.
//! - [`inventory`]: the site as a whole (VMs and disks, groups, relays, master
//!   targets) from enrollments and heartbeats.
//! - [`placement`]: which relay a new VM's agent is assigned (the most headroom).
//! - [`moves`]: moving a VM to another relay, as an operation with phases and progress.
//! - [`settings`]: the daemon's configuration.
//!
//! Invariants: the passphrase is never stored or logged; a certificate is issued only
//! after the component's proof holds for its own TLS session, only for the key of its
//! request, and says only what the server decides (role, VMs), never what the request
//! asks for itself.
#![forbid(unsafe_code)]

pub mod api;
pub mod inventory;
pub mod moves;
pub mod placement;
pub mod settings;
pub mod site;
pub mod state;
