//! Where a source disk's changes come from, and the run manifest that records them.
//!
//! A disk's changes are either generated ([`crate::workload`]) or read from a write log
//! ([`crate::writelog`]). Either way they are reproducible, so the [`Manifest`] of a run
//! only needs to say *which* source each disk had and at which sequence numbers the tags
//! were inserted; the verifier rebuilds every source disk from that.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::image::ImageSpec;
use crate::workload::{Change, Content, ContentPools, DiskGenerator, Profile};
use crate::writelog::{LogDiskSource, LogItem};

/// Manifest format version. Version 2 adds, per disk, the images the source and the
/// replica started from, the first sequence number of the run, the sequence numbers of
/// resync records, and which tags were cut during a resync; a version 1 manifest reads
/// as zeros, 1, none and none.
pub const MANIFEST_VERSION: u32 = 2;

/// How to reproduce one disk's changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceSpec {
    Generated {
        seed: u64,
        vm_index: u32,
        disk_index: u32,
        profile: Profile,
        content: Content,
    },
    Log {
        path: PathBuf,
        index: u32,
    },
}

/// An open source of changes.
#[derive(Debug)]
pub enum ChangeSource {
    Generated(DiskGenerator),
    Log(LogDiskSource),
}

impl ChangeSource {
    pub fn open(
        spec: &SourceSpec,
        disk_size: u64,
        pools: &Arc<ContentPools>,
    ) -> Result<Self, String> {
        Ok(match spec {
            SourceSpec::Generated {
                seed,
                vm_index,
                disk_index,
                profile,
                content,
            } => ChangeSource::Generated(DiskGenerator::new(
                *seed,
                *vm_index,
                *disk_index,
                *profile,
                *content,
                disk_size,
                pools.clone(),
            )),
            SourceSpec::Log { path, index } => {
                ChangeSource::Log(LogDiskSource::open(path, *index).map_err(|e| e.to_string())?)
            }
        })
    }

    /// The next change, or the next tag of a log that covers this disk; `Ok(None)` when
    /// a log is exhausted (generators never are, and have no tags).
    pub fn next_item(&mut self) -> Result<Option<LogItem>, String> {
        match self {
            ChangeSource::Generated(g) => Ok(Some(LogItem::Change(g.next_change()))),
            ChangeSource::Log(l) => l.next_item().map_err(|e| e.to_string()),
        }
    }

    /// The next change (a log's tags passed over); `Ok(None)` when a log is exhausted.
    pub fn next_change(&mut self) -> Result<Option<Change>, String> {
        match self {
            ChangeSource::Generated(g) => Ok(Some(g.next_change())),
            ChangeSource::Log(l) => l.next_change().map_err(|e| e.to_string()),
        }
    }
}

/// What a run did: enough to rebuild every source disk at every tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Seed of the shared content pools (dup blocks, text corpus).
    pub seed: u64,
    pub disks: Vec<DiskManifest>,
}

/// One source disk of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskManifest {
    pub vm: String,
    pub disk: u32,
    pub disk_size: u64,
    pub group: String,
    pub source: SourceSpec,
    /// Highest sequence number assigned (changes and tags).
    pub last_seq: u64,
    /// Highest sequence number the relay acknowledged (durable downstream).
    pub acked_seq: u64,
    /// Tags inserted on this disk, in sequence order.
    pub tags: Vec<TagRecord>,
    /// What the source disk held at `first_seq - 1`.
    #[serde(default = "zeros")]
    pub source_base: ImageSpec,
    /// What the master target's replica held before the stream's first record (a seeded
    /// original-location disk; zeros for a new one).
    #[serde(default = "zeros")]
    pub replica_base: ImageSpec,
    /// The first sequence number this run produced (earlier ones came from an agent that
    /// ran before, e.g. one killed and restarted: only the replica side has them).
    #[serde(default = "one")]
    pub first_seq: u64,
    /// Runs `(first, last)` of sequence numbers that carried resync records (blocks read
    /// from the source disk, and marks): they change the replica, not the source.
    #[serde(default)]
    pub resync_runs: Vec<(u64, u64)>,
    /// Where the stream was numbered again because the relay lost records it had
    /// acknowledged (a resync replaced them), in order.
    #[serde(default)]
    pub renumbers: Vec<Renumber>,
}

/// The stream continued at `at_seq` after the relay lost records; by then the source
/// had drawn `changes_drawn` changes (the lost ones were on its disk all the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renumber {
    pub at_seq: u64,
    pub changes_drawn: u64,
}

fn zeros() -> ImageSpec {
    ImageSpec::Zeros
}

fn one() -> u64 {
    1
}

impl DiskManifest {
    /// Whether `seq` carried a resync record.
    pub fn is_resync(&self, seq: u64) -> bool {
        let i = self.resync_runs.partition_point(|(_, last)| *last < seq);
        self.resync_runs
            .get(i)
            .is_some_and(|(first, _)| *first <= seq)
    }
}

/// A tag as inserted by the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub id: u64,
    pub seq: u64,
    pub app: bool,
    /// Cut while the disk resynced: the replica has no recovery point there.
    #[serde(default)]
    pub in_resync: bool,
    /// The name a replayed write log gave the tag (its TAG record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
