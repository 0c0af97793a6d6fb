//! The coordinator's halves of a consistency check and of a disk's recovery, as plain code
//! ([`Check`], [`RestoreDisk`]) with thin async drivers ([`run`], [`restore`]).
//!
//! A consistency check (DESIGN §3): the agent hashed its snapshot
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

async fn say(s: &mut TransferStream, msg: &TransferMessage) -> Result<(), String> {
    transfer::write_message(&mut s.send, msg, s.block_size as usize).await.map_err(|e| e.to_string())
}

/// What a [`Check`] asks its driver to do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckStep {
    /// Send this to the agent.
    Say(TransferMessage),
    /// Our tree's entries of these nodes are needed: answer [`Check::ours`], or
    /// [`Check::our_tree_unreadable`] when our tree cannot be read.
    Ours(Vec<(u8, u64)>),
    /// The leaves of our tree whose chunks verify found bad are needed: answer
    /// [`Check::bad_leaves`].
    BadLeaves,
    /// The agent read this many bytes of its snapshot.
    Scanned(u64),
    /// Start storing the disk's repaired tree on top of `old`.
    Begin {
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
    /// Every differing leaf is stored: end the disk and answer its root with [`Check::stored`].
    EndDisk,
}

#[derive(Debug)]
enum CheckState {
    /// Waiting for the agent's root.
    Root,
    /// Comparing: the agent's pages of the nodes asked are in `theirs` once they arrive.
    Comparing {
        theirs: TreeRoot,
        walk: Comparison,
        pages: Option<Vec<Vec<Digest>>>,
    },
    /// Waiting for the bad leaves.
    Bad {
        theirs: TreeRoot,
        diff: Diff,
    },
    /// Receiving the leaves asked for, `fetch[pos]` next; `batch_end` ends the current ask.
    Fetching {
        theirs: TreeRoot,
        diff: Diff,
        pos: usize,
        zpos: usize,
        batch_end: usize,
    },
    /// Waiting for the agent's `End`.
    Ending {
        theirs: TreeRoot,
        sent: u64,
    },
    /// Waiting for the stored root.
    Storing {
        theirs: TreeRoot,
    },
    Done,
}

/// The coordinator's half of a consistency check of one disk, in plain code: fed the agent's
/// frames and our own tree's entries, it says what to answer and what to store. Its driver
/// ([`run`]) moves the frames and reads the store; the simulation drives it in memory.
#[derive(Debug)]
pub struct Check {
    blocks: u64,
    base: Option<TreeRoot>,
    state: CheckState,
    retried: bool,
}

impl Check {
    /// A check of a disk of `blocks` blocks whose replica's tree is `base` (None: none yet).
    pub fn new(blocks: u64, base: Option<TreeRoot>) -> Self {
        Self { blocks, base, state: CheckState::Root, retried: false }
    }

    /// The disk's block count.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The tree the check compares with and repairs (None once ours proved unreadable).
    pub fn base(&self) -> Option<TreeRoot> {
        self.base
    }

    /// A frame from the agent.
    pub fn frame(&mut self, frame: TransferFrame) -> Result<Vec<CheckStep>, String> {
        match (std::mem::replace(&mut self.state, CheckState::Done), frame) {
            (_, TransferFrame::Message(TransferMessage::Failed { reason })) => {
                Err(format!("the agent gave up: {}", bulwark_protocol::text::cap_reason(reason)))
            }
            (CheckState::Root, TransferFrame::Message(TransferMessage::Root { root, bytes_read })) => {
                if root.blocks != self.blocks || root.levels != blockmap::levels_for(self.blocks) {
                    return Err(format!(
                        "the source's tree has {} blocks in {} levels, expected {}",
                        root.blocks, root.levels, self.blocks
                    ));
                }
                let mut steps = vec![CheckStep::Scanned(bytes_read)];
                steps.extend(self.compare(root));
                Ok(steps)
            }
            (
                CheckState::Comparing { theirs, walk, pages: None },
                TransferFrame::Message(TransferMessage::Pages { pages }),
            ) => {
                let nodes = walk.asked().to_vec();
                if pages.len() != nodes.len() {
                    return Err(format!("expected {} pages, got {}", nodes.len(), pages.len()));
                }
                self.state = CheckState::Comparing { theirs, walk, pages: Some(pages) };
                Ok(vec![CheckStep::Ours(nodes)])
            }
            (CheckState::Fetching { theirs, diff, pos, zpos, batch_end }, frame) => {
                let Some(&want) = diff.fetch.get(pos) else { return Err("a block nobody asked for".into()) };
                let stored = match frame {
                    TransferFrame::Block { index, id, data } if index == want => CheckStep::Block { index, id, data },
                    TransferFrame::Zero { index } if index == want => CheckStep::Zero { index },
                    other => return Err(format!("expected block {want}, got {}", describe(&other))),
                };
                let mut steps = vec![];
                let mut zpos = zpos;
                while let Some(&z) = diff.zeros.get(zpos).filter(|&&z| z < want) {
                    steps.push(CheckStep::Zero { index: z });
                    zpos += 1;
                }
                steps.push(stored);
                let pos = pos + 1;
                if pos < batch_end {
                    self.state = CheckState::Fetching { theirs, diff, pos, zpos, batch_end };
                } else {
                    steps.extend(self.next_batch(theirs, diff, pos, zpos));
                }
                Ok(steps)
            }
            (CheckState::Ending { theirs, sent }, TransferFrame::Message(TransferMessage::End { blocks_sent, .. })) => {
                if blocks_sent != sent {
                    return Err(format!("expected the end of {sent} blocks, the agent sent {blocks_sent}"));
                }
                self.state = CheckState::Storing { theirs };
                Ok(vec![CheckStep::EndDisk])
            }
            (state, other) => Err(format!("unexpected {} {}", describe(&other), state.waiting_for())),
        }
    }

    /// Starts (or restarts) the comparison with our tree.
    fn compare(&mut self, theirs: TreeRoot) -> Vec<CheckStep> {
        let walk = Comparison::new(&theirs, self.base.map(|b| b.digest));
        self.state = CheckState::Comparing { theirs, walk, pages: None };
        self.ask()
    }

    /// The next pages to ask for, or the end of the comparison.
    fn ask(&mut self) -> Vec<CheckStep> {
        let CheckState::Comparing { theirs, mut walk, pages } = std::mem::replace(&mut self.state, CheckState::Done)
        else {
            return vec![];
        };
        let nodes = walk.ask(MAX_PAGES_PER_MESSAGE).to_vec();
        if !nodes.is_empty() {
            self.state = CheckState::Comparing { theirs, walk, pages };
            return vec![CheckStep::Say(TransferMessage::WantPages { nodes })];
        }
        let diff = walk.into_diff();
        if self.base.is_some() {
            self.state = CheckState::Bad { theirs, diff };
            return vec![CheckStep::BadLeaves];
        }
        self.start_fetching(theirs, diff)
    }

    /// Our entries of the nodes asked for.
    pub fn ours(&mut self, ours: Vec<Vec<Digest>>) -> Result<Vec<CheckStep>, String> {
        let CheckState::Comparing { theirs, mut walk, pages: Some(pages) } =
            std::mem::replace(&mut self.state, CheckState::Done)
        else {
            return Err("internal: our pages when none were asked for".into());
        };
        walk.feed(&pages, &ours).map_err(|e| format!("the source's tree: {e}"))?;
        self.state = CheckState::Comparing { theirs, walk, pages: None };
        Ok(self.ask())
    }

    /// Our tree cannot be read: compare with an empty one instead (once), so everything the
    /// source holds is fetched again.
    pub fn our_tree_unreadable(&mut self, why: &str) -> Result<Vec<CheckStep>, String> {
        let CheckState::Comparing { theirs, .. } = std::mem::replace(&mut self.state, CheckState::Done) else {
            return Err("internal: our tree was not being read".into());
        };
        if self.retried || self.base.is_none() {
            return Err(why.to_owned());
        }
        self.retried = true;
        self.base = None;
        // The agent's pages of the last question are in already: the new comparison starts
        // from the root with a question of its own.
        Ok(self.compare(theirs))
    }

    /// Leaves of our tree whose stored chunks verify found bad: fetched again even where the
    /// digests agree.
    pub fn bad_leaves(&mut self, bad: Vec<u64>) -> Vec<CheckStep> {
        let CheckState::Bad { theirs, mut diff } = std::mem::replace(&mut self.state, CheckState::Done) else {
            return vec![];
        };
        if !bad.is_empty() {
            diff.fetch.extend(bad.into_iter().filter(|&i| i < self.blocks));
            diff.fetch.sort_unstable();
            diff.fetch.dedup();
            diff.zeros.retain(|z| diff.fetch.binary_search(z).is_err());
        }
        self.start_fetching(theirs, diff)
    }

    fn start_fetching(&mut self, theirs: TreeRoot, diff: Diff) -> Vec<CheckStep> {
        let mut steps = vec![CheckStep::Begin { blocks: self.blocks, old: self.base }];
        steps.extend(self.next_batch(theirs, diff, 0, 0));
        steps
    }

    /// Asks for the next batch of leaves from `pos`, or ends the disk.
    fn next_batch(&mut self, theirs: TreeRoot, diff: Diff, pos: usize, zpos: usize) -> Vec<CheckStep> {
        if pos < diff.fetch.len() {
            let batch_end = (pos + MAX_WANTED_PER_MESSAGE).min(diff.fetch.len());
            let indices = diff.fetch[pos..batch_end].to_vec();
            self.state = CheckState::Fetching { theirs, diff, pos, zpos, batch_end };
            return vec![CheckStep::Say(TransferMessage::WantBlocks { indices })];
        }
        let mut steps: Vec<CheckStep> =
            diff.zeros.get(zpos..).unwrap_or(&[]).iter().map(|&index| CheckStep::Zero { index }).collect();
        steps.push(CheckStep::Say(TransferMessage::WantBlocks { indices: vec![] }));
        self.state = CheckState::Ending { theirs, sent: diff.fetch.len() as u64 };
        steps
    }

    /// The repaired tree's root: it must be the source's.
    pub fn stored(&mut self, root: TreeRoot) -> Result<(), String> {
        let CheckState::Storing { theirs } = std::mem::replace(&mut self.state, CheckState::Done) else {
            return Err("internal: a stored root before the end of the check".into());
        };
        if root.digest != theirs.digest {
            return Err(
                "after the check the replica still differs from the source (the source changed under its snapshot?)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl CheckState {
    fn waiting_for(&self) -> &'static str {
        match self {
            CheckState::Root => "where the snapshot's root was expected",
            CheckState::Comparing { .. } => "where pages were expected",
            CheckState::Bad { .. } => "while our tree was being read",
            CheckState::Fetching { .. } => "where a block was expected",
            CheckState::Ending { .. } => "where the end of the blocks was expected",
            CheckState::Storing { .. } | CheckState::Done => "after the end of the check",
        }
    }
}

/// A frame, named without its data.
fn describe(f: &TransferFrame) -> String {
    match f {
        TransferFrame::Block { index, .. } => format!("block {index}"),
        TransferFrame::Zero { index } => format!("zero block {index}"),
        TransferFrame::Message(m) => format!("{m:?}").chars().take(120).collect(),
    }
}

/// Runs the check of one disk: [`Check`] decides, this moves its frames and reads the store.
pub async fn run(
    ctx: &Arc<JobContext>,
    ingest: &IngestHandle,
    s: &mut TransferStream,
    blocks: u64,
    old: Option<TreeRoot>,
    job: &mut JobRecord,
) -> Result<DiskDone, String> {
    let store = ctx.store.clone();
    let mut check = Check::new(blocks, old);
    let mut steps: std::collections::VecDeque<CheckStep> = Default::default();
    loop {
        let Some(step) = steps.pop_front() else {
            let frame = match transfer::read(&mut s.recv, s.block_size as usize).await.map_err(|e| e.to_string())? {
                Some(f) => f,
                None => return Err("the agent closed the stream in the middle of the check".into()),
            };
            steps.extend(check.frame(frame)?);
            continue;
        };
        match step {
            CheckStep::Say(m) => say(s, &m).await?,
            CheckStep::Ours(nodes) => {
                let (st, base) = (store.clone(), check.base());
                let ours = tokio::task::spawn_blocking(move || our_entries(&st, base.as_ref(), blocks, &nodes))
                    .await
                    .map_err(|e| e.to_string())?;
                steps.extend(match ours {
                    Ok(ours) => check.ours(ours)?,
                    Err(e) => {
                        tracing::warn!(error = %e, "the replica's block map is unreadable: rebuilding it from the source");
                        check.our_tree_unreadable(&e)?
                    }
                });
            }
            CheckStep::BadLeaves => {
                let Some(b) = check.base() else { return Err("internal: bad leaves without a tree".into()) };
                let st = store.clone();
                let bad =
                    tokio::task::spawn_blocking(move || bad_leaves(&st, &b)).await.map_err(|e| e.to_string())??;
                if !bad.is_empty() {
                    tracing::info!(blocks = bad.len(), "re-fetching blocks whose stored chunks verify found bad");
                }
                steps.extend(check.bad_leaves(bad));
            }
            CheckStep::Scanned(n) => job.bytes_scanned += n,
            CheckStep::Begin { blocks, old } => ingest.send(Cmd::BeginDisk { blocks, old }).await?,
            CheckStep::Block { index, id, data } => {
                job.bytes_transferred += data.len() as u64;
                ingest.send(Cmd::Block { index, id, data }).await?;
            }
            CheckStep::Zero { index } => ingest.send(Cmd::Zero { index }).await?,
            CheckStep::EndDisk => {
                let (root, changed) = ingest.end_disk().await?;
                check.stored(root)?;
                tracing::info!(changed, "disk checked and repaired");
                return Ok(DiskDone { root, changed });
            }
        }
    }
}

/// Our entries of each node (zeros where we have no tree).
pub fn our_entries(
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
pub fn bad_leaves(store: &Store, root: &TreeRoot) -> Result<Vec<u64>, String> {
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

/// What a [`RestoreDisk`] asks its driver to do.
#[derive(Debug, PartialEq, Eq)]
pub enum RestoreStep {
    /// Send this to the agent.
    Say(TransferMessage),
    /// The recovery point's entries of these nodes are needed: answer [`RestoreDisk::ours`].
    Ours(Vec<(u8, u64)>),
    /// The agent read this many bytes of the disk to hash it.
    Scanned(u64),
    /// Send these leaves of the recovery point, in this order (block or zero frames), then
    /// answer [`RestoreDisk::sent`].
    Send(Vec<u64>),
    /// The agent stored every block: the disk is restored.
    Done,
}

#[derive(Debug)]
enum RestoreState {
    Root,
    Comparing { walk: Comparison, pages: Option<Vec<Vec<Digest>>> },
    Sending { count: u64 },
    Stored { count: u64 },
    Done,
}

/// A broken build of the restore, for the simulation to catch (`broken-builds` feature).
#[cfg(feature = "broken-builds")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenRestore {
    /// Sends the differing leaves with data first, then the zero ones, and the first leaf a
    /// second time: blocks out of order, one twice.
    OutOfOrder,
}

/// The coordinator's half of a recovery of one disk, in plain code: the agent's tree is the
/// VM's current disk, ours the recovery point's; every leaf that differs is sent with the
/// recovery point's content (zeros without data), each once, in increasing order. A smart
/// restore: a disk that diverged by 1 % gets ~1 % written.
#[derive(Debug)]
pub struct RestoreDisk {
    rp: TreeRoot,
    state: RestoreState,
    #[cfg(feature = "broken-builds")]
    broken: Option<BrokenRestore>,
}

impl RestoreDisk {
    /// A recovery of a disk to the recovery point's tree `rp`.
    pub fn new(rp: TreeRoot) -> Self {
        Self {
            rp,
            state: RestoreState::Root,
            #[cfg(feature = "broken-builds")]
            broken: None,
        }
    }

    /// Turns on a broken build (the simulation's check that it catches it).
    #[cfg(feature = "broken-builds")]
    pub fn break_with(&mut self, broken: BrokenRestore) {
        self.broken = Some(broken);
    }

    /// The recovery point's tree.
    pub fn rp(&self) -> TreeRoot {
        self.rp
    }

    /// A frame from the agent.
    pub fn frame(&mut self, frame: TransferFrame) -> Result<Vec<RestoreStep>, String> {
        match (std::mem::replace(&mut self.state, RestoreState::Done), frame) {
            (_, TransferFrame::Message(TransferMessage::Failed { reason })) => {
                Err(format!("the agent gave up: {}", bulwark_protocol::text::cap_reason(reason)))
            }
            (RestoreState::Root, TransferFrame::Message(TransferMessage::Root { root, bytes_read })) => {
                if root.blocks != self.rp.blocks || root.levels != self.rp.levels {
                    return Err(format!(
                        "the target disk has {} blocks, the recovery point {}",
                        root.blocks, self.rp.blocks
                    ));
                }
                let walk = Comparison::new(&root, Some(self.rp.digest));
                self.state = RestoreState::Comparing { walk, pages: None };
                let mut steps = vec![RestoreStep::Scanned(bytes_read)];
                steps.extend(self.ask());
                Ok(steps)
            }
            (
                RestoreState::Comparing { walk, pages: None },
                TransferFrame::Message(TransferMessage::Pages { pages }),
            ) => {
                let nodes = walk.asked().to_vec();
                if pages.len() != nodes.len() {
                    return Err(format!("expected {} pages, got {}", nodes.len(), pages.len()));
                }
                self.state = RestoreState::Comparing { walk, pages: Some(pages) };
                Ok(vec![RestoreStep::Ours(nodes)])
            }
            (RestoreState::Stored { count }, TransferFrame::Message(TransferMessage::Stored { blocks })) => {
                if blocks != count {
                    return Err(format!("the agent stored {blocks} blocks of {count}"));
                }
                Ok(vec![RestoreStep::Done])
            }
            (_, other) => Err(format!("unexpected {} in a restore", describe(&other))),
        }
    }

    fn ask(&mut self) -> Vec<RestoreStep> {
        let RestoreState::Comparing { mut walk, pages } = std::mem::replace(&mut self.state, RestoreState::Done) else {
            return vec![];
        };
        let nodes = walk.ask(MAX_PAGES_PER_MESSAGE).to_vec();
        if !nodes.is_empty() {
            self.state = RestoreState::Comparing { walk, pages };
            return vec![RestoreStep::Say(TransferMessage::WantPages { nodes })];
        }
        let diff = walk.into_diff();
        #[cfg(feature = "broken-builds")]
        if self.broken == Some(BrokenRestore::OutOfOrder) {
            let mut want: Vec<u64> = diff.fetch.iter().chain(&diff.zeros).copied().collect();
            want.extend(want.first().copied());
            self.state = RestoreState::Sending { count: want.len() as u64 };
            return vec![RestoreStep::Send(want)];
        }
        let mut want: Vec<u64> = diff.fetch.into_iter().chain(diff.zeros).collect();
        want.sort_unstable();
        want.dedup();
        self.state = RestoreState::Sending { count: want.len() as u64 };
        vec![RestoreStep::Send(want)]
    }

    /// The recovery point's entries of the nodes asked for.
    pub fn ours(&mut self, ours: Vec<Vec<Digest>>) -> Result<Vec<RestoreStep>, String> {
        let RestoreState::Comparing { mut walk, pages: Some(pages) } =
            std::mem::replace(&mut self.state, RestoreState::Done)
        else {
            return Err("internal: recovery point pages when none were asked for".into());
        };
        walk.feed(&pages, &ours).map_err(|e| format!("the target's tree: {e}"))?;
        self.state = RestoreState::Comparing { walk, pages: None };
        Ok(self.ask())
    }

    /// `sent` leaves went out: the end follows.
    pub fn sent(&mut self, sent: u64) -> Result<Vec<RestoreStep>, String> {
        let RestoreState::Sending { count } = std::mem::replace(&mut self.state, RestoreState::Done) else {
            return Err("internal: leaves sent when none were asked for".into());
        };
        if sent != count {
            return Err(format!("{sent} of {count} differing blocks were read from the recovery point"));
        }
        self.state = RestoreState::Stored { count };
        Ok(vec![RestoreStep::Say(TransferMessage::End { blocks_sent: sent, bytes_read: 0 })])
    }
}

/// A recovery of one disk ([`RestoreDisk`] decides): the recovery point's differing leaves are
/// read from the store in order on a blocking thread and streamed, paced by the throttle.
pub async fn restore(
    ctx: &Arc<JobContext>,
    s: &mut TransferStream,
    rp_root: TreeRoot,
    job: &mut JobRecord,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<(), String> {
    let mut throttle = crate::throttle::Throttle::for_options(options);
    let store = ctx.store.clone();
    let mut disk = RestoreDisk::new(rp_root);
    let mut steps: std::collections::VecDeque<RestoreStep> = Default::default();
    let bs = s.block_size as usize;
    loop {
        let Some(step) = steps.pop_front() else {
            let frame = match transfer::read(&mut s.recv, bs).await.map_err(|e| e.to_string())? {
                Some(f) => f,
                None => return Err("the agent closed the stream in the middle of the restore".into()),
            };
            steps.extend(disk.frame(frame)?);
            continue;
        };
        match step {
            RestoreStep::Say(m) => say(s, &m).await?,
            RestoreStep::Scanned(n) => job.bytes_scanned += n,
            RestoreStep::Ours(nodes) => {
                let st = store.clone();
                let blocks = rp_root.blocks;
                let ours = tokio::task::spawn_blocking(move || our_entries(&st, Some(&rp_root), blocks, &nodes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("the recovery point cannot be read: {e}"))?;
                steps.extend(disk.ours(ours)?);
            }
            RestoreStep::Send(want) => {
                tracing::info!(blocks = want.len(), "blocks differ from the recovery point");
                job.bytes_total = Some(job.bytes_total.unwrap_or(0) + want.len() as u64 * u64::from(s.block_size));
                let sent = send_leaves(ctx, s, rp_root, want, job, &mut throttle).await?;
                job.blocks_changed += sent;
                steps.extend(disk.sent(sent)?);
            }
            RestoreStep::Done => return Ok(()),
        }
    }
}

/// Streams leaves `want` (increasing) of `rp_root` as block or zero frames; answers how many.
async fn send_leaves(
    ctx: &Arc<JobContext>,
    s: &mut TransferStream,
    rp_root: TreeRoot,
    want: Vec<u64>,
    job: &mut JobRecord,
    throttle: &mut Option<crate::throttle::Throttle>,
) -> Result<u64, String> {
    let store = ctx.store.clone();
    let mut saved = std::time::Instant::now();
    let bs = s.block_size as usize;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(4);
    let reader = tokio::task::spawn_blocking(move || {
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
            tx.blocking_send(frame).map_err(|_| crate::store::StoreError::BlockMap("the restore stream closed".into()))
        })
        .map_err(|e| e.to_string())
    });
    let mut sent = 0u64;
    while let Some((body, n)) = rx.recv().await {
        crate::throttle::pace(throttle, body.len() as u64).await;
        transfer::write_body(&mut s.send, &body, bs).await.map_err(|e| e.to_string())?;
        sent += 1;
        job.bytes_transferred += n;
        if saved.elapsed() >= std::time::Duration::from_secs(1) {
            saved = std::time::Instant::now();
            let _ = ctx.catalog().put_job(job);
        }
    }
    reader.await.map_err(|e| e.to_string())??;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::blockmap::{update, PageStore};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct MemPages(HashMap<Digest, Vec<u8>>);

    impl PageStore for MemPages {
        type Error = std::io::Error;
        fn load_page(&self, id: &Digest) -> Result<Vec<u8>, std::io::Error> {
            self.0.get(id).cloned().ok_or_else(|| std::io::Error::other("missing page"))
        }
        fn save_page(&mut self, bytes: &[u8], _: Option<(&Digest, &[u8])>) -> Result<Digest, std::io::Error> {
            let id = *blake3::hash(bytes).as_bytes();
            self.0.insert(id, bytes.to_vec());
            Ok(id)
        }
    }

    fn leaf(v: u64) -> Digest {
        if v == 0 {
            ZERO
        } else {
            *blake3::hash(&v.to_le_bytes()).as_bytes()
        }
    }

    fn tree(p: &mut MemPages, blocks: u64, leaves: &BTreeMap<u64, u64>) -> TreeRoot {
        let changes: Vec<_> = leaves.iter().filter(|(i, _)| **i < blocks).map(|(i, v)| (*i, leaf(*v))).collect();
        update(p, None, blocks, changes).unwrap()
    }

    /// Runs a check of our tree `base` against the agent's `theirs` the way `run` does, with the
    /// agent answering from its tree and the store applying what the check says; answers the
    /// repaired root, the blocks moved and the questions asked.
    fn check(
        p: &mut MemPages,
        theirs: TreeRoot,
        base: Option<TreeRoot>,
        bad: Vec<u64>,
        unreadable: bool,
    ) -> Result<(TreeRoot, u64, usize), String> {
        let blocks = theirs.blocks;
        let mut c = Check::new(blocks, base);
        let mut to_agent: Vec<TransferMessage> = vec![];
        let mut steps: std::collections::VecDeque<CheckStep> =
            c.frame(TransferFrame::Message(TransferMessage::Root { root: theirs, bytes_read: 7 }))?.into();
        let (mut changes, mut old, mut moved, mut questions, mut unreadable) = (vec![], None, 0u64, 0, unreadable);
        loop {
            let Some(step) = steps.pop_front() else {
                // The agent answers the last question.
                let Some(q) = to_agent.pop() else { return Err("the check stalled".into()) };
                questions += 1;
                let frames: Vec<TransferFrame> = match q {
                    TransferMessage::WantPages { nodes } => {
                        let pages =
                            nodes.iter().map(|&(l, i)| blockmap::node_entries(p, &theirs, l, i).unwrap()).collect();
                        vec![TransferFrame::Message(TransferMessage::Pages { pages })]
                    }
                    TransferMessage::WantBlocks { indices } if indices.is_empty() => {
                        vec![TransferFrame::Message(TransferMessage::End { blocks_sent: moved, bytes_read: 0 })]
                    }
                    TransferMessage::WantBlocks { indices } => indices
                        .iter()
                        .map(|&i| {
                            moved += 1;
                            let id = blockmap::node_entries(p, &theirs, 0, i / 1024).unwrap()[(i % 1024) as usize];
                            if id == ZERO {
                                TransferFrame::Zero { index: i }
                            } else {
                                TransferFrame::Block { index: i, id, data: vec![1] }
                            }
                        })
                        .collect(),
                    other => panic!("{other:?}"),
                };
                for f in frames {
                    steps.extend(c.frame(f)?);
                }
                continue;
            };
            match step {
                CheckStep::Say(m) => to_agent.push(m),
                CheckStep::Ours(nodes) if unreadable => {
                    unreadable = false;
                    let _ = nodes;
                    steps.extend(c.our_tree_unreadable("page missing")?);
                }
                CheckStep::Ours(nodes) => {
                    let ours = nodes
                        .iter()
                        .map(|&(l, i)| match c.base() {
                            Some(b) => blockmap::node_entries(p, &b, l, i).unwrap(),
                            None => vec![ZERO; blockmap::entries_of(l, i, blocks)],
                        })
                        .collect();
                    steps.extend(c.ours(ours)?);
                }
                CheckStep::BadLeaves => steps.extend(c.bad_leaves(bad.clone())),
                CheckStep::Scanned(n) => assert_eq!(n, 7),
                CheckStep::Begin { old: o, .. } => old = o,
                CheckStep::Block { index, id, .. } => changes.push((index, id)),
                CheckStep::Zero { index } => changes.push((index, ZERO)),
                CheckStep::EndDisk => {
                    assert!(changes.windows(2).all(|w| w[0].0 < w[1].0), "leaves are stored in order, once");
                    let root = update(p, old.as_ref(), blocks, changes.clone()).unwrap();
                    c.stored(root)?;
                    return Ok((root, changes.len() as u64, questions));
                }
            }
        }
    }

    #[test]
    fn a_check_moves_only_what_differs_and_ends_on_the_sources_root() {
        let mut p = MemPages::default();
        let blocks = 5000;
        let ours: BTreeMap<u64, u64> = (0..blocks).map(|i| (i, i + 1)).collect();
        let mut theirs = ours.clone();
        theirs.insert(10, 99_999);
        theirs.insert(11, 0);
        theirs.insert(4999, 77_777);
        let (b, t) = (tree(&mut p, blocks, &ours), tree(&mut p, blocks, &theirs));
        let (root, changed, questions) = check(&mut p, t, Some(b), vec![], false).unwrap();
        assert_eq!((root, changed), (t, 3));
        // Root, two leaf pages (in one question), the blocks, the end.
        assert_eq!(questions, 4);
        let (root, changed, _) = check(&mut p, t, Some(t), vec![], false).unwrap();
        assert_eq!((root, changed), (t, 0), "equal trees: nothing moves");
        let (root, changed, _) = check(&mut p, t, Some(t), vec![3, 11, 70_000], false).unwrap();
        assert_eq!((root, changed), (t, 2), "leaves verify found bad come again, even where digests agree");
        let (root, changed, _) = check(&mut p, t, Some(b), vec![], true).unwrap();
        assert_eq!((root, changed), (t, blocks - 1), "an unreadable tree of ours: everything but zeros again");
        let (root, _, _) = check(&mut p, t, None, vec![], false).unwrap();
        assert_eq!(root, t, "no tree yet: built from the source");
    }

    #[test]
    fn a_check_refuses_what_the_agent_should_not_say() {
        let mut p = MemPages::default();
        let t = tree(&mut p, 5000, &(0..5000).map(|i| (i, i + 1)).collect());
        let root = |r: TreeRoot| TransferFrame::Message(TransferMessage::Root { root: r, bytes_read: 0 });
        let mut c = Check::new(4000, None);
        assert!(c.frame(root(t)).is_err_and(|e| e.contains("5000 blocks")), "another disk's tree");
        let mut c = Check::new(5000, None);
        assert!(c.frame(TransferFrame::Zero { index: 1 }).is_err(), "a block before the root");
        let mut c = Check::new(5000, None);
        assert!(matches!(
            &c.frame(root(t)).unwrap()[..],
            [CheckStep::Scanned(0), CheckStep::Say(TransferMessage::WantPages { .. })]
        ));
        let pages = |n| TransferFrame::Message(TransferMessage::Pages { pages: vec![vec![ZERO; 5]; n] });
        assert!(c.frame(pages(2)).is_err_and(|e| e.contains("expected 1 pages")));
        let mut c = Check::new(5000, None);
        c.frame(root(t)).unwrap();
        assert!(matches!(&c.frame(pages(1)).unwrap()[..], [CheckStep::Ours(n)] if n == &vec![(1, 0)]));
        assert!(c.ours(vec![vec![ZERO; 4]]).is_err_and(|e| e.contains("entries")), "a page of the wrong shape");
        let mut c = Check::new(5000, None);
        c.frame(root(t)).unwrap();
        let gave_up = TransferFrame::Message(TransferMessage::Failed { reason: "disk gone".into() });
        assert!(c.frame(gave_up).is_err_and(|e| e.contains("gave up: disk gone")));
        // Blocks other than the one asked for, and an end with the wrong count.
        let mut c = Check::new(5000, None);
        c.frame(root(t)).unwrap();
        c.frame(TransferFrame::Message(TransferMessage::Pages {
            pages: vec![blockmap::node_entries(&p, &t, 1, 0).unwrap()],
        }))
        .unwrap();
        c.ours(vec![vec![ZERO; 5]]).unwrap();
        let leafpages: Vec<_> = (0..5).map(|i| blockmap::node_entries(&p, &t, 0, i).unwrap()).collect();
        c.frame(TransferFrame::Message(TransferMessage::Pages { pages: leafpages })).unwrap();
        let steps = c
            .ours(vec![vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 904]])
            .unwrap();
        assert!(
            matches!(&steps[..], [CheckStep::Begin { blocks: 5000, old: None }, CheckStep::Say(TransferMessage::WantBlocks { indices })] if indices.len() == 5000)
        );
        assert!(c.frame(TransferFrame::Zero { index: 1 }).is_err_and(|e| e.contains("expected block 0")));
        assert!(c.stored(t).is_err(), "a root before the end");
        assert!(c.bad_leaves(vec![1]).is_empty(), "bad leaves nobody asked for change nothing");
    }

    proptest! {
        /// Whatever the two trees, the leaves verify found bad and whether our tree reads, a
        /// check ends on the source's root, storing each leaf at most once and in order.
        #[test]
        fn a_check_always_repairs_to_the_source(
            blocks in 1u64..4000,
            ours in proptest::collection::btree_map(0u64..4000, 0u64..5, 0..80),
            theirs in proptest::collection::btree_map(0u64..4000, 0u64..5, 0..80),
            bad in proptest::collection::vec(0u64..4000, 0..5),
            have_tree in any::<bool>(),
            unreadable in any::<bool>(),
        ) {
            let mut p = MemPages::default();
            let (b, t) = (tree(&mut p, blocks, &ours), tree(&mut p, blocks, &theirs));
            let base = have_tree.then_some(b);
            let r = check(&mut p, t, base, bad, unreadable && have_tree);
            prop_assert_eq!(r.map(|r| r.0), Ok(t));
        }
    }

    /// Runs a restore of `rp` onto a disk whose tree is `current`, the agent answering from its
    /// tree; answers the leaves sent, in order.
    fn restore_leaves(p: &MemPages, current: TreeRoot, rp: TreeRoot) -> Result<Vec<u64>, String> {
        let mut r = RestoreDisk::new(rp);
        let mut steps: std::collections::VecDeque<RestoreStep> =
            r.frame(TransferFrame::Message(TransferMessage::Root { root: current, bytes_read: 0 }))?.into();
        let mut sent = vec![];
        while let Some(step) = steps.pop_front() {
            match step {
                RestoreStep::Say(TransferMessage::WantPages { nodes }) => {
                    let pages =
                        nodes.iter().map(|&(l, i)| blockmap::node_entries(p, &current, l, i).unwrap()).collect();
                    steps.extend(r.frame(TransferFrame::Message(TransferMessage::Pages { pages }))?);
                }
                RestoreStep::Say(TransferMessage::End { blocks_sent, .. }) => {
                    steps.extend(r.frame(TransferFrame::Message(TransferMessage::Stored { blocks: blocks_sent }))?);
                }
                RestoreStep::Ours(nodes) => {
                    let ours = nodes.iter().map(|&(l, i)| blockmap::node_entries(p, &rp, l, i).unwrap()).collect();
                    steps.extend(r.ours(ours)?);
                }
                RestoreStep::Send(want) => {
                    sent = want;
                    steps.extend(r.sent(sent.len() as u64)?);
                }
                RestoreStep::Scanned(_) => {}
                RestoreStep::Done => return Ok(sent),
                other => panic!("{other:?}"),
            }
        }
        Err("the restore stalled".into())
    }

    #[test]
    fn a_restore_sends_each_differing_leaf_once_in_order_and_refuses_another_disk() {
        let mut p = MemPages::default();
        let blocks = 5000;
        let rp: BTreeMap<u64, u64> = (0..blocks).map(|i| (i, i + 1)).collect();
        let mut now = rp.clone();
        now.insert(3, 77);
        now.insert(4000, 0);
        now.remove(&4999);
        now.insert(10, 0);
        let (r, c) = (tree(&mut p, blocks, &rp), tree(&mut p, blocks, &now));
        assert_eq!(restore_leaves(&p, c, r).unwrap(), vec![3, 10, 4000, 4999]);
        assert_eq!(restore_leaves(&p, r, r).unwrap(), Vec::<u64>::new(), "an unchanged disk: nothing written");
        let other = tree(&mut p, 4000, &rp);
        assert!(restore_leaves(&p, other, r).is_err_and(|e| e.contains("4000 blocks")));
        let mut d = RestoreDisk::new(r);
        d.frame(TransferFrame::Message(TransferMessage::Root { root: c, bytes_read: 0 })).unwrap();
        assert!(d.sent(3).is_err(), "leaves sent before they were asked for");
        let mut d = RestoreDisk::new(r);
        let stored = TransferFrame::Message(TransferMessage::Stored { blocks: 0 });
        assert!(d.frame(stored).is_err(), "stored before anything was sent");
    }

    proptest! {
        /// Whatever the disk's state, applying what a restore sends gives the recovery point.
        #[test]
        fn a_restore_makes_the_disk_the_recovery_point(
            blocks in 1u64..3000,
            rp in proptest::collection::btree_map(0u64..3000, 0u64..5, 0..80),
            now in proptest::collection::btree_map(0u64..3000, 0u64..5, 0..80),
        ) {
            let mut p = MemPages::default();
            let (r, c) = (tree(&mut p, blocks, &rp), tree(&mut p, blocks, &now));
            let sent = restore_leaves(&p, c, r).unwrap();
            prop_assert!(sent.windows(2).all(|w| w[0] < w[1]));
            let leaf_of = |t: &TreeRoot, i: u64| blockmap::node_entries(&p, t, 0, i / 1024).unwrap()[(i % 1024) as usize];
            let changes: Vec<_> = sent.iter().map(|&i| (i, leaf_of(&r, i))).collect();
            let mut q = MemPages(p.0.clone());
            let restored = update(&mut q, Some(&c), blocks, changes).unwrap();
            prop_assert_eq!(restored.digest, r.digest);
        }
    }
}
