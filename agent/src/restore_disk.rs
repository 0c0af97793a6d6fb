//! The agent's side of one disk's restore stream as a plain machine: after the agent has sent
//! the root of the disk as it is now, the coordinator asks for pages of that tree and sends the
//! blocks that differ, in order; each block is checked (its id, its place: inside the disk,
//! after the previous one) before it may be written, and `End` must count what arrived. The
//! agent's task (`job::restore_disk`) reads the frames off the wire and performs the steps on
//! the hypervisor; the simulation hands the frames over and performs them on the sim.

use bulwark_protocol::block::ChunkHasher;
use bulwark_protocol::transfer::{TransferFrame, TransferMessage};

/// What a frame asks of the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Answer these nodes of the tree the agent sent (`(level, index)`).
    AnswerPages(Vec<(u8, u64)>),
    /// Write these bytes at this offset of the disk.
    Write { offset: u64, data: Vec<u8> },
    /// The coordinator sent everything it said it would: the disk is restored.
    Done,
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
                if self.hasher.id(&data) != id {
                    return Err(format!("block {index} does not match its id"));
                }
                (index, data)
            }
            TransferFrame::Zero { index } => {
                let len = self.block_size.min(self.size.saturating_sub(index.saturating_mul(self.block_size)));
                (index, vec![0u8; len as usize])
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
        Ok(Step::Write { offset, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u64, data: Vec<u8>) -> TransferFrame {
        TransferFrame::Block { index, id: ChunkHasher::plain().id(&data), data }
    }

    #[test]
    fn blocks_in_order_are_written_and_end_counts_them() {
        let mut r = DiskRestore::new(10_000, 4096, ChunkHasher::plain());
        let nodes = vec![(0, 0)];
        assert_eq!(
            r.frame(TransferFrame::Message(TransferMessage::WantPages { nodes: nodes.clone() })),
            Ok(Step::AnswerPages(nodes))
        );
        assert_eq!(r.frame(block(0, vec![1; 4096])), Ok(Step::Write { offset: 0, data: vec![1; 4096] }));
        // The last block is short; a zero block is as long as its place.
        assert_eq!(r.frame(TransferFrame::Zero { index: 2 }), Ok(Step::Write { offset: 8192, data: vec![0; 1808] }));
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
        let forged = TransferFrame::Block { index: 0, id: [7; 32], data: vec![1; 4096] };
        assert!(r.frame(forged).unwrap_err().contains("does not match its id"));
        r.frame(block(1, vec![1; 4096])).unwrap();
        for bad in [block(1, vec![3; 4096]), block(0, vec![3; 4096]), block(3, vec![3; 4096]), block(2, vec![3; 4096])]
        {
            // Twice, backwards, past the end, longer than the disk's last block.
            assert!(r.frame(bad).unwrap_err().contains("out of order or outside"));
        }
        assert!(r.frame(TransferFrame::Zero { index: u64::MAX }).is_err(), "no overflow");
        let failed = TransferFrame::Message(TransferMessage::Failed { reason: "gone".into() });
        assert!(r.frame(failed).unwrap_err().contains("gone"));
        assert_eq!(r.received(), 1);
    }
}
