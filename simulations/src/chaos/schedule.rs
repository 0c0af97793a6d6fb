//! The seeded fault schedule: a timeline of workload and faults that depends on nothing but the
//! seed, the scenario and the cluster's shape, so a seed replays the same schedule (the real
//! processes' timing around it is the machine's).

use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::fmt;

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scenario {
    /// Every kind of fault below.
    Mixed,
    /// Agents killed with SIGKILL at random moments and mid-backup, then restarted.
    Agents,
    /// The coordinator killed with SIGKILL (mid-transfer, mid-commit, idle) and restarted.
    Coordinator,
    /// Host power losses (tracking lost, agent killed) and live and storage migrations.
    Hosts,
    /// Partitions, packet loss and delay between an agent and the coordinator.
    Network,
    /// The coordinator's store disk (a small tmpfs of its own) filled to the last byte, with
    /// backups and coordinator kills while it is full. Needs root (it mounts the tmpfs).
    StoreFull,
    /// Several coordinators of one deployment partition the cluster (`--coordinators N`, at
    /// least 2; `--auto` groups): every fault of `mixed`, a kill takes one coordinator at a
    /// time, and take-overs move VMs between them.
    Multi,
}

impl Scenario {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "mixed" => Ok(Scenario::Mixed),
            "agents" => Ok(Scenario::Agents),
            "coordinator" => Ok(Scenario::Coordinator),
            "hosts" => Ok(Scenario::Hosts),
            "network" => Ok(Scenario::Network),
            "store-full" => Ok(Scenario::StoreFull),
            "multi" => Ok(Scenario::Multi),
            other => Err(format!(
                "unknown scenario {other:?} (known: mixed, agents, coordinator, hosts, network, store-full, multi; sim, sim-mixed)"
            )),
        }
    }
}

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Event {
    /// Guest writes of random data to `blocks` random 1 MiB blocks of every disk.
    Churn {
        vm: usize,
        blocks: u64,
        seed: u64,
    },
    /// An express full (or a synchronization) of a VM now.
    Backup {
        vm: usize,
        sync: bool,
    },
    /// An express full while the guest rewrites its whole disk again and again (none of what
    /// it writes after the snapshot point may reach that recovery point).
    BackupUnderLoad {
        vm: usize,
        seed: u64,
    },
    /// A consistency check now.
    Check {
        vm: usize,
    },
    /// An express full, then SIGKILL of the VM's host agent `delay_ms` after its snapshot is
    /// taken (mid-snapshot, mid-transfer or mid-commit, as the delay falls).
    BackupThenKillAgent {
        vm: usize,
        delay_ms: u64,
    },
    /// An express full, then SIGKILL of the coordinator `delay_ms` after the snapshot.
    BackupThenKillCoordinator {
        vm: usize,
        delay_ms: u64,
    },
    KillAgent {
        node: usize,
    },
    StartAgent {
        node: usize,
    },
    KillCoordinator,
    StartCoordinator,
    /// Power loss of a node: its agent dies and its running VMs lose change tracking.
    CrashHost {
        node: usize,
    },
    /// Network trouble between a node's agent and the coordinator for `ms`: everything dropped
    /// (`loss_percent` 100), a share dropped, or every datagram delayed by `delay_ms`.
    Network {
        node: usize,
        loss_percent: u8,
        delay_ms: u64,
        ms: u64,
    },
    /// Live migration (with `storage`: tracking resets).
    Migrate {
        vm: usize,
        to: usize,
        storage: bool,
    },
    /// The coordinator's store disk filled to the last byte by a ballast file, removed again
    /// after `ms`; meanwhile `vm`'s guest writes and an express full of it runs on the full
    /// disk.
    FillStore {
        ms: u64,
        vm: usize,
        seed: u64,
    },
    /// `bulwark vm take-over` of `vm` on the coordinator after its owner (multi).
    TakeOver {
        vm: usize,
    },
}

impl Event {
    /// The fault's kind in the summary, or `None` for workload.
    pub fn fault_kind(&self) -> Option<&'static str> {
        match self {
            Event::Churn { .. } | Event::Backup { .. } | Event::BackupUnderLoad { .. } | Event::Check { .. } => None,
            Event::StartAgent { .. } | Event::StartCoordinator => None,
            Event::BackupThenKillAgent { .. } => Some("kill_agent_mid_backup"),
            Event::BackupThenKillCoordinator { .. } => Some("kill_coordinator_mid_backup"),
            Event::KillAgent { .. } => Some("kill_agent"),
            Event::KillCoordinator => Some("kill_coordinator"),
            Event::CrashHost { .. } => Some("crash_host"),
            Event::Migrate { storage: false, .. } => Some("migrate"),
            Event::Migrate { storage: true, .. } => Some("migrate_storage"),
            Event::Network { loss_percent: 100, .. } => Some("partition"),
            Event::Network { delay_ms: 1.., .. } => Some("delay"),
            Event::Network { .. } => Some("packet_loss"),
            Event::FillStore { .. } => Some("store_full"),
            Event::TakeOver { .. } => Some("take_over"),
        }
    }
}

/// An event at a time (ms after the fault phase starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    pub at_ms: u64,
    pub event: Event,
}

impl fmt::Display for Timed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>7.3}s {:?}", self.at_ms as f64 / 1000.0, self.event)
    }
}

/// The schedule of `seed` for `duration_ms` on `nodes` nodes and `vms` VMs. Every process a
/// fault stops is started again 1–4 s later (and at the latest when the phase ends).
pub fn schedule(seed: u64, scenario: Scenario, nodes: usize, vms: usize, duration_ms: u64) -> Vec<Timed> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Timed> = vec![];
    let mut agent_back_at: Vec<Option<u64>> = vec![None; nodes];
    let mut coordinator_back_at: Option<u64> = None;
    let mut t = 0u64;
    let faults: &[&str] = match scenario {
        Scenario::Mixed => {
            &["kill_agent", "kill_agent_mid", "kill_coord", "kill_coord_mid", "crash", "migrate", "network"]
        }
        Scenario::Agents => &["kill_agent", "kill_agent_mid", "kill_agent_mid"],
        Scenario::Coordinator => &["kill_coord", "kill_coord_mid", "kill_coord_mid"],
        Scenario::Hosts => &["crash", "migrate", "migrate"],
        Scenario::Network => &["network"],
        Scenario::StoreFull => &["fill", "fill", "fill", "kill_coord_mid"],
        Scenario::Multi => &[
            "kill_agent",
            "kill_agent_mid",
            "kill_coord",
            "kill_coord_mid",
            "crash",
            "migrate",
            "network",
            "take_over",
            "take_over",
        ],
    };
    loop {
        t += rng.gen_range(300..1500);
        if t >= duration_ms {
            break;
        }
        // Restarts that are due come first.
        for (node, back) in agent_back_at.iter_mut().enumerate() {
            if back.is_some_and(|b| b <= t) {
                out.push(Timed { at_ms: back.unwrap_or(t), event: Event::StartAgent { node } });
                *back = None;
            }
        }
        if coordinator_back_at.is_some_and(|b| b <= t) {
            out.push(Timed { at_ms: coordinator_back_at.unwrap_or(t), event: Event::StartCoordinator });
            coordinator_back_at = None;
        }
        let vm = rng.gen_range(0..vms);
        let event = match rng.gen_range(0..11) {
            0..=3 => Event::Churn { vm, blocks: rng.gen_range(1..8), seed: rng.gen() },
            4 | 5 => Event::Backup { vm, sync: rng.gen_bool(0.2) },
            6 => Event::Check { vm },
            7 => Event::BackupUnderLoad { vm, seed: rng.gen() },
            _ => {
                let node = rng.gen_range(0..nodes);
                let back = t + rng.gen_range(1000..4000);
                match faults[rng.gen_range(0..faults.len())] {
                    "kill_agent" | "kill_agent_mid" | "crash" if agent_back_at[node].is_some() => {
                        Event::Churn { vm, blocks: 1, seed: rng.gen() }
                    }
                    "kill_agent" => {
                        agent_back_at[node] = Some(back);
                        Event::KillAgent { node }
                    }
                    "kill_agent_mid" => {
                        // The VM's host is decided when the event runs (VMs migrate); its
                        // agent comes back with the others.
                        Event::BackupThenKillAgent { vm, delay_ms: rng.gen_range(0..60) }
                    }
                    "crash" => {
                        agent_back_at[node] = Some(back);
                        Event::CrashHost { node }
                    }
                    "kill_coord" | "kill_coord_mid" if coordinator_back_at.is_some() => {
                        Event::Backup { vm, sync: false }
                    }
                    "kill_coord" => {
                        coordinator_back_at = Some(back);
                        Event::KillCoordinator
                    }
                    "kill_coord_mid" => {
                        coordinator_back_at = Some(back);
                        Event::BackupThenKillCoordinator { vm, delay_ms: rng.gen_range(0..60) }
                    }
                    "network" => {
                        let ms = rng.gen_range(500..8000);
                        match rng.gen_range(0..3) {
                            0 => Event::Network { node, loss_percent: 100, delay_ms: 0, ms },
                            1 => Event::Network { node, loss_percent: rng.gen_range(5..40), delay_ms: 0, ms },
                            _ => Event::Network { node, loss_percent: 0, delay_ms: rng.gen_range(20..400), ms },
                        }
                    }
                    "fill" => Event::FillStore { ms: rng.gen_range(1500..6000), vm, seed: rng.gen() },
                    "take_over" => Event::TakeOver { vm },
                    _ => Event::Migrate { vm, to: rng.gen_range(0..nodes), storage: rng.gen_bool(0.25) },
                }
            }
        };
        out.push(Timed { at_ms: t, event });
    }
    for (node, back) in agent_back_at.iter().enumerate() {
        if back.is_some() {
            out.push(Timed { at_ms: duration_ms, event: Event::StartAgent { node } });
        }
    }
    if coordinator_back_at.is_some() {
        out.push(Timed { at_ms: duration_ms, event: Event::StartCoordinator });
    }
    out.sort_by_key(|e| e.at_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = schedule(7, Scenario::Mixed, 3, 5, 60_000);
        assert_eq!(a, schedule(7, Scenario::Mixed, 3, 5, 60_000));
        assert_ne!(a, schedule(8, Scenario::Mixed, 3, 5, 60_000));
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn every_stopped_process_is_started_again() {
        for seed in 0..200 {
            let s = schedule(seed, Scenario::Mixed, 2, 3, 20_000);
            let mut agent_down = [false; 2];
            let mut coord_down = false;
            for e in &s {
                match e.event {
                    Event::KillAgent { node } | Event::CrashHost { node } => {
                        assert!(!agent_down[node], "seed {seed}: node {node} killed twice");
                        agent_down[node] = true;
                    }
                    Event::StartAgent { node } => agent_down[node] = false,
                    Event::KillCoordinator | Event::BackupThenKillCoordinator { .. } => {
                        assert!(!coord_down, "seed {seed}");
                        coord_down = true;
                    }
                    Event::StartCoordinator => coord_down = false,
                    _ => {}
                }
            }
            assert!(!coord_down && agent_down.iter().all(|d| !d), "seed {seed}: {s:?}");
        }
    }

    #[test]
    fn scenarios_inject_only_their_faults() {
        let kinds = |sc| -> Vec<&'static str> {
            (0..50).flat_map(|seed| schedule(seed, sc, 2, 3, 30_000)).filter_map(|e| e.event.fault_kind()).collect()
        };
        assert!(kinds(Scenario::Agents).iter().all(|k| k.starts_with("kill_agent")));
        assert!(kinds(Scenario::Coordinator).iter().all(|k| k.starts_with("kill_coordinator")));
        assert!(kinds(Scenario::Hosts).iter().all(|k| ["crash_host", "migrate", "migrate_storage"].contains(k)));
        let net = kinds(Scenario::Network);
        assert!(net.iter().all(|k| ["partition", "packet_loss", "delay"].contains(k)));
        assert!(["partition", "packet_loss", "delay"].iter().all(|k| net.contains(k)), "{net:?}");
        assert!(kinds(Scenario::Mixed).len() > 50);
        assert!(!kinds(Scenario::Mixed).contains(&"store_full"), "mixed runs need no root");
        let multi = kinds(Scenario::Multi);
        assert!(multi.contains(&"take_over") && multi.contains(&"kill_coordinator"), "{multi:?}");
        assert!(!kinds(Scenario::Mixed).contains(&"take_over"));
        let full = kinds(Scenario::StoreFull);
        assert!(full.iter().all(|k| ["store_full", "kill_coordinator", "kill_coordinator_mid_backup"].contains(k)));
        assert!(full.contains(&"store_full"), "{full:?}");
    }
}
