//! Scale: hundreds of sim VMs (small sparse disks) in one group on one coordinator with two
//! agents. Every initial replica completes, the job queue never runs more than its bounds
//! (`[jobs] max_running`, `per_agent`), and the coordinator's peak RSS and catalog size are
//! printed for the record. `BULWARK_SCALE_VMS` sets the number of VMs (default 800).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use common::*;
use std::time::{Duration, Instant};

#[test]
fn hundreds_of_vms_get_their_initial_replicas_within_the_bounds() {
    let n: usize = std::env::var("BULWARK_SCALE_VMS").ok().and_then(|v| v.parse().ok()).unwrap_or(800);
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("max_running = 8") && text.contains("per_agent = 2"), "{text}");
        let text = text.replace("max_running = 8", "max_running = 6").replace("per_agent = 2", "per_agent = 3");
        std::fs::write(&path, text).unwrap();
    });
    let root = c.root.path().join("sim");
    let mut names = vec![];
    for i in 0..n {
        let name = format!("vm{i:04}");
        let host = if i % 2 == 0 { "node1" } else { "node2" };
        sim::create_vm(&root, &CreateVm::new(&name, host, vec![DiskConfig { name: "os".into(), size: 64 << 20 }]))
            .unwrap();
        // A little data at a VM-specific place, the rest of the disk sparse.
        let mut vm = Vm::open(&root, &name).unwrap();
        vm.guest_write("os", (i as u64 % 60) << 20, &[(i % 251) as u8 + 1; 8192]).unwrap();
        names.push(name);
    }
    c.enroll("node1");
    c.enroll("node2");
    c.run_sim_agent("node1", &root);
    c.run_sim_agent("node2", &root);
    wait_until("every VM reported", Duration::from_secs(120), || {
        c.json(&["vm", "list"]).as_array().unwrap().len() == n
    });

    let started = Instant::now();
    let members = names.join(",");
    c.json(&["group", "create", "big", "--vm", &members, "--sync-every", "off", "--recovery-points", "none"]);
    let mut peak_rss = 0;
    wait_until("every initial replica", Duration::from_secs(900), || {
        peak_rss = peak_rss.max(c.coordinator.rss_kib());
        let vms = c.json(&["vm", "list"]);
        vms.as_array().unwrap().iter().all(|v| v["replica_state"] == "consistent")
    });
    let elapsed = started.elapsed();
    // Each replica is committed a moment before its job is recorded as succeeded; each VM
    // gets one initial copy (a request that raced its own copy's commit is void).
    let initial_copies = |c: &Cluster| {
        let jobs = c.json(&["job", "list", "--state", "succeeded"]);
        let mut per_vm = std::collections::BTreeMap::<String, usize>::new();
        for j in jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "initial") {
            *per_vm.entry(j["vm"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        per_vm
    };
    wait_until("every initial job recorded", Duration::from_secs(60), || initial_copies(&c).len() == n);
    let twice: Vec<_> = initial_copies(&c).into_iter().filter(|(_, k)| *k > 1).collect();
    assert!(twice.is_empty(), "VMs copied more than once: {twice:?}");

    // The bounds, from the queue's own account of every start.
    let log = c.coordinator.log_text();
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.trim_end_matches(',').parse().ok())
    };
    let starts: Vec<&str> = log.lines().filter(|l| l.contains("job starting")).collect();
    assert!(starts.len() >= n);
    let max_running = starts.iter().filter_map(|l| field(l, "running=")).max().unwrap();
    let max_on_host = starts.iter().filter_map(|l| field(l, "on_host=")).max().unwrap();
    assert!(max_running <= 6, "at most 6 jobs at once, saw {max_running}");
    assert!(max_on_host <= 3, "at most 3 per agent, saw {max_on_host}");

    let catalog_bytes = c.json(&["status"])["catalog_bytes"].as_u64().unwrap();
    println!(
        "scale: {n} VMs, initial replicas in {:.1} s, peak running {max_running} (≤ 6), per agent {max_on_host} (≤ 3), \
         coordinator peak RSS {} MiB, catalog {} MiB",
        elapsed.as_secs_f64(),
        peak_rss / 1024,
        catalog_bytes >> 20
    );
}
