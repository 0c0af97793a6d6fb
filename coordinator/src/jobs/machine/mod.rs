//! A backup job (initial copy, synchronization, express full, consistency check) as a plain
//! state machine: no actix, no QUIC, no clock. It is made from the job's record, the VM as
//! inventoried and its replicas, fed what happens (a disk's stream opened, a disk stored, the
//! agent's result, the commit, a lost connection, the time) and polled for what to do (tell
//! the agent, commit, mark the replica inconsistent, save, finish). `vm_job` performs its
//! effects over QUIC and the ingest worker; the deterministic simulation performs them in
//! memory against the same store. What a disk's stream carries is checked by
//! [`BlockReceiver`] (blocks mode) or `compare` (a consistency check).
//!
//! The replica changes only in the one commit, after every disk was stored and the agent said
//! its snapshot was read whole: a job that fails anywhere else leaves the replica as it was,
//! and what the failure means for its continuity is [`plan::Failure`]'s rule.

use crate::catalog::{JobKind, JobRecord, ReplicaRecord, ReplicaState, RpDisk};
use crate::jobs::plan::{self, Failure};
use crate::store::NewRecoveryPoint;
use bulwark_protocol::block::Digest;
use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::messages::{
    Consistency, CoordinatorMessage, DiskInfo, JobKind as WireKind, JobOutcome, JobRequest, MAX_VM_CONFIG,
};
use bulwark_protocol::transfer::{TransferFrame, TransferMessage, TransferMode};
use bulwark_protocol::{JobId, VmId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// What a disk's transfer produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskDone {
    pub root: TreeRoot,
    pub changed: u64,
}

/// Where a disk's transfer starts: its block count and the tree it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStart {
    /// The disk's place in the job (its ingest's slot).
    pub slot: usize,
    pub blocks: u64,
    pub old: Option<TreeRoot>,
    pub mode: TransferMode,
}

/// What the driver is to do, in order.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Persist a replica record (an initial copy's replicas, `Creating`, before the request).
    PutReplica(ReplicaRecord),
    /// Send to the job's agent.
    Send(CoordinatorMessage),
    /// Commit the replicas, with a recovery point or without, in one transaction; answer
    /// with [`VmJob::committed`].
    Commit { replicas: Vec<ReplicaRecord>, rp: Option<NewRecoveryPoint> },
    /// Mark the VM's consistent replicas inconsistent, with this reason.
    MarkInconsistent(String),
    /// Look for swap in the committed replicas (a failed scan excludes nothing).
    FindSwap(Vec<ReplicaRecord>),
    /// The job record changed in a way worth persisting.
    Save,
    /// The job is over: [`VmJob::outcome`] says how.
    Finished,
}

/// What every job machine keeps: its record, the effects not yet polled, and how it ended.
#[derive(Debug)]
pub struct JobCore {
    pub record: JobRecord,
    effects: VecDeque<Effect>,
    outcome: Option<Result<(), Failure>>,
}

impl JobCore {
    pub fn new(record: JobRecord, effects: VecDeque<Effect>) -> Self {
        Self { record, effects, outcome: None }
    }

    pub fn push(&mut self, effect: Effect) {
        self.effects.push_back(effect);
    }

    /// Ends the job (once): a failure's reason goes into the record, `Finished` is queued.
    pub fn end(&mut self, r: Result<(), Failure>) {
        if self.outcome.is_some() {
            return;
        }
        if let Err(f) = &r {
            self.record.error = Some(f.reason.clone());
        }
        self.outcome = Some(r);
        self.effects.push_back(Effect::Finished);
    }
}

/// What the drivers ask of every job machine.
pub trait JobMachine {
    fn core(&self) -> &JobCore;
    fn core_mut(&mut self) -> &mut JobCore;

    /// The job's record as it stands (kind as planned, bytes, detail, error).
    fn record(&self) -> &JobRecord {
        &self.core().record
    }

    /// The job's record, for the driver's counters (bytes scanned and transferred).
    fn record_mut(&mut self) -> &mut JobRecord {
        &mut self.core_mut().record
    }

    /// The next thing to do, in order.
    fn poll_effect(&mut self) -> Option<Effect> {
        self.core_mut().effects.pop_front()
    }

    /// How the job ended (None while it runs).
    fn outcome(&self) -> Option<&Result<(), Failure>> {
        self.core().outcome.as_ref()
    }
}

/// A broken build of the real job, for the simulation to catch (`broken-builds` feature).
#[cfg(feature = "broken-builds")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Commits when the agent reports success even while a disk is still arriving (its old
    /// tree committed under the new change token).
    CommitBeforeEveryDisk,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// The request is out; disks arrive; the agent's result is awaited.
    Running,
    /// The agent's result is in and the commit is out.
    Committing {
        consistency: Consistency,
        note: Option<String>,
        replicas: Vec<ReplicaRecord>,
    },
    Finished,
}

/// How long a job that has the agent's success waits for a disk's transfer stream it has not
/// seen yet (the streams and the control stream reach the job by different paths).
pub const STREAM_GRACE_MS: u64 = 5_000;

/// One backup job of one VM.
#[derive(Debug)]
pub struct VmJob {
    core: JobCore,
    vm: String,
    disks: Vec<DiskInfo>,
    replicas: HashMap<String, ReplicaRecord>,
    block_size: u32,
    lease_ms: u64,
    deadline: u64,
    phase: Phase,
    /// The disks whose streams are open (at most `parallel`).
    open: BTreeSet<String>,
    /// How many disks may arrive at once.
    parallel: usize,
    done: BTreeMap<String, DiskDone>,
    /// The agent's result, come while a disk's stream was still open: applied when the last
    /// one ends (the control stream may overtake a transfer stream).
    pending: Option<JobOutcome>,
    /// A success came before some disk's stream was even seen: until this time the job waits
    /// for it (a transfer stream is routed to its job apart from the control stream), then fails.
    stream_grace_until: Option<u64>,
    #[cfg(feature = "broken-builds")]
    broken: Option<Broken>,
}

/// What a backup job starts from.
pub struct Setup {
    /// The job's record (its id and the kind asked for).
    pub record: JobRecord,
    pub vm: String,
    pub disks: Vec<DiskInfo>,
    pub replicas: HashMap<String, ReplicaRecord>,
    pub block_size: u32,
    /// The store's chunk id key (sent to the agent).
    pub id_key: Option<[u8; 32]>,
    /// How long the agent may stay silent, and how long it holds a snapshot without a verdict.
    pub lease_ms: u64,
    /// Disks the group's policy leaves out (`--exclude-disk`).
    pub left_out: Vec<String>,
    /// How many of the VM's disks transfer at once (`[jobs] disks_in_parallel`, at least 1).
    pub parallel: usize,
    /// The epoch of this coordinator's claim on the VM (0: none yet; the agent claims it).
    pub epoch: u64,
}

fn wire_kind(kind: JobKind) -> Option<WireKind> {
    Some(match kind {
        JobKind::Initial => WireKind::Initial,
        JobKind::Sync => WireKind::Sync,
        JobKind::ExpressFull => WireKind::ExpressFull,
        JobKind::ConsistencyCheck => WireKind::ConsistencyCheck,
        _ => return None,
    })
}

impl VmJob {
    /// Plans the job (a VM without a complete replica gets its initial copy; an inconsistent
    /// replica refuses a synchronization) and queues the request to the agent, after the
    /// `Creating` replicas of an initial copy. A job that cannot run is refused here, with
    /// nothing queued.
    pub fn start(setup: Setup, now_ms: u64) -> Result<VmJob, Failure> {
        let Setup { mut record, vm, disks, replicas, block_size, id_key, lease_ms, left_out, parallel, epoch } = setup;
        let parallel = parallel.clamp(1, crate::jobs::ingest::MAX_DISKS_AT_ONCE);
        let planned = plan::plan(record.kind, &vm, &disks, &replicas, block_size, &left_out)?;
        // The job is about the planned disks only: a left-out disk's stream is refused.
        let disks: Vec<DiskInfo> =
            disks.into_iter().filter(|d| planned.disks.iter().any(|p| p.disk == d.name)).collect();
        record.kind = planned.kind;
        let kind =
            wire_kind(record.kind).ok_or_else(|| Failure::stop(format!("{} is not a VM job", record.kind.as_str())))?;
        let request = JobRequest {
            job: JobId(record.id),
            vm: VmId::new(vm.clone()).map_err(|e| Failure::stop(e.to_string()))?,
            kind,
            block_size,
            disks: planned.disks,
            id_key,
            lease_secs: (lease_ms / 1000).min(u64::from(u32::MAX)) as u32,
            parallel_disks: parallel as u8,
            epoch,
        };
        let mut effects = VecDeque::new();
        if record.kind == JobKind::Initial {
            for d in &disks {
                effects.push_back(Effect::PutReplica(ReplicaRecord {
                    vm: vm.clone(),
                    disk: d.name.to_string(),
                    size_bytes: d.size_bytes,
                    block_size,
                    state: ReplicaState::Creating,
                    root: None,
                    change_token: None,
                    reason: None,
                    updated_at: now_ms / 1000,
                    excluded: vec![],
                    swap_witness: vec![],
                }));
            }
        }
        effects.push_back(Effect::Send(CoordinatorMessage::JobRequest(request)));
        Ok(VmJob {
            core: JobCore::new(record, effects),
            vm,
            disks,
            replicas,
            block_size,
            lease_ms,
            deadline: now_ms.saturating_add(lease_ms),
            phase: Phase::Running,
            open: BTreeSet::new(),
            parallel,
            done: BTreeMap::new(),
            pending: None,
            stream_grace_until: None,
            #[cfg(feature = "broken-builds")]
            broken: None,
        })
    }

    /// Turns on a broken build (the simulation's check that it catches it).
    #[cfg(feature = "broken-builds")]
    pub fn break_with(&mut self, broken: Broken) {
        self.broken = Some(broken);
    }

    /// When [`VmJob::timeout`] is due, if the job still waits for anything.
    pub fn next_timeout(&self) -> Option<u64> {
        let due = self.stream_grace_until.map_or(self.deadline, |g| g.min(self.deadline));
        (self.phase == Phase::Running).then_some(due)
    }

    /// The agent was heard from (blocks arrived on an open stream): its lease starts again.
    pub fn heard(&mut self, now_ms: u64) {
        if self.phase == Phase::Running {
            self.deadline = self.deadline.max(now_ms.saturating_add(self.lease_ms));
        }
    }

    /// Whether more blocks are welcome: a finished job takes none.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    fn finish(&mut self, r: Result<(), Failure>) {
        if self.phase == Phase::Finished {
            return;
        }
        if let Some(why) = r.as_ref().err().and_then(|f| f.inconsistent.clone()) {
            self.core.push(Effect::MarkInconsistent(why));
        }
        self.phase = Phase::Finished;
        self.open.clear();
        self.core.end(r);
    }

    fn fail_midway(&mut self, reason: String) {
        let f = Failure::midway(reason, self.core.record.kind);
        self.finish(Err(f));
    }

    /// The agent opened the transfer stream of disk `disk`: answers where it starts, or why
    /// the stream does not fit the job (then the job has failed, midway).
    pub fn stream_opened(
        &mut self,
        disk: &str,
        mode: TransferMode,
        blocks: u64,
        block_size: u32,
        now_ms: u64,
    ) -> Result<DiskStart, String> {
        if self.phase != Phase::Running {
            return Err("the job is over".into());
        }
        self.deadline = now_ms.saturating_add(self.lease_ms);
        let r = self.check_stream(disk, mode, blocks, block_size);
        match &r {
            Ok(_) => {
                self.open.insert(disk.to_owned());
            }
            Err(why) => self.fail_midway(format!("disk {disk}: {why}")),
        }
        r
    }

    fn check_stream(&self, disk: &str, mode: TransferMode, blocks: u64, block_size: u32) -> Result<DiskStart, String> {
        let Some((slot, d)) = self.disks.iter().enumerate().find(|(_, d)| d.name.as_str() == disk) else {
            return Err(format!("{} has no disk {disk}", self.vm));
        };
        if self.done.contains_key(disk) || self.open.contains(disk) {
            return Err(format!("disk {disk} was sent twice"));
        }
        if self.open.len() >= self.parallel {
            let open: Vec<&str> = self.open.iter().map(String::as_str).collect();
            return Err(format!(
                "a stream for disk {disk} while {} are still being received (at most {} at once)",
                open.join(", "),
                self.parallel
            ));
        }
        let want = d.size_bytes.div_ceil(u64::from(self.block_size));
        if block_size != self.block_size || blocks != want {
            return Err(format!(
                "stream announces {blocks} blocks of {block_size} bytes, the replica has {want} of {}",
                self.block_size
            ));
        }
        let want_mode = if self.core.record.kind == JobKind::ConsistencyCheck {
            TransferMode::Compare
        } else {
            TransferMode::Blocks
        };
        if mode != want_mode {
            return Err(format!("stream mode {mode:?} does not fit a {} job", self.core.record.kind.as_str()));
        }
        let old = if self.core.record.kind == JobKind::Initial {
            None
        } else {
            self.replicas
                .get(disk)
                .filter(|r| r.size_bytes == d.size_bytes && r.block_size == self.block_size)
                .and_then(|r| r.root)
        };
        Ok(DiskStart { slot, blocks, old, mode })
    }

    /// Disk `disk` is stored (not yet committed).
    pub fn disk_done(&mut self, disk: &str, done: DiskDone, now_ms: u64) {
        if self.phase != Phase::Running {
            return;
        }
        if !self.open.remove(disk) {
            self.fail_midway(format!("disk {disk} ended without its stream being open"));
            return;
        }
        self.deadline = now_ms.saturating_add(self.lease_ms);
        self.core.record.blocks_changed += done.changed;
        self.done.insert(disk.to_owned(), done);
        self.core.push(Effect::Save);
        if self.open.is_empty() {
            if let Some(outcome) = self.pending.take() {
                self.agent_result(outcome, now_ms);
            }
        }
    }

    /// Disk `disk`'s transfer failed: the job has failed, midway.
    pub fn disk_failed(&mut self, disk: &str, reason: &str) {
        if self.phase == Phase::Running {
            self.fail_midway(format!("disk {disk}: {reason}"));
        }
    }

    /// The agent's result. Success commits once every disk is stored; a failure means what
    /// [`Failure::from_agent`] says.
    pub fn agent_result(&mut self, outcome: JobOutcome, now_ms: u64) {
        if self.phase != Phase::Running {
            return;
        }
        #[cfg(feature = "broken-builds")]
        let commit_anyway = self.broken == Some(Broken::CommitBeforeEveryDisk);
        #[cfg(not(feature = "broken-builds"))]
        let commit_anyway = false;
        if !self.open.is_empty() && matches!(outcome, JobOutcome::Succeeded { .. }) && !commit_anyway {
            self.pending = Some(outcome);
            return;
        }
        let unseen = self.disks.iter().any(|d| !self.done.contains_key(d.name.as_str()));
        if unseen
            && self.stream_grace_until.is_none()
            && matches!(outcome, JobOutcome::Succeeded { .. })
            && !commit_anyway
        {
            self.stream_grace_until = Some(now_ms.saturating_add(STREAM_GRACE_MS));
            self.pending = Some(outcome);
            return;
        }
        let (consistency, note, bytes_read, next_token, config) = match outcome {
            JobOutcome::Succeeded { consistency, consistency_note, bytes_read, next_token, config, .. } => {
                // A definition over the bound is not kept (the point is, without it).
                let config = if config.len() <= MAX_VM_CONFIG { config } else { vec![] };
                (consistency, consistency_note, bytes_read, next_token, config)
            }
            JobOutcome::Failed { kind, reason } => {
                let f = Failure::from_agent(kind, reason, !self.done.is_empty(), self.core.record.kind);
                return self.finish(Err(f));
            }
            JobOutcome::Restored { .. } => {
                return self.finish(Err(Failure::stop("the agent answered a backup with a restore")));
            }
        };
        if self.core.record.kind != JobKind::ConsistencyCheck {
            self.core.record.bytes_scanned = bytes_read;
        }
        let mut replicas = vec![];
        let mut rp_disks = vec![];
        for d in &self.disks {
            let stored = match self.done.get(d.name.as_str()) {
                Some(done) => done.root,
                None if commit_anyway => match self.replicas.get(d.name.as_str()).and_then(|r| r.root) {
                    Some(root) => root,
                    None => continue,
                },
                None => {
                    let why = format!("the agent reported success but never sent disk {}", d.name);
                    self.core.push(Effect::Send(CoordinatorMessage::JobDone {
                        job: JobId(self.core.record.id),
                        committed: false,
                    }));
                    return self.fail_midway(why);
                }
            };
            replicas.push(ReplicaRecord {
                vm: self.vm.clone(),
                disk: d.name.to_string(),
                size_bytes: d.size_bytes,
                block_size: self.block_size,
                state: ReplicaState::Consistent,
                root: Some(stored),
                change_token: Some(next_token),
                reason: None,
                updated_at: now_ms / 1000,
                // The exclusion and its witness go together: the witness's ids are of contents,
                // valid whichever tree they were read from.
                excluded: self.replicas.get(d.name.as_str()).map(|r| r.excluded.clone()).unwrap_or_default(),
                swap_witness: self.replicas.get(d.name.as_str()).map(|r| r.swap_witness.clone()).unwrap_or_default(),
            });
            rp_disks.push(RpDisk {
                name: d.name.to_string(),
                size_bytes: d.size_bytes,
                block_size: self.block_size,
                root: stored,
            });
        }
        let rp = matches!(self.core.record.kind, JobKind::Initial | JobKind::ExpressFull).then(|| NewRecoveryPoint {
            vm: self.vm.clone(),
            consistency,
            config,
            disks: rp_disks,
            created_at: now_ms,
        });
        self.phase = Phase::Committing { consistency, note, replicas: replicas.clone() };
        self.core.push(Effect::Commit { replicas, rp });
    }

    /// The commit's answer: the recovery point's id if one was made, or why it failed. The
    /// agent learns the verdict either way (it advances its change token only on `true`).
    pub fn committed(&mut self, r: Result<Option<RpId>, String>) {
        let Phase::Committing { consistency, note, replicas } = self.phase.clone() else { return };
        let verdict = |ok| CoordinatorMessage::JobDone { job: JobId(self.core.record.id), committed: ok };
        match r {
            Ok(rp) => {
                self.core.push(Effect::Send(verdict(true)));
                self.core.push(Effect::FindSwap(replicas));
                self.core.record.consistency = Some(consistency);
                self.core.record.detail = Some(match rp {
                    Some(id) => {
                        let id = crate::store::hex(&id);
                        match &note {
                            Some(why) => format!("recovery point {id} ({}-consistent: {why})", consistency.as_str()),
                            None => format!("recovery point {id} ({}-consistent)", consistency.as_str()),
                        }
                    }
                    None if self.core.record.kind == JobKind::ConsistencyCheck => {
                        format!(
                            "{} block(s) differed and were repaired; replica consistent",
                            self.core.record.blocks_changed
                        )
                    }
                    None => "replica synchronized".into(),
                });
                self.finish(Ok(()));
            }
            Err(e) => {
                self.core.push(Effect::Send(verdict(false)));
                self.finish(Err(Failure::retry(format!("commit failed: {e}"))));
            }
        }
    }

    /// The connection to the agent was lost.
    pub fn connection_lost(&mut self, host: &str) {
        if self.phase == Phase::Running {
            self.fail_midway(format!("the connection to {host} was lost"));
        }
    }

    /// The time passed: a job whose agent stayed silent for its lease has failed, midway.
    pub fn timeout(&mut self, host: &str, now_ms: u64) {
        // A disk's stream never came within its grace: the success is judged without it.
        if self.phase == Phase::Running && self.open.is_empty() && self.stream_grace_until.is_some_and(|g| now_ms >= g)
        {
            if let Some(outcome) = self.pending.take() {
                return self.agent_result(outcome, now_ms);
            }
        }
        if self.phase == Phase::Running && now_ms >= self.deadline {
            let ms = self.lease_ms;
            self.fail_midway(format!(
                "no word from the agent of {host} for {:?}",
                std::time::Duration::from_millis(ms)
            ));
        }
    }
}

/// A recovery point's id.
pub type RpId = [u8; 16];

impl JobMachine for VmJob {
    fn core(&self) -> &JobCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut JobCore {
        &mut self.core
    }
}

/// What one frame of a blocks-mode stream means.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Block {
        index: u64,
        id: Digest,
        data: Vec<u8>,
    },
    Zero {
        index: u64,
    },
    /// Every block announced has arrived.
    End,
}

/// A blocks-mode stream (initial copy, synchronization, express full): block and zero frames,
/// then `End` with their count. Order and range are checked where the blocks are stored.
#[derive(Debug, Default)]
pub struct BlockReceiver {
    received: u64,
    ended: bool,
}

impl BlockReceiver {
    /// The next frame: what it means, or why the stream is refused.
    pub fn frame(&mut self, frame: TransferFrame) -> Result<Received, String> {
        if self.ended {
            return Err("a frame after the end of the disk".into());
        }
        match frame {
            TransferFrame::Block { index, id, data } => {
                self.received += 1;
                Ok(Received::Block { index, id, data })
            }
            TransferFrame::Zero { index } => {
                self.received += 1;
                Ok(Received::Zero { index })
            }
            TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) => {
                if blocks_sent != self.received {
                    return Err(format!("the agent sent {blocks_sent} blocks, {} arrived", self.received));
                }
                self.ended = true;
                Ok(Received::End)
            }
            TransferFrame::Message(TransferMessage::Failed { reason }) => {
                Err(format!("the agent gave up: {}", bulwark_protocol::text::cap_reason(reason)))
            }
            other => Err(format!("unexpected frame {other:?}")),
        }
    }
}

pub mod items;
pub mod recovery;

#[cfg(test)]
mod tests;
