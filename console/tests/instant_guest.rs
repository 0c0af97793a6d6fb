//! Instant recovery of a real guest (issue 21): the tiny Linux guest of the QEMU tests
//! (Debian's kernel, busybox, qemu-guest-agent, an ext4 disk) is protected, then booted from its
//! recovery point through `--instant` on a QEMU host. Its files read back intact through the
//! export; the coordinator killed while the guest reads a file it had not read yet pauses that
//! read, which finishes intact after the restart; `recover-finish` under the running guest stops
//! the export and the guest goes on, its files intact, read from its own disk alone.
//! Prints the time from the command to the guest agent answering, beside a full restore of the
//! same disk (for the closing note: never a pass/fail figure).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../agent/tests/common/linux_guest.rs"]
mod linux_guest;

use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::qmp::Qga;
use common::*;
use linux_guest::{boot_def, LinuxVm};
use serde_json::json;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// QEMU, killed if the test fails before it quits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the VM defined at `def_path` (the test guest's kernel and initramfs); answers QEMU
/// once the guest agent answers.
fn boot(def_path: &Path, console: &Path) -> KillOnDrop {
    KillOnDrop(boot_def(&VmDef::load(def_path).unwrap(), console, &[]))
}

/// Starts `sh -c script` in the guest behind agent socket `ga`; answers its pid.
fn start(ga: &Path, script: &str) -> i64 {
    let mut q = Qga::connect(ga, Duration::from_secs(10)).unwrap();
    q.execute("guest-exec", json!({ "path": "/bin/sh", "arg": ["-c", script] })).unwrap()["pid"].as_i64().unwrap()
}

/// The exit code of guest process `pid`, if it has exited.
fn exited(ga: &Path, pid: i64) -> Option<i64> {
    let mut q = Qga::connect(ga, Duration::from_secs(10)).unwrap();
    let st = q.execute("guest-exec-status", json!({ "pid": pid })).unwrap();
    (st["exited"] == true).then(|| st["exitcode"].as_i64().unwrap_or(-1))
}

/// Runs `sh -c script` in the guest and answers its exit code.
fn run(ga: &Path, script: &str, timeout: Duration) -> i64 {
    let pid = start(ga, script);
    let mut code = None;
    wait_until(&format!("guest command {script:?}"), timeout, || {
        code = exited(ga, pid);
        code.is_some()
    });
    code.unwrap()
}

#[test]
fn the_test_guest_boots_from_a_recovery_point_pauses_without_the_coordinator_and_finishes_whole() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let mut g = LinuxVm::create(&qdir, "g1", 128 * MIB);
    g.boot();
    // Two files of random bytes and their sums: one read while all is well, one only after the
    // coordinator is gone (larger than the export's read-ahead, so most of it is cold then).
    let made = g.exec(
        "cd /mnt && dd if=/dev/urandom of=first bs=1M count=8 2>/dev/null && \
         dd if=/dev/urandom of=second bs=1M count=40 2>/dev/null && \
         sha256sum first > first.sum && sha256sum second > second.sum && sync",
    );
    assert_eq!(made, 0, "the guest wrote its files");
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("g1").is_some());
    c.json(&["group", "create", "g", "--vm", "g1", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(240), || c.vm("g1").unwrap()["replica_state"] == "consistent");
    g.kill9();

    // The command, then the guest booted from the overlays: timed to its agent answering.
    let began = Instant::now();
    let job = c.json(&[
        "recover",
        "g1",
        "--rp",
        "latest",
        "--to",
        "host",
        "--host",
        "node1",
        "--name",
        "g1-i",
        "--instant",
        "--wait",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let restored = vm_dir.join("restored");
    let console = c.root.path().join("g1-i.console");
    let mut qemu = boot(&restored.join("g1-i.toml"), &console);
    let instant_secs = began.elapsed().as_secs_f64();
    let ga = VmDef::load(&restored.join("g1-i.toml")).unwrap().guest_agent.unwrap();
    assert_eq!(run(&ga, "cd /mnt && sha256sum -c first.sum", Duration::from_secs(120)), 0, "read through the export");

    // The coordinator dies: a read of what was not read yet waits, and goes on after it is back.
    c.coordinator.signal(9);
    let _ = c.coordinator.child.wait();
    let pid = start(&ga, "cd /mnt && sha256sum -c second.sum");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(exited(&ga, pid), None, "the guest's read pauses while the coordinator is gone");
    std::fs::remove_file(c.dir().join("coordinator.addr")).unwrap();
    c.coordinator = Daemon::spawn(
        &["x-coordinator", "serve", "--data-dir", &c.dir_str()],
        c.root.path().join("coord-restarted.log"),
    );
    let mut code = None;
    wait_until("the paused read finished", Duration::from_secs(240), || {
        code = exited(&ga, pid);
        code.is_some()
    });
    assert_eq!(code, Some(0), "the file read after the restart is intact");

    // recover-finish under the running guest: the export stops, the guest goes on, and what it
    // reads now comes from its own disk alone.
    let said = ok(&["--data-dir", &c.dir_str(), "recover-finish", "g1-i"]);
    assert!(said.contains("no longer depends on the recovery point"), "{said}");
    assert!(!restored.join("g1-i-os.nbd").exists(), "the export's socket is gone");
    let again =
        "sync && echo 3 > /proc/sys/vm/drop_caches && cd /mnt && sha256sum -c first.sum && sha256sum -c second.sum";
    assert_eq!(run(&ga, again, Duration::from_secs(240)), 0, "the guest runs on, its files intact");
    assert!(qemu.0.try_wait().unwrap().is_none(), "the guest kept running");

    // The same disk restored in full, for comparison.
    let began = Instant::now();
    let full = c.recover_disk("g1", "latest", "os");
    let full_secs = began.elapsed().as_secs_f64();
    eprintln!(
        "instant recovery: {instant_secs:.1} s from the command to the guest agent answering; \
         full restore of the same {} MiB disk: {full_secs:.1} s",
        full.len() as u64 / MIB
    );
}
