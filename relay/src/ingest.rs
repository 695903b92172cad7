//! The ingest side of the relay: one agent stream in, checked, made durable in the cache,
//! acknowledged.
//!
//! ```text
//!  agent stream ──ingest──▶ RelayCache (group commit) ──forwarder──▶ master target
//!       ▲   Ack (durable in the cache)  ◀── durable watch             │
//!       └── Applied (durable on-premises) ◀── applied watch ◀── acks ─┘
//! ```
//!
//! A session is a thin driver of the protocol's [`StreamReceiver`] (agent-facing: plain
//! records only). The machine checks `Hello` (entitlement, the disk size on record) and
//! every record (a duplicate is skipped, a gap refused, alignment and disk bounds
//! enforced); the session adds what only the relay knows:
//! - **where the stream continues**: one past what the cache holds durably, or what the
//!   master target expects if that is more (the stream's forwarder asks it; a stream the
//!   cache has never seen needs the master target), refused while the stream needs
//!   resync or its forwarder has failed;
//! - **durability**: valid records are queued for a durable append; records before a
//!   bad one are made durable and acknowledged, then the stream ends with the coded
//!   `Error`;
//! - **acks**: `Ack{seq}` once `seq` is durable in the cache (nothing acknowledged is
//!   lost by a relay crash); `Applied{seq}` once the master target has it;
//! - **throttling**: while the health task pauses the stream (cache pressure), the
//!   session stops reading: the agent runs out of credit, nothing is dropped.
//!
//! Everything a session uses comes in its [`IngestContext`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fbr_metrics::relay::RelayMetrics;
use fbr_protocol::placement::Admission;
use fbr_protocol::stream::{Delivery, Opening, ReceiverConfig, Refusal, StreamReceiver};
use fbr_protocol::{ErrorCode, Frame, Record, ResyncMode, ResyncPhase, StreamId};
use fbr_transport::{FrameReader, FrameWriter, PeerIdentity, PeerLink};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cache::RelayCache;
use crate::forwarder::{ForwarderState, Forwarders, ResyncNeed};

/// How long to wait for the master target's position of a stream the cache never saw.
const POSITION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to let the valid records before a bad one become durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's forwarders: to the master target over QUIC, from the disk cache.
pub type RelayForwarders = Forwarders<PeerLink, RelayCache>;

/// The least credit an agent stream is granted, however many share `ingest.memory`:
/// enough for a disk's writes to flow while it waits for the cache's group commit
/// (64 KiB per few milliseconds is tens of MB/s per disk), small enough that a
/// thousand disks hold 64 MiB in flight.
pub const MIN_AGENT_CREDIT: u64 = 64 << 10;

/// Everything agent sessions share: the ingest side of the relay.
#[derive(Debug)]
pub struct IngestContext {
    pub cache: Arc<RelayCache>,
    /// Each stream's forwarder knows the disk size on record and the master target's
    /// position.
    pub forwarders: Arc<RelayForwarders>,
    /// Streams whose ingest is paused (cache pressure or quota); see [`crate::health`].
    pub throttled: watch::Sender<Arc<BTreeSet<StreamId>>>,
    pub metrics: RelayMetrics,
    /// Credit granted to agent streams: each open stream's share of one budget.
    pub credit: Arc<fbr_transport::credit::CreditShare>,
    /// How long an agent's frame may take to arrive once begun (a trickling peer is
    /// refused with `too_slow`); `None`: unlimited.
    pub frame_timeout: Option<Duration>,
    /// Where each resyncing disk stands, from the marks passing through.
    pub resync_progress: crate::resync::ResyncProgress,
    /// One generation counter per disk: a new session bumps it, older ones stop.
    generations: Mutex<HashMap<StreamId, watch::Sender<u64>>>,
    /// Held while a stream's move to this relay is recorded.
    moves: tokio::sync::Mutex<()>,
}

impl IngestContext {
    pub fn new(
        cache: Arc<RelayCache>,
        forwarders: Arc<RelayForwarders>,
        metrics: RelayMetrics,
        credit: Arc<fbr_transport::credit::CreditShare>,
        frame_timeout: Option<Duration>,
    ) -> Self {
        IngestContext {
            cache,
            forwarders,
            throttled: watch::channel(Arc::new(BTreeSet::new())).0,
            metrics,
            credit,
            frame_timeout,
            resync_progress: crate::resync::ResyncProgress::default(),
            generations: Mutex::new(HashMap::new()),
            moves: tokio::sync::Mutex::new(()),
        }
    }

    /// Asks the agent of `id` for a resync of `mode` (an operator's request): its
    /// session is told at once, or at its next `Hello`.
    pub fn request_resync(
        &self,
        id: &StreamId,
        mode: ResyncMode,
        reason: &str,
    ) -> Result<(), String> {
        let forwarder = self
            .forwarders
            .all()
            .into_iter()
            .find(|(s, _)| s == id)
            .map(|(_, f)| f)
            .ok_or_else(|| format!("this relay has never seen disk {id}"))?;
        forwarder.resync_needed.send_replace(Some(ResyncNeed {
            mode,
            reason: reason.to_owned(),
            records_lost: false,
        }));
        self.metrics.resyncs_requested_total.inc();
        tracing::info!(stream = %id, mode = mode.name(), "resync requested: {reason}");
        Ok(())
    }

    /// Makes the caller the current session of `id`; the receiver changes when a newer
    /// session claims it.
    fn claim_stream(&self, id: &StreamId) -> watch::Receiver<u64> {
        let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        let tx = gens
            .entry(id.clone())
            .or_insert_with(|| watch::channel(0).0);
        tx.send_modify(|g| *g += 1);
        let mut rx = tx.subscribe();
        rx.borrow_and_update();
        rx
    }

    /// Refuses or closes a stream with a coded error, and counts it.
    pub(crate) async fn refuse(
        &self,
        writer: &mut FrameWriter,
        refusal: &Refusal,
        stream: Option<&StreamId>,
    ) {
        self.metrics.stream_errors_total.count(refusal.code);
        writer.refuse(refusal, stream).await;
    }
}

/// Serves one agent stream to completion.
pub async fn serve_stream(
    ctx: Arc<IngestContext>,
    peer: Arc<PeerIdentity>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv).with_frame_timeout(ctx.frame_timeout);
    let mut writer = FrameWriter::new(send);
    let mut receiver = StreamReceiver::new(
        ReceiverConfig::agent_facing(),
        peer.entitlement.clone(),
        Instant::now(),
    );
    match reader.receive_hello(&mut receiver).await {
        Ok(Some(Opening::Data {
            stream,
            disk_size,
            placement,
        })) => {
            let span = tracing::info_span!("stream", stream = %stream);
            open_and_ingest(ctx, receiver, stream, disk_size, placement, reader, writer)
                .instrument(span)
                .await
        }
        Ok(Some(Opening::Hashes {
            stream,
            disk_size,
            key,
        })) => {
            let span = tracing::info_span!("hashes", stream = %stream);
            crate::hashproxy::relay(ctx, receiver, stream, disk_size, key, reader, writer)
                .instrument(span)
                .await
        }
        // The agent-facing receiver never opens a control stream (it refuses `Control`).
        Ok(Some(Opening::Control { .. })) | Ok(None) => {}
        Err(refusal) => ctx.refuse(&mut writer, &refusal, None).await,
    }
}

/// Everything after the `Hello`: where the stream continues, `Accept`, ingest and acks,
/// in the stream's span.
async fn open_and_ingest(
    ctx: Arc<IngestContext>,
    mut receiver: StreamReceiver,
    id: StreamId,
    disk_size: u64,
    placement: u64,
    reader: FrameReader,
    mut writer: FrameWriter,
) {
    if let Err(refusal) = admit_placement(&ctx, &mut receiver, &id, placement).await {
        return ctx.refuse(&mut writer, &refusal, Some(&id)).await;
    }
    let cached = ctx.cache.stats(&id);
    if let Some(reason) = cached.as_ref().and_then(|s| s.needs_resync.clone()) {
        let refusal = receiver.refuse(
            ErrorCode::Internal,
            format!("stream needs resync: {reason}"),
        );
        return ctx.refuse(&mut writer, &refusal, Some(&id)).await;
    }
    // The forwarder holds the disk size on record: the cache's for a recovered stream
    // (its forwarder starts at boot), else the first Hello's.
    let forwarder = ctx.forwarders.ensure(&id, disk_size);
    if let Err(refusal) = receiver.check_disk_size(forwarder.disk_size) {
        return ctx.refuse(&mut writer, &refusal, Some(&id)).await;
    }
    let failed = forwarder.failed.borrow().clone();
    if let Some(reason) = failed {
        let refusal = receiver.refuse(ErrorCode::Internal, reason);
        return ctx.refuse(&mut writer, &refusal, Some(&id)).await;
    }
    let mut generation_rx = ctx.claim_stream(&id);

    // Where the stream continues.
    let cache_next = cached.map(|s| s.durable_seq + 1);
    let mut mt_rx = forwarder.mt_next.subscribe();
    let mt_next = match cache_next {
        Some(_) => *mt_rx.borrow(),
        None => {
            let known = tokio::time::timeout(POSITION_TIMEOUT, async {
                mt_rx
                    .wait_for(Option::is_some)
                    .await
                    .map(|v| *v)
                    .ok()
                    .flatten()
            })
            .await;
            match known {
                Ok(Some(n)) => Some(n),
                _ => {
                    let refusal = receiver.refuse(
                        ErrorCode::UpstreamUnavailable,
                        "the master target is unreachable and the cache holds nothing of this stream yet",
                    );
                    return ctx.refuse(&mut writer, &refusal, Some(&id)).await;
                }
            }
        }
    };
    let next_seq = cache_next.unwrap_or(1).max(mt_next.unwrap_or(1));
    // A resync the agent must run is asked for before Accept: if the relay lost
    // records it had acknowledged, the agent learns so before it hears where the stream
    // continues (and numbers again from there).
    let mut resync_rx = forwarder.resync_needed.subscribe();
    let need = resync_rx.borrow_and_update().clone();
    if let Some(need) = need {
        let request = Frame::ResyncRequest {
            mode: need.mode,
            reason: need.reason,
        };
        if writer.send(&request).await.is_err() {
            return;
        }
    }
    let mut credit = ctx.credit.join();
    let accept = receiver.accept(next_seq, *credit.share.borrow_and_update());
    if writer.send(&accept).await.is_err() {
        return;
    }
    tracing::info!(next_seq, "stream open");
    let _open = OpenStreamGauge::new(&ctx.metrics);

    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let watch = ctx.cache.watch(&id);
    let mut broken_rx = watch.broken.subscribe();
    broken_rx.borrow_and_update();
    let mut acker =
        tokio::spawn(send_acks(ctx.clone(), id.clone(), writer.clone(), credit).in_current_span());
    let ingest = ingest(&ctx, &id, disk_size, &forwarder, receiver, reader);
    tokio::pin!(ingest);

    let mut moved_rx = forwarder.moved.subscribe();
    let outcome = loop {
        tokio::select! {
            outcome = &mut ingest => break outcome,
            changed = moved_rx.changed() => {
                let why = moved_rx.borrow_and_update().clone();
                let Some(why) = why else {
                    if changed.is_err() { break Ok(()); }
                    continue;
                };
                break Err(Refusal::new(
                    ErrorCode::StreamMoved,
                    format!("{why}; ask the configuration server for the current assignment"),
                ));
            }
            _ = broken_rx.changed() => break Err(Refusal::new(
                ErrorCode::Internal,
                "the relay's cache failed to commit; resend from the last acknowledged record",
            )),
            _ = generation_rx.changed() => {
                tracing::info!("superseded by a newer session");
                acker.abort();
                return;
            }
            _ = &mut acker => break Ok(()),
            changed = resync_rx.changed() => {
                let need = resync_rx.borrow_and_update().clone();
                match need {
                    _ if changed.is_err() => break Ok(()),
                    // Lost records: the agent reconnects, hears the request before
                    // Accept, and numbers again from the master target's position.
                    Some(need) if need.records_lost => break Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("{}; reconnect to resync", need.reason),
                    )),
                    Some(need) => {
                        let request = Frame::ResyncRequest { mode: need.mode, reason: need.reason };
                        if writer.lock().await.send(&request).await.is_err() {
                            break Ok(());
                        }
                    }
                    None => {}
                }
            }
        }
    };
    acker.abort();
    match outcome {
        Ok(()) => writer.lock().await.finish().await,
        Err(refusal) => {
            // The valid records before the bad one become durable and are acknowledged
            // before the refusal.
            let mut durable_rx = watch.durable.subscribe();
            let _ = tokio::time::timeout(
                DRAIN_TIMEOUT,
                durable_rx.wait_for(|d| *d >= refusal.last_valid),
            )
            .await;
            let mut w = writer.lock().await;
            let durable = *durable_rx.borrow();
            if durable > 0 {
                let _ = w.send(&Frame::Ack { seq: durable }).await;
            }
            ctx.refuse(&mut w, &refusal, Some(&id)).await;
        }
    }
}

/// Checks the placement of an agent's `Hello` (which relay its VM is on, as the
/// configuration server counts moves): a stale one is refused with `StreamMoved`; a
/// higher one means the VM moved here, so whatever this relay held of the stream came
/// by a superseded path and is forgotten (its forwarder stopped, its records retired
/// for good) before the stream is accepted as new, where the master target stands.
/// One agent writes a VM's disks at a time: a session of an older placement on this
/// relay is superseded first.
async fn admit_placement(
    ctx: &Arc<IngestContext>,
    receiver: &mut StreamReceiver,
    id: &StreamId,
    placement: u64,
) -> Result<(), Refusal> {
    match ctx.cache.check_placement(id, placement) {
        Admission::Current => return Ok(()),
        Admission::Stale { on_record } => return receiver.check_placement(placement, on_record),
        Admission::Raised { .. } => {}
    }
    let _one_move_at_a_time = ctx.moves.lock().await;
    let Admission::Raised { from } = ctx.cache.check_placement(id, placement) else {
        // Another session raised it meanwhile: judge again.
        let on_record = ctx.cache.placement(id);
        return receiver.check_placement(placement, on_record);
    };
    drop(ctx.claim_stream(id));
    ctx.forwarders
        .retire(id, "the VM moved here from another relay");
    let (cache, stream) = (ctx.cache.clone(), id.clone());
    let retired = tokio::task::spawn_blocking(move || cache.retire(&stream, placement)).await;
    match retired {
        Ok(Ok(_)) => {
            ctx.metrics.streams_moved_in_total.inc();
            tracing::info!(
                from,
                placement,
                "the VM moved to this relay: the stream continues where the master target stands"
            );
            Ok(())
        }
        Ok(Err(e)) => Err(receiver.refuse(
            ErrorCode::Internal,
            format!("recording the stream's move here: {e:#}"),
        )),
        Err(e) => Err(receiver.refuse(ErrorCode::Internal, e.to_string())),
    }
}

/// Reads the agent's records through the machine and queues the valid ones for the
/// cache. `Ok` when the agent finished or went away; the refusal for invalid input.
async fn ingest(
    ctx: &IngestContext,
    id: &StreamId,
    disk_size: u64,
    forwarder: &ForwarderState,
    mut receiver: StreamReceiver,
    mut reader: FrameReader,
) -> Result<(), Refusal> {
    loop {
        wait_while_throttled(ctx, id).await;
        match receiver.handle(reader.receive().await)? {
            Delivery::Record(record) => {
                if let Record::Resync { mark, .. } = &record {
                    ctx.resync_progress.observe(id, mark, &ctx.metrics);
                    if mark.phase == ResyncPhase::Begin {
                        // The resync asked for (if any) is under way.
                        forwarder.resync_needed.send_replace(None);
                    }
                }
                let m = &ctx.metrics;
                m.records_ingested_total.inc();
                m.add_bytes("ingested", record.encoded_len() as u64);
                m.add_bytes("logical", record.logical_bytes());
                if !ctx.cache.append(id, disk_size, record).await {
                    return Ok(());
                }
            }
            Delivery::Duplicate { records, .. } => {
                ctx.metrics.duplicates_skipped_total.inc_by(records);
            }
            Delivery::Batch(_) => {
                // The agent-facing machine refuses batches; never delivered here.
                return Err(Refusal::new(
                    ErrorCode::UnexpectedFrame,
                    "Batch frame from an agent",
                ));
            }
            Delivery::Finished => return Ok(()),
            Delivery::Gone(reason) => {
                tracing::info!("agent stream ended: {reason}");
                return Ok(());
            }
        }
    }
}

/// Pauses ingest while the health task has `id` in its throttled set (cache pressure
/// or backlog quota). The agent's unacknowledged records stay with the agent: it runs
/// out of credit and waits; nothing is dropped.
async fn wait_while_throttled(ctx: &IngestContext, id: &StreamId) {
    if !ctx.throttled.borrow().contains(id) {
        return;
    }
    tracing::info!("ingest paused: cache pressure or backlog quota");
    let mut rx = ctx.throttled.subscribe();
    let _ = rx.wait_for(|set| !set.contains(id)).await;
    tracing::info!("ingest resumed");
}

/// Counts an open agent stream in `fbr_relay_agent_streams` for as long as it lives.
struct OpenStreamGauge<'a>(&'a RelayMetrics);

impl<'a> OpenStreamGauge<'a> {
    fn new(metrics: &'a RelayMetrics) -> Self {
        metrics.agent_streams.inc();
        OpenStreamGauge(metrics)
    }
}

impl Drop for OpenStreamGauge<'_> {
    fn drop(&mut self) {
        self.0.agent_streams.dec();
    }
}

/// Tells the agent what is durable in the cache (`Ack`) and at the master target
/// (`Applied`), as it happens, and its new credit when the streams' share changes.
/// Holds the stream's place in the credit share for as long as the session.
async fn send_acks(
    ctx: Arc<IngestContext>,
    id: StreamId,
    agent: Arc<tokio::sync::Mutex<FrameWriter>>,
    mut credit: fbr_transport::credit::CreditHolder,
) {
    let watch = ctx.cache.watch(&id);
    let mut durable_rx = watch.durable.subscribe();
    let mut applied_rx = watch.applied.subscribe();
    // What is already known first (e.g. after a reconnect), then every change.
    let (durable, applied) = (
        *durable_rx.borrow_and_update(),
        *applied_rx.borrow_and_update(),
    );
    {
        let mut w = agent.lock().await;
        if durable > 0 {
            w.push(&Frame::Ack { seq: durable });
        }
        if applied > 0 {
            w.push(&Frame::Applied { seq: applied });
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    loop {
        // Wait for any change; the one that woke us is marked seen by `changed`.
        let woke = tokio::select! {
            r = durable_rx.changed() => r.map(|_| Watched::Durable),
            r = applied_rx.changed() => r.map(|_| Watched::Applied),
            r = credit.share.changed() => r.map(|_| Watched::Credit),
        };
        let Ok(woke) = woke else { return };
        // Everything that changed by now goes out in one write: the cache's group
        // commit and the master target's acknowledgements move many streams at once,
        // and one write per frame was a wake-up of the connection per frame.
        let changed =
            |w: Watched, rx: &watch::Receiver<u64>| woke == w || rx.has_changed().unwrap_or(false);
        let (durable_changed, applied_changed, credit_changed) = (
            changed(Watched::Durable, &durable_rx),
            changed(Watched::Applied, &applied_rx),
            changed(Watched::Credit, &credit.share),
        );
        let mut w = agent.lock().await;
        if durable_changed {
            let seq = *durable_rx.borrow_and_update();
            w.push(&Frame::Ack { seq });
        }
        if applied_changed {
            let seq = *applied_rx.borrow_and_update();
            w.push(&Frame::Applied { seq });
        }
        if credit_changed {
            let credit_bytes = *credit.share.borrow_and_update();
            w.push(&Frame::Credit { credit_bytes });
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// Which of `send_acks`'s watched values changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    Durable,
    Applied,
    Credit,
}
