//! `churn drill-failback`: the whole failback cycle on one machine, driven through the
//! relay's controller API exactly as an operator would (`relay ctl` speaks the same
//! API), and verified byte for byte.
//!
//! 1. A site enrolled through its configuration server; the on-premises disks seeded
//!    with their failover-day state; the Azure VMs (the agent emulator) churning.
//! 2. **Reprotect** every VM (one plan, original location: delta resync while they
//!    churn) until each has a recovery point: PROTECTED, with the RPO shown.
//! 3. A **test failover** of one VM and its **cleanup** (a rehearsal, which also
//!    measures the copy and boot rates the estimates use).
//! 4. **Run A, planned failover to *latest*** of the first half of the VMs (a plan with
//!    one boot group per VM): the estimate first, then the job; the Azure VMs are shut
//!    down through the emulated hypervisor, the relay drained, the disks made at the
//!    final point, the on-premises VMs powered on. Each disk must equal the source's
//!    final state byte for byte: zero data lost.
//! 5. **Run B, unplanned failover to a named point** of the other half (two boot groups
//!    with a delay; the VMs span both replication groups), while those VMs keep
//!    writing: each disk must equal the source at that point, and the data lost is
//!    what they wrote after it.
//!    Then a **change of point** to a newer one, before commit: the VMs are powered off,
//!    their disks made again at that point, and powered on.
//! 6. **Commit** both: the Azure VMs are deleted.
//! 7. **Reprotect back** every VM: the master target in Azure (a second
//!    `master-target`, `azure-master-target`) is given the Azure disks the VMs left
//!    (`master-target seed-disk`), and the controller points each on-premises VM's agent
//!    at the on-premises relay (`relay-b`, forwarding to it) through the on-premises
//!    hook's `replicate`. The agents (the emulator again, now writing the on-premises
//!    disks: the failover copies) resync by delta against the Azure disks and churn on:
//!    PROTECTED_BACK once each has a recovery point in Azure.
//! 8. The verifier proves every recovery point, and every failover copy, equal to the
//!    sources; and every recovery point of the reverse replica, in Azure, equal to the
//!    on-premises disks.
//!
//! It prints a timeline (each job's estimate against its actual, and the ETA it showed
//! at half way against the time that was really left) and a JSON summary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fbr_enroll::heartbeat::HeartbeatClient;
use fbr_protocol::StreamId;
use serde::Serialize;

use crate::agent::{self, AgentOptions, DiskPlan, DiskStart, ResyncPlan};
use crate::drill::{plan_disks, DrillOptions, Reprotect, ReprotectLocation};
use crate::harness::{bin_path, Site, SiteOptions};
use crate::image::ImageSpec;
use crate::platform;
use crate::source::SourceSpec;
use crate::verify::{self, CopyCheck};
use crate::workload::Content;

/// What to run.
#[derive(Debug, Clone)]
pub struct FailbackOptions {
    /// VMs (at least 2: half fail over planned, half unplanned).
    pub vms: u32,
    pub disks_per_vm: u32,
    pub disk_size: u64,
    /// Steady churn, bytes per second, all disks together.
    pub rate_bytes_per_s: u64,
    pub tag_interval: Duration,
    /// How long the VMs churn while protected before the failovers.
    pub protected_for: Duration,
    pub seed: u64,
    pub keep: Option<PathBuf>,
    pub progress: bool,
}

impl Default for FailbackOptions {
    fn default() -> Self {
        FailbackOptions {
            vms: 4,
            disks_per_vm: 1,
            disk_size: 16 << 20,
            rate_bytes_per_s: 4_000_000,
            tag_interval: Duration::from_millis(500),
            protected_for: Duration::from_secs(4),
            seed: 42,
            keep: None,
            progress: true,
        }
    }
}

/// One job of the drill, as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub label: String,
    pub job: u64,
    pub operation: String,
    pub vms: Vec<String>,
    pub state: String,
    /// Seconds from the drill's start to the request.
    pub at_s: f64,
    pub estimate_s: Option<f64>,
    pub actual_s: f64,
    /// The ETA the job showed when it first reached 50%, and the time really left.
    pub eta_at_half_s: Option<f64>,
    pub left_at_half_s: Option<f64>,
    /// |ETA − left| / left at half way.
    pub eta_error: Option<f64>,
    pub steps: Vec<StepTiming>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
    pub note: String,
}

/// What the drill found.
#[derive(Debug, Serialize)]
pub struct FailbackSummary {
    pub verified: bool,
    /// Bytes of the failed-over disks that differ from the sources' final state, per
    /// point kind (`latest_planned` must be 0).
    pub data_loss_bytes: BTreeMap<String, u64>,
    /// Request to powered on, per run.
    pub rto_s: BTreeMap<String, f64>,
    /// The largest ETA error at half way over the failovers.
    pub eta_error: Option<f64>,
    /// p99 replication lag while protected, seconds.
    pub rpo_p99_s: f64,
    pub recovery_points_verified: usize,
    pub copies_verified: usize,
    /// Recovery points of the reverse replica (in Azure, after reprotect back) proven
    /// equal to the on-premises disks.
    pub reverse_recovery_points_verified: usize,
    /// Bytes the delta resync of reprotect back sent (of the disks' total).
    pub reverse_resync_bytes: u64,
    /// The estimate shown before the planned failover.
    pub planned_estimate: serde_json::Value,
    pub timeline: Vec<TimelineEntry>,
    pub errors: Vec<String>,
    pub site_dir: Option<PathBuf>,
}

/// The relay's operator API, as the drill's operator uses it (with the site's token).
#[derive(Debug)]
pub struct Operator {
    client: HeartbeatClient,
    started: Instant,
    progress: bool,
}

impl Operator {
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let b = self
            .client
            .request("GET", path, Vec::new())
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(serde_json::from_slice(&b)?)
    }

    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let b = self
            .client
            .request("POST", path, serde_json::to_vec(&body)?)
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// Starts a job and follows it to its end.
    pub async fn run(
        &self,
        label: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<(TimelineEntry, serde_json::Value)> {
        let at_s = self.started.elapsed().as_secs_f64();
        let asked = Instant::now();
        let started = self.post("/v1/jobs", body).await?;
        let id = started["job"]["id"]
            .as_u64()
            .context("the job's id in the answer")?;
        let mut half: Option<(Instant, Option<f64>)> = None;
        let mut last_step = String::new();
        let job = loop {
            let doc = self.get(&format!("/v1/jobs/{id}")).await?;
            let job = doc["job"].clone();
            let percent = job["percent"].as_f64().unwrap_or(0.0);
            let state = job["state"].as_str().unwrap_or("").to_owned();
            if half.is_none() && percent >= 50.0 && state == "running" {
                half = Some((Instant::now(), job["eta_s"].as_f64()));
            }
            if self.progress {
                let step = job["steps"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["state"] == "running"))
                    .and_then(|s| s["step"].as_str())
                    .unwrap_or("")
                    .to_owned();
                if step != last_step && !step.is_empty() {
                    eprintln!("  {label}: {step} ({percent:.0}%)");
                    last_step = step;
                }
            }
            if state != "running" {
                break job;
            }
            anyhow::ensure!(
                asked.elapsed() < timeout,
                "{label}: job {id} still running after {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ended = Instant::now();
        let actual_s = ended.duration_since(asked).as_secs_f64();
        let (eta_at_half_s, left_at_half_s) = match half {
            Some((t, eta)) => (eta, Some(ended.duration_since(t).as_secs_f64())),
            None => (None, None),
        };
        let eta_error = match (eta_at_half_s, left_at_half_s) {
            (Some(eta), Some(left)) if left > 0.0 => Some((eta - left).abs() / left),
            _ => None,
        };
        let steps = job["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| StepTiming {
                step: s["step"].as_str().unwrap_or("").to_owned(),
                seconds: match (s["started_ms"].as_u64(), s["ended_ms"].as_u64()) {
                    (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1000.0,
                    _ => 0.0,
                },
                note: s["note"].as_str().unwrap_or("").to_owned(),
            })
            .collect();
        let entry = TimelineEntry {
            label: label.to_owned(),
            job: id,
            operation: job["operation"]["operation"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            vms: job["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            state: job["state"].as_str().unwrap_or("").to_owned(),
            at_s,
            estimate_s: job["estimate_s"].as_f64(),
            actual_s,
            eta_at_half_s,
            left_at_half_s,
            eta_error,
            steps,
        };
        if self.progress {
            eprintln!("  {label}: job {id} {} in {actual_s:.1} s", entry.state);
        }
        Ok((entry, job))
    }
}

/// A site ready for failback: enrolled through its configuration server, the on-premises
/// disks seeded, the relay's controller with the emulated platforms' hooks, the Azure VMs
/// (the agent emulator) churning, and an operator holding the site's token.
#[derive(Debug)]
pub struct FailbackSite {
    pub site: Site,
    pub operator: Operator,
    pub handle: agent::RunHandle,
    pub vms: Vec<String>,
    /// The emulated platforms' state directories ([`platform`]).
    pub azure: PathBuf,
    pub on_premises: PathBuf,
    shutdowns: tokio::task::JoinHandle<()>,
    /// The on-premises VMs' agents, started once reprotect back points them at the
    /// on-premises relay ([`serve_reverse_agents`]).
    reverse: ReverseAgents,
    reverse_task: tokio::task::JoinHandle<()>,
}

/// The agents of the on-premises VMs (reprotect back), per VM as started.
type ReverseAgents = std::sync::Arc<std::sync::Mutex<Vec<(String, agent::RunHandle)>>>;

/// What starts the on-premises VMs' agents.
#[derive(Debug, Clone)]
struct ReverseSetup {
    on_premises: PathBuf,
    /// Where the on-premises disks' starting states and the Azure disks are kept.
    dir: PathBuf,
    /// The Azure VMs' disk plans (profile and size), reused for their on-premises life.
    plans: Vec<DiskPlan>,
    options: AgentOptions,
    seed: u64,
}

impl FailbackSite {
    /// Sets the site up and starts the VMs churning (they resync once reprotected).
    pub async fn start(opts: &FailbackOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(opts.vms >= 2, "the failback drill needs at least 2 VMs");
        let drill = drill_options(opts);
        let vms: Vec<String> = (1..=opts.vms).map(|v| format!("vm{v}")).collect();
        let mut plans = plan_disks(&drill);
        let mut site = Site::create(
            opts.keep.clone(),
            SiteOptions {
                agent_vms: vms.clone(),
                cache_capacity: drill.cache_capacity,
                cache_segment_mib: 64,
                relay_args: vec![],
                mt_args: vec![],
                mt_credit_mib: drill.credit_mib,
                max_udp_payload: drill.max_udp_payload,
            },
        )?;
        let config_server = site.enroll_through_config_server()?;
        if opts.progress {
            eprintln!(
                "configuration server on {config_server}: master target, relay and agent enrolled"
            );
        }
        site.start_master_target()?;
        let reprotect = drill.reprotect.as_ref().expect("a reprotect drill");
        crate::drill::prepare_reprotect(&mut site, &mut plans, reprotect, opts.seed)?;
        // Reprotect back's side: the master target in Azure (given the Azure disks
        // after the commit) and the on-premises relay forwarding to it.
        site.enroll_azure_master_target()?;
        site.enroll_relay_b()?;
        let azure_mt = site.start_azure_master_target()?;
        site.point_relay_b_at(azure_mt);
        let relay_back = site.start_relay_b()?;

        // The emulated platforms and their hooks.
        let azure = site.root.join("azure");
        let on_premises = site.root.join("on-premises");
        let hooks = site.root.join("hooks");
        for d in [&azure, &on_premises, &hooks] {
            std::fs::create_dir_all(d)?;
        }
        let churn = bin_path("churn")?;
        platform::write_hook_script(&hooks.join("azure-hook"), &churn, &azure, true)?;
        platform::write_hook_script(&hooks.join("on-premises-hook"), &churn, &on_premises, false)?;
        for vm in &vms {
            platform::set_state(&azure, vm, "running")?;
        }
        site.relay_args_mut().extend([
            "--config-server".to_owned(),
            config_server.to_string(),
            "--heartbeat-interval-s".to_owned(),
            "1".to_owned(),
            "--azure-hook".to_owned(),
            hooks.join("azure-hook").display().to_string(),
            "--on-premises-hook".to_owned(),
            hooks.join("on-premises-hook").display().to_string(),
            // The emulated VMs: a shut-down is the agent's next tag after its last
            // write, acknowledged (up to a tag interval), plus the hook's run and its
            // polling: 1.6 tag intervals as measured (0.67-0.83 s at 500 ms); a boot is
            // the hook's run. Measured ones replace these.
            "--shutdown-estimate-seconds".to_owned(),
            format!("{}", opts.tag_interval.as_secs_f64() * 1.6),
            "--boot-estimate-seconds".to_owned(),
            "0.1".to_owned(),
            "--reverse-master-target".to_owned(),
            azure_mt.to_string(),
            "--reverse-master-target-name".to_owned(),
            "azure-master-target".to_owned(),
            "--reverse-relay".to_owned(),
            relay_back.to_string(),
        ]);
        site.start_relay()?;
        let api = site.relay_api_addr().context("the relay's API")?;
        let token = std::fs::read_to_string(site.root.join("config-server").join("operator.token"))
            .context("the site's operator token")?;
        let operator = Operator {
            client: HeartbeatClient::operator(
                api,
                "relay",
                &site.pki_dir.join("ca.pem"),
                token.trim().to_owned(),
            )
            .map_err(anyhow::Error::msg)?,
            started: Instant::now(),
            progress: opts.progress,
        };
        let agent_opts = AgentOptions {
            rate_bytes_per_s: Some(opts.rate_bytes_per_s),
            app_tag_every: drill.app_tag_every,
            ..site.agent_options(drill.duration, drill.tag_interval)?
        };
        let setup = ReverseSetup {
            on_premises: on_premises.clone(),
            dir: site.root.join("reverse"),
            plans: plans.clone(),
            options: AgentOptions {
                relay: relay_back,
                relay_name: "localhost".into(),
                duration: None,
                // One agent per VM: the drill's rate shared among them.
                rate_bytes_per_s: Some((opts.rate_bytes_per_s / opts.vms as u64).max(1)),
                ..agent_opts.clone()
            },
            seed: opts.seed,
        };
        std::fs::create_dir_all(&setup.dir)?;
        let handle = agent::start(agent_opts, plans, opts.seed).map_err(anyhow::Error::msg)?;
        let shutdowns = tokio::spawn(platform::serve_shutdowns(
            azure.clone(),
            vms.clone(),
            handle.power_switch(),
        ));
        let reverse = ReverseAgents::default();
        let reverse_task = tokio::spawn(serve_reverse_agents(setup, vms.clone(), reverse.clone()));
        Ok(FailbackSite {
            site,
            operator,
            handle,
            vms,
            azure,
            on_premises,
            shutdowns,
            reverse,
            reverse_task,
        })
    }

    /// Waits until the relay's controller lists every VM (it learns them as their
    /// streams arrive) and answers (after a restart it needs its first heartbeat).
    pub async fn wait_for_vms(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let known: Vec<String> = match self.operator.get("/v1/vms").await {
                Ok(doc) => doc["vms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["vm"].as_str().map(str::to_owned))
                    .collect(),
                Err(_) => Vec::new(),
            };
            if self.vms.iter().all(|v| known.contains(v)) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the relay's controller did not list every VM within 60 s: {known:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the VMs, the relay and the master target; then proves every recovery point
    /// and every failover copy (`points`: per VM, the tag it went to and the point
    /// kind) equal to the sources, and measures what each copy lost.
    pub async fn stop_and_verify(
        self,
        points: &BTreeMap<String, (u64, String)>,
        disk_size: u64,
    ) -> anyhow::Result<Verified> {
        self.shutdowns.abort();
        self.reverse_task.abort();
        let stats = self.handle.stats.clone();
        self.handle.request_stop();
        let report = self.handle.finish().await.map_err(anyhow::Error::msg)?;
        // The on-premises VMs' agents (reprotect back), stopped the same way.
        let reverse: Vec<(String, agent::RunHandle)> =
            std::mem::take(&mut *self.reverse.lock().unwrap_or_else(|p| p.into_inner()));
        let mut reverse_reports = Vec::new();
        let mut reverse_resync_bytes = 0;
        for (vm, h) in reverse {
            reverse_resync_bytes += h
                .stats
                .resync_sent_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            h.request_stop();
            let r = h
                .finish()
                .await
                .map_err(|e| anyhow::anyhow!("{vm}'s on-premises agent: {e}"))?;
            reverse_reports.push(r);
        }
        let mut site = self.site;
        site.stop_relay(false)?;
        site.stop_relay_b(false)?;
        site.stop_master_target(false)?;
        site.stop_azure_master_target(false)?;
        let mut copies = Vec::new();
        for (vm, (tag, _)) in points {
            for d in platform::powered_disks(&self.on_premises, vm).unwrap_or_default() {
                // A VM replicated back has written its disk since: what it booted from
                // is the copy kept as its agent started (nothing wrote it before).
                let booted =
                    reverse_dir(&site.root).join(format!("{vm}-disk{}.on-premises.img", d.disk));
                copies.push(CopyCheck {
                    id: StreamId {
                        vm: vm.clone(),
                        disk: d.disk,
                    },
                    tag_id: *tag,
                    path: if booted.exists() { booted } else { d.path },
                });
            }
        }
        let manifest = report.manifest.clone();
        std::fs::write(
            site.root.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        let (mt_data, checks) = (site.mt_data.clone(), copies.clone());
        let verification = tokio::task::spawn_blocking(move || {
            verify::verify_with_copies(&manifest, &mt_data, &checks)
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        let mut errors = report.failures.clone();
        errors.extend(verification.errors.iter().cloned());
        // The reverse replica, in Azure: every point equal to the on-premises disks.
        let mut reverse_points = 0;
        for r in reverse_reports {
            errors.extend(r.failures.iter().map(|f| format!("on-premises agent: {f}")));
            let data = site.azure_mt_data();
            let checked = tokio::task::spawn_blocking(move || {
                verify::verify_with_copies(&r.manifest, &data, &[])
            })
            .await?
            .map_err(anyhow::Error::msg)?;
            errors.extend(
                checked
                    .errors
                    .iter()
                    .map(|e| format!("reverse replica: {e}")),
            );
            if checked.recovery_points_verified == 0 {
                errors.push("the reverse replica has no recovery point verified".into());
            }
            reverse_points += checked.recovery_points_verified;
        }
        let mut data_loss_bytes: BTreeMap<String, u64> = BTreeMap::new();
        for c in &copies {
            let kind = &points[&c.id.vm].1;
            let source = site
                .root
                .join("sources")
                .join(format!("{}-disk{}.img", c.id.vm, c.id.disk));
            let lost = differing_bytes(&source, &c.path, disk_size)?;
            *data_loss_bytes.entry(kind.clone()).or_default() += lost;
        }
        let (_, p99_ms, _) = stats.lag_ms();
        Ok(Verified {
            verified: errors.is_empty() && verification.verified,
            recovery_points_verified: verification.recovery_points_verified,
            reverse_recovery_points_verified: reverse_points,
            reverse_resync_bytes,
            copies_verified: verification.copies_verified,
            copies: copies.len(),
            data_loss_bytes,
            rpo_p99_s: p99_ms / 1000.0,
            errors,
            site,
        })
    }
}

/// What [`FailbackSite::stop_and_verify`] found.
#[derive(Debug)]
pub struct Verified {
    pub verified: bool,
    pub reverse_recovery_points_verified: usize,
    pub reverse_resync_bytes: u64,
    pub recovery_points_verified: usize,
    pub copies_verified: usize,
    /// Failover disks found powered on.
    pub copies: usize,
    pub data_loss_bytes: BTreeMap<String, u64>,
    pub rpo_p99_s: f64,
    pub errors: Vec<String>,
    pub site: Site,
}

fn drill_options(opts: &FailbackOptions) -> DrillOptions {
    DrillOptions {
        vms: opts.vms,
        disks_per_vm: opts.disks_per_vm,
        disk_size: opts.disk_size,
        duration: Duration::from_secs(3600),
        tag_interval: opts.tag_interval,
        app_tag_every: 4,
        profile: None,
        content: Content::Mixed,
        seed: opts.seed,
        groups: 2,
        progress: opts.progress,
        keep: opts.keep.clone(),
        max_udp_payload: 1452,
        cache_capacity: 8 << 30,
        credit_mib: 16,
        rate_bytes_per_s: Some(opts.rate_bytes_per_s),
        reprotect: Some(Reprotect {
            location: ReprotectLocation::Original,
            used_percent: 50.0,
            stale_percent: 5.0,
        }),
    }
}

/// Runs the drill.
pub async fn run(opts: FailbackOptions) -> anyhow::Result<FailbackSummary> {
    let mut fb = FailbackSite::start(&opts).await?;
    let outcome = cycle(&mut fb, &opts).await;
    if opts.progress {
        eprintln!("verifying every recovery point and every failover copy against the sources...");
    }
    let points = outcome
        .as_ref()
        .map(|c| c.points.clone())
        .unwrap_or_default();
    let checked = fb.stop_and_verify(&points, opts.disk_size).await?;
    let cycle = outcome?;
    let mut errors = checked.errors.clone();
    let lost_latest = checked
        .data_loss_bytes
        .get("latest_planned")
        .copied()
        .unwrap_or(0);
    if lost_latest != 0 {
        errors.push(format!(
            "the planned failover to latest lost {lost_latest} bytes"
        ));
    }
    let expected = cycle.points.len() * opts.disks_per_vm as usize;
    if checked.copies != expected {
        errors.push(format!(
            "{} failover disks powered on, {expected} expected",
            checked.copies
        ));
    }
    errors.extend(cycle.errors.iter().cloned());
    let verified = errors.is_empty() && checked.verified;
    let mut site = checked.site;
    let site_dir = if opts.keep.is_some() || !verified {
        Some(site.keep())
    } else {
        None
    };
    let eta_error = cycle
        .timeline
        .iter()
        .filter(|t| t.operation == "failover")
        .filter_map(|t| t.eta_error)
        .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    Ok(FailbackSummary {
        verified,
        data_loss_bytes: checked.data_loss_bytes,
        rto_s: cycle.rto_s,
        eta_error,
        rpo_p99_s: checked.rpo_p99_s,
        recovery_points_verified: checked.recovery_points_verified,
        copies_verified: checked.copies_verified,
        reverse_recovery_points_verified: checked.reverse_recovery_points_verified,
        reverse_resync_bytes: checked.reverse_resync_bytes,
        planned_estimate: cycle.planned_estimate,
        timeline: cycle.timeline,
        errors,
        site_dir,
    })
}

/// What the cycle of jobs produced.
#[derive(Debug, Default)]
struct Cycle {
    timeline: Vec<TimelineEntry>,
    /// Per failed-over VM: the tag it went to and the point kind.
    points: BTreeMap<String, (u64, String)>,
    rto_s: BTreeMap<String, f64>,
    planned_estimate: serde_json::Value,
    errors: Vec<String>,
}

impl Cycle {
    /// Adds a job the drill cannot go on without to the timeline; an error unless it
    /// succeeded (`what`: the job, in words).
    fn must_succeed(&mut self, entry: TimelineEntry, what: &str) -> anyhow::Result<()> {
        let ok = entry.state == "succeeded";
        self.timeline.push(entry);
        anyhow::ensure!(ok, "{what} did not succeed: {:?}", self.timeline.last());
        Ok(())
    }
}

/// The jobs, in order, through the API.
async fn cycle(fb: &mut FailbackSite, opts: &FailbackOptions) -> anyhow::Result<Cycle> {
    let vms = fb.vms.clone();
    let (azure, on_premises) = (fb.azure.clone(), fb.on_premises.clone());
    let (vms, azure, on_premises) = (&vms, azure.as_path(), on_premises.as_path());
    let op = &fb.operator;
    let mut c = Cycle::default();
    let say = |s: String| {
        if opts.progress {
            eprintln!("{s}");
        }
    };
    fb.wait_for_vms().await?;
    let long = Duration::from_secs(600);
    say(format!(
        "reprotect (original location, delta resync) of {vms:?}..."
    ));
    let (entry, _) = op
        .run(
            "reprotect",
            serde_json::json!({
                // Three days of history for their groups (the master target's own
                // default is one).
                "operation": {"operation": "reprotect", "location": "original",
                    "retention": {"window_s": 3 * 86_400}},
                "vms": vms,
                "idempotency_key": "drill-reprotect",
            }),
            long,
        )
        .await?;
    c.must_succeed(entry, "the reprotect")?;
    say(format!("protected; churning for {:?}", opts.protected_for));
    tokio::time::sleep(opts.protected_for).await;

    // A rehearsal: it also measures the copy and boot rates the estimates use.
    let first = vec![vms[0].clone()];
    for (label, body) in [
        (
            "test failover",
            serde_json::json!({"operation": {"operation": "test_failover", "point": "latest_processed"}, "vms": first}),
        ),
        (
            "test cleanup",
            serde_json::json!({"operation": {"operation": "test_cleanup"}, "vms": first}),
        ),
    ] {
        let (entry, _) = op.run(label, body, long).await?;
        if entry.state != "succeeded" {
            c.errors.push(format!("{label}: {}", entry.state));
        }
        c.timeline.push(entry);
    }
    // The test VM is gone, its copy too.
    if platform::state(on_premises, &format!("{}-test", vms[0])) != "absent" {
        c.errors
            .push("the test VM is still there after the cleanup".into());
    }

    let half = vms.len() / 2;
    let (plan_a, plan_b) = (vms[..half].to_vec(), vms[half..].to_vec());

    // Run A: planned, to latest.
    let estimate = op
        .post(
            "/v1/estimate",
            serde_json::json!({"vms": plan_a, "point": "latest", "planned": true}),
        )
        .await?;
    c.planned_estimate = estimate["estimate"].clone();
    say(format!(
        "run A: planned failover of {plan_a:?} to latest (estimated {} s)...",
        c.planned_estimate["total_s"]
    ));
    let boot_a: Vec<Vec<String>> = plan_a.iter().map(|v| vec![v.clone()]).collect();
    let (entry, job) = op
        .run(
            "run A: planned failover to latest",
            serde_json::json!({
                "operation": {"operation": "failover", "point": "latest", "planned": true},
                "vms": plan_a,
                "boot": boot_a,
                "idempotency_key": "drill-run-a",
            }),
            long,
        )
        .await?;
    c.rto_s.insert("planned_latest".into(), entry.actual_s);
    c.must_succeed(entry, "run A")?;
    record_points(&mut c, &job, "latest_planned");
    for vm in &plan_a {
        if platform::state(azure, vm) != "stopped" {
            c.errors
                .push(format!("{vm} still runs in Azure after a planned failover"));
        }
        if platform::state(on_premises, vm) != "running" {
            c.errors.push(format!("{vm} is not running on-premises"));
        }
    }

    // Run B: unplanned, to a named point common to the plan, while its VMs write on.
    let points = op.get("/v1/points").await?;
    let tag = named_point(&points, &plan_b, 6).context("a point common to run B's VMs")?;
    say(format!(
        "run B: unplanned failover of {plan_b:?} to point {tag} (two boot groups, 1 s apart)..."
    ));
    // Two boot groups (one, with the rest 1 s later) when there are VMs for two.
    let boot_b = if plan_b.len() >= 2 {
        vec![plan_b[..1].to_vec(), plan_b[1..].to_vec()]
    } else {
        vec![plan_b.clone()]
    };
    let (entry, job) = op
        .run(
            "run B: unplanned failover to a named point",
            serde_json::json!({
                "operation": {"operation": "failover", "point": {"tag": tag}, "planned": false},
                "vms": plan_b,
                "boot": boot_b,
                "boot_delay_s": 1,
                "idempotency_key": "drill-run-b",
            }),
            long,
        )
        .await?;
    c.rto_s
        .insert("unplanned_named_point".into(), entry.actual_s);
    c.must_succeed(entry, "run B")?;
    record_points(&mut c, &job, "named_point");

    // Before committing, the operator prefers a newer point: change point (the VMs are
    // powered off, their disks made again at that point, powered on).
    let points = op.get("/v1/points").await?;
    let newer = named_point(&points, &plan_b, 3).context("a newer point for run B's VMs")?;
    anyhow::ensure!(newer > tag, "no point newer than {tag} to change to");
    say(format!(
        "run B: change point of {plan_b:?} from {tag} to {newer}..."
    ));
    let (entry, job) = op
        .run(
            "run B: change point",
            serde_json::json!({
                "operation": {"operation": "change_point", "point": {"tag": newer}},
                "vms": plan_b,
                "boot": boot_b,
                "boot_delay_s": 1,
            }),
            long,
        )
        .await?;
    c.must_succeed(entry, "the change of point")?;
    record_points(&mut c, &job, "named_point");
    // Let run B's VMs write on a little: what they write now is what that point loses.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for (label, plan) in [("commit A", &plan_a), ("commit B", &plan_b)] {
        let (entry, _) = op
            .run(
                label,
                serde_json::json!({"operation": {"operation": "commit"}, "vms": plan}),
                long,
            )
            .await?;
        if entry.state != "succeeded" {
            c.errors.push(format!("{label}: {}", entry.state));
        }
        c.timeline.push(entry);
        for vm in plan.iter() {
            if platform::state(azure, vm) != "absent" {
                c.errors
                    .push(format!("{vm} still exists in Azure after the commit"));
            }
        }
    }
    expect_protection(
        &fb.operator,
        "COMMITTED",
        "after the commits",
        &mut c.errors,
    )
    .await?;

    // Reprotect back: Azure's master target is given the disks the Azure VMs left, and
    // the controller turns replication around.
    say(format!(
        "reprotect back of {vms:?} (the Azure master target given the Azure disks; delta resync from on-premises)..."
    ));
    give_azure_its_disks(fb)?;
    let (entry, _) = fb
        .operator
        .run(
            "reprotect back",
            serde_json::json!({
                "operation": {"operation": "reprotect_back"},
                "vms": vms,
                "idempotency_key": "drill-reprotect-back",
            }),
            long,
        )
        .await?;
    c.must_succeed(entry, "reprotect back")?;
    // The on-premises VMs write on, replicated to Azure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    expect_protection(&fb.operator, "PROTECTED_BACK", "at the end", &mut c.errors).await?;
    Ok(c)
}

/// Notes in `errors` every VM whose protection is not `state` (`when`: the moment).
async fn expect_protection(
    op: &Operator,
    state: &str,
    when: &str,
    errors: &mut Vec<String>,
) -> anyhow::Result<()> {
    let doc = op.get("/v1/vms").await?;
    for v in doc["vms"].as_array().into_iter().flatten() {
        if v["protection"] != state {
            errors.push(format!("{} is {} {when}", v["vm"], v["protection"]));
        }
    }
    Ok(())
}

/// The Azure master target adopts each VM's Azure disk as its replica (what the Azure
/// VM left; a copy kept as the reverse replica's starting state), stopped meanwhile:
/// the operator's part of a reprotect back. VMs not failed over are left out.
pub fn give_azure_its_disks(fb: &mut FailbackSite) -> anyhow::Result<()> {
    let site = &mut fb.site;
    site.stop_azure_master_target(false)?;
    for vm in &fb.vms {
        for d in platform::powered_disks(&fb.on_premises, vm).unwrap_or_default() {
            let name = format!("{vm}-disk{}", d.disk);
            let azure_disk = site.root.join("sources").join(format!("{name}.img"));
            let kept = reverse_dir(&site.root).join(format!("{name}.azure.img"));
            std::fs::copy(&azure_disk, &kept)
                .with_context(|| format!("copying {}", azure_disk.display()))?;
            site.seed_azure_disk(vm, d.disk, &kept)?;
        }
    }
    site.start_azure_master_target()?;
    Ok(())
}

/// Where the reverse replication's images are kept.
fn reverse_dir(root: &std::path::Path) -> PathBuf {
    root.join("reverse")
}

/// Starts each on-premises VM's agent once the on-premises hook was asked to point it at
/// a relay (reprotect back's `replicate`), until the task is dropped.
async fn serve_reverse_agents(setup: ReverseSetup, vms: Vec<String>, agents: ReverseAgents) {
    let mut started = std::collections::BTreeSet::new();
    loop {
        for vm in &vms {
            if started.contains(vm) {
                continue;
            }
            let Some(relay) = platform::pointed_at(&setup.on_premises, vm) else {
                continue;
            };
            started.insert(vm.clone());
            match start_reverse_agent(&setup, vm, &relay) {
                Ok(h) => agents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((vm.clone(), h)),
                Err(e) => tracing::warn!("starting {vm}'s on-premises agent: {e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `vm`'s agent on-premises: its disks are the failover copies it was powered on with,
/// sent to `relay` with a delta resync against the Azure disks, then churned with the
/// profile it had in Azure.
fn start_reverse_agent(
    setup: &ReverseSetup,
    vm: &str,
    relay: &str,
) -> anyhow::Result<agent::RunHandle> {
    let disks = platform::powered_disks(&setup.on_premises, vm)
        .with_context(|| format!("{vm} was never powered on on-premises"))?;
    let mut plans = Vec::new();
    for d in disks {
        let azure = setup
            .plans
            .iter()
            .find(|p| p.id.vm == vm && p.id.disk == d.disk)
            .with_context(|| format!("{vm} had no disk {} in Azure", d.disk))?;
        let name = format!("{vm}-disk{}", d.disk);
        // The on-premises disk as its agent starts: what the verifier replays from.
        let at_start = setup.dir.join(format!("{name}.on-premises.img"));
        std::fs::copy(&d.path, &at_start)
            .with_context(|| format!("copying {}", d.path.display()))?;
        let source = match &azure.source {
            SourceSpec::Generated {
                vm_index,
                disk_index,
                profile,
                content,
                ..
            } => SourceSpec::Generated {
                seed: setup.seed ^ 0xBAC0_0000,
                vm_index: *vm_index,
                disk_index: *disk_index,
                profile: *profile,
                content: *content,
            },
            other => other.clone(),
        };
        plans.push(DiskPlan {
            id: azure.id.clone(),
            disk_size: azure.disk_size,
            // One agent per VM, so one group per VM: a group's tags come from one
            // coordinator (two agents cutting one group's tags make no point complete).
            group: format!("{vm}-back"),
            source,
            start: DiskStart {
                source_base: ImageSpec::File { path: at_start },
                replica_base: ImageSpec::File {
                    path: setup.dir.join(format!("{name}.azure.img")),
                },
                disk_file: Some(d.path.clone()),
                resync: ResyncPlan::Delta,
                resync_rate: None,
                resume: false,
            },
        });
    }
    let options = AgentOptions {
        relay: relay
            .parse()
            .with_context(|| format!("the relay {relay:?} the hook was given"))?,
        ..setup.options.clone()
    };
    agent::start(options, plans, setup.seed ^ 0xBAC0_0000).map_err(anyhow::Error::msg)
}

fn record_points(c: &mut Cycle, job: &serde_json::Value, kind: &str) {
    c.points.extend(chosen_points(job, kind));
}

/// Each VM's point as a job (its API document) chose it, labelled `kind`.
pub fn chosen_points(job: &serde_json::Value, kind: &str) -> BTreeMap<String, (u64, String)> {
    job["outputs"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(vm, o)| {
            let tag = o["point"]["tag_id"].as_u64()?;
            Some((vm.clone(), (tag, kind.to_owned())))
        })
        .collect()
}

/// A recovery point every VM of `vms` has, `back` points before the newest common one
/// (so the VMs wrote after it: what it loses is measurable).
fn named_point(points: &serde_json::Value, vms: &[String], back: usize) -> Option<u64> {
    let tags_of = |vm: &str| -> Vec<u64> {
        points["points"]["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["vm"] == vm)
            .flat_map(|v| v["points"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["complete"] == true)
            .filter_map(|p| p["tag_id"].as_u64())
            .collect()
    };
    let mut common = tags_of(&vms[0]);
    for vm in &vms[1..] {
        let theirs = tags_of(vm);
        common.retain(|t| theirs.contains(t));
    }
    common.sort_unstable();
    let n = common.len();
    common.get(n.saturating_sub(back)).copied()
}

/// Bytes that differ between two files of `len` bytes (missing bytes read as zeros).
fn differing_bytes(a: &std::path::Path, b: &std::path::Path, len: u64) -> anyhow::Result<u64> {
    use std::io::Read;
    let open =
        |p: &std::path::Path| std::fs::File::open(p).with_context(|| format!("{}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut left, mut differ) = (len, 0u64);
    while left > 0 {
        let n = left.min(x.len() as u64) as usize;
        for (f, buf) in [(&mut fa, &mut x), (&mut fb, &mut y)] {
            buf[..n].fill(0);
            let mut got = 0;
            while got < n {
                match f.read(&mut buf[got..n])? {
                    0 => break,
                    k => got += k,
                }
            }
        }
        differ += x[..n].iter().zip(&y[..n]).filter(|(p, q)| p != q).count() as u64;
        left -= n as u64;
    }
    Ok(differ)
}

/// Prints the timeline and the figures.
pub fn print_summary(s: &FailbackSummary) {
    println!(
        "failback drill: {}",
        if s.verified { "VERIFIED" } else { "FAILED" }
    );
    println!(
        "{:<44} {:>7} {:>9} {:>9} {:>10} {:>9}",
        "job", "at s", "estimate", "actual", "eta@50%", "error"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for t in &s.timeline {
        println!(
            "{:<44} {:>7.1} {:>9} {:>9.2} {:>10} {:>9}",
            format!("{} (job {}, {})", t.label, t.job, t.state),
            t.at_s,
            opt(t.estimate_s),
            t.actual_s,
            opt(t.eta_at_half_s),
            t.eta_error
                .map_or("-".into(), |e| format!("{:.0}%", e * 100.0))
        );
        for st in &t.steps {
            println!("    {:<22} {:>6.2} s  {}", st.step, st.seconds, st.note);
        }
    }
    println!("RTO: {:?}", s.rto_s);
    println!("data lost (bytes) per point kind: {:?}", s.data_loss_bytes);
    println!(
        "RPO while protected (p99 lag): {:.2} s; {} recovery points and {} failover disks verified",
        s.rpo_p99_s, s.recovery_points_verified, s.copies_verified
    );
    println!(
        "reprotect back: {} recovery points of the reverse replica (in Azure) verified; its delta resync sent {} bytes",
        s.reverse_recovery_points_verified, s.reverse_resync_bytes
    );
    for e in &s.errors {
        println!("error: {e}");
    }
    if let Some(d) = &s.site_dir {
        println!("site kept in {}", d.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_point_is_common_and_not_the_newest() {
        let p = serde_json::json!({"points": {"vms": [
            {"vm": "vm3", "points": [
                {"tag_id": 1, "complete": true}, {"tag_id": 2, "complete": true},
                {"tag_id": 3, "complete": true}, {"tag_id": 4, "complete": true},
                {"tag_id": 5, "complete": false}]},
            {"vm": "vm4", "points": [
                {"tag_id": 2, "complete": true}, {"tag_id": 3, "complete": true},
                {"tag_id": 4, "complete": true}]}
        ]}});
        assert_eq!(named_point(&p, &["vm3".into(), "vm4".into()], 3), Some(2));
        assert_eq!(named_point(&p, &["vm3".into(), "vm4".into()], 1), Some(4));
        assert_eq!(named_point(&p, &["vm3".into(), "vm9".into()], 3), None);
    }
}
