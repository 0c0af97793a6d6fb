//! The `bulwark-agent` command line. `main_with` is shared with the `bulwark` multi-call
//! launcher, so the agent started by the console is exactly this one.

use crate::config::AgentDir;
use crate::enroll::enroll;
use crate::run::{run, RunOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Bulwark's protection agent.
#[derive(Debug, Parser)]
#[command(name = "bulwark-agent", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value = "human")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host with a coordinator using a one-time join token.
    Enroll {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        token: String,
        /// This host's name (defaults to the machine's).
        #[arg(long)]
        host: Option<String>,
    },
    /// The embedded sim hypervisor's tools (VMs on a shared storage root).
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Seeds for manual replica creation (removable media).
    Seed {
        #[command(subcommand)]
        command: SeedCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Run the agent until SIGINT/SIGTERM.
    Run {
        #[arg(long)]
        data_dir: PathBuf,
        /// Use the sim hypervisor on this storage root.
        #[arg(long, conflicts_with = "qemu_vm_dir")]
        sim_root: Option<PathBuf>,
        /// Use the QEMU backend with the VM definitions in this directory.
        #[arg(long)]
        qemu_vm_dir: Option<PathBuf>,
        /// The QEMU VM directory is shared by the nodes of a cluster (`shared = true` in
        /// agent.toml): report only the VMs whose QEMU runs here.
        #[arg(long)]
        qemu_shared: bool,
    },
    /// The QEMU backend's tools.
    Qemu {
        #[command(subcommand)]
        command: QemuCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum QemuCommand {
    /// Validate every VM definition in DIR and probe its sockets (exit 1, one line per problem).
    Check {
        #[arg(long)]
        vm_dir: PathBuf,
    },
    /// Print the qemu-system command line VM's definition expects (QMP socket, block node
    /// names, device ids, the guest agent's port); add your own network, display and boot
    /// options to it.
    Command {
        #[arg(long)]
        vm_dir: PathBuf,
        #[arg(long)]
        vm: String,
        /// QEMU's accelerator list (`kvm:tcg` falls back to TCG without KVM).
        #[arg(long, default_value = "kvm:tcg")]
        accel: String,
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SeedCommand {
    /// Write a VM's disks, as of a consistent snapshot, into DIR (for `bulwark seed import`).
    Export {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        output: PathBuf,
        /// The agent's data directory (its host name and hypervisor come from agent.toml).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The sim storage root (instead of, or overriding, agent.toml's).
        #[arg(long, conflicts_with = "qemu_vm_dir")]
        sim_root: Option<PathBuf>,
        /// The QEMU VM definitions' directory (instead of, or overriding, agent.toml's vm_dir);
        /// needs --data-dir (the agent's state and fleecing images are kept there).
        #[arg(long)]
        qemu_vm_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Make a sim VM (default: one disk os:1GiB, running, windows, integration services on, zero-filled).
    CreateVm {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "windows", value_parser = ["linux", "windows"])]
        os: String,
        /// NAME:SIZE, e.g. os:1GiB (repeatable).
        #[arg(long = "disk")]
        disks: Vec<String>,
        #[arg(long, default_value = "running", value_parser = ["running", "off"])]
        state: String,
        #[arg(long)]
        no_integration_services: bool,
        #[arg(long, value_parser = ["healthy", "resyncing", "critical"])]
        replica: Option<String>,
        #[arg(long, default_value = "zero", value_parser = ["zero", "random"])]
        fill: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write FILE's bytes into a disk at an offset, as the guest would (tracked).
    Write {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        #[arg(long)]
        input: PathBuf,
    },
    /// Guest writes of random data covering P % of each disk's 1 MiB blocks (or --bytes of it).
    Churn {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long, required_unless_present = "bytes", conflicts_with = "bytes")]
        percent: Option<f64>,
        /// A fixed amount per disk instead (`64MiB`), in whole 1 MiB blocks.
        #[arg(long, value_parser = parse_size)]
        bytes: Option<u64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Live migration to another node; --storage also moves storage (tracking resets).
    Migrate {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        storage: bool,
    },
    /// Change a VM's power state.
    SetState {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(value_parser = ["running", "off", "paused"])]
        state: String,
    },
    /// Power loss of a node: tracking is lost for the VMs that were running there.
    CrashHost {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        host: String,
    },
    /// Take a snapshot of a VM as the agent of HOLDER would (freeze, snapshot point, thaw) and
    /// hold it for DURATION, then release it, keeping its changes for the next backup. For
    /// operators' drills and crash tests: kill this process and see the agent clean up.
    Snapshot {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        holder: String,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: std::time::Duration,
    },
    /// The disk's current contents, as the guest sees them.
    Read {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        output: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    bulwark_protocol::units::parse_size(s).map_err(|e| e.to_string())
}

fn power(s: &str) -> crate::sim::Power {
    match s {
        "off" => crate::sim::Power::Off,
        "paused" => crate::sim::Power::Paused,
        _ => crate::sim::Power::Running,
    }
}

fn run_sim(command: SimCommand) -> anyhow::Result<()> {
    use crate::sim::{self, DiskConfig, ReplicaHealth};
    use anyhow::Context as _;
    match command {
        SimCommand::CreateVm { root, name, host, os, disks, state, no_integration_services, replica, fill, seed } => {
            let disks = if disks.is_empty() { vec!["os:1GiB".to_owned()] } else { disks };
            let disks = disks
                .iter()
                .map(|d| {
                    let (n, size) =
                        d.split_once(':').with_context(|| format!("--disk {d:?}: write NAME:SIZE, e.g. os:1GiB"))?;
                    Ok(DiskConfig { name: n.to_owned(), size: bulwark_protocol::units::parse_size(size)? })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let replica = replica.map(|r| match r.as_str() {
                "resyncing" => ReplicaHealth::Resyncing,
                "critical" => ReplicaHealth::Critical,
                _ => ReplicaHealth::Healthy,
            });
            let req = sim::CreateVm {
                name: name.clone(),
                host,
                os,
                disks,
                power: power(&state),
                integration_services: !no_integration_services,
                replica,
                random_fill: fill == "random",
                seed,
            };
            sim::create_vm(&root, &req)?;
            println!("created VM {name}");
        }
        SimCommand::Write { root, vm, disk, offset, input } => {
            let mut f = std::fs::File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
            let mut vm = sim::Vm::open(&root, &vm)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = offset;
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)
                    .with_context(|| format!("cannot read {}", input.display()))?;
                if n == 0 {
                    break;
                }
                vm.guest_write(&disk, at, &buf[..n])?;
                at += n as u64;
            }
            println!("wrote {} bytes at offset {offset}", at - offset);
        }
        SimCommand::Churn { root, vm, percent, bytes, seed } => {
            let n = match (percent, bytes) {
                (_, Some(bytes)) => sim::churn_bytes(&root, &vm, bytes, seed)?,
                (Some(percent), None) => sim::churn(&root, &vm, percent, seed)?,
                (None, None) => anyhow::bail!("give --percent or --bytes"),
            };
            println!("churned {n} bytes");
        }
        SimCommand::Migrate { root, vm, to, storage } => {
            sim::migrate(&root, &vm, &to, storage)?;
            println!("migrated {vm} to {to}{}", if storage { " (with storage: tracking reset)" } else { "" });
        }
        SimCommand::SetState { root, vm, state } => {
            sim::set_state(&root, &vm, power(&state))?;
            println!("{vm} is {state}");
        }
        SimCommand::CrashHost { root, host } => {
            let lost = sim::crash_host(&root, &host)?;
            println!(
                "host {host} crashed; tracking lost for: {}",
                if lost.is_empty() { "no VM".to_owned() } else { lost.join(", ") }
            );
        }
        SimCommand::Snapshot { root, vm, holder, hold } => {
            use crate::snapshot::{Finish, SnapshotActor, Take};
            use actix::Actor as _;
            let backend: std::sync::Arc<dyn crate::backend::Hypervisor> =
                std::sync::Arc::new(crate::backend::SimBackend { root });
            actix_rt::System::new().block_on(async move {
                let lease = hold + std::time::Duration::from_secs(5);
                let actor = SnapshotActor::new(backend, &vm, &holder, lease).start();
                let taken = actor.send(Take).await??;
                println!("snapshot of {vm} held ({:?}-consistent, token {})", taken.consistency, taken.token);
                std::io::Write::flush(&mut std::io::stdout())?;
                actix_rt::time::sleep(hold).await;
                actor.send(Finish { commit: None }).await?.map_err(anyhow::Error::msg)?;
                println!("released");
                Ok::<(), anyhow::Error>(())
            })?;
        }
        SimCommand::Read { root, vm, disk, output } => {
            let f = std::fs::File::create(&output).with_context(|| format!("cannot create {}", output.display()))?;
            let mut w = std::io::BufWriter::new(f);
            sim::read_disk(&root, &vm, &disk, &mut w)?;
            std::io::Write::flush(&mut w)?;
        }
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn,rustls=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

fn seed_export(
    vm: &str,
    output: &std::path::Path,
    data_dir: Option<PathBuf>,
    sim_root: Option<PathBuf>,
    qemu_vm_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = data_dir.map(AgentDir::new);
    let config = dir.as_ref().map(crate::config::AgentConfig::load).transpose()?;
    let qemu = qemu_vm_dir.clone().or_else(|| {
        config
            .as_ref()
            .filter(|c| c.hypervisor.kind == "qemu" && sim_root.is_none())
            .and_then(|c| c.hypervisor.vm_dir.clone())
    });
    let m = if let Some(vm_dir) = qemu {
        // The agent's own state directory: a snapshot it holds is seen, and none is left behind.
        let (Some(dir), Some(config)) = (&dir, &config) else {
            anyhow::bail!("a QEMU VM's seed needs --data-dir of the host's agent");
        };
        let mut backend =
            crate::qemu::QemuBackend::new(vm_dir, config.hypervisor.restore_dir.clone(), dir.root.join("qemu"))?;
        if config.hypervisor.shared {
            // A cluster's VM: its state and sockets as the agent of this node has them.
            backend = backend.shared_by_cluster(&config.host)?;
        }
        crate::seed::export(&backend, &config.host, vm, output)?
    } else {
        let root = sim_root
            .or_else(|| config.as_ref().and_then(|c| c.hypervisor.root.clone()))
            .context("say where the VM is: --sim-root R, --qemu-vm-dir DIR, or --data-dir of the host's agent")?;
        let host = match &config {
            Some(c) => c.host.clone(),
            None => crate::sim::Vm::open(&root, vm)?.config.host.clone(),
        };
        let backend = crate::backend::SimBackend { root };
        crate::seed::export(&backend, &host, vm, output)?
    };
    let total: u64 = m.disks.iter().map(|d| d.size_bytes).sum();
    println!(
        "seed of {vm} ({} disk(s), {total} bytes, {}-consistent) written to {}",
        m.disks.len(),
        m.consistency,
        output.display()
    );
    Ok(())
}

/// Parses `args` (with the program name first) and runs the command.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let result: anyhow::Result<()> = match cli.command {
        Command::Enroll { data_dir, token, host } => (|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let config = rt.block_on(enroll(&AgentDir::new(&data_dir), &token, host))?;
            println!(
                "enrolled host {:?} with coordinator {} ({})",
                config.host, config.coordinator_name, config.coordinator
            );
            Ok(())
        })(),
        Command::Sim { command } => run_sim(command),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "bulwark-agent", &mut std::io::stdout());
            Ok(())
        }
        Command::Seed { command: SeedCommand::Export { vm, output, data_dir, sim_root, qemu_vm_dir } } => {
            seed_export(&vm, &output, data_dir, sim_root, qemu_vm_dir)
        }
        Command::Run { data_dir, sim_root, qemu_vm_dir, qemu_shared } => actix_rt::System::new()
            .block_on(run(
                AgentDir::new(data_dir),
                RunOptions { sim_root, qemu_vm_dir, qemu_shared },
                shutdown_signal(),
            ))
            .map_err(Into::into),
        Command::Qemu { command: QemuCommand::Command { vm_dir, vm, accel, memory_mib } } => {
            match crate::qemu::defs::VmDef::load(&vm_dir.join(format!("{vm}.toml"))) {
                Ok(def) => {
                    let line = crate::qemu::launch::command_line(&def, &accel, memory_mib);
                    let quoted: Vec<String> = line.iter().map(|a| crate::qemu::launch::shell_quote(a)).collect();
                    println!("{}", quoted.join(" "));
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Qemu { command: QemuCommand::Check { vm_dir } } => match crate::qemu::defs::check_dir(&vm_dir) {
            Ok(problems) if problems.is_empty() => {
                println!("{}: every VM definition is valid", vm_dir.display());
                Ok(())
            }
            Ok(problems) => {
                for p in &problems {
                    println!("{p}");
                }
                return ExitCode::from(1);
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.contains(&c) {
                    line = format!("{line}: {c}");
                }
            }
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}
