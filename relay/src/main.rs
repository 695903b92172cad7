//! `relay`: the failback process server daemon, and the site PKI tool.
//!
//! Thin: parses flags, sets up logging, and calls the library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_cache::CacheConfig;
use fbr_daemon::settings::{flag_overrides, load_settings, mib_flag};
use fbr_daemon::{ConfigError, EX_USAGE};
use fbr_relay::cache::RelayCache;
use fbr_relay::control::{ModeName, Request};
use fbr_relay::egress::Egress;
use fbr_relay::settings::{RelaySettings, DEFAULT_CONTROL_SOCKET};
use fbr_relay::{observe, Relay, RelayConfig};
use fbr_transport::pki::{self, IssueRequest};
use fbr_transport::{
    any_addr_for, client_endpoint, server_endpoint, Credentials, PeerLink, QuicTuning, Role,
};

#[derive(Parser, Debug)]
#[command(
    name = "relay",
    version,
    about = "Failback relay (process server): forwards Azure VM disk writes to the master target"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay.
    Run(RunArgs),
    /// Validate the configuration (file, environment and flags) without starting, and
    /// print the effective settings. Exit status 64 names the key at fault.
    CheckConfig(RunArgs),
    /// Manage the site's certificates by hand (labs; a site enrolls with `register`).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Enroll with the site's configuration server using its passphrase: writes this
    /// relay's key (kept if it exists), certificate and the site CA into the PKI
    /// directory, and prints the master target assigned.
    Register(fbr_enroll::cli::RegisterArgs),
    /// Ask a disk's agent for a resync (through the running relay's control socket).
    Resync {
        /// The relay's control socket [control_socket].
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: u32,
        /// delta: compare hashes, send what differs; full: send everything.
        #[arg(long, value_enum, default_value = "delta")]
        mode: ModeName,
        #[arg(long)]
        json: bool,
    },
    /// The resyncs in progress, with their progress and ETA.
    Resyncs {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Drive the failback controller (the relay's operator API): VMs, jobs,
    /// reprotect, failover, commit... `--json` for scripts, `--wait` to follow a job.
    Ctl(CtlArgs),
    /// Benchmark the durable cache (release build; uses real fsync on --dir's disk).
    BenchCache {
        /// Where to put the benchmark's files (emptied afterwards): the cache disk.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Shrink every size tenfold for a quick run.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
}

/// `relay ctl`: where the API is and how to authenticate.
#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The relay's operator API (TCP).
    #[arg(long, env = "FBR_RELAY_API", default_value = "127.0.0.1:8443")]
    server: SocketAddr,
    /// The name in the relay's certificate.
    #[arg(long, default_value = "relay")]
    server_name: String,
    /// The site CA (checks the relay's certificate).
    #[arg(long, default_value = "/etc/relay/pki/ca.pem")]
    ca: PathBuf,
    /// A file holding the site's operator token (the configuration server's
    /// `<data>/operator.token`); or FBR_OPERATOR_TOKEN. Without one, the operator
    /// certificate --cert-name in --pki-dir is used.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Directory of the operator certificate (`relay pki issue --role operator`).
    #[arg(long, default_value = "/etc/relay/pki")]
    pki_dir: PathBuf,
    #[arg(long, default_value = "operator")]
    cert_name: String,
    /// Print the API's JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Every VM and its protection state.
    Vms,
    /// Every VM's recovery points at the master target (to fail over to a named one).
    Points,
    /// Jobs, newest first.
    Jobs {
        #[arg(long)]
        vm: Option<String>,
        /// running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        /// reprotect, failover, change_point, commit, reprotect_back, test_failover,
        /// test_cleanup.
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One job, its steps and timing.
    Job {
        id: u64,
        /// Follow it to its end with a progress bar and ETA.
        #[arg(long)]
        wait: bool,
    },
    /// Protect VMs from Azure to on-premises (delta resync to the original disks).
    Reprotect {
        #[command(flatten)]
        common: JobFlags,
        /// New, empty on-premises disks: a full resync.
        #[arg(long)]
        alternate_location: bool,
        /// History the master target keeps for the VMs' groups, e.g. 72h (s, m, h or
        /// d; up to 15d); default: its configured retention.
        #[arg(long, value_parser = fbr_relay::ctl::parse_window)]
        retention_window: Option<u64>,
        /// Journal bytes kept per group at most, e.g. 500GiB (with --retention-window).
        #[arg(long, value_parser = fbr_daemon::process::parse_size, requires = "retention_window")]
        retention_max: Option<u64>,
    },
    /// Fail VMs over to on-premises at a recovery point.
    Failover {
        #[command(flatten)]
        common: JobFlags,
        /// latest, latest-processed, latest-app-consistent, or a tag id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Shut the Azure VMs down first (latest then loses nothing).
        #[arg(long)]
        planned: bool,
        /// Boot order of a plan: groups separated by ';', VMs by ',' ("db;app1,app2").
        #[arg(long)]
        boot: Option<String>,
        /// Seconds between one boot group and the next.
        #[arg(long, default_value_t = 0)]
        boot_delay: u64,
    },
    /// Before commit: run failed-over VMs from another point.
    ChangePoint {
        #[command(flatten)]
        common: JobFlags,
        #[arg(long)]
        point: String,
    },
    /// Make a failover final: deletes the Azure VMs.
    Commit {
        #[command(flatten)]
        common: JobFlags,
    },
    /// Replicate committed VMs back to Azure.
    ReprotectBack {
        #[command(flatten)]
        common: JobFlags,
    },
    /// Boot an isolated copy at a point while replication goes on.
    TestFailover {
        #[command(flatten)]
        common: JobFlags,
        #[arg(long, default_value = "latest-processed")]
        point: String,
    },
    /// Remove a test failover's VMs and copies.
    TestCleanup {
        #[command(flatten)]
        common: JobFlags,
    },
    /// Cancel a job where that is safe.
    Cancel { id: u64 },
    /// How long a failover would take, and the data each point kind loses.
    Estimate {
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        planned: bool,
    },
}

/// What every job-starting command takes.
#[derive(clap::Args, Debug)]
struct JobFlags {
    /// A VM (repeat for a plan).
    #[arg(long = "vm", required = true)]
    vms: Vec<String>,
    /// A retried command with the same key gets the same job, never a second one.
    #[arg(long)]
    key: Option<String>,
    /// Follow the job to its end with a progress bar and ETA.
    #[arg(long)]
    wait: bool,
}

fn ctl(args: CtlArgs) -> anyhow::Result<bool> {
    use fbr_controller::Operation;
    use fbr_relay::ctl::{self, CtlRequest};
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--token-file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("FBR_OPERATOR_TOKEN").ok(),
    };
    let client = match token {
        Some(t) => fbr_enroll::heartbeat::HeartbeatClient::operator(
            args.server,
            &args.server_name,
            &args.ca,
            t,
        ),
        None => fbr_enroll::heartbeat::HeartbeatClient::new(
            args.server,
            &args.server_name,
            &args.pki_dir,
            &args.cert_name,
        ),
    }
    .map_err(anyhow::Error::msg)?;
    let point = |p: &str| ctl::parse_point(p).map_err(anyhow::Error::msg);
    let start = |op: Operation, f: JobFlags, boot: Option<Vec<Vec<String>>>, delay: u64| {
        (
            CtlRequest::Start(ctl::job_post(op, f.vms, f.key, boot, delay)),
            f.wait,
        )
    };
    let (request, wait) = match args.command {
        CtlCommand::Vms => (CtlRequest::Vms, false),
        CtlCommand::Points => (CtlRequest::Points, false),
        CtlCommand::Jobs {
            vm,
            state,
            operation,
            limit,
        } => (
            CtlRequest::Jobs {
                vm,
                state,
                operation,
                limit,
            },
            false,
        ),
        CtlCommand::Job { id, wait } => (CtlRequest::Job(id), wait),
        CtlCommand::Reprotect {
            common,
            alternate_location,
            retention_window,
            retention_max,
        } => start(
            Operation::Reprotect {
                location: ctl::location(alternate_location),
                retention: retention_window.map(|window_s| fbr_controller::RetentionChoice {
                    window_s,
                    max_bytes: retention_max.unwrap_or(0),
                }),
            },
            common,
            None,
            0,
        ),
        CtlCommand::Failover {
            common,
            point: p,
            planned,
            boot,
            boot_delay,
        } => {
            let boot = boot
                .as_deref()
                .map(ctl::parse_boot)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            start(
                Operation::Failover {
                    point: point(&p)?,
                    planned,
                },
                common,
                boot,
                boot_delay,
            )
        }
        CtlCommand::ChangePoint { common, point: p } => start(
            Operation::ChangePoint { point: point(&p)? },
            common,
            None,
            0,
        ),
        CtlCommand::Commit { common } => start(Operation::Commit, common, None, 0),
        CtlCommand::ReprotectBack { common } => start(Operation::ReprotectBack, common, None, 0),
        CtlCommand::TestFailover { common, point: p } => start(
            Operation::TestFailover { point: point(&p)? },
            common,
            None,
            0,
        ),
        CtlCommand::TestCleanup { common } => start(Operation::TestCleanup, common, None, 0),
        CtlCommand::Cancel { id } => (CtlRequest::Cancel(id), false),
        CtlCommand::Estimate {
            vms,
            point: p,
            planned,
        } => (
            CtlRequest::Estimate(fbr_relay::api::EstimatePost {
                vms,
                point: point(&p)?,
                planned,
            }),
            false,
        ),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(ctl::run(&client, request, args.json, wait))
        .map_err(anyhow::Error::msg)
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Create a new CA (ca.pem, ca.key) in a directory. Refuses to overwrite.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "failback-relay site CA")]
        common_name: String,
    },
    /// Issue a certificate signed by the CA in --dir. Refuses to overwrite.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// File stem and common name, e.g. `relay-1` or `agent-payroll`.
        #[arg(long)]
        name: String,
        /// agent, relay, master-target, or operator (a person or script using `relay ctl`).
        #[arg(long)]
        role: String,
        /// A VM the holder may write (repeat; `*` for any).
        #[arg(long = "vm")]
        vms: Vec<String>,
        /// A DNS name the holder serves under (repeat).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// An IP address the holder serves under (repeat).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
}

/// Flags of `relay run` and `relay check-config`. Each overrides the config key its
/// serde name gives (shown in brackets); the rest come from the config file, `RELAY_*`
/// variables and defaults (docs/CONFIGURATION.md).
#[derive(clap::Args, Debug, serde::Serialize)]
struct RunArgs {
    /// Config file (TOML). Default: /etc/relay/relay.toml if it exists.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// UDP address to listen on for agents [listen].
    #[arg(long)]
    #[serde(rename = "listen")]
    listen: Option<SocketAddr>,
    /// Unix socket for operator requests (`relay resync`); "" disables [control_socket].
    #[arg(long)]
    #[serde(rename = "control_socket")]
    control_socket: Option<String>,
    /// UDP address of the master target [master_target.address].
    #[arg(long)]
    #[serde(rename = "master_target.address")]
    master_target: Option<SocketAddr>,
    /// DNS name in the master target's certificate [master_target.name].
    #[arg(long)]
    #[serde(rename = "master_target.name")]
    master_target_name: Option<String>,
    /// Directory holding ca.pem and this relay's certificate and key [pki_dir].
    #[arg(long)]
    #[serde(rename = "pki_dir")]
    pki_dir: Option<PathBuf>,
    /// File stem of this relay's certificate in the PKI directory [cert_name].
    #[arg(long)]
    #[serde(rename = "cert_name")]
    cert_name: Option<String>,
    /// Write the bound agent address here once listening [port_file].
    #[arg(long)]
    #[serde(rename = "port_file")]
    port_file: Option<PathBuf>,
    /// TCP address of /metrics, /healthz and /readyz; "" disables [metrics_listen].
    #[arg(long)]
    #[serde(rename = "metrics_listen")]
    metrics_listen: Option<String>,
    /// Write the metrics endpoint's bound address here [metrics_port_file].
    #[arg(long)]
    #[serde(rename = "metrics_port_file")]
    metrics_port_file: Option<PathBuf>,
    /// Directory of the durable cache, a dedicated disk in production [cache.dir].
    #[arg(long)]
    #[serde(rename = "cache.dir")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the cache may use, e.g. 200GiB [cache.capacity].
    #[arg(long)]
    #[serde(rename = "cache.capacity")]
    cache_capacity: Option<String>,
    /// Size at which a cache segment is sealed, in MiB [cache.segment_size].
    #[arg(long)]
    #[serde(rename = "cache.segment_size", serialize_with = "mib_flag")]
    cache_segment_mib: Option<u64>,
    /// Bytes each agent stream may have unacknowledged, in MiB [ingest.credit].
    #[arg(long)]
    #[serde(rename = "ingest.credit", serialize_with = "mib_flag")]
    credit_mib: Option<u64>,
    /// Close an agent connection with no stream open this long
    /// [ingest.idle_connection_seconds].
    #[arg(long)]
    #[serde(rename = "ingest.idle_connection_seconds")]
    idle_connection_seconds: Option<u64>,
    /// Refuse a stream whose frame, once begun, takes longer than this; 0 never
    /// [ingest.frame_timeout_seconds].
    #[arg(long)]
    #[serde(rename = "ingest.frame_timeout_seconds")]
    frame_timeout_seconds: Option<u64>,
    /// Egress rate by time of week, e.g. "mon-fri 09:00-18:00 100mbit; other unlimited"
    /// [egress.schedule].
    #[arg(long)]
    #[serde(rename = "egress.schedule")]
    egress_schedule: Option<String>,
    /// Read the egress schedule from this file, re-read when it changes
    /// [egress.schedule_file].
    #[arg(long)]
    #[serde(rename = "egress.schedule_file")]
    egress_schedule_file: Option<PathBuf>,
    /// Offset of the schedule's clock from UTC, in minutes [egress.utc_offset_minutes].
    #[arg(long, allow_hyphen_values = true)]
    #[serde(rename = "egress.utc_offset_minutes")]
    schedule_utc_offset_minutes: Option<i64>,
    /// Priority of a VM's streams on the WAN leg, VM=WEIGHT (repeat)
    /// [egress.vm_weights.VM].
    #[arg(long = "vm-weight")]
    #[serde(skip)]
    vm_weights: Vec<String>,
    /// Largest UDP payload MTU discovery may use [max_udp_payload].
    #[arg(long)]
    #[serde(rename = "max_udp_payload")]
    max_udp_payload: Option<u16>,
    /// How often health is evaluated, in milliseconds [health.interval_ms].
    #[arg(long)]
    #[serde(rename = "health.interval_ms")]
    health_interval_ms: Option<u64>,
    /// Leave out writes superseded before the next recovery point: true or false
    /// [wan.coalesce].
    #[arg(long)]
    #[serde(rename = "wan.coalesce")]
    wan_coalesce: Option<bool>,
    #[command(flatten)]
    #[serde(flatten)]
    config_server: fbr_enroll::cli::ConfigServerFlags,
    /// Send blocks the master target holds as their SHA-256: true or false [wan.dedup].
    #[arg(long)]
    #[serde(rename = "wan.dedup")]
    wan_dedup: Option<bool>,
    /// Compression of WAN batches: off, adaptive or always [wan.compression].
    #[arg(long)]
    #[serde(rename = "wan.compression")]
    wan_compression: Option<String>,
    /// Level of the zstd contexts, 1..=9; 0: LZ4 only [wan.zstd_level].
    #[arg(long)]
    #[serde(rename = "wan.zstd_level")]
    wan_zstd_level: Option<i32>,
    /// Congestion control towards the master target: bbr or cubic [wan.congestion].
    #[arg(long)]
    #[serde(rename = "wan.congestion")]
    wan_congestion: Option<String>,
    /// Memory for all streams' zstd contexts, in MiB [wan.codec_memory].
    #[arg(long)]
    #[serde(rename = "wan.codec_memory", serialize_with = "mib_flag")]
    wan_codec_memory_mib: Option<u64>,
    /// TCP address of the operator API (HTTPS); "" disables the controller
    /// [controller.listen].
    #[arg(long)]
    #[serde(rename = "controller.listen")]
    controller_listen: Option<String>,
    /// Write the operator API's bound address here [controller.port_file].
    #[arg(long)]
    #[serde(rename = "controller.port_file")]
    controller_port_file: Option<PathBuf>,
    /// Where the controller keeps its jobs [controller.state_dir].
    #[arg(long)]
    #[serde(rename = "controller.state_dir")]
    controller_state_dir: Option<PathBuf>,
    /// The Azure side's hypervisor hook [controller.azure_hook].
    #[arg(long)]
    #[serde(rename = "controller.azure_hook")]
    azure_hook: Option<PathBuf>,
    /// The on-premises side's hypervisor hook [controller.on_premises_hook].
    #[arg(long)]
    #[serde(rename = "controller.on_premises_hook")]
    on_premises_hook: Option<PathBuf>,
    /// Seconds one VM takes to boot, for estimates [controller.boot_estimate_seconds].
    #[arg(long)]
    #[serde(rename = "controller.boot_estimate_seconds")]
    boot_estimate_seconds: Option<f64>,
    /// Seconds shutting Azure VMs down takes, for estimates
    /// [controller.shutdown_estimate_seconds].
    #[arg(long)]
    #[serde(rename = "controller.shutdown_estimate_seconds")]
    shutdown_estimate_seconds: Option<f64>,
    /// Reprotect back: the Azure master target's UDP address
    /// [controller.reverse_master_target].
    #[arg(long)]
    #[serde(rename = "controller.reverse_master_target")]
    reverse_master_target: Option<SocketAddr>,
    /// The DNS name in its certificate [controller.reverse_master_target_name].
    #[arg(long)]
    #[serde(rename = "controller.reverse_master_target_name")]
    reverse_master_target_name: Option<String>,
    /// Reprotect back: the on-premises relay (host:port) the VMs' agents are pointed
    /// at [controller.reverse_relay].
    #[arg(long)]
    #[serde(rename = "controller.reverse_relay")]
    reverse_relay: Option<String>,
}

impl RunArgs {
    /// The effective, validated settings: the flags are the last layer.
    fn settings(&self) -> Result<RelaySettings, ConfigError> {
        let mut flags = flag_overrides(self)?;
        // `--vm-weight VM=W` sets a key of the free-form table `egress.vm_weights`.
        for w in &self.vm_weights {
            let parsed = w
                .split_once('=')
                .filter(|(vm, _)| !vm.is_empty() && !vm.contains('.'))
                .and_then(|(vm, n)| Some((vm, n.parse::<i64>().ok()?)));
            let Some((vm, n)) = parsed else {
                return Err(ConfigError::new(
                    "--vm-weight",
                    format!("{w:?}: expected VM=WEIGHT (a VM name without dots)"),
                ));
            };
            flags.push((format!("egress.vm_weights.{vm}"), n.into()));
        }
        load_settings(self.config.as_deref(), flags)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        fbr_daemon::init_logging(cli.log_json, "info");
    }
    match cli.command {
        Command::Run(args) => {
            fbr_daemon::run_daemon("relay", args.settings(), cli.log_json, |s| s.log_json, run)
        }
        Command::CheckConfig(args) => {
            let settings = args.settings();
            if let Ok(s) = &settings {
                if let Some(warning) = cache_disk_warning(&s.cache.dir, s.cache.capacity.0) {
                    eprintln!("relay: warning: {warning}");
                }
            }
            fbr_daemon::report_check("relay", settings)
        }
        Command::BenchCache { dir, quick, json } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("fbr-bench-cache-{}", std::process::id()))
            });
            let Some(rt) = runtime() else {
                return ExitCode::FAILURE;
            };
            report(rt.block_on(async {
                let result = fbr_relay::bench::run(&dir, quick).await?;
                if json {
                    println!("{}", serde_json::to_string(&result)?);
                }
                Ok(())
            }))
        }
        Command::Resync {
            control_socket,
            vm,
            disk,
            mode,
            json,
        } => control(&control_socket, &Request::Resync { vm, disk, mode }, json),
        Command::Resyncs {
            control_socket,
            json,
        } => control(&control_socket, &Request::Resyncs, json),
        Command::Ctl(args) => match ctl(args) {
            Ok(true) => ExitCode::SUCCESS,
            // The job failed or was cancelled: what it said is printed.
            Ok(false) => ExitCode::FAILURE,
            Err(e) => report(Err(e)),
        },
        Command::Register(args) => fbr_enroll::cli::run(
            "relay",
            args,
            fbr_transport::Role::Relay,
            "/etc/relay/pki",
            "relay",
        ),
        Command::Pki(PkiCommand::Init { dir, common_name }) => {
            report(pki::init_ca(&dir, &common_name).map_err(Into::into))
        }
        Command::Pki(PkiCommand::Issue {
            dir,
            name,
            role,
            vms,
            dns_names,
            ips,
        }) => {
            let Some(role) = Role::parse(&role) else {
                eprintln!("relay: invalid --role {role:?}: expected agent, relay, master-target or operator");
                return ExitCode::from(EX_USAGE);
            };
            let req = IssueRequest {
                name,
                role,
                vms,
                dns_names,
                ip_addresses: ips,
            };
            report(pki::issue(&dir, &req).map_err(Into::into))
        }
    }
}

/// The async runtime, or `None` after saying why it could not start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("relay: cannot start runtime: {e}"))
        .ok()
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    fbr_daemon::report("relay", r)
}

/// Sends one request to the running relay and prints its answer.
fn control(socket: &std::path::Path, request: &Request, json: bool) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    report(rt.block_on(async {
        let answer = fbr_relay::control::request(socket, request)
            .await
            .map_err(anyhow::Error::msg)?;
        if json {
            println!("{}", serde_json::to_string(&answer)?);
        } else if let Some(resyncs) = &answer.resyncs {
            println!(
                "{:<24} {:<6} {:>7} {:>12} {:>12} {:>8}",
                "DISK", "MODE", "DONE", "COMPARED", "SENT", "ETA"
            );
            for r in resyncs {
                let done = if r.regions == 0 {
                    100.0
                } else {
                    100.0 * r.next_region as f64 / r.regions as f64
                };
                println!(
                    "{:<24} {:<6} {:>6.1}% {:>12} {:>12} {:>8}",
                    format!("{}/disk{}", r.vm, r.disk),
                    r.mode,
                    done,
                    r.compared_bytes,
                    r.sent_bytes,
                    r.eta_seconds.map_or("-".into(), |s| format!("{s:.0} s"))
                );
            }
        } else if answer.ok {
            println!("resync requested");
        }
        anyhow::ensure!(
            answer.ok,
            "{}",
            answer.error.unwrap_or_else(|| "refused".into())
        );
        Ok(())
    }))
}

/// The master target the configuration server assigns this relay (no
/// `master_target.address` set): asked up to 5 times, 2 s apart.
async fn assigned_master_target(settings: &RelaySettings) -> anyhow::Result<SocketAddr> {
    let server = settings
        .config_server
        .address()
        .map_err(|(k, e)| anyhow::anyhow!("{k}: {e}"))?
        .context("master_target.address or config_server.address must be set")?;
    let client = fbr_enroll::heartbeat::HeartbeatClient::new(
        server,
        &settings.config_server.name,
        &settings.pki_dir,
        &settings.cert_name,
    )
    .map_err(anyhow::Error::msg)
    .context("config_server")?;
    let mut last_error = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        match client.assignment().await {
            Ok(a) => {
                let target = a.master_target.context(
                    "the configuration server assigns no master target yet (register one with --advertise)",
                )?;
                let addr = tokio::net::lookup_host(&target)
                    .await
                    .with_context(|| format!("the assigned master target {target}"))?
                    .next()
                    .with_context(|| {
                        format!("the assigned master target {target} resolves to nothing")
                    })?;
                tracing::info!(master_target = %addr, "master target assigned by the configuration server");
                return Ok(addr);
            }
            Err(e) => last_error = e,
        }
    }
    anyhow::bail!("asking the configuration server for the master target: {last_error}")
}

async fn run(settings: RelaySettings) -> anyhow::Result<()> {
    let tuning = QuicTuning {
        max_udp_payload: settings.max_udp_payload,
        ..QuicTuning::default()
    };
    // The WAN leg to the master target: its congestion controller is the operator's.
    let upstream_tuning = QuicTuning {
        congestion: fbr_transport::Congestion::parse(&settings.wan.congestion).unwrap_or_default(),
        ..tuning.clone()
    };
    let cache_config = CacheConfig {
        segment_bytes: settings.cache.segment_size.0,
        capacity_bytes: settings.cache.capacity.0,
    };
    let master_target = match settings.master_target.address {
        Some(a) => a,
        None => assigned_master_target(&settings).await?,
    };
    if let Some(warning) = cache_disk_warning(&settings.cache.dir, settings.cache.capacity.0) {
        tracing::warn!("{warning}");
    }
    let (cache, report) = RelayCache::open(&settings.cache.dir, cache_config)?;
    tracing::info!(
        segments = report.segments,
        sealed = report.sealed_segments,
        records = report.records,
        bytes = report.bytes,
        seconds = report.elapsed_s,
        "cache recovered"
    );
    for c in &report.corruption {
        tracing::error!("cache corruption: {c}");
    }
    for s in &report.resync {
        tracing::error!(stream = %s, "stream needs resync (cache corruption)");
    }
    let server_creds = Credentials::load(&settings.pki_dir, &settings.cert_name)?;
    let client_creds = Credentials::load(&settings.pki_dir, &settings.cert_name)?;
    // One agent is one VM: a stream per disk and one per resync at most.
    let agent_tuning = QuicTuning {
        max_peer_streams: fbr_relay::server::AGENT_STREAMS_PER_CONNECTION,
        ..tuning.clone()
    };
    let agents = server_endpoint(settings.listen, server_creds, &agent_tuning)?;
    let upstream_endpoint =
        client_endpoint(any_addr_for(master_target), client_creds, &upstream_tuning)?;
    let link = PeerLink::new(
        upstream_endpoint.clone(),
        master_target,
        settings.master_target.name.clone(),
        Role::MasterTarget,
    );
    // Connect eagerly so a wrong address or certificate shows up in the log at start;
    // a master target that is down is not fatal (streams get UpstreamUnavailable).
    if let Err(e) = link.connection().await {
        tracing::warn!("master target not reachable yet: {e}");
    }
    let egress = Egress::start(settings.egress_config()?);
    let relay = Relay::new(
        RelayConfig {
            agent_credit_bytes: settings.ingest.credit.0,
            agent_memory_bytes: settings.ingest.memory.0,
            health: settings.health_thresholds(),
            health_interval: settings.health_interval(),
            wan: settings.wan_config(),
            dedup_known_blocks: settings.wan.dedup_known_blocks as usize,
            peer_limits: settings.peer_limits(),
        },
        link,
        cache.clone(),
        egress,
    );
    let health = tokio::spawn(observe::run_health_task(relay.clone()));
    let heartbeats = {
        let (r, every) = (relay.clone(), settings.config_server.heartbeat_interval_s);
        let last = std::sync::Mutex::new(None);
        let advertise = settings.config_server.advertised(agents.local_addr()?);
        fbr_enroll::heartbeat::start(
            &settings.config_server,
            &settings.pki_dir,
            &settings.cert_name,
            move || {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                observe::heartbeat(&r, every, &mut last, advertise.clone())
            },
        )
        .map_err(anyhow::Error::msg)?
        .map(|(task, status)| {
            relay.watch_config_server(status);
            task
        })
    };
    let control = match settings.control_socket.as_str() {
        "" => None,
        path => Some(
            fbr_relay::control::serve(std::path::Path::new(path), relay.clone())
                .with_context(|| format!("control_socket {path}"))?,
        ),
    };
    let metrics_gate = fbr_metrics::http::gate();
    let api_gate = fbr_relay::api::gate();
    fbr_metrics::HttpConnections::register(
        &relay.metrics().registry,
        "fbr_relay",
        vec![("metrics", metrics_gate.stats()), ("api", api_gate.stats())],
    );
    let controller = start_controller(&settings, &relay, api_gate).await?;
    let endpoints = observe::RelayEndpoints::new(relay.clone());
    let metrics = match settings.metrics_addr()? {
        Some(addr) => Some(
            fbr_metrics::start(
                addr,
                settings.metrics_port_file.as_deref(),
                endpoints.clone(),
                metrics_gate,
            )
            .await
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let local = agents.local_addr()?;
    if let Some(pf) = &settings.port_file {
        fbr_daemon::write_port_file(pf, local)
            .with_context(|| format!("writing {}", pf.display()))?;
    }
    tracing::info!(listen = %local, %master_target, "relay listening");
    let server = tokio::spawn(relay.clone().serve(agents.clone()));
    let notify = fbr_metrics::spawn_systemd_readiness(endpoints)
        .context("NOTIFY_SOCKET (systemd notification)")?;
    fbr_daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    notify.abort();
    let _ = fbr_daemon::systemd::Notifier::from_env().and_then(|n| n.notify("STOPPING=1"));
    // Agents and the master target hear at once that the relay stopped.
    tokio::join!(
        fbr_transport::quic::close_gracefully(&agents, b"relay shutting down"),
        fbr_transport::quic::close_gracefully(&upstream_endpoint, b"relay shutting down"),
    );
    server.abort();
    health.abort();
    if let Some(h) = heartbeats {
        h.abort();
    }
    if let Some(c) = control {
        c.abort();
        let _ = std::fs::remove_file(&settings.control_socket);
    }
    if let Some(m) = metrics {
        m.abort();
    }
    for task in controller {
        task.abort();
    }
    cache.shutdown();
    let m = relay.metrics();
    tracing::info!(
        records = m.records_ingested_total.get(),
        duplicates_skipped = m.duplicates_skipped_total.get(),
        "final counters"
    );
    Ok(())
}

/// Starts the failback controller and its operator API, unless `controller.listen` is
/// empty: its tasks, to stop at shutdown.
async fn start_controller(
    settings: &RelaySettings,
    relay: &std::sync::Arc<Relay>,
    gate: fbr_daemon::gate::ConnectionGate,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use fbr_controller::hypervisor::{CommandHook, Hypervisor};
    let Some(addr) = settings.controller_addr()? else {
        return Ok(Vec::new());
    };
    let c = &settings.controller;
    let hook = |path: &Option<PathBuf>| {
        path.as_ref().map(|p| {
            let mut h = CommandHook::new(p.clone());
            h.timeout = std::time::Duration::from_secs(c.hook_timeout_seconds);
            h.retries = c.hook_retries;
            std::sync::Arc::new(h) as std::sync::Arc<dyn Hypervisor>
        })
    };
    let failback = fbr_relay::failback::Failback::open(
        relay.clone(),
        fbr_relay::failback::FailbackConfig {
            state_dir: c.state_dir.clone(),
            azure: hook(&c.azure_hook),
            on_premises: hook(&c.on_premises_hook),
            boot_estimate_s: c.boot_estimate_seconds,
            shut_down_estimate_s: c.shutdown_estimate_seconds,
            wait_timeout: std::time::Duration::from_secs(c.wait_timeout_seconds),
            reverse: reverse_side(settings)?,
        },
    )
    .with_context(|| format!("controller.state_dir {}", c.state_dir.display()))?;
    let tls = Credentials::load(&settings.pki_dir, &settings.cert_name)?.https_server_config()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("controller.listen {addr}"))?;
    let local = listener.local_addr()?;
    if let Some(pf) = &c.port_file {
        fbr_daemon::write_port_file(pf, local)
            .with_context(|| format!("writing {}", pf.display()))?;
    }
    tracing::info!(listen = %local, "operator API listening");
    let api = std::sync::Arc::new(fbr_relay::api::Api {
        failback: failback.clone(),
        relay: relay.clone(),
    });
    Ok(vec![
        tokio::spawn(failback.run()),
        tokio::spawn(fbr_relay::api::serve(listener, tls, api, gate)),
    ])
}

/// Reprotect back's far side, when `[controller] reverse_master_target` is set: a link
/// of its own to the Azure master target (this relay's certificate), and the
/// on-premises relay the VMs' agents are pointed at.
fn reverse_side(
    settings: &RelaySettings,
) -> anyhow::Result<Option<fbr_relay::failback::ReverseSide>> {
    let c = &settings.controller;
    let Some(addr) = c.reverse_master_target else {
        return Ok(None);
    };
    let tuning = QuicTuning {
        max_udp_payload: settings.max_udp_payload,
        ..QuicTuning::default()
    };
    let creds = Credentials::load(&settings.pki_dir, &settings.cert_name)?;
    let endpoint = client_endpoint(any_addr_for(addr), creds, &tuning)?;
    Ok(Some(fbr_relay::failback::ReverseSide {
        link: PeerLink::new(
            endpoint,
            addr,
            c.reverse_master_target_name.clone(),
            Role::MasterTarget,
        ),
        relay: c.reverse_relay.clone(),
    }))
}

/// A warning when the configured cache capacity exceeds the filesystem that holds (or
/// will hold) the cache directory: the cache could never grow that far, and health
/// measures free space against the disk instead (docs/CONFIGURATION.md).
fn cache_disk_warning(dir: &std::path::Path, capacity: u64) -> Option<String> {
    // The directory may not exist yet: its nearest existing ancestor is on the same disk
    // unless a mount comes in between, which creating the directory would not change.
    let existing = dir.ancestors().find(|a| a.exists())?;
    let s = rustix::fs::statvfs(existing).ok()?;
    let size = s.f_blocks.saturating_mul(s.f_frsize);
    (capacity > size).then(|| {
        format!(
            "cache.capacity is {capacity} bytes, but the filesystem of {} holds only {size}: \
             the cache can never be that large; free space is measured against the disk",
            dir.display()
        )
    })
}
