//! The QEMU backend's benchmark: the same random disk protected twice, once as a sim VM and
//! once as a qcow2 disk of a real QEMU VM (TCG, no guest OS) read over NBD, and copied out by
//! `qemu-img convert` as the peer. Initial replica and an express full after 1 % churn.

use crate::cluster::Cluster;
use crate::report::BenchResult;
use anyhow::{bail, Context};
use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::launch;
use bulwark_agent::qemu::qmp::Qmp;
use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use bulwark_protocol::messages::{BackupKind, JobInfo};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// What the QEMU benchmark measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QemuFigures {
    pub disk_bytes: u64,
    /// `qemu-img convert -O raw` of the qcow2 (then fsynced), cold cache.
    pub convert_seconds: f64,
    pub convert_bps: f64,
    pub qemu_initial_seconds: f64,
    pub qemu_initial_bps: f64,
    pub sim_initial_seconds: f64,
    pub sim_initial_bps: f64,
    pub churn_bytes: u64,
    pub qemu_incremental_seconds: f64,
    pub qemu_incremental_read: u64,
    pub sim_incremental_seconds: f64,
    pub sim_incremental_read: u64,
}

/// A QEMU process killed on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9)
}

fn row(tool: &str, scenario: &str, size: u64, seconds: f64, job: Option<&JobInfo>, churn: u64) -> BenchResult {
    BenchResult {
        tool: tool.into(),
        scenario: scenario.into(),
        size_bytes: size,
        churn_percent: if churn > 0 { 1.0 } else { 0.0 },
        churn_bytes: churn,
        seconds,
        bytes_read: job.map_or(size, |j| j.bytes_scanned),
        bytes_sent: job.map_or(0, |j| j.bytes_transferred),
        bytes_stored: 0,
        churn: (churn > 0).then(|| "1%".to_owned()),
    }
}

/// Starts QEMU as the definition `def` expects, and waits for its monitor.
fn start_qemu(def: &Path) -> anyhow::Result<Qemu> {
    let def = VmDef::load(def)?;
    let _ = std::fs::remove_file(&def.qmp);
    let child = launch::headless(&def, "tcg", 64)
        .spawn()
        .context("cannot run qemu-system-x86_64 (apt-get install qemu-system-x86 from bookworm-backports)")?;
    let q = Qemu(child);
    launch::wait_for_qmp(&def.qmp, Duration::from_secs(30)).context("QEMU's monitor never answered")?;
    Ok(q)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs the benchmark on a `size`-byte random disk in `work`.
pub fn run_bench(work: &Path, size: u64) -> anyhow::Result<(QemuFigures, Vec<BenchResult>)> {
    let mut f = QemuFigures { disk_bytes: size, ..QemuFigures::default() };
    let mut rows = vec![];
    let qdir = work.join("qemu");
    std::fs::create_dir_all(qdir.join("vms"))?;
    let qcow2 = qdir.join("bench.qcow2");

    // The sim run; its random image becomes the QEMU VM's qcow2 before any churn.
    {
        let cluster = Cluster::start(&work.join("sim-run"), false)?;
        let req = CreateVm {
            os: "linux".into(),
            random_fill: true,
            seed: 42,
            ..CreateVm::new("bench", "node1", vec![DiskConfig { name: "os".into(), size }])
        };
        cluster.create_vm(&req)?;
        let image = sim::Vm::open(&cluster.sim_root, "bench")?.image("os");
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&image).arg(&qcow2))?;
        cluster.protect("bench")?;
        eprintln!("qemu: sim initial replica of {}", bulwark_protocol::units::format_size(size));
        crate::limits::drop_caches();
        let (job, secs) = cluster.backup("bench", BackupKind::ExpressFull)?;
        (f.sim_initial_seconds, f.sim_initial_bps) = (secs, bps(size, secs));
        rows.push(row("bulwark-sim", "qemu-initial", size, secs, Some(&job), 0));
        f.churn_bytes = sim::churn(&cluster.sim_root, "bench", 1.0, 7)?;
        crate::limits::drop_caches();
        let (job, secs) = cluster.backup("bench", BackupKind::ExpressFull)?;
        (f.sim_incremental_seconds, f.sim_incremental_read) = (secs, job.bytes_scanned);
        rows.push(row("bulwark-sim", "qemu-incremental", size, secs, Some(&job), f.churn_bytes));
        cluster.stop();
    }
    std::fs::remove_dir_all(work.join("sim-run"))?;

    // The peer: qemu-img convert of the same qcow2 to a raw file, made durable.
    eprintln!("qemu: qemu-img convert of the qcow2");
    let out = qdir.join("convert.raw");
    crate::limits::drop_caches();
    let t = Instant::now();
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&qcow2).arg(&out))?;
    std::fs::File::open(&out)?.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    (f.convert_seconds, f.convert_bps) = (secs, bps(size, secs));
    rows.push(row("qemu-img convert", "qemu-initial", size, secs, None, 0));
    std::fs::remove_file(&out)?;

    // The QEMU run: the same data in a running VM, read through fleecing and NBD.
    let qmp = qdir.join("bench.qmp");
    let def = format!(
        "name = \"bench\"\nqmp = \"{}\"\nos = \"linux\"\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"{}\"\nformat = \"qcow2\"\n",
        qmp.display(),
        qcow2.display()
    );
    std::fs::write(qdir.join("vms/bench.toml"), def)?;
    let _qemu = start_qemu(&qdir.join("vms/bench.toml"))?;
    let cluster = Cluster::start_qemu(&work.join("q-run"), false, &qdir.join("vms"))?;
    cluster.wait_vm("bench")?;
    cluster.protect("bench")?;
    eprintln!("qemu: QEMU initial replica over NBD");
    crate::limits::drop_caches();
    let (job, secs) = cluster.backup("bench", BackupKind::ExpressFull)?;
    (f.qemu_initial_seconds, f.qemu_initial_bps) = (secs, bps(size, secs));
    rows.push(row("bulwark-qemu", "qemu-initial", size, secs, Some(&job), 0));
    // 1 % churn through the guest device: random 1 MiB blocks rewritten.
    let blocks = size.div_ceil(1 << 20);
    let n = (blocks as f64 / 100.0).round().max(1.0) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut chosen: Vec<u64> =
        rand::seq::index::sample(&mut rng, blocks as usize, n).into_iter().map(|b| b as u64).collect();
    chosen.sort_unstable();
    let mut q = Qmp::connect(&qmp, Duration::from_secs(30))?;
    for b in &chosen {
        let pattern: u8 = rng.gen_range(1..=255);
        let said = q.hmp(&format!(
            "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern} {} {}\"",
            b << 20,
            1u64 << 20
        ))?;
        if !said.trim().is_empty() {
            bail!("qemu-io: {said}");
        }
    }
    drop(q);
    crate::limits::drop_caches();
    let (job, secs) = cluster.backup("bench", BackupKind::ExpressFull)?;
    (f.qemu_incremental_seconds, f.qemu_incremental_read) = (secs, job.bytes_scanned);
    rows.push(row("bulwark-qemu", "qemu-incremental", size, secs, Some(&job), (n as u64) << 20));
    cluster.stop();
    Ok((f, rows))
}
