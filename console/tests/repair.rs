//! Automatic consistency checks for the causes not covered elsewhere: a storage migration
//! (tracking reset) and a chunk that verify finds bad — whose block is re-fetched from the
//! source although the digests of the trees agree, healing the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn cc_count(c: &Cluster, vm: &str) -> usize {
    c.json(&["job", "list", "--vm", vm])
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "consistency-check" && j["state"] == "succeeded")
        .count()
}

#[test]
fn storage_migration_and_a_bad_chunk_each_trigger_a_check_that_repairs() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 21,
        ..CreateVm::new("app", "node1", vec![DiskConfig { name: "os".into(), size: 32 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.enroll("node2");
    c.run_sim_agent("node1", &root);
    c.run_sim_agent("node2", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("app").is_some());
    c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        "app",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--cc-when-inconsistent",
    ]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("app").unwrap()["replica_state"] == "consistent");
    let plan = c.json(&["group", "plan", "g"]);
    assert_eq!(plan["total_data_bytes"], 32 * MIB);
    assert_eq!(plan["recommended_bytes"], 48 * MIB, "32 MiB × (1 + 10 %/day × 5 days)");
    assert!(plan["free_bytes"].as_u64().unwrap() > 0);

    // Storage migration: tracking resets; the replica is checked by itself on the new node.
    sim::migrate(&root, "app", "node2", true).unwrap();
    wait_until("a check after the storage migration", Duration::from_secs(90), || {
        cc_count(&c, "app") == 1 && c.vm("app").unwrap()["replica_state"] == "consistent"
    });
    assert_eq!(c.vm("app").unwrap()["host"], "node2");
    let job = c.json(&["backup", "app", "--wait"]);
    assert_eq!(job["bytes_transferred"], 0, "after the check, tracking is current again");

    // Damage one stored chunk: verify finds it and marks the replica inconsistent; the check
    // re-fetches that block from the source (the trees agree) and the store is whole again.
    let packs = c.dir().join("store/packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&pack, bytes).unwrap();
    let verify = c.run(&["verify", "--wait", "--output", "json"]);
    assert_eq!(verify.status.code(), Some(1), "verify fails on the damaged chunk");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert!(report["error"].as_str().unwrap().contains("bad chunk"), "{report}");
    wait_until("a check after verify found a bad chunk", Duration::from_secs(90), || {
        cc_count(&c, "app") == 2 && c.vm("app").unwrap()["replica_state"] == "consistent"
    });
    let cc = c.json(&["job", "list", "--vm", "app"]);
    let last = cc.as_array().unwrap().iter().rfind(|j| j["kind"] == "consistency-check").unwrap().clone();
    assert!(last["bytes_transferred"].as_u64().unwrap() > 0, "the bad block was fetched again: {last}");
    let verify = c.json(&["verify", "--wait"]);
    assert_eq!(verify["state"], "succeeded", "healed: {verify}");
    assert_eq!(c.recover_disk("app", "latest", "os"), sim_disk(&root, "app", "os"));
}
