//! Restore benchmarks with a real coordinator and agent ([`crate::cluster`], encrypted store): a
//! full restore of a random disk as a new VM, and a smart restore onto the original after 1 %
//! divergence — against each other, the machine's limits, and `restic restore` / `borg extract`
//! of the very same image (each timed from a cold page cache until the data is synced).

use crate::cluster::Cluster;
use crate::peers::{Peer, PeerRepo};
use crate::report::BenchResult;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power};
use bulwark_protocol::messages::{AdminRequest, BackupKind, JobInfo};
use std::path::Path;

/// What the restore benchmark measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreFigures {
    pub disk_bytes: u64,
    pub full_seconds: f64,
    pub full_bps: f64,
    pub smart_seconds: f64,
    pub smart_bytes_written: u64,
    /// How much faster the smart restore was than the full one.
    pub smart_speedup: f64,
}

/// Runs both restores of a `size`-byte random disk in `work`, then each peer's restore of it.
pub fn restores(work: &Path, size: u64, peers: &[Peer]) -> anyhow::Result<(RestoreFigures, Vec<BenchResult>)> {
    let cluster = Cluster::start(work, true)?;
    let req = CreateVm {
        os: "linux".into(),
        power: Power::Off,
        random_fill: true,
        seed: 42,
        ..CreateVm::new("bench", "node1", vec![DiskConfig { name: "os".into(), size }])
    };
    cluster.create_vm(&req)?;
    cluster.protect("bench")?;
    eprintln!("restore: initial replica of a {} random disk", bulwark_protocol::units::format_size(size));
    cluster.backup("bench", BackupKind::ExpressFull)?;

    eprintln!("restore: full restore as a new VM");
    crate::limits::drop_caches();
    let (full, full_seconds) = cluster.run_job(AdminRequest::Recover {
        vm: "bench".into(),
        rp: "latest".into(),
        to_host: Some("node1".into()),
        name: Some("bench-full".into()),
        options: Default::default(),
    })?;

    eprintln!("restore: 1 % of the disk diverges; smart restore onto the original");
    sim::churn(&cluster.sim_root, "bench", 1.0, 7)?;
    crate::limits::drop_caches();
    let (smart, smart_seconds) = cluster.run_job(AdminRequest::Recover {
        vm: "bench".into(),
        rp: "latest".into(),
        to_host: None,
        name: None,
        options: Default::default(),
    })?;
    let same = {
        let mut a = blake3::Hasher::new();
        sim::read_disk(&cluster.sim_root, "bench", "os", &mut a)?;
        let mut b = blake3::Hasher::new();
        sim::read_disk(&cluster.sim_root, "bench-full", "os", &mut b)?;
        a.finalize() == b.finalize()
    };
    anyhow::ensure!(same, "the smart and the full restore differ");
    let image = sim::Vm::open(&cluster.sim_root, "bench")?.image("os");
    cluster.stop();

    let figures = RestoreFigures {
        disk_bytes: size,
        full_seconds,
        full_bps: size as f64 / full_seconds.max(1e-9),
        smart_seconds,
        smart_bytes_written: smart.bytes_transferred,
        smart_speedup: full_seconds / smart_seconds.max(1e-9),
    };
    let row = |scenario: &str, seconds: f64, j: &JobInfo, churn: f64| BenchResult {
        tool: "bulwark".into(),
        scenario: scenario.into(),
        size_bytes: size,
        churn_percent: churn,
        churn_bytes: 0,
        seconds,
        bytes_read: j.bytes_scanned,
        bytes_sent: j.bytes_transferred,
        bytes_stored: 0,
        churn: None,
    };
    let mut results = vec![row("restore", full_seconds, &full, 0.0), row("smart-restore", smart_seconds, &smart, 1.0)];
    let digest = |p: &Path| -> anyhow::Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        std::io::copy(&mut std::fs::File::open(p)?, &mut h)?;
        Ok(h.finalize())
    };
    let want = digest(&image)?;
    let name = image.file_name().and_then(|n| n.to_str()).unwrap_or("os.img").to_owned();
    for &peer in peers {
        let dir = work.join(format!("peer-{}", peer.name()));
        eprintln!("restore: {} backup and restore of the same image", peer.name());
        let mut repo = PeerRepo::create(peer, &dir, &image)?;
        repo.backup()?;
        let (run, restored) = repo.restore(&dir.join("restored"), &name)?;
        anyhow::ensure!(digest(&restored)? == want, "{} restored other bytes", peer.name());
        results.push(BenchResult {
            tool: peer.name().into(),
            scenario: "restore".into(),
            size_bytes: size,
            churn_percent: 0.0,
            churn_bytes: 0,
            seconds: run.seconds,
            bytes_read: 0,
            bytes_sent: run.bytes_read,
            bytes_stored: 0,
            churn: None,
        });
        std::fs::remove_dir_all(&dir)?;
    }
    Ok((figures, results))
}
