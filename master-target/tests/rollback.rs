//! Rollback in place, against a model: random batches of overlapping writes and zeroes
//! with tags anywhere in them are applied to a real [`DiskReplica`] on [`MemFiles`] +
//! [`MemIndex`], and the model keeps the disk at every tag. A rollback to a random tag
//! is stopped where a kill -9 could stop it (after recording the target, after any
//! number of before-images put back, after the index, after the journal cut), the files
//! crash (kill -9, power cut, torn power cut), and the replica is opened again. Then:
//! - the image is the model's disk at that tag, byte for byte;
//! - the high-water mark is the tag's sequence number and the journal ends at the tag;
//! - the index holds no tag of the disk past it;
//! - replication goes on from there, and a second rollback to an earlier tag is exact.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::{Bytes, BytesMut};
use fbr_master_target::files::{MemFiles, ReplicaFiles, IMAGE_FILE, JOURNAL_FILE};
use fbr_master_target::journal::{apply_record, encode_entry, MemoryImage};
use fbr_master_target::rollback::RollbackStop;
use fbr_master_target::store::{MemIndex, ReplicaIndex, RollbackTarget};
use fbr_master_target::DiskReplica;
use fbr_protocol::{Record, StreamId, TagKind};
use fbr_storage::{Crash, DurableFile, MemFile};
use proptest::prelude::*;

/// 64 KiB: 128 sectors.
const DISK: u64 = 64 * 1024;
const SECTORS: u64 = DISK / 512;

#[derive(Debug, Clone)]
enum Item {
    Write { sector: u64, sectors: u64, fill: u8 },
    Zero { sector: u64, sectors: u64 },
    Tag,
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        6 => (0..SECTORS, 1u64..40, any::<u8>()).prop_map(|(sector, sectors, fill)| Item::Write {
            sector,
            sectors: sectors.min(SECTORS - sector),
            fill,
        }),
        1 => (0..SECTORS, 1u64..64).prop_map(|(sector, sectors)| Item::Zero {
            sector,
            sectors: sectors.min(SECTORS - sector),
        }),
        2 => Just(Item::Tag),
    ]
}

fn stop() -> impl Strategy<Value = RollbackStop> {
    prop_oneof![
        Just(RollbackStop::Never),
        Just(RollbackStop::Recorded),
        (0usize..40).prop_map(RollbackStop::PutBack),
        Just(RollbackStop::IndexRolledBack),
        Just(RollbackStop::Truncated),
    ]
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![
        Just(Crash::ProcessKill),
        Just(Crash::PowerLoss),
        any::<u64>().prop_map(|seed| Crash::TornPowerLoss { seed }),
    ]
}

fn id() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

/// A disk being replicated, with the model's image at each of its tags.
struct Site {
    files: MemFiles,
    index: MemIndex,
    replica: DiskReplica<MemFile>,
    model: MemoryImage,
    next_seq: u64,
    next_tag: u64,
    /// Tag id -> (where it ends, its seq, the model's disk there).
    points: Vec<(u64, RollbackTarget, Vec<u8>)>,
}

impl Site {
    fn new() -> Self {
        let files = MemFiles::default();
        let index = MemIndex::default();
        let replica = DiskReplica::open(&files, &index, &id(), DISK).unwrap();
        Site {
            files,
            index,
            replica,
            model: MemoryImage(vec![0; DISK as usize]),
            next_seq: 1,
            next_tag: 1,
            points: Vec::new(),
        }
    }

    fn apply(&mut self, items: &[Item]) {
        let mut records = Vec::new();
        for it in items {
            let seq = self.next_seq;
            self.next_seq += 1;
            records.push(match *it {
                Item::Write {
                    sector,
                    sectors,
                    fill,
                } => Record::Write {
                    seq,
                    offset: sector * 512,
                    data: Bytes::from(
                        (0..sectors * 512)
                            .map(|i| fill.wrapping_add((i / 512) as u8))
                            .collect::<Vec<u8>>(),
                    ),
                },
                Item::Zero { sector, sectors } => Record::Zero {
                    seq,
                    offset: sector * 512,
                    len: sectors * 512,
                },
                Item::Tag => {
                    let id = self.next_tag;
                    self.next_tag += 1;
                    Record::Tag {
                        seq,
                        id,
                        kind: TagKind::Crash,
                        members: 1,
                        group: "g".into(),
                    }
                }
            });
        }
        self.replica.apply_batch(&self.index, &records).unwrap();
        for r in &records {
            apply_record(r, &mut self.model).unwrap();
            if let Record::Tag { id, seq, .. } = r {
                let landing = self
                    .index
                    .tags_of(&self::id())
                    .into_iter()
                    .find(|t| t.id == *id)
                    .unwrap();
                self.points.push((
                    *id,
                    RollbackTarget {
                        journal_end: landing.journal_end,
                        seq: *seq,
                    },
                    self.model.0.clone(),
                ));
            }
        }
    }

    fn image(&self) -> Vec<u8> {
        self.files.file(&id(), IMAGE_FILE).unwrap().contents()
    }

    /// Rolls back to the `pick`-th point (modulo), stopping at `stop`, crashing with
    /// `crash`, then reopening; checks the outcome against the model.
    fn roll_back(&mut self, pick: usize, stop: RollbackStop, crash: Crash) {
        let (tag, target, disk) = self.points[pick % self.points.len()].clone();
        let result = self.replica.roll_back_until(&self.index, target, stop);
        result.unwrap();
        self.files.crash(crash);
        self.replica = DiskReplica::open(&self.files, &self.index, &id(), DISK).unwrap();
        assert!(
            self.image() == disk,
            "image differs from tag {tag} after stop {stop:?} and {crash:?}"
        );
        assert_eq!(self.replica.hwm(), target.seq);
        let journal = self.files.file(&id(), JOURNAL_FILE).unwrap();
        assert_eq!(journal.size().unwrap(), target.journal_end);
        assert!(self.index.rollback_target(&id()).unwrap().is_none());
        assert!(self
            .index
            .tags_of(&id())
            .iter()
            .all(|t| t.journal_end <= target.journal_end && t.id <= tag));
        // The model goes on from the point, as the replica does.
        self.model = MemoryImage(disk);
        self.next_seq = target.seq + 1;
        self.points.retain(|(t, _, _)| *t <= tag);
        self.next_tag = tag + 1;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_rollback_lands_exactly_on_its_point_whatever_stops_it(
        batches in prop::collection::vec(prop::collection::vec(item(), 1..12), 2..14),
        later in prop::collection::vec(prop::collection::vec(item(), 1..12), 1..6),
        picks in (any::<usize>(), any::<usize>()),
        stops in (stop(), stop()),
        crashes in (crash(), crash()),
    ) {
        let mut site = Site::new();
        for b in &batches {
            site.apply(b);
        }
        // Every batch must end on a point for the run to have one.
        site.apply(&[Item::Tag]);
        site.roll_back(picks.0, stops.0, crashes.0);
        // Replication goes on from the point; then back again, further.
        for b in &later {
            site.apply(b);
        }
        let earlier = picks.1 % site.points.len();
        site.roll_back(earlier, stops.1, crashes.1);
    }
}

/// A journal written in format 1 (no before-images) still opens and replicates; a
/// rollback past its records is refused before anything changes, one within the part
/// written since works.
#[test]
fn records_without_before_images_refuse_a_rollback_past_them() {
    let files = MemFiles::default();
    let index = MemIndex::default();
    // A format 1 journal: header version 1, then record entries only.
    let journal = files.open(&id(), JOURNAL_FILE).unwrap();
    let mut bytes = BytesMut::from(&b"FBRJOURN\x01\0\0\0\0\0\0\0"[..]);
    let old = [
        Record::Write {
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![1u8; 4096]),
        },
        Record::Tag {
            seq: 2,
            id: 1,
            kind: TagKind::Crash,
            members: 1,
            group: "g".into(),
        },
        Record::Write {
            seq: 3,
            offset: 8192,
            data: Bytes::from(vec![9u8; 4096]),
        },
    ];
    for r in &old {
        encode_entry(r, &mut bytes);
    }
    journal.write_at(&bytes, 0).unwrap();
    journal.sync().unwrap();
    let mut replica = DiskReplica::open(&files, &index, &id(), DISK).unwrap();
    assert_eq!(replica.hwm(), 3);
    let mut header = [0u8; 12];
    journal.read_at(&mut header, 0).unwrap();
    assert_eq!(
        &header[8..12],
        &2u32.to_le_bytes(),
        "header upgraded to format 2"
    );
    let new = [
        Record::Write {
            seq: 4,
            offset: 0,
            data: Bytes::from(vec![2u8; 4096]),
        },
        Record::Tag {
            seq: 5,
            id: 2,
            kind: TagKind::Crash,
            members: 1,
            group: "g".into(),
        },
        Record::Write {
            seq: 6,
            offset: 2048,
            data: Bytes::from(vec![3u8; 4096]),
        },
    ];
    replica.apply_batch(&index, &new).unwrap();
    let tags = index.tags_of(&id());
    let point = |i: usize| RollbackTarget {
        journal_end: tags[i].journal_end,
        seq: tags[i].seq,
    };
    let image = || files.file(&id(), IMAGE_FILE).unwrap().contents();
    let before = image();
    let err = replica.roll_back(&index, point(0)).unwrap_err().to_string();
    assert!(err.contains("record 3 has no before-image"), "{err}");
    assert_eq!(image(), before, "a refused rollback changes nothing");
    assert!(index.rollback_target(&id()).unwrap().is_none());
    let done = replica.roll_back(&index, point(1)).unwrap();
    assert_eq!(done.records_undone, 1);
    let img = image();
    assert!(img[..4096].iter().all(|&b| b == 2));
    assert!(img[4096..8192].iter().all(|&b| b == 0));
    assert!(img[8192..12288].iter().all(|&b| b == 9));
}
