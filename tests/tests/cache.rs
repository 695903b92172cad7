//! The relay's durable cache under faults: kill -9 at random moments (relay and master
//! target, 20 times each), a WAN outage, and a cache that fills up. Every run ends with
//! byte-exact verification of every recovery point and a check that every write the
//! sources saw acknowledged reached the master target.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fbr_churn::workload::Content;
use fbr_tests::{agent_options, plans, start_site, start_site_with, stop_and_verify, Jitter};

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_20_times_at_random_moments_loses_nothing() {
    let seed = 0x5EED_0001;
    eprintln!("fault timing seed {seed:#x}");
    let mut jitter = Jitter::new(seed);
    let mut site = start_site(&["vm1", "vm2"]);
    let opts = agent_options(&site, Duration::from_secs(60), Duration::from_millis(200));
    let handle =
        fbr_churn::agent::start(opts, plans(2, 2, 16 << 20, Content::Mixed, 41), 41).unwrap();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(jitter.between(100, 500))).await;
        tokio::task::block_in_place(|| {
            site.stop_relay(true).unwrap();
            site.start_relay().unwrap();
        });
    }
    handle.request_stop();
    let stats = handle.stats.clone();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let reconnects = stats.reconnects.load(Ordering::Relaxed);
    eprintln!("reconnects: {reconnects}");
    assert!(
        reconnects >= 10,
        "the kills were noticed: {reconnects} reconnects"
    );
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(v.recovery_points_verified >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_target_killed_20_times_at_random_moments_loses_nothing() {
    let seed = 0x5EED_0002;
    eprintln!("fault timing seed {seed:#x}");
    let mut jitter = Jitter::new(seed);
    let mut site = start_site(&["vm1", "vm2"]);
    let opts = agent_options(&site, Duration::from_secs(60), Duration::from_millis(200));
    let handle =
        fbr_churn::agent::start(opts, plans(2, 2, 16 << 20, Content::Mixed, 42), 42).unwrap();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(jitter.between(100, 500))).await;
        tokio::task::block_in_place(|| {
            site.stop_master_target(true).unwrap();
            site.start_master_target().unwrap();
        });
    }
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(v.recovery_points_verified >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_outage_relay_keeps_accepting_then_drains_in_order() {
    let mut site = start_site(&["vm1", "vm2"]);
    let mut opts = agent_options(&site, Duration::from_secs(60), Duration::from_millis(200));
    // A steady 20 MB/s: flat out, the first second alone can fill most of the 256 MiB
    // cache before the outage starts (how much depends on how fast this machine's
    // relay forwards), and the test is about what the relay accepts during it.
    opts.rate_bytes_per_s = Some(20_000_000);
    let handle =
        fbr_churn::agent::start(opts, plans(2, 1, 16 << 20, Content::Mixed, 43), 43).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| site.stop_master_target(false).unwrap());
    let outage_start = handle.stats.logical_bytes_acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let outage_end = handle.stats.logical_bytes_acked.load(Ordering::Relaxed);
    assert!(
        outage_end > outage_start + (4 << 20),
        "the relay kept acknowledging into its cache during the outage ({outage_start} -> {outage_end} bytes)"
    );
    assert!(
        dir_bytes(&site.cache_dir) > 4 << 20,
        "the backlog is on the cache disk"
    );
    tokio::task::block_in_place(|| site.start_master_target().unwrap());
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cache_holds_sources_back_and_loses_nothing() {
    // 8 MiB of cache in 1 MiB segments: a few seconds of churn fill it.
    let capacity = 8 << 20;
    let mut site = start_site_with(&["vm1", "vm2"], capacity, 1);
    let opts = agent_options(&site, Duration::from_secs(60), Duration::from_millis(200));
    let handle =
        fbr_churn::agent::start(opts, plans(2, 1, 16 << 20, Content::Mixed, 44), 44).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| site.stop_master_target(false).unwrap());
    // Wait until acknowledgements stall: the cache is full and sources are held back.
    let started = Instant::now();
    let mut last = handle.stats.logical_bytes_acked.load(Ordering::Relaxed);
    let stalled = loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = handle.stats.logical_bytes_acked.load(Ordering::Relaxed);
        if now == last {
            break true;
        }
        last = now;
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    assert!(stalled, "acknowledgements must stop once the cache is full");
    let used = dir_bytes(&site.cache_dir);
    assert!(
        used <= capacity,
        "the cache stays within its capacity: {used} bytes"
    );
    assert!(used > capacity / 2, "the cache did fill up: {used} bytes");
    let sent = handle.stats.logical_bytes_sent.load(Ordering::Relaxed);
    assert!(
        sent - last < 2 * (16 << 20) + (2 << 20),
        "sources hold back: at most their credit is unacknowledged"
    );
    tokio::task::block_in_place(|| site.start_master_target().unwrap());
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}
