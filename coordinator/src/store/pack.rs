//! Pack files: append-only files of chunk records, so a store of millions of chunks is a few
//! hundred files, not millions. This module owns the pack format.
//!
//! Format version 1 — `store/packs/NNNNNNNN.pack`:
//! ```text
//! file header (16 bytes): b"BWPACK\0\x01"  u32 BE pack id  u32 BE 0
//! record      (48 bytes + payload):
//!   0  [4]  b"BWCR"
//!   4  u8   flags (1: zstd, 2: AES-256-GCM)
//!   5  [3]  0
//!   8  u32 BE payload length P
//!  12  u32 BE plain length
//!  16  [32] chunk id
//!  48  [P]  payload (nonce ‖ ciphertext ‖ tag when encrypted)
//! ```
//! Records are only ever appended. A pack's durable length is recorded in the catalog when it
//! is fsynced for a commit; anything after it is a tail a crash may have left, cut at open.

use bulwark_protocol::block::Digest;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FILE_MAGIC: [u8; 8] = *b"BWPACK\0\x01";
pub const FILE_HEADER_LEN: u64 = 16;
pub const RECORD_MAGIC: [u8; 4] = *b"BWCR";
pub const RECORD_HEADER_LEN: usize = 48;

/// Where a record is (the catalog's index keeps it).
pub use crate::catalog::Location;

/// A record's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub payload_len: u32,
    pub plain_len: u32,
    pub id: Digest,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = self.flags;
        b[8..12].copy_from_slice(&self.payload_len.to_be_bytes());
        b[12..16].copy_from_slice(&self.plain_len.to_be_bytes());
        b[16..48].copy_from_slice(&self.id);
        b
    }

    /// Parses a header; `None` if it is not one.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Option<Self> {
        if b[..4] != RECORD_MAGIC || b[5..8] != [0, 0, 0] {
            return None;
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[16..48]);
        Some(Self {
            flags: b[4],
            payload_len: u32::from_be_bytes(b[8..12].try_into().ok()?),
            plain_len: u32::from_be_bytes(b[12..16].try_into().ok()?),
            id,
        })
    }
}

/// The path of pack `id` in `dir`.
pub fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.pack"))
}

/// Parses a pack file name.
pub fn pack_id(name: &str) -> Option<u32> {
    name.strip_suffix(".pack").filter(|s| s.len() == 8).and_then(|s| s.parse().ok())
}

/// Creates a new pack file with its header (not yet fsynced).
pub fn create(dir: &Path, id: u32) -> io::Result<File> {
    let mut f = OpenOptions::new().read(true).append(true).create_new(true).open(pack_path(dir, id))?;
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    header[..8].copy_from_slice(&FILE_MAGIC);
    header[8..12].copy_from_slice(&id.to_be_bytes());
    f.write_all(&header)?;
    Ok(f)
}

/// Reads the record at `loc` from `file`: its header and payload.
pub fn read_record(file: &File, loc: &Location) -> Result<(RecordHeader, Vec<u8>), String> {
    let len = loc.len as usize;
    if !(RECORD_HEADER_LEN..=RECORD_HEADER_LEN + crate::store::chunk::MAX_PLAIN + 1024).contains(&len) {
        return Err(format!("index gives an impossible record length {len}"));
    }
    let read = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at).map_err(|e| format!("cannot read {} bytes at offset {at}: {e}", buf.len()))
    };
    // The header, then the payload into a buffer of its own (no copy to drop the header).
    let mut head = [0u8; RECORD_HEADER_LEN];
    read(&mut head, loc.offset)?;
    let header = RecordHeader::decode(&head).ok_or("record header is damaged")?;
    if header.payload_len as usize + RECORD_HEADER_LEN != len {
        return Err(format!(
            "record header says {} payload bytes, the index {}",
            header.payload_len,
            len - RECORD_HEADER_LEN
        ));
    }
    let mut payload = vec![0u8; len - RECORD_HEADER_LEN];
    read(&mut payload, loc.offset + RECORD_HEADER_LEN as u64)?;
    Ok((header, payload))
}

/// Reads records of a pack one after another from the start (or from `from`).
pub struct Scanner {
    reader: BufReader<File>,
    offset: u64,
    end: u64,
    with_payload: bool,
}

/// One scanned record.
#[derive(Debug)]
pub struct Scanned {
    pub offset: u64,
    pub header: RecordHeader,
    /// The payload, when the scanner reads payloads.
    pub payload: Option<Vec<u8>>,
}

impl Scanner {
    /// Scans `path` up to `end` bytes (its durable length).
    pub fn open(path: &Path, end: u64, with_payload: bool) -> io::Result<Self> {
        let mut f = File::open(path)?;
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        f.read_exact(&mut header)?;
        if header[..8] != FILE_MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a pack file", path.display())));
        }
        Ok(Self { reader: BufReader::with_capacity(4 << 20, f), offset: FILE_HEADER_LEN, end, with_payload })
    }

    /// The next record; `Ok(None)` at the end; an error for a damaged record (scanning stops).
    pub fn next_record(&mut self) -> io::Result<Option<Scanned>> {
        if self.offset + RECORD_HEADER_LEN as u64 > self.end {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        self.reader.read_exact(&mut head)?;
        let header = RecordHeader::decode(&head).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("damaged record header at offset {}", self.offset))
        })?;
        let offset = self.offset;
        let payload_len = u64::from(header.payload_len);
        if offset + RECORD_HEADER_LEN as u64 + payload_len > self.end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("record at offset {offset} runs past the end"),
            ));
        }
        let payload = if self.with_payload {
            let mut p = vec![0u8; payload_len as usize];
            self.reader.read_exact(&mut p)?;
            Some(p)
        } else {
            self.reader.seek_relative(payload_len as i64)?;
            None
        };
        self.offset = offset + RECORD_HEADER_LEN as u64 + payload_len;
        Ok(Some(Scanned { offset, header, payload }))
    }
}

/// Appends records to the current pack, rolling to a new pack at the size limit.
#[derive(Debug)]
pub struct PackWriter {
    dir: PathBuf,
    max_bytes: u64,
    current: u32,
    file: File,
    len: u64,
    /// Packs written since the last sync, with the length to sync them to.
    dirty: Vec<(u32, File, u64)>,
    created_since_sync: bool,
    /// Records appended with [`PackWriter::append_deferred`], not yet written to the file.
    pending: Vec<u8>,
}

impl PackWriter {
    /// Continues pack `current` of length `len` (or creates it when `len` is 0).
    pub fn open(dir: &Path, current: u32, len: u64, max_bytes: u64) -> io::Result<Self> {
        let (file, len, created) = if len == 0 {
            (create(dir, current)?, FILE_HEADER_LEN, true)
        } else {
            (OpenOptions::new().read(true).append(true).open(pack_path(dir, current))?, len, false)
        };
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            current,
            file,
            len,
            dirty: vec![],
            created_since_sync: created,
            pending: vec![],
        })
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    /// Appends one record, written to the file at once; returns where it went.
    pub fn append(&mut self, header: &RecordHeader, payload: &[u8]) -> io::Result<Location> {
        self.flush_pending()?;
        let rec_len = (RECORD_HEADER_LEN + payload.len()) as u64;
        if self.len > FILE_HEADER_LEN && self.len + rec_len > self.max_bytes {
            self.roll()?;
        }
        let mut rec = Vec::with_capacity(rec_len as usize);
        rec.extend_from_slice(&header.encode());
        rec.extend_from_slice(payload);
        let offset = self.len;
        if let Err(e) = self.file.write_all(&rec) {
            // Leave no partial record behind (a full disk, say): cut back to the last record.
            let _ = self.file.set_len(offset);
            return Err(e);
        }
        self.len += rec_len;
        Ok(Location { pack: self.current, offset, len: rec_len as u32 })
    }

    /// Appends one record to a buffer that is written out by the next [`PackWriter::sync`]
    /// (or [`PackWriter::flush_pending`]); nothing may read it before then. For bulk copies.
    pub fn append_deferred(&mut self, header: &RecordHeader, payload: &[u8]) -> io::Result<Location> {
        let rec_len = (RECORD_HEADER_LEN + payload.len()) as u64;
        let at = self.len + self.pending.len() as u64;
        if at > FILE_HEADER_LEN && at + rec_len > self.max_bytes {
            self.flush_pending()?;
            self.roll()?;
        }
        let offset = self.len + self.pending.len() as u64;
        self.pending.extend_from_slice(&header.encode());
        self.pending.extend_from_slice(payload);
        if self.pending.len() >= 8 << 20 {
            self.flush_pending()?;
        }
        Ok(Location { pack: self.current, offset, len: rec_len as u32 })
    }

    /// Writes the deferred records to the file.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.pending) {
            let _ = self.file.set_len(self.len);
            self.pending.clear();
            return Err(e);
        }
        self.len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        let next = self.current + 1;
        let file = create(&self.dir, next)?;
        let old = std::mem::replace(&mut self.file, file);
        self.dirty.push((self.current, old, self.len));
        self.current = next;
        self.len = FILE_HEADER_LEN;
        self.created_since_sync = true;
        Ok(())
    }

    /// Seals the current pack and starts a new one (GC does this so it never compacts into a
    /// pack it is reading).
    pub fn seal_current(&mut self) -> io::Result<()> {
        self.flush_pending()?;
        if self.len > FILE_HEADER_LEN {
            self.roll()?;
        }
        Ok(())
    }

    /// Fsyncs every pack written since the last sync (and the directory when packs were
    /// created); returns each pack's durable length, to be recorded in the catalog.
    pub fn sync(&mut self) -> io::Result<Vec<(u32, u64)>> {
        self.flush_pending()?;
        let mut synced = Vec::with_capacity(self.dirty.len() + 1);
        for (id, f, len) in self.dirty.drain(..) {
            f.sync_data()?;
            synced.push((id, len));
        }
        self.file.sync_data()?;
        synced.push((self.current, self.len));
        if self.created_since_sync {
            bulwark_pki::files::sync_dir(&self.dir)?;
            self.created_since_sync = false;
        }
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: u8, len: usize) -> RecordHeader {
        RecordHeader { flags: 0, payload_len: len as u32, plain_len: len as u32, id: [n; 32] }
    }

    #[test]
    fn records_round_trip_and_packs_roll_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::open(dir.path(), 1, 0, 1000).unwrap();
        let mut locs = vec![];
        for n in 0..10u8 {
            locs.push(w.append(&header(n, 200), &[n; 200]).unwrap());
        }
        let synced = w.sync().unwrap();
        assert!(w.current() > 1, "rolled");
        assert!(synced.iter().all(|(_, len)| *len <= 1000));
        for (n, loc) in locs.iter().enumerate() {
            let f = File::open(pack_path(dir.path(), loc.pack)).unwrap();
            let (h, p) = read_record(&f, loc).unwrap();
            assert_eq!(h.id, [n as u8; 32]);
            assert_eq!(p, vec![n as u8; 200]);
        }
        let (id, len) = synced[0];
        let mut s = Scanner::open(&pack_path(dir.path(), id), len, false).unwrap();
        let mut count = 0;
        while let Some(r) = s.next_record().unwrap() {
            assert_eq!(r.header.payload_len, 200);
            count += 1;
        }
        assert!(count >= 3);
    }

    #[test]
    fn locations_encode_in_sixteen_bytes() {
        let l = Location { pack: 7, offset: 1 << 40, len: 99 };
        assert_eq!(Location::decode(&l.encode()), Some(l));
        assert_eq!(Location::decode(&[1, 2]), None);
        assert_eq!(pack_id("00000042.pack"), Some(42));
        assert_eq!(pack_id("42.pack"), None);
    }
}
