//! The controller: VMs, jobs, and the rules between them (sans-IO).
//!
//! A driver (the relay) feeds it requests with the [`Facts`] they are checked against,
//! asks it for the steps to run ([`Controller::next_actions`]), runs each through the
//! data path, the master target, the configuration server or the hypervisor, and
//! reports progress and outcomes back. It persists the whole controller (serde) after
//! every call that changed it; after a restart, the steps that were running are issued
//! again ([`Controller::resume`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::job::{Job, JobId, JobState, Operation, PointChoice, StepKind, StepState};
use crate::refusal::{Refusal, RefusalCode};
use crate::vm::Protection;

/// What a request is checked against: the world as the driver sees it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub config_server_connected: bool,
    pub master_target_reachable: bool,
    /// Per VM: the recovery points the master target holds.
    pub points: BTreeMap<String, PointCounts>,
    /// Free bytes on the master target's data file system.
    pub master_target_free_bytes: u64,
    /// Per VM: the bytes a test copy of its disks takes.
    pub test_copy_bytes: BTreeMap<String, u64>,
    /// Reprotect back's far side (the Azure master target, the on-premises relay) is
    /// configured; `Some(false)` when it is but the Azure master target does not answer.
    pub reverse: Option<bool>,
}

/// Recovery points of one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointCounts {
    pub all: u64,
    pub app_consistent: u64,
}

/// An operator's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub operation: Operation,
    /// One VM, or a plan's VMs in boot order.
    pub vms: Vec<String>,
    /// A retried request with the same key gets the same job, never a second one.
    pub idempotency_key: Option<String>,
    /// The estimate shown before it starts ([`crate::estimate`]), kept for the actual.
    pub estimate_s: Option<f64>,
    /// A plan's boot order: groups of `vms` powered on together, in order (`None`: one
    /// group of every VM). Every VM of `vms` is in exactly one group.
    #[serde(default)]
    pub boot: Option<Vec<Vec<String>>>,
    /// Seconds between one boot group and the next.
    #[serde(default)]
    pub boot_delay_s: u64,
    /// The estimate of each step by its name (`drain`, `roll_back`, `power_on`...),
    /// seconds: what the job's live ETA counts for the steps not begun yet.
    #[serde(default)]
    pub step_estimates_s: BTreeMap<String, f64>,
}

/// A step for the driver to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Run step `step` of `job`: `kind` of `operation` on `vms`. Steps are idempotent:
    /// after a restart the driver may be asked again for one it had begun.
    RunStep {
        job: JobId,
        step: usize,
        kind: StepKind,
        operation: Operation,
        vms: Vec<String>,
    },
    /// Stop step `step` of `job` (the job was cancelled while it ran).
    AbortStep { job: JobId, step: usize },
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepOutcome {
    /// Done; `note` is what it produced (e.g. the point chosen).
    Done {
        note: Option<String>,
    },
    Failed {
        reason: String,
    },
}

/// One VM the controller protects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub protection: Protection,
    /// The job running on it, if any.
    pub job: Option<JobId>,
    /// A test copy exists (a test failover not cleaned up yet).
    pub test_copy: bool,
    /// The test copy's disks, when it exists.
    #[serde(default)]
    pub test_disks: Option<crate::job::DiskCopy>,
    /// The disks the on-premises VM runs from (after a failover).
    #[serde(default)]
    pub on_premises: Option<crate::job::DiskCopy>,
    /// Why its last job failed, if it did.
    pub last_error: Option<Refusal>,
}

/// The controller's whole state (persisted by the driver).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Controller {
    vms: BTreeMap<String, VmRecord>,
    jobs: BTreeMap<JobId, Job>,
    /// Idempotency keys and the jobs they started.
    keys: BTreeMap<String, JobId>,
    next_id: JobId,
    /// Steps handed to the driver since this process started (not persisted: after a
    /// restart every running step is issued again).
    #[serde(skip)]
    issued: BTreeSet<(JobId, usize)>,
    #[serde(skip)]
    aborts: Vec<(JobId, usize)>,
    /// What changed since the last [`Controller::take_changes`] (the driver persists
    /// exactly that).
    #[serde(skip)]
    dirty_vms: BTreeSet<String>,
    #[serde(skip)]
    dirty_jobs: BTreeSet<JobId>,
}

/// The VMs and jobs that changed: what the driver writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    pub vms: Vec<(String, VmRecord)>,
    pub jobs: Vec<Job>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.jobs.is_empty()
    }
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

impl Controller {
    /// After a restart (deserialized): every step that was running is issued again by
    /// the next [`Controller::next_actions`].
    pub fn resume(&mut self) {
        self.issued.clear();
        self.aborts.clear();
    }

    /// Changes that could not be saved (the store failed): marked changed again, so the
    /// next save writes them.
    pub fn unsaved(&mut self, changes: &Changes) {
        self.dirty_vms
            .extend(changes.vms.iter().map(|(name, _)| name.clone()));
        self.dirty_jobs.extend(changes.jobs.iter().map(|j| j.id));
    }

    /// The controller as persisted: its VMs and jobs (the idempotency keys and the next
    /// job number follow from the jobs). Ready to [`Controller::next_actions`].
    pub fn from_records(
        vms: impl IntoIterator<Item = (String, VmRecord)>,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Self {
        let jobs: BTreeMap<JobId, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
        let keys = jobs
            .values()
            .filter_map(|j| j.idempotency_key.clone().map(|k| (k, j.id)))
            .collect();
        Controller {
            vms: vms.into_iter().collect(),
            next_id: jobs.keys().next_back().copied().unwrap_or(0),
            keys,
            jobs,
            ..Controller::default()
        }
    }

    /// What changed since the last call: persist it (all of it, in one transaction)
    /// before acting on what the calls returned.
    pub fn take_changes(&mut self) -> Changes {
        Changes {
            vms: std::mem::take(&mut self.dirty_vms)
                .into_iter()
                .filter_map(|v| self.vms.get(&v).map(|r| (v, r.clone())))
                .collect(),
            jobs: std::mem::take(&mut self.dirty_jobs)
                .into_iter()
                .filter_map(|j| self.jobs.get(&j).cloned())
                .collect(),
        }
    }

    /// Starts protecting `vm` (UNPROTECTED) if it is new.
    pub fn add_vm(&mut self, vm: &str) {
        if !self.vms.contains_key(vm) {
            self.vms.insert(
                vm.to_owned(),
                VmRecord {
                    protection: Protection::Unprotected,
                    job: None,
                    test_copy: false,
                    test_disks: None,
                    on_premises: None,
                    last_error: None,
                },
            );
            self.dirty_vms.insert(vm.to_owned());
        }
    }

    pub fn vm(&self, vm: &str) -> Option<&VmRecord> {
        self.vms.get(vm)
    }

    pub fn vms(&self) -> impl Iterator<Item = (&String, &VmRecord)> {
        self.vms.iter()
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Checks `req` against the VMs' states and `facts`, and starts its job; a refusal
    /// changes nothing. A key already used returns the job it started.
    pub fn request(
        &mut self,
        req: JobRequest,
        facts: &Facts,
        now_ms: u64,
    ) -> Result<JobId, Refusal> {
        if let Some(id) = req.idempotency_key.as_ref().and_then(|k| self.keys.get(k)) {
            return Ok(*id);
        }
        self.check(&req, facts)?;
        let id = self.next_id + 1;
        self.next_id = id;
        let from: BTreeMap<String, Protection> = req
            .vms
            .iter()
            .map(|vm| (vm.clone(), self.vms[vm].protection))
            .collect();
        for vm in &req.vms {
            let rec = self.vms.get_mut(vm).expect("checked");
            rec.job = Some(id);
            rec.protection = Protection::during(&req.operation, rec.protection);
            self.dirty_vms.insert(vm.clone());
        }
        self.dirty_jobs.insert(id);
        if let Some(k) = &req.idempotency_key {
            self.keys.insert(k.clone(), id);
        }
        let boot = req.boot.unwrap_or_else(|| vec![req.vms.clone()]);
        let mut job = Job::new(
            id,
            req.operation,
            req.vms,
            now_ms,
            req.idempotency_key,
            req.estimate_s,
            from,
        );
        job.boot = boot;
        job.boot_delay_s = req.boot_delay_s;
        job.step_estimates_s = job
            .steps
            .iter()
            .map(|s| req.step_estimates_s.get(s.kind.name()).copied())
            .collect();
        self.jobs.insert(id, job);
        Ok(id)
    }

    /// Every precondition of `req`, in the order the API documents them.
    fn check(&self, req: &JobRequest, facts: &Facts) -> Result<(), Refusal> {
        let op = &req.operation;
        if req.vms.is_empty() {
            return Err(refuse(RefusalCode::BadRequest, "the request names no VM"));
        }
        let unique: BTreeSet<&String> = req.vms.iter().collect();
        if unique.len() != req.vms.len() {
            return Err(refuse(
                RefusalCode::BadRequest,
                "the request names a VM twice",
            ));
        }
        if let Some(boot) = &req.boot {
            let mut named: Vec<&String> = boot.iter().flatten().collect();
            named.sort();
            let mut vms: Vec<&String> = req.vms.iter().collect();
            vms.sort();
            if named != vms || boot.iter().any(|g| g.is_empty()) {
                return Err(refuse(
                    RefusalCode::BadRequest,
                    "the boot order must name every VM of the request once, in non-empty groups",
                ));
            }
        }
        if let Operation::Reprotect {
            retention: Some(r), ..
        } = op
        {
            if !(1..=crate::target::MAX_RETENTION_S).contains(&r.window_s) {
                return Err(refuse(
                    RefusalCode::BadRequest,
                    format!(
                        "a retention window of {} s is out of range 1..={} (15 days)",
                        r.window_s,
                        crate::target::MAX_RETENTION_S
                    ),
                ));
            }
        }
        if !facts.config_server_connected {
            return Err(refuse(
                RefusalCode::ConfigServerDisconnected,
                "the configuration server is not connected",
            ));
        }
        if !facts.master_target_reachable {
            return Err(refuse(
                RefusalCode::MasterTargetUnreachable,
                "the master target is not reachable",
            ));
        }
        if *op == Operation::ReprotectBack {
            match facts.reverse {
                None => {
                    return Err(refuse(
                        RefusalCode::NotConfigured,
                        "reprotect back needs [controller] reverse_master_target and reverse_relay (the master target in Azure holding the Azure disks, and the on-premises relay forwarding to it)",
                    ))
                }
                Some(false) => {
                    return Err(refuse(
                        RefusalCode::MasterTargetUnreachable,
                        "the Azure master target (controller.reverse_master_target) is not reachable",
                    ))
                }
                Some(true) => {}
            }
        }
        for vm in &req.vms {
            let Some(rec) = self.vms.get(vm) else {
                return Err(refuse(RefusalCode::UnknownVm, format!("no VM {vm}")));
            };
            if let Some(j) = rec.job {
                return Err(refuse(
                    RefusalCode::JobRunning,
                    format!("job {j} runs on {vm}"),
                ));
            }
            let allowed = Protection::allowed_from(op);
            if !allowed.contains(&rec.protection) {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                return Err(refuse(
                    RefusalCode::WrongState,
                    format!(
                        "{vm} is {}; {} starts from {}",
                        rec.protection.name(),
                        op.name(),
                        names.join(" or ")
                    ),
                ));
            }
            match op {
                Operation::TestFailover { .. } if rec.test_copy => {
                    return Err(refuse(
                        RefusalCode::WrongState,
                        format!("{vm} has a test copy already: clean it up first"),
                    ))
                }
                Operation::TestCleanup if !rec.test_copy => {
                    return Err(refuse(
                        RefusalCode::WrongState,
                        format!("{vm} has no test copy to clean up"),
                    ))
                }
                _ => {}
            }
            let point = match op {
                Operation::Failover { point, .. }
                | Operation::ChangePoint { point }
                | Operation::TestFailover { point } => Some(point),
                _ => None,
            };
            if let Some(point) = point {
                let counts = facts.points.get(vm).copied().unwrap_or_default();
                let have = match point {
                    PointChoice::LatestAppConsistent => counts.app_consistent,
                    _ => counts.all,
                };
                if have == 0 {
                    return Err(refuse(
                        RefusalCode::NoRecoveryPoint,
                        format!("{vm} has no recovery point for {}", point.name()),
                    ));
                }
            }
        }
        if let Operation::TestFailover { .. } = op {
            let need: u64 = req
                .vms
                .iter()
                .map(|vm| facts.test_copy_bytes.get(vm).copied().unwrap_or(0))
                .sum();
            if need > facts.master_target_free_bytes {
                return Err(refuse(
                    RefusalCode::NotEnoughSpace,
                    format!(
                        "test copies need {need} bytes; the master target has {} free",
                        facts.master_target_free_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The steps to run now (and steps to stop): each running job's current step,
    /// issued once per process.
    pub fn next_actions(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions: Vec<Action> = self
            .aborts
            .drain(..)
            .map(|(job, step)| Action::AbortStep { job, step })
            .collect();
        for job in self.jobs.values_mut() {
            if job.state != JobState::Running {
                continue;
            }
            let Some(i) = job.current_step() else {
                continue;
            };
            let step = &mut job.steps[i];
            if step.state == StepState::Pending {
                step.state = StepState::Running;
                step.started_ms = Some(now_ms);
                self.dirty_jobs.insert(job.id);
            }
            if self.issued.insert((job.id, i)) {
                actions.push(Action::RunStep {
                    job: job.id,
                    step: i,
                    kind: step.kind,
                    operation: job.operation.clone(),
                    vms: job.vms.clone(),
                });
            }
        }
        actions
    }

    /// The running step's bytes done and to do.
    pub fn step_progress(
        &mut self,
        job: JobId,
        step: usize,
        bytes_done: u64,
        bytes_total: u64,
    ) -> Result<(), Refusal> {
        let s = self.running_step(job, step)?;
        s.bytes_done = bytes_done;
        s.bytes_total = bytes_total.max(bytes_done);
        self.dirty_jobs.insert(job);
        Ok(())
    }

    fn running_step(&mut self, job: JobId, step: usize) -> Result<&mut crate::job::Step, Refusal> {
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| refuse(RefusalCode::UnknownJob, format!("no job {job}")))?;
        let s = j.steps.get_mut(step).ok_or_else(|| {
            refuse(
                RefusalCode::BadRequest,
                format!("job {job} has no step {step}"),
            )
        })?;
        if s.state != StepState::Running {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!("step {step} of job {job} is not running"),
            ));
        }
        Ok(s)
    }

    /// Records what the running step produced for `vm` (the point chosen, the copy
    /// made); kept with the job, and moved to the VM when the job succeeds.
    pub fn record_output(
        &mut self,
        job: JobId,
        step: usize,
        vm: &str,
        set: impl FnOnce(&mut crate::job::VmOutput),
    ) -> Result<(), Refusal> {
        self.running_step(job, step)?;
        let j = self.jobs.get_mut(&job).expect("checked");
        if !j.vms.iter().any(|v| v == vm) {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!("job {job} does not act on {vm}"),
            ));
        }
        set(j.outputs.entry(vm.to_owned()).or_default());
        self.dirty_jobs.insert(job);
        Ok(())
    }

    /// How the running step ended. A report for a step that is not running (a
    /// duplicate after a restart) changes nothing.
    pub fn step_finished(
        &mut self,
        job: JobId,
        step: usize,
        outcome: StepOutcome,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        match self.running_step(job, step) {
            Ok(_) => {}
            Err(e) if e.code == RefusalCode::BadRequest => return Ok(()),
            Err(e) => return Err(e),
        }
        self.issued.remove(&(job, step));
        self.dirty_jobs.insert(job);
        let j = self.jobs.get_mut(&job).expect("checked");
        self.dirty_vms.extend(j.vms.iter().cloned());
        let s = &mut j.steps[step];
        s.ended_ms = Some(now_ms);
        match outcome {
            StepOutcome::Done { note } => {
                s.state = StepState::Done;
                if s.bytes_total > 0 {
                    s.bytes_done = s.bytes_total;
                }
                s.note = note;
                if j.current_step().is_none() {
                    j.state = JobState::Succeeded;
                    j.ended_ms = Some(now_ms);
                    for vm in &j.vms {
                        let rec = self.vms.get_mut(vm).expect("jobs name known VMs");
                        rec.protection = Protection::after(&j.operation, j.from[vm]);
                        rec.job = None;
                        rec.last_error = None;
                        let copy = j.outputs.get(vm).and_then(|o| o.copy.clone());
                        match j.operation {
                            Operation::TestFailover { .. } => {
                                rec.test_copy = true;
                                rec.test_disks = copy;
                            }
                            Operation::TestCleanup => {
                                rec.test_copy = false;
                                rec.test_disks = None;
                            }
                            Operation::Failover { .. } | Operation::ChangePoint { .. } => {
                                rec.on_premises = copy
                            }
                            _ => {}
                        }
                    }
                }
            }
            StepOutcome::Failed { reason } => {
                s.state = StepState::Failed;
                let error = refuse(
                    RefusalCode::StepFailed,
                    format!("{} failed: {reason}", s.kind.name()),
                );
                s.note = Some(reason);
                for later in &mut j.steps[step + 1..] {
                    later.state = StepState::Skipped;
                }
                j.state = JobState::Failed;
                j.ended_ms = Some(now_ms);
                j.error = Some(error.clone());
                let touched = j.touched_target();
                for vm in &j.vms {
                    let rec = self.vms.get_mut(vm).expect("jobs name known VMs");
                    rec.protection = Protection::after_failure(&j.operation, j.from[vm], touched);
                    rec.job = None;
                    rec.last_error = Some(error.clone());
                }
            }
        }
        Ok(())
    }

    /// Cancels a running job where that is safe; says what was undone (or left as it
    /// is), or why not.
    pub fn cancel(&mut self, job: JobId, now_ms: u64) -> Result<String, Refusal> {
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| refuse(RefusalCode::UnknownJob, format!("no job {job}")))?;
        if j.state.is_finished() {
            return Err(refuse(
                RefusalCode::NotCancellable,
                format!("job {job} is {:?} already", j.state),
            ));
        }
        let current = j.current_step().expect("a running job has a step");
        let limit = j.operation.cancellable_before();
        let allowed = limit.is_some_and(|k| {
            j.steps
                .iter()
                .position(|s| s.kind == k)
                .is_none_or(|at| current < at)
        });
        if !allowed {
            return Err(refuse(
                RefusalCode::NotCancellable,
                format!(
                    "job {job} ({}) is at {}: it cannot be undone halfway",
                    j.operation.name(),
                    j.steps[current].kind.name()
                ),
            ));
        }
        if j.steps[current].state == StepState::Running {
            self.aborts.push((job, current));
            self.issued.remove(&(job, current));
        }
        self.dirty_jobs.insert(job);
        self.dirty_vms.extend(j.vms.iter().cloned());
        for s in &mut j.steps[current..] {
            s.state = StepState::Skipped;
        }
        j.state = JobState::Cancelled;
        j.ended_ms = Some(now_ms);
        let shut_down = j
            .steps
            .iter()
            .any(|s| s.kind == StepKind::ShutDownSource && s.state == StepState::Done);
        for vm in &j.vms {
            let rec = self.vms.get_mut(vm).expect("jobs name known VMs");
            rec.protection = j.from[vm];
            rec.job = None;
        }
        let mut said = format!(
            "job {job} ({}) cancelled at {}: the VMs are {} again",
            j.operation.name(),
            j.steps[current].kind.name(),
            j.from.values().next().map_or("", |p| p.name())
        );
        match j.operation {
            Operation::Reprotect { .. } | Operation::ReprotectBack => said.push_str(
                "; what was resynced stays on the replica, and the next reprotect resumes from it",
            ),
            Operation::Failover { .. } | Operation::ChangePoint { .. } => {
                said.push_str("; nothing on-premises was changed");
                if shut_down {
                    said.push_str("; the Azure VMs were shut down: start them again to resume");
                }
            }
            Operation::TestFailover { .. } => {
                said.push_str("; test copies made so far are deleted by the driver")
            }
            Operation::Commit | Operation::TestCleanup => {}
        }
        Ok(said)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ReprotectLocation;

    fn facts() -> Facts {
        Facts {
            config_server_connected: true,
            master_target_reachable: true,
            points: BTreeMap::from([
                (
                    "vm1".into(),
                    PointCounts {
                        all: 5,
                        app_consistent: 1,
                    },
                ),
                (
                    "vm2".into(),
                    PointCounts {
                        all: 3,
                        app_consistent: 0,
                    },
                ),
            ]),
            master_target_free_bytes: 100 << 30,
            test_copy_bytes: BTreeMap::from([("vm1".into(), 40 << 30), ("vm2".into(), 40 << 30)]),
            reverse: Some(true),
        }
    }

    fn req(operation: Operation, vms: &[&str]) -> JobRequest {
        JobRequest {
            operation,
            vms: vms.iter().map(|v| v.to_string()).collect(),
            idempotency_key: None,
            estimate_s: None,
            boot: None,
            boot_delay_s: 0,
            step_estimates_s: Default::default(),
        }
    }

    fn controller() -> Controller {
        let mut c = Controller::default();
        c.add_vm("vm1");
        c.add_vm("vm2");
        c
    }

    /// Runs every step of `job` to success, checking the actions issued are its steps
    /// in order; returns their kinds.
    fn run_to_end(c: &mut Controller, job: JobId, now: &mut u64) -> Vec<StepKind> {
        let mut kinds = Vec::new();
        loop {
            let actions = c.next_actions(*now);
            let Some(Action::RunStep { step, kind, .. }) = actions
                .into_iter()
                .find(|a| matches!(a, Action::RunStep { job: j, .. } if *j == job))
            else {
                break;
            };
            kinds.push(kind);
            *now += 1000;
            c.step_finished(job, step, StepOutcome::Done { note: None }, *now)
                .unwrap();
        }
        kinds
    }

    /// Reprotects `vm` (original location) to the end: it is PROTECTED.
    fn protect(c: &mut Controller, vm: &str, now: &mut u64) {
        let reprotect = Operation::Reprotect {
            location: ReprotectLocation::Original,
            retention: None,
        };
        let id = c.request(req(reprotect, &[vm]), &facts(), *now).unwrap();
        run_to_end(c, id, now);
        assert_eq!(state(c, vm), Protection::Protected);
    }

    fn state(c: &Controller, vm: &str) -> Protection {
        c.vm(vm).unwrap().protection
    }

    #[test]
    fn the_whole_failback_cycle_goes_through_every_state() {
        use StepKind::*;
        let mut c = controller();
        let mut now = 0;
        let f = facts();
        let id = c
            .request(
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Original,
                        retention: None,
                    },
                    &["vm1"],
                ),
                &f,
                now,
            )
            .unwrap();
        assert_eq!(state(&c, "vm1"), Protection::Reprotecting);
        assert_eq!(
            run_to_end(&mut c, id, &mut now),
            vec![Resync { full: false }, WaitForRecoveryPoint]
        );
        assert_eq!(state(&c, "vm1"), Protection::Protected);

        let failover = Operation::Failover {
            point: PointChoice::Latest,
            planned: true,
        };
        let id = c.request(req(failover, &["vm1"]), &f, now).unwrap();
        assert_eq!(state(&c, "vm1"), Protection::FailingOver);
        assert_eq!(
            run_to_end(&mut c, id, &mut now),
            vec![ShutDownSource, Drain, ChoosePoint, RollBack, PowerOn]
        );
        assert_eq!(state(&c, "vm1"), Protection::FailedOver);
        assert_eq!(c.job(id).unwrap().state, JobState::Succeeded);
        assert_eq!(c.job(id).unwrap().actual_s(), Some(5.0));

        let id = c
            .request(
                req(
                    Operation::ChangePoint {
                        point: PointChoice::Tag(3),
                    },
                    &["vm1"],
                ),
                &f,
                now,
            )
            .unwrap();
        assert_eq!(
            run_to_end(&mut c, id, &mut now),
            vec![PowerOff, ChoosePoint, RollBack, PowerOn]
        );
        assert_eq!(state(&c, "vm1"), Protection::FailedOver);

        let id = c
            .request(req(Operation::Commit, &["vm1"]), &f, now)
            .unwrap();
        assert_eq!(run_to_end(&mut c, id, &mut now), vec![DeleteSource]);
        assert_eq!(state(&c, "vm1"), Protection::Committed);

        // Without its far side configured, or reachable, reprotect back is refused.
        for (reverse, code) in [
            (None, RefusalCode::NotConfigured),
            (Some(false), RefusalCode::MasterTargetUnreachable),
        ] {
            let without = Facts {
                reverse,
                ..f.clone()
            };
            let refused = c
                .request(req(Operation::ReprotectBack, &["vm1"]), &without, now)
                .unwrap_err();
            assert_eq!(refused.code, code, "{refused:?}");
            assert_eq!(state(&c, "vm1"), Protection::Committed);
        }
        let id = c
            .request(req(Operation::ReprotectBack, &["vm1"]), &f, now)
            .unwrap();
        assert_eq!(state(&c, "vm1"), Protection::ReprotectingBack);
        assert_eq!(
            run_to_end(&mut c, id, &mut now),
            vec![TurnAround, Resync { full: false }, WaitForRecoveryPoint]
        );
        assert_eq!(state(&c, "vm1"), Protection::ProtectedBack);
    }

    #[test]
    fn every_precondition_refuses_with_its_code_and_changes_nothing() {
        let mut c = controller();
        let mut now = 0;
        let id = c
            .request(
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Alternate,
                        retention: None,
                    },
                    &["vm1"],
                ),
                &facts(),
                0,
            )
            .unwrap();
        let failover = |point| Operation::Failover {
            point,
            planned: false,
        };
        let cases: Vec<(JobRequest, Facts, RefusalCode)> = vec![
            (
                req(failover(PointChoice::Latest), &[]),
                facts(),
                RefusalCode::BadRequest,
            ),
            (
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Original,
                        retention: Some(crate::job::RetentionChoice {
                            window_s: 16 * 86_400,
                            max_bytes: 0,
                        }),
                    },
                    &["vm2"],
                ),
                facts(),
                RefusalCode::BadRequest,
            ),
            (
                req(failover(PointChoice::Latest), &["vm2", "vm2"]),
                facts(),
                RefusalCode::BadRequest,
            ),
            (
                req(failover(PointChoice::Latest), &["vm2"]),
                Facts {
                    config_server_connected: false,
                    ..facts()
                },
                RefusalCode::ConfigServerDisconnected,
            ),
            (
                req(failover(PointChoice::Latest), &["vm2"]),
                Facts {
                    master_target_reachable: false,
                    ..facts()
                },
                RefusalCode::MasterTargetUnreachable,
            ),
            (
                req(failover(PointChoice::Latest), &["vm9"]),
                facts(),
                RefusalCode::UnknownVm,
            ),
            (
                req(failover(PointChoice::Latest), &["vm1"]),
                facts(),
                RefusalCode::JobRunning,
            ),
            (
                req(failover(PointChoice::Latest), &["vm2"]),
                facts(),
                RefusalCode::WrongState,
            ),
            (
                req(Operation::Commit, &["vm2"]),
                facts(),
                RefusalCode::WrongState,
            ),
        ];
        for (r, f, code) in cases {
            let before = serde_json::to_string(&c).unwrap();
            let e = c.request(r.clone(), &f, now).unwrap_err();
            assert_eq!(e.code, code, "{r:?}: {e}");
            assert!(!e.remedy.is_empty());
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                before,
                "a refusal changes nothing"
            );
        }
        // Once both are protected: points and space.
        run_to_end(&mut c, id, &mut now);
        protect(&mut c, "vm2", &mut now);
        let no_points = Facts {
            points: BTreeMap::new(),
            ..facts()
        };
        assert_eq!(
            c.request(
                req(failover(PointChoice::Latest), &["vm1"]),
                &no_points,
                now
            )
            .unwrap_err()
            .code,
            RefusalCode::NoRecoveryPoint
        );
        // A plan's app-consistent point needs one on every VM: vm2 has none.
        assert_eq!(
            c.request(
                req(failover(PointChoice::LatestAppConsistent), &["vm1", "vm2"]),
                &facts(),
                now
            )
            .unwrap_err()
            .code,
            RefusalCode::NoRecoveryPoint
        );
        let tight = Facts {
            master_target_free_bytes: 60 << 30,
            ..facts()
        };
        let test = Operation::TestFailover {
            point: PointChoice::LatestProcessed,
        };
        let e = c
            .request(req(test.clone(), &["vm1", "vm2"]), &tight, now)
            .unwrap_err();
        assert_eq!(e.code, RefusalCode::NotEnoughSpace);
        assert!(e.message.contains("85899345920 bytes"), "{e}");
        assert!(c.request(req(test, &["vm1"]), &tight, now).is_ok());
    }

    #[test]
    fn a_retried_request_with_the_same_key_gets_the_same_job() {
        let mut c = controller();
        let r = JobRequest {
            idempotency_key: Some("k-1".into()),
            ..req(
                Operation::Reprotect {
                    location: ReprotectLocation::Original,
                    retention: None,
                },
                &["vm1"],
            )
        };
        let a = c.request(r.clone(), &facts(), 0).unwrap();
        let b = c.request(r.clone(), &facts(), 5).unwrap();
        assert_eq!(a, b);
        assert_eq!(c.jobs().count(), 1);
        // Even once finished, and even if the facts changed meanwhile.
        let mut now = 0;
        run_to_end(&mut c, a, &mut now);
        let offline = Facts {
            master_target_reachable: false,
            ..facts()
        };
        assert_eq!(c.request(r, &offline, now).unwrap(), a);
    }

    #[test]
    fn a_failed_step_fails_the_job_and_puts_the_vm_where_it_is_safe() {
        let mut c = controller();
        let mut now = 0;
        let id = c
            .request(
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Original,
                        retention: None,
                    },
                    &["vm1"],
                ),
                &facts(),
                now,
            )
            .unwrap();
        let Action::RunStep { step, .. } = c.next_actions(now).remove(0) else {
            panic!()
        };
        c.step_finished(
            id,
            step,
            StepOutcome::Failed {
                reason: "disk read error".into(),
            },
            9,
        )
        .unwrap();
        let job = c.job(id).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.steps[1].state, StepState::Skipped);
        assert_eq!(job.error.as_ref().unwrap().code, RefusalCode::StepFailed);
        assert_eq!(state(&c, "vm1"), Protection::Unprotected);
        assert!(c
            .vm("vm1")
            .unwrap()
            .last_error
            .as_ref()
            .unwrap()
            .message
            .contains("disk read error"));
        // A failover that fails once the on-premises VM was touched stays FAILING_OVER
        // (retry or pick another point); one that fails before goes back to PROTECTED.
        protect(&mut c, "vm1", &mut now);
        for (fail_at, after) in [
            (StepKind::ChoosePoint, Protection::Protected),
            (StepKind::PowerOn, Protection::FailingOver),
        ] {
            let id = c
                .request(
                    req(
                        Operation::Failover {
                            point: PointChoice::LatestProcessed,
                            planned: false,
                        },
                        &["vm1"],
                    ),
                    &facts(),
                    now,
                )
                .unwrap();
            loop {
                let Action::RunStep { step, kind, .. } = c.next_actions(now).remove(0) else {
                    panic!()
                };
                let outcome = if kind == fail_at {
                    StepOutcome::Failed {
                        reason: "hypervisor said no".into(),
                    }
                } else {
                    StepOutcome::Done { note: None }
                };
                c.step_finished(id, step, outcome, now).unwrap();
                if kind == fail_at {
                    break;
                }
            }
            assert_eq!(state(&c, "vm1"), after, "failing at {fail_at:?}");
        }
        // From FAILING_OVER, the failover may be run again.
        let id = c
            .request(
                req(
                    Operation::Failover {
                        point: PointChoice::Tag(2),
                        planned: false,
                    },
                    &["vm1"],
                ),
                &facts(),
                now,
            )
            .unwrap();
        run_to_end(&mut c, id, &mut now);
        assert_eq!(state(&c, "vm1"), Protection::FailedOver);
    }

    #[test]
    fn a_restart_at_every_step_issues_the_running_step_again_and_the_job_finishes() {
        let op = Operation::Failover {
            point: PointChoice::Latest,
            planned: true,
        };
        let steps = op.steps().len();
        for crash_at in 0..steps {
            let mut c = controller();
            let mut now = 0;
            protect(&mut c, "vm1", &mut now);
            let id = c.request(req(op.clone(), &["vm1"]), &facts(), now).unwrap();
            for _ in 0..crash_at {
                let Action::RunStep { step, .. } = c.next_actions(now).remove(0) else {
                    panic!()
                };
                c.step_finished(id, step, StepOutcome::Done { note: None }, now)
                    .unwrap();
            }
            let Action::RunStep { step: running, .. } = c.next_actions(now).remove(0) else {
                panic!()
            };
            assert!(c.next_actions(now).is_empty(), "issued once per process");
            c.step_progress(id, running, 10, 100).unwrap();
            // kill -9: only what was persisted survives.
            let mut c: Controller =
                serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            c.resume();
            let again = c.next_actions(now);
            assert_eq!(again.len(), 1, "crash at {crash_at}");
            let Action::RunStep { step, .. } = &again[0] else {
                panic!()
            };
            assert_eq!(*step, running);
            assert_eq!(c.job(id).unwrap().steps[running].bytes_done, 10);
            // A duplicate outcome (reported before and after the restart) is harmless.
            c.step_finished(id, running, StepOutcome::Done { note: None }, now)
                .unwrap();
            c.step_finished(id, running, StepOutcome::Done { note: None }, now)
                .unwrap();
            run_to_end(&mut c, id, &mut now);
            assert_eq!(
                state(&c, "vm1"),
                Protection::FailedOver,
                "crash at {crash_at}"
            );
        }
    }

    #[test]
    fn cancel_undoes_what_is_safe_and_refuses_the_rest() {
        let mut c = controller();
        let mut now = 0;
        let id = c
            .request(
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Original,
                        retention: None,
                    },
                    &["vm1"],
                ),
                &facts(),
                now,
            )
            .unwrap();
        let Action::RunStep { step, .. } = c.next_actions(now).remove(0) else {
            panic!()
        };
        let said = c.cancel(id, 1).unwrap();
        assert!(
            said.contains("UNPROTECTED again") && said.contains("resumes"),
            "{said}"
        );
        assert_eq!(
            c.next_actions(now),
            vec![Action::AbortStep { job: id, step }]
        );
        assert_eq!(state(&c, "vm1"), Protection::Unprotected);
        assert_eq!(c.job(id).unwrap().state, JobState::Cancelled);
        assert_eq!(
            c.cancel(id, 2).unwrap_err().code,
            RefusalCode::NotCancellable
        );
        assert_eq!(c.cancel(99, 2).unwrap_err().code, RefusalCode::UnknownJob);
        // A late outcome of the aborted step changes nothing.
        c.step_finished(id, step, StepOutcome::Done { note: None }, 3)
            .unwrap();
        assert_eq!(c.job(id).unwrap().state, JobState::Cancelled);

        protect(&mut c, "vm1", &mut now);
        // A planned failover cancelled after the shutdown says so; past the rollback it
        // cannot be cancelled.
        let op = Operation::Failover {
            point: PointChoice::Latest,
            planned: true,
        };
        let id = c.request(req(op.clone(), &["vm1"]), &facts(), now).unwrap();
        let Action::RunStep { step, .. } = c.next_actions(now).remove(0) else {
            panic!()
        };
        c.step_finished(id, step, StepOutcome::Done { note: None }, now)
            .unwrap();
        let said = c.cancel(id, now).unwrap();
        assert!(said.contains("shut down"), "{said}");
        assert_eq!(state(&c, "vm1"), Protection::Protected);
        let id = c.request(req(op, &["vm1"]), &facts(), now).unwrap();
        loop {
            let Action::RunStep { step, kind, .. } = c.next_actions(now).remove(0) else {
                panic!()
            };
            if kind == StepKind::RollBack {
                break;
            }
            c.step_finished(id, step, StepOutcome::Done { note: None }, now)
                .unwrap();
        }
        assert_eq!(
            c.cancel(id, now).unwrap_err().code,
            RefusalCode::NotCancellable
        );
    }

    #[test]
    fn a_test_failover_makes_a_copy_once_and_its_cleanup_removes_it() {
        let mut c = controller();
        let mut now = 0;
        protect(&mut c, "vm1", &mut now);
        let test = Operation::TestFailover {
            point: PointChoice::LatestAppConsistent,
        };
        let id = c
            .request(req(test.clone(), &["vm1"]), &facts(), now)
            .unwrap();
        assert_eq!(
            state(&c, "vm1"),
            Protection::Protected,
            "production replication goes on"
        );
        run_to_end(&mut c, id, &mut now);
        assert!(c.vm("vm1").unwrap().test_copy);
        assert_eq!(
            c.request(req(test, &["vm1"]), &facts(), now)
                .unwrap_err()
                .code,
            RefusalCode::WrongState
        );
        let id = c
            .request(req(Operation::TestCleanup, &["vm1"]), &facts(), now)
            .unwrap();
        run_to_end(&mut c, id, &mut now);
        assert!(!c.vm("vm1").unwrap().test_copy);
        assert_eq!(
            c.request(req(Operation::TestCleanup, &["vm1"]), &facts(), now)
                .unwrap_err()
                .code,
            RefusalCode::WrongState
        );
    }

    #[test]
    fn progress_gives_percent_and_a_live_eta() {
        let mut c = controller();
        let id = c
            .request(
                req(
                    Operation::Reprotect {
                        location: ReprotectLocation::Alternate,
                        retention: None,
                    },
                    &["vm1"],
                ),
                &facts(),
                0,
            )
            .unwrap();
        let Action::RunStep { step, .. } = c.next_actions(1_000).remove(0) else {
            panic!()
        };
        c.step_progress(id, step, 250, 1000).unwrap();
        let job = c.job(id).unwrap();
        assert_eq!(job.percent(), 12.5);
        // 250 bytes in 2 s: 750 more take 6 s.
        assert_eq!(job.steps[step].eta_s(3_000), Some(6.0));
        assert_eq!(
            c.step_progress(id, 1, 1, 1).unwrap_err().code,
            RefusalCode::BadRequest
        );
    }

    #[test]
    fn what_a_failover_made_becomes_the_vms_disks_only_when_it_succeeds() {
        let mut c = controller();
        let mut now = 0;
        protect(&mut c, "vm1", &mut now);
        let failover = Operation::Failover {
            point: PointChoice::Latest,
            planned: false,
        };
        let id = c.request(req(failover, &["vm1"]), &facts(), now).unwrap();
        let disks = crate::job::DiskCopy {
            name: "failover-vm1".into(),
            disks: vec![crate::hypervisor::DiskImage {
                disk: 0,
                path: "/data/vm1-disk0.raw".into(),
            }],
        };
        loop {
            let actions = c.next_actions(now);
            let Some(Action::RunStep { step, kind, .. }) = actions.into_iter().next() else {
                break;
            };
            if kind == StepKind::RollBack {
                // Outputs only while the step runs, and only for the job's VMs.
                assert_eq!(
                    c.record_output(id, step, "vm2", |_| {}).unwrap_err().code,
                    RefusalCode::BadRequest
                );
                let d = disks.clone();
                c.record_output(id, step, "vm1", |o| o.copy = Some(d))
                    .unwrap();
                assert_eq!(c.vm("vm1").unwrap().on_premises, None, "not before success");
            }
            now += 1000;
            c.step_finished(id, step, StepOutcome::Done { note: None }, now)
                .unwrap();
        }
        assert_eq!(state(&c, "vm1"), Protection::FailedOver);
        assert_eq!(c.vm("vm1").unwrap().on_premises, Some(disks));
        assert_eq!(
            c.record_output(id, 0, "vm1", |_| {}).unwrap_err().code,
            RefusalCode::BadRequest,
            "a finished step takes no output"
        );
    }

    #[test]
    fn a_boot_order_must_name_every_vm_once() {
        let mut c = controller();
        let mut now = 0;
        protect(&mut c, "vm1", &mut now);
        protect(&mut c, "vm2", &mut now);
        let failover = Operation::Failover {
            point: PointChoice::LatestProcessed,
            planned: false,
        };
        for bad in [
            vec![vec!["vm1".to_string()]],
            vec![vec!["vm1".into()], vec![]],
            vec![vec!["vm1".into(), "vm2".into()], vec!["vm2".into()]],
        ] {
            let mut r = req(failover.clone(), &["vm1", "vm2"]);
            r.boot = Some(bad.clone());
            let e = c.request(r, &facts(), now).unwrap_err();
            assert_eq!(e.code, RefusalCode::BadRequest, "{bad:?}");
        }
        let mut r = req(failover, &["vm1", "vm2"]);
        r.boot = Some(vec![vec!["vm2".into()], vec!["vm1".into()]]);
        r.boot_delay_s = 30;
        let id = c.request(r, &facts(), now).unwrap();
        let job = c.job(id).unwrap();
        assert_eq!(
            job.boot,
            vec![vec!["vm2".to_string()], vec!["vm1".to_string()]]
        );
        assert_eq!(job.boot_delay_s, 30);
    }

    #[test]
    fn the_live_eta_counts_the_running_step_and_the_estimates_of_those_to_come() {
        let mut c = controller();
        let mut now = 0;
        protect(&mut c, "vm1", &mut now);
        let mut r = req(
            Operation::Failover {
                point: PointChoice::Latest,
                planned: false,
            },
            &["vm1"],
        );
        // drain, choose_point, roll_back, power_on.
        r.step_estimates_s = BTreeMap::from([
            ("drain".into(), 10.0),
            ("choose_point".into(), 0.0),
            ("roll_back".into(), 4.0),
        ]);
        let id = c.request(r.clone(), &facts(), now).unwrap();
        let Some(Action::RunStep { step, .. }) = c.next_actions(now).into_iter().next() else {
            panic!("no step");
        };
        // power_on has no estimate: the ETA is unknown rather than a guess.
        assert_eq!(c.job(id).unwrap().eta_s(now), None);
        c.cancel(id, now).unwrap();
        r.step_estimates_s.insert("power_on".into(), 2.0);
        let id = c.request(r, &facts(), now).unwrap();
        // The cancelled job's step is stopped first, then the new job's issued.
        let actions = c.next_actions(now);
        assert!(
            matches!(actions[0], Action::AbortStep { .. }),
            "{actions:?}"
        );
        let Some(Action::RunStep { step: s2, .. }) = actions.into_iter().nth(1) else {
            panic!("no step");
        };
        assert_eq!(step, s2);
        assert_eq!(c.job(id).unwrap().eta_s(now), Some(16.0));
        // 4 s into the drain, estimated at 10: 6 left plus 6 to come.
        assert_eq!(c.job(id).unwrap().eta_s(now + 4000), Some(12.0));
        // Progress counts time: 4 of the 16 s expected.
        assert_eq!(c.job(id).unwrap().percent_at(now + 4000), 25.0);
        // Once it moved bytes, its own rate counts: half done in 4 s, 4 s left.
        c.step_progress(id, s2, 50, 100).unwrap();
        assert_eq!(c.job(id).unwrap().eta_s(now + 4000), Some(10.0));
        assert_eq!(
            c.job(id).unwrap().percent_at(now + 4000),
            5.0 / 16.0 * 100.0
        );
    }
}
