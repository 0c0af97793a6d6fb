//! A real coordinator and a real agent for benchmarks: each on its own actix system and thread
//! in this process, talking QUIC with mutual TLS on loopback, the data on real files under one
//! work directory. The benchmark drives it through the admin protocol, as `bulwark` would.

use anyhow::bail;
use bulwark_agent::config::AgentDir;
use bulwark_agent::sim::{self, CreateVm};
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_coordinator::config::DataDir;
use bulwark_protocol::messages::{AdminRequest, AdminResponse, BackupKind, JobInfo, PolicySpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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

fn agent(dir: AgentDir, opts: bulwark_agent::run::RunOptions) -> Daemon {
    let (tx, rx) = oneshot::channel::<()>();
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

/// Polls `f` every 10 ms until it gives a value (at most ten minutes).
pub fn wait<T>(what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One coordinator and one agent (`node1`) on a sim root, with an admin connection.
pub struct Cluster {
    pub work: PathBuf,
    pub sim_root: PathBuf,
    pub data: DataDir,
    rt: tokio::runtime::Runtime,
    client: AdminClient,
    // Dropped last-declared-first: the agent stops before the coordinator.
    _agent: Daemon,
    _coordinator: Daemon,
}

impl Cluster {
    /// Initializes and starts both daemons under `work` (`encrypt`: an encrypted store); the
    /// agent drives the sim on `work/sim`.
    pub fn start(work: &Path, encrypt: bool) -> anyhow::Result<Self> {
        Self::start_with(work, encrypt, None, &|_| {})
    }

    /// [`Cluster::start`], with `tune` applied to `coordinator.toml` before the coordinator
    /// starts.
    pub fn start_tuned(
        work: &Path,
        encrypt: bool,
        tune: &dyn Fn(&mut bulwark_coordinator::config::CoordinatorConfig),
    ) -> anyhow::Result<Self> {
        Self::start_with(work, encrypt, None, tune)
    }

    /// The same with an agent on the QEMU backend over the VM definitions in `qemu_vm_dir`.
    pub fn start_qemu(work: &Path, encrypt: bool, qemu_vm_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(work, encrypt, Some(qemu_vm_dir), &|_| {})
    }

    fn start_with(
        work: &Path,
        encrypt: bool,
        qemu_vm_dir: Option<&Path>,
        tune: &dyn Fn(&mut bulwark_coordinator::config::CoordinatorConfig),
    ) -> anyhow::Result<Self> {
        let data = DataDir::new(work.join("coordinator"));
        let opts = bulwark_coordinator::init::InitOptions {
            name: Some("bench".into()),
            listen: "127.0.0.1:0".parse()?,
            advertise: None,
            encrypt,
            joined: None,
        };
        bulwark_coordinator::init::init(&data.root, &opts)?;
        let mut config = bulwark_coordinator::config::CoordinatorConfig::load(&data)?;
        tune(&mut config);
        config.save(&data)?;
        let coordinator = coordinator(data.clone());
        wait("the coordinator", || Ok(data.addr_file().exists().then_some(())))?;
        let target = AdminTarget::from_data_dir(&data.root)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = rt.block_on(AdminClient::connect(&target))?;
        let token = match rt.block_on(client.request(AdminRequest::TokenCreate {
            ttl_secs: 600,
            host: Some(bulwark_protocol::HostId::new("node1")?),
            cluster: None,
            replace: None,
            coordinator: None,
        }))? {
            AdminResponse::Token { token, .. } => token,
            other => bail!("unexpected answer {other:?}"),
        };
        let sim_root = work.join("sim");
        std::fs::create_dir_all(&sim_root)?;
        let agent_dir = AgentDir::new(work.join("agent"));
        rt.block_on(bulwark_agent::enroll::enroll(&agent_dir, &token, Some("node1".into())))?;
        let opts = match qemu_vm_dir {
            Some(d) => {
                bulwark_agent::run::RunOptions { sim_root: None, qemu_vm_dir: Some(d.to_owned()), qemu_shared: false }
            }
            None => bulwark_agent::run::RunOptions {
                sim_root: Some(sim_root.clone()),
                qemu_vm_dir: None,
                qemu_shared: false,
            },
        };
        let agent = agent(agent_dir, opts);
        Ok(Self { work: work.to_owned(), sim_root, data, rt, client, _agent: agent, _coordinator: coordinator })
    }

    /// One admin request.
    pub fn ask(&self, r: AdminRequest) -> anyhow::Result<AdminResponse> {
        self.rt.block_on(self.client.request(r)).map_err(anyhow::Error::from)
    }

    /// Every item of a paged list request, page after page.
    pub fn list<T>(
        &self,
        make: impl Fn(bulwark_protocol::paging::PageRequest) -> AdminRequest,
        take: impl Fn(AdminResponse) -> Option<bulwark_protocol::paging::Page<T>>,
    ) -> anyhow::Result<Vec<T>> {
        self.rt.block_on(self.client.list_all(make, take)).map_err(anyhow::Error::from)
    }

    /// Creates a sim VM and waits until the agent has reported it.
    pub fn create_vm(&self, req: &CreateVm) -> anyhow::Result<()> {
        sim::create_vm(&self.sim_root, req)?;
        self.wait_vm(&req.name)
    }

    /// Waits until the agent has reported VM `name`.
    pub fn wait_vm(&self, name: &str) -> anyhow::Result<()> {
        wait("the VM in the inventory", || {
            let take = |r| match r {
                AdminResponse::Vms(p) => Some(p),
                _ => None,
            };
            let vms = self.rt.block_on(self.client.list_all(|page| AdminRequest::VmList { page }, take))?;
            Ok(vms.iter().any(|v| v.name == name).then_some(()))
        })
    }

    /// Puts `vm` into a new group of the same name with manual replica creation.
    pub fn protect(&self, vm: &str) -> anyhow::Result<()> {
        self.create_group(vm, vec![vm.into()], "manual")
    }

    /// Creates group `name` of `vms` with no schedule and no recovery-point goal, its initial
    /// copies made as `replica_creation` says (`now`, `manual`, `at:HH:MM`).
    pub fn create_group(&self, name: &str, vms: Vec<String>, replica_creation: &str) -> anyhow::Result<()> {
        let policy = PolicySpec {
            sync_every_secs: None,
            recovery_points: vec![],
            express_full_before_rp: false,
            retention_secs: 86_400,
            cc_when_inconsistent: false,
            cc_at: None,
            replica_creation: replica_creation.into(),
            block_size: 1 << 20,
            exclude_disks: vec![],
            verify: Default::default(),
        };
        match self.ask(AdminRequest::GroupCreate { name: name.into(), vms, policy, auto_cluster: None })? {
            AdminResponse::Group(_) => Ok(()),
            other => bail!("group create: unexpected answer {other:?}"),
        }
    }

    /// Waits for job `id` to succeed (an error if it fails).
    pub fn wait_job(&self, id: u64) -> anyhow::Result<JobInfo> {
        wait(&format!("job {id}"), || {
            Ok(match self.ask(AdminRequest::JobShow { id })? {
                AdminResponse::Job(j) if j.state == "succeeded" => Some(j),
                AdminResponse::Job(j) if j.state == "failed" || j.state == "cancelled" => {
                    bail!("job {id} {}: {}", j.state, j.error.unwrap_or_default())
                }
                _ => None,
            })
        })
    }

    /// Sends a request that starts a job, waits for it, and returns it with its wall time.
    pub fn run_job(&self, r: AdminRequest) -> anyhow::Result<(JobInfo, f64)> {
        let t = Instant::now();
        let id = match self.ask(r)? {
            AdminResponse::JobStarted { job_id } => job_id,
            other => bail!("unexpected answer {other:?}"),
        };
        let job = self.wait_job(id)?;
        Ok((job, t.elapsed().as_secs_f64()))
    }

    /// A backup of `vm` now (the first one is the initial replica).
    pub fn backup(&self, vm: &str, kind: BackupKind) -> anyhow::Result<(JobInfo, f64)> {
        self.run_job(AdminRequest::Backup { vm: vm.into(), kind })
    }

    /// Bytes the store (packs and indexes) holds on disk, and the catalog's.
    pub fn store_bytes(&self) -> anyhow::Result<(u64, u64)> {
        match self.ask(AdminRequest::Status)? {
            AdminResponse::Status(s) => Ok((s.store_bytes, s.catalog_bytes)),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Closes the admin connection and stops both daemons.
    pub fn stop(self) {
        self.rt.block_on(self.client.close());
    }
}
