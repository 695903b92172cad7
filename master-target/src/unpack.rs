//! The reading half of a disk session: frames through the [`StreamReceiver`] into
//! checked records, queued for [`crate::apply`].
//!
//! The machine decides what is valid (sequence, bounds, alignment, batch spans); this
//! module only resolves WAN batches' references against the [`ContentIndex`] (reading
//! blocks back from journals, off the async threads) and bounds the bytes queued: a
//! relay that sends faster than the disk applies waits here, and its credit runs out.

use std::sync::Arc;

use fbr_protocol::stream::{Delivery, ReceivedBatch, Refusal, StreamReceiver};
use fbr_protocol::{ErrorCode, Record};
use fbr_transport::FrameReader;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::accept::MasterTarget;

/// Most bytes one applied batch may hold.
pub const MAX_APPLY_BYTES: usize = 32 << 20;
/// Most bytes of checked records queued for the applier.
pub const UNPACKED_BYTES: usize = 2 * MAX_APPLY_BYTES;

/// What the reader hands the applier: a checked record, or why the stream ends.
#[derive(Debug)]
pub enum Item {
    Record(Unpacked),
    Fail(Refusal),
}

/// A checked record with its share of the queue's byte budget.
#[derive(Debug)]
pub struct Unpacked {
    pub record: Record,
    /// `Some` for records that came in a WAN batch: for a write, which of its blocks
    /// arrived as bytes (only those are hashed into the content index); `None` for plain
    /// records (all their blocks are hashed).
    pub literal_blocks: Option<Vec<bool>>,
    pub permit: OwnedSemaphorePermit,
}

/// Reads the stream until it ends, queueing checked records.
pub async fn read_records(
    mut reader: FrameReader,
    mut receiver: StreamReceiver,
    queue: mpsc::UnboundedSender<Item>,
    budget: Arc<Semaphore>,
    mt: Arc<MasterTarget>,
) {
    let m = &mt.metrics;
    loop {
        let records: Vec<(Record, Option<Vec<bool>>)> =
            match receiver.handle(reader.receive().await) {
                Ok(Delivery::Record(r)) => vec![(r, None)],
                Ok(Delivery::Batch(batch)) => {
                    m.batches_received_total.inc();
                    match resolve(&mt, batch).await {
                        Ok(records) => records,
                        Err(refusal) => {
                            let _ = queue.send(Item::Fail(refusal));
                            return;
                        }
                    }
                }
                Ok(Delivery::Duplicate { records, batch }) => {
                    if batch {
                        m.batches_received_total.inc();
                    }
                    m.duplicates_skipped_total.inc_by(records);
                    continue;
                }
                Ok(Delivery::Finished) => return,
                Ok(Delivery::Gone(reason)) => {
                    tracing::debug!("stream read ended: {reason}");
                    return;
                }
                Err(refusal) => {
                    let _ = queue.send(Item::Fail(refusal));
                    return;
                }
            };
        for (record, literal_blocks) in records {
            let cost = record.encoded_len().min(MAX_APPLY_BYTES) as u32;
            let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                return;
            };
            let item = Item::Record(Unpacked {
                record,
                literal_blocks,
                permit,
            });
            if queue.send(item).is_err() {
                return;
            }
        }
    }
}

/// Resolves a batch's references from the content index (off the async threads, when it
/// has any).
async fn resolve(
    mt: &Arc<MasterTarget>,
    batch: ReceivedBatch,
) -> Result<Vec<(Record, Option<Vec<bool>>)>, Refusal> {
    let resolved = if !batch.has_references() {
        // Nothing to read back: no thread hop (with a thousand slow disks nearly every
        // batch is a few small literal writes and a tag).
        batch.resolve(|_, _| None)
    } else {
        let content = mt.content.clone();
        let (resolved, hits, misses, stale) = tokio::task::spawn_blocking(move || {
            let (mut hits, mut misses, mut stale) = (0u64, 0u64, 0u64);
            let resolved = batch.resolve(|hash, len| match content.lookup_block(hash, len) {
                Ok(block) => {
                    hits += 1;
                    Some(block)
                }
                Err(miss) => {
                    misses += 1;
                    stale += u64::from(miss == crate::content::LookupMiss::Stale);
                    None
                }
            });
            (resolved, hits, misses, stale)
        })
        .await
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("resolving a batch: {e}")))?;
        mt.metrics.dedup_references_resolved_total.inc_by(hits);
        mt.metrics.dedup_references_missing_total.inc_by(misses);
        mt.metrics.dedup_references_stale_total.inc_by(stale);
        resolved
    };
    Ok(resolved?
        .into_iter()
        .map(|r| (r.record, Some(r.literal_blocks)))
        .collect())
}
