//! A disk of a recovery point served for random reads on one stream: `bulwark mount` (an
//! admin stream) and an instant recovery's disks (an `Export` transfer stream of the agent of
//! the recovered VM's host). The reader sends [`MountRead`]s; each is read from the store on a blocking worker (several
//! at once, at most [`READS_AHEAD`]) and answered in order with its blocks as transfer frames.
//! The point's block map is held against GC for as long as the stream lives, so a point pruned
//! while mounted still reads whole.

use super::protect::rp_disk;
use super::State;
use crate::catalog::RpDisk;
use crate::items::disk::{Geometry, StoreBlocks};
use bulwark_protocol::block::ZERO;
use bulwark_protocol::frame;
use bulwark_protocol::messages::{AdminResponse, MountRead};
use bulwark_protocol::transfer::{self, TransferMessage};
use std::sync::Arc;
use tracing::Instrument as _;

/// Reads being served at once on one mount (each at most `MAX_MOUNT_READ_BYTES`).
pub const READS_AHEAD: usize = 4;

/// The blocks of one read, each as a transfer frame body.
type Bodies = Result<Vec<Vec<u8>>, String>;

/// Serves a mount until the console closes its side of the stream or goes away.
pub async fn mount(
    state: &Arc<State>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    vm: String,
    rp: String,
    disk: Option<String>,
) {
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let disk = match disk {
            Some(d) => d,
            None => only_disk(&store, &vm, &rp)?,
        };
        let (point, d) = rp_disk(store.catalog(), &vm, &rp, &disk)?;
        let hold = store.hold(d.root);
        // The point may have been pruned between the lookup and the hold (then a GC may
        // already have missed it): it must still be the catalog's.
        let still = store.catalog().recovery_points(&vm).map_err(|e| e.to_string())?.iter().any(|r| r.id == point.id);
        if !still {
            return Err(format!("recovery point {} of {vm} was just pruned", crate::store::hex(&point.id)));
        }
        Ok((point, d, hold))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (point, d, _hold) = match found {
        Ok(x) => x,
        Err(message) => {
            let _ = frame::write_message(send, &AdminResponse::Error { message }).await;
            return;
        }
    };
    let head = AdminResponse::DiskStream {
        rp: crate::store::hex(&point.id),
        disk: d.name.clone(),
        size_bytes: d.size_bytes,
        block_size: d.block_size,
    };
    if frame::write_message(send, &head).await.is_err() {
        return;
    }
    let span = tracing::info_span!("mount", rp = %crate::store::hex(&point.id), disk = %d.name);
    async {
        tracing::info!(size = d.size_bytes, "serving a recovery point's disk");
        let (served, reason) = serve_reads(state, send, recv, &d).await;
        tracing::info!(reads = served, ended = %reason, "mount ended");
    }
    .instrument(span)
    .await
}

/// The name of the point's only disk, or an error naming them all.
fn only_disk(store: &crate::store::Store, vm: &str, rp: &str) -> Result<String, String> {
    let point = super::protect::find_rp(store.catalog(), vm, rp)?;
    match point.disks.as_slice() {
        [d] => Ok(d.name.clone()),
        disks => {
            let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
            Err(format!(
                "recovery point {} of {vm} has {} disks ({}): name one with --disk",
                crate::store::hex(&point.id),
                disks.len(),
                names.join(", ")
            ))
        }
    }
}

/// Reads the console's requests and answers them in order; answers how many were served and
/// why it ended.
async fn serve_reads(
    state: &Arc<State>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    d: &RpDisk,
) -> (u64, String) {
    let geometry = Geometry { block_size: d.block_size, disk_size: d.size_bytes };
    let bs = d.block_size as usize;
    // Reads in flight, oldest first: the reader side queues them, the writer side answers.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::task::JoinHandle<Bodies>>(READS_AHEAD);
    let store = state.store.clone();
    let root = d.root;
    let reader = async move {
        loop {
            let read: MountRead = match frame::read_message(recv).await {
                Ok(Some(r)) => r,
                Ok(None) => return "the console closed the mount".to_string(),
                Err(e) => return format!("the console's request broke off: {e}"),
            };
            if !read.fits(geometry.blocks(), geometry.block_size) {
                // Answered in order as a failure; the stream ends after it.
                let bad = format!(
                    "a read of {} block(s) from block {} is outside the disk or too long",
                    read.count, read.first
                );
                let _ = tx.send(tokio::spawn(async move { Err(bad) })).await;
                return "the console asked for a read outside the disk".to_string();
            }
            let store = store.clone();
            let job = tokio::task::spawn_blocking(move || read_blocks(store, root, geometry, read));
            if tx.send(job).await.is_err() {
                return "the answers stopped".to_string();
            }
        }
    };
    let writer = async {
        let mut served = 0u64;
        while let Some(job) = rx.recv().await {
            let bodies = job.await.map_err(|e| e.to_string()).and_then(|r| r);
            match bodies {
                Ok(bodies) => {
                    for body in bodies {
                        if let Err(e) = transfer::write_body(send, &body, bs).await {
                            return (served, format!("the console went away: {e}"));
                        }
                    }
                    served += 1;
                }
                Err(reason) => {
                    tracing::warn!(%reason, "a mount read failed");
                    let _ =
                        transfer::write_message(send, &TransferMessage::Failed { reason: reason.clone() }, bs).await;
                    return (served, reason);
                }
            }
        }
        (served, String::new())
    };
    let (why, (served, broke)) = tokio::join!(reader, writer);
    let _ = send.finish();
    (served, if broke.is_empty() { why } else { broke })
}

/// One read from the store: every block checked against its id by the store (a bad chunk
/// fails the read, never answers wrong bytes).
fn read_blocks(
    store: Arc<crate::store::Store>,
    root: bulwark_protocol::blockmap::TreeRoot,
    g: Geometry,
    r: MountRead,
) -> Bodies {
    let mut source = StoreBlocks::new(store, root, g);
    let mut bodies = Vec::with_capacity(r.count as usize);
    for index in r.first..r.first + u64::from(r.count) {
        let (id, data) = source.read_block_with_id(index).map_err(|e| format!("block {index}: {e}"))?;
        bodies.push(if id == ZERO { transfer::zero_body(index) } else { transfer::block_body(index, &id, &data) });
    }
    Ok(bodies)
}

/// The disk an agent's `Export` stream asks for: of an active instant recovery whose job is
/// `job`, on `host`, with the geometry the agent announced. Anything else is refused.
pub fn instant_disk(
    catalog: &crate::catalog::Catalog,
    job: u64,
    host: &str,
    disk: &str,
    block_size: u32,
    blocks: u64,
) -> Result<RpDisk, String> {
    let refused = || format!("job {job} is no active instant recovery on {host}");
    // Few and bounded (the coordinator refuses more than MAX_ACTIVE_INSTANTS).
    let active = catalog.active_instants(crate::store::MAX_ACTIVE_INSTANTS).map_err(|e| e.to_string())?;
    let r = active.into_iter().find(|r| r.job == Some(job) && r.host == host).ok_or_else(refused)?;
    let d = r
        .disks
        .into_iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| format!("the instant recovery of job {job} has no disk {disk}"))?;
    let want = d.size_bytes.div_ceil(u64::from(d.block_size));
    if d.block_size != block_size || blocks != want {
        return Err(format!("disk {disk} is {want} blocks of {} bytes, not {blocks} of {block_size}", d.block_size));
    }
    Ok(d)
}

/// Serves an instant recovery's disk on an agent's stream until the agent closes it.
pub async fn serve_instant(state: &Arc<State>, mut send: quinn::SendStream, mut recv: quinn::RecvStream, d: RpDisk) {
    let span = tracing::info_span!("instant", disk = %d.name);
    async {
        tracing::info!(size = d.size_bytes, "serving an instant recovery's disk");
        let (served, reason) = serve_reads(state, &mut send, &mut recv, &d).await;
        tracing::info!(reads = served, ended = %reason, "instant recovery stream ended");
    }
    .instrument(span)
    .await
}
