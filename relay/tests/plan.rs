//! Interval plans against a real cache across a restart: a plan never coalesces across
//! a recovery point, even one the cache's in-memory list of tags no longer knows (it was
//! appended before the restart). This is the bug the relay kill test once found.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::Bytes;
use fbr_cache::CacheConfig;
use fbr_protocol::{Record, StreamId, TagKind};
use fbr_relay::cache::RelayCache;
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
