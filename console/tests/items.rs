//! Item-level recovery: an ext4 file system made with `mke2fs -d` and a FAT file system made
//! by the test, in two partitions of an MBR disk written into a sim VM with `sim write`,
//! backed up, browsed with `ls` and recovered file by file with `recover-items`; symlinks are
//! restored as links (never followed), nothing lands outside the destination.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn build_disk(dir: &std::path::Path, data: &[u8]) -> std::path::PathBuf {
    // ext4 from a directory tree.
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello world\n").unwrap();
    std::fs::write(src.join("sub/data.bin"), data).unwrap();
    std::fs::write(src.join("sub/deeper/x.txt"), b"deep\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
    std::os::unix::fs::symlink("../../outside", src.join("rel")).unwrap();
    let ext = dir.join("ext.img");
    let st = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&ext)
        .arg("16M")
        .status()
        .expect("mke2fs (e2fsprogs)");
    assert!(st.success());
    // FAT made here.
    let fat = dir.join("fat.img");
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&fat).unwrap();
        f.set_len(8 * MIB).unwrap();
        fatfs::format_volume(&f, fatfs::FormatVolumeOptions::new()).unwrap();
        let fs = fatfs::FileSystem::new(&f, fatfs::FsOptions::new()).unwrap();
        fs.root_dir().create_file("readme.txt").unwrap().write_all(b"from FAT\n").unwrap();
        let docs = fs.root_dir().create_dir("docs").unwrap();
        docs.create_file("a.txt").unwrap().write_all(&data[..5000]).unwrap();
    }
    // An MBR disk: p1 = ext4 at 1 MiB, p2 = FAT at 18 MiB.
    let disk = dir.join("disk.img");
    let mut d = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk).unwrap();
    d.set_len(32 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut d, 512, [1, 2, 3, 4]).unwrap();
    mbr[1] = mbr_entry(2048, 32768, 0x83);
    mbr[2] = mbr_entry(36864, 16384, 0x0c);
    mbr.write_into(&mut d).unwrap();
    for (img, at) in [(&ext, MIB), (&fat, 18 * MIB)] {
        d.seek(SeekFrom::Start(at)).unwrap();
        d.write_all(&std::fs::read(img).unwrap()).unwrap();
    }
    d.sync_all().unwrap();
    disk
}

#[test]
fn files_are_browsed_and_recovered_from_ext4_and_fat_partitions() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let disk = build_disk(c.root.path(), &data);
    sim_vm_from_image(&root, "files", 32 * MIB, &disk);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("files").is_some());
    c.json(&["group", "create", "g", "--vm", "files", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("files").unwrap()["replica_state"] == "consistent");

    let top = c.json(&["ls", "files", "--rp", "latest", "--disk", "os"]);
    let names: Vec<&str> = top.as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["/p1", "/p2"]);
    assert_eq!(top[0]["kind"], "partition");
    let p1 = c.json(&["ls", "files", "--rp", "latest", "--disk", "os", "/p1"]);
    let find =
        |list: &serde_json::Value, p: &str| list.as_array().unwrap().iter().find(|i| i["path"] == p).cloned().unwrap();
    assert_eq!(find(&p1, "/p1/hello.txt")["size"], 12);
    assert_eq!(find(&p1, "/p1/sub")["kind"], "dir");
    assert_eq!(find(&p1, "/p1/link")["kind"], "symlink");
    assert_eq!(find(&p1, "/p1/link")["target"], "/etc/passwd");
    let one = c.json(&["ls", "files", "--rp", "latest", "--disk", "os", "/p1/sub/data.bin"]);
    assert_eq!(one[0]["size"], data.len());
    let p2 = c.json(&["ls", "files", "--rp", "latest", "--disk", "os", "/p2"]);
    assert_eq!(find(&p2, "/p2/readme.txt")["size"], 9);
    let missing = c.run(&["ls", "files", "--rp", "latest", "--disk", "os", "/p1/nope"]);
    assert_eq!(missing.status.code(), Some(1));
    let climb = c.run(&["ls", "files", "--rp", "latest", "--disk", "os", "/p1/../.."]);
    assert_eq!(climb.status.code(), Some(1));

    let out = c.root.path().join("restore/here");
    let o = ok(&[
        "--data-dir",
        &c.dir_str(),
        "recover-items",
        "files",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--path",
        "/p1/hello.txt",
        "--path",
        "/p1/sub",
        "--path",
        "/p1/link",
        "--path",
        "/p1/rel",
        "--path",
        "/p2/docs",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.contains("recovered"), "{o}");
    assert_eq!(std::fs::read(out.join("hello.txt")).unwrap(), b"hello world\n");
    assert_eq!(std::fs::read(out.join("sub/data.bin")).unwrap(), data);
    assert_eq!(std::fs::read(out.join("sub/deeper/x.txt")).unwrap(), b"deep\n");
    assert_eq!(std::fs::read(out.join("docs/a.txt")).unwrap(), &data[..5000]);
    let link = std::fs::symlink_metadata(out.join("link")).unwrap();
    assert!(link.file_type().is_symlink(), "restored as a link, not followed");
    assert_eq!(std::fs::read_link(out.join("link")).unwrap(), std::path::Path::new("/etc/passwd"));
    assert_eq!(std::fs::read_link(out.join("rel")).unwrap(), std::path::Path::new("../../outside"));
    assert!(!c.root.path().join("outside").exists(), "nothing written outside the destination");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(out.join("hello.txt")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "modes kept");

    // The same onto a directory of an enrolled host, as a job.
    let remote = c.root.path().join("on-node1");
    let job = c.json(&[
        "recover-items",
        "files",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--path",
        "/p1/sub",
        "--path",
        "/p1/link",
        "--dest-host",
        "node1",
        "--dest",
        remote.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(std::fs::read(remote.join("sub/data.bin")).unwrap(), data);
    assert!(std::fs::symlink_metadata(remote.join("link")).unwrap().file_type().is_symlink());
    let rel = c.run(&[
        "recover-items",
        "files",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--path",
        "/p1/sub",
        "--dest-host",
        "node1",
        "--dest",
        "relative/dir",
    ]);
    assert_eq!(rel.status.code(), Some(1), "a destination must be absolute");

    // A second recovery into the same place never overwrites what is there: the name that
    // exists is skipped with a warning.
    std::fs::write(out.join("hello.txt"), b"changed here\n").unwrap();
    let again = c.run(&[
        "recover-items",
        "files",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--path",
        "/p1/hello.txt",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stdout).contains("skipped"), "{again:?}");
    assert_eq!(std::fs::read(out.join("hello.txt")).unwrap(), b"changed here\n");
}
