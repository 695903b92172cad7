//! # fbr-churn: agent emulator, load generator and verifier
//!
//! Emulates the source agents of many failed-over Azure VMs, streaming realistic,
//! deterministic disk churn into a relay, and *knows exactly what each source disk holds
//! at every tag*, so every replica at the master target can be checked byte for byte.
//!
//! ## Layout
//! - [`workload`]: deterministic generators: profiles (where) and content (what).
//! - [`writelog`]: the recorded write-log format, for replaying captured workloads.
//! - [`source`]: a disk's change source (generated or replayed) and the run manifest.
//! - [`agent`]: the emulator: QUIC streams per disk, credit, acks, reconnects, tags at
//!   consistent cuts, lag measurement.
//! - [`verify`]: rebuilds sources and replicas and compares them at every recovery point.
//! - [`harness`]: a loopback site of real `master-target` and `relay` processes.
//! - [`drill`]: `churn drill` and `churn bench` on top of all of the above.
#![forbid(unsafe_code)]

pub mod agent;
pub mod drill;
pub mod harness;
pub mod source;
pub mod verify;
pub mod workload;
pub mod writelog;

/// Parses a byte size: a number with an optional unit `K`, `M`, `G` (powers of 1024,
/// `KiB`/`MiB`/`GiB` and `KB`/`MB`/`GB` accepted as the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(super::parse_size("1g"), Ok(1 << 30));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("12x").is_err());
        assert!(super::parse_size("").is_err());
    }
}
