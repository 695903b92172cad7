//! Retiring a stream (its VM moved between relays): its records of the old path are
//! forgotten now and never come back after a crash, while other streams keep theirs.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::HashMap;

use bytes::Bytes;
use fbr_cache::{CacheConfig, CacheError, MemStorage, SegmentLog};
use fbr_protocol::{Record, StreamId};

const CONFIG: CacheConfig = CacheConfig {
    segment_bytes: 64 * 1024,
    capacity_bytes: 1024 * 1024,
};

fn id(vm: &str) -> StreamId {
    StreamId {
        vm: vm.into(),
        disk: 0,
    }
}

fn write(seq: u64, fill: u8) -> Record {
    Record::Write {
        seq,
        offset: 0,
        data: Bytes::from(vec![fill; 4096]),
    }
}

#[test]
fn a_retired_stream_stays_forgotten_across_a_crash_and_its_new_path_survives() {
    let storage = MemStorage::default();
    let (mut log, _) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    let (moved, stays) = (id("moved"), id("stays"));
    for seq in 1..=5 {
        log.append(&moved, 1 << 20, &write(seq, 1), 0).unwrap();
        log.append(&stays, 1 << 20, &write(seq, 2), 0).unwrap();
    }
    // Not while a commit is pending: sealing needs the segment at rest.
    assert!(matches!(
        log.retire_stream(&moved),
        Err(CacheError::Busy { .. })
    ));
    log.commit().unwrap();
    let fence = log.retire_stream(&moved).unwrap();
    assert!(log.stream_stats(&moved).is_none(), "forgotten now");
    assert_eq!(log.stream_stats(&stays).unwrap().durable_seq, 5);
    // The new path starts wherever the master target stands.
    for seq in 3..=4 {
        log.append(&moved, 1 << 20, &write(seq, 9), 0).unwrap();
    }
    log.commit().unwrap();
    drop(log);
    storage.crash();

    // Without the fence, the old path's records would be found again (and the
    // renumbered ones would look like lost records).
    let (log, report) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    assert_eq!(report.resync, vec![moved.clone()]);
    drop(log);
    let fences = HashMap::from([(moved.clone(), fence)]);
    let (log, report) = SegmentLog::open_fenced(storage, CONFIG, fences).unwrap();
    assert!(report.resync.is_empty(), "{:?}", report.resync);
    let s = log.stream_stats(&moved).unwrap();
    assert_eq!((s.durable_seq, s.first_cached_seq), (4, 3));
    assert_eq!(log.read(&moved, 3).unwrap(), Some(write(3, 9)));
    assert_eq!(log.stream_stats(&stays).unwrap().durable_seq, 5);
}
