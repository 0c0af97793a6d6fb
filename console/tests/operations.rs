//! The operations surface: the Prometheus endpoint of a real coordinator (scraped over plain
//! HTTP on loopback while it protects a sim VM, and held open by 1,000 idle connections while
//! a coordinator with few file descriptors commits a backup), shell completions of all three
//! binaries, and the example configuration files in `docs/examples/`, loaded by the real
//! binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// A GET that may fail (the endpoint may be busy): the status line.
fn try_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().next().map(str::to_owned)
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn the_metrics_endpoint_reports_jobs_replicas_agents_and_store() {
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        std::fs::write(&path, text).unwrap();
    });
    let addr_file = c.dir().join("metrics.addr");
    wait_until("metrics.addr", Duration::from_secs(20), || addr_file.exists());
    let addr = std::fs::read_to_string(&addr_file).unwrap();

    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(metric(&body, "bulwark_agents_connected"), Some(0.0), "{body}");
    assert_eq!(metric(&body, "bulwark_vms_protected"), Some(0.0));

    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 5,
        ..CreateVm::new("m", "node1", vec![DiskConfig { name: "os".into(), size: 8 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("m").is_some());
    c.json(&["group", "create", "g", "--vm", "m", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || {
        c.json(&["job", "list", "--vm", "m", "--state", "succeeded"]).as_array().unwrap().len() == 1
    });

    // A scrape is cached for a second, so the first one after the job may still show the
    // catalog as it was: wait for a fresh one.
    let mut body = String::new();
    wait_until("a scrape after the job", Duration::from_secs(10), || {
        body = http_get(&addr, "/metrics").1;
        metric(&body, "bulwark_recovery_points") == Some(1.0)
    });
    assert_eq!(metric(&body, "bulwark_agents_connected"), Some(1.0), "{body}");
    assert_eq!(metric(&body, "bulwark_agents_enrolled"), Some(1.0));
    assert_eq!(metric(&body, "bulwark_vms_protected"), Some(1.0));
    assert_eq!(
        metric(&body, r#"bulwark_jobs_finished_total{kind="initial",outcome="succeeded"}"#),
        Some(1.0),
        "{body}"
    );
    assert_eq!(metric(&body, r#"bulwark_transferred_bytes_total{kind="initial"}"#), Some((8 << 20) as f64));
    assert_eq!(metric(&body, r#"bulwark_replicas{state="consistent"}"#), Some(1.0));
    assert_eq!(metric(&body, "bulwark_recovery_points"), Some(1.0));
    assert!(metric(&body, "bulwark_store_bytes").unwrap() >= (8 << 20) as f64);

    // Anything else is refused plainly; an oversized request head does not hurt the server.
    assert_eq!(http_get(&addr, "/nope").0, "HTTP/1.1 404 Not Found");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let _ = s.write_all(&vec![b'A'; 20_000]);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert_eq!(http_get(&addr, "/metrics").0, "HTTP/1.1 200 OK");
}

/// The descriptor limit the coordinator runs under below: 1,000 connections would exhaust it.
const FD_LIMIT: u64 = 256;

/// Descriptors a process has open now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn idle_metrics_connections_cannot_starve_a_backup_of_file_descriptors() {
    // This test itself holds 1,000 sockets.
    bulwark_coordinator::server::fds::raise_limit().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("coord");
    let dir_s = dir.to_str().unwrap().to_owned();
    ok(&["x-coordinator", "init", "--data-dir", &dir_s, "--listen", "127.0.0.1:0", "--name", "coord1"]);
    let mut text = std::fs::read_to_string(dir.join("coordinator.toml")).unwrap();
    text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(dir.join("coordinator.toml"), text).unwrap();
    // Soft and hard limit both: the coordinator cannot raise its way out of it.
    let log = root.path().join("coord.log");
    let child = std::process::Command::new("sh")
        .args(["-c", &format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\"")])
        .arg(bin())
        .args(["x-coordinator", "serve", "--data-dir", &dir_s])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut c = Cluster { root, coordinator: Daemon { child, log }, agents: vec![] };
    let addr_file = c.dir().join("metrics.addr");
    wait_until("metrics.addr", Duration::from_secs(20), || addr_file.exists());
    let addr = std::fs::read_to_string(&addr_file).unwrap();
    let pid = c.coordinator.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    assert_eq!(nofile.split_whitespace().nth(3), Some(FD_LIMIT.to_string().as_str()), "{nofile}");

    let sim_root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 11,
        ..CreateVm::new("m", "node1", vec![DiskConfig { name: "os".into(), size: 8 << 20 }])
    };
    sim::create_vm(&sim_root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &sim_root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("m").is_some());
    c.json(&["group", "create", "g", "--vm", "m", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("m").unwrap()["replica_state"] == "consistent");
    sim::churn(&sim_root, "m", 2.0, 12).unwrap();
    let want = sim_disk(&sim_root, "m", "os");

    // 1,000 connections that never send a byte, held open by this test.
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|i| {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let job = c.run(&["backup", "m", "--kind", "express-full", "--wait", "--output", "json"]);
    assert!(
        job.status.success(),
        "the backup failed while the metrics port was flooded: {}\n{}",
        String::from_utf8_lossy(&job.stderr),
        String::from_utf8_lossy(&job.stdout)
    );
    let job: serde_json::Value = serde_json::from_slice(&job.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "express-full");
    let in_use = open_fds(pid) as u64;
    assert!(in_use < FD_LIMIT - bulwark_coordinator::server::fds::MIN_RESERVE, "{in_use} descriptors open");
    assert_eq!(c.recover_disk("m", "latest", "os"), want, "the recovery point restores bit-exact");

    drop(idle);
    wait_until("/metrics answers again", Duration::from_secs(30), || {
        try_get(&addr, "/metrics").as_deref() == Some("HTTP/1.1 200 OK")
    });
    assert!(c.coordinator.is_running());
}

#[test]
fn all_three_binaries_print_shell_completions() {
    // (`x-coordinator` and `x-agent` are the console's multi-call names for the daemons.)
    for (prog, word) in [(None, "recover-items"), (Some("x-coordinator"), "token"), (Some("x-agent"), "enroll")] {
        for shell in ["bash", "zsh", "fish"] {
            let args: Vec<&str> = prog.into_iter().chain(["completions", shell]).collect();
            let out = ok(&args);
            assert!(out.contains(word), "{prog:?} {shell} completions lack {word}");
        }
    }
    let out = bulwark(&["completions", "tcsh-or-so"]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn the_example_configurations_are_what_the_binaries_load() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    // The coordinator's example, dropped into a freshly initialized data dir, starts a server.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("coord");
    // (`--encrypt`: the example's store is encrypted, with its key where `key_file` says.)
    ok(&["x-coordinator", "init", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--encrypt"]);
    let example = std::fs::read_to_string(docs.join("coordinator.toml")).unwrap();
    let example = example
        .replace("0.0.0.0:7443", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0")
        .replace("backup1.example.com:7443", "127.0.0.1:7443");
    std::fs::write(dir.join("coordinator.toml"), example).unwrap();
    let d = Daemon::spawn(&["x-coordinator", "serve", "--data-dir", dir.to_str().unwrap()], tmp.path().join("c.log"));
    wait_until("the example coordinator serves", Duration::from_secs(20), || dir.join("metrics.addr").exists());
    drop(d);
    // The agent's example loads as an agent.toml.
    let agent_dir = bulwark_agent::config::AgentDir::new(tmp.path().join("agent"));
    std::fs::create_dir_all(&agent_dir.root).unwrap();
    std::fs::copy(docs.join("agent.toml"), agent_dir.config()).unwrap();
    let cfg = bulwark_agent::config::AgentConfig::load(&agent_dir).unwrap();
    assert_eq!(cfg.hypervisor.kind, "sim");
    // The systemd units start the daemons the way the docs say.
    for (unit, exec) in [
        ("bulwark-coordinator.service", "/usr/local/bin/bulwark-coordinator serve --data-dir /var/lib/bulwark"),
        ("bulwark-agent.service", "/usr/local/bin/bulwark-agent run --data-dir /var/lib/bulwark-agent"),
    ] {
        let text = std::fs::read_to_string(docs.join("systemd").join(unit)).unwrap();
        assert!(text.lines().any(|l| l == format!("ExecStart={exec}")), "{unit}");
        assert!(text.contains("KillSignal=SIGTERM"), "{unit}: the daemons stop cleanly on SIGTERM");
    }
}
