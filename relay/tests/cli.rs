//! The `relay` command line: bad usage exits 64; the PKI never overwrites a key.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::process::Command;

use rustls_pki_types::pem::PemObject;

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay"))
}

#[test]
fn invalid_values_exit_64() {
    let out = relay()
        .args([
            "run",
            "--master-target",
            "127.0.0.1:1",
            "--pki-dir",
            "/nonexistent",
            "--cache-dir",
            "/nonexistent/cache",
            "--credit-mib",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ingest.credit"));
    let out = relay()
        .args([
            "pki", "issue", "--dir", "/tmp", "--name", "x", "--role", "boss",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
}

#[test]
fn missing_certificates_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = relay()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--master-target",
            "127.0.0.1:9",
        ])
        .arg("--pki-dir")
        .arg(dir.path())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay.pem"));
}

#[test]
fn pki_issues_once_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    assert!(relay()
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .status()
        .unwrap()
        .success());
    let again = relay()
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let issue = |name: &str| {
        relay()
            .args([
                "pki", "issue", "--role", "agent", "--vm", "sql01", "--name", name, "--dir",
            ])
            .arg(&pki)
            .output()
            .unwrap()
    };
    assert!(issue("agent-sql01").status.success());
    let key = std::fs::read(pki.join("agent-sql01.key")).unwrap();
    assert!(!issue("agent-sql01").status.success());
    assert_eq!(
        std::fs::read(pki.join("agent-sql01.key")).unwrap(),
        key,
        "key untouched"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join("agent-sql01.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not group/world readable");
    }
    let id = fbr_transport::identity::identity_from_der(
        &rustls_pki_types::CertificateDer::from_pem_file(pki.join("agent-sql01.pem")).unwrap(),
    )
    .unwrap();
    assert!(id.has_role(fbr_transport::Role::Agent));
    assert!(id.may_write("sql01") && !id.may_write("sql02"));
}

#[test]
fn bad_egress_settings_exit_64_naming_the_key() {
    for (flag, value, needle) in [
        (
            "--egress-schedule",
            "mon-fry 09:00-18:00 100mbit",
            "egress.schedule",
        ),
        ("--egress-schedule", "other fast", "egress.schedule"),
        ("--vm-weight", "vm1=0", "egress.vm_weights.vm1"),
        ("--vm-weight", "vm1", "--vm-weight"),
    ] {
        let out = relay()
            .env_remove("RELAY_LOG")
            .args([
                "run",
                "--master-target",
                "127.0.0.1:1",
                "--pki-dir",
                "/nonexistent",
            ])
            .args(["--cache-dir", "/nonexistent/cache", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {err}");
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
}
