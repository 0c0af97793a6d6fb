//! The pipe between the coordinator and its items worker (version 1). Both directions carry
//! frames: `len: u32 LE` (of what follows), `kind: u8`, then the body. `len` is at most
//! [`MAX_FRAME`]; a larger one ends the exchange. Bodies of structured kinds are one message of
//! the workspace codec (bounded like every decode); block and file bytes travel raw.
//!
//! | kind | direction | body |
//! |---|---|---|
//! | 1 `REQUEST` | coordinator → worker | [`Request`] |
//! | 2 `BLOCK` | coordinator → worker | the block's bytes |
//! | 3 `BLOCK_ERROR` | coordinator → worker | why the block could not be read (UTF-8) |
//! | 10 `READ_BLOCK` | worker → coordinator | block index, u64 LE |
//! | 11 `REPLY` | worker → coordinator | [`Reply`] |
//! | 12 `DATA` | worker → coordinator | file bytes (at most [`super::ITEM_CHUNK`]) |

use super::disk::Geometry;
use super::{Item, ItemsError};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The largest frame: a block of the largest block size plus room for a header.
pub const MAX_FRAME: usize = bulwark_protocol::block::MAX_BLOCK_SIZE + 4096;

pub const REQUEST: u8 = 1;
pub const BLOCK: u8 = 2;
pub const BLOCK_ERROR: u8 = 3;
pub const READ_BLOCK: u8 = 10;
pub const REPLY: u8 = 11;
pub const DATA: u8 = 12;

/// What the worker is asked to do, with the limits it puts on itself before reading any byte
/// of the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub geometry: Geometry,
    pub op: Op,
    /// Address-space limit, bytes.
    pub memory_bytes: u64,
    /// CPU-time limit, seconds.
    pub cpu_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// The block ranges of swap partitions.
    Swap,
    /// A page of the listing at `path`: entries whose raw name sorts after `after`, at most
    /// `limit` of them.
    List { path: String, after: Option<Vec<u8>>, limit: u32 },
    /// Walk `paths` and send every entry and every file's bytes.
    Copy { paths: Vec<String> },
}

/// What the worker answers (besides raw data and block requests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// One listed entry.
    Item(Item),
    /// The end of a listing page: the cursor of the next page, if there is one.
    Next(Option<Vec<u8>>),
    /// A copied entry: its path relative to the destination (raw guest bytes) and what it is;
    /// a file's bytes follow as `DATA` frames.
    Entry {
        rel: Vec<Vec<u8>>,
        item: Item,
    },
    /// An entry that could not be read and was left out; the rest goes on.
    Skipped {
        path: String,
        reason: String,
    },
    /// Swap block ranges `[first, end)`.
    Swap(Vec<(u64, u64)>),
    Done,
    /// The request failed: the worker's reason, as the coordinator reports it.
    Failed(ItemsError),
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len() + 1)
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&[kind])?;
    w.write_all(body)
}

/// Reads one frame: `None` at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    let mut body = vec![0u8; len - 1];
    r.read_exact(&mut body)?;
    Ok(Some((kind[0], body)))
}

/// Reads one frame from an async reader: `None` at a clean end of the stream.
pub async fn read_frame_async(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> io::Result<Option<(u8, Vec<u8>)>> {
    use tokio::io::AsyncReadExt as _;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).await?;
    let mut body = vec![0u8; len - 1];
    r.read_exact(&mut body).await?;
    Ok(Some((kind[0], body)))
}

/// Writes one frame to an async writer.
pub async fn write_frame_async(w: &mut (impl tokio::io::AsyncWrite + Unpin), kind: u8, body: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut head = Vec::with_capacity(5);
    write_frame(&mut head, kind, &[])?;
    let len = u32::try_from(body.len() + 1)
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    head[..4].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(body).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused() {
        let mut buf = vec![];
        write_frame(&mut buf, DATA, b"hello").unwrap();
        write_frame(&mut buf, READ_BLOCK, &7u64.to_le_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((DATA, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((READ_BLOCK, 7u64.to_le_bytes().to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_frame(&mut &huge[..]).is_err());
        assert!(read_frame(&mut &0u32.to_le_bytes()[..]).is_err());
    }
}
