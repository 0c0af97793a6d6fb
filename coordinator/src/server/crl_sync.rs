//! Revocations reach every coordinator of the deployment. Only the first coordinator holds the
//! CA key, so only it revokes (`bulwark agent revoke`, a `--replace` enrollment); a coordinator
//! that joined fetches its CRL over the admin API with the administrator's certificate it was
//! given at `init --join`, every [`CRL_SYNC_EVERY`]. A newer CRL (by its number, its signature
//! checked against the CA) is recorded in the catalog, written to `pki/crl.pem`, swapped into
//! the TLS configuration, and the connections of hosts it revokes are closed.

use crate::admin_client::{AdminClient, AdminTarget};
use crate::catalog::{now_secs, RevocationRecord};
use crate::config::AuthorityRef;
use crate::server::State;
use bulwark_protocol::messages::{AdminRequest, AdminResponse};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

/// How often a joined coordinator asks the first one for its CRL.
pub const CRL_SYNC_EVERY: Duration = Duration::from_secs(30);

/// The most revocations a CRL fetched may list.
const MAX_REVOKED: usize = 1_000_000;

/// Fetches and applies the first coordinator's CRL for as long as the coordinator runs.
pub async fn run(state: Arc<State>, authority: AuthorityRef) {
    let mut tick = tokio::time::interval(CRL_SYNC_EVERY);
    loop {
        tick.tick().await;
        match sync_once(&state, &authority).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(revoked = n, authority = %authority, "revocations of the deployment applied"),
            Err(e) => tracing::warn!(authority = %authority, error = %e, "cannot fetch the deployment's CRL"),
        }
    }
}

/// One fetch: answers how many certificates it revoked here.
pub async fn sync_once(state: &Arc<State>, authority: &AuthorityRef) -> Result<usize, String> {
    let dir = state.authority.dir().clone();
    let read = |f: &str| std::fs::read_to_string(dir.pki_file(f)).map_err(|e| format!("pki/{f}: {e}"));
    let addr = authority
        .addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("{} does not resolve", authority.addr))?;
    let target = AdminTarget {
        addr,
        server_name: authority.name.clone(),
        ca_pem: read("ca.pem")?,
        cert_pem: read("admin.pem")?,
        key_pem: read("admin.key")?,
    };
    let client = AdminClient::connect(&target).await.map_err(|e| e.to_string())?;
    let pem = match client.request(AdminRequest::Crl).await.map_err(|e| e.to_string())? {
        AdminResponse::Crl { pem } => pem,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let ca_der = state.authority.ca_der().to_vec();
    let theirs = bulwark_pki::ca::read_crl(&pem, &ca_der, MAX_REVOKED).map_err(|e| e.to_string())?;
    let ours = bulwark_pki::ca::read_crl(&read("crl.pem")?, &ca_der, MAX_REVOKED).map_err(|e| e.to_string())?;
    if theirs.number <= ours.number {
        return Ok(0);
    }
    let catalog = state.authority.catalog().clone();
    let path = dir.pki_file("crl.pem");
    let revoked = tokio::task::spawn_blocking(move || {
        let now = now_secs();
        let mut records = vec![];
        for serial in &theirs.serials {
            if !catalog.is_revoked(serial).map_err(|e| e.to_string())? {
                records.push(RevocationRecord { serial: serial.clone(), host: String::new(), revoked_at: now });
            }
        }
        catalog.revoke(&records).map_err(|e| e.to_string())?;
        bulwark_pki::files::write_atomic(&path, pem.as_bytes(), 0o644)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let serials: std::collections::HashSet<&String> = records.iter().map(|r| &r.serial).collect();
        let hosts: Vec<String> = catalog
            .agents()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|a| serials.contains(&a.cert_serial))
            .map(|a| a.host)
            .collect();
        Ok::<_, String>((records.len(), hosts))
    })
    .await
    .map_err(|e| e.to_string())??;
    state.apply_revocation().await;
    let (count, hosts) = revoked;
    for host in hosts {
        tracing::warn!(%host, "the host's certificate was revoked by the deployment: closing its connection");
        let reason = "certificate revoked".to_owned();
        let code = bulwark_pki::quic::close::REVOKED;
        let _ = state.registry.send(crate::server::registry::CloseHost { host, code, reason }).await;
    }
    Ok(count)
}
