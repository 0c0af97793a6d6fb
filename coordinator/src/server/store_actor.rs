//! The store actor: the replica store's work runs on its own threads (a `SyncArbiter`), never
//! on the actor system's thread. Maintenance jobs (verify, prune, GC) are run here and their
//! job records kept current.

use crate::catalog::{now_secs, Catalog, JobKind, JobRecord, JobState};
use crate::store::Store;
use actix::prelude::*;
use std::sync::Arc;

/// One store worker (the arbiter runs several, sharing the store).
pub struct StoreActor {
    pub store: Arc<Store>,
}

impl Actor for StoreActor {
    type Context = SyncContext<Self>;
}

/// Run a maintenance job; answers the finished job record.
#[derive(Message)]
#[rtype(result = "JobRecord")]
pub struct RunMaintenance(pub JobRecord);

impl Handler<RunMaintenance> for StoreActor {
    type Result = MessageResult<RunMaintenance>;

    fn handle(&mut self, RunMaintenance(mut job): RunMaintenance, _: &mut SyncContext<Self>) -> Self::Result {
        let span = tracing::info_span!("job", job_id = job.id, kind = job.kind.as_str());
        let _g = span.enter();
        let catalog = self.store.catalog();
        job.state = JobState::Running;
        job.started_at = Some(now_secs());
        save(catalog, &job);
        tracing::info!("started");
        match run(&self.store, job.kind) {
            Ok(outcome) => {
                job.bytes_scanned = outcome.bytes_scanned;
                job.detail = Some(outcome.detail);
                job.error = outcome.problem.clone();
                job.state = if outcome.problem.is_some() { JobState::Failed } else { JobState::Succeeded };
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
            }
        }
        job.finished_at = Some(now_secs());
        save(catalog, &job);
        match &job.error {
            None => tracing::info!(detail = job.detail.as_deref().unwrap_or(""), "succeeded"),
            Some(e) => tracing::error!(error = %e, "failed"),
        }
        MessageResult(job)
    }
}

fn save(catalog: &Catalog, job: &JobRecord) {
    if let Err(e) = catalog.put_job(job) {
        tracing::error!(error = %e, "cannot record the job's state");
    }
}

/// What a maintenance run found.
#[derive(Debug)]
pub struct Outcome {
    pub detail: String,
    /// Set when the run completed but found something wrong (verify: bad chunks).
    pub problem: Option<String>,
    pub bytes_scanned: u64,
}

/// Runs one maintenance job against the store.
pub fn run(store: &Store, kind: JobKind) -> Result<Outcome, crate::store::StoreError> {
    match kind {
        JobKind::Verify => {
            let r = store.verify()?;
            let detail = format!("{} chunks ({} bytes) checked", r.chunks_checked, r.bytes_checked);
            let problem = (!r.is_clean()).then(|| {
                let ids: Vec<String> = r.bad.iter().take(5).map(|b| crate::store::hex(&b.id)).collect();
                format!(
                    "{} bad chunk(s) [{}], {} missing; {} recovery point(s) affected; replicas marked inconsistent: {}",
                    r.bad.len(),
                    ids.join(", "),
                    r.missing.len(),
                    r.affected_recovery_points.len(),
                    r.replicas_marked_inconsistent
                        .iter()
                        .map(|(vm, d)| format!("{vm}/{d}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            Ok(Outcome { detail, problem, bytes_scanned: r.bytes_checked })
        }
        JobKind::Gc => {
            let r = store.gc()?;
            Ok(Outcome {
                detail: format!(
                    "{} packs rewritten, {} deleted; {} chunks dropped, {} moved; {} → {} bytes in {:.1} s",
                    r.packs_rewritten,
                    r.packs_deleted,
                    r.chunks_dropped,
                    r.chunks_moved,
                    r.bytes_before,
                    r.bytes_after,
                    r.seconds
                ),
                problem: None,
                bytes_scanned: r.bytes_before,
            })
        }
        JobKind::Prune => {
            let now_ms = now_secs().saturating_mul(1000);
            let mut dropped = 0usize;
            let groups = store.catalog().groups()?;
            for g in &groups {
                for vm in &g.members {
                    dropped += store.prune(vm, g.policy.retention_secs.saturating_mul(1000), now_ms)?.len();
                }
            }
            // Data kept when a VM left protection goes by the retention it had then.
            let mut kept = 0usize;
            for entry in store.catalog().kept() {
                let (vm, secs) = entry?;
                dropped += store.prune(&vm, secs.saturating_mul(1000), now_ms)?.len();
                kept += 1;
            }
            Ok(Outcome {
                detail: format!(
                    "{dropped} recovery point(s) past their retention range dropped ({} groups, {kept} VMs whose data was kept)",
                    groups.len()
                ),
                problem: None,
                bytes_scanned: 0,
            })
        }
        other => Err(crate::store::StoreError::BlockMap(format!("{} is not a maintenance job", other.as_str()))),
    }
}

/// Read a recovery point back and check it (`--verify`); answers the finished job record and
/// the verdict to record (none when the check could not run).
#[derive(Message)]
#[rtype(result = "(JobRecord, Option<crate::store::verify::PointCheck>)")]
pub struct VerifyPoint {
    pub job: JobRecord,
    pub rp: crate::catalog::RecoveryPointRecord,
}

/// A background verification reads on two threads, a few blocks ahead: restores and
/// transfers keep the rest of the machine.
const VERIFY_READ: crate::store::readahead::ReadAhead = crate::store::readahead::ReadAhead { workers: 2, ahead: 8 };

impl Handler<VerifyPoint> for StoreActor {
    type Result = MessageResult<VerifyPoint>;

    fn handle(&mut self, VerifyPoint { mut job, rp }: VerifyPoint, _: &mut SyncContext<Self>) -> Self::Result {
        let rp_hex = crate::store::hex(&rp.id);
        let span = tracing::info_span!("job", job_id = job.id, kind = "verify", vm = %rp.vm, rp = %rp_hex);
        let _g = span.enter();
        let catalog = self.store.catalog();
        job.state = JobState::Running;
        job.started_at = Some(now_secs());
        save(catalog, &job);
        let checked = self.store.verify_recovery_point(&rp, VERIFY_READ);
        job.finished_at = Some(now_secs());
        let verdict = match checked {
            Ok(c) => {
                job.bytes_scanned = c.bytes;
                job.blocks_changed = 0;
                let mut detail =
                    format!("recovery point {rp_hex}: {} blocks ({} bytes) read back and checked", c.blocks, c.bytes);
                if !c.replicas_marked_inconsistent.is_empty() {
                    detail.push_str(&format!(
                        "; replicas marked inconsistent: {}",
                        c.replicas_marked_inconsistent.join(", ")
                    ));
                }
                job.detail = Some(detail);
                job.error = c.problem.clone();
                job.state = if c.problem.is_some() { JobState::Failed } else { JobState::Succeeded };
                Some(c)
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(format!("recovery point {rp_hex} could not be verified: {e}"));
                None
            }
        };
        save(catalog, &job);
        match &job.error {
            None => tracing::info!("recovery point verified"),
            Some(e) => tracing::error!(error = %e, "recovery point verification failed"),
        }
        MessageResult((job, verdict))
    }
}
