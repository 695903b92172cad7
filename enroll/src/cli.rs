//! The `register` subcommand every component has (`relay register`, `master-target
//! register`, `churn enroll`): one set of flags, one outcome printed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::client::{register, RegisterOptions};

/// Flags of `register`.
#[derive(clap::Args, Debug, Clone)]
pub struct RegisterArgs {
    /// The configuration server's HTTPS address, host:port (port 443 by default there).
    #[arg(long)]
    pub config_server: SocketAddr,
    /// The name its certificate carries (checked once the site CA is known).
    #[arg(long, default_value = "config-server")]
    pub server_name: String,
    /// File whose first line is the site's passphrase (`config-server init` shows it).
    #[arg(long)]
    pub passphrase_file: PathBuf,
    /// Where the key, the certificate and the site CA go. Default: the component's own.
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// This component's name (certificate common name and file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// DNS names the component serves under (relays, master targets).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// IP addresses the component serves under.
    #[arg(long = "ip")]
    pub ip_addresses: Vec<IpAddr>,
    /// Where others reach it, host:port (a master target: its address for relays).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Agents: a VM whose disks it writes (repeat for several).
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// Agents: the relay to write to, by name (default: the one with the most headroom).
    #[arg(long)]
    pub relay: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Runs `register` for a component of `role`, with its default PKI directory and name.
/// Exit status: 0 enrolled; 1 refused or failed (the message says why, with the
/// server's code when it refused).
pub fn run(
    program: &str,
    args: RegisterArgs,
    role: fbr_transport::Role,
    default_pki_dir: &str,
    default_name: &str,
) -> ExitCode {
    let options = RegisterOptions {
        server: args.config_server,
        server_name: args.server_name,
        passphrase_file: args.passphrase_file,
        pki_dir: args
            .pki_dir
            .unwrap_or_else(|| PathBuf::from(default_pki_dir)),
        name: args.name.unwrap_or_else(|| default_name.to_owned()),
        role,
        vms: args.vms,
        dns_names: args.dns_names,
        ip_addresses: args.ip_addresses,
        advertise: args.advertise,
        relay: args.relay,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(register(&options)) {
        Ok(r) if args.json => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "enrolled {} ({}) in site {}{}: certificate {}, CA {}",
                r.name,
                r.role,
                r.site_id,
                if r.kept_key { ", keeping its key" } else { "" },
                r.certificate.display(),
                r.ca.display()
            );
            if let Some(mt) = &r.assignment.master_target {
                println!("assigned master target: {mt}");
            }
            if let (Some(name), Some(addr)) = (&r.assignment.relay, &r.assignment.relay_address) {
                println!("assigned relay: {name} at {addr}");
            }
            if !r.assignment.vms.is_empty() {
                println!("may write VMs: {}", r.assignment.vms.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: enrollment failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The flags of a relay's or master target's `run` that point it at its configuration
/// server; each overrides the config key in brackets (flattened into the daemon's own
/// flags).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct ConfigServerFlags {
    /// The site's configuration server, IP:PORT, for heartbeats; "" for none
    /// [config_server.address].
    #[arg(long)]
    #[serde(rename = "config_server.address")]
    pub config_server: Option<String>,
    /// Seconds between heartbeats to the configuration server
    /// [config_server.heartbeat_interval_s].
    #[arg(long)]
    #[serde(rename = "config_server.heartbeat_interval_s")]
    pub heartbeat_interval_s: Option<u64>,
    /// host:port where others reach this daemon, reported in heartbeats (default: the
    /// listen address, when it is a specific IP) [config_server.advertise].
    #[arg(long)]
    #[serde(rename = "config_server.advertise")]
    pub advertise: Option<String>,
}
