//! A self-healing client connection to one peer of a known role.
//!
//! Used by the relay (to its master target) and by agents (to their relay): every disk
//! stream asks the link for a stream; the link reuses its live connection or makes a new
//! one, and checks that the peer's certificate carries the expected role.

use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::{peer_identity, Role};

/// How long to wait for a handshake to complete.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a peer is, how to name it, and what role it must prove.
#[derive(Debug)]
pub struct PeerLink {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    /// The DNS name in the peer's certificate.
    server_name: String,
    role: Role,
    current: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl PeerLink {
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: String,
        role: Role,
    ) -> Self {
        PeerLink {
            endpoint,
            addr,
            server_name,
            role,
            current: tokio::sync::Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A live connection to the peer, connecting if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, String> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let role = self.role.as_str();
        let connecting = self
            .endpoint
            .connect(self.addr, &self.server_name)
            .map_err(|e| format!("connecting to {role} {}: {e}", self.addr))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                format!(
                    "{role} {} did not answer within {CONNECT_TIMEOUT:?}",
                    self.addr
                )
            })?
            .map_err(|e| format!("{role} {}: {e}", self.addr))?;
        let id = peer_identity(&conn)?;
        if !id.has_role(self.role) {
            conn.close(0u32.into(), b"wrong role");
            return Err(format!(
                "peer at {} ({}) lacks the {role} role",
                self.addr, id.common_name
            ));
        }
        tracing::info!(addr = %self.addr, "connected to {role}");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a bidirectional stream (one disk), reconnecting once if the cached
    /// connection turns out to be dead.
    pub async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let conn = self.connection().await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!("stream open to {} failed ({e}); reconnecting", self.addr);
                let conn = self.connection().await?;
                conn.open_bi()
                    .await
                    .map_err(|e| format!("opening stream to {}: {e}", self.addr))
            }
        }
    }
}
