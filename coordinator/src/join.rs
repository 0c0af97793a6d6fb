//! `bulwark-coordinator init --join TOKEN`, the joining side: make this coordinator's key and
//! its administrator's, prove the token to the deployment's first coordinator (trusted only if
//! its chain carries the CA the token pins) and take back both certificates, the CA, the CRL and
//! the deployment's coordinators. Nothing is written here: `init` writes what this returns.

use bulwark_pki::{quic, tls, JoinToken, Role};
use bulwark_protocol::frame;
use bulwark_protocol::messages::{CoordinatorAddr, JoinRequest, JoinResponse, MAX_COORDINATORS};
use bulwark_protocol::{HostId, ALPN_JOIN, PROTOCOL_VERSION};
use std::net::ToSocketAddrs;
use std::time::Duration;

/// What joining gave this coordinator.
#[derive(Debug, Clone)]
pub struct Joined {
    pub name: String,
    pub coordinator_pem: String,
    pub coordinator_key: String,
    pub admin_pem: String,
    pub admin_key: String,
    pub ca_pem: String,
    pub crl_pem: String,
    pub coordinators: Vec<CoordinatorAddr>,
    pub authority: CoordinatorAddr,
}

/// Why joining failed (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] bulwark_pki::token::TokenError),
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the coordinator refused to let this one join: {0}")]
    Refused(String),
    #[error("the coordinator's answer is not acceptable: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Pki(#[from] bulwark_pki::PkiError),
}

/// Joins the deployment `token_text` names, as `name` (none: the token's) dialed by agents at
/// `addr`, with a certificate also valid for `sans`.
pub async fn join(
    token_text: &str,
    name: Option<HostId>,
    addr: String,
    sans: Vec<String>,
) -> Result<Joined, JoinError> {
    let token = JoinToken::decode(token_text)?;
    let (coordinator_key, coordinator_csr) = bulwark_pki::ca::key_and_csr("coordinator")?;
    let (admin_key, admin_csr) = bulwark_pki::ca::key_and_csr("admin")?;
    let connect_err = |reason: String| JoinError::Connect { addr: token.addr.clone(), reason };
    let remote = token
        .addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| connect_err("the address does not resolve".into()))?;
    let cfg = quic::client(tls::enroll_client_config(token.ca_fingerprint, ALPN_JOIN)?)?;
    let mut endpoint =
        quinn::Endpoint::client(quic::client_bind_addr(remote)).map_err(|e| connect_err(e.to_string()))?;
    endpoint.set_default_client_config(cfg);
    let req = JoinRequest {
        version: PROTOCOL_VERSION,
        token_secret: token.secret.to_vec(),
        name,
        addr,
        sans,
        coordinator_csr,
        admin_csr,
    };
    let exchange = async {
        let conn = endpoint
            .connect(remote, &token.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(quic::explain(&e)))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect_err(quic::explain(&e)))?;
        frame::write_message(&mut send, &req).await.map_err(|e| connect_err(e.to_string()))?;
        let _ = send.finish();
        let answer = frame::read_message::<JoinResponse, _>(&mut recv).await;
        conn.close(quic::close::DONE.into(), b"joined");
        match answer {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(JoinError::BadAnswer("no answer".into())),
            Err(e) => Err(JoinError::BadAnswer(e.to_string())),
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| connect_err("no answer within 20 s".into()))??;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let (name, coordinator_pem, admin_pem, ca_pem, crl_pem, coordinators, authority) = match answer {
        JoinResponse::Accepted { name, coordinator_pem, admin_pem, ca_pem, crl_pem, coordinators, authority } => {
            (name, coordinator_pem, admin_pem, ca_pem, crl_pem, coordinators, authority)
        }
        JoinResponse::Refused { reason } => return Err(JoinError::Refused(reason)),
    };
    // What we were given is checked before anything is kept.
    let ca = tls::certs_from_pem(&ca_pem, "CA certificate")?;
    if ca.first().map(|c| bulwark_pki::ca::fingerprint(c)) != Some(token.ca_fingerprint) {
        return Err(JoinError::BadAnswer("the CA sent does not match the token's fingerprint".into()));
    }
    let bad = |e: String| JoinError::BadAnswer(e);
    for (pem, role, want) in [(&coordinator_pem, Role::Coordinator, name.as_str()), (&admin_pem, Role::Admin, "admin")]
    {
        let certs = tls::certs_from_pem(pem, "certificate")?;
        let leaf = certs.first().ok_or_else(|| bad("an empty certificate".into()))?;
        let id = bulwark_pki::identity::identity_of(leaf).map_err(|e| bad(e.to_string()))?;
        if id.role != role || id.name != want {
            return Err(bad(format!("a certificate for {:?} {:?}, not {role:?} {want:?}", id.role, id.name)));
        }
    }
    tls::crl_from_pem(&crl_pem)?;
    if HostId::new(name.clone()).is_err() || coordinators.len() > MAX_COORDINATORS {
        return Err(bad("the coordinator's name or list is not acceptable".into()));
    }
    Ok(Joined {
        name,
        coordinator_pem,
        coordinator_key,
        admin_pem,
        admin_key,
        ca_pem,
        crl_pem,
        coordinators,
        authority,
    })
}
