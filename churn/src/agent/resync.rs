//! The agent's side of a resync: make the master target's replica equal to this disk
//! while it keeps changing.
//!
//! 1. A hash stream to the master target (through the relay) says what it knows of the
//!    replica (`HashAccept`): new, stale, consistent, or resyncing (which resync, how
//!    far). [`decide`] turns that and the disk's plan into what to do: nothing, resume
//!    the resync in progress, a delta resync (original location), a full copy
//!    (alternate location), or, for an agent that came back after a crash, a delta
//!    resync of the regions it may have written without an acknowledgement.
//! 2. A `Resync` begin mark is numbered on the disk's ordered stream (tags cut from
//!    now on are no recovery point).
//! 3. The protocol's [`ResyncScanner`] asks for hashes, compares them with this disk
//!    (read and hashed off the async threads), and names the ranges to send. Each range
//!    is read *under the generator's lock*, together with the numbering of its records,
//!    so a change drawn after the read always lands after it (`fbr_protocol::resync`
//!    explains why the comparison itself needs no lock). All-zero blocks go as zero
//!    ranges.
//! 4. Progress marks (every [`PROGRESS_EVERY`]) record how far the resync is done; the
//!    master target keeps them, so a resync interrupted by any crash resumes there.
//!    The end mark closes it: the next tag is a recovery point again.
//!
//! Memory: the scanner's window of hashes, and at most [`PENDING_LIMIT`] bytes of resync
//! records queued for the stream (it waits for the sender to drain them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fbr_protocol::resync::{
    node_range, regions, NodeHasher, RegionSet, ResyncScanner, SendRange, BLOCK_BYTES,
};
use fbr_protocol::{
    Frame, Record, ReplicaState, ResyncMark, ResyncMode, ResyncPhase, MAX_WRITE_BYTES,
};
use fbr_transport::{FrameReader, FrameWriter, PeerLink};

use super::{DiskRuntime, ResyncPlan, RunStats};

use crate::image::read_padded;
use fbr_storage::DurableFile;

/// Most regions (1 MiB each) one zero range covers when a full copy crosses holes.
const HOLE_RUN_REGIONS: u64 = 4096;
/// How often a progress mark is numbered while a resync runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Most bytes of resync records queued for the stream at once.
pub const PENDING_LIMIT: usize = 8 << 20;

/// What the master target said of the replica, from `HashAccept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaReport {
    pub replica: ReplicaState,
    pub resync_id: u64,
    pub mode: ResyncMode,
    pub next_region: u64,
}

/// What a disk does about resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Run resync `id` in `mode` over `set` (`resumed`: the master target had it in
    /// progress).
    Resync {
        id: u64,
        mode: ResyncMode,
        set: RegionSet,
        resumed: bool,
    },
}

/// The disk's plan and what the master target knows decide the resync (pure).
/// `dirty`: regions an earlier agent may have written unacknowledged (after a crash).
pub fn decide(
    plan: ResyncPlan,
    report: ReplicaReport,
    source_has_data: bool,
    dirty: &[(u64, u64)],
    disk_regions: u64,
    new_id: u64,
) -> Decision {
    let whole = || RegionSet::range(0, disk_regions);
    if report.replica == ReplicaState::Resyncing {
        // Finish what was started; regions written unacknowledged before it count too.
        let mut runs: Vec<(u64, u64)> = dirty
            .iter()
            .copied()
            .filter(|(a, _)| *a < report.next_region)
            .collect();
        runs.push((report.next_region.min(disk_regions), disk_regions));
        return Decision::Resync {
            id: report.resync_id,
            mode: report.mode,
            set: RegionSet::runs(runs),
            resumed: true,
        };
    }
    let fresh = |mode, set| Decision::Resync {
        id: new_id,
        mode,
        set,
        resumed: false,
    };
    match (plan, report.replica) {
        (ResyncPlan::Full, _) => fresh(ResyncMode::Full, whole()),
        (ResyncPlan::Delta, _) => fresh(ResyncMode::Delta, whole()),
        (ResyncPlan::Auto, ReplicaState::Stale) => fresh(ResyncMode::Delta, whole()),
        (ResyncPlan::Auto, ReplicaState::New) if source_has_data => {
            fresh(ResyncMode::Full, whole())
        }
        _ if !dirty.is_empty() => fresh(ResyncMode::Delta, RegionSet::runs(dirty.to_vec())),
        _ => Decision::Nothing,
    }
}

/// A hash stream: HashHello answered.
struct HashStream {
    reader: FrameReader,
    writer: FrameWriter,
    report: ReplicaReport,
}

impl HashStream {
    async fn open(
        link: &PeerLink,
        disk: &DiskRuntime,
        key: [u8; 32],
    ) -> Result<Self, (bool, String)> {
        let transient = |e: String| (true, e);
        let (send, recv) = link
            .open_stream()
            .await
            .map_err(|e| transient(e.to_string()))?;
        let mut reader = FrameReader::new(recv);
        let mut writer = FrameWriter::new(send);
        let hello = Frame::HashHello {
            stream: disk.plan.id.clone(),
            disk_size: disk.plan.disk_size,
            key,
        };
        writer
            .send(&hello)
            .await
            .map_err(|e| transient(format!("sending HashHello: {e}")))?;
        let answer = tokio::time::timeout(Duration::from_secs(30), reader.next()).await;
        match answer {
            Ok(Ok(Some(Frame::HashAccept {
                replica,
                resync_id,
                mode,
                next_region,
                ..
            }))) => Ok(HashStream {
                reader,
                writer,
                report: ReplicaReport {
                    replica,
                    resync_id,
                    mode,
                    next_region,
                },
            }),
            Ok(Ok(Some(Frame::Error { code, message }))) => {
                Err((code.is_transient(), format!("{code}: {message}")))
            }
            Ok(Ok(other)) => Err(transient(format!(
                "unexpected answer to HashHello: {other:?}"
            ))),
            Ok(Err(e)) => Err(transient(format!("reading HashAccept: {e}"))),
            Err(_) => Err(transient("no HashAccept within 30 s".into())),
        }
    }
}

/// Opens a hash stream, retrying transient failures for up to `give_up_after`.
async fn connect(
    link: &PeerLink,
    disk: &DiskRuntime,
    key: [u8; 32],
    give_up_after: Duration,
) -> Result<HashStream, String> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match HashStream::open(link, disk, key).await {
            Ok(s) => return Ok(s),
            Err((true, why)) if started.elapsed() < give_up_after => {
                tracing::info!(stream = %disk.plan.id, "hash stream: {why}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err((_, why)) => return Err(format!("resync: {why}")),
        }
    }
}

/// Runs the disk's resync of `plan` (if the replica needs one); tells the tag
/// coordinator once decided. `epoch` is the resync's number: when another resync
/// starts (the relay lost this one's records), this one stops without a word.
pub(super) async fn drive(disk: Arc<DiskRuntime>, plan: ResyncPlan, epoch: u64) {
    let ctx = disk.ctx.clone();
    // The VM's relay when the resync starts (a resync after a move uses the new one).
    let link = ctx.route.link();
    let outcome = resync(&disk, plan, epoch, &link, &ctx.stats, ctx.reconnect_timeout).await;
    if disk.lock_gen().resync_epoch != epoch {
        return; // superseded: the newer resync owns the disk's resync state
    }
    if let Err(e) = &outcome {
        tracing::error!(stream = %disk.plan.id, "{e}");
    }
    let mut g = disk.lock_gen();
    g.resync_busy = false;
    if outcome.is_err() {
        // The stream goes on without; its tags stay no recovery point.
        g.exhausted = g.exhausted || g.resync_open;
    }
    drop(g);
    disk.ready.send_replace(true);
    disk.window_changed.send_modify(|v| *v += 1);
}

async fn resync(
    disk: &Arc<DiskRuntime>,
    plan: ResyncPlan,
    epoch: u64,
    link: &PeerLink,
    stats: &RunStats,
    give_up_after: Duration,
) -> Result<(), String> {
    let superseded = || disk.lock_gen().resync_epoch != epoch;
    // A resumed disk numbers on from where the relay stands: wait for that first.
    if disk.plan.start.resume {
        let mut accepted = disk.accepted_once.subscribe();
        accepted
            .wait_for(|a| *a)
            .await
            .map_err(|_| "the disk's stream ended before it was accepted".to_string())?;
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| "resync: no randomness for the hash key".to_string())?;
    let mut hs = connect(link, disk, key, give_up_after).await?;
    let file = disk
        .lock_gen()
        .disk
        .clone()
        .ok_or("resync needs the disk's file")?;
    let disk_size = disk.plan.disk_size;
    let dirty = disk
        .dirty
        .as_ref()
        .filter(|_| disk.plan.start.resume)
        .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).runs())
        .unwrap_or_default();
    let decision = decide(
        plan,
        hs.report,
        !disk.plan.start.source_base.is_empty(),
        &dirty,
        regions(disk_size),
        u64::from_le_bytes(key[..8].try_into().expect("8 bytes")) | 1,
    );
    tracing::info!(stream = %disk.plan.id, report = ?hs.report, ?decision, "resync decided");
    let Decision::Resync { id, mode, set, .. } = decision else {
        hs.writer.finish().await;
        release_dirty(disk);
        return Ok(());
    };
    let mut scanner = ResyncScanner::new(disk_size, mode, set);
    let mark = |phase, s: &ResyncScanner| ResyncMark {
        id,
        phase,
        mode,
        next_region: s.next_region(),
        regions: regions(disk_size),
        compared_bytes: s.compared_bytes(),
        sent_bytes: s.sent_bytes(),
    };
    {
        let begin = mark(ResyncPhase::Begin, &scanner);
        let mut g = disk.lock_gen();
        let seq = g.push_resync(epoch, |seq| Record::Resync { seq, mark: begin })?;
        g.resync_open = true;
        disk.mark_numbered(seq, begin.next_region, false);
    }
    stats.resyncs_started.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    *disk.resync.lock().unwrap_or_else(|p| p.into_inner()) = super::ResyncLive {
        disk_regions: regions(disk_size),
        applied_region: scanner.next_region(),
        started: Some(started),
        ..Default::default()
    };
    update_live(disk, &scanner, None, 0);
    disk.ready.send_replace(true);

    let mut hasher = NodeHasher::new(key);
    let mut last_mark = Instant::now();
    let mut hash_bytes = 0u64;
    let mut outstanding = 0usize;
    loop {
        if superseded() {
            return Err("superseded by a newer resync".into());
        }
        // Ask for what the window allows.
        while let Some((level, first, count)) = scanner.poll_request() {
            hs.writer.push(&Frame::HashRequest {
                level,
                first,
                count,
            });
            outstanding += 1;
        }
        if hs.writer.pending() > 0 && hs.writer.flush().await.is_err() {
            hs = reconnect(
                link,
                disk,
                key,
                give_up_after,
                &mut scanner,
                &mut outstanding,
            )
            .await?;
            continue;
        }
        // Send what differs. Consecutive holes (a sparse disk's empty stretches) go as
        // one zero range.
        let mut holes: Vec<SendRange> = Vec::new();
        while let Some(range) = scanner.poll_send() {
            let hole = file.is_hole(range.offset, range.len);
            let contiguous = holes
                .last()
                .is_none_or(|h| h.offset + h.len == range.offset);
            if !hole || !contiguous || holes.len() as u64 >= HOLE_RUN_REGIONS {
                send_holes(disk, epoch, &mut holes, &mut scanner, stats)?;
            }
            if hole {
                holes.push(range);
                continue;
            }
            send_range(disk, epoch, &file, range).await?;
            sent(&mut scanner, range, stats);
            if let Some(rate) = disk.plan.start.resync_rate {
                // Paced: the blocks sent so far may not run ahead of the rate.
                let due = Duration::from_secs_f64(scanner.sent_bytes() as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        send_holes(disk, epoch, &mut holes, &mut scanner, stats)?;
        if last_mark.elapsed() >= PROGRESS_EVERY {
            let m = mark(ResyncPhase::Progress, &scanner);
            let seq = disk
                .lock_gen()
                .push_resync(epoch, |seq| Record::Resync { seq, mark: m })?;
            disk.mark_numbered(seq, m.next_region, false);
            disk.window_changed.send_modify(|v| *v += 1);
            last_mark = Instant::now();
            update_live(disk, &scanner, None, hash_bytes);
        }
        if scanner.is_done() {
            break;
        }
        if outstanding == 0 {
            continue;
        }
        // The next answer.
        let frame = match hs.reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => {
                hs = reconnect(
                    link,
                    disk,
                    key,
                    give_up_after,
                    &mut scanner,
                    &mut outstanding,
                )
                .await?;
                continue;
            }
        };
        match frame {
            Frame::Hashes {
                level,
                first,
                hashes,
            } => {
                outstanding -= 1;
                hash_bytes += 16 * hashes.len() as u64;
                stats
                    .resync_hash_bytes
                    .fetch_add(16 * hashes.len() as u64, Ordering::Relaxed);
                let before = scanner.compared_bytes();
                let f = file.clone();
                let mut h = hasher.clone();
                let mut s = scanner;
                let (s, h, result) = tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::new();
                    let result = s.handle_hashes(level, first, &hashes, |l, i| {
                        let (offset, len) = node_range(l, i, disk_size).ok_or("beyond the disk")?;
                        if f.is_hole(offset, len) {
                            return Ok::<_, String>(h.zero_hash(len as usize));
                        }
                        buf.resize(len as usize, 0);
                        read_padded(&*f, offset, &mut buf).map_err(|e| e.to_string())?;
                        Ok(h.hash(&buf))
                    });
                    (s, h, result)
                })
                .await
                .map_err(|e| format!("resync hashing task: {e}"))?;
                scanner = s;
                hasher = h;
                result.map_err(|e| format!("resync: {e}"))?;
                stats
                    .resync_compared_bytes
                    .fetch_add(scanner.compared_bytes() - before, Ordering::Relaxed);
            }
            Frame::Error { code, message } if code.is_transient() => {
                tracing::info!(stream = %disk.plan.id, "hash stream closed: {code}: {message}");
                hs = reconnect(
                    link,
                    disk,
                    key,
                    give_up_after,
                    &mut scanner,
                    &mut outstanding,
                )
                .await?;
            }
            Frame::Error { code, message } => {
                return Err(format!("resync refused: {code}: {message}"));
            }
            other => {
                return Err(format!(
                    "resync: unexpected {:?} on the hash stream",
                    other.frame_type()
                ))
            }
        }
    }
    hs.writer.finish().await;
    if superseded() {
        return Err("superseded by a newer resync".into());
    }
    {
        let end = mark(ResyncPhase::End, &scanner);
        let mut g = disk.lock_gen();
        let seq = g.push_resync(epoch, |seq| Record::Resync { seq, mark: end })?;
        g.resync_open = false;
        disk.mark_numbered(seq, end.next_region, true);
    }
    disk.window_changed.send_modify(|v| *v += 1);
    release_dirty(disk);
    stats.resyncs_done.fetch_add(1, Ordering::Relaxed);
    update_live(disk, &scanner, Some(Instant::now()), hash_bytes);
    tracing::info!(
        stream = %disk.plan.id,
        mode = mode.name(),
        compared = scanner.compared_bytes(),
        sent = scanner.sent_bytes(),
        hash_bytes,
        seconds = started.elapsed().as_secs_f64(),
        "resync done"
    );
    Ok(())
}

/// `range` was numbered: the scanner and the counters learn it.
fn sent(scanner: &mut ResyncScanner, range: SendRange, stats: &RunStats) {
    scanner.sent(range);
    stats
        .resync_sent_bytes
        .fetch_add(range.len, Ordering::Relaxed);
    if scanner.mode() == ResyncMode::Full {
        stats
            .resync_compared_bytes
            .fetch_add(range.len, Ordering::Relaxed);
    }
}

/// Numbers a run of holes (contiguous ranges known to read as zeros) as one zero range.
fn send_holes(
    disk: &DiskRuntime,
    epoch: u64,
    holes: &mut Vec<SendRange>,
    scanner: &mut ResyncScanner,
    stats: &RunStats,
) -> Result<(), String> {
    let (Some(first), Some(last)) = (holes.first(), holes.last()) else {
        return Ok(());
    };
    let (offset, len) = (first.offset, last.offset + last.len - first.offset);
    disk.lock_gen()
        .push_resync(epoch, |seq| Record::Zero { seq, offset, len })?;
    disk.window_changed.send_modify(|v| *v += 1);
    for range in holes.drain(..) {
        sent(scanner, range, stats);
    }
    Ok(())
}

/// The hash stream broke: open another, and ask again what was not answered.
async fn reconnect(
    link: &PeerLink,
    disk: &DiskRuntime,
    key: [u8; 32],
    give_up_after: Duration,
    scanner: &mut ResyncScanner,
    outstanding: &mut usize,
) -> Result<HashStream, String> {
    scanner.reconnected();
    *outstanding = 0;
    connect(link, disk, key, give_up_after).await
}

/// Reads `range` of the disk and numbers it as records, under the generator's lock
/// (after waiting for room in the stream's queue).
async fn send_range(
    disk: &DiskRuntime,
    epoch: u64,
    file: &std::fs::File,
    range: SendRange,
) -> Result<(), String> {
    let mut window = disk.window_changed.subscribe();
    while disk.lock_gen().pending_bytes > PENDING_LIMIT {
        let _ = tokio::time::timeout(Duration::from_millis(20), window.changed()).await;
    }
    let mut g = disk.lock_gen();
    let records = if file.is_hole(range.offset, range.len) {
        // A hole: zeros, without reading them.
        vec![Record::Zero {
            seq: 0,
            offset: range.offset,
            len: range.len,
        }]
    } else {
        let mut buf = vec![0u8; range.len as usize];
        read_padded(file, range.offset, &mut buf)
            .map_err(|e| format!("reading the disk at {}: {e}", range.offset))?;
        records_of(range.offset, &buf)
    };
    for record in records {
        g.push_resync(epoch, |seq| with_seq(record, seq))?;
    }
    drop(g);
    disk.window_changed.send_modify(|v| *v += 1);
    Ok(())
}

/// The records that carry `data` (read at `offset`): runs of all-zero 4 KiB blocks as
/// zero ranges, the rest as writes of at most 1 MiB. Sequence numbers are set later.
fn records_of(offset: u64, data: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let block = BLOCK_BYTES as usize;
    let mut i = 0;
    while i < data.len() {
        let zero = fbr_protocol::wan::is_zero(&data[i..(i + block).min(data.len())]);
        let mut j = i;
        while j < data.len()
            && fbr_protocol::wan::is_zero(&data[j..(j + block).min(data.len())]) == zero
            && (zero || j - i < MAX_WRITE_BYTES)
        {
            j = (j + block).min(data.len());
        }
        let at = offset + i as u64;
        out.push(if zero {
            Record::Zero {
                seq: 0,
                offset: at,
                len: (j - i) as u64,
            }
        } else {
            Record::Write {
                seq: 0,
                offset: at,
                data: Bytes::copy_from_slice(&data[i..j]),
            }
        });
        i = j;
    }
    out
}

fn with_seq(record: Record, seq: u64) -> Record {
    match record {
        Record::Write { offset, data, .. } => Record::Write { seq, offset, data },
        Record::Zero { offset, len, .. } => Record::Zero { seq, offset, len },
        other => other,
    }
}

fn release_dirty(disk: &DiskRuntime) {
    if let Some(d) = &disk.dirty {
        d.lock().unwrap_or_else(|p| p.into_inner()).release();
    }
}

/// The agent's side of the resync's live progress (the master target's side follows
/// its acknowledgements, in `DiskRuntime::resync_applied`).
fn update_live(
    disk: &DiskRuntime,
    scanner: &ResyncScanner,
    finished: Option<Instant>,
    hash_bytes: u64,
) {
    let mut live = disk.resync.lock().unwrap_or_else(|p| p.into_inner());
    live.mode = Some(scanner.mode());
    live.regions_done = scanner.regions_done();
    live.regions_total = scanner.regions_total();
    live.compared_bytes = scanner.compared_bytes();
    live.sent_bytes = scanner.sent_bytes();
    live.hash_bytes = hash_bytes.max(live.hash_bytes);
    if finished.is_some() {
        live.finished = finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(replica: ReplicaState) -> ReplicaReport {
        ReplicaReport {
            replica,
            resync_id: 7,
            mode: ResyncMode::Full,
            next_region: 10,
        }
    }

    #[test]
    fn each_replica_state_gets_the_resync_it_needs() {
        let d = |plan, state, data, dirty: &[(u64, u64)]| {
            decide(plan, report(state), data, dirty, 40, 99)
        };
        assert_eq!(
            d(ResyncPlan::Auto, ReplicaState::Consistent, true, &[]),
            Decision::Nothing
        );
        assert!(matches!(
            d(ResyncPlan::Auto, ReplicaState::Stale, true, &[]),
            Decision::Resync {
                mode: ResyncMode::Delta,
                id: 99,
                resumed: false,
                ..
            }
        ));
        assert!(matches!(
            d(ResyncPlan::Auto, ReplicaState::New, true, &[]),
            Decision::Resync {
                mode: ResyncMode::Full,
                ..
            }
        ));
        assert_eq!(
            d(ResyncPlan::Auto, ReplicaState::New, false, &[]),
            Decision::Nothing,
            "an empty disk and an empty replica are in step"
        );
        // A resync in progress is resumed where the master target says, whatever the
        // plan; regions written unacknowledged before it are added.
        assert_eq!(
            d(
                ResyncPlan::None,
                ReplicaState::Resyncing,
                true,
                &[(2, 3), (20, 21)]
            ),
            Decision::Resync {
                id: 7,
                mode: ResyncMode::Full,
                set: RegionSet::runs(vec![(2, 3), (10, 40)]),
                resumed: true,
            }
        );
        // An agent back from a crash resyncs what it may have lost.
        assert_eq!(
            d(ResyncPlan::None, ReplicaState::Consistent, true, &[(5, 6)]),
            Decision::Resync {
                id: 99,
                mode: ResyncMode::Delta,
                set: RegionSet::runs(vec![(5, 6)]),
                resumed: false,
            }
        );
    }

    #[test]
    fn zero_runs_become_zero_ranges_and_writes_stay_under_the_limit() {
        let mut data = vec![1u8; 3 * 4096 + (2 << 20)];
        data[4096..2 * 4096].fill(0);
        let records = records_of(8192, &data);
        let kinds: Vec<(bool, u64, u64)> = records
            .iter()
            .map(|r| match r {
                Record::Write { offset, data, .. } => (true, *offset, data.len() as u64),
                Record::Zero { offset, len, .. } => (false, *offset, *len),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(kinds[0], (true, 8192, 4096));
        assert_eq!(kinds[1], (false, 8192 + 4096, 4096));
        assert!(kinds[2..].iter().all(|(w, _, len)| *w && *len <= 1 << 20));
        let total: u64 = kinds.iter().map(|k| k.2).sum();
        assert_eq!(total, data.len() as u64);
    }
}
