//! Admin handlers for protection: VMs, protection groups, backups and consistency checks on
//! demand, recovery points, and streaming a disk of a recovery point to the console.

use crate::catalog::{identity, Catalog, GroupRecord, JobKind, RecoveryPointRecord, ReplicaState, VmRecord};
use crate::jobs::{Counts, Enqueue};
use crate::policy;
use crate::server::State;
use crate::store::BlockData;
use bulwark_protocol::messages::{
    AdminResponse, BackupKind, DiskInfo, GroupInfo, PlanInfo, PolicyPatch, PolicySpec, PowerState, RecoveryPointInfo,
    VmSummary,
};
use bulwark_protocol::paging::{page_of_sorted, PageRequest};
use bulwark_protocol::transfer::{self, TransferMessage};
use bulwark_protocol::DiskId;
use std::sync::Arc;

fn err(message: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error { message: message.to_string() }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?
}

/// `Err` unless `host` is enrolled and not revoked: where a recovery may write.
fn enrolled_host(catalog: &Catalog, host: &str) -> Result<(), String> {
    if catalog.agent(host).map_err(|e| e.to_string())?.is_none_or(|a| a.revoked) {
        return Err(format!("{host} is not an enrolled host"));
    }
    Ok(())
}

/// `none`, `creating`, `consistent`, `inconsistent` and why.
pub fn replica_state(catalog: &Catalog, vm: &str) -> Result<(String, Option<String>), String> {
    let replicas = catalog.replicas_of(vm).map_err(|e| e.to_string())?;
    if replicas.is_empty() {
        return Ok(("none".into(), None));
    }
    if let Some(r) = replicas.iter().find(|r| r.state == ReplicaState::Inconsistent) {
        return Ok(("inconsistent".into(), r.reason.clone()));
    }
    if replicas.iter().any(|r| r.state == ReplicaState::Creating) {
        return Ok(("creating".into(), None));
    }
    Ok(("consistent".into(), None))
}

/// The disks each group leaves out, read once per group for a page of VMs: a group record
/// holds its member list, so reading it for every VM of a large group made `vm list`
/// quadratic in the group's size.
#[derive(Debug, Default)]
pub struct LeftOut(std::collections::HashMap<String, Vec<(String, String)>>);

impl LeftOut {
    /// The disks of `vm` its group `group` leaves out.
    pub fn of(&mut self, catalog: &Catalog, vm: &str, group: Option<&str>) -> Result<Vec<String>, String> {
        let Some(g) = group else { return Ok(vec![]) };
        if !self.0.contains_key(g) {
            let excluded = catalog.group(g).map_err(|e| e.to_string())?.map(|g| g.policy.exclude_disks);
            self.0.insert(g.to_owned(), excluded.unwrap_or_default());
        }
        Ok(self.0.get(g).into_iter().flatten().filter(|(v, _)| v == vm).map(|(_, d)| d.clone()).collect())
    }
}

/// The `vm list` form of a VM record; `owner` is this coordinator's name.
pub fn vm_summary(catalog: &Catalog, v: VmRecord, owner: &str, groups: &mut LeftOut) -> Result<VmSummary, String> {
    let (replica_state, replica_reason) = replica_state(catalog, &v.name)?;
    let identity = catalog.vm_identity(&v.name).map_err(|e| e.to_string())?;
    let has_replica = replica_state == "consistent";
    let mut status = identity::status(identity.as_ref(), v.group.is_some(), has_replica).to_owned();
    let ownership = catalog.vm_ownership(&v.name).map_err(|e| e.to_string())?;
    let lost = ownership.lost_to(owner).filter(|_| v.group.is_some());
    if lost.is_some() && status != "conflict" && status != "missing" {
        status = "lost".into();
    }
    let lost_reason = lost.map(|o| crate::catalog::ownership::lost_reason(o, ownership.epoch));
    let status_reason = identity.as_ref().and_then(|i| match (&i.conflict, i.missing_since) {
        (Some(c), _) => Some(c.reason.clone()),
        (None, Some(since)) => Some(format!(
            "its host {} has not reported it since {}",
            v.host,
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(since))
        )),
        (None, None) => None,
    });
    let status_reason = status_reason.or(lost_reason);
    let excluded_bytes = catalog
        .replicas_of(&v.name)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.excluded.iter().map(|(a, b)| b - a).sum::<u64>() * u64::from(r.block_size))
        .sum();
    let left_out = groups.of(catalog, &v.name, v.group.as_deref())?;
    Ok(VmSummary {
        left_out,
        uuid: identity.as_ref().map(|i| i.uuid.clone()).unwrap_or_default(),
        cluster: identity.map(|i| i.cluster).unwrap_or_default(),
        owner: ownership.owner_name(owner),
        status,
        status_reason,
        id: v.id,
        name: v.name,
        host: v.host,
        state: match v.power {
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Off => "off",
        }
        .into(),
        os: match v.os {
            bulwark_protocol::messages::GuestOs::Linux => "linux",
            bulwark_protocol::messages::GuestOs::Windows => "windows",
        }
        .into(),
        group: v.group,
        replica_state,
        replica_reason,
        disks: v.disks,
        excluded_bytes,
    })
}

/// A group as the console shows it, with one page of its members (sorted by name).
pub fn group_info(catalog: &Catalog, g: &GroupRecord, members: &PageRequest) -> Result<GroupInfo, String> {
    let next_runs = ["sync", "rp", "cc", "initial"]
        .iter()
        .filter_map(|k| catalog.next_run(&g.name, k).ok().flatten().map(|at| ((*k).to_owned(), at)))
        .collect();
    let mut sorted = g.members.clone();
    sorted.sort();
    let page = page_of_sorted(sorted, |m| m.as_bytes().to_vec(), members).map_err(|e| e.to_string())?;
    Ok(GroupInfo {
        name: g.name.clone(),
        members: page.items,
        members_next: page.next,
        policy: policy::spec(&g.policy),
        next_runs,
        auto_cluster: catalog.group_auto(&g.name).map_err(|e| e.to_string())?,
    })
}

/// Checks that each VM is known and in no other group; answers their names.
/// Checks that `vms` may join `group`: each is known, in no other group, and owned by no
/// other coordinator (`me` is this one).
fn claim(catalog: &Catalog, group: &str, vms: &[String], me: &str) -> Result<(), String> {
    for name in vms {
        let vm = catalog
            .vm(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no VM named {name} has been reported by any agent (see `bulwark vm list`)"))?;
        if let Some(other) = vm.group.filter(|g| g != group) {
            return Err(format!("{name} is already protected by group {other}: a VM is in at most one group"));
        }
        let ownership = catalog.vm_ownership(name).map_err(|e| e.to_string())?;
        if let Some(owner) = ownership.lost_to(me) {
            return Err(format!(
                "{name} is owned by {owner}: it protects the VM; `bulwark vm take-over {name}` here takes it over"
            ));
        }
    }
    Ok(())
}

fn set_group(catalog: &Catalog, vms: &[String], group: Option<&str>) -> Result<(), String> {
    for name in vms {
        if group.is_some() {
            // Protected again: its group's retention applies, not the one it left with.
            catalog.unkeep(name).map_err(|e| e.to_string())?;
        }
        if let Some(mut vm) = catalog.vm(name).map_err(|e| e.to_string())? {
            vm.group = group.map(str::to_owned);
            catalog.put_vm(&vm).map_err(|e| e.to_string())?;
        }
    }
    catalog.flush_durable().map_err(|e| e.to_string())
}

/// Queues the initial copies of a group's new members. The scheduler's sweep asks for the same
/// copies as soon as it sees the group, and either may come first: both are automatic requests,
/// so the second finds the first queued, running or done and is void (a manual request would
/// be queued behind a running copy and copy the VM twice).
async fn start_initial(state: &Arc<State>, g: &GroupRecord, vms: &[String]) {
    if policy::creation_time(&g.policy.replica_creation) != Ok(policy::Creation::Now) {
        return;
    }
    // In batches: each batch's job records are saved with one flush.
    for batch in vms.chunks(1024) {
        let msgs = batch
            .iter()
            .map(|vm| Enqueue {
                vm: vm.clone(),
                kind: JobKind::Initial,
                automatic: true,
                reason: "replica creation: now".into(),
                recovery: None,
            })
            .collect();
        let Ok(answers) = state.jobs.send(crate::jobs::EnqueueMany(msgs)).await else { return };
        for (vm, answer) in batch.iter().zip(answers) {
            if let Err(e) = answer {
                tracing::debug!(%vm, reason = %e, "initial copy not queued here (the scheduler's sweep asks for it too)");
            }
        }
    }
}

pub async fn group_create(
    state: &Arc<State>,
    name: String,
    vms: Vec<String>,
    spec: PolicySpec,
    auto_cluster: Option<bulwark_protocol::ClusterId>,
) -> AdminResponse {
    if let Err(e) = bulwark_protocol::VmId::new(name.clone()) {
        return err(format!("group name: {e}"));
    }
    let policy = match policy::validate(&spec) {
        Ok(p) => p,
        Err(e) => return err(e),
    };
    learn_new_vms(state, &vms).await;
    let catalog = state.store.catalog().clone();
    let me = state.authority.config().name.clone();
    let auto = auto_cluster.map(|c| c.to_string());
    let auto_set = auto.clone();
    let r = blocking(move || {
        if catalog.group(&name).map_err(|e| e.to_string())?.is_some() {
            return Err(format!("a group named {name} already exists"));
        }
        if let Some(c) = &auto {
            if let Some(other) = catalog.auto_group_of(c).map_err(|e| e.to_string())? {
                return Err(format!("group {other} already protects cluster {c} whole"));
            }
        }
        let mut members = vms.clone();
        members.sort();
        members.dedup();
        claim(&catalog, &name, &members, &me)?;
        let g = GroupRecord {
            name: name.clone(),
            members: members.clone(),
            policy,
            created_at: crate::catalog::now_secs(),
        };
        catalog.put_group(&g).map_err(|e| e.to_string())?;
        catalog.set_group_auto(&name, auto.as_deref()).map_err(|e| e.to_string())?;
        set_group(&catalog, &members, Some(&name))?;
        forget_left_out(&catalog, &g)?;
        Ok((g.clone(), group_info(&catalog, &g, &PageRequest::first())?))
    })
    .await;
    match r {
        Ok((g, info)) => {
            tracing::info!(group = %g.name, members = g.members.len(), auto = ?auto_set, "protection group created");
            start_initial(state, &g, &g.members).await;
            if let Some(c) = &auto_set {
                // The cluster's hosts' inventories now bring the VMs it is to protect.
                super::partition::refresh(state, c).await;
            }
            AdminResponse::Group(info)
        }
        Err(e) => err(e),
    }
}

/// `group set`: the policy changed as asked (checked as a new one is); the schedules it
/// changes are planned afresh at the group's next tick.
pub async fn group_set(state: &Arc<State>, name: String, patch: PolicyPatch) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let r = blocking(move || {
        let mut g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
        let new = policy::apply(&g.policy, &patch).map_err(|e| e.to_string())?;
        for s in crate::jobs::schedule::changed(&g.policy, &new) {
            catalog.clear_next_run(&name, s.key()).map_err(|e| e.to_string())?;
        }
        g.policy = new;
        catalog.put_group(&g).map_err(|e| e.to_string())?;
        forget_left_out(&catalog, &g)?;
        Ok((g.clone(), group_info(&catalog, &g, &PageRequest::first())?))
    })
    .await;
    match r {
        Ok((g, info)) => {
            tracing::info!(group = %g.name, policy = ?g.policy, "protection group changed");
            AdminResponse::Group(info)
        }
        Err(e) => err(e),
    }
}

/// Drops the replicas of the disks `g` leaves out: they are copied no more, and a stale one
/// would keep its VM inconsistent for ever (their recovery points stay until retention).
fn forget_left_out(catalog: &Catalog, g: &GroupRecord) -> Result<(), String> {
    for (vm, disk) in &g.policy.exclude_disks {
        if catalog.delete_replica(vm, disk).map_err(|e| e.to_string())? {
            tracing::info!(%vm, %disk, "disk left out of protection: its replica is dropped");
        }
    }
    Ok(())
}

/// The disks of `vm` its group leaves out.
pub fn left_out(catalog: &Catalog, vm: &str, group: Option<&str>) -> Result<Vec<String>, String> {
    let Some(g) = group else { return Ok(vec![]) };
    Ok(catalog
        .group(g)
        .map_err(|e| e.to_string())?
        .map(|g| g.policy.exclude_disks.into_iter().filter(|(v, _)| v == vm).map(|(_, d)| d).collect())
        .unwrap_or_default())
}

/// `job cancel`: a queued or running VM job stops ([`crate::jobs::Cancel`]).
pub async fn job_cancel(state: &Arc<State>, id: u64) -> AdminResponse {
    match state.jobs.send(crate::jobs::Cancel { id }).await {
        Ok(Ok(job)) => AdminResponse::Job(super::admin::job_info(&job)),
        Ok(Err(e)) => err(e),
        Err(e) => err(format!("the job queue is not answering: {e}")),
    }
}

pub async fn group_add(state: &Arc<State>, name: String, vms: Vec<String>) -> AdminResponse {
    learn_new_vms(state, &vms).await;
    let catalog = state.store.catalog().clone();
    let me = state.authority.config().name.clone();
    let r = blocking(move || {
        let mut g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
        claim(&catalog, &name, &vms, &me)?;
        let added: Vec<String> = vms.iter().filter(|v| !g.members.contains(v)).cloned().collect();
        g.members.extend(added.iter().cloned());
        g.members.sort();
        g.members.dedup();
        catalog.put_group(&g).map_err(|e| e.to_string())?;
        set_group(&catalog, &added, Some(&name))?;
        Ok((g.clone(), added, group_info(&catalog, &g, &PageRequest::first())?))
    })
    .await;
    match r {
        Ok((g, added, info)) => {
            start_initial(state, &g, &added).await;
            AdminResponse::Group(info)
        }
        Err(e) => err(e),
    }
}

pub async fn group_remove(state: &Arc<State>, name: String, vms: Vec<String>, keep_data: bool) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let r = blocking(move || {
        let mut g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
        if let Some(v) = vms.iter().find(|v| !g.members.contains(v)) {
            return Err(format!("{v} is not a member of {name}"));
        }
        g.members.retain(|m| !vms.contains(m));
        catalog.put_group(&g).map_err(|e| e.to_string())?;
        set_group(&catalog, &vms, None)?;
        if keep_data {
            for vm in &vms {
                catalog.keep_data(vm, g.policy.retention_secs).map_err(|e| e.to_string())?;
            }
        } else {
            for vm in &vms {
                let rps = catalog.recovery_points(vm).map_err(|e| e.to_string())?;
                let commit = crate::catalog::Commit { drop_recovery_points: rps, ..Default::default() };
                catalog.commit(&commit).map_err(|e| e.to_string())?;
                catalog.delete_replicas_of(vm).map_err(|e| e.to_string())?;
            }
        }
        group_info(&catalog, &g, &PageRequest::first())
    })
    .await;
    r.map(AdminResponse::Group).unwrap_or_else(err)
}

pub async fn group_delete(state: &Arc<State>, name: String) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let r = blocking(move || {
        let g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
        set_group(&catalog, &g.members, None)?;
        for vm in &g.members {
            catalog.keep_data(vm, g.policy.retention_secs).map_err(|e| e.to_string())?;
        }
        catalog.delete_group(&name).map_err(|e| e.to_string())?;
        let auto = catalog.group_auto(&name).map_err(|e| e.to_string())?;
        catalog.set_group_auto(&name, None).map_err(|e| e.to_string())?;
        Ok((auto, format!(
            "group {name} deleted; its {} member(s) are no longer protected (their replicas and recovery points are kept)",
            g.members.len()
        )))
    })
    .await;
    match r {
        Ok((_, message)) => AdminResponse::Done { message },
        Err(e) => err(e),
    }
}

/// `vm forget VM`: removes a vanished or replaced VM's record and identity.
pub async fn vm_forget(state: &Arc<State>, vm: String) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let r = blocking(move || match catalog.forget_vm(&vm).map_err(|e| e.to_string())? {
        Ok(()) => Ok(format!(
            "VM {vm} forgotten: its recovery points stay until retention removes them; if a host reports it again it is a new VM"
        )),
        Err(refused) => Err(refused),
    })
    .await;
    r.map(|message| AdminResponse::Done { message }).unwrap_or_else(err)
}

pub async fn group_plan(state: &Arc<State>, name: String) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let store_dir = state.store.packs_dir().to_owned();
    let r = blocking(move || {
        let g = catalog.group(&name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group named {name}"))?;
        let mut total = 0u64;
        for m in &g.members {
            if let Some(vm) = catalog.vm(m).map_err(|e| e.to_string())? {
                total += vm.disks.iter().map(|d| d.size_bytes).sum::<u64>();
            }
        }
        let recommended = policy::recommended_bytes(total, policy::DEFAULT_CHURN_PER_DAY, g.policy.retention_secs);
        let fs = rustix::fs::statvfs(&store_dir).map_err(|e| format!("{}: {e}", store_dir.display()))?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        Ok(PlanInfo {
            total_data_bytes: total,
            recommended_bytes: recommended,
            free_bytes: free,
            underprovisioned_bytes: recommended.saturating_sub(free),
            churn_per_day: policy::DEFAULT_CHURN_PER_DAY,
            retention_days: g.policy.retention_secs as f64 / 86_400.0,
        })
    })
    .await;
    r.map(AdminResponse::Plan).unwrap_or_else(err)
}

/// `backup` and `cc`: a job now for a protected VM.
pub async fn run_now(state: &Arc<State>, vm: String, kind: JobKind) -> AdminResponse {
    let catalog = state.store.catalog().clone();
    let v = vm.clone();
    let known = blocking(move || catalog.vm(&v).map_err(|e| e.to_string())).await;
    match known {
        Ok(Some(rec)) if rec.group.is_some() => {}
        Ok(Some(_)) => return err(format!("{vm} is not protected: add it to a group first (`bulwark group add-vm`)")),
        Ok(None) => return err(format!("no VM named {vm} has been reported by any agent")),
        Err(e) => return err(e),
    }
    let reason = format!("{} requested by an administrator", kind.as_str());
    queue(state, Enqueue { vm, kind, automatic: false, reason, recovery: None }).await
}

pub fn backup_kind(kind: BackupKind) -> JobKind {
    match kind {
        BackupKind::ExpressFull => JobKind::ExpressFull,
        BackupKind::Sync => JobKind::Sync,
    }
}

/// The `rp list` form of a recovery point; `left_out`: the disks its VM's group leaves out
/// (none of them is in the point); `check`: its last verification.
pub fn rp_info(
    rp: &RecoveryPointRecord,
    left_out: &[String],
    check: Option<&crate::catalog::RpCheck>,
) -> Result<RecoveryPointInfo, String> {
    Ok(RecoveryPointInfo {
        left_out: left_out.iter().filter(|d| !rp.disks.iter().any(|r| r.name == **d)).cloned().collect(),
        id: crate::store::hex(&rp.id),
        vm: rp.vm.clone(),
        created_at: rp.created_at,
        consistency: rp.consistency.as_str().into(),
        disks: rp
            .disks
            .iter()
            .map(|d| {
                Ok(DiskInfo { name: DiskId::new(d.name.clone()).map_err(|e| e.to_string())?, size_bytes: d.size_bytes })
            })
            .collect::<Result<_, String>>()?,
        logical_bytes: rp.logical_bytes,
        stored_bytes: rp.stored_bytes,
        verified_at: check.map(|c| c.verified_at),
        verified: check.map(|c| c.verified),
        boot_verified: check.and_then(|c| c.boot_verified),
    })
}

/// The recovery point `spec` (a full id, a unique prefix, or `latest`) of `vm`.
pub fn find_rp(catalog: &Catalog, vm: &str, spec: &str) -> Result<RecoveryPointRecord, String> {
    let rps = catalog.recovery_points(vm).map_err(|e| e.to_string())?;
    if rps.is_empty() {
        return Err(format!("{vm} has no recovery points"));
    }
    if spec == "latest" {
        return rps.into_iter().max_by_key(|r| r.created_at).ok_or_else(|| format!("{vm} has no recovery points"));
    }
    let spec = spec.to_ascii_lowercase();
    let hits: Vec<_> = rps.into_iter().filter(|r| crate::store::hex(&r.id).starts_with(&spec)).collect();
    match hits.len() {
        0 => Err(format!("{vm} has no recovery point {spec}")),
        1 => Ok(hits.into_iter().next().ok_or("no recovery point")?),
        n => Err(format!("{spec} matches {n} recovery points of {vm}: give more of the id")),
    }
}

/// Streams a disk of a recovery point on `send`: `DiskStream`, then every block as a
/// transfer frame in order (zero blocks as zero frames), then `End`.
pub async fn recover_disk(
    state: &Arc<State>,
    send: &mut quinn::SendStream,
    vm: String,
    rp: String,
    disk: String,
    options: bulwark_protocol::messages::RecoveryOptions,
) {
    let mut throttle = crate::throttle::Throttle::for_options(&options);
    let what = format!("disk {disk} of {vm} ({rp})");
    let catalog = state.store.catalog().clone();
    let found = blocking(move || rp_disk(&catalog, &vm, &rp, &disk)).await;
    let (rp, d) = match found {
        Ok(x) => x,
        Err(e) => {
            let _ = bulwark_protocol::frame::write_message(send, &err(e)).await;
            return;
        }
    };
    let bs = d.block_size as usize;
    let head = AdminResponse::DiskStream {
        rp: crate::store::hex(&rp.id),
        disk: d.name.clone(),
        size_bytes: d.size_bytes,
        block_size: d.block_size,
    };
    if bulwark_protocol::frame::write_message(send, &head).await.is_err() {
        return;
    }
    tracing::info!(rp = %crate::store::hex(&rp.id), disk = %d.name, "streaming a disk to the console");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let store = state.store.clone();
    let reader = tokio::task::spawn_blocking(move || {
        // Each block goes with its leaf id: the store checked the bytes against it.
        let how = crate::store::readahead::ReadAhead::for_machine();
        store.read_leaves(
            &d,
            how,
            |_| true,
            |index, id, b| {
                let body = match b {
                    BlockData::Zero(_) => transfer::zero_body(index),
                    BlockData::Data(data) => transfer::block_body(index, id, data),
                };
                tx.blocking_send(body).map_err(|_| crate::store::StoreError::BlockMap("the console went away".into()))
            },
        )
    });
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let mut broke = None;
    while let Some(body) = rx.recv().await {
        crate::throttle::pace(&mut throttle, body.len() as u64).await;
        if let Err(e) = transfer::write_body(send, &body, bs).await {
            broke = Some(format!("the console went away: {e}"));
            break;
        }
        sent += 1;
        bytes += body.len() as u64;
    }
    drop(rx);
    let end = match (reader.await, broke) {
        (_, Some(e)) => TransferMessage::Failed { reason: e },
        (Ok(Ok(())), None) => TransferMessage::End { blocks_sent: sent, bytes_read: 0 },
        (Ok(Err(e)), None) => TransferMessage::Failed { reason: e.to_string() },
        (Err(e), None) => TransferMessage::Failed { reason: e.to_string() },
    };
    let _ = transfer::write_message(send, &end, bs).await;
    if let Some(to) = options.notify {
        let (subject, body) = match &end {
            TransferMessage::End { .. } => (
                format!("Bulwark: recovery of {what} succeeded"),
                format!("{what}: {sent} block(s), {bytes} bytes streamed to the console.\n"),
            ),
            TransferMessage::Failed { reason } => {
                (format!("Bulwark: recovery of {what} FAILED"), format!("{what}: {reason}\n"))
            }
            _ => return,
        };
        let smtp = state.authority.config().smtp.clone();
        match crate::notify::send(smtp.as_ref(), &to, &subject, body).await {
            Ok(()) => tracing::info!(%to, "recovery notification sent"),
            Err(e) => tracing::warn!(%to, error = %e, "recovery notification not sent"),
        }
    }
}

/// Loads one disk of a seed into a new replica, marked inconsistent until a consistency
/// check reconciles it with the source. Block ids are computed here: the console's are not
/// trusted (and it cannot compute keyed ones).
pub async fn seed_import(
    state: &Arc<State>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    vm: String,
    disk: String,
    size_bytes: u64,
    source: String,
) -> AdminResponse {
    use crate::catalog::ReplicaRecord;
    use crate::jobs::ingest::{Cmd, IngestHandle};
    use bulwark_protocol::transfer::TransferFrame;
    let catalog = state.store.catalog().clone();
    let (v, d) = (vm.clone(), disk.clone());
    let checked = blocking(move || {
        let rec = catalog.vm(&v).map_err(|e| e.to_string())?.ok_or_else(|| format!("no VM named {v}"))?;
        let group = rec.group.clone().ok_or_else(|| format!("{v} is not protected: add it to a group first"))?;
        let g = catalog.group(&group).map_err(|e| e.to_string())?.ok_or_else(|| format!("no group {group}"))?;
        let info = rec.disks.iter().find(|x| x.name.as_str() == d).ok_or_else(|| format!("{v} has no disk {d}"))?;
        if info.size_bytes != size_bytes {
            return Err(format!("the seed's disk {d} is {size_bytes} bytes, the VM's is {}", info.size_bytes));
        }
        if let Some(r) = catalog.replica(&v, &d).map_err(|e| e.to_string())? {
            if r.state == ReplicaState::Consistent {
                return Err(format!("{v}/{d} already has a consistent replica: a seed is for a VM without one"));
            }
        }
        Ok(g.policy.block_size)
    })
    .await;
    let block_size = match checked {
        Ok(b) => b,
        Err(e) => return err(e),
    };
    if bulwark_protocol::frame::write_message(send, &AdminResponse::SeedReady { block_size }).await.is_err() {
        return err("the console went away");
    }
    let bs = block_size as usize;
    let blocks = size_bytes.div_ceil(u64::from(block_size));
    let ingest = match IngestHandle::start(state.store.clone(), 0) {
        Ok(i) => i,
        Err(e) => return err(e),
    };
    let r = async {
        ingest.send(Cmd::BeginDisk { slot: 0, blocks, old: None }).await?;
        let mut received = 0u64;
        loop {
            match transfer::read(recv, bs).await.map_err(|e| e.to_string())? {
                Some(TransferFrame::Block { index, data, .. }) => {
                    received += 1;
                    let id = state.store.codec().hasher.id(&data);
                    ingest.send(Cmd::Block { slot: 0, index, id, data }).await?;
                }
                Some(TransferFrame::Zero { index }) => {
                    received += 1;
                    ingest.send(Cmd::Zero { slot: 0, index }).await?;
                }
                Some(TransferFrame::Message(TransferMessage::End { blocks_sent, .. })) if blocks_sent == received => {
                    break
                }
                other => return Err(format!("unexpected frame in a seed: {other:?}")),
            }
        }
        let (root, _) = ingest.end_disk(0).await?;
        let record = ReplicaRecord {
            vm: vm.clone(),
            disk: disk.clone(),
            size_bytes,
            block_size,
            state: ReplicaState::Inconsistent,
            root: Some(root),
            change_token: None,
            reason: Some(format!("seeded from {source}: a consistency check reconciles it with the source")),
            updated_at: crate::catalog::now_secs(),
            excluded: vec![],
            swap_witness: vec![],
        };
        ingest.commit(vec![record], None).await?;
        Ok::<_, String>(received)
    }
    .await;
    match r {
        Ok(n) => {
            tracing::info!(%vm, %disk, blocks = n, "seed imported");
            AdminResponse::Done {
                message: format!("{vm}/{disk}: {n} block(s) loaded; a consistency check will reconcile it"),
            }
        }
        Err(e) => err(format!("seed import of {vm}/{disk} failed: {e}")),
    }
}

/// How long a request waits for the fresh inventory it asked a host for.
const FRESH_INVENTORY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks `hosts`' agents for their inventory now and waits (a few seconds at most) until their
/// answers are in the catalog: a decision that the coordinator's view refuses is taken again on
/// what the hosts say now, not on what they said up to a heartbeat ago. Answers how many
/// answered.
async fn fresh_inventory(state: &Arc<State>, hosts: Vec<String>) -> usize {
    let mut waits = vec![];
    for host in hosts {
        let Ok(Some(session)) = state.registry.send(crate::server::registry::RefresherOf { host }).await else {
            continue;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        session.do_send(crate::server::session::RefreshInventory(tx));
        waits.push(rx);
    }
    let all = futures_util::future::join_all(waits);
    match tokio::time::timeout(FRESH_INVENTORY_WAIT, all).await {
        Ok(answers) => answers.iter().filter(|a| a.is_ok()).count(),
        Err(_) => 0,
    }
}

/// When a request names a VM the catalog does not know (created a moment ago), asks every
/// connected host for its inventory first.
pub(crate) async fn fresh_inventory_of(state: &Arc<State>, hosts: Vec<String>) -> usize {
    fresh_inventory(state, hosts).await
}

async fn learn_new_vms(state: &Arc<State>, vms: &[String]) {
    let catalog = state.store.catalog();
    if vms.iter().any(|v| matches!(catalog.vm(v), Ok(None))) {
        let list = state.registry.send(crate::server::registry::ListConnected).await.unwrap_or_default();
        let answered = fresh_inventory(state, list.into_iter().map(|c| c.host).collect()).await;
        tracing::info!(hosts = answered, "a request named an unknown VM: inventories refreshed");
    }
}

/// `recover`: queue a recovery of `vm` from recovery point `rp` onto itself or, with
/// `to_host`, as a new VM there.
pub async fn recover(
    state: &Arc<State>,
    vm: String,
    rp: String,
    to_host: Option<String>,
    name: Option<String>,
    options: bulwark_protocol::messages::RecoveryOptions,
) -> AdminResponse {
    let check = || {
        let catalog = state.store.catalog().clone();
        let (v, h, n, rp) = (vm.clone(), to_host.clone(), name.clone(), rp.clone());
        blocking(move || check_recover(&catalog, &v, &rp, h.as_deref(), n))
    };
    let mut checked = check().await;
    // A VM powered off a moment ago: ask its host before refusing.
    if checked.as_ref().is_err_and(|e| e.starts_with(&not_off(&vm))) {
        let host = state.store.catalog().vm(&vm).ok().flatten().map(|v| v.host).into_iter().collect();
        fresh_inventory(state, host).await;
        checked = check().await;
    }
    let rp_id = match checked {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let spec = crate::catalog::RecoverySpec { rp: rp_id, to_host, name, options, items: None };
    let reason = format!("recovery of {vm} from {} requested by an administrator", crate::store::hex(&rp_id));
    queue(state, Enqueue { vm, kind: JobKind::Recovery, automatic: false, reason, recovery: Some(spec) }).await
}

/// The refusal of a recovery onto a VM that is not off (as far as the coordinator knows).
fn not_off(vm: &str) -> String {
    format!("{vm} is not off: turn it off before recovering onto it (or use --to host)")
}

/// Whether a recovery may be queued: the recovery point's id, or why not.
pub(crate) fn check_recover(
    catalog: &Catalog,
    v: &str,
    rp: &str,
    h: Option<&str>,
    n: Option<String>,
) -> Result<[u8; 16], String> {
    {
        let rec = catalog.vm(v).map_err(|e| e.to_string())?.ok_or_else(|| format!("no VM named {v}"))?;
        let point = find_rp(catalog, v, rp)?;
        match &h {
            None => {
                if rec.power != PowerState::Off {
                    return Err(not_off(v));
                }
            }
            Some(host) => {
                enrolled_host(catalog, host)?;
                let new = n.clone().unwrap_or_else(|| format!("{v}-restored"));
                bulwark_protocol::VmId::new(new.clone()).map_err(|e| format!("--name: {e}"))?;
                if catalog.vm(&new).map_err(|e| e.to_string())?.is_some() {
                    return Err(format!("a VM named {new} exists already: choose another --name"));
                }
            }
        }
        Ok(point.id)
    }
}

pub fn rp_disk(
    catalog: &Catalog,
    vm: &str,
    rp: &str,
    disk: &str,
) -> Result<(RecoveryPointRecord, crate::catalog::RpDisk), String> {
    let rp = find_rp(catalog, vm, rp)?;
    let d = rp.disks.iter().find(|d| d.name == disk).cloned().ok_or_else(|| {
        let names: Vec<_> = rp.disks.iter().map(|d| d.name.as_str()).collect();
        format!(
            "recovery point {} of {vm} has no disk {disk} (it has: {})",
            crate::store::hex(&rp.id),
            names.join(", ")
        )
    })?;
    Ok((rp, d))
}

/// `recover-items … --output DIR`: streams the items to the console, which writes them.
pub async fn recover_items(
    state: &Arc<State>,
    send: &mut quinn::SendStream,
    vm: String,
    rp: String,
    disk: String,
    paths: Vec<String>,
    options: bulwark_protocol::messages::RecoveryOptions,
) {
    let store = state.store.clone();
    let (v, r, dk) = (vm.clone(), rp.clone(), disk.clone());
    let found = blocking(move || rp_disk(store.catalog(), &v, &r, &dk)).await;
    let (point, d) = match found {
        Ok(x) => x,
        Err(e) => {
            let _ = bulwark_protocol::frame::write_message(send, &err(e)).await;
            return;
        }
    };
    let head = AdminResponse::ItemsStream { rp: crate::store::hex(&point.id) };
    if bulwark_protocol::frame::write_message(send, &head).await.is_err() {
        return;
    }
    let (sent, end) = match crate::items::stream_items(state.store.clone(), send, d, paths, &options).await {
        Ok(sent) => (sent, TransferMessage::End { blocks_sent: sent, bytes_read: 0 }),
        Err(reason) => (0, TransferMessage::Failed { reason }),
    };
    let ok = matches!(end, TransferMessage::End { .. });
    let _ = transfer::write_message(send, &end, crate::items::ITEM_CHUNK).await;
    if let Some(to) = options.notify {
        let what = format!("items of {vm}/{disk} ({rp})");
        let subject = format!("Bulwark: recovery of {what} {}", if ok { "succeeded" } else { "FAILED" });
        let body = match &end {
            TransferMessage::Failed { reason } => format!("{what}: {reason}\n"),
            _ => format!("{what}: {sent} frame(s) streamed to the console.\n"),
        };
        let smtp = state.authority.config().smtp.clone();
        if let Err(e) = crate::notify::send(smtp.as_ref(), &to, &subject, body).await {
            tracing::warn!(%to, error = %e, "recovery notification not sent");
        }
    }
}

/// Queues a job an administrator asked for; answers its id.
pub(crate) async fn queue(state: &Arc<State>, msg: Enqueue) -> AdminResponse {
    match state.jobs.send(msg).await {
        Ok(Ok(job_id)) => AdminResponse::JobStarted { job_id },
        Ok(Err(e)) => err(e),
        Err(e) => err(format!("the job queue is gone: {e}")),
    }
}

/// What `recover-items … --dest-host H --dest DIR` asks for.
pub struct ItemsToHost {
    pub vm: String,
    pub rp: String,
    pub disk: String,
    pub paths: Vec<String>,
    pub host: String,
    pub dest: String,
    pub options: bulwark_protocol::messages::RecoveryOptions,
    pub keep_modes: bool,
}

/// `recover-items … --dest-host H --dest DIR`: a recovery job whose agent writes the items.
pub async fn recover_items_to_host(state: &Arc<State>, req: ItemsToHost) -> AdminResponse {
    let ItemsToHost { vm, rp, disk, paths, host, dest, options, keep_modes } = req;
    if !dest.starts_with('/') {
        return err(format!("--dest {dest:?} must be an absolute directory on {host}"));
    }
    let catalog = state.store.catalog().clone();
    let (v, r, d, h) = (vm.clone(), rp.clone(), disk.clone(), host.clone());
    let checked = blocking(move || {
        let (point, _) = rp_disk(&catalog, &v, &r, &d)?;
        enrolled_host(&catalog, &h)?;
        Ok(point.id)
    })
    .await;
    let rp_id = match checked {
        Ok(id) => id,
        Err(e) => return err(e),
    };
    let spec = crate::catalog::RecoverySpec {
        rp: rp_id,
        to_host: Some(host),
        name: None,
        options,
        items: Some(crate::catalog::ItemsTarget { disk, paths, dest, keep_modes }),
    };
    let reason = format!("item-level recovery from {} requested by an administrator", crate::store::hex(&rp_id));
    queue(state, Enqueue { vm, kind: JobKind::Recovery, automatic: false, reason, recovery: Some(spec) }).await
}

/// Jobs queued and running (for `status`).
pub async fn job_counts(state: &Arc<State>) -> (usize, usize) {
    state.jobs.send(Counts).await.unwrap_or((0, 0))
}
