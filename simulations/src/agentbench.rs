//! The agent's read path (issue: agent): the initial read of a random sim disk — snapshot,
//! every block read and given its id on every core — against `cat` of the same image and
//! BLAKE3 over it, each from a cold page cache when the machine lets us drop it.

use bulwark_agent::reader::read_blocks;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use bulwark_protocol::block::ChunkHasher;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReadFigures {
    pub disk_bytes: u64,
    pub cold_cache: bool,
    pub agent_read_bps: f64,
    pub cat_bps: f64,
    pub blake3_bps: f64,
    /// agent_read_bps / cat_bps
    pub vs_cat: f64,
    /// agent_read_bps / blake3_bps
    pub vs_blake3: f64,
}

/// Runs the comparison on a fresh random disk of `size` bytes under `dir`.
pub fn initial_read(dir: &Path, size: u64) -> anyhow::Result<ReadFigures> {
    let root = dir.join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 1,
        ..CreateVm::new("bench", "node1", vec![DiskConfig { name: "os".into(), size }])
    };
    sim::create_vm(&root, &req)?;
    let mut vm = Vm::open(&root, "bench")?;
    vm.take_snapshot("node1", 1)?;
    let (image, disk_size) = vm.snapshot_source("os")?;
    drop(vm);
    let mut f = ReadFigures { disk_bytes: size, ..ReadFigures::default() };

    f.cold_cache = crate::limits::drop_caches();
    let start = Instant::now();
    let hasher = ChunkHasher::plain();
    let mut sent = 0u64;
    read_blocks(&image, disk_size, 1 << 20, 0..disk_size.div_ceil(1 << 20), &hasher, |b| {
        sent += b.data.len() as u64;
        Ok(())
    })?;
    f.agent_read_bps = crate::limits::rate(size, start.elapsed());
    anyhow::ensure!(sent == size, "a random disk has no zero block: {sent} of {size} bytes came out");

    crate::limits::drop_caches();
    let start = Instant::now();
    let status = std::process::Command::new("cat").arg(&image).stdout(std::process::Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "cat failed");
    f.cat_bps = crate::limits::rate(size, start.elapsed());

    crate::limits::drop_caches();
    let start = Instant::now();
    let mut h = blake3::Hasher::new();
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&image)?);
    std::io::copy(&mut file, &mut h)?;
    std::hint::black_box(h.finalize());
    f.blake3_bps = crate::limits::rate(size, start.elapsed());

    f.vs_cat = f.agent_read_bps / f.cat_bps.max(1.0);
    f.vs_blake3 = f.agent_read_bps / f.blake3_bps.max(1.0);
    let mut vm = Vm::open(&root, "bench")?;
    vm.release_snapshot()?;
    Ok(f)
}
