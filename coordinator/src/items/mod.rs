//! Item-level recovery: browse and copy files out of a recovery point without restoring the
//! disk. The disk is read straight from the store ([`disk::DiskReader`]); a partition table
//! (GPT, else MBR) is found with gptman/mbrman, each partition's file system by its magic:
//! ext2/3/4 (ext4-view) and FAT (fatfs); swap partitions are recognized and not browsed.
//!
//! Paths: on a partitioned disk the top level lists the partitions as `p1`, `p2`, … and a
//! file's path is `/p1/etc/hosts`; on a disk that is one file system, `/etc/hosts`.
//!
//! Everything here is read-only and runs on one blocking thread per request (ext4-view is not
//! `Send`). Names inside the guest are data, never trusted: [`Item::name`] keeps the raw bytes
//! and whoever writes them checks each component ([`safe_component`]).

pub mod disk;

use crate::catalog::RpDisk;
use crate::store::Store;
use disk::DiskReader;
use std::io::{Read, Seek};
use std::sync::Arc;

/// Why an item operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ItemsError {
    #[error("{0}: no such file or directory in the recovery point")]
    NotFound(String),
    #[error("{path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
}

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

fn unreadable(path: &str, e: impl std::fmt::Display) -> ItemsError {
    ItemsError::Unreadable { path: path.to_owned(), reason: e.to_string() }
}

/// The file system at the start of `r`, by its magic numbers.
pub fn fs_kind(r: &mut DiskReader) -> FsKind {
    let mut ext = [0u8; 2];
    if r.read_at(1080, &mut ext).is_ok() && ext == [0x53, 0xEF] {
        return FsKind::Ext;
    }
    let mut boot = [0u8; 512];
    if r.read_at(0, &mut boot).is_ok()
        && matches!(boot[0], 0xEB | 0xE9)
        && boot[510..512] == [0x55, 0xAA]
        && (&boot[54..57] == b"FAT" || &boot[82..85] == b"FAT")
    {
        return FsKind::Fat;
    }
    let mut swap = [0u8; 10];
    if r.read_at(4086, &mut swap).is_ok() && &swap == b"SWAPSPACE2" {
        return FsKind::Swap;
    }
    FsKind::Unknown
}

/// The partitions of a disk, or None when the disk is not partitioned (a file system, or
/// nothing known, at its start).
pub fn volumes(disk: &DiskReader) -> Option<Vec<Volume>> {
    let mut r = disk.slice(0, disk.len());
    if fs_kind(&mut r) != FsKind::Unknown {
        return None;
    }
    let mut parts: Vec<(u64, u64)> = vec![];
    if let Ok(gpt) = gptman::GPT::find_from(&mut r) {
        let ss = gpt.sector_size;
        for (_, p) in gpt.iter() {
            if !p.is_unused() && p.ending_lba >= p.starting_lba {
                parts.push((p.starting_lba * ss, (p.ending_lba - p.starting_lba + 1) * ss));
            }
        }
    } else {
        let _ = r.rewind();
        let mbr = mbrman::MBR::read_from(&mut r, 512).ok()?;
        for (_, p) in mbr.iter() {
            // Extended partitions (0x05, 0x0f, 0x85) hold logical ones, which are not read.
            if p.is_used() && !matches!(p.sys, 0x05 | 0x0f | 0x85) {
                parts.push((u64::from(p.starting_lba) * 512, u64::from(p.sectors) * 512));
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(
        parts
            .into_iter()
            .enumerate()
            .map(|(i, (start, len))| {
                let mut s = disk.slice(start, len);
                Volume { name: format!("p{}", i + 1), start, len, fs: fs_kind(&mut s) }
            })
            .collect(),
    )
}

/// The blocks inside the swap partitions of a disk, as `[start, end)` ranges: whole blocks of
/// the partition after the one holding its header (so a restored disk keeps a valid swap
/// signature).
pub fn swap_blocks(
    store: Arc<Store>,
    root: bulwark_protocol::blockmap::TreeRoot,
    block_size: u32,
    size: u64,
) -> Vec<(u64, u64)> {
    let disk = DiskReader::new(store, root, block_size, size);
    let bs = u64::from(block_size);
    volumes(&disk)
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.fs == FsKind::Swap)
        .filter_map(|v| {
            let first = (v.start + 4096).div_ceil(bs);
            let end = (v.start + v.len) / bs;
            (first < end).then_some((first, end))
        })
        .collect()
}

/// A browsable file system of a volume.
enum GuestFs {
    Ext(ext4_view::Ext4),
    Fat(Box<fatfs::FileSystem<DiskReader>>),
}

impl GuestFs {
    fn open(r: DiskReader, kind: FsKind, what: &str) -> Result<Self, ItemsError> {
        match kind {
            FsKind::Ext => Ok(GuestFs::Ext(ext4_view::Ext4::load(Box::new(r)).map_err(|e| unreadable(what, e))?)),
            FsKind::Fat => Ok(GuestFs::Fat(Box::new(
                fatfs::FileSystem::new(r, fatfs::FsOptions::new()).map_err(|e| unreadable(what, e))?,
            ))),
            FsKind::Swap => Err(ItemsError::Unsupported(format!("{what} is swap space: there are no files in it"))),
            FsKind::Unknown => Err(ItemsError::Unsupported(format!("{what}: no ext2/3/4 or FAT file system found"))),
        }
    }

    /// The entries of directory `dir` (absolute, `/`-separated), whose display prefix is
    /// `shown`.
    fn list(&self, dir: &str, shown: &str) -> Result<Vec<Item>, ItemsError> {
        let join = |name: &str| format!("{}/{}", shown.trim_end_matches('/'), name);
        match self {
            GuestFs::Ext(fs) => {
                let entries = fs.read_dir(dir).map_err(|e| map_ext(dir, e))?;
                let mut out = vec![];
                for e in entries {
                    let e = e.map_err(|e| unreadable(dir, e))?;
                    let raw: Vec<u8> = e.file_name().as_ref().to_vec();
                    if raw == b"." || raw == b".." {
                        continue;
                    }
                    let name = String::from_utf8_lossy(&raw).into_owned();
                    let path = e.path();
                    let m = e.metadata().map_err(|x| unreadable(&join(&name), x))?;
                    let target =
                        if m.is_symlink() { fs.read_link(&path).ok().map(|t| t.as_ref().to_vec()) } else { None };
                    out.push(Item {
                        path: join(&name),
                        name: raw,
                        kind: ext_kind(m.file_type()),
                        size: m.len(),
                        mtime: m.modified().seconds(),
                        mode: u32::from(m.mode()) & 0o7777,
                        target,
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
            GuestFs::Fat(fs) => {
                let root = fs.root_dir();
                let d = if dir == "/" {
                    root
                } else {
                    root.open_dir(dir.trim_start_matches('/')).map_err(|e| map_io(dir, e))?
                };
                let mut out = vec![];
                for e in d.iter() {
                    let e = e.map_err(|e| unreadable(dir, e))?;
                    let name = e.file_name();
                    if name == "." || name == ".." {
                        continue;
                    }
                    let t = e.modified();
                    out.push(Item {
                        path: join(&name),
                        name: name.clone().into_bytes(),
                        kind: if e.is_dir() { ItemKind::Dir } else { ItemKind::File },
                        size: if e.is_dir() { 0 } else { e.len() },
                        mtime: fat_time(t),
                        mode: if e.is_dir() { 0o755 } else { 0o644 },
                        target: None,
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
        }
    }

    /// The entry at `path` itself.
    fn stat(&self, path: &str, shown: &str) -> Result<Item, ItemsError> {
        let (parent, name) = match path.trim_end_matches('/').rsplit_once('/') {
            Some((p, n)) if !n.is_empty() => (if p.is_empty() { "/" } else { p }, n),
            _ => {
                return Ok(Item {
                    path: shown.to_owned(),
                    name: b"/".to_vec(),
                    kind: ItemKind::Dir,
                    size: 0,
                    mtime: 0,
                    mode: 0o755,
                    target: None,
                })
            }
        };
        let shown_parent =
            shown.trim_end_matches('/').rsplit_once('/').map_or("/", |(p, _)| if p.is_empty() { "/" } else { p });
        self.list(parent, shown_parent)?
            .into_iter()
            .find(|i| {
                i.name == name.as_bytes()
                    || (matches!(self, GuestFs::Fat(_)) && i.name.eq_ignore_ascii_case(name.as_bytes()))
            })
            .ok_or_else(|| ItemsError::NotFound(shown.to_owned()))
    }

    /// Streams a file's bytes.
    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<(), String>) -> Result<(), ItemsError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut pump = |r: &mut dyn Read| -> Result<(), ItemsError> {
            loop {
                let n = r.read(&mut buf).map_err(|e| unreadable(path, e))?;
                if n == 0 {
                    return Ok(());
                }
                sink(&buf[..n]).map_err(|e| unreadable(path, e))?;
            }
        };
        match self {
            GuestFs::Ext(fs) => pump(&mut fs.open(path).map_err(|e| map_ext(path, e))?),
            GuestFs::Fat(fs) => {
                pump(&mut fs.root_dir().open_file(path.trim_start_matches('/')).map_err(|e| map_io(path, e))?)
            }
        }
    }
}

fn ext_kind(t: ext4_view::FileType) -> ItemKind {
    match t {
        ext4_view::FileType::Directory => ItemKind::Dir,
        ext4_view::FileType::Regular => ItemKind::File,
        ext4_view::FileType::Symlink => ItemKind::Symlink,
        _ => ItemKind::Other,
    }
}

fn map_ext(path: &str, e: ext4_view::Ext4Error) -> ItemsError {
    match e {
        ext4_view::Ext4Error::NotFound => ItemsError::NotFound(path.to_owned()),
        other => unreadable(path, other),
    }
}

fn map_io(path: &str, e: std::io::Error) -> ItemsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ItemsError::NotFound(path.to_owned())
    } else {
        unreadable(path, e)
    }
}

/// A FAT timestamp (no zone: taken as UTC) in Unix seconds; a field out of range (the
/// guest's bytes say so) gives 0, never a panic.
fn fat_time(t: fatfs::DateTime) -> i64 {
    let civil = (|| {
        let date = jiff::civil::Date::new(
            i16::try_from(t.date.year).ok()?,
            i8::try_from(t.date.month).ok()?,
            i8::try_from(t.date.day).ok()?,
        )
        .ok()?;
        let time = jiff::civil::Time::new(
            i8::try_from(t.time.hour).ok()?,
            i8::try_from(t.time.min).ok()?,
            i8::try_from(t.time.sec).ok()?,
            0,
        )
        .ok()?;
        date.to_datetime(time).to_zoned(jiff::tz::TimeZone::UTC).ok()
    })();
    civil.map_or(0, |z| z.timestamp().as_second())
}

/// Where a guest path lives: the file system and the path inside it.
struct Located {
    fs: GuestFs,
    inner: String,
}

/// Splits a user path into components, refusing `..` (paths are always from the root).
fn components(path: &str) -> Result<Vec<&str>, ItemsError> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return Err(ItemsError::Unsupported(format!("{path}: `..` is not allowed; give a path from the root")));
    }
    Ok(parts)
}

fn locate(disk: &DiskReader, path: &str) -> Result<Located, ItemsError> {
    let parts = components(path)?;
    match volumes(disk) {
        None => {
            let mut r = disk.slice(0, disk.len());
            let kind = fs_kind(&mut r);
            Ok(Located { fs: GuestFs::open(r, kind, "the disk")?, inner: format!("/{}", parts.join("/")) })
        }
        Some(vols) => {
            let first =
                parts.first().ok_or_else(|| ItemsError::Unsupported("the disk's top level lists partitions".into()))?;
            let v = vols.iter().find(|v| v.name == *first).ok_or_else(|| ItemsError::NotFound(format!("/{first}")))?;
            Ok(Located {
                fs: GuestFs::open(disk.slice(v.start, v.len), v.fs, &format!("partition {}", v.name))?,
                inner: format!("/{}", parts[1..].join("/")),
            })
        }
    }
}

/// `ls`: the entries of the directory at `path` (or the partitions at the top of a
/// partitioned disk; or the one entry when `path` is a file).
pub fn list(store: Arc<Store>, d: &RpDisk, path: &str) -> Result<Vec<Item>, ItemsError> {
    let disk = DiskReader::new(store, d.root, d.block_size, d.size_bytes);
    let parts = components(path)?;
    if parts.is_empty() {
        if let Some(vols) = volumes(&disk) {
            return Ok(vols
                .iter()
                .map(|v| Item {
                    path: format!("/{}", v.name),
                    name: v.name.clone().into_bytes(),
                    kind: ItemKind::Partition,
                    size: v.len,
                    mtime: 0,
                    mode: 0,
                    target: None,
                })
                .collect());
        }
    }
    let shown = format!("/{}", parts.join("/"));
    let at = locate(&disk, path)?;
    let item = at.fs.stat(&at.inner, &shown)?;
    if item.kind == ItemKind::Dir {
        at.fs.list(&at.inner, &shown)
    } else {
        Ok(vec![item])
    }
}

/// What [`copy_out`] produces, in order: an entry, then (files) its bytes, then the next.
pub enum Emit<'a> {
    /// `rel`: path components relative to the destination (raw guest bytes).
    Entry {
        rel: Vec<Vec<u8>>,
        item: Item,
    },
    Data(&'a [u8]),
}

/// `recover-items`: walks each of `paths` (files, directories recursively, symlinks as links)
/// and hands every entry and every file's bytes to `emit`.
pub fn copy_out(
    store: Arc<Store>,
    d: &RpDisk,
    paths: &[String],
    emit: &mut dyn FnMut(Emit<'_>) -> Result<(), String>,
) -> Result<(), ItemsError> {
    let disk = DiskReader::new(store, d.root, d.block_size, d.size_bytes);
    for path in paths {
        let parts = components(path)?;
        let shown = format!("/{}", parts.join("/"));
        let at = locate(&disk, path)?;
        let item = at.fs.stat(&at.inner, &shown)?;
        let base = item.name.clone();
        walk(&at.fs, &at.inner, item, vec![base], emit)?;
    }
    Ok(())
}

fn walk(
    fs: &GuestFs,
    inner: &str,
    item: Item,
    rel: Vec<Vec<u8>>,
    emit: &mut dyn FnMut(Emit<'_>) -> Result<(), String>,
) -> Result<(), ItemsError> {
    let kind = item.kind;
    let shown = item.path.clone();
    emit(Emit::Entry { rel: rel.clone(), item }).map_err(|e| unreadable(&shown, e))?;
    match kind {
        ItemKind::File => fs.read_file(inner, &mut |b| emit(Emit::Data(b))),
        ItemKind::Dir => {
            for child in fs.list(inner, &shown)? {
                let child_inner = format!("{}/{}", inner.trim_end_matches('/'), String::from_utf8_lossy(&child.name));
                let mut r = rel.clone();
                r.push(child.name.clone());
                walk(fs, &child_inner, child, r, emit)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

pub use bulwark_protocol::transfer::safe_component;

/// File bytes travel in frames of at most this size.
pub const ITEM_CHUNK: usize = 1 << 20;

/// Streams the items at `paths` of disk `d` on `send` (an `Item` message per entry, file
/// bytes as block frames), paced by the options' throttle; answers the frames sent. The
/// caller ends the stream (`End` or `Failed`).
pub async fn stream_items(
    store: Arc<Store>,
    send: &mut quinn::SendStream,
    d: RpDisk,
    paths: Vec<String>,
    options: &bulwark_protocol::messages::RecoveryOptions,
) -> Result<u64, String> {
    use bulwark_protocol::transfer::{self, TransferMessage};
    let mut throttle = crate::throttle::Throttle::for_options(options);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let walker = tokio::task::spawn_blocking(move || {
        let mut seq = 0u64;
        let mut emit = |e: Emit<'_>| -> Result<(), String> {
            match e {
                Emit::Entry { rel, item } => {
                    seq = 0;
                    let msg = TransferMessage::Item {
                        rel,
                        kind: item.kind.as_str().into(),
                        mode: item.mode,
                        mtime: item.mtime,
                        size: item.size,
                        target: item.target,
                    };
                    let body = transfer::message_body(&msg).map_err(|e| e.to_string())?;
                    tx.blocking_send(body).map_err(|_| "the receiver went away".to_owned())
                }
                Emit::Data(bytes) => {
                    for c in bytes.chunks(ITEM_CHUNK) {
                        let frame = transfer::block_body(seq, &bulwark_protocol::block::ZERO, c);
                        seq += 1;
                        tx.blocking_send(frame).map_err(|_| "the receiver went away".to_owned())?;
                    }
                    Ok(())
                }
            }
        };
        copy_out(store, &d, &paths, &mut emit).map_err(|e| e.to_string())
    });
    let mut sent = 0u64;
    let mut broke = None;
    while let Some(body) = rx.recv().await {
        crate::throttle::pace(&mut throttle, body.len() as u64).await;
        if let Err(e) = transfer::write_body(send, &body, ITEM_CHUNK).await {
            broke = Some(format!("the receiver went away: {e}"));
            break;
        }
        sent += 1;
    }
    drop(rx);
    match (walker.await, broke) {
        (_, Some(e)) => Err(e),
        (Ok(Ok(())), None) => Ok(sent),
        (Ok(Err(e)), None) => Err(e),
        (Err(e), None) => Err(e.to_string()),
    }
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
        assert_eq!(fat_time(bad), 0);
        assert_eq!(components("//p1/./etc/").unwrap(), vec!["p1", "etc"]);
    }
}
