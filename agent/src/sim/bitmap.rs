//! Persistent dirty bitmaps: one bit per tracking block (64 KiB) of a disk, set by every guest
//! write that goes through the sim, the way Hyper-V's RCT or a QEMU persistent bitmap records
//! changes. Stored whole (a few hundred KiB for 100 GiB) and replaced atomically.
//!
//! File format version 1: `b"BWDIRTY1"`, u64 LE disk size, u32 LE granularity, u32 LE 0, then
//! ⌈size / granularity⌉ bits, little-endian bit order within each byte.

use std::path::Path;

/// Bytes covered by one bit.
pub const GRANULARITY: u64 = 64 << 10;
const MAGIC: &[u8; 8] = b"BWDIRTY1";

/// A dirty bitmap of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    bits: Vec<u8>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(GRANULARITY);
        Self { size, bits: vec![0; n.div_ceil(8) as usize] }
    }

    /// An all-dirty bitmap (everything must be read).
    pub fn full(size: u64) -> Self {
        let mut b = Self::new(size);
        b.mark(0, size);
        b
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn tracking_blocks(&self) -> u64 {
        self.size.div_ceil(GRANULARITY)
    }

    /// Marks the bytes `[offset, offset + len)` dirty.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        for i in offset / GRANULARITY..end.div_ceil(GRANULARITY) {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn is_dirty(&self, tracking_block: u64) -> bool {
        tracking_block < self.tracking_blocks()
            && self.bits[(tracking_block / 8) as usize] & (1 << (tracking_block % 8)) != 0
    }

    /// Sets every bit of `other` here too.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    pub fn is_clean(&self) -> bool {
        self.bits.iter().all(|b| *b == 0)
    }

    /// Bytes marked dirty (rounded to tracking blocks).
    pub fn dirty_bytes(&self) -> u64 {
        (0..self.tracking_blocks())
            .filter(|&i| self.is_dirty(i))
            .map(|i| GRANULARITY.min(self.size - i * GRANULARITY))
            .sum()
    }

    /// The blocks of `block_size` (a multiple or divisor of the granularity) that contain a
    /// dirty byte, in order.
    pub fn dirty_blocks(&self, block_size: u64) -> Vec<u64> {
        let blocks = self.size.div_ceil(block_size);
        (0..blocks)
            .filter(|&b| {
                let start = b * block_size / GRANULARITY;
                let end = ((b + 1) * block_size).min(self.size).div_ceil(GRANULARITY);
                (start..end.max(start + 1)).any(|i| self.is_dirty(i))
            })
            .collect()
    }

    /// Encodes the file.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.bits.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(GRANULARITY as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    /// Decodes the file; `None` if it is damaged (the caller treats tracking as lost).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.get(..8)? != MAGIC {
            return None;
        }
        let size = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let gran = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        if u64::from(gran) != GRANULARITY {
            return None;
        }
        let bits = bytes.get(24..)?.to_vec();
        if bits.len() as u64 != size.div_ceil(GRANULARITY).div_ceil(8) {
            return None;
        }
        Some(Self { size, bits })
    }

    /// Reads a bitmap file; `Ok(None)` if it is absent or damaged.
    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Self::decode(&b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the bitmap file atomically and durably.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        bulwark_pki::files::write_atomic(path, &self.encode(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_the_tracking_blocks_they_touch() {
        let mut b = DirtyBitmap::new(10 * GRANULARITY);
        b.mark(GRANULARITY - 1, 2); // straddles blocks 0 and 1
        assert!(b.is_dirty(0) && b.is_dirty(1) && !b.is_dirty(2));
        assert_eq!(b.dirty_bytes(), 2 * GRANULARITY);
        assert_eq!(b.dirty_blocks(1 << 20), vec![0]);
        // Smaller protection blocks than the tracking granularity: every block inside a dirty
        // tracking block is reported (over-reporting re-sends a little; under-reporting would
        // lose changes).
        assert_eq!(b.dirty_blocks(4096), (0..32).collect::<Vec<u64>>());
    }

    #[test]
    fn bitmaps_round_trip_and_damage_is_detected() {
        let mut b = DirtyBitmap::new(1 << 30);
        b.mark(123_456_789, 1);
        assert_eq!(DirtyBitmap::decode(&b.encode()), Some(b.clone()));
        let mut bytes = b.encode();
        bytes.pop();
        assert_eq!(DirtyBitmap::decode(&bytes), None);
    }
}
