//! The verifier: reads recovery points back as their groups' `--verify` asks, one at a time,
//! on a store worker. Which point is next is [`crate::jobs::verification`]'s decision; this
//! actor walks the members a bounded slice at a time (whatever the number of VMs), runs the
//! check as a `verify` job of the VM, records the verdict beside the point (`rp list`) and
//! mails a failure to `[smtp] alerts_to`.

use crate::catalog::{now_secs, Catalog, CatalogError, JobKind, JobRecord, RecoveryPointRecord, RpCheck, VerifyMode};
use crate::config::SmtpConfig;
use crate::jobs::verification::{self, Point};
use crate::server::store_actor::{StoreActor, VerifyPoint};
use actix::prelude::*;
use std::time::Duration;

/// How often an idle verifier looks for due points.
const TICK: Duration = Duration::from_secs(5);
/// Members looked at per tick, at most.
const MEMBERS_PER_TICK: usize = 500;

pub struct Verifier {
    catalog: Catalog,
    store: std::sync::Arc<crate::store::Store>,
    workers: Addr<StoreActor>,
    smtp: Option<SmtpConfig>,
    boot: crate::config::VerifyConfig,
    /// A verification is running.
    busy: bool,
    /// The last member looked at: the next tick goes on after it.
    cursor: Option<String>,
}

impl Verifier {
    pub fn new(
        store: std::sync::Arc<crate::store::Store>,
        workers: Addr<StoreActor>,
        smtp: Option<SmtpConfig>,
        boot: crate::config::VerifyConfig,
    ) -> Self {
        Self { catalog: store.catalog().clone(), store, workers, smtp, boot, busy: false, cursor: None }
    }

    /// The next (VM, point) due, looking at up to [`MEMBERS_PER_TICK`] members after the
    /// cursor (wrapping around).
    fn find_due(&mut self) -> Result<Option<RecoveryPointRecord>, CatalogError> {
        let mut members: Vec<(String, VerifyMode)> = vec![];
        for g in self.catalog.groups()? {
            if g.policy.verify != VerifyMode::Off {
                members.extend(g.members.iter().map(|m| (m.clone(), g.policy.verify)));
            }
        }
        if members.is_empty() {
            return Ok(None);
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let start = match &self.cursor {
            Some(c) => members.partition_point(|(m, _)| m <= c),
            None => 0,
        };
        let now = now_secs();
        for i in 0..members.len().min(MEMBERS_PER_TICK) {
            let (vm, mode) = &members[(start + i) % members.len()];
            self.cursor = Some(vm.clone());
            let rps = self.catalog.recovery_points(vm)?;
            let mut points = Vec::with_capacity(rps.len());
            for rp in &rps {
                let verified_at = self.catalog.rp_check(&rp.id)?.map(|c| c.verified_at);
                points.push(Point { id: rp.id, created_at_ms: rp.created_at, verified_at });
            }
            if let Some(id) = verification::next_to_verify(*mode, &points, now) {
                return Ok(rps.into_iter().find(|r| r.id == id));
            }
        }
        Ok(None)
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let rp = match self.find_due() {
            Ok(Some(rp)) => rp,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "the verifier cannot read the catalog");
                return;
            }
        };
        let job = match self.catalog.next_job_id() {
            Ok(id) => {
                let mut job = JobRecord::queued(id, JobKind::Verify, Some(rp.vm.clone()));
                job.detail = Some(format!("recovery point {}: read back and checked", crate::store::hex(&rp.id)));
                job
            }
            Err(e) => {
                tracing::error!(error = %e, "the verifier cannot number a job");
                return;
            }
        };
        if let Err(e) = self.catalog.put_job(&job) {
            tracing::error!(error = %e, "the verifier cannot record its job");
            return;
        }
        tracing::info!(job_id = job.id, vm = %rp.vm, rp = %crate::store::hex(&rp.id), "verifying a recovery point");
        self.busy = true;
        let run = self.workers.send(VerifyPoint { job, rp: rp.clone() });
        let (store, boot) = (self.store.clone(), self.boot.clone());
        let checked = async move {
            let answer = run.await;
            // A point read back whole whose VM asks for it is booted too.
            let booted = match &answer {
                Ok((_, Some(check))) if check.problem.is_none() && super::boot_check::wants_boot_check(&rp) => {
                    tracing::info!(vm = %rp.vm, rp = %crate::store::hex(&rp.id), "booting the recovery point");
                    Some(super::boot_check::boot_check(store, &rp, &boot).await)
                }
                _ => None,
            };
            (rp, answer, booted)
        };
        ctx.spawn(checked.into_actor(self).map(move |(rp, answer, booted), act, ctx| {
            act.busy = false;
            match answer {
                Ok((job, Some(check))) => act.record(&rp, job, &check, booted),
                Ok((_, None)) => {}
                Err(e) => tracing::error!(error = %e, "the store workers are gone"),
            }
            // Straight on to the next one, if any.
            act.tick(ctx);
        }));
    }

    /// Keeps the verdict beside the point (and the boot check's in the job); a failure is
    /// mailed.
    fn record(
        &self,
        rp: &RecoveryPointRecord,
        mut job: JobRecord,
        check: &crate::store::verify::PointCheck,
        booted: Option<Result<Duration, String>>,
    ) {
        let mut problem = check.problem.clone();
        if let Some(b) = &booted {
            let said = match b {
                Ok(took) => format!("; booted: the guest agent answered after {:.1} s", took.as_secs_f64()),
                Err(why) => format!("; the boot check FAILED: {why}"),
            };
            job.detail = Some(format!("{}{said}", job.detail.as_deref().unwrap_or("")));
            if let Err(why) = b {
                problem = Some(format!("the recovery point does not boot: {why}"));
            }
            if let Err(e) = self.catalog.put_job(&job) {
                tracing::error!(job_id = job.id, error = %e, "cannot record the boot check in the job");
            }
        }
        let job = &job;
        let verdict = RpCheck {
            verified_at: now_secs(),
            verified: check.problem.is_none(),
            boot_verified: booted.as_ref().map(Result::is_ok),
            job: job.id,
            detail: job.error.clone().or_else(|| job.detail.clone()).unwrap_or_default(),
        };
        match self.catalog.put_rp_check(rp, &verdict) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job_id = job.id, "the recovery point was dropped while it was verified");
                return;
            }
            Err(e) => {
                tracing::error!(job_id = job.id, error = %e, "cannot record the verification");
                return;
            }
        }
        if let Some(problem) = &problem {
            self.alert(rp, job, problem);
        }
    }

    fn alert(&self, rp: &RecoveryPointRecord, job: &JobRecord, problem: &str) {
        let recipients = self.smtp.as_ref().map(|s| s.alerts_to.clone()).unwrap_or_default();
        let id = crate::store::hex(&rp.id);
        if recipients.is_empty() {
            tracing::warn!(job_id = job.id, rp = %id, "a recovery point failed its verification; no [smtp] alerts_to to tell");
            return;
        }
        let subject = format!("Bulwark: recovery point {id} of {} FAILED verification", rp.vm);
        let body = format!(
            "Recovery point {id} of {} (made {}) did not read back as it was made.\n{problem}\n{}\nJob {} (verify). \
             Restore from another recovery point; the next consistency check fetches the damaged blocks again.\n",
            rp.vm,
            jiff::Timestamp::from_millisecond(rp.created_at as i64).map(|t| t.to_string()).unwrap_or_default(),
            job.detail.as_deref().unwrap_or(""),
            job.id,
        );
        let smtp = self.smtp.clone();
        actix_rt::spawn(async move {
            for to in recipients {
                match crate::notify::send(smtp.as_ref(), &to, &subject, body.clone()).await {
                    Ok(()) => tracing::info!(%to, "verification failure mailed"),
                    Err(e) => tracing::warn!(%to, error = %e, "verification failure not mailed"),
                }
            }
        });
    }
}

impl Actor for Verifier {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}
