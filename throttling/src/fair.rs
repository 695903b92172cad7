//! Weighted deficit round robin (Shreedhar and Varghese) over streams.
//!
//! Each flow (a stream) states the size of the batch it wants to send next
//! ([`FairQueue::demand`]); [`FairQueue::next_grant`] says which flow may send now. A flow's
//! turn adds `quantum × weight` to its deficit; it sends while its deficit covers its
//! batch. A flow that goes idle loses its deficit, so idleness banks no credit. Over many
//! rounds each backlogged flow gets bandwidth in proportion to its weight, whatever its
//! batch sizes.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug, Clone)]
struct Flow {
    weight: u32,
    deficit: u64,
    demand: Option<u64>,
    in_round: bool,
}

/// The scheduler state.
#[derive(Debug, Clone)]
pub struct FairQueue<K: Hash + Eq + Clone> {
    quantum: u64,
    flows: HashMap<K, Flow>,
    round: VecDeque<K>,
}

impl<K: Hash + Eq + Clone> FairQueue<K> {
    /// `quantum`: bytes a weight-1 flow earns per turn (about one batch).
    pub fn new(quantum: u64) -> Self {
        FairQueue {
            quantum: quantum.max(1),
            flows: HashMap::new(),
            round: VecDeque::new(),
        }
    }

    fn flow(&mut self, k: &K) -> &mut Flow {
        self.flows.entry(k.clone()).or_insert(Flow {
            weight: 1,
            deficit: 0,
            demand: None,
            in_round: false,
        })
    }

    /// Sets a flow's weight (priority); 1 is the default.
    pub fn set_weight(&mut self, k: &K, weight: u32) {
        self.flow(k).weight = weight.max(1);
    }

    /// `k` wants to send `bytes` next (replacing any earlier demand).
    pub fn demand(&mut self, k: K, bytes: u64) {
        let f = self.flow(&k);
        f.demand = Some(bytes.max(1));
        if !f.in_round {
            f.in_round = true;
            self.round.push_back(k);
        }
    }

    /// Withdraws `k`'s demand (it went away).
    pub fn cancel(&mut self, k: &K) {
        if let Some(f) = self.flows.get_mut(k) {
            f.demand = None;
        }
    }

    /// Forgets `k` entirely.
    pub fn remove(&mut self, k: &K) {
        self.flows.remove(k);
        self.round.retain(|x| x != k);
    }

    /// Flows with a pending demand.
    pub fn backlogged(&self) -> usize {
        self.flows.values().filter(|f| f.demand.is_some()).count()
    }

    /// The next flow allowed to send, with the size of the batch it may send now;
    /// `None` when nobody is waiting.
    pub fn next_grant(&mut self) -> Option<(K, u64)> {
        loop {
            let k = self.round.front()?.clone();
            let quantum = self.quantum;
            let Some(f) = self.flows.get_mut(&k) else {
                self.round.pop_front();
                continue;
            };
            match f.demand {
                None => {
                    // Idle: leaves the round and loses its deficit.
                    f.deficit = 0;
                    f.in_round = false;
                    self.round.pop_front();
                }
                Some(bytes) if f.deficit >= bytes => {
                    f.deficit -= bytes;
                    f.demand = None;
                    return Some((k, bytes));
                }
                Some(_) => {
                    f.deficit += quantum * f.weight as u64;
                    self.round.rotate_left(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jain's fairness index of the shares: 1 is perfectly fair, 1/n is one flow taking all.
    fn jain(shares: &[f64]) -> f64 {
        let sum: f64 = shares.iter().sum();
        let sq: f64 = shares.iter().map(|x| x * x).sum();
        sum * sum / (shares.len() as f64 * sq)
    }

    /// Every flow always wants its next batch; returns bytes granted per flow.
    fn saturate(q: &mut FairQueue<usize>, sizes: &[u64], grants: usize) -> Vec<f64> {
        let mut got = vec![0f64; sizes.len()];
        for (i, s) in sizes.iter().enumerate() {
            q.demand(i, *s);
        }
        for _ in 0..grants {
            let (k, b) = q.next_grant().expect("always backlogged");
            got[k] += b as f64;
            q.demand(k, sizes[k]);
        }
        got
    }

    #[test]
    fn equal_flows_with_unequal_batches_share_equally() {
        let mut q = FairQueue::new(256 * 1024);
        // 100 streams; batch sizes from 4 KiB to 1 MiB.
        let sizes: Vec<u64> = (0..100).map(|i| 4096 << (i % 9)).collect();
        let got = saturate(&mut q, &sizes, 200_000);
        let j = jain(&got);
        assert!(j >= 0.99, "Jain's index {j}");
    }

    #[test]
    fn weights_set_the_shares() {
        let mut q = FairQueue::new(64 * 1024);
        q.set_weight(&1, 3);
        let got = saturate(&mut q, &[64 * 1024, 64 * 1024], 40_000);
        let ratio = got[1] / got[0];
        assert!((ratio - 3.0).abs() < 0.05, "ratio {ratio}");
    }

    #[test]
    fn idle_flows_bank_no_credit_and_newcomers_are_served_within_a_round() {
        let mut q = FairQueue::new(1000);
        q.demand("busy", 1000);
        for _ in 0..1000 {
            let (k, _) = q.next_grant().unwrap();
            assert_eq!(k, "busy");
            q.demand("busy", 1000);
        }
        q.demand("new", 1000);
        let served: Vec<&str> = (0..3)
            .map(|_| {
                let (k, _) = q.next_grant().unwrap();
                q.demand(k, 1000);
                k
            })
            .collect();
        assert!(served.contains(&"new"), "{served:?}");
        q.cancel(&"busy");
        q.cancel(&"new");
        assert_eq!(q.next_grant(), None);
        assert_eq!(q.backlogged(), 0);
    }
}
