//! One agent stream into the relay: checks, durable append to the cache, acks.
//!
//! ```text
//!  agent stream ──ingest──▶ RelayCache (group commit) ──forwarder──▶ master target
//!       ▲   Ack (durable in the cache)  ◀── durable watch             │
//!       └── Applied (durable on-premises) ◀── applied watch ◀── acks ─┘
//! ```
//!
//! - **Hello**: entitlement (the certificate must name the VM), disk size (must match
//!   the cache's record of it), then the next sequence number: one past what the cache
//!   holds durably, or what the master target expects if that is more (the stream's
//!   forwarder asks it; a stream the cache has never seen needs the master target).
//! - **Ingest** checks every record: a duplicate is skipped, a gap ends the stream with
//!   `SequenceGap`, alignment and disk bounds are enforced; valid records are queued for
//!   a durable append. Records before a bad one are made durable and acknowledged, then
//!   the stream ends with the coded `Error`.
//! - **Acks**: `Ack{seq}` once `seq` is durable in the cache (nothing acknowledged is
//!   lost by a relay crash); `Applied{seq}` once the master target has it.

use std::sync::Arc;
use std::time::Duration;

use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{FrameReader, FrameWriter, PeerIdentity, ReadError};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::server::Relay;

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the master target's position of a stream the cache never saw.
const POSITION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to let the valid records before a bad one become durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one agent stream to completion.
pub async fn serve_stream(
    relay: Arc<Relay>,
    peer: Arc<PeerIdentity>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut agent_reader = FrameReader::new(recv);
    let mut agent_writer = FrameWriter::new(send);
    let (id, disk_size) = match tokio::time::timeout(HELLO_TIMEOUT, agent_reader.next()).await {
        Ok(Ok(Some(Frame::Hello { stream, disk_size }))) => (stream, disk_size),
        Ok(Ok(Some(other))) => {
            let msg = format!("expected Hello, got {:?}", other.frame_type());
            return relay
                .refuse(&mut agent_writer, None, ErrorCode::UnexpectedFrame, msg)
                .await;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            return relay
                .refuse(&mut agent_writer, None, e.code(), e.to_string())
                .await
        }
        Err(_) => {
            return relay
                .refuse(
                    &mut agent_writer,
                    None,
                    ErrorCode::UnexpectedFrame,
                    "no Hello within 10 s",
                )
                .await
        }
    };
    let span = tracing::info_span!("stream", stream = %id);
    open_and_ingest(relay, peer, id, disk_size, agent_reader, agent_writer)
        .instrument(span)
        .await
}

/// Everything after the `Hello`: checks, `Accept`, ingest and acks, in the stream's span.
async fn open_and_ingest(
    relay: Arc<Relay>,
    peer: Arc<PeerIdentity>,
    id: StreamId,
    disk_size: u64,
    agent_reader: FrameReader,
    mut agent_writer: FrameWriter,
) {
    if !peer.may_write(&id.vm) {
        let msg = format!(
            "certificate {:?} does not entitle writing VM {}",
            peer.common_name, id.vm
        );
        return relay
            .refuse(&mut agent_writer, Some(&id), ErrorCode::NotEntitled, msg)
            .await;
    }
    let cached = relay.cache.stats(&id);
    if let Some(reason) = cached.as_ref().and_then(|s| s.needs_resync.clone()) {
        let msg = format!("stream needs resync: {reason}");
        return relay
            .refuse(&mut agent_writer, Some(&id), ErrorCode::Internal, msg)
            .await;
    }
    // The forwarder holds the disk size on record: the cache's for a recovered stream
    // (its forwarder starts at boot), else the first Hello's.
    let forwarder = relay.ensure_forwarder(&id, disk_size);
    if forwarder.disk_size != disk_size {
        let msg = format!(
            "disk {id} has size {} on record, Hello says {disk_size}",
            forwarder.disk_size
        );
        return relay
            .refuse(
                &mut agent_writer,
                Some(&id),
                ErrorCode::DiskSizeMismatch,
                msg,
            )
            .await;
    }
    let failed = forwarder.failed.borrow().clone();
    if let Some(reason) = failed {
        return relay
            .refuse(&mut agent_writer, Some(&id), ErrorCode::Internal, reason)
            .await;
    }
    let mut generation_rx = relay.claim_stream(&id);

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
                    let msg = "the master target is unreachable and the cache holds nothing of this stream yet";
                    return relay
                        .refuse(
                            &mut agent_writer,
                            Some(&id),
                            ErrorCode::UpstreamUnavailable,
                            msg,
                        )
                        .await;
                }
            }
        }
    };
    let next_seq = cache_next.unwrap_or(1).max(mt_next.unwrap_or(1));
    if agent_writer
        .send(&Frame::Accept {
            next_seq,
            credit_bytes: relay.config.agent_credit_bytes,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(next_seq, "stream open");
    let _open = OpenStreamGauge::new(&relay);

    let agent_writer = Arc::new(Mutex::new(agent_writer));
    let watch = relay.cache.watch(&id);
    let mut broken_rx = watch.broken.subscribe();
    broken_rx.borrow_and_update();
    let mut acker = tokio::spawn(send_acks(relay.clone(), id.clone(), agent_writer.clone()));
    let ingest = ingest(&relay, &id, disk_size, next_seq, agent_reader);
    tokio::pin!(ingest);

    let outcome = tokio::select! {
        outcome = &mut ingest => outcome,
        _ = broken_rx.changed() => Err(Refusal {
            code: ErrorCode::Internal,
            message: "the relay's cache failed to commit; resend from the last acknowledged record".into(),
            last_valid: 0,
        }),
        _ = generation_rx.changed() => {
            tracing::info!(stream = %id, "superseded by a newer session");
            acker.abort();
            return;
        }
        _ = &mut acker => Ok(()),
    };
    acker.abort();
    match outcome {
        Ok(()) => agent_writer.lock().await.finish(),
        Err(refusal) => {
            // The valid records before the bad one become durable and are acknowledged
            // before the refusal.
            let mut durable_rx = watch.durable.subscribe();
            let _ = tokio::time::timeout(
                DRAIN_TIMEOUT,
                durable_rx.wait_for(|d| *d >= refusal.last_valid),
            )
            .await;
            let mut w = agent_writer.lock().await;
            let durable = *durable_rx.borrow();
            if durable > 0 {
                let _ = w.send(&Frame::Ack { seq: durable }).await;
            }
            relay
                .refuse(&mut w, Some(&id), refusal.code, refusal.message)
                .await;
        }
    }
}

/// Why ingest ended a stream, and the last record before the problem.
struct Refusal {
    code: ErrorCode,
    message: String,
    last_valid: u64,
}

/// Reads the agent's records, checks them and queues the valid ones for the cache.
/// `Ok` when the agent finished or went away; the refusal for invalid input.
async fn ingest(
    relay: &Relay,
    id: &StreamId,
    disk_size: u64,
    mut expected: u64,
    mut reader: FrameReader,
) -> Result<(), Refusal> {
    let refuse = |code, message: String, expected: u64| Refusal {
        code,
        message,
        last_valid: expected - 1,
    };
    loop {
        wait_while_throttled(relay, id).await;
        let record = match reader.next().await {
            Ok(Some(Frame::Record(r))) => r,
            Ok(Some(other)) => {
                let msg = format!("{:?} frame in the middle of a stream", other.frame_type());
                return Err(refuse(ErrorCode::UnexpectedFrame, msg, expected));
            }
            Ok(None) => return Ok(()),
            Err(ReadError::Stream(e)) => {
                tracing::info!(stream = %id, "agent stream ended: {e}");
                return Ok(());
            }
            Err(e) => return Err(refuse(e.code(), e.to_string(), expected)),
        };
        let seq = record.seq();
        if seq < expected {
            relay.metrics.duplicates_skipped_total.inc();
            continue;
        }
        if seq > expected {
            return Err(refuse(
                ErrorCode::SequenceGap,
                format!("expected sequence {expected}, got {seq}"),
                expected,
            ));
        }
        if let Err((code, msg)) = record.check_against_disk(disk_size) {
            return Err(refuse(code, msg, expected));
        }
        let m = &relay.metrics;
        m.records_ingested_total.inc();
        m.add_bytes("ingested", record.encoded_len() as u64);
        m.add_bytes("logical", record.logical_bytes());
        expected += 1;
        if !relay.cache.append(id, disk_size, record).await {
            return Ok(());
        }
    }
}

/// Pauses ingest while the health task has `id` in its throttled set (cache pressure
/// or backlog quota). The agent's unacknowledged records stay with the agent: it runs
/// out of credit and waits; nothing is dropped.
async fn wait_while_throttled(relay: &Relay, id: &StreamId) {
    if !relay.throttled.borrow().contains(id) {
        return;
    }
    tracing::info!("ingest paused: cache pressure or backlog quota");
    let mut rx = relay.throttled.subscribe();
    let _ = rx.wait_for(|set| !set.contains(id)).await;
    tracing::info!("ingest resumed");
}

/// Counts an open agent stream in `fbr_relay_agent_streams` for as long as it lives.
struct OpenStreamGauge<'a>(&'a Relay);

impl<'a> OpenStreamGauge<'a> {
    fn new(relay: &'a Relay) -> Self {
        relay.metrics.agent_streams.inc();
        OpenStreamGauge(relay)
    }
}

impl Drop for OpenStreamGauge<'_> {
    fn drop(&mut self) {
        self.0.metrics.agent_streams.dec();
    }
}

/// Tells the agent what is durable in the cache (`Ack`) and at the master target
/// (`Applied`), as it happens.
async fn send_acks(relay: Arc<Relay>, id: StreamId, agent: Arc<Mutex<FrameWriter>>) {
    let watch = relay.cache.watch(&id);
    let mut durable_rx = watch.durable.subscribe();
    let mut applied_rx = watch.applied.subscribe();
    // What is already known first (e.g. after a reconnect), then every change.
    let (durable, applied) = (
        *durable_rx.borrow_and_update(),
        *applied_rx.borrow_and_update(),
    );
    {
        let mut w = agent.lock().await;
        if durable > 0 && w.send(&Frame::Ack { seq: durable }).await.is_err() {
            return;
        }
        if applied > 0 && w.send(&Frame::Applied { seq: applied }).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            r = durable_rx.changed() => {
                if r.is_err() { return; }
                let seq = *durable_rx.borrow_and_update();
                if agent.lock().await.send(&Frame::Ack { seq }).await.is_err() { return; }
            }
            r = applied_rx.changed() => {
                if r.is_err() { return; }
                let seq = *applied_rx.borrow_and_update();
                if agent.lock().await.send(&Frame::Applied { seq }).await.is_err() { return; }
            }
        }
    }
}
