//! Test failovers: a writable, isolated copy of every disk of a replication group at one
//! of its recovery points, made while replication goes on. An operator boots it to
//! rehearse the failback, and the replicas are never touched.
//!
//! Making one, per disk of the point:
//! 1. the image is copied at a batch boundary, without stopping replication for longer
//!    than the copy ([`crate::accept::MasterTarget::snapshot`]). The copy is a reflink
//!    clone where the file system can (XFS, Btrfs: instant, copy-on-write), else a
//!    sparse copy (its cost is the disk's data, not the change);
//! 2. the before-images journaled between the point and that boundary are put back into
//!    the copy, newest first ([`crate::rollback`]), in time proportional to the change
//!    since the point.
//!
//! The copies live in `<data>/test-failovers/<name>/<vm>-disk<N>.raw`, with
//! `test-failover.json` (versioned: [`TEST_FAILOVER_VERSION`]) describing them. It is
//! written last, so a directory without it is an unfinished copy. Writing to a copy
//! changes nothing of the replica: they are different files (a clone's shared extents
//! are copied on write by the file system). Deleting removes the directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fbr_protocol::StreamId;
use serde::{Deserialize, Serialize};

use crate::accept::MasterTarget;
use crate::files::journal_path;
use crate::replica::CopyMethod;
use crate::rollback;
use crate::store::ReplicaIndex;

/// Where test failovers live, under the data directory.
pub const TEST_FAILOVER_DIR: &str = "test-failovers";
/// The description written in each test failover's directory.
pub const MANIFEST_FILE: &str = "test-failover.json";
/// Version of that description.
pub const TEST_FAILOVER_VERSION: u32 = 1;

/// One test failover: a group's disks at one recovery point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestFailover {
    pub version: u32,
    pub name: String,
    pub group: String,
    pub tag_id: u64,
    /// The one VM copied, when not the whole group (the failback controller's copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// When it was made, UNIX milliseconds.
    pub created_ms: u64,
    pub disks: Vec<TestDisk>,
    /// How long making it took.
    pub seconds: f64,
}

/// One disk's copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestDisk {
    pub vm: String,
    pub disk: u32,
    pub path: PathBuf,
    pub disk_size: u64,
    pub method: CopyMethod,
    /// Records journaled after the point whose changes were taken back out of the copy.
    pub records_undone: u64,
    /// Bytes those records wrote (repeats counted).
    pub restored_bytes: u64,
    /// Distinct bytes of the copy put back (each changed byte once).
    #[serde(default)]
    pub put_back_bytes: u64,
}

/// The directory of test failover `name`, which must be a plain name.
fn dir_of(data_dir: &Path, name: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if !plain {
        return Err(format!(
            "test failover name {name:?}: use 1 to 64 letters, digits, '-' or '_' (not first '-')"
        ));
    }
    Ok(data_dir.join(TEST_FAILOVER_DIR).join(name))
}

/// Makes test failover `name` of `group` at recovery point `tag`, of every disk of the
/// point or only `vm`'s (see the module docs). A failure removes what was made.
///
/// Idempotent: if `name` exists, made of the same point and VMs, it is returned as it
/// is; a directory without its description (a crash while making it) is made afresh.
pub async fn create(
    mt: &Arc<MasterTarget>,
    group: &str,
    tag: u64,
    name: &str,
    vm: Option<&str>,
) -> Result<TestFailover, String> {
    let started = Instant::now();
    let data_dir = mt.files.root().to_path_buf();
    let dir = dir_of(&data_dir, name)?;
    match std::fs::read(dir.join(MANIFEST_FILE)) {
        Ok(bytes) => {
            let tf: TestFailover =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", dir.display()))?;
            if tf.group == group && tf.tag_id == tag && tf.vm.as_deref() == vm {
                return Ok(tf);
            }
            return Err(format!(
                "test failover {name} already exists (of point {} of group {})",
                tf.tag_id, tf.group
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.exists() => {
            tracing::warn!(dir = %dir.display(), "removing an unfinished test failover");
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Err(_) => {}
    }
    let point = mt
        .store
        .recovery_points()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|p| p.group == group && p.tag_id == tag)
        .ok_or_else(|| format!("no point {tag} in group {group} (see `master-target points`)"))?;
    if !(point.complete && point.consistent) {
        return Err(format!(
            "point {tag} of group {group} is no recovery point (incomplete, or landed while a disk was stale or resyncing)"
        ));
    }
    let mut point = point;
    if let Some(vm) = vm {
        point.landed.retain(|l| l.vm == vm);
        if point.landed.is_empty() {
            return Err(format!(
                "point {tag} of group {group} has no disk of VM {vm}"
            ));
        }
    }
    std::fs::create_dir_all(dir.parent().unwrap_or(&data_dir)).map_err(|e| e.to_string())?;
    std::fs::create_dir(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!("test failover {name} already exists"),
        _ => format!("{}: {e}", dir.display()),
    })?;
    let made = make_disks(mt, &data_dir, &dir, &point).await;
    let result = made.and_then(|disks| {
        let tf = TestFailover {
            version: TEST_FAILOVER_VERSION,
            name: name.to_owned(),
            group: group.to_owned(),
            tag_id: tag,
            vm: vm.map(str::to_owned),
            created_ms: crate::replica::unix_ms(std::time::SystemTime::now()),
            disks,
            seconds: started.elapsed().as_secs_f64(),
        };
        write_manifest(&dir, &tf).map(|()| tf)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Every disk's copy of `point`, the disks side by side (each copies at its own batch
/// boundary, then takes its changes since the point back out).
async fn make_disks(
    mt: &Arc<MasterTarget>,
    data_dir: &Path,
    dir: &Path,
    point: &crate::store::RecoveryPoint,
) -> Result<Vec<TestDisk>, String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, l) in point.landed.iter().enumerate() {
        let (mt, data_dir, dir) = (mt.clone(), data_dir.to_owned(), dir.to_owned());
        let id = StreamId {
            vm: l.vm.clone(),
            disk: l.disk,
        };
        let target_end = l.journal_end;
        tasks.spawn(async move {
            let made = make_disk(&mt, &data_dir, &dir, id, target_end).await;
            (i, made)
        });
    }
    let mut disks: Vec<Option<TestDisk>> = vec![None; point.landed.len()];
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, Ok(disk))) => disks[i] = Some(disk),
            Ok((_, Err(e))) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("test failover task: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(disks.into_iter().flatten().collect()),
    }
}

/// One disk's copy: its image at a batch boundary, with the before-images between the
/// point (its tag ending at journal offset `target_end`) and that boundary put back.
async fn make_disk(
    mt: &Arc<MasterTarget>,
    data_dir: &Path,
    dir: &Path,
    id: StreamId,
    target_end: u64,
) -> Result<TestDisk, String> {
    let disk_size = mt
        .store
        .checkpoint(&id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("disk {id} is not known here"))?
        .disk_size;
    let path = dir.join(format!("{}-disk{}.raw", id.vm, id.disk));
    let snap = mt.snapshot(&id, disk_size, path.clone()).await?;
    let journal = journal_path(data_dir, &id);
    let copy = path.clone();
    let undone = tokio::task::spawn_blocking(move || -> Result<rollback::UndoPlan, String> {
        let name = journal.display().to_string();
        let j = Arc::new(File::open(&journal).map_err(|e| format!("{name}: {e}"))?);
        let plan = rollback::plan_until(j.clone(), &name, target_end, snap.journal_end)
            .map_err(|e| e.to_string())?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&copy)
            .map_err(|e| format!("{}: {e}", copy.display()))?;
        rollback::put_back(&*j, &name, &plan, &out, usize::MAX).map_err(|e| e.to_string())?;
        out.sync_all()
            .map_err(|e| format!("{}: {e}", copy.display()))?;
        Ok(plan)
    })
    .await
    .map_err(|e| format!("test failover task: {e}"))??;
    Ok(TestDisk {
        vm: id.vm.clone(),
        disk: id.disk,
        path,
        disk_size,
        method: snap.method,
        records_undone: undone.records,
        restored_bytes: undone.restored_bytes,
        put_back_bytes: undone.put_back_bytes,
    })
}

fn write_manifest(dir: &Path, tf: &TestFailover) -> Result<(), String> {
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(tf).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    std::fs::write(&tmp, json).map_err(io)?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Every finished test failover under `data_dir`, by name.
pub fn list(data_dir: &Path) -> Result<Vec<TestFailover>, String> {
    let root = data_dir.join(TEST_FAILOVER_DIR);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", root.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path().join(MANIFEST_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => out.push(
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            // Being made (or left by a crash while being made): not a test failover.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    out.sort_by(|a: &TestFailover, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Deletes test failover `name` (its copies and description); returns what it was.
pub fn delete(data_dir: &Path, name: &str) -> Result<TestFailover, String> {
    let dir = dir_of(data_dir, name)?;
    let path = dir.join(MANIFEST_FILE);
    let tf: TestFailover = match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("no test failover {name}"))
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(tf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        let d = Path::new("/data");
        assert!(dir_of(d, "drill-2026_12").is_ok());
        for bad in ["", "../x", "a/b", "-x", "x y", &"n".repeat(65)] {
            assert!(dir_of(d, bad).is_err(), "{bad:?}");
        }
    }
}
