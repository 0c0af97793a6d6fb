//! A disk of a recovery point read from the coordinator on demand, as an NBD
//! [`bulwark_nbd::Export`]: what `bulwark mount` serves on the console's machine and what an
//! agent serves to the QEMU of an instant recovery.
//!
//! The coordinator answers [`MountRead`]s in order on one stream ([`Link`]); blocks land in a
//! bounded cache ([`CACHE_BYTES`]) that the export's reads wait on. A read that follows the
//! previous one asks for the next [`READ_AHEAD_BYTES`] too, so a sequential copy streams. An
//! [`Overlay`] keeps writes: an unlinked file (mode 0600) of the disk's size and a bitmap of the
//! blocks written; the recovery point itself never changes.

use bulwark_protocol::messages::{MountRead, MAX_MOUNT_READ_BYTES};
use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use crate::job::{StreamRecv, StreamSend};

/// Blocks kept on this side, in bytes (at least a few blocks whatever their size).
pub const CACHE_BYTES: u64 = 64 << 20;
/// How far a sequential reader is read ahead of.
pub const READ_AHEAD_BYTES: u64 = 16 << 20;
/// Rounds a read may wait for blocks that were dropped from the cache before it copied them.
const MAX_ROUNDS: usize = 16;

/// One block as cached.
#[derive(Debug, Clone)]
enum Cached {
    Zero,
    Data(Arc<Vec<u8>>),
}

#[derive(Debug, Default)]
struct Cache {
    blocks: HashMap<u64, Cached>,
    order: VecDeque<u64>,
    bytes: u64,
    pending: HashSet<u64>,
    /// The link is gone for good: every read fails with this.
    failed: Option<String>,
    /// The link broke and is being opened again: reads wait.
    down: Option<String>,
    /// Counts the links opened: a read asks again for what it waits for on a new one.
    generation: u64,
}

impl Cache {
    fn insert(&mut self, index: u64, block: Cached, block_size: u64, limit: u64) {
        self.pending.remove(&index);
        if let Cached::Data(d) = &block {
            self.bytes += d.len() as u64;
        }
        match self.blocks.insert(index, block) {
            None => self.order.push_back(index),
            // A block that came twice: the first copy's bytes are gone.
            Some(Cached::Data(old)) => self.bytes -= old.len() as u64,
            Some(Cached::Zero) => {}
        }
        // Zero blocks cost a slot, not bytes: they are bounded by count.
        let max_blocks = (limit / block_size.max(1)).max(4) as usize * 4;
        while self.bytes > limit.max(4 * block_size) || self.blocks.len() > max_blocks {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(Cached::Data(d)) = self.blocks.remove(&old) {
                self.bytes -= d.len() as u64;
            }
        }
    }
}

/// Opens a new stream to the coordinator, already announced (an agent: an `Export` stream on
/// its current connection), for a link whose stream broke.
pub type Reopen = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(StreamSend, StreamRecv), String>> + Send>>
        + Send
        + Sync,
>;

/// The longest wait between two attempts to open a broken link again.
const REOPEN_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

struct Shared {
    cache: Mutex<Cache>,
    arrived: tokio::sync::Notify,
    /// None while the link is down.
    send: tokio::sync::Mutex<Option<StreamSend>>,
    block_size: u32,
    blocks: u64,
    /// The link's reader and reopener tasks, stopped when the link is dropped.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Streams opened in a row that broke at once, before a single frame came: the coordinator
    /// refuses this export (its instant recovery is over), and after [`MAX_BARREN`] the link
    /// fails (reads answer EIO).
    barren: std::sync::atomic::AtomicU32,
}

/// Streams in a row that may break before their first frame before the link gives up.
const MAX_BARREN: u32 = 8;
/// A stream that breaks this soon after it was opened, with no frame, counts as refused.
const REFUSED_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl Shared {
    fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    fn fail(&self, why: String) {
        lock(&self.cache).failed = Some(why);
        self.arrived.notify_waiters();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        lock(&self.shared.tasks).iter().for_each(|t| t.abort());
    }
}

/// The coordinator's side of a mount: requests go out on `send`, a task fills the cache. With
/// a [`Reopen`], a broken stream is opened again (reads wait meanwhile, never fail); without,
/// a broken stream fails every read from then on.
pub struct Link {
    shared: Arc<Shared>,
    block_size: u32,
    size: u64,
    /// The block after the last one read: a read starting there is sequential.
    next: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a stream ended: why, whether any frame came, whether opening it again cannot help.
struct Ended {
    why: String,
    frames: bool,
    permanent: bool,
}

/// Reads frames into the cache until the stream ends.
async fn read_frames(shared: &Shared, mut recv: StreamRecv) -> Ended {
    let bs = u64::from(shared.block_size);
    let mut frames = false;
    loop {
        let frame = match transfer::read(&mut recv, shared.block_size as usize).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ended { why: "the coordinator ended the stream".into(), frames, permanent: false },
            Err(e) => {
                return Ended { why: format!("the connection to the coordinator broke: {e}"), frames, permanent: false }
            }
        };
        let (index, block) = match frame {
            TransferFrame::Block { index, data, .. } if index < shared.blocks => (index, Cached::Data(Arc::new(data))),
            TransferFrame::Zero { index } if index < shared.blocks => (index, Cached::Zero),
            // A damaged chunk stays damaged: reads fail (EIO) rather than wait for ever.
            TransferFrame::Message(TransferMessage::Failed { reason }) => {
                let why = format!("the coordinator could not read the recovery point: {reason}");
                return Ended { why, frames, permanent: true };
            }
            other => {
                let why = format!("unexpected frame from the coordinator: {other:?}");
                return Ended { why, frames, permanent: true };
            }
        };
        frames = true;
        lock(&shared.cache).insert(index, block, bs, CACHE_BYTES);
        shared.arrived.notify_waiters();
    }
}

/// Fills the cache from `recv`; when it ends, fails the link, or (with `reopen`) marks it down
/// and opens it again, as often as it takes.
fn spawn_reader(shared: Arc<Shared>, recv: StreamRecv, reopen: Option<Reopen>) {
    let s = shared.clone();
    let task = tokio::spawn(async move {
        let shared = s;
        let opened = std::time::Instant::now();
        let ended = read_frames(&shared, recv).await;
        let Some(reopen) = reopen.filter(|_| !ended.permanent) else {
            tracing::warn!(reason = %ended.why, "the link to the coordinator ended");
            return shared.fail(ended.why);
        };
        use std::sync::atomic::Ordering;
        // A refused stream is reset at once; an idle one that broke later was not refused.
        let barren = if ended.frames || opened.elapsed() > REFUSED_WITHIN {
            shared.barren.store(0, Ordering::Relaxed);
            0
        } else {
            shared.barren.fetch_add(1, Ordering::Relaxed) + 1
        };
        if barren >= MAX_BARREN {
            let why =
                format!("the coordinator refuses this export ({barren} streams in a row broke at once): {}", ended.why);
            tracing::warn!(reason = %why, "the link to the coordinator gave up");
            return shared.fail(why);
        }
        tracing::warn!(reason = %ended.why, "the link to the coordinator broke: reads wait until it is back");
        *shared.send.lock().await = None;
        {
            let mut c = lock(&shared.cache);
            c.down = Some(ended.why);
            // What was asked on the broken stream will never come.
            c.pending.clear();
        }
        shared.arrived.notify_waiters();
        spawn_reopener(shared, reopen, barren);
    });
    shared.track(task);
}

/// Opens a link that is down, as often as it takes (backing off to [`REOPEN_MAX_DELAY`], from
/// further along after streams that broke at once).
fn spawn_reopener(shared: Arc<Shared>, reopen: Reopen, barren: u32) {
    let s = shared.clone();
    let task = tokio::spawn(async move {
        let shared = s;
        let mut delay = (std::time::Duration::from_millis(250) * 2u32.pow(barren.min(5))).min(REOPEN_MAX_DELAY);
        loop {
            tokio::time::sleep(delay).await;
            match reopen().await {
                Ok((send, recv)) => {
                    *shared.send.lock().await = Some(send);
                    {
                        let mut c = lock(&shared.cache);
                        c.down = None;
                        c.generation += 1;
                    }
                    tracing::info!("the link to the coordinator is back");
                    shared.arrived.notify_waiters();
                    return spawn_reader(shared, recv, Some(reopen));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the link to the coordinator is still down");
                    delay = (delay * 2).min(REOPEN_MAX_DELAY);
                }
            }
        }
    });
    shared.track(task);
}

impl Link {
    /// A link over `send`/`recv`, on which the coordinator serves a disk of `size` bytes in
    /// blocks of `block_size`; `reopen` opens it again when it breaks.
    pub fn new(
        send: StreamSend,
        recv: StreamRecv,
        size: u64,
        block_size: u32,
        reopen: Option<Reopen>,
    ) -> io::Result<Self> {
        bulwark_protocol::block::check_block_size(block_size as usize)
            .map_err(|e| io::Error::other(format!("the coordinator's block size: {e}")))?;
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache::default()),
            arrived: tokio::sync::Notify::new(),
            send: tokio::sync::Mutex::new(Some(send)),
            block_size,
            blocks: size.div_ceil(u64::from(block_size)),
            tasks: Mutex::new(vec![]),
            barren: Default::default(),
        });
        spawn_reader(shared.clone(), recv, reopen);
        Ok(Self { shared, block_size, size, next: Mutex::new(0) })
    }

    /// A link not open yet: `reopen` opens it as soon as it can (reads wait until then).
    pub fn opening(size: u64, block_size: u32, reopen: Reopen) -> io::Result<Self> {
        bulwark_protocol::block::check_block_size(block_size as usize)
            .map_err(|e| io::Error::other(format!("the block size: {e}")))?;
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache { down: Some("not connected yet".into()), ..Cache::default() }),
            arrived: tokio::sync::Notify::new(),
            send: tokio::sync::Mutex::new(None),
            block_size,
            blocks: size.div_ceil(u64::from(block_size)),
            tasks: Mutex::new(vec![]),
            barren: Default::default(),
        });
        spawn_reopener(shared.clone(), reopen, 0);
        Ok(Self { shared, block_size, size, next: Mutex::new(0) })
    }

    fn blocks(&self) -> u64 {
        self.shared.blocks
    }

    /// Asks for every block of `first..end` neither cached nor asked for already. While the
    /// link is down nothing is asked (the reads ask again once it is back).
    async fn want(&self, first: u64, end: u64) -> io::Result<()> {
        let per = (MAX_MOUNT_READ_BYTES / u64::from(self.block_size)).max(1);
        let mut runs: Vec<MountRead> = vec![];
        let mut send = self.shared.send.lock().await;
        {
            let mut c = lock(&self.shared.cache);
            if send.is_none() || c.down.is_some() {
                return Ok(());
            }
            for i in first..end.min(self.blocks()) {
                if c.blocks.contains_key(&i) || !c.pending.insert(i) {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.first + u64::from(r.count) == i && u64::from(r.count) < per => r.count += 1,
                    _ => runs.push(MountRead { first: i, count: 1 }),
                }
            }
        }
        let Some(s) = send.as_mut() else { return Ok(()) };
        for r in &runs {
            if let Err(e) = bulwark_protocol::frame::write_message(&mut *s, r).await {
                // The link is down from now: reads wait (the reader sees the stream end too,
                // and fails the link or opens it again).
                tracing::debug!(error = %e, "a request to the coordinator was not sent");
                *send = None;
                lock(&self.shared.cache).down = Some(format!("a request could not be sent: {e}"));
                return Ok(());
            }
        }
        Ok(())
    }

    /// Blocks `first..end`, waiting for them to arrive (for as long as the link is down).
    async fn blocks_of(&self, first: u64, end: u64) -> io::Result<Vec<Cached>> {
        let bs = u64::from(self.block_size);
        let sequential = {
            let mut next = lock(&self.next);
            let s = *next == first;
            *next = end;
            s
        };
        let ahead = if sequential { READ_AHEAD_BYTES / bs } else { 0 };
        let mut generation = lock(&self.shared.cache).generation;
        let mut rounds = 0;
        loop {
            self.want(first, end + ahead).await?;
            loop {
                let arrived = self.shared.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                {
                    let c = lock(&self.shared.cache);
                    if let Some(why) = &c.failed {
                        return Err(io::Error::other(why.clone()));
                    }
                    let got: Vec<_> = (first..end).map_while(|i| c.blocks.get(&i).cloned()).collect();
                    if got.len() as u64 == end - first {
                        return Ok(got);
                    }
                    if c.down.is_none() {
                        if c.generation != generation {
                            // A new link: ask again for everything missing.
                            generation = c.generation;
                            rounds = 0;
                            break;
                        }
                        // A block neither here nor on its way was dropped before it was
                        // copied: ask again, a bounded number of times.
                        if (first..end).any(|i| !c.blocks.contains_key(&i) && !c.pending.contains(&i)) {
                            rounds += 1;
                            if rounds >= MAX_ROUNDS {
                                return Err(io::Error::other(
                                    "the cache is too small for this read: blocks were dropped before they were used",
                                ));
                            }
                            break;
                        }
                    }
                }
                arrived.await;
            }
        }
    }

    /// Bytes `offset..offset + len` of the recovery point.
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let bs = u64::from(self.block_size);
        let end = offset + u64::from(len);
        let (first, last) = (offset / bs, end.div_ceil(bs));
        let blocks = self.blocks_of(first, last).await?;
        let mut out = vec![0u8; len as usize];
        for (k, b) in blocks.iter().enumerate() {
            let start = (first + k as u64) * bs;
            let (from, to) = (offset.max(start), end.min(start + bs));
            if let Cached::Data(d) = b {
                let (a, z) = ((from - start) as usize, (to - start) as usize);
                let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
                // The last stored block may be shorter than its place: the rest reads as zero.
                let src = d.get(a..z.min(d.len())).unwrap_or_default();
                dst[..src.len()].copy_from_slice(src);
            }
        }
        Ok(out)
    }
}

/// Writes kept beside the recovery point for as long as the mount lives.
pub struct Overlay {
    file: std::fs::File,
    written: Mutex<Vec<u64>>,
    /// Writes one at a time: a partial block's read-modify-write must not lose another
    /// client's write to the same block.
    writing: tokio::sync::Mutex<()>,
}

impl Overlay {
    /// An unlinked file of `size` bytes (sparse) in `dir`.
    pub fn create(dir: &Path, size: u64, block_size: u32) -> io::Result<Self> {
        let what =
            |e: io::Error| io::Error::new(e.kind(), format!("cannot create the overlay in {}: {e}", dir.display()));
        let file = tempfile::tempfile_in(dir).map_err(what)?;
        file.set_len(size).map_err(what)?;
        let blocks = size.div_ceil(u64::from(block_size));
        Ok(Self {
            file,
            written: Mutex::new(vec![0u64; blocks.div_ceil(64) as usize]),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    fn has(&self, index: u64) -> bool {
        lock(&self.written).get((index / 64) as usize).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    fn mark(&self, index: u64) {
        if let Some(w) = lock(&self.written).get_mut((index / 64) as usize) {
            *w |= 1 << (index % 64);
        }
    }
}

/// A disk of a recovery point: read from the coordinator, and written into the overlay when
/// there is one.
pub struct RemoteDisk {
    link: Link,
    overlay: Option<Overlay>,
}

impl RemoteDisk {
    pub fn new(link: Link, overlay: Option<Overlay>) -> Self {
        Self { link, overlay }
    }

    fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let bs = u64::from(self.link.block_size);
        (offset / bs, (offset + len).div_ceil(bs))
    }
}

impl bulwark_nbd::Export for RemoteDisk {
    fn size(&self) -> u64 {
        self.link.size
    }

    fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    fn preferred_block(&self) -> u32 {
        self.link.block_size.min(bulwark_nbd::wire::MAX_REQUEST_LEN)
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let Some(overlay) = &self.overlay else { return self.link.read(offset, len).await };
        let bs = u64::from(self.link.block_size);
        let (first, last) = self.block_range(offset, u64::from(len));
        if !(first..last).any(|i| overlay.has(i)) {
            return self.link.read(offset, len).await;
        }
        // Block by block: written ones from the overlay, the rest from the recovery point.
        let mut out = Vec::with_capacity(len as usize);
        let end = offset + u64::from(len);
        for i in first..last {
            let (from, to) = (offset.max(i * bs), end.min((i + 1) * bs));
            if overlay.has(i) {
                let mut part = vec![0u8; (to - from) as usize];
                overlay.file.read_exact_at(&mut part, from)?;
                out.extend_from_slice(&part);
            } else {
                out.extend_from_slice(&self.link.read(from, (to - from) as u32).await?);
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let Some(overlay) = &self.overlay else {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        };
        let _one_at_a_time = overlay.writing.lock().await;
        let bs = u64::from(self.link.block_size);
        let end = offset + data.len() as u64;
        let (first, last) = self.block_range(offset, data.len() as u64);
        for i in first..last {
            let start = i * bs;
            let block_end = ((i + 1) * bs).min(self.link.size);
            let (from, to) = (offset.max(start), end.min(block_end));
            if !overlay.has(i) && (from > start || to < block_end) {
                // A partial write of a block not yet in the overlay: the block's other bytes
                // come from the recovery point first.
                let whole = self.link.read(start, (block_end - start) as u32).await?;
                overlay.file.write_all_at(&whole, start)?;
            }
            overlay.file.write_all_at(&data[(from - offset) as usize..(to - offset) as usize], from)?;
            overlay.mark(i);
        }
        Ok(())
    }

    /// The overlay is thrown away when the mount ends: nothing is promised beyond it.
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The agent's connection to the coordinator now (replaced at each new session): where an
/// instant recovery's broken link opens its stream again.
pub type CurrentConnection = Arc<Mutex<Option<quinn::Connection>>>;

/// A [`Reopen`] for disk `disk` of instant recovery `job`: an `Export` stream on the agent's
/// current connection.
pub fn reopen_export(current: CurrentConnection, job: u64, disk: String, block_size: u32, blocks: u64) -> Reopen {
    Arc::new(move || {
        let (current, disk) = (current.clone(), disk.clone());
        Box::pin(async move {
            let conn = lock(&current).clone().ok_or_else(|| "not connected to the coordinator".to_owned())?;
            let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let mut send: StreamSend = Box::new(send);
            let open = TransferMessage::Open { job, disk, block_size, blocks, mode: transfer::TransferMode::Export };
            transfer::write_message(&mut send, &open, block_size as usize).await.map_err(|e| e.to_string())?;
            Ok((send, Box::new(recv) as StreamRecv))
        })
    })
}

/// Serves `disk` of instant recovery `job` on its socket: from `stream` when one is open
/// already, else from a link that opens once the agent is connected; either opens again
/// whenever it breaks. A socket left by an earlier run of the agent (a socket, nothing else)
/// is replaced.
pub fn serve_instant_disk(
    current: &CurrentConnection,
    job: u64,
    block_size: u32,
    disk: &crate::backend::InstantDisk,
    stream: Option<(StreamSend, StreamRecv)>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::FileTypeExt as _;
    let blocks = disk.size_bytes.div_ceil(u64::from(block_size));
    let reopen = reopen_export(current.clone(), job, disk.name.clone(), block_size, blocks);
    let link = match stream {
        Some((send, recv)) => Link::new(send, recv, disk.size_bytes, block_size, Some(reopen))?,
        None => Link::opening(disk.size_bytes, block_size, reopen)?,
    };
    if std::fs::symlink_metadata(&disk.socket).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&disk.socket)?;
    }
    let listener = bind_private(&disk.socket)?;
    tracing::info!(disk = %disk.name, socket = %disk.socket.display(), "serving an instant recovery's disk");
    Ok(tokio::spawn(serve_unix(listener, Arc::new(RemoteDisk::new(link, None)), disk.name.clone())))
}

/// The instant recoveries this agent serves, by VM: each disk's export task. They outlive the
/// job that started them and end with `recover-finish` or the agent.
#[derive(Clone, Default)]
pub struct InstantExports(Arc<Mutex<HashMap<String, Vec<tokio::task::JoinHandle<()>>>>>);

impl InstantExports {
    /// Keeps `tasks` as `vm`'s exports (ending any it had).
    pub fn insert(&self, vm: &str, tasks: Vec<tokio::task::JoinHandle<()>>) {
        if let Some(old) = lock(&self.0).insert(vm.to_owned(), tasks) {
            old.iter().for_each(|t| t.abort());
        }
    }

    /// Adds `task` to `vm`'s exports.
    pub fn add(&self, vm: &str, task: tokio::task::JoinHandle<()>) {
        lock(&self.0).entry(vm.to_owned()).or_default().push(task);
    }

    /// Ends `vm`'s exports; answers whether it had any.
    pub fn remove(&self, vm: &str) -> bool {
        match lock(&self.0).remove(vm) {
            Some(tasks) => {
                tasks.iter().for_each(|t| t.abort());
                true
            }
            None => false,
        }
    }
}

/// Binds a Unix socket only its owner may connect to (a recovery point's bytes are behind it);
/// an existing path is never replaced.
pub fn bind_private(path: &Path) -> io::Result<tokio::net::UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", path.display())));
    }
    // The socket is created with the process's umask: made private before anyone can connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old);
    bound.map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))
}

/// Serves `export` on `listener` until the task is aborted; each client on a task of its own.
pub async fn serve_unix(listener: tokio::net::UnixListener, export: Arc<RemoteDisk>, name: String) {
    let policy = bulwark_nbd::Policy { name, tls_offered: false, tls_required: false };
    loop {
        let mut s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an NBD client");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let (export, policy) = (export.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(e) = bulwark_nbd::serve(&mut s, &*export, &policy).await {
                tracing::warn!(error = %e, "an NBD client was dropped");
            }
        });
    }
}
