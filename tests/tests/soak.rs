//! Two minutes of `churn soak` (`fbr_churn::soak`): steady churn while the relay and the
//! master target are killed with SIGKILL in turn and the WAN drops, through a 128 MiB
//! cache. Every recovery point must verify, and neither daemon's memory, open files or
//! threads may grow within one of its lives.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::time::Duration;

use fbr_churn::soak::{run, SoakOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_of_kills_and_drops_lose_nothing_and_leak_nothing() {
    let opts = SoakOptions {
        duration: Duration::from_secs(120),
        cycle: Duration::from_secs(20),
        streams: 8,
        rate_mb: 3.0,
        progress: true,
    };
    let r = run(&opts).await.unwrap();
    assert!(r.verified, "{:?} {:?}", r.errors, r.growth);
    assert!(
        r.relay_kills >= 1 && r.master_target_kills >= 1 && r.wan_drops >= 1,
        "{r:?}"
    );
    assert!(r.recovery_points_verified >= 60, "{r:?}");
    // The relay lived through at least one MT kill and one drop: its samples in that
    // life are what the growth check judged.
    assert!(r.relay.iter().filter(|s| s.life == 1).count() >= 2, "{r:?}");
}
