//! The ground truth's digest cache: for chaos runs the sim records, at every snapshot point, the
//! BLAKE3 of each disk's guest view. Hashing the whole disk at every snapshot was a seventh of
//! a simulated run, so each disk keeps `DISK.truth`: the BLAKE3 chaining value of every 64 KiB
//! subtree of its guest view. A guest write marks the subtrees it touches stale, and the next
//! digest hashes those again (a disk written many times between snapshots is hashed once). The digest of the whole disk is the merge of those chaining
//! values along BLAKE3's own tree, so it is the very `blake3::hash` of the disk's bytes that a
//! restore is compared with.
//!
//! The file is a test aid, kept only while the storage root has `ground-truth/`. Its first
//! byte says whether it is current: a guest write clears it, marks its subtrees stale and sets
//! it again, all before touching the disk, so a process killed at any point leaves a cache that
//! is rebuilt or re-hashed from the disk where needed, never a stale value trusted. Writers that do not keep it (restores)
//! delete it. Memory: a digest is computed from all of a disk's chaining values at once, 32
//! bytes per 64 KiB (a 2,048th of the disk: 2 MiB for a 4 GiB chaos disk) — a test aid's cost,
//! where the whole-disk hash it replaces streamed.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per cached subtree: a power of two of BLAKE3 chunks, so every subtree but the last
/// is a whole node of the tree.
pub const BLOCK: u64 = 64 << 10;

/// The mark of a block a guest write changed since its chaining value was last computed: hashed
/// again from the disk when a digest is asked for (a real chaining value that happened to be
/// all zeros would only be hashed again).
pub const STALE: ChainingValue = [0; 32];

const CURRENT: u8 = 1;
const HEADER: u64 = 1;

/// The chaining value of the subtree holding `data`, which starts `offset` bytes into the disk
/// (a multiple of [`BLOCK`]).
pub fn block_cv(offset: u64, data: &[u8]) -> ChainingValue {
    debug_assert!(offset.is_multiple_of(BLOCK) && data.len() as u64 <= BLOCK);
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The BLAKE3 of a disk of `size` bytes from the chaining values of its blocks; `first` is the
/// disk's first block when the disk is one block (a lone chunk or subtree is hashed as the
/// root, which a chaining value cannot give).
pub fn root(
    size: u64,
    cvs: &[ChainingValue],
    first: impl FnOnce() -> std::io::Result<Vec<u8>>,
) -> std::io::Result<blake3::Hash> {
    assert_eq!(cvs.len() as u64, size.div_ceil(BLOCK), "one chaining value per block");
    if size <= BLOCK {
        return Ok(blake3::hash(&first()?));
    }
    let left = left_subtree_len(size);
    Ok(merge_subtrees_root(&subtree(0, left, cvs), &subtree(left, size - left, cvs), Mode::Hash))
}

/// The chaining value of the subtree of `len` bytes at `start` (both on block boundaries but
/// for the disk's end): BLAKE3 splits a node of more than one chunk at the largest power of two
/// of chunks below its length, which is a whole number of blocks once the node is over one.
fn subtree(start: u64, len: u64, cvs: &[ChainingValue]) -> ChainingValue {
    if len <= BLOCK {
        return cvs[(start / BLOCK) as usize];
    }
    let left = left_subtree_len(len);
    debug_assert!(left.is_multiple_of(BLOCK));
    merge_subtrees_non_root(&subtree(start, left, cvs), &subtree(start + left, len - left, cvs), Mode::Hash)
}

/// `DISK.truth` of one disk.
pub struct Cache {
    path: PathBuf,
    blocks: u64,
}

impl Cache {
    pub fn new(path: PathBuf, size: u64) -> Self {
        Self { path, blocks: size.div_ceil(BLOCK) }
    }

    /// The chaining values, when the file is current and of this disk's size.
    pub fn load(&self) -> std::io::Result<Option<Vec<ChainingValue>>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.first() != Some(&CURRENT) || bytes.len() as u64 != HEADER + 32 * self.blocks {
            return Ok(None);
        }
        Ok(Some(bytes[HEADER as usize..].chunks_exact(32).filter_map(|c| ChainingValue::try_from(c).ok()).collect()))
    }

    /// Writes every chaining value, current.
    pub fn store(&self, cvs: &[ChainingValue]) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(HEADER as usize + 32 * cvs.len());
        bytes.push(CURRENT);
        for cv in cvs {
            bytes.extend_from_slice(cv);
        }
        let tmp = self.path.with_extension("truth.tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Opens a current cache for an update of some blocks, marking it not current until
    /// [`Open::done`]; `None` when there is no current cache to keep.
    pub fn begin(&self) -> std::io::Result<Option<Open>> {
        let f = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut flag = [0u8; 1];
        if f.metadata()?.len() != HEADER + 32 * self.blocks || f.read_at(&mut flag, 0)? != 1 || flag[0] != CURRENT {
            return Ok(None);
        }
        f.write_all_at(&[0], 0)?;
        Ok(Some(Open { file: f }))
    }

    /// Deletes the cache (a writer that does not keep it).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// A cache being updated.
pub struct Open {
    file: File,
}

impl Open {
    pub fn set(&self, block: u64, cv: &ChainingValue) -> std::io::Result<()> {
        self.file.write_all_at(cv, HEADER + 32 * block)
    }

    pub fn done(self) -> std::io::Result<()> {
        self.file.write_all_at(&[CURRENT], 0)
    }
}

/// The path of `disk`'s cache in VM directory `dir`.
pub fn path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("{disk}.truth"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest_by_blocks(data: &[u8]) -> blake3::Hash {
        let cvs: Vec<_> = data.chunks(BLOCK as usize).enumerate().map(|(i, b)| block_cv(i as u64 * BLOCK, b)).collect();
        root(data.len() as u64, &cvs, || Ok(data.to_vec())).unwrap()
    }

    #[test]
    fn the_merged_digest_is_blake3_of_the_whole_disk() {
        for size in
            [1, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK, 3 * BLOCK + 4096, 64 * BLOCK, 67 * BLOCK + 512]
        {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(digest_by_blocks(&data), blake3::hash(&data), "size {size}");
        }
    }

    proptest! {
        #[test]
        fn any_size_and_content(size in 1u64..(9 * BLOCK), seed: u8) {
            let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed)).collect();
            prop_assert_eq!(digest_by_blocks(&data), blake3::hash(&data));
        }
    }

    #[test]
    fn an_update_left_half_done_is_not_current() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("d.truth"), 3 * BLOCK);
        assert!(cache.load().unwrap().is_none() && cache.begin().unwrap().is_none());
        cache.store(&[[1; 32], [2; 32], [3; 32]]).unwrap();
        assert_eq!(cache.load().unwrap().unwrap()[1], [2; 32]);
        let open = cache.begin().unwrap().unwrap();
        open.set(1, &[9; 32]).unwrap();
        assert!(cache.load().unwrap().is_none(), "not current while being updated");
        drop(open);
        assert!(cache.begin().unwrap().is_none(), "a killed update stays not current");
        cache.store(&[[1; 32], [2; 32], [3; 32]]).unwrap();
        let open = cache.begin().unwrap().unwrap();
        open.set(1, &[9; 32]).unwrap();
        open.done().unwrap();
        assert_eq!(cache.load().unwrap().unwrap()[1], [9; 32]);
        assert!(Cache::new(dir.path().join("d.truth"), 4 * BLOCK).load().unwrap().is_none(), "other size");
    }
}
