//! WAN reductions end to end: every recovery point stays byte-exact with dedup,
//! compression and coalescing on, when references must be resent (the master target's
//! content index evicts, or it restarts), when a referenced block was overwritten since,
//! and with coalescing on and off.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::Duration;

use bytes::Bytes;
use fbr_churn::harness::{Site, SiteOptions};
use fbr_churn::workload::Content;
use fbr_protocol::{Frame, Record, TagKind};
use fbr_tests::{agent_options, http_get, plans, sample, stop_and_verify, RawAgent};

fn site(relay_args: &[&str], mt_args: &[&str]) -> Site {
    let mut site = Site::create(
        None,
        SiteOptions {
            agent_vms: vec!["vm1".into(), "vm2".into()],
            cache_capacity: 256 << 20,
            cache_segment_mib: 4,
            mt_credit_mib: 8,
            max_udp_payload: 1452,
            relay_args: relay_args.iter().map(|s| s.to_string()).collect(),
            mt_args: mt_args.iter().map(|s| s.to_string()).collect(),
        },
    )
    .unwrap();
    site.start_master_target().unwrap();
    site.start_relay().unwrap();
    site
}

fn relay_metric(site: &Site, series: &str) -> f64 {
    // (The relay's metrics, read while it runs.)
    let (_, text) = http_get(site.relay_metrics_addr().unwrap(), "/metrics");
    sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

fn tag(seq: u64, id: u64) -> Frame {
    Frame::Record(Record::Tag {
        seq,
        id,
        kind: TagKind::Crash,
        members: 1,
        group: "g".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_overwritten_since_is_still_resolved_by_reference() {
    let mut site = site(&[], &[]);
    let agent = RawAgent::connect(&site).await;
    let disk = 1 << 20;
    let (mut s, next) = agent.open_disk("vm1", 0, disk).await;
    assert_eq!(next, 1);
    let block = |b: u8| Bytes::from((0..4096).map(|i| (i as u8) ^ b).collect::<Vec<u8>>());
    let write = |seq, offset, data: Bytes| Frame::Record(Record::Write { seq, offset, data });
    // X at A, then A overwritten with Y: X now lives only in the journal.
    s.send_frame(&write(1, 0, block(0x11))).await;
    s.send_frame(&tag(2, 1)).await;
    s.send_frame(&write(3, 0, block(0x22))).await;
    s.send_frame(&tag(4, 2)).await;
    s.wait_applied(4).await;
    // X again, at B: the relay knows the master target holds it and sends its hash.
    s.send_frame(&write(5, 65536, block(0x11))).await;
    s.send_frame(&tag(6, 3)).await;
    s.wait_applied(6).await;
    assert!(relay_metric(&site, "fbr_relay_dedup_hits_total") >= 1.0);
    let (_, mt_text) = http_get(site.master_target_metrics_addr().unwrap(), "/metrics");
    assert!(
        sample(
            &mt_text,
            "fbr_master_target_dedup_references_resolved_total"
        )
        .unwrap()
            >= 1.0
    );
    drop(s);
    agent.conn.close(0u32.into(), b"done");
    tokio::task::block_in_place(|| {
        site.stop_relay(false).unwrap();
        site.stop_master_target(false).unwrap();
    });
    // Recovery point 3: A holds Y, B holds X, byte for byte.
    let id = fbr_protocol::StreamId {
        vm: "vm1".into(),
        disk: 0,
    };
    let mut img = fbr_master_target::journal::MemoryImage(vec![0; disk as usize]);
    fbr_master_target::journal::replay(
        &fbr_master_target::files::journal_path(&site.mt_data, &id),
        6,
        &mut img,
    )
    .unwrap();
    assert_eq!(&img.0[..4096], &block(0x22)[..]);
    assert_eq!(&img.0[65536..65536 + 4096], &block(0x11)[..]);
}

/// What the relay counted during a run.
#[derive(Debug)]
struct Counted {
    dedup_hits: f64,
    unknown_references: f64,
    logical: f64,
    coalesced: f64,
    compressed: f64,
    zstd_batches: f64,
    lz4_batches: f64,
    plain_batches: f64,
}

/// Churns `content` while `disrupt` runs, waits for the relay to drain, reads its
/// counters, then verifies every recovery point.
async fn churn_and_verify(
    site: Site,
    content: Content,
    disrupt: impl FnOnce(&mut Site),
) -> Counted {
    churn_disks_and_verify(site, 1, content, disrupt, |_| {}).await
}

/// [`churn_and_verify`] with `disks` disks per VM; `during` reads the relay's and the
/// master target's metrics once the churn has run a while.
async fn churn_disks_and_verify(
    mut site: Site,
    disks: u32,
    content: Content,
    disrupt: impl FnOnce(&mut Site),
    during: impl FnOnce(&Site),
) -> Counted {
    let opts = agent_options(&site, Duration::from_secs(4), Duration::from_millis(250));
    let disk_size = (16 << 20) / u64::from(disks);
    let handle =
        fbr_churn::agent::start(opts, plans(2, disks, disk_size, content, 71), 71).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| disrupt(&mut site));
    tokio::task::block_in_place(|| during(&site));
    let report = handle.finish().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // Wait for the relay to drain before reading its counters.
    tokio::task::block_in_place(|| {
        let addr = site.relay_metrics_addr().unwrap();
        for _ in 0..600 {
            let (_, t) = http_get(addr, "/metrics");
            if fbr_churn::harness::sample_sum(&t, "fbr_relay_cache_backlog_bytes", &[]) == 0.0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (_, text) = http_get(site.relay_metrics_addr().unwrap(), "/metrics");
    // Forwarding stages as the forwarders counted them (resends after a reconnect
    // included in both).
    let stage = |s: &str| {
        fbr_churn::harness::sample_sum(&text, "fbr_relay_vm_bytes_total", &[("stage", s)])
    };
    let codec = |c: &str| {
        fbr_churn::harness::sample_sum(&text, "fbr_relay_codec_batches_total", &[("codec", c)])
    };
    let counted = Counted {
        zstd_batches: codec("zstd"),
        lz4_batches: codec("lz4"),
        plain_batches: codec("none"),
        compressed: stage("compressed"),
        dedup_hits: sample(&text, "fbr_relay_dedup_hits_total").unwrap(),
        unknown_references: sample(&text, "fbr_relay_unknown_references_total").unwrap(),
        logical: stage("logical"),
        coalesced: stage("coalesced"),
    };
    eprintln!("{counted:?}");
    let manifest = report.manifest.clone();
    let v = tokio::task::block_in_place(|| stop_and_verify(&mut site, &manifest));
    // 4 s of churn cuts a point every 250 ms (about 16); on a loaded CI machine, with
    // this file's tests running side by side, the agents have cut as few as 9.
    assert!(v.recovery_points_verified >= 6, "{v:?}");
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_content_index_forces_resends_and_stays_exact() {
    // 16 blocks of index: most references the relay makes are gone by the time they
    // arrive, so the master target asks for the data again and again.
    let site = site(&[], &["--content-index-entries", "16"]);
    let c = churn_and_verify(site, Content::Dup, |_| {}).await;
    assert!(c.unknown_references > 0.0, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_target_restart_loses_its_index_and_nothing_else() {
    let site = site(&[], &[]);
    let c = churn_and_verify(site, Content::Dup, |site| {
        site.stop_master_target(false).unwrap();
        site.start_master_target().unwrap();
    })
    .await;
    assert!(c.dedup_hits > 0.0, "{c:?}");
    assert!(
        c.unknown_references > 0.0,
        "the relay's stale references were refused: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_on_and_off_both_stay_exact_through_a_backlog() {
    for coalesce in ["true", "false"] {
        let site = site(&["--wan-coalesce", coalesce], &[]);
        // An outage builds a backlog: whole intervals are then coalesced (when on).
        let c = churn_and_verify(site, Content::Random, |site| {
            site.stop_master_target(false).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            site.start_master_target().unwrap();
        })
        .await;
        if coalesce == "true" {
            assert!(
                c.coalesced < 0.95 * c.logical,
                "superseded writes were left out: {c:?}"
            );
        } else {
            assert_eq!(c.coalesced, c.logical, "{c:?}");
        }
    }
}

/// Every codec keeps every recovery point exact, through a master-target restart (a
/// reconnect: both ends start a new zstd context, and nothing of the old history is
/// used); zstd is used whenever both ends allow it, LZ4 when either says no.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_stays_exact_through_a_reconnect() {
    let cases: [(&[&str], &[&str], &str); 4] = [
        (&[], &[], "zstd"),
        (&["--wan-zstd-level", "0"], &[], "lz4"),
        (&[], &["--codec-memory-mib", "0"], "lz4"),
        (&["--wan-compression", "off"], &[], "none"),
    ];
    let mut zstd_bytes = 0.0;
    for (relay_args, mt_args, expected) in cases {
        // A link slower than the churn: the link, not the relay's CPU, is the
        // bottleneck, so the relay spends CPU for ratio (zstd) where it may.
        let link = ["--egress-schedule", "other 100mbit"];
        let site = site(&[relay_args, &link[..]].concat(), mt_args);
        let c = churn_and_verify(site, Content::Text, |site| {
            site.stop_master_target(false).unwrap();
            site.start_master_target().unwrap();
        })
        .await;
        eprintln!("{expected}: {c:?}");
        match expected {
            "zstd" => {
                assert!(c.zstd_batches > c.lz4_batches, "{c:?}");
                zstd_bytes = c.compressed / c.logical;
            }
            "lz4" => {
                assert!(c.zstd_batches == 0.0 && c.lz4_batches > 0.0, "{c:?}");
                assert!(
                    zstd_bytes < c.compressed / c.logical,
                    "zstd with its history sends fewer bytes than LZ4 on text: {zstd_bytes} vs {c:?}"
                );
            }
            _ => assert!(
                c.zstd_batches + c.lz4_batches == 0.0 && c.plain_batches > 0.0,
                "{c:?}"
            ),
        }
    }
}

/// Many streams against small codec pools: the contexts never take more than either
/// cap (the relay's shares buy no context of their own: its streams are framed, from a
/// shared pool), the streams that found the master target's pool spent go with LZ4, and
/// every point is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_memory_stays_under_its_cap_with_many_streams() {
    let site = site(
        &["--wan-codec-memory-mib", "8"],
        &["--codec-memory-mib", "6"],
    );
    let c = churn_disks_and_verify(
        site,
        8,
        Content::Text,
        |_| {},
        |site| {
            let (_, relay) = http_get(site.relay_metrics_addr().unwrap(), "/metrics");
            let (_, mt) = http_get(site.master_target_metrics_addr().unwrap(), "/metrics");
            let relay = sample(&relay, "fbr_relay_codec_memory_bytes").unwrap();
            let mt = sample(&mt, "fbr_master_target_codec_memory_bytes").unwrap();
            eprintln!("codec memory: relay {relay}, master target {mt}");
            assert!(relay > 0.0 && relay <= (8 << 20) as f64, "relay {relay}");
            assert!(mt > 0.0 && mt <= (6 << 20) as f64, "master target {mt}");
        },
    )
    .await;
    assert!(c.zstd_batches > 0.0 && c.lz4_batches > 0.0, "{c:?}");
}
