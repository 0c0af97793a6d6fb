//! Instant recovery (issue 21): `recover VM --to host --host H --instant` makes a VM on a QEMU
//! host whose disks are qcow2 overlays backed by the recovery point, served by H's agent from
//! the coordinator; nothing is copied first. Read through the overlay with real qemu-img, the
//! disk is the recovery point's bit for bit; writes stay in the overlay; the point never
//! changes; a host that cannot run such a VM refuses without leaving anything active.
//! `recover-finish` copies the rest — offline, or under a running QEMU with block-stream — and
//! the VM's disks no longer depend on the recovery point. A coordinator killed while the VM
//! runs pauses its reads, which go on when it is back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::launch;
use bulwark_agent::qemu::qmp::Qmp;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout").arg("120").arg(tool).args(args).output().expect("qemu-utils installed")
}

fn raw_of(image: &Path, out: &Path) -> Vec<u8> {
    let r = qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(r.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&r.stderr));
    std::fs::read(out).unwrap()
}

/// A coordinator protecting sim VM `s1` (12 MiB of random bytes, on sim host node2) and a QEMU
/// host node1 (its VM directory answered); the bytes of `s1`'s disk.
fn protected() -> (Cluster, std::path::PathBuf, Vec<u8>) {
    let mut c = Cluster::start();
    let sim = c.root.path().join("sim");
    random_sim_vm(&sim, "s1", "node2", &["os:12MiB"]);
    let vm_dir = c.root.path().join("q/vms");
    std::fs::create_dir_all(&vm_dir).unwrap();
    c.enroll("node1");
    c.enroll("node2");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    c.run_sim_agent("node2", &sim);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("s1").is_some());
    c.protect_and_wait("s1");
    let want = sim_disk(&sim, "s1", "os");
    (c, vm_dir, want)
}

#[test]
fn an_instant_recovery_pauses_while_the_coordinator_is_gone_and_goes_on_when_it_is_back() {
    let (mut c, vm_dir, want) = protected();
    instant(&c, "s1-k");
    let overlay = vm_dir.join("restored/s1-k-os.qcow2");

    // The coordinator dies before anything was read: a reader of the VM's disk waits.
    c.coordinator.signal(9);
    let _ = c.coordinator.child.wait();
    let out = c.root.path().join("paused.raw");
    let mut reader = KillOnDrop(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&overlay)
            .arg(&out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(reader.0.try_wait().unwrap().is_none(), "the read waits instead of failing");

    // Back on the same data directory: the agent reconnects, the reads go on, bit-exact.
    std::fs::remove_file(c.dir().join("coordinator.addr")).unwrap();
    c.coordinator = Daemon::spawn(
        &["x-coordinator", "serve", "--data-dir", &c.dir_str()],
        c.root.path().join("coord-restarted.log"),
    );
    let mut status = None;
    wait_until("the paused read finished", Duration::from_secs(120), || {
        status = reader.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "the read resumed and finished");
    assert!(std::fs::read(&out).unwrap() == want, "what it read is the recovery point, bit-exact");
    let log = c.agents[0].log_text();
    assert!(
        log.contains("reads wait until it is back") && log.contains("the link to the coordinator is back"),
        "{log}"
    );
}

#[test]
fn an_instant_recovery_runs_from_the_recovery_point_and_finishing_makes_its_disks_whole() {
    let (c, vm_dir, want) = protected();

    // Onto a host whose hypervisor cannot run it: refused, and nothing stays active (a second
    // attempt under the same name is not refused as a duplicate).
    let out = c.run(&[
        "recover",
        "s1",
        "--rp",
        "latest",
        "--to",
        "host",
        "--host",
        "node2",
        "--name",
        "s1-i",
        "--instant",
        "--wait",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("needs a QEMU host") && !said.contains("snapshot"), "{said}");

    let job = instant(&c, "s1-i");
    assert!(job["detail"].as_str().unwrap().contains("recover-finish s1-i"), "{job}");
    let restored = vm_dir.join("restored");
    let overlay = restored.join("s1-i-os.qcow2");
    assert!(restored.join("s1-i.toml").is_file());
    // An overlay of a few hundred KiB, not a copy of the disk.
    assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);
    let info = qemu("qemu-img", &["info", "-U", "--output", "json", overlay.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("s1-i-os.nbd") && info.contains("reconnect-delay"), "backed by the export: {info}");

    // Read through the overlay: the recovery point, bit-exact.
    let out = c.root.path().join("read.raw");
    assert!(raw_of(&overlay, &out) == want, "the instant VM's disk is the recovery point's");
    // A write lands in the overlay: the VM sees it, the recovery point does not change.
    let w = qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 65536 131072", overlay.to_str().unwrap()]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let mut changed = want.clone();
    changed[65536..65536 + 131072].fill(0x77);
    assert!(raw_of(&overlay, &out) == changed);
    assert!(c.recover_disk("s1", "latest", "os") == want, "the recovery point is unchanged");

    // The same name again while it is active: refused.
    let dup =
        c.run(&["recover", "s1", "--rp", "latest", "--to", "host", "--host", "node1", "--name", "s1-i", "--instant"]);
    assert!(!dup.status.success(), "a second instant recovery under one name");

    // recover-finish with the VM off: the overlay takes the rest and drops its backing; the
    // export stops; the disk reads the same, now on its own.
    let said = ok(&["--data-dir", &c.dir_str(), "recover-finish", "s1-i"]);
    assert!(said.contains("no longer depends on the recovery point"), "{said}");
    assert_eq!(backing(&overlay), None);
    assert!(!restored.join("s1-i-os.nbd").exists(), "the export's socket is gone");
    assert!(raw_of(&overlay, &out) == changed, "the finished disk, whole on its own");
    let again = c.run(&["recover-finish", "s1-i"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("no instant recovery"));

    // With the VM running: the rest is streamed under it (QMP block-stream) after the guest
    // wrote; then it runs on its own disks.
    instant(&c, "s1-j");
    let def = VmDef::load(&restored.join("s1-j.toml")).unwrap();
    let mut qemu_vm =
        KillOnDrop(launch::headless(&def, "tcg", 64).spawn().expect("qemu-system-x86_64 runs (installed by .ci/run)"));
    launch::wait_for_qmp(&def.qmp, Duration::from_secs(20)).expect("QEMU's QMP socket answers");
    let mut qmp = Qmp::connect(&def.qmp, Duration::from_secs(10)).unwrap();
    let device = &def.disks[0].device;
    let said =
        qmp.hmp(&format!("qemu-io -d /machine/peripheral/{device}/virtio-backend \"write -P 0x42 0 65536\"")).unwrap();
    assert!(said.trim().is_empty(), "qemu-io: {said}");
    drop(qmp); // QEMU's monitor serves one client at a time: the agent's, next.
    let said = ok(&["--data-dir", &c.dir_str(), "recover-finish", "s1-j"]);
    assert!(said.contains("no longer depends on the recovery point"), "{said}");
    let j = restored.join("s1-j-os.qcow2");
    assert_eq!(backing(&j), None, "the running VM's overlay no longer has a backing");
    assert!(!restored.join("s1-j-os.nbd").exists());
    let _ = Qmp::connect(&def.qmp, Duration::from_secs(10)).unwrap().execute("quit", serde_json::json!({}));
    qemu_vm.0.wait().unwrap();
    let mut guest = want.clone();
    guest[..65536].fill(0x42);
    assert!(raw_of(&j, &out) == guest, "the guest's write and the recovery point, whole");
}

#[test]
fn a_restarted_agent_serves_its_instant_recoveries_again_and_the_running_vm_waits_for_it() {
    let (mut c, vm_dir, want) = protected();
    instant(&c, "s1-m");
    let restored = vm_dir.join("restored");
    let def = VmDef::load(&restored.join("s1-m.toml")).unwrap();
    let _qemu =
        KillOnDrop(launch::headless(&def, "tcg", 64).spawn().expect("qemu-system-x86_64 runs (installed by .ci/run)"));
    launch::wait_for_qmp(&def.qmp, Duration::from_secs(20)).expect("QEMU's QMP socket answers");

    // The agent dies under the running VM; a read of the VM's disk waits for it.
    c.agents[0].signal(9);
    let _ = c.agents[0].child.wait();
    let (qmp_path, device) = (def.qmp.clone(), def.disks[0].device.clone());
    let read = std::thread::spawn(move || {
        let mut q = Qmp::connect(&qmp_path, Duration::from_secs(10)).unwrap();
        q.hmp(&format!("qemu-io -d /machine/peripheral/{device}/virtio-backend \"read 0 12M\"")).unwrap()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!read.is_finished(), "the VM's read waits for the export");

    // The agent starts again: it serves the instant recovery again, the read goes on.
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !read.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the read never resumed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = read.join().unwrap();
    assert!(said.trim().is_empty(), "the read succeeded: {said}");
    let log = c.agents.last().unwrap().log_text();
    assert!(log.contains("serving an instant recovery again"), "{log}");
    let _ = Qmp::connect(&def.qmp, Duration::from_secs(10)).unwrap().execute("quit", serde_json::json!({}));
    let out = c.root.path().join("after-restart.raw");
    assert!(raw_of(&restored.join("s1-m-os.qcow2"), &out) == want, "the disk reads whole after the restart");
}

#[test]
fn an_instant_recovery_that_fails_midway_leaves_nothing_and_can_be_asked_again() {
    let (c, vm_dir, want) = protected();
    let restored = vm_dir.join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    // Something of the operator's where the export's socket goes: never replaced.
    let theirs = restored.join("s1-x-os.nbd");
    std::fs::write(&theirs, b"not ours\n").unwrap();
    let args =
        ["recover", "s1", "--rp", "latest", "--to", "host", "--host", "node1", "--name", "s1-x", "--instant", "--wait"];
    let out = c.run(&args);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("already exists"), "{said}");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not ours\n");
    for left in ["s1-x.toml", "s1-x-os.qcow2", "s1-x.instant"] {
        assert!(!restored.join(left).exists(), "{left} was left behind");
    }
    // Once the path is free, the same recovery works.
    std::fs::remove_file(&theirs).unwrap();
    instant(&c, "s1-x");
    let out = c.root.path().join("x.raw");
    assert!(raw_of(&restored.join("s1-x-os.qcow2"), &out) == want);
}

/// `recover s1 --rp latest --to host --host node1 --name NAME --instant --wait`, which must
/// succeed.
fn instant(c: &Cluster, name: &str) -> serde_json::Value {
    let args =
        ["recover", "s1", "--rp", "latest", "--to", "host", "--host", "node1", "--name", name, "--instant", "--wait"];
    let job = c.json(&args);
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// QEMU, killed if the test fails before it quits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backing(image: &Path) -> Option<String> {
    let info = qemu("qemu-img", &["info", "-U", "--output", "json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    v.get("backing-filename").and_then(|b| b.as_str()).map(str::to_owned)
}
