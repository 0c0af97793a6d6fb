//! The periodic purge of job records (`[jobs] keep`, `keep_count`): every tick reads at most
//! [`BUDGET`] records — first the ones not counted yet, then, once the count has caught up, the
//! next stretch of the purge walk — and removes what `jobs::history` decides. A pass walks the
//! whole tree, oldest first; a new pass starts [`PASS_EVERY`] after the last one ended.

use crate::catalog::{now_secs, Catalog, CatalogError};
use crate::jobs::history::{JobHistory, Retention};
use std::time::Duration;

/// How often the purge does a bounded step.
pub const TICK: Duration = Duration::from_secs(1);
/// Records read per tick.
pub const BUDGET: usize = 20_000;
/// Pause between the end of a pass and the next one.
pub const PASS_EVERY: Duration = Duration::from_secs(60);

/// The purge's state between ticks.
#[derive(Debug)]
pub struct Purge {
    history: JobHistory,
    /// The pass under way: the last id it looked at (`Some(None)`: starting).
    pass: Option<Option<u64>>,
    purged_this_pass: u64,
    next_pass_at: u64,
}

impl Purge {
    pub fn new(retention: Retention) -> Self {
        Self { history: JobHistory::new(retention), pass: None, purged_this_pass: 0, next_pass_at: 0 }
    }

    /// One bounded step; returns the records purged.
    pub fn tick(&mut self, catalog: &Catalog, now: u64) -> Result<u64, CatalogError> {
        let mut budget = BUDGET;
        let start = self.history.counted_to().map(u64::to_be_bytes);
        for r in catalog.jobs_after(start.as_ref().map(|k| &k[..])) {
            if budget == 0 {
                return Ok(0); // not caught up: purge only once every record is counted
            }
            budget -= 1;
            let (_, job) = r?;
            self.history.counted(job.id, job.vm.as_deref());
        }
        if self.pass.is_none() && now >= self.next_pass_at {
            self.pass = Some(None);
            self.purged_this_pass = 0;
        }
        let Some(position) = self.pass else { return Ok(0) };
        let counted_to = self.history.counted_to().unwrap_or(0);
        let from = position.map(u64::to_be_bytes);
        let mut purged = 0;
        let mut last = position;
        let mut finished = true;
        for r in catalog.jobs_after(from.as_ref().map(|k| &k[..])) {
            let (_, job) = r?;
            if job.id > counted_to {
                break;
            }
            if budget == 0 {
                finished = false;
                break;
            }
            budget -= 1;
            last = Some(job.id);
            if self.history.decide(&job, now) {
                if catalog.purge_job(job.id, &job)? {
                    purged += 1;
                } else {
                    self.history.kept_after_all();
                }
            }
        }
        self.purged_this_pass += purged;
        if finished {
            if self.purged_this_pass > 0 {
                tracing::info!(
                    purged = self.purged_this_pass,
                    remaining = self.history.count(),
                    "job history: retention pass finished"
                );
            }
            self.pass = None;
            self.next_pass_at = now.saturating_add(PASS_EVERY.as_secs());
        } else {
            self.pass = Some(last);
        }
        Ok(purged)
    }
}

/// Runs the purge on the current actix system until it stops.
pub fn start(catalog: Catalog, retention: Retention) {
    tracing::info!(keep_secs = retention.keep_secs, keep_count = retention.keep_count, "job history retention");
    actix_rt::spawn(async move {
        let mut purge = Purge::new(retention);
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let catalog = catalog.clone();
            let done = tokio::task::spawn_blocking(move || {
                let r = purge.tick(&catalog, now_secs());
                (purge, r)
            })
            .await;
            match done {
                Ok((p, r)) => {
                    purge = p;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "job history purge failed (retried next tick)");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "job history purge worker failed: purge stopped");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{JobKind, JobRecord, JobState};

    #[test]
    fn a_pass_over_more_records_than_a_tick_reads_purges_them_all_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let n = (BUDGET * 2 + 17) as u64;
        let jobs: Vec<_> = (1..=n)
            .map(|id| JobRecord {
                state: JobState::Succeeded,
                finished_at: Some(10),
                ..JobRecord::queued(id, JobKind::Sync, Some(format!("vm{}", id % 3)))
            })
            .collect();
        cat.put_jobs(&jobs).unwrap();
        let mut purge = Purge::new(Retention { keep_secs: 100, keep_count: 1_000_000 });
        let now = 1_000;
        let mut ticks = 0;
        while purge.pass.is_some() || purge.history.counted_to() != Some(n) || ticks == 0 {
            purge.tick(&cat, now).unwrap();
            ticks += 1;
            assert!(ticks < 20, "the purge does not progress");
        }
        let left: Vec<u64> = cat.jobs_after(None).map(|r| r.unwrap().1.id).collect();
        assert_eq!(left, vec![n - 2, n - 1, n], "each VM's newest job stays");
        assert!(ticks >= 5, "the work was spread over ticks ({ticks})");
    }
}
