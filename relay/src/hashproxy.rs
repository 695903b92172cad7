//! Hash streams, relayed: an agent's resync compares its disk with the master target's
//! replica through the relay, which passes the conversation on without keeping it.
//!
//! The agent's `HashHello` is checked by the agent-facing receiver machine (the
//! certificate must entitle the agent to the VM), then the relay opens a stream to the
//! master target, sends the same `HashHello`, and copies frames both ways: from the
//! agent only `HashRequest`s (checked against the disk's size by the machine), from the
//! master target only `HashAccept`, `Hashes` and `Error`. Nothing is cached: if either
//! side goes away, both streams end, and the agent asks again (its progress is kept by
//! the master target, in the `Resync` marks of the ordered data stream). Memory is
//! bounded by the QUIC windows: a frame is read only when the previous one was written.

use std::sync::Arc;

use fbr_protocol::stream::{HashInput, Refusal, StreamReceiver};
use fbr_protocol::{ErrorCode, Frame, StreamId};
use fbr_transport::{FrameReader, FrameWriter};

use crate::forwarder::Upstream;
use crate::ingest::IngestContext;

/// Relays one hash stream until either side ends it.
pub async fn relay(
    ctx: Arc<IngestContext>,
    mut receiver: StreamReceiver,
    id: StreamId,
    disk_size: u64,
    key: [u8; 32],
    mut agent_reader: FrameReader,
    mut agent_writer: FrameWriter,
) {
    ctx.metrics.hash_streams_total.inc();
    let upstream = ctx.forwarders.context().upstream.clone();
    let (mut mt_writer, mut mt_reader) = match Upstream::open_stream(&*upstream).await {
        Ok(s) => s,
        Err(e) => {
            let refusal = receiver.refuse(
                ErrorCode::UpstreamUnavailable,
                format!("the master target is unreachable: {e}"),
            );
            return ctx.refuse(&mut agent_writer, &refusal, Some(&id)).await;
        }
    };
    let hello = Frame::HashHello {
        stream: id.clone(),
        disk_size,
        key,
    };
    if mt_writer.send(&hello).await.is_err() {
        let refusal = Refusal::new(
            ErrorCode::UpstreamUnavailable,
            "the master target went away",
        );
        return ctx.refuse(&mut agent_writer, &refusal, Some(&id)).await;
    }
    // Either direction ending ends the stream; an agent's bad request is answered.
    let refusal = {
        let to_mt = async {
            loop {
                match receiver.handle_hash_request(agent_reader.receive().await) {
                    Ok(HashInput::Request {
                        level,
                        first,
                        count,
                    }) => {
                        let request = Frame::HashRequest {
                            level,
                            first,
                            count,
                        };
                        if mt_writer.send(&request).await.is_err() {
                            return None;
                        }
                    }
                    Ok(HashInput::Finished) => {
                        mt_writer.finish().await;
                        return None;
                    }
                    Err(refusal) => return Some(refusal),
                }
            }
        };
        let to_agent = async {
            let mut accepted = false;
            loop {
                let frame = match mt_reader.next().await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::info!("hash stream from the master target ended: {e}");
                        return;
                    }
                };
                let allowed = match &frame {
                    Frame::HashAccept { .. } => !accepted,
                    Frame::Hashes { .. } => accepted,
                    Frame::Error { .. } => true,
                    _ => false,
                };
                if !allowed {
                    tracing::warn!(
                        "the master target sent {:?} on a hash stream; closing it",
                        frame.frame_type()
                    );
                    return;
                }
                accepted = true;
                let last = matches!(frame, Frame::Error { .. });
                if agent_writer.send(&frame).await.is_err() || last {
                    return;
                }
            }
        };
        tokio::pin!(to_mt);
        tokio::pin!(to_agent);
        tokio::select! {
            refusal = &mut to_mt => refusal,
            () = &mut to_agent => None,
        }
    };
    if let Some(refusal) = refusal {
        return ctx.refuse(&mut agent_writer, &refusal, Some(&id)).await;
    }
    agent_writer.finish().await;
}
