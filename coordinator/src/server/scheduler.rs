//! The scheduler: one [`GroupActor`] per protection group, started and stopped as groups come
//! and go. A group actor fires its schedules — synchronization every N, recovery points
//! (express fulls) at their times, the daily consistency check, off-peak replica creation —
//! by queueing jobs for its members, each after a jitter inside the start window. Next-run
//! times are persisted before a schedule fires, so a restart neither doubles a run nor makes
//! up a missed one more than once. A sweep keeps replicas moving: initial copies for members
//! without one (`--replica now`) and consistency checks for inconsistent ones (when the policy
//! allows). Once a day the scheduler also prunes recovery points past their group's retention
//! range (a `prune` job, persisted like any schedule), then collects garbage (a `gc` job). What is due is decided by
//! [`crate::jobs::schedule`] (plain code); this module reads the clock and the catalog,
//! persists the next runs, and queues the jobs.

use crate::catalog::{now_secs, Catalog, JobKind, JobRecord, ReplicaState};
use crate::jobs::schedule::{self, Rule, Schedule};
use crate::jobs::{Enqueue, JobQueue};
use crate::policy::{self, Creation};
use crate::server::store_actor::{RunMaintenance, StoreActor};
use actix::prelude::*;
use jiff::tz::TimeZone;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How often group actors look at their schedules.
const TICK: Duration = Duration::from_secs(1);
/// How often they sweep their members' replica states.
const SWEEP_EVERY: u64 = 5;

/// The schedule key of the daily retention prune (not a group name: group names are ids,
/// which cannot start with `@`).
const PRUNE_KEY: &str = "@retention";
/// When the daily prune runs (coordinator local time).
const PRUNE_AT: u16 = 3 * 60 + 30;

/// Starts and stops group actors, and prunes once a day.
pub struct Scheduler {
    catalog: Catalog,
    jobs: Addr<JobQueue>,
    store_workers: Addr<StoreActor>,
    jitter: Duration,
    groups: HashMap<String, Addr<GroupActor>>,
}

impl Scheduler {
    pub fn new(catalog: Catalog, jobs: Addr<JobQueue>, store_workers: Addr<StoreActor>, jitter: Duration) -> Self {
        Self { catalog, jobs, store_workers, jitter, groups: HashMap::new() }
    }

    /// Queues the daily prune when it is due.
    fn prune_if_due(&self) -> Result<(), crate::catalog::CatalogError> {
        let now = now_secs() as i64;
        let persisted = self.catalog.next_run(PRUNE_KEY, "prune")?.map(|at| at as i64);
        let step = schedule::step(Rule::Daily(&[PRUNE_AT]), persisted, now, &TimeZone::system());
        if let Some(next) = step.next {
            self.catalog.set_next_run(PRUNE_KEY, "prune", next.max(0) as u64)?;
        }
        if step.due.is_some() {
            let job = JobRecord::queued(self.catalog.next_job_id()?, JobKind::Prune, None);
            self.catalog.put_job(&job)?;
            tracing::info!(job_id = job.id, "daily retention prune");
            // Then the space goes back: a collection once the prune is done (it keeps what
            // running ingests pin, as every collection does).
            let (catalog, workers) = (self.catalog.clone(), self.store_workers.clone());
            actix::spawn(async move {
                if workers.send(RunMaintenance(job)).await.is_err() {
                    return;
                }
                match catalog.next_job_id() {
                    Ok(id) => {
                        let gc = JobRecord::queued(id, JobKind::Gc, None);
                        if let Err(e) = catalog.put_job(&gc) {
                            tracing::error!(error = %e, "cannot record the collection after the prune");
                            return;
                        }
                        tracing::info!(job_id = gc.id, "garbage collection after the daily prune");
                        workers.do_send(RunMaintenance(gc));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the collection after the prune"),
                }
            });
        }
        Ok(())
    }

    fn refresh(&mut self) {
        let groups = match self.catalog.groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "scheduler cannot read the groups");
                return;
            }
        };
        self.groups.retain(|_, a| a.connected());
        for g in groups {
            if !self.groups.contains_key(&g.name) {
                tracing::info!(group = %g.name, "scheduling group");
                let actor = GroupActor {
                    name: g.name.clone(),
                    catalog: self.catalog.clone(),
                    jobs: self.jobs.clone(),
                    jitter: self.jitter,
                    tz: TimeZone::system(),
                    last_sweep: 0,
                }
                .start();
                self.groups.insert(g.name, actor);
            }
        }
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh();
        ctx.run_interval(Duration::from_secs(2), |act, _| {
            act.refresh();
            if let Err(e) = act.prune_if_due() {
                tracing::error!(error = %e, "cannot schedule the daily prune");
            }
        });
    }
}

/// One protection group's schedules.
pub struct GroupActor {
    name: String,
    catalog: Catalog,
    jobs: Addr<JobQueue>,
    jitter: Duration,
    tz: TimeZone,
    last_sweep: u64,
}

impl Actor for GroupActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, ctx| {
            let span = tracing::info_span!("group", group = %act.name);
            let _g = span.enter();
            if let Err(e) = act.tick(ctx) {
                tracing::error!(error = %e, "schedule tick failed");
            }
        });
    }
}

impl GroupActor {
    fn tick(&mut self, ctx: &mut Context<Self>) -> Result<(), crate::catalog::CatalogError> {
        let Some(group) = self.catalog.group(&self.name)? else {
            tracing::info!("group deleted: its schedules stop");
            ctx.stop();
            return Ok(());
        };
        let now = now_secs() as i64;
        let mut persisted = BTreeMap::new();
        for s in Schedule::ALL {
            if let Some(at) = self.catalog.next_run(&self.name, s.key())? {
                persisted.insert(s, at as i64);
            }
        }
        let due = schedule::due(&group.policy, &persisted, now, &self.tz);
        // Persisted before anything fires: a restart neither doubles a run nor loses one twice.
        for (s, at) in &due.next {
            self.catalog.set_next_run(&self.name, s.key(), (*at).max(0) as u64)?;
        }
        let creation = policy::creation_time(&group.policy.replica_creation).unwrap_or(Creation::Manual);
        for fire in due.fire {
            let members: Vec<String> = group
                .members
                .iter()
                .filter(|vm| schedule::fires_for(fire.schedule, creation, self.has_replica(vm)))
                .cloned()
                .collect();
            self.fire(ctx, &members, fire.schedule.job(), fire.due, fire.schedule.reason());
        }
        if (now as u64).saturating_sub(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now as u64;
            self.sweep(&group.members, creation, group.policy.cc_when_inconsistent)?;
        }
        Ok(())
    }

    fn has_replica(&self, vm: &str) -> bool {
        self.catalog.replicas_of(vm).map(|r| schedule::has_replica(&r)).unwrap_or(false)
    }

    /// Queues `kind` for each member, spread over the start window.
    fn fire(&self, ctx: &mut Context<Self>, members: &[String], kind: JobKind, due: i64, reason: &str) {
        tracing::info!(kind = kind.as_str(), members = members.len(), "schedule due");
        for vm in members {
            let delay = Duration::from_secs(policy::jitter(vm, due, self.jitter.as_secs()));
            let msg = Enqueue { vm: vm.clone(), kind, automatic: true, reason: reason.to_owned(), recovery: None };
            let jobs = self.jobs.clone();
            ctx.run_later(delay, move |_, _| jobs.do_send(msg));
        }
    }

    /// Initial copies for members without a replica (`--replica now`), consistency checks for
    /// inconsistent ones (`--cc-when-inconsistent`).
    fn sweep(&self, members: &[String], creation: Creation, cc: bool) -> Result<(), crate::catalog::CatalogError> {
        for vm in members {
            let replicas = self.catalog.replicas_of(vm)?;
            let inconsistent = replicas.iter().find(|r| r.state == ReplicaState::Inconsistent);
            if creation == Creation::Now && !self.has_replica(vm) {
                self.jobs.do_send(Enqueue {
                    vm: vm.clone(),
                    kind: JobKind::Initial,
                    automatic: true,
                    reason: "replica creation: now".into(),
                    recovery: None,
                });
            } else if let (true, Some(r)) = (cc, inconsistent) {
                self.jobs.do_send(Enqueue {
                    vm: vm.clone(),
                    kind: JobKind::ConsistencyCheck,
                    automatic: true,
                    reason: format!("replica inconsistent: {}", r.reason.as_deref().unwrap_or("no reason recorded")),
                    recovery: None,
                });
            }
        }
        Ok(())
    }
}
