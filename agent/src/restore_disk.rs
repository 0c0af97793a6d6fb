//! The agent's side of one disk's restore stream as a plain machine: after the agent has sent
//! the root of the disk as it is now, the coordinator asks for pages of that tree and sends the
//! blocks that differ, in order; each block is checked (its id, its place: inside the disk,
//! after the previous one) before it may be written, and `End` must count what arrived. The
//! agent's task (`job::restore_disk`) reads the frames off the wire and performs the steps on
//! the hypervisor; the simulation hands the frames over and performs them on the sim.

use bulwark_protocol::block::{ChunkHasher, Digest};
use bulwark_protocol::transfer::{TransferFrame, TransferMessage};

/// What a frame asks of the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Answer these nodes of the tree the agent sent (`(level, index)`).
    AnswerPages(Vec<(u8, u64)>),
    /// Write this block at this offset of the disk, once [`Unchecked::check`] passed.
    Write { offset: u64, block: Unchecked },
    /// The coordinator sent everything it said it would: the disk is restored.
    Done,
}

/// A block in its place whose bytes are not yet checked against their id: the bytes are only
/// to be had through [`Unchecked::check`], so the check (a hash of the whole block) can run
/// on the thread that writes, beside the one that reads the stream, and cannot be skipped.
#[derive(Debug, Clone)]
pub struct Unchecked {
    index: u64,
    data: Vec<u8>,
    /// The id the coordinator sent (`None`: a zero block, made here).
    id: Option<Digest>,
    hasher: ChunkHasher,
}

/// Blocks are alike when they are the same bytes named by the same id for the same place.
impl PartialEq for Unchecked {
    fn eq(&self, other: &Self) -> bool {
        (self.index, &self.id, &self.data) == (other.index, &other.id, &other.data)
    }
}

impl Eq for Unchecked {}

impl Unchecked {
    /// The block's length.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the block is empty (never, for a block in a disk).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes, when they are the block the coordinator named.
    pub fn check(self) -> Result<Vec<u8>, String> {
        match self.id {
            Some(id) if self.hasher.id(&self.data) != id => Err(format!("block {} does not match its id", self.index)),
            _ => Ok(self.data),
        }
    }
}

/// One disk being restored.
#[derive(Debug)]
pub struct DiskRestore {
    size: u64,
    block_size: u64,
    blocks: u64,
    hasher: ChunkHasher,
    last: Option<u64>,
    received: u64,
    written: u64,
}

impl DiskRestore {
    /// A disk of `size` bytes in blocks of `block_size` (checked by the caller), whose blocks'
    /// ids come from `hasher`.
    pub fn new(size: u64, block_size: u64, hasher: ChunkHasher) -> Self {
        let blocks = size.div_ceil(block_size.max(1));
        Self { size, block_size, blocks, hasher, last: None, received: 0, written: 0 }
    }

    /// Blocks received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes to be written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// One frame from the coordinator: what to do, or why the restore must stop.
    pub fn frame(&mut self, frame: TransferFrame) -> Result<Step, String> {
        let (index, data) = match frame {
            TransferFrame::Message(TransferMessage::WantPages { nodes }) => return Ok(Step::AnswerPages(nodes)),
            TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) if blocks_sent == self.received => {
                return Ok(Step::Done)
            }
            TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) => {
                return Err(format!("the coordinator says it sent {blocks_sent} blocks, {} arrived", self.received))
            }
            TransferFrame::Message(TransferMessage::Failed { reason }) => {
                return Err(format!("the coordinator stopped the restore: {reason}"))
            }
            TransferFrame::Block { index, id, data } => {
                (index, Unchecked { index, data, id: Some(id), hasher: self.hasher.clone() })
            }
            TransferFrame::Zero { index } => {
                let len = self.block_size.min(self.size.saturating_sub(index.saturating_mul(self.block_size)));
                (index, Unchecked { index, data: vec![0u8; len as usize], id: None, hasher: self.hasher.clone() })
            }
            other => return Err(format!("unexpected frame in a restore: {other:?}")),
        };
        let offset = index
            .checked_mul(self.block_size)
            .filter(|o| o.checked_add(data.len() as u64).is_some_and(|end| end <= self.size));
        let Some(offset) = offset.filter(|_| index < self.blocks && self.last.is_none_or(|l| index > l)) else {
            return Err(format!("block {index} is out of order or outside the disk"));
        };
        self.last = Some(index);
        self.received += 1;
        self.written += data.len() as u64;
        Ok(Step::Write { offset, block: data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u64, data: Vec<u8>) -> TransferFrame {
        TransferFrame::Block { index, id: ChunkHasher::plain().id(&data), data }
    }

    /// What a step writes, checked.
    fn written(step: Result<Step, String>) -> Result<(u64, Vec<u8>), String> {
        match step? {
            Step::Write { offset, block } => Ok((offset, block.check()?)),
            other => Err(format!("not a write: {other:?}")),
        }
    }

    #[test]
    fn blocks_in_order_are_written_and_end_counts_them() {
        let mut r = DiskRestore::new(10_000, 4096, ChunkHasher::plain());
        let nodes = vec![(0, 0)];
        assert_eq!(
            r.frame(TransferFrame::Message(TransferMessage::WantPages { nodes: nodes.clone() })),
            Ok(Step::AnswerPages(nodes))
        );
        assert_eq!(written(r.frame(block(0, vec![1; 4096]))), Ok((0, vec![1; 4096])));
        // The last block is short; a zero block is as long as its place.
        assert_eq!(written(r.frame(TransferFrame::Zero { index: 2 })), Ok((8192, vec![0; 1808])));
        let end = |n| TransferFrame::Message(TransferMessage::End { blocks_sent: n, bytes_read: 0 });
        assert!(r.frame(end(3)).is_err(), "a count that does not match ends the restore");
        let mut r = DiskRestore::new(10_000, 4096, ChunkHasher::plain());
        r.frame(block(1, vec![2; 4096])).unwrap();
        assert_eq!(r.frame(end(1)), Ok(Step::Done));
        assert_eq!((r.received(), r.written()), (1, 4096));
    }

    #[test]
    fn hostile_frames_stop_the_restore_and_write_nothing() {
        let mut r = DiskRestore::new(10_000, 4096, ChunkHasher::plain());
        // A forged block: its bytes are never handed out.
        let forged = TransferFrame::Block { index: 0, id: [7; 32], data: vec![1; 4096] };
        assert!(written(r.frame(forged)).unwrap_err().contains("does not match its id"));
        r.frame(block(1, vec![1; 4096])).unwrap();
        for bad in [block(1, vec![3; 4096]), block(0, vec![3; 4096]), block(3, vec![3; 4096]), block(2, vec![3; 4096])]
        {
            // Twice, backwards, past the end, longer than the disk's last block.
            assert!(r.frame(bad).unwrap_err().contains("out of order or outside"));
        }
        assert!(r.frame(TransferFrame::Zero { index: u64::MAX }).is_err(), "no overflow");
        let failed = TransferFrame::Message(TransferMessage::Failed { reason: "gone".into() });
        assert!(r.frame(failed).unwrap_err().contains("gone"));
        assert_eq!(r.received(), 2);
    }
}
