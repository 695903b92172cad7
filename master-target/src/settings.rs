//! The master target's configuration: every key, its default, and its checks.
//!
//! Loaded in layers by [`fbr_daemon::settings::load_settings`] (defaults,
//! `/etc/master-target/master-target.toml` or `--config`, `MASTER_TARGET_`-prefixed
//! environment variables, flags). Every key is listed in `docs/CONFIGURATION.md`.

use std::net::SocketAddr;
use std::path::PathBuf;

use fbr_daemon::settings::{ByteSize, ConfigError, DaemonSettings};
use serde::{Deserialize, Serialize};

/// Where the master target looks for its config file when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/master-target/master-target.toml";
/// Where the control socket is, unless configured (the unit's runtime directory).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/master-target/control.sock";
/// Prefix of the master target's environment variables.
pub const ENV_PREFIX: &str = "MASTER_TARGET";

/// Everything `master-target run` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MasterTargetSettings {
    /// UDP address for relays.
    pub listen: SocketAddr,
    /// Data directory: images, journals, index.
    pub data_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub cert_name: String,
    pub port_file: Option<PathBuf>,
    /// TCP address of `/metrics`, `/healthz` and `/readyz`; empty to disable.
    pub metrics_listen: String,
    pub metrics_port_file: Option<PathBuf>,
    /// Bytes of records each stream may have unacknowledged. Must cover one stream's
    /// bandwidth-delay product (16 MiB: 1 Gbit/s at 80 ms, with margin); more only adds
    /// queueing delay.
    pub credit: ByteSize,
    pub max_udp_payload: u16,
    /// Most 4 KiB blocks in the dedup content index (about 100 bytes each); 0 disables
    /// dedup (the relay then resends every referenced block).
    pub content_index_entries: u64,
    /// Unix socket (mode 0600) for operator requests (`master-target test-failover`);
    /// empty to disable.
    pub control_socket: String,
    pub log_json: bool,
}

impl Default for MasterTargetSettings {
    fn default() -> Self {
        MasterTargetSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 9444)),
            data_dir: PathBuf::from("/var/lib/master-target"),
            pki_dir: PathBuf::from("/etc/master-target/pki"),
            cert_name: "master-target".into(),
            port_file: None,
            metrics_listen: "0.0.0.0:9465".into(),
            metrics_port_file: None,
            credit: ByteSize::mib(16),
            max_udp_payload: 1452,
            content_index_entries: 1 << 20,
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            log_json: false,
        }
    }
}

impl DaemonSettings for MasterTargetSettings {
    const DEFAULT_CONFIG_FILE: &'static str = DEFAULT_CONFIG_FILE;
    const ENV_PREFIX: &'static str = ENV_PREFIX;

    /// Checks every value; the first problem names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1 << 20..=4 << 30).contains(&self.credit.0) {
            return Err(ConfigError::new(
                "credit",
                format!("{} is out of range 1MiB..=4GiB", self.credit),
            ));
        }
        if self.max_udp_payload < 1200 {
            return Err(ConfigError::new(
                "max_udp_payload",
                format!("{} is below QUIC's minimum of 1200", self.max_udp_payload),
            ));
        }
        if self.content_index_entries > 1 << 28 {
            return Err(ConfigError::new(
                "content_index_entries",
                format!(
                    "{} is over the limit of 268435456 (about 25 GiB of memory)",
                    self.content_index_entries
                ),
            ));
        }
        self.metrics_addr()?;
        Ok(())
    }
}

impl MasterTargetSettings {
    /// The metrics endpoint's address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        fbr_daemon::settings::listen_addr("metrics_listen", &self.metrics_listen)
    }
}
