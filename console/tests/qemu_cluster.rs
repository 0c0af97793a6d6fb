//! A QEMU cluster on shared storage, with the real binaries and real `qemu-system-x86_64`: two
//! agents ("nodes") share one VM directory; each reports only the VMs whose QEMU runs on it.
//! A VM protected on node1 is live-migrated to node2 by QEMU's own migration (a second QEMU
//! process on the same qcow2, `-incoming`); the coordinator follows it, its replica stays
//! consistent, and the next express full reads only what the guest wrote since — the dirty
//! bitmap travels in the image and the tracking state lives beside the definitions — and
//! restores bit-exact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../agent/tests/common/qemu_vm.rs"]
mod qemu_vm;

use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::launch;
use bulwark_agent::qemu::qmp::Qmp;
use common::*;
use qemu_vm::{Vm, MIB};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// A QEMU process, killed when dropped (a failing test leaves none behind).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU for VM `def` as node `host` runs it (its QMP socket under `dir/host/`), waiting for
/// an incoming migration when `incoming`; answers the process and its QMP socket.
fn start_on(def_path: &Path, dir: &Path, host: &str, incoming: bool) -> (Qemu, PathBuf) {
    let mut def = VmDef::load(def_path).unwrap();
    std::fs::create_dir_all(dir.join(host)).unwrap();
    def.qmp = dir.join(host).join("q1.qmp");
    let _ = std::fs::remove_file(&def.qmp);
    let mut cmd = launch::headless(&def, "tcg", 64);
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let child = Qemu(cmd.spawn().expect("qemu-system-x86_64 runs (installed by .ci/run)"));
    launch::wait_for_qmp(&def.qmp, Duration::from_secs(20)).unwrap();
    (child, def.qmp)
}

/// A QMP session for one exchange: QEMU serves one monitor client at a time, and the agent
/// needs it too.
fn qmp(socket: &Path) -> Qmp {
    Qmp::connect(socket, Duration::from_secs(10)).unwrap()
}

fn guest_write(socket: &Path, offset: u64, len: u64, pattern: u8) {
    let out = qmp(socket)
        .hmp(&format!("qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern} {offset} {len}\""))
        .unwrap();
    assert!(out.trim().is_empty(), "qemu-io: {out}");
}

#[test]
fn a_live_migration_between_nodes_sharing_storage_keeps_backups_incremental() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let vm = Vm::create(&qdir, "q1", 256 * MIB, "qcow2");
    // One definition for the whole cluster: each node's QEMU listens on its own socket.
    let def_path = qdir.join("vms/q1.toml");
    let text = std::fs::read_to_string(&def_path).unwrap().replace(
        &format!("qmp = \"{}\"", vm.qmp_path().display()),
        &format!("qmp = \"{}/{{host}}/q1.qmp\"", qdir.display()),
    );
    assert!(text.contains("{host}"), "{text}");
    std::fs::write(&def_path, text).unwrap();
    let (mut source, src) = start_on(&def_path, &qdir, "node1", false);
    guest_write(&src, 0, 8 * MIB, 0x11);

    c.enroll("node1");
    c.enroll("node2");
    let vm_dir = qdir.join("vms");
    for node in ["node1", "node2"] {
        c.run_agent_with(node, &["--qemu-vm-dir", vm_dir.to_str().unwrap(), "--qemu-shared"]);
    }
    wait_until("q1 reported by node1 only", Duration::from_secs(30), || {
        c.vm("q1").is_some_and(|v| v["host"] == "node1" && v["state"] == "running")
    });
    c.protect_and_wait("q1");
    guest_write(&src, 32 * MIB, MIB, 0x22);
    let job = c.json(&["backup", "q1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let before = job["bytes_scanned"].as_u64().unwrap();
    assert!((MIB..=2 * MIB).contains(&before), "an express full on node1 reads the churn: {job}");

    // QEMU's own live migration to node2: the same qcow2, a second QEMU process.
    let (mut target, dst) = start_on(&def_path, &qdir, "node2", true);
    let uri = format!("unix:{}", qdir.join("migrate.sock").display());
    qmp(&dst).execute("migrate-incoming", json!({ "uri": uri })).unwrap();
    qmp(&src).execute("migrate", json!({ "uri": uri })).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = qmp(&src).execute("query-migrate", json!({})).unwrap()["status"].as_str().unwrap_or("").to_owned();
        assert_ne!(status, "failed", "the migration failed");
        if status == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "the migration did not complete: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qmp(&dst).status().unwrap(), "running");
    let _ = qmp(&src).execute("quit", json!({}));
    source.0.wait().unwrap();
    wait_until("the coordinator follows q1 to node2", Duration::from_secs(60), || {
        c.vm("q1").is_some_and(|v| v["host"] == "node2" && v["status"] == "protected")
    });
    assert_eq!(c.vm("q1").unwrap()["replica_state"], "consistent", "a live migration keeps tracking");

    // The next express full, on node2, reads only what the guest wrote since the last one.
    guest_write(&dst, 100 * MIB, 2 * MIB, 0x33);
    let job = c.json(&["backup", "q1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "express-full", "{job}");
    let scanned = job["bytes_scanned"].as_u64().unwrap();
    assert!((2 * MIB..=3 * MIB).contains(&scanned), "only the churn after the migration: {job}");
    let jobs = c.json(&["job", "list", "--vm", "q1"]);
    assert!(
        !jobs.as_array().unwrap().iter().any(|j| j["kind"] == "consistency-check"),
        "no consistency check was needed: {jobs}"
    );
    let _ = qmp(&dst).execute("quit", json!({}));
    target.0.wait().unwrap();
    assert_eq!(c.recover_disk("q1", "latest", "os"), vm.raw(), "the recovery point is the image, bit-exact");
}
