//! The ingest worker: one blocking thread per job that owns the job's store ingest (so
//! everything the job writes is pinned against GC until it commits), applies each disk's
//! blocks to its tree, and finally commits the replicas — with a recovery point or without —
//! in one durable catalog transaction. The async side feeds it through a small bounded
//! channel, so a slow disk slows the QUIC stream, never fills memory.

use crate::catalog::{RecoveryPointRecord, ReplicaRecord};
use crate::store::{Ingest, NewRecoveryPoint, Store};
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

fn work(store: &Store, mut rx: mpsc::Receiver<Cmd>) -> Result<(), String> {
    let mut ingest = store.begin();
    let mut disk: Option<DiskIngest> = None;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::BeginDisk { blocks, old } => disk = Some(DiskIngest::new(blocks, old)),
            Cmd::Block { index, id, data } => {
                disk.as_mut().ok_or("a block before its disk")?.block(&mut ingest, index, &id, &data)?;
            }
            Cmd::Zero { index } => disk.as_mut().ok_or("a block before its disk")?.zero(&mut ingest, index)?,
            Cmd::EndDisk { reply } => {
                let r = match disk.take() {
                    Some(d) => d.end(&mut ingest),
                    None => Err("no disk to end".into()),
                };
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
    }
    Ok(())
}
