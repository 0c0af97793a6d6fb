//! The file systems item-level recovery reads (ext2/3/4 with ext4-view, FAT with fatfs), each
//! opened only after its superblock or boot sector passed bounds checks of our own (block and
//! cluster sizes, counts against the volume, group descriptors inside it), so a hostile header
//! never reaches a crate that would size a buffer from it; fatfs reads through a guard that
//! keeps the cluster numbers of tables and directory entries inside the volume
//! ([`super::fat_guard`]). Directories are listed with a cap on their entries (a FAT cluster
//! chain that loops yields the same entries forever); FAT paths are walked handle by handle, so
//! a restore is linear in the entries.

use super::disk::DiskReader;
use super::fat_guard::{FatGuard, FatLayout, ListingSwitch};
use super::{unreadable, FsKind, Item, ItemKind, ItemsError};
use std::io::Read;

/// Entries read from one directory before it is refused as too large (or looping).
pub const MAX_DIR_ENTRIES: usize = 1_000_000;
/// A FAT directory holds at most 65,536 entries of 32 bytes (the FAT specification's limit).
pub const MAX_FAT_DIR_ENTRIES: usize = 65_536;

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2).map_or(0, |s| u64::from(u16::from_le_bytes([s[0], s[1]])))
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map_or(0, |s| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
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

/// Checks an ext2/3/4 superblock and its group descriptors against the volume.
fn check_ext(r: &mut DiskReader, what: &str) -> Result<(), ItemsError> {
    let bad = |reason: String| ItemsError::Unsupported(format!("{what}: the ext4 superblock is invalid: {reason}"));
    let mut sb = [0u8; 1024];
    r.read_at(1024, &mut sb).map_err(|e| unreadable(what, e))?;
    let log_block = le32(&sb, 0x18);
    if log_block > 6 {
        return Err(bad(format!("block size 2^{} bytes (at most 64 KiB)", log_block.saturating_add(10))));
    }
    let bs = 1024u64 << log_block;
    let incompat = le32(&sb, 0x60);
    let is64 = incompat & 0x80 != 0;
    let blocks = le32(&sb, 0x04) | if is64 { le32(&sb, 0x150) << 32 } else { 0 };
    if blocks.checked_mul(bs).is_none_or(|b| b > r.len()) {
        return Err(bad(format!("{blocks} blocks of {bs} bytes do not fit in the volume's {} bytes", r.len())));
    }
    let per_group = le32(&sb, 0x20);
    let inodes_per_group = le32(&sb, 0x28);
    if per_group == 0 || per_group > 8 * bs || inodes_per_group == 0 || inodes_per_group > 8 * bs {
        return Err(bad(format!("{per_group} blocks and {inodes_per_group} inodes per group")));
    }
    let rev = le32(&sb, 0x4C);
    let inode_size = if rev == 0 { 128 } else { le16(&sb, 0x58) };
    if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > bs {
        return Err(bad(format!("inode size {inode_size}")));
    }
    let desc_size = if is64 { le16(&sb, 0xFE) } else { 32 };
    if !desc_size.is_power_of_two() || !(32..=1024).contains(&desc_size) {
        return Err(bad(format!("group descriptor size {desc_size}")));
    }
    let first = le32(&sb, 0x14);
    if first >= blocks {
        return Err(bad(format!("first data block {first} of {blocks}")));
    }
    let groups = (blocks - first).div_ceil(per_group);
    let inode_table_blocks = (inodes_per_group * inode_size).div_ceil(bs);
    // The descriptors follow the superblock's block; each names blocks that must lie inside.
    let table = (first + 1) * bs;
    if groups.checked_mul(desc_size).and_then(|n| n.checked_add(table)).is_none_or(|end| end > r.len()) {
        return Err(bad(format!("{groups} group descriptors do not fit in the volume")));
    }
    let mut d = vec![0u8; desc_size as usize];
    for g in 0..groups {
        r.read_at(table + g * desc_size, &mut d).map_err(|e| unreadable(what, e))?;
        let hi = |at: usize| if is64 { le32(&d, at) << 32 } else { 0 };
        let block_bitmap = le32(&d, 0x00) | hi(0x20);
        let inode_bitmap = le32(&d, 0x04) | hi(0x24);
        let inode_table = le32(&d, 0x08) | hi(0x28);
        if block_bitmap >= blocks || inode_bitmap >= blocks || inode_table.saturating_add(inode_table_blocks) > blocks {
            return Err(bad(format!(
                "group {g} places its bitmaps or inode table (block {inode_table}) past the volume's {blocks} blocks"
            )));
        }
    }
    Ok(())
}

/// Checks a FAT boot sector against the volume; answers the layout its [`FatGuard`] keeps to.
fn check_fat(r: &mut DiskReader, what: &str) -> Result<FatLayout, ItemsError> {
    let bad = |reason: String| ItemsError::Unsupported(format!("{what}: the FAT boot sector is invalid: {reason}"));
    let mut b = [0u8; 512];
    r.read_at(0, &mut b).map_err(|e| unreadable(what, e))?;
    let sector = le16(&b, 11);
    let per_cluster = u64::from(b[13]);
    if !matches!(sector, 512 | 1024 | 2048 | 4096) {
        return Err(bad(format!("{sector}-byte sectors")));
    }
    if !per_cluster.is_power_of_two() || per_cluster * sector > 64 * 1024 {
        return Err(bad(format!("{per_cluster} sectors per cluster")));
    }
    let reserved = le16(&b, 14);
    let fats = u64::from(b[16]);
    let total = match le16(&b, 19) {
        0 => le32(&b, 32),
        n => n,
    };
    let fat_sectors = match le16(&b, 22) {
        0 => le32(&b, 36),
        n => n,
    };
    if reserved == 0 || !(1..=2).contains(&fats) || fat_sectors == 0 {
        return Err(bad(format!("{reserved} reserved sectors, {fats} FATs of {fat_sectors} sectors")));
    }
    if total.checked_mul(sector).is_none_or(|n| n > r.len()) {
        return Err(bad(format!("{total} sectors do not fit in the volume's {} bytes", r.len())));
    }
    if reserved + fats * fat_sectors >= total {
        return Err(bad(format!("the FATs ({} sectors) fill the whole volume", fats * fat_sectors)));
    }
    let layout = FatLayout::from_boot_sector(&b).map_err(bad)?;
    if layout.bits == 32 && !layout.is_cluster(layout.root_cluster) {
        return Err(bad(format!("the root directory starts at cluster {}, outside the volume", layout.root_cluster)));
    }
    Ok(layout)
}

/// A browsable file system of a volume.
pub enum GuestFs {
    Ext(ext4_view::Ext4),
    /// Read through a [`FatGuard`]; the switch turns its directory checks on while listing; the
    /// most entries a directory of this volume can hold.
    Fat(Box<fatfs::FileSystem<FatGuard>>, ListingSwitch, usize),
}

/// A directory, as each file system finds it again.
pub enum DirRef<'a> {
    /// The root (`None`) or the entry of a directory: read through its inode, never by path,
    /// which would scan every directory on the way again.
    Ext(Option<ext4_view::DirEntry>),
    Fat(fatfs::Dir<'a, FatGuard>),
}

/// One entry of a directory, with what is needed to go into it or read it.
pub struct Entry<'a> {
    pub item: Item,
    handle: Handle<'a>,
}

/// A name read from a directory, its entry not yet read.
pub struct Named<'a> {
    /// The raw name.
    pub name: Vec<u8>,
    raw: Raw<'a>,
}

enum Raw<'a> {
    Ext(ext4_view::DirEntry),
    Fat(fatfs::DirEntry<'a, FatGuard>),
}

enum Handle<'a> {
    Ext(ext4_view::DirEntry),
    Fat(fatfs::DirEntry<'a, FatGuard>),
}

impl GuestFs {
    pub fn open(mut r: DiskReader, kind: FsKind, what: &str) -> Result<Self, ItemsError> {
        match kind {
            FsKind::Ext => {
                check_ext(&mut r, what)?;
                Ok(GuestFs::Ext(ext4_view::Ext4::load(Box::new(r)).map_err(|e| unreadable(what, e))?))
            }
            FsKind::Fat => {
                let layout = check_fat(&mut r, what)?;
                let (guard, listing) = FatGuard::new(r, layout);
                // A directory holds no more entries than the volume has 32-byte slots: a chain
                // that loops on a small volume is met long before the format's own limit.
                let max_entries = usize::try_from(layout.dir_slots).unwrap_or(usize::MAX).min(MAX_FAT_DIR_ENTRIES);
                Ok(GuestFs::Fat(
                    Box::new(fatfs::FileSystem::new(guard, fatfs::FsOptions::new()).map_err(|e| unreadable(what, e))?),
                    listing,
                    max_entries,
                ))
            }
            FsKind::Swap => Err(ItemsError::Unsupported(format!("{what} is swap space: there are no files in it"))),
            FsKind::Unknown => Err(ItemsError::Unsupported(format!("{what}: no ext2/3/4 or FAT file system found"))),
        }
    }

    /// The root directory.
    pub fn root(&self) -> DirRef<'_> {
        match self {
            GuestFs::Ext(_) => DirRef::Ext(None),
            GuestFs::Fat(fs, ..) => DirRef::Fat(fs.root_dir()),
        }
    }

    /// The names in `dir`, sorted, each with what is needed to read its entry later: one pass
    /// over the directory's own blocks, no inode read (a page of a listing reads the inodes of
    /// its own entries only). `shown` is the directory's display path.
    pub fn names<'a>(&'a self, dir: &DirRef<'a>, shown: &str) -> Result<Vec<Named<'a>>, ItemsError> {
        let cap = match self {
            GuestFs::Fat(_, _, max_entries) => *max_entries,
            GuestFs::Ext(_) => MAX_DIR_ENTRIES,
        };
        let too_many = || {
            ItemsError::Unsupported(format!("{shown}: more than {cap} entries in one directory (or its entries loop)"))
        };
        let mut out = vec![];
        match (self, dir) {
            (GuestFs::Ext(fs), DirRef::Ext(dir)) => {
                let entries = match dir {
                    None => fs.read_dir("/"),
                    Some(d) => d.read_dir(),
                };
                for e in entries.map_err(|e| map_ext(shown, e))? {
                    let e = e.map_err(|e| unreadable(shown, e))?;
                    let raw: Vec<u8> = e.file_name().as_ref().to_vec();
                    if raw == b"." || raw == b".." {
                        continue;
                    }
                    if out.len() == cap {
                        return Err(too_many());
                    }
                    out.push(Named { name: raw, raw: Raw::Ext(e) });
                }
            }
            (GuestFs::Fat(_, switch, _), DirRef::Fat(d)) => {
                let _listing = switch.listing();
                for e in d.iter() {
                    let e = e.map_err(|e| unreadable(shown, e))?;
                    let name = e.file_name();
                    if name == "." || name == ".." {
                        continue;
                    }
                    if out.len() == cap {
                        return Err(too_many());
                    }
                    out.push(Named { name: name.into_bytes(), raw: Raw::Fat(e) });
                }
            }
            _ => return Err(ItemsError::Unsupported("internal: a directory of another file system".into())),
        }
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The entry a name of [`GuestFs::names`] stands for: its metadata (an inode read on
    /// ext4; FAT keeps it in the directory entry) and a symlink's target.
    pub fn entry<'a>(&'a self, named: Named<'a>, shown: &str) -> Result<Entry<'a>, ItemsError> {
        let path = format!("{}/{}", shown.trim_end_matches('/'), String::from_utf8_lossy(&named.name));
        match named.raw {
            Raw::Ext(e) => {
                let m = e.metadata().map_err(|x| unreadable(&path, x))?;
                let target = if m.is_symlink() { e.read_link().ok().map(|t| t.as_ref().to_vec()) } else { None };
                let item = Item {
                    path,
                    name: named.name,
                    kind: ext_kind(m.file_type()),
                    size: m.len(),
                    mtime: m.modified().seconds(),
                    mode: u32::from(m.mode()) & 0o7777,
                    target,
                };
                Ok(Entry { item, handle: Handle::Ext(e) })
            }
            Raw::Fat(e) => {
                let item = Item {
                    path,
                    name: named.name,
                    kind: if e.is_dir() { ItemKind::Dir } else { ItemKind::File },
                    size: if e.is_dir() { 0 } else { e.len() },
                    mtime: fat_time(e.modified()),
                    mode: if e.is_dir() { 0o755 } else { 0o644 },
                    target: None,
                };
                Ok(Entry { item, handle: Handle::Fat(e) })
            }
        }
    }

    /// The entries of `dir`, sorted by name; `shown` is the directory's display path.
    pub fn entries<'a>(&'a self, dir: &DirRef<'a>, shown: &str) -> Result<Vec<Entry<'a>>, ItemsError> {
        self.names(dir, shown)?.into_iter().map(|n| self.entry(n, shown)).collect()
    }

    /// The directory an entry is.
    pub fn dir<'a>(&'a self, e: &Entry<'a>) -> DirRef<'a> {
        match &e.handle {
            Handle::Ext(e) => DirRef::Ext(Some(e.clone())),
            Handle::Fat(d) => DirRef::Fat(d.to_dir()),
        }
    }

    /// The entry named `name` in `dir` (FAT names match without regard to case): one pass over
    /// the directory, one inode read.
    pub fn find<'a>(&'a self, dir: &DirRef<'a>, shown: &str, name: &str) -> Result<Entry<'a>, ItemsError> {
        let fat = matches!(self, GuestFs::Fat(..));
        let named = self
            .names(dir, shown)?
            .into_iter()
            .find(|n| n.name == name.as_bytes() || (fat && n.name.eq_ignore_ascii_case(name.as_bytes())))
            .ok_or_else(|| ItemsError::NotFound(format!("{}/{name}", shown.trim_end_matches('/'))))?;
        self.entry(named, shown)
    }

    /// Streams a file's bytes, never more than its size says.
    pub fn read_file(
        &self,
        e: &Entry<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), ItemsError> {
        let path = e.item.path.as_str();
        let mut left = e.item.size;
        let mut buf = vec![0u8; 1 << 20];
        let mut pump = |r: &mut dyn Read| -> Result<(), ItemsError> {
            while left > 0 {
                let want = (buf.len() as u64).min(left) as usize;
                let n = r.read(&mut buf[..want]).map_err(|x| unreadable(path, x))?;
                if n == 0 {
                    return Err(unreadable(path, format!("the file ends {left} bytes before its size")));
                }
                left -= n as u64;
                sink(&buf[..n]).map_err(|x| unreadable(path, x))?;
            }
            Ok(())
        };
        match (self, &e.handle) {
            (GuestFs::Ext(_), Handle::Ext(inner)) => pump(&mut inner.open().map_err(|x| map_ext(path, x))?),
            (GuestFs::Fat(..), Handle::Fat(d)) => pump(&mut d.to_file()),
            _ => Err(ItemsError::Unsupported("internal: a file of another file system".into())),
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

/// A FAT timestamp (no zone: taken as UTC) in Unix seconds; a field out of range (the
/// guest's bytes say so) gives 0, never a panic.
pub fn fat_time(t: fatfs::DateTime) -> i64 {
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
