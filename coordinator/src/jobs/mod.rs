//! VM jobs: initial replication, synchronization, express full, consistency check.
//!
//! - [`JobQueue`] (an actor) owns which jobs wait and which run: one job per VM at a time,
//!   at most `per_agent` per host and `max_running` in all (`[jobs]` in `coordinator.toml`),
//!   retries with backoff for transient failures, and a back-off for automatic re-queues.
//! - [`vm_job::run`] drives one job: the request to the agent, its transfer streams, the
//!   commit, the verdict back to the agent.
//! - [`JobRouter`] hands each transfer stream and each job result an agent sends to the job
//!   waiting for it, and only if it came from the host the job runs on.
//! - [`ingest`] writes a job's blocks into the store on its own thread; [`compare`] is the
//!   coordinator's half of a consistency check.
//! - [`plan`] holds a job's decisions in plain code (which job really runs, what a failure
//!   means for the replica), shared with the deterministic simulation.
//! - [`history`] decides which job records the retention purge removes (`[jobs] keep`).

pub mod compare;
pub mod history;
pub mod ingest;
pub mod plan;
pub mod queue;
pub mod schedule;
pub mod vm_job;

use crate::catalog::{now_secs, Catalog, CatalogError, JobKind, JobRecord, JobState};
use crate::server::registry::Registry;
use crate::store::Store;
use actix::prelude::*;
use bulwark_protocol::messages::JobResult;
use bulwark_protocol::transfer::TransferMode;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A transfer stream an agent opened for a job's disk.
pub struct TransferStream {
    pub disk: String,
    pub block_size: u32,
    pub blocks: u64,
    pub mode: TransferMode,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

struct Route {
    host: String,
    conn: usize,
    streams: mpsc::Sender<TransferStream>,
    result: Option<oneshot::Sender<JobResult>>,
}

/// Where agents' transfer streams and job results go.
#[derive(Default)]
pub struct JobRouter {
    routes: Mutex<HashMap<u64, Route>>,
}

impl JobRouter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job about to run on `host` over connection `conn`.
    pub fn register(
        &self,
        job: u64,
        host: &str,
        conn: usize,
    ) -> (mpsc::Receiver<TransferStream>, oneshot::Receiver<JobResult>) {
        let (stx, srx) = mpsc::channel(4);
        let (rtx, rrx) = oneshot::channel();
        self.lock().insert(job, Route { host: host.to_owned(), conn, streams: stx, result: Some(rtx) });
        (srx, rrx)
    }

    pub fn unregister(&self, job: u64) {
        self.lock().remove(&job);
    }

    /// Where a transfer stream of `job` from `host` goes; refused if the job is not running
    /// there (an agent may only serve its own jobs).
    pub fn stream_target(&self, job: u64, host: &str) -> Result<mpsc::Sender<TransferStream>, String> {
        match self.lock().get(&job) {
            Some(r) if r.host == host => Ok(r.streams.clone()),
            Some(_) => Err(format!("job {job} does not run on {host}")),
            None => Err(format!("no job {job} is waiting for transfers")),
        }
    }

    /// Hands a job result to its job; false if nobody waits for it from this host.
    pub fn result(&self, host: &str, result: JobResult) -> bool {
        let mut routes = self.lock();
        match routes.get_mut(&result.job.0) {
            Some(r) if r.host == host => match r.result.take() {
                Some(tx) => tx.send(result).is_ok(),
                None => false,
            },
            _ => false,
        }
    }

    /// The connection `conn` of `host` is gone: its jobs will get no result.
    pub fn connection_lost(&self, host: &str, conn: usize) {
        for r in self.lock().values_mut() {
            if r.host == host && r.conn == conn {
                r.result = None;
            }
        }
    }
}

/// What VM jobs share.
pub struct JobContext {
    pub store: Arc<Store>,
    pub registry: Addr<Registry>,
    pub router: Arc<JobRouter>,
    pub lease: Duration,
    /// For `--notify`.
    pub smtp: Option<crate::config::SmtpConfig>,
}

impl JobContext {
    pub fn catalog(&self) -> &Catalog {
        self.store.catalog()
    }
}

/// How a job ended, for the queue.
#[derive(Debug)]
pub struct Finished {
    pub job: JobRecord,
    /// A transient failure worth another attempt.
    pub retry: bool,
}

/// Attempts a job gets before it stays failed.
pub const MAX_ATTEMPTS: u32 = 4;

/// Delay before attempt `n` (1-based) of a job that failed transiently.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(3u64.saturating_pow(attempt.saturating_sub(1))).min(300))
}

/// The job queue.
pub struct JobQueue {
    ctx: Arc<JobContext>,
    max_running: usize,
    per_agent: usize,
    queue: VecDeque<u64>,
    /// Queued or running jobs: id → (VM, kind).
    active: HashMap<u64, (String, JobKind)>,
    /// Running jobs: id → host.
    running: HashMap<u64, String>,
    busy_vms: HashSet<String>,
    attempts: HashMap<u64, u32>,
    /// Automatic jobs that failed: not re-queued automatically before the instant.
    auto_backoff: HashMap<(String, JobKind), (Instant, u32)>,
}

impl JobQueue {
    pub fn new(ctx: Arc<JobContext>, max_running: usize, per_agent: usize) -> Self {
        Self {
            ctx,
            max_running: max_running.max(1),
            per_agent: per_agent.max(1),
            queue: VecDeque::new(),
            active: HashMap::new(),
            running: HashMap::new(),
            busy_vms: HashSet::new(),
            attempts: HashMap::new(),
            auto_backoff: HashMap::new(),
        }
    }

    fn save(&self, job: &JobRecord) {
        if let Err(e) = self.ctx.catalog().put_job(job) {
            tracing::error!(job_id = job.id, error = %e, "cannot record the job's state");
        }
    }

    /// Starts whatever the bounds allow, in queue order.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let mut per_host: HashMap<&str, usize> = HashMap::new();
        for h in self.running.values() {
            *per_host.entry(h.as_str()).or_default() += 1;
        }
        let mut start = vec![];
        let mut skipped = VecDeque::new();
        let mut taken_hosts: HashMap<String, usize> = HashMap::new();
        while let Some(id) = self.queue.pop_front() {
            if self.running.len() + start.len() >= self.max_running {
                skipped.push_back(id);
                continue;
            }
            let Some((vm, _)) = self.active.get(&id).cloned() else { continue };
            if self.busy_vms.contains(&vm) {
                skipped.push_back(id);
                continue;
            }
            let host = match self.ctx.catalog().vm(&vm) {
                Ok(Some(v)) => v.host,
                _ => String::new(),
            };
            let n = per_host.get(host.as_str()).copied().unwrap_or(0) + taken_hosts.get(&host).copied().unwrap_or(0);
            if !host.is_empty() && n >= self.per_agent {
                skipped.push_back(id);
                continue;
            }
            *taken_hosts.entry(host.clone()).or_default() += 1;
            self.busy_vms.insert(vm);
            start.push((id, host));
        }
        self.queue = skipped;
        for (id, host) in start {
            let job = match self.ctx.catalog().job(id) {
                Ok(Some(j)) => j,
                _ => {
                    tracing::error!(job_id = id, "a queued job is missing from the catalog");
                    self.forget(id);
                    continue;
                }
            };
            let on_host = self.running.values().filter(|h| **h == host).count() + 1;
            tracing::info!(
                job_id = id,
                host = %host,
                running = self.running.len() + 1,
                on_host,
                queued = self.queue.len(),
                "job starting"
            );
            self.running.insert(id, host);
            let c = self.ctx.clone();
            ctx.spawn(vm_job::run(c, job).into_actor(self).map(|finished, act, ctx| act.finished(finished, ctx)));
        }
    }

    fn forget(&mut self, id: u64) {
        if let Some((vm, _)) = self.active.remove(&id) {
            self.busy_vms.remove(&vm);
        }
        self.running.remove(&id);
        self.attempts.remove(&id);
    }

    fn finished(&mut self, f: Finished, ctx: &mut Context<Self>) {
        let id = f.job.id;
        self.running.remove(&id);
        if let Some((vm, _)) = self.active.get(&id) {
            self.busy_vms.remove(vm);
        }
        let attempt = self.attempts.get(&id).copied().unwrap_or(1);
        let mut job = f.job;
        let key = job.vm.clone().map(|vm| (vm, job.kind));
        if job.state == JobState::Failed && f.retry && attempt < MAX_ATTEMPTS {
            let delay = retry_delay(attempt);
            let reason = job.error.take().unwrap_or_default();
            tracing::warn!(job_id = id, attempt, reason = %bulwark_protocol::text::Escaped(&reason), delay = ?delay, "job failed; it will be retried");
            job.state = JobState::Queued;
            job.detail = Some(format!(
                "attempt {attempt} of {MAX_ATTEMPTS} failed ({reason}); retrying in {}",
                humantime::format_duration(delay)
            ));
            self.save(&job);
            self.attempts.insert(id, attempt + 1);
            ctx.run_later(delay, move |act, ctx| {
                act.queue.push_back(id);
                act.pump(ctx);
            });
        } else {
            if let Some(key) = key {
                match job.state {
                    JobState::Succeeded => {
                        self.auto_backoff.remove(&key);
                    }
                    _ => {
                        let n = self.auto_backoff.get(&key).map_or(0, |(_, n)| *n) + 1;
                        let wait = Duration::from_secs(10u64.saturating_mul(1 << n.min(5)));
                        self.auto_backoff.insert(key, (Instant::now() + wait, n));
                    }
                }
            }
            self.forget(id);
        }
        self.pump(ctx);
    }
}

impl Actor for JobQueue {
    type Context = Context<Self>;
}

/// Queue a VM job. `automatic` jobs (schedules, sweeps) are not queued while an earlier
/// automatic one of the same kind for the VM is backing off after failures.
#[derive(Message)]
#[rtype(result = "Result<u64, String>")]
pub struct Enqueue {
    pub vm: String,
    pub kind: JobKind,
    pub automatic: bool,
    pub reason: String,
    /// A recovery's parameters (recoveries are never merged with another job).
    pub recovery: Option<crate::catalog::RecoverySpec>,
}

impl Handler<Enqueue> for JobQueue {
    type Result = Result<u64, String>;
    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        // One waiting job of a kind per VM: asking twice gives the same job.
        if msg.recovery.is_some() {
            // Recoveries are each their own.
        } else if let Some((&id, _)) = self
            .active
            .iter()
            .find(|(id, (vm, kind))| *vm == msg.vm && *kind == msg.kind && !self.running.contains_key(id))
        {
            return Ok(id);
        }
        if msg.automatic {
            if let Some((until, _)) = self.auto_backoff.get(&(msg.vm.clone(), msg.kind)) {
                if Instant::now() < *until {
                    return Err(format!("{} of {} is backing off after failures", msg.kind.as_str(), msg.vm));
                }
            }
            // An automatic job waits for nothing: if one of its kind runs, that one will do.
            if self.active.values().any(|(vm, kind)| *vm == msg.vm && *kind == msg.kind) {
                return Err("already running".into());
            }
        }
        let catalog = self.ctx.catalog();
        let id = catalog.next_job_id().map_err(|e| e.to_string())?;
        let mut job = JobRecord::queued(id, msg.kind, Some(msg.vm.clone()));
        job.detail = Some(msg.reason.clone());
        job.recovery = msg.recovery;
        catalog.put_job(&job).map_err(|e| e.to_string())?;
        tracing::info!(job_id = id, vm = %bulwark_protocol::text::Escaped(&msg.vm), kind = msg.kind.as_str(), reason = %bulwark_protocol::text::Escaped(&msg.reason), "job queued");
        self.active.insert(id, (msg.vm, msg.kind));
        self.attempts.insert(id, 1);
        self.queue.push_back(id);
        self.pump(ctx);
        Ok(id)
    }
}

/// Whether a VM has a job of `kind` queued or running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct HasJob {
    pub vm: String,
    pub kind: Option<JobKind>,
}

impl Handler<HasJob> for JobQueue {
    type Result = bool;
    fn handle(&mut self, msg: HasJob, _: &mut Context<Self>) -> bool {
        self.active.values().any(|(vm, kind)| *vm == msg.vm && msg.kind.is_none_or(|k| k == *kind))
    }
}

/// Counts of queued and running jobs.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct Counts;

impl Handler<Counts> for JobQueue {
    type Result = MessageResult<Counts>;
    fn handle(&mut self, _: Counts, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.queue.len(), self.running.len()))
    }
}

/// At start-up: VM jobs a previous run left queued or running are failed with the reason, and
/// their replicas are judged — an interrupted transfer leaves a replica inconsistent (its
/// committed state is intact, but continuity with the source is not proven), an interrupted
/// initial copy leaves it still being created. Returns the ids failed.
pub fn recover_interrupted(catalog: &Catalog, now: u64) -> Result<Vec<u64>, CatalogError> {
    let mut interrupted: Vec<JobRecord> = vec![];
    for r in catalog.jobs_after(None) {
        let (_, job) = r?;
        if !job.state.is_final() {
            interrupted.push(job);
        }
    }
    let failed = catalog.fail_interrupted_jobs("interrupted: the coordinator stopped while it ran", now)?;
    for job in interrupted.iter().filter(|j| j.state == JobState::Running) {
        let (Some(vm), JobKind::Sync | JobKind::ExpressFull) = (&job.vm, job.kind) else { continue };
        for mut r in catalog.replicas_of(vm)? {
            if r.state == crate::catalog::ReplicaState::Consistent {
                r.state = crate::catalog::ReplicaState::Inconsistent;
                r.reason = Some(format!("a transfer died midway (job {} was interrupted)", job.id));
                r.updated_at = now;
                catalog.put_replica(&r)?;
            }
        }
    }
    Ok(failed)
}

/// Unix seconds now, for job records.
pub fn now() -> u64 {
    now_secs()
}
