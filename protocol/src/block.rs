//! Block frames: the raw format of bulk transfer streams, kept out of the codec so a 1 MiB
//! block is never copied through serde.
//!
//! Format version 1. A block stream is a unidirectional QUIC stream whose frames
//! (see [`crate::frame`]) are, in order: one control-encoded header message chosen by the job,
//! then any number of block frames:
//! ```text
//! offset 0   u64 BE  block index within the disk
//! offset 8   [u8;32] BLAKE3 digest of the block's plain bytes
//! offset 40  ...     the block's bytes (1 ..= block_size)
//! ```
//! so a block frame body is at most `block_size + BLOCK_HEADER_LEN` bytes, and that is the
//! limit the receiver reads with.

/// Bytes before the data in a block frame body.
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

/// Why a block frame is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockFrameError {
    #[error("block frame of {len} bytes is shorter than its {BLOCK_HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("block frame carries {len} data bytes, over the block size {block_size}")]
    TooLong { len: usize, block_size: usize },
    #[error("block size {0} is not a power of two between 4 KiB and 16 MiB")]
    BadBlockSize(usize),
}

/// The frame limit for a stream of blocks of `block_size`.
pub fn frame_limit(block_size: usize) -> Result<usize, BlockFrameError> {
    check_block_size(block_size)?;
    Ok(block_size + BLOCK_HEADER_LEN)
}

/// Checks that a block size is a power of two within bounds.
pub fn check_block_size(block_size: usize) -> Result<(), BlockFrameError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(BlockFrameError::BadBlockSize(block_size));
    }
    Ok(())
}

/// A parsed block frame borrowing its data from the frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFrame<'a> {
    pub index: u64,
    pub digest: Digest,
    pub data: &'a [u8],
}

impl<'a> BlockFrame<'a> {
    /// Parses a frame body received on a stream of `block_size` blocks.
    pub fn parse(body: &'a [u8], block_size: usize) -> Result<Self, BlockFrameError> {
        let (Some(index), Some(digest)) = (body.first_chunk::<8>(), body.get(8..BLOCK_HEADER_LEN)) else {
            return Err(BlockFrameError::Short { len: body.len() });
        };
        let data = &body[BLOCK_HEADER_LEN..];
        if data.is_empty() {
            return Err(BlockFrameError::Short { len: body.len() });
        }
        if data.len() > block_size {
            return Err(BlockFrameError::TooLong { len: data.len(), block_size });
        }
        let mut d = [0u8; 32];
        d.copy_from_slice(digest);
        Ok(Self { index: u64::from_be_bytes(*index), digest: d, data })
    }

    /// The frame body: header then data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + self.data.len());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(self.data);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_frames_round_trip() {
        let data = vec![7u8; 4096];
        let f = BlockFrame { index: 42, digest: *blake3::hash(&data).as_bytes(), data: &data };
        let body = f.encode();
        assert_eq!(BlockFrame::parse(&body, 4096), Ok(f));
        assert!(matches!(BlockFrame::parse(&body, 2048), Err(BlockFrameError::TooLong { .. })));
    }

    #[test]
    fn block_sizes_must_be_powers_of_two_in_range() {
        assert!(frame_limit(1 << 20).is_ok());
        assert!(frame_limit(3 << 20).is_err());
        assert!(frame_limit(32 << 20).is_err());
        assert!(frame_limit(1024).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BlockFrame::parse(&bytes, 128);
        }
    }
}
