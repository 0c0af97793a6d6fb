//! Verify: re-read every chunk and check it against its id, then find which recovery points
//! and replicas reach a bad or missing chunk. Replicas that do are marked inconsistent, so the
//! next consistency check re-fetches the blocks from the source; a good copy arriving heals
//! every recovery point that shares the chunk.
//!
//! Chunks are read pack by pack, sequentially. Every index entry is accounted for: per pack the
//! number of index entries is compared with the number of records verified in place, and a pack
//! whose scan could not reach all of them (a damaged record header) is checked entry by entry.

use crate::catalog::{now_secs, BadChunk};
use crate::store::pack::{self, Location, Scanner};
use crate::store::{hex, Store, StoreError, StorePages};
use bulwark_protocol::block::Digest;
use std::collections::{HashMap, HashSet};

/// What verify found.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Chunks whose bytes do not match their id (or cannot be read).
    pub bad: Vec<BadChunk>,
    /// Ids referenced by a block map but absent from the store.
    pub missing: Vec<Digest>,
    /// Recovery points (VM, id) that reach a bad or missing chunk.
    pub affected_recovery_points: Vec<(String, [u8; 16])>,
    /// Replicas (VM, disk) marked inconsistent by this verify.
    pub replicas_marked_inconsistent: Vec<(String, String)>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.missing.is_empty() && self.affected_recovery_points.is_empty()
    }
}

impl Store {
    /// Verifies every chunk and every block map; records bad chunks and marks affected
    /// replicas inconsistent.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let packs: HashMap<u32, u64> = self.catalog.packs()?.into_iter().collect();
        let mut expected: HashMap<u32, u64> = HashMap::new();
        let mut bad: HashMap<Digest, BadChunk> = HashMap::new();
        let mark_bad = |bad: &mut HashMap<Digest, BadChunk>, id: Digest, loc: &Location, reason: String| {
            tracing::error!(chunk = %hex(&id), pack = loc.pack, offset = loc.offset, %reason, "verify: bad chunk");
            bad.insert(id, BadChunk { id, pack: loc.pack, offset: loc.offset, reason, found_at: now_secs() });
        };
        for entry in self.catalog.chunk_entries() {
            let (id, loc) = entry?;
            if packs.contains_key(&loc.pack) {
                *expected.entry(loc.pack).or_default() += 1;
            } else {
                mark_bad(&mut bad, id, &loc, format!("its pack {} does not exist", loc.pack));
            }
        }

        // Pages reachable from a root: a page delta that is not is garbage (its base may be
        // gone already) and is not judged.
        let mut reachable_pages: HashSet<Digest> = HashSet::new();
        for root in self.roots()? {
            let mut visit = |_: u8, id: &Digest, _: &[Digest]| reachable_pages.insert(*id);
            // A page that cannot be loaded is reported below, by the reachability pass.
            let _ = bulwark_protocol::blockmap::walk_pages(&StorePages(self), &root, &mut visit);
        }

        let mut recheck = vec![];
        let mut ids: Vec<_> = packs.iter().map(|(&id, &len)| (id, len)).collect();
        ids.sort_unstable();
        for (pack_id, len) in ids {
            let path = pack::pack_path(&self.packs_dir, pack_id);
            let mut in_place = 0u64;
            let scan = Scanner::open(&path, len, true);
            let mut scanner = match scan {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(pack = pack_id, error = %e, "verify: cannot open pack");
                    None
                }
            };
            while let Some(s) = scanner.as_mut() {
                let rec = match s.next_record() {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(pack = pack_id, error = %e, "verify: pack scan stopped");
                        break;
                    }
                };
                let here = Location {
                    pack: pack_id,
                    offset: rec.offset,
                    len: (pack::RECORD_HEADER_LEN as u32) + rec.header.payload_len,
                };
                if self.catalog.chunk(&rec.header.id)? != Some(here) {
                    continue; // a dead copy: nothing points here
                }
                in_place += 1;
                report.chunks_checked += 1;
                report.bytes_checked += u64::from(here.len);
                let payload = rec.payload.unwrap_or_default();
                let is_delta = rec.header.flags & crate::store::chunk::FLAG_DELTA != 0;
                if is_delta && !reachable_pages.contains(&rec.header.id) {
                    continue;
                }
                let checked = if is_delta {
                    // A page delta is checked by materializing the page it stands for.
                    self.read_page(&rec.header.id).map(|_| ()).map_err(|e| e.to_string())
                } else {
                    self.codec.decode(&rec.header.id, rec.header.flags, rec.header.plain_len, &payload).map(|_| ())
                };
                if let Err(reason) = checked {
                    mark_bad(&mut bad, rec.header.id, &here, reason);
                }
            }
            if in_place != expected.get(&pack_id).copied().unwrap_or(0) {
                recheck.push(pack_id);
            }
        }
        if !recheck.is_empty() {
            // Some index entries point where the scan could not vouch for: check each one.
            for entry in self.catalog.chunk_entries() {
                let (id, loc) = entry?;
                if recheck.contains(&loc.pack) && !bad.contains_key(&id) {
                    report.chunks_checked += 1;
                    if let Err(e) = self.read_at(&id, &loc) {
                        mark_bad(&mut bad, id, &loc, e.to_string());
                    }
                }
            }
        }
        for b in bad.values() {
            self.catalog.mark_bad(b)?;
        }
        // Marks from earlier verifies that no good copy has healed yet still count.
        let mut bad_ids: HashSet<Digest> = bad.keys().copied().collect();
        for b in self.catalog.bad_chunks()? {
            bad_ids.insert(b.id);
            bad.entry(b.id).or_insert(b);
        }
        report.bad = bad.into_values().collect();

        // Which block maps reach a bad or missing chunk?
        let mut memo = HashMap::new();
        let mut missing: HashSet<Digest> = HashSet::new();
        let pages = StorePages(self);
        let mut judge = |id: &Digest| {
            if bad_ids.contains(id) {
                return true;
            }
            match self.catalog.chunk(id) {
                Ok(Some(_)) => false,
                _ => {
                    missing.insert(*id);
                    true
                }
            }
        };
        for rp in self.catalog.all_recovery_points()? {
            if rp.disks.iter().any(|d| bulwark_protocol::blockmap::reaches(&pages, &d.root, &mut memo, &mut judge)) {
                tracing::error!(vm = %rp.vm, rp = %hex(&rp.id), "verify: recovery point reaches a bad or missing chunk");
                report.affected_recovery_points.push((rp.vm.clone(), rp.id));
            }
        }
        for mut replica in self.catalog.replicas()? {
            let Some(root) = replica.root else { continue };
            if bulwark_protocol::blockmap::reaches(&pages, &root, &mut memo, &mut judge) {
                if replica.mark_inconsistent("verify found a bad or missing chunk", now_secs()) {
                    self.catalog.put_replica(&replica)?;
                }
                report.replicas_marked_inconsistent.push((replica.vm, replica.disk));
            }
        }
        report.missing = missing.into_iter().collect();
        self.catalog.flush_durable()?;
        Ok(report)
    }
}

/// What reading one recovery point back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointCheck {
    /// Blocks read back and checked (zeros included).
    pub blocks: u64,
    /// Bytes of data blocks read back.
    pub bytes: u64,
    /// Why the point does not restore as it was made, if it does not.
    pub problem: Option<String>,
    /// Replicas (disk names of the point's VM) marked inconsistent because they share the bad
    /// chunk: their next consistency check fetches it again from the source.
    pub replicas_marked_inconsistent: Vec<String>,
}

impl Store {
    /// Reads every block of `rp` back through the restore path (the read-ahead every restore
    /// uses) and checks it: each data block's bytes must hash to its leaf id — the digest the
    /// agent computed from the snapshot and sent with the block — and each disk must yield
    /// exactly its number of blocks. A bad chunk is recorded (so the next transfer of that
    /// block replaces it) and the VM's replicas that reach it are marked inconsistent.
    /// `Err` only when the verification itself could not run (the catalog failed); anything
    /// wrong with the point's data is a `problem`.
    pub fn verify_recovery_point(
        &self,
        rp: &crate::catalog::RecoveryPointRecord,
        how: super::readahead::ReadAhead,
    ) -> Result<PointCheck, StoreError> {
        let mut check = PointCheck { blocks: 0, bytes: 0, problem: None, replicas_marked_inconsistent: vec![] };
        for disk in &rp.disks {
            let expected = disk.size_bytes.div_ceil(u64::from(disk.block_size.max(1)));
            let mut next = 0u64;
            let (mut blocks, mut bytes) = (0u64, 0u64);
            let read = self.read_leaves(
                disk,
                how,
                |_| true,
                |index, _, data| {
                    if index != next {
                        return Err(StoreError::BlockMap(format!("block {next} is missing from the block map")));
                    }
                    next += 1;
                    blocks += 1;
                    if let super::BlockData::Data(d) = data {
                        bytes += d.len() as u64;
                    }
                    Ok(())
                },
            );
            check.blocks += blocks;
            check.bytes += bytes;
            let problem = match read {
                Ok(()) if blocks == expected => continue,
                Ok(()) => format!("disk {}: {blocks} blocks read back, {expected} expected", disk.name),
                Err(e) => {
                    if let StoreError::ChunkCorrupt { id, pack, offset, reason } = &e {
                        let bad = BadChunk {
                            id: *id,
                            pack: *pack,
                            offset: *offset,
                            reason: reason.clone(),
                            found_at: now_secs(),
                        };
                        self.catalog.mark_bad(&bad)?;
                        check.replicas_marked_inconsistent = self.doubt_replicas_reaching(&rp.vm, id)?;
                    }
                    format!("disk {}: block {next}: {e}", disk.name)
                }
            };
            tracing::error!(vm = %rp.vm, rp = %hex(&rp.id), %problem, "recovery point verification failed");
            check.problem = Some(problem);
            break;
        }
        Ok(check)
    }

    /// Marks the replicas of `vm` whose tree reaches chunk `bad` inconsistent; answers their
    /// disks.
    fn doubt_replicas_reaching(&self, vm: &str, bad: &Digest) -> Result<Vec<String>, StoreError> {
        let pages = StorePages(self);
        let mut memo = HashMap::new();
        let mut doubted = vec![];
        for mut replica in self.catalog.replicas_of(vm)? {
            let Some(root) = replica.root else { continue };
            if bulwark_protocol::blockmap::reaches(&pages, &root, &mut memo, &mut |id| id == bad) {
                if replica.mark_inconsistent("a recovery point's verification found a bad chunk it shares", now_secs())
                {
                    self.catalog.put_replica(&replica)?;
                }
                doubted.push(replica.disk);
            }
        }
        self.catalog.flush_durable()?;
        Ok(doubted)
    }
}
