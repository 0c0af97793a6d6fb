//! End to end with the real binaries: one coordinator protects a QEMU VM (real
//! `qemu-system-x86_64`, agent with `--qemu-vm-dir`) and a sim VM in one protection group;
//! 1 % churn of a 1 GiB qcow2 disk moves about 1 % over NBD; recovery points restore bit-exact;
//! restores to the original VM and to a new image, and a running VM refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../agent/tests/common/qemu_vm.rs"]
mod qemu_vm;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use qemu_vm::{Vm, MIB};
use std::time::Duration;

const GIB: u64 = 1 << 30;

#[test]
fn a_coordinator_protects_a_qemu_vm_and_a_sim_vm_in_one_group() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let mut vm = Vm::create(&qdir, "q1", GIB, "qcow2");
    vm.start();
    // 64 MiB of data spread over the disk before protection starts.
    for i in 0..8u64 {
        vm.write(i * 128 * MIB, 8 * MIB, 0x10 + i as u8);
    }
    let root = c.root.path().join("sim");
    let req = CreateVm {
        os: "linux".into(),
        random_fill: true,
        seed: 4,
        ..CreateVm::new("s1", "node2", vec![DiskConfig { name: "os".into(), size: 64 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.enroll("node2");
    let vm_dir = qdir.join("vms");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    c.run_sim_agent("node2", &root);
    wait_until("both VMs are reported", Duration::from_secs(30), || c.vm("q1").is_some() && c.vm("s1").is_some());
    assert_eq!(c.vm("q1").unwrap()["state"], "running");
    c.json(&["group", "create", "g", "--vm", "q1", "--vm", "s1", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replicas", Duration::from_secs(120), || {
        ["q1", "s1"].iter().all(|v| c.vm(v).unwrap()["replica_state"] == "consistent")
    });
    let jobs = c.json(&["job", "list"]);
    let initial = jobs.as_array().unwrap().iter().find(|j| j["vm"] == "q1" && j["kind"] == "initial").unwrap().clone();
    assert_eq!(initial["state"], "succeeded", "{initial}");
    assert_eq!(initial["bytes_scanned"], 64 * MIB, "the initial copy reads only allocated data: {initial}");

    // 1 % churn: ten 1 MiB guest writes, block-aligned.
    for i in 0..10u64 {
        vm.write(100 * MIB + i * 90 * MIB, MIB, 0x80 + i as u8);
    }
    let job = c.json(&["backup", "q1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "express-full");
    assert_eq!(job["consistency"], "crash", "no guest agent: paused for the snapshot point");
    let scanned = job["bytes_scanned"].as_u64().unwrap();
    assert!((10 * MIB..=11 * MIB).contains(&scanned), "the express full read ≈ 1 % of 1 GiB over NBD: {job}");
    let job = c.json(&["backup", "s1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(vm.status(), "running", "the VM runs after the backups");
    assert!(vm.nodes().iter().all(|n| !n.starts_with("bulwark-")), "{:?}", vm.nodes());

    // The newest recovery point is the image as it is now (no writes since).
    vm.quit();
    let view = vm.raw();
    let rp = c.json(&["rp", "list", "q1"]).as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(c.recover_disk("q1", &rp, "os"), view, "the QEMU VM's recovery point restores bit-exact");
    assert_eq!(c.recover_disk("s1", "latest", "os"), sim_disk(&root, "s1", "os"));

    // Restore onto the original VM: refused while QEMU runs, bit-exact when it is off.
    vm.start();
    vm.write(5 * MIB, 3 * MIB, 0xee);
    wait_until("the coordinator sees q1 running", Duration::from_secs(30), || {
        c.vm("q1").unwrap()["state"] == "running"
    });
    let refused = c.run(&["recover", "q1", "--rp", &rp, "--to", "original", "--wait"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("turn it off"), "{refused:?}");
    vm.quit();
    wait_until("the coordinator sees q1 off", Duration::from_secs(30), || c.vm("q1").unwrap()["state"] == "off");
    let job = c.json(&["recover", "q1", "--rp", &rp, "--to", "original", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["bytes_transferred"], 3 * MIB, "a smart restore writes only the three changed blocks: {job}");
    assert_eq!(vm.raw(), view, "restored onto the original image bit-exact");

    // Restore as a new VM: a new image and definition in the restore directory.
    let job = c.json(&["recover", "q1", "--rp", &rp, "--to", "host", "--host", "node1", "--name", "q2", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let restored = vm_dir.join("restored");
    assert!(restored.join("q2.toml").is_file());
    let copy =
        Vm { dir: qdir.clone(), name: "q2".into(), image: restored.join("q2-os.qcow2"), format: "qcow2", qemu: None };
    assert_eq!(copy.raw(), view, "the new image is bit-exact");
}
