//! `churn`: agent emulator, load generator, verifier, drill and benchmark.
//!
//! Thin: parses flags and calls the library. Exit status: 0 when everything verified,
//! 1 on a failed verification or run, 64 on bad usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fbr_churn::agent::{self, AgentOptions, DiskPlan};
use fbr_churn::drill::{self, DrillOptions, DrillSummary, Reprotect, ReprotectLocation};
use fbr_churn::source::Manifest;
use fbr_churn::workload::{Content, Profile};
use fbr_churn::writelog;
use fbr_churn::{parse_size, verify};
use fbr_transport::QuicTuning;

const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "churn",
    version,
    about = "Failback agent emulator: churns emulated VM disks through a relay and verifies the replicas"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A workload profile, or all of them cycled over the disks.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileChoice {
    All,
    Random,
    Sequential,
    Mixed,
    Trim,
}

impl ProfileChoice {
    fn profile(self) -> Option<Profile> {
        match self {
            ProfileChoice::All => None,
            ProfileChoice::Random => Some(Profile::Random),
            ProfileChoice::Sequential => Some(Profile::Sequential),
            ProfileChoice::Mixed => Some(Profile::Mixed),
            ProfileChoice::Trim => Some(Profile::Trim),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct WorkloadArgs {
    /// Number of emulated VMs.
    #[arg(long, default_value_t = 3)]
    vms: u32,
    /// Disks per VM.
    #[arg(long, default_value_t = 2)]
    disks: u32,
    /// Size of each disk (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    disk_size: u64,
    /// Where writes land.
    #[arg(long, value_enum, default_value_t = ProfileChoice::All)]
    profile: ProfileChoice,
    /// What the written bytes look like.
    #[arg(long, value_enum, default_value_t = Content::Mixed)]
    content: Content,
    /// Seed of every random choice: the same seed gives the same churn.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replication groups the VMs are spread over (tags are cut per group).
    #[arg(long, default_value_t = 1)]
    groups: u32,
    /// Milliseconds between crash-consistent tags.
    #[arg(long, default_value_t = 500)]
    tag_interval_ms: u64,
    /// Milliseconds between app-consistent tags (the agent quiesces the VM's
    /// applications, then cuts the tag in place of a crash-consistent one); rounded to a
    /// multiple of --tag-interval-ms; 0: none.
    #[arg(long, default_value_t = 2500)]
    app_tag_interval_ms: u64,
    /// Largest UDP payload MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Churn at a steady rate (MB/s, all disks together) instead of as fast as the
    /// path accepts; lag is then the recovery-point objective at that load.
    #[arg(long)]
    rate_mb: Option<f64>,
    /// Start as a reprotect: to the original location (the master target holds the
    /// disks as they were at failover; a delta resync sends what changed since) or to
    /// an alternate one (empty disks; a full copy). The churn lasts --seconds once in
    /// step.
    #[arg(long, value_enum)]
    reprotect: Option<ReprotectLocation>,
    /// With --reprotect: percent of each disk's blocks holding data at failover.
    #[arg(long, default_value_t = 50.0)]
    used_percent: f64,
    /// With --reprotect original: percent of the blocks rewritten in Azure since.
    #[arg(long, default_value_t = 5.0)]
    stale_percent: f64,
}

impl WorkloadArgs {
    /// Which tags are app-consistent: every n-th (0: none).
    fn app_tag_every(&self) -> u64 {
        if self.app_tag_interval_ms == 0 {
            return 0;
        }
        let every = self.app_tag_interval_ms as f64 / self.tag_interval_ms.max(1) as f64;
        (every.round() as u64).max(1)
    }

    /// The drill these flags describe (also how `churn run` plans its disks).
    fn drill_options(&self, seconds: f64) -> DrillOptions {
        DrillOptions {
            vms: self.vms,
            disks_per_vm: self.disks,
            disk_size: self.disk_size,
            duration: Duration::from_secs_f64(seconds),
            tag_interval: Duration::from_millis(self.tag_interval_ms),
            app_tag_every: self.app_tag_every(),
            profile: self.profile.profile(),
            content: self.content,
            seed: self.seed,
            groups: self.groups,
            progress: true,
            keep: None,
            max_udp_payload: self.max_udp_payload,
            cache_capacity: 8 << 30,
            credit_mib: 16,
            rate_bytes_per_s: self.rate_mb.map(|r| (r * 1e6) as u64),
            reprotect: self.reprotect.map(|location| Reprotect {
                location,
                used_percent: self.used_percent,
                stale_percent: self.stale_percent,
            }),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct RelayArgs {
    /// UDP address of the relay.
    #[arg(long)]
    relay: SocketAddr,
    /// DNS name in the relay's certificate.
    #[arg(long, default_value = "relay")]
    relay_name: String,
    /// Directory with ca.pem and the agent certificate.
    #[arg(long)]
    pki_dir: PathBuf,
    /// File stem of the agent certificate in --pki-dir.
    #[arg(long, default_value = "agent")]
    cert_name: String,
    /// Where to write the run manifest (needed by `churn verify`).
    #[arg(long)]
    manifest: PathBuf,
    /// The site's configuration server (IP:PORT): follow this agent's assignment while
    /// running, moving VMs between relays when an operator asks (`config-server move`).
    #[arg(long)]
    config_server: Option<SocketAddr>,
    /// The name in the configuration server's certificate.
    #[arg(long, default_value = "config-server")]
    config_server_name: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this agent with the site's configuration server using its passphrase:
    /// writes its key (kept if it exists), certificate and the site CA; `--vm` names the
    /// VMs whose disks it writes.
    Enroll(fbr_enroll::cli::RegisterArgs),
    /// Run the whole path locally (fresh PKI, master target, relay), churn, verify.
    Drill {
        #[command(flatten)]
        workload: WorkloadArgs,
        /// How long to churn, seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Keep the site (logs, data, manifest) in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print one JSON summary object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// The whole failback cycle through the relay's controller API: reprotect while
    /// the VMs churn, a test failover, a planned failover to latest (zero data lost), an
    /// unplanned one to a named point of a two-group plan, commit; verified byte for
    /// byte, with a timeline of estimates against actuals.
    DrillFailback {
        #[arg(long, default_value_t = 4)]
        vms: u32,
        #[arg(long, default_value_t = 1)]
        disks: u32,
        #[arg(long, default_value = "16MiB", value_parser = parse_size)]
        disk_size: u64,
        /// Steady churn, MB/s, all disks together.
        #[arg(long, default_value_t = 4.0)]
        rate_mb: f64,
        /// Seconds the VMs churn while protected, before the failovers.
        #[arg(long, default_value_t = 4.0)]
        protected_seconds: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep the site (logs, data, hooks' state) in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print one JSON summary object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// The failback drill's emulated hypervisor hook (run by the relay's controller as
    /// `HOOK ACTION`; docs/CONTROLLER.md).
    VmHook {
        /// The platform's directory of VM states.
        #[arg(long)]
        state_dir: PathBuf,
        /// The platform's VMs are the drill's agents: a shut-down waits for them.
        #[arg(long)]
        agents: bool,
        /// shut_down, power_on, delete or status.
        action: String,
    },
    /// Benchmark the path: like the drill, sized for throughput, with rates and CPU.
    Bench {
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        vms: u32,
        #[arg(long, default_value_t = 2)]
        disks: u32,
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        disk_size: u64,
        #[arg(long, value_enum, default_value_t = ProfileChoice::Mixed)]
        profile: ProfileChoice,
        #[arg(long, value_enum, default_value_t = Content::Mixed)]
        content: Content,
        #[arg(long, default_value_t = 1000)]
        tag_interval_ms: u64,
        /// Largest UDP payload MTU discovery may use (loopback allows more than a WAN).
        #[arg(long, default_value_t = 1452)]
        max_udp_payload: u16,
        /// Churn at a steady rate (MB/s) instead of flat out: lag is then the RPO.
        #[arg(long)]
        rate_mb: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the relay's egress limit and fairness (release build).
    BenchThrottle {
        /// The egress limit to configure, e.g. 200mbit or 25MB/s.
        #[arg(long, default_value = "200mbit")]
        rate: String,
        /// Equal-priority streams contending for it.
        #[arg(long, default_value_t = 100)]
        streams: u32,
        /// Measurement window, seconds (after a 3 s warm-up).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the relay's cost as streams grow: the same total churn over 10, 100
    /// and 1,000 disks (release build).
    BenchScale {
        /// Stream counts, comma-separated; the first is the reference.
        #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
        streams: Vec<u32>,
        /// Churn per case, seconds.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Size of each disk.
        #[arg(long, default_value = "8MiB", value_parser = fbr_daemon::parse_size)]
        disk_size: u64,
        /// Total churn, MB/s (default: half of what the first case does flat out).
        #[arg(long)]
        rate_mb: Option<f64>,
        /// Milliseconds between recovery points.
        #[arg(long, default_value_t = 500)]
        tag_interval_ms: u64,
        /// Replication groups per case.
        #[arg(long, default_value_t = 1)]
        groups: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Steady churn for N minutes with the relay and the master target killed (-9) in
    /// turn, WAN drops and a small cache under pressure; every point verified, and the
    /// daemons' memory, open files and threads must not grow within a life (release
    /// build).
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seconds between events (kill the relay, kill the master target, drop the WAN).
        #[arg(long, default_value_t = 30)]
        cycle_seconds: u64,
        #[arg(long, default_value_t = 16)]
        streams: u32,
        /// Total churn, MB/s.
        #[arg(long, default_value_t = 6.0)]
        rate_mb: f64,
        #[arg(long)]
        json: bool,
    },
    /// Honest churn without and with hostile peers beside it (a flood of foreign
    /// handshakes, 1,000 idle connections, silent, trickling and oversized streams,
    /// slowloris on /metrics and the operator API): the honest rate under abuse against
    /// without, memory, every point verified (release build).
    BenchHostile {
        /// Honest streams (4 disks per VM).
        #[arg(long, default_value_t = 100)]
        streams: u32,
        /// Seconds per run.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Honest churn in total, MB/s.
        #[arg(long, default_value_t = 20.0)]
        rate_mb: f64,
        #[arg(long)]
        json: bool,
    },
    /// Replicate through an emulated WAN (the master target in a network namespace
    /// behind tc netem: 40/80 ms, 0.1%/1% loss, 100 Mbit/s and 1 Gbit/s, MTU 1,380, a
    /// 60 s outage): the fraction of the link rate achieved, every point verified. Needs
    /// root (release build).
    BenchWanEmulation {
        /// Churn per case, seconds.
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        /// Disks churning (two per VM).
        #[arg(long, default_value_t = 8)]
        streams: u32,
        /// Only the cases whose name contains one of these (repeat).
        #[arg(long)]
        only: Vec<String>,
        /// The relay's congestion control (wan.congestion), comma-separated: each runs
        /// the whole grid.
        #[arg(long, value_delimiter = ',', default_values_t = ["bbr".to_string()])]
        congestion: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the WAN leg per content model against rsync (release build; needs
    /// rsync: ./scripts/bench-wan installs it).
    BenchWan {
        /// How long to churn per model, seconds.
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// VMs (one disk each).
        #[arg(long, default_value_t = 2)]
        vms: u32,
        /// Size of each disk, e.g. 128MiB.
        #[arg(long, default_value = "128MiB", value_parser = fbr_daemon::parse_size)]
        disk_size: u64,
        /// Seconds between recovery points.
        #[arg(long, default_value_t = 1.0)]
        tag_interval: f64,
        /// Steady churn in MB/s over all disks (default: flat out).
        #[arg(long)]
        rate_mb: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Skip the rsync comparison.
        #[arg(long)]
        no_rsync: bool,
        /// The WAN link's rates in Mbit/s, one sweep each (comma-separated), enforced by
        /// the relay's egress limit (0: unlimited loopback, where the relay rarely has a
        /// backlog to coalesce).
        #[arg(long, value_delimiter = ',', default_values_t = [100, 1000])]
        link_mbit: Vec<u64>,
        /// Only these models (repeat): zeros, dup, text, random, mixed,
        /// random_lz4_always, fs.
        #[arg(long)]
        only: Vec<String>,
        /// A real filesystem's write log (`scripts/capture-fs-writelog`), replayed as
        /// the `fs` model.
        #[arg(long)]
        fs_log: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark a reprotect to the original location (release build; needs rsync and
    /// room for three images of --disk-size): per case, a replica differing from its
    /// source in that share of blocks (0: unchanged) is resynced while the VM keeps
    /// writing.
    BenchResync {
        #[arg(long, default_value = "16GiB", value_parser = fbr_daemon::parse_size)]
        disk_size: u64,
        /// Percent of the blocks that differ, one case each (repeat).
        #[arg(long = "differing", default_values_t = [0.0, 1.0, 10.0, 100.0])]
        differing: Vec<f64>,
        /// The VM's steady churn meanwhile, MB/s.
        #[arg(long, default_value_t = 1.0)]
        churn_mb: f64,
        /// Skip the rsync comparison.
        #[arg(long)]
        no_rsync: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark going back in time at the master target (release build): test
    /// failovers and rollbacks to points 1%, 10% and 50% of a churned window ago, against
    /// the disk's write rate; the journal's bytes per byte applied.
    BenchRetention {
        /// The window: seconds of steady churn (a tag a second).
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Disks (one VM each, one replication group).
        #[arg(long, default_value_t = 2)]
        disks: u32,
        #[arg(long, default_value = "1GiB", value_parser = fbr_daemon::parse_size)]
        disk_size: u64,
        /// Steady churn over all disks, MB/s.
        #[arg(long, default_value_t = 20.0)]
        rate_mb: f64,
        /// Where the site lives: its file system decides reflink clones or sparse copies
        /// (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Drive an already running relay with generated churn.
    Run {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        relay: RelayArgs,
        /// How long to churn, seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Replay a recorded write log through a running relay.
    Replay {
        /// The write log (see docs/WRITE-LOG-FORMAT.md).
        #[arg(long)]
        log: PathBuf,
        #[command(flatten)]
        relay: RelayArgs,
        /// Replication group of every disk in the log.
        #[arg(long, default_value = "replay")]
        group: String,
        /// A crash-consistent tag this often, for a log without TAG records (a log
        /// with them replays with its own tags, where it has them).
        #[arg(long, default_value_t = 500)]
        tag_interval_ms: u64,
        #[arg(long, default_value_t = 1452)]
        max_udp_payload: u16,
    },
    /// Write a write log from generated churn (for replay tests and demos).
    MakeLog {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        workload: WorkloadArgs,
        /// Changes in the log, interleaved round-robin over the disks.
        #[arg(long, default_value_t = 2000)]
        records: u64,
        /// A TAG record (a consistency point of every disk) after every this many
        /// changes; 0: none.
        #[arg(long, default_value_t = 0)]
        tag_every: u64,
        /// Every this many TAGs is app-consistent; 0: none.
        #[arg(long, default_value_t = 4)]
        app_tag_every: u64,
    },
    /// Verify a master target's data directory against a run manifest (daemon stopped).
    Verify {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        master_data: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fbr_daemon::init_logging(false, "warn");
    if let Command::VmHook {
        state_dir,
        action,
        agents,
    } = &cli.command
    {
        return ExitCode::from(fbr_churn::platform::hook(state_dir, action, *agents) as u8);
    }
    if let Command::Enroll(args) = cli.command {
        return fbr_enroll::cli::run("churn", args, fbr_transport::Role::Agent, "pki", "agent");
    }
    if let Some(msg) = usage_error(&cli.command) {
        eprintln!("churn: {msg}");
        return ExitCode::from(EX_USAGE);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("churn: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("churn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks values clap cannot; `Some(message)` means exit 64.
fn usage_error(cmd: &Command) -> Option<String> {
    let w = match cmd {
        Command::Drill { workload, .. }
        | Command::Run { workload, .. }
        | Command::MakeLog { workload, .. } => Some(workload),
        _ => None,
    };
    if let Some(w) = w {
        if w.vms == 0 || w.disks == 0 {
            return Some("--vms and --disks must be at least 1".into());
        }
        if w.disk_size < 1 << 20 || w.disk_size % 4096 != 0 {
            return Some(format!(
                "invalid --disk-size {}: must be at least 1 MiB and a multiple of 4 KiB",
                w.disk_size
            ));
        }
        if w.tag_interval_ms == 0 {
            return Some("--tag-interval-ms must be at least 1".into());
        }
    }
    match cmd {
        Command::Bench { disk_size, .. } if *disk_size < 1 << 20 || disk_size % 4096 != 0 => {
            Some(format!(
                "invalid --disk-size {disk_size}: must be at least 1 MiB and a multiple of 4 KiB"
            ))
        }
        Command::Drill { seconds, .. }
        | Command::Run { seconds, .. }
        | Command::Bench { seconds, .. }
            if !(*seconds > 0.0 && seconds.is_finite()) =>
        {
            Some(format!(
                "invalid --seconds {seconds}: must be a positive number"
            ))
        }
        _ => None,
    }
}

async fn dispatch(cmd: Command) -> anyhow::Result<bool> {
    match cmd {
        Command::Enroll(_) | Command::VmHook { .. } => {
            anyhow::bail!("run before the runtime starts")
        }
        Command::DrillFailback {
            vms,
            disks,
            disk_size,
            rate_mb,
            protected_seconds,
            seed,
            keep,
            json,
        } => {
            anyhow::ensure!(
                rate_mb > 0.0 && rate_mb.is_finite(),
                "--rate-mb must be a positive number"
            );
            anyhow::ensure!(
                vms >= 2,
                "--vms must be at least 2 (half fail over planned, half not)"
            );
            anyhow::ensure!(disks >= 1, "--disks must be at least 1");
            anyhow::ensure!(
                disk_size >= 1 << 20 && disk_size % 4096 == 0,
                "invalid --disk-size {disk_size}: must be at least 1 MiB and a multiple of 4 KiB"
            );
            anyhow::ensure!(
                protected_seconds >= 0.0 && protected_seconds.is_finite(),
                "--protected-seconds must be 0 or more"
            );
            let opts = fbr_churn::failbackdrill::FailbackOptions {
                vms,
                disks_per_vm: disks,
                disk_size,
                rate_bytes_per_s: (rate_mb * 1e6) as u64,
                protected_for: Duration::from_secs_f64(protected_seconds),
                seed,
                keep,
                ..Default::default()
            };
            eprintln!(
                "failback drill: {vms} VMs x {disks} disks of {} MiB, churning {rate_mb} MB/s",
                disk_size >> 20
            );
            let summary = fbr_churn::failbackdrill::run(opts).await?;
            fbr_churn::failbackdrill::print_summary(&summary);
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            }
            Ok(summary.verified)
        }
        Command::Drill {
            workload: w,
            seconds,
            keep,
            json,
        } => {
            let opts = DrillOptions {
                keep,
                ..w.drill_options(seconds)
            };
            eprintln!(
                "drill: {} VMs x {} disks of {} MiB, {:?} profile, {:?} content, {seconds} s, a tag every {} ms",
                w.vms, w.disks, w.disk_size >> 20, w.profile, w.content, w.tag_interval_ms
            );
            finish_drill(drill::run_drill(opts).await?, json)
        }
        Command::Bench {
            seconds,
            vms,
            disks,
            disk_size,
            profile,
            content,
            tag_interval_ms,
            max_udp_payload,
            rate_mb,
            json,
        } => {
            let opts = DrillOptions {
                vms,
                disks_per_vm: disks,
                disk_size,
                tag_interval: Duration::from_millis(tag_interval_ms),
                profile: profile.profile(),
                content,
                max_udp_payload,
                cache_capacity: 16 << 30,
                ..DrillOptions::streams(vms * disks, Duration::from_secs_f64(seconds), rate_mb)
            };
            finish_drill(drill::run_drill(opts).await?, json)
        }
        Command::Run {
            workload: w,
            relay,
            seconds,
        } => {
            let plans = drill::plan_disks(&w.drill_options(seconds));
            let opts = agent_options(
                w.rate_mb,
                &relay,
                w.tag_interval_ms,
                w.max_udp_payload,
                Some(Duration::from_secs_f64(seconds)),
            );
            let opts = AgentOptions {
                app_tag_every: w.app_tag_every(),
                ..opts
            };
            run_agent(opts, plans, w.seed, &relay).await
        }
        Command::Replay {
            log,
            relay,
            group,
            tag_interval_ms,
            max_udp_payload,
        } => {
            let log = std::fs::canonicalize(&log).with_context(|| format!("{}", log.display()))?;
            let summary = writelog::scan_log(&log)?;
            anyhow::ensure!(
                !summary.disks.is_empty(),
                "{} declares no disks",
                log.display()
            );
            if !summary.tags.is_empty() {
                eprintln!(
                    "{}: version {}, {} tags of its own: replayed where the log has them",
                    log.display(),
                    summary.version,
                    summary.tags.len()
                );
            }
            let plans = summary.plans(&log, &group);
            let log_tags = (!summary.tags.is_empty()).then_some(summary.tags);
            let mut opts = agent_options(None, &relay, tag_interval_ms, max_udp_payload, None);
            opts.log_tags = log_tags;
            run_agent(opts, plans, 0, &relay).await
        }
        Command::MakeLog {
            out,
            workload: w,
            records,
            tag_every,
            app_tag_every,
        } => {
            let profile = w.profile.profile();
            writelog::generate_log(
                &out,
                w.vms,
                w.disks,
                w.disk_size,
                profile,
                w.content,
                w.seed,
                records,
                writelog::GeneratedTags {
                    every: tag_every,
                    app_every: app_tag_every,
                },
            )
            .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {records} changes over {} disks to {}",
                w.vms * w.disks,
                out.display()
            );
            Ok(true)
        }
        Command::BenchResync {
            disk_size,
            differing,
            churn_mb,
            no_rsync,
            seed,
            json,
        } => {
            anyhow::ensure!(
                disk_size >= 1 << 20 && disk_size % 4096 == 0,
                "--disk-size must be a multiple of 4 KiB, at least 1 MiB"
            );
            anyhow::ensure!(
                differing.iter().all(|p| (0.0..=100.0).contains(p)),
                "--differing must be between 0 and 100 percent"
            );
            let opts = fbr_churn::resyncbench::ResyncBenchOptions {
                disk_size,
                differing_percent: differing,
                churn_mb,
                rsync: !no_rsync,
                seed,
                progress: true,
            };
            let result = fbr_churn::resyncbench::run(opts).await?;
            fbr_churn::resyncbench::print(&result);
            if json {
                println!("{}", serde_json::to_string(&result)?);
            }
            Ok(result.cases.iter().all(|c| c.verified))
        }
        Command::BenchRetention {
            seconds,
            disks,
            disk_size,
            rate_mb,
            dir,
            seed,
            json,
        } => {
            anyhow::ensure!(disks >= 1, "--disks must be at least 1");
            anyhow::ensure!(
                disk_size >= 1 << 20 && disk_size % 4096 == 0,
                "--disk-size must be a multiple of 4 KiB, at least 1 MiB"
            );
            anyhow::ensure!(
                seconds >= 5.0 && seconds.is_finite(),
                "--seconds must be at least 5"
            );
            anyhow::ensure!(rate_mb > 0.0, "--rate-mb must be positive");
            let r =
                fbr_churn::retentionbench::run(fbr_churn::retentionbench::RetentionBenchOptions {
                    disks,
                    disk_size,
                    seconds,
                    rate_mb,
                    dir,
                    seed,
                })
                .await?;
            fbr_churn::retentionbench::print(&r);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(r.verified)
        }
        Command::BenchWan {
            seconds,
            vms,
            disk_size,
            tag_interval,
            rate_mb,
            seed,
            no_rsync,
            link_mbit,
            only,
            fs_log,
            json,
        } => {
            anyhow::ensure!(vms >= 1, "--vms must be at least 1");
            anyhow::ensure!(!link_mbit.is_empty(), "--link-mbit needs a rate");
            anyhow::ensure!(
                disk_size >= 1 << 20 && disk_size % 4096 == 0,
                "--disk-size must be a multiple of 4 KiB, at least 1 MiB"
            );
            // One sweep per link rate: {"<rate>mbit": {model: figures, ...}, ...}.
            let mut result = serde_json::Map::new();
            let mut verified = true;
            for mbit in link_mbit {
                let opts = fbr_churn::wanbench::WanBenchOptions {
                    seconds: seconds.max(1.0),
                    vms,
                    disk_size,
                    tag_interval: Duration::from_secs_f64(tag_interval.max(0.1)),
                    seed,
                    rate_bytes_per_s: rate_mb.map(|r| (r * 1e6) as u64),
                    rsync: !no_rsync,
                    link_mbit: (mbit > 0).then_some(mbit),
                    only: only.clone(),
                    fs_log: fs_log.clone(),
                };
                eprintln!("bench-wan: link {mbit} Mbit/s");
                let sweep = fbr_churn::wanbench::run(opts, true).await?;
                verified &= sweep
                    .as_object()
                    .map(|m| {
                        m.values()
                            .all(|v| v.get("verified").is_none_or(|b| b == true))
                    })
                    .unwrap_or(false);
                result.insert(format!("{mbit}mbit"), sweep);
            }
            let result = serde_json::Value::Object(result);
            if json {
                println!("{}", serde_json::to_string(&result)?);
            }
            Ok(verified)
        }
        Command::BenchScale {
            streams,
            seconds,
            disk_size,
            rate_mb,
            tag_interval_ms,
            groups,
            seed,
            json,
        } => {
            anyhow::ensure!(
                streams.iter().all(|&s| s >= 1),
                "--streams must all be at least 1"
            );
            anyhow::ensure!(
                disk_size >= 1 << 20 && disk_size % 4096 == 0,
                "--disk-size must be a multiple of 4 KiB, at least 1 MiB"
            );
            let opts = fbr_churn::scalebench::ScaleBenchOptions {
                streams,
                seconds: seconds.max(1.0),
                disk_size,
                rate_mb,
                tag_interval: Duration::from_millis(tag_interval_ms.max(50)),
                groups: groups.max(1),
                seed,
            };
            let result = fbr_churn::scalebench::run(opts).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                eprintln!("{}", serde_json::to_string_pretty(&result)?);
            }
            Ok(result["verified"] == true)
        }
        Command::Soak {
            minutes,
            cycle_seconds,
            streams,
            rate_mb,
            json,
        } => {
            anyhow::ensure!(streams >= 1, "--streams must be at least 1");
            anyhow::ensure!(cycle_seconds >= 6, "--cycle-seconds must be at least 6");
            anyhow::ensure!(
                minutes * 60.0 >= 3.0 * cycle_seconds as f64,
                "--minutes must cover at least three cycles"
            );
            let opts = fbr_churn::soak::SoakOptions {
                duration: Duration::from_secs_f64(minutes * 60.0),
                cycle: Duration::from_secs(cycle_seconds),
                streams,
                rate_mb,
                progress: !json,
            };
            let report = fbr_churn::soak::run(&opts).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                eprintln!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(report.verified)
        }
        Command::BenchHostile {
            streams,
            seconds,
            rate_mb,
            json,
        } => {
            anyhow::ensure!(streams >= 1, "--streams must be at least 1");
            anyhow::ensure!(
                seconds >= 15.0,
                "--seconds must be at least 15 (the Hello deadline is 10 s)"
            );
            let result = fbr_churn::hostile::bench(streams, seconds, rate_mb, !json).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                eprintln!("{}", serde_json::to_string_pretty(&result)?);
            }
            Ok(result["verified"] == true)
        }
        Command::BenchWanEmulation {
            seconds,
            streams,
            only,
            congestion,
            json,
        } => {
            let mut cases = Vec::new();
            for c in &congestion {
                let c = match fbr_transport::Congestion::parse(c) {
                    Some(c) => c.name(),
                    None => anyhow::bail!("--congestion {c:?}: expected bbr or cubic"),
                };
                cases.extend(fbr_churn::wanemu::grid(seconds.max(3.0), streams.max(1), c));
            }
            let cases: Vec<_> = cases
                .into_iter()
                .filter(|c| only.is_empty() || only.iter().any(|o| c.name.contains(o.as_str())))
                .collect();
            let mut results = serde_json::Map::new();
            let mut verified = true;
            for case in &cases {
                eprintln!("bench-wan-emulation: {}", case.name);
                let r = fbr_churn::wanemu::run_case(case, true).await?;
                eprintln!(
                    "  {:.1} Mbit/s sent, {:.1} delivered{}; {} points verified: {}",
                    r.wire_mbit_per_s,
                    r.delivered_mbit_per_s,
                    r.link_fraction
                        .map_or(String::new(), |f| format!(" ({:.2} of the link)", f)),
                    r.recovery_points_verified,
                    r.verified
                );
                verified &= r.verified;
                results.insert(case.name.clone(), serde_json::to_value(&r)?);
            }
            if json {
                println!("{}", serde_json::to_string(&results)?);
            }
            Ok(verified)
        }
        Command::BenchThrottle {
            rate,
            streams,
            seconds,
            json,
        } => {
            let rate = match fbr_throttling::Rate::parse(&rate) {
                Ok(fbr_throttling::Rate::BytesPerSec(r)) => r,
                _ => anyhow::bail!("invalid --rate {rate:?}: expected a limit such as 200mbit"),
            };
            anyhow::ensure!(streams >= 2, "--streams must be at least 2");
            let b =
                drill::run_throttle_bench(rate, streams, Duration::from_secs_f64(seconds.max(1.0)))
                    .await?;
            eprintln!(
                "configured {:.1} MB/s: on the wire {:.1} MB/s ({:+.2}%), records applied {:.1} MB/s ({:+.2}%) over {:.1} s; Jain's index {:.4} over {} streams; {}",
                b.configured_bytes_per_s as f64 / 1e6,
                b.wire_bytes_per_s / 1e6,
                b.wire_error * 100.0,
                b.achieved_bytes_per_s / 1e6,
                b.error * 100.0,
                b.window_s,
                b.jain_index,
                b.streams,
                if b.verified { "every recovery point verified" } else { "VERIFICATION FAILED" }
            );
            for e in &b.errors {
                eprintln!("error: {e}");
            }
            if json {
                println!("{}", serde_json::to_string(&b)?);
            }
            Ok(b.verified)
        }
        Command::Verify {
            manifest,
            master_data,
            json,
        } => {
            let m: Manifest = serde_json::from_slice(
                &std::fs::read(&manifest)
                    .with_context(|| format!("reading {}", manifest.display()))?,
            )
            .with_context(|| format!("parsing {}", manifest.display()))?;
            let report = tokio::task::spawn_blocking(move || verify::verify(&m, &master_data))
                .await?
                .map_err(anyhow::Error::msg)?;
            for e in &report.errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{}: {} of {} complete recovery points byte-identical",
                if report.verified {
                    "VERIFIED"
                } else {
                    "FAILED"
                },
                report.recovery_points_verified,
                report.recovery_points_complete
            );
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(report.verified)
        }
    }
}

fn finish_drill(summary: DrillSummary, json: bool) -> anyhow::Result<bool> {
    drill::print_summary(&summary);
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(summary.verified)
}

fn agent_options(
    rate_mb: Option<f64>,
    relay: &RelayArgs,
    tag_interval_ms: u64,
    max_udp_payload: u16,
    duration: Option<Duration>,
) -> AgentOptions {
    AgentOptions {
        relay: relay.relay,
        relay_name: relay.relay_name.clone(),
        pki_dir: relay.pki_dir.clone(),
        cert_name: relay.cert_name.clone(),
        tuning: QuicTuning {
            max_udp_payload,
            ..QuicTuning::default()
        },
        tag_interval: Duration::from_millis(tag_interval_ms.max(1)),
        app_tag_every: 5,
        log_tags: None,
        duration,
        drain_timeout: Duration::from_secs(120),
        reconnect_timeout: Duration::from_secs(120),
        rate_bytes_per_s: rate_mb.map(|r| (r * 1e6) as u64),
        routes: Default::default(),
    }
}

async fn run_agent(
    opts: AgentOptions,
    plans: Vec<DiskPlan>,
    seed: u64,
    relay: &RelayArgs,
) -> anyhow::Result<bool> {
    let manifest_path = &relay.manifest;
    let handle = agent::start(opts, plans, seed).map_err(anyhow::Error::msg)?;
    // With a configuration server: moves between relays, as an operator asks them.
    let follower = match relay.config_server {
        Some(addr) => {
            let client = fbr_enroll::heartbeat::HeartbeatClient::new(
                addr,
                &relay.config_server_name,
                &relay.pki_dir,
                &relay.cert_name,
            )
            .map_err(anyhow::Error::msg)?;
            Some(tokio::spawn(fbr_churn::moves::follow_assignments(
                handle.mover(),
                client,
                Duration::from_secs(2),
                Duration::from_secs(30),
            )))
        }
        None => None,
    };
    let stats = handle.stats.clone();
    let report = handle.finish().await.map_err(anyhow::Error::msg);
    if let Some(f) = follower {
        f.abort();
    }
    let report = report?;
    std::fs::write(manifest_path, serde_json::to_vec_pretty(&report.manifest)?)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    let (p50, p99, max) = stats.lag_ms();
    let bytes = stats
        .logical_bytes_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "acknowledged {:.1} MB in {:.1} s; lag p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms; manifest {}",
        bytes as f64 / 1e6,
        report.elapsed.as_secs_f64(),
        manifest_path.display()
    );
    for f in &report.failures {
        eprintln!("error: {f}");
    }
    Ok(report.failures.is_empty())
}
