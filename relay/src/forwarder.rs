//! Forwarders: one long-lived task per stream that sends the stream's cached records to
//! the master target, in sequence order, and frees the cache as the master target
//! acknowledges them.
//!
//! A forwarder is a thin driver of the protocol's [`StreamSender`]
//! ([`Resend::FromSource`](fbr_protocol::stream::Resend::FromSource)): the machine says
//! where the master target stands, how much credit is left, which batches an `Ack`
//! releases, and how a session's end is handled (retry with backoff, resend at once
//! without references, or stop for good). The forwarder reads the cache, reduces
//! ([`crate::reduce`]) and moves frames.
//!
//! It is independent of the agent's session: it keeps draining the backlog while the
//! agent is disconnected, after a relay restart (recovered streams get one at start),
//! and across master-target outages (it reconnects with backoff and resumes from the
//! master target's high-water mark, which is the authority on what arrived). It keeps
//! at most the master target's credit in flight, and reads payloads from disk, so its
//! memory does not grow with the backlog.
//!
//! A record that fails its checksum is never sent: the stream's cached records are
//! dropped, the stream continues at the master target's position, and the stream's
//! agent is asked for a delta resync ([`ForwarderState::resync_needed`]), which
//! replaces whatever the lost records carried.
//!
//! Everything a forwarder uses comes in its [`ForwardContext`]: the master target
//! through [`Upstream`] (QUIC in the relay, an in-memory pipe in tests), the cache
//! through [`ForwardSource`], the egress limit, the known blocks and its few metrics.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fbr_cache::{now_ms, CacheError};
use fbr_protocol::stream::{
    Reconnect, SenderConfig, SenderEvent, SessionEnd, SourcePosition, StreamSender, REFUSAL_GRACE,
};
use fbr_protocol::{ErrorCode, Frame, Recovery, StreamId};
use fbr_transport::{ChunkWrite, FrameReader, FrameWriter, LinkError, PeerLink};
use prometheus::{Histogram, IntCounter};
use tokio::io::AsyncRead;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use crate::egress::Egress;
use crate::error::RelayError;
use crate::reduce::{
    Compression, IntervalPlan, KnownBlocks, RecordSource, Reducer, StageBytes, WanConfig,
};
use fbr_protocol::codec::{
    compressor_cost, CodecMemory, FramePool, StreamCompressor, MIN_STREAM_WINDOW_LOG,
};

/// Most record bytes read from the cache at once: the coalescing window when the
/// stream has a backlog (reductions run on a blocking thread, a few streams at a time).
const READ_WINDOW_BYTES: usize = 8 << 20;
/// Forwarders that may hold a read window in memory at once.
pub const REDUCE_SLOTS: usize = 8;
/// A read of at most this much is reduced on the forwarder's own task: with many slow
/// streams nearly every read is one small record, and a hop to a blocking thread and
/// back (two thread wake-ups) cost more than hashing and compressing it.
const INLINE_REDUCE_BYTES: u64 = 256 << 10;

/// One stream to the master target: frames out, frames in.
pub type UpstreamStream<U> = (
    FrameWriter<<U as Upstream>::Send>,
    FrameReader<<U as Upstream>::Recv>,
);

/// The master target, as forwarders see it: a way to open one stream per disk.
pub trait Upstream: Send + Sync + 'static {
    type Send: ChunkWrite + 'static;
    type Recv: AsyncRead + Unpin + Send + 'static;

    /// Opens a stream to the master target.
    fn open_stream(&self) -> impl Future<Output = Result<UpstreamStream<Self>, LinkError>> + Send;
}

impl Upstream for PeerLink {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;

    async fn open_stream(&self) -> Result<UpstreamStream<Self>, LinkError> {
        let (send, recv) = PeerLink::open_stream(self).await?;
        Ok((FrameWriter::new(send), FrameReader::new(recv)))
    }
}

/// The cache, as forwarders see it: durable records to read, and where they stand.
pub trait ForwardSource: RecordSource {
    /// What the cache can still send of `stream` (checked against the master target's
    /// `Accept`).
    fn position(&self, stream: &StreamId) -> SourcePosition;
    /// Why `stream`'s cached records cannot be forwarded (corruption found at
    /// recovery), if they cannot.
    fn needs_resync(&self, stream: &StreamId) -> Option<String>;
    /// The highest durable sequence number of `stream`, as it changes.
    fn durable(&self, stream: &StreamId) -> watch::Receiver<u64>;
    /// The first recovery point of `stream` at or after `from`, if one is known.
    fn next_tag(&self, stream: &StreamId, from: u64) -> Option<u64>;
    /// The master target holds `stream` up to `seq`: the cache may free it.
    fn ack(&self, stream: &StreamId, seq: u64) -> Result<(), CacheError>;
    /// Forgets `stream`'s records (corruption) and continues it at `next_seq`, where
    /// the master target stands: its source is asked for a resync.
    fn reset_stream(&self, stream: &StreamId, next_seq: u64) -> Result<(), CacheError>;
    /// The placement `stream`'s records here were received at (its forwarder's
    /// `Hello` says it).
    fn placement(&self, stream: &StreamId) -> u64;
    /// Bytes of durable records of `stream` not yet acknowledged by the master target
    /// (an upper bound of what the next read returns); `u64::MAX` if unknown.
    fn backlog_bytes(&self, _stream: &StreamId) -> u64 {
        u64::MAX
    }
    /// Forgets `stream` for good and records `placement` as its current one (the VM
    /// moved; see [`crate::cache::RelayCache::retire`]), unless a placement as high is
    /// on record already (`Ok(false)`). May block briefly.
    fn retire(&self, stream: &StreamId, placement: u64) -> Result<bool, String>;
}

/// The metrics a forwarder moves (handles onto the relay's registry, or unregistered in
/// tests).
#[derive(Debug, Clone)]
pub struct ForwardMetrics {
    pub replication_lag_seconds: Histogram,
    pub records_forwarded_total: IntCounter,
    pub unknown_references_total: IntCounter,
    pub streams_moved_away_total: IntCounter,
}

impl ForwardMetrics {
    /// Metrics that go nowhere (tests that build forwarders without a relay).
    pub fn detached() -> Self {
        let opts = |name: &str| prometheus::Opts::new(name, "unregistered");
        ForwardMetrics {
            replication_lag_seconds: Histogram::with_opts(prometheus::HistogramOpts::new(
                "lag",
                "unregistered",
            ))
            .expect("valid histogram"),
            records_forwarded_total: IntCounter::with_opts(opts("records")).expect("valid counter"),
            unknown_references_total: IntCounter::with_opts(opts("unknown"))
                .expect("valid counter"),
            streams_moved_away_total: IntCounter::with_opts(opts("moved")).expect("valid counter"),
        }
    }
}

/// Everything the forwarders share: the WAN side of the relay.
#[derive(Debug)]
pub struct ForwardContext<U, S> {
    pub upstream: Arc<U>,
    pub source: Arc<S>,
    /// Rate limit and fair sharing of the WAN leg.
    pub egress: Arc<Egress>,
    /// Blocks the master target acknowledged holding: sent as references (dedup).
    pub known_blocks: KnownBlocks,
    pub wan: WanConfig,
    pub metrics: ForwardMetrics,
    /// Memory of the sessions' zstd contexts ([`fbr_protocol::codec`]): each new
    /// session reserves its fair share among [`Self::streams`].
    pub codec_memory: Arc<CodecMemory>,
    /// Contexts lent to framed sessions (those whose share buys no useful window),
    /// reserved from [`Self::codec_memory`].
    pub frame_pool: Arc<FramePool>,
    /// Streams with a forwarder (the fair share's denominator).
    pub streams: AtomicUsize,
    /// Forwarders reducing a read window at once (bounds the memory of windows).
    reduce_slots: Semaphore,
}

impl<U, S> ForwardContext<U, S> {
    pub fn new(
        upstream: Arc<U>,
        source: Arc<S>,
        egress: Arc<Egress>,
        wan: WanConfig,
        known_blocks: usize,
        metrics: ForwardMetrics,
    ) -> Self {
        let codec_memory = CodecMemory::new(if wan.zstd_level > 0 {
            wan.codec_memory
        } else {
            0
        });
        ForwardContext {
            upstream,
            source,
            egress,
            known_blocks: KnownBlocks::new(known_blocks),
            frame_pool: FramePool::new(codec_memory.clone(), wan.zstd_level),
            codec_memory,
            streams: AtomicUsize::new(0),
            wan,
            metrics,
            reduce_slots: Semaphore::new(REDUCE_SLOTS),
        }
    }
}

/// What others may know about a stream's forwarder.
#[derive(Debug)]
pub struct ForwarderState {
    pub disk_size: u64,
    /// The master target's next expected sequence number, once known.
    pub mt_next: watch::Sender<Option<u64>>,
    /// Why forwarding stopped for good (the master target refused the stream).
    pub failed: watch::Sender<Option<String>>,
    /// The relay lost records of this stream it had acknowledged (cache corruption)
    /// or an operator asked: the agent must resync. Cleared when the resync begins.
    pub resync_needed: watch::Sender<Option<ResyncNeed>>,
    /// When the newest recovery point (tag) the master target acknowledged was appended
    /// to the cache, Unix milliseconds; 0 before the first one (the RPO metric).
    pub newest_applied_tag_ms: AtomicU64,
    /// Bytes after each WAN reduction, for this stream.
    pub stages: StageBytes,
    /// The placement this forwarder's records were received at: sent in its `Hello`.
    pub placement: u64,
    /// Why this forwarder stopped because its stream moved (away, or here from
    /// elsewhere): its agent sessions end, and the next one gets a new forwarder.
    pub moved: watch::Sender<Option<String>>,
}

impl ForwarderState {
    pub fn new(disk_size: u64, placement: u64) -> Self {
        ForwarderState {
            disk_size,
            placement,
            moved: watch::channel(None).0,
            mt_next: watch::channel(None).0,
            failed: watch::channel(None).0,
            resync_needed: watch::channel(None).0,
            newest_applied_tag_ms: AtomicU64::new(0),
            stages: StageBytes::default(),
        }
    }
}

/// A resync the stream's agent must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncNeed {
    pub mode: fbr_protocol::ResyncMode,
    pub reason: String,
    /// The relay lost records it had acknowledged: the agent numbers again from where
    /// the master target stands (its session is restarted for that).
    pub records_lost: bool,
}

/// The forwarders of a relay: one per stream, started on demand.
#[derive(Debug)]
pub struct Forwarders<U, S> {
    ctx: Arc<ForwardContext<U, S>>,
    running: Mutex<HashMap<StreamId, Arc<ForwarderState>>>,
}

impl<U: Upstream, S: ForwardSource> Forwarders<U, S> {
    pub fn new(ctx: Arc<ForwardContext<U, S>>) -> Self {
        Forwarders {
            ctx,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<ForwardContext<U, S>> {
        &self.ctx
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamId, Arc<ForwarderState>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The forwarder of `id`, started if it is not running (with `disk_size`, which it
    /// keeps as the size on record, and the placement on record); a forwarder whose
    /// stream moved is replaced.
    pub fn ensure(&self, id: &StreamId, disk_size: u64) -> Arc<ForwarderState> {
        let mut map = self.lock();
        if let Some(f) = map.get(id).filter(|f| f.moved.borrow().is_none()) {
            return f.clone();
        }
        let placement = self.ctx.source.placement(id);
        let state = Arc::new(ForwarderState::new(disk_size, placement));
        map.insert(id.clone(), state.clone());
        self.ctx.streams.store(map.len(), Ordering::Relaxed);
        // A root span: the forwarder outlives the session that happened to start it.
        let span = tracing::info_span!(parent: None, "forward", stream = %id);
        tokio::spawn(run(self.ctx.clone(), id.clone(), state.clone()).instrument(span));
        state
    }

    /// Stops the forwarder of `id` (if one runs) because its stream moved: `why`.
    pub fn retire(&self, id: &StreamId, why: &str) {
        let mut map = self.lock();
        if let Some(f) = map.remove(id) {
            f.moved.send_replace(Some(why.to_owned()));
        }
        self.ctx.streams.store(map.len(), Ordering::Relaxed);
    }

    /// Every forwarder, with its stream.
    pub fn all(&self) -> Vec<(StreamId, Arc<ForwarderState>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A batch sent and not yet acknowledged by the master target.
#[derive(Debug)]
struct SentBatch {
    /// Append time and tag flag of every record the batch covers.
    records: Vec<(u64, bool)>,
    /// Blocks sent as bytes: the master target holds them once it acknowledges.
    literal_hashes: Vec<[u8; 32]>,
}

/// The sender machine, shared by a session's sending loop and its ack reader.
type SharedSender = Arc<Mutex<StreamSender<SentBatch>>>;

fn lock(sender: &SharedSender) -> MutexGuard<'_, StreamSender<SentBatch>> {
    sender.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the forwarder of `id` until the relay shuts down or the stream fails for good.
pub async fn run<U: Upstream, S: ForwardSource>(
    ctx: Arc<ForwardContext<U, S>>,
    id: StreamId,
    state: Arc<ForwarderState>,
) {
    let sender: SharedSender = Arc::new(Mutex::new(StreamSender::new(SenderConfig::forwarder())));
    let mut moved = state.moved.subscribe();
    loop {
        let error = tokio::select! {
            error = session(&ctx, &id, &state, &sender) => error,
            _ = moved.wait_for(Option::is_some) => {
                tracing::info!("forwarder stopped: the stream moved");
                return;
            }
        };
        let end = error.session_end();
        if end.code == Some(ErrorCode::StreamMoved) {
            return moved_away(&ctx, &id, &state, &end).await;
        }
        if end.recovery == Recovery::ResendNow {
            // The master target lost blocks it held (restart, eviction): every reference
            // is suspect. The resend carries bytes until acks teach the relay again what
            // it holds.
            ctx.known_blocks.clear();
            ctx.metrics.unknown_references_total.inc();
        }
        let next = lock(&sender).session_ended(&end, Instant::now());
        match next {
            Reconnect::GiveUp(reason) => {
                tracing::error!("forwarding stopped: {reason}");
                state.failed.send_replace(Some(reason));
                return;
            }
            Reconnect::After(delay) if delay.is_zero() => {
                tracing::info!("resending without references: {end}");
            }
            Reconnect::After(delay) => {
                tracing::warn!("forwarding interrupted, retrying in {delay:?}: {end}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = moved.wait_for(Option::is_some) => return,
                }
            }
        }
    }
}

/// The master target refused the stream as stale: its VM moved to another relay,
/// which the master target has accepted at a higher placement. Whatever this cache
/// holds of the stream came by the superseded path (drained before the move, or
/// replaced by the resync a move off a lost relay runs): it is forgotten for good, at
/// one past this forwarder's placement, so neither a restart nor an agent with a stale
/// assignment brings it back.
async fn moved_away<U: Upstream, S: ForwardSource>(
    ctx: &Arc<ForwardContext<U, S>>,
    id: &StreamId,
    state: &Arc<ForwarderState>,
    end: &SessionEnd,
) {
    tracing::warn!("the stream moved to another relay; forgetting this relay's copy: {end}");
    let (source, stream, placement) = (ctx.source.clone(), id.clone(), state.placement + 1);
    let retired = tokio::task::spawn_blocking(move || source.retire(&stream, placement)).await;
    match retired {
        Ok(Ok(retired)) => {
            if retired {
                ctx.metrics.streams_moved_away_total.inc();
            }
            state
                .moved
                .send_replace(Some(format!("moved to another relay: {end}")));
        }
        Ok(Err(e)) => {
            tracing::error!("cannot forget the moved stream: {e}");
            state.failed.send_replace(Some(format!(
                "the stream moved to another relay, and forgetting this relay's copy failed: {e}"
            )));
        }
        Err(e) => {
            state
                .failed
                .send_replace(Some(format!("forgetting a moved stream: {e}")));
        }
    }
}

/// One session with the master target; returns why it ended.
async fn session<U: Upstream, S: ForwardSource>(
    ctx: &Arc<ForwardContext<U, S>>,
    id: &StreamId,
    state: &Arc<ForwarderState>,
    sender: &SharedSender,
) -> RelayError {
    let (mut writer, mut reader) = match ctx.upstream.open_stream().await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let position = ctx.source.position(id);
    let hello = lock(sender).start(
        Instant::now(),
        id.clone(),
        state.disk_size,
        state.placement,
        position,
    );
    if let Err(e) = writer.send(&hello).await {
        return RelayError::Send(e);
    }
    let deadline = lock(sender).poll_timeout();
    let answer = match reader.receive_until(deadline).await {
        Some(incoming) => lock(sender).handle(incoming),
        None => Err(lock(sender)
            .handle_timeout(Instant::now())
            .unwrap_or_else(|| SessionEnd::retry("no Accept in time"))),
    };
    let mt_next = match answer {
        Ok(SenderEvent::Accepted { next_seq, .. }) => next_seq,
        Ok(other) => {
            return RelayError::Stream(SessionEnd::retry(format!(
                "master target did not accept the stream: {other:?}"
            )))
        }
        Err(end) => return RelayError::Stream(end),
    };
    // The master target is the authority on what arrived: free what it holds.
    if let Err(e) = ctx.source.ack(id, mt_next - 1) {
        return e.into();
    }
    state.mt_next.send_replace(Some(mt_next));

    // Acknowledgements arrive concurrently; the sending loop waits on `acked` for credit.
    let (acked_tx, mut acked_rx) = watch::channel(());
    let mut acks = tokio::spawn(
        read_acks(
            ctx.clone(),
            id.clone(),
            state.clone(),
            sender.clone(),
            reader,
            acked_tx,
        )
        .in_current_span(),
    );
    let end = send_batches(
        ctx,
        id,
        state,
        sender,
        &mut writer,
        &mut acked_rx,
        &mut acks,
    )
    .await;
    acks.abort();
    end
}

/// Reads the master target's answers until the session ends: frees the cache, learns
/// the blocks it now holds, measures lag and the recovery point.
async fn read_acks<U: Upstream, S: ForwardSource>(
    ctx: Arc<ForwardContext<U, S>>,
    id: StreamId,
    state: Arc<ForwarderState>,
    sender: SharedSender,
    mut reader: FrameReader<U::Recv>,
    acked: watch::Sender<()>,
) -> RelayError {
    loop {
        let incoming = reader.receive().await;
        let event = lock(&sender).handle(incoming);
        match event {
            Ok(SenderEvent::Acked { seq, released }) => {
                if let Err(e) = ctx.source.ack(&id, seq) {
                    return e.into();
                }
                let now = now_ms();
                for batch in released {
                    ctx.known_blocks.insert_all(&batch.literal_hashes);
                    for (appended_ms, is_tag) in batch.records {
                        ctx.metrics
                            .replication_lag_seconds
                            .observe(now.saturating_sub(appended_ms) as f64 / 1000.0);
                        if is_tag {
                            state
                                .newest_applied_tag_ms
                                .fetch_max(appended_ms, Ordering::Relaxed);
                        }
                    }
                }
                acked.send_replace(());
            }
            Ok(SenderEvent::Credit { .. }) => {
                acked.send_replace(());
            }
            Ok(SenderEvent::Applied { .. } | SenderEvent::Accepted { .. }) => {}
            Ok(SenderEvent::ResyncRequested { .. } | SenderEvent::Renumbered { .. }) => {
                // Resyncs are the agent's business; a master target never asks a relay.
                return RelayError::Stream(SessionEnd::retry(
                    "the master target sent ResyncRequest, which only relays send",
                ));
            }
            Err(end) => return RelayError::Stream(end),
        }
    }
}

/// Reads, reduces and sends the backlog while credit allows, until the session ends.
async fn send_batches<U: Upstream, S: ForwardSource>(
    ctx: &Arc<ForwardContext<U, S>>,
    id: &StreamId,
    state: &Arc<ForwarderState>,
    sender: &SharedSender,
    writer: &mut FrameWriter<U::Send>,
    acked_rx: &mut watch::Receiver<()>,
    acks: &mut tokio::task::JoinHandle<RelayError>,
) -> RelayError {
    let mut durable_rx = ctx.source.durable(id);
    let granted = lock(sender).zstd_window_log();
    let mut reducer = Some(Reducer::with_zstd(ctx.wan, zstd_context(ctx, granted)));
    // Time this session's rounds spent waiting on the link (credit, egress) since the
    // codec chooser last heard.
    let mut link_wait = Duration::ZERO;
    // The interval being sent, when a whole interval is coalesced.
    let mut plan: Option<IntervalPlan> = None;
    loop {
        let durable = *durable_rx.borrow_and_update();
        acked_rx.borrow_and_update();
        let (cursor, credit) = {
            let s = lock(sender);
            (s.next_seq(), s.credit_available())
        };
        if (plan.is_none() && durable < cursor) || credit == 0 {
            let waited = Instant::now();
            tokio::select! {
                _ = durable_rx.changed() => {}
                _ = acked_rx.changed() => {}
                end = &mut *acks => {
                    return end.unwrap_or_else(|e| RelayError::Task { what: "ack reader", reason: e.to_string() });
                }
            }
            if credit == 0 {
                link_wait += waited.elapsed();
            }
            continue;
        }
        let round = Instant::now();
        let budget = (credit as usize).clamp(1, READ_WINDOW_BYTES);
        let mut r = reducer.take().expect("reducer present between reads");
        // Streams that joined since this session's context was reserved shrink its share.
        r.make_way(ctx.streams.load(Ordering::Relaxed), || {
            zstd_context(ctx, granted)
        });
        let mut p = plan.take();
        let read = if p.is_none() && ctx.source.backlog_bytes(id) <= INLINE_REDUCE_BYTES {
            // A small read: here, without a thread hop.
            let out = read_and_reduce(ctx, id, state, &mut r, &mut p, cursor, durable, budget);
            Ok((r, p.filter(|p| !p.is_done()), out))
        } else {
            // Read and reduce on a blocking thread (SHA-256 and compression are CPU
            // work), a bounded number of streams at a time (each holds up to a window
            // of records).
            let Ok(slot) = ctx.reduce_slots.acquire().await else {
                return RelayError::ShuttingDown;
            };
            let (job_ctx, job_id, job_state) = (ctx.clone(), id.clone(), state.clone());
            let read = tokio::task::spawn_blocking(move || {
                let out = read_and_reduce(
                    &job_ctx, &job_id, &job_state, &mut r, &mut p, cursor, durable, budget,
                );
                (r, p.filter(|p| !p.is_done()), out)
            })
            .await;
            drop(slot);
            read
        };
        let batches = match read {
            Ok((mut r, p, Ok(b))) => {
                let backlog = b
                    .last()
                    .is_some_and(|last| *durable_rx.borrow() > last.last_seq);
                r.observe(round.elapsed(), std::mem::take(&mut link_wait), backlog);
                reducer = Some(r);
                plan = p;
                b
            }
            Ok((r, _, Err(e @ CacheError::Corrupt { .. }))) => {
                // The plan (if any) covered the lost records: it goes with them.
                reducer = Some(r);
                if let Err(e) = lost_records(ctx, id, state, cursor, e.to_string()) {
                    return e;
                }
                continue;
            }
            Ok((_, _, Err(e))) => return e.into(),
            Err(e) => {
                return RelayError::Task {
                    what: "cache read",
                    reason: e.to_string(),
                }
            }
        };
        if batches.is_empty() {
            if let Some(reason) = ctx.source.needs_resync(id) {
                if let Err(e) = lost_records(ctx, id, state, cursor, reason) {
                    return e;
                }
                continue;
            }
            // Durable but no longer indexed: acknowledged meanwhile; re-read the state.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        for b in batches {
            // Wait for this stream's turn on the WAN leg (rate limit, fair share).
            let bytes = b.payload.len() as u64;
            let waited = Instant::now();
            ctx.egress.acquire(id, bytes).await;
            link_wait += waited.elapsed();
            ctx.metrics
                .records_forwarded_total
                .inc_by(b.records.len() as u64);
            lock(sender).on_send(
                b.first_seq,
                b.last_seq,
                bytes,
                SentBatch {
                    records: b.records,
                    literal_hashes: b.literal_hashes,
                },
            );
            writer.push(&Frame::Batch(b.payload));
        }
        if let Err(e) = writer.flush().await {
            return write_failed(e, acks).await;
        }
    }
}

/// The relay's zstd context for a session the master target granted a window of
/// `2^granted` (0: none): a context of its own when the stream's fair share of the
/// relay's pool buys at least a [`MIN_STREAM_WINDOW_LOG`] window (at most the grant),
/// else framed (whole frames from the shared pool).
fn zstd_context<U, S>(ctx: &ForwardContext<U, S>, granted: u8) -> Option<StreamCompressor> {
    if granted == 0 || ctx.wan.zstd_level == 0 || ctx.wan.compression == Compression::Off {
        return None;
    }
    let level = ctx.wan.zstd_level;
    let streams = ctx.streams.load(Ordering::Relaxed);
    let Some(reservation) =
        ctx.codec_memory
            .reserve_fair(streams, MIN_STREAM_WINDOW_LOG, granted, |w| {
                compressor_cost(w, level)
            })
    else {
        return Some(StreamCompressor::framed(ctx.frame_pool.clone()));
    };
    match StreamCompressor::new(level, granted, reservation) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("no zstd context of its own for the session (framed instead): {e}");
            Some(StreamCompressor::framed(ctx.frame_pool.clone()))
        }
    }
}

/// The cache lost records of `id` (corruption): forget them, continue at `cursor` (what
/// the master target expects next), and have the agent resync what they carried.
fn lost_records<U, S: ForwardSource>(
    ctx: &ForwardContext<U, S>,
    id: &StreamId,
    state: &ForwarderState,
    cursor: u64,
    why: String,
) -> Result<(), RelayError> {
    tracing::error!(
        "cached records from {cursor} on are unusable ({why}): dropped; asking the agent for a delta resync"
    );
    ctx.source.reset_stream(id, cursor)?;
    state.resync_needed.send_replace(Some(ResyncNeed {
        mode: fbr_protocol::ResyncMode::Delta,
        reason: format!("the relay lost records from {cursor} on: {why}"),
        records_lost: true,
    }));
    Ok(())
}

/// A write to the master target failed: its refusal, if the ack reader reads one within
/// [`REFUSAL_GRACE`], says what to do (e.g. resend without references); otherwise the
/// write error stands (retry).
async fn write_failed(
    error: std::io::Error,
    acks: &mut tokio::task::JoinHandle<RelayError>,
) -> RelayError {
    match tokio::time::timeout(REFUSAL_GRACE, acks).await {
        Ok(Ok(RelayError::Stream(end))) if end.is_refusal() => RelayError::Stream(end),
        _ => RelayError::Send(error),
    }
}

/// The blocking part of a read: plans an interval when one is due, then reads about
/// `budget` bytes from `cursor` and reduces them into batches.
#[allow(clippy::too_many_arguments)]
fn read_and_reduce<U, S: ForwardSource>(
    ctx: &ForwardContext<U, S>,
    id: &StreamId,
    state: &ForwarderState,
    reducer: &mut Reducer,
    plan: &mut Option<IntervalPlan>,
    cursor: u64,
    durable: u64,
    budget: usize,
) -> Result<Vec<crate::reduce::ReducedBatch>, CacheError> {
    let source = &*ctx.source;
    // A backlogged stream whose next recovery point is already durable: coalesce the
    // whole interval up to it (only its final content is sent).
    if plan.is_none() && ctx.wan.coalesce {
        if let Some(tag) = source.next_tag(id, cursor).filter(|t| *t <= durable) {
            if tag > cursor {
                *plan = Some(IntervalPlan::new(source, id, cursor, tag, &state.stages)?);
            }
        }
    }
    match plan.as_mut() {
        Some(plan) => {
            reducer.next_from_plan(plan, source, id, budget, &ctx.known_blocks, &state.stages)
        }
        None => source
            .read_batch(id, cursor, budget)
            .map(|records| reducer.reduce(records, &ctx.known_blocks, &state.stages)),
    }
}
