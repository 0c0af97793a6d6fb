//! The store key of an encrypted store: where it lives, how a store is bound to it, and its
//! printable recovery copy.
//!
//! - **Where**: `key_file` in `coordinator.toml` (absolute, or relative to the data
//!   directory). `init --encrypt` writes `pki/store.key` (0600), apart from the packs it
//!   protects; a data directory made before `key_file` existed keeps its key at `store/key`,
//!   read when `key_file` is absent. Whoever copies `store/` alone gets ciphertext only.
//! - **Bound to its store**: the catalog keeps a check value of the key (BLAKE3 derive-key
//!   `"bulwark store key check v1"`, 32 bytes, `meta "store_key_check"`). A store whose key is
//!   missing or is another key does not open ([`KeyError::Missing`], [`KeyError::Wrong`]): it
//!   reads nothing rather than failing chunk by chunk. A catalog from before the check value
//!   is probed once (its first chunk records must open with the key) and then gets one.
//! - **Recovery copy** (`key export` / `key import`): `bwk1_` then RFC 4648 base32, lowercase,
//!   no padding, of the 32 key bytes followed by a 4-byte checksum (the first bytes of BLAKE3
//!   derive-key `"bulwark store key recovery copy v1"` of the key): 58 characters. Import
//!   ignores case, spaces and dashes, and refuses a copy whose checksum or length is wrong.

use super::{chunk, Store, StoreError};
use crate::catalog::{Catalog, CatalogError};
use crate::config::{ConfigError, CoordinatorConfig, DataDir};
use std::path::{Path, PathBuf};

/// Bytes of a store key.
pub const KEY_LEN: usize = 32;
/// A store key.
pub type StoreKey = [u8; KEY_LEN];
/// How a recovery copy starts (the version of its format).
pub const COPY_PREFIX: &str = "bwk1_";
const CHECKSUM_LEN: usize = 4;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Chunk records probed to bind a key to a catalog that has no check value yet.
const PROBE_RECORDS: usize = 8;

/// Why the store key cannot be used, read, exported or imported.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the store is encrypted but its key is missing: expected at {path} (restore it from its recovery copy \
         with `bulwark-coordinator key import`; `key_file` in coordinator.toml says where it lives)"
    )]
    Missing { path: PathBuf },
    #[error("the key at {path} is not the key of this store (its check value differs): the store stays closed")]
    Wrong { path: PathBuf },
    #[error("the store of {dir} is not encrypted (encrypt = false in coordinator.toml): it has no key")]
    NotEncrypted { dir: PathBuf },
    #[error("{path} already holds a different store key; refusing to overwrite it (move it away first)")]
    Exists { path: PathBuf },
    #[error("this key is not the key of the store in {dir} (the catalog's check value differs)")]
    NotThisStore { dir: PathBuf },
    #[error("not a valid store key recovery copy: {0}")]
    BadCopy(String),
    #[error("store key {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("store key {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// A new random key.
pub fn generate() -> StoreKey {
    use rand::RngCore;
    let mut key = [0u8; KEY_LEN];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

/// The value the catalog keeps to recognize its key.
pub fn check_value(key: &StoreKey) -> [u8; 32] {
    blake3::derive_key("bulwark store key check v1", key)
}

fn checksum(key: &StoreKey) -> [u8; CHECKSUM_LEN] {
    let full = blake3::derive_key("bulwark store key recovery copy v1", key);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&full[..CHECKSUM_LEN]);
    out
}

/// The printable recovery copy of `key`.
pub fn recovery_copy(key: &StoreKey) -> String {
    let mut bytes = key.to_vec();
    bytes.extend_from_slice(&checksum(key));
    format!("{COPY_PREFIX}{}", base32(&bytes))
}

/// The key a recovery copy holds, refused if mistyped.
pub fn parse_recovery_copy(text: &str) -> Result<StoreKey, KeyError> {
    let compact: String =
        text.chars().filter(|c| !c.is_whitespace() && *c != '-').map(|c| c.to_ascii_lowercase()).collect();
    let body = compact
        .strip_prefix(COPY_PREFIX)
        .ok_or_else(|| KeyError::BadCopy(format!("it does not start with {COPY_PREFIX}")))?;
    let bytes = unbase32(body).map_err(KeyError::BadCopy)?;
    if body.len() != base32_len(KEY_LEN + CHECKSUM_LEN) || bytes.len() != KEY_LEN + CHECKSUM_LEN {
        return Err(KeyError::BadCopy(format!(
            "{} characters after {COPY_PREFIX}, expected {}",
            body.len(),
            base32_len(KEY_LEN + CHECKSUM_LEN)
        )));
    }
    let (k, sum) = bytes.split_at(KEY_LEN);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(k);
    if sum != checksum(&key) {
        return Err(KeyError::BadCopy("the checksum does not match: a character is mistyped".into()));
    }
    Ok(key)
}

fn base32_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(base32_len(bytes.len()));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = ((acc << 8) | u32::from(b)) & 0xffff;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes canonical base32 (the unused low bits of the last character must be zero, so
/// every key has exactly one copy).
fn unbase32(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.chars() {
        let v = ALPHABET
            .iter()
            .position(|&a| char::from(a) == c)
            .ok_or_else(|| format!("{c:?} is not a base32 character"))?;
        acc = ((acc << 5) | v as u32) & 0xfff;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    if acc & ((1 << bits) - 1) != 0 {
        return Err("the last character is mistyped".into());
    }
    Ok(out)
}

/// The key file at `path`, if there.
pub fn read(path: &Path) -> Result<Option<StoreKey>, KeyError> {
    match std::fs::read(path) {
        Ok(bytes) => StoreKey::try_from(bytes.as_slice()).map(Some).map_err(|_| KeyError::Invalid {
            path: path.to_owned(),
            reason: format!("{} bytes, expected {KEY_LEN}", bytes.len()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Writes a key file, mode 0600, atomically and durably (temp, fsync, rename, fsync of the
/// directory); a missing parent directory is created private.
pub fn write(path: &Path, key: &StoreKey) -> Result<(), KeyError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        bulwark_pki::files::create_private_dir(parent).map_err(io(parent))?;
    }
    bulwark_pki::files::write_atomic(path, key, 0o600).map_err(io(path))
}

/// Where the store key of `dir` lives, and the key: required when `coordinator.toml` says
/// the store is encrypted; without a `coordinator.toml` (a bare store), `store/key` if there.
pub fn locate(dir: &DataDir) -> Result<(PathBuf, Option<StoreKey>), KeyError> {
    if !dir.config().exists() {
        let path = dir.store_key();
        let key = read(&path)?;
        return Ok((path, key));
    }
    let config = CoordinatorConfig::load(dir)?;
    let path = config.store_key_path(dir);
    if !config.encrypt {
        return Ok((path, None));
    }
    match read(&path)? {
        Some(key) => Ok((path, Some(key))),
        None => Err(KeyError::Missing { path }),
    }
}

/// Refuses a store opened without its key or with another one, by the catalog's check value.
pub(super) fn check(catalog: &Catalog, path: &Path, key: Option<&StoreKey>) -> Result<(), KeyError> {
    match (catalog.store_key_check()?, key) {
        (Some(_), None) => Err(KeyError::Missing { path: path.to_owned() }),
        (Some(check), Some(k)) if check != check_value(k) => Err(KeyError::Wrong { path: path.to_owned() }),
        _ => Ok(()),
    }
}

/// Binds a catalog that has no check value yet to `key` (after [`probe`]).
pub(super) fn bind(store: &Store, path: &Path, key: Option<&StoreKey>) -> Result<(), StoreError> {
    if store.catalog().store_key_check()?.is_some() {
        return Ok(());
    }
    probe(store, path, key)?;
    if let Some(k) = key {
        store.catalog().set_store_key_check(check_value(k))?;
    }
    Ok(())
}

/// A catalog without a check value: the first chunk records must open with the key (or,
/// without one, must not be encrypted). Unreadable records decide nothing (verify finds them).
fn probe(store: &Store, path: &Path, key: Option<&StoreKey>) -> Result<(), StoreError> {
    let mut refused = 0;
    for entry in store.catalog().chunk_entries().take(PROBE_RECORDS) {
        let (id, loc) = entry?;
        let Ok((header, payload)) = store.read_record(&id, &loc) else { continue };
        if header.flags & chunk::FLAG_AES == 0 {
            continue;
        }
        if key.is_none() {
            return Err(KeyError::Missing { path: path.to_owned() }.into());
        }
        match store.codec.open(&id, header.flags, header.plain_len, &payload) {
            Ok(_) => return Ok(()),
            Err(_) => refused += 1,
        }
    }
    if refused > 0 {
        return Err(KeyError::Wrong { path: path.to_owned() }.into());
    }
    Ok(())
}

/// `key export`: the recovery copy of the store key of `dir`, and the file it was read from.
pub fn export(dir: &DataDir) -> Result<(String, PathBuf), KeyError> {
    let config = CoordinatorConfig::load(dir)?;
    if !config.encrypt {
        return Err(KeyError::NotEncrypted { dir: dir.root.clone() });
    }
    let path = config.store_key_path(dir);
    let key = read(&path)?.ok_or_else(|| KeyError::Missing { path: path.clone() })?;
    Ok((recovery_copy(&key), path))
}

/// What `key import` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    Written(PathBuf),
    /// The same key was there already.
    AlreadyThere(PathBuf),
}

/// `key import`: writes the key of a recovery copy where `dir` expects it (or to `key_file`,
/// recorded in `coordinator.toml`; a relative `key_file` is relative to the data directory).
/// Refuses a different existing key, and a key the catalog's check value does not recognize.
pub fn import(dir: &DataDir, copy: &str, key_file: Option<&Path>) -> Result<Imported, KeyError> {
    let key = parse_recovery_copy(copy)?;
    let mut config = CoordinatorConfig::load(dir)?;
    if !config.encrypt {
        return Err(KeyError::NotEncrypted { dir: dir.root.clone() });
    }
    if let Some(check) = catalog_check(dir)? {
        if check != check_value(&key) {
            return Err(KeyError::NotThisStore { dir: dir.root.clone() });
        }
    }
    // Where it goes: as asked, else where the configuration says, else apart from the store.
    let recorded = match (key_file, &config.key_file) {
        (Some(p), _) => Some(relative_to_root(dir, p)),
        (None, Some(p)) => Some(p.clone()),
        (None, None) => dir.default_key_file().strip_prefix(&dir.root).ok().map(Path::to_path_buf),
    };
    let target = CoordinatorConfig { key_file: recorded.clone(), ..config.clone() }.store_key_path(dir);
    let outcome = match read(&target)? {
        Some(existing) if existing == key => Imported::AlreadyThere(target),
        Some(_) => return Err(KeyError::Exists { path: target }),
        None => {
            write(&target, &key)?;
            Imported::Written(target)
        }
    };
    if config.key_file != recorded {
        config.key_file = recorded;
        config.save(dir)?;
    }
    Ok(outcome)
}

/// `path` relative to the data directory when it lies inside it (the directory can move).
fn relative_to_root(dir: &DataDir, path: &Path) -> PathBuf {
    if path.is_relative() {
        return path.to_owned();
    }
    let root = std::path::absolute(&dir.root).unwrap_or_else(|_| dir.root.clone());
    path.strip_prefix(&root).map(Path::to_path_buf).unwrap_or_else(|_| path.to_owned())
}

/// The catalog's check value, when the catalog exists and no running coordinator holds it.
fn catalog_check(dir: &DataDir) -> Result<Option<[u8; 32]>, KeyError> {
    if !dir.catalog().join("db").exists() || Catalog::in_use(&dir.catalog()) {
        return Ok(None);
    }
    match Catalog::open(&dir.catalog()) {
        Ok(catalog) => Ok(catalog.store_key_check()?),
        Err(CatalogError::Locked(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_copy_round_trips_and_tolerates_case_spaces_and_dashes() {
        for seed in 0u8..20 {
            let key: StoreKey =
                std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(seed.wrapping_mul(101)));
            let copy = recovery_copy(&key);
            assert!(copy.starts_with(COPY_PREFIX));
            assert_eq!(copy.len(), COPY_PREFIX.len() + 58);
            assert!(copy.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{copy}");
            assert_eq!(parse_recovery_copy(&copy).unwrap(), key);
            let messy: String = copy
                .to_uppercase()
                .chars()
                .enumerate()
                .flat_map(|(i, c)| if i % 4 == 3 { vec![c, '-'] } else { vec![c] })
                .collect();
            assert_eq!(parse_recovery_copy(&format!("  {messy}\n")).unwrap(), key);
        }
    }

    #[test]
    fn every_single_mistyped_character_is_detected() {
        let key = generate();
        let copy = recovery_copy(&key);
        for pos in COPY_PREFIX.len()..copy.len() {
            for &c in ALPHABET {
                let mut typo = copy.clone().into_bytes();
                if typo[pos] == c {
                    continue;
                }
                typo[pos] = c;
                let typo = String::from_utf8(typo).unwrap();
                assert!(parse_recovery_copy(&typo).is_err(), "{typo} was accepted");
            }
        }
        assert!(parse_recovery_copy(&copy[..copy.len() - 1]).is_err(), "a character missing");
        assert!(parse_recovery_copy(&format!("{copy}a")).is_err(), "a character too many");
        assert!(parse_recovery_copy(&copy.replacen("bwk1_", "bwk2_", 1)).is_err(), "another version");
        assert!(parse_recovery_copy("bwk1_!!").is_err());
        assert!(parse_recovery_copy("").is_err());
    }

    #[test]
    fn base32_matches_rfc_4648() {
        // RFC 4648 §10, lowercase, without padding.
        for (plain, coded) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32(plain.as_bytes()), coded);
            assert_eq!(unbase32(coded).unwrap(), plain.as_bytes());
        }
    }

    /// A bare store (no coordinator.toml: the key at `store/key`) holding one random block.
    fn store_with_data(dir: &DataDir, key: &StoreKey) {
        std::fs::create_dir_all(dir.packs()).unwrap();
        std::fs::write(dir.store_key(), key).unwrap();
        let store = Store::open(dir, Catalog::create(&dir.catalog()).unwrap(), Default::default()).unwrap();
        let block: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut ingest = store.begin();
        let id = store.codec().hasher.id(&block);
        ingest.put_block(&id, &block).unwrap();
        store.commit_replicas(ingest, vec![]).unwrap();
        assert_eq!(store.read_chunk(&id).unwrap(), block);
    }

    fn open(dir: &DataDir) -> Result<Store, StoreError> {
        Store::open(dir, Catalog::open(&dir.catalog()).unwrap(), Default::default())
    }

    /// What a catalog from before the check value looks like.
    fn forget_check_value(dir: &DataDir) {
        // sled lets go of its lock a moment after the last handle is dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::open(dir.catalog()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        db.open_tree("meta").unwrap().remove("store_key_check").unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn an_encrypted_store_opens_only_with_its_own_key() {
        let t = tempfile::tempdir().unwrap();
        let dir = DataDir::new(t.path());
        let (mine, other) = ([42u8; KEY_LEN], [7u8; KEY_LEN]);
        store_with_data(&dir, &mine);
        // Twice: with the check value, then as a catalog from before it (probed, then bound).
        for legacy in [false, true] {
            if legacy {
                forget_check_value(&dir);
            }
            std::fs::write(dir.store_key(), other).unwrap();
            match open(&dir) {
                Err(StoreError::Key(KeyError::Wrong { path })) => assert_eq!(path, dir.store_key()),
                other => panic!("legacy={legacy}: another key must be refused: {other:?}"),
            }
            std::fs::remove_file(dir.store_key()).unwrap();
            match open(&dir) {
                Err(StoreError::Key(e @ KeyError::Missing { .. })) => {
                    assert!(e.to_string().contains(&dir.store_key().display().to_string()), "{e}")
                }
                other => panic!("legacy={legacy}: a missing key must be refused: {other:?}"),
            }
            std::fs::write(dir.store_key(), mine).unwrap();
            let store = open(&dir).unwrap();
            assert_eq!(store.catalog().store_key_check().unwrap(), Some(check_value(&mine)));
        }
    }

    #[test]
    fn import_writes_the_key_once_and_never_over_another() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("c");
        let opts = crate::init::InitOptions {
            name: Some("c".into()),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            encrypt: true,
            joined: None,
        };
        crate::init::init(&root, &opts).unwrap();
        let dir = DataDir::new(&root);
        let (copy, path) = export(&dir).unwrap();
        assert_eq!(path, root.join("pki/store.key"));
        assert_eq!(import(&dir, &copy, None).unwrap(), Imported::AlreadyThere(path.clone()));
        let foreign = recovery_copy(&generate());
        assert!(
            matches!(import(&dir, &foreign, None), Err(KeyError::NotThisStore { .. })),
            "the catalog knows its key"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(export(&dir), Err(KeyError::Missing { .. })));
        let elsewhere = t.path().join("escrow/store.key");
        assert_eq!(import(&dir, &copy, Some(&elsewhere)).unwrap(), Imported::Written(elsewhere.clone()));
        let config = CoordinatorConfig::load(&dir).unwrap();
        assert_eq!(config.key_file.as_deref(), Some(elsewhere.as_path()), "recorded");
        assert_eq!(export(&dir).unwrap(), (copy.clone(), elsewhere.clone()));

        // Without a catalog to ask, an existing different key is still never replaced.
        std::fs::remove_dir_all(dir.catalog()).unwrap();
        assert!(matches!(import(&dir, &foreign, None), Err(KeyError::Exists { .. })));
        assert_eq!(export(&dir).unwrap().0, copy);
    }

    #[test]
    fn key_files_are_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("keys/store.key");
        assert_eq!(read(&path).unwrap(), None);
        let key = generate();
        write(&path, &key).unwrap();
        assert_eq!(read(&path).unwrap(), Some(key));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(t.path().join("keys")).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(read(&path), Err(KeyError::Invalid { .. })));
    }
}
