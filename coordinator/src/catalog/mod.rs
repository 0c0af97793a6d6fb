//! The catalog: the coordinator's sled database. This module owns the key layout; everything
//! else goes through its typed functions.
//!
//! Layout, schema version 1 (values are `bulwark_protocol::codec` encodings unless noted):
//! ```text
//! tree "meta"         "schema_version" → u32 BE
//!                     "crl_number"     → u64 BE, the number of the current CRL
//! tree "tokens"       secret_hash [32] → TokenRecord (or legacy::TokenRecordV1, read only)
//! tree "agents"       host name (utf-8) → AgentRecord (or legacy::AgentRecordV1, read only:
//!                     a host enrolled before clusters is a standalone host)
//! tree "revocations"  serial hex (utf-8) → RevocationRecord
//! tree "vms"          VM name (utf-8) → VmRecord (its `id` is the VM's UUID once its host
//!                     reported one; before identities, the name)
//! tree "vm_identity"  VM name (utf-8) → VmIdentity (UUID, cluster, conflict, missing)
//! tree "vm_uuids"     VM UUID (utf-8) → VM name (utf-8)
//! tree "vm_hosts"     host name ‖ 0x00 ‖ VM name → empty: the VMs recorded on each host
//! tree "vm_conflicts" claiming host ‖ 0x00 ‖ VM name → empty: the conflicts each host stirs
//! tree "vm_owner"     VM name (utf-8) → VmOwnership (this coordinator's epoch, the claim the
//!                     VM's host last reported)
//! tree "groups"       group name (utf-8) → GroupRecord (or legacy::GroupRecordV2 / V1, read only)
//! tree "jobs"         job id u64 BE → JobRecord
//! tree "schedules"    group name ‖ 0x00 ‖ schedule kind (utf-8) → next run, Unix seconds u64 BE
//! tree "replicas"     VM id ‖ 0x00 ‖ disk name → ReplicaRecord
//! tree "kept"         VM name → retention seconds (u64 BE) of data kept when it left protection
//! tree "rps"          VM id ‖ 0x00 ‖ created_at ms u64 BE ‖ rp id [16] → RecoveryPointRecord
//! tree "chunks"       chunk id [32] → pack::Location (16 bytes: pack u32 BE, offset u64 BE, len u32 BE)
//! tree "bad_chunks"   chunk id [32] → BadChunk
//! tree "rp_checks"    rp id [16] → RpCheck, the last verification of a recovery point
//!                     (removed with the point)
//! tree "packs"        pack id u32 BE → durable length u64 BE
//! tree "instant"      recovered VM name (utf-8) → InstantRecord, an instant recovery
//! tree "coordinators" coordinator name (utf-8) → CoordinatorRecord, the deployment's
//!                     coordinators this one knows (itself included)
//! tree "join_tokens"  secret_hash [32] → JoinTokenRecord, tokens for coordinators
//! tree "group_auto"   group name (utf-8) → cluster name (utf-8): groups protecting a whole
//!                     cluster
//! meta "next_job_id"  u64 BE
//! meta "store_key_check" [32], the check value of an encrypted store's key (store::key)
//! ```
//! Writes that must survive a crash (a consumed token, a revocation, a commit) are made
//! durable before the caller is answered: sled's `flush()` and then an fsync of every file of
//! the catalog directory ([`Catalog::flush_durable`]), because sled's own flush uses
//! `sync_file_range`, which does not survive a power loss. A store commit
//! ([`Catalog::commit`]) is one sled transaction over recovery points, replicas, chunk index
//! and pack lengths: all of it or nothing. List answers read the trees a page at a time from
//! a key (`scan`): the cursor a client holds is the last key it was given, hex-encoded.

pub mod deployment;
pub mod identity;
mod inventory;
pub mod ownership;
mod records;
mod scan;
mod store_trees;

pub use inventory::DEFAULT_MAX_VMS_PER_HOST;
pub use records::*;
pub use store_trees::{replica_key, rp_key};

use bulwark_protocol::block::Digest;
use bulwark_protocol::codec;
use bulwark_protocol::HostId;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

/// sled's page cache (its default is 1 GiB): the catalog's memory is bounded by this.
pub const CACHE_BYTES: u64 = 256 << 20;

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is in use by another process (is `bulwark-coordinator serve` running?): {0}")]
    Locked(String),
    #[error("catalog I/O failed: {0}")]
    Sled(sled::Error),
    #[error("the catalog's disk is full (no space left on the device)")]
    NoSpace,
    #[error("catalog schema version {found} is not the {expected} this build understands")]
    Schema { found: u32, expected: u32 },
    #[error("catalog record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot make the catalog durable: {0}")]
    Sync(std::io::Error),
}

impl From<sled::Error> for CatalogError {
    fn from(e: sled::Error) -> Self {
        match &e {
            sled::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => CatalogError::NoSpace,
            _ => CatalogError::Sled(e),
        }
    }
}

/// Why a token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token was already used (by {by})")]
    Used { by: String },
    #[error("join token is for host {allowed}, not {asked}")]
    WrongHost { allowed: String, asked: String },
    #[error("join token was revoked")]
    Revoked,
    #[error("host {host} is enrolled; make the token with --replace {host} to re-enroll it")]
    HostEnrolled { host: String },
}

/// The catalog handle; cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    tokens: sled::Tree,
    agents: sled::Tree,
    revocations: sled::Tree,
    vms: sled::Tree,
    vm_identity: sled::Tree,
    vm_uuids: sled::Tree,
    vm_hosts: sled::Tree,
    vm_conflicts: sled::Tree,
    vm_owner: sled::Tree,
    coordinators: sled::Tree,
    join_tokens: sled::Tree,
    group_auto: sled::Tree,
    /// Held while an inventory is judged and applied: claims from two hosts are decided one
    /// after the other, each against what the other left.
    inventory_lock: std::sync::Arc<std::sync::Mutex<()>>,
    groups: sled::Tree,
    /// Each group's policy with the record it was decoded from (see [`Catalog::group_policy`]).
    policies: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (sled::IVec, Policy)>>>,
    jobs: sled::Tree,
    schedules: sled::Tree,
    replicas: sled::Tree,
    rps: sled::Tree,
    chunks: sled::Tree,
    bad_chunks: sled::Tree,
    /// What the last verification of each recovery point found, by the point's id.
    rp_checks: sled::Tree,
    instant: sled::Tree,
    packs: sled::Tree,
    /// VMs whose data was kept when they left protection: the retention they had.
    kept: sled::Tree,
}

/// Everything one store commit changes, applied atomically by [`Catalog::commit`].
#[derive(Debug, Default, Clone)]
pub struct Commit {
    /// Durable lengths of packs fsynced for this commit.
    pub packs: Vec<(u32, u64)>,
    /// Packs whose file is about to be deleted.
    pub drop_packs: Vec<u32>,
    pub replicas: Vec<ReplicaRecord>,
    pub recovery_point: Option<RecoveryPointRecord>,
    pub drop_recovery_points: Vec<RecoveryPointRecord>,
    /// Index entries to set (new or moved chunks).
    pub index_put: Vec<(Digest, Location)>,
    /// Index entries to remove, only if they still hold the given location.
    pub index_drop: Vec<(Digest, Location)>,
    /// Bad-chunk marks healed by this commit.
    pub healed: Vec<Digest>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, CatalogError> {
    codec::encode(v).map_err(|e| CatalogError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, CatalogError> {
    codec::decode(bytes).map_err(|e| CatalogError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

/// Decodes a record stored in the current layout or, failing that, in its `legacy` one.
fn decode_either<T: DeserializeOwned, L: DeserializeOwned + Into<T>>(
    key: &str,
    bytes: &[u8],
) -> Result<T, CatalogError> {
    match decode::<T>(key, bytes) {
        Ok(v) => Ok(v),
        Err(current) => codec::decode::<L>(bytes).map(Into::into).map_err(|_| current),
    }
}

fn decode_token(bytes: &[u8]) -> Result<TokenRecord, CatalogError> {
    decode_either::<TokenRecord, legacy::TokenRecordV1>("tokens", bytes)
}

fn decode_agent(key: &str, bytes: &[u8]) -> Result<AgentRecord, CatalogError> {
    decode_either::<AgentRecord, legacy::AgentRecordV1>(key, bytes)
}

fn decode_group(key: &str, bytes: &[u8]) -> Result<GroupRecord, CatalogError> {
    // Each older layout is a strict prefix of the next one: only one of them decodes.
    decode_either::<GroupRecord, legacy::GroupRecordV2>(key, bytes)
        .or_else(|current| codec::decode::<legacy::GroupRecordV1>(bytes).map(Into::into).map_err(|_| current))
}

fn decode_replica(key: &str, bytes: &[u8]) -> Result<ReplicaRecord, CatalogError> {
    decode_either::<ReplicaRecord, legacy::ReplicaRecordV1>(key, bytes)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Catalog {
    /// Creates a new, empty catalog at `path` with the current schema version.
    pub fn create(path: &Path) -> Result<Self, CatalogError> {
        let cat = Self::open_raw(path)?;
        if cat.meta.get("schema_version")?.is_none() {
            cat.meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            cat.meta.insert("crl_number", &1u64.to_be_bytes())?;
        }
        cat.db.flush()?;
        Ok(cat)
    }

    /// Opens an existing catalog, checking its schema version.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let cat = Self::open_raw(path)?;
        let found = match cat.meta.get("schema_version")? {
            Some(v) => v.as_ref().try_into().map(u32::from_be_bytes).map_err(|_| CatalogError::Corrupt {
                key: "meta/schema_version".into(),
                reason: format!("{} bytes", v.len()),
            })?,
            None if cat.is_empty() => {
                // A creation interrupted before the version was stamped: nothing to lose.
                tracing::warn!(path = %path.display(), "catalog has no schema version and no data: finishing its creation");
                cat.meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                cat.meta.insert("crl_number", &1u64.to_be_bytes())?;
                cat.flush_durable()?;
                SCHEMA_VERSION
            }
            None => 0,
        };
        if found != SCHEMA_VERSION {
            return Err(CatalogError::Schema { found, expected: SCHEMA_VERSION });
        }
        cat.index_vm_hosts()?;
        Ok(cat)
    }

    fn open_raw(path: &Path) -> Result<Self, CatalogError> {
        // sled releases its file lock from a background thread a moment after a `Db` is
        // dropped, so a lock refusal is retried briefly before it means "another process".
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut cleaned = false;
        let db = loop {
            let opened =
                sled::Config::new().path(path).cache_capacity(CACHE_BYTES).mode(sled::Mode::HighThroughput).open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(io))
                    if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(CatalogError::Locked(io.to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                // sled reports corruption only after it took the lock: no live process is
                // writing a snapshot, so an unfinished one is a crash's leftover.
                Err(sled::Error::Corruption { .. })
                    if !cleaned && remove_unfinished_snapshots(path).map_err(CatalogError::Sync)? =>
                {
                    cleaned = true;
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Self {
            path: path.to_owned(),
            meta: db.open_tree("meta")?,
            tokens: db.open_tree("tokens")?,
            agents: db.open_tree("agents")?,
            revocations: db.open_tree("revocations")?,
            vms: db.open_tree("vms")?,
            vm_identity: db.open_tree("vm_identity")?,
            vm_uuids: db.open_tree("vm_uuids")?,
            vm_hosts: db.open_tree("vm_hosts")?,
            vm_conflicts: db.open_tree("vm_conflicts")?,
            vm_owner: db.open_tree("vm_owner")?,
            coordinators: db.open_tree("coordinators")?,
            join_tokens: db.open_tree("join_tokens")?,
            group_auto: db.open_tree("group_auto")?,
            inventory_lock: Default::default(),
            policies: Default::default(),
            groups: db.open_tree("groups")?,
            jobs: db.open_tree("jobs")?,
            schedules: db.open_tree("schedules")?,
            replicas: db.open_tree("replicas")?,
            rps: db.open_tree("rps")?,
            chunks: db.open_tree("chunks")?,
            bad_chunks: db.open_tree("bad_chunks")?,
            rp_checks: db.open_tree("rp_checks")?,
            instant: db.open_tree("instant")?,
            packs: db.open_tree("packs")?,
            kept: db.open_tree("kept")?,
            db,
        })
    }

    /// The check value of the store key, if the store is encrypted and recorded one.
    pub fn store_key_check(&self) -> Result<Option<[u8; 32]>, CatalogError> {
        match self.meta.get("store_key_check")? {
            None => Ok(None),
            Some(v) => <[u8; 32]>::try_from(v.as_ref()).map(Some).map_err(|_| CatalogError::Corrupt {
                key: "meta/store_key_check".into(),
                reason: format!("{} bytes", v.len()),
            }),
        }
    }

    /// Records the check value of the store key, durably.
    pub fn set_store_key_check(&self, check: [u8; 32]) -> Result<(), CatalogError> {
        self.meta.insert("store_key_check", &check)?;
        self.flush_durable()
    }

    fn is_empty(&self) -> bool {
        [&self.meta, &self.tokens, &self.agents, &self.revocations, &self.vms, &self.groups, &self.jobs]
            .iter()
            .chain([&self.schedules, &self.replicas, &self.rps, &self.chunks, &self.bad_chunks, &self.packs].iter())
            .all(|t| t.is_empty())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        Ok(())
    }

    /// Whether a process holds the catalog at `path` (sled keeps an exclusive lock on its `db`
    /// file while open); checked without waiting.
    pub fn in_use(path: &Path) -> bool {
        let Ok(f) = std::fs::File::open(path.join("db")) else { return false };
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                false
            }
            Err(_) => true,
        }
    }

    /// Makes every write so far durable against power loss, not only against a process crash:
    /// sled's flush, then an fsync of each file of the catalog directory.
    pub fn flush_durable(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        fsync_tree(&self.path).map_err(CatalogError::Sync)
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    // ---- tokens

    /// Stores a new token by the hash of its secret.
    pub fn insert_token(&self, secret_hash: [u8; 32], record: &TokenRecord) -> Result<(), CatalogError> {
        self.tokens.insert(secret_hash, encode("tokens", record)?)?;
        self.flush()
    }

    /// Changes a stored token atomically: `change` sees the token as stored and edits it (or
    /// refuses, and nothing is written). It may run more than once when another change races
    /// with it, so it must have no side effects. Answers `None` for an unknown token; a change
    /// is flushed before this returns.
    pub fn update_token<T, E>(
        &self,
        secret_hash: [u8; 32],
        mut change: impl FnMut(&mut TokenRecord) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>, CatalogError> {
        loop {
            let Some(old) = self.tokens.get(secret_hash)? else {
                return Ok(None);
            };
            let mut rec = decode_token(&old)?;
            let decided = match change(&mut rec) {
                Ok(v) => v,
                Err(e) => return Ok(Some(Err(e))),
            };
            let swapped = self.tokens.compare_and_swap(secret_hash, Some(old), Some(encode("tokens", &rec)?))?;
            if swapped.is_ok() {
                self.flush()?;
                return Ok(Some(Ok(decided)));
            }
            // Someone else changed it in between: look again.
        }
    }

    /// Marks a token used by `host` if `decide` accepts it as stored, atomically: two agents
    /// racing with one token cannot both win. Answers what `decide` answered.
    pub fn consume_token<T>(
        &self,
        secret_hash: [u8; 32],
        host: &str,
        now: u64,
        mut decide: impl FnMut(&TokenRecord) -> Result<T, TokenRefusal>,
    ) -> Result<Result<T, TokenRefusal>, CatalogError> {
        let taken = self.update_token(secret_hash, |rec| {
            let decided = decide(rec)?;
            rec.used_at = Some(now);
            rec.used_by = Some(host.to_owned());
            Ok(decided)
        })?;
        Ok(taken.unwrap_or(Err(TokenRefusal::Unknown)))
    }

    /// Gives back a token `host` consumed but could not use (its certificate could not be
    /// issued), so the agent can try again.
    pub fn release_token(&self, secret_hash: [u8; 32], host: &str) -> Result<(), CatalogError> {
        self.update_token(secret_hash, |rec| {
            if rec.used_by.as_deref() != Some(host) {
                return Err(());
            }
            rec.used_at = None;
            rec.used_by = None;
            Ok(())
        })?;
        Ok(())
    }

    /// Every stored token with the hash of its secret, oldest first.
    pub fn tokens(&self) -> Result<Vec<([u8; 32], TokenRecord)>, CatalogError> {
        let mut all = self
            .tokens
            .iter()
            .map(|entry| {
                let (k, v) = entry?;
                let hash: [u8; 32] = k.as_ref().try_into().map_err(|_| CatalogError::Corrupt {
                    key: "tokens".into(),
                    reason: format!("a {}-byte key", k.len()),
                })?;
                Ok((hash, decode_token(&v)?))
            })
            .collect::<Result<Vec<_>, CatalogError>>()?;
        all.sort_by_key(|(hash, t)| (t.created_at, *hash));
        Ok(all)
    }

    /// The hashes of the tokens whose hash starts with `prefix` (a token's public id).
    pub fn token_hashes_with_prefix(&self, prefix: &[u8]) -> Result<Vec<[u8; 32]>, CatalogError> {
        let mut out = vec![];
        for key in self.tokens.scan_prefix(prefix).keys() {
            let key = key?;
            if let Ok(hash) = key.as_ref().try_into() {
                out.push(hash);
            }
        }
        Ok(out)
    }

    /// Removes tokens `purgeable` says are done with, looking at no more than `scan_limit`
    /// of them; answers how many were removed.
    pub fn purge_tokens(
        &self,
        scan_limit: usize,
        purgeable: impl Fn(&TokenRecord) -> bool,
    ) -> Result<usize, CatalogError> {
        let mut doomed = vec![];
        for entry in self.tokens.iter().take(scan_limit) {
            let (k, v) = entry?;
            // An unreadable record is left for an operator to see, never silently dropped.
            if decode_token(&v).is_ok_and(|t| purgeable(&t)) {
                doomed.push((k, v));
            }
        }
        let mut removed = 0;
        for (k, v) in doomed {
            // Only if it did not change meanwhile.
            if self.tokens.compare_and_swap(k, Some(v), None::<&[u8]>)?.is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            self.flush()?;
        }
        Ok(removed)
    }

    // ---- agents

    pub fn agent(&self, host: &str) -> Result<Option<AgentRecord>, CatalogError> {
        self.agents.get(host.as_bytes())?.map(|v| decode_agent(&format!("agents/{host}"), &v)).transpose()
    }

    /// The cluster `host` belongs to: the one its join token named, or the host's own name for
    /// a standalone host (and for every host enrolled before clusters existed). `None` if no
    /// host of that name was ever enrolled; a revoked host keeps answering its last cluster.
    pub fn host_cluster(&self, host: &HostId) -> Result<Option<String>, CatalogError> {
        Ok(self.agent(host.as_str())?.map(|a| a.cluster))
    }

    pub fn put_agent(&self, rec: &AgentRecord) -> Result<(), CatalogError> {
        self.agents.insert(rec.host.as_bytes(), encode("agents", rec)?)?;
        Ok(())
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, CatalogError> {
        self.agents.iter().values().map(|v| decode_agent("agents", &v?)).collect()
    }

    /// Updates `last_seen` (and the version it reported) of an agent.
    pub fn touch_agent(&self, host: &str, now: u64, version: Option<&str>) -> Result<(), CatalogError> {
        if let Some(mut rec) = self.agent(host)? {
            rec.last_seen = Some(now);
            if let Some(v) = version {
                rec.agent_version = Some(v.to_owned());
            }
            self.put_agent(&rec)?;
        }
        Ok(())
    }

    // ---- revocations

    /// Records revocations and bumps the CRL number; returns the new CRL number.
    pub fn revoke(&self, records: &[RevocationRecord]) -> Result<u64, CatalogError> {
        for r in records {
            self.revocations.insert(r.serial.as_bytes(), encode("revocations", r)?)?;
        }
        let next = self.crl_number()? + 1;
        self.meta.insert("crl_number", &next.to_be_bytes())?;
        self.flush()?;
        Ok(next)
    }

    pub fn revocations(&self) -> Result<Vec<RevocationRecord>, CatalogError> {
        self.revocations.iter().values().map(|v| decode("revocations", &v?)).collect()
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, CatalogError> {
        Ok(self.revocations.contains_key(serial.as_bytes())?)
    }

    pub fn crl_number(&self) -> Result<u64, CatalogError> {
        match self.meta.get("crl_number")? {
            Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| CatalogError::Corrupt {
                key: "meta/crl_number".into(),
                reason: format!("{} bytes", v.len()),
            }),
            None => Ok(1),
        }
    }
}

/// sled 0.34.7 writes a snapshot to `snap.N.generating`, fsyncs it and only then renames it to
/// `snap.N`; but when it opens, it reads the highest-named `snap.*` file, `.generating` ones
/// included, and refuses to open ("Read corrupted data") if a kill left one behind
/// (spacejam/sled#1527). Such a file left by a crash is an unfinished temporary: the previous snapshot
/// and the log are the real state, so it is removed and the open retried. Returns whether it
/// removed anything.
fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an unfinished sled snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    if removed {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(removed)
}

fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            fsync_tree(&entry.path())?;
        } else if ty.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_at: u64, host: Option<&str>) -> TokenRecord {
        TokenRecord {
            created_at: 0,
            expires_at,
            host: host.map(str::to_owned),
            used_at: None,
            used_by: None,
            cluster: None,
            replace: None,
            revoked_at: None,
        }
    }

    /// Groups written before `--verify` (and before `--exclude-disk`) still read, as `off`.
    #[test]
    fn groups_of_earlier_layouts_read_with_verification_off() {
        #[derive(serde::Serialize)]
        struct P2 {
            sync_every_secs: Option<u64>,
            recovery_points: Vec<u16>,
            express_full_before_rp: bool,
            retention_secs: u64,
            cc_when_inconsistent: bool,
            cc_at: Option<u16>,
            replica_creation: String,
            block_size: u32,
            exclude_disks: Vec<(String, String)>,
        }
        #[derive(serde::Serialize)]
        struct G2 {
            name: String,
            members: Vec<String>,
            policy: P2,
            created_at: u64,
        }
        let policy = P2 {
            sync_every_secs: Some(900),
            recovery_points: vec![480],
            express_full_before_rp: false,
            retention_secs: 86_400 * 5,
            cc_when_inconsistent: true,
            cc_at: None,
            replica_creation: "now".into(),
            block_size: 1 << 20,
            exclude_disks: vec![("a".into(), "b".into())],
        };
        let old = G2 { name: "g".into(), members: vec!["a".into()], policy, created_at: 1_700_000_000 };
        let g = decode_group("groups", &codec::encode(&old).unwrap()).unwrap();
        assert_eq!(g.policy.verify, VerifyMode::Off);
        assert_eq!(g.policy.exclude_disks, vec![("a".to_owned(), "b".to_owned())]);
        assert_eq!((g.created_at, g.policy.sync_every_secs), (1_700_000_000, Some(900)));
        let mut now = g.clone();
        now.policy.verify = VerifyMode::Daily;
        assert_eq!(decode_group("groups", &codec::encode(&now).unwrap()).unwrap(), now);
    }

    /// Consumes a token for a host nobody enrolled yet, deciding as enrollment does.
    fn consume(cat: &Catalog, hash: [u8; 32], host: &str, now: u64) -> Result<Result<(), TokenRefusal>, CatalogError> {
        let asked = HostId::new(host).unwrap();
        cat.consume_token(hash, host, now, |t| crate::enrollment::admit(t, &asked, None, now).map(|_| ()))
    }

    fn agent(host: &str) -> AgentRecord {
        AgentRecord {
            host: host.into(),
            cert_serial: "0a".into(),
            enrolled_at: 1,
            cert_not_after: 2,
            revoked: false,
            last_seen: Some(3),
            agent_version: Some("0.1.0".into()),
            vms: 4,
            cluster: "c1".into(),
        }
    }

    #[test]
    fn agents_and_tokens_written_before_clusters_are_still_read() {
        #[derive(Serialize)]
        struct OldAgent<'a>(&'a str, &'a str, u64, u64, bool, Option<u64>, Option<&'a str>, u32);
        #[derive(Serialize)]
        struct OldToken<'a>(u64, u64, Option<&'a str>, Option<u64>, Option<&'a str>);
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let old = OldAgent("old1", "0b", 1, 2, false, Some(3), Some("0.1.0"), 4);
        cat.agents.insert("old1", codec::encode(&old).unwrap()).unwrap();
        cat.tokens.insert([5; 32], codec::encode(&OldToken(0, 100, Some("old2"), None, None)).unwrap()).unwrap();
        cat.put_agent(&agent("new1")).unwrap();

        let read = cat.agent("old1").unwrap().unwrap();
        assert_eq!((read.cert_serial.as_str(), read.vms, read.cluster.as_str()), ("0b", 4, "old1"));
        assert_eq!(cat.host_cluster(&HostId::new("old1").unwrap()).unwrap().as_deref(), Some("old1"));
        assert_eq!(cat.host_cluster(&HostId::new("new1").unwrap()).unwrap().as_deref(), Some("c1"));
        assert_eq!(cat.host_cluster(&HostId::new("nobody").unwrap()).unwrap(), None);
        assert_eq!(cat.agents().unwrap().len(), 2);
        assert_eq!(consume(&cat, [5; 32], "old2", 1).unwrap(), Ok(()));
        assert_eq!(cat.tokens().unwrap()[0].1.used_by.as_deref(), Some("old2"));
    }

    #[test]
    fn a_refused_token_is_left_as_it_was_and_a_released_one_works_again() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        cat.insert_token([1; 32], &token(100, Some("n1"))).unwrap();
        assert!(consume(&cat, [1; 32], "n2", 1).unwrap().is_err());
        assert_eq!(cat.tokens().unwrap()[0].1, token(100, Some("n1")));
        assert_eq!(consume(&cat, [1; 32], "n1", 1).unwrap(), Ok(()));
        cat.release_token([1; 32], "n1").unwrap();
        assert_eq!(cat.tokens().unwrap()[0].1, token(100, Some("n1")));
    }

    #[test]
    fn purging_removes_only_what_it_is_told_and_looks_at_a_bounded_number() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        for i in 0..10u8 {
            cat.insert_token([i; 32], &token(u64::from(i), None)).unwrap();
        }
        assert_eq!(cat.purge_tokens(3, |t| t.expires_at < 5).unwrap(), 3);
        assert_eq!(cat.purge_tokens(100, |t| t.expires_at < 5).unwrap(), 2);
        assert_eq!(cat.tokens().unwrap().len(), 5);
        assert_eq!(cat.token_hashes_with_prefix(&[7; 8]).unwrap(), vec![[7; 32]]);
        assert!(cat.token_hashes_with_prefix(&[1; 8]).unwrap().is_empty());
    }

    #[test]
    fn tokens_page_in_id_order_and_the_pages_chain_to_every_token() {
        use bulwark_protocol::paging::{PageBuilder, PageRequest};
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        let hashes: Vec<[u8; 32]> = (0..2500u32).map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes()).collect();
        for h in &hashes {
            cat.insert_token(*h, &token(9, None)).unwrap();
        }
        let mut req = PageRequest { limit: Some(1000), after: None };
        let (mut seen, mut pages) = (vec![], 0);
        loop {
            let after = req.after_key().unwrap();
            let mut page = PageBuilder::new(&req);
            for r in cat.tokens_after(after.as_deref()) {
                let (key, _) = r.unwrap();
                if !page.offer(&key.clone(), Some(key)) {
                    break;
                }
            }
            let page = page.finish();
            pages += 1;
            seen.extend(page.items);
            match page.next {
                Some(next) => req = req.after(next),
                None => break,
            }
        }
        let mut want: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
        want.sort();
        assert_eq!(pages, 3);
        assert_eq!(seen, want, "every token once, in id (hash) order");
    }

    #[test]
    fn a_token_is_usable_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        cat.insert_token([1; 32], &token(100, None)).unwrap();
        assert_eq!(consume(&cat, [1; 32], "n1", 10).unwrap(), Ok(()));
        assert_eq!(consume(&cat, [1; 32], "n2", 11).unwrap(), Err(TokenRefusal::Used { by: "n1".into() }));
        assert_eq!(consume(&cat, [2; 32], "n1", 10).unwrap(), Err(TokenRefusal::Unknown));
    }

    #[test]
    fn expired_and_host_bound_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        cat.insert_token([1; 32], &token(100, None)).unwrap();
        assert_eq!(consume(&cat, [1; 32], "n1", 100).unwrap(), Err(TokenRefusal::Expired));
        cat.insert_token([2; 32], &token(100, Some("n1"))).unwrap();
        assert!(matches!(consume(&cat, [2; 32], "n2", 1).unwrap(), Err(TokenRefusal::WrongHost { .. })));
        assert_eq!(consume(&cat, [2; 32], "n1", 1).unwrap(), Ok(()));
    }

    #[test]
    fn racing_enrollments_with_one_token_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        cat.insert_token([9; 32], &token(u64::MAX, None)).unwrap();
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let cat = cat.clone();
                    s.spawn(move || consume(&cat, [9; 32], &format!("n{i}"), 1).unwrap().is_ok() as usize)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn an_empty_catalog_without_a_version_is_an_interrupted_creation() {
        let dir = tempfile::tempdir().unwrap();
        drop(sled::open(dir.path()).unwrap());
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(cat.crl_number().unwrap(), 1);
        // But a catalog with data and no version is refused.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("agents").unwrap().insert("x", "y").unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(Catalog::open(dir.path()), Err(CatalogError::Schema { found: 0, .. })));
    }

    #[test]
    fn an_unfinished_sled_snapshot_left_by_a_kill_does_not_stop_the_catalog_opening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cat = Catalog::create(dir.path()).unwrap();
            cat.insert_token([1; 32], &token(100, None)).unwrap();
        }
        // What sled leaves when killed between creating and renaming a snapshot.
        std::fs::write(dir.path().join("snap.00000000FFFFFFFF.generating"), b"").unwrap();
        assert!(sled::open(dir.path()).is_err(), "sled alone refuses this directory");
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(consume(&cat, [1; 32], "n", 1).unwrap(), Ok(()));
    }

    #[test]
    fn a_catalog_of_another_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cat = Catalog::create(dir.path()).unwrap();
            cat.meta.insert("schema_version", &99u32.to_be_bytes()).unwrap();
            cat.flush().unwrap();
        }
        assert!(matches!(Catalog::open(dir.path()), Err(CatalogError::Schema { found: 99, expected: 1 })));
    }

    #[test]
    fn revocations_bump_the_crl_number() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::create(dir.path()).unwrap();
        assert_eq!(cat.crl_number().unwrap(), 1);
        let n = cat.revoke(&[RevocationRecord { serial: "0a".into(), host: "n".into(), revoked_at: 5 }]).unwrap();
        assert_eq!(n, 2);
        assert!(cat.is_revoked("0a").unwrap());
    }
}
