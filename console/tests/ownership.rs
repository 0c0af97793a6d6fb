//! Two coordinators over one cluster's shared storage, each with its own agent process on the
//! same host (as two backup servers of one site would be before they partition it): a VM is
//! owned by one coordinator at a time, through the claim its host writes beside it. The other
//! is refused when it adds the VM to a group, naming the owner. When the owner is gone for good
//! the other shows the VM `unprotected` until `vm take-over` moves the claim to the next epoch;
//! the old owner, restarted, has its jobs refused by the agent and shows the VM as `lost`, while
//! its recovery points still restore.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::time::Duration;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_vm_has_one_owner_and_a_take_over_shuts_the_old_owner_out() {
    let mut a = Cluster::start_as("coord-a", |_| {});
    let mut b = Cluster::start_as("coord-b", |_| {});
    let site = a.root.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    random_sim_vm(&site, "web", "node1", &["os:4MiB"]);
    random_sim_vm(&site, "db", "node1", &["os:4MiB"]);
    a.enroll("node1");
    b.enroll("node1");
    a.run_sim_agent("node1", &site);
    b.run_sim_agent("node1", &site);
    wait_until("web reported to both", Duration::from_secs(30), || a.vm("web").is_some() && b.vm("web").is_some());
    assert_eq!(b.vm("web").unwrap()["owner"], "coord-b", "an unclaimed VM is shown as this coordinator's");

    // coord-a protects web: its initial copy claims the VM (epoch 1) on the shared storage.
    a.protect_and_wait("web");
    let claim = std::fs::read_to_string(site.join("claims/web.claim")).unwrap();
    assert_eq!(claim, "bulwark-claim 1\ncoordinator coord-a\nepoch 1\n");
    assert_eq!(a.vm("web").unwrap()["owner"], "coord-a");
    assert_eq!(a.vm("web").unwrap()["status"], "protected");
    let before = sim_disk(&site, "web", "os");
    assert_eq!(a.recover_disk("web", "latest", "os"), before);

    // coord-b learns the claim from its agent's inventory and will not protect web.
    wait_until("coord-b sees the claim", Duration::from_secs(30), || b.vm("web").unwrap()["owner"] == "coord-a");
    let refused = b.run(&["group", "create", "g", "--vm", "web", "--sync-every", "off", "--recovery-points", "none"]);
    assert!(!refused.status.success());
    let why = text(&refused);
    assert!(why.contains("web is owned by coordinator coord-a (epoch 1)") && why.contains("take-over web"), "{why}");
    // It protects the VM nobody owns.
    b.protect_and_wait("db");
    assert_eq!(
        std::fs::read_to_string(site.join("claims/db.claim")).unwrap(),
        "bulwark-claim 1\ncoordinator coord-b\nepoch 1\n"
    );

    // coord-a is gone for good (killed): coord-b shows its VM unprotected, owned by coord-a,
    // and never takes it over by itself.
    a.coordinator.signal(9);
    let _ = a.coordinator.child.wait();
    let web = b.vm("web").unwrap();
    assert_eq!((web["status"].as_str(), web["owner"].as_str()), (Some("unprotected"), Some("coord-a")), "{web}");
    // coord-b takes web over: epoch 2 on the storage, coord-a's requests refused from then on.
    let taken = b.run(&["vm", "take-over", "web"]);
    assert!(taken.status.success(), "{}", text(&taken));
    let said = text(&taken);
    assert!(said.contains("taken over from coordinator coord-a (epoch 1)") && said.contains("epoch 2"), "{said}");
    assert_eq!(
        std::fs::read_to_string(site.join("claims/web.claim")).unwrap(),
        "bulwark-claim 1\ncoordinator coord-b\nepoch 2\n"
    );

    // coord-a comes back on its data directory: its jobs of web are refused, and it shows web
    // as lost to coord-b.
    std::fs::remove_file(a.dir().join("coordinator.addr")).unwrap();
    a.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &a.dir_str()], a.root.path().join("coord-again.log"));
    wait_until("coord-a is back", Duration::from_secs(20), || a.dir().join("coordinator.addr").exists());
    // Its agent dials again after its back-off (capped at 30 s).
    wait_until("coord-a's agent is back", Duration::from_secs(120), || a.agent_connected("node1") == Some(true));
    let stale = a.run(&["backup", "web", "--wait"]);
    assert!(!stale.status.success(), "{}", text(&stale));
    assert!(text(&stale).contains("coordinator coord-b (epoch 2)"), "{}", text(&stale));
    wait_until("coord-a shows web lost", Duration::from_secs(30), || a.vm("web").unwrap()["status"] == "lost");
    let lost = a.vm("web").unwrap();
    assert_eq!(lost["owner"], "coord-b");
    assert!(lost["status_reason"].as_str().unwrap().contains("epoch 1 is stale"), "{lost}");
    // Its recovery points are still its own and still restore.
    assert_eq!(a.recover_disk("web", "latest", "os"), before);

    // coord-b protects web now, from its own initial copy, and restores it bit-exact.
    b.json(&["group", "add-vm", "g", "web"]);
    wait_until("web protected by coord-b", Duration::from_secs(60), || b.vm("web").unwrap()["status"] == "protected");
    ok(&["x-agent", "sim", "churn", "--root", site.to_str().unwrap(), "--vm", "web", "--percent", "10", "--seed", "5"]);
    let job = b.json(&["backup", "web", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(b.recover_disk("web", "latest", "os"), sim_disk(&site, "web", "os"));
    // coord-a's scheduled or manual jobs still never touch it.
    let again = a.run(&["backup", "web", "--wait"]);
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(site.join("claims/web.claim")).unwrap(),
        "bulwark-claim 1\ncoordinator coord-b\nepoch 2\n"
    );
}
