//! The QEMU/KVM backend (DESIGN §5, CONTRACT "The QEMU/KVM backend"): real VMs driven over
//! QMP, behind the same [`Hypervisor`] trait as the sim, so the coordinator cannot tell them
//! apart.
//!
//! - **Tracking**: a dirty bitmap `bulwark` per disk node, persistent on qcow2 (raw images get
//!   a non-persistent one, lost when QEMU restarts). A bitmap that is missing or that QEMU
//!   reports `inconsistent` (QEMU was killed) bumps the generation: `TrackingLost`.
//! - **Snapshot** (the VSS sequence): freeze through the guest agent (bounded), or `stop`
//!   without one; then, with the VM stopped for a moment, one QMP `transaction` moves the live
//!   bitmap's bits into a disabled `bulwark-snap` bitmap and clears the live one, and each disk
//!   gets a point-in-time view by fleecing: a `copy-before-write` filter swapped under the guest
//!   device (old data goes to a sparse fleecing image) and a `snapshot-access` node on top.
//!   `cont`/thaw follow at once: guest writes never wait for the network.
//! - **Reading**: the access nodes are exported over QEMU's NBD server on a unix socket with
//!   the snapshot bitmap; the agent reads `qemu:dirty-bitmap:bulwark-snap` (changes) or
//!   `base:allocation` (initial copies) block status, then the blocks. A VM that is off is read
//!   through `qemu-nbd -r` with the same bitmaps, moved offline with `qemu-img bitmap`.
//! - **Release** tears the graph down; `confirm` drops the snapshot bitmap, `abandon` merges it
//!   back into the live one, so no change is ever lost. Every step is recorded first in the
//!   VM's state file, so a killed agent's leftovers are found and cleaned at start-up.
//! - **Restores** write through a writable `qemu-nbd` of the image (QEMU must not run); a
//!   restore to a new VM creates images and a `NAME.toml` in the restore directory.
//!
//! - **Clusters** (`shared = true`): nodes sharing one definitions directory each report the
//!   VMs whose QEMU runs on them, and the VMs' state lives beside the definitions, so a live
//!   migration keeps incremental backups (`cluster`).
//!
//! Modules: [`qmp`] (QMP and guest agent clients), [`nbd`] (NBD client), [`defs`] (VM files),
//! `graph` (bitmaps, fleecing, exports), `cluster` (shared storage), [`launch`] (starting a VM
//! for tests and benchmarks).

mod cluster;
pub mod defs;
mod graph;
pub mod launch;
pub mod nbd;
pub mod qmp;
mod state;

pub use graph::graph_matches;
use graph::{find_node, image_info, offline_bitmaps, qemu_img, remove_bitmap_online};
use state::{write_durably, FrozenState, Open, SnapState, VmState};

use crate::backend::{BackendError, DiskWriter, Hypervisor, Quiesced};
use crate::reader::{ReadBlock, ReadStats};
use bulwark_protocol::block::ChunkHasher;
use bulwark_protocol::messages::{
    ChangeToken, Consistency, DiskInfo, GuestOs, Inventory, NewVm, PowerState, VmInfo, MAX_VM_CONFIG,
};
use bulwark_protocol::{DiskId, VmId};
use defs::{DiskDef, HookFailure, VmDef};
use nbd::Nbd;
use qmp::{Qga, Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The live dirty bitmap of every protected disk.
pub const LIVE_BITMAP: &str = "bulwark";
/// The frozen bitmap of a held snapshot (kept until the coordinator commits).
pub const SNAP_BITMAP: &str = "bulwark-snap";
/// How long a guest may take to freeze.
/// How long QEMU may take to answer a command.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of each disk a snapshot reserves in the fleece directory by default, in percent.
pub const DEFAULT_FLEECE_RESERVE_PERCENT: u8 = 10;
/// Less free space than this in the fleece directory, after a failed read, means it filled up.
const FLEECE_FULL: u64 = 1 << 20;
/// How long an inventory waits for one VM's QMP: the inventory covers every VM of the host.
const INVENTORY_QMP_TIMEOUT: Duration = Duration::from_secs(3);
/// Meta context of the snapshot bitmap.
fn dirty_context() -> String {
    format!("qemu:dirty-bitmap:{SNAP_BITMAP}")
}
const ALLOCATION: &str = "base:allocation";

fn fleece_node(d: &DiskDef) -> String {
    format!("bulwark-fl-{}", d.node)
}
fn cbw_node(d: &DiskDef) -> String {
    format!("bulwark-cbw-{}", d.node)
}
fn access_node(d: &DiskDef) -> String {
    format!("bulwark-acc-{}", d.node)
}
fn export_id(d: &DiskDef) -> String {
    format!("bulwark-exp-{}", d.node)
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

/// The QEMU backend of one host.
pub struct QemuBackend {
    vm_dir: PathBuf,
    restore_dir: PathBuf,
    state_dir: PathBuf,
    claims_dir: PathBuf,
    /// On shared storage: this node's name (see `cluster`).
    cluster: Option<String>,
    open: Mutex<HashMap<String, Open>>,
}

impl std::fmt::Debug for QemuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuBackend").field("vm_dir", &self.vm_dir).field("state_dir", &self.state_dir).finish()
    }
}

impl QemuBackend {
    /// A backend over the definitions in `vm_dir`, keeping its own state in `state_dir`.
    /// Restores to new VMs go to `restore_dir` (default `vm_dir/restored`).
    pub fn new(vm_dir: PathBuf, restore_dir: Option<PathBuf>, state_dir: PathBuf) -> Result<Self, BackendError> {
        if !vm_dir.is_dir() {
            return Err(failed(format!("the QEMU VM directory {} does not exist", vm_dir.display())));
        }
        let restore_dir = restore_dir.unwrap_or_else(|| vm_dir.join("restored"));
        // The NBD sockets there serve whole disks: only the agent's user may reach them.
        for d in [&state_dir, &state_dir.join("nbd"), &state_dir.join("fleece")] {
            std::fs::create_dir_all(d).map_err(|e| failed(format!("cannot create {}: {e}", d.display())))?;
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| failed(format!("cannot restrict {}: {e}", d.display())))?;
        }
        let claims_dir = vm_dir.join("claims");
        Ok(Self { vm_dir, restore_dir, state_dir, claims_dir, cluster: None, open: Mutex::new(HashMap::new()) })
    }

    /// The definitions directory is shared by the nodes of a cluster and this is node `host`:
    /// only the VMs whose QEMU runs here are this node's, and the VMs' state lives in
    /// `vm_dir/state` (see `cluster`).
    pub fn shared_by_cluster(mut self, host: &str) -> Result<Self, BackendError> {
        let dir = self.vm_dir.join("state");
        std::fs::create_dir_all(&dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        self.cluster = Some(host.to_owned());
        Ok(self)
    }

    /// Whether VM `def` (its sockets this node's) is this node's; on a cluster's shared storage,
    /// the node that sees it running also records itself as the VM's last node.
    fn resides_here(&self, def: &VmDef, seen: &cluster::Seen) -> Result<bool, BackendError> {
        let Some(me) = &self.cluster else { return Ok(true) };
        let st = self.load_state(&def.name)?;
        if !cluster::runs_here(seen, st.host.as_deref(), me) {
            return Ok(false);
        }
        if *seen != cluster::Seen::Off && st.host.as_deref() != Some(me) {
            // Read again under the lock every state write takes, so a snapshot step written
            // meanwhile is never overwritten; recorded only while none is under way (the node
            // doing it owns the file).
            let _lock = self.lock_state(&def.name)?;
            let mut st = self.load_state(&def.name)?;
            if st.host.as_deref() != Some(me) && st.frozen.is_none() && st.snapshot.is_none() {
                st.host = Some(me.clone());
                self.write_state(&def.name, &st)?;
            }
        }
        Ok(true)
    }

    /// Keeps the VMs' ownership claims in `dir` (on the storage the cluster's nodes share)
    /// instead of `vm_dir/claims`.
    pub fn with_claims_dir(mut self, dir: PathBuf) -> Self {
        self.claims_dir = dir;
        self
    }

    fn def(&self, vm: &str) -> Result<VmDef, BackendError> {
        let def = VmDef::load(&self.def_path(vm)?).map_err(failed)?;
        Ok(self.for_this_node(def))
    }

    /// `{host}` in the definition's sockets, on a cluster's shared storage.
    fn for_this_node(&self, def: VmDef) -> VmDef {
        match &self.cluster {
            Some(me) => cluster::for_node(def, me),
            None => def,
        }
    }

    /// Where `vm`'s definition is: the VM directory's, else the restore directory's.
    fn def_path(&self, vm: &str) -> Result<PathBuf, BackendError> {
        for dir in [&self.vm_dir, &self.restore_dir] {
            let p = dir.join(format!("{vm}.toml"));
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(failed(format!("no QEMU VM {vm} in {}", self.vm_dir.display())))
    }

    fn state_path(&self, vm: &str) -> PathBuf {
        match &self.cluster {
            Some(_) => self.vm_dir.join("state").join(format!("{vm}.json")),
            None => self.state_dir.join(format!("{vm}.json")),
        }
    }

    fn load_state(&self, vm: &str) -> Result<VmState, BackendError> {
        use std::io::Read as _;
        let p = self.state_path(vm);
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VmState::default()),
            Err(e) => return Err(failed(format!("cannot read {}: {e}", p.display()))),
        };
        let mut b = vec![];
        file.take(state::MAX_STATE_FILE)
            .read_to_end(&mut b)
            .map_err(|e| failed(format!("cannot read {}: {e}", p.display())))?;
        serde_json::from_slice(&b).map_err(|e| failed(format!("{} is damaged: {e}", p.display())))
    }

    /// The lock of VM `vm`'s state shared by a cluster's nodes (none without a cluster: one
    /// agent owns its state directory).
    fn lock_state(&self, vm: &str) -> Result<Option<std::fs::File>, BackendError> {
        if self.cluster.is_none() {
            return Ok(None);
        }
        let p = self.vm_dir.join("state").join(format!("{vm}.lock"));
        state::lock_file(&p).map(Some).map_err(|e| failed(format!("cannot lock {}: {e}", p.display())))
    }

    /// Writes the state durably: temp file, fsync, rename, fsync of the directory (under the
    /// VM's state lock on a cluster's shared storage).
    fn save_state(&self, vm: &str, st: &VmState) -> Result<(), BackendError> {
        let _lock = self.lock_state(vm)?;
        self.write_state(vm, st)
    }

    fn write_state(&self, vm: &str, st: &VmState) -> Result<(), BackendError> {
        let p = self.state_path(vm);
        let mut st = st.clone();
        if st.frozen.is_some() || st.snapshot.is_some() {
            // The node doing a snapshot step is the VM's (and the one that cleans it up).
            st.host = self.cluster.clone().or(st.host);
        }
        let text = serde_json::to_vec_pretty(&st).map_err(failed)?;
        write_durably(&p, &text).map_err(|e| failed(format!("cannot write {}: {e}", p.display())))
    }

    fn nbd_socket(&self, name: &str) -> Result<PathBuf, BackendError> {
        let p = self.state_dir.join("nbd").join(format!("{name}.sock"));
        // sockaddr_un holds 108 bytes.
        if p.as_os_str().len() > 100 {
            return Err(failed(format!("the socket path {} is too long; use a shorter state directory", p.display())));
        }
        Ok(p)
    }

    /// A QMP session with the VM's QEMU, or `None` when it is off.
    fn qmp(&self, def: &VmDef) -> Result<Option<Qmp>, BackendError> {
        match Qmp::connect(&def.qmp, QMP_TIMEOUT) {
            Ok(q) => Ok(Some(q)),
            Err(QmpError::Connect { .. }) => Ok(None),
            Err(e) => Err(failed(format!("{}: {e}", def.name))),
        }
    }

    fn fleece_dir(&self, def: &VmDef) -> PathBuf {
        def.fleece_dir.clone().unwrap_or_else(|| self.state_dir.join("fleece"))
    }

    fn fleece_path(&self, def: &VmDef, d: &DiskDef) -> PathBuf {
        self.fleece_dir(def).join(format!("{}-{}.fleece", def.name, d.name))
    }

    /// Why a held snapshot could not be read: a fleece directory that filled up broke the
    /// snapshot (QEMU refuses its reads from then on), which the bare NBD error does not say.
    fn explain_read_failure(&self, vm: &str, error: String) -> BackendError {
        let Ok(def) = self.def(vm) else { return failed(error) };
        let dir = self.fleece_dir(&def);
        let full = rustix::fs::statvfs(&dir).is_ok_and(|st| st.f_bavail.saturating_mul(st.f_frsize) < FLEECE_FULL);
        if full {
            return failed(format!(
                "the snapshot of {vm} broke: its fleece directory {} is full, so the point in time \
                 could not be kept while the guest wrote (the guest's writes all went on); free \
                 space there or raise fleece_reserve_percent ({error})",
                dir.display()
            ));
        }
        failed(error)
    }

    /// Refuses a snapshot of a running VM whose fleecing images may not fit: while a backup
    /// reads the snapshot, every first guest write to a cluster copies the old data into the
    /// fleece image, so the images grow up to the guest's churn over the backup window —
    /// `fleece_reserve_percent` of each disk (as DPM sizes its differencing disks). Were they to
    /// fill anyway, the snapshot breaks and the backup fails; the guest never does (see
    /// [`graph`]'s `on-cbw-error`).
    fn check_fleece_space(&self, q: &mut Qmp, def: &VmDef) -> Result<(), BackendError> {
        let percent = u64::from(def.fleece_reserve_percent.unwrap_or(DEFAULT_FLEECE_RESERVE_PERCENT));
        let mut need = 0u64;
        let mut total = 0u64;
        for d in &def.disks {
            let size = self.size_of(def, d, Some(&mut *q))?;
            total = total.saturating_add(size);
            need = need.saturating_add(size.div_ceil(100).saturating_mul(percent));
        }
        let dir = self.fleece_dir(def);
        std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let st = rustix::fs::statvfs(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < need {
            return Err(BackendError::Refused(format!(
                "the fleece directory {} has {} MiB free; a backup of {} needs about {} MiB there \
                 ({percent} % of its {} MiB of disks may change while it is read): free space, \
                 point fleece_dir at a larger file system or lower fleece_reserve_percent",
                dir.display(),
                free >> 20,
                def.name,
                need.div_ceil(1 << 20),
                total >> 20
            )));
        }
        Ok(())
    }

    /// The size of a disk: from QEMU when it runs, else from the image.
    fn size_of(&self, def: &VmDef, d: &DiskDef, q: Option<&mut Qmp>) -> Result<u64, BackendError> {
        if let Some(q) = q {
            let nodes = q.execute("query-named-block-nodes", json!({ "flat": true })).map_err(failed)?;
            if let Some(n) = find_node(&nodes, &d.node) {
                if let Some(s) = n.get("image").and_then(|i| i.get("virtual-size")).and_then(Value::as_u64) {
                    return Ok(s);
                }
            }
            return Err(failed(format!("{}: QEMU has no block node {} (disk {})", def.name, d.node, d.name)));
        }
        let info = image_info(&d.path, &d.format)?;
        info.get("virtual-size")
            .and_then(Value::as_u64)
            .ok_or_else(|| failed(format!("qemu-img info {} gave no size", d.path.display())))
    }

    fn with_nbd<T>(
        &self,
        vm: &str,
        disk: &str,
        f: impl FnOnce(&mut Nbd) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let conn = {
            let open = self.open.lock().map_err(|_| failed("backend state poisoned"))?;
            open.get(vm).and_then(|o| o.disks.get(disk)).cloned()
        };
        let Some(conn) = conn else {
            return Err(failed(format!("{vm}: no snapshot or restore of disk {disk} is open on this agent")));
        };
        let mut n = conn.lock().map_err(|_| failed("NBD connection poisoned"))?;
        f(&mut n)
    }

    fn close_open(&self, vm: &str) {
        let taken = self.open.lock().ok().and_then(|mut o| o.remove(vm));
        if let Some(o) = taken {
            o.close();
        }
    }

    /// Runs a host hook with its bound; answers why it failed, if it did.
    fn run_hook(&self, def: &VmDef, which: &str, command: &str) -> Option<String> {
        let mut child = match Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("BULWARK_VM", &def.name)
            .env("BULWARK_HOOK", which)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return Some(format!("{which} hook could not start: {e}")),
        };
        let deadline = Instant::now() + def.hook_timeout();
        loop {
            match child.try_wait() {
                Ok(Some(s)) if s.success() => return None,
                Ok(Some(s)) => return Some(format!("{which} hook failed ({s})")),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Some(format!("{which} hook did not finish within {:?}", def.hook_timeout()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Some(format!("{which} hook: {e}")),
            }
        }
    }

    /// At agent start-up: thaws guests, resumes VMs, tears down graphs and exports and merges
    /// snapshot bitmaps back for every VM an earlier run of this agent left mid-snapshot.
    /// Answers the VMs cleaned.
    pub fn cleanup_orphans(&self) -> Result<Vec<String>, BackendError> {
        let mut cleaned = vec![];
        for def in defs::load_dir(&self.vm_dir).map_err(failed)?.into_iter().flatten() {
            let st = match self.load_state(&def.name) {
                Ok(st) => st,
                Err(e) => {
                    tracing::warn!(vm = %def.name, error = %e, "cannot read the VM's state: not cleaned up");
                    continue;
                }
            };
            if st.frozen.is_none() && st.snapshot.is_none() {
                continue;
            }
            if let (Some(me), Some(other)) = (&self.cluster, &st.host) {
                if me != other {
                    // Another node of the cluster is mid-snapshot on it: its own to clean.
                    continue;
                }
            }
            self.thaw(&def.name)?;
            self.release(&def.name)?;
            self.abandon(&def.name)?;
            cleaned.push(def.name);
        }
        Ok(cleaned)
    }

    fn check_token(st: &VmState, vm: &str, token: Option<ChangeToken>) -> Result<(), BackendError> {
        let current = ChangeToken { generation: st.generation, sequence: st.sequence };
        let lost = |why: &str| Err(BackendError::TrackingLost(format!("{vm}: {why}")));
        match token {
            None => lost("no change token: nothing was backed up with tracking yet"),
            Some(t) if t.generation != current.generation => {
                lost("tracking was reset (QEMU was killed, a bitmap vanished, or the disks were restored)")
            }
            Some(t) if t != current && t.sequence != current.sequence + 1 => {
                lost("the token is not the last one confirmed")
            }
            Some(_) => Ok(()),
        }
    }
}

/// A restore's writes into one disk, through the NBD connection its `restore_begin` opened.
struct NbdRestoreWriter<'a> {
    backend: &'a QemuBackend,
    vm: String,
    disk: String,
}

impl DiskWriter for NbdRestoreWriter<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.backend.with_nbd(&self.vm, &self.disk, |n| n.write_at(data, offset).map_err(failed))
    }
}

/// What this node sees of VM `def`'s QEMU. A QEMU whose QMP socket does not answer (hung, or
/// busy with a long command) is still a VM of this host: it is reported as running, its disk
/// sizes read from the images, so it neither vanishes from the coordinator nor holds up the
/// others.
fn probe(def: &VmDef) -> ((Option<Qmp>, PowerState), cluster::Seen) {
    let hung = |e: &dyn std::fmt::Display| {
        tracing::warn!(vm = %def.name, error = %e, "QEMU does not answer: reported as running");
        ((None, PowerState::Running), cluster::Seen::NoAnswer)
    };
    match Qmp::connect(&def.qmp, INVENTORY_QMP_TIMEOUT) {
        Err(QmpError::Connect { .. }) => ((None, PowerState::Off), cluster::Seen::Off),
        Ok(mut q) => match q.status() {
            Ok(s) if s == "running" => ((Some(q), PowerState::Running), cluster::Seen::Status(s)),
            Ok(s) => ((Some(q), PowerState::Paused), cluster::Seen::Status(s)),
            Err(e) => hung(&e),
        },
        Err(e) => hung(&e),
    }
}

impl Hypervisor for QemuBackend {
    fn claims_dir(&self) -> PathBuf {
        self.claims_dir.clone()
    }

    fn is_here(&self, vm: &str, _host: &str) -> Result<bool, BackendError> {
        // A VM of this host is a usable definition in the VM directory (as in the inventory),
        // without asking every VM's QEMU; on a cluster's shared storage, one whose QEMU runs
        // here (or ran here last).
        let path = self.vm_dir.join(format!("{vm}.toml"));
        let Some(def) = VmDef::load(&path).ok().filter(|d| path.is_file() && d.name == vm) else { return Ok(false) };
        if self.cluster.is_none() {
            return Ok(true);
        }
        let def = self.for_this_node(def);
        let seen = probe(&def).1;
        self.resides_here(&def, &seen)
    }

    fn inventory(&self, _host: &str) -> Result<Inventory, BackendError> {
        let mut vms = vec![];
        for def in defs::load_dir(&self.vm_dir).map_err(failed)? {
            let def = match def {
                Ok(d) => self.for_this_node(d),
                Err(e) => {
                    tracing::warn!(error = %e, "a VM definition is not usable: left out of the inventory");
                    continue;
                }
            };
            let ((mut q, power), seen) = probe(&def);
            // A VM whose state cannot be read is left out (with a warning), never the whole inventory.
            let st = match self.resides_here(&def, &seen) {
                Ok(false) => continue,
                Ok(true) => self.load_state(&def.name),
                Err(e) => Err(e),
            };
            let st = match st {
                Ok(st) => st,
                Err(e) => {
                    tracing::warn!(vm = %def.name, error = %e, "cannot read the VM's state: left out of the inventory");
                    continue;
                }
            };
            let mut disks = vec![];
            for d in &def.disks {
                let size = self.size_of(&def, d, q.as_mut())?;
                disks.push(DiskInfo { name: DiskId::new(d.name.clone()).map_err(failed)?, size_bytes: size });
            }
            vms.push(VmInfo {
                id: VmId::new(def.uuid.clone().unwrap_or_else(|| def.name.clone())).map_err(failed)?,
                name: def.name.clone(),
                power,
                os: if def.os == "windows" { GuestOs::Windows } else { GuestOs::Linux },
                integration_services: def.guest_agent.is_some(),
                disks,
                change_generation: Some(st.generation),
                owner: None,
            });
        }
        Ok(Inventory { vms, partition: vec![] })
    }

    fn freeze(&self, vm: &str) -> Result<Quiesced, BackendError> {
        let def = self.def(vm)?;
        let mut st = self.load_state(vm)?;
        if st.frozen.is_some() || st.snapshot.is_some() {
            return Err(failed(format!("{vm} is already frozen or holds a snapshot")));
        }
        let Some(mut q) = self.qmp(&def)? else {
            // Off: the images are still; nothing to quiesce.
            st.frozen = Some(FrozenState { guest: false, paused: false, consistency: Consistency::Crash });
            self.save_state(vm, &st)?;
            return Ok(Quiesced { consistency: Consistency::Crash, note: Some("the VM is off".into()) });
        };
        let status = q.status().map_err(failed)?;
        if status != "running" {
            st.frozen = Some(FrozenState { guest: false, paused: false, consistency: Consistency::Crash });
            self.save_state(vm, &st)?;
            return Ok(Quiesced { consistency: Consistency::Crash, note: Some(format!("the VM is {status}")) });
        }
        let mut why_crash = None;
        // A failing hook falls back to what the guest can still give (`on_hook_failure`).
        let mut hook_failed = None;
        if let Some(hook) = &def.pre_snapshot {
            if let Some(why) = self.run_hook(&def, "pre_snapshot", hook) {
                match def.on_hook_failure() {
                    HookFailure::Fail => return Err(failed(format!("{why} (on_hook_failure = \"fail\")"))),
                    HookFailure::Pause => why_crash = Some(why),
                    HookFailure::Freeze => hook_failed = Some(why),
                }
            }
        }
        if why_crash.is_none() {
            match &def.guest_agent {
                Some(ga) => {
                    // Without the hook's work the applications were not quiesced: file systems only.
                    let consistency = if hook_failed.is_some() {
                        Consistency::Filesystem
                    } else if def.os == "windows" || def.app_hooks {
                        Consistency::App
                    } else {
                        Consistency::Filesystem
                    };
                    // Recorded first: a freeze that may have reached the guest is always thawed.
                    st.frozen = Some(FrozenState { guest: true, paused: false, consistency });
                    self.save_state(vm, &st)?;
                    let bound = def.freeze_timeout();
                    match Qga::connect(ga, bound) {
                        // The agent did not even answer its sync: no freeze was sent.
                        Err(e) => {
                            st.frozen = None;
                            why_crash = Some(format!("the guest agent did not answer within {bound:?} ({e})"));
                        }
                        Ok(mut g) => match g.execute("guest-fsfreeze-freeze", json!({})) {
                            Ok(_) => {
                                return Ok(match hook_failed {
                                    None => Quiesced::clean(consistency),
                                    Some(why) => Quiesced {
                                        consistency,
                                        note: Some(format!("{why}: the guest agent froze the file systems instead")),
                                    },
                                })
                            }
                            Err(e) => {
                                why_crash = Some(format!("the guest did not freeze within {bound:?} ({e})"));
                                // It may freeze late: thaw now, in case; once that answers,
                                // nothing of the guest is left frozen.
                                drop(g);
                                let thawed = Qga::connect(ga, bound)
                                    .and_then(|mut g| g.execute("guest-fsfreeze-thaw", json!({})));
                                if thawed.is_ok() {
                                    st.frozen = None;
                                }
                            }
                        },
                    }
                }
                None => why_crash = Some("no guest agent is configured".into()),
            }
        }
        if let Some(hook) = hook_failed {
            why_crash = Some(match why_crash {
                Some(w) => format!("{hook}, and {w}"),
                None => hook,
            });
        }
        let why = format!("{}: the VM was paused instead", why_crash.as_deref().unwrap_or("no freeze"));
        tracing::warn!(vm, reason = %why, "crash-consistent snapshot");
        st.frozen = Some(FrozenState {
            guest: st.frozen.as_ref().is_some_and(|f| f.guest),
            paused: true,
            consistency: Consistency::Crash,
        });
        self.save_state(vm, &st)?;
        q.execute("stop", json!({})).map_err(failed)?;
        Ok(Quiesced { consistency: Consistency::Crash, note: Some(why) })
    }

    fn take(&self, vm: &str, holder: &str) -> Result<ChangeToken, BackendError> {
        let def = self.def(vm)?;
        let mut st = self.load_state(vm)?;
        if st.snapshot.is_some() {
            return Err(failed(format!("{vm} already holds a snapshot")));
        }
        if st.restoring.is_some() {
            return Err(BackendError::Refused(format!("{vm} is being restored")));
        }
        let mut q = self.qmp(&def)?;
        if let Some(q) = q.as_mut() {
            self.check_fleece_space(q, &def)?;
        }
        let lost = match q.as_mut() {
            Some(q) => self.ensure_tracking_online(q, &def)?,
            None => self.ensure_tracking_offline(&def)?,
        };
        // A disk whose image is another file than at the last snapshot moved storage: whatever
        // bitmap it carries, its tracking starts a new generation (a consistency check follows).
        let images: std::collections::BTreeMap<String, PathBuf> =
            def.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
        let moved = !st.images.is_empty() && st.images != images;
        if moved {
            tracing::warn!(vm, "a disk's image moved (storage migration): tracking starts over");
        }
        if lost || moved {
            st.generation += 1;
        }
        st.images = images;
        st.snapshot = Some(SnapState { holder: holder.to_owned(), running: q.is_some(), paused: false });
        self.save_state(vm, &st)?;
        let token = ChangeToken { generation: st.generation, sequence: st.sequence };
        let built = match q.as_mut() {
            Some(q) => {
                // The snapshot point: the VM stops for the bitmap transaction and the graph
                // swap only (a few milliseconds), whatever the guest agent did.
                let stop_here = q.status().map_err(failed)? == "running";
                if stop_here {
                    st.snapshot = Some(SnapState { holder: holder.to_owned(), running: true, paused: true });
                    self.save_state(vm, &st)?;
                    q.execute("stop", json!({})).map_err(failed)?;
                }
                let built = self.fleece(q, &def);
                if stop_here {
                    q.execute("cont", json!({})).map_err(failed)?;
                    st.snapshot = Some(SnapState { holder: holder.to_owned(), running: true, paused: false });
                    self.save_state(vm, &st)?;
                }
                built.and_then(|()| self.export_running(q, &def))
            }
            None => self.snapshot_offline(&def).and_then(|()| self.serve_offline(&def, false)),
        };
        match built {
            Ok(open) => {
                if let Ok(mut o) = self.open.lock() {
                    if let Some(old) = o.insert(vm.to_owned(), open) {
                        old.close();
                    }
                }
                Ok(token)
            }
            Err(e) => {
                tracing::warn!(vm, error = %e, "snapshot failed: undoing");
                if let Err(u) = self.release(vm).and_then(|()| self.abandon(vm)) {
                    tracing::error!(vm, error = %u, "could not undo a failed snapshot; the next start-up retries");
                }
                Err(e)
            }
        }
    }

    fn thaw(&self, vm: &str) -> Result<(), BackendError> {
        let def = self.def(vm)?;
        let mut st = self.load_state(vm)?;
        let Some(f) = st.frozen.clone() else { return Ok(()) };
        if let Some(mut q) = self.qmp(&def)? {
            // Resume first: a paused guest's agent cannot answer a thaw.
            if f.paused && q.status().map_err(failed)? == "paused" {
                q.execute("cont", json!({})).map_err(failed)?;
            }
            if f.guest {
                if let Some(ga) = &def.guest_agent {
                    let thawed = Qga::connect(ga, def.freeze_timeout())
                        .and_then(|mut g| g.execute("guest-fsfreeze-thaw", json!({})));
                    match thawed {
                        Ok(_) => {}
                        // The freeze never answered and the VM was paused instead: a guest
                        // agent that is still silent has nothing frozen to thaw.
                        Err(e) if f.paused => {
                            tracing::warn!(vm, error = %e, "the guest agent did not answer the thaw either")
                        }
                        Err(e) => return Err(failed(format!("{vm}: the guest did not thaw: {e}"))),
                    }
                }
            }
        }
        if let Some(hook) = &def.post_snapshot {
            if let Some(why) = self.run_hook(&def, "post_snapshot", hook) {
                tracing::warn!(vm, reason = %why, "post-snapshot hook");
            }
        }
        st.frozen = None;
        self.save_state(vm, &st)
    }

    fn changed_blocks(
        &self,
        vm: &str,
        disk: &str,
        token: Option<ChangeToken>,
        block_size: u64,
    ) -> Result<Vec<u64>, BackendError> {
        let def = self.def(vm)?;
        let st = self.load_state(vm)?;
        Self::check_token(&st, vm, token)?;
        let d = def.disk(disk).ok_or_else(|| failed(format!("{vm} has no disk {disk}")))?;
        if d.format != "qcow2" && !st.snapshot.as_ref().is_some_and(|s| s.running) {
            return Err(BackendError::TrackingLost(format!(
                "{vm}: raw disk {disk} is not tracked while the VM is off"
            )));
        }
        self.with_nbd(vm, disk, |n| {
            let size = n.size();
            let extents =
                n.block_status(&dirty_context(), 0, size).map_err(|e| self.explain_read_failure(vm, e.to_string()))?;
            Ok(nbd::blocks_of(&extents, block_size, |f| f & nbd::STATE_DIRTY != 0))
        })
    }

    fn allocated_blocks(&self, vm: &str, disk: &str, block_size: u64) -> Result<Vec<u64>, BackendError> {
        self.with_nbd(vm, disk, |n| {
            let size = n.size();
            let extents =
                n.block_status(ALLOCATION, 0, size).map_err(|e| self.explain_read_failure(vm, e.to_string()))?;
            Ok(nbd::blocks_of(&extents, block_size, |f| f & nbd::STATE_ZERO == 0))
        })
    }

    fn disk_size(&self, vm: &str, disk: &str) -> Result<u64, BackendError> {
        if let Ok(size) = self.with_nbd(vm, disk, |n| Ok(n.size())) {
            return Ok(size);
        }
        let def = self.def(vm)?;
        let d = def.disk(disk).ok_or_else(|| failed(format!("{vm} has no disk {disk}")))?;
        let mut q = self.qmp(&def)?;
        self.size_of(&def, d, q.as_mut())
    }

    fn read_blocks(
        &self,
        vm: &str,
        disk: &str,
        indices: Vec<u64>,
        block_size: usize,
        hasher: &ChunkHasher,
        sink: &mut dyn FnMut(ReadBlock<'_>) -> Result<(), String>,
    ) -> Result<ReadStats, BackendError> {
        self.with_nbd(vm, disk, |n| {
            let size = n.size();
            let what = format!("NBD export {disk} of {vm}");
            crate::reader::read_blocks_from(&what, size, block_size, indices, hasher, sink, |buf, offset| {
                n.read_at(buf, offset).map_err(std::io::Error::other)
            })
            .map_err(|e| match e {
                crate::reader::ReadError::Io { .. } => self.explain_read_failure(vm, e.to_string()),
                e => failed(e),
            })
        })
    }

    fn release(&self, vm: &str) -> Result<(), BackendError> {
        self.close_open(vm);
        let def = self.def(vm)?;
        let mut st = self.load_state(vm)?;
        if let Some(mut q) = self.qmp(&def)? {
            self.unfleece(&mut q, &def)?;
            if st.snapshot.as_ref().is_some_and(|s| s.paused) && q.status().map_err(failed)? == "paused" {
                q.execute("cont", json!({})).map_err(failed)?;
            }
        } else {
            for d in &def.disks {
                let _ = std::fs::remove_file(self.fleece_path(&def, d));
            }
        }
        if st.snapshot.take().is_some() {
            self.save_state(vm, &st)?;
        }
        Ok(())
    }

    fn confirm(&self, vm: &str, next: ChangeToken) -> Result<ChangeToken, BackendError> {
        let def = self.def(vm)?;
        let mut st = self.load_state(vm)?;
        match self.qmp(&def)? {
            Some(mut q) => {
                for d in &def.disks {
                    remove_bitmap_online(&mut q, &d.node, SNAP_BITMAP)?;
                }
            }
            None => {
                for d in def.disks.iter().filter(|d| d.format == "qcow2") {
                    if offline_bitmaps(&d.path)?.iter().any(|(n, _)| n == SNAP_BITMAP) {
                        qemu_img(&["bitmap", "--remove", "-f", "qcow2"], &d.path, SNAP_BITMAP)?;
                    }
                }
            }
        }
        if next.generation == st.generation {
            st.sequence = st.sequence.max(next.sequence);
        }
        self.save_state(vm, &st)?;
        Ok(ChangeToken { generation: st.generation, sequence: st.sequence })
    }

    fn abandon(&self, vm: &str) -> Result<(), BackendError> {
        let def = self.def(vm)?;
        match self.qmp(&def)? {
            Some(mut q) => {
                let nodes = q.execute("query-named-block-nodes", json!({ "flat": true })).map_err(failed)?;
                for d in &def.disks {
                    let names: Vec<String> = find_node(&nodes, &d.node)
                        .and_then(|n| n.get("dirty-bitmaps").and_then(Value::as_array))
                        .map(|b| {
                            b.iter().filter_map(|b| b.get("name").and_then(Value::as_str).map(str::to_owned)).collect()
                        })
                        .unwrap_or_default();
                    if !names.iter().any(|n| n == SNAP_BITMAP) {
                        continue;
                    }
                    let mut actions = vec![];
                    if names.iter().any(|n| n == LIVE_BITMAP) {
                        actions.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
                            "node": d.node, "target": LIVE_BITMAP, "bitmaps": [SNAP_BITMAP] } }));
                    }
                    actions.push(
                        json!({ "type": "block-dirty-bitmap-remove", "data": { "node": d.node, "name": SNAP_BITMAP } }),
                    );
                    q.execute("transaction", json!({ "actions": actions })).map_err(failed)?;
                }
            }
            None => {
                for d in def.disks.iter().filter(|d| d.format == "qcow2") {
                    let names = offline_bitmaps(&d.path)?;
                    if !names.iter().any(|(n, _)| n == SNAP_BITMAP) {
                        continue;
                    }
                    if names.iter().any(|(n, _)| n == LIVE_BITMAP) {
                        qemu_img(&["bitmap", "--merge", SNAP_BITMAP, "-f", "qcow2"], &d.path, LIVE_BITMAP)?;
                    }
                    qemu_img(&["bitmap", "--remove", "-f", "qcow2"], &d.path, SNAP_BITMAP)?;
                }
            }
        }
        Ok(())
    }

    fn vm_config(&self, vm: &str) -> Result<Vec<u8>, BackendError> {
        for dir in [&self.vm_dir, &self.restore_dir] {
            let p = dir.join(format!("{vm}.toml"));
            if p.is_file() {
                let text = std::fs::read(&p).map_err(|e| failed(format!("{}: {e}", p.display())))?;
                return Ok(if text.len() <= MAX_VM_CONFIG { text } else { vec![] });
            }
        }
        Ok(vec![])
    }

    fn restore_begin(
        &self,
        vm: &str,
        _host: &str,
        what: &str,
        create: Option<(&NewVm, &[DiskInfo])>,
        config: &[u8],
    ) -> Result<(), BackendError> {
        let def = match create {
            Some((new, disks)) => self.create_restored(vm, new, disks, VmDef::from_kept(config), false)?,
            None => self.def(vm)?,
        };
        if self.qmp(&def)?.is_some() {
            return Err(BackendError::Refused(format!("{vm} is running: shut QEMU down before restoring onto it")));
        }
        // The original VM gets the recovery point's settings back (its definition file keeps
        // everything of this host's).
        if let (None, Some(kept)) = (create, VmDef::from_kept(config)) {
            let path = self.def_path(vm)?;
            if VmDef::restore_settings(&path, &kept).map_err(failed)? {
                tracing::info!(vm, path = %path.display(), "the definition's settings are the recovery point's again");
            }
        }
        let mut st = self.load_state(vm)?;
        if st.snapshot.is_some() {
            return Err(BackendError::Refused(format!("{vm} holds a snapshot")));
        }
        st.restoring = Some(what.to_owned());
        self.save_state(vm, &st)?;
        let open = self.serve_offline(&def, true)?;
        if let Ok(mut o) = self.open.lock() {
            if let Some(old) = o.insert(vm.to_owned(), open) {
                old.close();
            }
        }
        Ok(())
    }

    fn read_current(
        &self,
        vm: &str,
        disk: &str,
        indices: Vec<u64>,
        block_size: usize,
        hasher: &ChunkHasher,
        sink: &mut dyn FnMut(ReadBlock<'_>) -> Result<(), String>,
    ) -> Result<ReadStats, BackendError> {
        if self.load_state(vm)?.restoring.is_none() {
            return Err(failed(format!("{vm} is not being restored")));
        }
        self.read_blocks(vm, disk, indices, block_size, hasher, sink)
    }

    fn restore_writer(&self, vm: &str, disk: &str) -> Result<Box<dyn DiskWriter + '_>, BackendError> {
        Ok(Box::new(NbdRestoreWriter { backend: self, vm: vm.to_owned(), disk: disk.to_owned() }))
    }

    fn instant_begin(
        &self,
        vm: &str,
        new: &NewVm,
        disks: &[DiskInfo],
        config: &[u8],
        export: &crate::backend::InstantExport,
    ) -> Result<Vec<PathBuf>, BackendError> {
        let def = self.create_restored(vm, new, disks, VmDef::from_kept(config), true)?;
        let state = crate::backend::InstantState {
            vm: vm.to_owned(),
            job: export.job,
            block_size: export.block_size,
            coordinator: Some(export.coordinator.clone()),
            disks: def
                .disks
                .iter()
                .zip(disks)
                .map(|(d, info)| crate::backend::InstantDisk {
                    name: d.name.clone(),
                    size_bytes: info.size_bytes,
                    socket: instant_socket(&self.restore_dir, vm, &d.name),
                })
                .collect(),
        };
        let path = instant_state_path(&self.restore_dir, vm);
        let text = serde_json::to_vec_pretty(&state).map_err(failed)?;
        write_durably(&path, &text).map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(state.disks.into_iter().map(|d| d.socket).collect())
    }

    fn instant_abandon(&self, vm: &str) -> Result<(), BackendError> {
        let state = instant_state_path(&self.restore_dir, vm);
        // Only what this agent made for an instant recovery: its state file names it.
        if !state.is_file() {
            return Ok(());
        }
        let def_path = self.restore_dir.join(format!("{vm}.toml"));
        if let Ok(def) = VmDef::load(&def_path) {
            use std::os::unix::fs::FileTypeExt as _;
            for d in &def.disks {
                let socket = instant_socket(&self.restore_dir, vm, &d.name);
                if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(&socket);
                }
                let _ = std::fs::remove_file(&d.path);
            }
        }
        let _ = std::fs::remove_file(&def_path);
        std::fs::remove_file(&state).map_err(|e| failed(format!("cannot remove {}: {e}", state.display())))
    }

    fn instants(&self) -> Result<Vec<crate::backend::InstantState>, BackendError> {
        let mut out = vec![];
        let entries = match std::fs::read_dir(&self.restore_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(failed(format!("{}: {e}", self.restore_dir.display()))),
        };
        // Few files, each small: a definition directory, read whole.
        for entry in entries.flatten().take(10_000) {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "instant") {
                continue;
            }
            let read = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| (b.len() <= 64 << 10).then_some(b).ok_or_else(|| "over 64 KiB".to_owned()));
            match read
                .and_then(|b| serde_json::from_slice::<crate::backend::InstantState>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) if instant_state_path(&self.restore_dir, &s.vm) == path => out.push(s),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "an instant recovery's state names another VM: ignored")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "an instant recovery's state cannot be read")
                }
            }
        }
        Ok(out)
    }

    fn instant_finish(&self, vm: &str) -> Result<u64, BackendError> {
        let def = self.def(vm)?;
        let backed: Vec<&DiskDef> =
            def.disks.iter().filter(|d| backing_of(&d.path).is_ok_and(|b| b.is_some())).collect();
        let mut copied = 0;
        match self.qmp(&def)? {
            Some(mut q) => {
                // block-stream pulls the backing's data into each overlay and drops the backing
                // under the running guest.
                for d in &backed {
                    // A concluded job of an earlier attempt would keep its id taken.
                    let _ = q.execute("job-dismiss", json!({ "id": finish_job(d) }));
                    let args = json!({ "job-id": finish_job(d), "device": d.node, "auto-dismiss": false });
                    q.execute("block-stream", args).map_err(|e| failed(format!("{vm}: {e}")))?;
                }
                copied = wait_streams(&mut q, vm, &backed)?;
            }
            None => {
                for d in &backed {
                    // Safe mode: whatever the backing holds is written into the overlay first.
                    let out = Command::new("qemu-img")
                        .args(["rebase", "-q", "-f", "qcow2", "-b", ""])
                        .arg(&d.path)
                        .output()
                        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
                    if !out.status.success() {
                        return Err(failed(format!(
                            "qemu-img rebase {}: {}",
                            d.path.display(),
                            String::from_utf8_lossy(&out.stderr).trim()
                        )));
                    }
                    copied += image_info(&d.path, "qcow2")?.get("actual-size").and_then(|v| v.as_u64()).unwrap_or(0);
                }
            }
        }
        // Nothing may still read from an export once it stops.
        for d in &def.disks {
            if let Some(b) = backing_of(&d.path)? {
                return Err(failed(format!("{} still has the backing {b}", d.path.display())));
            }
            let _ = std::fs::remove_file(instant_socket(&self.restore_dir, vm, &d.name));
        }
        let state = instant_state_path(&self.restore_dir, vm);
        if let Err(e) = std::fs::remove_file(&state) {
            tracing::warn!(path = %state.display(), error = %e, "cannot remove a finished instant recovery's state");
        }
        Ok(copied)
    }

    fn restore_finish(&self, vm: &str) -> Result<(), BackendError> {
        let def = self.def(vm)?;
        for d in &def.disks {
            self.with_nbd(vm, &d.name, |n| n.flush().map_err(failed))?;
        }
        self.close_open(vm);
        // The disks no longer follow the replica's history: tracking starts over.
        for d in def.disks.iter().filter(|d| d.format == "qcow2") {
            for (name, _) in offline_bitmaps(&d.path)? {
                if name == LIVE_BITMAP || name == SNAP_BITMAP {
                    qemu_img(&["bitmap", "--remove", "-f", "qcow2"], &d.path, &name)?;
                }
            }
        }
        let mut st = self.load_state(vm)?;
        st.restoring = None;
        st.generation += 1;
        self.save_state(vm, &st)
    }
}

/// How long QEMU waits for an instant recovery's export to come back before it fails the
/// guest's I/O (an agent restart is seconds).
pub const INSTANT_RECONNECT_SECS: u64 = 300;

/// Where an instant recovery's [`crate::backend::InstantState`] is kept.
fn instant_state_path(restore_dir: &Path, vm: &str) -> PathBuf {
    restore_dir.join(format!("{vm}.instant"))
}

/// The QMP job that finishes disk `d` of an instant recovery.
fn finish_job(d: &DiskDef) -> String {
    format!("bulwark-finish-{}", d.node)
}

/// The backing file an image names, if any (read with `-U`: the VM may run).
fn backing_of(path: &Path) -> Result<Option<String>, BackendError> {
    let info = image_info(path, "qcow2")?;
    Ok(info.get("backing-filename").and_then(|v| v.as_str()).map(str::to_owned))
}

/// How long a finishing copy may make no progress before it is given up.
const FINISH_STALL: Duration = Duration::from_secs(600);

/// Waits for the finish jobs of `disks` to conclude; answers the bytes they copied. A job that
/// failed, or one that made no progress for [`FINISH_STALL`], fails the finish (the VM keeps
/// reading from the recovery point: nothing is lost; `recover-finish` can run again).
fn wait_streams(q: &mut Qmp, vm: &str, disks: &[&DiskDef]) -> Result<u64, BackendError> {
    let ids: Vec<String> = disks.iter().map(|d| finish_job(d)).collect();
    let mut last = (0u64, std::time::Instant::now());
    loop {
        let jobs = q.execute("query-jobs", json!({})).map_err(|e| failed(format!("{vm}: {e}")))?;
        let mine: Vec<&Value> = jobs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|j| j.get("id").and_then(Value::as_str).is_some_and(|i| ids.iter().any(|x| x == i)))
                    .collect()
            })
            .unwrap_or_default();
        let done = mine.iter().filter(|j| j.get("status").and_then(Value::as_str) == Some("concluded")).count();
        let progress: u64 = mine.iter().filter_map(|j| j.get("current-progress").and_then(Value::as_u64)).sum();
        if done == ids.len() || mine.len() < ids.len() {
            let mut errors = vec![];
            for j in &mine {
                if let Some(e) = j.get("error").and_then(Value::as_str) {
                    errors.push(e.to_owned());
                }
                if let Some(id) = j.get("id").and_then(Value::as_str) {
                    let _ = q.execute("job-dismiss", json!({ "id": id }));
                }
            }
            if mine.len() < ids.len() {
                errors.push("a finish job vanished".into());
            }
            return match errors.is_empty() {
                true => Ok(progress),
                false => Err(failed(format!("finishing {vm}: {}", errors.join("; ")))),
            };
        }
        if progress != last.0 {
            last = (progress, std::time::Instant::now());
        } else if last.1.elapsed() > FINISH_STALL {
            for id in &ids {
                let _ = q.execute("job-cancel", json!({ "id": id }));
            }
            return Err(failed(format!("finishing {vm} made no progress for {FINISH_STALL:?}: cancelled")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The socket an instant recovery serves disk `disk` of VM `vm` on (QEMU reads the overlay's
/// backing from it).
pub fn instant_socket(restore_dir: &Path, vm: &str, disk: &str) -> PathBuf {
    restore_dir.join(format!("{vm}-{disk}.nbd"))
}

impl QemuBackend {
    /// Moves the live bitmap's bits into the snapshot bitmap of a VM that is off.
    fn snapshot_offline(&self, def: &VmDef) -> Result<(), BackendError> {
        for d in def.disks.iter().filter(|d| d.format == "qcow2") {
            let names = offline_bitmaps(&d.path)?;
            if !names.iter().any(|(n, _)| n == SNAP_BITMAP) {
                qemu_img(&["bitmap", "--add", "--disable", "-f", "qcow2"], &d.path, SNAP_BITMAP)?;
            }
            qemu_img(&["bitmap", "--merge", LIVE_BITMAP, "-f", "qcow2"], &d.path, SNAP_BITMAP)?;
            qemu_img(&["bitmap", "--clear", "-f", "qcow2"], &d.path, LIVE_BITMAP)?;
        }
        Ok(())
    }

    /// A restore to a new VM: empty images of the same sizes (qcow2) and a `NAME.toml` in the
    /// restore directory. Never overwrites an existing VM or image.
    /// A new VM for an alternate-location recovery: its images under `restore_dir` and its
    /// definition beside them. From the recovery point's definition `kept` (when there is one)
    /// it takes the guest's settings — OS, app hooks, the opaque `config`, each disk's node and
    /// device names, the freeze bound — and never what belongs to the other host: its paths,
    /// sockets (a guest agent socket is named after the new VM here), hooks or fleecing place.
    fn create_restored(
        &self,
        vm: &str,
        new: &NewVm,
        disks: &[DiskInfo],
        kept: Option<VmDef>,
        instant: bool,
    ) -> Result<VmDef, BackendError> {
        if self.vm_dir.join(format!("{vm}.toml")).exists() || self.restore_dir.join(format!("{vm}.toml")).exists() {
            return Err(BackendError::Refused(format!("a QEMU VM named {vm} already exists on this host")));
        }
        std::fs::create_dir_all(&self.restore_dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", self.restore_dir.display())))?;
        let mut defs = vec![];
        for (i, d) in disks.iter().enumerate() {
            let path = self.restore_dir.join(format!("{vm}-{}.qcow2", d.name.as_str()));
            if path.exists() {
                return Err(BackendError::Refused(format!("{} already exists", path.display())));
            }
            let mut create = Command::new("qemu-img");
            create.args(["create", "-q", "-f", "qcow2"]);
            if instant {
                // Backed by the export the agent serves next (not opened now: -u). QEMU waits
                // for the export to come back (an agent restart) rather than fail the guest's I/O.
                let socket = instant_socket(&self.restore_dir, vm, d.name.as_str());
                let backing = json!({
                    "driver": "raw",
                    "file": {
                        "driver": "nbd",
                        "server": { "type": "unix", "path": socket },
                        "export": d.name.as_str(),
                        "reconnect-delay": INSTANT_RECONNECT_SECS,
                        "open-timeout": INSTANT_RECONNECT_SECS,
                    },
                });
                create.args(["-u", "-F", "raw", "-b"]).arg(format!("json:{backing}"));
            }
            let out = create
                .arg(&path)
                .arg(d.size_bytes.to_string())
                .output()
                .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
            if !out.status.success() {
                return Err(failed(format!(
                    "qemu-img create {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let was = kept.as_ref().and_then(|k| k.disk(d.name.as_str()));
            defs.push(DiskDef {
                name: d.name.as_str().to_owned(),
                node: was.map_or_else(|| format!("disk{i}"), |w| w.node.clone()),
                device: was.map_or_else(|| format!("virtio-disk{i}"), |w| w.device.clone()),
                path,
                format: "qcow2".into(),
            });
        }
        let mut def = VmDef {
            name: vm.to_owned(),
            // A restored copy is a VM of its own.
            uuid: Some(uuid::Uuid::new_v4().to_string()),
            qmp: self.restore_dir.join(format!("{vm}.qmp")),
            guest_agent: None,
            os: match new.os {
                GuestOs::Linux => "linux".into(),
                GuestOs::Windows => "windows".into(),
            },
            app_hooks: false,
            fleece_dir: None,
            fleece_reserve_percent: None,
            config: None,
            pre_snapshot: None,
            post_snapshot: None,
            hook_timeout_secs: None,
            on_hook_failure: None,
            freeze_timeout_secs: None,
            boot_check: false,
            disks: defs,
        };
        if let Some(k) = kept {
            def.os = k.os;
            def.app_hooks = k.app_hooks;
            def.config = k.config;
            def.freeze_timeout_secs = k.freeze_timeout_secs;
            def.fleece_reserve_percent = k.fleece_reserve_percent;
            def.boot_check = k.boot_check;
            def.guest_agent = k.guest_agent.map(|_| self.restore_dir.join(format!("{vm}.qga")));
        }
        // Whatever it was made from, a definition `qemu check` would refuse is never written.
        def.validate().map_err(|e| failed(format!("the restored definition of {vm}: {e}")))?;
        let text = toml::to_string(&def).map_err(failed)?;
        let path = self.restore_dir.join(format!("{vm}.toml"));
        write_durably(&path, text.as_bytes()).map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(def)
    }
}
