//! The records the catalog stores. Plain data; `mod.rs` decides where each lives.

use bulwark_protocol::block::Digest;
use bulwark_protocol::blockmap::TreeRoot;
pub use bulwark_protocol::messages::VerifyMode;
use bulwark_protocol::messages::{ChangeToken, Consistency, DiskInfo, GuestOs, PowerState};
use serde::{Deserialize, Serialize};

/// A join token as stored: only the hash of its secret is the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub created_at: u64,
    pub expires_at: u64,
    /// If set, only this host may enroll with the token.
    pub host: Option<String>,
    pub used_at: Option<u64>,
    pub used_by: Option<String>,
    /// The cluster the enrolling host joins (none: a standalone host, or the replaced host's).
    pub cluster: Option<String>,
    /// The enrolled host this token may re-enroll (revoking its certificate).
    pub replace: Option<String>,
    /// Set by `token revoke`: the token is refused from then on.
    pub revoked_at: Option<u64>,
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub host: String,
    pub cert_serial: String,
    pub enrolled_at: u64,
    pub cert_not_after: u64,
    pub revoked: bool,
    pub last_seen: Option<u64>,
    pub agent_version: Option<String>,
    pub vms: u32,
    /// The host's cluster: given by its join token, its own name for a standalone host.
    pub cluster: String,
}

/// The first layouts of [`TokenRecord`] and [`AgentRecord`], before clusters: still read
/// (an old agent is a standalone host), never written. Each layout fails to decode the other's
/// bytes (one is a strict prefix of the other, and decoding refuses short input and trailing
/// bytes), so trying the current layout first and then this one is unambiguous.
pub mod legacy {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct TokenRecordV1 {
        pub created_at: u64,
        pub expires_at: u64,
        pub host: Option<String>,
        pub used_at: Option<u64>,
        pub used_by: Option<String>,
    }

    impl From<TokenRecordV1> for super::TokenRecord {
        fn from(t: TokenRecordV1) -> Self {
            Self {
                created_at: t.created_at,
                expires_at: t.expires_at,
                host: t.host,
                used_at: t.used_at,
                used_by: t.used_by,
                cluster: None,
                replace: None,
                revoked_at: None,
            }
        }
    }

    /// A group before disks could be left out.
    #[derive(Deserialize)]
    pub struct GroupRecordV1 {
        pub name: String,
        pub members: Vec<String>,
        pub policy: PolicyV1,
        pub created_at: u64,
    }

    #[derive(Deserialize)]
    pub struct PolicyV1 {
        pub sync_every_secs: Option<u64>,
        pub recovery_points: Vec<u16>,
        pub express_full_before_rp: bool,
        pub retention_secs: u64,
        pub cc_when_inconsistent: bool,
        pub cc_at: Option<u16>,
        pub replica_creation: String,
        pub block_size: u32,
    }

    impl From<GroupRecordV1> for super::GroupRecord {
        fn from(g: GroupRecordV1) -> Self {
            let p = g.policy;
            Self {
                name: g.name,
                members: g.members,
                policy: super::Policy {
                    sync_every_secs: p.sync_every_secs,
                    recovery_points: p.recovery_points,
                    express_full_before_rp: p.express_full_before_rp,
                    retention_secs: p.retention_secs,
                    cc_when_inconsistent: p.cc_when_inconsistent,
                    cc_at: p.cc_at,
                    replica_creation: p.replica_creation,
                    block_size: p.block_size,
                    exclude_disks: vec![],
                    verify: super::VerifyMode::Off,
                },
                created_at: g.created_at,
            }
        }
    }

    /// A group before recovery points could be verified (`--verify`).
    #[derive(Deserialize)]
    pub struct GroupRecordV2 {
        pub name: String,
        pub members: Vec<String>,
        pub policy: PolicyV2,
        pub created_at: u64,
    }

    #[derive(Deserialize)]
    pub struct PolicyV2 {
        pub sync_every_secs: Option<u64>,
        pub recovery_points: Vec<u16>,
        pub express_full_before_rp: bool,
        pub retention_secs: u64,
        pub cc_when_inconsistent: bool,
        pub cc_at: Option<u16>,
        pub replica_creation: String,
        pub block_size: u32,
        pub exclude_disks: Vec<(String, String)>,
    }

    impl From<GroupRecordV2> for super::GroupRecord {
        fn from(g: GroupRecordV2) -> Self {
            let p = g.policy;
            Self {
                name: g.name,
                members: g.members,
                policy: super::Policy {
                    sync_every_secs: p.sync_every_secs,
                    recovery_points: p.recovery_points,
                    express_full_before_rp: p.express_full_before_rp,
                    retention_secs: p.retention_secs,
                    cc_when_inconsistent: p.cc_when_inconsistent,
                    cc_at: p.cc_at,
                    replica_creation: p.replica_creation,
                    block_size: p.block_size,
                    exclude_disks: p.exclude_disks,
                    verify: super::VerifyMode::Off,
                },
                created_at: g.created_at,
            }
        }
    }

    /// A replica before its swap exclusion carried a witness: read with no exclusion (the
    /// next commit's scan finds the swap again).
    #[derive(Deserialize)]
    pub struct ReplicaRecordV1 {
        pub vm: String,
        pub disk: String,
        pub size_bytes: u64,
        pub block_size: u32,
        pub state: super::ReplicaState,
        pub root: Option<super::TreeRoot>,
        pub change_token: Option<super::ChangeToken>,
        pub reason: Option<String>,
        pub updated_at: u64,
        pub excluded: Vec<(u64, u64)>,
    }

    impl From<ReplicaRecordV1> for super::ReplicaRecord {
        fn from(r: ReplicaRecordV1) -> Self {
            Self {
                vm: r.vm,
                disk: r.disk,
                size_bytes: r.size_bytes,
                block_size: r.block_size,
                state: r.state,
                root: r.root,
                change_token: r.change_token,
                reason: r.reason,
                updated_at: r.updated_at,
                excluded: vec![],
                swap_witness: vec![],
            }
        }
    }

    #[derive(Deserialize)]
    pub struct AgentRecordV1 {
        pub host: String,
        pub cert_serial: String,
        pub enrolled_at: u64,
        pub cert_not_after: u64,
        pub revoked: bool,
        pub last_seen: Option<u64>,
        pub agent_version: Option<String>,
        pub vms: u32,
    }

    impl From<AgentRecordV1> for super::AgentRecord {
        fn from(a: AgentRecordV1) -> Self {
            Self {
                cluster: a.host.clone(),
                host: a.host,
                cert_serial: a.cert_serial,
                enrolled_at: a.enrolled_at,
                cert_not_after: a.cert_not_after,
                revoked: a.revoked,
                last_seen: a.last_seen,
                agent_version: a.agent_version,
                vms: a.vms,
            }
        }
    }
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    pub serial: String,
    pub host: String,
    pub revoked_at: u64,
}

/// A VM the coordinator knows of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub host: String,
    pub os: GuestOs,
    pub power: PowerState,
    pub disks: Vec<DiskInfo>,
    pub group: Option<String>,
    pub updated_at: u64,
}

/// A protection group's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub sync_every_secs: Option<u64>,
    /// Minutes after midnight (coordinator local time) of each recovery point.
    pub recovery_points: Vec<u16>,
    pub express_full_before_rp: bool,
    pub retention_secs: u64,
    pub cc_when_inconsistent: bool,
    pub cc_at: Option<u16>,
    /// `now`, `at:HH:MM` or `manual`.
    pub replica_creation: String,
    /// The block size of new members' replicas (a member keeps the one it was created with).
    pub block_size: u32,
    /// Disks left out of protection, as (VM, disk): never copied, not in recovery points.
    pub exclude_disks: Vec<(String, String)>,
    /// How recovery points are read back and checked (`--verify`).
    pub verify: VerifyMode,
}

/// An instant recovery: a VM whose disks are overlays backed by a recovery point that its
/// host's agent serves (`Export` streams) until `recover-finish` copied the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantRecord {
    /// The recovered VM's name (the tree's key).
    pub name: String,
    /// The VM the recovery point is of.
    pub vm: String,
    pub rp: [u8; 16],
    /// The host the new VM is on: the only one whose agent may read the exports.
    pub host: String,
    /// The point's disks (their block maps are kept from GC while the recovery is active,
    /// even once the point itself is pruned).
    pub disks: Vec<RpDisk>,
    /// The recovery job, once it started.
    pub job: Option<u64>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds: the VM no longer depends on the exports.
    pub finished_at: Option<u64>,
}

impl InstantRecord {
    /// Whether the VM still reads from the recovery point.
    pub fn is_active(&self) -> bool {
        self.finished_at.is_none()
    }
}

/// What the last verification of a recovery point found (kept beside the point, dropped with
/// it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpCheck {
    /// Unix seconds.
    pub verified_at: u64,
    /// Every block read back matched its digest.
    pub verified: bool,
    /// The boot check's verdict, when one ran.
    pub boot_verified: Option<bool>,
    /// The verification job.
    pub job: u64,
    /// What was found, in words.
    pub detail: String,
}

impl Policy {
    /// Whether `vm`'s disk `disk` is left out.
    pub fn excludes(&self, vm: &str, disk: &str) -> bool {
        self.exclude_disks.iter().any(|(v, d)| v == vm && d == disk)
    }
}

/// A protection group: members and one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub members: Vec<String>,
    pub policy: Policy,
    pub created_at: u64,
}

/// State of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    Creating,
    Consistent,
    Inconsistent,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Creating => "creating",
            ReplicaState::Consistent => "consistent",
            ReplicaState::Inconsistent => "inconsistent",
        }
    }
}

/// The replica of one protected disk: its current (mutable) block-map root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub vm: String,
    pub disk: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub state: ReplicaState,
    pub root: Option<TreeRoot>,
    /// The agent's change token this replica is current with.
    pub change_token: Option<ChangeToken>,
    /// Why it is inconsistent, when it is.
    pub reason: Option<String>,
    pub updated_at: u64,
    /// Block ranges `[start, end)` left out of synchronizations and express fulls (the inside
    /// of a swap partition: its header block stays in).
    pub excluded: Vec<(u64, u64)>,
    /// The blocks the swap scan read to find `excluded` (partition tables, swap headers) and
    /// their ids in the scanned tree: the exclusion holds for a snapshot only while every one of
    /// them is unchanged there (the agent checks), so a partition that stopped being swap is
    /// never left out.
    pub swap_witness: Vec<(u64, Digest)>,
}

impl ReplicaRecord {
    /// Marks a consistent replica inconsistent for `why` at `now` (seconds); answers whether
    /// it changed. A replica being created has nothing to doubt yet (its next job is the
    /// initial copy), and an inconsistent one keeps its first reason. Every site that doubts
    /// a replica's continuity goes through here.
    pub fn mark_inconsistent(&mut self, why: &str, now: u64) -> bool {
        if self.state != ReplicaState::Consistent {
            return false;
        }
        self.state = ReplicaState::Inconsistent;
        self.reason = Some(why.to_owned());
        self.updated_at = now;
        true
    }

    /// Whether the replica is a whole copy of a disk of `size_bytes` in blocks of
    /// `block_size`, ready for incrementals (consistent or not).
    pub fn is_complete(&self, size_bytes: u64, block_size: u32) -> bool {
        self.state != ReplicaState::Creating
            && self.root.is_some()
            && self.size_bytes == size_bytes
            && self.block_size == block_size
    }
}

/// One disk of a recovery point: a frozen root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpDisk {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub root: TreeRoot,
}

/// A recovery point: frozen roots of all disks of a VM, its configuration and consistency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointRecord {
    pub id: [u8; 16],
    pub vm: String,
    /// Unix milliseconds.
    pub created_at: u64,
    pub consistency: Consistency,
    /// The VM's configuration blob, as the hypervisor gave it.
    pub config: Vec<u8>,
    pub disks: Vec<RpDisk>,
    /// Sum of the disks' sizes.
    pub logical_bytes: u64,
    /// Bytes this recovery point added to the store (new chunks and pages).
    pub stored_bytes: u64,
}

/// Kinds of jobs the catalog records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    Initial,
    Sync,
    ExpressFull,
    ConsistencyCheck,
    Recovery,
    Verify,
    Prune,
    Gc,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A job as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    pub vm: Option<String>,
    pub state: JobState,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub bytes_transferred: u64,
    /// What `bytes_transferred` will reach, once known (recoveries): for progress and ETA.
    pub bytes_total: Option<u64>,
    pub bytes_scanned: u64,
    pub blocks_changed: u64,
    pub consistency: Option<Consistency>,
    pub error: Option<String>,
    /// What the job did, in words (maintenance reports).
    pub detail: Option<String>,
    /// For a recovery job: what to recover where.
    pub recovery: Option<RecoverySpec>,
}

/// A recovery job's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySpec {
    /// The recovery point (of the job's VM).
    pub rp: [u8; 16],
    /// None: onto the original VM; else as a new VM on this host.
    pub to_host: Option<String>,
    /// The new VM's name (alternate location).
    pub name: Option<String>,
    /// Throttle and notification.
    pub options: bulwark_protocol::messages::RecoveryOptions,
    /// Item-level recovery to `to_host`: which disk, which paths, into which directory.
    pub items: Option<ItemsTarget>,
}

/// Files to recover onto a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemsTarget {
    pub disk: String,
    pub paths: Vec<String>,
    pub dest: String,
    /// `--keep-modes`: the agent keeps setuid/setgid/sticky and world-writable bits.
    pub keep_modes: bool,
}

impl JobRecord {
    /// A new job, queued.
    pub fn queued(id: u64, kind: JobKind, vm: Option<String>) -> Self {
        Self {
            id,
            kind,
            vm,
            state: JobState::Queued,
            started_at: None,
            finished_at: None,
            bytes_transferred: 0,
            bytes_total: None,
            bytes_scanned: 0,
            blocks_changed: 0,
            consistency: None,
            error: None,
            detail: None,
            recovery: None,
        }
    }
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Initial => "initial",
            JobKind::Sync => "sync",
            JobKind::ExpressFull => "express-full",
            JobKind::ConsistencyCheck => "consistency-check",
            JobKind::Recovery => "recovery",
            JobKind::Verify => "verify",
            JobKind::Prune => "prune",
            JobKind::Gc => "gc",
        }
    }
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A chunk verify found bad.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadChunk {
    pub id: Digest,
    pub pack: u32,
    pub offset: u64,
    pub reason: String,
    pub found_at: u64,
}

/// Where a record of the chunk store is: its pack, offset and length (header plus payload).
/// The catalog's chunk index maps chunk ids to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
    /// Header plus payload.
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.pack.to_be_bytes());
        b[4..12].copy_from_slice(&self.offset.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        Some(Self {
            pack: u32::from_be_bytes(b[..4].try_into().ok()?),
            offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
            len: u32::from_be_bytes(b[12..].try_into().ok()?),
        })
    }
}
