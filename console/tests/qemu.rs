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
    // What the recovery point keeps of the definition: the opaque config and the guest's
    // settings; the host's hooks stay on this host.
    let def_path = qdir.join("vms/q1.toml");
    let def = std::fs::read_to_string(&def_path).unwrap().replacen(
        "os = \"linux\"\n",
        "os = \"linux\"\napp_hooks = true\nconfig = \"-machine q35 -m 512\"\npre_snapshot = \"true\"\n",
        1,
    );
    std::fs::write(&def_path, def).unwrap();
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
    let detail = job["detail"].as_str().unwrap();
    assert!(detail.contains("crash-consistent: no guest agent is configured: the VM was paused instead"), "{job}");
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
    // The operator changed the VM's settings since the point (and noted it).
    let changed = std::fs::read_to_string(&def_path)
        .unwrap()
        .replace("app_hooks = true\n", "")
        .replace("config = \"-machine q35 -m 512\"", "config = \"-machine q35 -m 4096\"  # bigger since");
    std::fs::write(&def_path, &changed).unwrap();
    let job = c.json(&["recover", "q1", "--rp", &rp, "--to", "original", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["bytes_transferred"], 3 * MIB, "a smart restore writes only the three changed blocks: {job}");
    assert_eq!(vm.raw(), view, "restored onto the original image bit-exact");
    // ... and its definition has the point's settings again, the rest as this host has it.
    let q1 = std::fs::read_to_string(&def_path).unwrap();
    assert!(q1.contains("config = \"-machine q35 -m 512\"") && q1.contains("app_hooks = true"), "{q1}");
    assert!(q1.contains("pre_snapshot = \"true\"") && !q1.contains("4096"), "{q1}");
    let uuid_line = |t: &str| t.lines().find(|l| l.starts_with("uuid")).map(str::to_owned);
    assert_eq!(uuid_line(&q1), uuid_line(&changed), "the same VM");
    ok(&["x-agent", "qemu", "check", "--vm-dir", vm_dir.to_str().unwrap()]);

    // Restore as a new VM: a new image and definition in the restore directory.
    let job = c.json(&["recover", "q1", "--rp", &rp, "--to", "host", "--host", "node1", "--name", "q2", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let restored = vm_dir.join("restored");
    assert!(restored.join("q2.toml").is_file());
    let copy =
        Vm { dir: qdir.clone(), name: "q2".into(), image: restored.join("q2-os.qcow2"), format: "qcow2", qemu: None };
    assert_eq!(copy.raw(), view, "the new image is bit-exact");
    // The definition is the recovery point's, made this host's: `qemu check` accepts it.
    let q2 = std::fs::read_to_string(restored.join("q2.toml")).unwrap();
    assert!(q2.contains("config = \"-machine q35 -m 512\"") && q2.contains("app_hooks = true"), "{q2}");
    assert!(q2.contains("node = \"disk0\"") && q2.contains("device = \"vda\""), "the guest's device names: {q2}");
    assert!(!q2.contains("pre_snapshot"), "hooks are this host's business: {q2}");
    let q1 = std::fs::read_to_string(&def_path).unwrap();
    let uuid = |t: &str| t.lines().find(|l| l.starts_with("uuid")).map(str::to_owned);
    assert!(uuid(&q2).is_some() && uuid(&q2) != uuid(&q1), "a VM of its own");
    ok(&["x-agent", "qemu", "check", "--vm-dir", restored.to_str().unwrap()]);
}

#[test]
fn an_agent_killed_mid_read_leaves_the_vm_running_and_no_change_lost() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let mut vm = Vm::create(&qdir, "k1", 512 * MIB, "qcow2");
    vm.start();
    vm.write(0, 8 * MIB, 1);
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    let vm_dir_arg = ["--qemu-vm-dir", vm_dir.to_str().unwrap()];
    let agent = c.run_agent_with("node1", &vm_dir_arg);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("k1").is_some());
    // No automatic check: the test looks at the inconsistent replica before it runs one.
    protect_without_checks(&c, "k1");

    // A big change set, so the express full reads for a while; the agent dies mid-read.
    for i in 0..40u64 {
        vm.write(16 * MIB + i * 12 * MIB, 8 * MIB, 0x40 + i as u8);
    }
    let dir = c.dir_str();
    let backup = std::process::Command::new(bin())
        .args(["--data-dir", &dir, "backup", "k1", "--wait", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the fleecing graph is up", Duration::from_secs(30), || {
        vm.nodes().iter().any(|n| n.starts_with("bulwark-acc-"))
    });
    c.agents[agent].signal(9);
    let _ = c.agents[agent].child.wait();
    let out = backup.wait_with_output().unwrap();
    assert!(!out.status.success(), "the express full whose agent died does not succeed: {out:?}");
    // The guest goes on writing while no agent runs.
    vm.write(500 * MIB, MIB, 0x99);

    c.run_agent_with("node1", &vm_dir_arg);
    c.wait_connected("node1", true);
    assert_eq!(vm.status(), "running", "the VM is not left paused");
    wait_until("the dead agent's graph is torn down", Duration::from_secs(30), || {
        vm.nodes().iter().all(|n| !n.starts_with("bulwark-"))
    });
    let exports = vm.qmp().execute("query-block-exports", serde_json::json!({})).unwrap();
    assert!(exports.as_array().unwrap().is_empty(), "no export is left: {exports}");
    assert!(std::fs::read_dir(c.agent_dir("node1").join("qemu/fleece")).unwrap().next().is_none(), "no fleecing image");

    // The snapshot's bits went back into the live bitmap: it covers every write.
    assert_eq!(vm.bitmap_count("bulwark-snap"), None, "the snapshot bitmap was merged back and dropped");
    let dirty = vm.bitmap_count("bulwark").unwrap();
    assert!(dirty >= 321 * MIB, "the live bitmap covers the interrupted changes and the new write: {dirty}");

    // The coordinator saw the transfer die: its replica needs a consistency check, then the
    // next recovery point is the image as it is.
    assert_eq!(c.vm("k1").unwrap()["replica_state"], "inconsistent");
    check_back_up_and_compare(&c, &mut vm, 200 * MIB);
}

#[test]
fn a_qemu_vm_is_seeded_by_export_and_import_without_an_initial_copy() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let mut vm = Vm::create(&qdir, "sq", 256 * MIB, "qcow2");
    vm.start();
    vm.write(8 * MIB, 16 * MIB, 0x31);
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("sq").is_some());
    c.json(&["group", "create", "g", "--vm", "sq", "--replica", "manual"]);

    let seed = c.root.path().join("seed");
    let agent_dir = c.agent_dir("node1");
    let out = ok(&[
        "x-agent",
        "seed",
        "export",
        "--vm",
        "sq",
        "--output",
        seed.to_str().unwrap(),
        "--qemu-vm-dir",
        vm_dir.to_str().unwrap(),
        "--data-dir",
        agent_dir.to_str().unwrap(),
    ]);
    assert!(out.contains("seed of sq"), "{out}");
    assert_eq!(vm.status(), "running", "the export left the VM running");
    assert_eq!(c.vm("sq").unwrap()["replica_state"], "none", "manual: nothing crossed the network");
    vm.write(100 * MIB, MIB, 0x32);

    c.json(&["seed", "import", seed.to_str().unwrap()]);
    let cc = c.wait_succeeded("sq", "consistency-check", Duration::from_secs(120));
    assert_eq!(cc["blocks_changed"], 1, "only the block written after the export: {cc}");
    let job = c.json(&["backup", "sq", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    vm.quit();
    assert_eq!(c.recover_disk("sq", "latest", "os"), vm.raw(), "bit-exact");
}

/// The fleece directory of a QEMU VM, on a 256 MiB tmpfs, fills up while an express full
/// reads the snapshot: every guest write succeeds, the attempt fails midway and says why, the
/// replica stays consistent (nothing was committed), and the retry, a consistency check and the
/// next backup succeed and restore bit-exact with every write.
#[test]
fn a_fleece_directory_that_fills_fails_the_backup_never_the_guest() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let fleece = qdir.join("fleece");
    std::fs::create_dir_all(&fleece).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
        .arg(&fleece)
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs and needs root (CI runs as root)");
    let _unmount = Unmount(fleece.clone());
    let mut vm = Vm::create(&qdir, "f1", 2 * GIB, "qcow2");
    let def_path = qdir.join("vms/f1.toml");
    let def = std::fs::read_to_string(&def_path).unwrap();
    let def = def.replacen("[[disks]]", &format!("fleece_dir = \"{}\"\n[[disks]]", fleece.display()), 1);
    std::fs::write(&def_path, def).unwrap();
    vm.start();
    vm.write(0, 64 * MIB, 1);
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    let agent = c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("f1").is_some());
    protect_without_checks(&c, "f1");

    // A change set the express full reads for a few seconds (its 10 % reserve, 205 MiB, fits) ...
    for i in 0..128u64 {
        vm.write(i * 8 * MIB, 8 * MIB, 0x40 + (i % 64) as u8);
    }
    let dir = c.dir_str();
    let backup = std::process::Command::new(bin())
        .args(["--data-dir", &dir, "backup", "f1", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The agent logs each disk as it starts sending it (1,024 changed blocks of 1 MiB).
    c.agents[agent].wait_log("sending blocks disk=os blocks=1024");
    // ... while the guest overwrites 320 MiB of it: more old data than the fleece can keep.
    // (`write` asserts that QEMU took each write; the last check below that each landed.)
    for i in 0..40u64 {
        vm.write(i * 8 * MIB, 8 * MIB, 0x80 + i as u8);
    }
    assert_eq!(vm.status(), "running");
    // The attempt fails midway and says why, and waits for its retry (a transient failure: the
    // guest's burst may be over by then). Nothing of it was committed and the agent kept its
    // changes, so the replica is still exactly the last recovery point: consistent, with no
    // consistency check owed.
    let mut seen = serde_json::Value::Null;
    wait_until("the attempt failed and waits for a retry", Duration::from_secs(60), || {
        seen = c.json(&["job", "show", "2"]);
        seen["state"] == "queued" && seen["detail"].as_str().is_some_and(|d| d.contains("failed"))
    });
    let detail = seen["detail"].as_str().unwrap();
    assert!(detail.contains("fleece directory") && detail.contains("is full"), "the failure says why: {seen}");
    assert_eq!(c.vm("f1").unwrap()["replica_state"], "consistent");
    let out = backup.wait_with_output().unwrap();
    assert!(out.status.success(), "the retry succeeds: {}", String::from_utf8_lossy(&out.stdout));
    wait_until("the graph is torn down", Duration::from_secs(30), || {
        vm.nodes().iter().all(|n| !n.starts_with("bulwark-"))
    });
    assert!(std::fs::read_dir(&fleece).unwrap().next().is_none(), "no fleecing image is left");

    check_back_up_and_compare(&c, &mut vm, 1500 * MIB);
}

/// Puts `vm` alone in group `g` with no schedule, no recovery-point goal and no automatic
/// consistency check (a test looks at an inconsistent replica before it runs one), and waits
/// for its initial replica.
fn protect_without_checks(c: &Cluster, vm: &str) {
    c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        vm,
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--no-cc-when-inconsistent",
    ]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm(vm).unwrap()["replica_state"] == "consistent");
}

/// A consistency check of `vm`, a guest write at `at`, a backup, both succeeding; then, with
/// QEMU stopped, the latest recovery point is the image byte for byte.
fn check_back_up_and_compare(c: &Cluster, vm: &mut Vm, at: u64) {
    let cc = c.json(&["cc", &vm.name, "--wait"]);
    assert_eq!(cc["state"], "succeeded", "{cc}");
    vm.write(at, MIB, 0x77);
    let job = c.json(&["backup", &vm.name, "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    vm.quit();
    let view = vm.raw();
    assert_eq!(c.recover_disk(&vm.name, "latest", "os"), view, "no write was lost");
}

/// Unmounts a test's tmpfs when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
