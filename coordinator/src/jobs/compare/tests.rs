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
                    let pages = nodes.iter().map(|&(l, i)| blockmap::node_entries(p, &theirs, l, i).unwrap()).collect();
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
    let steps =
        c.ours(vec![vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 1024], vec![ZERO; 904]]).unwrap();
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
                let pages = nodes.iter().map(|&(l, i)| blockmap::node_entries(p, &current, l, i).unwrap()).collect();
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
