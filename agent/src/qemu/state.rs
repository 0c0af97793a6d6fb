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

/// temp → fsync → rename → fsync of the directory.
pub(super) fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
