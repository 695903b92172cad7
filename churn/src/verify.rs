//! `churn verify`: proves the master target's replicas byte-identical to the sources at
//! every recovery point.
//!
//! For each disk, two images are built side by side in memory, in sequence order:
//! the **source**, by drawing the disk's changes again from its [`SourceSpec`], and the
//! **replica**, by replaying the master target's journal (exactly how the master target
//! materialises a recovery point). At each tag both must be equal; only the 64 KiB
//! chunks written on either side since the previous tag need comparing, because both
//! start all-zero and nothing else changes them. At the end the replica must also equal
//! the master target's actual `image.raw` file, byte for byte.
//!
//! A recovery point is *verified* when the master target holds it complete and every
//! member disk matched at it. The run is verified when every recovery point the master
//! target holds is verified, every tag the sources saw acknowledged is among them, and
//! every acknowledged record is in the journal.
//!
//! The master target must be stopped (its index is exclusively locked while it runs).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use fbr_master_target::files::{image_path, journal_path};
use fbr_master_target::journal::{apply_record, JournalReader, MemoryImage, JOURNAL_HEADER_LEN};
use fbr_master_target::Store;
use fbr_protocol::{Record, StreamId};
use serde::Serialize;

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
    /// Everything that went wrong, in words.
    pub errors: Vec<String>,
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

/// Tracks which 64 KiB chunks changed since the last comparison.
struct Dirty(Vec<bool>);

impl Dirty {
    fn mark(&mut self, record: &Record) {
        let (offset, len) = match record {
            Record::Write { offset, data, .. } => (*offset, data.len() as u64),
            Record::Zero { offset, len, .. } => (*offset, *len),
            Record::Tag { .. } => return,
        };
        if len == 0 {
            return;
        }
        let first = (offset / CHUNK) as usize;
        let last = ((offset + len - 1) / CHUNK) as usize;
        for c in first..=last.min(self.0.len() - 1) {
            self.0[c] = true;
        }
    }

    /// Compares the marked chunks and clears the marks; returns the first differing
    /// byte offset, if any.
    fn compare(&mut self, a: &[u8], b: &[u8]) -> Option<u64> {
        let mut first_diff = None;
        for (c, dirty) in self.0.iter_mut().enumerate() {
            if !*dirty {
                continue;
            }
            *dirty = false;
            let start = c * CHUNK as usize;
            let end = (start + CHUNK as usize).min(a.len());
            if first_diff.is_none() && a[start..end] != b[start..end] {
                let i = a[start..end]
                    .iter()
                    .zip(&b[start..end])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                first_diff = Some((start + i) as u64);
            }
        }
        first_diff
    }
}

/// Per disk: which tags matched, plus the report.
struct DiskOutcome {
    report: DiskReport,
    tag_matches: HashMap<u64, bool>,
    errors: Vec<String>,
}

/// Verifies the run described by `manifest` against the master target data directory.
pub fn verify(manifest: &Manifest, mt_data: &Path) -> Result<VerifyReport, String> {
    let store = Store::open(mt_data).map_err(|e| e.to_string())?;
    let points = store.recovery_points().map_err(|e| e.to_string())?;
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
                let outcome = verify_disk(disk, mt_data, &pools);
                outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(i, outcome);
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());

    let mut errors = Vec::new();
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
                    let expected = d.tags.iter().find(|t| t.id == p.tag_id).map(|t| t.seq);
                    if expected != Some(l.seq) {
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
        for t in &d.tags {
            let e = acked_tags
                .entry((d.group.as_str(), t.id))
                .or_insert((0, members));
            if t.seq <= d.acked_seq {
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
    let verified = errors.is_empty() && complete == verified_points && complete > 0;
    if complete == 0 && errors.is_empty() {
        errors.push("the master target holds no complete recovery point of this run".into());
    }
    Ok(VerifyReport {
        verified,
        recovery_points_complete: complete,
        recovery_points_verified: verified_points,
        disks: outcomes.into_values().map(|o| o.report).collect(),
        errors,
    })
}

fn verify_disk(
    d: &DiskManifest,
    mt_data: &Path,
    pools: &std::sync::Arc<ContentPools>,
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
    let mut journal = match JournalReader::open(&journal_path(mt_data, &id), JOURNAL_HEADER_LEN) {
        Ok(j) => j,
        Err(e) => {
            fail(&mut out, format!("no journal at the master target: {e}"));
            return out;
        }
    };
    let tag_at: HashMap<u64, u64> = d.tags.iter().map(|t| (t.seq, t.id)).collect();
    let mut src = MemoryImage(vec![0; d.disk_size as usize]);
    let mut rep = MemoryImage(vec![0; d.disk_size as usize]);
    let mut dirty = Dirty(vec![false; d.disk_size.div_ceil(CHUNK) as usize]);
    let mut seq = 0u64;
    // Walk the journal; the source follows. Sequence numbers may skip where the relay
    // coalesced records superseded between two recovery points (docs/WAN.md), and a
    // record may differ from the source's (cut down, or an all-zero write sent as a
    // zero range): what must hold is the state at every recovery point and at the end.
    loop {
        let (record, _) = match journal.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => {
                if let Some(damage) = journal.damage() {
                    fail(&mut out, format!("journal damaged: {damage}"));
                }
                break;
            }
            Err(e) => {
                fail(&mut out, format!("reading journal: {e}"));
                break;
            }
        };
        let at = record.seq();
        if at <= seq {
            fail(&mut out, format!("journal sequence {at} follows {seq}"));
            break;
        }
        if at > d.last_seq {
            fail(
                &mut out,
                format!(
                    "journal holds sequence {at}, beyond the {} the source produced",
                    d.last_seq
                ),
            );
            break;
        }
        // The source's records the journal skipped (coalesced away): never a tag.
        let mut broken = false;
        for skipped in seq + 1..at {
            if let Some(tag_id) = tag_at.get(&skipped) {
                fail(
                    &mut out,
                    format!(
                        "recovery point {tag_id} (sequence {skipped}) is missing from the journal"
                    ),
                );
                broken = true;
                break;
            }
            match source.next_change() {
                Ok(Some(change)) => {
                    let want = change.into_record(skipped);
                    let _ = apply_record(&want, &mut src);
                    dirty.mark(&want);
                }
                Ok(None) | Err(_) => {
                    fail(&mut out, format!("source ended before sequence {skipped}"));
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            break;
        }
        seq = at;
        match (tag_at.get(&seq), &record) {
            (Some(tag_id), Record::Tag { id: got, .. }) if tag_id == got => {
                out.report.tags_checked += 1;
                let diff = dirty.compare(&src.0, &rep.0);
                if let Some(at) = diff {
                    fail(
                        &mut out,
                        format!(
                            "replica differs from the source at tag {tag_id} (first at byte {at})"
                        ),
                    );
                } else {
                    out.report.tags_matching += 1;
                }
                out.tag_matches.insert(*tag_id, diff.is_none());
            }
            (None, Record::Write { .. } | Record::Zero { .. }) => {
                let want = match source.next_change() {
                    Ok(Some(change)) => change.into_record(seq),
                    Ok(None) => {
                        fail(&mut out, format!("source ended before sequence {seq}"));
                        break;
                    }
                    Err(e) => {
                        fail(&mut out, format!("source: {e}"));
                        break;
                    }
                };
                let _ = apply_record(&want, &mut src);
                if let Err(e) = apply_record(&record, &mut rep) {
                    fail(&mut out, format!("journal record {seq} cannot apply: {e}"));
                }
                dirty.mark(&want);
                dirty.mark(&record);
            }
            (expected, _) => {
                fail(
                    &mut out,
                    format!(
                        "journal record {seq} is {record:?}, the source has {} there",
                        match expected {
                            Some(t) => format!("tag {t}"),
                            None => "a change".into(),
                        }
                    ),
                );
                break;
            }
        }
    }
    // A stream delivered to its end must equal the source at its end.
    if seq == d.last_seq {
        if let Some(at) = dirty.compare(&src.0, &rep.0) {
            fail(
                &mut out,
                format!("replica differs from the source at its last record (first at byte {at})"),
            );
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
    match read_image(&image_path(mt_data, &id), d.disk_size) {
        Ok(img) => {
            out.report.final_image_matches = img == rep.0;
            if !out.report.final_image_matches {
                fail(
                    &mut out,
                    "image.raw differs from its journal replayed to the end".into(),
                );
            }
        }
        Err(e) => fail(&mut out, format!("reading image: {e}")),
    }
    out
}

fn read_image(path: &Path, size: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf)?;
    Ok(buf)
}
