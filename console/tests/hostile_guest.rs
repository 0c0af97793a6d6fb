//! Hostile guests: disks whose partition tables and file systems are crafted to crash, exhaust
//! or pin whoever parses them (a GPT with a valid checksum and billions of entries, GPT entries
//! of 256 bytes, an MBR whose extended-partition chain loops, an ext4 superblock with a 2^50-byte
//! block size, an ext4 inode table past the disk, a FAT directory whose cluster chain loops, a
//! FAT file whose chain runs past the volume). Each is browsed and restored from for real: the
//! coordinator stays up, its memory does not grow by 256 MiB, each request ends within 10 s with
//! a clear error, a backup of another VM running meanwhile succeeds, and the hostile VMs
//! themselves are backed up (nothing excluded) and restore bit-exact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::io::{Cursor, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const DISK: usize = 16 * MIB;

fn put32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A protective MBR and a GPT header with a valid checksum claiming `count` entries of
/// `entry_size` bytes at LBA 2.
fn gpt(count: u32, entry_size: u32) -> Vec<u8> {
    let mut d = vec![0u8; DISK];
    d[510] = 0x55;
    d[511] = 0xAA;
    d[446 + 4] = 0xEE;
    put32(&mut d, 446 + 8, 1);
    put32(&mut d, 446 + 12, (DISK / 512 - 1) as u32);
    let h = &mut d[512..1024];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&[0, 0, 1, 0]);
    put32(h, 12, 92);
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    put32(h, 80, count);
    put32(h, 84, entry_size);
    let crc = crc32fast::hash(&h[..92]);
    put32(h, 16, crc);
    d
}

fn mbr_part(d: &mut [u8], at: usize, kind: u8, first: u32, sectors: u32) {
    d[at + 4] = kind;
    put32(d, at + 8, first);
    put32(d, at + 12, sectors);
}

/// An MBR with an extended partition whose second EBR points back at the first.
fn mbr_loop() -> Vec<u8> {
    let mut d = vec![0u8; DISK];
    d[510] = 0x55;
    d[511] = 0xAA;
    mbr_part(&mut d, 446, 0x83, 2048, 2048);
    mbr_part(&mut d, 462, 0x05, 8192, 16384);
    for (ebr, next) in [(8192usize, 1024u32), (8192 + 1024, 0)] {
        let at = ebr * 512;
        d[at + 510] = 0x55;
        d[at + 511] = 0xAA;
        mbr_part(&mut d, at + 446, 0x83, 2, 100);
        mbr_part(&mut d, at + 462, 0x05, next, 2000);
    }
    d
}

/// A whole-disk ext4 (4 KiB blocks) holding `files`, made by mke2fs -d.
fn ext4(dir: &Path, files: &[(&str, &[u8])]) -> Vec<u8> {
    let src = dir.join("ext4-src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    for (name, data) in files {
        std::fs::write(src.join(name), data).unwrap();
    }
    let img = dir.join("ext4.img");
    let _ = std::fs::remove_file(&img);
    let out = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&img)
        .arg(format!("{}k", DISK / 1024))
        .output()
        .unwrap();
    assert!(out.status.success(), "mke2fs: {}", String::from_utf8_lossy(&out.stderr));
    let mut d = std::fs::read(&img).unwrap();
    d.resize(DISK, 0);
    d
}

/// A FAT16 volume (2 KiB clusters) with directory `LOOP` holding a cluster of entries (`.`,
/// `..` and 62 empty files) and file `BIG.BIN` of 8 KiB; `patch` then edits both FATs
/// (`set(cluster, value)`), given each entry's first cluster and the chain that follows.
fn fat(patch: impl Fn(&mut dyn FnMut(u16, u16), &dyn Fn(&str) -> Vec<u16>)) -> Vec<u8> {
    let mut cur = Cursor::new(vec![0u8; DISK]);
    fatfs::format_volume(
        &mut cur,
        fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat16).bytes_per_cluster(2048),
    )
    .unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        let root = fs.root_dir();
        let dir = root.create_dir("LOOP").unwrap();
        for i in 0..62 {
            dir.create_file(&format!("F{i:02}")).unwrap();
        }
        root.create_file("BIG.BIN").unwrap().write_all(&[7u8; 8192]).unwrap();
    }
    let mut d = cur.into_inner();
    let le16 = |d: &[u8], at: usize| u16::from_le_bytes([d[at], d[at + 1]]);
    let fat_at = usize::from(le16(&d, 14)) * 512;
    let fat_len = usize::from(le16(&d, 22)) * 512;
    let root_at = fat_at + usize::from(d[16]) * fat_len;
    let image = d.clone();
    // The chain of clusters of the root entry with 8.3 name `short` (11 bytes, space-padded).
    let chain = |short: &str| -> Vec<u16> {
        let mut name = [b' '; 11];
        let (base, ext) = short.split_once('.').unwrap_or((short, ""));
        name[..base.len()].copy_from_slice(base.as_bytes());
        name[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
        let entry = (0..512).map(|i| root_at + i * 32).find(|&at| image[at..at + 11] == name).unwrap();
        let mut c = le16(&image, entry + 26);
        let mut out = vec![];
        while (2..0xFFF0).contains(&c) && out.len() < 100 {
            out.push(c);
            c = le16(&image, fat_at + usize::from(c) * 2);
        }
        out
    };
    patch(
        &mut |cluster, value| {
            for f in 0..2 {
                let at = fat_at + f * fat_len + usize::from(cluster) * 2;
                d[at..at + 2].copy_from_slice(&value.to_le_bytes());
            }
        },
        &chain,
    );
    d
}

fn write_vm(c: &Cluster, root: &Path, name: &str, image: &[u8]) {
    let file = c.root.path().join(format!("{name}.img"));
    std::fs::write(&file, image).unwrap();
    sim_vm_from_image(root, name, DISK as u64, &file);
}

#[test]
fn hostile_partition_tables_and_file_systems_never_harm_the_coordinator() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let scratch = c.root.path().to_owned();

    // (VM, image, the command's arguments after `--disk os`, what the error must say)
    let mut ext_bs = ext4(&scratch, &[("hello.txt", b"hello")]);
    put32(&mut ext_bs, 1024 + 0x18, 40);
    let mut ext_itable = ext4(&scratch, &[("hello.txt", b"hello")]);
    // The first group descriptor (block 1) puts its inode table far past the disk.
    put32(&mut ext_itable, 4096 + 0x08, 0x7fff_fff0);
    let fat_loop = fat(|set, chain| {
        // The last cluster of LOOP's chain points back at its first.
        let c = chain("LOOP");
        set(c[c.len() - 1], c[0]);
    });
    let fat_past = fat(|set, chain| {
        // BIG.BIN's second cluster lies far past the volume.
        set(chain("BIG.BIN")[0], 0xFFEF);
    });
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, &str)> = vec![
        ("gpt-count", gpt(0x7fff_ffff, 128), vec!["ls", "/"], "partition entries"),
        ("gpt-size", gpt(128, 256), vec!["ls", "/"], "only 128"),
        ("mbr-loop", mbr_loop(), vec!["ls", "/"], "loops"),
        ("ext-bs", ext_bs, vec!["ls", "/"], "block size"),
        ("ext-itable", ext_itable, vec!["ls", "/"], "inode table"),
        ("fat-loop", fat_loop, vec!["ls", "/LOOP"], "entries"),
        ("fat-past", fat_past, vec!["recover-items", "--path", "/BIG.BIN"], "BIG.BIN"),
    ];
    for (name, image, _, _) in &cases {
        write_vm(&c, &root, name, image);
    }
    let good_image = ext4(&scratch, &[("fine.txt", b"fine")]);
    write_vm(&c, &root, "good", &good_image);

    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("every VM is reported", Duration::from_secs(30), || {
        c.json(&["vm", "list"]).as_array().unwrap().len() == cases.len() + 1
    });
    let mut args = vec!["group", "create", "g", "--sync-every", "off", "--recovery-points", "none"];
    for (name, ..) in &cases {
        args.extend_from_slice(&["--vm", name]);
    }
    args.extend_from_slice(&["--vm", "good"]);
    c.json(&args);
    wait_until("initial replicas (the swap scan ran on every hostile table)", Duration::from_secs(120), || {
        let vms = c.json(&["vm", "list"]);
        vms.as_array().unwrap().iter().all(|v| v["replica_state"] == "consistent")
    });
    for (name, ..) in &cases {
        let job = c.json(&["backup", name, "--wait"]);
        assert_eq!(job["state"], "succeeded", "{name}: {job}");
        assert_eq!(c.vm(name).unwrap()["excluded_bytes"], 0, "{name}: nothing excluded");
    }
    let baseline = c.coordinator.rss_kib();

    // The good VM is backed up over and over while the hostile requests run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backups = {
        let (dir, stop) = (c.dir_str(), stop.clone());
        std::thread::spawn(move || {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || done == 0 {
                let out = bulwark(&["--data-dir", &dir, "backup", "good", "--wait", "--output", "json"]);
                assert!(out.status.success(), "backup of the good VM: {}", String::from_utf8_lossy(&out.stderr));
                done += 1;
            }
            done
        })
    };

    let dest = c.root.path().join("restore");
    for (name, _, rest, want) in &cases {
        let mut args = vec![rest[0], name, "--rp", "latest", "--disk", "os"];
        args.extend_from_slice(&rest[1..]);
        let out_dir = dest.join(name);
        if rest[0] == "recover-items" {
            args.extend_from_slice(&["--output", out_dir.to_str().unwrap()]);
        }
        let t = Instant::now();
        let out = c.run(&args);
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {args:?} should fail; stdout {}", String::from_utf8_lossy(&out.stdout));
        assert!(err.starts_with("error: ") && err.contains(want), "{name}: {err}");
        assert!(took < Duration::from_secs(10), "{name}: the request took {took:?}");
        assert!(c.coordinator.is_running(), "{name}: the coordinator is down");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(backups.join().unwrap() >= 1);

    let grown = c.coordinator.rss_kib().saturating_sub(baseline);
    assert!(grown < 256 * 1024, "the coordinator grew by {grown} KiB");
    for (name, ..) in &cases {
        assert_eq!(c.recover_disk(name, "latest", "os"), sim_disk(&root, name, "os"), "{name} restores bit-exact");
    }
    // A well-formed file system still reads.
    let listing = c.json(&["ls", "good", "--rp", "latest", "--disk", "os", "/"]);
    assert!(listing.as_array().unwrap().iter().any(|i| i["path"] == "/fine.txt"), "{listing}");
    let log = c.coordinator.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("swap scan failed"), "the hostile tables were scanned and refused: {log}");
}
