//! The processes of a chaos run: a coordinator and N agents, each a child process of the chaos
//! executable's multi-call names (`x-coordinator`, `x-agent`: exactly the daemons' code),
//! killed with real signals and started again; and admin requests that tolerate a coordinator
//! that is down.

use anyhow::{bail, Context as _};
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{AdminRequest, AdminResponse, BackupKind, JobInfo, PolicySpec};
use bulwark_protocol::paging::{Page, PageRequest};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One daemon process, restartable.
pub struct Proc {
    pub name: String,
    exe: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &str, exe: &Path, args: Vec<OsString>, log: PathBuf) -> Self {
        // The deliberately broken build reaches the agents through their environment.
        let env =
            std::env::var("BULWARK_SIM_BREAK").map(|v| vec![("BULWARK_SIM_BREAK".to_owned(), v)]).unwrap_or_default();
        Self { name: name.to_owned(), exe: exe.to_owned(), args, env, log, child: None }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the process unless it runs; its stderr is appended to its log.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.exe)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash: nothing is cleaned up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends signal `sig` (`TERM`, …) with the `kill` command: this crate forbids `unsafe`.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A chaos run's cluster.
pub struct World {
    pub dir: PathBuf,
    pub sim_root: PathBuf,
    pub data_dir: PathBuf,
    pub coordinator: Proc,
    pub agents: Vec<Proc>,
    /// One UDP fault proxy per agent, in front of the coordinator.
    pub proxies: Vec<super::proxy::Proxy>,
    /// When each node's network fault ends.
    pub heal_at: std::collections::BTreeMap<usize, Instant>,
    /// The coordinator's data directory is a tmpfs of its own (the store-full scenario).
    pub store_mounted: bool,
    /// When the ballast that fills the store disk goes.
    pub store_free_at: Option<Instant>,
    /// The coordinator refused to start on the full disk: start it once the ballast goes.
    pub start_when_freed: bool,
    /// The other coordinators of the deployment (multi), joined with `init --join`; agents
    /// reach them directly (the proxies stand in front of the first only).
    pub others: Vec<OtherCoordinator>,
    /// Which coordinator the next kill takes (multi: one at a time, in turn).
    pub kill_turn: usize,
    rt: tokio::runtime::Runtime,
}

/// A coordinator that joined the deployment.
pub struct OtherCoordinator {
    pub name: String,
    pub proc: Proc,
    pub data_dir: PathBuf,
}

/// The name of coordinator `i` of a multi run (0: the first).
pub fn coordinator_name(i: usize) -> String {
    format!("coord{}", i + 1)
}

/// The file that fills the coordinator's store disk.
const BALLAST: &str = "ballast";

fn run_ok(exe: &Path, args: &[&OsString]) -> anyhow::Result<String> {
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", args, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn os(s: &str) -> OsString {
    s.into()
}

/// `x-coordinator token create --data-dir DIR SCOPE…`: the token.
fn token_create(exe: &Path, data_dir: &OsString, scope: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![os("x-coordinator"), os("token"), os("create"), os("--data-dir"), data_dir.clone()];
    args.extend(scope.iter().map(|s| os(s)));
    run_ok(exe, &args.iter().collect::<Vec<_>>())
}

impl World {
    /// Initializes and starts a coordinator and `nodes` enrolled agents under `dir`.
    /// With `store_bytes`, the coordinator's data directory is a tmpfs of that size (root only).
    pub fn start(
        exe: &Path,
        dir: &Path,
        nodes: usize,
        store_bytes: Option<u64>,
        coordinators: usize,
    ) -> anyhow::Result<World> {
        // With a disk of its own, the data directory is inside the mount (init makes it).
        let store_disk = dir.join("store-disk");
        let data_dir = if store_bytes.is_some() { store_disk.join("coordinator") } else { dir.join("coordinator") };
        let sim_root = dir.join("sim");
        std::fs::create_dir_all(&sim_root)?;
        if let Some(bytes) = store_bytes {
            std::fs::create_dir_all(&store_disk)?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700"), "bulwark-chaos-store"])
                .arg(&store_disk)
                .output()
                .context("cannot run mount")?;
            if !out.status.success() {
                bail!(
                    "the store-full scenario mounts a tmpfs for the coordinator's store and needs root: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let mounted = store_bytes.is_some();
        let unmount = |disk: &Path| {
            if mounted {
                let _ = Command::new("umount").arg("-l").arg(disk).status();
            }
        };
        if let Err(e) = run_ok(
            exe,
            &[
                &os("x-coordinator"),
                &os("init"),
                &os("--data-dir"),
                &data_dir.clone().into_os_string(),
                &os("--listen"),
                &os("127.0.0.1:0"),
                &os("--name"),
                &os(&coordinator_name(0)),
            ],
        ) {
            unmount(&store_disk);
            return Err(e);
        }
        let d = data_dir.clone().into_os_string();
        let coordinator = Proc::new(
            "coordinator",
            exe,
            vec![os("x-coordinator"), os("serve"), os("--data-dir"), d.clone()],
            dir.join("coordinator.log"),
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut world = World {
            dir: dir.to_owned(),
            sim_root: sim_root.clone(),
            data_dir,
            coordinator,
            agents: vec![],
            proxies: vec![],
            heal_at: Default::default(),
            store_mounted: mounted,
            store_free_at: None,
            start_when_freed: false,
            others: vec![],
            kill_turn: 0,
            rt,
        };
        world.start_coordinator()?;
        // The other coordinators join before the agents enroll: enrollment names them all.
        for i in 1..coordinators {
            let name = coordinator_name(i);
            let token = token_create(exe, &d, &["--coordinator", &name])?;
            let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
            let other_dir = dir.join(&name);
            run_ok(
                exe,
                &[
                    &os("x-coordinator"),
                    &os("init"),
                    &os("--data-dir"),
                    &other_dir.clone().into_os_string(),
                    &os("--listen"),
                    &os(&format!("127.0.0.1:{port}")),
                    &os("--join"),
                    &os(&token),
                ],
            )?;
            let proc = Proc::new(
                &name,
                exe,
                vec![os("x-coordinator"), os("serve"), os("--data-dir"), other_dir.clone().into_os_string()],
                dir.join(format!("{name}.log")),
            );
            world.others.push(OtherCoordinator { name, proc, data_dir: other_dir });
            world.start_coordinator_at(i)?;
        }
        let coordinator_addr: std::net::SocketAddr = std::fs::read_to_string(world.data_dir.join("coordinator.addr"))?
            .trim()
            .parse()
            .context("coordinator.addr")?;
        for n in 0..nodes {
            let host = format!("node{}", n + 1);
            // Every node in one cluster: VMs migrate between them.
            let token = token_create(exe, &d, &["--host", &host, "--cluster", "chaos"])?;
            let agent_dir = dir.join(format!("agent-{host}")).into_os_string();
            run_ok(
                exe,
                &[
                    &os("x-agent"),
                    &os("enroll"),
                    &os("--data-dir"),
                    &agent_dir,
                    &os("--token"),
                    &os(&token),
                    &os("--host"),
                    &os(&host),
                ],
            )?;
            // The agent dials the coordinator through its own fault proxy.
            let proxy = super::proxy::Proxy::start(coordinator_addr)?;
            let config = Path::new(&agent_dir).join("agent.toml");
            let text = std::fs::read_to_string(&config)?;
            let text: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("coordinator = ") {
                        format!("coordinator = \"{}\"", proxy.addr)
                    } else {
                        l.to_owned()
                    }
                })
                .collect();
            std::fs::write(&config, text.join("\n") + "\n")?;
            world.proxies.push(proxy);
            let mut p = Proc::new(
                &host,
                exe,
                vec![
                    os("x-agent"),
                    os("run"),
                    os("--data-dir"),
                    agent_dir,
                    os("--sim-root"),
                    sim_root.clone().into_os_string(),
                ],
                dir.join(format!("agent-{host}.log")),
            );
            p.start()?;
            world.agents.push(p);
        }
        Ok(world)
    }

    /// Starts the coordinator (if down) and waits until it accepts admin connections.
    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        if self.coordinator.is_running() {
            return Ok(());
        }
        self.coordinator.start()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ask(AdminRequest::Status).is_some() {
                return Ok(());
            }
            if !self.coordinator.is_running() {
                bail!("the coordinator exited at start; see {}", self.coordinator.log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the coordinator did not answer within 30 s of its start")
    }

    /// The number of coordinators (1 unless multi).
    pub fn coordinator_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Coordinator `i`'s process (0: the first).
    pub fn coordinator_proc(&mut self, i: usize) -> &mut Proc {
        match i.checked_sub(1).and_then(|j| self.others.get_mut(j)) {
            Some(o) => &mut o.proc,
            None => &mut self.coordinator,
        }
    }

    /// Coordinator `i`'s data directory.
    pub fn data_dir_of(&self, i: usize) -> &Path {
        match i.checked_sub(1).and_then(|j| self.others.get(j)) {
            Some(o) => &o.data_dir,
            None => &self.data_dir,
        }
    }

    /// Starts coordinator `i` (0: the first, with its full-disk handling) and waits for it.
    pub fn start_coordinator_at(&mut self, i: usize) -> anyhow::Result<()> {
        if i == 0 {
            return self.start_coordinator();
        }
        if self.coordinator_proc(i).is_running() {
            return Ok(());
        }
        self.coordinator_proc(i).start()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ask_at(i, AdminRequest::Status).is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("coordinator {} did not answer within 30 s of its start", coordinator_name(i))
    }

    /// Which coordinator owns `vm` now, by the claim on the shared storage (none: unclaimed).
    pub fn owner_of(&self, vm: &str) -> Option<usize> {
        let text = std::fs::read_to_string(self.sim_root.join("claims").join(format!("{vm}.claim"))).ok()?;
        let name = text.lines().find_map(|l| l.strip_prefix("coordinator "))?;
        (0..self.coordinator_count()).find(|&i| coordinator_name(i) == name)
    }

    /// Starts every process that is down.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        self.start_coordinator()?;
        for i in 1..self.coordinator_count() {
            self.start_coordinator_at(i)?;
        }
        for a in &mut self.agents {
            a.start()?;
        }
        Ok(())
    }

    /// Fills the store disk to the last byte with a ballast file; answers the bytes written.
    pub fn fill_store(&self) -> anyhow::Result<u64> {
        use std::io::Write;
        anyhow::ensure!(self.store_mounted, "the store disk is not a tmpfs of its own: it will not be filled");
        let path = self.store_disk().join(BALLAST);
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut written = 0u64;
        for chunk in [1usize << 20, 4096, 1] {
            let buf = vec![0xA5u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => return Err(e).context("writing the ballast"),
                }
            }
        }
        Ok(written)
    }

    /// The store's own disk (the tmpfs), when it has one.
    fn store_disk(&self) -> PathBuf {
        self.dir.join("store-disk")
    }

    /// Removes the ballast.
    pub fn free_store(&mut self) {
        self.store_free_at = None;
        let _ = std::fs::remove_file(self.store_disk().join(BALLAST));
    }

    /// Stops everything cleanly (SIGTERM).
    pub fn stop_all(&mut self) {
        for a in &mut self.agents {
            a.stop();
        }
        for o in &mut self.others {
            o.proc.stop();
        }
        self.coordinator.stop();
    }

    /// One admin request on a fresh connection; `None` when the coordinator is not reachable
    /// (down, starting) or the request broke off.
    pub fn ask(&self, req: AdminRequest) -> Option<AdminResponse> {
        self.ask_at(0, req)
    }

    /// [`World::ask`] of coordinator `i`.
    pub fn ask_at(&self, i: usize, req: AdminRequest) -> Option<AdminResponse> {
        let target = AdminTarget::from_data_dir(self.data_dir_of(i)).ok()?;
        self.rt.block_on(async {
            let client = tokio::time::timeout(CONNECT_TIMEOUT, AdminClient::connect(&target)).await.ok()?.ok()?;
            let r = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await.ok()?.ok();
            client.close().await;
            r
        })
    }

    /// A request that must be answered: retried while the coordinator is unreachable.
    pub fn must(&self, req: AdminRequest) -> anyhow::Result<AdminResponse> {
        self.must_at(0, req)
    }

    /// [`World::must`] of coordinator `i`.
    pub fn must_at(&self, i: usize, req: AdminRequest) -> anyhow::Result<AdminResponse> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(r) = self.ask_at(i, req.clone()) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not answer {req:?} for 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Streams a recovery point's disk into `file` (sized first).
    pub fn recover_disk(&self, vm: &str, rp: &str, disk: &str, file: &Path) -> anyhow::Result<()> {
        self.recover_disk_at(0, vm, rp, disk, file)
    }

    /// [`World::recover_disk`] from coordinator `i`.
    pub fn recover_disk_at(&self, i: usize, vm: &str, rp: &str, disk: &str, file: &Path) -> anyhow::Result<()> {
        let target = AdminTarget::from_data_dir(self.data_dir_of(i))?;
        let req =
            AdminRequest::RecoverDisk { vm: vm.into(), rp: rp.into(), disk: disk.into(), options: Default::default() };
        self.rt.block_on(async {
            let client = AdminClient::connect(&target).await?;
            let (head, mut recv) = client.request_stream(req).await?;
            let AdminResponse::DiskStream { size_bytes, block_size, .. } = head else {
                bail!("unexpected answer {head:?}");
            };
            let f = std::fs::File::create(file)?;
            f.set_len(size_bytes)?;
            bulwark_coordinator::admin_client::receive_disk(&mut recv, size_bytes, block_size, &f, false).await?;
            client.close().await;
            Ok(())
        })
    }

    /// Backups and checks go to the VM's owner (the first coordinator when unclaimed).
    pub fn backup(&self, vm: &str, sync: bool) {
        let kind = if sync { BackupKind::Sync } else { BackupKind::ExpressFull };
        let _ = self.ask_at(self.owner_of(vm).unwrap_or(0), AdminRequest::Backup { vm: vm.into(), kind });
    }

    pub fn check(&self, vm: &str) {
        let _ = self.ask_at(self.owner_of(vm).unwrap_or(0), AdminRequest::ConsistencyCheck { vm: vm.into() });
    }

    /// Every item of a paged list, page by page through [`World::must`].
    pub fn must_all<T>(
        &self,
        make: impl Fn(PageRequest) -> AdminRequest,
        take: impl Fn(AdminResponse) -> Option<Page<T>>,
    ) -> anyhow::Result<Vec<T>> {
        self.must_all_at(0, make, take)
    }

    /// [`World::must_all`] of coordinator `i`.
    pub fn must_all_at<T>(
        &self,
        i: usize,
        make: impl Fn(PageRequest) -> AdminRequest,
        take: impl Fn(AdminResponse) -> Option<Page<T>>,
    ) -> anyhow::Result<Vec<T>> {
        let mut req = PageRequest::first();
        let mut all = vec![];
        loop {
            let Some(page) = take(self.must_at(i, make(req.clone()))?) else {
                bail!("unexpected answer to a list request")
            };
            all.extend(page.items);
            match page.next {
                Some(next) => req = req.after(next),
                None => return Ok(all),
            }
        }
    }

    pub fn vms(&self) -> anyhow::Result<Vec<bulwark_protocol::messages::VmSummary>> {
        self.vms_at(0)
    }

    /// [`World::vms`] of coordinator `i`.
    pub fn vms_at(&self, i: usize) -> anyhow::Result<Vec<bulwark_protocol::messages::VmSummary>> {
        self.must_all_at(
            i,
            |page| AdminRequest::VmList { page },
            |r| match r {
                AdminResponse::Vms(p) => Some(p),
                _ => None,
            },
        )
    }

    pub fn jobs(&self, state: Option<&str>) -> anyhow::Result<Vec<JobInfo>> {
        self.jobs_at(0, state)
    }

    /// [`World::jobs`] of coordinator `i`.
    pub fn jobs_at(&self, i: usize, state: Option<&str>) -> anyhow::Result<Vec<JobInfo>> {
        self.must_all_at(
            i,
            |page| AdminRequest::JobList { vm: None, state: state.map(Into::into), page },
            |r| match r {
                AdminResponse::Jobs(p) => Some(p),
                _ => None,
            },
        )
    }

    /// Polls until `f` holds or `timeout` passes (then an error naming `what`).
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&World) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if f(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {} s waiting for {what}", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_inventory(&self, names: &[String], timeout: Duration) -> anyhow::Result<()> {
        self.wait("every VM in the inventory", timeout, |w| {
            let vms = w.vms()?;
            Ok(names.iter().all(|n| vms.iter().any(|v| &v.name == n)))
        })
    }

    /// One group with every VM: no schedules (the harness drives backups), checks whenever a
    /// replica is inconsistent, initial replicas now.
    pub fn protect(&self, names: &[String]) -> anyhow::Result<()> {
        let multi = !self.others.is_empty();
        let policy = PolicySpec {
            sync_every_secs: None,
            recovery_points: vec![],
            express_full_before_rp: false,
            retention_secs: 30 * 86_400,
            cc_when_inconsistent: true,
            cc_at: None,
            replica_creation: "now".into(),
            block_size: 1 << 20,
            exclude_disks: vec![],
            verify: Default::default(),
        };
        if multi {
            // Every coordinator protects the whole cluster; each VM goes to one of them.
            let cluster = bulwark_protocol::ClusterId::new("chaos")?;
            for i in 0..self.coordinator_count() {
                let req = AdminRequest::GroupCreate {
                    name: "chaos".into(),
                    vms: vec![],
                    policy: policy.clone(),
                    auto_cluster: Some(cluster.clone()),
                };
                if !matches!(self.must_at(i, req)?, AdminResponse::Group(_)) {
                    bail!("cannot create the auto group on {}", coordinator_name(i));
                }
            }
            return Ok(());
        }
        match self.must(AdminRequest::GroupCreate {
            name: "chaos".into(),
            vms: names.to_vec(),
            policy,
            auto_cluster: None,
        })? {
            AdminResponse::Group(_) => Ok(()),
            other => bail!("cannot create the group: {other:?}"),
        }
    }

    pub fn wait_replicas_consistent(&self, names: &[String], timeout: Duration) -> anyhow::Result<()> {
        self.wait("every replica consistent (at its owner)", timeout, |w| {
            let mut at: Vec<Option<Vec<bulwark_protocol::messages::VmSummary>>> = vec![None; w.coordinator_count()];
            for n in names {
                let Some(i) = w.owner_of(n).or((w.others.is_empty()).then_some(0)) else { return Ok(false) };
                if at[i].is_none() {
                    at[i] = Some(w.vms_at(i)?);
                }
                let vms = at[i].as_deref().unwrap_or_default();
                if !vms.iter().any(|v| &v.name == n && v.replica_state == "consistent" && v.group.is_some()) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Runs a job to its end: `Ok(job)` whatever its outcome, retried while the coordinator
    /// cannot be reached.
    pub fn run_job(&self, req: AdminRequest) -> anyhow::Result<JobInfo> {
        self.run_job_at(0, req)
    }

    /// [`World::run_job`] on coordinator `i`.
    pub fn run_job_at(&self, i: usize, req: AdminRequest) -> anyhow::Result<JobInfo> {
        let id = match self.must_at(i, req)? {
            AdminResponse::JobStarted { job_id } => job_id,
            AdminResponse::Job(j) => return Ok(j),
            other => bail!("unexpected answer {other:?}"),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let AdminResponse::Job(j) = self.must_at(i, AdminRequest::JobShow { id })? {
                if matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return Ok(j);
                }
            }
            if Instant::now() > deadline {
                bail!("job {id} did not end within 300 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every log of the run, with its name.
    pub fn logs(&self) -> Vec<(String, String)> {
        std::iter::once(&self.coordinator)
            .chain(self.others.iter().map(|o| &o.proc))
            .chain(self.agents.iter())
            .map(|p| (p.name.clone(), std::fs::read_to_string(&p.log).unwrap_or_default()))
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.store_mounted {
            for a in &mut self.agents {
                a.kill9();
            }
            for o in &mut self.others {
                o.proc.kill9();
            }
            self.coordinator.kill9();
            let _ = Command::new("umount").arg("-l").arg(self.store_disk()).status();
        }
    }
}
