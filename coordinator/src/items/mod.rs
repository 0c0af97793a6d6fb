//! Item-level recovery: browse and copy files out of a recovery point without restoring the
//! disk, and find the swap space that backups leave out.
//!
//! Everything inside a guest's disk is attacker-controlled bytes, so none of it is parsed in
//! the coordinator's process: [`sandbox`] starts the items worker ([`worker`], a child process
//! of the same executable with memory, CPU-time and wall-clock limits, no network and no files)
//! and serves it the disk's blocks over a pipe ([`pipe`]); whatever the guest's bytes do to the
//! worker, the coordinator answers "the guest's file system could not be read: …" and goes on.
//! Inside the worker, partition tables ([`table`]) and file systems ([`fs`]: ext2/3/4, FAT) are
//! bounds-checked before any allocation, and directories are listed with a cap on entries.
//!
//! Modules in reading order: [`disk`] (a disk from a block source), [`table`], [`fs`] (and
//! [`fat_guard`], what fatfs reads through), the operations below (plain functions over a
//! [`disk::DiskReader`], also what the fuzzer calls), [`pipe`], [`worker`], [`sandbox`], and
//! [`listings`] (the coordinator's cache of sorted directory listings, so paging through a
//! directory reads the guest once).
//!
//! Paths: on a partitioned disk the top level lists the partitions as `p1`, `p2`, … (logical
//! partitions of an MBR from `p5`) and a file's path is `/p1/etc/hosts`; on a disk that is one
//! file system, `/etc/hosts`. Names inside the guest are data, never trusted: [`Item::name`]
//! keeps the raw bytes and whoever writes them checks each component ([`safe_component`]).

pub mod disk;
pub mod fat_guard;
pub mod fs;
pub mod listings;
pub mod pipe;
pub mod sandbox;
pub mod table;
pub mod worker;

use crate::catalog::RpDisk;
use crate::store::Store;
use bulwark_protocol::transfer::{TransferFrame, TransferMessage};
use disk::{DiskReader, Geometry, StoreBlocks};
use fs::{DirRef, Entry, GuestFs};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Why an item operation failed.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ItemsError {
    #[error("{0}: no such file or directory in the recovery point")]
    NotFound(String),
    #[error("{path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    /// The worker failed as a process (limits, crash, timeout).
    #[error("the guest's file system could not be read: {0}")]
    Worker(String),
}

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemKind {
    Partition,
    Dir,
    File,
    Symlink,
    Other,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Partition => "partition",
            ItemKind::Dir => "dir",
            ItemKind::File => "file",
            ItemKind::Symlink => "symlink",
            ItemKind::Other => "other",
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The full path, for display (non-UTF-8 bytes replaced).
    pub path: String,
    /// The entry's own name, raw.
    pub name: Vec<u8>,
    pub kind: ItemKind,
    pub size: u64,
    /// Unix seconds.
    pub mtime: i64,
    /// Permission bits (0 where the file system has none).
    pub mode: u32,
    /// A symlink's target, raw (never followed).
    pub target: Option<Vec<u8>>,
}

/// A file system kind found in a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext,
    Fat,
    Swap,
    Unknown,
}

/// A partition.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub start: u64,
    pub len: u64,
    pub fs: FsKind,
}

/// Directory levels a copy goes down before it refuses (a directory that contains itself).
pub const MAX_DEPTH: usize = 256;

fn unreadable(path: &str, e: impl std::fmt::Display) -> ItemsError {
    ItemsError::Unreadable { path: path.to_owned(), reason: e.to_string() }
}

/// The partitions of a disk, or None when the disk is not partitioned (a file system, or
/// nothing known, at its start).
pub fn volumes(disk: &DiskReader) -> Result<Option<Vec<Volume>>, ItemsError> {
    let mut whole = disk.slice(0, disk.len());
    if fs::fs_kind(&mut whole) != FsKind::Unknown {
        return Ok(None);
    }
    let Some(parts) = table::partitions(&mut whole)? else { return Ok(None) };
    Ok(Some(
        parts
            .into_iter()
            .map(|p| {
                let mut s = disk.slice(p.start, p.len);
                Volume { name: format!("p{}", p.number), start: p.start, len: p.len, fs: fs::fs_kind(&mut s) }
            })
            .collect(),
    ))
}

/// The blocks inside the swap partitions of a disk, as `[start, end)` ranges: whole blocks of
/// the partition after the one holding its header (so a restored disk keeps a valid swap
/// signature).
pub fn swap_ranges(disk: &DiskReader, block_size: u32) -> Result<Vec<(u64, u64)>, ItemsError> {
    let bs = u64::from(block_size.max(1));
    Ok(volumes(disk)?
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.fs == FsKind::Swap)
        .filter_map(|v| {
            let first = (v.start + 4096).div_ceil(bs);
            let end = (v.start + v.len) / bs;
            (first < end).then_some((first, end))
        })
        .collect())
}

/// Splits a user path into components, refusing `..` (paths are always from the root).
fn components(path: &str) -> Result<Vec<&str>, ItemsError> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return Err(ItemsError::Unsupported(format!("{path}: `..` is not allowed; give a path from the root")));
    }
    Ok(parts)
}

/// The file system a user path lives in: the file system, the components inside it, the
/// display path of its root, and the partition's name on a partitioned disk.
struct Located<'p> {
    fs: GuestFs,
    inner: Vec<&'p str>,
    root_shown: String,
    volume: Option<String>,
}

fn locate<'p>(disk: &DiskReader, parts: &[&'p str]) -> Result<Located<'p>, ItemsError> {
    match volumes(disk)? {
        None => {
            let mut r = disk.slice(0, disk.len());
            let kind = fs::fs_kind(&mut r);
            Ok(Located {
                fs: GuestFs::open(r, kind, "the disk")?,
                inner: parts.to_vec(),
                root_shown: "/".into(),
                volume: None,
            })
        }
        Some(vols) => {
            let first =
                parts.first().ok_or_else(|| ItemsError::Unsupported("the disk's top level lists partitions".into()))?;
            let v = vols.iter().find(|v| v.name == *first).ok_or_else(|| ItemsError::NotFound(format!("/{first}")))?;
            Ok(Located {
                fs: GuestFs::open(disk.slice(v.start, v.len), v.fs, &format!("partition {}", v.name))?,
                inner: parts[1..].to_vec(),
                root_shown: format!("/{}", v.name),
                volume: Some(v.name.clone()),
            })
        }
    }
}

/// What a path names inside its file system.
enum Target<'a> {
    Root(DirRef<'a>),
    Entry(Entry<'a>),
}

/// Walks `inner` from the root one directory handle at a time (no path lookups inside the
/// crates, so a looping directory is met by the entry cap).
fn resolve<'a>(fs: &'a GuestFs, inner: &[&str], root_shown: &str) -> Result<Target<'a>, ItemsError> {
    let mut dir = fs.root();
    let mut shown = root_shown.to_owned();
    for (i, name) in inner.iter().enumerate() {
        let e = fs.find(&dir, &shown, name)?;
        shown = e.item.path.clone();
        if i + 1 == inner.len() {
            return Ok(Target::Entry(e));
        }
        if e.item.kind != ItemKind::Dir {
            return Err(ItemsError::Unsupported(format!("{shown} is not a directory")));
        }
        dir = fs.dir(&e);
    }
    Ok(Target::Root(dir))
}

/// `ls`: a page of the entries at `path` (the directory's entries, the partitions at the top of
/// a partitioned disk, or the one entry when `path` is a file), sorted by raw name, after the
/// cursor `after`, at most `limit`; each goes to `emit`. Answers the next page's cursor. The
/// directory's names are read and sorted in one pass; only the page's own entries are read
/// further (their inodes), so a page costs the directory's blocks plus `limit` entries.
pub fn list_page(
    disk: &DiskReader,
    path: &str,
    after: Option<&[u8]>,
    limit: usize,
    emit: &mut dyn FnMut(Item) -> Result<(), String>,
) -> Result<Option<Vec<u8>>, ItemsError> {
    let parts = components(path)?;
    let vols = if parts.is_empty() { volumes(disk)? } else { None };
    if let Some(vols) = vols {
        let all = vols.iter().map(|v| Item {
            path: format!("/{}", v.name),
            name: v.name.clone().into_bytes(),
            kind: ItemKind::Partition,
            size: v.len,
            mtime: 0,
            mode: 0,
            target: None,
        });
        return emit_page(path, all.filter(|i| after.is_none_or(|a| i.name.as_slice() > a)).map(Ok), limit, emit);
    }
    let at = locate(disk, &parts)?;
    let (dir, shown) = match resolve(&at.fs, &at.inner, &at.root_shown)? {
        Target::Root(d) => (d, at.root_shown.clone()),
        Target::Entry(e) if e.item.kind == ItemKind::Dir => {
            let shown = e.item.path.clone();
            (at.fs.dir(&e), shown)
        }
        Target::Entry(e) => {
            let one = Some(e.item).filter(|i| after.is_none_or(|a| i.name.as_slice() > a));
            return emit_page(path, one.into_iter().map(Ok), limit, emit);
        }
    };
    let mut names = at.fs.names(&dir, &shown)?;
    // Sorted, so the cursor is a binary search away.
    let from = after.map_or(0, |a| names.partition_point(|n| n.name.as_slice() <= a));
    let page = names.drain(from..).map(|n| at.fs.entry(n, &shown).map(|e| e.item));
    emit_page(path, page, limit, emit)
}

/// Emits at most `limit` items of `items`; answers the last one's name when more follow.
fn emit_page(
    path: &str,
    items: impl Iterator<Item = Result<Item, ItemsError>>,
    limit: usize,
    emit: &mut dyn FnMut(Item) -> Result<(), String>,
) -> Result<Option<Vec<u8>>, ItemsError> {
    let mut items = items.peekable();
    let mut last = None;
    for _ in 0..limit {
        let Some(item) = items.next() else { return Ok(None) };
        let item = item?;
        last = Some(item.name.clone());
        emit(item).map_err(|e| unreadable(path, e))?;
    }
    Ok(if items.peek().is_some() { last } else { None })
}

/// What [`copy_out`] produces, in order: an entry, then (files) its bytes, then the next.
pub enum Emit<'a> {
    /// `rel`: path components relative to the destination (raw guest bytes).
    Entry {
        rel: Vec<Vec<u8>>,
        item: Item,
    },
    Data(&'a [u8]),
    /// An entry that could not be read, left out; the walk goes on.
    Skipped {
        path: String,
        reason: String,
    },
}

/// `recover-items`: walks each of `paths` (files, directories recursively, symlinks as links;
/// a partition `/p1` or the root `/` of a file system as a whole) and hands every entry and
/// every file's bytes to `emit`. A directory that cannot be read is skipped (reported through
/// `emit`); the walk is bounded in depth and in entries (the volume cannot hold more than one
/// per 32 bytes).
pub fn copy_out(
    disk: &DiskReader,
    paths: &[String],
    emit: &mut dyn FnMut(Emit<'_>) -> Result<(), String>,
) -> Result<(), ItemsError> {
    for path in paths {
        let parts = components(path)?;
        let at = locate(disk, &parts)?;
        let mut budget = disk.len() / 32 + 1024;
        let mut walk = Walk { fs: &at.fs, budget: &mut budget, emit };
        match resolve(&at.fs, &at.inner, &at.root_shown)? {
            Target::Entry(e) => {
                let rel = vec![e.item.name.clone()];
                walk.entry(e, rel, 0)?;
            }
            Target::Root(dir) => {
                // A partition is restored as a directory named after it; the root of a disk
                // that is one file system fills the destination itself.
                let rel = match &at.volume {
                    Some(v) => {
                        let item = Item {
                            path: at.root_shown.clone(),
                            name: v.clone().into_bytes(),
                            kind: ItemKind::Dir,
                            size: 0,
                            mtime: 0,
                            mode: 0o755,
                            target: None,
                        };
                        (walk.emit)(Emit::Entry { rel: vec![item.name.clone()], item })
                            .map_err(|e| unreadable(path, e))?;
                        vec![v.clone().into_bytes()]
                    }
                    None => vec![],
                };
                walk.children(&dir, &at.root_shown, &rel, 0)?;
            }
        };
    }
    Ok(())
}

struct Walk<'w, 'a, 'e> {
    fs: &'a GuestFs,
    budget: &'w mut u64,
    emit: &'w mut (dyn FnMut(Emit<'_>) -> Result<(), String> + 'e),
}

impl<'a> Walk<'_, 'a, '_> {
    fn entry(&mut self, e: Entry<'a>, rel: Vec<Vec<u8>>, depth: usize) -> Result<(), ItemsError> {
        if *self.budget == 0 {
            return Err(ItemsError::Unsupported(format!(
                "{}: more entries than the volume can hold (its directories loop)",
                e.item.path
            )));
        }
        *self.budget -= 1;
        let shown = e.item.path.clone();
        let kind = e.item.kind;
        (self.emit)(Emit::Entry { rel: rel.clone(), item: e.item.clone() }).map_err(|x| unreadable(&shown, x))?;
        match kind {
            ItemKind::File => self.fs.read_file(&e, &mut |b| (self.emit)(Emit::Data(b))),
            ItemKind::Dir => {
                if depth >= MAX_DEPTH {
                    return Err(ItemsError::Unsupported(format!("{shown}: more than {MAX_DEPTH} directory levels")));
                }
                let dir = self.fs.dir(&e);
                self.children(&dir, &shown, &rel, depth + 1)
            }
            _ => Ok(()),
        }
    }

    fn children(&mut self, dir: &DirRef<'a>, shown: &str, rel: &[Vec<u8>], depth: usize) -> Result<(), ItemsError> {
        let entries = match self.fs.entries(dir, shown) {
            Ok(entries) => entries,
            Err(e @ ItemsError::Unreadable { .. }) => {
                return (self.emit)(Emit::Skipped { path: shown.to_owned(), reason: e.to_string() })
                    .map_err(|x| unreadable(shown, x))
            }
            Err(e) => return Err(e),
        };
        for child in entries {
            let mut r = rel.to_vec();
            r.push(child.item.name.clone());
            self.entry(child, r, depth)?;
        }
        Ok(())
    }
}

/// Everything Bulwark does with a guest's disk, in process, on an image in memory: the swap
/// scan, the listing of every directory (every page), and a copy of everything out. For the
/// fuzzer: it must end, bounded, with a result or an error — never a panic.
pub fn fuzz_walk(image: &[u8]) {
    let src = disk::MemBlocks::new(image.into(), 4096);
    let geometry = src.geometry();
    let disk = DiskReader::new(Box::new(src), geometry);
    let _ = swap_ranges(&disk, 4096);
    let mut dirs = vec!["/".to_owned()];
    let mut listed = 0;
    while let Some(dir) = dirs.pop() {
        listed += 1;
        if listed > 64 {
            break;
        }
        let mut after = None;
        for _ in 0..16 {
            let mut found = vec![];
            match list_page(&disk, &dir, after.as_deref(), 64, &mut |i| {
                found.push(i);
                Ok(())
            }) {
                Ok(next) => {
                    dirs.extend(
                        found
                            .iter()
                            .filter(|i| matches!(i.kind, ItemKind::Dir | ItemKind::Partition) && i.path != dir)
                            .map(|i| i.path.clone()),
                    );
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                Err(_) => break,
            }
        }
    }
    let mut bytes = 0u64;
    let _ = copy_out(&disk, &["/".to_owned()], &mut |e| {
        if let Emit::Data(d) = e {
            bytes += d.len() as u64;
        }
        if bytes > 64 << 20 {
            return Err("enough".into());
        }
        Ok(())
    });
}

pub use bulwark_protocol::transfer::safe_component;

/// File bytes travel in frames of at most this size.
pub const ITEM_CHUNK: usize = 1 << 20;

fn geometry(d: &RpDisk) -> Geometry {
    Geometry { block_size: d.block_size, disk_size: d.size_bytes }
}

/// A page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub items: Vec<Item>,
    /// The cursor of the next page (the last item's raw name), if there is one.
    pub next: Option<Vec<u8>>,
}

/// `ls`: a page of at most `limit` entries after `after`. The first page of a directory has the
/// items worker read the whole directory (up to [`listings::MAX_ITEMS`] entries and
/// [`listings::MAX_LISTING_BYTES`]); the coordinator keeps that listing ([`listings`]) and
/// answers the following pages from it, so paging through N entries costs one read of the
/// directory, not one per page. A larger directory is paged by the worker page by page.
pub async fn list(
    store: Arc<Store>,
    d: &RpDisk,
    path: &str,
    after: Option<Vec<u8>>,
    limit: u32,
) -> Result<ListPage, ItemsError> {
    let key = listings::Key::new(d, path);
    let limit = limit.max(1);
    match listings::get(&key) {
        Some(listings::Known::Listing(l)) => {
            if let Some(page) = l.page(after.as_deref(), limit as usize) {
                return Ok(page);
            }
        }
        Some(listings::Known::TooLarge) => {
            let (page, _) = list_by_worker(store, d, path, after, limit, usize::MAX).await?;
            return Ok(page);
        }
        None => {}
    }
    let (whole, complete) =
        list_by_worker(store, d, path, after.clone(), listings::MAX_ITEMS.max(limit), listings::MAX_LISTING_BYTES)
            .await?;
    if !complete {
        listings::put(key, listings::Known::TooLarge);
        let mut page = whole;
        if page.items.len() > limit as usize {
            page.items.truncate(limit as usize);
            page.next = page.items.last().map(|i| i.name.clone());
        }
        return Ok(page);
    }
    let listing = Arc::new(listings::Listing::new(after.clone(), whole.items).map_err(ItemsError::Worker)?);
    let page = listing.page(after.as_deref(), limit as usize).unwrap_or_default();
    listings::put(key, listings::Known::Listing(listing));
    Ok(page)
}

/// A page of at most `limit` entries read by the items worker; stops early (the worker killed)
/// once the items take more than `max_bytes`. Answers whether the listing reached its end.
async fn list_by_worker(
    store: Arc<Store>,
    d: &RpDisk,
    path: &str,
    after: Option<Vec<u8>>,
    limit: u32,
    max_bytes: usize,
) -> Result<(ListPage, bool), ItemsError> {
    let source = StoreBlocks::new(store, d.root, geometry(d));
    let op = pipe::Op::List { path: path.to_owned(), after, limit };
    let mut s = sandbox::start(source, op, sandbox::Budget::BROWSE);
    let mut page = ListPage::default();
    let mut bytes = 0usize;
    while let Some(out) = s.next().await {
        match out {
            sandbox::Out::Reply(pipe::Reply::Item(i)) if page.items.len() < limit as usize => {
                bytes = bytes.saturating_add(listings::item_bytes(&i));
                page.items.push(i);
                if bytes > max_bytes {
                    // Dropping the session kills the worker; the items so far are a sorted
                    // prefix, and the page goes on after the last of them.
                    page.next = page.items.last().map(|i| i.name.clone());
                    return Ok((page, false));
                }
            }
            sandbox::Out::Reply(pipe::Reply::Next(n)) => page.next = n,
            other => return Err(ItemsError::Worker(format!("unexpected answer from the items worker: {other:?}"))),
        }
    }
    s.finish().await?;
    let complete = page.next.is_none();
    Ok((page, complete))
}

/// The swap block ranges of a disk, found by the items worker.
pub async fn swap_blocks(
    store: Arc<Store>,
    root: bulwark_protocol::blockmap::TreeRoot,
    block_size: u32,
    size: u64,
) -> Result<SwapScan, ItemsError> {
    let mut source = StoreBlocks::new(store, root, Geometry { block_size, disk_size: size });
    let reads = source.keep_reads();
    let mut s = sandbox::start(source, pipe::Op::Swap, sandbox::Budget::BROWSE);
    let mut ranges = None;
    while let Some(out) = s.next().await {
        match out {
            sandbox::Out::Reply(pipe::Reply::Swap(r)) => ranges = Some(r),
            other => return Err(ItemsError::Worker(format!("unexpected answer from the items worker: {other:?}"))),
        }
    }
    s.finish().await?;
    let blocks = Geometry { block_size, disk_size: size }.blocks();
    let ranges = ranges.ok_or_else(|| ItemsError::Worker("the items worker found no answer".into()))?;
    // The worker is not trusted either: a range must lie inside the disk.
    if ranges.iter().any(|(a, b)| a >= b || *b > blocks) {
        return Err(ItemsError::Worker("the items worker answered swap ranges outside the disk".into()));
    }
    // What the answer was read from: with the same bytes there, a scan answers the same.
    let witness = reads.lock().ok().and_then(|r| r.clone()).unwrap_or_default();
    if witness.is_empty() || ranges.iter().any(|(a, b)| witness.iter().any(|(i, _)| (*a..*b).contains(i))) {
        // Too many reads to keep, or a range over a block it was read from: leave nothing out.
        return Ok(SwapScan::default());
    }
    Ok(SwapScan { ranges, witness })
}

/// What a swap scan found: the block ranges to leave out, and the blocks (with their ids) the
/// scan read to find them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwapScan {
    pub ranges: Vec<(u64, u64)>,
    pub witness: Vec<(u64, bulwark_protocol::block::Digest)>,
}

/// What goes down an item stream, as a plain machine: an `Item` message per entry, then (for a
/// file) its bytes as block frames, never more or fewer than the entry's size — the items
/// worker is not trusted to keep count. `stream_items` feeds it the worker's answers; the
/// simulation feeds it [`copy_out`] in process.
#[derive(Debug, Default)]
pub struct ItemFrames {
    seq: u64,
    left: u64,
    /// Entries the walk left out (unreadable).
    pub skipped: u64,
    #[cfg(feature = "broken-builds")]
    broken: bool,
}

impl ItemFrames {
    /// The broken build the simulation must catch (`broken-builds` feature): each chunk of a
    /// file's bytes goes out reversed — right sizes, wrong contents.
    #[cfg(feature = "broken-builds")]
    pub fn break_contents(&mut self) {
        self.broken = true;
    }

    /// The frame announcing an entry.
    pub fn entry(&mut self, rel: Vec<Vec<u8>>, item: Item) -> Result<TransferFrame, String> {
        if self.left != 0 {
            return Err(format!("the items worker sent {} bytes too few before the next entry", self.left));
        }
        self.seq = 0;
        self.left = if item.kind == ItemKind::File { item.size } else { 0 };
        Ok(TransferFrame::Message(TransferMessage::Item {
            rel,
            kind: item.kind.as_str().into(),
            mode: item.mode,
            mtime: item.mtime,
            size: item.size,
            target: item.target,
        }))
    }

    /// The frame carrying the next bytes of the current file.
    pub fn data(&mut self, #[allow(unused_mut)] mut bytes: Vec<u8>) -> Result<TransferFrame, String> {
        #[cfg(feature = "broken-builds")]
        if self.broken {
            bytes.reverse();
        }
        self.left = self
            .left
            .checked_sub(bytes.len() as u64)
            .ok_or_else(|| "the items worker sent more bytes than the file holds".to_owned())?;
        let frame = TransferFrame::Block { index: self.seq, id: bulwark_protocol::block::ZERO, data: bytes };
        self.seq += 1;
        Ok(frame)
    }

    /// The walk ended: the last file must be whole.
    pub fn end(&self) -> Result<(), String> {
        if self.left != 0 {
            return Err(format!("the items worker sent {} bytes too few for the last file", self.left));
        }
        Ok(())
    }
}

/// Streams the items at `paths` of disk `d` on `send` (an `Item` message per entry, file
/// bytes as block frames), paced by the options' throttle; answers the frames sent. The
/// caller ends the stream (`End` or `Failed`).
pub async fn stream_items(
    store: Arc<Store>,
    send: &mut (impl tokio::io::AsyncWrite + Unpin),
    d: RpDisk,
    paths: Vec<String>,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<u64, String> {
    use bulwark_protocol::transfer;
    let mut throttle = crate::throttle::Throttle::for_options(options);
    let source = StoreBlocks::new(store, d.root, geometry(&d));
    let mut s = sandbox::start(source, pipe::Op::Copy { paths }, sandbox::Budget::COPY);
    let mut frames = ItemFrames::default();
    let mut sent = 0u64;
    while let Some(out) = s.next().await {
        let frame = match out {
            sandbox::Out::Reply(pipe::Reply::Entry { rel, item }) => frames.entry(rel, item)?,
            sandbox::Out::Data(bytes) => frames.data(bytes)?,
            sandbox::Out::Reply(pipe::Reply::Skipped { path, reason }) => {
                frames.skipped += 1;
                tracing::warn!(path = %crate::items::sandbox::printable(&path), reason = %crate::items::sandbox::printable(&reason), "item left out of the recovery");
                continue;
            }
            other => return Err(format!("unexpected answer from the items worker: {other:?}")),
        };
        let body = match &frame {
            TransferFrame::Block { index, id, data } => transfer::block_body(*index, id, data),
            TransferFrame::Message(m) => transfer::message_body(m).map_err(|e| e.to_string())?,
            TransferFrame::Zero { index } => transfer::zero_body(*index),
        };
        crate::throttle::pace(&mut throttle, body.len() as u64).await;
        transfer::write_body(send, &body, ITEM_CHUNK).await.map_err(|e| format!("the receiver went away: {e}"))?;
        sent += 1;
    }
    s.finish().await.map_err(|e| e.to_string())?;
    frames.end()?;
    if frames.skipped > 0 {
        tracing::warn!(skipped = frames.skipped, "items that could not be read were left out");
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_components_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"x\0y"] {
            assert!(!safe_component(bad), "{bad:?}");
        }
        for good in [&b"passwd"[..], b"..hidden", b"a b", "ünï".as_bytes(), b"\xff\xfe"] {
            assert!(safe_component(good), "{good:?}");
        }
        assert!(components("/p1/../etc").is_err());
        // A FAT timestamp with fields out of range (hostile bytes) is 0, not a panic.
        let bad = fatfs::DateTime {
            date: fatfs::Date { year: 1980, month: 0, day: 0 },
            time: fatfs::Time { hour: 99, min: 0, sec: 0, millis: 0 },
        };
        assert_eq!(fs::fat_time(bad), 0);
        assert_eq!(components("//p1/./etc/").unwrap(), vec!["p1", "etc"]);
    }

    #[test]
    fn fuzz_walk_survives_noise_and_truncated_tables() {
        let mut image = vec![0u8; 1 << 20];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        fuzz_walk(&image);
        image[510] = 0x55;
        image[511] = 0xAA;
        fuzz_walk(&image);
        fuzz_walk(&[]);
    }
}
