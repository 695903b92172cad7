//! The token bucket: bytes per second, with a burst.

use std::time::{Duration, Instant};

/// An egress rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Unlimited,
    BytesPerSec(u64),
}

impl Rate {
    /// Parses `unlimited`, or a number with a unit: `100mbit`, `1gbps`, `50MB/s`,
    /// `400000kbit` (decimal: 1 Mbit = 1,000,000 bits; `b`/`kb`/`mb`/`gb` are bytes).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "unlimited" {
            return Ok(Rate::Unlimited);
        }
        // "Xbps" is bits per second; "X/s" is the same unit per second.
        let t = match lower.strip_suffix("bps") {
            Some(prefix) => format!("{prefix}bit"),
            None => lower.strip_suffix("/s").unwrap_or(&lower).to_string(),
        };
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid rate {s:?}: expected e.g. 100mbit, 1gbps or 50MB/s"))?;
        let bytes_per_unit = match unit.trim() {
            "" | "b" => 1.0,
            "bit" => 0.125,
            "kbit" => 125.0,
            "mbit" => 125_000.0,
            "gbit" => 125_000_000.0,
            "kb" => 1_000.0,
            "mb" => 1_000_000.0,
            "gb" => 1_000_000_000.0,
            other => return Err(format!("invalid rate {s:?}: unknown unit {other:?}")),
        };
        let bytes = (n * bytes_per_unit).round();
        if !(bytes >= 1.0 && bytes.is_finite()) {
            return Err(format!(
                "invalid rate {s:?}: must be at least 1 byte per second"
            ));
        }
        Ok(Rate::BytesPerSec(bytes as u64))
    }
}

/// Grants bytes at `rate` on average, up to `burst` at once after a pause.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `burst` is also the largest single grant (larger requests are
    /// granted once the bucket is full, so they are never starved).
    pub fn new(rate: Rate, burst: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Changes the rate and burst from `now` on (tokens earned so far are kept, capped
    /// at the new burst).
    pub fn reconfigure(&mut self, rate: Rate, burst: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst.max(1) as f64;
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        if let Rate::BytesPerSec(r) = self.rate {
            self.tokens = (self.tokens + elapsed * r as f64).min(self.burst);
        }
    }

    /// Takes `bytes` if the bucket holds them; otherwise says how long until it will.
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let Rate::BytesPerSec(r) = self.rate else {
            return Ok(());
        };
        self.refill(now);
        // Oversized requests wait for a full bucket, then go through (debt is carried).
        let need = (bytes as f64).min(self.burst);
        if self.tokens >= need {
            self.tokens -= bytes as f64;
            return Ok(());
        }
        Err(Duration::from_secs_f64((need - self.tokens) / r as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(Rate::parse("unlimited"), Ok(Rate::Unlimited));
        assert_eq!(Rate::parse("100mbit"), Ok(Rate::BytesPerSec(12_500_000)));
        assert_eq!(Rate::parse("1Gbit/s"), Ok(Rate::BytesPerSec(125_000_000)));
        assert_eq!(Rate::parse("50MB/s"), Ok(Rate::BytesPerSec(50_000_000)));
        assert_eq!(Rate::parse("2.5mbps"), Ok(Rate::BytesPerSec(312_500)));
        assert!(Rate::parse("fast").is_err());
        assert!(Rate::parse("0mbit").is_err());
        assert!(Rate::parse("10 parsecs").is_err());
    }

    /// Drives a greedy sender for `secs` of virtual time and returns bytes granted.
    fn greedy(bucket: &mut TokenBucket, start: Instant, secs: f64, chunk: u64) -> u64 {
        let mut now = start;
        let end = start + Duration::from_secs_f64(secs);
        let mut granted = 0;
        while now < end {
            match bucket.try_take(chunk, now) {
                Ok(()) => granted += chunk,
                Err(wait) => now += wait.max(Duration::from_micros(1)),
            }
        }
        granted
    }

    #[test]
    fn rate_is_accurate_over_time() {
        let t0 = Instant::now();
        let rate = 12_500_000; // 100 Mbit/s
        let mut b = TokenBucket::new(Rate::BytesPerSec(rate), 1 << 20, t0);
        let granted = greedy(&mut b, t0, 10.0, 64 * 1024);
        let expected = rate as f64 * 10.0 + (1 << 20) as f64;
        let error = (granted as f64 - expected).abs() / expected;
        assert!(error < 0.01, "granted {granted}, expected about {expected}");
    }

    #[test]
    fn never_more_than_burst_plus_rate_times_t() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::BytesPerSec(1000), 5000, t0);
        let mut granted = 0u64;
        let mut now = t0;
        for step in 0..10_000u64 {
            if b.try_take(300, now).is_ok() {
                granted += 300;
            }
            now += Duration::from_micros(997 + step % 13);
            let bound = 5000.0 + 1000.0 * now.duration_since(t0).as_secs_f64() + 300.0;
            assert!((granted as f64) <= bound, "{granted} > {bound}");
        }
    }

    #[test]
    fn schedule_switch_changes_the_rate_without_losing_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::BytesPerSec(1_000_000), 100_000, t0);
        let a = greedy(&mut b, t0, 5.0, 10_000);
        let t1 = t0 + Duration::from_secs(5);
        b.reconfigure(Rate::BytesPerSec(4_000_000), 100_000, t1);
        let c = greedy(&mut b, t1, 5.0, 10_000);
        assert!((a as f64 / 5_100_000.0 - 1.0).abs() < 0.02, "{a}");
        assert!((c as f64 / 20_000_000.0 - 1.0).abs() < 0.02, "{c}");
        b.reconfigure(Rate::Unlimited, 100_000, t1 + Duration::from_secs(5));
        assert!(b
            .try_take(u64::MAX / 2, t1 + Duration::from_secs(5))
            .is_ok());
    }

    #[test]
    fn oversized_requests_are_not_starved() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::BytesPerSec(1000), 100, t0);
        assert!(
            b.try_take(5000, t0).is_ok(),
            "a full bucket lets a large request through"
        );
        let wait = b.try_take(5000, t0).unwrap_err();
        assert!(
            wait >= Duration::from_secs(5),
            "and the debt is paid before the next: {wait:?}"
        );
    }
}
