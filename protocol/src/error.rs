//! Error codes on the wire, and the errors of the decoder.
//!
//! An [`ErrorCode`] is what a receiver sends back in an `Error` frame when it refuses a
//! stream; the numbers are part of the protocol (documented in `docs/PROTOCOL.md`) and
//! must never be renumbered. Unknown codes from a newer peer decode as
//! [`ErrorCode::Unknown`] so an old peer can still print them.

use std::fmt;

/// Numeric reason carried by an `Error` frame. Do not renumber: peers depend on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The bytes received do not form a valid frame.
    MalformedFrame,
    /// The frame header names a protocol version this peer does not speak.
    UnsupportedVersion,
    /// The frame header announces a payload above the hard limit.
    FrameTooLarge,
    /// A valid frame arrived where the protocol does not allow it (e.g. a record
    /// before `Hello`).
    UnexpectedFrame,
    /// The peer did not send its `Hello`, or the rest of a frame it began, in time: the
    /// receiver does not hold a stream open for a sender that trickles (a slowloris).
    TooSlow,
    /// The peer's certificate does not name the role this endpoint requires.
    Unauthenticated,
    /// The peer's certificate does not entitle it to the VM it tried to write.
    NotEntitled,
    /// A record's sequence number skips ahead of the next expected one.
    SequenceGap,
    /// A write or zero range ends beyond the end of the disk.
    OutOfBounds,
    /// An offset or length is not a multiple of 512 bytes.
    Misaligned,
    /// `Hello` names a disk size different from the one already on record.
    DiskSizeMismatch,
    /// The stream is already open on another connection.
    StreamBusy,
    /// A `Batch` referenced a block by hash that the master target cannot produce
    /// (evicted from its content index, or lost in a restart). The sender resends from
    /// the next expected record with that record's data in full.
    UnknownReference,
    /// A `Resync` progress or end mark names a resync that is not in progress on the
    /// replica (resync data for a disk not resyncing).
    ResyncMismatch,
    /// The stream moved to another relay (a higher placement is on record): this
    /// sender's copy of it is stale.
    StreamMoved,
    /// The relay cannot reach the master target.
    UpstreamUnavailable,
    /// A failure inside the receiver (I/O error, ...). Retrying may help.
    Internal,
    /// A code this version does not know (from a newer peer).
    Unknown(u16),
}

/// What a sender does when its stream ends with an error: the one rule every sender
/// follows (see [`ErrorCode::recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recovery {
    /// Transient: reconnect after a backoff and resume where the receiver stands.
    Retry,
    /// Reconnect at once and resend without references (the receiver lost blocks).
    ResendNow,
    /// Reconnecting cannot fix it: stop the stream and say why.
    GiveUp,
}

impl ErrorCode {
    /// Every code this version defines (metrics start each at zero).
    pub const KNOWN: [ErrorCode; 17] = [
        ErrorCode::MalformedFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnexpectedFrame,
        ErrorCode::TooSlow,
        ErrorCode::Unauthenticated,
        ErrorCode::NotEntitled,
        ErrorCode::SequenceGap,
        ErrorCode::OutOfBounds,
        ErrorCode::Misaligned,
        ErrorCode::DiskSizeMismatch,
        ErrorCode::StreamBusy,
        ErrorCode::UnknownReference,
        ErrorCode::ResyncMismatch,
        ErrorCode::StreamMoved,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::Internal,
    ];

    /// What a sender refused with this code does next. Transient conditions of the
    /// receiver (its upstream is down, a local failure, the stream is busy elsewhere) are
    /// retried; `UnknownReference` is resent at once without references; everything
    /// else is a problem with what the sender sent or who it is, and retrying would
    /// only repeat it. Unknown codes (from a newer peer) are not retried.
    pub fn recovery(self) -> Recovery {
        match self {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::Internal
            | ErrorCode::StreamBusy
            | ErrorCode::TooSlow => Recovery::Retry,
            ErrorCode::UnknownReference => Recovery::ResendNow,
            _ => Recovery::GiveUp,
        }
    }

    /// Whether a sender refused with this code may try again.
    pub fn is_transient(self) -> bool {
        self.recovery() != Recovery::GiveUp
    }

    /// The wire number of this code.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::MalformedFrame => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::UnexpectedFrame => 4,
            ErrorCode::TooSlow => 5,
            ErrorCode::Unauthenticated => 10,
            ErrorCode::NotEntitled => 11,
            ErrorCode::SequenceGap => 20,
            ErrorCode::OutOfBounds => 21,
            ErrorCode::Misaligned => 22,
            ErrorCode::DiskSizeMismatch => 23,
            ErrorCode::StreamBusy => 24,
            ErrorCode::UnknownReference => 25,
            ErrorCode::ResyncMismatch => 26,
            ErrorCode::StreamMoved => 27,
            ErrorCode::UpstreamUnavailable => 30,
            ErrorCode::Internal => 40,
            ErrorCode::Unknown(n) => n,
        }
    }

    /// Decodes a wire number; never fails (unknown numbers are kept).
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::MalformedFrame,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::UnexpectedFrame,
            5 => ErrorCode::TooSlow,
            10 => ErrorCode::Unauthenticated,
            11 => ErrorCode::NotEntitled,
            20 => ErrorCode::SequenceGap,
            21 => ErrorCode::OutOfBounds,
            22 => ErrorCode::Misaligned,
            23 => ErrorCode::DiskSizeMismatch,
            24 => ErrorCode::StreamBusy,
            25 => ErrorCode::UnknownReference,
            26 => ErrorCode::ResyncMismatch,
            27 => ErrorCode::StreamMoved,
            30 => ErrorCode::UpstreamUnavailable,
            40 => ErrorCode::Internal,
            n => ErrorCode::Unknown(n),
        }
    }

    /// A stable snake_case name, used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::NotEntitled => "not_entitled",
            ErrorCode::SequenceGap => "sequence_gap",
            ErrorCode::OutOfBounds => "out_of_bounds",
            ErrorCode::Misaligned => "misaligned",
            ErrorCode::DiskSizeMismatch => "disk_size_mismatch",
            ErrorCode::StreamBusy => "stream_busy",
            ErrorCode::UnknownReference => "unknown_reference",
            ErrorCode::ResyncMismatch => "resync_mismatch",
            ErrorCode::StreamMoved => "stream_moved",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.name(), self.as_u16())
    }
}

/// Why a buffer does not hold a valid frame. Each maps to the [`ErrorCode`] a receiver
/// sends back before closing the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {found:#06x} (expected {expected:#06x}): not a failback-relay frame")]
    BadMagic { found: u16, expected: u16 },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },
}

impl DecodeError {
    /// The code a receiver answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic { .. } => ErrorCode::MalformedFrame,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownType(_) => ErrorCode::MalformedFrame,
            DecodeError::Malformed { .. } => ErrorCode::MalformedFrame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_stable() {
        let all = [
            (ErrorCode::MalformedFrame, 1),
            (ErrorCode::UnsupportedVersion, 2),
            (ErrorCode::FrameTooLarge, 3),
            (ErrorCode::UnexpectedFrame, 4),
            (ErrorCode::TooSlow, 5),
            (ErrorCode::Unauthenticated, 10),
            (ErrorCode::NotEntitled, 11),
            (ErrorCode::SequenceGap, 20),
            (ErrorCode::OutOfBounds, 21),
            (ErrorCode::Misaligned, 22),
            (ErrorCode::DiskSizeMismatch, 23),
            (ErrorCode::StreamBusy, 24),
            (ErrorCode::UnknownReference, 25),
            (ErrorCode::ResyncMismatch, 26),
            (ErrorCode::UpstreamUnavailable, 30),
            (ErrorCode::Internal, 40),
        ];
        for (code, n) in all {
            assert_eq!(code.as_u16(), n);
            assert_eq!(ErrorCode::from_u16(n), code);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
        assert_eq!(ErrorCode::Unknown(999).as_u16(), 999);
    }

    #[test]
    fn known_lists_every_defined_code_once() {
        let defined: Vec<ErrorCode> = (0..=u16::MAX)
            .map(ErrorCode::from_u16)
            .filter(|c| !matches!(c, ErrorCode::Unknown(_)))
            .collect();
        assert_eq!(defined, ErrorCode::KNOWN.to_vec());
    }
}
