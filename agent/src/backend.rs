//! The hypervisor backend: what the agent needs of a hypervisor, so the sim and QEMU backends
//! are interchangeable and the coordinator cannot tell them apart. (Restore writing joins this
//! trait with recovery.)

use crate::reader::{ReadBlock, ReadStats};
use crate::sim::{self, SimError, SnapConsistency, Vm};
use bulwark_protocol::block::ChunkHasher;
use bulwark_protocol::messages::{ChangeToken, Consistency, DiskInfo, GuestOs, Inventory, NewVm, MAX_VM_CONFIG};
use std::path::PathBuf;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The hypervisor will not snapshot this VM now (an unhealthy replica, say).
    #[error("snapshot refused: {0}")]
    Refused(String),
    /// Changes since the given token are unknown: a full read or consistency check is needed.
    #[error("change tracking lost: {0}")]
    TrackingLost(String),
    #[error("{0}")]
    Failed(String),
}

impl From<SimError> for BackendError {
    fn from(e: SimError) -> Self {
        match e {
            SimError::Refused(r) => BackendError::Refused(r),
            e @ SimError::TrackingLost { .. } => BackendError::TrackingLost(e.to_string()),
            other => BackendError::Failed(other.to_string()),
        }
    }
}

/// How far a freeze got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiesced {
    pub consistency: Consistency,
    /// Why the consistency is lower than asked for, in words; `None` when nothing went wrong.
    pub note: Option<String>,
}

impl Quiesced {
    pub fn clean(consistency: Consistency) -> Quiesced {
        Quiesced { consistency, note: None }
    }
}

/// Where a restore writes one disk's blocks (see [`Hypervisor::restore_writer`]).
pub trait DiskWriter: Send {
    /// Writes `data` at byte `offset` of the disk.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError>;
}

/// What the agent asks of a hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    /// The VMs of `host`.
    fn inventory(&self, host: &str) -> Result<Inventory, BackendError>;
    /// Where the VMs' ownership claims live: a directory on the storage every node of the
    /// cluster shares (see [`crate::claims`]).
    fn claims_dir(&self) -> PathBuf;
    /// Whether VM `vm` is on `host` (what a job checks before its snapshot): by default from
    /// the whole inventory; a backend that can look up one VM answers without listing them all.
    fn is_here(&self, vm: &str, host: &str) -> Result<bool, BackendError> {
        Ok(self.inventory(host)?.vms.iter().any(|v| v.name == vm))
    }
    /// Quiesce (or pause) the guest; answers the consistency the snapshot will have, and why it
    /// is lower than the guest could give (a guest agent that did not answer, a failed hook).
    fn freeze(&self, vm: &str) -> Result<Quiesced, BackendError>;
    /// The snapshot point, for `holder`; answers the change token its changes are relative to.
    fn take(&self, vm: &str, holder: &str) -> Result<ChangeToken, BackendError>;
    /// Undo the freeze; harmless when not frozen.
    fn thaw(&self, vm: &str) -> Result<(), BackendError>;
    /// Blocks of `block_size` changed since `token`, as of the held snapshot.
    fn changed_blocks(
        &self,
        vm: &str,
        disk: &str,
        token: Option<ChangeToken>,
        block_size: u64,
    ) -> Result<Vec<u64>, BackendError>;
    /// Blocks of the held snapshot that hold allocated data (what an initial copy reads).
    fn allocated_blocks(&self, vm: &str, disk: &str, block_size: u64) -> Result<Vec<u64>, BackendError>;
    /// The size of a disk, in bytes.
    fn disk_size(&self, vm: &str, disk: &str) -> Result<u64, BackendError>;
    /// Streams blocks `indices` of the held snapshot with their ids.
    fn read_blocks(
        &self,
        vm: &str,
        disk: &str,
        indices: Vec<u64>,
        block_size: usize,
        hasher: &ChunkHasher,
        sink: &mut dyn FnMut(ReadBlock<'_>) -> Result<(), String>,
    ) -> Result<ReadStats, BackendError>;
    /// Drop the held snapshot; no guest write is lost.
    fn release(&self, vm: &str) -> Result<(), BackendError>;
    /// The coordinator committed up to `next`: the token advances to it (returned).
    fn confirm(&self, vm: &str, next: ChangeToken) -> Result<ChangeToken, BackendError>;
    /// The transfer failed: its changes will be sent again next time.
    fn abandon(&self, vm: &str) -> Result<(), BackendError>;
    /// The VM's definition as it is now, to keep with a recovery point (at most
    /// [`MAX_VM_CONFIG`] bytes; empty when there is none).
    fn vm_config(&self, vm: &str) -> Result<Vec<u8>, BackendError>;
    /// Prepares `vm` to be overwritten by a recovery (`what` says which, for the record); with
    /// `create`, makes it first (powered off, zero disks) on `host`, from the recovery point's
    /// definition `config` where one was kept (new name, new identity, this host's paths).
    /// A running VM is refused.
    fn restore_begin(
        &self,
        vm: &str,
        host: &str,
        what: &str,
        create: Option<(&NewVm, &[DiskInfo])>,
        config: &[u8],
    ) -> Result<(), BackendError>;
    /// Streams blocks of the VM's current disk (a VM being restored: off, nothing held).
    fn read_current(
        &self,
        vm: &str,
        disk: &str,
        indices: Vec<u64>,
        block_size: usize,
        hasher: &ChunkHasher,
        sink: &mut dyn FnMut(ReadBlock<'_>) -> Result<(), String>,
    ) -> Result<ReadStats, BackendError>;
    /// A writer of restored bytes into `disk` of `vm` (a VM being restored), opened once for
    /// all of a restore's writes.
    fn restore_writer(&self, vm: &str, disk: &str) -> Result<Box<dyn DiskWriter + '_>, BackendError>;
    /// Syncs and unmarks a restored VM; its change tracking starts over.
    fn restore_finish(&self, vm: &str) -> Result<(), BackendError>;
    /// Instant recovery: makes VM `vm` on this host (powered off, as `restore_begin` with
    /// `create` does) with disks that are overlays backed by NBD exports, and answers the
    /// socket of each disk's export (in `disks`' order) for the caller to serve. Nothing of
    /// the recovery point is copied. Only a backend whose VMs can run from such disks can.
    /// The state it keeps (see [`InstantState`]) survives the agent: [`Hypervisor::instants`]
    /// answers it at start-up.
    fn instant_begin(
        &self,
        vm: &str,
        _new: &NewVm,
        _disks: &[DiskInfo],
        _config: &[u8],
        _export: &InstantExport,
    ) -> Result<Vec<std::path::PathBuf>, BackendError> {
        Err(BackendError::Failed(format!(
            "instant recovery of {vm} needs a QEMU host: this host's hypervisor cannot run a VM from a recovery point"
        )))
    }
    /// Ends instant recovery `vm`: copies what its disks' overlays still read from their
    /// exports into them (under the running VM, or offline) until nothing depends on the
    /// exports; answers the bytes copied. The caller stops the exports afterwards.
    fn instant_finish(&self, vm: &str) -> Result<u64, BackendError> {
        Err(BackendError::Failed(format!("{vm} is no instant recovery of this host's hypervisor")))
    }
    /// Undoes an instant recovery that failed before its VM was ready: its definition,
    /// overlays, sockets and state go (nothing of it ever ran).
    fn instant_abandon(&self, _vm: &str) -> Result<(), BackendError> {
        Ok(())
    }
    /// The instant recoveries begun and not finished (their exports must be served again after
    /// a restart of the agent).
    fn instants(&self) -> Result<Vec<InstantState>, BackendError> {
        Ok(vec![])
    }
}

/// Whose instant recovery a VM's exports serve: its job, block size, and the coordinator that
/// made it (the one its exports read from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstantExport {
    pub job: u64,
    pub block_size: u32,
    pub coordinator: String,
}

/// What an agent needs to serve an instant recovery's exports again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstantState {
    pub vm: String,
    pub job: u64,
    pub block_size: u32,
    pub disks: Vec<InstantDisk>,
    /// The coordinator that made it (absent in states written before several coordinators:
    /// the agent's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
}

/// One disk of an [`InstantState`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstantDisk {
    pub name: String,
    pub size_bytes: u64,
    pub socket: std::path::PathBuf,
}

/// The sim hypervisor on a storage root.
#[derive(Debug, Clone)]
pub struct SimBackend {
    pub root: PathBuf,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl DiskWriter for sim::RestoreWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        Ok(sim::RestoreWriter::write_at(self, offset, data)?)
    }
}

impl Hypervisor for SimBackend {
    fn inventory(&self, host: &str) -> Result<Inventory, BackendError> {
        Ok(crate::inventory::sim_inventory(&self.root, host)?)
    }

    fn claims_dir(&self) -> PathBuf {
        self.root.join("claims")
    }

    fn is_here(&self, vm: &str, host: &str) -> Result<bool, BackendError> {
        match Vm::open(&self.root, vm) {
            Ok(v) => Ok(v.config.host == host),
            Err(sim::SimError::NoSuchVm(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn freeze(&self, vm: &str) -> Result<Quiesced, BackendError> {
        Ok(Quiesced::clean(match Vm::open(&self.root, vm)?.freeze(now_ms())? {
            SnapConsistency::App => Consistency::App,
            SnapConsistency::Filesystem => Consistency::Filesystem,
            SnapConsistency::Crash => Consistency::Crash,
        }))
    }

    fn take(&self, vm: &str, holder: &str) -> Result<ChangeToken, BackendError> {
        let (_, token) = Vm::open(&self.root, vm)?.take_snapshot(holder, now_ms() / 1000)?;
        Ok(token)
    }

    fn thaw(&self, vm: &str) -> Result<(), BackendError> {
        Ok(Vm::open(&self.root, vm)?.thaw()?)
    }

    fn changed_blocks(
        &self,
        vm: &str,
        disk: &str,
        token: Option<ChangeToken>,
        block_size: u64,
    ) -> Result<Vec<u64>, BackendError> {
        let vm = Vm::open(&self.root, vm)?;
        Ok(vm.changes_since(disk, token)?.dirty_blocks(block_size))
    }

    fn allocated_blocks(&self, vm: &str, disk: &str, block_size: u64) -> Result<Vec<u64>, BackendError> {
        let (image, size) = Vm::open(&self.root, vm)?.snapshot_source(disk)?;
        crate::reader::allocated_blocks(&image, size, block_size).map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn disk_size(&self, vm: &str, disk: &str) -> Result<u64, BackendError> {
        let vm = Vm::open(&self.root, vm)?;
        vm.config.disks.iter().find(|d| d.name == disk).map(|d| d.size).ok_or_else(|| {
            BackendError::Failed(
                sim::SimError::NoSuchDisk { vm: vm.config.name.clone(), disk: disk.to_owned() }.to_string(),
            )
        })
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
        let v = Vm::open(&self.root, vm)?;
        let (image, size) = v.snapshot_source(disk)?;
        let delay = v.config.read_delay_ms.map(std::time::Duration::from_millis);
        drop(v);
        // The VM's lock is not held while reading: guest writes go on, into the overlay.
        let mut sink = |b: ReadBlock<'_>| {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            sink(b)
        };
        crate::reader::read_blocks(&image, size, block_size, indices, hasher, &mut sink)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn release(&self, vm: &str) -> Result<(), BackendError> {
        Ok(Vm::open(&self.root, vm)?.release_snapshot()?)
    }

    fn confirm(&self, vm: &str, next: ChangeToken) -> Result<ChangeToken, BackendError> {
        Ok(Vm::open(&self.root, vm)?.confirm_to(next)?)
    }

    fn abandon(&self, vm: &str) -> Result<(), BackendError> {
        Ok(Vm::open(&self.root, vm)?.abandon()?)
    }

    fn vm_config(&self, vm: &str) -> Result<Vec<u8>, BackendError> {
        let path = sim::vm::vm_dir(&self.root, vm).join("vm.toml");
        let text = std::fs::read(&path).map_err(|e| BackendError::Failed(format!("{}: {e}", path.display())))?;
        Ok(if text.len() <= MAX_VM_CONFIG { text } else { vec![] })
    }

    fn restore_begin(
        &self,
        vm: &str,
        host: &str,
        what: &str,
        create: Option<(&NewVm, &[DiskInfo])>,
        config: &[u8],
    ) -> Result<(), BackendError> {
        // The recovery point's settings (a definition another host made: only its plain
        // settings are taken, never its identity, host or state).
        let kept = sim::vm::settings_from(config);
        if let Some((new, disks)) = create {
            let mut req = sim::CreateVm {
                os: match new.os {
                    GuestOs::Linux => "linux".into(),
                    GuestOs::Windows => "windows".into(),
                },
                power: sim::Power::Off,
                integration_services: new.integration_services,
                ..sim::CreateVm::new(
                    vm,
                    host,
                    disks.iter().map(|d| sim::DiskConfig { name: d.name.to_string(), size: d.size_bytes }).collect(),
                )
            };
            if let Some(k) = &kept {
                req.os = k.os.clone();
                req.integration_services = k.integration_services;
            }
            sim::create_vm(&self.root, &req)?;
        }
        let mut v = Vm::open(&self.root, vm)?;
        if v.config.host != host {
            return Err(BackendError::Failed(format!("{vm} runs on {}, not on {host}", v.config.host)));
        }
        if let (Some(k), None) = (&kept, create) {
            v.config.os = k.os.clone();
            v.config.integration_services = k.integration_services;
        }
        Ok(v.restore_begin(what)?)
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
        let v = Vm::open(&self.root, vm)?;
        if v.config.restoring.is_none() {
            return Err(BackendError::Failed(format!("{vm} is not being restored")));
        }
        let image = v.image(disk);
        let size = v.config.disks.iter().find(|d| d.name == disk).map(|d| d.size).ok_or_else(|| {
            BackendError::Failed(sim::SimError::NoSuchDisk { vm: vm.to_owned(), disk: disk.to_owned() }.to_string())
        })?;
        // The lock is released before reading: nothing else writes a VM being restored.
        drop(v);
        crate::reader::read_blocks(&image, size, block_size, indices, hasher, sink)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn restore_writer(&self, vm: &str, disk: &str) -> Result<Box<dyn DiskWriter + '_>, BackendError> {
        // The VM's lock is held only while the writer is opened: nothing else writes a VM
        // that is being restored.
        Ok(Box::new(Vm::open(&self.root, vm)?.restore_writer(disk)?))
    }

    fn restore_finish(&self, vm: &str) -> Result<(), BackendError> {
        Ok(Vm::open(&self.root, vm)?.restore_finish()?)
    }
}
