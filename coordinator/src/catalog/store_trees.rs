//! Typed access to the store's trees: replicas, recovery points, the chunk index, bad chunks,
//! pack lengths, and the one transactional [`Catalog::commit`].

use super::{
    decode, encode, BadChunk, Catalog, CatalogError, Commit, InstantRecord, RecoveryPointRecord, ReplicaRecord, RpCheck,
};
use crate::catalog::Location;
use bulwark_protocol::block::Digest;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

/// Key of a replica.
pub fn replica_key(vm: &str, disk: &str) -> Vec<u8> {
    [vm.as_bytes(), &[0], disk.as_bytes()].concat()
}

/// Key of a recovery point: ordered by VM, then time.
pub fn rp_key(rp: &RecoveryPointRecord) -> Vec<u8> {
    [rp.vm.as_bytes(), &[0], &rp.created_at.to_be_bytes(), &rp.id].concat()
}

fn vm_prefix(vm: &str) -> Vec<u8> {
    [vm.as_bytes(), &[0]].concat()
}

fn tx_encode<T: serde::Serialize>(key: &str, v: &T) -> Result<Vec<u8>, ConflictableTransactionError<CatalogError>> {
    encode(key, v).map_err(ConflictableTransactionError::Abort)
}

impl Catalog {
    /// Applies a store commit atomically, then makes it durable.
    pub fn commit(&self, c: &Commit) -> Result<(), CatalogError> {
        let trees = (&self.rps, &self.replicas, &self.chunks, &self.packs, &self.bad_chunks, &self.rp_checks);
        trees
            .transaction(|(rps, replicas, chunks, packs, bad, checks)| {
                for (id, len) in &c.packs {
                    packs.insert(&id.to_be_bytes(), &len.to_be_bytes())?;
                }
                for id in &c.drop_packs {
                    packs.remove(&id.to_be_bytes())?;
                }
                for r in &c.replicas {
                    replicas.insert(replica_key(&r.vm, &r.disk), tx_encode("replicas", r)?)?;
                }
                if let Some(rp) = &c.recovery_point {
                    rps.insert(rp_key(rp), tx_encode("rps", rp)?)?;
                }
                for rp in &c.drop_recovery_points {
                    rps.remove(rp_key(rp))?;
                    checks.remove(&rp.id[..])?;
                }
                for (id, loc) in &c.index_put {
                    chunks.insert(id, &loc.encode())?;
                }
                for (id, loc) in &c.index_drop {
                    if chunks.get(id)?.as_deref() == Some(&loc.encode()[..]) {
                        chunks.remove(id)?;
                    }
                }
                for id in &c.healed {
                    bad.remove(id)?;
                }
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => e.into(),
            })?;
        self.flush_durable()
    }

    // ---- chunk index

    /// Applies index moves and removals (not yet durable: the caller's next
    /// [`Catalog::commit`] or flush makes them so). Used by GC, which holds the store
    /// exclusively, so no compare is needed; each entry is valid on its own at every moment,
    /// so no atomicity is needed either, and the work is split over the machine's cores
    /// (sled's batches take a global lock; single writes do not).
    pub fn apply_index_changes(&self, put: &[(Digest, Location)], drop: &[Digest]) -> Result<(), CatalogError> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
        let (put_per, drop_per) = (put.len().div_ceil(threads).max(1), drop.len().div_ceil(threads).max(1));
        std::thread::scope(|s| {
            let handles: Vec<_> = put
                .chunks(put_per)
                .map(|part| {
                    s.spawn(move || -> Result<(), CatalogError> {
                        for (id, loc) in part {
                            self.chunks.insert(id, &loc.encode())?;
                        }
                        Ok(())
                    })
                })
                .chain(drop.chunks(drop_per).map(|part| {
                    s.spawn(move || -> Result<(), CatalogError> {
                        for id in part {
                            self.chunks.remove(id)?;
                        }
                        Ok(())
                    })
                }))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CatalogError::Corrupt { key: "chunks".into(), reason: "index writer panicked".into() })
                })
            })
        })
    }

    pub fn chunk(&self, id: &Digest) -> Result<Option<Location>, CatalogError> {
        match self.chunks.get(id)? {
            Some(v) => Location::decode(&v)
                .map(Some)
                .ok_or_else(|| CatalogError::Corrupt { key: "chunks".into(), reason: format!("{} bytes", v.len()) }),
            None => Ok(None),
        }
    }

    /// Records where a chunk is (not yet durable: the next commit makes it so).
    pub fn put_chunk(&self, id: &Digest, loc: &Location) -> Result<(), CatalogError> {
        self.chunks.insert(id, &loc.encode())?;
        Ok(())
    }

    /// Every index entry, in id order.
    pub fn chunk_entries(&self) -> impl Iterator<Item = Result<(Digest, Location), CatalogError>> + '_ {
        self.chunks.iter().map(|kv| {
            let (k, v) = kv?;
            let id: Digest = k
                .as_ref()
                .try_into()
                .map_err(|_| CatalogError::Corrupt { key: "chunks".into(), reason: "key".into() })?;
            let loc = Location::decode(&v)
                .ok_or_else(|| CatalogError::Corrupt { key: "chunks".into(), reason: "value".into() })?;
            Ok((id, loc))
        })
    }

    pub fn remove_chunk(&self, id: &Digest) -> Result<(), CatalogError> {
        self.chunks.remove(id)?;
        Ok(())
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    // ---- instant recoveries

    /// The instant recovery that made VM `name`, if any.
    pub fn instant(&self, name: &str) -> Result<Option<InstantRecord>, CatalogError> {
        self.instant.get(name.as_bytes())?.map(|v| decode("instant", &v)).transpose()
    }

    /// Records an instant recovery (durably: an agent's reads are authorized by it).
    pub fn put_instant(&self, r: &InstantRecord) -> Result<(), CatalogError> {
        self.instant.insert(r.name.as_bytes(), encode("instant", r)?)?;
        self.flush_durable()
    }

    /// Every instant recovery still in use, at most `limit` of them (there are few: each is a
    /// VM running from the store).
    pub fn active_instants(&self, limit: usize) -> Result<Vec<InstantRecord>, CatalogError> {
        let mut out = vec![];
        for v in self.instant.iter().values() {
            let r: InstantRecord = decode("instant", &v?)?;
            if r.is_active() {
                out.push(r);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    // ---- bad chunks

    /// The last verification of recovery point `rp`, if any.
    pub fn rp_check(&self, rp: &[u8; 16]) -> Result<Option<RpCheck>, CatalogError> {
        self.rp_checks.get(rp)?.map(|v| decode("rp_checks", &v)).transpose()
    }

    /// The verdicts kept beside recovery points: (read back whole, failed, booted, failed to
    /// boot), for the metrics.
    pub fn rp_check_counts(&self) -> Result<[u64; 4], CatalogError> {
        let mut n = [0u64; 4];
        for v in self.rp_checks.iter().values() {
            let c: RpCheck = decode("rp_checks", &v?)?;
            n[if c.verified { 0 } else { 1 }] += 1;
            match c.boot_verified {
                Some(true) => n[2] += 1,
                Some(false) => n[3] += 1,
                None => {}
            }
        }
        Ok(n)
    }

    /// Records a verification of recovery point `rp` (durably: a failed one was reported).
    /// A point dropped meanwhile gets no record.
    pub fn put_rp_check(&self, rp: &RecoveryPointRecord, check: &RpCheck) -> Result<bool, CatalogError> {
        let value = encode("rp_checks", check)?;
        // One transaction: a prune dropping the point meanwhile leaves no orphan record.
        let put = (&self.rps, &self.rp_checks)
            .transaction(|(rps, checks)| {
                if rps.get(rp_key(rp))?.is_none() {
                    return Ok(false);
                }
                checks.insert(&rp.id[..], value.clone())?;
                Ok(true)
            })
            .map_err(|e: TransactionError<CatalogError>| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => e.into(),
            })?;
        self.flush_durable()?;
        Ok(put)
    }

    pub fn mark_bad(&self, bad: &BadChunk) -> Result<(), CatalogError> {
        self.bad_chunks.insert(bad.id, encode("bad_chunks", bad)?)?;
        Ok(())
    }

    pub fn is_bad(&self, id: &Digest) -> Result<bool, CatalogError> {
        Ok(self.bad_chunks.contains_key(id)?)
    }

    pub fn bad_chunks(&self) -> Result<Vec<BadChunk>, CatalogError> {
        self.bad_chunks.iter().values().map(|v| decode("bad_chunks", &v?)).collect()
    }

    // ---- packs

    /// Records packs' durable lengths without flushing. sled recovers a prefix of its log, so
    /// any later write that survives a crash (an index move into these bytes) brings this
    /// record with it; the caller fsynced the pack data before.
    pub fn set_pack_lengths(&self, packs: &[(u32, u64)]) -> Result<(), CatalogError> {
        for (id, len) in packs {
            self.packs.insert(id.to_be_bytes(), &len.to_be_bytes())?;
        }
        Ok(())
    }

    /// Every known pack and its durable length.
    pub fn packs(&self) -> Result<Vec<(u32, u64)>, CatalogError> {
        self.packs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let bad = || CatalogError::Corrupt { key: "packs".into(), reason: "entry".into() };
                let id = u32::from_be_bytes(k.as_ref().try_into().map_err(|_| bad())?);
                let len = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| bad())?);
                Ok((id, len))
            })
            .collect()
    }

    // ---- replicas

    pub fn replica(&self, vm: &str, disk: &str) -> Result<Option<ReplicaRecord>, CatalogError> {
        self.replicas.get(replica_key(vm, disk))?.map(|v| super::decode_replica("replicas", &v)).transpose()
    }

    /// Every replica (all VMs).
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>, CatalogError> {
        self.replicas.iter().values().map(|v| super::decode_replica("replicas", &v?)).collect()
    }

    /// Replicas of one VM.
    pub fn replicas_of(&self, vm: &str) -> Result<Vec<ReplicaRecord>, CatalogError> {
        self.replicas.scan_prefix(vm_prefix(vm)).values().map(|v| super::decode_replica("replicas", &v?)).collect()
    }

    /// Stores a replica record on its own (state changes); durable.
    pub fn put_replica(&self, r: &ReplicaRecord) -> Result<(), CatalogError> {
        self.replicas.insert(replica_key(&r.vm, &r.disk), encode("replicas", r)?)?;
        self.flush_durable()
    }

    /// Marks `vm`'s consistent replicas inconsistent for `why` ([`ReplicaRecord::mark_inconsistent`]);
    /// answers the disks it marked. Durable.
    pub fn mark_inconsistent(&self, vm: &str, why: &str, now: u64) -> Result<Vec<String>, CatalogError> {
        let mut marked = vec![];
        for mut r in self.replicas_of(vm)? {
            if r.mark_inconsistent(why, now) {
                self.put_replica(&r)?;
                marked.push(r.disk);
            }
        }
        Ok(marked)
    }

    /// Forgets the replica of one disk (left out of protection: its recovery points stay until
    /// retention removes them); durable. Answers whether there was one.
    pub fn delete_replica(&self, vm: &str, disk: &str) -> Result<bool, CatalogError> {
        let existed = self.replicas.remove(replica_key(vm, disk))?.is_some();
        self.flush_durable()?;
        Ok(existed)
    }

    /// Forgets every replica of a VM (its recovery points are dropped separately); durable.
    pub fn delete_replicas_of(&self, vm: &str) -> Result<usize, CatalogError> {
        let keys: Vec<_> = self.replicas.scan_prefix(vm_prefix(vm)).keys().collect::<Result<_, _>>()?;
        for k in &keys {
            self.replicas.remove(k)?;
        }
        self.flush_durable()?;
        Ok(keys.len())
    }

    // ---- recovery points

    /// Recovery points of one VM, oldest first.
    pub fn recovery_points(&self, vm: &str) -> Result<Vec<RecoveryPointRecord>, CatalogError> {
        self.rps.scan_prefix(vm_prefix(vm)).values().map(|v| decode("rps", &v?)).collect()
    }

    /// Every recovery point of every VM.
    pub fn all_recovery_points(&self) -> Result<Vec<RecoveryPointRecord>, CatalogError> {
        self.rps.iter().values().map(|v| decode("rps", &v?)).collect()
    }
}
