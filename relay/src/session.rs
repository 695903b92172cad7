//! One disk stream through the relay: agent -> ingest -> queue -> forwarder -> master
//! target, and acknowledgements back.
//!
//! ```text
//!  agent stream ──ingest──▶ StreamQueue ──forwarder──▶ master-target stream
//!       ▲                                                   │
//!       └──────────────────── acks (pass-through) ◀─────────┘
//! ```
//!
//! - **Ingest** checks every record before queueing it: sequence (a duplicate is skipped,
//!   a gap ends the stream with `SequenceGap`), alignment and disk bounds. Records before
//!   a bad one are forwarded; the bad one and everything after are not.
//! - **Forwarder** sends queued records in order, coalescing frames into large writes.
//! - **Acks**: the queue is memory, so the relay acknowledges a record to the agent only
//!   when the master target has (nothing acknowledged can be lost by a relay crash).
//!   The durable cache will move that point to "durable in the cache".
//! - On a bad record, the session drains what was queued, lets the master target
//!   acknowledge it, and only then sends the `Error` to the agent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{FrameReader, FrameWriter, PeerIdentity, ReadError};
use tokio::sync::Mutex;

use crate::queue::{stream_queue, QueueReader, QueueWriter};
use crate::server::Relay;

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to let the master target acknowledge what was forwarded before an error.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Flush the forwarder's buffer once it holds this much.
const FORWARD_FLUSH_BYTES: usize = 1 << 20;

/// The wire code that answers a read failure.
fn read_error_code(e: &ReadError) -> ErrorCode {
    match e {
        ReadError::Decode(d) => d.code(),
        ReadError::Truncated(_) => ErrorCode::MalformedFrame,
        ReadError::Stream(_) => ErrorCode::Internal,
    }
}

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
                .refuse(&mut agent_writer, None, read_error_code(&e), e.to_string())
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
    if !peer.may_write(&id.vm) {
        let msg = format!(
            "certificate {:?} does not entitle writing VM {}",
            peer.common_name, id.vm
        );
        return relay
            .refuse(&mut agent_writer, Some(&id), ErrorCode::NotEntitled, msg)
            .await;
    }

    // Supersede any older session of this disk (an agent that reconnected).
    let mut generation_rx = relay.claim_stream(&id);

    // Open the disk's stream to the master target and learn where it stands.
    let (up_send, up_recv) = match relay.upstream.open_stream().await {
        Ok(s) => s,
        Err(e) => {
            return relay
                .refuse(
                    &mut agent_writer,
                    Some(&id),
                    ErrorCode::UpstreamUnavailable,
                    e,
                )
                .await
        }
    };
    let mut up_reader = FrameReader::new(up_recv);
    let mut up_writer = FrameWriter::new(up_send);
    if up_writer
        .send(&Frame::Hello {
            stream: id.clone(),
            disk_size,
        })
        .await
        .is_err()
    {
        return relay
            .refuse(
                &mut agent_writer,
                Some(&id),
                ErrorCode::UpstreamUnavailable,
                "master target stream closed",
            )
            .await;
    }
    let (next_seq, credit) = match tokio::time::timeout(HELLO_TIMEOUT, up_reader.next()).await {
        Ok(Ok(Some(Frame::Accept {
            next_seq,
            credit_bytes,
        }))) => (next_seq, credit_bytes),
        Ok(Ok(Some(Frame::Error { code, message }))) => {
            // The master target's refusal (e.g. disk size mismatch) is the agent's answer.
            return relay
                .refuse(
                    &mut agent_writer,
                    Some(&id),
                    code,
                    format!("master target: {message}"),
                )
                .await;
        }
        other => {
            let msg = format!("master target did not accept the stream: {other:?}");
            return relay
                .refuse(
                    &mut agent_writer,
                    Some(&id),
                    ErrorCode::UpstreamUnavailable,
                    msg,
                )
                .await;
        }
    };
    if agent_writer
        .send(&Frame::Accept {
            next_seq,
            credit_bytes: credit,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(stream = %id, next_seq, credit, "stream open");

    let agent_writer = Arc::new(Mutex::new(agent_writer));
    let (queue_writer, queue_reader) = stream_queue(relay.config.queue_bytes_per_stream);
    let mut forwarder = tokio::spawn(forward(queue_reader, up_writer));
    let mut acker = tokio::spawn(pass_acks(up_reader, agent_writer.clone()));
    let ingest = ingest(&relay, &id, disk_size, next_seq, agent_reader, queue_writer);
    tokio::pin!(ingest);

    tokio::select! {
        outcome = &mut ingest => {
            // The queue writer is dropped: the forwarder drains and finishes upstream,
            // the master target acknowledges and finishes, and the acker ends.
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                let _ = (&mut forwarder).await;
                (&mut acker).await.ok().flatten()
            })
            .await;
            let upstream_error = match drained {
                Ok(e) => e,
                Err(_) => {
                    forwarder.abort();
                    acker.abort();
                    None
                }
            };
            let mut w = agent_writer.lock().await;
            match (outcome, upstream_error) {
                (Err((code, msg)), _) => relay.refuse(&mut w, Some(&id), code, msg).await,
                (Ok(()), Some((code, msg))) => relay.refuse(&mut w, Some(&id), code, msg).await,
                (Ok(()), None) => w.finish(),
            }
        }
        upstream_end = &mut acker => {
            // The master target closed or failed the stream before the agent finished.
            forwarder.abort();
            let (code, msg) = upstream_end.ok().flatten().unwrap_or((
                ErrorCode::UpstreamUnavailable,
                "master target closed the stream".to_string(),
            ));
            let mut w = agent_writer.lock().await;
            relay.refuse(&mut w, Some(&id), code, msg).await;
        }
        _ = generation_rx.changed() => {
            tracing::info!(stream = %id, "superseded by a newer session");
            forwarder.abort();
            acker.abort();
        }
    }
}

/// Reads the agent's records, checks them and queues the valid ones. Returns `Ok` when
/// the agent finished (or went away) and `Err` with the refusal for invalid input.
async fn ingest(
    relay: &Relay,
    id: &StreamId,
    disk_size: u64,
    mut expected: u64,
    mut reader: FrameReader,
    queue: QueueWriter,
) -> Result<(), (ErrorCode, String)> {
    loop {
        let record = match reader.next().await {
            Ok(Some(Frame::Record(r))) => r,
            Ok(Some(other)) => {
                return Err((
                    ErrorCode::UnexpectedFrame,
                    format!("{:?} frame in the middle of a stream", other.frame_type()),
                ))
            }
            Ok(None) => return Ok(()),
            Err(ReadError::Stream(e)) => {
                tracing::info!(stream = %id, "agent stream ended: {e}");
                return Ok(());
            }
            Err(e) => return Err((read_error_code(&e), e.to_string())),
        };
        let seq = record.seq();
        if seq < expected {
            relay
                .counters
                .duplicates_skipped
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if seq > expected {
            return Err((
                ErrorCode::SequenceGap,
                format!("expected sequence {expected}, got {seq}"),
            ));
        }
        record.check_against_disk(disk_size)?;
        relay
            .counters
            .records_ingested
            .fetch_add(1, Ordering::Relaxed);
        relay
            .counters
            .logical_bytes_ingested
            .fetch_add(record.logical_bytes(), Ordering::Relaxed);
        expected += 1;
        if !queue.push(record).await {
            return Ok(());
        }
    }
}

/// Sends queued records to the master target in order; finishes the upstream stream
/// when the queue is closed and empty.
async fn forward(mut queue: QueueReader, mut up: FrameWriter) {
    while let Some(first) = queue.pop().await {
        up.push(&Frame::Record(first));
        while up.pending() < FORWARD_FLUSH_BYTES {
            match queue.try_pop() {
                Some(r) => up.push(&Frame::Record(r)),
                None => break,
            }
        }
        if up.flush().await.is_err() {
            return;
        }
    }
    up.finish();
}

/// Relays the master target's acknowledgements to the agent. Returns the master
/// target's error, if it ended the stream with one.
async fn pass_acks(
    mut up: FrameReader,
    agent: Arc<Mutex<FrameWriter>>,
) -> Option<(ErrorCode, String)> {
    loop {
        match up.next().await {
            Ok(Some(frame @ (Frame::Ack { .. } | Frame::Credit { .. }))) => {
                if agent.lock().await.send(&frame).await.is_err() {
                    return None;
                }
            }
            Ok(Some(Frame::Error { code, message })) => {
                return Some((code, format!("master target: {message}")))
            }
            Ok(Some(other)) => {
                return Some((
                    ErrorCode::UpstreamUnavailable,
                    format!(
                        "master target sent an unexpected {:?} frame",
                        other.frame_type()
                    ),
                ))
            }
            Ok(None) => return None,
            Err(e) => {
                return Some((
                    ErrorCode::UpstreamUnavailable,
                    format!("master target stream failed: {e}"),
                ))
            }
        }
    }
}
