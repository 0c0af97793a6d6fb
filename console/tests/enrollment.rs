//! Enrollment, connection and revocation with the real daemons on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn an_enrolled_agent_is_listed_connected_and_then_disconnected_when_stopped() {
    let mut c = Cluster::start();
    let dir = c.enroll("node1");
    assert_eq!(std::fs::metadata(dir.join("pki/agent.key")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(c.agent_connected("node1"), Some(false), "enrolled but not yet running");
    let i = c.run_agent("node1");
    c.wait_connected("node1", true);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["--data-dir", &c.dir_str(), "status", "--output", "json"])).unwrap();
    assert_eq!(status["agents_connected"], 1);
    assert_eq!(status["name"], "coord1");

    c.agents[i].signal(libc::SIGTERM);
    c.wait_connected("node1", false);
    let list = c.agents_json();
    assert!(list[0]["last_seen"].is_string(), "{list:?}");
    assert_eq!(list[0]["cluster"], Cluster::CLUSTER, "{list:?}");
    assert!(c.coordinator.log_text().contains("agent disconnected"));
}

#[test]
fn revoking_an_agent_closes_its_live_connection_and_refuses_the_next() {
    let mut c = Cluster::start();
    c.enroll("node1");
    c.enroll("node2");
    let i = c.run_agent("node1");
    c.run_agent("node2");
    c.wait_connected("node1", true);
    c.wait_connected("node2", true);

    let out: serde_json::Value =
        serde_json::from_str(&ok(&["--data-dir", &c.dir_str(), "agent", "revoke", "node1", "--output", "json"]))
            .unwrap();
    assert_eq!(out["connections_closed"], 1);
    c.wait_connected("node1", false);
    // The agent keeps dialing and is refused at the handshake; it says why, and so does the coordinator.
    c.agents[i].wait_log("refused by the coordinator: certificate revoked");
    c.coordinator.wait_log("invalid peer certificate: Revoked");
    assert_eq!(c.agent_connected("node1"), Some(false));
    assert_eq!(c.agent_connected("node2"), Some(true), "other agents are untouched");
    let list = c.agents_json();
    let node1 = list.iter().find(|a| a["host"] == "node1").unwrap();
    assert_eq!(node1["revoked"], true);
    assert!(c.dir().join("pki/crl.pem").exists());

    // Revocation survives a coordinator restart (the CRL is persisted).
    c.coordinator.signal(libc::SIGTERM);
    assert!(c.coordinator.child.wait().unwrap().success());
    c.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &c.dir_str()], c.root.path().join("coord2.log"));
    wait_until("restarted coordinator", std::time::Duration::from_secs(20), || {
        c.dir().join("coordinator.addr").exists()
    });
    c.wait_connected("node2", true);
    c.coordinator.wait_log("invalid peer certificate: Revoked");
    assert_eq!(c.agent_connected("node1"), Some(false));
}

/// `x-agent enroll` as `host` with `token`, which must fail: answers its stderr after checking
/// that nothing was written.
fn refused_enrollment(c: &Cluster, host: &str, token: &str) -> String {
    let dir = c.root.path().join(format!("refused-{host}"));
    let out = bulwark(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", token, "--host", host]);
    assert_eq!(out.status.code(), Some(1), "enroll {host} should fail");
    assert!(!dir.exists(), "nothing may be written for a refused enrollment");
    String::from_utf8(out.stderr).unwrap()
}

/// The `error: …` lines of a command's stderr (logs may precede them).
fn error_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr).lines().filter(|l| l.starts_with("error:")).map(str::to_owned).collect()
}

/// Enrolls `host` into a fresh data directory named `dir_name` with `token`.
fn enroll_into(c: &Cluster, dir_name: &str, host: &str, token: &str) -> std::path::PathBuf {
    let dir = c.root.path().join(dir_name);
    ok(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", token, "--host", host]);
    dir
}

fn agent_entry(c: &Cluster, host: &str) -> serde_json::Value {
    c.agents_json().into_iter().find(|a| a["host"] == host).unwrap()
}

fn tokens_json(c: &Cluster) -> Vec<serde_json::Value> {
    let out = ok(&["x-coordinator", "token", "list", "--data-dir", &c.dir_str(), "--output", "json"]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
}

/// `token create … --output json`: (token, id).
fn token_with_id(c: &Cluster, extra: &[&str]) -> (String, String) {
    let dir = c.dir_str();
    let mut args = vec!["x-coordinator", "token", "create", "--data-dir", &dir, "--output", "json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    (v["token"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned())
}

#[test]
fn a_token_needs_a_host_or_a_cluster_and_a_ttl_within_the_cap() {
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap().replace("max_ttl = \"7days\"", "max_ttl = \"2h\"");
        assert!(text.contains("max_ttl = \"2h\""), "init writes the default cap: {text}");
        std::fs::write(&path, text).unwrap();
    });
    let dir = c.dir_str();
    for args in [&[][..], &["--replace", "n1"][..], &["--ttl", "1h"][..]] {
        let mut all = vec!["x-coordinator", "token", "create", "--data-dir", &dir];
        all.extend_from_slice(args);
        let out = bulwark(&all);
        assert_eq!(out.status.code(), Some(2), "usage error for {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--host") && err.contains("--cluster"), "{err}");
    }
    let over = bulwark(&["x-coordinator", "token", "create", "--data-dir", &dir, "--host", "n1", "--ttl", "3h"]);
    assert_eq!(over.status.code(), Some(1));
    let err = error_lines(&over.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].starts_with("error: a join token may live at most 2h"), "{err:?}");
    assert!(tokens_json(&c).is_empty(), "no token was made");
    // The cap holds offline too (straight in the catalog), and the default cap is 7 days.
    c.coordinator.signal(libc::SIGTERM);
    assert!(c.coordinator.child.wait().unwrap().success());
    let over = bulwark(&["x-coordinator", "token", "create", "--data-dir", &dir, "--cluster", "c1", "--ttl", "1day"]);
    assert_eq!(over.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&over.stderr).contains("at most 2h"));
    let fresh = Cluster::start();
    let out =
        bulwark(&["x-coordinator", "token", "create", "--data-dir", &fresh.dir_str(), "--host", "n", "--ttl", "8days"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 7days"));
    fresh.token(&["--host", "n", "--ttl", "7days"]);
}

#[test]
fn a_cluster_token_never_takes_an_enrolled_host_and_the_real_host_is_untouched() {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    let req = bulwark_agent::sim::CreateVm {
        os: "linux".into(),
        ..bulwark_agent::sim::CreateVm::new(
            "web",
            "node1",
            vec![bulwark_agent::sim::DiskConfig { name: "os".into(), size: 4 << 20 }],
        )
    };
    bulwark_agent::sim::create_vm(&root, &req).unwrap();
    let real = c.token(&["--host", "node1", "--cluster", "prod"]);
    enroll_into(&c, "agent-node1", "node1", &real);
    let i = c.run_sim_agent("node1", &root);
    c.wait_connected("node1", true);
    let before = agent_entry(&c, "node1");
    assert_eq!(before["cluster"], "prod");
    let crl = std::fs::read(c.dir().join("pki/crl.pem")).unwrap();

    // An attacker with a cluster token asks for the real host's name: refused, nothing spent.
    let cluster_token = c.token(&["--cluster", "prod"]);
    let err = refused_enrollment(&c, "node1", &cluster_token);
    assert!(err.contains("host node1 is enrolled; make the token with --replace node1 to re-enroll it"), "{err}");
    c.coordinator.wait_log("enrollment refused");
    // A host token for it cannot even be made.
    let dir = c.dir_str();
    let out = bulwark(&["x-coordinator", "token", "create", "--data-dir", &dir, "--host", "node1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        error_lines(&out.stderr),
        ["error: host node1 is enrolled; make the token with --replace node1 to re-enroll it"]
    );

    // The real host: same certificate, not revoked, CRL unchanged, still connected and serving.
    let after = agent_entry(&c, "node1");
    assert_eq!(after["cert_serial"], before["cert_serial"]);
    assert_eq!(after["revoked"], false);
    assert_eq!(after["connected"], true);
    assert_eq!(std::fs::read(c.dir().join("pki/crl.pem")).unwrap(), crl, "nothing was revoked");
    assert!(!c.agents[i].log_text().contains("refused by the coordinator"));
    wait_until("web reported", std::time::Duration::from_secs(30), || c.vm("web").is_some());
    c.json(&["group", "create", "g", "--vm", "web", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("web's initial replica, copied from the real node1", std::time::Duration::from_secs(60), || {
        c.vm("web").unwrap()["replica_state"] == "consistent"
    });

    // The refused attempt did not spend the cluster token: a new host enrolls into the cluster.
    enroll_into(&c, "agent-node2", "node2", &cluster_token);
    assert_eq!(agent_entry(&c, "node2")["cluster"], "prod");
    let list = tokens_json(&c);
    let mut used: Vec<_> = list.iter().filter(|t| t["used"] == true).map(|t| t["used_by"].to_string()).collect();
    used.sort();
    assert_eq!(used, ["\"node1\"", "\"node2\""], "{list:?}");
}

#[test]
fn replace_reenrolls_a_host_in_its_cluster_and_revokes_only_its_old_certificate() {
    let mut c = Cluster::start();
    let old = enroll_into(&c, "old-node1", "node1", &c.token(&["--host", "node1", "--cluster", "prod"]));
    enroll_into(&c, "agent-node2", "node2", &c.token(&["--host", "node2"]));
    let old_log = c.root.path().join("old.log");
    c.agents.push(Daemon::spawn(&["x-agent", "run", "--data-dir", old.to_str().unwrap()], old_log));
    let old_i = c.agents.len() - 1;
    c.run_agent("node2");
    c.wait_connected("node1", true);
    c.wait_connected("node2", true);
    let old_serial = agent_entry(&c, "node1")["cert_serial"].clone();

    // --replace must name the host the token is for.
    let dir = c.dir_str();
    let out =
        bulwark(&["x-coordinator", "token", "create", "--data-dir", &dir, "--host", "node2", "--replace", "node1"]);
    assert_eq!(out.status.code(), Some(1));
    let out =
        bulwark(&["x-coordinator", "token", "create", "--data-dir", &dir, "--host", "nodeX", "--replace", "nodeX"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host nodeX is enrolled"));

    let replace = c.token(&["--host", "node1", "--replace", "node1"]);
    // Only node1 may use it.
    let err = refused_enrollment(&c, "node2x", &replace);
    assert!(err.contains("join token is for host node1"), "{err}");
    enroll_into(&c, "agent-node1", "node1", &replace);
    let entry = agent_entry(&c, "node1");
    assert_ne!(entry["cert_serial"], old_serial);
    assert_eq!(entry["cluster"], "prod", "--replace keeps the host's cluster");
    c.agents[old_i].wait_log("refused by the coordinator: certificate revoked");
    c.run_agent("node1");
    c.wait_connected("node1", true);
    assert_eq!(c.agent_connected("node2"), Some(true), "other hosts are untouched");
    assert_eq!(agent_entry(&c, "node2")["cluster"], "node2", "a host token alone makes a standalone host");

    // --replace with --cluster moves it.
    let moved = c.token(&["--cluster", "staging", "--replace", "node1"]);
    enroll_into(&c, "newest-node1", "node1", &moved);
    assert_eq!(agent_entry(&c, "node1")["cluster"], "staging");
    let text = ok(&["--data-dir", &c.dir_str(), "agent", "list"]);
    assert!(text.lines().next().unwrap().contains("CLUSTER"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("node1") && l.contains("staging")), "{text}");
}

#[test]
fn tokens_are_listed_with_their_use_and_a_revoked_token_is_refused() {
    let c = Cluster::start();
    let (host_token, host_id) = token_with_id(&c, &["--host", "n1"]);
    let (cluster_token, cluster_id) = token_with_id(&c, &["--cluster", "c1", "--ttl", "2h"]);
    let (_, expired_id) = token_with_id(&c, &["--cluster", "c1", "--ttl", "0s"]);
    assert_eq!(host_id.len(), 16);
    assert!(!host_token.contains(&host_id), "the id is not part of the token text");
    enroll_into(&c, "agent-n1", "n1", &host_token);

    let list = tokens_json(&c);
    assert_eq!(list.len(), 3, "{list:?}");
    let by_id = |id: &str| list.iter().find(|t| t["id"] == id).unwrap().clone();
    let t = by_id(&host_id);
    assert_eq!((t["host"].as_str(), t["cluster"].as_str(), t["used"].as_bool()), (Some("n1"), None, Some(true)));
    assert_eq!(t["used_by"], "n1");
    let t = by_id(&cluster_id);
    assert_eq!((t["host"].as_str(), t["cluster"].as_str(), t["used"].as_bool()), (None, Some("c1"), Some(false)));
    assert!(t["expires_at"].as_u64().unwrap() > t["created_at"].as_u64().unwrap() + 7000);
    assert_eq!(by_id(&expired_id)["state"], "expired");
    let text = ok(&["x-coordinator", "token", "list", "--data-dir", &c.dir_str()]);
    assert!(text.lines().any(|l| l.starts_with(&host_id) && l.contains("used by n1")), "{text}");
    assert!(!text.contains(&cluster_token) && !text.contains(&host_token), "never a secret");

    let dir = c.dir_str();
    assert_eq!(
        ok(&["x-coordinator", "token", "revoke", "--data-dir", &dir, &cluster_id]).trim(),
        format!("join token {cluster_id} revoked")
    );
    let err = refused_enrollment(&c, "n2", &cluster_token);
    assert!(err.contains("join token was revoked"), "{err}");
    assert_eq!(by_id_of(&tokens_json(&c), &cluster_id)["state"], "revoked");
    // A used token cannot be revoked (the host can), an unknown id is an error.
    let out = bulwark(&["x-coordinator", "token", "revoke", "--data-dir", &dir, &host_id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used by n1"));
    let out = bulwark(&["x-coordinator", "token", "revoke", "--data-dir", &dir, "0123456789abcdef"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no join token 0123456789abcdef"));
}

fn by_id_of(list: &[serde_json::Value], id: &str) -> serde_json::Value {
    list.iter().find(|t| t["id"] == id).unwrap().clone()
}

#[test]
fn a_reused_expired_or_forged_token_is_refused_and_nothing_is_written() {
    let c = Cluster::start();
    let token = c.token(&["--cluster", "c1"]);
    let d1 = c.agent_dir("n1");
    ok(&["x-agent", "enroll", "--data-dir", d1.to_str().unwrap(), "--token", &token, "--host", "n1"]);

    let enroll = |host: &str, token: &str| {
        let dir = c.agent_dir(host);
        let out =
            bulwark(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", token, "--host", host]);
        assert_eq!(out.status.code(), Some(1), "enroll {host} should fail");
        assert!(!dir.exists(), "nothing may be written for a refused enrollment");
        String::from_utf8(out.stderr).unwrap()
    };

    let reused = enroll("n2", &token);
    assert!(reused.contains("join token was already used"), "{reused}");

    let expired = enroll("n3", &c.token(&["--cluster", "c1", "--ttl", "0s"]));
    assert!(expired.contains("join token expired"), "{expired}");

    let mut forged = bulwark_pki::JoinToken::decode(&c.token(&["--cluster", "c1"])).unwrap();
    forged.secret[0] ^= 1;
    let forged_err = enroll("n4", &forged.encode());
    assert!(forged_err.contains("unknown join token"), "{forged_err}");

    let bound = c.token(&["--host", "n5"]);
    let wrong_host = enroll("n6", &bound);
    assert!(wrong_host.contains("join token is for host n5"), "{wrong_host}");

    let garbage = enroll("n7", "not-a-token");
    assert!(garbage.starts_with("error: not a Bulwark join token"), "{garbage}");

    for reason in ["join token was already used", "join token expired", "unknown join token"] {
        assert!(c.coordinator.log_text().contains(reason), "coordinator log lacks {reason:?}");
    }
    // The refused attempts did not spend the host-bound token.
    let d5 = c.agent_dir("n5");
    ok(&["x-agent", "enroll", "--data-dir", d5.to_str().unwrap(), "--token", &bound, "--host", "n5"]);
}

#[test]
fn an_agent_does_not_trust_a_coordinator_whose_ca_differs_from_the_token_pin() {
    let c = Cluster::start();
    let mut token = bulwark_pki::JoinToken::decode(&c.token(&["--host", "n1"])).unwrap();
    token.ca_fingerprint = [7; 32];
    let dir = c.agent_dir("n1");
    let out = bulwark(&[
        "x-agent",
        "enroll",
        "--data-dir",
        dir.to_str().unwrap(),
        "--token",
        &token.encode(),
        "--host",
        "n1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(bulwark_pki::tls::FINGERPRINT_MISMATCH), "{err}");
    assert!(!dir.exists());
}

#[test]
fn init_refuses_an_initialized_directory() {
    let c = Cluster::start();
    let before = std::fs::read(c.dir().join("pki/ca.pem")).unwrap();
    let out = bulwark(&["x-coordinator", "init", "--data-dir", &c.dir_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already initialized"));
    assert_eq!(std::fs::read(c.dir().join("pki/ca.pem")).unwrap(), before);
}

#[test]
fn a_killed_agent_is_shown_disconnected_after_the_idle_timeout_and_reconnects_on_restart() {
    let mut c = Cluster::start();
    c.enroll("node1");
    let i = c.run_agent("node1");
    c.wait_connected("node1", true);
    c.agents[i].signal(libc::SIGKILL);
    let _ = c.agents[i].child.wait();
    // No goodbye was sent: QUIC's idle timeout (30 s) is what notices.
    wait_until("killed agent shown disconnected", std::time::Duration::from_secs(45), || {
        c.agent_connected("node1") == Some(false)
    });
    c.run_agent("node1");
    c.wait_connected("node1", true);
}

#[test]
fn an_agent_reconnects_by_itself_when_the_coordinator_restarts() {
    let mut c = Cluster::start();
    c.enroll("node1");
    let i = c.run_agent("node1");
    c.wait_connected("node1", true);
    c.coordinator.signal(libc::SIGTERM);
    assert!(c.coordinator.child.wait().unwrap().success(), "clean stop");
    assert!(!c.dir().join("coordinator.addr").exists(), "a clean stop removes coordinator.addr");
    c.agents[i].wait_log("reconnecting");
    c.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &c.dir_str()], c.root.path().join("coord2.log"));
    wait_until("restarted coordinator", std::time::Duration::from_secs(20), || {
        c.dir().join("coordinator.addr").exists()
    });
    c.wait_connected("node1", true);
}

#[test]
fn token_create_works_with_the_coordinator_running_and_after_it_was_killed() {
    let mut c = Cluster::start();
    // Running: the token is made by the coordinator (it holds the catalog), without waiting.
    let started = std::time::Instant::now();
    let running = c.token(&["--host", "n1"]);
    assert!(running.starts_with("bwt1_"));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "asked the coordinator, not the locked catalog"
    );
    // Killed: coordinator.addr is stale; the token is made in the catalog directly.
    c.coordinator.signal(libc::SIGKILL);
    let _ = c.coordinator.child.wait();
    assert!(c.dir().join("coordinator.addr").exists(), "a killed coordinator leaves its address file");
    let offline = c.token(&["--cluster", "c1"]);
    // Listing and revoking work offline too.
    let (_, spare) = token_with_id(&c, &["--cluster", "c1"]);
    assert_eq!(tokens_json(&c).len(), 3);
    ok(&["x-coordinator", "token", "revoke", "--data-dir", &c.dir_str(), &spare]);
    assert_eq!(by_id_of(&tokens_json(&c), &spare)["revoked"], true);
    // Both tokens enroll after a restart.
    c.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &c.dir_str()], c.root.path().join("coord2.log"));
    wait_until("restarted", std::time::Duration::from_secs(20), || {
        c.agent_connected("nobody").is_none() && c.dir().join("coordinator.addr").exists()
    });
    for (host, token) in [("n1", running), ("n2", offline)] {
        let dir = c.agent_dir(host);
        ok(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", &token, "--host", host]);
    }
}
