//! `churn verify`: proves the master target's replicas byte-identical to the sources at
//! every recovery point.
//!
//! For each disk, two images are built side by side in sequence order, each in a sparse
//! scratch file (so a disk of any size verifies in bounded memory): the **source**, from
//! the image it started from and its changes drawn again from its [`SourceSpec`]; and
//! the **replica**, from the image the master target's replica started from (a seeded
//! original-location disk, or zeros) and the master target's journal replayed (exactly
//! how a recovery point is materialised). At each tag both must be equal; only the
//! 64 KiB chunks written on either side since the previous comparison need comparing,
//! once a first comparison of the whole disk has shown them equal (needed only when the
//! two started from different images, or the run continued an earlier one). At the end
//! the replica must also equal the master target's actual `image.raw` file.
//!
//! Resync records (blocks read from the source disk, and marks) change the replica, not
//! the source: the manifest says which sequence numbers carried them. Tags cut while a
//! disk resynced are no recovery point: the master target must not offer them.
//!
//! A recovery point is *verified* when the master target holds it complete and every
//! member disk matched at it. The run is verified when every recovery point the master
//! target holds is verified, every tag the sources saw acknowledged (outside a resync)
//! is among them, and every acknowledged record is in the journal.
//!
//! The master target must be stopped (its index is exclusively locked while it runs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use fbr_master_target::files::{image_path, journal_path};
use fbr_master_target::journal::{apply_record, JournalReader, JOURNAL_HEADER_LEN};
use fbr_master_target::replica::FileImage;
use fbr_master_target::Store;
use fbr_protocol::{Record, StreamId};
use serde::Serialize;

use crate::image::{first_difference, read_padded, ImageSpec};
use crate::source::{ChangeSource, DiskManifest, Manifest};
use crate::workload::ContentPools;

const CHUNK: u64 = 64 * 1024;

/// The outcome of a verification.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub verified: bool,
    /// Complete recovery points the master target holds for the run's groups.
    pub recovery_points_complete: usize,
    /// Of those, the ones proven byte-identical on every member disk.
    pub recovery_points_verified: usize,
    pub disks: Vec<DiskReport>,
    /// Copies of disks at a point (failovers) proven equal to the source there.
    pub copies_verified: usize,
    /// Everything that went wrong, in words.
    pub errors: Vec<String>,
}

/// A copy of a disk at a recovery point (what a failover booted from) to prove equal
/// to the source at that point.
#[derive(Debug, Clone)]
pub struct CopyCheck {
    pub id: StreamId,
    pub tag_id: u64,
    pub path: std::path::PathBuf,
}

/// What was found on one disk.
#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub vm: String,
    pub disk: u32,
    pub acked_seq: u64,
    /// Last sequence number in the master target's journal.
    pub journal_seq: u64,
    pub tags_checked: usize,
    pub tags_matching: usize,
    pub final_image_matches: bool,
}

/// A disk image being rebuilt, in a sparse scratch file.
struct Scratch {
    file: File,
    disk_size: u64,
}

impl Scratch {
    fn new(dir: &Path, name: &str, spec: &ImageSpec, disk_size: u64) -> std::io::Result<Self> {
        let file = spec.create_file(&dir.join(name), disk_size)?;
        Ok(Scratch { file, disk_size })
    }

    fn apply(&self, record: &Record) -> std::io::Result<()> {
        apply_record(record, &mut FileImage(&self.file))
    }
}

/// The 64 KiB chunks changed on either side since the last comparison.
struct Dirty {
    chunks: BTreeSet<u64>,
    /// The next comparison must cover the whole disk (the sides started apart).
    everything: bool,
}

impl Dirty {
    fn mark(&mut self, record: &Record) {
        let (offset, len) = match record {
            Record::Write { offset, data, .. } => (*offset, data.len() as u64),
            Record::Zero { offset, len, .. } => (*offset, *len),
            Record::Tag { .. } | Record::Resync { .. } => return,
        };
        if self.everything || len == 0 {
            return;
        }
        self.chunks
            .extend(offset / CHUNK..=(offset + len - 1) / CHUNK);
    }

    /// Compares what changed and forgets it; the first differing byte offset, if any.
    fn compare(&mut self, a: &Scratch, b: &Scratch) -> std::io::Result<Option<u64>> {
        if std::mem::take(&mut self.everything) {
            self.chunks.clear();
            return first_difference(&a.file, &b.file, a.disk_size);
        }
        let mut x = vec![0u8; CHUNK as usize];
        let mut y = vec![0u8; CHUNK as usize];
        let mut first_diff = None;
        for c in std::mem::take(&mut self.chunks) {
            let start = c * CHUNK;
            let n = (a.disk_size - start).min(CHUNK) as usize;
            read_padded(&a.file, start, &mut x[..n])?;
            read_padded(&b.file, start, &mut y[..n])?;
            if first_diff.is_none() && x[..n] != y[..n] {
                let i = x[..n]
                    .iter()
                    .zip(&y[..n])
                    .position(|(p, q)| p != q)
                    .unwrap_or(0);
                first_diff = Some(start + i as u64);
            }
        }
        Ok(first_diff)
    }
}

/// Per disk: which tags matched, plus the report.
struct DiskOutcome {
    report: DiskReport,
    tag_matches: HashMap<u64, bool>,
    copies_matching: usize,
    errors: Vec<String>,
}

/// Verifies the run described by `manifest` against the master target data directory.
pub fn verify(manifest: &Manifest, mt_data: &Path) -> Result<VerifyReport, String> {
    verify_with_copies(manifest, mt_data, &[])
}

/// What an agent run left at the master target, checked against its manifest: every
/// recovery point byte for byte (on a blocking thread). `errors` holds the run's
/// failures and the verifier's, so a run is good exactly when `verified` is true.
pub async fn verify_run(
    run: &crate::agent::RunReport,
    mt_data: &Path,
) -> anyhow::Result<VerifyReport> {
    let (manifest, mt_data) = (run.manifest.clone(), mt_data.to_path_buf());
    let mut v = tokio::task::spawn_blocking(move || verify(&manifest, &mt_data))
        .await?
        .map_err(anyhow::Error::msg)?;
    let mut errors = run.failures.clone();
    errors.append(&mut v.errors);
    v.verified = v.verified && errors.is_empty();
    v.errors = errors;
    Ok(v)
}

/// [`verify`], and each of `copies` equal to its disk's source at its point, byte for
/// byte (checked as the source is rebuilt, when it reaches that tag).
pub fn verify_with_copies(
    manifest: &Manifest,
    mt_data: &Path,
    copies: &[CopyCheck],
) -> Result<VerifyReport, String> {
    let store = Store::open(mt_data).map_err(|e| e.to_string())?;
    let pending = store.pending_rollbacks().map_err(|e| e.to_string())?;
    if let Some((id, _)) = pending.first() {
        return Err(format!(
            "a rollback of {id} was interrupted: run `master-target points --data {}` (or start the master target) to complete it first",
            mt_data.display()
        ));
    }
    let points = store.recovery_points().map_err(|e| e.to_string())?;
    // Disks whose oldest history was trimmed to the retention window: verified from
    // where their journal starts now.
    let mut trims: HashMap<StreamId, (u64, u64)> = HashMap::new();
    for d in &manifest.disks {
        let id = StreamId {
            vm: d.vm.clone(),
            disk: d.disk,
        };
        if let Some(t) = store.trim_point(&id).map_err(|e| e.to_string())? {
            trims.insert(id, t);
        }
    }
    drop(store);
    let pools = ContentPools::new(manifest.seed);

    // Verify disks in parallel, one per core.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Mutex<BTreeMap<usize, DiskOutcome>> = Mutex::new(BTreeMap::new());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(manifest.disks.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(disk) = manifest.disks.get(i) else {
                    return;
                };
                let id = StreamId {
                    vm: disk.vm.clone(),
                    disk: disk.disk,
                };
                let mine: Vec<&CopyCheck> = copies.iter().filter(|c| c.id == id).collect();
                let outcome = verify_disk(disk, mt_data, &pools, trims.get(&id).copied(), &mine);
                outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(i, outcome);
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());

    let mut errors = Vec::new();
    let copies_verified: usize = outcomes.values().map(|o| o.copies_matching).sum();
    let mut by_stream: HashMap<StreamId, (&DiskManifest, &DiskOutcome)> = HashMap::new();
    for (i, o) in &outcomes {
        let d = &manifest.disks[*i];
        errors.extend(o.errors.iter().cloned());
        by_stream.insert(
            StreamId {
                vm: d.vm.clone(),
                disk: d.disk,
            },
            (d, o),
        );
    }
    let groups: std::collections::BTreeSet<&str> =
        manifest.disks.iter().map(|d| d.group.as_str()).collect();

    // Every complete point of our groups must check out on every member.
    let mut complete = 0;
    let mut verified_points = 0;
    for p in points
        .iter()
        .filter(|p| groups.contains(p.group.as_str()) && p.complete)
    {
        complete += 1;
        let mut ok = true;
        for l in &p.landed {
            let id = StreamId {
                vm: l.vm.clone(),
                disk: l.disk,
            };
            match by_stream.get(&id) {
                None => {
                    ok = false;
                    errors.push(format!(
                        "recovery point {}/{} names {id}, which this run did not write",
                        p.group, p.tag_id
                    ));
                }
                Some((d, o)) => {
                    let tag = d.tags.iter().find(|t| t.id == p.tag_id);
                    let expected = tag.map(|t| t.seq);
                    if tag.is_some_and(|t| t.in_resync) {
                        ok = false;
                        errors.push(format!(
                            "recovery point {}/{}: {id} was resyncing when the tag was cut, but the master target offers it",
                            p.group, p.tag_id
                        ));
                    } else if expected != Some(l.seq) {
                        ok = false;
                        errors.push(format!(
                            "recovery point {}/{}: tag on {id} landed at sequence {} but the source put it at {expected:?}",
                            p.group, p.tag_id, l.seq
                        ));
                    } else if o.tag_matches.get(&p.tag_id) != Some(&true) {
                        ok = false;
                        errors.push(format!(
                            "recovery point {}/{}: {id} differs from the source",
                            p.group, p.tag_id
                        ));
                    }
                }
            }
        }
        if ok {
            verified_points += 1;
        }
    }
    // Every tag acknowledged on all its members must be a complete point.
    let mut acked_tags: BTreeMap<(&str, u64), (usize, usize)> = BTreeMap::new();
    for d in &manifest.disks {
        let members = manifest.disks.iter().filter(|x| x.group == d.group).count();
        let trimmed_to = trims
            .get(&StreamId {
                vm: d.vm.clone(),
                disk: d.disk,
            })
            .map_or(0, |(_, seq)| *seq);
        // Points older than the retention window were trimmed on purpose.
        for t in d.tags.iter().filter(|t| t.seq >= trimmed_to) {
            let e = acked_tags
                .entry((d.group.as_str(), t.id))
                .or_insert((0, members));
            if t.seq <= d.acked_seq && !t.in_resync {
                e.0 += 1;
            }
        }
    }
    for ((group, id), (acked_on, members)) in acked_tags {
        if acked_on == members
            && !points
                .iter()
                .any(|p| p.group == group && p.tag_id == id && p.complete)
        {
            errors.push(format!("recovery point {group}/{id} was acknowledged on every disk but is not complete at the master target"));
        }
    }
    if copies_verified != copies.len() && errors.is_empty() {
        errors.push(format!(
            "{} of {} failover copies proven equal to their source",
            copies_verified,
            copies.len()
        ));
    }
    let verified = errors.is_empty() && complete == verified_points && complete > 0;
    if complete == 0 && errors.is_empty() {
        errors.push("the master target holds no complete recovery point of this run".into());
    }
    Ok(VerifyReport {
        verified,
        recovery_points_complete: complete,
        recovery_points_verified: verified_points,
        disks: outcomes.into_values().map(|o| o.report).collect(),
        copies_verified,
        errors,
    })
}

fn verify_disk(
    d: &DiskManifest,
    mt_data: &Path,
    pools: &std::sync::Arc<ContentPools>,
    trim: Option<(u64, u64)>,
    copies: &[&CopyCheck],
) -> DiskOutcome {
    let id = StreamId {
        vm: d.vm.clone(),
        disk: d.disk,
    };
    let mut out = DiskOutcome {
        report: DiskReport {
            vm: d.vm.clone(),
            disk: d.disk,
            acked_seq: d.acked_seq,
            journal_seq: 0,
            tags_checked: 0,
            tags_matching: 0,
            final_image_matches: false,
        },
        tag_matches: HashMap::new(),
        copies_matching: 0,
        errors: vec![],
    };
    let fail = |out: &mut DiskOutcome, msg: String| out.errors.push(format!("{id}: {msg}"));
    let mut source = match ChangeSource::open(&d.source, d.disk_size, pools) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut out, format!("cannot open source: {e}"));
            return out;
        }
    };
    let start = trim.map_or(JOURNAL_HEADER_LEN, |(offset, _)| offset);
    let mut journal = match JournalReader::open(&journal_path(mt_data, &id), start) {
        Ok(j) => j,
        Err(e) => {
            fail(&mut out, format!("no journal at the master target: {e}"));
            return out;
        }
    };
    let scratch = match tempfile::Builder::new().prefix("fbr-verify-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            fail(&mut out, format!("scratch directory: {e}"));
            return out;
        }
    };
    let images =
        Scratch::new(scratch.path(), "source", &d.source_base, d.disk_size).and_then(|src| {
            match trim {
                // The replica where its journal starts now: image.raw with every
                // before-image since put back (what a rollback there would give).
                Some((offset, _)) => {
                    replica_at_trim(mt_data, &id, offset, scratch.path(), d.disk_size)
                }
                None => Scratch::new(scratch.path(), "replica", &d.replica_base, d.disk_size),
            }
            .map(|rep| (src, rep))
        });
    let (src, rep) = match images {
        Ok(pair) => pair,
        Err(e) => {
            fail(&mut out, format!("building the starting images: {e}"));
            return out;
        }
    };
    let tags: HashMap<u64, &crate::source::TagRecord> = d.tags.iter().map(|t| (t.seq, t)).collect();
    let mut dirty = Dirty {
        chunks: BTreeSet::new(),
        everything: d.source_base != d.replica_base || d.first_seq > 1 || trim.is_some(),
    };
    let trimmed_to = trim.map_or(0, |(_, seq)| seq);
    let mut seq = 0u64;
    let mut drawn = 0u64;
    let mut renumbers = d.renumbers.iter().peekable();
    // Walk the journal; the source follows. Sequence numbers may skip where the relay
    // coalesced records superseded between two recovery points (docs/WAN.md), and a
    // record may differ from the source's (cut down, or an all-zero write sent as a
    // zero range): what must hold is the state at every recovery point and at the end.
    let result: Result<(), String> = (|| {
        loop {
            let (record, _) = match journal.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if let Some(damage) = journal.damage() {
                        return Err(format!("journal damaged: {damage}"));
                    }
                    return Ok(());
                }
                Err(e) => return Err(format!("reading journal: {e}")),
            };
            let at = record.seq();
            if at <= seq {
                return Err(format!("journal sequence {at} follows {seq}"));
            }
            if at > d.last_seq {
                return Err(format!(
                    "journal holds sequence {at}, beyond the {} the source produced",
                    d.last_seq
                ));
            }
            // The source's records the journal skipped (coalesced away): never a tag.
            for skipped in (seq + 1).max(d.first_seq)..at {
                renumbered(
                    &mut renumbers,
                    skipped,
                    &mut drawn,
                    &mut source,
                    &src,
                    &mut dirty,
                )?;
                match tags.get(&skipped) {
                    // The oldest point kept: the journal starts just past it, and the
                    // replica there is what its before-images give back.
                    Some(t) if skipped == trimmed_to && !t.in_resync => {
                        compare_at_tag(
                            &id,
                            &mut out,
                            &mut dirty,
                            &src,
                            &rep,
                            t.id,
                            ", where its journal starts",
                        )?;
                        continue; // a tag changes nothing: nothing to draw
                    }
                    // Older than the retention window: trimmed on purpose.
                    Some(_) if skipped <= trimmed_to => continue,
                    Some(t) => {
                        return Err(format!(
                            "recovery point {} (sequence {skipped}) is missing from the journal",
                            t.id
                        ))
                    }
                    None => {}
                }
                if !d.is_resync(skipped) {
                    drawn += 1;
                    let want = draw(&mut source, skipped)?;
                    src.apply(&want)
                        .map_err(|e| format!("source scratch: {e}"))?;
                    dirty.mark(&want);
                }
            }
            renumbered(
                &mut renumbers,
                at,
                &mut drawn,
                &mut source,
                &src,
                &mut dirty,
            )?;
            seq = at;
            let replica_only = at < d.first_seq || d.is_resync(at);
            match (&record, tags.get(&seq)) {
                (Record::Tag { id: got, .. }, Some(t)) if !replica_only && t.id == *got => {
                    if t.in_resync {
                        continue;
                    }
                    compare_at_tag(&id, &mut out, &mut dirty, &src, &rep, t.id, "")?;
                    for c in copies.iter().filter(|c| c.tag_id == t.id) {
                        compare_copy(&id, &mut out, &src, c)?;
                    }
                }
                (Record::Write { .. } | Record::Zero { .. } | Record::Resync { .. }, None)
                    if replica_only =>
                {
                    rep.apply(&record)
                        .map_err(|e| format!("journal record {seq} cannot apply: {e}"))?;
                    dirty.mark(&record);
                }
                (Record::Write { .. } | Record::Zero { .. }, None) => {
                    drawn += 1;
                    let want = draw(&mut source, seq)?;
                    src.apply(&want)
                        .map_err(|e| format!("source scratch: {e}"))?;
                    rep.apply(&record)
                        .map_err(|e| format!("journal record {seq} cannot apply: {e}"))?;
                    dirty.mark(&want);
                    dirty.mark(&record);
                }
                (Record::Tag { .. }, None) if at < d.first_seq => {}
                (_, expected) => {
                    return Err(format!(
                        "journal record {seq} is {}, the source has {} there",
                        describe(&record),
                        match expected {
                            Some(t) => format!("tag {}", t.id),
                            None if replica_only => "a resync record".into(),
                            None => "a change".into(),
                        }
                    ));
                }
            }
        }
    })();
    if let Err(e) = result {
        fail(&mut out, e);
    }
    // A stream delivered to its end must equal the source at its end.
    if seq == d.last_seq {
        match dirty.compare(&src, &rep) {
            Ok(Some(at)) => fail(
                &mut out,
                format!("replica differs from the source at its last record (first at byte {at})"),
            ),
            Ok(None) => {}
            Err(e) => fail(&mut out, format!("comparing at the end: {e}")),
        }
    }
    out.report.journal_seq = seq;
    if seq < d.acked_seq {
        fail(
            &mut out,
            format!(
                "LOST ACKNOWLEDGED WRITES: acknowledged up to {}, journal ends at {seq}",
                d.acked_seq
            ),
        );
    }
    // The image file must equal the journal replayed to its end.
    let image = File::open(image_path(mt_data, &id))
        .and_then(|img| first_difference(&img, &rep.file, d.disk_size));
    match image {
        Ok(None) => out.report.final_image_matches = true,
        Ok(Some(at)) => fail(
            &mut out,
            format!("image.raw differs from its journal replayed to the end (first at byte {at})"),
        ),
        Err(e) => fail(&mut out, format!("reading image: {e}")),
    }
    out
}

/// Compares source and replica of disk `id` at tag `tag` and records the outcome
/// (`where_`: what to add to a mismatch's message). Only an I/O error stops the disk's
/// verification.
fn compare_at_tag(
    id: &StreamId,
    out: &mut DiskOutcome,
    dirty: &mut Dirty,
    src: &Scratch,
    rep: &Scratch,
    tag: u64,
    where_: &str,
) -> Result<(), String> {
    out.report.tags_checked += 1;
    let diff = dirty
        .compare(src, rep)
        .map_err(|e| format!("comparing at tag {tag}: {e}"))?;
    match diff {
        Some(at) => out.errors.push(format!(
            "{id}: replica differs from the source at tag {tag} (first at byte {at}){where_}"
        )),
        None => out.report.tags_matching += 1,
    }
    out.tag_matches.insert(tag, diff.is_none());
    Ok(())
}

/// Compares the source at a tag with a copy made at that tag (the whole disk).
fn compare_copy(
    id: &StreamId,
    out: &mut DiskOutcome,
    src: &Scratch,
    copy: &CopyCheck,
) -> Result<(), String> {
    let file = File::open(&copy.path).map_err(|e| format!("{}: {e}", copy.path.display()))?;
    match first_difference(&src.file, &file, src.disk_size) {
        Ok(None) => out.copies_matching += 1,
        Ok(Some(at)) => out.errors.push(format!(
            "{id}: the failover copy {} differs from the source at point {} (first at byte {at})",
            copy.path.display(),
            copy.tag_id
        )),
        Err(e) => return Err(format!("comparing {}: {e}", copy.path.display())),
    }
    Ok(())
}

/// The replica at journal offset `offset` (where a trimmed journal starts): a sparse
/// copy of image.raw with its value at that offset put back wherever the journal since changed it.
fn replica_at_trim(
    mt_data: &Path,
    id: &StreamId,
    offset: u64,
    dir: &Path,
    disk_size: u64,
) -> std::io::Result<Scratch> {
    use fbr_master_target::rollback;
    let other = |e: String| std::io::Error::other(e);
    let image = File::open(image_path(mt_data, id))?;
    let path = dir.join("replica");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    fbr_master_target::replica::sparse_copy(&image, &file, disk_size)?;
    let jpath = journal_path(mt_data, id);
    let name = jpath.display().to_string();
    let journal = std::sync::Arc::new(File::open(&jpath)?);
    let plan = rollback::plan(journal.clone(), &name, offset).map_err(|e| other(e.to_string()))?;
    rollback::put_back(&*journal, &name, &plan, &file, usize::MAX)
        .map_err(|e| other(e.to_string()))?;
    Ok(Scratch { file, disk_size })
}

/// Where the stream was numbered again (at or before `seq`), the changes the relay lost
/// were on the source's disk all the same: apply them to the source. The resync that
/// followed replaced them on the replica; the sides are compared whole at the next point.
fn renumbered(
    renumbers: &mut std::iter::Peekable<std::slice::Iter<'_, crate::source::Renumber>>,
    seq: u64,
    drawn: &mut u64,
    source: &mut ChangeSource,
    src: &Scratch,
    dirty: &mut Dirty,
) -> Result<(), String> {
    while let Some(r) = renumbers.next_if(|r| r.at_seq <= seq) {
        while *drawn < r.changes_drawn {
            *drawn += 1;
            let lost = draw(source, 0)?;
            src.apply(&lost)
                .map_err(|e| format!("source scratch: {e}"))?;
        }
        dirty.everything = true;
    }
    Ok(())
}

/// The source's change at `seq`, drawn again.
fn draw(source: &mut ChangeSource, seq: u64) -> Result<Record, String> {
    match source.next_change() {
        Ok(Some(change)) => Ok(change.into_record(seq)),
        Ok(None) => Err(format!("source ended before sequence {seq}")),
        Err(e) => Err(format!("source: {e}")),
    }
}

/// A record, for messages (without its data).
fn describe(record: &Record) -> String {
    match record {
        Record::Write { offset, data, .. } => {
            format!("a write of {} bytes at {offset}", data.len())
        }
        Record::Zero { offset, len, .. } => format!("a zero range of {len} bytes at {offset}"),
        Record::Tag { id, .. } => format!("tag {id}"),
        Record::Resync { mark, .. } => format!("a resync {:?} mark", mark.phase),
    }
}
