//! What happens to one incoming QUIC connection: the TLS handshake (certificates checked by
//! rustls against the CA and the CRL), then by ALPN and certificate role: enrollment, an agent
//! session, or the admin API. Anything else is closed with a reason that is also logged.

use crate::catalog::now_secs;
use crate::server::registry::Register;
use crate::server::session::{AgentSession, Closed, Inbound};
use crate::server::{admin, State};
use actix::prelude::*;
use bulwark_pki::quic::close;
use bulwark_pki::{PeerIdentity, Role};
use bulwark_protocol::frame::{self, FrameError};
use bulwark_protocol::handshake::accept_hello;
use bulwark_protocol::messages::{
    AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, JoinRequest, JoinResponse,
};
use bulwark_protocol::text::{self, Escaped};
use bulwark_protocol::{HostId, ALPN, ALPN_ENROLL, ALPN_JOIN};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How long a peer may take to open its first stream and say what it wants.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat interval the coordinator asks agents for.
pub const HEARTBEAT_SECS: u32 = 10;

/// Drives one incoming connection to its end.
pub async fn handle(state: Arc<State>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, reason = %e, "connection refused at the TLS handshake");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default();
    let identity = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| bulwark_pki::tls::peer_identity(Some(&chain)));

    if alpn == ALPN_ENROLL {
        let span = tracing::info_span!("enroll", %remote);
        enroll(state, conn).instrument(span).await;
        return;
    }
    if alpn == ALPN_JOIN {
        let span = tracing::info_span!("join", %remote);
        join(state, conn).instrument(span).await;
        return;
    }
    if alpn != ALPN {
        refuse(&conn, close::REFUSED, "unknown application protocol", remote);
        return;
    }
    let identity = match identity {
        None => {
            refuse(&conn, close::CERT_REQUIRED, "no client certificate presented", remote);
            return;
        }
        Some(Err(e)) => {
            refuse(&conn, close::REFUSED, &format!("certificate without a Bulwark identity: {e}"), remote);
            return;
        }
        Some(Ok(id)) => id,
    };
    // Second line of defence behind the CRL in the TLS config: a revocation that raced a
    // config swap still stops here.
    if state.authority.catalog().is_revoked(&identity.serial).unwrap_or(true) {
        refuse(&conn, close::REVOKED, &format!("certificate {} is revoked", identity.serial), remote);
        return;
    }
    match identity.role {
        Role::Agent => {
            let span = tracing::info_span!("agent", host = %identity.name, %remote, serial = %identity.serial);
            agent(state, conn, identity).instrument(span).await
        }
        Role::Admin => {
            let span = tracing::info_span!("admin", name = %identity.name, %remote);
            admin::serve(state, conn).instrument(span).await
        }
        Role::Coordinator => {
            refuse(&conn, close::REFUSED, "coordinator-to-coordinator sessions are not supported", remote)
        }
        // Its certificate is for serving only (TLS already refuses it as a client).
        Role::Export => refuse(&conn, close::REFUSED, "an export certificate is not a client", remote),
    }
}

fn refuse(conn: &quinn::Connection, code: u32, reason: &str, remote: std::net::SocketAddr) {
    tracing::warn!(%remote, reason, "connection refused");
    conn.close(code.into(), reason.as_bytes());
}

/// A protocol violation: log it and close the connection.
pub fn violation(conn: &quinn::Connection, what: &str, err: &dyn std::fmt::Display) {
    tracing::warn!(error = %err, "{what}: closing the connection (protocol violation)");
    conn.close(close::PROTOCOL_VIOLATION.into(), format!("{what}: {err}").as_bytes());
}

async fn enroll(state: Arc<State>, conn: quinn::Connection) {
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: EnrollRequest =
            frame::read_message(&mut recv).await.map_err(|e| e.to_string())?.ok_or("no request")?;
        tracing::info!(host = %req.host, "enrollment request");
        let authority = state.authority.clone();
        let decided = tokio::task::spawn_blocking(move || authority.enroll(&req)).await.map_err(|e| e.to_string())?;
        let enrollment = match decided {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "enrollment failed");
                let msg = EnrollResponse::Refused { reason: format!("coordinator error: {e}") };
                let _ = frame::write_message(&mut send, &msg).await;
                let _ = send.finish();
                return Ok(());
            }
        };
        match &enrollment.response {
            EnrollResponse::Accepted { .. } => tracing::info!("agent enrolled"),
            EnrollResponse::Refused { reason } => tracing::warn!(reason, "enrollment refused"),
        }
        if !enrollment.revoked.is_empty() {
            state.apply_revocation().await;
            if let EnrollResponse::Accepted { .. } = &enrollment.response {
                let host = enrollment.host.clone();
                let reason = "certificate replaced by a new enrollment".to_owned();
                let _ = state
                    .registry
                    .send(crate::server::registry::CloseHost { host, code: close::REVOKED, reason })
                    .await;
            }
        }
        frame::write_message(&mut send, &enrollment.response).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            // Let the peer read the answer and close first.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        Ok(Err(e)) => violation(&conn, "enrollment exchange failed", &e),
        Err(_) => {
            tracing::warn!("enrollment timed out");
            conn.close(close::TIMEOUT.into(), b"enrollment timed out");
        }
    }
}

/// A coordinator joining the deployment: one request, one answer (like enrollment).
async fn join(state: Arc<State>, conn: quinn::Connection) {
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: JoinRequest = frame::read_message(&mut recv).await.map_err(|e| e.to_string())?.ok_or("no request")?;
        tracing::info!(name = ?req.name, addr = %Escaped(&req.addr), "coordinator join request");
        let authority = state.authority.clone();
        let decided = tokio::task::spawn_blocking(move || authority.join(&req)).await.map_err(|e| e.to_string())?;
        let answer = decided.unwrap_or_else(|e| {
            tracing::error!(error = %e, "join failed");
            JoinResponse::Refused { reason: format!("coordinator error: {e}") }
        });
        match &answer {
            JoinResponse::Refused { reason } => tracing::warn!(reason, "join refused"),
            // Connected agents learn the new coordinator now (others at their next welcome).
            JoinResponse::Accepted { coordinators, .. } => {
                let list = coordinators.clone();
                let hosts = state.registry.send(crate::server::registry::ListConnected).await.unwrap_or_default();
                for h in hosts {
                    if let Ok(Some((session, _))) = state.registry.send(crate::jobs::SessionOf { host: h.host }).await {
                        session.do_send(crate::jobs::ToAgent(CoordinatorMessage::Coordinators { list: list.clone() }));
                    }
                }
            }
        }
        frame::write_message(&mut send, &answer).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        Ok(Err(e)) => violation(&conn, "join exchange failed", &e),
        Err(_) => conn.close(close::TIMEOUT.into(), b"join timed out"),
    }
}

async fn agent(state: Arc<State>, conn: quinn::Connection, identity: PeerIdentity) {
    let certified = match HostId::new(identity.name.clone()) {
        Ok(h) => h,
        Err(e) => return violation(&conn, "agent certificate names no valid host", &e),
    };
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let msg: Option<AgentMessage> = frame::read_message(&mut recv).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv, msg))
    })
    .await;
    let (mut send, recv, hello) = match first {
        Err(_) => {
            tracing::warn!("no hello within {HANDSHAKE_TIMEOUT:?}");
            conn.close(close::TIMEOUT.into(), b"no hello in time");
            return;
        }
        Ok(Err(e)) => return violation(&conn, "bad hello", &e),
        Ok(Ok((send, recv, Some(AgentMessage::Hello(mut h))))) => {
            // Stored in the catalog and shown by `agent list`: bounded like every agent's text.
            h.agent_version = text::cap(std::mem::take(&mut h.agent_version), text::MAX_VERSION_BYTES);
            (send, recv, h)
        }
        Ok(Ok(_)) => return violation(&conn, "first message is not a hello", &"unexpected message"),
    };
    let welcome = match accept_hello(&hello, &certified, &state.authority.config().name, HEARTBEAT_SECS) {
        Ok(mut w) => {
            w.coordinators = state.authority.coordinators().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the deployment's coordinators");
                vec![]
            });
            w
        }
        Err(refusal) => {
            tracing::warn!(reason = %refusal, "hello refused");
            let _ = frame::write_message(&mut send, &CoordinatorMessage::Refused { reason: refusal.to_string() }).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(close::REFUSED.into(), refusal.to_string().as_bytes());
            return;
        }
    };
    if let Err(e) = frame::write_message(&mut send, &CoordinatorMessage::Welcome(welcome.clone())).await {
        return violation(&conn, "cannot send welcome", &e);
    }
    let now = now_secs();
    // A host another coordinator enrolled is learned here, with the cluster its certificate names.
    let catalog = state.authority.catalog();
    if let Err(e) =
        catalog.note_agent_from_certificate(certified.as_str(), &identity.serial, identity.cluster.as_deref(), now)
    {
        tracing::warn!(error = %e, "cannot record the host");
    }
    let _ = catalog.touch_agent(certified.as_str(), now, Some(&hello.agent_version));
    tracing::info!(version = welcome.version, agent_version = %Escaped(&hello.agent_version), "agent connected");

    let session = AgentSession {
        host: certified.to_string(),
        conn: conn.clone(),
        send: Arc::new(tokio::sync::Mutex::new(send)),
        registry: state.registry.clone(),
        catalog: state.authority.catalog().clone(),
        router: state.router.clone(),
        max_vms: state.authority.config().agents.max_vms_per_host,
        span: tracing::Span::current(),
        waiting: vec![],
        coordinator: state.authority.config().name.clone(),
        claims_waiting: std::collections::HashMap::new(),
        state: state.clone(),
        auto: Default::default(),
    }
    .start();

    state.registry.do_send(Register {
        host: certified.to_string(),
        conn: conn.clone(),
        agent_version: hello.agent_version.clone(),
        session: session.clone(),
        now,
    });

    tokio::select! {
        () = read_control(recv, session.clone(), &conn) => {}
        () = accept_transfers(&state, &conn, certified.as_str()) => {}
    }
    session.do_send(Closed);
}

/// Feeds the session every message of the control stream until it ends or misbehaves.
async fn read_control(mut recv: quinn::RecvStream, session: Addr<AgentSession>, conn: &quinn::Connection) {
    loop {
        match frame::read_message::<AgentMessage, _>(&mut recv).await {
            Ok(Some(msg)) => session.do_send(Inbound(msg)),
            Ok(None) => {
                tracing::debug!("control stream finished");
                conn.close(close::DONE.into(), b"control stream finished");
                return;
            }
            Err(FrameError::Io(e)) => {
                tracing::debug!(error = %e, "control stream ended");
                return;
            }
            Err(e) => return violation(conn, "malformed frame on the control stream", &e),
        }
    }
}

/// Transfer streams: each bidirectional stream after the control stream carries one disk of a
/// job; it goes to that job if the job runs on this host. Unidirectional streams are not part
/// of the protocol.
async fn accept_transfers(state: &Arc<State>, conn: &quinn::Connection, host: &str) {
    loop {
        tokio::select! {
            r = conn.accept_bi() => match r {
                Ok((send, recv)) => {
                    let (state, host) = (state.clone(), host.to_owned());
                    actix_rt::spawn(route_transfer(state, host, send, recv).instrument(tracing::Span::current()));
                }
                Err(_) => return,
            },
            r = conn.accept_uni() => {
                if r.is_ok() {
                    violation(conn, "unexpected unidirectional stream", &"transfers use bidirectional streams");
                }
                return;
            }
        }
    }
}

/// Reads a transfer stream's `Open` and hands the stream to its job.
async fn route_transfer(state: Arc<State>, host: String, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage};
    let open =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, transfer::read(&mut recv, bulwark_protocol::block::MIN_BLOCK_SIZE))
            .await;
    let refuse = |send: &mut quinn::SendStream, why: String| {
        tracing::warn!(reason = %why, "transfer stream refused");
        let _ = send.reset(quinn::VarInt::from_u32(close::REFUSED));
    };
    let (job, disk, block_size, blocks, mode) = match open {
        Ok(Ok(Some(TransferFrame::Message(TransferMessage::Open { job, disk, block_size, blocks, mode })))) => {
            (job, disk, block_size, blocks, mode)
        }
        Ok(Ok(other)) => return refuse(&mut send, format!("a transfer stream must start with Open, not {other:?}")),
        Ok(Err(e)) => return refuse(&mut send, format!("malformed transfer stream: {e}")),
        Err(_) => return refuse(&mut send, "no Open in time".into()),
    };
    if bulwark_protocol::block::check_block_size(block_size as usize).is_err() {
        return refuse(&mut send, format!("block size {block_size} out of bounds"));
    }
    // An instant recovery's disk outlives its job: served beside the jobs, for as long as the
    // recovery is active and only to the agent of its host.
    if mode == transfer::TransferMode::Export {
        let catalog = state.store.catalog().clone();
        let (h, d) = (host.clone(), disk.clone());
        let found =
            super::blocking(move || super::export::instant_disk(&catalog, job, &h, &d, block_size, blocks)).await;
        return match found {
            Ok(Ok(rp_disk)) => super::export::serve_instant(&state, send, recv, rp_disk).await,
            Ok(Err(why)) | Err(why) => refuse(&mut send, why),
        };
    }
    let target = match state.router.stream_target(job, &host) {
        Ok(t) => t,
        Err(why) => return refuse(&mut send, why),
    };
    let stream =
        crate::jobs::TransferStream { disk, block_size, blocks, mode, send: Box::new(send), recv: Box::new(recv) };
    if target.send(stream).await.is_err() {
        tracing::warn!(job_id = job, "the job ended before its transfer stream arrived");
    }
}
