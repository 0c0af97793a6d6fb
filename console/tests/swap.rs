//! Swap exclusion ("excludes the page file from incremental backups"): a disk with an MBR
//! swap partition that the guest churns heavily; the express full moves only the non-swap
//! churn, `vm list` shows the excluded bytes, and the restored disk's swap partition still
//! carries its signature. When the partition stops being swap between two backups, the next
//! recovery point has its new data: the exclusion holds only while the blocks it was found
//! from are unchanged in the snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::Vm;
use common::*;
use std::io::Write;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn swap_churn_stays_out_of_express_fulls_and_the_signature_survives() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    // 64 MiB: p1 data at 1 MiB (31 MiB), p2 swap at 32 MiB (32 MiB, type 0x82, mkswap signature).
    let image = c.root.path().join("disk.img");
    {
        let mut d =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&image).unwrap();
        d.set_len(64 * MIB).unwrap();
        let mut mbr = mbrman::MBR::new_from(&mut d, 512, [9, 9, 9, 9]).unwrap();
        mbr[1] = mbr_entry(2048, 63488, 0x83);
        mbr[2] = mbr_entry(65536, 65536, 0x82);
        mbr.write_into(&mut d).unwrap();
        use std::io::{Seek, SeekFrom};
        d.seek(SeekFrom::Start(32 * MIB + 4086)).unwrap();
        d.write_all(b"SWAPSPACE2").unwrap();
        d.seek(SeekFrom::Start(2 * MIB)).unwrap();
        d.write_all(&vec![0x5A; (4 * MIB) as usize]).unwrap();
    }
    sim_vm_from_image(&root, "sw", 64 * MIB, &image);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("sw").is_some());
    c.json(&["group", "create", "g", "--vm", "sw", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica with swap found", Duration::from_secs(60), || {
        let v = c.vm("sw").unwrap();
        v["replica_state"] == "consistent" && v["excluded_bytes"] == 31 * MIB
    });

    // Heavy swap churn (19 blocks, not the header's) and 2 blocks of data churn.
    {
        let mut vm = Vm::open(&root, "sw").unwrap();
        for b in 33..52u64 {
            vm.guest_write("os", b * MIB, &vec![b as u8; MIB as usize]).unwrap();
        }
        vm.guest_write("os", 10 * MIB, &vec![1u8; MIB as usize]).unwrap();
        vm.guest_write("os", 20 * MIB, &vec![2u8; MIB as usize]).unwrap();
    }
    let job = c.json(&["backup", "sw", "--wait"]);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["bytes_transferred"], 2 * MIB, "2 data blocks, none of the 19 swap blocks");

    let restored = c.recover_disk("sw", "latest", "os");
    assert_eq!(
        &restored[(32 * MIB + 4086) as usize..(32 * MIB + 4096) as usize],
        b"SWAPSPACE2",
        "the swap signature survives"
    );
    let source = sim_disk(&root, "sw", "os");
    assert_eq!(restored[..(32 * MIB) as usize], source[..(32 * MIB) as usize], "everything outside swap is exact");

    // The guest turns the swap partition into a file system and fills it before the next
    // backup (mkfs rewrites the partition's first block; the table says Linux now). Nothing of
    // it may be left out on the strength of the scan of the replica.
    {
        let mut vm = Vm::open(&root, "sw").unwrap();
        let mut table = vec![0u8; 512];
        vm.guest_read("os", 0, &mut table).unwrap();
        table[446 + 16 + 4] = 0x83;
        vm.guest_write("os", 0, &table).unwrap();
        let mut first = vec![0u8; MIB as usize];
        first[1024 + 56..1024 + 58].copy_from_slice(&[0x53, 0xEF]);
        vm.guest_write("os", 32 * MIB, &first).unwrap();
        for b in 40..44u64 {
            vm.guest_write("os", b * MIB, &vec![0xE0 | b as u8; MIB as usize]).unwrap();
        }
    }
    let job = c.json(&["backup", "sw", "--wait"]);
    assert_eq!(job["state"], "succeeded");
    assert!(
        job["bytes_transferred"].as_u64().unwrap() >= 21 * MIB,
        "the table's block and the whole former swap partition, the 19 blocks left out before too: {job}"
    );
    let restored = c.recover_disk("sw", "latest", "os");
    let source = sim_disk(&root, "sw", "os");
    assert!(restored == source, "the recovery point holds the new file system's data bit for bit");
    wait_until("the scan of the new replica finds no swap", Duration::from_secs(30), || {
        c.vm("sw").unwrap()["excluded_bytes"] == 0
    });
}
