//! Interval plans: against records in memory ([`MemSource`]), a plan sends exactly the
//! interval's final content and refuses records that changed or vanished since it was
//! made; against a real cache across a restart, a plan never coalesces across a
//! recovery point, even one the cache's in-memory list of tags no longer knows (it was
//! appended before the restart: the bug the relay kill test once found).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::Bytes;
use fbr_cache::CacheConfig;
use fbr_master_target::journal::{apply_record, MemoryImage};
use fbr_protocol::{Record, StreamId, TagKind};
use fbr_relay::cache::RelayCache;
use fbr_relay::memsource::MemSource;
use fbr_relay::reduce::{IntervalPlan, KnownBlocks, Reducer, StageBytes, WanConfig};

fn write(seq: u64, fill: u8) -> Record {
    Record::Write {
        seq,
        offset: 0,
        data: Bytes::from(vec![fill; 4096]),
    }
}

fn tag(seq: u64, id: u64) -> Record {
    Record::Tag {
        seq,
        id,
        kind: TagKind::Crash,
        members: 1,
        group: "g".into(),
    }
}

async fn append_all(cache: &RelayCache, id: &StreamId, records: Vec<Record>) {
    let last = records.last().unwrap().seq();
    for r in records {
        assert!(cache.append(id, 1 << 20, r).await);
    }
    let mut durable = cache.watch(id).durable.subscribe();
    durable.wait_for(|d| *d >= last).await.unwrap();
}

#[tokio::test]
async fn a_plan_stops_at_a_tag_appended_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig {
        segment_bytes: 1 << 20,
        capacity_bytes: 64 << 20,
    };
    let id = StreamId {
        vm: "vm1".into(),
        disk: 0,
    };
    {
        let (cache, _) = RelayCache::open(dir.path(), config).unwrap();
        // Records 1-3, recovery point 1 at seq 3: block 0 holds 0x22 there.
        append_all(&cache, &id, vec![write(1, 0x11), write(2, 0x22), tag(3, 1)]).await;
        cache.shutdown();
    }
    // The writer thread lets go of the directory's lock once it has stopped.
    let mut reopened = None;
    for _ in 0..500 {
        if let Ok((c, _)) = RelayCache::open(dir.path(), config) {
            reopened = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let cache = reopened.expect("the cache reopens after shutdown");
    // After the restart the cache's tag list only knows the new recovery point.
    append_all(&cache, &id, vec![write(4, 0x44), tag(5, 2)]).await;
    assert_eq!(cache.next_tag(&id, 1), Some(5), "the old tag is not listed");

    let stats = StageBytes::default();
    let mut plan = IntervalPlan::new(&*cache, &id, 1, 5, &stats).unwrap();
    let mut reducer = Reducer::new(WanConfig::default());
    let known = KnownBlocks::new(0);
    let batches = reducer
        .next_from_plan(&mut plan, &*cache, &id, 64 << 20, &known, &stats)
        .unwrap();
    assert!(plan.is_done());
    // The plan ended at the recovery point it found (3), not at the listed one (5), and
    // kept the write that recovery point 1 needs (record 2, which record 4 rewrites).
    let spans: Vec<(u64, u64)> = batches.iter().map(|b| (b.first_seq, b.last_seq)).collect();
    assert_eq!(spans, vec![(1, 3)]);
    let batch = fbr_protocol::wan::decode_batch(batches[0].payload.clone()).unwrap();
    let seqs: Vec<u64> = batch.items.iter().map(|i| i.seq()).collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "record 1 is superseded within the interval"
    );
}

/// The interval's records: overlapping writes and a zero range on a 64 KiB disk, a
/// recovery point at `tag`, then more writes.
fn interval(tag: u64) -> Vec<Record> {
    (1..tag + 5)
        .map(|seq| match seq {
            s if s == tag => self::tag(s, 1),
            s if s % 6 == 0 => Record::Zero {
                seq,
                offset: (s % 16) * 4096,
                len: 8192,
            },
            s => Record::Write {
                seq,
                offset: (s * 5 % 15) * 4096,
                data: Bytes::from(vec![s as u8; 4096 + 512 * (s % 3) as usize]),
            },
        })
        .collect()
}

fn stream() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

#[test]
fn a_plan_sends_the_final_content_of_its_interval_and_stops_at_the_tag() {
    let records = interval(40);
    let source = MemSource::default();
    for r in &records {
        source.append(&stream(), r.clone(), 0);
    }
    let stats = StageBytes::default();
    let mut plan = IntervalPlan::new(&source, &stream(), 1, 40, &stats).unwrap();
    let mut disk = MemoryImage(vec![0; 64 << 10]);
    let (mut kept, mut last) = (0, 0);
    while let Some(part) = plan.next_batch(&source, &stream()).unwrap() {
        assert_eq!(part.first_seq, last + 1, "spans are consecutive");
        last = part.last_seq;
        for (r, _) in &part.kept {
            apply_record(r, &mut disk).unwrap();
            kept += 1;
        }
    }
    assert_eq!(last, 40, "the plan ends at the recovery point");
    let mut want = MemoryImage(vec![0; 64 << 10]);
    for r in &records[..40] {
        apply_record(r, &mut want).unwrap();
    }
    assert!(disk == want, "the state at the recovery point is exact");
    assert!(
        kept < 40,
        "superseded records were left out ({kept} of 40 kept)"
    );
}

#[test]
fn a_planned_record_that_vanished_is_reported_not_skipped() {
    let records = interval(30);
    let source = MemSource::default();
    for r in &records {
        source.append(&stream(), r.clone(), 0);
    }
    let stats = StageBytes::default();
    let mut plan = IntervalPlan::new(&source, &stream(), 1, 30, &stats).unwrap();
    // The recovery point itself always survives: make it vanish.
    source.forget(&stream(), 30);
    let mut outcome = Ok(());
    while let Some(part) = match plan.next_batch(&source, &stream()) {
        Ok(p) => p,
        Err(e) => {
            outcome = Err(e.to_string());
            None
        }
    } {
        assert!(part.last_seq < 30);
    }
    let err = outcome.unwrap_err();
    assert!(err.contains("no longer cached"), "{err}");
}
