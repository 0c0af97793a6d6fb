//! A store on a file system that fills up: ingest fails with a clear error, nothing committed
//! is harmed, and the store works again once space is freed. Uses a real size-limited tmpfs
//! (the test runs as root, as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_coordinator::catalog::{Catalog, CatalogError, RpDisk};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig, StoreError};
use bulwark_protocol::messages::Consistency;
use rand::{Rng, SeedableRng};
use std::process::Command;

const BS: usize = 64 << 10;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn open(dir: &std::path::Path) -> Store {
    let data = DataDir::new(dir);
    std::fs::create_dir_all(data.packs()).unwrap();
    let catalog = if data.catalog().exists() {
        Catalog::open(&data.catalog()).unwrap()
    } else {
        Catalog::create(&data.catalog()).unwrap()
    };
    Store::open(
        &data,
        catalog,
        StoreConfig { pack_max_bytes: 1 << 20, gc_filter_bytes: 1 << 16, ..StoreConfig::default() },
    )
    .unwrap()
}

/// Backs up one random 1 MiB disk; returns it and its digest, or the store's error.
fn backup(store: &Store, vm: &str, seed: u64) -> Result<(RpDisk, [u8; 32]), StoreError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ingest = store.begin();
    let mut changes = vec![];
    let mut h = blake3::Hasher::new();
    for i in 0..16u64 {
        let b: Vec<u8> = (0..BS).map(|_| rng.gen()).collect();
        h.update(&b);
        changes.push((i, ingest.put_block(&store.codec().hasher.id(&b), &b)?));
    }
    let root = ingest.update_tree(None, 16, changes)?;
    let disk = RpDisk { name: "os".into(), size_bytes: 16 * BS as u64, block_size: BS as u32, root };
    let rp = NewRecoveryPoint {
        vm: vm.into(),
        consistency: Consistency::Crash,
        config: vec![],
        disks: vec![disk.clone()],
        created_at: seed,
    };
    store.commit_recovery_point(ingest, rp, vec![])?;
    Ok((disk, *h.finalize().as_bytes()))
}

#[test]
fn a_full_disk_fails_ingest_clearly_and_the_store_recovers_when_space_is_freed() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(status.success(), "this test mounts a 24 MiB tmpfs and needs root (CI runs as root)");
    let _mount = Mount(mnt.clone());
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![1u8; 6 << 20]).unwrap();

    let dir = mnt.join("data");
    let store = open(&dir);
    let mut committed = vec![];
    let error = loop {
        match backup(&store, &format!("vm{}", committed.len()), committed.len() as u64 + 1) {
            Ok(done) => committed.push(done),
            Err(e) => break e,
        }
        assert!(committed.len() < 100, "the file system never filled up");
    };
    let text = error.to_string();
    assert!(
        matches!(error, StoreError::NoSpace { .. } | StoreError::Catalog(CatalogError::NoSpace)),
        "unclear error: {text}"
    );
    assert!(text.contains("no space left"), "unclear error: {text}");
    assert!(committed.len() >= 3, "some recovery points fit before the disk filled");

    // Everything committed still reads back while the disk is full.
    for (disk, digest) in &committed {
        assert_eq!(store.disk_digest(disk).unwrap(), *digest);
    }
    drop(store);

    // Free space: the store opens, is consistent, and works again.
    std::fs::remove_file(&ballast).unwrap();
    let store = open(&dir);
    assert!(store.verify().unwrap().is_clean());
    let (disk, digest) = backup(&store, "after", 999).unwrap();
    assert_eq!(store.disk_digest(&disk).unwrap(), digest);
    for (disk, digest) in &committed {
        assert_eq!(store.disk_digest(disk).unwrap(), *digest);
    }
    assert!(store.verify().unwrap().is_clean());
}
