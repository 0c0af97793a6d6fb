//! Reading a disk's blocks back at the speed of the machine: one thread walks the block map
//! in order, several read, decrypt, decompress and check chunks ahead of the consumer, and the
//! consumer gets the blocks strictly in disk order. At most `ahead` blocks are in flight or
//! waiting to be consumed, whatever the disk's size, so memory is `ahead` blocks.
//!
//! Every path that streams a recovery point's blocks uses it: `recover-disk`, recoveries to
//! the original VM or a new one (the smart restore's differing blocks), and disk digests.

use super::{map_blockmap, BlockData, Store, StoreError, StorePages};
use crate::catalog::RpDisk;
use bulwark_protocol::block::{Digest, ZERO};
use bulwark_protocol::blockmap;
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// How the reading is spread.
#[derive(Debug, Clone, Copy)]
pub struct ReadAhead {
    /// Threads reading chunks.
    pub workers: usize,
    /// Blocks read ahead of the consumer, at most.
    pub ahead: usize,
}

impl ReadAhead {
    /// A thread per core (at least two: one decodes while another waits on the disk), and
    /// four blocks ahead per thread.
    pub fn for_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = cores.clamp(2, 16);
        Self { workers, ahead: workers * 4 }
    }
}

/// One block as it reaches the consumer, or the end of the walk.
enum Read {
    Zero { index: u64, len: usize },
    Data { index: u64, id: Digest, data: Vec<u8> },
    End,
}

type Slot = (u64, Result<Read, StoreError>);

impl Store {
    /// Reads the leaves of `disk` that `wanted` keeps (all of them: `|_| true`), in increasing
    /// order, decoding ahead on `how.workers` threads; `sink` gets each block's index, id and
    /// bytes in order. The first error, in disk order, ends the read.
    pub fn read_leaves(
        &self,
        disk: &RpDisk,
        how: ReadAhead,
        mut wanted: impl FnMut(u64) -> bool + Send,
        mut sink: impl FnMut(u64, &Digest, BlockData<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let bs = u64::from(disk.block_size);
        let workers = how.workers.max(1);
        let ahead = how.ahead.max(workers);
        let len_of = move |index: u64| bs.min(disk.size_bytes.saturating_sub(index.saturating_mul(bs))) as usize;
        // Every channel end is owned by one thread (none is borrowed), so whichever side stops
        // first, the others see a closed channel and stop too.
        std::thread::scope(|s| {
            // Tokens bound what is in flight: the walker takes one per block, the consumer
            // gives it back once the block is consumed.
            let (token_tx, token_rx) = sync_channel::<()>(ahead);
            for _ in 0..ahead {
                // (The channel holds exactly `ahead`.)
                let _ = token_tx.try_send(());
            }
            let (work_tx, work_rx) = sync_channel::<(u64, u64, Digest)>(ahead);
            let (done_tx, done_rx) = sync_channel::<Slot>(ahead);
            let work_rx = Arc::new(Mutex::new(work_rx));
            for _ in 0..workers {
                let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
                s.spawn(move || decode(self, &work_rx, &done_tx, len_of));
            }
            drop(work_rx);
            let walker_done = done_tx;
            s.spawn(move || {
                let mut seq = 0u64;
                let walked = blockmap::for_each_leaf(&StorePages(self), &disk.root, |index, id| {
                    if !wanted(index) {
                        return Ok(());
                    }
                    token_rx.recv().map_err(|_| stopped())?;
                    if id == ZERO {
                        walker_done.send((seq, Ok(Read::Zero { index, len: len_of(index) }))).map_err(|_| stopped())?;
                    } else {
                        work_tx.send((seq, index, id)).map_err(|_| stopped())?;
                    }
                    seq += 1;
                    Ok(())
                });
                // The end of the walk is a slot of its own: an error, or `seq` blocks in all.
                drop(work_tx);
                let end = walked.map_err(map_blockmap).map(|()| Read::End);
                let _ = walker_done.send((seq, end));
            });
            consume(done_rx, token_tx, &mut sink)
        })
    }
}

fn stopped() -> StoreError {
    StoreError::BlockMap("the read was stopped".into())
}

/// A reader thread: chunks in, checked bytes out, until the work runs out or nobody listens.
fn decode(
    store: &Store,
    work: &Mutex<Receiver<(u64, u64, Digest)>>,
    done: &SyncSender<Slot>,
    len_of: impl Fn(u64) -> usize,
) {
    loop {
        let next = work.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        let Ok((seq, index, id)) = next else { return };
        let read = store.read_chunk(&id).and_then(|data| {
            let len = len_of(index);
            if data.len() != len {
                return Err(StoreError::BlockMap(format!("block {index} is {} bytes, expected {len}", data.len())));
            }
            Ok(Read::Data { index, id, data })
        });
        if done.send((seq, read)).is_err() {
            return;
        }
    }
}

/// Hands the blocks to `sink` in walk order, returning a token for each.
fn consume(
    done: Receiver<Slot>,
    tokens: SyncSender<()>,
    sink: &mut impl FnMut(u64, &Digest, BlockData<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut waiting: BTreeMap<u64, Result<Read, StoreError>> = BTreeMap::new();
    let mut next = 0u64;
    loop {
        let read = match waiting.remove(&next) {
            Some(r) => r,
            None => {
                let Ok((seq, r)) = done.recv() else {
                    return Err(StoreError::BlockMap("a reader stopped before the end of the disk".into()));
                };
                if seq != next {
                    // Bounded by the tokens: at most `ahead` slots wait here.
                    waiting.insert(seq, r);
                    continue;
                }
                r
            }
        };
        match read? {
            Read::End => return Ok(()),
            Read::Zero { index, len } => sink(index, &ZERO, BlockData::Zero(len))?,
            Read::Data { index, id, data } => sink(index, &id, BlockData::Data(&data))?,
        }
        next += 1;
        // The walker may be gone (it has walked everything): no token is needed then.
        let _ = tokens.try_send(());
    }
}
