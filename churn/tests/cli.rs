//! The `churn` command line: usage errors exit 64 with a message naming the flag.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::process::Command;

fn churn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_churn"))
}

#[test]
fn usage_errors_exit_64_naming_the_flag() {
    for (args, needle) in [
        (vec!["drill", "--vms", "0"], "--vms"),
        (vec!["drill", "--disk-size", "1000"], "--disk-size"),
        (vec!["drill", "--seconds", "0"], "--seconds"),
        (vec!["bench", "--disk-size", "12x"], "disk-size"),
    ] {
        let out = churn().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(64) | Some(2)),
            "{args:?}: {:?} {err}",
            out.status
        );
        assert!(
            err.contains(needle),
            "{args:?}: message should name {needle}: {err}"
        );
    }
}

#[test]
fn verify_of_a_missing_manifest_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = churn()
        .args(["verify", "--manifest"])
        .arg(dir.path().join("nope.json"))
        .arg("--master-data")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.json"));
}
