//! Typed access to VMs, protection groups, jobs and schedules' next-run times.

use super::{decode, encode, Catalog, CatalogError, GroupRecord, JobRecord, ReplicaState, VmRecord};
use bulwark_protocol::messages::Inventory;

/// What an agent's inventory changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InventoryChanges {
    /// VMs first seen.
    pub new: Vec<String>,
    /// VMs that moved here from another host: (VM, from).
    pub moved: Vec<(String, String)>,
    /// Replicas made inconsistent because the VM's change tracking was reset: (VM, reason).
    pub tracking_reset: Vec<(String, String)>,
}

fn schedule_key(group: &str, kind: &str) -> Vec<u8> {
    [group.as_bytes(), &[0], kind.as_bytes()].concat()
}

impl Catalog {
    // ---- VMs

    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>, CatalogError> {
        self.vms.get(id.as_bytes())?.map(|v| decode("vms", &v)).transpose()
    }

    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), CatalogError> {
        self.vms.insert(vm.id.as_bytes(), encode("vms", vm)?)?;
        Ok(())
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, CatalogError> {
        self.vms.iter().values().map(|v| decode("vms", &v?)).collect()
    }

    /// Records what `host` reports: its VMs (a VM another host reported before has migrated
    /// here) and their tracking generation — one that moved past the replica's change token
    /// means tracking was lost (host crash, storage migration): the replica is inconsistent.
    pub fn apply_inventory(&self, host: &str, inv: &Inventory, now: u64) -> Result<InventoryChanges, CatalogError> {
        let mut changes = InventoryChanges::default();
        for v in &inv.vms {
            let old = self.vm(&v.name)?;
            match &old {
                None => changes.new.push(v.name.clone()),
                Some(o) if o.host != host => changes.moved.push((v.name.clone(), o.host.clone())),
                Some(_) => {}
            }
            let record = VmRecord {
                id: v.id.to_string(),
                name: v.name.clone(),
                host: host.to_owned(),
                os: v.os,
                power: v.power,
                disks: v.disks.clone(),
                group: old.as_ref().and_then(|o| o.group.clone()),
                updated_at: now,
            };
            if old.as_ref() != Some(&record) {
                self.put_vm(&record)?;
            }
            let Some(generation) = v.change_generation else { continue };
            for mut r in self.replicas_of(&v.name)? {
                let reset = r.change_token.is_some_and(|t| t.generation != generation);
                if reset && r.state == ReplicaState::Consistent {
                    let reason = format!("change tracking was reset on {host} (host crash or storage migration)");
                    r.state = ReplicaState::Inconsistent;
                    r.reason = Some(reason.clone());
                    r.updated_at = now;
                    self.put_replica(&r)?;
                    changes.tracking_reset.push((v.name.clone(), reason));
                }
            }
        }
        Ok(changes)
    }

    // ---- groups

    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, CatalogError> {
        self.groups.get(name.as_bytes())?.map(|v| decode("groups", &v)).transpose()
    }

    pub fn put_group(&self, g: &GroupRecord) -> Result<(), CatalogError> {
        self.groups.insert(g.name.as_bytes(), encode("groups", g)?)?;
        self.flush_durable()
    }

    pub fn delete_group(&self, name: &str) -> Result<bool, CatalogError> {
        let existed = self.groups.remove(name.as_bytes())?.is_some();
        let schedules: Vec<_> = self.schedules.scan_prefix(schedule_key(name, "")).keys().collect::<Result<_, _>>()?;
        for k in schedules {
            self.schedules.remove(k)?;
        }
        self.flush_durable()?;
        Ok(existed)
    }

    pub fn groups(&self) -> Result<Vec<GroupRecord>, CatalogError> {
        self.groups.iter().values().map(|v| decode("groups", &v?)).collect()
    }

    // ---- jobs

    /// A new job id, never handed out before (survives restarts).
    pub fn next_job_id(&self) -> Result<u64, CatalogError> {
        let v = self.meta.update_and_fetch("next_job_id", |old| {
            let n = old.and_then(|o| <[u8; 8]>::try_from(o).ok()).map(u64::from_be_bytes).unwrap_or(0) + 1;
            Some(n.to_be_bytes().to_vec())
        })?;
        let n = v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(1);
        Ok(n)
    }

    pub fn job(&self, id: u64) -> Result<Option<JobRecord>, CatalogError> {
        self.jobs.get(id.to_be_bytes())?.map(|v| decode("jobs", &v)).transpose()
    }

    /// Records a job's state, flushed to sled's files (so a killed coordinator keeps every
    /// job it announced, and fails the unfinished ones at its restart) but not fsynced: a power
    /// loss may forget a job's last state change; what must survive that — a commit — is made
    /// durable by the commit itself.
    pub fn put_job(&self, job: &JobRecord) -> Result<(), CatalogError> {
        self.jobs.insert(job.id.to_be_bytes(), encode("jobs", job)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// After a restart no job may stay queued or running: each is failed with the reason.
    /// Returns the ids of the jobs it failed.
    pub fn fail_interrupted_jobs(&self, reason: &str, now: u64) -> Result<Vec<u64>, CatalogError> {
        let mut failed = vec![];
        for r in self.jobs_after(None) {
            let (_, mut job) = r?;
            if !job.state.is_final() {
                job.state = super::JobState::Failed;
                job.error = Some(reason.to_owned());
                job.finished_at = Some(now);
                self.jobs.insert(job.id.to_be_bytes(), encode("jobs", &job)?)?;
                failed.push(job.id);
            }
        }
        self.flush_durable()?;
        Ok(failed)
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, CatalogError> {
        self.jobs.iter().values().map(|v| decode("jobs", &v?)).collect()
    }

    // ---- schedules

    /// The persisted next-run time (Unix seconds) of a group's schedule kind.
    pub fn next_run(&self, group: &str, kind: &str) -> Result<Option<u64>, CatalogError> {
        Ok(self
            .schedules
            .get(schedule_key(group, kind))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    pub fn set_next_run(&self, group: &str, kind: &str, at: u64) -> Result<(), CatalogError> {
        self.schedules.insert(schedule_key(group, kind), &at.to_be_bytes())?;
        self.flush_durable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_unique_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let cat = Catalog::create(dir.path()).unwrap();
            let a = cat.next_job_id().unwrap();
            assert_eq!(cat.next_job_id().unwrap(), a + 1);
            cat.flush_durable().unwrap();
            a
        };
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(cat.next_job_id().unwrap(), a + 2);
    }

    #[test]
    fn jobs_interrupted_by_a_restart_are_failed_with_the_reason() {
        use crate::catalog::{JobKind, JobRecord, JobState};
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let job = |id, state| JobRecord { state, started_at: Some(1), ..JobRecord::queued(id, JobKind::Verify, None) };
        cat.put_job(&job(1, JobState::Running)).unwrap();
        cat.put_job(&job(2, JobState::Succeeded)).unwrap();
        cat.put_job(&job(3, JobState::Queued)).unwrap();
        assert_eq!(cat.fail_interrupted_jobs("coordinator restarted", 9).unwrap(), vec![1, 3]);
        let j1 = cat.job(1).unwrap().unwrap();
        assert_eq!(
            (j1.state, j1.error.as_deref(), j1.finished_at),
            (JobState::Failed, Some("coordinator restarted"), Some(9))
        );
        assert_eq!(cat.job(2).unwrap().unwrap().state, JobState::Succeeded);
    }

    #[test]
    fn next_run_times_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cat = Catalog::create(dir.path()).unwrap();
            assert_eq!(cat.next_run("g", "sync").unwrap(), None);
            cat.set_next_run("g", "sync", 1234).unwrap();
        }
        assert_eq!(Catalog::open(dir.path()).unwrap().next_run("g", "sync").unwrap(), Some(1234));
    }
}
