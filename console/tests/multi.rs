//! Several coordinators partition one cluster (issue 20's first "must show"): three
//! coordinators of one deployment (two joined with `init --join`, the last while the agents
//! run), six agents enrolled at the first, 300 sim VMs on the cluster's shared storage, and one
//! `group create all --cluster C --auto` on each coordinator. Every VM ends up protected by
//! exactly one coordinator, the one its claim names; live migrations keep owners and the next
//! backups stay incremental; a coordinator killed for good leaves its VMs `unprotected` at the
//! others (never taken over silently, while new VMs go to the survivors) until `vm take-over`;
//! restarted, it is refused for the VM taken and shows it `lost`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const HOSTS: usize = 6;
const VMS: usize = 300;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A free UDP port on loopback (a coordinator that joins must name the address agents dial).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `init --join` with a token from `first`, then `serve`.
fn join(first: &Cluster, name: &str) -> Cluster {
    let token = first.token(&["--coordinator", name]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("coord");
    let listen = format!("127.0.0.1:{}", free_port());
    let said =
        ok(&["x-coordinator", "init", "--data-dir", dir.to_str().unwrap(), "--listen", &listen, "--join", &token]);
    assert!(said.contains(&format!("initialized coordinator \"{name}\"")) && said.contains("joined"), "{said}");
    assert!(!dir.join("pki/ca.key").exists(), "a joined coordinator holds no CA key");
    // The token worked once.
    let again = root.path().join("again");
    let refused = bulwark(&[
        "x-coordinator",
        "init",
        "--data-dir",
        again.to_str().unwrap(),
        "--listen",
        &listen,
        "--join",
        &token,
    ]);
    assert!(!refused.status.success() && text(&refused).contains("already used"), "{}", text(&refused));
    assert!(!again.exists(), "a refused join writes nothing");
    let coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", dir.to_str().unwrap()], root.path().join("coord.log"));
    wait_until("the joined coordinator serves", Duration::from_secs(20), || dir.join("coordinator.addr").exists());
    Cluster { root, coordinator, agents: vec![] }
}

/// Each coordinator's name with the VMs it protects in group `all` (replica consistent).
fn protected(coords: &[(&str, &Cluster)]) -> BTreeMap<String, BTreeSet<String>> {
    coords
        .iter()
        .map(|(name, c)| {
            let vms = c.json(&["vm", "list"]);
            let mine = vms
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["group"] == "all" && v["replica_state"] == "consistent" && v["owner"] == *name)
                .map(|v| v["name"].as_str().unwrap().to_owned())
                .collect();
            ((*name).to_owned(), mine)
        })
        .collect()
}

fn claim_owner(site: &Path, vm: &str) -> Option<String> {
    let text = std::fs::read_to_string(site.join(format!("claims/{vm}.claim"))).ok()?;
    text.lines().find_map(|l| l.strip_prefix("coordinator ")).map(str::to_owned)
}

fn vm_name(i: usize) -> String {
    format!("vm-{i:03}")
}

#[test]
fn three_coordinators_partition_one_cluster_of_300_vms() {
    let mut a = Cluster::start_as("coord-a", |_| {});
    let b = join(&a, "coord-b");
    // Only the first coordinator holds the CA: the others send operators there.
    let no_tokens = bulwark(&["x-coordinator", "token", "create", "--data-dir", &b.dir_str(), "--cluster", "x"]);
    assert!(!no_tokens.status.success());
    assert!(
        text(&no_tokens).contains("holds no CA key") && text(&no_tokens).contains("coord-a at"),
        "{}",
        text(&no_tokens)
    );

    let site = a.root.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    for i in 0..VMS {
        random_sim_vm(&site, &vm_name(i), &format!("node{}", i % HOSTS + 1), &["os:2MiB"]);
    }
    for h in 1..=HOSTS {
        a.enroll(&format!("node{h}"));
    }
    let known: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.agent_dir("node1").join("coordinators.json")).unwrap())
            .unwrap();
    assert_eq!(known.as_array().unwrap().len(), 1, "enrollment tells the other coordinators: {known}");
    for h in 1..=HOSTS {
        a.run_sim_agent(&format!("node{h}"), &site);
    }
    // The third coordinator joins while the agents run: they learn it from the first.
    let mut c = join(&a, "coord-c");
    for (name, coord) in [("coord-a", &a), ("coord-b", &b), ("coord-c", &c)] {
        wait_until(&format!("every host connected to {name}"), Duration::from_secs(60), || {
            coord.agents_json().iter().filter(|x| x["connected"] == true).count() == HOSTS
        });
        // Hosts it did not enroll are known with the cluster their certificate names.
        wait_until(&format!("{name} sees every VM"), Duration::from_secs(60), || {
            coord.json(&["vm", "list"]).as_array().unwrap().len() == VMS
        });
        assert_eq!(coord.vm("vm-000").unwrap()["cluster"], Cluster::CLUSTER);
    }
    for coord in [&a, &b, &c] {
        let g = coord.json(&[
            "group",
            "create",
            "all",
            "--cluster",
            Cluster::CLUSTER,
            "--auto",
            "--sync-every",
            "off",
            "--recovery-points",
            "none",
        ]);
        assert_eq!(g["auto_cluster"], Cluster::CLUSTER, "{g}");
    }
    let mut owners = BTreeMap::new();
    wait_until("every VM protected by exactly one coordinator", Duration::from_secs(600), || {
        owners = protected(&[("coord-a", &a), ("coord-b", &b), ("coord-c", &c)]);
        owners.values().map(BTreeSet::len).sum::<usize>() >= VMS
    });
    let all: BTreeSet<&String> = owners.values().flatten().collect();
    assert_eq!(all.len(), VMS, "no VM is protected twice: {owners:?}");
    for (name, vms) in &owners {
        assert!(vms.len() > VMS / 6, "{name} protects a fair share: {}", vms.len());
        for vm in vms {
            assert_eq!(claim_owner(&site, vm).as_deref(), Some(name.as_str()), "{vm}'s claim names its protector");
        }
    }
    let owner_of = |vm: &str| owners.iter().find(|(_, v)| v.contains(vm)).map(|(n, _)| n.clone()).unwrap();
    let cluster_of = |name: &str| -> &Cluster {
        match name {
            "coord-a" => &a,
            "coord-b" => &b,
            _ => &c,
        }
    };

    // 50 live migrations: owners stay, and the next backup moves only what changed.
    for i in 0..50 {
        let vm = vm_name(i);
        let to = format!("node{}", (i + 1) % HOSTS + 1);
        ok(&["x-agent", "sim", "migrate", "--root", site.to_str().unwrap(), "--vm", &vm, "--to", &to]);
    }
    ok(&[
        "x-agent",
        "sim",
        "churn",
        "--root",
        site.to_str().unwrap(),
        "--vm",
        "vm-007",
        "--bytes",
        "1MiB",
        "--seed",
        "3",
    ]);
    for i in 0..50 {
        let vm = vm_name(i);
        let to = format!("node{}", (i + 1) % HOSTS + 1);
        let owner = cluster_of(&owner_of(&vm));
        wait_until(&format!("{vm} seen on {to}"), Duration::from_secs(60), || owner.vm(&vm).unwrap()["host"] == to);
        let job = owner.json(&["backup", &vm, "--wait"]);
        assert_eq!(job["state"], "succeeded", "{job}");
        let changed = job["blocks_changed"].as_u64().unwrap();
        assert_eq!(changed, u64::from(vm == "vm-007"), "{vm} stayed incremental after its migration: {job}");
        assert_eq!(claim_owner(&site, &vm), Some(owner_of(&vm)), "{vm} keeps its owner");
    }
    let owner7 = cluster_of(&owner_of("vm-007"));
    assert_eq!(owner7.recover_disk("vm-007", "latest", "os"), sim_disk(&site, "vm-007", "os"));

    // coord-c is gone for good: its VMs are unprotected at the others, owned by coord-c.
    let of_c: Vec<String> = owners["coord-c"].iter().cloned().collect();
    let agent_log =
        |h: usize| std::fs::read_to_string(a.root.path().join(format!("agent-node{h}.log"))).unwrap_or_default();
    let losses = |log: &str| {
        log.matches("connection to the coordinator lost").count()
            + log.matches("cannot connect to the coordinator").count()
    };
    let before: Vec<usize> = (1..=HOSTS).map(|h| losses(&agent_log(h))).collect();
    c.coordinator.signal(9);
    let _ = c.coordinator.child.wait();
    for vm in of_c.iter().take(10) {
        let seen = a.vm(vm).unwrap();
        assert_eq!((seen["status"].as_str(), seen["owner"].as_str()), (Some("unprotected"), Some("coord-c")), "{seen}");
    }
    // New VMs go to the coordinators alive (never to the one gone), once the agents notice.
    for h in 1..=HOSTS {
        wait_until("the agents notice coord-c is gone", Duration::from_secs(90), || {
            losses(&agent_log(h)) > before[h - 1]
        });
    }
    for i in VMS..VMS + 6 {
        random_sim_vm(&site, &vm_name(i), &format!("node{}", i % HOSTS + 1), &["os:2MiB"]);
    }
    wait_until("the new VMs are protected by coord-a or coord-b", Duration::from_secs(120), || {
        let now = protected(&[("coord-a", &a), ("coord-b", &b)]);
        (VMS..VMS + 6).all(|i| now.values().any(|v| v.contains(&vm_name(i))))
    });
    for vm in &of_c {
        assert_eq!(claim_owner(&site, vm).as_deref(), Some("coord-c"), "{vm} was never taken over silently");
    }

    // coord-a takes one of coord-c's VMs over; its auto group protects it from then on.
    let taken = &of_c[0];
    let out = a.run(&["vm", "take-over", taken]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(claim_owner(&site, taken).as_deref(), Some("coord-a"));
    wait_until("coord-a protects the VM it took over", Duration::from_secs(120), || {
        a.vm(taken).is_some_and(|v| v["group"] == "all" && v["status"] == "protected")
    });

    // coord-c comes back: refused for that VM, which it shows lost; its other VMs are its own.
    std::fs::remove_file(c.dir().join("coordinator.addr")).unwrap();
    c.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &c.dir_str()], c.root.path().join("coord-again.log"));
    wait_until("coord-c is back", Duration::from_secs(20), || c.dir().join("coordinator.addr").exists());
    wait_until("the agents are back at coord-c", Duration::from_secs(120), || {
        c.agents_json().iter().filter(|x| x["connected"] == true).count() == HOSTS
    });
    let stale = c.run(&["backup", taken, "--wait"]);
    assert!(!stale.status.success(), "{}", text(&stale));
    wait_until("coord-c shows the VM lost", Duration::from_secs(60), || c.vm(taken).unwrap()["status"] == "lost");
    let other = &of_c[1];
    let job = c.json(&["backup", other, "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(c.recover_disk(other, "latest", "os"), sim_disk(&site, other, "os"));
}

#[test]
fn a_host_revoked_at_the_first_coordinator_is_shut_out_of_the_others() {
    let mut a = Cluster::start_as("coord-a", |_| {});
    let b = join(&a, "coord-b");
    // A name already in the deployment gets no token (its certificate would stand in for it).
    let again = bulwark(&["x-coordinator", "token", "create", "--data-dir", &a.dir_str(), "--coordinator", "coord-b"]);
    assert!(!again.status.success() && text(&again).contains("already in the deployment"), "{}", text(&again));
    let site = a.root.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    random_sim_vm(&site, "web", "node1", &["os:2MiB"]);
    a.enroll("node1");
    a.run_sim_agent("node1", &site);
    wait_until("node1 connected to coord-b", Duration::from_secs(60), || b.agent_connected("node1") == Some(true));
    assert_eq!(b.vm("web").unwrap()["cluster"], Cluster::CLUSTER, "the cluster comes from the certificate");

    let out = a.run(&["agent", "revoke", "node1"]);
    assert!(out.status.success(), "{}", text(&out));
    // coord-b fetches the deployment's CRL (every 30 s) and closes the host's connection.
    wait_until("coord-b shuts node1 out", Duration::from_secs(90), || b.agent_connected("node1") == Some(false));
    b.coordinator.wait_log("revocations of the deployment applied");
    // The agent keeps dialing; every handshake is refused from now on.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(b.agent_connected("node1"), Some(false));
    assert!(b.coordinator.log_text().contains("Revoked"), "the handshake refusal names the revocation");
}
