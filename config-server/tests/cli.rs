//! The `config-server` binary's offline commands. (Being an integration test, this also
//! makes `cargo test --workspace` build the binary, which the end-to-end tests run.)
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::process::Command;

fn config_server(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_config-server"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_makes_a_site_once_and_check_config_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("site");
    let data = data.to_str().unwrap();
    let out = config_server(&["init", "--data", data, "--iterations", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--iterations 5"));
    let out = config_server(&["init", "--data", data, "--iterations", "10000", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["passphrase"].as_str().unwrap().len(), 23);
    let again = config_server(&["init", "--data", data, "--iterations", "10000"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a site"));
    let listed = config_server(&["components", "--data", data, "--json"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");

    let config = dir.path().join("cs.toml");
    std::fs::write(&config, "listne = \"0.0.0.0:443\"\n").unwrap();
    let out = config_server(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listne"));
}
