//! `master-target`: the on-premises receiver daemon and its offline tools.
//!
//! Thin: parses flags, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_daemon::settings::{flag_overrides, load_settings, mib_flag};
use fbr_daemon::ConfigError;
use fbr_master_target::files::{self, DataDir};
use fbr_master_target::settings::{MasterTargetSettings, DEFAULT_CONTROL_SOCKET};
use fbr_master_target::{journal, replica, MasterTarget, Store};
use fbr_protocol::StreamId;
use fbr_transport::{server_endpoint, Credentials, QuicTuning};

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
    /// Enroll with the site's configuration server using its passphrase: writes this
    /// master target's key (kept if it exists), certificate and the site CA into the
    /// PKI directory. `--advertise` is the address relays are given.
    Register(fbr_enroll::cli::RegisterArgs),
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
    /// Adopt an existing disk image as the replica of a disk (the original location of a
    /// reprotect; daemon stopped). The replica is stale, with no recovery point, until a
    /// delta resync has made it equal to its source and the next tag arrives.
    SeedDisk {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: u32,
        /// The disk image to adopt (its size is the disk's size).
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Roll every disk of a replication group back in place to one of its recovery
    /// points (daemon stopped): the failover to an older point. Costs time in proportion
    /// to what changed since the point; the points after it are gone. Crash-safe: an
    /// interrupted rollback completes at the next start or command.
    Rollback {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        group: String,
        /// The recovery point's tag id (`master-target points`).
        #[arg(long)]
        tag: u64,
        #[arg(long)]
        json: bool,
    },
    /// Test failovers: writable copies of a group's disks at a recovery point, made by
    /// the running master target while replication goes on.
    #[command(subcommand)]
    TestFailover(TestFailoverCommand),
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

#[derive(Subcommand, Debug)]
enum TestFailoverCommand {
    /// Copy every disk of `--group` at recovery point `--tag` into
    /// <data>/test-failovers/<name>/ (reflink clones where the file system can).
    Create {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        #[arg(long)]
        group: String,
        #[arg(long)]
        tag: u64,
        /// Letters, digits, '-' and '_'.
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The test failovers there are.
    List {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete a test failover's copies.
    Delete {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Flags of `master-target run` and `check-config`. Each overrides the config key its
/// serde name gives (shown in brackets); the rest come from the config file,
/// `MASTER_TARGET_*` variables and defaults (docs/CONFIGURATION.md).
#[derive(clap::Args, Debug, serde::Serialize)]
struct RunArgs {
    /// Config file (TOML). Default: /etc/master-target/master-target.toml if it exists.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// UDP address to listen on for relays [listen].
    #[arg(long)]
    #[serde(rename = "listen")]
    listen: Option<SocketAddr>,
    /// Data directory: images, journals, index [data_dir].
    #[arg(long)]
    #[serde(rename = "data_dir")]
    data: Option<PathBuf>,
    /// Directory holding ca.pem and this daemon's certificate and key [pki_dir].
    #[arg(long)]
    #[serde(rename = "pki_dir")]
    pki_dir: Option<PathBuf>,
    /// File stem of this daemon's certificate in the PKI directory [cert_name].
    #[arg(long)]
    #[serde(rename = "cert_name")]
    cert_name: Option<String>,
    /// Write the bound address here once listening [port_file].
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
    /// Bytes of records each stream may have unacknowledged, in MiB [credit].
    #[arg(long)]
    #[serde(rename = "credit", serialize_with = "mib_flag")]
    credit_mib: Option<u64>,
    /// Largest UDP payload MTU discovery may use [max_udp_payload].
    #[arg(long)]
    #[serde(rename = "max_udp_payload")]
    max_udp_payload: Option<u16>,
    /// Most blocks in the dedup content index; 0 disables it [content_index_entries].
    #[arg(long)]
    #[serde(rename = "content_index_entries")]
    content_index_entries: Option<u64>,
    /// Memory for all streams' zstd contexts, in MiB; 0: no zstd [codec_memory].
    #[arg(long)]
    #[serde(rename = "codec_memory", serialize_with = "mib_flag")]
    codec_memory_mib: Option<u64>,
    /// Unix socket for operator requests (`test-failover`); "" disables [control_socket].
    #[arg(long)]
    #[serde(rename = "control_socket")]
    control_socket: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    config_server: fbr_enroll::cli::ConfigServerFlags,
    /// How far back recovery points are kept per group, e.g. 24h [retention_window].
    #[arg(long)]
    #[serde(rename = "retention_window")]
    retention_window: Option<String>,
    /// Journal bytes kept per group, e.g. 500GiB; 0: no cap [retention_max].
    #[arg(long)]
    #[serde(rename = "retention_max")]
    retention_max: Option<String>,
}

impl RunArgs {
    /// The effective, validated settings: the flags are the last layer.
    fn settings(&self) -> Result<MasterTargetSettings, ConfigError> {
        load_settings(self.config.as_deref(), flag_overrides(self)?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        fbr_daemon::init_logging(cli.log_json, "info");
    }
    match cli.command {
        Command::Run(args) => fbr_daemon::run_daemon(
            "master-target",
            args.settings(),
            cli.log_json,
            |s| s.log_json,
            run,
        ),
        Command::CheckConfig(args) => fbr_daemon::report_check("master-target", args.settings()),
        Command::Register(args) => fbr_enroll::cli::run(
            "master-target",
            args,
            fbr_transport::Role::MasterTarget,
            "/etc/master-target/pki",
            "master-target",
        ),
        Command::Points { data, json } => report(points(&data, json)),
        Command::SeedDisk {
            data,
            vm,
            disk,
            image,
            json,
        } => report(seed_disk(&data, &StreamId { vm, disk }, &image, json)),
        Command::Rollback {
            data,
            group,
            tag,
            json,
        } => report(rollback(&data, &group, tag, json)),
        Command::TestFailover(cmd) => test_failover(cmd),
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
    fbr_daemon::report("master-target", r)
}

async fn run(settings: MasterTargetSettings) -> anyhow::Result<()> {
    let data = &settings.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let store = Store::open(data)?;
    // A rollback a crash interrupted is finished before any relay is served.
    for id in fbr_master_target::rollback::complete_pending(data, &store)? {
        tracing::warn!(disk = %id, "completed an interrupted rollback");
    }
    let creds = Credentials::load(&settings.pki_dir, &settings.cert_name)?;
    let tuning = QuicTuning {
        max_udp_payload: settings.max_udp_payload,
        ..QuicTuning::default()
    };
    let endpoint = server_endpoint(settings.listen, creds, &tuning)?;
    let local = endpoint.local_addr()?;
    let retention = settings.retention()?.with_chosen(store.chosen_retention()?);
    let mt = MasterTarget::new(
        DataDir::new(data),
        store,
        fbr_master_target::accept::CreditBudget {
            memory: settings.memory.0,
            per_stream: settings.credit.0,
        },
        settings.content_index_entries as usize,
        settings.codec_memory.0,
        fbr_daemon::placements::PlacementStore::open(data)?,
        retention,
    );
    let metrics_gate = fbr_metrics::http::gate();
    fbr_metrics::HttpConnections::register(
        &mt.metrics.registry,
        "fbr_master_target",
        vec![("metrics", metrics_gate.stats())],
    );
    let endpoints: Arc<dyn fbr_metrics::Endpoints> = Arc::new(Endpoints(mt.clone()));
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
    if let Some(pf) = &settings.port_file {
        fbr_daemon::write_port_file(pf, local)
            .with_context(|| format!("writing {}", pf.display()))?;
    }
    let control = match settings.control_socket.as_str() {
        "" => None,
        path => Some(
            fbr_master_target::control::serve(std::path::Path::new(path), mt.clone())
                .with_context(|| format!("control_socket {path}"))?,
        ),
    };
    let trimmer = tokio::spawn(trim_forever(mt.clone()));
    let heartbeats = {
        let (m, every) = (mt.clone(), settings.config_server.heartbeat_interval_s);
        let advertise = settings.config_server.advertised(local);
        fbr_enroll::heartbeat::start(
            &settings.config_server,
            &settings.pki_dir,
            &settings.cert_name,
            move || heartbeat(&m, every, advertise.clone()),
        )
        .map_err(anyhow::Error::msg)?
        .map(|(task, _)| task)
    };
    tracing::info!(listen = %local, data = %data.display(), "master target listening");
    let server = tokio::spawn(mt.clone().serve(endpoint.clone()));
    let notify = fbr_metrics::spawn_systemd_readiness(endpoints)
        .context("NOTIFY_SOCKET (systemd notification)")?;
    fbr_daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    notify.abort();
    let _ = fbr_daemon::systemd::Notifier::from_env().and_then(|n| n.notify("STOPPING=1"));
    // Relays hear at once that the master target stopped (and report it).
    fbr_transport::quic::close_gracefully(&endpoint, b"master target shutting down").await;
    server.abort();
    trimmer.abort();
    if let Some(h) = heartbeats {
        h.abort();
    }
    // The sessions end with their connections: checkpoint what they hand back, so the
    // next start replays nothing.
    let checkpointed = mt.checkpoint_all(std::time::Duration::from_secs(5)).await;
    tracing::info!(disks = checkpointed, "checkpointed at stop");
    if let Some(c) = control {
        c.abort();
        let _ = std::fs::remove_file(&settings.control_socket);
    }
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
        m.codec_memory_bytes
            .set(self.0.codec_memory.reserved().min(i64::MAX as u64) as i64);
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

/// The heartbeat the master target sends its configuration server: its disks (size,
/// group, sync state) and groups (recovery points, the newest one's time).
fn heartbeat(
    mt: &MasterTarget,
    interval_s: u64,
    advertise: Option<String>,
) -> fbr_enroll::wire::Heartbeat {
    let (disks, groups) = held(mt);
    fbr_enroll::wire::Heartbeat {
        version: fbr_enroll::wire::API_VERSION,
        software_version: env!("CARGO_PKG_VERSION").into(),
        interval_s,
        // The master target's readiness has no conditions beyond serving (which this
        // heartbeat shows); its disks and groups follow.
        health: fbr_enroll::wire::HealthSummary {
            state: "healthy".into(),
            reasons: vec![],
        },
        cache: None,
        streams: vec![],
        ingest_bytes_per_s: None,
        disks,
        groups,
        advertise,
    }
}

/// The disks and groups the master target's index holds, for its heartbeat (empty,
/// with a warning, when the index cannot be read).
fn held(
    mt: &MasterTarget,
) -> (
    Vec<fbr_enroll::wire::DiskReport>,
    Vec<fbr_enroll::wire::GroupReport>,
) {
    use std::collections::BTreeMap;
    let (disks, points) = match (mt.store.disks(), mt.store.recovery_points()) {
        (Ok(d), Ok(p)) => (d, p),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("heartbeat: reading the index: {e}");
            return (vec![], vec![]);
        }
    };
    // The group of each disk's newest point; each group's complete points.
    let mut group_of: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut groups: BTreeMap<String, fbr_enroll::wire::GroupReport> = BTreeMap::new();
    for p in &points {
        for l in &p.landed {
            group_of.insert((l.vm.clone(), l.disk), p.group.clone());
        }
        let g = groups
            .entry(p.group.clone())
            .or_insert_with(|| fbr_enroll::wire::GroupReport {
                group: p.group.clone(),
                recovery_points: 0,
                newest_point_ms: None,
            });
        if p.complete {
            g.recovery_points += 1;
            g.newest_point_ms = g.newest_point_ms.max(p.time_ms);
        }
    }
    let disks = disks
        .into_iter()
        .map(|(id, c)| fbr_enroll::wire::DiskReport {
            group: group_of.get(&(id.vm.clone(), id.disk)).cloned(),
            vm: id.vm,
            disk: id.disk,
            size_bytes: c.disk_size,
            sync: match c.sync {
                fbr_master_target::sync::SyncState::Consistent => "consistent",
                fbr_master_target::sync::SyncState::Stale => "stale",
                fbr_master_target::sync::SyncState::Resyncing(_) => "resyncing",
                fbr_master_target::sync::SyncState::Resynced => "resynced",
            }
            .into(),
        })
        .collect();
    (disks, groups.into_values().collect())
}

/// Trims every group to its retention (as in force at each pass: operators may choose a
/// group's at reprotect), a few times a window, off the async threads.
async fn trim_forever(mt: Arc<MasterTarget>) {
    // First, free what a kill between a trim's two steps may have left allocated.
    let punched = {
        let mt = mt.clone();
        tokio::task::spawn_blocking(move || {
            fbr_master_target::retention::punch_recorded(mt.files.root(), &mt.store)
        })
        .await
    };
    match punched {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("freeing trimmed journal blocks: {e}"),
        Err(e) => tracing::error!("trim task: {e}"),
    }
    loop {
        let retention = mt.retention();
        tokio::time::sleep(retention.trim_interval()).await;
        let mt = mt.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let now = replica::unix_ms(std::time::SystemTime::now());
            fbr_master_target::retention::trim_pass(mt.files.root(), &mt.store, &retention, now)
        })
        .await;
        match pass {
            Ok(Ok(p)) if p.disks_trimmed > 0 => {
                tracing::info!(
                    disks = p.disks_trimmed,
                    tags = p.tags_dropped,
                    bytes = p.bytes_punched,
                    "trimmed to the retention window"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("trimming: {e}"),
            Err(e) => tracing::error!("trim task: {e}"),
        }
    }
}

fn points(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let store = Store::open(data)?;
    fbr_master_target::rollback::complete_pending(data, &store)?;
    let listing = fbr_master_target::points::PointsListing::new(store.recovery_points()?);
    if json {
        println!("{}", serde_json::to_string(&listing)?);
        return Ok(());
    }
    for g in &listing.groups {
        println!(
            "group {}: {} points, {} recovery points from {} to {}",
            g.group,
            g.points.len(),
            g.window.recovery_points,
            g.window.oldest_time.as_deref().unwrap_or("-"),
            g.window.newest_time.as_deref().unwrap_or("-"),
        );
        println!(
            "  {:>8} {:<6} {:<24} {:>9} STATE",
            "TAG", "KIND", "TIME (UTC)", "DISKS"
        );
        for p in &g.points {
            println!(
                "  {:>8} {:<6} {:<24} {:>4}/{:<4} {}",
                p.tag_id,
                p.kind,
                p.time.as_deref().unwrap_or("-"),
                p.landed.len(),
                p.members,
                if p.complete {
                    "complete"
                } else if !p.consistent {
                    "inconsistent (landed while a disk was stale or resyncing)"
                } else {
                    "incomplete (not on every disk of the group yet)"
                }
            );
        }
    }
    Ok(())
}

fn seed_disk(
    data: &std::path::Path,
    id: &StreamId,
    image: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let seeded = fbr_master_target::seed::seed_disk(data, id, image)?;
    if json {
        println!("{}", serde_json::to_string(&seeded)?);
    } else {
        println!(
            "seeded {id} from {} ({} bytes, {} copied); stale until a delta resync completes",
            image.display(),
            seeded.disk_size,
            seeded.copied_bytes
        );
    }
    Ok(())
}

/// Sends one test-failover request to the running master target and prints its answer.
fn test_failover(cmd: TestFailoverCommand) -> ExitCode {
    use fbr_master_target::control::{Request, Response};
    let (socket, request, json) = match cmd {
        TestFailoverCommand::Create {
            control_socket,
            group,
            tag,
            name,
            json,
        } => (
            control_socket,
            Request::TestFailoverCreate {
                group,
                tag,
                name,
                vm: None,
            },
            json,
        ),
        TestFailoverCommand::List {
            control_socket,
            json,
        } => (control_socket, Request::TestFailoverList, json),
        TestFailoverCommand::Delete {
            control_socket,
            name,
            json,
        } => (control_socket, Request::TestFailoverDelete { name }, json),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("master-target: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    report(rt.block_on(async {
        let answer: Response = fbr_daemon::control::request(&socket, "master target", &request)
            .await
            .map_err(anyhow::Error::msg)?;
        if json {
            println!("{}", serde_json::to_string(&answer)?);
        }
        if let Some(e) = answer.error {
            anyhow::bail!(e);
        }
        if json {
            return Ok(());
        }
        let print = |tf: &fbr_master_target::testcopy::TestFailover| {
            println!(
                "{}: group {} at point {}, {} disks, made in {:.3} s",
                tf.name,
                tf.group,
                tf.tag_id,
                tf.disks.len(),
                tf.seconds
            );
            for d in &tf.disks {
                println!(
                    "  {}/{} {} ({:?}, {} records undone)",
                    d.vm,
                    d.disk,
                    d.path.display(),
                    d.method,
                    d.records_undone
                );
            }
        };
        match (&request, answer.test_failover, answer.test_failovers) {
            (Request::TestFailoverDelete { name }, _, _) => println!("deleted {name}"),
            (_, Some(tf), _) => print(&tf),
            (_, _, Some(all)) => all.iter().for_each(print),
            _ => {}
        }
        Ok(())
    }))
}

fn rollback(data: &std::path::Path, group: &str, tag: u64, json: bool) -> anyhow::Result<()> {
    let done = fbr_master_target::rollback::roll_back_group(data, group, tag)?;
    if json {
        println!("{}", serde_json::to_string(&done)?);
        return Ok(());
    }
    for d in &done.disks {
        println!(
            "{}/{}: {} records undone, {} bytes restored, {} journal bytes cut, {:.3} s",
            d.vm,
            d.disk,
            d.done.records_undone,
            d.done.restored_bytes,
            d.done.journal_bytes_cut,
            d.seconds
        );
    }
    println!(
        "group {group} is at recovery point {tag} ({} disks, {:.3} s)",
        done.disks.len(),
        done.seconds
    );
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
    fbr_master_target::rollback::complete_pending(data, &store)?;
    let point = store
        .recovery_points()?
        .into_iter()
        .find(|p| p.group == group && p.tag_id == tag)
        .with_context(|| format!("no recovery point {tag} in group {group}"))?;
    anyhow::ensure!(
        point.consistent,
        "recovery point {tag} of group {group} landed while a disk was stale or resyncing: it is no recovery point"
    );
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
    let jpath = files::journal_path(data, id);
    if store.trim_point(id)?.is_some() {
        // The journal no longer starts at the disk's beginning: the image with the
        // before-images since the point put back (time proportional to the change).
        let image = std::fs::File::open(files::image_path(data, id))?;
        replica::sparse_copy(&image, &file, ckpt.disk_size)?;
        let name = jpath.display().to_string();
        let journal = Arc::new(std::fs::File::open(&jpath)?);
        let plan = fbr_master_target::rollback::plan(journal.clone(), &name, landed.journal_end)?;
        fbr_master_target::rollback::put_back(&*journal, &name, &plan, &file, usize::MAX)?;
    } else {
        file.set_len(ckpt.disk_size)?;
        let mut sink = replica::FileImage(&file);
        journal::replay(&jpath, landed.seq, &mut sink).map_err(anyhow::Error::msg)?;
    }
    file.sync_all()?;
    println!(
        "wrote {} at recovery point {group}/{tag} to {}",
        id,
        out.display()
    );
    Ok(())
}
