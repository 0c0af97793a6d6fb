//! The agent on a sim storage root, with the real daemons: it cleans up what an earlier run
//! left held, and reports its host's VMs (following migrations) to the coordinator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power, Vm};
use common::*;
use std::time::Duration;

fn vm(root: &std::path::Path, name: &str, host: &str) {
    let req = CreateVm {
        os: "linux".into(),
        ..CreateVm::new(name, host, vec![DiskConfig { name: "os".into(), size: 4 << 20 }])
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

#[test]
fn kill_9_while_a_snapshot_is_held_and_the_guest_keeps_writing_loses_nothing() {
    use std::io::BufRead;
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let r = root.to_str().unwrap().to_owned();
    // Crash-consistent (no integration services): paused for the snapshot point.
    let req = CreateVm {
        integration_services: false,
        ..CreateVm::new("vm", "node1", vec![DiskConfig { name: "os".into(), size: 4 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    let baseline = {
        let mut vm = Vm::open(&root, "vm").unwrap();
        vm.take_snapshot("node1", 0).unwrap();
        vm.release_snapshot().unwrap();
        vm.confirm().unwrap()
    };

    // A process of node1 takes and holds a snapshot, as the agent does during a job.
    let mut holder = std::process::Command::new(bin())
        .args(["x-agent", "sim", "snapshot", "--root", &r, "--vm", "vm", "--holder", "node1", "--hold", "10min"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("held"), "{line}");

    // The guest keeps writing, through separate processes, while the snapshot is held.
    let write = |offset: u64, byte: u8| {
        let input = c.root.path().join(format!("w{offset}.bin"));
        std::fs::write(&input, vec![byte; 5000]).unwrap();
        ok(&[
            "x-agent",
            "sim",
            "write",
            "--root",
            &r,
            "--vm",
            "vm",
            "--disk",
            "os",
            "--offset",
            &offset.to_string(),
            "--input",
            input.to_str().unwrap(),
        ]);
    };
    write(100_000, 1);
    write(2_000_000, 2);
    let status = std::process::Command::new("kill").args(["-9", &holder.id().to_string()]).status().unwrap();
    assert!(status.success());
    holder.wait().unwrap();
    write(3_500_000, 3); // after the kill: the snapshot is still marked held, so into the overlay
    {
        let vm = Vm::open(&root, "vm").unwrap();
        assert!(vm.config.snapshot.is_some(), "the killed process left its snapshot behind");
        assert!(vm.dir().join("os.overlay").exists());
    }

    // node1's agent starts: it cleans up what its host left behind.
    let dir = c.enroll("node1");
    let log = c.root.path().join("agent-restart.log");
    c.agents.push(Daemon::spawn(&["x-agent", "run", "--data-dir", dir.to_str().unwrap(), "--sim-root", &r], log));
    c.agents[0].wait_log("released snapshots an earlier run left behind");

    let mut vm = Vm::open(&root, "vm").unwrap();
    assert_eq!(vm.config.power, Power::Running, "not left paused");
    assert!(vm.config.snapshot.is_none() && vm.config.frozen.is_none());
    assert!(!vm.dir().join("os.overlay").exists(), "overlay merged and removed");
    let image = std::fs::read(vm.image("os")).unwrap();
    for (offset, byte) in [(100_000usize, 1u8), (2_000_000, 2), (3_500_000, 3)] {
        assert!(image[offset..offset + 5000].iter().all(|b| *b == byte), "the write at {offset} was lost");
    }
    // The next backup sends every one of them.
    vm.take_snapshot("node1", 9).unwrap();
    let changed = vm.changes_since("os", Some(baseline)).unwrap().dirty_blocks(1 << 20);
    assert_eq!(changed, vec![0, 1, 3], "every write since the last confirmed backup is tracked");
}
