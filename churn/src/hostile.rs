//! Hostile peers against a running site, beside honest churn: what `churn bench-hostile`
//! and `tests/tests/hostile.rs` run.
//!
//! The abuses, each with what the relay must do and where it counts it:
//!
//! | abuse | the relay | counted in |
//! |---|---|---|
//! | handshakes with a certificate of a foreign CA, in a flood | refuses each, at most `ingest.max_handshakes` at once | `fbr_relay_handshakes_refused_total`, `fbr_relay_peers_cut_off_total{limit="handshakes"}` |
//! | idle connections (valid certificate, no stream) | closes each after `ingest.idle_connection_seconds` | `fbr_relay_peers_cut_off_total{limit="idle_connection"}` |
//! | streams opened that never send their `Hello` (one byte, then nothing) | refuses each after 10 s | `fbr_relay_stream_errors_total{code="too_slow"}` |
//! | a `Hello`, then a frame at 1 byte/s | refuses it after `ingest.frame_timeout_seconds` | `fbr_relay_stream_errors_total{code="too_slow"}` |
//! | frames announcing an oversized payload, many streams | refuses each at its header | `fbr_relay_stream_errors_total{code="frame_too_large"}` |
//! | slowloris on `/metrics` and on the operator API (request head or TLS handshake a byte now and then) | gives the slowest waiter's slot to each new connection | `fbr_relay_http_connections_total{outcome="evicted"}` |
//!
//! While they run, honest agents write through the same relay; every recovery point
//! must verify, and the relay's memory stay bounded. The run reports the honest
//! throughput with and without the abuse (the bench compares the two).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fbr_protocol::{Frame, StreamId};
use fbr_transport::{any_addr_for, client_endpoint, Credentials, QuicTuning};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::agent;
use crate::drill::DrillOptions;
use crate::harness::{process_peak_rss_bytes, sample, Site};

/// How many of each abuse to run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Abuse {
    /// Handshakes with a foreign certificate.
    pub bad_handshakes: u32,
    /// Connections with a valid certificate that open no stream.
    pub idle_connections: u32,
    /// Streams that send one byte and stop.
    pub silent_streams: u32,
    /// Streams that send a `Hello`, then a frame at 1 byte/s.
    pub trickling_streams: u32,
    /// Streams that announce a payload above the limit.
    pub oversized_frames: u32,
    /// Slow HTTP clients, on each of `/metrics` and the operator API.
    pub slowloris: u32,
}

impl Abuse {
    pub const NONE: Abuse = Abuse {
        bad_handshakes: 0,
        idle_connections: 0,
        silent_streams: 0,
        trickling_streams: 0,
        oversized_frames: 0,
        slowloris: 0,
    };

    /// What the issue asks for: a flood of bad handshakes, 1,000 idle connections,
    /// silent and trickling streams, oversized frames in bulk, slowloris everywhere.
    pub const FULL: Abuse = Abuse {
        bad_handshakes: 2000,
        idle_connections: 1000,
        silent_streams: 200,
        trickling_streams: 20,
        oversized_frames: 500,
        slowloris: 200,
    };
}

/// One run: honest churn, and the abuse beside it.
#[derive(Debug, Clone)]
pub struct HostileOptions {
    pub abuse: Abuse,
    /// Honest streams (4 disks per VM).
    pub streams: u32,
    pub seconds: f64,
    /// Honest churn in total, MB/s.
    pub rate_mb: f64,
    /// The relay's `ingest.frame_timeout_seconds` and `ingest.idle_connection_seconds`
    /// (short in tests, so the cuts happen within the run).
    pub frame_timeout_s: u64,
    pub idle_connection_s: u64,
    pub progress: bool,
}

/// What a run saw.
#[derive(Debug, Clone, Serialize)]
pub struct HostileReport {
    pub abuse: Abuse,
    pub streams: u32,
    /// Honest logical bytes acknowledged per second over the run.
    pub honest_mb_per_s: f64,
    pub honest_reconnects: u64,
    pub recovery_points_verified: usize,
    pub verified: bool,
    pub relay_peak_rss_bytes: u64,
    /// Longest a `/metrics` scrape took during the run, ms (0 when none was made).
    pub max_scrape_ms: f64,
    /// Scrapes that failed during the run.
    pub failed_scrapes: u64,
    /// What the relay counted, by series.
    pub counted: Vec<(String, f64)>,
    /// What the attackers saw: connections the relay closed on them, streams refused.
    pub idle_connections_closed: u64,
    pub streams_refused: u64,
    pub errors: Vec<String>,
}

/// The series [`HostileReport::counted`] reads from the relay after the run.
pub const COUNTED: [&str; 7] = [
    "fbr_relay_handshakes_refused_total",
    "fbr_relay_peers_cut_off_total{limit=\"handshakes\"}",
    "fbr_relay_peers_cut_off_total{limit=\"idle_connection\"}",
    "fbr_relay_stream_errors_total{code=\"too_slow\"}",
    "fbr_relay_stream_errors_total{code=\"frame_too_large\"}",
    "fbr_relay_http_connections_total{outcome=\"evicted\",server=\"metrics\"}",
    "fbr_relay_http_connections_total{outcome=\"evicted\",server=\"api\"}",
];

/// Runs honest churn through a fresh site with `opts.abuse` beside it, then verifies
/// every recovery point.
pub async fn run(opts: &HostileOptions) -> anyhow::Result<HostileReport> {
    let drill = DrillOptions {
        seed: 21,
        progress: opts.progress,
        cache_capacity: 2 << 30,
        ..DrillOptions::streams(
            opts.streams,
            Duration::from_secs_f64(opts.seconds),
            Some(opts.rate_mb),
        )
    };
    let plans = drill.plans(opts.streams);
    let relay_args = vec![
        "--frame-timeout-seconds".into(),
        opts.frame_timeout_s.to_string(),
        "--idle-connection-seconds".into(),
        opts.idle_connection_s.to_string(),
    ];
    let mut site = Site::create(None, drill.site_options(64, relay_args))?;
    site.start_master_target()?;
    let relay = site.start_relay()?;
    let metrics = site.relay_metrics_addr().context("the relay's metrics")?;
    let api = site.relay_api_addr().context("the relay's operator API")?;
    let handle =
        agent::start(drill.agent_options(&site)?, plans, drill.seed).map_err(anyhow::Error::msg)?;
    let stats = handle.stats.clone();

    let seen = Arc::new(AttackerCounts::default());
    let until = Instant::now() + Duration::from_secs_f64(opts.seconds);
    let attacks = tokio::spawn(attack(
        opts.abuse,
        relay,
        metrics,
        api,
        site.pki_dir.clone(),
        seen.clone(),
        until,
    ));
    let scrapes = tokio::task::spawn_blocking(move || scrape_until(metrics, until));

    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    let mut errors = Vec::new();
    if let Err(e) = attacks.await? {
        errors.push(format!("an attacker failed: {e:#}"));
    }
    let (max_scrape_ms, failed_scrapes) = scrapes.await?;
    let elapsed = report.elapsed.as_secs_f64().max(1e-9);
    let relay_peak_rss_bytes = site
        .relay_pid()
        .and_then(process_peak_rss_bytes)
        .unwrap_or(0);
    let text = tokio::task::spawn_blocking(move || crate::harness::http_get(metrics, "/metrics").1)
        .await?;
    let counted = COUNTED
        .iter()
        .map(|s| (s.to_string(), sample(&text, s).unwrap_or(f64::NAN)))
        .collect();
    site.stop_relay(false)?;
    site.stop_master_target(false)?;
    let v = crate::verify::verify_run(&report, &site.mt_data).await?;
    errors.extend(v.errors);
    Ok(HostileReport {
        abuse: opts.abuse,
        streams: opts.streams,
        honest_mb_per_s: stats.logical_bytes_acked.load(Ordering::Relaxed) as f64 / 1e6 / elapsed,
        honest_reconnects: stats.reconnects.load(Ordering::Relaxed),
        recovery_points_verified: v.recovery_points_verified,
        verified: v.verified && errors.is_empty(),
        relay_peak_rss_bytes,
        max_scrape_ms,
        failed_scrapes,
        counted,
        idle_connections_closed: seen.connections_closed.load(Ordering::Relaxed),
        streams_refused: seen.streams_refused.load(Ordering::Relaxed),
        errors,
    })
}

/// What the attackers saw happen to them.
#[derive(Debug, Default)]
struct AttackerCounts {
    connections_closed: AtomicU64,
    streams_refused: AtomicU64,
}

/// Scrapes `/metrics` twice a second until `until`: the longest scrape (ms) and how
/// many failed.
fn scrape_until(metrics: SocketAddr, until: Instant) -> (f64, u64) {
    let (mut worst, mut failed) = (0f64, 0);
    while Instant::now() < until {
        let t = Instant::now();
        let (status, _) = crate::harness::http_get(metrics, "/metrics");
        worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
        if status != 200 {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    (worst, failed)
}

/// Every abuse at once, until `until`.
async fn attack(
    abuse: Abuse,
    relay: SocketAddr,
    metrics: SocketAddr,
    api: SocketAddr,
    pki: std::path::PathBuf,
    seen: Arc<AttackerCounts>,
    until: Instant,
) -> anyhow::Result<()> {
    // The honest agents connect first (an agent refused at the connection cap would
    // be the abuse winning).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut tasks = tokio::task::JoinSet::new();
    if abuse.bad_handshakes > 0 {
        let foreign = tempfile::tempdir()?;
        fbr_transport::pki::init_loopback_site(foreign.path(), &["vm1".into()])?;
        let creds = foreign_agent(foreign.path(), &pki)?;
        tasks.spawn(async move {
            let _foreign = foreign;
            bad_handshakes(relay, creds, abuse.bad_handshakes).await
        });
    }
    if abuse.idle_connections > 0 {
        let (pki, seen) = (pki.clone(), seen.clone());
        tasks.spawn(async move {
            idle_connections(relay, &pki, abuse.idle_connections, seen, until).await
        });
    }
    if abuse.silent_streams + abuse.trickling_streams + abuse.oversized_frames > 0 {
        let (pki, seen) = (pki.clone(), seen.clone());
        tasks.spawn(async move { bad_streams(relay, &pki, abuse, seen, until).await });
    }
    if abuse.slowloris > 0 {
        tasks.spawn(slowloris(metrics, false, abuse.slowloris, until));
        tasks.spawn(slowloris(api, true, abuse.slowloris, until));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// An agent certificate of another CA, trusting the site's (so it is the relay that
/// refuses the handshake, not the attacker).
fn foreign_agent(foreign: &Path, site_pki: &Path) -> anyhow::Result<Credentials> {
    let mut creds = Credentials::load(foreign, "agent")?;
    creds.roots = fbr_transport::load_roots(&site_pki.join("ca.pem"))?;
    Ok(creds)
}

async fn bad_handshakes(relay: SocketAddr, creds: Credentials, n: u32) -> anyhow::Result<()> {
    let endpoint = client_endpoint(any_addr_for(relay), creds, &QuicTuning::default())?;
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..n {
        let endpoint = endpoint.clone();
        tries.spawn(async move {
            if let Ok(connecting) = endpoint.connect(relay, "relay") {
                // Refused by the relay; with a foreign certificate nothing gets through.
                if let Ok(conn) = connecting.await {
                    // TLS 1.3: the client finishes before the server checks it; the
                    // refusal arrives as the connection's close.
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                }
            }
        });
        if i % 64 == 63 {
            while tries.len() > 128 {
                tries.join_next().await;
            }
        }
    }
    while tries.join_next().await.is_some() {}
    endpoint.close(0u32.into(), b"");
    Ok(())
}

/// A client endpoint presenting the site's agent certificate.
fn agent_endpoint(relay: SocketAddr, pki: &Path) -> anyhow::Result<quinn::Endpoint> {
    let creds = Credentials::load(pki, "agent")?;
    Ok(client_endpoint(
        any_addr_for(relay),
        creds,
        &QuicTuning::default(),
    )?)
}

async fn connect_agent(
    relay: SocketAddr,
    pki: &Path,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = agent_endpoint(relay, pki)?;
    let conn = endpoint.connect(relay, "relay")?.await?;
    Ok((endpoint, conn))
}

/// `n` connections with the site's agent certificate, each opening no stream; counts
/// those the relay closes before `until`.
async fn idle_connections(
    relay: SocketAddr,
    pki: &Path,
    n: u32,
    seen: Arc<AttackerCounts>,
    until: Instant,
) -> anyhow::Result<()> {
    let endpoint = agent_endpoint(relay, pki)?;
    let mut conns = tokio::task::JoinSet::new();
    for _ in 0..n {
        let endpoint = endpoint.clone();
        let seen = seen.clone();
        conns.spawn(async move {
            let Ok(connecting) = endpoint.connect(relay, "relay") else {
                return;
            };
            let Ok(conn) = connecting.await else { return };
            if tokio::time::timeout_at(until.into(), conn.closed())
                .await
                .is_ok()
            {
                seen.connections_closed.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while conns.join_next().await.is_some() {}
    endpoint.close(0u32.into(), b"");
    Ok(())
}

/// Silent, trickling and oversized streams on one connection with a valid certificate.
async fn bad_streams(
    relay: SocketAddr,
    pki: &Path,
    abuse: Abuse,
    seen: Arc<AttackerCounts>,
    until: Instant,
) -> anyhow::Result<()> {
    let (endpoint, conn) = connect_agent(relay, pki).await?;
    let mut streams = tokio::task::JoinSet::new();
    // The honest agents write vm1..; these use disks no honest stream has.
    for _ in 0..abuse.silent_streams {
        let (conn, seen) = (conn.clone(), seen.clone());
        streams.spawn(async move {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                return;
            };
            let _ = send.write_all(b"F").await;
            await_refusal(recv, &seen, until).await;
            drop(send);
        });
    }
    for i in 0..abuse.trickling_streams {
        let (conn, seen) = (conn.clone(), seen.clone());
        streams.spawn(async move {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return;
            };
            let mut hello = bytes::BytesMut::new();
            fbr_protocol::encode_frame(
                &Frame::Hello {
                    stream: StreamId {
                        vm: "vm1".into(),
                        disk: 1000 + i,
                    },
                    disk_size: 1 << 20,
                    placement: 0,
                },
                &mut hello,
            );
            if send.write_all(&hello).await.is_err() {
                return;
            }
            // The Accept (or a refusal), then a Write frame a byte a second.
            let mut first = [0u8; 1];
            if recv.read_exact(&mut first).await.is_err() {
                return;
            }
            let mut frame = bytes::BytesMut::new();
            fbr_protocol::encode_frame(
                &Frame::Record(fbr_protocol::Record::Write {
                    seq: 1,
                    offset: 0,
                    data: bytes::Bytes::from(vec![1u8; 4096]),
                }),
                &mut frame,
            );
            // The trickle runs on its own task: when the relay cuts the stream off, a
            // write can fail before the read sees the end, and the refusal must still
            // be awaited (and counted) on the receiving side.
            let trickle = tokio::spawn(async move {
                for byte in frame.iter() {
                    if send.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            await_refusal(recv, &seen, until).await;
            trickle.abort();
        });
    }
    for _ in 0..abuse.oversized_frames {
        let (conn, seen) = (conn.clone(), seen.clone());
        streams.spawn(async move {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                return;
            };
            // A Write frame header announcing 4 GiB of payload.
            let _ = send.write_all(b"FB\x01\x10\xff\xff\xff\xff").await;
            await_refusal(recv, &seen, until).await;
        });
    }
    while streams.join_next().await.is_some() {}
    conn.close(0u32.into(), b"");
    endpoint.close(0u32.into(), b"");
    Ok(())
}

/// Waits (until `until`) for the relay to end a stream: counts it when it does.
async fn await_refusal(mut recv: quinn::RecvStream, seen: &AttackerCounts, until: Instant) {
    let ended = tokio::time::timeout_at(until.into(), async {
        let mut buf = [0u8; 4096];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    if ended.is_ok() {
        seen.streams_refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// `n` slow clients of an HTTP server (`tls`: HTTPS): each connects, sends the first
/// bytes of a request head (of a TLS ClientHello), then one more byte every 2 s until
/// `until` or until the server closes it; a closed client connects again.
async fn slowloris(addr: SocketAddr, tls: bool, n: u32, until: Instant) -> anyhow::Result<()> {
    let (start, more): (&'static [u8], &'static [u8]) = if tls {
        (b"\x16\x03\x01\x02\x00", b"\x00")
    } else {
        (b"GET /metrics HTTP/1.1\r\nX-Slow: ", b"a")
    };
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..n {
        clients.spawn(async move {
            while Instant::now() < until {
                let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if s.write_all(start).await.is_err() {
                    continue;
                }
                while Instant::now() < until {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if s.write_all(more).await.is_err() {
                        break;
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while clients.join_next().await.is_some() {}
    Ok(())
}

/// `churn bench-hostile`: the same honest churn without and with [`Abuse::FULL`]; the
/// honest throughput under abuse against without (target: within 10%), the relay's
/// peak memory in each, and both runs' reports.
pub async fn bench(
    streams: u32,
    seconds: f64,
    rate_mb: f64,
    progress: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut opts = HostileOptions {
        abuse: Abuse::NONE,
        streams,
        seconds,
        rate_mb,
        frame_timeout_s: 5,
        idle_connection_s: 5,
        progress,
    };
    let calm = run(&opts).await?;
    opts.abuse = Abuse::FULL;
    let attacked = run(&opts).await?;
    let ratio = attacked.honest_mb_per_s / calm.honest_mb_per_s.max(1e-9);
    let verified = calm.verified && attacked.verified;
    Ok(serde_json::json!({
        "streams": streams,
        "rate_mb_per_s": rate_mb,
        "honest_rate_ratio": ratio,
        "met": {
            "honest_rate_within_10_percent": ratio >= 0.9,
            "nothing_lost": verified,
            "honest_reconnects_zero": attacked.honest_reconnects == 0,
            "scrapes_answered": attacked.failed_scrapes == 0,
        },
        "relay_peak_rss_bytes": {
            "calm": calm.relay_peak_rss_bytes,
            "attacked": attacked.relay_peak_rss_bytes,
        },
        "calm": calm,
        "attacked": attacked,
        "verified": verified,
    }))
}
