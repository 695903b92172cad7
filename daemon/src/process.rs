//! Process plumbing shared by the daemons and tools: logging, shutdown signals, the
//! port file, and byte sizes on the command line.

use std::net::SocketAddr;
use std::path::Path;

/// Logs to stderr through `tracing`: human-readable by default, JSON lines with `json`.
/// `RUST_LOG` overrides `default_level`.
pub fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Writes the bound address to `path` atomically (temporary file + rename), so scripts
/// and tests that wait for it never read half of it.
pub fn write_port_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Parses a byte size: a number with an optional unit `K`, `M`, `G`, `T` (powers of
/// 1024; `KiB`/`MiB`/... and `KB`/`MB`/... accepted as the same).
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

/// `<n>s`, `<n>m`, `<n>h` or `<n>d`, from one second to 15 days.
pub fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90m, 24h or 15d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if !(1..=15 * 86_400).contains(&secs) {
        return Err(format!("{s} is out of range 1s..=15d"));
    }
    Ok(std::time::Duration::from_secs(secs))
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
        assert!(super::parse_size("99999999999T").is_err());
    }

    #[test]
    fn windows_parse_with_their_units_and_range() {
        use super::parse_window;
        assert_eq!(parse_window("24h").unwrap().as_secs(), 86_400);
        assert_eq!(parse_window("90m").unwrap().as_secs(), 5_400);
        assert_eq!(parse_window("15d").unwrap().as_secs(), 1_296_000);
        for bad in ["16d", "0s", "24", "h", "2w", "-1h"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
