//! Protection end to end with the real binaries on loopback (issue: coordinator jobs): a
//! two-node cluster on one sim storage root, three VMs of three consistency models, initial
//! replicas, churn, express fulls that move only the churn, bit-exact disk restores, an
//! untracked write that only a consistency check finds, a host crash that triggers a
//! consistency check by itself, and a live migration that protection follows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const DISK: u64 = 100 << 20;
const MIB: u64 = 1 << 20;

fn make_vm(root: &Path, name: &str, host: &str, os: &str, integration: bool, seed: u64) {
    let req = CreateVm {
        os: os.into(),
        integration_services: integration,
        random_fill: true,
        seed,
        ..CreateVm::new(name, host, vec![DiskConfig { name: "os".into(), size: DISK }])
    };
    sim::create_vm(root, &req).unwrap();
}

fn source(root: &Path, vm: &str) -> Vec<u8> {
    sim_disk(root, vm, "os")
}

fn restore(c: &Cluster, vm: &str, rp: &str) -> Vec<u8> {
    c.recover_disk(vm, rp, "os")
}

fn backup(c: &Cluster, vm: &str) -> serde_json::Value {
    let job = c.json(&["backup", vm, "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

fn jobs_of(c: &Cluster, vm: &str) -> Vec<serde_json::Value> {
    c.json(&["job", "list", "--vm", vm]).as_array().unwrap().clone()
}

#[test]
fn a_cluster_is_protected_end_to_end() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    make_vm(&root, "win", "node1", "windows", true, 1);
    make_vm(&root, "lin", "node2", "linux", true, 2);
    make_vm(&root, "noint", "node1", "windows", false, 3);
    c.enroll("node1");
    c.enroll("node2");
    c.run_sim_agent("node1", &root);
    c.run_sim_agent("node2", &root);
    wait_until("3 VMs reported", Duration::from_secs(30), || c.json(&["vm", "list"]).as_array().unwrap().len() == 3);

    let dir = c.dir_str();
    let g = c.json(&[
        "group",
        "create",
        "g1",
        "--vm",
        "win,lin,noint",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--cc-when-inconsistent",
    ]);
    assert_eq!(g["members"].as_array().unwrap().len(), 3);
    // A VM is in at most one group.
    let twice = c.run(&["group", "create", "g2", "--vm", "win"]);
    assert_eq!(twice.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already protected by group g1"));

    wait_until("initial replicas consistent", Duration::from_secs(180), || {
        ["win", "lin", "noint"].iter().all(|v| c.vm(v).unwrap()["replica_state"] == "consistent")
    });
    for (vm, consistency) in [("win", "app"), ("lin", "filesystem"), ("noint", "crash")] {
        let rps = c.json(&["rp", "list", vm]);
        assert_eq!(rps.as_array().unwrap().len(), 1, "the initial copy is the first recovery point");
        assert_eq!(rps[0]["consistency"], consistency, "{vm}");
        // The replica is committed a moment before its job is recorded as succeeded.
        wait_until("the initial job recorded", Duration::from_secs(30), || {
            jobs_of(&c, vm).iter().any(|j| j["kind"] == "initial" && j["state"] == "succeeded")
        });
        let initial = jobs_of(&c, vm).into_iter().find(|j| j["kind"] == "initial").unwrap();
        assert_eq!(initial["state"], "succeeded");
        assert_eq!(initial["bytes_transferred"], DISK, "random disks: every block moves once");
    }
    assert_eq!(restore(&c, "win", "latest"), source(&root, "win"), "the initial recovery point restores bit-exact");

    // 2 % churn → express full moves ≤ 3 % and restores bit-exact, with each VM's consistency.
    for (i, (vm, consistency)) in [("win", "app"), ("lin", "filesystem"), ("noint", "crash")].into_iter().enumerate() {
        let written = sim::churn(&root, vm, 2.0, 100 + i as u64).unwrap();
        assert_eq!(written, 2 * MIB);
        let job = backup(&c, vm);
        assert_eq!(job["kind"], "express-full");
        assert_eq!(job["consistency"], consistency);
        let moved = job["bytes_transferred"].as_u64().unwrap();
        assert!(moved > 0 && moved * 100 <= 3 * DISK, "{vm}: {moved} bytes moved for 2 % churn");
        assert_eq!(restore(&c, vm, "latest"), source(&root, vm), "{vm} restores bit-exact");
    }
    // The first recovery point still restores what the disk was before the churn.
    let rps = c.json(&["rp", "list", "win"]);
    let first = rps[0]["id"].as_str().unwrap()[..8].to_owned();
    assert_ne!(restore(&c, "win", &first), source(&root, "win"));

    // An untracked write (straight into the image) survives an express full unnoticed …
    let image = root.join("vms/win/os.img");
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    for block in [7u64, 8, 60] {
        f.write_all_at(&[0xAB; 4096], block * MIB + 100).unwrap();
    }
    f.sync_all().unwrap();
    let job = backup(&c, "win");
    assert_eq!(job["bytes_transferred"], 0, "nothing tracked changed");
    assert_ne!(restore(&c, "win", "latest"), source(&root, "win"), "the replica missed the untracked write");
    // … and the consistency check finds and repairs exactly those blocks.
    let cc = c.json(&["cc", "win", "--wait"]);
    assert_eq!(cc["state"], "succeeded", "{cc}");
    assert_eq!(cc["kind"], "consistency-check");
    assert_eq!(cc["blocks_changed"], 3, "{cc}");
    assert_eq!(cc["bytes_transferred"], 3 * MIB);
    assert_eq!(cc["bytes_scanned"], DISK, "the check reads the whole source");
    let job = backup(&c, "win");
    assert_eq!(job["bytes_transferred"], 0);
    assert_eq!(restore(&c, "win", "latest"), source(&root, "win"), "repaired: restores bit-exact");

    // A host crash loses tracking for the VMs running there: they get a check by themselves.
    let crashed = sim::crash_host(&root, "node2").unwrap();
    assert_eq!(crashed, vec!["lin".to_owned()]);
    wait_until("lin checked automatically after the crash", Duration::from_secs(90), || {
        jobs_of(&c, "lin").iter().any(|j| j["kind"] == "consistency-check" && j["state"] == "succeeded")
            && c.vm("lin").unwrap()["replica_state"] == "consistent"
    });
    let cc = jobs_of(&c, "lin").into_iter().find(|j| j["kind"] == "consistency-check").unwrap();
    assert_eq!(cc["blocks_changed"], 0, "nothing had changed: the check moved nothing");
    sim::churn(&root, "lin", 2.0, 7).unwrap();
    backup(&c, "lin");
    assert_eq!(restore(&c, "lin", "latest"), source(&root, "lin"));

    // Live migration: the next express full runs on the new node and sends only the churn.
    sim::migrate(&root, "noint", "node2", false).unwrap();
    wait_until("noint reported by node2", Duration::from_secs(40), || c.vm("noint").unwrap()["host"] == "node2");
    sim::churn(&root, "noint", 2.0, 9).unwrap();
    let job = backup(&c, "noint");
    let moved = job["bytes_transferred"].as_u64().unwrap();
    assert!(moved > 0 && moved * 100 <= 3 * DISK, "after migration: {moved} bytes");
    assert!(c.agents[1].log_text().contains("job requested"), "node2 ran the job");
    assert_eq!(restore(&c, "noint", "latest"), source(&root, "noint"));

    let _ = dir;
}
