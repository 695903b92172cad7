//! `churn drill` and `churn bench`: the whole replication path on loopback, end to end.
//!
//! A fresh site ([`crate::harness::Site`]) with real `master-target` and `relay`
//! processes, emulated VMs churning through them for a while, then both daemons stopped
//! and every recovery point verified byte for byte ([`crate::verify`]). The bench is the
//! same run with sizes for throughput, reporting rates and the relay's CPU time.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fbr_protocol::StreamId;
use fbr_transport::QuicTuning;
use serde::Serialize;

use crate::agent::{self, AgentOptions, DiskPlan, DiskStart, ResyncPlan, RunStats};
use crate::harness::{process_cpu_seconds, process_peak_rss_bytes, Site, SiteOptions};
use crate::image::ImageSpec;
use crate::source::SourceSpec;
use crate::verify;
use crate::workload::{Content, Profile};

/// What to run.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub vms: u32,
    pub disks_per_vm: u32,
    pub disk_size: u64,
    pub duration: Duration,
    pub tag_interval: Duration,
    /// Every n-th tag is app-consistent (0: none).
    pub app_tag_every: u64,
    /// `None`: every profile, cycled over the disks.
    pub profile: Option<Profile>,
    pub content: Content,
    pub seed: u64,
    /// VMs are spread round-robin over this many replication groups.
    pub groups: u32,
    pub progress: bool,
    /// Keep the site directory here instead of a temporary one.
    pub keep: Option<PathBuf>,
    pub max_udp_payload: u16,
    pub cache_capacity: u64,
    pub credit_mib: u64,
    /// Steady churn rate in bytes per second, all disks together (`None`: flat out).
    pub rate_bytes_per_s: Option<u64>,
    /// Start as a reprotect: the disks hold data, and the replicas resync first.
    pub reprotect: Option<Reprotect>,
}

impl DrillOptions {
    /// `streams` disks, four per VM as large VMs have them (the last VM may have
    /// fewer), churning the mixed model for `duration` at `rate_mb` MB/s in total (or
    /// flat out), a tag a second (every fifth app-consistent), one replication group:
    /// the shape the benches share. Set what differs with struct-update syntax.
    pub fn streams(streams: u32, duration: Duration, rate_mb: Option<f64>) -> Self {
        let disks_per_vm = 4;
        DrillOptions {
            vms: streams.div_ceil(disks_per_vm),
            disks_per_vm,
            disk_size: 8 << 20,
            duration,
            tag_interval: Duration::from_millis(1000),
            app_tag_every: 5,
            profile: None,
            content: Content::Mixed,
            seed: 1,
            groups: 1,
            progress: true,
            keep: None,
            max_udp_payload: 1452,
            cache_capacity: 8 << 30,
            credit_mib: 16,
            rate_bytes_per_s: rate_mb.map(|r| (r * 1e6) as u64),
            reprotect: None,
        }
    }

    /// The disks to churn: [`plan_disks`], the first `streams` of them.
    pub fn plans(&self, streams: u32) -> Vec<DiskPlan> {
        plan_disks(self)
            .into_iter()
            .take(streams as usize)
            .collect()
    }

    /// The site these disks need: every VM enrolled, the cache, credit and packet size
    /// asked for; extra daemon flags in `relay_args`.
    pub fn site_options(&self, cache_segment_mib: u64, relay_args: Vec<String>) -> SiteOptions {
        SiteOptions {
            agent_vms: (1..=self.vms).map(|v| format!("vm{v}")).collect(),
            cache_capacity: self.cache_capacity,
            cache_segment_mib,
            mt_credit_mib: self.credit_mib,
            max_udp_payload: self.max_udp_payload,
            relay_args,
            mt_args: vec![],
        }
    }

    /// The emulated agents' options for `site`: this drill's length, tags, rate and
    /// packet size.
    pub fn agent_options(&self, site: &Site) -> anyhow::Result<AgentOptions> {
        Ok(AgentOptions {
            tuning: QuicTuning {
                max_udp_payload: self.max_udp_payload,
                ..QuicTuning::default()
            },
            rate_bytes_per_s: self.rate_bytes_per_s,
            app_tag_every: self.app_tag_every,
            ..site.agent_options(self.duration, self.tag_interval)?
        })
    }
}

/// A drill that starts as a reprotect (failback's first step).
#[derive(Debug, Clone, Copy)]
pub struct Reprotect {
    pub location: ReprotectLocation,
    /// Percent of each disk's 4 KiB blocks that hold data at failover.
    pub used_percent: f64,
    /// Percent of the blocks the Azure VM rewrote since (original location: what the
    /// delta resync must send).
    pub stale_percent: f64,
}

/// Where the VMs fail back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReprotectLocation {
    /// The on-premises disks still exist: seeded with their failover-day state, resynced
    /// by block-hash delta.
    Original,
    /// New, empty disks: a full copy.
    Alternate,
}

/// Summary of the resyncs of a reprotect drill.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncSummary {
    /// From the agents' start until the last disk was in step.
    pub seconds: f64,
    pub compared_bytes: u64,
    pub sent_bytes: u64,
    /// Node hashes received from the master target (the comparison's WAN cost).
    pub hash_bytes: u64,
}

/// The lag figures, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LagMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// p50 and p99 of the writes drawn after every disk was onboarded (none: the run
    /// ended first).
    pub steady_p50: Option<f64>,
    pub steady_p99: Option<f64>,
}

/// What a drill or bench found.
#[derive(Debug, Serialize)]
pub struct DrillSummary {
    pub verified: bool,
    pub recovery_points_verified: usize,
    pub recovery_points_complete: usize,
    pub streams: usize,
    /// Disk bytes changed (writes plus zeroed ranges), acknowledged.
    pub logical_bytes: u64,
    /// Bytes carried in `Write` records, acknowledged (trims carry none).
    pub data_bytes: u64,
    pub records: u64,
    pub elapsed_s: f64,
    pub logical_mb_per_s: f64,
    pub data_mb_per_s: f64,
    pub records_per_s: f64,
    pub lag_ms: LagMs,
    pub relay_cpu_s: f64,
    pub master_target_cpu_s: f64,
    /// The relay's peak resident set over the run, bytes (`VmHWM`).
    pub relay_peak_rss_bytes: u64,
    pub reconnects: u64,
    /// Disks with at least one acknowledged record, and how long after the agents
    /// started the last of them had its first (onboarding every disk).
    pub disks_acked: u64,
    pub all_disks_acked_s: f64,
    /// Consistent cuts (one per replication group per tag) the agents made.
    pub tags_cut: u64,
    pub verify_s: f64,
    /// The steady churn rate asked for, MB/s (`None`: flat out, so lag measures the
    /// backlog the relay's cache absorbed rather than a recovery-point objective).
    pub rate_mb_per_s: Option<f64>,
    pub errors: Vec<String>,
    /// Where the site was kept (logs, data, manifest), if it was.
    pub site_dir: Option<PathBuf>,
    /// The resyncs of a reprotect drill.
    pub resync: Option<ResyncSummary>,
}

/// The disks of a drill: `vm1..vmN`, disks `0..D`, profiles cycled, groups round-robin.
pub fn plan_disks(opts: &DrillOptions) -> Vec<DiskPlan> {
    let mut plans = Vec::new();
    let mut n = 0usize;
    for v in 0..opts.vms {
        for d in 0..opts.disks_per_vm {
            let profile = opts.profile.unwrap_or(Profile::ALL[n % Profile::ALL.len()]);
            n += 1;
            plans.push(DiskPlan {
                id: StreamId {
                    vm: format!("vm{}", v + 1),
                    disk: d,
                },
                disk_size: opts.disk_size,
                group: format!("group{}", v % opts.groups.max(1) + 1),
                source: SourceSpec::Generated {
                    seed: opts.seed,
                    vm_index: v,
                    disk_index: d,
                    profile,
                    content: opts.content,
                },
                start: Default::default(),
            });
        }
    }
    plans
}

/// Makes the disks of a reprotect drill start with data: the failover-day state is
/// deterministic per disk; at the original location the master target is seeded with it
/// and the source has diverged from it; at an alternate location the replica is new.
pub(crate) fn prepare_reprotect(
    site: &mut Site,
    plans: &mut [DiskPlan],
    r: &Reprotect,
    seed: u64,
) -> anyhow::Result<()> {
    let ppm = |percent: f64| (percent.clamp(0.0, 100.0) * 10_000.0) as u32;
    for (i, p) in plans.iter_mut().enumerate() {
        let base = ImageSpec::Generated {
            seed: seed ^ (0xFA11_BAC0 + i as u64),
            used_ppm: ppm(r.used_percent),
        };
        let disk_file = site
            .root
            .join("sources")
            .join(format!("{}-disk{}.img", p.id.vm, p.id.disk));
        let (source_base, replica_base) = match r.location {
            ReprotectLocation::Original => {
                site.seed_disk(&p.id.vm, p.id.disk, &base, p.disk_size)?;
                let source = ImageSpec::Diverged {
                    base: Box::new(base.clone()),
                    seed: seed ^ (0x5EED_D1FF + i as u64),
                    changed_ppm: ppm(r.stale_percent),
                };
                (source, base)
            }
            ReprotectLocation::Alternate => (base, ImageSpec::Zeros),
        };
        p.start = DiskStart {
            source_base,
            replica_base,
            disk_file: Some(disk_file),
            resync: ResyncPlan::Auto,
            resync_rate: None,
            resume: false,
        };
    }
    Ok(())
}

/// Runs a whole drill and verifies it.
pub async fn run_drill(opts: DrillOptions) -> anyhow::Result<DrillSummary> {
    let mut plans = plan_disks(&opts);
    let mut site = Site::create(opts.keep.clone(), opts.site_options(64, vec![]))?;
    // As a real site: a configuration server, and every component enrolled with its
    // passphrase (no certificate made by hand).
    let config_server = site.enroll_through_config_server()?;
    if opts.progress {
        eprintln!(
            "configuration server on {config_server}: master target, relay and agent enrolled"
        );
    }
    site.start_master_target()?;
    if let Some(r) = &opts.reprotect {
        if opts.progress {
            eprintln!("preparing a reprotect to the {:?} location...", r.location);
        }
        prepare_reprotect(&mut site, &mut plans, r, opts.seed)?;
    }
    site.start_relay()?;
    let relay_pid = site.relay_pid().context("relay pid")?;
    let mt_pid = site.master_target_pid().context("master target pid")?;
    let streams = plans.len();
    let handle =
        agent::start(opts.agent_options(&site)?, plans, opts.seed).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let mut last_bytes = 0u64;
    let mut in_step_at = None;
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let resyncs = handle.resync_progress();
        if in_step_at.is_none()
            && resyncs
                .iter()
                .all(|r| r.mode.is_none() || r.in_step.is_some())
        {
            in_step_at = Some(started.elapsed());
        }
        if opts.progress && started.elapsed().as_millis() % 1000 < 250 {
            last_bytes = print_progress(&handle.stats, started, last_bytes, &resyncs);
        }
    }
    let resync = opts.reprotect.map(|_| {
        use std::sync::atomic::Ordering::Relaxed;
        ResyncSummary {
            seconds: in_step_at.unwrap_or_default().as_secs_f64(),
            compared_bytes: handle.stats.resync_compared_bytes.load(Relaxed),
            sent_bytes: handle.stats.resync_sent_bytes.load(Relaxed),
            hash_bytes: handle.stats.resync_hash_bytes.load(Relaxed),
        }
    });
    let stats = handle.stats.clone();
    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    let relay_cpu_s = process_cpu_seconds(relay_pid).unwrap_or(f64::NAN);
    let master_target_cpu_s = process_cpu_seconds(mt_pid).unwrap_or(f64::NAN);
    let relay_peak_rss_bytes = process_peak_rss_bytes(relay_pid).unwrap_or(0);
    site.stop_relay(false)?;
    site.stop_master_target(false)?;

    let manifest_path = site.root.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&report.manifest)?)?;
    if opts.progress {
        eprintln!("verifying every recovery point against the sources...");
    }
    let verify_started = Instant::now();
    let verification = verify::verify_run(&report, &site.mt_data).await?;
    let verify_s = verify_started.elapsed().as_secs_f64();
    let errors = verification.errors.clone();
    let logical_bytes = stats
        .logical_bytes_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    let data_bytes = stats
        .data_bytes_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    let records = stats
        .records_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    let elapsed_s = report.elapsed.as_secs_f64();
    let (p50, p99, max) = stats.lag_ms();
    let steady = stats.steady_lag_ms();
    let site_dir = if opts.keep.is_some() || !errors.is_empty() {
        Some(site.keep())
    } else {
        None
    };
    Ok(DrillSummary {
        verified: verification.verified,
        recovery_points_verified: verification.recovery_points_verified,
        recovery_points_complete: verification.recovery_points_complete,
        streams,
        logical_bytes,
        data_bytes,
        records,
        elapsed_s,
        logical_mb_per_s: logical_bytes as f64 / 1e6 / elapsed_s,
        data_mb_per_s: data_bytes as f64 / 1e6 / elapsed_s,
        records_per_s: records as f64 / elapsed_s,
        lag_ms: LagMs {
            p50,
            p99,
            max,
            steady_p50: steady.map(|s| s.0),
            steady_p99: steady.map(|s| s.1),
        },
        relay_cpu_s,
        master_target_cpu_s,
        relay_peak_rss_bytes,
        reconnects: stats.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        disks_acked: stats
            .disks_first_acked
            .load(std::sync::atomic::Ordering::Relaxed),
        all_disks_acked_s: stats
            .last_first_ack_ms
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e3,
        tags_cut: stats
            .tags_inserted
            .load(std::sync::atomic::Ordering::Relaxed),
        verify_s,
        rate_mb_per_s: opts.rate_bytes_per_s.map(|r| r as f64 / 1e6),
        errors,
        site_dir,
        resync,
    })
}

fn print_progress(
    stats: &RunStats,
    started: Instant,
    last_bytes: u64,
    resyncs: &[agent::ResyncLive],
) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let bytes = stats.logical_bytes_acked.load(Relaxed);
    let (p50, p99, _) = stats.lag_ms();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "[{:>5.1}s] acked {:>8.1} MB ({:>6.1} MB/s)  records {:>9}  lag p50 {:>6.1} ms p99 {:>7.1} ms  tags {:>4}  reconnects {}",
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1e6,
        (bytes - last_bytes) as f64 / 1e6,
        stats.records_acked.load(Relaxed),
        p50,
        p99,
        stats.tags_inserted.load(Relaxed),
        stats.reconnects.load(Relaxed),
    );
    // Disks still resyncing: how far, and when they will be in step.
    let running: Vec<&agent::ResyncLive> = resyncs
        .iter()
        .filter(|r| r.mode.is_some() && r.in_step.is_none())
        .collect();
    if !running.is_empty() {
        let (done, total) = running.iter().fold((0, 0), |(d, t), r| {
            (d + r.regions_done, t + r.regions_total)
        });
        let sent: u64 = running.iter().map(|r| r.sent_bytes).sum();
        let eta = running.iter().filter_map(|r| r.eta).max();
        let _ = writeln!(
            err,
            "         resyncing {} disks: {:>5.1}% of {} regions, {:.1} MB sent, ETA {}",
            running.len(),
            100.0 * done as f64 / total.max(1) as f64,
            total,
            sent as f64 / 1e6,
            eta.map_or("measuring".into(), |e| format!("{:.0} s", e.as_secs_f64()))
        );
    }
    bytes
}

/// Prints a human summary to stderr.
pub fn print_summary(s: &DrillSummary) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "--------------------------------------------------------------"
    );
    let _ = writeln!(
        err,
        "{}: {} of {} recovery points byte-identical across {} disks",
        if s.verified { "VERIFIED" } else { "FAILED" },
        s.recovery_points_verified,
        s.recovery_points_complete,
        s.streams
    );
    let _ = writeln!(
        err,
        "churn {:.1} MB ({:.1} MB of write data) in {} records over {:.1} s: {:.1} MB/s ({:.1} MB/s of data), {:.0} records/s",
        s.logical_bytes as f64 / 1e6,
        s.data_bytes as f64 / 1e6,
        s.records,
        s.elapsed_s,
        s.logical_mb_per_s,
        s.data_mb_per_s,
        s.records_per_s
    );
    let _ = writeln!(
        err,
        "lag source write -> durable at master target: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        s.lag_ms.p50,
        s.lag_ms.p99,
        s.lag_ms.max,
        match s.rate_mb_per_s {
            Some(r) => format!(" (steady churn at {r:.0} MB/s)"),
            None => " (flat-out churn: lag is the backlog the relay cache absorbed; --rate-mb measures RPO)".into(),
        }
    );
    let _ = writeln!(
        err,
        "CPU: relay {:.2} s, master target {:.2} s; verification {:.1} s",
        s.relay_cpu_s, s.master_target_cpu_s, s.verify_s
    );
    if let Some(r) = &s.resync {
        let _ = writeln!(
            err,
            "reprotect: in step after {:.1} s; compared {:.1} MB, sent {:.1} MB of blocks, {:.1} KB of hashes",
            r.seconds,
            r.compared_bytes as f64 / 1e6,
            r.sent_bytes as f64 / 1e6,
            r.hash_bytes as f64 / 1e3
        );
    }
    for e in &s.errors {
        let _ = writeln!(err, "error: {e}");
    }
    if let Some(d) = &s.site_dir {
        let _ = writeln!(
            err,
            "site kept at {} (logs/, master-target/, manifest.json)",
            d.display()
        );
    }
}

/// What `churn bench-throttle` measured.
#[derive(Debug, Serialize)]
pub struct ThrottleBench {
    pub configured_bytes_per_s: u64,
    /// Record bytes applied at the master target per second (the streams' logical
    /// frames: since the WAN reductions, more than crosses the link).
    pub achieved_bytes_per_s: f64,
    /// `achieved / configured - 1`.
    pub error: f64,
    /// What crossed the link per second: the relay's UDP bytes to the master target
    /// (`fbr_relay_bytes_total{stage="wire"}`, QUIC and UDP headers included): what the
    /// limit holds.
    pub wire_bytes_per_s: f64,
    /// `wire / configured - 1`.
    pub wire_error: f64,
    pub window_s: f64,
    pub streams: usize,
    /// Jain's fairness index of the bytes each stream had applied in the window
    /// (1 = perfectly fair).
    pub jain_index: f64,
    pub min_stream_share: f64,
    pub max_stream_share: f64,
    pub verified: bool,
    pub recovery_points_verified: usize,
    pub errors: Vec<String>,
}

/// Jain's fairness index: `(Σx)² / (n · Σx²)`.
pub fn jain_index(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

/// Egress rate accuracy and fairness on loopback: `streams` equal-priority disks churn at
/// twice `rate` through a relay limited to `rate`; over `window` (after a warm-up), the
/// record bytes applied at the master target give the achieved rate and, per stream,
/// Jain's index, and the relay's wire counter (its UDP bytes to the master target, read
/// from `/metrics`) what crossed the link, which is what the limit holds since the WAN
/// reductions shrink records before they are paced. Then the limit is lifted at run time (schedule file) to drain, and every
/// recovery point is verified.
pub async fn run_throttle_bench(
    rate: u64,
    streams: u32,
    window: Duration,
) -> anyhow::Result<ThrottleBench> {
    let root = tempfile::Builder::new().prefix("fbr-throttle-").tempdir()?;
    let schedule_file = root.path().join("egress-schedule");
    std::fs::write(&schedule_file, format!("other {rate}"))?;
    let opts = DrillOptions {
        // Every stream must contend: trims would spend their pace on Zero records,
        // which are tiny on the wire, and so never ask for their share.
        profile: Some(Profile::Mixed),
        seed: 7,
        cache_capacity: 4 << 30,
        rate_bytes_per_s: Some(rate * 2),
        ..DrillOptions::streams(streams, window + Duration::from_secs(4), None)
    };
    let plans = opts.plans(streams);
    let relay_args = vec![
        "--egress-schedule-file".into(),
        schedule_file.display().to_string(),
    ];
    let site_opts = opts.site_options(64, relay_args);
    let mut site = Site::create(Some(root.path().join("site")), site_opts)?;
    site.start_master_target()?;
    site.start_relay()?;
    let agent_opts = AgentOptions {
        drain_timeout: Duration::from_secs(120),
        ..opts.agent_options(&site)?
    };
    let n = plans.len();
    let handle = agent::start(agent_opts, plans, opts.seed).map_err(anyhow::Error::msg)?;
    // Warm-up: the queue builds and every stream is contending.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = site.relay_metrics_addr().context("the relay's metrics")?;
    let wire = move || crate::harness::relay_wire_bytes(metrics);
    let wire_before = tokio::task::spawn_blocking(wire).await?;
    let before = handle.applied_frame_bytes_per_disk();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = handle.applied_frame_bytes_per_disk();
    let wire_after = tokio::task::spawn_blocking(wire).await?;
    let window_s = started.elapsed().as_secs_f64();
    let wire_bytes_per_s = match (wire_before, wire_after) {
        (Some(b), Some(a)) => (a - b) / window_s,
        _ => anyhow::bail!("the relay's metrics lack fbr_relay_bytes_total{{stage=\"wire\"}}"),
    };
    // Lift the limit at run time so the backlog drains quickly.
    std::fs::write(&schedule_file, "other unlimited")?;
    let shares: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    let total: f64 = shares.iter().sum();
    let achieved = total / window_s;
    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let v = verify::verify_run(&report, &site.mt_data).await?;
    let mean = total / n as f64;
    Ok(ThrottleBench {
        configured_bytes_per_s: rate,
        achieved_bytes_per_s: achieved,
        error: achieved / rate as f64 - 1.0,
        wire_bytes_per_s,
        wire_error: wire_bytes_per_s / rate as f64 - 1.0,
        window_s,
        streams: n,
        jain_index: jain_index(&shares),
        min_stream_share: shares.iter().cloned().fold(f64::INFINITY, f64::min) / mean,
        max_stream_share: shares.iter().cloned().fold(0.0, f64::max) / mean,
        verified: v.verified,
        recovery_points_verified: v.recovery_points_verified,
        errors: v.errors,
    })
}
