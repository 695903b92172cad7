//! The relay's metrics. Counters are incremented where things happen; gauges are set
//! from the relay's state just before each scrape (`fbr_relay::observe`).
//!
//! Byte stages (`fbr_relay_bytes_total{stage}`), in the order data passes them:
//!
//! | stage          | what is counted                                                   |
//! |----------------|-------------------------------------------------------------------|
//! | `ingested`     | record frames received from agents (headers included)             |
//! | `logical`      | bytes of disk those records write or zero (at ingest)             |
//! | `coalesced`    | logical bytes forwarded once superseded writes are left out       |
//! | `zero_elided`  | of those, bytes still carried as data (zero ranges/blocks removed)|
//! | `deduplicated` | of those, bytes sent as literal blocks (references removed)       |
//! | `compressed`   | WAN batch payloads after LZ4 (what the relay sends, before QUIC)  |
//! | `wire`         | UDP payload sent to the master target (QUIC + TLS overhead, retransmissions) |
//!
//! `fbr_relay_vm_bytes_total{vm,stage}` has the forwarding stages per VM, `logical`
//! counted when forwarded.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::{register, register_process_metrics, StreamErrors};

/// The `limit` labels of `fbr_relay_peers_cut_off_total` (each starts at zero).
pub const PEER_LIMITS: [&str; 3] = ["handshakes", "connections", "idle_connection"];

/// Every metric of a relay, on its own registry.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    pub registry: Registry,
    pub agent_connections_total: IntCounter,
    pub handshakes_refused_total: IntCounter,
    /// Agent-side connections cut off by a limit that protects the relay, by limit:
    /// `handshakes` (too many handshakes in progress), `connections` (at the connection
    /// cap), `idle_connection` (no stream for `ingest.idle_connection_seconds`).
    pub peers_cut_off_total: IntCounterVec,
    pub records_ingested_total: IntCounter,
    pub records_forwarded_total: IntCounter,
    pub duplicates_skipped_total: IntCounter,
    /// Bytes per stage, see the module's table.
    pub bytes_total: IntCounterVec,
    /// Forwarding stages per VM.
    pub vm_bytes_total: IntCounterVec,
    /// Blocks sent as a reference instead of their bytes.
    pub dedup_hits_total: IntCounter,
    /// Times the master target could not resolve a reference (data resent).
    pub unknown_references_total: IntCounter,
    pub batches_total: IntCounter,
    /// Batches by the codec their body travelled with (zstd, lz4, none).
    pub codec_batches_total: IntCounterVec,
    /// Batch body bytes (before compression) by codec (zstd, lz4).
    pub codec_body_bytes_total: IntCounterVec,
    /// Bytes reserved by the sessions' zstd compression contexts.
    pub codec_memory_bytes: IntGauge,
    /// Batches not tried for LZ4 because recent ones did not compress.
    pub compression_skipped_batches_total: IntCounter,
    /// CPU time spent compressing batches.
    pub compression_seconds_total: prometheus::Counter,
    pub dedup_known_blocks: IntGauge,
    /// Streams refused or closed with an error, by wire error code name.
    pub stream_errors_total: StreamErrors,
    /// Time from a record's durable append in the cache to the master target's ack.
    pub replication_lag_seconds: Histogram,
    pub agent_streams: IntGauge,
    /// The credit each open agent stream is granted now (its share of `ingest.memory`).
    pub agent_credit_bytes: IntGauge,
    pub upstream_connected: IntGauge,
    /// Age of the newest recovery point (tag) of a VM durable at the master target.
    pub rpo_seconds: GaugeVec,
    pub cache_used_bytes: IntGauge,
    pub cache_capacity_bytes: IntGauge,
    pub cache_backlog_bytes: IntGaugeVec,
    pub cache_oldest_backlog_age_seconds: Gauge,
    pub cache_full: IntGauge,
    /// The egress limit in force (`+Inf` when unlimited).
    pub egress_limit_bytes_per_second: Gauge,
    pub ingest_throttled_streams: IntGauge,
    /// 0 healthy, 1 warning, 2 critical.
    pub health_state: IntGauge,
    /// Severity of each health condition (0 none, 1 warning, 2 critical).
    pub health_condition: IntGaugeVec,
    /// Per disk, while it resyncs: fraction done, bytes compared and sent, and the ETA.
    pub resync_progress_ratio: GaugeVec,
    pub resync_compared_bytes: IntGaugeVec,
    pub resync_sent_bytes: IntGaugeVec,
    pub resync_eta_seconds: GaugeVec,
    pub resyncs_completed_total: IntCounter,
    /// The failback controller's jobs, by state (running, succeeded, failed, cancelled).
    pub controller_jobs: IntGaugeVec,
    /// Steps the controller ran, by step and outcome (done, failed).
    pub controller_steps_total: IntCounterVec,
    /// Resyncs the relay asked agents for (cache corruption, an operator).
    pub resyncs_requested_total: IntCounter,
    /// Streams whose VM moved to this relay from another one, by placement.
    pub streams_moved_in_total: IntCounter,
    /// Streams whose VM moved to another relay: this relay's copy was forgotten.
    pub streams_moved_away_total: IntCounter,
    pub hash_streams_total: IntCounter,
    /// The children of `bytes_total`, one per [`BYTE_STAGES`] entry, resolved once: the
    /// ingest path adds to them per record, without a label lookup.
    stage_counters: Vec<IntCounter>,
}

/// The stage label values of `fbr_relay_bytes_total`.
pub const BYTE_STAGES: [&str; 7] = [
    "ingested",
    "logical",
    "coalesced",
    "zero_elided",
    "deduplicated",
    "compressed",
    "wire",
];

impl RelayMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            register(
                &r,
                IntCounter::with_opts(Opts::new(name, help)).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            register(
                &r,
                IntGauge::with_opts(Opts::new(name, help)).expect("valid metric"),
            )
        };
        let mut m = RelayMetrics {
            agent_connections_total: counter(
                "fbr_relay_agent_connections_total",
                "Agent connections accepted (TLS handshake and role check passed).",
            ),
            handshakes_refused_total: counter(
                "fbr_relay_handshakes_refused_total",
                "Connections that failed the TLS handshake (e.g. a foreign CA).",
            ),
            peers_cut_off_total: {
                let vec = register(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "fbr_relay_peers_cut_off_total",
                            "Agent-side connections refused or closed by a limit that protects the relay: handshakes (too many in progress), connections (at the cap), idle_connection (no stream open for too long).",
                        ),
                        &["limit"],
                    )
                    .expect("valid metric"),
                );
                for limit in PEER_LIMITS {
                    vec.with_label_values(&[limit]);
                }
                vec
            },
            records_ingested_total: counter(
                "fbr_relay_records_ingested_total",
                "Records accepted from agents and queued for the cache.",
            ),
            records_forwarded_total: counter(
                "fbr_relay_records_forwarded_total",
                "Records sent to the master target (resends after a reconnect included).",
            ),
            duplicates_skipped_total: counter(
                "fbr_relay_duplicates_skipped_total",
                "Records an agent resent that the relay already had.",
            ),
            bytes_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fbr_relay_bytes_total",
                        "Bytes per stage of the data path: ingested, logical, coalesced, zero_elided, deduplicated, compressed, wire.",
                    ),
                    &["stage"],
                )
                .expect("valid metric"),
            ),
            codec_batches_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fbr_relay_codec_batches_total",
                        "WAN batches by the codec their body travelled with: zstd (the session's streaming context), lz4 or none.",
                    ),
                    &["codec"],
                )
                .expect("valid metric"),
            ),
            codec_body_bytes_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fbr_relay_codec_body_bytes_total",
                        "Batch body bytes, before compression, by the codec that compressed them (zstd, lz4).",
                    ),
                    &["codec"],
                )
                .expect("valid metric"),
            ),
            codec_memory_bytes: gauge(
                "fbr_relay_codec_memory_bytes",
                "Bytes reserved by the sessions' zstd compression contexts (capped by wan.codec_memory).",
            ),
            vm_bytes_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fbr_relay_vm_bytes_total",
                        "Bytes per forwarding stage and VM: logical, coalesced, zero_elided, deduplicated, compressed.",
                    ),
                    &["vm", "stage"],
                )
                .expect("valid metric"),
            ),
            dedup_hits_total: counter(
                "fbr_relay_dedup_hits_total",
                "4 KiB blocks sent to the master target as a SHA-256 reference instead of their bytes.",
            ),
            unknown_references_total: counter(
                "fbr_relay_unknown_references_total",
                "Times the master target could not resolve a reference and the relay resent the data.",
            ),
            batches_total: counter(
                "fbr_relay_batches_total",
                "WAN batches sent to the master target.",
            ),
            compression_skipped_batches_total: counter(
                "fbr_relay_compression_skipped_batches_total",
                "Batches sent without trying LZ4 because recent batches of the stream did not compress.",
            ),
            compression_seconds_total: register(
                &r,
                prometheus::Counter::with_opts(Opts::new(
                    "fbr_relay_compression_seconds_total",
                    "Time spent compressing WAN batches with LZ4 (measured around each batch on its blocking thread).",
                ))
                .expect("valid metric"),
            ),
            dedup_known_blocks: gauge(
                "fbr_relay_dedup_known_blocks",
                "Block hashes the relay knows the master target holds.",
            ),
            stream_errors_total: StreamErrors::register(&r, "fbr_relay_stream_errors_total"),
            replication_lag_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "fbr_relay_replication_lag_seconds",
                        "Time from a record's durable append in the relay cache to its acknowledgement by the master target.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            agent_streams: gauge(
                "fbr_relay_agent_streams",
                "Disk streams with an agent session open now.",
            ),
            agent_credit_bytes: gauge(
                "fbr_relay_agent_credit_bytes",
                "Credit granted to each open agent stream now: its fair share of ingest.memory (a power of two, from 256 KiB to ingest.credit).",
            ),
            upstream_connected: gauge(
                "fbr_relay_upstream_connected",
                "1 when the relay has a live connection to its master target.",
            ),
            rpo_seconds: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "fbr_relay_rpo_seconds",
                        "Age of the newest recovery point of the VM durable at the master target (oldest over its disks).",
                    ),
                    &["vm"],
                )
                .expect("valid metric"),
            ),
            cache_used_bytes: gauge("fbr_relay_cache_used_bytes", "Bytes of cache segment files."),
            cache_capacity_bytes: gauge(
                "fbr_relay_cache_capacity_bytes",
                "Most bytes the cache may use.",
            ),
            cache_backlog_bytes: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "fbr_relay_cache_backlog_bytes",
                        "Bytes of durable cached records the master target has not acknowledged.",
                    ),
                    &["vm"],
                )
                .expect("valid metric"),
            ),
            cache_oldest_backlog_age_seconds: register(
                &r,
                Gauge::with_opts(Opts::new(
                    "fbr_relay_cache_oldest_backlog_age_seconds",
                    "Age of the oldest cached record not yet acknowledged by the master target (0 without backlog).",
                ))
                .expect("valid metric"),
            ),
            cache_full: gauge(
                "fbr_relay_cache_full",
                "1 while the cache is full and ingest waits for the forwarders to free space.",
            ),
            egress_limit_bytes_per_second: register(
                &r,
                Gauge::with_opts(Opts::new(
                    "fbr_relay_egress_limit_bytes_per_second",
                    "Egress rate limit in force by the bandwidth schedule (+Inf when unlimited).",
                ))
                .expect("valid metric"),
            ),
            ingest_throttled_streams: gauge(
                "fbr_relay_ingest_throttled_streams",
                "Streams whose ingest is paused by cache pressure or their backlog quota.",
            ),
            health_state: gauge(
                "fbr_relay_health_state",
                "Overall health: 0 healthy, 1 warning, 2 critical.",
            ),
            health_condition: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "fbr_relay_health_condition",
                        "Severity of each health condition: 0 none, 1 warning, 2 critical.",
                    ),
                    &["condition"],
                )
                .expect("valid metric"),
            ),
            resync_progress_ratio: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "fbr_relay_resync_progress_ratio",
                        "Fraction of a resyncing disk's regions compared and sent (as the agent's progress marks pass the relay).",
                    ),
                    &["vm", "disk"],
                )
                .expect("valid metric"),
            ),
            resync_compared_bytes: per_disk(
                &r,
                "fbr_relay_resync_compared_bytes",
                "Bytes of a resyncing disk compared so far.",
            ),
            resync_sent_bytes: per_disk(
                &r,
                "fbr_relay_resync_sent_bytes",
                "Bytes of differing blocks a resyncing disk sent so far.",
            ),
            resync_eta_seconds: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "fbr_relay_resync_eta_seconds",
                        "Estimated seconds until a resyncing disk is in step (what remains at the rate measured over the last 30 s; NaN until measured).",
                    ),
                    &["vm", "disk"],
                )
                .expect("valid metric"),
            ),
            resyncs_completed_total: counter(
                "fbr_relay_resyncs_completed_total",
                "Resyncs whose end mark passed the relay.",
            ),
            controller_jobs: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "fbr_relay_controller_jobs",
                        "The failback controller's jobs, by state (running, succeeded, failed, cancelled).",
                    ),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            controller_steps_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fbr_relay_controller_steps_total",
                        "Steps of failback jobs the controller ran, by step and outcome (done, failed).",
                    ),
                    &["step", "outcome"],
                )
                .expect("valid metric"),
            ),
            resyncs_requested_total: counter(
                "fbr_relay_resyncs_requested_total",
                "Resyncs the relay asked an agent for (cache corruption, an operator's request).",
            ),
            streams_moved_in_total: counter(
                "fbr_relay_streams_moved_in_total",
                "Streams whose VM moved to this relay (an agent's Hello at a higher placement); whatever this cache held of them was forgotten.",
            ),
            streams_moved_away_total: counter(
                "fbr_relay_streams_moved_away_total",
                "Streams whose VM moved to another relay (the master target refused this relay's copy as stale); their cached records were forgotten.",
            ),
            hash_streams_total: counter(
                "fbr_relay_hash_streams_total",
                "Resync hash streams relayed between an agent and the master target.",
            ),
            stage_counters: Vec::new(),
            registry: r,
        };
        m.stage_counters = BYTE_STAGES
            .iter()
            .map(|stage| m.bytes_total.with_label_values(&[stage]))
            .collect();
        register_process_metrics(&m.registry);
        m
    }

    /// Adds to the byte counter of `stage` (one of [`BYTE_STAGES`]).
    pub fn add_bytes(&self, stage: &str, n: u64) {
        match BYTE_STAGES.iter().position(|s| *s == stage) {
            Some(i) => self.stage_counters[i].inc_by(n),
            None => self.bytes_total.with_label_values(&[stage]).inc_by(n),
        }
    }
}

/// A gauge per disk (`vm`, `disk` labels).
fn per_disk(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), &["vm", "disk"]).expect("valid metric"),
    )
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_help_and_type() {
        let m = RelayMetrics::new();
        m.stream_errors_total
            .count(fbr_protocol::ErrorCode::SequenceGap);
        m.rpo_seconds.with_label_values(&["vm-1"]).set(1.5);
        m.cache_backlog_bytes.with_label_values(&["vm-1"]).set(10);
        m.health_condition
            .with_label_values(&["cache_free_space"])
            .set(1);
        m.replication_lag_seconds.observe(0.2);
        let text = crate::encode(&m.registry).unwrap();
        for name in [
            "fbr_relay_agent_connections_total",
            "fbr_relay_bytes_total{stage=\"wire\"}",
            "fbr_relay_stream_errors_total{code=\"sequence_gap\"} 1",
            "fbr_relay_replication_lag_seconds_bucket{le=\"0.25\"} 1",
            "fbr_relay_rpo_seconds{vm=\"vm-1\"} 1.5",
            "fbr_relay_health_state 0",
            "# TYPE fbr_relay_cache_used_bytes gauge",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // Two registries never share state.
        let other = RelayMetrics::new();
        assert_eq!(
            other
                .stream_errors_total
                .get(fbr_protocol::ErrorCode::SequenceGap),
            0
        );
    }
}
