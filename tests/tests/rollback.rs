//! Rolling back in place, end to end: churn through a real relay and master target,
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
use fbr_tests::{agent_options, churn, plans, start_site, stop_and_verify};

fn master_target(args: &[&str]) -> String {
    let out = Command::new(bin_path("master-target").unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "master-target {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

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
        let mut expected = Vec::new();
        for vm in ["vm1", "vm2"] {
            let out = scratch.path().join(format!("{vm}-{tag}.raw"));
            master_target(&[
                "materialize",
                "--data",
                &data,
                "--group",
                "group1",
                "--tag",
                &tag_s,
                "--vm",
                vm,
                "--disk",
                "0",
                "--out",
                out.to_str().unwrap(),
            ]);
            expected.push((vm, std::fs::read(&out).unwrap()));
        }
        let done: serde_json::Value = serde_json::from_str(&master_target(&[
            "rollback", "--data", &data, "--group", "group1", "--tag", &tag_s, "--json",
        ]))
        .unwrap();
        assert_eq!(done["tag_id"], tag);
        assert_eq!(done["disks"].as_array().unwrap().len(), 2);
        for d in done["disks"].as_array().unwrap() {
            assert!(
                d["records_undone"].as_u64().unwrap() > 0
                    && d["restored_bytes"].as_u64().unwrap() > 0,
                "the disks changed after point {tag}: {d}"
            );
        }
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
