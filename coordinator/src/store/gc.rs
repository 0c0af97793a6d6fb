//! Garbage collection: mark what any root (recovery point, replica) or in-flight job still
//! needs, then rewrite the packs whose live fraction is low and delete the dead ones.
//!
//! - **Mark** walks every block map (each distinct page once) into a Bloom filter of live ids
//!   of fixed size ([`super::StoreConfig::gc_filter_bytes`]): memory is bounded by
//!   configuration; a false positive only keeps a dead chunk one more round.
//! - **Sweep** considers only packs sealed before the mark (new chunks go to newer packs). A
//!   record is live if the index points at it and it is marked, pinned by an in-flight ingest,
//!   or was pinned by an ingest that finished while this GC ran (its commit may reference
//!   chunks the mark did not see). Each pack is decided and rewritten under the store's
//!   exclusive gate, so no dedup can pick a chunk in between.
//! - **Crash safety**: live records are copied to the current pack, which is fsynced; one
//!   catalog commit moves their index entries, drops the dead ones and forgets the old pack;
//!   only then is the old file deleted. A crash before the commit leaves the old pack in
//!   charge (the copies are an uncommitted tail, cut at open); after it, the old file is an
//!   unknown pack, removed at open.

use crate::catalog::Commit;
use crate::store::pack::{self, Location, RecordHeader, Scanner};
use crate::store::{io_err, lock, Store, StoreError, StorePages};
use bulwark_protocol::block::Digest;
use std::collections::HashSet;
use std::time::Instant;

/// What a GC run did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub roots: u64,
    pub pages_marked: u64,
    pub leaves_marked: u64,
    pub packs_scanned: u64,
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    pub chunks_moved: u64,
    pub chunks_dropped: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
    pub mark_seconds: f64,
    pub scan_seconds: f64,
    pub rewrite_seconds: f64,
}

/// A Bloom filter over chunk ids. Ids are BLAKE3 outputs, uniformly random, so the hash
/// functions are slices of the id itself (double hashing).
pub struct Bloom {
    bits: Vec<u64>,
    mask: u64,
    k: u32,
}

impl Bloom {
    /// A filter of about `bytes` bytes (a power of two, at least 1 KiB).
    pub fn new(bytes: usize) -> Self {
        let nbits = (bytes.max(1024) * 8).next_power_of_two() as u64;
        Self { bits: vec![0; (nbits / 64) as usize], mask: nbits - 1, k: 7 }
    }

    fn positions(&self, id: &Digest) -> impl Iterator<Item = u64> + '_ {
        let h1 = u64::from_le_bytes(id[0..8].try_into().unwrap_or([0; 8]));
        let h2 = u64::from_le_bytes(id[8..16].try_into().unwrap_or([0; 8])) | 1;
        (0..self.k).map(move |i| h1.wrapping_add(u64::from(i).wrapping_mul(h2)) & self.mask)
    }

    pub fn insert(&mut self, id: &Digest) {
        let pos: Vec<u64> = self.positions(id).collect();
        for p in pos {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    pub fn contains(&self, id: &Digest) -> bool {
        self.positions(id).all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

struct Record {
    id: Digest,
    loc: Location,
    header: RecordHeader,
    payload: Option<Vec<u8>>,
}

impl Store {
    /// Runs a garbage collection. Safe to run while jobs ingest and commit.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let started = Instant::now();
        let mut report = GcReport::default();
        // From now on, finished ingests hand their pins to this GC.
        *lock(&self.gc_keep) = Some(HashSet::new());
        let result = self.gc_inner(&mut report);
        *lock(&self.gc_keep) = None;
        result?;
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(?report, "garbage collection finished");
        Ok(report)
    }

    fn gc_inner(&self, report: &mut GcReport) -> Result<(), StoreError> {
        // Seal the current pack and record every pack's durable length: candidates are the
        // packs below the new current one.
        let current = {
            let mut w = lock(&self.writer);
            w.seal_current().map_err(io_err(&self.packs_dir))?;
            w.current()
        };
        let packs = self.sync_packs()?;
        self.catalog.commit(&Commit { packs, ..Commit::default() })?;

        let phase = Instant::now();
        let mut live = Bloom::new(self.config.gc_filter_bytes);
        let mut seen_pages: HashSet<Digest> = HashSet::new();
        let pages = StorePages(self);
        let mut chain_error = None;
        for root in self.roots()? {
            report.roots += 1;
            let mut visit = |level: u8, id: &Digest, entries: &[Digest]| {
                if !seen_pages.insert(*id) {
                    return false;
                }
                // A page stored as a delta needs its whole chain of bases.
                match self.page_chain(id) {
                    Ok(chain) => chain.iter().for_each(|c| live.insert(c)),
                    Err(e) => chain_error = Some(e),
                }
                report.pages_marked += 1;
                if level == 0 {
                    for e in entries.iter().filter(|e| **e != bulwark_protocol::blockmap::ZERO) {
                        live.insert(e);
                        report.leaves_marked += 1;
                    }
                }
                true
            };
            bulwark_protocol::blockmap::walk_pages(&pages, &root, &mut visit).map_err(|e| match e {
                bulwark_protocol::blockmap::BlockMapError::Store(e) => e,
                other => StoreError::BlockMap(other.to_string()),
            })?;
            if let Some(e) = chain_error.take() {
                return Err(e);
            }
        }
        drop(seen_pages);
        report.mark_seconds = phase.elapsed().as_secs_f64();

        let mut candidates: Vec<(u32, u64)> = self.catalog.packs()?.into_iter().collect();
        candidates.sort_unstable();
        report.bytes_before = candidates.iter().map(|(_, l)| l).sum();
        for (pack_id, len) in candidates {
            if pack_id >= current {
                report.bytes_after += len;
                continue;
            }
            report.packs_scanned += 1;
            let phase = Instant::now();
            let (live_bytes, total) = self.live_bytes(pack_id, len, &live)?;
            report.scan_seconds += phase.elapsed().as_secs_f64();
            if total > 0 && (live_bytes as f64) / (total as f64) >= self.config.gc_compact_below {
                report.bytes_after += len;
                continue;
            }
            let phase = Instant::now();
            self.rewrite(pack_id, len, &live, report)?;
            report.rewrite_seconds += phase.elapsed().as_secs_f64();
        }
        Ok(())
    }

    fn records(&self, pack_id: u32, len: u64, with_payload: bool) -> Result<Scanner, StoreError> {
        let path = pack::pack_path(&self.packs_dir, pack_id);
        Scanner::open(&path, len, with_payload).map_err(io_err(&path))
    }

    fn next(&self, pack_id: u32, s: &mut Scanner) -> Result<Option<Record>, StoreError> {
        let path = pack::pack_path(&self.packs_dir, pack_id);
        let Some(r) = s.next_record().map_err(io_err(&path))? else { return Ok(None) };
        let loc =
            Location { pack: pack_id, offset: r.offset, len: pack::RECORD_HEADER_LEN as u32 + r.header.payload_len };
        Ok(Some(Record { id: r.header.id, loc, header: r.header, payload: r.payload }))
    }

    /// Estimated live and total record bytes of a pack, from the mark alone: it decides which
    /// packs to rewrite; the rewrite itself judges every record exactly.
    fn live_bytes(&self, pack_id: u32, len: u64, live: &Bloom) -> Result<(u64, u64), StoreError> {
        let mut s = self.records(pack_id, len, false)?;
        let (mut live_bytes, mut total) = (0u64, 0u64);
        while let Some(rec) = self.next(pack_id, &mut s)? {
            total += u64::from(rec.loc.len);
            if live.contains(&rec.id) || self.pinned(&rec.id) {
                live_bytes += u64::from(rec.loc.len);
            }
        }
        Ok((live_bytes, total))
    }

    /// Copies a pack's live records to the current pack, moves their index entries, drops the
    /// dead ones, then forgets and deletes the pack. Streams in batches, so memory does not
    /// grow with the number of records in a pack: before each batch of index moves, the
    /// copies it points to are fsynced and their durable length committed, so every index
    /// entry points at valid data at every moment; the pack is deleted only after the last
    /// batch is durable.
    fn rewrite(&self, pack_id: u32, len: u64, live: &Bloom, report: &mut GcReport) -> Result<(), StoreError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut s = self.records(pack_id, len, true)?;
        let (mut put, mut drop) = (Vec::new(), Vec::new());
        let mut moved_any = false;
        // Liveness belongs to an id, not to a copy: if the id is live, pointing the index at
        // the moved copy is right whichever copy it pointed at; if it is dead, every copy is
        // garbage and its entry goes. Ingest is locked out meanwhile, so no index lookups.
        while let Some(rec) = self.next(pack_id, &mut s)? {
            if live.contains(&rec.id) || self.pinned(&rec.id) {
                let payload = rec.payload.as_deref().unwrap_or_default();
                let new = lock(&self.writer).append_deferred(&rec.header, payload).map_err(io_err(&self.packs_dir))?;
                put.push((rec.id, new));
                report.bytes_after += u64::from(new.len);
                report.chunks_moved += 1;
                moved_any = true;
            } else {
                drop.push(rec.id);
                report.chunks_dropped += 1;
            }
            if put.len() + drop.len() >= GC_BATCH {
                self.apply_batch(&mut put, &mut drop)?;
            }
        }
        self.apply_batch(&mut put, &mut drop)?;
        self.catalog.commit(&Commit { drop_packs: vec![pack_id], ..Commit::default() })?;
        self.forget_reader(pack_id);
        let path = pack::pack_path(&self.packs_dir, pack_id);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        bulwark_pki::files::sync_dir(&self.packs_dir).map_err(io_err(&self.packs_dir))?;
        if moved_any {
            report.packs_rewritten += 1;
        } else {
            report.packs_deleted += 1;
        }
        tracing::debug!(pack = pack_id, "pack collected");
        Ok(())
    }

    fn apply_batch(&self, put: &mut Vec<(Digest, Location)>, drop: &mut Vec<Digest>) -> Result<(), StoreError> {
        if !put.is_empty() {
            // The copies are fsynced and their length recorded before any index entry points
            // at them; the final commit of the rewrite makes it all durable at once.
            let packs = self.sync_packs()?;
            self.catalog.set_pack_lengths(&packs)?;
        }
        if !put.is_empty() || !drop.is_empty() {
            self.catalog.apply_index_changes(put, drop)?;
        }
        put.clear();
        drop.clear();
        Ok(())
    }
}

/// Index changes applied per batch while rewriting a pack.
const GC_BATCH: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(1 << 16);
        let ids: Vec<Digest> = (0..20_000u32).map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes()).collect();
        for id in &ids {
            b.insert(id);
        }
        assert!(ids.iter().all(|id| b.contains(id)));
        let fp = (20_000..120_000u32).filter(|i| b.contains(blake3::hash(&i.to_le_bytes()).as_bytes())).count();
        assert!(fp < 2_000, "{fp} false positives in 100,000");
    }
}
