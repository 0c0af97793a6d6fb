//! `bulwark-agent enroll`: the agent makes its own key, proves it holds a join token, and gets
//! a certificate for its host name. The coordinator is trusted only if its chain carries the CA
//! whose fingerprint the token pins. Nothing is written unless the coordinator accepted.

use crate::config::{AgentConfig, AgentDir, HypervisorConfig};
use bulwark_pki::files::{create_private_dir, write_atomic};
use bulwark_pki::identity::identity_of;
use bulwark_pki::token::TokenError;
use bulwark_pki::{quic, tls, JoinToken, Role};
use bulwark_protocol::frame;
use bulwark_protocol::messages::{EnrollRequest, EnrollResponse};
use bulwark_protocol::{HostId, ALPN_ENROLL, PROTOCOL_VERSION};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

/// Why enrollment failed. Nothing was written in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0} is already enrolled (agent.toml exists); use a new data directory")]
    AlreadyEnrolled(PathBuf),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("host name: {0}")]
    Host(#[from] bulwark_protocol::ids::IdError),
    #[error("no host name given and the machine's host name is unusable; pass --host")]
    NoHostName,
    #[error("cannot resolve the coordinator address {0:?}")]
    Resolve(String),
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the coordinator refused the enrollment: {0}")]
    Refused(String),
    #[error("the coordinator's answer is not acceptable: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Pki(#[from] bulwark_pki::PkiError),
    #[error("cannot make the agent key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Enrolls the agent of `dir` with `token_text`; returns the configuration written.
pub async fn enroll(dir: &AgentDir, token_text: &str, host: Option<String>) -> Result<AgentConfig, EnrollError> {
    if dir.config().exists() {
        return Err(EnrollError::AlreadyEnrolled(dir.root.clone()));
    }
    let token = JoinToken::decode(token_text)?;
    let host = match host {
        Some(h) => HostId::new(h)?,
        None => HostId::new(bulwark_pki::identity::local_host_name().ok_or(EnrollError::NoHostName)?)?,
    };

    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, host.to_string());
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let addr = token
        .addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| EnrollError::Resolve(token.addr.clone()))?;
    let connect_err = |reason: String| EnrollError::Connect { addr: token.addr.clone(), reason };
    let cfg = quic::client(tls::enroll_client_config(token.ca_fingerprint, ALPN_ENROLL)?)?;
    let mut endpoint = quinn::Endpoint::client(quic::client_bind_addr(addr)).map_err(|e| connect_err(e.to_string()))?;
    endpoint.set_default_client_config(cfg);
    let exchange = async {
        let conn = endpoint
            .connect(addr, &token.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(quic::explain(&e)))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect_err(quic::explain(&e)))?;
        let req = EnrollRequest {
            version: PROTOCOL_VERSION,
            token_secret: token.secret.to_vec(),
            host: host.clone(),
            csr_pem,
        };
        frame::write_message(&mut send, &req).await.map_err(|e| connect_err(e.to_string()))?;
        let _ = send.finish();
        let answer = frame::read_message::<EnrollResponse, _>(&mut recv).await;
        conn.close(quic::close::DONE.into(), b"enrolled");
        match answer {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(EnrollError::BadAnswer("no answer".into())),
            Err(e) => Err(match conn.close_reason() {
                Some(r) => connect_err(quic::explain(&r)),
                None => EnrollError::BadAnswer(e.to_string()),
            }),
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| connect_err("no answer within 20 s".into()))??;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;

    let (cert_pem, ca_pem, coordinator, coordinators) = match answer {
        EnrollResponse::Accepted { cert_pem, ca_pem, coordinator, coordinators } => {
            (cert_pem, ca_pem, coordinator, coordinators)
        }
        EnrollResponse::Refused { reason } => return Err(EnrollError::Refused(reason)),
    };
    // Check what we were given before keeping it.
    let ca = tls::certs_from_pem(&ca_pem, "CA certificate")?;
    if ca.first().map(|c| bulwark_pki::ca::fingerprint(c)) != Some(token.ca_fingerprint) {
        return Err(EnrollError::BadAnswer("the CA sent does not match the token's fingerprint".into()));
    }
    let certs = tls::certs_from_pem(&cert_pem, "agent certificate")?;
    let leaf = certs.first().ok_or_else(|| EnrollError::BadAnswer("empty certificate".into()))?;
    let id = identity_of(leaf).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    if id.role != Role::Agent || id.name != host.as_str() {
        return Err(EnrollError::BadAnswer(format!(
            "certificate is for {:?} {:?}, not agent {host}",
            id.role, id.name
        )));
    }

    let config = AgentConfig {
        host: host.to_string(),
        coordinator: token.addr.clone(),
        coordinator_name: coordinator,
        hypervisor: HypervisorConfig { kind: "none".into(), ..Default::default() },
    };
    let write = |path: PathBuf, body: &[u8], mode: u32| {
        write_atomic(&path, body, mode).map_err(|source| EnrollError::Write { path, source })
    };
    create_private_dir(&dir.root).map_err(|source| EnrollError::Write { path: dir.root.clone(), source })?;
    create_private_dir(&dir.pki()).map_err(|source| EnrollError::Write { path: dir.pki(), source })?;
    write(dir.key(), key.serialize_pem().as_bytes(), 0o600)?;
    write(dir.cert(), cert_pem.as_bytes(), 0o644)?;
    write(dir.ca(), ca_pem.as_bytes(), 0o644)?;
    // The deployment's other coordinators: the agent keeps a connection to each.
    let others: Vec<_> = coordinators.into_iter().filter(|c| c.name != config.coordinator_name).collect();
    crate::peers::Peers::load(dir.coordinators()).learn(&others, &config.coordinator_name);
    let text = toml::to_string_pretty(&config).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    // agent.toml last: its presence means "enrolled".
    write(dir.config(), text.as_bytes(), 0o644)?;
    Ok(config)
}
