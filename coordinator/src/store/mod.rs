//! The replica store: chunks in append-only packs, indexed in the catalog, and Merkle block
//! maps whose roots are the replicas and recovery points. No network code; callers run it on
//! blocking threads (it does synchronous file I/O).
//!
//! Invariants, and how they are kept:
//! - **A committed recovery point reads back exactly what was ingested for it.** Chunks are
//!   verified against their id on insert ([`Ingest::put_block`]) and on every read; a commit
//!   fsyncs the packs it depends on before the catalog transaction that records their durable
//!   lengths together with the new roots ([`Store::commit_recovery_point`]).
//! - **A crash leaves a store that opens.** At open, pack bytes past their recorded durable
//!   length (a crash mid-ingest or mid-GC) are cut off with their index entries; packs the
//!   catalog does not know are removed ([`Store::open`]).
//! - **GC never deletes a chunk a commit is about to reference**: every chunk an in-flight job
//!   writes or dedups against is pinned ([`Ingest`]), GC keeps pinned chunks, and it decides and
//!   rewrites each pack under the store's exclusive gate, which dedup checks take shared
//!   ([`gc`]).
//!
//! - **An encrypted store opens only with its own key** ([`key`]): without it, or with
//!   another, it reads nothing.
//!
//! Modules in reading order: [`chunk`] (codec), [`key`] (the store key), [`pack`] (file
//! format), this file (ingest, read, commit, prune), [`pages`] (block-map pages and page
//! deltas), [`verify`], [`gc`].

pub mod chunk;
pub mod gc;
pub mod key;
pub mod pack;
pub mod pages;
pub mod readahead;
pub mod verify;

use crate::catalog::{Catalog, CatalogError, Commit, RecoveryPointRecord, ReplicaRecord, RpDisk};
use crate::config::DataDir;
use bulwark_protocol::block::Digest;
use bulwark_protocol::blockmap::{self, BlockMapError, PageStore, ZERO};
use bulwark_protocol::messages::Consistency;
use chunk::ChunkCodec;
use pack::{Location, PackWriter, RecordHeader};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// Store settings; memory use is bounded by these, not by the size of what is stored.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// A pack is closed when the next record would take it past this size.
    pub pack_max_bytes: u64,
    /// zstd level.
    pub zstd_level: i32,
    /// GC rewrites a pack whose live fraction (by bytes) is below this.
    pub gc_compact_below: f64,
    /// Size of GC's mark filter (a Bloom filter of live chunk ids); more chunks than
    /// bytes × 8 / 16 only make GC keep a little more garbage, never lose data.
    pub gc_filter_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { pack_max_bytes: 256 << 20, zstd_level: 1, gc_compact_below: 0.5, gc_filter_bytes: 64 << 20 }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("the store is full: no space left on the device ({path})")]
    NoSpace { path: PathBuf },
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("chunk {} does not match its digest: it hashes to {}", hex(claimed), hex(actual))]
    DigestMismatch { claimed: Digest, actual: Digest },
    #[error("chunk {} is not in the store", hex(id))]
    ChunkMissing { id: Digest },
    #[error("chunk {} is corrupt (pack {pack}, offset {offset}): {reason}", hex(id))]
    ChunkCorrupt { id: Digest, pack: u32, offset: u64, reason: String },
    #[error("chunk of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("chunk codec: {0}")]
    Codec(String),
    #[error("block map: {0}")]
    BlockMap(String),
    #[error(transparent)]
    Key(#[from] key::KeyError),
}

/// Lowercase hex of an id.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            StoreError::NoSpace { path: path.to_owned() }
        } else {
            StoreError::Io { path: path.to_owned(), source }
        }
    }
}

fn map_blockmap(e: BlockMapError<StoreError>) -> StoreError {
    match e {
        BlockMapError::Store(e) => e,
        other => StoreError::BlockMap(other.to_string()),
    }
}

type Pin = Mutex<HashSet<Digest>>;

/// The store.
pub struct Store {
    packs_dir: PathBuf,
    catalog: Catalog,
    codec: ChunkCodec,
    config: StoreConfig,
    writer: Mutex<PackWriter>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// Shared by dedup checks, exclusive while GC decides and rewrites a pack.
    gate: RwLock<()>,
    pins: Mutex<Vec<Weak<Pin>>>,
    /// While a GC runs: the pins of ingests that finished meanwhile.
    gc_keep: Mutex<Option<HashSet<Digest>>>,
    /// Block maps being read outside the catalog's life cycle (a mounted recovery point):
    /// kept by GC while their [`RootHold`] lives, even once their point is pruned.
    held: Mutex<Vec<Weak<bulwark_protocol::blockmap::TreeRoot>>>,
}

/// The most instant recoveries active at once (each is a VM running from the store; the
/// coordinator refuses more).
pub const MAX_ACTIVE_INSTANTS: usize = 256;

/// Keeps a block map's chunks from GC while it lives ([`Store::hold`]).
#[derive(Debug)]
pub struct RootHold(#[allow(dead_code)] Arc<bulwark_protocol::blockmap::TreeRoot>);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("packs", &self.packs_dir).field("codec", &self.codec).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a recovery point is made of, before it is committed.
#[derive(Debug, Clone)]
pub struct NewRecoveryPoint {
    pub vm: String,
    pub consistency: Consistency,
    pub config: Vec<u8>,
    pub disks: Vec<RpDisk>,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// One block as read back.
#[derive(Debug)]
pub enum BlockData<'a> {
    /// `len` zero bytes (never stored).
    Zero(usize),
    Data(&'a [u8]),
}

impl Store {
    /// Opens the store of `dir` with the key its configuration names ([`key::locate`]),
    /// repairing what a crash may have left.
    pub fn open(dir: &DataDir, catalog: Catalog, config: StoreConfig) -> Result<Store, StoreError> {
        let (key_path, key) = key::locate(dir)?;
        Self::open_with_key(dir, &key_path, key, catalog, config)
    }

    /// Opens the store of `dir` with `key` (read from `key_path`, named in errors). A store
    /// whose catalog knows another key, or that is encrypted while `key` is None, is refused.
    pub fn open_with_key(
        dir: &DataDir,
        key_path: &Path,
        key: Option<key::StoreKey>,
        catalog: Catalog,
        config: StoreConfig,
    ) -> Result<Store, StoreError> {
        // Before anything is repaired, read or written.
        key::check(&catalog, key_path, key.as_ref())?;
        let packs_dir = dir.packs();
        std::fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        let known = recover_packs(&packs_dir, &catalog)?;
        let (current, len) = match known.iter().max_by_key(|(id, _)| *id) {
            Some(&(id, len)) if len < config.pack_max_bytes => (id, len),
            Some(&(id, _)) => (id + 1, 0),
            None => (1, 0),
        };
        let writer = PackWriter::open(&packs_dir, current, len, config.pack_max_bytes).map_err(io_err(&packs_dir))?;
        let store = Store {
            packs_dir,
            catalog,
            codec: ChunkCodec::new(key, config.zstd_level),
            config,
            writer: Mutex::new(writer),
            readers: Mutex::new(HashMap::new()),
            gate: RwLock::new(()),
            pins: Mutex::new(Vec::new()),
            gc_keep: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        };
        key::bind(&store, key_path, key.as_ref())?;
        Ok(store)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn codec(&self) -> &ChunkCodec {
        &self.codec
    }

    pub fn packs_dir(&self) -> &Path {
        &self.packs_dir
    }

    /// Starts an ingest: everything it writes or dedups against is pinned until it is dropped.
    pub fn begin(&self) -> Ingest<'_> {
        let pin = Arc::new(Mutex::new(HashSet::new()));
        let mut pins = lock(&self.pins);
        pins.retain(|w| w.strong_count() > 0);
        pins.push(Arc::downgrade(&pin));
        Ingest {
            store: self,
            pin,
            new_bytes: 0,
            new_chunks: 0,
            dedup_chunks: 0,
            healed: vec![],
            page_depths: Mutex::new(HashMap::new()),
        }
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>, StoreError> {
        let mut readers = lock(&self.readers);
        if let Some(f) = readers.get(&pack) {
            return Ok(f.clone());
        }
        let path = pack::pack_path(&self.packs_dir, pack);
        let f = Arc::new(File::open(&path).map_err(io_err(&path))?);
        readers.insert(pack, f.clone());
        Ok(f)
    }

    fn forget_reader(&self, pack: u32) {
        lock(&self.readers).remove(&pack);
    }

    /// The plain bytes of a chunk, checked against its id. Never wrong bytes: a damaged chunk
    /// is a [`StoreError::ChunkCorrupt`].
    pub fn read_chunk(&self, id: &Digest) -> Result<Vec<u8>, StoreError> {
        let loc = self.catalog.chunk(id)?.ok_or(StoreError::ChunkMissing { id: *id })?;
        self.read_at(id, &loc)
    }

    fn read_at(&self, id: &Digest, loc: &Location) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: String| StoreError::ChunkCorrupt { id: *id, pack: loc.pack, offset: loc.offset, reason };
        let (header, payload) = self.read_record(id, loc)?;
        if header.flags & chunk::FLAG_DELTA != 0 {
            return self.read_page(id).map(|(page, _)| page);
        }
        self.codec.decode_owned(id, header.flags, header.plain_len, payload).map_err(corrupt)
    }

    /// The raw record of `id` at `loc` (header checked, payload not yet opened).
    fn read_record(&self, id: &Digest, loc: &Location) -> Result<(RecordHeader, Vec<u8>), StoreError> {
        let corrupt = |reason: String| StoreError::ChunkCorrupt { id: *id, pack: loc.pack, offset: loc.offset, reason };
        let file = self.reader(loc.pack)?;
        let (header, payload) = pack::read_record(&file, loc).map_err(corrupt)?;
        if header.id != *id {
            return Err(corrupt(format!("the record there is chunk {}", hex(&header.id))));
        }
        Ok((header, payload))
    }

    /// Streams a disk of a recovery point (or replica) block by block, in order (read ahead on
    /// every core: [`Store::read_leaves`]).
    pub fn read_disk(
        &self,
        disk: &RpDisk,
        mut sink: impl FnMut(u64, BlockData<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let bs = u64::from(disk.block_size);
        self.read_leaves(disk, readahead::ReadAhead::for_machine(), |_| true, |index, _, b| sink(index * bs, b))
    }

    /// BLAKE3 of a disk's full image (zeros included), streamed.
    pub fn disk_digest(&self, disk: &RpDisk) -> Result<Digest, StoreError> {
        let mut h = blake3::Hasher::new();
        let zeros = vec![0u8; disk.block_size as usize];
        self.read_disk(disk, |_, b| {
            match b {
                BlockData::Zero(n) => h.update(&zeros[..n]),
                BlockData::Data(d) => h.update(d),
            };
            Ok(())
        })?;
        Ok(*h.finalize().as_bytes())
    }

    fn sync_packs(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        lock(&self.writer).sync().map_err(io_err(&self.packs_dir))
    }

    /// Commits a recovery point and the replicas it updates, atomically and durably. The
    /// ingest that wrote its chunks is consumed (its pins are released after the commit).
    pub fn commit_recovery_point(
        &self,
        ingest: Ingest<'_>,
        rp: NewRecoveryPoint,
        replicas: Vec<ReplicaRecord>,
    ) -> Result<RecoveryPointRecord, StoreError> {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let record = RecoveryPointRecord {
            id,
            vm: rp.vm,
            created_at: rp.created_at,
            consistency: rp.consistency,
            config: rp.config,
            logical_bytes: rp.disks.iter().map(|d| d.size_bytes).sum(),
            disks: rp.disks,
            stored_bytes: ingest.new_bytes,
        };
        let packs = self.sync_packs()?;
        let commit = Commit {
            packs,
            replicas,
            recovery_point: Some(record.clone()),
            healed: ingest.healed.clone(),
            ..Commit::default()
        };
        self.catalog.commit(&commit)?;
        drop(ingest);
        Ok(record)
    }

    /// Commits replica updates without a recovery point (a synchronization).
    pub fn commit_replicas(&self, ingest: Ingest<'_>, replicas: Vec<ReplicaRecord>) -> Result<(), StoreError> {
        let packs = self.sync_packs()?;
        self.catalog.commit(&Commit { packs, replicas, healed: ingest.healed.clone(), ..Commit::default() })?;
        Ok(())
    }

    /// Drops the recovery points of `vm` older than `retention` (always keeping the newest).
    pub fn prune(&self, vm: &str, retention_ms: u64, now_ms: u64) -> Result<Vec<RecoveryPointRecord>, StoreError> {
        let rps = self.catalog.recovery_points(vm)?;
        let drop: Vec<RecoveryPointRecord> = prunable(&rps, retention_ms, now_ms).into_iter().cloned().collect();
        if !drop.is_empty() {
            self.catalog.commit(&Commit { drop_recovery_points: drop.clone(), ..Commit::default() })?;
        }
        Ok(drop)
    }

    /// Every block-map root the store must keep: every recovery point's disks, every
    /// replica, every active instant recovery's disks and every held root.
    pub fn roots(&self) -> Result<Vec<bulwark_protocol::blockmap::TreeRoot>, StoreError> {
        let mut roots: Vec<_> =
            self.catalog.all_recovery_points()?.into_iter().flat_map(|rp| rp.disks).map(|d| d.root).collect();
        roots.extend(self.catalog.replicas()?.into_iter().filter_map(|r| r.root));
        // All of them, whatever the cap: a root left out here would lose its chunks.
        roots.extend(self.catalog.active_instants(usize::MAX)?.into_iter().flat_map(|i| i.disks).map(|d| d.root));
        let mut held = lock(&self.held);
        held.retain(|w| w.strong_count() > 0);
        roots.extend(held.iter().filter_map(Weak::upgrade).map(|r| *r));
        Ok(roots)
    }

    /// Keeps `root`'s chunks from GC until the hold is dropped. Taken before the caller checks
    /// that the root is still the catalog's: a GC that read the roots before the hold and
    /// after a prune is then seen as the point being gone.
    pub fn hold(&self, root: bulwark_protocol::blockmap::TreeRoot) -> RootHold {
        let hold = Arc::new(root);
        lock(&self.held).push(Arc::downgrade(&hold));
        RootHold(hold)
    }

    fn pinned(&self, id: &Digest) -> bool {
        if lock(&self.gc_keep).as_ref().is_some_and(|k| k.contains(id)) {
            return true;
        }
        lock(&self.pins).iter().filter_map(Weak::upgrade).any(|p| lock(&p).contains(id))
    }
}

/// The recovery points past the retention range, oldest first; the newest is always kept.
pub fn prunable(rps: &[RecoveryPointRecord], retention_ms: u64, now_ms: u64) -> Vec<&RecoveryPointRecord> {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let newest = rps.iter().map(|r| r.created_at).max();
    rps.iter().filter(|r| r.created_at < cutoff && Some(r.created_at) != newest).collect()
}

/// Read-only page access for walking trees.
pub struct StorePages<'a>(pub &'a Store);

impl PageStore for StorePages<'_> {
    type Error = StoreError;
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, StoreError> {
        self.0.read_page(id).map(|(page, _)| page)
    }
    fn save_page(&mut self, _: &[u8], _: Option<(&Digest, &[u8])>) -> Result<Digest, StoreError> {
        Err(StoreError::BlockMap("read-only page access".into()))
    }
}

/// An in-flight ingest (one job): writes chunks and pages, pins them until it commits or is
/// dropped.
pub struct Ingest<'s> {
    store: &'s Store,
    pin: Arc<Pin>,
    /// Bytes (records) this ingest added to the packs.
    pub new_bytes: u64,
    pub new_chunks: u64,
    pub dedup_chunks: u64,
    healed: Vec<Digest>,
    /// Delta depth of pages this ingest loaded or wrote.
    page_depths: Mutex<HashMap<Digest, u8>>,
}

impl std::fmt::Debug for Ingest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("new_chunks", &self.new_chunks)
            .field("dedup_chunks", &self.dedup_chunks)
            .finish()
    }
}

impl Ingest<'_> {
    /// Stores one block that arrived under `claimed`, after checking that it hashes to it;
    /// returns its leaf id ([`ZERO`] for an all-zero block, which is not stored).
    pub fn put_block(&mut self, claimed: &Digest, data: &[u8]) -> Result<Digest, StoreError> {
        if data.len() > chunk::MAX_PLAIN {
            return Err(StoreError::TooLarge { len: data.len(), max: chunk::MAX_PLAIN });
        }
        let id = self.store.codec.hasher.id(data);
        if id == ZERO {
            if *claimed != ZERO && *claimed != self.store.codec.hasher.hash(data) {
                return Err(StoreError::DigestMismatch { claimed: *claimed, actual: ZERO });
            }
            return Ok(ZERO);
        }
        if id != *claimed {
            return Err(StoreError::DigestMismatch { claimed: *claimed, actual: id });
        }
        self.put(id, data)?;
        Ok(id)
    }

    fn put(&mut self, id: Digest, data: &[u8]) -> Result<(), StoreError> {
        self.put_record(id, data, 0, false)
    }

    /// Stores `stored` under `id` unless the store has a good copy already. `flags` may carry
    /// `FLAG_DELTA` (then `stored` is a page delta whose page hashes to `id`).
    fn put_record(&mut self, id: Digest, stored: &[u8], extra_flags: u8, page: bool) -> Result<(), StoreError> {
        // Pin first: from here GC keeps this id, whatever it decided before.
        lock(&self.pin).insert(id);
        // Held until the index entry is written: GC rewrites a pack only while no ingest is
        // between its dedup check and its index insert.
        let _shared = self.store.gate.read().unwrap_or_else(|p| p.into_inner());
        let heal = {
            // A page stored as a delta is only as good as its chain: an unreachable delta may
            // have lost its base to GC, so a page dedups only against a page that reads back.
            let usable = |s: &Store| !page || s.read_page(&id).is_ok();
            match self.store.catalog.chunk(&id)? {
                Some(_) if !self.store.catalog.is_bad(&id)? && usable(self.store) => {
                    self.dedup_chunks += 1;
                    return Ok(());
                }
                Some(_) => true,
                None => false,
            }
        };
        let enc = self.store.codec.encode(&id, stored)?;
        let header = RecordHeader {
            flags: enc.flags | extra_flags,
            payload_len: enc.payload.len() as u32,
            plain_len: enc.plain_len,
            id,
        };
        let loc = lock(&self.store.writer).append(&header, &enc.payload).map_err(io_err(&self.store.packs_dir))?;
        self.store.catalog.put_chunk(&id, &loc)?;
        self.new_bytes += u64::from(loc.len);
        self.new_chunks += 1;
        if heal {
            tracing::info!(chunk = %hex(&id), "a good copy of a bad chunk arrived: healed");
            self.healed.push(id);
        }
        Ok(())
    }

    /// Takes over what `other`, an ingest of the same store (one disk's, received at the same
    /// time as others), wrote and pinned: one commit then covers both. Its pins are taken
    /// before it is dropped, so what it wrote is never unpinned in between.
    pub fn absorb(&mut self, mut other: Ingest<'_>) {
        assert!(std::ptr::eq(self.store, other.store), "an ingest absorbs only one of its own store");
        lock(&self.pin).extend(lock(&other.pin).iter().copied());
        lock(&self.page_depths).extend(std::mem::take(&mut *lock(&other.page_depths)));
        self.new_bytes += other.new_bytes;
        self.new_chunks += other.new_chunks;
        self.dedup_chunks += other.dedup_chunks;
        self.healed.append(&mut other.healed);
    }

    /// Applies `changes` (sorted `(block, leaf id)`) to a disk's tree; returns the new root.
    pub fn update_tree(
        &mut self,
        old: Option<&bulwark_protocol::blockmap::TreeRoot>,
        blocks: u64,
        changes: impl IntoIterator<Item = (u64, Digest)>,
    ) -> Result<bulwark_protocol::blockmap::TreeRoot, StoreError> {
        blockmap::update(self, old, blocks, changes).map_err(map_blockmap)
    }
}

impl Drop for Ingest<'_> {
    fn drop(&mut self) {
        // A GC that marked before this ingest committed must still keep what it pinned.
        if let Some(keep) = lock(&self.store.gc_keep).as_mut() {
            keep.extend(lock(&self.pin).iter().copied());
        }
    }
}

impl PageStore for Ingest<'_> {
    type Error = StoreError;
    fn load_page(&self, id: &Digest) -> Result<Vec<u8>, StoreError> {
        lock(&self.pin).insert(*id);
        let (page, depth) = self.store.read_page(id)?;
        lock(&self.page_depths).insert(*id, depth);
        Ok(page)
    }
    fn save_page(&mut self, bytes: &[u8], replaces: Option<(&Digest, &[u8])>) -> Result<Digest, StoreError> {
        let id = self.store.codec.hasher.hash(bytes);
        let delta = replaces.and_then(|(old, old_bytes)| {
            let depth = lock(&self.page_depths).get(old).copied()?;
            pages::diff(old_bytes, bytes, depth, old).map(|d| (d, depth + 1, *old))
        });
        match delta {
            Some((d, depth, base)) => {
                // The base must outlive this page: pin it with the page.
                lock(&self.pin).insert(base);
                self.put_record(id, &d, chunk::FLAG_DELTA, true)?;
                lock(&self.page_depths).insert(id, depth);
            }
            None => {
                self.put_record(id, bytes, 0, true)?;
                lock(&self.page_depths).insert(id, 0);
            }
        }
        Ok(id)
    }
}

/// Cuts what a crash left past each pack's durable length and removes packs the catalog never
/// committed. Returns the known packs and their lengths.
fn recover_packs(dir: &Path, catalog: &Catalog) -> Result<Vec<(u32, u64)>, StoreError> {
    let known: HashMap<u32, u64> = catalog.packs()?.into_iter().collect();
    let mut cut: HashMap<u32, u64> = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = pack::pack_id(&name) else {
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        };
        let len = entry.metadata().map_err(io_err(&entry.path()))?.len();
        match known.get(&id) {
            Some(&durable) if len > durable => {
                tracing::warn!(pack = id, durable, len, "cutting an uncommitted tail left by a crash");
                cut.insert(id, durable);
            }
            Some(&durable) if len < durable => {
                tracing::error!(
                    pack = id,
                    durable,
                    len,
                    "pack is shorter than its committed length: data lost; run verify"
                );
            }
            Some(_) => {}
            None => {
                tracing::warn!(pack = id, "removing a pack no commit refers to (left by a crash)");
                cut.insert(id, 0);
            }
        }
    }
    if !cut.is_empty() {
        let stale: Vec<Digest> = catalog
            .chunk_entries()
            .filter_map(|e| match e {
                Ok((id, loc)) => cut.get(&loc.pack).filter(|&&end| loc.offset >= end).map(|_| Ok(id)),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        for id in &stale {
            catalog.remove_chunk(id)?;
        }
        catalog.flush_durable()?;
        for (&id, &end) in &cut {
            let path = pack::pack_path(dir, id);
            if end == 0 {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                f.set_len(end).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
        }
        bulwark_pki::files::sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(known.into_iter().collect())
}
