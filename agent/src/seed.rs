//! Seeds for manual replica creation (DPM's "manually, using removable media"): the disks of
//! a VM as of a consistent snapshot, written as sparse raw images plus a manifest into a
//! directory that can be carried to the backup server and loaded with `bulwark seed import`.
//! The export does not advance change tracking: the consistency check that follows the import
//! reconciles the seed with the source, moving only what changed since.
//!
//! Layout of a seed directory: `seed.toml` (the manifest, written last) and `DISK.img` per
//! disk.

use crate::backend::{BackendError, Hypervisor};
use bulwark_protocol::block::{ChunkHasher, ZERO};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The manifest's format version.
pub const SEED_FORMAT: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "seed.toml";
/// Blocks are read in this size (the coordinator re-cuts them to the group's block size).
const READ_BLOCK: usize = 1 << 20;

/// `seed.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedManifest {
    pub format: u32,
    pub vm: String,
    pub host: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `app`, `filesystem` or `crash`.
    pub consistency: String,
    pub disks: Vec<SeedDisk>,
}

/// One disk of a seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedDisk {
    pub name: String,
    pub size_bytes: u64,
    /// The image's file name inside the seed directory.
    pub file: String,
    /// BLAKE3 of the whole image (hex), checked at import.
    pub blake3: String,
}

/// Why a seed could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError + '_ {
    move |source| SeedError::Io { path: path.to_owned(), source }
}

/// Writes a seed of `vm` (on `host`) into `out`, which must not hold a seed already.
pub fn export(backend: &dyn Hypervisor, host: &str, vm: &str, out: &Path) -> Result<SeedManifest, SeedError> {
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        return Err(SeedError::Invalid(format!("{} already holds a seed", out.display())));
    }
    let inv = backend.inventory(host)?;
    let info = inv
        .vms
        .iter()
        .find(|v| v.name == vm)
        .ok_or_else(|| SeedError::Invalid(format!("{vm} is not on {host}")))?
        .clone();
    std::fs::create_dir_all(out).map_err(io(out))?;
    let holder = format!("seed-export@{host}");
    let consistency = backend.freeze(vm)?;
    let taken = backend.take(vm, &holder);
    let thawed = backend.thaw(vm);
    taken?;
    // From here the snapshot is held: whatever happens, it is released and its changes kept.
    let result = (|| {
        thawed?;
        let mut disks = vec![];
        for d in &info.disks {
            disks.push(export_disk(backend, vm, d.name.as_str(), d.size_bytes, out)?);
        }
        Ok::<_, SeedError>(disks)
    })();
    let released = backend.release(vm).and_then(|()| backend.abandon(vm));
    let disks = result?;
    released?;
    let manifest = SeedManifest {
        format: SEED_FORMAT,
        vm: vm.to_owned(),
        host: host.to_owned(),
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        consistency: consistency.consistency.as_str().to_owned(),
        disks,
    };
    let text = toml::to_string_pretty(&manifest).map_err(|e| SeedError::Invalid(e.to_string()))?;
    bulwark_pki::files::write_atomic(&manifest_path, text.as_bytes(), 0o600).map_err(io(&manifest_path))?;
    Ok(manifest)
}

fn export_disk(backend: &dyn Hypervisor, vm: &str, disk: &str, size: u64, out: &Path) -> Result<SeedDisk, SeedError> {
    let file_name = format!("{disk}.img");
    let path = out.join(&file_name);
    let partial = out.join(format!("{file_name}.partial"));
    // The image is the guest's whole disk, in plaintext even from an encrypted store: only
    // its owner reads it, and nothing already there is truncated or followed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&partial)
        .map_err(io(&partial))?;
    let r = fill_image(backend, vm, disk, size, &f, &partial).and_then(|()| {
        drop(f);
        let digest = image_digest(&partial)?;
        let cwd = rustix::fs::CWD;
        rustix::fs::renameat_with(cwd, partial.as_path(), cwd, path.as_path(), rustix::fs::RenameFlags::NOREPLACE)
            .map_err(|e| io(&path)(e.into()))?;
        Ok(digest)
    });
    let digest = match r {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    bulwark_pki::files::sync_dir(out).map_err(io(out))?;
    Ok(SeedDisk { name: disk.to_owned(), size_bytes: size, file: file_name, blake3: digest })
}

/// The snapshot's allocated blocks of `disk` into `f` (sized to the disk; holes stay holes).
fn fill_image(
    backend: &dyn Hypervisor,
    vm: &str,
    disk: &str,
    size: u64,
    f: &File,
    partial: &Path,
) -> Result<(), SeedError> {
    f.set_len(size).map_err(io(partial))?;
    let indices = backend.allocated_blocks(vm, disk, READ_BLOCK as u64)?;
    let mut write_error = None;
    backend.read_blocks(vm, disk, indices, READ_BLOCK, &ChunkHasher::plain(), &mut |b| {
        if b.id == ZERO {
            return Ok(());
        }
        f.write_all_at(b.data, b.index * READ_BLOCK as u64).map_err(|e| {
            let msg = format!("{}: {e}", partial.display());
            write_error = Some(e);
            msg
        })
    })?;
    if let Some(e) = write_error {
        return Err(io(partial)(e));
    }
    f.sync_all().map_err(io(partial))
}

/// BLAKE3 (hex) of a whole image file.
pub fn image_digest(path: &Path) -> Result<String, SeedError> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).map_err(io(path))?;
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(h.finalize().to_hex().to_string())
}

/// Reads and checks a seed directory's manifest (names are checked: a manifest cannot point
/// outside its directory).
pub fn read_manifest(dir: &Path) -> Result<SeedManifest, SeedError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let m: SeedManifest = toml::from_str(&text).map_err(|e| SeedError::Invalid(format!("{}: {e}", path.display())))?;
    if m.format != SEED_FORMAT {
        return Err(SeedError::Invalid(format!("seed format {} is not {SEED_FORMAT}", m.format)));
    }
    for d in &m.disks {
        let plain = Path::new(&d.file).file_name().is_some_and(|n| n == d.file.as_str());
        if !plain || d.file.starts_with('.') {
            return Err(SeedError::Invalid(format!("seed file name {:?} is not a plain file name", d.file)));
        }
    }
    Ok(m)
}
