//! Frames over a QUIC stream: the async shell around the sans-IO codec.
//!
//! [`FrameReader`] reads from a `quinn::RecvStream` into a buffer and decodes whole
//! frames; it never holds more than one frame beyond what it has returned plus one read
//! chunk, so a peer cannot make it buffer more than [`fbr_protocol::MAX_FRAME_PAYLOAD`].
//! [`FrameWriter`] encodes and writes.

use bytes::BytesMut;
use fbr_protocol::{decode_frame, encode_frame, DecodeError, ErrorCode, Frame};
use tokio::io::AsyncReadExt;

/// How much to ask the stream for in one read.
const READ_CHUNK: usize = 256 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended in the middle of a frame ({0} bytes left over)")]
    Truncated(usize),
    #[error("stream: {0}")]
    Stream(#[from] std::io::Error),
}

impl ReadError {
    /// The wire code a receiver answers this failure with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadError::Decode(d) => d.code(),
            ReadError::Truncated(_) => ErrorCode::MalformedFrame,
            ReadError::Stream(_) => ErrorCode::Internal,
        }
    }
}

/// Decodes frames from one QUIC receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly between
    /// frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.recv.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buf.len()))
                };
            }
        }
    }

    /// A frame already buffered, without waiting for the network (for batching).
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, ReadError> {
        Ok(decode_frame(&mut self.buf)?)
    }

    /// Stops reading: the peer is told with a QUIC `STOP_SENDING` carrying `code`.
    pub fn stop(&mut self, code: u16) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code as u32));
    }
}

/// Encodes frames onto one QUIC send stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    buf: BytesMut,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
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
    pub async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.send.write_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Pushes and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), quinn::WriteError> {
        self.push(frame);
        self.flush().await
    }

    /// Sends an `Error` frame and finishes the stream: the polite way to refuse.
    pub async fn refuse(&mut self, frame: &Frame) {
        let _ = self.send(frame).await;
        let _ = self.send.finish();
    }

    /// Finishes the stream (no more frames).
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
