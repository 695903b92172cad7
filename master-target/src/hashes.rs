//! Hash streams: the master target's side of a resync's comparison.
//!
//! An agent (through its relay) opens a stream whose first frame is `HashHello`. The
//! master target answers `HashAccept` with what it knows of the replica (new, stale,
//! consistent, or resyncing: which resync, how far) and then answers each `HashRequest`
//! with the keyed hashes of the nodes asked for (`fbr_protocol::resync`), read from the
//! replica's image. Requests are checked by the receiver machine (levels, nodes within
//! the disk); the image is read off the async threads, one request at a time, so a
//! stream holds at most one answer in memory (64 KiB of hashes, 4 MiB of image read).
//!
//! The image is read while the replica keeps applying: `fbr_protocol::resync` explains
//! why that is safe. A disk this master target never saw reads as zeros (it has no
//! image yet), and is reported `New`.

use std::fs::File;
use std::sync::Arc;

use fbr_protocol::resync::{hash_nodes, NodeHasher};
use fbr_protocol::stream::{HashInput, Refusal, StreamReceiver};
use fbr_protocol::{ErrorCode, Frame, ReplicaState, ResyncMode, StreamId};
use fbr_storage::DurableFile;
use fbr_transport::{FrameReader, FrameWriter};

use crate::accept::MasterTarget;
use crate::files::image_path;

/// Serves one hash stream to its end.
pub async fn serve(
    mt: Arc<MasterTarget>,
    mut receiver: StreamReceiver,
    id: StreamId,
    disk_size: u64,
    key: [u8; 32],
    mut reader: FrameReader,
    mut writer: FrameWriter,
) {
    let status = match mt.disk_status(&id, disk_size).await {
        Ok(s) => s,
        Err(e) => {
            let refusal = receiver.refuse(ErrorCode::Internal, e.to_string());
            return mt.refuse(&mut writer, &refusal, Some(&id)).await;
        }
    };
    if let Some(s) = status {
        if let Err(refusal) = receiver.check_disk_size(s.disk_size) {
            return mt.refuse(&mut writer, &refusal, Some(&id)).await;
        }
    }
    let accept = match status {
        None => Frame::HashAccept {
            replica: ReplicaState::New,
            resync_id: 0,
            mode: ResyncMode::Delta,
            next_region: 0,
            hwm: 0,
        },
        Some(s) => {
            let resync = s.sync.resync();
            // A replica that holds nothing yet is new, whoever created it.
            let replica = match s.sync.replica_state() {
                ReplicaState::Consistent if s.hwm == 0 => ReplicaState::New,
                state => state,
            };
            Frame::HashAccept {
                replica,
                resync_id: resync.map_or(0, |m| m.id),
                mode: resync.map_or(ResyncMode::Delta, |m| m.mode),
                next_region: resync.map_or(0, |m| m.next_region),
                hwm: s.hwm,
            }
        }
    };
    tracing::info!(?accept, "hash stream open");
    if writer.send(&accept).await.is_err() {
        return;
    }
    // The image, if the disk has one (a new disk reads as zeros).
    let image = File::open(image_path(mt.files.root(), &id))
        .ok()
        .map(Arc::new);
    let mut hasher = NodeHasher::new(key);
    loop {
        let (level, first, count) = match receiver.handle_hash_request(reader.receive().await) {
            Ok(HashInput::Request {
                level,
                first,
                count,
            }) => (level, first, count),
            Ok(HashInput::Finished) => return writer.finish().await,
            Err(refusal) => return mt.refuse(&mut writer, &refusal, Some(&id)).await,
        };
        let file = image.clone();
        let mut h = hasher.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let mut read = 0u64;
            let hashes = hash_nodes(level, first, count, disk_size, &mut h, &mut buf, |o, b| {
                read += b.len() as u64;
                read_image(file.as_deref(), o, b)
            });
            (hashes, read, h)
        })
        .await;
        let hashes = match answer {
            Ok((Ok(hashes), read, h)) => {
                hasher = h;
                mt.metrics.hash_requests_total.inc();
                mt.metrics.hashed_bytes_total.inc_by(read);
                mt.metrics
                    .hash_bytes_sent_total
                    .inc_by(16 * hashes.len() as u64);
                hashes
            }
            Ok((Err(e), _, _)) => {
                let refusal = Refusal::new(ErrorCode::Internal, format!("reading the image: {e}"));
                return mt.refuse(&mut writer, &refusal, Some(&id)).await;
            }
            Err(e) => {
                let refusal = Refusal::new(ErrorCode::Internal, format!("hash task: {e}"));
                return mt.refuse(&mut writer, &refusal, Some(&id)).await;
            }
        };
        let frame = Frame::Hashes {
            level,
            first,
            hashes,
        };
        if writer.send(&frame).await.is_err() {
            return;
        }
    }
}

/// Reads `buf.len()` bytes of the image at `offset`; `true` (nothing read) where the
/// image is a hole, has ended, or does not exist: zeros.
fn read_image(image: Option<&File>, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    let Some(file) = image else {
        return Ok(true);
    };
    let len = DurableFile::size(file)?;
    if offset >= len || file.is_hole(offset, buf.len() as u64) {
        return Ok(true);
    }
    buf.fill(0);
    let n = ((len - offset) as usize).min(buf.len());
    DurableFile::read_at(file, &mut buf[..n], offset)?;
    Ok(false)
}
