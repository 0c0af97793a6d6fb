//! Large directories (issue 18: "a directory of 40,000 entries cannot be listed and restores
//! super-linearly"), in a sim VM, backed up; `ls` pages through every name with `--after`
//! (exactly the set, no duplicate, in order) and `recover-items` restores every file with its
//! exact contents:
//! - 10,000 files in an ext4 directory built with `mke2fs -d` and indexed with `e2fsck -fyD`
//!   (an htree, checked with `debugfs`), beside a FAT partition with 500 long UTF-8 names (the
//!   unpaged JSON document is checked too);
//! - 40,000 names in one *linear* ext4 directory (no `dir_index`), where each lookup by path
//!   would scan the whole directory: the restore reads each file through its directory entry.
//!
//! `bulwark-bench --scenario items` measures how the cost grows with the entries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

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

/// An ext4 image (1 KiB blocks) holding `/big`, 10,000 files, hash-indexed.
fn htree_ext(dir: &Path) -> std::path::PathBuf {
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
    ext
}

/// A FAT image holding `/names`, 500 long UTF-8 names.
fn fat_names(dir: &Path) -> std::path::PathBuf {
    let fat = dir.join("fat.img");
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
    fat
}

/// What linear-directory entry `i` holds: one of 400 pool files, each named 100 times.
fn pool_content(i: usize) -> String {
    format!("pool file {}\n", i % POOL)
}

const POOL: usize = 400;
const LINEAR_FILES: usize = 40_000;

/// An ext4 image (1 KiB blocks, no `dir_index`) whose `/big` is one linear directory of 40,000
/// names, 100 hard links to each of 400 files of `/pool`. Linking 40,000 names one by one (`mke2fs
/// -d`, `debugfs ln`) scans the directory each time and takes minutes, so the directory's
/// blocks are written here, as the format lays them out, into a file that `debugfs` then turns
/// into a directory; `e2fsck` counts the links and must find the result clean.
fn linear_ext(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("pool")).unwrap();
    for k in 0..POOL {
        std::fs::write(src.join("pool").join(format!("p{k:03}")), pool_content(k)).unwrap();
    }
    let ext = dir.join("linear.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "1024", "-N", "2000", "-O", "^metadata_csum,^dir_index", "-d"])
        .arg(&src)
        .arg(&ext)
        .arg("64M"));
    std::fs::remove_dir_all(&src).unwrap();
    let debugfs = |write: bool, req: &str| {
        let mut cmd = Command::new("debugfs");
        if write {
            cmd.arg("-w");
        }
        run(cmd.args(["-R", req]).arg(&ext).current_dir(dir))
    };
    let mut inode = std::collections::HashMap::new();
    for line in debugfs(false, "ls -p /pool").lines() {
        // /inode/mode/uid/gid/name/size/
        let f: Vec<&str> = line.split('/').collect();
        if f.len() >= 6 && f[5].starts_with('p') {
            inode.insert(f[5].to_owned(), f[1].parse::<u32>().unwrap());
        }
    }
    assert_eq!(inode.len(), POOL, "every pool file has an inode");

    // The directory's blocks: ".", "..", then the names; an entry never crosses a block and
    // the last of a block reaches its end.
    const BLOCK: usize = 1024;
    let mut entries: Vec<(u32, Vec<u8>, u8)> = vec![(0, b".".to_vec(), 2), (2, b"..".to_vec(), 2)];
    entries.extend((0..LINEAR_FILES).map(|i| (inode[&format!("p{:03}", i % POOL)], ext_name(i).into_bytes(), 1)));
    let rec_len = |name: &[u8]| (8 + name.len()).div_ceil(4) * 4;
    let mut blocks: Vec<u8> = vec![];
    let mut block: Vec<&(u32, Vec<u8>, u8)> = vec![];
    let flush = |block: &mut Vec<&(u32, Vec<u8>, u8)>, out: &mut Vec<u8>| {
        let start = out.len();
        for (j, (ino, name, kind)) in block.iter().enumerate() {
            let len = if j + 1 == block.len() { BLOCK - (out.len() - start) } else { rec_len(name) };
            out.extend_from_slice(&ino.to_le_bytes());
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&[name.len() as u8, *kind]);
            out.extend_from_slice(name);
            out.resize(out.len() + len - 8 - name.len(), 0);
        }
        assert_eq!(out.len() - start, BLOCK);
        block.clear();
    };
    let mut used = 0;
    for e in &entries {
        if used + rec_len(&e.1) > BLOCK {
            flush(&mut block, &mut blocks);
            used = 0;
        }
        used += rec_len(&e.1);
        block.push(e);
    }
    flush(&mut block, &mut blocks);
    std::fs::write(dir.join("big.dir"), &blocks).unwrap();
    debugfs(true, "write big.dir big");
    std::fs::remove_file(dir.join("big.dir")).unwrap();
    // "." names the directory's own inode, known only now: written into its first block.
    let stat = debugfs(false, "stat /big");
    let me: u32 = stat.split("Inode: ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let first: u64 = debugfs(false, "bmap /big 0").trim().parse().unwrap();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&ext).unwrap();
        f.seek(SeekFrom::Start(first * BLOCK as u64)).unwrap();
        f.write_all(&me.to_le_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    debugfs(true, "sif /big mode 040755");
    debugfs(true, "sif /big links_count 2");
    let st = Command::new("e2fsck").args(["-f", "-y"]).arg(&ext).output().unwrap();
    assert!(matches!(st.status.code(), Some(0..=1)), "e2fsck: {}", String::from_utf8_lossy(&st.stdout));
    let st = Command::new("e2fsck").args(["-f", "-n"]).arg(&ext).output().unwrap();
    assert_eq!(st.status.code(), Some(0), "a clean file system: {}", String::from_utf8_lossy(&st.stdout));
    let listed = debugfs(false, "ls -p /big").lines().filter(|l| l.starts_with('/')).count();
    assert_eq!(listed, LINEAR_FILES + 2, "e2fsck kept every name");
    assert!(!debugfs(false, "stat /big").contains("Flags: 0x81000"), "not hash-indexed");
    ext
}

/// An MBR disk of `size` bytes holding `parts` (image, partition type), 1 MiB aligned.
fn disk_of(dir: &Path, size: u64, parts: &[(std::path::PathBuf, u8)]) -> std::path::PathBuf {
    let disk = dir.join("disk.img");
    let mut d = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk).unwrap();
    d.set_len(size).unwrap();
    let mut mbr = mbrman::MBR::new_from(&mut d, 512, [9, 8, 7, 6]).unwrap();
    let mut at = MIB;
    for (n, (img, sys)) in parts.iter().enumerate() {
        let len = std::fs::metadata(img).unwrap().len();
        mbr[n + 1] = mbr_entry((at / 512) as u32, (len / 512) as u32, *sys);
        at += len.div_ceil(MIB) * MIB;
    }
    mbr.write_into(&mut d).unwrap();
    let mut at = MIB;
    for (img, _) in parts {
        d.seek(SeekFrom::Start(at)).unwrap();
        let bytes = std::fs::read(img).unwrap();
        d.write_all(&bytes).unwrap();
        at += (bytes.len() as u64).div_ceil(MIB) * MIB;
        std::fs::remove_file(img).unwrap();
    }
    assert!(at <= size, "the partitions fit the disk");
    d.sync_all().unwrap();
    disk
}

/// A cluster with sim VM `big` of `size` bytes holding `disk`, its initial replica made.
fn backed_up(disk: &Path, size: u64, c: &mut Cluster) {
    let root = c.root.path().join("sim");
    sim_vm_from_image(&root, "big", size, disk);
    std::fs::remove_file(disk).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("big").is_some());
    c.json(&["group", "create", "g", "--vm", "big", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(90), || c.vm("big").unwrap()["replica_state"] == "consistent");
}

/// `recover-items big --path P… --output OUT` from the latest recovery point; answers its output.
fn recover_items(c: &Cluster, paths: &[&str], out: &Path) -> String {
    let dir = c.dir_str();
    let mut args = vec!["--data-dir", &dir, "recover-items", "big", "--rp", "latest", "--disk", "os"];
    for p in paths {
        args.extend(["--path", p]);
    }
    args.extend(["--output", out.to_str().unwrap()]);
    ok(&args)
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
    let (ext, fat) = (htree_ext(c.root.path()), fat_names(c.root.path()));
    let disk = disk_of(c.root.path(), 96 * MIB, &[(ext, 0x83), (fat, 0x0c)]);
    backed_up(&disk, 96 * MIB, &mut c);

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
    let o = recover_items(&c, &["/p1/big", "/p2/names"], &out);
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

#[test]
fn a_linear_directory_of_forty_thousand_entries_is_paged_through_and_restored_whole() {
    let mut c = Cluster::start();
    let ext = linear_ext(c.root.path());
    let disk = disk_of(c.root.path(), 80 * MIB, &[(ext, 0x83)]);
    backed_up(&disk, 80 * MIB, &mut c);

    let (names, _) = ls_paged(&c, "/p1/big", 5000);
    assert_eq!(names.len(), LINEAR_FILES, "no duplicates, nothing missing");
    assert!(names.windows(2).all(|w| w[0] < w[1]), "pages follow one another in name order");
    let want: BTreeSet<Vec<u8>> = (0..LINEAR_FILES).map(|i| ext_name(i).into_bytes()).collect();
    assert_eq!(names.into_iter().collect::<BTreeSet<_>>(), want);

    let out = c.root.path().join("restore");
    let o = recover_items(&c, &["/p1/big"], &out);
    assert!(o.contains("recovered"), "{o}");
    assert!(!o.contains("skipped"), "{o}");
    assert_eq!(std::fs::read_dir(out.join("big")).unwrap().count(), LINEAR_FILES);
    for i in 0..LINEAR_FILES {
        let got = std::fs::read(out.join("big").join(ext_name(i))).unwrap();
        assert_eq!(got, pool_content(i).as_bytes(), "file {i}");
    }
}
