//! VMs' ownership claims on the cluster's shared storage: one file per VM,
//! `CLAIMS_DIR/NAME.claim`, changed only by compare-and-swap under an exclusive lock of
//! `CLAIMS_DIR/NAME.lock` (so two nodes, or two coordinators' requests on one node, never both
//! win), written temp → fsync → rename → fsync dir. The rules are
//! `bulwark_protocol::ownership`'s; this module only reads and writes.
//!
//! The claims directory is the sim root's `claims/`, or a QEMU cluster's `claims_dir` (default
//! `vm_dir/claims`) on the storage that holds the definitions. A claim file is small text:
//!
//! ```text
//! bulwark-claim 1
//! coordinator NAME
//! epoch N
//! ```
//!
//! Any node of the cluster can write there, so a file is read as hostile bytes: at most
//! [`MAX_CLAIM_FILE`] bytes, every line checked; a file that does not parse is an error (the job
//! is refused), never "unclaimed".

use bulwark_protocol::ownership::{self, ClaimMode, ClaimRefusal, Owner, MAX_OWNER_NAME};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The largest claim file read.
pub const MAX_CLAIM_FILE: u64 = 1024;

/// How long a claim waits for another node's lock on the same VM before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

const MAGIC: &str = "bulwark-claim 1";

/// Why a claim could not be read, written or granted.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Refused(#[from] ClaimRefusal),
    #[error("the claim of VM {vm} at {path} is not valid: {reason}")]
    Corrupt { vm: String, path: PathBuf, reason: String },
    #[error("the claim of VM {vm} is locked by another request for longer than {LOCK_WAIT:?} ({path})")]
    Busy { vm: String, path: PathBuf },
    #[error("claim of VM {vm}: {path}: {source}")]
    Io { vm: String, path: PathBuf, source: std::io::Error },
}

/// The claims of the VMs under one claims directory.
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
    #[cfg(feature = "broken-builds")]
    ignore_claims: bool,
}

impl Claims {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            #[cfg(feature = "broken-builds")]
            ignore_claims: false,
        }
    }

    /// A broken build (the simulation's check that it catches it): a job that names an epoch
    /// is admitted whatever the claim says (a job with epoch 0 still claims the VM).
    #[cfg(feature = "broken-builds")]
    pub fn break_by_ignoring_claims(mut self) -> Self {
        self.ignore_claims = true;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.claim"))
    }

    fn io(&self, vm: &str, path: &Path) -> impl FnOnce(std::io::Error) -> ClaimError {
        let (vm, path) = (vm.to_owned(), path.to_owned());
        move |source| ClaimError::Io { vm, path, source }
    }

    /// The claim on `vm` now (`None`: never claimed). A reader needs no lock: a claim is
    /// replaced by rename, so a read sees the old file or the new one.
    pub fn read(&self, vm: &str) -> Result<Option<Owner>, ClaimError> {
        valid_vm(vm)?;
        let path = self.path(vm);
        // Never a FIFO that blocks, a device, or a link out of the directory.
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(vm, &path)(e)),
        };
        if !file.metadata().map_err(self.io(vm, &path))?.is_file() {
            return Err(ClaimError::Corrupt { vm: vm.to_owned(), path, reason: "not a regular file".into() });
        }
        let mut text = String::new();
        file.take(MAX_CLAIM_FILE + 1).read_to_string(&mut text).map_err(|e| ClaimError::Corrupt {
            vm: vm.to_owned(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        parse(&text).map(Some).map_err(|reason| ClaimError::Corrupt { vm: vm.to_owned(), path, reason })
    }

    /// Asks for `vm` as coordinator `me` in `mode`: the claim held afterwards.
    pub fn claim(&self, vm: &str, me: &str, mode: ClaimMode) -> Result<Owner, ClaimError> {
        self.update(vm, |now| ownership::claim(vm, now, me, mode).map(Some))
    }

    /// Decides a job of `me` naming `epoch` on `vm`: acquires the VM when `epoch` is 0 or it
    /// carries no claim, checks the claim otherwise. The claim under which the job runs.
    pub fn for_job(&self, vm: &str, me: &str, epoch: u64) -> Result<Owner, ClaimError> {
        #[cfg(feature = "broken-builds")]
        if self.ignore_claims && epoch > 0 {
            return Ok(self.read(vm)?.unwrap_or(Owner { coordinator: me.to_owned(), epoch }));
        }
        if epoch > 0 {
            // The common case needs no lock: the claim either names this job's epoch or not.
            if let Some(now) = self.read(vm)? {
                ownership::admit(vm, Some(&now), me, epoch)?;
                return Ok(now);
            }
        }
        self.update(vm, |now| ownership::for_job(vm, now, me, epoch))
    }

    /// Reads the claim under the VM's lock, asks `decide` for the claim to write (`None`: keep
    /// it), writes it durably, and returns the claim held afterwards.
    fn update(
        &self,
        vm: &str,
        decide: impl FnOnce(Option<&Owner>) -> Result<Option<Owner>, ClaimRefusal>,
    ) -> Result<Owner, ClaimError> {
        valid_vm(vm)?;
        std::fs::create_dir_all(&self.dir).map_err(self.io(vm, &self.dir))?;
        let lock_path = self.dir.join(format!("{vm}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&lock_path)
            .map_err(self.io(vm, &lock_path))?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(ClaimError::Busy { vm: vm.to_owned(), path: lock_path })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(self.io(vm, &lock_path)(e)),
            }
        }
        // The lock is released when `lock` is dropped, on every path out of here.
        let now = self.read(vm)?;
        let next = decide(now.as_ref())?;
        match next {
            Some(next) if now.as_ref() != Some(&next) => {
                if let Some(old) = &now {
                    // Our own invariant: a claim's epoch never goes down.
                    assert!(next.epoch >= old.epoch, "claim of {vm}: epoch {} -> {}", old.epoch, next.epoch);
                }
                self.write(vm, &next)?;
                Ok(next)
            }
            Some(same) => Ok(same),
            None => now.ok_or_else(|| ClaimError::Corrupt {
                vm: vm.to_owned(),
                path: self.path(vm),
                reason: "internal: a job was admitted without a claim".into(),
            }),
        }
    }

    fn write(&self, vm: &str, owner: &Owner) -> Result<(), ClaimError> {
        let path = self.path(vm);
        // A name of our own, created new: never a file (or link) someone left there.
        let tmp = self.dir.join(format!(".{vm}.claim.{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
        let text = format!("{MAGIC}\ncoordinator {}\nepoch {}\n", owner.coordinator, owner.epoch);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(self.io(vm, &tmp))?;
        let written =
            f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io(vm, &path)(e));
        }
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(self.io(vm, &self.dir))
    }
}

fn valid_vm(vm: &str) -> Result<(), ClaimError> {
    bulwark_protocol::VmId::new(vm).map(|_| ()).map_err(|e| ClaimError::Corrupt {
        vm: vm.chars().take(64).collect(),
        path: PathBuf::new(),
        reason: e.to_string(),
    })
}

fn parse(text: &str) -> Result<Owner, String> {
    if text.len() as u64 > MAX_CLAIM_FILE {
        return Err(format!("longer than {MAX_CLAIM_FILE} bytes"));
    }
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("it does not start with {MAGIC:?}"));
    }
    let coordinator = lines
        .next()
        .and_then(|l| l.strip_prefix("coordinator "))
        .filter(|c| !c.is_empty() && c.len() <= MAX_OWNER_NAME && !c.chars().any(char::is_control))
        .ok_or("no valid coordinator line")?;
    let epoch = lines
        .next()
        .and_then(|l| l.strip_prefix("epoch "))
        .and_then(|e| e.parse::<u64>().ok())
        .filter(|e| *e > 0)
        .ok_or("no valid epoch line")?;
    if lines.any(|l| !l.is_empty()) {
        return Err("unexpected lines after the epoch".into());
    }
    Ok(Owner { coordinator: coordinator.to_owned(), epoch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_persist_take_overs_supersede_and_stale_jobs_are_refused() -> Result<(), ClaimError> {
        let dir =
            tempfile::tempdir().map_err(|e| ClaimError::Io { vm: "-".into(), path: PathBuf::new(), source: e })?;
        let claims = Claims::new(dir.path().join("claims"));
        assert_eq!(claims.read("web")?, None);
        let a = claims.for_job("web", "a", 0)?;
        assert_eq!(a, Owner { coordinator: "a".into(), epoch: 1 });
        // Another view of the same directory (another node) sees it.
        let other = Claims::new(dir.path().join("claims"));
        assert_eq!(other.read("web")?, Some(a.clone()));
        assert!(matches!(
            other.claim("web", "b", ClaimMode::Acquire),
            Err(ClaimError::Refused(ClaimRefusal::OwnedBy { .. }))
        ));
        let b = other.claim("web", "b", ClaimMode::TakeOver)?;
        assert_eq!(b.epoch, 2);
        assert!(matches!(claims.for_job("web", "a", 1), Err(ClaimError::Refused(ClaimRefusal::Stale { .. }))));
        assert_eq!(claims.for_job("web", "b", 2)?, b);
        Ok(())
    }

    #[test]
    fn a_damaged_claim_refuses_jobs_and_is_never_read_as_unclaimed() -> Result<(), ClaimError> {
        let dir =
            tempfile::tempdir().map_err(|e| ClaimError::Io { vm: "-".into(), path: PathBuf::new(), source: e })?;
        let claims = Claims::new(dir.path());
        for text in [
            "".to_owned(),
            "bulwark-claim 1\ncoordinator a\nepoch 0\n".to_owned(),
            "bulwark-claim 1\ncoordinator \nepoch 3\n".to_owned(),
            "bulwark-claim 1\ncoordinator a\nepoch 3\nmore\n".to_owned(),
            format!("bulwark-claim 1\ncoordinator {}\nepoch 3\n", "x".repeat(2000)),
        ] {
            std::fs::write(dir.path().join("web.claim"), &text).map_err(|e| ClaimError::Io {
                vm: "web".into(),
                path: PathBuf::new(),
                source: e,
            })?;
            assert!(matches!(claims.for_job("web", "a", 0), Err(ClaimError::Corrupt { .. })), "{text:?}");
            assert!(matches!(claims.for_job("web", "a", 3), Err(ClaimError::Corrupt { .. })), "{text:?}");
        }
        // A name that is no VM id never reaches the file system.
        assert!(matches!(claims.read("../etc/passwd"), Err(ClaimError::Corrupt { .. })));
        // A FIFO never blocks a reader, and a link out of the directory is not followed.
        let io = |e| ClaimError::Io { vm: "-".into(), path: PathBuf::new(), source: e };
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo.claim"),
            rustix::fs::FileType::Fifo,
            0o600.into(),
            0,
        )
        .map_err(|e| io(e.into()))?;
        assert!(matches!(claims.for_job("fifo", "a", 3), Err(ClaimError::Corrupt { .. })));
        std::fs::write(dir.path().join("elsewhere"), "bulwark-claim 1\ncoordinator a\nepoch 3\n").map_err(io)?;
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("link.claim")).map_err(io)?;
        assert!(claims.for_job("link", "a", 3).is_err(), "a link is not followed");
        Ok(())
    }

    #[test]
    fn a_vanished_claim_is_taken_again_under_the_epoch_the_job_names() -> Result<(), ClaimError> {
        let dir =
            tempfile::tempdir().map_err(|e| ClaimError::Io { vm: "-".into(), path: PathBuf::new(), source: e })?;
        let claims = Claims::new(dir.path());
        assert_eq!(claims.for_job("web", "a", 4)?, Owner { coordinator: "a".into(), epoch: 4 });
        assert_eq!(claims.read("web")?, Some(Owner { coordinator: "a".into(), epoch: 4 }));
        assert!(matches!(claims.for_job("web", "b", 4), Err(ClaimError::Refused(ClaimRefusal::OwnedBy { .. }))));
        Ok(())
    }

    #[test]
    fn two_nodes_racing_for_an_unclaimed_vm_give_it_to_exactly_one() {
        for round in 0..20 {
            let Ok(dir) = tempfile::tempdir() else { panic!("tempdir") };
            let vm = format!("vm{round}");
            let winners: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ["a", "b", "c", "d"]
                    .into_iter()
                    .map(|me| {
                        let (claims, vm) = (Claims::new(dir.path()), vm.clone());
                        s.spawn(move || claims.claim(&vm, me, ClaimMode::Acquire).ok().map(|o| o.coordinator == me))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().ok().flatten()).collect()
            });
            assert_eq!(winners.iter().filter(|w| **w == Some(true)).count(), 1, "{winners:?}");
        }
    }
}
