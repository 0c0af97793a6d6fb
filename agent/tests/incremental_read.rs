//! A 10 GiB sparse disk with 1 % churn: the incremental read touches about 1 % of the image,
//! returns exactly the guest's data at the snapshot point, and memory stays bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_agent::reader::read_blocks;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use bulwark_protocol::block::{ChunkHasher, ZERO};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn one_percent_churn_on_a_ten_gib_sparse_disk_reads_about_one_percent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let size = 10u64 << 30;
    let req = CreateVm::new("big", "node1", vec![DiskConfig { name: "os".into(), size }]);
    sim::create_vm(root, &req).unwrap();
    // Baseline: a confirmed token.
    let token = {
        let mut vm = Vm::open(root, "big").unwrap();
        vm.take_snapshot("node1", 1).unwrap();
        vm.release_snapshot().unwrap();
        vm.confirm().unwrap()
    };
    let churned = sim::churn(root, "big", 1.0, 42).unwrap();
    assert_eq!(churned, 102 << 20, "1 % of 10,240 blocks of 1 MiB");

    let mut vm = Vm::open(root, "big").unwrap();
    let (_, t) = vm.take_snapshot("node1", 2).unwrap();
    assert_eq!(t, token);
    let changed = vm.changes_since("os", Some(token)).unwrap().dirty_blocks(1 << 20);
    let (image, disk_size) = vm.snapshot_source("os").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let expected: Vec<[u8; 32]> = changed
        .iter()
        .map(|&b| {
            vm.guest_read("os", b << 20, &mut buf).unwrap();
            *blake3::hash(&buf).as_bytes()
        })
        .collect();
    drop(vm); // the reader needs no lock: guest writes may go on meanwhile
    Vm::open(root, "big").unwrap().guest_write("os", changed[0] << 20, &[0xEE; 4096]).unwrap();

    let hasher = ChunkHasher::plain();
    let mut k = 0;
    let stats = read_blocks(&image, disk_size, 1 << 20, changed.iter().copied(), &hasher, |b| {
        assert_eq!(b.index, changed[k]);
        assert_ne!(b.id, ZERO);
        assert_eq!(
            *blake3::hash(b.data).as_bytes(),
            expected[k],
            "block {} differs from the guest at the snapshot point",
            b.index
        );
        k += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(k, changed.len());
    let fraction = stats.bytes_read as f64 / size as f64;
    eprintln!(
        "read {} bytes = {:.3} % of the 10 GiB disk; peak RSS {} KiB",
        stats.bytes_read,
        fraction * 100.0,
        peak_rss_kib()
    );
    assert!((0.009..=0.011).contains(&fraction), "the incremental read touched {:.3} % of the disk", fraction * 100.0);
    // Bounded: one batch of blocks, whatever the disk size.
    assert!(peak_rss_kib() < 48 * 1024, "peak RSS {} KiB", peak_rss_kib());

    let mut vm = Vm::open(root, "big").unwrap();
    vm.release_snapshot().unwrap();
    vm.confirm().unwrap();
    let mut after = vec![0u8; 4096];
    vm.guest_read("os", changed[0] << 20, &mut after).unwrap();
    assert_eq!(after, vec![0xEE; 4096], "the write made during the read survived the release");
}
