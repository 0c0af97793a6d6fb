//! Recovery onto the original VM (a smart restore: only the blocks that differ are written)
//! and to another host as a new VM; both bit-exact. A running VM is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power, Vm};
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn disk(root: &std::path::Path, vm: &str) -> Vec<u8> {
    let mut out = vec![];
    sim::read_disk(root, vm, "os", &mut out).unwrap();
    out
}

#[test]
fn recovery_to_the_original_vm_writes_only_the_difference_and_to_a_host_makes_a_new_vm() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        os: "linux".into(),
        random_fill: true,
        seed: 8,
        ..CreateVm::new("r", "node1", vec![DiskConfig { name: "os".into(), size: 64 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.enroll("node2");
    c.run_sim_agent("node1", &root);
    c.run_sim_agent("node2", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("r").is_some());
    c.json(&["group", "create", "g", "--vm", "r", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("r").unwrap()["replica_state"] == "consistent");
    let original = disk(&root, "r");
    let rp = c.json(&["rp", "list", "r"])[0]["id"].as_str().unwrap().to_owned();

    // The guest diverges by 2 of 64 blocks; it must be off to be restored onto.
    sim::churn(&root, "r", 3.0, 2).unwrap();
    assert_ne!(disk(&root, "r"), original);
    let refused = c.run(&["recover", "r", "--rp", &rp, "--to", "original", "--wait"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("turn it off"), "{refused:?}");
    sim::set_state(&root, "r", Power::Off).unwrap();
    wait_until("the coordinator sees r off", Duration::from_secs(30), || c.vm("r").unwrap()["state"] == "off");

    let job = c.json(&["recover", "r", "--rp", &rp[..10], "--to", "original", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "recovery");
    assert_eq!(job["blocks_changed"], 2, "a smart restore writes only what differs: {job}");
    assert_eq!(job["bytes_transferred"], 2 * MIB);
    assert_eq!(job["bytes_scanned"], 64 * MIB, "the agent hashed the current disk");
    assert_eq!(disk(&root, "r"), original, "restored bit-exact");
    let vm = Vm::open(&root, "r").unwrap();
    assert!(vm.config.restoring.is_none(), "the restore mark is cleared");
    drop(vm);

    // Alternate location: a new VM on node2, from the same recovery point.
    let job = c.json(&["recover", "r", "--rp", "latest", "--to", "host", "--host", "node2", "--name", "r2", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["bytes_transferred"], 64 * MIB, "a new VM gets every block");
    let r2 = Vm::open(&root, "r2").unwrap();
    assert_eq!((r2.config.host.as_str(), r2.config.power), ("node2", Power::Off));
    drop(r2);
    assert_eq!(disk(&root, "r2"), original);
    let again = c.run(&["recover", "r", "--rp", "latest", "--to", "host", "--host", "node2", "--name", "r2", "--wait"]);
    assert_eq!(again.status.code(), Some(1), "an existing VM is never overwritten by --to host");
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"), "{again:?}");
    assert_eq!(disk(&root, "r2"), original, "and r2 is untouched");
}

#[test]
fn an_agent_killed_during_a_recovery_leaves_the_vm_marked_and_a_new_recovery_completes_it() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        power: Power::Off,
        random_fill: true,
        seed: 9,
        ..CreateVm::new("k", "node1", vec![DiskConfig { name: "os".into(), size: 48 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("k").is_some());
    c.json(&["group", "create", "g", "--vm", "k", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("k").unwrap()["replica_state"] == "consistent");
    let original = disk(&root, "k");
    // The disk is wiped (untracked), then restored slowly; the agent dies midway.
    std::fs::write(root.join("vms/k/os.img"), vec![0u8; (48 * MIB) as usize]).unwrap();
    let started = c.json(&["recover", "k", "--rp", "latest", "--to", "original", "--limit", "8MiB/s"]);
    let id = started["job_id"].as_u64().unwrap().to_string();
    wait_until("the restore is writing", Duration::from_secs(30), || {
        let d = disk(&root, "k");
        d.iter().any(|b| *b != 0) && Vm::open(&root, "k").unwrap().config.restoring.is_some()
    });
    c.agents[0].signal(9);
    let _ = c.agents[0].child.wait();
    let vm = Vm::open(&root, "k").unwrap();
    assert!(vm.config.restoring.is_some(), "a half-written VM stays marked");
    drop(vm);
    assert_ne!(disk(&root, "k"), original, "it was interrupted midway");
    wait_until("the job failed with the reason", Duration::from_secs(60), || {
        let j = c.json(&["job", "show", &id]);
        j["state"] == "failed" && j["error"].as_str().unwrap().contains("not fully restored")
    });

    c.agents.clear();
    c.run_sim_agent("node1", &root);
    c.wait_connected("node1", true);
    let done = c.run(&[
        "recover", "k", "--rp", "latest", "--to", "original", "--wait", "--limit", "16MiB/s", "--output", "json",
    ]);
    assert!(done.status.success(), "{done:?}");
    let job: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let id = job["id"].as_u64().unwrap();
    let progress = String::from_utf8_lossy(&done.stderr);
    assert!(progress.contains(&format!("job {id} running: ")), "plain progress lines off a terminal: {progress}");
    assert_eq!(disk(&root, "k"), original, "completed bit-exact");
    assert!(Vm::open(&root, "k").unwrap().config.restoring.is_none(), "the mark is cleared");
}
