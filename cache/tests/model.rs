//! Model-based test of the cache log: random sequences of appends, commits, acks,
//! reads, crashes (unsynced data lost) and injected write/sync failures run against the
//! real [`SegmentLog`] on [`MemStorage`] and against a simple model, compared after
//! every step. Segments are tiny so that sealing, rolling and trimming happen often.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::BTreeMap;

use bytes::Bytes;
use fbr_cache::{CacheConfig, CacheError, MemStorage, SegmentLog};
use fbr_protocol::{Record, StreamId};
use proptest::prelude::*;

const STREAMS: usize = 3;
const DISK: u64 = 1 << 20;
const CONFIG: CacheConfig = CacheConfig {
    segment_bytes: 64 * 1024,
    capacity_bytes: 320 * 1024,
};

#[derive(Debug, Clone)]
enum Op {
    Append {
        stream: usize,
        sectors: usize,
        fill: u8,
    },
    Commit,
    Ack {
        stream: usize,
        fraction: f64,
    },
    Read {
        stream: usize,
        pick: f64,
    },
    Crash,
    FailNextWrite,
    FailNextSync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Acks are rarer and smaller than appends, so backlogs build up across sealed
        // segments: that is where trimming and recovery can go wrong.
        8 => (0..STREAMS, 1usize..9, any::<u8>()).prop_map(|(stream, sectors, fill)| Op::Append { stream, sectors, fill }),
        3 => Just(Op::Commit),
        1 => (0..STREAMS, 0.0..=0.6f64).prop_map(|(stream, fraction)| Op::Ack { stream, fraction }),
        3 => (0..STREAMS, 0.0..1.0f64).prop_map(|(stream, pick)| Op::Read { stream, pick }),
        1 => Just(Op::Crash),
        1 => Just(Op::FailNextWrite),
        1 => Just(Op::FailNextSync),
    ]
}

/// What a correct cache must hold, per stream.
#[derive(Debug, Default, Clone)]
struct ModelStream {
    /// Durable, not yet acknowledged: seq -> data.
    durable: BTreeMap<u64, Bytes>,
    /// Appended since the last commit.
    pending: Vec<(u64, Bytes)>,
    /// Highest durable seq ever (acknowledged or not).
    durable_seq: u64,
    acked: u64,
}

impl ModelStream {
    fn next_seq(&self) -> u64 {
        self.pending.last().map(|p| p.0).unwrap_or(self.durable_seq) + 1
    }
}

fn id(i: usize) -> StreamId {
    StreamId {
        vm: format!("vm{i}"),
        disk: i as u32,
    }
}

fn check(log: &SegmentLog<MemStorage>, model: &[ModelStream]) {
    assert!(
        log.used_bytes() <= log.capacity_bytes(),
        "used {} > capacity",
        log.used_bytes()
    );
    for (i, m) in model.iter().enumerate() {
        match log.stream_stats(&id(i)) {
            // After a restart a stream whose records were all acknowledged and trimmed
            // is unknown (the master target then says where it stands).
            None => assert!(
                m.durable.is_empty() && (m.durable_seq == 0 || m.acked == m.durable_seq),
                "stream {i} forgotten with unacknowledged records"
            ),
            Some(s) => {
                assert_eq!(s.durable_seq, m.durable_seq, "durable seq of stream {i}");
                assert_eq!(
                    (s.durable_seq + 1).saturating_sub(s.first_cached_seq.max(s.acked_seq + 1)),
                    m.durable.len() as u64,
                    "backlog records of stream {i}"
                );
            }
        }
    }
}

fn run(ops: Vec<Op>) {
    let storage = MemStorage::default();
    let (mut log, _) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    let mut model = vec![ModelStream::default(); STREAMS];
    for op in ops {
        match op {
            Op::Append {
                stream,
                sectors,
                fill,
            } => {
                let m = &mut model[stream];
                let seq = m.next_seq();
                let data = Bytes::from(vec![fill; sectors * 512]);
                let record = Record::Write {
                    seq,
                    offset: 0,
                    data: data.clone(),
                };
                match log.append(&id(stream), DISK, &record, 1_000) {
                    Ok(()) => m.pending.push((seq, data)),
                    Err(CacheError::Full { .. }) => {}
                    Err(e) => panic!("append: {e}"),
                }
            }
            Op::Commit => match log.commit() {
                Ok(advanced) => {
                    for m in model.iter_mut() {
                        for (seq, data) in m.pending.drain(..) {
                            m.durable.insert(seq, data);
                            m.durable_seq = seq;
                        }
                    }
                    for (s, seq) in advanced {
                        let i: usize = s.vm[2..].parse().unwrap();
                        assert_eq!(seq, model[i].durable_seq);
                    }
                }
                Err(CacheError::Io { .. }) => {
                    // Nothing of the batch is durable; its senders resend.
                    for m in model.iter_mut() {
                        m.pending.clear();
                    }
                }
                Err(e) => panic!("commit: {e}"),
            },
            Op::Ack { stream, fraction } => {
                let m = &mut model[stream];
                let unacked: Vec<u64> = m.durable.keys().copied().collect();
                if unacked.is_empty() {
                    continue;
                }
                let upto = unacked[((unacked.len() - 1) as f64 * fraction) as usize];
                m.durable.retain(|s, _| *s > upto);
                m.acked = upto;
                log.ack(&id(stream), upto).unwrap();
                // An ack trims only when a segment's last holder lets go: a full trim
                // right after must find nothing more to free.
                assert_eq!(
                    log.trim().unwrap(),
                    0,
                    "an ack left a free segment untrimmed"
                );
            }
            Op::Read { stream, pick } => {
                let m = &model[stream];
                let seqs: Vec<u64> = m.durable.keys().copied().collect();
                if seqs.is_empty() {
                    continue;
                }
                let seq = seqs[(seqs.len() as f64 * pick) as usize];
                match log.read(&id(stream), seq).unwrap() {
                    Some(Record::Write { data, .. }) => {
                        assert_eq!(data, m.durable[&seq], "content of {stream}/{seq}")
                    }
                    other => panic!("stream {stream} seq {seq}: expected the write, got {other:?}"),
                }
            }
            Op::Crash => {
                drop(log);
                storage.crash();
                let (reopened, report) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
                assert!(
                    report.corruption.is_empty(),
                    "a crash is not corruption: {:?}",
                    report.corruption
                );
                assert!(report.resync.is_empty());
                log = reopened;
                for (i, m) in model.iter_mut().enumerate() {
                    m.pending.clear();
                    // The cache forgets acknowledgements; the master target tells it
                    // again after a restart (Accept.next_seq).
                    if m.acked > 0 {
                        log.ack(&id(i), m.acked).unwrap();
                    }
                    // Everything durable and unacknowledged survived, byte for byte.
                    for (seq, data) in &m.durable {
                        match log.read(&id(i), *seq).unwrap() {
                            Some(Record::Write { data: got, .. }) => assert_eq!(&got, data),
                            other => panic!("after crash, stream {i} seq {seq}: {other:?}"),
                        }
                    }
                }
            }
            Op::FailNextWrite => storage.fail_writes(1),
            Op::FailNextSync => storage.fail_syncs(1),
        }
        check(&log, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..400)) {
        run(ops);
    }
}

#[test]
fn corruption_in_a_sealed_segment_is_caught_on_read_and_flags_nothing_else() {
    let storage = MemStorage::default();
    let (mut log, _) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    for seq in 1..=40 {
        let r = Record::Write {
            seq,
            offset: 0,
            data: Bytes::from(vec![seq as u8; 4096]),
        };
        log.append(&id(0), DISK, &r, 0).unwrap();
        log.append(
            &id(1),
            DISK,
            &Record::Write {
                seq,
                offset: 0,
                data: Bytes::from(vec![1; 512]),
            },
            0,
        )
        .unwrap();
        log.commit().unwrap();
    }
    // Flip a payload byte of stream 0's record 2 (in the first, sealed segment).
    let (_, offset, _) = log.locate(&id(0), 2).unwrap();
    storage.corrupt(1, offset as usize + 100);
    let err = log.read(&id(0), 2).unwrap_err().to_string();
    assert!(
        err.contains("vm0/disk0 record 2") && err.contains("CRC32C"),
        "{err}"
    );
    assert!(
        log.read(&id(0), 3).unwrap().is_some(),
        "other records still read"
    );
    assert!(
        log.read(&id(1), 2).unwrap().is_some(),
        "other streams unaffected"
    );
}

#[test]
fn corruption_in_an_unsealed_middle_segment_flags_the_stream_for_resync() {
    let storage = MemStorage::default();
    let (mut log, _) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    let w = |seq: u64| Record::Write {
        seq,
        offset: 0,
        data: Bytes::from(vec![7; 2048]),
    };
    for seq in 1..=10 {
        log.append(&id(0), DISK, &w(seq), 0).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    // Reopen: segment 1 stays unsealed, new appends go to segment 2.
    let (mut log, _) = SegmentLog::open(storage.clone(), CONFIG).unwrap();
    for seq in 11..=12 {
        log.append(&id(0), DISK, &w(seq), 0).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    storage.corrupt(1, 32 + 5 * 2100); // somewhere inside segment 1's entries
    let (log, report) = SegmentLog::open(storage, CONFIG).unwrap();
    assert_eq!(report.corruption.len(), 1, "{report:?}");
    assert!(
        report.corruption[0].contains("mem:seg-1"),
        "names the file: {:?}",
        report.corruption
    );
    assert_eq!(report.resync, vec![id(0)]);
    let stats = log.stream_stats(&id(0)).unwrap();
    assert!(stats.needs_resync.is_some());
    assert!(
        log.read(&id(0), 12).unwrap().is_none(),
        "records after the damage are never served"
    );
}

/// A backlog spanning several sealed segments stays readable until acknowledged.
#[test]
fn sealed_segments_stay_until_acknowledged() {
    let mut ops = Vec::new();
    for _ in 0..40 {
        ops.push(Op::Append {
            stream: 0,
            sectors: 8,
            fill: 3,
        });
        ops.push(Op::Commit);
    }
    ops.push(Op::Read {
        stream: 0,
        pick: 0.0,
    });
    ops.push(Op::Ack {
        stream: 0,
        fraction: 0.5,
    });
    ops.push(Op::Read {
        stream: 0,
        pick: 0.0,
    });
    ops.push(Op::Crash);
    ops.push(Op::Read {
        stream: 0,
        pick: 0.0,
    });
    run(ops);
}
