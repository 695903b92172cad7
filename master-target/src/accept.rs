//! The master target's network side: accepts relays over QUIC + mutual TLS, one stream
//! per disk, and runs each disk's session.
//!
//! A session is a thin driver of the protocol's [`StreamReceiver`]: the machine checks
//! `Hello` (entitlement, disk size on record) and every record; this module owns the
//! disk while the session lasts, opens (and recovers) its replica, answers `Accept` with
//! the replica's high-water mark, then runs two tasks:
//! - [`crate::unpack`] reads frames through the machine and queues checked records
//!   (WAN batches resolved against the content index);
//! - [`crate::apply`] takes everything queued as one batch (group commit), makes it
//!   durable and acknowledges it.
//!
//! Only one session owns a disk at a time. A new `Hello` for a disk supersedes the old
//! session (a relay that reconnected); the new one waits until the old one has finished
//! its batch, so the high-water mark it announces is exact.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fbr_metrics::master_target::MasterTargetMetrics;
use fbr_protocol::codec::{self, CodecMemory, StreamDecompressor};
use fbr_protocol::placement::Admission;
use fbr_protocol::stream::{Opening, ReceiverConfig, Refusal, StreamReceiver};
use fbr_protocol::{ErrorCode, StreamId};
use fbr_transport::credit::CreditShare;
use fbr_transport::{require_role, FrameReader, FrameWriter, PeerIdentity, Role};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use crate::content::ContentIndex;
use crate::files::DataDir;
use crate::replica::{DiskReplica, ReplicaError};
use crate::store::{ReplicaIndex, Store};
use crate::sync::SyncState;
use crate::unpack::UNPACKED_BYTES;

/// Everything the master target's sessions share.
#[derive(Debug)]
pub struct MasterTarget {
    /// The replicas' files, under the data directory.
    pub files: DataDir,
    pub store: Arc<Store>,
    /// Credit granted to relay streams (bytes of records that may be unacknowledged):
    /// each open stream's share of one budget.
    pub credit: Arc<CreditShare>,
    pub metrics: MasterTargetMetrics,
    /// Blocks held, for resolving the relay's dedup references.
    pub content: Arc<ContentIndex>,
    /// Each stream's placement on record: a relay's `Hello` below it is refused
    /// before it can take the disk over ([`fbr_protocol::placement`]).
    pub placements: fbr_daemon::placements::PlacementStore,
    /// Every group's retention: the configured policies, with those operators chose at
    /// reprotect in their place (`set_retention` control requests change it).
    pub retention: std::sync::RwLock<crate::retention::Retention>,
    /// Memory of the streams' zstd decompression contexts ([`fbr_protocol::codec`]).
    pub codec_memory: Arc<CodecMemory>,
    slots: Mutex<HashMap<StreamId, Arc<DiskSlot>>>,
}

/// The least credit a relay stream is granted, however many share the budget: a disk's
/// batches keep flowing at 64 KiB per round trip and apply (over half a MB/s per disk
/// at 100 ms), and a thousand disks hold 64 MiB in flight.
pub const MIN_STREAM_CREDIT: u64 = 64 << 10;

/// How much relay streams may have in flight: `memory` for all together, at most
/// `per_stream` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditBudget {
    pub memory: u64,
    pub per_stream: u64,
}

/// The one-owner-at-a-time cell of a disk.
#[derive(Debug)]
pub(crate) struct DiskSlot {
    replica: Arc<tokio::sync::Mutex<Option<DiskReplica>>>,
    /// Bumped by every new session; older sessions see the change and stop.
    generation: watch::Sender<u64>,
    /// Where the replica stands, published by the session that owns it (hash streams
    /// read it without taking the replica from its session).
    status: Mutex<Option<DiskStatus>>,
    /// Snapshots of the image asked for (test failovers): whoever holds the replica
    /// takes them between two batches ([`MasterTarget::serve_snapshots`]).
    snapshots: Mutex<Vec<SnapshotJob>>,
    pub(crate) snapshot_wake: tokio::sync::Notify,
}

/// A snapshot of a disk's image asked for: written to `dest`, answered on `reply`.
#[derive(Debug)]
pub(crate) struct SnapshotJob {
    dest: std::path::PathBuf,
    reply: tokio::sync::oneshot::Sender<Result<Snapshot, String>>,
}

/// The image of a disk copied at a batch boundary: it is the state at journal offset
/// `journal_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub journal_end: u64,
    pub disk_size: u64,
    pub method: crate::replica::CopyMethod,
}

/// How long a snapshot may wait for the disk's session to reach a batch boundary.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where an open replica stands: enough to answer `HashAccept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskStatus {
    pub disk_size: u64,
    pub hwm: u64,
    pub sync: SyncState,
}

impl MasterTarget {
    /// `content_index_entries` bounds the dedup content index (0 disables it: every
    /// reference is answered with `UnknownReference`); `codec_memory` caps the zstd
    /// contexts of all streams (0: no stream is granted one).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        files: DataDir,
        store: Store,
        credit: CreditBudget,
        content_index_entries: usize,
        codec_memory: u64,
        placements: fbr_daemon::placements::PlacementStore,
        retention: crate::retention::Retention,
    ) -> Arc<Self> {
        let metrics = MasterTargetMetrics::new();
        let credit_gauge = metrics.stream_credit_bytes.clone();
        let credit = CreditShare::new(
            credit.memory,
            MIN_STREAM_CREDIT,
            credit.per_stream,
            Box::new(move |share| credit_gauge.set(share as i64)),
        );
        Arc::new(MasterTarget {
            files,
            store: Arc::new(store),
            credit,
            metrics,
            content: Arc::new(ContentIndex::new(content_index_entries)),
            placements,
            retention: std::sync::RwLock::new(retention),
            codec_memory: CodecMemory::new(codec_memory),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The retention in force now.
    pub fn retention(&self) -> crate::retention::Retention {
        self.retention
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `policy` `group`'s retention, durably first (it outlives restarts and
    /// overrides the configuration's for the group).
    pub fn choose_retention(
        &self,
        group: &str,
        policy: crate::retention::RetentionPolicy,
    ) -> Result<(), crate::store::StoreError> {
        self.store.set_chosen_retention(group, policy)?;
        self.retention
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .groups
            .insert(group.to_owned(), policy);
        Ok(())
    }

    /// Publishes where `replica` stands (after it opened, and after every batch): for
    /// hash streams and the per-disk gauges.
    pub(crate) fn publish(&self, slot: &DiskSlot, replica: &DiskReplica) {
        let status = DiskStatus {
            disk_size: replica.disk_size,
            hwm: replica.hwm(),
            sync: replica.sync_state(),
        };
        let previous = slot
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(status);
        // The gauges change only with the sync state (a label lookup per batch of each
        // of a thousand disks is a cost per record).
        if previous.is_some_and(|p| p.sync == status.sync) {
            return;
        }
        let labels = [replica.id.vm.as_str(), &replica.id.disk.to_string()];
        let m = &self.metrics;
        m.disk_sync_state
            .with_label_values(&labels)
            .set(status.sync.gauge());
        let (done, total) = status
            .sync
            .resync()
            .map_or((0, 0), |r| (r.next_region, r.regions));
        m.resync_regions_done
            .with_label_values(&labels)
            .set(done as i64);
        m.resync_regions
            .with_label_values(&labels)
            .set(total as i64);
    }

    /// Where the replica of `id` stands, for a hash stream: as its session published it,
    /// or, with no session since the start, recovered from disk now (the replica then
    /// stays open for the next session). `None` for a disk this master target never saw.
    pub(crate) async fn disk_status(
        self: &Arc<Self>,
        id: &StreamId,
        disk_size: u64,
    ) -> Result<Option<DiskStatus>, ReplicaError> {
        let slot = self.slot(id);
        for _ in 0..500 {
            if let Some(s) = *slot.status.lock().unwrap_or_else(|p| p.into_inner()) {
                return Ok(Some(s));
            }
            if let Ok(mut owned) = slot.replica.clone().try_lock_owned() {
                if owned.is_none() {
                    if self.store.checkpoint(id)?.is_none() {
                        return Ok(None);
                    }
                    *owned = Some(self.open_replica(id, disk_size).await?);
                }
                if let Some(r) = owned.as_ref() {
                    self.publish(&slot, r);
                }
                continue;
            }
            // A session owns the replica and is about to publish where it stands.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(ReplicaError::Io {
            file: format!("disk {id}"),
            source: std::io::Error::other("its session did not publish its state within 5 s"),
        })
    }

    /// Copies the image of disk `id` to `dest` at a batch boundary while replication goes
    /// on: the session that owns the disk takes the copy between two batches, or, with
    /// no session, this call opens the replica and takes it.
    pub async fn snapshot(
        self: &Arc<Self>,
        id: &StreamId,
        disk_size: u64,
        dest: std::path::PathBuf,
    ) -> Result<Snapshot, String> {
        let slot = self.slot(id);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        slot.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(SnapshotJob { dest, reply });
        slot.snapshot_wake.notify_one();
        let started = Instant::now();
        loop {
            // No session holds the disk: take it here. Else its applier takes it at its
            // next batch boundary.
            if let Ok(mut owned) = slot.replica.clone().try_lock_owned() {
                let replica = match owned.take() {
                    Some(r) => r,
                    None => self
                        .open_replica(id, disk_size)
                        .await
                        .map_err(|e| format!("disk {id}: {e}"))?,
                };
                *owned = Some(self.serve_snapshots(&slot, replica).await);
            }
            match tokio::time::timeout(std::time::Duration::from_millis(250), &mut answer).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_)) => return Err(format!("disk {id}: the snapshot was dropped")),
                Err(_) if started.elapsed() > SNAPSHOT_WAIT => {
                    return Err(format!(
                        "disk {id}: its session reached no batch boundary within {SNAPSHOT_WAIT:?}"
                    ))
                }
                Err(_) => {}
            }
        }
    }

    /// Takes every snapshot asked of `slot` from `replica` (at a batch boundary), off
    /// the async threads; gives the replica back.
    pub(crate) async fn serve_snapshots(
        &self,
        slot: &DiskSlot,
        replica: DiskReplica,
    ) -> DiskReplica {
        let jobs = std::mem::take(&mut *slot.snapshots.lock().unwrap_or_else(|p| p.into_inner()));
        if jobs.is_empty() {
            return replica;
        }
        let replica = Arc::new(replica);
        let r = replica.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for job in jobs {
                let taken = r
                    .snapshot_image(&job.dest)
                    .map(|(journal_end, method)| Snapshot {
                        journal_end,
                        disk_size: r.disk_size,
                        method,
                    })
                    .map_err(|e| format!("copying {} to {}: {e}", r.id, job.dest.display()));
                let _ = job.reply.send(taken);
            }
        })
        .await;
        Arc::try_unwrap(replica).unwrap_or_else(|_| unreachable!("the snapshot task has ended"))
    }

    /// At a graceful stop: waits (at most `wait` in all) for each disk's session to hand
    /// its replica back, and takes a checkpoint of every open replica, so the next start
    /// (or a rollback) has nothing to replay. Returns the disks checkpointed.
    pub async fn checkpoint_all(self: &Arc<Self>, wait: std::time::Duration) -> usize {
        let slots: Vec<Arc<DiskSlot>> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut done = 0;
        let deadline = tokio::time::Instant::now() + wait;
        for slot in slots {
            let lock = slot.replica.clone().lock_owned();
            let Ok(mut owned) = tokio::time::timeout_at(deadline, lock).await else {
                continue; // a session still applies: recovery replays from its checkpoint
            };
            let Some(mut replica) = owned.take() else {
                continue;
            };
            let store = self.store.clone();
            let result = tokio::task::spawn_blocking(move || {
                let r = replica.take_checkpoint(&*store, &[]);
                (replica, r)
            })
            .await;
            if let Ok((replica, r)) = result {
                match r {
                    Ok(()) => done += 1,
                    Err(e) => tracing::warn!(disk = %replica.id, "checkpoint at stop: {e}"),
                }
                *owned = Some(replica);
            }
        }
        done
    }

    pub(crate) fn slot(&self, id: &StreamId) -> Arc<DiskSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(DiskSlot {
                    replica: Arc::new(tokio::sync::Mutex::new(None)),
                    generation: watch::channel(0).0,
                    status: Mutex::new(None),
                    snapshots: Mutex::new(Vec::new()),
                    snapshot_wake: tokio::sync::Notify::new(),
                })
            })
            .clone();
        self.metrics.disks.set(slots.len() as i64);
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
        let peer = match require_role(&conn, Role::Relay) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(%remote, "refusing connection: {why}");
                self.metrics
                    .stream_errors_total
                    .count(ErrorCode::Unauthenticated);
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
                        mt.clone().serve_stream(&peer, send, recv).await;
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

    /// One disk stream: `Hello`, then the rest in the stream's span.
    async fn serve_stream(
        self: Arc<Self>,
        peer: &PeerIdentity,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv);
        let mut writer = FrameWriter::new(send);
        let mut receiver = StreamReceiver::new(
            ReceiverConfig::relay_facing(),
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
                self.serve_disk(receiver, stream, disk_size, placement, reader, writer)
                    .instrument(span)
                    .await
            }
            Ok(Some(Opening::Hashes {
                stream,
                disk_size,
                key,
            })) => {
                let span = tracing::info_span!("hashes", stream = %stream);
                crate::hashes::serve(self, receiver, stream, disk_size, key, reader, writer)
                    .instrument(span)
                    .await
            }
            Ok(Some(Opening::Control { request })) => {
                let answer = crate::control::serve_remote(&self, &peer.entitlement, &request).await;
                if let Some(e) = &answer.error {
                    tracing::info!(cn = %peer.common_name, "control request refused: {e}");
                }
                // The answer in as many frames as it takes, then the stream's end.
                let body = serde_json::to_vec(&answer).unwrap_or_default();
                for chunk in body.chunks(fbr_protocol::MAX_FRAME_PAYLOAD) {
                    let frame = fbr_protocol::Frame::ControlAnswer {
                        answer: bytes::Bytes::copy_from_slice(chunk),
                    };
                    if writer.send(&frame).await.is_err() {
                        return;
                    }
                }
                writer.finish().await;
            }
            Ok(None) => {}
            Err(refusal) => self.refuse(&mut writer, &refusal, None).await,
        }
    }

    /// Owns the disk, opens its replica, accepts, and runs the reader and the applier.
    async fn serve_disk(
        self: Arc<Self>,
        mut receiver: StreamReceiver,
        id: StreamId,
        disk_size: u64,
        placement: u64,
        reader: FrameReader,
        mut writer: FrameWriter,
    ) {
        // Take ownership of the disk, superseding any older session, unless this
        // relay's placement is stale: checked (and a higher one recorded) in the same
        // step as the generation bump, so a stale relay cannot supersede the current
        // one between the two.
        let slot = self.slot(&id);
        let mut my_generation = 0;
        let mut admitted = Ok(Admission::Current);
        // `send_if_modified`: a refused Hello must not even wake the current session.
        slot.generation.send_if_modified(|g| {
            admitted = self.placements.admit(&id, placement);
            let takes_over = matches!(admitted, Ok(Admission::Current | Admission::Raised { .. }));
            if takes_over {
                *g += 1;
                my_generation = *g;
            }
            takes_over
        });
        match admitted {
            Ok(Admission::Current) => {}
            Ok(Admission::Raised { from }) => {
                self.metrics.stream_moves_total.inc();
                tracing::info!(from, placement, "the stream moved to this relay");
            }
            Ok(Admission::Stale { on_record }) => {
                let refusal = receiver
                    .check_placement(placement, on_record)
                    .err()
                    .unwrap_or_else(|| receiver.refuse(ErrorCode::Internal, "placement"));
                return self.refuse(&mut writer, &refusal, Some(&id)).await;
            }
            Err(e) => {
                tracing::error!("{e}");
                let refusal = receiver.refuse(ErrorCode::Internal, e.to_string());
                return self.refuse(&mut writer, &refusal, Some(&id)).await;
            }
        }
        let mut generation_rx = slot.generation.subscribe();
        let mut owned = slot.replica.clone().lock_owned().await;
        if *generation_rx.borrow_and_update() != my_generation {
            return; // an even newer session took over while we waited
        }
        let replica = match owned.take() {
            Some(r) => match receiver.check_disk_size(r.disk_size) {
                Ok(()) => r,
                Err(refusal) => {
                    *owned = Some(r);
                    return self.refuse(&mut writer, &refusal, Some(&id)).await;
                }
            },
            None => match self.open_replica(&id, disk_size).await {
                Ok(r) => r,
                Err(ReplicaError::DiskSizeMismatch { on_record, .. }) => {
                    let refusal = receiver
                        .check_disk_size(on_record)
                        .err()
                        .unwrap_or_else(|| receiver.refuse(ErrorCode::Internal, "disk size"));
                    return self.refuse(&mut writer, &refusal, Some(&id)).await;
                }
                Err(e) => {
                    tracing::error!("cannot open replica: {e}");
                    let refusal = receiver.refuse(ErrorCode::Internal, e.to_string());
                    return self.refuse(&mut writer, &refusal, Some(&id)).await;
                }
            },
        };
        self.publish(&slot, &replica);
        receiver.track_resync(replica.sync_state().resync().map(|m| m.id));
        // The stream's place in the credit share, held for the session.
        let mut credit = self.credit.join();
        let granted = *credit.share.borrow_and_update();
        let accept = receiver.accept_with(replica.hwm() + 1, granted, self.zstd_context());
        tracing::info!(next_seq = replica.hwm() + 1, "stream accepted");
        if writer.send(&accept).await.is_err() {
            *owned = Some(replica);
            return;
        }

        // Reader: frames through the machine into checked records; bytes queued are
        // bounded by the budget.
        let budget = Arc::new(Semaphore::new(UNPACKED_BYTES));
        let (tx, queue) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(
            crate::unpack::read_records(reader, receiver, tx, budget, self.clone())
                .in_current_span(),
        );
        // Applier: batch, make durable, acknowledge.
        let (replica, failure) = crate::apply::run(
            &self,
            &slot,
            replica,
            queue,
            &mut generation_rx,
            &mut writer,
            &mut credit,
        )
        .await;
        reader_task.abort();
        *owned = replica;
        match failure {
            Some(refusal) => self.refuse(&mut writer, &refusal, Some(&id)).await,
            None => writer.finish().await,
        }
    }

    /// A zstd decompression context for a new stream, from the stream's fair share of
    /// [`Self::codec_memory`] among the disks this master target holds; `None` when the
    /// pool is spent or off (the relay then sends LZ4 or plain batches).
    fn zstd_context(&self) -> Option<StreamDecompressor> {
        let streams = self.slots.lock().unwrap_or_else(|p| p.into_inner()).len();
        let reservation =
            self.codec_memory
                .reserve(streams, codec::MAX_WINDOW_LOG, codec::decompressor_cost)?;
        match StreamDecompressor::new(reservation) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!("no zstd context for the stream: {e}");
                None
            }
        }
    }

    /// Opens (and recovers) the replica of `id` off the async threads.
    async fn open_replica(
        &self,
        id: &StreamId,
        disk_size: u64,
    ) -> Result<DiskReplica, ReplicaError> {
        let (files, store, id) = (self.files.clone(), self.store.clone(), id.clone());
        tokio::task::spawn_blocking(move || DiskReplica::open(&files, &*store, &id, disk_size))
            .await
            .unwrap_or_else(|e| {
                Err(ReplicaError::Io {
                    file: "(replica open task)".into(),
                    source: std::io::Error::other(e),
                })
            })
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
