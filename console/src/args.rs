//! The console's command line: every command and option, as clap parses them.

use crate::lists::PageArgs;
use anyhow::Context as _;
use bulwark_protocol::messages::RecoveryOptions;
use bulwark_protocol::HostId;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// What a command prints.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub(crate) enum Output {
    #[default]
    Text,
    Json,
}

/// Bulwark admin console.
#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about)]
pub(crate) struct Cli {
    /// A coordinator's data directory (address and admin certificate are taken from it).
    #[arg(long, global = true, env = "BULWARK_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The coordinator's address, with --ca, --cert and --key (instead of --data-dir).
    #[arg(long, global = true)]
    pub(crate) coordinator: Option<SocketAddr>,
    /// The deployment CA certificate (PEM).
    #[arg(long, global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// The admin certificate (PEM).
    #[arg(long, global = true)]
    pub(crate) cert: Option<PathBuf>,
    /// The admin key (PEM).
    #[arg(long, global = true)]
    pub(crate) key: Option<PathBuf>,
    /// The coordinator's TLS name (defaults to the host part of --coordinator).
    #[arg(long, global = true)]
    pub(crate) server_name: Option<String>,
    /// Output format: `text` or `json` (for `recover-disk`: the file to write).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub(crate) output: String,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
        /// With --to host on a QEMU host: the new VM's disks are overlays backed by the
        /// recovery point, which the host's agent serves; it can start at once.
        #[arg(long)]
        instant: bool,
        /// With --instant: once the VM is made, copy the rest right away (waits).
        #[arg(long, requires = "instant")]
        finish: bool,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        options: RecoveryOpts,
    },
    /// End an instant recovery: its host copies the rest of the VM's disks (under the running
    /// VM, or offline) and the VM no longer depends on the recovery point. Waits.
    RecoverFinish {
        /// The recovered VM's name.
        vm: String,
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
        #[command(flatten)]
        page: PageArgs,
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
    /// Serve a disk of a recovery point as an NBD export on this machine until Ctrl-C
    /// (qemu-img, qemu-nbd, QEMU, the kernel's nbd client read it).
    Mount {
        vm: String,
        /// A recovery point id, a unique prefix of one, or `latest`.
        #[arg(long)]
        rp: String,
        /// The disk to serve (needed when the point has more than one).
        #[arg(long)]
        disk: Option<String>,
        /// Where to serve: unix:PATH (a new socket, mode 0600; never an existing path) or
        /// tcp:HOST:PORT (TLS only, with a certificate of the deployment for HOST).
        #[arg(long)]
        nbd: String,
        /// Over TCP: an enrolled host whose certificate may read the export (repeatable).
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Take writes into a throw-away overlay (the recovery point never changes).
        #[arg(long)]
        writable: bool,
        /// Where the overlay's unlinked file lives (default: the temporary directory).
        #[arg(long, requires = "writable")]
        overlay_dir: Option<PathBuf>,
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
pub(crate) struct RecoveryOpts {
    /// Bandwidth limit, e.g. `10MiB/s`.
    #[arg(long)]
    pub(crate) limit: Option<String>,
    /// Apply --limit only between these times (coordinator local time), e.g. `08:00-18:00`.
    #[arg(long, requires = "limit")]
    pub(crate) window: Option<String>,
    /// E-mail this address when the recovery finishes or fails (`[smtp]` in coordinator.toml).
    #[arg(long)]
    pub(crate) notify: Option<String>,
}

impl RecoveryOpts {
    pub(crate) fn wire(&self) -> anyhow::Result<RecoveryOptions> {
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
pub(crate) enum RecoverTo {
    Original,
    Host,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum BackupKindArg {
    ExpressFull,
    Sync,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SeedCommand {
    /// Load a seed written by `bulwark-agent seed export` as the VM's replica (inconsistent
    /// until a consistency check reconciles it with the source).
    Import { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VmCommand {
    /// Every VM the agents report, with its identity (UUID, cluster) and status.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Forget a VM that vanished (`missing`) or was replaced: its record and identity go, its
    /// recovery points stay until retention removes them. Refused while it is in a group.
    Forget { vm: String },
    /// Take a VM over from the coordinator that owns it (one gone for good, say): its host
    /// writes a new claim with the next epoch, and the old owner's requests are refused from
    /// then on (it shows the VM as `lost`).
    #[command(name = "take-over")]
    TakeOver { vm: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RpCommand {
    /// Recovery points of a VM, oldest first.
    List {
        vm: String,
        #[command(flatten)]
        page: PageArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a protection group; initial replication starts as chosen by --replica.
    #[command(group(clap::ArgGroup::new("members").required(true).args(["vms", "auto"])))]
    Create {
        name: String,
        /// Member VMs (repeat, or separate with commas).
        #[arg(long = "vm", value_delimiter = ',')]
        vms: Vec<String>,
        /// With --auto: the cluster whose every VM the group protects, new ones too,
        /// partitioned among the deployment's coordinators.
        #[arg(long, requires = "auto")]
        cluster: Option<bulwark_protocol::ClusterId>,
        /// Protect the whole --cluster (VMs no coordinator claimed yet go to the one rendezvous
        /// hashing picks among those protecting it).
        #[arg(long, requires = "cluster")]
        auto: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Change a group's policy: any flag of `group create`; what is not given stays. Schedules
    /// it changes are planned afresh at the next tick; a new block size applies to members
    /// added from now on.
    Set {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Protect a disk left out before (`VM:DISK`; repeat or separate with commas).
        #[arg(long, value_delimiter = ',')]
        include_disk: Vec<String>,
    },
    /// Every group.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// One group, with its policy and next runs (--limit/--after page its members).
    Show {
        name: String,
        #[command(flatten)]
        page: PageArgs,
    },
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

/// A group's policy flags (`group create`, `group set`). Unset: the default at creation,
/// unchanged for `set`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PolicyArgs {
    /// Synchronize every DURATION (`15m`), or `off`. Turns --express-full-before-rp off.
    /// Default: no interval synchronization (express fulls at the recovery points).
    #[arg(long, conflicts_with = "express_full_before_rp")]
    pub sync_every: Option<String>,
    /// Recovery-point times, `HH:MM,HH:MM,…` in the coordinator's local time, or `none`
    /// (default 08:00,12:00,20:00).
    #[arg(long)]
    pub recovery_points: Option<String>,
    /// Synchronize only by an express full at each recovery-point time (the default for new
    /// groups: each synchronization freezes or pauses the guest).
    #[arg(long)]
    pub express_full_before_rp: bool,
    /// How long recovery points are kept (default `5days`).
    #[arg(long)]
    pub retention: Option<String>,
    /// Run a consistency check automatically when a replica becomes inconsistent (the default).
    #[arg(long, conflicts_with = "no_cc_when_inconsistent")]
    pub cc_when_inconsistent: bool,
    /// Do not run consistency checks by themselves when a replica becomes inconsistent.
    #[arg(long)]
    pub no_cc_when_inconsistent: bool,
    /// Also run a consistency check every day at this time (`HH:MM`), or `off`.
    #[arg(long)]
    pub cc_at: Option<String>,
    /// Replica creation: `now` (default), `at:HH:MM` (off-peak) or `manual` (seed import).
    #[arg(long)]
    pub replica: Option<String>,
    /// Block size of new members' replicas (a power of two, 4KiB..16MiB; default 1MiB).
    #[arg(long)]
    pub block_size: Option<String>,
    /// Read recovery points back and check them against the agent's block digests:
    /// `every-rp`, `daily` (each member's newest, once a day) or `off` (default).
    #[arg(long)]
    pub verify: Option<String>,
    /// Leave a disk out of protection (`VM:DISK`; repeat or separate with commas), like a
    /// scratch or resource disk: never copied, not in recovery points.
    #[arg(long, value_delimiter = ',')]
    pub exclude_disk: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Jobs, oldest first.
    List {
        #[arg(long)]
        vm: Option<String>,
        /// queued, running, succeeded, failed, cancelled
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// One job.
    Show { id: u64 },
    /// Wait until a job has finished; exit 1 if it failed.
    Wait { id: u64 },
    /// Cancel a queued or running job: a running one stops where it is and commits nothing
    /// (an interrupted synchronization or express full leaves the replica inconsistent).
    Cancel { id: u64 },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Every enrolled agent, connected or not.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a host's certificate: its connections are closed and refused from then on.
    Revoke { host: HostId },
}
