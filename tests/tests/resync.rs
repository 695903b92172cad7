//! Resync end to end, with the source churning throughout: a delta resync of a stale
//! original-location replica, a full copy to an alternate location, an unchanged disk
//! (hashes only), kill -9 of the relay, the master target and the agent in the middle
//! (each resumed, not restarted), and hostile hash-stream input. Every run ends with
//! byte-exact verification of every recovery point after the resync, and the master
//! target must not offer a point cut while a disk resynced.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fbr_churn::agent::{DiskPlan, DiskStart, ResyncPlan, RunHandle};
use fbr_churn::harness::Site;
use fbr_churn::image::ImageSpec;
use fbr_churn::source::SourceSpec;
use fbr_churn::workload::{Content, Profile};
use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_tests::{agent_options, start_site, stop_and_verify, RawAgent};

const MIB: u64 = 1 << 20;

fn plan(
    site: &Site,
    disk_size: u64,
    source_base: ImageSpec,
    replica_base: ImageSpec,
    resync: ResyncPlan,
    resume: bool,
) -> DiskPlan {
    DiskPlan {
        id: StreamId {
            vm: "vm1".into(),
            disk: 0,
        },
        disk_size,
        group: "g".into(),
        source: SourceSpec::Generated {
            seed: 5,
            vm_index: 0,
            disk_index: 0,
            profile: Profile::Random,
            content: Content::Mixed,
        },
        start: DiskStart {
            source_base,
            replica_base,
            disk_file: Some(site.root.join("sources/vm1-disk0.img")),
            resync,
            // Slow enough that a kill lands in the middle.
            resync_rate: Some(16 << 20),
            resume,
        },
    }
}

fn generated(seed: u64, used_ppm: u32) -> ImageSpec {
    ImageSpec::Generated { seed, used_ppm }
}

fn diverged(base: &ImageSpec, seed: u64, changed_ppm: u32) -> ImageSpec {
    ImageSpec::Diverged {
        base: Box::new(base.clone()),
        seed,
        changed_ppm,
    }
}

/// Starts the agent: churn at a steady 2 MB/s for up to `seconds`, a tag every 200 ms.
fn start(site: &Site, disk: DiskPlan, seconds: u64) -> RunHandle {
    let mut opts = agent_options(
        site,
        Duration::from_secs(seconds),
        Duration::from_millis(200),
    );
    opts.rate_bytes_per_s = Some(2_000_000);
    fbr_churn::agent::start(opts, vec![disk], 9).unwrap()
}

/// Waits until the run's resync reaches `fraction` of its regions (or ends).
async fn wait_progress(handle: &RunHandle, fraction: f64) {
    let started = Instant::now();
    loop {
        let p = handle.resync_progress()[0].clone();
        if p.finished.is_some()
            || (p.regions_total > 0 && p.regions_done as f64 >= fraction * p.regions_total as f64)
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "resync stuck at {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the resync to end, lets a few more tags land, stops and verifies.
async fn finish_and_verify(site: Site, handle: RunHandle) -> fbr_churn::verify::VerifyReport {
    finish_and_verify_with(site, handle, true).await
}

/// Like [`finish_and_verify`]; `tags_during` says whether the resync lasted long
/// enough for tags to be cut while it ran.
async fn finish_and_verify_with(
    mut site: Site,
    handle: RunHandle,
    tags_during: bool,
) -> fbr_churn::verify::VerifyReport {
    wait_progress(&handle, 2.0).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let during = report.manifest.disks[0]
        .tags
        .iter()
        .filter(|t| t.in_resync)
        .count();
    eprintln!(
        "tags: {} ({during} during the resync), first seq {}, resync runs {}",
        report.manifest.disks[0].tags.len(),
        report.manifest.disks[0].first_seq,
        report.manifest.disks[0].resync_runs.len()
    );
    assert!(
        !tags_during || during > 0,
        "tags were cut while the disk resynced"
    );
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(v.recovery_points_verified >= 3, "{v:?}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_original_location_gets_only_the_differing_blocks() {
    let disk_size = 48 * MIB;
    let base = generated(11, 600_000);
    let source = diverged(&base, 12, 30_000); // 3% of the blocks changed since failover
    let mut site = start_site(&["vm1"]);
    tokio::task::block_in_place(|| site.seed_disk("vm1", 0, &base, disk_size)).unwrap();
    let handle = start(
        &site,
        plan(&site, disk_size, source, base, ResyncPlan::Auto, false),
        60,
    );
    let stats = handle.stats.clone();
    finish_and_verify(site, handle).await;
    let sent = stats.resync_sent_bytes.load(Ordering::Relaxed);
    let differing = disk_size * 3 / 100;
    assert!(
        sent >= differing / 2 && sent < disk_size / 4,
        "a delta sends about the differing blocks: {sent} bytes for {differing} differing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_disk_costs_only_its_coarse_hashes() {
    let disk_size = 64 * MIB;
    let base = generated(21, 500_000);
    let mut site = start_site(&["vm1"]);
    tokio::task::block_in_place(|| site.seed_disk("vm1", 0, &base, disk_size)).unwrap();
    let handle = start(
        &site,
        plan(
            &site,
            disk_size,
            base.clone(),
            base,
            ResyncPlan::Delta,
            false,
        ),
        60,
    );
    let stats = handle.stats.clone();
    finish_and_verify_with(site, handle, false).await;
    let hashes = stats.resync_hash_bytes.load(Ordering::Relaxed);
    assert!(
        hashes * 1000 < disk_size,
        "comparing an unchanged disk costs under 0.1% of it: {hashes} bytes"
    );
    assert!(
        stats.resync_sent_bytes.load(Ordering::Relaxed) < disk_size / 20,
        "little more than what the churn changed meanwhile is sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alternate_location_gets_a_full_copy() {
    let disk_size = 32 * MIB;
    let source = generated(31, 500_000);
    let site = start_site(&["vm1"]);
    let handle = start(
        &site,
        plan(
            &site,
            disk_size,
            source,
            ImageSpec::Zeros,
            ResyncPlan::Auto,
            false,
        ),
        60,
    );
    let stats = handle.stats.clone();
    finish_and_verify(site, handle).await;
    assert!(
        stats.resync_sent_bytes.load(Ordering::Relaxed) >= disk_size,
        "a full copy reads every block (zero runs travel as zero ranges)"
    );
    assert_eq!(stats.resync_hash_bytes.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_master_target_kills_resume_the_resync() {
    let disk_size = 64 * MIB;
    let base = generated(41, 1_000_000);
    let source = generated(42, 1_000_000); // every block differs
    let mut site = start_site(&["vm1"]);
    tokio::task::block_in_place(|| site.seed_disk("vm1", 0, &base, disk_size)).unwrap();
    let handle = start(
        &site,
        plan(&site, disk_size, source, base, ResyncPlan::Auto, false),
        120,
    );
    wait_progress(&handle, 0.3).await;
    tokio::task::block_in_place(|| {
        site.stop_relay(true).unwrap();
        site.start_relay().unwrap();
    });
    wait_progress(&handle, 0.6).await;
    tokio::task::block_in_place(|| {
        site.stop_master_target(true).unwrap();
        site.start_master_target().unwrap();
    });
    let stats = handle.stats.clone();
    finish_and_verify(site, handle).await;
    let sent = stats.resync_sent_bytes.load(Ordering::Relaxed);
    assert!(
        sent < disk_size + disk_size / 4,
        "resumed where it stood, not from zero: {sent} bytes for a {disk_size}-byte disk"
    );
    assert_eq!(stats.resyncs_started.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_comes_back_and_resumes() {
    let disk_size = 48 * MIB;
    let base = generated(51, 1_000_000);
    let source = generated(52, 1_000_000);
    let mut site = start_site(&["vm1"]);
    tokio::task::block_in_place(|| site.seed_disk("vm1", 0, &base, disk_size)).unwrap();
    let mut first_plan = plan(
        &site,
        disk_size,
        source,
        base.clone(),
        ResyncPlan::Auto,
        false,
    );
    // Slower than the path, so the agent is not far ahead of what the master target has
    // applied when it dies: its resync must still be unfinished there (else the next
    // agent finds the replica in step, with nothing to resume).
    first_plan.start.resync_rate = Some(4 << 20);
    let first = start(&site, first_plan, 120);
    wait_progress(&first, 0.4).await;
    first.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // What the disk held when the agent died is where the next one starts.
    let disk_file = site.root.join("sources/vm1-disk0.img");
    let snapshot = site.root.join("sources/at-restart.img");
    std::fs::copy(&disk_file, &snapshot).unwrap();
    let second_plan = plan(
        &site,
        disk_size,
        ImageSpec::File { path: snapshot },
        base,
        ResyncPlan::Auto,
        true,
    );
    let second = start(&site, second_plan, 120);
    wait_progress(&second, 0.01).await;
    let resumed = second.resync_progress()[0].clone();
    assert!(
        resumed.regions_total < disk_size / MIB,
        "the resync resumed ({} of {} regions left)",
        resumed.regions_total,
        disk_size / MIB
    );
    let stats = second.stats.clone();
    // What is left of the resync after the resume may be done before a tag is due: the
    // resume itself is what this test checks (above), then every point verifies.
    finish_and_verify_with(site, second, false).await;
    assert!(stats.resync_sent_bytes.load(Ordering::Relaxed) < disk_size * 9 / 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hash_streams_get_coded_errors() {
    let disk_size = 8 * MIB;
    let site = start_site(&["vm1"]);
    let agent = RawAgent::connect(&site).await;
    let hello = |vm: &str, disk_size| Frame::HashHello {
        stream: StreamId {
            vm: vm.into(),
            disk: 0,
        },
        disk_size,
        key: [3; 32],
    };
    // A VM the certificate does not name.
    let mut s = agent.open().await;
    s.send_frame(&hello("vm9", disk_size)).await;
    assert!(matches!(
        s.until_error().await.0,
        Some(Frame::Error {
            code: ErrorCode::NotEntitled,
            ..
        })
    ));
    // Hashes of nodes beyond the disk, and of a level that does not exist.
    for (level, first, count, code) in [
        (0u8, 8u64, 1u32, ErrorCode::OutOfBounds),
        (2, 2040, 16, ErrorCode::OutOfBounds),
        (3, 0, 1, ErrorCode::MalformedFrame),
    ] {
        let mut s = agent.open().await;
        s.send_frame(&hello("vm1", disk_size)).await;
        assert!(matches!(
            s.next_frame().await,
            Some(Frame::HashAccept { .. })
        ));
        s.send_frame(&Frame::HashRequest {
            level,
            first,
            count,
        })
        .await;
        match s.until_error().await.0 {
            Some(Frame::Error { code: got, .. }) => assert_eq!(got, code, "level {level}"),
            other => panic!("expected {code} for level {level}, got {other:?}"),
        }
    }
    // A valid request is answered with one hash per node.
    let mut s = agent.open().await;
    s.send_frame(&hello("vm1", disk_size)).await;
    assert!(matches!(
        s.next_frame().await,
        Some(Frame::HashAccept {
            replica: fbr_protocol::ReplicaState::New,
            ..
        })
    ));
    s.send_frame(&Frame::HashRequest {
        level: 0,
        first: 0,
        count: 8,
    })
    .await;
    match s.next_frame().await {
        Some(Frame::Hashes { hashes, .. }) => assert_eq!(hashes.len(), 8),
        other => panic!("expected hashes, got {other:?}"),
    }
    // A record on a hash stream.
    s.send_frame(&fbr_tests::write(1, 0, 512, 1)).await;
    assert!(matches!(
        s.until_error().await.0,
        Some(Frame::Error {
            code: ErrorCode::UnexpectedFrame,
            ..
        })
    ));
    // A disk whose size on record differs.
    let (mut d, _) = agent.open_disk("vm1", 0, disk_size).await;
    d.send_frame(&fbr_tests::write(1, 0, 4096, 1)).await;
    d.wait_applied(1).await;
    let mut s = agent.open().await;
    s.send_frame(&hello("vm1", 2 * disk_size)).await;
    assert!(matches!(
        s.until_error().await.0,
        Some(Frame::Error {
            code: ErrorCode::DiskSizeMismatch,
            ..
        })
    ));
    // Resync data for a disk that is not resyncing: the master target refuses it.
    let mark = |seq, phase| {
        Frame::Record(fbr_protocol::Record::Resync {
            seq,
            mark: fbr_protocol::ResyncMark {
                id: 77,
                phase,
                mode: fbr_protocol::ResyncMode::Delta,
                next_region: 1,
                regions: 8,
                compared_bytes: 0,
                sent_bytes: 0,
            },
        })
    };
    d.send_frame(&mark(2, fbr_protocol::ResyncPhase::Progress))
        .await;
    let metrics = site.master_target_metrics_addr().unwrap();
    let started = Instant::now();
    loop {
        let (_, body) = fbr_tests::http_get(metrics, "/metrics");
        if body.contains("fbr_master_target_stream_errors_total{code=\"resync_mismatch\"} 1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the mark was refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_asks_for_a_resync_of_a_live_disk() {
    let disk_size = 32 * MIB;
    let site = start_site(&["vm1"]);
    let mut disk = plan(
        &site,
        disk_size,
        ImageSpec::Zeros,
        ImageSpec::Zeros,
        ResyncPlan::None,
        false,
    );
    disk.start.resync_rate = Some(4 << 20);
    let handle = start(&site, disk, 60);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(handle.stats.resyncs_started.load(Ordering::Relaxed), 0);
    let socket = site.relay_control_socket();
    let socket = socket.to_str().unwrap();
    let out = tokio::task::block_in_place(|| {
        site.relay_command(&[
            "resync",
            "--control-socket",
            socket,
            "--vm",
            "vm1",
            "--disk",
            "0",
            "--mode",
            "full",
            "--json",
        ])
    })
    .unwrap();
    assert!(out.contains("\"ok\":true"), "{out}");
    // Unknown disks are refused with a reason.
    let err = tokio::task::block_in_place(|| {
        site.relay_command(&[
            "resync",
            "--control-socket",
            socket,
            "--vm",
            "nope",
            "--disk",
            "0",
        ])
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("never seen disk nope/disk0"), "{err}");
    wait_progress(&handle, 0.3).await;
    let listed = tokio::task::block_in_place(|| {
        site.relay_command(&["resyncs", "--control-socket", socket, "--json"])
    })
    .unwrap();
    assert!(
        listed.contains("\"vm\":\"vm1\"") || handle.resync_progress()[0].finished.is_some(),
        "{listed}"
    );
    let stats = handle.stats.clone();
    finish_and_verify(site, handle).await;
    assert_eq!(stats.resyncs_done.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_corruption_is_repaired_by_an_automatic_resync() {
    let disk_size = 32 * MIB;
    let mut site = start_site(&["vm1"]);
    let disk = plan(
        &site,
        disk_size,
        ImageSpec::Zeros,
        ImageSpec::Zeros,
        ResyncPlan::None,
        false,
    );
    let mut opts = agent_options(&site, Duration::from_secs(120), Duration::from_millis(200));
    opts.rate_bytes_per_s = Some(12_000_000);
    let handle = fbr_churn::agent::start(opts, vec![disk], 9).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The master target goes away: the backlog builds up in sealed cache segments.
    tokio::task::block_in_place(|| site.stop_master_target(false)).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A bit flips in a sealed segment written while the master target was away (its
    // records were never forwarded) while the relay is down.
    tokio::task::block_in_place(|| site.stop_relay(false)).unwrap();
    let mut segments: Vec<_> = std::fs::read_dir(&site.cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fbrc"))
        .collect();
    segments.sort();
    assert!(
        segments.len() >= 3,
        "a backlog of sealed segments: {segments:?}"
    );
    let victim = &segments[segments.len() - 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5A;
    std::fs::write(victim, &bytes).unwrap();
    tokio::task::block_in_place(|| {
        site.start_relay().unwrap();
        site.start_master_target().unwrap();
    });
    // The relay finds the damage, drops what it cannot send, and has the agent resync.
    let started = Instant::now();
    while handle.stats.resyncs_done.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no resync repaired the lost records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    handle.request_stop();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let d = &report.manifest.disks[0];
    assert_eq!(d.renumbers.len(), 1, "the stream was numbered again once");
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(v.recovery_points_verified >= 3, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terabyte_disk_is_copied_churned_and_verified_in_bounded_memory() {
    // Azure disks reach 4 TiB: a 1 TiB emulated disk lives in a sparse file, a full copy
    // skips its holes, and the verifier streams through sparse scratch images.
    let disk_size = 1 << 40;
    let source = generated(61, 2); // a few hundred blocks of data, spread over the disk
    let site = start_site(&["vm1"]);
    let mut disk = plan(
        &site,
        disk_size,
        source,
        ImageSpec::Zeros,
        ResyncPlan::Auto,
        false,
    );
    disk.start.resync_rate = None;
    let handle = start(&site, disk, 60);
    let stats = handle.stats.clone();
    finish_and_verify_with(site, handle, false).await;
    assert!(stats.resync_compared_bytes.load(Ordering::Relaxed) >= disk_size);
}
