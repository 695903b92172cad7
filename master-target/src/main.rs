//! `master-target`: the on-premises receiver daemon and its offline tools.
//!
//! Thin: parses flags, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_master_target::{journal, replica, MasterTarget, Store};
use fbr_protocol::StreamId;
use fbr_transport::{daemon, server_endpoint, Credentials, QuicTuning};

/// Exit code for bad configuration or usage (EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "master-target",
    version,
    about = "Failback master target: applies replicated disk writes on-premises"
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
    /// Run the receiver.
    Run(RunArgs),
    /// List the recovery points held in a data directory (the daemon must be stopped).
    Points {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the image of one disk at one recovery point to a file (daemon stopped).
    Materialize {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        group: String,
        #[arg(long)]
        tag: u64,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// UDP address to listen on for relays.
    #[arg(long, default_value = "0.0.0.0:9444")]
    listen: SocketAddr,
    /// Data directory: images, journals, index.
    #[arg(long)]
    data: PathBuf,
    /// Directory holding ca.pem and this daemon's certificate and key.
    #[arg(long)]
    pki_dir: PathBuf,
    /// File stem of this daemon's certificate in --pki-dir.
    #[arg(long, default_value = "master-target")]
    cert_name: String,
    /// Write the bound address here once listening (for scripts and tests).
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Bytes of records each stream may have unacknowledged, in MiB. Must cover the
    /// bandwidth-delay product of one stream (16 MiB: 1 Gbit/s at 80 ms, with margin);
    /// more only adds queueing delay (lag) without adding throughput.
    #[arg(long, default_value_t = 16)]
    credit_mib: u64,
    /// Largest UDP payload MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::init_logging(cli.log_json, "info");
    match cli.command {
        Command::Run(args) => {
            if args.credit_mib == 0 {
                eprintln!("master-target: invalid --credit-mib: must be at least 1");
                return ExitCode::from(EX_USAGE);
            }
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("master-target: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("master-target: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Points { data, json } => report(points(&data, json)),
        Command::Materialize {
            data,
            group,
            tag,
            vm,
            disk,
            out,
        } => report(materialize(
            &data,
            &group,
            tag,
            &StreamId { vm, disk },
            &out,
        )),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("master-target: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let store = Store::open(&args.data)?;
    let creds = Credentials::load(&args.pki_dir, &args.cert_name)?;
    let tuning = QuicTuning {
        max_udp_payload: args.max_udp_payload,
        ..QuicTuning::default()
    };
    let endpoint = server_endpoint(args.listen, creds, &tuning)?;
    let local = endpoint.local_addr()?;
    if let Some(pf) = &args.port_file {
        daemon::write_port_file(pf, local).with_context(|| format!("writing {}", pf.display()))?;
    }
    tracing::info!(listen = %local, data = %args.data.display(), "master target listening");
    let mt = MasterTarget::new(args.data.clone(), store, args.credit_mib << 20);
    let server = tokio::spawn(mt.clone().serve(endpoint.clone()));
    daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    endpoint.close(quinn::VarInt::from_u32(0), b"master target shutting down");
    server.abort();
    let c = &mt.counters;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        records = c.records_applied.load(Relaxed),
        bytes = c.logical_bytes_applied.load(Relaxed),
        duplicates_skipped = c.duplicates_skipped.load(Relaxed),
        batches = c.batches.load(Relaxed),
        "final counters"
    );
    Ok(())
}

fn points(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let store = Store::open(data)?;
    let points = store.recovery_points()?;
    if json {
        println!("{}", serde_json::to_string(&points)?);
    } else {
        println!(
            "{:<16} {:>8} {:<6} {:>8} STATE",
            "GROUP", "TAG", "KIND", "DISKS"
        );
        for p in &points {
            println!(
                "{:<16} {:>8} {:<6} {:>3}/{:<4} {}",
                p.group,
                p.tag_id,
                p.kind,
                p.landed.len(),
                p.members,
                if p.complete { "complete" } else { "incomplete" }
            );
        }
    }
    Ok(())
}

fn materialize(
    data: &std::path::Path,
    group: &str,
    tag: u64,
    id: &StreamId,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let store = Store::open(data)?;
    let point = store
        .recovery_points()?
        .into_iter()
        .find(|p| p.group == group && p.tag_id == tag)
        .with_context(|| format!("no recovery point {tag} in group {group}"))?;
    anyhow::ensure!(
        point.complete,
        "recovery point {tag} of group {group} is incomplete"
    );
    let landed = point
        .landed
        .iter()
        .find(|l| l.vm == id.vm && l.disk == id.disk)
        .with_context(|| format!("disk {id} is not a member of recovery point {tag}"))?;
    let (_, ckpt) = store
        .disks()?
        .into_iter()
        .find(|(d, _)| d == id)
        .with_context(|| format!("unknown disk {id}"))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    file.set_len(ckpt.disk_size)?;
    let mut sink = replica::FileImage(&file);
    journal::replay(&replica::journal_path(data, id), landed.seq, &mut sink)
        .map_err(anyhow::Error::msg)?;
    file.sync_all()?;
    println!(
        "wrote {} at recovery point {group}/{tag} to {}",
        id,
        out.display()
    );
    Ok(())
}
