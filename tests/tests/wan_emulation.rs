//! Replication through an emulated WAN (`fbr_churn::wanemu`): the master target behind
//! delay, loss and a path MTU below 1,400 (the kernel's netem in a network namespace
//! the test makes, or, where the kernel lacks netem or namespaces cannot be made, the
//! same impairments from a UDP proxy on loopback), and a link that drops for 60 s and
//! returns. Every recovery point must verify byte for byte; during the outage the relay
//! must say it is not ready, and why.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::Duration;

use fbr_churn::netem::LinkShape;
use fbr_churn::wanemu::{run_case, WanCase};
use fbr_churn::workload::Content;

fn case(name: &str, shape: LinkShape, congestion: &'static str) -> WanCase {
    WanCase {
        name: name.into(),
        shape,
        outage: None,
        seconds: 8.0,
        streams: 4,
        disk_size: 16 << 20,
        rate_mb: Some(2.0),
        content: Content::Mixed,
        congestion,
    }
}

/// 80 ms round trip, 1% loss each way, a 1,380-byte path MTU (QUIC's path MTU
/// discovery must settle below its 1,452 probe), 100 Mbit/s: with BBR the relay keeps
/// up with the churn, and every point is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_exact_through_delay_loss_and_a_small_path_mtu() {
    let shape = LinkShape {
        rtt: Duration::from_millis(80),
        loss_percent: 1.0,
        rate_mbit: Some(100),
        mtu: Some(1380),
    };
    let r = run_case(&case("lossy", shape, "bbr"), false).await.unwrap();
    assert!(r.verified, "{:?}", r.errors);
    assert!(r.recovery_points_verified >= 5, "{r:?}");
    // The link carried the churn (2 MB/s of mixed content, reduced), not nothing.
    assert!(r.delivered_mbit_per_s > 1.0, "{r:?}");
}

/// The link drops every packet for 60 s, then returns: the relay's cache absorbs the
/// churn, `/readyz` says the master target is unreachable, and once the link is back
/// the backlog drains and every point verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_for_a_minute_loses_nothing() {
    let shape = LinkShape {
        rtt: Duration::from_millis(40),
        loss_percent: 0.1,
        rate_mbit: Some(100),
        mtu: None,
    };
    let mut c = case("outage", shape, "cubic");
    c.outage = Some(Duration::from_secs(60));
    c.seconds = 6.0;
    c.rate_mb = Some(1.0);
    let r = run_case(&c, false).await.unwrap();
    assert!(r.verified, "{:?}", r.errors);
    assert!(r.recovery_points_verified >= 60, "{r:?}");
    let (status, body) = r.readyz_during_outage.clone().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("master target"), "{body}");
}
