//! The relay's errors: where a failure came from, and whether trying again can help.
//!
//! Orchestration code (forwarders, sessions, start-up) returns [`RelayError`], never a
//! bare string, so the decision to retry, resend or stop is made from the kind of
//! failure in one place ([`RelayError::recovery`]) and the log says whose fault it was
//! ([`RelayError::origin`]).

use fbr_cache::CacheError;
use fbr_protocol::stream::SessionEnd;
use fbr_protocol::Recovery;
use fbr_transport::LinkError;

/// Whose side a failure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The master target or the network to it.
    Peer,
    /// This relay: its cache disk, its tasks.
    Local,
}

/// A failure of the relay's work.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The master target could not be reached.
    #[error("master target unreachable: {0}")]
    Unreachable(#[from] LinkError),
    /// The stream ended as the protocol says (a refusal, a broken stream, a timeout);
    /// the sender machine classified it.
    #[error("{0}")]
    Stream(SessionEnd),
    /// Writing to the master target failed: the stream or its connection broke.
    #[error("sending to the master target: {0}")]
    Send(std::io::Error),
    /// The relay's cache failed (I/O error, or the cache is shutting down).
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    /// A task of the relay died (a bug; the work is retried).
    #[error("{what} task: {reason}")]
    Task { what: &'static str, reason: String },
    /// The relay is shutting down.
    #[error("relay shutting down")]
    ShuttingDown,
}

impl RelayError {
    /// What the stream does about it: retry after a backoff, resend at once, or stop.
    pub fn recovery(&self) -> Recovery {
        match self {
            RelayError::Stream(end) => end.recovery,
            RelayError::ShuttingDown => Recovery::GiveUp,
            RelayError::Cache(CacheError::Corrupt { .. }) => Recovery::GiveUp,
            RelayError::Unreachable(_)
            | RelayError::Send(_)
            | RelayError::Cache(_)
            | RelayError::Task { .. } => Recovery::Retry,
        }
    }

    /// Whether trying again can help.
    pub fn is_retryable(&self) -> bool {
        self.recovery() != Recovery::GiveUp
    }

    /// Whose side the failure is on.
    pub fn origin(&self) -> Origin {
        match self {
            RelayError::Unreachable(_) | RelayError::Stream(_) | RelayError::Send(_) => {
                Origin::Peer
            }
            RelayError::Cache(_) | RelayError::Task { .. } | RelayError::ShuttingDown => {
                Origin::Local
            }
        }
    }

    /// The failure as a sender machine's session end.
    pub fn session_end(&self) -> SessionEnd {
        match self {
            RelayError::Stream(end) => end.clone(),
            other => SessionEnd {
                recovery: other.recovery(),
                reason: other.to_string(),
                code: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fbr_protocol::ErrorCode;

    #[test]
    fn each_failure_says_whose_it_is_and_whether_to_retry() {
        let refused = RelayError::Stream(SessionEnd::refused(ErrorCode::SequenceGap, "gap"));
        assert_eq!(
            (refused.origin(), refused.is_retryable()),
            (Origin::Peer, false)
        );
        let lost = RelayError::Stream(SessionEnd::refused(ErrorCode::UnknownReference, "x"));
        assert_eq!(lost.recovery(), Recovery::ResendNow);
        let io = RelayError::Send(std::io::Error::other("reset"));
        assert!(io.is_retryable());
        let corrupt = RelayError::Cache(CacheError::Corrupt {
            where_: "seg".into(),
            reason: "crc".into(),
        });
        assert_eq!(
            (corrupt.origin(), corrupt.is_retryable()),
            (Origin::Local, false)
        );
        assert_eq!(
            RelayError::ShuttingDown.session_end().recovery,
            Recovery::GiveUp
        );
    }
}
