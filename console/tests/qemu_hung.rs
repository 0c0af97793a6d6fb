//! A hypervisor that hangs cannot hold an agent: a QEMU VM whose QMP socket accepts and never
//! answers is still inventoried, its snapshot fails at the freeze bound with that reason, and
//! meanwhile the agent keeps its connection (heartbeats) and a real QEMU VM on the same host is
//! backed up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../agent/tests/common/qemu_vm.rs"]
mod qemu_vm;

use common::*;
use qemu_vm::{Vm, MIB};
use std::os::unix::net::UnixListener;
use std::time::Duration;

#[test]
fn a_qmp_socket_that_never_answers_fails_its_job_at_the_bound_and_stalls_nothing_else() {
    let mut c = Cluster::start();
    let qdir = c.root.path().join("q");
    let mut good = Vm::create(&qdir, "good", 64 * MIB, "qcow2");
    good.start();
    good.write(0, 4 * MIB, 0x5a);
    let stuck = Vm::create(&qdir, "stuck", 64 * MIB, "qcow2");
    // A "QEMU" that accepts QMP connections and never says a word.
    let listener = UnixListener::bind(stuck.qmp_path()).unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    c.enroll("node1");
    let vm_dir = qdir.join("vms");
    c.run_agent_with("node1", &["--qemu-vm-dir", vm_dir.to_str().unwrap()]);
    wait_until("both VMs are reported", Duration::from_secs(60), || c.vm("good").is_some() && c.vm("stuck").is_some());
    c.json(&["group", "create", "g", "--vm", "stuck", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("the stuck VM's job is running", Duration::from_secs(30), || {
        c.json(&["job", "list", "--vm", "stuck", "--state", "running"]).as_array().unwrap().len() == 1
    });

    // While it hangs (each attempt until the bound, then retries), the other VM of the same
    // agent is protected and backed up.
    c.json(&["group", "add-vm", "g", "good"]);
    wait_until("good's initial replica", Duration::from_secs(120), || {
        c.vm("good").unwrap()["replica_state"] == "consistent"
    });
    let stuck_job = |c: &Cluster| c.json(&["job", "list", "--vm", "stuck"])[0].clone();
    let job = stuck_job(&c);
    assert!(matches!(job["state"].as_str(), Some("running" | "queued")), "still outstanding: {job}");
    // Its attempts fail at the freeze bound, not at QMP's own (longer) timeout.
    wait_until("an attempt fails at the bound", Duration::from_secs(60), || {
        let j = stuck_job(&c);
        [&j["detail"], &j["error"]].iter().any(|t| t.as_str().is_some_and(|t| t.contains("freeze bound")))
    });
    let job = stuck_job(&c);
    let text = format!("{} {}", job["detail"], job["error"]);
    assert!(text.contains("Freeze"), "{job}");

    // The agent never lost its connection: one session from start to end.
    assert_eq!(c.agent_connected("node1"), Some(true));
    let log = c.coordinator.log_text();
    assert_eq!(log.matches("agent connected").count(), 1, "{log}");
    let job = c.json(&["backup", "good", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    good.quit();
}
