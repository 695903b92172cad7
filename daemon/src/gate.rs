//! Admission of TCP connections to a daemon's HTTP servers (the metrics endpoint, the
//! HTTPS APIs), so that slow clients cannot lock out the honest ones.
//!
//! A slowloris opens connections and sends its request a byte at a time (or never). A
//! plain cap on connections lets it take every slot and keep Prometheus out for as long
//! as each connection may live. The gate keeps the cap (memory stays bounded) but, when
//! it is full, a new connection takes the slot of the connection that has been **waiting
//! longest without a request in progress** (a TLS handshake or request head not finished,
//! or an idle keep-alive); that one is told to close ([`Admission::evicted`]). An honest
//! client sends its request at once and is served in milliseconds, so it is never the
//! oldest waiter for long; a slow one is. Only when every slot is serving a request is a
//! new connection refused.
//!
//! Each outcome is counted in [`GateStats`] (what the daemons' metrics export):
//! admitted, evicted, refused, timed out.
//!
//! Invariants: at most `max` admissions are alive at once; a slot is freed when its
//! [`Admission`] drops, whatever the path out of the connection's task.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// What happened to the connections a gate saw.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Connections let in.
    pub admitted: AtomicU64,
    /// Connections closed to make room for a new one (they were waiting, not served).
    pub evicted: AtomicU64,
    /// Connections closed at once: every slot was serving a request.
    pub refused: AtomicU64,
    /// Connections closed by the server's own time limits (handshake, request head,
    /// connection lifetime), counted by the server through [`Admission::timed_out`].
    pub timed_out: AtomicU64,
}

impl GateStats {
    /// `(outcome, count)` for each outcome, in a fixed order (metric labels).
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("admitted", self.admitted.load(Ordering::Relaxed)),
            ("evicted", self.evicted.load(Ordering::Relaxed)),
            ("refused", self.refused.load(Ordering::Relaxed)),
            ("timed_out", self.timed_out.load(Ordering::Relaxed)),
        ]
    }
}

#[derive(Debug)]
struct Slot {
    /// Since when the connection has been waiting without a request in progress;
    /// `None` while it serves one.
    waiting_since: Option<Instant>,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    open: BTreeMap<u64, Slot>,
}

/// A bounded set of connection slots with eviction of the longest waiter. Cheap to clone
/// (shared).
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    max: usize,
    slots: Arc<Mutex<Slots>>,
    stats: Arc<GateStats>,
}

impl ConnectionGate {
    /// A gate of `max` slots (at least one).
    pub fn new(max: usize) -> Self {
        ConnectionGate {
            max: max.max(1),
            slots: Arc::default(),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<GateStats> {
        self.stats.clone()
    }

    /// Connections admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a new connection in, evicting the longest waiter if the gate is full; `None`
    /// (counted as refused) when every slot is serving a request.
    pub fn admit(&self) -> Option<Admission> {
        let now = Instant::now();
        let mut slots = self.lock();
        if slots.open.len() >= self.max {
            let oldest = slots
                .open
                .iter()
                .filter_map(|(id, s)| s.waiting_since.map(|t| (t, *id)))
                .min();
            let Some((_, id)) = oldest else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(slot) = slots.open.remove(&id) {
                // notify_one keeps the permit if the task is not waiting yet.
                slot.evict.notify_one();
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = slots.next_id;
        slots.next_id += 1;
        let evict = Arc::new(Notify::new());
        slots.open.insert(
            id,
            Slot {
                waiting_since: Some(now),
                evict: evict.clone(),
            },
        );
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        Some(Admission {
            id,
            gate: self.clone(),
            evict,
        })
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        if let Some(slot) = self.lock().open.get_mut(&id) {
            slot.waiting_since = waiting.then(Instant::now);
        }
    }
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Admission {
    id: u64,
    gate: ConnectionGate,
    evict: Arc<Notify>,
}

impl Admission {
    /// A request head arrived: the connection is being served (not evictable).
    pub fn request_started(&self) {
        self.gate.set_waiting(self.id, false);
    }

    /// Its answer is produced: the connection waits again (for the client to read it, or
    /// for the next request) and may be evicted.
    pub fn request_finished(&self) {
        self.gate.set_waiting(self.id, true);
    }

    /// Resolves when the gate gave this connection's slot to a newer one: close it.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// The server closed this connection for taking too long (counted).
    pub fn timed_out(&self) {
        self.gate.stats.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_full_gate_evicts_the_longest_waiter_and_refuses_only_when_all_are_served() {
        let gate = ConnectionGate::new(2);
        let slow = gate.admit().unwrap();
        let served = gate.admit().unwrap();
        served.request_started();
        // Full: the newcomer takes the slow one's slot, not the one being served.
        let newcomer = gate.admit().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), slow.evicted())
            .await
            .expect("the waiter is told to close");
        drop(slow); // its task ends; the slot was already given away
        assert_eq!(gate.open(), 2);
        newcomer.request_started();
        // Every slot serves a request: refused.
        assert!(gate.admit().is_none());
        // A finished request makes its connection a waiter again, evictable.
        served.request_finished();
        let third = gate.admit().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), served.evicted())
            .await
            .unwrap();
        drop((served, newcomer, third));
        assert_eq!(gate.open(), 0);
        let stats = gate.stats();
        assert_eq!(
            stats.counts(),
            [
                ("admitted", 4),
                ("evicted", 2),
                ("refused", 1),
                ("timed_out", 0)
            ]
        );
    }
}
