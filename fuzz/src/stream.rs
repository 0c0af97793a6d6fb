//! What the fuzz targets share: a reader that hands its bytes out in pieces (as a QUIC stream
//! does), sometimes answering "not yet", and a way to drive the protocol's async readers to the
//! end without a runtime (the reader never waits on anything, so polling again is all it takes).

// A check reports a failure by panicking: that is what libFuzzer and the replaying tests catch.
#![allow(clippy::panic)]

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// A stream over `bytes` that yields at most `piece` bytes per read and is pending every other
/// poll when `stutter` is set: the readers must reassemble headers and bodies across reads.
#[derive(Debug)]
pub struct PieceReader<'a> {
    bytes: &'a [u8],
    piece: usize,
    stutter: bool,
    pending_next: bool,
}

impl<'a> PieceReader<'a> {
    /// `shape`'s low 7 bits give the piece size (0 = everything at once), its high bit stutters.
    pub fn new(bytes: &'a [u8], shape: u8) -> Self {
        let piece = match shape & 0x7f {
            0 => usize::MAX,
            n => n as usize,
        };
        Self { bytes, piece, stutter: shape & 0x80 != 0, pending_next: false }
    }
}

impl AsyncRead for PieceReader<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.stutter {
            self.pending_next = !self.pending_next;
            if self.pending_next {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let n = self.piece.min(self.bytes.len()).min(buf.remaining());
        let (now, later) = self.bytes.split_at(n);
        buf.put_slice(now);
        self.bytes = later;
        Poll::Ready(Ok(()))
    }
}

/// Polls `f` until it is ready. Only for futures over [`PieceReader`]s, which make progress on
/// every second poll at the latest; a future that stays pending that long is a bug.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..10_000_000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("a reader over an in-memory stream never finished");
}
