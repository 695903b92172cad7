//! Replication through an emulated WAN ([`crate::netem`]): the master target in its own
//! network namespace behind delay, loss, a rate limit and a small path MTU, or a link
//! that drops for a while and returns (or, on a kernel without netem, the same
//! impairments from [`crate::impair`]'s proxy on loopback). Each case churns through
//! the relay a quarter faster than the link, measures what fraction of the link rate
//! the relay's WAN leg achieved while backlogged,
//! then drains and verifies every recovery point byte for byte. The fraction counts
//! what the link delivered to the master target (retransmissions and dropped packets
//! do not count) against its rate.
//!
//! `churn bench-wan-emulation --json` runs the grid (40 and 80 ms, 0.1% and 1% loss,
//! 100 Mbit/s and 1 Gbit/s, an MTU of 1,380, and a 60 s outage); the tests in
//! `tests/tests/wan_emulation.rs` run small cases of the same function.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::agent::{self, AgentOptions};
use crate::drill::DrillOptions;
use crate::harness::Site;
use crate::impair::ImpairedLink;
use crate::netem::{LinkShape, WanLink};
use crate::verify;
use crate::workload::Content;

/// One emulated-WAN run.
#[derive(Debug, Clone)]
pub struct WanCase {
    pub name: String,
    pub shape: LinkShape,
    /// Drop the link (100% loss both ways) this long, a few seconds into the churn.
    pub outage: Option<Duration>,
    /// Churn this long (an outage adds its own length).
    pub seconds: f64,
    pub streams: u32,
    pub disk_size: u64,
    /// Total churn rate, MB/s (`None`: flat out).
    pub rate_mb: Option<f64>,
    pub content: Content,
    /// The relay's congestion control towards the master target (`wan.congestion`).
    pub congestion: &'static str,
}

/// What one case measured.
#[derive(Debug, Clone, Serialize)]
pub struct WanCaseResult {
    pub name: String,
    /// `netem` (the kernel's, in a namespace) or `proxy` (the loopback impairment
    /// proxy, where the kernel lacks netem).
    pub emulation: &'static str,
    pub rtt_ms: f64,
    pub loss_percent: f64,
    pub rate_mbit: Option<u64>,
    pub mtu: Option<u32>,
    pub outage_s: Option<f64>,
    pub congestion: &'static str,
    /// What the relay sent on its WAN leg (UDP payload, retransmissions included) over
    /// the measured window.
    pub wire_mbit_per_s: f64,
    /// What the link delivered to the master target (headers included), and that against
    /// the link rate (where the link has one and no outage was made): the achieved
    /// fraction of the link.
    pub delivered_mbit_per_s: f64,
    pub link_fraction: Option<f64>,
    pub logical_mb: f64,
    pub recovery_points_verified: usize,
    /// The relay's `/readyz` (status, body) near the end of the outage, if one was made.
    pub readyz_during_outage: Option<(u16, String)>,
    pub verified: bool,
    pub errors: Vec<String>,
}

/// Runs `case`: site, master target behind the link, churn, measurement, verification.
pub async fn run_case(case: &WanCase, progress: bool) -> anyhow::Result<WanCaseResult> {
    // The kernel's netem in a namespace where it can be had; else (no netem in the
    // kernel, or no right to make namespaces) the impairment proxy on loopback.
    let link = match WanLink::create(case.shape) {
        Ok(link) => Some(link),
        Err(e) => {
            if progress {
                eprintln!(
                    "wan-emulation: no netem link ({e:#}); impairing through a proxy on loopback"
                );
            }
            None
        }
    };
    let outage = case.outage.unwrap_or_default();
    let disks_per_vm = 2;
    let opts = DrillOptions {
        vms: case.streams.div_ceil(disks_per_vm),
        disks_per_vm,
        disk_size: case.disk_size,
        content: case.content,
        seed: 11,
        progress,
        cache_capacity: 4 << 30,
        ..DrillOptions::streams(
            case.streams,
            Duration::from_secs_f64(case.seconds) + outage,
            case.rate_mb,
        )
    };
    let plans = opts.plans(case.streams);
    let relay_args = vec!["--wan-congestion".into(), case.congestion.into()];
    let site_opts = opts.site_options(64, relay_args);
    let mut site = Site::create(None, site_opts)?;
    let emulation = if link.is_some() { "netem" } else { "proxy" };
    let mut proxy = None;
    match link {
        Some(link) => {
            site.put_master_target_behind(link);
            site.start_master_target()?;
        }
        None => {
            let mt = site.start_master_target()?;
            let p = ImpairedLink::start(mt, case.shape).await?;
            site.route_relay_to_master_target_through(p.addr);
            proxy = Some(p);
        }
    }
    site.start_relay()?;
    let agent_opts = AgentOptions {
        // A backlog built behind a slow or broken link takes a while to drain.
        drain_timeout: Duration::from_secs(300),
        ..opts.agent_options(&site)?
    };
    let handle = agent::start(agent_opts, plans, opts.seed).map_err(anyhow::Error::msg)?;
    let metrics = site.relay_metrics_addr().context("the relay's metrics")?;
    let wire = move || crate::harness::relay_wire_bytes(metrics);
    // Warm-up: the congestion window opens (a few round trips) and a backlog builds.
    let warm_up = Duration::from_secs(3).min(Duration::from_secs_f64(case.seconds / 3.0));
    tokio::time::sleep(warm_up).await;
    let delivered = |site: &mut Site, proxy: Option<&ImpairedLink>| match proxy {
        Some(p) => Some(p.delivered_to_server()),
        None => site
            .master_target_link()
            .and_then(|l| l.delivered_to_namespace()),
    };
    let wire_before = tokio::task::spawn_blocking(wire).await?;
    let delivered_before = delivered(&mut site, proxy.as_ref());
    let started = Instant::now();
    let mut readyz_during_outage = None;
    if let Some(length) = case.outage {
        if progress {
            eprintln!(
                "wan-emulation: {}: link down for {} s",
                case.name,
                length.as_secs()
            );
        }
        set_down(&mut site, proxy.as_ref(), true)?;
        // Near the end of the outage the relay must say it is not ready, and why.
        tokio::time::sleep(length.saturating_sub(Duration::from_secs(3))).await;
        let probe = site.relay_metrics_addr().context("the relay's metrics")?;
        readyz_during_outage = Some(
            tokio::task::spawn_blocking(move || crate::harness::http_get(probe, "/readyz")).await?,
        );
        tokio::time::sleep(length.min(Duration::from_secs(3))).await;
        set_down(&mut site, proxy.as_ref(), false)?;
        if progress {
            eprintln!("wan-emulation: {}: link back", case.name);
        }
    }
    let remaining =
        Duration::from_secs_f64(case.seconds).saturating_sub(warm_up + Duration::from_millis(500));
    tokio::time::sleep(remaining).await;
    let wire_after = tokio::task::spawn_blocking(wire).await?;
    let delivered_after = delivered(&mut site, proxy.as_ref());
    let window_s = started.elapsed().as_secs_f64();
    let delivered_mbit_per_s = match (delivered_before, delivered_after) {
        (Some(b), Some(a)) => (a - b) as f64 * 8.0 / 1e6 / window_s,
        _ => anyhow::bail!("the emulated link does not count what it delivers"),
    };
    let wire_bytes_per_s = match (wire_before, wire_after) {
        (Some(b), Some(a)) => (a - b) / window_s,
        _ => anyhow::bail!("the relay's metrics lack fbr_relay_bytes_total{{stage=\"wire\"}}"),
    };
    let stats = handle.stats.clone();
    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let v = verify::verify_run(&report, &site.mt_data).await?;
    let errors = v.errors.clone();
    let wire_mbit_per_s = wire_bytes_per_s * 8.0 / 1e6;
    let logical = stats
        .logical_bytes_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(proxy);
    Ok(WanCaseResult {
        name: case.name.clone(),
        emulation,
        rtt_ms: case.shape.rtt.as_secs_f64() * 1e3,
        loss_percent: case.shape.loss_percent,
        rate_mbit: case.shape.rate_mbit,
        mtu: case.shape.mtu,
        outage_s: case.outage.map(|d| d.as_secs_f64()),
        congestion: case.congestion,
        wire_mbit_per_s,
        delivered_mbit_per_s,
        link_fraction: match (case.shape.rate_mbit, case.outage) {
            (Some(r), None) => Some(delivered_mbit_per_s / r as f64),
            _ => None,
        },
        logical_mb: logical as f64 / 1e6,
        recovery_points_verified: v.recovery_points_verified,
        readyz_during_outage,
        verified: v.verified && report.failures.is_empty(),
        errors,
    })
}

fn set_down(site: &mut Site, proxy: Option<&ImpairedLink>, down: bool) -> anyhow::Result<()> {
    match (proxy, site.master_target_link()) {
        (Some(p), _) => {
            p.set_down(down);
            Ok(())
        }
        (None, Some(link)) => link.set_down(down),
        (None, None) => anyhow::bail!("no emulated WAN to take down"),
    }
}

/// The benchmark's grid, with the relay's `congestion` control: every round trip x loss
/// at 100 Mbit/s and 1 Gbit/s, a path MTU below 1,400, and a 60 s outage.
pub fn grid(seconds: f64, streams: u32, congestion: &'static str) -> Vec<WanCase> {
    let case = |name: String, rtt_ms: u64, loss: f64, mbit: u64, mtu: Option<u32>| WanCase {
        name: format!("{name}_{congestion}"),
        congestion,
        shape: LinkShape {
            rtt: Duration::from_millis(rtt_ms),
            loss_percent: loss,
            rate_mbit: Some(mbit),
            mtu,
        },
        outage: None,
        seconds,
        streams,
        disk_size: 64 << 20,
        // A quarter above the link rate (incompressible): the link is the bottleneck,
        // and the backlog it leaves drains in seconds.
        rate_mb: Some(mbit as f64 / 8.0 * 1.25),
        content: Content::Random,
    };
    let mut cases = Vec::new();
    for mbit in [100, 1000] {
        for rtt in [40, 80] {
            for loss in [0.1, 1.0] {
                cases.push(case(
                    format!("{mbit}mbit_{rtt}ms_{loss}loss"),
                    rtt,
                    loss,
                    mbit,
                    None,
                ));
            }
        }
    }
    cases.push(case(
        "100mbit_40ms_mtu1380".into(),
        40,
        0.1,
        100,
        Some(1380),
    ));
    let mut outage = case("100mbit_40ms_outage60s".into(), 40, 0.1, 100, None);
    outage.outage = Some(Duration::from_secs(60));
    outage.rate_mb = Some(4.0);
    outage.content = Content::Mixed;
    cases.push(outage);
    cases
}
