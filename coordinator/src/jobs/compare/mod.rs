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
use crate::jobs::machine::{DiskDone, DiskStart};
use crate::jobs::{JobContext, Progress, TransferStream};
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
    start: DiskStart,
    progress: &Progress,
) -> Result<DiskDone, String> {
    let store = ctx.store.clone();
    let (slot, blocks) = (start.slot, start.blocks);
    let mut check = Check::new(blocks, start.old);
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
            CheckStep::Scanned(n) => progress.scanned_more(n),
            CheckStep::Begin { blocks, old } => ingest.send(Cmd::BeginDisk { slot, blocks, old }).await?,
            CheckStep::Block { index, id, data } => {
                progress.frame(data.len() as u64);
                ingest.send(Cmd::Block { slot, index, id, data }).await?;
            }
            CheckStep::Zero { index } => {
                progress.frame(0);
                ingest.send(Cmd::Zero { slot, index }).await?
            }
            CheckStep::EndDisk => {
                let (root, changed) = ingest.end_disk(slot).await?;
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
    size_bytes: u64,
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
                let sent = send_leaves(ctx, s, rp_root, size_bytes, want, job, &mut throttle).await?;
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
    size_bytes: u64,
    want: Vec<u64>,
    job: &mut JobRecord,
    throttle: &mut Option<crate::throttle::Throttle>,
) -> Result<u64, String> {
    let store = ctx.store.clone();
    let mut saved = std::time::Instant::now();
    let bs = s.block_size as usize;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(4);
    let reader = tokio::task::spawn_blocking(move || {
        let mut next = want.into_iter().peekable();
        let disk = crate::catalog::RpDisk { name: String::new(), size_bytes, block_size: bs as u32, root: rp_root };
        let how = crate::store::readahead::ReadAhead::for_machine();
        store
            .read_leaves(
                &disk,
                how,
                move |i| next.next_if_eq(&i).is_some(),
                |i, id, b| {
                    let frame = match b {
                        crate::store::BlockData::Zero(_) => (transfer::zero_body(i), 0),
                        crate::store::BlockData::Data(data) => (transfer::block_body(i, id, data), data.len() as u64),
                    };
                    tx.blocking_send(frame)
                        .map_err(|_| crate::store::StoreError::BlockMap("the restore stream closed".into()))
                },
            )
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
mod tests;
