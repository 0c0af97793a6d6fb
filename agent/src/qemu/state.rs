//! What the backend keeps of a VM: its state file (generation, confirmed token, what is
//! frozen or held, a restore in progress), written durably before each step it records, and
//! the NBD connections open on its snapshot.

use super::*;

/// What the agent remembers of a VM across restarts (`STATE_DIR/NAME.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VmState {
    /// Bumped whenever tracking is lost.
    pub(super) generation: u64,
    /// The last change token the coordinator confirmed.
    pub(super) sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) frozen: Option<FrozenState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) snapshot: Option<SnapState>,
    /// A recovery that has not finished writing the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) restoring: Option<String>,
    /// On a cluster's shared storage: the node that last ran the VM or took a snapshot step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) host: Option<String>,
    /// Each disk's image at the last snapshot: another image (a storage migration) means the
    /// tracking no longer follows the replica's history.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(super) images: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FrozenState {
    /// `guest-fsfreeze-freeze` was (or may have been) sent.
    pub(super) guest: bool,
    /// We paused the VM.
    pub(super) paused: bool,
    pub(super) consistency: Consistency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapState {
    pub(super) holder: String,
    /// The VM ran: the fleecing graph and NBD exports live in QEMU.
    pub(super) running: bool,
    /// We stopped the VM for the snapshot point and may not have resumed it yet.
    pub(super) paused: bool,
}

/// Open NBD connections (and the `qemu-nbd` servers behind them) of a VM.
#[derive(Default)]
pub(super) struct Open {
    pub(super) disks: HashMap<String, Arc<Mutex<Nbd>>>,
    pub(super) servers: Vec<Child>,
}

impl Open {
    pub(super) fn close(mut self) {
        for (_, n) in self.disks.drain() {
            if let Ok(m) = Arc::try_unwrap(n) {
                if let Ok(n) = m.into_inner() {
                    n.disconnect();
                }
            }
        }
        for mut c in self.servers.drain(..) {
            // qemu-nbd exits once its client leaves; a hung one is killed.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// temp → fsync → rename → fsync of the directory. The temporary file is one of this
/// process's own, created new (never a file or link someone left in a shared directory).
pub(super) fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    let written = f.write_all(data).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// The most bytes of a VM state file read (they hold a few hundred).
pub(super) const MAX_STATE_FILE: u64 = 64 * 1024;

/// How long a node waits for another's lock on a VM's shared state.
pub(super) const STATE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// An exclusive lock of `path` (created if missing), waited for at most [`STATE_LOCK_WAIT`];
/// released when the file is dropped.
pub(super) fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let deadline = Instant::now() + STATE_LOCK_WAIT;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(format!("{} is locked by another node", path.display())))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}
