//! End to end through real processes: emulated VM disks -> relay -> master target, with
//! every recovery point proven byte-identical to the sources.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::Duration;

use fbr_churn::source::SourceSpec;
use fbr_churn::workload::Content;
use fbr_churn::writelog;
use fbr_tests::{agent_options, churn, plans, start_site, stop_and_verify};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_vms_every_profile_byte_exact_at_every_recovery_point() {
    let vms = ["vm1", "vm2", "vm3"];
    let mut site = start_site(&vms);
    // 3 VMs x 2 disks: the four profiles cycle over the six disks.
    let plans = plans(3, 2, 16 << 20, Content::Mixed, 11);
    let opts = agent_options(&site, Duration::from_secs(5), Duration::from_millis(150));
    let report = churn(opts, plans, 11).await;
    for d in &report.manifest.disks {
        assert_eq!(
            d.acked_seq, d.last_seq,
            "{}/{} fully acknowledged",
            d.vm, d.disk
        );
    }
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(
        v.recovery_points_verified >= 20,
        "only {} recovery points",
        v.recovery_points_verified
    );
    assert_eq!(v.recovery_points_verified, v.recovery_points_complete);
    assert!(v.disks.iter().all(|d| d.final_image_matches));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_write_log_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("capture.fbrwlog");
    // A capture with its own consistency points: a TAG every 50 changes, every third
    // app-consistent.
    let tags = writelog::GeneratedTags {
        every: 50,
        app_every: 3,
    };
    writelog::generate_log(&log, 2, 2, 8 << 20, None, Content::Mixed, 5, 600, tags).unwrap();
    let summary = writelog::scan_log(&log).unwrap();
    assert_eq!((summary.disks.len(), summary.tags.len()), (4, 12));
    let mut site = start_site(&["vm1", "vm2"]);
    let plans = summary
        .disks
        .into_iter()
        .map(|(index, id, size)| fbr_churn::agent::DiskPlan {
            id,
            disk_size: size,
            group: "replay".into(),
            source: SourceSpec::Log {
                path: log.clone(),
                index,
            },
            start: Default::default(),
        })
        .collect();
    let mut opts = agent_options(&site, Duration::from_secs(60), Duration::from_millis(50));
    opts.duration = None; // until the log is exhausted
    opts.log_tags = Some(summary.tags);
    let report = churn(opts, plans, 0).await;
    for d in &report.manifest.disks {
        // The log's 12 tags where it has them (each disk has 150 changes, a tag after
        // every 50 of all: one after every 12.5 of its own), then the final one.
        let ids: Vec<u64> = d.tags.iter().map(|t| t.id).collect();
        assert_eq!(ids, (1..=13).collect::<Vec<_>>(), "{}/{}", d.vm, d.disk);
        let apps: Vec<u64> = d.tags.iter().filter(|t| t.app).map(|t| t.id).collect();
        assert_eq!(apps, vec![3, 6, 9, 12], "{}/{}", d.vm, d.disk);
        assert_eq!(d.tags[2].name.as_deref(), Some("app-3"));
        // Tag n comes after exactly the disk's changes among the log's first 50·n.
        let index = (d.vm.trim_start_matches("vm").parse::<u64>().unwrap() - 1) * 2 + d.disk as u64;
        for (n, t) in d.tags.iter().take(12).enumerate() {
            let before = (0..50 * (n as u64 + 1)).filter(|i| i % 4 == index).count() as u64;
            assert_eq!(
                t.seq,
                before + n as u64 + 1,
                "tag {} of {}/{}",
                t.id,
                d.vm,
                d.disk
            );
        }
    }
    let total: u64 = report
        .manifest
        .disks
        .iter()
        .map(|d| d.last_seq - d.tags.len() as u64)
        .sum();
    assert_eq!(total, 600, "every logged change was sent");
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(
        v.recovery_points_verified >= 13,
        "{} recovery points verified",
        v.recovery_points_verified
    );
    // The operator's listing: the 13 points, app-consistent where the log said, common
    // to the group's 4 disks, with times in order, and the window they span.
    let out = std::process::Command::new(fbr_churn::harness::bin_path("master-target").unwrap())
        .args(["points", "--json", "--data"])
        .arg(&site.mt_data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let group = &listing["groups"][0];
    assert_eq!(group["group"], "replay");
    let points = group["points"].as_array().unwrap();
    assert_eq!(points.len(), 13);
    assert!(points
        .iter()
        .all(|p| p["common"] == true && p["complete"] == true));
    let apps: Vec<u64> = points
        .iter()
        .filter(|p| p["kind"] == "app")
        .map(|p| p["tag_id"].as_u64().unwrap())
        .collect();
    assert_eq!(apps, vec![3, 6, 9, 12]);
    let times: Vec<u64> = points
        .iter()
        .map(|p| p["time_ms"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let window = &group["window"];
    assert_eq!(window["recovery_points"], 13);
    assert_eq!(
        (window["oldest_tag"].as_u64(), window["newest_tag"].as_u64()),
        (Some(1), Some(13))
    );
    assert_eq!(window["newest_time_ms"].as_u64(), times.last().copied());
    assert_eq!(listing["vms"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_twice_mid_run_loses_nothing() {
    let mut site = start_site(&["vm1", "vm2"]);
    let plans = plans(2, 2, 16 << 20, Content::Mixed, 21);
    let opts = agent_options(&site, Duration::from_secs(6), Duration::from_millis(200));
    let handle = fbr_churn::agent::start(opts, plans, 21).unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| {
            site.stop_relay(true).unwrap();
            site.start_relay().unwrap();
        });
    }
    let stats = handle.stats.clone();
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the kills were noticed"
    );
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_target_killed_mid_run_loses_nothing() {
    let mut site = start_site(&["vm1", "vm2"]);
    let plans = plans(2, 2, 16 << 20, Content::Mixed, 31);
    let opts = agent_options(&site, Duration::from_secs(6), Duration::from_millis(200));
    let handle = fbr_churn::agent::start(opts, plans, 31).unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    tokio::task::block_in_place(|| site.stop_master_target(true).unwrap());
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| site.start_master_target().unwrap());
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}
