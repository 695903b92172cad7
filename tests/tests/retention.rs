//! Bounded retention, end to end: a master target keeping a 3 s window for one group
//! (its own, configured apart from the daemon-wide 15 days) trims the oldest history
//! while churn goes on. Afterwards:
//! - the points listed all lie inside the window, and the oldest ones are gone;
//! - the journals' trimmed blocks are freed (holes), while their offsets stay;
//! - `churn verify` proves every kept point byte for byte, starting from where each
//!   journal now starts (the image with its before-images put back);
//! - a rollback to the oldest kept point equals `materialize` of it;
//! - the relay's dedup references to blocks of trimmed history were never resolved (the
//!   master target found them stale) but resent as bytes.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use fbr_churn::harness::{http_get, sample, Site, SiteOptions};
use fbr_churn::workload::Content;
use fbr_tests::{
    agent_options, churn, master_target, materialize_point, plans, start_site_keeping_group1_for,
    stop_and_verify,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_three_seconds_trims_the_oldest_history_and_keeps_every_point_in_it() {
    let mut site = start_site_keeping_group1_for("3s");
    // Long enough for checkpoints (every 10 s) to pass points outside the window.
    let mut opts = agent_options(&site, Duration::from_secs(16), Duration::from_millis(200));
    opts.rate_bytes_per_s = Some(4_000_000);
    let report = churn(opts, plans(2, 1, 8 << 20, Content::Mixed, 47), 47).await;
    let first_tag = report.manifest.disks[0].tags[0].id;
    // Trimming runs a few times a window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A third of the writes repeat a small pool of blocks, so the relay keeps sending
    // references to their first copies, which trimming punched out.
    let (mt_metrics, relay_metrics) = tokio::task::block_in_place(|| {
        (
            http_get(site.master_target_metrics_addr().unwrap(), "/metrics").1,
            http_get(site.relay_metrics_addr().unwrap(), "/metrics").1,
        )
    });
    let stale = sample(
        &mt_metrics,
        "fbr_master_target_dedup_references_stale_total",
    )
    .unwrap();
    let resolved = sample(
        &mt_metrics,
        "fbr_master_target_dedup_references_resolved_total",
    )
    .unwrap();
    let resent = sample(&relay_metrics, "fbr_relay_unknown_references_total").unwrap();
    eprintln!("references: {resolved} resolved, {stale} stale (trimmed), {resent} resends");
    assert!(
        stale > 0.0 && resent > 0.0 && resolved > 0.0,
        "references into trimmed history: {stale} stale, {resent} resends, {resolved} resolved"
    );
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));

    let data = site.mt_data.to_str().unwrap().to_owned();
    let listing: serde_json::Value =
        serde_json::from_str(&master_target(&["points", "--data", &data, "--json"])).unwrap();
    let window = &listing["groups"][0]["window"];
    let oldest = window["oldest_tag"].as_u64().unwrap();
    let newest = window["newest_tag"].as_u64().unwrap();
    assert!(
        oldest > first_tag + 10,
        "the oldest history was trimmed: oldest kept {oldest}, first {first_tag}"
    );
    // Inside the window, give or take the checkpoint that trimming waits for (10 s).
    let span =
        window["newest_time_ms"].as_u64().unwrap() - window["oldest_time_ms"].as_u64().unwrap();
    assert!(span <= 14_000, "kept {span} ms of points for a 3 s window");
    assert!(newest > oldest, "{window}");
    for vm in ["vm1", "vm2"] {
        let journal = site.mt_data.join(format!("disks/{vm}/disk0/journal.fbrj"));
        let m = std::fs::metadata(&journal).unwrap();
        assert!(
            m.blocks() * 512 < m.len() / 2,
            "{vm}: trimmed blocks are freed ({} of {} bytes allocated)",
            m.blocks() * 512,
            m.len()
        );
    }

    // Back to the oldest kept point: what materialize makes of it.
    let tag = oldest.to_string();
    let scratch = tempfile::tempdir().unwrap();
    let expected = materialize_point(&data, "group1", oldest, &["vm1", "vm2"], scratch.path());
    master_target(&[
        "rollback", "--data", &data, "--group", "group1", "--tag", &tag,
    ]);
    for (vm, want) in expected {
        let got = std::fs::read(site.mt_data.join(format!("disks/{vm}/disk0/image.raw"))).unwrap();
        assert!(
            got == want,
            "{vm}: rolled back to {tag}, it differs from materialize"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_cap_bounds_the_journals_under_churn() {
    const CAP: u64 = 4 << 20;
    let mut site = Site::create(
        None,
        SiteOptions {
            agent_vms: vec!["vm1".into(), "vm2".into()],
            cache_capacity: 256 << 20,
            cache_segment_mib: 4,
            mt_credit_mib: 8,
            max_udp_payload: 1452,
            relay_args: vec![],
            mt_args: vec![
                "--retention-window".into(),
                "15d".into(),
                "--retention-max".into(),
                "4MiB".into(),
            ],
        },
    )
    .unwrap();
    site.start_master_target().unwrap();
    site.start_relay().unwrap();
    let mut opts = agent_options(&site, Duration::from_secs(24), Duration::from_millis(200));
    opts.rate_bytes_per_s = Some(1_000_000);
    let report = churn(opts, plans(2, 1, 8 << 20, Content::Mixed, 53), 53).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut allocated = 0;
    let mut written = 0;
    for vm in ["vm1", "vm2"] {
        let m =
            std::fs::metadata(site.mt_data.join(format!("disks/{vm}/disk0/journal.fbrj"))).unwrap();
        allocated += m.blocks() * 512;
        written += m.len();
    }
    // The cap, plus what trimming must keep after each disk's last checkpoint (10 s of
    // churn at most) and since the last pass (2 s): 12 s at 1 MB/s, at about 1.5
    // journal bytes per byte written, plus margin.
    eprintln!("journals: {allocated} bytes kept of {written} written");
    assert!(
        allocated <= CAP + 20_000_000,
        "{allocated} bytes of journal kept for a {CAP}-byte cap ({written} written)"
    );
    assert!(
        written > allocated + 8_000_000,
        "the cap was binding: {written} written"
    );
    tokio::task::block_in_place(|| stop_and_verify(&mut site, &report.manifest));
}
