//! The admin API: one request per bidirectional stream, admin certificate required (checked by
//! the caller). Handlers decide with the authority and the registry, then answer.

use super::blocking;
use crate::catalog::{JobKind, JobRecord, JobState};
use crate::enrollment::TokenScope;
use crate::server::connection::violation;
use crate::server::registry::{CloseHost, ListConnected};
use crate::server::store_actor::RunMaintenance;
use crate::server::{lists, protect, State};
use bulwark_pki::quic::close;
use bulwark_protocol::codec::{self, CodecError};
use bulwark_protocol::frame;
use bulwark_protocol::handshake::check_version;
use bulwark_protocol::messages::{AdminEnvelope, AdminRequest, AdminResponse, JobInfo, MaintenanceKind, StatusReport};
use bulwark_protocol::{HostId, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Serves admin requests on `conn` until it closes.
pub async fn serve(state: Arc<State>, conn: quinn::Connection) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let state = state.clone();
        let conn = conn.clone();
        actix_rt::spawn(
            async move {
                let env: AdminEnvelope = match frame::read_message(&mut recv).await {
                    Ok(Some(env)) => env,
                    Ok(None) => return,
                    Err(e) => return violation(&conn, "malformed admin request", &e),
                };
                let response = match (check_version(env.version), env.request) {
                    (Ok(_), AdminRequest::RecoverDisk { vm, rp, disk, options }) => {
                        protect::recover_disk(&state, &mut send, vm, rp, disk, options).await;
                        let _ = send.finish();
                        return;
                    }
                    (Ok(_), AdminRequest::RecoverItems { vm, rp, disk, paths, options }) => {
                        protect::recover_items(&state, &mut send, vm, rp, disk, paths, options).await;
                        let _ = send.finish();
                        return;
                    }
                    (Ok(_), AdminRequest::Mount { vm, rp, disk }) => {
                        super::export::mount(&state, &mut send, &mut recv, vm, rp, disk).await;
                        return;
                    }
                    (Ok(_), AdminRequest::SeedImport { vm, disk, size_bytes, source }) => {
                        protect::seed_import(&state, &mut send, &mut recv, vm, disk, size_bytes, source).await
                    }
                    (Ok(_), request) => handle(&state, request).await,
                    (Err(e), _) => AdminResponse::Error { message: e.to_string() },
                };
                if send_answer(&mut send, &response).await {
                    let _ = send.finish();
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// The frame body of an answer; one that does not fit a frame becomes an error answer (and an
/// error in the log) instead of a stream the console sees closed without a word.
pub fn encode_answer(response: &AdminResponse) -> Vec<u8> {
    let message = match codec::encode(response) {
        Ok(body) => return body,
        Err(CodecError::TooLarge { len, limit }) => {
            tracing::error!(bytes = len, limit, "an admin answer is too large for a frame: answering an error instead");
            format!("the answer is too large: {len} bytes, over the {limit}-byte frame limit; use --limit")
        }
        Err(e) => {
            tracing::error!(error = %e, "an admin answer does not encode: answering an error instead");
            format!("the answer cannot be sent: {e}")
        }
    };
    // A short error always encodes; an empty body would only make the console report a broken frame.
    codec::encode(&AdminResponse::Error { message }).unwrap_or_default()
}

/// Sends one answer frame; false if the console went away.
pub async fn send_answer(send: &mut quinn::SendStream, response: &AdminResponse) -> bool {
    match frame::write_frame(send, &encode_answer(response), codec::CONTROL_LIMIT).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send an admin answer");
            false
        }
    }
}

async fn handle(state: &Arc<State>, req: AdminRequest) -> AdminResponse {
    tracing::info!(request = ?req, "admin request");
    let catalog = state.authority.catalog().clone();
    match req {
        AdminRequest::Status => status(state).await,
        AdminRequest::AgentList { page } => lists::agents(state, page).await,
        AdminRequest::AgentRevoke { host } => revoke(state, host).await,
        AdminRequest::Maintenance { kind, wait } => maintenance(state, kind, wait).await,
        AdminRequest::JobShow { id } => match state.authority.catalog().job(id) {
            Ok(Some(job)) => AdminResponse::Job(job_info(&job)),
            Ok(None) => AdminResponse::Error { message: format!("no job {id}") },
            Err(e) => AdminResponse::Error { message: e.to_string() },
        },
        AdminRequest::JobList { vm, state: wanted, page } => lists::jobs(catalog, vm, wanted, page).await,
        AdminRequest::VmList { page } => lists::vms(catalog, state.authority.config().name.clone(), page).await,
        AdminRequest::VmForget { vm } => protect::vm_forget(state, vm).await,
        AdminRequest::VmTakeOver { vm } => crate::server::ownership::vm_take_over(state, vm).await,
        AdminRequest::GroupCreate { name, vms, policy, auto_cluster } => {
            protect::group_create(state, name, vms, policy, auto_cluster).await
        }
        AdminRequest::GroupList { page } => lists::groups(catalog, page).await,
        AdminRequest::GroupShow { name, page } => lists::group(catalog, name, page).await,
        AdminRequest::GroupAddVm { name, vms } => protect::group_add(state, name, vms).await,
        AdminRequest::GroupRemoveVm { name, vms, keep_data } => {
            protect::group_remove(state, name, vms, keep_data).await
        }
        AdminRequest::GroupDelete { name } => protect::group_delete(state, name).await,
        AdminRequest::GroupPlan { name } => protect::group_plan(state, name).await,
        AdminRequest::GroupSet { name, patch } => protect::group_set(state, name, patch).await,
        AdminRequest::JobCancel { id } => protect::job_cancel(state, id).await,
        AdminRequest::Backup { vm, kind } => protect::run_now(state, vm, protect::backup_kind(kind)).await,
        AdminRequest::ConsistencyCheck { vm } => protect::run_now(state, vm, JobKind::ConsistencyCheck).await,
        AdminRequest::RecoveryPoints { vm, page } => lists::recovery_points(catalog, vm, page).await,
        AdminRequest::Recover { vm, rp, to_host, name, options } => {
            protect::recover(state, vm, rp, to_host, name, options).await
        }
        AdminRequest::Ls { vm, rp, disk, path, page } => lists::ls(state, vm, rp, disk, path, page).await,
        AdminRequest::RecoverItemsToHost { vm, rp, disk, paths, host, dest, options, keep_modes } => {
            let req = protect::ItemsToHost { vm, rp, disk, paths, host, dest, options, keep_modes };
            protect::recover_items_to_host(state, req).await
        }
        AdminRequest::RecoverDisk { .. }
        | AdminRequest::SeedImport { .. }
        | AdminRequest::RecoverItems { .. }
        | AdminRequest::Mount { .. } => {
            AdminResponse::Error { message: "a streaming request reached the plain handler".into() }
        }
        AdminRequest::ExportCert { csr_pem, names } => export_cert(state, csr_pem, names).await,
        AdminRequest::Crl => match std::fs::read_to_string(state.authority.dir().pki_file("crl.pem")) {
            Ok(pem) => AdminResponse::Crl { pem },
            Err(e) => AdminResponse::Error { message: format!("cannot read the CRL: {e}") },
        },
        AdminRequest::RecoverInstant { vm, rp, to_host, name } => {
            super::instant::recover_instant(state, vm, rp, to_host, name).await
        }
        AdminRequest::RecoverFinish { vm } => super::instant::recover_finish(state, vm).await,
        AdminRequest::TokenCreate { ttl_secs, host, cluster, replace, coordinator } => {
            let authority = state.authority.clone();
            let scope = TokenScope { host, cluster, replace, coordinator };
            match blocking(move || authority.create_token(Duration::from_secs(ttl_secs), &scope)).await {
                Ok(Ok(t)) => AdminResponse::Token { token: t.token, id: t.id, expires_at: t.expires_at },
                Ok(Err(e)) => AdminResponse::Error { message: e.to_string() },
                Err(e) => AdminResponse::Error { message: e },
            }
        }
        AdminRequest::TokenList { page } => {
            let authority = state.authority.clone();
            match blocking(move || authority.list_tokens(&page)).await {
                Ok(Ok(tokens)) => AdminResponse::Tokens(tokens),
                Ok(Err(e)) => AdminResponse::Error { message: e.to_string() },
                Err(e) => AdminResponse::Error { message: e },
            }
        }
        AdminRequest::TokenRevoke { id } => {
            let authority = state.authority.clone();
            let asked = id.clone();
            match blocking(move || authority.revoke_token(&asked)).await {
                Ok(Ok(now)) => AdminResponse::Done { message: crate::enrollment::revoked_message(&id, now) },
                Ok(Err(e)) => AdminResponse::Error { message: e.to_string() },
                Err(e) => AdminResponse::Error { message: e },
            }
        }
    }
}

/// The wire form of a job.
pub fn job_info(j: &JobRecord) -> JobInfo {
    JobInfo {
        id: j.id,
        kind: j.kind.as_str().to_owned(),
        vm: j.vm.clone(),
        state: j.state.as_str().to_owned(),
        started_at: j.started_at,
        finished_at: j.finished_at,
        bytes_transferred: j.bytes_transferred,
        bytes_total: j.bytes_total,
        bytes_scanned: j.bytes_scanned,
        blocks_changed: j.blocks_changed,
        consistency: j.consistency.map(|c| c.as_str().to_owned()),
        error: j.error.clone(),
        detail: j.detail.clone(),
    }
}

async fn maintenance(state: &Arc<State>, kind: MaintenanceKind, wait: bool) -> AdminResponse {
    let catalog = state.authority.catalog().clone();
    let kind = match kind {
        MaintenanceKind::Verify => JobKind::Verify,
        MaintenanceKind::Prune => JobKind::Prune,
        MaintenanceKind::Gc => JobKind::Gc,
    };
    let created = blocking(move || -> Result<JobRecord, crate::catalog::CatalogError> {
        let job = JobRecord::queued(catalog.next_job_id()?, kind, None);
        catalog.put_job(&job)?;
        Ok(job)
    })
    .await;
    let job = match created {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return AdminResponse::Error { message: e.to_string() },
        Err(e) => return AdminResponse::Error { message: e },
    };
    let id = job.id;
    tracing::info!(job_id = id, kind = kind.as_str(), "job queued");
    let done = state.store_workers.send(RunMaintenance(job));
    if wait {
        match done.await {
            Ok(job) => AdminResponse::Job(job_info(&job)),
            Err(e) => AdminResponse::Error { message: format!("job {id} was lost: {e}") },
        }
    } else {
        actix_rt::spawn(async move {
            let _ = done.await;
        });
        AdminResponse::JobStarted { job_id: id }
    }
}

async fn status(state: &Arc<State>) -> AdminResponse {
    let connected = state.registry.send(ListConnected).await.unwrap_or_default();
    let catalog = state.authority.catalog();
    let enrolled = catalog.agents_after(None).filter(|a| a.as_ref().is_ok_and(|(_, a)| !a.revoked)).count();
    AdminResponse::Status(StatusReport {
        name: state.authority.config().name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: PROTOCOL_VERSION,
        agents_connected: u32::try_from(connected.len()).unwrap_or(u32::MAX),
        agents_enrolled: u32::try_from(enrolled).unwrap_or(u32::MAX),
        vms_protected: u32::try_from(catalog.count_vms(|v| v.group.is_some()).unwrap_or(0)).unwrap_or(u32::MAX),
        jobs_running: u32::try_from(protect::job_counts(state).await.1 + maintenance_running(catalog))
            .unwrap_or(u32::MAX),
        store_bytes: dir_size(&state.authority.dir().store()),
        catalog_bytes: catalog.size_on_disk(),
    })
}

/// Maintenance jobs (verify, prune, GC) running now.
fn maintenance_running(catalog: &crate::catalog::Catalog) -> usize {
    catalog.count_jobs(|j| j.state == JobState::Running && j.vm.is_none()).unwrap_or(0)
}

/// Bytes the files under `path` take (their lengths), recursively.
pub fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn revoke(state: &Arc<State>, host: HostId) -> AdminResponse {
    let authority = state.authority.clone();
    let h = host.clone();
    let serials = match blocking(move || authority.revoke_host(&h)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return AdminResponse::Error { message: e.to_string() },
        Err(e) => return AdminResponse::Error { message: e },
    };
    state.apply_revocation().await;
    let closed = state
        .registry
        .send(CloseHost { host: host.to_string(), code: close::REVOKED, reason: "certificate revoked".into() })
        .await
        .unwrap_or(0);
    tracing::warn!(%host, ?serials, connections_closed = closed, "agent revoked");
    AdminResponse::Revoked { host, serials, connections_closed: closed }
}

/// The most names an export certificate may carry.
const MAX_EXPORT_NAMES: usize = 16;

async fn export_cert(state: &Arc<State>, csr_pem: String, names: Vec<String>) -> AdminResponse {
    if names.is_empty() || names.len() > MAX_EXPORT_NAMES || names.iter().any(|n| n.is_empty() || n.len() > 253) {
        return AdminResponse::Error {
            message: format!("an export certificate needs 1 to {MAX_EXPORT_NAMES} names of at most 253 bytes"),
        };
    }
    let authority = state.authority.clone();
    match blocking(move || authority.issue_export_cert(&csr_pem, &names).map_err(|e| e.to_string())).await {
        Ok(Ok(c)) => AdminResponse::ExportCert {
            cert_pem: c.cert_pem,
            ca_pem: c.ca_pem,
            crl_pem: c.crl_pem,
            not_after: c.not_after,
        },
        Ok(Err(e)) | Err(e) => AdminResponse::Error { message: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_too_large_for_a_frame_becomes_an_error_answer() {
        let huge = AdminResponse::Done { message: "x".repeat(codec::CONTROL_LIMIT + 1) };
        let body = encode_answer(&huge);
        assert!(body.len() < 1024);
        let AdminResponse::Error { message } = codec::decode(&body).unwrap() else { panic!("not an error answer") };
        assert!(message.starts_with("the answer is too large: ") && message.ends_with("; use --limit"), "{message}");
    }

    #[test]
    fn an_answer_that_fits_is_sent_as_it_is() {
        let small = AdminResponse::JobStarted { job_id: 7 };
        assert_eq!(codec::decode::<AdminResponse>(&encode_answer(&small)).unwrap(), small);
    }
}
