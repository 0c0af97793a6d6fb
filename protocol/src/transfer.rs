//! Transfer streams: how a job's blocks and consistency-check pages travel.
//!
//! For each disk of a job the agent opens one bidirectional stream. Every frame on it
//! ([`crate::frame`]) is a [`TransferFrame`], tagged by its first byte:
//! ```text
//! 0x00  block:   u64 BE index ‖ [u8;32] id ‖ data (1 ..= block_size bytes)
//! 0x01  zero:    u64 BE index          (the block is all zeros now; nothing stored)
//! 0x02  message: a codec-encoded TransferMessage
//! ```
//! Blocks never pass through serde, so a 1 MiB block is not copied to be encoded.
//!
//! Conversations (A = agent, C = coordinator):
//! - **blocks** (initial, sync, express full): A `Open` → A blocks/zeros in increasing index
//!   order → A `End` → C `Stored` (or `Failed` at any point).
//! - **consistency check**: A `Open` → A `Root` (the snapshot's tree) → C `WantPages` ⇄ A `Pages`
//!   (top-down, only mismatching subtrees) → C `WantBlocks` → A blocks/zeros → A `End` → …
//!   → C `Stored`.
//!
//! - **restore** (recovery onto a VM): A `Open` → A `Root` (the VM's current disk) → C
//!   `WantPages` ⇄ A `Pages` → C blocks/zeros that differ from the recovery point → C `End` →
//!   A `Stored` (once written and synced).
//!
//! QUIC flow control is the back-pressure: a slow store stops reading, the agent's writes wait.

use crate::block::{Digest, BLOCK_HEADER_LEN, ZERO};
use crate::blockmap::TreeRoot;
use crate::codec::{self, CONTROL_LIMIT};
use crate::frame::{self, FrameError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

const TAG_BLOCK: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_MESSAGE: u8 = 2;

/// The most pages a [`TransferMessage::Pages`] answer carries (a page is up to 32 KiB).
pub const MAX_PAGES_PER_MESSAGE: usize = 16;
/// The most block indices one [`TransferMessage::WantBlocks`] asks for.
pub const MAX_WANTED_PER_MESSAGE: usize = 16 * 1024;

/// What a transfer stream carries for its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMode {
    /// Blocks that changed (or every allocated one): the coordinator applies them.
    Blocks,
    /// A consistency check: trees are compared first, then only mismatching blocks move.
    Compare,
    /// A recovery: trees are compared first (the agent's is the VM's current disk), then the
    /// coordinator sends the blocks that differ from the recovery point; the agent writes them
    /// and answers `Stored`.
    Restore,
    /// Item-level recovery to a directory of the agent's host: the coordinator sends `Item`s
    /// and their bytes, then `End`; the agent answers `Stored`.
    Items,
    /// An instant recovery's disk, served for as long as the recovered VM depends on it: the
    /// agent sends `MountRead`s as control frames, the coordinator answers each in order with
    /// its blocks (protocol 9).
    Export,
}

/// Control messages on a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMessage {
    /// A: the stream is for `disk` of job `job`.
    Open { job: u64, disk: String, block_size: u32, blocks: u64, mode: TransferMode },
    /// A: every block the stream will carry has been sent.
    End { blocks_sent: u64, bytes_read: u64 },
    /// A: the root of the snapshot's block map (consistency check).
    Root { root: TreeRoot, bytes_read: u64 },
    /// C: the entries of these nodes `(level, index)` of the agent's tree, please.
    WantPages { nodes: Vec<(u8, u64)> },
    /// A: the entries of each node asked for, in order.
    Pages { pages: Vec<Vec<Digest>> },
    /// C: send these blocks (increasing indices); an empty list means nothing more is wanted.
    WantBlocks { indices: Vec<u64> },
    /// C: everything arrived and is written to the store (not yet committed).
    Stored { blocks: u64 },
    /// Item-level recovery: the next entry, at `rel` (raw name components, checked by the
    /// receiver) under the destination; a `file` entry is followed by its bytes as block
    /// frames (index counting from 0, id unused).
    Item { rel: Vec<Vec<u8>>, kind: String, mode: u32, mtime: i64, size: u64, target: Option<Vec<u8>> },
    /// Either side: the transfer cannot go on.
    Failed { reason: String },
}

/// One frame of a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferFrame {
    Block { index: u64, id: Digest, data: Vec<u8> },
    Zero { index: u64 },
    Message(TransferMessage),
}

/// Why a transfer frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("transfer frame of {len} bytes is malformed: {what}")]
    Malformed { len: usize, what: &'static str },
    #[error("unknown transfer frame tag {0}")]
    Tag(u8),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

/// The frame limit of a transfer stream of `block_size` blocks.
pub fn frame_limit(block_size: usize) -> usize {
    (block_size + BLOCK_HEADER_LEN + 1).max(CONTROL_LIMIT + 1)
}

impl TransferFrame {
    /// Parses a frame body received on a stream of `block_size` blocks.
    pub fn parse(body: Vec<u8>, block_size: usize) -> Result<Self, TransferError> {
        let len = body.len();
        let Some((&tag, rest)) = body.split_first() else {
            return Err(TransferError::Malformed { len, what: "empty" });
        };
        match tag {
            TAG_BLOCK => {
                let (Some(index), Some(id)) = (rest.first_chunk::<8>(), rest.get(8..BLOCK_HEADER_LEN)) else {
                    return Err(TransferError::Malformed { len, what: "shorter than a block header" });
                };
                let data = &rest[BLOCK_HEADER_LEN..];
                if data.is_empty() {
                    return Err(TransferError::Malformed { len, what: "a block frame without data" });
                }
                if data.len() > block_size {
                    return Err(TransferError::Malformed { len, what: "more data than the block size" });
                }
                let mut d = ZERO;
                d.copy_from_slice(id);
                Ok(TransferFrame::Block { index: u64::from_be_bytes(*index), id: d, data: data.to_vec() })
            }
            TAG_ZERO => match rest.first_chunk::<8>() {
                Some(index) if rest.len() == 8 => Ok(TransferFrame::Zero { index: u64::from_be_bytes(*index) }),
                _ => Err(TransferError::Malformed { len, what: "a zero frame is 9 bytes" }),
            },
            TAG_MESSAGE => Ok(TransferFrame::Message(codec::decode(rest)?)),
            other => Err(TransferError::Tag(other)),
        }
    }
}

/// Whether a raw name from a guest may be one path component of a restored file: not empty,
/// not `.` or `..`, no `/` and no NUL. Anything else could escape the destination.
pub fn safe_component(c: &[u8]) -> bool {
    !c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/') && !c.contains(&0)
}

/// The body of a block frame (what [`write_block`] sends).
pub fn block_body(index: u64, id: &Digest, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + BLOCK_HEADER_LEN + data.len());
    out.push(TAG_BLOCK);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(data);
    out
}

/// The body of a zero frame.
pub fn zero_body(index: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(TAG_ZERO);
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The body of a message frame.
pub fn message_body(msg: &TransferMessage) -> Result<Vec<u8>, TransferError> {
    let mut out = vec![TAG_MESSAGE];
    out.extend(codec::encode(msg)?);
    Ok(out)
}

/// Reads one transfer frame; `Ok(None)` at a clean end of stream. A block's data is read
/// straight into its own buffer (the bulk of every transfer is not copied again).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, block_size: usize) -> Result<Option<TransferFrame>, TransferError> {
    let Some(len) = frame::read_header(r, frame_limit(block_size)).await? else { return Ok(None) };
    let head_len = len.min(1 + BLOCK_HEADER_LEN);
    let mut head = Vec::with_capacity(head_len);
    // A stream that ends inside the head is short of the whole frame, not just of the head.
    frame::read_into(r, &mut head, head_len, frame::HEADER_LEN).await.map_err(|e| match e {
        FrameError::Truncated { got, .. } => FrameError::Truncated { got, want: frame::HEADER_LEN + len },
        e => e,
    })?;
    if head.len() == 1 + BLOCK_HEADER_LEN && head[0] == TAG_BLOCK && len > head.len() {
        let data_len = len - head.len();
        if data_len > block_size {
            return Err(TransferError::Malformed { len, what: "more data than the block size" });
        }
        let mut data = Vec::with_capacity(data_len);
        frame::read_into(r, &mut data, data_len, frame::HEADER_LEN + head.len()).await?;
        let mut index = [0u8; 8];
        index.copy_from_slice(&head[1..9]);
        let mut id = ZERO;
        id.copy_from_slice(&head[9..]);
        return Ok(Some(TransferFrame::Block { index: u64::from_be_bytes(index), id, data }));
    }
    frame::read_into(r, &mut head, len - head_len, frame::HEADER_LEN).await?;
    Ok(Some(TransferFrame::parse(head, block_size)?))
}

/// Writes a prepared frame body.
pub async fn write_body<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8], block_size: usize) -> Result<(), TransferError> {
    Ok(frame::write_frame(w, body, frame_limit(block_size)).await?)
}

/// Writes one message frame.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &TransferMessage,
    block_size: usize,
) -> Result<(), TransferError> {
    write_body(w, &message_body(msg)?, block_size).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let data = vec![9u8; 4096];
        let id = *blake3::hash(&data).as_bytes();
        let b = TransferFrame::parse(block_body(7, &id, &data), 4096).unwrap();
        assert_eq!(b, TransferFrame::Block { index: 7, id, data: data.clone() });
        assert_eq!(TransferFrame::parse(zero_body(3), 4096).unwrap(), TransferFrame::Zero { index: 3 });
        let m = TransferMessage::WantPages { nodes: vec![(1, 0), (0, 5)] };
        assert_eq!(TransferFrame::parse(message_body(&m).unwrap(), 4096).unwrap(), TransferFrame::Message(m));
    }

    #[test]
    fn malformed_frames_are_refused_with_a_reason() {
        assert!(TransferFrame::parse(vec![], 4096).is_err());
        assert!(matches!(TransferFrame::parse(vec![9, 1, 2], 4096), Err(TransferError::Tag(9))));
        let too_long = block_body(0, &[1; 32], &vec![1u8; 4097]);
        assert!(matches!(TransferFrame::parse(too_long, 4096), Err(TransferError::Malformed { .. })));
        assert!(TransferFrame::parse(block_body(0, &[1; 32], &[]), 4096).is_err());
        assert!(TransferFrame::parse(vec![TAG_ZERO, 0, 0], 4096).is_err());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_allocation() {
        let mut wire: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(read(&mut wire, 4096).await, Err(TransferError::Frame(FrameError::TooLarge { .. }))));
    }

    async fn wire_of(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut wire = vec![];
        for b in bodies {
            write_body(&mut wire, b, 4096).await.unwrap();
        }
        wire
    }

    #[tokio::test]
    async fn read_gives_what_parse_gives_for_every_kind_of_frame() {
        let data = vec![7u8; 4096];
        let id = *blake3::hash(&data).as_bytes();
        let m = TransferMessage::WantBlocks { indices: vec![1, 2, 3] };
        // Short bodies too: a message shorter than a block header, a one-byte block.
        let bodies = vec![
            block_body(5, &id, &data),
            zero_body(9),
            message_body(&m).unwrap(),
            block_body(6, &id, &[1]),
            vec![TAG_MESSAGE],
        ];
        let wire = wire_of(&bodies).await;
        let mut r: &[u8] = &wire;
        for body in &bodies {
            match (TransferFrame::parse(body.clone(), 4096), read(&mut r, 4096).await) {
                (Ok(a), Ok(Some(b))) => assert_eq!(a, b),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                (a, b) => panic!("parse gave {a:?}, read gave {b:?}"),
            }
        }
        assert!(read(&mut r, 4096).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn read_refuses_truncated_and_overlong_block_data() {
        let wire = wire_of(&[block_body(1, &[3; 32], &[5u8; 100])]).await;
        for cut in 1..wire.len() {
            let mut r: &[u8] = &wire[..cut];
            assert!(read(&mut r, 4096).await.is_err(), "cut at {cut}");
        }
        // A block frame with more data than the stream's block size, within the frame limit.
        let wire = wire_of(&[block_body(1, &[3; 32], &[5u8; 100])]).await;
        let mut r: &[u8] = &wire;
        assert!(matches!(read(&mut r, 64).await, Err(TransferError::Malformed { .. })));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TransferFrame::parse(bytes, 128);
        }

        #[test]
        fn read_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut r: &[u8] = &bytes;
            let _ = rt.block_on(read(&mut r, 128));
        }
    }
}
