//! Health and cache pressure, sans-IO: the relay's health task gathers an
//! [`Observation`] every second and hands it here; everything below is a pure function of
//! observations (and, for the ingest governor, of the previous decision), so tests drive
//! it with made-up numbers and no clock.
//!
//! **Health** is the worst of these conditions (each has a reason an operator can act on):
//!
//! | condition          | warning                         | critical                         |
//! |--------------------|---------------------------------|----------------------------------|
//! | `cache_free_space` | free < 30% of capacity*         | free < 25%                       |
//! | `backlog_age`      | oldest cached record > 30 min   | > 45 min                         |
//! | `master_target`    | —                               | unreachable for > 30 s           |
//! | `ingest_throttled` | some streams' ingest is paused  | —                                |
//! | `config_server`    | no heartbeat acknowledged for 3 intervals | —                      |
//! | `controller_state` | the failback controller cannot save its jobs | —                   |
//!
//! \* The capacity that binds ([`Observation::effective_capacity_bytes`]): the configured
//! one, or what the cache uses plus what its filesystem still has (`statvfs`), whichever
//! is smaller. Free space is measured against it, by health and the governor alike.
//!
//! **Ingest throttling** ([`IngestGovernor`]) protects the cache from filling up. It
//! engages when free space falls below 20% and then pauses ingest of the streams with the
//! largest backlog first: the further below 20%, the more streams (at 20% the largest
//! one; at 0% all of them); while engaged the set only grows. It releases every stream
//! once free space is back at 25% (hysteresis, so it does not flap). Independently, a
//! stream whose backlog exceeds its quota (default 8 GiB per disk) is paused until its
//! backlog is below 90% of the quota. A paused stream's agent gets no new acks, so it
//! runs out of credit and keeps its writes: throttling never drops data.

use std::collections::BTreeSet;
use std::fmt;

use fbr_protocol::StreamId;

/// How bad a condition is. Ordered: the overall state is the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Healthy = 0,
    Warning = 1,
    Critical = 2,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Healthy => "healthy",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

/// Thresholds of the health conditions and of ingest throttling (config `[health]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthThresholds {
    pub cache_free_warning_percent: f64,
    pub cache_free_critical_percent: f64,
    pub throttle_free_percent: f64,
    pub throttle_release_free_percent: f64,
    pub disk_backlog_quota_bytes: u64,
    pub backlog_age_warning_s: u64,
    pub backlog_age_critical_s: u64,
    pub master_target_unreachable_critical_s: u64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds {
            cache_free_warning_percent: 30.0,
            cache_free_critical_percent: 25.0,
            throttle_free_percent: 20.0,
            throttle_release_free_percent: 25.0,
            disk_backlog_quota_bytes: 8 << 30,
            backlog_age_warning_s: 30 * 60,
            backlog_age_critical_s: 45 * 60,
            master_target_unreachable_critical_s: 30,
        }
    }
}

impl HealthThresholds {
    /// Checks the thresholds are consistent; `Err((key, reason))` names the config key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let pct = |key, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err((key, format!("{v} is not a percentage (0-100)")))
            }
        };
        pct(
            "health.cache_free_warning_percent",
            self.cache_free_warning_percent,
        )?;
        pct(
            "health.cache_free_critical_percent",
            self.cache_free_critical_percent,
        )?;
        pct("health.throttle_free_percent", self.throttle_free_percent)?;
        pct(
            "health.throttle_release_free_percent",
            self.throttle_release_free_percent,
        )?;
        if self.cache_free_critical_percent > self.cache_free_warning_percent {
            return Err((
                "health.cache_free_critical_percent",
                "must not exceed health.cache_free_warning_percent".into(),
            ));
        }
        if self.throttle_release_free_percent < self.throttle_free_percent {
            return Err((
                "health.throttle_release_free_percent",
                "must be at least health.throttle_free_percent (hysteresis)".into(),
            ));
        }
        if self.backlog_age_critical_s < self.backlog_age_warning_s {
            return Err((
                "health.backlog_age_critical_seconds",
                "must be at least health.backlog_age_warning_seconds".into(),
            ));
        }
        if self.disk_backlog_quota_bytes == 0 {
            return Err(("health.disk_backlog_quota", "must be more than 0".into()));
        }
        Ok(())
    }
}

/// One stream as the health task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamObservation {
    pub id: StreamId,
    pub backlog_bytes: u64,
    /// Seconds the oldest unacknowledged cached record has waited.
    pub oldest_backlog_age_s: Option<u64>,
}

/// Everything health depends on, gathered at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub cache_used_bytes: u64,
    /// The configured capacity.
    pub cache_capacity_bytes: u64,
    /// What the cache's filesystem still has for it (`statvfs`), when known: the cache
    /// can grow only by that much, whatever its configured capacity.
    pub cache_disk_available_bytes: Option<u64>,
    pub streams: Vec<StreamObservation>,
    /// How long the master target has been unreachable, if it is.
    pub master_target_down_s: Option<u64>,
    /// How long the configuration server has acknowledged no heartbeat, once that is
    /// over 3 intervals, and the last error.
    pub config_server_unreachable: Option<(u64, String)>,
    /// Why the failback controller cannot save its state, while it cannot.
    pub controller_store_error: Option<String>,
}

impl Observation {
    /// The capacity that binds: the configured one, or what is used plus what the
    /// filesystem still has, whichever is smaller (a capacity left at its default on a
    /// smaller disk would otherwise look half empty until commits fail with ENOSPC).
    pub fn effective_capacity_bytes(&self) -> u64 {
        match self.cache_disk_available_bytes {
            Some(available) => self
                .cache_capacity_bytes
                .min(self.cache_used_bytes.saturating_add(available)),
            None => self.cache_capacity_bytes,
        }
    }

    /// Free space of the cache, in percent of its effective capacity.
    pub fn cache_free_percent(&self) -> f64 {
        let capacity = self.effective_capacity_bytes();
        if capacity == 0 {
            return 0.0;
        }
        let free = capacity.saturating_sub(self.cache_used_bytes);
        100.0 * free as f64 / capacity as f64
    }

    pub fn oldest_backlog_age_s(&self) -> Option<u64> {
        self.streams
            .iter()
            .filter_map(|s| s.oldest_backlog_age_s)
            .max()
    }
}

/// One active condition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Condition {
    /// Stable name (the `condition` label of `fbr_relay_health_condition`).
    pub name: &'static str,
    pub severity: Severity,
    pub reason: String,
}

/// Every condition's name, for metrics (a condition that is not active is 0).
pub const CONDITIONS: [&str; 6] = [
    "cache_free_space",
    "backlog_age",
    "master_target",
    "ingest_throttled",
    "config_server",
    "controller_state",
];

/// The relay's health at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HealthReport {
    pub state: Severity,
    pub conditions: Vec<Condition>,
}

impl HealthReport {
    /// A readable summary: the state, then one line per condition.
    pub fn describe(&self) -> String {
        let mut s = format!("{}\n", self.state);
        for c in &self.conditions {
            s.push_str(&format!("{} {}: {}\n", c.severity, c.name, c.reason));
        }
        s
    }
}

/// The health conditions in force given `obs` and the throttled streams.
pub fn evaluate(t: &HealthThresholds, obs: &Observation, throttled: usize) -> HealthReport {
    let mut conditions = Vec::new();
    let free = obs.cache_free_percent();
    let severity = if free < t.cache_free_critical_percent {
        Severity::Critical
    } else if free < t.cache_free_warning_percent {
        Severity::Warning
    } else {
        Severity::Healthy
    };
    if severity != Severity::Healthy {
        conditions.push(Condition {
            name: "cache_free_space",
            severity,
            reason: if obs.effective_capacity_bytes() < obs.cache_capacity_bytes {
                format!(
                    "cache {:.1}% free ({} of {} bytes used: the cache disk has room for only \
                     that much, less than the configured capacity of {} bytes)",
                    free,
                    obs.cache_used_bytes,
                    obs.effective_capacity_bytes(),
                    obs.cache_capacity_bytes
                )
            } else {
                format!(
                    "cache {:.1}% free ({} of {} bytes used)",
                    free, obs.cache_used_bytes, obs.cache_capacity_bytes
                )
            },
        });
    }
    if let Some(age) = obs.oldest_backlog_age_s() {
        let severity = if age > t.backlog_age_critical_s {
            Severity::Critical
        } else if age > t.backlog_age_warning_s {
            Severity::Warning
        } else {
            Severity::Healthy
        };
        if severity != Severity::Healthy {
            conditions.push(Condition {
                name: "backlog_age",
                severity,
                reason: format!("oldest cached data has waited {age} s for the master target"),
            });
        }
    }
    if let Some(down) = obs.master_target_down_s {
        if down > t.master_target_unreachable_critical_s {
            conditions.push(Condition {
                name: "master_target",
                severity: Severity::Critical,
                reason: format!("master target unreachable for {down} s"),
            });
        }
    }
    if let Some((quiet, error)) = &obs.config_server_unreachable {
        conditions.push(Condition {
            name: "config_server",
            severity: Severity::Warning,
            reason: format!("configuration server unreachable for {quiet} s (no heartbeat acknowledged): {error}"),
        });
    }
    if let Some(error) = &obs.controller_store_error {
        conditions.push(Condition {
            name: "controller_state",
            severity: Severity::Warning,
            reason: format!(
                "the failback controller cannot save its jobs (failback operations are refused): {error}"
            ),
        });
    }
    if throttled > 0 {
        conditions.push(Condition {
            name: "ingest_throttled",
            severity: Severity::Warning,
            reason: format!("ingest paused for {throttled} streams (cache pressure or quota)"),
        });
    }
    HealthReport {
        state: conditions
            .iter()
            .map(|c| c.severity)
            .max()
            .unwrap_or(Severity::Healthy),
        conditions,
    }
}

/// Decides which streams' ingest is paused (see the module documentation).
#[derive(Debug, Default)]
pub struct IngestGovernor {
    /// Pressure throttling is engaged (free space fell below the throttle threshold).
    engaged: bool,
    /// Streams paused by pressure since it engaged.
    by_pressure: BTreeSet<StreamId>,
    /// Streams paused because their backlog is over quota.
    by_quota: BTreeSet<StreamId>,
}

impl IngestGovernor {
    /// Updates the decision from `obs`; returns the paused streams.
    pub fn update(&mut self, t: &HealthThresholds, obs: &Observation) -> BTreeSet<StreamId> {
        let free = obs.cache_free_percent();
        if self.engaged && free >= t.throttle_release_free_percent {
            self.engaged = false;
            self.by_pressure.clear();
        } else if !self.engaged && free < t.throttle_free_percent {
            self.engaged = true;
        }
        if self.engaged && !obs.streams.is_empty() {
            // The further below the threshold, the more streams: 1 at the threshold,
            // all at 0% free.
            let depth = ((t.throttle_free_percent - free) / t.throttle_free_percent.max(1e-9))
                .clamp(0.0, 1.0);
            let n = obs.streams.len();
            let want = ((depth * n as f64).ceil() as usize).clamp(1, n);
            let mut by_backlog: Vec<&StreamObservation> = obs.streams.iter().collect();
            by_backlog.sort_by(|a, b| b.backlog_bytes.cmp(&a.backlog_bytes).then(a.id.cmp(&b.id)));
            for s in by_backlog {
                if self.by_pressure.len() >= want {
                    break;
                }
                self.by_pressure.insert(s.id.clone());
            }
        }
        let release_below = t.disk_backlog_quota_bytes / 10 * 9;
        for s in &obs.streams {
            if s.backlog_bytes > t.disk_backlog_quota_bytes {
                self.by_quota.insert(s.id.clone());
            } else if s.backlog_bytes < release_below {
                self.by_quota.remove(&s.id);
            }
        }
        // Streams that left the cache are forgotten.
        self.by_quota
            .retain(|id| obs.streams.iter().any(|s| &s.id == id));
        self.by_pressure.union(&self.by_quota).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stream(i: u32, backlog: u64) -> StreamObservation {
        StreamObservation {
            id: StreamId {
                vm: format!("vm-{i}"),
                disk: 0,
            },
            backlog_bytes: backlog,
            oldest_backlog_age_s: Some(1),
        }
    }

    fn obs(used_percent: u64, streams: Vec<StreamObservation>) -> Observation {
        Observation {
            cache_used_bytes: used_percent * 1000,
            cache_capacity_bytes: 100_000,
            cache_disk_available_bytes: None,
            streams,
            master_target_down_s: None,
            config_server_unreachable: None,
            controller_store_error: None,
        }
    }

    /// A capacity left at 8 GiB on a 96 MiB disk: free space is what the disk has, so
    /// health turns critical and ingest is throttled before commits would fail.
    #[test]
    fn a_disk_smaller_than_the_capacity_binds() {
        const MIB: u64 = 1 << 20;
        let t = HealthThresholds::default();
        let mut o = obs(0, vec![stream(1, 80 * MIB), stream(2, 1)]);
        o.cache_capacity_bytes = 8 << 30;
        o.cache_used_bytes = 80 * MIB;
        o.cache_disk_available_bytes = Some(16 * MIB);
        assert_eq!(o.effective_capacity_bytes(), 96 * MIB);
        assert!((o.cache_free_percent() - 100.0 / 6.0).abs() < 1e-9);
        let report = evaluate(&t, &o, 0);
        assert_eq!(report.state, Severity::Critical);
        let reason = &report.conditions[0].reason;
        assert!(
            reason.contains("the cache disk has room for only"),
            "{reason}"
        );
        let throttled = IngestGovernor::default().update(&t, &o);
        assert!(throttled.contains(&stream(1, 0).id), "{throttled:?}");
        // A roomy disk changes nothing: the configured capacity binds.
        o.cache_disk_available_bytes = Some(100 << 30);
        assert!(o.cache_free_percent() > 98.0);
        assert_eq!(evaluate(&t, &o, 0).state, Severity::Healthy);
    }

    #[test]
    fn each_threshold_gives_its_state_and_reason() {
        let t = HealthThresholds::default();
        let healthy = evaluate(&t, &obs(69, vec![stream(1, 5)]), 0);
        assert_eq!(healthy.state, Severity::Healthy);
        assert!(healthy.conditions.is_empty());
        let warn = evaluate(&t, &obs(71, vec![]), 0);
        assert_eq!(warn.state, Severity::Warning);
        assert!(warn.conditions[0].reason.contains("29.0% free"), "{warn:?}");
        assert_eq!(evaluate(&t, &obs(76, vec![]), 0).state, Severity::Critical);

        let mut old = obs(10, vec![stream(1, 5)]);
        old.streams[0].oldest_backlog_age_s = Some(31 * 60);
        assert_eq!(evaluate(&t, &old, 0).state, Severity::Warning);
        old.streams[0].oldest_backlog_age_s = Some(46 * 60);
        let r = evaluate(&t, &old, 0);
        assert_eq!(
            (r.state, r.conditions[0].name),
            (Severity::Critical, "backlog_age")
        );

        let mut down = obs(10, vec![]);
        down.master_target_down_s = Some(5);
        assert_eq!(
            evaluate(&t, &down, 0).state,
            Severity::Healthy,
            "a blip is not an alert"
        );
        down.master_target_down_s = Some(31);
        assert_eq!(evaluate(&t, &down, 0).state, Severity::Critical);

        // A configuration server out of reach is a warning that says for how long and why.
        let mut lonely = obs(50, vec![]);
        lonely.config_server_unreachable = Some((95, "connection refused".into()));
        lonely.controller_store_error = Some("No space left on device".into());
        let r = evaluate(&t, &lonely, 0);
        assert_eq!(r.state, Severity::Warning);
        assert_eq!(r.conditions[0].name, "config_server");
        assert!(
            r.conditions[0].reason.contains("95 s") && r.conditions[0].reason.contains("refused")
        );
        // A controller that cannot save its jobs says so, with the reason.
        assert_eq!(r.conditions[1].name, "controller_state");
        assert!(r.conditions[1].reason.contains("No space left"));

        // The overall state is the worst condition; every condition is listed.
        let r = evaluate(&t, &obs(72, vec![]), 3);
        assert_eq!(r.state, Severity::Warning);
        assert_eq!(r.conditions.len(), 2);
        assert!(r.describe().contains("ingest_throttled"));
    }

    #[test]
    fn throttling_takes_the_largest_backlogs_first_and_releases_with_hysteresis() {
        let t = HealthThresholds::default();
        let mut g = IngestGovernor::default();
        let streams = || {
            (0..4)
                .map(|i| stream(i, 100 * (i as u64 + 1)))
                .collect::<Vec<_>>()
        };
        assert!(
            g.update(&t, &obs(79, streams())).is_empty(),
            "21% free: not yet"
        );
        let first = g.update(&t, &obs(81, streams()));
        let names: Vec<_> = first.iter().map(|s| s.vm.clone()).collect();
        assert_eq!(names, ["vm-3"], "19% free: only the largest backlog");
        let more = g.update(&t, &obs(91, streams()));
        assert_eq!(
            more.len(),
            3,
            "9% free: more streams, largest first: {more:?}"
        );
        assert!(!more.iter().any(|s| s.vm == "vm-0"));
        // Freeing some space below the release point keeps the set (no flapping).
        assert_eq!(g.update(&t, &obs(78, streams())).len(), 3);
        assert_eq!(
            g.update(&t, &obs(76, streams())).len(),
            3,
            "24% free: still held"
        );
        assert!(
            g.update(&t, &obs(75, streams())).is_empty(),
            "25% free: released"
        );
        assert_eq!(
            g.update(&t, &obs(100, streams())).len(),
            4,
            "full: every stream"
        );
    }

    #[test]
    fn a_stream_over_its_quota_is_paused_until_well_below_it() {
        let t = HealthThresholds {
            disk_backlog_quota_bytes: 1000,
            ..HealthThresholds::default()
        };
        let mut g = IngestGovernor::default();
        assert_eq!(
            g.update(&t, &obs(10, vec![stream(1, 1001), stream(2, 10)]))
                .len(),
            1
        );
        assert_eq!(
            g.update(&t, &obs(10, vec![stream(1, 950), stream(2, 10)]))
                .len(),
            1
        );
        assert!(g
            .update(&t, &obs(10, vec![stream(1, 899), stream(2, 10)]))
            .is_empty());
    }

    #[test]
    fn inconsistent_thresholds_name_the_key() {
        let t = HealthThresholds {
            throttle_release_free_percent: 10.0,
            ..HealthThresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().0,
            "health.throttle_release_free_percent"
        );
        let t = HealthThresholds {
            cache_free_warning_percent: 130.0,
            ..HealthThresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().0,
            "health.cache_free_warning_percent"
        );
        HealthThresholds::default().validate().unwrap();
    }
}
