//! The scheduler with the real daemons: a group's synchronization schedule is persisted (a
//! restart keeps the next-run time rather than recomputing it), fires by itself, moves the
//! churn, and advances.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::time::Duration;

#[test]
fn a_synchronization_schedule_survives_a_restart_and_fires() {
    // Scheduled starts spread over 1 s instead of a minute, to keep the test short.
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("start_jitter = \"1m\""), "{text}");
        std::fs::write(&path, text.replace("start_jitter = \"1m\"", "start_jitter = \"1s\"")).unwrap();
    });
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 4,
        ..CreateVm::new("web", "node1", vec![DiskConfig { name: "os".into(), size: 8 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("web").is_some());
    c.json(&["group", "create", "g", "--vm", "web", "--sync-every", "1m", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("web").unwrap()["replica_state"] == "consistent");
    let next = |c: &Cluster| c.json(&["group", "show", "g"])["next_runs"]["sync"].as_str().map(str::to_owned);
    wait_until("the sync schedule has a next run", Duration::from_secs(10), || next(&c).is_some());
    let first = next(&c).unwrap();

    c.coordinator.signal(15);
    let _ = c.coordinator.child.wait();
    c.coordinator = Daemon::spawn(
        &["x-coordinator", "serve", "--data-dir", &c.dir_str()],
        c.root.path().join("coord-restarted.log"),
    );
    wait_until("coordinator.addr", Duration::from_secs(20), || c.dir().join("coordinator.addr").exists());
    assert_eq!(next(&c).unwrap(), first, "the next run is persisted, not recomputed at start");

    sim::churn(&root, "web", 15.0, 1).unwrap();
    wait_until("a scheduled synchronization", Duration::from_secs(150), || {
        c.json(&["job", "list", "--vm", "web"])
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "sync" && j["state"] == "succeeded")
    });
    let jobs = c.json(&["job", "list", "--vm", "web"]);
    let sync = jobs.as_array().unwrap().iter().find(|j| j["kind"] == "sync").unwrap().clone();
    assert_eq!(sync["bytes_transferred"], 1 << 20, "15 % of 8 one-MiB blocks: one block");
    wait_until("the schedule advanced", Duration::from_secs(10), || next(&c).is_some_and(|n| n > first));
}
