//! The ingest worker: one blocking thread per job that owns the job's store ingest (so
//! everything the job writes is pinned against GC until it commits), applies each disk's
//! blocks to its tree, and finally commits the replicas — with a recovery point or without —
//! in one durable catalog transaction. The async side feeds it through a small bounded
//! channel, so a slow disk slows the QUIC stream, never fills memory.

use crate::catalog::{RecoveryPointRecord, ReplicaRecord};
use crate::store::{NewRecoveryPoint, Store};
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap::TreeRoot;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Changes applied to a tree at a time: bounds the worker's memory whatever the disk size.
const CHANGES_PER_UPDATE: usize = 64 * 1024;

/// What the worker is told.
pub enum Cmd {
    /// The next disk: `blocks` blocks on top of `old` (None: an empty tree).
    BeginDisk {
        blocks: u64,
        old: Option<TreeRoot>,
    },
    Block {
        index: u64,
        id: Digest,
        data: Vec<u8>,
    },
    Zero {
        index: u64,
    },
    /// The disk is complete: answers its new root and how many blocks changed.
    EndDisk {
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
            if let Err(e) = work(&store, rx) {
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

    /// Ends the current disk.
    pub async fn end_disk(&self) -> Result<(TreeRoot, u64), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::EndDisk { reply }).await?;
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

struct DiskState {
    blocks: u64,
    root: Option<TreeRoot>,
    changes: Vec<(u64, Digest)>,
    last: Option<u64>,
    changed: u64,
}

fn work(store: &Store, mut rx: mpsc::Receiver<Cmd>) -> Result<(), String> {
    let mut ingest = store.begin();
    let mut disk: Option<DiskState> = None;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::BeginDisk { blocks, old } => {
                let old = old.filter(|r| r.blocks == blocks);
                disk = Some(DiskState { blocks, root: old, changes: vec![], last: None, changed: 0 });
            }
            Cmd::Block { index, id, data } => {
                let d = disk.as_mut().ok_or("a block before its disk")?;
                check_order(d, index)?;
                let leaf = ingest.put_block(&id, &data).map_err(|e| format!("block {index}: {e}"))?;
                d.changes.push((index, leaf));
                d.changed += 1;
            }
            Cmd::Zero { index } => {
                let d = disk.as_mut().ok_or("a block before its disk")?;
                check_order(d, index)?;
                d.changes.push((index, ZERO));
                d.changed += 1;
            }
            Cmd::EndDisk { reply } => {
                let r = (|| {
                    let mut d = disk.take().ok_or("no disk to end")?;
                    flush(&mut ingest, &mut d)?;
                    let root = match d.root {
                        Some(r) => r,
                        None => ingest.update_tree(None, d.blocks, std::iter::empty()).map_err(|e| e.to_string())?,
                    };
                    Ok((root, d.changed))
                })();
                let failed = r.as_ref().err().cloned();
                let _ = reply.send(r);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            Cmd::Commit { replicas, rp, reply } => {
                let r = match rp {
                    Some(rp) => store.commit_recovery_point(ingest, rp, replicas).map(Some),
                    None => store.commit_replicas(ingest, replicas).map(|()| None),
                }
                .map_err(|e| e.to_string());
                let _ = reply.send(r);
                return Ok(());
            }
        }
        if let Some(d) = disk.as_mut() {
            if d.changes.len() >= CHANGES_PER_UPDATE {
                flush(&mut ingest, d)?;
            }
        }
    }
    Ok(())
}

fn check_order(d: &mut DiskState, index: u64) -> Result<(), String> {
    if index >= d.blocks {
        return Err(format!("block {index} is past the end of the disk ({} blocks)", d.blocks));
    }
    if d.last.is_some_and(|l| index <= l) {
        return Err(format!("block {index} arrived out of order"));
    }
    d.last = Some(index);
    Ok(())
}

fn flush(ingest: &mut crate::store::Ingest<'_>, d: &mut DiskState) -> Result<(), String> {
    if d.changes.is_empty() {
        return Ok(());
    }
    let root = ingest.update_tree(d.root.as_ref(), d.blocks, d.changes.drain(..)).map_err(|e| e.to_string())?;
    d.root = Some(root);
    Ok(())
}
