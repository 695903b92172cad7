//! The failback controller, run by the relay: the driver of `fbr_controller`'s machine.
//!
//! It keeps the machine and its redb store (`<state_dir>/controller.redb`), checks
//! requests against the facts it gathers (the configuration server's heartbeats, the
//! master target's status and points, asked over the relay's QUIC connection), and
//! carries out each step the machine issues, one task per step:
//!
//! | step | how |
//! |---|---|
//! | `delta_resync`, `full_resync` | waits until every disk of the VM is in step at the master target (`consistent`) and no resync passes through the relay; progress from the resync marks |
//! | `wait_for_recovery_point` | waits for a recovery point of the VM newer than the newest when the step began |
//! | `shut_down_source`, `delete_source` | the Azure hypervisor (`[controller] azure_hook`) |
//! | `drain` | waits until the master target acknowledged every record the relay held of the VM's disks when the step began |
//! | `choose_point` | the master target's points and `fbr_controller::target::choose_point` |
//! | `roll_back`, `materialize_test_copy` | the master target makes the VM's disks at the point (a test failover of the one VM); the replica goes on |
//! | `power_on`, `power_off`, `power_on_test`, `power_off_test` | the on-premises hypervisor (`[controller] on_premises_hook`), boot groups in order with the plan's delay |
//! | `delete_test_copy` | the master target deletes the copy |
//! | `turn_around` (reprotect back) | checks that the Azure master target (`[controller] reverse_master_target`) holds every disk of the VM, then the on-premises hook's `replicate` points the VM's agent at the on-premises relay (`reverse_relay`) |
//! | `delta_resync`, `wait_for_recovery_point` of a reprotect back | the same waits, at the Azure master target |
//!
//! Invariants:
//! - A step starts only once the save that marks it running is durable; everything a
//!   step produced that a later step needs (the point chosen, the copy made) is saved
//!   before the step reports done.
//! - Every step is idempotent (after a kill -9 the machine issues it again): waits
//!   measure afresh, copies are made under a name fixed per VM and reused when they
//!   exist at the same point, hypervisor calls are idempotent by contract.
//! - The machine's lock is never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbr_controller::hypervisor::{DiskImage, Hypervisor, Site, VmRef};
use fbr_controller::store::Store;
use fbr_controller::target::{self, Points, Request as TargetRequest, Status};
use fbr_controller::{
    Action, ChosenPoint, Controller, DiskCopy, Facts, Job, JobId, JobRequest, Operation,
    PointChoice, Refusal, RefusalCode, StepKind, StepOutcome,
};
use fbr_protocol::StreamId;
use tokio::sync::Notify;

use crate::server::Relay;
use crate::target::{ask, REQUEST_TIMEOUT, STATUS_TIMEOUT};
use fbr_cache::now_ms;

/// How the controller is set up.
pub struct FailbackConfig {
    /// Where `controller.redb` lives.
    pub state_dir: PathBuf,
    /// The Azure side: shut down and delete the failed-over VMs.
    pub azure: Option<Arc<dyn Hypervisor>>,
    /// The on-premises side: power VMs on with their disks, and off.
    pub on_premises: Option<Arc<dyn Hypervisor>>,
    /// Seconds one VM takes to boot (the estimate's boot time until one is measured).
    pub boot_estimate_s: f64,
    /// Seconds shutting the Azure VMs down takes (until measured).
    pub shut_down_estimate_s: f64,
    /// Longest a waiting step (resync, recovery point, drain) may wait.
    pub wait_timeout: Duration,
    /// Reprotect back's far side, if configured.
    pub reverse: Option<ReverseSide>,
}

/// Where replication goes at reprotect back: the master target in Azure (which holds
/// the Azure disks) and the on-premises relay that forwards to it.
#[derive(Debug)]
pub struct ReverseSide {
    /// This relay's link to the Azure master target, for its status.
    pub link: fbr_transport::PeerLink,
    /// The on-premises relay (`host:port`) the VMs' agents are pointed at.
    pub relay: String,
}

impl std::fmt::Debug for FailbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailbackConfig")
            .field("state_dir", &self.state_dir)
            .field("azure", &self.azure.is_some())
            .field("on_premises", &self.on_premises.is_some())
            .field("boot_estimate_s", &self.boot_estimate_s)
            .field("shut_down_estimate_s", &self.shut_down_estimate_s)
            .field("wait_timeout", &self.wait_timeout)
            .field("reverse", &self.reverse)
            .finish()
    }
}

/// The controller running in the relay.
#[derive(Debug)]
pub struct Failback {
    relay: Arc<Relay>,
    config: FailbackConfig,
    inner: Mutex<Inner>,
    wake: Notify,
    rates: Mutex<Rates>,
}

#[derive(Debug)]
struct Inner {
    controller: Controller,
    store: Store,
    /// The tasks running steps, to stop one whose job is cancelled.
    running: HashMap<(JobId, usize), tokio::task::AbortHandle>,
    /// Why the last save failed, while it does (health and the API say so).
    store_error: Option<String>,
}

/// Rates measured as the relay runs (for estimates).
#[derive(Debug, Default)]
struct Rates {
    /// The link's UDP bytes sent and when that was read.
    wire: Option<(u64, Instant)>,
    /// Bytes per second on the WAN leg, smoothed over the seconds it was busy.
    link_bytes_per_s: f64,
    /// Disk bytes per second the master target made copies at.
    copy_bytes_per_s: f64,
    /// Seconds one VM's power-on took, as last measured (0: not yet).
    boot_s_per_vm: f64,
    /// Seconds the last shut-down of Azure VMs took (0: none yet).
    shut_down_s: f64,
}

/// The master target as the last status request saw it.
#[derive(Debug, Clone)]
pub struct TargetView {
    pub status: Status,
    pub points: Points,
}

/// A failover's estimate, before it starts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverEstimate {
    pub vms: Vec<String>,
    pub point: PointChoice,
    pub planned: bool,
    pub backlog_bytes: u64,
    pub link_bytes_per_s: f64,
    pub copy_bytes: u64,
    pub copy_bytes_per_s: f64,
    /// Seconds one VM takes to boot: the last power-on measured, else the setting.
    pub boot_s_per_vm: f64,
    /// Seconds shutting the Azure VMs down takes (planned failovers): the last one
    /// measured, else the setting; 0 for an unplanned failover.
    pub shut_down_s: f64,
    #[serde(flatten)]
    pub estimate: fbr_controller::estimate::Estimate,
}

/// How often discovery asks the master target for the VMs it holds.
const DISCOVERY_ASK_EVERY: Duration = Duration::from_secs(10);

/// The shortest window the link's rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// The master target's name for the copy of `vm`'s disks made by `kind` (`failover`
/// or `test`): fixed per VM, so a step issued again finds what it made; a plain name
/// (the master target's rule) with a hash of the VM's full name.
pub fn copy_name(kind: &str, vm: &str) -> String {
    let plain: String = vm
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // FNV-1a: stable across versions and machines (unlike the std hasher).
    let hash = vm.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!("{kind}-{plain}-{hash:08x}")
}

impl Failback {
    /// Opens the store in `config.state_dir` (made if missing) and the machine as last
    /// saved, with every step that was running to be issued again.
    pub fn open(relay: Arc<Relay>, config: FailbackConfig) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.state_dir)?;
        let store = Store::open(&config.state_dir)?;
        let mut controller = store.load()?;
        controller.resume();
        let jobs = controller.jobs().filter(|j| !j.state.is_finished()).count();
        tracing::info!(
            dir = %config.state_dir.display(),
            vms = controller.vms().count(),
            running_jobs = jobs,
            "failback controller opened"
        );
        Ok(Arc::new(Failback {
            relay,
            config,
            inner: Mutex::new(Inner {
                controller,
                store,
                running: HashMap::new(),
                store_error: None,
            }),
            wake: Notify::new(),
            rates: Mutex::new(Rates::default()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves what changed; on failure keeps it marked (the next save writes it) and
    /// says so to the relay's health.
    fn save(&self, inner: &mut Inner) -> Result<(), String> {
        let changes = inner.controller.take_changes();
        let saved = inner.store.save(&changes);
        let error = saved.as_ref().err().map(|e| e.to_string());
        if inner.store_error != error {
            self.relay.set_controller_store_error(error.clone());
            inner.store_error = error;
        }
        saved.map_err(|e| {
            tracing::error!("saving the controller's state: {e}");
            inner.controller.unsaved(&changes);
            format!("the controller cannot save its state: {e}")
        })
    }

    /// Runs the controller until the relay stops: learns VMs, issues steps, measures
    /// rates.
    pub async fn run(self: Arc<Self>) {
        // Discovery asks the master target, which may take its whole timeout when the
        // link is down: on its own task, so steps are issued on time regardless. The
        // relay's own streams are looked at often (cheap); the master target, which
        // also knows VMs whose agents are not connected, less often.
        // Held for as long as this loop runs (it never returns; it is aborted).
        let _discovery = {
            let me = self.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut asked: Option<Instant> = None;
                loop {
                    let view = if asked.is_none_or(|t| t.elapsed() >= DISCOVERY_ASK_EVERY) {
                        asked = Some(Instant::now());
                        me.target_view().await.ok()
                    } else {
                        None
                    };
                    me.discover(view.as_ref());
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }))
        };
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            self.sample_rates();
            self.issue();
        }
    }

    /// Sets the jobs gauge from the machine.
    fn count_jobs(&self, controller: &Controller) {
        let mut by_state: BTreeMap<&str, i64> = ["running", "succeeded", "failed", "cancelled"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
        for j in controller.jobs() {
            let state = match j.state {
                fbr_controller::JobState::Running => "running",
                fbr_controller::JobState::Succeeded => "succeeded",
                fbr_controller::JobState::Failed => "failed",
                fbr_controller::JobState::Cancelled => "cancelled",
            };
            *by_state.entry(state).or_default() += 1;
        }
        for (state, n) in by_state {
            self.relay
                .metrics()
                .controller_jobs
                .with_label_values(&[state])
                .set(n);
        }
    }

    /// Issues the steps the machine says to run (and stops those to stop).
    fn issue(self: &Arc<Self>) {
        let mut inner = self.lock();
        self.count_jobs(&inner.controller);
        let actions = inner.controller.next_actions(now_ms());
        if actions.is_empty() {
            return;
        }
        if self.save(&mut inner).is_err() {
            inner.controller.resume();
            return;
        }
        for action in actions {
            match action {
                Action::RunStep {
                    job,
                    step,
                    kind,
                    operation,
                    vms,
                } => {
                    tracing::info!(job, step = kind.name(), ?vms, "step starts");
                    let fb = self.clone();
                    let work = {
                        let fb = fb.clone();
                        tokio::spawn(
                            async move { fb.run_step(job, step, kind, &operation, &vms).await },
                        )
                    };
                    inner.running.insert((job, step), work.abort_handle());
                    // The outcome goes back to the machine; a step that panicked fails
                    // (rather than running forever); one aborted by a cancel says nothing.
                    tokio::spawn(async move {
                        match work.await {
                            Ok(outcome) => fb.finish_step(job, step, kind, outcome),
                            Err(e) if e.is_panic() => fb.finish_step(
                                job,
                                step,
                                kind,
                                StepOutcome::Failed {
                                    reason:
                                        "the step failed unexpectedly (a bug: see the relay's log)"
                                            .into(),
                                },
                            ),
                            Err(_) => {}
                        }
                    });
                }
                Action::AbortStep { job, step } => {
                    if let Some(task) = inner.running.remove(&(job, step)) {
                        task.abort();
                    }
                }
            }
        }
    }

    fn finish_step(&self, job: JobId, step: usize, kind: StepKind, outcome: StepOutcome) {
        match &outcome {
            StepOutcome::Done { note } => {
                tracing::info!(
                    job,
                    step = kind.name(),
                    note = note.as_deref().unwrap_or(""),
                    "step done"
                )
            }
            StepOutcome::Failed { reason } => {
                tracing::warn!(job, step = kind.name(), "step failed: {reason}")
            }
        }
        let outcome_name = match &outcome {
            StepOutcome::Done { .. } => "done",
            StepOutcome::Failed { .. } => "failed",
        };
        self.relay
            .metrics()
            .controller_steps_total
            .with_label_values(&[kind.name(), outcome_name])
            .inc();
        let mut inner = self.lock();
        inner.running.remove(&(job, step));
        let _ = inner.controller.step_finished(job, step, outcome, now_ms());
        let _ = self.save(&mut inner);
        drop(inner);
        self.wake.notify_one();
    }

    fn progress(&self, job: JobId, step: usize, done: u64, total: u64) {
        let mut inner = self.lock();
        if inner
            .controller
            .step_progress(job, step, done, total)
            .is_ok()
        {
            let _ = self.save(&mut inner);
        }
    }

    /// Records (durably) what a step produced for `vm`.
    fn record(
        &self,
        job: JobId,
        step: usize,
        vm: &str,
        set: impl FnOnce(&mut fbr_controller::VmOutput),
    ) -> Result<(), String> {
        let mut inner = self.lock();
        inner
            .controller
            .record_output(job, step, vm, set)
            .map_err(|e| e.message)?;
        self.save(&mut inner)
    }

    fn job_snapshot(&self, job: JobId) -> Option<Job> {
        self.lock().controller.job(job).cloned()
    }

    // --- what operators ask -----------------------------------------------------------

    /// Starts the job `req` asks for, once its preconditions hold.
    pub async fn request(self: &Arc<Self>, req: JobRequest) -> Result<Job, Refusal> {
        let back = req.operation == Operation::ReprotectBack;
        let (facts, _) = self.facts(back).await;
        let mut inner = self.lock();
        let id = inner.controller.request(req, &facts, now_ms())?;
        self.save(&mut inner)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e))?;
        let job = inner.controller.job(id).cloned().expect("just made");
        drop(inner);
        self.wake.notify_one();
        Ok(job)
    }

    /// Cancels job `id` where that is safe; says what was undone.
    pub fn cancel(&self, id: JobId) -> Result<String, Refusal> {
        let mut inner = self.lock();
        let said = inner.controller.cancel(id, now_ms())?;
        self.save(&mut inner)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e))?;
        drop(inner);
        self.wake.notify_one();
        Ok(said)
    }

    pub fn job(&self, id: JobId) -> Option<Job> {
        self.job_snapshot(id)
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        self.lock().controller.jobs().cloned().collect()
    }

    /// Every VM and its record.
    pub fn vms(&self) -> Vec<(String, fbr_controller::controller::VmRecord)> {
        self.lock()
            .controller
            .vms()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// The estimate of a failover of `vms` to `point`.
    pub async fn estimate(
        &self,
        vms: &[String],
        point: &PointChoice,
        planned: bool,
    ) -> FailoverEstimate {
        let (_, view) = self.facts(false).await;
        let stats = self.relay.ingest().cache.all_stats();
        let now_s = now_ms() / 1000;
        let mine = |id: &StreamId| vms.contains(&id.vm);
        let backlog_bytes: u64 = stats
            .iter()
            .filter(|(id, _)| mine(id))
            .map(|(_, s)| s.backlog_bytes)
            .sum();
        let backlog_age_s = stats
            .iter()
            .filter(|(id, _)| mine(id))
            .filter_map(|(_, s)| s.oldest_unacked_s)
            .map(|t| now_s.saturating_sub(t) as f64)
            .fold(0.0, f64::max);
        let copy_bytes: u64 = view
            .as_ref()
            .map(|v| {
                v.status
                    .disks
                    .iter()
                    .filter(|d| vms.contains(&d.vm))
                    .map(|d| d.disk_size)
                    .sum()
            })
            .unwrap_or(0);
        let app_point_age_s = view.as_ref().and_then(|v| {
            vms.iter()
                .filter_map(|vm| {
                    target::choose_point(&v.points, vm, &PointChoice::LatestAppConsistent)
                })
                .filter_map(|p| p.time_ms)
                .min()
                .map(|t| now_ms().saturating_sub(t) as f64 / 1000.0)
        });
        let (link, copy_rate, boot, shut_down_s) = {
            let r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            let boot = if r.boot_s_per_vm > 0.0 {
                r.boot_s_per_vm
            } else {
                self.config.boot_estimate_s
            };
            let shut = if !planned {
                0.0
            } else if r.shut_down_s > 0.0 {
                r.shut_down_s
            } else {
                self.config.shut_down_estimate_s
            };
            (r.link_bytes_per_s, r.copy_bytes_per_s, boot, shut)
        };
        let inputs = fbr_controller::estimate::EstimateInputs {
            backlog_bytes,
            backlog_age_s,
            link_bytes_per_s: link,
            rollback_bytes: copy_bytes,
            rollback_bytes_per_s: copy_rate,
            app_point_age_s,
            vms: vms.len(),
            boot_s_per_vm: boot,
        };
        let drain = *point == PointChoice::Latest;
        let mut estimate = fbr_controller::estimate::failover(&inputs, drain);
        estimate.total_s = estimate.total_s.map(|t| t + shut_down_s);
        if !planned {
            estimate.loss_latest_planned_s = estimate.loss_latest_unplanned_s;
        }
        FailoverEstimate {
            vms: vms.to_vec(),
            point: point.clone(),
            planned,
            backlog_bytes,
            link_bytes_per_s: link,
            copy_bytes,
            copy_bytes_per_s: copy_rate,
            boot_s_per_vm: boot,
            shut_down_s,
            estimate,
        }
    }

    /// The facts a request is checked against, and the master target's view if it
    /// answered; `reverse`: whether the Azure master target is asked too (a reprotect
    /// back).
    pub async fn facts(&self, reverse: bool) -> (Facts, Option<TargetView>) {
        let view = self.target_view().await;
        let config_server_connected = self
            .relay
            .config_server_status()
            .is_some_and(|s| s.last_ok.is_some() && s.unreachable_for(Instant::now()).is_none());
        let reverse = match (&self.config.reverse, reverse) {
            (None, _) => None,
            (Some(_), false) => Some(true),
            (Some(r), true) => Some(view_on(&r.link).await.is_ok()),
        };
        let mut facts = Facts {
            config_server_connected,
            master_target_reachable: view.is_ok(),
            reverse,
            ..Facts::default()
        };
        if let Ok(v) = &view {
            facts.master_target_free_bytes = v.status.free_bytes;
            for d in &v.status.disks {
                *facts.test_copy_bytes.entry(d.vm.clone()).or_default() += d.disk_size;
            }
            for vp in &v.points.vms {
                let c = facts.points.entry(vp.vm.clone()).or_default();
                for p in vp.points.iter().filter(|p| p.complete) {
                    c.all += 1;
                    if p.kind == "app" {
                        c.app_consistent += 1;
                    }
                }
            }
        }
        (facts, view.ok())
    }

    async fn target_view(&self) -> Result<TargetView, String> {
        view_on(self.relay.upstream()).await
    }

    /// `request`, asked again while the master target cannot be reached (a step must not
    /// fail on a link that drops for a minute), up to the wait timeout; a refusal is
    /// final at once.
    async fn ask_patiently(
        &self,
        request: &TargetRequest,
        timeout: Duration,
    ) -> Result<fbr_controller::target::Answer, String> {
        self.ask_patiently_on(self.relay.upstream(), request, timeout)
            .await
    }

    /// [`Self::ask_patiently`] of the master target at the far end of `link`.
    async fn ask_patiently_on(
        &self,
        link: &fbr_transport::PeerLink,
        request: &TargetRequest,
        timeout: Duration,
    ) -> Result<fbr_controller::target::Answer, String> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match ask(link, request, timeout).await {
                Ok(a) => return Ok(a),
                Err(e) if crate::target::is_unreachable(&e) => {
                    if started.elapsed() > self.config.wait_timeout {
                        return Err(e);
                    }
                    tracing::info!("the master target cannot be reached, asking again: {e}");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// The master target's status, asked patiently (a step's).
    async fn target_view_patiently(&self) -> Result<TargetView, String> {
        view_of(
            self.ask_patiently(&TargetRequest::Status, STATUS_TIMEOUT)
                .await?,
        )
    }

    /// Reprotect back's far side, or why there is none.
    fn reverse(&self) -> Result<&ReverseSide, String> {
        self.config.reverse.as_ref().ok_or_else(|| {
            "reprotect back needs [controller] reverse_master_target and reverse_relay: the master target in Azure that holds the Azure disks, and the on-premises relay that forwards to it (docs/CONTROLLER.md)".to_owned()
        })
    }

    /// Protects every VM the relay carries or the master target holds (new ones start
    /// UNPROTECTED).
    fn discover(&self, view: Option<&TargetView>) {
        let mut names: Vec<String> = self
            .relay
            .ingest()
            .cache
            .all_stats()
            .into_iter()
            .map(|(id, _)| id.vm)
            .collect();
        if let Some(v) = view {
            names.extend(v.status.disks.iter().map(|d| d.vm.clone()));
        }
        names.sort();
        names.dedup();
        let mut inner = self.lock();
        for vm in &names {
            inner.controller.add_vm(vm);
        }
        let _ = self.save(&mut inner);
    }

    /// Measures the WAN leg's rate from the link's UDP byte counter, over windows of
    /// at least [`RATE_WINDOW`] in which it was busy.
    fn sample_rates(&self) {
        let sent_total = self.relay.upstream().status().udp_tx_bytes;
        let now = Instant::now();
        let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        match r.wire {
            Some((_, at)) if now.duration_since(at) < RATE_WINDOW => {}
            Some((before, at)) => {
                let dt = now.duration_since(at).as_secs_f64();
                let sent = sent_total.saturating_sub(before);
                // Idle seconds say nothing of what the link can do.
                if sent as f64 > 64.0 * 1024.0 * dt {
                    let rate = sent as f64 / dt;
                    r.link_bytes_per_s = if r.link_bytes_per_s == 0.0 {
                        rate
                    } else {
                        0.7 * r.link_bytes_per_s + 0.3 * rate
                    };
                }
                r.wire = Some((sent_total, now));
            }
            None => r.wire = Some((sent_total, now)),
        }
    }

    // --- the steps --------------------------------------------------------------------

    async fn run_step(
        self: &Arc<Self>,
        job: JobId,
        step: usize,
        kind: StepKind,
        operation: &Operation,
        vms: &[String],
    ) -> StepOutcome {
        let back = matches!(operation, Operation::ReprotectBack);
        let result = match kind {
            StepKind::Resync { .. } if back => self.wait_in_step_back(job, step, vms).await,
            StepKind::Resync { .. } => self.wait_in_step(job, step, vms).await,
            StepKind::WaitForRecoveryPoint if back => match self.reverse() {
                Ok(r) => self.wait_for_point(&r.link, vms).await,
                Err(e) => Err(e),
            },
            StepKind::WaitForRecoveryPoint => {
                match (
                    self.wait_for_point(self.relay.upstream(), vms).await,
                    operation,
                ) {
                    (
                        Ok(note),
                        Operation::Reprotect {
                            retention: Some(r), ..
                        },
                    ) => self
                        .choose_retention(vms, r)
                        .await
                        .map(|kept| format!("{note}; {kept}")),
                    (result, _) => result,
                }
            }
            StepKind::ShutDownSource => self.power(Site::Azure, vms, Power::ShutDown).await,
            StepKind::DeleteSource => self.power(Site::Azure, vms, Power::Delete).await,
            StepKind::Drain => self.drain(job, step, vms).await,
            StepKind::ChoosePoint => self.choose(job, step, operation, vms).await,
            StepKind::RollBack => self.materialize(job, step, vms, "failover").await,
            StepKind::MaterializeTestCopy => self.materialize(job, step, vms, "test").await,
            StepKind::PowerOn => self.power_on(job, vms, false).await,
            StepKind::PowerOnTest => self.power_on(job, vms, true).await,
            StepKind::PowerOff => self.power(Site::OnPremises, vms, Power::ShutDown).await,
            StepKind::PowerOffTest => self.power_off_test(vms).await,
            StepKind::DeleteTestCopy => self.delete_test_copies(vms).await,
            StepKind::TurnAround => self.turn_around(vms).await,
        };
        match result {
            Ok(note) => StepOutcome::Done { note: Some(note) },
            Err(reason) => StepOutcome::Failed { reason },
        }
    }

    /// Every disk of `vms` in step at the master target, with no resync passing
    /// through the relay.
    async fn wait_in_step(
        &self,
        job: JobId,
        step: usize,
        vms: &[String],
    ) -> Result<String, String> {
        let started = Instant::now();
        let mut last_error = String::new();
        loop {
            match self.target_view().await {
                Ok(view) => {
                    let resyncs = self.relay.ingest().resync_progress.views();
                    let streams = self.relay.ingest().cache.all_stats();
                    let (mut done, mut total, mut in_step, mut disks) = (0u64, 0u64, true, 0);
                    for vm in vms {
                        let at_target: Vec<_> =
                            view.status.disks.iter().filter(|d| &d.vm == vm).collect();
                        let at_relay = streams.iter().any(|(id, _)| &id.vm == vm);
                        if at_target.is_empty() || !at_relay {
                            in_step = false;
                        }
                        for d in at_target {
                            disks += 1;
                            total += d.disk_size;
                            let resync = resyncs
                                .iter()
                                .find(|(id, _)| &id.vm == vm && id.disk == d.disk);
                            match resync {
                                Some((_, r)) => {
                                    in_step = false;
                                    done += r.mark.compared_bytes.min(d.disk_size);
                                }
                                None if d.state == "consistent" => done += d.disk_size,
                                None => in_step = false,
                            }
                        }
                    }
                    self.progress(job, step, done, total);
                    if in_step {
                        return Ok(format!("{disks} disks in step at the master target"));
                    }
                }
                Err(e) => last_error = e,
            }
            if started.elapsed() > self.config.wait_timeout {
                return Err(format!(
                    "the disks were not in step within {:?} (is the agent running?) {last_error}",
                    self.config.wait_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The retention chosen at reprotect, set on the replication groups the VMs' points
    /// belong to (known once they have one); asked again after a restart, harmlessly.
    async fn choose_retention(
        &self,
        vms: &[String],
        r: &fbr_controller::RetentionChoice,
    ) -> Result<String, String> {
        let points = self.target_view_patiently().await?.points;
        let mut groups: Vec<String> = vms
            .iter()
            .filter_map(|vm| target::choose_point(&points, vm, &PointChoice::Latest))
            .map(|p| p.group.clone())
            .collect();
        groups.sort();
        groups.dedup();
        for group in &groups {
            let set = TargetRequest::SetRetention {
                group: group.clone(),
                window_s: r.window_s,
                max_bytes: r.max_bytes,
            };
            self.ask_patiently(&set, STATUS_TIMEOUT).await?;
        }
        Ok(format!(
            "{} s of history kept for {}",
            r.window_s,
            groups.join(", ")
        ))
    }

    /// Reprotect back turns replication around: the Azure master target must hold
    /// every disk the VM has on-premises (the Azure disks, seeded: a delta resync then
    /// sends only what differs), and the on-premises hook points each VM's agent at the
    /// on-premises relay, which forwards to it.
    async fn turn_around(&self, vms: &[String]) -> Result<String, String> {
        let reverse = self.reverse()?;
        let hv = self
            .config
            .on_premises
            .clone()
            .ok_or("no on-premises hypervisor: set [controller] on_premises_hook")?;
        let here = self.target_view_patiently().await?;
        let there = view_of(
            self.ask_patiently_on(&reverse.link, &TargetRequest::Status, STATUS_TIMEOUT)
                .await
                .map_err(|e| format!("the Azure master target: {e}"))?,
        )?;
        let mut disks = 0;
        for d in here.status.disks.iter().filter(|d| vms.contains(&d.vm)) {
            let held = there
                .status
                .disks
                .iter()
                .find(|a| a.vm == d.vm && a.disk == d.disk);
            match held {
                Some(a) if a.disk_size == d.disk_size => disks += 1,
                Some(a) => {
                    return Err(format!(
                        "the Azure master target's replica of {}/disk {} holds {} bytes, the disk on-premises {}: give it the Azure disk of that size",
                        d.vm, d.disk, a.disk_size, d.disk_size
                    ))
                }
                None => {
                    return Err(format!(
                        "the Azure master target holds no replica of {}/disk {}: give it the Azure disk (master-target seed-disk) and ask again",
                        d.vm, d.disk
                    ))
                }
            }
        }
        let mut calls = tokio::task::JoinSet::new();
        for vm in vms {
            let (hv, relay) = (hv.clone(), reverse.relay.clone());
            let r = VmRef {
                vm: vm.clone(),
                site: Site::OnPremises,
            };
            calls.spawn_blocking(move || hv.replicate(&r, &relay));
        }
        while let Some(joined) = calls.join_next().await {
            joined
                .map_err(|e| format!("hypervisor task: {e}"))?
                .map_err(|e| e.to_string())?;
        }
        Ok(format!(
            "{} VMs' agents point at {}; the Azure master target holds their {disks} disks",
            vms.len(),
            reverse.relay
        ))
    }

    /// Every disk of `vms` in step at the Azure master target (its delta resync from
    /// the on-premises disks done).
    async fn wait_in_step_back(
        &self,
        job: JobId,
        step: usize,
        vms: &[String],
    ) -> Result<String, String> {
        let reverse = self.reverse()?;
        let started = Instant::now();
        let mut last_error = String::new();
        loop {
            match view_on(&reverse.link).await {
                Ok(view) => {
                    let mine: Vec<_> = view
                        .status
                        .disks
                        .iter()
                        .filter(|d| vms.contains(&d.vm))
                        .collect();
                    let total: u64 = mine.iter().map(|d| d.disk_size).sum();
                    let done: u64 = mine
                        .iter()
                        .filter(|d| d.state == "consistent")
                        .map(|d| d.disk_size)
                        .sum();
                    self.progress(job, step, done, total);
                    let every_vm = vms.iter().all(|vm| mine.iter().any(|d| &d.vm == vm));
                    if every_vm && done == total {
                        return Ok(format!(
                            "{} disks in step at the Azure master target",
                            mine.len()
                        ));
                    }
                }
                Err(e) => last_error = e,
            }
            if started.elapsed() > self.config.wait_timeout {
                return Err(format!(
                    "the disks were not in step at the Azure master target within {:?} (is the VMs' agent sending to the on-premises relay?) {last_error}",
                    self.config.wait_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A recovery point of every VM, at the master target at the end of `link`, newer
    /// than the newest when the step began.
    async fn wait_for_point(
        &self,
        link: &fbr_transport::PeerLink,
        vms: &[String],
    ) -> Result<String, String> {
        let started = Instant::now();
        let newest = |points: &Points, vm: &str| {
            target::choose_point(points, vm, &PointChoice::Latest).map(|p| p.tag_id)
        };
        let mut baseline: Option<BTreeMap<String, Option<u64>>> = None;
        loop {
            if let Ok(view) = view_on(link).await {
                let now: BTreeMap<String, Option<u64>> = vms
                    .iter()
                    .map(|vm| (vm.clone(), newest(&view.points, vm)))
                    .collect();
                match &baseline {
                    None => baseline = Some(now),
                    Some(before) => {
                        if vms.iter().all(|vm| now[vm] > before[vm]) {
                            let tags: Vec<String> = vms
                                .iter()
                                .map(|vm| format!("{vm}: point {}", now[vm].unwrap_or(0)))
                                .collect();
                            return Ok(tags.join(", "));
                        }
                    }
                }
            }
            if started.elapsed() > self.config.wait_timeout {
                return Err(format!(
                    "no new recovery point within {:?} (is the agent cutting tags?)",
                    self.config.wait_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Until the master target acknowledged every record the relay held of `vms` when
    /// the step began.
    async fn drain(&self, job: JobId, step: usize, vms: &[String]) -> Result<String, String> {
        let mine = |id: &StreamId| vms.contains(&id.vm);
        let targets: Vec<(StreamId, u64)> = self
            .relay
            .ingest()
            .cache
            .all_stats()
            .into_iter()
            .filter(|(id, _)| mine(id))
            .map(|(id, s)| (id, s.durable_seq))
            .collect();
        let started = Instant::now();
        let mut first_backlog = None;
        loop {
            let stats: HashMap<StreamId, _> =
                self.relay.ingest().cache.all_stats().into_iter().collect();
            let mut backlog = 0u64;
            let mut drained = true;
            for (id, target) in &targets {
                // A stream gone from the cache holds nothing more.
                if let Some(s) = stats.get(id) {
                    if s.acked_seq < *target {
                        drained = false;
                        backlog += s.backlog_bytes;
                    }
                }
            }
            let total = *first_backlog.get_or_insert(backlog);
            self.progress(job, step, total.saturating_sub(backlog), total.max(backlog));
            if drained {
                return Ok(format!(
                    "{total} bytes of {} disks drained to the master target in {:.1} s",
                    targets.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            if started.elapsed() > self.config.wait_timeout {
                return Err(format!(
                    "{backlog} bytes still not at the master target after {:?}: is the link up?",
                    self.config.wait_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The point each VM goes to, recorded with the job.
    async fn choose(
        &self,
        job: JobId,
        step: usize,
        operation: &Operation,
        vms: &[String],
    ) -> Result<String, String> {
        let choice = match operation {
            Operation::Failover { point, .. }
            | Operation::ChangePoint { point }
            | Operation::TestFailover { point } => point.clone(),
            other => return Err(format!("{} has no point to choose", other.name())),
        };
        let points = self.target_view_patiently().await?.points;
        let common = if choice == PointChoice::LatestAppConsistent && vms.len() > 1 {
            Some(
                target::common_app_point(&points, vms)
                    .ok_or("the plan's VMs have no app-consistent point in common")?
                    .clone(),
            )
        } else {
            None
        };
        let mut said = Vec::new();
        for vm in vms {
            let p = match &common {
                Some(p) => p.clone(),
                None => target::choose_point(&points, vm, &choice)
                    .ok_or_else(|| format!("{vm} has no recovery point for {}", choice.name()))?
                    .clone(),
            };
            said.push(format!("{vm}: point {} ({})", p.tag_id, p.kind));
            let chosen = ChosenPoint {
                group: p.group,
                tag_id: p.tag_id,
                kind: p.kind,
                time_ms: p.time_ms,
            };
            self.record(job, step, vm, |o| o.point = Some(chosen))?;
        }
        Ok(said.join(", "))
    }

    /// The master target makes each VM's disks at its chosen point, named per VM
    /// (`kind`: `failover` or `test`); a copy of another point under that name goes.
    async fn materialize(
        &self,
        job: JobId,
        step: usize,
        vms: &[String],
        kind: &str,
    ) -> Result<String, String> {
        let snapshot = self.job_snapshot(job).ok_or("the job is gone")?;
        let view = self.target_view_patiently().await?;
        let total: u64 = view
            .status
            .disks
            .iter()
            .filter(|d| vms.contains(&d.vm))
            .map(|d| d.disk_size)
            .sum();
        let mut done = 0u64;
        let mut said = Vec::new();
        for vm in vms {
            let point = snapshot
                .outputs
                .get(vm)
                .and_then(|o| o.point.clone())
                .ok_or_else(|| format!("no point was chosen for {vm}"))?;
            let name = copy_name(kind, vm);
            let create = TargetRequest::TestFailoverCreate {
                group: point.group.clone(),
                tag: point.tag_id,
                name: name.clone(),
                vm: Some(vm.clone()),
            };
            let made = match self.ask_patiently(&create, REQUEST_TIMEOUT).await {
                Ok(a) => a,
                // Under this name, a copy of another point (an earlier failover of the
                // VM, or a change of point): it goes, and the copy is made afresh.
                Err(e) if e.contains("already exists") => {
                    let delete = TargetRequest::TestFailoverDelete { name: name.clone() };
                    self.ask_patiently(&delete, STATUS_TIMEOUT).await?;
                    self.ask_patiently(&create, REQUEST_TIMEOUT).await?
                }
                Err(e) => return Err(e),
            };
            let copy = made
                .test_failover
                .ok_or("the master target's answer lacks the copy")?;
            let bytes: u64 = copy.disks.iter().map(|d| d.disk_size).sum();
            if copy.seconds > 0.0 && bytes > 0 {
                let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
                r.copy_bytes_per_s = bytes as f64 / copy.seconds;
            }
            done += bytes;
            self.progress(job, step, done, total.max(done));
            said.push(format!(
                "{vm}: {} disks at point {} in {:.1} s",
                copy.disks.len(),
                copy.tag_id,
                copy.seconds
            ));
            let disks = DiskCopy {
                name: copy.name,
                disks: copy
                    .disks
                    .into_iter()
                    .map(|d| DiskImage {
                        disk: d.disk,
                        path: d.path,
                    })
                    .collect(),
            };
            self.record(job, step, vm, |o| o.copy = Some(disks))?;
        }
        Ok(said.join(", "))
    }

    /// Powers the VMs on with their copies, boot group by boot group, the plan's delay
    /// between groups. Test VMs are named `<vm>-test`.
    async fn power_on(&self, job: JobId, vms: &[String], test: bool) -> Result<String, String> {
        let snapshot = self.job_snapshot(job).ok_or("the job is gone")?;
        let hv = self
            .config
            .on_premises
            .clone()
            .ok_or("no on-premises hypervisor: set [controller] on_premises_hook")?;
        let groups = if snapshot.boot.is_empty() {
            vec![vms.to_vec()]
        } else {
            snapshot.boot.clone()
        };
        let started = Instant::now();
        for (i, group) in groups.iter().enumerate() {
            if i > 0 && snapshot.boot_delay_s > 0 {
                tokio::time::sleep(Duration::from_secs(snapshot.boot_delay_s)).await;
            }
            let mut calls = tokio::task::JoinSet::new();
            for vm in group {
                let disks = snapshot
                    .outputs
                    .get(vm)
                    .and_then(|o| o.copy.clone())
                    .ok_or_else(|| format!("no disks were made for {vm}"))?;
                let name = if test {
                    format!("{vm}-test")
                } else {
                    vm.clone()
                };
                let hv = hv.clone();
                calls.spawn_blocking(move || {
                    let r = VmRef {
                        vm: name,
                        site: Site::OnPremises,
                    };
                    let t = Instant::now();
                    hv.power_on(&r, &disks.disks)
                        .map(|()| t.elapsed().as_secs_f64())
                        .map_err(|e| e.to_string())
                });
            }
            while let Some(joined) = calls.join_next().await {
                let took = joined.map_err(|e| format!("power-on task: {e}"))??;
                self.rates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .boot_s_per_vm = took;
            }
        }
        Ok(format!(
            "{} VMs on in {} boot groups in {:.1} s",
            vms.len(),
            groups.len(),
            started.elapsed().as_secs_f64()
        ))
    }

    async fn power(&self, site: Site, vms: &[String], power: Power) -> Result<String, String> {
        let hv = match site {
            Site::Azure => self.config.azure.clone().ok_or(
                "no Azure hypervisor: set [controller] azure_hook (the script that shuts down and deletes Azure VMs)",
            )?,
            Site::OnPremises => self
                .config
                .on_premises
                .clone()
                .ok_or("no on-premises hypervisor: set [controller] on_premises_hook")?,
        };
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for vm in vms {
            let (hv, r) = (
                hv.clone(),
                VmRef {
                    vm: vm.clone(),
                    site,
                },
            );
            calls.spawn_blocking(move || match power {
                Power::ShutDown => hv.shut_down(&r),
                Power::Delete => hv.delete(&r),
            });
        }
        while let Some(joined) = calls.join_next().await {
            joined
                .map_err(|e| format!("hypervisor task: {e}"))?
                .map_err(|e| e.to_string())?;
        }
        if let (Site::Azure, Power::ShutDown) = (site, power) {
            self.rates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shut_down_s = started.elapsed().as_secs_f64();
        }
        let what = match power {
            Power::ShutDown => "shut down",
            Power::Delete => "deleted",
        };
        Ok(format!(
            "{} VMs {what} in {:.1} s",
            vms.len(),
            started.elapsed().as_secs_f64()
        ))
    }

    /// Test VMs go (powered off and deleted: they ran from the test copy).
    async fn power_off_test(&self, vms: &[String]) -> Result<String, String> {
        let hv = self
            .config
            .on_premises
            .clone()
            .ok_or("no on-premises hypervisor: set [controller] on_premises_hook")?;
        for vm in vms {
            let (hv, r) = (
                hv.clone(),
                VmRef {
                    vm: format!("{vm}-test"),
                    site: Site::OnPremises,
                },
            );
            tokio::task::spawn_blocking(move || hv.shut_down(&r).and_then(|()| hv.delete(&r)))
                .await
                .map_err(|e| format!("hypervisor task: {e}"))?
                .map_err(|e| e.to_string())?;
        }
        Ok(format!("{} test VMs removed", vms.len()))
    }

    async fn delete_test_copies(&self, vms: &[String]) -> Result<String, String> {
        for vm in vms {
            let name = copy_name("test", vm);
            let delete = TargetRequest::TestFailoverDelete { name };
            match self.ask_patiently(&delete, STATUS_TIMEOUT).await {
                Ok(_) => {}
                // Deleted already (the step issued again after a restart).
                Err(e) if e.starts_with("no test failover") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(format!("{} test copies deleted", vms.len()))
    }
}

/// The master target at the far end of `link`, as one status request (asked once)
/// sees it.
async fn view_on(link: &fbr_transport::PeerLink) -> Result<TargetView, String> {
    view_of(ask(link, &TargetRequest::Status, STATUS_TIMEOUT).await?)
}

/// A status answer's view of its master target.
fn view_of(answer: fbr_controller::target::Answer) -> Result<TargetView, String> {
    match (answer.status, answer.points) {
        (Some(status), Some(points)) => Ok(TargetView { status, points }),
        _ => Err("the master target's status answer lacks its status or points".into()),
    }
}

/// A task stopped when this is dropped (with the future that owns it).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, Clone, Copy)]
enum Power {
    ShutDown,
    Delete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_names_are_plain_fixed_and_distinct() {
        let a = copy_name("failover", "vm1");
        assert_eq!(a, copy_name("failover", "vm1"));
        assert!(a.starts_with("failover-vm1-"), "{a}");
        // Names the master target would refuse are made plain, and stay distinct.
        let (b, c) = (copy_name("test", "a.b"), copy_name("test", "a_b"));
        assert_ne!(b, c);
        for n in [&a, &b, &c, &copy_name("failover", &"x".repeat(255))] {
            assert!(n.len() <= 64, "{n}");
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
