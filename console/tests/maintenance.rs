//! Store maintenance through the real daemon: verify, prune and GC run as persisted jobs on
//! the store's worker threads, and `job list/show/wait` report them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_coordinator::catalog::{Catalog, ReplicaRecord, ReplicaState, RpDisk};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig};
use bulwark_protocol::messages::Consistency;
use common::*;

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

#[test]
fn maintenance_jobs_run_on_the_store_and_are_recorded() {
    let c = Cluster::start();
    let d = c.dir_str();
    for kind in ["verify", "prune", "gc"] {
        let job = json(&["--data-dir", &d, kind, "--wait", "--output", "json"]);
        assert_eq!(job["kind"], kind);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(job["finished_at"].is_string() && job["error"].is_null());
    }
    let started = json(&["--data-dir", &d, "verify", "--output", "json"]);
    let id = started["job_id"].as_u64().unwrap();
    let done = json(&["--data-dir", &d, "job", "wait", &id.to_string(), "--output", "json"]);
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["id"], id);
    let list = json(&["--data-dir", &d, "job", "list", "--output", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 4);
    let shown = json(&["--data-dir", &d, "job", "show", &id.to_string(), "--output", "json"]);
    assert_eq!(shown, done);
    let missing = bulwark(&["--data-dir", &d, "job", "show", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no job 999"));
}

#[test]
fn verify_names_a_corrupt_chunk_and_fails_its_job() {
    let c = Cluster::start_with(|dir| {
        // A recovery point in the store before the coordinator starts, then a flipped byte.
        let data = DataDir::new(dir);
        let store = Store::open(&data, Catalog::open(&data.catalog()).unwrap(), StoreConfig::default()).unwrap();
        let mut ingest = store.begin();
        let block: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let id = ingest.put_block(&store.codec().hasher.id(&block), &block).unwrap();
        let root = ingest.update_tree(None, 1, vec![(0, id)]).unwrap();
        let disk = RpDisk { name: "os".into(), size_bytes: 65536, block_size: 65536, root };
        let replica = ReplicaRecord {
            vm: "vm1".into(),
            disk: "os".into(),
            size_bytes: 65536,
            block_size: 65536,
            state: ReplicaState::Consistent,
            root: Some(root),
            change_token: None,
            reason: None,
            updated_at: 0,
            excluded: vec![],
            swap_witness: vec![],
        };
        let rp = NewRecoveryPoint {
            vm: "vm1".into(),
            consistency: Consistency::App,
            config: vec![],
            disks: vec![disk],
            created_at: 1,
        };
        store.commit_recovery_point(ingest, rp, vec![replica]).unwrap();
        let loc = store.catalog().chunk(&id).unwrap().unwrap();
        drop(store);
        let path = data.packs().join(format!("{:08}.pack", loc.pack));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(loc.offset + 100) as usize] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    });
    let d = c.dir_str();
    let out = bulwark(&["--data-dir", &d, "verify", "--wait", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "a verify that finds a bad chunk fails");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("1 bad chunk") && error.contains("1 recovery point(s) affected") && error.contains("vm1/os"),
        "{error}"
    );
    let failed = json(&["--data-dir", &d, "job", "list", "--state", "failed", "--output", "json"]);
    assert_eq!(failed.as_array().unwrap().len(), 1);
    c.coordinator.wait_log("bad chunk");
}

#[test]
fn data_kept_when_a_vm_left_protection_is_pruned_by_the_retention_it_had() {
    let c = Cluster::start_with(|dir| {
        // Three recovery points of a VM that left its group with --keep-data (one day of
        // retention): two are years old.
        let data = DataDir::new(dir);
        let store = Store::open(&data, Catalog::open(&data.catalog()).unwrap(), StoreConfig::default()).unwrap();
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        for (i, created_at) in [1_000, 2_000, now_ms].into_iter().enumerate() {
            let mut ingest = store.begin();
            let block: Vec<u8> = (0..65536u32).map(|b| (b * 7 % 251) as u8 ^ i as u8).collect();
            let id = ingest.put_block(&store.codec().hasher.id(&block), &block).unwrap();
            let root = ingest.update_tree(None, 1, vec![(0, id)]).unwrap();
            let disk = RpDisk { name: "os".into(), size_bytes: 65536, block_size: 65536, root };
            let rp = NewRecoveryPoint {
                vm: "gone".into(),
                consistency: Consistency::Crash,
                config: vec![],
                disks: vec![disk],
                created_at,
            };
            store.commit_recovery_point(ingest, rp, vec![]).unwrap();
        }
        store.catalog().keep_data("gone", 86_400).unwrap();
    });
    let d = c.dir_str();
    let job = json(&["--data-dir", &d, "prune", "--wait", "--output", "json"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let detail = job["detail"].as_str().unwrap();
    assert!(detail.starts_with("2 recovery point(s)") && detail.contains("1 VMs whose data was kept"), "{detail}");
    let rps = json(&["--data-dir", &d, "rp", "list", "gone", "--output", "json"]);
    assert_eq!(rps.as_array().unwrap().len(), 1, "the newest is kept: {rps}");
}
