//! A job on the agent's side: take the snapshot (through a [`SnapshotActor`]), stream each
//! disk's blocks on its own transfer stream (see `bulwark_protocol::transfer`; as many disks
//! at once as the request says), report, and
//! release the snapshot when the coordinator says whether it committed — advancing the change
//! token only then, so a transfer that fails anywhere is sent again by the next run.
//!
//! Reading and hashing run on blocking threads; frames cross to the stream through a channel
//! of a few blocks, and QUIC flow control stops the reader when the coordinator is slower.
//! Memory is a few blocks per disk plus, for a consistency check, the snapshot's block-map
//! pages, which live in an anonymous scratch file.

use crate::agent_job::{AgentEffect, AgentJob, Snapshot};
use crate::backend::{BackendError, Hypervisor};
use crate::snapshot::{Finish, Renew, SnapshotActor, Take, Taken};
use actix::prelude::*;
use bulwark_protocol::block::{ChunkHasher, Digest, ZERO};
use bulwark_protocol::blockmap::{self, PageStore, TreeRoot};
use bulwark_protocol::messages::{
    AgentMessage, DiskJob, FailureKind, JobKind, JobOutcome, JobRequest, JobResult, RestoreRequest,
};
use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage, TransferMode};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// What a job needs of the agent.
#[derive(Clone)]
pub struct JobEnv {
    pub backend: Arc<dyn Hypervisor>,
    pub host: String,
    /// The coordinator asking (its certificate identity): the owner a job's claim must name.
    pub coordinator: String,
    /// Opens a transfer stream to the coordinator (over the uplink's connection).
    pub open_stream: OpenStream,
    pub out: mpsc::Sender<AgentMessage>,
    /// Where consistency checks keep their scratch pages (an anonymous file, gone on exit).
    pub scratch: PathBuf,
    /// One job at a time per VM, its snapshot undone before the next begins.
    pub slots: VmSlots,
    /// The exports of instant recoveries, across jobs and sessions.
    pub exports: crate::export::InstantExports,
    /// The connection of the session now (an export's broken link opens again on it).
    pub current: crate::export::CurrentConnection,
}

/// The sending half of a transfer stream (a QUIC stream, which only the uplink knows).
pub type StreamSend = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// The receiving half of a transfer stream.
pub type StreamRecv = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
/// Opens a transfer stream to the coordinator.
pub type OpenStream = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(StreamSend, StreamRecv), String>> + Send>>
        + Send
        + Sync,
>;

/// How long a job waits for the previous job of its VM to finish undoing its snapshot: the
/// freeze bound answers a job whose hypervisor call hangs at once, and what that call did is
/// undone when it returns, possibly after the coordinator has sent the next attempt.
pub const SLOT_WAIT: Duration = Duration::from_secs(60);

/// The VMs with a job on this agent: a job holds its VM's slot from before its snapshot is
/// taken until it is released, so a retry never meets the previous attempt's snapshot still
/// frozen or held. Entries are dropped once nobody holds or waits for them.
#[derive(Clone, Default)]
pub struct VmSlots(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>);

impl VmSlots {
    /// Waits up to `wait` for `vm`'s slot.
    async fn acquire(&self, vm: &str, wait: Duration) -> Result<tokio::sync::OwnedSemaphorePermit, Failure> {
        let slot = {
            let mut slots = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slots.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() == 0);
            slots.entry(vm.to_owned()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1))).clone()
        };
        match tokio::time::timeout(wait, slot.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Failure::other("internal: the VM's job slot was closed")),
            Err(_) => Err(Failure::other(format!(
                "the previous job's snapshot of {vm} was still being undone after {wait:?} (a hypervisor call has \
                 not returned)"
            ))),
        }
    }
}

/// A job that could not be done.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    reason: String,
}

impl Failure {
    fn other(reason: impl std::fmt::Display) -> Self {
        Self { kind: FailureKind::Other, reason: reason.to_string() }
    }

    fn into_pair(self) -> (FailureKind, String) {
        (self.kind, self.reason)
    }
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        let kind = match &e {
            BackendError::Refused(_) => FailureKind::Refused,
            BackendError::TrackingLost(_) => FailureKind::TrackingLost,
            BackendError::Failed(_) => FailureKind::Other,
        };
        Self { kind, reason: e.to_string() }
    }
}

/// Blocks of a restore received ahead of the writer, at most.
const WRITE_QUEUE: usize = 8;

/// Runs one job to its end: reports the outcome, waits for the coordinator's verdict, and
/// releases the snapshot whatever happens.
pub async fn run(env: JobEnv, req: JobRequest, verdict: oneshot::Receiver<bool>) {
    let span = tracing::info_span!("job", job_id = %req.job, vm = %req.vm, kind = ?req.kind);
    async move {
        let _slot = match env.slots.acquire(req.vm.as_str(), SLOT_WAIT).await {
            Ok(permit) => permit,
            Err(f) => {
                tracing::warn!(reason = %f.reason, "job not started");
                let outcome = JobOutcome::Failed { kind: f.kind, reason: f.reason };
                let _ = env.out.send(AgentMessage::JobResult(JobResult { job: req.job, outcome })).await;
                return;
            }
        };
        let lease = Duration::from_secs(u64::from(req.lease_secs.max(10)));
        if req.kind == JobKind::Recovery {
            let outcome = JobOutcome::Failed {
                kind: FailureKind::Other,
                reason: "recovery jobs are not handled by this agent version".into(),
            };
            let _ = env.out.send(AgentMessage::JobResult(JobResult { job: req.job, outcome })).await;
            return;
        }
        let snapshot = SnapshotActor::new(env.backend.clone(), req.vm.as_str(), &env.host, lease).start();
        // Renew the lease while the job runs; it lapses by itself if this task dies.
        let renew = {
            let snapshot = snapshot.clone();
            actix_rt::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if snapshot.try_send(Renew).is_err() {
                        return;
                    }
                }
            })
        };
        let started = tokio::time::Instant::now();
        let now = || started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        let mut m = AgentJob::new(&req, lease.as_millis().min(u128::from(u64::MAX)) as u64);
        let hasher = req.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
        let mut verdict = Some(verdict);
        // The disks being sent, each on its own stream.
        let mut sending = futures_util::stream::FuturesUnordered::new();
        loop {
            while let Some(effect) = m.poll_effect() {
                match effect {
                    AgentEffect::Take => m.taken(take(&env, &req, &snapshot).await.map_err(Failure::into_pair)),
                    AgentEffect::SendDisk(d) => {
                        let disk = Disk {
                            vm: req.vm.as_str().to_owned(),
                            name: d.disk.as_str().to_owned(),
                            block_size: req.block_size as usize,
                            hasher: hasher.clone(),
                        };
                        let (env, req) = (&env, &req);
                        let span = tracing::info_span!("disk", disk = %disk.name);
                        sending.push(
                            async move { send_one(env, req, &d, &disk).await.map_err(Failure::into_pair) }
                                .instrument(span),
                        );
                    }
                    AgentEffect::Report(outcome) => {
                        if let JobOutcome::Failed { kind, reason } = &outcome {
                            tracing::warn!(?kind, %reason, "job failed");
                        }
                        let sent =
                            env.out.send(AgentMessage::JobResult(JobResult { job: req.job, outcome })).await.is_ok();
                        m.reported(sent, now());
                    }
                    AgentEffect::Release { commit } => {
                        // Nothing reads the snapshot once it is released (an aborted job's
                        // disks still in flight stop here).
                        sending.clear();
                        renew.abort();
                        match snapshot.send(Finish { commit }).await {
                            Ok(Ok(())) => tracing::info!(committed = commit.is_some(), "snapshot released"),
                            Ok(Err(e)) => tracing::error!(error = %e, "snapshot release failed"),
                            // The actor already stopped (it releases in `stopped`).
                            Err(_) => {}
                        }
                        m.released();
                    }
                    AgentEffect::Done => return,
                }
            }
            if !sending.is_empty() {
                if let Some(r) = futures_util::StreamExt::next(&mut sending).await {
                    m.disk_sent(r);
                }
                continue;
            }
            // Only the verdict (or its deadline) is awaited here.
            let Some(deadline) = m.next_timeout() else {
                tracing::error!("internal: the job waits for nothing");
                m.abort();
                continue;
            };
            let wait = Duration::from_millis(deadline.saturating_sub(now()));
            match verdict.take() {
                Some(mut v) => tokio::select! {
                    r = &mut v => m.verdict(matches!(r, Ok(true))),
                    () = tokio::time::sleep(wait) => {
                        tracing::warn!("no verdict from the coordinator: changes kept for the next run");
                        m.timeout(now());
                    }
                },
                None => m.timeout(u64::MAX),
            }
        }
    }
    .instrument(span)
    .await
}

/// Decides a job's claim on `vm` (see [`crate::claims`]): refuses the job of a coordinator
/// that does not own the VM (or whose epoch is stale), claims an unclaimed VM for it (epoch 0),
/// and tells the coordinator the claim in both cases.
async fn check_claim(env: &JobEnv, vm: &str, epoch: u64) -> Result<(), Failure> {
    let claims = crate::claims::Claims::new(env.backend.claims_dir());
    let (me, v) = (env.coordinator.clone(), vm.to_owned());
    let decided = blocking(move || Ok::<_, BackendError>(claims.for_job(&v, &me, epoch))).await??;
    let vm_id = bulwark_protocol::VmId::new(vm.to_owned()).map_err(Failure::other)?;
    let tell = |owner: Option<bulwark_protocol::ownership::Owner>, refused: Option<String>| AgentMessage::Claim {
        vm: vm_id.clone(),
        owner,
        refused,
        requested: false,
    };
    match decided {
        Ok(owner) => {
            if epoch == 0 {
                tracing::info!(coordinator = %owner.coordinator, epoch = owner.epoch, "VM claimed");
                let _ = env.out.send(tell(Some(owner), None)).await;
            }
            Ok(())
        }
        Err(crate::claims::ClaimError::Refused(r)) => {
            let _ = env.out.send(tell(r.owner().cloned(), Some(r.to_string()))).await;
            Err(Failure { kind: FailureKind::NotOwner, reason: r.to_string() })
        }
        Err(e) => Err(Failure::other(e)),
    }
}

/// Takes the job's snapshot, after checking the VM is on this host.
async fn take(env: &JobEnv, req: &JobRequest, snapshot: &Addr<SnapshotActor>) -> Result<Snapshot, Failure> {
    let vm = req.vm.as_str().to_owned();
    let here = {
        let (backend, host, vm) = (env.backend.clone(), env.host.clone(), vm.clone());
        blocking(move || backend.is_here(&vm, &host)).await??
    };
    if !here {
        return Err(Failure { kind: FailureKind::NotHere, reason: format!("{vm} is not on {}", env.host) });
    }
    check_claim(env, &vm, req.epoch).await?;
    bulwark_protocol::block::check_block_size(req.block_size as usize).map_err(Failure::other)?;
    let taken: Taken = snapshot.send(Take).await.map_err(Failure::other)??;
    // The VM's definition goes with the recovery point (a definition that cannot be read
    // costs the point its definition, never the backup).
    let config = {
        let (backend, vm) = (env.backend.clone(), req.vm.as_str().to_owned());
        blocking(move || backend.vm_config(&vm)).await?.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the VM's definition cannot be read: the recovery point keeps none");
            vec![]
        })
    };
    Ok(Snapshot { token: taken.token, consistency: taken.consistency, note: taken.note, config })
}

/// Sends one disk of the snapshot: the blocks the job's kind asks for (swap left out), or a
/// consistency check's comparison. Answers the blocks sent and the bytes read.
async fn send_one(env: &JobEnv, req: &JobRequest, d: &DiskJob, disk: &Disk) -> Result<(u64, u64), Failure> {
    let kind = req.kind;
    if kind == JobKind::ConsistencyCheck {
        return compare_disk(env, req.job.0, disk).await;
    }
    let mut indices = {
        let (backend, disk, token) = (env.backend.clone(), disk.clone(), d.token);
        blocking(move || match kind {
            JobKind::Initial => backend.allocated_blocks(&disk.vm, &disk.name, disk.block_size as u64),
            _ => backend.changed_blocks(&disk.vm, &disk.name, token, disk.block_size as u64),
        })
        .await??
    };
    // Swap (page file) ranges the coordinator leaves out of incrementals, while the blocks it
    // found them from are unchanged in this snapshot: a partition that stopped being swap is
    // sent like any other.
    let exclude = if d.exclude.is_empty() || swap_layout_holds(env, disk, &d.witness).await? {
        d.exclude.clone()
    } else {
        // What was left out before is sent whole too: the replica is exact again.
        let blocks = disk_blocks(env, disk).await?;
        indices.extend(d.exclude.iter().flat_map(|(a, b)| *a..(*b).min(blocks)));
        indices.sort_unstable();
        indices.dedup();
        tracing::info!(disk = %disk.name, "the swap layout changed since the last scan: the former swap is sent whole");
        vec![]
    };
    let before = indices.len();
    indices.retain(|i| !exclude.iter().any(|(a, b)| (*a..*b).contains(i)));
    if indices.len() < before {
        tracing::info!(disk = %disk.name, skipped = before - indices.len(), "changed swap blocks left out");
    }
    tracing::info!(disk = %disk.name, blocks = indices.len(), "sending blocks");
    send_disk(env, req.job.0, disk, indices, kind == JobKind::Initial).await
}

pub use crate::agent_job::next_token;

/// Whether every witness block of a swap exclusion has its recorded id in the held snapshot
/// (an empty witness proves nothing). A block that cannot be read says no.
async fn swap_layout_holds(env: &JobEnv, disk: &Disk, witness: &[(u64, Digest)]) -> Result<bool, Failure> {
    if witness.is_empty() || witness.len() > MAX_WITNESS {
        return Ok(false);
    }
    let (backend, d) = (env.backend.clone(), disk.clone());
    let want: std::collections::HashMap<u64, Digest> = witness.iter().copied().collect();
    let indices: Vec<u64> = want.keys().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    blocking(move || {
        let mut same = true;
        let read = backend.read_blocks(&d.vm, &d.name, indices, d.block_size, &d.hasher, &mut |b| {
            same &= want.get(&b.index) == Some(&b.id);
            Ok(())
        });
        Ok(read.is_ok() && same)
    })
    .await?
}

/// The number of blocks of `disk`.
async fn disk_blocks(env: &JobEnv, disk: &Disk) -> Result<u64, Failure> {
    let (backend, d) = (env.backend.clone(), disk.clone());
    let size = blocking(move || backend.disk_size(&d.vm, &d.name)).await??;
    Ok(size.div_ceil(disk.block_size as u64))
}

/// The most witness blocks a job may name (a swap scan reads a partition table and a header
/// per partition).
const MAX_WITNESS: usize = 4096;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Failure::other(format!("worker thread failed: {e}")))
}

#[derive(Clone)]
struct Disk {
    vm: String,
    name: String,
    block_size: usize,
    hasher: ChunkHasher,
}

fn stream_err(what: &str) -> impl FnOnce(transfer::TransferError) -> Failure + '_ {
    move |e| Failure::other(format!("{what}: {e}"))
}

/// Opens a disk's transfer stream and says what it is for.
async fn open(
    env: &JobEnv,
    job: u64,
    disk: &Disk,
    mode: TransferMode,
) -> Result<(StreamSend, StreamRecv, u64), Failure> {
    let size = {
        let (backend, d) = (env.backend.clone(), disk.clone());
        blocking(move || backend.disk_size(&d.vm, &d.name)).await??
    };
    let blocks = size.div_ceil(disk.block_size as u64);
    let (mut send, recv) =
        (env.open_stream)().await.map_err(|e| Failure::other(format!("cannot open a transfer stream: {e}")))?;
    let open = TransferMessage::Open { job, disk: disk.name.clone(), block_size: disk.block_size as u32, blocks, mode };
    transfer::write_message(&mut send, &open, disk.block_size).await.map_err(stream_err("transfer stream"))?;
    Ok((send, recv, blocks))
}

/// Streams blocks `indices` of the snapshot as frames (zero blocks as zero frames unless
/// `skip_zero`); answers the frames sent and the bytes read.
async fn stream_blocks(
    env: &JobEnv,
    send: &mut StreamSend,
    disk: &Disk,
    indices: Vec<u64>,
    skip_zero: bool,
) -> Result<(u64, u64), Failure> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let reader = {
        let (backend, d) = (env.backend.clone(), disk.clone());
        tokio::task::spawn_blocking(move || {
            backend.read_blocks(&d.vm, &d.name, indices, d.block_size, &d.hasher, &mut |b| {
                let body = if b.id == ZERO {
                    if skip_zero {
                        return Ok(());
                    }
                    transfer::zero_body(b.index)
                } else {
                    transfer::block_body(b.index, &b.id, b.data)
                };
                tx.blocking_send(body).map_err(|_| "the transfer stream closed".to_owned())
            })
        })
    };
    let mut sent = 0u64;
    let mut write_error = None;
    while let Some(body) = rx.recv().await {
        if let Err(e) = transfer::write_body(send, &body, disk.block_size).await {
            write_error = Some(e);
            break;
        }
        sent += 1;
    }
    drop(rx);
    let stats = reader.await.map_err(|e| Failure::other(format!("reader thread failed: {e}")))?;
    if let Some(e) = write_error {
        return Err(stream_err("sending blocks")(e));
    }
    let stats = stats?;
    Ok((sent, stats.bytes_read))
}

/// Waits for the coordinator's `Stored` (or its reason for failing).
async fn await_stored(recv: &mut StreamRecv, bs: usize) -> Result<(), Failure> {
    match transfer::read(recv, bs).await {
        Ok(Some(TransferFrame::Message(TransferMessage::Stored { .. }))) => Ok(()),
        Ok(Some(TransferFrame::Message(TransferMessage::Failed { reason }))) => {
            Err(Failure::other(format!("the coordinator could not store the disk: {reason}")))
        }
        Ok(other) => Err(Failure::other(format!("unexpected answer on the transfer stream: {other:?}"))),
        Err(e) => Err(stream_err("waiting for the coordinator")(e)),
    }
}

/// Sync, express full, initial: the listed blocks, then `End`, then the coordinator's `Stored`.
async fn send_disk(
    env: &JobEnv,
    job: u64,
    disk: &Disk,
    indices: Vec<u64>,
    skip_zero: bool,
) -> Result<(u64, u64), Failure> {
    let (mut send, mut recv, _) = open(env, job, disk, TransferMode::Blocks).await?;
    let (sent, read) = stream_blocks(env, &mut send, disk, indices, skip_zero).await?;
    let end = TransferMessage::End { blocks_sent: sent, bytes_read: read };
    transfer::write_message(&mut send, &end, disk.block_size).await.map_err(stream_err("transfer stream"))?;
    let _ = send.shutdown().await;
    await_stored(&mut recv, disk.block_size).await?;
    Ok((sent, read))
}

/// Consistency check: hash the whole snapshot into a block map, answer the coordinator's page
/// questions top-down, send the blocks it finds different.
async fn compare_disk(env: &JobEnv, job: u64, disk: &Disk) -> Result<(u64, u64), Failure> {
    let (mut send, mut recv, blocks) = open(env, job, disk, TransferMode::Compare).await?;
    let (root, pages, read) = {
        let (backend, d, scratch) = (env.backend.clone(), disk.clone(), env.scratch.clone());
        blocking(move || hash_disk(&*backend, &d, blocks, &scratch, false)).await??
    };
    tracing::info!(disk = %disk.name, bytes_read = read, "snapshot hashed; comparing trees");
    let bs = disk.block_size;
    transfer::write_message(&mut send, &TransferMessage::Root { root, bytes_read: read }, bs)
        .await
        .map_err(stream_err("transfer stream"))?;
    let pages = Arc::new(pages);
    let mut sent = 0u64;
    loop {
        let frame = transfer::read(&mut recv, bs).await.map_err(stream_err("consistency check"))?;
        match frame {
            Some(TransferFrame::Message(TransferMessage::WantPages { nodes })) => {
                answer_pages(&mut send, &pages, root, nodes, bs).await?;
            }
            Some(TransferFrame::Message(TransferMessage::WantBlocks { indices })) if indices.is_empty() => {
                let end = TransferMessage::End { blocks_sent: sent, bytes_read: read };
                transfer::write_message(&mut send, &end, bs).await.map_err(stream_err("transfer stream"))?;
                let _ = send.shutdown().await;
                await_stored(&mut recv, bs).await?;
                return Ok((sent, read));
            }
            Some(TransferFrame::Message(TransferMessage::WantBlocks { indices })) => {
                if indices.len() > transfer::MAX_WANTED_PER_MESSAGE
                    || indices.windows(2).any(|w| w[0] >= w[1])
                    || indices.last().is_some_and(|&i| i >= blocks)
                {
                    return Err(Failure::other("the coordinator asked for blocks out of order or range"));
                }
                let (n, _) = stream_blocks(env, &mut send, disk, indices, false).await?;
                sent += n;
            }
            Some(TransferFrame::Message(TransferMessage::Failed { reason })) => {
                return Err(Failure::other(format!("the coordinator stopped the check: {reason}")))
            }
            other => return Err(Failure::other(format!("unexpected frame in a consistency check: {other:?}"))),
        }
    }
}

/// Answers a `WantPages` from the pages of `root`.
async fn answer_pages(
    send: &mut StreamSend,
    pages: &Arc<ScratchPages>,
    root: TreeRoot,
    nodes: Vec<(u8, u64)>,
    bs: usize,
) -> Result<(), Failure> {
    if nodes.len() > transfer::MAX_PAGES_PER_MESSAGE {
        return Err(Failure::other("the coordinator asked for too many pages at once"));
    }
    let p = pages.clone();
    let answer = blocking(move || {
        nodes
            .iter()
            .map(|&(level, index)| blockmap::node_entries(&*p, &root, level, index))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?
    .map_err(Failure::other)?;
    transfer::write_message(send, &TransferMessage::Pages { pages: answer }, bs)
        .await
        .map_err(stream_err("transfer stream"))
}

/// A recovery onto a VM of this host: mark it, write each disk's differing blocks, unmark.
/// A failure midway leaves the VM marked as being restored (never silently half-restored).
pub async fn restore(env: JobEnv, req: RestoreRequest) {
    let span = tracing::info_span!("restore", job_id = %req.job, vm = %req.vm);
    async move {
        let outcome = match execute_restore(&env, &req).await {
            Ok((bytes_read, bytes_written)) => {
                tracing::info!(bytes_read, bytes_written, "restored");
                JobOutcome::Restored { bytes_read, bytes_written, skipped: vec![] }
            }
            Err(f) => {
                tracing::warn!(reason = %f.reason, "restore failed");
                JobOutcome::Failed { kind: f.kind, reason: f.reason }
            }
        };
        let _ = env.out.send(AgentMessage::JobResult(JobResult { job: req.job, outcome })).await;
    }
    .instrument(span)
    .await
}

async fn execute_restore(env: &JobEnv, req: &RestoreRequest) -> Result<(u64, u64), Failure> {
    let vm = req.vm.as_str().to_owned();
    let bs = req.block_size as usize;
    bulwark_protocol::block::check_block_size(bs).map_err(Failure::other)?;
    // Before anything is written or made: the VM written is this coordinator's (a VM the
    // recovery makes is claimed for it now, so a name another coordinator owns is refused).
    check_claim(env, &vm, if req.create.is_some() { 0 } else { req.epoch }).await?;
    if req.instant {
        return execute_instant(env, req).await.map(|()| (0, 0));
    }
    {
        let (backend, host, vm, create, disks, config) = (
            env.backend.clone(),
            env.host.clone(),
            vm.clone(),
            req.create.clone(),
            req.disks.clone(),
            req.config.clone(),
        );
        let what = format!("recovery job {}", req.job);
        blocking(move || {
            backend.restore_begin(&vm, &host, &what, create.as_ref().map(|c| (c, disks.as_slice())), &config)
        })
        .await??;
    }
    let hasher = req.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
    let (mut read, mut written) = (0, 0);
    for d in &req.disks {
        let disk = Disk { vm: vm.clone(), name: d.name.as_str().to_owned(), block_size: bs, hasher: hasher.clone() };
        let (r, w) = restore_disk(env, req.job.0, &disk).await?;
        read += r;
        written += w;
    }
    let (backend, v) = (env.backend.clone(), vm.clone());
    blocking(move || backend.restore_finish(&v)).await??;
    Ok((read, written))
}

/// Instant recovery: the new VM's disks become overlays backed by exports this agent serves,
/// each reading its disk of the recovery point from the coordinator over an `Export` stream.
/// The exports outlive the job ([`JobEnv::exports`]).
async fn execute_instant(env: &JobEnv, req: &RestoreRequest) -> Result<(), Failure> {
    let vm = req.vm.as_str().to_owned();
    let new = req.create.clone().ok_or_else(|| Failure::other("an instant recovery must create its VM"))?;
    let sockets = {
        let (backend, vm, disks, config) = (env.backend.clone(), vm.clone(), req.disks.clone(), req.config.clone());
        let export = crate::backend::InstantExport {
            job: req.job.0,
            block_size: req.block_size,
            coordinator: env.coordinator.clone(),
        };
        blocking(move || backend.instant_begin(&vm, &new, &disks, &config, &export)).await??
    };
    if sockets.len() != req.disks.len() {
        return Err(Failure::other("the hypervisor answered a socket per disk wrongly"));
    }
    // The VM's exports so far; a failure midway stops them all.
    env.exports.insert(&vm, vec![]);
    let serve_all = async {
        for (d, socket) in req.disks.iter().zip(sockets) {
            let blocks = d.size_bytes.div_ceil(u64::from(req.block_size));
            let (mut send, recv) =
                (env.open_stream)().await.map_err(|e| Failure::other(format!("cannot open an export stream: {e}")))?;
            let open = TransferMessage::Open {
                job: req.job.0,
                disk: d.name.as_str().to_owned(),
                block_size: req.block_size,
                blocks,
                mode: TransferMode::Export,
            };
            transfer::write_message(&mut send, &open, req.block_size as usize)
                .await
                .map_err(stream_err("export stream"))?;
            // A coordinator or network failure pauses the VM's reads; they go on once the
            // agent is connected again.
            let disk =
                crate::backend::InstantDisk { name: d.name.as_str().to_owned(), size_bytes: d.size_bytes, socket };
            let task =
                crate::export::serve_instant_disk(&env.current, req.job.0, req.block_size, &disk, Some((send, recv)))
                    .map_err(Failure::other)?;
            env.exports.add(&vm, task);
        }
        Ok(())
    };
    let served = serve_all.await;
    if served.is_err() {
        // Nothing ran from it yet: the half-made VM goes, so the recovery can be asked again.
        env.exports.remove(&vm);
        let (backend, v) = (env.backend.clone(), vm.clone());
        let why = match blocking(move || backend.instant_abandon(&v)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.reason),
        };
        if let Some(why) = why {
            tracing::warn!(vm = %vm, error = %why, "cannot remove a failed instant recovery's VM");
        }
    }
    served
}

/// At start-up: serves again the exports of the instant recoveries the hypervisor still has
/// (the agent restarted under a running VM, whose QEMU waits for them to come back).
pub fn resume_instants(
    backend: &Arc<dyn Hypervisor>,
    exports: &crate::export::InstantExports,
    current: &crate::export::CurrentConnection,
    coordinator: &str,
    first: bool,
) {
    let states = match backend.instants() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "cannot read the instant recoveries to serve"),
    };
    // Each is served through the connection of the coordinator that made it (one from before
    // several coordinators, through the agent's first).
    let states = states.into_iter().filter(|st| match &st.coordinator {
        Some(c) => c == coordinator,
        None => first,
    });
    for st in states {
        let mut tasks = vec![];
        for d in &st.disks {
            match crate::export::serve_instant_disk(current, st.job, st.block_size, d, None) {
                Ok(t) => tasks.push(t),
                Err(e) => {
                    tracing::error!(vm = %st.vm, disk = %d.name, error = %e, "cannot serve an instant recovery's disk")
                }
            }
        }
        tracing::info!(vm = %st.vm, job_id = st.job, disks = tasks.len(), "serving an instant recovery again");
        exports.insert(&st.vm, tasks);
    }
}

/// `recover-finish`: the backend copies the rest of instant recovery `vm` into its overlays;
/// then its exports stop. Answered as the instant recovery job's result.
pub async fn instant_finish(
    backend: Option<Arc<dyn Hypervisor>>,
    exports: crate::export::InstantExports,
    out: mpsc::Sender<AgentMessage>,
    job: bulwark_protocol::JobId,
    vm: bulwark_protocol::VmId,
) {
    let name = vm.as_str().to_owned();
    let outcome = match backend {
        None => Err("this agent has no hypervisor configured".to_owned()),
        Some(b) => {
            let n = name.clone();
            match tokio::task::spawn_blocking(move || b.instant_finish(&n)).await {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let outcome = match outcome {
        Ok(bytes) => {
            let had = exports.remove(&name);
            tracing::info!(vm = %name, bytes, exports_stopped = had, "instant recovery finished");
            JobOutcome::Restored { bytes_read: bytes, bytes_written: bytes, skipped: vec![] }
        }
        Err(reason) => {
            tracing::warn!(vm = %name, %reason, "instant recovery not finished: the VM still reads from the recovery point");
            JobOutcome::Failed { kind: FailureKind::Other, reason }
        }
    };
    let _ = out.send(AgentMessage::JobResult(JobResult { job, outcome })).await;
}

async fn restore_disk(env: &JobEnv, job: u64, disk: &Disk) -> Result<(u64, u64), Failure> {
    let (mut send, mut recv, blocks) = open(env, job, disk, TransferMode::Restore).await?;
    let size = {
        let (backend, d) = (env.backend.clone(), disk.clone());
        blocking(move || backend.disk_size(&d.vm, &d.name)).await??
    };
    let (root, pages, read) = {
        let (backend, d, scratch) = (env.backend.clone(), disk.clone(), env.scratch.clone());
        blocking(move || hash_disk(&*backend, &d, blocks, &scratch, true)).await??
    };
    let bs = disk.block_size;
    transfer::write_message(&mut send, &TransferMessage::Root { root, bytes_read: read }, bs)
        .await
        .map_err(stream_err("transfer stream"))?;
    let pages = Arc::new(pages);
    let mut restore = crate::restore_disk::DiskRestore::new(size, bs as u64, disk.hasher.clone());
    // The writes go to a thread of their own, a few blocks behind the stream: receiving and
    // checking the next blocks overlaps writing the last ones. The restore is complete only
    // once the writer has written everything without an error.
    let (writes, mut to_write) = mpsc::channel::<(u64, crate::restore_disk::Unchecked)>(WRITE_QUEUE);
    let writer = {
        let (backend, d) = (env.backend.clone(), disk.clone());
        tokio::task::spawn_blocking(move || -> Result<(), Failure> {
            let mut target = backend.restore_writer(&d.vm, &d.name)?;
            while let Some((offset, block)) = to_write.blocking_recv() {
                // Checked here, beside the stream's reader: hashing every block was the largest
                // cost left on the task that also drives the connection.
                let data = block.check().map_err(Failure::other)?;
                target.write_at(offset, &data)?;
            }
            Ok(())
        })
    };
    let received = loop {
        let frame = transfer::read(&mut recv, bs).await.map_err(stream_err("restore"))?;
        let Some(frame) = frame else { return Err(Failure::other("unexpected frame in a restore: None")) };
        match restore.frame(frame).map_err(Failure::other)? {
            crate::restore_disk::Step::AnswerPages(nodes) => answer_pages(&mut send, &pages, root, nodes, bs).await?,
            crate::restore_disk::Step::Write { offset, block } => {
                if writes.send((offset, block)).await.is_err() {
                    // The writer stopped: its error says why.
                    break None;
                }
            }
            crate::restore_disk::Step::Done => break Some(restore.received()),
        }
    };
    drop(writes);
    writer.await.map_err(|e| Failure::other(format!("the restore's writer failed: {e}")))??;
    let received = received.ok_or_else(|| Failure::other("the restore's writer stopped"))?;
    let written = restore.written();
    transfer::write_message(&mut send, &TransferMessage::Stored { blocks: received }, bs)
        .await
        .map_err(stream_err("transfer stream"))?;
    let _ = send.shutdown().await;
    Ok((read, written))
}

/// Item-level recovery onto this host: open an `Items` stream and write what arrives under
/// `dest`, with every guest name and mode treated as hostile (`items_writer`). A write that
/// fails here (a full disk, say) is this job's reason: it goes out as the job's result, and the
/// coordinator prefers it to the broken stream it sees.
pub async fn items(
    open_stream: OpenStream,
    out: mpsc::Sender<AgentMessage>,
    job: bulwark_protocol::JobId,
    dest: String,
    opts: crate::items_writer::WriteOptions,
) {
    let span = tracing::info_span!("items", job_id = %job, %dest);
    async move {
        let r = async {
            if !dest.starts_with('/') {
                return Err(Failure::other(format!("destination {dest:?} is not an absolute path")));
            }
            let (mut send, mut recv) =
                open_stream().await.map_err(|e| Failure::other(format!("cannot open a transfer stream: {e}")))?;
            const CHUNK: usize = 1 << 20;
            let open = TransferMessage::Open {
                job: job.0,
                disk: String::new(),
                block_size: CHUNK as u32,
                blocks: 0,
                mode: TransferMode::Items,
            };
            transfer::write_message(&mut send, &open, CHUNK).await.map_err(stream_err("transfer stream"))?;
            let written = crate::items_writer::write_items(&mut recv, std::path::Path::new(&dest), opts).await;
            let w = match written {
                Ok(w) => w,
                Err(e) => {
                    let reason = format!("{e:#}");
                    // Tell the sender on the stream too, then stop reading it.
                    let failed = TransferMessage::Failed { reason: reason.clone() };
                    let _ = transfer::write_message(&mut send, &failed, CHUNK).await;
                    let _ = send.shutdown().await;
                    // Dropping the stream's reading half stops the sender.
                    drop(recv);
                    return Err(Failure::other(reason));
                }
            };
            transfer::write_message(&mut send, &TransferMessage::Stored { blocks: w.files }, CHUNK)
                .await
                .map_err(stream_err("transfer stream"))?;
            let _ = send.shutdown().await;
            tracing::info!(
                files = w.files,
                dirs = w.dirs,
                links = w.links,
                bytes = w.bytes,
                skipped = w.skipped_count,
                "items recovered"
            );
            Ok(w)
        }
        .await;
        let outcome = match r {
            Ok(w) => JobOutcome::Restored {
                bytes_read: 0,
                bytes_written: w.bytes,
                skipped: w.skipped_lines().into_iter().map(|l| cap(l, 256)).collect(),
            },
            Err(f) => {
                tracing::warn!(reason = %f.reason, "item recovery failed");
                JobOutcome::Failed { kind: f.kind, reason: f.reason }
            }
        };
        let _ = out.send(AgentMessage::JobResult(JobResult { job, outcome })).await;
    }
    .instrument(span)
    .await
}

/// `s` cut to at most `max` bytes (on a character boundary).
fn cap(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Reads every block of the snapshot (or, with `current`, of a VM being restored) and builds
/// its block map (pages in a scratch file).
fn hash_disk(
    backend: &dyn Hypervisor,
    disk: &Disk,
    blocks: u64,
    scratch: &std::path::Path,
    current: bool,
) -> Result<(TreeRoot, ScratchPages, u64), Failure> {
    std::fs::create_dir_all(scratch).map_err(|e| Failure::other(format!("{}: {e}", scratch.display())))?;
    let mut pages = ScratchPages::new(scratch, disk.hasher.clone())
        .map_err(|e| Failure::other(format!("scratch file in {}: {e}", scratch.display())))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Digest)>(4096);
    let (root, read) = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut sink = |b: crate::reader::ReadBlock<'_>| {
                if b.id != ZERO {
                    tx.send((b.index, b.id)).map_err(|_| "tree builder stopped".to_owned())?;
                }
                Ok(())
            };
            let all = (0..blocks).collect();
            if current {
                backend.read_current(&disk.vm, &disk.name, all, disk.block_size, &disk.hasher, &mut sink)
            } else {
                backend.read_blocks(&disk.vm, &disk.name, all, disk.block_size, &disk.hasher, &mut sink)
            }
        });
        let root = blockmap::update(&mut pages, None, blocks, rx.iter());
        let read = reader.join().map_err(|_| Failure::other("reader thread panicked"))?;
        Ok::<_, Failure>((root, read))
    })?;
    let stats = read?;
    let root = root.map_err(Failure::other)?;
    Ok((root, pages, stats.bytes_read))
}

/// Block-map pages in an anonymous scratch file, indexed in memory (one entry per page, a
/// 1,024th of the blocks).
pub struct ScratchPages {
    file: File,
    end: u64,
    index: HashMap<Digest, (u64, u32)>,
    hasher: ChunkHasher,
}

impl ScratchPages {
    pub fn new(dir: &std::path::Path, hasher: ChunkHasher) -> std::io::Result<Self> {
        Ok(Self { file: tempfile::tempfile_in(dir)?, end: 0, index: HashMap::new(), hasher })
    }
}

impl PageStore for ScratchPages {
    type Error = std::io::Error;
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, std::io::Error> {
        let &(offset, len) = self.index.get(id).ok_or_else(|| std::io::Error::other("page not in the scratch file"))?;
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    fn save_page(&mut self, bytes: &[u8], _: Option<(&Digest, &[u8])>) -> Result<Digest, std::io::Error> {
        let id = self.hasher.hash(bytes);
        if !self.index.contains_key(&id) {
            self.file.write_all_at(bytes, self.end)?;
            self.index.insert(id, (self.end, bytes.len() as u32));
            self.end += bytes.len() as u64;
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_vm_runs_one_job_at_a_time_and_other_vms_are_not_held_up() {
        let slots = VmSlots::default();
        let first = slots.acquire("web", SLOT_WAIT).await.map_err(|f| f.reason).unwrap();
        let other = slots.acquire("db", Duration::from_millis(1)).await;
        assert!(other.is_ok(), "another VM's slot is free");
        let busy = slots.acquire("web", Duration::from_millis(20)).await.err().map(|f| f.reason).unwrap_or_default();
        assert!(busy.contains("still being undone"), "{busy}");
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("web", SLOT_WAIT).await.is_ok() })
        };
        drop(first);
        assert!(waiting.await.unwrap(), "the slot passes on once the previous job lets go");
        drop(other);
        let _again = slots.acquire("db", Duration::from_millis(1)).await.map_err(|f| f.reason).unwrap();
        assert_eq!(slots.0.lock().unwrap().len(), 1, "idle slots are dropped");
    }
}
