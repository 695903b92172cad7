//! A whole site on loopback: a fresh PKI and `master-target` and `relay` started as real
//! child processes. Used by `churn drill`, `churn bench` and the end-to-end tests, which
//! also stop, kill and restart the daemons through it.
//!
//! Daemons bind `127.0.0.1:0` the first time and report the port through a port file;
//! restarts reuse the same port, so peers reconnect to the address they know. Each
//! daemon's stderr is appended to `<root>/logs/<name>.log`.

use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Finds a sibling binary: `$FBR_BIN_DIR/<name>`, else next to the running executable
/// (or one level up, for test executables in `target/<profile>/deps`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("FBR_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        if p.exists() {
            return Ok(p);
        }
        bail!("{} does not exist (FBR_BIN_DIR)", p.display());
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
        dir = if d.ends_with("deps") {
            d.parent().map(Path::to_path_buf)
        } else {
            None
        };
    }
    bail!("cannot find the `{name}` binary next to {}; build the workspace (cargo build --workspace) or set FBR_BIN_DIR", exe.display())
}

/// Knobs of the daemons a [`Site`] starts.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// VMs the agent certificate is entitled to write.
    pub agent_vms: Vec<String>,
    /// The relay's cache: capacity and segment size.
    pub cache_capacity: u64,
    pub cache_segment_mib: u64,
    pub mt_credit_mib: u64,
    pub max_udp_payload: u16,
    /// Extra flags for `relay run` (e.g. an egress schedule).
    pub relay_args: Vec<String>,
    /// Extra flags for `master-target run` (e.g. a content index size).
    pub mt_args: Vec<String>,
}

/// One daemon: how to start it and where it listens.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    /// The daemon's `/metrics` endpoint (kept across restarts, like `addr`).
    metrics_addr: Option<SocketAddr>,
}

/// A PKI, a master target and a relay on loopback.
#[derive(Debug)]
pub struct Site {
    pub root: PathBuf,
    pub pki_dir: PathBuf,
    pub mt_data: PathBuf,
    /// The relay's durable cache directory.
    pub cache_dir: PathBuf,
    opts: SiteOptions,
    mt: Daemon,
    relay: Daemon,
    /// A second relay, `relay-b` (moves between relays), once
    /// [`Site::enroll_relay_b`] ran; its cache is `<root>/relay-b-cache`.
    relay_b: Daemon,
    /// The site's configuration server, once [`Site::enroll_through_config_server`] ran.
    config_server: Daemon,
    /// The master target in Azure that receives reprotect back, once
    /// [`Site::enroll_azure_master_target`] ran; its data is `<root>/azure-master-target`.
    azure_mt: Daemon,
    /// `relay-b` forwards here instead of to the master target (reprotect back: the
    /// on-premises relay forwarding to the Azure master target).
    relay_b_master_target: Option<SocketAddr>,
    /// The relay is started without `--master-target`: it asks its configuration server
    /// (given in its arguments) for the master target it is assigned.
    relay_asks_for_master_target: bool,
    /// The relay's operator API (the failback controller), kept across restarts.
    relay_api: Option<SocketAddr>,
    /// The master target runs in this link's namespace, behind its emulated WAN
    /// ([`Site::put_master_target_behind`]). Declared before `_tmp`: dropped first.
    mt_link: Option<crate::netem::WanLink>,
    /// The relay forwards here instead of to the master target's own address (an
    /// impairment proxy in front of it, [`crate::impair`]).
    relay_master_target: Option<SocketAddr>,
    _tmp: Option<tempfile::TempDir>,
}

impl Site {
    /// Creates the site's directory (a temporary one unless `root` is given) and its PKI.
    pub fn create(root: Option<PathBuf>, opts: SiteOptions) -> anyhow::Result<Site> {
        let (root, tmp) = match root {
            Some(r) => {
                fs::create_dir_all(&r).with_context(|| format!("creating {}", r.display()))?;
                (r, None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("fbr-site-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let pki_dir = root.join("pki");
        fbr_transport::pki::init_loopback_site(&pki_dir, &opts.agent_vms)?;
        fs::create_dir_all(root.join("logs"))?;
        Ok(Site {
            mt_data: root.join("master-target"),
            cache_dir: root.join("relay-cache"),
            pki_dir,
            root,
            opts,
            mt: Daemon {
                name: "master-target",
                child: None,
                addr: None,
                metrics_addr: None,
            },
            relay: Daemon {
                name: "relay",
                child: None,
                addr: None,
                metrics_addr: None,
            },
            relay_b: Daemon {
                name: "relay-b",
                child: None,
                addr: None,
                metrics_addr: None,
            },
            config_server: Daemon {
                name: "config-server",
                child: None,
                addr: None,
                metrics_addr: None,
            },
            azure_mt: Daemon {
                name: "azure-master-target",
                child: None,
                addr: None,
                metrics_addr: None,
            },
            relay_b_master_target: None,
            relay_asks_for_master_target: false,
            relay_api: None,
            mt_link: None,
            relay_master_target: None,
            _tmp: tmp,
        })
    }

    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay.addr
    }

    /// Options for an agent emulator writing to this site's relay with the site's agent
    /// certificate: `duration` of churn, a recovery point every `tag_interval`. The
    /// timeouts suit loopback runs; callers adjust fields as they need.
    pub fn agent_options(
        &self,
        duration: Duration,
        tag_interval: Duration,
    ) -> anyhow::Result<crate::agent::AgentOptions> {
        Ok(crate::agent::AgentOptions {
            relay: self.relay_addr().context("start the relay first")?,
            relay_name: "relay".into(),
            pki_dir: self.pki_dir.clone(),
            cert_name: "agent".into(),
            tuning: fbr_transport::QuicTuning::default(),
            tag_interval,
            app_tag_every: 5,
            log_tags: None,
            duration: Some(duration),
            drain_timeout: Duration::from_secs(60),
            reconnect_timeout: Duration::from_secs(30),
            rate_bytes_per_s: None,
            routes: Default::default(),
        })
    }

    /// Where the relay serves `/metrics`, `/healthz` and `/readyz`.
    pub fn relay_metrics_addr(&self) -> Option<SocketAddr> {
        self.relay.metrics_addr
    }

    /// Where the master target serves `/metrics`, `/healthz` and `/readyz`.
    pub fn master_target_metrics_addr(&self) -> Option<SocketAddr> {
        self.mt.metrics_addr
    }

    pub fn relay_pid(&self) -> Option<u32> {
        self.relay.child.as_ref().map(Child::id)
    }

    pub fn master_target_pid(&self) -> Option<u32> {
        self.mt.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts, on the same port) the master target.
    pub fn start_master_target(&mut self) -> anyhow::Result<SocketAddr> {
        let cmd = self.master_target_command(
            self.mt.addr,
            &self.mt_data,
            "master-target",
            &self.master_target_control_socket(),
        )?;
        let root = self.root.clone();
        start_daemon(&mut self.mt, &root, cmd)
    }

    /// Runs the master target (from its next start) inside `link`'s network namespace,
    /// listening on the namespace's address: the relay reaches it through the emulated
    /// WAN. Its metrics listen there too.
    pub fn put_master_target_behind(&mut self, link: crate::netem::WanLink) {
        self.mt.addr = Some(SocketAddr::new(link.ns_ip.into(), 0));
        self.mt.metrics_addr = Some(SocketAddr::new(link.ns_ip.into(), 0));
        self.mt_link = Some(link);
    }

    /// The relay (from its next start) forwards to `addr` rather than to the master
    /// target's address: a proxy in front of it.
    pub fn route_relay_to_master_target_through(&mut self, addr: SocketAddr) {
        self.relay_master_target = Some(addr);
    }

    /// The emulated WAN in front of the master target, if there is one.
    pub fn master_target_link(&mut self) -> Option<&mut crate::netem::WanLink> {
        self.mt_link.as_mut()
    }

    /// `master-target run` with this site's settings.
    fn master_target_command(
        &self,
        listen: Option<SocketAddr>,
        data: &Path,
        cert_name: &str,
        control_socket: &Path,
    ) -> anyhow::Result<Command> {
        let listen = listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
        let mut cmd = match (&self.mt_link, cert_name) {
            (Some(link), "master-target") => link.command(&bin_path("master-target")?),
            _ => Command::new(bin_path("master-target")?),
        };
        cmd.arg("run")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data")
            .arg(data)
            .arg("--pki-dir")
            .arg(&self.pki_dir)
            .arg("--cert-name")
            .arg(cert_name)
            .arg("--credit-mib")
            .arg(self.opts.mt_credit_mib.to_string())
            .arg("--max-udp-payload")
            .arg(self.opts.max_udp_payload.to_string())
            .arg("--control-socket")
            .arg(control_socket)
            .args(&self.opts.mt_args);
        Ok(cmd)
    }

    /// Enrolls the master target in Azure, `azure-master-target` (reprotect back's
    /// receiving side), through the site's configuration server
    /// ([`Site::enroll_through_config_server`] first).
    pub fn enroll_azure_master_target(&mut self) -> anyhow::Result<()> {
        self.enroll(
            "master-target",
            "register",
            &[
                "--name",
                "azure-master-target",
                "--ip",
                "127.0.0.1",
                "--dns",
                "azure-master-target",
                "--advertise",
                "127.0.0.1:9445",
            ],
        )
    }

    /// Runs `<program> <verb>` (`register`, or `enroll` for an agent) with the site's
    /// passphrase against its configuration server, with `args` (the name and
    /// addresses).
    fn enroll(&self, program: &str, verb: &str, args: &[&str]) -> anyhow::Result<()> {
        let server = self
            .config_server
            .addr
            .context("enroll the site through its configuration server first")?;
        let out = Command::new(bin_path(program)?)
            .arg(verb)
            .arg("--config-server")
            .arg(server.to_string())
            .arg("--passphrase-file")
            .arg(self.root.join("site.passphrase"))
            .arg("--pki-dir")
            .arg(&self.pki_dir)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{program} {verb} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The Azure master target's data directory.
    pub fn azure_mt_data(&self) -> PathBuf {
        self.root.join("azure-master-target")
    }

    /// Starts (or restarts, on the same port) the Azure master target.
    pub fn start_azure_master_target(&mut self) -> anyhow::Result<SocketAddr> {
        let cmd = self.master_target_command(
            self.azure_mt.addr,
            &self.azure_mt_data(),
            "azure-master-target",
            &self.root.join("azure-master-target-control.sock"),
        )?;
        let root = self.root.clone();
        start_daemon(&mut self.azure_mt, &root, cmd)
    }

    /// Stops the Azure master target: SIGTERM and wait, or SIGKILL (`kill9`).
    pub fn stop_azure_master_target(&mut self, kill9: bool) -> anyhow::Result<()> {
        stop_daemon(&mut self.azure_mt, kill9)
    }

    pub fn azure_master_target_addr(&self) -> Option<SocketAddr> {
        self.azure_mt.addr
    }

    /// `relay-b` forwards to `addr` from its next start (instead of the master target).
    pub fn point_relay_b_at(&mut self, addr: SocketAddr) {
        self.relay_b_master_target = Some(addr);
    }

    /// Starts (or restarts, on the same port) the relay. The master target must have
    /// been started once, so its address is known.
    pub fn start_relay(&mut self) -> anyhow::Result<SocketAddr> {
        let cmd = self.relay_command_for(
            "relay",
            &self.cache_dir,
            &self.relay_control_socket(),
            self.relay.addr,
        )?;
        let root = self.root.clone();
        let addr = start_daemon(&mut self.relay, &root, cmd)?;
        // Written before the agents' port (the controller starts first).
        let api = fs::read_to_string(root.join("relay.api.addr"))
            .context("the relay's operator API port file")?;
        self.relay_api = Some(
            api.trim()
                .parse()
                .context("the relay's operator API address")?,
        );
        Ok(addr)
    }

    /// The relay's operator API (HTTPS), once the relay was started.
    pub fn relay_api_addr(&self) -> Option<SocketAddr> {
        self.relay_api
    }

    /// Where the relay's failback controller keeps its jobs.
    pub fn relay_controller_dir(&self) -> PathBuf {
        self.root.join("relay-controller")
    }

    /// `relay run` for the relay whose certificate is `cert_name`.
    fn relay_command_for(
        &self,
        cert_name: &str,
        cache_dir: &Path,
        control_socket: &Path,
        listen: Option<SocketAddr>,
    ) -> anyhow::Result<Command> {
        let mt = match (cert_name, self.relay_b_master_target) {
            ("relay-b", Some(addr)) => addr,
            ("relay", _) if self.relay_master_target.is_some() => {
                self.relay_master_target.expect("checked")
            }
            _ => self
                .mt
                .addr
                .context("start the master target before the relay")?,
        };
        let listen = listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
        let api = match cert_name {
            "relay" => self.relay_api,
            _ => None,
        }
        .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
        let mut cmd = Command::new(bin_path("relay")?);
        cmd.arg("run").arg("--listen").arg(listen.to_string());
        cmd.arg("--controller-listen")
            .arg(api.to_string())
            .arg("--controller-port-file")
            .arg(self.root.join(format!("{cert_name}.api.addr")))
            .arg("--controller-state-dir")
            .arg(self.root.join(format!("{cert_name}-controller")));
        if !self.relay_asks_for_master_target {
            cmd.arg("--master-target").arg(mt.to_string());
        }
        if cert_name == "relay-b" && self.relay_b_master_target.is_some() {
            cmd.arg("--master-target-name").arg("azure-master-target");
        }
        cmd.arg("--pki-dir")
            .arg(&self.pki_dir)
            .arg("--cert-name")
            .arg(cert_name)
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--cache-capacity")
            .arg(self.opts.cache_capacity.to_string())
            .arg("--cache-segment-mib")
            .arg(self.opts.cache_segment_mib.to_string())
            .arg("--max-udp-payload")
            .arg(self.opts.max_udp_payload.to_string())
            .arg("--control-socket")
            .arg(control_socket)
            .args(&self.opts.relay_args);
        Ok(cmd)
    }

    /// Enrolls a second relay, `relay-b`, through the site's configuration server
    /// ([`Site::enroll_through_config_server`] first).
    pub fn enroll_relay_b(&mut self) -> anyhow::Result<()> {
        self.enroll(
            "relay",
            "register",
            &[
                "--name",
                "relay-b",
                "--ip",
                "127.0.0.1",
                "--dns",
                "localhost",
            ],
        )
    }

    /// Starts (or restarts, on the same port) `relay-b`, with the relay's flags.
    pub fn start_relay_b(&mut self) -> anyhow::Result<SocketAddr> {
        let cmd = self.relay_command_for(
            "relay-b",
            &self.relay_b_cache_dir(),
            &self.root.join("relay-b-control.sock"),
            self.relay_b.addr,
        )?;
        let root = self.root.clone();
        start_daemon(&mut self.relay_b, &root, cmd)
    }

    /// Stops `relay-b`: SIGTERM and wait, or SIGKILL (`kill9`).
    pub fn stop_relay_b(&mut self, kill9: bool) -> anyhow::Result<()> {
        stop_daemon(&mut self.relay_b, kill9)
    }

    pub fn relay_b_addr(&self) -> Option<SocketAddr> {
        self.relay_b.addr
    }

    pub fn relay_b_metrics_addr(&self) -> Option<SocketAddr> {
        self.relay_b.metrics_addr
    }

    /// `relay-b`'s cache directory.
    pub fn relay_b_cache_dir(&self) -> PathBuf {
        self.root.join("relay-b-cache")
    }

    /// Runs `config-server <args>` against this site's data directory and running
    /// server (an operator's command, e.g. `move`); its stdout.
    pub fn config_server_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let server = self
            .config_server
            .addr
            .context("the configuration server is not running")?;
        let out = Command::new(bin_path("config-server")?)
            .args(args)
            .arg("--data")
            .arg(self.root.join("config-server"))
            .arg("--server")
            .arg(server.to_string())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "config-server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the master target: SIGTERM and wait, or SIGKILL (`kill9`).
    pub fn stop_master_target(&mut self, kill9: bool) -> anyhow::Result<()> {
        stop_daemon(&mut self.mt, kill9)
    }

    /// Stops the relay: SIGTERM and wait, or SIGKILL (`kill9`).
    pub fn stop_relay(&mut self, kill9: bool) -> anyhow::Result<()> {
        stop_daemon(&mut self.relay, kill9)
    }

    /// The master target's control socket (`master-target test-failover`).
    pub fn master_target_control_socket(&self) -> PathBuf {
        self.root.join("master-target-control.sock")
    }

    /// The relay's control socket (`relay resync`).
    pub fn relay_control_socket(&self) -> PathBuf {
        self.root.join("relay-control.sock")
    }

    /// Runs `relay <args>` (a client command, e.g. `resync`) and returns its stdout.
    pub fn relay_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin_path("relay")?).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "relay {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Where the master target listens (once started).
    pub fn master_target_addr(&self) -> Option<SocketAddr> {
        self.mt.addr
    }

    /// Adopts `image` as the master target's replica of `vm`'s `disk` (an original
    /// location): builds the image from its spec, then runs `master-target seed-disk`
    /// with the master target stopped, and restarts it if it was running.
    pub fn seed_disk(
        &mut self,
        vm: &str,
        disk: u32,
        image: &crate::image::ImageSpec,
        disk_size: u64,
    ) -> anyhow::Result<()> {
        let path = self.root.join(format!("seed-{vm}-disk{disk}.img"));
        image
            .create_file(&path, disk_size)
            .with_context(|| format!("creating {}", path.display()))?;
        let running = self.mt.child.is_some();
        if running {
            self.stop_master_target(false)?;
        }
        seed_replica(&self.mt_data, vm, disk, &path)?;
        std::fs::remove_file(&path)?;
        if running {
            self.start_master_target()?;
        }
        Ok(())
    }

    /// Adopts the file `image` as the Azure master target's replica of `vm`'s `disk`
    /// (`master-target seed-disk`; the Azure master target must be stopped).
    pub fn seed_azure_disk(&self, vm: &str, disk: u32, image: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.azure_mt.child.is_none(),
            "stop the Azure master target before seeding it"
        );
        seed_replica(&self.azure_mt_data(), vm, disk, image)
    }

    /// Replaces the certificates `create` made by hand with the way a real site gets
    /// them: a configuration server is made (`config-server init`) and started on
    /// loopback, and the master target, the relay and the agent each enroll with its
    /// passphrase (`register`, `enroll`). Call before starting the daemons. The
    /// configuration server runs until the site is dropped.
    pub fn enroll_through_config_server(&mut self) -> anyhow::Result<SocketAddr> {
        let data = self.root.join("config-server");
        let passphrase = self.root.join("site.passphrase");
        let out = Command::new(bin_path("config-server")?)
            .args(["init", "--ip", "127.0.0.1", "--dns", "localhost", "--data"])
            .arg(&data)
            .arg("--passphrase-out")
            .arg(&passphrase)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "config-server init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = self.start_config_server()?;
        fs::remove_dir_all(&self.pki_dir)
            .with_context(|| format!("removing {}", self.pki_dir.display()))?;
        let mt_advertise = "127.0.0.1:9444".to_owned();
        let loopback = ["--ip", "127.0.0.1", "--ip", "::1", "--dns", "localhost"];
        let mut vms = Vec::new();
        for vm in &self.opts.agent_vms {
            vms.extend(["--vm", vm.as_str()]);
        }
        let enrollments: [(&str, &str, Vec<&str>); 3] = [
            (
                "master-target",
                "register",
                [
                    &loopback[..],
                    &["--dns", "master-target", "--advertise", &mt_advertise],
                ]
                .concat(),
            ),
            (
                "relay",
                "register",
                [&loopback[..], &["--dns", "relay"]].concat(),
            ),
            ("churn", "enroll", [&["--name", "agent"][..], &vms].concat()),
        ];
        for (program, verb, args) in enrollments {
            self.enroll(program, verb, &args)?;
        }
        Ok(server)
    }

    /// Starts (or restarts, on the same port) the configuration server of
    /// [`Site::enroll_through_config_server`].
    pub fn start_config_server(&mut self) -> anyhow::Result<SocketAddr> {
        let listen = self
            .config_server
            .addr
            .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
        let mut cmd = Command::new(bin_path("config-server")?);
        cmd.arg("run")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data")
            .arg(self.root.join("config-server"));
        let root = self.root.clone();
        start_daemon(&mut self.config_server, &root, cmd)
    }

    /// Stops the configuration server: SIGTERM and wait, or SIGKILL (`kill9`).
    pub fn stop_config_server(&mut self, kill9: bool) -> anyhow::Result<()> {
        stop_daemon(&mut self.config_server, kill9)
    }

    /// Where the configuration server listens (once started).
    pub fn config_server_addr(&self) -> Option<SocketAddr> {
        self.config_server.addr
    }

    pub fn config_server_metrics_addr(&self) -> Option<SocketAddr> {
        self.config_server.metrics_addr
    }

    /// From now on the relay starts without `--master-target` and asks the
    /// configuration server in its arguments (`--config-server`) for its assignment.
    pub fn relay_asks_for_master_target(&mut self) {
        self.relay_asks_for_master_target = true;
    }

    /// Extra arguments of `relay run` from now on (e.g. `--config-server`).
    pub fn relay_args_mut(&mut self) -> &mut Vec<String> {
        &mut self.opts.relay_args
    }

    /// Extra arguments of `master-target run` from now on.
    pub fn master_target_args_mut(&mut self) -> &mut Vec<String> {
        &mut self.opts.mt_args
    }

    /// Keeps the site directory after this value is dropped; returns its path.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(t) = self._tmp.take() {
            let _ = t.keep();
        }
        self.root.clone()
    }
}

/// `master-target seed-disk --data DATA --vm VM --disk DISK --image IMAGE`.
fn seed_replica(data: &Path, vm: &str, disk: u32, image: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin_path("master-target")?)
        .arg("seed-disk")
        .arg("--data")
        .arg(data)
        .arg("--vm")
        .arg(vm)
        .arg("--disk")
        .arg(disk.to_string())
        .arg("--image")
        .arg(image)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "master-target seed-disk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Drop for Site {
    fn drop(&mut self) {
        // A test failing with the site up: what its daemons said is the evidence (CI
        // shows only the test's output; the site's directory goes with it).
        if std::thread::panicking() {
            for name in [
                "master-target",
                "relay",
                "relay-b",
                "azure-master-target",
                "config-server",
            ] {
                let path = self.root.join("logs").join(format!("{name}.log"));
                if path.exists() {
                    eprintln!(
                        "--- {name}'s log (warnings, errors, last lines) ---\n{}",
                        log_digest(&path)
                    );
                }
            }
        }
        let _ = stop_daemon(&mut self.relay, true);
        let _ = stop_daemon(&mut self.relay_b, true);
        let _ = stop_daemon(&mut self.mt, true);
        let _ = stop_daemon(&mut self.azure_mt, true);
        let _ = stop_daemon(&mut self.config_server, true);
    }
}

fn start_daemon(d: &mut Daemon, root: &Path, mut cmd: Command) -> anyhow::Result<SocketAddr> {
    if d.child.is_some() {
        bail!("{} is already running", d.name);
    }
    let port_file = root.join(format!("{}.addr", d.name));
    let metrics_port_file = root.join(format!("{}.metrics.addr", d.name));
    let _ = fs::remove_file(&port_file);
    let _ = fs::remove_file(&metrics_port_file);
    // Hermetic: an empty config file instead of /etc's, and none of the caller's
    // RELAY_* / MASTER_TARGET_* variables.
    let config = root.join(format!("{}.toml", d.name));
    if !config.exists() {
        fs::write(&config, "# settings come from flags (churn harness)\n")?;
    }
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RELAY_")
            || k.starts_with("MASTER_TARGET_")
            || k.starts_with("CONFIG_SERVER_")
        {
            cmd.env_remove(&key);
        }
    }
    let metrics_listen = d
        .metrics_addr
        .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--metrics-listen")
        .arg(metrics_listen.to_string())
        .arg("--metrics-port-file")
        .arg(&metrics_port_file);
    let log_path = root.join("logs").join(format!("{}.log", d.name));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    cmd.arg("--port-file")
        .arg(&port_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", d.name))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = fs::read_to_string(&port_file) {
            if let Ok(addr) = s.trim().parse() {
                // The metrics endpoint is bound before the port file is written.
                d.metrics_addr = fs::read_to_string(&metrics_port_file)
                    .ok()
                    .and_then(|m| m.trim().parse().ok());
                d.addr = Some(addr);
                d.child = Some(child);
                return Ok(addr);
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited at start ({status}); log:\n{}",
                d.name,
                log_tail(&log_path)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "{} did not start listening within 20 s; log:\n{}",
                d.name,
                log_tail(&log_path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_daemon(d: &mut Daemon, kill9: bool) -> anyhow::Result<()> {
    let Some(mut child) = d.child.take() else {
        return Ok(());
    };
    if kill9 {
        let _ = child.kill();
        child.wait()?;
        return Ok(());
    }
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            child.wait()?;
            bail!("{} ignored SIGTERM for 15 s and was killed", d.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A log's warnings and errors (the last 40) and its last 15 lines, without colour
/// codes: what a failed test prints of each daemon.
pub fn log_digest(path: &Path) -> String {
    let s = strip_ansi(&fs::read_to_string(path).unwrap_or_default());
    let lines: Vec<&str> = s.lines().collect();
    let notable: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    format!(
        "{}\n...\n{}",
        notable[notable.len().saturating_sub(40)..].join("\n"),
        lines[lines.len().saturating_sub(15)..].join("\n")
    )
}

/// `s` without its ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// CPU seconds (user + system) used so far by process `pid`, from `/proc`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) as f64 / ticks)
}

/// Peak resident set of a running process, bytes (`VmHWM` in `/proc/<pid>/status`).
pub fn process_peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The relay's WAN bytes so far (`fbr_relay_bytes_total{stage="wire"}`: UDP payload to
/// the master target), scraped from its `/metrics`. Blocking. The counter moves on
/// scrapes, so a rate needs one scrape at each end of the window.
pub fn relay_wire_bytes(metrics: SocketAddr) -> Option<f64> {
    let (_, text) = http_get(metrics, "/metrics");
    sample(&text, "fbr_relay_bytes_total{stage=\"wire\"}")
}

/// `GET path` from an HTTP endpoint on loopback: (status, body). Blocking, 10 s bound.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| (0, e))
}

fn try_http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let err = |e: std::io::Error| format!("{addr}: {e}");
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(err)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(err)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (name with labels, exactly as exposed) in a
/// Prometheus text exposition, if present.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The sum of every sample of metric `name` whose labels include all of `labels`
/// (e.g. `[("stage", "logical")]`).
pub fn sample_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_digests_keep_warnings_and_drop_colour_codes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        let mut text = String::from(
            "\u{1b}[2m2026-12-02T05:01:58Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m link down\n",
        );
        for i in 0..30 {
            text.push_str(&format!("2026-12-02T05:02:{i:02}Z  INFO line {i}\n"));
        }
        fs::write(&log, text).unwrap();
        let digest = log_digest(&log);
        assert!(
            digest.starts_with("2026-12-02T05:01:58Z  WARN link down\n"),
            "{digest}"
        );
        assert!(!digest.contains('\u{1b}'));
        assert!(
            digest.ends_with("INFO line 29") && !digest.contains("line 14\n"),
            "{digest}"
        );
    }
}
