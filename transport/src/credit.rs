//! Credit for many streams: a fair share of one memory budget for all of them.
//!
//! Credit is what a sending peer may have sent and not yet had acknowledged. Those
//! bytes are somewhere in the receiver (QUIC receive buffers, a record read and waiting
//! its turn, a queue to the disk) until they are durable, so their sum is memory, and on
//! the sending side they are held for resending, so it is memory there too. A fixed
//! credit per stream (16 MiB) makes that sum grow with the number of streams: a
//! thousand disks starting at once could put 16 GiB in flight. Instead every open
//! stream is granted the same share of one budget: `memory / open streams`, rounded
//! down to a power of two (so that the share changes only when the number of streams
//! doubles or halves, not with each stream that joins), at most a per-stream maximum
//! and at least a per-stream minimum (enough for one stream's writes to flow while it
//! waits a round trip for acknowledgements). Streams already open hear the new share
//! (their driver sends it in a `Credit` frame).
//!
//! Used twice: the relay shares `ingest.memory` among agent streams, the master target
//! shares its `memory` among the relays' streams.
//!
//! Invariant: the credit of every open stream is the current share, so at most
//! `max(memory, streams × minimum)` bytes are granted at once. A sender keeps within
//! its credit ([`fbr_protocol::stream::StreamSender::may_send`]; a relay's forwarder
//! may overshoot by one record).

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Told each new share (a daemon shows it in a gauge).
pub type ShareObserver = Box<dyn Fn(u64) + Send + Sync>;

/// The budget for all streams' credit, and its current share.
pub struct CreditShare {
    memory: u64,
    min_credit: u64,
    max_credit: u64,
    streams: Mutex<usize>,
    share: watch::Sender<u64>,
    observer: ShareObserver,
}

impl std::fmt::Debug for CreditShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreditShare")
            .field("memory", &self.memory)
            .field("min_credit", &self.min_credit)
            .field("max_credit", &self.max_credit)
            .field("share", &*self.share.borrow())
            .finish_non_exhaustive()
    }
}

/// An open stream's place in the share; leaving (dropped) gives it back.
#[derive(Debug)]
pub struct CreditHolder {
    pool: Arc<CreditShare>,
    /// The share as it changes: send each new value to the peer.
    pub share: watch::Receiver<u64>,
}

impl CreditShare {
    /// `memory` for all streams together, `min_credit..=max_credit` per stream (the
    /// maximum wins if they cross); every new share is told to `observer`.
    pub fn new(
        memory: u64,
        min_credit: u64,
        max_credit: u64,
        observer: ShareObserver,
    ) -> Arc<Self> {
        let pool = CreditShare {
            memory,
            min_credit,
            max_credit,
            streams: Mutex::new(0),
            share: watch::channel(0).0,
            observer,
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
            .max(self.min_credit.min(self.max_credit))
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
        (self.observer)(share);
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

    const MIN: u64 = 256 << 10;

    fn shown() -> (Arc<std::sync::atomic::AtomicU64>, ShareObserver) {
        let shown = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = shown.clone();
        let observer: ShareObserver =
            Box::new(move |share| seen.store(share, std::sync::atomic::Ordering::Relaxed));
        (shown, observer)
    }

    #[test]
    fn the_share_follows_the_streams_in_powers_of_two_within_bounds() {
        let (shown, observer) = shown();
        let pool = CreditShare::new(256 << 20, MIN, 16 << 20, observer);
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
        assert_eq!(pool.current(), MIN, "never below the minimum");
        assert_eq!(shown.load(std::sync::atomic::Ordering::Relaxed), MIN);
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
        let pool = CreditShare::new(64 << 20, MIN, 16 << 20, shown().1);
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
