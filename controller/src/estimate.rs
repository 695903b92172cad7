//! Before a failover: how long it would take, step by step, and how much data each kind
//! of point loses (users of today's tools cannot say either).
//!
//! - **Drain** (point *latest*): the relay's backlog of the VMs over the measured WAN
//!   rate.
//! - **Roll back**: the bytes written since the point (what must be put back) over the
//!   measured rollback rate.
//! - **Boot**: the operator's boot time per VM, times the VMs (they boot in order).
//! - **Data loss window**: *latest* after a planned shutdown loses nothing; unplanned,
//!   what the agents had not sent yet (unknown: the RPO); *latest processed* loses the
//!   relay's backlog age; an app-consistent or named point, its age.

use serde::{Deserialize, Serialize};

/// What an estimate needs to know about the VMs (measured by the driver).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EstimateInputs {
    /// Bytes the relay holds of the VMs that the master target does not.
    pub backlog_bytes: u64,
    /// Age of the oldest of them, seconds (the RPO now).
    pub backlog_age_s: f64,
    /// The WAN leg's measured rate, bytes per second (0: unknown).
    pub link_bytes_per_s: f64,
    /// Bytes written since the chosen point, to put back.
    pub rollback_bytes: u64,
    /// Rollback's measured rate, bytes per second (0: unknown).
    pub rollback_bytes_per_s: f64,
    /// Age of the newest app-consistent point, seconds.
    pub app_point_age_s: Option<f64>,
    pub vms: usize,
    /// Seconds one VM takes to boot.
    pub boot_s_per_vm: f64,
}

/// An estimate, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub drain_s: Option<f64>,
    pub rollback_s: Option<f64>,
    pub boot_s: f64,
    pub total_s: Option<f64>,
    /// Data lost (seconds of writes), per point kind.
    pub loss_latest_planned_s: f64,
    pub loss_latest_unplanned_s: f64,
    pub loss_latest_processed_s: f64,
    pub loss_app_consistent_s: Option<f64>,
}

/// The estimate of a failover to `latest` (`drain`) or to a point already at the
/// master target.
pub fn failover(inputs: &EstimateInputs, drain: bool) -> Estimate {
    let over = |bytes: u64, rate: f64| (rate > 0.0).then(|| bytes as f64 / rate);
    let drain_s = if drain {
        over(inputs.backlog_bytes, inputs.link_bytes_per_s)
    } else {
        Some(0.0)
    };
    let rollback_s = over(inputs.rollback_bytes, inputs.rollback_bytes_per_s);
    let boot_s = inputs.boot_s_per_vm * inputs.vms as f64;
    let total_s = match (drain_s, rollback_s) {
        (Some(d), Some(r)) => Some(d + r + boot_s),
        _ => None,
    };
    Estimate {
        drain_s,
        rollback_s,
        boot_s,
        total_s,
        loss_latest_planned_s: 0.0,
        loss_latest_unplanned_s: 0.0,
        loss_latest_processed_s: inputs.backlog_age_s,
        loss_app_consistent_s: inputs.app_point_age_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_estimate_adds_drain_rollback_and_boot_and_says_what_each_point_loses() {
        let inputs = EstimateInputs {
            backlog_bytes: 500_000_000,
            backlog_age_s: 40.0,
            link_bytes_per_s: 12_500_000.0, // 100 Mbit/s
            rollback_bytes: 2_000_000_000,
            rollback_bytes_per_s: 400_000_000.0,
            app_point_age_s: Some(300.0),
            vms: 3,
            boot_s_per_vm: 60.0,
        };
        let e = failover(&inputs, true);
        assert_eq!(e.drain_s, Some(40.0));
        assert_eq!(e.rollback_s, Some(5.0));
        assert_eq!((e.boot_s, e.total_s), (180.0, Some(225.0)));
        assert_eq!(e.loss_latest_processed_s, 40.0);
        assert_eq!(e.loss_app_consistent_s, Some(300.0));
        // Without draining, nothing to wait for on the WAN; unknown rates stay unknown.
        let e = failover(
            &EstimateInputs {
                rollback_bytes_per_s: 0.0,
                ..inputs
            },
            false,
        );
        assert_eq!(
            (e.drain_s, e.rollback_s, e.total_s),
            (Some(0.0), None, None)
        );
    }
}
