//! The master target's network side: accepts relays over QUIC + mutual TLS, one stream
//! per disk, and applies each disk's records in order through its [`DiskReplica`].
//!
//! Per disk stream, two tasks form a pipeline:
//! - the *reader* decodes frames, checks them (sequence, alignment, bounds) and queues
//!   valid records; a duplicate (sequence below the next expected) is skipped, anything
//!   invalid ends the stream with a coded `Error` after the records before it;
//! - the *applier* takes everything queued as one batch (group commit: one `fdatasync`
//!   for many records), makes it durable, then acknowledges the batch's last sequence.
//!
//! Only one session owns a disk at a time. A new `Hello` for a disk supersedes the old
//! session (a relay that reconnected); the new one waits until the old one has finished
//! its batch, so the high-water mark it announces is exact.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbr_protocol::{wan, ErrorCode, Frame, Record, StreamId};
use fbr_transport::{peer_identity, FrameReader, FrameWriter, PeerIdentity, ReadError, Role};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use fbr_metrics::master_target::MasterTargetMetrics;

use crate::content::ContentIndex;
use crate::replica::{DiskReplica, ReplicaError};
use crate::store::Store;

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes one batch may hold.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// Everything the master target's sessions share.
#[derive(Debug)]
pub struct MasterTarget {
    pub data_dir: PathBuf,
    pub store: Arc<Store>,
    /// Credit granted to each stream (bytes of records that may be unacknowledged).
    pub credit_bytes: u64,
    pub metrics: MasterTargetMetrics,
    /// Blocks held, for resolving the relay's dedup references.
    pub content: Arc<ContentIndex>,
    slots: Mutex<HashMap<StreamId, Arc<DiskSlot>>>,
}

/// The one-owner-at-a-time cell of a disk.
#[derive(Debug)]
struct DiskSlot {
    replica: Arc<tokio::sync::Mutex<Option<DiskReplica>>>,
    /// Bumped by every new session; older sessions see the change and stop.
    generation: watch::Sender<u64>,
}

impl MasterTarget {
    /// `content_index_entries` bounds the dedup content index (0 disables it: every
    /// reference is answered with `UnknownReference`).
    pub fn new(
        data_dir: PathBuf,
        store: Store,
        credit_bytes: u64,
        content_index_entries: usize,
    ) -> Arc<Self> {
        let metrics = MasterTargetMetrics::new();
        // Every error code starts at zero, so rate() and alerts see the first error.
        for code in ErrorCode::KNOWN {
            metrics
                .stream_errors_total
                .with_label_values(&[code.name()]);
        }
        Arc::new(MasterTarget {
            data_dir,
            store: Arc::new(store),
            credit_bytes,
            metrics,
            content: Arc::new(ContentIndex::new(content_index_entries)),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a stream or connection ended with `code`.
    fn count_error(&self, code: ErrorCode) {
        self.metrics
            .stream_errors_total
            .with_label_values(&[code.name()])
            .inc();
    }

    fn slot(&self, id: &StreamId) -> Arc<DiskSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let known = slots.len();
        let slot = slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(DiskSlot {
                    replica: Arc::new(tokio::sync::Mutex::new(None)),
                    generation: watch::channel(0).0,
                })
            })
            .clone();
        self.metrics.disks.set(slots.len().max(known) as i64);
        slot
    }

    /// Accepts connections on `endpoint` until it is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let mt = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        mt.metrics.handshakes_refused_total.inc();
                        tracing::warn!(%remote, "connection refused during handshake: {e}");
                        return;
                    }
                };
                mt.serve_connection(conn, remote).await;
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection, remote: SocketAddr) {
        let peer = match peer_identity(&conn) {
            Ok(p) if p.has_role(Role::Relay) => p,
            Ok(p) => {
                self.count_error(ErrorCode::Unauthenticated);
                tracing::warn!(%remote, cn = %p.common_name, "refusing peer without the relay role");
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::Unauthenticated.as_u16() as u32),
                    b"certificate lacks urn:fbr:role:relay",
                );
                return;
            }
            Err(e) => {
                self.count_error(ErrorCode::Unauthenticated);
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::Unauthenticated.as_u16() as u32),
                    e.as_bytes(),
                );
                return;
            }
        };
        tracing::info!(%remote, cn = %peer.common_name, "relay connected");
        self.metrics.relay_connections_total.inc();
        let peer = Arc::new(peer);
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let mt = self.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        mt.metrics.relay_streams.inc();
                        mt.clone().serve_stream(peer, send, recv).await;
                        mt.metrics.relay_streams.dec();
                    });
                }
                Err(e) => {
                    tracing::info!(%remote, "relay connection ended: {e}");
                    return;
                }
            }
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer: Arc<PeerIdentity>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv);
        let mut writer = FrameWriter::new(send);
        let (id, disk_size) = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(Frame::Hello { stream, disk_size }))) => (stream, disk_size),
            Ok(Ok(Some(other))) => {
                return self
                    .refuse(
                        &mut writer,
                        ErrorCode::UnexpectedFrame,
                        format!("expected Hello, got {:?}", other.frame_type()),
                    )
                    .await
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return self.refuse(&mut writer, e.code(), e.to_string()).await,
            Err(_) => {
                return self
                    .refuse(
                        &mut writer,
                        ErrorCode::UnexpectedFrame,
                        "no Hello within 10 s",
                    )
                    .await
            }
        };
        if !peer.may_write(&id.vm) {
            return self
                .refuse(
                    &mut writer,
                    ErrorCode::NotEntitled,
                    format!("certificate does not entitle writing VM {}", id.vm),
                )
                .await;
        }
        let span = tracing::info_span!("stream", stream = %id);
        let _enter = span.enter();
        drop(_enter);

        // Take ownership of the disk, superseding any older session.
        let slot = self.slot(&id);
        let mut my_generation = 0;
        slot.generation.send_modify(|g| {
            *g += 1;
            my_generation = *g;
        });
        let mut generation_rx = slot.generation.subscribe();
        let mut owned = slot.replica.clone().lock_owned().await;
        if *generation_rx.borrow_and_update() != my_generation {
            return; // an even newer session took over while we waited
        }
        let replica = match owned.take() {
            Some(r) if r.disk_size == disk_size => r,
            Some(r) => {
                let msg = format!(
                    "disk {id} has size {} on record, Hello says {disk_size}",
                    r.disk_size
                );
                *owned = Some(r);
                return self
                    .refuse(&mut writer, ErrorCode::DiskSizeMismatch, msg)
                    .await;
            }
            None => {
                let (data_dir, store, id2) =
                    (self.data_dir.clone(), self.store.clone(), id.clone());
                match tokio::task::spawn_blocking(move || {
                    DiskReplica::open(&data_dir, &store, &id2, disk_size)
                })
                .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(e @ ReplicaError::DiskSizeMismatch { .. })) => {
                        return self
                            .refuse(&mut writer, ErrorCode::DiskSizeMismatch, e.to_string())
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::error!(stream = %id, "cannot open replica: {e}");
                        return self
                            .refuse(&mut writer, ErrorCode::Internal, e.to_string())
                            .await;
                    }
                    Err(e) => {
                        return self
                            .refuse(&mut writer, ErrorCode::Internal, e.to_string())
                            .await
                    }
                }
            }
        };
        let next_seq = replica.hwm() + 1;
        tracing::info!(stream = %id, next_seq, "stream accepted");
        if writer
            .send(&Frame::Accept {
                next_seq,
                credit_bytes: self.credit_bytes,
            })
            .await
            .is_err()
        {
            *owned = Some(replica);
            return;
        }

        // Reader: decode and check, queue valid records; bytes queued are bounded.
        let budget = Arc::new(Semaphore::new(MAX_BATCH_BYTES * 2));
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        let counters_mt = self.clone();
        let reader_task = tokio::spawn(read_records(
            reader,
            tx,
            budget.clone(),
            next_seq,
            disk_size,
            counters_mt,
        ));

        // Applier: batch, make durable, acknowledge.
        let mut replica = Some(replica);
        let mut failure: Option<(ErrorCode, String)> = None;
        'session: loop {
            let first = tokio::select! {
                item = rx.recv() => item,
                _ = generation_rx.changed() => {
                    tracing::info!(stream = %id, "superseded by a newer session");
                    break 'session;
                }
            };
            let mut batch = Vec::new();
            let mut literals = Vec::new();
            let mut permits = Vec::new();
            let mut batch_bytes = 0usize;
            let mut end = false;
            let mut next = first;
            loop {
                match next {
                    Some(Item::Record(r, p, literal)) => {
                        batch_bytes += r.encoded_len();
                        batch.push(r);
                        literals.push(literal);
                        permits.push(p);
                    }
                    Some(Item::Fail(code, msg)) => {
                        failure = Some((code, msg));
                        end = true;
                        break;
                    }
                    None => {
                        end = true;
                        break;
                    }
                }
                if batch_bytes >= MAX_BATCH_BYTES {
                    break;
                }
                match rx.try_recv() {
                    Ok(item) => next = Some(item),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let mut r = replica.take().expect("replica present between batches");
                let store = self.store.clone();
                let content = self.content.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let res = r.apply_batch(&store, &batch).map(|payloads| {
                        // Durable now: the blocks may be referenced from here on.
                        let journal = r.journal_path().to_path_buf();
                        for ((record, at), literal) in batch.iter().zip(payloads).zip(literals) {
                            if let Record::Write { data, .. } = record {
                                content.insert_write(&journal, at, data, literal.as_deref());
                            }
                        }
                    });
                    (r, res, batch)
                })
                .await;
                match result {
                    Ok((r, Ok(()), batch)) => {
                        let hwm = r.hwm();
                        replica = Some(r);
                        let logical: u64 = batch.iter().map(Record::logical_bytes).sum();
                        let tags = batch
                            .iter()
                            .filter(|r| matches!(r, Record::Tag { .. }))
                            .count();
                        let m = &self.metrics;
                        m.records_applied_total.inc_by(batch.len() as u64);
                        m.logical_bytes_applied_total.inc_by(logical);
                        m.batches_applied_total.inc();
                        m.tags_applied_total.inc_by(tags as u64);
                        drop(permits);
                        if writer.send(&Frame::Ack { seq: hwm }).await.is_err() {
                            break 'session;
                        }
                    }
                    Ok((_, Err(e), _)) => {
                        // The replica is dropped: the next session recovers it from disk.
                        tracing::error!(stream = %id, "apply failed: {e}");
                        failure = Some((ErrorCode::Internal, e.to_string()));
                        break 'session;
                    }
                    Err(e) => {
                        failure = Some((ErrorCode::Internal, format!("apply task: {e}")));
                        break 'session;
                    }
                }
            }
            if end {
                break;
            }
        }
        reader_task.abort();
        *owned = replica;
        if let Some((code, msg)) = failure {
            tracing::warn!(stream = %id, "closing stream: {code}: {msg}");
            self.count_error(code);
            writer.refuse(&Frame::error(code, msg)).await;
        } else {
            writer.finish();
        }
    }

    async fn refuse(&self, writer: &mut FrameWriter, code: ErrorCode, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::warn!("refusing stream: {code}: {msg}");
        self.count_error(code);
        writer.refuse(&Frame::error(code, msg)).await;
    }
}

/// What the reader hands the applier: a checked record, or why the stream ends. The
/// third field is `Some` for records that came in a WAN batch (for a write: which of
/// its blocks arrived as bytes, so only those are hashed into the content index) and
/// `None` for plain records (all their blocks are hashed).
enum Item {
    Record(Record, OwnedSemaphorePermit, Option<Vec<bool>>),
    Fail(ErrorCode, String),
}

async fn read_records(
    mut reader: FrameReader,
    tx: mpsc::UnboundedSender<Item>,
    budget: Arc<Semaphore>,
    mut expected: u64,
    disk_size: u64,
    mt: Arc<MasterTarget>,
) {
    let fail = |code, msg: String| {
        let _ = tx.send(Item::Fail(code, msg));
    };
    loop {
        let records: Vec<(Record, Option<Vec<bool>>)> = match reader.next().await {
            Ok(Some(Frame::Record(r))) => vec![(r, None)],
            Ok(Some(Frame::Batch(payload))) => {
                match unpack_batch(&mt, payload, &mut expected).await {
                    Ok(records) => records,
                    Err((code, msg)) => return fail(code, msg),
                }
            }
            Ok(Some(other)) => {
                return fail(
                    ErrorCode::UnexpectedFrame,
                    format!("{:?} frame in the middle of a stream", other.frame_type()),
                );
            }
            Ok(None) => return,
            Err(ReadError::Stream(e)) => {
                tracing::debug!("stream read ended: {e}");
                return;
            }
            Err(e) => return fail(e.code(), e.to_string()),
        };
        for (record, literal) in records {
            let seq = record.seq();
            if literal.is_none() {
                // A plain record: exactly the next one.
                if seq < expected {
                    mt.metrics.duplicates_skipped_total.inc();
                    continue;
                }
                if seq > expected {
                    return fail(
                        ErrorCode::SequenceGap,
                        format!("expected sequence {expected}, got {seq}"),
                    );
                }
                expected += 1;
            }
            if let Err((code, msg)) = record.check_against_disk(disk_size) {
                return fail(code, msg);
            }
            let cost = record.encoded_len().min(MAX_BATCH_BYTES) as u32;
            let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                return;
            };
            if tx.send(Item::Record(record, permit, literal)).is_err() {
                return;
            }
        }
    }
}

/// Decodes a WAN batch and resolves its references (reading blocks back from journals,
/// off the async threads). Records already held are dropped; `expected` moves past the
/// batch's span. Each write comes with which of its blocks arrived as bytes.
async fn unpack_batch(
    mt: &Arc<MasterTarget>,
    payload: bytes::Bytes,
    expected: &mut u64,
) -> Result<Vec<(Record, Option<Vec<bool>>)>, (ErrorCode, String)> {
    let batch = wan::decode_batch(payload).map_err(|e| (e.code(), e.to_string()))?;
    mt.metrics.batches_received_total.inc();
    if batch.first_seq > *expected {
        return Err((
            ErrorCode::SequenceGap,
            format!(
                "expected sequence {expected}, batch starts at {}",
                batch.first_seq
            ),
        ));
    }
    if batch.last_seq < *expected {
        mt.metrics
            .duplicates_skipped_total
            .inc_by(batch.items.len() as u64);
        return Ok(Vec::new());
    }
    // Items before `expected` are held already; the rest, resolved, bring the state to
    // exactly `last_seq` (the relay coalesced only within the batch's span).
    let from = *expected;
    let content = mt.content.clone();
    let resolved = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(batch.items.len());
        let (mut hits, mut misses) = (0u64, 0u64);
        for item in batch.items.into_iter().filter(|i| i.seq() >= from) {
            let literal = match &item {
                wan::Item::Write { blocks, .. } => Some(
                    blocks
                        .iter()
                        .map(|b| matches!(b, wan::Block::Literal(_)))
                        .collect::<Vec<bool>>(),
                ),
                wan::Item::Plain(_) => None,
            };
            let record = wan::resolve(item, |hash, len| {
                let found = content.lookup(hash, len);
                if found.is_some() {
                    hits += 1
                } else {
                    misses += 1
                }
                found
            });
            match record {
                Ok(r) => out.push((r, Some(literal.unwrap_or_default()))),
                Err(seq) => return Err((seq, hits, misses)),
            }
        }
        Ok((out, hits, batch.last_seq))
    })
    .await
    .map_err(|e| (ErrorCode::Internal, format!("resolving a batch: {e}")))?;
    match resolved {
        Ok((records, hits, last_seq)) => {
            mt.metrics.dedup_references_resolved_total.inc_by(hits);
            *expected = last_seq + 1;
            Ok(records)
        }
        Err((seq, hits, misses)) => {
            mt.metrics.dedup_references_resolved_total.inc_by(hits);
            mt.metrics.dedup_references_missing_total.inc_by(misses);
            Err((
                ErrorCode::UnknownReference,
                format!("record {seq} references a block this master target does not hold; resend it in full"),
            ))
        }
    }
}
