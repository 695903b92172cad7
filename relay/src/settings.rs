//! The relay's configuration: every key, its default, and its checks.
//!
//! Loaded in layers by [`fbr_daemon::settings::load_settings`] (defaults, `/etc/relay/relay.toml`
//! or `--config`, `RELAY_`-prefixed environment variables, flags). Every key is listed
//! with its meaning in `docs/CONFIGURATION.md`; [`RelaySettings::validate`] checks ranges
//! and names the key at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fbr_daemon::settings::{ByteSize, ConfigError, DaemonSettings};
use fbr_throttling::WeeklySchedule;
use serde::{Deserialize, Serialize};

use crate::egress::EgressConfig;
use crate::health::HealthThresholds;
use crate::reduce::{Compression, WanConfig};

/// Where the relay looks for its config file when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/relay/relay.toml";
/// Prefix of the relay's environment variables.
pub const ENV_PREFIX: &str = "RELAY";
/// Where `relay run` listens for operator requests, and `relay resync` sends them.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/relay/control.sock";
/// Tables whose keys are chosen by the operator.
pub const FREE_FORM_TABLES: &[&str] = &["egress.vm_weights"];

/// Everything `relay run` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelaySettings {
    /// UDP address for agents.
    pub listen: SocketAddr,
    /// Unix socket for operator requests (mode 0600); empty to disable.
    pub control_socket: String,
    /// TCP address of `/metrics`, `/healthz` and `/readyz`; empty to disable.
    pub metrics_listen: String,
    pub pki_dir: PathBuf,
    pub cert_name: String,
    pub port_file: Option<PathBuf>,
    /// Written once the metrics endpoint listens (for scripts and tests).
    pub metrics_port_file: Option<PathBuf>,
    pub max_udp_payload: u16,
    pub log_json: bool,
    pub master_target: MasterTargetSettings,
    pub cache: CacheSettings,
    pub ingest: IngestSettings,
    pub egress: EgressSettings,
    pub health: HealthSettings,
    pub wan: WanSettings,
    /// The site's configuration server (heartbeats), if any.
    pub config_server: fbr_enroll::heartbeat::ConfigServerSettings,
    /// The failback controller and its operator API (docs/CONTROLLER.md).
    pub controller: ControllerSettings,
}

/// The failback controller (`[controller]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControllerSettings {
    /// TCP address of the operator API (HTTPS); empty to disable the controller.
    pub listen: String,
    /// Written once the API listens (for scripts and tests).
    pub port_file: Option<PathBuf>,
    /// Where the controller keeps its jobs (`controller.redb`).
    pub state_dir: PathBuf,
    /// The Azure side's hook: shuts down and deletes the failed-over VMs.
    pub azure_hook: Option<PathBuf>,
    /// The on-premises side's hook: powers VMs on with their disks, and off.
    pub on_premises_hook: Option<PathBuf>,
    /// Longest one hook run may take before it is killed.
    pub hook_timeout_seconds: u64,
    /// Runs after the first of a hook call that fails transiently.
    pub hook_retries: u32,
    /// Seconds one VM takes to boot (the failover estimate's, until one is measured).
    pub boot_estimate_seconds: f64,
    /// Seconds shutting Azure VMs down takes (the estimate's, until one is measured).
    pub shutdown_estimate_seconds: f64,
    /// Longest a waiting step (resync, recovery point, drain) may wait.
    pub wait_timeout_seconds: u64,
    /// Reprotect back: the master target in Azure that holds the Azure disks and
    /// receives the on-premises VMs' writes (UDP address); unset, reprotect back fails
    /// at its first step saying so.
    pub reverse_master_target: Option<SocketAddr>,
    /// The DNS name in that master target's certificate.
    pub reverse_master_target_name: String,
    /// Reprotect back: the on-premises relay the VMs' agents are pointed at
    /// (`host:port`, handed to the on-premises hook's `replicate`).
    pub reverse_relay: String,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            listen: "0.0.0.0:8443".into(),
            port_file: None,
            state_dir: PathBuf::from("/var/lib/relay/controller"),
            azure_hook: None,
            on_premises_hook: None,
            hook_timeout_seconds: 300,
            hook_retries: 3,
            boot_estimate_seconds: 120.0,
            shutdown_estimate_seconds: 60.0,
            wait_timeout_seconds: 86_400,
            reverse_master_target: None,
            reverse_master_target_name: "master-target".into(),
            reverse_relay: String::new(),
        }
    }
}

/// WAN reductions (docs/WAN.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WanSettings {
    /// Leave out writes superseded before the next recovery point (when backlogged).
    pub coalesce: bool,
    /// Send blocks the master target holds as their SHA-256.
    pub dedup: bool,
    /// Compression of WAN batches: "off", "adaptive" or "always".
    pub compression: Compression,
    /// Level of the per-session zstd contexts (1..=9); 0: no zstd, LZ4 only.
    pub zstd_level: i32,
    /// Memory all sessions' zstd contexts may take together (each gets a fair share).
    pub codec_memory: ByteSize,
    /// Most block hashes remembered as held by the master target (~100 bytes each).
    pub dedup_known_blocks: u64,
    /// Congestion control of the QUIC connection to the master target: "bbr" or
    /// "cubic".
    pub congestion: String,
}

impl Default for WanSettings {
    fn default() -> Self {
        let c = WanConfig::default();
        WanSettings {
            coalesce: c.coalesce,
            dedup: c.dedup,
            compression: c.compression,
            zstd_level: c.zstd_level,
            codec_memory: ByteSize(c.codec_memory),
            dedup_known_blocks: 1 << 20,
            congestion: "cubic".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MasterTargetSettings {
    /// UDP address of the master target (required).
    pub address: Option<SocketAddr>,
    /// DNS name in its certificate.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub capacity: ByteSize,
    pub segment_size: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestSettings {
    /// Bytes each agent stream may have unacknowledged, at most.
    pub credit: ByteSize,
    /// Bytes all agent streams together may have unacknowledged: each open stream is
    /// granted its fair share (a power of two, from 64 KiB up to `credit`).
    pub memory: ByteSize,
    /// Agent connections at once (one agent holds one for all its disks).
    pub max_connections: usize,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Close an agent connection with no stream open this long.
    pub idle_connection_seconds: u64,
    /// Refuse a stream whose frame, once begun, takes longer than this (0: never).
    pub frame_timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressSettings {
    pub schedule: String,
    pub schedule_file: Option<PathBuf>,
    pub utc_offset_minutes: i32,
    pub vm_weights: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthSettings {
    pub interval_ms: u64,
    pub cache_free_warning_percent: f64,
    pub cache_free_critical_percent: f64,
    pub throttle_free_percent: f64,
    pub throttle_release_free_percent: f64,
    pub disk_backlog_quota: ByteSize,
    pub backlog_age_warning_seconds: u64,
    pub backlog_age_critical_seconds: u64,
    pub master_target_unreachable_critical_seconds: u64,
}

impl RelaySettings {
    /// The limits agent-side peers get ([`crate::PeerLimits`]).
    pub fn peer_limits(&self) -> crate::PeerLimits {
        let i = &self.ingest;
        crate::PeerLimits {
            max_connections: i.max_connections,
            max_handshakes: i.max_handshakes,
            idle_connection: std::time::Duration::from_secs(i.idle_connection_seconds),
            frame_timeout: (i.frame_timeout_seconds > 0)
                .then(|| std::time::Duration::from_secs(i.frame_timeout_seconds)),
        }
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            metrics_listen: "0.0.0.0:9464".into(),
            pki_dir: PathBuf::from("/etc/relay/pki"),
            cert_name: "relay".into(),
            port_file: None,
            metrics_port_file: None,
            max_udp_payload: 1452,
            log_json: false,
            master_target: MasterTargetSettings::default(),
            cache: CacheSettings::default(),
            ingest: IngestSettings::default(),
            egress: EgressSettings::default(),
            health: HealthSettings::default(),
            wan: WanSettings::default(),
            config_server: Default::default(),
            controller: ControllerSettings::default(),
        }
    }
}

impl Default for MasterTargetSettings {
    fn default() -> Self {
        MasterTargetSettings {
            address: None,
            name: "master-target".into(),
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            dir: PathBuf::from("/var/lib/relay/cache"),
            capacity: ByteSize::gib(8),
            segment_size: ByteSize::mib(64),
        }
    }
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            credit: ByteSize::mib(16),
            memory: ByteSize::mib(64),
            max_connections: 1024,
            max_handshakes: 256,
            idle_connection_seconds: 60,
            frame_timeout_seconds: 60,
        }
    }
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            schedule: "other unlimited".into(),
            schedule_file: None,
            utc_offset_minutes: 0,
            vm_weights: BTreeMap::new(),
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        let t = HealthThresholds::default();
        HealthSettings {
            interval_ms: 1000,
            cache_free_warning_percent: t.cache_free_warning_percent,
            cache_free_critical_percent: t.cache_free_critical_percent,
            throttle_free_percent: t.throttle_free_percent,
            throttle_release_free_percent: t.throttle_release_free_percent,
            disk_backlog_quota: ByteSize(t.disk_backlog_quota_bytes),
            backlog_age_warning_seconds: t.backlog_age_warning_s,
            backlog_age_critical_seconds: t.backlog_age_critical_s,
            master_target_unreachable_critical_seconds: t.master_target_unreachable_critical_s,
        }
    }
}

impl DaemonSettings for RelaySettings {
    const DEFAULT_CONFIG_FILE: &'static str = DEFAULT_CONFIG_FILE;
    const ENV_PREFIX: &'static str = ENV_PREFIX;
    const FREE_FORM_TABLES: &'static [&'static str] = FREE_FORM_TABLES;

    /// Checks every value; the first problem names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        let config_server = self
            .config_server
            .address()
            .map_err(|(key, reason)| ConfigError::new(key, reason))?;
        // Without an address of its own, the relay asks the configuration server for
        // the master target it is assigned.
        if self.master_target.address.is_none() && config_server.is_none() {
            return Err(ConfigError::new(
                "master_target.address",
                "missing: the master target's UDP address (e.g. 10.1.2.3:9444), or config_server.address to be assigned one",
            ));
        }
        self.metrics_addr()?;
        self.controller_addr()?;
        let c = &self.controller;
        if !(1..=86_400).contains(&c.hook_timeout_seconds) {
            return Err(ConfigError::new(
                "controller.hook_timeout_seconds",
                format!("{} is out of range 1..=86400", c.hook_timeout_seconds),
            ));
        }
        if c.hook_retries > 10 {
            return Err(ConfigError::new(
                "controller.hook_retries",
                format!("{} is out of range 0..=10", c.hook_retries),
            ));
        }
        for (key, v) in [
            ("controller.boot_estimate_seconds", c.boot_estimate_seconds),
            (
                "controller.shutdown_estimate_seconds",
                c.shutdown_estimate_seconds,
            ),
        ] {
            if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                return Err(ConfigError::new(
                    key,
                    "must be a number of seconds, 0 to 86400",
                ));
            }
        }
        if !(1..=30 * 86_400).contains(&c.wait_timeout_seconds) {
            return Err(ConfigError::new(
                "controller.wait_timeout_seconds",
                format!("{} is out of range 1..=2592000", c.wait_timeout_seconds),
            ));
        }
        match (&c.reverse_master_target, c.reverse_relay.as_str()) {
            (None, "") => {}
            (Some(_), "") => {
                return Err(ConfigError::new(
                    "controller.reverse_relay",
                    "missing: the on-premises relay (host:port) the VMs' agents send to at reprotect back, needed with controller.reverse_master_target",
                ))
            }
            (None, _) => {
                return Err(ConfigError::new(
                    "controller.reverse_master_target",
                    "missing: the Azure master target's UDP address, needed with controller.reverse_relay",
                ))
            }
            (Some(_), relay) => {
                let port = relay.rsplit_once(':').and_then(|(host, port)| {
                    (!host.is_empty()).then(|| port.parse::<u16>().ok()).flatten()
                });
                if port.is_none_or(|p| p == 0) {
                    return Err(ConfigError::new(
                        "controller.reverse_relay",
                        format!("{relay:?}: expected host:port"),
                    ));
                }
            }
        }
        for (key, hook) in [
            ("controller.azure_hook", &c.azure_hook),
            ("controller.on_premises_hook", &c.on_premises_hook),
        ] {
            if let Some(h) = hook {
                if !h.is_absolute() {
                    return Err(ConfigError::new(
                        key,
                        "must be an absolute path to the hook",
                    ));
                }
            }
        }
        let seg = self.cache.segment_size.0;
        if !(64 << 10..=1 << 30).contains(&seg) {
            return Err(ConfigError::new(
                "cache.segment_size",
                format!("{} is out of range 64KiB..=1GiB", self.cache.segment_size),
            ));
        }
        if self.cache.capacity.0 < 2 * seg {
            return Err(ConfigError::new(
                "cache.capacity",
                format!(
                    "{} must hold at least two segments ({})",
                    self.cache.capacity,
                    ByteSize(2 * seg)
                ),
            ));
        }
        if !(1 << 20..=4 << 30).contains(&self.ingest.credit.0) {
            return Err(ConfigError::new(
                "ingest.credit",
                format!("{} is out of range 1MiB..=4GiB", self.ingest.credit),
            ));
        }
        if !(16 << 20..=64 << 30).contains(&self.ingest.memory.0) {
            return Err(ConfigError::new(
                "ingest.memory",
                format!("{} is out of range 16MiB..=64GiB", self.ingest.memory),
            ));
        }
        if !(1..=65536).contains(&self.ingest.max_connections) {
            return Err(ConfigError::new(
                "ingest.max_connections",
                format!("{} is out of range 1..=65536", self.ingest.max_connections),
            ));
        }
        if !(1..=self.ingest.max_connections).contains(&self.ingest.max_handshakes) {
            return Err(ConfigError::new(
                "ingest.max_handshakes",
                format!(
                    "{} is out of range 1..=ingest.max_connections ({})",
                    self.ingest.max_handshakes, self.ingest.max_connections
                ),
            ));
        }
        if !(1..=86400).contains(&self.ingest.idle_connection_seconds) {
            return Err(ConfigError::new(
                "ingest.idle_connection_seconds",
                format!(
                    "{} is out of range 1..=86400",
                    self.ingest.idle_connection_seconds
                ),
            ));
        }
        if self.ingest.frame_timeout_seconds > 86400 {
            return Err(ConfigError::new(
                "ingest.frame_timeout_seconds",
                format!(
                    "{} is out of range 0..=86400",
                    self.ingest.frame_timeout_seconds
                ),
            ));
        }
        if self.max_udp_payload < 1200 {
            return Err(ConfigError::new(
                "max_udp_payload",
                format!("{} is below QUIC's minimum of 1200", self.max_udp_payload),
            ));
        }
        self.egress_config()?;
        if !(10..=60_000).contains(&self.health.interval_ms) {
            return Err(ConfigError::new(
                "health.interval_ms",
                format!("{} is out of range 10..=60000", self.health.interval_ms),
            ));
        }
        self.health_thresholds()
            .validate()
            .map_err(|(key, reason)| ConfigError::new(key, reason))?;
        if fbr_transport::Congestion::parse(&self.wan.congestion).is_none() {
            return Err(ConfigError::new(
                "wan.congestion",
                format!("{:?} is neither \"bbr\" nor \"cubic\"", self.wan.congestion),
            ));
        }
        if !(0..=fbr_protocol::codec::MAX_ZSTD_LEVEL).contains(&self.wan.zstd_level) {
            return Err(ConfigError::new(
                "wan.zstd_level",
                format!(
                    "{} is out of range 0..={} (0: no zstd)",
                    self.wan.zstd_level,
                    fbr_protocol::codec::MAX_ZSTD_LEVEL
                ),
            ));
        }
        if self.wan.codec_memory.0 > 64 << 30 {
            return Err(ConfigError::new(
                "wan.codec_memory",
                format!("{} is over the limit of 64GiB", self.wan.codec_memory),
            ));
        }
        if self.wan.dedup_known_blocks > 1 << 28 {
            return Err(ConfigError::new(
                "wan.dedup_known_blocks",
                format!(
                    "{} is over the limit of 268435456 (about 25 GiB of memory)",
                    self.wan.dedup_known_blocks
                ),
            ));
        }
        Ok(())
    }
}

impl RelaySettings {
    /// The metrics endpoint's address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        fbr_daemon::settings::listen_addr("metrics_listen", &self.metrics_listen)
    }

    /// The operator API's address (`None`: the controller is off).
    pub fn controller_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        fbr_daemon::settings::listen_addr("controller.listen", &self.controller.listen)
    }

    /// The egress controller's settings (reads the schedule file if one is named).
    pub fn egress_config(&self) -> Result<EgressConfig, ConfigError> {
        let (spec, key) = match &self.egress.schedule_file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("egress.schedule_file", format!("{}: {e}", path.display()))
                })?,
                "egress.schedule_file",
            ),
            None => (self.egress.schedule.clone(), "egress.schedule"),
        };
        let schedule =
            WeeklySchedule::parse(spec.trim()).map_err(|e| ConfigError::new(key, e.to_string()))?;
        for (vm, w) in &self.egress.vm_weights {
            if !(1..=1000).contains(w) {
                return Err(ConfigError::new(
                    format!("egress.vm_weights.{vm}"),
                    format!("{w} is out of range 1..=1000"),
                ));
            }
        }
        if self.egress.utc_offset_minutes.abs() > 14 * 60 {
            return Err(ConfigError::new(
                "egress.utc_offset_minutes",
                format!("{} is not within ±840", self.egress.utc_offset_minutes),
            ));
        }
        Ok(EgressConfig {
            schedule,
            schedule_file: self.egress.schedule_file.clone(),
            utc_offset_minutes: self.egress.utc_offset_minutes,
            vm_weights: self.egress.vm_weights.clone().into_iter().collect(),
        })
    }

    pub fn health_thresholds(&self) -> HealthThresholds {
        let h = &self.health;
        HealthThresholds {
            cache_free_warning_percent: h.cache_free_warning_percent,
            cache_free_critical_percent: h.cache_free_critical_percent,
            throttle_free_percent: h.throttle_free_percent,
            throttle_release_free_percent: h.throttle_release_free_percent,
            disk_backlog_quota_bytes: h.disk_backlog_quota.0,
            backlog_age_warning_s: h.backlog_age_warning_seconds,
            backlog_age_critical_s: h.backlog_age_critical_seconds,
            master_target_unreachable_critical_s: h.master_target_unreachable_critical_seconds,
        }
    }

    pub fn wan_config(&self) -> WanConfig {
        WanConfig {
            coalesce: self.wan.coalesce,
            dedup: self.wan.dedup,
            compression: self.wan.compression,
            zstd_level: self.wan.zstd_level,
            codec_memory: self.wan.codec_memory.0,
        }
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health.interval_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_are_valid_once_the_master_target_is_named() {
        let mut s = RelaySettings::default();
        assert_eq!(s.validate().unwrap_err().key, "master_target.address");
        s.master_target.address = Some("127.0.0.1:9444".parse().unwrap());
        s.validate().unwrap();
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let mut base = RelaySettings::default();
        base.master_target.address = Some("127.0.0.1:9444".parse().unwrap());
        type Mutation = Box<dyn Fn(&mut RelaySettings)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "cache.capacity",
                Box::new(|s| s.cache.capacity = ByteSize::mib(100)),
            ),
            (
                "cache.segment_size",
                Box::new(|s| s.cache.segment_size = ByteSize(1)),
            ),
            ("ingest.credit", Box::new(|s| s.ingest.credit = ByteSize(0))),
            (
                "ingest.memory",
                Box::new(|s| s.ingest.memory = ByteSize(1 << 20)),
            ),
            (
                "ingest.max_connections",
                Box::new(|s| s.ingest.max_connections = 0),
            ),
            (
                "ingest.max_handshakes",
                Box::new(|s| s.ingest.max_handshakes = 5000),
            ),
            (
                "ingest.idle_connection_seconds",
                Box::new(|s| s.ingest.idle_connection_seconds = 0),
            ),
            (
                "ingest.frame_timeout_seconds",
                Box::new(|s| s.ingest.frame_timeout_seconds = u64::MAX),
            ),
            (
                "egress.schedule",
                Box::new(|s| s.egress.schedule = "someday 1mbit".into()),
            ),
            (
                "egress.vm_weights.vm-a",
                Box::new(|s| {
                    s.egress.vm_weights.insert("vm-a".into(), 0);
                }),
            ),
            (
                "metrics_listen",
                Box::new(|s| s.metrics_listen = "localhost".into()),
            ),
            (
                "health.throttle_free_percent",
                Box::new(|s| s.health.throttle_free_percent = -1.0),
            ),
            ("health.interval_ms", Box::new(|s| s.health.interval_ms = 0)),
        ];
        for (key, mutate) in cases {
            let mut s = base.clone();
            mutate(&mut s);
            assert_eq!(s.validate().unwrap_err().key, key);
        }
    }
}
