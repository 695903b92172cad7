//! `churn bench-scale`: does the relay's cost stay flat as the number of streams grows?
//!
//! A process server of the largest size serves up to about 1,000 disk streams. The
//! bench runs the same total churn over 10, 100 and 1,000 streams (by default half of
//! what 10 streams achieve flat out on this machine, measured first), each case a full
//! drill (configuration server, master target, relay, emulated agents, every recovery
//! point verified), and reports per case what an operator sizing a relay needs: relay
//! CPU per data byte and per record, replication lag, how long onboarding every disk
//! took, reconnects, the relay's peak memory, and recovery points cut against those
//! expected.
//!
//! Targets (issue 16): relay CPU per byte at the largest case within 1.3x of the
//! smallest; p99 lag at most 250 ms in every case; no reconnects; relay RSS at most
//! 256 MiB at 1,000 streams. `met` says which held.

use std::time::Duration;

use serde_json::{json, Value};

use crate::drill::{self, DrillOptions, DrillSummary};

/// What `churn bench-scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleBenchOptions {
    /// Stream counts, smallest first (the first is the reference for CPU per byte).
    pub streams: Vec<u32>,
    /// Churn per case once every disk is up, seconds.
    pub seconds: f64,
    pub disk_size: u64,
    /// Total churn rate, MB/s (`None`: half of what the first case does flat out).
    pub rate_mb: Option<f64>,
    pub tag_interval: Duration,
    /// Replication groups per case (tags are consistent cuts across a group).
    pub groups: u32,
    pub seed: u64,
}

/// Targets the figures are judged against.
const CPU_PER_BYTE_RATIO_MAX: f64 = 1.3;
const P99_LAG_MS_MAX: f64 = 250.0;
const RSS_MIB_MAX_AT_1000: f64 = 256.0;

/// VMs x disks per VM for `streams` disks: four disks per VM where it divides, as
/// large VMs have, else two, else one.
fn shape(streams: u32) -> (u32, u32) {
    let per_vm = [4, 2, 1]
        .into_iter()
        .find(|d| streams % d == 0)
        .unwrap_or(1);
    (streams / per_vm, per_vm)
}

fn drill_options(opts: &ScaleBenchOptions, streams: u32, rate_mb: Option<f64>) -> DrillOptions {
    let (vms, disks_per_vm) = shape(streams);
    DrillOptions {
        vms,
        disks_per_vm,
        disk_size: opts.disk_size,
        tag_interval: opts.tag_interval,
        seed: opts.seed,
        groups: opts.groups.min(vms).max(1),
        ..DrillOptions::streams(streams, Duration::from_secs_f64(opts.seconds), rate_mb)
    }
}

/// One case's figures.
fn case_figures(s: &DrillSummary, opts: &ScaleBenchOptions, groups: u32) -> Value {
    let expected_tags =
        (opts.seconds / opts.tag_interval.as_secs_f64()).floor() as u64 * groups as u64;
    json!({
        "streams": s.streams,
        "verified": s.verified,
        "recovery_points_verified": s.recovery_points_verified,
        "logical_mb_per_s": s.logical_mb_per_s,
        "data_mb_per_s": s.data_mb_per_s,
        "records_per_s": s.records_per_s,
        "relay_cpu_s": s.relay_cpu_s,
        "relay_ns_per_data_byte": s.relay_cpu_s * 1e9 / s.data_bytes.max(1) as f64,
        "relay_us_per_record": s.relay_cpu_s * 1e6 / s.records.max(1) as f64,
        "master_target_cpu_s": s.master_target_cpu_s,
        "lag_p50_ms": s.lag_ms.p50,
        "lag_p99_ms": s.lag_ms.p99,
        "steady_lag_p50_ms": s.lag_ms.steady_p50,
        "steady_lag_p99_ms": s.lag_ms.steady_p99,
        "lag_max_ms": s.lag_ms.max,
        "disks_acked": s.disks_acked,
        "all_disks_acked_s": s.all_disks_acked_s,
        "reconnects": s.reconnects,
        "relay_peak_rss_mib": s.relay_peak_rss_bytes as f64 / (1 << 20) as f64,
        "tags_cut": s.tags_cut,
        "tags_expected": expected_tags,
        "errors": s.errors.iter().take(5).collect::<Vec<_>>(),
    })
}

/// Runs every case; the JSON document `churn bench-scale --json` prints.
pub async fn run(opts: ScaleBenchOptions) -> anyhow::Result<Value> {
    anyhow::ensure!(!opts.streams.is_empty(), "no stream counts to run");
    let (rate_mb, calibration) = match opts.rate_mb {
        Some(r) => (r, Value::Null),
        None => {
            let first = opts.streams[0];
            eprintln!("bench-scale: calibrating: {first} streams flat out");
            let flat = drill::run_drill(drill_options(&opts, first, None)).await?;
            anyhow::ensure!(
                flat.verified,
                "the calibration drill did not verify: {:?}",
                flat.errors
            );
            let rate = (flat.logical_mb_per_s / 2.0).max(1.0);
            let figures = json!({
                "streams": first,
                "logical_mb_per_s": flat.logical_mb_per_s,
                "relay_ns_per_data_byte": flat.relay_cpu_s * 1e9 / flat.data_bytes.max(1) as f64,
            });
            (rate, figures)
        }
    };
    let mut cases = serde_json::Map::new();
    let mut summaries = Vec::new();
    for &streams in &opts.streams {
        eprintln!("bench-scale: {streams} streams at {rate_mb:.1} MB/s in total");
        let d = drill_options(&opts, streams, Some(rate_mb));
        let groups = d.groups;
        let s = drill::run_drill(d).await?;
        cases.insert(streams.to_string(), case_figures(&s, &opts, groups));
        summaries.push(s);
    }
    let per_byte = |s: &DrillSummary| s.relay_cpu_s / s.data_bytes.max(1) as f64;
    let (first, last) = (&summaries[0], &summaries[summaries.len() - 1]);
    let cpu_ratio = per_byte(last) / per_byte(first);
    let worst_p99 = summaries.iter().map(|s| s.lag_ms.p99).fold(0.0, f64::max);
    let reconnects: u64 = summaries.iter().map(|s| s.reconnects).sum();
    let rss_largest = last.relay_peak_rss_bytes as f64 / (1 << 20) as f64;
    let verified = summaries.iter().all(|s| s.verified);
    Ok(json!({
        "rate_mb_per_s": rate_mb,
        "calibration": calibration,
        "cases": cases,
        "relay_cpu_per_byte_ratio": cpu_ratio,
        "worst_lag_p99_ms": worst_p99,
        "reconnects": reconnects,
        "verified": verified,
        "met": {
            "cpu_per_byte_within_1_3x": cpu_ratio <= CPU_PER_BYTE_RATIO_MAX,
            "p99_lag_at_most_250_ms": worst_p99 <= P99_LAG_MS_MAX,
            "no_reconnects": reconnects == 0,
            "relay_rss_at_most_256_mib": last.streams < 1000 || rss_largest <= RSS_MIB_MAX_AT_1000,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_shaped_as_vms_with_several_disks() {
        assert_eq!(shape(10), (5, 2));
        assert_eq!(shape(100), (25, 4));
        assert_eq!(shape(1000), (250, 4));
        assert_eq!(shape(7), (7, 1));
    }
}
