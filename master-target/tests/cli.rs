//! The `master-target` command line.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::process::Command;

fn mt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_master-target"))
}

#[test]
fn invalid_values_exit_64() {
    let out = mt()
        .args([
            "run",
            "--data",
            "/tmp/x",
            "--pki-dir",
            "/tmp/y",
            "--credit-mib",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`credit`"));
}

#[test]
fn points_of_an_empty_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = mt()
        .args(["points", "--json", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"version":1,"groups":[],"vms":[]}"#
    );
}

#[test]
fn materialize_refuses_unknown_points() {
    let dir = tempfile::tempdir().unwrap();
    let out = mt()
        .args([
            "materialize",
            "--group",
            "g",
            "--tag",
            "1",
            "--vm",
            "vm1",
            "--disk",
            "0",
            "--data",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recovery point 1 in group g"));
}
