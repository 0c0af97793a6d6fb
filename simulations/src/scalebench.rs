//! Scale: one coordinator protecting many sim VMs (small sparse disks, a little data each) in
//! one group, on one agent. For each VM count it measures what an operator of a large cluster
//! feels: the inventory reaching the coordinator, `group create` of every VM, every initial
//! replica (replicas per second), `vm list` and `job list` through every page, the catalog's
//! size, and the process's peak memory (coordinator and agent share this process, so the
//! figure bounds the coordinator's).

use crate::cluster::{wait, Cluster};
use crate::storebench::peak_rss;
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use bulwark_protocol::messages::{AdminRequest, AdminResponse};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Each VM's disk: sparse, with 8 KiB of data at a VM-specific place.
const DISK: u64 = 16 << 20;

/// One VM count's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScaleRow {
    pub vms: usize,
    /// From the agent's start to every VM in `vm list`.
    pub inventory_seconds: f64,
    pub group_create_seconds: f64,
    /// From `group create` to every replica consistent.
    pub initial_seconds: f64,
    pub replicas_per_second: f64,
    /// Every page of `vm list`, once every replica exists.
    pub vm_list_seconds: f64,
    /// Every page of `job list`.
    pub job_list_seconds: f64,
    pub catalog_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// Runs one VM count under `work` (a fresh directory).
pub fn run(work: &Path, vms: usize) -> anyhow::Result<ScaleRow> {
    anyhow::ensure!(vms >= 1, "the scale scenario needs at least one VM");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut row = ScaleRow { vms, ..ScaleRow::default() };
    let started = Instant::now();
    // The sim's VMs exist before the agent starts: its first inventory has them all.
    let sim_root = work.join("sim");
    std::fs::create_dir_all(&sim_root)?;
    let names: Vec<String> = (0..vms).map(|i| format!("vm{i:05}")).collect();
    for (i, name) in names.iter().enumerate() {
        sim::create_vm(&sim_root, &CreateVm::new(name, "node1", vec![DiskConfig { name: "os".into(), size: DISK }]))?;
        let mut vm = Vm::open(&sim_root, name)?;
        vm.guest_write("os", (i as u64 % 15) << 20, &[(i % 251) as u8 + 1; 8192])?;
    }
    eprintln!("scale {vms}: VMs created in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    // All VMs on one host: its cap on reported VMs is raised to fit.
    let c = Cluster::start_tuned(work, true, &|config| {
        config.jobs.max_running = 8;
        config.jobs.per_agent = 8;
        config.agents.max_vms_per_host = config.agents.max_vms_per_host.max(vms);
    })?;
    wait("every VM in the inventory", || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok((list_vms(&c)?.len() == vms).then_some(()))
    })?;
    row.inventory_seconds = started.elapsed().as_secs_f64();

    let t = Instant::now();
    c.create_group("big", names, "now")?;
    row.group_create_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "scale {vms}: inventory in {:.1} s, group created in {:.1} s",
        row.inventory_seconds, row.group_create_seconds
    );
    let mut last_report = Instant::now();
    wait("every initial replica", || {
        // Every poll lists every VM, which costs the coordinator too: at most one a second,
        // less often for more VMs (5 s at 10,000), so polling takes a bounded share of its time.
        std::thread::sleep(std::time::Duration::from_millis((vms as u64 / 2).clamp(1000, 5000)));
        let list = list_vms(&c)?;
        let done = list.iter().filter(|v| v.replica_state == "consistent").count();
        if last_report.elapsed().as_secs() >= 30 {
            eprintln!("scale {vms}: {done} replicas after {:.0} s", t.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        Ok((done == vms).then_some(()))
    })?;
    row.initial_seconds = t.elapsed().as_secs_f64();
    row.replicas_per_second = vms as f64 / row.initial_seconds.max(1e-9);

    let t = Instant::now();
    list_vms(&c)?;
    row.vm_list_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let jobs = c.list(
        |page| AdminRequest::JobList { vm: None, state: None, page },
        |r| match r {
            AdminResponse::Jobs(p) => Some(p),
            _ => None,
        },
    )?;
    row.job_list_seconds = t.elapsed().as_secs_f64();
    anyhow::ensure!(jobs.len() >= vms, "{} job records for {vms} initial replicas", jobs.len());
    row.catalog_bytes = c.store_bytes()?.1;
    row.peak_rss_bytes = peak_rss();
    c.stop();
    Ok(row)
}

fn list_vms(c: &Cluster) -> anyhow::Result<Vec<bulwark_protocol::messages::VmSummary>> {
    c.list(
        |page| AdminRequest::VmList { page },
        |r| match r {
            AdminResponse::Vms(p) => Some(p),
            _ => None,
        },
    )
}
