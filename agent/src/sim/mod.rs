//! The embedded sim hypervisor (DESIGN §5): VMs as directories of raw sparse images on a
//! storage root shared by the cluster's nodes, guest writes that go through this library and
//! are tracked in persistent dirty bitmaps, snapshots with differencing overlays, migrations
//! and host crashes. The agent and the `bulwark-agent sim` commands share it.
//!
//! Modules: [`bitmap`] (persistent dirty bitmaps), [`truth`] (the ground truth's digest
//! cache), [`vm`] (one VM: writes, reads, snapshots,
//! tokens), this file (the operations the `sim` commands expose).

pub mod bitmap;
pub mod truth;
pub mod vm;

use rand::{RngCore, SeedableRng};
use std::io::Write;
use std::path::Path;
pub use vm::{
    ground_truth, ChangeToken, DiskConfig, Frozen, GroundTruth, Power, ReplicaHealth, RestoreWriter, SimError,
    SnapConsistency, Vm, VmConfig, GROUND_TRUTH_DIR,
};

/// What `sim create-vm` asks for.
#[derive(Debug, Clone)]
pub struct CreateVm {
    pub name: String,
    pub host: String,
    pub os: String,
    pub disks: Vec<DiskConfig>,
    pub power: Power,
    pub integration_services: bool,
    pub replica: Option<ReplicaHealth>,
    /// Fill every disk with seeded random data (else zeros).
    pub random_fill: bool,
    pub seed: u64,
}

impl CreateVm {
    /// A VM with the `sim create-vm` defaults: Windows, running, integration services on, not a
    /// replica, zero-filled.
    pub fn new(name: &str, host: &str, disks: Vec<DiskConfig>) -> Self {
        Self {
            name: name.to_owned(),
            host: host.to_owned(),
            os: "windows".to_owned(),
            disks,
            power: Power::Running,
            integration_services: true,
            replica: None,
            random_fill: false,
            seed: 0,
        }
    }
}

/// Creates a VM; with `random_fill`, its disks are filled before tracking starts.
pub fn create_vm(root: &Path, req: &CreateVm) -> Result<(), SimError> {
    if !matches!(req.os.as_str(), "linux" | "windows") {
        return Err(SimError::Invalid(format!("os {:?}: use linux or windows", req.os)));
    }
    let config = VmConfig {
        name: req.name.clone(),
        uuid: Some(uuid::Uuid::new_v4().to_string()),
        host: req.host.clone(),
        os: req.os.clone(),
        power: req.power,
        integration_services: req.integration_services,
        replica: req.replica,
        frozen: None,
        generation: 1,
        sequence: 0,
        disks: req.disks.clone(),
        snapshot: None,
        next_snapshot: 1,
        restoring: None,
        read_delay_ms: None,
    };
    let vm = Vm::create(root, config)?;
    if req.random_fill {
        let mut stream = FillStream(req.seed);
        let mut buf = vec![0u8; 1 << 20];
        for d in &req.disks {
            let path = vm.image(&d.name);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| SimError::Io { path: path.clone(), source: e })?;
            let mut w = std::io::BufWriter::new(f);
            let mut left = d.size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stream.fill(&mut buf[..n]);
                w.write_all(&buf[..n]).map_err(|e| SimError::Io { path: path.clone(), source: e })?;
                left -= n as u64;
            }
            w.into_inner()
                .map_err(|e| SimError::Io { path: path.clone(), source: e.into_error() })?
                .sync_all()
                .map_err(|e| SimError::Io { path: path.clone(), source: e })?;
        }
    }
    Ok(())
}

/// Guest writes of random data covering `percent` % of each disk's 1 MiB blocks, at seeded
/// random blocks. Returns the bytes written.
pub fn churn(root: &Path, name: &str, percent: f64, seed: u64) -> Result<u64, SimError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(SimError::Invalid(format!("churn of {percent} %: use 0 to 100")));
    }
    churn_blocks(root, name, seed, |blocks| ((blocks as f64) * percent / 100.0).round() as u64)
}

/// Guest writes of random data to `bytes` (rounded up to whole 1 MiB blocks) of each disk, at
/// seeded random blocks. Returns the bytes written.
pub fn churn_bytes(root: &Path, name: &str, bytes: u64, seed: u64) -> Result<u64, SimError> {
    churn_blocks(root, name, seed, |blocks| bytes.div_ceil(1 << 20).min(blocks))
}

/// Rewrites `count(blocks of the disk)` seeded random 1 MiB blocks of every disk.
fn churn_blocks(root: &Path, name: &str, seed: u64, count: impl Fn(u64) -> u64) -> Result<u64, SimError> {
    let mut vm = Vm::open(root, name)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut written = 0;
    for d in vm.config.disks.clone() {
        let blocks = d.size.div_ceil(1 << 20);
        let n = count(blocks).min(blocks);
        let mut chosen: Vec<u64> =
            rand::seq::index::sample(&mut rng, blocks as usize, n as usize).into_iter().map(|b| b as u64).collect();
        chosen.sort_unstable();
        let mut buf = vec![0u8; 1 << 20];
        for b in chosen {
            let offset = b << 20;
            let len = (1u64 << 20).min(d.size - offset) as usize;
            rng.fill_bytes(&mut buf[..len]);
            vm.guest_write(&d.name, offset, &buf[..len])?;
            written += len as u64;
        }
    }
    Ok(written)
}

/// Live migration to `host`; with `storage`, the disks move too and tracking resets.
pub fn migrate(root: &Path, name: &str, host: &str, storage: bool) -> Result<(), SimError> {
    let mut vm = Vm::open(root, name)?;
    vm.config.host = host.to_owned();
    vm.save()?;
    if storage {
        vm.lose_tracking()?;
    }
    Ok(())
}

/// Changes the power state.
pub fn set_state(root: &Path, name: &str, power: Power) -> Result<(), SimError> {
    let mut vm = Vm::open(root, name)?;
    vm.config.power = power;
    vm.save()
}

/// Power loss of `host`: tracking is lost for the VMs that were running there. Returns them.
pub fn crash_host(root: &Path, host: &str) -> Result<Vec<String>, SimError> {
    let mut lost = vec![];
    for name in vm::list_vms(root)? {
        let mut vm = Vm::open(root, &name)?;
        if vm.config.host == host && vm.config.power != Power::Off {
            vm.lose_tracking()?;
            lost.push(name);
        }
    }
    Ok(lost)
}

/// Writes the guest view of a disk to `out`, streaming.
pub fn read_disk(root: &Path, name: &str, disk: &str, out: &mut impl Write) -> Result<(), SimError> {
    let vm = Vm::open(root, name)?;
    let size = vm
        .config
        .disks
        .iter()
        .find(|d| d.name == disk)
        .map(|d| d.size)
        .ok_or_else(|| SimError::NoSuchDisk { vm: name.to_owned(), disk: disk.to_owned() })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let n = (buf.len() as u64).min(size - offset) as usize;
        vm.guest_read(disk, offset, &mut buf[..n])?;
        out.write_all(&buf[..n]).map_err(|e| SimError::Io { path: Path::new("output").to_owned(), source: e })?;
        offset += n as u64;
    }
    Ok(())
}

/// At agent start-up: every snapshot `host` held when it died is released (overlay merged,
/// paused VM resumed) and its pending changes go back into the live bitmaps. Returns the VMs.
pub fn cleanup_orphans(root: &Path, host: &str) -> Result<Vec<String>, SimError> {
    let mut cleaned = vec![];
    for name in vm::list_vms(root)? {
        let mut vm = Vm::open(root, &name)?;
        let held = vm.config.snapshot.as_ref().is_some_and(|s| s.holder == host);
        // A guest frozen by a run that died is thawed, whoever froze it: nothing else will.
        if vm.config.frozen.is_some() && (held || vm.config.host == host) {
            vm.thaw()?;
            if !held {
                cleaned.push(name.clone());
            }
        }
        if held {
            vm.release_snapshot()?;
            vm.abandon()?;
            cleaned.push(name);
        }
    }
    Ok(cleaned)
}

/// The bytes of a random fill: SplitMix64's output stream from the request's seed. Incompressible
/// and the same for the same seed, which is all a fill needs; several times faster than a
/// cryptographic stream (BLAKE3's output was a twentieth of a chaos seed's time).
struct FillStream(u64);

impl FillStream {
    fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            piece.copy_from_slice(&z.to_le_bytes()[..piece.len()]);
        }
    }
}
