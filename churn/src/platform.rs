//! The failback drill's emulated platforms: the hypervisor hook the relay's controller
//! runs (`churn vm-hook --state-dir DIR ACTION`, the protocol of docs/CONTROLLER.md:
//! one JSON request on stdin, one answer on stdout), over a directory the drill shares
//! with it.
//!
//! One directory per site (Azure, on-premises). Per VM, in it:
//! - `<vm>.state`: `running`, `stopped` or `absent` (no file: absent);
//! - `<vm>.shutdown`: a shut-down asked by the hook; the drill's agents stop writing the
//!   VM ([`crate::agent::PowerSwitch`]), and once its last write and a tag after it are
//!   at the relay, the drill writes `stopped`, which the hook waits for;
//! - `<vm>.disks.json`: the disks it was powered on with (on-premises: the failover
//!   copies the drill compares with the sources).
//! - `<vm>.relay`: the relay its agent was pointed at (`replicate`, reprotect back);
//!   the drill starts the VM's agent there.
//!
//! - `<action>.pause`: while it exists, calls of that action wait (up to 2 minutes):
//!   tests hold a step this way to kill the relay while it runs.
//!
//! Files are replaced whole (written aside, then renamed), so a reader never sees half.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest the hook waits for the drill to stop a VM.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(120);

/// A disk a VM was powered on with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoweredDisk {
    pub disk: u32,
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
struct HookRequest {
    version: u32,
    action: String,
    vm: String,
    #[serde(default)]
    disks: Vec<PoweredDisk>,
    #[serde(default)]
    relay: Option<String>,
}

fn state_path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.state"))
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Sets `vm`'s power state in `dir`.
pub fn set_state(dir: &Path, vm: &str, state: &str) -> std::io::Result<()> {
    write_whole(&state_path(dir, vm), state.as_bytes())
}

/// `vm`'s power state in `dir` (`absent` when it has none).
pub fn state(dir: &Path, vm: &str) -> String {
    std::fs::read_to_string(state_path(dir, vm))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "absent".into())
}

/// The disks `vm` was last powered on with, if it was.
pub fn powered_disks(dir: &Path, vm: &str) -> Option<Vec<PoweredDisk>> {
    let bytes = std::fs::read(dir.join(format!("{vm}.disks.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Runs one hook call: reads the request from stdin, prints the answer. The exit
/// status is 0 whenever an answer was printed (the answer says whether it worked).
/// `agents`: the platform's VMs are the drill's agents, which carry out shut-downs
/// (Azure); otherwise a VM stops when asked (on-premises).
pub fn hook(dir: &Path, action: &str, agents: bool) -> i32 {
    let answer = match answer(dir, action, agents) {
        Ok(state) => serde_json::json!({"version": 1, "ok": true, "state": state}),
        Err((error, retry)) => {
            serde_json::json!({"version": 1, "ok": false, "error": error, "retry": retry})
        }
    };
    println!("{answer}");
    0
}

fn answer(dir: &Path, action: &str, agents: bool) -> Result<String, (String, bool)> {
    let mut input = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .map_err(|e| (format!("reading the request: {e}"), false))?;
    let req: HookRequest =
        serde_json::from_str(&input).map_err(|e| (format!("the request: {e}"), false))?;
    if req.version != 1 || req.action != action {
        return Err((
            format!(
                "request version {} action {:?} on the command line {action:?}",
                req.version, req.action
            ),
            false,
        ));
    }
    if req.vm.is_empty() || req.vm.contains('/') || req.vm.starts_with('.') {
        return Err((format!("VM name {:?}", req.vm), false));
    }
    let io = |e: std::io::Error| (format!("{}: {e}", dir.display()), true);
    let vm = req.vm.as_str();
    // A test holds an action here (to kill the relay while the step runs).
    let pause = dir.join(format!("{action}.pause"));
    let held_until = Instant::now() + SHUTDOWN_WAIT;
    while pause.exists() && Instant::now() < held_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    match action {
        "status" => Ok(state(dir, vm)),
        "shut_down" => {
            match state(dir, vm).as_str() {
                "absent" => return Ok("absent".into()),
                "stopped" => return Ok("stopped".into()),
                _ => {}
            }
            if !agents {
                set_state(dir, vm, "stopped").map_err(io)?;
                return Ok("stopped".into());
            }
            write_whole(&dir.join(format!("{vm}.shutdown")), b"asked").map_err(io)?;
            let deadline = Instant::now() + SHUTDOWN_WAIT;
            while Instant::now() < deadline {
                if state(dir, vm) == "stopped" {
                    return Ok("stopped".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((format!("{vm} did not stop within {SHUTDOWN_WAIT:?}"), true))
        }
        "power_on" => {
            let disks =
                serde_json::to_vec_pretty(&req.disks).map_err(|e| (e.to_string(), false))?;
            write_whole(&dir.join(format!("{vm}.disks.json")), &disks).map_err(io)?;
            set_state(dir, vm, "running").map_err(io)?;
            Ok("running".into())
        }
        "delete" => {
            set_state(dir, vm, "absent").map_err(io)?;
            Ok("absent".into())
        }
        "replicate" => {
            let relay = req.relay.as_deref().unwrap_or_default();
            if relay.is_empty() {
                return Err(("replicate names no relay".into(), false));
            }
            if state(dir, vm) != "running" {
                return Err((format!("{vm} is not running here"), false));
            }
            write_whole(&dir.join(format!("{vm}.relay")), relay.as_bytes()).map_err(io)?;
            Ok("running".into())
        }
        other => Err((format!("unknown action {other:?}"), false)),
    }
}

/// Writes an executable hook script at `path` that runs this program's `vm-hook` over
/// `dir` (the relay runs hooks as `HOOK ACTION`); `agents` as for [`hook`].
pub fn write_hook_script(
    path: &Path,
    churn: &Path,
    dir: &Path,
    agents: bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let script = format!(
        "#!/bin/sh\n# The failback drill's emulated hypervisor (churn/src/platform.rs).\nexec {} vm-hook --state-dir {}{} \"$@\"\n",
        quote(churn),
        quote(dir),
        if agents { " --agents" } else { "" }
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, script)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, path)
}

/// The relay `vm`'s agent was pointed at (`replicate`), if it was.
pub fn pointed_at(dir: &Path, vm: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("{vm}.relay")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Carries out the shut-downs the hook asks for on the emulated Azure VMs, until the
/// task is dropped. A VM deleted while running (the commit of an unplanned failover)
/// stops writing too: its disks are what it left.
pub async fn serve_shutdowns(dir: PathBuf, vms: Vec<String>, switch: crate::agent::PowerSwitch) {
    let mut deleted = std::collections::BTreeSet::new();
    loop {
        for vm in &vms {
            if state(&dir, vm) == "absent" && deleted.insert(vm.clone()) {
                if let Err(e) = switch.shut_down_vm(vm, SHUTDOWN_WAIT).await {
                    tracing::warn!("stopping deleted {vm}: {e}");
                }
            }
            let asked = dir.join(format!("{vm}.shutdown"));
            if asked.exists() && state(&dir, vm) == "running" {
                match switch.shut_down_vm(vm, SHUTDOWN_WAIT).await {
                    Ok(()) => {
                        let _ = set_state(&dir, vm, "stopped");
                        let _ = std::fs::remove_file(&asked);
                    }
                    Err(e) => tracing::warn!("shutting {vm} down: {e}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
