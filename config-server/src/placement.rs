//! Where a new VM goes: an agent that enrolls is assigned the relay with the most
//! headroom, unless the operator names one.
//!
//! Headroom is how long the relay's free cache would absorb its measured churn (the
//! ingest rate of its last heartbeat) if the master target went away: free bytes over
//! bytes per second. A relay with next to no churn (under 1 KB/s) ranks by free bytes
//! alone, above any busy one. Connected relays (a heartbeat within 3 intervals) come
//! first; ties go to the name. Only relays that advertised an address can be assigned.

use crate::state::InventoryEntry;

/// Under this churn a relay counts as idle.
const IDLE_BYTES_PER_S: f64 = 1_000.0;

/// A relay's rank: (connected, idle, headroom seconds or free bytes when idle).
fn rank(e: &InventoryEntry) -> (bool, bool, f64) {
    let connected = e.state == "connected";
    let (free, churn) = e.report.as_ref().map_or((0.0, 0.0), |r| {
        let free = r.cache.as_ref().map_or(0.0, |c| {
            c.capacity_bytes.saturating_sub(c.used_bytes) as f64
        });
        (free, r.ingest_bytes_per_s.unwrap_or(0.0))
    });
    if churn < IDLE_BYTES_PER_S {
        (connected, true, free)
    } else {
        (connected, false, free / churn)
    }
}

/// The relay (name, address) for a new agent, or `None` when no relay can be assigned.
/// `named`: the operator's choice, which must be an enrolled relay with an address.
pub fn choose_relay(
    inventory: &[InventoryEntry],
    named: Option<&str>,
) -> Result<Option<(String, String)>, String> {
    let relays = inventory
        .iter()
        .filter(|e| e.component.role == "relay" && e.component.advertise.is_some());
    if let Some(name) = named {
        return relays
            .clone()
            .find(|e| e.component.name == name)
            .map(|e| {
                Some((
                    e.component.name.clone(),
                    e.component.advertise.clone().unwrap_or_default(),
                ))
            })
            .ok_or_else(|| {
                format!("no enrolled relay {name} with an address (relay register --advertise)")
            });
    }
    let best = relays.max_by(|a, b| {
        let (ra, rb) = (rank(a), rank(b));
        ra.0.cmp(&rb.0)
            .then(ra.1.cmp(&rb.1))
            .then(ra.2.total_cmp(&rb.2))
            // Equal ranks: the first name wins (max_by keeps the last maximum).
            .then(b.component.name.cmp(&a.component.name))
    });
    Ok(best.map(|e| {
        (
            e.component.name.clone(),
            e.component.advertise.clone().unwrap_or_default(),
        )
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::state::Component;
    use fbr_enroll::wire::{CacheUsage, Heartbeat};

    fn relay(name: &str, state: &'static str, free: u64, churn: f64) -> InventoryEntry {
        InventoryEntry {
            component: Component {
                name: name.into(),
                role: "relay".into(),
                vms: vec![],
                advertise: Some(format!("{name}:9443")),
                key_sha256: String::new(),
                enrolled_ms: 0,
                last_enrolled_ms: 0,
                enrollments: 1,
                assigned_relay: None,
            },
            state,
            last_heartbeat_ms: Some(0),
            report: Some(Heartbeat {
                cache: Some(CacheUsage {
                    used_bytes: 1000 - free,
                    capacity_bytes: 1000,
                }),
                ingest_bytes_per_s: Some(churn),
                ..Heartbeat::healthy(30)
            }),
        }
    }

    #[test]
    fn the_relay_that_rides_out_the_longest_outage_wins() {
        // a: 900 bytes free at 10 kB/s (0.09 s); b: 500 free at 2 kB/s (0.25 s).
        let inv = [
            relay("a", "connected", 900, 10_000.0),
            relay("b", "connected", 500, 2_000.0),
        ];
        assert_eq!(choose_relay(&inv, None).unwrap().unwrap().0, "b");
        // An idle relay beats busy ones; among idle ones, free space decides.
        let inv = [
            relay("a", "connected", 900, 10_000.0),
            relay("c", "connected", 100, 0.0),
            relay("d", "connected", 300, 10.0),
        ];
        assert_eq!(choose_relay(&inv, None).unwrap().unwrap().0, "d");
        // A connected relay beats a disconnected one, whatever its headroom.
        let inv = [
            relay("a", "disconnected", 900, 0.0),
            relay("b", "connected", 10, 50_000.0),
        ];
        assert_eq!(choose_relay(&inv, None).unwrap().unwrap().0, "b");
        // Ties go to the first name.
        let inv = [
            relay("z", "connected", 500, 0.0),
            relay("m", "connected", 500, 0.0),
        ];
        assert_eq!(choose_relay(&inv, None).unwrap().unwrap().0, "m");
        // The operator's choice stands; an unknown one is an error; none to choose from.
        assert_eq!(choose_relay(&inv, Some("z")).unwrap().unwrap().1, "z:9443");
        assert!(choose_relay(&inv, Some("nope")).is_err());
        assert_eq!(choose_relay(&[], None).unwrap(), None);
    }
}
