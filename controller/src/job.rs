//! Operations, their steps, and a job: one operation on one VM or on a recovery plan
//! (several VMs, failed over together), with each step's state, timing and bytes.
//!
//! The steps of each operation, in order (a step is skipped where it does not apply):
//!
//! | operation | steps |
//! |---|---|
//! | reprotect | resync (delta to the original location, full to an alternate one), wait for the first recovery point |
//! | failover | shut down the Azure VMs (planned only), drain the relay (point *latest*), choose the point, roll the replicas back to it, power on (in the plan's boot order) |
//! | change point | power off the on-premises VMs, choose the point, roll back, power on |
//! | commit | delete the Azure VMs |
//! | reprotect back | turn replication around, resync the Azure disks (delta), wait for the first point |
//! | test failover | choose the point, materialise test copies, power on the test VMs |
//! | test cleanup | power off the test VMs, delete the test copies |

use serde::{Deserialize, Serialize};

/// A job's number, unique in the controller.
pub type JobId = u64;

/// Where a reprotect writes on-premises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReprotectLocation {
    /// The on-premises disks still exist: a delta resync sends what differs.
    Original,
    /// New disks: a full copy.
    Alternate,
}

/// Which recovery point a failover (or test failover) uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointChoice {
    /// Drain everything the relay holds first: the least data lost. In a plan, each VM
    /// takes its own latest point.
    Latest,
    /// What the master target already has: the fastest.
    LatestProcessed,
    /// The newest application-consistent point; in a plan, the group's common one.
    LatestAppConsistent,
    /// A point by its tag id.
    Tag(u64),
}

impl PointChoice {
    pub fn name(&self) -> String {
        match self {
            PointChoice::Latest => "latest".into(),
            PointChoice::LatestProcessed => "latest_processed".into(),
            PointChoice::LatestAppConsistent => "latest_app_consistent".into(),
            PointChoice::Tag(t) => format!("tag {t}"),
        }
    }
}

/// A retention chosen at reprotect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionChoice {
    /// Seconds of history kept (1 s to 15 days).
    pub window_s: u64,
    /// Journal bytes kept per group at most; 0: no cap.
    #[serde(default)]
    pub max_bytes: u64,
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "operation")]
pub enum Operation {
    Reprotect {
        location: ReprotectLocation,
        /// The history the master target keeps for the VMs' replication groups, set
        /// once their first recovery point shows which groups they are; none: the
        /// master target's configured retention.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retention: Option<RetentionChoice>,
    },
    /// `planned`: the Azure VMs are shut down first, so *latest* loses nothing.
    Failover {
        point: PointChoice,
        planned: bool,
    },
    ChangePoint {
        point: PointChoice,
    },
    Commit,
    ReprotectBack,
    TestFailover {
        point: PointChoice,
    },
    TestCleanup,
}

impl Operation {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Reprotect { .. } => "reprotect",
            Operation::Failover { .. } => "failover",
            Operation::ChangePoint { .. } => "change_point",
            Operation::Commit => "commit",
            Operation::ReprotectBack => "reprotect_back",
            Operation::TestFailover { .. } => "test_failover",
            Operation::TestCleanup => "test_cleanup",
        }
    }

    /// The steps of this operation, in order.
    pub fn steps(&self) -> Vec<StepKind> {
        use StepKind::*;
        match self {
            Operation::Reprotect { location, .. } => vec![
                Resync {
                    full: *location == ReprotectLocation::Alternate,
                },
                WaitForRecoveryPoint,
            ],
            Operation::Failover { point, planned } => {
                let mut steps = Vec::new();
                if *planned {
                    steps.push(ShutDownSource);
                }
                if *point == PointChoice::Latest {
                    steps.push(Drain);
                }
                steps.extend([ChoosePoint, RollBack, PowerOn]);
                steps
            }
            Operation::ChangePoint { .. } => vec![PowerOff, ChoosePoint, RollBack, PowerOn],
            Operation::Commit => vec![DeleteSource],
            Operation::ReprotectBack => {
                vec![TurnAround, Resync { full: false }, WaitForRecoveryPoint]
            }
            Operation::TestFailover { .. } => vec![ChoosePoint, MaterializeTestCopy, PowerOnTest],
            Operation::TestCleanup => vec![PowerOffTest, DeleteTestCopy],
        }
    }

    /// Whether a running job of this operation may be cancelled, and how far: a
    /// failover past its rollback, a commit, or a cleanup cannot be undone halfway.
    pub fn cancellable_before(&self) -> Option<StepKind> {
        match self {
            Operation::Reprotect { .. } | Operation::ReprotectBack => {
                Some(StepKind::WaitForRecoveryPoint)
            }
            Operation::Failover { .. } | Operation::ChangePoint { .. } => Some(StepKind::RollBack),
            Operation::TestFailover { .. } => Some(StepKind::PowerOnTest),
            Operation::Commit | Operation::TestCleanup => None,
        }
    }
}

/// One step of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum StepKind {
    /// Resync the VM's disks to the master target (`full`: every block).
    Resync {
        full: bool,
    },
    /// Wait until every disk has a recovery point.
    WaitForRecoveryPoint,
    /// Shut the Azure VMs down through the hypervisor interface.
    ShutDownSource,
    /// Wait until the master target holds everything the relay held of the VMs.
    Drain,
    /// Pick the recovery point each VM fails over to (the driver answers with it).
    ChoosePoint,
    /// Bring each VM's disks to the chosen point: the master target makes them (a
    /// clone of the replica with the later changes taken back out), the replica goes on.
    RollBack,
    /// Power the on-premises VMs on with their disks (the plan's boot order).
    PowerOn,
    PowerOff,
    /// Delete the Azure VMs.
    DeleteSource,
    /// Point replication the other way (on-premises to Azure).
    TurnAround,
    MaterializeTestCopy,
    PowerOnTest,
    PowerOffTest,
    DeleteTestCopy,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Resync { full: true } => "full_resync",
            StepKind::Resync { full: false } => "delta_resync",
            StepKind::WaitForRecoveryPoint => "wait_for_recovery_point",
            StepKind::ShutDownSource => "shut_down_source",
            StepKind::Drain => "drain",
            StepKind::ChoosePoint => "choose_point",
            StepKind::RollBack => "roll_back",
            StepKind::PowerOn => "power_on",
            StepKind::PowerOff => "power_off",
            StepKind::DeleteSource => "delete_source",
            StepKind::TurnAround => "turn_around",
            StepKind::MaterializeTestCopy => "materialize_test_copy",
            StepKind::PowerOnTest => "power_on_test",
            StepKind::PowerOffTest => "power_off_test",
            StepKind::DeleteTestCopy => "delete_test_copy",
        }
    }

    /// Whether this step changes the on-premises VMs (a failover that fails from here on
    /// does not put them back as they were).
    pub fn touches_target(self) -> bool {
        matches!(
            self,
            StepKind::RollBack | StepKind::PowerOn | StepKind::PowerOff
        )
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    /// Not run: the job was cancelled before it, or failed at an earlier step.
    Skipped,
}

/// One step of a job, as operators follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    #[serde(flatten)]
    pub kind: StepKind,
    pub state: StepState,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// Bytes done and to do, for steps that move data (resync, drain, rollback, copy).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// What the step produced or why it failed, in words.
    pub note: Option<String>,
}

impl Step {
    fn new(kind: StepKind) -> Self {
        Step {
            kind,
            state: StepState::Pending,
            started_ms: None,
            ended_ms: None,
            bytes_done: 0,
            bytes_total: 0,
            note: None,
        }
    }

    /// This step's expected seconds left at `now_ms`, from its own measured rate, once
    /// it has moved some bytes.
    pub fn eta_s(&self, now_ms: u64) -> Option<f64> {
        let started = self.started_ms?;
        if self.state != StepState::Running || self.bytes_done == 0 {
            return None;
        }
        let elapsed_s = now_ms.saturating_sub(started) as f64 / 1000.0;
        let rate = self.bytes_done as f64 / elapsed_s.max(1e-3);
        Some(self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate)
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        self != JobState::Running
    }
}

/// One operation on one VM or a plan, with its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub operation: Operation,
    /// The VMs it acts on, in boot order.
    pub vms: Vec<String>,
    pub state: JobState,
    pub steps: Vec<Step>,
    pub created_ms: u64,
    pub ended_ms: Option<u64>,
    /// The coded error of a failed job, with its remedy.
    pub error: Option<crate::refusal::Refusal>,
    /// The key the request came with, if any.
    pub idempotency_key: Option<String>,
    /// The estimate made before it started (seconds), shown beside the actual.
    pub estimate_s: Option<f64>,
    /// Each VM's state before the job, to go back to if it fails or is cancelled.
    pub from: std::collections::BTreeMap<String, crate::vm::Protection>,
    /// The boot order: groups of VMs powered on together, one group after another
    /// (default: one group of every VM).
    #[serde(default)]
    pub boot: Vec<Vec<String>>,
    /// Seconds between one boot group's power-on and the next.
    #[serde(default)]
    pub boot_delay_s: u64,
    /// What the steps produced per VM (the point chosen, the copy of its disks).
    #[serde(default)]
    pub outputs: std::collections::BTreeMap<String, VmOutput>,
    /// Each step's estimate before the job started, seconds (`None`: unknown).
    #[serde(default)]
    pub step_estimates_s: Vec<Option<f64>>,
}

/// What a job's steps produced for one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<ChosenPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<DiskCopy>,
}

/// The recovery point a VM fails over (or test-fails over) to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChosenPoint {
    pub group: String,
    pub tag_id: u64,
    /// `crash` or `app`.
    pub kind: String,
    /// When the point became durable at the master target, UNIX milliseconds.
    pub time_ms: Option<u64>,
}

/// A VM's disks at a point, made by the master target: what the on-premises VM boots
/// from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// The master target's name for it (a test failover of the one VM).
    pub name: String,
    pub disks: Vec<crate::hypervisor::DiskImage>,
}

impl Job {
    pub(crate) fn new(
        id: JobId,
        operation: Operation,
        vms: Vec<String>,
        now_ms: u64,
        idempotency_key: Option<String>,
        estimate_s: Option<f64>,
        from: std::collections::BTreeMap<String, crate::vm::Protection>,
    ) -> Self {
        let steps = operation.steps().into_iter().map(Step::new).collect();
        Job {
            id,
            operation,
            vms,
            state: JobState::Running,
            steps,
            created_ms: now_ms,
            ended_ms: None,
            error: None,
            idempotency_key,
            estimate_s,
            from,
            boot: Vec::new(),
            boot_delay_s: 0,
            outputs: Default::default(),
            step_estimates_s: Vec::new(),
        }
    }

    /// The step running or next to run.
    pub fn current_step(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| matches!(s.state, StepState::Pending | StepState::Running))
    }

    /// Whether a step that changes the on-premises VMs has begun.
    pub fn touched_target(&self) -> bool {
        self.steps.iter().any(|s| {
            s.kind.touches_target()
                && s.state != StepState::Pending
                && s.state != StepState::Skipped
        })
    }

    /// Percent done at `now_ms`, weighted by time: when every step has an estimate,
    /// each counts by its estimated seconds (the running one by its bytes, or by the
    /// time it has run against its estimate, at most 95% of it), so half way means half
    /// the expected time; otherwise as [`Job::percent`].
    pub fn percent_at(&self, now_ms: u64) -> f64 {
        if self.state.is_finished() {
            return self.percent();
        }
        let estimates: Option<Vec<f64>> = (0..self.steps.len())
            .map(|i| self.step_estimates_s.get(i).copied().flatten())
            .collect();
        let Some(estimates) = estimates else {
            return self.percent();
        };
        let total: f64 = estimates.iter().sum();
        if total <= 0.0 {
            return self.percent();
        }
        let done: f64 = self
            .steps
            .iter()
            .zip(&estimates)
            .map(|(s, e)| match s.state {
                StepState::Done | StepState::Skipped => *e,
                StepState::Running if s.bytes_total > 0 => {
                    e * s.bytes_done.min(s.bytes_total) as f64 / s.bytes_total as f64
                }
                StepState::Running if *e > 0.0 => {
                    let ran = s
                        .started_ms
                        .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
                    e * (ran / e).min(0.95)
                }
                _ => 0.0,
            })
            .sum();
        100.0 * done / total
    }

    /// Percent done by steps: finished steps count whole, the running one by its bytes.
    pub fn percent(&self) -> f64 {
        let n = self.steps.len().max(1) as f64;
        let done: f64 = self
            .steps
            .iter()
            .map(|s| match s.state {
                StepState::Done | StepState::Skipped => 1.0,
                StepState::Running if s.bytes_total > 0 => {
                    s.bytes_done.min(s.bytes_total) as f64 / s.bytes_total as f64
                }
                _ => 0.0,
            })
            .sum();
        100.0 * done / n
    }

    /// The job's live ETA at `now_ms`, seconds: the running step's remaining time (from
    /// its measured rate once it moved bytes, else its estimate less the time it has
    /// run), plus the estimates of the steps still to come. `None` when a step to come
    /// has no estimate, or the running step neither a rate nor an estimate.
    pub fn eta_s(&self, now_ms: u64) -> Option<f64> {
        if self.state.is_finished() {
            return Some(0.0);
        }
        let current = self.current_step()?;
        let estimate = |i: usize| self.step_estimates_s.get(i).copied().flatten();
        let step = &self.steps[current];
        let running = match step.eta_s(now_ms) {
            Some(eta) => eta,
            None => {
                let ran = step
                    .started_ms
                    .map_or(0.0, |s| now_ms.saturating_sub(s) as f64 / 1000.0);
                (estimate(current)? - ran).max(0.0)
            }
        };
        let later: Option<f64> = (current + 1..self.steps.len()).map(estimate).sum();
        Some(running + later?)
    }

    /// How long it took (once finished).
    pub fn actual_s(&self) -> Option<f64> {
        self.ended_ms
            .map(|e| e.saturating_sub(self.created_ms) as f64 / 1000.0)
    }
}
