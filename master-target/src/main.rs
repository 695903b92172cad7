//! `master-target`: the on-premises receiver daemon and its offline tools.
//!
//! Thin: parses flags, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_master_target::settings::{self, MasterTargetSettings};
use fbr_master_target::{journal, replica, MasterTarget, Store};
use fbr_protocol::StreamId;
use fbr_transport::settings::{ConfigError, Layers, EX_USAGE};
use fbr_transport::{daemon, server_endpoint, Credentials, QuicTuning};

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
    /// Validate the configuration (file, environment and flags) without starting, and
    /// print the effective settings. Exit status 64 names the key at fault.
    CheckConfig(RunArgs),
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

/// Flags of `master-target run` and `check-config`. Each overrides one config key
/// (named in brackets); the rest come from the config file, `MASTER_TARGET_*` variables
/// and defaults (docs/CONFIGURATION.md).
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Config file (TOML). Default: /etc/master-target/master-target.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on for relays [listen].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory: images, journals, index [data_dir].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory holding ca.pem and this daemon's certificate and key [pki_dir].
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// File stem of this daemon's certificate in the PKI directory [cert_name].
    #[arg(long)]
    cert_name: Option<String>,
    /// Write the bound address here once listening [port_file].
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// TCP address of /metrics, /healthz and /readyz; "" disables [metrics_listen].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Write the metrics endpoint's bound address here [metrics_port_file].
    #[arg(long)]
    metrics_port_file: Option<PathBuf>,
    /// Bytes of records each stream may have unacknowledged, in MiB [credit].
    #[arg(long)]
    credit_mib: Option<u64>,
    /// Largest UDP payload MTU discovery may use [max_udp_payload].
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// Most blocks in the dedup content index; 0 disables it [content_index_entries].
    #[arg(long)]
    content_index_entries: Option<u64>,
}

impl RunArgs {
    fn overrides(&self) -> Vec<(String, config::Value)> {
        let mut o: Vec<(String, config::Value)> = Vec::new();
        let path = |p: &PathBuf| config::Value::from(p.display().to_string());
        if let Some(v) = self.listen {
            o.push(("listen".into(), v.to_string().into()));
        }
        if let Some(v) = &self.data {
            o.push(("data_dir".into(), path(v)));
        }
        if let Some(v) = &self.pki_dir {
            o.push(("pki_dir".into(), path(v)));
        }
        if let Some(v) = &self.cert_name {
            o.push(("cert_name".into(), v.clone().into()));
        }
        if let Some(v) = &self.port_file {
            o.push(("port_file".into(), path(v)));
        }
        if let Some(v) = &self.metrics_listen {
            o.push(("metrics_listen".into(), v.clone().into()));
        }
        if let Some(v) = &self.metrics_port_file {
            o.push(("metrics_port_file".into(), path(v)));
        }
        if let Some(v) = self.credit_mib {
            o.push(("credit".into(), format!("{v}MiB").into()));
        }
        if let Some(v) = self.max_udp_payload {
            o.push(("max_udp_payload".into(), i64::from(v).into()));
        }
        if let Some(v) = self.content_index_entries {
            o.push(("content_index_entries".into(), (v as i64).into()));
        }
        o
    }

    /// The effective, validated settings.
    fn settings(&self) -> Result<MasterTargetSettings, ConfigError> {
        let s = fbr_transport::settings::load(
            &MasterTargetSettings::default(),
            Layers {
                explicit_file: self.config.as_deref(),
                default_file: Path::new(settings::DEFAULT_CONFIG_FILE),
                env_prefix: settings::ENV_PREFIX,
                free_form: &[],
                overrides: self.overrides(),
            },
        )?;
        s.validate()?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        daemon::init_logging(cli.log_json, "info");
    }
    match cli.command {
        Command::Run(args) => {
            let settings = match args.settings() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("master-target: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            daemon::init_logging(cli.log_json || settings.log_json, "info");
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("master-target: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            report(rt.block_on(run(settings)))
        }
        Command::CheckConfig(args) => {
            fbr_transport::settings::report_check("master-target", args.settings())
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

async fn run(settings: MasterTargetSettings) -> anyhow::Result<()> {
    let data = &settings.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let store = Store::open(data)?;
    let creds = Credentials::load(&settings.pki_dir, &settings.cert_name)?;
    let tuning = QuicTuning {
        max_udp_payload: settings.max_udp_payload,
        ..QuicTuning::default()
    };
    let endpoint = server_endpoint(settings.listen, creds, &tuning)?;
    let local = endpoint.local_addr()?;
    let mt = MasterTarget::new(
        data.clone(),
        store,
        settings.credit.0,
        settings.content_index_entries as usize,
    );
    let metrics = match settings.metrics_addr()? {
        Some(addr) => Some(
            fbr_metrics::start(
                addr,
                settings.metrics_port_file.as_deref(),
                Arc::new(Endpoints(mt.clone())),
            )
            .await
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    if let Some(pf) = &settings.port_file {
        daemon::write_port_file(pf, local).with_context(|| format!("writing {}", pf.display()))?;
    }
    tracing::info!(listen = %local, data = %data.display(), "master target listening");
    let server = tokio::spawn(mt.clone().serve(endpoint.clone()));
    daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    endpoint.close(quinn::VarInt::from_u32(0), b"master target shutting down");
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let m = &mt.metrics;
    tracing::info!(
        records = m.records_applied_total.get(),
        bytes = m.logical_bytes_applied_total.get(),
        duplicates_skipped = m.duplicates_skipped_total.get(),
        batches = m.batches_applied_total.get(),
        "final counters"
    );
    Ok(())
}

/// The master target's `/metrics`, `/healthz` and `/readyz`. It is ready once it
/// listens: its store opened and its certificate loaded, or it would have exited.
struct Endpoints(Arc<MasterTarget>);

impl fbr_metrics::Endpoints for Endpoints {
    fn metrics_text(&self) -> Result<String, String> {
        let m = &self.0.metrics;
        m.content_index_blocks.set(self.0.content.len() as i64);
        fbr_metrics::encode(&m.registry)
    }
    fn liveness(&self) -> fbr_metrics::Probe {
        fbr_metrics::Probe {
            ok: true,
            body: "alive\n".into(),
        }
    }
    fn readiness(&self) -> fbr_metrics::Probe {
        fbr_metrics::Probe {
            ok: true,
            body: format!(
                "ready: {} relay streams open\n",
                self.0.metrics.relay_streams.get()
            ),
        }
    }
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
