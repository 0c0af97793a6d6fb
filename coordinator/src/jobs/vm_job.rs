//! One VM job, from the request to the agent to the commit and the verdict back.
//!
//! The replica changes only in the final commit, atomically: a job that fails anywhere leaves
//! the replica as it was (and the agent keeps the changes for the next run). What a failure
//! means for the replica's *continuity* is decided here: lost tracking or a transfer that
//! died midway make it inconsistent, which queues a consistency check when the group's policy
//! allows.

use crate::catalog::{JobKind, JobRecord, JobState, ReplicaRecord, ReplicaState, VmRecord};
use crate::jobs::ingest::{Cmd, IngestHandle};
use crate::jobs::plan::{self, Failure};
use crate::jobs::{compare, Finished, JobContext, TransferStream};
use crate::server::registry::SessionOf;
use crate::server::session::Send as SendToAgent;
use crate::store::NewRecoveryPoint;
use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::messages::{
    CoordinatorMessage, FailureKind, JobKind as WireKind, JobOutcome, JobRequest, JobResult,
};
use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage, TransferMode};
use bulwark_protocol::{JobId, VmId};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

/// What a disk's transfer produced.
pub struct DiskDone {
    pub root: TreeRoot,
    pub changed: u64,
}

/// Runs `job` to its end and answers the final record.
pub async fn run(ctx: Arc<JobContext>, mut job: JobRecord) -> Finished {
    let vm = job.vm.clone().unwrap_or_default();
    let span = tracing::info_span!("job", job_id = job.id, vm = %bulwark_protocol::text::Escaped(&vm), kind = job.kind.as_str());
    async move {
        job.state = JobState::Running;
        job.started_at = Some(super::now());
        job.error = None;
        save(&ctx, &job);
        tracing::info!("started");
        let r = execute(&ctx, &mut job).await;
        ctx.router.unregister(job.id);
        job.finished_at = Some(super::now());
        let retry = match r {
            Ok(()) => {
                job.state = JobState::Succeeded;
                tracing::info!(
                    bytes_transferred = job.bytes_transferred,
                    blocks_changed = job.blocks_changed,
                    "succeeded"
                );
                false
            }
            Err(f) => {
                job.state = JobState::Failed;
                tracing::warn!(reason = %bulwark_protocol::text::Escaped(&f.reason), retry = f.retry, "failed");
                if let Some(why) = &f.inconsistent {
                    mark_inconsistent(&ctx, &vm, why);
                }
                job.error = Some(f.reason);
                f.retry
            }
        };
        save(&ctx, &job);
        if let Some(to) = job.recovery.as_ref().and_then(|r| r.options.notify.clone()) {
            if !(retry && job.state == JobState::Failed) {
                notify_done(&ctx, &job, to);
            }
        }
        Finished { job, retry }
    }
    .instrument(span)
    .await
}

/// Mails the outcome of a finished recovery (in the background; a failure is logged).
fn notify_done(ctx: &JobContext, job: &JobRecord, to: String) {
    let smtp = ctx.smtp.clone();
    let subject = format!(
        "Bulwark: recovery of {} {}",
        job.vm.as_deref().unwrap_or("?"),
        if job.state == JobState::Succeeded { "succeeded" } else { "FAILED" }
    );
    let body = format!(
        "Job {} ({}) {}.\n{}\nBytes written: {}\nBlocks written: {}\n",
        job.id,
        job.kind.as_str(),
        job.state.as_str(),
        job.error.as_deref().or(job.detail.as_deref()).unwrap_or(""),
        job.bytes_transferred,
        job.blocks_changed
    );
    let span = tracing::Span::current();
    let (catalog, id) = (ctx.catalog().clone(), job.id);
    actix_rt::spawn(async move {
        match crate::notify::send(smtp.as_ref(), &to, &subject, body).await {
            Ok(()) => tracing::info!(parent: &span, %to, "recovery notification sent"),
            Err(e) => {
                tracing::warn!(parent: &span, %to, error = %e, "recovery notification not sent");
                note_undelivered(&catalog, id, format!("notification to {to} not sent: {e}"));
            }
        }
    });
}

/// Adds why the notification was not sent to the finished job's detail (`job show`).
fn note_undelivered(catalog: &crate::catalog::Catalog, id: u64, note: String) {
    let noted = catalog.job(id).and_then(|job| {
        let Some(mut job) = job else { return Ok(()) };
        job.detail = Some(match job.detail.take().filter(|d| !d.is_empty()) {
            Some(d) => format!("{d}; {note}"),
            None => note,
        });
        catalog.put_job(&job)
    });
    if let Err(e) = noted {
        tracing::warn!(job_id = id, error = %e, "cannot note the undelivered notification");
    }
}

fn save(ctx: &JobContext, job: &JobRecord) {
    if let Err(e) = ctx.catalog().put_job(job) {
        tracing::error!(error = %e, "cannot record the job's state");
    }
}

fn mark_inconsistent(ctx: &JobContext, vm: &str, why: &str) {
    let Ok(replicas) = ctx.catalog().replicas_of(vm) else { return };
    for mut r in replicas {
        if r.state == ReplicaState::Consistent {
            r.state = ReplicaState::Inconsistent;
            r.reason = Some(why.to_owned());
            r.updated_at = super::now();
            if let Err(e) = ctx.catalog().put_replica(&r) {
                tracing::error!(error = %e, "cannot mark the replica inconsistent");
            } else {
                tracing::warn!(disk = %r.disk, reason = why, "replica marked inconsistent");
            }
        }
    }
}

fn wire_kind(kind: JobKind) -> Option<WireKind> {
    Some(match kind {
        JobKind::Initial => WireKind::Initial,
        JobKind::Sync => WireKind::Sync,
        JobKind::ExpressFull => WireKind::ExpressFull,
        JobKind::ConsistencyCheck => WireKind::ConsistencyCheck,
        _ => return None,
    })
}

async fn execute(ctx: &Arc<JobContext>, job: &mut JobRecord) -> Result<(), Failure> {
    if job.kind == JobKind::Recovery {
        return execute_recovery(ctx, job).await;
    }
    let catalog = ctx.catalog().clone();
    let name = job.vm.clone().ok_or_else(|| Failure::stop("a VM job without a VM"))?;
    let vm: VmRecord = catalog
        .vm(&name)
        .map_err(|e| Failure::retry(e.to_string()))?
        .ok_or_else(|| Failure::stop(format!("no VM named {name} has been reported by any agent")))?;
    let block_size = match &vm.group {
        Some(g) => catalog.group(g).ok().flatten().map(|g| g.policy.block_size),
        None => None,
    }
    .unwrap_or(crate::policy::DEFAULT_BLOCK_SIZE);
    let replicas: HashMap<String, ReplicaRecord> = catalog
        .replicas_of(&name)
        .map_err(|e| Failure::retry(e.to_string()))?
        .into_iter()
        .map(|r| (r.disk.clone(), r))
        .collect();

    let planned = plan::plan(job.kind, &name, &vm.disks, &replicas, block_size)?;
    if planned.kind != job.kind {
        tracing::info!("no complete replica yet: running the initial copy instead");
        job.kind = planned.kind;
    }
    let kind = wire_kind(job.kind).ok_or_else(|| Failure::stop(format!("{} is not a VM job", job.kind.as_str())))?;

    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: vm.host.clone() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {} ({}) is not connected", name, vm.host)))?;

    if job.kind == JobKind::Initial {
        for d in &vm.disks {
            let r = ReplicaRecord {
                vm: name.clone(),
                disk: d.name.to_string(),
                size_bytes: d.size_bytes,
                block_size,
                state: ReplicaState::Creating,
                root: None,
                change_token: None,
                reason: None,
                updated_at: super::now(),
                excluded: vec![],
            };
            catalog.put_replica(&r).map_err(|e| Failure::retry(e.to_string()))?;
        }
    }
    let disks = planned.disks;
    let request = JobRequest {
        job: JobId(job.id),
        vm: VmId::new(name.clone()).map_err(|e| Failure::stop(e.to_string()))?,
        kind,
        block_size,
        disks,
        id_key: ctx.store.codec().hasher.id_key(),
        lease_secs: ctx.lease.as_secs().min(u64::from(u32::MAX)) as u32,
    };
    let (mut streams, mut result) = ctx.router.register(job.id, &vm.host, conn_id);
    session.do_send(SendToAgent(CoordinatorMessage::JobRequest(request)));
    tracing::info!(host = %vm.host, disks = vm.disks.len(), block_size, "job sent to the agent");

    let ingest = IngestHandle::start(ctx.store.clone(), job.id).map_err(|e| Failure::retry(e.to_string()))?;
    let midway = Failure::midway;
    let mut done: HashMap<String, DiskDone> = HashMap::new();
    let outcome: JobResult = loop {
        tokio::select! {
            s = streams.recv() => {
                let Some(stream) = s else { return Err(Failure::retry("the job's stream router closed")) };
                let disk = stream.disk.clone();
                let r = disk_transfer(ctx, job, &vm, block_size, &replicas, &ingest, stream).await;
                match r {
                    Ok(d) => {
                        done.insert(disk, d);
                        save(ctx, job);
                    }
                    Err(reason) => return Err(midway(format!("disk {disk}: {reason}"), job.kind)),
                }
            }
            r = &mut result => match r {
                Ok(r) => break r,
                Err(_) => return Err(midway(format!("the connection to {} was lost", vm.host), job.kind)),
            },
            () = tokio::time::sleep(ctx.lease) => {
                return Err(midway(format!("no word from the agent of {} for {:?}", vm.host, ctx.lease), job.kind));
            }
        }
    };
    let (consistency, note, bytes_read, next_token) = match outcome.outcome {
        JobOutcome::Succeeded { consistency, consistency_note, bytes_read, next_token, .. } => {
            (consistency, consistency_note, bytes_read, next_token)
        }
        JobOutcome::Failed { kind, reason } => {
            return Err(Failure::from_agent(kind, reason, !done.is_empty(), job.kind))
        }
        JobOutcome::Restored { .. } => return Err(Failure::stop("the agent answered a backup with a restore")),
    };
    if job.kind != JobKind::ConsistencyCheck {
        job.bytes_scanned = bytes_read;
    }
    let verdict = |committed| {
        session.do_send(SendToAgent(CoordinatorMessage::JobDone { job: JobId(job.id), committed }));
    };
    let mut records = vec![];
    let mut rp_disks = vec![];
    for d in &vm.disks {
        let Some(dd) = done.get(d.name.as_str()) else {
            verdict(false);
            return Err(midway(format!("the agent reported success but never sent disk {}", d.name), job.kind));
        };
        records.push(ReplicaRecord {
            vm: name.clone(),
            disk: d.name.to_string(),
            size_bytes: d.size_bytes,
            block_size,
            state: ReplicaState::Consistent,
            root: Some(dd.root),
            change_token: Some(next_token),
            reason: None,
            updated_at: super::now(),
            excluded: replicas.get(d.name.as_str()).map(|r| r.excluded.clone()).unwrap_or_default(),
        });
        rp_disks.push(crate::catalog::RpDisk {
            name: d.name.to_string(),
            size_bytes: d.size_bytes,
            block_size,
            root: dd.root,
        });
    }
    let rp = matches!(job.kind, JobKind::Initial | JobKind::ExpressFull).then(|| NewRecoveryPoint {
        vm: name.clone(),
        consistency,
        config: vec![],
        disks: rp_disks,
        created_at: crate::catalog::now_secs().saturating_mul(1000).max(now_ms()),
    });
    let committed = records.clone();
    match ingest.commit(records, rp).await {
        Ok(rp) => {
            verdict(true);
            find_swap(ctx, committed).await;
            job.consistency = Some(consistency);
            if let Some(rp) = rp {
                let id = crate::store::hex(&rp.id);
                job.detail = Some(match &note {
                    Some(why) => format!("recovery point {id} ({}-consistent: {why})", consistency.as_str()),
                    None => format!("recovery point {id} ({}-consistent)", consistency.as_str()),
                });
                tracing::info!(rp = %id, consistency = consistency.as_str(), note = note.as_deref().unwrap_or(""), "recovery point committed");
            } else if job.kind == JobKind::ConsistencyCheck {
                job.detail =
                    Some(format!("{} block(s) differed and were repaired; replica consistent", job.blocks_changed));
            } else {
                job.detail = Some("replica synchronized".into());
            }
            Ok(())
        }
        Err(e) => {
            verdict(false);
            Err(Failure::retry(format!("commit failed: {e}")))
        }
    }
}

/// A recovery: the agent of the target host hashes the target VM's disks; each disk gets only
/// the blocks that differ from the recovery point.
async fn execute_recovery(ctx: &Arc<JobContext>, job: &mut JobRecord) -> Result<(), Failure> {
    use bulwark_protocol::messages::{DiskInfo, NewVm, RestoreRequest};
    let catalog = ctx.catalog().clone();
    let name = job.vm.clone().ok_or_else(|| Failure::stop("a recovery without a VM"))?;
    let spec = job.recovery.clone().ok_or_else(|| Failure::stop("a recovery job without its parameters"))?;
    let vm = catalog
        .vm(&name)
        .map_err(|e| Failure::retry(e.to_string()))?
        .ok_or_else(|| Failure::stop(format!("no VM {name}")))?;
    let rp = catalog
        .recovery_points(&name)
        .map_err(|e| Failure::retry(e.to_string()))?
        .into_iter()
        .find(|r| r.id == spec.rp)
        .ok_or_else(|| {
            Failure::stop(format!("recovery point {} of {name} no longer exists", crate::store::hex(&spec.rp)))
        })?;
    if let (Some(items), Some(host)) = (&spec.items, &spec.to_host) {
        return execute_items(ctx, job, &rp, items, host, &spec.options).await;
    }
    let (target, host, create) = match &spec.to_host {
        None => (name.clone(), vm.host.clone(), None),
        Some(h) => (
            spec.name.clone().unwrap_or_else(|| format!("{name}-restored")),
            h.clone(),
            Some(NewVm { os: vm.os, integration_services: true }),
        ),
    };
    let block_size = rp.disks.first().map_or(crate::policy::DEFAULT_BLOCK_SIZE, |d| d.block_size);
    if rp.disks.iter().any(|d| d.block_size != block_size) {
        return Err(Failure::stop("the recovery point's disks have different block sizes"));
    }
    let disks = rp
        .disks
        .iter()
        .map(|d| Ok(DiskInfo { name: bulwark_protocol::DiskId::new(d.name.clone())?, size_bytes: d.size_bytes }))
        .collect::<Result<Vec<_>, bulwark_protocol::ids::IdError>>()
        .map_err(|e| Failure::stop(e.to_string()))?;
    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: host.clone() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {host} is not connected")))?;
    let request = RestoreRequest {
        job: JobId(job.id),
        vm: VmId::new(target.clone()).map_err(|e| Failure::stop(e.to_string()))?,
        create,
        disks,
        block_size,
        id_key: ctx.store.codec().hasher.id_key(),
        lease_secs: ctx.lease.as_secs().min(u64::from(u32::MAX)) as u32,
    };
    let (mut streams, mut result) = ctx.router.register(job.id, &host, conn_id);
    session.do_send(SendToAgent(CoordinatorMessage::RestoreRequest(request)));
    tracing::info!(%host, %target, rp = %crate::store::hex(&rp.id), "recovery sent to the agent");
    let mut restored = 0usize;
    let outcome = loop {
        tokio::select! {
            s = streams.recv() => {
                let Some(mut s) = s else { return Err(Failure::retry("the job's stream router closed")) };
                let Some(d) = rp.disks.iter().find(|d| d.name == s.disk) else {
                    return Err(Failure::stop(format!("the agent opened a stream for disk {}, not in the recovery point", s.disk)));
                };
                let blocks = d.size_bytes.div_ceil(u64::from(block_size));
                if s.mode != TransferMode::Restore || s.blocks != blocks || s.block_size != block_size {
                    return Err(Failure::stop("the agent's restore stream does not fit the recovery point"));
                }
                if let Err(e) = compare::restore(ctx, &mut s, d.root, job, &spec.options).await {
                    let _ = fail_stream(&mut s.send, &e, block_size as usize).await;
                    return Err(Failure::stop(format!(
                        "disk {}: {e}; {target} is marked as not fully restored: recover it again",
                        d.name
                    )));
                }
                restored += 1;
                save(ctx, job);
            }
            r = &mut result => match r {
                Ok(r) => break r,
                // Not retried: the target may be half-written; the operator decides.
                Err(_) => return Err(Failure::stop(format!(
                    "the connection to {host} was lost during the recovery; {target} is marked as not fully restored: recover it again"
                ))),
            },
            () = tokio::time::sleep(ctx.lease) => {
                return Err(Failure::stop(format!("no word from the agent of {host} for {:?}", ctx.lease)));
            }
        }
    };
    match outcome.outcome {
        JobOutcome::Restored { bytes_read, .. } if restored == rp.disks.len() => {
            job.bytes_scanned = bytes_read;
            job.consistency = Some(rp.consistency);
            job.detail = Some(format!(
                "recovery point {} restored onto {target} on {host}: {} block(s) written",
                crate::store::hex(&rp.id),
                job.blocks_changed
            ));
            Ok(())
        }
        JobOutcome::Restored { .. } => Err(Failure::stop("the agent reported a restore of fewer disks than sent")),
        JobOutcome::Failed { kind: FailureKind::Refused, reason } => Err(Failure::stop(reason)),
        JobOutcome::Failed { reason, .. } => Err(Failure::stop(reason)),
        JobOutcome::Succeeded { .. } => Err(Failure::stop("the agent answered a restore with a backup")),
    }
}

/// Looks for swap partitions in freshly committed replicas and records the blocks later
/// synchronizations and express fulls leave out (logged when they change). The guest's
/// partition table is read by the items worker; when it cannot be read, nothing is excluded
/// (a warning, never a failed backup).
async fn find_swap(ctx: &Arc<JobContext>, replicas: Vec<ReplicaRecord>) {
    for mut r in replicas {
        let Some(root) = r.root else { continue };
        let ranges = match crate::items::swap_blocks(ctx.store.clone(), root, r.block_size, r.size_bytes).await {
            Ok(ranges) => ranges,
            Err(e) => {
                tracing::warn!(disk = %r.disk, error = %e, "swap scan failed: nothing is excluded from this disk");
                vec![]
            }
        };
        if ranges == r.excluded {
            continue;
        }
        let bytes: u64 = ranges.iter().map(|(a, b)| b - a).sum::<u64>() * u64::from(r.block_size);
        tracing::info!(disk = %r.disk, excluded_bytes = bytes, "swap space left out of synchronizations and express fulls");
        r.excluded = ranges;
        let store = ctx.store.clone();
        let put = tokio::task::spawn_blocking(move || store.catalog().put_replica(&r)).await;
        if !matches!(put, Ok(Ok(()))) {
            tracing::warn!("cannot record the swap exclusion");
        }
    }
}

/// Item-level recovery onto a host: the agent opens an `Items` stream; the items go down it.
async fn execute_items(
    ctx: &Arc<JobContext>,
    job: &mut JobRecord,
    rp: &crate::catalog::RecoveryPointRecord,
    items: &crate::catalog::ItemsTarget,
    host: &str,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<(), Failure> {
    let d = rp
        .disks
        .iter()
        .find(|d| d.name == items.disk)
        .cloned()
        .ok_or_else(|| Failure::stop(format!("the recovery point has no disk {}", items.disk)))?;
    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: host.to_owned() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {host} is not connected")))?;
    let (mut streams, mut result) = ctx.router.register(job.id, host, conn_id);
    session.do_send(SendToAgent(CoordinatorMessage::ItemsRequest {
        job: JobId(job.id),
        dest: items.dest.clone(),
        keep_modes: items.keep_modes,
    }));
    let mut s = tokio::select! {
        s = streams.recv() => s.ok_or_else(|| Failure::stop("the job's stream router closed"))?,
        r = &mut result => return Err(Failure::stop(match r {
            Ok(JobResult { outcome: JobOutcome::Failed { reason, .. }, .. }) => reason,
            _ => format!("the agent of {host} did not open the item stream"),
        })),
        () = tokio::time::sleep(ctx.lease) => return Err(Failure::stop(format!("no word from the agent of {host}"))),
    };
    if s.mode != TransferMode::Items {
        return Err(Failure::stop("the agent opened the wrong kind of stream"));
    }
    let bs = crate::items::ITEM_CHUNK;
    let sent = crate::items::stream_items(ctx.store.clone(), &mut s.send, d, items.paths.clone(), options).await;
    let end = match &sent {
        Ok(n) => TransferMessage::End { blocks_sent: *n, bytes_read: 0 },
        Err(reason) => TransferMessage::Failed { reason: reason.clone() },
    };
    let _ = transfer::write_message(&mut s.send, &end, bs).await;
    let _ = s.send.finish();
    // A stream the agent stopped reading is the symptom; the agent's result carries the cause
    // (a full disk, say), so it is awaited for a while before the symptom is reported.
    let wait_for_agent = if sent.is_ok() { ctx.lease } else { ctx.lease.min(std::time::Duration::from_secs(10)) };
    let outcome = tokio::select! {
        r = &mut result => match (r, &sent) {
            (Ok(r), _) => r,
            (Err(_), Err(why)) => return Err(Failure::stop(why.clone())),
            (Err(_), Ok(_)) => return Err(Failure::stop(format!("the connection to {host} was lost"))),
        },
        () = tokio::time::sleep(wait_for_agent) => return Err(Failure::stop(match &sent {
            Err(why) => why.clone(),
            Ok(_) => format!("no word from the agent of {host}"),
        })),
    };
    match (outcome.outcome, sent) {
        (JobOutcome::Failed { reason, .. }, _) => Err(Failure::stop(reason)),
        (_, Err(why)) => Err(Failure::stop(why)),
        (JobOutcome::Restored { bytes_written, skipped, .. }, Ok(sent)) => {
            job.bytes_transferred = bytes_written;
            job.blocks_changed = sent;
            job.detail = Some(items_detail(items.paths.len(), host, &items.dest, &skipped));
            Ok(())
        }
        (JobOutcome::Succeeded { .. }, Ok(_)) => {
            Err(Failure::stop("the agent answered an item recovery with a backup"))
        }
    }
}

/// What an item recovery to a host did, with the entries the agent skipped (at most 4 KiB).
fn items_detail(paths: usize, host: &str, dest: &str, skipped: &[String]) -> String {
    let mut d = format!("{paths} path(s) recovered into {host}:{dest}");
    if !skipped.is_empty() {
        d.push_str("; skipped: ");
        d.push_str(&skipped.join("; "));
    }
    if d.len() > 4096 {
        let mut end = 4093;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        d.truncate(end);
        d.push('…');
    }
    d
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Receives one disk's transfer stream into the ingest worker.
async fn disk_transfer(
    ctx: &Arc<JobContext>,
    job: &mut JobRecord,
    vm: &VmRecord,
    block_size: u32,
    replicas: &HashMap<String, ReplicaRecord>,
    ingest: &IngestHandle,
    mut s: TransferStream,
) -> Result<DiskDone, String> {
    let bs = block_size as usize;
    let disk = vm.disks.iter().find(|d| d.name.as_str() == s.disk);
    let Some(disk) = disk else { return Err(format!("{} has no disk {}", vm.name, s.disk)) };
    let blocks = disk.size_bytes.div_ceil(u64::from(block_size));
    if s.block_size != block_size || s.blocks != blocks {
        let why = format!(
            "stream announces {} blocks of {} bytes, the replica has {blocks} of {block_size}",
            s.blocks, s.block_size
        );
        let _ = fail_stream(&mut s.send, &why, bs).await;
        return Err(why);
    }
    let want_mode = if job.kind == JobKind::ConsistencyCheck { TransferMode::Compare } else { TransferMode::Blocks };
    if s.mode != want_mode {
        let why = format!("stream mode {:?} does not fit a {} job", s.mode, job.kind.as_str());
        let _ = fail_stream(&mut s.send, &why, bs).await;
        return Err(why);
    }
    let old = if job.kind == JobKind::Initial {
        None
    } else {
        replicas
            .get(&s.disk)
            .filter(|r| r.size_bytes == disk.size_bytes && r.block_size == block_size)
            .and_then(|r| r.root)
    };
    let r = match s.mode {
        TransferMode::Blocks => receive_blocks(ingest, &mut s, blocks, old, job).await,
        TransferMode::Compare => compare::run(ctx, ingest, &mut s, blocks, old, job).await,
        TransferMode::Restore | TransferMode::Items => Err("a recovery stream in a backup job".into()),
    };
    match r {
        Ok(done) => {
            let _ = transfer::write_message(&mut s.send, &TransferMessage::Stored { blocks: done.changed }, bs).await;
            let _ = s.send.finish();
            Ok(done)
        }
        Err(why) => {
            let _ = fail_stream(&mut s.send, &why, bs).await;
            Err(why)
        }
    }
}

async fn fail_stream(send: &mut quinn::SendStream, why: &str, bs: usize) -> Result<(), transfer::TransferError> {
    transfer::write_message(send, &TransferMessage::Failed { reason: why.to_owned() }, bs).await?;
    let _ = send.finish();
    Ok(())
}

/// Blocks mode: every frame into the worker, `End` checks the count.
async fn receive_blocks(
    ingest: &IngestHandle,
    s: &mut TransferStream,
    blocks: u64,
    old: Option<TreeRoot>,
    job: &mut JobRecord,
) -> Result<DiskDone, String> {
    let bs = s.block_size as usize;
    ingest.send(Cmd::BeginDisk { blocks, old }).await?;
    let mut received = 0u64;
    loop {
        match transfer::read(&mut s.recv, bs).await.map_err(|e| e.to_string())? {
            Some(TransferFrame::Block { index, id, data }) => {
                received += 1;
                job.bytes_transferred += data.len() as u64;
                ingest.send(Cmd::Block { index, id, data }).await?;
            }
            Some(TransferFrame::Zero { index }) => {
                received += 1;
                ingest.send(Cmd::Zero { index }).await?;
            }
            Some(TransferFrame::Message(TransferMessage::End { blocks_sent, .. })) => {
                if blocks_sent != received {
                    return Err(format!("the agent sent {blocks_sent} blocks, {received} arrived"));
                }
                break;
            }
            Some(TransferFrame::Message(TransferMessage::Failed { reason })) => {
                return Err(format!("the agent gave up: {}", bulwark_protocol::text::cap_reason(reason)))
            }
            Some(other) => return Err(format!("unexpected frame {other:?}")),
            None => return Err("the stream ended before the agent said it was complete".into()),
        }
    }
    let (root, changed) = ingest.end_disk().await?;
    job.blocks_changed += changed;
    Ok(DiskDone { root, changed })
}
