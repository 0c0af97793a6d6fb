//! Protection benchmarks, Bulwark against restic and borg on the same data: for each disk size,
//! a seeded random image gets an initial full backup, then each churn in turn (seeded 1 MiB
//! blocks rewritten by the guest) and an incremental backup after each, then (Bulwark) a
//! consistency check. Bulwark runs as a real coordinator and agent on loopback; the peers back
//! up the very same image file. Every tool starts from its own fresh copy of the image, made
//! from the same seed and churned with the same seeds, so their inputs are byte-identical while
//! only one repository at a time takes disk space.

use crate::cluster::Cluster;
use crate::peers::{Peer, PeerRepo};
use crate::report::BenchResult;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power};
use bulwark_protocol::messages::{AdminRequest, BackupKind};
use bulwark_protocol::units::format_size;
use std::path::Path;

/// One churn between backups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Churn {
    /// This percentage of the disk's 1 MiB blocks.
    Percent(f64),
    /// This many bytes, in whole 1 MiB blocks, whatever the disk's size.
    Bytes(u64),
}

impl Churn {
    fn apply(self, root: &Path, vm: &str, seed: u64) -> anyhow::Result<u64> {
        Ok(match self {
            Churn::Percent(p) => sim::churn(root, vm, p, seed)?,
            Churn::Bytes(b) => sim::churn_bytes(root, vm, b, seed)?,
        })
    }

    /// (churn_percent, churn_bytes) of a report row, the bytes as really written.
    fn fields(self, written: u64, size: u64) -> (f64, u64) {
        (100.0 * written as f64 / size.max(1) as f64, written)
    }

    pub fn label(self) -> String {
        match self {
            Churn::Percent(p) => format!("{p}%"),
            Churn::Bytes(b) => format_size(b),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sizes: Vec<u64>,
    pub churns: Vec<Churn>,
    pub peers: Vec<Peer>,
    /// Run the incremental backups (else only the initial one).
    pub incremental: bool,
    /// Run Bulwark's consistency check at the end.
    pub cc: bool,
    /// Bulwark with an encrypted store, as restic and borg encrypt theirs.
    pub encrypt: bool,
}

const VM: &str = "bench";

/// The benchmark's VM: a running Linux guest with one seeded random disk, the same bytes for
/// every tool at a given size.
fn bench_vm(size: u64) -> CreateVm {
    CreateVm {
        os: "linux".into(),
        power: Power::Running,
        random_fill: true,
        seed: 0xB0_1A_4C ^ size,
        ..CreateVm::new(VM, "node1", vec![DiskConfig { name: "os".into(), size }])
    }
}

/// Initial copies of one VM whose `disks` disks share `size` (seeded random, the same bytes
/// each time): first one disk at a time, then all of them at once (`[jobs]
/// disks_in_parallel`, at most 8). `read_delay_ms` models storage whose latency, not the
/// CPU, bounds one reader (each block read from a snapshot takes that much longer). Rows
/// `initial NxK` (with `+Dms` for a delay): N disks, K at once.
pub fn parallel_disks(
    work: &Path,
    size: u64,
    disks: usize,
    read_delay_ms: u64,
    encrypt: bool,
) -> anyhow::Result<Vec<BenchResult>> {
    anyhow::ensure!((2..=8).contains(&disks), "disks: 2 to 8");
    let each = (size / disks as u64).max(1 << 20) & !((1 << 20) - 1);
    let mut rows = vec![];
    for at_once in [1, disks] {
        let dir = tempfile::tempdir_in(work)?;
        eprintln!("bulwark: {disks} random disks of {}, {at_once} at once", format_size(each));
        let vm = CreateVm {
            os: "linux".into(),
            power: Power::Running,
            random_fill: true,
            seed: 0xD15C ^ size,
            ..CreateVm::new(
                VM,
                "node1",
                (0..disks).map(|i| DiskConfig { name: format!("disk{i}"), size: each }).collect(),
            )
        };
        sim::create_vm(&dir.path().join("sim"), &vm)?;
        if read_delay_ms > 0 {
            let mut v = sim::Vm::open(&dir.path().join("sim"), VM)?;
            v.config.read_delay_ms = Some(read_delay_ms);
            v.save()?;
        }
        let cluster = Cluster::start_tuned(dir.path(), encrypt, &|c| c.jobs.disks_in_parallel = at_once)?;
        cluster.wait_vm(VM)?;
        cluster.protect(VM)?;
        crate::limits::drop_caches();
        let (job, seconds) = cluster.backup(VM, BackupKind::ExpressFull)?;
        anyhow::ensure!(job.kind == "initial", "the first backup ran as {}", job.kind);
        let delay = if read_delay_ms > 0 { format!("+{read_delay_ms}ms") } else { String::new() };
        let scenario = format!("initial {disks}x{at_once}{delay}");
        let mut r = row("bulwark", &scenario, each * disks as u64, (0.0, 0), seconds);
        r.bytes_read = job.bytes_scanned;
        r.bytes_sent = job.bytes_transferred;
        rows.push(r);
        cluster.stop();
    }
    Ok(rows)
}

fn churn_seed(i: usize) -> u64 {
    1000 + i as u64
}

/// Runs the plan in `work` (each size in its own directory, removed afterwards).
pub fn run(work: &Path, plan: &Plan) -> anyhow::Result<Vec<BenchResult>> {
    let mut rows = vec![];
    for &size in &plan.sizes {
        let dir = tempfile::tempdir_in(work)?;
        // One tool's image and repository on disk at a time.
        let ours = dir.path().join("bulwark");
        rows.extend(bulwark(&ours, size, plan)?);
        std::fs::remove_dir_all(&ours)?;
        for &peer in &plan.peers {
            let peer_dir = dir.path().join(peer.name());
            std::fs::create_dir_all(&peer_dir)?;
            rows.extend(peer_runs(&peer_dir, size, plan, peer)?);
            std::fs::remove_dir_all(&peer_dir)?;
        }
    }
    Ok(rows)
}

fn row(tool: &str, scenario: &str, size: u64, churn: (f64, u64), seconds: f64) -> BenchResult {
    BenchResult {
        tool: tool.into(),
        scenario: scenario.into(),
        size_bytes: size,
        churn_percent: churn.0,
        churn_bytes: churn.1,
        seconds,
        bytes_read: 0,
        bytes_sent: 0,
        bytes_stored: 0,
        churn: None,
    }
}

fn bulwark(dir: &Path, size: u64, plan: &Plan) -> anyhow::Result<Vec<BenchResult>> {
    let mut rows = vec![];
    // The image first: writing a large one takes longer than an idle admin connection lives.
    eprintln!("bulwark: a {} random disk", format_size(size));
    sim::create_vm(&dir.join("sim"), &bench_vm(size))?;
    let cluster = Cluster::start(dir, plan.encrypt)?;
    cluster.wait_vm(VM)?;
    cluster.protect(VM)?;
    let stored = |c: &Cluster| -> anyhow::Result<u64> {
        let (store, catalog) = c.store_bytes()?;
        Ok(store + catalog)
    };

    let before = stored(&cluster)?;
    crate::limits::drop_caches();
    eprintln!("bulwark: initial replica");
    let (job, seconds) = cluster.backup(VM, BackupKind::ExpressFull)?;
    anyhow::ensure!(job.kind == "initial", "the first backup ran as {}", job.kind);
    let mut r = row("bulwark", "initial", size, (0.0, 0), seconds);
    r.bytes_read = job.bytes_scanned;
    r.bytes_sent = job.bytes_transferred;
    r.bytes_stored = stored(&cluster)?.saturating_sub(before);
    rows.push(r);

    if plan.incremental {
        for (i, churn) in plan.churns.iter().enumerate() {
            let written = churn.apply(&cluster.sim_root, VM, churn_seed(i))?;
            eprintln!("bulwark: express full after {} of churn", format_size(written));
            let before = stored(&cluster)?;
            crate::limits::drop_caches();
            let (job, seconds) = cluster.backup(VM, BackupKind::ExpressFull)?;
            let mut r = row("bulwark", "incremental", size, churn.fields(written, size), seconds);
            r.churn = Some(churn.label());
            r.bytes_read = job.bytes_scanned;
            r.bytes_sent = job.bytes_transferred;
            r.bytes_stored = stored(&cluster)?.saturating_sub(before);
            rows.push(r);
        }
    }
    if plan.cc {
        eprintln!("bulwark: consistency check");
        crate::limits::drop_caches();
        let (job, seconds) = cluster.run_job(AdminRequest::ConsistencyCheck { vm: VM.into() })?;
        let mut r = row("bulwark", "cc", size, (0.0, 0), seconds);
        r.bytes_read = job.bytes_scanned;
        r.bytes_sent = job.bytes_transferred;
        rows.push(r);
    }
    cluster.stop();
    Ok(rows)
}

fn peer_runs(dir: &Path, size: u64, plan: &Plan, peer: Peer) -> anyhow::Result<Vec<BenchResult>> {
    let mut rows = vec![];
    let root = dir.join("sim");
    eprintln!("{}: the same {} random disk", peer.name(), format_size(size));
    sim::create_vm(&root, &bench_vm(size))?;
    let image = sim::Vm::open(&root, VM)?.image("os");
    let mut repo = PeerRepo::create(peer, dir, &image)?;
    eprintln!("{}: initial backup", peer.name());
    let run = repo.backup()?;
    let mut r = row(peer.name(), "initial", size, (0.0, 0), run.seconds);
    r.bytes_read = run.bytes_read;
    r.bytes_sent = run.bytes_read;
    r.bytes_stored = run.bytes_stored;
    rows.push(r);
    if plan.incremental {
        for (i, churn) in plan.churns.iter().enumerate() {
            let written = churn.apply(&root, VM, churn_seed(i))?;
            eprintln!("{}: backup after {} of churn", peer.name(), format_size(written));
            let run = repo.backup()?;
            let mut r = row(peer.name(), "incremental", size, churn.fields(written, size), run.seconds);
            r.churn = Some(churn.label());
            r.bytes_read = run.bytes_read;
            r.bytes_sent = run.bytes_read;
            r.bytes_stored = run.bytes_stored;
            rows.push(r);
        }
    }
    Ok(rows)
}
