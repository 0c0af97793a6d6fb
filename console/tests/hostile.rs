//! Hostile input on an authenticated connection: the offending connection is closed with a
//! protocol violation, the coordinator neither panics nor grows its memory, and a well-behaved
//! agent stays connected throughout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_pki::quic;
use bulwark_protocol::messages::{AgentMessage, CoordinatorMessage, Hello};
use bulwark_protocol::{codec, frame, HostId};
use common::*;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Waits for the coordinator to close `conn`; returns why, as the client explains it.
async fn closed_reason(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(15), conn.closed()).await {
        Ok(e) => quic::explain(&e),
        Err(_) => panic!("the coordinator did not close the offending connection"),
    }
}

fn hello(host: &str) -> Vec<u8> {
    framed(&AgentMessage::Hello(Hello {
        min_version: bulwark_protocol::PROTOCOL_VERSION,
        max_version: bulwark_protocol::PROTOCOL_VERSION,
        host: HostId::new(host).unwrap(),
        agent_version: "test".into(),
    }))
}

/// A fresh attacker connection, optionally past the welcome; returns the control stream.
async fn attacker(c: &Cluster, established: bool) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream) {
    let (ep, conn) = raw_connect(c, Some(Creds::from_agent_dir(&c.agent_dir("mallory")))).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    if established {
        send.write_all(&hello("mallory")).await.unwrap();
        let body = frame::read_frame(&mut recv, 1 << 20).await.unwrap().unwrap();
        assert!(matches!(codec::decode::<CoordinatorMessage>(&body).unwrap(), CoordinatorMessage::Welcome(_)));
        // Keep the receive half alive: dropping it would stop the coordinator's sends.
        std::mem::forget(recv);
    }
    (ep, conn, send)
}

#[tokio::test]
async fn malformed_input_closes_only_the_offending_connection_and_never_grows_memory() {
    let mut c = Cluster::start();
    c.enroll("node1");
    c.enroll("mallory");
    c.run_agent("node1");
    c.wait_connected("node1", true);
    let baseline = c.coordinator.rss_kib();

    for established in [false, true] {
        // A frame header announcing 4 GiB.
        let (_ep, conn, mut send) = attacker(&c, established).await;
        send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let why = closed_reason(&conn).await;
        assert!(why.contains("protocol violation") && why.contains("over the 1048576-byte limit"), "{why}");

        // A truncated frame: 100 bytes announced, 10 sent, stream finished.
        let (_ep, conn, mut send) = attacker(&c, established).await;
        send.write_all(&100u32.to_be_bytes()).await.unwrap();
        send.write_all(&[0u8; 10]).await.unwrap();
        send.finish().unwrap();
        let why = closed_reason(&conn).await;
        assert!(why.contains("protocol violation") && why.contains("in the middle of a frame"), "{why}");

        // Random bytes, many seeds.
        for seed in 0..12u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let len = rng.gen_range(1..64 * 1024);
            let mut junk = vec![0u8; len];
            rng.fill(&mut junk[..]);
            if seed % 2 == 0 {
                // A plausible length so the decoder, not the length check, has to refuse it.
                junk[..4].copy_from_slice(&((len - 4) as u32).to_be_bytes());
            }
            let (_ep, conn, mut send) = attacker(&c, established).await;
            let _ = send.write_all(&junk).await;
            let _ = send.finish();
            let why = closed_reason(&conn).await;
            assert!(why.contains("protocol violation"), "seed {seed}: {why}");
        }
    }

    // A flood of streams on an established session.
    let (_ep, conn, _send) = attacker(&c, true).await;
    let mut opened = 0;
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await {
            Ok(Ok(mut s)) => {
                opened += 1;
                let _ = s.write_all(&[0u8; 4096]).await;
            }
            _ => break,
        }
    }
    assert!(opened >= 1);
    let why = closed_reason(&conn).await;
    assert!(why.contains("protocol violation") && why.contains("unexpected unidirectional stream"), "{why}");

    // A flood of bidirectional streams before any hello: only the first counts as the control stream.
    let (_ep, conn) = raw_connect(&c, Some(Creds::from_agent_dir(&c.agent_dir("mallory")))).await.unwrap();
    let mut streams = vec![];
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await {
            Ok(Ok((mut s, r))) => {
                let _ = s.write_all(&[1, 2, 3]).await;
                streams.push((s, r));
            }
            _ => break,
        }
    }
    assert!(!streams.is_empty());
    // Dropping the streams finishes them mid-frame: the control stream is truncated.
    drop(streams);
    let why = closed_reason(&conn).await;
    assert!(why.contains("protocol violation"), "{why}");

    assert!(c.coordinator.is_running(), "the coordinator must survive:\n{}", c.coordinator.log_text());
    assert_eq!(c.agent_connected("node1"), Some(true), "the well-behaved agent stays connected");
    let grown = c.coordinator.rss_kib().saturating_sub(baseline);
    assert!(grown < 64 * 1024, "coordinator RSS grew by {grown} KiB");
    let log = c.coordinator.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("protocol violation"));
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_dropped() {
    let c = Cluster::start();
    c.enroll("mallory");
    let (_ep, conn) = raw_connect(&c, Some(Creds::from_agent_dir(&c.agent_dir("mallory")))).await.unwrap();
    let (_send, _recv) = conn.open_bi().await.unwrap();
    let why = match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await {
        Ok(e) => quic::explain(&e),
        Err(_) => panic!("a silent peer must be dropped"),
    };
    assert!(why.contains("no hello in time"), "{why}");
}

#[tokio::test]
async fn malformed_admin_requests_close_the_connection_without_harm() {
    let c = Cluster::start();
    let dir = c.dir();
    let creds = Creds::from_pem(
        &std::fs::read_to_string(dir.join("pki/admin.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("pki/admin.key")).unwrap(),
    );
    let (_ep, conn) = raw_connect(&c, Some(creds)).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let why = closed_reason(&conn).await;
    assert!(why.contains("protocol violation"), "{why}");
    // The admin API still answers.
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["--data-dir", &c.dir_str(), "status", "--output", "json"])).unwrap();
    assert_eq!(status["name"], "coord1");
}
