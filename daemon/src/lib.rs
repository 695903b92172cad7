//! # fbr-daemon: what every failback daemon's process needs
//!
//! The relay and the master target (and the configuration server to come) start, read
//! their configuration and report problems the same way; this crate is that one way, so
//! a daemon's `main.rs` only declares its flags and calls its library.
//!
//! ## Layout
//! - [`settings`]: layered configuration (built-in defaults, a TOML file, environment
//!   variables, flags) with unknown keys, wrong types and out-of-range values reported by
//!   key; byte sizes and listen addresses as config values; flags mapped to keys by their
//!   own declaration ([`settings::flag_overrides`]).
//! - [`process`]: logging, shutdown signals, the port file, byte sizes on the command
//!   line.
//! - [`run`]: the `run` / `check-config` skeleton: bad configuration exits 64 naming
//!   the key, then logging, the runtime, the daemon's body, and its error report.
//! - [`systemd`]: `sd_notify` for `Type=notify` units: `READY=1` from the daemon's own
//!   readiness, `STATUS=` with the reason, `STOPPING=1`.
//! - [`placements`]: the durable table of each stream's placement (where it moved),
//!   which the relay and the master target check every `Hello` against.
//! - [`gate`]: admission of HTTP connections (the metrics endpoint, the HTTPS APIs):
//!   bounded, and a slow client loses its slot to a new one before an honest one does.
//! - [`control`]: the control socket (a Unix socket, mode 0600, one JSON request and
//!   answer per line) and its client, each daemon's requests its own.
//!
//! ## Invariants
//! - Invalid configuration never starts a daemon: it exits with [`EX_USAGE`] (64) and a
//!   message naming the key at fault and where it was set.
//! - Nothing here knows about QUIC, certificates or metrics (`fbr-transport` and
//!   `fbr-metrics` do).
#![forbid(unsafe_code)]

pub mod control;
pub mod gate;
pub mod placements;
pub mod process;
pub mod run;
pub mod settings;
pub mod systemd;

pub use process::{
    bound_malloc_arenas, init_logging, parse_size, shutdown_signal, write_port_file, MALLOC_ARENAS,
};
pub use run::{report, report_check, run_daemon};
pub use settings::{ByteSize, ConfigError, DaemonSettings, EX_USAGE};
