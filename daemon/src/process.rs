//! Process plumbing shared by the daemons and tools: logging, shutdown signals, the
//! port file, byte sizes on the command line, and the malloc arena limit.

use std::net::SocketAddr;
use std::path::Path;

/// The number of glibc malloc arenas a daemon runs with (`MALLOC_ARENA_MAX`).
pub const MALLOC_ARENAS: &str = "2";

/// Makes sure the daemon runs with at most [`MALLOC_ARENAS`] glibc malloc arenas. By
/// default glibc gives threads that contend for the allocator arenas of their own (up
/// to 8 per core), and memory freed into one arena serves only that arena, so a relay
/// whose buffers are allocated on one thread and freed on another keeps far more than
/// it uses: with a thousand streams its peak RSS was 269-345 MiB with the default and
/// 248 MiB with two arenas, at the same CPU per byte (`churn bench-scale`). glibc reads
/// the limit from the environment before the first allocation, so a daemon started
/// without `MALLOC_ARENA_MAX` executes itself again at once with it set: same process
/// id (systemd keeps following it), same arguments and descriptors. An operator's own
/// `MALLOC_ARENA_MAX` is left alone. Call before any thread is started.
#[cfg(target_os = "linux")]
pub fn bound_malloc_arenas(program: &str) {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let error = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("MALLOC_ARENA_MAX", MALLOC_ARENAS)
        .exec();
    eprintln!(
        "{program}: warning: cannot restart with MALLOC_ARENA_MAX={MALLOC_ARENAS} ({error}); \
         running with glibc's default arenas"
    );
}

/// Elsewhere glibc's arenas do not apply.
#[cfg(not(target_os = "linux"))]
pub fn bound_malloc_arenas(_program: &str) {}

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
