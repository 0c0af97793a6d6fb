//! VM jobs: initial replication, synchronization, express full, consistency check.
//!
//! - [`queue`] decides which jobs wait and which run, in plain code fed `now`: one job per VM
//!   at a time, at most `per_agent` per host and `max_running` in all (`[jobs]` in
//!   `coordinator.toml`), de-duplication, retries with backoff for transient failures, a
//!   back-off for automatic re-queues, and jobs held while their host is away.
//!   [`JobQueue`] (an actor) is its shell: the clock, the catalog records, the job tasks.
//! - [`schedule`] decides which of a group's schedules are due (the scheduler actor's math).
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
pub mod machine;
pub mod plan;
pub mod queue;
pub mod schedule;
pub mod verification;
pub mod vm_job;

use crate::catalog::{now_secs, Catalog, CatalogError, JobKind, JobRecord, JobState};
use crate::store::Store;
use actix::prelude::*;
use bulwark_protocol::messages::{CoordinatorMessage, JobResult};
use bulwark_protocol::transfer::TransferMode;
pub use queue::{retry_delay, MAX_ATTEMPTS};
use queue::{Admission, AfterFinish, Next, Queue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The sending half of a transfer stream, whatever carries it (QUIC in the server).
pub type StreamSend = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// The receiving half of a transfer stream.
pub type StreamRecv = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// A transfer stream an agent opened for a job's disk. Jobs see two byte streams: the
/// server's connection code is the only one that knows they are QUIC streams.
pub struct TransferStream {
    pub disk: String,
    pub block_size: u32,
    pub blocks: u64,
    pub mode: TransferMode,
    pub send: StreamSend,
    pub recv: StreamRecv,
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
    /// Which session serves a host (the server's registry answers).
    pub registry: Recipient<SessionOf>,
    pub router: Arc<JobRouter>,
    pub lease: Duration,
    /// Disks of one VM transferred at once (`[jobs] disks_in_parallel`).
    pub disks_in_parallel: usize,
    /// For `--notify`.
    pub smtp: Option<crate::config::SmtpConfig>,
    /// This coordinator's name (its certificate identity): the owner its claims name.
    pub coordinator: String,
}

impl JobContext {
    pub fn catalog(&self) -> &Catalog {
        self.store.catalog()
    }
}

/// What the disks of a job being received have brought so far (each disk's transfer adds to
/// it; the job's record shows it).
#[derive(Debug, Default)]
pub struct Progress {
    transferred: std::sync::atomic::AtomicU64,
    scanned: std::sync::atomic::AtomicU64,
    frames: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// A frame with `bytes` of block data arrived.
    pub fn frame(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.frames.fetch_add(1, Relaxed);
        self.transferred.fetch_add(bytes, Relaxed);
    }

    /// A check compared `bytes` of the source.
    pub fn scanned_more(&self, bytes: u64) {
        self.scanned.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn transferred(&self) -> u64 {
        self.transferred.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn scanned(&self) -> u64 {
        self.scanned.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn frames(&self) -> u64 {
        self.frames.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A message for a connected agent, delivered by its session (the server's `AgentSession`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToAgent(pub CoordinatorMessage);

/// Which session serves `host` now: where to send it [`ToAgent`], and its connection's id.
/// Jobs ask; the server's registry answers (jobs never name the server's actors).
#[derive(Message)]
#[rtype(result = "Option<(Recipient<ToAgent>, usize)>")]
pub struct SessionOf {
    pub host: String,
}

/// How a job ended, for the queue.
#[derive(Debug)]
pub struct Finished {
    pub job: JobRecord,
    /// A transient failure worth another attempt.
    pub retry: bool,
}

/// How often jobs held for a host that is away look up whether their VM moved.
const HELD_RECHECK: Duration = Duration::from_secs(10);

/// The job queue's actor: the shell around [`queue::Queue`]. It reads the clock, resolves the
/// host a job runs on, gives new jobs their catalog records, runs what the queue starts and
/// records what it gives up or retries.
pub struct JobQueue {
    ctx: Arc<JobContext>,
    queue: Queue,
    origin: Instant,
    wakeup: Option<SpawnHandle>,
    /// How to stop each running job's future, for `job cancel`. An aborted future is never
    /// polled again (an actor's cancelled future may be, once more: enough to record a
    /// failure or send a commit after the cancel).
    running: HashMap<u64, futures_util::future::AbortHandle>,
}

impl JobQueue {
    pub fn new(ctx: Arc<JobContext>, max_running: usize, per_agent: usize) -> Self {
        let limits = queue::Limits { max_running, per_agent };
        Self { ctx, queue: Queue::new(limits, 0), origin: Instant::now(), wakeup: None, running: HashMap::new() }
    }

    /// Milliseconds since the actor started: the queue's clock.
    fn now(&self) -> queue::Millis {
        self.origin.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
    }

    fn save(&self, job: &JobRecord) {
        if let Err(e) = self.ctx.catalog().put_job(job) {
            tracing::error!(job_id = job.id, error = %e, "cannot record the job's state");
        }
    }

    /// The host a job of `vm` runs on: a recovery's target host, else the VM's host (None
    /// when the VM is unknown: the job will say so).
    fn host_of(&self, vm: &str, recovery: Option<&crate::catalog::RecoverySpec>) -> Option<String> {
        if let Some(h) = recovery.and_then(|r| r.to_host.clone()) {
            return Some(h);
        }
        match self.ctx.catalog().vm(vm) {
            Ok(Some(v)) if !v.host.is_empty() => Some(v.host),
            _ => None,
        }
    }

    /// Does what the queue says until it says nothing, then sets the timer for its next wake-up.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        // A job held for a host that is away follows its VM if it moved.
        for (id, vm) in self.queue.held() {
            let spec = self.ctx.catalog().job(id).ok().flatten().and_then(|j| j.recovery);
            let host = self.host_of(&vm, spec.as_ref());
            self.queue.relocate(id, host);
        }
        let now = self.now();
        while let Some(next) = self.queue.next_to_start(now) {
            match next {
                Next::Start { job, host } => self.start(ctx, job, host),
                Next::GiveUp { job, reason } => self.give_up(job, reason),
            }
        }
        if let Some(h) = self.wakeup.take() {
            ctx.cancel_future(h);
        }
        let mut at = self.queue.next_wakeup();
        if !self.queue.held().is_empty() {
            let recheck = now.saturating_add(HELD_RECHECK.as_millis() as u64);
            at = Some(at.map_or(recheck, |a| a.min(recheck)));
        }
        if let Some(at) = at {
            let delay = Duration::from_millis(at.saturating_sub(now));
            self.wakeup = Some(ctx.run_later(delay, |act, ctx| {
                act.wakeup = None;
                act.pump(ctx);
            }));
        }
    }

    fn start(&mut self, ctx: &mut Context<Self>, id: u64, host: Option<String>) {
        let job = match self.ctx.catalog().job(id) {
            Ok(Some(j)) => j,
            _ => {
                tracing::error!(job_id = id, "a queued job is missing from the catalog");
                self.queue.forget(id);
                return;
            }
        };
        let (queued, running) = self.queue.counts();
        let host = host.unwrap_or_default();
        let on_host = self.queue.running_on(&host).max(1);
        tracing::info!(job_id = id, host = %host, running, on_host, queued, "job starting");
        let c = self.ctx.clone();
        let (abort, registration) = futures_util::future::AbortHandle::new_pair();
        let run = futures_util::future::Abortable::new(vm_job::run(c, job), registration);
        ctx.spawn(run.into_actor(self).map(|r, act, ctx| {
            // An aborted job was cancelled: the cancel recorded it.
            if let Ok(finished) = r {
                act.finished(finished, ctx);
            }
        }));
        self.running.insert(id, abort);
    }

    fn give_up(&mut self, id: u64, reason: String) {
        tracing::warn!(job_id = id, reason = %reason, "job given up");
        match self.ctx.catalog().job(id) {
            Ok(Some(mut job)) => {
                job.state = JobState::Failed;
                job.error = Some(reason);
                job.finished_at = Some(now());
                self.save(&job);
                vm_job::end_instant_of_failed(self.ctx.catalog(), &job);
            }
            _ => tracing::error!(job_id = id, "a queued job is missing from the catalog"),
        }
    }

    fn finished(&mut self, f: Finished, ctx: &mut Context<Self>) {
        let mut job = f.job;
        self.running.remove(&job.id);
        let outcome = match job.state {
            JobState::Succeeded => queue::Outcome::Succeeded { ran_as: job.kind },
            _ => queue::Outcome::Failed { ran_as: job.kind, transient: f.retry && job.state == JobState::Failed },
        };
        let attempt = self.queue.attempt(job.id).unwrap_or(1);
        if let Some(AfterFinish::Retry { delay, .. }) = self.queue.finished(job.id, outcome, self.now()) {
            let reason = job.error.take().unwrap_or_default();
            tracing::warn!(job_id = job.id, attempt, reason = %bulwark_protocol::text::Escaped(&reason), delay = ?delay, "job failed; it will be retried");
            job.state = JobState::Queued;
            job.detail = Some(format!(
                "attempt {attempt} of {MAX_ATTEMPTS} failed ({reason}); retrying in {}",
                humantime::format_duration(delay)
            ));
            self.save(&job);
        } else if job.state != JobState::Succeeded {
            vm_job::end_instant_of_failed(self.ctx.catalog(), &job);
        }
        self.pump(ctx);
    }
}

impl Actor for JobQueue {
    type Context = Context<Self>;
}

/// Cancel a queued or running job (`bulwark job cancel`): answers its record, cancelled. A
/// running job's work stops where it is: its streams close, nothing is committed, the agent is
/// told its snapshot's changes are not taken (it releases the snapshot and keeps them), and an
/// interrupted synchronization or express full leaves the replica inconsistent.
#[derive(Message)]
#[rtype(result = "Result<JobRecord, String>")]
pub struct Cancel {
    pub id: u64,
}

impl Handler<Cancel> for JobQueue {
    type Result = Result<JobRecord, String>;
    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.id;
        let catalog = self.ctx.catalog().clone();
        let mut job = catalog.job(id).map_err(|e| e.to_string())?.ok_or_else(|| format!("no job {id}"))?;
        if job.state.is_final() {
            return Err(format!("job {id} has already finished ({})", job.state.as_str()));
        }
        if self.queue.attempt(id).is_none() {
            return Err(format!(
                "job {id} ({}) is not a queued or running VM job: it cannot be cancelled",
                job.kind.as_str()
            ));
        }
        let was_running = match self.running.remove(&id) {
            Some(abort) => {
                abort.abort();
                true
            }
            None => false,
        };
        self.ctx.router.unregister(id);
        self.queue.forget(id);
        job.state = JobState::Cancelled;
        job.finished_at = Some(now());
        job.error = Some("cancelled by the operator".into());
        self.save(&job);
        tracing::info!(job_id = id, running = was_running, "job cancelled");
        if was_running {
            let vm = job.vm.clone().unwrap_or_default();
            // What an interrupted transfer means for the replica is plan's one rule.
            let cancelled = plan::Failure::midway(format!("the {} was cancelled", job.kind.as_str()), job.kind);
            if let Some(why) = cancelled.inconsistent {
                if let Err(e) = catalog.mark_inconsistent(&vm, &why, now()) {
                    tracing::error!(job_id = id, error = %e, "cannot mark the replica inconsistent");
                }
            }
            if let Some(host) = self.host_of(&vm, job.recovery.as_ref()) {
                let registry = self.ctx.registry.clone();
                let verdict = CoordinatorMessage::JobDone { job: bulwark_protocol::JobId(id), committed: false };
                actix::spawn(async move {
                    if let Ok(Some((session, _))) = registry.send(SessionOf { host }).await {
                        session.do_send(ToAgent(verdict));
                    }
                });
            }
        }
        self.pump(ctx);
        Ok(job)
    }
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

/// What [`JobQueue::admit_new`] made of a request.
enum Admitted {
    /// The same as a job already waiting.
    Same(u64),
    /// A new job, queued, its record still to be saved.
    New(Box<JobRecord>),
}

impl JobQueue {
    /// Admits `msg` and, when it is a new job, queues it under a fresh id; its record is the
    /// caller's to save (and the job the caller's to forget if that fails).
    fn admit_new(&mut self, msg: &Enqueue, now: queue::Millis) -> Result<Admitted, String> {
        let req = queue::Request {
            vm: msg.vm.clone(),
            kind: msg.kind,
            automatic: msg.automatic,
            recovery: msg.recovery.is_some(),
            host: self.host_of(&msg.vm, msg.recovery.as_ref()),
        };
        match self.queue.admit(&req, now).map_err(|e| e.to_string())? {
            Admission::Same(id) => return Ok(Admitted::Same(id)),
            Admission::New => {}
        }
        let catalog = self.ctx.catalog();
        if msg.automatic && msg.recovery.is_none() {
            // A VM another coordinator owns gets no scheduled job here (`vm list` shows it
            // `lost`); an administrator's own request still runs and says why it cannot.
            let ownership = catalog.vm_ownership(&msg.vm).map_err(|e| e.to_string())?;
            ownership.job_epoch(&msg.vm, &self.ctx.coordinator)?;
        }
        if msg.automatic {
            let replicas = catalog.replicas_of(&msg.vm).map_err(|e| e.to_string())?;
            if !schedule::automatic_still_due(msg.kind, &replicas) {
                tracing::info!(vm = %bulwark_protocol::text::Escaped(&msg.vm), kind = msg.kind.as_str(), "not queued: the replica was made meanwhile");
                return Err(format!("{} has its replica: no initial copy is due", msg.vm));
            }
        }
        let id = catalog.next_job_id().map_err(|e| e.to_string())?;
        let mut job = JobRecord::queued(id, msg.kind, Some(msg.vm.clone()));
        job.detail = Some(msg.reason.clone());
        job.recovery = msg.recovery.clone();
        let admitted = self.queue.enqueue(id, req, now);
        debug_assert_eq!(admitted, Ok(Admission::New));
        tracing::info!(job_id = id, vm = %bulwark_protocol::text::Escaped(&msg.vm), kind = msg.kind.as_str(), reason = %bulwark_protocol::text::Escaped(&msg.reason), "job queued");
        Ok(Admitted::New(Box::new(job)))
    }
}

impl Handler<Enqueue> for JobQueue {
    type Result = Result<u64, String>;
    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let job = match self.admit_new(&msg, now)? {
            Admitted::Same(id) => return Ok(id),
            Admitted::New(job) => job,
        };
        if let Err(e) = self.ctx.catalog().put_job(&job) {
            self.queue.forget(job.id);
            return Err(e.to_string());
        }
        self.pump(ctx);
        Ok(job.id)
    }
}

/// Several [`Enqueue`]s at once (a new group's initial copies): their records are saved in one
/// batch with one flush instead of one flush each. Answers each request's outcome, in order.
#[derive(Message)]
#[rtype(result = "Vec<Result<u64, String>>")]
pub struct EnqueueMany(pub Vec<Enqueue>);

impl Handler<EnqueueMany> for JobQueue {
    type Result = MessageResult<EnqueueMany>;
    fn handle(&mut self, EnqueueMany(msgs): EnqueueMany, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let mut answers = Vec::with_capacity(msgs.len());
        let mut records = vec![];
        for msg in &msgs {
            answers.push(match self.admit_new(msg, now) {
                Ok(Admitted::Same(id)) => Ok(id),
                Ok(Admitted::New(job)) => {
                    let id = job.id;
                    records.push(*job);
                    Ok(id)
                }
                Err(e) => Err(e),
            });
        }
        if let Err(e) = self.ctx.catalog().put_jobs(&records) {
            let e = e.to_string();
            for job in &records {
                self.queue.forget(job.id);
            }
            let unsaved: std::collections::HashSet<u64> = records.iter().map(|j| j.id).collect();
            for a in &mut answers {
                if a.as_ref().is_ok_and(|id| unsaved.contains(id)) {
                    *a = Err(e.clone());
                }
            }
        }
        self.pump(ctx);
        MessageResult(answers)
    }
}

/// An agent connected (`up`) or its connection is gone: jobs for its host wait or go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HostPresence {
    pub host: String,
    pub up: bool,
}

impl Handler<HostPresence> for JobQueue {
    type Result = ();
    fn handle(&mut self, msg: HostPresence, ctx: &mut Context<Self>) {
        let now = self.now();
        if msg.up {
            self.queue.host_connected(&msg.host, now);
        } else {
            self.queue.host_lost(&msg.host, now);
        }
        self.pump(ctx);
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
        self.queue.has_job(&msg.vm, msg.kind)
    }
}

/// Counts of queued (including those waiting for a retry) and running jobs.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct Counts;

impl Handler<Counts> for JobQueue {
    type Result = MessageResult<Counts>;
    fn handle(&mut self, _: Counts, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.queue.counts())
    }
}

/// At start-up: VM jobs a previous run left queued or running are failed with the reason, and
/// their replicas are judged — an interrupted transfer leaves a replica inconsistent (its
/// committed state is intact, but continuity with the source is not proven), an interrupted
/// initial copy leaves it still being created; an instant recovery whose job had not succeeded
/// is over. Returns the ids failed.
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
    // Instant recoveries whose job did not run to its end never made their VM: over.
    for mut r in catalog.active_instants(usize::MAX)? {
        let made = match r.job {
            Some(j) => catalog.job(j)?.is_some_and(|job| job.state == JobState::Succeeded),
            None => false,
        };
        if !made {
            r.finished_at = Some(now);
            catalog.put_instant(&r)?;
        }
    }
    Ok(failed)
}

/// Unix seconds now, for job records.
pub fn now() -> u64 {
    now_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::InstantRecord;

    fn instant(name: &str, job: Option<u64>) -> InstantRecord {
        InstantRecord {
            name: name.into(),
            vm: "web".into(),
            rp: [7; 16],
            host: "node1".into(),
            disks: vec![],
            job,
            created_at: 1,
            finished_at: None,
        }
    }

    #[test]
    fn a_restart_ends_the_instant_recoveries_whose_job_did_not_make_their_vm() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::create(&dir.path().join("catalog")).unwrap();
        let mut made = JobRecord::queued(1, JobKind::Recovery, Some("web".into()));
        made.state = JobState::Succeeded;
        let mut running = JobRecord::queued(2, JobKind::Recovery, Some("web".into()));
        running.state = JobState::Running;
        catalog.put_job(&made).unwrap();
        catalog.put_job(&running).unwrap();
        for r in [instant("queued", None), instant("made", Some(1)), instant("cut", Some(2))] {
            catalog.put_instant(&r).unwrap();
        }
        recover_interrupted(&catalog, 100).unwrap();
        let active: Vec<String> = catalog.active_instants(10).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(active, vec!["made".to_owned()], "only the VM its job made still reads from the point");
        assert_eq!(catalog.instant("cut").unwrap().unwrap().finished_at, Some(100));
    }
}
