//! The credit granted to agent streams: a fair share of one budget for all of them.
//!
//! Credit is what an agent stream may have sent and not yet had acknowledged. Those
//! bytes are somewhere in the relay (QUIC receive buffers, a record read and waiting
//! for the cache's append budget, the cache writer's queue) until they are durable, so
//! their sum is memory. A fixed credit per stream (16 MiB) makes that sum grow with
//! the number of streams: a thousand disks starting at once could put 16 GiB in
//! flight. Instead every open stream is granted the same share of `ingest.memory`:
//! `memory / open streams`, rounded down to a power of two (so that the share changes
//! only when the number of streams doubles or halves, not with each stream that
//! joins), at most `ingest.credit` and at least [`MIN_CREDIT`]. Streams already open
//! hear the new share in a `Credit` frame.
//!
//! Invariant: the credit of every open stream is the current share, so at most
//! `max(memory, streams × MIN_CREDIT)` bytes are granted at once, plus up to one record
//! per stream (an agent may send a record while any credit remains).

use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::sync::watch;

/// The least credit a stream is granted, however many share the budget: enough for a
/// stream's writes to flow while it waits one round trip for acknowledgements.
pub const MIN_CREDIT: u64 = 256 << 10;

/// The budget for all agent streams' credit, and its current share.
#[derive(Debug)]
pub struct CreditShare {
    memory: u64,
    max_credit: u64,
    streams: Mutex<usize>,
    share: watch::Sender<u64>,
    /// `fbr_relay_agent_credit_bytes`.
    gauge: IntGauge,
}

/// An open stream's place in the share; leaving (dropped) gives it back.
#[derive(Debug)]
pub struct CreditHolder {
    pool: Arc<CreditShare>,
    /// The share as it changes: send each new value to the agent.
    pub share: watch::Receiver<u64>,
}

impl CreditShare {
    /// `memory` for all streams together, at most `max_credit` per stream; the share
    /// is shown in `gauge`.
    pub fn new(memory: u64, max_credit: u64, gauge: IntGauge) -> Arc<Self> {
        let pool = CreditShare {
            memory,
            max_credit,
            streams: Mutex::new(0),
            share: watch::channel(0).0,
            gauge,
        };
        pool.update(|_| {});
        Arc::new(pool)
    }

    /// The credit each of `streams` open streams is granted.
    pub fn share_for(&self, streams: usize) -> u64 {
        let fair = self.memory / streams.max(1) as u64;
        let rounded = if fair == 0 { 0 } else { 1u64 << fair.ilog2() };
        rounded
            .min(self.max_credit)
            .max(MIN_CREDIT.min(self.max_credit))
    }

    /// The credit granted to each open stream now.
    pub fn current(&self) -> u64 {
        *self.share.borrow()
    }

    /// A stream opens: the share is recomputed with it counted.
    pub fn join(self: &Arc<Self>) -> CreditHolder {
        let share = self.share.subscribe();
        self.update(|n| *n += 1);
        CreditHolder {
            pool: self.clone(),
            share,
        }
    }

    fn update(&self, change: impl FnOnce(&mut usize)) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut streams);
        let share = self.share_for(*streams);
        self.gauge.set(share as i64);
        self.share
            .send_if_modified(|s| std::mem::replace(s, share) != share);
    }
}

impl Drop for CreditHolder {
    fn drop(&mut self) {
        self.pool.update(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gauge() -> IntGauge {
        IntGauge::new("credit", "test").unwrap()
    }

    #[test]
    fn the_share_follows_the_streams_in_powers_of_two_within_bounds() {
        let shown = gauge();
        let pool = CreditShare::new(256 << 20, 16 << 20, shown.clone());
        assert_eq!(pool.current(), 16 << 20, "alone: the per-stream maximum");
        let holders: Vec<_> = (0..16).map(|_| pool.join()).collect();
        assert_eq!(pool.current(), 16 << 20);
        let more: Vec<_> = (0..4).map(|_| pool.join()).collect();
        // 20 streams: 12.8 MiB each, rounded down to 8 MiB.
        assert_eq!(pool.current(), 8 << 20);
        let many: Vec<_> = (0..980).map(|_| pool.join()).collect();
        // 1,000 streams: 262 KiB each, rounded down to 256 KiB.
        assert_eq!(pool.current(), 256 << 10);
        let crowd: Vec<_> = (0..9000).map(|_| pool.join()).collect();
        assert_eq!(pool.current(), MIN_CREDIT, "never below the minimum");
        assert_eq!(shown.get() as u64, MIN_CREDIT);
        drop((crowd, many, more));
        assert_eq!(
            pool.current(),
            16 << 20,
            "leaving streams give their share back"
        );
        drop(holders);
        assert_eq!(pool.current(), 16 << 20);
    }

    #[test]
    fn open_streams_hear_only_real_changes() {
        let pool = CreditShare::new(64 << 20, 16 << 20, gauge());
        let mut first = pool.join();
        first.share.borrow_and_update();
        let _second = pool.join();
        let _third = pool.join();
        // Three streams: 21 MiB each, still the 16 MiB maximum: nothing to tell.
        assert!(!first.share.has_changed().unwrap());
        let _fourth = pool.join();
        let _fifth = pool.join();
        assert!(first.share.has_changed().unwrap());
        assert_eq!(*first.share.borrow_and_update(), 8 << 20);
    }
}
