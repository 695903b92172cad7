//! Which codec a stream's next batch gets: the stronger one (zstd, with its history)
//! while the link limits the stream, the cheaper one (LZ4) while the relay's own CPU
//! does.
//!
//! The forwarder tells the chooser, after each round of reading, reducing and sending,
//! how long it spent on the CPU side (waiting for a reduce slot, reading and reducing)
//! and how long on the link side (waiting for credit from the master target and for
//! egress tokens), and whether records were still waiting in the cache (a backlog).
//! Both times are smoothed (EWMA, weight 1/4 per round).
//!
//! - **CPU-bound**: a backlog, and the CPU side takes more than twice the link side:
//!   the stream would go faster with a cheaper codec, so batches use LZ4.
//! - Otherwise (the link is the bottleneck, or nothing is: the stream keeps up), CPU is
//!   spent for ratio, and batches use zstd. Saved bytes are worth it on a link shared
//!   with the business even when the stream keeps up.
//! - It leaves CPU-bound once the CPU side is back under the link side, or the backlog
//!   is gone (hysteresis: the two thresholds differ, so it does not flap every round).
//!
//! Incompressible data is handled beside this (`encode`): a zstd or LZ4 batch that
//! shrank by less than 10% pauses compression for the next batches.

use std::time::Duration;

/// The smoothed time a stream spends on each side of its rounds.
#[derive(Debug, Default, Clone)]
pub struct CodecChooser {
    cpu_ns: f64,
    link_ns: f64,
    cpu_bound: bool,
    rounds: u64,
}

/// Weight of the newest round in the averages.
const WEIGHT: f64 = 0.25;
/// CPU side over link side above which a backlogged stream is CPU-bound...
const ENTER_CPU_BOUND: f64 = 2.0;
/// ...and below which it is no longer.
const LEAVE_CPU_BOUND: f64 = 1.0;

impl CodecChooser {
    /// One round: `cpu` spent reading and reducing (slot wait included), `link` spent
    /// waiting for credit and egress, and whether a backlog remained.
    pub fn observe(&mut self, cpu: Duration, link: Duration, backlog: bool) {
        let (cpu, link) = (cpu.as_nanos() as f64, link.as_nanos() as f64);
        if self.rounds == 0 {
            (self.cpu_ns, self.link_ns) = (cpu, link);
        } else {
            self.cpu_ns += WEIGHT * (cpu - self.cpu_ns);
            self.link_ns += WEIGHT * (link - self.link_ns);
        }
        self.rounds += 1;
        let ratio = self.cpu_ns / self.link_ns.max(1.0);
        self.cpu_bound = if self.cpu_bound {
            backlog && ratio >= LEAVE_CPU_BOUND
        } else {
            backlog && ratio > ENTER_CPU_BOUND
        };
    }

    /// Whether the stream is limited by the relay's CPU (batches then use LZ4).
    pub fn cpu_bound(&self) -> bool {
        self.cpu_bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_link_keeps_zstd_and_a_busy_cpu_falls_back() {
        let mut c = CodecChooser::default();
        for _ in 0..10 {
            c.observe(5 * MS, 40 * MS, true);
        }
        assert!(!c.cpu_bound(), "waiting on the link: spend CPU for ratio");
        for _ in 0..10 {
            c.observe(40 * MS, 2 * MS, true);
        }
        assert!(c.cpu_bound(), "backlogged and the CPU side dominates");
        // LZ4 is faster; the link side grows back past the CPU side: zstd again.
        for _ in 0..10 {
            c.observe(10 * MS, 20 * MS, true);
        }
        assert!(!c.cpu_bound());
    }

    #[test]
    fn no_backlog_means_not_cpu_bound_and_one_round_does_not_flip_it() {
        let mut c = CodecChooser::default();
        for _ in 0..10 {
            c.observe(40 * MS, Duration::ZERO, false);
        }
        assert!(
            !c.cpu_bound(),
            "keeping up: nothing to gain from a cheaper codec"
        );
        for _ in 0..10 {
            c.observe(40 * MS, MS, true);
        }
        assert!(c.cpu_bound());
        c.observe(MS, 30 * MS, true);
        assert!(c.cpu_bound(), "one round moves the averages by a quarter");
        c.observe(MS, Duration::ZERO, false);
        assert!(!c.cpu_bound(), "the backlog is gone");
    }
}
