//! Item recovery in large directories (issue 18): ext4 images with one directory of 5,000 and
//! of 20,000 files (`mke2fs -d` links each file by a scan of the directory, so building 40,000
//! takes minutes), linear (as `mke2fs -d` writes it) and hash-indexed (after `e2fsck -fD`),
//! read in process by the items worker's own functions. For each it times what `ls` costs
//! paging through the whole directory (the worker's listing once, then the coordinator's pages
//! from it), what paging costs without that listing (a worker per page: the fallback for a
//! directory too large to keep), and a copy of every file out. The ratio of 20,000 to 5,000
//! entries is 4 for a linear cost, 16 for a quadratic one.

use bulwark_coordinator::items::{self, disk, listings};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// One image's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DirFigures {
    pub entries: usize,
    pub htree: bool,
    /// The whole directory listed once, then paged 1,000 at a time from the listing.
    pub ls_seconds: f64,
    /// Every page read by a worker of its own (1,000 entries a page).
    pub ls_per_page_seconds: f64,
    /// Every file copied out.
    pub copy_seconds: f64,
}

/// What the items benchmark measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ItemsFigures {
    pub dirs: Vec<DirFigures>,
}

impl ItemsFigures {
    /// 20,000 against 5,000 entries of one layout: (ls, ls per page, copy).
    pub fn ratios(&self, htree: bool) -> Option<(f64, f64, f64)> {
        let small = self.dirs.iter().find(|d| d.htree == htree && d.entries == SMALL)?;
        let big = self.dirs.iter().find(|d| d.htree == htree && d.entries == BIG)?;
        let r = |a: f64, b: f64| a / b.max(1e-9);
        Some((
            r(big.ls_seconds, small.ls_seconds),
            r(big.ls_per_page_seconds, small.ls_per_page_seconds),
            r(big.copy_seconds, small.copy_seconds),
        ))
    }
}

pub const SMALL: usize = 5_000;
pub const BIG: usize = 20_000;
const PAGE: usize = 1_000;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("{cmd:?}: {e} (needs e2fsprogs)"))?;
    anyhow::ensure!(out.status.code().is_some_and(|c| c <= 1), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// An ext4 image (1 KiB blocks) whose `/big` holds `n` small files.
fn image(work: &Path, n: usize, htree: bool) -> anyhow::Result<Vec<u8>> {
    let src = work.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(src.join("big"))?;
    for i in 0..n {
        std::fs::write(src.join("big").join(format!("file-{i:06}")), format!("file {i}\n"))?;
    }
    let img = work.join("ext.img");
    let size = format!("{}M", 8 + n * 3 / 2 / 1024);
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "1024", "-N", &(n + 1000).to_string(), "-d"])
        .arg(&src)
        .arg(&img)
        .arg(&size))?;
    if htree {
        run(Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&img))?;
    }
    std::fs::remove_dir_all(&src)?;
    let bytes = std::fs::read(&img)?;
    std::fs::remove_file(&img)?;
    Ok(bytes)
}

fn reader(image: &std::sync::Arc<[u8]>) -> disk::DiskReader {
    let src = disk::MemBlocks::new(image.clone(), 64 * 1024);
    let g = src.geometry();
    disk::DiskReader::new(Box::new(src), g)
}

fn measure(image: Vec<u8>, n: usize, htree: bool) -> anyhow::Result<DirFigures> {
    let image: std::sync::Arc<[u8]> = image.into();
    let err = |e: items::ItemsError| anyhow::anyhow!("{e}");

    // As `ls` pages: one listing by the worker, then pages from it.
    let t = Instant::now();
    let mut all = vec![];
    let next = items::list_page(&reader(&image), "/big", None, listings::MAX_ITEMS as usize, &mut |i| {
        all.push(i);
        Ok(())
    })
    .map_err(err)?;
    anyhow::ensure!(next.is_none() && all.len() == n, "listed {} of {n}", all.len());
    let listing = listings::Listing::new(None, all).map_err(|e| anyhow::anyhow!(e))?;
    let (mut after, mut seen) = (None, 0);
    loop {
        let page = listing.page(after.as_deref(), PAGE).ok_or_else(|| anyhow::anyhow!("no page"))?;
        seen += page.items.len();
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    anyhow::ensure!(seen == n, "paged {seen} of {n}");
    let ls_seconds = t.elapsed().as_secs_f64();

    // A worker per page.
    let t = Instant::now();
    let (mut after, mut seen) = (None::<Vec<u8>>, 0);
    loop {
        let next = items::list_page(&reader(&image), "/big", after.as_deref(), PAGE, &mut |_| {
            seen += 1;
            Ok(())
        })
        .map_err(err)?;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    anyhow::ensure!(seen == n, "paged {seen} of {n}");
    let ls_per_page_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut files = 0;
    items::copy_out(&reader(&image), &["/big".to_owned()], &mut |e| {
        if let items::Emit::Entry { item, .. } = e {
            files += usize::from(item.kind == items::ItemKind::File);
        }
        Ok(())
    })
    .map_err(err)?;
    anyhow::ensure!(files == n, "copied {files} of {n}");
    let copy_seconds = t.elapsed().as_secs_f64();
    Ok(DirFigures { entries: n, htree, ls_seconds, ls_per_page_seconds, copy_seconds })
}

/// Runs the four images in `work`.
pub fn run_bench(work: &Path) -> anyhow::Result<ItemsFigures> {
    let mut f = ItemsFigures::default();
    for htree in [false, true] {
        for n in [SMALL, BIG] {
            eprintln!("items: a directory of {n} files, {}", if htree { "htree" } else { "linear" });
            let img = image(work, n, htree)?;
            f.dirs.push(measure(img, n, htree)?);
        }
    }
    Ok(f)
}
