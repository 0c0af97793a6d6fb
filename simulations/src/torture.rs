//! The store torture workload: ingest and commit recovery points (and prune and collect) in a
//! loop, so a test can `kill -9` the process at any moment and check what survives.
//!
//! Every recovery point's disk image is a pure function of `(seed, vm, version)` and the
//! version is written into the recovery point's configuration blob, so whoever opens the
//! store afterwards knows exactly what each recovery point must read back.

use bulwark_coordinator::catalog::{Catalog, ReplicaRecord, ReplicaState, RpDisk};
use bulwark_coordinator::config::DataDir;
use bulwark_coordinator::store::{NewRecoveryPoint, Store, StoreConfig};
use bulwark_protocol::messages::Consistency;
use std::io::Write;
use std::path::Path;

pub const BLOCK: usize = 4096;
pub const BLOCKS: usize = 256;
pub const VMS: u32 = 4;

/// Block `i` of `vm` at `version`: zero for some blocks, otherwise bytes that change every
/// `1 + i % 5` versions.
pub fn block(seed: u64, vm: u32, version: u64, i: usize) -> Vec<u8> {
    let epoch = version / (1 + (i as u64 % 5));
    let key = blake3::hash(
        &[seed.to_le_bytes(), u64::from(vm).to_le_bytes(), epoch.to_le_bytes(), (i as u64).to_le_bytes()].concat(),
    );
    if key.as_bytes()[0].is_multiple_of(6) {
        return vec![0u8; BLOCK];
    }
    let mut out = vec![0u8; BLOCK];
    let mut xof = blake3::Hasher::new_keyed(key.as_bytes()).finalize_xof();
    xof.fill(&mut out);
    out
}

/// BLAKE3 of the whole image.
pub fn image_digest(seed: u64, vm: u32, version: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for i in 0..BLOCKS {
        h.update(&block(seed, vm, version, i));
    }
    *h.finalize().as_bytes()
}

/// The configuration blob of a recovery point: `vm=V version=N`.
pub fn config_blob(vm: u32, version: u64) -> Vec<u8> {
    format!("vm={vm} version={version}").into_bytes()
}

/// Parses a configuration blob.
pub fn parse_config(blob: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(blob).ok()?;
    let mut parts = text.split(' ');
    let vm = parts.next()?.strip_prefix("vm=")?.parse().ok()?;
    let version = parts.next()?.strip_prefix("version=")?.parse().ok()?;
    Some((vm, version))
}

/// Store settings that make packs roll and GC rewrite often.
pub fn config() -> StoreConfig {
    StoreConfig { pack_max_bytes: 96 << 10, gc_filter_bytes: 1 << 20, ..StoreConfig::default() }
}

/// Opens (creating if needed) the store in `dir`.
pub fn open(dir: &Path) -> anyhow::Result<Store> {
    let data = DataDir::new(dir);
    std::fs::create_dir_all(data.packs())?;
    let catalog =
        if data.catalog().exists() { Catalog::open(&data.catalog())? } else { Catalog::create(&data.catalog())? };
    Ok(Store::open(&data, catalog, config())?)
}

/// Runs the workload forever (until killed). `gc`: also prune and collect.
pub fn run(dir: &Path, seed: u64, gc: bool) -> anyhow::Result<()> {
    let store = open(dir)?;
    let mut out = std::io::stdout().lock();
    // The round goes on from where the killed process left it (one per surviving version), so
    // every third commit is followed by a GC however early each process is killed.
    let mut round = 0u64;
    for vm in 0..VMS {
        let latest = store
            .catalog()
            .recovery_points(&format!("vm{vm}"))?
            .into_iter()
            .filter_map(|r| parse_config(&r.config))
            .map(|(_, v)| v + 1)
            .max();
        round += latest.unwrap_or(0);
    }
    loop {
        let vm = (round % u64::from(VMS)) as u32;
        let name = format!("vm{vm}");
        let latest = store
            .catalog()
            .recovery_points(&name)?
            .into_iter()
            .filter_map(|r| parse_config(&r.config))
            .map(|(_, v)| v)
            .max();
        let version = latest.map_or(0, |v| v + 1);
        let replica = store.catalog().replica(&name, "os")?;
        let old_root = replica.as_ref().and_then(|r| r.root).filter(|_| latest.is_some());
        let mut ingest = store.begin();
        let hasher = store.codec().hasher.clone();
        let mut changes = vec![];
        for i in 0..BLOCKS {
            let b = block(seed, vm, version, i);
            if let (Some(prev), Some(_)) = (latest, old_root) {
                if block(seed, vm, prev, i) == b {
                    continue;
                }
            }
            changes.push((i as u64, ingest.put_block(&hasher.id(&b), &b)?));
        }
        let root = ingest.update_tree(old_root.as_ref(), BLOCKS as u64, changes)?;
        let disk = RpDisk { name: "os".into(), size_bytes: (BLOCKS * BLOCK) as u64, block_size: BLOCK as u32, root };
        let replica = ReplicaRecord {
            vm: name.clone(),
            disk: "os".into(),
            size_bytes: disk.size_bytes,
            block_size: BLOCK as u32,
            state: ReplicaState::Consistent,
            root: Some(root),
            change_token: Some(bulwark_protocol::messages::ChangeToken { generation: 0, sequence: version }),
            reason: None,
            updated_at: 0,
            excluded: vec![],
            swap_witness: vec![],
        };
        let created_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        let rp = NewRecoveryPoint {
            vm: name.clone(),
            consistency: Consistency::Crash,
            config: config_blob(vm, version),
            disks: vec![disk],
            created_at,
        };
        let committed = store.commit_recovery_point(ingest, rp, vec![replica])?;
        // Only now, with the commit durable, is it announced.
        writeln!(out, "COMMITTED {vm} {version} {}", bulwark_coordinator::store::hex(&committed.id))?;
        out.flush()?;
        let keep = if gc { 2 } else { 3 };
        let rps = store.catalog().recovery_points(&name)?;
        if rps.len() > keep {
            let cutoff = rps[rps.len() - keep].created_at;
            store.prune(&name, created_at.saturating_sub(cutoff), created_at)?;
        }
        if gc && round % 3 == 2 {
            store.gc()?;
            writeln!(out, "GC")?;
            out.flush()?;
        }
        round += 1;
    }
}
