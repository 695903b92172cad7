//! `relay`: the failback process server daemon, and the site PKI tool.
//!
//! Thin: parses flags, sets up logging, and calls the library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_cache::CacheConfig;
use fbr_relay::cache::RelayCache;
use fbr_relay::egress::{Egress, EgressConfig};
use fbr_relay::{Relay, RelayConfig};
use fbr_throttling::WeeklySchedule;
use fbr_transport::daemon;
use fbr_transport::pki::{self, IssueRequest};
use fbr_transport::{
    any_addr_for, client_endpoint, server_endpoint, Credentials, PeerLink, QuicTuning, Role,
};

/// Exit code for bad configuration or usage (EX_USAGE).
const EX_USAGE: u8 = 64;

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
    /// Manage the site's certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
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
        /// agent, relay or master-target.
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

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// UDP address to listen on for agents.
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// UDP address of the master target.
    #[arg(long)]
    master_target: SocketAddr,
    /// DNS name in the master target's certificate.
    #[arg(long, default_value = "master-target")]
    master_target_name: String,
    /// Directory holding ca.pem and this relay's certificate and key.
    #[arg(long)]
    pki_dir: PathBuf,
    /// File stem of this relay's certificate in --pki-dir.
    #[arg(long, default_value = "relay")]
    cert_name: String,
    /// Write the bound address here once listening (for scripts and tests).
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Directory of the durable cache (a dedicated disk in production).
    #[arg(long)]
    cache_dir: PathBuf,
    /// Most bytes the cache may use (e.g. 200GiB). Beyond it, sources are held back.
    #[arg(long, default_value = "8GiB", value_parser = daemon::parse_size)]
    cache_capacity: u64,
    /// Size at which a cache segment is sealed, in MiB (1-1024).
    #[arg(long, default_value_t = 64)]
    cache_segment_mib: u64,
    /// Bytes each agent stream may have unacknowledged, in MiB.
    #[arg(long, default_value_t = 16)]
    credit_mib: u64,
    /// Egress rate by time of week, e.g. "mon-fri 09:00-18:00 100mbit; other unlimited"
    /// (see docs/OPERATIONS.md).
    #[arg(long, default_value = "other unlimited")]
    egress_schedule: String,
    /// Read the egress schedule from this file instead, and re-read it when it changes
    /// (the limit changes without a restart).
    #[arg(long)]
    egress_schedule_file: Option<PathBuf>,
    /// Offset of the schedule's clock from UTC, in minutes (e.g. 60 for CET).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    schedule_utc_offset_minutes: i32,
    /// Priority of a VM's streams on the WAN leg, `VM=WEIGHT` (repeat; default 1).
    #[arg(long = "vm-weight")]
    vm_weights: Vec<String>,
    /// Largest UDP payload MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::init_logging(cli.log_json, "info");
    match cli.command {
        Command::Run(args) => {
            if let Some(msg) = invalid_run_args(&args) {
                eprintln!("relay: {msg}");
                return ExitCode::from(EX_USAGE);
            }
            let Some(rt) = runtime() else {
                return ExitCode::FAILURE;
            };
            report(rt.block_on(run(args)))
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
                eprintln!("relay: invalid --role {role:?}: expected agent, relay or master-target");
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

/// Checks values clap cannot; `Some(message naming the flag)` means exit 64.
/// The egress settings from the flags; `Err` names the flag at fault.
fn egress_config(args: &RunArgs) -> Result<EgressConfig, String> {
    let spec = match &args.egress_schedule_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("invalid --egress-schedule-file {}: {e}", path.display()))?,
        None => args.egress_schedule.clone(),
    };
    let schedule = WeeklySchedule::parse(spec.trim())
        .map_err(|e| format!("invalid --egress-schedule: {e}"))?;
    let mut vm_weights = std::collections::HashMap::new();
    for w in &args.vm_weights {
        let parsed = w.split_once('=').and_then(|(vm, n)| {
            Some((
                vm.to_string(),
                n.parse::<u32>().ok().filter(|n| (1..=1000).contains(n))?,
            ))
        });
        let (vm, n) = parsed.ok_or_else(|| {
            format!("invalid --vm-weight {w:?}: expected VM=WEIGHT with WEIGHT in 1..=1000")
        })?;
        vm_weights.insert(vm, n);
    }
    if args.schedule_utc_offset_minutes.abs() > 14 * 60 {
        return Err(format!(
            "invalid --schedule-utc-offset-minutes {}: must be within ±840",
            args.schedule_utc_offset_minutes
        ));
    }
    Ok(EgressConfig {
        schedule,
        schedule_file: args.egress_schedule_file.clone(),
        utc_offset_minutes: args.schedule_utc_offset_minutes,
        vm_weights,
    })
}

fn invalid_run_args(args: &RunArgs) -> Option<String> {
    if let Err(msg) = egress_config(args) {
        return Some(msg);
    }
    if args.cache_segment_mib == 0 || args.cache_segment_mib > 1024 {
        return Some(format!(
            "invalid --cache-segment-mib {}: must be 1..=1024",
            args.cache_segment_mib
        ));
    }
    if args.cache_capacity < 2 * (args.cache_segment_mib << 20) {
        return Some(format!(
            "invalid --cache-capacity {}: must hold at least two segments ({} bytes)",
            args.cache_capacity,
            2 * (args.cache_segment_mib << 20)
        ));
    }
    if args.credit_mib == 0 || args.credit_mib > 4096 {
        return Some(format!(
            "invalid --credit-mib {}: must be 1..=4096",
            args.credit_mib
        ));
    }
    None
}

/// The async runtime, or `None` after saying why it could not start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("relay: cannot start runtime: {e}"))
        .ok()
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let tuning = QuicTuning {
        max_udp_payload: args.max_udp_payload,
        ..QuicTuning::default()
    };
    let cache_config = CacheConfig {
        segment_bytes: (args.cache_segment_mib << 20).max(64 << 10),
        capacity_bytes: args.cache_capacity,
    };
    let (cache, report) = RelayCache::open(&args.cache_dir, cache_config)?;
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
    let server_creds = Credentials::load(&args.pki_dir, &args.cert_name)?;
    let client_creds = Credentials::load(&args.pki_dir, &args.cert_name)?;
    let agents = server_endpoint(args.listen, server_creds, &tuning)?;
    let upstream_endpoint =
        client_endpoint(any_addr_for(args.master_target), client_creds, &tuning)?;
    let link = PeerLink::new(
        upstream_endpoint.clone(),
        args.master_target,
        args.master_target_name.clone(),
        Role::MasterTarget,
    );
    // Connect eagerly so a wrong address or certificate shows up in the log at start;
    // a master target that is down is not fatal (streams get UpstreamUnavailable).
    if let Err(e) = link.connection().await {
        tracing::warn!("master target not reachable yet: {e}");
    }
    let local = agents.local_addr()?;
    if let Some(pf) = &args.port_file {
        daemon::write_port_file(pf, local).with_context(|| format!("writing {}", pf.display()))?;
    }
    tracing::info!(listen = %local, master_target = %args.master_target, "relay listening");
    let egress = Egress::start(egress_config(&args).map_err(anyhow::Error::msg)?);
    let relay = Relay::new(
        RelayConfig {
            agent_credit_bytes: args.credit_mib << 20,
        },
        link,
        cache.clone(),
        egress,
    );
    let server = tokio::spawn(relay.clone().serve(agents.clone()));
    daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    agents.close(0u32.into(), b"relay shutting down");
    upstream_endpoint.close(0u32.into(), b"relay shutting down");
    server.abort();
    cache.shutdown();
    use std::sync::atomic::Ordering::Relaxed;
    let c = &relay.counters;
    tracing::info!(
        records = c.records_ingested.load(Relaxed),
        bytes = c.logical_bytes_ingested.load(Relaxed),
        duplicates_skipped = c.duplicates_skipped.load(Relaxed),
        "final counters"
    );
    Ok(())
}
