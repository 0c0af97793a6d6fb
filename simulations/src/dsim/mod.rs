//! The deterministic simulation (`bulwark-chaos --scenario sim`): one thread drives a
//! coordinator over the real store and catalog and several agents over the real sim
//! hypervisor (snapshots, overlays, dirty bitmaps, ground truth) with a simulated clock. The
//! network is a queue of messages that the seed delays, drops and cuts; crashes drop a
//! process's volatile state (jobs, held snapshots, connections) and restart it from what it
//! persisted. Everything random comes from the seed, so a seed replays exactly: the same
//! fault timeline and the same final catalog, which [`Outcome::digest`] sums up.
//!
//! What it drives for real: the coordinator's job code (`VmJob`, its streams' `BlockReceiver`
//! and `compare::Check`, `DiskIngest`, planning and failure rules, the commit), `Store`,
//! `Catalog` (sled), the wire's messages and frames, and the sim's `Vm` (freeze, take,
//! changes, release, confirm, abandon, crash-host, migration, and `cleanup_orphans` at agent
//! start), the agent's `AgentJob`, and the real job queue fed by a schedule of its own (an
//! express full every 0.5-3 s, a consistency check when a replica is inconsistent or one time
//! in ten). What it models: the transport (ordered lanes, delays, losses, partitions) and
//! where each effect lands (in memory, in the sim's files).
//! A crash here is a process crash: what reached the files stays (the real-process chaos runs
//! and the store's `kill -9` tests cover torn writes).

mod checks;
mod guestfs;
pub mod nodes;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power, Vm};
use bulwark_coordinator::catalog::ReplicaState;
use bulwark_coordinator::catalog::RpDisk;
use bulwark_coordinator::store::{hex, StoreError, StorePages};
use bulwark_protocol::blockmap;
use nodes::{Agent, Break, Coordinator, Msg, DISK};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One seed's run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub hosts: usize,
    /// Coordinators sharing the hosts: VM `i` starts in the groups of coordinator
    /// `i % coordinators`; take-overs move VMs between them.
    pub coordinators: usize,
    pub vms: usize,
    /// Simulated length of the fault phase.
    pub duration_ms: u64,
    pub disk_bytes: u64,
    /// Where the run's files go (a fresh directory is made inside).
    pub scratch: PathBuf,
    pub broken: Option<Break>,
}

/// What a seed did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub faults: BTreeMap<String, u64>,
    pub timeline: Vec<String>,
    pub recovery_points_checked: u64,
    /// Recoveries to a new VM that ended with the recovery point's bytes.
    pub restores_verified: u64,
    /// Item recoveries whose files were each the recovery point's.
    pub items_verified: u64,
    pub jobs_committed: BTreeMap<String, u64>,
    pub messages: u64,
    pub messages_lost: u64,
    pub violations: Vec<(String, String)>,
    /// BLAKE3 of the fault timeline and the final catalog (replicas and recovery points,
    /// without their random ids).
    pub digest: String,
}

#[derive(Debug)]
enum Ev {
    Tick,
    Churn,
    Fault,
    /// A message on the connection of host `host` and coordinator `coord`, of epoch `epoch`.
    Deliver {
        host: usize,
        coord: usize,
        epoch: u64,
        to_agent: bool,
        msg: Msg,
    },
    StartAgent(usize),
    StartCoordinator(usize),
    /// A crash aimed at a job just dispatched (mid-snapshot, mid-transfer or mid-commit).
    KillAgentMidJob(usize),
    KillCoordinatorMidJob(usize),
    /// The network between a host and a coordinator heals (by link index).
    Heal(usize),
    /// A message of a connection of epoch `epoch` is lost where it would have arrived: the
    /// connection dies there, and what it still carried after it with it.
    Lost {
        host: usize,
        coord: usize,
        epoch: u64,
    },
}

/// The network between one coordinator and one host.
#[derive(Debug, Default, Clone)]
struct Link {
    /// Bumped whenever the connection breaks: what is in flight on an older one is lost.
    epoch: u64,
    cut_until: u64,
    loss: f64,
    delay_ms: u64,
    faulty_until: u64,
    /// The last delivery time on each lane (to the agent, from it; control, transfer): a lane
    /// keeps its order, as a QUIC stream does.
    last: [[u64; 2]; 2],
}

struct World {
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    root: PathBuf,
    coord_dirs: Vec<PathBuf>,
    coordinators: Vec<Option<Coordinator>>,
    agents: Vec<Option<Agent>>,
    /// By host, then coordinator: `links[h * coordinators + c]`.
    links: Vec<Link>,
    vms: Vec<String>,
    /// The VMs in each coordinator's groups (its configuration: it survives a crash). A VM
    /// joins the groups of the coordinator that took it over; the old owner keeps it in its
    /// own, where it shows `lost` and gets no job.
    protects: Vec<std::collections::BTreeSet<String>>,
    /// Who owns each VM, as the claims on the storage say (read by the world after every claim
    /// request an agent handled): the coordinator whose replica must be current at the end.
    owner: BTreeMap<String, usize>,
    /// The highest epoch of each VM's claim the world has read (epochs never go down).
    epochs: BTreeMap<String, u64>,
    /// The claims on the storage, read (never written) by the world's checks.
    claims: bulwark_agent::claims::Claims,
    faults_on: bool,
    /// VMs already reported running two jobs (each is reported once).
    twice: std::collections::BTreeSet<String>,
    /// VMs already reported with an agent ahead of the coordinator (each is reported once).
    ahead: std::collections::BTreeSet<String>,
    /// VMs already reported acted on by a coordinator that did not own them (once each).
    two_owners: std::collections::BTreeSet<String>,
    opts: Options,
    out: Outcome,
    /// Where item recoveries write (each into a directory of its own), and how many began.
    items_dir: PathBuf,
    items_started: u64,
    /// When the next scan of a run's "done" condition is due (large runs).
    next_scan: u64,
}

/// The VM whose disk holds a file system (FAT) its guest keeps changing: the one item
/// recoveries read.
const FS_VM: usize = 0;

/// VMs beyond this many start with sparse, zero disks (their data is what their guests write):
/// a run of thousands of VMs then fits in memory.
const RANDOM_VMS: usize = 64;

/// With more VMs than this, a run's "done" condition (a scan of every VM) is asked once per
/// 100 ms of simulated time instead of after every step.
const SCAN_EVERY_STEP_UP_TO: usize = 256;

/// The coordinator that runs item recoveries (of the file-system VM's points it holds).
const ITEMS_COORDINATOR: usize = 0;

fn host_name(h: usize) -> String {
    format!("node{}", h + 1)
}

/// Which coordinator a claim's owner is (`coordN`).
fn coordinator_index(name: &str, coordinators: usize) -> Option<usize> {
    (0..coordinators).find(|&c| nodes::coordinator_name(c) == name)
}

impl World {
    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn note(&mut self, kind: &str, what: String) {
        *self.out.faults.entry(kind.to_owned()).or_default() += 1;
        self.out.timeline.push(format!("{:>8} ms {what}", self.now));
    }

    fn link(&self, h: usize, c: usize) -> usize {
        h * self.coordinators.len() + c
    }

    fn up(&self, h: usize, c: usize) -> bool {
        self.coordinators[c].is_some() && self.agents[h].is_some() && self.links[self.link(h, c)].cut_until <= self.now
    }

    fn break_link(&mut self, h: usize, c: usize) {
        let l = self.link(h, c);
        self.links[l].epoch += 1;
    }

    /// Sends on the connection of host `h` and coordinator `c`, `after_ms` from now plus the
    /// network's delay; a lost message breaks the connection where it would have arrived, so
    /// nothing sent after it on that connection arrives either (a QUIC stream does not skip a
    /// frame).
    fn send(&mut self, h: usize, c: usize, to_agent: bool, after_ms: u64, msg: Msg) {
        if !self.up(h, c) {
            return;
        }
        self.out.messages += 1;
        let l = self.link(h, c);
        let link = self.links[l].clone();
        let faulty = link.faulty_until > self.now;
        let lost = faulty && link.loss > 0.0 && self.rng.gen_bool(link.loss);
        let delay = self.rng.gen_range(1..20) + if faulty { link.delay_ms } else { 0 };
        let lane = &mut self.links[l].last[usize::from(to_agent)][msg.lane()];
        let t = (self.now + after_ms + delay).max(*lane);
        *lane = t;
        if lost {
            self.out.messages_lost += 1;
            self.at(t, Ev::Lost { host: h, coord: c, epoch: link.epoch });
        } else {
            self.at(t, Ev::Deliver { host: h, coord: c, epoch: link.epoch, to_agent, msg });
        }
    }

    /// A coordinator's name in the timeline: with one coordinator, as before there were several.
    fn coordinator_label(&self, c: usize) -> String {
        if self.coordinators.len() == 1 {
            "coordinator".into()
        } else {
            nodes::coordinator_name(c)
        }
    }

    fn crash_coordinator(&mut self, c: usize, kind: &str) {
        if self.coordinators[c].take().is_some() {
            for h in 0..self.agents.len() {
                self.break_link(h, c);
            }
            self.note(kind, format!("{kind} {}", self.coordinator_label(c)));
            let back = self.now + self.rng.gen_range(1000..4000);
            self.at(back, Ev::StartCoordinator(c));
        }
    }

    fn crash_agent(&mut self, h: usize, kind: &str) -> bool {
        if self.agents[h].take().is_none() {
            return false;
        }
        for c in 0..self.coordinators.len() {
            self.break_link(h, c);
        }
        self.note(kind, format!("{kind} {}", host_name(h)));
        let back = self.now + self.rng.gen_range(1000..4000);
        self.at(back, Ev::StartAgent(h));
        true
    }

    fn start_coordinator(&mut self, c: usize) -> Result<(), String> {
        if self.coordinators[c].is_none() {
            let name = nodes::coordinator_name(c);
            let dir = self.coord_dirs[c].clone();
            self.coordinators[c] =
                Some(Coordinator::open(&name, &dir, self.opts.disk_bytes, self.now, self.opts.broken)?);
        }
        Ok(())
    }

    fn start_agent(&mut self, h: usize) -> Result<(), String> {
        if self.agents[h].is_none() {
            self.agents[h] = Some(Agent::start(&self.root, &host_name(h), self.opts.broken)?);
        }
        Ok(())
    }

    /// Reads `vm`'s claim as the storage holds it, checking that its epoch never went down;
    /// answers the owning coordinator's index.
    fn read_claim(&mut self, vm: &str) -> Result<Option<(usize, u64)>, String> {
        let Some(claim) = self.claims.read(vm).map_err(|e| e.to_string())? else { return Ok(None) };
        let seen = self.epochs.entry(vm.to_owned()).or_default();
        if claim.epoch < *seen {
            let what = format!("{vm}: the claim's epoch went from {seen} to {}", claim.epoch);
            self.out.violations.push(("epoch-monotonic".into(), what));
        }
        *seen = (*seen).max(claim.epoch);
        let c = coordinator_index(&claim.coordinator, self.coordinators.len())
            .ok_or_else(|| format!("{vm}: a claim of an unknown coordinator {}", claim.coordinator))?;
        Ok(Some((c, claim.epoch)))
    }

    /// The invariant of ownership, after an agent acted: every snapshot it took was for the
    /// coordinator its VM's claim names, under that claim's epoch (a job with epoch 0 claimed
    /// the VM first). And a claim request it granted moves the VM to that coordinator's groups.
    fn check_owners(&mut self, h: usize) -> Result<(), String> {
        let Some(a) = self.agents[h].as_mut() else { return Ok(()) };
        let taken = std::mem::take(&mut a.taken);
        for (vm, c, epoch) in taken {
            let claim = self.read_claim(&vm)?;
            let rightful = claim.is_some_and(|(owner, e)| owner == c && (epoch == 0 || e == epoch));
            if !rightful && self.two_owners.insert(vm.clone()) {
                let claim = claim.map_or("none".into(), |(o, e)| format!("{} (epoch {e})", nodes::coordinator_name(o)));
                let what = format!(
                    "{vm}: a snapshot for {} (epoch {epoch}) while the claim is {claim} at {} ms",
                    nodes::coordinator_name(c),
                    self.now
                );
                self.out.violations.push(("one-owner".into(), what));
            }
        }
        Ok(())
    }

    /// After host `h` handled coordinator `c`'s take-over of `vm`: the claim as it is now.
    fn taken_over(&mut self, vm: &str) -> Result<(), String> {
        if let Some((owner, epoch)) = self.read_claim(vm)? {
            if self.owner.get(vm) != Some(&owner) {
                self.note(
                    "take_over_done",
                    format!("{vm} owned by {} (epoch {epoch})", nodes::coordinator_name(owner)),
                );
                self.owner.insert(vm.to_owned(), owner);
            }
            self.protects[owner].insert(vm.to_owned());
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), String> {
        let now = self.now;
        for h in 0..self.agents.len() {
            if let Some(a) = self.agents[h].as_mut() {
                a.expire(now)?;
            }
        }
        for c in 0..self.coordinators.len() {
            let Some(co) = self.coordinators[c].as_mut() else { continue };
            for (h, msg) in co.expire(now)? {
                self.send(h, c, true, 0, msg);
            }
        }
        // Each VM's host and confirmed token, read once a tick.
        let mut hosts = BTreeMap::new();
        let mut tokens = BTreeMap::new();
        for vm in &self.vms {
            let v = Vm::open(&self.root, vm).map_err(|e| e.to_string())?;
            if let Some(h) = (0..self.agents.len()).find(|&h| host_name(h) == v.config.host) {
                hosts.insert(vm.clone(), h);
            }
            tokens.insert(vm.clone(), (v.config.generation, v.config.sequence));
        }
        // A cheap invariant: an agent never confirms changes the coordinator has not committed
        // (its confirmed token is never ahead of the replica's, in the same generation). With
        // several coordinators, of a VM only its first owner ever acted on (epoch 1): after a
        // take-over the token the agent confirmed may be another coordinator's.
        let mut ahead = vec![];
        for (vm, &(generation, sequence)) in &tokens {
            let owner = *self.owner.get(vm).unwrap_or(&0);
            if self.coordinators.len() > 1 && self.epochs.get(vm).copied().unwrap_or(0) > 1 {
                continue;
            }
            let Some(c) = self.coordinators[owner].as_ref() else { continue };
            let replica = c.store.catalog().replica(vm, DISK).map_err(|e| e.to_string())?;
            if let Some(t) = replica.and_then(|r| r.change_token) {
                if t.generation == generation && sequence > t.sequence {
                    ahead.push(format!(
                        "{vm}: the agent confirmed {sequence} of generation {}, the replica is at {}",
                        t.generation, t.sequence
                    ));
                }
            }
        }
        for what in ahead {
            if self.ahead.insert(what.split(':').next().unwrap_or_default().to_owned()) {
                self.out.violations.push(("agent-not-ahead".into(), what));
            }
        }
        for c in 0..self.coordinators.len() {
            // The schedule: each VM asks for its next job every 0.5-3 s.
            let mine: Vec<String> = self.protects[c].iter().cloned().collect();
            for vm in mine {
                let Some(co) = self.coordinators[c].as_mut() else { break };
                let due = *co.next_backup_at.entry(vm.clone()).or_insert(now);
                if due > now {
                    continue;
                }
                // Once the faults stopped, a VM whose replica was committed since asks for no
                // more jobs: the run settles even when the jobs asked for outnumber the slots.
                let calm = self.opts.duration_ms;
                if !self.faults_on
                    && matches!(co.store.catalog().replica(&vm, DISK), Ok(Some(r))
                        if r.state == ReplicaState::Consistent && r.updated_at * 1000 > calm + 1000)
                {
                    continue;
                }
                let gap = self.rng.gen_range(500..3000);
                let scheduled_check = self.rng.gen_bool(0.1);
                let h = *hosts.get(&vm).ok_or_else(|| format!("{vm} on no host"))?;
                let Some(co) = self.coordinators[c].as_mut() else { break };
                co.next_backup_at.insert(vm.clone(), now + gap);
                co.schedule(&vm, h, scheduled_check, now)?;
            }
            // The registry: which agents are connected.
            let up: Vec<bool> = (0..self.agents.len()).map(|h| self.up(h, c)).collect();
            let Some(co) = self.coordinators[c].as_mut() else { continue };
            for (h, up) in up.iter().enumerate() {
                if *up {
                    co.queue.host_connected(&host_name(h), now);
                } else {
                    co.queue.host_lost(&host_name(h), now);
                }
            }
            // Now and then an item recovery, faults or not.
            if c == ITEMS_COORDINATOR && self.faults_on && co.item_jobs.is_empty() && self.rng.gen_bool(0.01) {
                let h = self.rng.gen_range(0..self.agents.len());
                let msgs = self.start_items(h)?;
                for m in msgs {
                    self.send(h, c, true, 0, m);
                }
            }
            let Some(co) = self.coordinators[c].as_mut() else { continue };
            let started = co.start_due(now, |vm| hosts.get(vm).copied())?;
            for (h, msg) in started {
                let dispatched =
                    matches!(msg, Msg::Control(bulwark_protocol::messages::CoordinatorMessage::JobRequest(_)));
                self.send(h, c, true, 0, msg);
                // Now and then a crash lands right in this job (mid-snapshot, -transfer, -commit).
                if dispatched && self.faults_on && self.rng.gen_bool(0.08) {
                    let t = now + self.rng.gen_range(0..40);
                    let ev = if self.rng.gen_bool(0.5) { Ev::KillAgentMidJob(h) } else { Ev::KillCoordinatorMidJob(c) };
                    self.at(t, ev);
                }
            }
        }
        Ok(())
    }

    /// Starts an item recovery of the whole file system of the latest recovery point of the
    /// file-system VM onto host `h`, into a directory of its own; answers what to send.
    fn start_items(&mut self, h: usize) -> Result<Vec<Msg>, String> {
        self.items_started += 1;
        let dest = self.items_dir.join(self.items_started.to_string());
        let vm = self.vms[FS_VM].clone();
        let now = self.now;
        let Some(c) = self.coordinators[ITEMS_COORDINATOR].as_mut() else { return Ok(vec![]) };
        c.recover_items(&vm, vec!["/".into()], &dest.to_string_lossy(), h, now)
    }

    fn churn(&mut self) -> Result<(), String> {
        let i = self.rng.gen_range(0..self.vms.len());
        if i == FS_VM {
            // This guest changes files, not blocks.
            let mut vm = Vm::open(&self.root, &self.vms[i]).map_err(|e| e.to_string())?;
            return guestfs::churn(&mut vm, DISK, &mut self.rng);
        }
        let len = self.rng.gen_range(1..48) * 4096;
        let off = self.rng.gen_range(0..(self.opts.disk_bytes - len) / 4096) * 4096;
        let byte: u8 = self.rng.gen();
        let data = vec![byte; len as usize];
        let mut vm = Vm::open(&self.root, &self.vms[i]).map_err(|e| e.to_string())?;
        vm.guest_write(DISK, off, &data).map_err(|e| e.to_string())
    }

    /// A random coordinator (no draw with one: a seed of one coordinator plays as before).
    fn any_coordinator(&mut self) -> usize {
        match self.coordinators.len() {
            1 => 0,
            n => self.rng.gen_range(0..n),
        }
    }

    fn fault(&mut self) -> Result<(), String> {
        let hosts = self.agents.len();
        let h = self.rng.gen_range(0..hosts);
        let kinds = if self.coordinators.len() > 1 { 9 } else { 8 };
        match self.rng.gen_range(0..kinds) {
            0 => {
                self.crash_agent(h, "kill_agent");
            }
            1 => {
                let c = self.any_coordinator();
                self.crash_coordinator(c, "kill_coordinator");
            }
            2 => {
                if self.crash_agent(h, "crash_host") {
                    sim::crash_host(&self.root, &host_name(h)).map_err(|e| e.to_string())?;
                }
            }
            3 | 4 => {
                let vm = self.vms[self.rng.gen_range(0..self.vms.len())].clone();
                let to = self.rng.gen_range(0..hosts);
                let storage = self.rng.gen_bool(0.3);
                sim::migrate(&self.root, &vm, &host_name(to), storage).map_err(|e| e.to_string())?;
                let kind = if storage { "migrate_storage" } else { "migrate" };
                self.note(kind, format!("{kind} {vm} to {}", host_name(to)));
            }
            8 => {
                // An administrator moves a VM to another coordinator (`bulwark vm take-over`
                // there); the request goes to the VM's host like any other.
                let vm = self.vms[self.rng.gen_range(0..self.vms.len())].clone();
                let owner = *self.owner.get(&vm).unwrap_or(&0);
                let step = self.rng.gen_range(1..self.coordinators.len());
                let to = (owner + step) % self.coordinators.len();
                let host = Vm::open(&self.root, &vm).map_err(|e| e.to_string())?.config.host;
                let h = (0..hosts).find(|&h| host_name(h) == host).ok_or_else(|| format!("{vm} on no host"))?;
                let Some(c) = self.coordinators[to].as_ref() else { return Ok(()) };
                let msg = c.take_over(&vm)?;
                self.note("take_over", format!("take_over {vm} by {}", nodes::coordinator_name(to)));
                self.send(h, to, true, 0, msg);
            }
            k => {
                let c = self.any_coordinator();
                let ms = self.rng.gen_range(300..5000);
                let l = self.link(h, c);
                let link = &mut self.links[l];
                link.faulty_until = self.now + ms;
                let kind = match k {
                    5 => {
                        link.cut_until = self.now + ms;
                        link.epoch += 1;
                        "partition"
                    }
                    6 => {
                        link.loss = self.rng.gen_range(0.01..0.2);
                        "packet_loss"
                    }
                    _ => {
                        link.delay_ms = self.rng.gen_range(20..800);
                        "delay"
                    }
                };
                let between = if self.coordinators.len() == 1 {
                    host_name(h)
                } else {
                    format!("{} {}", host_name(h), nodes::coordinator_name(c))
                };
                self.note(kind, format!("{kind} {between} for {ms} ms"));
                let t = self.now + ms;
                self.at(t, Ev::Heal(l));
            }
        }
        Ok(())
    }

    fn deliver(&mut self, host: usize, coord: usize, epoch: u64, to_agent: bool, msg: Msg) -> Result<(), String> {
        if epoch != self.links[self.link(host, coord)].epoch || !self.up(host, coord) {
            return Ok(());
        }
        let now = self.now;
        if to_agent {
            let take_over = match &msg {
                Msg::Control(bulwark_protocol::messages::CoordinatorMessage::Claim { vm, .. }) => Some(vm.to_string()),
                _ => None,
            };
            let Some(a) = self.agents[host].as_mut() else { return Ok(()) };
            for o in a.receive(msg, coord, now)? {
                self.send(host, coord, false, o.after_ms, o.msg);
            }
            self.check_owners(host)?;
            if let Some(vm) = take_over {
                self.taken_over(&vm)?;
            }
        } else {
            let Some(c) = self.coordinators[coord].as_mut() else { return Ok(()) };
            for m in c.receive(msg, now)? {
                self.send(host, coord, true, 0, m);
            }
        }
        Ok(())
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Tick => {
                self.tick()?;
                let t = self.now + 200;
                self.at(t, Ev::Tick);
            }
            Ev::Churn => {
                if self.faults_on {
                    self.churn()?;
                    let t = self.now + self.rng.gen_range(50..400);
                    self.at(t, Ev::Churn);
                }
            }
            Ev::Fault => {
                if self.faults_on {
                    self.fault()?;
                    let t = self.now + self.rng.gen_range(300..2500);
                    self.at(t, Ev::Fault);
                }
            }
            Ev::Deliver { host, coord, epoch, to_agent, msg } => self.deliver(host, coord, epoch, to_agent, msg)?,
            Ev::KillAgentMidJob(h) => {
                if self.faults_on {
                    self.crash_agent(h, "kill_agent_mid_job");
                }
            }
            Ev::KillCoordinatorMidJob(c) => {
                if self.faults_on {
                    self.crash_coordinator(c, "kill_coordinator_mid_job");
                }
            }
            Ev::StartAgent(h) => self.start_agent(h)?,
            Ev::StartCoordinator(c) => self.start_coordinator(c)?,
            Ev::Lost { host, coord, epoch } => {
                if self.links[self.link(host, coord)].epoch == epoch {
                    self.break_link(host, coord);
                }
            }
            Ev::Heal(l) => {
                if self.links[l].faulty_until <= self.now {
                    self.links[l].loss = 0.0;
                    self.links[l].delay_ms = 0;
                }
            }
        }
        Ok(())
    }

    fn run_until(&mut self, end: u64, mut done: impl FnMut(&World) -> bool) -> Result<bool, String> {
        while let Some((&(t, seq), _)) = self.queue.first_key_value() {
            if t > end {
                return Ok(false);
            }
            let Some(ev) = self.queue.remove(&(t, seq)) else { break };
            self.now = t;
            self.step(ev)?;
            // A cheap invariant after every step: one job per VM at a time, per coordinator.
            let twice: Vec<String> =
                self.coordinators.iter().flatten().flat_map(Coordinator::vms_running_twice).collect();
            for vm in twice {
                let at = self.now;
                if self.twice.insert(vm.clone()) {
                    self.out.violations.push(("one-job-per-vm".into(), format!("{vm} runs two jobs at {at} ms")));
                }
            }
            let due = self.vms.len() <= SCAN_EVERY_STEP_UP_TO || t >= self.next_scan;
            if due {
                self.next_scan = t + 100;
                if done(self) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// Runs one seed: set-up, the fault phase, then faults stop, every process comes back, and
/// the run goes on until every VM has a consistent replica committed after the faults; then
/// the invariants are checked.
pub fn run(opts: &Options) -> anyhow::Result<Outcome> {
    anyhow::ensure!(opts.hosts >= 1 && opts.vms >= 1, "a simulation needs a host and a VM");
    anyhow::ensure!(opts.coordinators >= 1, "a simulation needs a coordinator");
    anyhow::ensure!(opts.disk_bytes >= 1 << 20, "the simulation's disks are at least 1 MiB");
    let dir = tempfile::Builder::new().prefix(&format!("dsim-{}-", opts.seed)).tempdir_in(&opts.scratch)?;
    let root = dir.path().join("sim");
    std::fs::create_dir_all(root.join(sim::GROUND_TRUTH_DIR))?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let vms: Vec<String> = (0..opts.vms).map(|i| format!("v{i}")).collect();
    for (i, name) in vms.iter().enumerate() {
        let req = CreateVm {
            os: if i % 2 == 0 { "linux" } else { "windows" }.into(),
            power: Power::Running,
            random_fill: i < RANDOM_VMS,
            seed: rng.gen(),
            ..CreateVm::new(
                name,
                &host_name(i % opts.hosts),
                vec![DiskConfig { name: DISK.into(), size: opts.disk_bytes }],
            )
        };
        sim::create_vm(&root, &req)?;
        if i == FS_VM {
            guestfs::create(&mut Vm::open(&root, name)?, DISK, &mut rng).map_err(anyhow::Error::msg)?;
        }
    }
    let coordinators = opts.coordinators;
    let mut protects = vec![std::collections::BTreeSet::new(); coordinators];
    let mut owner = BTreeMap::new();
    for (i, vm) in vms.iter().enumerate() {
        protects[i % coordinators].insert(vm.clone());
        owner.insert(vm.clone(), i % coordinators);
    }
    let claims = bulwark_agent::claims::Claims::new(bulwark_agent::backend::Hypervisor::claims_dir(
        &bulwark_agent::backend::SimBackend { root: root.clone() },
    ));
    let mut w = World {
        rng,
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        root,
        coord_dirs: (0..coordinators)
            .map(|c| {
                if coordinators == 1 {
                    dir.path().join("coordinator")
                } else {
                    dir.path().join(nodes::coordinator_name(c))
                }
            })
            .collect(),
        coordinators: (0..coordinators).map(|_| None).collect(),
        agents: (0..opts.hosts).map(|_| None).collect(),
        links: vec![Link::default(); opts.hosts * coordinators],
        vms,
        protects,
        owner,
        epochs: BTreeMap::new(),
        claims,
        faults_on: true,
        twice: Default::default(),
        ahead: Default::default(),
        two_owners: Default::default(),
        opts: opts.clone(),
        out: Outcome { seed: opts.seed, ..Outcome::default() },
        items_dir: dir.path().join("items"),
        items_started: 0,
        next_scan: 0,
    };
    for c in 0..coordinators {
        w.start_coordinator(c).map_err(anyhow::Error::msg)?;
    }
    for h in 0..opts.hosts {
        w.start_agent(h).map_err(anyhow::Error::msg)?;
    }
    w.at(0, Ev::Tick);
    w.at(1000, Ev::Churn);
    w.at(2000, Ev::Fault);
    w.run_until(opts.duration_ms, |_| false).map_err(anyhow::Error::msg)?;

    // Faults stop; everything comes back; the network heals.
    w.faults_on = false;
    w.now = opts.duration_ms;
    for c in 0..coordinators {
        w.start_coordinator(c).map_err(anyhow::Error::msg)?;
    }
    for h in 0..opts.hosts {
        w.start_agent(h).map_err(anyhow::Error::msg)?;
    }
    for link in &mut w.links {
        link.cut_until = 0;
        link.faulty_until = 0;
        link.loss = 0.0;
        link.delay_ms = 0;
    }
    // Settled: every VM's replica on its owner is consistent and was committed after the
    // faults stopped; no coordinator runs a job.
    let calm = opts.duration_ms;
    let settled = |w: &World| {
        w.coordinators.iter().all(|c| c.as_ref().is_some_and(|c| c.jobs.is_empty() && c.item_jobs.is_empty()))
            && w.agents.iter().all(|a| a.as_ref().is_some_and(|a| a.held.is_empty()))
            && w.vms.iter().all(|vm| {
                let Some(c) = w.owner.get(vm).and_then(|&o| w.coordinators[o].as_ref()) else { return false };
                matches!(c.store.catalog().replica(vm, DISK), Ok(Some(r))
                    if r.state == ReplicaState::Consistent && r.updated_at * 1000 > calm + 1000)
            })
    };
    // Every VM needs a job committed after the faults, eight at a time per coordinator: large
    // runs get 30 ms of simulated time more per VM.
    let window = 120_000 + 30 * opts.vms as u64;
    let ok = w.run_until(calm + window, settled).map_err(anyhow::Error::msg)?;
    if !ok {
        let secs = window / 1000;
        w.out.violations.push(("settle".into(), format!("the replicas did not all become consistent within {secs} s")));
    }
    // What the end checks have read of the store, shared by both.
    let mut memo = checks::BlockCvs::new();
    checks::check(&mut w, &mut memo)?;
    checks::restores(&mut w, &mut memo)?;
    checks::items(&mut w)?;
    for c in w.coordinators.iter().flatten() {
        for (k, v) in &c.committed {
            *w.out.jobs_committed.entry((*k).to_owned()).or_default() += v;
        }
    }
    Ok(w.out)
}

/// The directory for the runs' files: memory-backed when the machine has `/dev/shm`.
pub fn default_scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// Runs `runs` seeds from `first` on, as `bulwark-chaos --scenario sim` does: on every core,
/// each seed on its own, summed up in seed order (so the summary is the same however the
/// seeds were spread).
pub fn sweep(first: u64, runs: u64, template: &Options) -> anyhow::Result<crate::chaos::Summary> {
    let started = std::time::Instant::now();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(runs.max(1) as usize);
    let next = std::sync::atomic::AtomicU64::new(0);
    // Each outcome is folded in as it comes: a long sweep's memory is bounded by its
    // violations (a failing seed keeps its timeline), not by its seeds.
    let summary = std::sync::Mutex::new(crate::chaos::Summary::default());
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= runs || lock(&failed).is_some() {
                    break;
                }
                let seed = first.saturating_add(i);
                match run(&Options { seed, ..template.clone() }) {
                    Ok(out) => fold(&mut lock(&summary), runs, out),
                    Err(e) => {
                        lock(&failed).get_or_insert(e.context(format!("seed {seed}")));
                    }
                }
            });
        }
    });
    if let Some(e) = lock(&failed).take() {
        return Err(e);
    }
    let mut summary = summary.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    anyhow::ensure!(summary.runs == runs, "a simulation thread died");
    summary.seeds.sort_unstable();
    summary.violations.sort_by_key(|v| v.seed);
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    summary.seeds_per_minute = Some((summary.runs as f64 / minutes.max(1e-9)).round());
    Ok(summary)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds one seed's outcome to a sweep's summary.
fn fold(summary: &mut crate::chaos::Summary, runs: u64, out: Outcome) {
    let seed = out.seed;
    summary.runs += 1;
    summary.seeds.push(seed);
    for (k, n) in &out.faults {
        *summary.faults.entry(k.clone()).or_default() += n;
    }
    summary.recovery_points_checked += out.recovery_points_checked;
    summary.restores_verified += out.restores_verified;
    summary.items_verified += out.items_verified;
    if runs <= 20 {
        summary.digests.insert(seed, out.digest.clone());
    }
    if !out.violations.is_empty() {
        summary.timelines.insert(seed, out.timeline);
    }
    for (invariant, detail) in out.violations {
        summary.violations.push(crate::chaos::Violation { seed, invariant, detail });
    }
}
