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
        // Short polls: the table's times of quick jobs are measured around them.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of the final table.
struct Row {
    what: String,
    vm: String,
    bytes: u64,
    secs: f64,
    consistency: Option<String>,
    verified: Option<bool>,
}

impl Row {
    /// `secs`: the wall time measured around the job, when the quickstart started it; else the
    /// job's own (whole-second) timestamps.
    fn from_job(what: &str, j: &JobInfo, verified: Option<bool>, secs: Option<f64>) -> Row {
        let secs = secs.unwrap_or(match (j.started_at, j.finished_at) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64,
            _ => 0.0,
        });
        Row {
            what: what.into(),
            vm: j.vm.clone().unwrap_or_default(),
            bytes: j.bytes_transferred,
            secs,
            consistency: j.consistency.clone(),
            verified,
        }
    }
}

/// BLAKE3 of a sim VM's disk as the guest sees it.
fn digest_of_vm(root: &Path, vm: &str) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    sim::read_disk(root, vm, "os", &mut h)?;
    Ok(h.finalize())
}

/// Writes an MBR disk with one FAT partition holding `/etc/motd` into the VM, as the guest
/// would (tracked writes).
fn write_partitioned_fat(root: &Path, vm: &str, scratch: &Path, motd: &[u8]) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let fat = scratch.with_extension("fat");
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&fat)?;
        f.set_len(32 << 20)?;
        fatfs::format_volume(&f, fatfs::FormatVolumeOptions::new())?;
        let fs = fatfs::FileSystem::new(&f, fatfs::FsOptions::new())?;
        let etc = fs.root_dir().create_dir("etc")?;
        etc.create_file("motd")?.write_all(motd)?;
        etc.create_file("hostname")?.write_all(b"db\n")?;
    }
    let mut d = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(scratch)?;
    d.set_len(DISK)?;
    let mut mbr = mbrman::MBR::new_from(&mut d, 512, [0x42, 0x57, 0x4b, 0x21]).map_err(|e| anyhow::anyhow!("{e}"))?;
    mbr[1] = mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_INACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys: 0x0c,
        last_chs: mbrman::CHS::empty(),
        starting_lba: 2048,
        sectors: 65536,
    };
    mbr.write_into(&mut d).map_err(|e| anyhow::anyhow!("{e}"))?;
    d.seek(SeekFrom::Start(1 << 20))?;
    d.write_all(&std::fs::read(&fat)?)?;
    drop(d);
    let image = std::fs::read(scratch)?;
    let mut v = sim::Vm::open(root, vm)?;
    for (i, chunk) in image.chunks(1 << 20).enumerate() {
        if chunk.iter().any(|b| *b != 0) {
            v.guest_write("os", (i as u64) << 20, chunk)?;
        }
    }
    std::fs::remove_file(&fat)?;
    std::fs::remove_file(scratch)?;
    Ok(())
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

    step("three sim VMs on a two-node cluster: web (Windows, online), db (Linux, a FAT file system in an MBR partition), legacy (offline)");
    let vms =
        [("web", "node1", "windows", true), ("db", "node2", "linux", true), ("legacy", "node1", "windows", false)];
    for (i, (name, host, os, integration)) in vms.iter().enumerate() {
        let req = CreateVm {
            os: (*os).into(),
            integration_services: *integration,
            random_fill: *name != "db",
            seed: i as u64 + 1,
            ..CreateVm::new(name, host, vec![DiskConfig { name: "os".into(), size: DISK }])
        };
        sim::create_vm(&sim_root, &req)?;
    }
    sim::set_state(&sim_root, "legacy", sim::Power::Off)?;
    let motd = b"Welcome to db. Restored by Bulwark from a recovery point.\n";
    write_partitioned_fat(&sim_root, "db", &root.join("db-disk.img"), motd)?;
    step("two agents enroll with one-time join tokens and connect over QUIC + mutual TLS");
    let mut agents = vec![];
    for host in ["node1", "node2"] {
        // Both hosts in one cluster: VMs migrate between them.
        let token = me(&[
            "x-coordinator",
            "token",
            "create",
            "--data-dir",
            &coord_s,
            "--ttl",
            "10m",
            "--host",
            host,
            "--cluster",
            "quickstart",
        ])?;
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
    let vm_list = || -> anyhow::Result<Vec<bulwark_protocol::messages::VmSummary>> {
        let take = |r| match r {
            AdminResponse::Vms(p) => Some(p),
            _ => None,
        };
        Ok(rt.block_on(client.list_all(|page| AdminRequest::VmList { page }, take))?)
    };
    wait_for("the agents to report the VMs", Duration::from_secs(60), || Ok((vm_list()?.len() == 3).then_some(())))?;
    let mut rows: Vec<Row> = vec![];
    let wait_job = |id: u64, what: &str| -> anyhow::Result<JobInfo> {
        wait_for(what, Duration::from_secs(300), || {
            Ok(match ask(AdminRequest::JobShow { id })? {
                AdminResponse::Job(j) if j.state == "succeeded" => Some(j),
                AdminResponse::Job(j) if j.state == "failed" || j.state == "cancelled" => {
                    bail!("{what} failed: {}", j.error.unwrap_or_default())
                }
                _ => None,
            })
        })
    };
    let started_job = |r: AdminResponse| -> anyhow::Result<u64> {
        match r {
            AdminResponse::JobStarted { job_id } => Ok(job_id),
            other => bail!("unexpected answer {other:?}"),
        }
    };
    let jobs_of = |vm: &str| -> anyhow::Result<Vec<JobInfo>> {
        let take = |r| match r {
            AdminResponse::Jobs(p) => Some(p),
            _ => None,
        };
        let make = |page| AdminRequest::JobList { vm: Some(vm.into()), state: None, page };
        Ok(rt.block_on(client.list_all(make, take))?)
    };

    step("protection group `demo`: initial replicas now, consistency checks whenever a replica becomes inconsistent");
    let policy = PolicySpec {
        sync_every_secs: None,
        recovery_points: vec![],
        express_full_before_rp: false,
        retention_secs: 5 * 86_400,
        cc_when_inconsistent: true,
        cc_at: None,
        replica_creation: "now".into(),
        block_size: 1 << 20,
        exclude_disks: vec![],
        verify: Default::default(),
    };
    ask(AdminRequest::GroupCreate {
        name: "demo".into(),
        vms: vms.iter().map(|v| v.0.to_owned()).collect(),
        policy,
        auto_cluster: None,
    })?;
    wait_for("the initial replicas", Duration::from_secs(300), || {
        Ok(vm_list()?.iter().all(|v| v.replica_state == "consistent").then_some(()))
    })?;
    for (name, ..) in &vms {
        // The replica is committed a moment before its job is recorded as succeeded.
        let j = wait_for(&format!("the initial job of {name}"), Duration::from_secs(60), || {
            Ok(jobs_of(name)?.into_iter().find(|j| j.kind == "initial" && j.state == "succeeded"))
        })?;
        rows.push(Row::from_job("initial replica", &j, None, None));
    }

    step("the guests write 2 % of their disks; an express full of each moves only that");
    for (i, (name, ..)) in vms.iter().enumerate() {
        sim::churn(&sim_root, name, 2.0, 100 + i as u64)?;
        let t = Instant::now();
        let id = started_job(ask(AdminRequest::Backup { vm: (*name).into(), kind: BackupKind::ExpressFull })?)?;
        let j = wait_job(id, &format!("the express full of {name}"))?;
        rows.push(Row::from_job("express full", &j, None, Some(t.elapsed().as_secs_f64())));
    }

    step("web migrates live to node2; its next express full runs there and moves only the new churn");
    sim::migrate(&sim_root, "web", "node2", false)?;
    wait_for("node2 to report web", Duration::from_secs(60), || {
        Ok(vm_list()?.iter().any(|v| v.name == "web" && v.host == "node2").then_some(()))
    })?;
    sim::churn(&sim_root, "web", 2.0, 7)?;
    let t = Instant::now();
    let id = started_job(ask(AdminRequest::Backup { vm: "web".into(), kind: BackupKind::ExpressFull })?)?;
    let j = wait_job(id, "the express full after migration")?;
    rows.push(Row::from_job("express full on node2", &j, None, Some(t.elapsed().as_secs_f64())));

    step("node2 loses power: tracking is lost for web and db, and consistency checks run by themselves");
    let crashed = sim::crash_host(&sim_root, "node2")?;
    for vm in &crashed {
        let j = wait_for(&format!("the consistency check of {vm}"), Duration::from_secs(300), || {
            Ok(jobs_of(vm)?.into_iter().find(|j| j.kind == "consistency-check" && j.state == "succeeded"))
        })?;
        rows.push(Row::from_job("consistency check", &j, None, None));
    }

    step("legacy is restored to node2 as a new VM; every disk and a file are compared with their sources");
    let t = Instant::now();
    let id = started_job(ask(AdminRequest::Recover {
        vm: "legacy".into(),
        rp: "latest".into(),
        to_host: Some("node2".into()),
        name: Some("legacy-copy".into()),
        options: Default::default(),
    })?)?;
    let j = wait_job(id, "the recovery of legacy to node2")?;
    let same = digest_of_vm(&sim_root, "legacy-copy")? == digest_of_vm(&sim_root, "legacy")?;
    rows.push(Row::from_job("recover to node2", &j, Some(same), Some(t.elapsed().as_secs_f64())));
    let restored_dir = root.join("restored");
    std::fs::create_dir_all(&restored_dir)?;
    for (name, ..) in &vms {
        let out = restored_dir.join(format!("{name}-os.img"));
        let req = AdminRequest::RecoverDisk {
            vm: (*name).into(),
            rp: "latest".into(),
            disk: "os".into(),
            options: Default::default(),
        };
        let t = Instant::now();
        // The quickstart's own directory: an image of an earlier run is replaced.
        crate::recover_disk(&target, req, crate::disk_output::Place::check(&out, true, false)?)?;
        let secs = t.elapsed().as_secs_f64();
        let mut restored = blake3::Hasher::new();
        std::io::copy(&mut std::fs::File::open(&out)?, &mut restored)?;
        let same = restored.finalize() == digest_of_vm(&sim_root, name)?;
        rows.push(Row {
            what: "recover disk".into(),
            vm: (*name).into(),
            bytes: DISK,
            secs,
            consistency: None,
            verified: Some(same),
        });
    }
    let files = root.join("restored/db-files");
    let req = AdminRequest::RecoverItems {
        vm: "db".into(),
        rp: "latest".into(),
        disk: "os".into(),
        paths: vec!["/p1/etc".into()],
        options: Default::default(),
    };
    let t = Instant::now();
    let (head, mut recv) = rt.block_on(client.request_stream(req))?;
    anyhow::ensure!(matches!(head, AdminResponse::ItemsStream { .. }), "unexpected answer {head:?}");
    let w = rt.block_on(bulwark_agent::items_writer::write_items(&mut recv, &files, Default::default()))?;
    let same = std::fs::read(files.join("etc/motd"))? == motd;
    rows.push(Row {
        what: "recover file /p1/etc/motd".into(),
        vm: "db".into(),
        bytes: w.bytes,
        secs: t.elapsed().as_secs_f64(),
        consistency: None,
        verified: Some(same),
    });
    rt.block_on(client.close());

    println!();
    let header = ["JOB", "VM", "MOVED", "TIME", "THROUGHPUT", "CONSISTENCY", "VERIFIED"];
    println!(
        "{:<26} {:<12} {:>11} {:>8} {:>12} {:<12} {}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6]
    );
    for r in &rows {
        let rate = if r.secs > 0.0 && r.bytes > 0 {
            format!("{}/s", format_size((r.bytes as f64 / r.secs) as u64))
        } else {
            "-".into()
        };
        println!(
            "{:<26} {:<12} {:>11} {:>8} {:>12} {:<12} {}",
            r.what,
            r.vm,
            format_size(r.bytes),
            if r.secs > 0.0 { format!("{:.2}s", r.secs) } else { "<1s".into() },
            rate,
            r.consistency.as_deref().unwrap_or("-"),
            match r.verified {
                Some(true) => "bit-exact",
                Some(false) => "DIFFERS",
                None => "-",
            }
        );
    }
    let verified = rows.iter().filter(|r| r.verified == Some(true)).count();
    let failed = rows.iter().filter(|r| r.verified == Some(false)).count();
    let kept = if temporary {
        "a temporary directory, removed now; --dir DIR keeps it".to_owned()
    } else {
        format!("everything is in {}", root.display())
    };
    println!();
    println!(
        "{} VMs protected, {verified} restores verified bit for bit, in {:.1} s ({kept})",
        vms.len(),
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} restore(s) differ from their source");
    }
    if !temporary && !keep_running {
        // The coordinator has stopped: the hint starts it again with this same executable.
        let me = std::env::current_exe().map_or_else(|_| "bulwark".into(), |p| p.display().to_string());
        println!();
        println!("Everything is kept in {}. To look around, start the coordinator again:", root.display());
        println!("  {me} x-coordinator serve --data-dir {} &", coord.display());
        println!("  {me} --data-dir {} vm list     # or: job list, rp list web", coord.display());
        println!("(or run the quickstart with --keep-running).");
    }
    if keep_running {
        println!();
        println!("The coordinator and both agents keep running. Try:");
        println!("  bulwark --data-dir {} vm list", coord.display());
        println!("  bulwark --data-dir {} rp list web", coord.display());
        println!("  bulwark --data-dir {} ls db --rp latest --disk os /p1", coord.display());
        println!("Ctrl-C stops them.");
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    drop(agents);
    Ok(())
}
