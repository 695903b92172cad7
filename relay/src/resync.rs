//! Where each resyncing disk stands, as the agents' `Resync` marks pass through the
//! relay: fraction done, bytes compared and sent, and an ETA from the measured rate.
//!
//! The marks themselves travel on the disk's ordered stream (cached, forwarded, journaled
//! by the master target, which keeps the resumable state); this is only the relay's live
//! view, exported as `fbr_relay_resync_*` metrics and read by operators (and the
//! controller to come) to say how long a reprotect will take.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fbr_metrics::relay::RelayMetrics;
use fbr_protocol::resync::RateEstimator;
use fbr_protocol::{ResyncMark, ResyncPhase, StreamId};

/// Over how long the resync rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(30);

/// One disk's resync, as last seen.
#[derive(Debug, Clone)]
pub struct ResyncView {
    pub mark: ResyncMark,
    /// Regions per second over the last 30 s, once measured.
    pub regions_per_second: Option<f64>,
    pub eta: Option<Duration>,
}

#[derive(Debug)]
struct Tracked {
    rate: RateEstimator,
    view: ResyncView,
}

/// The resyncs passing through this relay.
#[derive(Debug, Default)]
pub struct ResyncProgress {
    streams: Mutex<HashMap<StreamId, Tracked>>,
}

impl ResyncProgress {
    /// A mark of `id`'s resync was ingested: update the view and the metrics.
    pub fn observe(&self, id: &StreamId, mark: &ResyncMark, metrics: &RelayMetrics) {
        self.observe_at(id, mark, metrics, Instant::now());
    }

    fn observe_at(&self, id: &StreamId, mark: &ResyncMark, m: &RelayMetrics, now: Instant) {
        let disk = id.disk.to_string();
        let labels = [id.vm.as_str(), disk.as_str()];
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if mark.phase == ResyncPhase::End {
            streams.remove(id);
            m.resyncs_completed_total.inc();
            let _ = m.resync_progress_ratio.remove_label_values(&labels);
            let _ = m.resync_compared_bytes.remove_label_values(&labels);
            let _ = m.resync_sent_bytes.remove_label_values(&labels);
            let _ = m.resync_eta_seconds.remove_label_values(&labels);
            return;
        }
        let t = streams.entry(id.clone()).or_insert_with(|| Tracked {
            rate: RateEstimator::new(RATE_WINDOW),
            view: ResyncView {
                mark: *mark,
                regions_per_second: None,
                eta: None,
            },
        });
        if mark.phase == ResyncPhase::Begin || mark.id != t.view.mark.id {
            t.rate = RateEstimator::new(RATE_WINDOW);
        }
        t.rate.observe(now, mark.next_region);
        let remaining = mark.regions.saturating_sub(mark.next_region);
        t.view = ResyncView {
            mark: *mark,
            regions_per_second: t.rate.rate(),
            eta: t.rate.eta(remaining),
        };
        let ratio = if mark.regions == 0 {
            1.0
        } else {
            mark.next_region as f64 / mark.regions as f64
        };
        m.resync_progress_ratio
            .with_label_values(&labels)
            .set(ratio);
        m.resync_compared_bytes
            .with_label_values(&labels)
            .set(mark.compared_bytes as i64);
        m.resync_sent_bytes
            .with_label_values(&labels)
            .set(mark.sent_bytes as i64);
        m.resync_eta_seconds
            .with_label_values(&labels)
            .set(t.view.eta.map_or(f64::NAN, |d| d.as_secs_f64()));
    }

    /// Every resync in progress.
    pub fn views(&self) -> Vec<(StreamId, ResyncView)> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .iter()
            .map(|(id, t)| (id.clone(), t.view.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbr_protocol::ResyncMode;

    #[test]
    fn progress_and_eta_follow_the_marks_and_end_with_the_resync() {
        let m = RelayMetrics::new();
        let p = ResyncProgress::default();
        let id = StreamId {
            vm: "vm1".into(),
            disk: 0,
        };
        let mark = |phase, next_region| ResyncMark {
            id: 1,
            phase,
            mode: ResyncMode::Delta,
            next_region,
            regions: 100,
            compared_bytes: next_region << 20,
            sent_bytes: 0,
        };
        let t0 = Instant::now();
        p.observe_at(&id, &mark(ResyncPhase::Begin, 0), &m, t0);
        p.observe_at(
            &id,
            &mark(ResyncPhase::Progress, 20),
            &m,
            t0 + Duration::from_secs(2),
        );
        let views = p.views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].1.regions_per_second, Some(10.0));
        assert_eq!(views[0].1.eta, Some(Duration::from_secs(8)));
        let ratio = m
            .resync_progress_ratio
            .with_label_values(&["vm1", "0"])
            .get();
        assert!((ratio - 0.2).abs() < 1e-9);
        p.observe_at(
            &id,
            &mark(ResyncPhase::End, 100),
            &m,
            t0 + Duration::from_secs(9),
        );
        assert!(p.views().is_empty());
        assert_eq!(m.resyncs_completed_total.get(), 1);
    }
}
