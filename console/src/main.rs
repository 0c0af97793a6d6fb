//! `bulwark`, the admin console: a client of the coordinator's admin API.
//!
//! It is also a multi-call launcher (DESIGN §2): `bulwark x-coordinator …` and
//! `bulwark x-agent …` run exactly what `bulwark-coordinator …` and `bulwark-agent …` run, so
//! the quickstart can start every daemon as a child process of this one executable.

#![forbid(unsafe_code)]

mod disk_output;
mod quickstart;

use anyhow::Context as _;
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{
    AdminRequest, AdminResponse, AgentInfo, BackupKind, GroupInfo, JobInfo, MaintenanceKind, PolicySpec,
    RecoveryOptions,
};
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
    /// Output format: `text` or `json` (for `recover-disk`: the file to write).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Coordinator name, version, agents connected, VMs protected, jobs running, store usage.
    Status,
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
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
    /// VMs the agents report, with their protection and replica state.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Protection groups: members and one policy.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Back a protected VM up now.
    Backup {
        vm: String,
        /// express-full (a recovery point) or sync (replica only).
        #[arg(long, value_enum, default_value = "express-full")]
        kind: BackupKindArg,
        /// Wait for the job and print it (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
    },
    /// Run a consistency check of a protected VM now.
    Cc {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Recovery points.
    Rp {
        #[command(subcommand)]
        command: RpCommand,
    },
    /// Recover a VM from a recovery point: onto the original VM (it must be off; only blocks
    /// that differ are written) or as a new VM on a host.
    Recover {
        vm: String,
        /// A recovery point id, a unique prefix of one, or `latest`.
        #[arg(long)]
        rp: String,
        #[arg(long, value_enum)]
        to: RecoverTo,
        /// With --to host: the host to create the VM on.
        #[arg(long, required_if_eq("to", "host"))]
        host: Option<String>,
        /// With --to host: the new VM's name (default VM-restored).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        options: RecoveryOpts,
    },
    /// Browse the files of a disk of a recovery point.
    Ls {
        vm: String,
        #[arg(long)]
        rp: String,
        #[arg(long)]
        disk: String,
        /// A directory or file (`/` is the disk; on a partitioned disk, `/p1/…`).
        #[arg(default_value = "/")]
        path: String,
    },
    /// Copy files and folders out of a recovery point into --output DIR (never outside it).
    RecoverItems {
        vm: String,
        #[arg(long)]
        rp: String,
        #[arg(long)]
        disk: String,
        /// A file or folder to recover (repeatable).
        #[arg(long = "path", required = true)]
        paths: Vec<String>,
        /// Recover to a directory on an enrolled host instead (with --dest).
        #[arg(long)]
        dest_host: Option<String>,
        #[arg(long, requires = "dest_host")]
        dest: Option<PathBuf>,
        /// Keep the guest's setuid, setgid and sticky bits and world-writable modes (by default
        /// they are dropped and the umask applies, as `tar` does for a non-owner).
        #[arg(long)]
        keep_modes: bool,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        options: RecoveryOpts,
    },
    /// Stream a disk of a recovery point into a local file.
    RecoverDisk {
        vm: String,
        /// A recovery point id, a unique prefix of one, or `latest`.
        #[arg(long)]
        rp: String,
        #[arg(long)]
        disk: String,
        /// Replace an existing regular file (never a device, link or other node).
        #[arg(long)]
        force: bool,
        /// Write onto an existing block device in place (its size must hold the disk).
        #[arg(long)]
        device: bool,
        #[command(flatten)]
        options: RecoveryOpts,
    },
    /// Seeds (manual replica creation from removable media).
    Seed {
        #[command(subcommand)]
        command: SeedCommand,
    },
    /// The whole story on loopback in one command.
    Quickstart {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        keep_running: bool,
    },
}

/// Recovery options (bandwidth throttling with a time window, e-mail when done).
#[derive(Debug, Clone, clap::Args)]
struct RecoveryOpts {
    /// Bandwidth limit, e.g. `10MiB/s`.
    #[arg(long)]
    limit: Option<String>,
    /// Apply --limit only between these times (coordinator local time), e.g. `08:00-18:00`.
    #[arg(long, requires = "limit")]
    window: Option<String>,
    /// E-mail this address when the recovery finishes or fails (`[smtp]` in coordinator.toml).
    #[arg(long)]
    notify: Option<String>,
}

impl RecoveryOpts {
    fn wire(&self) -> anyhow::Result<RecoveryOptions> {
        let limit_bps = self
            .limit
            .as_deref()
            .map(|r| bulwark_protocol::units::parse_rate(r).map_err(|e| anyhow::anyhow!("--limit {r:?}: {e}")))
            .transpose()?;
        let window = self
            .window
            .as_deref()
            .map(|w| {
                let (a, b) = w.split_once('-').with_context(|| format!("--window {w:?}: write HH:MM-HH:MM"))?;
                let t = |x: &str| {
                    bulwark_coordinator::policy::parse_hhmm(x.trim())
                        .with_context(|| format!("--window: {x:?} is not HH:MM"))
                };
                Ok::<_, anyhow::Error>((t(a)?, t(b)?))
            })
            .transpose()?;
        Ok(RecoveryOptions { limit_bps, window, notify: self.notify.clone() })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum RecoverTo {
    Original,
    Host,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackupKindArg {
    ExpressFull,
    Sync,
}

#[derive(Debug, Subcommand)]
enum SeedCommand {
    /// Load a seed written by `bulwark-agent seed export` as the VM's replica (inconsistent
    /// until a consistency check reconciles it with the source).
    Import { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Every VM the agents report.
    List,
}

#[derive(Debug, Subcommand)]
enum RpCommand {
    /// Recovery points of a VM, oldest first.
    List { vm: String },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a protection group; initial replication starts as chosen by --replica.
    Create {
        name: String,
        /// Member VMs (repeat, or separate with commas).
        #[arg(long = "vm", required = true, value_delimiter = ',')]
        vms: Vec<String>,
        /// Synchronization frequency (`15m`), or `off`.
        #[arg(long, default_value = "15m")]
        sync_every: String,
        /// Recovery-point times, `HH:MM,HH:MM,…` in the coordinator's local time, or `none`.
        #[arg(long, default_value = "08:00,12:00,20:00")]
        recovery_points: String,
        /// Run an express full just before each recovery point.
        #[arg(long)]
        express_full_before_rp: bool,
        /// How long recovery points are kept (`5days`).
        #[arg(long, default_value = "5days")]
        retention: String,
        /// Run a consistency check automatically when a replica becomes inconsistent.
        #[arg(long)]
        cc_when_inconsistent: bool,
        /// Also run a consistency check every day at this time (`HH:MM`).
        #[arg(long)]
        cc_at: Option<String>,
        /// Replica creation: `now`, `at:HH:MM` (off-peak) or `manual` (seed import).
        #[arg(long, default_value = "now")]
        replica: String,
        /// Block size (a power of two, 4KiB..16MiB).
        #[arg(long, default_value = "1MiB")]
        block_size: String,
    },
    /// Every group.
    List,
    /// One group, with its policy and next runs.
    Show { name: String },
    /// Add VMs to a group.
    AddVm { name: String, vms: Vec<String> },
    /// Remove VMs from a group (their replicas and recovery points are deleted unless --keep-data).
    RemoveVm {
        name: String,
        vms: Vec<String>,
        #[arg(long)]
        keep_data: bool,
    },
    /// Delete a group (members stop being protected; their data is kept).
    Delete { name: String },
    /// Disk allocation: data size, recommended space, free space, under-provisioning.
    Plan { name: String },
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
    let format = match (&cli.command, cli.output.as_str()) {
        (Command::RecoverDisk { .. } | Command::RecoverItems { dest_host: None, .. }, _) | (_, "text") => Output::Text,
        (_, "json") => Output::Json,
        (_, other) => {
            use clap::CommandFactory as _;
            Cli::command()
                .error(clap::error::ErrorKind::InvalidValue, format!("--output {other:?}: use text or json"))
                .exit()
        }
    };
    match run(cli, format) {
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

fn run(cli: Cli, format: Output) -> anyhow::Result<()> {
    let request = match &cli.command {
        Command::Quickstart { dir, keep_running } => return quickstart::run(dir.clone(), *keep_running),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(*shell, &mut Cli::command(), "bulwark", &mut std::io::stdout());
            return Ok(());
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
        Command::Vm { command: VmCommand::List } => AdminRequest::VmList,
        Command::Group { command } => group_request(command)?,
        Command::Backup { vm, kind, .. } => AdminRequest::Backup {
            vm: vm.clone(),
            kind: match kind {
                BackupKindArg::ExpressFull => BackupKind::ExpressFull,
                BackupKindArg::Sync => BackupKind::Sync,
            },
        },
        Command::Cc { vm, .. } => AdminRequest::ConsistencyCheck { vm: vm.clone() },
        Command::Recover { vm, rp, to, host, name, options, .. } => {
            if *to == RecoverTo::Original && (host.is_some() || name.is_some()) {
                anyhow::bail!("--host and --name go with --to host");
            }
            AdminRequest::Recover {
                vm: vm.clone(),
                rp: rp.clone(),
                to_host: if *to == RecoverTo::Host { host.clone() } else { None },
                name: name.clone(),
                options: options.wire()?,
            }
        }
        Command::Rp { command: RpCommand::List { vm } } => AdminRequest::RecoveryPoints { vm: vm.clone() },
        Command::Seed { command: SeedCommand::Import { dir } } => {
            let target = target(&cli)?;
            return seed_import(&target, dir, format);
        }
        Command::Ls { vm, rp, disk, path } => {
            AdminRequest::Ls { vm: vm.clone(), rp: rp.clone(), disk: disk.clone(), path: path.clone() }
        }
        Command::RecoverItems { vm, rp, disk, paths, dest_host: Some(host), dest, options, keep_modes, .. } => {
            let dest = dest.as_ref().context("--dest-host needs --dest DIR (a directory on that host)")?;
            AdminRequest::RecoverItemsToHost {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                paths: paths.clone(),
                host: host.clone(),
                dest: dest.display().to_string(),
                options: options.wire()?,
                keep_modes: *keep_modes,
            }
        }
        Command::RecoverItems { vm, rp, disk, paths, options, keep_modes, .. } => {
            // CONTRACT: `recover-items … --output DIR`: here the global flag names the directory.
            if cli.output == "text" {
                anyhow::bail!("recover-items needs --output DIR (or --dest-host HOST --dest DIR)");
            }
            let target = target(&cli)?;
            let req = AdminRequest::RecoverItems {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                paths: paths.clone(),
                options: options.wire()?,
            };
            let opts = bulwark_agent::items_writer::WriteOptions { keep_modes: *keep_modes };
            return recover_items(&target, req, std::path::Path::new(&cli.output), opts);
        }
        Command::RecoverDisk { vm, rp, disk, force, device, options } => {
            // CONTRACT: `recover-disk … --output FILE`: here the global flag names the file.
            if cli.output == "text" {
                anyhow::bail!("recover-disk needs --output FILE");
            }
            let target = target(&cli)?;
            let req = AdminRequest::RecoverDisk {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                options: options.wire()?,
            };
            let place = disk_output::Place::check(std::path::Path::new(&cli.output), *force, *device)?;
            return recover_disk(&target, req, place);
        }
    };
    let target = target(&cli)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let wait_for = match &cli.command {
        Command::Job { command: JobCommand::Wait { id } } => Some(*id),
        _ => None,
    };
    let wait_started = matches!(
        &cli.command,
        Command::Backup { wait: true, .. }
            | Command::Cc { wait: true, .. }
            | Command::Recover { wait: true, .. }
            | Command::RecoverItems { wait: true, .. }
    );
    let response = rt.block_on(async {
        let client = AdminClient::connect(&target).await?;
        let mut r = client.request(request).await;
        let wait_for = match (&r, wait_started) {
            (Ok(AdminResponse::JobStarted { job_id }), true) => {
                let id = *job_id;
                r = client.request(AdminRequest::JobShow { id }).await;
                Some(id)
            }
            _ => wait_for,
        };
        if let Some(id) = wait_for {
            // Poll until the job is final, showing its progress on stderr.
            let mut progress = Progress::new(id);
            while let Ok(AdminResponse::Job(j)) = &r {
                if is_final(j) {
                    break;
                }
                progress.show(j);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                r = client.request(AdminRequest::JobShow { id }).await;
            }
            progress.finish();
        }
        client.close().await;
        r
    })?;
    print(format, &response);
    // Waiting for a job makes its failure the command's (`job show` only reports it).
    let waited = !matches!(&cli.command, Command::Job { command: JobCommand::Show { .. } });
    if let (AdminResponse::Job(j), true) = (&response, waited) {
        if j.state == "failed" {
            anyhow::bail!("job {} ({}) failed: {}", j.id, j.kind, j.error.as_deref().unwrap_or("no reason recorded"));
        }
    }
    Ok(())
}

fn group_request(command: &GroupCommand) -> anyhow::Result<AdminRequest> {
    Ok(match command {
        GroupCommand::Create {
            name,
            vms,
            sync_every,
            recovery_points,
            express_full_before_rp,
            retention,
            cc_when_inconsistent,
            cc_at,
            replica,
            block_size,
        } => {
            let sync_every_secs = match sync_every.as_str() {
                "off" | "never" => None,
                d => Some(
                    humantime::parse_duration(d)
                        .with_context(|| format!("--sync-every {d:?}: not a duration"))?
                        .as_secs(),
                ),
            };
            let recovery_points = match recovery_points.as_str() {
                "none" | "" => vec![],
                list => list
                    .split(',')
                    .map(|t| {
                        bulwark_coordinator::policy::parse_hhmm(t.trim())
                            .with_context(|| format!("--recovery-points: {t:?} is not HH:MM"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let cc_at = cc_at
                .as_deref()
                .map(|t| {
                    bulwark_coordinator::policy::parse_hhmm(t).with_context(|| format!("--cc-at {t:?} is not HH:MM"))
                })
                .transpose()?;
            let retention_secs =
                humantime::parse_duration(retention).with_context(|| format!("--retention {retention:?}"))?.as_secs();
            let block_size = bulwark_protocol::units::parse_size(block_size)
                .map_err(|e| anyhow::anyhow!("--block-size {block_size:?}: {e}"))?;
            AdminRequest::GroupCreate {
                name: name.clone(),
                vms: vms.clone(),
                policy: PolicySpec {
                    sync_every_secs,
                    recovery_points,
                    express_full_before_rp: *express_full_before_rp,
                    retention_secs,
                    cc_when_inconsistent: *cc_when_inconsistent,
                    cc_at,
                    replica_creation: replica.clone(),
                    block_size: u32::try_from(block_size).context("--block-size is too large")?,
                },
            }
        }
        GroupCommand::List => AdminRequest::GroupList,
        GroupCommand::Show { name } => AdminRequest::GroupShow { name: name.clone() },
        GroupCommand::AddVm { name, vms } => AdminRequest::GroupAddVm { name: name.clone(), vms: vms.clone() },
        GroupCommand::RemoveVm { name, vms, keep_data } => {
            AdminRequest::GroupRemoveVm { name: name.clone(), vms: vms.clone(), keep_data: *keep_data }
        }
        GroupCommand::Delete { name } => AdminRequest::GroupDelete { name: name.clone() },
        GroupCommand::Plan { name } => AdminRequest::GroupPlan { name: name.clone() },
    })
}

/// `seed import DIR`: each disk's non-zero blocks, checked against the manifest's digest first.
fn seed_import(target: &AdminTarget, dir: &std::path::Path, format: Output) -> anyhow::Result<()> {
    use bulwark_protocol::transfer::{self, TransferMessage};
    use std::io::Read as _;
    let manifest = bulwark_agent::seed::read_manifest(dir)?;
    for d in &manifest.disks {
        let path = dir.join(&d.file);
        let digest = bulwark_agent::seed::image_digest(&path)?;
        anyhow::ensure!(digest == d.blake3, "{} does not match its manifest (damaged seed?)", path.display());
        let len = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.len();
        anyhow::ensure!(len == d.size_bytes, "{} is {len} bytes, the manifest says {}", path.display(), d.size_bytes);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut messages = vec![];
    rt.block_on(async {
        let client = AdminClient::connect(target).await?;
        for d in &manifest.disks {
            let req = AdminRequest::SeedImport {
                vm: manifest.vm.clone(),
                disk: d.name.clone(),
                size_bytes: d.size_bytes,
                source: format!("seed {} (exported {})", dir.display(), fmt_time(Some(manifest.created_at))),
            };
            let (head, mut send, recv) = client.request_upload(req).await?;
            let AdminResponse::SeedReady { block_size } = head else { anyhow::bail!("unexpected answer: {head:?}") };
            let bs = block_size as usize;
            let path = dir.join(&d.file);
            let mut f = std::io::BufReader::with_capacity(bs, std::fs::File::open(&path)?);
            let mut buf = vec![0u8; bs];
            let (mut index, mut sent) = (0u64, 0u64);
            loop {
                let mut n = 0;
                while n < bs {
                    let r = f.read(&mut buf[n..]).with_context(|| format!("{}", path.display()))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 {
                    break;
                }
                if !bulwark_protocol::block::is_zero(&buf[..n]) {
                    let id = bulwark_protocol::block::ChunkHasher::plain().hash(&buf[..n]);
                    transfer::write_body(&mut send, &transfer::block_body(index, &id, &buf[..n]), bs).await?;
                    sent += 1;
                }
                index += 1;
            }
            transfer::write_message(&mut send, &TransferMessage::End { blocks_sent: sent, bytes_read: 0 }, bs).await?;
            let _ = send.finish();
            match client.finish_upload(recv).await? {
                AdminResponse::Done { message } => messages.push(message),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
        client.close().await;
        Ok(())
    })?;
    match format {
        Output::Json => println!("{}", serde_json::json!({ "vm": manifest.vm, "disks": messages })),
        Output::Text => messages.iter().for_each(|m| println!("{m}")),
    }
    Ok(())
}

/// `recover-items --output DIR`.
fn recover_items(
    target: &AdminTarget,
    req: AdminRequest,
    dir: &std::path::Path,
    opts: bulwark_agent::items_writer::WriteOptions,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (rp, w) = rt.block_on(async {
        let client = AdminClient::connect(target).await?;
        let (head, mut recv) = client.request_stream(req).await?;
        let AdminResponse::ItemsStream { rp } = head else { anyhow::bail!("unexpected answer: {head:?}") };
        let w = bulwark_agent::items_writer::write_items(&mut recv, dir, opts).await?;
        client.close().await;
        Ok::<_, anyhow::Error>((rp, w))
    })?;
    println!(
        "recovered {} file(s), {} folder(s), {} link(s), {} bytes from recovery point {rp} into {}{}",
        w.files,
        w.dirs,
        w.links,
        w.bytes,
        dir.display(),
        if w.skipped_count > 0 { format!("; {} entr(ies) skipped", w.skipped_count) } else { String::new() }
    );
    for s in w.skipped_lines() {
        println!("skipped {s}");
        eprintln!("warning: skipped {s}");
    }
    Ok(())
}

/// `recover-disk`: the disk's blocks into the place checked by [`disk_output::Place::check`]
/// (a new or replaced file through `FILE.partial`, or a block device in place). SIGINT and
/// SIGTERM end it with the partial file removed.
fn recover_disk(target: &AdminTarget, req: AdminRequest, place: disk_output::Place) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (rp, disk, size) = rt.block_on(async {
        // Signals are caught before anything is created, so none can leave a partial file.
        let mut interrupted = disk_output::Interrupted::catch()?;
        let work = async {
            let client = AdminClient::connect(target).await?;
            let (head, mut recv) = client.request_stream(req).await?;
            let AdminResponse::DiskStream { rp, disk, size_bytes, block_size } = head else {
                anyhow::bail!("unexpected answer: {head:?}");
            };
            let out = place.open(size_bytes)?;
            let r = async {
                bulwark_coordinator::admin_client::receive_disk(
                    &mut recv,
                    size_bytes,
                    block_size,
                    out.file(),
                    out.needs_zeros(),
                )
                .await?;
                out.finish()
            }
            .await;
            client.close().await;
            r.map(|()| (rp, disk, size_bytes))
        };
        tokio::select! {
            r = work => r,
            sig = interrupted.next() => Err(anyhow::anyhow!("{}", place.interrupted(sig))),
        }
    })?;
    println!("disk {disk} of recovery point {rp} ({size} bytes) written to {}", place.path().display());
    Ok(())
}

/// Progress of a job being waited for: an indicatif bar on a terminal, a plain line every
/// few seconds otherwise (logs, CI).
struct Progress {
    id: u64,
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last_line: Option<std::time::Instant>,
    last_state: String,
}

impl Progress {
    fn new(id: u64) -> Self {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "job {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b.set_message(id.to_string());
            b
        });
        Self { id, bar, started: std::time::Instant::now(), last_line: None, last_state: String::new() }
    }

    fn show(&mut self, j: &JobInfo) {
        let done = j.bytes_transferred;
        match &self.bar {
            Some(b) => {
                b.set_length(j.bytes_total.unwrap_or(done).max(done));
                b.set_position(done);
            }
            None => {
                // A line when the state changes, and every 5 s.
                let quiet = self.last_line.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(5));
                if quiet && j.state == self.last_state {
                    return;
                }
                self.last_state = j.state.clone();
                self.last_line = Some(std::time::Instant::now());
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / secs;
                let eta = match j.bytes_total {
                    Some(t) if rate > 0.0 && t > done => {
                        format!(
                            ", ETA {}",
                            humantime::format_duration(std::time::Duration::from_secs(
                                ((t - done) as f64 / rate) as u64
                            ))
                        )
                    }
                    _ => String::new(),
                };
                let total = j.bytes_total.map(|t| format!(" of {}", fmt_size(t))).unwrap_or_default();
                eprintln!("job {} {}: {}{total} ({}/s{eta})", self.id, j.state, fmt_size(done), fmt_size(rate as u64));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
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
        "bytes_total": j.bytes_total,
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

fn fmt_size(n: u64) -> String {
    bulwark_protocol::units::format_size(n)
}

fn group_json(g: &GroupInfo) -> serde_json::Value {
    let p = &g.policy;
    let hhmm = |t: &u16| bulwark_coordinator::policy::format_hhmm(*t);
    serde_json::json!({
        "name": g.name,
        "members": g.members,
        "sync_every": p.sync_every_secs.map(|s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string()),
        "recovery_points": p.recovery_points.iter().map(hhmm).collect::<Vec<_>>(),
        "express_full_before_rp": p.express_full_before_rp,
        "retention": humantime::format_duration(std::time::Duration::from_secs(p.retention_secs)).to_string(),
        "cc_when_inconsistent": p.cc_when_inconsistent,
        "cc_at": p.cc_at.as_ref().map(hhmm),
        "replica": p.replica_creation,
        "block_size": p.block_size,
        "next_runs": g.next_runs.iter().map(|(k, at)| (k.clone(), serde_json::Value::String(fmt_time(Some(*at))))).collect::<serde_json::Map<_, _>>(),
    })
}

fn print_group(g: &GroupInfo) {
    let p = &g.policy;
    println!("group {}", g.name);
    println!("  members            {}", g.members.join(", "));
    let every = p
        .sync_every_secs
        .map_or("off".into(), |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string());
    println!("  synchronization    every {every}");
    let rps: Vec<String> = p.recovery_points.iter().map(|t| bulwark_coordinator::policy::format_hhmm(*t)).collect();
    println!("  recovery points    {}", if rps.is_empty() { "none".into() } else { rps.join(", ") });
    println!("  retention          {}", humantime::format_duration(std::time::Duration::from_secs(p.retention_secs)));
    println!("  replica creation   {}", p.replica_creation);
    println!("  block size         {}", fmt_size(u64::from(p.block_size)));
    for (kind, at) in &g.next_runs {
        println!("  next {kind:<13} {}", fmt_time(Some(*at)));
    }
}

fn agent_json(a: &AgentInfo) -> serde_json::Value {
    serde_json::json!({
        "host": a.host.as_str(),
        "cluster": a.cluster,
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
            println!(
                "{:<24} {:<24} {:<10} {:<22} {:<34} {:>4}",
                "HOST", "CLUSTER", "STATE", "LAST SEEN", "CERT SERIAL", "VMS"
            );
            for a in list {
                let state = if a.revoked {
                    "revoked"
                } else if a.connected {
                    "connected"
                } else {
                    "offline"
                };
                println!(
                    "{:<24} {:<24} {:<10} {:<22} {:<34} {:>4}",
                    a.host,
                    a.cluster,
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
        (Output::Json, AdminResponse::Vms(list)) => println!(
            "{}",
            serde_json::Value::Array(
                list.iter()
                    .map(|v| serde_json::json!({
                        "id": v.id, "name": v.name, "host": v.host, "state": v.state, "os": v.os,
                        "group": v.group, "replica_state": v.replica_state, "replica_reason": v.replica_reason,
                        "excluded_bytes": v.excluded_bytes,
                        "disks": v.disks.iter().map(|d| serde_json::json!({"name": d.name.as_str(), "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
                    }))
                    .collect()
            )
        ),
        (Output::Text, AdminResponse::Vms(list)) => {
            println!("{:<20} {:<16} {:<8} {:<8} {:<14} {:<13}", "VM", "HOST", "STATE", "OS", "GROUP", "REPLICA");
            for v in list {
                let reason = v.replica_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                println!(
                    "{:<20} {:<16} {:<8} {:<8} {:<14} {}{}",
                    v.name,
                    v.host,
                    v.state,
                    v.os,
                    v.group.as_deref().unwrap_or("-"),
                    v.replica_state,
                    reason
                );
            }
        }
        (Output::Json, AdminResponse::Group(g)) => println!("{}", group_json(g)),
        (Output::Text, AdminResponse::Group(g)) => print_group(g),
        (Output::Json, AdminResponse::Groups(list)) => {
            println!("{}", serde_json::Value::Array(list.iter().map(group_json).collect()))
        }
        (Output::Text, AdminResponse::Groups(list)) => {
            for g in list {
                print_group(g);
            }
        }
        (Output::Json, AdminResponse::Plan(p)) => println!(
            "{}",
            serde_json::json!({
                "total_data_bytes": p.total_data_bytes, "recommended_bytes": p.recommended_bytes,
                "free_bytes": p.free_bytes, "underprovisioned_bytes": p.underprovisioned_bytes,
                "churn_per_day": p.churn_per_day, "retention_days": p.retention_days,
            })
        ),
        (Output::Text, AdminResponse::Plan(p)) => {
            println!("data              {}", fmt_size(p.total_data_bytes));
            println!(
                "recommended       {} (data × (1 + {:.0}% churn/day × {:.1} days))",
                fmt_size(p.recommended_bytes),
                p.churn_per_day * 100.0,
                p.retention_days
            );
            println!("free              {}", fmt_size(p.free_bytes));
            println!("underprovisioned  {}", fmt_size(p.underprovisioned_bytes));
        }
        (Output::Json, AdminResponse::RecoveryPoints(list)) => println!(
            "{}",
            serde_json::Value::Array(
                list.iter()
                    .map(|r| serde_json::json!({
                        "id": r.id, "vm": r.vm, "created_at": fmt_time(Some(r.created_at / 1000)),
                        "consistency": r.consistency,
                        "disks": r.disks.iter().map(|d| serde_json::json!({"name": d.name.as_str(), "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
                        "logical_bytes": r.logical_bytes, "stored_bytes": r.stored_bytes,
                    }))
                    .collect()
            )
        ),
        (Output::Text, AdminResponse::RecoveryPoints(list)) => {
            println!("{:<34} {:<22} {:<11} {:>12} {:>12}", "ID", "CREATED", "CONSISTENCY", "LOGICAL", "STORED");
            for r in list {
                println!(
                    "{:<34} {:<22} {:<11} {:>12} {:>12}",
                    r.id,
                    fmt_time(Some(r.created_at / 1000)),
                    r.consistency,
                    fmt_size(r.logical_bytes),
                    fmt_size(r.stored_bytes)
                );
            }
        }
        (Output::Json, AdminResponse::Items(list)) => println!(
            "{}",
            serde_json::Value::Array(
                list.iter()
                    .map(|i| serde_json::json!({
                        "path": i.path, "kind": i.kind, "size": i.size,
                        "mtime": fmt_time(u64::try_from(i.mtime).ok()), "mode": format!("{:o}", i.mode), "target": i.target,
                    }))
                    .collect()
            )
        ),
        (Output::Text, AdminResponse::Items(list)) => {
            for i in list {
                let link = i.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
                println!("{:<9} {:>6o} {:>12} {:<22} {}{link}", i.kind, i.mode, i.size, fmt_time(u64::try_from(i.mtime).ok()), i.path);
            }
        }
        (Output::Json, AdminResponse::Done { message }) => println!("{}", serde_json::json!({ "message": message })),
        (Output::Text, AdminResponse::Done { message }) => println!("{message}"),
        (_, other) => println!("{other:?}"),
    }
}
