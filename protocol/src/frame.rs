//! Length-prefixed frames: every message on every stream is `len: u32 big-endian` followed by
//! `len` bytes. The reader checks `len` against the stream's limit *before* allocating, so a
//! header announcing 4 GiB costs nothing but a closed connection.
//!
//! Format version 1 (all streams):
//! ```text
//! offset 0  u32 BE  body length L (1 ≤ L ≤ limit of the stream)
//! offset 4  L bytes body (a codec-encoded message, or a raw block frame)
//! ```

use crate::codec::{self, CodecError, CONTROL_LIMIT};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes announced, over the {limit}-byte limit of this stream")]
    TooLarge { len: u64, limit: usize },
    #[error("empty frame")]
    Empty,
    #[error("stream ended in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A sans-IO frame decoder: feed it bytes as they arrive, take whole frames out.
///
/// Memory is bounded by `limit + HEADER_LEN` plus whatever one `feed` call hands in.
#[derive(Debug)]
pub struct FrameDecoder {
    limit: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(limit: usize) -> Self {
        Self { limit, buf: Vec::new() }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        check_len(len, self.limit)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = match self.buf.first_chunk::<HEADER_LEN>() {
            Some(h) => HEADER_LEN + u32::from_be_bytes(*h) as usize,
            None => HEADER_LEN,
        };
        Err(FrameError::Truncated { got: self.buf.len(), want })
    }
}

fn check_len(len: usize, limit: usize) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > limit {
        return Err(FrameError::TooLarge { len: len as u64, limit });
    }
    Ok(())
}

/// Prefixes `body` with its length.
pub fn encode_frame(body: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    check_len(body.len(), limit)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads one frame body. `Ok(None)` at a clean end of stream (before any header byte).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(len) = read_header(r, limit).await? else { return Ok(None) };
    let mut body = Vec::with_capacity(len);
    read_into(r, &mut body, len, HEADER_LEN).await?;
    Ok(Some(body))
}

/// Reads a frame's length prefix and checks it against `limit`. `Ok(None)` at a clean end of
/// stream. The caller reads the body (see [`read_into`]).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { got, want: HEADER_LEN });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    check_len(len, limit)?;
    Ok(Some(len))
}

/// Appends exactly `n` more bytes of a frame to `out` (no zero-filling first); `before` is how
/// many bytes of the frame came before, for the error.
pub async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
    n: usize,
    before: usize,
) -> Result<(), FrameError> {
    let want = out.len() + n;
    out.reserve_exact(n);
    while out.len() < want {
        let mut limited = (&mut *r).take((want - out.len()) as u64);
        if limited.read_buf(out).await? == 0 {
            return Err(FrameError::Truncated { got: before + out.len(), want: before + want });
        }
    }
    Ok(())
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8], limit: usize) -> Result<(), FrameError> {
    check_len(body.len(), limit)?;
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    Ok(())
}

/// Reads and decodes one control message; `Ok(None)` at a clean end of stream.
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<T>, FrameError> {
    match read_frame(r, CONTROL_LIMIT).await? {
        Some(body) => Ok(Some(codec::decode(&body)?)),
        None => Ok(None),
    }
}

/// Encodes and writes one control message.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = codec::encode(msg)?;
    write_frame(w, &body, CONTROL_LIMIT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_header_announcing_four_gibibytes_is_refused_before_allocation() {
        let mut d = FrameDecoder::new(CONTROL_LIMIT);
        d.feed(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as u64));
    }

    #[tokio::test]
    async fn async_reader_refuses_oversized_and_truncated_frames() {
        let mut huge: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(read_frame(&mut huge, CONTROL_LIMIT).await, Err(FrameError::TooLarge { .. })));
        let mut cut: &[u8] = &[0, 0, 0, 10, 1, 2, 3];
        assert!(matches!(read_frame(&mut cut, CONTROL_LIMIT).await, Err(FrameError::Truncated { got: 7, want: 14 })));
        let mut half_header: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut half_header, CONTROL_LIMIT).await,
            Err(FrameError::Truncated { got: 2, want: 4 })
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty, CONTROL_LIMIT).await, Ok(None)));
    }

    proptest! {
        /// Any split of any sequence of valid frames decodes to the same bodies.
        #[test]
        fn decoder_reassembles_frames_across_arbitrary_splits(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in proptest::collection::vec(0usize..2000, 0..10),
        ) {
            let mut wire = Vec::new();
            for b in &bodies {
                wire.extend(encode_frame(b, 1024).unwrap());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            let mut start = 0;
            for c in cuts {
                d.feed(&wire[start..c]);
                start = c;
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            d.finish().unwrap();
            prop_assert_eq!(got, bodies);
        }

        /// Arbitrary bytes never panic the decoder, never yield a frame over the limit, and
        /// never make it hold more than what was fed.
        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096), limit in 1usize..2048) {
            let mut d = FrameDecoder::new(limit);
            d.feed(&bytes);
            while let Ok(Some(f)) = d.next_frame() {
                prop_assert!(!f.is_empty() && f.len() <= limit);
            }
            prop_assert!(d.buf.len() <= bytes.len());
        }

        /// Arbitrary frame bodies never panic the message decoder.
        #[test]
        fn message_decoder_survives_arbitrary_bodies(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = codec::decode::<crate::messages::AgentMessage>(&bytes);
            let _ = codec::decode::<crate::messages::AdminEnvelope>(&bytes);
            let _ = codec::decode::<crate::messages::EnrollRequest>(&bytes);
        }
    }
}
