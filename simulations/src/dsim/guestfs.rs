//! A guest file system for the simulation's item recoveries: the first VM's disk holds a FAT
//! volume whose files its guest keeps rewriting (that VM's churn). The guest works through
//! fatfs over the sim's own guest reads and writes — reads as fatfs asks, writes gathered by
//! 4 KiB page and handed to the sim as guest writes when the change is done — so the tracking,
//! snapshots and ground truth see a guest that changes files, not random blocks.

use bulwark_agent::sim::Vm;
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

const PAGE: u64 = 4096;
/// Files the volume holds at most (the guest creates and deletes them).
const MAX_FILES: usize = 12;
/// Directory levels the checks walk at most.
const MAX_DEPTH: usize = 8;

/// Read-through, write-back access to one disk of a VM for fatfs: the pages one change
/// touches are read once (fatfs reads directory entries 32 bytes at a time).
struct GuestIo<'a> {
    vm: &'a mut Vm,
    disk: &'a str,
    size: u64,
    pos: u64,
    pages: BTreeMap<u64, Vec<u8>>,
    dirty: std::collections::BTreeSet<u64>,
}

impl<'a> GuestIo<'a> {
    fn new(vm: &'a mut Vm, disk: &'a str) -> Self {
        let size = vm.config.disks.iter().find(|d| d.name == disk).map_or(0, |d| d.size);
        Self { vm, disk, size, pos: 0, pages: BTreeMap::new(), dirty: Default::default() }
    }

    fn page(&mut self, p: u64) -> io::Result<&mut Vec<u8>> {
        if !self.pages.contains_key(&p) {
            let start = p * PAGE;
            let mut buf = vec![0u8; PAGE.min(self.size - start) as usize];
            self.vm.guest_read(self.disk, start, &mut buf).map_err(io::Error::other)?;
            self.pages.insert(p, buf);
        }
        self.pages.get_mut(&p).ok_or_else(|| io::Error::other("page cache"))
    }

    /// Writes the changed pages to the VM, runs of neighbours as one guest write.
    fn write_back(mut self) -> io::Result<()> {
        let mut run: Option<(u64, Vec<u8>)> = None;
        let dirty = std::mem::take(&mut self.dirty);
        for p in dirty {
            let bytes = self.pages.remove(&p).unwrap_or_default();
            match &mut run {
                Some((start, data)) if *start + data.len() as u64 == p * PAGE => data.extend_from_slice(&bytes),
                _ => {
                    if let Some((start, data)) = run.take() {
                        self.vm.guest_write(self.disk, start, &data).map_err(io::Error::other)?;
                    }
                    run = Some((p * PAGE, bytes));
                }
            }
        }
        if let Some((start, data)) = run {
            self.vm.guest_write(self.disk, start, &data).map_err(io::Error::other)?;
        }
        Ok(())
    }
}

impl Read for GuestIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let (p, pos) = (self.pos / PAGE, self.pos);
        let page = self.page(p)?;
        let at = (pos - p * PAGE) as usize;
        let n = buf.len().min(page.len() - at);
        buf[..n].copy_from_slice(&page[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for GuestIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos >= self.size {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "past the end of the disk"));
        }
        let (p, pos) = (self.pos / PAGE, self.pos);
        let page = self.page(p)?;
        let at = (pos - p * PAGE) as usize;
        let n = buf.len().min(page.len() - at);
        page[at..at + n].copy_from_slice(&buf[..n]);
        self.dirty.insert(p);
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for GuestIo<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// A file's new contents: at most a 40th of the volume, so `MAX_FILES` of them never fill it.
fn content(rng: &mut StdRng, volume: u64) -> Vec<u8> {
    let len = rng.gen_range(0..(volume / 40).clamp(4096, 160 * 1024) as usize);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    // Now and then a run of zeros: the writer leaves holes there.
    if len > 16 * 1024 && rng.gen_bool(0.3) {
        let at = rng.gen_range(0..len - 8192);
        data[at..at + 8192].fill(0);
    }
    data
}

fn err(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("guest file system: {what}: {e}")
}

/// Formats `disk` of `vm` as one FAT volume with a few files, as its guest would.
pub fn create(vm: &mut Vm, disk: &str, rng: &mut StdRng) -> Result<(), String> {
    let mut io = GuestIo::new(vm, disk);
    let volume = io.size;
    fatfs::format_volume(&mut io, fatfs::FormatVolumeOptions::new()).map_err(err("format"))?;
    {
        let fs = fatfs::FileSystem::new(&mut io, fatfs::FsOptions::new()).map_err(err("mount"))?;
        {
            let root = fs.root_dir();
            root.create_dir("docs").map_err(err("mkdir"))?;
            for name in ["docs/readme.txt", "docs/report.bin", "data.bin", "notes.txt"] {
                let mut f = root.create_file(name).map_err(err("create"))?;
                f.write_all(&content(rng, volume)).map_err(err("write"))?;
            }
        }
        fs.unmount().map_err(err("unmount"))?;
    }
    io.write_back().map_err(err("write back"))
}

/// One change of the guest's files: a file rewritten, created or deleted.
pub fn churn(vm: &mut Vm, disk: &str, rng: &mut StdRng) -> Result<(), String> {
    let mut io = GuestIo::new(vm, disk);
    let volume = io.size;
    {
        let fs = fatfs::FileSystem::new(&mut io, fatfs::FsOptions::new()).map_err(err("mount"))?;
        change(&fs, rng, volume)?;
        fs.unmount().map_err(err("unmount"))?;
    }
    io.write_back().map_err(err("write back"))
}

/// The change itself: a file deleted, created or rewritten.
fn change<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, rng: &mut StdRng, volume: u64) -> Result<(), String> {
    {
        let root = fs.root_dir();
        let mut names = vec![];
        for dir in ["", "docs/"] {
            let d = if dir.is_empty() { root.clone() } else { root.open_dir("docs").map_err(err("open"))? };
            for e in d.iter() {
                let e = e.map_err(err("list"))?;
                if e.is_file() {
                    names.push(format!("{dir}{}", e.file_name()));
                }
            }
        }
        let roll = rng.gen_range(0..100);
        if roll < 15 && names.len() > 2 {
            let victim = &names[rng.gen_range(0..names.len())];
            root.remove(victim).map_err(err("delete"))?;
        } else if roll < 40 && names.len() < MAX_FILES {
            let dir = if rng.gen_bool(0.5) { "" } else { "docs/" };
            let name = format!("{dir}f{}.bin", rng.gen_range(0..1000));
            if !names.contains(&name) {
                let mut f = root.create_file(&name).map_err(err("create"))?;
                f.write_all(&content(rng, volume)).map_err(err("write"))?;
            }
        } else if !names.is_empty() {
            let name = &names[rng.gen_range(0..names.len())];
            let mut f = root.open_file(name).map_err(err("open"))?;
            f.truncate().map_err(err("truncate"))?;
            f.write_all(&content(rng, volume)).map_err(err("write"))?;
        }
    }
    Ok(())
}

/// Every file of the FAT volume in `image`, by path, with its bytes (read with fatfs itself,
/// not through Bulwark's walker).
pub fn files_of(image: Vec<u8>) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let fs = fatfs::FileSystem::new(io::Cursor::new(image), fatfs::FsOptions::new()).map_err(err("mount"))?;
    let mut out = BTreeMap::new();
    let mut dirs = vec![(String::new(), fs.root_dir(), 0usize)];
    while let Some((prefix, dir, depth)) = dirs.pop() {
        for e in dir.iter() {
            let e = e.map_err(err("list"))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}/{name}");
            if e.is_dir() && depth < MAX_DEPTH {
                dirs.push((path, e.to_dir(), depth + 1));
            } else if e.is_file() {
                let mut data = vec![];
                e.to_file().read_to_end(&mut data).map_err(err("read"))?;
                out.insert(path, data);
            }
        }
    }
    Ok(out)
}

/// Every file under `dir` (a recovery's destination), by path, with its bytes.
pub fn files_under(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![(String::new(), dir.to_owned(), 0usize)];
    while let Some((prefix, d, depth)) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", d.display()))?;
            let path = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let kind = e.file_type().map_err(|e| format!("{path}: {e}"))?;
            if kind.is_dir() && depth < MAX_DEPTH {
                dirs.push((path, e.path(), depth + 1));
            } else if kind.is_file() {
                out.insert(path, std::fs::read(e.path()).map_err(|e| format!("{}: {e}", e))?);
            } else {
                out.insert(path, b"(not a file)".to_vec());
            }
        }
    }
    Ok(out)
}
