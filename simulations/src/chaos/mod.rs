//! `bulwark-chaos`: seeded fault runs against the real binaries as processes on loopback.
//!
//! A run: a coordinator and N agents (nodes on one shared sim root, ground truth on), V VMs in
//! one protection group with their initial replicas; then the seed's [`schedule`] of guest
//! churn, backups and checks interleaved with faults — SIGKILL of agents and of the
//! coordinator at random moments and mid-backup, host power losses, live and storage
//! migrations, partitions, packet loss and delay between an agent and the coordinator (each
//! agent dials the coordinator through its own [`proxy`]); then every stopped process is started again, the replicas are brought back to
//! `consistent`, each VM gets a final express full, and the invariants of [`check`] are
//! checked. The same seed replays the same schedule; a violation prints the seed and the
//! timeline.
//!
//! Modules: [`schedule`] (the seeded timeline), [`procs`] (the processes), [`proxy`] (the UDP
//! fault proxy), [`check`] (the invariants), this file (one run and a sweep of seeds).

pub mod check;
pub mod procs;
pub mod proxy;
pub mod schedule;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power};
use bulwark_protocol::messages::{AdminRequest, AdminResponse, BackupKind};
use procs::World;
use schedule::{Event, Scenario, Timed};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a sweep runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub runs: u64,
    /// Length of each run's fault phase.
    pub minutes: f64,
    pub scenario: Scenario,
    pub nodes: usize,
    /// Coordinators of the deployment (more than one: the multi scenario).
    pub coordinators: usize,
    pub vms: usize,
    pub disk_bytes: u64,
    /// Where the runs' directories go (kept when a run finds a violation).
    pub work: PathBuf,
    /// The executable that answers `x-coordinator …` and `x-agent …`.
    pub exe: PathBuf,
    /// Keep every run's directory (logs), not only a failing one's.
    pub keep: bool,
}

/// One broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub seed: u64,
    pub invariant: String,
    pub detail: String,
}

/// The sweep's summary (CONTRACT: bulwark-chaos).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub runs: u64,
    pub seeds: Vec<u64>,
    pub faults: BTreeMap<String, u64>,
    pub recovery_points_checked: u64,
    pub restores_verified: u64,
    /// The deterministic simulation: item recoveries whose files were checked.
    #[serde(skip_serializing_if = "is_zero")]
    pub items_verified: u64,
    pub violations: Vec<Violation>,
    /// Coordinator log lines that report a full disk (store-full runs): the fault bit.
    #[serde(skip_serializing_if = "is_zero")]
    pub full_disk_errors: u64,
    /// The deterministic simulation: each seed's digest of its fault timeline and final
    /// catalog (sweeps of up to 20 seeds), and the sweep's rate.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub digests: BTreeMap<u64, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seeds_per_minute: Option<f64>,
    /// The fault timeline of every seed that found a violation.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub timelines: BTreeMap<u64, Vec<String>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Runs `opts.runs` seeds from `opts.seed` on.
pub fn sweep(opts: &Options) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    for seed in opts.seed..opts.seed.saturating_add(opts.runs) {
        let dir = opts.work.join(format!("seed-{seed}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "chaos: seed {seed} ({:?}, {} nodes, {} VMs, {} min)",
            opts.scenario, opts.nodes, opts.vms, opts.minutes
        );
        let run = run_seed(opts, seed, &dir);
        summary.runs += 1;
        summary.seeds.push(seed);
        let (outcome, timeline) = match run {
            Ok(r) => r,
            Err(e) => {
                let v = Violation { seed, invariant: "harness".into(), detail: format!("{e:#}") };
                (RunOutcome { violations: vec![v], ..RunOutcome::default() }, vec![])
            }
        };
        for (k, n) in outcome.faults {
            *summary.faults.entry(k).or_default() += n;
        }
        summary.recovery_points_checked += outcome.recovery_points_checked;
        summary.restores_verified += outcome.restores_verified;
        summary.full_disk_errors += outcome.full_disk_errors;
        if outcome.violations.is_empty() {
            if !opts.keep {
                let _ = std::fs::remove_dir_all(&dir);
            }
        } else {
            eprintln!(
                "chaos: seed {seed} broke {} invariant(s); its directory is kept: {}",
                outcome.violations.len(),
                dir.display()
            );
            summary.timelines.insert(seed, timeline.iter().map(ToString::to_string).collect());
            summary.violations.extend(outcome.violations);
        }
    }
    Ok(summary)
}

/// What one seed found.
#[derive(Debug, Default)]
pub struct RunOutcome {
    pub faults: BTreeMap<String, u64>,
    pub recovery_points_checked: u64,
    pub restores_verified: u64,
    pub violations: Vec<Violation>,
    pub full_disk_errors: u64,
}

fn vm_name(i: usize) -> String {
    format!("v{i}")
}

fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

/// One seed: set up, run the schedule, settle, check.
pub fn run_seed(opts: &Options, seed: u64, dir: &Path) -> anyhow::Result<(RunOutcome, Vec<Timed>)> {
    let duration_ms = (opts.minutes * 60_000.0) as u64;
    let timeline = schedule::schedule(seed, opts.scenario, opts.nodes, opts.vms, duration_ms);
    // The store-full scenario gives the coordinator a disk of its own, filled by a ballast
    // file now and then. Without the ballast it must hold a run's whole history (no prune or
    // GC runs): every replica, the churn, and whole-disk rewrites under load, ten disks' worth
    // per VM, plus the catalog.
    let store_bytes = (opts.scenario == Scenario::StoreFull)
        .then(|| (opts.vms as u64 * opts.disk_bytes * 10 + (64 << 20)).next_multiple_of(1 << 20));
    let mut world = World::start(&opts.exe, dir, opts.nodes, store_bytes, opts.coordinators)?;
    std::fs::create_dir_all(world.sim_root.join(sim::GROUND_TRUTH_DIR))?;
    for i in 0..opts.vms {
        let req = CreateVm {
            os: if i % 2 == 0 { "linux" } else { "windows" }.into(),
            power: Power::Running,
            random_fill: true,
            seed: seed.wrapping_mul(1000) + i as u64,
            ..CreateVm::new(
                &vm_name(i),
                &node_name(i % opts.nodes),
                vec![DiskConfig { name: "os".into(), size: opts.disk_bytes }],
            )
        };
        sim::create_vm(&world.sim_root, &req)?;
    }
    let names: Vec<String> = (0..opts.vms).map(vm_name).collect();
    world.wait_inventory(&names, Duration::from_secs(60))?;
    world.protect(&names)?;
    world.wait_replicas_consistent(&names, Duration::from_secs(180))?;

    let mut outcome = RunOutcome::default();
    let start = Instant::now();
    // Agents a mid-backup kill stopped, and when they come back.
    let mut restart_at: BTreeMap<usize, Instant> = BTreeMap::new();
    for step in &timeline {
        let due = start + Duration::from_millis(step.at_ms);
        loop {
            let now = Instant::now();
            world.restart_due_agents(&mut restart_at, now)?;
            world.heal_due(now);
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        if let Some(kind) = step.event.fault_kind() {
            *outcome.faults.entry(kind.to_owned()).or_default() += 1;
        }
        eprintln!("chaos: seed {seed}: {step}");
        world.apply(&step.event, &mut restart_at).map_err(|e| anyhow::anyhow!("at {step}: {e:#}"))?;
    }
    // Faults stop: everything comes back.
    world.heal_due(Instant::now() + Duration::from_secs(86_400));
    world.start_all()?;
    check::settle_and_check(&mut world, &names, seed, &mut outcome)?;
    if let Some(total) = store_bytes {
        let out = std::process::Command::new("df").args(["-B1", "--output=used"]).arg(&world.data_dir).output();
        let used = out.map(|o| String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").trim().to_owned());
        eprintln!("chaos: seed {seed}: the store disk holds {} of {total} bytes", used.unwrap_or_default());
    }
    world.stop_all();
    // What the full disk did, as the coordinator said it (job failures, refused starts).
    let log = std::fs::read_to_string(&world.coordinator.log).unwrap_or_default();
    outcome.full_disk_errors = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("no space left") || l.contains("disk is full")
        })
        .count() as u64;
    Ok((outcome, timeline))
}

impl World {
    fn node_of(&self, vm: usize) -> anyhow::Result<usize> {
        let host = sim::Vm::open(&self.sim_root, &vm_name(vm))?.config.host.clone();
        (0..self.agents.len())
            .find(|&n| node_name(n) == host)
            .ok_or_else(|| anyhow::anyhow!("VM on unknown host {host}"))
    }

    /// Waits (at most 3 s) until VM `vm` holds a snapshot: the moment a job's transfer starts.
    fn wait_snapshot(&self, vm: usize) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if sim::Vm::open(&self.sim_root, &vm_name(vm)).is_ok_and(|v| v.config.snapshot.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Ends the network faults that are over by `now`.
    /// Starts the coordinator; while its disk is full it may refuse, with a clear error and
    /// nothing changed, and is started again once the ballast goes.
    fn start_coordinator_unless_full(&mut self) -> anyhow::Result<()> {
        match self.start_coordinator() {
            Ok(()) => Ok(()),
            Err(e) if self.store_free_at.is_some() => {
                let log = std::fs::read_to_string(&self.coordinator.log).unwrap_or_default();
                match log.lines().rev().find(|l| l.starts_with("error:")) {
                    Some(line) if line.contains("disk is full") => {
                        eprintln!(
                            "chaos: the coordinator does not start on a full disk ({line}); it will once there is room"
                        );
                        self.start_when_freed = true;
                        Ok(())
                    }
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn heal_due(&mut self, now: Instant) {
        if self.store_free_at.is_some_and(|t| t <= now) {
            self.free_store();
        }
        if self.start_when_freed && self.store_free_at.is_none() {
            self.start_when_freed = false;
            if let Err(e) = self.start_coordinator() {
                eprintln!("chaos: the coordinator did not start once its disk had room: {e:#}");
            }
        }
        let due: Vec<usize> = self.heal_at.iter().filter(|(_, t)| **t <= now).map(|(n, _)| *n).collect();
        for node in due {
            self.heal_at.remove(&node);
            self.proxies[node].set(proxy::Faults::default());
        }
    }

    fn restart_due_agents(&mut self, restart_at: &mut BTreeMap<usize, Instant>, now: Instant) -> anyhow::Result<()> {
        let due: Vec<usize> = restart_at.iter().filter(|(_, t)| **t <= now).map(|(n, _)| *n).collect();
        for node in due {
            restart_at.remove(&node);
            self.agents[node].start()?;
        }
        Ok(())
    }

    /// Applies one event. Admin requests to a coordinator that is down are skipped (that is
    /// the fault, not a failure of the harness).
    fn apply(&mut self, event: &Event, restart_at: &mut BTreeMap<usize, Instant>) -> anyhow::Result<()> {
        match *event {
            Event::Churn { vm, blocks, seed } => {
                sim::churn_bytes(&self.sim_root, &vm_name(vm), blocks << 20, seed)?;
            }
            Event::Backup { vm, sync } => self.backup(&vm_name(vm), sync),
            Event::Check { vm } => self.check(&vm_name(vm)),
            Event::BackupUnderLoad { vm, seed } => {
                // An express full needs a consistent replica: check it first if it is not, so
                // that this backup really runs (and makes a recovery point) under load.
                if let Ok(v) = self.vms() {
                    if v.iter().any(|x| x.name == vm_name(vm) && x.replica_state == "inconsistent") {
                        let _ = self.run_job(AdminRequest::ConsistencyCheck { vm: vm_name(vm) });
                    }
                }
                // The guest rewrites its whole disk, pass after pass, while the backup runs.
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let writer = {
                    let (root, name, stop) = (self.sim_root.clone(), vm_name(vm), stop.clone());
                    std::thread::spawn(move || -> anyhow::Result<u64> {
                        let mut passes = 0;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            sim::churn(&root, &name, 100.0, seed.wrapping_add(passes))?;
                            passes += 1;
                        }
                        Ok(passes)
                    })
                };
                let job = match self.ask(AdminRequest::Backup { vm: vm_name(vm), kind: BackupKind::ExpressFull }) {
                    Some(AdminResponse::JobStarted { job_id }) => Some(job_id),
                    _ => None,
                };
                let deadline = Instant::now() + Duration::from_secs(5);
                while let Some(id) = job {
                    let ended = matches!(self.ask(AdminRequest::JobShow { id }),
                        Some(AdminResponse::Job(j)) if matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled"));
                    if ended || Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                writer.join().map_err(|_| anyhow::anyhow!("the guest writer panicked"))??;
            }
            Event::BackupThenKillAgent { vm, delay_ms } => {
                self.backup(&vm_name(vm), false);
                self.wait_snapshot(vm);
                std::thread::sleep(Duration::from_millis(delay_ms));
                let node = self.node_of(vm)?;
                if self.agents[node].is_running() {
                    self.agents[node].kill9();
                    restart_at.insert(node, Instant::now() + Duration::from_secs(2));
                }
            }
            Event::BackupThenKillCoordinator { vm, delay_ms } => {
                let owner = self.owner_of(&vm_name(vm)).unwrap_or(0);
                self.backup(&vm_name(vm), false);
                self.wait_snapshot(vm);
                std::thread::sleep(Duration::from_millis(delay_ms));
                self.coordinator_proc(owner).kill9();
            }
            Event::KillAgent { node } => self.agents[node].kill9(),
            Event::StartAgent { node } => {
                restart_at.remove(&node);
                self.agents[node].start()?;
            }
            Event::KillCoordinator => {
                // One coordinator at a time, in turn (the only one unless multi).
                let i = self.kill_turn % self.coordinator_count();
                self.kill_turn += 1;
                self.coordinator_proc(i).kill9();
            }
            Event::StartCoordinator => {
                self.start_coordinator_unless_full()?;
                for i in 1..self.coordinator_count() {
                    self.start_coordinator_at(i)?;
                }
            }
            Event::TakeOver { vm } => {
                // The coordinator after the owner takes the VM; its auto group protects it from
                // then on, and the old owner must see it lost.
                let n = self.coordinator_count();
                if n > 1 {
                    let to = self.owner_of(&vm_name(vm)).map_or(0, |o| (o + 1) % n);
                    let answer = self.ask_at(to, AdminRequest::VmTakeOver { vm: vm_name(vm) });
                    eprintln!("chaos: take-over of {} by {}: {answer:?}", vm_name(vm), procs::coordinator_name(to));
                }
            }
            Event::CrashHost { node } => {
                self.agents[node].kill9();
                sim::crash_host(&self.sim_root, &node_name(node))?;
            }
            Event::Network { node, loss_percent, delay_ms, ms } => {
                let faults = proxy::Faults {
                    partitioned: loss_percent >= 100,
                    loss: f64::from(loss_percent) / 100.0,
                    delay: Duration::from_millis(delay_ms),
                };
                self.proxies[node].set(faults);
                self.heal_at.insert(node, Instant::now() + Duration::from_millis(ms));
            }
            Event::Migrate { vm, to, storage } => {
                sim::migrate(&self.sim_root, &vm_name(vm), &node_name(to), storage)?;
            }
            Event::FillStore { ms, vm, seed } => {
                let bytes = self.fill_store()?;
                self.store_free_at = Some(Instant::now() + Duration::from_millis(ms));
                eprintln!("chaos: the store disk is full ({bytes} bytes of ballast)");
                // New data for the full disk: the express full must fail cleanly, and keep
                // its changes for a later run.
                sim::churn_bytes(&self.sim_root, &vm_name(vm), 2 << 20, seed)?;
                if let Some(AdminResponse::JobStarted { job_id }) =
                    self.ask(AdminRequest::Backup { vm: vm_name(vm), kind: BackupKind::ExpressFull })
                {
                    let deadline = Instant::now() + Duration::from_millis(ms);
                    while Instant::now() < deadline {
                        match self.ask(AdminRequest::JobShow { id: job_id }) {
                            Some(AdminResponse::Job(j)) if j.state != "queued" && j.state != "running" => {
                                eprintln!("chaos: express full of v{vm} on the full disk: {} {:?}", j.state, j.error);
                                break;
                            }
                            _ => std::thread::sleep(Duration::from_millis(50)),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
