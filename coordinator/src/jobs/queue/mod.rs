//! The job queue as a plain state machine: which VM jobs wait, which run, which starts next,
//! and when to look again. No actix, no tokio, no I/O and no clock: the `JobQueue` actor feeds
//! it events with `now` (milliseconds on the driver's monotonic clock), polls it, and performs
//! what it says (loads and runs the job, saves the record); the deterministic simulation can
//! drive the same machine with a simulated clock.
//!
//! Rules, in the order a job meets them:
//! - **Admission** ([`Queue::admit`]): asking twice for a job of a kind already waiting for a VM
//!   gives the same job (recoveries are each their own). An *automatic* job (schedules, sweeps)
//!   is refused while one of its kind for the VM runs (that one will do), and while that kind
//!   for the VM is backing off after failures: 20 s, 40 s, … up to 5 min ([`auto_backoff`]).
//! - **Start** ([`Queue::next_to_start`]): in queue order (the moment a job became ready, then
//!   arrival), whatever the bounds allow: at most `max_running` on the coordinator, at most
//!   `per_agent` on one host, never two jobs of one VM at once. A job whose host is not
//!   connected is held (it takes no slot and spends no attempt) and starts when the host
//!   connects; if the host stays away [`HOST_WAIT`] the job is given up with a reason. A job
//!   with no known host (its VM was never reported) starts at once and fails on its own.
//! - **Retry** ([`Queue::finished`]): a transient failure is retried after 5 s, 15 s, 45 s
//!   ([`retry_delay`]); after [`MAX_ATTEMPTS`] attempts it stays failed.
//!
//! A host lost while jobs run there changes no running job: each job learns of it on its own
//! connection and finishes (usually as a transient failure, so it is retried).

#[cfg(test)]
mod tests;

use crate::catalog::JobKind;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

/// Milliseconds on the driver's monotonic clock (any origin; only differences matter).
pub type Millis = u64;

/// Attempts a job gets before a transient failure is final.
pub const MAX_ATTEMPTS: u32 = 4;

/// How long a job waits for its host to connect before it is given up.
pub const HOST_WAIT: Duration = Duration::from_secs(60);

/// Delay before attempt `n + 1` of a job whose attempt `n` (1-based) failed transiently:
/// 5 s, 15 s, 45 s, … at most 5 min.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(3u64.saturating_pow(attempt.saturating_sub(1))).min(300))
}

/// How long automatic jobs of a kind for a VM are refused after `failures` (≥ 1) jobs of it in
/// a row failed for good: 20 s, 40 s, … at most 320 s.
pub fn auto_backoff(failures: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << failures.min(5)))
}

fn ms(d: Duration) -> Millis {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// `[jobs]` bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Jobs running at once on this coordinator (at least 1).
    pub max_running: usize,
    /// Jobs running at once on one host (at least 1).
    pub per_agent: usize,
}

/// A job asked of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub vm: String,
    pub kind: JobKind,
    /// Queued by a schedule or a sweep, not by an administrator.
    pub automatic: bool,
    /// A recovery: never merged with another job.
    pub recovery: bool,
    /// The host the job runs on; None when the VM is not known (the job will say why).
    pub host: Option<String>,
}

/// What an admissible request becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new job: give it an id and [`Queue::enqueue`] it.
    New,
    /// The job of this kind already waiting for the VM.
    Same(u64),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{} of {vm} is backing off after failures", kind.as_str())]
    BackingOff { vm: String, kind: JobKind, until: Millis },
    #[error("already running")]
    AlreadyRunning,
}

/// What the queue wants done next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run job `job` (now counted as running on `host`).
    Start { job: u64, host: Option<String> },
    /// Job `job` waited too long for its host: record it failed with `reason`.
    GiveUp { job: u64, reason: String },
}

/// How a running job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded, as `ran_as` (a sync of a VM without a replica runs as its initial copy).
    Succeeded { ran_as: JobKind },
    /// It failed (or was cancelled), as `ran_as`; `transient`: worth another attempt.
    Failed { ran_as: JobKind, transient: bool },
}

/// What became of a finished job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFinish {
    /// It waits `delay` for attempt `attempt` of [`MAX_ATTEMPTS`].
    Retry { attempt: u32, delay: Duration },
    /// It left the queue.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Waiting; its key in `order` is `(ready_at, seq, id)`.
    Waiting {
        ready_at: Millis,
        seq: u64,
    },
    Running,
}

#[derive(Debug, Clone)]
struct Entry {
    req: Request,
    /// 1-based attempt number of the current (or next) run.
    attempt: u32,
    place: Place,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Up,
    Down { since: Millis },
}

/// A waiting job's place in the start order: (ready at, arrival, job id).
type Key = (Millis, u64, u64);

/// The queue's state. See the module doc for the rules.
#[derive(Debug, Clone)]
pub struct Queue {
    limits: Limits,
    /// The latest `now` fed (time never goes back).
    now: Millis,
    /// Hosts never seen connected count as down since this moment.
    origin: Millis,
    seq: u64,
    jobs: HashMap<u64, Entry>,
    /// Waiting jobs in start order.
    order: BTreeSet<Key>,
    /// The same, by host (None: jobs whose VM has no known host): what may start next is the
    /// first of one host's jobs, so finding it never walks the jobs of a full or absent host.
    by_host: HashMap<Option<String>, BTreeSet<Key>>,
    /// Job ids by VM, waiting or running: admission looks at one VM's jobs only.
    by_vm: HashMap<String, BTreeSet<u64>>,
    running_on: HashMap<String, usize>,
    running: usize,
    busy_vms: HashSet<String>,
    hosts: HashMap<String, Presence>,
    /// (VM, kind) whose automatic jobs are refused until the instant, after n failures.
    backoff: HashMap<(String, JobKind), (Millis, u32)>,
    /// The broken build that starts a second job for a busy VM: only the `broken-builds`
    /// feature can set it.
    broken_second_job: bool,
}

impl Queue {
    pub fn new(limits: Limits, now: Millis) -> Self {
        Self {
            limits: Limits { max_running: limits.max_running.max(1), per_agent: limits.per_agent.max(1) },
            now,
            origin: now,
            seq: 0,
            jobs: HashMap::new(),
            order: BTreeSet::new(),
            by_host: HashMap::new(),
            by_vm: HashMap::new(),
            running_on: HashMap::new(),
            running: 0,
            busy_vms: HashSet::new(),
            hosts: HashMap::new(),
            backoff: HashMap::new(),
            broken_second_job: false,
        }
    }

    /// Turns on a broken build: a VM's second job starts while its first runs (the
    /// simulation's check that it catches it).
    #[cfg(feature = "broken-builds")]
    pub fn break_one_job_per_vm(&mut self) {
        self.broken_second_job = true;
    }

    /// Whether a VM runs one job at a time (always, but in the broken build).
    fn one_per_vm(&self) -> bool {
        !self.broken_second_job
    }

    fn advance(&mut self, now: Millis) -> Millis {
        self.now = self.now.max(now);
        self.now
    }

    /// Whether `req` would be a new job, the same as one waiting, or is refused.
    pub fn admit(&self, req: &Request, now: Millis) -> Result<Admission, Refusal> {
        let now = self.now.max(now);
        let same = |e: &Entry| e.req.vm == req.vm && e.req.kind == req.kind && !e.req.recovery;
        let of_vm = || self.by_vm.get(&req.vm).into_iter().flatten().filter_map(|id| Some((*id, self.jobs.get(id)?)));
        if !req.recovery {
            let waiting = of_vm().filter(|(_, e)| same(e) && e.place != Place::Running).map(|(id, _)| id);
            if let Some(id) = waiting.min() {
                return Ok(Admission::Same(id));
            }
        }
        if req.automatic {
            if let Some(&(until, _)) = self.backoff.get(&(req.vm.clone(), req.kind)) {
                if now < until {
                    return Err(Refusal::BackingOff { vm: req.vm.clone(), kind: req.kind, until });
                }
            }
            if of_vm().any(|(_, e)| same(e)) {
                return Err(Refusal::AlreadyRunning);
            }
        }
        Ok(Admission::New)
    }

    /// Queues `req` as job `id` if [`Queue::admit`] says it is new; answers what `admit` said.
    pub fn enqueue(&mut self, id: u64, req: Request, now: Millis) -> Result<Admission, Refusal> {
        let now = self.advance(now);
        let admission = self.admit(&req, now)?;
        if admission == Admission::New {
            assert!(!self.jobs.contains_key(&id), "job id {id} queued twice");
            self.by_vm.entry(req.vm.clone()).or_default().insert(id);
            self.jobs.insert(id, Entry { req, attempt: 1, place: Place::Running });
            self.wait(id, now);
        }
        Ok(admission)
    }

    /// Puts a known job at the back of the queue from `ready_at`.
    fn wait(&mut self, id: u64, ready_at: Millis) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.jobs.get_mut(&id) {
            e.place = Place::Waiting { ready_at, seq };
            self.order.insert((ready_at, seq, id));
            self.by_host.entry(e.req.host.clone()).or_default().insert((ready_at, seq, id));
        }
    }

    /// Takes waiting `key` of a job held for `host` out of the start order.
    fn unwait(&mut self, key: Key, host: &Option<String>) {
        self.order.remove(&key);
        if let Some(set) = self.by_host.get_mut(host) {
            set.remove(&key);
            if set.is_empty() {
                self.by_host.remove(host);
            }
        }
    }

    /// Drops job `id` from the jobs and their VM index.
    fn drop_job(&mut self, id: u64) -> Option<Entry> {
        let e = self.jobs.remove(&id)?;
        if let Some(ids) = self.by_vm.get_mut(&e.req.vm) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_vm.remove(&e.req.vm);
            }
        }
        Some(e)
    }

    fn host_up(&self, host: &str) -> bool {
        self.hosts.get(host) == Some(&Presence::Up)
    }

    /// When a job ready at `ready_at` and held for the down `host` is given up.
    fn give_up_at(&self, host: &str, ready_at: Millis) -> Millis {
        let since = match self.hosts.get(host) {
            Some(Presence::Down { since }) => *since,
            _ => self.origin,
        };
        since.max(ready_at).saturating_add(ms(HOST_WAIT))
    }

    /// The next thing to do: a job to start (counted as running from now on) or one to give
    /// up. None: nothing until the next event or [`Queue::next_wakeup`]. Call until None.
    pub fn next_to_start(&mut self, now: Millis) -> Option<Next> {
        let now = self.advance(now);
        let full = self.running >= self.limits.max_running;
        // The first job in start order that may start or must be given up: the earliest of
        // each host's candidates (its first ready job whose VM is free, or, for an absent
        // host, its first job once that is past its wait; later ones of it are not either).
        let mut pick: Option<(Key, bool)> = None;
        for (host, set) in &self.by_host {
            let candidate = match host {
                Some(h) if !self.host_up(h) => set
                    .first()
                    .filter(|&&(ready_at, _, _)| ready_at <= now && now >= self.give_up_at(h, ready_at))
                    .map(|&k| (k, false)),
                _ if full => None,
                Some(h) if self.running_on.get(h).copied().unwrap_or(0) >= self.limits.per_agent => None,
                _ => set
                    .iter()
                    .take_while(|&&(ready_at, _, _)| ready_at <= now)
                    .find(|(_, _, id)| {
                        self.jobs.get(id).is_some_and(|e| !(self.one_per_vm() && self.busy_vms.contains(&e.req.vm)))
                    })
                    .map(|&k| (k, true)),
            };
            if let Some(c) = candidate {
                if pick.is_none_or(|p| c.0 < p.0) {
                    pick = Some(c);
                }
            }
        }
        let ((ready_at, seq, id), start) = pick?;
        let host = self.jobs.get(&id)?.req.host.clone();
        self.unwait((ready_at, seq, id), &host);
        if !start {
            let e = self.drop_job(id)?;
            let host = e.req.host.clone().unwrap_or_default();
            self.failed_for_good(&e.req.vm, e.req.kind, now);
            return Some(Next::GiveUp {
                job: id,
                reason: format!("the agent of {host} was not connected for {}", humantime::format_duration(HOST_WAIT)),
            });
        }
        let e = self.jobs.get_mut(&id)?;
        e.place = Place::Running;
        self.running += 1;
        if let Some(h) = &e.req.host {
            *self.running_on.entry(h.clone()).or_default() += 1;
        }
        let (vm, host) = (e.req.vm.clone(), e.req.host.clone());
        let fresh = self.busy_vms.insert(vm);
        assert!(fresh || !self.one_per_vm(), "two jobs would run for one VM");
        self.check();
        Some(Next::Start { job: id, host })
    }

    fn failed_for_good(&mut self, vm: &str, kind: JobKind, now: Millis) {
        let key = (vm.to_owned(), kind);
        let n = self.backoff.get(&key).map_or(0, |(_, n)| *n) + 1;
        self.backoff.insert(key, (now.saturating_add(ms(auto_backoff(n))), n));
    }

    /// Takes running job `id` off its slot.
    fn release(&mut self, id: u64) -> Option<Entry> {
        let e = self.jobs.get(&id)?;
        if e.place != Place::Running {
            return None;
        }
        self.running -= 1;
        if let Some(h) = &e.req.host {
            if let Some(n) = self.running_on.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    self.running_on.remove(h);
                }
            }
        }
        self.busy_vms.remove(&e.req.vm);
        Some(e.clone())
    }

    /// Running job `id` ended. None if it was not running (nothing changes).
    pub fn finished(&mut self, id: u64, outcome: Outcome, now: Millis) -> Option<AfterFinish> {
        let now = self.advance(now);
        let e = self.release(id)?;
        let after = match outcome {
            Outcome::Failed { transient: true, .. } if e.attempt < MAX_ATTEMPTS => {
                let delay = retry_delay(e.attempt);
                let attempt = e.attempt + 1;
                if let Some(e) = self.jobs.get_mut(&id) {
                    e.attempt = attempt;
                }
                self.wait(id, now.saturating_add(ms(delay)));
                AfterFinish::Retry { attempt, delay }
            }
            Outcome::Succeeded { ran_as } => {
                self.backoff.remove(&(e.req.vm.clone(), ran_as));
                self.drop_job(id);
                AfterFinish::Done
            }
            Outcome::Failed { ran_as, .. } => {
                self.failed_for_good(&e.req.vm, ran_as, now);
                self.drop_job(id);
                AfterFinish::Done
            }
        };
        self.check();
        Some(after)
    }

    /// Drops job `id` wherever it is, with no other consequence (its record is gone).
    pub fn forget(&mut self, id: u64) {
        self.release(id);
        if let Some(Entry { place: Place::Waiting { ready_at, seq }, req, .. }) = self.drop_job(id) {
            self.unwait((ready_at, seq, id), &req.host);
        }
        self.check();
    }

    /// `host`'s agent is connected: jobs held for it may start.
    pub fn host_connected(&mut self, host: &str, now: Millis) {
        self.advance(now);
        self.hosts.insert(host.to_owned(), Presence::Up);
    }

    /// `host`'s agent is gone: its waiting jobs are held from now on.
    pub fn host_lost(&mut self, host: &str, now: Millis) {
        let now = self.advance(now);
        if self.host_up(host) {
            self.hosts.insert(host.to_owned(), Presence::Down { since: now });
        }
    }

    /// Waiting jobs held because their host is not connected: (job, VM), to look up whether
    /// the VM moved ([`Queue::relocate`]).
    pub fn held(&self) -> Vec<(u64, String)> {
        let mut held: Vec<(Key, String)> = self
            .by_host
            .iter()
            .filter(|(h, _)| h.as_deref().is_some_and(|h| !self.host_up(h)))
            .flat_map(|(_, set)| set.iter())
            .filter_map(|k| Some((*k, self.jobs.get(&k.2)?.req.vm.clone())))
            .collect();
        held.sort();
        held.into_iter().map(|(k, vm)| (k.2, vm)).collect()
    }

    /// Waiting job `id` will run on `host` (its VM moved). Running jobs are not moved.
    pub fn relocate(&mut self, id: u64, host: Option<String>) {
        let Some(e) = self.jobs.get_mut(&id).filter(|e| e.place != Place::Running) else { return };
        let old = std::mem::replace(&mut e.req.host, host.clone());
        if let Place::Waiting { ready_at, seq } = e.place {
            let key = (ready_at, seq, id);
            self.unwait(key, &old);
            self.order.insert(key);
            self.by_host.entry(host).or_default().insert(key);
        }
    }

    /// The earliest moment after the latest `now` at which polling may find something new (a
    /// retry becoming ready, a held job to give up); None: only events will.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let now = self.now;
        let wait = ms(HOST_WAIT);
        self.by_host
            .iter()
            .filter_map(|(host, set)| match host {
                // Held for an absent host: given up `HOST_WAIT` after it became ready or the
                // host went, whichever is later (so in start order); the first not yet due.
                Some(h) if !self.host_up(h) => {
                    let first = if self.give_up_at(h, 0) > now {
                        set.first()
                    } else {
                        set.range((now.saturating_sub(wait).saturating_add(1), 0, 0)..).next()
                    };
                    first.map(|&(ready_at, _, _)| self.give_up_at(h, ready_at))
                }
                _ => set.range((now.saturating_add(1), 0, 0)..).next().map(|&(ready_at, _, _)| ready_at),
            })
            .filter(|&at| at > now)
            .min()
    }

    /// Whether a job of `kind` (any with None) is waiting or running for `vm`.
    pub fn has_job(&self, vm: &str, kind: Option<JobKind>) -> bool {
        self.by_vm
            .get(vm)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
            .any(|e| kind.is_none_or(|k| k == e.req.kind))
    }

    /// Jobs waiting (including those waiting for a retry) and running.
    pub fn counts(&self) -> (usize, usize) {
        (self.order.len(), self.running)
    }

    /// Jobs running on `host`.
    pub fn running_on(&self, host: &str) -> usize {
        self.running_on.get(host).copied().unwrap_or(0)
    }

    /// The attempt (1-based) job `id` is on.
    pub fn attempt(&self, id: u64) -> Option<u32> {
        self.jobs.get(&id).map(|e| e.attempt)
    }

    /// The bounds hold and the indexes agree with the jobs.
    fn check(&self) {
        debug_assert!(self.running <= self.limits.max_running, "more than max_running jobs run");
        debug_assert!(self.running_on.values().all(|&n| n <= self.limits.per_agent), "a host runs too many jobs");
        debug_assert!(self.running == self.busy_vms.len() || !self.one_per_vm(), "a VM runs two jobs");
        debug_assert_eq!(self.running + self.order.len(), self.jobs.len());
        debug_assert_eq!(self.by_host.values().map(BTreeSet::len).sum::<usize>(), self.order.len());
        debug_assert_eq!(self.by_vm.values().map(BTreeSet::len).sum::<usize>(), self.jobs.len());
    }
}
