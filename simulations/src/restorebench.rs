//! Restore benchmarks with a real coordinator and agent (each on its own actix system and
//! thread in this process, talking QUIC with mutual TLS on loopback, the data on real files):
//! a full restore of a random disk as a new VM, and a smart restore onto the original after
//! 1 % divergence — against each other and the machine's limits.

use crate::report::BenchResult;
use anyhow::bail;
use bulwark_agent::config::AgentDir;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power};
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_coordinator::config::DataDir;
use bulwark_protocol::messages::{AdminRequest, AdminResponse, JobInfo, PolicySpec};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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

/// A daemon on its own thread, stopped when its sender is dropped.
struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn coordinator(dir: DataDir) -> Daemon {
    let (tx, rx) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let r = actix_rt::System::new().block_on(bulwark_coordinator::server::serve(dir, async {
            let _ = rx.await;
        }));
        if let Err(e) = r {
            eprintln!("bench coordinator: {e}");
        }
    });
    Daemon { stop: Some(tx), thread: Some(thread) }
}

fn agent(dir: AgentDir, sim_root: &Path) -> Daemon {
    let (tx, rx) = oneshot::channel::<()>();
    let opts = bulwark_agent::run::RunOptions { sim_root: Some(sim_root.to_owned()) };
    let thread = std::thread::spawn(move || {
        let r = actix_rt::System::new().block_on(bulwark_agent::run::run(dir, opts, async {
            let _ = rx.await;
        }));
        if let Err(e) = r {
            eprintln!("bench agent: {e}");
        }
    });
    Daemon { stop: Some(tx), thread: Some(thread) }
}

fn wait<T>(what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs both restores of a `size`-byte random disk in `work`.
pub fn restores(work: &Path, size: u64) -> anyhow::Result<(RestoreFigures, Vec<BenchResult>)> {
    let data = DataDir::new(work.join("coordinator"));
    let opts = bulwark_coordinator::init::InitOptions {
        name: Some("bench".into()),
        listen: "127.0.0.1:0".parse()?,
        advertise: None,
        encrypt: false,
    };
    bulwark_coordinator::init::init(&data.root, &opts)?;
    let _coordinator = coordinator(data.clone());
    wait("the coordinator", || Ok(data.addr_file().exists().then_some(())))?;
    let target = AdminTarget::from_data_dir(&data.root)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = rt.block_on(AdminClient::connect(&target))?;
    let ask = |r: AdminRequest| rt.block_on(client.request(r)).map_err(anyhow::Error::from);
    let token =
        match ask(AdminRequest::TokenCreate { ttl_secs: 600, host: Some(bulwark_protocol::HostId::new("node1")?) })? {
            AdminResponse::Token { token, .. } => token,
            other => bail!("unexpected answer {other:?}"),
        };
    let sim_root = work.join("sim");
    let req = CreateVm {
        os: "linux".into(),
        power: Power::Off,
        random_fill: true,
        seed: 42,
        ..CreateVm::new("bench", "node1", vec![DiskConfig { name: "os".into(), size }])
    };
    sim::create_vm(&sim_root, &req)?;
    let agent_dir = AgentDir::new(work.join("agent"));
    rt.block_on(bulwark_agent::enroll::enroll(&agent_dir, &token, Some("node1".into())))?;
    let _agent = agent(agent_dir, &sim_root);
    let job = |id: u64| -> anyhow::Result<Option<JobInfo>> {
        Ok(match ask(AdminRequest::JobShow { id })? {
            AdminResponse::Job(j) if j.state == "succeeded" => Some(j),
            AdminResponse::Job(j) if j.state == "failed" => bail!("job {id} failed: {}", j.error.unwrap_or_default()),
            _ => None,
        })
    };
    wait("the VM in the inventory", || {
        Ok(matches!(ask(AdminRequest::VmList)?, AdminResponse::Vms(v) if !v.is_empty()).then_some(()))
    })?;
    let policy = PolicySpec {
        sync_every_secs: None,
        recovery_points: vec![],
        express_full_before_rp: false,
        retention_secs: 86_400,
        cc_when_inconsistent: false,
        cc_at: None,
        replica_creation: "now".into(),
        block_size: 1 << 20,
    };
    ask(AdminRequest::GroupCreate { name: "bench".into(), vms: vec!["bench".into()], policy })?;
    eprintln!("restore: initial replica of a {} random disk", bulwark_protocol::units::format_size(size));
    wait("the initial replica", || {
        Ok(match ask(AdminRequest::JobList { vm: Some("bench".into()), state: Some("succeeded".into()) })? {
            AdminResponse::Jobs(j) if j.iter().any(|j| j.kind == "initial") => Some(()),
            _ => None,
        })
    })?;
    let started = |r: AdminResponse| -> anyhow::Result<u64> {
        match r {
            AdminResponse::JobStarted { job_id } => Ok(job_id),
            other => bail!("unexpected answer {other:?}"),
        }
    };

    eprintln!("restore: full restore as a new VM");
    let t = Instant::now();
    let id = started(ask(AdminRequest::Recover {
        vm: "bench".into(),
        rp: "latest".into(),
        to_host: Some("node1".into()),
        name: Some("bench-full".into()),
        options: Default::default(),
    })?)?;
    let full = wait("the full restore", || job(id))?;
    let full_seconds = t.elapsed().as_secs_f64();

    eprintln!("restore: 1 % of the disk diverges; smart restore onto the original");
    sim::churn(&sim_root, "bench", 1.0, 7)?;
    let t = Instant::now();
    let id = started(ask(AdminRequest::Recover {
        vm: "bench".into(),
        rp: "latest".into(),
        to_host: None,
        name: None,
        options: Default::default(),
    })?)?;
    let smart = wait("the smart restore", || job(id))?;
    let smart_seconds = t.elapsed().as_secs_f64();
    let same = {
        let mut a = blake3::Hasher::new();
        sim::read_disk(&sim_root, "bench", "os", &mut a)?;
        let mut b = blake3::Hasher::new();
        sim::read_disk(&sim_root, "bench-full", "os", &mut b)?;
        a.finalize() == b.finalize()
    };
    anyhow::ensure!(same, "the smart and the full restore differ");
    rt.block_on(client.close());

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
    };
    let results = vec![row("restore", full_seconds, &full, 0.0), row("smart-restore", smart_seconds, &smart, 1.0)];
    Ok((figures, results))
}
