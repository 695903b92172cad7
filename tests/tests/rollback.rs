//! Rolling back in place and test failovers, end to end.
//!
//! Rollback: churn through a real relay and master target,
//! every recovery point verified byte for byte against the source (`churn verify`).
//! Then `master-target rollback` takes the group back to older and older points. After
//! each rollback, every disk's image must equal that point as the journal replays it
//! (`master-target materialize`, made before the rollback from the history `churn verify`
//! proved). No point after it may be listed any more.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::process::Command;
use std::time::Duration;

use fbr_churn::harness::bin_path;
use fbr_churn::workload::Content;
use fbr_tests::{
    agent_options, churn, master_target, materialize_point, plans, start_site, stop_and_verify,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rolls_back_to_older_and_older_points_exactly() {
    let mut site = start_site(&["vm1", "vm2"]);
    let opts = agent_options(&site, Duration::from_secs(4), Duration::from_millis(150));
    let report = churn(opts, plans(2, 1, 4 << 20, Content::Mixed, 41), 41).await;
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    let data = site.mt_data.to_str().unwrap().to_owned();

    let listing: serde_json::Value =
        serde_json::from_str(&master_target(&["points", "--data", &data, "--json"])).unwrap();
    let complete: Vec<u64> = listing["groups"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["complete"] == true)
        .map(|p| p["tag_id"].as_u64().unwrap())
        .collect();
    assert!(
        complete.len() >= 6,
        "enough points to go back through: {complete:?}"
    );
    // Back to the second newest point, then a middle one, then the oldest.
    let n = complete.len();
    let targets = [complete[n - 2], complete[n / 2], complete[0]];
    let scratch = tempfile::tempdir().unwrap();
    for tag in targets {
        let tag_s = tag.to_string();
        let expected = materialize_point(&data, "group1", tag, &["vm1", "vm2"], scratch.path());
        let done: serde_json::Value = serde_json::from_str(&master_target(&[
            "rollback", "--data", &data, "--group", "group1", "--tag", &tag_s, "--json",
        ]))
        .unwrap();
        assert_eq!(done["tag_id"], tag);
        assert_eq!(done["disks"].as_array().unwrap().len(), 2);
        // The newest point may follow the one before with no change (the run's final
        // tag); further back, the disks changed.
        let disks = done["disks"].as_array().unwrap();
        assert!(disks
            .iter()
            .all(|d| d["records_undone"].as_u64().unwrap() > 0));
        let restored: u64 = disks
            .iter()
            .map(|d| d["restored_bytes"].as_u64().unwrap())
            .sum();
        assert!(
            tag == complete[n - 2] || restored > 0,
            "nothing restored back to point {tag}: {done}"
        );
        for (vm, want) in &expected {
            let image = site.mt_data.join(format!("disks/{vm}/disk0/image.raw"));
            let got = std::fs::read(&image).unwrap();
            assert!(
                got == *want,
                "{vm}: image differs from point {tag} after the rollback"
            );
        }
        let listing: serde_json::Value =
            serde_json::from_str(&master_target(&["points", "--data", &data, "--json"])).unwrap();
        let newest = listing["groups"][0]["window"]["newest_tag"].as_u64();
        assert_eq!(newest, Some(tag), "no point after the one rolled back to");
    }
    // A point no longer held is refused with a clear error, changing nothing.
    let out = Command::new(bin_path("master-target").unwrap())
        .args(["rollback", "--data", &data, "--group", "group1", "--tag"])
        .arg(complete[n - 1].to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no point"), "{err}");
}

/// The master target's answer to `request` on its control socket.
async fn ask(
    site: &fbr_churn::harness::Site,
    request: &fbr_master_target::control::Request,
) -> fbr_master_target::control::Response {
    let socket = site.master_target_control_socket();
    let answer: fbr_master_target::control::Response =
        fbr_daemon::control::request(&socket, "master target", request)
            .await
            .unwrap();
    assert!(answer.ok, "{request:?}: {:?}", answer.error);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failover_is_its_point_while_replication_goes_on_and_stays_apart() {
    use fbr_master_target::control::Request;
    let mut site = start_site(&["vm1", "vm2"]);
    let opts = agent_options(&site, Duration::from_secs(6), Duration::from_millis(150));
    let handle =
        fbr_churn::agent::start(opts, plans(2, 1, 4 << 20, Content::Mixed, 43), 43).unwrap();
    // Wait for a few recovery points while the churn goes on.
    let tag = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listing = ask(&site, &Request::Points).await.points.unwrap();
        let complete: Vec<u64> = listing["groups"][0]["points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["complete"] == true)
                    .map(|p| p["tag_id"].as_u64().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        if complete.len() >= 4 {
            break complete[1];
        }
    };
    let tag_s = tag.to_string();
    let socket = site.master_target_control_socket();
    let socket = socket.to_str().unwrap().to_owned();
    let made: serde_json::Value = serde_json::from_str(&master_target(&[
        "test-failover",
        "create",
        "--control-socket",
        &socket,
        "--group",
        "group1",
        "--tag",
        &tag_s,
        "--name",
        "drill",
        "--json",
    ]))
    .unwrap();
    let tf = &made["test_failover"];
    assert_eq!(tf["tag_id"], tag);
    let disks = tf["disks"].as_array().unwrap().clone();
    assert_eq!(disks.len(), 2);
    for d in &disks {
        assert!(
            d["records_undone"].as_u64().unwrap() > 0,
            "replication went on past the point before the copy: {d}"
        );
        assert!(["reflink", "sparse-copy"].contains(&d["method"].as_str().unwrap()));
    }
    let path = |i: usize| std::path::PathBuf::from(disks[i]["path"].as_str().unwrap());
    let vm1_copy = std::fs::read(path(0)).unwrap();
    // The test VM writes to its disk; replication goes on meanwhile.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path(1))
            .unwrap();
        f.write_all_at(&[0xEE; 8192], 65536).unwrap();
    }
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let listed = ask(&site, &Request::TestFailoverList).await;
    assert_eq!(listed.test_failovers.unwrap().len(), 1);

    // The replicas are untouched by the copies: every point verifies.
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(
        std::fs::read(path(0)).unwrap() == vm1_copy,
        "the copy changed while replication went on"
    );
    let data = site.mt_data.to_str().unwrap().to_owned();
    let scratch = tempfile::tempdir().unwrap();
    let expected = materialize_point(&data, "group1", tag, &["vm1", "vm2"], scratch.path());
    for (i, (vm, want)) in expected.iter().enumerate() {
        assert_eq!(disks[i]["vm"], vm.as_str());
        let mut got = std::fs::read(path(i)).unwrap();
        if i == 1 {
            assert!(got[65536..65536 + 8192].iter().all(|&b| b == 0xEE));
            got[65536..65536 + 8192].copy_from_slice(&want[65536..65536 + 8192]);
        }
        assert!(
            got == *want,
            "{vm}: the test failover differs from point {tag}"
        );
    }

    // Cleanup deletes it.
    tokio::task::block_in_place(|| site.start_master_target()).unwrap();
    master_target(&[
        "test-failover",
        "delete",
        "--control-socket",
        &socket,
        "--name",
        "drill",
    ]);
    assert!(!path(0).parent().unwrap().exists());
    let listed = ask(&site, &Request::TestFailoverList).await;
    assert!(listed.test_failovers.unwrap().is_empty());
    // A second delete, and a point that does not exist, are clear errors.
    let gone = Command::new(bin_path("master-target").unwrap())
        .args([
            "test-failover",
            "delete",
            "--control-socket",
            &socket,
            "--name",
            "drill",
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no test failover drill"));
}
