//! Job history retention (`[jobs] keep`, `keep_count`), as plain decisions: which job records
//! the periodic purge removes. A record goes when it is final (never a queued or running job),
//! is not the newest job of its VM (so every VM keeps its last outcome), and either finished
//! longer than `keep` ago or the catalog holds more than `keep_count` records (then the oldest
//! go first).
//!
//! The driver (`server::history`) feeds it in bounded steps: a *count* walk over records it has
//! not seen yet (ids only grow), which keeps the record count and each VM's newest job id — the
//! memory is one entry per VM, never per job — and a *purge* walk, oldest first, that asks
//! [`JobHistory::decide`] about each counted record.

use crate::catalog::JobRecord;
use std::collections::HashMap;

pub use crate::config::Retention;

/// What the purge knows of the job tree.
#[derive(Debug)]
pub struct JobHistory {
    retention: Retention,
    /// The newest job id of each VM among the counted records.
    newest: HashMap<String, u64>,
    /// Every record with an id up to this one has been counted.
    counted_to: Option<u64>,
    /// Records counted and not purged since.
    count: u64,
}

impl JobHistory {
    pub fn new(retention: Retention) -> Self {
        Self { retention, newest: HashMap::new(), counted_to: None, count: 0 }
    }

    /// The last id the count walk reached (it goes on after it).
    pub fn counted_to(&self) -> Option<u64> {
        self.counted_to
    }

    /// Records counted and still there.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// A record the count walk reached; ids come in increasing order, each once.
    pub fn counted(&mut self, id: u64, vm: Option<&str>) {
        debug_assert!(self.counted_to.is_none_or(|c| id > c), "the count walk goes forward");
        self.counted_to = Some(id);
        self.count += 1;
        if let Some(vm) = vm {
            let newest = self.newest.entry(vm.to_owned()).or_insert(id);
            *newest = (*newest).max(id);
        }
    }

    /// Whether the purge walk removes `job` (a counted record) at `now` (Unix seconds). A yes
    /// counts it as gone; call [`JobHistory::kept_after_all`] if the removal did not happen.
    pub fn decide(&mut self, job: &JobRecord, now: u64) -> bool {
        if !job.state.is_final() || self.counted_to.is_none_or(|c| job.id > c) {
            return false;
        }
        if let Some(vm) = &job.vm {
            // The newest job of a VM stays, however old: it is the VM's last word.
            if self.newest.get(vm).is_none_or(|&newest| newest <= job.id) {
                return false;
            }
        }
        let ended = job.finished_at.or(job.started_at).unwrap_or(0);
        let expired = ended.saturating_add(self.retention.keep_secs) < now;
        let over = self.count > self.retention.keep_count;
        if expired || over {
            self.count = self.count.saturating_sub(1);
            return true;
        }
        false
    }

    /// A record [`JobHistory::decide`] gave up was not removed after all (it changed).
    pub fn kept_after_all(&mut self) {
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{JobKind, JobState};

    const DAY: u64 = 86_400;

    fn job(id: u64, vm: Option<&str>, state: JobState, finished_at: u64) -> JobRecord {
        JobRecord {
            state,
            finished_at: state.is_final().then_some(finished_at),
            started_at: Some(finished_at),
            ..JobRecord::queued(id, JobKind::Sync, vm.map(str::to_owned))
        }
    }

    /// Counts `jobs`, then walks them oldest first: the ids purged.
    fn purge(retention: Retention, jobs: &[JobRecord], now: u64) -> Vec<u64> {
        let mut h = JobHistory::new(retention);
        for j in jobs {
            h.counted(j.id, j.vm.as_deref());
        }
        jobs.iter().filter(|j| h.decide(j, now)).map(|j| j.id).collect()
    }

    #[test]
    fn old_finished_jobs_go_but_each_vms_newest_stays() {
        let now = 100 * DAY;
        let jobs = [
            job(1, Some("a"), JobState::Succeeded, DAY),
            job(2, Some("a"), JobState::Failed, 2 * DAY),
            job(3, Some("b"), JobState::Succeeded, DAY),
            job(4, None, JobState::Succeeded, DAY),
            job(5, Some("a"), JobState::Succeeded, now - DAY),
        ];
        let retention = Retention { keep_secs: 30 * DAY, keep_count: 1000 };
        assert_eq!(purge(retention, &jobs, now), vec![1, 2, 4], "b's only job and a's newest stay");
    }

    #[test]
    fn queued_and_running_jobs_are_never_purged() {
        let jobs = [
            job(1, Some("a"), JobState::Running, 0),
            job(2, Some("a"), JobState::Queued, 0),
            job(3, None, JobState::Running, 0),
            job(4, Some("a"), JobState::Succeeded, 0),
        ];
        let retention = Retention { keep_secs: 1, keep_count: 0 };
        assert_eq!(purge(retention, &jobs, 100 * DAY), Vec::<u64>::new());
    }

    #[test]
    fn over_the_count_the_oldest_go_first_down_to_the_count() {
        let now = 10 * DAY;
        let jobs: Vec<_> =
            (1..=10).map(|i| job(i, Some(if i % 2 == 0 { "a" } else { "b" }), JobState::Succeeded, now)).collect();
        let retention = Retention { keep_secs: 30 * DAY, keep_count: 4 };
        assert_eq!(purge(retention, &jobs, now), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn records_the_count_walk_has_not_reached_are_left_alone() {
        let mut h = JobHistory::new(Retention { keep_secs: 0, keep_count: 0 });
        h.counted(1, None);
        assert!(!h.decide(&job(2, None, JobState::Succeeded, 0), 100));
        assert!(h.decide(&job(1, None, JobState::Succeeded, 0), 100));
        assert_eq!(h.count(), 0);
        h.kept_after_all();
        assert_eq!(h.count(), 1);
    }
}
