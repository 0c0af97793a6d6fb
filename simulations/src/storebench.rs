//! Store benchmarks (issue: replica store), each measured in the same run:
//! - **ingest** of random 1 MiB blocks (hash, compression attempt, pack append, index, fsync
//!   at commit) against writing the same bytes to a plain file with one fsync;
//! - **metadata per recovery point** after 1 % random churn on a 100 GiB sparse disk (1 MiB
//!   blocks, half allocated), against the bytes of a full index of that disk;
//! - **dedup** of 10 VMs cloned from one image (colocation);
//! - **GC** of a store holding over a million chunks.
//!
//! Metadata and GC use tiny block payloads: their cost depends on the number of blocks and
//! chunks, not on the bytes in them, and this keeps a 100 GiB geometry runnable here.

use bulwark_coordinator::catalog::{Catalog, RpDisk};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig};
use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::messages::Consistency;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// The figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StoreFigures {
    pub ingest_bytes: u64,
    pub ingest_bps: f64,
    pub plain_write_bps: f64,
    /// ingest_bps / plain_write_bps
    pub ingest_vs_plain_write: f64,
    pub meta_disk_bytes: u64,
    pub meta_blocks: u64,
    pub meta_churn_blocks: u64,
    /// Page and index bytes the churned recovery point added.
    pub meta_bytes_per_rp: u64,
    /// Pages plus index entries of the whole disk: what a full index would write.
    pub full_index_bytes: u64,
    /// meta_bytes_per_rp / full_index_bytes
    pub meta_ratio: f64,
    pub dedup_logical_bytes: u64,
    pub dedup_stored_bytes: u64,
    pub dedup_ratio: f64,
    pub gc_chunks: u64,
    pub gc_seconds: f64,
    pub gc_chunks_dropped: u64,
    pub gc_chunks_moved: u64,
    pub gc_mark_seconds: f64,
    pub gc_scan_seconds: f64,
    pub gc_rewrite_seconds: f64,
    pub gc_peak_rss_bytes: u64,
    /// Resident memory of the whole benchmark process (sled cache included) when GC started.
    pub gc_rss_before_bytes: u64,
}

fn open(dir: &Path, cfg: StoreConfig) -> anyhow::Result<Store> {
    let data = DataDir::new(dir);
    std::fs::create_dir_all(data.packs())?;
    Ok(Store::open(&data, Catalog::create(&data.catalog())?, cfg)?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Ingests `(index, bytes)` blocks onto `old`, commits a recovery point; returns the root and
/// the bytes the ingest added.
fn commit(
    store: &Store,
    vm: &str,
    old: Option<&TreeRoot>,
    blocks: u64,
    bs: u32,
    data: impl Iterator<Item = (u64, Vec<u8>)>,
) -> anyhow::Result<(TreeRoot, u64, u64)> {
    let mut ingest = store.begin();
    let hasher = store.codec().hasher.clone();
    let mut changes = vec![];
    let mut data_bytes = 0u64;
    for (i, b) in data {
        let before = ingest.new_bytes;
        changes.push((i, ingest.put_block(&hasher.id(&b), &b)?));
        data_bytes += ingest.new_bytes - before;
    }
    let root = ingest.update_tree(old, blocks, changes)?;
    let added = ingest.new_bytes;
    let disk = RpDisk { name: "os".into(), size_bytes: blocks * u64::from(bs), block_size: bs, root };
    let rp = NewRecoveryPoint {
        vm: vm.into(),
        consistency: Consistency::Crash,
        config: vec![],
        disks: vec![disk],
        created_at: now_ms(),
    };
    store.commit_recovery_point(ingest, rp, vec![])?;
    Ok((root, added, added - data_bytes))
}

/// Ingest vs plain write of `size` random bytes.
pub fn ingest(dir: &Path, size: u64, f: &mut StoreFigures) -> anyhow::Result<()> {
    let bs = 1usize << 20;
    let blocks = size.div_ceil(bs as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let data: Vec<Vec<u8>> = (0..blocks.min(64))
        .map(|_| {
            let mut b = vec![0u8; bs];
            rng.fill_bytes(&mut b);
            b
        })
        .collect();
    // Distinct blocks without holding the whole disk: a pool of random blocks, each made
    // unique by its index in the first 8 bytes.
    let block = |i: u64| {
        let mut b = data[(i % data.len() as u64) as usize].clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        b
    };
    let plain_path = dir.join("plain.bin");
    let start = Instant::now();
    let mut file = std::fs::File::create(&plain_path)?;
    for i in 0..blocks {
        file.write_all(&block(i))?;
    }
    file.sync_all()?;
    f.plain_write_bps = limits_rate(size, start.elapsed());
    drop(file);
    std::fs::remove_file(&plain_path)?;

    let store = open(&dir.join("ingest"), StoreConfig::default())?;
    let start = Instant::now();
    commit(&store, "vm", None, blocks, bs as u32, (0..blocks).map(|i| (i, block(i))))?;
    f.ingest_bps = limits_rate(size, start.elapsed());
    f.ingest_bytes = size;
    f.ingest_vs_plain_write = f.ingest_bps / f.plain_write_bps.max(1.0);
    Ok(())
}

fn limits_rate(bytes: u64, d: std::time::Duration) -> f64 {
    crate::limits::rate(bytes, d)
}

/// Metadata of a recovery point after 1 % random churn on a 100 GiB sparse disk.
pub fn metadata(dir: &Path, f: &mut StoreFigures) -> anyhow::Result<()> {
    let bs = 1u32 << 20;
    let blocks = (100u64 << 30) / u64::from(bs);
    let store = open(&dir.join("meta"), StoreConfig::default())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let allocated: Vec<u64> = (0..blocks).filter(|_| rng.gen_bool(0.5)).collect();
    let tiny = |i: u64, gen: u64| [i.to_le_bytes(), gen.to_le_bytes()].concat();
    let (root, _, _) = commit(&store, "vm", None, blocks, bs, allocated.iter().map(|&i| (i, tiny(i, 0))))?;
    let mut churn: Vec<u64> = (0..blocks / 100).map(|_| rng.gen_range(0..blocks)).collect();
    churn.sort_unstable();
    churn.dedup();
    let index_before = store.catalog().chunk_count() as u64;
    let (_, _, page_bytes) = commit(&store, "vm", Some(&root), blocks, bs, churn.iter().map(|&i| (i, tiny(i, 1))))?;
    let new_entries = store.catalog().chunk_count() as u64 - index_before;
    let data_entries = churn.len() as u64;
    const INDEX_ENTRY: u64 = 32 + 16;
    // What the churned recovery point added beyond its data: its pages (whole or deltas) and
    // the index entries of those pages; plus the index entries of the new data chunks.
    f.meta_bytes_per_rp = page_bytes + new_entries * INDEX_ENTRY;
    let _ = data_entries;
    // A full index of the disk: every leaf (32 bytes) in pages, plus an index entry per chunk.
    f.full_index_bytes = blocks * 32 + allocated.len() as u64 * INDEX_ENTRY;
    f.meta_ratio = f.meta_bytes_per_rp as f64 / f.full_index_bytes as f64;
    f.meta_disk_bytes = blocks * u64::from(bs);
    f.meta_blocks = blocks;
    f.meta_churn_blocks = churn.len() as u64;
    Ok(())
}

/// Dedup of 10 VMs cloned from one image of `size` bytes.
pub fn dedup(dir: &Path, size: u64, f: &mut StoreFigures) -> anyhow::Result<()> {
    let bs = 1usize << 20;
    let blocks = size.div_ceil(bs as u64);
    let store = open(&dir.join("dedup"), StoreConfig::default())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let image: Vec<Vec<u8>> = (0..blocks)
        .map(|i| {
            let mut b = vec![0u8; bs];
            if i % 4 != 0 {
                rng.fill_bytes(&mut b[..bs / 2]); // half random, half zeros: compressible
            }
            b
        })
        .collect();
    let mut stored = 0;
    for vm in 0..10 {
        let (_, added, _) = commit(
            &store,
            &format!("vm{vm}"),
            None,
            blocks,
            bs as u32,
            image.iter().cloned().enumerate().map(|(i, b)| (i as u64, b)),
        )?;
        stored += added;
    }
    f.dedup_logical_bytes = 10 * blocks * bs as u64;
    f.dedup_stored_bytes = stored;
    f.dedup_ratio = f.dedup_logical_bytes as f64 / stored.max(1) as f64;
    Ok(())
}

/// GC of a store with `chunks` chunks, 60 % of them garbage.
pub fn gc(dir: &Path, chunks: u64, f: &mut StoreFigures) -> anyhow::Result<()> {
    let store = open(&dir.join("gc"), StoreConfig::default())?;
    let vms = 10u64;
    let per_vm = chunks.div_ceil(vms);
    for vm in 0..vms {
        let data = (0..per_vm).map(|i| (i, [vm.to_le_bytes(), i.to_le_bytes(), [7u8; 8]].concat()));
        commit(&store, &format!("vm{vm}"), None, per_vm, 4096, data)?;
    }
    f.gc_chunks = store.catalog().chunk_count() as u64;
    // Drop the recovery points of 6 VMs of 10: 60 % garbage, so packs are rewritten.
    for vm in 0..6 {
        store.prune(&format!("vm{vm}"), 0, u64::MAX)?;
        let rps = store.catalog().recovery_points(&format!("vm{vm}"))?;
        let commit = bulwark_coordinator::catalog::Commit { drop_recovery_points: rps, ..Default::default() };
        store.catalog().commit(&commit)?;
    }
    // Measure GC's own peak memory: reset the process's high-water mark first.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    f.gc_rss_before_bytes = rss();
    let start = Instant::now();
    let report = store.gc()?;
    f.gc_seconds = start.elapsed().as_secs_f64();
    f.gc_chunks_dropped = report.chunks_dropped;
    f.gc_chunks_moved = report.chunks_moved;
    f.gc_mark_seconds = report.mark_seconds;
    f.gc_scan_seconds = report.scan_seconds;
    f.gc_rewrite_seconds = report.rewrite_seconds;
    f.gc_peak_rss_bytes = peak_rss();
    Ok(())
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        })
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| k * 1024)
        .unwrap_or(0)
}

/// Resident memory of this process now.
pub fn rss() -> u64 {
    status_bytes("VmRSS:")
}

/// Peak resident memory of this process.
pub fn peak_rss() -> u64 {
    status_bytes("VmHWM:")
}
