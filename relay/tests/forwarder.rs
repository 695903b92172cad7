//! A forwarder built without QUIC, metrics registry or cache files: its
//! [`ForwardContext`] gets the master target as an in-memory pipe to a small receiver
//! (the protocol's own `StreamReceiver`, applying to a memory image and keeping a
//! content index) and the cache as records in memory ([`MemSource`]). Sessions break, and the receiver
//! "restarts" losing its content index; the replica must still end equal to the source
//! at every recovery point, with every record applied once, in order.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fbr_master_target::journal::{apply_record, MemoryImage};
use fbr_protocol::codec::{decompressor_cost, CodecMemory, StreamDecompressor};
use fbr_protocol::stream::{Delivery, Entitlement, Incoming, ReceiverConfig, StreamReceiver};
use fbr_protocol::wan::{block_hash, BLOCK_SIZE};
use fbr_protocol::{Frame, Record, StreamId, TagKind};
use fbr_relay::egress::{Egress, EgressConfig};
use fbr_relay::forwarder::{ForwardContext, ForwardMetrics, Forwarders, Upstream, UpstreamStream};
use fbr_relay::memsource::MemSource;
use fbr_relay::reduce::WanConfig;
use fbr_throttling::{Rate, WeeklySchedule};
use fbr_transport::{FrameReader, FrameWriter, IoWriter, LinkError};
use tokio::io::DuplexStream;

const DISK: u64 = 1 << 20;
const CREDIT: u64 = 4 << 20;

fn stream() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

/// The source's records: 4 KiB writes over a 1 MiB disk whose content repeats (so dedup
/// sends references), some zero ranges, and a recovery point every 10 records.
fn source_records(n: u64) -> Vec<Record> {
    (1..=n)
        .map(|seq| match seq % 10 {
            0 => Record::Tag {
                seq,
                id: seq / 10,
                kind: TagKind::Crash,
                members: 1,
                group: "g".into(),
            },
            7 => Record::Zero {
                seq,
                offset: (seq * 13 % 256) * 4096,
                len: 8192,
            },
            _ => Record::Write {
                seq,
                offset: (seq * 37 % 255) * 4096,
                data: Bytes::from(vec![(seq % 5) as u8 + 1; BLOCK_SIZE]),
            },
        })
        .collect()
}

/// The disk after applying `records` to zeros.
fn disk_after<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
    let mut disk = MemoryImage(vec![0u8; DISK as usize]);
    for r in records {
        apply_record(r, &mut disk).unwrap();
    }
    disk.0
}

// --- the master target, as a receiver machine at the end of a pipe -----------------

#[derive(Debug)]
struct Replica {
    disk: MemoryImage,
    hwm: u64,
    /// Sequence numbers applied, in order.
    applied: Vec<u64>,
    /// The disk at each recovery point: tag seq -> disk.
    points: HashMap<u64, Vec<u8>>,
    /// Blocks held: hash -> bytes (lost by a "restart").
    content: HashMap<[u8; 32], Bytes>,
    batches: u64,
}

#[derive(Debug)]
struct PipeMasterTarget {
    replica: Mutex<Replica>,
    /// Every this many batches, the session breaks (0: never).
    break_every: u64,
    /// Whether a break also loses the content index (a restart).
    forget_on_break: bool,
    refusals: AtomicU64,
    /// Grants each session a zstd context (a fresh one per session, as the master
    /// target does), from this pool.
    zstd: Option<Arc<CodecMemory>>,
    zstd_batches: AtomicU64,
}

impl PipeMasterTarget {
    fn new(break_every: u64, forget_on_break: bool) -> Arc<Self> {
        Arc::new(PipeMasterTarget {
            replica: Mutex::new(Replica {
                disk: MemoryImage(vec![0; DISK as usize]),
                hwm: 0,
                applied: Vec::new(),
                points: HashMap::new(),
                content: HashMap::new(),
                batches: 0,
            }),
            break_every,
            forget_on_break,
            refusals: AtomicU64::new(0),
            zstd: None,
            zstd_batches: AtomicU64::new(0),
        })
    }

    fn with_zstd(break_every: u64) -> Arc<Self> {
        let mut mt = Arc::into_inner(Self::new(break_every, false)).unwrap();
        mt.zstd = Some(CodecMemory::new(64 << 20));
        Arc::new(mt)
    }

    fn lock(&self) -> MutexGuard<'_, Replica> {
        self.replica.lock().unwrap()
    }

    /// One session, as the master target's accept/unpack/apply would run it.
    async fn serve(self: Arc<Self>, recv: DuplexStream, send: DuplexStream) {
        let mut reader = FrameReader::new(recv);
        let mut writer = FrameWriter::new(IoWriter(send));
        let mut rx = StreamReceiver::new(
            ReceiverConfig::relay_facing(),
            Entitlement::any(),
            Instant::now(),
        );
        if !matches!(reader.receive_hello(&mut rx).await, Ok(Some(_))) {
            return;
        }
        let next = self.lock().hwm + 1;
        let zstd = self.zstd.as_ref().map(|pool| {
            StreamDecompressor::new(pool.reserve(1, 20, decompressor_cost).unwrap()).unwrap()
        });
        if writer
            .send(&rx.accept_with(next, CREDIT, zstd))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let incoming = reader.receive().await;
            if let Incoming::Frame(Frame::Batch(p)) = &incoming {
                if p.first() == Some(&fbr_protocol::wan::BATCH_VERSION_ZSTD) {
                    self.zstd_batches.fetch_add(1, Ordering::SeqCst);
                }
            }
            let records = match rx.handle(incoming) {
                Ok(Delivery::Record(r)) => vec![(r, vec![true])],
                Ok(Delivery::Batch(batch)) => {
                    let resolved = {
                        let replica = self.lock();
                        batch.resolve(|hash, _| replica.content.get(hash).cloned())
                    };
                    match resolved {
                        Ok(rs) => rs
                            .into_iter()
                            .map(|r| (r.record, r.literal_blocks))
                            .collect(),
                        Err(refusal) => {
                            self.refusals.fetch_add(1, Ordering::SeqCst);
                            writer.refuse(&refusal, None).await;
                            return;
                        }
                    }
                }
                Ok(Delivery::Duplicate { .. }) => continue,
                Ok(Delivery::Finished | Delivery::Gone(_)) => return,
                Err(refusal) => {
                    writer.refuse(&refusal, None).await;
                    return;
                }
            };
            let (hwm, broken) = {
                let mut rep = self.lock();
                for (record, literal) in records {
                    assert!(record.seq() > rep.hwm, "applied once, in order");
                    apply_record(&record, &mut rep.disk).unwrap();
                    if let Record::Write { data, .. } = &record {
                        for (block, lit) in data.chunks(BLOCK_SIZE).zip(literal) {
                            if lit {
                                rep.content
                                    .insert(block_hash(block), Bytes::copy_from_slice(block));
                            }
                        }
                    }
                    if matches!(record, Record::Tag { .. }) {
                        let disk = rep.disk.0.clone();
                        rep.points.insert(record.seq(), disk);
                    }
                    rep.hwm = record.seq();
                    rep.applied.push(record.seq());
                }
                rep.batches += 1;
                let broken = self.break_every > 0 && rep.batches % self.break_every == 0;
                if broken && self.forget_on_break {
                    rep.content.clear();
                }
                (rep.hwm, broken)
            };
            if writer.send(&Frame::Ack { seq: hwm }).await.is_err() || broken {
                return;
            }
        }
    }
}

#[derive(Debug)]
struct Pipe(Arc<PipeMasterTarget>);

impl Upstream for Pipe {
    type Send = IoWriter<DuplexStream>;
    type Recv = DuplexStream;

    async fn open_stream(&self) -> Result<UpstreamStream<Self>, LinkError> {
        let (relay_send, mt_recv) = tokio::io::duplex(1 << 20);
        let (mt_send, relay_recv) = tokio::io::duplex(1 << 20);
        tokio::spawn(self.0.clone().serve(mt_recv, mt_send));
        Ok((
            FrameWriter::new(IoWriter(relay_send)),
            FrameReader::new(relay_recv),
        ))
    }
}

// --- the tests ------------------------------------------------------------------------

type TestForwarders = Forwarders<Pipe, MemSource>;

fn forwarders(
    mt: &Arc<PipeMasterTarget>,
    records: Vec<Record>,
) -> (TestForwarders, Arc<MemSource>) {
    forwarders_with(mt, records, WanConfig::default())
}

fn forwarders_with(
    mt: &Arc<PipeMasterTarget>,
    records: Vec<Record>,
    wan: WanConfig,
) -> (TestForwarders, Arc<MemSource>) {
    let source = Arc::new(MemSource::default());
    for r in records {
        source.append(&stream(), r, 0);
    }
    let egress = Egress::start(EgressConfig {
        schedule: WeeklySchedule::constant(Rate::Unlimited),
        schedule_file: None,
        utc_offset_minutes: 0,
        vm_weights: HashMap::new(),
    });
    let ctx = ForwardContext::new(
        Arc::new(Pipe(mt.clone())),
        source.clone(),
        egress,
        wan,
        1 << 16,
        ForwardMetrics::detached(),
    );
    (Forwarders::new(Arc::new(ctx)), source)
}

/// The replica holds every record once, in order, and each recovery point exactly.
fn check_replica(rep: &Replica, records: &[Record]) {
    assert!(rep.applied.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(rep.disk.0 == disk_after(records), "final state differs");
    for (i, r) in records.iter().enumerate() {
        if let Record::Tag { seq, id, .. } = r {
            let at = rep
                .points
                .get(seq)
                .unwrap_or_else(|| panic!("recovery point {id} missing"));
            assert!(
                *at == disk_after(&records[..=i]),
                "recovery point {id} differs"
            );
        }
    }
}

/// Waits until the replica holds `last`, then checks it against the source.
async fn drained_and_exact(mt: &PipeMasterTarget, source: &MemSource, records: &[Record]) {
    let last = records.last().unwrap().seq();
    let started = Instant::now();
    while mt.lock().hwm < last {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not drained: replica at {}",
            mt.lock().hwm
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check_replica(&mt.lock(), records);
    // The cache is freed once the master target holds everything.
    let started = Instant::now();
    while source.acked(&stream()) < last {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "cache not freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_exactly_once_through_broken_sessions() {
    let records = source_records(600);
    let mt = PipeMasterTarget::new(3, false);
    let (fw, source) = forwarders(&mt, records.clone());
    let state = fw.ensure(&stream(), DISK);
    drained_and_exact(&mt, &source, &records).await;
    assert!(mt.lock().batches >= 6, "sessions broke along the way");
    assert!(state.failed.borrow().is_none());
    let stages = state.stages.stages();
    assert!(
        stages[3].1 < stages[0].1 / 2,
        "dedup and coalescing cut the bytes sent: {stages:?}"
    );
}

/// Every session gets a fresh zstd context on both ends: after each break the
/// forwarder's new session starts a new zstd frame, which the receiver's new context
/// decodes (a continued history would be refused as malformed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_sessions_start_fresh_contexts_through_broken_sessions() {
    let (_, mt) = drained_through_zstd_sessions(WanConfig::default()).await;
    assert!(mt.lock().batches >= 6, "sessions broke along the way");
}

/// Drains 600 records through a master target granting zstd whose sessions break every
/// 3 batches: the replica is exact, nothing was refused, and at least half the batches
/// were zstd.
async fn drained_through_zstd_sessions(wan: WanConfig) -> (TestForwarders, Arc<PipeMasterTarget>) {
    let records = source_records(600);
    let mt = PipeMasterTarget::with_zstd(3);
    let (fw, source) = forwarders_with(&mt, records.clone(), wan);
    let state = fw.ensure(&stream(), DISK);
    drained_and_exact(&mt, &source, &records).await;
    assert_eq!(mt.refusals.load(Ordering::SeqCst), 0);
    assert!(state.failed.borrow().is_none());
    let zstd = mt.zstd_batches.load(Ordering::SeqCst);
    assert!(
        zstd >= mt.lock().batches / 2,
        "{zstd} zstd batches of {}",
        mt.lock().batches
    );
    (fw, mt)
}

/// A relay whose share of its codec memory buys no context of its own (as with a
/// thousand streams) sends framed zstd: every piece a whole frame from the shared pool,
/// which the master target's per-stream decoder reads as it reads a continued stream,
/// through broken sessions too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_zstd_sessions_deliver_exactly_from_a_shared_pool() {
    let wan = WanConfig {
        // Room for one frame context (level 3: about 2.1 MiB), not for a stream's own.
        codec_memory: 5 << 19,
        ..WanConfig::default()
    };
    let (fw, _) = drained_through_zstd_sessions(wan).await;
    let ctx = fw.context();
    assert_eq!(ctx.frame_pool.contexts(), 1, "one shared context served");
    assert_eq!(
        ctx.codec_memory.reserved(),
        fbr_protocol::codec::compressor_cost(fbr_protocol::codec::FRAME_WINDOW_LOG, 3),
        "only the shared context is reserved"
    );
}

/// A session that reserved a context of its own while alone gives it back once a
/// thousand streams share the relay's codec memory: it goes framed mid-session, the
/// master target's decoder reads on across the change, and the replica is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_makes_way_when_streams_join_and_stays_exact() {
    use fbr_protocol::codec::{compressor_cost, FRAME_WINDOW_LOG};
    let records = source_records(600);
    let (before, after) = records.split_at(300);
    let mt = PipeMasterTarget::with_zstd(0);
    let (fw, source) = forwarders_with(&mt, before.to_vec(), WanConfig::default());
    let ctx = fw.context();
    let state = fw.ensure(&stream(), DISK);
    let started = Instant::now();
    while mt.lock().hwm < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "first half not sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Alone: the master target's grant (2^20) at level 3, a context of its own.
    assert_eq!(ctx.codec_memory.reserved(), compressor_cost(20, 3));
    assert_eq!(ctx.frame_pool.contexts(), 0);
    let zstd_before = mt.zstd_batches.load(Ordering::SeqCst);
    // A thousand streams now: the share (1 MiB) buys no context of its own.
    ctx.streams.store(1000, Ordering::Relaxed);
    for r in after {
        source.append(&stream(), r.clone(), 0);
    }
    drained_and_exact(&mt, &source, &records).await;
    assert!(state.failed.borrow().is_none());
    assert_eq!(mt.refusals.load(Ordering::SeqCst), 0);
    assert!(
        mt.zstd_batches.load(Ordering::SeqCst) > zstd_before,
        "zstd went on, framed"
    );
    assert_eq!(
        ctx.codec_memory.reserved(),
        compressor_cost(FRAME_WINDOW_LOG, 3),
        "only the shared frame context is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_target_that_lost_its_content_gets_the_blocks_again() {
    let records = source_records(600);
    let mt = PipeMasterTarget::new(4, true);
    let (fw, source) = forwarders(&mt, records.clone());
    fw.ensure(&stream(), DISK);
    drained_and_exact(&mt, &source, &records).await;
    assert!(
        mt.refusals.load(Ordering::SeqCst) > 0,
        "references to forgotten blocks were refused"
    );
    let resent = fw.context().metrics.unknown_references_total.get();
    assert!(resent > 0, "the forwarder resent without references");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cached_record_is_dropped_and_a_resync_asked_for() {
    let records = source_records(600);
    let mt = PipeMasterTarget::new(0, false);
    let (fw, source) = forwarders(&mt, records.clone());
    source.corrupt(&stream(), 300);
    let state = fw.ensure(&stream(), DISK);
    let mut need = state.resync_needed.subscribe();
    let need = tokio::time::timeout(Duration::from_secs(30), need.wait_for(Option::is_some))
        .await
        .expect("a resync is asked for")
        .unwrap()
        .clone()
        .unwrap();
    assert!(need.records_lost, "{need:?}");
    assert!(need.reason.contains("record 300"), "{need:?}");
    // What came before the damage reached the master target (up to the interval that
    // holds it), nothing of it or after.
    let started = Instant::now();
    while mt.lock().hwm < 290 {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hwm = mt.lock().hwm;
    assert!(
        (290..300).contains(&hwm),
        "stopped before the damage: {hwm}"
    );
    assert!(state.failed.borrow().is_none(), "the forwarder carries on");
    // The stream continues where the master target stands.
    source.append(&stream(), source_records(hwm + 1).pop().unwrap(), 0);
    let started = Instant::now();
    while mt.lock().hwm <= hwm {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "new records flow again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
