//! What operators watch: the live `/metrics` of both daemons passes `promtool check
//! metrics`, the alert rules pass `promtool check rules`, the dashboard and the rules use
//! only metrics that exist, and cache pressure throttles ingest, shows in health, and is
//! released with nothing lost.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use fbr_churn::harness::{Site, SiteOptions};
use fbr_churn::workload::Content;
use fbr_tests::{
    agent_options, churn, http_get, plans, promtool, sample, site_options, stop_and_verify,
};

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Every `fbr_*` / `process_*` metric family name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if word.starts_with("fbr_") || word.starts_with("process_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

/// A histogram's samples are `_bucket`, `_sum`, `_count` of its family.
fn family(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base;
        }
    }
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_scrapes_pass_promtool_and_packaging_uses_real_metrics() {
    // A site as deployed: enrolled through its configuration server, heartbeats on.
    let mut site = Site::create(None, site_options(&["vm1", "vm2"])).unwrap();
    let server = tokio::task::block_in_place(|| site.enroll_through_config_server()).unwrap();
    let heartbeats = ["--config-server".to_owned(), server.to_string()];
    site.relay_args_mut().extend(heartbeats.clone());
    site.master_target_args_mut().extend(heartbeats);
    tokio::task::block_in_place(|| {
        site.start_master_target().unwrap();
        site.start_relay().unwrap();
    });
    let relay_metrics = site.relay_metrics_addr().unwrap();
    let mt_metrics = site.master_target_metrics_addr().unwrap();
    let cs_metrics = site.config_server_metrics_addr().unwrap();
    let opts = agent_options(&site, Duration::from_secs(3), Duration::from_millis(200));
    let report = churn(opts, plans(2, 2, 8 << 20, Content::Mixed, 61), 61).await;

    // The relay may still be forwarding its backlog (a loaded machine): health is
    // checked once it has drained, within a bound.
    let started = std::time::Instant::now();
    let relay_text = loop {
        let (status, text) = tokio::task::block_in_place(|| http_get(relay_metrics, "/metrics"));
        assert_eq!(status, 200);
        if sample(&text, "fbr_relay_health_state") == Some(0.0)
            || started.elapsed() > Duration::from_secs(20)
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    promtool(&["check", "metrics"], &relay_text);
    let (status, mt_text) = tokio::task::block_in_place(|| http_get(mt_metrics, "/metrics"));
    assert_eq!(status, 200);
    promtool(&["check", "metrics"], &mt_text);
    let (status, cs_text) = tokio::task::block_in_place(|| http_get(cs_metrics, "/metrics"));
    assert_eq!(status, 200);
    promtool(&["check", "metrics"], &cs_text);
    // The relay and the master target each sent their first heartbeat at start.
    assert!(
        sample(&cs_text, "fbr_config_server_heartbeats_total").unwrap() >= 2.0,
        "{cs_text}"
    );

    // The figures are real: what was written shows up, per VM and per stage.
    let logical = sample(&relay_text, "fbr_relay_bytes_total{stage=\"logical\"}").unwrap();
    assert!(logical > 1e6, "logical bytes counted: {logical}");
    let wire = sample(&relay_text, "fbr_relay_bytes_total{stage=\"wire\"}").unwrap();
    let sent = sample(&relay_text, "fbr_relay_bytes_total{stage=\"compressed\"}").unwrap();
    assert!(wire >= sent && sent > 0.0, "wire {wire} >= batches {sent}");
    // Each stage only removes bytes.
    let stage = |s: &str| {
        sample(
            &relay_text,
            &format!("fbr_relay_vm_bytes_total{{stage=\"{s}\",vm=\"vm1\"}}"),
        )
        .unwrap_or_else(|| panic!("stage {s} of vm1 missing:\n{relay_text}"))
    };
    let chain = ["logical", "coalesced", "zero_elided", "deduplicated"].map(stage);
    assert!(
        chain.windows(2).all(|w| w[0] >= w[1]) && chain[0] > 0.0,
        "{chain:?}"
    );
    for vm in ["vm1", "vm2"] {
        let rpo = sample(
            &relay_text,
            &format!("fbr_relay_rpo_seconds{{vm=\"{vm}\"}}"),
        )
        .unwrap_or_else(|| panic!("RPO of {vm} missing:\n{relay_text}"));
        assert!((0.0..60.0).contains(&rpo), "RPO of {vm}: {rpo}");
    }
    let lagged = sample(&relay_text, "fbr_relay_replication_lag_seconds_count").unwrap();
    assert!(lagged > 0.0);
    assert_eq!(
        sample(&relay_text, "fbr_relay_upstream_connected"),
        Some(1.0)
    );
    assert_eq!(
        sample(&relay_text, "fbr_relay_health_state"),
        Some(0.0),
        "health after the backlog drained: {:?}",
        relay_text
            .lines()
            .filter(|l| l.starts_with("fbr_relay_health"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        sample(&relay_text, "fbr_relay_egress_limit_bytes_per_second"),
        Some(f64::INFINITY)
    );
    assert!(sample(&relay_text, "process_resident_memory_bytes").unwrap() > 0.0);
    let applied = sample(&mt_text, "fbr_master_target_records_applied_total").unwrap();
    assert!(applied > 0.0);

    let (status, body) = tokio::task::block_in_place(|| http_get(relay_metrics, "/healthz"));
    assert_eq!((status, body.as_str()), (200, "alive\n"));
    let (status, body) = tokio::task::block_in_place(|| http_get(relay_metrics, "/readyz"));
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("healthy"), "{body}");
    assert_eq!(
        tokio::task::block_in_place(|| http_get(mt_metrics, "/readyz")).0,
        200
    );

    // The alert rules are valid, and they and the dashboard only use metrics that exist.
    let rules = repo_file("packaging/prometheus/failback-alerts.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()], "");
    let exposed: BTreeSet<String> = metric_names(&relay_text)
        .into_iter()
        .chain(metric_names(&mt_text))
        .chain(metric_names(&cs_text))
        .map(|n| family(&n).to_string())
        .collect();
    for file in [
        "packaging/prometheus/failback-alerts.yml",
        "packaging/grafana/failback-relay-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo_file(file)).unwrap();
        for name in metric_names(&text) {
            assert!(
                exposed.contains(family(&name)),
                "{file} uses {name}, which no daemon exposes"
            );
        }
    }
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}

/// Polls the relay's metrics until `done` holds (30 s at most).
fn wait_for_metrics(site: &Site, what: &str, done: impl Fn(&str) -> bool) -> String {
    let addr = site.relay_metrics_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http_get(addr, "/metrics");
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A site (not started) for cache pressure: two VMs, a relay cache of `capacity` bytes
/// in 1 MiB segments, health evaluated every 100 ms.
fn pressure_site(capacity: u64) -> Site {
    Site::create(
        None,
        SiteOptions {
            agent_vms: vec!["vm1".into(), "vm2".into()],
            cache_capacity: capacity,
            cache_segment_mib: 1,
            mt_credit_mib: 8,
            max_udp_payload: 1452,
            relay_args: vec!["--health-interval-ms".into(), "100".into()],
            mt_args: vec![],
        },
    )
    .unwrap()
}

/// Starts the site and churns 2 VMs x 2 disks (seed `seed`), then stops the master
/// target so the backlog builds up, until the relay throttles ingest. Returns the run
/// and the metrics scraped then.
async fn churn_until_throttled(
    site: &mut Site,
    seed: u64,
) -> (fbr_churn::agent::RunHandle, String) {
    site.start_master_target().unwrap();
    site.start_relay().unwrap();
    let opts = agent_options(site, Duration::from_secs(60), Duration::from_millis(200));
    let handle =
        fbr_churn::agent::start(opts, plans(2, 2, 16 << 20, Content::Mixed, seed), seed).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| site.stop_master_target(false).unwrap());
    let text = tokio::task::block_in_place(|| {
        wait_for_metrics(site, "ingest throttling", |t| {
            sample(t, "fbr_relay_ingest_throttled_streams").unwrap_or(0.0) >= 1.0
        })
    });
    (handle, text)
}

/// The master target returns: waits until throttling lifts and health is back, then
/// ends the run, which must have lost nothing.
async fn release_and_finish(
    site: &mut Site,
    handle: fbr_churn::agent::RunHandle,
) -> fbr_churn::agent::RunReport {
    tokio::task::block_in_place(|| site.start_master_target().unwrap());
    tokio::task::block_in_place(|| {
        wait_for_metrics(site, "release", |t| {
            sample(t, "fbr_relay_ingest_throttled_streams") == Some(0.0)
                && sample(t, "fbr_relay_health_state") == Some(0.0)
        })
    });
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_pressure_throttles_the_largest_backlogs_then_releases_losing_nothing() {
    // 16 MiB of cache in 1 MiB segments; health evaluated every 100 ms.
    let capacity: u64 = 16 << 20;
    let mut site = pressure_site(capacity);
    // The backlog grows until free space falls below 20%: ingest of the largest
    // backlogs pauses, health turns critical (below 25% free) and readiness fails.
    let (handle, text) = churn_until_throttled(&mut site, 62).await;
    assert_eq!(sample(&text, "fbr_relay_health_state"), Some(2.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "fbr_relay_health_condition{condition=\"cache_free_space\"}"
        ),
        Some(2.0)
    );
    let used = sample(&text, "fbr_relay_cache_used_bytes").unwrap();
    assert!(used <= capacity as f64);
    let (status, body) =
        tokio::task::block_in_place(|| http_get(site.relay_metrics_addr().unwrap(), "/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cache_free_space") && body.contains("ingest_throttled"),
        "{body}"
    );

    // The master target returns: the backlog drains, throttling lifts, health recovers.
    // (The paused agents then send their credit at once, so with a cache this small it
    // may engage again; what matters is that it releases and nothing is lost.)
    let report = release_and_finish(&mut site, handle).await;
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: on a failed test the relay may still hold it open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The capacity left at 8 GiB on a 24 MiB cache disk: health measures free space against
/// the disk, so it turns critical with that reason and ingest is throttled before
/// commits fail; no stream is closed for an I/O error, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_disk_smaller_than_the_capacity_is_what_health_measures() {
    let mut site = pressure_site(8 << 30);
    let _disk = match Tmpfs::mount(&site.cache_dir, "24m") {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("skipped: this test mounts a 24 MiB tmpfs as the cache disk and cannot here (it needs root): {e}");
            return;
        }
    };
    let check = std::process::Command::new(fbr_churn::harness::bin_path("relay").unwrap())
        .args([
            "check-config",
            "--master-target",
            "127.0.0.1:9",
            "--cache-dir",
        ])
        .arg(&site.cache_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && stderr.contains("the cache can never be that large"),
        "{stderr}"
    );
    let (handle, text) = churn_until_throttled(&mut site, 63).await;
    assert_eq!(sample(&text, "fbr_relay_health_state"), Some(2.0), "{text}");
    let (status, body) =
        tokio::task::block_in_place(|| http_get(site.relay_metrics_addr().unwrap(), "/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the cache disk has room for only"), "{body}");
    assert_eq!(
        sample(&text, "fbr_relay_stream_errors_total{code=\"internal\"}"),
        Some(0.0),
        "no commit failed: {text}"
    );

    let report = release_and_finish(&mut site, handle).await;
    let text =
        tokio::task::block_in_place(|| http_get(site.relay_metrics_addr().unwrap(), "/metrics").1);
    assert_eq!(
        sample(&text, "fbr_relay_stream_errors_total{code=\"internal\"}"),
        Some(0.0),
        "no commit failed: {text}"
    );
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}

/// The next `Credit` frame on `s`, skipping acknowledgements.
async fn next_credit(s: &mut fbr_tests::RawStream) -> u64 {
    loop {
        match s.next_frame().await {
            Some(fbr_protocol::Frame::Credit { credit_bytes }) => return credit_bytes,
            Some(_) => {}
            None => panic!("stream ended before a Credit frame"),
        }
    }
}

/// Three streams opened on `peer` against a budget of twice `max` (the per-stream
/// maximum): the first two are granted `max`, the third half of it, and so is the
/// first (in a `Credit` frame); once the third leaves, the first gets `max` back.
/// The daemon shows the share in `gauge`, read from its `/metrics` at `metrics`.
async fn streams_share_a_budget_of_twice(
    max: u64,
    peer: &fbr_tests::RawAgent,
    metrics: std::net::SocketAddr,
    gauge: &str,
) {
    const DISK: u64 = 4 << 20;
    let shown = || {
        let (_, text) = http_get(metrics, "/metrics");
        sample(&text, gauge).unwrap() as u64
    };
    let (mut first, _) = peer.open_disk("vm1", 0, DISK).await;
    assert_eq!(first.accepted_credit, max);
    let (second, _) = peer.open_disk("vm1", 1, DISK).await;
    assert_eq!(
        second.accepted_credit, max,
        "two streams: budget / 2 is the maximum"
    );
    assert_eq!(shown(), max);
    // A third: two thirds of the maximum each, rounded down to a half, for it and for
    // those open.
    let (mut third, _) = peer.open_disk("vm1", 2, DISK).await;
    assert_eq!(third.accepted_credit, max / 2);
    assert_eq!(next_credit(&mut first).await, max / 2);
    assert_eq!(shown(), max / 2);
    // The third leaves: the others get their maximum back.
    third.send.finish().unwrap();
    let _ = third.until_error().await;
    assert_eq!(next_credit(&mut first).await, max);
    assert_eq!(shown(), max);
    drop(second);
}

/// Agent streams share one credit budget (`ingest.memory`): each new stream is granted
/// the fair share, streams already open hear of a change in a `Credit` frame, and the
/// share is in `/metrics`; a stream that leaves gives its share back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_streams_share_one_credit_budget() {
    let mut site = Site::create(None, site_options(&["vm1"])).unwrap();
    std::fs::write(
        site.root.join("relay.toml"),
        "[ingest]\ncredit = \"16MiB\"\nmemory = \"32MiB\"\n",
    )
    .unwrap();
    site.start_master_target().unwrap();
    site.start_relay().unwrap();
    let agent = fbr_tests::RawAgent::connect(&site).await;
    let metrics = site.relay_metrics_addr().unwrap();
    streams_share_a_budget_of_twice(16 << 20, &agent, metrics, "fbr_relay_agent_credit_bytes")
        .await;
}

/// The master target shares its credit budget (`memory`) among relay streams the same
/// way: what a thousand disks may have in flight on the WAN leg (in the relay's send
/// buffers and the master target's queues) is bounded by one budget, not by a thousand
/// per-stream credits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_streams_share_the_master_targets_credit_budget() {
    let mut site = Site::create(None, site_options(&["vm1"])).unwrap();
    // The harness grants at most 8 MiB per stream (`--credit-mib 8`).
    std::fs::write(site.root.join("master-target.toml"), "memory = \"16MiB\"\n").unwrap();
    site.start_master_target().unwrap();
    let relay = fbr_tests::RawAgent::connect_as_relay(&site).await;
    let metrics = site.master_target_metrics_addr().unwrap();
    let gauge = "fbr_master_target_stream_credit_bytes";
    streams_share_a_budget_of_twice(8 << 20, &relay, metrics, gauge).await;
}

/// Both daemons run with a bounded number of malloc arenas (they restart themselves
/// once with `MALLOC_ARENA_MAX` set), keeping their process id and arguments.
#[test]
fn daemons_run_with_bounded_malloc_arenas() {
    let site = fbr_tests::start_site(&["vm1"]);
    for (name, pid) in [
        ("relay", site.relay_pid().unwrap()),
        ("master-target", site.master_target_pid().unwrap()),
    ] {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let want = format!("MALLOC_ARENA_MAX={}", fbr_daemon::MALLOC_ARENAS);
        assert!(
            environ.split(|b| *b == 0).any(|v| v == want.as_bytes()),
            "{name} runs without {want}"
        );
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.contains("\0run\0"), "{name}: {cmdline:?}");
    }
}
