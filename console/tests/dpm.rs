//! Protection that behaves the way a DPM administrator expects, with the real daemons: express
//! fulls just before the recovery points (no interval synchronization) at the times `group set`
//! gives, a running express full cancelled (no snapshot left held, the replica inconsistent until
//! the next check repairs it), and disks left out of protection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Vm};
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn fast_starts(dir: &std::path::Path) {
    let path = dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("start_jitter = \"1m\"", "start_jitter = \"1s\"")).unwrap();
}

fn vm(root: &std::path::Path, name: &str, disks: &[(&str, u64)], seed: u64) {
    let req = CreateVm {
        random_fill: true,
        seed,
        ..CreateVm::new(name, "node1", disks.iter().map(|(d, s)| DiskConfig { name: (*d).into(), size: *s }).collect())
    };
    sim::create_vm(root, &req).unwrap();
}

fn jobs(c: &Cluster, vm: &str, kind: &str) -> Vec<serde_json::Value> {
    c.json(&["job", "list", "--vm", vm]).as_array().unwrap().iter().filter(|j| j["kind"] == kind).cloned().collect()
}

#[test]
fn express_fulls_fire_at_the_recovery_point_times_group_set_gives_and_no_synchronization_runs() {
    let mut c = Cluster::start_with(fast_starts);
    let root = c.root.path().join("sim");
    vm(&root, "web", &[("os", 8 * MIB)], 1);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("web").is_some());
    // The defaults: no interval synchronization, automatic checks on.
    let g = c.json(&["group", "create", "g", "--vm", "web", "--recovery-points", "none"]);
    assert_eq!(g["express_full_before_rp"], true, "{g}");
    assert_eq!(g["sync_every"], serde_json::Value::Null, "{g}");
    assert_eq!(g["cc_when_inconsistent"], true, "{g}");
    wait_until("initial replica", Duration::from_secs(60), || c.vm("web").unwrap()["replica_state"] == "consistent");

    // Two recovery points a minute apart, at least a minute from now (coordinator local time).
    let now = jiff::Zoned::now();
    let minute = now.with().second(0).subsec_nanosecond(0).build().unwrap();
    let t1 = minute.checked_add(jiff::Span::new().minutes(2)).unwrap();
    let t2 = t1.checked_add(jiff::Span::new().minutes(1)).unwrap();
    let hhmm = |z: &jiff::Zoned| format!("{:02}:{:02}", z.hour(), z.minute());
    let g = c.json(&["group", "set", "g", "--recovery-points", &format!("{},{}", hhmm(&t1), hhmm(&t2))]);
    assert_eq!(g["recovery_points"].as_array().unwrap().len(), 2, "{g}");
    wait_until("the recovery-point schedule is planned", Duration::from_secs(10), || {
        c.json(&["group", "show", "g"])["next_runs"]["rp"].is_string()
    });

    let until = |z: &jiff::Zoned| {
        let left = z.timestamp().as_second() - jiff::Timestamp::now().as_second();
        Duration::from_secs(left.max(0) as u64)
    };
    sim::churn(&root, "web", 25.0, 2).unwrap();
    std::thread::sleep(until(&t1).saturating_sub(Duration::from_secs(3)));
    assert!(jobs(&c, "web", "express-full").is_empty(), "nothing before the first point");
    wait_until("the first recovery point's express full", Duration::from_secs(60), || {
        jobs(&c, "web", "express-full").iter().any(|j| j["state"] == "succeeded")
    });
    sim::churn(&root, "web", 25.0, 3).unwrap();
    std::thread::sleep(until(&t2).saturating_sub(Duration::from_secs(3)));
    assert_eq!(jobs(&c, "web", "express-full").len(), 1, "one express full per point");
    wait_until("the second recovery point's express full", Duration::from_secs(60), || {
        jobs(&c, "web", "express-full").iter().filter(|j| j["state"] == "succeeded").count() == 2
    });
    assert!(jobs(&c, "web", "sync").is_empty(), "no synchronization between the points");
    let rps = c.json(&["rp", "list", "web"]);
    assert_eq!(rps.as_array().unwrap().len(), 3, "the initial copy's and one per point");
    assert_eq!(c.recover_disk("web", "latest", "os"), sim_disk(&root, "web", "os"));
}

#[test]
fn a_cancelled_express_full_leaves_no_snapshot_and_the_next_check_repairs_the_replica() {
    let mut c = Cluster::start_with(fast_starts);
    let root = c.root.path().join("sim");
    vm(&root, "big", &[("os", 64 * MIB)], 4);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("big").is_some());
    c.json(&["group", "create", "g", "--vm", "big", "--recovery-points", "none", "--no-cc-when-inconsistent"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("big").unwrap()["replica_state"] == "consistent");

    // Slow storage: the express full of every block takes about 6 s.
    let slow = |ms: Option<u64>| {
        let mut v = Vm::open(&root, "big").unwrap();
        v.config.read_delay_ms = ms;
        v.save().unwrap();
    };
    slow(Some(100));
    sim::churn(&root, "big", 100.0, 5).unwrap();

    let started = c.json(&["backup", "big", "--kind", "express-full"]);
    let id = started["job_id"].as_u64().unwrap().to_string();
    wait_until("the express full runs", Duration::from_secs(30), || {
        c.json(&["job", "show", &id])["state"] == "running"
    });
    // Well into its reading (its counters are kept per disk, at the disk's end).
    std::thread::sleep(Duration::from_millis(1500));
    let cancelled = c.json(&["job", "cancel", &id]);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let again = c.run(&["job", "cancel", &id]);
    assert_eq!(again.status.code(), Some(1), "a finished job cannot be cancelled");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already finished"));

    wait_until("the agent released the snapshot", Duration::from_secs(30), || {
        Vm::open(&root, "big").unwrap().config.snapshot.is_none()
    });
    assert_eq!(c.vm("big").unwrap()["replica_state"], "inconsistent", "an interrupted express full");
    assert_eq!(c.json(&["job", "show", &id])["state"], "cancelled", "it stays cancelled");
    let rps = c.json(&["rp", "list", "big"]);
    assert_eq!(rps.as_array().unwrap().len(), 1, "nothing was committed: {rps} {}", c.json(&["job", "list"]));

    slow(None);
    let cc = c.json(&["cc", "big", "--wait"]);
    assert_eq!(cc["state"], "succeeded", "{cc}");
    assert_eq!(c.vm("big").unwrap()["replica_state"], "consistent");
    let job = c.json(&["backup", "big", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk("big", "latest", "os"), sim_disk(&root, "big", "os"), "no change was lost");

    // A queued job (waiting for the VM's running one) is taken off the queue and never runs.
    slow(Some(100));
    sim::churn(&root, "big", 100.0, 6).unwrap();
    let running = c.json(&["backup", "big", "--kind", "express-full"])["job_id"].as_u64().unwrap().to_string();
    wait_until("the express full runs", Duration::from_secs(30), || {
        c.json(&["job", "show", &running])["state"] == "running"
    });
    let queued = c.json(&["backup", "big", "--kind", "sync"])["job_id"].as_u64().unwrap().to_string();
    assert_ne!(queued, running);
    assert_eq!(c.json(&["job", "show", &queued])["state"], "queued", "one job per VM at a time");
    assert_eq!(c.json(&["job", "cancel", &queued])["state"], "cancelled");
    assert_eq!(c.json(&["job", "wait", &running])["state"], "succeeded", "the running one goes on");
    std::thread::sleep(Duration::from_secs(2));
    let j = c.json(&["job", "show", &queued]);
    assert_eq!((j["state"].as_str(), j["started_at"].is_null()), (Some("cancelled"), true), "{j}");
}

#[test]
fn a_disk_left_out_is_never_copied_until_it_is_included_again() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    vm(&root, "two", &[("os", 8 * MIB), ("scratch", 16 * MIB)], 6);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("two").is_some());
    let bad = c.run(&["group", "create", "g", "--vm", "two", "--exclude-disk", "two"]);
    assert_eq!(bad.status.code(), Some(1), "VM:DISK");
    let g = c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        "two",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--exclude-disk",
        "two:scratch",
    ]);
    assert_eq!(g["exclude_disks"], serde_json::json!(["two:scratch"]), "{g}");
    wait_until("initial replica", Duration::from_secs(60), || c.vm("two").unwrap()["replica_state"] == "consistent");
    let initial = jobs(&c, "two", "initial");
    assert_eq!(initial[0]["bytes_scanned"], 8 * MIB, "only the os disk was read: {initial:?}");
    assert_eq!(c.vm("two").unwrap()["left_out"], serde_json::json!(["scratch"]));
    let rps = c.json(&["rp", "list", "two"]);
    assert_eq!(rps[0]["disks"].as_array().unwrap().len(), 1, "{rps}");
    assert_eq!(rps[0]["left_out"], serde_json::json!(["scratch"]));
    let job = c.json(&["backup", "two", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");

    c.json(&["group", "set", "g", "--include-disk", "two:scratch"]);
    let job = c.json(&["backup", "two", "--wait"]);
    assert_eq!((job["state"].as_str(), job["kind"].as_str()), (Some("succeeded"), Some("initial")), "{job}");
    let rps = c.json(&["rp", "list", "two"]);
    let last = rps.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["disks"].as_array().unwrap().len(), 2, "{last}");
    assert_eq!(c.recover_disk("two", "latest", "scratch"), sim_disk(&root, "two", "scratch"));
}

#[test]
fn the_disks_of_one_vm_transfer_at_once_and_restore_bit_exact() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    vm(&root, "wide", &[("os", 8 * MIB), ("data", 8 * MIB), ("logs", 8 * MIB)], 7);
    // Slow storage: each disk (8 blocks of 1 MiB) takes about 2 s to read, long enough to
    // see them overlap.
    {
        let mut v = Vm::open(&root, "wide").unwrap();
        v.config.read_delay_ms = Some(250);
        v.save().unwrap();
    }
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("wide").is_some());
    c.json(&["group", "create", "g", "--vm", "wide", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(90), || c.vm("wide").unwrap()["replica_state"] == "consistent");
    let job = jobs(&c, "wide", "initial").remove(0);
    assert_eq!(job["bytes_scanned"], 24 * MIB, "{job}");

    // The coordinator's account of the job, in order: `[jobs] disks_in_parallel` (2 by
    // default) streams open before the first disk is stored, never more.
    let id = format!("job_id={}", job["id"]);
    let log = c.coordinator.log_text();
    let events: Vec<(&str, &str)> = log
        .lines()
        .filter(|l| l.contains(&id))
        .filter_map(|l| {
            let what = if l.contains("disk stream opened") {
                "open"
            } else if l.contains("disk stored") {
                "stored"
            } else {
                return None;
            };
            let disk = l.split_whitespace().find_map(|w| w.strip_prefix("disk="))?;
            Some((what, disk))
        })
        .collect();
    assert_eq!(events.len(), 6, "{events:?}");
    let (mut open, mut most) = (0i32, 0);
    for (what, _) in &events {
        open += if *what == "open" { 1 } else { -1 };
        most = most.max(open);
    }
    assert_eq!(most, 2, "two disks at once, never three: {events:?}");
    assert_eq!(&events[..2].iter().map(|e| e.0).collect::<Vec<_>>(), &["open", "open"], "{events:?}");
    for disk in ["os", "data", "logs"] {
        assert_eq!(c.recover_disk("wide", "latest", disk), sim_disk(&root, "wide", disk), "{disk}");
    }
}

#[test]
fn decisions_ask_the_host_when_the_coordinator_has_not_heard_yet() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    vm(&root, "old", &[("os", 8 * MIB)], 7);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("old").is_some());
    // Let the first inventories settle, so the next heartbeat is seconds away.
    std::thread::sleep(Duration::from_secs(1));

    // A VM created a moment ago can be protected at once.
    vm(&root, "fresh", &[("os", 8 * MIB)], 8);
    let g = c.json(&["group", "create", "g", "--vm", "old,fresh", "--sync-every", "off", "--recovery-points", "none"]);
    assert_eq!(g["members"].as_array().unwrap().len(), 2, "{g}");
    wait_until("initial replicas", Duration::from_secs(60), || {
        ["old", "fresh"].iter().all(|v| c.vm(v).unwrap()["replica_state"] == "consistent")
    });
    let job = c.json(&["backup", "fresh", "--wait"]);
    assert_eq!(job["state"], "succeeded");
    let point = sim_disk(&root, "fresh", "os");

    // The guest changes after the recovery point, then the VM is powered off and recovered
    // onto at once: the coordinator still thinks it runs, asks, and goes ahead.
    sim::churn(&root, "fresh", 50.0, 9).unwrap();
    assert_ne!(sim_disk(&root, "fresh", "os"), point);
    assert_eq!(c.vm("fresh").unwrap()["state"], "running");
    sim::set_state(&root, "fresh", sim::Power::Off).unwrap();
    let job = c.json(&["recover", "fresh", "--rp", "latest", "--to", "original", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(sim_disk(&root, "fresh", "os"), point, "the VM is the recovery point bit for bit");

    // A VM that really runs is still refused, after asking.
    let refused = c.run(&["recover", "old", "--rp", "latest", "--to", "original"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("old is not off"));
}

#[test]
fn a_recovery_point_carries_the_vm_definition_to_a_new_vm_and_back_to_the_original() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = CreateVm {
        os: "windows".into(),
        integration_services: false,
        random_fill: true,
        seed: 10,
        ..CreateVm::new("win", "node1", vec![DiskConfig { name: "os".into(), size: 8 * MIB }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("win").is_some());
    c.json(&["group", "create", "g", "--vm", "win", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("win").unwrap()["replica_state"] == "consistent");
    let original = Vm::open(&root, "win").unwrap().config.clone();

    // As a new VM: the guest's settings come from the point; name, identity and state are new.
    let job =
        c.json(&["recover", "win", "--rp", "latest", "--to", "host", "--host", "node1", "--name", "win2", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let copy = Vm::open(&root, "win2").unwrap().config.clone();
    assert_eq!((copy.os.as_str(), copy.integration_services), ("windows", false), "the point's settings");
    assert_eq!(copy.name, "win2");
    assert!(copy.uuid.is_some() && copy.uuid != original.uuid, "a VM of its own");
    assert_eq!(copy.power, sim::Power::Off);
    assert!(copy.snapshot.is_none() && copy.restoring.is_none());
    assert_eq!(sim_disk(&root, "win2", "os"), c.recover_disk("win", "latest", "os"));

    // The original's settings drift, then a recovery onto it brings them back with its disks.
    {
        let mut v = Vm::open(&root, "win").unwrap();
        v.config.integration_services = true;
        v.config.os = "linux".into();
        v.save().unwrap();
    }
    sim::set_state(&root, "win", sim::Power::Off).unwrap();
    let job = c.json(&["recover", "win", "--rp", "latest", "--to", "original", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let back = Vm::open(&root, "win").unwrap().config.clone();
    assert_eq!((back.os.as_str(), back.integration_services), ("windows", false));
    assert_eq!(back.uuid, original.uuid, "the same VM");
}
