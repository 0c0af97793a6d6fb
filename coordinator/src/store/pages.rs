//! Block-map pages in the store, and page deltas.
//!
//! A page is stored either whole (an ordinary chunk) or, when it replaces a page that differs
//! in at most a quarter of its slots, as a **delta** against that page: so a recovery point
//! after 1 % random churn costs about 34 bytes per changed block in metadata, not a whole
//! 32 KiB page per touched page. Either way the page's id is the hash of its full contents —
//! trees stay comparable with the agent's, and equal pages dedup — and reading checks the
//! materialized page against that id. Chains are at most [`MAX_DEPTH`] deltas long.
//!
//! Delta format version 1 (the record's plain bytes; flag `FLAG_DELTA`):
//! ```text
//!  0  [4]  b"BWPD"
//!  4  u8   depth (1 ..= MAX_DEPTH: deltas between this page and a whole page)
//!  5  u8   0
//!  6  u16 BE number of changed slots n
//!  8  [32] id of the base page
//! 40  u32 BE number of entries of the page
//! 44  n × (u16 BE slot, [32] new entry), slots strictly increasing
//! ```

use crate::store::chunk::FLAG_DELTA;
use crate::store::{Store, StoreError};
use bulwark_protocol::block::Digest;

/// Longest chain of deltas before a page is written whole again.
pub const MAX_DEPTH: u8 = 8;
const MAGIC: [u8; 4] = *b"BWPD";
const HEAD: usize = 44;

/// A parsed delta.
struct Delta {
    depth: u8,
    base: Digest,
    entries: usize,
    changes: Vec<(usize, Digest)>,
}

fn parse(bytes: &[u8]) -> Result<Delta, String> {
    let head = bytes.get(..HEAD).ok_or("page delta too short")?;
    if head[..4] != MAGIC || head[5] != 0 {
        return Err("not a page delta".into());
    }
    let depth = head[4];
    if depth == 0 || depth > MAX_DEPTH {
        return Err(format!("page delta depth {depth} out of range"));
    }
    let n = usize::from(u16::from_be_bytes([head[6], head[7]]));
    let mut base = [0u8; 32];
    base.copy_from_slice(&head[8..40]);
    let entries = u32::from_be_bytes([head[40], head[41], head[42], head[43]]) as usize;
    if entries > bulwark_protocol::blockmap::FANOUT || bytes.len() != HEAD + n * 34 {
        return Err("page delta has an impossible size".into());
    }
    let mut changes = Vec::with_capacity(n);
    let mut last = None;
    for c in bytes[HEAD..].chunks_exact(34) {
        let slot = usize::from(u16::from_be_bytes([c[0], c[1]]));
        if slot >= entries || last.is_some_and(|l| slot <= l) {
            return Err("page delta slots out of order or range".into());
        }
        last = Some(slot);
        let mut d = [0u8; 32];
        d.copy_from_slice(&c[2..]);
        changes.push((slot, d));
    }
    Ok(Delta { depth, base, entries, changes })
}

/// The delta from `old` to `new` (equal lengths), if it is worth keeping as one.
pub fn diff(old: &[u8], new: &[u8], old_depth: u8, base: &Digest) -> Option<Vec<u8>> {
    if old.len() != new.len() || old_depth >= MAX_DEPTH || !new.len().is_multiple_of(32) {
        return None;
    }
    let entries = new.len() / 32;
    let changed: Vec<usize> =
        (0..entries).filter(|&i| old[i * 32..(i + 1) * 32] != new[i * 32..(i + 1) * 32]).collect();
    if changed.len() > entries / 4 {
        return None;
    }
    let mut out = Vec::with_capacity(HEAD + changed.len() * 34);
    out.extend_from_slice(&MAGIC);
    out.push(old_depth + 1);
    out.push(0);
    out.extend_from_slice(&(changed.len() as u16).to_be_bytes());
    out.extend_from_slice(base);
    out.extend_from_slice(&(entries as u32).to_be_bytes());
    for i in changed {
        out.extend_from_slice(&(i as u16).to_be_bytes());
        out.extend_from_slice(&new[i * 32..(i + 1) * 32]);
    }
    Some(out)
}

impl Store {
    /// A page's full contents and its depth (0: stored whole), checked against its id.
    pub fn read_page(&self, id: &Digest) -> Result<(Vec<u8>, u8), StoreError> {
        self.read_page_bounded(id, MAX_DEPTH + 1)
    }

    fn read_page_bounded(&self, id: &Digest, budget: u8) -> Result<(Vec<u8>, u8), StoreError> {
        let loc = self.catalog.chunk(id)?.ok_or(StoreError::ChunkMissing { id: *id })?;
        let corrupt = |reason: String| StoreError::ChunkCorrupt { id: *id, pack: loc.pack, offset: loc.offset, reason };
        let (header, payload) = self.read_record(id, &loc)?;
        if header.flags & FLAG_DELTA == 0 {
            return Ok((self.codec.decode(id, header.flags, header.plain_len, &payload).map_err(corrupt)?, 0));
        }
        if budget == 0 {
            return Err(corrupt("page delta chain is too long".into()));
        }
        let plain = self.codec.open(id, header.flags, header.plain_len, &payload).map_err(corrupt)?;
        let delta = parse(&plain).map_err(corrupt)?;
        let (mut page, base_depth) = self.read_page_bounded(&delta.base, budget - 1)?;
        if page.len() != delta.entries * 32 || base_depth + 1 != delta.depth {
            return Err(corrupt("page delta does not fit its base".into()));
        }
        for (slot, d) in &delta.changes {
            page[slot * 32..(slot + 1) * 32].copy_from_slice(d);
        }
        if self.codec.hasher.hash(&page) != *id {
            return Err(corrupt("materialized page does not match its id".into()));
        }
        Ok((page, delta.depth))
    }

    /// The ids a page's chain is stored as: the page, its base, its base's base…
    pub fn page_chain(&self, id: &Digest) -> Result<Vec<Digest>, StoreError> {
        let mut chain = vec![*id];
        let mut current = *id;
        for _ in 0..=MAX_DEPTH {
            let loc = self.catalog.chunk(&current)?.ok_or(StoreError::ChunkMissing { id: current })?;
            let (header, payload) = self.read_record(&current, &loc)?;
            if header.flags & FLAG_DELTA == 0 {
                return Ok(chain);
            }
            let corrupt =
                |reason: String| StoreError::ChunkCorrupt { id: current, pack: loc.pack, offset: loc.offset, reason };
            let plain = self.codec.open(&current, header.flags, header.plain_len, &payload).map_err(corrupt)?;
            current = parse(&plain).map_err(corrupt)?.base;
            chain.push(current);
        }
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_changes_become_deltas_and_large_ones_do_not() {
        let old: Vec<u8> = (0..1024 * 32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[5 * 32] ^= 1;
        new[900 * 32 + 3] ^= 1;
        let d = diff(&old, &new, 0, &[7; 32]).unwrap();
        assert_eq!(d.len(), HEAD + 2 * 34);
        let parsed = parse(&d).unwrap();
        assert_eq!(parsed.changes.iter().map(|c| c.0).collect::<Vec<_>>(), vec![5, 900]);
        assert_eq!(parsed.depth, 1);
        let mut big = old.clone();
        for i in 0..300 {
            big[i * 32] ^= 1;
        }
        assert!(diff(&old, &big, 0, &[7; 32]).is_none());
        assert!(diff(&old, &new, MAX_DEPTH, &[7; 32]).is_none(), "chains are bounded");
    }

    #[test]
    fn hostile_deltas_are_refused() {
        let old = vec![0u8; 64 * 32];
        let mut new = old.clone();
        new[32] = 1;
        let mut d = diff(&old, &new, 0, &[7; 32]).unwrap();
        d[4] = 200; // depth
        assert!(parse(&d).is_err());
        let mut d = diff(&old, &new, 0, &[7; 32]).unwrap();
        d.truncate(d.len() - 1);
        assert!(parse(&d).is_err());
        let mut d = diff(&old, &new, 0, &[7; 32]).unwrap();
        d[HEAD] = 0xff; // slot out of range
        assert!(parse(&d).is_err());
    }
}
