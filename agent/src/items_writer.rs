//! Writing recovered items under a destination directory, treating every name from the guest
//! as hostile: each component is checked ([`safe_component`]), no existing symlink or file is
//! ever followed or overwritten (directories are walked component by component with
//! `symlink_metadata`, files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`), and symlinks are
//! restored as links, never followed. Nothing is written outside the destination.

use anyhow::{bail, Context as _};
use bulwark_protocol::transfer::{self, safe_component, TransferFrame, TransferMessage};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// What was written.
#[derive(Debug, Default)]
pub struct Written {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    pub skipped: Vec<String>,
}

/// The directory `root/dirs…`, created where missing; refuses anything on the way that is not
/// a real directory (a symlink a hostile entry planted, a file).
fn safe_dirs(root: &Path, dirs: &[Vec<u8>]) -> anyhow::Result<PathBuf> {
    let mut cur = root.to_owned();
    for c in dirs {
        cur.push(OsStr::from_bytes(c));
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} exists and is not a directory: refusing to write through it", cur.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&cur).with_context(|| format!("cannot create {}", cur.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("{}", cur.display())),
        }
    }
    Ok(cur)
}

fn set_mtime(path: &Path, mtime: i64) {
    if let (Ok(f), Ok(secs)) = (File::open(path), u64::try_from(mtime)) {
        let _ = f.set_modified(UNIX_EPOCH + Duration::from_secs(secs));
    }
}

/// Reads item frames from `recv` and writes them under `root` (the console's `--output DIR`,
/// or an agent's `--dest DIR`). Used on both sides, so the same checks guard both.
pub async fn write_items(recv: &mut quinn::RecvStream, root: &Path) -> anyhow::Result<Written> {
    const BS: usize = 1 << 20;
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut out = Written::default();
    let mut file: Option<(File, PathBuf, u64, u64, u32, i64)> = None;
    let mut dirs: Vec<(PathBuf, u32, i64)> = vec![];
    let close = |f: Option<(File, PathBuf, u64, u64, u32, i64)>, out: &mut Written| -> anyhow::Result<()> {
        if let Some((mut file, path, want, got, mode, mtime)) = f {
            if want != got {
                bail!("{}: {got} bytes arrived, {want} expected", path.display());
            }
            file.flush()?;
            file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
            drop(file);
            set_mtime(&path, mtime);
            out.files += 1;
        }
        Ok(())
    };
    loop {
        let frame = transfer::read(recv, BS).await.map_err(|e| anyhow::anyhow!("the item stream broke off: {e}"))?;
        match frame {
            Some(TransferFrame::Message(TransferMessage::Item { rel, kind, mode, mtime, size, target })) => {
                close(file.take(), &mut out)?;
                let Some((last, parents)) = rel.split_last() else { bail!("an item without a name") };
                if let Some(bad) = rel.iter().find(|c| !safe_component(c)) {
                    out.skipped.push(format!(
                        "{:?} (unsafe name {:?})",
                        String::from_utf8_lossy(&rel.join(&b'/')),
                        String::from_utf8_lossy(bad)
                    ));
                    if kind == "file" {
                        bail!("refusing a file with an unsafe name: {}", String::from_utf8_lossy(bad));
                    }
                    continue;
                }
                let parent = safe_dirs(root, parents)?;
                let dest = parent.join(OsStr::from_bytes(last));
                match kind.as_str() {
                    "dir" => {
                        safe_dirs(root, &rel)?;
                        dirs.push((dest, mode, mtime));
                        out.dirs += 1;
                    }
                    "file" => {
                        let f = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .mode(0o600)
                            .open(&dest)
                            .with_context(|| format!("cannot create {} (it must not exist)", dest.display()))?;
                        file = Some((f, dest, size, 0, mode, mtime));
                    }
                    "symlink" => {
                        let t = target.unwrap_or_default();
                        std::os::unix::fs::symlink(OsStr::from_bytes(&t), &dest)
                            .with_context(|| format!("cannot create the link {}", dest.display()))?;
                        out.links += 1;
                    }
                    other => out.skipped.push(format!("{} ({other})", dest.display())),
                }
            }
            Some(TransferFrame::Block { data, .. }) => {
                let Some((f, path, _, got, _, _)) = file.as_mut() else { bail!("file data without a file") };
                f.write_all(&data).with_context(|| format!("cannot write {}", path.display()))?;
                *got += data.len() as u64;
                out.bytes += data.len() as u64;
            }
            Some(TransferFrame::Message(TransferMessage::End { .. })) => break,
            Some(TransferFrame::Message(TransferMessage::Failed { reason })) => {
                bail!("the coordinator stopped: {reason}")
            }
            other => bail!("unexpected frame in the item stream: {other:?}"),
        }
    }
    close(file.take(), &mut out)?;
    // Directories last, deepest first, so their children do not touch their mtimes again.
    for (path, mode, mtime) in dirs.into_iter().rev() {
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode((mode & 0o7777) | 0o700));
        set_mtime(&path, mtime);
    }
    Ok(out)
}
