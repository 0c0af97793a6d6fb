//! The messages of each stream kind.
//!
//! Streams on an agent connection (ALPN `bulwark/1`):
//! - the **control stream**: the first bidirectional stream the agent opens. The agent sends
//!   [`AgentMessage`]s, the coordinator answers with [`CoordinatorMessage`]s. It starts with
//!   [`Hello`] → [`Welcome`] (or [`CoordinatorMessage::Refused`]).
//! - **block streams**: unidirectional, one per transfer; see [`crate::block`].
//!
//! On an admin connection (ALPN `bulwark/1`, admin certificate) every request is one
//! bidirectional stream: one [`AdminRequest`] frame, one [`AdminResponse`] frame. List
//! requests carry a [`PageRequest`] and are answered one [`Page`] at a time ([`crate::paging`]).
//!
//! On an enrollment connection (ALPN `bulwark-enroll/1`, no client certificate) the agent sends
//! one [`EnrollRequest`] and gets one [`EnrollResponse`].
//!
//! Every type here is encoded by [`crate::codec`]; none uses `serde(flatten)`, untagged enums or
//! dynamic values, which bincode cannot carry.

use crate::ids::{ClusterId, DiskId, HostId, JobId, RecoveryPointId, VmId};
use crate::ownership::{ClaimMode, Owner};
use crate::paging::{Page, PageRequest};
use serde::{Deserialize, Serialize};

/// First message of an agent: who it says it is and which versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The host the agent claims to be; must equal its certificate's identity.
    pub host: HostId,
    /// The agent's software version, for `agent list` and logs.
    pub agent_version: String,
}

/// The coordinator's acceptance of a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The coordinator's name (its certificate's identity).
    pub coordinator: String,
    /// Seconds between heartbeats the coordinator expects.
    pub heartbeat_secs: u32,
    /// The deployment's coordinators this one knows (itself included): the agent keeps a
    /// connection to each.
    pub coordinators: Vec<CoordinatorAddr>,
}

/// A coordinator of the deployment: its name (the TLS server name of its certificate) and the
/// address agents dial.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CoordinatorAddr {
    pub name: String,
    pub addr: String,
}

/// Most coordinators one deployment lists (a longer list from a peer is refused).
pub const MAX_COORDINATORS: usize = 64;

/// Power state of a VM as the hypervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerState {
    Running,
    Paused,
    Off,
}

/// Guest operating system family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestOs {
    Linux,
    Windows,
}

/// One disk of a VM as inventoried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub name: DiskId,
    pub size_bytes: u64,
}

/// One VM as inventoried by the agent of the host it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: VmId,
    pub name: String,
    pub power: PowerState,
    pub os: GuestOs,
    pub integration_services: bool,
    pub disks: Vec<DiskInfo>,
    /// The generation of the VM's change tracking; it moves when tracking is lost (host
    /// crash, storage migration), which tells the coordinator a consistency check is due.
    pub change_generation: Option<u64>,
    /// The VM's ownership claim on the cluster's shared storage (protocol 10; `None`: no
    /// coordinator claimed it yet).
    pub owner: Option<Owner>,
}

/// The full list of VMs on the agent's host, sent after the welcome and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: Vec<VmInfo>,
    /// The deployment's coordinators alive for this agent (connected now), sorted: an
    /// unclaimed VM goes to the one rendezvous hashing picks among them
    /// (`ownership::rendezvous`). Empty until the agent has tried every coordinator it knows
    /// once, so a coordinator that connects first does not take every VM.
    pub partition: Vec<String>,
}

/// The kinds of work the coordinator asks an agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Initial,
    Sync,
    ExpressFull,
    ConsistencyCheck,
    Recovery,
}

/// Consistency a snapshot achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    App,
    Filesystem,
    Crash,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::App => "app",
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
        }
    }
}

/// A change token: "changes since" it are what the hypervisor tracked after the snapshot it
/// was issued with, as long as the generation is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChangeToken {
    pub generation: u64,
    pub sequence: u64,
}

impl std::fmt::Display for ChangeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.generation, self.sequence)
    }
}

/// One disk of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskJob {
    pub disk: DiskId,
    /// The token the coordinator's replica of this disk is current with (None: no replica).
    pub token: Option<ChangeToken>,
    /// Block ranges `[start, end)` a synchronization or express full leaves out (swap).
    pub exclude: Vec<(u64, u64)>,
    /// What `exclude` was found from: blocks and their ids. The agent leaves nothing out unless
    /// every one of these blocks of the snapshot still has that id (the swap layout is then the
    /// one the scan saw).
    pub witness: Vec<(u64, crate::block::Digest)>,
}

/// A job the coordinator hands to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job: JobId,
    pub vm: VmId,
    pub kind: JobKind,
    pub block_size: u32,
    pub disks: Vec<DiskJob>,
    /// The key block ids are computed with (an encrypted store), so both sides agree on ids.
    pub id_key: Option<[u8; 32]>,
    /// How long the agent keeps the snapshot without hearing from the coordinator.
    pub lease_secs: u32,
    /// How many of the disks the agent sends at once (0 reads as 1; at most
    /// [`MAX_PARALLEL_DISKS`]).
    pub parallel_disks: u8,
    /// The epoch of the coordinator's claim on the VM (protocol 10; 0: it holds none yet, and
    /// the agent claims the VM for it first). See [`crate::ownership`].
    pub epoch: u64,
}

/// The most disks of one job sent and received at once, whatever a request or a configuration
/// says.
pub const MAX_PARALLEL_DISKS: u8 = 8;

/// A recovery onto a VM: the agent hashes the VM's current disks, the coordinator sends only
/// the blocks that differ from the recovery point (transfer streams in `Restore` mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub job: JobId,
    /// The VM to write (the original, or the new one to create).
    pub vm: VmId,
    /// Create the VM first (alternate-location recovery), with these properties.
    pub create: Option<NewVm>,
    pub disks: Vec<DiskInfo>,
    pub block_size: u32,
    pub id_key: Option<[u8; 32]>,
    pub lease_secs: u32,
    /// The recovery point's VM definition (empty: none kept): what a created VM is made from,
    /// and what the original VM's settings return to.
    pub config: Vec<u8>,
    /// Instant recovery (protocol 9; with `create` only): the new VM's disks are overlays
    /// backed by exports the agent serves from `Export` streams; nothing is copied now.
    pub instant: bool,
    /// The epoch of the coordinator's claim on the VM written (protocol 10; 0: none yet). A
    /// VM created by the recovery is claimed for the coordinator.
    pub epoch: u64,
}

/// The most bytes of VM definition a recovery point keeps.
pub const MAX_VM_CONFIG: usize = 64 * 1024;

/// A VM an alternate-location recovery creates (powered off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVm {
    pub os: GuestOs,
    pub integration_services: bool,
}

/// Why an agent could not do a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The hypervisor refused the snapshot (an unhealthy replica VM, say).
    Refused,
    /// Changes since the replica's token are unknown: a consistency check is needed.
    TrackingLost,
    /// The VM is not on this host (it migrated).
    NotHere,
    /// Another coordinator owns the VM, or this coordinator's claim is stale (protocol 10).
    NotOwner,
    /// Anything else; the job may be retried.
    Other,
}

/// How a job ended on the agent's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    Succeeded {
        consistency: Consistency,
        /// Why the consistency is lower than the guest could give, when it is.
        consistency_note: Option<String>,
        bytes_read: u64,
        blocks_sent: u64,
        /// The token the replica is current with once the coordinator has committed.
        next_token: ChangeToken,
        /// The VM's definition at the snapshot (the sim's `vm.toml`, the QEMU definition):
        /// kept with the recovery point, at most [`MAX_VM_CONFIG`] bytes (empty: none).
        config: Vec<u8>,
    },
    /// A recovery wrote the VM's disks (or an item recovery its files).
    Restored {
        bytes_read: u64,
        bytes_written: u64,
        /// Entries an item recovery skipped, each with its reason (protocol 3; at most
        /// a hundred lines, the last one counting the rest).
        skipped: Vec<String>,
    },
    Failed {
        kind: FailureKind,
        reason: String,
    },
}

/// The agent's report of a finished job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: JobId,
    pub outcome: JobOutcome,
}

/// Agent → coordinator on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    Inventory(Inventory),
    JobResult(JobResult),
    Heartbeat,
    /// The inventory as it is now, answering [`CoordinatorMessage::InventoryNow`].
    InventoryAnswer(Inventory),
    /// The claim on `vm` as it is after a claim request, or a job that claimed the VM or was
    /// refused for its claim (protocol 10); `refused` says why a request was not granted.
    Claim {
        vm: VmId,
        owner: Option<Owner>,
        refused: Option<String>,
        /// The answer to a [`CoordinatorMessage::Claim`] (not a job's claim).
        requested: bool,
    },
}

/// Coordinator → agent on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    /// The coordinator will not talk to this agent; the connection closes after this.
    Refused {
        reason: String,
    },
    JobRequest(JobRequest),
    RestoreRequest(RestoreRequest),
    /// Item-level recovery onto this host: open an `Items` transfer stream for `job` and write
    /// what arrives under `dest` (an absolute directory).
    ItemsRequest {
        job: JobId,
        dest: String,
        /// Keep the guest's setuid/setgid/sticky and world-writable bits (protocol 3).
        keep_modes: bool,
    },
    /// The coordinator's verdict on a job the agent reported: `committed` advances the change
    /// token and releases the snapshot; otherwise the snapshot is released and its changes
    /// are kept for the next run.
    JobDone {
        job: JobId,
        committed: bool,
    },
    Heartbeat,
    /// Report the inventory now, as [`AgentMessage::InventoryAnswer`]: the coordinator's view
    /// disagrees with an administrator's request (a VM created or powered off a moment ago).
    InventoryNow,
    /// Instant recovery `job` made VM `vm` on this host: copy the rest of its disks into their
    /// overlays (under the running VM, or offline) and stop serving its exports; answer with a
    /// `JobResult` for `job` (protocol 9).
    InstantFinish {
        job: JobId,
        vm: VmId,
    },
    /// The deployment's coordinators changed (one joined): the agent connects to those it
    /// does not know yet (protocol 11).
    Coordinators {
        list: Vec<CoordinatorAddr>,
    },
    /// Claim VM `vm` of this host for this coordinator (protocol 10): acquire it, or take it
    /// over (`bulwark vm take-over`); answered with [`AgentMessage::Claim`].
    Claim {
        vm: VmId,
        mode: ClaimMode,
    },
}

/// Admin console → coordinator: one per bidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEnvelope {
    /// The console's protocol version; refused with a clear error when unsupported.
    pub version: u16,
    pub request: AdminRequest,
}

/// What the admin console can ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The CRL this coordinator serves with (coordinators that joined the deployment fetch the
    /// first one's, protocol 11).
    Crl,
    Status,
    AgentList {
        page: PageRequest,
    },
    AgentRevoke {
        host: HostId,
    },
    /// A one-time join token valid for `ttl_secs` (at most the coordinator's cap). At least one
    /// of `host` and `cluster`: `host` alone enrolls that host (standalone: its own cluster),
    /// `cluster` alone a new host of that cluster, both that host in that cluster. `replace`
    /// names the enrolled host the token may re-enroll (its certificate is revoked then).
    TokenCreate {
        ttl_secs: u64,
        host: Option<HostId>,
        cluster: Option<ClusterId>,
        replace: Option<HostId>,
        /// A token for another coordinator of the deployment (`init --join`), by its name.
        coordinator: Option<HostId>,
    },
    /// Join tokens not yet purged (used and expired ones stay listed for about a day), by id.
    TokenList {
        page: PageRequest,
    },
    /// Revokes an unused token by its public id.
    TokenRevoke {
        id: String,
    },
    /// Start a store maintenance job; with `wait`, answer when it has finished.
    Maintenance {
        kind: MaintenanceKind,
        wait: bool,
    },
    /// Jobs, oldest first, optionally only those of one VM and/or in one state (`running`, …).
    JobList {
        vm: Option<String>,
        state: Option<String>,
        page: PageRequest,
    },
    JobShow {
        id: u64,
    },
    VmList {
        page: PageRequest,
    },
    /// Forget a VM that vanished or was replaced (its record and identity; its recovery points
    /// stay until retention removes them).
    VmForget {
        vm: String,
    },
    /// Take VM `vm` over from whichever coordinator owns it: a new claim with the next epoch
    /// (protocol 10). The old owner's requests are refused from then on.
    VmTakeOver {
        vm: String,
    },
    GroupCreate {
        name: String,
        vms: Vec<String>,
        policy: PolicySpec,
        /// Protect every VM of this cluster, new ones too, partitioned among the coordinators.
        auto_cluster: Option<ClusterId>,
    },
    /// Groups by name; each with the first page of its members (see [`GroupInfo`]).
    GroupList {
        page: PageRequest,
    },
    /// One group; `page` pages its members.
    GroupShow {
        name: String,
        page: PageRequest,
    },
    GroupAddVm {
        name: String,
        vms: Vec<String>,
    },
    GroupRemoveVm {
        name: String,
        vms: Vec<String>,
        keep_data: bool,
    },
    GroupDelete {
        name: String,
    },
    GroupPlan {
        name: String,
    },
    /// Change a group's policy; schedules it changes are planned afresh at the next tick.
    GroupSet {
        name: String,
        patch: PolicyPatch,
    },
    /// Cancel a queued or running job.
    JobCancel {
        id: u64,
    },
    /// Back a VM up now (express full or synchronization).
    Backup {
        vm: String,
        kind: BackupKind,
    },
    /// A consistency check of a VM now.
    ConsistencyCheck {
        vm: String,
    },
    RecoveryPoints {
        vm: String,
        page: PageRequest,
    },
    /// Stream a disk of a recovery point: answered by [`AdminResponse::DiskStream`], then the
    /// disk's blocks as transfer frames ([`crate::transfer`]) in order, then `End`.
    RecoverDisk {
        vm: String,
        /// A recovery point id, a unique prefix of one, or `latest`.
        rp: String,
        disk: String,
        options: RecoveryOptions,
    },
    /// Recover a VM from a recovery point: onto itself (it must be off) or, with `to_host`,
    /// as a new VM on that host.
    Recover {
        vm: String,
        rp: String,
        to_host: Option<String>,
        name: Option<String>,
        options: RecoveryOptions,
    },
    /// Item-level browse: the entries at `path` of a disk of a recovery point.
    Ls {
        vm: String,
        rp: String,
        disk: String,
        path: String,
        page: PageRequest,
    },
    /// Item-level recovery to the console: answered by `ItemsStream`, then per item a
    /// `TransferMessage::Item` and (files) its bytes as block frames, then `End`.
    RecoverItems {
        vm: String,
        rp: String,
        disk: String,
        paths: Vec<String>,
        options: RecoveryOptions,
    },
    /// Item-level recovery to a directory on an enrolled host, as a job.
    RecoverItemsToHost {
        vm: String,
        rp: String,
        disk: String,
        paths: Vec<String>,
        host: String,
        dest: String,
        options: RecoveryOptions,
        /// `--keep-modes`: keep setuid/setgid/sticky and world-writable bits (protocol 3).
        keep_modes: bool,
    },
    /// Load one disk of a seed: answered by [`AdminResponse::SeedReady`]; the console then
    /// sends the disk's blocks (in that block size, increasing order, transfer frames) and
    /// `End`, and gets `Done` or `Error`.
    SeedImport {
        vm: String,
        disk: String,
        size_bytes: u64,
        /// Where the seed came from, for the replica's record.
        source: String,
    },
    /// Serve a disk of a recovery point for random reads (`bulwark mount`, protocol 9):
    /// answered by [`AdminResponse::DiskStream`]; the console then sends [`MountRead`]s as
    /// control frames and gets, for each in order, its blocks as transfer frames. Without a
    /// disk name the point's only disk is served.
    Mount {
        vm: String,
        rp: String,
        disk: Option<String>,
    },
    /// Instant recovery (protocol 9): a new VM `name` on `to_host` whose disks are overlays
    /// backed by the recovery point, ready to start at once. Answered by `JobStarted`.
    RecoverInstant {
        vm: String,
        rp: String,
        to_host: String,
        name: Option<String>,
    },
    /// Ends instant recovery `vm` (the recovered VM's name): its host copies the rest and the
    /// VM no longer depends on the recovery point. Answered by `Done` once it does (protocol 9).
    RecoverFinish {
        vm: String,
    },
    /// Sign a server certificate for an NBD export over TLS (`bulwark mount --nbd tcp:`,
    /// protocol 9): the CSR's key only; the names (DNS names or IP addresses) the clients
    /// dial. Answered by [`AdminResponse::ExportCert`].
    ExportCert {
        csr_pem: String,
        names: Vec<String>,
    },
}

/// A read of a mounted disk: `count` blocks from block `first`, at most
/// [`MAX_MOUNT_READ_BYTES`] of them (at least one block whatever its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRead {
    pub first: u64,
    pub count: u32,
}

/// The most bytes one [`MountRead`] may ask for.
pub const MAX_MOUNT_READ_BYTES: u64 = 16 << 20;

impl MountRead {
    /// Whether the read lies within a disk of `blocks` blocks of `block_size` bytes and within
    /// the bound.
    pub fn fits(&self, blocks: u64, block_size: u32) -> bool {
        let bytes = u64::from(self.count).saturating_mul(u64::from(block_size));
        self.count > 0
            && (self.count == 1 || bytes <= MAX_MOUNT_READ_BYTES)
            && self.first.checked_add(u64::from(self.count)).is_some_and(|end| end <= blocks)
    }
}

/// Options of every recovery (CONTRACT: "recovery options on `recover*`").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryOptions {
    /// Bandwidth limit, bytes per second.
    pub limit_bps: Option<u64>,
    /// The limit applies inside `[start, end)` minutes after midnight (coordinator local time).
    pub window: Option<(u16, u16)>,
    /// E-mail this address when the recovery finishes or fails.
    pub notify: Option<String>,
}

/// An entry of an item-level listing (CONTRACT: `ls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemInfo {
    pub path: String,
    /// `partition`, `dir`, `file`, `symlink`, `other`.
    pub kind: String,
    pub size: u64,
    /// Unix seconds.
    pub mtime: i64,
    pub mode: u32,
    pub target: Option<String>,
}

/// What `bulwark backup` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupKind {
    ExpressFull,
    Sync,
}

/// A protection group's policy as the console states it (validated by the coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub sync_every_secs: Option<u64>,
    /// Minutes after midnight, coordinator local time.
    pub recovery_points: Vec<u16>,
    pub express_full_before_rp: bool,
    pub retention_secs: u64,
    pub cc_when_inconsistent: bool,
    pub cc_at: Option<u16>,
    /// `now`, `at:HH:MM` or `manual`.
    pub replica_creation: String,
    pub block_size: u32,
    /// Disks left out, as (VM, disk).
    pub exclude_disks: Vec<(String, String)>,
    /// How recovery points are verified.
    pub verify: VerifyMode,
}

/// `--verify`: which recovery points the coordinator reads back through the restore path and
/// checks against the block digests the agent computed at backup time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum VerifyMode {
    #[default]
    Off,
    /// Every recovery point, soon after it is made.
    EveryRp,
    /// Each member's newest recovery point, once a day.
    Daily,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Off => "off",
            VerifyMode::EveryRp => "every-rp",
            VerifyMode::Daily => "daily",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(VerifyMode::Off),
            "every-rp" => Some(VerifyMode::EveryRp),
            "daily" => Some(VerifyMode::Daily),
            _ => None,
        }
    }
}

/// `group set`: what changes in a group's policy (`None`: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPatch {
    /// `Some(None)`: interval synchronization off.
    pub sync_every_secs: Option<Option<u64>>,
    pub recovery_points: Option<Vec<u16>>,
    pub express_full_before_rp: Option<bool>,
    pub retention_secs: Option<u64>,
    pub cc_when_inconsistent: Option<bool>,
    /// `Some(None)`: the daily check off.
    pub cc_at: Option<Option<u16>>,
    pub replica_creation: Option<String>,
    /// For members added from now on.
    pub block_size: Option<u32>,
    /// Disks to leave out, as (VM, disk).
    pub exclude_disks: Vec<(String, String)>,
    /// Disks left out before to protect again.
    pub include_disks: Vec<(String, String)>,
    pub verify: Option<VerifyMode>,
}

/// A protection group as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    /// Members by name: one page of them (the first, or the one `GroupShow` asked for).
    pub members: Vec<String>,
    /// The cursor of the next page of members (`GroupShow` with it), none after the last.
    pub members_next: Option<String>,
    pub policy: PolicySpec,
    /// Unix seconds of each schedule's next run: `(kind, at)`.
    pub next_runs: Vec<(String, u64)>,
    /// The cluster this group protects whole (`group create --cluster C --auto`).
    pub auto_cluster: Option<String>,
}

/// `group plan`: disk allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInfo {
    pub total_data_bytes: u64,
    pub recommended_bytes: u64,
    pub free_bytes: u64,
    pub underprovisioned_bytes: u64,
    /// The daily churn rate the recommendation assumes (fraction).
    pub churn_per_day: f64,
    pub retention_days: f64,
}

/// A VM as `vm list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub id: String,
    pub name: String,
    /// The VM's stable identity (empty until its host reported one).
    pub uuid: String,
    /// The cluster it belongs to (it moves only between hosts of it).
    pub cluster: String,
    /// The coordinator that protects it.
    pub owner: String,
    /// `protected`, `unprotected`, `awaiting-replica`, `conflict`, `missing`, `lost`.
    pub status: String,
    /// Why, for `conflict`, `missing` and `lost`.
    pub status_reason: Option<String>,
    pub host: String,
    /// `running`, `paused`, `off`.
    pub state: String,
    /// `linux`, `windows`.
    pub os: String,
    pub group: Option<String>,
    /// `none`, `creating`, `consistent`, `inconsistent`.
    pub replica_state: String,
    pub replica_reason: Option<String>,
    pub disks: Vec<DiskInfo>,
    /// Bytes left out of synchronizations and express fulls (swap partitions).
    pub excluded_bytes: u64,
    /// Disks its group leaves out of protection (`--exclude-disk`).
    pub left_out: Vec<String>,
}

/// A recovery point as `rp list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointInfo {
    /// Hex.
    pub id: String,
    pub vm: String,
    /// Unix milliseconds.
    pub created_at: u64,
    /// `app`, `filesystem`, `crash`.
    pub consistency: String,
    pub disks: Vec<DiskInfo>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// Disks of the VM its group leaves out (not in the point).
    pub left_out: Vec<String>,
    /// When the point was last read back and checked (Unix seconds), none if never.
    pub verified_at: Option<u64>,
    /// Whether that verification passed.
    pub verified: Option<bool>,
    /// Whether the point's boot check passed, when one ran.
    pub boot_verified: Option<bool>,
}

/// Store maintenance jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaintenanceKind {
    Verify,
    Prune,
    Gc,
}

/// A job as the console shows it (CONTRACT: `job show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    /// `initial`, `sync`, `express-full`, `consistency-check`, `recovery`, `verify`, `prune`, `gc`.
    pub kind: String,
    pub vm: Option<String>,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub state: String,
    /// Unix seconds.
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub bytes_transferred: u64,
    /// What `bytes_transferred` will reach, once known.
    pub bytes_total: Option<u64>,
    pub bytes_scanned: u64,
    pub blocks_changed: u64,
    pub consistency: Option<String>,
    pub error: Option<String>,
    /// What the job did, in words.
    pub detail: Option<String>,
}

/// The coordinator's status summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub version: String,
    pub protocol_version: u16,
    pub agents_connected: u32,
    pub agents_enrolled: u32,
    pub vms_protected: u32,
    pub jobs_running: u32,
    pub store_bytes: u64,
    pub catalog_bytes: u64,
}

/// One enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub host: HostId,
    pub connected: bool,
    /// Unix seconds of the last message or connection, if ever seen.
    pub last_seen: Option<u64>,
    /// Hex serial of the agent's current certificate.
    pub cert_serial: String,
    pub revoked: bool,
    pub vms: u32,
    pub agent_version: Option<String>,
    pub remote_addr: Option<String>,
    /// The host's cluster (a standalone host's is its own name).
    pub cluster: String,
}

/// A join token as `token list` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Public id: the first bytes of the secret's hash, in hex.
    pub id: String,
    pub host: Option<String>,
    pub cluster: Option<String>,
    pub replace: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
    pub used_by: Option<String>,
    pub revoked_at: Option<u64>,
}

/// The coordinator's answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    Status(StatusReport),
    Agents(Page<AgentInfo>),
    Revoked {
        host: HostId,
        serials: Vec<String>,
        connections_closed: u32,
    },
    Token {
        token: String,
        /// The token's public id (for `token list` and `token revoke`).
        id: String,
        expires_at: u64,
    },
    Tokens(Page<TokenInfo>),
    JobStarted {
        job_id: u64,
    },
    Job(JobInfo),
    Jobs(Page<JobInfo>),
    Vms(Page<VmSummary>),
    Group(GroupInfo),
    Groups(Page<GroupInfo>),
    Plan(PlanInfo),
    RecoveryPoints(Page<RecoveryPointInfo>),
    /// A disk follows on this stream: `size_bytes` in blocks of `block_size`.
    DiskStream {
        rp: String,
        disk: String,
        size_bytes: u64,
        block_size: u32,
    },
    Items(Page<ItemInfo>),
    /// Items follow on this stream.
    ItemsStream {
        rp: String,
    },
    /// Send the seed's blocks in this size.
    SeedReady {
        block_size: u32,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    /// The deployment's current CRL, PEM (`Crl`).
    Crl {
        pem: String,
    },
    /// An export's certificate, the deployment's CA and its current CRL (PEM).
    ExportCert {
        cert_pem: String,
        ca_pem: String,
        crl_pem: String,
        /// Unix seconds.
        not_after: u64,
    },
}

/// Enrollment: the agent proves it holds a join token and asks for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub version: u16,
    /// The token's secret (32 bytes); the coordinator stores only its hash.
    pub token_secret: Vec<u8>,
    pub host: HostId,
    /// PKCS#10 certificate signing request, PEM.
    pub csr_pem: String,
}

/// The coordinator's answer to an [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Accepted {
        /// The agent's certificate, PEM.
        cert_pem: String,
        /// The deployment CA's certificate, PEM.
        ca_pem: String,
        /// The coordinator's name (the TLS server name to verify).
        coordinator: String,
        /// The deployment's coordinators (the agent connects to each).
        coordinators: Vec<CoordinatorAddr>,
    },
    Refused {
        reason: String,
    },
}

/// A coordinator joining the deployment (`init --join`): it proves it holds a coordinator
/// join token and asks for its certificate and an administrator's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub version: u16,
    pub token_secret: Vec<u8>,
    /// The name the joining coordinator asks for (none: the one its token was made for).
    pub name: Option<HostId>,
    /// Where agents dial it (`HOST:PORT`).
    pub addr: String,
    /// Names its certificate must also be valid for (its listen address).
    pub sans: Vec<String>,
    /// PKCS#10 requests, PEM: its own certificate's and its administrator's.
    pub coordinator_csr: String,
    pub admin_csr: String,
}

/// The answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    Accepted {
        /// The joined coordinator's name (its token's).
        name: String,
        coordinator_pem: String,
        admin_pem: String,
        ca_pem: String,
        crl_pem: String,
        /// The deployment's coordinators, the new one included.
        coordinators: Vec<CoordinatorAddr>,
        /// The coordinator that signed it (where agents and coordinators enroll).
        authority: CoordinatorAddr,
    },
    Refused {
        reason: String,
    },
}

/// A recovery point reference in messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointRef {
    pub vm: VmId,
    pub id: RecoveryPointId,
}
