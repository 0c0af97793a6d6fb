//! The replica store through its public API, on real files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_coordinator::catalog::{Catalog, ReplicaRecord, ReplicaState, RpDisk};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig, StoreError};
use bulwark_protocol::block::Digest;
use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::messages::Consistency;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const BS: usize = 4096;

fn open(dir: &std::path::Path, encrypt: bool, pack_max: u64) -> Store {
    let data = DataDir::new(dir);
    std::fs::create_dir_all(data.packs()).unwrap();
    if encrypt && !data.store_key().exists() {
        std::fs::write(data.store_key(), [42u8; 32]).unwrap();
    }
    let catalog = if data.catalog().exists() {
        Catalog::open(&data.catalog()).unwrap()
    } else {
        Catalog::create(&data.catalog()).unwrap()
    };
    let cfg = StoreConfig { pack_max_bytes: pack_max, gc_filter_bytes: 1 << 20, ..StoreConfig::default() };
    Store::open(&data, catalog, cfg).unwrap()
}

/// A disk image as blocks: a seeded mix of random, compressible and zero blocks.
fn image(seed: u64, blocks: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..blocks)
        .map(|_| match rng.gen_range(0..4) {
            0 => vec![0u8; BS],
            1 => vec![rng.gen::<u8>(); BS],
            _ => (0..BS).map(|_| rng.gen()).collect(),
        })
        .collect()
}

fn image_digest(blocks: &[Vec<u8>]) -> Digest {
    let mut h = blake3::Hasher::new();
    for b in blocks {
        h.update(b);
    }
    *h.finalize().as_bytes()
}

/// Ingests the blocks that differ from `old` (all of them without `old`); commits a recovery
/// point; returns it.
fn backup(store: &Store, vm: &str, old: Option<(&TreeRoot, &[Vec<u8>])>, new: &[Vec<u8>]) -> (RpDisk, u64) {
    let mut ingest = store.begin();
    let hasher = store.codec().hasher.clone();
    let mut changes = vec![];
    for (i, b) in new.iter().enumerate() {
        if old.is_some_and(|(_, o)| o[i] == *b) {
            continue;
        }
        let id = hasher.id(b);
        changes.push((i as u64, ingest.put_block(&id, b).unwrap()));
    }
    let root = ingest.update_tree(old.map(|(r, _)| r), new.len() as u64, changes).unwrap();
    let disk = RpDisk { name: "os".into(), size_bytes: (new.len() * BS) as u64, block_size: BS as u32, root };
    let replica = ReplicaRecord {
        vm: vm.into(),
        disk: "os".into(),
        size_bytes: disk.size_bytes,
        block_size: BS as u32,
        state: ReplicaState::Consistent,
        root: Some(root),
        change_token: None,
        reason: None,
        updated_at: 0,
        excluded: vec![],
        swap_witness: vec![],
    };
    let new_bytes = ingest.new_bytes;
    let rp = NewRecoveryPoint {
        vm: vm.into(),
        consistency: Consistency::App,
        config: b"cfg".to_vec(),
        disks: vec![disk.clone()],
        created_at: now_ms(),
    };
    store.commit_recovery_point(ingest, rp, vec![replica]).unwrap();
    (disk, new_bytes)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn a_recovery_point_reads_back_bit_exact_plain_and_encrypted() {
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), encrypt, 1 << 20);
        let img = image(1, 300);
        let (disk, _) = backup(&store, "vm1", None, &img);
        assert_eq!(store.disk_digest(&disk).unwrap(), image_digest(&img));
        let rps = store.catalog().recovery_points("vm1").unwrap();
        assert_eq!(rps.len(), 1);
        assert_eq!(rps[0].config, b"cfg");
        drop(store);
        let store = open(dir.path(), encrypt, 1 << 20);
        assert_eq!(store.disk_digest(&disk).unwrap(), image_digest(&img), "after reopen");
        assert!(store.verify().unwrap().is_clean());
    }
}

#[test]
fn reading_ahead_on_many_threads_hands_over_every_block_in_order_and_stops_on_the_first_error() {
    use bulwark_coordinator::store::readahead::ReadAhead;
    use bulwark_coordinator::store::BlockData;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true, 1 << 20);
    let mut img = image(7, 333);
    // A last block shorter than the others (a disk size that is no multiple of the block).
    img.last_mut().unwrap().truncate(1000);
    let (mut disk, _) = backup(&store, "vm1", None, &img);
    disk.size_bytes = (332 * BS + 1000) as u64;
    for how in
        [ReadAhead { workers: 1, ahead: 1 }, ReadAhead { workers: 3, ahead: 4 }, ReadAhead { workers: 8, ahead: 64 }]
    {
        let mut got = vec![];
        store
            .read_leaves(
                &disk,
                how,
                |_| true,
                |i, id, b| {
                    let bytes = match b {
                        BlockData::Zero(n) => vec![0; n],
                        BlockData::Data(d) => d.to_vec(),
                    };
                    if !bytes.iter().all(|&x| x == 0) {
                        assert_eq!(*id, store.codec().hasher.id(&bytes), "block {i} comes with its id");
                    }
                    got.push((i, bytes));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(got.len(), img.len(), "{how:?}");
        assert!(got.iter().enumerate().all(|(k, (i, b))| *i == k as u64 && *b == img[k]), "{how:?}: in order, exact");
        // Only the blocks asked for, still in order.
        let mut odd = vec![];
        store
            .read_leaves(
                &disk,
                how,
                |i| i % 2 == 1,
                |i, _, _| {
                    odd.push(i);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(odd, (0..333).filter(|i| i % 2 == 1).collect::<Vec<u64>>(), "{how:?}");
        // A consumer that gives up stops the read (no thread left waiting).
        let mut seen = 0;
        let e = store.read_leaves(
            &disk,
            how,
            |_| true,
            |i, _, _| {
                seen += 1;
                if i == 100 {
                    return Err(StoreError::BlockMap("the console went away".into()));
                }
                Ok(())
            },
        );
        assert!(matches!(e, Err(StoreError::BlockMap(m)) if m.contains("went away")), "{how:?}");
        assert_eq!(seen, 101);
    }
    // A corrupt chunk is an error at its place in the disk, never wrong bytes.
    let bad = (0..img.len()).find(|&i| img[i].iter().any(|&x| x != 0) && i > 50).unwrap();
    let id = store.codec().hasher.id(&img[bad]);
    let loc = store.catalog().chunk(&id).unwrap().unwrap();
    let path = store.packs_dir().join(format!("{:08}.pack", loc.pack));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + 60) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let mut before = 0;
    let e = store.read_leaves(
        &disk,
        ReadAhead { workers: 4, ahead: 16 },
        |_| true,
        |i, _, _| {
            assert!((i as usize) < bad, "nothing from the bad block on");
            before += 1;
            Ok(())
        },
    );
    assert!(matches!(e, Err(StoreError::ChunkCorrupt { .. })), "{e:?}");
    assert!(before <= bad);
}

#[test]
fn encrypted_packs_do_not_contain_the_plain_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true, 1 << 20);
    let img: Vec<Vec<u8>> =
        (0..8).map(|i| format!("plain-text-marker-{i}-").repeat(300).into_bytes()[..BS].to_vec()).collect();
    backup(&store, "vm1", None, &img);
    for entry in std::fs::read_dir(store.packs_dir()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(17).any(|w| w == b"plain-text-marker"));
    }
}

#[test]
fn an_incremental_after_churn_stores_about_the_churn_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 8 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let img: Vec<Vec<u8>> = (0..2000).map(|_| (0..BS).map(|_| rng.gen()).collect()).collect();
    let (d1, _) = backup(&store, "vm1", None, &img);
    let mut churned = img.clone();
    for i in (0..2000).step_by(50) {
        churned[i] = (0..BS).map(|_| rng.gen()).collect(); // 2 % of the blocks
    }
    let (d2, added) = backup(&store, "vm1", Some((&d1.root, &img)), &churned);
    let churn_bytes = (40 * BS) as u64;
    assert!(
        added >= churn_bytes && added < churn_bytes + churn_bytes / 2 + 3 * 32 * 1024,
        "added {added} for {churn_bytes} of churn"
    );
    assert_eq!(store.disk_digest(&d1).unwrap(), image_digest(&img));
    assert_eq!(store.disk_digest(&d2).unwrap(), image_digest(&churned));
}

#[test]
fn a_block_that_does_not_match_its_claimed_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 1 << 20);
    let mut ingest = store.begin();
    let victim = vec![7u8; BS];
    let forged = store.codec().hasher.id(&vec![8u8; BS]);
    assert!(matches!(ingest.put_block(&forged, &victim), Err(StoreError::DigestMismatch { .. })));
    assert!(store.catalog().chunk(&forged).unwrap().is_none(), "nothing planted under the claimed digest");
    assert_eq!(ingest.new_chunks, 0);
}

#[test]
fn zero_blocks_are_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 1 << 20);
    let img = vec![vec![0u8; BS]; 5000];
    let (disk, added) = backup(&store, "vm1", None, &img);
    assert_eq!(added, 0);
    assert_eq!(disk.root.digest, bulwark_protocol::blockmap::ZERO);
    assert_eq!(store.disk_digest(&disk).unwrap(), image_digest(&img));
}

#[test]
fn vms_cloned_from_one_image_dedup_against_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 8 << 20);
    let img = image(3, 500);
    let (_, first) = backup(&store, "vm0", None, &img);
    for vm in 1..10 {
        let (disk, added) = backup(&store, &format!("vm{vm}"), None, &img);
        assert_eq!(added, 0, "a clone adds nothing");
        assert_eq!(store.disk_digest(&disk).unwrap(), image_digest(&img));
    }
    assert!(first > 0);
}

#[test]
fn a_flipped_byte_is_named_by_verify_fails_reads_and_heals_when_a_good_copy_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 1 << 20);
    let img: Vec<Vec<u8>> = (0..64u32).map(|i| (0..BS).map(|k| (k as u32 * 31 + i) as u8).collect()).collect();
    let (d1, _) = backup(&store, "vm1", None, &img);
    let (d2, _) = backup(&store, "vm2", None, &img);
    // Corrupt the chunk of block 5 in its pack.
    let id = store.codec().hasher.id(&img[5]);
    let loc = store.catalog().chunk(&id).unwrap().unwrap();
    let path = store.packs_dir().join(format!("{:08}.pack", loc.pack));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + 60) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    drop(store);
    let store = open(dir.path(), false, 1 << 20);

    match store.read_chunk(&id) {
        Err(StoreError::ChunkCorrupt { id: bad, pack, offset, .. }) => {
            assert_eq!((bad, pack, offset), (id, loc.pack, loc.offset));
        }
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    assert!(matches!(store.disk_digest(&d1), Err(StoreError::ChunkCorrupt { .. })), "never wrong bytes");

    let report = store.verify().unwrap();
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].id, id);
    assert_eq!(report.affected_recovery_points.len(), 2, "both VMs share the chunk");
    assert_eq!(report.replicas_marked_inconsistent.len(), 2);
    assert_eq!(store.catalog().replica("vm1", "os").unwrap().unwrap().state, ReplicaState::Inconsistent);

    // The source sends the block again: the good copy replaces the bad one for everyone.
    let mut ingest = store.begin();
    ingest.put_block(&id, &img[5]).unwrap();
    store.commit_replicas(ingest, vec![]).unwrap();
    assert_eq!(store.disk_digest(&d1).unwrap(), image_digest(&img));
    assert_eq!(store.disk_digest(&d2).unwrap(), image_digest(&img));
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn prune_then_gc_frees_space_and_keeps_every_remaining_point_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 64 << 10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut img: Vec<Vec<u8>> = (0..200).map(|_| (0..BS).map(|_| rng.gen()).collect()).collect();
    let (mut disk, _) = backup(&store, "vm1", None, &img);
    let mut kept = vec![];
    for round in 0..6 {
        let old = img.clone();
        for b in img.iter_mut().take(120) {
            *b = (0..BS).map(|_| rng.gen()).collect();
        }
        let (d, _) = backup(&store, "vm1", Some((&disk.root, &old)), &img);
        disk = d;
        if round >= 4 {
            kept.push((disk.clone(), image_digest(&img)));
        }
    }
    let before: u64 = store.catalog().packs().unwrap().iter().map(|(_, l)| l).sum();
    // Keep the last two recovery points.
    let rps = store.catalog().recovery_points("vm1").unwrap();
    let cutoff = rps[rps.len() - 2].created_at;
    let dropped = store.prune("vm1", now_ms() - cutoff, now_ms()).unwrap();
    assert_eq!(dropped.len(), rps.len() - 2);
    let report = store.gc().unwrap();
    let after: u64 = store.catalog().packs().unwrap().iter().map(|(_, l)| l).sum();
    assert!(after < before / 2, "GC freed too little: {before} → {after} ({report:?})");
    assert!(report.packs_deleted + report.packs_rewritten > 0);
    for (d, digest) in &kept {
        assert_eq!(store.disk_digest(d).unwrap(), *digest);
    }
    assert!(store.verify().unwrap().is_clean());
    drop(store);
    let store = open(dir.path(), false, 64 << 10);
    for (d, digest) in &kept {
        assert_eq!(store.disk_digest(d).unwrap(), *digest, "after reopen");
    }
}

#[test]
fn gc_running_alongside_ingest_never_loses_a_committed_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 32 << 10);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let committed = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.gc().unwrap();
                runs += 1;
            }
            runs
        });
        let mut committed = vec![];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Images share many blocks, so ingests dedup against chunks GC is judging.
        let pool: Vec<Vec<u8>> = (0..40).map(|_| (0..BS).map(|_| rng.gen()).collect()).collect();
        for round in 0..60 {
            let img: Vec<Vec<u8>> = (0..30).map(|_| pool[rng.gen_range(0..pool.len())].clone()).collect();
            let vm = format!("vm{}", round % 3);
            let (disk, _) = backup(&store, &vm, None, &img);
            // Keep only the newest recovery point of each VM, so GC has garbage to chase.
            store.prune(&vm, 0, now_ms() + 1).unwrap();
            committed.push((vm, disk, image_digest(&img)));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(gc.join().unwrap() > 0);
        committed
    });
    store.gc().unwrap();
    let live: HashMap<String, Vec<u8>> = ["vm0", "vm1", "vm2"]
        .iter()
        .map(|vm| (vm.to_string(), store.catalog().recovery_points(vm).unwrap().last().unwrap().id.to_vec()))
        .collect();
    assert_eq!(live.len(), 3);
    for (vm, disk, digest) in committed.iter().rev().take(3) {
        assert_eq!(store.disk_digest(disk).unwrap(), *digest, "{vm}");
    }
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn an_uncommitted_tail_left_by_a_crash_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(9, 100);
    let disk = {
        let store = open(dir.path(), false, 1 << 20);
        let (disk, _) = backup(&store, "vm1", None, &img);
        // An ingest that never commits: its chunks are in the pack and the index only.
        let mut ingest = store.begin();
        for b in image(10, 50).iter().filter(|b| b.iter().any(|x| *x != 0)) {
            ingest.put_block(&store.codec().hasher.id(b), b).unwrap();
        }
        std::mem::forget(ingest);
        disk
    };
    let store = open(dir.path(), false, 1 << 20);
    for (id, loc) in store.catalog().chunk_entries().map(Result::unwrap) {
        let len = store.catalog().packs().unwrap().into_iter().find(|(p, _)| *p == loc.pack).unwrap().1;
        assert!(loc.offset + u64::from(loc.len) <= len, "index entry {id:?} points past the durable length");
    }
    assert_eq!(store.disk_digest(&disk).unwrap(), image_digest(&img));
    assert!(store.verify().unwrap().is_clean());
    // And the store keeps working.
    let (d2, _) = backup(&store, "vm2", None, &image(10, 50));
    assert_eq!(store.disk_digest(&d2).unwrap(), image_digest(&image(10, 50)));
}

#[derive(Debug, Clone)]
enum Op {
    Backup { vm: u8, churn: Vec<(u8, u8)> },
    Prune { vm: u8, keep_newest: u8 },
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, proptest::collection::vec((0u8..48, 0u8..6), 0..20)).prop_map(|(vm, churn)| Op::Backup { vm, churn }),
        1 => (0u8..3, 1u8..3).prop_map(|(vm, keep_newest)| Op::Prune { vm, keep_newest }),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

fn block_for(v: u8, i: u8) -> Vec<u8> {
    if v == 0 {
        return vec![0u8; BS];
    }
    // Few distinct values, so VMs share chunks and GC has to be careful.
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(v) * 1000 + u64::from(i % 4));
    (0..BS).map(|_| rng.gen()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever the interleaving of ingest, commit, prune, GC and reopen, every recovery point
    /// in the catalog reads back exactly what was ingested for it.
    #[test]
    fn every_recovery_point_reads_back_what_was_ingested(ops in proptest::collection::vec(op(), 1..25), encrypt in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), encrypt, 16 << 10);
        let mut images: HashMap<u8, (Vec<Vec<u8>>, TreeRoot)> = HashMap::new();
        let mut expected: HashMap<[u8; 16], Digest> = HashMap::new();
        let mut clock = 1u64;
        for op in ops {
            match op {
                Op::Backup { vm, churn } => {
                    let (old, root) = images.get(&vm).cloned().map(|(i, r)| (Some(i), Some(r))).unwrap_or((None, None));
                    let mut img = old.clone().unwrap_or_else(|| vec![vec![0u8; BS]; 48]);
                    for (i, v) in churn {
                        img[i as usize] = block_for(v, i);
                    }
                    let (disk, _) = backup(&store, &format!("vm{vm}"), old.as_deref().zip(root.as_ref()).map(|(o, r)| (r, o)), &img);
                    let rp = store.catalog().recovery_points(&format!("vm{vm}")).unwrap().pop().unwrap();
                    expected.insert(rp.id, image_digest(&img));
                    images.insert(vm, (img, disk.root));
                    clock += 1;
                }
                Op::Prune { vm, keep_newest } => {
                    let rps = store.catalog().recovery_points(&format!("vm{vm}")).unwrap();
                    if rps.len() > keep_newest as usize {
                        let cutoff = rps[rps.len() - keep_newest as usize].created_at;
                        let now = now_ms();
                        store.prune(&format!("vm{vm}"), now - cutoff, now).unwrap();
                    }
                }
                Op::Gc => { store.gc().unwrap(); }
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path(), encrypt, 16 << 10);
                }
            }
            for rp in store.catalog().all_recovery_points().unwrap() {
                prop_assert_eq!(store.disk_digest(&rp.disks[0]).unwrap(), expected[&rp.id]);
            }
        }
        prop_assert!(store.verify().unwrap().is_clean());
        let _ = clock;
    }
}

#[test]
fn a_held_block_map_survives_prune_and_gc_until_its_hold_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false, 64 << 10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let first: Vec<Vec<u8>> = (0..100).map(|_| (0..BS).map(|_| rng.gen()).collect()).collect();
    let (mounted, _) = backup(&store, "vm1", None, &first);
    let hold = store.hold(mounted.root);
    let second: Vec<Vec<u8>> = (0..100).map(|_| (0..BS).map(|_| rng.gen()).collect()).collect();
    backup(&store, "vm1", Some((&mounted.root, &first)), &second);
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(store.prune("vm1", 1, now_ms()).unwrap().len(), 1, "the first point is pruned");
    store.gc().unwrap();
    assert_eq!(store.disk_digest(&mounted).unwrap(), image_digest(&first), "held: still whole after GC");
    drop(hold);
    store.gc().unwrap();
    assert!(store.disk_digest(&mounted).is_err(), "released: GC took its chunks");
}
