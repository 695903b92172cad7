//! The relay's agent-facing server: accepts agents over QUIC + mutual TLS, checks their
//! role, and runs one [`crate::session`] per disk stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{peer_identity, FrameWriter, PeerLink, Role};
use tokio::sync::watch;

/// Settings of a running relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Bytes of records each stream may hold between ingest and forwarder.
    pub queue_bytes_per_stream: u32,
}

/// Counters a later issue exports to Prometheus; logged at shutdown for now.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub handshakes_refused: AtomicU64,
    pub records_ingested: AtomicU64,
    pub logical_bytes_ingested: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    /// Streams refused or closed with an error, by wire code.
    pub stream_errors: Mutex<HashMap<u16, u64>>,
}

/// State shared by every connection and stream of the relay.
#[derive(Debug)]
pub struct Relay {
    pub config: RelayConfig,
    /// The shared connection to the master target.
    pub upstream: PeerLink,
    pub counters: Counters,
    /// One generation counter per disk: a new session bumps it, older ones stop.
    generations: Mutex<HashMap<StreamId, watch::Sender<u64>>>,
}

impl Relay {
    pub fn new(config: RelayConfig, upstream: PeerLink) -> Arc<Self> {
        Arc::new(Relay {
            config,
            upstream,
            counters: Counters::default(),
            generations: Mutex::new(HashMap::new()),
        })
    }

    /// Makes the caller the current session of `id`; the receiver changes when a newer
    /// session claims it.
    pub fn claim_stream(&self, id: &StreamId) -> watch::Receiver<u64> {
        let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        let tx = gens
            .entry(id.clone())
            .or_insert_with(|| watch::channel(0).0);
        tx.send_modify(|g| *g += 1);
        let mut rx = tx.subscribe();
        rx.borrow_and_update();
        rx
    }

    /// Refuses or closes a stream with a coded error, and counts it.
    pub async fn refuse(
        &self,
        writer: &mut FrameWriter,
        id: Option<&StreamId>,
        code: ErrorCode,
        msg: impl Into<String>,
    ) {
        let msg = msg.into();
        match id {
            Some(id) => tracing::warn!(stream = %id, "closing stream: {code}: {msg}"),
            None => tracing::warn!("refusing stream: {code}: {msg}"),
        }
        {
            let mut m = self
                .counters
                .stream_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *m.entry(code.as_u16()).or_default() += 1;
        }
        writer.refuse(&Frame::error(code, msg)).await;
    }

    /// Accepts agent connections on `endpoint` until it is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let relay = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => relay.serve_connection(conn, remote).await,
                    Err(e) => {
                        relay
                            .counters
                            .handshakes_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, "connection refused during handshake: {e}");
                    }
                }
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection, remote: SocketAddr) {
        let peer = match peer_identity(&conn) {
            Ok(p) if p.has_role(Role::Agent) => Arc::new(p),
            other => {
                let why = match other {
                    Ok(p) => format!("certificate {:?} lacks urn:fbr:role:agent", p.common_name),
                    Err(e) => e,
                };
                tracing::warn!(%remote, "refusing connection: {why}");
                let mut m = self
                    .counters
                    .stream_errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *m.entry(ErrorCode::Unauthenticated.as_u16()).or_default() += 1;
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::Unauthenticated.as_u16() as u32),
                    why.as_bytes(),
                );
                return;
            }
        };
        self.counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%remote, cn = %peer.common_name, vms = ?peer.vms, "agent connected");
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let relay = self.clone();
                    let peer = peer.clone();
                    tokio::spawn(crate::session::serve_stream(relay, peer, send, recv));
                }
                Err(e) => {
                    tracing::info!(%remote, "agent connection ended: {e}");
                    return;
                }
            }
        }
    }
}
