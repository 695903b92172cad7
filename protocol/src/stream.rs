//! The per-stream protocol, written once: a [`StreamSender`] and a [`StreamReceiver`]
//! state machine (sans-IO: no sockets, no tokio, time comes in as an argument).
//!
//! One disk's stream on either leg (agent → relay, relay → master target) is the same
//! conversation:
//!
//! ```text
//!  sender                                         receiver
//!    │── Hello{stream, disk_size} ─────────────────▶│ entitlement, disk size on record
//!    │◀──────────────── Accept{next_seq, credit} ───│ (or Error{code} and the end)
//!    │── Write/Zero/Tag or Batch (seq ≥ next_seq) ─▶│ duplicate? gap? in bounds? aligned?
//!    │◀────────────────────────────── Ack{seq} ─────│ durable up to seq: sender forgets
//!    │◀──────────────── Credit / Applied ───────────│
//!    │◀──────────────── Error{code, message} ───────│ refusal: records before it are kept
//! ```
//!
//! The machines hold every rule of that conversation; the async drivers (the churn
//! agent, the relay's ingest sessions and forwarders, the master target's stream
//! server) only move frames between QUIC and them, and do what only they can (append
//! to a cache, apply to a replica, read a disk).
//!
//! ## Sender
//! [`StreamSender`] keeps what is in flight (records or batches, each tracked by its
//! last sequence number and its size), the receiver's credit, and what was
//! acknowledged. It lives across sessions: after a reconnect, `Accept` says what the
//! receiver holds; the sender checks that against what it can still send
//! ([`SourcePosition`]) and either resends ([`Resend::Retained`]: the agent keeps its
//! unacknowledged records in memory) or restarts reading its source at `next_seq`
//! ([`Resend::FromSource`]: the relay's forwarder reads its disk cache). How a session
//! ended decides what happens next, by one rule per error code
//! ([`ErrorCode::recovery`]), with exponential backoff ([`StreamSender::session_ended`]).
//!
//! ## Receiver
//! [`StreamReceiver`] waits for `Hello` (with a deadline), checks the peer's
//! [`Entitlement`] and the disk size on record, answers `Accept`, then checks every
//! record: a sequence number below the next expected one is a duplicate (skipped), one
//! above is a gap (refused); writes and zero ranges must be aligned to 512 bytes and end
//! within the disk. A `Batch` (WAN leg only) is checked as a span and its items after
//! reference resolution ([`ReceivedBatch::resolve`]). A [`Refusal`] carries the last
//! valid record, so the driver can make the records before it durable and acknowledge
//! them before sending the `Error`.
//!
//! ## Invariants
//! - The sender never forgets a record the receiver has not acknowledged, and a
//!   receiver that claims less than it acknowledged stops the stream for good.
//! - The receiver delivers each sequence number at most once, in increasing order, and
//!   never delivers a record after a gap.
//! - Neither machine panics on any input (fuzzed: `fuzz/fuzz_targets/stream_machines.rs`,
//!   also run as a property test).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::StreamDecompressor;
use crate::error::{ErrorCode, Recovery};
use crate::frame::{Frame, Record, ResyncMode, StreamId};
use crate::wan;

/// How long a receiver waits for the `Hello` of a new stream.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

const SEQ_EXHAUSTED: &str = "sequence number 18446744073709551615 leaves no room for the next";

/// What a driver read from its stream, in the machines' terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole, well-formed frame.
    Frame(Frame),
    /// The peer finished the stream cleanly between two frames.
    Finished,
    /// Bytes that are not a valid frame (bad header, bad payload, or the stream ended in
    /// the middle of a frame), with the code a receiver answers them with.
    Malformed { code: ErrorCode, reason: String },
    /// The stream or its connection broke (reset, timeout, connection lost).
    Broken(String),
}

/// Which VMs a peer may write, read from its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entitlement {
    /// `urn:fbr:vm:*`: any VM.
    pub all_vms: bool,
    /// The VMs named one by one.
    pub vms: Vec<String>,
}

impl Entitlement {
    /// Entitled to every VM (relays writing to the master target).
    pub fn any() -> Self {
        Entitlement {
            all_vms: true,
            vms: Vec::new(),
        }
    }

    /// Whether the holder may write the disks of `vm`.
    pub fn may_write(&self, vm: &str) -> bool {
        self.all_vms || self.vms.iter().any(|v| v == vm)
    }
}

/// A receiver's refusal of a stream: the code and reason of the `Error` frame, and the
/// last record it accepted before the problem (0 if none, or if nothing must wait).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// Records up to this sequence number were valid and are kept: the driver makes
    /// them durable and acknowledges them before sending the `Error`.
    pub last_valid: u64,
}

impl Refusal {
    /// A refusal that waits for nothing (`last_valid` 0): local failures, or refusals
    /// before the stream was accepted.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            last_valid: 0,
        }
    }

    /// The `Error` frame that tells the sender.
    pub fn frame(&self) -> Frame {
        Frame::error(self.code, self.message.clone())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

// ---------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------

/// What a receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// How long a new stream may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// Whether `Batch` frames are allowed (the master target: yes; the relay's agent
    /// side: no, agents send plain records).
    pub accepts_batches: bool,
    /// Whether a stream may open with `Control` (the master target facing its relays:
    /// the failback controller's requests; agents never may).
    pub accepts_control: bool,
}

impl ReceiverConfig {
    /// The relay's side facing agents: plain records only.
    pub fn agent_facing() -> Self {
        ReceiverConfig {
            hello_timeout: HELLO_TIMEOUT,
            accepts_batches: false,
            accepts_control: false,
        }
    }

    /// The master target's side facing relays: records and WAN batches.
    pub fn relay_facing() -> Self {
        ReceiverConfig {
            hello_timeout: HELLO_TIMEOUT,
            accepts_batches: true,
            accepts_control: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReceiverState {
    /// Waiting for `Hello` until the deadline.
    AwaitingHello { deadline: Instant },
    /// `Hello` checked; the driver decides where the stream continues.
    Opening { stream: StreamId, disk_size: u64 },
    /// Accepted: records flow; `expected` is the next sequence number.
    Open {
        stream: StreamId,
        disk_size: u64,
        expected: u64,
    },
    /// A hash stream (`HashHello` checked): only `HashRequest`s from here on.
    Hashing { stream: StreamId, disk_size: u64 },
    /// Refused, finished or broken: nothing more is delivered.
    Closed,
}

/// What the first frame of a new stream opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A disk's data stream (`Hello`): the driver checks the size and the placement,
    /// then accepts.
    Data {
        stream: StreamId,
        disk_size: u64,
        placement: u64,
    },
    /// A hash stream for a resync (`HashHello`): the driver answers `HashAccept`, then
    /// serves (or forwards) hash requests.
    Hashes {
        stream: StreamId,
        disk_size: u64,
        key: [u8; 32],
    },
    /// A control stream (`Control`, master target only): the driver answers the
    /// request with one `ControlAnswer` and the stream ends. The request is opaque
    /// here; the driver parses it and checks it against the peer's entitlement.
    Control { request: bytes::Bytes },
}

/// What a hash stream's receiver hands its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashInput {
    /// A checked request: these nodes exist on the disk.
    Request { level: u8, first: u64, count: u32 },
    /// The agent finished the stream (the resync is done, or it gave up).
    Finished,
}

/// Which resync the replica is in, for checking `Resync` marks (master target only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResyncCheck {
    /// Marks are not checked (the relay passes them through).
    Off,
    /// The resync in progress, if any: progress and end marks must name it.
    Current(Option<u64>),
}

/// What the receiver hands its driver once the stream is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The next record, checked: in sequence, aligned, within the disk.
    Record(Record),
    /// A WAN batch whose span continues the stream; its references are still to be
    /// resolved ([`ReceivedBatch::resolve`]), which also checks every record.
    Batch(ReceivedBatch),
    /// Records the receiver already holds (a resend after a reconnect): skip them.
    Duplicate {
        records: u64,
        /// Whether they came as one `Batch` frame.
        batch: bool,
    },
    /// The sender finished the stream cleanly.
    Finished,
    /// The stream broke (the sender went away); not the sender's fault to answer.
    Gone(String),
}

/// The receiving side of one stream.
#[derive(Debug)]
pub struct StreamReceiver {
    config: ReceiverConfig,
    entitlement: Entitlement,
    state: ReceiverState,
    resync: ResyncCheck,
    /// The stream's zstd context, when `Accept` granted one: every zstd-coded batch
    /// continues it, duplicates included (see [`crate::codec`]).
    zstd: Option<StreamDecompressor>,
}

impl StreamReceiver {
    /// A receiver for a stream just opened by a peer entitled to `entitlement`, at `now`.
    pub fn new(config: ReceiverConfig, entitlement: Entitlement, now: Instant) -> Self {
        StreamReceiver {
            config,
            entitlement,
            state: ReceiverState::AwaitingHello {
                deadline: now + config.hello_timeout,
            },
            resync: ResyncCheck::Off,
            zstd: None,
        }
    }

    // --- inputs ---------------------------------------------------------------------

    /// The first input of a stream. `Ok(Some)` is a checked `Hello` or `HashHello` (the
    /// peer may write this VM); `Ok(None)` means the peer went away before saying
    /// anything.
    pub fn handle_hello(&mut self, incoming: Incoming) -> Result<Option<Opening>, Refusal> {
        if !matches!(self.state, ReceiverState::AwaitingHello { .. }) {
            return Err(self.close(Refusal::new(
                ErrorCode::Internal,
                "receiver bug: Hello handled twice",
            )));
        }
        let (stream, disk_size, key, placement) = match incoming {
            Incoming::Frame(Frame::Hello {
                stream,
                disk_size,
                placement,
            }) => (stream, disk_size, None, placement),
            Incoming::Frame(Frame::HashHello {
                stream,
                disk_size,
                key,
            }) => (stream, disk_size, Some(key), 0),
            Incoming::Frame(Frame::Control { request }) if self.config.accepts_control => {
                self.state = ReceiverState::Closed;
                return Ok(Some(Opening::Control { request }));
            }
            Incoming::Frame(other) => {
                let message = format!("expected Hello, got {:?}", other.frame_type());
                return Err(self.close(Refusal::new(ErrorCode::UnexpectedFrame, message)));
            }
            Incoming::Malformed { code, reason } => {
                return Err(self.close(Refusal::new(code, reason)))
            }
            Incoming::Finished | Incoming::Broken(_) => {
                self.state = ReceiverState::Closed;
                return Ok(None);
            }
        };
        if !self.entitlement.may_write(&stream.vm) {
            let message = format!(
                "the peer's certificate does not entitle it to write VM {}",
                stream.vm
            );
            return Err(self.close(Refusal::new(ErrorCode::NotEntitled, message)));
        }
        Ok(Some(match key {
            None => {
                self.state = ReceiverState::Opening {
                    stream: stream.clone(),
                    disk_size,
                };
                Opening::Data {
                    stream,
                    disk_size,
                    placement,
                }
            }
            Some(key) => {
                self.state = ReceiverState::Hashing {
                    stream: stream.clone(),
                    disk_size,
                };
                Opening::Hashes {
                    stream,
                    disk_size,
                    key,
                }
            }
        }))
    }

    /// Every input of a hash stream after `HashHello`: a request for nodes that exist
    /// on the disk, or why the stream ends (anything but `HashRequest` is refused).
    pub fn handle_hash_request(&mut self, incoming: Incoming) -> Result<HashInput, Refusal> {
        let ReceiverState::Hashing { disk_size, .. } = self.state else {
            return Err(self.close(Refusal::new(
                ErrorCode::Internal,
                "receiver bug: not a hash stream",
            )));
        };
        match incoming {
            Incoming::Frame(Frame::HashRequest {
                level,
                first,
                count,
            }) => match crate::resync::check_request(level, first, count, disk_size) {
                Ok(()) => Ok(HashInput::Request {
                    level,
                    first,
                    count,
                }),
                Err((code, message)) => Err(self.close(Refusal::new(code, message))),
            },
            Incoming::Frame(other) => {
                let message = format!("{:?} frame on a hash stream", other.frame_type());
                Err(self.close(Refusal::new(ErrorCode::UnexpectedFrame, message)))
            }
            Incoming::Malformed { code, reason } => Err(self.close(Refusal::new(code, reason))),
            Incoming::Finished | Incoming::Broken(_) => {
                self.state = ReceiverState::Closed;
                Ok(HashInput::Finished)
            }
        }
    }

    /// From now on, `Resync` marks are checked against the replica's resync in progress
    /// (`current`, or none): a progress or end mark for another resync is refused
    /// ([`ErrorCode::ResyncMismatch`]). The master target calls this before `accept`.
    pub fn track_resync(&mut self, current: Option<u64>) {
        self.resync = ResyncCheck::Current(current);
    }

    /// The `Hello` deadline passed at `now`: the refusal to send, if it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Refusal> {
        match self.state {
            ReceiverState::AwaitingHello { deadline } if now >= deadline => {
                let message = format!("no Hello within {} s", self.config.hello_timeout.as_secs());
                Some(self.close(Refusal::new(ErrorCode::TooSlow, message)))
            }
            _ => None,
        }
    }

    /// Checks the size `Hello` (or `HashHello`) announced against the one on record.
    pub fn check_disk_size(&mut self, on_record: u64) -> Result<(), Refusal> {
        let (ReceiverState::Opening { stream, disk_size }
        | ReceiverState::Hashing { stream, disk_size }) = &self.state
        else {
            return Err(self.close(Refusal::new(
                ErrorCode::Internal,
                "receiver bug: disk size checked outside Hello",
            )));
        };
        if *disk_size != on_record {
            let message =
                format!("disk {stream} has size {on_record} on record, Hello says {disk_size}");
            return Err(self.close(Refusal::new(ErrorCode::DiskSizeMismatch, message)));
        }
        Ok(())
    }

    /// Checks the placement `Hello` announced against the highest one on record for
    /// the stream: a lower one comes from where the VM was before it moved (a relay
    /// that still holds an old copy, an agent with a stale assignment) and is refused
    /// with [`ErrorCode::StreamMoved`], so only the stream's current path may write.
    /// A higher one is the driver's to record (durably) before it accepts.
    pub fn check_placement(&mut self, placement: u64, on_record: u64) -> Result<(), Refusal> {
        if placement < on_record {
            let stream = match &self.state {
                ReceiverState::Opening { stream, .. } => stream.to_string(),
                _ => "the stream".to_owned(),
            };
            let message = format!(
                "{stream} moved to another relay (placement {on_record} on record, Hello says {placement}): \
                 this copy is stale; ask the configuration server for the current assignment"
            );
            return Err(self.close(Refusal::new(ErrorCode::StreamMoved, message)));
        }
        Ok(())
    }

    /// The driver's own reason to refuse (a local failure, an unknown position): the
    /// stream is closed, waiting for nothing.
    pub fn refuse(&mut self, code: ErrorCode, message: impl Into<String>) -> Refusal {
        self.close(Refusal::new(code, message))
    }

    /// Accepts the stream: records continue at `next_seq` (the receiver's durable
    /// high-water mark plus one), with `credit_bytes` in flight. Returns the `Accept`.
    pub fn accept(&mut self, next_seq: u64, credit_bytes: u64) -> Frame {
        self.accept_with(next_seq, credit_bytes, None)
    }

    /// [`Self::accept`], granting the sender a zstd context of `zstd`'s window: its
    /// batches may then continue it (WAN streams of the master target only).
    pub fn accept_with(
        &mut self,
        next_seq: u64,
        credit_bytes: u64,
        zstd: Option<StreamDecompressor>,
    ) -> Frame {
        let zstd_window_log = zstd.as_ref().map_or(0, |d| d.window_log());
        self.zstd = zstd.filter(|_| self.config.accepts_batches);
        let next_seq = next_seq.max(1);
        if let ReceiverState::Opening { stream, disk_size } = &self.state {
            self.state = ReceiverState::Open {
                stream: stream.clone(),
                disk_size: *disk_size,
                expected: next_seq,
            };
        }
        Frame::Accept {
            next_seq,
            credit_bytes,
            zstd_window_log: if self.zstd.is_some() {
                zstd_window_log
            } else {
                0
            },
        }
    }

    /// Every input after `Accept`: the next thing to deliver, or why the stream ends.
    pub fn handle(&mut self, incoming: Incoming) -> Result<Delivery, Refusal> {
        let ReceiverState::Open {
            disk_size,
            expected,
            ..
        } = self.state
        else {
            return Ok(Delivery::Gone("the stream is not open".into()));
        };
        match incoming {
            Incoming::Frame(Frame::Record(record)) => {
                let seq = record.seq();
                if seq < expected {
                    return Ok(Delivery::Duplicate {
                        records: 1,
                        batch: false,
                    });
                }
                if seq > expected {
                    return Err(self.refuse_open(
                        ErrorCode::SequenceGap,
                        format!("expected sequence {expected}, got {seq}"),
                    ));
                }
                if let Err((code, message)) = record.check_against_disk(disk_size) {
                    return Err(self.refuse_open(code, message));
                }
                if let Err(message) = self.check_mark(&record) {
                    return Err(self.refuse_open(ErrorCode::ResyncMismatch, message));
                }
                let Some(next) = seq.checked_add(1) else {
                    return Err(self.refuse_open(ErrorCode::MalformedFrame, SEQ_EXHAUSTED.into()));
                };
                self.set_expected(next);
                Ok(Delivery::Record(record))
            }
            Incoming::Frame(Frame::Batch(payload)) if self.config.accepts_batches => {
                let batch = match wan::decode_batch_with(payload, self.zstd.as_mut()) {
                    Ok(b) => b,
                    Err(e) => return Err(self.refuse_open(e.code(), e.to_string())),
                };
                if batch.first_seq > expected {
                    return Err(self.refuse_open(
                        ErrorCode::SequenceGap,
                        format!(
                            "expected sequence {expected}, batch starts at {}",
                            batch.first_seq
                        ),
                    ));
                }
                if batch.last_seq < expected {
                    return Ok(Delivery::Duplicate {
                        records: batch.items.len() as u64,
                        batch: true,
                    });
                }
                // Resync marks are checked in order, before anything of the batch is
                // applied (a refusal refuses the whole batch).
                let marks: Vec<Record> = batch
                    .items
                    .iter()
                    .filter_map(|i| match i {
                        wan::Item::Plain(r @ Record::Resync { .. }) if r.seq() >= expected => {
                            Some(r.clone())
                        }
                        _ => None,
                    })
                    .collect();
                for mark in &marks {
                    if let Err(message) = self.check_mark(mark) {
                        return Err(self.refuse_open(ErrorCode::ResyncMismatch, message));
                    }
                }
                // Items before `expected` are held already; the rest bring the state to
                // exactly `last_seq` (the relay coalesced only within the batch's span).
                let Some(next) = batch.last_seq.checked_add(1) else {
                    return Err(self.refuse_open(ErrorCode::MalformedFrame, SEQ_EXHAUSTED.into()));
                };
                self.set_expected(next);
                Ok(Delivery::Batch(ReceivedBatch {
                    batch,
                    from: expected,
                    disk_size,
                }))
            }
            Incoming::Frame(other) => {
                let message = format!("{:?} frame in the middle of a stream", other.frame_type());
                Err(self.refuse_open(ErrorCode::UnexpectedFrame, message))
            }
            Incoming::Malformed { code, reason } => Err(self.refuse_open(code, reason)),
            Incoming::Finished => {
                self.state = ReceiverState::Closed;
                Ok(Delivery::Finished)
            }
            Incoming::Broken(reason) => {
                self.state = ReceiverState::Closed;
                Ok(Delivery::Gone(reason))
            }
        }
    }

    // --- outputs and getters ----------------------------------------------------------

    /// When [`Self::handle_timeout`] must be called (while waiting for `Hello`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ReceiverState::AwaitingHello { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// The stream, once `Hello` named it.
    pub fn stream(&self) -> Option<&StreamId> {
        match &self.state {
            ReceiverState::Opening { stream, .. }
            | ReceiverState::Open { stream, .. }
            | ReceiverState::Hashing { stream, .. } => Some(stream),
            _ => None,
        }
    }

    /// The next sequence number expected (0 before `Accept`).
    pub fn expected(&self) -> u64 {
        match self.state {
            ReceiverState::Open { expected, .. } => expected,
            _ => 0,
        }
    }

    /// Whether the stream ended (refused, finished or broken).
    pub fn is_closed(&self) -> bool {
        self.state == ReceiverState::Closed
    }

    // --- internals --------------------------------------------------------------------

    /// Checks a `Resync` mark against the resync in progress and follows it.
    fn check_mark(&mut self, record: &Record) -> Result<(), String> {
        let (ResyncCheck::Current(current), Record::Resync { seq, mark }) =
            (&mut self.resync, record)
        else {
            return Ok(());
        };
        match mark.phase {
            crate::frame::ResyncPhase::Begin => *current = Some(mark.id),
            phase if *current == Some(mark.id) => {
                if phase == crate::frame::ResyncPhase::End {
                    *current = None;
                }
            }
            phase => {
                return Err(format!(
                    "record {seq}: {phase:?} mark of resync {}, but {}",
                    mark.id,
                    match current {
                        Some(id) => format!("resync {id} is in progress"),
                        None => "the disk is not resyncing".into(),
                    }
                ))
            }
        }
        Ok(())
    }

    fn set_expected(&mut self, next: u64) {
        if let ReceiverState::Open { expected, .. } = &mut self.state {
            *expected = next;
        }
    }

    fn refuse_open(&mut self, code: ErrorCode, message: String) -> Refusal {
        let last_valid = self.expected().saturating_sub(1);
        self.state = ReceiverState::Closed;
        Refusal {
            code,
            message,
            last_valid,
        }
    }

    fn close(&mut self, refusal: Refusal) -> Refusal {
        self.state = ReceiverState::Closed;
        refusal
    }
}

/// A record of a batch after its references were resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRecord {
    pub record: Record,
    /// For a write: which of its 4 KiB blocks arrived as bytes (only those need hashing
    /// into the receiver's content index). Empty for zero ranges and tags.
    pub literal_blocks: Vec<bool>,
}

/// A WAN batch accepted by sequence, awaiting reference resolution. Independent of the
/// receiver, so a driver can resolve it on a blocking thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBatch {
    batch: wan::Batch,
    /// The first sequence number not yet held (items before it are skipped).
    from: u64,
    disk_size: u64,
}

impl ReceivedBatch {
    /// The span of sequence numbers the batch covers.
    pub fn span(&self) -> (u64, u64) {
        (self.batch.first_seq, self.batch.last_seq)
    }

    /// Whether any new item references a block (resolving then reads the receiver's
    /// content index; without references it is pure CPU work on the batch).
    pub fn has_references(&self) -> bool {
        self.batch
            .items
            .iter()
            .filter(|i| i.seq() >= self.from)
            .any(|i| match i {
                wan::Item::Write { blocks, .. } => {
                    blocks.iter().any(|b| matches!(b, wan::Block::Ref(_)))
                }
                wan::Item::Plain(_) => false,
            })
    }

    /// Resolves every new item's references with `lookup(hash, len)` (the block's bytes,
    /// re-verified, or `None`), and checks each record against the disk. A block that
    /// cannot be resolved refuses the stream with `UnknownReference`: the sender resends
    /// from the next expected record in full.
    pub fn resolve(
        self,
        mut lookup: impl FnMut(&[u8; 32], usize) -> Option<Bytes>,
    ) -> Result<Vec<ResolvedRecord>, Refusal> {
        let mut out = Vec::with_capacity(self.batch.items.len());
        let mut last_valid = self.from.saturating_sub(1);
        for item in self
            .batch
            .items
            .into_iter()
            .filter(|i| i.seq() >= self.from)
        {
            let literal_blocks = match &item {
                wan::Item::Write { blocks, .. } => blocks
                    .iter()
                    .map(|b| matches!(b, wan::Block::Literal(_)))
                    .collect(),
                wan::Item::Plain(_) => Vec::new(),
            };
            let record = wan::resolve(item, &mut lookup).map_err(|seq| Refusal {
                code: ErrorCode::UnknownReference,
                message: format!(
                    "record {seq} references a block this receiver does not hold; resend it in full"
                ),
                last_valid,
            })?;
            if let Err((code, message)) = record.check_against_disk(self.disk_size) {
                return Err(Refusal {
                    code,
                    message,
                    last_valid,
                });
            }
            last_valid = record.seq();
            out.push(ResolvedRecord {
                record,
                literal_blocks,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------

/// How a sender gets back what was in flight when a session broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// The in-flight items are kept in memory and sent again after `Accept` (the agent).
    Retained,
    /// The in-flight items are forgotten at `Accept`; the driver reads its source again
    /// from [`StreamSender::next_seq`] (the relay's forwarder and its disk cache).
    FromSource,
}

/// A sender's timing and resend policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// How long to wait for `Accept` after `Hello`.
    pub accept_timeout: Duration,
    pub resend: Resend,
    /// First delay before reconnecting after a transient failure; doubles up to
    /// `backoff_max`, and starts over once a session was accepted.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Give up after failing to get a session accepted for this long (`None`: never).
    pub give_up_after: Option<Duration>,
}

impl SenderConfig {
    /// The churn agent: keeps its unacknowledged records; gives up after `give_up_after`.
    pub fn agent(give_up_after: Duration) -> Self {
        SenderConfig {
            accept_timeout: Duration::from_secs(15),
            resend: Resend::Retained,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            give_up_after: Some(give_up_after),
        }
    }

    /// The relay's forwarder: rereads its cache; never gives up on a reachable stream.
    pub fn forwarder() -> Self {
        SenderConfig {
            accept_timeout: Duration::from_secs(10),
            resend: Resend::FromSource,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            give_up_after: None,
        }
    }
}

/// What the sender's source can still provide when a session starts: checked against
/// what the receiver says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePosition {
    /// The oldest record the source can still send (older ones were acknowledged and
    /// forgotten).
    pub resend_from: u64,
    /// The newest record the source has produced (0: none).
    pub produced: u64,
    /// Whether the receiver may hold more than this source produced: true for a relay,
    /// whose cache may be newer than the master target's history (the master target is
    /// the authority); false for an agent, which produced every record itself.
    pub receiver_may_lead: bool,
}

impl SourcePosition {
    /// A source that holds nothing (yet) and lets the receiver lead.
    pub fn empty() -> Self {
        SourcePosition {
            resend_from: 0,
            produced: 0,
            receiver_may_lead: true,
        }
    }
}

/// Why a session ended, and what the sender does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub recovery: Recovery,
    pub reason: String,
    /// The receiver's code, when it refused the stream with an `Error` frame.
    pub code: Option<ErrorCode>,
}

/// How long a driver whose write to the receiver failed waits for the receiver's
/// `Error` frame: a receiver that refuses a stream stops reading it, so the sender's
/// next write often fails before the refusal is read, and only the refusal says what
/// to do (resend at once, give up, or retry).
pub const REFUSAL_GRACE: Duration = Duration::from_secs(1);

impl SessionEnd {
    /// A transient failure: reconnect after the backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        SessionEnd {
            recovery: Recovery::Retry,
            reason: reason.into(),
            code: None,
        }
    }

    /// A failure reconnecting cannot fix: stop this stream.
    pub fn give_up(reason: impl Into<String>) -> Self {
        SessionEnd {
            recovery: Recovery::GiveUp,
            reason: reason.into(),
            code: None,
        }
    }

    /// The receiver refused the stream with `code`: the one rule of what that means.
    pub fn refused(code: ErrorCode, message: &str) -> Self {
        SessionEnd {
            recovery: code.recovery(),
            reason: format!("{code}: {message}"),
            code: Some(code),
        }
    }

    /// Whether the receiver ended the session with an `Error` frame. After a failed
    /// write, such an end (read within [`REFUSAL_GRACE`]) is the one to act on.
    pub fn is_refusal(&self) -> bool {
        self.code.is_some()
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What to do after a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconnect {
    /// Open a new session after this delay (zero: at once).
    After(Duration),
    /// Stop: the stream cannot continue (the reason says why).
    GiveUp(String),
}

/// What the sender tells its driver about an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent<T> {
    /// The receiver accepted: it holds everything before `next_seq`. `released` are the
    /// in-flight items it holds (forget them). With [`Resend::Retained`], the items
    /// still in flight ([`StreamSender::unacked`]) must be sent again, in order.
    Accepted { next_seq: u64, released: Vec<T> },
    /// Everything up to `seq` is durable at the receiver; `released` are the in-flight
    /// items that covers.
    Acked { seq: u64, released: Vec<T> },
    /// Everything up to `seq` is durable at the end of the path (relay → agent).
    Applied { seq: u64 },
    /// The receiver changed the credit.
    Credit { credit_bytes: u64 },
    /// The receiver asks for a resync of `mode` (an operator asked for it). The stream
    /// goes on; the driver starts the resync.
    ResyncRequested { mode: ResyncMode, reason: String },
    /// The receiver lost records it had acknowledged (its cache was corrupt) and asked
    /// for a resync before accepting: the stream continues at `next_seq`, numbering
    /// again from there; `lost` are the items in flight, forgotten (the resync of
    /// `mode` replaces whatever the lost records carried).
    Renumbered {
        next_seq: u64,
        lost: Vec<T>,
        mode: ResyncMode,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight<T> {
    last_seq: u64,
    bytes: u64,
    item: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SenderState {
    /// No session (before the first, or between two).
    Idle,
    AwaitingAccept {
        deadline: Instant,
        position: SourcePosition,
    },
    Open,
}

/// The sending side of one stream, across sessions.
#[derive(Debug, Clone)]
pub struct StreamSender<T> {
    config: SenderConfig,
    state: SenderState,
    in_flight: VecDeque<InFlight<T>>,
    in_flight_bytes: u64,
    credit: u64,
    /// Highest sequence number the receiver acknowledged.
    acked: u64,
    /// Highest sequence number reported applied at the end of the path.
    applied: u64,
    /// The next sequence number to send.
    next_seq: u64,
    /// Whether the current session was accepted (resets the backoff when it ends).
    accepted: bool,
    backoff: Duration,
    /// When reconnecting started failing (`None` while sessions get accepted).
    failing_since: Option<Instant>,
    /// A resync the receiver asked for before its `Accept` (it lost records).
    resync_before_accept: Option<(ResyncMode, String)>,
    /// The stream moved off a relay that may have held acknowledged records the master
    /// target never got ([`StreamSender::moved_off_lost_relay`]): from this placement
    /// on, and why.
    moved_off_lost_relay: Option<(u64, String)>,
    /// The placement of the session started last.
    session_placement: u64,
    /// The zstd window the receiver granted the current session (0: none).
    zstd_window_log: u8,
}

impl<T> StreamSender<T> {
    pub fn new(config: SenderConfig) -> Self {
        StreamSender {
            config,
            state: SenderState::Idle,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            credit: 0,
            acked: 0,
            applied: 0,
            next_seq: 1,
            accepted: false,
            backoff: config.backoff_initial,
            failing_since: None,
            resync_before_accept: None,
            moved_off_lost_relay: None,
            session_placement: 0,
            zstd_window_log: 0,
        }
    }

    // --- inputs ---------------------------------------------------------------------

    /// Starts a session at `now`: returns the `Hello` to send. `position` is what the
    /// source can still send, checked against the receiver's answer.
    ///
    /// `placement` is the stream's placement (how many times its VM moved between
    /// relays): a receiver that knows a higher one refuses with `StreamMoved`.
    pub fn start(
        &mut self,
        now: Instant,
        stream: StreamId,
        disk_size: u64,
        placement: u64,
        position: SourcePosition,
    ) -> Frame {
        self.state = SenderState::AwaitingAccept {
            deadline: now + self.config.accept_timeout,
            position,
        };
        self.accepted = false;
        self.resync_before_accept = None;
        self.session_placement = placement;
        self.zstd_window_log = 0;
        Frame::Hello {
            stream,
            disk_size,
            placement,
        }
    }

    /// The stream moves to a new relay because the old one is gone (dead, or
    /// unreachable past the move's drain timeout) with records it acknowledged that
    /// the master target may never get. The new relay starts where the master target
    /// stands, which may be behind what was acknowledged: at the next `Accept`, that is
    /// no invariant violation but the move's expected outcome, so the stream numbers
    /// again from there ([`SenderEvent::Renumbered`], with a delta resync to replace
    /// what the lost records carried). Applies to the first session accepted at
    /// `placement` or above (a late `Accept` from the old relay does not use it up).
    pub fn moved_off_lost_relay(&mut self, placement: u64, reason: impl Into<String>) {
        self.moved_off_lost_relay = Some((placement, reason.into()));
    }

    /// The `Accept` deadline passed at `now`: how the session ends, if it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<SessionEnd> {
        match self.state {
            SenderState::AwaitingAccept { deadline, .. } if now >= deadline => {
                self.state = SenderState::Idle;
                Some(SessionEnd::retry(format!(
                    "no Accept within {} s",
                    self.config.accept_timeout.as_secs()
                )))
            }
            _ => None,
        }
    }

    /// A frame (or the stream's end) from the receiver.
    pub fn handle(&mut self, incoming: Incoming) -> Result<SenderEvent<T>, SessionEnd> {
        let frame = match incoming {
            Incoming::Frame(frame) => frame,
            Incoming::Finished => {
                return Err(self.end(SessionEnd::retry("the receiver finished the stream")))
            }
            Incoming::Malformed { reason, .. } => {
                return Err(self.end(SessionEnd::retry(format!(
                    "unreadable frame from the receiver: {reason}"
                ))))
            }
            Incoming::Broken(reason) => return Err(self.end(SessionEnd::retry(reason))),
        };
        match (self.state, frame) {
            (_, Frame::Error { code, message }) => {
                Err(self.end(SessionEnd::refused(code, &message)))
            }
            (SenderState::AwaitingAccept { .. }, Frame::ResyncRequest { mode, reason }) => {
                self.resync_before_accept = Some((mode, reason.clone()));
                Ok(SenderEvent::ResyncRequested { mode, reason })
            }
            (SenderState::Open, Frame::ResyncRequest { mode, reason }) => {
                Ok(SenderEvent::ResyncRequested { mode, reason })
            }
            (
                SenderState::AwaitingAccept { position, .. },
                Frame::Accept {
                    next_seq,
                    credit_bytes,
                    zstd_window_log,
                },
            ) => {
                self.zstd_window_log = zstd_window_log;
                self.accept(position, next_seq, credit_bytes)
            }
            (SenderState::Open, Frame::Ack { seq }) => {
                if seq >= self.next_seq {
                    let reason = format!(
                        "the receiver acknowledged record {seq}, but only records before {} were sent",
                        self.next_seq
                    );
                    return Err(self.end(SessionEnd::retry(reason)));
                }
                self.acked = self.acked.max(seq);
                Ok(SenderEvent::Acked {
                    seq,
                    released: self.release(seq),
                })
            }
            (SenderState::Open, Frame::Applied { seq }) => {
                self.applied = self.applied.max(seq);
                Ok(SenderEvent::Applied { seq })
            }
            (SenderState::Open, Frame::Credit { credit_bytes }) => {
                self.credit = credit_bytes;
                Ok(SenderEvent::Credit { credit_bytes })
            }
            (state, other) => {
                let reason = match state {
                    SenderState::AwaitingAccept { .. } => {
                        format!("expected Accept, got {:?}", other.frame_type())
                    }
                    _ => format!(
                        "unexpected {:?} frame from the receiver",
                        other.frame_type()
                    ),
                };
                Err(self.end(SessionEnd::retry(reason)))
            }
        }
    }

    /// Records that the driver sent `first_seq..=last_seq` as one frame of `bytes`
    /// (what counts against credit), remembered as `item` until acknowledged.
    pub fn on_send(&mut self, first_seq: u64, last_seq: u64, bytes: u64, item: T) {
        debug_assert_eq!(
            first_seq, self.next_seq,
            "records are sent in order, without gaps"
        );
        debug_assert!(last_seq >= first_seq);
        self.next_seq = last_seq + 1;
        self.in_flight_bytes += bytes;
        self.in_flight.push_back(InFlight {
            last_seq,
            bytes,
            item,
        });
    }

    /// The session ended (`end` says how) at `now`: when to open the next one, if ever.
    pub fn session_ended(&mut self, end: &SessionEnd, now: Instant) -> Reconnect {
        self.state = SenderState::Idle;
        if self.accepted {
            // The receiver answered: whatever fails next is a new failure.
            self.accepted = false;
            self.failing_since = None;
            self.backoff = self.config.backoff_initial;
        }
        match end.recovery {
            Recovery::GiveUp => Reconnect::GiveUp(end.reason.clone()),
            Recovery::ResendNow => Reconnect::After(Duration::ZERO),
            Recovery::Retry => {
                let since = *self.failing_since.get_or_insert(now);
                if let Some(limit) = self.config.give_up_after {
                    if now.duration_since(since) > limit {
                        return Reconnect::GiveUp(format!(
                            "gave up reconnecting after {limit:?}: {}",
                            end.reason
                        ));
                    }
                }
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(self.config.backoff_max);
                Reconnect::After(delay)
            }
        }
    }

    // --- outputs and getters ----------------------------------------------------------

    /// When [`Self::handle_timeout`] must be called (while waiting for `Accept`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            SenderState::AwaitingAccept { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// The largest zstd window (log2) the receiver decodes in the current session; 0
    /// when it granted none (batches then use LZ4 or nothing).
    pub fn zstd_window_log(&self) -> u8 {
        self.zstd_window_log
    }

    /// Bytes that may still be sent before the credit is used up (0 outside a session).
    pub fn credit_available(&self) -> u64 {
        match self.state {
            SenderState::Open => self.credit.saturating_sub(self.in_flight_bytes),
            _ => 0,
        }
    }

    /// Whether a frame of `bytes` may be sent now: it fits in the credit left, or
    /// nothing is in flight (a frame larger than the whole credit goes alone); never
    /// while the credit is 0 (withheld). So a stream never has more than
    /// `max(credit, one frame)` in flight, and the receiver's memory for many streams
    /// is bounded by their credits.
    pub fn may_send(&self, bytes: u64) -> bool {
        match self.state {
            SenderState::Open => {
                self.credit > 0
                    && (self.in_flight_bytes == 0 || self.in_flight_bytes + bytes <= self.credit)
            }
            _ => false,
        }
    }

    /// The next sequence number to send.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest sequence number the receiver acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest sequence number reported applied at the end of the path.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Whether everything sent was acknowledged.
    pub fn all_acknowledged(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The items sent and not yet acknowledged, oldest first.
    pub fn unacked(&self) -> impl Iterator<Item = &T> {
        self.in_flight.iter().map(|f| &f.item)
    }

    /// Whether a session is open (accepted and not ended).
    pub fn is_open(&self) -> bool {
        self.state == SenderState::Open
    }

    // --- internals --------------------------------------------------------------------

    fn end(&mut self, end: SessionEnd) -> SessionEnd {
        self.state = SenderState::Idle;
        end
    }

    /// Forgets every in-flight item the receiver holds (`last_seq <= seq`).
    fn release(&mut self, seq: u64) -> Vec<T> {
        let mut released = Vec::new();
        while self.in_flight.front().is_some_and(|f| f.last_seq <= seq) {
            if let Some(f) = self.in_flight.pop_front() {
                self.in_flight_bytes -= f.bytes;
                released.push(f.item);
            }
        }
        released
    }

    fn accept(
        &mut self,
        position: SourcePosition,
        next_seq: u64,
        credit_bytes: u64,
    ) -> Result<SenderEvent<T>, SessionEnd> {
        let held = next_seq.saturating_sub(1);
        let moved = match self.moved_off_lost_relay.take() {
            Some((from, why)) if self.session_placement >= from => Some(why),
            kept => {
                self.moved_off_lost_relay = kept;
                None
            }
        };
        if held < self.acked {
            let resync = self.resync_before_accept.take().or_else(|| {
                moved.map(|why| {
                    let reason = format!(
                        "{why}: the new relay continues where the master target stands ({held}), before what was acknowledged ({})",
                        self.acked
                    );
                    (ResyncMode::Delta, reason)
                })
            });
            if let Some((mode, reason)) = resync {
                // The receiver says it lost what it acknowledged, and a resync replaces
                // it: number again from where it stands.
                self.state = SenderState::Open;
                self.accepted = true;
                self.credit = credit_bytes.max(1);
                self.acked = held;
                self.in_flight_bytes = 0;
                self.next_seq = next_seq;
                let lost = self.in_flight.drain(..).map(|f| f.item).collect();
                return Ok(SenderEvent::Renumbered {
                    next_seq,
                    lost,
                    mode,
                    reason,
                });
            }
            return Err(self.end(SessionEnd::give_up(format!(
                "INVARIANT VIOLATED: the receiver holds up to sequence {held}, but {} was acknowledged",
                self.acked
            ))));
        }
        if next_seq < position.resend_from && position.produced >= next_seq {
            return Err(self.end(SessionEnd::give_up(format!(
                "the receiver expects record {next_seq}, but the source can only send from {}: the stream needs resync",
                position.resend_from
            ))));
        }
        if held > position.produced && !position.receiver_may_lead {
            return Err(self.end(SessionEnd::give_up(format!(
                "the receiver already holds {held} records, more than this source produced ({}); \
                 start from a fresh master-target data directory or other VM names",
                position.produced
            ))));
        }
        self.state = SenderState::Open;
        self.accepted = true;
        self.credit = credit_bytes.max(1);
        self.acked = held;
        let released = self.release(held);
        match self.config.resend {
            Resend::Retained => {
                self.next_seq = self.in_flight.back().map_or(next_seq, |f| f.last_seq + 1);
            }
            Resend::FromSource => {
                self.in_flight.clear();
                self.in_flight_bytes = 0;
                self.next_seq = next_seq;
            }
        }
        Ok(SenderEvent::Accepted { next_seq, released })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::TagKind;

    fn id() -> StreamId {
        StreamId {
            vm: "vm1".into(),
            disk: 0,
        }
    }

    fn write(seq: u64, offset: u64) -> Record {
        Record::Write {
            seq,
            offset,
            data: Bytes::from(vec![seq as u8; 512]),
        }
    }

    fn open_receiver(next: u64) -> StreamReceiver {
        let now = Instant::now();
        let mut rx = StreamReceiver::new(ReceiverConfig::relay_facing(), Entitlement::any(), now);
        let hello = Frame::Hello {
            placement: 0,
            stream: id(),
            disk_size: 1 << 20,
        };
        assert_eq!(
            rx.handle_hello(Incoming::Frame(hello)).unwrap(),
            Some(Opening::Data {
                placement: 0,
                stream: id(),
                disk_size: 1 << 20
            })
        );
        rx.check_disk_size(1 << 20).unwrap();
        rx.accept(next, 1 << 20);
        rx
    }

    #[test]
    fn receiver_refuses_what_is_not_a_hello_and_unentitled_vms() {
        let now = Instant::now();
        let mut rx = StreamReceiver::new(
            ReceiverConfig::agent_facing(),
            Entitlement {
                all_vms: false,
                vms: vec!["vm2".into()],
            },
            now,
        );
        let r = rx
            .handle_hello(Incoming::Frame(Frame::Record(write(1, 0))))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::UnexpectedFrame);
        assert!(rx.is_closed());

        let mut rx = StreamReceiver::new(
            ReceiverConfig::agent_facing(),
            Entitlement {
                all_vms: false,
                vms: vec!["vm2".into()],
            },
            now,
        );
        let hello = Frame::Hello {
            placement: 0,
            stream: id(),
            disk_size: 4096,
        };
        assert_eq!(
            rx.handle_hello(Incoming::Frame(hello)).unwrap_err().code,
            ErrorCode::NotEntitled
        );
    }

    #[test]
    fn receiver_times_out_waiting_for_hello_and_checks_the_disk_size() {
        let now = Instant::now();
        let mut rx = StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
        assert_eq!(rx.poll_timeout(), Some(now + HELLO_TIMEOUT));
        assert!(rx.handle_timeout(now + Duration::from_secs(9)).is_none());
        let r = rx.handle_timeout(now + HELLO_TIMEOUT).unwrap();
        assert_eq!(r.code, ErrorCode::TooSlow);
        assert!(r.message.contains("no Hello within 10 s"));

        let mut rx = StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
        let hello = Frame::Hello {
            placement: 0,
            stream: id(),
            disk_size: 4096,
        };
        rx.handle_hello(Incoming::Frame(hello)).unwrap();
        let r = rx.check_disk_size(8192).unwrap_err();
        assert_eq!(r.code, ErrorCode::DiskSizeMismatch);
        assert!(r.message.contains("8192") && r.message.contains("4096"));
    }

    #[test]
    fn receiver_refuses_a_placement_below_the_one_on_record() {
        let now = Instant::now();
        let open = |placement| {
            let mut rx =
                StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
            let hello = Frame::Hello {
                stream: id(),
                disk_size: 4096,
                placement,
            };
            let opening = rx.handle_hello(Incoming::Frame(hello)).unwrap();
            assert!(matches!(opening, Some(Opening::Data { placement: p, .. }) if p == placement));
            rx
        };
        // The current path, or a newer one (the driver records it): accepted.
        assert!(open(2).check_placement(2, 2).is_ok());
        assert!(open(3).check_placement(3, 2).is_ok());
        // Where the VM was before it moved: refused for good, naming both.
        let r = open(1).check_placement(1, 2).unwrap_err();
        assert_eq!(r.code, ErrorCode::StreamMoved);
        assert_eq!(r.code.recovery(), Recovery::GiveUp);
        assert!(
            r.message.contains("placement 2 on record, Hello says 1"),
            "{}",
            r.message
        );
    }

    #[test]
    fn receiver_skips_duplicates_refuses_gaps_and_out_of_bounds() {
        let mut rx = open_receiver(3);
        assert_eq!(
            rx.handle(Incoming::Frame(Frame::Record(write(2, 0)))),
            Ok(Delivery::Duplicate {
                records: 1,
                batch: false
            })
        );
        assert_eq!(
            rx.handle(Incoming::Frame(Frame::Record(write(3, 0)))),
            Ok(Delivery::Record(write(3, 0)))
        );
        let r = rx
            .handle(Incoming::Frame(Frame::Record(write(5, 0))))
            .unwrap_err();
        assert_eq!((r.code, r.last_valid), (ErrorCode::SequenceGap, 3));
        assert!(rx.is_closed());

        let mut rx = open_receiver(1);
        let r = rx
            .handle(Incoming::Frame(Frame::Record(write(1, 1 << 20))))
            .unwrap_err();
        assert_eq!((r.code, r.last_valid), (ErrorCode::OutOfBounds, 0));
        let mut rx = open_receiver(1);
        let r = rx
            .handle(Incoming::Frame(Frame::Record(write(1, 100))))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::Misaligned);
    }

    #[test]
    fn agent_side_refuses_batches_and_unexpected_frames() {
        let now = Instant::now();
        let mut rx = StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
        rx.handle_hello(Incoming::Frame(Frame::Hello {
            placement: 0,
            stream: id(),
            disk_size: 4096,
        }))
        .unwrap();
        rx.accept(1, 1 << 20);
        let r = rx
            .handle(Incoming::Frame(Frame::Batch(Bytes::from_static(b"x"))))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::UnexpectedFrame);
        assert!(r.message.contains("Batch frame in the middle of a stream"));
    }

    #[test]
    fn hash_streams_take_only_requests_for_nodes_on_the_disk() {
        let now = Instant::now();
        let mut rx = StreamReceiver::new(ReceiverConfig::relay_facing(), Entitlement::any(), now);
        let hello = Frame::HashHello {
            stream: id(),
            disk_size: 3 << 20,
            key: [1; 32],
        };
        assert!(matches!(
            rx.handle_hello(Incoming::Frame(hello)),
            Ok(Some(Opening::Hashes { disk_size, .. })) if disk_size == 3 << 20
        ));
        rx.check_disk_size(3 << 20).unwrap();
        let req = |level, first, count| {
            Incoming::Frame(Frame::HashRequest {
                level,
                first,
                count,
            })
        };
        assert_eq!(
            rx.handle_hash_request(req(0, 0, 3)),
            Ok(HashInput::Request {
                level: 0,
                first: 0,
                count: 3
            })
        );
        assert_eq!(
            rx.handle_hash_request(req(2, 767, 2)).unwrap_err().code,
            ErrorCode::OutOfBounds,
            "node 768 of level 2 is beyond a 3 MiB disk"
        );
        let mut rx = StreamReceiver::new(ReceiverConfig::relay_facing(), Entitlement::any(), now);
        rx.handle_hello(Incoming::Frame(Frame::HashHello {
            stream: id(),
            disk_size: 4096,
            key: [0; 32],
        }))
        .unwrap();
        let r = rx
            .handle_hash_request(Incoming::Frame(Frame::Record(write(1, 0))))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::UnexpectedFrame);
        // Entitlement applies to hash streams too.
        let mut rx = StreamReceiver::new(
            ReceiverConfig::agent_facing(),
            Entitlement {
                all_vms: false,
                vms: vec!["other".into()],
            },
            now,
        );
        let r = rx
            .handle_hello(Incoming::Frame(Frame::HashHello {
                stream: id(),
                disk_size: 4096,
                key: [0; 32],
            }))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::NotEntitled);
    }

    #[test]
    fn control_streams_open_only_at_the_master_target() {
        let now = Instant::now();
        let request = bytes::Bytes::from_static(br#"{"op":"status"}"#);
        let mut rx = StreamReceiver::new(ReceiverConfig::relay_facing(), Entitlement::any(), now);
        assert_eq!(
            rx.handle_hello(Incoming::Frame(Frame::Control {
                request: request.clone()
            })),
            Ok(Some(Opening::Control {
                request: request.clone()
            }))
        );
        // One request per stream: nothing more is taken.
        assert!(rx
            .handle_hello(Incoming::Frame(Frame::Control {
                request: request.clone()
            }))
            .is_err());
        // An agent may not send the controller's requests (the relay refuses them).
        let mut rx = StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
        let r = rx
            .handle_hello(Incoming::Frame(Frame::Control { request }))
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::UnexpectedFrame);
    }

    fn mark(seq: u64, id: u64, phase: crate::frame::ResyncPhase) -> Record {
        Record::Resync {
            seq,
            mark: crate::frame::ResyncMark {
                id,
                phase,
                mode: crate::frame::ResyncMode::Delta,
                next_region: 0,
                regions: 1,
                compared_bytes: 0,
                sent_bytes: 0,
            },
        }
    }

    #[test]
    fn resync_marks_must_belong_to_the_resync_in_progress() {
        use crate::frame::ResyncPhase::{Begin, End, Progress};
        let opened = |current| {
            let now = Instant::now();
            let mut rx =
                StreamReceiver::new(ReceiverConfig::relay_facing(), Entitlement::any(), now);
            rx.handle_hello(Incoming::Frame(Frame::Hello {
                placement: 0,
                stream: id(),
                disk_size: 1 << 20,
            }))
            .unwrap();
            rx.track_resync(current);
            rx.accept(1, 1 << 20);
            rx
        };
        let rec = |r: Record| Incoming::Frame(Frame::Record(r));
        // Resync data for a disk that is not resyncing.
        let mut rx = opened(None);
        let r = rx.handle(rec(mark(1, 7, Progress))).unwrap_err();
        assert_eq!(r.code, ErrorCode::ResyncMismatch);
        assert!(r.message.contains("not resyncing"), "{}", r.message);
        // Begin, progress, end of one resync; then its marks are refused.
        let mut rx = opened(None);
        for (seq, phase) in [(1, Begin), (2, Progress), (3, End)] {
            assert!(matches!(
                rx.handle(rec(mark(seq, 7, phase))),
                Ok(Delivery::Record(_))
            ));
        }
        assert_eq!(
            rx.handle(rec(mark(4, 7, End))).unwrap_err().code,
            ErrorCode::ResyncMismatch
        );
        // A resumed resync continues with its id; another id is refused.
        let mut rx = opened(Some(9));
        assert!(rx.handle(rec(mark(1, 9, Progress))).is_ok());
        assert_eq!(
            rx.handle(rec(mark(2, 8, Progress))).unwrap_err().code,
            ErrorCode::ResyncMismatch
        );
        // The relay does not check (it passes marks through).
        let now = Instant::now();
        let mut rx = StreamReceiver::new(ReceiverConfig::agent_facing(), Entitlement::any(), now);
        rx.handle_hello(Incoming::Frame(Frame::Hello {
            placement: 0,
            stream: id(),
            disk_size: 1 << 20,
        }))
        .unwrap();
        rx.accept(1, 1 << 20);
        assert!(rx.handle(rec(mark(1, 7, End))).is_ok());
    }

    fn batch(first: u64, last: u64, items: Vec<wan::Item>) -> Frame {
        let mut out = bytes::BytesMut::new();
        wan::encode_batch(
            &wan::Batch {
                first_seq: first,
                last_seq: last,
                items,
            },
            wan::Compressor::None,
            &mut Vec::new(),
            &mut out,
        )
        .unwrap();
        Frame::Batch(out.freeze())
    }

    #[test]
    fn batches_continue_the_span_and_resolve_references() {
        let mut rx = open_receiver(4);
        // Entirely held already.
        let dup = batch(1, 3, vec![wan::Item::Plain(write(3, 0))]);
        assert_eq!(
            rx.handle(Incoming::Frame(dup)),
            Ok(Delivery::Duplicate {
                records: 1,
                batch: true
            })
        );
        // Overlapping: items before 4 are skipped; a reference resolves.
        let h = [7u8; 32];
        let frame = batch(
            2,
            6,
            vec![
                wan::Item::Plain(write(3, 0)),
                wan::Item::Write {
                    seq: 5,
                    offset: 4096,
                    len: 4096,
                    blocks: vec![wan::Block::Ref(h)],
                },
                wan::Item::Plain(Record::Tag {
                    seq: 6,
                    id: 1,
                    kind: TagKind::Crash,
                    members: 1,
                    group: "g".into(),
                }),
            ],
        );
        let Ok(Delivery::Batch(b)) = rx.handle(Incoming::Frame(frame.clone())) else {
            panic!("expected a batch")
        };
        assert_eq!(rx.expected(), 7);
        assert!(b.has_references());
        let resolved = b
            .clone()
            .resolve(|hash, len| (*hash == h).then(|| Bytes::from(vec![1; len])))
            .unwrap();
        assert_eq!(
            resolved.iter().map(|r| r.record.seq()).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(resolved[0].literal_blocks, vec![false]);
        let r = b.resolve(|_, _| None).unwrap_err();
        assert_eq!((r.code, r.last_valid), (ErrorCode::UnknownReference, 3));
        // Only new items count: a reference in a record already held needs no lookup.
        let held = batch(
            6,
            8,
            vec![
                wan::Item::Write {
                    seq: 6,
                    offset: 0,
                    len: 4096,
                    blocks: vec![wan::Block::Ref(h)],
                },
                wan::Item::Plain(write(8, 0)),
            ],
        );
        let Ok(Delivery::Batch(b)) = rx.handle(Incoming::Frame(held)) else {
            panic!("expected a batch overlapping what is held")
        };
        assert!(!b.has_references());
        assert_eq!(rx.expected(), 9);
        // A batch starting after the expected record is a gap.
        let gap = batch(11, 11, vec![wan::Item::Plain(write(11, 0))]);
        assert_eq!(
            rx.handle(Incoming::Frame(gap)).unwrap_err().code,
            ErrorCode::SequenceGap
        );
    }

    fn sender(resend: Resend) -> StreamSender<u64> {
        StreamSender::new(SenderConfig {
            resend,
            ..SenderConfig::agent(Duration::from_secs(5))
        })
    }

    fn accept(
        s: &mut StreamSender<u64>,
        next: u64,
        position: SourcePosition,
    ) -> Result<SenderEvent<u64>, SessionEnd> {
        let now = Instant::now();
        s.start(now, id(), 4096, 0, position);
        s.handle(Incoming::Frame(Frame::Accept {
            next_seq: next,
            credit_bytes: 100,
            zstd_window_log: 0,
        }))
    }

    fn produced(n: u64) -> SourcePosition {
        SourcePosition {
            resend_from: 1,
            produced: n,
            receiver_may_lead: false,
        }
    }

    #[test]
    fn sender_tracks_credit_acks_and_resends_what_was_retained() {
        let mut s = sender(Resend::Retained);
        assert_eq!(s.credit_available(), 0, "nothing before Accept");
        assert!(matches!(
            accept(&mut s, 1, produced(0)),
            Ok(SenderEvent::Accepted { next_seq: 1, .. })
        ));
        assert_eq!(s.credit_available(), 100);
        for seq in 1..=4 {
            s.on_send(seq, seq, 20, seq);
        }
        assert_eq!(s.credit_available(), 20);
        assert_eq!(
            s.handle(Incoming::Frame(Frame::Ack { seq: 2 })),
            Ok(SenderEvent::Acked {
                seq: 2,
                released: vec![1, 2]
            })
        );
        assert_eq!(s.credit_available(), 60);
        // The connection breaks; the next receiver holds up to 3.
        let end = s.handle(Incoming::Broken("reset".into())).unwrap_err();
        assert_eq!(end.recovery, Recovery::Retry);
        assert_eq!(
            s.session_ended(&end, Instant::now()),
            Reconnect::After(Duration::from_millis(100))
        );
        assert_eq!(
            accept(&mut s, 4, produced(4)),
            Ok(SenderEvent::Accepted {
                next_seq: 4,
                released: vec![3]
            })
        );
        assert_eq!(s.unacked().copied().collect::<Vec<_>>(), vec![4], "resent");
        assert_eq!(s.next_seq(), 5);
        assert_eq!(s.acked(), 3);
    }

    #[test]
    fn a_frame_goes_when_it_fits_in_the_credit_left_or_goes_alone() {
        let mut s = sender(Resend::Retained);
        assert!(!s.may_send(1), "nothing before Accept");
        accept(&mut s, 1, produced(0)).unwrap();
        // Credit 100: a frame larger than the whole credit may go, but only alone.
        assert!(s.may_send(150));
        s.on_send(1, 1, 150, 1);
        assert!(!s.may_send(1), "over the credit: nothing more until an ack");
        s.handle(Incoming::Frame(Frame::Ack { seq: 1 })).unwrap();
        s.on_send(2, 2, 60, 2);
        assert!(s.may_send(40), "fits exactly");
        assert!(!s.may_send(41), "would overrun the credit");
        assert_eq!(s.credit_available(), 40);
        s.handle(Incoming::Frame(Frame::Ack { seq: 2 })).unwrap();
        s.handle(Incoming::Frame(Frame::Credit { credit_bytes: 0 }))
            .unwrap();
        assert!(!s.may_send(1), "credit withheld: nothing goes, even alone");
    }

    #[test]
    fn sender_from_source_restarts_at_the_receivers_position() {
        let mut s = sender(Resend::FromSource);
        accept(&mut s, 10, SourcePosition::empty()).unwrap();
        s.on_send(10, 14, 50, 0);
        s.on_send(15, 15, 10, 1);
        let end = s.handle(Incoming::Finished).unwrap_err();
        s.session_ended(&end, Instant::now());
        assert!(matches!(
            accept(&mut s, 12, SourcePosition::empty()),
            Ok(SenderEvent::Accepted { next_seq: 12, .. })
        ));
        assert_eq!(s.in_flight_bytes(), 0);
        assert_eq!(s.next_seq(), 12);
    }

    #[test]
    fn sender_refuses_receivers_that_lost_or_invent_records() {
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        for seq in 1..=3 {
            s.on_send(seq, seq, 1, seq);
        }
        s.handle(Incoming::Frame(Frame::Ack { seq: 3 })).unwrap();
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        let end = accept(&mut s, 2, produced(3)).unwrap_err();
        assert_eq!(end.recovery, Recovery::GiveUp);
        assert!(end.reason.contains("INVARIANT VIOLATED"), "{end}");

        let mut s = sender(Resend::Retained);
        let end = accept(&mut s, 9, produced(5)).unwrap_err();
        assert_eq!(end.recovery, Recovery::GiveUp);
        assert!(
            end.reason.contains("more than this source produced"),
            "{end}"
        );

        // A relay's cache that starts after what the master target expects.
        let mut s = sender(Resend::FromSource);
        let end = accept(
            &mut s,
            5,
            SourcePosition {
                resend_from: 8,
                produced: 9,
                receiver_may_lead: true,
            },
        )
        .unwrap_err();
        assert!(end.reason.contains("needs resync"), "{end}");
        // ...is fine when the cache holds nothing from there on.
        let mut s = sender(Resend::FromSource);
        assert!(accept(
            &mut s,
            20,
            SourcePosition {
                resend_from: 8,
                produced: 9,
                receiver_may_lead: true,
            },
        )
        .is_ok());
    }

    #[test]
    fn sender_refusals_follow_one_rule_per_code() {
        for code in ErrorCode::KNOWN {
            let mut s = sender(Resend::Retained);
            accept(&mut s, 1, produced(0)).unwrap();
            let end = s
                .handle(Incoming::Frame(Frame::error(code, "why")))
                .unwrap_err();
            assert_eq!(end.recovery, code.recovery());
            assert!(end.reason.contains("why"));
        }
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        let end = s
            .handle(Incoming::Frame(Frame::Ack { seq: 1 }))
            .unwrap_err();
        assert!(
            end.reason.contains("only records before 1 were sent"),
            "{end}"
        );
    }

    #[test]
    fn a_receiver_that_lost_records_renumbers_the_stream_only_with_a_resync() {
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        for seq in 1..=6 {
            s.on_send(seq, seq, 1, seq);
        }
        s.handle(Incoming::Frame(Frame::Ack { seq: 4 })).unwrap();
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        // The relay lost 3 and 4 (acknowledged) and asks for a resync first.
        s.start(Instant::now(), id(), 4096, 0, produced(6));
        assert!(matches!(
            s.handle(Incoming::Frame(Frame::ResyncRequest {
                mode: ResyncMode::Delta,
                reason: "cache corruption".into()
            })),
            Ok(SenderEvent::ResyncRequested { .. })
        ));
        assert_eq!(
            s.handle(Incoming::Frame(Frame::Accept {
                next_seq: 3,
                credit_bytes: 100,
                zstd_window_log: 0,
            })),
            Ok(SenderEvent::Renumbered {
                next_seq: 3,
                lost: vec![5, 6],
                mode: ResyncMode::Delta,
                reason: "cache corruption".into()
            })
        );
        assert_eq!((s.next_seq(), s.acked(), s.in_flight_bytes()), (3, 2, 0));
        assert!(s.is_open());
        // A move off a lost relay: the new relay stands where the master target does,
        // behind what the old one acknowledged; that renumbers with a delta resync.
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        for seq in 1..=6 {
            s.on_send(seq, seq, 1, seq);
        }
        s.handle(Incoming::Frame(Frame::Ack { seq: 4 })).unwrap();
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        s.moved_off_lost_relay(1, "relay-a is gone");
        // A late Accept from the old relay (placement 0) is judged as before.
        s.start(Instant::now(), id(), 4096, 0, produced(6));
        assert!(s
            .handle(Incoming::Frame(Frame::Accept {
                next_seq: 2,
                credit_bytes: 100,
                zstd_window_log: 0,
            }))
            .unwrap_err()
            .reason
            .contains("INVARIANT VIOLATED"));
        let end = SessionEnd::retry("old relay");
        s.session_ended(&end, Instant::now());
        s.start(Instant::now(), id(), 4096, 1, produced(6));
        match s.handle(Incoming::Frame(Frame::Accept {
            next_seq: 2,
            credit_bytes: 100,
            zstd_window_log: 0,
        })) {
            Ok(SenderEvent::Renumbered {
                next_seq: 2,
                lost,
                mode: ResyncMode::Delta,
                reason,
            }) => {
                assert_eq!(lost, vec![5, 6]);
                assert!(reason.starts_with("relay-a is gone"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((s.next_seq(), s.acked()), (2, 1));
        // The flag lasts one accepted session: if the old relay had drained, the new
        // one's Accept is ordinary, and later a receiver behind is a violation again.
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        s.on_send(1, 2, 1, 1);
        s.handle(Incoming::Frame(Frame::Ack { seq: 2 })).unwrap();
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        s.moved_off_lost_relay(0, "drain timed out");
        assert!(matches!(
            accept(&mut s, 3, produced(2)),
            Ok(SenderEvent::Accepted { next_seq: 3, .. })
        ));
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        let end = accept(&mut s, 1, produced(2)).unwrap_err();
        assert!(end.reason.contains("INVARIANT VIOLATED"), "{end}");
        // Without the request, the same answer is a broken promise.
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        s.on_send(1, 1, 1, 1);
        s.handle(Incoming::Frame(Frame::Ack { seq: 1 })).unwrap();
        let end = s.handle(Incoming::Broken("x".into())).unwrap_err();
        s.session_ended(&end, Instant::now());
        let end = accept(&mut s, 1, produced(1)).unwrap_err();
        assert!(end.reason.contains("INVARIANT VIOLATED"), "{end}");
        // Mid-stream, a request is only news.
        let mut s = sender(Resend::Retained);
        accept(&mut s, 1, produced(0)).unwrap();
        assert!(matches!(
            s.handle(Incoming::Frame(Frame::ResyncRequest {
                mode: ResyncMode::Full,
                reason: "operator".into()
            })),
            Ok(SenderEvent::ResyncRequested {
                mode: ResyncMode::Full,
                ..
            })
        ));
        assert!(s.is_open());
    }

    #[test]
    fn sender_backs_off_resets_after_an_accept_and_gives_up() {
        let mut s = sender(Resend::Retained);
        let t0 = Instant::now();
        s.start(t0, id(), 4096, 0, produced(0));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        assert!(s.handle_timeout(t0 + Duration::from_secs(1)).is_none());
        let end = s.handle_timeout(t0 + Duration::from_secs(15)).unwrap();
        let delays: Vec<Reconnect> = (0..5)
            .map(|i| s.session_ended(&end, t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000].map(|ms| Reconnect::After(Duration::from_millis(ms)))
        );
        assert!(matches!(
            s.session_ended(&end, t0 + Duration::from_secs(6)),
            Reconnect::GiveUp(_)
        ));
        // An accepted session starts the backoff and the give-up clock over.
        accept(&mut s, 1, produced(0)).unwrap();
        let end = s.handle(Incoming::Finished).unwrap_err();
        assert_eq!(
            s.session_ended(&end, t0 + Duration::from_secs(60)),
            Reconnect::After(Duration::from_millis(100))
        );
        // UnknownReference: resend at once.
        let end = SessionEnd::refused(ErrorCode::UnknownReference, "lost");
        assert_eq!(
            s.session_ended(&end, t0 + Duration::from_secs(60)),
            Reconnect::After(Duration::ZERO)
        );
    }
}
