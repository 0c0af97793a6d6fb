//! The processes of the deterministic simulation: a coordinator over the real store and
//! catalog, and agents over the real sim hypervisor. Each handler is a plain function of its
//! state, the simulated time and one message, and answers the messages it sends; nothing here
//! sleeps, spawns or reads a clock.

use bulwark_agent::sim::{SimError, Vm};
use bulwark_coordinator::catalog::{
    Catalog, Commit, JobKind, JobRecord, JobState, ReplicaRecord, ReplicaState, RpDisk,
};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::jobs::plan::{self, Failure};
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig};
use bulwark_protocol::block::{ChunkHasher, Digest};
use bulwark_protocol::messages::{ChangeToken, Consistency, DiskInfo, FailureKind};
use bulwark_protocol::DiskId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every VM has one disk of this name.
pub const DISK: &str = "os";
/// The replicas' block size.
pub const BLOCK: u64 = 64 * 1024;
/// How long an agent holds a snapshot without the coordinator's verdict.
pub const LEASE_MS: u64 = 6_000;
/// How long the coordinator waits for a job's blocks and result.
pub const JOB_TIMEOUT_MS: u64 = 5_000;

/// Why an agent could not run a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TrackingLost,
    NotHere,
    Busy,
}

/// The wire, as the simulation needs it.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Coordinator → agent.
    Job { job: u64, vm: String, kind: JobKind, token: Option<ChangeToken> },
    /// Coordinator → agent: the verdict on a job whose snapshot the agent holds.
    Done { job: u64, vm: String, committed: bool },
    /// Agent → coordinator.
    Block { job: u64, index: u64, id: Digest, data: Vec<u8> },
    /// Agent → coordinator: every block is sent.
    Sent { job: u64, next: ChangeToken, blocks: u64, consistency: Consistency },
    /// Agent → coordinator.
    Refused { job: u64, why: Refusal },
}

/// A message to send, `after_ms` from now (blocks go out one after another).
#[derive(Debug)]
pub struct Out {
    pub after_ms: u64,
    pub msg: Msg,
}

/// The coordinator's volatile view of one running job.
#[derive(Debug)]
pub struct RunningJob {
    pub id: u64,
    pub vm: String,
    pub host: usize,
    pub kind: JobKind,
    pub deadline: u64,
    blocks: BTreeMap<u64, Digest>,
    sent: Option<(ChangeToken, u64, Consistency)>,
}

/// The coordinator: the real store and catalog on disk; jobs and schedule in memory.
pub struct Coordinator {
    pub store: Store,
    pub jobs: BTreeMap<String, RunningJob>,
    pub next_backup_at: BTreeMap<String, u64>,
    disk_bytes: u64,
    broken: Option<Break>,
    /// Jobs that committed, by kind (`initial`, `incremental`, `check`).
    pub committed: BTreeMap<&'static str, u64>,
}

/// What went wrong in the store: the simulation stops with it (a real error, not a fault).
pub type StoreFailure = String;

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
        Ok(Coordinator {
            store,
            jobs: BTreeMap::new(),
            next_backup_at: BTreeMap::new(),
            disk_bytes,
            broken,
            committed: BTreeMap::new(),
        })
    }

    fn blocks(&self) -> u64 {
        self.disk_bytes.div_ceil(BLOCK)
    }

    /// The job to run for `vm` now: an express full as the coordinator's own planning turns
    /// it (an initial copy without a complete replica), or a consistency check of an
    /// inconsistent replica (as `cc_when_inconsistent` queues it). Recorded in the catalog as
    /// running, as the real job queue does.
    pub fn dispatch(&mut self, vm: &str, host: usize, now: u64) -> Result<Msg, StoreFailure> {
        let cat = self.store.catalog();
        let replicas =
            cat.replicas_of(vm).map_err(|e| e.to_string())?.into_iter().map(|r| (r.disk.clone(), r)).collect();
        let disks = [DiskInfo { name: DiskId::new(DISK).map_err(|e| e.to_string())?, size_bytes: self.disk_bytes }];
        let planned = match plan::plan(JobKind::ExpressFull, vm, &disks, &replicas, BLOCK as u32) {
            Ok(p) => p,
            Err(_) => plan::plan(JobKind::ConsistencyCheck, vm, &disks, &replicas, BLOCK as u32)
                .map_err(|f| format!("a check of {vm} was refused: {}", f.reason))?,
        };
        let id = cat.next_job_id().map_err(|e| e.to_string())?;
        cat.put_job(&job_record(id, planned.kind, vm, JobState::Running, now, None)).map_err(|e| e.to_string())?;
        if planned.kind == JobKind::Initial {
            let creating = ReplicaRecord {
                vm: vm.to_owned(),
                disk: DISK.to_owned(),
                size_bytes: self.disk_bytes,
                block_size: BLOCK as u32,
                state: ReplicaState::Creating,
                root: None,
                change_token: None,
                reason: None,
                updated_at: now / 1000,
                excluded: vec![],
            };
            cat.put_replica(&creating).map_err(|e| e.to_string())?;
        }
        let token = planned.disks.first().and_then(|d| d.token);
        self.jobs.insert(
            vm.to_owned(),
            RunningJob {
                id,
                vm: vm.to_owned(),
                host,
                kind: planned.kind,
                deadline: now + JOB_TIMEOUT_MS,
                blocks: BTreeMap::new(),
                sent: None,
            },
        );
        Ok(Msg::Job { job: id, vm: vm.to_owned(), kind: planned.kind, token })
    }

    /// Ends `vm`'s job as failed, with what the failure means for the replica.
    fn fail(&mut self, vm: &str, failure: Failure, now: u64) -> Result<(), StoreFailure> {
        let Some(j) = self.jobs.remove(vm) else { return Ok(()) };
        let cat = self.store.catalog();
        cat.put_job(&job_record(j.id, j.kind, vm, JobState::Failed, now, Some(failure.reason.clone())))
            .map_err(|e| e.to_string())?;
        if let Some(why) = failure.inconsistent {
            self.mark_inconsistent(vm, &why, now)?;
        }
        Ok(())
    }

    fn vm_of(&self, job: u64) -> Option<String> {
        self.jobs.values().find(|j| j.id == job).map(|j| j.vm.clone())
    }

    /// A message from an agent; answers what to send back.
    pub fn receive(&mut self, msg: Msg, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        match msg {
            Msg::Block { job, index, id, data } => {
                let Some(vm) = self.vm_of(job) else { return Ok(vec![]) };
                let mut ingest = self.store.begin();
                let leaf = match ingest.put_block(&id, &data) {
                    Ok(leaf) => leaf,
                    Err(e) => return Err(format!("job {job}: block {index}: {e}")),
                };
                drop(ingest);
                if let Some(j) = self.jobs.get_mut(&vm) {
                    j.blocks.insert(index, leaf);
                }
                self.try_commit(&vm, now)
            }
            Msg::Sent { job, next, blocks, consistency } => {
                let Some(vm) = self.vm_of(job) else { return Ok(vec![]) };
                if let Some(j) = self.jobs.get_mut(&vm) {
                    j.sent = Some((next, blocks, consistency));
                }
                self.try_commit(&vm, now)
            }
            Msg::Refused { job, why } => {
                let Some(vm) = self.vm_of(job) else { return Ok(vec![]) };
                let Some(j) = self.jobs.get(&vm) else { return Ok(vec![]) };
                let (kind, reason) = match why {
                    Refusal::TrackingLost => (FailureKind::TrackingLost, "change tracking was lost"),
                    Refusal::NotHere => (FailureKind::NotHere, "the VM is not on this host"),
                    Refusal::Busy => (FailureKind::Other, "the VM holds a snapshot already"),
                };
                let failure = Failure::from_agent(kind, reason.into(), !j.blocks.is_empty(), j.kind);
                self.fail(&vm, failure, now)?;
                Ok(vec![])
            }
            Msg::Job { .. } | Msg::Done { .. } => Ok(vec![]),
        }
    }

    fn mark_inconsistent(&mut self, vm: &str, why: &str, now: u64) -> Result<(), StoreFailure> {
        let cat = self.store.catalog();
        if let Some(mut r) = cat.replica(vm, DISK).map_err(|e| e.to_string())? {
            r.state = ReplicaState::Inconsistent;
            r.reason = Some(why.to_owned());
            r.updated_at = now / 1000;
            cat.commit(&Commit { replicas: vec![r], ..Commit::default() }).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Commits `vm`'s job once its result and every block it announced have arrived.
    fn try_commit(&mut self, vm: &str, now: u64) -> Result<Vec<Msg>, StoreFailure> {
        let Some(j) = self.jobs.get(vm) else { return Ok(vec![]) };
        let Some((next, count, consistency)) = j.sent else { return Ok(vec![]) };
        if (j.blocks.len() as u64) < count && self.broken != Some(Break::CommitEarly) {
            return Ok(vec![]);
        }
        let blocks = self.blocks();
        if j.kind != JobKind::ExpressFull && count != blocks {
            return Err(format!("job {}: a full read sent {count} of {blocks} blocks", j.id));
        }
        let old = match j.kind {
            JobKind::ExpressFull => {
                self.store.catalog().replica(vm, DISK).map_err(|e| e.to_string())?.and_then(|r| r.root)
            }
            _ => None,
        };
        let mut ingest = self.store.begin();
        let root = ingest
            .update_tree(old.as_ref(), blocks, j.blocks.iter().map(|(i, d)| (*i, *d)))
            .map_err(|e| format!("job {}: tree: {e}", j.id))?;
        let replica = ReplicaRecord {
            vm: vm.to_owned(),
            disk: DISK.to_owned(),
            size_bytes: self.disk_bytes,
            block_size: BLOCK as u32,
            state: ReplicaState::Consistent,
            root: Some(root),
            change_token: Some(next),
            reason: None,
            updated_at: now / 1000,
            excluded: vec![],
        };
        let (id, kind) = (j.id, j.kind);
        if kind == JobKind::ConsistencyCheck {
            self.store.commit_replicas(ingest, vec![replica]).map_err(|e| e.to_string())?;
        } else {
            let rp = NewRecoveryPoint {
                vm: vm.to_owned(),
                consistency,
                config: vec![],
                disks: vec![RpDisk { name: DISK.into(), size_bytes: self.disk_bytes, block_size: BLOCK as u32, root }],
                created_at: now,
            };
            self.store.commit_recovery_point(ingest, rp, vec![replica]).map_err(|e| e.to_string())?;
        }
        *self.committed.entry(kind.as_str()).or_default() += 1;
        self.jobs.remove(vm);
        self.store
            .catalog()
            .put_job(&job_record(id, kind, vm, JobState::Succeeded, now, None))
            .map_err(|e| e.to_string())?;
        Ok(vec![Msg::Done { job: id, vm: vm.to_owned(), committed: true }])
    }

    /// Jobs past their deadline fail as the real job does when the agent falls silent (a
    /// transfer that died midway), and their snapshots are handed back; answers (host, message).
    pub fn expire(&mut self, now: u64) -> Result<Vec<(usize, Msg)>, StoreFailure> {
        let late: Vec<(String, u64, usize, JobKind)> =
            self.jobs.values().filter(|j| j.deadline <= now).map(|j| (j.vm.clone(), j.id, j.host, j.kind)).collect();
        let mut out = vec![];
        for (vm, id, host, kind) in late {
            self.fail(&vm, Failure::midway(format!("no word from the agent for {JOB_TIMEOUT_MS} ms"), kind), now)?;
            out.push((host, Msg::Done { job: id, vm, committed: false }));
        }
        Ok(out)
    }
}

fn job_record(id: u64, kind: JobKind, vm: &str, state: JobState, now: u64, error: Option<String>) -> JobRecord {
    JobRecord {
        id,
        kind,
        vm: Some(vm.to_owned()),
        state,
        started_at: Some(now / 1000),
        finished_at: (state != JobState::Running).then_some(now / 1000),
        bytes_transferred: 0,
        bytes_total: None,
        bytes_scanned: 0,
        blocks_changed: 0,
        consistency: None,
        error,
        detail: None,
        recovery: None,
    }
}

/// A snapshot an agent holds for a job.
#[derive(Debug, Clone)]
pub struct Held {
    pub job: u64,
    pub next: ChangeToken,
    pub lease_until: u64,
}

/// A deliberately broken build, to show the simulation bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The coordinator commits a job as soon as the agent says everything is sent, without
    /// waiting for the blocks still on their way.
    CommitEarly,
}

/// An agent: its snapshots are in the sim's files; what it holds for which job is volatile.
pub struct Agent {
    pub host: String,
    pub held: BTreeMap<String, Held>,
    root: PathBuf,
    hasher: ChunkHasher,
}

fn sim_err(e: SimError) -> String {
    e.to_string()
}

impl Agent {
    /// Starts an agent: first it cleans what a dead one of its host left (thaw, release,
    /// changes merged back), as the real agent does at start-up.
    pub fn start(root: &Path, host: &str) -> Result<Agent, String> {
        bulwark_agent::sim::cleanup_orphans(root, host).map_err(sim_err)?;
        Ok(Agent { host: host.to_owned(), held: BTreeMap::new(), root: root.to_owned(), hasher: ChunkHasher::plain() })
    }

    /// A message from the coordinator; answers what to send back, in order.
    pub fn receive(&mut self, msg: Msg, now: u64) -> Result<Vec<Out>, String> {
        match msg {
            Msg::Job { job, vm, kind, token } => self.run_job(job, &vm, kind, token, now),
            Msg::Done { job, vm, committed } => {
                if self.held.get(&vm).is_some_and(|h| h.job == job) {
                    if let Some(h) = self.held.remove(&vm) {
                        self.finish(&vm, committed.then_some(h.next))?;
                    }
                }
                Ok(vec![])
            }
            Msg::Block { .. } | Msg::Sent { .. } | Msg::Refused { .. } => Ok(vec![]),
        }
    }

    fn run_job(
        &mut self,
        job: u64,
        name: &str,
        kind: JobKind,
        token: Option<ChangeToken>,
        now: u64,
    ) -> Result<Vec<Out>, String> {
        let refuse = |why| Ok(vec![Out { after_ms: 0, msg: Msg::Refused { job, why } }]);
        let mut vm = Vm::open(&self.root, name).map_err(sim_err)?;
        if vm.config.host != self.host {
            return refuse(Refusal::NotHere);
        }
        if vm.config.snapshot.is_some() || self.held.contains_key(name) {
            return refuse(Refusal::Busy);
        }
        let consistency = match vm.freeze(now).map_err(sim_err)? {
            bulwark_agent::sim::SnapConsistency::App => Consistency::App,
            bulwark_agent::sim::SnapConsistency::Filesystem => Consistency::Filesystem,
            bulwark_agent::sim::SnapConsistency::Crash => Consistency::Crash,
        };
        let (_, taken) = vm.take_snapshot(&self.host, now / 1000).map_err(sim_err)?;
        vm.thaw().map_err(sim_err)?;
        let size = vm.config.disks.first().map_or(0, |d| d.size);
        let indices: Vec<u64> = match kind {
            JobKind::ExpressFull | JobKind::Sync => match vm.changes_since(DISK, token) {
                Ok(map) => map.dirty_blocks(BLOCK),
                Err(SimError::TrackingLost { .. }) => {
                    drop(vm);
                    self.finish(name, None)?;
                    return refuse(Refusal::TrackingLost);
                }
                Err(e) => return Err(sim_err(e)),
            },
            _ => (0..size.div_ceil(BLOCK)).collect(),
        };
        let mut out = vec![];
        let mut buf = vec![0u8; BLOCK as usize];
        for (i, &index) in indices.iter().enumerate() {
            let offset = index * BLOCK;
            let n = BLOCK.min(size - offset) as usize;
            vm.snapshot_read(DISK, offset, &mut buf[..n]).map_err(sim_err)?;
            let id = self.hasher.id(&buf[..n]);
            out.push(Out { after_ms: i as u64, msg: Msg::Block { job, index, id, data: buf[..n].to_vec() } });
        }
        let next = ChangeToken { generation: taken.generation, sequence: taken.sequence + 1 };
        out.push(Out {
            after_ms: indices.len() as u64,
            msg: Msg::Sent { job, next, blocks: indices.len() as u64, consistency },
        });
        drop(vm);
        self.held.insert(name.to_owned(), Held { job, next, lease_until: now + LEASE_MS });
        Ok(out)
    }

    /// Releases `vm`'s snapshot; `commit` advances the token, `None` keeps the changes.
    fn finish(&mut self, name: &str, commit: Option<ChangeToken>) -> Result<(), String> {
        let mut vm = Vm::open(&self.root, name).map_err(sim_err)?;
        vm.release_snapshot().map_err(sim_err)?;
        match commit {
            Some(next) => vm.confirm_to(next).map(|_| ()).map_err(sim_err),
            None => vm.abandon().map_err(sim_err),
        }
    }

    /// Snapshots whose lease ran out without a verdict are released, their changes kept.
    pub fn expire(&mut self, now: u64) -> Result<(), String> {
        let late: Vec<String> =
            self.held.iter().filter(|(_, h)| h.lease_until <= now).map(|(v, _)| v.clone()).collect();
        for vm in late {
            self.held.remove(&vm);
            self.finish(&vm, None)?;
        }
        Ok(())
    }
}
