//! The applying half of a disk session: group commit of queued records.
//!
//! Everything queued by [`crate::unpack`] is taken as one batch (up to
//! [`MAX_APPLY_BYTES`]), appended to the journal with one `fdatasync` and applied by
//! [`DiskReplica::apply_batch`] off the async threads; then the written blocks enter the
//! content index (they are durable: the relay may reference them from now on), and the
//! batch's last sequence number is acknowledged. When the stream's share of the credit
//! budget changes (streams joined or left), the relay hears it in a `Credit` frame. An
//! apply failure drops the replica (the next session recovers it from disk) and ends the
//! stream with `Internal`.

use fbr_protocol::stream::Refusal;
use fbr_protocol::{ErrorCode, Frame, Record};
use fbr_transport::credit::CreditHolder;
use fbr_transport::FrameWriter;
use tokio::sync::{mpsc, watch};

use crate::accept::{DiskSlot, MasterTarget};
use crate::replica::DiskReplica;
use crate::unpack::{Item, Unpacked, MAX_APPLY_BYTES};

/// Applies queued records until the queue ends, a refusal or failure arrives, or a newer
/// session supersedes this one. Returns the replica (unless applying failed) and the
/// refusal to send, if any.
pub(crate) async fn run(
    mt: &MasterTarget,
    slot: &DiskSlot,
    replica: DiskReplica,
    mut queue: mpsc::UnboundedReceiver<Item>,
    generation_rx: &mut watch::Receiver<u64>,
    writer: &mut FrameWriter,
    credit: &mut CreditHolder,
) -> (Option<DiskReplica>, Option<Refusal>) {
    let mut replica = Some(replica);
    loop {
        let first = tokio::select! {
            item = queue.recv() => item,
            _ = generation_rx.changed() => {
                tracing::info!("superseded by a newer session");
                return (replica, None);
            }
            // Streams joined or left: the share changed. A smaller share only slows
            // the relay down (what it already sent is queued and applied).
            Ok(()) = credit.share.changed() => {
                let credit_bytes = *credit.share.borrow_and_update();
                if writer.send(&Frame::Credit { credit_bytes }).await.is_err() {
                    return (replica, None);
                }
                continue;
            }
            // A test failover's snapshot, between two batches.
            _ = slot.snapshot_wake.notified() => {
                let Some(r) = replica.take() else {
                    return (None, None);
                };
                replica = Some(mt.serve_snapshots(slot, r).await);
                continue;
            }
        };
        let (batch, end) = take_batch(first, &mut queue);
        if !batch.is_empty() {
            let Some(r) = replica.take() else {
                return (None, None);
            };
            match apply(mt, r, batch).await {
                Ok(r) => {
                    let hwm = r.hwm();
                    mt.publish(slot, &r);
                    replica = Some(r);
                    if writer.send(&Frame::Ack { seq: hwm }).await.is_err() {
                        return (replica, None);
                    }
                }
                // The replica is dropped: the next session recovers it from disk.
                Err(refusal) => return (None, Some(refusal)),
            }
        }
        if let Some(end) = end {
            return (replica, end);
        }
    }
}

/// Everything queued, up to [`MAX_APPLY_BYTES`]: the records, and whether the stream
/// ends after them (`Some(None)`: finished; `Some(Some(refusal))`: refused).
fn take_batch(
    first: Option<Item>,
    queue: &mut mpsc::UnboundedReceiver<Item>,
) -> (Vec<Unpacked>, Option<Option<Refusal>>) {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut next = first;
    loop {
        match next {
            Some(Item::Record(u)) => {
                bytes += u.record.encoded_len();
                batch.push(u);
            }
            Some(Item::Fail(refusal)) => return (batch, Some(Some(refusal))),
            None => return (batch, Some(None)),
        }
        if bytes >= MAX_APPLY_BYTES {
            return (batch, None);
        }
        match queue.try_recv() {
            Ok(item) => next = Some(item),
            Err(_) => return (batch, None),
        }
    }
}

/// Makes `batch` durable and applies it, then indexes its blocks and counts it.
async fn apply(
    mt: &MasterTarget,
    mut replica: DiskReplica,
    batch: Vec<Unpacked>,
) -> Result<DiskReplica, Refusal> {
    let (store, content) = (mt.store.clone(), mt.content.clone());
    // The queue's budget is given back only once the batch is applied: records in
    // flight count against it until then.
    let mut permits = Vec::with_capacity(batch.len());
    let mut literals = Vec::with_capacity(batch.len());
    let records: Vec<Record> = batch
        .into_iter()
        .map(|u| {
            permits.push(u.permit);
            literals.push(u.literal_blocks);
            u.record
        })
        .collect();
    let result = tokio::task::spawn_blocking(move || {
        let applied = replica.apply_batch(&*store, &records).map(|payloads| {
            // Durable now: the blocks may be referenced from here on.
            for ((record, at), literal) in records.iter().zip(payloads).zip(literals) {
                if let Record::Write { data, .. } = record {
                    content.insert_write(
                        &replica.id,
                        replica.journal(),
                        at,
                        data,
                        literal.as_deref(),
                    );
                }
            }
        });
        (replica, applied, records)
    })
    .await;
    drop(permits);
    match result {
        Ok((replica, Ok(()), records)) => {
            let logical: u64 = records.iter().map(Record::logical_bytes).sum();
            let tags = records
                .iter()
                .filter(|r| matches!(r, Record::Tag { .. }))
                .count();
            let m = &mt.metrics;
            m.records_applied_total.inc_by(records.len() as u64);
            m.logical_bytes_applied_total.inc_by(logical);
            m.batches_applied_total.inc();
            m.tags_applied_total.inc_by(tags as u64);
            Ok(replica)
        }
        Ok((_, Err(e), _)) => {
            tracing::error!("apply failed: {e}");
            Err(Refusal::new(ErrorCode::Internal, e.to_string()))
        }
        Err(e) => Err(Refusal::new(
            ErrorCode::Internal,
            format!("apply task: {e}"),
        )),
    }
}
