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
    writelog::generate_log(&log, 2, 2, 8 << 20, None, Content::Mixed, 5, 600).unwrap();
    let disks = writelog::scan_disks(&log).unwrap();
    assert_eq!(disks.len(), 4);
    let mut site = start_site(&["vm1", "vm2"]);
    let plans = disks
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
    let report = churn(opts, plans, 0).await;
    let total: u64 = report
        .manifest
        .disks
        .iter()
        .map(|d| d.last_seq - d.tags.len() as u64)
        .sum();
    assert_eq!(total, 600, "every logged change was sent");
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(v.recovery_points_verified >= 1);
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
