//! The block reader: streams the blocks a job needs out of a held snapshot — only the changed
//! ones for a synchronization or express full, every non-zero one for an initial replica —
//! with each block's id, computed on every core while the next batch is read. Memory is two
//! batches of blocks, whatever the disk size.

use bulwark_protocol::block::{ChunkHasher, Digest, ZERO};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Blocks hashed together (per batch, spread over the cores).
const BATCH: usize = 8;

/// One block read from the snapshot.
#[derive(Debug)]
pub struct ReadBlock<'a> {
    pub index: u64,
    /// [`ZERO`] for an all-zero block (then `data` is empty: nothing to send).
    pub id: Digest,
    pub data: &'a [u8],
}

/// What a read did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    pub blocks: u64,
    pub zero_blocks: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path} at {offset}: {source}")]
    Io { path: String, offset: u64, source: std::io::Error },
    #[error("block size {0} is not a power of two between 4 KiB and 16 MiB")]
    BlockSize(usize),
    #[error("{0}")]
    Sink(String),
}

/// Reads blocks `indices` (increasing) of size `block_size` from `image` of `size` bytes and
/// hands each, in order, to `sink`. A reader thread reads the next batch while the current
/// one is hashed on every core: two batches in flight at most.
pub fn read_blocks(
    image: &Path,
    size: u64,
    block_size: usize,
    indices: impl IntoIterator<Item = u64> + Send,
    hasher: &ChunkHasher,
    sink: impl FnMut(ReadBlock<'_>) -> Result<(), String>,
) -> Result<ReadStats, ReadError> {
    let file =
        File::open(image).map_err(|source| ReadError::Io { path: image.display().to_string(), offset: 0, source })?;
    let path = image.display().to_string();
    // (A block past the file's end is no hole: reading it fails, as a short image must.)
    let file_len = file.metadata().map_err(|source| ReadError::Io { path: path.clone(), offset: 0, source })?.len();
    read_blocks_from(&path, size, block_size, indices, hasher, sink, |buf, offset| {
        // A block inside a hole of a sparse image is zeros: filling the buffer here costs far
        // less than the kernel zero-filling page-cache pages for a read.
        let len = buf.len() as u64;
        if offset.saturating_add(len) <= file_len && in_hole(&file, offset, len) {
            buf.fill(0);
            return Ok(());
        }
        file.read_exact_at(buf, offset)
    })
}

/// Whether `[offset, offset + len)` of `file` lies in a hole (no data up to its end). A file
/// system that cannot tell says data, and the block is read.
fn in_hole(file: &File, offset: u64, len: u64) -> bool {
    use rustix::fs::{seek, SeekFrom};
    match seek(file, SeekFrom::Data(offset)) {
        Ok(data) => data >= offset.saturating_add(len),
        // No data at or after `offset`: the rest of the file is a hole.
        Err(rustix::io::Errno::NXIO) => true,
        Err(_) => false,
    }
}

/// [`read_blocks`] from any source that reads exactly `buf.len()` bytes at an offset (an NBD
/// export, say); `what` names it in errors.
pub fn read_blocks_from(
    what: &str,
    size: u64,
    block_size: usize,
    indices: impl IntoIterator<Item = u64> + Send,
    hasher: &ChunkHasher,
    mut sink: impl FnMut(ReadBlock<'_>) -> Result<(), String>,
    mut read_at: impl FnMut(&mut [u8], u64) -> std::io::Result<()> + Send,
) -> Result<ReadStats, ReadError> {
    bulwark_protocol::block::check_block_size(block_size).map_err(|_| ReadError::BlockSize(block_size))?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(BATCH);
    let bs = block_size as u64;
    let path = what.to_owned();
    // Batches travel reader → hasher in a channel of one; spent buffers come back for reuse.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Batch, ReadError>>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
    for _ in 0..2 {
        let _ = empty_tx.send((0..BATCH).map(|_| vec![0u8; block_size]).collect());
    }
    let mut stats = ReadStats::default();
    std::thread::scope(|s| -> Result<(), ReadError> {
        let reader = s.spawn(move || {
            let mut indices = indices.into_iter().peekable();
            while indices.peek().is_some() {
                let Ok(mut bufs) = empty_rx.recv() else { return };
                let batch: Vec<u64> = indices.by_ref().take(BATCH).filter(|i| i * bs < size).collect();
                let mut lens = Vec::with_capacity(batch.len());
                for (k, &index) in batch.iter().enumerate() {
                    let offset = index * bs;
                    let len = bs.min(size - offset) as usize;
                    if let Err(source) = read_at(&mut bufs[k][..len], offset) {
                        let _ = full_tx.send(Err(ReadError::Io { path: path.clone(), offset, source }));
                        return;
                    }
                    lens.push(len);
                }
                if full_tx.send(Ok(Batch { indices: batch, lens, bufs })).is_err() {
                    return;
                }
            }
        });
        let result = (|| {
            for batch in full_rx.iter() {
                let Batch { indices, lens, bufs } = batch?;
                stats.bytes_read += lens.iter().map(|l| *l as u64).sum::<u64>();
                // Ids on every core.
                let mut ids = vec![ZERO; indices.len()];
                std::thread::scope(|s| {
                    let per = indices.len().div_ceil(threads).max(1);
                    for (ids, (bufs, lens)) in ids.chunks_mut(per).zip(bufs.chunks(per).zip(lens.chunks(per))) {
                        s.spawn(move || {
                            for ((id, buf), len) in ids.iter_mut().zip(bufs).zip(lens) {
                                *id = hasher.id(&buf[..*len]);
                            }
                        });
                    }
                });
                for (k, &index) in indices.iter().enumerate() {
                    stats.blocks += 1;
                    let id = ids[k];
                    let data: &[u8] = if id == ZERO {
                        stats.zero_blocks += 1;
                        &[]
                    } else {
                        &bufs[k][..lens[k]]
                    };
                    sink(ReadBlock { index, id, data }).map_err(ReadError::Sink)?;
                }
                let _ = empty_tx.send(bufs);
            }
            Ok(())
        })();
        // Stop the reader if the sink failed: closing the channels ends its loop.
        drop(full_rx);
        drop(empty_tx);
        let _ = reader.join();
        result
    })?;
    Ok(stats)
}

/// The blocks of `image` (of `size` bytes, in blocks of `block_size`) that hold allocated
/// extents, found with `SEEK_DATA`/`SEEK_HOLE`: what an initial replica reads of a sparse disk.
/// A file system without hole reporting makes every block allocated, which is only slower.
pub fn allocated_blocks(image: &Path, size: u64, block_size: u64) -> Result<Vec<u64>, ReadError> {
    use rustix::fs::{seek, SeekFrom};
    let io = |offset, source| ReadError::Io { path: image.display().to_string(), offset, source };
    let file = File::open(image).map_err(|e| io(0, e))?;
    let mut out: Vec<u64> = vec![];
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(&file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io(pos, e.into())),
        };
        if start >= size {
            break;
        }
        let end = seek(&file, SeekFrom::Hole(start)).map_err(|e| io(start, e.into()))?.min(size);
        let first = start / block_size;
        let last = (end - 1) / block_size;
        let from = out.last().map_or(first, |&l| first.max(l + 1));
        out.extend(from..=last);
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// One batch of blocks read and not yet hashed.
struct Batch {
    indices: Vec<u64>,
    lens: Vec<usize>,
    bufs: Vec<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_blocks_are_the_extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let f = File::create(&path).unwrap();
        let mb = 1u64 << 20;
        f.set_len(64 * mb).unwrap();
        f.write_all_at(&[1u8; 10], 3 * mb + 5).unwrap();
        f.write_all_at(&vec![2u8; (2 * mb) as usize], 10 * mb - 4096).unwrap();
        f.sync_all().unwrap();
        let blocks = allocated_blocks(&path, 64 * mb, mb).unwrap();
        assert_eq!(blocks, vec![3, 9, 10, 11], "the blocks holding data, once each, in order");
    }

    #[test]
    fn a_failing_sink_stops_the_read_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![7u8; 64 * 4096]).unwrap();
        let mut calls = 0;
        let err = read_blocks(&path, 64 * 4096, 4096, 0..64, &ChunkHasher::plain(), |_| {
            calls += 1;
            if calls == 3 {
                Err("the coordinator went away".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, ReadError::Sink(ref m) if m == "the coordinator went away"));
        assert_eq!(calls, 3);
        let short = read_blocks(&path, 128 * 4096, 4096, 100..101, &ChunkHasher::plain(), |_| Ok(()));
        assert!(
            matches!(short, Err(ReadError::Io { .. })),
            "a block past the end of the file is an I/O error, not a hang"
        );
    }

    #[test]
    fn blocks_come_in_order_with_their_ids_and_zero_blocks_carry_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let mut img = vec![0u8; 10 * 4096 + 100];
        for (i, b) in img.iter_mut().enumerate() {
            if (i / 4096) % 3 != 0 {
                *b = (i % 251) as u8;
            }
        }
        std::fs::write(&path, &img).unwrap();
        let h = ChunkHasher::plain();
        let mut seen = vec![];
        let stats = read_blocks(&path, img.len() as u64, 4096, 0..11, &h, |b| {
            let start = b.index as usize * 4096;
            let want = &img[start..(start + 4096).min(img.len())];
            assert_eq!(b.id, h.id(want));
            assert!(b.id == ZERO && b.data.is_empty() || b.data == want);
            seen.push(b.index);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (0..11).collect::<Vec<_>>());
        assert_eq!(stats.bytes_read, img.len() as u64);
        assert_eq!(stats.zero_blocks, 4, "blocks 0, 3, 6 and 9 are zero");
    }

    #[test]
    fn blocks_in_holes_of_a_sparse_image_read_as_zeros_and_data_next_to_a_hole_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let bs = 64 * 1024u64;
        let size = 64 * bs + 123;
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        // Data in block 5 (whole), at the end of block 20 (a hole before it in the block) and in
        // the short last block.
        let write = |at: u64, len: usize, v: u8| f.write_all_at(&vec![v; len], at).unwrap();
        write(5 * bs, bs as usize, 7);
        write(21 * bs - 10, 10, 9);
        write(64 * bs, 123, 3);
        f.sync_all().unwrap();
        let img = std::fs::read(&path).unwrap();
        let h = ChunkHasher::plain();
        let mut data_blocks = vec![];
        read_blocks(&path, size, bs as usize, 0..65, &h, |b| {
            let start = (b.index * bs) as usize;
            let want = &img[start..(start + bs as usize).min(img.len())];
            assert_eq!(b.id, h.id(want), "block {}", b.index);
            if b.id != ZERO {
                assert_eq!(b.data, want);
                data_blocks.push(b.index);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(data_blocks, [5, 20, 64]);
    }
}
