//! # fbr-tests: helpers for the end-to-end tests
//!
//! The tests in `tests/tests/` start real `master-target` and `relay` processes through
//! [`fbr_churn::harness::Site`] (binaries found next to the test executable, so run
//! them with `cargo test --workspace`, which builds them) and drive them with the agent
//! emulator or with [`RawAgent`], a bare QUIC client for sending hostile input.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fbr_churn::agent::{self, AgentOptions, DiskPlan};
use fbr_churn::harness::{Site, SiteOptions};
use fbr_churn::source::SourceSpec;
use fbr_churn::workload::{Content, Profile};
use fbr_protocol::{decode_frame, encode_frame, Frame, StreamId};
use fbr_transport::{any_addr_for, client_endpoint, Credentials, QuicTuning};

/// A site with the master target and relay running, the agent entitled to `vms`.
pub fn start_site(vms: &[&str]) -> Site {
    start_site_with(vms, 256 << 20, 4)
}

/// The tests' usual site: the agent entitled to `vms`, a 256 MiB relay cache.
pub fn site_options(vms: &[&str]) -> SiteOptions {
    SiteOptions {
        agent_vms: vms.iter().map(|s| s.to_string()).collect(),
        cache_capacity: 256 << 20,
        cache_segment_mib: 4,
        mt_credit_mib: 8,
        max_udp_payload: 1452,
        relay_args: vec![],
        mt_args: vec![],
    }
}

/// A running site for `vm1` and `vm2` whose master target keeps 15 days daemon-wide
/// and `window` for `group1` (its own `[retention_groups.group1]`, in the harness's
/// config file: flags override the file).
pub fn start_site_keeping_group1_for(window: &str) -> Site {
    let mut site = Site::create(
        None,
        SiteOptions {
            mt_args: vec!["--retention-window".into(), "15d".into()],
            ..site_options(&["vm1", "vm2"])
        },
    )
    .expect("create site");
    std::fs::write(
        site.root.join("master-target.toml"),
        format!("[retention_groups.group1]\nwindow = \"{window}\"\n"),
    )
    .expect("master target config");
    site.start_master_target().expect("start master target");
    site.start_relay().expect("start relay");
    site
}

/// Like [`start_site`], with the relay's cache capacity and segment size chosen.
pub fn start_site_with(vms: &[&str], cache_capacity: u64, cache_segment_mib: u64) -> Site {
    let mut site = Site::create(
        None,
        SiteOptions {
            cache_capacity,
            cache_segment_mib,
            ..site_options(vms)
        },
    )
    .expect("create site");
    site.start_master_target().expect("start master target");
    site.start_relay().expect("start relay");
    site
}

/// Agent options for tests: short timeouts, fast tags.
pub fn agent_options(site: &Site, duration: Duration, tag_interval: Duration) -> AgentOptions {
    AgentOptions {
        app_tag_every: 4,
        log_tags: None,
        reconnect_timeout: Duration::from_secs(60),
        ..site
            .agent_options(duration, tag_interval)
            .expect("relay running")
    }
}

/// `vms` x `disks` generated disks of `disk_size`, every profile cycled, one group.
pub fn plans(vms: u32, disks: u32, disk_size: u64, content: Content, seed: u64) -> Vec<DiskPlan> {
    let mut out = Vec::new();
    for v in 0..vms {
        for d in 0..disks {
            let n = (v * disks + d) as usize;
            out.push(DiskPlan {
                id: StreamId {
                    vm: format!("vm{}", v + 1),
                    disk: d,
                },
                disk_size,
                group: "group1".into(),
                source: SourceSpec::Generated {
                    seed,
                    vm_index: v,
                    disk_index: d,
                    profile: Profile::ALL[n % Profile::ALL.len()],
                    content,
                },
                start: Default::default(),
            });
        }
    }
    out
}

/// Runs the agent emulator to completion and returns its report; panics on failures.
pub async fn churn(opts: AgentOptions, plans: Vec<DiskPlan>, seed: u64) -> agent::RunReport {
    let handle = agent::start(opts, plans, seed).expect("start agent");
    let report = handle.finish().await.expect("run");
    assert!(
        report.failures.is_empty(),
        "disk failures: {:?}",
        report.failures
    );
    report
}

/// A bare QUIC client speaking frames, for sending whatever a test wants.
#[derive(Debug)]
pub struct RawAgent {
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

/// One raw stream: write bytes or frames, read frames.
#[derive(Debug)]
pub struct RawStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: BytesMut,
    /// The credit the relay granted in `Accept` (0 before it).
    pub accepted_credit: u64,
}

impl RawAgent {
    /// Connects to the site's relay with `creds`.
    pub async fn connect_with(site: &Site, creds: Credentials) -> anyhow::Result<RawAgent> {
        let addr = site.relay_addr().expect("relay running");
        let endpoint = client_endpoint(any_addr_for(addr), creds, &QuicTuning::default())?;
        let conn = endpoint.connect(addr, "relay")?.await?;
        Ok(RawAgent {
            conn,
            _endpoint: endpoint,
        })
    }

    /// Connects to the site's master target as its relay does (with the relay's
    /// certificate): the streams opened then speak the WAN leg.
    pub async fn connect_as_relay(site: &Site) -> RawAgent {
        let addr = site.master_target_addr().expect("master target running");
        let creds = Credentials::load(&site.pki_dir, "relay").expect("relay credentials");
        let endpoint = client_endpoint(any_addr_for(addr), creds, &QuicTuning::default())
            .expect("client endpoint");
        let conn = endpoint
            .connect(addr, "master-target")
            .expect("connect")
            .await
            .expect("handshake");
        RawAgent {
            conn,
            _endpoint: endpoint,
        }
    }

    /// Connects with the site's agent certificate.
    pub async fn connect(site: &Site) -> RawAgent {
        let creds = Credentials::load(&site.pki_dir, "agent").expect("agent credentials");
        Self::connect_with(site, creds).await.expect("connect")
    }

    pub async fn open(&self) -> RawStream {
        let (send, recv) = self.conn.open_bi().await.expect("open stream");
        RawStream {
            send,
            recv,
            buf: BytesMut::new(),
            accepted_credit: 0,
        }
    }

    /// Opens a stream and completes Hello/Accept; returns the stream and next_seq.
    pub async fn open_disk(&self, vm: &str, disk: u32, disk_size: u64) -> (RawStream, u64) {
        let mut s = self.open().await;
        s.send_frame(&Frame::Hello {
            placement: 0,
            stream: StreamId {
                vm: vm.into(),
                disk,
            },
            disk_size,
        })
        .await;
        match s.next_frame().await {
            Some(Frame::Accept {
                next_seq,
                credit_bytes,
                ..
            }) => {
                s.accepted_credit = credit_bytes;
                (s, next_seq)
            }
            other => panic!("expected Accept for {vm}/{disk}, got {other:?}"),
        }
    }
}

impl RawStream {
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("write");
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        let mut b = BytesMut::new();
        encode_frame(frame, &mut b);
        self.send_bytes(&b).await;
    }

    /// The next frame, or `None` when the stream ends or fails; panics after 20 s.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match decode_frame(&mut self.buf) {
                    Ok(Some(f)) => return Some(f),
                    Ok(None) => {}
                    Err(e) => panic!("peer sent an undecodable frame: {e}"),
                }
                match self.recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                    _ => return None,
                }
            }
        })
        .await
        .expect("no frame within 20 s")
    }

    /// Reads until an `Error` frame (returned) or the end of the stream (`None`),
    /// collecting the highest `Ack` seen.
    pub async fn until_error(&mut self) -> (Option<Frame>, u64) {
        let mut acked = 0;
        loop {
            match self.next_frame().await {
                Some(Frame::Ack { seq }) => acked = acked.max(seq),
                Some(e @ Frame::Error { .. }) => return (Some(e), acked),
                Some(_) => {}
                None => return (None, acked),
            }
        }
    }

    /// Waits until an `Ack` of at least `seq` arrives; panics on anything else.
    pub async fn wait_ack(&mut self, seq: u64) {
        loop {
            match self.next_frame().await {
                Some(Frame::Ack { seq: s }) if s >= seq => return,
                Some(Frame::Ack { .. } | Frame::Applied { .. } | Frame::Credit { .. }) => {}
                other => panic!("waiting for ack {seq}, got {other:?}"),
            }
        }
    }
}

impl RawStream {
    /// Waits until `Applied` (durable at the master target) reaches `seq`.
    pub async fn wait_applied(&mut self, seq: u64) {
        loop {
            match self.next_frame().await {
                Some(Frame::Applied { seq: s }) if s >= seq => return,
                Some(Frame::Ack { .. } | Frame::Applied { .. } | Frame::Credit { .. }) => {}
                other => panic!("waiting for applied {seq}, got {other:?}"),
            }
        }
    }
}

/// A write record frame of `len` bytes of `fill` at `offset`.
pub fn write(seq: u64, offset: u64, len: usize, fill: u8) -> Frame {
    Frame::Record(fbr_protocol::Record::Write {
        seq,
        offset,
        data: Bytes::from(vec![fill; len]),
    })
}

/// A small deterministic pseudo-random sequence (xorshift64*), so fault timings are
/// random-looking but reproducible from the seed printed by the test.
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed.max(1))
    }

    /// A value in `lo..hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        lo + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (hi - lo)
    }
}

/// Stops both daemons gracefully and verifies the run byte for byte.
pub fn stop_and_verify(
    site: &mut Site,
    manifest: &fbr_churn::source::Manifest,
) -> fbr_churn::verify::VerifyReport {
    site.stop_relay(false).expect("stop relay");
    site.stop_master_target(false).expect("stop master target");
    let report = fbr_churn::verify::verify(manifest, &site.mt_data).expect("verify");
    assert!(
        report.errors.is_empty(),
        "verification errors: {:#?}",
        report.errors
    );
    assert!(report.verified);
    report
}

/// Polls `check` every 200 ms for up to `secs` seconds; panics with `what` and the last
/// answer if it never holds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub use fbr_churn::harness::{http_get, sample};

/// Runs `master-target <args>` (an offline command: points, materialize, rollback, or a
/// client of the running daemon) and returns its stdout; panics with its stderr if it
/// fails.
pub fn master_target(args: &[&str]) -> String {
    let out = std::process::Command::new(fbr_churn::harness::bin_path("master-target").unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "master-target {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The image of disk 0 of each of `vms` at point `tag` of `group`, as `master-target
/// materialize` makes it from the data directory `data` (the daemon stopped), made in
/// the scratch directory `scratch`.
pub fn materialize_point(
    data: &str,
    group: &str,
    tag: u64,
    vms: &[&str],
    scratch: &std::path::Path,
) -> Vec<(String, Vec<u8>)> {
    let tag = tag.to_string();
    vms.iter()
        .map(|vm| {
            let out = scratch.join(format!("{vm}-{tag}.raw"));
            master_target(&[
                "materialize",
                "--data",
                data,
                "--group",
                group,
                "--tag",
                &tag,
                "--vm",
                vm,
                "--disk",
                "0",
                "--out",
                out.to_str().unwrap(),
            ]);
            let image = std::fs::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
            (vm.to_string(), image)
        })
        .collect()
}

/// Runs `promtool` with `args` and `stdin`; panics with its output if it is missing or
/// refuses. The test command (`./scripts/test`) installs it.
pub fn promtool(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed ({e}): run ./scripts/install-test-deps (apt-get install prometheus)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} refused:\n{text}");
    text
}
