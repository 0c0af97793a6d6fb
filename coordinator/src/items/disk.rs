//! Random access to a disk of a recovery point, straight from the store: a byte offset maps to
//! a block, the block to its leaf in the block map (one leaf page of ids cached), the leaf to
//! its chunk (one block cached). Memory: one page and one block, whatever the disk size.

use crate::store::{Store, StorePages};
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap::{self, TreeRoot, FANOUT};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

/// A disk (or a slice of one: a partition) of a recovery point, readable and seekable.
pub struct DiskReader {
    store: Arc<Store>,
    root: TreeRoot,
    block_size: u64,
    disk_size: u64,
    /// The slice `[start, start + len)` of the disk this reader sees.
    start: u64,
    len: u64,
    pos: u64,
    page: Option<(u64, Vec<Digest>)>,
    block: Option<(u64, Vec<u8>)>,
}

impl DiskReader {
    pub fn new(store: Arc<Store>, root: TreeRoot, block_size: u32, disk_size: u64) -> Self {
        Self {
            store,
            root,
            block_size: u64::from(block_size),
            disk_size,
            start: 0,
            len: disk_size,
            pos: 0,
            page: None,
            block: None,
        }
    }

    /// A reader of `[start, start + len)` of the same disk (clipped to the disk).
    pub fn slice(&self, start: u64, len: u64) -> Self {
        let start = start.min(self.disk_size);
        let len = len.min(self.disk_size - start);
        Self::new(self.store.clone(), self.root, self.block_size as u32, self.disk_size).with_range(start, len)
    }

    fn with_range(mut self, start: u64, len: u64) -> Self {
        self.start = start;
        self.len = len;
        self
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    fn block(&mut self, index: u64) -> io::Result<&[u8]> {
        if self.block.as_ref().is_none_or(|(b, _)| *b != index) {
            let id = self.leaf(index)?;
            let len = self.block_size.min(self.disk_size.saturating_sub(index * self.block_size)) as usize;
            let data =
                if id == ZERO { vec![0u8; len] } else { self.store.read_chunk(&id).map_err(io::Error::other)? };
            self.block = Some((index, data));
        }
        Ok(self.block.as_ref().map(|(_, d)| d.as_slice()).unwrap_or(&[]))
    }

    /// Reads exactly `dst.len()` bytes at `offset` of the slice.
    pub fn read_at(&mut self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        if offset.checked_add(dst.len() as u64).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk"));
        }
        let mut done = 0;
        while done < dst.len() {
            let abs = self.start + offset + done as u64;
            let index = abs / self.block_size;
            let within = (abs % self.block_size) as usize;
            let block = self.block(index)?;
            let n = (block.len().saturating_sub(within)).min(dst.len() - done);
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
