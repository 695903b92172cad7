//! A sender and a receiver state machine talking through a virtual link that loses,
//! delays and interleaves frames and breaks sessions at random, with a receiver that
//! acknowledges late and crashes (losing what was not durable). Whatever happens, the
//! receiver's store gets every record exactly once, in order, and at the end holds
//! everything the source produced; the sender never forgets a record the receiver has
//! not made durable.
//!
//! Both resend policies are covered: [`Resend::Retained`] (the agent, plain records)
//! and [`Resend::FromSource`] (the relay's forwarder, WAN batches read from a log).
//! Frames within one session are ordered and reliable, as on a QUIC stream; what is
//! lost is whatever was in transit when a session broke; what arrives late is a
//! superseded session's input, drained before the new session is accepted (the
//! receivers let a new session in only once the old one has finished its work).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fbr_protocol::stream::{
    Delivery, Entitlement, Incoming, Opening, ReceiverConfig, Reconnect, Resend, SenderConfig,
    SenderEvent, SourcePosition, StreamReceiver, StreamSender,
};
use fbr_protocol::{wan, Frame, Record, StreamId, TagKind};
use proptest::prelude::*;

const DISK: u64 = 64 * 512;
const RECORDS: u64 = 60;

fn stream() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

/// The source's record `seq` (deterministic, so both sides can check content).
fn record(seq: u64) -> Record {
    if seq % 7 == 0 {
        Record::Tag {
            seq,
            id: seq,
            kind: TagKind::Crash,
            members: 1,
            group: "g".into(),
        }
    } else {
        Record::Write {
            seq,
            offset: (seq * 3 % 64) * 512,
            data: Bytes::from(vec![seq as u8; 512]),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// The sender sends what credit allows (up to `n` frames).
    Send(u8),
    /// The link carries up to `n` frames sender -> receiver.
    ToReceiver(u8),
    /// The receiver makes what it received durable and acknowledges it.
    MakeDurable,
    /// The link carries up to `n` frames receiver -> sender.
    ToSender(u8),
    /// A frame sent earlier in this session arrives again, after the later ones (a
    /// duplicate, out of order).
    Duplicate(prop::sample::Index),
    /// The session breaks: frames in transit are lost (or, if `drain`, the receiver
    /// still processes what reached it before the new session is accepted).
    Break { drain: bool },
    /// The receiver crashes: what was not durable is lost, and so is the session.
    ReceiverCrash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..8).prop_map(Op::Send),
        6 => (1u8..8).prop_map(Op::ToReceiver),
        3 => Just(Op::MakeDurable),
        5 => (1u8..8).prop_map(Op::ToSender),
        2 => any::<prop::sample::Index>().prop_map(Op::Duplicate),
        1 => any::<bool>().prop_map(|drain| Op::Break { drain }),
        1 => Just(Op::ReceiverCrash),
    ]
}

/// The receiving side: a machine per session, a store with a durable prefix.
struct Receiver {
    machine: Option<StreamReceiver>,
    /// Records delivered, in order; `durable` of them survive a crash.
    store: Vec<Record>,
    durable: usize,
    /// The last ack sent (acks only move forward).
    acked: u64,
}

impl Receiver {
    fn hwm(&self) -> u64 {
        self.store.last().map_or(0, Record::seq)
    }

    /// Stores a delivery: exactly the next record, never one twice.
    fn store(&mut self, r: Record) {
        assert_eq!(r.seq(), self.hwm() + 1, "exactly once, in order");
        assert_eq!(r, record(r.seq()), "content intact");
        self.store.push(r);
    }

    fn deliver(&mut self, incoming: Incoming) -> Option<Frame> {
        let m = self.machine.as_mut()?;
        if m.expected() == 0 {
            // A new session: Hello, then Accept at the durable high-water mark.
            let Opening::Data {
                stream: id,
                disk_size,
                ..
            } = m.handle_hello(incoming).unwrap()?
            else {
                panic!("a data stream")
            };
            assert_eq!(id, stream());
            m.check_disk_size(disk_size).unwrap();
            self.store.truncate(self.durable);
            let next = self.store.last().map_or(0, Record::seq) + 1;
            return Some(m.accept(next, 4096));
        }
        match m.handle(incoming) {
            Ok(Delivery::Record(r)) => self.store(r),
            Ok(Delivery::Batch(b)) => {
                for r in b.resolve(|_, _| None).unwrap() {
                    // Batches here carry whole records: nothing is coalesced away.
                    self.store(r.record);
                }
            }
            Ok(Delivery::Duplicate { .. }) => {}
            Ok(Delivery::Finished | Delivery::Gone(_)) => self.machine = None,
            Err(refusal) => panic!("a valid stream was refused: {refusal}"),
        }
        None
    }
}

/// One session's two directions.
#[derive(Default)]
struct Session {
    to_receiver: VecDeque<Incoming>,
    to_sender: VecDeque<Incoming>,
    /// Every record or batch frame sent in this session (for duplicates).
    sent: Vec<Frame>,
}

/// The sending side with its source.
struct Sender {
    machine: StreamSender<Vec<Record>>,
    resend: Resend,
    /// Records produced so far (the agent draws them; the forwarder's log holds them).
    produced: u64,
    /// FromSource: the log trims what was acknowledged.
    log_first: u64,
}

impl Sender {
    fn position(&self) -> SourcePosition {
        match self.resend {
            Resend::Retained => SourcePosition {
                resend_from: self.machine.acked() + 1,
                produced: self.produced,
                receiver_may_lead: false,
            },
            Resend::FromSource => SourcePosition {
                resend_from: self.log_first,
                produced: self.produced,
                receiver_may_lead: true,
            },
        }
    }

    /// Sends up to `n` frames while credit allows.
    fn send(&mut self, n: u8, link: &mut Session) {
        for _ in 0..n {
            let done = match self.resend {
                Resend::Retained => self.produced >= RECORDS,
                Resend::FromSource => self.machine.next_seq() > RECORDS,
            };
            if self.machine.credit_available() == 0 || done {
                return;
            }
            let first = self.machine.next_seq();
            let (frame, records) = match self.resend {
                Resend::Retained => {
                    // The agent draws each record once; resends come from the machine.
                    self.produced += 1;
                    let r = record(self.produced);
                    (Frame::Record(r.clone()), vec![r])
                }
                Resend::FromSource => {
                    // Batches of 1-3 records, never past a tag.
                    let mut records = vec![record(first)];
                    while records.len() < (first % 3 + 1) as usize
                        && !matches!(records.last(), Some(Record::Tag { .. }))
                        && first + (records.len() as u64) <= RECORDS
                    {
                        records.push(record(first + records.len() as u64));
                    }
                    let last = records.last().unwrap().seq();
                    let mut payload = BytesMut::new();
                    let batch = wan::Batch {
                        first_seq: first,
                        last_seq: last,
                        items: records.iter().cloned().map(wan::Item::Plain).collect(),
                    };
                    let compressor = if first % 2 == 0 {
                        wan::Compressor::Lz4
                    } else {
                        wan::Compressor::None
                    };
                    wan::encode_batch(&batch, compressor, &mut Vec::new(), &mut payload).unwrap();
                    (Frame::Batch(payload.freeze()), records)
                }
            };
            let (first, last) = (records[0].seq(), records.last().unwrap().seq());
            let bytes = 100 * records.len() as u64;
            self.machine.on_send(first, last, bytes, records);
            link.sent.push(frame.clone());
            link.to_receiver.push_back(Incoming::Frame(frame));
        }
    }

    /// Starts a session; with [`Resend::Retained`], resends what it kept once accepted.
    fn start(&mut self, now: Instant, link: &mut Session) {
        let hello = self.machine.start(now, stream(), DISK, 0, self.position());
        link.to_receiver.push_back(Incoming::Frame(hello));
    }

    /// Handles a frame from the receiver; `false` when the session ended.
    fn receive(&mut self, incoming: Incoming, link: &mut Session) -> bool {
        match self.machine.handle(incoming) {
            Ok(SenderEvent::Accepted { .. }) => {
                if self.resend == Resend::Retained {
                    for records in self.machine.unacked() {
                        for r in records {
                            let frame = Frame::Record(r.clone());
                            link.sent.push(frame.clone());
                            link.to_receiver.push_back(Incoming::Frame(frame));
                        }
                    }
                }
                true
            }
            Ok(SenderEvent::Acked { seq, .. }) => {
                self.log_first = self.log_first.max(seq + 1);
                true
            }
            Ok(_) => true,
            Err(end) => {
                assert_ne!(
                    self.machine.session_ended(&end, Instant::now()),
                    Reconnect::GiveUp(end.reason.clone()),
                    "a healthy stream never gives up: {end}"
                );
                false
            }
        }
    }
}

fn run(resend: Resend, ops: Vec<Op>) {
    let config = SenderConfig {
        resend,
        ..SenderConfig::agent(Duration::from_secs(3600))
    };
    let mut sender = Sender {
        machine: StreamSender::new(config),
        resend,
        produced: if resend == Resend::FromSource {
            RECORDS
        } else {
            0
        },
        log_first: 1,
    };
    let receiver_config = match resend {
        Resend::Retained => ReceiverConfig::agent_facing(),
        Resend::FromSource => ReceiverConfig::relay_facing(),
    };
    let now = Instant::now();
    let mut receiver = Receiver {
        machine: Some(StreamReceiver::new(
            receiver_config,
            Entitlement::any(),
            now,
        )),
        store: Vec::new(),
        durable: 0,
        acked: 0,
    };
    let mut link = Session::default();
    sender.start(now, &mut link);

    let new_session = |sender: &mut Sender, receiver: &mut Receiver, link: &mut Session| {
        *link = Session::default();
        receiver.machine = Some(StreamReceiver::new(
            receiver_config,
            Entitlement::any(),
            now,
        ));
        sender.start(now, link);
    };

    // The random part, then a quiet phase in which everything must get through.
    let quiet = std::iter::repeat_n(
        [
            Op::Send(8),
            Op::ToReceiver(8),
            Op::MakeDurable,
            Op::ToSender(8),
        ],
        200,
    )
    .flatten();
    for op in ops.into_iter().chain(quiet) {
        match op {
            Op::Send(n) => sender.send(n, &mut link),
            Op::ToReceiver(n) => {
                for _ in 0..n {
                    let Some(incoming) = link.to_receiver.pop_front() else {
                        break;
                    };
                    if let Some(accept) = receiver.deliver(incoming) {
                        link.to_sender.push_back(Incoming::Frame(accept));
                    }
                }
            }
            Op::MakeDurable => {
                receiver.durable = receiver.store.len();
                let hwm = receiver.hwm();
                if hwm > receiver.acked
                    && receiver.machine.as_ref().is_some_and(|m| m.expected() > 0)
                {
                    receiver.acked = hwm;
                    link.to_sender
                        .push_back(Incoming::Frame(Frame::Ack { seq: hwm }));
                }
            }
            Op::ToSender(n) => {
                for _ in 0..n {
                    let Some(incoming) = link.to_sender.pop_front() else {
                        break;
                    };
                    if !sender.receive(incoming, &mut link) {
                        new_session(&mut sender, &mut receiver, &mut link);
                        break;
                    }
                }
            }
            Op::Duplicate(pick) => {
                if !link.sent.is_empty() {
                    let frame = link.sent[pick.index(link.sent.len())].clone();
                    link.to_receiver.push_back(Incoming::Frame(frame));
                }
            }
            Op::Break { drain } => {
                if drain {
                    // The superseded session finishes what reached it.
                    while let Some(incoming) = link.to_receiver.pop_front() {
                        receiver.deliver(incoming);
                    }
                }
                assert!(!sender.receive(Incoming::Broken("link down".into()), &mut link));
                new_session(&mut sender, &mut receiver, &mut link);
            }
            Op::ReceiverCrash => {
                receiver.store.truncate(receiver.durable);
                receiver.acked = receiver.acked.min(receiver.hwm());
                assert!(!sender.receive(Incoming::Broken("receiver crashed".into()), &mut link));
                new_session(&mut sender, &mut receiver, &mut link);
            }
        }
        // Nothing acknowledged is ever lost.
        assert!(
            sender.machine.acked() as usize <= receiver.durable,
            "the sender forgot record {} but only {} are durable",
            sender.machine.acked(),
            receiver.durable
        );
    }
    assert_eq!(receiver.durable as u64, RECORDS, "everything arrived");
    assert_eq!(sender.machine.acked(), RECORDS);
    assert_eq!(sender.machine.in_flight_bytes(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn retained_records_arrive_exactly_once_in_order(ops in prop::collection::vec(op(), 0..300)) {
        run(Resend::Retained, ops);
    }

    #[test]
    fn batches_from_a_log_arrive_exactly_once_in_order(ops in prop::collection::vec(op(), 0..300)) {
        run(Resend::FromSource, ops);
    }
}
