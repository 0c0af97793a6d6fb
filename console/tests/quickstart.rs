//! The README's first command, for real: `bulwark quickstart` runs a coordinator and two
//! agents as child processes, protects three VMs, and verifies every restore bit for bit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

#[test]
fn the_quickstart_tells_the_whole_story_and_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("qs");
    let out = ok(&["quickstart", "--dir", work.to_str().unwrap()]);
    assert!(out.contains("3 VMs protected, 5 restores verified bit for bit"), "{out}");
    for (vm, c) in [("web", "app"), ("db", "filesystem"), ("legacy", "crash")] {
        let line = out.lines().find(|l| l.starts_with("express full ") && l.contains(&format!(" {vm} "))).unwrap();
        assert!(line.contains(c) && line.contains("1.0 MiB"), "2 % churn of 64 MiB moves one block: {line}");
        let restore = out.lines().find(|l| l.starts_with("recover disk") && l.contains(&format!(" {vm} "))).unwrap();
        assert!(restore.ends_with("bit-exact"), "{restore}");
    }
    assert!(out.lines().any(|l| l.starts_with("express full on node2") && l.contains("1.0 MiB")), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("consistency check")).count(), 2, "db and web after the crash");
    assert!(out.lines().any(|l| l.starts_with("recover to node2") && l.ends_with("bit-exact")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("recover file /p1/etc/motd") && l.ends_with("bit-exact")), "{out}");
    assert!(work.join("coordinator/coordinator.toml").exists(), "--dir keeps everything");
    assert!(!work.join("coordinator/coordinator.addr").exists(), "the coordinator stopped cleanly");
    let again = bulwark(&["quickstart", "--dir", work.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "a used directory is refused");

    // The closing hint works with only the `bulwark` executable: it names the serve command
    // and the list command, and they do what it says.
    let hint = |needle: &str| -> Vec<String> {
        let line = out.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no hint with {needle}: {out}"));
        let words: Vec<String> =
            line.split_whitespace().take_while(|w| *w != "&" && *w != "#").map(str::to_owned).collect();
        assert!(words[0].ends_with("bulwark"), "{line}");
        words[1..].to_vec()
    };
    let serve = hint("x-coordinator serve");
    let args: Vec<&str> = serve.iter().map(String::as_str).collect();
    let mut coordinator = Daemon::spawn(&args, dir.path().join("serve.log"));
    wait_until("coordinator.addr", std::time::Duration::from_secs(20), || {
        work.join("coordinator/coordinator.addr").exists()
    });
    let mut list = hint("vm list");
    list.extend(["--output".into(), "json".into()]);
    let args: Vec<&str> = list.iter().map(String::as_str).collect();
    let vms: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert!(vms.as_array().unwrap().iter().any(|v| v["name"] == "web"), "{vms}");
    coordinator.signal(15);
    let _ = coordinator.child.wait();
}
