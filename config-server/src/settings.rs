//! The configuration server's settings: every key, its default, and its checks (loaded
//! in layers like the other daemons': defaults, `/etc/config-server/config-server.toml`
//! or `--config`, `CONFIG_SERVER_*` variables, flags). Listed in docs/CONFIGURATION.md.

use std::net::SocketAddr;
use std::path::PathBuf;

use fbr_daemon::settings::{ConfigError, DaemonSettings};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/config-server/config-server.toml";
pub const ENV_PREFIX: &str = "CONFIG_SERVER";

/// Everything `config-server run` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigServerSettings {
    /// HTTPS address of the API (enrollment).
    pub listen: SocketAddr,
    /// The site: `state.redb` and `pki/` (made by `config-server init`).
    pub data_dir: PathBuf,
    pub port_file: Option<PathBuf>,
    /// TCP address of `/metrics`, `/healthz` and `/readyz`; empty to disable.
    pub metrics_listen: String,
    pub metrics_port_file: Option<PathBuf>,
    pub log_json: bool,
}

impl Default for ConfigServerSettings {
    fn default() -> Self {
        ConfigServerSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            data_dir: PathBuf::from("/var/lib/config-server"),
            port_file: None,
            metrics_listen: "0.0.0.0:9466".into(),
            metrics_port_file: None,
            log_json: false,
        }
    }
}

impl DaemonSettings for ConfigServerSettings {
    const DEFAULT_CONFIG_FILE: &'static str = DEFAULT_CONFIG_FILE;
    const ENV_PREFIX: &'static str = ENV_PREFIX;

    fn validate(&self) -> Result<(), ConfigError> {
        self.metrics_addr()?;
        Ok(())
    }
}

impl ConfigServerSettings {
    /// The metrics endpoint's address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        fbr_daemon::settings::listen_addr("metrics_listen", &self.metrics_listen)
    }
}
