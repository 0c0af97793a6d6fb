//! The hypervisor backend: what the agent needs of a hypervisor, so the sim and QEMU backends
//! are interchangeable and the coordinator cannot tell them apart. (Restore writing joins this
//! trait with recovery.)

use crate::reader::{ReadBlock, ReadStats};
use crate::sim::{self, SimError, SnapConsistency, Vm};
use bulwark_protocol::block::ChunkHasher;
use bulwark_protocol::messages::{ChangeToken, Consistency, Inventory};
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

/// What the agent asks of a hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    /// The VMs of `host`.
    fn inventory(&self, host: &str) -> Result<Inventory, BackendError>;
    /// Quiesce (or pause) the guest; answers the consistency the snapshot will have.
    fn freeze(&self, vm: &str) -> Result<Consistency, BackendError>;
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
}

/// The sim hypervisor on a storage root.
#[derive(Debug, Clone)]
pub struct SimBackend {
    pub root: PathBuf,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Hypervisor for SimBackend {
    fn inventory(&self, host: &str) -> Result<Inventory, BackendError> {
        Ok(crate::inventory::sim_inventory(&self.root, host)?)
    }

    fn freeze(&self, vm: &str) -> Result<Consistency, BackendError> {
        Ok(match Vm::open(&self.root, vm)?.freeze(now_ms())? {
            SnapConsistency::App => Consistency::App,
            SnapConsistency::Filesystem => Consistency::Filesystem,
            SnapConsistency::Crash => Consistency::Crash,
        })
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
        let (image, size) = Vm::open(&self.root, vm)?.snapshot_source(disk)?;
        // The VM's lock is not held while reading: guest writes go on, into the overlay.
        crate::reader::read_blocks(&image, size, block_size, indices, hasher, sink)
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
}
