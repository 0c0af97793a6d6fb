//! Bounded reads of the big trees: records after a key, in key order, decoded one at a time (a
//! list answer reads one page, never a whole tree), and the exact removal of job records that
//! the job history retention decided to purge (and a batch insert of many jobs).

use super::{decode, AgentRecord, Catalog, CatalogError, GroupRecord, JobRecord, RecoveryPointRecord, VmRecord};
use serde::de::DeserializeOwned;
use std::ops::Bound;

/// Records of a tree after `after` (all of them without), each with its raw key.
fn after<'a, T: DeserializeOwned + 'a>(
    tree: &'a sled::Tree,
    name: &'static str,
    after: Option<&[u8]>,
) -> impl Iterator<Item = Result<(Vec<u8>, T), CatalogError>> + 'a {
    after_with(tree, name, after, decode)
}

/// [`after`] for a record with older layouts still read (`decode` tries each).
fn after_with<'a, T: 'a>(
    tree: &'a sled::Tree,
    name: &'static str,
    after: Option<&[u8]>,
    decode: fn(&str, &[u8]) -> Result<T, CatalogError>,
) -> impl Iterator<Item = Result<(Vec<u8>, T), CatalogError>> + 'a {
    let range = match after {
        Some(k) => tree.range::<&[u8], _>((Bound::Excluded(k), Bound::Unbounded)),
        None => tree.iter(),
    };
    range.map(move |kv| {
        let (k, v) = kv?;
        Ok((k.to_vec(), decode(name, &v)?))
    })
}

impl Catalog {
    /// Join tokens after the key `after` (the hash of a token's secret), in hash order: the
    /// order of their public ids.
    pub fn tokens_after(
        &self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, super::TokenRecord), CatalogError>> + '_ {
        let range = match key {
            Some(k) => self.tokens.range::<&[u8], _>((Bound::Excluded(k), Bound::Unbounded)),
            None => self.tokens.iter(),
        };
        range.map(|kv| {
            let (k, v) = kv?;
            Ok((k.to_vec(), super::decode_token(&v)?))
        })
    }

    /// Jobs after the key `after` (a job id, big-endian), oldest first.
    pub fn jobs_after(
        &self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, JobRecord), CatalogError>> + '_ {
        after(&self.jobs, "jobs", key)
    }

    /// VMs after the key `after`, in the VM tree's key order.
    pub fn vms_after(
        &self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, VmRecord), CatalogError>> + '_ {
        after(&self.vms, "vms", key)
    }

    /// Enrolled agents after the key `after` (host names), by name.
    pub fn agents_after(
        &self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, AgentRecord), CatalogError>> + '_ {
        after_with(&self.agents, "agents", key, super::decode_agent)
    }

    /// Groups after the key `after` (group names), by name.
    pub fn groups_after(
        &self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, GroupRecord), CatalogError>> + '_ {
        after_with(&self.groups, "groups", key, super::decode_group)
    }

    /// Recovery points of `vm` after the key `after` (a recovery-point key of that VM), oldest
    /// first. A key of another VM is refused with `Ok(None)`.
    #[allow(clippy::type_complexity)]
    pub fn recovery_points_after<'a>(
        &'a self,
        vm: &str,
        key: Option<&[u8]>,
    ) -> Option<Box<dyn Iterator<Item = Result<(Vec<u8>, RecoveryPointRecord), CatalogError>> + 'a>> {
        let prefix = [vm.as_bytes(), &[0]].concat();
        match key {
            None => Some(Box::new(self.rps.scan_prefix(&prefix).map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), decode("rps", &v)?))
            }))),
            Some(k) if k.starts_with(&prefix) => {
                Some(Box::new(after(&self.rps, "rps", Some(k)).take_while(move |r| match r {
                    Ok((k, _)) => k.starts_with(&prefix),
                    Err(_) => true,
                })))
            }
            Some(_) => None,
        }
    }

    /// Removes the job `id` if its record is still exactly `seen` (a job that changed since the
    /// retention looked at it is left for its next pass). Returns whether it was removed; not
    /// flushed (job history is not worth an fsync).
    pub fn purge_job(&self, id: u64, seen: &JobRecord) -> Result<bool, CatalogError> {
        let key = id.to_be_bytes();
        let Some(old) = self.jobs.get(key)? else { return Ok(false) };
        let current: JobRecord = decode("jobs", &old)?;
        if &current != seen {
            return Ok(false);
        }
        Ok(self.jobs.compare_and_swap(key, Some(old), None::<&[u8]>)?.is_ok())
    }

    /// Records many jobs in one batch and one flush (imports, and tests that need a long
    /// history); new job ids are handed out past the largest of them.
    pub fn put_jobs(&self, jobs: &[JobRecord]) -> Result<(), CatalogError> {
        let mut batch = sled::Batch::default();
        for job in jobs {
            batch.insert(job.id.to_be_bytes().to_vec(), super::encode("jobs", job)?);
        }
        self.jobs.apply_batch(batch)?;
        if let Some(top) = jobs.iter().map(|j| j.id).max() {
            self.meta.update_and_fetch("next_job_id", |old| {
                let n = old.and_then(|o| <[u8; 8]>::try_from(o).ok()).map(u64::from_be_bytes).unwrap_or(0);
                Some(n.max(top).to_be_bytes().to_vec())
            })?;
        }
        self.flush()
    }

    /// Counts records of the jobs tree one at a time (`status`), never holding them all.
    pub fn count_jobs(&self, mut keep: impl FnMut(&JobRecord) -> bool) -> Result<usize, CatalogError> {
        let mut n = 0;
        for r in self.jobs_after(None) {
            if keep(&r?.1) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Counts VMs one at a time (`status`).
    pub fn count_vms(&self, mut keep: impl FnMut(&VmRecord) -> bool) -> Result<usize, CatalogError> {
        let mut n = 0;
        for r in self.vms_after(None) {
            if keep(&r?.1) {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{JobKind, JobState};

    #[test]
    fn jobs_after_a_key_start_past_it_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        for id in [3u64, 1, 300, 2] {
            cat.put_job(&JobRecord::queued(id, JobKind::Verify, None)).unwrap();
        }
        let ids = |after: Option<u64>| -> Vec<u64> {
            let k = after.map(u64::to_be_bytes);
            cat.jobs_after(k.as_ref().map(|k| &k[..])).map(|r| r.unwrap().1.id).collect()
        };
        assert_eq!(ids(None), vec![1, 2, 3, 300]);
        assert_eq!(ids(Some(2)), vec![3, 300]);
        assert_eq!(ids(Some(300)), Vec::<u64>::new());
    }

    #[test]
    fn a_batch_of_jobs_moves_the_next_job_id_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let jobs: Vec<_> = (1..=500).map(|id| JobRecord::queued(id, JobKind::Verify, None)).collect();
        cat.put_jobs(&jobs).unwrap();
        assert_eq!(cat.jobs_after(None).count(), 500);
        assert_eq!(cat.next_job_id().unwrap(), 501);
    }

    #[test]
    fn a_job_that_changed_since_it_was_read_is_not_purged() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let seen = JobRecord { state: JobState::Succeeded, ..JobRecord::queued(1, JobKind::Sync, Some("vm".into())) };
        cat.put_job(&seen).unwrap();
        let changed = JobRecord { detail: Some("later".into()), ..seen.clone() };
        cat.put_job(&changed).unwrap();
        assert!(!cat.purge_job(1, &seen).unwrap());
        assert!(cat.purge_job(1, &changed).unwrap());
        assert!(cat.job(1).unwrap().is_none());
        assert!(!cat.purge_job(1, &changed).unwrap(), "already gone");
    }
}
