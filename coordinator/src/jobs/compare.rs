//! The coordinator's half of a consistency check (DESIGN §3): the agent hashed its snapshot
//! into a block map of the same shape as the replica's; the trees are compared top-down, one
//! level per round trip, descending only into entries that differ; then exactly the leaves
//! that differ move — zero leaves without data — together with every block whose stored
//! chunk verify found bad, even where the digests agree. The check ends only when the
//! repaired replica's root equals the source's.

use crate::catalog::JobRecord;
use crate::jobs::ingest::{Cmd, IngestHandle};
use crate::jobs::machine::DiskDone;
use crate::jobs::{JobContext, TransferStream};
use crate::store::{Store, StorePages};
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap::{self, Comparison, Diff, TreeRoot};
use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage, MAX_PAGES_PER_MESSAGE, MAX_WANTED_PER_MESSAGE};
use std::collections::HashSet;
use std::sync::Arc;

enum CompareError {
    /// Our own tree could not be read: compare against an empty one instead.
    OurTree(String),
    Other(String),
}

impl From<String> for CompareError {
    fn from(s: String) -> Self {
        CompareError::Other(s)
    }
}

async fn read_frame(s: &mut TransferStream) -> Result<TransferFrame, String> {
    match transfer::read(&mut s.recv, s.block_size as usize).await.map_err(|e| e.to_string())? {
        Some(TransferFrame::Message(TransferMessage::Failed { reason })) => {
            Err(format!("the agent gave up: {}", bulwark_protocol::text::cap_reason(reason)))
        }
        Some(f) => Ok(f),
        None => Err("the agent closed the stream in the middle of the check".into()),
    }
}

async fn say(s: &mut TransferStream, msg: &TransferMessage) -> Result<(), String> {
    transfer::write_message(&mut s.send, msg, s.block_size as usize).await.map_err(|e| e.to_string())
}

/// Runs the check of one disk; answers the repaired root.
pub async fn run(
    ctx: &Arc<JobContext>,
    ingest: &IngestHandle,
    s: &mut TransferStream,
    blocks: u64,
    old: Option<TreeRoot>,
    job: &mut JobRecord,
) -> Result<DiskDone, String> {
    let (theirs, bytes_read) = match read_frame(s).await? {
        TransferFrame::Message(TransferMessage::Root { root, bytes_read }) => (root, bytes_read),
        other => return Err(format!("expected the snapshot's root, got {other:?}")),
    };
    if theirs.blocks != blocks || theirs.levels != blockmap::levels_for(blocks) {
        return Err(format!(
            "the source's tree has {} blocks in {} levels, expected {blocks}",
            theirs.blocks, theirs.levels
        ));
    }
    job.bytes_scanned += bytes_read;
    let store = ctx.store.clone();
    let mut base = old;
    let mut diff = match compare_trees(&store, s, base, &theirs).await {
        Ok(d) => d,
        Err(CompareError::OurTree(e)) => {
            tracing::warn!(error = %e, "the replica's block map is unreadable: rebuilding it from the source");
            base = None;
            match compare_trees(&store, s, None, &theirs).await {
                Ok(d) => d,
                Err(CompareError::OurTree(e) | CompareError::Other(e)) => return Err(e),
            }
        }
        Err(CompareError::Other(e)) => return Err(e),
    };
    if let Some(b) = base {
        let st = store.clone();
        let bad = tokio::task::spawn_blocking(move || bad_leaves(&st, &b)).await.map_err(|e| e.to_string())??;
        if !bad.is_empty() {
            tracing::info!(blocks = bad.len(), "re-fetching blocks whose stored chunks verify found bad");
            diff.fetch.extend(bad);
            diff.fetch.sort_unstable();
            diff.fetch.dedup();
        }
    }
    tracing::info!(fetch = diff.fetch.len(), zeros = diff.zeros.len(), "trees compared");

    ingest.send(Cmd::BeginDisk { blocks, old: base }).await?;
    let mut zeros = diff.zeros.iter().copied().peekable();
    for batch in diff.fetch.chunks(MAX_WANTED_PER_MESSAGE) {
        say(s, &TransferMessage::WantBlocks { indices: batch.to_vec() }).await?;
        for &want in batch {
            while let Some(z) = zeros.next_if(|&z| z < want) {
                ingest.send(Cmd::Zero { index: z }).await?;
            }
            match read_frame(s).await? {
                TransferFrame::Block { index, id, data } if index == want => {
                    job.bytes_transferred += data.len() as u64;
                    ingest.send(Cmd::Block { index, id, data }).await?;
                }
                TransferFrame::Zero { index } if index == want => ingest.send(Cmd::Zero { index }).await?,
                other => return Err(format!("expected block {want}, got {other:?}")),
            }
        }
    }
    for z in zeros {
        ingest.send(Cmd::Zero { index: z }).await?;
    }
    say(s, &TransferMessage::WantBlocks { indices: vec![] }).await?;
    match read_frame(s).await? {
        TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) if blocks_sent == diff.fetch.len() as u64 => {}
        other => return Err(format!("expected the end of {} blocks, got {other:?}", diff.fetch.len())),
    }
    let (root, changed) = ingest.end_disk().await?;
    if root.digest != theirs.digest {
        return Err(
            "after the check the replica still differs from the source (the source changed under its snapshot?)".into(),
        );
    }
    Ok(DiskDone { root, changed })
}

/// Top-down comparison of our tree `base` with the agent's `theirs`: the walker of
/// `blockmap` says which pages to ask for, the agent answers its entries, the store ours.
async fn compare_trees(
    store: &Arc<Store>,
    s: &mut TransferStream,
    base: Option<TreeRoot>,
    theirs: &TreeRoot,
) -> Result<Diff, CompareError> {
    let blocks = theirs.blocks;
    let mut walk = Comparison::new(theirs, base.map(|b| b.digest));
    loop {
        let nodes = walk.ask(MAX_PAGES_PER_MESSAGE).to_vec();
        if nodes.is_empty() {
            return Ok(walk.into_diff());
        }
        say(s, &TransferMessage::WantPages { nodes: nodes.clone() }).await?;
        let pages = match read_frame(s).await? {
            TransferFrame::Message(TransferMessage::Pages { pages }) => pages,
            other => return Err(CompareError::Other(format!("expected {} pages, got {other:?}", nodes.len()))),
        };
        let ours = {
            let st = store.clone();
            tokio::task::spawn_blocking(move || our_entries(&st, base.as_ref(), blocks, &nodes))
                .await
                .map_err(|e| CompareError::Other(e.to_string()))?
                .map_err(CompareError::OurTree)?
        };
        walk.feed(&pages, &ours).map_err(|e| CompareError::Other(format!("the source's tree: {e}")))?;
    }
}

/// Our entries of each node (zeros where we have no tree).
fn our_entries(
    store: &Store,
    base: Option<&TreeRoot>,
    blocks: u64,
    nodes: &[(u8, u64)],
) -> Result<Vec<Vec<Digest>>, String> {
    nodes
        .iter()
        .map(|&(level, index)| match base {
            Some(b) => blockmap::node_entries(&StorePages(store), b, level, index).map_err(|e| e.to_string()),
            None => Ok(vec![ZERO; blockmap::entries_of(level, index, blocks)]),
        })
        .collect()
}

/// Leaves of `root` whose chunk verify recorded as bad.
fn bad_leaves(store: &Store, root: &TreeRoot) -> Result<Vec<u64>, String> {
    let bad: HashSet<Digest> =
        store.catalog().bad_chunks().map_err(|e| e.to_string())?.into_iter().map(|b| b.id).collect();
    if bad.is_empty() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    blockmap::for_each_leaf(&StorePages(store), root, |i, id| {
        if bad.contains(&id) {
            out.push(i);
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A recovery of one disk: the agent's tree is the VM's current disk, ours the recovery
/// point's; every leaf that differs is written with the recovery point's content (zeros
/// without data). A smart restore: a disk that diverged by 1 % gets ~1 % written.
pub async fn restore(
    ctx: &Arc<JobContext>,
    s: &mut TransferStream,
    rp_root: TreeRoot,
    job: &mut JobRecord,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<(), String> {
    let mut throttle = crate::throttle::Throttle::for_options(options);
    let (theirs, bytes_read) = match read_frame(s).await? {
        TransferFrame::Message(TransferMessage::Root { root, bytes_read }) => (root, bytes_read),
        other => return Err(format!("expected the disk's root, got {other:?}")),
    };
    if theirs.blocks != rp_root.blocks || theirs.levels != rp_root.levels {
        return Err(format!("the target disk has {} blocks, the recovery point {}", theirs.blocks, rp_root.blocks));
    }
    job.bytes_scanned += bytes_read;
    let store = ctx.store.clone();
    let diff = match compare_trees(&store, s, Some(rp_root), &theirs).await {
        Ok(d) => d,
        Err(CompareError::OurTree(e)) => return Err(format!("the recovery point cannot be read: {e}")),
        Err(CompareError::Other(e)) => return Err(e),
    };
    let mut want: Vec<u64> = diff.fetch.into_iter().chain(diff.zeros).collect();
    want.sort_unstable();
    want.dedup();
    tracing::info!(blocks = want.len(), "blocks differ from the recovery point");
    job.bytes_total = Some(job.bytes_total.unwrap_or(0) + want.len() as u64 * u64::from(s.block_size));
    let mut saved = std::time::Instant::now();
    let bs = s.block_size as usize;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(4);
    let count = want.len() as u64;
    let reader = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut next = want.iter().copied().peekable();
            blockmap::for_each_leaf(&StorePages(&store), &rp_root, |i, id| {
                if next.next_if_eq(&i).is_none() {
                    return Ok(());
                }
                let frame = if id == ZERO {
                    (transfer::zero_body(i), 0)
                } else {
                    let data = store.read_chunk(&id)?;
                    let n = data.len() as u64;
                    (transfer::block_body(i, &id, &data), n)
                };
                tx.blocking_send(frame)
                    .map_err(|_| crate::store::StoreError::BlockMap("the restore stream closed".into()))
            })
            .map_err(|e| e.to_string())
        })
    };
    let mut sent = 0u64;
    while let Some((body, n)) = rx.recv().await {
        crate::throttle::pace(&mut throttle, body.len() as u64).await;
        transfer::write_body(&mut s.send, &body, bs).await.map_err(|e| e.to_string())?;
        sent += 1;
        job.bytes_transferred += n;
        if saved.elapsed() >= std::time::Duration::from_secs(1) {
            saved = std::time::Instant::now();
            let _ = ctx.catalog().put_job(job);
        }
    }
    reader.await.map_err(|e| e.to_string())??;
    if sent != count {
        return Err(format!("{sent} of {count} differing blocks were read from the recovery point"));
    }
    say(s, &TransferMessage::End { blocks_sent: sent, bytes_read: 0 }).await?;
    match read_frame(s).await? {
        TransferFrame::Message(TransferMessage::Stored { .. }) => {}
        other => return Err(format!("expected the agent's confirmation, got {other:?}")),
    }
    job.blocks_changed += sent;
    Ok(())
}
