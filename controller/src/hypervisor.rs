//! The hypervisor interface: the few things the controller asks of the platforms the
//! VMs run on (shut down, power on with disks, delete, status, and pointing a VM's
//! replication agent at a relay), behind a narrow trait
//! with two implementations:
//!
//! - [`SimulatedHypervisor`]: VMs in memory, with failure injection, for tests and the
//!   drill;
//! - [`CommandHook`]: runs the operator's script for each call (e.g. `govc` for
//!   VMware, `az` for Azure; examples in `packaging/hooks/`), with a JSON document on
//!   its stdin and one on its stdout, a timeout, and retries.
//!
//! ## The hook protocol (version 1)
//!
//! The hook is run as `HOOK ACTION` with, on stdin, one JSON document:
//! `{"version": 1, "action": "shut_down" | "power_on" | "delete" | "status" | "replicate",
//! "vm": NAME, "site": "azure" | "on_premises", "disks": [{"disk": N, "path": P}],
//! "relay": "HOST:PORT"}` (`disks` for `power_on` only: the replica images to boot
//! from; `relay` for `replicate` only: the relay the VM's agent is to send its writes
//! to, which turns replication around at reprotect back). It answers on stdout
//! with `{"version": 1, "ok": true, "state": "running" | "stopped" | "absent"}` or
//! `{"version": 1, "ok": false, "error": "...", "retry": true | false}`, and exits 0.
//! A hook that exits non-zero, prints something else, or outlives its timeout failed,
//! and is retried; `"retry": false` is final. At most 64 KiB of output is read.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which platform a VM is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    Azure,
    OnPremises,
}

/// A VM on a site.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmRef {
    pub vm: String,
    pub site: Site,
}

/// A disk to boot from: a replica's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    pub disk: u32,
    pub path: PathBuf,
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Stopped,
    /// It does not exist (deleted, or never made).
    Absent,
}

/// Why a call failed; `retry`: whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} {vm}: {reason}")]
pub struct HypervisorError {
    pub action: &'static str,
    pub vm: String,
    pub reason: String,
    pub retry: bool,
}

/// The hypervisor, as the controller's driver sees it. Calls block (a driver runs them
/// off its async runtime) and are idempotent: shutting down a stopped VM, deleting an
/// absent one, or pointing an agent at the relay it already sends to, succeeds.
pub trait Hypervisor: Send + Sync {
    fn shut_down(&self, vm: &VmRef) -> Result<(), HypervisorError>;
    fn power_on(&self, vm: &VmRef, disks: &[DiskImage]) -> Result<(), HypervisorError>;
    fn delete(&self, vm: &VmRef) -> Result<(), HypervisorError>;
    fn status(&self, vm: &VmRef) -> Result<PowerState, HypervisorError>;
    /// Has the replication agent in `vm` send its disks' writes to `relay`
    /// (`host:port`), resyncing against the replica there: how reprotect back turns
    /// replication around.
    fn replicate(&self, vm: &VmRef, relay: &str) -> Result<(), HypervisorError>;
}

/// VMs in memory: they exist and run until shut down or deleted; powering one on
/// records its disks. Failures can be injected per action.
#[derive(Debug, Default)]
pub struct SimulatedHypervisor {
    state: Mutex<SimState>,
}

#[derive(Debug, Default)]
struct SimState {
    vms: std::collections::BTreeMap<VmRef, (PowerState, Vec<DiskImage>)>,
    /// The relay each VM's agent was pointed at.
    relays: std::collections::BTreeMap<VmRef, String>,
    /// Calls of an action that fail next, and whether they may be retried.
    failures: Vec<(&'static str, String, bool)>,
    calls: Vec<(&'static str, VmRef)>,
}

impl SimulatedHypervisor {
    /// A hypervisor where `vms` exist and run.
    pub fn with_running(vms: &[VmRef]) -> Self {
        let sim = SimulatedHypervisor::default();
        {
            let mut s = sim.lock();
            for vm in vms {
                s.vms.insert(vm.clone(), (PowerState::Running, vec![]));
            }
        }
        sim
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `action` fails with `reason` (`retry`: transiently).
    pub fn fail_next(&self, action: &'static str, reason: &str, retry: bool) {
        self.lock()
            .failures
            .push((action, reason.to_owned(), retry));
    }

    /// The relay `vm`'s agent was last pointed at.
    pub fn relay_of(&self, vm: &VmRef) -> Option<String> {
        self.lock().relays.get(vm).cloned()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<(&'static str, VmRef)> {
        self.lock().calls.clone()
    }

    /// The disks `vm` was last powered on with.
    pub fn disks_of(&self, vm: &VmRef) -> Vec<DiskImage> {
        self.lock()
            .vms
            .get(vm)
            .map(|v| v.1.clone())
            .unwrap_or_default()
    }

    fn call(&self, action: &'static str, vm: &VmRef) -> Result<(), HypervisorError> {
        let mut s = self.lock();
        s.calls.push((action, vm.clone()));
        if let Some(i) = s.failures.iter().position(|f| f.0 == action) {
            let (_, reason, retry) = s.failures.remove(i);
            return Err(HypervisorError {
                action,
                vm: vm.vm.clone(),
                reason,
                retry,
            });
        }
        Ok(())
    }
}

impl Hypervisor for SimulatedHypervisor {
    fn shut_down(&self, vm: &VmRef) -> Result<(), HypervisorError> {
        self.call("shut_down", vm)?;
        if let Some(v) = self.lock().vms.get_mut(vm) {
            v.0 = PowerState::Stopped;
        }
        Ok(())
    }

    fn power_on(&self, vm: &VmRef, disks: &[DiskImage]) -> Result<(), HypervisorError> {
        self.call("power_on", vm)?;
        self.lock()
            .vms
            .insert(vm.clone(), (PowerState::Running, disks.to_vec()));
        Ok(())
    }

    fn delete(&self, vm: &VmRef) -> Result<(), HypervisorError> {
        self.call("delete", vm)?;
        self.lock().vms.remove(vm);
        Ok(())
    }

    fn status(&self, vm: &VmRef) -> Result<PowerState, HypervisorError> {
        self.call("status", vm)?;
        Ok(self.lock().vms.get(vm).map_or(PowerState::Absent, |v| v.0))
    }

    fn replicate(&self, vm: &VmRef, relay: &str) -> Result<(), HypervisorError> {
        self.call("replicate", vm)?;
        let mut s = self.lock();
        if !s.vms.contains_key(vm) {
            return Err(HypervisorError {
                action: "replicate",
                vm: vm.vm.clone(),
                reason: "no such VM".into(),
                retry: false,
            });
        }
        s.relays.insert(vm.clone(), relay.to_owned());
        Ok(())
    }
}

/// The operator's script, run for every call (see the module documentation).
#[derive(Debug, Clone)]
pub struct CommandHook {
    pub program: PathBuf,
    /// Longest one run may take before it is killed.
    pub timeout: Duration,
    /// Runs after the first that fail transiently, with a delay doubling from
    /// `retry_delay`.
    pub retries: u32,
    pub retry_delay: Duration,
    /// Extra environment for the hook (e.g. `GOVC_URL`, `AZ_RESOURCE_GROUP`).
    pub env: Vec<(String, String)>,
}

/// "Text file busy" (Linux).
const ETXTBSY: i32 = 26;

/// Most bytes of a hook's output read.
const MAX_HOOK_OUTPUT: u64 = 64 * 1024;

#[derive(Serialize)]
struct HookRequest<'a> {
    version: u32,
    action: &'a str,
    vm: &'a str,
    site: Site,
    disks: &'a [DiskImage],
    #[serde(skip_serializing_if = "Option::is_none")]
    relay: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookAnswer {
    version: u32,
    ok: bool,
    #[serde(default)]
    state: Option<PowerState>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retry: Option<bool>,
}

impl CommandHook {
    /// `program` with a 5-minute timeout and 3 retries from 2 s.
    pub fn new(program: PathBuf) -> Self {
        CommandHook {
            program,
            timeout: Duration::from_secs(300),
            retries: 3,
            retry_delay: Duration::from_secs(2),
            env: Vec::new(),
        }
    }

    fn call(
        &self,
        action: &'static str,
        vm: &VmRef,
        disks: &[DiskImage],
        relay: Option<&str>,
    ) -> Result<Option<PowerState>, HypervisorError> {
        let mut delay = self.retry_delay;
        let mut attempt = 0;
        loop {
            match self.run_once(action, vm, disks, relay) {
                Ok(state) => return Ok(state),
                Err(e) if e.retry && attempt < self.retries => {
                    report_retry(&e, attempt);
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn run_once(
        &self,
        action: &'static str,
        vm: &VmRef,
        disks: &[DiskImage],
        relay: Option<&str>,
    ) -> Result<Option<PowerState>, HypervisorError> {
        let fail = |reason: String, retry: bool| HypervisorError {
            action,
            vm: vm.vm.clone(),
            reason,
            retry,
        };
        let request = serde_json::to_vec(&HookRequest {
            version: 1,
            action,
            vm: &vm.vm,
            site: vm.site,
            disks,
            relay,
        })
        .map_err(|e| fail(e.to_string(), false))?;
        let spawn = || {
            Command::new(&self.program)
                .arg(action)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        };
        // ETXTBSY: the script is open for writing somewhere (just replaced, or another
        // thread forked while writing it): that passes within moments.
        let mut tries = 0;
        let mut child = loop {
            match spawn() {
                Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => {
                    break other.map_err(|e| {
                        fail(format!("cannot run {}: {e}", self.program.display()), false)
                    })?
                }
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its input is its own business.
            let _ = stdin.write_all(&request);
        }
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stdout).take(MAX_HOOK_OUTPUT).read_to_end(&mut buf);
            buf
        });
        let err = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(MAX_HOOK_OUTPUT).read_to_end(&mut buf);
            buf
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(
                        format!(
                            "the hook did not finish within {} s",
                            self.timeout.as_secs()
                        ),
                        true,
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(fail(e.to_string(), true)),
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            return Err(fail(
                format!(
                    "the hook exited with {status}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                ),
                true,
            ));
        }
        let answer: HookAnswer = serde_json::from_slice(&stdout).map_err(|e| {
            fail(
                format!(
                    "the hook's answer is not a version-1 JSON document ({e}): {:?}",
                    String::from_utf8_lossy(&stdout)
                ),
                true,
            )
        })?;
        if answer.version != 1 {
            return Err(fail(
                format!("the hook answers version {}", answer.version),
                false,
            ));
        }
        if !answer.ok {
            return Err(fail(
                answer.error.unwrap_or_else(|| "the hook failed".into()),
                answer.retry.unwrap_or(true),
            ));
        }
        Ok(answer.state)
    }
}

/// Retries are reported on stderr (this crate has no logger; the driver's is its own).
fn report_retry(e: &HypervisorError, attempt: u32) {
    eprintln!("hypervisor hook: {e}; retry {}", attempt + 1);
}

impl Hypervisor for CommandHook {
    fn shut_down(&self, vm: &VmRef) -> Result<(), HypervisorError> {
        self.call("shut_down", vm, &[], None).map(drop)
    }

    fn power_on(&self, vm: &VmRef, disks: &[DiskImage]) -> Result<(), HypervisorError> {
        self.call("power_on", vm, disks, None).map(drop)
    }

    fn delete(&self, vm: &VmRef) -> Result<(), HypervisorError> {
        self.call("delete", vm, &[], None).map(drop)
    }

    fn status(&self, vm: &VmRef) -> Result<PowerState, HypervisorError> {
        self.call("status", vm, &[], None)?
            .ok_or_else(|| HypervisorError {
                action: "status",
                vm: vm.vm.clone(),
                reason: "the hook answered no state".into(),
                retry: false,
            })
    }

    fn replicate(&self, vm: &VmRef, relay: &str) -> Result<(), HypervisorError> {
        self.call("replicate", vm, &[], Some(relay)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn vm(name: &str, site: Site) -> VmRef {
        VmRef {
            vm: name.into(),
            site,
        }
    }

    #[test]
    fn the_simulated_hypervisor_follows_calls_and_injects_failures() {
        let azure = vm("vm1", Site::Azure);
        let onprem = vm("vm1", Site::OnPremises);
        let h = SimulatedHypervisor::with_running(std::slice::from_ref(&azure));
        assert_eq!(h.status(&azure).unwrap(), PowerState::Running);
        h.shut_down(&azure).unwrap();
        assert_eq!(h.status(&azure).unwrap(), PowerState::Stopped);
        h.fail_next("power_on", "no host has room", true);
        let disks = [DiskImage {
            disk: 0,
            path: "/data/vm1/disk0/image.raw".into(),
        }];
        let e = h.power_on(&onprem, &disks).unwrap_err();
        assert!(e.retry && e.to_string().contains("no host has room"), "{e}");
        h.power_on(&onprem, &disks).unwrap();
        assert_eq!(h.disks_of(&onprem), disks);
        h.delete(&azure).unwrap();
        h.delete(&azure).unwrap();
        assert_eq!(h.status(&azure).unwrap(), PowerState::Absent);
        assert_eq!(h.replicate(&azure, "r:1").unwrap_err().reason, "no such VM");
        h.replicate(&onprem, "relay-onprem:7777").unwrap();
        assert_eq!(h.relay_of(&onprem).as_deref(), Some("relay-onprem:7777"));
        assert_eq!(h.calls().len(), 10);
    }

    /// A hook script in a temporary directory.
    fn hook(dir: &std::path::Path, body: &str) -> CommandHook {
        let path = dir.join("hook");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        CommandHook {
            program: path,
            timeout: Duration::from_secs(5),
            retries: 2,
            retry_delay: Duration::from_millis(10),
            env: Vec::new(),
        }
    }

    #[test]
    fn a_command_hook_gets_the_request_on_stdin_and_answers_on_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen.json");
        let h = hook(
            dir.path(),
            &format!(
                "cat > {}; echo '{{\"version\": 1, \"ok\": true, \"state\": \"running\"}}'",
                seen.display()
            ),
        );
        let on = vm("sql01", Site::OnPremises);
        let disks = [DiskImage {
            disk: 1,
            path: "/d/img".into(),
        }];
        h.power_on(&on, &disks).unwrap();
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&seen).unwrap()).unwrap();
        assert_eq!(
            request,
            serde_json::json!({"version": 1, "action": "power_on", "vm": "sql01",
                "site": "on_premises", "disks": [{"disk": 1, "path": "/d/img"}]})
        );
        assert_eq!(h.status(&on).unwrap(), PowerState::Running);
        h.replicate(&on, "relay.example:7777").unwrap();
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&seen).unwrap()).unwrap();
        assert_eq!(
            request,
            serde_json::json!({"version": 1, "action": "replicate", "vm": "sql01",
                "site": "on_premises", "disks": [], "relay": "relay.example:7777"})
        );
    }

    #[test]
    fn a_failing_slow_or_garbled_hook_is_retried_then_reported() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        // Fails twice (exit 1, then garbage), then answers.
        let h = hook(
            dir.path(),
            &format!(
                "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
                 [ $n -eq 1 ] && {{ echo 'vCenter unreachable' >&2; exit 1; }}\n\
                 [ $n -eq 2 ] && {{ echo 'not json'; exit 0; }}\n\
                 echo '{{\"version\": 1, \"ok\": true}}'",
                c = count.display()
            ),
        );
        h.shut_down(&vm("vm1", Site::Azure)).unwrap();
        assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
        // A final refusal is not retried.
        let h = hook(
            dir.path(),
            "echo '{\"version\": 1, \"ok\": false, \"error\": \"no such VM\", \"retry\": false}'",
        );
        let e = h.delete(&vm("vm9", Site::Azure)).unwrap_err();
        assert!(!e.retry && e.reason == "no such VM", "{e}");
        // A hook that hangs is killed at its timeout, every attempt.
        let mut h = hook(dir.path(), "sleep 30");
        h.timeout = Duration::from_millis(200);
        h.retries = 1;
        let started = Instant::now();
        let e = h.shut_down(&vm("vm1", Site::Azure)).unwrap_err();
        assert!(e.reason.contains("did not finish within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A hook that cannot be run says so, once.
        let h = CommandHook::new(dir.path().join("missing"));
        let e = h.status(&vm("vm1", Site::Azure)).unwrap_err();
        assert!(!e.retry && e.reason.contains("cannot run"), "{e}");
    }
}
