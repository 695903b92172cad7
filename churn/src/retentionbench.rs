//! `churn bench-retention`: what going back in time costs at the master target.
//!
//! One site, churned at a steady rate for the window (`--seconds`, a tag a second, every
//! point verified byte for byte afterwards). The disk's own write rate is measured in
//! the data directory (sequential 1 MiB writes and one `fdatasync`). Then, at the
//! recovery points 1%, 10% and 50% of the window ago:
//! - a test failover is made through the running daemon, and timed;
//! - the group is rolled back in place (daemon stopped), newest target first, each
//!   timed.
//!
//! Last, a trim pass drops every point but the newest, timed, with the journal blocks
//! it frees (trimming throughput).
//!
//! Each is compared with its *floor*: the bytes changed since the point divided by the
//! disk's write rate (target: within 2x). Also reported: the journal's bytes per byte
//! applied (records and before-images; the design's cost, target <= 2), and the apply
//! rate during the churn. Which copy method the test failovers used depends on the file
//! system of `--dir` (reflink on XFS or Btrfs, a sparse copy elsewhere).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fbr_master_target::control::{Request, Response};
use fbr_protocol::StreamId;
use serde::Serialize;

use crate::agent::{self, DiskPlan};
use crate::harness::{http_get, sample_sum, Site, SiteOptions};
use crate::source::SourceSpec;
use crate::workload::{Content, Profile};

/// What to run.
#[derive(Debug, Clone)]
pub struct RetentionBenchOptions {
    pub disks: u32,
    pub disk_size: u64,
    /// The window: how long the churn lasts.
    pub seconds: f64,
    /// Steady churn over all disks, MB/s.
    pub rate_mb: f64,
    /// Where the site lives (its file system decides reflink or copy); default a
    /// temporary directory.
    pub dir: Option<PathBuf>,
    pub seed: u64,
}

/// Going back to one point.
#[derive(Debug, Clone, Serialize)]
pub struct BackInTime {
    /// How far back the point is, as a share of the window.
    pub percent_ago: f64,
    pub tag_id: u64,
    pub seconds: f64,
    /// Bytes of before-images past the point: what was written since it.
    pub changed_bytes: u64,
    /// Distinct image bytes actually put back (each changed byte once; at most
    /// `changed_bytes`).
    pub put_back_bytes: u64,
    /// `changed_bytes` / the disk's write rate.
    pub floor_seconds: f64,
    /// `seconds / floor_seconds`: target <= 2 (`None` when nothing changed since).
    pub ratio_to_floor: Option<f64>,
    /// Test failovers: how the copies were made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// One trim pass.
#[derive(Debug, Clone, Serialize)]
pub struct Trim {
    pub seconds: f64,
    pub tags_dropped: usize,
    /// Journal blocks freed (allocated bytes before minus after).
    pub bytes_freed: u64,
    pub gb_per_s: f64,
}

/// The benchmark's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionBench {
    pub disks: u32,
    pub disk_size: u64,
    pub window_seconds: f64,
    pub recovery_points: usize,
    pub disk_write_mb_per_s: f64,
    /// Logical bytes applied during the churn, and at what rate.
    pub applied_bytes: u64,
    pub apply_mb_per_s: f64,
    /// The journals' size: records and before-images.
    pub journal_bytes: u64,
    /// `journal_bytes / applied_bytes`: target <= 2.
    pub retention_bytes_per_changed_byte: f64,
    pub test_failovers: Vec<BackInTime>,
    pub rollbacks: Vec<BackInTime>,
    /// After the rollbacks, trimming every point but the newest.
    pub trim: Trim,
    /// Every recovery point verified byte for byte before going back, and the images
    /// after the last rollback equal to that point replayed from the journal's start.
    pub verified: bool,
    pub rolled_back_images_match: bool,
}

const AGO: [f64; 3] = [1.0, 10.0, 50.0];

/// Runs the benchmark.
pub async fn run(o: RetentionBenchOptions) -> anyhow::Result<RetentionBench> {
    let vms: Vec<String> = (1..=o.disks).map(|i| format!("vm{i}")).collect();
    let root = match &o.dir {
        Some(d) => Some(
            tempfile::Builder::new()
                .prefix("fbr-bench-retention-")
                .tempdir_in(d)
                .with_context(|| format!("a directory in {}", d.display()))?,
        ),
        None => None,
    };
    let mut site = Site::create(
        root.as_ref().map(|t| t.path().to_path_buf()),
        SiteOptions {
            agent_vms: vms.clone(),
            cache_capacity: 4 << 30,
            cache_segment_mib: 64,
            mt_credit_mib: 16,
            max_udp_payload: 1452,
            relay_args: vec![],
            mt_args: vec![],
        },
    )?;
    site.start_master_target()?;
    site.start_relay()?;
    let disk_write_mb_per_s = disk_write_rate(&site.root)?;
    eprintln!("bench-retention: the data directory's disk writes {disk_write_mb_per_s:.0} MB/s");

    let plans: Vec<DiskPlan> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| DiskPlan {
            id: StreamId {
                vm: vm.clone(),
                disk: 0,
            },
            disk_size: o.disk_size,
            group: "g".into(),
            source: SourceSpec::Generated {
                seed: o.seed,
                vm_index: i as u32,
                disk_index: 0,
                profile: Profile::Mixed,
                content: Content::Mixed,
            },
            start: Default::default(),
        })
        .collect();
    let mut opts = site.agent_options(
        Duration::from_secs_f64(o.seconds),
        Duration::from_millis(1000),
    )?;
    opts.rate_bytes_per_s = Some((o.rate_mb * 1e6) as u64);
    opts.app_tag_every = 0;
    let started = Instant::now();
    let report = agent::start(opts, plans, o.seed)
        .map_err(anyhow::Error::msg)?
        .finish()
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        report.failures.is_empty(),
        "churn failed: {:?}",
        report.failures
    );
    let churn_s = started.elapsed().as_secs_f64();
    let metrics = site
        .master_target_metrics_addr()
        .map(|a| http_get(a, "/metrics").1)
        .unwrap_or_default();
    let applied_bytes = sample_sum(
        &metrics,
        "fbr_master_target_logical_bytes_applied_total",
        &[],
    ) as u64;

    // The points, oldest first, and the ones 1%, 10% and 50% of the window ago.
    let points = ask(&site, &Request::Points)
        .await?
        .points
        .unwrap_or_default();
    let tags: Vec<u64> = points["groups"][0]["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["complete"] == true)
                .filter_map(|p| p["tag_id"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(tags.len() >= 4, "only {} recovery points", tags.len());
    let at = |pct: f64| {
        let back = ((tags.len() - 1) as f64 * pct / 100.0).round().max(1.0) as usize;
        tags[tags.len() - 1 - back.min(tags.len() - 1)]
    };
    let floor = |bytes: u64| bytes as f64 / (disk_write_mb_per_s * 1e6);

    let mut test_failovers = Vec::new();
    for pct in AGO {
        let tag = at(pct);
        let name = format!("bench-{}", pct as u64);
        let t = Instant::now();
        let made = ask(
            &site,
            &Request::TestFailoverCreate {
                group: "g".into(),
                tag,
                name: name.clone(),
                vm: None,
            },
        )
        .await?;
        let seconds = t.elapsed().as_secs_f64();
        let tf = made
            .test_failover
            .context("no test failover in the answer")?;
        let changed: u64 = tf.disks.iter().map(|d| d.restored_bytes).sum();
        let put_back: u64 = tf.disks.iter().map(|d| d.put_back_bytes).sum();
        let method = tf
            .disks
            .first()
            .map(|d| {
                serde_json::to_value(d.method)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
            })
            .unwrap_or_default();
        test_failovers.push(BackInTime {
            percent_ago: pct,
            tag_id: tag,
            seconds,
            changed_bytes: changed,
            put_back_bytes: put_back,
            floor_seconds: floor(changed),
            ratio_to_floor: ratio(seconds, floor(changed)),
            method,
        });
        ask(&site, &Request::TestFailoverDelete { name }).await?;
    }

    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let journal_bytes = journals_size(&site.mt_data)?;
    let v = crate::verify::verify(&report.manifest, &site.mt_data).map_err(anyhow::Error::msg)?;

    // The oldest target as the journal replays it from the start: what the last
    // rollback must give, byte for byte.
    let oldest = at(AGO[AGO.len() - 1]);
    let expected = materialize_all(&site.mt_data, "g", oldest)?;

    let mut rollbacks = Vec::new();
    for pct in AGO {
        let tag = at(pct);
        let t = Instant::now();
        let done = fbr_master_target::rollback::roll_back_group(&site.mt_data, "g", tag)?;
        let seconds = t.elapsed().as_secs_f64();
        let changed: u64 = done.disks.iter().map(|d| d.done.restored_bytes).sum();
        let put_back: u64 = done.disks.iter().map(|d| d.done.put_back_bytes).sum();
        rollbacks.push(BackInTime {
            percent_ago: pct,
            tag_id: tag,
            seconds,
            changed_bytes: changed,
            put_back_bytes: put_back,
            floor_seconds: floor(changed),
            ratio_to_floor: ratio(seconds, floor(changed)),
            method: None,
        });
    }
    // Trimming: everything older than the newest point goes (a window of 1 s).
    let trim = {
        let store = fbr_master_target::Store::open(&site.mt_data)?;
        let before = allocated(&site.mt_data)?;
        let t = Instant::now();
        let pass = fbr_master_target::retention::trim_pass(
            &site.mt_data,
            &store,
            &fbr_master_target::retention::Retention::uniform(
                fbr_master_target::retention::RetentionPolicy {
                    window: Duration::from_secs(1),
                    max_bytes: None,
                },
            ),
            fbr_master_target::replica::unix_ms(std::time::SystemTime::now()),
        )
        .map_err(anyhow::Error::msg)?;
        let seconds = t.elapsed().as_secs_f64();
        let freed = before.saturating_sub(allocated(&site.mt_data)?);
        Trim {
            seconds,
            tags_dropped: pass.tags_dropped,
            bytes_freed: freed,
            gb_per_s: freed as f64 / seconds.max(1e-9) / 1e9,
        }
    };

    let mut rolled_back_images_match = true;
    for (image, want) in &expected {
        let got = std::fs::File::open(image)?;
        let want_f = std::fs::File::open(want)?;
        let size = got.metadata()?.len();
        rolled_back_images_match &= crate::image::first_difference(&got, &want_f, size)?.is_none();
        std::fs::remove_file(want)?;
    }
    Ok(RetentionBench {
        disks: o.disks,
        disk_size: o.disk_size,
        window_seconds: churn_s,
        recovery_points: tags.len(),
        disk_write_mb_per_s,
        applied_bytes,
        apply_mb_per_s: applied_bytes as f64 / churn_s / 1e6,
        journal_bytes,
        retention_bytes_per_changed_byte: journal_bytes as f64 / (applied_bytes.max(1)) as f64,
        test_failovers,
        rollbacks,
        trim,
        verified: v.verified && rolled_back_images_match,
        rolled_back_images_match,
    })
}

/// Each disk of `group` at point `tag`, replayed from its journal's start into a file
/// beside its image: `(image, materialized)` pairs.
fn materialize_all(
    mt_data: &Path,
    group: &str,
    tag: u64,
) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    use fbr_master_target::files::{image_path, journal_path};
    let store = fbr_master_target::Store::open(mt_data)?;
    let point = store
        .recovery_points()?
        .into_iter()
        .find(|p| p.group == group && p.tag_id == tag)
        .context("the point to check")?;
    drop(store);
    let mut out = Vec::new();
    for l in &point.landed {
        let id = StreamId {
            vm: l.vm.clone(),
            disk: l.disk,
        };
        let image = image_path(mt_data, &id);
        let want = image.with_extension("expected");
        let f = std::fs::File::create(&want)?;
        f.set_len(std::fs::metadata(&image)?.len())?;
        fbr_master_target::journal::replay(
            &journal_path(mt_data, &id),
            l.seq,
            &mut fbr_master_target::replica::FileImage(&f),
        )
        .map_err(anyhow::Error::msg)?;
        out.push((image, want));
    }
    Ok(out)
}

/// `seconds / floor`, when there was something to do.
fn ratio(seconds: f64, floor: f64) -> Option<f64> {
    (floor > 0.0).then(|| seconds / floor)
}

/// The answer of the running master target to `request`.
async fn ask(site: &Site, request: &Request) -> anyhow::Result<Response> {
    let socket = site.master_target_control_socket();
    let answer: Response = fbr_daemon::control::request(&socket, "master target", request)
        .await
        .map_err(anyhow::Error::msg)?;
    match answer.error {
        Some(e) => anyhow::bail!("{request:?}: {e}"),
        None => Ok(answer),
    }
}

/// Sequential 1 MiB writes of 256 MiB and one `fdatasync`, in `dir`: MB/s.
fn disk_write_rate(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("write-rate.tmp");
    let mut f = std::fs::File::create(&path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    let t = Instant::now();
    for _ in 0..256 {
        f.write_all(&chunk)?;
    }
    f.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(256.0 * (1 << 20) as f64 / secs / 1e6)
}

/// Bytes of disk the journals occupy (allocated blocks).
fn allocated(mt_data: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for vm in std::fs::read_dir(mt_data.join("disks"))? {
        for disk in std::fs::read_dir(vm?.path())? {
            total += std::fs::metadata(disk?.path().join("journal.fbrj"))?.blocks() * 512;
        }
    }
    Ok(total)
}

/// Bytes of every disk's journal.
fn journals_size(mt_data: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for vm in std::fs::read_dir(mt_data.join("disks"))? {
        for disk in std::fs::read_dir(vm?.path())? {
            total += std::fs::metadata(disk?.path().join("journal.fbrj"))?.len();
        }
    }
    Ok(total)
}

/// A readable summary on stderr.
pub fn print(r: &RetentionBench) {
    eprintln!(
        "bench-retention: {} disks of {} MiB, {:.0} s window, {} recovery points, {:.1} MB/s applied, journal {:.2} bytes per byte applied, disk writes {:.0} MB/s",
        r.disks,
        r.disk_size >> 20,
        r.window_seconds,
        r.recovery_points,
        r.apply_mb_per_s,
        r.retention_bytes_per_changed_byte,
        r.disk_write_mb_per_s
    );
    eprintln!(
        "  trim of all but the newest point: {:.3} s, {:.1} MB freed, {} tags dropped, {:.1} GB/s",
        r.trim.seconds,
        r.trim.bytes_freed as f64 / 1e6,
        r.trim.tags_dropped,
        r.trim.gb_per_s
    );
    for (what, list) in [
        ("test failover", &r.test_failovers),
        ("rollback", &r.rollbacks),
    ] {
        for b in list {
            eprintln!(
                "  {what} to {:>4.0}% ago (tag {}): {:.3} s for {:.1} MB changed; floor {:.3} s; {}{}",
                b.percent_ago,
                b.tag_id,
                b.seconds,
                b.changed_bytes as f64 / 1e6,
                b.floor_seconds,
                b.ratio_to_floor
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                b.method.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
            );
        }
    }
}
