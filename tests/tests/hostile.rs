//! Hostile peers beside 100 honest streams (`fbr_churn::hostile`): a flood of handshakes
//! with a foreign certificate, 1,000 idle connections, streams that never send their
//! `Hello`, one that trickles a frame at a byte a second, oversized frames in bulk, and
//! slowloris clients on `/metrics` and on the operator API. The relay must cut each one
//! off and count it, keep answering scrapes, keep its memory bounded, and lose nothing
//! of the honest streams: every recovery point verifies.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use fbr_churn::hostile::{run, Abuse, HostileOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_cut_off_and_counted_and_honest_streams_lose_nothing() {
    let opts = HostileOptions {
        abuse: Abuse {
            bad_handshakes: 500,
            ..Abuse::FULL
        },
        streams: 100,
        seconds: 20.0,
        rate_mb: 4.0,
        frame_timeout_s: 4,
        idle_connection_s: 4,
        progress: false,
    };
    let r = run(&opts).await.unwrap();
    let counted = |series: &str| {
        r.counted
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap()
    };
    assert!(r.verified, "{:?}", r.errors);
    assert!(r.recovery_points_verified >= 10, "{r:?}");
    assert_eq!(r.honest_reconnects, 0, "{r:?}");
    // Each abuse was cut off, and counted.
    assert!(
        counted("fbr_relay_handshakes_refused_total")
            + counted("fbr_relay_peers_cut_off_total{limit=\"handshakes\"}")
            >= 100.0,
        "{r:?}"
    );
    assert!(
        counted("fbr_relay_peers_cut_off_total{limit=\"idle_connection\"}") >= 900.0,
        "{r:?}"
    );
    assert!(r.idle_connections_closed >= 900, "{r:?}");
    // Silent streams (10 s Hello deadline) and trickling ones (4 s frame timeout).
    let a = opts.abuse;
    assert!(
        counted("fbr_relay_stream_errors_total{code=\"too_slow\"}")
            >= f64::from(a.silent_streams + a.trickling_streams),
        "{r:?}"
    );
    assert!(
        counted("fbr_relay_stream_errors_total{code=\"frame_too_large\"}")
            >= f64::from(a.oversized_frames),
        "{r:?}"
    );
    assert!(
        r.streams_refused >= u64::from(a.silent_streams + a.trickling_streams + a.oversized_frames),
        "{r:?}"
    );
    // Slowloris: the gates evicted slow clients, and every scrape was answered.
    assert!(
        counted("fbr_relay_http_connections_total{outcome=\"evicted\",server=\"metrics\"}") > 0.0,
        "{r:?}"
    );
    assert!(
        counted("fbr_relay_http_connections_total{outcome=\"evicted\",server=\"api\"}") > 0.0,
        "{r:?}"
    );
    assert_eq!(r.failed_scrapes, 0, "{r:?}");
    // Memory stayed bounded (1,000 connections and every abuse at once).
    assert!(r.relay_peak_rss_bytes < 1 << 30, "{r:?}");
}
