//! The daemons as systemd runs them with `Type=notify`: each tells the service manager
//! `READY=1` once its readiness (what `/readyz` answers) holds, with a `STATUS=` saying
//! so, and `STOPPING=1` when it stops. The "service manager" here is a datagram socket
//! this test binds; the daemons are the real binaries, started as the site harness
//! starts them. (Its own test binary: `NOTIFY_SOCKET` is set for the whole process.)
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use fbr_tests::{http_get, start_site};

/// Messages received until `done` says enough, or 60 s.
fn receive_until(socket: &UnixDatagram, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) && Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn both_daemons_notify_readiness_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &path);
    let mut site = start_site(&["vm1"]);

    let ready = |m: &[String]| m.iter().filter(|m| m.starts_with("READY=1\n")).count();
    let got = receive_until(&manager, |m| ready(m) >= 2);
    assert_eq!(ready(&got), 2, "one READY=1 per daemon: {got:#?}");
    for m in got.iter().filter(|m| m.starts_with("READY=1\n")) {
        let status = m.lines().nth(1).unwrap();
        assert!(status.starts_with("STATUS=ready: "), "{m}");
    }
    // Ready for systemd means ready for /readyz.
    for addr in [
        site.relay_metrics_addr().unwrap(),
        site.master_target_metrics_addr().unwrap(),
    ] {
        assert_eq!(http_get(addr, "/readyz").0, 200);
    }

    // Each says it is stopping when it gets SIGTERM. (What a not-ready relay reports,
    // with its reason, is the unit test of `fbr_daemon::systemd`.)
    site.stop_master_target(false).unwrap();
    let got = receive_until(&manager, |m| m.iter().any(|m| m == "STOPPING=1"));
    assert!(got.iter().any(|m| m == "STOPPING=1"), "{got:#?}");
    site.stop_relay(false).unwrap();
    let got = receive_until(&manager, |m| m.iter().any(|m| m == "STOPPING=1"));
    assert!(got.iter().any(|m| m == "STOPPING=1"), "{got:#?}");
}
