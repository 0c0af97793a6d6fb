//! Where `recover-disk --output FILE` writes a whole guest disk, decided before any byte moves:
//! a new FILE (created exclusively, mode 0600: it holds everything the guest had), an existing
//! regular FILE only with `--force`, a block device in place only with `--device`; any other
//! node (directory, FIFO, socket, character device, symbolic link) is refused.
//!
//! A file is written to `FILE.partial` (the name with `.partial` appended, created exclusively:
//! an existing one is named and refused, never truncated) and renamed over FILE at the end; the
//! partial file is removed on every failure and on SIGINT/SIGTERM ([`Interrupted`]).

use anyhow::{bail, Context as _};
use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The checked destination of a disk.
#[derive(Debug)]
pub enum Place {
    /// FILE does not exist: it is created (never replacing one that appears meanwhile).
    New { dest: PathBuf, partial: PathBuf },
    /// FILE is a regular file and `--force` was given.
    Replace { dest: PathBuf, partial: PathBuf },
    /// FILE is a block device and `--device` was given: written in place.
    Device { dest: PathBuf },
}

fn partial_of(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// What a node is, in words.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a regular file"
    }
}

fn partial_exists(partial: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} exists (left by an earlier recover-disk?): remove it or choose another --output",
        partial.display()
    )
}

impl Place {
    /// Decides what `--output FILE` means with these flags, or refuses.
    pub fn check(dest: &Path, force: bool, device: bool) -> anyhow::Result<Place> {
        let meta = match std::fs::symlink_metadata(dest) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dest.display())),
        };
        let Some(meta) = meta else {
            if device {
                bail!("--device: {} does not exist (give the path of the block device)", dest.display());
            }
            return Self::file(dest, false);
        };
        let t = meta.file_type();
        if device {
            // A link is followed here only: /dev/disk/by-id/… names are links to devices.
            let target = if t.is_symlink() { std::fs::metadata(dest).map(|m| m.file_type()).ok() } else { Some(t) };
            return match target {
                Some(t) if t.is_block_device() => Ok(Place::Device { dest: dest.to_owned() }),
                Some(t) => bail!("--device: {} is {}, not a block device", dest.display(), kind_of(t)),
                None => bail!("--device: {} is a dangling symbolic link", dest.display()),
            };
        }
        if t.is_file() {
            if !force {
                bail!("{} exists: give --force to replace it", dest.display());
            }
            return Self::file(dest, true);
        }
        if t.is_block_device() {
            bail!("{} is a block device: give --device to write the disk onto it", dest.display());
        }
        bail!("{} is {}: refusing to write a disk image there", dest.display(), kind_of(t))
    }

    fn file(dest: &Path, replace: bool) -> anyhow::Result<Place> {
        let partial = partial_of(dest);
        if std::fs::symlink_metadata(&partial).is_ok() {
            return Err(partial_exists(&partial));
        }
        let (dest, partial) = (dest.to_owned(), partial);
        Ok(if replace { Place::Replace { dest, partial } } else { Place::New { dest, partial } })
    }

    /// FILE as the operator named it.
    pub fn path(&self) -> &Path {
        match self {
            Place::New { dest, .. } | Place::Replace { dest, .. } | Place::Device { dest } => dest,
        }
    }

    /// Opens the destination for a disk of `size` bytes.
    pub fn open(&self, size: u64) -> anyhow::Result<Output<'_>> {
        match self {
            Place::New { partial, .. } | Place::Replace { partial, .. } => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(partial)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => partial_exists(partial),
                        _ => anyhow::anyhow!("cannot create {}: {e}", partial.display()),
                    })?;
                // From here the partial file is ours: the guard removes it unless finished.
                let out = Output { place: self, file, finished: false };
                out.file.set_len(size).with_context(|| format!("cannot size {}", partial.display()))?;
                Ok(out)
            }
            Place::Device { dest } => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(dest)
                    .with_context(|| format!("cannot open the device {}", dest.display()))?;
                // Checked again on the open descriptor: the path could have changed since.
                let t = file.metadata().with_context(|| format!("cannot inspect {}", dest.display()))?.file_type();
                if !t.is_block_device() {
                    bail!("--device: {} is {}, not a block device", dest.display(), kind_of(t));
                }
                let holds = file.seek(SeekFrom::End(0)).with_context(|| format!("cannot size {}", dest.display()))?;
                if holds < size {
                    bail!("the device {} holds {holds} bytes; the disk needs {size}", dest.display());
                }
                Ok(Output { place: self, file, finished: false })
            }
        }
    }

    /// The line an interrupted recover-disk ends with (the partial file is gone by then).
    pub fn interrupted(&self, signal: &str) -> String {
        match self {
            Place::New { dest, partial } => {
                format!("interrupted by {signal}: {} removed, {} not created", partial.display(), dest.display())
            }
            Place::Replace { dest, partial } => {
                format!("interrupted by {signal}: {} removed, {} left as it was", partial.display(), dest.display())
            }
            Place::Device { dest } => {
                format!("interrupted by {signal}: the device {} is only partly written", dest.display())
            }
        }
    }
}

/// An open destination. Dropped unfinished (an error, a signal), it removes its partial file.
#[derive(Debug)]
pub struct Output<'a> {
    place: &'a Place,
    file: File,
    finished: bool,
}

impl Output<'_> {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether all-zero blocks must be written: a device holds old data; a new file is sparse.
    pub fn needs_zeros(&self) -> bool {
        matches!(self.place, Place::Device { .. })
    }

    /// The disk is complete: on stable storage, and in place under FILE.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let dest = self.place.path();
        self.file.sync_all().with_context(|| format!("cannot sync {}", dest.display()))?;
        match self.place {
            Place::Device { .. } => {}
            Place::New { dest, partial } => {
                let cwd = rustix::fs::CWD;
                rustix::fs::renameat_with(
                    cwd,
                    partial.as_path(),
                    cwd,
                    dest.as_path(),
                    rustix::fs::RenameFlags::NOREPLACE,
                )
                .map_err(|e| anyhow::anyhow!("cannot rename {} to {}: {e}", partial.display(), dest.display()))?;
                sync_parent(dest);
            }
            Place::Replace { dest, partial } => {
                // Still a regular file (or gone): never rename over a node that replaced it.
                match std::fs::symlink_metadata(dest) {
                    Ok(m) if !m.file_type().is_file() => {
                        bail!("{} became {} meanwhile: not replaced", dest.display(), kind_of(m.file_type()))
                    }
                    _ => {}
                }
                std::fs::rename(partial, dest)
                    .with_context(|| format!("cannot rename {} to {}", partial.display(), dest.display()))?;
                sync_parent(dest);
            }
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        if let (false, Place::New { partial, .. } | Place::Replace { partial, .. }) = (self.finished, self.place) {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// Makes a rename durable (best effort: the data itself is already synced).
fn sync_parent(dest: &Path) {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
}

/// SIGINT and SIGTERM, caught for the length of a recover-disk so it can clean up and say so.
pub struct Interrupted {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupted {
    /// Starts catching both signals (inside a tokio runtime).
    pub fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        let term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        Ok(Self { int, term })
    }

    /// The name of the next signal that arrives.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_name_appends_to_the_whole_name() {
        assert_eq!(partial_of(Path::new("/a/x.img")), Path::new("/a/x.img.partial"));
        assert_eq!(partial_of(Path::new("disk")), Path::new("disk.partial"));
    }
}
