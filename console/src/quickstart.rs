//! `bulwark quickstart`: the whole story on loopback in one command. A coordinator and two
//! agents run as real child processes of this executable (the multi-call `x-coordinator` /
//! `x-agent`), talking QUIC with mutual TLS from a fresh private CA; three sim VMs of three
//! consistency models are protected, churned, backed up, and restored — and every restore is
//! compared with its source, bit for bit.

use anyhow::{bail, Context as _};
use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{AdminRequest, AdminResponse, BackupKind, JobInfo, PolicySpec};
use bulwark_protocol::units::format_size;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;

/// A child daemon, stopped with SIGTERM (then killed) when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn spawn(name: &'static str, args: &[&str], log: &Path) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        Ok(Daemon { name, child })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("the {} did not stop in 10 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn me(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the quickstart in `dir` (a fresh temporary directory when None).
pub fn run(dir: Option<PathBuf>, keep_running: bool) -> anyhow::Result<()> {
    let tmp;
    let mut temporary = false;
    let root = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            if std::fs::read_dir(&d)?.next().is_some() {
                bail!("{} is not empty: give the quickstart an empty or new directory", d.display());
            }
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("bulwark-quickstart-").tempdir()?;
            if keep_running {
                tmp.keep()
            } else {
                temporary = true;
                tmp.path().to_owned()
            }
        }
    };
    let started = Instant::now();
    let coord = root.join("coordinator");
    let coord_s = coord.to_string_lossy().into_owned();
    let sim_root = root.join("sim");
    step(&format!("a coordinator with its own CA in {}", coord.display()));
    me(&["x-coordinator", "init", "--data-dir", &coord_s, "--listen", "127.0.0.1:0", "--name", "quickstart"])?;
    let _coordinator = Daemon::spawn(
        "coordinator",
        &["x-coordinator", "serve", "--data-dir", &coord_s],
        &root.join("coordinator.log"),
    )?;
    wait_for("the coordinator to listen", Duration::from_secs(30), || {
        Ok(coord.join("coordinator.addr").exists().then_some(()))
    })?;

    step("three sim VMs on a two-node cluster: web (Windows), db (Linux), legacy (no integration services)");
    let vms =
        [("web", "node1", "windows", true), ("db", "node2", "linux", true), ("legacy", "node1", "windows", false)];
    for (i, (name, host, os, integration)) in vms.iter().enumerate() {
        let req = CreateVm {
            os: (*os).into(),
            integration_services: *integration,
            random_fill: true,
            seed: i as u64 + 1,
            ..CreateVm::new(name, host, vec![DiskConfig { name: "os".into(), size: DISK }])
        };
        sim::create_vm(&sim_root, &req)?;
    }
    step("two agents enroll with one-time join tokens and connect over QUIC + mutual TLS");
    let mut agents = vec![];
    for host in ["node1", "node2"] {
        let token = me(&["x-coordinator", "token", "create", "--data-dir", &coord_s, "--ttl", "10m", "--host", host])?;
        let dir = root.join(format!("agent-{host}"));
        let dir_s = dir.to_string_lossy().into_owned();
        me(&["x-agent", "enroll", "--data-dir", &dir_s, "--token", &token, "--host", host])?;
        let sim_s = sim_root.to_string_lossy().into_owned();
        agents.push(Daemon::spawn(
            "agent",
            &["x-agent", "run", "--data-dir", &dir_s, "--sim-root", &sim_s],
            &root.join(format!("agent-{host}.log")),
        )?);
    }

    let target = AdminTarget::from_data_dir(&coord)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = rt.block_on(AdminClient::connect(&target))?;
    let ask = |req: AdminRequest| rt.block_on(client.request(req)).map_err(anyhow::Error::from);
    wait_for("the agents to report the VMs", Duration::from_secs(60), || {
        Ok(match ask(AdminRequest::VmList)? {
            AdminResponse::Vms(v) if v.len() == 3 => Some(()),
            _ => None,
        })
    })?;

    step("protection group `demo`: initial replicas now, consistency checks when needed");
    let policy = PolicySpec {
        sync_every_secs: None,
        recovery_points: vec![],
        express_full_before_rp: false,
        retention_secs: 5 * 86_400,
        cc_when_inconsistent: true,
        cc_at: None,
        replica_creation: "now".into(),
        block_size: 1 << 20,
    };
    ask(AdminRequest::GroupCreate { name: "demo".into(), vms: vms.iter().map(|v| v.0.to_owned()).collect(), policy })?;
    wait_for("the initial replicas", Duration::from_secs(300), || {
        Ok(match ask(AdminRequest::VmList)? {
            AdminResponse::Vms(v) if v.iter().all(|v| v.replica_state == "consistent") => Some(()),
            _ => None,
        })
    })?;

    step("the guests write 2 % of their disks; an express full of each moves only that");
    let mut rows = vec![];
    for (i, (name, ..)) in vms.iter().enumerate() {
        sim::churn(&sim_root, name, 2.0, 100 + i as u64)?;
        let id = match ask(AdminRequest::Backup { vm: (*name).into(), kind: BackupKind::ExpressFull })? {
            AdminResponse::JobStarted { job_id } => job_id,
            other => bail!("unexpected answer {other:?}"),
        };
        let job: JobInfo = wait_for("the express full", Duration::from_secs(300), || {
            Ok(match ask(AdminRequest::JobShow { id })? {
                AdminResponse::Job(j) if j.state == "succeeded" => Some(j),
                AdminResponse::Job(j) if j.state == "failed" || j.state == "cancelled" => {
                    bail!("express full of {name} failed: {}", j.error.unwrap_or_default())
                }
                _ => None,
            })
        })?;
        rows.push((name.to_string(), job));
    }

    step("every disk restored from its latest recovery point and compared with its source");
    let restored_dir = root.join("restored");
    std::fs::create_dir_all(&restored_dir)?;
    let mut verified = 0;
    for (name, ..) in &vms {
        let out = restored_dir.join(format!("{name}-os.img"));
        let req = AdminRequest::RecoverDisk {
            vm: (*name).into(),
            rp: "latest".into(),
            disk: "os".into(),
            options: Default::default(),
        };
        crate::recover_disk(&target, req, &out)?;
        let mut source = blake3::Hasher::new();
        sim::read_disk(&sim_root, name, "os", &mut source)?;
        let restored = blake3::hash(&std::fs::read(&out)?);
        if source.finalize() != restored {
            bail!("the restored disk of {name} differs from its source");
        }
        verified += 1;
    }
    rt.block_on(client.close());

    println!();
    println!("{:<8} {:<12} {:>14} {:>18} {:>10}", "VM", "CONSISTENCY", "DISK", "EXPRESS FULL MOVED", "RESTORE");
    for (name, job) in &rows {
        println!(
            "{:<8} {:<12} {:>14} {:>18} {:>10}",
            name,
            job.consistency.as_deref().unwrap_or("-"),
            format_size(DISK),
            format_size(job.bytes_transferred),
            "bit-exact"
        );
    }
    println!();
    let kept = if temporary {
        "a temporary directory, removed now; --dir DIR keeps it".to_owned()
    } else {
        format!("everything is in {}", root.display())
    };
    println!(
        "{} VMs protected, {verified} restores verified bit for bit, in {:.1} s ({kept})",
        vms.len(),
        started.elapsed().as_secs_f64()
    );
    if keep_running {
        println!();
        println!("The coordinator and both agents keep running. Try:");
        println!("  bulwark --data-dir {} vm list", coord.display());
        println!("  bulwark --data-dir {} rp list web", coord.display());
        println!("  bulwark --data-dir {} ls db --rp latest --disk os", coord.display());
        println!("Ctrl-C stops them.");
        let (tx, rx) = std::sync::mpsc::channel();
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
            let _ = tx.send(());
        });
        let _ = rx.recv();
    }
    drop(agents);
    Ok(())
}
