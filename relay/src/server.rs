//! The relay as one piece: its ingest side ([`IngestContext`]), its forwarders
//! ([`RelayForwarders`], the WAN side), the link to the master target, and the latest
//! health evaluation; and the agent-facing server that accepts agents over QUIC +
//! mutual TLS, checks their role and runs one [`crate::ingest`] session per disk stream.
//!
//! Dependencies point one way: this module builds and wires the sides; the ingest side
//! knows the forwarders (for positions and disk sizes), the forwarders know neither.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbr_metrics::relay::RelayMetrics;
use fbr_protocol::ErrorCode;
use fbr_transport::{require_role, PeerLink, Role};

use crate::cache::RelayCache;
use crate::egress::Egress;
use crate::forwarder::{ForwardContext, ForwardMetrics, Forwarders};
use crate::health::{HealthReport, HealthThresholds};
use crate::ingest::{IngestContext, RelayForwarders};
use crate::reduce::WanConfig;

/// Streams one agent connection may have open at once. An agent is one VM: an Azure VM
/// has at most 64 data disks and its OS disk, each with a replication stream and at
/// most one resync stream. An agent asking for more waits for one to close (QUIC flow
/// control), and a thousand agent connections cost quinn about 20 MiB of stream state,
/// not the 300 MiB a limit of 4,096 per connection would.
pub const AGENT_STREAMS_PER_CONNECTION: u32 = 256;

/// Settings of a running relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Credit granted to each agent stream: bytes of records it may have
    /// unacknowledged. Acks come at cache-commit speed, so a few MiB suffice.
    pub agent_credit_bytes: u64,
    /// Credit of all agent streams together: each open stream gets its fair share, at
    /// most `agent_credit_bytes` ([`fbr_transport::credit`]).
    pub agent_memory_bytes: u64,
    /// Health conditions and ingest throttling.
    pub health: HealthThresholds,
    /// How often health is evaluated (and throttling decided).
    pub health_interval: Duration,
    /// WAN reductions (coalescing, dedup, compression).
    pub wan: WanConfig,
    /// Most block hashes remembered as held by the master target (dedup).
    pub dedup_known_blocks: usize,
    /// What agent-side peers get before they are cut off.
    pub peer_limits: PeerLimits,
}

/// What the relay gives agent-side peers (honest or not) before it cuts them off; each
/// cut is counted in `fbr_relay_peers_cut_off_total{limit}` or, for streams,
/// `fbr_relay_stream_errors_total{code="too_slow"}`.
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    /// Connections (established or handshaking) at once; more are refused at once
    /// (`connections`). One agent holds one connection for all its disks.
    pub max_connections: usize,
    /// Handshakes in progress at once; more are refused (`handshakes`): a flood of
    /// handshakes without a valid certificate costs a bounded amount of CPU and memory.
    pub max_handshakes: usize,
    /// An established connection with no stream open this long is closed
    /// (`idle_connection`).
    pub idle_connection: Duration,
    /// A frame begun must be complete within this (`too_slow`); `None`: unlimited.
    pub frame_timeout: Option<Duration>,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_connections: 1024,
            max_handshakes: 256,
            idle_connection: Duration::from_secs(60),
            frame_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Counts one holder of a limited resource while alive.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Held(count.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The latest health evaluation.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    pub report: HealthReport,
    pub at: Instant,
}

/// A running relay: both sides, and what the health task and the endpoints read.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    ingest: Arc<IngestContext>,
    forwarders: Arc<RelayForwarders>,
    /// The shared connection to the master target.
    upstream: Arc<PeerLink>,
    /// Set by the health task ([`crate::observe`]).
    health: Mutex<Option<HealthSnapshot>>,
    /// The heartbeats to the configuration server, when the relay has one.
    config_server: std::sync::OnceLock<Arc<Mutex<fbr_enroll::heartbeat::HeartbeatStatus>>>,
    /// Why the failback controller cannot save its state, while it cannot.
    controller_store_error: Mutex<Option<String>>,
}

impl Relay {
    /// Wires the relay; starts a forwarder for every stream recovered in the cache, so a
    /// backlog drains after a restart whether or not its agent comes back.
    pub fn new(
        config: RelayConfig,
        upstream: PeerLink,
        cache: Arc<RelayCache>,
        egress: Arc<Egress>,
    ) -> Arc<Self> {
        let metrics = RelayMetrics::new();
        let upstream = Arc::new(upstream);
        let forward = ForwardContext::new(
            upstream.clone(),
            cache.clone(),
            egress,
            config.wan,
            config.dedup_known_blocks,
            ForwardMetrics {
                replication_lag_seconds: metrics.replication_lag_seconds.clone(),
                records_forwarded_total: metrics.records_forwarded_total.clone(),
                unknown_references_total: metrics.unknown_references_total.clone(),
                streams_moved_away_total: metrics.streams_moved_away_total.clone(),
            },
        );
        let forwarders = Arc::new(Forwarders::new(Arc::new(forward)));
        let credit_gauge = metrics.agent_credit_bytes.clone();
        let credit = fbr_transport::credit::CreditShare::new(
            config.agent_memory_bytes,
            crate::ingest::MIN_AGENT_CREDIT,
            config.agent_credit_bytes,
            Box::new(move |share| credit_gauge.set(share as i64)),
        );
        let ingest = Arc::new(IngestContext::new(
            cache.clone(),
            forwarders.clone(),
            metrics,
            credit,
            config.peer_limits.frame_timeout,
        ));
        for (id, disk_size) in cache.streams() {
            forwarders.ensure(&id, disk_size);
        }
        Arc::new(Relay {
            config,
            ingest,
            forwarders,
            upstream,
            health: Mutex::new(None),
            config_server: std::sync::OnceLock::new(),
            controller_store_error: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The ingest side (agent sessions, the cache, throttling).
    pub fn ingest(&self) -> &Arc<IngestContext> {
        &self.ingest
    }

    /// The WAN side (one forwarder per stream).
    pub fn forwarders(&self) -> &Arc<RelayForwarders> {
        &self.forwarders
    }

    /// The connection to the master target.
    pub fn upstream(&self) -> &Arc<PeerLink> {
        &self.upstream
    }

    pub fn metrics(&self) -> &RelayMetrics {
        &self.ingest.metrics
    }

    /// The latest health evaluation, if the health task has run.
    pub fn health(&self) -> Option<HealthSnapshot> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the heartbeats' status part of the relay's health (once, at start).
    pub fn watch_config_server(&self, status: Arc<Mutex<fbr_enroll::heartbeat::HeartbeatStatus>>) {
        let _ = self.config_server.set(status);
    }

    /// The heartbeats' status, when the relay reports to a configuration server.
    pub fn config_server_status(&self) -> Option<fbr_enroll::heartbeat::HeartbeatStatus> {
        self.config_server
            .get()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// What the failback controller's last save said (health reads it).
    pub fn set_controller_store_error(&self, error: Option<String>) {
        *self
            .controller_store_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn controller_store_error(&self) -> Option<String> {
        self.controller_store_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a health evaluation (the health task).
    pub fn set_health(&self, snapshot: HealthSnapshot) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
    }

    /// Accepts agent connections on `endpoint` until it is closed, within
    /// [`PeerLimits`].
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let limits = self.config.peer_limits;
        let handshaking = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let cut_off = |limit: &str| {
            self.ingest
                .metrics
                .peers_cut_off_total
                .with_label_values(&[limit])
                .inc()
        };
        while let Some(incoming) = endpoint.accept().await {
            let remote = incoming.remote_address();
            let in_handshake = handshaking.load(Ordering::Relaxed);
            if in_handshake >= limits.max_handshakes {
                cut_off("handshakes");
                tracing::debug!(%remote, "refusing a connection: {in_handshake} handshakes in progress");
                incoming.refuse();
                continue;
            }
            if in_handshake + connected.load(Ordering::Relaxed) >= limits.max_connections {
                cut_off("connections");
                // Counted; not logged one by one (a flood would fill the log).
                tracing::debug!(%remote, "refusing a connection: at the limit of {} (ingest.max_connections)", limits.max_connections);
                incoming.refuse();
                continue;
            }
            let ingest = self.ingest.clone();
            let handshake = Held::new(&handshaking);
            let connected = connected.clone();
            tokio::spawn(async move {
                let established = incoming.await;
                drop(handshake);
                match established {
                    Ok(conn) => {
                        let _held = Held::new(&connected);
                        serve_connection(ingest, conn, remote, limits.idle_connection).await
                    }
                    Err(e) => {
                        ingest.metrics.handshakes_refused_total.inc();
                        tracing::warn!(%remote, "connection refused during handshake: {e}");
                    }
                }
            });
        }
    }
}

/// One agent connection: the role check, then a session per disk stream; closed once
/// it has had no stream open for `idle_after`.
async fn serve_connection(
    ingest: Arc<IngestContext>,
    conn: quinn::Connection,
    remote: SocketAddr,
    idle_after: Duration,
) {
    let peer = match require_role(&conn, Role::Agent) {
        Ok(p) => Arc::new(p),
        Err(why) => {
            tracing::warn!(%remote, "refusing connection: {why}");
            ingest
                .metrics
                .stream_errors_total
                .count(ErrorCode::Unauthenticated);
            return;
        }
    };
    ingest.metrics.agent_connections_total.inc();
    tracing::info!(%remote, cn = %peer.common_name, vms = peer.entitlement.vms.len(), "agent connected");
    let open_streams = Arc::new(AtomicUsize::new(0));
    let mut idle_since = Some(Instant::now());
    let mut check = tokio::time::interval((idle_after / 4).max(Duration::from_millis(100)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let (ingest, peer) = (ingest.clone(), peer.clone());
                    let held = Held::new(&open_streams);
                    idle_since = None;
                    tokio::spawn(async move {
                        crate::ingest::serve_stream(ingest, peer, send, recv).await;
                        drop(held);
                    });
                }
                Err(e) => {
                    tracing::info!(%remote, "agent connection ended: {e}");
                    return;
                }
            },
            _ = check.tick() => {
                if open_streams.load(Ordering::Relaxed) > 0 {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= idle_after {
                    ingest.metrics.peers_cut_off_total.with_label_values(&["idle_connection"]).inc();
                    tracing::info!(%remote, "closing an agent connection with no stream for {} s", idle_after.as_secs());
                    conn.close(quinn::VarInt::from_u32(0), b"idle: no stream open");
                    return;
                }
            }
        }
    }
}
