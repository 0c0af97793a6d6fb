//! The operations surface: the Prometheus endpoint of a real coordinator (scraped over plain
//! HTTP on loopback while it protects a sim VM), shell completions of all three binaries, and
//! the example configuration files in `docs/examples/`, loaded by the real binaries.

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

    let (_, body) = http_get(&addr, "/metrics");
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
    ok(&["x-coordinator", "init", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
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
