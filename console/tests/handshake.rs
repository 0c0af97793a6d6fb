//! Every way a peer can be refused when it connects, checked from both sides: what the client
//! sees, and the reason in the coordinator's log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_pki::ca::{LeafSpec, AGENT_VALIDITY};
use bulwark_pki::Role;
use bulwark_protocol::messages::{AgentMessage, CoordinatorMessage, Hello};
use bulwark_protocol::{codec, HostId, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use common::*;
use std::time::{Duration, SystemTime};

fn hello(host: &str, min: u16, max: u16) -> Vec<u8> {
    framed(&AgentMessage::Hello(Hello {
        min_version: min,
        max_version: max,
        host: HostId::new(host).unwrap(),
        agent_version: "test".into(),
    }))
}

/// Connects with `creds`, says hello as `host`; returns the client-side error text.
async fn refused(c: &Cluster, creds: Option<Creds>, host: &str) -> String {
    match raw_connect(c, creds).await {
        Err(e) => e,
        Ok((_ep, conn)) => match first_exchange(&conn, &hello(host, PROTOCOL_VERSION, PROTOCOL_VERSION)).await {
            Err(e) => e,
            Ok(body) => panic!("expected a refusal, got an answer: {:?}", codec::decode::<CoordinatorMessage>(&body)),
        },
    }
}

fn foreign_agent_creds(host: &str) -> Creds {
    let evil = bulwark_pki::Ca::generate("evil").unwrap();
    let (cert, key) =
        evil.issue_with_new_key(&LeafSpec::new(Role::Agent, host, vec![host.into()], AGENT_VALIDITY)).unwrap();
    Creds::from_pem(&cert.pem, &key.serialize_pem())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let c = Cluster::start();
    c.enroll("node1");
    let err = refused(&c, Some(foreign_agent_creds("node1")), "node1").await;
    assert!(err.contains("refused by the coordinator: unknown CA"), "{err}");
    c.coordinator.wait_log("invalid peer certificate: UnknownIssuer");
}

#[tokio::test]
async fn a_self_signed_certificate_is_refused_at_the_handshake() {
    let c = Cluster::start();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["node1".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, Role::Agent.ou());
    params.distinguished_name.push(rcgen::DnType::CommonName, "node1");
    let cert = params.self_signed(&key).unwrap();
    let err = refused(&c, Some(Creds::from_pem(&cert.pem(), &key.serialize_pem())), "node1").await;
    assert!(err.starts_with("refused by the coordinator"), "{err}");
    c.coordinator.wait_log("invalid peer certificate: UnknownIssuer");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    let c = Cluster::start();
    let ca = c.ca();
    let now = SystemTime::now();
    let spec = LeafSpec {
        role: Role::Agent,
        name: "node1".into(),
        sans: vec!["node1".into()],
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
        cluster: None,
    };
    let (cert, key) = ca.issue_with_new_key(&spec).unwrap();
    let err = refused(&c, Some(Creds::from_pem(&cert.pem, &key.serialize_pem())), "node1").await;
    assert!(err.contains("refused by the coordinator: certificate expired"), "{err}");
    c.coordinator.wait_log("invalid peer certificate: certificate expired");
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_at_the_handshake() {
    let c = Cluster::start();
    let dir = c.enroll("node1");
    ok(&["--data-dir", &c.dir_str(), "agent", "revoke", "node1"]);
    let err = refused(&c, Some(Creds::from_agent_dir(&dir)), "node1").await;
    assert!(err.contains("refused by the coordinator: certificate revoked"), "{err}");
    c.coordinator.wait_log("invalid peer certificate: Revoked");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let c = Cluster::start();
    let err = refused(&c, None, "node1").await;
    assert!(err.contains("a client certificate is required"), "{err}");
    c.coordinator.wait_log("no client certificate presented");
}

#[tokio::test]
async fn an_agent_certificate_cannot_reach_the_admin_api() {
    let c = Cluster::start();
    let dir = c.enroll("node1");
    let (_ep, conn) = raw_connect(&c, Some(Creds::from_agent_dir(&dir))).await.unwrap();
    let admin = framed(&bulwark_protocol::messages::AdminEnvelope {
        version: PROTOCOL_VERSION,
        request: bulwark_protocol::messages::AdminRequest::AgentRevoke { host: HostId::new("node1").unwrap() },
    });
    let err = first_exchange(&conn, &admin).await.unwrap_err();
    assert!(err.contains("protocol violation") || err.contains("bad hello"), "{err}");
    assert_eq!(c.agents_json()[0]["revoked"], false, "the agent could not revoke anything");
}

#[tokio::test]
async fn a_hello_naming_another_host_is_refused() {
    let c = Cluster::start();
    let dir = c.enroll("node1");
    let (_ep, conn) = raw_connect(&c, Some(Creds::from_agent_dir(&dir))).await.unwrap();
    let body = first_exchange(&conn, &hello("node2", PROTOCOL_VERSION, PROTOCOL_VERSION)).await.unwrap();
    let answer: CoordinatorMessage = codec::decode(&body).unwrap();
    let CoordinatorMessage::Refused { reason } = answer else { panic!("expected a refusal, got {answer:?}") };
    assert!(reason.contains("names host \"node2\" but the certificate is for \"node1\""), "{reason}");
    c.coordinator.wait_log("hello refused");
    assert_eq!(c.agent_connected("node1"), Some(false));
}

#[tokio::test]
async fn an_incompatible_protocol_version_is_refused_naming_both_versions() {
    let c = Cluster::start();
    let dir = c.enroll("node1");
    let (_ep, conn) = raw_connect(&c, Some(Creds::from_agent_dir(&dir))).await.unwrap();
    let (min, max) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3);
    let body = first_exchange(&conn, &hello("node1", min, max)).await.unwrap();
    let CoordinatorMessage::Refused { reason } = codec::decode(&body).unwrap() else { panic!("expected a refusal") };
    let ours = format!("{MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}");
    assert!(reason.contains(&ours) && reason.contains(&format!("{min}..={max}")), "{reason}");
    c.coordinator.wait_log("incompatible protocol versions");
}
