//! Egress control of the WAN leg: how fast the relay sends to the master target, and in
//! which order its streams get to send.
//!
//! Every forwarder asks for permission before sending a batch ([`Egress::acquire`]).
//! One dispatcher task grants the waiting batches in weighted deficit-round-robin order
//! (`fbr_throttling::FairQueue`, weights per VM) and pays for each from a token bucket
//! whose rate follows the weekly schedule in force (`fbr_throttling::WeeklySchedule`).
//! The schedule is re-evaluated every second, and when it comes from a file
//! (`--egress-schedule-file`), the file is re-read whenever it changes: operators change
//! the limit without a restart. Throttling only delays; it never drops data (the backlog
//! waits in the cache).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fbr_protocol::StreamId;
use fbr_throttling::{weekday_and_minute, FairQueue, Rate, TokenBucket, WeeklySchedule};
use tokio::sync::{oneshot, Notify};

/// Bytes a weight-1 stream earns per round (about one forwarder batch).
const QUANTUM: u64 = 256 * 1024;
/// The bucket's burst: at least one full batch, or 50 ms at the current rate.
const MIN_BURST: u64 = 1 << 20;

/// How egress is limited.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub schedule: WeeklySchedule,
    /// When set, the schedule is read from this file and re-read when it changes.
    pub schedule_file: Option<PathBuf>,
    /// Offset of the operators' local time from UTC, minutes (the schedule's clock).
    pub utc_offset_minutes: i32,
    /// Weight (priority) per VM; 1 when not listed.
    pub vm_weights: HashMap<String, u32>,
}

struct State {
    bucket: TokenBucket,
    fair: FairQueue<StreamId>,
    waiters: HashMap<StreamId, oneshot::Sender<()>>,
    schedule: WeeklySchedule,
}

/// The relay's egress controller.
pub struct Egress {
    state: Mutex<State>,
    wake: Notify,
    config: EgressConfig,
    /// Bytes granted so far (for metrics and tests).
    pub granted_bytes: AtomicU64,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn burst_for(rate: Rate) -> u64 {
    match rate {
        Rate::Unlimited => MIN_BURST,
        Rate::BytesPerSec(r) => (r / 20).max(MIN_BURST),
    }
}

fn rate_now(schedule: &WeeklySchedule, utc_offset_minutes: i32) -> Rate {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (day, minute) = weekday_and_minute(secs, utc_offset_minutes);
    schedule.rate_at(day, minute)
}

impl Egress {
    /// Starts the dispatcher (and the schedule-file watcher, if any).
    pub fn start(config: EgressConfig) -> Arc<Self> {
        let rate = rate_now(&config.schedule, config.utc_offset_minutes);
        let egress = Arc::new(Egress {
            state: Mutex::new(State {
                bucket: TokenBucket::new(rate, burst_for(rate), Instant::now()),
                fair: FairQueue::new(QUANTUM),
                waiters: HashMap::new(),
                schedule: config.schedule.clone(),
            }),
            wake: Notify::new(),
            config,
            granted_bytes: AtomicU64::new(0),
        });
        tracing::info!(?rate, "egress rate in force");
        tokio::spawn(egress.clone().dispatch());
        tokio::spawn(egress.clone().follow_schedule());
        egress
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `stream` may send a batch of `bytes`.
    pub async fn acquire(&self, stream: &StreamId, bytes: u64) {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            let weight = self.config.vm_weights.get(&stream.vm).copied().unwrap_or(1);
            st.fair.set_weight(stream, weight);
            st.fair.demand(stream.clone(), bytes);
            st.waiters.insert(stream.clone(), tx);
        }
        self.wake.notify_one();
        let _ = rx.await;
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.lock().bucket.rate()
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            let grant = self.lock().fair.next_grant();
            let Some((stream, bytes)) = grant else {
                self.wake.notified().await;
                continue;
            };
            // It is this stream's turn: wait for the tokens, then let it send.
            loop {
                let wait = self.lock().bucket.try_take(bytes, Instant::now());
                match wait {
                    Ok(()) => break,
                    Err(d) => tokio::time::sleep(d.min(Duration::from_millis(250))).await,
                }
            }
            self.granted_bytes.fetch_add(bytes, Ordering::Relaxed);
            if let Some(tx) = self.lock().waiters.remove(&stream) {
                let _ = tx.send(());
            }
        }
    }

    /// Applies the schedule's rate as time passes, and reloads the schedule file when it
    /// changes (a bad file is logged and the previous schedule kept).
    async fn follow_schedule(self: Arc<Self>) {
        let mut file_stamp = None;
        loop {
            if let Some(path) = &self.config.schedule_file {
                let stamp = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if stamp.is_some() && stamp != file_stamp {
                    file_stamp = stamp;
                    match std::fs::read_to_string(path)
                        .map_err(|e| e.to_string())
                        .and_then(|s| WeeklySchedule::parse(s.trim()).map_err(|e| e.to_string()))
                    {
                        Ok(schedule) => {
                            tracing::info!(file = %path.display(), "egress schedule loaded");
                            self.lock().schedule = schedule;
                        }
                        Err(e) => {
                            tracing::error!(file = %path.display(), "egress schedule not changed: {e}")
                        }
                    }
                }
            }
            let rate = {
                let st = self.lock();
                rate_now(&st.schedule, self.config.utc_offset_minutes)
            };
            let changed = {
                let mut st = self.lock();
                if st.bucket.rate() != rate {
                    st.bucket.reconfigure(rate, burst_for(rate), Instant::now());
                    true
                } else {
                    false
                }
            };
            if changed {
                tracing::info!(?rate, "egress rate changed");
                self.wake.notify_one();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
