//! fbr-metrics: what the relay and the master target tell Prometheus, and the small HTTP
//! server that tells it.
//!
//! - [`relay::RelayMetrics`] and [`master_target::MasterTargetMetrics`] define every
//!   metric of each daemon on an **explicit [`prometheus::Registry`]** (no global state:
//!   two daemons in one test process never share a counter). Names follow Prometheus
//!   conventions: a `fbr_relay_` / `fbr_master_target_` prefix, base units in the name
//!   (`_seconds`, `_bytes`), `_total` on counters. Labels are bounded: per VM at most,
//!   never per record or per disk offset.
//! - [`http::serve`] answers `GET /metrics` (text exposition format 0.0.4), `/healthz`
//!   (liveness: the process answers) and `/readyz` (readiness: the daemon can do its job),
//!   from any [`http::Endpoints`] implementation. Connections are bounded in number and
//!   time, so a misbehaving scraper cannot exhaust memory.
//!
//! The list of metrics with their meaning is in `docs/METRICS.md`; the alert rules in
//! `packaging/prometheus/` use them.

pub mod http;
pub mod master_target;
pub mod relay;

pub use http::{serve, start, Endpoints, Probe};

use fbr_protocol::ErrorCode;

/// `fbr_<daemon>_stream_errors_total{code}`: streams refused or closed with an error,
/// by wire code. Every code this version knows starts at zero, so `rate()` and alerts
/// see the first error.
#[derive(Debug, Clone)]
pub struct StreamErrors(prometheus::IntCounterVec);

impl StreamErrors {
    fn register(registry: &prometheus::Registry, name: &str) -> Self {
        let vec = register(
            registry,
            prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    name,
                    "Streams refused or closed with an error, by error code.",
                ),
                &["code"],
            )
            .expect("valid metric"),
        );
        for code in ErrorCode::KNOWN {
            vec.with_label_values(&[code.name()]);
        }
        StreamErrors(vec)
    }

    /// Counts a stream (or connection) ended with `code`.
    pub fn count(&self, code: ErrorCode) {
        self.0.with_label_values(&[code.name()]).inc();
    }

    /// How many streams ended with `code` so far.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0.with_label_values(&[code.name()]).get()
    }
}

/// `fbr_<daemon>_http_connections_total{server,outcome}`: what the admission gates of a
/// daemon's HTTP servers ([`fbr_daemon::gate`]) did with each connection (`admitted`,
/// `evicted` to make room, `refused` while every slot served a request, `timed_out`),
/// read from the gates' own counters at each scrape.
#[derive(Clone)]
pub struct HttpConnections {
    opts: prometheus::Opts,
    template: prometheus::IntCounterVec,
    gates: Vec<(&'static str, std::sync::Arc<fbr_daemon::gate::GateStats>)>,
}

impl HttpConnections {
    /// Registers `<prefix>_http_connections_total` on `registry` for `gates`, each
    /// labelled with its server's name (`metrics`, `api`).
    pub fn register(
        registry: &prometheus::Registry,
        prefix: &str,
        gates: Vec<(&'static str, std::sync::Arc<fbr_daemon::gate::GateStats>)>,
    ) {
        let opts = prometheus::Opts::new(
            format!("{prefix}_http_connections_total"),
            "Connections to the HTTP servers, by server and by what the admission gate did: \
             admitted, evicted (a slow client's slot given to a new one), refused (every \
             slot serving), timed_out.",
        );
        let template = prometheus::IntCounterVec::new(opts.clone(), &["server", "outcome"])
            .expect("valid metric");
        register(
            registry,
            HttpConnections {
                opts,
                template,
                gates,
            },
        );
    }
}

impl std::fmt::Debug for HttpConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnections")
            .field("name", &self.opts.name)
            .finish()
    }
}

impl prometheus::core::Collector for HttpConnections {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let vec = prometheus::IntCounterVec::new(self.opts.clone(), &["server", "outcome"])
            .expect("valid metric");
        for (server, stats) in &self.gates {
            for (outcome, n) in stats.counts() {
                vec.with_label_values(&[server, outcome]).inc_by(n);
            }
        }
        vec.collect()
    }
}

/// Tells systemd (`Type=notify`, when `NOTIFY_SOCKET` is set) the daemon's readiness as
/// `/readyz` answers it, checked every second: `READY=1` once ready, `STATUS=` with the
/// reason whenever it changes ([`fbr_daemon::systemd::follow_readiness`]).
pub fn spawn_systemd_readiness(
    endpoints: std::sync::Arc<dyn Endpoints>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let notifier = fbr_daemon::systemd::Notifier::from_env()?;
    Ok(tokio::spawn(fbr_daemon::systemd::follow_readiness(
        notifier,
        std::time::Duration::from_secs(1),
        move || {
            let probe = endpoints.readiness();
            (probe.ok, probe.body)
        },
    )))
}

/// Encodes everything in `registry` in the Prometheus text format.
pub fn encode(registry: &prometheus::Registry) -> Result<String, String> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .map_err(|e| format!("encoding metrics: {e}"))?;
    String::from_utf8(buf).map_err(|e| format!("encoding metrics: {e}"))
}

/// Registers `collector` on `registry`. Names are fixed at compile time and unique per
/// registry, so a failure is a programming error caught by every test that builds one.
///
/// It also holds every name to the rule `promtool check metrics` enforces (newer
/// versions more strictly than older ones): `_total` on counters and only on counters.
/// Checked here, on the collector's own families (a vector with no children yet still
/// has one), so an older local promtool cannot hide a name the CI's would refuse.
fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &prometheus::Registry,
    collector: C,
) -> C {
    for family in collector.collect() {
        let name = family.get_name();
        let is_counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        assert_eq!(
            is_counter,
            name.ends_with("_total"),
            "metric {name}: `_total` belongs on counters and only on counters"
        );
    }
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique within a registry");
    collector
}

/// Adds the standard `process_*` metrics (CPU seconds, resident memory, open file
/// descriptors, start time) of this process to `registry`.
fn register_process_metrics(registry: &prometheus::Registry) {
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        registry
            .register(Box::new(pc))
            .expect("process metrics are registered once per registry");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
}
