//! The site as a whole, from what is enrolled and what the heartbeats say: its VMs
//! with their disks (size, group, sync state, the relay carrying them, backlog, RPO),
//! its replication groups, relays and master targets, each with its state.
//!
//! Pure: [`site_inventory`] is a function of the components, their last heartbeats and
//! the clock. A disk is known from its master target's heartbeat (size, group, sync)
//! and from the relay that carries it (backlog, RPO); a VM also from its agent's
//! enrollment. Version 1; fields are only ever added.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::state::{connection_state, Component, LastHeartbeat};

/// `GET /v1/inventory` and `config-server inventory`.
#[derive(Debug, Clone, Serialize)]
pub struct SiteInventory {
    pub version: u32,
    pub vms: Vec<VmEntry>,
    pub groups: Vec<GroupEntry>,
    pub relays: Vec<ServerEntry>,
    pub master_targets: Vec<ServerEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmEntry {
    pub vm: String,
    /// The agent enrolled to write it, and the relay it was placed on (or moved to).
    pub agent: Option<String>,
    pub assigned_relay: Option<String>,
    /// How many times it moved between relays (0: never).
    pub placement: u64,
    pub disks: Vec<DiskEntry>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskEntry {
    pub disk: u32,
    pub size_bytes: Option<u64>,
    pub group: Option<String>,
    pub sync: Option<String>,
    pub master_target: Option<String>,
    /// The relay whose last heartbeat carried this disk's stream.
    pub relay: Option<String>,
    pub backlog_bytes: Option<u64>,
    pub rpo_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupEntry {
    pub group: String,
    pub master_target: String,
    pub recovery_points: u64,
    pub newest_point_ms: Option<u64>,
    /// Its disks, `vm/disk`.
    pub disks: Vec<String>,
}

/// A relay or master target.
#[derive(Debug, Clone, Serialize)]
pub struct ServerEntry {
    pub name: String,
    pub advertise: Option<String>,
    /// `connected`, `disconnected` or `never`.
    pub state: &'static str,
    pub health: Option<String>,
    pub reasons: Vec<String>,
    /// Disk streams it carries (relays) or replicas it holds (master targets).
    pub disks: usize,
}

/// The inventory (see the module docs).
pub fn site_inventory(
    components: &[Component],
    beats: &BTreeMap<String, LastHeartbeat>,
    now_ms: u64,
) -> SiteInventory {
    let mut vms: BTreeMap<String, VmEntry> = BTreeMap::new();
    fn entry<'a>(vms: &'a mut BTreeMap<String, VmEntry>, name: &str) -> &'a mut VmEntry {
        vms.entry(name.to_owned()).or_insert_with(|| VmEntry {
            vm: name.to_owned(),
            agent: None,
            assigned_relay: None,
            placement: 0,
            disks: vec![],
        })
    }
    fn disk(v: &mut VmEntry, n: u32) -> &mut DiskEntry {
        if let Some(i) = v.disks.iter().position(|d| d.disk == n) {
            return &mut v.disks[i];
        }
        v.disks.push(DiskEntry {
            disk: n,
            ..DiskEntry::default()
        });
        v.disks.last_mut().expect("just pushed")
    }
    let mut groups: BTreeMap<String, GroupEntry> = BTreeMap::new();
    let mut relays = Vec::new();
    let mut master_targets = Vec::new();
    for c in components {
        let beat = beats.get(&c.name);
        let report = beat.map(|b| &b.report);
        let server = |disks: usize| ServerEntry {
            name: c.name.clone(),
            advertise: c.advertise.clone(),
            state: connection_state(beat, now_ms),
            health: report.map(|r| r.health.state.clone()),
            reasons: report.map(|r| r.health.reasons.clone()).unwrap_or_default(),
            disks,
        };
        match c.role.as_str() {
            "agent" => {
                for name in &c.vms {
                    let v = entry(&mut vms, name);
                    v.agent = Some(c.name.clone());
                    v.assigned_relay = c.assigned_relay.clone();
                }
            }
            "relay" => {
                let streams = report.map(|r| r.streams.as_slice()).unwrap_or_default();
                for s in streams {
                    let d = disk(entry(&mut vms, &s.vm), s.disk);
                    d.relay = Some(c.name.clone());
                    d.backlog_bytes = Some(s.backlog_bytes);
                    d.rpo_s = s.rpo_s;
                }
                relays.push(server(streams.len()));
            }
            "master-target" => {
                let held = report.map(|r| r.disks.as_slice()).unwrap_or_default();
                for h in held {
                    let d = disk(entry(&mut vms, &h.vm), h.disk);
                    d.size_bytes = Some(h.size_bytes);
                    d.group = h.group.clone();
                    d.sync = Some(h.sync.clone());
                    d.master_target = Some(c.name.clone());
                    if let Some(g) = &h.group {
                        groups
                            .entry(g.clone())
                            .or_insert_with(|| GroupEntry {
                                group: g.clone(),
                                master_target: c.name.clone(),
                                recovery_points: 0,
                                newest_point_ms: None,
                                disks: vec![],
                            })
                            .disks
                            .push(format!("{}/{}", h.vm, h.disk));
                    }
                }
                for g in report.map(|r| r.groups.as_slice()).unwrap_or_default() {
                    if let Some(e) = groups.get_mut(&g.group) {
                        e.recovery_points = g.recovery_points;
                        e.newest_point_ms = g.newest_point_ms;
                    }
                }
                master_targets.push(server(held.len()));
            }
            _ => {}
        }
    }
    for v in vms.values_mut() {
        v.disks.sort_by_key(|d| d.disk);
    }
    SiteInventory {
        version: 1,
        vms: vms.into_values().collect(),
        groups: groups.into_values().collect(),
        relays,
        master_targets,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fbr_enroll::wire::{DiskReport, GroupReport, Heartbeat, StreamReport};

    fn component(name: &str, role: &str, vms: &[&str]) -> Component {
        Component {
            name: name.into(),
            role: role.into(),
            vms: vms.iter().map(|v| v.to_string()).collect(),
            advertise: None,
            key_sha256: String::new(),
            enrolled_ms: 0,
            last_enrolled_ms: 0,
            enrollments: 1,
            assigned_relay: (role == "agent").then(|| "relay-1".into()),
        }
    }

    fn beat(at: u64, streams: Vec<StreamReport>, disks: Vec<DiskReport>) -> LastHeartbeat {
        LastHeartbeat {
            received_ms: at,
            report: Heartbeat {
                streams,
                disks,
                groups: vec![GroupReport {
                    group: "g1".into(),
                    recovery_points: 7,
                    newest_point_ms: Some(99),
                }],
                ..Heartbeat::healthy(30)
            },
        }
    }

    /// A disk is put together from its agent, its relay and its master target.
    #[test]
    fn every_disk_joins_what_its_agent_relay_and_master_target_say() {
        let components = [
            component("agent-1", "agent", &["sql01"]),
            component("relay-1", "relay", &[]),
            component("mt-1", "master-target", &[]),
        ];
        let beats: BTreeMap<String, LastHeartbeat> = [
            (
                "relay-1".to_string(),
                beat(
                    1_000,
                    vec![StreamReport {
                        vm: "sql01".into(),
                        disk: 1,
                        backlog_bytes: 4096,
                        rpo_s: Some(3),
                    }],
                    vec![],
                ),
            ),
            (
                "mt-1".to_string(),
                beat(
                    1_000,
                    vec![],
                    [1, 0]
                        .map(|d| DiskReport {
                            vm: "sql01".into(),
                            disk: d,
                            size_bytes: 1 << 30,
                            group: Some("g1".into()),
                            sync: "consistent".into(),
                        })
                        .to_vec(),
                ),
            ),
        ]
        .into();
        let inv = site_inventory(&components, &beats, 200_000);
        let vm = &inv.vms[0];
        assert_eq!(
            (vm.vm.as_str(), vm.agent.as_deref()),
            ("sql01", Some("agent-1"))
        );
        assert_eq!(vm.disks.len(), 2);
        let d1 = &vm.disks[1];
        assert_eq!(d1.relay.as_deref(), Some("relay-1"));
        assert_eq!(
            (d1.backlog_bytes, d1.rpo_s, d1.size_bytes),
            (Some(4096), Some(3), Some(1 << 30))
        );
        assert_eq!(
            vm.disks[0].relay, None,
            "disk 0's stream is on no relay now"
        );
        assert_eq!(inv.groups[0].disks, ["sql01/1", "sql01/0"]);
        assert_eq!(inv.groups[0].recovery_points, 7);
        // 199 s since the last heartbeat, at 30 s intervals: disconnected.
        assert_eq!(inv.relays[0].state, "disconnected");
        let fresh = site_inventory(&components, &beats, 50_000);
        assert_eq!(fresh.master_targets[0].state, "connected");
        assert_eq!(fresh.master_targets[0].disks, 2);
    }
}
