//! A directory of 10,000 files (issue 18: "a directory of 40,000 entries cannot be listed and
//! restores super-linearly"; 10,000 because `mke2fs -d` itself links each file by a scan of the
//! directory, and took over a minute alone for 40,000 — `bulwark-bench --scenario items`
//! measures 5,000 against 20,000): an ext4 partition built with `mke2fs -d` and indexed with
//! `e2fsck -fyD` (the directory becomes an htree, checked with `debugfs`), beside a FAT
//! partition with 500 long UTF-8 names (fatfs, making the image, scans the directory on each
//! create), in a sim VM, backed up; `ls` pages through every
//! name with `--after` (exactly the set, no duplicate, in order), the unpaged JSON document is
//! valid and whole, and `recover-items` restores every file with its exact contents.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const FILES: usize = 10_000;
const FAT_FILES: usize = 500;

/// The name of ext4 file `i`: mostly short, every 97th long and UTF-8 (up to 250 bytes).
fn ext_name(i: usize) -> String {
    if i.is_multiple_of(97) {
        format!("{}-{i:05}", "é".repeat(120))
    } else {
        format!("f{i:05}")
    }
}

fn ext_content(i: usize) -> String {
    format!("file {i} of the big directory\n")
}

fn fat_name(i: usize) -> String {
    format!("{i:04} long file name — ünïcødé.txt")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (e2fsprogs installed?)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An MBR disk: p1 = ext4 (1 KiB blocks: 10,000 one-block files take 10 MiB) holding
/// `/big`, p2 = FAT holding `/names`.
fn build_disk(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..FILES {
        std::fs::write(src.join("big").join(ext_name(i)), ext_content(i)).unwrap();
    }
    let ext = dir.join("ext.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "1024", "-N", "12000", "-d"])
        .arg(&src)
        .arg(&ext)
        .arg("64M"));
    std::fs::remove_dir_all(&src).unwrap();
    // `mke2fs -d` writes a linear directory; e2fsck -D rebuilds it as an htree (dir_index).
    let st = Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&ext).output().unwrap();
    assert!(matches!(st.status.code(), Some(0..=1)), "e2fsck: {}", String::from_utf8_lossy(&st.stdout));
    let dump = run(Command::new("debugfs").args(["-R", "htree_dump /big"]).arg(&ext));
    assert!(dump.contains("Root node dump"), "the directory is hash-indexed: {}", &dump[..dump.len().min(500)]);

    let fat = dir.join("fat.img");
    {
        // In memory: fatfs reads a directory 32 bytes at a time, and each create scans it.
        let mut img = std::io::Cursor::new(vec![0u8; (16 * MIB) as usize]);
        fatfs::format_volume(&mut img, fatfs::FormatVolumeOptions::new()).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
            let names = fs.root_dir().create_dir("names").unwrap();
            for i in 0..FAT_FILES {
                names.create_file(&fat_name(i)).unwrap().write_all(format!("fat {i}\n").as_bytes()).unwrap();
            }
        }
        std::fs::write(&fat, img.into_inner()).unwrap();
    }
    let disk = dir.join("disk.img");
    let mut d = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk).unwrap();
    d.set_len(96 * MIB).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut d, 512, [9, 8, 7, 6]).unwrap();
    mbr[1] = mbr_entry(2048, 131_072, 0x83);
    mbr[2] = mbr_entry(133_120, 32_768, 0x0c);
    mbr.write_into(&mut d).unwrap();
    for (img, at) in [(&ext, MIB), (&fat, 65 * MIB)] {
        d.seek(SeekFrom::Start(at)).unwrap();
        d.write_all(&std::fs::read(img).unwrap()).unwrap();
        std::fs::remove_file(img).unwrap();
    }
    d.sync_all().unwrap();
    disk
}

/// Every name at `path`, page by page with `--limit` and `--after`.
fn ls_paged(c: &Cluster, path: &str, limit: usize) -> (Vec<Vec<u8>>, usize) {
    let mut names = vec![];
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let limit = limit.to_string();
        let mut args = vec!["ls", "big", "--rp", "latest", "--disk", "os", path, "--limit", &limit];
        if let Some(a) = &after {
            args.extend_from_slice(&["--after", a]);
        }
        let page = c.json(&args);
        pages += 1;
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty() || page["next"].is_null(), "a page with a next is never empty here");
        for i in items {
            let p = i["path"].as_str().unwrap();
            let name = p.strip_prefix(path).and_then(|n| n.strip_prefix('/')).unwrap();
            names.push(name.as_bytes().to_vec());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return (names, pages),
        }
        assert!(pages < 1000, "paging does not end");
    }
}

#[test]
fn a_directory_of_ten_thousand_files_is_paged_through_and_restored_whole() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let disk = build_disk(c.root.path());
    let req = CreateVm {
        os: "linux".into(),
        ..CreateVm::new("big", "node1", vec![DiskConfig { name: "os".into(), size: 96 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    ok(&[
        "x-agent",
        "sim",
        "write",
        "--root",
        root.to_str().unwrap(),
        "--vm",
        "big",
        "--disk",
        "os",
        "--offset",
        "0",
        "--input",
        disk.to_str().unwrap(),
    ]);
    std::fs::remove_file(&disk).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("big").is_some());
    c.json(&["group", "create", "g", "--vm", "big", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(90), || c.vm("big").unwrap()["replica_state"] == "consistent");

    // ext4 htree: every name exactly once, in raw-byte order, over many pages.
    let (names, pages) = ls_paged(&c, "/p1/big", 1000);
    let want: BTreeSet<Vec<u8>> = (0..FILES).map(|i| ext_name(i).into_bytes()).collect();
    assert_eq!(names.len(), FILES, "no duplicates, nothing missing");
    assert!(names.windows(2).all(|w| w[0] < w[1]), "pages follow one another in name order");
    assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert!(pages >= FILES / 1000, "{pages} pages");

    // Without --limit: one JSON document, every entry, with sizes.
    let all = c.json(&["ls", "big", "--rp", "latest", "--disk", "os", "/p1/big"]);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), FILES);
    let long = format!("/p1/big/{}", ext_name(97));
    let e = all.iter().find(|i| i["path"] == long.as_str()).unwrap();
    assert_eq!(e["size"], ext_content(97).len());
    assert_eq!(e["kind"], "file");

    // FAT with long UTF-8 names, in small pages.
    let (fat, _) = ls_paged(&c, "/p2/names", 70);
    let want_fat: BTreeSet<Vec<u8>> = (0..FAT_FILES).map(|i| fat_name(i).into_bytes()).collect();
    assert_eq!(fat.len(), FAT_FILES);
    assert_eq!(fat.into_iter().collect::<BTreeSet<_>>(), want_fat);

    // recover-items of both directories: every file, exact contents.
    let out = c.root.path().join("restore");
    let o = ok(&[
        "--data-dir",
        &c.dir_str(),
        "recover-items",
        "big",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--path",
        "/p1/big",
        "--path",
        "/p2/names",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.contains("recovered"), "{o}");
    assert!(!o.contains("skipped"), "{o}");
    let restored = std::fs::read_dir(out.join("big")).unwrap().count();
    assert_eq!(restored, FILES);
    for i in 0..FILES {
        let got = std::fs::read(out.join("big").join(ext_name(i))).unwrap();
        assert_eq!(got, ext_content(i).as_bytes(), "file {i}");
    }
    for i in 0..FAT_FILES {
        let got = std::fs::read(out.join("names").join(fat_name(i))).unwrap();
        assert_eq!(got, format!("fat {i}\n").as_bytes(), "FAT file {i}");
    }
}
