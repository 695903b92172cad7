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
//! - **CPU-bound**: a backlog, and the CPU side takes more than twice the link side.
//!   It leaves CPU-bound once the CPU side is back under the link side, or the backlog
//!   is gone (hysteresis: the two thresholds differ, so it does not flap every round).
//! - A CPU-bound stream uses LZ4 when zstd costs it more than three times what LZ4 does
//!   per body byte *and* sends more than 3/4 of what LZ4 would (costs and ratios
//!   measured on the stream's own batches, smoothed; zstd is tried on every
//!   [`PROBE_EVERY`]th batch meanwhile, so its figures stay current). Where zstd's
//!   history finds far more (text, repeats), the bytes it saves would make the link the
//!   bottleneck again under LZ4, so it stays; on data of middling redundancy, where the
//!   two ratios are close, a CPU-bound stream goes faster with LZ4. (A batch sent with
//!   LZ4 is also missing from the zstd history, so the fallback is kept for clear
//!   cases.)
//! - Otherwise (the link is the bottleneck, or nothing is: the stream keeps up), CPU is
//!   spent for ratio, and batches use zstd. Saved bytes are worth it on a link shared
//!   with the business even when the stream keeps up.
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
    /// Smoothed compression cost per body byte, ns (0: not measured yet).
    zstd_ns_per_byte: f64,
    lz4_ns_per_byte: f64,
    /// Smoothed payload / body of each codec (0: not measured yet).
    zstd_ratio: f64,
    lz4_ratio: f64,
    batches: u64,
}

/// While a stream uses LZ4 for CPU, every this many batches go through zstd anyway, so
/// that its cost is measured on current data.
pub const PROBE_EVERY: u64 = 16;
/// Before any measurement: what zstd level 3 and LZ4 cost per byte on mixed disk data
/// on the development VM (`churn bench-wan`'s primitives).
const ZSTD_PRIOR_NS: f64 = 2.0;
const LZ4_PRIOR_NS: f64 = 1.0;

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

    /// Whether the stream is limited by the relay's CPU.
    pub fn cpu_bound(&self) -> bool {
        self.cpu_bound
    }

    /// One batch compressed: `body` bytes into `payload` in `nanos`, with zstd (or
    /// LZ4).
    pub fn record_batch(&mut self, zstd: bool, body: usize, payload: usize, nanos: u64) {
        if body < 4096 {
            return;
        }
        let smooth = |estimate: &mut f64, v: f64| {
            *estimate = if *estimate == 0.0 {
                v
            } else {
                *estimate + WEIGHT * (v - *estimate)
            };
        };
        let (cost, ratio) = if zstd {
            (&mut self.zstd_ns_per_byte, &mut self.zstd_ratio)
        } else {
            (&mut self.lz4_ns_per_byte, &mut self.lz4_ratio)
        };
        smooth(cost, nanos as f64 / body as f64);
        smooth(ratio, (payload as f64 / body as f64).min(1.0));
    }

    /// Whether the next batch should use zstd (when the session has a context).
    pub fn next_is_zstd(&mut self) -> bool {
        self.batches += 1;
        if !self.cpu_bound {
            return true;
        }
        let or = |v: f64, prior: f64| if v == 0.0 { prior } else { v };
        let zstd = or(self.zstd_ns_per_byte, ZSTD_PRIOR_NS);
        let lz4 = or(self.lz4_ns_per_byte, LZ4_PRIOR_NS);
        let cheap_enough = zstd <= 3.0 * lz4;
        // Unmeasured ratios count as equal: only a measured gain keeps zstd.
        let saves_a_quarter = self.zstd_ratio > 0.0
            && self.lz4_ratio > 0.0
            && self.zstd_ratio <= 0.75 * self.lz4_ratio;
        cheap_enough || saves_a_quarter || self.batches % PROBE_EVERY == 0
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
    fn a_cpu_bound_stream_keeps_zstd_while_it_is_cheap_and_probes_it_on_lz4() {
        let mut c = CodecChooser::default();
        for _ in 0..10 {
            c.observe(40 * MS, 2 * MS, true);
        }
        assert!(c.cpu_bound());
        c.record_batch(true, 1 << 20, 600 << 10, 1_500_000);
        c.record_batch(false, 1 << 20, 640 << 10, 1_000_000);
        assert!(
            c.next_is_zstd(),
            "zstd at 1.5 ns/B against LZ4's 1.0: worth it"
        );
        for _ in 0..20 {
            c.record_batch(true, 1 << 20, 600 << 10, 6_000_000);
        }
        let picks: Vec<bool> = (0..64).map(|_| c.next_is_zstd()).collect();
        let zstd = picks.iter().filter(|z| **z).count();
        assert_eq!(
            zstd, 4,
            "LZ4, with a zstd probe every {PROBE_EVERY} batches"
        );
        // Where zstd's history finds far more than LZ4, it stays whatever it costs.
        for _ in 0..20 {
            c.record_batch(true, 1 << 20, 20 << 10, 6_000_000);
        }
        assert!((0..64).all(|_| c.next_is_zstd()));
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
