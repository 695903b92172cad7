//! `churn bench-resync`: how fast, how cheap and how predictable a reprotect to the
//! original location is.
//!
//! Per case, a fresh site: the master target is seeded with a disk "as it was at
//! failover" (every block written), the source has diverged from it in a given share
//! of its blocks, and the agent runs a delta resync while the VM keeps writing at a
//! steady rate. Measured: seconds until the replica is in step, what crossed the WAN
//! (the relay's wire bytes; the node hashes the master target sent), how fast the disk
//! was compared (GB/s of disk, and per core of the busier side), how far off the ETA
//! was at 25% and 50% of the disk, and what `rsync --inplace --no-whole-file -z` sends
//! to bring the same stale image to the same source. At the end the master target's
//! image must equal the source disk byte for byte.

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use fbr_protocol::StreamId;
use serde::Serialize;

use crate::agent::{self, DiskPlan, DiskStart, ResyncPlan};
use crate::harness::{http_get, process_cpu_seconds, sample_sum, Site, SiteOptions};
use crate::image::{first_difference, ImageSpec};
use crate::source::SourceSpec;
use crate::workload::{Content, Profile};

/// What to run.
#[derive(Debug, Clone)]
pub struct ResyncBenchOptions {
    pub disk_size: u64,
    /// Share of the blocks that differ, percent, one case each.
    pub differing_percent: Vec<f64>,
    /// The VM's steady churn meanwhile, MB/s.
    pub churn_mb: f64,
    pub rsync: bool,
    pub seed: u64,
    pub progress: bool,
}

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncCase {
    pub differing_percent: f64,
    pub disk_bytes: u64,
    /// Bytes of the blocks that differ (incompressible content: as compressed).
    pub differing_bytes: u64,
    pub seconds_to_consistent: f64,
    /// Disk bytes compared (hashed on both sides).
    pub compared_bytes: u64,
    /// Disk scanned per second, GB/s.
    pub compare_gb_per_s: f64,
    /// Disk scanned per CPU second of the busier side (the agent emulator or the master
    /// target), GB/s: what one core sustains.
    pub scan_gb_per_s_per_core: f64,
    /// Blocks the resync sent.
    pub resync_sent_bytes: u64,
    /// Node hashes the master target sent (the comparison's WAN cost).
    pub hash_bytes: u64,
    pub hash_share_of_disk: f64,
    /// UDP payload the relay sent to the master target during the resync (QUIC and TLS
    /// included).
    pub wire_bytes: u64,
    /// WAN batch payloads the relay sent (after its reductions, before QUIC and TLS:
    /// what rsync's byte counts compare with).
    pub payload_bytes: u64,
    /// Disk bytes the VM's churn changed meanwhile (part of both figures above).
    pub churn_bytes: u64,
    /// `(wire - churn + hashes) / differing`: target <= 1.2.
    pub wire_to_differing: f64,
    /// `payload - churn + hashes`: what the resync cost, to set beside rsync's bytes.
    pub resync_bytes: u64,
    /// `resync_bytes < rsync_wire_bytes`.
    pub fewer_bytes_than_rsync: Option<bool>,
    /// |ETA predicted - time it really took| / time it really took, at 25% and 50%.
    pub eta_error_at_25: Option<f64>,
    pub eta_error_at_50: Option<f64>,
    pub rsync_wire_bytes: Option<u64>,
    pub rsync_s: Option<f64>,
    pub agent_cpu_s: f64,
    pub master_target_cpu_s: f64,
    pub relay_cpu_s: f64,
    pub verified: bool,
    pub errors: Vec<String>,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncBench {
    pub cases: Vec<ResyncCase>,
    /// Keyed BLAKE3 over 1 MiB nodes on one core, in this run (the scan's primitive).
    pub blake3_gb_per_s: f64,
}

/// Runs every case.
pub async fn run(opts: ResyncBenchOptions) -> anyhow::Result<ResyncBench> {
    let blake3_gb_per_s = blake3_rate();
    let mut cases = Vec::new();
    for pct in &opts.differing_percent {
        let case = run_case(&opts, *pct).await?;
        if opts.progress {
            eprintln!(
                "  {pct}% differing: in step in {:.1} s, {:.2} GB/s compared, wire {} B for {} B differing ({:.2}x), hashes {:.4}% of the disk, ETA error {:?}/{:?}, rsync {:?} B, verified {}",
                case.seconds_to_consistent,
                case.compare_gb_per_s,
                case.wire_bytes,
                case.differing_bytes,
                case.wire_to_differing,
                100.0 * case.hash_share_of_disk,
                case.eta_error_at_25,
                case.eta_error_at_50,
                case.rsync_wire_bytes,
                case.verified
            );
        }
        cases.push(case);
    }
    Ok(ResyncBench {
        cases,
        blake3_gb_per_s,
    })
}

/// Keyed BLAKE3 of 1 MiB nodes on one core, GB/s (what the scan costs per byte).
fn blake3_rate() -> f64 {
    let mut hasher = fbr_protocol::resync::NodeHasher::new([7; 32]);
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_millis(500) {
        std::hint::black_box(hasher.hash(&data));
        n += 1;
    }
    (n << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
}

async fn run_case(opts: &ResyncBenchOptions, pct: f64) -> anyhow::Result<ResyncCase> {
    let disk_size = opts.disk_size;
    let base = ImageSpec::Generated {
        seed: opts.seed,
        used_ppm: 1_000_000,
    };
    let changed_ppm = (pct * 10_000.0).round() as u32;
    let source = ImageSpec::Diverged {
        base: Box::new(base.clone()),
        seed: opts.seed.wrapping_add(1_000),
        changed_ppm,
    };
    let mut site = Site::create(
        None,
        SiteOptions {
            agent_vms: vec!["vm1".into()],
            cache_capacity: 2 << 30,
            cache_segment_mib: 64,
            mt_credit_mib: 16,
            max_udp_payload: 1452,
            relay_args: vec![],
            mt_args: vec![],
        },
    )?;
    site.start_master_target()?;
    if opts.progress {
        eprintln!(
            "case {pct}%: seeding a {} GiB replica as it was at failover...",
            disk_size >> 30
        );
    }
    tokio::task::block_in_place(|| site.seed_disk("vm1", 0, &base, disk_size))?;
    site.start_relay()?;
    let disk_file = site.root.join("sources/vm1-disk0.img");
    if opts.progress {
        eprintln!("case {pct}%: building the source disk...");
    }
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        // Built here rather than by the agent (which builds it when missing), so that
        // both disks can be read cold, as a real resync reads them: the page cache would
        // hold the parts written last, and the scan would speed up as it reached them.
        drop(source.create_file(&disk_file, disk_size)?);
        let replica = fbr_master_target::files::image_path(
            &site.mt_data,
            &StreamId {
                vm: "vm1".into(),
                disk: 0,
            },
        );
        for path in [&disk_file, &replica] {
            evict_from_page_cache(path)
                .with_context(|| format!("evicting {} from the page cache", path.display()))?;
        }
        Ok(())
    })?;
    let plan = DiskPlan {
        id: StreamId {
            vm: "vm1".into(),
            disk: 0,
        },
        disk_size,
        group: "g".into(),
        source: SourceSpec::Generated {
            seed: opts.seed,
            vm_index: 0,
            disk_index: 0,
            profile: Profile::Random,
            content: Content::Random,
        },
        start: DiskStart {
            source_base: source,
            replica_base: base.clone(),
            disk_file: Some(disk_file.clone()),
            resync: ResyncPlan::Delta,
            resync_rate: None,
            resume: false,
        },
    };
    let mut agent_opts = site.agent_options(Duration::from_secs(2), Duration::from_secs(1))?;
    agent_opts.rate_bytes_per_s = Some((opts.churn_mb * 1e6) as u64);
    if opts.progress {
        eprintln!("case {pct}%: resyncing...");
    }
    let relay_metrics = site.relay_metrics_addr().context("relay metrics")?;
    let mt_metrics = site
        .master_target_metrics_addr()
        .context("master target metrics")?;
    let wire = |addr| {
        sample_sum(
            &http_get(addr, "/metrics").1,
            "fbr_relay_bytes_total",
            &[("stage", "wire")],
        )
    };
    let payload = |addr| {
        sample_sum(
            &http_get(addr, "/metrics").1,
            "fbr_relay_bytes_total",
            &[("stage", "compressed")],
        )
    };
    let hashes = |addr| {
        sample_sum(
            &http_get(addr, "/metrics").1,
            "fbr_master_target_hash_bytes_sent_total",
            &[],
        )
    };
    let relay_pid = site.relay_pid().context("relay pid")?;
    let mt_pid = site.master_target_pid().context("master target pid")?;
    let handle = agent::start(agent_opts, vec![plan], opts.seed).map_err(anyhow::Error::msg)?;
    // Wait for the resync to start, then measure from there.
    let started = loop {
        if let Some(s) = handle.resync_progress()[0].started {
            break s;
        }
        anyhow::ensure!(
            !handle.is_finished(),
            "the run ended before its resync began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (wire0, hash0) = (wire(relay_metrics), hashes(mt_metrics));
    let cpu = |pid| process_cpu_seconds(pid).unwrap_or(f64::NAN);
    let (agent0, mt0, relay0) = (cpu(std::process::id()), cpu(mt_pid), cpu(relay_pid));
    let churn0 = handle.stats.change_bytes_drawn.load(Relaxed);
    let payload0 = payload(relay_metrics);
    let mut eta_at: [Option<(Instant, Duration)>; 2] = [None, None];
    let mut next_report = Instant::now();
    let finished = loop {
        let live = handle.resync_progress()[0].clone();
        // In step when the master target applied the end mark.
        if let Some(f) = live.in_step {
            break f;
        }
        // Progress as the master target applied it: what the ETA is about.
        let done = live.applied_region as f64 / live.disk_regions.max(1) as f64;
        if opts.progress && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!(
                "case {pct}%: {:5.1} s: {:5.1}% applied, {:5.1}% sent, ETA {}",
                started.elapsed().as_secs_f64(),
                100.0 * done,
                100.0 * live.regions_done as f64 / live.disk_regions.max(1) as f64,
                live.eta
                    .map_or("-".into(), |e| format!("{:.1} s", e.as_secs_f64())),
            );
        }
        for (slot, at) in eta_at.iter_mut().zip([0.25, 0.5]) {
            if slot.is_none() && done >= at {
                *slot = live.eta.map(|eta| (Instant::now(), eta));
            }
        }
        anyhow::ensure!(!handle.is_finished(), "the run ended before its resync did");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = finished.duration_since(started).as_secs_f64();
    // What the last of the resync's records cost on the wire reaches the master target
    // shortly after; let the relay drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wire_bytes = (wire(relay_metrics) - wire0).max(0.0) as u64;
    let hash_bytes = (hashes(mt_metrics) - hash0).max(0.0) as u64;
    let (agent_cpu_s, master_target_cpu_s, relay_cpu_s) = (
        cpu(std::process::id()) - agent0,
        cpu(mt_pid) - mt0,
        cpu(relay_pid) - relay0,
    );
    let churn_bytes = handle.stats.change_bytes_drawn.load(Relaxed) - churn0;
    let payload_bytes = (payload(relay_metrics) - payload0).max(0.0) as u64;
    let live = handle.resync_progress()[0].clone();
    handle.request_stop();
    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let mut errors = report.failures.clone();
    // The replica equals the source disk, byte for byte.
    let id = StreamId {
        vm: "vm1".into(),
        disk: 0,
    };
    let image = fbr_master_target::files::image_path(&site.mt_data, &id);
    let verified = tokio::task::block_in_place(|| -> anyhow::Result<bool> {
        let a = std::fs::File::open(&image)?;
        let b = std::fs::File::open(&disk_file)?;
        Ok(match first_difference(&a, &b, disk_size)? {
            None => true,
            Some(at) => {
                errors.push(format!("the replica differs from the source at byte {at}"));
                false
            }
        })
    })?;
    let eta_error = |slot: Option<(Instant, Duration)>| {
        slot.map(|(at, eta)| {
            let actual = finished.saturating_duration_since(at).as_secs_f64();
            if opts.progress {
                eprintln!(
                    "case {pct}%: ETA {:.1} s predicted, {actual:.1} s actual",
                    eta.as_secs_f64()
                );
            }
            (eta.as_secs_f64() - actual).abs() / actual.max(1e-3)
        })
    };
    let differing_bytes = (disk_size as f64 * changed_ppm as f64 / 1e6) as u64;
    let (rsync_wire_bytes, rsync_s) = if opts.rsync {
        // The same pair of images: the stale one (rebuilt) brought to the source.
        if opts.progress {
            eprintln!("case {pct}%: rsync of the same stale image to the same source...");
        }
        let dir = site.root.join("rsync");
        let stale = dir.join("stale.img");
        let r = tokio::task::block_in_place(|| -> anyhow::Result<(u64, f64)> {
            // The site's replica and journal are not needed any more: room for the copy.
            std::fs::remove_dir_all(&site.mt_data)?;
            std::fs::remove_dir_all(&site.cache_dir)?;
            let rsh = crate::wanbench::local_rsh(&dir)?;
            drop(base.create_file(&stale, disk_size)?);
            crate::wanbench::rsync(&rsh, &disk_file, &stale)
        })?;
        (Some(r.0), Some(r.1))
    } else {
        (None, None)
    };
    Ok(ResyncCase {
        differing_percent: pct,
        disk_bytes: disk_size,
        differing_bytes,
        seconds_to_consistent: seconds,
        compared_bytes: live.compared_bytes,
        compare_gb_per_s: live.compared_bytes as f64 / seconds / 1e9,
        scan_gb_per_s_per_core: live.compared_bytes as f64
            / agent_cpu_s.max(master_target_cpu_s).max(1e-3)
            / 1e9,
        resync_sent_bytes: live.sent_bytes,
        hash_bytes,
        hash_share_of_disk: hash_bytes as f64 / disk_size as f64,
        wire_bytes,
        payload_bytes,
        churn_bytes,
        resync_bytes: payload_bytes.saturating_sub(churn_bytes) + hash_bytes,
        fewer_bytes_than_rsync: rsync_wire_bytes
            .map(|r| payload_bytes.saturating_sub(churn_bytes) + hash_bytes < r),
        wire_to_differing: (wire_bytes.saturating_sub(churn_bytes) + hash_bytes) as f64
            / differing_bytes.max(1) as f64,
        eta_error_at_25: eta_error(eta_at[0]),
        eta_error_at_50: eta_error(eta_at[1]),
        rsync_wire_bytes,
        rsync_s,
        agent_cpu_s,
        master_target_cpu_s,
        relay_cpu_s,
        verified: verified && errors.is_empty(),
        errors,
    })
}

/// Prints one line per case.
pub fn print(b: &ResyncBench) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "keyed BLAKE3 on one core: {:.2} GB/s",
        b.blake3_gb_per_s
    );
    for c in &b.cases {
        let _ = writeln!(
            err,
            "{:>5.1}% differing: {:>7.1} s, {:.2} GB/s ({:.2} GB/s per core), wire {:.1} MB for {:.1} MB differing ({:.2}x), resync {:.1} MB, hashes {:.4}% of the disk, ETA error {} / {}, rsync {} MB in {} s, {}",
            c.differing_percent,
            c.seconds_to_consistent,
            c.compare_gb_per_s,
            c.scan_gb_per_s_per_core,
            c.wire_bytes as f64 / 1e6,
            c.differing_bytes as f64 / 1e6,
            c.wire_to_differing,
            c.resync_bytes as f64 / 1e6,
            100.0 * c.hash_share_of_disk,
            c.eta_error_at_25.map_or("-".into(), |e| format!("{:.0}%", 100.0 * e)),
            c.eta_error_at_50.map_or("-".into(), |e| format!("{:.0}%", 100.0 * e)),
            c.rsync_wire_bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6)),
            c.rsync_s.map_or("-".into(), |s| format!("{s:.1}")),
            if c.verified { "verified" } else { "NOT VERIFIED" }
        );
    }
}

/// Writes back and drops a file's pages from the page cache (`POSIX_FADV_DONTNEED`
/// after `fsync`), so the next reads come from the disk.
fn evict_from_page_cache(path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::DontNeed)?;
    Ok(())
}
