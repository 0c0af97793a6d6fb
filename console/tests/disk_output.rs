//! `recover-disk --output FILE` (issue 18, part 8): FILE is created exclusively with mode 0600,
//! replaced only with `--force` when it is a regular file, never written through a device, link,
//! FIFO or directory without `--device`; the partial file is `FILE.partial`, created
//! exclusively, and gone after a failure or a real SIGINT sent to the console.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A cluster with one backed-up sim VM `vm1` whose disk `os` holds `size` random bytes.
fn backed_up(size: &str) -> Cluster {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    random_sim_vm(&root, "vm1", "node1", &[&format!("os:{size}")]);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("vm1").is_some());
    c.protect_and_wait("vm1");
    c
}

fn recover_disk(c: &Cluster, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["recover-disk", "vm1", "--rp", "latest", "--disk", "os", "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    c.run(&args)
}

fn refused(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(needle), "wanted {needle:?} in {stderr}");
}

#[test]
fn recover_disk_creates_exclusively_0600_and_replaces_only_what_it_may() {
    let c = backed_up("8MiB");
    let want = sim_disk(&c.root.path().join("sim"), "vm1", "os");
    let dir = c.root.path().join("out");
    std::fs::create_dir_all(&dir).unwrap();

    // A new file: the disk, mode 0600; an unrelated X.partial beside X.img is not touched.
    let img = dir.join("x.img");
    std::fs::write(dir.join("x.partial"), b"someone else's\n").unwrap();
    let out = recover_disk(&c, &img, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&img).unwrap(), want);
    assert_eq!(std::fs::metadata(&img).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(dir.join("x.partial")).unwrap(), b"someone else's\n");
    assert!(!dir.join("x.img.partial").exists());

    // An existing file: refused without --force (untouched), replaced with it.
    std::fs::write(&img, b"keep me\n").unwrap();
    refused(&recover_disk(&c, &img, &[]), "--force");
    assert_eq!(std::fs::read(&img).unwrap(), b"keep me\n");
    let out = recover_disk(&c, &img, &["--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&img).unwrap(), want);

    // A leftover FILE.partial is named and refused, never truncated.
    let y = dir.join("y.img");
    std::fs::write(dir.join("y.img.partial"), b"leftover\n").unwrap();
    refused(&recover_disk(&c, &y, &[]), "y.img.partial exists");
    assert_eq!(std::fs::read(dir.join("y.img.partial")).unwrap(), b"leftover\n");
    assert!(!y.exists());

    // Devices and other nodes: /dev/null is a character device (refused even with --device),
    // a directory, a symlink and a FIFO are refused, with or without --force.
    refused(&recover_disk(&c, Path::new("/dev/null"), &[]), "character device");
    refused(&recover_disk(&c, Path::new("/dev/null"), &["--device"]), "not a block device");
    refused(&recover_disk(&c, Path::new("/dev/null"), &["--force"]), "character device");
    refused(&recover_disk(&c, &dir, &["--force"]), "a directory");
    let link = dir.join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    refused(&recover_disk(&c, &link, &["--force"]), "symbolic link");
    assert_eq!(std::fs::read(&img).unwrap(), want, "nothing written through the link");
    let fifo = dir.join("fifo.img");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    refused(&recover_disk(&c, &fifo, &["--force"]), "FIFO");
    refused(&recover_disk(&c, &dir.join("new.img"), &["--device"]), "does not exist");

    // A failed recovery leaves no partial file.
    let z = dir.join("z.img");
    let out = c.run(&["recover-disk", "vm1", "--rp", "latest", "--disk", "nope", "--output", z.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!z.exists() && !dir.join("z.img.partial").exists());
}

#[test]
fn sigint_during_recover_disk_removes_the_partial_file() {
    let c = backed_up("32MiB");
    let img = c.root.path().join("big.img");
    let partial = c.root.path().join("big.img.partial");
    // Throttled, so the copy is certainly under way when the signal comes.
    let child = Command::new(bin())
        .args(["--data-dir", &c.dir_str(), "recover-disk", "vm1", "--rp", "latest", "--disk", "os"])
        .args(["--limit", "1MiB/s", "--output", img.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the partial file", Duration::from_secs(30), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() == 32 * MIB)
    });
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: interrupted by SIGINT") && stderr.contains("big.img.partial removed"), "{stderr}");
    assert!(!partial.exists(), "the partial file is gone");
    assert!(!img.exists(), "no image was made");
}
