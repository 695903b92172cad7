//! The coded errors a request is refused with (checked before anything changes), and
//! those a job fails with. Each says what to do about it: `remedy`.

use serde::{Deserialize, Serialize};

/// Why a request was refused, or a job failed. The names are part of the API: never
/// rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The configuration server has not heard from this relay recently.
    ConfigServerDisconnected,
    /// The master target cannot be reached.
    MasterTargetUnreachable,
    /// A VM of the request has no recovery point (at all, or of the kind asked).
    NoRecoveryPoint,
    /// A VM is not in a state the operation starts from.
    WrongState,
    /// Another job runs on a VM of the request.
    JobRunning,
    /// The master target lacks the space for the test copies.
    NotEnoughSpace,
    /// The request names a VM the controller does not know.
    UnknownVm,
    /// The request names a job that does not exist.
    UnknownJob,
    /// The job cannot be cancelled (finished, or past the point where it can be undone).
    NotCancellable,
    /// The request itself is malformed (no VMs, a VM twice, ...).
    BadRequest,
    /// A step failed; the note says which and why.
    StepFailed,
    /// The controller itself failed (its state could not be saved).
    Internal,
    /// The relay lacks a setting the operation needs (the message names it).
    NotConfigured,
}

impl RefusalCode {
    pub fn name(self) -> &'static str {
        match self {
            RefusalCode::ConfigServerDisconnected => "config_server_disconnected",
            RefusalCode::MasterTargetUnreachable => "master_target_unreachable",
            RefusalCode::NoRecoveryPoint => "no_recovery_point",
            RefusalCode::WrongState => "wrong_state",
            RefusalCode::JobRunning => "job_running",
            RefusalCode::NotEnoughSpace => "not_enough_space",
            RefusalCode::UnknownVm => "unknown_vm",
            RefusalCode::UnknownJob => "unknown_job",
            RefusalCode::NotCancellable => "not_cancellable",
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::StepFailed => "step_failed",
            RefusalCode::Internal => "internal",
            RefusalCode::NotConfigured => "not_configured",
        }
    }

    /// What the operator does about it.
    pub fn remedy(self) -> &'static str {
        match self {
            RefusalCode::ConfigServerDisconnected => {
                "check the relay's [config_server] address and that `config-server` runs; failback waits for it"
            }
            RefusalCode::MasterTargetUnreachable => {
                "check the master target runs and the VPN or ExpressRoute link is up (the relay's health says which)"
            }
            RefusalCode::NoRecoveryPoint => {
                "wait for the VM's first recovery point (reprotect must finish), or choose another point kind"
            }
            RefusalCode::WrongState => "run the operation the VM's state allows (see its state)",
            RefusalCode::JobRunning => "wait for the running job to finish, or cancel it",
            RefusalCode::NotEnoughSpace => {
                "free space on the master target's data file system, or test fewer VMs at once"
            }
            RefusalCode::UnknownVm => "name a VM this relay protects (see the VM list)",
            RefusalCode::UnknownJob => "name an existing job (see the job list)",
            RefusalCode::NotCancellable => {
                "let the job finish; then run the operation that undoes it (e.g. change point)"
            }
            RefusalCode::BadRequest => "fix the request",
            RefusalCode::StepFailed => {
                "fix the cause in the step's note, then run the operation again (it resumes safely)"
            }
            RefusalCode::NotConfigured => {
                "set what the message names in the relay's configuration and restart it"
            }
            RefusalCode::Internal => {
                "see the relay's log (the controller's state store in [controller] state_dir failed: a full or read-only disk?)"
            }
        }
    }
}

/// A coded error, its message, and the remedy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({}): {}", .code.name(), .remedy)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
    pub remedy: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            remedy: code.remedy().to_owned(),
        }
    }
}
