//! Manual replica creation: `bulwark-agent seed export` on the host, `bulwark seed import` on
//! the backup server, and a consistency check that reconciles the seed with the source by
//! moving only what changed since the export.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn a_seed_and_a_consistency_check_make_a_replica_without_an_initial_copy() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 11,
        ..CreateVm::new(
            "db",
            "node1",
            vec![DiskConfig { name: "os".into(), size: 48 * MIB }, DiskConfig { name: "data".into(), size: 16 * MIB }],
        )
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("db").is_some());
    c.json(&["group", "create", "g", "--vm", "db", "--replica", "manual", "--sync-every", "1m"]);
    // Manual creation with a schedule that fires: the member waits for its seed, and no
    // scheduled job turns into an initial copy over the network.
    std::thread::sleep(Duration::from_secs(70));
    assert_eq!(c.vm("db").unwrap()["replica_state"], "none", "manual: no initial copy over the network");
    assert_eq!(c.vm("db").unwrap()["status"], "awaiting-replica");
    assert!(c.json(&["job", "list", "--vm", "db"]).as_array().unwrap().is_empty(), "no job at all");
    // Back to the default schedules (express fulls at the recovery-point times only).
    c.json(&["group", "set", "g", "--express-full-before-rp"]);

    let seed = c.root.path().join("seed");
    let out = ok(&[
        "x-agent",
        "seed",
        "export",
        "--vm",
        "db",
        "--output",
        seed.to_str().unwrap(),
        "--sim-root",
        root.to_str().unwrap(),
    ]);
    assert!(out.contains("app-consistent"), "{out}");
    // The images are the guest's disks in plaintext: only their owner reads them.
    for f in ["data.img", "seed.toml"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(seed.join(f)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let again = bulwark(&[
        "x-agent",
        "seed",
        "export",
        "--vm",
        "db",
        "--output",
        seed.to_str().unwrap(),
        "--sim-root",
        root.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1), "a seed directory is never overwritten");
    // The guest keeps working between the export and the import.
    sim::churn(&root, "db", 5.0, 3).unwrap();

    let imported = c.json(&["seed", "import", seed.to_str().unwrap()]);
    assert_eq!(imported["disks"].as_array().unwrap().len(), 2);

    // The seeded replica is inconsistent: the automatic check (on by default) moves only the
    // difference.
    let cc = c.wait_succeeded("db", "consistency-check", Duration::from_secs(60));
    // 5 % of 48 one-MiB blocks and of 16: 2 + 1 blocks changed since the export.
    assert_eq!(cc["blocks_changed"], 3, "{cc}");
    assert_eq!(cc["bytes_transferred"], 3 * MIB);
    assert_eq!(c.vm("db").unwrap()["replica_state"], "consistent");

    let job = c.json(&["backup", "db", "--wait"]);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["bytes_transferred"], 0, "tracking continued across the export: nothing new");
    for disk in ["os", "data"] {
        assert_eq!(c.recover_disk("db", "latest", disk), sim_disk(&root, "db", disk), "{disk} restores bit-exact");
    }

    // A damaged seed is refused before anything is sent.
    let img = seed.join("data.img");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&img, bytes).unwrap();
    let bad = c.run(&["seed", "import", seed.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not match its manifest"));
}
