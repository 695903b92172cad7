//! A VM's protection state (the states of Azure Site Recovery's failback, which our users
//! know) and which operation may start from which.
//!
//! ```text
//!  UNPROTECTED ──reprotect──▶ REPROTECTING ──▶ PROTECTED ──failover──▶ FAILING_OVER
//!       ▲                          │ fails         │  ▲ test failover,     │ fails: back
//!       └──────────────────────────┘               │  │ cleanup (a test    ▼ to PROTECTED
//!                                                  │  │ copy, no state)  FAILED_OVER
//!                                                  └──┘                    │ change point
//!                                                            commit ▼      ↺
//!  PROTECTED_BACK ◀── REPROTECTING_BACK ◀──reprotect back── COMMITTED
//! ```
//!
//! A job that fails puts the VM back where it started (its `error` says why), except a
//! failover that failed after the on-premises VM was touched: FAILING_OVER stays, so the
//! operator retries or picks another point, and never believes the VM is protected.

use serde::{Deserialize, Serialize};

use crate::job::Operation;

/// Where a VM stands in the failback workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protection {
    /// Running in Azure, not replicated to on-premises.
    Unprotected,
    /// Its disks are being resynced to the master target.
    Reprotecting,
    /// Replicating continuously; recovery points accrue.
    Protected,
    /// A failover is under way.
    FailingOver,
    /// Running on-premises from a recovery point; the Azure VM still exists.
    FailedOver,
    /// The failover is final: the Azure VM is deleted.
    Committed,
    /// Replication is turning around (on-premises to Azure).
    ReprotectingBack,
    /// Replicating from on-premises back to Azure.
    ProtectedBack,
}

impl Protection {
    pub fn name(self) -> &'static str {
        match self {
            Protection::Unprotected => "UNPROTECTED",
            Protection::Reprotecting => "REPROTECTING",
            Protection::Protected => "PROTECTED",
            Protection::FailingOver => "FAILING_OVER",
            Protection::FailedOver => "FAILED_OVER",
            Protection::Committed => "COMMITTED",
            Protection::ReprotectingBack => "REPROTECTING_BACK",
            Protection::ProtectedBack => "PROTECTED_BACK",
        }
    }

    /// The states `op` may start from.
    pub fn allowed_from(op: &Operation) -> &'static [Protection] {
        match op {
            Operation::Reprotect { .. } => &[Protection::Unprotected],
            Operation::Failover { .. } => &[Protection::Protected, Protection::FailingOver],
            Operation::ChangePoint { .. } => &[Protection::FailedOver],
            Operation::Commit => &[Protection::FailedOver],
            Operation::ReprotectBack => &[Protection::Committed],
            Operation::TestFailover { .. } | Operation::TestCleanup => &[Protection::Protected],
        }
    }

    /// The state while `op` runs.
    pub fn during(op: &Operation, from: Protection) -> Protection {
        match op {
            Operation::Reprotect { .. } => Protection::Reprotecting,
            Operation::Failover { .. } => Protection::FailingOver,
            Operation::ReprotectBack => Protection::ReprotectingBack,
            // Changing the point keeps the VM failed over; commit is one step; a test
            // failover leaves production replication as it is.
            Operation::ChangePoint { .. }
            | Operation::Commit
            | Operation::TestFailover { .. }
            | Operation::TestCleanup => from,
        }
    }

    /// The state once `op` succeeded.
    pub fn after(op: &Operation, from: Protection) -> Protection {
        match op {
            Operation::Reprotect { .. } => Protection::Protected,
            Operation::Failover { .. } | Operation::ChangePoint { .. } => Protection::FailedOver,
            Operation::Commit => Protection::Committed,
            Operation::ReprotectBack => Protection::ProtectedBack,
            Operation::TestFailover { .. } | Operation::TestCleanup => from,
        }
    }

    /// The state once `op` failed, having started from `from`; `touched`: whether a
    /// step that changes the on-premises VM had begun.
    pub fn after_failure(op: &Operation, from: Protection, touched: bool) -> Protection {
        match op {
            Operation::Failover { .. } if touched => Protection::FailingOver,
            _ => from,
        }
    }
}
