//! Typed access to VMs, protection groups, jobs and schedules' next-run times.

use super::identity::{self, Claim, Conflict, Known, Verdict, VmIdentity};
use super::{decode, encode, Catalog, CatalogError, GroupRecord, JobRecord, Policy, VmRecord};
use bulwark_protocol::messages::{Inventory, VmInfo};
use std::collections::HashSet;

/// VMs one host may report unless `[agents] max_vms_per_host` says otherwise (more are refused
/// and logged).
pub const DEFAULT_MAX_VMS_PER_HOST: usize = 4096;

/// Groups whose decoded policy [`Catalog::group_policy`] keeps at most (then it starts over).
const POLICY_CACHE_GROUPS: usize = 1024;

/// What an agent's inventory changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InventoryChanges {
    /// VMs first seen.
    pub new: Vec<String>,
    /// VMs that moved here from another host: (VM, from).
    pub moved: Vec<(String, String)>,
    /// Replicas made inconsistent because the VM's change tracking was reset: (VM, reason).
    pub tracking_reset: Vec<(String, String)>,
    /// Claims refused (security events): (the name as reported, escaped; why).
    pub refused: Vec<(String, String)>,
    /// VMs of this host it no longer reports.
    pub missing: Vec<String>,
    /// VMs of this host it no longer reports that another host of their cluster claimed
    /// meanwhile, now recorded there: (VM, to).
    pub handed_over: Vec<(String, String)>,
}

/// A VM the catalog holds, with what [`identity::judge`] needs to know of it.
struct Held {
    record: VmRecord,
    identity: Option<VmIdentity>,
    host_cluster: String,
    still_reported: bool,
}

impl Held {
    fn known(&self) -> Known<'_> {
        Known {
            name: &self.record.name,
            host: &self.record.host,
            identity: self.identity.as_ref(),
            host_cluster: &self.host_cluster,
            still_reported: self.still_reported,
        }
    }
}

/// A name from a host, safe for a log line: control characters escaped, at most 80 characters.
fn shown(s: &str) -> String {
    s.chars().take(80).flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}

/// Key of the per-host indexes `vm_hosts` and `vm_conflicts`.
fn host_key(host: &str, vm: &str) -> Vec<u8> {
    [host.as_bytes(), &[0], vm.as_bytes()].concat()
}

fn host_prefix(host: &str) -> Vec<u8> {
    [host.as_bytes(), &[0]].concat()
}

fn schedule_key(group: &str, kind: &str) -> Vec<u8> {
    [group.as_bytes(), &[0], kind.as_bytes()].concat()
}

impl Catalog {
    // ---- VMs

    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>, CatalogError> {
        self.vms.get(id.as_bytes())?.map(|v| decode("vms", &v)).transpose()
    }

    /// Records a VM under its name, keeping the per-host index in step.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), CatalogError> {
        if let Some(old) = self.vm(&vm.name)? {
            if old.host != vm.host {
                self.vm_hosts.remove(host_key(&old.host, &old.name))?;
            }
        }
        self.vms.insert(vm.name.as_bytes(), encode("vms", vm)?)?;
        self.vm_hosts.insert(host_key(&vm.host, &vm.name), &[])?;
        Ok(())
    }

    /// Builds the per-host VM index of a catalog written before it existed.
    pub(super) fn index_vm_hosts(&self) -> Result<(), CatalogError> {
        if !self.vm_hosts.is_empty() {
            return Ok(());
        }
        for v in self.vms.iter().values() {
            let vm: VmRecord = decode("vms", &v?)?;
            self.vm_hosts.insert(host_key(&vm.host, &vm.name), &[])?;
        }
        Ok(())
    }

    /// Names of the VMs recorded on `host`, a bounded number at a time.
    fn vms_on(&self, host: &str) -> impl Iterator<Item = Result<String, CatalogError>> + '_ {
        let prefix = host_prefix(host);
        let skip = prefix.len();
        self.vm_hosts.scan_prefix(prefix).keys().map(move |k| Ok(String::from_utf8_lossy(&k?[skip..]).into_owned()))
    }

    /// The cluster a host belongs to: the one its join token named; a standalone host (or
    /// one the catalog does not know) is its own cluster.
    pub fn cluster_of(&self, host: &str) -> Result<String, CatalogError> {
        Ok(self.agent(host)?.map_or_else(|| host.to_owned(), |a| a.cluster))
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, CatalogError> {
        self.vms.iter().values().map(|v| decode("vms", &v?)).collect()
    }

    pub fn vm_identity(&self, name: &str) -> Result<Option<VmIdentity>, CatalogError> {
        self.vm_identity.get(name.as_bytes())?.map(|v| decode("vm_identity", &v)).transpose()
    }

    fn put_identity(&self, name: &str, i: &VmIdentity) -> Result<(), CatalogError> {
        self.vm_identity.insert(name.as_bytes(), encode("vm_identity", i)?)?;
        self.vm_uuids.insert(i.uuid.as_bytes(), name.as_bytes())?;
        Ok(())
    }

    /// The VM recorded under `uuid`, by name.
    pub fn vm_by_uuid(&self, uuid: &str) -> Result<Option<String>, CatalogError> {
        Ok(self.vm_uuids.get(uuid.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// `bulwark vm forget`: removes a VM's record and identity (its recovery points stay until
    /// retention). Refused while the VM is in a protection group.
    pub fn forget_vm(&self, name: &str) -> Result<Result<(), String>, CatalogError> {
        let _guard = self.inventory_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(vm) = self.vm(name)? else { return Ok(Err(format!("no VM named {name}"))) };
        if let Some(g) = &vm.group {
            return Ok(Err(format!("{name} is in protection group {g}: remove it from the group first")));
        }
        if let Some(i) = self.vm_identity(name)? {
            if self.vm_by_uuid(&i.uuid)?.as_deref() == Some(name) {
                self.vm_uuids.remove(i.uuid.as_bytes())?;
            }
            if let Some(c) = &i.conflict {
                self.vm_conflicts.remove(host_key(&c.host, name))?;
            }
        }
        self.vm_identity.remove(name.as_bytes())?;
        self.forget_ownership(name)?;
        self.vm_hosts.remove(host_key(&vm.host, name))?;
        self.vms.remove(name.as_bytes())?;
        self.flush_durable()?;
        Ok(Ok(()))
    }

    /// Records an accepted report of VM `v` from `host` (`old`: its record until now): the
    /// record, and its tracking generation — one that moved past the replica's change token
    /// means tracking was lost (host crash, storage migration): the replica is inconsistent.
    fn record_report(
        &self,
        host: &str,
        v: &VmInfo,
        old: Option<VmRecord>,
        now: u64,
        changes: &mut InventoryChanges,
    ) -> Result<(), CatalogError> {
        let record = VmRecord {
            id: v.id.as_str().to_owned(),
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
        let Some(generation) = v.change_generation else { return Ok(()) };
        for mut r in self.replicas_of(&v.name)? {
            let reset = r.change_token.is_some_and(|t| t.generation != generation);
            let reason = format!("change tracking was reset on {host} (host crash or storage migration)");
            if reset && r.mark_inconsistent(&reason, now) {
                self.put_replica(&r)?;
                changes.tracking_reset.push((v.name.clone(), reason));
            }
        }
        Ok(())
    }

    /// The VM recorded under `name`, as [`identity::judge`] sees it.
    fn held(&self, name: Option<&str>, online: &dyn Fn(&str) -> bool) -> Result<Option<Held>, CatalogError> {
        let Some(name) = name else { return Ok(None) };
        let Some(record) = self.vm(name)? else { return Ok(None) };
        let identity = self.vm_identity(name)?;
        let host_cluster = self.cluster_of(&record.host)?;
        let still_reported = identity.as_ref().is_some_and(|i| i.missing_since.is_none()) && online(&record.host);
        Ok(Some(Held { record, identity, host_cluster, still_reported }))
    }

    /// Marks `victim` as in conflict with `host`'s claim (the first conflict stays until its
    /// host lets go). `pending`: the claim to apply when the VM's own host lets go of it.
    fn mark_conflict(
        &self,
        victim: &str,
        host: &str,
        reason: &str,
        pending: Option<&VmInfo>,
        now: u64,
    ) -> Result<(), CatalogError> {
        let Some(mut i) = self.vm_identity(victim)? else { return Ok(()) };
        if i.conflict.as_ref().is_some_and(|c| c.host != host) {
            return Ok(());
        }
        if i.conflict.as_ref().is_some_and(|c| c.reason == reason && c.pending_move.as_ref() == pending) {
            return Ok(());
        }
        let since = i.conflict.as_ref().map_or(now, |c| c.since);
        let pending_move = pending.cloned();
        i.conflict = Some(Conflict { host: host.to_owned(), reason: reason.to_owned(), since, pending_move });
        self.put_identity(victim, &i)?;
        self.vm_conflicts.insert(host_key(host, victim), &[])?;
        Ok(())
    }

    /// Records what `host` reports: its VMs, judged by identity ([`identity::judge`]: a VM
    /// moves only inside its cluster, never while its own host still reports it, is never
    /// taken over by name, and a refused claim marks the VM it aimed at as in conflict), and
    /// their tracking generation — one that moved past the replica's change token means
    /// tracking was lost (host crash, storage migration): the replica is inconsistent. VMs of
    /// this host it no longer reports are marked missing; one another host of its cluster was
    /// claiming meanwhile moves there. `online` tells whether a host is connected now; a host
    /// reports at most `max_vms` VMs.
    pub fn apply_inventory(
        &self,
        host: &str,
        inv: &Inventory,
        now: u64,
        online: &dyn Fn(&str) -> bool,
        max_vms: usize,
    ) -> Result<InventoryChanges, CatalogError> {
        let _guard = self.inventory_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cluster = self.cluster_of(host)?;
        let mut changes = InventoryChanges::default();
        let mut reported = HashSet::new();
        let mut aimed_at = HashSet::new();
        if inv.vms.len() > max_vms {
            changes.refused.push((
                format!("{} VMs", inv.vms.len() - max_vms),
                format!(
                    "host {host} reports more than {max_vms} VMs ([agents] max_vms_per_host): the rest are ignored"
                ),
            ));
        }
        for v in inv.vms.iter().take(max_vms) {
            if let Err(e) = bulwark_protocol::VmId::new(v.name.clone()) {
                changes.refused.push((shown(&v.name), format!("not a valid VM name: {}", shown(&e.to_string()))));
                continue;
            }
            if !reported.insert(v.name.clone()) {
                changes.refused.push((v.name.clone(), format!("host {host} reports two VMs named {}", v.name)));
                continue;
            }
            let uuid = v.id.as_str();
            if uuid::Uuid::parse_str(uuid).is_err() {
                changes.refused.push((v.name.clone(), format!("reported without a UUID (id {})", shown(uuid))));
                continue;
            }
            let by_uuid = self.held(self.vm_by_uuid(uuid)?.as_deref(), online)?;
            let by_name = self.held(Some(&v.name), online)?;
            let claim = Claim { uuid, name: &v.name, host, cluster: &cluster };
            let verdict = identity::judge(claim, by_uuid.as_ref().map(Held::known), by_name.as_ref().map(Held::known));
            let fresh =
                || VmIdentity { uuid: uuid.to_owned(), cluster: cluster.clone(), conflict: None, missing_since: None };
            let mut ident = match verdict {
                Verdict::Refuse { victim, reason, pending_move } => {
                    if let Some(victim) = victim {
                        self.mark_conflict(&victim, host, &reason, pending_move.then_some(v), now)?;
                        aimed_at.insert(victim);
                    }
                    changes.refused.push((v.name.clone(), reason));
                    continue;
                }
                Verdict::New => {
                    changes.new.push(v.name.clone());
                    fresh()
                }
                Verdict::Adopt => fresh(),
                Verdict::Same { migrated_from } => {
                    if let Some(from) = migrated_from {
                        changes.moved.push((v.name.clone(), from));
                    }
                    by_uuid.as_ref().and_then(|h| h.identity.clone()).unwrap_or_else(fresh)
                }
            };
            ident.missing_since = None;
            if ident.conflict.as_ref().is_some_and(|c| c.host == host) {
                // Its own (new) host cannot be in conflict with it.
                self.vm_conflicts.remove(host_key(host, &v.name))?;
                ident.conflict = None;
            }
            let old = by_name.map(|h| (h.record, h.identity));
            if old.as_ref().and_then(|(_, i)| i.as_ref()) != Some(&ident) {
                self.put_identity(&v.name, &ident)?;
            }
            self.record_report(host, v, old.map(|(r, _)| r), now, &mut changes)?;
            // A claim names a coordinator by its certificate identity: anything longer is not one.
            let owner = v.owner.as_ref().filter(|o| o.coordinator.len() <= bulwark_protocol::ownership::MAX_OWNER_NAME);
            self.note_reported_owner(&v.name, owner)?;
        }
        // Conflicts this host no longer stirs are resolved.
        let stirred: Vec<String> = self
            .vm_conflicts
            .scan_prefix(host_prefix(host))
            .keys()
            .map(|k| k.map(|k| String::from_utf8_lossy(&k[host.len() + 1..]).into_owned()))
            .collect::<Result<_, _>>()?;
        for victim in stirred {
            if aimed_at.contains(&victim) {
                continue;
            }
            self.vm_conflicts.remove(host_key(host, &victim))?;
            if let Some(mut i) = self.vm_identity(&victim)? {
                if i.conflict.as_ref().is_some_and(|c| c.host == host) {
                    i.conflict = None;
                    self.put_identity(&victim, &i)?;
                }
            }
        }
        // VMs recorded here that it no longer reports are missing, or move to the host of
        // their cluster that claimed them meanwhile.
        let gone: Vec<String> = self
            .vms_on(host)
            .filter(|n| n.as_ref().map_or(true, |n| !reported.contains(n)))
            .collect::<Result<_, _>>()?;
        for name in gone {
            let Some(mut i) = self.vm_identity(&name)? else { continue };
            let Some(vm) = self.vm(&name)? else { continue };
            match i.conflict.take() {
                Some(Conflict { host: to, pending_move: Some(claim), .. }) => {
                    // The claim it refused while this host held the VM, applied now.
                    self.vm_conflicts.remove(host_key(&to, &name))?;
                    i.missing_since = None;
                    self.put_identity(&name, &i)?;
                    self.record_report(&to, &claim, Some(vm), now, &mut changes)?;
                    // And the ownership claim it reported with the VM: that host sends its
                    // inventory again only when something changes.
                    let owner = claim
                        .owner
                        .as_ref()
                        .filter(|o| o.coordinator.len() <= bulwark_protocol::ownership::MAX_OWNER_NAME);
                    self.note_reported_owner(&name, owner)?;
                    changes.handed_over.push((name, to));
                }
                other => {
                    i.conflict = other;
                    if i.missing_since.is_none() {
                        i.missing_since = Some(now);
                        self.put_identity(&name, &i)?;
                        changes.missing.push(name);
                    }
                }
            }
        }
        Ok(changes)
    }

    // ---- groups

    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, CatalogError> {
        self.groups.get(name.as_bytes())?.map(|v| super::decode_group("groups", &v)).transpose()
    }

    /// Group `name`'s policy (what a job needs of its group) without decoding its member list
    /// each time: the policy is kept with the record bytes it came from and decoded again only
    /// when the stored record differs (a group of 10,000 members is a record of some 200 KB).
    pub fn group_policy(&self, name: &str) -> Result<Option<Policy>, CatalogError> {
        let Some(bytes) = self.groups.get(name.as_bytes())? else { return Ok(None) };
        let mut cache = self.policies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, policy)) = cache.get(name) {
            if *seen == bytes {
                return Ok(Some(policy.clone()));
            }
        }
        let policy = super::decode_group("groups", &bytes)?.policy;
        if cache.len() >= POLICY_CACHE_GROUPS {
            cache.clear();
        }
        cache.insert(name.to_owned(), (bytes, policy.clone()));
        Ok(Some(policy))
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
        self.groups.iter().values().map(|v| super::decode_group("groups", &v?)).collect()
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

    /// `vm` left protection with its data kept: its recovery points are pruned by `retention_secs`
    /// (the retention its group had) from now on; durable.
    pub fn keep_data(&self, vm: &str, retention_secs: u64) -> Result<(), CatalogError> {
        self.kept.insert(vm.as_bytes(), &retention_secs.to_be_bytes())?;
        self.flush_durable()
    }

    /// `vm` is protected again: its group's retention applies; durable.
    pub fn unkeep(&self, vm: &str) -> Result<(), CatalogError> {
        // Durable only when there was something to forget: a new group's members are rarely
        // kept, and a flush per member made creating a group of 10,000 take seconds of fsyncs.
        if self.kept.remove(vm.as_bytes())?.is_some() {
            self.flush_durable()?;
        }
        Ok(())
    }

    /// VMs whose data was kept, with the retention in seconds each keeps, by name.
    pub fn kept(&self) -> impl Iterator<Item = Result<(String, u64), CatalogError>> + '_ {
        self.kept.iter().map(|kv| {
            let (k, v) = kv?;
            let bad = |why: &str| CatalogError::Corrupt {
                key: format!("kept/{}", String::from_utf8_lossy(&k)),
                reason: why.into(),
            };
            let name = String::from_utf8(k.to_vec()).map_err(|_| bad("not utf-8"))?;
            let secs = <[u8; 8]>::try_from(v.as_ref()).map(u64::from_be_bytes).map_err(|_| bad("not 8 bytes"))?;
            Ok((name, secs))
        })
    }

    /// Forgets a schedule's next run (its policy changed): the next tick plans it afresh.
    pub fn clear_next_run(&self, group: &str, kind: &str) -> Result<(), CatalogError> {
        self.schedules.remove(schedule_key(group, kind))?;
        self.flush_durable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ReplicaState;

    /// A group's policy as jobs read it follows every change of the group, and goes with it.
    #[test]
    fn a_groups_policy_follows_the_group_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::create(&dir.path().join("catalog")).unwrap();
        assert_eq!(c.group_policy("g").unwrap(), None);
        let policy = Policy {
            sync_every_secs: Some(900),
            recovery_points: vec![8 * 60],
            express_full_before_rp: false,
            retention_secs: 86_400,
            cc_when_inconsistent: true,
            cc_at: None,
            replica_creation: "now".into(),
            block_size: 1 << 20,
            exclude_disks: vec![],
            verify: Default::default(),
        };
        let mut g = GroupRecord {
            name: "g".into(),
            members: (0..1000).map(|i| format!("vm{i}")).collect(),
            policy: policy.clone(),
            created_at: 1,
        };
        c.put_group(&g).unwrap();
        assert_eq!(c.group_policy("g").unwrap(), Some(policy.clone()));
        assert_eq!(c.group_policy("g").unwrap(), Some(policy.clone()), "the kept policy");
        g.policy.retention_secs = 7 * 86_400;
        c.put_group(&g).unwrap();
        assert_eq!(c.group_policy("g").unwrap().map(|p| p.retention_secs), Some(7 * 86_400));
        assert!(c.delete_group("g").unwrap());
        assert_eq!(c.group_policy("g").unwrap(), None);
    }
    use bulwark_protocol::messages::{DiskInfo, GuestOs, PowerState, VmInfo};
    use bulwark_protocol::{DiskId, VmId};

    fn inv(vms: &[(&str, u32)]) -> Inventory {
        let vms = vms
            .iter()
            .map(|&(name, n)| VmInfo {
                id: VmId::new(format!("00000000-0000-4000-8000-{n:012x}")).unwrap(),
                name: name.into(),
                power: PowerState::Running,
                os: GuestOs::Linux,
                integration_services: true,
                disks: vec![DiskInfo { name: DiskId::new("os").unwrap(), size_bytes: 1 << 20 }],
                change_generation: None,
                owner: None,
            })
            .collect();
        Inventory { vms, partition: vec![] }
    }

    fn status(cat: &Catalog, vm: &str) -> (String, &'static str) {
        let host = cat.vm(vm).unwrap().unwrap().host;
        (host, identity::status(cat.vm_identity(vm).unwrap().as_ref(), false, false))
    }

    #[test]
    fn inventories_from_several_hosts_keep_each_vm_on_one_host() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let all = |_: &str| true;
        // Hosts the catalog does not know are standalone: each its own cluster.
        let c = cat.apply_inventory("a", &inv(&[("web", 1), ("db", 2)]), 10, &all, 4096).unwrap();
        assert_eq!(c.new, ["web", "db"]);
        assert_eq!(status(&cat, "web"), ("a".into(), "unprotected"));
        // Another cluster's host, same name and same UUID: refused, the VM in conflict.
        let c = cat.apply_inventory("b", &inv(&[("web", 1)]), 11, &all, 4096).unwrap();
        assert_eq!(c.refused.len(), 1, "{c:?}");
        assert_eq!(status(&cat, "web"), ("a".into(), "conflict"));
        // It stops: resolved.
        cat.apply_inventory("b", &inv(&[]), 12, &all, 4096).unwrap();
        assert_eq!(status(&cat, "web"), ("a".into(), "unprotected"));
        // One host reporting two VMs of one name: the second is refused.
        let c = cat.apply_inventory("a", &inv(&[("web", 1), ("db", 2), ("db", 3)]), 13, &all, 4096).unwrap();
        assert_eq!(c.refused.len(), 1, "{c:?}");
        assert_eq!(cat.vm("db").unwrap().unwrap().id, "00000000-0000-4000-8000-000000000002");
        // A VM its host stops reporting is missing; reported again, it is back.
        let c = cat.apply_inventory("a", &inv(&[("web", 1)]), 14, &all, 4096).unwrap();
        assert_eq!(c.missing, ["db"]);
        assert_eq!(status(&cat, "db").1, "missing");
        cat.apply_inventory("a", &inv(&[("web", 1), ("db", 2)]), 15, &all, 4096).unwrap();
        assert_eq!(status(&cat, "db").1, "unprotected");
        // Forgotten, its name is free for a new VM.
        assert!(cat.forget_vm("db").unwrap().is_ok());
        let c = cat.apply_inventory("a", &inv(&[("web", 1), ("db", 9)]), 16, &all, 4096).unwrap();
        assert_eq!(c.new, ["db"]);
        // Past the per-host cap, the rest of the inventory is refused (and nothing of it kept).
        let c = cat.apply_inventory("a", &inv(&[("web", 1), ("db", 9), ("extra", 5)]), 17, &all, 2).unwrap();
        assert!(c.refused[0].1.contains("more than 2 VMs"), "{c:?}");
        assert!(cat.vm("extra").unwrap().is_none());
    }

    #[test]
    fn a_vm_claimed_by_two_hosts_of_its_cluster_moves_when_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        for h in ["a", "b", "c"] {
            cat.put_agent(&crate::catalog::AgentRecord {
                host: h.into(),
                cert_serial: String::new(),
                enrolled_at: 0,
                cert_not_after: 0,
                revoked: false,
                last_seen: None,
                agent_version: None,
                vms: 0,
                cluster: "k".into(),
            })
            .unwrap();
        }
        let all = |_: &str| true;
        cat.apply_inventory("a", &inv(&[("web", 1)]), 10, &all, 4096).unwrap();
        // b reports it while a still does (claimed by coordinator x meanwhile, which a's
        // reports never said): refused, kept on a.
        let mut claimed = inv(&[("web", 1)]);
        let x = bulwark_protocol::ownership::Owner { coordinator: "x".into(), epoch: 1 };
        claimed.vms[0].owner = Some(x.clone());
        let c = cat.apply_inventory("b", &claimed, 11, &all, 4096).unwrap();
        assert!(c.refused[0].1.contains("at once"), "{c:?}");
        assert_eq!(status(&cat, "web"), ("a".into(), "conflict"));
        assert_eq!(cat.vm_ownership("web").unwrap().reported, None);
        // a lets go: the VM is b's, with no conflict left, and its claim as b reported it
        // (b sends nothing again until something changes).
        let c = cat.apply_inventory("a", &inv(&[]), 12, &all, 4096).unwrap();
        assert_eq!(c.handed_over, [("web".to_owned(), "b".to_owned())]);
        assert!(c.missing.is_empty());
        assert_eq!(status(&cat, "web"), ("b".into(), "unprotected"));
        assert_eq!(cat.vm_ownership("web").unwrap().reported, Some(x));
        // A storage migration seen first from the new host: its new tracking generation,
        // refused with the claim at first, resets the replica when the move happens.
        cat.put_replica(&crate::catalog::ReplicaRecord {
            vm: "web".into(),
            disk: "os".into(),
            size_bytes: 1 << 20,
            block_size: 1 << 16,
            state: ReplicaState::Consistent,
            root: None,
            change_token: Some(bulwark_protocol::messages::ChangeToken { generation: 1, sequence: 4 }),
            reason: None,
            updated_at: 0,
            excluded: vec![],
            swap_witness: vec![],
        })
        .unwrap();
        let mut moved = inv(&[("web", 1)]);
        moved.vms[0].change_generation = Some(2);
        let c = cat.apply_inventory("a", &moved, 12, &all, 4096).unwrap();
        assert!(c.refused[0].1.contains("at once"), "{c:?}");
        assert!(c.tracking_reset.is_empty(), "{c:?}");
        let c = cat.apply_inventory("b", &inv(&[]), 12, &all, 4096).unwrap();
        assert_eq!(c.handed_over, [("web".to_owned(), "a".to_owned())]);
        assert_eq!(c.tracking_reset.len(), 1, "{c:?}");
        assert_eq!(cat.replicas_of("web").unwrap()[0].state, ReplicaState::Inconsistent);
        cat.apply_inventory("a", &inv(&[]), 12, &all, 4096).unwrap();
        cat.apply_inventory("b", &inv(&[("web", 1)]), 12, &all, 4096).unwrap();
        assert_eq!(status(&cat, "web"), ("b".into(), "unprotected"));

        // b's host goes down and c restarts the VM: b is not connected, so it simply moved.
        let c = cat.apply_inventory("c", &inv(&[("web", 1)]), 13, &|h| h != "b", 4096).unwrap();
        assert_eq!(c.moved, [("web".to_owned(), "b".to_owned())]);
        assert_eq!(status(&cat, "web"), ("c".into(), "unprotected"));
        // b comes back still reporting it: refused while c holds it.
        let c = cat.apply_inventory("b", &inv(&[("web", 1)]), 14, &all, 4096).unwrap();
        assert_eq!(c.refused.len(), 1);
        assert_eq!(status(&cat, "web"), ("c".into(), "conflict"));
        // The per-host index follows every move: a and b record nothing, c the VM.
        assert_eq!(cat.vms_on("a").count() + cat.vms_on("b").count(), 0);
        assert_eq!(cat.vms_on("c").map(Result::unwrap).collect::<Vec<_>>(), ["web"]);
    }

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
