//! Guest freeze for real: a tiny Linux guest (Debian's kernel and qemu-guest-agent, a busybox
//! initramfs, an ext4 disk) under TCG. A freeze through the guest agent gives a
//! `filesystem`-consistent snapshot whose ext4 is clean, with the guest's unsynced writes in
//! it; a guest agent that never answers, a failing and a hanging pre-snapshot hook each give a
//! paused, `crash`-consistent snapshot with the reason; no path leaves the guest frozen or the
//! VM paused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/linux_guest.rs"]
mod linux_guest;

use bulwark_agent::backend::Hypervisor;
use bulwark_agent::qemu::QemuBackend;
use bulwark_protocol::block::{ChunkHasher, ZERO};
use bulwark_protocol::messages::{ChangeToken, Consistency};
use linux_guest::LinuxVm;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BS: usize = 64 * 1024;

/// The held snapshot of disk `os`, read through the backend into a raw file.
fn read_snapshot(b: &QemuBackend, vm: &str, out: &Path) {
    let mut f = std::fs::File::create(out).unwrap();
    f.set_len(SIZE).unwrap();
    let h = ChunkHasher::plain();
    b.read_blocks(vm, "os", (0..SIZE / BS as u64).collect(), BS, &h, &mut |blk| {
        if blk.id != ZERO {
            f.seek(SeekFrom::Start(blk.index * BS as u64)).unwrap();
            f.write_all(blk.data).unwrap();
        }
        Ok(())
    })
    .unwrap();
    f.sync_all().unwrap();
}

/// `dumpe2fs -h`'s feature line of an ext4 image.
fn ext4_features(raw: &Path) -> String {
    let out = Command::new("dumpe2fs").arg("-h").arg(raw).output().unwrap();
    assert!(out.status.success(), "dumpe2fs: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with("Filesystem features:")).unwrap().to_owned()
}

fn debugfs_cat(raw: &Path, path: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(raw).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One backup's snapshot: freeze, take, thaw, read, release, confirm.
struct Shot {
    consistency: Consistency,
    note: Option<String>,
    /// QEMU's run state between freeze and thaw.
    status_while_frozen: String,
}

fn shot(b: &QemuBackend, vm: &LinuxVm, raw: &Path, while_frozen: impl FnOnce()) -> Shot {
    let q = b.freeze(&vm.name).unwrap();
    let status_while_frozen = vm.status();
    while_frozen();
    let t = b.take(&vm.name, "node1").unwrap();
    b.thaw(&vm.name).unwrap();
    assert_eq!(vm.status(), "running", "thaw resumes the VM");
    assert_eq!(vm.freeze_status(), "thawed", "thaw leaves nothing of the guest frozen");
    read_snapshot(b, &vm.name, raw);
    b.release(&vm.name).unwrap();
    b.confirm(&vm.name, ChangeToken { generation: t.generation, sequence: t.sequence + 1 }).unwrap();
    Shot { consistency: q.consistency, note: q.note, status_while_frozen }
}

#[test]
fn guest_freeze_is_filesystem_consistent_and_every_fallback_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut vm = LinuxVm::create(d, "linux", SIZE);
    vm.boot();
    let b = QemuBackend::new(d.join("vms"), None, d.join("state")).unwrap();
    let hooks = d.join("hooks.log");
    let raw = d.join("snap.raw");

    // 1. The guest agent freezes ext4: filesystem-consistent. The guest's write, still in its
    // page cache when the backup starts, is in the snapshot, and the journal is clean.
    vm.define(&format!(
        "guest_agent = \"{}\"\npre_snapshot = \"echo pre $BULWARK_VM $BULWARK_HOOK >> {h}\"\npost_snapshot = \"echo post $BULWARK_VM $BULWARK_HOOK >> {h}\"",
        vm.ga_path().display(),
        h = hooks.display()
    ));
    assert_eq!(vm.exec("echo 'written before the snapshot' > /mnt/hello.txt"), 0);
    let s = shot(&b, &vm, &raw, || assert_eq!(vm.status(), "running"));
    assert_eq!(s.consistency, Consistency::Filesystem);
    assert_eq!(s.note, None);
    assert_eq!(s.status_while_frozen, "running", "a frozen guest keeps running; only its filesystems wait");
    assert_eq!(std::fs::read_to_string(&hooks).unwrap(), "pre linux pre_snapshot\npost linux post_snapshot\n");
    let features = ext4_features(&raw);
    assert!(!features.contains("needs_recovery"), "a frozen ext4 has an empty journal: {features}");
    let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&raw).output().unwrap();
    assert!(fsck.status.success(), "e2fsck of the snapshot: {}", String::from_utf8_lossy(&fsck.stdout));
    assert_eq!(debugfs_cat(&raw, "/hello.txt"), "written before the snapshot\n");

    // 2. A guest agent that never answers (nothing listens on the port): the VM is paused
    // instead, crash-consistent, with the reason. The ext4 in it is mounted, journal and all.
    vm.define(&format!("guest_agent = \"{}\"\nfreeze_timeout_secs = 2", vm.silent_path().display()));
    let s = shot(&b, &vm, &raw, || {});
    assert_eq!(s.consistency, Consistency::Crash);
    assert_eq!(s.status_while_frozen, "paused");
    let note = s.note.unwrap();
    assert!(note.contains("did not answer within 2s") && note.contains("paused instead"), "{note}");
    assert!(ext4_features(&raw).contains("needs_recovery"), "an unfrozen mounted ext4 needs journal recovery");

    // 3. A failing pre-snapshot hook falls back to what the guest can still give: its agent's
    // freeze (file-system consistent, not app), with the hook's failure in the note.
    std::fs::remove_file(&hooks).unwrap();
    vm.define(&format!(
        "guest_agent = \"{}\"\napp_hooks = true\npre_snapshot = \"exit 3\"\npost_snapshot = \"echo post >> {}\"",
        vm.ga_path().display(),
        hooks.display()
    ));
    let s = shot(&b, &vm, &raw, || {});
    assert_eq!(s.consistency, Consistency::Filesystem);
    assert_eq!(s.status_while_frozen, "running", "frozen by the guest agent, not paused");
    let note = s.note.unwrap();
    assert!(note.contains("pre_snapshot hook failed") && note.contains("exit status: 3"), "{note}");
    assert!(note.contains("froze the file systems instead"), "{note}");
    assert_eq!(std::fs::read_to_string(&hooks).unwrap(), "post\n", "the post hook runs after a failed pre hook");

    // 3b. on_hook_failure = "pause": no freeze is asked of the guest; paused, crash, why.
    std::fs::remove_file(&hooks).unwrap();
    vm.define(&format!(
        "guest_agent = \"{}\"\npre_snapshot = \"exit 3\"\non_hook_failure = \"pause\"\npost_snapshot = \"echo post >> {}\"",
        vm.ga_path().display(),
        hooks.display()
    ));
    let s = shot(&b, &vm, &raw, || {});
    assert_eq!(s.consistency, Consistency::Crash);
    assert_eq!(s.status_while_frozen, "paused");
    let note = s.note.unwrap();
    assert!(note.contains("pre_snapshot hook failed") && note.contains("paused instead"), "{note}");

    // 3c. on_hook_failure = "fail": no snapshot at all, the hook's reason as the error.
    vm.define(&format!(
        "guest_agent = \"{}\"\npre_snapshot = \"exit 3\"\non_hook_failure = \"fail\"",
        vm.ga_path().display()
    ));
    let e = b.freeze(&vm.name).unwrap_err().to_string();
    assert!(e.contains("pre_snapshot hook failed") && e.contains("on_hook_failure"), "{e}");
    assert_eq!(vm.status(), "running");
    assert_eq!(vm.freeze_status(), "thawed");

    // 4. A pre-snapshot hook that hangs is killed at its bound; the guest agent still freezes.
    vm.define(&format!(
        "guest_agent = \"{}\"\npre_snapshot = \"sleep 600\"\nhook_timeout_secs = 1",
        vm.ga_path().display()
    ));
    let s = shot(&b, &vm, &raw, || {});
    assert_eq!(s.consistency, Consistency::Filesystem);
    let note = s.note.unwrap();
    assert!(note.contains("pre_snapshot hook did not finish within 1s"), "{note}");

    // 5. Back to a working agent: filesystem-consistent again, with the newest guest write.
    vm.define(&format!("guest_agent = \"{}\"", vm.ga_path().display()));
    assert_eq!(vm.exec("echo 'second write' > /mnt/second.txt"), 0);
    let s = shot(&b, &vm, &raw, || {});
    assert_eq!(s.consistency, Consistency::Filesystem);
    assert_eq!(debugfs_cat(&raw, "/second.txt"), "second write\n");
    assert!(!ext4_features(&raw).contains("needs_recovery"));
}
