//! Model-based test of the master target's storage core: random batches of writes,
//! zeroes and tags (with sequence numbers the relay coalesced away), checkpoints,
//! crashes (kill -9, power cuts, torn power cuts), crashes between the journal sync and
//! the tag commit, and injected write, sync and commit failures run against the real
//! [`DiskReplica`] on [`MemFiles`] + [`MemIndex`] and against a simple model, compared
//! after every step:
//! - nothing acknowledged is lost, and what was not acknowledged is either wholly held
//!   up to a record boundary or not at all;
//! - the image equals the model's disk at the high-water mark, byte for byte;
//! - the journal holds exactly the records applied, in order, and every recovery point
//!   it holds replays to the model's disk at that tag;
//! - the index records exactly the tags of the journal, where they landed.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::Bytes;
use fbr_master_target::files::{MemFiles, ReplicaFiles, IMAGE_FILE, JOURNAL_FILE};
use fbr_master_target::journal::{
    apply_record, replay_from, JournalReader, MemoryImage, JOURNAL_HEADER_LEN,
};
use fbr_master_target::store::MemIndex;
use fbr_master_target::sync::SyncState;
use fbr_master_target::DiskReplica;
use fbr_protocol::{Record, ResyncMark, ResyncMode, ResyncPhase, StreamId, TagKind};
use fbr_storage::{Crash, MemFile};
use proptest::prelude::*;

/// 64 KiB: 128 sectors, small enough to compare whole images at every step.
const DISK: u64 = 64 * 1024;
const SECTORS: u64 = DISK / 512;

#[derive(Debug, Clone)]
enum Item {
    Write {
        sector: u64,
        sectors: u64,
        fill: u8,
    },
    Zero {
        sector: u64,
        sectors: u64,
    },
    Tag {
        app: bool,
    },
    /// A resync mark (begin, progress or end of resync 1).
    Mark(u8),
    /// A sequence number the relay coalesced away (a record superseded before the
    /// next recovery point).
    Skip,
}

#[derive(Debug, Clone)]
enum Op {
    Apply(Vec<Item>),
    Checkpoint,
    FailNextWrite,
    FailNextSync,
    FailNextCommit,
    Crash(Crash),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        6 => (0..SECTORS, 1u64..17, any::<u8>()).prop_map(|(sector, sectors, fill)| Item::Write {
            sector: sector.min(SECTORS - 1),
            sectors: sectors.min(SECTORS - sector.min(SECTORS - 1)),
            fill,
        }),
        1 => (0..SECTORS, 1u64..33).prop_map(|(sector, sectors)| Item::Zero {
            sector,
            sectors: sectors.min(SECTORS - sector),
        }),
        2 => any::<bool>().prop_map(|app| Item::Tag { app }),
        1 => (1u8..4).prop_map(Item::Mark),
        1 => Just(Item::Skip),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => prop::collection::vec(item(), 1..8).prop_map(Op::Apply),
        2 => Just(Op::Checkpoint),
        1 => Just(Op::FailNextWrite),
        1 => Just(Op::FailNextSync),
        2 => Just(Op::FailNextCommit),
        1 => Just(Op::Crash(Crash::ProcessKill)),
        1 => Just(Op::Crash(Crash::PowerLoss)),
        1 => any::<u64>().prop_map(|seed| Op::Crash(Crash::TornPowerLoss { seed })),
    ]
}

fn disk() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

/// What a correct replica holds.
#[derive(Debug, Default)]
struct Model {
    /// Every record the replica holds for certain, in order (acknowledged).
    held: Vec<Record>,
    /// A batch whose apply failed: held in part (a prefix), whole, or not at all.
    uncertain: Vec<Record>,
    /// Tag ids handed out so far.
    tags: u64,
}

impl Model {
    fn hwm(&self) -> u64 {
        self.held.last().map_or(0, Record::seq)
    }

    /// The disk after `records`.
    fn disk_after<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
        let mut image = MemoryImage(vec![0; DISK as usize]);
        for r in records {
            apply_record(r, &mut image).unwrap();
        }
        image.0
    }

    /// Turns a batch description into records numbered from `hwm + 1`.
    fn records(&mut self, items: &[Item]) -> Vec<Record> {
        let mut out = Vec::new();
        for (seq, item) in (self.hwm() + 1..).zip(items) {
            out.push(match *item {
                Item::Write {
                    sector,
                    sectors,
                    fill,
                } => Record::Write {
                    seq,
                    offset: sector * 512,
                    data: Bytes::from(vec![fill; (sectors * 512) as usize]),
                },
                Item::Zero { sector, sectors } => Record::Zero {
                    seq,
                    offset: sector * 512,
                    len: sectors * 512,
                },
                Item::Tag { app } => {
                    self.tags += 1;
                    Record::Tag {
                        seq,
                        id: self.tags,
                        kind: if app { TagKind::App } else { TagKind::Crash },
                        members: 1,
                        group: "g".into(),
                    }
                }
                Item::Mark(phase) => Record::Resync {
                    seq,
                    mark: ResyncMark {
                        id: 1,
                        phase: [ResyncPhase::Begin, ResyncPhase::Progress, ResyncPhase::End]
                            [phase as usize - 1],
                        mode: ResyncMode::Delta,
                        next_region: 0,
                        regions: 1,
                        compared_bytes: 0,
                        sent_bytes: 0,
                    },
                },
                Item::Skip => continue,
            });
        }
        out
    }

    /// After a reopen at high-water mark `hwm`: the failed batch's records up to it are
    /// held, the rest are gone (the relay resends them).
    fn settle(&mut self, hwm: u64) {
        let acked = self.hwm();
        assert!(
            hwm >= acked,
            "acknowledged records lost: held up to {acked}, recovered up to {hwm}"
        );
        let uncertain = std::mem::take(&mut self.uncertain);
        if hwm > acked {
            let kept = uncertain
                .iter()
                .position(|r| r.seq() == hwm)
                .unwrap_or_else(|| {
                    panic!("recovered up to {hwm}, which is no record boundary of the failed batch")
                });
            self.held.extend(uncertain.into_iter().take(kept + 1));
        }
    }
}

/// The whole journal, read back: its records and where each ended.
fn read_journal(journal: &MemFile) -> Vec<(Record, u64)> {
    let mut reader =
        JournalReader::new(journal.clone(), "journal".into(), JOURNAL_HEADER_LEN).unwrap();
    let mut out = Vec::new();
    while let Some(entry) = reader.next_record().unwrap() {
        out.push(entry);
    }
    assert!(
        reader.damage().is_none(),
        "an open replica's journal ends cleanly: {:?}",
        reader.damage()
    );
    out
}

fn check(replica: &DiskReplica<MemFile>, files: &MemFiles, index: &MemIndex, model: &Model) {
    assert_eq!(replica.hwm(), model.hwm(), "high-water mark");
    let image = files.file(&disk(), IMAGE_FILE).unwrap().contents();
    assert!(
        image == Model::disk_after(&model.held),
        "image differs from the model at {}",
        model.hwm()
    );
    let journal = files.file(&disk(), JOURNAL_FILE).unwrap();
    let entries = read_journal(&journal);
    let records: Vec<&Record> = entries.iter().map(|(r, _)| r).collect();
    assert!(
        records == model.held.iter().collect::<Vec<_>>(),
        "the journal holds exactly the records applied"
    );
    // Which tags are recovery points follows from the marks before them (the rule is
    // `SyncState::follow`, unit-tested on its own); crashes must not change it.
    let mut sync = SyncState::Consistent;
    let want: Vec<(u64, u64, u64, TagKind, bool)> = entries
        .iter()
        .filter_map(|(r, end)| {
            let consistent = sync.follow(r);
            match r {
                Record::Tag { seq, id, kind, .. } => {
                    Some((*seq, *id, *end, *kind, consistent.unwrap_or(false)))
                }
                _ => None,
            }
        })
        .collect();
    let got: Vec<(u64, u64, u64, TagKind, bool)> = index
        .tags_of(&disk())
        .into_iter()
        .map(|t| (t.seq, t.id, t.journal_end, t.kind, t.consistent))
        .collect();
    assert_eq!(
        got, want,
        "the index holds the journal's tags, where they landed"
    );
    assert_eq!(replica.sync_state(), sync, "the replica's sync state");
}

/// Every recovery point in the journal replays to the model's disk at that tag (at the
/// end of a run: [`check`] already compares the journal's records with the model's).
fn check_recovery_points(files: &MemFiles, model: &Model) {
    let journal = files.file(&disk(), JOURNAL_FILE).unwrap();
    for (i, r) in model.held.iter().enumerate() {
        if let Record::Tag { seq, id, .. } = r {
            let reader =
                JournalReader::new(journal.clone(), "journal".into(), JOURNAL_HEADER_LEN).unwrap();
            let mut image = MemoryImage(vec![0; DISK as usize]);
            replay_from(reader, *seq, &mut image).unwrap();
            assert!(
                image.0 == Model::disk_after(&model.held[..=i]),
                "recovery point {id} (seq {seq}) differs"
            );
        }
    }
}

fn open(files: &MemFiles, index: &MemIndex) -> DiskReplica<MemFile> {
    DiskReplica::open(files, index, &disk(), DISK).unwrap()
}

fn run(ops: Vec<Op>) {
    let files = MemFiles::default();
    let index = MemIndex::default();
    let mut model = Model::default();
    let mut replica = Some(open(&files, &index));
    for op in ops {
        match op {
            Op::Apply(items) => {
                let r = replica.as_mut().expect("open between steps");
                let records = model.records(&items);
                match r.apply_batch(&index, &records) {
                    Ok(_) => model.held.extend(records),
                    Err(_) => {
                        // The session drops the replica; the next one recovers it.
                        model.uncertain = records;
                        replica = None;
                    }
                }
            }
            Op::Checkpoint => {
                let r = replica.as_mut().expect("open between steps");
                if r.take_checkpoint(&index, &[]).is_err() {
                    replica = None;
                }
            }
            Op::FailNextWrite => files.faults().fail_writes(1),
            Op::FailNextSync => files.faults().fail_syncs(1),
            Op::FailNextCommit => index.fail_commits(1),
            Op::Crash(crash) => {
                replica = None;
                files.crash(crash);
                index.fail_commits(0);
            }
        }
        if replica.is_none() {
            // Reopening must succeed whatever happened: faults belong to the run that
            // failed, and recovery only reads, truncates, syncs and commits.
            files.faults().clear();
            index.fail_commits(0);
            let r = open(&files, &index);
            model.settle(r.hwm());
            replica = Some(r);
        }
        check(replica.as_ref().unwrap(), &files, &index, &model);
    }
    check_recovery_points(&files, &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replica_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

/// The case a checkpoint taken by recovery once got wrong: a killed process leaves
/// journal entries in the page cache only; recovery must make them durable before its
/// checkpoint claims them, or a power cut afterwards leaves a checkpoint past the
/// journal's end.
#[test]
fn recovery_makes_what_a_killed_process_left_durable() {
    let write = |fill| Item::Write {
        sector: 0,
        sectors: 8,
        fill,
    };
    run(vec![
        Op::Apply(vec![write(1), Item::Tag { app: false }]),
        Op::FailNextSync,
        Op::Apply(vec![write(2), Item::Tag { app: true }]),
        Op::Crash(Crash::ProcessKill),
        Op::Crash(Crash::PowerLoss),
        Op::Apply(vec![write(3), Item::Tag { app: false }]),
    ]);
}

/// A crash between the journal's sync and the tag's commit: the tag is in the journal
/// but not in the index; recovery indexes it.
#[test]
fn a_tag_whose_commit_failed_is_indexed_by_recovery() {
    run(vec![
        Op::Apply(vec![Item::Write {
            sector: 4,
            sectors: 2,
            fill: 9,
        }]),
        Op::FailNextCommit,
        Op::Apply(vec![Item::Tag { app: true }]),
        Op::Crash(Crash::PowerLoss),
        Op::Apply(vec![Item::Tag { app: false }]),
    ]);
}

/// Recovery refuses a journal shorter than its checkpoint instead of extending it with
/// zeros (which would read as corruption on every later replay).
#[test]
fn a_journal_shorter_than_its_checkpoint_is_reported() {
    let files = MemFiles::default();
    let index = MemIndex::default();
    let mut r = open(&files, &index);
    let mut model = Model::default();
    let records = model.records(&[
        Item::Write {
            sector: 0,
            sectors: 8,
            fill: 1,
        },
        Item::Tag { app: false },
    ]);
    r.apply_batch(&index, &records).unwrap();
    r.take_checkpoint(&index, &[]).unwrap();
    drop(r);
    let journal = files.open(&disk(), JOURNAL_FILE).unwrap();
    fbr_storage::DurableFile::truncate(&journal, JOURNAL_HEADER_LEN + 10).unwrap();
    let err = DiskReplica::open(&files, &index, &disk(), DISK)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("journal") && err.contains("checkpoint"),
        "{err}"
    );
}
