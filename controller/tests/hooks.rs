//! The example hypervisor hooks of `packaging/hooks/` (`govc-hook`, `az-hook`), run
//! through [`CommandHook`] against stand-ins for `govc` and `az` that log what they are
//! asked: each answers the protocol, does what the action means, and refuses the other
//! site's VMs without a retry.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbr_controller::hypervisor::{CommandHook, DiskImage, Hypervisor, PowerState, Site, VmRef};

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn example(name: &str, fakes: &Path, extra: &[(&str, &str)]) -> CommandHook {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut hook = CommandHook::new(repo.join("packaging/hooks").join(name));
    hook.retries = 0;
    hook.timeout = Duration::from_secs(20);
    let path = format!("{}:{}", fakes.display(), std::env::var("PATH").unwrap());
    hook.env.push(("PATH".into(), path));
    hook.env
        .push(("LOG".into(), fakes.join("log").display().to_string()));
    for (k, v) in extra {
        hook.env.push((k.to_string(), v.to_string()));
    }
    hook
}

fn vm(name: &str, site: Site) -> VmRef {
    VmRef {
        vm: name.into(),
        site,
    }
}

fn log(fakes: &Path) -> String {
    std::fs::read_to_string(fakes.join("log")).unwrap_or_default()
}

#[test]
fn the_example_hooks_speak_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let fakes: PathBuf = dir.path().to_owned();
    script(
        &fakes,
        "govc",
        r#"case "$1" in
vm.info) [ "$3" = ghost ] && { echo '{"virtualMachines": null}'; exit 0; }
         echo '{"virtualMachines":[{"runtime":{"powerState":"poweredOff"}}]}';;
*) echo "govc $*" >> "$LOG";;
esac"#,
    );
    script(
        &fakes,
        "az",
        r#"case "$2" in
get-instance-view) [ "$6" = ghost ] && { echo "ERROR: (ResourceNotFound)" >&2; exit 3; }
                   echo "PowerState/running";;
*) echo "az $*" >> "$LOG";;
esac"#,
    );
    let govc = example("govc-hook", &fakes, &[]);
    let onprem = vm("sql01", Site::OnPremises);
    assert_eq!(govc.status(&onprem).unwrap(), PowerState::Stopped);
    assert_eq!(
        govc.status(&vm("ghost", Site::OnPremises)).unwrap(),
        PowerState::Absent
    );
    let disks = [DiskImage {
        disk: 0,
        path: "/var/lib/master-target/sql01/disk0/image.raw".into(),
    }];
    govc.power_on(&onprem, &disks).unwrap();
    govc.shut_down(&onprem).unwrap(); // already off: nothing to do
    govc.delete(&onprem).unwrap();
    // Reprotect back: the guest's agent is pointed at the relay, given a guest login.
    let e = govc.replicate(&onprem, "10.0.0.5:7777").unwrap_err();
    assert!(!e.retry && e.reason.contains("GOVC_GUEST_LOGIN"), "{e}");
    example("govc-hook", &fakes, &[("GOVC_GUEST_LOGIN", "root:secret")])
        .replicate(&onprem, "10.0.0.5:7777")
        .unwrap();
    assert_eq!(
        log(&fakes),
        "govc vm.power -on sql01\ngovc vm.destroy sql01\n\
         govc guest.run -vm sql01 -l root:secret /usr/local/sbin/replication-agent-relay 10.0.0.5:7777\n"
    );
    let e = govc.shut_down(&vm("sql01", Site::Azure)).unwrap_err();
    assert!(!e.retry && e.reason.contains("on-premises"), "{e}");

    std::fs::remove_file(fakes.join("log")).unwrap();
    let az = example("az-hook", &fakes, &[("AZ_RESOURCE_GROUP", "rg-failover")]);
    let azure = vm("sql01", Site::Azure);
    assert_eq!(az.status(&azure).unwrap(), PowerState::Running);
    assert_eq!(
        az.status(&vm("ghost", Site::Azure)).unwrap(),
        PowerState::Absent
    );
    az.shut_down(&azure).unwrap();
    az.delete(&vm("ghost", Site::Azure)).unwrap(); // gone already
    az.delete(&azure).unwrap();
    assert_eq!(
        log(&fakes),
        "az vm deallocate --resource-group rg-failover --name sql01\n\
         az vm delete --yes --resource-group rg-failover --name sql01\n"
    );
    // Without its resource group the hook fails, and says why.
    let e = example("az-hook", &fakes, &[]).status(&azure).unwrap_err();
    assert!(e.reason.contains("AZ_RESOURCE_GROUP"), "{e}");
}
