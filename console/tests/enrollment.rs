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

#[test]
fn a_reused_expired_or_forged_token_is_refused_and_nothing_is_written() {
    let c = Cluster::start();
    let token = c.token(&[]);
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

    let expired = enroll("n3", &c.token(&["--ttl", "0s"]));
    assert!(expired.contains("join token expired"), "{expired}");

    let mut forged = bulwark_pki::JoinToken::decode(&c.token(&[])).unwrap();
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
    let mut token = bulwark_pki::JoinToken::decode(&c.token(&[])).unwrap();
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
fn reenrolling_a_host_revokes_its_previous_certificate() {
    let mut c = Cluster::start();
    let old = c.enroll("node1");
    let old_creds = std::fs::read_to_string(old.join("pki/agent.pem")).unwrap();
    std::fs::rename(&old, c.root.path().join("old-node1")).unwrap();
    c.enroll("node1");
    assert_ne!(std::fs::read_to_string(c.agent_dir("node1").join("pki/agent.pem")).unwrap(), old_creds);
    c.run_agent("node1");
    c.wait_connected("node1", true);
    let old_dir = c.root.path().join("old-node1");
    let log = c.root.path().join("old.log");
    let old_agent = Daemon::spawn(&["x-agent", "run", "--data-dir", old_dir.to_str().unwrap()], log);
    old_agent.wait_log("refused by the coordinator: certificate revoked");
    assert_eq!(c.agent_connected("node1"), Some(true));
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
    let running = c.token(&[]);
    assert!(running.starts_with("bwt1_"));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "asked the coordinator, not the locked catalog"
    );
    // Killed: coordinator.addr is stale; the token is made in the catalog directly.
    c.coordinator.signal(libc::SIGKILL);
    let _ = c.coordinator.child.wait();
    assert!(c.dir().join("coordinator.addr").exists(), "a killed coordinator leaves its address file");
    let offline = c.token(&[]);
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
