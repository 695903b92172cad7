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
//! ## Continued and framed streams
//! A stream whose share of the pool buys a window of at least
//! [`MIN_STREAM_WINDOW_LOG`] (1 MiB) gets a context of its own, and its pieces
//! *continue* one frame: the history spans batches. A stream whose share is smaller is
//! **framed**: each of its pieces is a whole zstd frame (`ZSTD_e_end`, window at most
//! [`FRAME_WINDOW_LOG`]), compressed with a context borrowed from the relay's
//! [`FramePool`] for that one call. A framed stream keeps no memory of its own, finds
//! repeats only within a batch, and still gets zstd's entropy coding; with many streams
//! (a thousand disks on one relay) its match tables stay hot in the CPU's caches,
//! where a thousand contexts of their own would not. The receiver needs nothing new: a
//! zstd decoder reads a frame that ends and the next that begins as one stream of
//! input (`StreamDecompressor` is the same for both).
//!
//! ## How the cap is shared
//! Relay (compressors): a new stream reserves the largest window (a power of two,
//! from [`MIN_STREAM_WINDOW_LOG`] to [`MAX_WINDOW_LOG`]) whose context costs no more
//! than the **fair share** `cap / streams` (the streams the process serves at that
//! moment) *and* what remains unreserved; when none fits, the stream is framed. When
//! streams join and a stream's context costs more than the new fair share
//! ([`StreamCompressor::exceeds_fair_share`]), the relay [ends](StreamCompressor::end)
//! its frame, gives the context back and reserves anew (or frames the stream); the
//! successor's first piece closes the old frame before it opens its own. The
//! [`FramePool`]'s contexts (at most [`MAX_FRAME_CONTEXTS`], created as compressions
//! run at once) are reserved from the same cap. With the default 1 GiB: 8 streams get
//! 128 MiB windows, 100 get 4 MiB each, and from 342 streams on every new stream is
//! framed (a few MiB in all for a thousand streams).
//!
//! Master target (decompressors): the same fair share, from [`MIN_WINDOW_LOG`]; when
//! the fair share is below the smallest context, streams get that smallest one while
//! the pool lasts (a grant costs little until the relay uses it), and a stream that
//! finds the pool spent is granted no window, so its batches use LZ4 or nothing. The
//! relay uses the smaller of the grant and its own reservation. A grant lasts as long
//! as its stream: a stream reconnecting after others joined gets the then-fair,
//! smaller, share.

use std::sync::{Arc, Mutex};

use zstd_safe::{CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// The smallest window the protocol grants (128 KiB): below it, LZ4 does as well.
pub const MIN_WINDOW_LOG: u8 = 17;
/// The smallest window a relay stream gets a context of its own for (1 MiB): below it,
/// the history spans less than one busy batch (up to 3 MiB of records), so matches
/// across batches add little, while the context's match tables (about 1.6 MiB at level
/// 3) would cost more than its window. Such streams are framed instead.
pub const MIN_STREAM_WINDOW_LOG: u8 = 20;
/// The window of a framed stream's pieces (128 KiB, the smallest grant, so every
/// granted stream accepts them).
pub const FRAME_WINDOW_LOG: u8 = MIN_WINDOW_LOG;
/// Most contexts a [`FramePool`] holds: compressions that run at once (the relay's
/// reduce slots and its async threads); beyond, a batch goes with LZ4.
pub const MAX_FRAME_CONTEXTS: usize = 32;
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

    /// Whether this reservation holds more than one of `streams` streams' fair share of
    /// its pool (streams joined since it was made).
    pub fn exceeds_fair_share(&self, streams: usize) -> bool {
        self.bytes > self.pool.cap / streams.max(1) as u64
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

    /// Reserves a relay context for one of `streams` streams: the largest window from
    /// `min_window_log` to `max_window_log` whose `cost` fits both the fair share
    /// (`cap / streams`) and what remains. `None` when none fits (the stream is framed).
    pub fn reserve_fair(
        self: &Arc<Self>,
        streams: usize,
        min_window_log: u8,
        max_window_log: u8,
        cost: impl Fn(u8) -> u64,
    ) -> Option<Reservation> {
        let share = self.cap / streams.max(1) as u64;
        self.reserve_within(share, min_window_log, max_window_log, cost)
    }

    /// Reserves a master-target context for one of `streams` streams: as
    /// [`Self::reserve_fair`] from [`MIN_WINDOW_LOG`], except that a fair share too small
    /// for any context still buys the smallest one while the pool lasts (first come),
    /// rather than leaving the whole pool unused. `None` when not even that fits.
    pub fn reserve(
        self: &Arc<Self>,
        streams: usize,
        max_window_log: u8,
        cost: impl Fn(u8) -> u64,
    ) -> Option<Reservation> {
        let share = (self.cap / streams.max(1) as u64).max(cost(MIN_WINDOW_LOG));
        self.reserve_within(share, MIN_WINDOW_LOG, max_window_log, cost)
    }

    fn reserve_within(
        self: &Arc<Self>,
        share: u64,
        min_window_log: u8,
        max_window_log: u8,
        cost: impl Fn(u8) -> u64,
    ) -> Option<Reservation> {
        let mut reserved = self.lock();
        let free = self.cap.saturating_sub(*reserved);
        let limit = share.min(free);
        let window_log = (min_window_log.max(MIN_WINDOW_LOG)..=max_window_log.min(MAX_WINDOW_LOG))
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

/// The relay's half of a stream's zstd context: a context of its own (continued), or
/// whole frames from the shared [`FramePool`] (framed).
pub struct StreamCompressor {
    mode: Mode,
    window_log: u8,
    level: i32,
    /// The end of the frame of the context this one succeeded ([`Self::succeed`]),
    /// sent at the head of this one's first piece.
    preamble: Vec<u8>,
}

enum Mode {
    Continued {
        cctx: CCtx<'static>,
        memory: Reservation,
    },
    Framed(Arc<FramePool>),
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCompressor")
            .field("framed", &self.is_framed())
            .field("window_log", &self.window_log)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

/// A zstd context at `level` whose frames declare a window of at most `2^window_log`.
fn compression_context(level: i32, window_log: u8) -> Result<CCtx<'static>, CodecError> {
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
    Ok(cctx)
}

/// Feeds all of `body` to `cctx` and appends what it gives to `out`: flushed (the
/// frame goes on) or ended (a whole frame).
fn compress_into(
    cctx: &mut CCtx<'static>,
    body: &[u8],
    out: &mut Vec<u8>,
    directive: zstd_safe::zstd_sys::ZSTD_EndDirective,
) -> Result<(), CodecError> {
    out.reserve(zstd_safe::compress_bound(body.len()) + 64);
    let mut input = InBuffer::around(body);
    loop {
        if out.capacity() == out.len() {
            out.reserve(64 << 10);
        }
        let pos = out.len();
        let mut output = OutBuffer::around_pos(out, pos);
        let remaining = cctx
            .compress_stream2(&mut output, &mut input, directive)
            .map_err(zstd_error)?;
        if remaining == 0 && input.pos() == body.len() {
            return Ok(());
        }
    }
}

impl StreamCompressor {
    /// A context of its own at `level` with the window `memory` pays for, capped at
    /// `window_log` (what the master target granted).
    pub fn new(level: i32, window_log: u8, memory: Reservation) -> Result<Self, CodecError> {
        let window_log = window_log.min(memory.window_log());
        let cctx = compression_context(level, window_log)?;
        Ok(StreamCompressor {
            mode: Mode::Continued { cctx, memory },
            window_log,
            level,
            preamble: Vec::new(),
        })
    }

    /// A framed stream: each piece a whole frame, compressed with a context of `pool`.
    pub fn framed(pool: Arc<FramePool>) -> Self {
        StreamCompressor {
            window_log: FRAME_WINDOW_LOG,
            level: pool.level,
            mode: Mode::Framed(pool),
            preamble: Vec::new(),
        }
    }

    /// Whether this stream's own context costs more than one of `streams` streams'
    /// fair share (see the module docs: it should then make way with [`Self::end`]).
    /// Never for a framed stream, which holds nothing of its own.
    pub fn exceeds_fair_share(&self, streams: usize) -> bool {
        match &self.mode {
            Mode::Continued { memory, .. } => memory.exceeds_fair_share(streams),
            Mode::Framed(_) => false,
        }
    }

    /// Ends the stream's current frame and gives its context and memory back: the
    /// bytes returned close the frame (empty for a framed stream, whose frames are
    /// always closed). Hand them to the successor with [`Self::succeed`], so that its
    /// first piece closes the old frame before it opens a new one: the receiver reads
    /// one frame after another, as it does framed pieces.
    pub fn end(self) -> Result<Vec<u8>, CodecError> {
        use zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end;
        let mut tail = self.preamble;
        match self.mode {
            Mode::Continued {
                mut cctx,
                memory: _,
            } => {
                compress_into(&mut cctx, &[], &mut tail, ZSTD_e_end)?;
                Ok(tail)
            }
            Mode::Framed(_) => Ok(tail),
        }
    }

    /// This compressor, taking over from one that [ended](Self::end) with `tail`.
    pub fn succeed(mut self, mut tail: Vec<u8>) -> Self {
        tail.append(&mut self.preamble);
        self.preamble = tail;
        self
    }

    pub fn window_log(&self) -> u8 {
        self.window_log
    }

    /// Whether each piece is a whole frame (no history across batches).
    pub fn is_framed(&self) -> bool {
        matches!(self.mode, Mode::Framed(_))
    }

    /// Compresses `body` as the next piece of the stream, appending to `out`. After an
    /// error a continued context is unusable (the stream must stop using it: its peer's
    /// history can no longer be matched); a framed stream may go on (the next piece is
    /// a new frame either way).
    pub fn compress(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        use zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush;
        let start = out.len();
        out.extend_from_slice(&self.preamble);
        let result = match &mut self.mode {
            Mode::Continued { cctx, .. } => compress_into(cctx, body, out, ZSTD_e_flush),
            Mode::Framed(pool) => pool.compress(body, out),
        };
        match result {
            Ok(()) => self.preamble.clear(),
            // The preamble goes with the next piece that succeeds.
            Err(_) => out.truncate(start),
        }
        result
    }

    /// Bytes the context holds now (zstd's own count; 0 for a framed stream, whose
    /// contexts are the pool's).
    pub fn memory(&self) -> usize {
        match &self.mode {
            Mode::Continued { cctx, .. } => cctx.sizeof(),
            Mode::Framed(_) => 0,
        }
    }
}

/// The relay's shared contexts for framed streams: one is lent for each compression
/// and comes back after it, so their number is what runs at once (at most
/// [`MAX_FRAME_CONTEXTS`]), whatever the number of streams. Each is reserved from the
/// relay's [`CodecMemory`] when created.
pub struct FramePool {
    level: i32,
    memory: Arc<CodecMemory>,
    contexts: Mutex<FrameContexts>,
}

/// The pool's contexts, under one lock: those not lent, and how many exist in all.
#[derive(Default)]
struct FrameContexts {
    idle: Vec<(CCtx<'static>, Reservation)>,
    /// Contexts that exist (idle or lent).
    created: usize,
}

impl std::fmt::Debug for FramePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramePool")
            .field("level", &self.level)
            .field("contexts", &self.contexts())
            .finish_non_exhaustive()
    }
}

impl FramePool {
    pub fn new(memory: Arc<CodecMemory>, level: i32) -> Arc<Self> {
        Arc::new(FramePool {
            level,
            memory,
            contexts: Mutex::new(FrameContexts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FrameContexts> {
        self.contexts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Contexts that exist now.
    pub fn contexts(&self) -> usize {
        self.lock().created
    }

    /// `body` as one whole frame, appended to `out`. Fails when no context can be had
    /// (all lent and the limit reached, or the memory cap spent) or zstd fails; the
    /// caller then sends the batch another way.
    fn compress(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        use zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end;
        let (mut cctx, memory) = self.lend()?;
        let start = out.len();
        let result = compress_into(&mut cctx, body, out, ZSTD_e_end);
        let mut contexts = self.lock();
        match result {
            Ok(()) => contexts.idle.push((cctx, memory)),
            Err(_) => {
                // A context that failed mid-frame is not lent again.
                out.truncate(start);
                contexts.created -= 1;
            }
        }
        result
    }

    /// An idle context, or a new one while the limit and the memory cap allow.
    fn lend(&self) -> Result<(CCtx<'static>, Reservation), CodecError> {
        let mut contexts = self.lock();
        if let Some(c) = contexts.idle.pop() {
            return Ok(c);
        }
        if contexts.created >= MAX_FRAME_CONTEXTS {
            return Err(CodecError("every frame context is in use".into()));
        }
        let level = self.level;
        let memory = self
            .memory
            .reserve_fair(1, FRAME_WINDOW_LOG, FRAME_WINDOW_LOG, |w| {
                compressor_cost(w, level)
            })
            .ok_or_else(|| CodecError("the codec memory cap is spent".into()))?;
        let cctx = compression_context(level, FRAME_WINDOW_LOG)?;
        contexts.created += 1;
        Ok((cctx, memory))
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
            .reserve_fair(1, MIN_WINDOW_LOG, window_log, |w| compressor_cost(w, level))
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
    fn relay_streams_get_contexts_of_their_own_only_with_a_useful_window() {
        let pool = CodecMemory::new(DEFAULT_CODEC_MEMORY);
        let cost = |w| compressor_cost(w, 3);
        let hundred: Vec<Reservation> = (0..100)
            .filter_map(|_| pool.reserve_fair(100, MIN_STREAM_WINDOW_LOG, MAX_WINDOW_LOG, cost))
            .collect();
        assert_eq!(hundred.len(), 100);
        assert!(hundred.iter().all(|r| r.window_log() >= 22));
        drop(hundred);
        // A thousand streams' fair share (1 MiB) buys no useful window: all framed,
        // nothing reserved.
        let thousand = (0..1000)
            .filter_map(|_| pool.reserve_fair(1000, MIN_STREAM_WINDOW_LOG, MAX_WINDOW_LOG, cost))
            .count();
        assert_eq!(thousand, 0);
        assert_eq!(pool.reserved(), 0);
    }

    #[test]
    fn framed_pieces_are_whole_frames_any_decoder_of_the_stream_reads() {
        let memory = CodecMemory::new(DEFAULT_CODEC_MEMORY);
        let frames = FramePool::new(memory.clone(), 3);
        let mut a = StreamCompressor::framed(frames.clone());
        let mut b = StreamCompressor::framed(frames.clone());
        assert!(a.is_framed() && a.memory() == 0);
        let (_, mut da) = pair(MIN_WINDOW_LOG);
        let (_, mut db) = pair(MIN_WINDOW_LOG);
        for i in 0..6u64 {
            let body = text(48 << 10, i + 1);
            let mut piece = Vec::new();
            a.compress(&body, &mut piece).unwrap();
            assert_eq!(
                &piece[..4],
                &[0x28, 0xb5, 0x2f, 0xfd],
                "each piece opens a frame"
            );
            assert!(
                piece.len() < body.len() / 2,
                "text compresses within a batch"
            );
            assert_eq!(da.decompress(&piece, body.len()).unwrap(), body);
            // A piece is self-contained: a fresh decoder reads it too.
            let (_, mut fresh) = pair(MIN_WINDOW_LOG);
            assert_eq!(fresh.decompress(&piece, body.len()).unwrap(), body);
            let other = random(20 << 10, i);
            let mut piece = Vec::new();
            b.compress(&other, &mut piece).unwrap();
            assert_eq!(db.decompress(&piece, other.len()).unwrap(), other);
        }
        // Streams took turns: one context served both, reserved from the cap.
        assert_eq!(frames.contexts(), 1);
        assert_eq!(memory.reserved(), compressor_cost(FRAME_WINDOW_LOG, 3));
        // No repeat is found across pieces (that is the price of framing).
        let body = random(64 << 10, 99);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        a.compress(&body, &mut first).unwrap();
        a.compress(&body, &mut second).unwrap();
        assert!(second.len() > 60 << 10);
    }

    #[test]
    fn a_stream_over_its_share_ends_its_frame_and_hands_over() {
        // The master target granted 2^22; the relay's pool is 64 MiB.
        let (_, mut d) = pair(22);
        let relay = CodecMemory::new(64 << 20);
        let cost = |w| compressor_cost(w, 3);
        let own = relay
            .reserve_fair(1, MIN_STREAM_WINDOW_LOG, 22, cost)
            .unwrap();
        let mut c = StreamCompressor::new(3, 22, own).unwrap();
        let body = text(256 << 10, 7);
        let mut piece = Vec::new();
        c.compress(&body, &mut piece).unwrap();
        assert_eq!(d.decompress(&piece, body.len()).unwrap(), body);
        // Alone it fits; among a hundred streams it holds more than its share.
        assert!(!c.exceeds_fair_share(1));
        assert!(c.exceeds_fair_share(100));
        let tail = c.end().unwrap();
        assert!(!tail.is_empty(), "the open frame is closed");
        assert_eq!(relay.reserved(), 0, "the context's memory is given back");
        // The successor (framed, as a hundred streams' share buys no window of its
        // own) opens its first piece with the old frame's end; the same decoder reads
        // on.
        let frames = FramePool::new(relay.clone(), 3);
        let mut next = StreamCompressor::framed(frames).succeed(tail.clone());
        assert!(!next.exceeds_fair_share(100));
        let mut piece = Vec::new();
        next.compress(&body, &mut piece).unwrap();
        assert_eq!(&piece[..tail.len()], &tail[..]);
        assert_eq!(
            &piece[tail.len()..tail.len() + 4],
            &[0x28, 0xb5, 0x2f, 0xfd]
        );
        assert_eq!(d.decompress(&piece, body.len()).unwrap(), body);
        // Only the first piece carries it.
        let mut piece = Vec::new();
        next.compress(&body, &mut piece).unwrap();
        assert_eq!(&piece[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(d.decompress(&piece, body.len()).unwrap(), body);
        // A continued successor (a smaller window of its own) hands over the same way.
        let smaller = relay
            .reserve_fair(8, MIN_STREAM_WINDOW_LOG, 22, cost)
            .unwrap();
        let mut own = StreamCompressor::new(3, 22, smaller)
            .unwrap()
            .succeed(next.end().unwrap());
        for i in 0..3 {
            let body = text(64 << 10, 20 + i);
            let mut piece = Vec::new();
            own.compress(&body, &mut piece).unwrap();
            assert_eq!(d.decompress(&piece, body.len()).unwrap(), body);
        }
    }

    #[test]
    fn the_frame_pool_stays_within_its_cap() {
        let tiny = CodecMemory::new(1 << 20);
        let frames = FramePool::new(tiny, 3);
        let mut c = StreamCompressor::framed(frames.clone());
        let e = c.compress(&text(8 << 10, 1), &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("cap"), "{e}");
        assert_eq!(frames.contexts(), 0);
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
