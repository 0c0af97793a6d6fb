//! Item restores are safe on the restoring host (issue 18, part 4), with a real ext4 image made
//! by `mke2fs -d` from a tree holding a setuid-root binary, a setgid file, a sticky
//! world-writable directory, a world-writable file and a sparse 2 GiB file, backed up from a
//! sim VM and restored by the console (`--output DIR`) and by an agent (`--dest-host`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where the sparse file's three data grains lie.
const SPARSE_DATA: [(u64, u8); 3] = [(0, b'A'), (GIB, b'B'), (2 * GIB - 4096, b'C')];

/// The guest's tree, as an ext4 partition of an MBR disk image.
fn build_disk(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("tmp")).unwrap();
    std::fs::create_dir_all(src.join("docs")).unwrap();
    let put = |name: &str, bytes: &[u8], mode: u32| {
        std::fs::write(src.join(name), bytes).unwrap();
        std::fs::set_permissions(src.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    put("suid", b"#!/bin/sh\nid\n", 0o4755);
    put("sgid", b"group\n", 0o2755);
    put("ww", b"anyone\n", 0o666);
    put("tmp/x", b"in tmp\n", 0o644);
    put("docs/a.txt", b"from the guest: a\n", 0o644);
    put("docs/b.txt", b"from the guest: b\n", 0o644);
    std::fs::set_permissions(src.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // 8 MiB of data: more than a 4 MiB destination holds.
    let big: Vec<u8> = (0..8 * MIB as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    put("big.bin", &big, 0o644);
    let sparse = std::fs::File::create(src.join("sparse.bin")).unwrap();
    sparse.set_len(2 * GIB).unwrap();
    for (at, b) in SPARSE_DATA {
        std::os::unix::fs::FileExt::write_all_at(&sparse, &[b; 4096], at).unwrap();
    }
    drop(sparse);
    let ext = dir.join("ext.img");
    let st = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&ext)
        .arg("64M")
        .status()
        .expect("mke2fs (e2fsprogs)");
    assert!(st.success());
    let disk = dir.join("disk.img");
    let mut d = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk).unwrap();
    d.set_len(80 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut d, 512, [1, 2, 3, 4]).unwrap();
    mbr[1] = mbr_entry(2048, 131072, 0x83);
    mbr.write_into(&mut d).unwrap();
    d.seek(SeekFrom::Start(MIB)).unwrap();
    d.write_all(&std::fs::read(&ext).unwrap()).unwrap();
    d.sync_all().unwrap();
    disk
}

/// A cluster with node1's agent and the VM `files` backed up.
fn protected_vm() -> Cluster {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let disk = build_disk(c.root.path());
    let req = CreateVm {
        os: "linux".into(),
        ..CreateVm::new("files", "node1", vec![DiskConfig { name: "os".into(), size: 80 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    let (root_s, disk_s) = (root.to_str().unwrap(), disk.to_str().unwrap());
    ok(&[
        "x-agent", "sim", "write", "--root", root_s, "--vm", "files", "--disk", "os", "--offset", "0", "--input",
        disk_s,
    ]);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("files").is_some());
    c.json(&["group", "create", "g", "--vm", "files", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(120), || c.vm("files").unwrap()["replica_state"] == "consistent");
    c
}

fn recover_items_args<'a>(paths: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["recover-items", "files", "--rp", "latest", "--disk", "os"];
    for p in paths {
        a.extend_from_slice(&["--path", p]);
    }
    a.extend_from_slice(extra);
    a
}

/// `bulwark --data-dir DIR ARGS`, which must succeed; answers stdout.
fn ok_in(c: &Cluster, args: &[&str]) -> String {
    let out = c.run(args);
    assert!(out.status.success(), "bulwark {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The modes every restore must show: with `keep`, the guest's; else as `tar` gives a non-owner.
fn assert_modes(dir: &Path, keep: bool, how: &str) {
    let want = |guest: u32, safe: u32| if keep { guest } else { safe };
    assert_eq!(mode(&dir.join("suid")), want(0o4755, 0o755), "{how}: setuid-root binary");
    assert_eq!(mode(&dir.join("sgid")), want(0o2755, 0o755), "{how}: setgid file");
    assert_eq!(mode(&dir.join("tmp")), want(0o1777, 0o755), "{how}: sticky world-writable directory");
    assert_eq!(mode(&dir.join("ww")), want(0o666, 0o644), "{how}: world-writable file");
    assert_eq!(std::fs::read(dir.join("tmp/x")).unwrap(), b"in tmp\n", "{how}");
    // Owned by the restoring user, whatever the guest's uid was.
    let me = std::fs::metadata(dir).unwrap().uid();
    assert_eq!(std::fs::metadata(dir.join("suid")).unwrap().uid(), me, "{how}");
}

#[test]
fn restored_items_drop_setuid_sticky_and_world_write_keep_holes_and_skip_bad_entries() {
    let c = protected_vm();
    let mode_paths = ["/p1/suid", "/p1/sgid", "/p1/tmp", "/p1/ww"];

    // Console, default and --keep-modes.
    let safe = c.root.path().join("console-safe");
    let safe_s: &str = safe.to_str().unwrap();
    ok_in(&c, &recover_items_args(&mode_paths, &["--output", safe_s]));
    assert_modes(&safe, false, "console");
    let kept = c.root.path().join("console-kept");
    let kept_s: &str = kept.to_str().unwrap();
    ok_in(&c, &recover_items_args(&mode_paths, &["--keep-modes", "--output", kept_s]));
    assert_modes(&kept, true, "console --keep-modes");

    // An agent, default and --keep-modes.
    for (keep, name) in [(false, "host-safe"), (true, "host-kept")] {
        let dest = c.root.path().join(name);
        let dest_s: &str = dest.to_str().unwrap();
        let mut extra = vec!["--dest-host", "node1", "--dest", dest_s, "--wait"];
        if keep {
            extra.push("--keep-modes");
        }
        let job = c.json(&recover_items_args(&mode_paths, &extra));
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_modes(&dest, keep, name);
    }

    // A sparse 2 GiB file comes back sparse, with its data where it was.
    let sparse_dir = c.root.path().join("sparse");
    let sparse_s: &str = sparse_dir.to_str().unwrap();
    ok_in(&c, &recover_items_args(&["/p1/sparse.bin"], &["--output", sparse_s]));
    let f = sparse_dir.join("sparse.bin");
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(meta.len(), 2 * GIB);
    let allocated = meta.blocks() * 512;
    assert!(allocated < 64 * MIB, "a 2 GiB file with 12 KiB of data takes {allocated} bytes on disk");
    let file = std::fs::File::open(&f).unwrap();
    for (at, b) in SPARSE_DATA {
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).unwrap();
        assert!(buf.iter().all(|&x| x == b), "data at {at}");
    }
    for hole in [4096, 64 * MIB, GIB + 4096, 2 * GIB - 8192] {
        let mut buf = vec![1u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, hole).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "zeros at {hole}");
    }

    // A name that exists is skipped with a warning (never overwritten); the rest is restored.
    let bad = c.root.path().join("bad");
    std::fs::create_dir_all(bad.join("docs")).unwrap();
    std::fs::write(bad.join("docs/a.txt"), b"mine\n").unwrap();
    let bad_s: &str = bad.to_str().unwrap();
    let out = c.run(&recover_items_args(&["/p1/docs", "/p1/ww"], &["--output", bad_s]));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("1 entr(ies) skipped") && stdout.contains("a.txt"), "{stdout}");
    assert!(stderr.contains("warning: skipped") && stderr.contains("File exists"), "{stderr}");
    assert_eq!(std::fs::read(bad.join("docs/a.txt")).unwrap(), b"mine\n", "never overwritten");
    assert_eq!(std::fs::read(bad.join("docs/b.txt")).unwrap(), b"from the guest: b\n");
    assert_eq!(std::fs::read(bad.join("ww")).unwrap(), b"anyone\n");

    // The same on a host: the job succeeds and names what it skipped.
    let job =
        c.json(&recover_items_args(&["/p1/docs", "/p1/ww"], &["--dest-host", "node1", "--dest", bad_s, "--wait"]));
    assert_eq!(job["state"], "succeeded", "{job}");
    let detail = job["detail"].as_str().unwrap();
    assert!(detail.contains("skipped") && detail.contains("b.txt") && detail.contains("ww"), "{detail}");
    assert_eq!(std::fs::read(bad.join("docs/a.txt")).unwrap(), b"mine\n");
}

/// A tmpfs of 4 MiB mounted for the test (unmounted when dropped).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(at)
            .output()
            .expect("mount");
        if !out.status.success() {
            println!("skipped: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(SmallDisk(at.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_destination_reports_no_space_left_on_the_device() {
    let probe = tempfile::tempdir().unwrap();
    let Some(probe_disk) = SmallDisk::mount(&probe.path().join("m")) else { return };
    drop(probe_disk);
    let c = protected_vm();
    let small = SmallDisk::mount(&c.root.path().join("small")).unwrap();
    let dest = small.0.join("console");
    let dest_s: &str = dest.to_str().unwrap();

    // The console's own writes.
    let out = c.run(&recover_items_args(&["/p1/docs", "/p1/big.bin"], &["--output", dest_s]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("no space left on the device"), "{stderr}");
    assert!(stderr.contains("big.bin needs 8388608 bytes"), "{stderr}");
    assert_eq!(std::fs::read(dest.join("docs/a.txt")).unwrap(), b"from the guest: a\n", "what fits is restored");

    // An agent's: its reason, not the broken stream, is the job's error.
    let host_dest = small.0.join("host");
    let host_s: &str = host_dest.to_str().unwrap();
    let args = recover_items_args(&["/p1/big.bin"], &["--dest-host", "node1", "--dest", host_s, "--wait"]);
    let out = c.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no space left on the device") && stderr.contains("big.bin needs"), "{stderr}");
    assert!(!stderr.contains("stream"), "the agent's reason wins: {stderr}");

    // A disk image onto the full device: the write fails with the system's words and no
    // partial file is left behind.
    let img = small.0.join("disk.img");
    let out = c.run(&["recover-disk", "files", "--rp", "latest", "--disk", "os", "--output", img.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!img.exists() && !small.0.join("disk.img.partial").exists(), "nothing left on the full device");
}
