//! Layered configuration of `relay` and `master-target`: every kind of bad value exits
//! 64 with a message naming the key; `check-config` shows the merged result.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::path::Path;
use std::process::{Command, Output};

fn relay(config: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(fbr_churn::harness::bin_path("relay").unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("RELAY_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn config_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("relay.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const VALID: &str = r#"
pki_dir = "/etc/relay/pki"
[master_target]
address = "10.1.2.3:9444"
[cache]
dir = "/var/lib/relay/cache"
capacity = "200GiB"
[egress]
schedule = "mon-fri 09:00-18:00 100mbit; other unlimited"
[egress.vm_weights]
sql01 = 4
"#;

#[track_caller]
fn assert_usage_error(out: &Output, key: &str, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {err}");
    assert!(
        err.contains(&format!("`{key}`")),
        "error should name {key}: {err}"
    );
    assert!(err.contains(reason), "error should say {reason:?}: {err}");
}

#[test]
fn check_config_prints_the_merged_settings_with_layers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), VALID);
    // File, then environment, then flags.
    let out = relay(
        &file,
        &[
            ("RELAY_CACHE__CAPACITY", "300GiB"),
            ("RELAY_INGEST__CREDIT", "8MiB"),
        ],
        &["--credit-mib", "32"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("configuration is valid"), "{text}");
    assert!(text.contains("address = \"10.1.2.3:9444\""), "{text}");
    assert!(
        text.contains("capacity = \"300GiB\""),
        "env overrides file: {text}"
    );
    assert!(
        text.contains("credit = \"32MiB\""),
        "flag overrides env: {text}"
    );
    assert!(text.contains("sql01 = 4"), "{text}");
    assert!(
        text.contains("throttle_free_percent = 20.0"),
        "defaults shown: {text}"
    );
}

#[test]
fn unknown_keys_are_refused_wherever_they_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(
        dir.path(),
        &format!("{VALID}\n[health]\ncache_free_warn_percent = 30\n"),
    );
    assert_usage_error(
        &relay(&file, &[], &[]),
        "health.cache_free_warn_percent",
        "unknown key",
    );
    let file = config_file(dir.path(), VALID);
    assert_usage_error(
        &relay(&file, &[("RELAY_CACHE__CAPCITY", "1GiB")], &[]),
        "cache.capcity",
        "RELAY_CACHE__CAPCITY",
    );
}

#[test]
fn wrong_types_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &format!("max_udp_payload = \"large\"\n{VALID}"));
    assert_usage_error(&relay(&file, &[], &[]), "max_udp_payload", "expected");
    let file = config_file(dir.path(), &VALID.replace("\"200GiB\"", "\"200 parsecs\""));
    assert_usage_error(&relay(&file, &[], &[]), "cache.capacity", "parsecs");
    let file = config_file(
        dir.path(),
        &VALID.replace("10.1.2.3:9444", "not-an-address"),
    );
    assert_usage_error(&relay(&file, &[], &[]), "master_target.address", "address");
}

#[test]
fn out_of_range_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(
        dir.path(),
        &format!("{VALID}\n[health]\ncache_free_warning_percent = 150\n"),
    );
    assert_usage_error(
        &relay(&file, &[], &[]),
        "health.cache_free_warning_percent",
        "percentage",
    );
    let file = config_file(dir.path(), VALID);
    assert_usage_error(
        &relay(&file, &[("RELAY_CACHE__CAPACITY", "1MiB")], &[]),
        "cache.capacity",
        "two segments",
    );
    // The failback controller's keys.
    let file = config_file(
        dir.path(),
        &format!("{VALID}\n[controller]\nhook_retries = 99\n"),
    );
    assert_usage_error(&relay(&file, &[], &[]), "controller.hook_retries", "0..=10");
    let file = config_file(
        dir.path(),
        &format!("{VALID}\n[controller]\nazure_hook = \"hooks/az\"\n"),
    );
    assert_usage_error(&relay(&file, &[], &[]), "controller.azure_hook", "absolute");
    let file = config_file(dir.path(), VALID);
    assert_usage_error(
        &relay(&file, &[], &["--controller-listen", "everywhere"]),
        "controller.listen",
        "everywhere",
    );
    // Reprotect back's two keys go together, the relay as host:port.
    assert_usage_error(
        &relay(&file, &[], &["--reverse-master-target", "10.2.0.4:9444"]),
        "controller.reverse_relay",
        "missing",
    );
    assert_usage_error(
        &relay(
            &file,
            &[("RELAY_CONTROLLER__REVERSE_RELAY", "onprem:7777")],
            &[],
        ),
        "controller.reverse_master_target",
        "missing",
    );
    assert_usage_error(
        &relay(
            &file,
            &[],
            &[
                "--reverse-master-target",
                "10.2.0.4:9444",
                "--reverse-relay",
                "onprem",
            ],
        ),
        "controller.reverse_relay",
        "host:port",
    );
    assert_usage_error(
        &relay(&file, &[], &["--egress-schedule", "sometimes 5mbit"]),
        "egress.schedule",
        "sometimes",
    );
    let missing = config_file(dir.path(), "[cache]\ndir = \"/tmp/x\"\n");
    assert_usage_error(
        &relay(&missing, &[], &[]),
        "master_target.address",
        "missing",
    );
    assert_usage_error(
        &relay(&dir.path().join("absent.toml"), &[], &[]),
        "--config",
        "does not exist",
    );
}

#[test]
fn run_refuses_bad_config_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &format!("listen_on = 1\n{VALID}"));
    let out = Command::new(fbr_churn::harness::bin_path("relay").unwrap())
        .arg("run")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_usage_error(&out, "listen_on", "unknown key");
}

fn master_target(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(fbr_churn::harness::bin_path("master-target").unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("MASTER_TARGET_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn master_target_config_is_checked_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mt.toml");
    std::fs::write(&file, "data_dir = \"/srv/replicas\"\ncredit = \"32MiB\"\n").unwrap();
    let out = master_target(&file, &[("MASTER_TARGET_LISTEN", "0.0.0.0:7000")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("data_dir = \"/srv/replicas\""), "{text}");
    assert!(text.contains("listen = \"0.0.0.0:7000\""), "{text}");
    std::fs::write(&file, "data_directory = \"/srv\"\n").unwrap();
    assert_usage_error(&master_target(&file, &[]), "data_directory", "unknown key");
    std::fs::write(&file, "credit = 12\n").unwrap();
    assert_usage_error(&master_target(&file, &[]), "credit", "out of range");
    std::fs::write(&file, "memory = \"1MiB\"\n").unwrap();
    assert_usage_error(&master_target(&file, &[]), "memory", "out of range 16MiB");
    std::fs::write(&file, "").unwrap();
    assert_usage_error(
        &master_target(&file, &[("MASTER_TARGET_MAX_UDP_PAYLOAD", "100")]),
        "max_udp_payload",
        "1200",
    );
}

#[test]
fn a_replication_group_can_have_a_retention_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mt.toml");
    std::fs::write(
        &file,
        "retention_window = \"24h\"\n[retention_groups.sql]\nwindow = \"72h\"\nmax = \"500GiB\"\n",
    )
    .unwrap();
    let out = master_target(&file, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[retention_groups.sql]"), "{text}");
    assert!(text.contains("window = \"72h\""), "{text}");
    std::fs::write(&file, "[retention_groups.sql]\nwindow = \"16d\"\n").unwrap();
    assert_usage_error(
        &master_target(&file, &[]),
        "retention_groups.sql.window",
        "out of range",
    );
    std::fs::write(&file, "[retention_groups.sql]\nwindows = \"1d\"\n").unwrap();
    let out = master_target(&file, &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("windows"),
        "{out:?}"
    );
}
