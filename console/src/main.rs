//! `bulwark`, the admin console: a client of the coordinator's admin API.
//!
//! It is also a multi-call launcher (DESIGN §2): `bulwark x-coordinator …` and
//! `bulwark x-agent …` run exactly what `bulwark-coordinator …` and `bulwark-agent …` run, so
//! the quickstart can start every daemon as a child process of this one executable.

#![forbid(unsafe_code)]

mod args;
mod disk_output;
mod lists;
mod mount;
mod quickstart;

use anyhow::Context as _;
use args::*;
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{
    AdminRequest, AdminResponse, AgentInfo, BackupKind, GroupInfo, ItemInfo, JobInfo, MaintenanceKind, PolicyPatch,
    PolicySpec, RecoveryPointInfo, VerifyMode, VmSummary,
};
use bulwark_protocol::text::Escaped;
use clap::Parser;
use lists::PageArgs;
use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("x-coordinator") => {
            if let Ok(exe) = std::env::current_exe() {
                bulwark_coordinator::items::sandbox::set_worker_command(exe, vec!["x-coordinator".into()]);
            }
            args.remove(1);
            args[0] = "bulwark-coordinator".into();
            return bulwark_coordinator::cli::main_with(args);
        }
        Some("x-agent") => {
            args.remove(1);
            args[0] = "bulwark-agent".into();
            return bulwark_agent::cli::main_with(args);
        }
        _ => {}
    }
    let cli = Cli::parse_from(args);
    let format = match (&cli.command, cli.output.as_str()) {
        (Command::RecoverDisk { .. } | Command::Mount { .. } | Command::RecoverItems { dest_host: None, .. }, _)
        | (_, "text") => Output::Text,
        (_, "json") => Output::Json,
        (_, other) => {
            use clap::CommandFactory as _;
            Cli::command()
                .error(clap::error::ErrorKind::InvalidValue, format!("--output {other:?}: use text or json"))
                .exit()
        }
    };
    match run(cli, format) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", bulwark_coordinator::cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn target(cli: &Cli) -> anyhow::Result<AdminTarget> {
    if let Some(addr) = cli.coordinator {
        let (Some(ca), Some(cert), Some(key)) = (&cli.ca, &cli.cert, &cli.key) else {
            anyhow::bail!("--coordinator needs --ca, --cert and --key");
        };
        let name = cli.server_name.clone().unwrap_or_else(|| addr.ip().to_string());
        return Ok(AdminTarget::from_files(addr, name, ca, cert, key)?);
    }
    let dir = cli.data_dir.as_ref().context(
        "say which coordinator: --data-dir DIR (or BULWARK_DATA_DIR), or --coordinator with --ca/--cert/--key",
    )?;
    Ok(AdminTarget::from_data_dir(dir)?)
}

/// Runs a list command, if `command` is one.
fn run_list(cli: &Cli, format: Output) -> Option<anyhow::Result<()>> {
    let paging = match &cli.command {
        Command::Agent { command: AgentCommand::List { page } }
        | Command::Job { command: JobCommand::List { page, .. } }
        | Command::Vm { command: VmCommand::List { page } }
        | Command::Group { command: GroupCommand::List { page } | GroupCommand::Show { page, .. } }
        | Command::Rp { command: RpCommand::List { page, .. } }
        | Command::Ls { page, .. } => page,
        _ => return None,
    };
    Some(list(cli, paging, format))
}

/// Prints the list `cli` asks for, page by page.
fn list(cli: &Cli, paging: &PageArgs, format: Output) -> anyhow::Result<()> {
    let target = target(cli)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = AdminClient::connect(&target).await?;
        let c = &client;
        let r = match &cli.command {
            Command::Agent { .. } => {
                lists::print_list::<AgentInfo>(c, |page| AdminRequest::AgentList { page }, paging, format).await
            }
            Command::Job { command: JobCommand::List { vm, state, .. } } => {
                let make = |page| AdminRequest::JobList { vm: vm.clone(), state: state.clone(), page };
                lists::print_list::<JobInfo>(c, make, paging, format).await
            }
            Command::Vm { command: VmCommand::List { .. } } => {
                lists::print_list::<VmSummary>(c, |page| AdminRequest::VmList { page }, paging, format).await
            }
            Command::Group { command: GroupCommand::Show { name, .. } } => {
                lists::group_show(c, name, paging, format).await
            }
            Command::Group { .. } => {
                lists::print_list::<GroupInfo>(c, |page| AdminRequest::GroupList { page }, paging, format).await
            }
            Command::Rp { command: RpCommand::List { vm, .. } } => {
                let make = |page| AdminRequest::RecoveryPoints { vm: vm.clone(), page };
                lists::print_list::<RecoveryPointInfo>(c, make, paging, format).await
            }
            Command::Ls { vm, rp, disk, path, .. } => {
                let make = |page| AdminRequest::Ls {
                    vm: vm.clone(),
                    rp: rp.clone(),
                    disk: disk.clone(),
                    path: path.clone(),
                    page,
                };
                lists::print_list::<ItemInfo>(c, make, paging, format).await
            }
            _ => Ok(()),
        };
        client.close().await;
        r
    })
}

fn run(cli: Cli, format: Output) -> anyhow::Result<()> {
    if let Some(r) = run_list(&cli, format) {
        return r;
    }
    let request = match &cli.command {
        Command::Quickstart { dir, keep_running } => return quickstart::run(dir.clone(), *keep_running),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(*shell, &mut Cli::command(), "bulwark", &mut std::io::stdout());
            return Ok(());
        }
        Command::Status => AdminRequest::Status,
        Command::Agent { command: AgentCommand::List { .. } }
        | Command::Job { command: JobCommand::List { .. } }
        | Command::Vm { command: VmCommand::List { .. } }
        | Command::Rp { command: RpCommand::List { .. } }
        | Command::Ls { .. } => anyhow::bail!("a list command reached the single-answer path"),
        Command::Agent { command: AgentCommand::Revoke { host } } => AdminRequest::AgentRevoke { host: host.clone() },
        Command::Vm { command: VmCommand::Forget { vm } } => AdminRequest::VmForget { vm: vm.clone() },
        Command::Vm { command: VmCommand::TakeOver { vm } } => AdminRequest::VmTakeOver { vm: vm.clone() },
        Command::Verify { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Verify, wait: *wait },
        Command::Prune { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Prune, wait: *wait },
        Command::Gc { wait } => AdminRequest::Maintenance { kind: MaintenanceKind::Gc, wait: *wait },
        Command::Job { command: JobCommand::Show { id } | JobCommand::Wait { id } } => {
            AdminRequest::JobShow { id: *id }
        }
        Command::Job { command: JobCommand::Cancel { id } } => AdminRequest::JobCancel { id: *id },
        Command::Group { command } => group_request(command)?,
        Command::Backup { vm, kind, .. } => AdminRequest::Backup {
            vm: vm.clone(),
            kind: match kind {
                BackupKindArg::ExpressFull => BackupKind::ExpressFull,
                BackupKindArg::Sync => BackupKind::Sync,
            },
        },
        Command::Cc { vm, .. } => AdminRequest::ConsistencyCheck { vm: vm.clone() },
        Command::RecoverFinish { vm } => AdminRequest::RecoverFinish { vm: vm.clone() },
        Command::Recover { vm, rp, to, host, name, options, instant, finish: true, .. } if *instant => {
            let to_host = host.clone().ok_or_else(|| anyhow::anyhow!("--instant needs --host"))?;
            if *to != RecoverTo::Host || options.wire()? != bulwark_protocol::messages::RecoveryOptions::default() {
                anyhow::bail!("--instant goes with --to host and without --limit, --window or --notify");
            }
            let req = AdminRequest::RecoverInstant { vm: vm.clone(), rp: rp.clone(), to_host, name: name.clone() };
            let target_name = name.clone().unwrap_or_else(|| format!("{vm}-restored"));
            return instant_and_finish(&target(&cli)?, req, target_name, format);
        }
        Command::Recover { vm, rp, to, host, name, options, instant, .. } => {
            if *to == RecoverTo::Original && (host.is_some() || name.is_some() || *instant) {
                anyhow::bail!("--host, --name and --instant go with --to host");
            }
            if *instant {
                if options.wire()? != bulwark_protocol::messages::RecoveryOptions::default() {
                    anyhow::bail!("--instant copies nothing now: --limit, --window and --notify do not apply");
                }
                let to_host = host.clone().ok_or_else(|| anyhow::anyhow!("--instant needs --host"))?;
                AdminRequest::RecoverInstant { vm: vm.clone(), rp: rp.clone(), to_host, name: name.clone() }
            } else {
                AdminRequest::Recover {
                    vm: vm.clone(),
                    rp: rp.clone(),
                    to_host: if *to == RecoverTo::Host { host.clone() } else { None },
                    name: name.clone(),
                    options: options.wire()?,
                }
            }
        }
        Command::Seed { command: SeedCommand::Import { dir } } => {
            let target = target(&cli)?;
            return seed_import(&target, dir, format);
        }
        Command::RecoverItems { vm, rp, disk, paths, dest_host: Some(host), dest, options, keep_modes, .. } => {
            let dest = dest.as_ref().context("--dest-host needs --dest DIR (a directory on that host)")?;
            AdminRequest::RecoverItemsToHost {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                paths: paths.clone(),
                host: host.clone(),
                dest: dest.display().to_string(),
                options: options.wire()?,
                keep_modes: *keep_modes,
            }
        }
        Command::RecoverItems { vm, rp, disk, paths, options, keep_modes, .. } => {
            // CONTRACT: `recover-items … --output DIR`: here the global flag names the directory.
            if cli.output == "text" {
                anyhow::bail!("recover-items needs --output DIR (or --dest-host HOST --dest DIR)");
            }
            let target = target(&cli)?;
            let req = AdminRequest::RecoverItems {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                paths: paths.clone(),
                options: options.wire()?,
            };
            let opts = bulwark_agent::items_writer::WriteOptions { keep_modes: *keep_modes };
            return recover_items(&target, req, std::path::Path::new(&cli.output), opts);
        }
        Command::Mount { vm, rp, disk, nbd, allow_hosts, writable, overlay_dir } => {
            let args = mount::MountArgs {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                nbd: mount::NbdAddress::parse(nbd)?,
                writable: *writable,
                overlay_dir: overlay_dir.clone(),
                allow_hosts: allow_hosts.clone(),
            };
            return mount::run(&target(&cli)?, args);
        }
        Command::RecoverDisk { vm, rp, disk, force, device, options } => {
            // CONTRACT: `recover-disk … --output FILE`: here the global flag names the file.
            if cli.output == "text" {
                anyhow::bail!("recover-disk needs --output FILE");
            }
            let target = target(&cli)?;
            let req = AdminRequest::RecoverDisk {
                vm: vm.clone(),
                rp: rp.clone(),
                disk: disk.clone(),
                options: options.wire()?,
            };
            let place = disk_output::Place::check(std::path::Path::new(&cli.output), *force, *device)?;
            return recover_disk(&target, req, place);
        }
    };
    let target = target(&cli)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let wait_for = match &cli.command {
        Command::Job { command: JobCommand::Wait { id } } => Some(*id),
        _ => None,
    };
    let wait_started = matches!(
        &cli.command,
        Command::Backup { wait: true, .. }
            | Command::Cc { wait: true, .. }
            | Command::Recover { wait: true, .. }
            | Command::RecoverItems { wait: true, .. }
    );
    let response = rt.block_on(async {
        let client = AdminClient::connect(&target).await?;
        let mut r = client.request(request).await;
        let wait_for = match (&r, wait_started) {
            (Ok(AdminResponse::JobStarted { job_id }), true) => {
                let id = *job_id;
                r = client.request(AdminRequest::JobShow { id }).await;
                Some(id)
            }
            _ => wait_for,
        };
        if let Some(id) = wait_for {
            // Poll until the job is final, showing its progress on stderr.
            let mut progress = Progress::new(id);
            while let Ok(AdminResponse::Job(j)) = &r {
                if is_final(j) {
                    break;
                }
                progress.show(j);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                r = client.request(AdminRequest::JobShow { id }).await;
            }
            progress.finish();
        }
        if let Ok(AdminResponse::Group(g)) = &mut r {
            lists::complete_members(&client, g).await?;
        }
        client.close().await;
        r
    })?;
    print(format, &response)?;
    // Waiting for a job makes its failure the command's (`job show` only reports it).
    let waited = !matches!(&cli.command, Command::Job { command: JobCommand::Show { .. } });
    if let (AdminResponse::Job(j), true) = (&response, waited) {
        if j.state == "failed" {
            anyhow::bail!("job {} ({}) failed: {}", j.id, j.kind, j.error.as_deref().unwrap_or("no reason recorded"));
        }
    }
    Ok(())
}

fn group_request(command: &GroupCommand) -> anyhow::Result<AdminRequest> {
    Ok(match command {
        GroupCommand::Create { name, vms, cluster, auto: _, policy } => {
            let p = policy_patch(policy, &[])?;
            let sync_every_secs = p.sync_every_secs.flatten();
            AdminRequest::GroupCreate {
                name: name.clone(),
                vms: vms.clone(),
                auto_cluster: cluster.clone(),
                policy: PolicySpec {
                    sync_every_secs,
                    recovery_points: p
                        .recovery_points
                        .unwrap_or_else(|| bulwark_coordinator::policy::DEFAULT_RECOVERY_POINTS.to_vec()),
                    // Just before a recovery point, unless an interval was asked for.
                    express_full_before_rp: policy.express_full_before_rp || policy.sync_every.is_none(),
                    retention_secs: p.retention_secs.unwrap_or(bulwark_coordinator::policy::DEFAULT_RETENTION_SECS),
                    cc_when_inconsistent: p.cc_when_inconsistent.unwrap_or(true),
                    cc_at: p.cc_at.flatten(),
                    replica_creation: p.replica_creation.unwrap_or_else(|| "now".into()),
                    block_size: p.block_size.unwrap_or(bulwark_coordinator::policy::DEFAULT_BLOCK_SIZE),
                    exclude_disks: p.exclude_disks,
                    verify: p.verify.unwrap_or_default(),
                },
            }
        }
        GroupCommand::Set { name, policy, include_disk } => {
            AdminRequest::GroupSet { name: name.clone(), patch: policy_patch(policy, include_disk)? }
        }
        GroupCommand::List { .. } | GroupCommand::Show { .. } => {
            anyhow::bail!("a list command reached the single-answer path")
        }
        GroupCommand::AddVm { name, vms } => AdminRequest::GroupAddVm { name: name.clone(), vms: vms.clone() },
        GroupCommand::RemoveVm { name, vms, keep_data } => {
            AdminRequest::GroupRemoveVm { name: name.clone(), vms: vms.clone(), keep_data: *keep_data }
        }
        GroupCommand::Delete { name } => AdminRequest::GroupDelete { name: name.clone() },
        GroupCommand::Plan { name } => AdminRequest::GroupPlan { name: name.clone() },
    })
}

/// The policy flags as a change: what was given, parsed and checked for form (the coordinator
/// checks the policy as a whole).
fn policy_patch(a: &PolicyArgs, include: &[String]) -> anyhow::Result<PolicyPatch> {
    let hhmm = |flag: &str, t: &str| {
        bulwark_coordinator::policy::parse_hhmm(t.trim()).with_context(|| format!("{flag}: {t:?} is not HH:MM"))
    };
    let disks = |flag: &str, list: &[String]| -> anyhow::Result<Vec<(String, String)>> {
        list.iter()
            .map(|d| match d.split_once(':') {
                Some((vm, disk)) if !vm.is_empty() && !disk.is_empty() => Ok((vm.to_owned(), disk.to_owned())),
                _ => anyhow::bail!("{flag} {d:?}: give VM:DISK"),
            })
            .collect()
    };
    Ok(PolicyPatch {
        sync_every_secs: match a.sync_every.as_deref() {
            None => None,
            Some("off" | "never") => Some(None),
            Some(d) => Some(Some(
                humantime::parse_duration(d).with_context(|| format!("--sync-every {d:?}: not a duration"))?.as_secs(),
            )),
        },
        recovery_points: match a.recovery_points.as_deref() {
            None => None,
            Some("none" | "") => Some(vec![]),
            Some(list) => Some(list.split(',').map(|t| hhmm("--recovery-points", t)).collect::<anyhow::Result<_>>()?),
        },
        express_full_before_rp: a.express_full_before_rp.then_some(true),
        retention_secs: a
            .retention
            .as_deref()
            .map(|r| humantime::parse_duration(r).with_context(|| format!("--retention {r:?}")).map(|d| d.as_secs()))
            .transpose()?,
        cc_when_inconsistent: if a.no_cc_when_inconsistent {
            Some(false)
        } else {
            a.cc_when_inconsistent.then_some(true)
        },
        cc_at: match a.cc_at.as_deref() {
            None => None,
            Some("off" | "none") => Some(None),
            Some(t) => Some(Some(hhmm("--cc-at", t)?)),
        },
        replica_creation: a.replica.clone(),
        block_size: a
            .block_size
            .as_deref()
            .map(|b| {
                let n =
                    bulwark_protocol::units::parse_size(b).map_err(|e| anyhow::anyhow!("--block-size {b:?}: {e}"))?;
                u32::try_from(n).context("--block-size is too large")
            })
            .transpose()?,
        exclude_disks: disks("--exclude-disk", &a.exclude_disk)?,
        include_disks: disks("--include-disk", include)?,
        verify: a
            .verify
            .as_deref()
            .map(|v| VerifyMode::parse(v).with_context(|| format!("--verify {v:?}: give every-rp, daily or off")))
            .transpose()?,
    })
}

/// `seed import DIR`: each disk's non-zero blocks, checked against the manifest's digest first.
fn seed_import(target: &AdminTarget, dir: &std::path::Path, format: Output) -> anyhow::Result<()> {
    use bulwark_protocol::transfer::{self, TransferMessage};
    use std::io::Read as _;
    let manifest = bulwark_agent::seed::read_manifest(dir)?;
    for d in &manifest.disks {
        let path = dir.join(&d.file);
        let digest = bulwark_agent::seed::image_digest(&path)?;
        anyhow::ensure!(digest == d.blake3, "{} does not match its manifest (damaged seed?)", path.display());
        let len = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.len();
        anyhow::ensure!(len == d.size_bytes, "{} is {len} bytes, the manifest says {}", path.display(), d.size_bytes);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut messages = vec![];
    rt.block_on(async {
        let client = AdminClient::connect(target).await?;
        for d in &manifest.disks {
            let req = AdminRequest::SeedImport {
                vm: manifest.vm.clone(),
                disk: d.name.clone(),
                size_bytes: d.size_bytes,
                source: format!("seed {} (exported {})", dir.display(), fmt_time(Some(manifest.created_at))),
            };
            let (head, mut send, recv) = client.request_upload(req).await?;
            let AdminResponse::SeedReady { block_size } = head else { anyhow::bail!("unexpected answer: {head:?}") };
            let bs = block_size as usize;
            let path = dir.join(&d.file);
            let mut f = std::io::BufReader::with_capacity(bs, std::fs::File::open(&path)?);
            let mut buf = vec![0u8; bs];
            let (mut index, mut sent) = (0u64, 0u64);
            loop {
                let mut n = 0;
                while n < bs {
                    let r = f.read(&mut buf[n..]).with_context(|| format!("{}", path.display()))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 {
                    break;
                }
                if !bulwark_protocol::block::is_zero(&buf[..n]) {
                    let id = bulwark_protocol::block::ChunkHasher::plain().hash(&buf[..n]);
                    transfer::write_body(&mut send, &transfer::block_body(index, &id, &buf[..n]), bs).await?;
                    sent += 1;
                }
                index += 1;
            }
            transfer::write_message(&mut send, &TransferMessage::End { blocks_sent: sent, bytes_read: 0 }, bs).await?;
            let _ = send.finish();
            match client.finish_upload(recv).await? {
                AdminResponse::Done { message } => messages.push(message),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
        client.close().await;
        Ok(())
    })?;
    match format {
        Output::Json => println!("{}", serde_json::json!({ "vm": manifest.vm, "disks": messages })),
        Output::Text => messages.iter().for_each(|m| println!("{m}")),
    }
    Ok(())
}

/// `recover-items --output DIR`.
fn recover_items(
    target: &AdminTarget,
    req: AdminRequest,
    dir: &std::path::Path,
    opts: bulwark_agent::items_writer::WriteOptions,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (rp, w) = rt.block_on(async {
        let client = AdminClient::connect(target).await?;
        let (head, mut recv) = client.request_stream(req).await?;
        let AdminResponse::ItemsStream { rp } = head else { anyhow::bail!("unexpected answer: {head:?}") };
        let w = bulwark_agent::items_writer::write_items(&mut recv, dir, opts).await?;
        client.close().await;
        Ok::<_, anyhow::Error>((rp, w))
    })?;
    println!(
        "recovered {} file(s), {} folder(s), {} link(s), {} bytes from recovery point {rp} into {}{}",
        w.files,
        w.dirs,
        w.links,
        w.bytes,
        dir.display(),
        if w.skipped_count > 0 { format!("; {} entr(ies) skipped", w.skipped_count) } else { String::new() }
    );
    for s in w.skipped_lines() {
        println!("skipped {}", Escaped(&s));
        eprintln!("warning: skipped {}", Escaped(&s));
    }
    Ok(())
}

/// `recover-disk`: the disk's blocks into the place checked by [`disk_output::Place::check`]
/// (a new or replaced file through `FILE.partial`, or a block device in place). SIGINT and
/// SIGTERM end it with the partial file removed.
fn recover_disk(target: &AdminTarget, req: AdminRequest, place: disk_output::Place) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (rp, disk, size) = rt.block_on(async {
        // Signals are caught before anything is created, so none can leave a partial file.
        let mut interrupted = disk_output::Interrupted::catch()?;
        let work = async {
            let client = AdminClient::connect(target).await?;
            let (head, mut recv) = client.request_stream(req).await?;
            let AdminResponse::DiskStream { rp, disk, size_bytes, block_size } = head else {
                anyhow::bail!("unexpected answer: {head:?}");
            };
            let out = place.open(size_bytes)?;
            let r = async {
                bulwark_coordinator::admin_client::receive_disk(
                    &mut recv,
                    size_bytes,
                    block_size,
                    out.file(),
                    out.needs_zeros(),
                )
                .await?;
                out.finish()
            }
            .await;
            client.close().await;
            r.map(|()| (rp, disk, size_bytes))
        };
        tokio::select! {
            r = work => r,
            sig = interrupted.next() => Err(anyhow::anyhow!("{}", place.interrupted(sig))),
        }
    })?;
    println!("disk {disk} of recovery point {rp} ({size} bytes) written to {}", place.path().display());
    Ok(())
}

/// Progress of a job being waited for: an indicatif bar on a terminal, a plain line every
/// few seconds otherwise (logs, CI).
struct Progress {
    id: u64,
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last_line: Option<std::time::Instant>,
    last_state: String,
}

impl Progress {
    fn new(id: u64) -> Self {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "job {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b.set_message(id.to_string());
            b
        });
        Self { id, bar, started: std::time::Instant::now(), last_line: None, last_state: String::new() }
    }

    fn show(&mut self, j: &JobInfo) {
        let done = j.bytes_transferred;
        match &self.bar {
            Some(b) => {
                b.set_length(j.bytes_total.unwrap_or(done).max(done));
                b.set_position(done);
            }
            None => {
                // A line when the state changes, and every 5 s.
                let quiet = self.last_line.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(5));
                if quiet && j.state == self.last_state {
                    return;
                }
                self.last_state = j.state.clone();
                self.last_line = Some(std::time::Instant::now());
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / secs;
                let eta = match j.bytes_total {
                    Some(t) if rate > 0.0 && t > done => {
                        format!(
                            ", ETA {}",
                            humantime::format_duration(std::time::Duration::from_secs(
                                ((t - done) as f64 / rate) as u64
                            ))
                        )
                    }
                    _ => String::new(),
                };
                let total = j.bytes_total.map(|t| format!(" of {}", fmt_size(t))).unwrap_or_default();
                eprintln!("job {} {}: {}{total} ({}/s{eta})", self.id, j.state, fmt_size(done), fmt_size(rate as u64));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `recover --instant --finish`: the instant recovery's job, then `recover-finish` of its VM.
fn instant_and_finish(target: &AdminTarget, req: AdminRequest, vm: String, format: Output) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let response = rt.block_on(async {
        let client = AdminClient::connect(target).await?;
        let AdminResponse::JobStarted { job_id } = client.request(req).await? else {
            anyhow::bail!("unexpected answer to the instant recovery");
        };
        let mut progress = Progress::new(job_id);
        let job = loop {
            let AdminResponse::Job(j) = client.request(AdminRequest::JobShow { id: job_id }).await? else {
                anyhow::bail!("unexpected answer to job show");
            };
            if is_final(&j) {
                break j;
            }
            progress.show(&j);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        };
        progress.finish();
        if job.state != "succeeded" {
            anyhow::bail!(
                "job {} ({}) failed: {}",
                job.id,
                job.kind,
                job.error.as_deref().unwrap_or("no reason recorded")
            );
        }
        eprintln!("{vm} is ready; copying the rest of its disks…");
        let r = client.request(AdminRequest::RecoverFinish { vm }).await;
        client.close().await;
        Ok(r?)
    })?;
    print(format, &response)
}

fn is_final(j: &JobInfo) -> bool {
    matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled")
}

pub(crate) fn fmt_time(secs: Option<u64>) -> String {
    match secs {
        Some(s) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)).to_string()
        }
        None => "never".into(),
    }
}

fn fmt_size(n: u64) -> String {
    bulwark_protocol::units::format_size(n)
}

/// Prints a single answer; text that came from the coordinator is escaped.
fn print(output: Output, response: &AdminResponse) -> anyhow::Result<()> {
    match (output, response) {
        (Output::Json, AdminResponse::Status(s)) => println!(
            "{}",
            serde_json::json!({
                "name": s.name, "version": s.version, "protocol_version": s.protocol_version,
                "agents_connected": s.agents_connected, "agents_enrolled": s.agents_enrolled,
                "vms_protected": s.vms_protected, "jobs_running": s.jobs_running,
                "store_bytes": s.store_bytes, "catalog_bytes": s.catalog_bytes,
            })
        ),
        (Output::Text, AdminResponse::Status(s)) => {
            println!(
                "coordinator      {} (version {}, protocol {})",
                Escaped(&s.name),
                Escaped(&s.version),
                s.protocol_version
            );
            println!("agents           {} connected of {} enrolled", s.agents_connected, s.agents_enrolled);
            println!("VMs protected    {}", s.vms_protected);
            println!("jobs running     {}", s.jobs_running);
            println!("store            {} bytes (catalog {} bytes)", s.store_bytes, s.catalog_bytes);
        }
        (Output::Json, AdminResponse::Revoked { host, serials, connections_closed }) => println!(
            "{}",
            serde_json::json!({ "host": host.as_str(), "serials": serials, "connections_closed": connections_closed })
        ),
        (Output::Text, AdminResponse::Revoked { host, serials, connections_closed }) => {
            if serials.is_empty() {
                println!("{host} was already revoked");
            } else {
                println!("revoked {host} (serial {}); {connections_closed} connection(s) closed", serials.join(", "));
            }
        }
        (Output::Json, AdminResponse::JobStarted { job_id }) => println!("{}", serde_json::json!({ "job_id": job_id })),
        (Output::Text, AdminResponse::JobStarted { job_id }) => println!("job {job_id} started"),
        (Output::Json, AdminResponse::Job(j)) => println!("{}", lists::job_json(j)),
        (Output::Text, AdminResponse::Job(j)) => {
            println!("job {} ({}) {}", j.id, Escaped(&j.kind), Escaped(&j.state));
            println!("  started   {}", fmt_time(j.started_at));
            println!("  finished  {}", fmt_time(j.finished_at));
            if let Some(d) = &j.detail {
                println!("  detail    {}", Escaped(d));
            }
            if let Some(e) = &j.error {
                println!("  error     {}", Escaped(e));
            }
        }
        (Output::Json, AdminResponse::Group(g)) => println!("{}", lists::group_json(g)),
        (Output::Text, AdminResponse::Group(g)) => lists::print_group(g, &mut std::io::stdout().lock())?,
        (Output::Json, AdminResponse::Plan(p)) => println!(
            "{}",
            serde_json::json!({
                "total_data_bytes": p.total_data_bytes, "recommended_bytes": p.recommended_bytes,
                "free_bytes": p.free_bytes, "underprovisioned_bytes": p.underprovisioned_bytes,
                "churn_per_day": p.churn_per_day, "retention_days": p.retention_days,
            })
        ),
        (Output::Text, AdminResponse::Plan(p)) => {
            println!("data              {}", fmt_size(p.total_data_bytes));
            println!(
                "recommended       {} (data × (1 + {:.0}% churn/day × {:.1} days))",
                fmt_size(p.recommended_bytes),
                p.churn_per_day * 100.0,
                p.retention_days
            );
            println!("free              {}", fmt_size(p.free_bytes));
            println!("underprovisioned  {}", fmt_size(p.underprovisioned_bytes));
        }
        (Output::Json, AdminResponse::Done { message }) => println!("{}", serde_json::json!({ "message": message })),
        (Output::Text, AdminResponse::Done { message }) => println!("{}", Escaped(message)),
        (_, other) => println!("{other:?}"),
    }
    Ok(())
}
