//! The end of a seed: the invariants checked once the faults are over (every recovery point
//! against the ground truth, the replicas against the guests), then recoveries and item
//! recoveries, each checked byte for byte.

use super::*;

/// Chaining values of recovery-point blocks already read, by (chunk id, block index): the
/// recovery points of a VM share most of their blocks, so the end checks read and hash each
/// (chunk, place) once instead of once a recovery point.
pub(super) type BlockCvs =
    std::collections::HashMap<(bulwark_protocol::block::Digest, u64), blake3::hazmat::ChainingValue>;

/// BLAKE3 (hex) of a recovery point's (or replica's) disk, from its chunks as the store reads
/// them (each checked against its id), merged along BLAKE3's tree as the sim's ground truth is.
fn rp_digest(store: &bulwark_coordinator::store::Store, disk: &RpDisk, memo: &mut BlockCvs) -> anyhow::Result<String> {
    if u64::from(disk.block_size) != sim::truth::BLOCK || disk.size_bytes <= sim::truth::BLOCK {
        return Ok(hex(&store.disk_digest(disk)?));
    }
    let bs = sim::truth::BLOCK;
    let mut cvs = Vec::with_capacity(disk.size_bytes.div_ceil(bs) as usize);
    blockmap::for_each_leaf(&StorePages(store), &disk.root, |index, id| {
        let offset = index * bs;
        let len = bs.min(disk.size_bytes.saturating_sub(offset)) as usize;
        let cv = match memo.get(&(id, index)) {
            Some(cv) => *cv,
            None => {
                let data = if id == bulwark_protocol::block::ZERO { vec![0u8; len] } else { store.read_chunk(&id)? };
                if data.len() != len {
                    return Err(StoreError::BlockMap(format!("block {index} is {} bytes, expected {len}", data.len())));
                }
                let cv = sim::truth::block_cv(offset, &data);
                memo.insert((id, index), cv);
                cv
            }
        };
        cvs.push(cv);
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("reading {}: {e}", disk.name))?;
    anyhow::ensure!(cvs.len() as u64 == disk.size_bytes.div_ceil(bs), "{}: the block map misses blocks", disk.name);
    let root = sim::truth::root(disk.size_bytes, &cvs, || Err(std::io::Error::other("a one-block disk")))?;
    Ok(root.to_hex().to_string())
}

/// Item recoveries, last: one more of the file-system VM's latest recovery point, which must
/// finish; then every item recovery that finished (those during the faults too) must have
/// written exactly the files of its recovery point's file system, byte for byte, as fatfs
/// reads them from the store (`items-exact`).
pub(super) fn items(w: &mut World) -> anyhow::Result<()> {
    let start = w.now;
    let h = w.rng.gen_range(0..w.agents.len());
    let last = w.items_dir.join((w.items_started + 1).to_string()).to_string_lossy().into_owned();
    for m in w.start_items(h).map_err(anyhow::Error::msg)? {
        w.send(h, ITEMS_COORDINATOR, true, 0, m);
    }
    let done = |w: &World| w.coordinators[ITEMS_COORDINATOR].as_ref().is_some_and(|c| c.item_jobs.is_empty());
    if !w.run_until(start + 60_000, done).map_err(anyhow::Error::msg)? {
        w.out.violations.push(("items-finished".into(), "the item recovery did not end within 60 s".into()));
    }
    let Some(c) = w.coordinators[ITEMS_COORDINATOR].as_ref() else {
        anyhow::bail!("no coordinator after the item recoveries")
    };
    let mut violations = vec![];
    for (vm, rp, dest, outcome) in &c.items_recovered {
        match outcome {
            Err(e) if *dest == last => {
                violations.push(("items-finished".into(), format!("{vm} into {dest} failed without faults: {e}")))
            }
            Err(_) => {}
            Ok(()) => {
                let Some(disk) = rp.disks.first() else { continue };
                let mut image = Vec::with_capacity(disk.size_bytes as usize);
                c.store.read_disk(disk, |_, b| {
                    match b {
                        bulwark_coordinator::store::BlockData::Zero(n) => image.resize(image.len() + n, 0),
                        bulwark_coordinator::store::BlockData::Data(d) => image.extend_from_slice(d),
                    }
                    Ok(())
                })?;
                let want = guestfs::files_of(image).map_err(anyhow::Error::msg)?;
                let got = guestfs::files_under(Path::new(dest)).map_err(anyhow::Error::msg)?;
                if got != want {
                    let differ: std::collections::BTreeSet<&String> =
                        want.keys().chain(got.keys()).filter(|k| want.get(*k) != got.get(*k)).collect();
                    let sizes: Vec<String> = differ
                        .iter()
                        .take(4)
                        .map(|k| {
                            let len = |m: &BTreeMap<String, Vec<u8>>| {
                                m.get(*k).map_or("none".into(), |b| b.len().to_string())
                            };
                            format!("{k}: {} bytes in the recovery point, {} restored", len(&want), len(&got))
                        })
                        .collect();
                    violations.push(("items-exact".into(), format!("{vm} into {dest}: {}", sizes.join("; "))));
                }
                w.out.items_verified += 1;
            }
        }
    }
    w.out.violations.extend(violations);
    Ok(())
}

/// Recoveries, after the invariants: each VM's latest recovery point on its owner is recovered
/// as a new VM on a host through the real `Recovery` and `RestoreDisk`, which must finish and
/// give the recovery point's bytes exactly (`restore-exact`).
pub(super) fn restores(w: &mut World, memo: &mut BlockCvs) -> anyhow::Result<()> {
    // A batch at a time: each recovery holds its new VM's image open until it ends.
    const BATCH: usize = 256;
    let vms = w.vms.clone();
    for (b, batch) in vms.chunks(BATCH).enumerate() {
        let start = w.now;
        for (j, vm) in batch.iter().enumerate() {
            let h = (b * BATCH + j) % w.agents.len();
            let target = format!("{vm}-r");
            let owner = *w.owner.get(vm).unwrap_or(&0);
            let Some(c) = w.coordinators[owner].as_mut() else { anyhow::bail!("no coordinator for the recoveries") };
            for m in c.recover(vm, &target, h, start).map_err(anyhow::Error::msg)? {
                w.send(h, owner, true, 0, m);
            }
        }
        let done = |w: &World| w.coordinators.iter().all(|c| c.as_ref().is_some_and(|c| c.recoveries.is_empty()));
        if !w.run_until(start + 60_000, done).map_err(anyhow::Error::msg)? {
            w.out.violations.push(("restore-finished".into(), "the recoveries did not end within 60 s".into()));
            break;
        }
    }
    let mut violations = vec![];
    for c in w.coordinators.iter().flatten() {
        for (vm, rp, target, outcome) in &c.recovered {
            let Some(disk) = rp.disks.first() else { continue };
            match outcome {
                Err(e) => violations.push(("restore-exact".into(), format!("{vm} to {target} failed: {e}"))),
                Ok(()) => {
                    let want = rp_digest(&c.store, disk, memo)?;
                    let got = Vm::open(&w.root, target)?.guest_digest(DISK)?.to_hex().to_string();
                    if got != want {
                        violations.push(("restore-exact".into(), format!("{target} is not {vm}'s recovery point")));
                    }
                    w.out.restores_verified += 1;
                }
            }
        }
    }
    w.out.violations.extend(violations);
    Ok(())
}

/// The invariants, and the digest of the final catalogs.
pub(super) fn check(w: &mut World, memo: &mut BlockCvs) -> anyhow::Result<()> {
    let mut violations = vec![];
    let mut digest = blake3::Hasher::new();
    for line in &w.out.timeline {
        digest.update(line.as_bytes());
    }
    let mut checked = 0;
    for name in &w.vms.clone() {
        let vm = Vm::open(&w.root, name)?;
        if vm.config.frozen.is_some() || vm.config.snapshot.is_some() || vm.config.power == Power::Paused {
            violations
                .push(("no-frozen-vm".into(), format!("{name}: {:?} {:?}", vm.config.frozen, vm.config.snapshot)));
        }
        // The claim on the storage names the owner the world followed.
        let owner = *w.owner.get(name).unwrap_or(&0);
        match w.read_claim(name).map_err(anyhow::Error::msg)? {
            Some((o, _)) if o == owner => {}
            other => violations.push(("claim-owner".into(), format!("{name}: owned by {owner}, claim {other:?}"))),
        }
        let truth = sim::ground_truth(&w.root, name)?;
        for (ci, c) in w.coordinators.iter().enumerate() {
            let Some(c) = c.as_ref() else { anyhow::bail!("no coordinator {ci} at the end") };
            // Prefixed with several coordinators only: one coordinator's digest is as before.
            let label = if w.coordinators.len() == 1 { String::new() } else { format!("{} ", c.name) };
            // Every recovery point is the guest's view at one of its snapshot points, in order
            // (each coordinator's, whoever owned the VM when it was made).
            let mut rps = c.store.catalog().recovery_points(name)?;
            rps.sort_by_key(|r| r.created_at);
            let mut from = 0;
            for rp in &rps {
                let Some(disk) = rp.disks.first() else { continue };
                let got = rp_digest(&c.store, disk, memo)?;
                checked += 1;
                match truth.iter().skip(from).position(|t| t.disks.get(DISK) == Some(&got)) {
                    Some(i) => from += i + 1,
                    None => violations.push((
                        "rp-ground-truth".into(),
                        format!(
                            "{label}{name}: the recovery point of {} ms matches no later snapshot point",
                            rp.created_at
                        ),
                    )),
                }
                digest.update(
                    format!("{label}{name} rp {} {:?} {:?}", rp.created_at, rp.consistency, disk.root).as_bytes(),
                );
            }
            if ci != owner {
                continue;
            }
            // The owner's replica is the guest's disk as it is now (nothing was written after
            // the faults).
            match c.store.catalog().replica(name, DISK)? {
                Some(r) if r.state == ReplicaState::Consistent => {
                    if let Some(root) = r.root {
                        let disk = bulwark_coordinator::catalog::RpDisk {
                            name: DISK.into(),
                            size_bytes: r.size_bytes,
                            block_size: r.block_size,
                            root,
                        };
                        // Read whole: every block of the map, each the right length.
                        let replica = rp_digest(&c.store, &disk, memo)?;
                        if replica != vm.guest_digest(DISK)?.to_hex().to_string() || r.size_bytes != w.opts.disk_bytes {
                            violations.push((
                                "replica-current".into(),
                                format!("{label}{name}: the replica is not the guest's disk"),
                            ));
                        }
                    }
                    digest.update(format!("{label}{name} replica {:?} {:?}", r.change_token, r.root).as_bytes());
                }
                other => violations.push(("replica-consistent".into(), format!("{label}{name}: {other:?}"))),
            }
        }
    }
    for c in w.coordinators.iter().flatten() {
        if !c.item_jobs.is_empty() {
            violations
                .push(("no-stuck-job".into(), format!("item recoveries {:?}", c.item_jobs.keys().collect::<Vec<_>>())));
        }
        if !c.jobs.is_empty() {
            violations.push(("no-stuck-job".into(), format!("{:?}", c.jobs.keys().collect::<Vec<_>>())));
        }
    }
    w.out.recovery_points_checked = checked;
    w.out.violations.extend(violations);
    w.out.digest = digest.finalize().to_hex().to_string();
    Ok(())
}
