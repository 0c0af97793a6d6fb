//! kill -9 of the coordinator during an express full: after the restart the job is failed
//! with a reason, the replica is consistent or inconsistent (never silently wrong: its
//! latest recovery point restores either the old or the new disk exactly), the agent has let
//! go of its snapshot, and the next runs (an automatic consistency check, then an express
//! full) succeed and restore bit-exact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use common::*;
use std::path::Path;
use std::time::Duration;

const DISK: u64 = 512 << 20;

fn digest_of_source(root: &Path, vm: &str) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    sim::read_disk(root, vm, "os", &mut h).unwrap();
    h.finalize()
}

fn digest_of_restore(c: &Cluster, vm: &str) -> blake3::Hash {
    blake3::hash(&c.recover_disk(vm, "latest", "os"))
}

#[test]
fn a_coordinator_killed_during_an_express_full_loses_nothing() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 5,
        ..CreateVm::new("big", "node1", vec![DiskConfig { name: "os".into(), size: DISK }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("big").is_some());
    c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        "big",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--cc-when-inconsistent",
    ]);
    wait_until("initial replica", Duration::from_secs(120), || c.vm("big").unwrap()["replica_state"] == "consistent");
    let before = digest_of_source(&root, "big");

    sim::churn(&root, "big", 100.0, 1).unwrap();
    let after = digest_of_source(&root, "big");
    let started = c.json(&["backup", "big"]);
    let id = started["job_id"].as_u64().unwrap().to_string();
    wait_until("the express full is running", Duration::from_secs(30), || {
        c.json(&["job", "show", &id])["state"] == "running"
    });
    c.coordinator.signal(9);
    let _ = c.coordinator.child.wait();

    // Restart on the same data directory.
    std::fs::remove_file(c.dir().join("coordinator.addr")).unwrap();
    c.coordinator = Daemon::spawn(
        &["x-coordinator", "serve", "--data-dir", &c.dir_str()],
        c.root.path().join("coord-restarted.log"),
    );
    wait_until("coordinator.addr", Duration::from_secs(20), || c.dir().join("coordinator.addr").exists());
    let job = c.json(&["job", "show", &id]);
    assert_eq!(job["state"], "failed", "no job stays running after a restart: {job}");
    assert!(job["error"].as_str().unwrap().contains("interrupted"), "{job}");
    let state = c.vm("big").unwrap()["replica_state"].as_str().unwrap().to_owned();
    assert!(state == "inconsistent" || state == "consistent", "replica {state}");
    let restored = digest_of_restore(&c, "big");
    assert!(restored == before || restored == after, "the latest recovery point is one of the two disks exactly");

    // The agent reconnects and lets go of the dead job's snapshot; the automatic check and
    // the next express full succeed.
    wait_until("replica consistent again", Duration::from_secs(180), || {
        c.vm("big").unwrap()["replica_state"] == "consistent"
    });
    let job = c.json(&["backup", "big", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(digest_of_restore(&c, "big"), after, "the next recovery point restores bit-exact");
    let vm = Vm::open(&root, "big").unwrap();
    assert!(vm.config.snapshot.is_none() && vm.config.frozen.is_none(), "nothing left held or frozen");
}
