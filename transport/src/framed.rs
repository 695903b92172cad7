//! Frames over a byte stream: the async shell around the sans-IO codec.
//!
//! [`FrameReader`] reads from any `AsyncRead` (a `quinn::RecvStream` in the daemons, an
//! in-memory pipe in tests) and decodes whole frames. What a stream holds is bounded by
//! what it is receiving, so that a thousand streams on one relay hold little:
//! - Small frames arrive through a read buffer that starts at [`MIN_READ`], doubles
//!   while reads come back full (up to [`READ_CHUNK`]) and halves while they come back
//!   nearly empty; a stream that sends a byte and stops holds 4 KiB. Each small frame
//!   is copied out of it at its own size, so the buffer is never shared with frames
//!   the relay still holds (a 4 KiB record kept for the cache does not pin a 64 KiB
//!   read buffer) and its room is reused.
//! - A frame larger than the read buffer gets a buffer of its own, read into directly,
//!   and is returned without a copy. The buffer grows with what arrived (doubling, at
//!   least by [`READ_CHUNK`], and exactly to the frame's size at the end), not to the
//!   size the header announces (a thousand streams each in the middle of a record
//!   held 170 MiB of such buffers, about 30 MiB of it not reached by the data yet,
//!   and a peer could make a stream allocate a whole frame by sending its header). A
//!   reader never holds more than one frame beyond what it returned, plus one small
//!   read, so a peer cannot make it buffer more than
//!   [`fbr_protocol::MAX_FRAME_PAYLOAD`], and a header alone costs it nothing.
//!
//! With a frame timeout ([`FrameReader::with_frame_timeout`]) a frame begun must be
//! complete within it, or the read fails as [`ErrorCode::TooSlow`]: a peer trickling a
//! frame at a byte a second does not hold a stream forever. [`FrameReader::receive`]
//! hands the stream machines ([`fbr_protocol::stream`]) what they take: an
//! [`Incoming`]. [`FrameWriter`] encodes and writes through [`ChunkWrite`], which QUIC
//! implements without copying.

use std::future::Future;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fbr_protocol::stream::{Incoming, Opening, Refusal, StreamReceiver};
use fbr_protocol::{
    decode_frame, encode_frame, frame_len, DecodeError, ErrorCode, Frame, StreamId,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most a busy stream asks for in one read into its read buffer (frames larger than
/// the buffer are read into their own).
pub const READ_CHUNK: usize = 64 * 1024;
/// What a new (or quiet) stream asks for in one read; doubled each time a read brings at
/// least half of what was asked, halved each time one brings less than an eighth.
pub const MIN_READ: usize = 4 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended in the middle of a frame ({0} bytes left over)")]
    Truncated(usize),
    #[error("stream: {0}")]
    Stream(#[from] std::io::Error),
    #[error("a frame begun {seconds} s ago is still incomplete ({have} bytes so far): the sender is too slow")]
    TooSlow { have: usize, seconds: u64 },
}

impl ReadError {
    /// The wire code a receiver answers this failure with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadError::Decode(d) => d.code(),
            ReadError::Truncated(_) => ErrorCode::MalformedFrame,
            ReadError::Stream(_) => ErrorCode::Internal,
            ReadError::TooSlow { .. } => ErrorCode::TooSlow,
        }
    }
}

/// Decodes frames from one receive stream.
#[derive(Debug)]
pub struct FrameReader<R = quinn::RecvStream> {
    recv: R,
    /// Bytes read and not yet returned: the beginning of the next frame or frames.
    /// Never shared: small frames are copied out of it.
    buf: BytesMut,
    /// The frame being read when it is larger than `buf`: its bytes so far, in a
    /// buffer that grows towards its length (header included, the second field) as
    /// reads fill it.
    large: Option<(BytesMut, usize)>,
    /// How much a read into `buf` asks for: [`MIN_READ`] to [`READ_CHUNK`], following
    /// what reads bring.
    read_size: usize,
    /// How long a frame may take to arrive once begun; `None`: unlimited.
    frame_timeout: Option<std::time::Duration>,
    /// When the bytes of the incomplete frame began to arrive.
    frame_began: Option<Instant>,
}

impl<R: AsyncRead + Unpin + Send> FrameReader<R> {
    pub fn new(recv: R) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            large: None,
            read_size: MIN_READ,
            frame_timeout: None,
            frame_began: None,
        }
    }

    /// Fails a read with [`ReadError::TooSlow`] when a frame is not complete within
    /// `timeout` of its first bytes. Measured in wall time, which is fair even while the
    /// owner is not reading: a whole frame fits in a stream's QUIC receive window, so an
    /// honest sender's frame is in the stream's buffer by then.
    pub fn with_frame_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.frame_timeout = timeout;
        self
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly between
    /// frames. Cancel-safe: dropping the future loses no bytes.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                // What is left over is the next frame's beginning, arrived by now.
                self.frame_began = (!self.buf.is_empty()).then(Instant::now);
                return Ok(Some(frame));
            }
            let partial = self.large.is_some() || !self.buf.is_empty();
            if partial && self.frame_began.is_none() {
                self.frame_began = Some(Instant::now());
            }
            let into_buf = self.large.is_none();
            if into_buf && self.buf.capacity() - self.buf.len() < self.read_size / 4 {
                self.buf.reserve(self.read_size);
            }
            // A large frame's reads stop at its end: what follows it is the next frame's.
            let mut target = match self.large.as_mut() {
                Some((large, total)) => {
                    let rest = *total - large.len();
                    grow_towards(large, *total);
                    bytes::BufMut::limit(large, rest)
                }
                None => bytes::BufMut::limit(&mut self.buf, usize::MAX),
            };
            let read = self.recv.read_buf(&mut target);
            let n = match (self.frame_timeout, self.frame_began) {
                (Some(limit), Some(began)) => {
                    match tokio::time::timeout_at((began + limit).into(), read).await {
                        Ok(n) => n?,
                        Err(_) => {
                            return Err(ReadError::TooSlow {
                                have: self.buffered(),
                                seconds: limit.as_secs(),
                            })
                        }
                    }
                }
                _ => read.await?,
            };
            if n == 0 {
                return match self.buffered() {
                    0 => Ok(None),
                    left => Err(ReadError::Truncated(left)),
                };
            }
            if into_buf {
                self.follow_read(n);
            }
        }
    }

    /// Bytes of frames not yet returned.
    fn buffered(&self) -> usize {
        self.buf.len() + self.large.as_ref().map_or(0, |(large, _)| large.len())
    }

    /// A whole frame, if one is in: the large frame once complete (as read, no copy),
    /// or a small one copied out of the read buffer. Moves a frame that outgrows the
    /// read buffer into a buffer of its own.
    fn take_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some((large, total)) = &self.large {
            if large.len() < *total {
                return Ok(None);
            }
            let (mut whole, _) = self.large.take().unwrap_or_default();
            return decode_frame(&mut whole);
        }
        let Some(total) = frame_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() >= total {
            let mut one = BytesMut::with_capacity(total);
            one.extend_from_slice(&self.buf[..total]);
            bytes::Buf::advance(&mut self.buf, total);
            return decode_frame(&mut one);
        }
        if total > self.buf.capacity().max(self.read_size) {
            // All of `buf` is this frame's beginning (it holds less than the frame).
            let mut large = BytesMut::with_capacity(self.buf.len().max(READ_CHUNK).min(total));
            large.extend_from_slice(&self.buf);
            self.buf.clear();
            self.large = Some((large, total));
        }
        Ok(None)
    }

    /// Adapts the read size to a read into the buffer that brought `n` bytes, and lets
    /// a buffer grown for a busy spell go once the stream is quiet.
    fn follow_read(&mut self, n: usize) {
        if n >= self.read_size / 2 && self.read_size < READ_CHUNK {
            self.read_size *= 2;
        } else if n < self.read_size / 8 && self.read_size > MIN_READ {
            self.read_size /= 2;
            if self.buf.capacity() > 2 * self.read_size && self.buf.len() <= self.read_size {
                let mut smaller = BytesMut::with_capacity(self.read_size);
                smaller.extend_from_slice(&self.buf);
                self.buf = smaller;
            }
        }
    }

    /// The next input for a stream machine. Cancel-safe, like [`Self::next`].
    pub async fn receive(&mut self) -> Incoming {
        match self.next().await {
            Ok(Some(frame)) => Incoming::Frame(frame),
            Ok(None) => Incoming::Finished,
            Err(ReadError::Stream(e)) => Incoming::Broken(e.to_string()),
            Err(e) => Incoming::Malformed {
                code: e.code(),
                reason: e.to_string(),
            },
        }
    }

    /// Like [`Self::receive`], giving up at `deadline` (`None` when it passed): how
    /// drivers wait for a machine's [`poll_timeout`](fbr_protocol::stream::StreamReceiver::poll_timeout).
    pub async fn receive_until(&mut self, deadline: Option<Instant>) -> Option<Incoming> {
        match deadline {
            Some(at) => tokio::time::timeout_at(at.into(), self.receive())
                .await
                .ok(),
            None => Some(self.receive().await),
        }
    }

    /// Reads a new stream's first frame (`Hello` or `HashHello`) into `receiver`, until
    /// the receiver's deadline: `Ok(Some(opening))` once checked, `Ok(None)` if the peer
    /// went away, or the refusal to send.
    pub async fn receive_hello(
        &mut self,
        receiver: &mut StreamReceiver,
    ) -> Result<Option<Opening>, Refusal> {
        loop {
            match self.receive_until(receiver.poll_timeout()).await {
                Some(incoming) => return receiver.handle_hello(incoming),
                None => {
                    if let Some(refusal) = receiver.handle_timeout(Instant::now()) {
                        return Err(refusal);
                    }
                }
            }
        }
    }
}

/// Makes room in `large` (a frame's beginning) for the next read: when it is full, a
/// buffer twice as large (at least [`READ_CHUNK`] more, at most `total`), so a frame
/// costs what arrived of it, and growing copies it less than once in all.
fn grow_towards(large: &mut BytesMut, total: usize) {
    if large.capacity() > large.len() || large.len() >= total {
        return;
    }
    let len = large.len();
    let doubled = len + len.max(READ_CHUNK);
    // Within a read of the end: straight to the frame's size (no copy for a last sliver).
    let capacity = if doubled + READ_CHUNK >= total {
        total
    } else {
        doubled
    };
    let mut grown = BytesMut::with_capacity(capacity);
    grown.extend_from_slice(large);
    *large = grown;
}

/// Where a [`FrameWriter`] puts its bytes: whole chunks, then an end.
pub trait ChunkWrite: Send {
    /// Writes all of `chunk`.
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Ends the stream (no more bytes); the peer sees a clean finish.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

impl ChunkWrite for quinn::SendStream {
    async fn write_chunk(&mut self, chunk: Bytes) -> std::io::Result<()> {
        // Zero-copy: quinn keeps the chunk itself until it is acknowledged.
        quinn::SendStream::write_chunk(self, chunk)
            .await
            .map_err(std::io::Error::other)
    }

    async fn finish(&mut self) {
        let _ = quinn::SendStream::finish(self);
    }
}

/// Any tokio writer (an in-memory pipe in tests) as a [`ChunkWrite`]; it copies.
#[derive(Debug)]
pub struct IoWriter<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> ChunkWrite for IoWriter<W> {
    async fn write_chunk(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.0.write_all(&chunk).await
    }

    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Encodes frames onto one send stream.
#[derive(Debug)]
pub struct FrameWriter<W = quinn::SendStream> {
    send: W,
    buf: BytesMut,
}

impl<W: ChunkWrite> FrameWriter<W> {
    pub fn new(send: W) -> Self {
        FrameWriter {
            send,
            buf: BytesMut::new(),
        }
    }

    /// Queues a frame in the local buffer without writing (see [`Self::flush`]).
    pub fn push(&mut self, frame: &Frame) {
        encode_frame(frame, &mut self.buf);
    }

    /// Bytes pushed but not yet flushed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes everything pushed so far.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            // The whole buffer goes with the chunk: a chunk split off would share its
            // allocation with the buffer's spare room, so an idle stream would pin its
            // last batch's allocation after QUIC released the batch (a thousand
            // streams: a thousand batches' worth of memory held for nothing).
            let chunk = std::mem::take(&mut self.buf).freeze();
            self.send.write_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Pushes and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.push(frame);
        self.flush().await
    }

    /// Tells the sender why its stream is refused (an `Error` frame, logged with the
    /// stream when known) and finishes the stream: the polite way to refuse.
    pub async fn refuse(&mut self, refusal: &Refusal, stream: Option<&StreamId>) {
        match stream {
            Some(id) => tracing::warn!(stream = %id, "closing stream: {refusal}"),
            None => tracing::warn!("refusing stream: {refusal}"),
        }
        let _ = self.send(&refusal.frame()).await;
        self.send.finish().await;
    }

    /// Finishes the stream (no more frames).
    pub async fn finish(&mut self) {
        self.send.finish().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fbr_protocol::Record;

    #[tokio::test]
    async fn frames_cross_a_pipe_and_the_end_is_told_apart_from_a_torn_frame() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(IoWriter(a));
        let mut reader = FrameReader::new(b);
        let record = Frame::Record(Record::Write {
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![7; 512]),
        });
        let sent = record.clone();
        let task = tokio::spawn(async move {
            writer.send(&sent).await.unwrap();
            writer.finish().await;
        });
        assert_eq!(reader.receive().await, Incoming::Frame(record));
        assert_eq!(reader.receive().await, Incoming::Finished);
        task.await.unwrap();

        let (mut a, b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(b);
        a.write_all(b"FB\x01\x10\x20\0\0\0abc").await.unwrap();
        drop(a);
        assert!(matches!(
            reader.receive().await,
            Incoming::Malformed {
                code: ErrorCode::MalformedFrame,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn receive_until_gives_up_at_the_deadline() {
        let (_a, b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(b);
        let at = Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(reader.receive_until(Some(at)).await, None);
    }

    #[tokio::test]
    async fn a_trickled_frame_times_out_and_a_quiet_stream_holds_little() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut reader =
            FrameReader::new(b).with_frame_timeout(Some(std::time::Duration::from_millis(300)));
        // A whole frame is fine however long the stream was quiet before it.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let mut writer = FrameWriter::new(IoWriter(&mut a));
        writer
            .send(&Frame::Credit { credit_bytes: 1 })
            .await
            .unwrap();
        assert_eq!(
            reader.receive().await,
            Incoming::Frame(Frame::Credit { credit_bytes: 1 })
        );
        // The first byte of the next frame, then a byte now and then: too slow.
        let trickle = tokio::spawn(async move {
            for byte in b"FB\x01\x21\x08\0\0\0" {
                a.write_all(&[*byte]).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            a
        });
        let started = Instant::now();
        match reader.receive().await {
            Incoming::Malformed { code, reason } => {
                assert_eq!(code, ErrorCode::TooSlow, "{reason}");
                assert!(reason.contains("too slow"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // What it holds for the partial frame is one small read, not a read chunk.
        assert!(
            reader.buf.capacity() <= MIN_READ,
            "{}",
            reader.buf.capacity()
        );
        drop(trickle.await.unwrap());
    }

    /// Keeps the chunks written, as QUIC keeps them until acknowledged.
    struct KeptChunks(Vec<Bytes>);

    impl ChunkWrite for KeptChunks {
        async fn write_chunk(&mut self, chunk: Bytes) -> std::io::Result<()> {
            self.0.push(chunk);
            Ok(())
        }
        async fn finish(&mut self) {}
    }

    /// A large frame's buffer holds what arrived of it, not what its header announces:
    /// a stream in the middle of a big record (or a peer that sends a header and
    /// stops) costs the bytes received.
    #[tokio::test]
    async fn a_large_frame_begun_costs_what_arrived_of_it() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(b);
        let mut encoded = BytesMut::new();
        encode_frame(
            &Frame::Record(Record::Write {
                seq: 1,
                offset: 0,
                data: Bytes::from(vec![9; 1 << 20]),
            }),
            &mut encoded,
        );
        a.write_all(&encoded[..10_000]).await.unwrap();
        let read = tokio::time::timeout(std::time::Duration::from_millis(100), reader.next());
        assert!(read.await.is_err(), "the frame is incomplete");
        let (large, total) = reader.large.as_ref().unwrap();
        assert_eq!(*total, encoded.len());
        assert!(
            large.capacity() <= READ_CHUNK,
            "{} bytes held for 10,000 received",
            large.capacity()
        );
        // The rest arrives: the frame is whole, in a buffer of exactly its size.
        a.write_all(&encoded[10_000..]).await.unwrap();
        let Some(Frame::Record(Record::Write { data, .. })) = reader.next().await.unwrap() else {
            panic!("expected the record");
        };
        assert_eq!(data.len(), 1 << 20);
        assert!(data.iter().all(|&b| b == 9));
    }

    /// A chunk handed to QUIC owns its allocation alone: once QUIC lets it go, the
    /// memory is freed, not pinned by the writer's spare room for the next frames.
    #[tokio::test]
    async fn a_written_chunk_shares_its_allocation_with_nothing() {
        let mut writer = FrameWriter::new(KeptChunks(Vec::new()));
        for seq in 1..=3 {
            writer.push(&Frame::Record(Record::Write {
                seq,
                offset: 0,
                data: Bytes::from(vec![1; 100_000]),
            }));
            writer.push(&Frame::Ack { seq });
            writer.flush().await.unwrap();
        }
        let chunks = std::mem::take(&mut writer.send.0);
        assert_eq!(chunks.len(), 3);
        for chunk in chunks {
            assert!(
                chunk.is_unique(),
                "the writer still shares the chunk's allocation"
            );
        }
    }

    /// What a busy stream holds follows what it receives: small frames come out at
    /// their own size (not pinning the read buffer), large ones are read into a buffer
    /// that grows to exactly their size, and a read buffer grown for small frames
    /// shrinks back once they stop.
    #[tokio::test]
    async fn frames_hold_only_their_own_bytes() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(b);
        let mut writer = FrameWriter::new(IoWriter(a));
        let write = |seq: u64, len: usize| {
            Frame::Record(Record::Write {
                seq,
                offset: 0,
                data: Bytes::from(vec![seq as u8; len]),
            })
        };
        let task = tokio::spawn(async move {
            for seq in 1..=200 {
                writer.send(&write(seq, 1024)).await.unwrap();
            }
            for seq in 201..=204 {
                writer.send(&write(seq, 512 * 1024)).await.unwrap();
            }
            writer
                .send(&Frame::Credit { credit_bytes: 1 })
                .await
                .unwrap();
            writer
        });
        let mut kept = Vec::new();
        for seq in 1..=204u64 {
            let frame = reader.receive().await;
            let len = if seq <= 200 { 1024 } else { 512 * 1024 };
            assert_eq!(frame, Incoming::Frame(write(seq, len)));
            kept.push(frame);
        }
        assert!(
            reader.read_size > MIN_READ,
            "small frames were read in bulk"
        );
        for frame in &kept {
            let Incoming::Frame(Frame::Record(Record::Write { data, .. })) = frame else {
                unreachable!()
            };
            // The only reference to its allocation: neither the read buffer nor other
            // frames share it.
            assert!(data.is_unique());
        }
        assert!(reader.large.is_none());
        assert!(
            reader.buf.capacity() <= 2 * READ_CHUNK,
            "{}",
            reader.buf.capacity()
        );
        // Quiet again: small frames one at a time, and the buffer shrinks back.
        let mut writer = task.await.unwrap();
        assert_eq!(
            reader.receive().await,
            Incoming::Frame(Frame::Credit { credit_bytes: 1 })
        );
        for credit in 0..8 {
            writer
                .send(&Frame::Credit {
                    credit_bytes: credit,
                })
                .await
                .unwrap();
            assert_eq!(
                reader.receive().await,
                Incoming::Frame(Frame::Credit {
                    credit_bytes: credit
                })
            );
        }
        assert_eq!(reader.read_size, MIN_READ);
        assert!(
            reader.buf.capacity() <= 2 * MIN_READ,
            "{}",
            reader.buf.capacity()
        );
    }
}
