//! Random access to a disk of a recovery point. The bytes come from a [`BlockSource`]: the
//! store itself ([`StoreBlocks`], on the coordinator's side of the sandbox) or the coordinator
//! over a pipe (inside the items worker, [`super::worker`]), or memory (tests and fuzzing).
//! [`DiskReader`] slices the disk, reads at offsets and keeps a few blocks cached. Memory: the
//! cache (at most [`CACHE_BYTES`]) and, for the store, one page of leaf ids, whatever the disk
//! size.

use crate::store::{Store, StorePages};
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap::{self, TreeRoot, FANOUT};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::rc::Rc;
use std::sync::Arc;

/// Blocks kept in a reader's cache, in bytes (at least two blocks are kept whatever their size).
pub const CACHE_BYTES: usize = 32 << 20;

/// The shape of a disk: its block size and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Geometry {
    pub block_size: u32,
    pub disk_size: u64,
}

impl Geometry {
    /// The number of blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.block_size.max(1)))
    }

    /// The length of block `index`: the block size, less for the last block; 0 past the end.
    pub fn block_len(&self, index: u64) -> usize {
        let bs = u64::from(self.block_size);
        let start = index.saturating_mul(bs);
        self.disk_size.saturating_sub(start).min(bs) as usize
    }
}

/// Where a disk's blocks come from.
pub trait BlockSource {
    /// Block `index` of the disk, exactly [`Geometry::block_len`] bytes.
    fn read_block(&mut self, index: u64) -> io::Result<Vec<u8>>;
}

/// A disk of a recovery point read straight from the store: a block's leaf in the block map
/// (one leaf page of ids cached), the leaf's chunk. Runs only in the coordinator itself.
pub struct StoreBlocks {
    store: Arc<Store>,
    root: TreeRoot,
    geometry: Geometry,
    page: Option<(u64, Vec<Digest>)>,
    /// Every block served and its id, when asked to keep them (at most [`MAX_READS_KEPT`];
    /// `None` inside once there were more).
    reads: Option<ReadLog>,
}

/// The blocks a reader was served and their ids (`None` once there were too many to keep).
pub type ReadLog = Arc<std::sync::Mutex<Option<Vec<(u64, Digest)>>>>;

/// The most reads a [`StoreBlocks`] keeps for [`StoreBlocks::keep_reads`].
pub const MAX_READS_KEPT: usize = 4096;

impl StoreBlocks {
    pub fn new(store: Arc<Store>, root: TreeRoot, geometry: Geometry) -> Self {
        Self { store, root, geometry, page: None, reads: None }
    }

    /// Keeps every block served and its id, for the caller to read once the reader is done:
    /// `None` there if the reader read more than [`MAX_READS_KEPT`] blocks.
    pub fn keep_reads(&mut self) -> ReadLog {
        let reads = Arc::new(std::sync::Mutex::new(Some(vec![])));
        self.reads = Some(reads.clone());
        reads
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn leaf(&mut self, index: u64) -> io::Result<Digest> {
        let page = index / FANOUT as u64;
        if self.page.as_ref().is_none_or(|(p, _)| *p != page) {
            let entries =
                blockmap::node_entries(&StorePages(&self.store), &self.root, 0, page).map_err(io::Error::other)?;
            self.page = Some((page, entries));
        }
        let entries = self.page.as_ref().map(|(_, e)| e.as_slice()).unwrap_or(&[]);
        entries.get((index % FANOUT as u64) as usize).copied().ok_or_else(|| io::Error::other("block outside the map"))
    }
}

impl BlockSource for StoreBlocks {
    fn read_block(&mut self, index: u64) -> io::Result<Vec<u8>> {
        self.read_block_with_id(index).map(|(_, data)| data)
    }
}

impl StoreBlocks {
    /// Block `index` and its leaf id ([`ZERO`] for a block of zeros).
    pub fn read_block_with_id(&mut self, index: u64) -> io::Result<(Digest, Vec<u8>)> {
        let len = self.geometry.block_len(index);
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "block past the end of the disk"));
        }
        let id = self.leaf(index)?;
        if let Some(reads) = &self.reads {
            let mut kept = reads.lock().map_err(|_| io::Error::other("the read log is poisoned"))?;
            if let Some(list) = kept.as_mut() {
                if list.len() >= MAX_READS_KEPT {
                    *kept = None;
                } else if !list.iter().any(|(i, _)| *i == index) {
                    list.push((index, id));
                }
            }
        }
        let mut data =
            if id == ZERO { vec![0u8; len] } else { self.store.read_chunk(&id).map_err(io::Error::other)? };
        // A short stored block (the last one) reads as zeros to the block's length.
        data.resize(len, 0);
        Ok((id, data))
    }
}

/// A disk image in memory (tests, fuzzing).
pub struct MemBlocks {
    image: Arc<[u8]>,
    geometry: Geometry,
}

impl MemBlocks {
    pub fn new(image: Arc<[u8]>, block_size: u32) -> Self {
        let geometry = Geometry { block_size, disk_size: image.len() as u64 };
        Self { image, geometry }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}

impl BlockSource for MemBlocks {
    fn read_block(&mut self, index: u64) -> io::Result<Vec<u8>> {
        let len = self.geometry.block_len(index);
        let start = index.saturating_mul(u64::from(self.geometry.block_size)) as usize;
        self.image
            .get(start..start.saturating_add(len))
            .filter(|_| len > 0)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "block past the end of the disk"))
    }
}

/// The source and cache every slice of one disk shares (one thread: the reader crates are not
/// `Send`). The cache is least-recently-used, found by index in O(1): a directory of many
/// entries is read in many small reads, each of which asks it.
struct Shared {
    source: Box<dyn BlockSource>,
    geometry: Geometry,
    /// block index → (bytes, last use)
    cache: HashMap<u64, (Rc<[u8]>, u64)>,
    /// last use → block index, oldest first
    lru: BTreeMap<u64, u64>,
    clock: u64,
}

impl Shared {
    fn block(&mut self, index: u64) -> io::Result<Rc<[u8]>> {
        self.clock += 1;
        if let Some((data, used)) = self.cache.get_mut(&index) {
            self.lru.remove(used);
            *used = self.clock;
            self.lru.insert(self.clock, index);
            return Ok(data.clone());
        }
        let data: Rc<[u8]> = self.source.read_block(index)?.into();
        if data.len() != self.geometry.block_len(index) {
            return Err(io::Error::other(format!("block {index} arrived with {} bytes", data.len())));
        }
        let keep = (CACHE_BYTES / self.geometry.block_size.max(1) as usize).max(2);
        while self.cache.len() >= keep {
            let Some((_, oldest)) = self.lru.pop_first() else { break };
            self.cache.remove(&oldest);
        }
        self.cache.insert(index, (data.clone(), self.clock));
        self.lru.insert(self.clock, index);
        debug_assert_eq!(self.cache.len(), self.lru.len());
        Ok(data)
    }
}

/// A disk (or a slice of one: a partition), readable and seekable.
pub struct DiskReader {
    shared: Rc<RefCell<Shared>>,
    /// The slice `[start, start + len)` of the disk this reader sees.
    start: u64,
    len: u64,
    pos: u64,
}

impl DiskReader {
    pub fn new(source: Box<dyn BlockSource>, geometry: Geometry) -> Self {
        let shared =
            Rc::new(RefCell::new(Shared { source, geometry, cache: HashMap::new(), lru: BTreeMap::new(), clock: 0 }));
        Self { shared, start: 0, len: geometry.disk_size, pos: 0 }
    }

    /// A reader of `[start, start + len)` of this slice (clipped to it); shares the cache.
    pub fn slice(&self, start: u64, len: u64) -> Self {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        Self { shared: self.shared.clone(), start: self.start + start, len, pos: 0 }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where this slice starts on the disk.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Reads exactly `dst.len()` bytes at `offset` of the slice.
    pub fn read_at(&mut self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        if offset.checked_add(dst.len() as u64).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk"));
        }
        let mut shared = self.shared.borrow_mut();
        let bs = u64::from(shared.geometry.block_size.max(1));
        let mut done = 0;
        while done < dst.len() {
            let abs = self.start + offset + done as u64;
            let block = shared.block(abs / bs)?;
            let within = (abs % bs) as usize;
            let n = block.len().saturating_sub(within).min(dst.len() - done);
            if n == 0 {
                return Err(io::Error::other("short block"));
            }
            dst[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

impl Read for DiskReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DiskReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// Recovery points are immutable: every write fails (file system crates that want a
/// writable device get this).
impl Write for DiskReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "a recovery point is read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for DiskReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.read_at(start_byte, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_their_range_across_blocks_and_refuse_past_the_end() {
        let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let src = MemBlocks::new(image.clone().into(), 1024);
        let g = src.geometry();
        assert_eq!(g.blocks(), 10);
        assert_eq!(g.block_len(9), 10_000 - 9 * 1024);
        let disk = DiskReader::new(Box::new(src), g);
        let mut part = disk.slice(1000, 5000);
        let mut buf = vec![0u8; 3000];
        part.read_at(500, &mut buf).unwrap();
        assert_eq!(buf, image[1500..4500]);
        assert!(part.read_at(4000, &mut buf).is_err());
        let mut inner = part.slice(4000, 10_000);
        assert_eq!(inner.len(), 1000);
        let mut all = vec![];
        inner.read_to_end(&mut all).unwrap();
        assert_eq!(all, image[5000..6000]);
    }
}
