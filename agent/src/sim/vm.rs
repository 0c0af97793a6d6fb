//! A sim VM on its storage root: `R/vms/NAME/vm.toml` and, per disk, the raw sparse image
//! `DISK.img`, the live dirty bitmap `DISK.dirty`, and while a transfer is pending the frozen
//! bitmap `DISK.frozen`; while a snapshot is held, guest writes go to the differencing overlay
//! `DISK.overlay` (with `DISK.overlay.map`, the tracking blocks it holds).
//!
//! Every operation takes the VM's lock file, so the agent and `bulwark-agent sim` commands can
//! work on one VM at the same time from different processes and cluster nodes.

use crate::sim::bitmap::{DirtyBitmap, GRANULARITY};
use crate::sim::truth;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a sim operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("no VM named {0:?} on this storage root")]
    NoSuchVm(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("VM {vm} has no disk {disk:?}")]
    NoSuchDisk { vm: String, disk: String },
    #[error("{0}")]
    Invalid(String),
    #[error("snapshot refused: {0}")]
    Refused(String),
    /// Another snapshot of the VM is in progress: try again once it is released.
    #[error("busy: {0}")]
    Busy(String),
    #[error("change tracking was lost for {vm}/{disk}: {reason}")]
    TrackingLost { vm: String, disk: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io { path: path.to_owned(), source }
}

/// Power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Running,
    Off,
    Paused,
}

/// A replica VM's health (Hyper-V Replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaHealth {
    Healthy,
    Resyncing,
    Critical,
}

/// Consistency a snapshot achieves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapConsistency {
    App,
    Filesystem,
    Crash,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub name: String,
    pub size: u64,
}

/// A held snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSnapshot {
    pub id: u64,
    pub consistency: SnapConsistency,
    /// Unix seconds.
    pub taken_at: u64,
    /// The host (agent) holding it.
    pub holder: String,
    /// The VM was paused for the snapshot and must be resumed.
    pub paused_for_snapshot: bool,
}

/// A guest frozen (or paused) for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    pub consistency: SnapConsistency,
    /// The VM was running and is paused (crash-consistent snapshot).
    pub paused: bool,
    /// Unix milliseconds.
    pub since_ms: u64,
}

/// `vm.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    /// The VM's stable identity (a UUID): what the coordinator knows it by, whatever its name
    /// or host. Created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub host: String,
    /// `linux` or `windows`.
    pub os: String,
    pub power: Power,
    pub integration_services: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaHealth>,
    /// Tracking generation: bumped when tracking is lost (host crash, storage migration).
    pub generation: u64,
    /// Sequence of the last change token the coordinator confirmed.
    pub sequence: u64,
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<HeldSnapshot>,
    /// Next snapshot id.
    #[serde(default)]
    pub next_snapshot: u64,
    /// Set while the guest is frozen or paused for a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<Frozen>,
    /// Set while a recovery writes the disks (what it was): a VM left with this set was never
    /// fully restored and must be restored again before it is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<String>,
    /// Slow storage, for tests of long transfers: each block a job reads from a snapshot takes
    /// this many milliseconds more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_delay_ms: Option<u64>,
}

/// The settings a recovery takes from a recovery point's `vm.toml` (made by a host that may
/// not be this one: nothing of its identity, host, tracking or state is taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub os: String,
    pub integration_services: bool,
}

/// [`Settings`] from a kept definition; `None` when there is none or it does not parse.
pub fn settings_from(config: &[u8]) -> Option<Settings> {
    if config.is_empty() || config.len() > bulwark_protocol::messages::MAX_VM_CONFIG {
        return None;
    }
    let text = std::str::from_utf8(config).ok()?;
    let c: VmConfig = toml::from_str(text).ok()?;
    matches!(c.os.as_str(), "linux" | "windows")
        .then_some(Settings { os: c.os, integration_services: c.integration_services })
}

/// Change tokens are the protocol's: generation (bumped when tracking is lost) and sequence
/// (advanced when the coordinator confirms a commit).
pub use bulwark_protocol::messages::ChangeToken;

/// A VM's directory and lock.
pub struct Vm {
    dir: PathBuf,
    _lock: File,
    pub config: VmConfig,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("name", &self.config.name).finish()
    }
}

/// Whether this process plays the chaos harness's deliberately broken build
/// (`BULWARK_SIM_BREAK=write-through-snapshot`): guest writes made while a snapshot is held go
/// straight into the image the snapshot reads, so a backup can see data from after its
/// snapshot point. Only the sim has it; it exists so a test can show that the harness catches
/// a recovery point that is not the guest's view at one moment (simulations/tests/chaos.rs).
fn broken_build() -> bool {
    std::env::var("BULWARK_SIM_BREAK").is_ok_and(|v| v == "write-through-snapshot")
}

/// The directory under a sim root whose presence turns ground-truth recording on.
pub const GROUND_TRUTH_DIR: &str = "ground-truth";

/// One line of `ground-truth/VM.jsonl`: the guest's view of each disk at a snapshot point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub vm: String,
    pub snapshot: u64,
    /// Disk name → BLAKE3 (hex) of its whole contents.
    pub disks: std::collections::BTreeMap<String, String>,
}

/// Every ground-truth record of `vm` under `root`, in snapshot order (empty when none).
pub fn ground_truth(root: &Path, vm: &str) -> Result<Vec<GroundTruth>, SimError> {
    let path = root.join(GROUND_TRUTH_DIR).join(format!("{vm}.jsonl"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(SimError::Io { path, source: e }),
    };
    // A torn last line (a crash mid-append) is not a record.
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// The VM directory of `name` under root `root`.
pub fn vm_dir(root: &Path, name: &str) -> PathBuf {
    root.join("vms").join(name)
}

fn valid_name(kind: &str, name: &str) -> Result<(), SimError> {
    bulwark_protocol::VmId::new(name).map(|_| ()).map_err(|e| SimError::Invalid(format!("{kind}: {e}")))
}

thread_local! {
    /// The last `vm.toml` text parsed per path, with its parse: the same bytes parse the same,
    /// and an operation opens its VM afresh each time (parsing was a tenth of a simulated run).
    static PARSED: std::cell::RefCell<std::collections::HashMap<PathBuf, (String, VmConfig)>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}
/// Paths [`PARSED`] keeps at most (it starts over when full).
const PARSED_KEPT: usize = 256;

fn parse_config(path: &Path, text: String) -> Result<VmConfig, SimError> {
    let known = PARSED.with(|p| p.borrow().get(path).filter(|(t, _)| *t == text).map(|(_, c)| c.clone()));
    if let Some(config) = known {
        return Ok(config);
    }
    let config: VmConfig = toml::from_str(&text).map_err(|e| SimError::Invalid(format!("{}: {e}", path.display())))?;
    PARSED.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= PARSED_KEPT {
            p.clear();
        }
        p.insert(path.to_owned(), (text, config.clone()));
    });
    Ok(config)
}

impl Vm {
    /// Opens (and locks) an existing VM.
    pub fn open(root: &Path, name: &str) -> Result<Vm, SimError> {
        valid_name("VM name", name)?;
        let dir = vm_dir(root, name);
        let config_path = dir.join("vm.toml");
        if !config_path.exists() {
            return Err(SimError::NoSuchVm(name.to_owned()));
        }
        let lock_path = dir.join(".lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config = parse_config(&config_path, text)?;
        Ok(Vm { dir, _lock: lock, config })
    }

    /// Creates a VM with zero-filled sparse disks; returns it locked.
    pub fn create(root: &Path, config: VmConfig) -> Result<Vm, SimError> {
        valid_name("VM name", &config.name)?;
        for d in &config.disks {
            valid_name("disk name", &d.name)?;
            if d.size == 0 {
                return Err(SimError::Invalid(format!("disk {} has size 0", d.name)));
            }
        }
        let dir = vm_dir(root, &config.name);
        if dir.join("vm.toml").exists() {
            return Err(SimError::Exists(config.name));
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join(".lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let vm = Vm { dir, _lock: lock, config };
        for d in &vm.config.disks {
            let img = vm.image(&d.name);
            let f = File::create(&img).map_err(io(&img))?;
            f.set_len(d.size).map_err(io(&img))?;
            f.sync_all().map_err(io(&img))?;
            DirtyBitmap::new(d.size).save(&vm.bitmap(&d.name)).map_err(io(&img))?;
        }
        vm.save()?;
        Ok(vm)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.img"))
    }
    fn bitmap(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.dirty"))
    }
    fn frozen(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.frozen"))
    }
    fn overlay(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.overlay"))
    }
    fn overlay_map(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.overlay.map"))
    }

    /// Writes `vm.toml` atomically.
    pub fn save(&self) -> Result<(), SimError> {
        let path = self.dir.join("vm.toml");
        let text = toml::to_string_pretty(&self.config).map_err(|e| SimError::Invalid(e.to_string()))?;
        bulwark_pki::files::write_atomic(&path, text.as_bytes(), 0o644).map_err(io(&path))
    }

    fn disk(&self, disk: &str) -> Result<&DiskConfig, SimError> {
        self.config
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| SimError::NoSuchDisk { vm: self.config.name.clone(), disk: disk.to_owned() })
    }

    fn load_bitmap(&self, path: &Path, size: u64) -> Result<DirtyBitmap, SimError> {
        // A missing or damaged live bitmap means we cannot tell what changed: all dirty.
        Ok(DirtyBitmap::load(path)
            .map_err(io(path))?
            .filter(|b| b.size() == size)
            .unwrap_or_else(|| DirtyBitmap::full(size)))
    }

    /// A guest write of `data` at `offset` (tracked; into the overlay while a snapshot is held).
    pub fn guest_write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), SimError> {
        let size = self.disk(disk)?.size;
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= size).ok_or_else(|| {
            SimError::Invalid(format!(
                "a write of {} bytes at {offset} does not fit disk {disk} of {size} bytes",
                data.len()
            ))
        })?;
        // Track first: a crash after this loses no change (at worst a block is re-sent).
        let bitmap_path = self.bitmap(disk);
        let mut live = self.load_bitmap(&bitmap_path, size)?;
        live.mark(offset, data.len() as u64);
        live.save(&bitmap_path).map_err(io(&bitmap_path))?;
        let target = if self.config.snapshot.is_some() && !broken_build() {
            self.copy_up(disk, size, offset, end)?;
            self.overlay(disk)
        } else {
            self.image(disk)
        };
        // The ground truth's digests of the blocks this write touches are hashed again when a
        // digest is next asked for; marked before the write, so a crash cannot leave them stale.
        if let Some(cache) = self.truth_cache(disk, size)? {
            for b in offset / truth::BLOCK..end.div_ceil(truth::BLOCK) {
                cache.set(b, &truth::STALE).map_err(io(&self.dir))?;
            }
            cache.done().map_err(io(&self.dir))?;
        }
        let f = OpenOptions::new().write(true).open(&target).map_err(io(&target))?;
        f.write_all_at(data, offset).map_err(io(&target))?;
        f.sync_data().map_err(io(&target))?;
        Ok(())
    }

    /// The ground-truth directory of this VM's storage root, when chaos recording is on.
    fn truth_dir(&self) -> Option<PathBuf> {
        let dir = self.dir.parent()?.parent()?.join(GROUND_TRUTH_DIR);
        dir.is_dir().then_some(dir)
    }

    /// The current digest cache of `disk`, opened for an update (see [`truth`]), when recording.
    fn truth_cache(&self, disk: &str, size: u64) -> Result<Option<truth::Open>, SimError> {
        if self.truth_dir().is_none() {
            return Ok(None);
        }
        let path = truth::path(&self.dir, disk);
        truth::Cache::new(path.clone(), size).begin().map_err(io(&path))
    }

    /// Drops every disk's digest cache: the images are about to change outside guest writes.
    fn drop_truth_caches(&self) -> Result<(), SimError> {
        for d in &self.config.disks {
            let path = truth::path(&self.dir, &d.name);
            truth::Cache::new(path.clone(), d.size).remove().map_err(io(&path))?;
        }
        Ok(())
    }

    /// Before the first overlay write to a tracking block, copies the base's block into the
    /// overlay, so partial writes keep the rest of the block.
    fn copy_up(&self, disk: &str, size: u64, offset: u64, end: u64) -> Result<(), SimError> {
        let map_path = self.overlay_map(disk);
        let mut map = DirtyBitmap::load(&map_path).map_err(io(&map_path))?.unwrap_or_else(|| DirtyBitmap::new(size));
        let base = File::open(self.image(disk)).map_err(io(&self.image(disk)))?;
        let ov_path = self.overlay(disk);
        let ov = OpenOptions::new().write(true).create(true).truncate(false).open(&ov_path).map_err(io(&ov_path))?;
        ov.set_len(size).map_err(io(&ov_path))?;
        let mut changed = false;
        let mut buf = vec![0u8; GRANULARITY as usize];
        for t in offset / GRANULARITY..end.div_ceil(GRANULARITY) {
            if map.is_dirty(t) {
                continue;
            }
            let start = t * GRANULARITY;
            let n = GRANULARITY.min(size - start) as usize;
            base.read_exact_at(&mut buf[..n], start).map_err(io(&self.image(disk)))?;
            ov.write_all_at(&buf[..n], start).map_err(io(&ov_path))?;
            map.mark(start, n as u64);
            changed = true;
        }
        if changed {
            ov.sync_data().map_err(io(&ov_path))?;
            map.save(&map_path).map_err(io(&map_path))?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` as the guest sees them now.
    pub fn guest_read(&self, disk: &str, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        self.guest_view(disk)?.read(offset, buf)
    }

    /// `disk` as the guest sees it now, its files opened once for many reads.
    fn guest_view(&self, disk: &str) -> Result<GuestView, SimError> {
        let size = self.disk(disk)?.size;
        let img_path = self.image(disk);
        let img = File::open(&img_path).map_err(io(&img_path))?;
        let mut overlay = None;
        if self.config.snapshot.is_some() {
            let map_path = self.overlay_map(disk);
            if let Some(map) = DirtyBitmap::load(&map_path).map_err(io(&map_path))? {
                let ov_path = self.overlay(disk);
                let ov = File::open(&ov_path).map_err(io(&ov_path))?;
                overlay = Some((ov, map, ov_path));
            }
        }
        Ok(GuestView { disk: disk.to_owned(), size, img, img_path, overlay })
    }

    /// Reads from the held snapshot (the base image, untouched while it is held).
    pub fn snapshot_read(&self, disk: &str, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        if self.config.snapshot.is_none() {
            return Err(SimError::Invalid(format!("{} holds no snapshot", self.config.name)));
        }
        let size = self.disk(disk)?.size;
        if offset + buf.len() as u64 > size {
            return Err(SimError::Invalid(format!("read past the end of disk {disk}")));
        }
        let img = self.image(disk);
        File::open(&img).map_err(io(&img))?.read_exact_at(buf, offset).map_err(io(&img))
    }

    /// The file a held snapshot of `disk` reads from, and the disk's size. While the snapshot
    /// is held the base image does not change (guest writes go to the overlay), so a reader
    /// may read it without holding the VM's lock.
    pub fn snapshot_source(&self, disk: &str) -> Result<(PathBuf, u64), SimError> {
        if self.config.snapshot.is_none() {
            return Err(SimError::Invalid(format!("{} holds no snapshot", self.config.name)));
        }
        Ok((self.image(disk), self.disk(disk)?.size))
    }

    /// The consistency a snapshot of this VM would achieve, or why none is allowed.
    pub fn consistency(&self) -> Result<SnapConsistency, SimError> {
        match self.config.replica {
            Some(ReplicaHealth::Resyncing) => {
                return Err(SimError::Refused(format!("replica VM {} is resynchronizing", self.config.name)))
            }
            Some(ReplicaHealth::Critical) => {
                return Err(SimError::Refused(format!("replica VM {} is in critical health", self.config.name)))
            }
            Some(ReplicaHealth::Healthy) => return Ok(SnapConsistency::Crash),
            None => {}
        }
        Ok(match (self.config.power, self.config.integration_services, self.config.os.as_str()) {
            (Power::Running, true, "windows") => SnapConsistency::App,
            (Power::Running, true, _) => SnapConsistency::Filesystem,
            _ => SnapConsistency::Crash,
        })
    }

    /// Freezes the guest for a snapshot: file systems (and apps, with integration services on
    /// Windows) quiesce; a VM that cannot (no integration services) is paused. Returns the
    /// consistency the snapshot will have.
    pub fn freeze(&mut self, now_ms: u64) -> Result<SnapConsistency, SimError> {
        if self.config.frozen.is_some() {
            return Err(SimError::Busy(format!("{} is already frozen for another snapshot", self.config.name)));
        }
        let consistency = self.consistency()?;
        let paused = consistency == SnapConsistency::Crash && self.config.power == Power::Running;
        if paused {
            self.config.power = Power::Paused;
        }
        self.config.frozen = Some(Frozen { consistency, paused, since_ms: now_ms });
        self.save()?;
        Ok(consistency)
    }

    /// Thaws a frozen guest (resumes a paused one). Doing it twice is harmless.
    pub fn thaw(&mut self) -> Result<(), SimError> {
        let Some(f) = self.config.frozen.take() else { return Ok(()) };
        if f.paused && self.config.power == Power::Paused {
            self.config.power = Power::Running;
        }
        self.save()
    }

    /// Takes a snapshot for `holder`: the snapshot point freezes the live bitmaps (merged with
    /// any still pending) and starts the overlay. Returns the snapshot and the token the
    /// frozen bitmaps are "changes since".
    pub fn take_snapshot(&mut self, holder: &str, now: u64) -> Result<(HeldSnapshot, ChangeToken), SimError> {
        if let Some(s) = &self.config.snapshot {
            return Err(SimError::Busy(format!(
                "{} already holds snapshot {} for {}",
                self.config.name, s.id, s.holder
            )));
        }
        let (consistency, paused) = match &self.config.frozen {
            Some(f) => (f.consistency, f.paused),
            None => {
                let c = self.consistency()?;
                (c, c == SnapConsistency::Crash && self.config.power == Power::Running)
            }
        };
        for d in self.config.disks.clone() {
            let live_path = self.bitmap(&d.name);
            let live = self.load_bitmap(&live_path, d.size)?;
            let frozen_path = self.frozen(&d.name);
            let mut frozen =
                DirtyBitmap::load(&frozen_path).map_err(io(&frozen_path))?.unwrap_or_else(|| DirtyBitmap::new(d.size));
            frozen.merge(&live);
            frozen.save(&frozen_path).map_err(io(&frozen_path))?;
            DirtyBitmap::new(d.size).save(&live_path).map_err(io(&live_path))?;
        }
        self.record_ground_truth(self.config.next_snapshot)?;
        let snap = HeldSnapshot {
            id: self.config.next_snapshot,
            consistency,
            taken_at: now,
            holder: holder.to_owned(),
            paused_for_snapshot: paused,
        };
        self.config.next_snapshot += 1;
        self.config.snapshot = Some(snap.clone());
        self.save()?;
        Ok((snap, ChangeToken { generation: self.config.generation, sequence: self.config.sequence }))
    }

    /// For chaos runs: when the storage root has a `ground-truth/` directory, appends the
    /// BLAKE3 of every disk's guest view at this snapshot point to `ground-truth/VM.jsonl`
    /// (fsynced), so every recovery point can later be checked against what the guest really
    /// had. Called with the VM locked and before the overlay starts, so the image is the view.
    /// The digests come from each disk's [`truth`] cache (rebuilt from the disk when missing).
    fn record_ground_truth(&self, snapshot: u64) -> Result<(), SimError> {
        let Some(dir) = self.truth_dir() else { return Ok(()) };
        let mut disks = std::collections::BTreeMap::new();
        for d in &self.config.disks {
            disks.insert(d.name.clone(), self.guest_digest(&d.name)?.to_hex().to_string());
        }
        let line = GroundTruth { vm: self.config.name.clone(), snapshot, disks };
        let mut text = serde_json::to_string(&line).map_err(|e| SimError::Invalid(e.to_string()))?;
        text.push('\n');
        let path = dir.join(format!("{}.jsonl", self.config.name));
        let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }

    /// BLAKE3 of `disk`'s guest view now. With ground-truth recording on it comes from the
    /// disk's [`truth`] cache (built from the disk when missing or not current, and kept unless
    /// a restore is under way); otherwise the disk is read whole.
    pub fn guest_digest(&self, disk: &str) -> Result<blake3::Hash, SimError> {
        let size = self.disk(disk)?.size;
        let path = truth::path(&self.dir, disk);
        let cache = truth::Cache::new(path.clone(), size);
        let keep = self.truth_dir().is_some() && self.config.restoring.is_none();
        let cached = if keep { cache.load().map_err(io(&path))? } else { None };
        // Missing or not current: every block is hashed from the disk; else the stale ones.
        let (mut cvs, mut stale) =
            (cached.unwrap_or_else(|| vec![truth::STALE; size.div_ceil(truth::BLOCK) as usize]), 0);
        let mut buf = vec![0u8; truth::BLOCK as usize];
        let mut view = None;
        for (b, cv) in cvs.iter_mut().enumerate() {
            if *cv == truth::STALE {
                let offset = b as u64 * truth::BLOCK;
                let n = truth::BLOCK.min(size - offset) as usize;
                let view = match &mut view {
                    Some(v) => v,
                    None => view.insert(self.guest_view(disk)?),
                };
                view.read(offset, &mut buf[..n])?;
                *cv = truth::block_cv(offset, &buf[..n]);
                stale += 1;
            }
        }
        if keep && stale > 0 {
            cache.store(&cvs).map_err(io(&path))?;
        }
        truth::root(size, &cvs, || {
            let mut first = vec![0u8; size as usize];
            self.guest_read(disk, 0, &mut first).map_err(std::io::Error::other)?;
            Ok(first)
        })
        .map_err(io(&path))
    }

    /// Changes since `token` as of the held snapshot: the frozen bitmap, or `TrackingLost`.
    pub fn changes_since(&self, disk: &str, token: Option<ChangeToken>) -> Result<DirtyBitmap, SimError> {
        let size = self.disk(disk)?.size;
        let lost = |reason: &str| SimError::TrackingLost {
            vm: self.config.name.clone(),
            disk: disk.to_owned(),
            reason: reason.to_owned(),
        };
        let current = ChangeToken { generation: self.config.generation, sequence: self.config.sequence };
        match token {
            None => return Err(lost("no change token: nothing was backed up with tracking yet")),
            Some(t) if t.generation != current.generation => {
                return Err(lost("tracking was reset (host crash or storage migration)"))
            }
            // One ahead: the coordinator committed but its confirmation never arrived (the agent
            // died or the connection dropped). The changes since `current` include those since
            // `t`, because an unconfirmed transfer's changes go back into the live bitmap.
            Some(t) if t != current && t.sequence != current.sequence + 1 => {
                return Err(lost("the token is not the last one confirmed"))
            }
            Some(_) => {}
        }
        let path = self.frozen(disk);
        Ok(DirtyBitmap::load(&path)
            .map_err(io(&path))?
            .filter(|b| b.size() == size)
            .unwrap_or_else(|| DirtyBitmap::full(size)))
    }

    /// Releases the held snapshot: merges the overlay back into the base, removes it, resumes a
    /// VM paused for it. No guest write is lost.
    pub fn release_snapshot(&mut self) -> Result<(), SimError> {
        let Some(snap) = self.config.snapshot.clone() else { return Ok(()) };
        for d in self.config.disks.clone() {
            let map_path = self.overlay_map(&d.name);
            let ov_path = self.overlay(&d.name);
            if let Some(map) = DirtyBitmap::load(&map_path).map_err(io(&map_path))? {
                let ov = File::open(&ov_path).map_err(io(&ov_path))?;
                let img = self.image(&d.name);
                let base = OpenOptions::new().write(true).open(&img).map_err(io(&img))?;
                let mut buf = vec![0u8; GRANULARITY as usize];
                for t in 0..d.size.div_ceil(GRANULARITY) {
                    if map.is_dirty(t) {
                        let start = t * GRANULARITY;
                        let n = GRANULARITY.min(d.size - start) as usize;
                        ov.read_exact_at(&mut buf[..n], start).map_err(io(&ov_path))?;
                        base.write_all_at(&buf[..n], start).map_err(io(&img))?;
                    }
                }
                base.sync_all().map_err(io(&img))?;
            }
            // Only once the base holds every overlay block may the overlay go (merge is
            // idempotent, so a crash before this line just merges again).
            for p in [&map_path, &ov_path] {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(p)(e)),
                }
            }
        }
        if snap.paused_for_snapshot && self.config.power == Power::Paused {
            self.config.power = Power::Running;
        }
        self.config.snapshot = None;
        self.save()
    }

    /// The coordinator committed what was read: the frozen changes are done with and the
    /// token advances.
    pub fn confirm(&mut self) -> Result<ChangeToken, SimError> {
        self.confirm_to(ChangeToken { generation: self.config.generation, sequence: self.config.sequence + 1 })
    }

    /// Like [`Vm::confirm`], to the token the coordinator committed (which may be one past
    /// ours when an earlier confirmation was lost). A token of an older generation only clears
    /// the frozen changes: tracking was reset meanwhile and its own token stands.
    pub fn confirm_to(&mut self, next: ChangeToken) -> Result<ChangeToken, SimError> {
        for d in self.config.disks.clone() {
            let p = self.frozen(&d.name);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        if next.generation == self.config.generation {
            self.config.sequence = self.config.sequence.max(next.sequence);
        }
        self.save()?;
        Ok(ChangeToken { generation: self.config.generation, sequence: self.config.sequence })
    }

    /// The transfer failed: the frozen changes go back into the live bitmaps, to be sent next
    /// time.
    pub fn abandon(&mut self) -> Result<(), SimError> {
        for d in self.config.disks.clone() {
            let frozen_path = self.frozen(&d.name);
            let Some(frozen) = DirtyBitmap::load(&frozen_path).map_err(io(&frozen_path))? else { continue };
            let live_path = self.bitmap(&d.name);
            let mut live = self.load_bitmap(&live_path, d.size)?;
            live.merge(&frozen);
            live.save(&live_path).map_err(io(&live_path))?;
            std::fs::remove_file(&frozen_path).map_err(io(&frozen_path))?;
        }
        Ok(())
    }

    /// A recovery is about to overwrite the disks: the VM must be off and hold no snapshot.
    /// Marks the VM as being restored (persistently) until [`Vm::restore_finish`].
    pub fn restore_begin(&mut self, what: &str) -> Result<(), SimError> {
        if self.config.power != Power::Off {
            return Err(SimError::Refused(format!(
                "{} is {}: turn it off before restoring onto it",
                self.config.name,
                match self.config.power {
                    Power::Running => "running",
                    Power::Paused => "paused",
                    Power::Off => "off",
                }
            )));
        }
        if let Some(s) = &self.config.snapshot {
            return Err(SimError::Busy(format!("{} holds snapshot {} for {}", self.config.name, s.id, s.holder)));
        }
        self.drop_truth_caches()?;
        self.config.restoring = Some(what.to_owned());
        self.save()
    }

    /// Writes restored bytes straight into a disk image (not a guest write: untracked).
    pub fn restore_write(&self, disk: &str, offset: u64, data: &[u8]) -> Result<(), SimError> {
        self.restore_writer(disk)?.write_at(offset, data)
    }

    /// A writer of restored bytes into `disk`'s image, opened once for a whole restore: a
    /// restore writes every block of a disk, and opening the VM (its lock, its definition) and
    /// the image for each one cost more than some of the writes.
    pub fn restore_writer(&self, disk: &str) -> Result<RestoreWriter, SimError> {
        if self.config.restoring.is_none() {
            return Err(SimError::Invalid(format!("{} is not being restored", self.config.name)));
        }
        let size = self.disk(disk)?.size;
        let path = self.image(disk);
        let buffered = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
        let direct = open_direct(&path).map_err(io(&path))?;
        Ok(RestoreWriter { path, size, buffered, direct })
    }

    /// The restore is complete: the images are synced, the mark cleared, and change tracking
    /// starts over (the disks no longer follow the replica's history).
    pub fn restore_finish(&mut self) -> Result<(), SimError> {
        for d in self.config.disks.clone() {
            let img = self.image(&d.name);
            File::open(&img).map_err(io(&img))?.sync_all().map_err(io(&img))?;
        }
        self.drop_truth_caches()?;
        self.config.restoring = None;
        self.lose_tracking()
    }

    /// Tracking is lost (host crash, storage migration): new generation, everything dirty.
    pub fn lose_tracking(&mut self) -> Result<(), SimError> {
        self.config.generation += 1;
        for d in self.config.disks.clone() {
            let p = self.bitmap(&d.name);
            DirtyBitmap::full(d.size).save(&p).map_err(io(&p))?;
        }
        self.save()
    }
}

/// Names of every VM on the root.
pub fn list_vms(root: &Path) -> Result<Vec<String>, SimError> {
    let dir = root.join("vms");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut names = vec![];
    for e in entries {
        let e = e.map_err(io(&dir))?;
        if e.path().join("vm.toml").exists() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The alignment direct I/O asks of offsets, lengths and buffers (the page size; every
/// logical block size a Linux device has divides it).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// A restore writer's aligned staging buffer, kept between writes: memory touched once
    /// stays mapped, so a restore does not fault in fresh pages for every block.
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A disk as its guest sees it (the image, and the overlay's blocks while a snapshot is held),
/// opened once for many reads.
struct GuestView {
    disk: String,
    size: u64,
    img: File,
    img_path: PathBuf,
    overlay: Option<(File, DirtyBitmap, PathBuf)>,
}

impl GuestView {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SimError> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
            return Err(SimError::Invalid(format!("read past the end of disk {}", self.disk)));
        }
        self.img.read_exact_at(buf, offset).map_err(io(&self.img_path))?;
        if let Some((ov, map, ov_path)) = &self.overlay {
            let end = offset + buf.len() as u64;
            for t in offset / GRANULARITY..end.div_ceil(GRANULARITY) {
                if !map.is_dirty(t) {
                    continue;
                }
                let s = (t * GRANULARITY).max(offset);
                let e = ((t + 1) * GRANULARITY).min(end);
                let slice = &mut buf[(s - offset) as usize..(e - offset) as usize];
                ov.read_exact_at(slice, s).map_err(io(ov_path))?;
            }
        }
        Ok(())
    }
}

/// A restore's writes into one disk image (see [`Vm::restore_writer`]). Aligned writes bypass
/// the page cache (`O_DIRECT`) where the file system allows it: a restore streams a whole disk
/// once, so caching it would only copy every byte into fresh page-cache pages (the largest cost
/// of a full restore, measured) and evict what the host caches for its running guests.
/// Unaligned writes (a short last block) and file systems without direct I/O (tmpfs) go
/// through the page cache; the restore's end syncs the image either way. The VM's lock is not
/// held between writes: nothing else writes a VM that is being restored.
#[derive(Debug)]
pub struct RestoreWriter {
    path: PathBuf,
    size: u64,
    buffered: File,
    direct: Option<File>,
}

impl RestoreWriter {
    /// Writes `data` at `offset`; a write past the disk's end is refused.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), SimError> {
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > self.size) {
            return Err(SimError::Invalid(format!(
                "a restore write at {offset} does not fit {} of {} bytes",
                self.path.display(),
                self.size
            )));
        }
        let aligned =
            !data.is_empty() && offset.is_multiple_of(DIRECT_ALIGN as u64) && data.len().is_multiple_of(DIRECT_ALIGN);
        match &self.direct {
            Some(f) if aligned => STAGING.with(|cell| {
                let mut staging = cell.borrow_mut();
                let need = data.len() + DIRECT_ALIGN;
                if staging.len() < need {
                    staging.resize(need, 0);
                }
                let skip = staging.as_ptr().align_offset(DIRECT_ALIGN);
                let buf = staging
                    .get_mut(skip..skip + data.len())
                    .ok_or_else(|| std::io::Error::other("the direct-I/O staging buffer cannot be aligned"))?;
                buf.copy_from_slice(data);
                f.write_all_at(buf, offset)
            }),
            _ => self.buffered.write_all_at(data, offset),
        }
        .map_err(io(&self.path))
    }
}

/// `path` opened for direct writes, or `None` where its file system has no direct I/O.
fn open_direct(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aligned writes (direct I/O where the file system has it), unaligned ones and a short
    /// tail all land where they were aimed, on the disk (ext4 under the temp dir) and on tmpfs.
    #[test]
    fn direct_writes_land_like_buffered_ones() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in &dirs {
            let path = dir.path().join("disk.img");
            let size = 3 * 65536 + 1000;
            File::create(&path).unwrap().set_len(size).unwrap();
            let writer = RestoreWriter {
                path: path.clone(),
                size,
                buffered: OpenOptions::new().write(true).open(&path).unwrap(),
                direct: open_direct(&path).unwrap(),
            };
            let mut want = vec![0u8; size as usize];
            let writes: [(u64, usize, u8); 4] = [(65536, 65536, 1), (0, 8192, 2), (100, 300, 3), (3 * 65536, 1000, 4)];
            for (offset, len, byte) in writes {
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                writer.write_at(offset, &data).unwrap();
                want[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            assert_eq!(std::fs::read(&path).unwrap(), want, "in {}", dir.path().display());
            assert!(writer.write_at(size - 10, &[1u8; 11]).is_err(), "a write past the end is refused");
            assert_eq!(std::fs::read(&path).unwrap(), want, "a refused write changes nothing");
        }
    }
}
