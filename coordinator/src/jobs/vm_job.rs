//! One VM job, from the request to the agent to the commit and the verdict back.
//!
//! The replica changes only in the final commit, atomically: a job that fails anywhere leaves
//! the replica as it was (and the agent keeps the changes for the next run). What a failure
//! means for the replica's *continuity* is decided here: lost tracking or a transfer that
//! died midway make it inconsistent, which queues a consistency check when the group's policy
//! allows.

use crate::catalog::{JobKind, JobRecord, JobState, ReplicaRecord, VmRecord};
use crate::jobs::ingest::{Cmd, IngestHandle};
use crate::jobs::machine::items::ItemsRecovery;
use crate::jobs::machine::recovery::{Recovery, RecoverySetup};
use crate::jobs::machine::{BlockReceiver, DiskDone, DiskStart, Effect, JobMachine, Received, Setup, VmJob};
use crate::jobs::plan::Failure;
use crate::jobs::{compare, Finished, JobContext, Progress, SessionOf, StreamSend, ToAgent, TransferStream};
use bulwark_protocol::messages::CoordinatorMessage;
use bulwark_protocol::transfer::{self, TransferMessage, TransferMode};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncWriteExt as _;
use tracing::Instrument;

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

/// The epoch of this coordinator's claim on `vm` (0: none yet); a VM another coordinator owns
/// gets no job from this one (`vm list` shows it `lost`).
fn owned_epoch(ctx: &JobContext, vm: &str) -> Result<u64, Failure> {
    let ownership = ctx.catalog().vm_ownership(vm).map_err(|e| Failure::retry(e.to_string()))?;
    ownership.job_epoch(vm, &ctx.coordinator).map_err(Failure::stop)
}

fn save(ctx: &JobContext, job: &JobRecord) {
    if let Err(e) = ctx.catalog().put_job(job) {
        tracing::error!(error = %e, "cannot record the job's state");
    }
}

fn mark_inconsistent(ctx: &JobContext, vm: &str, why: &str) {
    match ctx.catalog().mark_inconsistent(vm, why, super::now()) {
        Ok(disks) => {
            for disk in disks {
                tracing::warn!(%disk, reason = why, "replica marked inconsistent");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot mark the replica inconsistent"),
    }
}

/// Runs a backup job: [`VmJob`] decides, this performs its effects and feeds it what
/// happens on the wire.
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
    let policy = match &vm.group {
        Some(g) => catalog.group_policy(g).map_err(|e| Failure::retry(e.to_string()))?,
        None => None,
    };
    let replicas: HashMap<String, ReplicaRecord> = catalog
        .replicas_of(&name)
        .map_err(|e| Failure::retry(e.to_string()))?
        .into_iter()
        .map(|r| (r.disk.clone(), r))
        .collect();
    let block_size = crate::jobs::plan::block_size(
        &vm.disks,
        &replicas,
        policy.as_ref().map_or(crate::policy::DEFAULT_BLOCK_SIZE, |p| p.block_size),
    );
    let left_out = policy
        .map(|p| p.exclude_disks.into_iter().filter(|(v, _)| *v == name).map(|(_, d)| d).collect())
        .unwrap_or_default();
    let epoch = owned_epoch(ctx, &name)?;
    let setup = Setup {
        record: job.clone(),
        vm: name.clone(),
        disks: vm.disks.clone(),
        replicas,
        block_size,
        id_key: ctx.store.codec().hasher.id_key(),
        lease_ms: ctx.lease.as_millis().min(u128::from(u64::MAX)) as u64,
        left_out,
        parallel: ctx.disks_in_parallel,
        epoch,
    };
    let mut m = VmJob::start(setup, now_ms())?;
    if m.record().kind != job.kind {
        tracing::info!("no complete replica yet: running the initial copy instead");
        job.kind = m.record().kind;
    }
    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: vm.host.clone() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {} ({}) is not connected", name, vm.host)))?;
    let ingest = IngestHandle::start(ctx.store.clone(), job.id).map_err(|e| Failure::retry(e.to_string()))?;
    let (mut streams, mut result) = ctx.router.register(job.id, &vm.host, conn_id);
    let mut result_in = false;
    // The disks being received, each from its own stream (as many as the machine lets open).
    let progress = Progress::default();
    let mut receiving = futures_util::stream::FuturesUnordered::new();
    let mut heard = progress.frames();
    loop {
        m.record_mut().bytes_transferred = progress.transferred();
        m.record_mut().bytes_scanned = progress.scanned().max(m.record().bytes_scanned);
        while let Some(effect) = m.poll_effect() {
            match effect {
                Effect::PutReplica(r) => catalog.put_replica(&r).map_err(|e| Failure::retry(e.to_string()))?,
                Effect::Send(msg) => {
                    if matches!(msg, CoordinatorMessage::JobRequest(_)) {
                        tracing::info!(host = %vm.host, disks = vm.disks.len(), block_size, "job sent to the agent");
                    }
                    session.do_send(ToAgent(msg));
                }
                Effect::Commit { replicas, rp } => {
                    let r = ingest.commit(replicas, rp).await.map(|rp| rp.map(|r| r.id));
                    m.committed(r);
                }
                Effect::MarkInconsistent(why) => mark_inconsistent(ctx, &name, &why),
                Effect::FindSwap(committed) => find_swap(ctx, committed).await,
                Effect::Save => save(ctx, m.record()),
                Effect::Finished => {
                    let outcome = m.outcome().cloned();
                    *job = m.record().clone();
                    return outcome
                        .unwrap_or_else(|| Err(Failure::stop("internal: a job finished without an outcome")));
                }
            }
        }
        let wait = m.next_timeout().map_or(ctx.lease, |t| std::time::Duration::from_millis(t.saturating_sub(now_ms())));
        tokio::select! {
            s = streams.recv() => {
                let Some(s) = s else { return Err(Failure::retry("the job's stream router closed")) };
                let disk = s.disk.clone();
                match m.stream_opened(&disk, s.mode, s.blocks, s.block_size, now_ms()) {
                    Ok(start) => {
                        tracing::info!(%disk, slot = start.slot, "disk stream opened");
                        let (ingest, progress) = (&ingest, &progress);
                        receiving.push(async move {
                            let r = disk_transfer(ctx, ingest, s, start, progress).await;
                            (disk, r)
                        });
                    }
                    Err(why) => {
                        let mut s = s;
                        let _ = fail_stream(&mut s.send, &why, s.block_size as usize).await;
                    }
                }
            }
            Some((disk, r)) = futures_util::StreamExt::next(&mut receiving), if !receiving.is_empty() => {
                match r {
                    Ok(done) => {
                        tracing::info!(%disk, changed = done.changed, "disk stored");
                        m.disk_done(&disk, done, now_ms())
                    }
                    Err(why) => m.disk_failed(&disk, &why),
                }
            }
            r = &mut result, if !result_in => {
                result_in = true;
                match r {
                    Ok(r) => m.agent_result(r.outcome, now_ms()),
                    Err(_) => m.connection_lost(&vm.host),
                }
            }
            () = tokio::time::sleep(wait) => {
                // Blocks arriving on an open stream are word from the agent.
                let frames = progress.frames();
                if frames != heard {
                    heard = frames;
                    m.heard(now_ms());
                }
                m.timeout(&vm.host, now_ms());
            }
        }
    }
}

/// A recovery: the agent of the target host hashes the target VM's disks; each disk gets only
/// the blocks that differ from the recovery point.
/// Whether recovery job `job` is an instant recovery: its new VM has an active instant record
/// for this point, not yet taken by another job (then it is taken by this one).
fn instant_of(
    catalog: &crate::catalog::Catalog,
    job: u64,
    spec: &crate::catalog::RecoverySpec,
) -> Result<bool, crate::catalog::CatalogError> {
    let (Some(name), Some(host)) = (&spec.name, &spec.to_host) else { return Ok(false) };
    let Some(mut r) = catalog.instant(name)? else { return Ok(false) };
    if !(r.is_active() && r.rp == spec.rp && &r.host == host && r.job.is_none_or(|j| j == job)) {
        return Ok(false);
    }
    if r.job.is_none() {
        r.job = Some(job);
        catalog.put_instant(&r)?;
    }
    Ok(true)
}

/// A recovery job failed for good: an instant recovery waiting for it (or made by it) is over,
/// so its record no longer keeps the point's chunks nor blocks its name.
pub fn end_instant_of_failed(catalog: &crate::catalog::Catalog, job: &JobRecord) {
    let Some(spec) = job.recovery.as_ref() else { return };
    let Some(name) = spec.name.as_deref() else { return };
    match catalog.instant(name) {
        Ok(Some(r)) if r.is_active() && r.rp == spec.rp && r.job.is_none_or(|j| j == job.id) => {
            end_instant(catalog, name)
        }
        Ok(_) => {}
        Err(e) => tracing::error!(vm = name, error = %e, "cannot read an instant recovery's record"),
    }
}

/// Marks the instant recovery of VM `name` as over (its exports are refused from now on).
fn end_instant(catalog: &crate::catalog::Catalog, name: &str) {
    let ended = catalog.instant(name).and_then(|r| match r {
        Some(mut r) if r.is_active() => {
            r.finished_at = Some(now_ms() / 1000);
            catalog.put_instant(&r)
        }
        _ => Ok(()),
    });
    if let Err(e) = ended {
        tracing::error!(vm = name, error = %e, "cannot end a failed instant recovery's record");
    }
}

async fn execute_recovery(ctx: &Arc<JobContext>, job: &mut JobRecord) -> Result<(), Failure> {
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
    let sizes: HashMap<String, u64> = rp.disks.iter().map(|d| (d.name.clone(), d.size_bytes)).collect();
    let setup = RecoverySetup {
        record: job.clone(),
        rp,
        vm_host: vm.host.clone(),
        os: vm.os,
        to_host: spec.to_host.clone(),
        name: spec.name.clone(),
        id_key: ctx.store.codec().hasher.id_key(),
        lease_ms: ctx.lease.as_millis().min(u128::from(u64::MAX)) as u64,
        instant: instant_of(&catalog, job.id, &spec).map_err(|e| Failure::retry(e.to_string()))?,
        epoch: if spec.to_host.is_none() { owned_epoch(ctx, &name)? } else { 0 },
    };
    let instant = setup.instant.then(|| spec.name.clone()).flatten();
    let mut m = Recovery::start(setup, now_ms())?;
    let host = m.host().to_owned();
    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: host.clone() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {host} is not connected")))?;
    let (mut streams, mut result) = ctx.router.register(job.id, &host, conn_id);
    let mut result_in = false;
    loop {
        while let Some(effect) = m.poll_effect() {
            match effect {
                Effect::Send(msg) => {
                    tracing::info!(%host, target = %m.target(), "recovery sent to the agent");
                    session.do_send(ToAgent(msg));
                }
                Effect::Save => save(ctx, m.record()),
                Effect::Finished => {
                    let outcome = m.outcome().cloned();
                    *job = m.record().clone();
                    // A failed instant recovery leaves no VM depending on the point.
                    if let (Some(name), Some(Err(_))) = (&instant, &outcome) {
                        end_instant(&catalog, name);
                    }
                    return outcome
                        .unwrap_or_else(|| Err(Failure::stop("internal: a recovery finished without an outcome")));
                }
                // A recovery commits nothing and doubts no replica.
                Effect::PutReplica(_) | Effect::Commit { .. } | Effect::MarkInconsistent(_) | Effect::FindSwap(_) => {}
            }
        }
        let wait = m.next_timeout().map_or(ctx.lease, |t| std::time::Duration::from_millis(t.saturating_sub(now_ms())));
        tokio::select! {
            s = streams.recv() => {
                let Some(mut s) = s else { return Err(Failure::retry("the job's stream router closed")) };
                let disk = s.disk.clone();
                if let Ok(root) = m.stream_opened(&disk, s.mode, s.blocks, s.block_size, now_ms()) {
                    let size = sizes.get(&disk).copied().unwrap_or(0);
                    match compare::restore(ctx, &mut s, root, size, m.record_mut(), &spec.options).await {
                        Ok(()) => m.disk_restored(&disk, now_ms()),
                        Err(e) => {
                            let _ = fail_stream(&mut s.send, &e, s.block_size as usize).await;
                            m.disk_failed(&disk, &e);
                        }
                    }
                }
            }
            r = &mut result, if !result_in => {
                result_in = true;
                match r {
                    Ok(r) => m.agent_result(r.outcome, now_ms()),
                    Err(_) => m.connection_lost(),
                }
            }
            () = tokio::time::sleep(wait) => m.timeout(now_ms()),
        }
    }
}

/// Looks for swap partitions in freshly committed replicas and records the blocks later
/// synchronizations and express fulls leave out (logged when they change). The guest's
/// partition table is read by the items worker; when it cannot be read, nothing is excluded
/// (a warning, never a failed backup).
async fn find_swap(ctx: &Arc<JobContext>, replicas: Vec<ReplicaRecord>) {
    for mut r in replicas {
        let Some(root) = r.root else { continue };
        let scan = match crate::items::swap_blocks(ctx.store.clone(), root, r.block_size, r.size_bytes).await {
            Ok(scan) => scan,
            Err(e) => {
                tracing::warn!(disk = %r.disk, error = %e, "swap scan failed: nothing is excluded from this disk");
                crate::items::SwapScan::default()
            }
        };
        if scan.ranges == r.excluded && scan.witness == r.swap_witness {
            continue;
        }
        let bytes: u64 = scan.ranges.iter().map(|(a, b)| b - a).sum::<u64>() * u64::from(r.block_size);
        tracing::info!(disk = %r.disk, excluded_bytes = bytes, "swap space left out of synchronizations and express fulls");
        r.excluded = scan.ranges;
        r.swap_witness = scan.witness;
        let store = ctx.store.clone();
        let put = tokio::task::spawn_blocking(move || store.catalog().put_replica(&r)).await;
        if !matches!(put, Ok(Ok(()))) {
            tracing::warn!("cannot record the swap exclusion");
        }
    }
}

/// Item-level recovery onto a host ([`ItemsRecovery`] decides): the agent opens an `Items`
/// stream and the items go down it from the items worker.
async fn execute_items(
    ctx: &Arc<JobContext>,
    job: &mut JobRecord,
    rp: &crate::catalog::RecoveryPointRecord,
    items: &crate::catalog::ItemsTarget,
    host: &str,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<(), Failure> {
    let lease_ms = ctx.lease.as_millis().min(u128::from(u64::MAX)) as u64;
    let mut m = ItemsRecovery::start(job.clone(), rp, items.clone(), host.to_owned(), lease_ms, now_ms())?;
    let (session, conn_id) = ctx
        .registry
        .send(SessionOf { host: host.to_owned() })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Failure::retry(format!("the agent of {host} is not connected")))?;
    let (mut streams, mut result) = ctx.router.register(job.id, host, conn_id);
    let mut result_in = false;
    // The stream stays open until the job ends: the agent answers `Stored` on it after the
    // last item, and a dropped stream would stop it mid-answer.
    let mut kept: Option<TransferStream> = None;
    loop {
        while let Some(effect) = m.poll_effect() {
            match effect {
                Effect::Send(msg) => session.do_send(ToAgent(msg)),
                Effect::Save => save(ctx, m.record()),
                Effect::Finished => {
                    // Closed only now, the agent's answer on it read or no longer awaited.
                    drop(kept.take());
                    let outcome = m.outcome().cloned();
                    *job = m.record().clone();
                    return outcome.unwrap_or_else(|| {
                        Err(Failure::stop("internal: an item recovery finished without an outcome"))
                    });
                }
                Effect::PutReplica(_) | Effect::Commit { .. } | Effect::MarkInconsistent(_) | Effect::FindSwap(_) => {}
            }
        }
        let wait = m.next_timeout().map_or(ctx.lease, |t| std::time::Duration::from_millis(t.saturating_sub(now_ms())));
        tokio::select! {
            s = streams.recv(), if m.wants_stream() => {
                let Some(mut s) = s else { return Err(Failure::stop("the job's stream router closed")) };
                if let Ok((disk, paths)) = m.stream_opened(s.mode) {
                    let sent = crate::items::stream_items(ctx.store.clone(), &mut s.send, disk, paths, options).await;
                    let end = m.streamed(sent, now_ms());
                    let _ = transfer::write_message(&mut s.send, &end, crate::items::ITEM_CHUNK).await;
                    let _ = s.send.shutdown().await;
                }
                kept = Some(s);
            }
            r = &mut result, if !result_in => {
                result_in = true;
                match r {
                    Ok(r) => m.agent_result(r.outcome),
                    Err(_) => m.connection_lost(),
                }
            }
            () = tokio::time::sleep(wait) => m.timeout(now_ms()),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Receives one disk's transfer stream into the ingest worker; answers the agent `Stored` or
/// `Failed`.
async fn disk_transfer(
    ctx: &Arc<JobContext>,
    ingest: &IngestHandle,
    mut s: TransferStream,
    start: DiskStart,
    progress: &Progress,
) -> Result<DiskDone, String> {
    let bs = s.block_size as usize;
    let r = match start.mode {
        TransferMode::Blocks => receive_blocks(ingest, &mut s, start, progress).await,
        TransferMode::Compare => compare::run(ctx, ingest, &mut s, start, progress).await,
        TransferMode::Restore | TransferMode::Items | TransferMode::Export => {
            Err("a recovery stream in a backup job".into())
        }
    };
    match r {
        Ok(done) => {
            let _ = transfer::write_message(&mut s.send, &TransferMessage::Stored { blocks: done.changed }, bs).await;
            let _ = s.send.shutdown().await;
            Ok(done)
        }
        Err(why) => {
            let _ = fail_stream(&mut s.send, &why, bs).await;
            Err(why)
        }
    }
}

async fn fail_stream(send: &mut StreamSend, why: &str, bs: usize) -> Result<(), transfer::TransferError> {
    transfer::write_message(send, &TransferMessage::Failed { reason: why.to_owned() }, bs).await?;
    let _ = send.shutdown().await;
    Ok(())
}

/// Blocks mode: every frame into the worker, `End` checks the count.
async fn receive_blocks(
    ingest: &IngestHandle,
    s: &mut TransferStream,
    start: DiskStart,
    progress: &Progress,
) -> Result<DiskDone, String> {
    let bs = s.block_size as usize;
    let slot = start.slot;
    ingest.send(Cmd::BeginDisk { slot, blocks: start.blocks, old: start.old }).await?;
    let mut receiver = BlockReceiver::default();
    loop {
        let frame = transfer::read(&mut s.recv, bs)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the stream ended before the agent said it was complete")?;
        match receiver.frame(frame)? {
            Received::Block { index, id, data } => {
                progress.frame(data.len() as u64);
                ingest.send(Cmd::Block { slot, index, id, data }).await?;
            }
            Received::Zero { index } => {
                progress.frame(0);
                ingest.send(Cmd::Zero { slot, index }).await?
            }
            Received::End => break,
        }
    }
    let (root, changed) = ingest.end_disk(slot).await?;
    Ok(DiskDone { root, changed })
}
