//! The simulation's agents: the real `AgentJob` over the sim hypervisor, and recoveries with
//! the real agent's checks.

use super::*;
use bulwark_agent::items_writer::{ItemsWriter, WriteOptions};
use bulwark_agent::restore_disk::{DiskRestore, Step};
use std::os::unix::fs::FileExt;

/// A job an agent runs: the real `AgentJob`, and what the simulation keeps beside it.
#[derive(Debug)]
pub struct Held {
    pub job: u64,
    /// The coordinator that asked for it, and the epoch of its claim the request carried.
    pub coord: usize,
    epoch: u64,
    machine: AgentJob,
    /// The request, for its disks' geometry.
    block_size: u64,
    id_key: Option<[u8; 32]>,
    /// The snapshot's lease: a job whose coordinator went quiet before the verdict was due is
    /// aborted when it runs out (the real agent learns it from its dead connection).
    pub lease_until: u64,
    /// What the snapshot gave (for a check's result).
    consistency: Consistency,
    /// A consistency check's side, while the coordinator compares.
    check: Option<AgentCheck>,
}

/// An agent's half of a consistency check: its snapshot hashed into a tree.
#[derive(Debug, Clone)]
struct AgentCheck {
    root: TreeRoot,
    pages: MemPages,
    size: u64,
    sent: u64,
}

/// An agent: its snapshots are in the sim's files; what it holds for which job is volatile.
pub struct Agent {
    pub host: String,
    /// Jobs by VM.
    pub held: BTreeMap<String, Held>,
    /// Recoveries by (coordinator, job id).
    pub restores: BTreeMap<(usize, u64), AgentRestore>,
    /// Item recoveries by (coordinator, job id): the real agent's writer.
    pub items: BTreeMap<(usize, u64), ItemsWriter>,
    root: PathBuf,
    /// The VMs' ownership claims on the sim root: the real agent's.
    claims: bulwark_agent::claims::Claims,
    /// Snapshots taken since the world last looked: (VM, coordinator, the job's epoch), for
    /// its check that only the VM's owner acts on it.
    pub taken: Vec<(String, usize, u64)>,
    broken: Option<Break>,
}

/// A recovery an agent runs: the real agent's `DiskRestore` (ids, order, range, the count at
/// the end), its steps performed with the sim's restore calls.
#[derive(Debug)]
pub struct AgentRestore {
    vm: String,
    size: u64,
    root: TreeRoot,
    pages: MemPages,
    machine: DiskRestore,
    /// Opened once at the restore's start, as the real agent's writer thread does.
    writer: bulwark_agent::sim::RestoreWriter,
}

impl Agent {
    /// Starts an agent: first it cleans what a dead one of its host left (thaw, release,
    /// changes merged back), as the real agent does at start-up.
    pub fn start(root: &Path, host: &str, broken: Option<Break>) -> Result<Agent, String> {
        bulwark_agent::sim::cleanup_orphans(root, host).map_err(sim_err)?;
        let claims = bulwark_agent::claims::Claims::new(SimBackend { root: root.to_owned() }.claims_dir());
        let claims = if broken == Some(Break::IgnoreClaims) { claims.break_by_ignoring_claims() } else { claims };
        Ok(Agent {
            host: host.to_owned(),
            held: BTreeMap::new(),
            restores: BTreeMap::new(),
            items: BTreeMap::new(),
            root: root.to_owned(),
            claims,
            taken: vec![],
            broken,
        })
    }

    /// A message from coordinator `from`; answers what to send back to it, in order.
    pub fn receive(&mut self, msg: Msg, from: usize, now: u64) -> Result<Vec<Out>, String> {
        match msg {
            Msg::Control(CoordinatorMessage::JobRequest(req)) => self.start_job(req, from, now),
            Msg::Control(CoordinatorMessage::RestoreRequest(req)) => self.start_restore(req, from),
            Msg::Frame { job, frame } if self.restores.contains_key(&(from, job)) => {
                self.restore_frame(from, job, frame)
            }
            Msg::Control(CoordinatorMessage::ItemsRequest { job, dest, keep_modes }) => {
                Ok(self.start_items(from, job, &dest, keep_modes))
            }
            Msg::Frame { job, frame } if self.items.contains_key(&(from, job)) => {
                Ok(self.items_frame(from, job, frame))
            }
            Msg::Control(CoordinatorMessage::JobDone { job, committed }) => {
                let Some(vm) = self.vm_of(from, job.0) else { return Ok(vec![]) };
                if let Some(h) = self.held.get_mut(&vm) {
                    h.machine.verdict(committed);
                }
                self.perform(&vm, now)
            }
            Msg::Control(CoordinatorMessage::Claim { vm, mode }) => Ok(vec![self.claim(from, vm.as_str(), mode)]),
            Msg::Frame { job, frame } => self.frame(from, job, frame, now),
            _ => Ok(vec![]),
        }
    }

    /// A coordinator's claim request, as the real agent's: only for a VM of this host.
    fn claim(&mut self, from: usize, vm: &str, mode: bulwark_protocol::ownership::ClaimMode) -> Out {
        let answer = |owner, refused| Out { after_ms: 0, msg: Msg::Claim { vm: vm.to_owned(), owner, refused } };
        match Vm::open(&self.root, vm) {
            Ok(v) if v.config.host == self.host => {}
            Ok(_) => return answer(None, Some(format!("{vm} is not on {}", self.host))),
            Err(e) => return answer(None, Some(e.to_string())),
        }
        match self.claims.claim(vm, &coordinator_name(from), mode) {
            Ok(owner) => answer(Some(owner), None),
            Err(e) => answer(self.claims.read(vm).ok().flatten(), Some(e.to_string())),
        }
    }

    /// An item recovery onto this host, as the real agent's `job::items`: the destination is
    /// made, the `Items` stream opened, and what arrives goes through the real `ItemsWriter`.
    fn start_items(&mut self, from: usize, job: JobId, dest: &str, keep_modes: bool) -> Vec<Out> {
        let fail = |why: String| {
            let outcome = JobOutcome::Failed { kind: FailureKind::Other, reason: why };
            vec![Out { after_ms: 0, msg: Msg::Result(JobResult { job, outcome }) }]
        };
        if !dest.starts_with('/') {
            return fail(format!("destination {dest:?} is not an absolute path"));
        }
        match ItemsWriter::new(Path::new(dest), WriteOptions { keep_modes }) {
            Ok(w) => {
                self.items.insert((from, job.0), w);
                let open = Msg::Open {
                    job: job.0,
                    disk: String::new(),
                    mode: TransferMode::Items,
                    blocks: 0,
                    block_size: 1 << 20,
                };
                vec![Out { after_ms: 0, msg: open }]
            }
            Err(e) => fail(format!("{e:#}")),
        }
    }

    /// A frame of an item stream.
    fn items_frame(&mut self, from: usize, job: u64, frame: TransferFrame) -> Vec<Out> {
        let say = |m| Out { after_ms: 0, msg: Msg::Frame { job, frame: TransferFrame::Message(m) } };
        let result = |outcome| Out { after_ms: 0, msg: Msg::Result(JobResult { job: JobId(job), outcome }) };
        let Some(w) = self.items.get_mut(&(from, job)) else { return vec![] };
        let written = match w.feed(frame) {
            Ok(false) => return vec![],
            Ok(true) => self.items.remove(&(from, job)).map(|w| w.finish()),
            Err(e) => {
                self.items.remove(&(from, job));
                Some(Err(e))
            }
        };
        match written {
            Some(Ok(w)) => vec![
                say(TransferMessage::Stored { blocks: w.files }),
                result(JobOutcome::Restored { bytes_read: 0, bytes_written: w.bytes, skipped: w.skipped_lines() }),
            ],
            Some(Err(e)) => {
                let reason = format!("{e:#}");
                vec![
                    say(TransferMessage::Failed { reason: reason.clone() }),
                    result(JobOutcome::Failed { kind: FailureKind::Other, reason }),
                ]
            }
            None => vec![],
        }
    }

    fn vm_of(&self, from: usize, job: u64) -> Option<String> {
        self.held.iter().find(|(_, h)| h.coord == from && h.job == job).map(|(v, _)| v.clone())
    }

    /// A recovery: the VM is created (or marked) as being restored, its disk hashed, and the
    /// stream opened with the disk's root.
    fn start_restore(&mut self, req: RestoreRequest, from: usize) -> Result<Vec<Out>, String> {
        let job = req.job;
        let fail = |why: String| {
            let outcome = JobOutcome::Failed { kind: FailureKind::Other, reason: why };
            Ok(vec![Out { after_ms: 0, msg: Msg::Result(JobResult { job, outcome }) }])
        };
        let [disk] = req.disks.as_slice() else { return fail("the simulation restores one disk".into()) };
        let backend = SimBackend { root: self.root.clone() };
        let vm = req.vm.as_str().to_owned();
        // As the real agent: a VM the recovery makes is the asking coordinator's, claimed before
        // anything is made.
        let mut claimed = vec![];
        if req.create.is_some() {
            match self.claims.for_job(&vm, &coordinator_name(from), 0) {
                Ok(owner) => claimed
                    .push(Out { after_ms: 0, msg: Msg::Claim { vm: vm.clone(), owner: Some(owner), refused: None } }),
                Err(e) => return fail(e.to_string()),
            }
        }
        let what = format!("recovery job {}", job.0);
        if let Err(e) = backend.restore_begin(
            &vm,
            &self.host,
            &what,
            req.create.as_ref().map(|c| (c, req.disks.as_slice())),
            &req.config,
        ) {
            return fail(e.to_string());
        }
        let bs = u64::from(req.block_size);
        let size = disk.size_bytes;
        let blocks = size.div_ceil(bs);
        let hasher = req.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
        let v = Vm::open(&self.root, &vm).map_err(sim_err)?;
        let writer = v.restore_writer(disk.name.as_str()).map_err(sim_err)?;
        // As the real agent's reader: the holes of a sparse image (all of a disk just created)
        // are zeros without reading them.
        let image_path = v.image(disk.name.as_str());
        drop(v);
        let allocated = bulwark_agent::reader::allocated_blocks(&image_path, size, bs).map_err(|e| e.to_string())?;
        let image = std::fs::File::open(&image_path).map_err(|e| format!("{}: {e}", image_path.display()))?;
        let mut leaves = vec![];
        let mut buf = vec![0u8; bs as usize];
        for index in allocated {
            let offset = index * bs;
            let block = &mut buf[..bs.min(size - offset) as usize];
            image.read_exact_at(block, offset).map_err(|e| format!("{}: {e}", image_path.display()))?;
            let id = hasher.id(block);
            if id != ZERO {
                leaves.push((index, id));
            }
        }
        let mut pages = MemPages::default();
        let root = blockmap::update(&mut pages, None, blocks, leaves).map_err(|e| e.to_string())?;
        let restore = AgentRestore { vm, size, root, pages, machine: DiskRestore::new(size, bs, hasher), writer };
        self.restores.insert((from, job.0), restore);
        let open = Msg::Open {
            job: job.0,
            disk: disk.name.to_string(),
            mode: TransferMode::Restore,
            blocks,
            block_size: req.block_size,
        };
        let frame = TransferFrame::Message(TransferMessage::Root { root, bytes_read: size });
        claimed.extend([Out { after_ms: 0, msg: open }, Out { after_ms: 1, msg: Msg::Frame { job: job.0, frame } }]);
        Ok(claimed)
    }

    /// A frame of a recovery's stream.
    fn restore_frame(&mut self, from: usize, job: u64, frame: TransferFrame) -> Result<Vec<Out>, String> {
        let say = |m| Out { after_ms: 0, msg: Msg::Frame { job, frame: TransferFrame::Message(m) } };
        let result = |outcome| Out { after_ms: 0, msg: Msg::Result(JobResult { job: JobId(job), outcome }) };
        let Some(r) = self.restores.get_mut(&(from, job)) else { return Ok(vec![]) };
        let step: Result<Option<Vec<Out>>, String> = (|| match r.machine.frame(frame)? {
            Step::AnswerPages(nodes) => {
                let pages = nodes
                    .iter()
                    .map(|&(l, i)| blockmap::node_entries(&r.pages, &r.root, l, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                Ok(Some(vec![say(TransferMessage::Pages { pages })]))
            }
            Step::Write { offset, block } => {
                let data = block.check()?;
                r.writer.write_at(offset, &data).map_err(sim_err)?;
                Ok(Some(vec![]))
            }
            Step::Done => Ok(None),
        })();
        match step {
            Ok(Some(out)) => Ok(out),
            Ok(None) => {
                let Some(r) = self.restores.remove(&(from, job)) else { return Ok(vec![]) };
                let mut v = Vm::open(&self.root, &r.vm).map_err(sim_err)?;
                v.restore_finish().map_err(sim_err)?;
                let outcome =
                    JobOutcome::Restored { bytes_read: r.size, bytes_written: r.machine.written(), skipped: vec![] };
                Ok(vec![say(TransferMessage::Stored { blocks: r.machine.received() }), result(outcome)])
            }
            Err(why) => {
                // The VM stays marked as being restored: a recovery that completes clears it.
                self.restores.remove(&(from, job));
                Ok(vec![
                    say(TransferMessage::Failed { reason: why.clone() }),
                    result(JobOutcome::Failed { kind: FailureKind::Other, reason: why }),
                ])
            }
        }
    }

    fn start_job(&mut self, req: JobRequest, from: usize, now: u64) -> Result<Vec<Out>, String> {
        let name = req.vm.as_str().to_owned();
        if self.held.contains_key(&name) {
            // One job per VM on an agent: the second is refused at once.
            let outcome =
                JobOutcome::Failed { kind: FailureKind::Other, reason: "the VM holds a snapshot already".into() };
            return Ok(vec![Out { after_ms: 0, msg: Msg::Result(JobResult { job: req.job, outcome }) }]);
        }
        let mut machine = AgentJob::new(&req, LEASE_MS);
        if self.broken == Some(Break::ConfirmEarly) {
            machine.break_with(bulwark_agent::agent_job::Broken::ConfirmBeforeVerdict);
        }
        let held = Held {
            job: req.job.0,
            coord: from,
            epoch: req.epoch,
            machine,
            block_size: u64::from(req.block_size),
            id_key: req.id_key,
            lease_until: now + LEASE_MS,
            consistency: Consistency::Crash,
            check: None,
        };
        self.held.insert(name.clone(), held);
        self.perform(&name, now)
    }

    /// Performs what `vm`'s job asks for against the sim hypervisor; answers what to send.
    fn perform(&mut self, vm: &str, now: u64) -> Result<Vec<Out>, String> {
        let mut out = vec![];
        loop {
            let Some(h) = self.held.get_mut(vm) else { return Ok(out) };
            let Some(effect) = h.machine.poll_effect() else { return Ok(out) };
            let job = h.job;
            match effect {
                AgentEffect::Take => {
                    let (coord, epoch) = (h.coord, h.epoch);
                    let r = admit(&self.root, &self.claims, &self.host, vm, coord, epoch, &mut out)
                        .and_then(|()| take(&self.root, &self.host, vm, now));
                    if let Ok(s) = &r {
                        h.consistency = s.consistency;
                        self.taken.push((vm.to_owned(), coord, epoch));
                    }
                    h.machine.taken(r);
                }
                AgentEffect::SendDisk(d) => {
                    let (bs, id_key, kind) = (h.block_size, h.id_key, h.machine.kind());
                    let hasher = id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
                    let v = Vm::open(&self.root, vm).map_err(sim_err)?;
                    // As the real agent: the held snapshot's file, read without the VM's lock.
                    let (path, size) = v.snapshot_source(DISK).map_err(sim_err)?;
                    let image = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    let blocks = size.div_ceil(bs);
                    let read = |index: u64| -> Result<(Digest, Vec<u8>), String> {
                        let offset = index * bs;
                        let mut buf = vec![0u8; bs.min(size - offset) as usize];
                        image.read_exact_at(&mut buf, offset).map_err(|e| format!("{}: {e}", path.display()))?;
                        Ok((hasher.id(&buf), buf))
                    };
                    let open = |mode| Out {
                        after_ms: 0,
                        msg: Msg::Open { job, disk: DISK.into(), mode, blocks, block_size: bs as u32 },
                    };
                    if kind == WireKind::ConsistencyCheck {
                        let mut pages = MemPages::default();
                        let mut leaves = vec![];
                        for index in 0..blocks {
                            let (id, _) = read(index)?;
                            if id != ZERO {
                                leaves.push((index, id));
                            }
                        }
                        let root = blockmap::update(&mut pages, None, blocks, leaves).map_err(|e| e.to_string())?;
                        out.push(open(TransferMode::Compare));
                        let frame = TransferFrame::Message(TransferMessage::Root { root, bytes_read: size });
                        out.push(Out { after_ms: 1, msg: Msg::Frame { job, frame } });
                        h.check = Some(AgentCheck { root, pages, size, sent: 0 });
                        // The disk is sent once the coordinator has asked for what differs.
                        continue;
                    }
                    let indices: Result<Vec<u64>, SimError> = match kind {
                        WireKind::ExpressFull | WireKind::Sync => {
                            v.changes_since(DISK, d.token).map(|m| m.dirty_blocks(bs))
                        }
                        _ => Ok((0..blocks).collect()),
                    };
                    let indices = match indices {
                        Ok(i) => i,
                        Err(SimError::TrackingLost { .. }) => {
                            h.machine.disk_sent(Err((FailureKind::TrackingLost, "change tracking was lost".into())));
                            continue;
                        }
                        Err(e) => return Err(sim_err(e)),
                    };
                    out.push(open(TransferMode::Blocks));
                    for (i, &index) in indices.iter().enumerate() {
                        let (id, data) = read(index)?;
                        let frame = if id == ZERO {
                            TransferFrame::Zero { index }
                        } else {
                            TransferFrame::Block { index, id, data }
                        };
                        out.push(Out { after_ms: i as u64, msg: Msg::Frame { job, frame } });
                    }
                    let sent = indices.len() as u64;
                    let end = TransferFrame::Message(TransferMessage::End { blocks_sent: sent, bytes_read: sent * bs });
                    out.push(Out { after_ms: sent, msg: Msg::Frame { job, frame: end } });
                    // The real agent waits for `Stored` first; this one reports at once, and
                    // its result (on the control stream) may overtake the last blocks.
                    h.machine.disk_sent(Ok((sent, sent * bs)));
                }
                AgentEffect::Report(outcome) => {
                    let after_ms = out.last().map_or(0, |o: &Out| o.after_ms);
                    out.push(Out { after_ms, msg: Msg::Result(JobResult { job: JobId(job), outcome }) });
                    h.machine.reported(true, now);
                }
                AgentEffect::Release { commit } => {
                    finish(&self.root, vm, commit)?;
                    // A check's questions that arrive after this find no snapshot to read.
                    h.check = None;
                    h.machine.released();
                }
                AgentEffect::Done => {
                    self.held.remove(vm);
                }
            }
        }
    }

    /// A frame on a job's stream: a check's questions, `Stored` or `Failed`.
    fn frame(&mut self, from: usize, job: u64, frame: TransferFrame, now: u64) -> Result<Vec<Out>, String> {
        let Some(vm) = self.vm_of(from, job) else { return Ok(vec![]) };
        let Some(h) = self.held.get_mut(&vm) else { return Ok(vec![]) };
        h.lease_until = now + LEASE_MS;
        let say = |m| Out { after_ms: 0, msg: Msg::Frame { job, frame: TransferFrame::Message(m) } };
        let mut out = vec![];
        match frame {
            TransferFrame::Message(TransferMessage::WantPages { nodes }) => {
                let Some(c) = h.check.as_ref() else { return Ok(vec![]) };
                let answer = nodes
                    .iter()
                    .map(|&(l, i)| blockmap::node_entries(&c.pages, &c.root, l, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                out.push(say(TransferMessage::Pages { pages: answer }));
            }
            TransferFrame::Message(TransferMessage::WantBlocks { indices }) if indices.is_empty() => {
                let Some(c) = h.check.take() else { return Ok(vec![]) };
                out.push(say(TransferMessage::End { blocks_sent: c.sent, bytes_read: c.size }));
                h.machine.disk_sent(Ok((c.sent, c.size)));
            }
            TransferFrame::Message(TransferMessage::WantBlocks { indices }) => {
                let v = Vm::open(&self.root, &vm).map_err(sim_err)?;
                let hasher = h.id_key.map_or_else(ChunkHasher::plain, ChunkHasher::keyed);
                let bs = h.block_size;
                let Some(c) = h.check.as_mut() else { return Ok(vec![]) };
                let mut failed = None;
                for (i, index) in indices.iter().copied().enumerate() {
                    let offset = index * bs;
                    let mut buf = vec![0u8; bs.min(c.size.saturating_sub(offset)) as usize];
                    // As the real agent: a snapshot that cannot be read fails the job.
                    if let Err(e) = v.snapshot_read(DISK, offset, &mut buf) {
                        failed = Some(e.to_string());
                        break;
                    }
                    let id = hasher.id(&buf);
                    let frame = if id == ZERO {
                        TransferFrame::Zero { index }
                    } else {
                        TransferFrame::Block { index, id, data: buf }
                    };
                    out.push(Out { after_ms: i as u64, msg: Msg::Frame { job, frame } });
                }
                c.sent += indices.len() as u64;
                if let Some(reason) = failed {
                    h.check = None;
                    out.push(say(TransferMessage::Failed { reason: reason.clone() }));
                    h.machine.disk_sent(Err((FailureKind::Other, reason)));
                }
            }
            // The coordinator gave up on a check's stream: so does the job.
            TransferFrame::Message(TransferMessage::Failed { reason }) if h.check.is_some() => {
                h.check = None;
                h.machine.disk_sent(Err((FailureKind::Other, reason)));
            }
            _ => {}
        }
        out.extend(self.perform(&vm, now)?);
        Ok(out)
    }

    /// Jobs whose verdict is overdue, or whose coordinator fell silent for a lease, are
    /// released with their changes kept.
    pub fn expire(&mut self, now: u64) -> Result<(), String> {
        let vms: Vec<String> = self.held.keys().cloned().collect();
        for vm in vms {
            if let Some(h) = self.held.get_mut(&vm) {
                h.machine.timeout(now);
                if h.lease_until <= now {
                    h.machine.abort();
                }
            }
            self.perform(&vm, now)?;
        }
        Ok(())
    }
}

/// What the real agent checks before a job's snapshot: the VM is on this host, and its claim
/// lets coordinator `coord`'s job with `epoch` act (epoch 0 claims it first); the coordinator
/// is told the claim when the job claimed the VM or was refused for it.
fn admit(
    root: &Path,
    claims: &bulwark_agent::claims::Claims,
    host: &str,
    vm: &str,
    coord: usize,
    epoch: u64,
    out: &mut Vec<Out>,
) -> Result<(), (FailureKind, String)> {
    match Vm::open(root, vm) {
        Ok(v) if v.config.host != host => return Err((FailureKind::NotHere, "the VM is not on this host".into())),
        Ok(_) => {}
        Err(e) => return Err((FailureKind::Other, e.to_string())),
    }
    let tell = |owner, refused| Out { after_ms: 0, msg: Msg::Claim { vm: vm.to_owned(), owner, refused } };
    match claims.for_job(vm, &coordinator_name(coord), epoch) {
        Ok(owner) => {
            if epoch == 0 {
                out.push(tell(Some(owner), None));
            }
            Ok(())
        }
        Err(bulwark_agent::claims::ClaimError::Refused(r)) => {
            out.push(tell(r.owner().cloned(), Some(r.to_string())));
            Err((FailureKind::NotOwner, r.to_string()))
        }
        Err(e) => Err((FailureKind::Other, e.to_string())),
    }
}

/// Takes `vm`'s snapshot on `host` (freeze → take → thaw), if the VM is there and free.
fn take(root: &Path, host: &str, vm: &str, now: u64) -> Result<Snapshot, (FailureKind, String)> {
    let other = |e: SimError| (FailureKind::Other, e.to_string());
    let mut v = Vm::open(root, vm).map_err(other)?;
    if v.config.host != host {
        return Err((FailureKind::NotHere, "the VM is not on this host".into()));
    }
    if v.config.snapshot.is_some() {
        return Err((FailureKind::Other, "the VM holds a snapshot already".into()));
    }
    let consistency = match v.freeze(now).map_err(other)? {
        bulwark_agent::sim::SnapConsistency::App => Consistency::App,
        bulwark_agent::sim::SnapConsistency::Filesystem => Consistency::Filesystem,
        bulwark_agent::sim::SnapConsistency::Crash => Consistency::Crash,
    };
    let (_, token) = v.take_snapshot(host, now / 1000).map_err(other)?;
    v.thaw().map_err(other)?;
    // No definition goes with the point: a sim VM's holds its random UUID, which would make
    // the final catalog differ between two runs of one seed.
    Ok(Snapshot { token, consistency, note: None, config: vec![] })
}

/// Releases `vm`'s snapshot; `commit` advances the token, `None` keeps the changes.
fn finish(root: &Path, vm: &str, commit: Option<ChangeToken>) -> Result<(), String> {
    let mut v = Vm::open(root, vm).map_err(sim_err)?;
    if v.config.snapshot.is_none() {
        // Never taken (the job failed before) or already released.
        return Ok(());
    }
    v.release_snapshot().map_err(sim_err)?;
    match commit {
        Some(next) => v.confirm_to(next).map(|_| ()).map_err(sim_err),
        None => v.abandon().map_err(sim_err),
    }
}
