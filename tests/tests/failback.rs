//! The failback controller in a real relay, driven through its HTTPS API as an operator
//! would: the whole cycle verified byte for byte, a relay killed with SIGKILL at every
//! step of a planned failover, and the API's refusals and idempotency.
//!
//! Every site is on loopback: a configuration server, a master target, a relay whose
//! controller runs the emulated platforms' hooks (`churn vm-hook`), and the agent
//! emulator as the Azure VMs.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fbr_churn::failbackdrill::{self, chosen_points, FailbackOptions, FailbackSite};
use fbr_churn::platform;
use fbr_enroll::heartbeat::HeartbeatClient;
use fbr_tests::eventually;

fn small(vms: u32) -> FailbackOptions {
    FailbackOptions {
        vms,
        disks_per_vm: 1,
        disk_size: 8 << 20,
        rate_bytes_per_s: 2_000_000,
        protected_for: Duration::from_secs(1),
        progress: false,
        ..FailbackOptions::default()
    }
}

/// The state of job `id`, once it answers.
async fn job(fb: &FailbackSite, id: u64) -> serde_json::Value {
    fb.operator.get(&format!("/v1/jobs/{id}")).await.unwrap()["job"].clone()
}

/// Waits until job `id` runs step `step` (the API may be down a moment after a
/// restart: it answers once the relay heard from its configuration server).
async fn wait_for_step(fb: &FailbackSite, id: u64, step: &str) {
    eventually(60, &format!("job {id} at {step}"), || async {
        let doc = fb
            .operator
            .get(&format!("/v1/jobs/{id}"))
            .await
            .map_err(|e| e.to_string())?;
        let running = doc["job"]["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["state"] == "running").cloned());
        match running {
            Some(s) if s["step"] == step => Ok(()),
            other => Err(format!("running: {other:?}; job: {}", doc["job"])),
        }
    })
    .await;
}

/// Waits for job `id` to end; its document.
async fn wait_for_end(fb: &FailbackSite, id: u64, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(doc) = fb.operator.get(&format!("/v1/jobs/{id}")).await {
            if doc["job"]["state"] != "running" {
                return doc["job"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not end in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reprotect_all(fb: &FailbackSite) {
    fb.wait_for_vms().await.unwrap();
    let (entry, _) = fb
        .operator
        .run(
            "reprotect",
            serde_json::json!({
                "operation": {"operation": "reprotect", "location": "original"},
                "vms": fb.vms,
            }),
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert_eq!(entry.state, "succeeded", "{entry:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failback_drill_verifies_with_no_data_lost_at_latest() {
    // Long enough protected for points to choose among (a named one, then a newer one).
    let s = failbackdrill::run(FailbackOptions {
        protected_for: Duration::from_secs(3),
        ..small(2)
    })
    .await
    .unwrap();
    assert!(s.verified, "{:#?}", s.errors);
    assert_eq!(s.data_loss_bytes["latest_planned"], 0);
    // Run B's VM wrote on after its named point: that is what the point loses.
    assert!(
        s.data_loss_bytes["named_point"] > 0,
        "{:?}",
        s.data_loss_bytes
    );
    assert_eq!(s.copies_verified, 2);
    for t in &s.timeline {
        assert_eq!(t.state, "succeeded", "{t:?}");
    }
    let operations: Vec<&str> = s.timeline.iter().map(|t| t.operation.as_str()).collect();
    assert_eq!(
        operations,
        [
            "reprotect",
            "test_failover",
            "test_cleanup",
            "failover",
            "failover",
            "change_point",
            "commit",
            "commit",
            "reprotect_back"
        ]
    );
    // The reprotect chose its groups' retention at the master target.
    let reprotect = &s.timeline[0];
    assert!(
        reprotect.steps[1]
            .note
            .ends_with("259200 s of history kept for group1, group2"),
        "{reprotect:?}"
    );
    // Reprotect back: the reverse replica, in Azure, verified at its points; its delta
    // resync sent what the on-premises disks changed, not the disks.
    assert!(s.reverse_recovery_points_verified >= 2, "{s:?}");
    // (Run B's VM lost what it wrote after its point: that much differs.)
    assert!(
        s.reverse_resync_bytes > 0 && s.reverse_resync_bytes < 8 << 20,
        "{s:?}"
    );
    let failovers: Vec<_> = s
        .timeline
        .iter()
        .filter(|t| t.operation == "failover")
        .collect();
    assert_eq!(failovers.len(), 2);
    // Each failover had an estimate before it started, shown beside its actual.
    for f in failovers {
        assert!(f.estimate_s.is_some(), "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_at_every_step_of_a_planned_failover_and_its_reprotect_back_finishes_them() {
    let mut fb = FailbackSite::start(&small(2)).await.unwrap();
    reprotect_all(&fb).await;
    let vm = fb.vms[0].clone();
    let pause = |dir: &std::path::Path, action: &str| dir.join(format!("{action}.pause"));
    // Held: the Azure VM's shut-down.
    std::fs::write(pause(&fb.azure, "shut_down"), b"").unwrap();
    std::fs::write(pause(&fb.on_premises, "power_on"), b"").unwrap();
    let failover = serde_json::json!({
        "operation": {"operation": "failover", "point": "latest", "planned": true},
        "vms": [vm],
        "idempotency_key": "killed-failover",
    });
    let started = fb
        .operator
        .post("/v1/jobs", failover.clone())
        .await
        .unwrap();
    let id = started["job"]["id"].as_u64().unwrap();

    // 1. Killed while shutting the Azure VM down.
    wait_for_step(&fb, id, "shut_down_source").await;
    fb.site.stop_relay(true).unwrap();
    fb.site.start_relay().unwrap();
    wait_for_step(&fb, id, "shut_down_source").await;

    // 2. Killed while draining: the master target is down meanwhile, so what the VM
    // wrote last waits at the relay.
    fb.site.stop_master_target(true).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::remove_file(pause(&fb.azure, "shut_down")).unwrap();
    wait_for_step(&fb, id, "drain").await;
    fb.site.stop_relay(true).unwrap();
    fb.site.start_relay().unwrap();
    wait_for_step(&fb, id, "drain").await;
    let backlog = job(&fb, id).await["steps"][1]["bytes_total"]
        .as_u64()
        .unwrap();
    assert!(backlog > 0, "the drain had nothing to wait for");
    fb.site.start_master_target().unwrap();

    // 3. Killed while powering the on-premises VM on.
    wait_for_step(&fb, id, "power_on").await;
    fb.site.stop_relay(true).unwrap();
    fb.site.start_relay().unwrap();
    wait_for_step(&fb, id, "power_on").await;
    std::fs::remove_file(pause(&fb.on_premises, "power_on")).unwrap();

    let done = wait_for_end(&fb, id, 120).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // A retried request after all this is still the same job.
    let again = fb.operator.post("/v1/jobs", failover).await.unwrap();
    assert_eq!(again["job"]["id"].as_u64(), Some(id));
    let vms = fb.operator.get("/v1/vms").await.unwrap();
    let me = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["protection"], "FAILED_OVER", "{me}");
    assert_eq!(platform::state(&fb.on_premises, &vm), "running");
    let points = chosen_points(&done, "latest_planned");

    // Commit, then reprotect back, killed while turning around and while resyncing.
    let commit = serde_json::json!({"operation": {"operation": "commit"}, "vms": [vm]});
    let id = fb.operator.post("/v1/jobs", commit).await.unwrap()["job"]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(wait_for_end(&fb, id, 60).await["state"], "succeeded");
    failbackdrill::give_azure_its_disks(&mut fb).unwrap();
    std::fs::write(pause(&fb.on_premises, "replicate"), b"").unwrap();
    let back = serde_json::json!({"operation": {"operation": "reprotect_back"}, "vms": [vm]});
    let id = fb.operator.post("/v1/jobs", back).await.unwrap()["job"]["id"]
        .as_u64()
        .unwrap();
    wait_for_step(&fb, id, "turn_around").await;
    fb.site.stop_relay(true).unwrap();
    fb.site.start_relay().unwrap();
    wait_for_step(&fb, id, "turn_around").await;
    std::fs::remove_file(pause(&fb.on_premises, "replicate")).unwrap();
    wait_for_step(&fb, id, "resync").await;
    fb.site.stop_relay(true).unwrap();
    fb.site.start_relay().unwrap();
    let done = wait_for_end(&fb, id, 120).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let vms = fb.operator.get("/v1/vms").await.unwrap();
    assert!(
        vms["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vm"] == vm.as_str() && v["protection"] == "PROTECTED_BACK"),
        "{vms}"
    );

    let checked = fb.stop_and_verify(&points, 8 << 20).await.unwrap();
    assert!(checked.verified, "{:#?}", checked.errors);
    assert_eq!(checked.copies_verified, 1);
    assert_eq!(checked.data_loss_bytes["latest_planned"], 0);
    assert!(checked.reverse_recovery_points_verified > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_refuses_clearly_and_a_retried_request_starts_one_job() {
    let fb = FailbackSite::start(&small(2)).await.unwrap();
    fb.wait_for_vms().await.unwrap();
    let op = &fb.operator;
    let api = fb.site.relay_api_addr().unwrap();
    let ca = fb.site.pki_dir.join("ca.pem");

    // Who may call: not a wrong token, not a site certificate of another role.
    let wrong = HeartbeatClient::operator(api, "relay", &ca, "not-the-token".into()).unwrap();
    let e = wrong.request("GET", "/v1/vms", vec![]).await.unwrap_err();
    assert!(e.contains("wrong_token"), "{e}");
    let relay_cert = HeartbeatClient::new(api, "relay", &fb.site.pki_dir, "relay").unwrap();
    let e = relay_cert
        .request("GET", "/v1/vms", vec![])
        .await
        .unwrap_err();
    assert!(e.contains("token_required"), "{e}");
    // An operator certificate of the site CA may.
    let ca_dir = fb.site.root.join("config-server").join("pki");
    fb.site
        .relay_command(&[
            "pki",
            "issue",
            "--dir",
            ca_dir.to_str().unwrap(),
            "--name",
            "operator",
            "--role",
            "operator",
        ])
        .unwrap();
    let by_cert = HeartbeatClient::new(api, "relay", &ca_dir, "operator").unwrap();
    by_cert.request("GET", "/v1/vms", vec![]).await.unwrap();

    // Refusals say what is wrong and what to do, and change nothing.
    let refused = |body: serde_json::Value| async move {
        op.post("/v1/jobs", body).await.unwrap_err().to_string()
    };
    let e = refused(serde_json::json!({
        "operation": {"operation": "failover", "point": "latest", "planned": false},
        "vms": ["vm1"],
    }))
    .await;
    assert!(
        e.contains("wrong_state") && e.contains("UNPROTECTED"),
        "{e}"
    );
    assert!(e.contains("; run the operation"), "a remedy: {e}");
    let e =
        refused(serde_json::json!({"operation": {"operation": "commit"}, "vms": ["vm9"]})).await;
    assert!(e.contains("unknown_vm"), "{e}");
    let e =
        refused(serde_json::json!({"operation": {"operation": "commit"}, "vms": ["vm1", "vm1"]}))
            .await;
    assert!(e.contains("bad_request"), "{e}");
    let e =
        refused(serde_json::json!({"operation": {"operation": "format_disks"}, "vms": ["vm1"]}))
            .await;
    assert!(e.contains("bad_request"), "{e}");
    let e = op.get("/v1/jobs?colour=red").await.unwrap_err().to_string();
    assert!(e.contains("unknown filter"), "{e}");
    let e = op.get("/v1/nothing").await.unwrap_err().to_string();
    assert!(e.contains("not_found"), "{e}");
    assert!(op.get("/v1/jobs").await.unwrap()["jobs"]
        .as_array()
        .unwrap()
        .is_empty());

    // Eight requests at once with one key: one job.
    let body = serde_json::json!({
        "operation": {"operation": "reprotect", "location": "original"},
        "vms": ["vm1"],
        "idempotency_key": "once",
    });
    let token = std::fs::read_to_string(fb.site.root.join("config-server/operator.token")).unwrap();
    let client = HeartbeatClient::operator(api, "relay", &ca, token.trim().into()).unwrap();
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, body) = (client.clone(), serde_json::to_vec(&body).unwrap());
        asks.spawn(async move { client.request("POST", "/v1/jobs", body).await });
    }
    let mut ids = Vec::new();
    while let Some(answer) = asks.join_next().await {
        let doc: serde_json::Value = serde_json::from_slice(&answer.unwrap().unwrap()).unwrap();
        ids.push(doc["job"]["id"].as_u64().unwrap());
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let listed = op.get("/v1/jobs?operation=reprotect").await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    // A second job on the same VM is refused while it runs.
    let e = refused(serde_json::json!({
        "operation": {"operation": "reprotect", "location": "original"},
        "vms": ["vm1"],
    }))
    .await;
    assert!(e.contains("job_running"), "{e}");

    // Cancelled before its last wait: it says what was undone.
    let cancelled = op
        .post(
            &format!("/v1/jobs/{}/cancel", ids[0]),
            serde_json::json!({}),
        )
        .await
        .unwrap();
    let said = cancelled["said"].as_str().unwrap();
    assert!(
        said.contains("cancelled") && said.contains("UNPROTECTED"),
        "{said}"
    );
    let e = op
        .post(
            &format!("/v1/jobs/{}/cancel", ids[0]),
            serde_json::json!({}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not_cancellable"), "{e}");
    let listed = op.get("/v1/jobs?state=cancelled&vm=vm1").await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");

    // `relay ctl`, the operator's command line, over the same API.
    let token_file = fb.site.root.join("config-server/operator.token");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(fbr_churn::harness::bin_path("relay").unwrap())
            .arg("ctl")
            .arg("--server")
            .arg(api.to_string())
            .arg("--ca")
            .arg(&ca)
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .env_remove("FBR_OPERATOR_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = ctl(&["--json", "vms"]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(doc["vms"].as_array().unwrap().len(), 2, "{doc}");
    let (code, out, _) = ctl(&["vms"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("UNPROTECTED") && out.starts_with("VM"),
        "{out}"
    );
    // Following a job that was cancelled: its steps are shown, and the exit status
    // says it did not succeed.
    let (code, out, _) = ctl(&["job", &ids[0].to_string(), "--wait"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cancelled") && out.contains("resync"), "{out}");
    let (code, _, err) = ctl(&["failover", "--vm", "vm2", "--point", "yesterday"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("latest-processed"), "{err}");
    let (code, _, err) = ctl(&["failover", "--vm", "vm2", "--point", "latest"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("wrong_state") && err.contains("UNPROTECTED"),
        "{err}"
    );
    let (code, out, err) = ctl(&["estimate", "--vm", "vm2", "--planned"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("data-loss window"), "{out}");
    // An estimate names what it does not know rather than guessing.
    let est = op
        .post(
            "/v1/estimate",
            serde_json::json!({"vms": ["vm2"], "point": "latest", "planned": true}),
        )
        .await
        .unwrap();
    assert!(est["estimate"]["boot_s"].as_f64().is_some(), "{est}");
    fb.stop_and_verify(&BTreeMap::new(), 8 << 20).await.unwrap();
}
