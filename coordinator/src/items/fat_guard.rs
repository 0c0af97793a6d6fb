//! The bytes fatfs reads of a FAT volume, with every cluster number it would compute with put in
//! range first. fatfs 0.3 trusts cluster numbers: a FAT entry or a directory entry naming
//! cluster 0 or 1, or one past the volume, makes it compute `(cluster − 2) × sectors per
//! cluster` and overflow (a panic with overflow checks, a wrong sector without; the `walk` fuzz
//! target found it in seconds). Its public API never shows a cluster number, so [`FatGuard`]
//! sits between it and the disk:
//!
//! - FAT entries (every copy of the table) that name a cluster outside `2..clusters + 2` read as
//!   end of chain: the file or directory ends there (a file then reads short of its size).
//! - While a directory is listed ([`FatGuard::listing`]), directory entries (the FAT12/16 root
//!   region and the data clusters) whose first cluster is outside that range read as having
//!   none: an empty file or directory. File contents are read with the guard off.
//!
//! [`FatLayout`] computes the layout exactly as fatfs does (`BiosParameterBlock::total_clusters`,
//! `FatType::from_clusters`), so both agree on the table's entry width.

use super::disk::DiskReader;
use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::rc::Rc;

/// Where a FAT volume keeps its tables and directories, as fatfs computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatLayout {
    /// Bits of a table entry: 12, 16 or 32 (28 used).
    pub bits: u32,
    /// Data clusters: valid cluster numbers are `2..clusters + 2`.
    pub clusters: u64,
    /// Byte ranges of the tables: `[fats_start, fats_start + fats × fat_len)`.
    pub fats_start: u64,
    pub fat_len: u64,
    pub fats: u64,
    /// Where directory entries may be: the FAT12/16 root region, then the data clusters.
    pub dirs_start: u64,
    /// The FAT32 root directory's first cluster (0 on FAT12/16).
    pub root_cluster: u64,
    /// 32-byte slots in the root region and the data clusters: no directory holds more entries.
    pub dir_slots: u64,
}

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2).map_or(0, |s| u64::from(u16::from_le_bytes([s[0], s[1]])))
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map_or(0, |s| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
}

impl FatLayout {
    /// The layout a boot sector describes, or why it has none (no data clusters).
    pub fn from_boot_sector(b: &[u8; 512]) -> Result<Self, String> {
        let sector = le16(b, 11).max(1);
        let per_cluster = u64::from(b[13]).max(1);
        let reserved = le16(b, 14);
        let fats = u64::from(b[16]);
        let root_entries = le16(b, 17);
        // fatfs: a volume is FAT32 by its BPB when the 16-bit FAT size is 0.
        let fat_sectors = match le16(b, 22) {
            0 => le32(b, 36),
            n => n,
        };
        let total = match le16(b, 19) {
            0 => le32(b, 32),
            n => n,
        };
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let fats_end = reserved + fats * fat_sectors;
        let first_data = fats_end + root_sectors;
        if first_data >= total {
            return Err(format!("the tables and the root directory ({first_data} sectors) fill the whole volume"));
        }
        let clusters = (total - first_data) / per_cluster;
        let bits = match clusters {
            0..4085 => 12,
            4085..65525 => 16,
            _ => 32,
        };
        Ok(FatLayout {
            bits,
            clusters,
            fats_start: reserved * sector,
            fat_len: fat_sectors * sector,
            fats,
            dirs_start: fats_end * sector,
            root_cluster: if bits == 32 { le32(b, 44) } else { 0 },
            dir_slots: (clusters * per_cluster + root_sectors) * sector / 32,
        })
    }

    /// Whether `n` names a data cluster of the volume.
    pub fn is_cluster(&self, n: u64) -> bool {
        (2..self.clusters + 2).contains(&n)
    }

    /// Bytes of the table's smallest repeating unit: FAT12 packs two entries in 3 bytes.
    fn unit(&self) -> u64 {
        match self.bits {
            12 => 3,
            16 => 2,
            _ => 4,
        }
    }

    /// A table unit with its entries that point outside the volume made end of chain.
    fn fix_fat_unit(&self, u: &mut [u8]) {
        let ok = |v: u64, special: u64| v == 0 || v >= special || self.is_cluster(v);
        match (self.bits, u) {
            (12, [b0, b1, b2]) => {
                let (e0, e1) = (u64::from(*b0) | u64::from(*b1 & 0x0F) << 8, u64::from(*b1 >> 4) | u64::from(*b2) << 4);
                if !ok(e0, 0xFF7) {
                    *b0 = 0xFF;
                    *b1 |= 0x0F;
                }
                if !ok(e1, 0xFF7) {
                    *b1 |= 0xF0;
                    *b2 = 0xFF;
                }
            }
            (16, [b0, b1]) if !ok(u64::from(u16::from_le_bytes([*b0, *b1])), 0xFFF7) => {
                (*b0, *b1) = (0xFF, 0xFF);
            }
            (32, [b0, b1, b2, b3]) => {
                let v = u32::from_le_bytes([*b0, *b1, *b2, *b3]);
                if !ok(u64::from(v & 0x0FFF_FFFF), 0x0FFF_FFF7) {
                    [*b0, *b1, *b2, *b3] = (v | 0x0FFF_FFFF).to_le_bytes();
                }
            }
            _ => {}
        }
    }

    /// A 32-byte directory entry with a first cluster outside the volume made "none" (long-name
    /// entries, attribute 0x0F, hold name characters there and are left alone).
    fn fix_dir_entry(&self, e: &mut [u8]) {
        if e.len() != 32 || e[11] & 0x3F == 0x0F {
            return;
        }
        let hi = if self.bits == 32 { le16(e, 20) << 16 } else { 0 };
        let first = hi | le16(e, 26);
        if first != 0 && !self.is_cluster(first) {
            e[26..28].fill(0);
            if self.bits == 32 {
                e[20..22].fill(0);
            }
        }
    }
}

/// A FAT volume's bytes for fatfs, through the checks above. Read-only like the disk.
pub struct FatGuard {
    disk: DiskReader,
    layout: FatLayout,
    listing: Rc<Cell<bool>>,
    pos: u64,
    /// The last unit fixed (its offset and bytes): fatfs reads a directory entry field by
    /// field, a dozen reads for one unit.
    last: Option<(u64, [u8; 32])>,
}

/// While alive, the guard reads directory entries as such (see the module doc).
pub struct Listing(Rc<Cell<bool>>);

impl Drop for Listing {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The handle that turns directory checks on for a listing.
#[derive(Clone)]
pub struct ListingSwitch(Rc<Cell<bool>>);

impl ListingSwitch {
    pub fn listing(&self) -> Listing {
        self.0.set(true);
        Listing(self.0.clone())
    }
}

impl FatGuard {
    pub fn new(disk: DiskReader, layout: FatLayout) -> (Self, ListingSwitch) {
        let listing = Rc::new(Cell::new(false));
        (Self { disk, layout, listing: listing.clone(), pos: 0, last: None }, ListingSwitch(listing))
    }

    /// Rewrites `buf` (the volume's bytes at `at`) unit by unit where the checks apply; each
    /// unit is read whole, so a read that starts or ends inside one is fixed the same way.
    fn fix(&mut self, at: u64, buf: &mut [u8], start: u64, end: u64, unit: u64, dir: bool) -> io::Result<()> {
        let (a, b) = (at.max(start), (at + buf.len() as u64).min(end));
        if a >= b {
            return Ok(());
        }
        let mut s = start + (a - start) / unit * unit;
        while s < b {
            let n = unit.min(end - s) as usize;
            if n as u64 == unit {
                let u = match self.last {
                    Some((at, u)) if at == s => u,
                    _ => {
                        let mut u = [0u8; 32];
                        self.disk.read_at(s, &mut u[..n])?;
                        if dir {
                            self.layout.fix_dir_entry(&mut u[..n]);
                        } else {
                            self.layout.fix_fat_unit(&mut u[..n]);
                        }
                        self.last = Some((s, u));
                        u
                    }
                };
                let (from, to) = (s.max(a), (s + unit).min(b));
                buf[(from - at) as usize..(to - at) as usize]
                    .copy_from_slice(&u[(from - s) as usize..(to - s) as usize]);
            }
            s += unit;
        }
        Ok(())
    }
}

impl Read for FatGuard {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.disk.len().saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        let at = self.pos;
        let buf = &mut buf[..n];
        self.disk.read_at(at, buf)?;
        let l = self.layout;
        for k in 0..l.fats {
            let start = l.fats_start + k * l.fat_len;
            self.fix(at, buf, start, start + l.fat_len, l.unit(), false)?;
        }
        if self.listing.get() {
            self.fix(at, buf, l.dirs_start, self.disk.len(), 32, true)?;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for FatGuard {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.disk.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl Write for FatGuard {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "a recovery point is read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bits: u32) -> FatLayout {
        FatLayout {
            bits,
            clusters: 100,
            fats_start: 0,
            fat_len: 0,
            fats: 0,
            dirs_start: 0,
            root_cluster: 0,
            dir_slots: 0,
        }
    }

    #[test]
    fn table_entries_outside_the_volume_read_as_end_of_chain() {
        // FAT12: entries 1 (reserved) and 3 (fine) packed; then 0xFF8 (end) and 200 (past 101).
        let l = layout(12);
        let mut u = [0x01, 0x30, 0x00];
        l.fix_fat_unit(&mut u);
        assert_eq!(u, [0xFF, 0x3F, 0x00]);
        let mut u = [0xF8, 0x8F, 0x0C];
        l.fix_fat_unit(&mut u);
        assert_eq!(u, [0xF8, 0xFF, 0xFF]);
        let l = layout(16);
        for (v, want) in [(0u16, 0u16), (1, 0xFFFF), (2, 2), (101, 101), (102, 0xFFFF), (0xFFF7, 0xFFF7)] {
            let mut u = v.to_le_bytes();
            l.fix_fat_unit(&mut u);
            assert_eq!(u16::from_le_bytes(u), want, "{v:#x}");
        }
        let l = layout(32);
        for (v, want) in [(0xF000_0001u32, 0xFFFF_FFFF), (0x1000_0005, 0x1000_0005), (0x0FFF_FFF8, 0x0FFF_FFF8)] {
            let mut u = v.to_le_bytes();
            l.fix_fat_unit(&mut u);
            assert_eq!(u32::from_le_bytes(u), want, "{v:#x}");
        }
    }

    #[test]
    fn directory_entries_lose_a_first_cluster_outside_the_volume_but_long_names_are_kept() {
        let l = layout(32);
        let mut e = [0u8; 32];
        e[20..22].copy_from_slice(&1u16.to_le_bytes());
        e[26..28].copy_from_slice(&5u16.to_le_bytes());
        l.fix_dir_entry(&mut e);
        assert_eq!((le16(&e, 20), le16(&e, 26)), (0, 0));
        e[26] = 7;
        l.fix_dir_entry(&mut e);
        assert_eq!(le16(&e, 26), 7);
        let mut lfn = [0x41u8; 32];
        lfn[11] = 0x0F;
        let before = lfn;
        l.fix_dir_entry(&mut lfn);
        assert_eq!(lfn, before);
    }
}
