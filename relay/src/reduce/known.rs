//! The blocks the master target is known to hold, so they travel as their SHA-256.
//!
//! Learned only from the master target's acknowledgements of batches that carried the
//! blocks as bytes (durable there), bounded (oldest forgotten first), and cleared
//! whenever the master target says it lost a block: a stale entry costs one resend,
//! never a wrong byte.

use std::collections::VecDeque;
use std::sync::Mutex;

use dashmap::DashMap;

/// Blocks the master target is known to hold: hashes of blocks it acknowledged.
/// Bounded (oldest forgotten first); cleared whenever the master target says it lost a
/// block, so a stale entry costs one resend, never a wrong byte.
#[derive(Debug)]
pub struct KnownBlocks {
    set: DashMap<[u8; 32], ()>,
    order: Mutex<VecDeque<[u8; 32]>>,
    capacity: usize,
}

impl KnownBlocks {
    pub fn new(capacity: usize) -> Self {
        KnownBlocks {
            set: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    pub fn contains(&self, h: &[u8; 32]) -> bool {
        self.set.contains_key(h)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The master target acknowledged records holding these blocks.
    pub fn insert_all(&self, hashes: &[[u8; 32]]) {
        if self.capacity == 0 || hashes.is_empty() {
            return;
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        for h in hashes {
            if self.set.insert(*h, ()).is_none() {
                order.push_back(*h);
            }
        }
        while self.set.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    self.set.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Forgets everything (the master target lost blocks, e.g. it restarted).
    pub fn clear(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.set.clear();
        order.clear();
    }
}
