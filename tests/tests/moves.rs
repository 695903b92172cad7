//! Moving a VM between relays (Azure Site Recovery's "switch process server"), end to
//! end: a real `config-server`, `master-target`, two `relay`s and the agent emulator on
//! loopback, the move asked with `config-server move` as an operator would.
//!
//! - With a backlog under churn: the old relay (its WAN leg slower than the churn)
//!   holds megabytes of the VM when the move is asked; the agent stops the VM's new
//!   writes, the old relay drains them to the master target, and the VM goes on through
//!   the new relay from the master target's high-water mark: no resync, every recovery
//!   point byte-exact, the other VM undisturbed on the old relay, and the old relay
//!   told by the master target that its copy is stale, so it forgets it. The move and
//!   the VM's new place (inventory) outlive a kill -9 of the configuration server.
//! - Off a killed relay: the relay dies with the VM's backlog; the configuration server
//!   sees it disconnected, so the move does not wait for a drain: the VM's disks
//!   continue at the master target's position and a delta resync replaces what died
//!   with the relay. When the killed relay comes back with the stale copy in its
//!   cache, the master target refuses it (placement) and the relay forgets it; every
//!   recovery point is still byte-exact.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::{Duration, Instant};

use fbr_churn::agent::{self, DiskPlan, RunHandle};
use fbr_churn::harness::{http_get, sample, Site};
use fbr_churn::workload::Content;
use fbr_enroll::heartbeat::HeartbeatClient;
use fbr_tests::{agent_options, eventually, plans, site_options, stop_and_verify};

/// A site for `vm1` and `vm2` enrolled through its configuration server, with two
/// relays (`relay`, `relay-b`) whose WAN legs are limited to `egress` and which report
/// every second; the master target and both relays running.
fn moving_site(egress: &str) -> Site {
    let mut site = Site::create(None, site_options(&["vm1", "vm2"])).unwrap();
    let server = site.enroll_through_config_server().unwrap();
    site.enroll_relay_b().unwrap();
    let heartbeats = [
        "--config-server".to_owned(),
        server.to_string(),
        "--heartbeat-interval-s".to_owned(),
        "1".to_owned(),
    ];
    site.relay_args_mut().extend(heartbeats.clone());
    site.relay_args_mut()
        .extend(["--egress-schedule".to_owned(), format!("other {egress}")]);
    // LZ4 only: these tests need a backlog on a slow leg, and with zstd's history the
    // mixed churn shrinks so much that the leg keeps up. (With a larger backlog, from
    // random content or a 2 Mbit/s leg, the agent never reconnected to relay-b within
    // 60 s when these tests ran side by side, with zstd or without: an open bug of the
    // move's switch, not of the codecs.)
    site.relay_args_mut()
        .extend(["--wan-zstd-level".to_owned(), "0".to_owned()]);
    site.master_target_args_mut().extend(heartbeats);
    site.start_master_target().unwrap();
    site.start_relay().unwrap();
    site.start_relay_b().unwrap();
    site
}

/// The agent's own client of the configuration server (its site certificate).
fn agent_client(site: &Site) -> HeartbeatClient {
    HeartbeatClient::new(
        site.config_server_addr().unwrap(),
        "localhost",
        &site.pki_dir,
        "agent",
    )
    .unwrap()
}

/// Waits until the configuration server shows the relays in `want` (name, state) and
/// `relay-b` advertising where agents reach it.
async fn relays_shown(client: &HeartbeatClient, want: &[(&str, &str)]) {
    eventually(20, "the relays' states", || async {
        let body = client
            .request("GET", "/v1/components", Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let components = v["components"].as_array().cloned().unwrap_or_default();
        let find = |name: &str| components.iter().find(|c| c["name"] == name).cloned();
        for (name, state) in want {
            let c = find(name).ok_or(format!("{name} missing"))?;
            if c["state"] != *state {
                return Err(format!("{name} is {}", c["state"]));
            }
        }
        match find("relay-b").map(|c| c["advertise"].clone()) {
            Some(serde_json::Value::String(_)) => Ok(()),
            other => Err(format!("relay-b advertises {other:?}")),
        }
    })
    .await;
}

/// Starts the churn (a steady `rate` in total), following the configuration server's
/// assignments as a real agent does.
fn start_churn(
    site: &Site,
    plans: Vec<DiskPlan>,
    seconds: u64,
    rate: u64,
) -> (RunHandle, tokio::task::JoinHandle<()>) {
    let mut opts = agent_options(
        site,
        Duration::from_secs(seconds),
        Duration::from_millis(250),
    );
    opts.rate_bytes_per_s = Some(rate);
    opts.drain_timeout = Duration::from_secs(90);
    let handle = agent::start(opts, plans, 91).unwrap();
    let follower = tokio::spawn(fbr_churn::moves::follow_assignments(
        handle.mover(),
        agent_client(site),
        Duration::from_millis(200),
        Duration::from_secs(30),
    ));
    (handle, follower)
}

/// `config-server move --vm vm1 --to relay-b --wait --json`, as an operator runs it:
/// the move as it ended.
async fn move_vm1_to_relay_b(site: &Site) -> serde_json::Value {
    let out = tokio::task::block_in_place(|| {
        site.config_server_command(&["move", "--vm", "vm1", "--to", "relay-b", "--wait", "--json"])
    })
    .unwrap();
    let last = out.lines().last().unwrap().to_owned();
    serde_json::from_str(&last).unwrap()
}

fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics");
    sample(&body, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_moved_with_a_backlog_under_churn_drains_first_and_every_point_is_exact() {
    let mut site = tokio::task::block_in_place(|| moving_site("8mbit"));
    let client = agent_client(&site);
    relays_shown(&client, &[("relay", "connected"), ("relay-b", "connected")]).await;
    // 4 MB/s of churn over a 1 MB/s WAN leg (compression gives back some): the old
    // relay's backlog grows.
    let (handle, follower) = start_churn(
        &site,
        plans(2, 1, 32 << 20, Content::Mixed, 91),
        9,
        4_000_000,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requested = Instant::now();
    let m = move_vm1_to_relay_b(&site).await;
    let seconds = requested.elapsed().as_secs_f64();
    assert_eq!(m["phase"], "done", "{m}");
    assert_eq!(m["drain"], true, "{m}");
    assert!(m["fell_back"].is_null(), "{m}");
    let to_drain = m["bytes_to_drain"].as_u64().unwrap();
    assert!(to_drain > 256 << 10, "a backlog to drain: {m}");
    assert_eq!(m["bytes_drained"].as_u64(), Some(to_drain), "{m}");
    eprintln!(
        "move under load: {to_drain} bytes drained in {:.2} s, move done {seconds:.2} s after it was asked",
        m["drain_ms"].as_u64().unwrap() as f64 / 1000.0
    );

    let report = handle.finish().await.unwrap();
    follower.abort();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    for d in &report.manifest.disks {
        assert!(
            d.renumbers.is_empty() && d.resync_runs.is_empty(),
            "{}: a drained move needs no resync",
            d.vm
        );
    }
    // The new relay took vm1 over; the master target saw it move; the old relay, told
    // its copy is stale, forgot it.
    let (relay_a, relay_b) = (
        site.relay_metrics_addr().unwrap(),
        site.relay_b_metrics_addr().unwrap(),
    );
    assert_eq!(metric(relay_b, "fbr_relay_streams_moved_in_total"), 1.0);
    assert_eq!(
        metric(
            site.master_target_metrics_addr().unwrap(),
            "fbr_master_target_stream_moves_total"
        ),
        1.0
    );
    eventually(20, "the old relay forgets the moved stream", || async {
        match metric(relay_a, "fbr_relay_streams_moved_away_total") {
            1.0 => Ok(()),
            n => Err(format!("{n}")),
        }
    })
    .await;
    assert_eq!(
        metric(
            site.config_server_metrics_addr().unwrap(),
            "fbr_config_server_moves_total{phase=\"done\"}"
        ),
        1.0
    );
    // The move and the VM's new place outlive a kill -9 of the configuration server.
    tokio::task::block_in_place(|| {
        site.stop_config_server(true).unwrap();
        site.start_config_server().unwrap();
    });
    let moves = tokio::task::block_in_place(|| site.config_server_command(&["moves"])).unwrap();
    assert!(
        moves.contains("vm1 from relay to relay-b (placement 1): done"),
        "{moves}"
    );
    let body = client
        .request("GET", "/v1/inventory", Vec::new())
        .await
        .unwrap();
    let inventory: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let vm1 = inventory["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "vm1")
        .unwrap();
    assert_eq!(
        (&vm1["assigned_relay"], &vm1["placement"]),
        (&"relay-b".into(), &1.into())
    );
    tokio::task::block_in_place(|| site.stop_relay_b(false)).unwrap();
    let verified = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(verified.recovery_points_verified > 10, "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_moved_off_a_killed_relay_resyncs_and_the_stale_copy_is_refused() {
    let mut site = tokio::task::block_in_place(|| moving_site("8mbit"));
    let client = agent_client(&site);
    relays_shown(&client, &[("relay", "connected"), ("relay-b", "connected")]).await;
    let sources = site.root.join("sources");
    std::fs::create_dir_all(&sources).unwrap();
    let mut disks = plans(2, 1, 16 << 20, Content::Mixed, 92);
    for d in &mut disks {
        d.start.disk_file = Some(sources.join(format!("{}-disk{}.img", d.id.vm, d.id.disk)));
    }
    let (handle, follower) = start_churn(&site, disks, 10, 4_000_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The old relay dies holding the VMs' backlog (its WAN leg is slower than churn).
    tokio::task::block_in_place(|| site.stop_relay(true)).unwrap();
    relays_shown(
        &client,
        &[("relay", "disconnected"), ("relay-b", "connected")],
    )
    .await;
    let requested = Instant::now();
    let m = move_vm1_to_relay_b(&site).await;
    eprintln!(
        "move off a killed relay: done (resynced) {:.2} s after it was asked",
        requested.elapsed().as_secs_f64()
    );
    assert_eq!(m["phase"], "done", "{m}");
    assert_eq!(m["drain"], false, "a lost relay is not drained: {m}");
    assert_eq!(m["fell_back"], "the old relay is disconnected", "{m}");

    // The killed relay comes back with vm1's stale records in its cache: the master
    // target refuses them, and the relay forgets them. vm2 continues through it.
    tokio::task::block_in_place(|| site.start_relay()).unwrap();
    let relay_a = site.relay_metrics_addr().unwrap();
    eventually(
        30,
        "the restarted relay forgets the moved stream",
        || async {
            match metric(relay_a, "fbr_relay_streams_moved_away_total") {
                1.0 => Ok(()),
                n => Err(format!("{n}")),
            }
        },
    )
    .await;
    let report = handle.finish().await.unwrap();
    follower.abort();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let vm1 = report
        .manifest
        .disks
        .iter()
        .find(|d| d.vm == "vm1")
        .unwrap();
    assert!(
        !vm1.renumbers.is_empty() && !vm1.resync_runs.is_empty(),
        "vm1 renumbered at the master target's position and resynced"
    );
    assert!(
        metric(
            site.master_target_metrics_addr().unwrap(),
            "fbr_master_target_stream_errors_total{code=\"stream_moved\"}"
        ) >= 1.0
    );
    tokio::task::block_in_place(|| site.stop_relay_b(false)).unwrap();
    let verified = tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
    assert!(verified.recovery_points_verified > 10, "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_or_senseless_move_requests_get_coded_errors() {
    let mut site = Site::create(None, site_options(&["vm1"])).unwrap();
    tokio::task::block_in_place(|| {
        site.enroll_through_config_server().unwrap();
        site.enroll_relay_b().unwrap();
    });
    let server = site.config_server_addr().unwrap();
    let ca = site.root.join("config-server/pki/ca.pem");
    let token = std::fs::read_to_string(site.root.join("config-server/operator.token")).unwrap();
    let operator =
        HeartbeatClient::operator(server, "127.0.0.1", &ca, token.trim().into()).unwrap();
    let impostor = HeartbeatClient::operator(server, "127.0.0.1", &ca, "f00d".repeat(16)).unwrap();
    let agent = agent_client(&site);
    let code = |r: Result<bytes::Bytes, String>| {
        let e = r.expect_err("refused");
        e.rsplit_once('(')
            .map(|(_, c)| c.trim_end_matches(')').to_owned())
            .unwrap_or(e)
    };
    let request = |vm: &str, relay: &str| {
        format!(r#"{{"version": 1, "vm": "{vm}", "relay": "{relay}"}}"#).into_bytes()
    };
    // Who may ask: the operator's token, not a component's certificate or another token.
    assert_eq!(
        code(
            agent
                .request("POST", "/v1/moves", request("vm1", "relay-b"))
                .await
        ),
        "token_required"
    );
    assert_eq!(
        code(
            impostor
                .request("POST", "/v1/moves", request("vm1", "relay-b"))
                .await
        ),
        "wrong_token"
    );
    assert_eq!(
        code(impostor.request("GET", "/v1/moves", vec![]).await),
        "wrong_token"
    );
    // What may be asked.
    let post = |body: Vec<u8>| operator.request("POST", "/v1/moves", body);
    assert_eq!(code(post(b"{not json".to_vec()).await), "bad_json");
    assert_eq!(
        code(post(br#"{"version": 1, "vm": "vm1"}"#.to_vec()).await),
        "bad_json"
    );
    assert_eq!(
        code(post(br#"{"version": 2, "vm": "vm1", "relay": "relay-b"}"#.to_vec()).await),
        "unsupported_version"
    );
    assert_eq!(code(post(request("../etc", "relay-b")).await), "bad_name");
    assert_eq!(code(post(request("vm9", "relay-b")).await), "unknown_vm");
    assert_eq!(code(post(request("vm1", "relay-z")).await), "unknown_relay");
    // relay-b has not said where agents reach it (it never ran).
    assert_eq!(
        code(post(request("vm1", "relay-b")).await),
        "relay_unreachable"
    );
    assert_eq!(code(post(vec![b' '; 70 * 1024]).await), "body_too_large");
    // Moves that do not exist, and reports about them.
    assert_eq!(
        code(operator.request("GET", "/v1/moves/7", vec![]).await),
        "unknown_move"
    );
    assert_eq!(
        code(operator.request("GET", "/v1/moves/x", vec![]).await),
        "unknown_move"
    );
    assert_eq!(
        code(operator.request("DELETE", "/v1/moves/7", vec![]).await),
        "method_not_allowed"
    );
    let progress = br#"{"version": 1, "phase": "done", "bytes_to_drain": 1, "bytes_drained": 2, "drain_ms": 0}"#;
    assert_eq!(
        code(
            agent
                .request("POST", "/v1/moves/7/progress", progress.to_vec())
                .await
        ),
        "bad_progress"
    );
    assert_eq!(
        code(
            operator
                .request("POST", "/v1/moves/7/progress", progress.to_vec())
                .await
        ),
        "certificate_required"
    );
    // The CLI says the same, with the code.
    let refused = tokio::task::block_in_place(|| {
        site.config_server_command(&["move", "--vm", "vm9", "--to", "relay-b"])
    });
    assert!(refused.unwrap_err().to_string().contains("(unknown_vm)"));
    let listed = tokio::task::block_in_place(|| site.config_server_command(&["moves"])).unwrap();
    assert_eq!(listed.trim(), "no moves");
}
