//! A stream retired from a real relay cache (its VM moved between relays): forgotten
//! at once, gone after a restart (the fence in the `placements` file), and a late
//! retirement from an older path does not forget the newer path's records.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use bytes::Bytes;
use fbr_cache::CacheConfig;
use fbr_protocol::placement::Admission;
use fbr_protocol::{Record, StreamId};
use fbr_relay::cache::RelayCache;

const CONFIG: CacheConfig = CacheConfig {
    segment_bytes: 1 << 20,
    capacity_bytes: 64 << 20,
};

fn write(seq: u64, fill: u8) -> Record {
    Record::Write {
        seq,
        offset: 0,
        data: Bytes::from(vec![fill; 4096]),
    }
}

async fn append_durably(cache: &RelayCache, id: &StreamId, seqs: std::ops::RangeInclusive<u64>) {
    let last = *seqs.end();
    for seq in seqs {
        assert!(cache.append(id, 1 << 20, write(seq, seq as u8)).await);
    }
    let mut durable = cache.watch(id).durable.subscribe();
    durable.wait_for(|d| *d >= last).await.unwrap();
}

fn reopen(dir: &std::path::Path, cache: std::sync::Arc<RelayCache>) -> std::sync::Arc<RelayCache> {
    cache.shutdown();
    drop(cache);
    for _ in 0..500 {
        if let Ok((c, _)) = RelayCache::open(dir, CONFIG) {
            return c;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the cache reopens after shutdown");
}

#[tokio::test]
async fn a_retired_stream_stays_forgotten_and_a_late_retirement_spares_the_new_path() {
    let dir = tempfile::tempdir().unwrap();
    let id = StreamId {
        vm: "vm1".into(),
        disk: 0,
    };
    let (cache, _) = RelayCache::open(dir.path(), CONFIG).unwrap();
    append_durably(&cache, &id, 1..=5).await;
    // The VM moved here at placement 2: the old path's records go.
    assert_eq!(cache.check_placement(&id, 2), Admission::Raised { from: 0 });
    assert!(cache.retire(&id, 2).unwrap());
    assert!(cache.stats(&id).is_none());
    // The new path continues where the master target stands.
    append_durably(&cache, &id, 3..=4).await;
    // An old forwarder's late "moved away" (one past placement 0) changes nothing.
    assert!(!cache.retire(&id, 1).unwrap());
    assert_eq!(cache.stats(&id).unwrap().durable_seq, 4);

    let cache = reopen(dir.path(), cache);
    assert_eq!(cache.placement(&id), 2);
    assert_eq!(
        cache.check_placement(&id, 1),
        Admission::Stale { on_record: 2 }
    );
    let s = cache.stats(&id).unwrap();
    assert_eq!(
        (s.first_cached_seq, s.durable_seq, s.needs_resync),
        (3, 4, None)
    );
    cache.shutdown();
}
