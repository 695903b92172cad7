//! The agent emulator: streams many emulated disks to a relay, like the source agents on
//! failed-over Azure VMs.
//!
//! Per disk, one task owns a QUIC stream to the relay (one connection per VM). It draws
//! changes from the disk's [`ChangeSource`], numbers them, and sends them while the
//! protocol's [`StreamSender`] (with [`Resend::Retained`](fbr_protocol::stream::Resend))
//! has credit left (backpressure). The machine keeps every record until acknowledged;
//! after a lost connection or a relay restart the task reconnects (with the machine's
//! backoff), the machine learns from `Accept` what the master target already holds, and
//! the task resends the rest, so nothing is lost and nothing is applied twice.
//!
//! **Consistent cuts.** A tag coordinator inserts a tag on every disk of a replication
//! group while holding all of those disks' generator locks at once: no disk can draw a
//! change during the cut, so the tag positions form one consistent cut.
//!
//! **Acknowledgements.** `Ack{seq}` from the relay means durable in its cache: the
//! records leave the resend buffer. `Applied{seq}` means durable at the master target:
//! **lag** is measured per change from the moment it is drawn (the source write) to its
//! `Applied`, and a run is finished only when everything drawn is applied.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbr_enroll::wire::{MovePhase, MoveProgress};
use fbr_protocol::stream::{
    Reconnect, SenderConfig, SenderEvent, SessionEnd, SourcePosition, StreamSender, REFUSAL_GRACE,
};
use fbr_protocol::{Frame, Record, ResyncMode, StreamId, TagKind};
use fbr_transport::{
    any_addr_for, client_endpoint, Credentials, FrameReader, FrameWriter, PeerLink, QuicTuning,
    Role,
};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::dirty::DirtyRegions;
use crate::image::ImageSpec;
use crate::source::{
    ChangeSource, DiskManifest, Manifest, Renumber, SourceSpec, TagRecord, MANIFEST_VERSION,
};
use crate::workload::ContentPools;
use crate::writelog::LogItem;

mod resync;

/// Flush the send buffer once it holds this much.
const SEND_FLUSH_BYTES: usize = 1 << 20;

/// How to reach the relay and how to behave.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub relay: SocketAddr,
    /// The DNS name in the relay's certificate.
    pub relay_name: String,
    pub pki_dir: PathBuf,
    pub cert_name: String,
    pub tuning: QuicTuning,
    /// A crash-consistent tag on every group this often (unless `log_tags`).
    pub tag_interval: Duration,
    /// The tags of the write log the disks replay, in order (`None`: tags every
    /// `tag_interval`). Each is cut where the log has it: on every disk it covers, after
    /// exactly the changes before it.
    pub log_tags: Option<Vec<crate::writelog::LogTag>>,
    /// Every n-th tag is application-consistent (0: never).
    pub app_tag_every: u64,
    /// Stop drawing changes after this long once every disk is in step, i.e. its
    /// resync (if any) done (`None`: when every source is exhausted).
    pub duration: Option<Duration>,
    /// After stopping, how long to wait for everything to be acknowledged.
    pub drain_timeout: Duration,
    /// Give up on a disk after failing to reconnect for this long.
    pub reconnect_timeout: Duration,
    /// Churn at most this many bytes per second in total (spread evenly over the
    /// disks), like a VM fleet with a steady workload; `None`: as fast as the path
    /// accepts.
    pub rate_bytes_per_s: Option<u64>,
    /// VMs that write to another relay than `relay`, or have moved before (their
    /// placement), as the configuration server assigns them.
    pub routes: BTreeMap<String, Route>,
}

/// Where a VM's disks write: a relay and the VM's placement (how many times the
/// configuration server moved it between relays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub relay: SocketAddr,
    /// The DNS name in the relay's certificate.
    pub relay_name: String,
    pub placement: u64,
}

/// A VM's current route, shared by its disks' tasks; a move changes it.
#[derive(Debug)]
struct VmRoute {
    link: Mutex<Arc<PeerLink>>,
    placement: AtomicU64,
    /// While a move drains the old relay: the VM's disks draw no new changes.
    draining: AtomicBool,
    /// The VM was shut down (its hypervisor's `shut_down`): it writes nothing more;
    /// its disks still carry the group's tags, so its final state is a recovery point.
    powered_off: AtomicBool,
}

impl VmRoute {
    fn link(&self) -> Arc<PeerLink> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One disk to emulate.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    pub id: StreamId,
    pub disk_size: u64,
    pub group: String,
    pub source: SourceSpec,
    /// What the disk holds before its stream, where it lives, whether it resyncs.
    pub start: DiskStart,
}

/// How a disk starts.
#[derive(Debug, Clone, Default)]
pub struct DiskStart {
    /// What the source disk holds before its first change (written into `disk_file`
    /// when that does not exist yet).
    pub source_base: ImageSpec,
    /// What the master target's replica holds before the stream (a seeded
    /// original-location disk), for the manifest.
    pub replica_base: ImageSpec,
    /// The emulated disk as a sparse file, which a resync reads; `None`: the disk lives
    /// nowhere (changes are drawn, sent and forgotten; no resync possible).
    pub disk_file: Option<PathBuf>,
    pub resync: ResyncPlan,
    /// Send resync blocks at most this fast (bytes per second; `None`: as fast as the
    /// path accepts), as agents throttle resync to spare the VM's disk.
    pub resync_rate: Option<u64>,
    /// This agent takes over a disk an earlier agent streamed and lost (killed): the
    /// stream continues where the relay stands, and the regions the earlier agent may
    /// have written without an acknowledgement (its dirty file) are resynced.
    pub resume: bool,
}

impl From<ResyncMode> for ResyncPlan {
    fn from(mode: ResyncMode) -> Self {
        match mode {
            ResyncMode::Delta => ResyncPlan::Delta,
            ResyncMode::Full => ResyncPlan::Full,
        }
    }
}

/// Whether a disk resyncs when its agent starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ResyncPlan {
    /// Only to resume a resync the master target has in progress, or after a crash.
    #[default]
    None,
    /// As the replica needs: a delta resync of a stale (seeded) replica, a full copy to
    /// a new replica of a disk that already holds data.
    Auto,
    /// Compare hashes, send only the blocks that differ (original location).
    Delta,
    /// Send every block, zero runs as zero ranges (alternate location).
    Full,
}

/// Live counters, readable while the run goes on (progress display, benchmarks).
#[derive(Debug, Default)]
pub struct RunStats {
    /// Disk bytes changed by acknowledged records (writes and zeroed ranges).
    pub logical_bytes_acked: AtomicU64,
    /// Of those, bytes carried as data in `Write` records (zeroed ranges carry none).
    pub data_bytes_acked: AtomicU64,
    pub records_acked: AtomicU64,
    pub logical_bytes_sent: AtomicU64,
    /// Disk bytes the workload changed (drawn changes only: not resync records).
    pub change_bytes_drawn: AtomicU64,
    pub tags_inserted: AtomicU64,
    pub reconnects: AtomicU64,
    /// Resyncs started, and finished (their end mark assigned).
    pub resyncs_started: AtomicU64,
    pub resyncs_done: AtomicU64,
    /// Disk bytes compared by resyncs, bytes of blocks they sent, and bytes of node
    /// hashes they received (what the comparison cost on the WAN).
    pub resync_compared_bytes: AtomicU64,
    pub resync_sent_bytes: AtomicU64,
    pub resync_hash_bytes: AtomicU64,
    /// Source-write to acknowledgement, microseconds.
    pub lag_us: Mutex<Option<Histogram<u64>>>,
    /// The same, for writes drawn once every disk was onboarded (had a first
    /// acknowledgement): the steady state, without the start-up burst.
    pub steady_lag_us: Mutex<Option<Histogram<u64>>>,
    /// Disks in the run; when all have been acknowledged once, [`Self::onboarded`] is set.
    pub disks: AtomicU64,
    /// When the last disk had its first acknowledgement.
    pub onboarded: std::sync::OnceLock<Instant>,
    /// When the run's counters were made (the agents start right after).
    pub started: std::sync::OnceLock<Instant>,
    /// Disks that have had at least one record acknowledged.
    pub disks_first_acked: AtomicU64,
    /// The latest of those first acknowledgements, milliseconds after `started`: how long
    /// onboarding every disk took once all are acknowledged.
    pub last_first_ack_ms: AtomicU64,
}

impl RunStats {
    fn new() -> Arc<Self> {
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        let stats = RunStats {
            lag_us: Mutex::new(Some(h.clone())),
            steady_lag_us: Mutex::new(Some(h)),
            ..Default::default()
        };
        stats.started.get_or_init(Instant::now);
        Arc::new(stats)
    }

    /// A disk's first record was acknowledged now.
    fn first_ack(&self) {
        let started = *self.started.get_or_init(Instant::now);
        let ms = started.elapsed().as_millis() as u64;
        self.last_first_ack_ms.fetch_max(ms, Ordering::Relaxed);
        let acked = self.disks_first_acked.fetch_add(1, Ordering::Relaxed) + 1;
        if acked == self.disks.load(Ordering::Relaxed) {
            self.onboarded.get_or_init(Instant::now);
        }
    }

    /// `(p50, p99)` lag in milliseconds of writes drawn after onboarding, if any.
    pub fn steady_lag_ms(&self) -> Option<(f64, f64)> {
        let g = self.steady_lag_us.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|h| !h.is_empty()).map(|h| {
            (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
            )
        })
    }

    /// `(p50, p99, max)` lag in milliseconds so far.
    pub fn lag_ms(&self) -> (f64, f64, f64) {
        let g = self.lag_us.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(h) if !h.is_empty() => (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
            ),
            _ => (0.0, 0.0, 0.0),
        }
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunReport {
    pub manifest: Manifest,
    pub elapsed: Duration,
    /// Disks that failed, with the reason (a refused stream, a lost acknowledged write).
    pub failures: Vec<String>,
}

/// The generator side of a disk, locked briefly per change and by the tag coordinator.
#[derive(Debug)]
struct GenState {
    source: ChangeSource,
    next_seq: u64,
    /// The first sequence number this agent assigned (after a resume, where the relay
    /// stood).
    first_seq: u64,
    /// Records numbered but not yet sent, in sequence order: tags, resync records, and
    /// a change drawn that did not fit in the credit left.
    pending: VecDeque<Record>,
    /// Encoded bytes of `pending` (a resync waits while it is large).
    pending_bytes: usize,
    tags: Vec<TagRecord>,
    exhausted: bool,
    /// The disk's log reached its tag number `n` and draws nothing more until the tag
    /// coordinator cut it.
    at_log_tag: Option<u64>,
    /// The emulated disk, when it lives in a file: every change is written to it.
    disk: Option<Arc<File>>,
    /// A resync's begin mark was assigned and its end mark not yet: tags cut now are no
    /// recovery point.
    resync_open: bool,
    /// A resync is planned or running: the run waits for it before finishing.
    resync_busy: bool,
    /// Runs of sequence numbers that carried resync records (for the manifest).
    resync_runs: Vec<(u64, u64)>,
    /// Changes drawn from the workload so far.
    changes_drawn: u64,
    /// Where the stream was numbered again (for the manifest).
    renumbers: Vec<Renumber>,
    /// Bumped when a resync starts or its records are lost; a resync task whose epoch
    /// is stale numbers nothing more and stops.
    resync_epoch: u64,
}

impl GenState {
    /// Numbers a resync record (a block read from the disk, or a mark) of the resync
    /// `epoch` and queues it; refused if that resync was superseded.
    fn push_resync(&mut self, epoch: u64, make: impl FnOnce(u64) -> Record) -> Result<u64, String> {
        if self.resync_epoch != epoch {
            return Err("superseded by a newer resync".into());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.push_pending(make(seq));
        match self.resync_runs.last_mut() {
            Some(run) if run.1 + 1 == seq => run.1 = seq,
            _ => self.resync_runs.push((seq, seq)),
        }
        Ok(seq)
    }

    /// Queues a numbered tag or resync record for the stream.
    fn push_pending(&mut self, record: Record) {
        self.pending_bytes += record.encoded_len();
        self.pending.push_back(record);
    }

    /// Applies a change drawn from the workload to the disk file, if there is one.
    fn write_disk(&self, record: &Record) -> std::io::Result<()> {
        match &self.disk {
            Some(f) => fbr_master_target::journal::apply_record(
                record,
                &mut fbr_master_target::replica::FileImage(&**f),
            ),
            None => Ok(()),
        }
    }
}

/// Changes whose `Applied` has not arrived yet, for lag and per-disk throughput:
/// `(seq, drawn_at, encoded frame bytes)`.
/// Bounded: beyond this many, further changes are not sampled until it drains.
const MAX_LAG_SAMPLES_PENDING: usize = 1 << 20;

/// A steady rate for one disk: it may have drawn `bytes_per_s × elapsed` bytes so far.
#[derive(Debug)]
struct Pace {
    bytes_per_s: f64,
    started: Instant,
    drawn: AtomicU64,
    /// Bytes the disk counts as drawn before the start: its phase, between 0 and
    /// [`PACE_PHASE_BYTES`]. Without it every disk drew its first write at once (nothing
    /// drawn is below any allowance), so 1,000 disks at 2 KB/s each began with a burst of
    /// a thousand writes, tens of MB, where a fleet of VMs writes at random phases.
    phase: f64,
}

/// The span of disks' phases: about the largest common write (the profiles draw 4-64
/// KiB), so each disk's first write comes at a random point of its first write interval.
const PACE_PHASE_BYTES: f64 = 64.0 * 1024.0;

impl Pace {
    /// Disk number `index` of a run with `seed`, drawing its share `bytes_per_s`.
    fn new(bytes_per_s: f64, seed: u64, index: usize) -> Pace {
        // A deterministic phase per disk.
        let fraction = (crate::image::mix(seed, index as u64) >> 11) as f64 / (1u64 << 53) as f64;
        Pace {
            bytes_per_s,
            started: Instant::now(),
            drawn: AtomicU64::new(0),
            phase: fraction * PACE_PHASE_BYTES,
        }
    }

    fn allows_more(&self) -> bool {
        (self.drawn.load(Ordering::Relaxed) as f64) + self.phase
            < self.bytes_per_s * self.started.elapsed().as_secs_f64()
    }
}

#[derive(Debug)]
struct DiskRuntime {
    plan: DiskPlan,
    pace: Option<Pace>,
    lag_pending: Mutex<VecDeque<(u64, Instant, u64)>>,
    /// Encoded record bytes (what the relay's egress limit counts) durable at the master
    /// target (sampled like lag).
    applied_frame_bytes: AtomicU64,
    gen: Mutex<GenState>,
    /// The stream's protocol state: records in flight (kept for resend), credit, acks.
    sender: Mutex<StreamSender<Record>>,
    /// Bumped on every ack or credit change; senders wait on it.
    window_changed: watch::Sender<u64>,
    /// Regions that may hold unacknowledged writes (when the disk lives in a file).
    dirty: Option<Mutex<DirtyRegions>>,
    /// Set once the disk's first session was accepted.
    accepted_once: watch::Sender<bool>,
    /// Set once a first record of the disk was acknowledged (for onboarding time).
    first_acked: AtomicBool,
    /// The placement of the last session accepted (a move waits for one at its own).
    accepted_placement: watch::Sender<u64>,
    /// Set once the disk knows whether it resyncs (and its begin mark, if any, is
    /// numbered): the tag coordinator waits for every disk, so no tag is cut before.
    ready: watch::Sender<bool>,
    /// The resync's live progress, for displays and benchmarks.
    resync: Mutex<ResyncLive>,
    resync_marks: Mutex<MarksInFlight>,
    ctx: DiskCtx,
}

/// What a disk's tasks share with the run.
#[derive(Debug, Clone)]
struct DiskCtx {
    /// The VM's relay and placement (shared by the VM's disks).
    route: Arc<VmRoute>,
    stats: Arc<RunStats>,
    reconnect_timeout: Duration,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

/// Where a disk's resync stands, live.
#[derive(Debug, Clone, Default)]
pub struct ResyncLive {
    pub mode: Option<ResyncMode>,
    /// Regions compared and sent by this agent (of `regions_total` in the resync).
    pub regions_done: u64,
    pub regions_total: u64,
    /// Regions of the disk the master target has applied the resync up to (from the
    /// progress marks it acknowledged), of `disk_regions`.
    pub applied_region: u64,
    pub disk_regions: u64,
    pub compared_bytes: u64,
    pub sent_bytes: u64,
    pub hash_bytes: u64,
    /// Until the replica is in step, at the rate the master target applied the last
    /// 30 s.
    pub eta: Option<Duration>,
    pub started: Option<Instant>,
    /// When the agent numbered the end mark.
    pub finished: Option<Instant>,
    /// When the master target applied it: the replica is resynced (the next tag is a
    /// recovery point).
    pub in_step: Option<Instant>,
}

/// Marks numbered and not yet applied at the master target, for the resync's applied
/// progress and ETA.
#[derive(Debug)]
struct MarksInFlight {
    /// `(seq, next_region, is_end)`, in sequence order.
    marks: VecDeque<(u64, u64, bool)>,
    rate: fbr_protocol::resync::RateEstimator,
}

impl Default for MarksInFlight {
    fn default() -> Self {
        MarksInFlight {
            marks: VecDeque::new(),
            rate: fbr_protocol::resync::RateEstimator::new(Duration::from_secs(30)),
        }
    }
}

impl DiskRuntime {
    /// Starts a resync of `plan` unless one runs (`restart`: the running one's records
    /// were lost, so it starts over).
    fn start_resync(self: &Arc<Self>, plan: ResyncPlan, restart: bool) {
        let epoch = {
            let mut g = self.lock_gen();
            if g.disk.is_none() {
                tracing::warn!(stream = %self.plan.id, "a resync was asked for, but the disk has no file to read");
                return;
            }
            if g.resync_busy && !restart {
                return;
            }
            g.resync_busy = true;
            g.resync_open = false;
            g.resync_epoch += 1;
            // Nothing is drawn and no tag is cut until the resync's begin mark is
            // numbered (or it is decided there is none): a tag before the mark would be
            // a recovery point at the master target, which does not yet know the
            // replica is behind.
            self.ready.send_replace(false);
            g.resync_epoch
        };
        let t = tokio::spawn(resync::drive(self.clone(), plan, epoch));
        self.ctx
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t.abort_handle());
    }

    /// The relay lost records it had acknowledged: number again from `next_seq`, and
    /// forget what was numbered since (a resync replaces it).
    fn renumber(&self, next_seq: u64) {
        let mut g = self.lock_gen();
        g.next_seq = next_seq;
        // The replica lacks what the lost records carried: from here until the resync
        // that repairs it has numbered its begin mark, nothing is drawn and no tag is
        // cut (a tag now would be a recovery point at the master target that differs
        // from the source). A disk without a file cannot resync: its tags are no
        // recovery point and it goes on.
        if g.disk.is_some() {
            self.ready.send_replace(false);
        }
        // A resync running now lost its records too: it must not number more.
        g.resync_epoch += 1;
        g.resync_open = false;
        g.pending.clear();
        g.pending_bytes = 0;
        g.tags.retain(|t| t.seq < next_seq);
        g.resync_runs.retain(|(first, _)| *first < next_seq);
        if let Some(last) = g.resync_runs.last_mut() {
            last.1 = last.1.min(next_seq - 1);
        }
        let changes_drawn = g.changes_drawn;
        g.renumbers.push(Renumber {
            at_seq: next_seq,
            changes_drawn,
        });
        drop(g);
        self.lag_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.resync_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .marks
            .clear();
    }

    fn lock_sender(&self) -> std::sync::MutexGuard<'_, StreamSender<Record>> {
        self.sender.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_gen(&self) -> std::sync::MutexGuard<'_, GenState> {
        self.gen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the relay acknowledged (durable in its cache): counts their bytes, and
    /// lets the dirty regions they covered go.
    fn count_acked(&self, records: Vec<Record>, stats: &RunStats) {
        if !records.is_empty() && !self.first_acked.swap(true, Ordering::Relaxed) {
            stats.first_ack();
        }
        if let (Some(dirty), Some(last)) = (&self.dirty, records.last()) {
            let produced = self.lock_gen().next_seq - 1;
            let mut d = dirty.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = d.acked(last.seq(), produced) {
                tracing::warn!(stream = %self.plan.id, "dirty regions file: {e}");
            }
        }
        for record in records {
            if let Record::Write { data, .. } = &record {
                stats
                    .data_bytes_acked
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if !matches!(record, Record::Tag { .. }) {
                stats
                    .logical_bytes_acked
                    .fetch_add(record.logical_bytes(), Ordering::Relaxed);
                stats.records_acked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A resync mark was numbered `seq`: where the resync stands once it is applied.
    fn mark_numbered(&self, seq: u64, next_region: u64, is_end: bool) {
        self.resync_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .marks
            .push_back((seq, next_region, is_end));
    }

    /// Follows the resync's marks the master target applied: its progress there, the
    /// ETA at that rate, and when the replica is in step.
    fn resync_applied(&self, seq: u64) {
        let mut m = self.resync_marks.lock().unwrap_or_else(|p| p.into_inner());
        let mut reached = None;
        while m.marks.front().is_some_and(|(s, _, _)| *s <= seq) {
            reached = m.marks.pop_front();
        }
        let Some((_, region, is_end)) = reached else {
            return;
        };
        let now = Instant::now();
        m.rate.observe(now, region);
        let mut live = self.resync.lock().unwrap_or_else(|p| p.into_inner());
        live.applied_region = region;
        live.eta = m.rate.eta(live.disk_regions.saturating_sub(region));
        if is_end {
            live.in_step = Some(now);
            live.eta = Some(Duration::ZERO);
            m.rate = fbr_protocol::resync::RateEstimator::new(Duration::from_secs(30));
        }
    }

    /// Bytes of changes sent and not yet at the master target (from the lag samples,
    /// which cover every change below a million in flight).
    fn unapplied_bytes(&self) -> u64 {
        let pending = self.lag_pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.iter().map(|(_, _, bytes)| bytes).sum()
    }

    /// Whether the master target holds everything this disk drew (nothing queued,
    /// in flight or unapplied; no resync under way): a move may switch relays.
    fn drained(&self) -> bool {
        let g = self.lock_gen();
        let sender = self.lock_sender();
        g.pending.is_empty()
            && !g.resync_busy
            && sender.all_acknowledged()
            && sender.applied() >= g.next_seq - 1
    }

    /// `Applied`: everything up to `seq` is at the master target; records the lag.
    fn applied(&self, seq: u64, stats: &RunStats) {
        self.resync_applied(seq);
        let now = Instant::now();
        let onboarded = stats.onboarded.get().copied();
        let mut lags = Vec::new();
        {
            let mut pending = self.lag_pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.front().is_some_and(|(s, _, _)| *s <= seq) {
                let (_, drawn_at, bytes) = pending.pop_front().expect("front checked");
                let steady = onboarded.is_some_and(|t| drawn_at >= t);
                lags.push((now.duration_since(drawn_at).as_micros() as u64, steady));
                self.applied_frame_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        if !lags.is_empty() {
            let mut all = stats.lag_us.lock().unwrap_or_else(|p| p.into_inner());
            let mut steady = stats
                .steady_lag_us
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (l, is_steady) in lags {
                if let Some(h) = all.as_mut() {
                    h.saturating_record(l.max(1));
                }
                if let (true, Some(h)) = (is_steady, steady.as_mut()) {
                    h.saturating_record(l.max(1));
                }
            }
        }
    }
}

/// Moves a run's VMs between relays ([`RunHandle::mover`]).
#[derive(Debug, Clone)]
pub struct Mover {
    disks: Vec<Arc<DiskRuntime>>,
    endpoint: quinn::Endpoint,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Mover {
    /// Moves VM `vm` to `to` (see [`start_move`]); the watch follows the move.
    pub fn move_vm(
        &self,
        vm: &str,
        to: Route,
        drain: bool,
        drain_timeout: Duration,
    ) -> Result<watch::Receiver<MoveProgress>, String> {
        let disks: Vec<_> = self
            .disks
            .iter()
            .filter(|d| d.plan.id.vm == vm)
            .cloned()
            .collect();
        if disks.is_empty() {
            return Err(format!("this agent writes no disk of VM {vm}"));
        }
        let (rx, task) = start_move(disks, self.endpoint.clone(), to, drain, drain_timeout)?;
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task.abort_handle());
        Ok(rx)
    }

    /// The placement VM `vm` writes at now (`None`: not one of this run's VMs).
    pub fn placement(&self, vm: &str) -> Option<u64> {
        self.disks
            .iter()
            .find(|d| d.plan.id.vm == vm)
            .map(|d| d.ctx.route.placement.load(Ordering::SeqCst))
    }
}

/// Shuts a run's VMs down ([`RunHandle::power_switch`]): the emulated hypervisor.
#[derive(Debug, Clone)]
pub struct PowerSwitch {
    disks: Vec<Arc<DiskRuntime>>,
}

impl PowerSwitch {
    /// Shuts VM `vm` down as its hypervisor would: it writes nothing more. Returns once
    /// a tag cut after its last write is acknowledged by the relay on every one of its
    /// disks (so the relay holds its final state, as a recovery point), or why not
    /// within `timeout`.
    pub async fn shut_down_vm(&self, vm: &str, timeout: Duration) -> Result<(), String> {
        let disks: Vec<_> = self.disks.iter().filter(|d| d.plan.id.vm == vm).collect();
        let Some(first) = disks.first() else {
            return Err(format!("this agent writes no disk of VM {vm}"));
        };
        first.ctx.route.powered_off.store(true, Ordering::SeqCst);
        // Every record numbered from here on is a tag (or resync bookkeeping): the
        // first tag at or after this point covers the VM's last write.
        let after: Vec<u64> = disks.iter().map(|d| d.lock_gen().next_seq).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let covered = disks.iter().zip(&after).all(|(d, from)| {
                let tag = d
                    .lock_gen()
                    .tags
                    .iter()
                    .find(|t| t.seq >= *from)
                    .map(|t| t.seq);
                tag.is_some_and(|seq| d.lock_sender().acked() >= seq)
            });
            if covered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "VM {vm}: its final tag was not acknowledged within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running emulation: start it, watch [`RunHandle::stats`], then [`RunHandle::finish`].
#[derive(Debug)]
pub struct RunHandle {
    pub stats: Arc<RunStats>,
    disks: Vec<Arc<DiskRuntime>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<RunReport, String>>,
    /// Every task of the run, for [`RunHandle::kill`].
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    endpoint: quinn::Endpoint,
}

impl RunHandle {
    /// Ends the run as kill -9 would end a real agent: every task stops where it is,
    /// connections drop, what was not acknowledged is lost from memory (the disk files
    /// and their dirty regions stay).
    pub fn kill(self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
        self.task.abort();
        self.endpoint.close(0u32.into(), b"agent killed");
    }

    /// Asks the run to stop drawing changes now (a final tag is still inserted).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Encoded record bytes each disk has had applied at the master target so far, in
    /// plan order (the unit of the relay's egress limit).
    pub fn applied_frame_bytes_per_disk(&self) -> Vec<u64> {
        self.disks
            .iter()
            .map(|d| d.applied_frame_bytes.load(Ordering::Relaxed))
            .collect()
    }

    /// What moves the run's VMs between relays (it may outlive the handle's borrow).
    pub fn mover(&self) -> Mover {
        Mover {
            disks: self.disks.clone(),
            endpoint: self.endpoint.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// What shuts the run's VMs down (it may outlive the handle's borrow).
    pub fn power_switch(&self) -> PowerSwitch {
        PowerSwitch {
            disks: self.disks.clone(),
        }
    }

    /// Whether the run has ended (every disk done or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Each disk's resync, in plan order.
    pub fn resync_progress(&self) -> Vec<ResyncLive> {
        self.disks
            .iter()
            .map(|d| d.resync.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Waits for the run to end and returns its report.
    pub async fn finish(self) -> Result<RunReport, String> {
        self.task.await.map_err(|e| format!("run task: {e}"))?
    }
}

/// Starts emulating `disks` against the relay in `opts`.
pub fn start(opts: AgentOptions, disks: Vec<DiskPlan>, seed: u64) -> Result<RunHandle, String> {
    if disks.is_empty() {
        return Err("nothing to emulate: no disks".into());
    }
    let creds = Credentials::load(&opts.pki_dir, &opts.cert_name).map_err(|e| e.to_string())?;
    let endpoint = client_endpoint(any_addr_for(opts.relay), creds, &opts.tuning)
        .map_err(|e| e.to_string())?;
    let pools = ContentPools::new(seed);
    let stats = RunStats::new();
    stats.disks.store(disks.len() as u64, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));

    let tasks = Arc::new(Mutex::new(Vec::new()));
    // One connection per VM, as one agent per VM would have.
    let mut routes: BTreeMap<String, Arc<VmRoute>> = BTreeMap::new();
    let mut runtimes = Vec::new();
    let disk_count = disks.len();
    for plan in disks {
        routes.entry(plan.id.vm.clone()).or_insert_with(|| {
            let route = opts.routes.get(&plan.id.vm).cloned().unwrap_or(Route {
                relay: opts.relay,
                relay_name: opts.relay_name.clone(),
                placement: 0,
            });
            Arc::new(VmRoute {
                link: Mutex::new(Arc::new(PeerLink::new(
                    endpoint.clone(),
                    route.relay,
                    route.relay_name,
                    Role::Relay,
                ))),
                placement: AtomicU64::new(route.placement),
                draining: AtomicBool::new(false),
                powered_off: AtomicBool::new(false),
            })
        });
        let source = ChangeSource::open(&plan.source, plan.disk_size, &pools)?;
        let (disk, dirty) = open_disk_file(&plan)?;
        let plan_vm = plan.id.vm.clone();
        let resync_busy =
            disk.is_some() && (plan.start.resync != ResyncPlan::None || plan.start.resume);
        let ready = watch::channel(!resync_busy).0;
        runtimes.push(Arc::new(DiskRuntime {
            plan,
            gen: Mutex::new(GenState {
                source,
                next_seq: 1,
                first_seq: 1,
                pending: VecDeque::new(),
                pending_bytes: 0,
                tags: vec![],
                exhausted: false,
                at_log_tag: None,
                disk,
                resync_open: false,
                resync_busy,
                resync_runs: Vec::new(),
                changes_drawn: 0,
                renumbers: Vec::new(),
                resync_epoch: 0,
            }),
            dirty: dirty.map(Mutex::new),
            accepted_once: watch::channel(false).0,
            first_acked: AtomicBool::new(false),
            accepted_placement: watch::channel(0).0,
            ready,
            resync: Mutex::new(ResyncLive::default()),
            resync_marks: Mutex::new(MarksInFlight::default()),
            ctx: DiskCtx {
                route: routes[&plan_vm].clone(),
                stats: stats.clone(),
                reconnect_timeout: opts.reconnect_timeout,
                tasks: tasks.clone(),
            },
            sender: Mutex::new(StreamSender::new(SenderConfig::agent(
                opts.reconnect_timeout,
            ))),
            window_changed: watch::channel(0).0,
            lag_pending: Mutex::new(VecDeque::new()),
            applied_frame_bytes: AtomicU64::new(0),
            pace: opts
                .rate_bytes_per_s
                .map(|r| Pace::new(r as f64 / disk_count as f64, seed, runtimes.len())),
        }));
    }
    let disks = runtimes.clone();
    let task = tokio::spawn(run(
        opts,
        runtimes,
        RunShared {
            stats: stats.clone(),
            stop: stop.clone(),
            tasks: tasks.clone(),
        },
        seed,
        endpoint.clone(),
    ));
    Ok(RunHandle {
        stats,
        disks,
        stop,
        task,
        tasks,
        endpoint,
    })
}

/// Moves VM `vm` to `to` (a relay, at a higher placement), as the configuration
/// server asked. With `drain`, the VM's disks first stop drawing changes and wait, up
/// to `drain_timeout`, until the master target holds everything the old relay
/// acknowledged (nothing is lost and nothing is resent); otherwise, or when the drain
/// times out (the old relay is lost), they move at once and each disk's sender is told
/// so ([`StreamSender::moved_off_lost_relay`]): the new relay continues where the
/// master target stands, and a delta resync replaces whatever the old relay held. The
/// returned watch follows the move until `done` or `failed`.
fn start_move(
    disks: Vec<Arc<DiskRuntime>>,
    endpoint: quinn::Endpoint,
    to: Route,
    drain: bool,
    drain_timeout: Duration,
) -> Result<(watch::Receiver<MoveProgress>, tokio::task::JoinHandle<()>), String> {
    let route = disks
        .first()
        .map(|d| d.ctx.route.clone())
        .ok_or("this agent writes no disk of that VM")?;
    let current = route.placement.load(Ordering::SeqCst);
    if to.placement <= current {
        return Err(format!(
            "placement {} is not above the VM's current {current}",
            to.placement
        ));
    }
    let (tx, rx) = watch::channel(MoveProgress {
        version: fbr_enroll::wire::API_VERSION,
        phase: Some(if drain {
            MovePhase::Draining
        } else {
            MovePhase::Switching
        }),
        ..MoveProgress::default()
    });
    let task = tokio::spawn(async move {
        let plan = MovePlan {
            to,
            drain,
            drain_timeout,
            accept_timeout: disks[0].ctx.reconnect_timeout,
        };
        let outcome = run_move(&disks, &route, endpoint, &plan, &tx).await;
        tx.send_modify(|p| match outcome {
            Ok(()) => p.phase = Some(MovePhase::Done),
            Err(e) => {
                p.phase = Some(MovePhase::Failed);
                p.error = Some(e);
            }
        });
    });
    Ok((rx, task))
}

/// Where a move goes and how.
struct MovePlan {
    to: Route,
    drain: bool,
    drain_timeout: Duration,
    /// How long each disk may take to be accepted by the new relay.
    accept_timeout: Duration,
}

async fn run_move(
    disks: &[Arc<DiskRuntime>],
    route: &VmRoute,
    endpoint: quinn::Endpoint,
    plan: &MovePlan,
    progress: &watch::Sender<MoveProgress>,
) -> Result<(), String> {
    let to = &plan.to;
    let started = Instant::now();
    route.draining.store(true, Ordering::SeqCst);
    let unapplied = || disks.iter().map(|d| d.unapplied_bytes()).sum::<u64>();
    let to_drain = unapplied();
    progress.send_modify(|p| p.bytes_to_drain = to_drain);
    let mut fell_back = None;
    if plan.drain {
        let deadline = started + plan.drain_timeout;
        while !disks.iter().all(|d| d.drained()) {
            if Instant::now() >= deadline {
                fell_back = Some(format!(
                    "the old relay did not drain the VM within {} s",
                    plan.drain_timeout.as_secs()
                ));
                break;
            }
            let drained = to_drain.saturating_sub(unapplied());
            progress.send_modify(|p| {
                p.bytes_drained = drained;
                p.drain_ms = started.elapsed().as_millis() as u64;
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        fell_back = Some("the old relay is disconnected".to_owned());
    }
    let drained = if fell_back.is_none() {
        to_drain
    } else {
        to_drain.saturating_sub(unapplied())
    };
    progress.send_modify(|p| {
        p.phase = Some(MovePhase::Switching);
        p.bytes_drained = drained;
        p.drain_ms = started.elapsed().as_millis() as u64;
        p.fell_back = fell_back.clone();
    });
    // Switch: every later session of the VM's disks goes to the new relay, at the new
    // placement; the old connection is closed so the current ones end now.
    let new_link = Arc::new(PeerLink::new(
        endpoint,
        to.relay,
        to.relay_name.clone(),
        Role::Relay,
    ));
    let old_link = std::mem::replace(
        &mut *route.link.lock().unwrap_or_else(|p| p.into_inner()),
        new_link,
    );
    if let Some(why) = &fell_back {
        for d in disks {
            d.lock_sender()
                .moved_off_lost_relay(to.placement, why.clone());
        }
    }
    route.placement.store(to.placement, Ordering::SeqCst);
    route.draining.store(false, Ordering::SeqCst);
    old_link.close("the VM moved to another relay").await;
    for d in disks {
        d.window_changed.send_modify(|v| *v += 1);
        let mut accepted = d.accepted_placement.subscribe();
        let waited = tokio::time::timeout(
            plan.accept_timeout,
            accepted.wait_for(|p| *p >= to.placement),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(format!(
                "{}: not accepted by relay {} ({}) within {} s",
                d.plan.id,
                to.relay_name,
                to.relay,
                plan.accept_timeout.as_secs()
            ));
        }
    }
    if fell_back.is_some() {
        progress.send_modify(|p| p.phase = Some(MovePhase::Resyncing));
        while disks.iter().any(|d| d.lock_gen().resync_busy) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tracing::info!(
        vm = %disks[0].plan.id.vm,
        to = %to.relay_name,
        placement = to.placement,
        drained_bytes = drained,
        seconds = started.elapsed().as_secs_f64(),
        "VM moved"
    );
    Ok(())
}

/// Opens (creating from its base image if new) the disk's file and its dirty regions.
#[allow(clippy::type_complexity)]
fn open_disk_file(plan: &DiskPlan) -> Result<(Option<Arc<File>>, Option<DirtyRegions>), String> {
    let Some(path) = &plan.start.disk_file else {
        if plan.start.resync != ResyncPlan::None || !plan.start.source_base.is_empty() {
            return Err(format!(
                "{}: a disk that starts with data or resyncs needs a disk file",
                plan.id
            ));
        }
        return Ok((None, None));
    };
    let file = if path.exists() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        plan.start
            .source_base
            .create_file(path, plan.disk_size)
            .map_err(|e| format!("{}: {e}", path.display()))?
    };
    let mut dirty_path = path.clone().into_os_string();
    dirty_path.push(".dirty");
    let dirty = DirtyRegions::open(std::path::Path::new(&dirty_path), plan.disk_size)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((Some(Arc::new(file)), Some(dirty)))
}

/// What a run shares with its handle.
struct RunShared {
    stats: Arc<RunStats>,
    /// Set by [`RunHandle::request_stop`].
    stop: Arc<AtomicBool>,
    /// Every task the run spawns, for [`RunHandle::kill`].
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

async fn run(
    opts: AgentOptions,
    disks: Vec<Arc<DiskRuntime>>,
    shared: RunShared,
    seed: u64,
    endpoint: quinn::Endpoint,
) -> Result<RunReport, String> {
    let RunShared {
        stats,
        stop,
        tasks: spawned,
    } = shared;
    let started = Instant::now();
    let drawing_stopped = Arc::new(AtomicBool::new(false));
    let mut groups: BTreeMap<String, Vec<Arc<DiskRuntime>>> = BTreeMap::new();
    for d in &disks {
        groups
            .entry(d.plan.group.clone())
            .or_default()
            .push(d.clone());
    }

    let mut tasks = Vec::new();
    for d in &disks {
        tasks.push(tokio::spawn(drive_disk(
            d.clone(),
            stats.clone(),
            drawing_stopped.clone(),
        )));
        let planned = {
            let mut g = d.lock_gen();
            g.resync_epoch += 1;
            g.resync_busy.then_some(g.resync_epoch)
        };
        if let Some(epoch) = planned {
            // Planned at start (or a resumed disk): marked busy already.
            let t = tokio::spawn(resync::drive(d.clone(), d.plan.start.resync, epoch));
            spawned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t.abort_handle());
        }
    }
    spawned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(tasks.iter().map(|t| t.abort_handle()));
    // No tag before every disk knows whether it resyncs (its begin mark numbered).
    for d in &disks {
        let mut ready = d.ready.subscribe();
        if ready.wait_for(|r| *r).await.is_err() {
            break;
        }
    }

    // Tag coordinator; also decides when to stop drawing.
    let mut tag_id = 0u64;
    let mut ticker = tokio::time::interval(opts.tag_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut failed_early = false;
    // The churn lasts `duration` once every disk is in step (resyncs done), so a run
    // that starts with a resync still ends on recovery points.
    let mut in_step_since = None;
    loop {
        if disks.iter().any(|d| d.lock_gen().resync_busy) {
            in_step_since = None;
        } else if in_step_since.is_none() {
            in_step_since = Some(Instant::now());
        }
        let deadline_passed = opts
            .duration
            .is_some_and(|d| in_step_since.is_some_and(|t| t.elapsed() >= d));
        let all_exhausted = disks.iter().all(|d| d.lock_gen().exhausted);
        if tasks.iter().all(|t| t.is_finished()) {
            failed_early = true;
            break;
        }
        if deadline_passed || all_exhausted || stop.load(Ordering::SeqCst) {
            break;
        }
        if let Some(log_tags) = &opts.log_tags {
            // A replayed log's tags, where the log has them.
            if let Some(n) = cut_log_tag(&groups, log_tags, &stats) {
                tag_id = n;
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            continue;
        }
        tokio::select! {
            _ = ticker.tick() => {
                tag_id += 1;
                for (group, members) in &groups {
                    // A disk waiting for its resync's begin mark holds the group's tags
                    // back (they would be recovery points the replica does not match).
                    if members.iter().all(|d| *d.ready.borrow()) {
                        cut(group, members, tag_id, opts.app_tag_every, &stats);
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    // The final state is a recovery point too.
    if !failed_early {
        tag_id += 1;
        for (group, members) in &groups {
            cut(group, members, tag_id, opts.app_tag_every, &stats);
        }
    }
    drawing_stopped.store(true, Ordering::SeqCst);

    let mut failures = Vec::new();
    for (t, d) in tasks.into_iter().zip(&disks) {
        match tokio::time::timeout(opts.drain_timeout + opts.reconnect_timeout, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(format!("{}: {e}", d.plan.id)),
            Ok(Err(e)) => failures.push(format!("{}: task failed: {e}", d.plan.id)),
            Err(_) => failures.push(format!(
                "{}: not fully acknowledged within the drain timeout",
                d.plan.id
            )),
        }
    }
    endpoint.close(0u32.into(), b"run finished");
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        seed,
        disks: disks
            .iter()
            .map(|d| {
                let g = d.lock_gen();
                let acked_seq = d.lock_sender().acked();
                DiskManifest {
                    vm: d.plan.id.vm.clone(),
                    disk: d.plan.id.disk,
                    disk_size: d.plan.disk_size,
                    group: d.plan.group.clone(),
                    source: d.plan.source.clone(),
                    last_seq: g.next_seq - 1,
                    acked_seq,
                    tags: g.tags.clone(),
                    source_base: d.plan.start.source_base.clone(),
                    replica_base: d.plan.start.replica_base.clone(),
                    first_seq: g.first_seq,
                    resync_runs: g.resync_runs.clone(),
                    renumbers: g.renumbers.clone(),
                }
            })
            .collect(),
    };
    Ok(RunReport {
        manifest,
        elapsed: started.elapsed(),
        failures,
    })
}

/// Inserts tag `id` on every disk of `group` at one consistent cut.
fn cut(group: &str, members: &[Arc<DiskRuntime>], id: u64, app_every: u64, stats: &RunStats) {
    let app = app_every > 0 && id % app_every == 0;
    let mut guards: Vec<_> = members.iter().map(|d| d.lock_gen()).collect();
    cut_locked(group, &mut guards, id, app, None);
    stats.tags_inserted.fetch_add(1, Ordering::Relaxed);
}

/// Cuts the earliest tag of a replayed log once every disk has drawn all its changes
/// before it (every disk waits at a tag or is exhausted): tag `n` on the disks that
/// wait at `n` (a disk declared after it waits at a later one). Returns `n`, or `None`
/// when some disk is still drawing.
fn cut_log_tag(
    groups: &BTreeMap<String, Vec<Arc<DiskRuntime>>>,
    log_tags: &[crate::writelog::LogTag],
    stats: &RunStats,
) -> Option<u64> {
    let mut earliest: Option<u64> = None;
    for members in groups.values() {
        for d in members {
            let g = d.lock_gen();
            match g.at_log_tag {
                Some(n) => earliest = Some(earliest.map_or(n, |e| e.min(n))),
                None if g.exhausted => {}
                None => return None,
            }
        }
    }
    let n = earliest?;
    let tag = log_tags.get(n as usize - 1);
    for (group, members) in groups {
        let covered: Vec<&Arc<DiskRuntime>> = members
            .iter()
            .filter(|d| d.lock_gen().at_log_tag == Some(n))
            .collect();
        if covered.is_empty() {
            continue;
        }
        let mut guards: Vec<_> = covered.iter().map(|d| d.lock_gen()).collect();
        cut_locked(
            group,
            &mut guards,
            n,
            tag.is_some_and(|t| t.app),
            tag.map(|t| t.name.clone()),
        );
        for g in guards.iter_mut() {
            g.at_log_tag = None;
        }
        drop(guards);
        for d in covered {
            d.window_changed.send_modify(|v| *v += 1);
        }
        stats.tags_inserted.fetch_add(1, Ordering::Relaxed);
    }
    Some(n)
}

/// Numbers and queues tag `id` on every locked member (locked together, always in the
/// same order, so no disk draws during the cut).
fn cut_locked(
    group: &str,
    guards: &mut [std::sync::MutexGuard<'_, GenState>],
    id: u64,
    app: bool,
    name: Option<String>,
) {
    let kind = if app { TagKind::App } else { TagKind::Crash };
    let members = guards.len() as u32;
    for g in guards.iter_mut() {
        let seq = g.next_seq;
        g.next_seq += 1;
        g.push_pending(Record::Tag {
            seq,
            id,
            kind,
            members,
            group: group.to_owned(),
        });
        let in_resync = g.resync_open;
        g.tags.push(TagRecord {
            id,
            seq,
            app,
            in_resync,
            name: name.clone(),
        });
    }
}

/// Runs sessions for one disk until it is done, reconnecting (with the machine's
/// backoff) on transient failures.
async fn drive_disk(
    disk: Arc<DiskRuntime>,
    stats: Arc<RunStats>,
    drawing_stopped: Arc<AtomicBool>,
) -> Result<(), String> {
    loop {
        // The VM's relay as it stands now: a move changes it between two sessions.
        let link = disk.ctx.route.link();
        let Err(end) = session(&disk, &link, &stats, &drawing_stopped).await else {
            return Ok(());
        };
        let next = disk.lock_sender().session_ended(&end, Instant::now());
        match next {
            Reconnect::GiveUp(reason) => {
                // Stop drawing for this disk so the run can finish.
                disk.lock_gen().exhausted = true;
                return Err(reason);
            }
            Reconnect::After(delay) => {
                tracing::info!(stream = %disk.plan.id, "reconnecting in {delay:?}: {end}");
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One stream session: Hello, reconcile with Accept, resend, then send and collect acks.
/// `Ok` once everything drawn was acknowledged and applied and the source stopped.
async fn session(
    disk: &Arc<DiskRuntime>,
    link: &PeerLink,
    stats: &Arc<RunStats>,
    drawing_stopped: &AtomicBool,
) -> Result<(), SessionEnd> {
    let (send, recv) = link
        .open_stream()
        .await
        .map_err(|e| SessionEnd::retry(e.to_string()))?;
    let mut reader = FrameReader::new(recv);
    let mut writer = FrameWriter::new(send);
    let produced = disk.lock_gen().next_seq - 1;
    let placement = disk.ctx.route.placement.load(Ordering::SeqCst);
    let hello = {
        let mut sender = disk.lock_sender();
        let position = SourcePosition {
            resend_from: sender.acked() + 1,
            produced,
            // A resumed disk continues where the relay stands.
            receiver_may_lead: disk.plan.start.resume,
        };
        sender.start(
            Instant::now(),
            disk.plan.id.clone(),
            disk.plan.disk_size,
            placement,
            position,
        )
    };
    writer
        .send(&hello)
        .await
        .map_err(|e| SessionEnd::retry(format!("sending Hello: {e}")))?;
    let deadline = disk.lock_sender().poll_timeout();
    // The relay may ask for a resync before it accepts (it lost records).
    let mut resync_asked = None;
    let mut renumbered = false;
    let resend: Vec<Record> = loop {
        let answer = match reader.receive_until(deadline).await {
            Some(incoming) => disk.lock_sender().handle(incoming),
            None => Err(disk
                .lock_sender()
                .handle_timeout(Instant::now())
                .unwrap_or_else(|| SessionEnd::retry("no Accept in time"))),
        };
        // Reconcile: whatever the relay holds is acknowledged; the rest is resent.
        match answer? {
            SenderEvent::ResyncRequested { mode, reason } => {
                tracing::info!(stream = %disk.plan.id, "the relay asks for a resync: {reason}");
                resync_asked = Some(mode);
            }
            SenderEvent::Accepted { released, next_seq } => {
                if disk.plan.start.resume && !*disk.accepted_once.borrow() {
                    // A resumed disk numbers on from where the relay stands.
                    let mut g = disk.lock_gen();
                    if g.next_seq == 1 {
                        g.next_seq = next_seq;
                        g.first_seq = next_seq;
                    }
                }
                disk.accepted_once.send_replace(true);
                disk.count_acked(released, stats);
                break disk.lock_sender().unacked().cloned().collect();
            }
            SenderEvent::Renumbered {
                next_seq, reason, ..
            } => {
                tracing::warn!(
                    stream = %disk.plan.id,
                    next_seq,
                    "the relay lost acknowledged records ({reason}); numbering again, resync follows"
                );
                disk.renumber(next_seq);
                disk.accepted_once.send_replace(true);
                renumbered = true;
                break Vec::new();
            }
            other => {
                return Err(SessionEnd::retry(format!(
                    "unexpected answer to Hello: {other:?}"
                )))
            }
        }
    };
    match resync_asked {
        // After a renumbering, a resync in progress lost its records: start over.
        Some(mode) => disk.start_resync(mode.into(), renumbered),
        // Lost records always need a resync, even from a relay that did not ask.
        None if renumbered => disk.start_resync(ResyncPlan::Delta, true),
        None => {}
    }
    // Accepted at this placement (a move waits for it), its resync (if any) marked.
    disk.accepted_placement.send_replace(placement);
    let mut window_rx = disk.window_changed.subscribe();

    // Acks arrive concurrently with sending.
    let ack_disk = disk.clone();
    let ack_stats = stats.clone();
    let mut acks = tokio::spawn(async move {
        loop {
            let incoming = reader.receive().await;
            let event = ack_disk.lock_sender().handle(incoming);
            match event {
                Ok(SenderEvent::Acked { released, .. }) => {
                    ack_disk.count_acked(released, &ack_stats)
                }
                Ok(SenderEvent::Applied { seq }) => ack_disk.applied(seq, &ack_stats),
                Ok(SenderEvent::ResyncRequested { mode, reason }) => {
                    tracing::info!(stream = %ack_disk.plan.id, "the relay asks for a resync: {reason}");
                    ack_disk.start_resync(mode.into(), false);
                }
                Ok(
                    SenderEvent::Credit { .. }
                    | SenderEvent::Accepted { .. }
                    | SenderEvent::Renumbered { .. },
                ) => {}
                Err(end) => return end,
            }
            ack_disk.window_changed.send_modify(|v| *v += 1);
        }
    });
    let outcome = send_records(
        disk,
        stats,
        drawing_stopped,
        &mut writer,
        resend,
        &mut window_rx,
        &mut acks,
    )
    .await;
    acks.abort();
    outcome
}

/// Resends what the machine kept, then draws and sends while credit allows, until the
/// run is done or the session ends.
async fn send_records(
    disk: &Arc<DiskRuntime>,
    stats: &Arc<RunStats>,
    drawing_stopped: &AtomicBool,
    writer: &mut FrameWriter,
    resend: Vec<Record>,
    window_rx: &mut watch::Receiver<u64>,
    acks: &mut tokio::task::JoinHandle<SessionEnd>,
) -> Result<(), SessionEnd> {
    for r in resend {
        writer.push(&Frame::Record(r));
        if writer.pending() >= SEND_FLUSH_BYTES {
            if let Err(e) = writer.flush().await {
                return Err(write_failed(e, acks).await);
            }
        }
    }
    loop {
        // Draw and send while credit allows.
        let mut sent_any = false;
        while disk.lock_sender().credit_available() > 0 && writer.pending() < SEND_FLUSH_BYTES {
            let next = {
                let mut g = disk.lock_gen();
                if let Some(record) = g.pending.pop_front() {
                    g.pending_bytes -= record.encoded_len();
                    Some(record)
                } else if drawing_stopped.load(Ordering::SeqCst)
                    || disk.ctx.route.draining.load(Ordering::SeqCst)
                    || disk.ctx.route.powered_off.load(Ordering::SeqCst)
                    || g.exhausted
                    || g.at_log_tag.is_some()
                    || !*disk.ready.borrow()
                    || disk.pace.as_ref().is_some_and(|p| !p.allows_more())
                {
                    None
                } else {
                    match g.source.next_item() {
                        Ok(Some(LogItem::Tag(n))) => {
                            g.at_log_tag = Some(n);
                            None
                        }
                        Ok(Some(LogItem::Change(change))) => {
                            let seq = g.next_seq;
                            g.next_seq += 1;
                            g.changes_drawn += 1;
                            let record = change.into_record(seq);
                            stats
                                .change_bytes_drawn
                                .fetch_add(record.logical_bytes(), Ordering::Relaxed);
                            // The VM writes its disk; the dirty mark goes first, so a
                            // crash never forgets a write the relay did not get.
                            if let Some(dirty) = &disk.dirty {
                                let (offset, len) = match &record {
                                    Record::Write { offset, data, .. } => {
                                        (*offset, data.len() as u64)
                                    }
                                    Record::Zero { offset, len, .. } => (*offset, *len),
                                    _ => (0, 0),
                                };
                                let marked = dirty
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .mark(offset, len);
                                if let Err(e) = marked.and_then(|()| g.write_disk(&record)) {
                                    g.exhausted = true;
                                    return Err(SessionEnd::give_up(format!("disk file: {e}")));
                                }
                            }
                            Some(record)
                        }
                        Ok(None) => {
                            g.exhausted = true;
                            None
                        }
                        Err(e) => {
                            g.exhausted = true;
                            return Err(SessionEnd::give_up(format!("source: {e}")));
                        }
                    }
                }
            };
            let Some(record) = next else { break };
            // A record goes only if it fits in the credit left (or goes alone): what
            // the relay holds for this disk stays within its credit.
            if !disk.lock_sender().may_send(record.encoded_len() as u64) {
                let mut g = disk.lock_gen();
                g.pending_bytes += record.encoded_len();
                g.pending.push_front(record);
                break;
            }
            if let Some(p) = &disk.pace {
                p.drawn.fetch_add(record.logical_bytes(), Ordering::Relaxed);
            }
            let (seq, encoded) = (record.seq(), record.encoded_len() as u64);
            stats
                .logical_bytes_sent
                .fetch_add(record.logical_bytes(), Ordering::Relaxed);
            writer.push(&Frame::Record(record.clone()));
            if !matches!(record, Record::Tag { .. }) {
                let mut lag = disk.lag_pending.lock().unwrap_or_else(|p| p.into_inner());
                if lag.len() < MAX_LAG_SAMPLES_PENDING {
                    lag.push_back((seq, Instant::now(), encoded));
                }
            }
            disk.lock_sender().on_send(seq, seq, encoded, record);
            sent_any = true;
        }
        if writer.pending() > 0 {
            if let Err(e) = writer.flush().await {
                return Err(write_failed(e, acks).await);
            }
        }
        if !sent_any {
            let finished = {
                let g = disk.lock_gen();
                let sender = disk.lock_sender();
                g.pending.is_empty()
                    && !g.resync_busy
                    && (drawing_stopped.load(Ordering::SeqCst) || g.exhausted)
                    && sender.all_acknowledged()
                    && sender.applied() >= g.next_seq - 1
            };
            if finished {
                writer.finish().await;
                return Ok(());
            }
            // Wait for an ack / credit, a stop, or the session's end.
            tokio::select! {
                _ = window_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                end = &mut *acks => {
                    return Err(end.unwrap_or_else(|e| SessionEnd::retry(format!("ack task: {e}"))));
                }
            }
        }
    }
}

/// A write to the relay failed: the relay's refusal, if the ack reader reads one within
/// [`REFUSAL_GRACE`], says what to do; otherwise the write error stands (retry).
async fn write_failed(
    error: std::io::Error,
    acks: &mut tokio::task::JoinHandle<SessionEnd>,
) -> SessionEnd {
    match tokio::time::timeout(REFUSAL_GRACE, acks).await {
        Ok(Ok(end)) if end.is_refusal() => end,
        _ => SessionEnd::retry(format!("sending: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disks of a paced run start at phases spread over one typical write, the same
    /// for the same seed: a thousand disks do not all draw their first write at once.
    #[test]
    fn paced_disks_start_at_spread_phases() {
        let phases: Vec<f64> = (0..1000).map(|i| Pace::new(2_000.0, 7, i).phase).collect();
        assert!(phases.iter().all(|p| (0.0..PACE_PHASE_BYTES).contains(p)));
        let early = phases
            .iter()
            .filter(|p| **p < PACE_PHASE_BYTES / 10.0)
            .count();
        assert!(
            (50..=150).contains(&early),
            "{early} of 1000 phases in the first tenth"
        );
        let again: Vec<f64> = (0..1000).map(|i| Pace::new(2_000.0, 7, i).phase).collect();
        assert_eq!(phases, again);
        // At 2 KB/s, a disk whose phase is half a write draws nothing for 16 s.
        let pace = Pace {
            phase: PACE_PHASE_BYTES / 2.0,
            ..Pace::new(2_000.0, 7, 0)
        };
        assert!(!pace.allows_more());
    }
}
