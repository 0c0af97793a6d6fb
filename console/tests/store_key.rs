//! The store key lives apart from the store (`pki/store.key`, `key_file` in coordinator.toml),
//! and its printable recovery copy brings a store back: with real processes, a store whose key
//! is gone refuses to start and names where the key was expected; `key import` of a mistyped
//! copy or of another store's key is refused; the right copy restores it and a recovery point
//! restores bit-exact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn serve(c_root: &std::path::Path, dir: &str, log: &str) -> Daemon {
    Daemon::spawn(&["x-coordinator", "serve", "--data-dir", dir], c_root.join(log))
}

/// Runs `bulwark x-coordinator key import …` with `stdin` on its standard input.
fn import_from_stdin(dir: &str, stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .args(["x-coordinator", "key", "import", "--data-dir", dir])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Stops a daemon with SIGTERM and waits for it to exit.
fn stop(d: &mut Daemon) {
    d.signal(15);
    wait_until("the coordinator stops", Duration::from_secs(30), || !d.is_running());
}

#[test]
fn a_store_without_its_key_refuses_to_start_and_its_recovery_copy_brings_it_back() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("coord");
    let dir_s = dir.to_str().unwrap().to_owned();
    ok(&["x-coordinator", "init", "--data-dir", &dir_s, "--listen", "127.0.0.1:0", "--name", "coord1", "--encrypt"]);
    let key_file = dir.join("pki/store.key");
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!dir.join("store/key").exists(), "the key is not beside the packs");
    let config = std::fs::read_to_string(dir.join("coordinator.toml")).unwrap();
    assert!(config.lines().any(|l| l == r#"key_file = "pki/store.key""#), "{config}");
    assert_eq!(std::fs::metadata(dir.join("coordinator.toml")).unwrap().permissions().mode() & 0o777, 0o600);
    let key_bytes = std::fs::read(&key_file).unwrap();

    let coordinator = serve(root.path(), &dir_s, "coord.log");
    wait_until("coordinator.addr", Duration::from_secs(20), || dir.join("coordinator.addr").exists());
    let mut c = Cluster { root, coordinator, agents: vec![] };
    let sim_root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 21,
        ..CreateVm::new("k", "node1", vec![DiskConfig { name: "os".into(), size: 8 << 20 }])
    };
    sim::create_vm(&sim_root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &sim_root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("k").is_some());
    c.json(&["group", "create", "g", "--vm", "k", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("k").unwrap()["replica_state"] == "consistent");
    let want = sim_disk(&sim_root, "k", "os");
    let rp = c.json(&["rp", "list", "k"])[0]["id"].as_str().unwrap().to_owned();

    // The recovery copy: one printable line, the same in JSON.
    let copy = ok(&["x-coordinator", "key", "export", "--data-dir", &dir_s]).trim().to_owned();
    assert!(copy.starts_with("bwk1_") && !copy.contains(char::is_whitespace), "{copy}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["x-coordinator", "key", "export", "--data-dir", &dir_s, "--output", "json"]))
            .unwrap();
    assert_eq!(json["key"], copy.as_str());
    assert_eq!(json["key_file"], key_file.to_str().unwrap());

    // The key is lost: the store reads nothing, and says where the key was expected.
    stop(&mut c.coordinator);
    std::fs::remove_file(&key_file).unwrap();
    let mut refused = serve(c.root.path(), &dir_s, "refused.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = refused.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "a coordinator without its store key kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    let log = refused.log_text();
    let error = log.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line in {log}"));
    assert!(error.contains("the store is encrypted but its key is missing"), "{error}");
    assert!(error.contains(&format!("expected at {}", key_file.display())), "{error}");
    assert!(!dir.join("coordinator.addr").exists(), "it never listened");
    let out = bulwark(&["x-coordinator", "key", "export", "--data-dir", &dir_s]);
    assert_eq!(out.status.code(), Some(1));

    // A mistyped copy and another store's key are refused, and nothing is written.
    let last = copy.chars().last().unwrap();
    let typo = format!("{}{}", &copy[..copy.len() - 1], if last == 'a' { 'b' } else { 'a' });
    let out = bulwark(&["x-coordinator", "key", "import", "--data-dir", &dir_s, &typo]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("mistyped"), "{stderr}");
    let foreign = bulwark_coordinator::store::key::recovery_copy(&[9u8; 32]);
    let out = bulwark(&["x-coordinator", "key", "import", "--data-dir", &dir_s, &foreign]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the key of the store"), "{out:?}");
    assert!(!key_file.exists());

    // The right copy (typed with dashes, on stdin) restores the key.
    let dashed: String =
        copy.chars().enumerate().flat_map(|(i, ch)| [Some(ch), (i % 6 == 5).then_some('-')]).flatten().collect();
    let out = import_from_stdin(&dir_s, &format!("{dashed}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&key_file).unwrap(), key_bytes);
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

    c.coordinator = serve(c.root.path(), &dir_s, "coord2.log");
    wait_until("coordinator.addr", Duration::from_secs(20), || dir.join("coordinator.addr").exists());
    // A running coordinator's key is never replaced by another.
    let out = bulwark(&["x-coordinator", "key", "import", "--data-dir", &dir_s, &foreign]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a different store key"), "{out:?}");
    assert_eq!(std::fs::read(&key_file).unwrap(), key_bytes);
    assert_eq!(c.recover_disk("k", &rp, "os"), want, "the recovery point restores bit-exact");
}
