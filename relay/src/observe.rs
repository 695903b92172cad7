//! How the relay watches itself: the health task and the HTTP endpoints.
//!
//! The **health task** runs every `health_interval` (1 s by default): it gathers an
//! [`Observation`] (cache usage, every stream's backlog and its age, whether the master
//! target is reachable), updates the ingest throttling decision
//! ([`IngestGovernor`]), publishes it to the ingest sessions, evaluates health and logs
//! every change of state with its reasons. When the master target is unreachable it
//! also tries to reconnect, so health recovers even when no stream is forwarding.
//!
//! [`RelayEndpoints`] serves `/metrics` (gauges refreshed from the relay's state at each
//! scrape), `/healthz` (the health task is alive) and `/readyz` (not critical).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fbr_cache::now_ms;
use fbr_metrics::{Endpoints, Probe};
use fbr_throttling::Rate;

use crate::health::{
    evaluate, IngestGovernor, Observation, Severity, StreamObservation, CONDITIONS,
};
use crate::server::{HealthSnapshot, Relay};

/// Gathers what health depends on, now.
pub fn observe(relay: &Relay) -> Observation {
    let now_s = now_ms() / 1000;
    let streams = relay
        .ingest()
        .cache
        .all_stats()
        .into_iter()
        .map(|(id, s)| StreamObservation {
            id,
            backlog_bytes: s.backlog_bytes,
            oldest_backlog_age_s: s.oldest_unacked_s.map(|t| now_s.saturating_sub(t)),
        })
        .collect();
    let link = relay.upstream().status();
    let cache = &relay.ingest().cache;
    Observation {
        cache_used_bytes: cache.used_bytes(),
        cache_capacity_bytes: cache.capacity_bytes(),
        cache_disk_available_bytes: cache.disk_space().map(|d| d.available_bytes),
        streams,
        master_target_down_s: link.down_for.map(|d| d.as_secs()),
        controller_store_error: relay.controller_store_error(),
        config_server_unreachable: relay.config_server_status().and_then(|s| {
            s.unreachable_for(Instant::now()).map(|quiet| {
                (
                    quiet.as_secs(),
                    s.last_error.unwrap_or_else(|| "no answer yet".into()),
                )
            })
        }),
    }
}

/// The heartbeat the relay sends its configuration server: version, health with its
/// reasons, cache usage, the churn it carries (agent bytes per second since the last
/// heartbeat: `last` holds that count and when), and every stream's backlog and RPO.
pub fn heartbeat(
    relay: &Relay,
    interval_s: u64,
    last: &mut Option<(u64, Instant)>,
    advertise: Option<String>,
) -> fbr_enroll::wire::Heartbeat {
    let obs = observe(relay);
    let ingested = relay
        .metrics()
        .bytes_total
        .with_label_values(&["logical"])
        .get();
    let now = Instant::now();
    let ingest_bytes_per_s = last.map(|(bytes, at)| {
        ingested.saturating_sub(bytes) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
    });
    *last = Some((ingested, now));
    let health = relay.health();
    fbr_enroll::wire::Heartbeat {
        version: fbr_enroll::wire::API_VERSION,
        software_version: env!("CARGO_PKG_VERSION").into(),
        interval_s,
        health: fbr_enroll::wire::HealthSummary {
            state: health
                .as_ref()
                .map_or("healthy".into(), |h| h.report.state.to_string()),
            reasons: health
                .map(|h| h.report.conditions.into_iter().map(|c| c.reason).collect())
                .unwrap_or_default(),
        },
        cache: Some(fbr_enroll::wire::CacheUsage {
            used_bytes: obs.cache_used_bytes,
            capacity_bytes: obs.effective_capacity_bytes(),
        }),
        streams: obs
            .streams
            .iter()
            .map(|s| fbr_enroll::wire::StreamReport {
                vm: s.id.vm.clone(),
                disk: s.id.disk,
                backlog_bytes: s.backlog_bytes,
                rpo_s: s.oldest_backlog_age_s,
            })
            .collect(),
        ingest_bytes_per_s,
        disks: vec![],
        groups: vec![],
        advertise,
    }
}

/// Runs the health task until the relay shuts down.
pub async fn run_health_task(relay: Arc<Relay>) {
    let mut governor = IngestGovernor::default();
    let mut last_state = Severity::Healthy;
    let reconnecting = Arc::new(AtomicBool::new(false));
    let mut ticker = tokio::time::interval(relay.config().health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let obs = observe(&relay);
        let thresholds = &relay.config().health;
        let throttled = governor.update(thresholds, &obs);
        let ingest = relay.ingest();
        if **ingest.throttled.borrow() != throttled {
            let names: Vec<String> = throttled.iter().map(|s| s.to_string()).collect();
            tracing::warn!(
                free_percent = format!("{:.1}", obs.cache_free_percent()),
                "ingest throttling now pauses {} streams: {names:?}",
                throttled.len()
            );
            ingest.throttled.send_replace(Arc::new(throttled.clone()));
        }
        let report = evaluate(thresholds, &obs, throttled.len());
        if report.state != last_state {
            let reasons: Vec<&str> = report
                .conditions
                .iter()
                .map(|c| c.reason.as_str())
                .collect();
            match report.state {
                Severity::Healthy => tracing::info!("health: healthy again"),
                Severity::Warning => tracing::warn!("health: warning: {reasons:?}"),
                Severity::Critical => tracing::error!("health: critical: {reasons:?}"),
            }
            last_state = report.state;
        }
        relay.set_health(HealthSnapshot {
            report,
            at: Instant::now(),
        });
        if obs.master_target_down_s.is_some() && !reconnecting.swap(true, Ordering::SeqCst) {
            let (relay, flag) = (relay.clone(), reconnecting.clone());
            tokio::spawn(async move {
                let _ = relay.upstream().connection().await;
                flag.store(false, Ordering::SeqCst);
            });
        }
    }
}

/// The relay's `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug)]
pub struct RelayEndpoints {
    relay: Arc<Relay>,
    /// UDP bytes to the master target already counted in `fbr_relay_bytes_total{stage="wire"}`.
    wire_counted: AtomicU64,
    /// Per-stream reduction counters already added to the Prometheus counters, by
    /// (VM, counter name): forwarders count in their own atomics, scrapes add the deltas.
    forwarded_counted: std::sync::Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl RelayEndpoints {
    pub fn new(relay: Arc<Relay>) -> Arc<Self> {
        Arc::new(RelayEndpoints {
            relay,
            wire_counted: AtomicU64::new(0),
            forwarded_counted: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn snapshot(&self) -> Option<HealthSnapshot> {
        self.relay.health()
    }

    /// Sets every gauge from the relay's state.
    fn refresh(&self) {
        let relay = &self.relay;
        let m = relay.metrics();
        let obs = observe(relay);
        m.cache_used_bytes.set(obs.cache_used_bytes as i64);
        m.cache_capacity_bytes.set(obs.cache_capacity_bytes as i64);
        m.cache_oldest_backlog_age_seconds
            .set(obs.oldest_backlog_age_s().unwrap_or(0) as f64);
        m.cache_full
            .set(relay.ingest().cache.full.load(Ordering::Relaxed) as i64);
        let mut backlog_by_vm: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &obs.streams {
            *backlog_by_vm.entry(&s.id.vm).or_default() += s.backlog_bytes;
        }
        m.cache_backlog_bytes.reset();
        for (vm, bytes) in backlog_by_vm {
            m.cache_backlog_bytes
                .with_label_values(&[vm])
                .set(bytes as i64);
        }

        let now = now_ms();
        let mut rpo_by_vm: BTreeMap<String, f64> = BTreeMap::new();
        for (id, f) in relay.forwarders().all() {
            let tag_ms = f.newest_applied_tag_ms.load(Ordering::Relaxed);
            if tag_ms > 0 {
                let age = now.saturating_sub(tag_ms) as f64 / 1000.0;
                let e = rpo_by_vm.entry(id.vm).or_insert(0.0);
                *e = e.max(age);
            }
        }
        m.rpo_seconds.reset();
        for (vm, age) in rpo_by_vm {
            m.rpo_seconds.with_label_values(&[&vm]).set(age);
        }

        m.egress_limit_bytes_per_second
            .set(match relay.forwarders().context().egress.rate() {
                Rate::Unlimited => f64::INFINITY,
                Rate::BytesPerSec(r) => r as f64,
            });
        m.ingest_throttled_streams
            .set(relay.ingest().throttled.borrow().len() as i64);

        self.add_forwarding_counters();
        m.dedup_known_blocks
            .set(relay.forwarders().context().known_blocks.len() as i64);
        m.codec_memory_bytes.set(
            relay
                .forwarders()
                .context()
                .codec_memory
                .reserved()
                .min(i64::MAX as u64) as i64,
        );

        let link = relay.upstream().status();
        m.upstream_connected.set(link.connected as i64);
        let before = self
            .wire_counted
            .fetch_max(link.udp_tx_bytes, Ordering::Relaxed);
        if link.udp_tx_bytes > before {
            m.add_bytes("wire", link.udp_tx_bytes - before);
        }

        let report = self.snapshot().map(|s| s.report);
        let state = report.as_ref().map_or(Severity::Healthy, |r| r.state);
        m.health_state.set(state as i64);
        for name in CONDITIONS {
            let severity = report
                .as_ref()
                .and_then(|r| r.conditions.iter().find(|c| c.name == name))
                .map_or(0, |c| c.severity as i64);
            m.health_condition.with_label_values(&[name]).set(severity);
        }
    }
}

impl RelayEndpoints {
    /// Adds what the forwarders counted since the last scrape to the counters.
    fn add_forwarding_counters(&self) {
        let relay = &self.relay;
        let m = relay.metrics();
        let mut now: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for (id, f) in relay.forwarders().all() {
            let st = &f.stages;
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let extra = [
                ("dedup_hits", l(&st.dedup_hits)),
                ("batches", l(&st.batches)),
                ("compression_skipped", l(&st.compression_skipped)),
                ("compress_ns", l(&st.compress_ns)),
                ("batches_compressed", l(&st.batches_compressed)),
                ("batches_zstd", l(&st.batches_zstd)),
                ("zstd_body", l(&st.zstd_body)),
                ("lz4_body", l(&st.lz4_body)),
            ];
            for (name, v) in st.stages().into_iter().chain(extra) {
                *now.entry((id.vm.clone(), name)).or_default() += v;
            }
        }
        let mut counted = self
            .forwarded_counted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // zstd, lz4, none: batches - compressed, compressed - zstd, zstd.
        let mut codec_batches = [0i64; 3];
        for ((vm, name), value) in now {
            let before = counted.insert((vm.clone(), name), value).unwrap_or(0);
            let delta = value.saturating_sub(before);
            match name {
                "dedup_hits" => m.dedup_hits_total.inc_by(delta),
                "batches" => {
                    m.batches_total.inc_by(delta);
                    codec_batches[2] += delta as i64;
                }
                "batches_compressed" => {
                    codec_batches[1] += delta as i64;
                    codec_batches[2] -= delta as i64;
                }
                "batches_zstd" => {
                    codec_batches[0] += delta as i64;
                    codec_batches[1] -= delta as i64;
                }
                "zstd_body" => m
                    .codec_body_bytes_total
                    .with_label_values(&["zstd"])
                    .inc_by(delta),
                "lz4_body" => m
                    .codec_body_bytes_total
                    .with_label_values(&["lz4"])
                    .inc_by(delta),
                "compression_skipped" => m.compression_skipped_batches_total.inc_by(delta),
                "compress_ns" => m.compression_seconds_total.inc_by(delta as f64 / 1e9),
                stage => {
                    m.vm_bytes_total
                        .with_label_values(&[&vm, stage])
                        .inc_by(delta);
                    if stage != "logical" {
                        m.add_bytes(stage, delta);
                    }
                }
            }
        }
        for (codec, n) in ["zstd", "lz4", "none"].iter().zip(codec_batches) {
            m.codec_batches_total
                .with_label_values(&[codec])
                .inc_by(n.max(0) as u64);
        }
    }
}

impl Endpoints for RelayEndpoints {
    fn metrics_text(&self) -> Result<String, String> {
        self.refresh();
        fbr_metrics::encode(&self.relay.metrics().registry)
    }

    fn liveness(&self) -> Probe {
        // Wedged if the health task has not run for several intervals (a stuck runtime).
        let limit = self.relay.config().health_interval * 5 + Duration::from_secs(5);
        match self.snapshot() {
            Some(s) if s.at.elapsed() > limit => Probe {
                ok: false,
                body: format!("health task last ran {:?} ago\n", s.at.elapsed()),
            },
            _ => Probe {
                ok: true,
                body: "alive\n".into(),
            },
        }
    }

    fn readiness(&self) -> Probe {
        match self.snapshot() {
            None => Probe {
                ok: false,
                body: "starting\n".into(),
            },
            Some(s) => Probe {
                ok: s.report.state != Severity::Critical,
                body: s.report.describe(),
            },
        }
    }
}
