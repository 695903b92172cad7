//! Harnesses that drive the stream state machines with arbitrary input, shared by the
//! cargo-fuzz target `fuzz/fuzz_targets/stream_machines.rs` (coverage-guided) and the
//! property test `tests/stream_fuzz.rs` (random bytes, run by CI on every change).
//!
//! The bytes are read as a program: each step picks an input for the machine (a frame
//! decoded from the following bytes, the stream finishing or breaking, a timeout, a send
//! or a new session) and the harness checks what must hold whatever a peer does:
//! nothing panics, a receiver delivers strictly increasing sequence numbers and nothing
//! after refusing, a sender never counts more in flight than it sent nor forgets an
//! unacknowledged item.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::ErrorCode;
use crate::frame::{decode_frame, Frame, StreamId};
use crate::stream::{
    Delivery, Entitlement, HashInput, Incoming, Opening, ReceiverConfig, Reconnect, SenderConfig,
    SenderEvent, SourcePosition, StreamReceiver, StreamSender,
};

/// Reads the fuzzer's bytes as small decisions.
struct Program<'a> {
    data: &'a [u8],
}

impl Program<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*b)
    }

    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..2 {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Some(v)
    }

    /// An input for a machine: mostly frames decoded from the next bytes.
    fn incoming(&mut self) -> Option<Incoming> {
        Some(match self.byte()? % 8 {
            0 => Incoming::Finished,
            1 => Incoming::Broken("fuzz: broken".into()),
            2 => Incoming::Malformed {
                code: ErrorCode::from_u16(u16::from(self.byte()?)),
                reason: "fuzz: malformed".into(),
            },
            _ => {
                let len = usize::from(self.byte()?).min(self.data.len());
                let (frame_bytes, rest) = self.data.split_at(len);
                self.data = rest;
                let mut buf = BytesMut::from(frame_bytes);
                match decode_frame(&mut buf) {
                    Ok(Some(frame)) => Incoming::Frame(frame),
                    _ => Incoming::Frame(self.plausible_frame()?),
                }
            }
        })
    }

    /// A frame built from a few bytes, so that short inputs still reach deep states.
    fn plausible_frame(&mut self) -> Option<Frame> {
        let n = self.u64()?;
        Some(match self.byte()? % 8 {
            0 => Frame::Accept {
                next_seq: n.max(1),
                credit_bytes: self.u64()?,
                zstd_window_log: 0,
            },
            1 => Frame::Ack { seq: n },
            2 => Frame::Applied { seq: n },
            3 => Frame::Credit {
                credit_bytes: self.u64()?,
            },
            4 => Frame::error(ErrorCode::from_u16(n as u16), "fuzz"),
            5 => Frame::Record(crate::frame::Record::Resync {
                seq: n.max(1),
                mark: crate::frame::ResyncMark {
                    id: self.u64()? % 4,
                    phase: match self.byte()? % 3 {
                        0 => crate::frame::ResyncPhase::Begin,
                        1 => crate::frame::ResyncPhase::Progress,
                        _ => crate::frame::ResyncPhase::End,
                    },
                    mode: crate::frame::ResyncMode::Delta,
                    next_region: 0,
                    regions: 4,
                    compared_bytes: 0,
                    sent_bytes: 0,
                },
            }),
            6 => Frame::ResyncRequest {
                mode: crate::frame::ResyncMode::Delta,
                reason: "fuzz".into(),
            },
            _ => Frame::Record(crate::frame::Record::Write {
                seq: n.max(1),
                offset: self.u64()? * 512,
                data: Bytes::from(vec![1u8; 512]),
            }),
        })
    }
}

/// A hash stream's receiver: every request it passes names nodes on the disk.
fn drive_hash_stream(rx: &mut StreamReceiver, program: &mut Program<'_>, disk_size: u64) {
    while let Some(incoming) = program.incoming() {
        match rx.handle_hash_request(incoming) {
            Ok(HashInput::Request {
                level,
                first,
                count,
            }) => {
                let nodes = crate::resync::node_count(level, disk_size);
                assert!(
                    first + u64::from(count) <= nodes,
                    "requests stay on the disk"
                );
            }
            Ok(HashInput::Finished) | Err(_) => return,
        }
    }
}

fn stream_id() -> StreamId {
    StreamId {
        vm: "vm1".into(),
        disk: 0,
    }
}

/// Drives a [`StreamReceiver`] (both configurations) with `data`.
pub fn drive_receiver(data: &[u8]) {
    let Some((&config, data)) = data.split_first() else {
        return;
    };
    let mut program = Program { data };
    let start = Instant::now();
    let config = if config % 2 == 0 {
        ReceiverConfig::agent_facing()
    } else {
        ReceiverConfig::relay_facing()
    };
    let mut rx = StreamReceiver::new(config, Entitlement::any(), start);
    let mut hello_done = false;
    let mut last_delivered = 0u64;
    while let Some(step) = program.byte() {
        if rx.is_closed() {
            assert!(matches!(
                rx.handle(Incoming::Finished),
                Ok(Delivery::Gone(_))
            ));
            return;
        }
        if !hello_done {
            match step % 4 {
                0 => {
                    let at = start + Duration::from_secs(u64::from(step));
                    if let Some(r) = rx.handle_timeout(at) {
                        assert!(at >= start + config.hello_timeout);
                        assert_eq!(r.code, ErrorCode::TooSlow);
                    }
                }
                _ => {
                    let Some(incoming) = program.incoming() else {
                        return;
                    };
                    match rx.handle_hello(incoming) {
                        Ok(Some(Opening::Data { disk_size, .. })) => {
                            let on_record = if step % 3 == 0 {
                                disk_size + 512
                            } else {
                                disk_size
                            };
                            if rx.check_disk_size(on_record).is_ok() {
                                if step % 5 == 0 {
                                    rx.track_resync(program.u64().map(|id| id % 4));
                                }
                                let next = program.u64().unwrap_or(1);
                                rx.accept(next, 1 << 20);
                                last_delivered = rx.expected().saturating_sub(1);
                                hello_done = true;
                            }
                        }
                        Ok(Some(Opening::Hashes { disk_size, .. })) => {
                            return drive_hash_stream(&mut rx, &mut program, disk_size);
                        }
                        _ => {}
                    }
                }
            }
            continue;
        }
        let Some(incoming) = program.incoming() else {
            return;
        };
        let expected_before = rx.expected();
        match rx.handle(incoming) {
            Ok(Delivery::Record(r)) => {
                assert_eq!(r.seq(), expected_before, "records are delivered in order");
                assert!(r.seq() > last_delivered);
                last_delivered = r.seq();
            }
            Ok(Delivery::Batch(b)) => {
                let (first, last) = b.span();
                assert!(first <= expected_before && last >= expected_before);
                if let Ok(records) = b.resolve(|_, n| Some(Bytes::from(vec![0u8; n]))) {
                    for r in records {
                        assert!(r.record.seq() > last_delivered, "batch items increase");
                        last_delivered = r.record.seq();
                    }
                }
                assert_eq!(rx.expected(), last + 1);
            }
            Ok(Delivery::Duplicate { .. }) => assert_eq!(rx.expected(), expected_before),
            Ok(Delivery::Finished | Delivery::Gone(_)) => assert!(rx.is_closed()),
            Err(refusal) => {
                assert!(rx.is_closed());
                assert!(refusal.last_valid < expected_before.max(1));
            }
        }
    }
}

/// Drives a [`StreamSender`] (both resend policies) with `data`.
pub fn drive_sender(data: &[u8]) {
    let Some((&config, data)) = data.split_first() else {
        return;
    };
    let mut program = Program { data };
    let config = if config % 2 == 0 {
        SenderConfig::agent(Duration::from_secs(30))
    } else {
        SenderConfig::forwarder()
    };
    let mut tx: StreamSender<u64> = StreamSender::new(config);
    let mut now = Instant::now();
    let mut sent_bytes: Vec<(u64, u64)> = Vec::new(); // (last_seq, bytes) not released
    let mut produced = 0u64;
    while let Some(step) = program.byte() {
        now += Duration::from_millis(u64::from(step) * 10);
        match step % 5 {
            0 => {
                let position = SourcePosition {
                    resend_from: tx.acked() + 1,
                    produced,
                    receiver_may_lead: step % 2 == 0,
                };
                let hello = tx.start(now, stream_id(), 4096, 0, position);
                assert!(matches!(hello, Frame::Hello { .. }));
            }
            1 => {
                let credit = tx.credit_available();
                if credit > 0 {
                    let first = tx.next_seq();
                    let last = first + u64::from(step % 3);
                    let bytes = 1 + u64::from(step);
                    tx.on_send(first, last, bytes, last);
                    sent_bytes.push((last, bytes));
                    produced = produced.max(last);
                }
            }
            2 => {
                if let Some(end) = tx.handle_timeout(now) {
                    if let Reconnect::After(d) = tx.session_ended(&end, now) {
                        assert!(d <= config.backoff_max);
                    }
                }
            }
            _ => {
                let Some(incoming) = program.incoming() else {
                    return;
                };
                match tx.handle(incoming) {
                    Ok(SenderEvent::Accepted { next_seq, released }) => {
                        assert!(next_seq >= 1);
                        for item in released {
                            assert!(item < next_seq, "only held items are released");
                        }
                        sent_bytes.retain(|(last, _)| *last >= next_seq);
                        if config.resend == crate::stream::Resend::FromSource {
                            sent_bytes.clear();
                            assert_eq!(tx.next_seq(), next_seq);
                        }
                    }
                    Ok(SenderEvent::Renumbered { next_seq, lost, .. }) => {
                        assert_eq!(tx.next_seq(), next_seq);
                        assert_eq!(tx.acked(), next_seq - 1);
                        assert_eq!(lost.len() as u64, sent_bytes.len() as u64);
                        sent_bytes.clear();
                    }
                    Ok(SenderEvent::Acked { seq, released }) => {
                        assert!(seq < tx.next_seq(), "acks cover only what was sent");
                        for item in released {
                            assert!(item <= seq);
                        }
                        sent_bytes.retain(|(last, _)| *last > seq);
                    }
                    Ok(_) => {}
                    Err(end) => {
                        let _ = tx.session_ended(&end, now);
                    }
                }
            }
        }
        let unreleased: u64 = sent_bytes.iter().map(|(_, b)| b).sum();
        assert_eq!(
            tx.in_flight_bytes(),
            unreleased,
            "in-flight bytes are exactly what was sent and not released"
        );
        assert!(tx.unacked().all(|last| *last > tx.acked()));
    }
}
