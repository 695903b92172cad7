//! The master target's configuration: every key, its default, and its checks.
//!
//! Loaded in layers by [`fbr_daemon::settings::load_settings`] (defaults,
//! `/etc/master-target/master-target.toml` or `--config`, `MASTER_TARGET_`-prefixed
//! environment variables, flags). Every key is listed in `docs/CONFIGURATION.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use fbr_daemon::process::parse_window;
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
    /// Bytes all relay streams together may have unacknowledged: each open stream is
    /// granted its fair share (a power of two, from 64 KiB up to `credit`), so a
    /// thousand disks do not put a thousand credits in flight (in this master
    /// target's queues and in the relays' send buffers). Must cover the link's
    /// bandwidth-delay product (64 MiB: 1 Gbit/s at 500 ms).
    pub memory: ByteSize,
    pub max_udp_payload: u16,
    /// Most 4 KiB blocks in the dedup content index (about 100 bytes each); 0 disables
    /// dedup (the relay then resends every referenced block).
    pub content_index_entries: u64,
    /// Memory all streams' zstd decompression contexts may take together (a stream
    /// gets a fair share of it, `docs/WAN.md`); 0: grant no zstd window, the relays
    /// then send LZ4 or plain batches.
    pub codec_memory: ByteSize,
    /// Unix socket (mode 0600) for operator requests (`master-target test-failover`);
    /// empty to disable.
    pub control_socket: String,
    /// How far back recovery points are kept, per replication group: `<n>s`, `<n>m`,
    /// `<n>h` or `<n>d`, from 1s (drills) to 15d.
    pub retention_window: String,
    /// Journal bytes kept per replication group, all its disks together; 0: no cap (the
    /// window alone bounds it).
    pub retention_max: ByteSize,
    /// Per replication group, by name: a window or a cap of its own instead of the two
    /// above (`[retention_groups.<group>]` with `window` and/or `max`).
    pub retention_groups: BTreeMap<String, GroupRetention>,
    /// The site's configuration server (heartbeats), if any.
    pub config_server: fbr_enroll::heartbeat::ConfigServerSettings,
    pub log_json: bool,
}

/// One group's own retention; what it leaves out is the daemon-wide value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupRetention {
    pub window: Option<String>,
    pub max: Option<ByteSize>,
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
            memory: ByteSize::mib(64),
            max_udp_payload: 1452,
            content_index_entries: 1 << 20,
            codec_memory: ByteSize(fbr_protocol::codec::DEFAULT_CODEC_MEMORY),
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            retention_window: "24h".into(),
            retention_max: ByteSize(0),
            retention_groups: BTreeMap::new(),
            config_server: Default::default(),
            log_json: false,
        }
    }
}

impl DaemonSettings for MasterTargetSettings {
    const DEFAULT_CONFIG_FILE: &'static str = DEFAULT_CONFIG_FILE;
    const ENV_PREFIX: &'static str = ENV_PREFIX;
    /// Group names are the operator's: serde checks each group's keys.
    const FREE_FORM_TABLES: &'static [&'static str] = &["retention_groups"];

    /// Checks every value; the first problem names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1 << 20..=4 << 30).contains(&self.credit.0) {
            return Err(ConfigError::new(
                "credit",
                format!("{} is out of range 1MiB..=4GiB", self.credit),
            ));
        }
        if !(16 << 20..=64 << 30).contains(&self.memory.0) {
            return Err(ConfigError::new(
                "memory",
                format!("{} is out of range 16MiB..=64GiB", self.memory),
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
        if self.codec_memory.0 > 64 << 30 {
            return Err(ConfigError::new(
                "codec_memory",
                format!("{} is over the limit of 64GiB", self.codec_memory),
            ));
        }
        self.metrics_addr()?;
        self.retention()?;
        self.config_server
            .address()
            .map_err(|(key, reason)| ConfigError::new(key, reason))?;
        Ok(())
    }
}

impl MasterTargetSettings {
    /// The retention policies the settings describe: the daemon-wide one and each
    /// group's own.
    pub fn retention(&self) -> Result<crate::retention::Retention, ConfigError> {
        let window = parse_window(&self.retention_window)
            .map_err(|e| ConfigError::new("retention_window", e))?;
        let default = crate::retention::RetentionPolicy {
            window,
            max_bytes: cap(self.retention_max),
        };
        let mut groups = BTreeMap::new();
        for (group, own) in &self.retention_groups {
            let window = match &own.window {
                Some(w) => parse_window(w)
                    .map_err(|e| ConfigError::new(format!("retention_groups.{group}.window"), e))?,
                None => default.window,
            };
            let max_bytes = own.max.map_or(default.max_bytes, cap);
            groups.insert(
                group.clone(),
                crate::retention::RetentionPolicy { window, max_bytes },
            );
        }
        Ok(crate::retention::Retention { default, groups })
    }

    /// The metrics endpoint's address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        fbr_daemon::settings::listen_addr("metrics_listen", &self.metrics_listen)
    }
}

/// A size cap: 0 is none.
fn cap(max: ByteSize) -> Option<u64> {
    (max.0 > 0).then_some(max.0)
}
