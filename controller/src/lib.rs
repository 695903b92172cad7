//! # fbr-controller: the failback workflow, as a sans-IO state machine
//!
//! The controller embedded in the relay drives Azure Site Recovery's failback workflow
//! (`../shared/DESIGN.md`): reprotect a VM from Azure to on-premises, fail it over to
//! a chosen recovery point, commit, and reprotect it back. This crate is its core, with
//! no I/O and no clock: requests, the facts they are checked against, the outcomes of
//! steps and the time come in as arguments; the steps to run come out as
//! [`Action`]s for a driver (the relay) to carry out through the data path, the master
//! target, the configuration server and the hypervisor.
//!
//! ## Layout
//! - [`vm`]: a VM's protection state and which operation may start from which state.
//! - [`job`]: operations, their steps, and a job's progress and timing.
//! - [`refusal`]: the coded errors a request is refused with, each with its remedy.
//! - [`estimate`]: how long a failover would take, and the data each point kind loses.
//! - [`hypervisor`]: the narrow interface to the platforms the VMs run on (shut down,
//!   power on, delete, status): simulated, or the operator's command hook. The one
//!   module here that does I/O (it runs processes); the machine never calls it.
//! - [`store`]: the controller's state in redb, each call's changes in one transaction
//!   (the driver's; the machine only says what changed).
//! - [`target`]: the master target's control documents (requests, the answers read) and
//!   the rule choosing a point.
//! - [`controller`]: the machine: [`Controller::request`], [`Controller::next_actions`],
//!   [`Controller::step_progress`], [`Controller::step_finished`],
//!   [`Controller::cancel`].
//!
//! ## Invariants
//! - A request is checked before anything changes: a refusal leaves the controller as
//!   it was.
//! - At most one job runs per VM; a VM's state changes only when a job starts or
//!   finishes.
//! - A request with an idempotency key already used returns the job it started, never a
//!   second one.
//! - Steps run one after another, each at most once at a time; after a restart
//!   ([`Controller::resume`]) a step that was running is issued again, so every step a
//!   driver runs must be idempotent (it is asked again when its outcome was lost).
//! - Everything is `serde`: the driver persists the whole machine after every change.
#![forbid(unsafe_code)]

pub mod controller;
pub mod estimate;
pub mod hypervisor;
pub mod job;
pub mod refusal;
pub mod store;
pub mod target;
pub mod vm;

pub use controller::{Action, Changes, Controller, Facts, JobRequest, StepOutcome};
pub use job::{
    ChosenPoint, DiskCopy, Job, JobId, JobState, Operation, PointChoice, ReprotectLocation,
    RetentionChoice, Step, StepKind, StepState, VmOutput,
};
pub use refusal::{Refusal, RefusalCode};
pub use vm::Protection;
