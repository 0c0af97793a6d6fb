//! After the faults: settle the cluster, then check the invariants.
//!
//! - `replica-consistent`: after one round of consistency checks every replica is consistent;
//! - `no-stuck-job`: no job stays queued or running;
//! - `rp-ground-truth`: every recovery point in the catalog restores (a real `recover-disk`
//!   stream) to exactly the guest's view at one of the VM's snapshot points, and the snapshot
//!   points of a VM's recovery points go forward in creation order;
//! - `no-frozen-vm`: no VM is left frozen or paused by a snapshot, holds a snapshot, or has an
//!   overlay left behind;
//! - `verify-clean`: store verification succeeds;
//! - `no-panic`: no process log shows a panic;
//! - with several coordinators (multi): `one-owner`, every VM is claimed and protected (group
//!   member, not lost) by exactly the coordinator its claim names. Checks, backups and
//!   recovery points are each coordinator's own: a VM's points at each coordinator must match
//!   the guest's snapshot points, in order.

use super::procs::World;
use super::{RunOutcome, Violation};
use bulwark_agent::sim;
use bulwark_protocol::messages::{AdminRequest, AdminResponse, BackupKind, MaintenanceKind};
use std::time::Duration;

fn violation(outcome: &mut RunOutcome, seed: u64, invariant: &str, detail: String) {
    eprintln!("chaos: seed {seed}: {invariant}: {detail}");
    outcome.violations.push(Violation { seed, invariant: invariant.into(), detail });
}

/// Brings the cluster to rest and checks every invariant, recording violations in `outcome`.
pub fn settle_and_check(
    world: &mut World,
    names: &[String],
    seed: u64,
    outcome: &mut RunOutcome,
) -> anyhow::Result<()> {
    let hosts = world.agents.len();
    let coordinators = world.coordinator_count();
    let multi = coordinators > 1;
    for i in 0..coordinators {
        world.wait("every agent connected", Duration::from_secs(90), |w| {
            let agents = w.must_all_at(
                i,
                |page| AdminRequest::AgentList { page },
                |r| match r {
                    AdminResponse::Agents(p) => Some(p),
                    _ => None,
                },
            )?;
            Ok(agents.iter().filter(|a| a.connected).count() == hosts)
        })?;
        let idle = |w: &World| -> anyhow::Result<bool> {
            Ok(w.jobs_at(i, Some("running"))?.is_empty() && w.jobs_at(i, Some("queued"))?.is_empty())
        };
        // Retries of failed jobs may still be queued: give them time to end.
        if world.wait("the jobs to end", Duration::from_secs(240), idle).is_err() {
            let stuck: Vec<String> = world
                .jobs_at(i, None)?
                .iter()
                .filter(|j| j.state == "running" || j.state == "queued")
                .map(|j| format!("job {} {} of {} {}", j.id, j.kind, j.vm.clone().unwrap_or_default(), j.state))
                .collect();
            violation(outcome, seed, "no-stuck-job", stuck.join("; "));
        }
    }
    if multi {
        // A take-over's new owner adds the VM to its auto group on its host's next inventory.
        let settled = world.wait("every VM protected by its owner", Duration::from_secs(120), |w| {
            for vm in names {
                let Some(i) = w.owner_of(vm) else { return Ok(false) };
                if !w.vms_at(i)?.iter().any(|v| &v.name == vm && v.group.is_some()) {
                    return Ok(false);
                }
            }
            Ok(true)
        });
        if let Err(e) = settled {
            violation(outcome, seed, "one-owner", format!("{e:#}"));
        }
    }

    // One round of consistency checks where needed, then a final express full of every VM, at
    // its owner.
    for vm in names {
        let owner = world.owner_of(vm).unwrap_or(0);
        for attempt in 0..5 {
            let state = world.vms_at(owner)?.into_iter().find(|v| &v.name == vm).map(|v| v.replica_state);
            if state.as_deref() == Some("consistent") {
                break;
            }
            let job = world.run_job_at(owner, AdminRequest::ConsistencyCheck { vm: vm.clone() })?;
            if job.state != "succeeded" && attempt == 4 {
                violation(outcome, seed, "replica-consistent", format!("{vm}: the check failed: {:?}", job.error));
            }
        }
        let mut last = None;
        for _ in 0..5 {
            let job =
                world.run_job_at(owner, AdminRequest::Backup { vm: vm.clone(), kind: BackupKind::ExpressFull })?;
            if job.state == "succeeded" {
                last = None;
                break;
            }
            last = job.error;
            std::thread::sleep(Duration::from_secs(1));
        }
        if let Some(e) = last {
            violation(outcome, seed, "final-backup", format!("{vm}: the final express full failed five times: {e}"));
        }
    }
    for i in 0..coordinators {
        for v in world.vms_at(i)? {
            let owner = world.owner_of(&v.name).unwrap_or(0);
            if names.contains(&v.name) && owner == i && v.replica_state != "consistent" {
                violation(
                    outcome,
                    seed,
                    "replica-consistent",
                    format!("{}: {} ({:?})", v.name, v.replica_state, v.replica_reason),
                );
            }
            // Exactly one coordinator protects each VM: the one its claim names.
            if multi && names.contains(&v.name) && v.group.is_some() && v.status == "protected" && owner != i {
                violation(
                    outcome,
                    seed,
                    "one-owner",
                    format!(
                        "{}: protected by {} while its claim names {}",
                        v.name,
                        super::procs::coordinator_name(i),
                        super::procs::coordinator_name(owner)
                    ),
                );
            }
        }
    }

    // Every recovery point, at every coordinator, against the ground truth.
    let scratch = world.dir.join("restore.img");
    for (vm, i) in names.iter().flat_map(|vm| (0..coordinators).map(move |i| (vm, i))) {
        let truth = sim::ground_truth(&world.sim_root, vm)?;
        let rps = world.must_all_at(
            i,
            |page| AdminRequest::RecoveryPoints { vm: vm.clone(), page },
            |r| match r {
                AdminResponse::RecoveryPoints(p) => Some(p),
                _ => None,
            },
        )?;
        let mut at = 0usize; // the earliest snapshot the next recovery point may be
        for rp in &rps {
            outcome.recovery_points_checked += 1;
            let mut digests = std::collections::BTreeMap::new();
            for d in &rp.disks {
                world.recover_disk_at(i, vm, &rp.id, d.name.as_str(), &scratch)?;
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(&scratch)?)?;
                digests.insert(d.name.as_str().to_owned(), h.finalize().to_hex().to_string());
            }
            match truth.iter().skip(at).position(|t| t.disks == digests) {
                Some(i) => {
                    at += i;
                    outcome.restores_verified += rp.disks.len() as u64;
                }
                None => {
                    let anywhere = truth.iter().position(|t| t.disks == digests);
                    violation(
                        outcome,
                        seed,
                        "rp-ground-truth",
                        format!(
                            "{vm}: recovery point {} (created {}) {}",
                            rp.id,
                            rp.created_at,
                            match anywhere {
                                Some(i) => format!(
                                    "matches snapshot {} of {}, but out of order",
                                    truth[i].snapshot,
                                    truth.len()
                                ),
                                None => format!("matches none of the {} snapshot points of the guest", truth.len()),
                            }
                        ),
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(&scratch);

    for vm in names {
        let v = sim::Vm::open(&world.sim_root, vm)?;
        let c = &v.config;
        if c.frozen.is_some() || c.snapshot.is_some() || c.power == sim::Power::Paused {
            violation(
                outcome,
                seed,
                "no-frozen-vm",
                format!("{vm}: frozen {:?}, snapshot {:?}, power {:?}", c.frozen, c.snapshot, c.power),
            );
        }
        for e in std::fs::read_dir(v.dir())?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".overlay") || name.ends_with(".overlay.map") {
                violation(outcome, seed, "no-frozen-vm", format!("{vm}: overlay {name} left behind"));
            }
        }
    }

    for i in 0..coordinators {
        let verify = world.run_job_at(i, AdminRequest::Maintenance { kind: MaintenanceKind::Verify, wait: false })?;
        if verify.state != "succeeded" {
            violation(outcome, seed, "verify-clean", format!("verify {}: {:?}", verify.state, verify.error));
        }
    }

    for (name, log) in world.logs() {
        if let Some(line) = log.lines().find(|l| l.contains("panicked at")) {
            violation(outcome, seed, "no-panic", format!("{name}: {line}"));
        }
    }
    Ok(())
}
