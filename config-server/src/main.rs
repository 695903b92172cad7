//! `config-server`: the site's configuration server (see the crate docs).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fbr_config_server::api::Server;
use fbr_config_server::settings::ConfigServerSettings;
use fbr_daemon::settings::{flag_overrides, load_settings, ConfigError};

#[derive(Parser, Debug)]
#[command(
    name = "config-server",
    version,
    about = "Failback configuration server: the site's CA and the enrollment of its relays, master targets and agents"
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
    /// Create the site in a data directory: its CA, this server's certificate, and a
    /// random passphrase, shown once (stored only as a salted verifier).
    Init {
        #[arg(long)]
        data: PathBuf,
        /// DNS names the server is reached under (its certificate carries them).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// IP addresses the server is reached under.
        #[arg(long = "ip")]
        ip_addresses: Vec<IpAddr>,
        /// Write the passphrase to this file (mode 0600) instead of printing it.
        #[arg(long)]
        passphrase_out: Option<PathBuf>,
        /// PBKDF2 iterations of the verifier.
        #[arg(long, default_value_t = fbr_enroll::proof::DEFAULT_ITERATIONS)]
        iterations: u32,
        #[arg(long)]
        json: bool,
    },
    /// Serve the API.
    Run(RunArgs),
    /// Validate the configuration without starting, and print the effective settings.
    CheckConfig(RunArgs),
    /// The enrolled components (the daemon must be stopped: the state is locked).
    Components {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The site: its VMs and their disks, replication groups, relays and master
    /// targets, from enrollments and heartbeats (the daemon must be stopped; running,
    /// `GET /v1/inventory` answers the same).
    Inventory {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Move a VM to another relay (the running server does it, with the VM's agent):
    /// its old relay's backlog is drained to the master target first, or, if that
    /// relay is lost, the VM resyncs through the new one. Prints the move.
    Move {
        #[command(flatten)]
        server: OperatorArgs,
        /// The VM to move.
        #[arg(long)]
        vm: String,
        /// The relay to move it to (its enrolled name).
        #[arg(long)]
        to: String,
        /// Follow the move until it is done (exit 1 if it fails).
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every move, with its phase and progress (from the running server).
    Moves {
        #[command(flatten)]
        server: OperatorArgs,
        #[arg(long)]
        json: bool,
    },
}

/// How an operator command reaches the running server: its data directory holds the
/// operator token and the site CA.
#[derive(clap::Args, Debug, Clone)]
struct OperatorArgs {
    #[arg(long)]
    data: PathBuf,
    /// The server's HTTPS address.
    #[arg(long, default_value = "127.0.0.1:443")]
    server: SocketAddr,
    /// The name its certificate carries (default: the address's IP).
    #[arg(long)]
    server_name: Option<String>,
}

impl OperatorArgs {
    fn client(&self) -> anyhow::Result<fbr_enroll::heartbeat::HeartbeatClient> {
        let token = fbr_config_server::site::read_operator_token(&self.data)?;
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| self.server.ip().to_string());
        let ca = fbr_config_server::site::pki_dir(&self.data).join("ca.pem");
        fbr_enroll::heartbeat::HeartbeatClient::operator(self.server, &name, &ca, token)
            .map_err(anyhow::Error::msg)
    }
}

/// Flags of `config-server run` and `check-config`; each overrides the config key in
/// brackets (docs/CONFIGURATION.md).
#[derive(clap::Args, Debug, serde::Serialize)]
struct RunArgs {
    /// Config file (TOML). Default: /etc/config-server/config-server.toml if it exists.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// HTTPS address of the API [listen].
    #[arg(long)]
    #[serde(rename = "listen")]
    listen: Option<SocketAddr>,
    /// The site's data directory [data_dir].
    #[arg(long)]
    #[serde(rename = "data_dir")]
    data: Option<PathBuf>,
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
}

impl RunArgs {
    fn settings(&self) -> Result<ConfigServerSettings, ConfigError> {
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
            "config-server",
            args.settings(),
            cli.log_json,
            |s| s.log_json,
            run,
        ),
        Command::CheckConfig(args) => fbr_daemon::report_check("config-server", args.settings()),
        Command::Init {
            data,
            dns_names,
            ip_addresses,
            passphrase_out,
            iterations,
            json,
        } => report(init(
            &data,
            &dns_names,
            &ip_addresses,
            passphrase_out,
            iterations,
            json,
        )),
        Command::Components { data, json } => report(components(&data, json)),
        Command::Inventory { data, json } => report(inventory(&data, json)),
        Command::Move {
            server,
            vm,
            to,
            wait,
            json,
        } => match request_move(&server, &vm, &to, wait, json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => report(Err(e)),
        },
        Command::Moves { server, json } => report(list_moves(&server, json)),
    }
}

/// A move as one line.
fn move_line(m: &fbr_config_server::moves::Move) -> String {
    let mut line = format!(
        "move {}: {} from {} to {} (placement {}): {}, {} of {} bytes drained in {:.1} s",
        m.id,
        m.vm,
        m.from_relay.as_deref().unwrap_or("-"),
        m.to_relay,
        m.placement,
        m.phase.name(),
        m.bytes_drained,
        m.bytes_to_drain,
        m.drain_ms as f64 / 1000.0
    );
    if let Some(f) = &m.fell_back {
        line.push_str(&format!("; fell back to a resync: {f}"));
    }
    if let Some(e) = &m.error {
        line.push_str(&format!("; error: {e}"));
    }
    line
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `config-server move`: `Ok(false)` when the move it waited for failed.
fn request_move(
    server: &OperatorArgs,
    vm: &str,
    to: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<bool> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "move")]
        m: fbr_config_server::moves::Move,
    }
    let client = server.client()?;
    runtime()?.block_on(async {
        let body = serde_json::to_vec(&fbr_enroll::wire::MoveRequest {
            version: fbr_enroll::wire::API_VERSION,
            vm: vm.to_owned(),
            relay: to.to_owned(),
        })?;
        let answer = client
            .request("POST", "/v1/moves", body)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut m = serde_json::from_slice::<Answer>(&answer)?.m;
        let show = |m: &fbr_config_server::moves::Move| {
            if json {
                println!("{}", serde_json::to_string(m).unwrap_or_default());
            } else {
                println!("{}", move_line(m));
            }
        };
        show(&m);
        let path = format!("/v1/moves/{}", m.id);
        while wait && !m.phase.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let answer = client
                .request("GET", &path, Vec::new())
                .await
                .map_err(anyhow::Error::msg)?;
            let next = serde_json::from_slice::<Answer>(&answer)?.m;
            if next != m {
                show(&next);
            }
            m = next;
        }
        Ok(m.phase != fbr_enroll::wire::MovePhase::Failed)
    })
}

fn list_moves(server: &OperatorArgs, json: bool) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Answer {
        moves: Vec<fbr_config_server::moves::Move>,
    }
    let client = server.client()?;
    let answer = runtime()?.block_on(client.request("GET", "/v1/moves", Vec::new()));
    let moves = serde_json::from_slice::<Answer>(&answer.map_err(anyhow::Error::msg)?)?.moves;
    if json {
        println!("{}", serde_json::to_string_pretty(&moves)?);
    } else if moves.is_empty() {
        println!("no moves");
    } else {
        for m in &moves {
            println!("{}", move_line(m));
        }
    }
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    fbr_daemon::report("config-server", r)
}

fn init(
    data: &std::path::Path,
    dns_names: &[String],
    ip_addresses: &[IpAddr],
    passphrase_out: Option<PathBuf>,
    iterations: u32,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (fbr_enroll::proof::MIN_ITERATIONS..=fbr_enroll::proof::MAX_ITERATIONS)
            .contains(&iterations),
        "--iterations {iterations}: components accept {}..={}",
        fbr_enroll::proof::MIN_ITERATIONS,
        fbr_enroll::proof::MAX_ITERATIONS
    );
    if let Some(out) = &passphrase_out {
        anyhow::ensure!(
            !out.exists(),
            "{} exists: refusing to overwrite it",
            out.display()
        );
    }
    let site = fbr_config_server::site::init(data, dns_names, ip_addresses, iterations)?;
    let shown = match &passphrase_out {
        Some(out) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .with_context(|| format!("{}", out.display()))?;
            writeln!(f, "{}", site.passphrase)?;
            f.sync_all()?;
            None
        }
        None => Some(site.passphrase.clone()),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "site_id": site.site_id,
                "ca": site.ca,
                "passphrase": shown,
                "passphrase_file": passphrase_out,
            })
        );
    } else {
        println!("site {} created in {}", site.site_id, data.display());
        println!("CA certificate: {}", site.ca.display());
        match shown {
            Some(p) => println!(
                "passphrase (shown once, stored nowhere; give it to each component's --passphrase-file):\n  {p}"
            ),
            None => println!(
                "passphrase written to {}",
                passphrase_out.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        }
    }
    Ok(())
}

fn components(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let state = fbr_config_server::state::State::open(data)?;
    let list = state.inventory(fbr_config_server::site::now_ms())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            "{:<24} {:<14} {:<13} {:<24} health",
            "name", "role", "state", "advertise"
        );
        for c in &list {
            println!(
                "{:<24} {:<14} {:<13} {:<24} {}",
                c.component.name,
                c.component.role,
                c.state,
                c.component.advertise.as_deref().unwrap_or("-"),
                c.report.as_ref().map_or("-", |r| r.health.state.as_str())
            );
        }
    }
    Ok(())
}

fn inventory(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let state = fbr_config_server::state::State::open(data)?;
    let inv = state.site_inventory(fbr_config_server::site::now_ms())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    let or = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("VMs");
    for v in &inv.vms {
        println!(
            "  {} (agent {}, relay {})",
            v.vm,
            or(&v.agent),
            or(&v.assigned_relay)
        );
        for d in &v.disks {
            println!(
                "    disk {}: {} bytes, group {}, {}, on {} -> {}, backlog {} bytes, RPO {} s",
                d.disk,
                d.size_bytes.map_or("?".into(), |s| s.to_string()),
                or(&d.group),
                or(&d.sync),
                or(&d.relay),
                or(&d.master_target),
                d.backlog_bytes.map_or("-".into(), |b| b.to_string()),
                d.rpo_s.map_or("-".into(), |r| r.to_string()),
            );
        }
    }
    println!("groups");
    for g in &inv.groups {
        println!(
            "  {} on {}: {} recovery points, disks {}",
            g.group,
            g.master_target,
            g.recovery_points,
            g.disks.join(", ")
        );
    }
    for (title, list) in [
        ("relays", &inv.relays),
        ("master targets", &inv.master_targets),
    ] {
        println!("{title}");
        for r in list {
            println!(
                "  {} ({}) {}, {} disks, health {}",
                r.name,
                or(&r.advertise),
                r.state,
                r.disks,
                or(&r.health)
            );
        }
    }
    Ok(())
}

struct Endpoints(Arc<Server>);

impl fbr_metrics::Endpoints for Endpoints {
    fn metrics_text(&self) -> Result<String, String> {
        let inventory = self
            .0
            .state
            .inventory(fbr_config_server::site::now_ms())
            .map_err(|e| e.to_string())?;
        let m = &self.0.metrics;
        m.components.set(inventory.len() as i64);
        // Agents send no heartbeats (yet): only relays and master targets count.
        m.components_disconnected.set(
            inventory
                .iter()
                .filter(|c| c.component.role != "agent" && c.state != "connected")
                .count() as i64,
        );
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
            body: format!("ready: site {}\n", self.0.site.site_id),
        }
    }
}

async fn run(settings: ConfigServerSettings) -> anyhow::Result<()> {
    let server = Server::open(&settings.data_dir)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen {}", settings.listen))?;
    let local = listener.local_addr()?;
    let metrics_gate = fbr_metrics::http::gate();
    let api_gate = fbr_config_server::api::gate();
    fbr_metrics::HttpConnections::register(
        &server.metrics.registry,
        "fbr_config_server",
        vec![("metrics", metrics_gate.stats()), ("api", api_gate.stats())],
    );
    let endpoints: Arc<dyn fbr_metrics::Endpoints> = Arc::new(Endpoints(server.clone()));
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
    tracing::info!(listen = %local, site = %server.site.site_id, "configuration server listening");
    let api = tokio::spawn(fbr_config_server::api::serve(
        listener,
        server.clone(),
        api_gate,
    ));
    let notify = fbr_metrics::spawn_systemd_readiness(endpoints)
        .context("NOTIFY_SOCKET (systemd notification)")?;
    tokio::select! {
        _ = fbr_daemon::shutdown_signal() => {}
        r = api => r.context("API task")??,
    }
    notify.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    tracing::info!("configuration server stopped");
    Ok(())
}
