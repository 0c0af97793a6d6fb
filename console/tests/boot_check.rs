//! The boot check of restore verification (issue 21): a QEMU VM whose definition says
//! `boot_check = true`, in a group with `--verify every-rp`, has each recovery point booted on
//! the coordinator in an isolated QEMU (no network, throw-away overlays over the store's
//! exports). The tiny Linux guest's point boots (`boot_verified` true); a point taken after its
//! disk's file system was wiped does not come up (`boot_verified` false), though its blocks
//! read back intact (`verified` true).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../agent/tests/common/linux_guest.rs"]
mod linux_guest;

use common::*;
use linux_guest::{guest_image, LinuxVm};
use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn newest_point(c: &Cluster) -> serde_json::Value {
    let rps = c.json(&["rp", "list", "g1"]);
    rps.as_array().unwrap().iter().max_by_key(|r| r["created_at"].as_str().unwrap_or("").to_owned()).unwrap().clone()
}

#[test]
fn a_recovery_point_of_the_test_guest_boots_and_one_whose_disk_was_wiped_does_not() {
    let img = guest_image();
    let mut c = Cluster::start_with(|dir| {
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("coordinator.toml")).unwrap();
        write!(
            f,
            "\n[verify]\nboot_kernel = \"{}\"\nboot_initrd = \"{}\"\nboot_append = \"console=ttyS0 quiet panic=-1\"\n\
             boot_memory_mib = 256\nboot_timeout_secs = 60\naccel = \"tcg\"\n",
            img.join("vmlinuz").display(),
            img.join("initrd.gz").display()
        )
        .unwrap();
    });
    let qdir = c.root.path().join("q");
    let mut g = LinuxVm::create(&qdir, "g1", 64 * MIB);
    g.boot();
    // The definition asks for the boot check (kept with each recovery point).
    g.define(&format!("guest_agent = \"{}\"\nboot_check = true", g.ga_path().display()));
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("g1").is_some());
    c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        "g1",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--verify",
        "every-rp",
    ]);
    wait_until("initial replica", Duration::from_secs(240), || c.vm("g1").unwrap()["replica_state"] == "consistent");
    wait_until("the first point is booted", Duration::from_secs(240), || !newest_point(&c)["boot_verified"].is_null());
    let first = newest_point(&c);
    let jobs = c.json(&["job", "list", "--vm", "g1"]);
    assert_eq!(
        (first["verified"].clone(), first["boot_verified"].clone()),
        (true.into(), true.into()),
        "{first}\n{jobs}"
    );

    // The guest stops; its file system's superblock is wiped; a new point is taken of the disk.
    let _ = g.qmp().execute("quit", serde_json::json!({}));
    if let Some(mut q) = g.qemu.take() {
        q.wait().unwrap();
    }
    let wiped = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 1M"]).arg(&g.image).output().unwrap();
    assert!(wiped.status.success(), "{}", String::from_utf8_lossy(&wiped.stderr));
    let job = c.json(&["backup", "g1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    wait_until("the wiped point is checked", Duration::from_secs(300), || {
        let p = newest_point(&c);
        p["created_at"] != first["created_at"] && !p["boot_verified"].is_null()
    });
    let wiped = newest_point(&c);
    assert_eq!(wiped["verified"], true, "its blocks read back as they were made: {wiped}");
    assert_eq!(wiped["boot_verified"], false, "it does not boot: {wiped}");
    let jobs = c.json(&["job", "list", "--vm", "g1"]);
    let failed = jobs
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["kind"] == "verify" && j["detail"].as_str().is_some_and(|d| d.contains("boot check FAILED")));
    assert!(failed, "the verify job says why: {jobs}");
}
