//! Whether a replica can offer recovery points: its *sync state*, followed record by
//! record (sans-IO).
//!
//! ```text
//!              seed-disk                Resync Begin
//!   Consistent ──────────▶ Stale ───────────────────────▶ Resyncing{mark}
//!       ▲  ▲                                  Begin ▲ │ Progress (mark updated)
//!       │  │ Tag (the first point after the resync) │ │ End
//!       │  └──────────────────────────── Resynced ◀───┘
//!       └─ Resync Begin from Consistent or Resynced also goes to Resyncing
//! ```
//!
//! A tag landing on a disk is a recovery point of that disk only if the disk is
//! `Consistent` or `Resynced` when it lands (the next tag after a resync ended). A new
//! replica starts `Consistent`: it starts empty with the stream's first record, as the
//! source did. A replica seeded from an existing disk (the original location) starts
//! `Stale` until a resync completes. The state as of each checkpoint is in the index;
//! recovery follows the journal from there, so the state is exact after any crash.

use fbr_protocol::{Record, ReplicaState, ResyncMark, ResyncMode, ResyncPhase};

/// A replica's sync state (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncState {
    /// In step with its stream: tags are recovery points.
    #[default]
    Consistent,
    /// Seeded from an existing disk and not resynced yet.
    Stale,
    /// A resync began and has not ended; `mark` is the latest mark of it.
    Resyncing(ResyncMark),
    /// A resync ended; the next tag is the first recovery point.
    Resynced,
}

impl SyncState {
    /// Follows one applied record; returns, for a tag, whether it is a recovery point.
    pub fn follow(&mut self, record: &Record) -> Option<bool> {
        match record {
            Record::Resync { mark, .. } => {
                *self = match mark.phase {
                    ResyncPhase::Begin | ResyncPhase::Progress => SyncState::Resyncing(*mark),
                    ResyncPhase::End => SyncState::Resynced,
                };
                None
            }
            Record::Tag { .. } => {
                let consistent = matches!(self, SyncState::Consistent | SyncState::Resynced);
                if *self == SyncState::Resynced {
                    *self = SyncState::Consistent;
                }
                Some(consistent)
            }
            Record::Write { .. } | Record::Zero { .. } => None,
        }
    }

    /// The resync in progress, if any.
    pub fn resync(&self) -> Option<&ResyncMark> {
        match self {
            SyncState::Resyncing(m) => Some(m),
            _ => None,
        }
    }

    /// What `HashAccept` tells an agent.
    pub fn replica_state(&self) -> ReplicaState {
        match self {
            SyncState::Consistent | SyncState::Resynced => ReplicaState::Consistent,
            SyncState::Stale => ReplicaState::Stale,
            SyncState::Resyncing(_) => ReplicaState::Resyncing,
        }
    }

    /// A small number for the `fbr_mt_disk_sync_state` gauge: 0 consistent, 1 resynced
    /// (waiting for a tag), 2 resyncing, 3 stale.
    pub fn gauge(&self) -> i64 {
        match self {
            SyncState::Consistent => 0,
            SyncState::Resynced => 1,
            SyncState::Resyncing(_) => 2,
            SyncState::Stale => 3,
        }
    }

    /// The `disk_state` row: `(state, id, mode, next_region, regions, compared, sent)`.
    pub fn to_row(self) -> SyncRow {
        let (state, m) = match self {
            SyncState::Consistent => (1, None),
            SyncState::Stale => (2, None),
            SyncState::Resyncing(m) => (3, Some(m)),
            SyncState::Resynced => (4, None),
        };
        match m {
            Some(m) => (
                state,
                m.id,
                m.mode as u8,
                m.next_region,
                m.regions,
                m.compared_bytes,
                m.sent_bytes,
            ),
            None => (state, 0, 0, 0, 0, 0, 0),
        }
    }

    /// From a `disk_state` row; `None` if it is not one this version wrote.
    pub fn from_row(row: SyncRow) -> Option<Self> {
        let (state, id, mode, next_region, regions, compared_bytes, sent_bytes) = row;
        Some(match state {
            1 => SyncState::Consistent,
            2 => SyncState::Stale,
            3 => SyncState::Resyncing(ResyncMark {
                id,
                phase: ResyncPhase::Progress,
                mode: match mode {
                    1 => ResyncMode::Delta,
                    2 => ResyncMode::Full,
                    _ => return None,
                },
                next_region,
                regions,
                compared_bytes,
                sent_bytes,
            }),
            4 => SyncState::Resynced,
            _ => return None,
        })
    }
}

/// A `disk_state` row (do not reorder: it is on disk).
pub type SyncRow = (u8, u64, u8, u64, u64, u64, u64);

#[cfg(test)]
mod tests {
    use super::*;
    use fbr_protocol::TagKind;

    fn mark(phase: ResyncPhase) -> Record {
        Record::Resync {
            seq: 1,
            mark: ResyncMark {
                id: 5,
                phase,
                mode: ResyncMode::Delta,
                next_region: 2,
                regions: 9,
                compared_bytes: 1,
                sent_bytes: 2,
            },
        }
    }

    fn tag() -> Record {
        Record::Tag {
            seq: 1,
            id: 1,
            kind: TagKind::Crash,
            members: 1,
            group: "g".into(),
        }
    }

    #[test]
    fn tags_are_points_only_outside_a_resync_and_after_it_ends() {
        let mut s = SyncState::Stale;
        assert_eq!(
            s.follow(&tag()),
            Some(false),
            "a stale replica has no points"
        );
        s.follow(&mark(ResyncPhase::Begin));
        assert_eq!(s.follow(&tag()), Some(false));
        assert_eq!(s.replica_state(), ReplicaState::Resyncing);
        s.follow(&mark(ResyncPhase::Progress));
        assert_eq!(s.resync().unwrap().next_region, 2);
        s.follow(&mark(ResyncPhase::End));
        assert_eq!(s, SyncState::Resynced);
        assert_eq!(s.follow(&tag()), Some(true), "the first tag after the end");
        assert_eq!(s, SyncState::Consistent);
        assert_eq!(s.follow(&tag()), Some(true));
    }

    #[test]
    fn rows_round_trip() {
        let mut s = SyncState::Consistent;
        s.follow(&mark(ResyncPhase::Progress));
        for state in [
            SyncState::Consistent,
            SyncState::Stale,
            s,
            SyncState::Resynced,
        ] {
            assert_eq!(SyncState::from_row(state.to_row()), Some(state));
        }
        assert_eq!(SyncState::from_row((9, 0, 0, 0, 0, 0, 0)), None);
    }
}
