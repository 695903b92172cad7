//! A self-healing client connection to one peer of a known role.
//!
//! Used by the relay (to its master target) and by agents (to their relay): every disk
//! stream asks the link for a stream; the link reuses its live connection or makes a new
//! one, and checks that the peer's certificate carries the expected role.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::{peer_identity, Role};

/// How long to wait for a handshake to complete.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the peer could not be reached. Every case is the peer's side or the network's,
/// except [`LinkError::WrongRole`], a certificate problem on the peer that waiting
/// does not fix (it is still retried: an operator may replace the certificate).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to {role} {addr}: {reason}")]
    Connect {
        role: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("{role} {addr} did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout {
        role: &'static str,
        addr: SocketAddr,
    },
    #[error("peer at {addr} ({common_name}) lacks the {role} role")]
    WrongRole {
        role: &'static str,
        addr: SocketAddr,
        common_name: String,
    },
    #[error("opening a stream to {addr}: {reason}")]
    OpenStream { addr: SocketAddr, reason: String },
}

/// Where a peer is, how to name it, and what role it must prove.
#[derive(Debug)]
pub struct PeerLink {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    /// The DNS name in the peer's certificate.
    server_name: String,
    role: Role,
    current: tokio::sync::Mutex<Option<quinn::Connection>>,
    /// What health checks and metrics read without waiting for a connect in progress.
    observed: Mutex<Observed>,
}

#[derive(Debug)]
struct Observed {
    conn: Option<quinn::Connection>,
    /// Since when the peer has been unreachable (`None` while connected).
    down_since: Option<Instant>,
    /// UDP bytes sent on connections that have since been replaced.
    retired_udp_tx_bytes: u64,
    /// Datagrams received on the current connection when last looked, and when that
    /// count last moved: a connection that hears nothing is not "connected", whatever
    /// quinn says before its idle timeout.
    rx_datagrams: u64,
    last_heard: Instant,
}

/// A connection silent this long counts as down from when it was last heard: keep-alives
/// (every quarter of the idle timeout, 7.5 s by default) draw an answer from a live peer,
/// so two of them unanswered mean the path is gone, well before quinn's idle timeout
/// closes the connection.
const SILENT_AFTER: Duration = Duration::from_secs(15);

/// The state of a link, for health checks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    pub connected: bool,
    /// How long the peer has been unreachable (or never reached), if it is.
    pub down_for: Option<Duration>,
    /// UDP payload bytes sent to the peer over the link's lifetime (all connections).
    pub udp_tx_bytes: u64,
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
            observed: Mutex::new(Observed {
                conn: None,
                down_since: Some(Instant::now()),
                retired_udp_tx_bytes: 0,
                rx_datagrams: 0,
                last_heard: Instant::now(),
            }),
        }
    }

    fn lock_observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the peer is connected (and heard from lately), since when it is not, and
    /// bytes sent to it. Call it regularly (health does, every tick): silence is
    /// measured between calls.
    pub fn status(&self) -> LinkStatus {
        let mut o = self.lock_observed();
        let now = Instant::now();
        let open = o.conn.as_ref().filter(|c| c.close_reason().is_none());
        let rx = open.map(|c| c.stats().udp_rx.datagrams);
        let connected = match rx {
            Some(rx) => {
                if rx != o.rx_datagrams {
                    o.rx_datagrams = rx;
                    o.last_heard = now;
                }
                now.duration_since(o.last_heard) < SILENT_AFTER
            }
            None => false,
        };
        if connected {
            o.down_since = None;
        } else if o.down_since.is_none() {
            // Down since it was last heard (a silent connection), or since now.
            o.down_since = Some(if rx.is_some() { o.last_heard } else { now });
        }
        LinkStatus {
            connected,
            down_for: o.down_since.map(|t| t.elapsed()),
            udp_tx_bytes: o.retired_udp_tx_bytes
                + o.conn.as_ref().map_or(0, |c| c.stats().udp_tx.bytes),
        }
    }

    fn observe_failure(&self) {
        let mut o = self.lock_observed();
        if o.down_since.is_none() {
            o.down_since = Some(Instant::now());
        }
    }

    fn observe_connected(&self, conn: &quinn::Connection) {
        let mut o = self.lock_observed();
        if o.conn.as_ref().map(|c| c.stable_id()) != Some(conn.stable_id()) {
            if let Some(old) = o.conn.replace(conn.clone()) {
                o.retired_udp_tx_bytes += old.stats().udp_tx.bytes;
            }
            o.rx_datagrams = conn.stats().udp_rx.datagrams;
            o.last_heard = Instant::now();
            o.down_since = None;
        }
        // The same connection handed out again says nothing of whether the peer still
        // answers: `status` judges that from what it receives.
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A live connection to the peer, connecting if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, LinkError> {
        let result = self.connect_or_reuse().await;
        match &result {
            Ok(conn) => self.observe_connected(conn),
            Err(_) => self.observe_failure(),
        }
        result
    }

    async fn connect_or_reuse(&self) -> Result<quinn::Connection, LinkError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let (role, addr) = (self.role.as_str(), self.addr);
        let connect = |reason: String| LinkError::Connect { role, addr, reason };
        let connecting = self
            .endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| connect(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| LinkError::Timeout { role, addr })?
            .map_err(|e| connect(e.to_string()))?;
        let id = peer_identity(&conn).map_err(connect)?;
        if !id.has_role(self.role) {
            conn.close(0u32.into(), b"wrong role");
            return Err(LinkError::WrongRole {
                role,
                addr,
                common_name: id.common_name,
            });
        }
        tracing::info!(addr = %self.addr, "connected to {role}");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Closes the connection (if one is up) with `reason`: every stream on it ends at
    /// once. The link reconnects if used again; a caller that moved away does not.
    /// A connect in progress is left to finish or time out on its own.
    pub async fn close(&self, reason: &str) {
        let current = tokio::time::timeout(Duration::from_millis(100), self.current.lock()).await;
        if let Ok(mut current) = current {
            if let Some(c) = current.take() {
                c.close(0u32.into(), reason.as_bytes());
            }
        }
    }

    /// Opens a bidirectional stream (one disk), reconnecting once if the cached
    /// connection turns out to be dead.
    pub async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        let conn = self.connection().await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!("stream open to {} failed ({e}); reconnecting", self.addr);
                let conn = self.connection().await?;
                conn.open_bi().await.map_err(|e| LinkError::OpenStream {
                    addr: self.addr,
                    reason: e.to_string(),
                })
            }
        }
    }
}
