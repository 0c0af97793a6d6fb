//! Blocks and their ids: disks are cut into fixed-size blocks (a power of two between 4 KiB
//! and 16 MiB), each identified by its BLAKE3 digest — keyed when the store is encrypted —
//! and all-zero blocks by [`ZERO`]. How blocks travel is [`crate::transfer`]'s.

/// Bytes before the data in a block frame: the index and the id.
pub const BLOCK_HEADER_LEN: usize = 8 + 32;
/// The largest block size a disk may be protected with (16 MiB).
pub const MAX_BLOCK_SIZE: usize = 16 << 20;
/// The smallest block size (4 KiB).
pub const MIN_BLOCK_SIZE: usize = 4 << 10;

/// A BLAKE3 digest of a block or chunk.
pub type Digest = [u8; 32];

/// The id of an all-zero block or page: never stored, never sent as data.
pub const ZERO: Digest = [0u8; 32];

/// True if every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size chunks lets the compiler vectorize the scan.
    data.chunks(64).all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Computes block and chunk ids: BLAKE3, keyed when the store is encrypted (the coordinator
/// gives agents the id key over their authenticated session, so both sides compute the same
/// ids while the ids leak nothing to whoever reads the store).
#[derive(Clone)]
pub struct ChunkHasher {
    key: Option<[u8; 32]>,
}

impl std::fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkHasher").field("keyed", &self.key.is_some()).finish()
    }
}

impl ChunkHasher {
    pub fn plain() -> Self {
        Self { key: None }
    }

    pub fn keyed(key: [u8; 32]) -> Self {
        Self { key: Some(key) }
    }

    /// The id key agents need to compute the same ids (None: plain BLAKE3).
    pub fn id_key(&self) -> Option<[u8; 32]> {
        self.key
    }

    /// The id of `data` ([`ZERO`] for all-zero data).
    pub fn id(&self, data: &[u8]) -> Digest {
        if is_zero(data) {
            return ZERO;
        }
        self.hash(data)
    }

    /// The hash of `data`, zero or not.
    pub fn hash(&self, data: &[u8]) -> Digest {
        match &self.key {
            Some(k) => *blake3::keyed_hash(k, data).as_bytes(),
            None => *blake3::hash(data).as_bytes(),
        }
    }
}

/// A block size out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block size {0} is not a power of two between 4 KiB and 16 MiB")]
pub struct BadBlockSize(pub usize);

/// Checks that a block size is a power of two within bounds.
pub fn check_block_size(block_size: usize) -> Result<(), BadBlockSize> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(BadBlockSize(block_size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_must_be_powers_of_two_in_range() {
        assert!(check_block_size(1 << 20).is_ok());
        assert!(check_block_size(3 << 20).is_err());
        assert!(check_block_size(32 << 20).is_err());
        assert!(check_block_size(1024).is_err());
    }
}
