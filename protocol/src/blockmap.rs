//! Block maps as Merkle trees: the shape both the coordinator's store and the agent's
//! consistency check build, so the two can compare trees top-down.
//!
//! A disk of `n` blocks has `n` leaves, each a block's chunk id ([`ZERO`] for an all-zero
//! block). Leaves are grouped into pages of [`FANOUT`] ids; a page's id is the id of its bytes
//! (the 32-byte entries concatenated), and pages of ids form the next level up, until one page
//! remains: its id is the root. A page whose entries are all [`ZERO`] has id [`ZERO`] and is
//! never stored, so a sparse disk costs nothing for its empty ranges.
//!
//! [`update`] rewrites only the pages on the paths from changed leaves to the root: 1 % churn
//! writes ~1 % of the leaf pages plus a handful above them. It streams: memory is one page per
//! level, whatever the disk size.

use crate::block::Digest;
use serde::{Deserialize, Serialize};

/// Entries per page.
pub const FANOUT: usize = 1024;
/// The id of an all-zero block or page.
pub const ZERO: Digest = [0u8; 32];

/// The root of a disk's block map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRoot {
    /// Id of the top page ([`ZERO`] for an all-zero disk).
    pub digest: Digest,
    /// Number of page levels (1 for up to 1,024 blocks).
    pub levels: u8,
    /// Number of blocks (leaves).
    pub blocks: u64,
}

impl TreeRoot {
    /// The root of an all-zero disk of `blocks` blocks.
    pub fn empty(blocks: u64) -> Self {
        Self { digest: ZERO, levels: levels_for(blocks), blocks }
    }
}

/// Why a block map operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockMapError<E: std::error::Error + 'static> {
    #[error("page store: {0}")]
    Store(#[source] E),
    #[error("block {index} is out of range (the disk has {blocks} blocks)")]
    OutOfRange { index: u64, blocks: u64 },
    #[error("changes must come in strictly increasing block order ({index} after {previous})")]
    Unordered { index: u64, previous: u64 },
    #[error("the disk had {old} blocks and now has {new}: its block map must be rebuilt")]
    GeometryChanged { old: u64, new: u64 },
    #[error("page {} is {len} bytes where {want} were expected", hex(page))]
    BadPage { page: Digest, len: usize, want: usize },
}

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where pages are loaded from and saved to.
pub trait PageStore {
    type Error: std::error::Error + 'static;
    /// The bytes of a stored page.
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, Self::Error>;
    /// Stores a page (never all-zero) and returns its id, which must be the id of `bytes`
    /// whatever the store does with them. `replaces` is the page it supersedes (its id and
    /// bytes), so a store may keep only the difference.
    fn save_page(&mut self, bytes: &[u8], replaces: Option<(&Digest, &[u8])>) -> Result<Digest, Self::Error>;
}

/// Number of page levels for `blocks` leaves.
pub fn levels_for(blocks: u64) -> u8 {
    let mut levels = 1u8;
    let mut capacity = FANOUT as u64;
    while capacity < blocks {
        capacity = capacity.saturating_mul(FANOUT as u64);
        levels += 1;
    }
    levels
}

/// Leaves covered by one node at `level` (0 = leaf pages).
fn span(level: u8) -> u64 {
    (FANOUT as u64).saturating_pow(u32::from(level) + 1)
}

/// Number of entries of node `index` at `level` in a tree of `blocks` leaves.
pub fn entries_of(level: u8, index: u64, blocks: u64) -> usize {
    let first = index.saturating_mul(span(level));
    let covered = blocks.saturating_sub(first).min(span(level));
    let child_span = if level == 0 { 1 } else { span(level - 1) };
    covered.div_ceil(child_span) as usize
}

fn parse_page<E: std::error::Error>(id: &Digest, bytes: &[u8], want: usize) -> Result<Vec<Digest>, BlockMapError<E>> {
    if bytes.len() != want * 32 {
        return Err(BlockMapError::BadPage { page: *id, len: bytes.len(), want: want * 32 });
    }
    Ok(bytes.chunks_exact(32).map(|c| c.try_into().unwrap_or(ZERO)).collect())
}

fn load<P: PageStore>(pages: &P, id: &Digest, want: usize) -> Result<Vec<Digest>, BlockMapError<P::Error>> {
    if *id == ZERO {
        return Ok(vec![ZERO; want]);
    }
    let bytes = pages.load_page(id).map_err(BlockMapError::Store)?;
    parse_page(id, &bytes, want)
}

fn save<P: PageStore>(
    pages: &mut P,
    entries: &[Digest],
    replaces: Option<(&Digest, &[u8])>,
) -> Result<Digest, BlockMapError<P::Error>> {
    if entries.iter().all(|e| *e == ZERO) {
        return Ok(ZERO);
    }
    pages.save_page(&entries.concat(), replaces).map_err(BlockMapError::Store)
}

/// Applies `changes` — `(block index, new leaf id)` in strictly increasing index order — to
/// the tree `old` (or to an all-zero disk when `None`) of a disk of `blocks` blocks.
pub fn update<P: PageStore>(
    pages: &mut P,
    old: Option<&TreeRoot>,
    blocks: u64,
    changes: impl IntoIterator<Item = (u64, Digest)>,
) -> Result<TreeRoot, BlockMapError<P::Error>> {
    if let Some(old) = old {
        if old.blocks != blocks {
            return Err(BlockMapError::GeometryChanged { old: old.blocks, new: blocks });
        }
    }
    let levels = levels_for(blocks);
    let mut it = Changes { inner: changes.into_iter().peekable(), previous: None, blocks };
    let old_digest = old.map(|r| r.digest).unwrap_or(ZERO);
    let digest = update_node(pages, levels - 1, 0, old_digest, &mut it, blocks)?;
    if let Some((index, _)) = it.inner.next() {
        return Err(BlockMapError::OutOfRange { index, blocks });
    }
    Ok(TreeRoot { digest, levels, blocks })
}

struct Changes<I: Iterator<Item = (u64, Digest)>> {
    inner: std::iter::Peekable<I>,
    previous: Option<u64>,
    blocks: u64,
}

impl<I: Iterator<Item = (u64, Digest)>> Changes<I> {
    /// The next change if its index is below `end`.
    fn next_below<E: std::error::Error>(&mut self, end: u64) -> Result<Option<(u64, Digest)>, BlockMapError<E>> {
        let Some(&(index, digest)) = self.inner.peek() else { return Ok(None) };
        if let Some(previous) = self.previous {
            if index <= previous {
                return Err(BlockMapError::Unordered { index, previous });
            }
        }
        if index >= self.blocks {
            return Err(BlockMapError::OutOfRange { index, blocks: self.blocks });
        }
        if index >= end {
            return Ok(None);
        }
        self.inner.next();
        self.previous = Some(index);
        Ok(Some((index, digest)))
    }

    fn peek_index(&mut self) -> Option<u64> {
        self.inner.peek().map(|(i, _)| *i)
    }
}

fn update_node<P: PageStore, I: Iterator<Item = (u64, Digest)>>(
    pages: &mut P,
    level: u8,
    index: u64,
    old: Digest,
    changes: &mut Changes<I>,
    blocks: u64,
) -> Result<Digest, BlockMapError<P::Error>> {
    let first = index * span(level);
    let end = first.saturating_add(span(level));
    match changes.peek_index() {
        Some(i) if i >= first && i < end => {}
        _ => return Ok(old),
    }
    let n = entries_of(level, index, blocks);
    let mut entries = load(pages, &old, n)?;
    let original = (old != ZERO).then(|| entries.concat());
    if level == 0 {
        while let Some((i, d)) = changes.next_below(end)? {
            entries[(i - first) as usize] = d;
        }
    } else {
        let child_span = span(level - 1);
        while let Some(i) = changes.peek_index().filter(|i| *i < end) {
            if i < first {
                // Out of order: let next_below report it.
                changes.next_below::<P::Error>(end)?;
                continue;
            }
            let child = ((i - first) / child_span) as usize;
            let child_index = index * FANOUT as u64 + child as u64;
            entries[child] = update_node(pages, level - 1, child_index, entries[child], changes, blocks)?;
        }
    }
    save(pages, &entries, original.as_deref().map(|b| (&old, b)))
}

/// Calls `leaf(index, id)` for every block of the tree, in order, zero blocks included.
pub fn for_each_leaf<P: PageStore>(
    pages: &P,
    root: &TreeRoot,
    mut leaf: impl FnMut(u64, Digest) -> Result<(), P::Error>,
) -> Result<(), BlockMapError<P::Error>> {
    walk_leaves(pages, root.levels - 1, 0, root.digest, root.blocks, &mut leaf)
}

fn walk_leaves<P: PageStore>(
    pages: &P,
    level: u8,
    index: u64,
    id: Digest,
    blocks: u64,
    leaf: &mut impl FnMut(u64, Digest) -> Result<(), P::Error>,
) -> Result<(), BlockMapError<P::Error>> {
    let first = index * span(level);
    let n = entries_of(level, index, blocks);
    if id == ZERO {
        let covered = blocks.saturating_sub(first).min(span(level));
        for i in first..first + covered {
            leaf(i, ZERO).map_err(BlockMapError::Store)?;
        }
        return Ok(());
    }
    let entries = load(pages, &id, n)?;
    for (k, e) in entries.into_iter().enumerate() {
        if level == 0 {
            leaf(first + k as u64, e).map_err(BlockMapError::Store)?;
        } else {
            walk_leaves(pages, level - 1, index * FANOUT as u64 + k as u64, e, blocks, leaf)?;
        }
    }
    Ok(())
}

/// The entries of node `index` at `level` (0 = leaf pages) of the tree: what a consistency
/// check compares. An all-zero subtree answers zeros; a node outside the tree is an error.
pub fn node_entries<P: PageStore>(
    pages: &P,
    root: &TreeRoot,
    level: u8,
    index: u64,
) -> Result<Vec<Digest>, BlockMapError<P::Error>> {
    let top = root.levels - 1;
    if level > top || index >= root.blocks.div_ceil(span(level)).max(1) {
        return Err(BlockMapError::OutOfRange { index, blocks: root.blocks });
    }
    // Walk down from the root along the path to the node.
    let mut id = root.digest;
    for l in (level + 1..=top).rev() {
        let here = index / (FANOUT as u64).pow(u32::from(l - level));
        let child = (index / (FANOUT as u64).pow(u32::from(l - level - 1))) % FANOUT as u64;
        let entries = load(pages, &id, entries_of(l, here, root.blocks))?;
        id = entries.get(child as usize).copied().unwrap_or(ZERO);
    }
    load(pages, &id, entries_of(level, index, root.blocks))
}

/// The leaf range `(first, count)` covered by entry `k` of node `index` at `level`.
pub fn entry_span(level: u8, index: u64, k: usize) -> (u64, u64) {
    let child_span = if level == 0 { 1 } else { span(level - 1) };
    (index * span(level) + k as u64 * child_span, child_span)
}

/// Visits every stored page of the tree top-down. `visit(level, id, entries)` returns whether
/// to descend into the page's children (false: already seen). Leaf ids are the entries of
/// level-0 pages.
pub fn walk_pages<P: PageStore>(
    pages: &P,
    root: &TreeRoot,
    visit: &mut impl FnMut(u8, &Digest, &[Digest]) -> bool,
) -> Result<(), BlockMapError<P::Error>> {
    walk_page(pages, root.levels - 1, 0, root.digest, root.blocks, visit)
}

fn walk_page<P: PageStore>(
    pages: &P,
    level: u8,
    index: u64,
    id: Digest,
    blocks: u64,
    visit: &mut impl FnMut(u8, &Digest, &[Digest]) -> bool,
) -> Result<(), BlockMapError<P::Error>> {
    if id == ZERO {
        return Ok(());
    }
    let entries = load(pages, &id, entries_of(level, index, blocks))?;
    if visit(level, &id, &entries) && level > 0 {
        for (k, e) in entries.iter().enumerate() {
            walk_page(pages, level - 1, index * FANOUT as u64 + k as u64, *e, blocks, visit)?;
        }
    }
    Ok(())
}

/// Whether any page or leaf of the tree is `bad(id)` or cannot be loaded. `memo` remembers
/// pages already judged, so trees that share subtrees (recovery points of one disk) cost one
/// visit per distinct page.
pub fn reaches<P: PageStore>(
    pages: &P,
    root: &TreeRoot,
    memo: &mut std::collections::HashMap<Digest, bool>,
    bad: &mut impl FnMut(&Digest) -> bool,
) -> bool {
    reaches_page(pages, root.levels - 1, 0, root.digest, root.blocks, memo, bad)
}

fn reaches_page<P: PageStore>(
    pages: &P,
    level: u8,
    index: u64,
    id: Digest,
    blocks: u64,
    memo: &mut std::collections::HashMap<Digest, bool>,
    bad: &mut impl FnMut(&Digest) -> bool,
) -> bool {
    if id == ZERO {
        return false;
    }
    if let Some(&known) = memo.get(&id) {
        return known;
    }
    let hit = bad(&id)
        || match load(pages, &id, entries_of(level, index, blocks)) {
            Err(_) => true,
            Ok(entries) if level == 0 => entries.iter().any(|e| *e != ZERO && bad(e)),
            Ok(entries) => entries
                .iter()
                .enumerate()
                .any(|(k, e)| reaches_page(pages, level - 1, index * FANOUT as u64 + k as u64, *e, blocks, memo, bad)),
        };
    memo.insert(id, hit);
    hit
}

/// Leaves that differ between two block maps of one shape.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Leaves that hold data on their side and something else on ours, in increasing order.
    pub fetch: Vec<u64>,
    /// Leaves that are zero on their side and not on ours, in increasing order.
    pub zeros: Vec<u64>,
}

/// Why a [`Comparison`] refused the pages it was fed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompareError {
    #[error("{got} pages answered where {asked} were asked for")]
    PageCount { asked: usize, got: usize },
    #[error("page ({level}, {index}) has {got} entries, expected {want}")]
    PageShape { level: u8, index: u64, got: usize, want: usize },
}

/// A top-down comparison of two block maps of one shape ("theirs" and "ours"), with no I/O:
/// the consistency check and the smart restore drive it over a stream, the simulation in
/// memory. [`Comparison::ask`] names the nodes whose entries are needed next; [`Comparison::feed`]
/// takes both sides' entries of them; when `ask` names none, [`Comparison::into_diff`] holds
/// the leaves that differ. Only entries that differ are descended into, level by level, so
/// 1 % of changed leaves costs about 1 % of the leaf pages.
#[derive(Debug)]
pub struct Comparison {
    blocks: u64,
    /// Nodes still to compare, level by level from the top, each level in index order.
    todo: std::collections::VecDeque<(u8, u64)>,
    /// The nodes asked for and not yet fed.
    asked: Vec<(u8, u64)>,
    diff: Diff,
}

impl Comparison {
    /// Compares `theirs` with our tree of the same shape, whose root id is `ours` (`None`:
    /// we have no tree, every entry of ours reads as zero).
    pub fn new(theirs: &TreeRoot, ours: Option<Digest>) -> Self {
        let mut todo = std::collections::VecDeque::new();
        if ours != Some(theirs.digest) {
            todo.push_back((theirs.levels.saturating_sub(1), 0));
        }
        Self { blocks: theirs.blocks, todo, asked: vec![], diff: Diff::default() }
    }

    /// The next nodes (at most `max`, at least one while any remain) whose entries both sides
    /// must give; the same nodes again until they are fed. None: the comparison is complete.
    pub fn ask(&mut self, max: usize) -> &[(u8, u64)] {
        if self.asked.is_empty() {
            let n = self.todo.len().min(max.max(1));
            self.asked.extend(self.todo.drain(..n));
        }
        &self.asked
    }

    /// Both sides' entries of the nodes last asked for, in the order asked. A page of the
    /// wrong shape on either side is refused and changes nothing.
    pub fn feed(&mut self, theirs: &[Vec<Digest>], ours: &[Vec<Digest>]) -> Result<(), CompareError> {
        for got in [theirs.len(), ours.len()] {
            if got != self.asked.len() {
                return Err(CompareError::PageCount { asked: self.asked.len(), got });
            }
        }
        for (&(level, index), (t, o)) in self.asked.iter().zip(theirs.iter().zip(ours)) {
            let want = entries_of(level, index, self.blocks);
            if let Some(&got) = [t.len(), o.len()].iter().find(|&&n| n != want) {
                return Err(CompareError::PageShape { level, index, got, want });
            }
        }
        for (&(level, index), (t, o)) in self.asked.iter().zip(theirs.iter().zip(ours)) {
            for (k, (t, o)) in t.iter().zip(o).enumerate() {
                if t == o {
                    continue;
                }
                let child = index * FANOUT as u64 + k as u64;
                match (level, *t == ZERO) {
                    (0, true) => self.diff.zeros.push(child),
                    (0, false) => self.diff.fetch.push(child),
                    _ => self.todo.push_back((level - 1, child)),
                }
            }
        }
        self.asked.clear();
        Ok(())
    }

    /// The nodes asked for and not yet fed (none between rounds).
    pub fn asked(&self) -> &[(u8, u64)] {
        &self.asked
    }

    /// Whether every differing leaf has been found.
    pub fn is_complete(&self) -> bool {
        self.todo.is_empty() && self.asked.is_empty()
    }

    /// The leaves that differ (all of them once [`Comparison::is_complete`]).
    pub fn into_diff(self) -> Diff {
        debug_assert!(self.diff.fetch.is_sorted() && self.diff.zeros.is_sorted(), "leaves are found in order");
        self.diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct MemPages {
        pages: HashMap<Digest, Vec<u8>>,
        saves: usize,
    }

    impl PageStore for MemPages {
        type Error = std::io::Error;
        fn load_page(&self, id: &Digest) -> Result<Vec<u8>, std::io::Error> {
            self.pages.get(id).cloned().ok_or_else(|| std::io::Error::other("missing page"))
        }
        fn save_page(&mut self, bytes: &[u8], replaces: Option<(&Digest, &[u8])>) -> Result<Digest, std::io::Error> {
            if let Some((old, old_bytes)) = replaces {
                assert_eq!(*blake3::hash(old_bytes).as_bytes(), *old, "replaces carries the old page");
                assert_eq!(old_bytes.len(), bytes.len());
            }
            let id = *blake3::hash(bytes).as_bytes();
            self.saves += 1;
            self.pages.insert(id, bytes.to_vec());
            Ok(id)
        }
    }

    fn leaf(n: u64) -> Digest {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    fn leaves(p: &MemPages, root: &TreeRoot) -> Vec<Digest> {
        let mut out = vec![];
        for_each_leaf(p, root, |i, d| {
            assert_eq!(i as usize, out.len());
            out.push(d);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn node_entries_are_the_pages_on_every_level() {
        // Three levels, sparse: some leaf pages all zero.
        let blocks = 1024 * 1024 + 3000;
        let mut p = MemPages::default();
        let changes: Vec<_> = (0..blocks).filter(|i| i % 7000 < 1500).map(|i| (i, leaf(i))).collect();
        let root = update(&mut p, None, blocks, changes.clone()).unwrap();
        assert_eq!(root.levels, 3);
        let want: HashMap<u64, Digest> = changes.into_iter().collect();
        for index in [0u64, 1, 6, 1024, 1026] {
            let e = node_entries(&p, &root, 0, index).unwrap();
            for (k, d) in e.iter().enumerate() {
                let (first, n) = entry_span(0, index, k);
                assert_eq!(n, 1);
                assert_eq!(*d, want.get(&first).copied().unwrap_or(ZERO), "leaf {first}");
            }
        }
        // A level-1 entry is the id of the leaf page below it.
        let l1 = node_entries(&p, &root, 1, 1).unwrap();
        assert_eq!(l1.len(), 3, "1,027 leaf pages: the second level-1 node holds the last 3");
        for (k, id) in l1.iter().enumerate() {
            let below = node_entries(&p, &root, 0, 1024 + k as u64).unwrap();
            let want = if below.iter().all(|d| *d == ZERO) { ZERO } else { *blake3::hash(&below.concat()).as_bytes() };
            assert_eq!(*id, want);
        }
        assert_ne!(l1[1], ZERO);
        assert_eq!(node_entries(&p, &root, 2, 0).unwrap().len(), 2);
        assert!(node_entries(&p, &root, 0, 1027).is_err(), "past the last leaf page");
        assert!(node_entries(&p, &root, 3, 0).is_err(), "above the root");
    }

    #[test]
    fn level_counts_follow_the_fanout() {
        assert_eq!(levels_for(1), 1);
        assert_eq!(levels_for(1024), 1);
        assert_eq!(levels_for(1025), 2);
        assert_eq!(levels_for(1024 * 1024), 2);
        assert_eq!(levels_for(1024 * 1024 + 1), 3);
    }

    #[test]
    fn an_all_zero_disk_stores_nothing() {
        let mut p = MemPages::default();
        let root = update(&mut p, None, 5000, std::iter::empty()).unwrap();
        assert_eq!(root.digest, ZERO);
        assert_eq!(p.saves, 0);
        assert_eq!(leaves(&p, &root), vec![ZERO; 5000]);
    }

    #[test]
    fn one_percent_churn_rewrites_only_the_paths_to_the_root() {
        let blocks = 100 * 1024; // a 100 GiB disk of 1 MiB blocks
        let mut p = MemPages::default();
        let root = update(&mut p, None, blocks, (0..blocks).map(|i| (i, leaf(i)))).unwrap();
        assert_eq!(p.saves, 100 + 1, "100 leaf pages and the root page");
        p.saves = 0;
        // 1 % of the blocks, clustered in 10 leaf pages.
        let changes: Vec<_> = (0..1024).map(|k| (k * 10, leaf(blocks + k))).collect();
        let new = update(&mut p, Some(&root), blocks, changes.clone()).unwrap();
        assert_eq!(p.saves, 10 + 1);
        let got = leaves(&p, &new);
        let want: BTreeMap<u64, Digest> = changes.into_iter().collect();
        for (i, d) in got.iter().enumerate() {
            assert_eq!(*d, *want.get(&(i as u64)).unwrap_or(&leaf(i as u64)));
        }
        assert_eq!(leaves(&p, &root)[10], leaf(10), "the old tree is untouched");
    }

    #[test]
    fn unordered_and_out_of_range_changes_are_refused() {
        let mut p = MemPages::default();
        assert!(matches!(
            update(&mut p, None, 10, vec![(3, leaf(1)), (2, leaf(2))]),
            Err(BlockMapError::Unordered { .. })
        ));
        assert!(matches!(
            update(&mut p, None, 10, vec![(3, leaf(1)), (3, leaf(2))]),
            Err(BlockMapError::Unordered { .. })
        ));
        assert!(matches!(update(&mut p, None, 10, vec![(10, leaf(1))]), Err(BlockMapError::OutOfRange { .. })));
        let deep = 2 * 1024 * 1024 + 5;
        assert!(matches!(
            update(&mut p, None, deep, vec![(1_500_000, leaf(1)), (5, leaf(2))]),
            Err(BlockMapError::Unordered { .. })
        ));
    }

    #[test]
    fn reaches_finds_bad_leaves_and_missing_pages() {
        let mut p = MemPages::default();
        let blocks = 5000;
        let root = update(&mut p, None, blocks, (0..blocks).map(|i| (i, leaf(i)))).unwrap();
        let mut memo = HashMap::new();
        assert!(!reaches(&p, &root, &mut memo, &mut |d| *d == leaf(99_999)));
        assert!(reaches(&p, &root, &mut HashMap::new(), &mut |d| *d == leaf(4321)));
        let some_page = *p.pages.keys().next().unwrap();
        p.pages.remove(&some_page);
        assert!(reaches(&p, &root, &mut HashMap::new(), &mut |_| false), "an unloadable page counts");
    }

    #[test]
    fn a_disk_that_changed_size_is_refused() {
        let mut p = MemPages::default();
        let root = update(&mut p, None, 10, vec![(1, leaf(1))]).unwrap();
        assert!(matches!(
            update(&mut p, Some(&root), 11, vec![]),
            Err(BlockMapError::GeometryChanged { old: 10, new: 11 })
        ));
    }

    proptest! {
        /// Any sequence of updates yields the leaves a plain array model says.
        #[test]
        fn updates_match_a_plain_model(
            blocks in 1u64..3000,
            rounds in proptest::collection::vec(proptest::collection::btree_map(0u64..3000, 0u64..4, 0..40), 1..5),
        ) {
            let mut p = MemPages::default();
            let mut model = vec![ZERO; blocks as usize];
            let mut root: Option<TreeRoot> = None;
            for round in rounds {
                let changes: Vec<(u64, Digest)> = round
                    .into_iter()
                    .filter(|(i, _)| *i < blocks)
                    .map(|(i, v)| (i, if v == 0 { ZERO } else { leaf(v * 7919 + i) }))
                    .collect();
                for (i, d) in &changes {
                    model[*i as usize] = *d;
                }
                let r = update(&mut p, root.as_ref(), blocks, changes).unwrap();
                prop_assert_eq!(leaves(&p, &r), model.clone());
                root = Some(r);
            }
            // Equal contents give equal roots, however they were reached.
            let fresh = update(&mut MemPages::default(), None, blocks,
                model.iter().enumerate().filter(|(_, d)| **d != ZERO).map(|(i, d)| (i as u64, *d)).collect::<Vec<_>>()).unwrap();
            prop_assert_eq!(fresh.digest, root.map(|r| r.digest).unwrap_or(ZERO));
        }
    }

    /// Drives a comparison of two in-memory trees as a stream would, `max` nodes a round.
    fn compare(p: &MemPages, theirs: &TreeRoot, ours: Option<&TreeRoot>, max: usize) -> (Diff, usize) {
        let mut walk = Comparison::new(theirs, ours.map(|o| o.digest));
        let mut rounds = 0;
        loop {
            let nodes = walk.ask(max).to_vec();
            if nodes.is_empty() {
                assert!(walk.is_complete());
                return (walk.into_diff(), rounds);
            }
            assert!(nodes.len() <= max);
            rounds += 1;
            let t: Vec<_> = nodes.iter().map(|&(l, i)| node_entries(p, theirs, l, i).unwrap()).collect();
            let o: Vec<_> = nodes
                .iter()
                .map(|&(l, i)| match ours {
                    Some(r) => node_entries(p, r, l, i).unwrap(),
                    None => vec![ZERO; entries_of(l, i, theirs.blocks)],
                })
                .collect();
            walk.feed(&t, &o).unwrap();
        }
    }

    #[test]
    fn a_comparison_reads_only_the_pages_on_paths_to_differing_leaves() {
        let blocks = 1024 * 1024 + 3000; // three levels
        let mut p = MemPages::default();
        let ours = update(&mut p, None, blocks, (0..blocks).step_by(3).map(|i| (i, leaf(i)))).unwrap();
        let changed = [5u64, 6, 2048, 1024 * 1024 + 2999];
        let theirs = update(
            &mut p,
            Some(&ours),
            blocks,
            vec![(5, leaf(1)), (6, ZERO), (2048, leaf(7)), (1024 * 1024 + 2999, leaf(9))],
        )
        .unwrap();
        let (diff, rounds) = compare(&p, &theirs, Some(&ours), 1);
        assert_eq!(diff, Diff { fetch: vec![5, 2048, 1024 * 1024 + 2999], zeros: vec![6] });
        // The root, two level-1 nodes, three leaf pages: one node a round.
        assert_eq!(rounds, 1 + 2 + 3);
        assert_eq!(changed.len(), diff.fetch.len() + diff.zeros.len());
        let (same, rounds) = compare(&p, &theirs, Some(&theirs), 8);
        assert_eq!((same, rounds), (Diff::default(), 0), "equal roots: nothing to ask");
        let (all, _) = compare(&p, &ours, None, 64);
        assert_eq!(all.fetch, (0..blocks).step_by(3).collect::<Vec<_>>(), "no tree of ours: every block with data");
        assert!(all.zeros.is_empty());
    }

    #[test]
    fn a_comparison_refuses_pages_of_the_wrong_shape_and_stays_where_it_was() {
        let mut p = MemPages::default();
        let theirs = update(&mut p, None, 5000, (0..5000).map(|i| (i, leaf(i)))).unwrap();
        let mut walk = Comparison::new(&theirs, None);
        let root = walk.ask(10).to_vec();
        assert_eq!(root, vec![(1, 0)]);
        let good = node_entries(&p, &theirs, 1, 0).unwrap();
        let zeros = vec![ZERO; good.len()];
        assert_eq!(walk.feed(&[], &[]), Err(CompareError::PageCount { asked: 1, got: 0 }));
        let long = vec![leaf(1); good.len() + 1];
        assert_eq!(
            walk.feed(&[long], std::slice::from_ref(&zeros)),
            Err(CompareError::PageShape { level: 1, index: 0, got: 6, want: 5 })
        );
        assert_eq!(
            walk.feed(std::slice::from_ref(&good), &[vec![]]),
            Err(CompareError::PageShape { level: 1, index: 0, got: 0, want: 5 })
        );
        assert_eq!(walk.ask(10), &root[..], "still asking for the same node");
        walk.feed(&[good], &[zeros]).unwrap();
        assert_eq!(walk.ask(3), &[(0, 0), (0, 1), (0, 2)][..]);
        assert_eq!(walk.ask(100).len(), 3, "the same three until they are fed");
    }

    proptest! {
        /// Whatever the two trees and the batch size, the comparison finds exactly the leaves
        /// a plain array comparison finds.
        #[test]
        fn a_comparison_finds_what_a_leaf_by_leaf_comparison_finds(
            blocks in 1u64..5000,
            a in proptest::collection::btree_map(0u64..5000, 0u64..4, 0..60),
            b in proptest::collection::btree_map(0u64..5000, 0u64..4, 0..60),
            max in 1usize..20,
        ) {
            let mut p = MemPages::default();
            let tree = |p: &mut MemPages, m: &BTreeMap<u64, u64>| {
                let changes: Vec<_> = m.iter().filter(|(i, _)| **i < blocks)
                    .map(|(i, v)| (*i, if *v == 0 { ZERO } else { leaf(*v) })).collect();
                update(p, None, blocks, changes).unwrap()
            };
            let (ta, tb) = (tree(&mut p, &a), tree(&mut p, &b));
            let (la, lb) = (leaves(&p, &ta), leaves(&p, &tb));
            let mut want = Diff::default();
            for (i, (x, y)) in lb.iter().zip(&la).enumerate() {
                if x != y {
                    if *x == ZERO { want.zeros.push(i as u64) } else { want.fetch.push(i as u64) }
                }
            }
            prop_assert_eq!(compare(&p, &tb, Some(&ta), max).0, want);
        }
    }
}
