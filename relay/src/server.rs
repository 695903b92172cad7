//! The relay's shared state and agent-facing server: accepts agents over QUIC + mutual
//! TLS, checks their role, runs one [`crate::session`] per disk stream, and keeps one
//! [`crate::forwarder`] per stream the relay knows.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbr_metrics::relay::RelayMetrics;
use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{peer_identity, FrameWriter, PeerLink, Role};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cache::RelayCache;
use crate::egress::Egress;
use crate::forwarder::ForwarderState;
use crate::health::{HealthReport, HealthThresholds};
use crate::reduce::{KnownBlocks, WanConfig};

/// Forwarders that may hold a read window in memory at once.
const REDUCE_SLOTS: usize = 8;

/// Settings of a running relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Credit granted to each agent stream: bytes of records it may have
    /// unacknowledged. Acks come at cache-commit speed, so a few MiB suffice.
    pub agent_credit_bytes: u64,
    /// Health conditions and ingest throttling.
    pub health: HealthThresholds,
    /// How often health is evaluated (and throttling decided).
    pub health_interval: Duration,
    /// WAN reductions (coalescing, dedup, compression).
    pub wan: WanConfig,
    /// Most block hashes remembered as held by the master target (dedup).
    pub dedup_known_blocks: usize,
}

/// The latest health evaluation.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    pub report: HealthReport,
    pub at: Instant,
}

/// State shared by every connection and stream of the relay.
#[derive(Debug)]
pub struct Relay {
    pub config: RelayConfig,
    pub cache: Arc<RelayCache>,
    /// Rate limit and fair sharing of the WAN leg.
    pub egress: Arc<Egress>,
    /// The shared connection to the master target.
    pub upstream: PeerLink,
    pub metrics: RelayMetrics,
    /// Streams whose ingest is paused (cache pressure or quota); see [`crate::health`].
    pub throttled: watch::Sender<Arc<BTreeSet<StreamId>>>,
    /// Set by the health task ([`crate::observe`]).
    pub health: Mutex<Option<HealthSnapshot>>,
    /// Blocks the master target acknowledged holding: sent as references (dedup).
    pub known_blocks: KnownBlocks,
    /// Forwarders reducing a read window at once (bounds the memory of windows).
    pub reduce_slots: tokio::sync::Semaphore,
    /// One generation counter per disk: a new session bumps it, older ones stop.
    generations: Mutex<HashMap<StreamId, watch::Sender<u64>>>,
    forwarders: Mutex<HashMap<StreamId, Arc<ForwarderState>>>,
}

impl Relay {
    /// The relay's state; starts a forwarder for every stream recovered in the cache,
    /// so a backlog drains after a restart whether or not its agent comes back.
    pub fn new(
        config: RelayConfig,
        upstream: PeerLink,
        cache: Arc<RelayCache>,
        egress: Arc<Egress>,
    ) -> Arc<Self> {
        let relay = Arc::new(Relay {
            known_blocks: KnownBlocks::new(config.dedup_known_blocks),
            config,
            cache,
            egress,
            upstream,
            metrics: RelayMetrics::new(),
            throttled: watch::channel(Arc::new(BTreeSet::new())).0,
            health: Mutex::new(None),
            reduce_slots: tokio::sync::Semaphore::new(REDUCE_SLOTS),
            generations: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
        });
        // Every error code starts at zero, so rate() and alerts see the first error.
        for code in ErrorCode::KNOWN {
            relay
                .metrics
                .stream_errors_total
                .with_label_values(&[code.name()]);
        }
        for (id, disk_size) in relay.cache.streams() {
            relay.ensure_forwarder(&id, disk_size);
        }
        relay
    }

    /// The forwarder of `id`, started if it is not running.
    pub fn ensure_forwarder(
        self: &Arc<Self>,
        id: &StreamId,
        disk_size: u64,
    ) -> Arc<ForwarderState> {
        let mut map = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(id) {
            return f.clone();
        }
        let state = Arc::new(ForwarderState::new(disk_size));
        map.insert(id.clone(), state.clone());
        let span = tracing::info_span!("forward", stream = %id);
        tokio::spawn(
            crate::forwarder::run(self.clone(), id.clone(), state.clone()).instrument(span),
        );
        state
    }

    /// Every forwarder, with its stream.
    pub fn forwarders(&self) -> Vec<(StreamId, Arc<ForwarderState>)> {
        let map = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Counts a stream or connection ended with `code`.
    pub fn count_error(&self, code: ErrorCode) {
        self.metrics
            .stream_errors_total
            .with_label_values(&[code.name()])
            .inc();
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
        self.count_error(code);
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
                        relay.metrics.handshakes_refused_total.inc();
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
                self.count_error(ErrorCode::Unauthenticated);
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::Unauthenticated.as_u16() as u32),
                    why.as_bytes(),
                );
                return;
            }
        };
        self.metrics.agent_connections_total.inc();
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
