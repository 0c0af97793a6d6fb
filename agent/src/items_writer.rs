//! Writing recovered items under a destination directory, treating every name and every mode
//! from the guest as hostile. Used by the console (`recover-items --output DIR`), the agent
//! (`--dest-host`) and the quickstart, so the same rules hold on every restoring host:
//! - **names**: each component is checked ([`safe_component`]); no existing symlink or file is
//!   followed or overwritten (directories are walked with `symlink_metadata`, files created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`); symlinks are restored as links, never followed. Nothing
//!   is written outside the destination.
//! - **modes**: as `tar` gives them to a non-owner ([`restored_mode`]): setuid, setgid and sticky
//!   bits dropped, the process umask applied, never world-writable — unless `keep_modes`.
//!   Everything belongs to the restoring user: guest uids are never applied.
//! - **holes**: runs of zeros in file data are not written (positioned writes, `set_len` at the
//!   end), so a sparse file takes about its allocated blocks again.
//! - **space**: each file's size is checked against the free space before it is created; a
//!   write error (`ENOSPC`, `EIO`, …) ends the restore with the system's own words.
//! - **durability**: one `syncfs` of the destination at the end, not an fsync per file, so a
//!   restore of many small files is linear in them.
//! - **one bad entry** (an unsafe name, a name that exists, a path that cannot be created) is
//!   skipped with a warning in [`Written::skipped`]; the rest is restored.

use anyhow::bail;
use bulwark_protocol::transfer::{self, safe_component, TransferFrame, TransferMessage};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// How items are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Keep the guest's permission bits as they are (setuid, setgid, sticky, world-writable).
    pub keep_modes: bool,
}

/// Skipped entries listed by name; beyond this many only the count grows.
pub const SKIPPED_LISTED: usize = 100;

/// What was written.
#[derive(Debug, Default)]
pub struct Written {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    /// Bytes of file data received (holes included).
    pub bytes: u64,
    /// Entries skipped, with the reason (the first [`SKIPPED_LISTED`]).
    pub skipped: Vec<String>,
    /// How many entries were skipped in all.
    pub skipped_count: u64,
}

impl Written {
    fn skip(&mut self, what: String) {
        tracing::warn!(entry = %what, "item skipped");
        self.skipped_count += 1;
        if self.skipped.len() < SKIPPED_LISTED {
            self.skipped.push(what);
        }
    }

    /// The skipped entries as lines, with a last line counting those not listed.
    pub fn skipped_lines(&self) -> Vec<String> {
        let mut lines = self.skipped.clone();
        let more = self.skipped_count.saturating_sub(self.skipped.len() as u64);
        if more > 0 {
            lines.push(format!("… and {more} more"));
        }
        lines
    }
}

/// The permission bits a restored entry gets. Without `keep`: what `tar` gives a non-owner —
/// no setuid, setgid or sticky bit, the umask applied, and never writable by others (a
/// world-writable directory from a guest would let any local user plant files in it). Owners
/// keep `rwx` on directories so their children can be written.
pub fn restored_mode(mode: u32, is_dir: bool, keep: bool, umask: u32) -> u32 {
    let bits = if keep { mode & 0o7777 } else { mode & 0o777 & !umask & !0o002 };
    if is_dir {
        bits | 0o700
    } else {
        bits
    }
}

/// The process umask (from `/proc/self/status`, which reads it without changing it); 022 when
/// it cannot be read.
pub fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .map_or(0o022, |m| m & 0o777)
}

/// Holes are found at this granularity (aligned to the file offset): a page, and the block
/// size of most file systems.
const HOLE_GRAIN: u64 = 4096;
static ZEROS: [u8; HOLE_GRAIN as usize] = [0; HOLE_GRAIN as usize];

/// The runs of `data` (which starts at file offset `at`) that hold something other than zeros,
/// as `(offset, bytes)`; all-zero grains are left out so they stay holes.
pub fn data_runs(at: u64, data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut runs: Vec<(u64, &[u8])> = vec![];
    let mut start: Option<usize> = None;
    let mut i = 0usize;
    while i < data.len() {
        // The grain ends at the next multiple of HOLE_GRAIN in file offsets.
        let off = at + i as u64;
        let len = (HOLE_GRAIN - off % HOLE_GRAIN).min((data.len() - i) as u64) as usize;
        let grain = &data[i..i + len];
        // Slice equality is a memcmp: fast even in debug builds, and a sparse file is mostly zeros.
        let zero = grain == &ZEROS[..len];
        match (zero, start) {
            (true, Some(s)) => {
                runs.push((at + s as u64, &data[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
        i += len;
    }
    if let Some(s) = start {
        runs.push((at + s as u64, &data[s..]));
    }
    runs
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether an I/O error is about the destination as a whole (so nothing further can be
/// written) rather than about one entry.
fn is_fatal(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS))
}

/// The error text of a failed write: the system's words, and for a full disk the phrase
/// operators and scripts look for.
fn write_error(e: &std::io::Error, what: &str, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        anyhow::anyhow!("no space left on the device: cannot {what} {}: {e}", path.display())
    } else {
        anyhow::anyhow!("cannot {what} {}: {e}", path.display())
    }
}

/// A step towards one entry that failed: either the entry is skipped, or the whole restore ends.
enum Refusal {
    Skip(String),
    Fatal(anyhow::Error),
}

fn refuse(e: std::io::Error, what: &str, path: &Path) -> Refusal {
    if is_fatal(&e) {
        Refusal::Fatal(write_error(&e, what, path))
    } else {
        Refusal::Skip(format!("{}: cannot {what}: {e}", path.display()))
    }
}

/// The directory `root/dirs…`, created (mode 0700 until the end) where missing; refuses
/// anything on the way that is not a real directory (a symlink a hostile entry planted, a
/// file). Answers the directory and whether its last component was created here.
fn safe_dirs(root: &Path, dirs: &[Vec<u8>]) -> Result<(PathBuf, bool), Refusal> {
    let mut cur = root.to_owned();
    let mut created = false;
    for c in dirs {
        cur.push(OsStr::from_bytes(c));
        created = false;
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Refusal::Skip(format!("{} exists and is not a directory", cur.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o700).create(&cur).map_err(|e| refuse(e, "create", &cur))?;
                created = true;
            }
            Err(e) => return Err(refuse(e, "inspect", &cur)),
        }
    }
    Ok((cur, created))
}

/// Sets a directory's mode and mtime through a descriptor (never following a link).
fn finish_dir(path: &Path, mode: u32, mtime: i64) -> std::io::Result<()> {
    let d = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(path)?;
    if let Ok(secs) = u64::try_from(mtime) {
        let _ = d.set_modified(UNIX_EPOCH + Duration::from_secs(secs));
    }
    d.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// A file being written.
struct OpenFile {
    file: File,
    path: PathBuf,
    size: u64,
    got: u64,
    mode: u32,
    mtime: i64,
}

/// The entry the next data frames belong to.
enum Current {
    Nothing,
    File(OpenFile),
    /// A skipped file: its data is read and dropped.
    Skipping,
}

/// The writer's state between frames.
struct Writer {
    root: PathBuf,
    opts: WriteOptions,
    umask: u32,
    out: Written,
    current: Current,
    /// Directories created here: their modes and mtimes are set at the end (deepest first).
    dirs: Vec<(PathBuf, u32, i64)>,
}

impl Writer {
    /// The next entry: created, or skipped with a warning; `Err` ends the restore.
    fn entry(
        &mut self,
        rel: &[Vec<u8>],
        kind: &str,
        mode: u32,
        mtime: i64,
        size: u64,
        target: Option<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.close()?;
        let r = match rel.iter().find(|c| !safe_component(c)) {
            Some(bad) => Err(Refusal::Skip(format!(
                "{:?}: unsafe name {:?}",
                String::from_utf8_lossy(&rel.join(&b'/')),
                String::from_utf8_lossy(bad)
            ))),
            None => self.create(rel, kind, mode, mtime, size, target),
        };
        self.current = match r {
            Ok(c) => c,
            Err(Refusal::Fatal(e)) => return Err(e),
            Err(Refusal::Skip(why)) => {
                self.out.skip(why);
                if kind == "file" {
                    Current::Skipping
                } else {
                    Current::Nothing
                }
            }
        };
        Ok(())
    }

    fn create(
        &mut self,
        rel: &[Vec<u8>],
        kind: &str,
        mode: u32,
        mtime: i64,
        size: u64,
        target: Option<Vec<u8>>,
    ) -> Result<Current, Refusal> {
        let Some((last, parents)) = rel.split_last() else {
            return Err(Refusal::Skip("an entry without a name".into()));
        };
        let (parent, _) = safe_dirs(&self.root, parents)?;
        let dest = parent.join(OsStr::from_bytes(last));
        match kind {
            "dir" => {
                let (_, created) = safe_dirs(&self.root, rel)?;
                if created {
                    self.dirs.push((dest, restored_mode(mode, true, self.opts.keep_modes, self.umask), mtime));
                }
                self.out.dirs += 1;
                Ok(Current::Nothing)
            }
            "file" => {
                if size > 0 {
                    let free = free_bytes(&parent).map_err(|e| refuse(e, "inspect", &parent))?;
                    if size > free {
                        return Err(Refusal::Fatal(anyhow::anyhow!(
                            "no space left on the device ({} needs {size} bytes, {free} free)",
                            dest.display()
                        )));
                    }
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(|e| refuse(e, "create", &dest))?;
                let mode = restored_mode(mode, false, self.opts.keep_modes, self.umask);
                Ok(Current::File(OpenFile { file, path: dest, size, got: 0, mode, mtime }))
            }
            "symlink" => {
                let t = target.unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&t), &dest).map_err(|e| refuse(e, "create", &dest))?;
                self.out.links += 1;
                Ok(Current::Nothing)
            }
            other => Err(Refusal::Skip(format!("{}: a {other} is not restored", dest.display()))),
        }
    }

    /// File data for the current entry; zero runs are left as holes.
    fn data(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.out.bytes += data.len() as u64;
        match &mut self.current {
            Current::File(f) => {
                let end = f.got.checked_add(data.len() as u64).filter(|&e| e <= f.size);
                let Some(end) = end else {
                    bail!("{}: more bytes arrived than its {} announced", f.path.display(), f.size);
                };
                for (at, run) in data_runs(f.got, data) {
                    f.file.write_all_at(run, at).map_err(|e| write_error(&e, "write", &f.path))?;
                }
                f.got = end;
                Ok(())
            }
            Current::Skipping => Ok(()),
            Current::Nothing => bail!("file data without a file"),
        }
    }

    /// Finishes the current file: its length (a trailing hole), data on disk, mode, mtime.
    fn close(&mut self) -> anyhow::Result<()> {
        let Current::File(f) = std::mem::replace(&mut self.current, Current::Nothing) else { return Ok(()) };
        if f.got != f.size {
            drop(f.file);
            let _ = std::fs::remove_file(&f.path);
            self.out.skip(format!("{}: {} bytes arrived, {} expected", f.path.display(), f.got, f.size));
            return Ok(());
        }
        // No fsync per file (40,000 small files would wait for 40,000 flushes): the whole
        // destination is synced once at the end ([`Writer::finish`]).
        f.file.set_len(f.size).map_err(|e| write_error(&e, "extend", &f.path))?;
        if let Ok(secs) = u64::try_from(f.mtime) {
            let _ = f.file.set_modified(UNIX_EPOCH + Duration::from_secs(secs));
        }
        f.file
            .set_permissions(std::fs::Permissions::from_mode(f.mode))
            .map_err(|e| write_error(&e, "chmod", &f.path))?;
        self.out.files += 1;
        Ok(())
    }

    /// Directories last, deepest first, so their children do not touch their mtimes again;
    /// then one `syncfs` of the destination's file system puts everything on disk (and reports
    /// a write that failed late, `EIO` or `ENOSPC` on a network or thin file system).
    fn finish(mut self) -> anyhow::Result<Written> {
        self.close()?;
        for (path, mode, mtime) in std::mem::take(&mut self.dirs).into_iter().rev() {
            if let Err(e) = finish_dir(&path, mode, mtime) {
                self.out.skip(format!("{}: cannot set its mode: {e}", path.display()));
            }
        }
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.root)
            .map_err(|e| write_error(&e, "open", &self.root))?;
        rustix::fs::syncfs(&root).map_err(|e| write_error(&e.into(), "write", &self.root))?;
        Ok(self.out)
    }
}

/// Reads item frames from `recv` and writes them under `root` (the console's `--output DIR`,
/// or an agent's `--dest DIR`). Used on both sides, so the same checks guard both.
/// The writer as a plain machine: fed the item stream's frames one by one (the agent's task
/// reads them off the wire; the simulation hands them over), then finished. `End` must count
/// the frames that came before it.
pub struct ItemsWriter(Writer, u64);

impl ItemsWriter {
    /// A writer into `root` (created when missing).
    pub fn new(root: &Path, opts: WriteOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| write_error(&e, "create", root))?;
        Ok(Self(
            Writer {
                root: root.to_owned(),
                opts,
                umask: process_umask(),
                out: Written::default(),
                current: Current::Nothing,
                dirs: vec![],
            },
            0,
        ))
    }

    /// One frame of the stream: `Ok(true)` at its end; an error ends the restore.
    pub fn feed(&mut self, frame: TransferFrame) -> anyhow::Result<bool> {
        match frame {
            TransferFrame::Message(TransferMessage::Item { rel, kind, mode, mtime, size, target }) => {
                self.0.entry(&rel, &kind, mode, mtime, size, target)?;
            }
            TransferFrame::Block { data, .. } => self.0.data(&data)?,
            TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) if blocks_sent == self.1 => {
                return Ok(true)
            }
            TransferFrame::Message(TransferMessage::End { blocks_sent, .. }) => {
                bail!("the coordinator says it sent {blocks_sent} frames, {} arrived", self.1)
            }
            TransferFrame::Message(TransferMessage::Failed { reason }) => bail!("the coordinator stopped: {reason}"),
            other => bail!("unexpected frame in the item stream: {other:?}"),
        }
        self.1 += 1;
        Ok(false)
    }

    /// After the end: directories get their modes, the destination is synced once.
    pub fn finish(self) -> anyhow::Result<Written> {
        self.0.finish()
    }
}

pub async fn write_items(
    recv: &mut (impl tokio::io::AsyncRead + Unpin),
    root: &Path,
    opts: WriteOptions,
) -> anyhow::Result<Written> {
    const BS: usize = 1 << 20;
    let mut w = ItemsWriter::new(root, opts)?;
    loop {
        let frame = transfer::read(recv, BS).await.map_err(|e| anyhow::anyhow!("the item stream broke off: {e}"))?;
        let Some(frame) = frame else { bail!("unexpected frame in the item stream: None") };
        if w.feed(frame)? {
            break;
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_must_count_every_frame_before_it() {
        let item = |name: &str| {
            TransferFrame::Message(TransferMessage::Item {
                rel: vec![name.as_bytes().to_vec()],
                kind: "file".into(),
                mode: 0o644,
                mtime: 0,
                size: 3,
                target: None,
            })
        };
        let data = TransferFrame::Block { index: 0, id: [0; 32], data: b"abc".to_vec() };
        let end = |n| TransferFrame::Message(TransferMessage::End { blocks_sent: n, bytes_read: 0 });
        let dir = tempfile::tempdir().unwrap();
        let mut w = ItemsWriter::new(&dir.path().join("a"), WriteOptions::default()).unwrap();
        assert!(!w.feed(item("f")).unwrap());
        assert!(!w.feed(data.clone()).unwrap());
        // A frame that went missing on the way (a sender that skipped one) is not a success.
        assert!(w.feed(end(3)).unwrap_err().to_string().contains("sent 3 frames, 2 arrived"));
        let mut w = ItemsWriter::new(&dir.path().join("b"), WriteOptions::default()).unwrap();
        assert!(!w.feed(item("f")).unwrap());
        assert!(!w.feed(data).unwrap());
        assert!(w.feed(end(2)).unwrap());
        assert_eq!(w.finish().unwrap().files, 1);
        assert_eq!(std::fs::read(dir.path().join("b/f")).unwrap(), b"abc");
    }

    #[test]
    fn modes_lose_setuid_setgid_sticky_and_world_write_unless_kept() {
        assert_eq!(restored_mode(0o4755, false, false, 0o022), 0o755, "setuid root binary");
        assert_eq!(restored_mode(0o2755, false, false, 0o022), 0o755, "setgid");
        assert_eq!(restored_mode(0o1777, true, false, 0o022), 0o755, "sticky world-writable /tmp");
        assert_eq!(restored_mode(0o666, false, false, 0), 0o664, "never world-writable, even with umask 0");
        assert_eq!(restored_mode(0o640, false, false, 0o077), 0o600, "the umask applies");
        assert_eq!(restored_mode(0o000, true, false, 0o022), 0o700, "owners can fill their directories");
        assert_eq!(restored_mode(0o4755, false, true, 0o022), 0o4755);
        assert_eq!(restored_mode(0o1777, true, true, 0o077), 0o1777);
        assert_eq!(restored_mode(0o170755, false, true, 0), 0o755, "file-type bits never pass");
    }

    #[test]
    fn zero_grains_are_holes_and_runs_keep_their_offsets() {
        let mut d = vec![0u8; 3 * 4096];
        d[5000] = 1;
        assert_eq!(data_runs(0, &d), vec![(4096, &d[4096..8192])]);
        assert!(data_runs(0, &[0u8; 10]).is_empty());
        assert_eq!(data_runs(0, &[1u8; 10]), vec![(0, &[1u8; 10][..])]);
        // Grains follow file offsets: data at offset 100 ends its first grain at 4096.
        let mut e = vec![0u8; 8192];
        e[0] = 7;
        e[8100] = 9;
        let runs = data_runs(100, &e);
        assert_eq!(runs, vec![(100, &e[..3996]), (8192, &e[8092..])]);
    }

    #[test]
    fn runs_cover_every_non_zero_byte() {
        use proptest::prelude::*;
        proptest!(|(at in 0u64..10_000, bytes in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..20_000))| {
            let mut rebuilt = vec![0u8; bytes.len()];
            for (off, run) in data_runs(at, &bytes) {
                let s = (off - at) as usize;
                rebuilt[s..s + run.len()].copy_from_slice(run);
            }
            prop_assert_eq!(rebuilt, bytes);
        });
    }

    #[test]
    fn the_umask_is_read_without_changing_it() {
        let m = process_umask();
        assert_eq!(m, process_umask());
        assert_eq!(m & !0o777, 0);
    }
}
