//! The tools a user would pick instead — restic and borg from Debian — run as their users run
//! them: each backs up a directory holding the disk image into a local, encrypted repository
//! (restic always encrypts; borg with `repokey-blake2`), with its own cache under the work
//! directory. The directory also holds a small sibling file written just before each run, as a
//! real directory would: borg never caches the newest file of a run, and a lone image would be
//! re-read even when unchanged.

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A peer tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Restic,
    Borg,
}

impl Peer {
    /// Parses `restic` or `borg`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "restic" => Ok(Peer::Restic),
            "borg" => Ok(Peer::Borg),
            other => bail!("unknown peer {other:?} (known: restic, borg)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Peer::Restic => "restic",
            Peer::Borg => "borg",
        }
    }

    fn program(self) -> &'static str {
        self.name()
    }

    fn package(self) -> &'static str {
        match self {
            Peer::Restic => "restic",
            Peer::Borg => "borgbackup",
        }
    }

    /// The tool's version line; installs it from Debian first when it is missing and we may.
    pub fn ensure_installed(self) -> anyhow::Result<String> {
        if let Ok(v) = version(self) {
            return Ok(v);
        }
        eprintln!("{} is missing: installing Debian's {}", self.name(), self.package());
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", self.package()])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // A fresh machine may not have the package lists yet.
            let _ = Command::new("apt-get").args(["update", "-qq"]).stdout(Stdio::null()).status();
            let status = Command::new("apt-get")
                .args(["install", "-y", "-qq", self.package()])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .with_context(|| format!("cannot run apt-get to install {}", self.package()))?;
            anyhow::ensure!(
                status.success(),
                "apt-get install {} failed (install it, or leave it out with --peers)",
                self.package()
            );
        }
        version(self)
    }
}

fn version(peer: Peer) -> anyhow::Result<String> {
    let out = Command::new(peer.program()).arg(if peer == Peer::Restic { "version" } else { "--version" }).output()?;
    anyhow::ensure!(out.status.success(), "{} --version failed", peer.name());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What one run of a peer measured.
#[derive(Debug, Clone, Default)]
pub struct PeerRun {
    pub seconds: f64,
    /// Bytes the tool read (as it reports them).
    pub bytes_read: u64,
    /// How much the repository grew on disk.
    pub bytes_stored: u64,
}

/// A peer's repository and the directory it backs up.
pub struct PeerRepo {
    pub peer: Peer,
    repo: PathBuf,
    source: PathBuf,
    home: PathBuf,
    runs: u32,
}

impl PeerRepo {
    /// A new repository under `work` for backing up `image` (hard-linked into the source
    /// directory, so the peer reads the very file the hypervisor writes).
    pub fn create(peer: Peer, work: &Path, image: &Path) -> anyhow::Result<Self> {
        let base = work.join(peer.name());
        let source = base.join("data");
        let home = base.join("home");
        std::fs::create_dir_all(&source)?;
        std::fs::create_dir_all(&home)?;
        let name = image.file_name().context("image path has no file name")?;
        std::fs::hard_link(image, source.join(name))
            .with_context(|| format!("cannot link {} into {}", image.display(), source.display()))?;
        let repo = base.join("repo");
        let r = Self { peer, repo, source, home, runs: 0 };
        let mut init = r.command();
        match peer {
            Peer::Restic => init.arg("init").arg("--repo").arg(&r.repo),
            Peer::Borg => init.args(["init", "--encryption=repokey-blake2"]).arg(&r.repo),
        };
        run_quiet(&mut init, "init")?;
        Ok(r)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(self.peer.program());
        c.env("RESTIC_PASSWORD", "bulwark-bench")
            .env("RESTIC_CACHE_DIR", self.home.join("restic-cache"))
            .env("BORG_PASSPHRASE", "bulwark-bench")
            .env("BORG_BASE_DIR", &self.home)
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("HOME", &self.home);
        c
    }

    /// One backup of the source directory, timed from a cold page cache where we may drop it.
    pub fn backup(&mut self) -> anyhow::Result<PeerRun> {
        self.runs += 1;
        // The newest file of the run is a small sibling, never the image.
        std::fs::write(self.source.join("newer.txt"), format!("run {}\n", self.runs))?;
        let before = bulwark_coordinator::server::admin::dir_size(&self.repo);
        crate::limits::drop_caches();
        let mut c = self.command();
        match self.peer {
            Peer::Restic => c.arg("backup").arg("--json").arg("--repo").arg(&self.repo).arg(&self.source),
            Peer::Borg => {
                c.args(["create", "--json"]).arg(format!("{}::run{}", self.repo.display(), self.runs)).arg(&self.source)
            }
        };
        let t = Instant::now();
        let out = c.stderr(Stdio::piped()).stdout(Stdio::piped()).output()?;
        let seconds = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{} backup failed: {}", self.peer.name(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bytes_read = match self.peer {
            Peer::Restic => stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message_type"] == "summary")
                .and_then(|v| v["total_bytes_processed"].as_u64()),
            Peer::Borg => serde_json::from_str::<serde_json::Value>(&stdout)
                .ok()
                .and_then(|v| v["archive"]["stats"]["original_size"].as_u64()),
        }
        .with_context(|| format!("{} printed no summary: {stdout}", self.peer.name()))?;
        Ok(PeerRun {
            seconds,
            bytes_read,
            bytes_stored: bulwark_coordinator::server::admin::dir_size(&self.repo).saturating_sub(before),
        })
    }
}

impl PeerRepo {
    /// Restores the newest backup into the empty directory `dest`, timed from a cold page
    /// cache until the restored data is on disk (`sync`, as Bulwark's restore ends with an
    /// fsync); answers the run and the restored image's path.
    pub fn restore(&self, dest: &Path, image_name: &str) -> anyhow::Result<(PeerRun, PathBuf)> {
        std::fs::create_dir_all(dest)?;
        crate::limits::drop_caches();
        let mut c = self.command();
        match self.peer {
            Peer::Restic => c.args(["restore", "latest", "--target"]).arg(dest).arg("--repo").arg(&self.repo),
            Peer::Borg => c.arg("extract").arg(format!("{}::run{}", self.repo.display(), self.runs)).current_dir(dest),
        };
        let t = Instant::now();
        let out = c.stderr(Stdio::piped()).stdout(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("{} restore failed: {}", self.peer.name(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let synced = Command::new("sync").arg("-f").arg(dest).status()?;
        let seconds = t.elapsed().as_secs_f64();
        anyhow::ensure!(synced.success(), "sync -f {} failed", dest.display());
        // Both keep the source's path under the target (borg without its leading slash).
        let rel = self.source.strip_prefix("/").unwrap_or(&self.source).join(image_name);
        let image = dest.join(rel);
        let bytes = std::fs::metadata(&image)
            .with_context(|| format!("{} restored no {}", self.peer.name(), image.display()))?
            .len();
        Ok((PeerRun { seconds, bytes_read: bytes, bytes_stored: 0 }, image))
    }
}

fn run_quiet(c: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = c.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
