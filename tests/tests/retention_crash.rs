//! Every point of a bounded window survives kill -9, and each is recovered exactly by a
//! test failover and by a rollback in place, kill -9s of the rollback included.
//!
//! 1. Churn goes through a real relay to a master target that keeps 3 s for the group.
//!    The master target is killed with SIGKILL and restarted while it applies (twice
//!    early on), and once more after checkpoints have let trimming start (it trims as
//!    soon as it starts, and every second).
//! 2. `churn verify` proves every kept point byte for byte against the source. Then a
//!    trim is stopped where a kill between its two steps would leave it (recorded in
//!    the index, nothing punched): the points still listed are still exact, and the
//!    daemon frees the blocks when it next starts.
//! 3. Each kept point's images are made with `materialize` (proved by step 2). The
//!    window is widened, and each point is opened as a test failover through the
//!    running daemon: every copy equals its point.
//! 4. The group is rolled back to each kept point in turn, newest to oldest. Each
//!    rollback is killed (SIGKILL) 5, 10, 15... ms after it starts, until one runs to its
//!    end by itself. When a kill caught one under way (recorded in the index), the
//!    daemon's start completes the first, and running the rollback again the others.
//!    Each ends on exactly its point.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use fbr_churn::harness::{bin_path, Site};
use fbr_churn::workload::Content;
use fbr_master_target::control::Request;
use fbr_master_target::store::ReplicaIndex;
use fbr_protocol::StreamId;
use fbr_tests::{
    agent_options, master_target, materialize_point, plans, start_site_keeping_group1_for,
    stop_and_verify,
};

const VMS: [&str; 2] = ["vm1", "vm2"];

/// The complete points of group1 (tag, time in ms), oldest first (the daemon stopped).
fn kept_points(data: &str) -> Vec<(u64, u64)> {
    let listing: serde_json::Value =
        serde_json::from_str(&master_target(&["points", "--data", data, "--json"])).unwrap();
    listing["groups"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["complete"] == true)
        .map(|p| {
            (
                p["tag_id"].as_u64().unwrap(),
                p["time_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Bytes the journals of the group's disks hold on disk (holes excluded).
fn journal_blocks(site: &Site) -> u64 {
    use std::os::unix::fs::MetadataExt;
    VMS.iter()
        .map(|vm| {
            let path = site.mt_data.join(format!("disks/{vm}/disk0/journal.fbrj"));
            std::fs::metadata(path).unwrap().blocks() * 512
        })
        .sum()
}

/// Whether the index records a rollback under way on any disk (a kill caught one).
fn rollback_under_way(data: &std::path::Path) -> bool {
    let store = fbr_master_target::Store::open(data).unwrap();
    VMS.iter().any(|vm| {
        let id = StreamId {
            vm: vm.to_string(),
            disk: 0,
        };
        store.rollback_target(&id).unwrap().is_some()
    })
}

fn image(site: &Site, vm: &str) -> Vec<u8> {
    std::fs::read(site.mt_data.join(format!("disks/{vm}/disk0/image.raw"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_in_the_window_survives_kill_9_and_recovers_by_test_copy_and_rollback() {
    let mut site = start_site_keeping_group1_for("3s");

    // 1. Churn, with the master target killed mid-apply and once trimming has begun.
    let mut opts = agent_options(&site, Duration::from_secs(20), Duration::from_millis(400));
    opts.rate_bytes_per_s = Some(3_000_000);
    let handle =
        fbr_churn::agent::start(opts, plans(2, 1, 4 << 20, Content::Mixed, 59), 59).unwrap();
    let started = Instant::now();
    // Checkpoints come 10 s after a start: the last kill is past the first of them.
    for at in [2.5, 5.0, 17.5] {
        let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
        tokio::time::sleep(wait).await;
        tokio::task::block_in_place(|| {
            site.stop_master_target(true).unwrap();
            site.start_master_target().unwrap();
        });
    }
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let first_tag = report.manifest.disks[0].tags[0].id;

    // 2. Every kept point is the source's state at its tag.
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    let data = site.mt_data.to_str().unwrap().to_owned();
    let kept = kept_points(&data);
    assert!(
        kept.len() >= 5 && kept[0].0 > first_tag + 5,
        "trimming went on through the kills and kept a window: {kept:?} (first tag {first_tag})"
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut expected: BTreeMap<u64, Vec<(String, Vec<u8>)>> = kept
        .iter()
        .map(|&(tag, _)| {
            (
                tag,
                materialize_point(&data, "group1", tag, &VMS, scratch.path()),
            )
        })
        .collect();

    // A kill between a trim's two steps: the index says the journals start at the third
    // point, and no block is punched yet. Every point still listed is still exact.
    {
        use fbr_master_target::retention::{trim_pass_until, Retention, RetentionPolicy, TrimStop};
        let store = fbr_master_target::Store::open(&site.mt_data).unwrap();
        let one_second = Retention::uniform(RetentionPolicy {
            window: Duration::from_secs(1),
            max_bytes: None,
        });
        let now = kept[2].1 + 1000;
        let pass =
            trim_pass_until(&site.mt_data, &store, &one_second, now, TrimStop::Recorded).unwrap();
        assert_eq!(pass.disks_trimmed, 2, "{pass:?}");
        assert_eq!(pass.bytes_punched, 0);
    }
    expected.retain(|&tag, _| tag >= kept[2].0);
    let listed: Vec<u64> = kept_points(&data).iter().map(|p| p.0).collect();
    assert_eq!(listed, expected.keys().copied().collect::<Vec<_>>());
    for (&tag, want) in &expected {
        assert!(materialize_point(&data, "group1", tag, &VMS, scratch.path()) == *want);
    }
    let unpunched = journal_blocks(&site);

    // 3. A test failover at every kept point is that point. The window is widened
    //    first (the group's own 3 s goes), or the daemon would trim as it starts.
    std::fs::write(site.root.join("master-target.toml"), "").unwrap();
    tokio::task::block_in_place(|| site.start_master_target()).unwrap();
    let socket = site.master_target_control_socket();
    let ask = |request: Request| {
        let socket = socket.clone();
        async move {
            let answer: fbr_master_target::control::Response =
                fbr_daemon::control::request(&socket, "master target", &request)
                    .await
                    .unwrap();
            assert!(answer.ok, "{request:?}: {:?}", answer.error);
            answer
        }
    };
    for (&tag, want) in &expected {
        let name = format!("at-{tag}");
        let made = ask(Request::TestFailoverCreate {
            group: "group1".into(),
            tag,
            name: name.clone(),
            vm: None,
        })
        .await
        .test_failover
        .unwrap();
        for (disk, (vm, want)) in made.disks.iter().zip(want) {
            assert_eq!(&disk.vm, vm);
            let got = std::fs::read(&disk.path).unwrap();
            assert!(
                got == *want,
                "{vm}: the test failover differs from point {tag}"
            );
        }
        ask(Request::TestFailoverDelete { name }).await;
    }
    tokio::task::block_in_place(|| site.stop_master_target(false)).unwrap();
    // The daemon's start freed what the interrupted trim had left allocated.
    let punched = journal_blocks(&site);
    assert!(
        punched < unpunched,
        "the interrupted trim's blocks are freed at start: {unpunched} -> {punched} bytes"
    );

    // 4. Rollbacks, newest to oldest, each killed until one runs to its end.
    let mut caught_under_way = 0;
    let mut completed_by_daemon = false;
    for (&tag, want) in expected.iter().rev() {
        for attempt in 1.. {
            let mut child = Command::new(bin_path("master-target").unwrap())
                .args(["rollback", "--data", &data, "--group", "group1", "--tag"])
                .arg(tag.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(5 * attempt));
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                out.status.code().is_none(),
                "rollback to {tag} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if rollback_under_way(&site.mt_data) {
                caught_under_way += 1;
                if !completed_by_daemon {
                    // The daemon completes it as it starts, before it serves anything.
                    tokio::task::block_in_place(|| {
                        site.start_master_target().unwrap();
                        site.stop_master_target(false).unwrap();
                    });
                    completed_by_daemon = true;
                    assert!(!rollback_under_way(&site.mt_data));
                    for (vm, want) in want {
                        assert!(
                            image(&site, vm) == *want,
                            "{vm}: the daemon's start did not complete the rollback to {tag}"
                        );
                    }
                }
            }
        }
        for (vm, want) in want {
            assert!(
                image(&site, vm) == *want,
                "{vm}: the image differs from point {tag} after the rollback"
            );
        }
        assert_eq!(kept_points(&data).last().map(|p| p.0), Some(tag));
    }
    eprintln!(
        "{} points, {} rollbacks caught under way by a kill",
        kept.len(),
        caught_under_way
    );
    assert!(
        caught_under_way > 0 && completed_by_daemon,
        "no kill landed while a rollback was under way"
    );
}
