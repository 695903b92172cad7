//! The relay's control socket: operator requests that change what the relay does, on a
//! Unix socket only the relay's user can open (mode 0600), never on a network port.
//!
//! One JSON request per line, one JSON answer per line:
//!
//! ```text
//! {"op":"resync","vm":"vm1","disk":0,"mode":"delta"}  -> {"ok":true}
//! {"op":"resyncs"}                                    -> {"ok":true,"resyncs":[...]}
//! anything else                                       -> {"ok":false,"error":"..."}
//! ```
//!
//! `relay resync` and `relay resyncs` are its clients. Bounded: at most
//! [`MAX_CLIENTS`] connections at once, [`MAX_LINE`] bytes per request, [`TIMEOUT`] per
//! connection. (The controller's HTTPS API, to come, calls the same functions.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fbr_protocol::{ResyncMode, StreamId};
use serde::{Deserialize, Serialize};

use crate::server::Relay;

/// Most control connections served at once.
pub const MAX_CLIENTS: usize = 8;
/// Longest request line.
pub const MAX_LINE: usize = 4096;
/// How long one connection may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Ask a disk's agent for a resync.
    Resync {
        vm: String,
        disk: u32,
        mode: ModeName,
    },
    /// The resyncs in progress.
    Resyncs,
}

/// A resync mode, as written in requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Delta,
    Full,
}

impl From<ModeName> for ResyncMode {
    fn from(m: ModeName) -> Self {
        match m {
            ModeName::Delta => ResyncMode::Delta,
            ModeName::Full => ResyncMode::Full,
        }
    }
}

/// One resync in progress, as `resyncs` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub vm: String,
    pub disk: u32,
    pub mode: String,
    pub next_region: u64,
    pub regions: u64,
    pub compared_bytes: u64,
    pub sent_bytes: u64,
    pub regions_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resyncs: Option<Vec<ResyncStatus>>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            resyncs: None,
        }
    }

    fn error(e: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(e.into()),
            resyncs: None,
        }
    }
}

/// Carries out one request.
pub fn handle(relay: &Relay, request: Request) -> Response {
    match request {
        Request::Resync { vm, disk, mode } => {
            let id = StreamId { vm, disk };
            match relay
                .ingest()
                .request_resync(&id, mode.into(), "requested by an operator")
            {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e),
            }
        }
        Request::Resyncs => Response {
            resyncs: Some(
                relay
                    .ingest()
                    .resync_progress
                    .views()
                    .into_iter()
                    .map(|(id, v)| ResyncStatus {
                        vm: id.vm,
                        disk: id.disk,
                        mode: v.mark.mode.name().into(),
                        next_region: v.mark.next_region,
                        regions: v.mark.regions,
                        compared_bytes: v.mark.compared_bytes,
                        sent_bytes: v.mark.sent_bytes,
                        regions_per_second: v.regions_per_second,
                        eta_seconds: v.eta.map(|d| d.as_secs_f64()),
                    })
                    .collect(),
            ),
            ..Response::ok()
        },
    }
}

/// Binds the control socket at `path` (replacing a stale one) and serves it.
pub fn serve(path: &Path, relay: Arc<Relay>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let limits = fbr_daemon::control::ControlLimits {
        max_clients: MAX_CLIENTS,
        max_line: MAX_LINE,
        timeout: TIMEOUT,
    };
    fbr_daemon::control::serve(path, limits, move |request: Result<Request, String>| {
        let relay = relay.clone();
        async move {
            match request {
                Ok(request) => handle(&relay, request),
                Err(e) => Response::error(e),
            }
        }
    })
}

/// Sends `request` to the relay whose control socket is `path` (the CLI's side).
pub async fn request(path: &Path, request: &Request) -> Result<Response, String> {
    fbr_daemon::control::request(path, "relay", request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: Request =
            serde_json::from_str(r#"{"op":"resync","vm":"vm1","disk":0,"mode":"delta"}"#)
                .unwrap_or(Request::Resyncs);
        assert_eq!(
            r,
            Request::Resync {
                vm: "vm1".into(),
                disk: 0,
                mode: ModeName::Delta
            }
        );
        for bad in [
            r#"{"op":"resync","vm":"vm1","disk":0,"mode":"sideways"}"#,
            r#"{"op":"resync","vm":"vm1","disk":0,"mode":"delta","extra":1}"#,
            r#"{"op":"reboot"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
