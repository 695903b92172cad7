//! zstd streaming contexts for WAN batches, and the memory they may take.
//!
//! A WAN stream (one QUIC stream of one disk, from `Hello` to its end) may carry its
//! batch bodies through one **zstd stream**: the relay's [`StreamCompressor`] and the
//! master target's [`StreamDecompressor`] keep the same history (the last `2^window_log`
//! bytes of every zstd-coded body of that stream, in order), so a block that repeats
//! anywhere in that history, at any alignment, costs a few bytes of match instead of
//! its 4 KiB. Each batch body is one *flushed* piece of a single endless zstd frame
//! (`ZSTD_e_flush`): it decodes completely on arrival, and the history carries over.
//!
//! ## Invariants
//! - One context per WAN stream, created at `Accept` and dropped with the stream. A
//!   reconnect or a resend opens a new stream, hence a new context on both ends: no
//!   history ever survives a break, so the two ends can never disagree about it.
//! - Every zstd-coded batch the relay encodes is sent, and the master target decodes
//!   every batch it receives, duplicates included, in order: both histories advance
//!   through the same bytes.
//! - The decoder refuses a frame whose window exceeds what the master target granted
//!   in `Accept` (`ZSTD_d_windowLogMax`), and never produces more than the batch header's
//!   `body_len`: a hostile peer cannot make it allocate beyond its share.
//! - Context memory is reserved from a [`CodecMemory`] pool before the context exists,
//!   and given back when it is dropped: the contexts of one process never take more
//!   than the pool's cap, whatever the number of streams.
//!
//! ## How the cap is shared
//! A new stream asks for the largest window (a power of two, at most
//! [`MAX_WINDOW_LOG`]) whose context costs no more than the **fair share**
//! `cap / streams` (the streams the process serves at that moment) *and* no more than
//! what remains unreserved. When the fair share is below the smallest context
//! ([`MIN_WINDOW_LOG`]), streams get that smallest one while the pool lasts; a stream
//! that finds the pool spent gets no zstd context, and its batches use LZ4 or nothing.
//! With the default 1 GiB: 8 streams get 128 MiB windows, 100 get 4 MiB each, and of
//! 1,000 about 480 get 128 KiB (level 3). The master target grants a window in `Accept`
//! from its own pool; the relay uses the smaller of that and its own reservation.
//! A reservation lasts as long as its stream: a stream reconnecting after others
//! joined gets the then-fair, smaller, share.

use std::sync::{Arc, Mutex};

use zstd_safe::{CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// The smallest window worth a context (128 KiB): below it, LZ4 does as well.
pub const MIN_WINDOW_LOG: u8 = 17;
/// The largest window a stream's context may have (128 MiB).
pub const MAX_WINDOW_LOG: u8 = 27;
/// Default cap on the memory of all zstd contexts of one process (1 GiB).
pub const DEFAULT_CODEC_MEMORY: u64 = 1 << 30;
/// The default compression level of relay contexts.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Bytes a compression context at `level` (1..=[`MAX_ZSTD_LEVEL`]) with this window is
/// reserved for: the window, the match tables of the level (measured: about 0.9, 1.6,
/// 3.4 and 11.3 MiB at levels 1, 3, 6 and 9), the long-distance matcher's table for
/// windows of 8 MiB and more (about 8 bytes per 128 window bytes) and the sequence
/// buffers, rounded up. `tests::estimates_cover_real_contexts` checks the figure against
/// what zstd reports for a context that has filled its window.
pub fn compressor_cost(window_log: u8, level: i32) -> u64 {
    let tables: u64 = match level {
        ..=3 => 2 << 20,
        4..=6 => 4 << 20,
        _ => 12 << 20,
    };
    let ldm = if window_log >= LDM_MIN_WINDOW_LOG {
        12u64 << (window_log - 7)
    } else {
        0
    };
    (1u64 << window_log) + tables + ldm
}

/// Bytes a decompression context with this window is reserved for: the window, two
/// blocks of buffering and the entropy tables (measured: window + 480 KiB; checked like
/// [`compressor_cost`]).
pub fn decompressor_cost(window_log: u8) -> u64 {
    (1u64 << window_log) + (640 << 10)
}

/// The highest level a relay context may use (higher levels cost far more CPU and
/// table memory for little more ratio on disk data).
pub const MAX_ZSTD_LEVEL: i32 = 9;

/// Windows from this size on also run zstd's long-distance matcher, which finds
/// repeats far back in a large window at little CPU cost.
const LDM_MIN_WINDOW_LOG: u8 = 23;

/// A process's budget for zstd contexts (relay: compressors; master target:
/// decompressors). Cheap to share (`Arc`).
#[derive(Debug)]
pub struct CodecMemory {
    cap: u64,
    reserved: Mutex<u64>,
}

/// Memory held for one stream's context; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<CodecMemory>,
    bytes: u64,
    window_log: u8,
}

impl Reservation {
    /// The window this reservation pays for.
    pub fn window_log(&self) -> u8 {
        self.window_log
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.pool.lock();
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

impl CodecMemory {
    pub fn new(cap: u64) -> Arc<Self> {
        Arc::new(CodecMemory {
            cap,
            reserved: Mutex::new(0),
        })
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes reserved by live contexts.
    pub fn reserved(&self) -> u64 {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a context for one of `streams` streams: the largest window at most
    /// `max_window_log` whose `cost` fits both the fair share (`cap / streams`) and what
    /// remains. `None` when not even [`MIN_WINDOW_LOG`] fits (the stream goes without).
    pub fn reserve(
        self: &Arc<Self>,
        streams: usize,
        max_window_log: u8,
        cost: impl Fn(u8) -> u64,
    ) -> Option<Reservation> {
        // A fair share too small for any context still buys the smallest one while the
        // pool lasts (first come), rather than leaving the whole pool unused.
        let share = (self.cap / streams.max(1) as u64).max(cost(MIN_WINDOW_LOG));
        let mut reserved = self.lock();
        let free = self.cap.saturating_sub(*reserved);
        let limit = share.min(free);
        let window_log = (MIN_WINDOW_LOG..=max_window_log.min(MAX_WINDOW_LOG))
            .rev()
            .find(|w| cost(*w) <= limit)?;
        let bytes = cost(window_log);
        *reserved += bytes;
        Some(Reservation {
            pool: self.clone(),
            bytes,
            window_log,
        })
    }
}

/// What went wrong in a zstd context (the library's own error name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zstd: {0}")]
pub struct CodecError(pub String);

fn zstd_error(code: usize) -> CodecError {
    CodecError(zstd_safe::get_error_name(code).to_owned())
}

/// The relay's half of a stream's zstd context.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    window_log: u8,
    level: i32,
    _memory: Reservation,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCompressor")
            .field("window_log", &self.window_log)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl StreamCompressor {
    /// A context at `level` with the window `memory` pays for, capped at `window_log`
    /// (what the master target granted).
    pub fn new(level: i32, window_log: u8, memory: Reservation) -> Result<Self, CodecError> {
        let window_log = window_log.min(memory.window_log());
        let mut cctx = CCtx::try_create().ok_or_else(|| CodecError("out of memory".into()))?;
        let params = [
            CParameter::CompressionLevel(level),
            CParameter::WindowLog(u32::from(window_log)),
            CParameter::EnableLongDistanceMatching(window_log >= LDM_MIN_WINDOW_LOG),
            CParameter::ChecksumFlag(false),
            CParameter::ContentSizeFlag(false),
        ];
        for p in params {
            cctx.set_parameter(p).map_err(zstd_error)?;
        }
        Ok(StreamCompressor {
            cctx,
            window_log,
            level,
            _memory: memory,
        })
    }

    pub fn window_log(&self) -> u8 {
        self.window_log
    }

    /// Compresses `body` as the next flushed piece of the stream, appending to `out`.
    /// After an error the context is unusable (the stream must end: its peer's history
    /// can no longer be matched).
    pub fn compress(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.reserve(zstd_safe::compress_bound(body.len()) + 64);
        let mut input = InBuffer::around(body);
        loop {
            if out.capacity() == out.len() {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            let remaining = self
                .cctx
                .compress_stream2(
                    &mut output,
                    &mut input,
                    zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
                )
                .map_err(zstd_error)?;
            if remaining == 0 && input.pos() == body.len() {
                return Ok(());
            }
        }
    }

    /// Bytes the context holds now (zstd's own count).
    pub fn memory(&self) -> usize {
        self.cctx.sizeof()
    }
}

/// The master target's half of a stream's zstd context.
pub struct StreamDecompressor {
    dctx: DCtx<'static>,
    window_log: u8,
    _memory: Reservation,
}

impl std::fmt::Debug for StreamDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecompressor")
            .field("window_log", &self.window_log)
            .finish_non_exhaustive()
    }
}

impl StreamDecompressor {
    /// A context that accepts windows up to what `memory` pays for.
    pub fn new(memory: Reservation) -> Result<Self, CodecError> {
        let window_log = memory.window_log();
        let mut dctx = DCtx::try_create().ok_or_else(|| CodecError("out of memory".into()))?;
        dctx.set_parameter(DParameter::WindowLogMax(u32::from(window_log)))
            .map_err(zstd_error)?;
        Ok(StreamDecompressor {
            dctx,
            window_log,
            _memory: memory,
        })
    }

    /// The largest window this context accepts (what `Accept` granted).
    pub fn window_log(&self) -> u8 {
        self.window_log
    }

    /// Decodes the next piece of the stream, which must give exactly `body_len` bytes
    /// and consume all of `input`. After an error the context is unusable.
    pub fn decompress(&mut self, input: &[u8], body_len: usize) -> Result<Vec<u8>, CodecError> {
        // One byte more than announced, so that a piece producing more is caught.
        let mut out: Vec<u8> = Vec::with_capacity(body_len + 1);
        let mut inb = InBuffer::around(input);
        loop {
            let (before_in, before_out) = (inb.pos(), out.len());
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            self.dctx
                .decompress_stream(&mut output, &mut inb)
                .map_err(zstd_error)?;
            if out.len() > body_len {
                return Err(CodecError(format!(
                    "piece decodes to more than the {body_len} bytes announced"
                )));
            }
            let progressed = inb.pos() != before_in || out.len() != before_out;
            if inb.pos() == input.len() && !progressed {
                break;
            }
            if !progressed {
                return Err(CodecError("decoder made no progress".into()));
            }
        }
        if out.len() != body_len {
            return Err(CodecError(format!(
                "piece decoded to {} bytes, {body_len} announced",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Bytes the context holds now (zstd's own count).
    pub fn memory(&self) -> usize {
        self.dctx.sizeof()
    }
}

/// Both ends of one stream's context in one process, each from a pool of its own (1 GiB):
/// the master target's decompressor granting `window_log`, the relay's compressor at
/// `level` within that grant. For tests and fuzzing; daemons reserve from their pools.
pub fn stream_pair(
    window_log: u8,
    level: i32,
) -> Result<(StreamCompressor, StreamDecompressor), CodecError> {
    let no_room = || CodecError(format!("no context of window 2^{window_log} fits 1 GiB"));
    let mt = CodecMemory::new(1 << 30);
    let d = StreamDecompressor::new(
        mt.reserve(1, window_log, decompressor_cost)
            .ok_or_else(no_room)?,
    )?;
    let relay = CodecMemory::new(1 << 30);
    let c = StreamCompressor::new(
        level,
        d.window_log(),
        relay
            .reserve(1, window_log, |w| compressor_cost(w, level))
            .ok_or_else(no_room)?,
    )?;
    Ok((c, d))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let words = [
            "relay ",
            "master ",
            "target ",
            "point ",
            "journal ",
            "failback ",
        ];
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        }
        v.truncate(n);
        v
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn pair(window_log: u8) -> (StreamCompressor, StreamDecompressor) {
        pair_at(window_log, 3)
    }

    fn pair_at(window_log: u8, level: i32) -> (StreamCompressor, StreamDecompressor) {
        stream_pair(window_log, level).unwrap()
    }

    #[test]
    fn history_spans_pieces_so_a_repeat_costs_almost_nothing() {
        let (mut c, mut d) = pair(20);
        let block = random(64 << 10, 7);
        let mut first = Vec::new();
        c.compress(&block, &mut first).unwrap();
        assert!(first.len() > 60 << 10, "random data does not compress");
        let mut second = Vec::new();
        c.compress(&block, &mut second).unwrap();
        assert!(
            second.len() < 1 << 10,
            "the repeat is a match into the history: {} bytes",
            second.len()
        );
        assert_eq!(d.decompress(&first, block.len()).unwrap(), block);
        assert_eq!(d.decompress(&second, block.len()).unwrap(), block);
    }

    #[test]
    fn a_fresh_decoder_cannot_follow_a_continued_stream() {
        let (mut c, _) = pair(20);
        let block = text(32 << 10, 3);
        let mut first = Vec::new();
        c.compress(&block, &mut first).unwrap();
        let mut second = Vec::new();
        c.compress(&block, &mut second).unwrap();
        let (_, mut fresh) = pair(20);
        assert!(fresh.decompress(&second, block.len()).is_err());
    }

    #[test]
    fn the_decoder_refuses_a_window_beyond_its_grant_and_wrong_lengths() {
        let (mut c, _) = pair(24);
        let body = text(8 << 10, 5);
        let mut piece = Vec::new();
        c.compress(&body, &mut piece).unwrap();
        let (_, mut small) = pair(18);
        let e = small.decompress(&piece, body.len()).unwrap_err();
        assert!(e.0.contains("memory") || e.0.contains("window"), "{e}");
        let (_, mut d) = pair(24);
        assert!(d
            .decompress(&piece, body.len() - 1)
            .unwrap_err()
            .0
            .contains("more than"));
        let (_, mut d) = pair(24);
        assert!(d
            .decompress(&piece, body.len() + 1)
            .unwrap_err()
            .0
            .contains("announced"));
        let (_, mut d) = pair(24);
        assert!(d.decompress(&piece[..piece.len() / 2], body.len()).is_err());
    }

    #[test]
    fn the_pool_shares_fairly_and_never_overcommits() {
        let pool = CodecMemory::new(DEFAULT_CODEC_MEMORY);
        let one = pool
            .reserve(1, MAX_WINDOW_LOG, |w| compressor_cost(w, 3))
            .unwrap();
        assert_eq!(one.window_log(), MAX_WINDOW_LOG);
        drop(one);
        assert_eq!(pool.reserved(), 0);
        let many: Vec<Reservation> = (0..1000)
            .filter_map(|_| pool.reserve(1000, MAX_WINDOW_LOG, |w| compressor_cost(w, 3)))
            .collect();
        assert!(pool.reserved() <= pool.cap());
        assert!(
            many.len() >= 400,
            "{} of 1000 streams got a context",
            many.len()
        );
        assert!(many.iter().all(|r| r.window_log() >= MIN_WINDOW_LOG));
        drop(many);
        let hundred: Vec<Reservation> = (0..100)
            .filter_map(|_| pool.reserve(100, MAX_WINDOW_LOG, |w| compressor_cost(w, 3)))
            .collect();
        assert_eq!(hundred.len(), 100, "a hundred streams each get a share");
        assert!(hundred.iter().all(|r| r.window_log() >= 22));
        // A tiny pool grants nothing rather than too much.
        let tiny = CodecMemory::new(1 << 16);
        assert!(tiny
            .reserve(1, MAX_WINDOW_LOG, |w| compressor_cost(w, 3))
            .is_none());
    }

    #[test]
    fn estimates_cover_real_contexts() {
        for (window_log, level) in [(MIN_WINDOW_LOG, 1), (20, 3), (23, 6), (24, 9)] {
            let (mut c, mut d) = pair_at(window_log, level);
            let window = 1usize << window_log;
            let mut fed = 0;
            while fed < 2 * window {
                let body = text(1 << 20, fed as u64 + 1);
                let mut piece = Vec::new();
                c.compress(&body, &mut piece).unwrap();
                d.decompress(&piece, body.len()).unwrap();
                fed += body.len();
            }
            assert!(
                c.memory() as u64 <= compressor_cost(window_log, level),
                "compressor at window 2^{window_log}, level {level}: {} > {}",
                c.memory(),
                compressor_cost(window_log, level)
            );
            assert!(
                d.memory() as u64 <= decompressor_cost(window_log),
                "decompressor at window 2^{window_log}: {} > {}",
                d.memory(),
                decompressor_cost(window_log)
            );
        }
    }
}
