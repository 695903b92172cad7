//! `relay bench-cache`: how fast the durable cache ingests, how fast it recovers, and how
//! little memory a relay needs while it holds a large backlog. Prints one JSON object as
//! its last line. Run it in a release build, on the disk the cache will use (`--dir`).
//!
//! - `device_mb_per_s`: sequential 64 MiB writes each followed by `fdatasync` (the
//!   writer's largest batch), straight to a file: the ceiling the disk itself sets,
//!   measured in the same run.
//! - `ingest_mb_per_s`: records of 64 KiB to 1 MiB from 8 streams through the relay's
//!   real group-commit writer ([`RelayCache`]), timed until every record is durable.
//! - `records_per_s_4k`: the same with 4 KiB records.
//! - `recovery_s`: time to reopen a cache holding 1, 5 and 10 GB (keys `"1"`, `"5"`,
//!   `"10"`; scaled down by `--quick`).
//! - `peak_rss_mib`: the peak resident memory of a real `relay` process that recovered
//!   the largest cache and holds it as backlog (its master target is unreachable).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fbr_cache::{CacheConfig, FileStorage, SegmentLog};
use fbr_protocol::{Record, StreamId};
use serde::Serialize;

use crate::cache::RelayCache;

/// What the benchmark found.
#[derive(Debug, Serialize)]
pub struct CacheBench {
    pub device_mb_per_s: f64,
    pub ingest_mb_per_s: f64,
    pub ingest_vs_device: f64,
    pub records_per_s_4k: f64,
    pub recovery_s: BTreeMap<String, f64>,
    pub recovery_records: BTreeMap<String, u64>,
    /// Whether the page cache was dropped before each recovery (a cold start).
    pub recovery_cold: bool,
    pub peak_rss_mib: f64,
    pub backlog_gb_for_rss: f64,
    pub dir: String,
}

const STREAMS: u32 = 8;
const SEGMENT_BYTES: u64 = 64 << 20;

fn stream(i: u32) -> StreamId {
    StreamId {
        vm: format!("bench{}", i / 2),
        disk: i % 2,
    }
}

/// A pool of incompressible payloads to slice records from (generation stays off the
/// measured path).
fn payload_pool() -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(8 << 20);
    while v.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

/// Runs the whole benchmark in `dir` (created, and emptied afterwards).
pub async fn run(dir: &Path, quick: bool) -> anyhow::Result<CacheBench> {
    std::fs::create_dir_all(dir)?;
    let scale = if quick { 0.1 } else { 1.0 };
    let pool = payload_pool();

    let device = device_speed(&dir.join("device-probe"), (2048.0 * scale) as u64 + 256)?;
    eprintln!("device: {device:.0} MB/s sequential write + fdatasync");

    let ingest_bytes = ((4u64 << 30) as f64 * scale) as u64;
    let (mb_per_s, _) = ingest(&dir.join("ingest"), &pool, ingest_bytes, |i| {
        (64 << 10) << (i % 5)
    })
    .await?;
    eprintln!("ingest: {mb_per_s:.0} MB/s to durable (64 KiB - 1 MiB records)");
    let small_bytes = ((256u64 << 20) as f64 * scale.max(0.25)) as u64;
    let (mb_4k, _) = ingest(&dir.join("ingest4k"), &pool, small_bytes, |_| 4096).await?;
    let records_per_s_4k = mb_4k * 1e6 / 4096.0;
    eprintln!("ingest: {records_per_s_4k:.0} records/s of 4 KiB");

    let mut recovery_s = BTreeMap::new();
    let mut recovery_records = BTreeMap::new();
    let sizes: [(u64, &str); 3] = [(1, "1"), (5, "5"), (10, "10")];
    let big_dir = dir.join("backlog");
    let mut filled = 0u64;
    let mut largest = 0.0;
    let mut cold = true;
    for (gb, key) in sizes {
        let target = ((gb << 30) as f64 * scale) as u64;
        fill_backlog(&big_dir, &pool, filled, target)?;
        filled = target;
        cold &= drop_page_cache();
        let started = Instant::now();
        let (log, report) = SegmentLog::open(FileStorage::new(&big_dir)?, cache_config(target))?;
        let secs = started.elapsed().as_secs_f64();
        drop(log);
        eprintln!(
            "recovery of {:.1} GB: {secs:.3} s ({} records)",
            target as f64 / 1e9,
            report.records
        );
        recovery_s.insert(key.to_string(), secs);
        recovery_records.insert(key.to_string(), report.records);
        largest = target as f64 / 1e9;
    }
    let peak_rss_mib = relay_rss_with_backlog(dir, &big_dir, filled).await?;
    eprintln!("peak RSS of a relay holding {largest:.1} GB of backlog: {peak_rss_mib:.1} MiB");
    let _ = std::fs::remove_dir_all(dir);
    Ok(CacheBench {
        device_mb_per_s: device,
        ingest_mb_per_s: mb_per_s,
        ingest_vs_device: mb_per_s / device,
        records_per_s_4k,
        recovery_s,
        recovery_records,
        recovery_cold: cold,
        peak_rss_mib,
        backlog_gb_for_rss: largest,
        dir: dir.display().to_string(),
    })
}

fn cache_config(backlog: u64) -> CacheConfig {
    CacheConfig {
        segment_bytes: SEGMENT_BYTES,
        capacity_bytes: (backlog * 2).max(4 * SEGMENT_BYTES),
    }
}

/// Sequential writes of `mib` MiB with an `fdatasync` every 64 MiB.
fn device_speed(path: &Path, mib: u64) -> anyhow::Result<f64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5Au8; 64 << 20];
    let rounds = (mib / 64).max(1);
    let started = Instant::now();
    for _ in 0..rounds {
        f.write_all(&chunk)?;
        f.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok((rounds * 64) as f64 * 1048576.0 / 1e6 / secs)
}

/// Appends `total` bytes through the relay's writer from 8 concurrent streams and waits
/// until all of it is durable. Returns MB/s and records.
async fn ingest(
    dir: &Path,
    pool: &Bytes,
    total: u64,
    size_of: impl Fn(u64) -> usize + Copy + Send + 'static,
) -> anyhow::Result<(f64, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    let (cache, _) = RelayCache::open(dir, cache_config(total + (1 << 30)))?;
    let per_stream = total / STREAMS as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let cache = cache.clone();
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let id = stream(s);
            let mut sent = 0u64;
            let mut seq = 0u64;
            while sent < per_stream {
                seq += 1;
                let len = size_of(seq);
                let start = (seq as usize * 4096) % (pool.len() - len);
                let data = pool.slice(start..start + len);
                sent += len as u64;
                cache
                    .append(
                        &id,
                        1 << 40,
                        Record::Write {
                            seq,
                            offset: 0,
                            data,
                        },
                    )
                    .await;
            }
            let mut durable = cache.watch(&id).durable.subscribe();
            let _ = durable.wait_for(|d| *d >= seq).await;
            (sent, seq)
        }));
    }
    let mut bytes = 0;
    let mut records = 0;
    for t in tasks {
        let (b, r) = t.await?;
        bytes += b;
        records += r;
    }
    let secs = started.elapsed().as_secs_f64();
    cache.shutdown();
    drop(cache);
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(dir);
    Ok((bytes as f64 / 1e6 / secs, records))
}

/// Grows the backlog cache in `dir` from `from` to `to` bytes (1 MiB records, 8 streams,
/// sealed into 64 MiB segments), as a relay with an unreachable master target would.
fn fill_backlog(dir: &Path, pool: &Bytes, from: u64, to: u64) -> anyhow::Result<()> {
    let (mut log, _) = SegmentLog::open(FileStorage::new(dir)?, cache_config(to))?;
    let mut next: Vec<u64> = (0..STREAMS)
        .map(|s| {
            log.stream_stats(&stream(s))
                .map(|st| st.durable_seq + 1)
                .unwrap_or(1)
        })
        .collect();
    let mut written = from;
    let mut i = 0usize;
    while written < to {
        let s = (i % STREAMS as usize) as u32;
        let seq = next[s as usize];
        next[s as usize] += 1;
        let start = (i * 4096) % (pool.len() - (1 << 20));
        let r = Record::Write {
            seq,
            offset: 0,
            data: pool.slice(start..start + (1 << 20)),
        };
        log.append(&stream(s), 1 << 40, &r, fbr_cache::now_ms())?;
        written += 1 << 20;
        i += 1;
        if i % 32 == 0 {
            log.commit()?;
        }
    }
    log.commit()?;
    Ok(())
}

/// Makes the recovery measurement read from disk (needs root); says if it could not.
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// Starts this `relay` binary on the backlog cache with an unreachable master target,
/// lets it recover and settle, and returns its peak RSS (VmHWM) in MiB.
async fn relay_rss_with_backlog(
    work: &Path,
    cache_dir: &Path,
    backlog: u64,
) -> anyhow::Result<f64> {
    let pki = work.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    fbr_transport::pki::init_loopback_site(&pki, &[])?;
    let port_file = work.join("relay.addr");
    let exe: PathBuf = std::env::current_exe().context("locating the relay binary")?;
    let mut child = std::process::Command::new(exe)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--master-target",
            "127.0.0.1:9",
        ])
        .arg("--pki-dir")
        .arg(&pki)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--cache-capacity")
        .arg(cache_config(backlog).capacity_bytes.to_string())
        .arg("--port-file")
        .arg(&port_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !port_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let forwarders try (and fail) to reach the master target for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("reading the relay's VmHWM")?;
    Ok(hwm_kib / 1024.0)
}
