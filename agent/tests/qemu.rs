//! The QEMU backend against real `qemu-system-x86_64` (TCG, no guest OS: guest writes go
//! through HMP `qemu-io` on the device's backend) and real `qemu-nbd`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/qemu_vm.rs"]
mod qemu_vm;

use bulwark_agent::backend::{BackendError, Hypervisor};
use bulwark_agent::qemu::nbd::{self, Nbd};
use bulwark_agent::qemu::QemuBackend;
use bulwark_protocol::block::{ChunkHasher, ZERO};
use bulwark_protocol::messages::{ChangeToken, Consistency, PowerState};
use proptest::prelude::*;
use qemu_vm::{Vm, MIB};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn backend(dir: &Path) -> QemuBackend {
    QemuBackend::new(dir.join("vms"), None, dir.join("state")).unwrap()
}

/// Every byte of the held snapshot of disk `os`, through the backend's NBD reads.
fn read_all(b: &QemuBackend, vm: &str, size: u64, bs: usize) -> (Vec<u8>, u64) {
    let mut out = vec![0u8; size as usize];
    let blocks = size.div_ceil(bs as u64);
    let h = ChunkHasher::plain();
    let stats = b
        .read_blocks(vm, "os", (0..blocks).collect(), bs, &h, &mut |blk| {
            if blk.id != ZERO {
                let at = blk.index as usize * bs;
                out[at..at + blk.data.len()].copy_from_slice(blk.data);
            }
            Ok(())
        })
        .unwrap();
    (out, stats.bytes_read)
}

/// One snapshot run: freeze, take, thaw.
fn snap(b: &QemuBackend, vm: &str) -> (Consistency, ChangeToken) {
    let c = b.freeze(vm).unwrap().consistency;
    let t = b.take(vm, "node1").unwrap();
    b.thaw(vm).unwrap();
    (c, t)
}

#[test]
fn nbd_client_against_qemu_nbd_reads_writes_and_reports_extents() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("8M")
        .status()
        .unwrap()
        .success());
    let sock = dir.path().join("n.sock");
    let mut server =
        Command::new("qemu-nbd").args(["-f", "qcow2", "-x", "exp", "-t", "-k"]).arg(&sock).arg(&img).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = loop {
        match Nbd::connect(&sock, "exp", &["base:allocation"], Duration::from_secs(5)) {
            Ok(n) => break n,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(n.size(), 8 * MIB);
    let data: Vec<u8> = (0..MIB as usize + 5).map(|i| (i % 253) as u8).collect();
    n.write_at(&data, 3 * MIB).unwrap();
    n.flush().unwrap();
    let mut back = vec![0u8; data.len() + 100];
    n.read_at(&mut back, 3 * MIB - 100).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0), "a hole reads as zeroes");
    assert_eq!(&back[100..], &data[..]);
    let ex = n.block_status("base:allocation", 0, 8 * MIB).unwrap();
    assert_eq!(ex.iter().map(|e| e.length).sum::<u64>(), 8 * MIB, "extents cover the disk: {ex:?}");
    let data_blocks = nbd::blocks_of(&ex, MIB, |f| f & nbd::STATE_ZERO == 0);
    assert_eq!(data_blocks, vec![3, 4], "only the written megabytes hold data");
    // Out-of-range requests are refused before they reach the server.
    assert!(n.read_at(&mut [0u8; 16], 8 * MIB - 8).is_err());
    assert!(n.block_status("qemu:dirty-bitmap:none", 0, MIB).is_err(), "an unnegotiated context is refused");
    n.disconnect();
    // An export that does not exist is a clear error.
    let e = Nbd::connect(&sock, "nope", &[], Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn snapshot_is_point_in_time_and_incrementals_read_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mut vm = Vm::create(dir.path(), "web1", size, "qcow2");
    vm.start();
    let b = backend(dir.path());
    let inv = b.inventory("node1").unwrap();
    assert_eq!(inv.vms.len(), 1);
    assert_eq!(inv.vms[0].power, PowerState::Running);
    assert_eq!(inv.vms[0].disks[0].size_bytes, size);

    vm.write(0, MIB, 0x11);
    vm.write(10 * MIB, 2 * MIB, 0x22);
    // The initial copy: no token yet.
    let (c, t0) = snap(&b, "web1");
    assert_eq!(c, Consistency::Crash, "no guest agent: paused, crash-consistent");
    assert_eq!(vm.status(), "running", "the VM runs again right after the snapshot point");
    assert!(matches!(b.changed_blocks("web1", "os", None, MIB), Err(BackendError::TrackingLost(_))));
    assert_eq!(b.allocated_blocks("web1", "os", MIB).unwrap(), vec![0, 10, 11]);
    // Writes after the snapshot point never show in what is read.
    vm.write(0, MIB, 0x33);
    vm.write(20 * MIB, MIB, 0x44);
    let (img, _) = read_all(&b, "web1", size, MIB as usize);
    assert!(img[..MIB as usize].iter().all(|&x| x == 0x11));
    assert!(img[10 * MIB as usize..12 * MIB as usize].iter().all(|&x| x == 0x22));
    assert!(img[20 * MIB as usize..21 * MIB as usize].iter().all(|&x| x == 0));
    b.release("web1").unwrap();
    assert!(vm.nodes().iter().all(|n| !n.starts_with("bulwark-")), "no filter node left: {:?}", vm.nodes());
    assert!(!dir.path().join("state/fleece/web1-os.fleece").exists(), "the fleecing image is gone");
    let t1 = b.confirm("web1", ChangeToken { generation: t0.generation, sequence: t0.sequence + 1 }).unwrap();
    assert_eq!(vm.bitmap_count("bulwark-snap"), None, "a confirmed snapshot bitmap is dropped");

    // The next run sees exactly the writes made since the last snapshot point.
    let (_, t) = snap(&b, "web1");
    assert_eq!(t, t1);
    assert_eq!(b.changed_blocks("web1", "os", Some(t1), MIB).unwrap(), vec![0, 20]);
    let (img, _) = read_all(&b, "web1", size, MIB as usize);
    assert!(img[..MIB as usize].iter().all(|&x| x == 0x33));
    assert!(img[20 * MIB as usize..21 * MIB as usize].iter().all(|&x| x == 0x44));
    // A failed transfer: released and abandoned, its changes come back with the next ones.
    b.release("web1").unwrap();
    b.abandon("web1").unwrap();
    vm.write(30 * MIB, 4096, 0x55);
    let (_, t) = snap(&b, "web1");
    assert_eq!(t, t1, "an abandoned run does not advance the token");
    assert_eq!(b.changed_blocks("web1", "os", Some(t1), MIB).unwrap(), vec![0, 20, 30]);
    b.release("web1").unwrap();
    b.confirm("web1", ChangeToken { generation: t.generation, sequence: t.sequence + 1 }).unwrap();
    vm.quit();
}

#[test]
fn qemu_kill_9_makes_the_bitmap_inconsistent_and_tracking_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::create(dir.path(), "db", 16 * MIB, "qcow2");
    vm.start();
    let b = backend(dir.path());
    let (_, t0) = snap(&b, "db");
    b.release("db").unwrap();
    let t1 = b.confirm("db", ChangeToken { generation: t0.generation, sequence: t0.sequence + 1 }).unwrap();
    vm.write(MIB, 4096, 7);
    // A clean shutdown keeps the bitmap: the next run (QEMU off) still knows the changes.
    vm.quit();
    let (c, t) = snap(&b, "db");
    assert_eq!(c, Consistency::Crash);
    assert_eq!(t, t1);
    assert_eq!(b.changed_blocks("db", "os", Some(t1), MIB).unwrap(), vec![1], "the bitmap survived a clean shutdown");
    b.release("db").unwrap();
    let t2 = b.confirm("db", ChangeToken { generation: t.generation, sequence: t.sequence + 1 }).unwrap();

    vm.start();
    vm.write(2 * MIB, 4096, 8);
    vm.kill9();
    vm.start();
    let (_, t) = snap(&b, "db");
    assert!(t.generation > t2.generation, "QEMU's kill -9 starts a new tracking generation");
    let e = b.changed_blocks("db", "os", Some(t2), MIB).unwrap_err();
    assert!(matches!(e, BackendError::TrackingLost(_)), "{e}");
    b.release("db").unwrap();
    b.abandon("db").unwrap();
    vm.quit();
}

#[test]
fn a_storage_migration_starts_a_new_tracking_generation() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::create(dir.path(), "mv", 16 * MIB, "qcow2");
    vm.start();
    let b = backend(dir.path());
    let (_, t0) = snap(&b, "mv");
    b.release("mv").unwrap();
    let t1 = b.confirm("mv", ChangeToken { generation: t0.generation, sequence: t0.sequence + 1 }).unwrap();
    vm.write(MIB, 4096, 9);
    vm.quit();
    // The image is copied to other storage (its bitmaps with it) and the definition follows.
    let def_path = dir.path().join("vms/mv.toml");
    let def = std::fs::read_to_string(&def_path).unwrap();
    let old = def.lines().find_map(|l| l.strip_prefix("path = \"")).unwrap().trim_end_matches('"').to_owned();
    let new = dir.path().join("other-storage.qcow2");
    std::fs::copy(&old, &new).unwrap();
    std::fs::write(&def_path, def.replace(&old, new.to_str().unwrap())).unwrap();
    let (_, t) = snap(&b, "mv");
    assert!(t.generation > t1.generation, "another image: a new tracking generation");
    assert!(matches!(b.changed_blocks("mv", "os", Some(t1), MIB), Err(BackendError::TrackingLost(_))));
    b.release("mv").unwrap();
    b.abandon("mv").unwrap();
    // The same image again: the generation holds.
    let (_, again) = snap(&b, "mv");
    assert_eq!(again.generation, t.generation);
    b.release("mv").unwrap();
    b.abandon("mv").unwrap();
}

#[test]
fn a_killed_agents_leftovers_are_cleaned_and_no_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::create(dir.path(), "app", 16 * MIB, "qcow2");
    vm.start();
    let b = backend(dir.path());
    let (_, t0) = snap(&b, "app");
    b.release("app").unwrap();
    let t1 = b.confirm("app", ChangeToken { generation: t0.generation, sequence: t0.sequence + 1 }).unwrap();
    vm.write(MIB, 4096, 1);
    // The agent dies holding a frozen (paused) snapshot: nothing released, thawed or confirmed.
    b.freeze("app").unwrap();
    b.take("app", "node1").unwrap();
    assert_eq!(vm.status(), "paused");
    std::mem::forget(b);
    vm.write(3 * MIB, 4096, 2);
    let b = backend(dir.path());
    assert_eq!(b.cleanup_orphans().unwrap(), vec!["app".to_owned()]);
    assert_eq!(vm.status(), "running", "the VM a dead agent paused runs again");
    assert!(vm.nodes().iter().all(|n| !n.starts_with("bulwark-")), "{:?}", vm.nodes());
    assert!(vm.qmp().execute("query-block-exports", json!({})).unwrap().as_array().unwrap().is_empty());
    let (_, t) = snap(&b, "app");
    assert_eq!(t, t1);
    assert_eq!(b.changed_blocks("app", "os", Some(t1), MIB).unwrap(), vec![1, 3], "every write is still covered");
    b.release("app").unwrap();
    vm.quit();
}

#[test]
fn restores_go_through_qemu_nbd_and_refuse_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let mut vm = Vm::create(dir.path(), "fs", size, "qcow2");
    vm.start();
    let b = backend(dir.path());
    let e = b.restore_begin("fs", "node1", "test", None, &[]).unwrap_err();
    assert!(matches!(e, BackendError::Refused(_)), "{e}");
    vm.quit();
    b.restore_begin("fs", "node1", "test", None, &[]).unwrap();
    let data = vec![0x5au8; MIB as usize];
    b.restore_writer("fs", "os").unwrap().write_at(2 * MIB, &data).unwrap();
    b.restore_finish("fs").unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&vm.image)
        .arg(dir.path().join("out.raw"))
        .status()
        .unwrap();
    assert!(out.success());
    let raw = std::fs::read(dir.path().join("out.raw")).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert!(raw[2 * MIB as usize..3 * MIB as usize].iter().all(|&x| x == 0x5a));
    assert!(raw[..2 * MIB as usize].iter().all(|&x| x == 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]

    /// Random guest writes interleaved with snapshots: each snapshot reads exactly the model
    /// disk at its point, and its changed blocks cover every block written since the last.
    #[test]
    fn random_writes_and_snapshots_match_a_model_disk(
        ops in proptest::collection::vec((0u64..32, 1u64..3, 1u8..255, prop::bool::weighted(0.25)), 6..14)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let size = 32 * MIB;
        let mut vm = Vm::create(dir.path(), "p", size, "qcow2");
        vm.start();
        let b = backend(dir.path());
        let mut model = vec![0u8; size as usize];
        let mut token: Option<ChangeToken> = None;
        let mut dirty = std::collections::BTreeSet::new();
        let bs = 64 * 1024;
        for (mb, len_blocks, pattern, snapshot) in ops {
            let offset = mb * MIB + u64::from(pattern) * 4096 % MIB;
            let len = (len_blocks * 48 * 1024).min(size - offset);
            vm.write(offset, len, pattern);
            model[offset as usize..(offset + len) as usize].fill(pattern);
            for blk in offset / bs..(offset + len).div_ceil(bs) {
                dirty.insert(blk);
            }
            if snapshot {
                let (_, t) = snap(&b, "p");
                // A write racing right after the point must not show.
                vm.write(0, 4096, 0xfe);
                let (img, _) = read_all(&b, "p", size, bs as usize);
                prop_assert!(img == model, "the snapshot differs from the model");
                if let Some(prev) = token {
                    let changed: std::collections::BTreeSet<u64> =
                        b.changed_blocks("p", "os", Some(prev), bs).unwrap().into_iter().collect();
                    prop_assert!(dirty.is_subset(&changed), "a written block is missing from the changes");
                }
                b.release("p").unwrap();
                token = Some(b.confirm("p", ChangeToken { generation: t.generation, sequence: t.sequence + 1 }).unwrap());
                model[..4096].fill(0xfe);
                dirty.clear();
                dirty.insert(0);
            }
        }
        vm.quit();
    }
}

/// A tmpfs mounted for a test (unmounted when dropped); mounting needs root, as CI runs.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "this test mounts a tmpfs and needs root (CI runs as root)");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Sets top-level `key = value` lines of a VM's definition (before its `[[disks]]`).
fn set_def(vm: &Vm, lines: &str) {
    let path = vm.dir.join("vms").join(format!("{}.toml", vm.name));
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> =
        text.lines().filter(|l| !l.starts_with("fleece_dir") && !l.starts_with("fleece_reserve_percent")).collect();
    let at = kept.iter().position(|l| l.starts_with("[[disks]]")).unwrap();
    let mut out: Vec<String> = kept.iter().map(|l| (*l).to_owned()).collect();
    out.insert(at, lines.to_owned());
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
}

/// The fleece directory on a 16 MiB tmpfs: a snapshot whose reserve does not fit is refused
/// with the reason, before anything changes; one whose guest overwrites more than fits while
/// it is read breaks (the read fails and says so) while every guest write succeeds; released
/// and abandoned, the next snapshot reads the disk as it is, with the writes of the broken one.
#[test]
fn a_full_fleece_directory_breaks_the_snapshot_never_the_guests_writes() {
    let dir = tempfile::tempdir().unwrap();
    let fleece = dir.path().join("fleece");
    let _tmpfs = Tmpfs::mount(&fleece, "16m");
    let size = 128 * MIB;
    let mut vm = Vm::create(dir.path(), "f1", size, "qcow2");
    vm.start();
    vm.write(0, 64 * MIB, 0x11);
    let b = backend(dir.path());

    // 20 % of 128 MiB does not fit in 16 MiB: refused, nothing held, the VM runs.
    set_def(&vm, &format!("fleece_dir = \"{}\"\nfleece_reserve_percent = 20", fleece.display()));
    b.freeze("f1").unwrap();
    let e = b.take("f1", "node1").unwrap_err();
    b.thaw("f1").unwrap();
    assert!(matches!(e, BackendError::Refused(_)), "{e}");
    let text = e.to_string();
    assert!(text.contains(&fleece.display().to_string()) && text.contains("MiB free"), "unclear refusal: {text}");
    assert_eq!(vm.status(), "running");
    assert!(vm.nodes().iter().all(|n| !n.starts_with("bulwark-")), "no graph was built: {:?}", vm.nodes());

    // The default 10 % fits; then the guest overwrites 32 MiB while the snapshot is held.
    set_def(&vm, &format!("fleece_dir = \"{}\"", fleece.display()));
    let (_, t0) = snap(&b, "f1");
    for i in 0..4u64 {
        // `write` asserts that QEMU reported no error to the guest.
        vm.write(i * 8 * MIB, 8 * MIB, 0x20 + i as u8);
    }
    assert_eq!(vm.status(), "running", "the guest was not stopped by a full fleece image");
    let h = ChunkHasher::plain();
    let read = b.read_blocks("f1", "os", (0..size / MIB).collect(), MIB as usize, &h, &mut |_| Ok(()));
    let e = read.expect_err("a broken snapshot cannot be read");
    let text = e.to_string();
    assert!(text.contains("fleece") && text.contains("full"), "unclear read failure: {text}");
    b.release("f1").unwrap();
    b.abandon("f1").unwrap();
    assert!(vm.nodes().iter().all(|n| !n.starts_with("bulwark-")), "no filter node left: {:?}", vm.nodes());

    // The next snapshot is the disk as it is, and nothing of the broken one was lost.
    let (_, t1) = snap(&b, "f1");
    assert_eq!(t1, t0, "an abandoned run does not advance the token");
    let (img, _) = read_all(&b, "f1", size, MIB as usize);
    for i in 0..4u64 {
        let at = (i * 8 * MIB) as usize;
        assert!(img[at..at + (8 * MIB) as usize].iter().all(|&x| x == 0x20 + i as u8), "write {i} is in the snapshot");
    }
    assert!(img[(32 * MIB) as usize..(64 * MIB) as usize].iter().all(|&x| x == 0x11));
    b.release("f1").unwrap();
    vm.quit();
}
