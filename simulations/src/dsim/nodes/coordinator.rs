//! The simulation's coordinator: the real job code, its effects performed in memory.

use super::*;
use bulwark_coordinator::catalog::{ItemsTarget, RpDisk};
use bulwark_coordinator::items::disk::{DiskReader, Geometry, StoreBlocks};
use bulwark_coordinator::items::{copy_out, Emit, ItemFrames};
use bulwark_coordinator::jobs::machine::items::ItemsRecovery;
use std::sync::Arc;

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
    /// Its name: the owner its claims name.
    pub name: String,
    pub store: Arc<Store>,
    /// Running jobs by id.
    pub jobs: BTreeMap<u64, RunningJob>,
    pub queue: Queue,
    /// Jobs in the queue, not running: their VM.
    waiting: BTreeMap<u64, String>,
    /// Recoveries running, by job id.
    pub recoveries: BTreeMap<u64, RunningRecovery>,
    /// Recoveries that ended: (VM recovered, recovery point, target VM, outcome).
    pub recovered: Vec<(String, RecoveryPointRecord, String, Result<(), String>)>,
    /// Item recoveries running, by job id.
    pub item_jobs: BTreeMap<u64, RunningItems>,
    /// Item recoveries that ended: (VM, recovery point, destination, outcome).
    pub items_recovered: Vec<(String, RecoveryPointRecord, String, Result<(), String>)>,
    pub next_backup_at: BTreeMap<String, u64>,
    disk_bytes: u64,
    broken: Option<Break>,
    /// Jobs that committed, by kind (`initial`, `express_full`, `consistency_check`).
    pub committed: BTreeMap<&'static str, u64>,
}

/// What went wrong in the store: the simulation stops with it (a real error, not a fault).
pub type StoreFailure = String;

impl Coordinator {
    /// Opens (or creates) the coordinator's store in `dir`; like the real coordinator's start,
    /// jobs a killed run left running are failed and their replicas' continuity questioned
    /// (`recover_interrupted`).
    pub fn open(
        name: &str,
        dir: &Path,
        disk_bytes: u64,
        now: u64,
        broken: Option<Break>,
    ) -> Result<Coordinator, StoreFailure> {
        let data = DataDir::new(dir);
        let catalog =
            if data.catalog().exists() { Catalog::open(&data.catalog()) } else { Catalog::create(&data.catalog()) }
                .map_err(|e| format!("catalog: {e}"))?;
        let config = StoreConfig { pack_max_bytes: 1 << 20, gc_filter_bytes: 1 << 16, ..StoreConfig::default() };
        bulwark_coordinator::jobs::recover_interrupted(&catalog, now / 1000).map_err(|e| e.to_string())?;
        let store = Arc::new(Store::open(&data, catalog, config).map_err(|e| format!("store: {e}"))?);
        let mut queue = Queue::new(Limits { max_running: 8, per_agent: 4 }, now);
        if broken == Some(Break::SecondJob) {
            queue.break_one_job_per_vm();
        }
        Ok(Coordinator {
            name: name.to_owned(),
            store,
            jobs: BTreeMap::new(),
            queue,
            waiting: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            recovered: vec![],
            item_jobs: BTreeMap::new(),
            items_recovered: vec![],
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
        // As the real job: the epoch of this coordinator's claim, or no job for a VM another
        // coordinator owns.
        let epoch = cat.vm_ownership(vm).map_err(|e| e.to_string())?.job_epoch(vm, &self.name);
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
            left_out: vec![],
            parallel: 2,
            epoch: *epoch.as_ref().unwrap_or(&0),
        };
        let started = match epoch {
            Ok(_) => VmJob::start(setup, now),
            Err(why) => Err(bulwark_coordinator::jobs::plan::Failure::stop(why)),
        };
        let mut machine = match started {
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
            Msg::Claim { vm, owner, refused } => {
                let granted = refused.is_none();
                let cat = self.store.catalog();
                cat.note_claim(vm, owner.as_ref(), granted, &self.name).map_err(|e| e.to_string())?;
                return Ok(vec![]);
            }
            Msg::Control(_) => return Ok(vec![]),
        };
        if self.recoveries.contains_key(&job) {
            return self.recovery_receive(job, msg, now);
        }
        if self.item_jobs.contains_key(&job) {
            return self.items_receive(job, msg, now);
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
            Msg::Control(_) | Msg::Claim { .. } => {}
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

    /// `bulwark vm take-over VM`: the claim request to the VM's host.
    pub fn take_over(&self, vm: &str) -> Result<Msg, StoreFailure> {
        let vm = bulwark_protocol::VmId::new(vm).map_err(|e| e.to_string())?;
        Ok(Msg::Control(CoordinatorMessage::Claim { vm, mode: bulwark_protocol::ownership::ClaimMode::TakeOver }))
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
            instant: false,
            epoch: 0,
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
                        let outcome = ended(&r.machine);
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
            Msg::Control(_) | Msg::Claim { .. } => {}
        }
        out.extend(self.perform_recovery(job)?);
        Ok(out)
    }

    /// Starts an item recovery of `paths` of `vm`'s latest recovery point into `dest` on
    /// `host`: the real `ItemsRecovery`; answers what to send.
    pub fn recover_items(
        &mut self,
        vm: &str,
        paths: Vec<String>,
        dest: &str,
        host: usize,
        now: u64,
    ) -> Result<Vec<Msg>, StoreFailure> {
        let cat = self.store.catalog();
        let mut rps = cat.recovery_points(vm).map_err(|e| e.to_string())?;
        rps.sort_by_key(|r| r.created_at);
        let Some(rp) = rps.pop() else { return Ok(vec![]) };
        let id = cat.next_job_id().map_err(|e| e.to_string())?;
        let record =
            JobRecord { state: JobState::Running, ..JobRecord::queued(id, JobKind::Recovery, Some(vm.to_owned())) };
        let target = ItemsTarget { disk: DISK.into(), paths, dest: dest.to_owned(), keep_modes: false };
        let machine = match ItemsRecovery::start(record, &rp, target, host_name(host), JOB_TIMEOUT_MS, now) {
            Ok(m) => m,
            Err(f) => {
                self.items_recovered.push((vm.to_owned(), rp, dest.to_owned(), Err(f.reason)));
                return Ok(vec![]);
            }
        };
        self.item_jobs.insert(id, RunningItems { vm: vm.to_owned(), rp, host, dest: dest.to_owned(), machine });
        self.perform_items(id)
    }

    fn perform_items(&mut self, id: u64) -> Result<Vec<Msg>, StoreFailure> {
        let mut out = vec![];
        loop {
            let Some(r) = self.item_jobs.get_mut(&id) else { return Ok(out) };
            let Some(effect) = r.machine.poll_effect() else { return Ok(out) };
            match effect {
                Effect::Send(m) => out.push(Msg::Control(m)),
                Effect::Finished => {
                    if let Some(r) = self.item_jobs.remove(&id) {
                        let outcome = ended(&r.machine);
                        self.store.catalog().put_job(r.machine.record()).map_err(|e| e.to_string())?;
                        self.items_recovered.push((r.vm, r.rp, r.dest, outcome));
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

    /// A message of an item recovery. Once the agent's stream opens, the items go down it at
    /// once: the real walk (`items::copy_out`, in process here rather than in the confined
    /// worker) over the recovery point in the store, framed by the real `ItemFrames`.
    fn items_receive(&mut self, job: u64, msg: Msg, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let mut out = vec![];
        let Some(r) = self.item_jobs.get_mut(&job) else { return Ok(out) };
        match msg {
            Msg::Result(res) => r.machine.agent_result(res.outcome),
            Msg::Open { mode, .. } => match r.machine.stream_opened(mode) {
                Ok((disk, paths)) => {
                    let reversed = self.broken == Some(Break::ItemsReversed);
                    let sent = stream_items(&self.store, &disk, &paths, job, reversed, &mut out);
                    let end = r.machine.streamed(sent, now);
                    out.push(Msg::Frame { job, frame: TransferFrame::Message(end) });
                }
                Err(why) => out.push(failed(job, &why)),
            },
            // `Stored` or `Failed` from the agent: its result says the same.
            Msg::Frame { .. } | Msg::Control(_) | Msg::Claim { .. } => {}
        }
        out.extend(self.perform_items(job)?);
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
        let late: Vec<(u64, usize)> = self
            .item_jobs
            .iter()
            .filter(|(_, r)| r.machine.next_timeout().is_some_and(|t| t <= now))
            .map(|(id, r)| (*id, r.host))
            .collect();
        for (id, host) in late {
            if let Some(r) = self.item_jobs.get_mut(&id) {
                r.machine.timeout(now);
            }
            out.extend(self.perform_items(id)?.into_iter().map(|m| (host, m)));
        }
        Ok(out)
    }
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

/// How a finished recovery ended: `Err` with its reason.
fn ended(machine: &impl JobMachine) -> Result<(), String> {
    match machine.outcome() {
        Some(Ok(())) => Ok(()),
        Some(Err(f)) => Err(f.reason.clone()),
        None => Err("no outcome".into()),
    }
}

/// An item recovery the coordinator runs: the real `ItemsRecovery`.
#[derive(Debug)]
pub struct RunningItems {
    pub vm: String,
    rp: RecoveryPointRecord,
    pub host: usize,
    dest: String,
    machine: ItemsRecovery,
}

/// Walks `paths` of the recovery point's disk and frames what it finds onto the stream;
/// answers the frames sent, or why the walk stopped.
fn stream_items(
    store: &Arc<Store>,
    disk: &RpDisk,
    paths: &[String],
    job: u64,
    reversed: bool,
    out: &mut Vec<Msg>,
) -> Result<u64, String> {
    let geometry = Geometry { block_size: disk.block_size, disk_size: disk.size_bytes };
    let reader = DiskReader::new(Box::new(StoreBlocks::new(Arc::clone(store), disk.root, geometry)), geometry);
    let mut frames = ItemFrames::default();
    if reversed {
        frames.break_contents();
    }
    let mut sent = 0u64;
    let mut emit = |e: Emit<'_>| -> Result<(), String> {
        let frame = match e {
            Emit::Entry { rel, item } => frames.entry(rel, item)?,
            Emit::Data(bytes) => frames.data(bytes.to_vec())?,
            Emit::Skipped { .. } => {
                frames.skipped += 1;
                return Ok(());
            }
        };
        out.push(Msg::Frame { job, frame });
        sent += 1;
        Ok(())
    };
    copy_out(&reader, paths, &mut emit).map_err(|e| e.to_string())?;
    frames.end()?;
    Ok(sent)
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
