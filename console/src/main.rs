//! `bulwark`, the admin console: a client of the coordinator's admin API.
//!
//! It is also a multi-call launcher (DESIGN §2): `bulwark x-coordinator …` and
//! `bulwark x-agent …` run exactly what `bulwark-coordinator …` and `bulwark-agent …` run, so
//! the quickstart can start every daemon as a child process of this one executable.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{AdminRequest, AdminResponse, AgentInfo, JobInfo, MaintenanceKind};
use bulwark_protocol::HostId;
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// What a command prints.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
enum Output {
    #[default]
    Text,
    Json,
}

/// Bulwark admin console.
#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about)]
struct Cli {
    /// A coordinator's data directory (address and admin certificate are taken from it).
    #[arg(long, global = true, env = "BULWARK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The coordinator's address, with --ca, --cert and --key (instead of --data-dir).
    #[arg(long, global = true)]
    coordinator: Option<SocketAddr>,
    /// The deployment CA certificate (PEM).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// The admin certificate (PEM).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The admin key (PEM).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// The coordinator's TLS name (defaults to the host part of --coordinator).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Coordinator name, version, agents connected, VMs protected, jobs running, store usage.
    Status,
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Verify the store: re-read every chunk, mark replicas that reach a bad one inconsistent.
    Verify {
        /// Wait for the job and print it (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
    },
    /// Drop recovery points past their group's retention range.
    Prune {
        #[arg(long)]
        wait: bool,
    },
    /// Garbage-collect the store.
    Gc {
        #[arg(long)]
        wait: bool,
    },
    /// Jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// The whole story on loopback in one command.
    Quickstart {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        keep_running: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Jobs, oldest first.
    List {
        #[arg(long)]
        vm: Option<String>,
        /// queued, running, succeeded, failed, cancelled
        #[arg(long)]
        state: Option<String>,
    },
    /// One job.
    Show { id: u64 },
    /// Wait until a job has finished; exit 1 if it failed.
    Wait { id: u64 },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Every enrolled agent, connected or not.
    List,
    /// Revoke a host's certificate: its connections are closed and refused from then on.
    Revoke { host: HostId },
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("x-coordinator") => {
            args.remove(1);
            args[0] = "bulwark-coordinator".into();
            return bulwark_coordinator::cli::main_with(args);
        }
        Some("x-agent") => {
            args.remove(1);
            args[0] = "bulwark-agent".into();
            return bulwark_agent::cli::main_with(args);
        }
        _ => {}
    }
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", bulwark_coordinator::cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn target(cli: &Cli) -> anyhow::Result<AdminTarget> {
    if let Some(addr) = cli.coordinator {
        let (Some(ca), Some(cert), Some(key)) = (&cli.ca, &cli.cert, &cli.key) else {
            anyhow::bail!("--coordinator needs --ca, --cert and --key");
        };
        let name = cli.server_name.clone().unwrap_or_else(|| addr.ip().to_string());
        return Ok(AdminTarget::from_files(addr, name, ca, cert, key)?);
    }
    let dir = cli.data_dir.as_ref().context(
        "say which coordinator: --data-dir DIR (or BULWARK_DATA_DIR), or --coordinator with --ca/--cert/--key",
    )?;
    Ok(AdminTarget::from_data_dir(dir)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match &cli.command {
        Command::Quickstart { .. } => {
            anyhow::bail!("the quickstart is not built yet: it needs the store, the snapshot path and jobs (see the README's Status)")
        }
        Command::Status => AdminRequest::Status,
        Command::Agent { command: AgentCommand::List } => AdminRequest::AgentList,
        Command::Agent { command: AgentCommand::Revoke { host } } => AdminRequest::AgentRevoke { host: host.clone() },
        Command::Verify { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Verify, wait: *wait },
        Command::Prune { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Prune, wait: *wait },
        Command::Gc { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Gc, wait: *wait },
        Command::Job { command: JobCommand::List { vm, state } } => {
            AdminRequest::JobList { vm: vm.clone(), state: state.clone() }
        }
        Command::Job { command: JobCommand::Show { id } | JobCommand::Wait { id } } => {
            AdminRequest::JobShow { id: *id }
        }
    };
    let target = target(&cli)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let wait_for = match &cli.command {
        Command::Job { command: JobCommand::Wait { id } } => Some(*id),
        _ => None,
    };
    let response = rt.block_on(async {
        let client = AdminClient::connect(&target).await?;
        let mut r = client.request(request).await;
        if let Some(id) = wait_for {
            // Poll until the job is final.
            while let Ok(AdminResponse::Job(j)) = &r {
                if is_final(j) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                r = client.request(AdminRequest::JobShow { id }).await;
            }
        }
        client.close().await;
        r
    })?;
    print(cli.output, &response);
    if let AdminResponse::Job(j) = &response {
        if j.state == "failed" {
            anyhow::bail!("job {} ({}) failed: {}", j.id, j.kind, j.error.as_deref().unwrap_or("no reason recorded"));
        }
    }
    Ok(())
}

fn is_final(j: &JobInfo) -> bool {
    matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled")
}

fn job_json(j: &JobInfo) -> serde_json::Value {
    serde_json::json!({
        "id": j.id,
        "kind": j.kind,
        "vm": j.vm,
        "state": j.state,
        "started_at": j.started_at.map(|s| fmt_time(Some(s))),
        "finished_at": j.finished_at.map(|s| fmt_time(Some(s))),
        "bytes_transferred": j.bytes_transferred,
        "bytes_scanned": j.bytes_scanned,
        "blocks_changed": j.blocks_changed,
        "consistency": j.consistency,
        "error": j.error,
        "detail": j.detail,
    })
}

fn fmt_time(secs: Option<u64>) -> String {
    match secs {
        Some(s) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)).to_string()
        }
        None => "never".into(),
    }
}

fn agent_json(a: &AgentInfo) -> serde_json::Value {
    serde_json::json!({
        "host": a.host.as_str(),
        "connected": a.connected,
        "last_seen": a.last_seen.map(|s| fmt_time(Some(s))),
        "cert_serial": a.cert_serial,
        "vms": a.vms,
        "revoked": a.revoked,
        "agent_version": a.agent_version,
        "remote_addr": a.remote_addr,
    })
}

fn print(output: Output, response: &AdminResponse) {
    match (output, response) {
        (Output::Json, AdminResponse::Status(s)) => println!(
            "{}",
            serde_json::json!({
                "name": s.name, "version": s.version, "protocol_version": s.protocol_version,
                "agents_connected": s.agents_connected, "agents_enrolled": s.agents_enrolled,
                "vms_protected": s.vms_protected, "jobs_running": s.jobs_running,
                "store_bytes": s.store_bytes, "catalog_bytes": s.catalog_bytes,
            })
        ),
        (Output::Text, AdminResponse::Status(s)) => {
            println!("coordinator      {} (version {}, protocol {})", s.name, s.version, s.protocol_version);
            println!("agents           {} connected of {} enrolled", s.agents_connected, s.agents_enrolled);
            println!("VMs protected    {}", s.vms_protected);
            println!("jobs running     {}", s.jobs_running);
            println!("store            {} bytes (catalog {} bytes)", s.store_bytes, s.catalog_bytes);
        }
        (Output::Json, AdminResponse::Agents(list)) => {
            println!("{}", serde_json::Value::Array(list.iter().map(agent_json).collect()))
        }
        (Output::Text, AdminResponse::Agents(list)) => {
            println!("{:<24} {:<10} {:<22} {:<34} {:>4}", "HOST", "STATE", "LAST SEEN", "CERT SERIAL", "VMS");
            for a in list {
                let state = if a.revoked {
                    "revoked"
                } else if a.connected {
                    "connected"
                } else {
                    "offline"
                };
                println!(
                    "{:<24} {:<10} {:<22} {:<34} {:>4}",
                    a.host,
                    state,
                    fmt_time(a.last_seen),
                    a.cert_serial,
                    a.vms
                );
            }
        }
        (Output::Json, AdminResponse::Revoked { host, serials, connections_closed }) => println!(
            "{}",
            serde_json::json!({ "host": host.as_str(), "serials": serials, "connections_closed": connections_closed })
        ),
        (Output::Text, AdminResponse::Revoked { host, serials, connections_closed }) => {
            if serials.is_empty() {
                println!("{host} was already revoked");
            } else {
                println!("revoked {host} (serial {}); {connections_closed} connection(s) closed", serials.join(", "));
            }
        }
        (Output::Json, AdminResponse::JobStarted { job_id }) => println!("{}", serde_json::json!({ "job_id": job_id })),
        (Output::Text, AdminResponse::JobStarted { job_id }) => println!("job {job_id} started"),
        (Output::Json, AdminResponse::Job(j)) => println!("{}", job_json(j)),
        (Output::Text, AdminResponse::Job(j)) => {
            println!("job {} ({}) {}", j.id, j.kind, j.state);
            println!("  started   {}", fmt_time(j.started_at));
            println!("  finished  {}", fmt_time(j.finished_at));
            if let Some(d) = &j.detail {
                println!("  detail    {d}");
            }
            if let Some(e) = &j.error {
                println!("  error     {e}");
            }
        }
        (Output::Json, AdminResponse::Jobs(list)) => {
            println!("{}", serde_json::Value::Array(list.iter().map(job_json).collect()))
        }
        (Output::Text, AdminResponse::Jobs(list)) => {
            println!(
                "{:>6} {:<18} {:<16} {:<10} {:<22} {:>14}",
                "ID", "KIND", "VM", "STATE", "FINISHED", "BYTES SCANNED"
            );
            for j in list {
                let vm = j.vm.as_deref().unwrap_or("-");
                println!(
                    "{:>6} {:<18} {:<16} {:<10} {:<22} {:>14}",
                    j.id,
                    j.kind,
                    vm,
                    j.state,
                    fmt_time(j.finished_at),
                    j.bytes_scanned
                );
            }
        }
        (_, other) => println!("{other:?}"),
    }
}
