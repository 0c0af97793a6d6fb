//! Partition tables, read as the hostile bytes they are: every count, size and offset is checked
//! against fixed bounds and against the disk before anything is allocated or followed.
//!
//! - **GPT** (UEFI 2.10 §5.3): the primary header at LBA 1 (512- or 4096-byte sectors), its
//!   CRC32, at most [`MAX_GPT_ENTRIES`] entries of exactly 128 bytes, the entry array inside the
//!   disk and its CRC32. The backup header is not read: a damaged primary is an error, never a
//!   second guess.
//! - **MBR**: four primary entries; extended partitions (0x05, 0x0f, 0x85) are followed through
//!   their chain of EBRs, each inside the extended partition, never visited twice, at most
//!   [`MAX_LOGICAL`] of them. Logical partitions are numbered from 5, as Linux numbers them.

use super::disk::DiskReader;
use super::ItemsError;

/// More partition entries than any tool creates (the usual array holds 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Logical partitions followed in an extended partition.
pub const MAX_LOGICAL: usize = 128;

/// A partition: its number (1-based, as Linux names it) and its byte range on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

fn bad(reason: String) -> ItemsError {
    ItemsError::Unsupported(format!("the partition table is invalid: {reason}"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// The partitions of a disk: `Ok(None)` when it has no partition table, an error when it has
/// one that cannot be trusted.
pub fn partitions(disk: &mut DiskReader) -> Result<Option<Vec<Part>>, ItemsError> {
    for sector in [512u64, 4096] {
        let mut sig = [0u8; 8];
        if disk.read_at(sector, &mut sig).is_ok() && &sig == b"EFI PART" {
            return gpt(disk, sector).map(Some);
        }
    }
    mbr(disk)
}

fn gpt(disk: &mut DiskReader, ss: u64) -> Result<Vec<Part>, ItemsError> {
    let mut h = vec![0u8; ss as usize];
    disk.read_at(ss, &mut h).map_err(|e| bad(format!("GPT header: {e}")))?;
    let header_size = u32_at(&h, 12);
    if !(92..=ss as u32).contains(&header_size) {
        return Err(bad(format!("GPT header size {header_size} is outside 92..={ss}")));
    }
    let mut check = h[..header_size as usize].to_vec();
    check[16..20].fill(0);
    if crc32fast::hash(&check) != u32_at(&h, 16) {
        return Err(bad("GPT header checksum does not match".into()));
    }
    let entries_lba = u64_at(&h, 72);
    let count = u32_at(&h, 80);
    let entry_size = u32_at(&h, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(bad(format!("GPT claims {count} partition entries (at most {MAX_GPT_ENTRIES} are read)")));
    }
    if entry_size != 128 {
        return Err(bad(format!("GPT partition entries of {entry_size} bytes (only 128 is supported)")));
    }
    let array_len = u64::from(count) * 128;
    let array_start = entries_lba.checked_mul(ss).filter(|s| s.checked_add(array_len).is_some_and(|e| e <= disk.len()));
    let Some(array_start) = array_start else {
        return Err(bad(format!("GPT entry array at LBA {entries_lba} lies outside the disk")));
    };
    let mut array = vec![0u8; array_len as usize];
    disk.read_at(array_start, &mut array).map_err(|e| bad(format!("GPT entries: {e}")))?;
    if crc32fast::hash(&array) != u32_at(&h, 88) {
        return Err(bad("GPT entry array checksum does not match".into()));
    }
    let mut parts = vec![];
    for (i, e) in array.chunks_exact(128).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let range = first.checked_mul(ss).zip(last.checked_sub(first).and_then(|n| (n + 1).checked_mul(ss)));
        match range {
            Some((start, len)) if start < disk.len() => {
                parts.push(Part { number: i as u32 + 1, start, len: len.min(disk.len() - start) })
            }
            _ => return Err(bad(format!("GPT partition {} spans LBA {first}..={last}, outside the disk", i + 1))),
        }
    }
    // Numbered by position among the used entries (p1 is the first partition), as before.
    for (n, p) in parts.iter_mut().enumerate() {
        p.number = n as u32 + 1;
    }
    Ok(parts)
}

/// One 16-byte MBR entry: (type, first LBA, sectors).
fn mbr_entry(sector: &[u8], slot: usize) -> (u8, u64, u64) {
    let e = &sector[446 + slot * 16..462 + slot * 16];
    (e[4], u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)))
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn mbr(disk: &mut DiskReader) -> Result<Option<Vec<Part>>, ItemsError> {
    let mut s = [0u8; 512];
    if disk.read_at(0, &mut s).is_err() || s[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    // A boot sector whose status bytes are not 0x00/0x80 is not a partition table.
    if (0..4).any(|i| !matches!(s[446 + i * 16], 0x00 | 0x80)) {
        return Ok(None);
    }
    let mut parts = vec![];
    let mut extended = None;
    for slot in 0..4 {
        let (kind, first, sectors) = mbr_entry(&s, slot);
        if kind == 0 || sectors == 0 {
            continue;
        }
        let (start, len) = (first * 512, sectors * 512);
        if start >= disk.len() {
            return Err(bad(format!("MBR partition {} starts past the end of the disk", slot + 1)));
        }
        if is_extended(kind) {
            if extended.replace((start, len.min(disk.len() - start))).is_some() {
                return Err(bad("more than one extended partition".into()));
            }
        } else {
            parts.push(Part { number: parts.len() as u32 + 1, start, len: len.min(disk.len() - start) });
        }
    }
    if let Some((ext_start, ext_len)) = extended {
        logical(disk, ext_start, ext_len, &mut parts)?;
    }
    Ok((!parts.is_empty()).then_some(parts))
}

/// The logical partitions of the extended partition `[ext_start, ext_start + ext_len)`.
fn logical(disk: &mut DiskReader, ext_start: u64, ext_len: u64, parts: &mut Vec<Part>) -> Result<(), ItemsError> {
    let mut seen = std::collections::HashSet::new();
    let mut ebr = ext_start;
    for n in 0..=MAX_LOGICAL {
        if n == MAX_LOGICAL {
            return Err(bad(format!("more than {MAX_LOGICAL} logical partitions (the EBR chain may loop)")));
        }
        if !seen.insert(ebr) {
            return Err(bad(format!("the chain of extended boot records loops at byte {ebr}")));
        }
        let mut s = [0u8; 512];
        disk.read_at(ebr, &mut s).map_err(|e| bad(format!("extended boot record at byte {ebr}: {e}")))?;
        if s[510..512] != [0x55, 0xAA] {
            return Err(bad(format!("extended boot record at byte {ebr} has no signature")));
        }
        let (kind, first, sectors) = mbr_entry(&s, 0);
        if kind != 0 && sectors != 0 {
            let start = ebr + first * 512;
            let len = sectors * 512;
            if start < ext_start || start.saturating_add(len) > ext_start + ext_len {
                return Err(bad(format!("logical partition {} lies outside its extended partition", 5 + n)));
            }
            parts.push(Part { number: 5 + n as u32, start, len });
        }
        let (next_kind, next, next_sectors) = mbr_entry(&s, 1);
        if next_kind == 0 || next_sectors == 0 {
            return Ok(());
        }
        ebr = ext_start + next * 512;
        if ebr >= ext_start + ext_len {
            return Err(bad(format!("an extended boot record points past its extended partition (byte {ebr})")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::disk::MemBlocks;

    fn reader(image: Vec<u8>) -> DiskReader {
        let src = MemBlocks::new(image.into(), 4096);
        let g = src.geometry();
        DiskReader::new(Box::new(src), g)
    }

    fn set_entry(s: &mut [u8], at: usize, kind: u8, first: u32, sectors: u32) {
        s[at + 4] = kind;
        s[at + 8..at + 12].copy_from_slice(&first.to_le_bytes());
        s[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn mbr_disk() -> Vec<u8> {
        let mut d = vec![0u8; 4 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        set_entry(&mut d, 446, 0x83, 2048, 2048);
        set_entry(&mut d, 462, 0x05, 4096, 4096);
        // EBR 1 at sector 4096: a logical partition at +2, next EBR at ext+1024.
        let e1 = 4096 * 512;
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xAA;
        set_entry(&mut d, e1 + 446, 0x83, 2, 1000);
        set_entry(&mut d, e1 + 462, 0x05, 1024, 2000);
        let e2 = (4096 + 1024) * 512;
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xAA;
        set_entry(&mut d, e2 + 446, 0x82, 2, 1000);
        d
    }

    #[test]
    fn mbr_with_logical_partitions_is_read_and_numbered_from_five() {
        let parts = partitions(&mut reader(mbr_disk())).unwrap().unwrap();
        let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![1, 5, 6]);
        assert_eq!(parts[1].start, (4096 + 2) * 512);
    }

    #[test]
    fn an_ebr_chain_that_loops_is_an_error() {
        let mut d = mbr_disk();
        // The second EBR points back at the first.
        let e2 = (4096 + 1024) * 512;
        set_entry(&mut d, e2 + 462, 0x05, 0, 2000);
        let e = partitions(&mut reader(d)).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
    }

    fn gpt_disk(count: u32, entry_size: u32, first: u64, last: u64) -> Vec<u8> {
        let mut d = vec![0u8; 4 << 20];
        let mut entries = vec![0u8; count as usize * 128];
        if count > 0 {
            entries[..16].fill(0xAB);
            entries[32..40].copy_from_slice(&first.to_le_bytes());
            entries[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let h = &mut d[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&[0, 0, 1, 0]);
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&count.to_le_bytes());
        h[84..88].copy_from_slice(&entry_size.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let n = entries.len().min(d.len() - 1024);
        d[1024..1024 + n].copy_from_slice(&entries[..n]);
        d
    }

    #[test]
    fn gpt_is_read_and_hostile_headers_are_refused_before_allocating() {
        let parts = partitions(&mut reader(gpt_disk(128, 128, 2048, 4095))).unwrap().unwrap();
        assert_eq!(parts, vec![Part { number: 1, start: 2048 * 512, len: 2048 * 512 }]);
        for (count, size, want) in [
            (u32::MAX, 128, "partition entries"),
            (4_000_000, 128, "partition entries"),
            (128, 256, "only 128"),
            (128, 0, "only 128"),
        ] {
            let e = partitions(&mut reader(gpt_disk(count.min(128), size, 2048, 4095)))
                .and_then(|_| {
                    let mut d = gpt_disk(128, size, 2048, 4095);
                    // Rewrite the count with a valid header checksum.
                    d[512 + 80..512 + 84].copy_from_slice(&count.to_le_bytes());
                    d[512 + 16..512 + 20].fill(0);
                    let crc = crc32fast::hash(&d[512..604]);
                    d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
                    partitions(&mut reader(d))
                })
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{count} {size}: {e}");
        }
        let e = partitions(&mut reader(gpt_disk(128, 128, 2048, u64::MAX / 2))).unwrap_err().to_string();
        assert!(e.contains("outside the disk"), "{e}");
    }
}
