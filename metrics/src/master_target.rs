//! The master target's metrics: what it applied, what it keeps, how it is connected.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use crate::{register, register_process_metrics, StreamErrors};

/// Every metric of a master target, on its own registry.
#[derive(Debug, Clone)]
pub struct MasterTargetMetrics {
    pub registry: Registry,
    pub relay_connections_total: IntCounter,
    pub handshakes_refused_total: IntCounter,
    pub records_applied_total: IntCounter,
    /// Bytes of disk written or zeroed by applied records.
    pub logical_bytes_applied_total: IntCounter,
    pub batches_applied_total: IntCounter,
    pub duplicates_skipped_total: IntCounter,
    pub tags_applied_total: IntCounter,
    pub stream_errors_total: StreamErrors,
    pub dedup_references_resolved_total: IntCounter,
    pub dedup_references_missing_total: IntCounter,
    /// Of the missing: indexed, but the journal no longer held the block (trimmed).
    pub dedup_references_stale_total: IntCounter,
    pub batches_received_total: IntCounter,
    /// Streams that arrived from a new relay at a higher placement (a VM moved).
    pub stream_moves_total: IntCounter,
    pub disks: IntGauge,
    pub relay_streams: IntGauge,
    pub content_index_blocks: IntGauge,
    /// Bytes reserved by the streams' zstd decompression contexts.
    pub codec_memory_bytes: IntGauge,
    /// Credit granted to each relay stream now (its share of `memory`).
    pub stream_credit_bytes: IntGauge,
    /// Per disk: 0 consistent, 1 resynced (waiting for a tag), 2 resyncing, 3 stale.
    pub disk_sync_state: IntGaugeVec,
    /// Per disk: regions (1 MiB) of the resync in progress done, and in all.
    pub resync_regions_done: IntGaugeVec,
    pub resync_regions: IntGaugeVec,
    pub hash_requests_total: IntCounter,
    /// Replica bytes read and hashed to answer hash requests.
    pub hashed_bytes_total: IntCounter,
    pub hash_bytes_sent_total: IntCounter,
}

impl MasterTargetMetrics {
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
        let m = MasterTargetMetrics {
            relay_connections_total: counter(
                "fbr_master_target_relay_connections_total",
                "Relay connections accepted (TLS handshake and role check passed).",
            ),
            handshakes_refused_total: counter(
                "fbr_master_target_handshakes_refused_total",
                "Connections that failed the TLS handshake (e.g. a foreign CA).",
            ),
            batches_applied_total: counter(
                "fbr_master_target_batches_applied_total",
                "Batches made durable (one journal fdatasync each).",
            ),
            duplicates_skipped_total: counter(
                "fbr_master_target_duplicates_skipped_total",
                "Records a relay resent that were already applied.",
            ),
            records_applied_total: counter(
                "fbr_master_target_records_applied_total",
                "Records made durable in a disk's journal and acknowledged.",
            ),
            logical_bytes_applied_total: counter(
                "fbr_master_target_logical_bytes_applied_total",
                "Bytes of disk written or zeroed by applied records.",
            ),
            tags_applied_total: counter(
                "fbr_master_target_tags_applied_total",
                "Recovery-point tags applied (one per disk of each recovery point).",
            ),
            stream_errors_total: StreamErrors::register(&r, "fbr_master_target_stream_errors_total"),
            dedup_references_resolved_total: counter(
                "fbr_master_target_dedup_references_resolved_total",
                "Blocks the relay sent as a SHA-256 reference that were read back (and re-verified) from a journal.",
            ),
            dedup_references_missing_total: counter(
                "fbr_master_target_dedup_references_missing_total",
                "References that could not be resolved (evicted, restarted): answered with unknown_reference so the relay resends the data.",
            ),
            dedup_references_stale_total: counter(
                "fbr_master_target_dedup_references_stale_total",
                "Of the missing references: indexed, but the journal place no longer held the block (its history trimmed by retention); the entry is dropped and the relay resends.",
            ),
            batches_received_total: counter(
                "fbr_master_target_batches_received_total",
                "WAN batches received from relays.",
            ),
            stream_moves_total: counter(
                "fbr_master_target_stream_moves_total",
                "Streams accepted from a new relay at a higher placement (their VM moved); the old relay is refused with stream_moved from then on.",
            ),
            content_index_blocks: gauge(
                "fbr_master_target_content_index_blocks",
                "Blocks in the dedup content index.",
            ),
            codec_memory_bytes: gauge(
                "fbr_master_target_codec_memory_bytes",
                "Bytes reserved by the relay streams' zstd decompression contexts (capped by codec_memory).",
            ),
            stream_credit_bytes: gauge(
                "fbr_master_target_stream_credit_bytes",
                "Credit granted to each open relay stream now: its fair share of memory, from 64 KiB to credit.",
            ),
            disks: gauge(
                "fbr_master_target_disks",
                "Disks (replicas) the master target holds.",
            ),
            relay_streams: gauge(
                "fbr_master_target_relay_streams",
                "Disk streams with a relay session open now.",
            ),
            disk_sync_state: per_disk(
                &r,
                "fbr_master_target_disk_sync_state",
                "Whether a replica offers recovery points: 0 consistent, 1 resynced (the next tag is a point), 2 resyncing, 3 stale (seeded, not resynced).",
            ),
            resync_regions_done: per_disk(
                &r,
                "fbr_master_target_resync_regions_done",
                "Regions (1 MiB) of the disk's resync in progress compared and sent, as applied here.",
            ),
            resync_regions: per_disk(
                &r,
                "fbr_master_target_resync_regions",
                "Regions (1 MiB) the disk's resync in progress covers.",
            ),
            hash_requests_total: counter(
                "fbr_master_target_hash_requests_total",
                "Resync hash requests answered.",
            ),
            hashed_bytes_total: counter(
                "fbr_master_target_hashed_bytes_total",
                "Replica bytes read and hashed to answer resync hash requests.",
            ),
            hash_bytes_sent_total: counter(
                "fbr_master_target_hash_bytes_sent_total",
                "Bytes of node hashes sent to agents (what a resync's comparison costs on the WAN).",
            ),
            registry: r,
        };
        register_process_metrics(&m.registry);
        m
    }
}

impl Default for MasterTargetMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge per disk (`vm`, `disk` labels).
fn per_disk(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), &["vm", "disk"]).expect("valid metric"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Building the metrics runs the naming checks of `register`; the scrape carries
    /// the per-disk gauges once a disk has them.
    #[test]
    fn every_metric_is_exposed_with_help_and_type() {
        let m = MasterTargetMetrics::new();
        m.resync_regions
            .with_label_values(&["vm-1", "disk-0"])
            .set(7);
        m.tags_applied_total.inc();
        let text = crate::encode(&m.registry).unwrap();
        for line in [
            "# TYPE fbr_master_target_resync_regions gauge",
            "fbr_master_target_resync_regions{disk=\"disk-0\",vm=\"vm-1\"} 7",
            "fbr_master_target_tags_applied_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
