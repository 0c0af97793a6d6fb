//! The processes of the deterministic simulation. The coordinator runs the real job code —
//! `jobs::machine::VmJob` for each job, `BlockReceiver` and `compare::Check` for its disk's
//! stream, `DiskIngest` into the real store, the real commit — and performs its effects in
//! memory instead of over QUIC; the agents run the real sim hypervisor and speak the real wire
//! messages (`JobRequest`, `JobDone`, transfer frames, `JobResult`). Each handler is a plain
//! function of its state, the simulated time and one message, and answers the messages it
//! sends; nothing here sleeps, spawns or reads a clock.

use bulwark_agent::agent_job::{AgentEffect, AgentJob, Snapshot};
use bulwark_agent::backend::{Hypervisor, SimBackend};
use bulwark_agent::sim::{SimError, Vm};
use bulwark_coordinator::catalog::RecoveryPointRecord;
use bulwark_coordinator::catalog::{Catalog, JobKind, JobRecord, JobState};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::jobs::compare::{self, Check, CheckStep, RestoreDisk, RestoreStep};
use bulwark_coordinator::jobs::ingest::DiskIngest;
use bulwark_coordinator::jobs::machine::recovery::{Recovery, RecoverySetup};
use bulwark_coordinator::jobs::machine::{self, BlockReceiver, DiskDone, Effect, Received, Setup, VmJob};
use bulwark_coordinator::jobs::queue::{self, Admission, Limits, Next, Queue, Request};
use bulwark_coordinator::store::{Store, StoreConfig};
use bulwark_protocol::block::{ChunkHasher, Digest, ZERO};
use bulwark_protocol::blockmap::{self, PageStore, TreeRoot};
use bulwark_protocol::messages::{
    ChangeToken, Consistency, CoordinatorMessage, DiskInfo, FailureKind, JobKind as WireKind, JobOutcome, JobRequest,
    JobResult, RestoreRequest,
};
use bulwark_protocol::transfer::{TransferFrame, TransferMessage, TransferMode};
use bulwark_protocol::{DiskId, JobId};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every VM has one disk of this name.
pub const DISK: &str = "os";
/// The replicas' block size.
pub const BLOCK: u64 = 64 * 1024;
/// How long an agent holds a snapshot without the coordinator's verdict.
pub const LEASE_MS: u64 = 6_000;
/// How long the coordinator waits for word from the agent of a job.
pub const JOB_TIMEOUT_MS: u64 = 5_000;

/// The wire, as the simulation carries it: the control stream's messages and one transfer
/// stream per job (the simulation's VMs have one disk). Each lane of a connection keeps its
/// order, as a QUIC stream does; the two lanes do not keep order between them.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Coordinator → agent on the control stream (a job request, a verdict).
    Control(CoordinatorMessage),
    /// Agent → coordinator on the control stream.
    Result(JobResult),
    /// Agent → coordinator: a job's transfer stream opens.
    Open { job: u64, disk: String, mode: TransferMode, blocks: u64, block_size: u32 },
    /// A frame on a job's transfer stream, either way.
    Frame { job: u64, frame: TransferFrame },
}

impl Msg {
    /// The lane the message travels on: 0 the control stream, 1 the transfer stream.
    pub fn lane(&self) -> usize {
        match self {
            Msg::Control(_) | Msg::Result(_) => 0,
            Msg::Open { .. } | Msg::Frame { .. } => 1,
        }
    }
}

/// A message to send, `after_ms` from now (blocks go out one after another).
#[derive(Debug)]
pub struct Out {
    pub after_ms: u64,
    pub msg: Msg,
}

/// A job's transfer stream on the coordinator's side.
#[derive(Debug)]
enum Stream {
    Blocks { receiver: BlockReceiver, disk: DiskIngest },
    Check { check: Box<Check>, disk: Option<DiskIngest> },
}

/// The coordinator's volatile view of one running job.
#[derive(Debug)]
pub struct RunningJob {
    pub id: u64,
    pub vm: String,
    pub host: usize,
    machine: VmJob,
    stream: Option<(String, Stream)>,
}

/// The coordinator: the real store and catalog on disk; the real job queue, jobs and the
/// schedule in memory.
pub struct Coordinator {
    pub store: Store,
    /// Running jobs by id.
    pub jobs: BTreeMap<u64, RunningJob>,
    pub queue: Queue,
    /// Jobs in the queue, not running: their VM.
    waiting: BTreeMap<u64, String>,
    /// Recoveries running, by job id.
    pub recoveries: BTreeMap<u64, RunningRecovery>,
    /// Recoveries that ended: (VM recovered, recovery point, target VM, outcome).
    pub recovered: Vec<(String, RecoveryPointRecord, String, Result<(), String>)>,
    pub next_backup_at: BTreeMap<String, u64>,
    disk_bytes: u64,
    broken: Option<Break>,
    /// Jobs that committed, by kind (`initial`, `express_full`, `consistency_check`).
    pub committed: BTreeMap<&'static str, u64>,
}

/// What went wrong in the store: the simulation stops with it (a real error, not a fault).
pub type StoreFailure = String;

fn host_name(h: usize) -> String {
    format!("node{}", h + 1)
}

impl Coordinator {
    /// Opens (or creates) the coordinator's store in `dir`; like the real coordinator's start,
    /// jobs a killed run left running are failed and their replicas' continuity questioned
    /// (`recover_interrupted`).
    pub fn open(dir: &Path, disk_bytes: u64, now: u64, broken: Option<Break>) -> Result<Coordinator, StoreFailure> {
        let data = DataDir::new(dir);
        let catalog =
            if data.catalog().exists() { Catalog::open(&data.catalog()) } else { Catalog::create(&data.catalog()) }
                .map_err(|e| format!("catalog: {e}"))?;
        let config = StoreConfig { pack_max_bytes: 1 << 20, gc_filter_bytes: 1 << 16, ..StoreConfig::default() };
        bulwark_coordinator::jobs::recover_interrupted(&catalog, now / 1000).map_err(|e| e.to_string())?;
        let store = Store::open(&data, catalog, config).map_err(|e| format!("store: {e}"))?;
        let mut queue = Queue::new(Limits { max_running: 8, per_agent: 4 }, now);
        if broken == Some(Break::SecondJob) {
            queue.break_one_job_per_vm();
        }
        Ok(Coordinator {
            store,
            jobs: BTreeMap::new(),
            queue,
            waiting: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            recovered: vec![],
            next_backup_at: BTreeMap::new(),
            disk_bytes,
            broken,
            committed: BTreeMap::new(),
        })
    }

    /// Asks the queue for `vm`'s jobs as the group's sweep and schedule do: a consistency
    /// check of an inconsistent replica (`cc_when_inconsistent`) or a scheduled one (`cc_at`,
    /// when `check` says so), then the scheduled express full (which waits for the check: one
    /// job per VM at a time).
    pub fn schedule(&mut self, vm: &str, host: usize, check: bool, now: u64) -> Result<(), StoreFailure> {
        let inconsistent = self
            .store
            .catalog()
            .replicas_of(vm)
            .map_err(|e| e.to_string())?
            .iter()
            .any(|r| r.state == bulwark_coordinator::catalog::ReplicaState::Inconsistent);
        if inconsistent || check {
            self.enqueue(vm, JobKind::ConsistencyCheck, host, now)?;
        }
        self.enqueue(vm, JobKind::ExpressFull, host, now)
    }

    fn enqueue(&mut self, vm: &str, kind: JobKind, host: usize, now: u64) -> Result<(), StoreFailure> {
        let cat = self.store.catalog();
        let req = Request { vm: vm.to_owned(), kind, automatic: true, recovery: false, host: Some(host_name(host)) };
        if let Ok(Admission::New) = self.queue.admit(&req, now) {
            let id = cat.next_job_id().map_err(|e| e.to_string())?;
            cat.put_job(&JobRecord::queued(id, kind, Some(vm.to_owned()))).map_err(|e| e.to_string())?;
            if self.queue.enqueue(id, req, now).is_ok() {
                self.waiting.insert(id, vm.to_owned());
            }
        }
        Ok(())
    }

    /// Starts what the queue says may start now (after moving waiting jobs to their VM's
    /// current host, `host_of`); answers (host, message) to send.
    pub fn start_due(
        &mut self,
        now: u64,
        host_of: impl Fn(&str) -> Option<usize>,
    ) -> Result<Vec<(usize, Msg)>, StoreFailure> {
        for (id, vm) in &self.waiting {
            self.queue.relocate(*id, host_of(vm).map(host_name));
        }
        let mut out = vec![];
        while let Some(next) = self.queue.next_to_start(now) {
            match next {
                Next::Start { job, .. } => {
                    let Some(vm) = self.waiting.remove(&job) else { continue };
                    let Some(host) = host_of(&vm) else { continue };
                    out.extend(self.dispatch(job, &vm, host, now)?.into_iter().map(|m| (host, m)));
                }
                Next::GiveUp { job, reason } => {
                    self.waiting.remove(&job);
                    let cat = self.store.catalog();
                    if let Some(mut r) = cat.job(job).map_err(|e| e.to_string())? {
                        r.state = JobState::Failed;
                        r.error = Some(reason);
                        cat.put_job(&r).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Runs job `id` of `vm` on `host`: the real planning turns an express full into an
    /// initial copy without a complete replica, and refuses it for an inconsistent one.
    fn dispatch(&mut self, id: u64, vm: &str, host: usize, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let cat = self.store.catalog();
        let replicas: HashMap<_, _> =
            cat.replicas_of(vm).map_err(|e| e.to_string())?.into_iter().map(|r| (r.disk.clone(), r)).collect();
        let disks = vec![DiskInfo { name: DiskId::new(DISK).map_err(|e| e.to_string())?, size_bytes: self.disk_bytes }];
        let kind = cat.job(id).map_err(|e| e.to_string())?.map_or(JobKind::ExpressFull, |r| r.kind);
        let record = JobRecord {
            state: JobState::Running,
            started_at: Some(now / 1000),
            ..JobRecord::queued(id, kind, Some(vm.to_owned()))
        };
        let setup = Setup {
            record: record.clone(),
            vm: vm.to_owned(),
            disks,
            replicas,
            block_size: BLOCK as u32,
            id_key: self.store.codec().hasher.id_key(),
            lease_ms: JOB_TIMEOUT_MS,
        };
        let mut machine = match VmJob::start(setup, now) {
            Ok(m) => m,
            Err(f) => {
                let record = JobRecord {
                    state: JobState::Failed,
                    error: Some(f.reason),
                    finished_at: Some(now / 1000),
                    ..record
                };
                cat.put_job(&record).map_err(|e| e.to_string())?;
                let outcome = queue::Outcome::Failed { ran_as: kind, transient: f.retry };
                if let Some(queue::AfterFinish::Retry { .. }) = self.queue.finished(id, outcome, now) {
                    self.waiting.insert(id, vm.to_owned());
                }
                return Ok(vec![]);
            }
        };
        if self.broken == Some(Break::CommitEarly) {
            machine.break_with(machine::Broken::CommitBeforeEveryDisk);
        }
        cat.put_job(machine.record()).map_err(|e| e.to_string())?;
        self.jobs.insert(id, RunningJob { id, vm: vm.to_owned(), host, machine, stream: None });
        self.perform(id, now)
    }

    /// VMs with more than one job running (none, unless the queue is broken).
    pub fn vms_running_twice(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.jobs.values().filter(|j| !seen.insert(j.vm.clone())).map(|j| j.vm.clone()).collect()
    }

    /// Performs what job `id` asks for; answers the messages to its agent.
    fn perform(&mut self, id: u64, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let mut out = vec![];
        loop {
            let Some(j) = self.jobs.get_mut(&id) else { return Ok(out) };
            let vm = j.vm.clone();
            let Some(effect) = j.machine.poll_effect() else { return Ok(out) };
            let cat = self.store.catalog();
            match effect {
                Effect::PutReplica(r) => cat.put_replica(&r).map_err(|e| e.to_string())?,
                Effect::Send(m) => out.push(Msg::Control(m)),
                Effect::Commit { replicas, rp } => {
                    let ingest = self.store.begin();
                    let r = match rp {
                        Some(rp) => self.store.commit_recovery_point(ingest, rp, replicas).map(|r| Some(r.id)),
                        None => self.store.commit_replicas(ingest, replicas).map(|()| None),
                    };
                    // A commit that fails is a store failure here: the simulation has no full disk.
                    let r = r.map_err(|e| format!("job {}: commit: {e}", j.id))?;
                    j.machine.committed(Ok(r));
                }
                Effect::MarkInconsistent(why) => {
                    cat.mark_inconsistent(&vm, &why, now / 1000).map_err(|e| e.to_string())?;
                }
                // The simulation's disks hold no swap.
                Effect::FindSwap(_) => {}
                Effect::Save => {}
                Effect::Finished => {
                    let mut record = j.machine.record().clone();
                    let ok = matches!(j.machine.outcome(), Some(Ok(())));
                    record.state = if ok { JobState::Succeeded } else { JobState::Failed };
                    record.finished_at = Some(now / 1000);
                    cat.put_job(&record).map_err(|e| e.to_string())?;
                    let outcome = match j.machine.outcome() {
                        Some(Ok(())) => queue::Outcome::Succeeded { ran_as: record.kind },
                        Some(Err(f)) => queue::Outcome::Failed { ran_as: record.kind, transient: f.retry },
                        None => queue::Outcome::Failed { ran_as: record.kind, transient: false },
                    };
                    if ok {
                        *self.committed.entry(record.kind.as_str()).or_default() += 1;
                    }
                    self.jobs.remove(&id);
                    if let Some(queue::AfterFinish::Retry { .. }) = self.queue.finished(id, outcome, now) {
                        self.waiting.insert(id, vm.clone());
                    }
                }
            }
        }
    }

    /// A message from an agent; answers what to send back.
    pub fn receive(&mut self, msg: Msg, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let job = match &msg {
            Msg::Result(r) => r.job.0,
            Msg::Open { job, .. } | Msg::Frame { job, .. } => *job,
            Msg::Control(_) => return Ok(vec![]),
        };
        if self.recoveries.contains_key(&job) {
            return self.recovery_receive(job, msg, now);
        }
        // A job that is over (or from before a restart) takes nothing more.
        if !self.jobs.contains_key(&job) {
            return Ok(match msg {
                Msg::Open { .. } => vec![failed(job, "no such job")],
                _ => vec![],
            });
        };
        let mut out = vec![];
        match msg {
            Msg::Result(r) => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.machine.agent_result(r.outcome, now);
                }
            }
            Msg::Open { disk, mode, blocks, block_size, .. } => {
                let Some(j) = self.jobs.get_mut(&job) else { return Ok(out) };
                match j.machine.stream_opened(&disk, mode, blocks, block_size, now) {
                    Ok(start) => {
                        let stream = match start.mode {
                            TransferMode::Compare => {
                                Stream::Check { check: Box::new(Check::new(start.blocks, start.old)), disk: None }
                            }
                            _ => Stream::Blocks {
                                receiver: BlockReceiver::default(),
                                disk: DiskIngest::new(start.blocks, start.old),
                            },
                        };
                        j.stream = Some((disk, stream));
                    }
                    Err(why) => out.push(failed(job, &why)),
                }
            }
            Msg::Frame { frame, .. } => out.extend(self.frame(job, frame, now)?),
            Msg::Control(_) => {}
        }
        out.extend(self.perform(job, now)?);
        Ok(out)
    }

    /// A frame on job `job`'s stream.
    fn frame(&mut self, job: u64, frame: TransferFrame, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let Some(j) = self.jobs.get_mut(&job) else { return Ok(vec![]) };
        let Some((name, stream)) = j.stream.take() else { return Ok(vec![]) };
        let mut out = vec![];
        let r: Result<Option<DiskDone>, String> = match stream {
            Stream::Blocks { mut receiver, mut disk } => {
                let mut ingest = self.store.begin();
                match receiver.frame(frame) {
                    Ok(Received::Block { index, id, data }) => disk.block(&mut ingest, index, &id, &data).map(|()| {
                        j.stream = Some((name.clone(), Stream::Blocks { receiver, disk }));
                        None
                    }),
                    Ok(Received::Zero { index }) => disk.zero(&mut ingest, index).map(|()| {
                        j.stream = Some((name.clone(), Stream::Blocks { receiver, disk }));
                        None
                    }),
                    Ok(Received::End) => disk.end(&mut ingest).map(|(root, changed)| Some(DiskDone { root, changed })),
                    Err(why) => Err(why),
                }
            }
            Stream::Check { mut check, mut disk } => {
                let r = run_check(&self.store, &mut check, &mut disk, frame, &mut out, job);
                if matches!(r, Ok(None)) {
                    j.stream = Some((name.clone(), Stream::Check { check, disk }));
                }
                r
            }
        };
        match r {
            Ok(None) => {}
            Ok(Some(done)) => {
                j.machine.disk_done(&name, done, now);
                out.push(Msg::Frame {
                    job,
                    frame: TransferFrame::Message(TransferMessage::Stored { blocks: done.changed }),
                });
            }
            Err(why) => {
                j.machine.disk_failed(&name, &why);
                out.push(failed(job, &why));
            }
        }
        Ok(out)
    }

    /// Recovers `vm`'s latest recovery point as a new VM `target` on `host`, as `bulwark
    /// recover --to-host` does; answers what to send to that host.
    pub fn recover(&mut self, vm: &str, target: &str, host: usize, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let cat = self.store.catalog();
        let mut rps = cat.recovery_points(vm).map_err(|e| e.to_string())?;
        rps.sort_by_key(|r| r.created_at);
        let Some(rp) = rps.pop() else { return Ok(vec![]) };
        let id = cat.next_job_id().map_err(|e| e.to_string())?;
        let setup = RecoverySetup {
            record: JobRecord {
                state: JobState::Running,
                ..JobRecord::queued(id, JobKind::Recovery, Some(vm.to_owned()))
            },
            rp: rp.clone(),
            vm_host: host_name(host),
            os: bulwark_protocol::messages::GuestOs::Linux,
            to_host: Some(host_name(host)),
            name: Some(target.to_owned()),
            id_key: self.store.codec().hasher.id_key(),
            lease_ms: JOB_TIMEOUT_MS,
        };
        let machine = match Recovery::start(setup, now) {
            Ok(m) => m,
            Err(f) => {
                self.recovered.push((vm.to_owned(), rp, target.to_owned(), Err(f.reason)));
                return Ok(vec![]);
            }
        };
        let run = RunningRecovery { vm: vm.to_owned(), rp, host, machine, stream: None };
        self.recoveries.insert(id, run);
        self.perform_recovery(id)
    }

    fn perform_recovery(&mut self, id: u64) -> Result<Vec<Msg>, StoreFailure> {
        let mut out = vec![];
        loop {
            let Some(r) = self.recoveries.get_mut(&id) else { return Ok(out) };
            let Some(effect) = r.machine.poll_effect() else { return Ok(out) };
            match effect {
                Effect::Send(m) => out.push(Msg::Control(m)),
                Effect::Finished => {
                    if let Some(r) = self.recoveries.remove(&id) {
                        let outcome = match r.machine.outcome() {
                            Some(Ok(())) => Ok(()),
                            Some(Err(f)) => Err(f.reason.clone()),
                            None => Err("no outcome".into()),
                        };
                        self.store.catalog().put_job(r.machine.record()).map_err(|e| e.to_string())?;
                        self.recovered.push((r.vm, r.rp, r.machine.target().to_owned(), outcome));
                    }
                }
                Effect::Save
                | Effect::PutReplica(_)
                | Effect::Commit { .. }
                | Effect::MarkInconsistent(_)
                | Effect::FindSwap(_) => {}
            }
        }
    }

    fn recovery_receive(&mut self, job: u64, msg: Msg, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let mut out = vec![];
        let Some(r) = self.recoveries.get_mut(&job) else { return Ok(out) };
        match msg {
            Msg::Result(res) => r.machine.agent_result(res.outcome, now),
            Msg::Open { disk, mode, blocks, block_size, .. } => {
                match r.machine.stream_opened(&disk, mode, blocks, block_size, now) {
                    Ok(root) => {
                        let mut restore = RestoreDisk::new(root);
                        if self.broken == Some(Break::RestoreOutOfOrder) {
                            restore.break_with(compare::BrokenRestore::OutOfOrder);
                        }
                        r.stream = Some((disk, restore));
                    }
                    Err(why) => out.push(failed(job, &why)),
                }
            }
            Msg::Frame { frame, .. } => {
                if let Some((disk, mut restore)) = r.stream.take() {
                    match run_restore(&self.store, &mut restore, frame, &mut out, job) {
                        Ok(true) => r.machine.disk_restored(&disk, now),
                        Ok(false) => r.stream = Some((disk, restore)),
                        Err(why) => {
                            r.machine.disk_failed(&disk, &why);
                            out.push(failed(job, &why));
                        }
                    }
                }
            }
            Msg::Control(_) => {}
        }
        out.extend(self.perform_recovery(job)?);
        Ok(out)
    }

    /// Jobs whose agent fell silent past their deadline fail as the real job does.
    pub fn expire(&mut self, now: u64) -> Result<Vec<(usize, Msg)>, StoreFailure> {
        let late: Vec<(u64, usize)> = self
            .jobs
            .values()
            .filter(|j| j.machine.next_timeout().is_some_and(|t| t <= now))
            .map(|j| (j.id, j.host))
            .collect();
        let mut out = vec![];
        for (id, host) in late {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.machine.timeout(&host_name(host), now);
            }
            out.extend(self.perform(id, now)?.into_iter().map(|m| (host, m)));
        }
        let late: Vec<(u64, usize)> = self
            .recoveries
            .iter()
            .filter(|(_, r)| r.machine.next_timeout().is_some_and(|t| t <= now))
            .map(|(id, r)| (*id, r.host))
            .collect();
        for (id, host) in late {
            if let Some(r) = self.recoveries.get_mut(&id) {
                r.machine.timeout(now);
            }
            out.extend(self.perform_recovery(id)?.into_iter().map(|m| (host, m)));
        }
        Ok(out)
    }
}

/// A `Failed` frame on a job's stream.
fn failed(job: u64, why: &str) -> Msg {
    Msg::Frame { job, frame: TransferFrame::Message(TransferMessage::Failed { reason: why.to_owned() }) }
}

/// A recovery the coordinator runs: the real `Recovery` and its disk's `RestoreDisk`.
#[derive(Debug)]
pub struct RunningRecovery {
    pub vm: String,
    rp: RecoveryPointRecord,
    pub host: usize,
    machine: Recovery,
    stream: Option<(String, RestoreDisk)>,
}

/// Feeds one frame to a disk's restore and performs its steps against the store; answers
/// whether the disk is restored.
fn run_restore(
    store: &Store,
    restore: &mut RestoreDisk,
    frame: TransferFrame,
    out: &mut Vec<Msg>,
    job: u64,
) -> Result<bool, String> {
    let mut steps: std::collections::VecDeque<RestoreStep> = restore.frame(frame)?.into();
    while let Some(step) = steps.pop_front() {
        match step {
            RestoreStep::Say(m) => out.push(Msg::Frame { job, frame: TransferFrame::Message(m) }),
            RestoreStep::Scanned(_) => {}
            RestoreStep::Ours(nodes) => {
                let rp = restore.rp();
                let ours = compare::our_entries(store, Some(&rp), rp.blocks, &nodes)?;
                steps.extend(restore.ours(ours)?);
            }
            RestoreStep::Send(want) => {
                let rp = restore.rp();
                for &index in &want {
                    let page =
                        blockmap::node_entries(&bulwark_coordinator::store::StorePages(store), &rp, 0, index / 1024)
                            .map_err(|e| e.to_string())?;
                    let id = page.get((index % 1024) as usize).copied().ok_or("a leaf outside the tree")?;
                    let frame = if id == ZERO {
                        TransferFrame::Zero { index }
                    } else {
                        TransferFrame::Block { index, id, data: store.read_chunk(&id).map_err(|e| e.to_string())? }
                    };
                    out.push(Msg::Frame { job, frame });
                }
                steps.extend(restore.sent(want.len() as u64)?);
            }
            RestoreStep::Done => return Ok(true),
        }
    }
    Ok(false)
}

/// Feeds one frame to a consistency check and performs its steps against the store; answers
/// the disk once it is stored.
fn run_check(
    store: &Store,
    check: &mut Check,
    disk: &mut Option<DiskIngest>,
    frame: TransferFrame,
    out: &mut Vec<Msg>,
    job: u64,
) -> Result<Option<DiskDone>, String> {
    let mut steps: std::collections::VecDeque<CheckStep> = check.frame(frame)?.into();
    let mut ingest = store.begin();
    while let Some(step) = steps.pop_front() {
        match step {
            CheckStep::Say(m) => out.push(Msg::Frame { job, frame: TransferFrame::Message(m) }),
            CheckStep::Ours(nodes) => {
                let base = check.base();
                steps.extend(match compare::our_entries(store, base.as_ref(), check.blocks(), &nodes) {
                    Ok(ours) => check.ours(ours)?,
                    Err(e) => check.our_tree_unreadable(&e)?,
                });
            }
            CheckStep::BadLeaves => {
                let bad = match check.base() {
                    Some(b) => compare::bad_leaves(store, &b)?,
                    None => vec![],
                };
                steps.extend(check.bad_leaves(bad));
            }
            CheckStep::Scanned(_) => {}
            CheckStep::Begin { blocks, old } => *disk = Some(DiskIngest::new(blocks, old)),
            CheckStep::Block { index, id, data } => {
                disk.as_mut().ok_or("a block before the disk began")?.block(&mut ingest, index, &id, &data)?;
            }
            CheckStep::Zero { index } => {
                disk.as_mut().ok_or("a block before the disk began")?.zero(&mut ingest, index)?
            }
            CheckStep::EndDisk => {
                let d = disk.take().ok_or("the end of a disk that never began")?;
                let (root, changed) = d.end(&mut ingest)?;
                check.stored(root)?;
                return Ok(Some(DiskDone { root, changed }));
            }
        }
    }
    Ok(None)
}

/// A job an agent runs: the real `AgentJob`, and what the simulation keeps beside it.
#[derive(Debug)]
pub struct Held {
    pub job: u64,
    machine: AgentJob,
    /// The request, for its disks' geometry.
    block_size: u64,
    id_key: Option<[u8; 32]>,
    /// The snapshot's lease: a job whose coordinator went quiet before the verdict was due is
    /// aborted when it runs out (the real agent learns it from its dead connection).
    pub lease_until: u64,
    /// What the snapshot gave (for a check's result).
    consistency: Consistency,
    /// A consistency check's side, while the coordinator compares.
    check: Option<AgentCheck>,
}

/// An agent's half of a consistency check: its snapshot hashed into a tree.
#[derive(Debug, Clone)]
struct AgentCheck {
    root: TreeRoot,
    pages: MemPages,
    size: u64,
    sent: u64,
}

/// A deliberately broken build, to show the simulation bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The real job (`VmJob`, `broken-builds` feature) commits as soon as the agent says
    /// everything is sent, without waiting for the disk still on its way.
    CommitEarly,
    /// The real queue (`broken-builds` feature) starts a VM's second job while its first runs.
    SecondJob,
    /// The real agent job (`broken-builds` feature) confirms its changes when it reports,
    /// before the coordinator's verdict.
    ConfirmEarly,
    /// The real restore (`broken-builds` feature) sends leaves out of order, one twice.
    RestoreOutOfOrder,
}

/// The pages of an agent's snapshot tree, in memory.
#[derive(Debug, Clone, Default)]
struct MemPages(HashMap<Digest, Vec<u8>>);

impl PageStore for MemPages {
    type Error = std::io::Error;
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, std::io::Error> {
        self.0.get(id).cloned().ok_or_else(|| std::io::Error::other("no such page"))
    }
    fn save_page(&mut self, bytes: &[u8], _: Option<(&Digest, &[u8])>) -> Result<Digest, std::io::Error> {
        let id = *blake3::hash(bytes).as_bytes();
        self.0.insert(id, bytes.to_vec());
        Ok(id)
    }
}

/// An agent: its snapshots are in the sim's files; what it holds for which job is volatile.
pub struct Agent {
    pub host: String,
    /// Jobs by VM.
    pub held: BTreeMap<String, Held>,
    /// Recoveries by job id.
    pub restores: BTreeMap<u64, AgentRestore>,
    root: PathBuf,
    broken: Option<Break>,
}

/// A recovery an agent runs: the sim's restore calls, with the real agent's checks (ids,
/// order, range, the count at the end).
#[derive(Debug)]
pub struct AgentRestore {
    vm: String,
    disk: String,
    size: u64,
    block_size: u64,
    id_key: Option<[u8; 32]>,
    root: TreeRoot,
    pages: MemPages,
    last: Option<u64>,
    received: u64,
    written: u64,
}

fn sim_err(e: SimError) -> String {
    e.to_string()
}

impl Agent {
    /// Starts an agent: first it cleans what a dead one of its host left (thaw, release,
    /// changes merged back), as the real agent does at start-up.
    pub fn start(root: &Path, host: &str, broken: Option<Break>) -> Result<Agent, String> {
        bulwark_agent::sim::cleanup_orphans(root, host).map_err(sim_err)?;
        Ok(Agent {
            host: host.to_owned(),
            held: BTreeMap::new(),
            restores: BTreeMap::new(),
            root: root.to_owned(),
            broken,
        })
    }

    /// A message from the coordinator; answers what to send back, in order.
    pub fn receive(&mut self, msg: Msg, now: u64) -> Result<Vec<Out>, String> {
        match msg {
            Msg::Control(CoordinatorMessage::JobRequest(req)) => self.start_job(req, now),
            Msg::Control(CoordinatorMessage::RestoreRequest(req)) => self.start_restore(req),
            Msg::Frame { job, frame } if self.restores.contains_key(&job) => self.restore_frame(job, frame),
            Msg::Control(CoordinatorMessage::JobDone { job, committed }) => {
                let Some(vm) = self.vm_of(job.0) else { return Ok(vec![]) };
                if let Some(h) = self.held.get_mut(&vm) {
                    h.machine.verdict(committed);
                }
                self.perform(&vm, now)
            }
            Msg::Frame { job, frame } => self.frame(job, frame, now),
            _ => Ok(vec![]),
        }
    }

    fn vm_of(&self, job: u64) -> Option<String> {
        self.held.iter().find(|(_, h)| h.job == job).map(|(v, _)| v.clone())
    }

    /// A recovery: the VM is created (or marked) as being restored, its disk hashed, and the
    /// stream opened with the disk's root.
    fn start_restore(&mut self, req: RestoreRequest) -> Result<Vec<Out>, String> {
        let job = req.job;
        let fail = |why: String| {
            let outcome = JobOutcome::Failed { kind: FailureKind::Other, reason: why };
            Ok(vec![Out { after_ms: 0, msg: Msg::Result(JobResult { job, outcome }) }])
        };
        let [disk] = req.disks.as_slice() else { return fail("the simulation restores one disk".into()) };
        let backend = SimBackend { root: self.root.clone() };
        let vm = req.vm.as_str().to_owned();
        let what = format!("recovery job {}", job.0);
        if let Err(e) =
            backend.restore_begin(&vm, &self.host, &what, req.create.as_ref().map(|c| (c, req.disks.as_slice())))
        {
            return fail(e.to_string());
        }
        let bs = u64::from(req.block_size);
        let size = disk.size_bytes;
        let blocks = size.div_ceil(bs);
        let hasher = req.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
        let v = Vm::open(&self.root, &vm).map_err(sim_err)?;
        let mut leaves = vec![];
        for index in 0..blocks {
            let offset = index * bs;
            let mut buf = vec![0u8; bs.min(size - offset) as usize];
            v.guest_read(disk.name.as_str(), offset, &mut buf).map_err(sim_err)?;
            let id = hasher.id(&buf);
            if id != ZERO {
                leaves.push((index, id));
            }
        }
        let mut pages = MemPages::default();
        let root = blockmap::update(&mut pages, None, blocks, leaves).map_err(|e| e.to_string())?;
        let restore = AgentRestore {
            vm,
            disk: disk.name.to_string(),
            size,
            block_size: bs,
            id_key: req.id_key,
            root,
            pages,
            last: None,
            received: 0,
            written: 0,
        };
        self.restores.insert(job.0, restore);
        let open = Msg::Open {
            job: job.0,
            disk: disk.name.to_string(),
            mode: TransferMode::Restore,
            blocks,
            block_size: req.block_size,
        };
        let frame = TransferFrame::Message(TransferMessage::Root { root, bytes_read: size });
        Ok(vec![Out { after_ms: 0, msg: open }, Out { after_ms: 1, msg: Msg::Frame { job: job.0, frame } }])
    }

    /// A frame of a recovery's stream.
    fn restore_frame(&mut self, job: u64, frame: TransferFrame) -> Result<Vec<Out>, String> {
        let say = |m| Out { after_ms: 0, msg: Msg::Frame { job, frame: TransferFrame::Message(m) } };
        let result = |outcome| Out { after_ms: 0, msg: Msg::Result(JobResult { job: JobId(job), outcome }) };
        let Some(r) = self.restores.get_mut(&job) else { return Ok(vec![]) };
        let step: Result<Option<Vec<Out>>, String> = (|| {
            let (index, data) = match frame {
                TransferFrame::Message(TransferMessage::WantPages { nodes }) => {
                    let pages = nodes
                        .iter()
                        .map(|&(l, i)| blockmap::node_entries(&r.pages, &r.root, l, i))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())?;
                    return Ok(Some(vec![say(TransferMessage::Pages { pages })]));
                }
                TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) if blocks_sent == r.received => {
                    return Ok(None);
                }
                TransferFrame::Message(TransferMessage::Failed { reason }) => {
                    return Err(format!("the coordinator stopped the restore: {reason}"));
                }
                TransferFrame::Block { index, id, data } => {
                    if r.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed).id(&data) != id {
                        return Err(format!("block {index} does not match its id"));
                    }
                    (index, data)
                }
                TransferFrame::Zero { index } => {
                    let len = r.block_size.min(r.size.saturating_sub(index.saturating_mul(r.block_size))) as usize;
                    (index, vec![0u8; len])
                }
                other => return Err(format!("unexpected frame in a restore: {other:?}")),
            };
            let blocks = r.size.div_ceil(r.block_size);
            if index >= blocks || r.last.is_some_and(|l| index <= l) {
                return Err(format!("block {index} is out of order or outside the disk"));
            }
            r.last = Some(index);
            r.received += 1;
            r.written += data.len() as u64;
            let v = Vm::open(&self.root, &r.vm).map_err(sim_err)?;
            v.restore_write(&r.disk, index * r.block_size, &data).map_err(sim_err)?;
            Ok(Some(vec![]))
        })();
        match step {
            Ok(Some(out)) => Ok(out),
            Ok(None) => {
                let Some(r) = self.restores.remove(&job) else { return Ok(vec![]) };
                let mut v = Vm::open(&self.root, &r.vm).map_err(sim_err)?;
                v.restore_finish().map_err(sim_err)?;
                let outcome = JobOutcome::Restored { bytes_read: r.size, bytes_written: r.written, skipped: vec![] };
                Ok(vec![say(TransferMessage::Stored { blocks: r.received }), result(outcome)])
            }
            Err(why) => {
                // The VM stays marked as being restored: a recovery that completes clears it.
                self.restores.remove(&job);
                Ok(vec![
                    say(TransferMessage::Failed { reason: why.clone() }),
                    result(JobOutcome::Failed { kind: FailureKind::Other, reason: why }),
                ])
            }
        }
    }

    fn start_job(&mut self, req: JobRequest, now: u64) -> Result<Vec<Out>, String> {
        let name = req.vm.as_str().to_owned();
        if self.held.contains_key(&name) {
            // One job per VM on an agent: the second is refused at once.
            let outcome =
                JobOutcome::Failed { kind: FailureKind::Other, reason: "the VM holds a snapshot already".into() };
            return Ok(vec![Out { after_ms: 0, msg: Msg::Result(JobResult { job: req.job, outcome }) }]);
        }
        let mut machine = AgentJob::new(&req, LEASE_MS);
        if self.broken == Some(Break::ConfirmEarly) {
            machine.break_with(bulwark_agent::agent_job::Broken::ConfirmBeforeVerdict);
        }
        let held = Held {
            job: req.job.0,
            machine,
            block_size: u64::from(req.block_size),
            id_key: req.id_key,
            lease_until: now + LEASE_MS,
            consistency: Consistency::Crash,
            check: None,
        };
        self.held.insert(name.clone(), held);
        self.perform(&name, now)
    }

    /// Performs what `vm`'s job asks for against the sim hypervisor; answers what to send.
    fn perform(&mut self, vm: &str, now: u64) -> Result<Vec<Out>, String> {
        let mut out = vec![];
        loop {
            let Some(h) = self.held.get_mut(vm) else { return Ok(out) };
            let Some(effect) = h.machine.poll_effect() else { return Ok(out) };
            let job = h.job;
            match effect {
                AgentEffect::Take => {
                    let r = take(&self.root, &self.host, vm, now);
                    if let Ok(s) = &r {
                        h.consistency = s.consistency;
                    }
                    h.machine.taken(r);
                }
                AgentEffect::SendDisk(d) => {
                    let (bs, id_key, kind) = (h.block_size, h.id_key, h.machine.kind());
                    let hasher = id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
                    let v = Vm::open(&self.root, vm).map_err(sim_err)?;
                    let size = v.config.disks.first().map_or(0, |d| d.size);
                    let blocks = size.div_ceil(bs);
                    let read = |index: u64| -> Result<(Digest, Vec<u8>), String> {
                        let offset = index * bs;
                        let mut buf = vec![0u8; bs.min(size - offset) as usize];
                        v.snapshot_read(DISK, offset, &mut buf).map_err(sim_err)?;
                        Ok((hasher.id(&buf), buf))
                    };
                    let open = |mode| Out {
                        after_ms: 0,
                        msg: Msg::Open { job, disk: DISK.into(), mode, blocks, block_size: bs as u32 },
                    };
                    if kind == WireKind::ConsistencyCheck {
                        let mut pages = MemPages::default();
                        let mut leaves = vec![];
                        for index in 0..blocks {
                            let (id, _) = read(index)?;
                            if id != ZERO {
                                leaves.push((index, id));
                            }
                        }
                        let root = blockmap::update(&mut pages, None, blocks, leaves).map_err(|e| e.to_string())?;
                        out.push(open(TransferMode::Compare));
                        let frame = TransferFrame::Message(TransferMessage::Root { root, bytes_read: size });
                        out.push(Out { after_ms: 1, msg: Msg::Frame { job, frame } });
                        h.check = Some(AgentCheck { root, pages, size, sent: 0 });
                        // The disk is sent once the coordinator has asked for what differs.
                        continue;
                    }
                    let indices: Result<Vec<u64>, SimError> = match kind {
                        WireKind::ExpressFull | WireKind::Sync => {
                            v.changes_since(DISK, d.token).map(|m| m.dirty_blocks(bs))
                        }
                        _ => Ok((0..blocks).collect()),
                    };
                    let indices = match indices {
                        Ok(i) => i,
                        Err(SimError::TrackingLost { .. }) => {
                            h.machine.disk_sent(Err((FailureKind::TrackingLost, "change tracking was lost".into())));
                            continue;
                        }
                        Err(e) => return Err(sim_err(e)),
                    };
                    out.push(open(TransferMode::Blocks));
                    for (i, &index) in indices.iter().enumerate() {
                        let (id, data) = read(index)?;
                        let frame = if id == ZERO {
                            TransferFrame::Zero { index }
                        } else {
                            TransferFrame::Block { index, id, data }
                        };
                        out.push(Out { after_ms: i as u64, msg: Msg::Frame { job, frame } });
                    }
                    let sent = indices.len() as u64;
                    let end = TransferFrame::Message(TransferMessage::End { blocks_sent: sent, bytes_read: sent * bs });
                    out.push(Out { after_ms: sent, msg: Msg::Frame { job, frame: end } });
                    // The real agent waits for `Stored` first; this one reports at once, and
                    // its result (on the control stream) may overtake the last blocks.
                    h.machine.disk_sent(Ok((sent, sent * bs)));
                }
                AgentEffect::Report(outcome) => {
                    let after_ms = out.last().map_or(0, |o: &Out| o.after_ms);
                    out.push(Out { after_ms, msg: Msg::Result(JobResult { job: JobId(job), outcome }) });
                    h.machine.reported(true, now);
                }
                AgentEffect::Release { commit } => {
                    finish(&self.root, vm, commit)?;
                    h.machine.released();
                }
                AgentEffect::Done => {
                    self.held.remove(vm);
                }
            }
        }
    }

    /// A frame on a job's stream: a check's questions, `Stored` or `Failed`.
    fn frame(&mut self, job: u64, frame: TransferFrame, now: u64) -> Result<Vec<Out>, String> {
        let Some(vm) = self.vm_of(job) else { return Ok(vec![]) };
        let Some(h) = self.held.get_mut(&vm) else { return Ok(vec![]) };
        h.lease_until = now + LEASE_MS;
        let say = |m| Out { after_ms: 0, msg: Msg::Frame { job, frame: TransferFrame::Message(m) } };
        let mut out = vec![];
        match frame {
            TransferFrame::Message(TransferMessage::WantPages { nodes }) => {
                let Some(c) = h.check.as_ref() else { return Ok(vec![]) };
                let answer = nodes
                    .iter()
                    .map(|&(l, i)| blockmap::node_entries(&c.pages, &c.root, l, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                out.push(say(TransferMessage::Pages { pages: answer }));
            }
            TransferFrame::Message(TransferMessage::WantBlocks { indices }) if indices.is_empty() => {
                let Some(c) = h.check.take() else { return Ok(vec![]) };
                out.push(say(TransferMessage::End { blocks_sent: c.sent, bytes_read: c.size }));
                h.machine.disk_sent(Ok((c.sent, c.size)));
            }
            TransferFrame::Message(TransferMessage::WantBlocks { indices }) => {
                let v = Vm::open(&self.root, &vm).map_err(sim_err)?;
                let hasher = h.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
                let bs = h.block_size;
                let Some(c) = h.check.as_mut() else { return Ok(vec![]) };
                for (i, index) in indices.iter().copied().enumerate() {
                    let offset = index * bs;
                    let mut buf = vec![0u8; bs.min(c.size.saturating_sub(offset)) as usize];
                    v.snapshot_read(DISK, offset, &mut buf).map_err(sim_err)?;
                    let id = hasher.id(&buf);
                    let frame = if id == ZERO {
                        TransferFrame::Zero { index }
                    } else {
                        TransferFrame::Block { index, id, data: buf }
                    };
                    out.push(Out { after_ms: i as u64, msg: Msg::Frame { job, frame } });
                }
                c.sent += indices.len() as u64;
            }
            // The coordinator gave up on a check's stream: so does the job.
            TransferFrame::Message(TransferMessage::Failed { reason }) if h.check.is_some() => {
                h.check = None;
                h.machine.disk_sent(Err((FailureKind::Other, reason)));
            }
            _ => {}
        }
        out.extend(self.perform(&vm, now)?);
        Ok(out)
    }

    /// Jobs whose verdict is overdue, or whose coordinator fell silent for a lease, are
    /// released with their changes kept.
    pub fn expire(&mut self, now: u64) -> Result<(), String> {
        let vms: Vec<String> = self.held.keys().cloned().collect();
        for vm in vms {
            if let Some(h) = self.held.get_mut(&vm) {
                h.machine.timeout(now);
                if h.lease_until <= now {
                    h.machine.abort();
                }
            }
            self.perform(&vm, now)?;
        }
        Ok(())
    }
}

/// Takes `vm`'s snapshot on `host` (freeze → take → thaw), if the VM is there and free.
fn take(root: &Path, host: &str, vm: &str, now: u64) -> Result<Snapshot, (FailureKind, String)> {
    let other = |e: SimError| (FailureKind::Other, e.to_string());
    let mut v = Vm::open(root, vm).map_err(other)?;
    if v.config.host != host {
        return Err((FailureKind::NotHere, "the VM is not on this host".into()));
    }
    if v.config.snapshot.is_some() {
        return Err((FailureKind::Other, "the VM holds a snapshot already".into()));
    }
    let consistency = match v.freeze(now).map_err(other)? {
        bulwark_agent::sim::SnapConsistency::App => Consistency::App,
        bulwark_agent::sim::SnapConsistency::Filesystem => Consistency::Filesystem,
        bulwark_agent::sim::SnapConsistency::Crash => Consistency::Crash,
    };
    let (_, token) = v.take_snapshot(host, now / 1000).map_err(other)?;
    v.thaw().map_err(other)?;
    Ok(Snapshot { token, consistency, note: None })
}

/// Releases `vm`'s snapshot; `commit` advances the token, `None` keeps the changes.
fn finish(root: &Path, vm: &str, commit: Option<ChangeToken>) -> Result<(), String> {
    let mut v = Vm::open(root, vm).map_err(sim_err)?;
    if v.config.snapshot.is_none() {
        // Never taken (the job failed before) or already released.
        return Ok(());
    }
    v.release_snapshot().map_err(sim_err)?;
    match commit {
        Some(next) => v.confirm_to(next).map(|_| ()).map_err(sim_err),
        None => v.abandon().map_err(sim_err),
    }
}
