//! The master target's control socket (`fbr_daemon::control`: a Unix socket, mode 0600,
//! one JSON request and answer per line): test failovers while replication goes on.
//!
//! ```text
//! {"op":"test_failover_create","group":"g","tag":42,"name":"drill"} -> {"ok":true,"test_failover":{...}}
//! {"op":"test_failover_list"}                                      -> {"ok":true,"test_failovers":[...]}
//! {"op":"test_failover_delete","name":"drill"}                     -> {"ok":true,"test_failover":{...}}
//! {"op":"points"}                                                  -> {"ok":true,"points":{...}}
//! anything else                                                    -> {"ok":false,"error":"..."}
//! ```
//!
//! `master-target test-failover create|list|delete` are its clients.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fbr_daemon::control::ControlLimits;
use serde::{Deserialize, Serialize};

use crate::accept::MasterTarget;
use crate::testcopy::{self, TestFailover};

/// A test failover copies disks: a request may take minutes.
pub const LIMITS: ControlLimits = ControlLimits {
    max_clients: 4,
    max_line: 4096,
    timeout: Duration::from_secs(3600),
};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    TestFailoverCreate {
        group: String,
        tag: u64,
        name: String,
    },
    TestFailoverList,
    TestFailoverDelete {
        name: String,
    },
    /// The recovery points, as `master-target points --json` lists them.
    Points,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<TestFailover>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_failovers: Option<Vec<TestFailover>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<serde_json::Value>,
}

impl Response {
    fn from(result: Result<Response, String>) -> Self {
        result.unwrap_or_else(|e| Response {
            ok: false,
            error: Some(e),
            test_failover: None,
            test_failovers: None,
            points: None,
        })
    }

    fn one(tf: TestFailover) -> Self {
        Response {
            ok: true,
            error: None,
            test_failover: Some(tf),
            test_failovers: None,
            points: None,
        }
    }
}

/// Carries out one request.
pub async fn handle(mt: &Arc<MasterTarget>, request: Request) -> Response {
    let data = mt.files.root().to_path_buf();
    Response::from(match request {
        Request::TestFailoverCreate { group, tag, name } => {
            let made = testcopy::create(mt, &group, tag, &name).await;
            if let Ok(tf) = &made {
                tracing::info!(name = %tf.name, group = %tf.group, tag = tf.tag_id, seconds = tf.seconds, "test failover created");
            }
            made.map(Response::one)
        }
        Request::TestFailoverList => testcopy::list(&data).map(|all| Response {
            ok: true,
            error: None,
            test_failover: None,
            test_failovers: Some(all),
            points: None,
        }),
        Request::Points => mt
            .store
            .recovery_points()
            .map_err(|e| e.to_string())
            .and_then(|p| {
                serde_json::to_value(crate::points::PointsListing::new(p))
                    .map_err(|e| e.to_string())
            })
            .map(|listing| Response {
                ok: true,
                error: None,
                test_failover: None,
                test_failovers: None,
                points: Some(listing),
            }),
        Request::TestFailoverDelete { name } => testcopy::delete(&data, &name).map(Response::one),
    })
}

/// Binds the control socket at `path` and serves it.
pub fn serve(path: &Path, mt: Arc<MasterTarget>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    fbr_daemon::control::serve(path, LIMITS, move |request: Result<Request, String>| {
        let mt = mt.clone();
        async move {
            match request {
                Ok(r) => handle(&mt, r).await,
                Err(e) => Response::from(Err(e)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: Result<Request, _> =
            serde_json::from_str(r#"{"op":"test_failover_create","group":"g","tag":4,"name":"d"}"#);
        assert_eq!(
            r.ok(),
            Some(Request::TestFailoverCreate {
                group: "g".into(),
                tag: 4,
                name: "d".into()
            })
        );
        for bad in [
            r#"{"op":"test_failover_create","group":"g","tag":-1,"name":"d"}"#,
            r#"{"op":"test_failover_delete","name":"d","extra":1}"#,
            r#"{"op":"format_disks"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
