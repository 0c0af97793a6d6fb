//! VM identity and host binding, with real agents: a VM is its UUID and belongs to its cluster.
//! A host of another cluster reporting a VM of the same name (another UUID), or even the same
//! UUID, cannot touch the protected VM's replica, recovery points or restores: its claims are
//! refused, logged as security events, and the VM shows `conflict`. A live migration inside the
//! cluster still moves the VM; a VM that vanished shows `missing` and `vm forget` drops it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn enroll_in(c: &Cluster, host: &str, cluster: &str) {
    let token = c.token(&["--host", host, "--cluster", cluster]);
    let dir = c.agent_dir(host);
    ok(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", &token, "--host", host]);
}

fn make_vm(root: &Path, name: &str, host: &str, seed: u64) {
    let req = CreateVm {
        os: "linux".into(),
        random_fill: true,
        seed,
        ..CreateVm::new(name, host, vec![DiskConfig { name: "os".into(), size: 8 * MIB }])
    };
    sim::create_vm(root, &req).unwrap();
}

fn uuid_of(root: &Path, name: &str) -> String {
    sim::Vm::open(root, name).unwrap().config.uuid.clone().unwrap()
}

/// Gives the sim VM `name` under `root` the identity `uuid` (as a cloned VM definition would).
fn set_uuid(root: &Path, name: &str, uuid: &str) {
    let mut vm = sim::Vm::open(root, name).unwrap();
    vm.config.uuid = Some(uuid.to_owned());
    vm.save().unwrap();
}

#[test]
fn a_host_of_another_cluster_cannot_take_a_vm_and_migration_inside_the_cluster_works() {
    let mut c = Cluster::start();
    let site = c.root.path().join("site-a");
    let other = c.root.path().join("site-b");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    make_vm(&site, "web1", "node1", 1);
    make_vm(&site, "gone", "node1", 3);
    enroll_in(&c, "node1", "a");
    enroll_in(&c, "node2", "a");
    enroll_in(&c, "evil", "b");
    c.run_sim_agent("node1", &site);
    c.run_sim_agent("node2", &site);
    wait_until("web1 is reported", Duration::from_secs(30), || c.vm("web1").is_some());
    let web1 = c.vm("web1").unwrap();
    assert_eq!(web1["uuid"], uuid_of(&site, "web1"));
    assert_eq!(web1["cluster"], "a");
    assert_eq!(web1["owner"], "coord1");
    c.json(&["group", "create", "g", "--vm", "web1", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("web1 protected", Duration::from_secs(60), || c.vm("web1").unwrap()["status"] == "protected");
    let first = c.json(&["backup", "web1", "--wait"]);
    assert_eq!(first["state"], "succeeded");

    // A host of cluster b reports its own VM named web1 (another UUID, other bytes).
    make_vm(&other, "web1", "evil", 99);
    c.run_sim_agent("evil", &other);
    wait_until("the foreign claim is refused and shown", Duration::from_secs(30), || {
        c.vm("web1").unwrap()["status"] == "conflict"
    });
    let v = c.vm("web1").unwrap();
    assert_eq!(v["host"], "node1", "{v}");
    assert_eq!(v["uuid"], uuid_of(&site, "web1"));
    assert!(v["status_reason"].as_str().unwrap().contains("evil"), "{v}");
    let log = c.coordinator.log_text();
    assert!(log.contains("bulwark::security") && log.contains("VM claim refused"), "{log}");

    // Backups and restores of web1 still come from and go to node1's VM.
    let job = c.json(&["backup", "web1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk("web1", "latest", "os"), sim_disk(&site, "web1", "os"));
    assert_ne!(c.recover_disk("web1", "latest", "os"), sim_disk(&other, "web1", "os"));

    // Even the same UUID from the other cluster is refused.
    set_uuid(&other, "web1", &uuid_of(&site, "web1"));
    let log_len = c.coordinator.log_text().len();
    wait_until("the stolen UUID is refused", Duration::from_secs(30), || {
        c.coordinator.log_text()[log_len..].contains("belongs to cluster a")
    });
    assert_eq!(c.vm("web1").unwrap()["host"], "node1");
    let job = c.json(&["backup", "web1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk("web1", "latest", "os"), sim_disk(&site, "web1", "os"));

    // When the foreign host stops claiming web1, the conflict is resolved.
    std::fs::remove_dir_all(other.join("vms/web1")).unwrap();
    wait_until("the conflict clears", Duration::from_secs(30), || c.vm("web1").unwrap()["status"] == "protected");

    // A host of web1's own cluster reporting another VM named web1 is refused too, and so is
    // one reporting web1's UUID while node1 still runs it (the same VM from two hosts at once).
    let third = c.root.path().join("site-c");
    std::fs::create_dir_all(&third).unwrap();
    make_vm(&third, "web1", "node3", 7);
    enroll_in(&c, "node3", "a");
    c.run_sim_agent("node3", &third);
    wait_until("the same-cluster namesake is refused", Duration::from_secs(30), || {
        c.vm("web1").unwrap()["status"] == "conflict"
    });
    let v = c.vm("web1").unwrap();
    assert!(v["status_reason"].as_str().unwrap().contains("another VM named web1"), "{v}");
    assert_eq!(v["host"], "node1");
    set_uuid(&third, "web1", &uuid_of(&site, "web1"));
    wait_until("the double claim is refused", Duration::from_secs(30), || {
        c.vm("web1").unwrap()["status_reason"].as_str().is_some_and(|r| r.contains("at once"))
    });
    assert_eq!(c.vm("web1").unwrap()["host"], "node1");
    let job = c.json(&["backup", "web1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk("web1", "latest", "os"), sim_disk(&site, "web1", "os"));
    std::fs::remove_dir_all(third.join("vms/web1")).unwrap();
    wait_until("the double claim clears", Duration::from_secs(30), || c.vm("web1").unwrap()["status"] == "protected");
    assert_eq!(c.vm("web1").unwrap()["host"], "node1");

    // Live migration inside cluster a moves the VM; protection follows it.
    ok(&["x-agent", "sim", "migrate", "--root", site.to_str().unwrap(), "--vm", "web1", "--to", "node2"]);
    wait_until("web1 on node2", Duration::from_secs(30), || c.vm("web1").unwrap()["host"] == "node2");
    ok(&["x-agent", "sim", "churn", "--root", site.to_str().unwrap(), "--vm", "web1", "--percent", "5"]);
    let job = c.json(&["backup", "web1", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk("web1", "latest", "os"), sim_disk(&site, "web1", "os"));

    // A VM that vanished is missing until forgotten.
    std::fs::remove_dir_all(site.join("vms/gone")).unwrap();
    wait_until("gone is missing", Duration::from_secs(30), || c.vm("gone").unwrap()["status"] == "missing");
    c.json(&["vm", "forget", "gone"]);
    assert!(c.vm("gone").is_none());
    let refused = c.run(&["vm", "forget", "web1"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("protection group"));
}
