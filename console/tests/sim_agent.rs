//! The agent on a sim storage root, with the real daemons: it cleans up what an earlier run
//! left held, and reports its host's VMs (following migrations) to the coordinator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power, Vm};
use common::*;
use std::time::Duration;

fn vm(root: &std::path::Path, name: &str, host: &str) {
    let req = CreateVm {
        name: name.into(),
        host: host.into(),
        os: "linux".into(),
        disks: vec![DiskConfig { name: "os".into(), size: 4 << 20 }],
        power: Power::Running,
        integration_services: true,
        replica: None,
        random_fill: false,
        seed: 0,
    };
    sim::create_vm(root, &req).unwrap();
}

fn vms_of(c: &Cluster, host: &str) -> Option<u64> {
    c.agents_json().iter().find(|a| a["host"] == host).map(|a| a["vms"].as_u64().unwrap())
}

#[test]
fn a_sim_agent_cleans_up_orphans_and_reports_its_vms_as_they_move() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    vm(&root, "a", "node1");
    vm(&root, "b", "node1");
    vm(&root, "c", "node2");
    // An earlier run of node1 died holding a snapshot of "a" while the guest kept writing.
    {
        let mut a = Vm::open(&root, "a").unwrap();
        a.take_snapshot("node1", 1).unwrap();
        a.guest_write("os", 4096, b"written during the snapshot").unwrap();
        assert!(a.dir().join("os.overlay").exists());
    }
    let dir = c.enroll("node1");
    let log = c.root.path().join("agent-sim.log");
    c.agents.push(Daemon::spawn(
        &["x-agent", "run", "--data-dir", dir.to_str().unwrap(), "--sim-root", root.to_str().unwrap()],
        log,
    ));
    c.wait_connected("node1", true);
    wait_until("node1 reports its 2 VMs", Duration::from_secs(20), || vms_of(&c, "node1") == Some(2));
    c.agents[0].wait_log("released snapshots an earlier run left behind");

    let a = Vm::open(&root, "a").unwrap();
    assert!(a.config.snapshot.is_none(), "the orphaned snapshot is released");
    assert!(!a.dir().join("os.overlay").exists(), "its overlay is merged and removed");
    let image = std::fs::read(a.image("os")).unwrap();
    assert_eq!(&image[4096..4096 + 27], b"written during the snapshot", "no guest write is lost");
    drop(a);

    sim::migrate(&root, "c", "node1", false).unwrap();
    wait_until("the migrated VM shows up in node1's inventory", Duration::from_secs(40), || {
        vms_of(&c, "node1") == Some(3)
    });
}
