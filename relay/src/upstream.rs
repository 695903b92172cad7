//! The relay's link to the master target: one QUIC connection shared by every stream,
//! re-established on demand when it drops.

use std::net::SocketAddr;
use std::time::Duration;

use fbr_transport::{peer_identity, Role};

/// How long to wait for the master target to complete a handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the master target is and how to reach it.
#[derive(Debug)]
pub struct MasterTargetLink {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    /// The DNS name in the master target's certificate.
    server_name: String,
    current: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl MasterTargetLink {
    pub fn new(endpoint: quinn::Endpoint, addr: SocketAddr, server_name: String) -> Self {
        MasterTargetLink {
            endpoint,
            addr,
            server_name,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// A live connection to the master target, connecting if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, String> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect(self.addr, &self.server_name)
            .map_err(|e| format!("connecting to master target {}: {e}", self.addr))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("master target {} did not answer within {CONNECT_TIMEOUT:?}", self.addr))?
            .map_err(|e| format!("master target {}: {e}", self.addr))?;
        let id = peer_identity(&conn)?;
        if !id.has_role(Role::MasterTarget) {
            conn.close(0u32.into(), b"not a master target");
            return Err(format!(
                "peer at {} ({}) lacks the master-target role",
                self.addr, id.common_name
            ));
        }
        tracing::info!(addr = %self.addr, "connected to master target");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a stream for one disk.
    pub async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let conn = self.connection().await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(e) => {
                // The cached connection died between the check and the open: retry once
                // on a fresh one.
                tracing::warn!("master target stream open failed ({e}); reconnecting");
                let conn = self.connection().await?;
                conn.open_bi().await.map_err(|e| format!("opening master target stream: {e}"))
            }
        }
    }
}
