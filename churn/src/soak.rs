//! `churn soak --minutes N`: steady churn for a long time through everything that goes
//! wrong in production, then every recovery point verified.
//!
//! The site: a relay with a small cache (128 MiB, so a WAN drop puts it under pressure
//! and ingest throttling engages), the master target behind an impairment proxy on
//! loopback (`crate::impair`, used here only to cut the link). Every `cycle` one event,
//! in turn:
//! 1. the relay is killed with SIGKILL and restarted (it recovers its cache);
//! 2. the master target is killed with SIGKILL and restarted;
//! 3. the WAN drops for a third of a cycle, then returns.
//!
//! Just before each event both daemons are sampled: resident memory, open file
//! descriptors, threads (`/proc`). Within one life of a process (between its restarts)
//! none of them may grow beyond a slack: a leak per connection, per stream session, per
//! reconnect or per segment shows there, where a restart cannot hide it. The run fails
//! if any does, if any point does not verify, or if the agents lose anything.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::{self, AgentOptions};
use crate::drill::DrillOptions;
use crate::harness::Site;
use crate::impair::ImpairedLink;
use crate::netem::LinkShape;

/// What a soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Time between events (kill the relay, kill the master target, drop the WAN).
    pub cycle: Duration,
    pub streams: u32,
    /// Total churn, MB/s.
    pub rate_mb: f64,
    pub progress: bool,
}

/// One sample of a daemon's resources.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Resources {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// Which life of the process (0 first, +1 at each restart).
    pub life: u32,
    pub rss_bytes: u64,
    pub open_files: u64,
    pub threads: u64,
}

/// What a soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub minutes: f64,
    pub relay_kills: u32,
    pub master_target_kills: u32,
    pub wan_drops: u32,
    /// Highest share of the cache in use seen at a sample (pressure reached).
    pub cache_peak_used_ratio: f64,
    pub logical_mb_acked: f64,
    pub reconnects: u64,
    pub recovery_points_verified: usize,
    pub relay: Vec<Resources>,
    pub master_target: Vec<Resources>,
    /// Growth within a life beyond the slack, one line per finding.
    pub growth: Vec<String>,
    pub verified: bool,
    pub errors: Vec<String>,
}

/// How much a resource may grow within one life of a process: allocator and cache
/// warm-up, a few more threads in the blocking pool, a few more sockets.
const RSS_SLACK_BYTES: u64 = 96 << 20;
const RSS_SLACK_RATIO: f64 = 1.5;
const FILES_SLACK: u64 = 32;
const THREADS_SLACK: u64 = 16;

/// Runs the soak (see the module docs).
pub async fn run(opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let drill = DrillOptions {
        disk_size: 16 << 20,
        seed: 31,
        progress: opts.progress,
        cache_capacity: 128 << 20,
        ..DrillOptions::streams(opts.streams, opts.duration, Some(opts.rate_mb))
    };
    let plans = drill.plans(opts.streams);
    let mut site = Site::create(None, drill.site_options(8, vec![]))?;
    let mt = site.start_master_target()?;
    let clean = LinkShape {
        rtt: Duration::from_millis(1),
        loss_percent: 0.0,
        rate_mbit: None,
        mtu: None,
    };
    let link = ImpairedLink::start(mt, clean).await?;
    site.route_relay_to_master_target_through(link.addr);
    site.start_relay()?;
    let agent_opts = AgentOptions {
        // Kills and drops stall acknowledgements for a while; the agents wait it out.
        drain_timeout: Duration::from_secs(300),
        reconnect_timeout: Duration::from_secs(120),
        ..drill.agent_options(&site)?
    };
    let handle = agent::start(agent_opts, plans, drill.seed).map_err(anyhow::Error::msg)?;
    let stats = handle.stats.clone();

    let started = Instant::now();
    let mut report = SoakReport {
        minutes: opts.duration.as_secs_f64() / 60.0,
        relay_kills: 0,
        master_target_kills: 0,
        wan_drops: 0,
        cache_peak_used_ratio: 0.0,
        logical_mb_acked: 0.0,
        reconnects: 0,
        recovery_points_verified: 0,
        relay: Vec::new(),
        master_target: Vec::new(),
        growth: Vec::new(),
        verified: false,
        errors: Vec::new(),
    };
    let (mut relay_life, mut mt_life) = (0u32, 0u32);
    let mut event = 0u32;
    // Events stop a cycle before the end, so the last backlog drains within the run.
    while started.elapsed() + 2 * opts.cycle <= opts.duration {
        tokio::time::sleep(opts.cycle).await;
        let at_s = started.elapsed().as_secs_f64();
        sample_daemons(&mut report, &site, at_s, (relay_life, mt_life));
        note_cache_use(&mut report, &site).await?;
        match event % 3 {
            0 => {
                say(opts, &format!("{at_s:.0} s: kill -9 the relay, restart it"));
                site.stop_relay(true)?;
                site.start_relay()?;
                relay_life += 1;
                report.relay_kills += 1;
            }
            1 => {
                say(
                    opts,
                    &format!("{at_s:.0} s: kill -9 the master target, restart it"),
                );
                site.stop_master_target(true)?;
                site.start_master_target()?;
                mt_life += 1;
                report.master_target_kills += 1;
            }
            _ => {
                say(
                    opts,
                    &format!(
                        "{at_s:.0} s: the WAN drops for {} s",
                        (opts.cycle / 3).as_secs()
                    ),
                );
                link.set_down(true);
                tokio::time::sleep(opts.cycle / 3).await;
                // The backlog is largest now.
                note_cache_use(&mut report, &site).await?;
                link.set_down(false);
                report.wan_drops += 1;
            }
        }
        event += 1;
    }
    let run = handle.finish().await.map_err(anyhow::Error::msg)?;
    report.logical_mb_acked = stats.logical_bytes_acked.load(Ordering::Relaxed) as f64 / 1e6;
    report.reconnects = stats.reconnects.load(Ordering::Relaxed);
    let at_s = started.elapsed().as_secs_f64();
    sample_daemons(&mut report, &site, at_s, (relay_life, mt_life));
    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let v = crate::verify::verify_run(&run, &site.mt_data).await?;
    report.growth.extend(growth("relay", &report.relay));
    report
        .growth
        .extend(growth("master target", &report.master_target));
    report.recovery_points_verified = v.recovery_points_verified;
    report.errors = v.errors;
    report.verified = v.verified && report.growth.is_empty();
    drop(link);
    Ok(report)
}

/// Raises `report.cache_peak_used_ratio` to the relay cache's share in use now.
async fn note_cache_use(report: &mut SoakReport, site: &Site) -> anyhow::Result<()> {
    if let Some(m) = site.relay_metrics_addr() {
        let text =
            tokio::task::spawn_blocking(move || crate::harness::http_get(m, "/metrics").1).await?;
        let used = crate::harness::sample(&text, "fbr_relay_cache_used_bytes").unwrap_or(0.0);
        let cap = crate::harness::sample(&text, "fbr_relay_cache_capacity_bytes").unwrap_or(1.0);
        report.cache_peak_used_ratio = report.cache_peak_used_ratio.max(used / cap.max(1.0));
    }
    Ok(())
}

fn say(opts: &SoakOptions, what: &str) {
    if opts.progress {
        eprintln!("soak: {what}");
    }
}

/// Samples both daemons into `report`; `lives`: the relay's and the master target's.
fn sample_daemons(report: &mut SoakReport, site: &Site, at_s: f64, lives: (u32, u32)) {
    let daemons = [
        (&mut report.relay, site.relay_pid(), lives.0),
        (&mut report.master_target, site.master_target_pid(), lives.1),
    ];
    for (samples, pid, life) in daemons {
        if let Some(r) = pid.and_then(|p| resources(p, at_s, life)) {
            samples.push(r);
        }
    }
}

/// A process's resident memory, open files and threads, from `/proc`.
pub fn resources(pid: u32, at_s: f64, life: u32) -> Option<Resources> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let open_files = std::fs::read_dir(Path::new(&format!("/proc/{pid}/fd")))
        .ok()?
        .count() as u64;
    Some(Resources {
        at_s,
        life,
        rss_bytes: field("VmRSS:")? * 1024,
        open_files,
        threads: field("Threads:")?,
    })
}

/// Findings of growth within a life beyond the slack: the life's last sample against
/// its first.
pub fn growth(name: &str, samples: &[Resources]) -> Vec<String> {
    let mut found = Vec::new();
    let lives: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.life).collect();
    for life in lives {
        let in_life: Vec<_> = samples.iter().filter(|s| s.life == life).collect();
        let (Some(first), Some(last)) = (in_life.first(), in_life.last()) else {
            continue;
        };
        if in_life.len() < 2 {
            continue;
        }
        let rss_limit = (first.rss_bytes as f64 * RSS_SLACK_RATIO) as u64 + RSS_SLACK_BYTES;
        if last.rss_bytes > rss_limit {
            found.push(format!(
                "{name} (life {life}): resident memory grew from {} MiB at {:.0} s to {} MiB at {:.0} s",
                first.rss_bytes >> 20,
                first.at_s,
                last.rss_bytes >> 20,
                last.at_s
            ));
        }
        if last.open_files > first.open_files + FILES_SLACK {
            found.push(format!(
                "{name} (life {life}): open files grew from {} to {}",
                first.open_files, last.open_files
            ));
        }
        if last.threads > first.threads + THREADS_SLACK {
            found.push(format!(
                "{name} (life {life}): threads grew from {} to {}",
                first.threads, last.threads
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(life: u32, rss_mib: u64, files: u64, threads: u64) -> Resources {
        Resources {
            at_s: 0.0,
            life,
            rss_bytes: rss_mib << 20,
            open_files: files,
            threads,
        }
    }

    #[test]
    fn growth_is_judged_within_a_life_only() {
        // A restart resets what a process holds: no finding across lives.
        assert!(growth(
            "relay",
            &[at(0, 100, 40, 10), at(1, 300, 90, 40), at(1, 320, 95, 41)]
        )
        .is_empty());
        let found = growth("relay", &[at(0, 100, 40, 10), at(0, 400, 200, 60)]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("resident memory grew from 100 MiB"));
    }
}
