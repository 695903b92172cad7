//! The controller's persistent state: one redb database (`controller.redb`), every
//! change of a call written in one transaction ([`Controller::take_changes`]), so a
//! kill -9 leaves the state of the last call that was saved. The driver saves before it
//! acts on what a call returned (a step is started only once its start is durable);
//! frequent progress updates may be saved in batches (losing some progress to a crash
//! is harmless: the step is issued again and reports anew).
//!
//! | table | key | value |
//! |---|---|---|
//! | `vms` | VM name | [`crate::controller::VmRecord`], JSON |
//! | `jobs` | job id | [`crate::job::Job`], JSON |

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::controller::{Changes, Controller};

const VMS: TableDefinition<&str, &str> = TableDefinition::new("vms");
const JOBS: TableDefinition<u64, &str> = TableDefinition::new("jobs");

/// The file's name in the directory the driver gives.
pub const STORE_FILE: &str = "controller.redb";

#[derive(Debug, thiserror::Error)]
#[error("controller state {path}: {reason}")]
pub struct StoreError {
    path: String,
    reason: String,
}

/// The open database (one process at a time).
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: String,
}

impl Store {
    /// Opens (or creates) `dir/controller.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STORE_FILE);
        let shown = path.display().to_string();
        let err = |reason: String| StoreError {
            path: shown.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        let tx = db.begin_write().map_err(|e| err(e.to_string()))?;
        tx.open_table(VMS).map_err(|e| err(e.to_string()))?;
        tx.open_table(JOBS).map_err(|e| err(e.to_string()))?;
        tx.commit().map_err(|e| err(e.to_string()))?;
        Ok(Store { db, path: shown })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The controller as last saved, ready to issue again the steps that were running.
    pub fn load(&self) -> Result<Controller, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut vms = Vec::new();
        for row in tx
            .open_table(VMS)
            .map_err(|e| self.err(e))?
            .iter()
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let record = serde_json::from_str(v.value()).map_err(|e| self.err(e))?;
            vms.push((k.value().to_owned(), record));
        }
        let mut jobs = Vec::new();
        for row in tx
            .open_table(JOBS)
            .map_err(|e| self.err(e))?
            .iter()
            .map_err(|e| self.err(e))?
        {
            let (_, v) = row.map_err(|e| self.err(e))?;
            jobs.push(serde_json::from_str(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(Controller::from_records(vms, jobs))
    }

    /// Writes `changes` in one transaction (nothing if there are none).
    pub fn save(&self, changes: &Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut vms = tx.open_table(VMS).map_err(|e| self.err(e))?;
            for (name, record) in &changes.vms {
                let json = serde_json::to_string(record).map_err(|e| self.err(e))?;
                vms.insert(name.as_str(), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
            let mut jobs = tx.open_table(JOBS).map_err(|e| self.err(e))?;
            for job in &changes.jobs {
                let json = serde_json::to_string(job).map_err(|e| self.err(e))?;
                jobs.insert(job.id, json.as_str())
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Action, Facts, JobRequest, PointCounts, StepOutcome};
    use crate::job::{JobState, Operation, PointChoice, ReprotectLocation};
    use crate::vm::Protection;

    fn facts() -> Facts {
        Facts {
            config_server_connected: true,
            master_target_reachable: true,
            points: [(
                "vm1".to_owned(),
                PointCounts {
                    all: 2,
                    app_consistent: 1,
                },
            )]
            .into(),
            ..Facts::default()
        }
    }

    fn request(operation: Operation) -> JobRequest {
        JobRequest {
            operation,
            vms: vec!["vm1".into()],
            idempotency_key: Some(format!("key-{}", rand_suffix())),
            estimate_s: None,
            boot: None,
            boot_delay_s: 0,
            step_estimates_s: Default::default(),
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    /// Drives `ops` to the end, saving after every call and, before step `crash_at` of
    /// the whole run, dropping everything but the database and loading it again.
    fn run(dir: &Path, ops: &[Operation], crash_at: usize) -> Controller {
        let mut store = Store::open(dir).unwrap();
        let mut c = store.load().unwrap();
        c.add_vm("vm1");
        store.save(&c.take_changes()).unwrap();
        let mut steps_run = 0;
        let mut now = 0;
        for op in ops {
            let id = c.request(request(op.clone()), &facts(), now).unwrap();
            store.save(&c.take_changes()).unwrap();
            loop {
                let actions = c.next_actions(now);
                store.save(&c.take_changes()).unwrap();
                let Some(Action::RunStep { step, .. }) = actions.into_iter().next() else {
                    break;
                };
                if steps_run == crash_at {
                    // kill -9: the process's memory is gone, the database is not.
                    drop(c);
                    drop(store);
                    store = Store::open(dir).unwrap();
                    c = store.load().unwrap();
                    let again = c.next_actions(now);
                    assert!(
                        matches!(again.as_slice(), [Action::RunStep { job, step: s, .. }] if *job == id && *s == step),
                        "the running step is issued again: {again:?}"
                    );
                }
                steps_run += 1;
                now += 1;
                c.step_finished(id, step, StepOutcome::Done { note: None }, now)
                    .unwrap();
                store.save(&c.take_changes()).unwrap();
            }
            assert_eq!(c.job(id).unwrap().state, JobState::Succeeded);
        }
        c
    }

    #[test]
    fn a_kill_at_every_step_of_a_reprotect_and_a_failover_resumes_from_the_store() {
        let ops = [
            Operation::Reprotect {
                location: ReprotectLocation::Original,
                retention: None,
            },
            Operation::Failover {
                point: PointChoice::Latest,
                planned: true,
            },
        ];
        let total: usize = ops.iter().map(|o| o.steps().len()).sum();
        for crash_at in 0..total {
            let dir = tempfile::tempdir().unwrap();
            let c = run(dir.path(), &ops, crash_at);
            assert_eq!(c.vm("vm1").unwrap().protection, Protection::FailedOver);
            // What is on disk is what the controller holds.
            let loaded = Store::open(dir.path()).unwrap().load().unwrap();
            assert_eq!(
                serde_json::to_value(&loaded).unwrap(),
                serde_json::to_value(&c).unwrap(),
                "crash at step {crash_at}"
            );
        }
    }

    #[test]
    fn idempotency_keys_and_job_numbers_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut c = store.load().unwrap();
        c.add_vm("vm1");
        let r = JobRequest {
            idempotency_key: Some("once".into()),
            ..request(Operation::Reprotect {
                location: ReprotectLocation::Alternate,
                retention: None,
            })
        };
        let id = c.request(r.clone(), &facts(), 0).unwrap();
        store.save(&c.take_changes()).unwrap();
        drop(store);
        let mut c = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(c.request(r, &facts(), 1).unwrap(), id, "the same job");
        c.cancel(id, 2).unwrap();
        let next = c
            .request(
                request(Operation::Reprotect {
                    location: ReprotectLocation::Alternate,
                    retention: None,
                }),
                &facts(),
                3,
            )
            .unwrap();
        assert_eq!(next, id + 1, "numbers go on after a reload");
    }
}
