//! systemd's notification protocol (`sd_notify(3)`), for units of `Type=notify`.
//!
//! A daemon started by systemd with `Type=notify` finds the address of the service
//! manager's datagram socket in `NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket) and sends newline-separated `KEY=value` assignments to it: `READY=1` once the
//! daemon can do its job (the unit is then *active*), `STATUS=...` for what `systemctl
//! status` shows, `STOPPING=1` when it begins to stop.
//!
//! [`follow_readiness`] drives this from the daemon's own readiness, the condition its
//! `/readyz` answers: `READY=1` the first time it holds, and a `STATUS=` line whenever
//! the state or its reason changes, so `systemctl status` says why a relay is not ready
//! (a full cache disk, an unreachable master target). Without `NOTIFY_SOCKET` (not
//! started by systemd) every call is a no-op.
//!
//! No `unsafe`, no libsystemd: the protocol is one datagram per message.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// A connection to the service manager's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; disabled when it is unset or empty.
    pub fn from_env() -> io::Result<Self> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(addr) if !addr.is_empty() => Self::to(&addr.to_string_lossy()),
            _ => Ok(Notifier { socket: None }),
        }
    }

    /// To the socket at `addr`: a filesystem path, or `@name` (abstract namespace).
    pub fn to(addr: &str) -> io::Result<Self> {
        let target = match addr.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(Path::new(addr))?,
        };
        Ok(Notifier {
            socket: Some((UnixDatagram::unbound()?, target)),
        })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.socket {
            Some((socket, target)) => socket.send_to_addr(state.as_bytes(), target).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// A `STATUS=` value: one line, without control characters, of bounded length.
fn status_line(reason: &str) -> String {
    let line: String = reason
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .filter(|c| !c.is_control())
        .take(400)
        .collect();
    line
}

/// Reports `readiness()` (whether the daemon can do its job, and why or why not) to
/// systemd every `every` until the task is dropped: `READY=1` the first time it is
/// ready, `STATUS=` whenever what it says changes. Errors sending are logged once and
/// the loop goes on (the service manager may be restarting).
pub async fn follow_readiness(
    notifier: Notifier,
    every: Duration,
    readiness: impl Fn() -> (bool, String),
) {
    if !notifier.is_enabled() {
        return;
    }
    let mut ready_sent = false;
    let mut last: Option<(bool, String)> = None;
    let mut warned = false;
    loop {
        let (ok, reason) = readiness();
        // The reason says what it is; the state is said first once, plainly.
        let reason = reason
            .trim_start()
            .trim_start_matches("ready:")
            .trim_start_matches("not ready:")
            .trim_start();
        let status = status_line(&if ok {
            format!("ready: {reason}")
        } else {
            format!("not ready: {reason}")
        });
        if last.as_ref() != Some(&(ok, status.clone())) {
            let mut message = format!("STATUS={status}");
            if ok && !ready_sent {
                message = format!("READY=1\n{message}");
            }
            match notifier.notify(&message) {
                Ok(()) => {
                    ready_sent |= ok;
                    last = Some((ok, status));
                }
                Err(e) if !warned => {
                    tracing::warn!("cannot notify systemd: {e}");
                    warned = true;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Not ready with its reason, then `READY=1` once ready, then only changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_becomes_ready_once_and_status_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let manager = UnixDatagram::bind(&path).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let task = tokio::spawn(follow_readiness(
            Notifier::to(path.to_str().unwrap()).unwrap(),
            Duration::from_millis(5),
            move || {
                if r.load(Ordering::SeqCst) {
                    (true, "serving".into())
                } else {
                    (false, "master target\nunreachable".into())
                }
            },
        ));
        let first = tokio::task::block_in_place(|| receive(&manager));
        assert_eq!(first, "STATUS=not ready: master target; unreachable");
        ready.store(true, Ordering::SeqCst);
        let second = tokio::task::block_in_place(|| receive(&manager));
        assert_eq!(second, "READY=1\nSTATUS=ready: serving");
        ready.store(false, Ordering::SeqCst);
        let third = tokio::task::block_in_place(|| receive(&manager));
        assert_eq!(third, "STATUS=not ready: master target; unreachable");
        ready.store(true, Ordering::SeqCst);
        // READY=1 is sent once only.
        let fourth = tokio::task::block_in_place(|| receive(&manager));
        assert_eq!(fourth, "STATUS=ready: serving");
        task.abort();
    }

    #[test]
    fn abstract_addresses_and_no_socket() {
        let name = format!("fbr-notify-test-{}", std::process::id());
        let manager = {
            use std::os::linux::net::SocketAddrExt;
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap()
        };
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .notify("STOPPING=1")
            .unwrap();
        assert_eq!(receive(&manager), "STOPPING=1");
        let none = Notifier { socket: None };
        assert!(!none.is_enabled());
        none.notify("READY=1").unwrap();
    }
}
