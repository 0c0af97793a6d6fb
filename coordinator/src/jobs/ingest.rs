//! The ingest worker of a job: a blocking thread that owns the job's store ingest (so
//! everything the job writes is pinned against GC until it commits) and, for each disk being
//! received, a thread of its own that checks, stores and applies that disk's blocks to its
//! tree under an ingest of its own. The disks of one job are received at once (up to
//! [`MAX_DISKS_AT_ONCE`]); the commit takes every disk's ingest over and writes the replicas —
//! with a recovery point or without — in one durable catalog transaction. The async side feeds
//! it through small bounded channels, so a slow disk slows its QUIC stream, never fills memory.

use crate::catalog::{RecoveryPointRecord, ReplicaRecord};
use crate::store::{Ingest, NewRecoveryPoint, Store};
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap::TreeRoot;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Changes applied to a tree at a time: bounds the worker's memory whatever the disk size.
const CHANGES_PER_UPDATE: usize = 64 * 1024;

/// The most disks of one job received at once (each is a thread): `[jobs] disks_in_parallel`
/// is capped at it.
pub const MAX_DISKS_AT_ONCE: usize = bulwark_protocol::messages::MAX_PARALLEL_DISKS as usize;

/// Commands queued to one disk's thread: with a block's size, bounds what waits in memory.
const DISK_QUEUE: usize = 16;

/// Which of the job's disks a command is about (the driver's numbering, e.g. its index in
/// the job's disk list).
pub type Slot = usize;

/// What the worker is told.
pub enum Cmd {
    /// Disk `slot` begins: `blocks` blocks on top of `old` (None: an empty tree).
    BeginDisk {
        slot: Slot,
        blocks: u64,
        old: Option<TreeRoot>,
    },
    Block {
        slot: Slot,
        index: u64,
        id: Digest,
        data: Vec<u8>,
    },
    Zero {
        slot: Slot,
        index: u64,
    },
    /// Disk `slot` is complete: answers its new root and how many blocks changed.
    EndDisk {
        slot: Slot,
        reply: oneshot::Sender<Result<(TreeRoot, u64), String>>,
    },
    /// Commit the replicas (and the recovery point, if any).
    Commit {
        replicas: Vec<ReplicaRecord>,
        rp: Option<NewRecoveryPoint>,
        reply: oneshot::Sender<Result<Option<RecoveryPointRecord>, String>>,
    },
}

/// The async side's handle on a job's worker.
pub struct IngestHandle {
    tx: mpsc::Sender<Cmd>,
    failure: Arc<Mutex<Option<String>>>,
}

impl IngestHandle {
    /// Starts the worker of a job.
    pub fn start(store: Arc<Store>, job: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        let failure = Arc::new(Mutex::new(None));
        let f = failure.clone();
        let span = tracing::Span::current();
        // Detached: dropping the handle closes the channel and the worker ends; what it wrote
        // without committing stays pinned until then and is garbage for the next GC.
        std::thread::Builder::new().name(format!("ingest-{job}")).spawn(move || {
            let _g = span.enter();
            if let Err(e) = work(&store, job, rx) {
                tracing::warn!(error = %e, "ingest failed");
                *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        })?;
        Ok(Self { tx, failure })
    }

    /// Sends a command; if the worker has stopped, answers why.
    pub async fn send(&self, cmd: Cmd) -> Result<(), String> {
        if self.tx.send(cmd).await.is_err() {
            return Err(self.failure().unwrap_or_else(|| "the ingest worker stopped".into()));
        }
        Ok(())
    }

    /// Why the worker stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends disk `slot`.
    pub async fn end_disk(&self, slot: Slot) -> Result<(TreeRoot, u64), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::EndDisk { slot, reply }).await?;
        rx.await.map_err(|_| self.failure().unwrap_or_else(|| "the ingest worker stopped".into()))?
    }

    /// Commits.
    pub async fn commit(
        &self,
        replicas: Vec<ReplicaRecord>,
        rp: Option<NewRecoveryPoint>,
    ) -> Result<Option<RecoveryPointRecord>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Commit { replicas, rp, reply }).await?;
        rx.await.map_err(|_| self.failure().unwrap_or_else(|| "the ingest worker stopped".into()))?
    }
}

/// One disk's blocks applied to its tree in bounded steps: the worker's (and the
/// simulation's) plain part. Blocks must come in increasing order, inside the disk.
#[derive(Debug)]
pub struct DiskIngest {
    blocks: u64,
    root: Option<TreeRoot>,
    changes: Vec<(u64, Digest)>,
    last: Option<u64>,
    changed: u64,
}

impl DiskIngest {
    /// A disk of `blocks` blocks on top of `old` (None, or a tree of another size: empty).
    pub fn new(blocks: u64, old: Option<TreeRoot>) -> Self {
        let root = old.filter(|r| r.blocks == blocks);
        Self { blocks, root, changes: vec![], last: None, changed: 0 }
    }

    /// Stores a block that arrived under `id` (checked) as block `index`.
    pub fn block(&mut self, ingest: &mut Ingest<'_>, index: u64, id: &Digest, data: &[u8]) -> Result<(), String> {
        self.check_order(index)?;
        let leaf = ingest.put_block(id, data).map_err(|e| format!("block {index}: {e}"))?;
        self.change(ingest, index, leaf)
    }

    /// Block `index` is all zero.
    pub fn zero(&mut self, ingest: &mut Ingest<'_>, index: u64) -> Result<(), String> {
        self.check_order(index)?;
        self.change(ingest, index, ZERO)
    }

    fn change(&mut self, ingest: &mut Ingest<'_>, index: u64, leaf: Digest) -> Result<(), String> {
        self.changes.push((index, leaf));
        self.changed += 1;
        if self.changes.len() >= CHANGES_PER_UPDATE {
            self.flush(ingest)?;
        }
        Ok(())
    }

    /// The disk is complete: its new root and how many blocks changed.
    pub fn end(mut self, ingest: &mut Ingest<'_>) -> Result<(TreeRoot, u64), String> {
        self.flush(ingest)?;
        let root = match self.root {
            Some(r) => r,
            None => ingest.update_tree(None, self.blocks, std::iter::empty()).map_err(|e| e.to_string())?,
        };
        Ok((root, self.changed))
    }

    fn check_order(&mut self, index: u64) -> Result<(), String> {
        if index >= self.blocks {
            return Err(format!("block {index} is past the end of the disk ({} blocks)", self.blocks));
        }
        if self.last.is_some_and(|l| index <= l) {
            return Err(format!("block {index} arrived out of order"));
        }
        self.last = Some(index);
        Ok(())
    }

    fn flush(&mut self, ingest: &mut Ingest<'_>) -> Result<(), String> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let root =
            ingest.update_tree(self.root.as_ref(), self.blocks, self.changes.drain(..)).map_err(|e| e.to_string())?;
        self.root = Some(root);
        Ok(())
    }
}

/// What one disk's thread is told.
enum DiskCmd {
    Block { index: u64, id: Digest, data: Vec<u8> },
    Zero { index: u64 },
    End { reply: oneshot::Sender<Result<(TreeRoot, u64), String>> },
}

type DiskThread<'scope, 's> = std::thread::ScopedJoinHandle<'scope, Result<Ingest<'s>, String>>;

/// Why a disk's thread stopped: its error, or that it ended without one.
fn disk_stopped(handle: DiskThread<'_, '_>) -> String {
    match handle.join() {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => "a disk's ingest ended before its last block".into(),
        Err(_) => "a disk's ingest thread panicked".into(),
    }
}

fn work(store: &Store, job: u64, mut rx: mpsc::Receiver<Cmd>) -> Result<(), String> {
    std::thread::scope(|scope| {
        let mut ingest = store.begin();
        let mut open: HashMap<Slot, (std::sync::mpsc::SyncSender<DiskCmd>, DiskThread<'_, '_>)> = HashMap::new();
        let mut ended: Vec<DiskThread<'_, '_>> = vec![];
        let span = tracing::Span::current();
        while let Some(cmd) = rx.blocking_recv() {
            let (slot, cmd) = match cmd {
                Cmd::BeginDisk { slot, blocks, old } => {
                    if open.contains_key(&slot) {
                        return Err(format!("disk {slot} began twice"));
                    }
                    if open.len() >= MAX_DISKS_AT_ONCE {
                        return Err(format!("more than {MAX_DISKS_AT_ONCE} disks at once"));
                    }
                    let (tx, disk_rx) = std::sync::mpsc::sync_channel(DISK_QUEUE);
                    let span = span.clone();
                    let handle = std::thread::Builder::new()
                        .name(format!("ingest-{job}-{slot}"))
                        .spawn_scoped(scope, move || {
                            let _g = span.enter();
                            disk_worker(store, blocks, old, disk_rx)
                        })
                        .map_err(|e| format!("cannot start a disk's ingest: {e}"))?;
                    open.insert(slot, (tx, handle));
                    continue;
                }
                Cmd::Block { slot, index, id, data } => (slot, DiskCmd::Block { index, id, data }),
                Cmd::Zero { slot, index } => (slot, DiskCmd::Zero { index }),
                Cmd::EndDisk { slot, reply } => {
                    let Some((tx, handle)) = open.remove(&slot) else {
                        let _ = reply.send(Err(format!("no disk {slot} to end")));
                        return Err(format!("no disk {slot} to end"));
                    };
                    if let Err(std::sync::mpsc::SendError(DiskCmd::End { reply })) = tx.send(DiskCmd::End { reply }) {
                        let why = disk_stopped(handle);
                        let _ = reply.send(Err(why.clone()));
                        return Err(why);
                    }
                    ended.push(handle);
                    continue;
                }
                Cmd::Commit { replicas, rp, reply } => {
                    // Every disk's thread has ended or is told to now (a disk never ended
                    // is not in the commit's replicas; what it wrote is garbage).
                    open.clear();
                    for handle in ended.drain(..) {
                        match handle.join() {
                            Ok(Ok(disk)) => ingest.absorb(disk),
                            Ok(Err(e)) => {
                                let _ = reply.send(Err(e.clone()));
                                return Err(e);
                            }
                            Err(_) => {
                                let why = "a disk's ingest thread panicked".to_owned();
                                let _ = reply.send(Err(why.clone()));
                                return Err(why);
                            }
                        }
                    }
                    let r = match rp {
                        Some(rp) => store.commit_recovery_point(ingest, rp, replicas).map(Some),
                        None => store.commit_replicas(ingest, replicas).map(|()| None),
                    }
                    .map_err(|e| e.to_string());
                    let _ = reply.send(r);
                    return Ok(());
                }
            };
            let Some((tx, _)) = open.get(&slot) else { return Err(format!("a block of disk {slot} before it began")) };
            if tx.send(cmd).is_err() {
                let Some((_, handle)) = open.remove(&slot) else { return Err("internal: a disk lost".into()) };
                return Err(disk_stopped(handle));
            }
        }
        Ok(())
    })
}

/// One disk's thread: stores its blocks under an ingest of its own; answers it at the end.
fn disk_worker<'s>(
    store: &'s Store,
    blocks: u64,
    old: Option<TreeRoot>,
    rx: std::sync::mpsc::Receiver<DiskCmd>,
) -> Result<Ingest<'s>, String> {
    let mut ingest = store.begin();
    let mut disk = DiskIngest::new(blocks, old);
    for cmd in rx {
        match cmd {
            DiskCmd::Block { index, id, data } => disk.block(&mut ingest, index, &id, &data)?,
            DiskCmd::Zero { index } => disk.zero(&mut ingest, index)?,
            DiskCmd::End { reply } => {
                let r = disk.end(&mut ingest);
                let failed = r.as_ref().err().cloned();
                let _ = reply.send(r);
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(ingest),
                };
            }
        }
    }
    Err("the disk's transfer stopped before its end".into())
}
