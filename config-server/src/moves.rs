//! Moving a VM between relays (Azure Site Recovery's "switch process server"), as the
//! configuration server sees it (sans-IO: records in, records out; [`crate::api`]
//! stores them).
//!
//! ```text
//!  operator: POST /v1/moves {vm, relay}
//!     │  checks: the VM is known, the relay enrolled and reachable, not where the VM
//!     │  is already, no other move of it unfinished
//!     ▼
//!  requested ── the VM's placement +1, its relay the new one (its agent's
//!     │         GET /v1/assignment says so; drain if the old relay is connected)
//!     ▼
//!  draining ── the agent stops the VM's new writes and waits until the master target
//!     │        holds all the old relay had of it (progress: bytes drained)
//!     ▼
//!  switching ── the VM's disks reconnect to the new relay at the new placement; the
//!     │         master target refuses the old relay's copy from then on
//!     ▼
//!  resyncing ── only if the old relay was lost: a delta resync replaces what it held
//!     ▼
//!  done  (or failed, with the agent's reason, from any phase)
//! ```
//!
//! Invariants: a VM has at most one unfinished move; its placement only grows; phases
//! only move forward (a report that goes back is refused); a finished move is never
//! reopened.

use serde::{Deserialize, Serialize};

use fbr_enroll::wire::{ApiError, MovePhase, MoveProgress, MoveRequest};

use crate::state::{connection_state, Component, LastHeartbeat};

/// Where a VM writes, once it has moved (the `placements` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlacementRecord {
    pub vm: String,
    pub relay: String,
    pub placement: u64,
    /// The move under way, if any.
    pub move_id: Option<u64>,
    /// Whether that move drains the old relay first.
    pub drain: bool,
}

/// One move, as the operator follows it (the `moves` table; `GET /v1/moves`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub id: u64,
    pub vm: String,
    /// Where the VM was (none: it was never placed).
    pub from_relay: Option<String>,
    pub to_relay: String,
    pub placement: u64,
    /// The old relay was connected when the move was asked: the agent drains it.
    pub drain: bool,
    pub phase: MovePhase,
    pub requested_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    pub bytes_to_drain: u64,
    pub bytes_drained: u64,
    pub drain_ms: u64,
    pub fell_back: Option<String>,
    pub error: Option<String>,
}

/// Where `vm` writes now: its relay and placement. A moved VM's record says; else the
/// relay whose latest heartbeat carries the VM's streams (an agent pointed at a relay
/// by hand), else the relay its agent was assigned at enrollment; at placement 0.
pub fn current(
    vm: &str,
    components: &[Component],
    heartbeats: &std::collections::BTreeMap<String, LastHeartbeat>,
    placement: Option<&VmPlacementRecord>,
) -> Option<(Option<String>, u64)> {
    if let Some(p) = placement {
        return Some((Some(p.relay.clone()), p.placement));
    }
    let agent = components
        .iter()
        .find(|c| c.role == "agent" && c.vms.iter().any(|v| v == vm))?;
    let carrying = components
        .iter()
        .filter(|c| c.role == "relay")
        .filter_map(|c| heartbeats.get(&c.name).map(|h| (c, h)))
        .filter(|(_, h)| h.report.streams.iter().any(|s| s.vm == vm))
        .max_by_key(|(_, h)| h.received_ms)
        .map(|(c, _)| c.name.clone());
    Some((carrying.or_else(|| agent.assigned_relay.clone()), 0))
}

/// Everything a move request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    pub components: &'a [Component],
    pub heartbeats: &'a std::collections::BTreeMap<String, LastHeartbeat>,
    pub placement: Option<&'a VmPlacementRecord>,
    /// The VM's unfinished move, if any.
    pub unfinished: Option<&'a Move>,
    pub now_ms: u64,
}

/// Plans the move `req` asks for, as move number `id`: the move record and the VM's
/// new placement, or the coded reason it cannot be done.
pub fn plan(
    req: &MoveRequest,
    id: u64,
    site: &Site<'_>,
) -> Result<(Move, VmPlacementRecord), ApiError> {
    let Some((from, placement)) =
        current(&req.vm, site.components, site.heartbeats, site.placement)
    else {
        return Err(ApiError::new(
            "unknown_vm",
            format!(
                "no enrolled agent writes VM {} (enroll its agent first)",
                req.vm
            ),
        ));
    };
    let relay = site
        .components
        .iter()
        .find(|c| c.role == "relay" && c.name == req.relay)
        .ok_or_else(|| {
            ApiError::new(
                "unknown_relay",
                format!("no relay named {} is enrolled in this site", req.relay),
            )
        })?;
    if relay.advertise.is_none() {
        return Err(ApiError::new(
            "relay_unreachable",
            format!(
                "relay {} has not said where agents reach it (it advertises no address: start it with --config-server)",
                relay.name
            ),
        ));
    }
    if from.as_deref() == Some(req.relay.as_str()) {
        return Err(ApiError::new(
            "already_there",
            format!("VM {} already writes to relay {}", req.vm, req.relay),
        ));
    }
    if let Some(m) = site.unfinished {
        return Err(ApiError::new(
            "move_in_progress",
            format!(
                "move {} of VM {} to {} is {}: wait for it to finish",
                m.id,
                m.vm,
                m.to_relay,
                m.phase.name()
            ),
        ));
    }
    // Drain only an old relay that is there to drain: one that stopped reporting is
    // taken as lost, and the agent resyncs what the master target lacks.
    let drain = from
        .as_ref()
        .is_some_and(|r| connection_state(site.heartbeats.get(r), site.now_ms) == "connected");
    let placement = placement + 1;
    let record = Move {
        id,
        vm: req.vm.clone(),
        from_relay: from,
        to_relay: req.relay.clone(),
        placement,
        drain,
        phase: MovePhase::Requested,
        requested_ms: site.now_ms,
        updated_ms: site.now_ms,
        finished_ms: None,
        bytes_to_drain: 0,
        bytes_drained: 0,
        drain_ms: 0,
        fell_back: None,
        error: None,
    };
    let vm_placement = VmPlacementRecord {
        vm: req.vm.clone(),
        relay: req.relay.clone(),
        placement,
        move_id: Some(id),
        drain,
    };
    Ok((record, vm_placement))
}

/// Applies the agent's progress `report` to move `m` at `now_ms`.
pub fn apply_progress(m: &Move, report: &MoveProgress, now_ms: u64) -> Result<Move, ApiError> {
    if m.phase.is_finished() {
        return Err(ApiError::new(
            "move_finished",
            format!("move {} is {} already", m.id, m.phase.name()),
        ));
    }
    let mut next = m.clone();
    if let Some(phase) = report.phase {
        if phase < m.phase && phase != MovePhase::Failed {
            return Err(ApiError::new(
                "bad_progress",
                format!(
                    "move {} is {}; it cannot go back to {}",
                    m.id,
                    m.phase.name(),
                    phase.name()
                ),
            ));
        }
        next.phase = phase;
        if phase.is_finished() {
            next.finished_ms = Some(now_ms);
        }
    }
    next.bytes_to_drain = report.bytes_to_drain;
    next.bytes_drained = report.bytes_drained;
    next.drain_ms = report.drain_ms;
    next.fell_back = report.fell_back.clone().or(next.fell_back);
    next.error = report.error.clone().or(next.error);
    next.updated_ms = now_ms;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn component(name: &str, role: &str) -> Component {
        Component {
            name: name.into(),
            role: role.into(),
            vms: if role == "agent" {
                vec!["vm1".into()]
            } else {
                vec![]
            },
            advertise: (role == "relay").then(|| format!("{name}:9443")),
            key_sha256: String::new(),
            enrolled_ms: 0,
            last_enrolled_ms: 0,
            enrollments: 1,
            assigned_relay: (role == "agent").then(|| "relay-a".into()),
        }
    }

    fn request(vm: &str, relay: &str) -> MoveRequest {
        MoveRequest {
            version: 1,
            vm: vm.into(),
            relay: relay.into(),
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> String {
        r.unwrap_err().error.code
    }

    #[test]
    fn a_move_raises_the_placement_and_is_refused_when_it_makes_no_sense() {
        let components = vec![
            component("agent", "agent"),
            component("relay-a", "relay"),
            component("relay-b", "relay"),
        ];
        let beats = BTreeMap::new();
        let site = Site {
            components: &components,
            heartbeats: &beats,
            placement: None,
            unfinished: None,
            now_ms: 1000,
        };
        let (m, p) = plan(&request("vm1", "relay-b"), 7, &site).unwrap();
        assert_eq!(
            (m.id, m.from_relay.as_deref(), p.placement, p.move_id),
            (7, Some("relay-a"), 1, Some(7))
        );
        assert!(!m.drain, "relay-a never reported: lost, so no drain");
        assert_eq!(
            code(plan(&request("vm9", "relay-b"), 8, &site)),
            "unknown_vm"
        );
        assert_eq!(
            code(plan(&request("vm1", "relay-z"), 8, &site)),
            "unknown_relay"
        );
        assert_eq!(
            code(plan(&request("vm1", "relay-a"), 8, &site)),
            "already_there"
        );
        // From the moved placement on: where it is now, one more move at a time.
        let moved = Site {
            placement: Some(&p),
            unfinished: Some(&m),
            ..site
        };
        assert_eq!(
            code(plan(&request("vm1", "relay-a"), 8, &moved)),
            "move_in_progress"
        );
        let finished = Site {
            unfinished: None,
            ..moved
        };
        let (back, p2) = plan(&request("vm1", "relay-a"), 8, &finished).unwrap();
        assert_eq!(
            (back.from_relay.as_deref(), p2.placement),
            (Some("relay-b"), 2)
        );
    }

    #[test]
    fn progress_only_moves_forward_and_a_finished_move_stays_finished() {
        let components = vec![component("agent", "agent"), component("relay-b", "relay")];
        let beats = BTreeMap::new();
        let site = Site {
            components: &components,
            heartbeats: &beats,
            placement: None,
            unfinished: None,
            now_ms: 0,
        };
        let (m, _) = plan(&request("vm1", "relay-b"), 1, &site).unwrap();
        let report = |phase, drained| MoveProgress {
            version: 1,
            phase: Some(phase),
            bytes_to_drain: 100,
            bytes_drained: drained,
            ..MoveProgress::default()
        };
        let m = apply_progress(&m, &report(MovePhase::Draining, 40), 5).unwrap();
        let m = apply_progress(&m, &report(MovePhase::Switching, 100), 6).unwrap();
        assert_eq!(
            code(apply_progress(&m, &report(MovePhase::Draining, 100), 7)),
            "bad_progress"
        );
        let done = apply_progress(&m, &report(MovePhase::Done, 100), 8).unwrap();
        assert_eq!((done.finished_ms, done.bytes_drained), (Some(8), 100));
        assert_eq!(
            code(apply_progress(&done, &report(MovePhase::Failed, 100), 9)),
            "move_finished"
        );
    }
}
