//! The chunk codec: how a block's bytes become a stored record and back.
//!
//! - **Id**: BLAKE3 of the plain bytes; keyed BLAKE3 (key derived from the store key) when the
//!   store is encrypted, so ids leak nothing about contents to whoever reads the packs. Agents
//!   get the id key over their authenticated session and compute the same ids.
//! - **Zero**: an all-zero block has the id [`ZERO`] and is never stored.
//! - **Compression**: zstd; the raw bytes are kept when compression does not save at least 1/16.
//! - **Encryption**: AES-256-GCM, a fresh random 96-bit nonce per chunk, the chunk id as
//!   associated data (a ciphertext moved under another id fails to open).
//!
//! Decoding always checks the plain bytes against the id: a corrupt record yields an error,
//! never wrong bytes.

use crate::store::StoreError;
use bulwark_protocol::block::Digest;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::sync::Mutex;

/// The id of an all-zero block or page: never stored, always read as zeros.
pub const ZERO: Digest = bulwark_protocol::block::ZERO;
/// Largest plain chunk (a block of the largest block size, or a page).
pub const MAX_PLAIN: usize = bulwark_protocol::block::MAX_BLOCK_SIZE;
/// Bytes of the nonce that precedes an encrypted payload.
pub const NONCE_LEN: usize = 12;

/// Flags of a stored record.
pub const FLAG_ZSTD: u8 = 1;
pub const FLAG_AES: u8 = 2;
/// The record is a page delta (see `store::pages`): its id is the hash of the page it
/// materializes to, not of its own bytes.
pub const FLAG_DELTA: u8 = 4;

pub use bulwark_protocol::block::{is_zero, ChunkHasher};

/// Encodes and decodes chunk payloads.
#[derive(Clone)]
pub struct ChunkCodec {
    pub hasher: ChunkHasher,
    cipher: Option<LessSafeKey>,
    level: i32,
}

impl std::fmt::Debug for ChunkCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCodec").field("encrypted", &self.cipher.is_some()).field("level", &self.level).finish()
    }
}

/// A payload ready to be appended to a pack.
#[derive(Debug)]
pub struct Encoded {
    pub flags: u8,
    pub plain_len: u32,
    pub payload: Vec<u8>,
}

impl ChunkCodec {
    /// A codec; `store_key` set means the store is encrypted.
    pub fn new(store_key: Option<[u8; 32]>, level: i32) -> Self {
        match store_key {
            None => Self { hasher: ChunkHasher::plain(), cipher: None, level },
            Some(k) => {
                let id_key = blake3::derive_key("bulwark chunk id v1", &k);
                let enc_key = blake3::derive_key("bulwark chunk encryption v1", &k);
                let cipher = UnboundKey::new(&AES_256_GCM, &enc_key).ok().map(LessSafeKey::new);
                Self { hasher: ChunkHasher::keyed(id_key), cipher, level }
            }
        }
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Compresses (if it pays) and encrypts (if the store is encrypted) `plain`, whose id is `id`.
    pub fn encode(&self, id: &Digest, plain: &[u8]) -> Result<Encoded, StoreError> {
        if plain.len() > MAX_PLAIN {
            return Err(StoreError::TooLarge { len: plain.len(), max: MAX_PLAIN });
        }
        let mut flags = 0;
        let compressed = compress(plain, self.level).map_err(|e| StoreError::Codec(e.to_string()))?;
        let body: &[u8] = if compressed.len() + plain.len() / 16 < plain.len() {
            flags |= FLAG_ZSTD;
            &compressed
        } else {
            plain
        };
        let payload = match &self.cipher {
            None => body.to_vec(),
            Some(key) => {
                // One buffer: the nonce, the body sealed in place, the tag.
                let mut nonce = [0u8; NONCE_LEN];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
                let mut payload = Vec::with_capacity(NONCE_LEN + body.len() + AES_256_GCM.tag_len());
                payload.extend_from_slice(&nonce);
                payload.extend_from_slice(body);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&id[..]),
                        &mut payload[NONCE_LEN..],
                    )
                    .map_err(|_| StoreError::Codec("encryption failed".into()))?;
                payload.extend_from_slice(tag.as_ref());
                flags |= FLAG_AES;
                payload
            }
        };
        Ok(Encoded { flags, plain_len: plain.len() as u32, payload })
    }

    /// Recovers the plain bytes of a record and checks them against `id`. `Err(reason)` if the
    /// record is not what it claims to be. Page deltas are checked by the page reader instead.
    pub fn decode(&self, id: &Digest, flags: u8, plain_len: u32, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.decode_owned(id, flags, plain_len, payload.to_vec())
    }

    /// [`ChunkCodec::decode`] of a payload the caller no longer needs: decrypted in place, and
    /// an uncompressed chunk is the payload itself (no copy on a restore's hot path).
    pub fn decode_owned(&self, id: &Digest, flags: u8, plain_len: u32, payload: Vec<u8>) -> Result<Vec<u8>, String> {
        if flags & FLAG_DELTA != 0 {
            return Err("record is a page delta, not a chunk".into());
        }
        let plain = self.open_owned(id, flags, plain_len, payload)?;
        if self.hasher.hash(&plain) != *id {
            return Err("content does not match its digest".into());
        }
        Ok(plain)
    }

    /// Decrypts and decompresses a record without checking its content against `id` (the
    /// caller must: page deltas are checked once materialized).
    pub fn open(&self, id: &Digest, flags: u8, plain_len: u32, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.open_owned(id, flags, plain_len, payload.to_vec())
    }

    /// [`ChunkCodec::open`] of an owned payload, in place.
    pub fn open_owned(&self, id: &Digest, flags: u8, plain_len: u32, mut body: Vec<u8>) -> Result<Vec<u8>, String> {
        let plain_len = plain_len as usize;
        if plain_len > MAX_PLAIN {
            return Err(format!("record claims {plain_len} plain bytes"));
        }
        if flags & FLAG_AES != 0 {
            let cipher = self.cipher.as_ref().ok_or("record is encrypted but the store has no key")?;
            let nonce = body.get(..NONCE_LEN).ok_or("encrypted record too short")?;
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
            // Opened where it lies and moved to the front in the same pass.
            let n = cipher
                .open_within(nonce, Aad::from(&id[..]), &mut body, NONCE_LEN..)
                .map_err(|_| "authentication failed (corrupt or forged record)".to_owned())?
                .len();
            body.truncate(n);
        } else if self.cipher.is_some() {
            return Err("record is not encrypted in an encrypted store".into());
        }
        let plain = if flags & FLAG_ZSTD != 0 {
            decompress(&body, plain_len).map_err(|e| format!("decompression failed: {e}"))?
        } else {
            body
        };
        if plain.len() != plain_len {
            return Err(format!("record holds {} bytes, its header says {plain_len}", plain.len()));
        }
        Ok(plain)
    }
}

/// Contexts kept for reuse: creating a zstd context per chunk was a twentieth of a restore and
/// of a simulated run. At most [`KEPT_CONTEXTS`] of each kind are kept (a context holds tables
/// sized for the largest chunk it saw), whatever the number of threads.
static COMPRESSORS: Mutex<Vec<(i32, zstd::bulk::Compressor<'static>)>> = Mutex::new(Vec::new());
static DECOMPRESSORS: Mutex<Vec<zstd::bulk::Decompressor<'static>>> = Mutex::new(Vec::new());
const KEPT_CONTEXTS: usize = 16;

fn take<T>(pool: &Mutex<Vec<T>>, pick: impl Fn(&T) -> bool) -> Option<T> {
    let mut kept = pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let i = kept.iter().position(pick)?;
    Some(kept.swap_remove(i))
}

fn give<T>(pool: &Mutex<Vec<T>>, context: T) {
    let mut kept = pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if kept.len() < KEPT_CONTEXTS {
        kept.push(context);
    }
}

/// `zstd::bulk::compress` on a kept context.
fn compress(plain: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut c = match take(&COMPRESSORS, |(l, _)| *l == level) {
        Some((_, c)) => c,
        None => zstd::bulk::Compressor::new(level)?,
    };
    let out = c.compress(plain)?;
    give(&COMPRESSORS, (level, c));
    Ok(out)
}

/// `zstd::bulk::decompress` on a kept context (at most `capacity` bytes out).
fn decompress(body: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    let mut d = match take(&DECOMPRESSORS, |_| true) {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let out = d.decompress(body, capacity);
    give(&DECOMPRESSORS, d);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codecs() -> [ChunkCodec; 2] {
        [ChunkCodec::new(None, 1), ChunkCodec::new(Some([9; 32]), 1)]
    }

    #[test]
    fn zero_blocks_have_the_zero_id() {
        let c = ChunkCodec::new(None, 1);
        assert_eq!(c.hasher.id(&[0u8; 4096]), ZERO);
        assert_ne!(c.hasher.id(&[0, 0, 1]), ZERO);
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn compressible_data_is_compressed_and_random_data_is_not() {
        for c in codecs() {
            let text = b"bulwark ".repeat(4096);
            let id = c.hasher.id(&text);
            let e = c.encode(&id, &text).unwrap();
            assert_ne!(e.flags & FLAG_ZSTD, 0);
            assert!(e.payload.len() < text.len() / 10);
            assert_eq!(c.decode(&id, e.flags, e.plain_len, &e.payload).unwrap(), text);

            let random: Vec<u8> = (0..65536u32).map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0]).collect();
            let id = c.hasher.id(&random);
            let e = c.encode(&id, &random).unwrap();
            assert_eq!(e.flags & FLAG_ZSTD, 0);
            assert_eq!(c.decode(&id, e.flags, e.plain_len, &e.payload).unwrap(), random);
        }
    }

    #[test]
    fn encrypted_ids_are_keyed_and_ciphertext_is_bound_to_its_id() {
        let [plain, enc] = codecs();
        let data = b"secret data".repeat(100);
        assert_ne!(plain.hasher.id(&data), enc.hasher.id(&data));
        let id = enc.hasher.id(&data);
        let e = enc.encode(&id, &data).unwrap();
        assert!(!e.payload.windows(11).any(|w| w == b"secret data"));
        let other = enc.hasher.id(b"other");
        assert!(enc.decode(&other, e.flags, e.plain_len, &e.payload).is_err());
        let same_nonce_twice = enc.encode(&id, &data).unwrap();
        assert_ne!(same_nonce_twice.payload, e.payload, "nonces are fresh");
    }

    proptest! {
        #[test]
        fn any_corruption_of_a_record_is_detected(data in proptest::collection::vec(any::<u8>(), 1..4096), pos in any::<usize>(), bit in 0u8..8) {
            for c in codecs() {
                let id = c.hasher.id(&data);
                prop_assume!(id != ZERO);
                let mut e = c.encode(&id, &data).unwrap();
                let i = pos % e.payload.len();
                e.payload[i] ^= 1 << bit;
                prop_assert!(c.decode(&id, e.flags, e.plain_len, &e.payload).is_err());
            }
        }
    }
}
