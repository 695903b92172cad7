//! Forwarders: one long-lived task per stream that sends the stream's cached records to
//! the master target, in sequence order, and frees the cache as the master target
//! acknowledges them.
//!
//! A forwarder is independent of the agent's session: it keeps draining the backlog
//! while the agent is disconnected, after a relay restart (recovered streams get one at
//! start), and across master-target outages (it reconnects with backoff and resumes
//! from the master target's high-water mark, which is the authority on what arrived).
//! It keeps at most the master target's credit in flight, and reads payloads from disk,
//! so its memory does not grow with the backlog.
//!
//! A record that fails its checksum is never sent: the stream is flagged as needing
//! resync, its cached records are dropped, and the forwarder stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fbr_cache::{now_ms, CacheError};
use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{FrameReader, FrameWriter};
use tokio::sync::watch;

use crate::reduce::{IntervalPlan, Reducer, StageBytes};
use crate::server::Relay;

/// Most record bytes read from the cache at once: the coalescing window when the
/// stream has a backlog (reductions run on a blocking thread, a few streams at a time).
const READ_WINDOW_BYTES: usize = 8 << 20;

/// What others may know about a stream's forwarder.
#[derive(Debug)]
pub struct ForwarderState {
    pub disk_size: u64,
    /// The master target's next expected sequence number, once known.
    pub mt_next: watch::Sender<Option<u64>>,
    /// Why forwarding stopped for good (the stream needs resync or was refused).
    pub failed: watch::Sender<Option<String>>,
    /// When the newest recovery point (tag) the master target acknowledged was appended
    /// to the cache, Unix milliseconds; 0 before the first one (the RPO metric).
    pub newest_applied_tag_ms: AtomicU64,
    /// Bytes after each WAN reduction, for this stream.
    pub stages: StageBytes,
}

impl ForwarderState {
    pub fn new(disk_size: u64) -> Self {
        ForwarderState {
            disk_size,
            mt_next: watch::channel(None).0,
            failed: watch::channel(None).0,
            newest_applied_tag_ms: AtomicU64::new(0),
            stages: StageBytes::default(),
        }
    }
}

/// A batch sent and not yet acknowledged by the master target.
struct InFlight {
    last_seq: u64,
    /// Payload bytes (what counts against the master target's credit).
    bytes: u64,
    /// Append time and tag flag of every record the batch covers.
    records: Vec<(u64, bool)>,
    /// Blocks sent as bytes: the master target holds them once it acknowledges.
    literal_hashes: Vec<[u8; 32]>,
}

enum End {
    Retry(String),
    /// Retry at once: the master target asked for data it could not find by reference.
    Resend(String),
    Fatal(String),
}

/// Runs the forwarder of `id` until the relay shuts down or the stream fails for good.
pub async fn run(relay: Arc<Relay>, id: StreamId, state: Arc<ForwarderState>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut connected = false;
        match session(&relay, &id, &state, &mut connected).await {
            End::Fatal(reason) => {
                tracing::error!("forwarding stopped: {reason}");
                state.failed.send_replace(Some(reason));
                return;
            }
            End::Resend(reason) => {
                tracing::info!("resending without references: {reason}");
            }
            End::Retry(reason) => {
                if connected {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!("forwarding interrupted, retrying in {backoff:?}: {reason}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn session(
    relay: &Arc<Relay>,
    id: &StreamId,
    state: &Arc<ForwarderState>,
    connected: &mut bool,
) -> End {
    let (send, recv) = match relay.upstream.open_stream().await {
        Ok(s) => s,
        Err(e) => return End::Retry(e),
    };
    let mut reader = FrameReader::new(recv);
    let mut writer = FrameWriter::new(send);
    if let Err(e) = writer
        .send(&Frame::Hello {
            stream: id.clone(),
            disk_size: state.disk_size,
        })
        .await
    {
        return End::Retry(format!("sending Hello: {e}"));
    }
    let (mt_next, credit) = match tokio::time::timeout(Duration::from_secs(10), reader.next()).await
    {
        Ok(Ok(Some(Frame::Accept {
            next_seq,
            credit_bytes,
        }))) => (next_seq, credit_bytes.max(1)),
        Ok(Ok(Some(Frame::Error { code, message }))) => {
            return match code {
                ErrorCode::UpstreamUnavailable | ErrorCode::Internal | ErrorCode::StreamBusy => {
                    End::Retry(format!("master target: {code}: {message}"))
                }
                _ => End::Fatal(format!(
                    "master target refused the stream: {code}: {message}"
                )),
            }
        }
        other => {
            return End::Retry(format!(
                "master target did not accept the stream: {other:?}"
            ))
        }
    };
    *connected = true;
    // The master target is the authority on what arrived: free what it holds.
    if let Err(e) = relay.cache.ack(id, mt_next - 1) {
        return End::Retry(format!("cache: {e}"));
    }
    state.mt_next.send_replace(Some(mt_next));
    if let Some(stats) = relay.cache.stats(id) {
        if stats.first_cached_seq > mt_next && stats.durable_seq >= mt_next {
            return End::Fatal(format!(
                "the master target expects record {mt_next}, but the cache starts at {}: needs resync",
                stats.first_cached_seq
            ));
        }
    }

    // Acknowledgements arrive concurrently; the sender waits on `acked` for credit.
    let (acked_tx, mut acked_rx) = watch::channel(mt_next - 1);
    let ack_relay = relay.clone();
    let ack_id = id.clone();
    let mut acks = tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(Frame::Ack { seq })) => {
                    if let Err(e) = ack_relay.cache.ack(&ack_id, seq) {
                        return End::Retry(format!("cache: {e}"));
                    }
                    acked_tx.send_replace(seq);
                }
                Ok(Some(Frame::Credit { .. })) => {}
                Ok(Some(Frame::Error {
                    code: ErrorCode::UnknownReference,
                    message,
                })) => {
                    // The master target lost blocks it held (restart, eviction): every
                    // reference is suspect. The resend carries bytes until acks teach
                    // the relay again what it holds.
                    ack_relay.known_blocks.clear();
                    ack_relay.metrics.unknown_references_total.inc();
                    return End::Resend(message);
                }
                Ok(Some(Frame::Error { code, message })) => {
                    return End::Retry(format!(
                        "master target closed the stream: {code}: {message}"
                    ))
                }
                Ok(Some(other)) => {
                    return End::Retry(format!(
                        "unexpected {:?} from the master target",
                        other.frame_type()
                    ))
                }
                Ok(None) => return End::Retry("master target finished the stream".into()),
                Err(e) => return End::Retry(format!("reading acks: {e}")),
            }
        }
    });

    let watch = relay.cache.watch(id);
    let mut durable_rx = watch.durable.subscribe();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut in_flight_bytes = 0u64;
    let mut cursor = mt_next;
    let mut reducer = Some(Reducer::new(relay.config.wan));
    // The interval being sent, when a whole interval is coalesced.
    let mut plan: Option<IntervalPlan> = None;
    loop {
        // Forget what the master target acknowledged; it measures replication lag and
        // moves the recovery point.
        let acked = *acked_rx.borrow_and_update();
        let now = now_ms();
        while in_flight.front().is_some_and(|f| f.last_seq <= acked) {
            let Some(f) = in_flight.pop_front() else {
                break;
            };
            in_flight_bytes -= f.bytes;
            relay.known_blocks.insert_all(&f.literal_hashes);
            for (appended_ms, is_tag) in f.records {
                relay
                    .metrics
                    .replication_lag_seconds
                    .observe(now.saturating_sub(appended_ms) as f64 / 1000.0);
                if is_tag {
                    state
                        .newest_applied_tag_ms
                        .fetch_max(appended_ms, Ordering::Relaxed);
                }
            }
        }
        let durable = *durable_rx.borrow_and_update();
        if (plan.is_none() && durable < cursor) || in_flight_bytes >= credit {
            tokio::select! {
                _ = durable_rx.changed() => {}
                _ = acked_rx.changed() => {}
                end = &mut acks => return end.unwrap_or_else(|e| End::Retry(format!("ack task: {e}"))),
            }
            continue;
        }
        let budget = ((credit - in_flight_bytes) as usize).clamp(1, READ_WINDOW_BYTES);
        // Read and reduce on a blocking thread (SHA-256 and LZ4 are CPU work), a bounded
        // number of streams at a time (each holds up to a window of records).
        let Ok(_slot) = relay.reduce_slots.acquire().await else {
            return End::Retry("relay shutting down".into());
        };
        let (cache, rid, known, st) = (
            relay.cache.clone(),
            id.clone(),
            relay.clone(),
            state.clone(),
        );
        let mut r = reducer.take().expect("reducer present between reads");
        let mut p = plan.take();
        let coalesce = relay.config.wan.coalesce;
        let read = tokio::task::spawn_blocking(move || {
            let out = (|| {
                // A backlogged stream whose next recovery point is already durable:
                // coalesce the whole interval up to it (only its final content is sent).
                if p.is_none() && coalesce {
                    if let Some(tag) = cache.next_tag(&rid, cursor).filter(|t| *t <= durable) {
                        if tag > cursor {
                            p = Some(IntervalPlan::new(&cache, &rid, cursor, tag, &st.stages)?);
                        }
                    }
                }
                match p.as_mut() {
                    Some(plan) => r.next_from_plan(
                        plan,
                        &cache,
                        &rid,
                        budget,
                        &known.known_blocks,
                        &st.stages,
                    ),
                    None => cache
                        .read_batch(&rid, cursor, budget)
                        .map(|records| r.reduce(records, &known.known_blocks, &st.stages)),
                }
            })();
            (r, p.filter(|p| !p.is_done()), out)
        })
        .await;
        drop(_slot);
        let batches = match read {
            Ok((r, p, Ok(b))) => {
                reducer = Some(r);
                plan = p;
                b
            }
            Ok((_, _, Err(e @ CacheError::Corrupt { .. }))) => {
                acks.abort();
                let reason = format!("cache corruption, stream needs resync: {e}");
                let _ = relay.cache.drop_stream(id, reason.clone());
                return End::Fatal(reason);
            }
            Ok((_, _, Err(e))) => {
                acks.abort();
                return End::Retry(format!("reading the cache: {e}"));
            }
            Err(e) => {
                acks.abort();
                return End::Retry(format!("cache read task: {e}"));
            }
        };
        if batches.is_empty() {
            if let Some(reason) = relay.cache.stats(id).and_then(|s| s.needs_resync) {
                acks.abort();
                return End::Fatal(reason);
            }
            // Durable but no longer indexed: acknowledged meanwhile; re-read the state.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        for b in batches {
            // Wait for this stream's turn on the WAN leg (rate limit, fair share).
            let bytes = b.payload.len() as u64;
            relay.egress.acquire(id, bytes).await;
            relay
                .metrics
                .records_forwarded_total
                .inc_by(b.records.len() as u64);
            cursor = b.last_seq + 1;
            in_flight_bytes += bytes;
            in_flight.push_back(InFlight {
                last_seq: b.last_seq,
                bytes,
                records: b.records,
                literal_hashes: b.literal_hashes,
            });
            writer.push(&Frame::Batch(b.payload));
        }
        if let Err(e) = writer.flush().await {
            acks.abort();
            return End::Retry(format!("sending to the master target: {e}"));
        }
    }
}
