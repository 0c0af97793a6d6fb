//! The uplink actor: the agent's one connection to its coordinator. It dials, says hello,
//! reports the inventory, sends heartbeats, and when the connection is lost dials again after a
//! capped, jittered backoff. The connection logic is a plain async function; the actor owns the
//! connection's lifecycle and timers.

use crate::backend::Hypervisor;
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::job::JobEnv;
use actix::prelude::*;
use bulwark_pki::quic;
use bulwark_protocol::frame;
use bulwark_protocol::messages::{
    AgentMessage, CoordinatorMessage, FailureKind, Hello, Inventory, JobOutcome, JobResult,
};
use bulwark_protocol::ownership::{ClaimMode, Owner};
use bulwark_protocol::{HostId, VmId, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use rand::Rng;
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How a connection attempt or an established session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Never got as far as a welcome.
    ConnectFailed(String),
    /// The coordinator refused us (certificate, hello).
    Refused(String),
    /// An established session was lost.
    Lost(String),
    /// We closed it (shutdown).
    Closed,
}

/// The hypervisor this agent serves and where its jobs keep scratch files.
#[derive(Clone)]
pub struct Hosting {
    /// None: an agent without a hypervisor (it reports no VMs and refuses jobs).
    pub backend: Option<Arc<dyn Hypervisor>>,
    pub scratch: PathBuf,
    /// The VMs with a job running, across sessions.
    pub slots: crate::job::VmSlots,
    /// Instant recoveries' exports, across sessions.
    pub exports: crate::export::InstantExports,
    /// The connection of the session now (each uplink has its own).
    pub current: crate::export::CurrentConnection,
    /// The deployment's coordinators, shared by every uplink.
    pub peers: Arc<crate::peers::Peers>,
}

impl Hosting {
    /// The VMs of `host` now, each with its ownership claim (empty, with a warning, when the
    /// hypervisor cannot say; a claim that cannot be read is reported as none, with a warning,
    /// and every job on that VM is refused until it can).
    fn inventory(&self, host: &str) -> Inventory {
        let partition = self.peers.partition();
        let Some(b) = &self.backend else { return Inventory { vms: vec![], partition } };
        let mut inventory = b.inventory(host).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the inventory");
            Inventory { vms: vec![], partition: vec![] }
        });
        inventory.partition = partition;
        let claims = crate::claims::Claims::new(b.claims_dir());
        for vm in &mut inventory.vms {
            vm.owner = claims.read(&vm.name).unwrap_or_else(|e| {
                tracing::warn!(vm = %vm.name, error = %e, "cannot read the VM's ownership claim");
                None
            });
        }
        inventory
    }
}

/// The uplink actor.
pub struct Uplink {
    pub config: AgentConfig,
    pub endpoint: quinn::Endpoint,
    pub backoff: Backoff,
    pub attempt: u32,
    pub conn: Option<quinn::Connection>,
    pub hosting: Hosting,
    pub stopping: bool,
}

impl Uplink {
    pub fn new(config: AgentConfig, endpoint: quinn::Endpoint, hosting: Hosting) -> Self {
        Self { config, endpoint, backoff: Backoff::default(), attempt: 0, conn: None, hosting, stopping: false }
    }
}

impl Actor for Uplink {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.notify(Dial);
    }
}

/// Dial the coordinator now.
#[derive(Message)]
#[rtype(result = "()")]
struct Dial;

/// A session reached its welcome.
#[derive(Message)]
#[rtype(result = "()")]
struct Established(quinn::Connection);

/// Close the connection and stop dialing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Dial> for Uplink {
    type Result = ();
    fn handle(&mut self, _: Dial, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let endpoint = self.endpoint.clone();
        let config = self.config.clone();
        let hosting = self.hosting.clone();
        let me = ctx.address();
        let span = tracing::info_span!("uplink", host = %self.config.host, coordinator = %self.config.coordinator, attempt = self.attempt);
        ctx.spawn(
            async move { run_session(&endpoint, &config, hosting, |c| me.do_send(Established(c))).await }
                .instrument(span)
                .into_actor(self)
                .map(|end, act, ctx| act.session_ended(end, ctx)),
        );
    }
}

impl Handler<Established> for Uplink {
    type Result = ();
    fn handle(&mut self, Established(conn): Established, _: &mut Context<Self>) {
        self.attempt = 0;
        self.conn = Some(conn);
    }
}

impl Handler<Shutdown> for Uplink {
    type Result = ();
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) {
        self.stopping = true;
        if let Some(c) = self.conn.take() {
            c.close(quic::close::SHUTDOWN.into(), b"agent shutting down");
        }
    }
}

impl Uplink {
    fn session_ended(&mut self, end: SessionEnd, ctx: &mut Context<Self>) {
        self.conn = None;
        // A coordinator not connected is not alive for this host's VMs.
        self.hosting.peers.set_connected(&self.config.coordinator_name, false);
        if self.stopping {
            return;
        }
        match &end {
            SessionEnd::Refused(r) => tracing::error!(host = %self.config.host, "{r}"),
            SessionEnd::ConnectFailed(r) | SessionEnd::Lost(r) => tracing::warn!(host = %self.config.host, "{r}"),
            SessionEnd::Closed => {}
        }
        let delay = self.backoff.delay(self.attempt, rand::thread_rng().gen::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        tracing::info!(delay = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)), "reconnecting");
        ctx.run_later(delay, |_, ctx| ctx.notify(Dial));
    }
}

/// One connection from dial to end: hello, welcome, inventory, then heartbeats and whatever
/// the coordinator sends, until the connection ends.
pub async fn run_session(
    endpoint: &quinn::Endpoint,
    config: &AgentConfig,
    hosting: Hosting,
    on_established: impl FnOnce(quinn::Connection),
) -> SessionEnd {
    let failed = |r: String| {
        SessionEnd::ConnectFailed(format!("cannot connect to the coordinator at {}: {r}", config.coordinator))
    };
    let Some(addr) = config.coordinator.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return failed("address does not resolve".into());
    };
    let host = match HostId::new(config.host.clone()) {
        Ok(h) => h,
        Err(e) => return failed(e.to_string()),
    };
    let conn = match endpoint.connect(addr, &config.coordinator_name) {
        Ok(connecting) => match connecting.await {
            Ok(c) => c,
            Err(e) => return classify(&e, failed),
        },
        Err(e) => return failed(e.to_string()),
    };
    // The certificate must be the coordinator's own (its name as the CA wrote it), not merely
    // valid for the name dialed: no coordinator of the deployment stands in for another.
    let identity = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| bulwark_pki::tls::peer_identity(Some(&chain)));
    match identity {
        Some(Ok(id)) if id.role == bulwark_pki::Role::Coordinator && id.name == config.coordinator_name => {}
        other => {
            conn.close(quic::close::REFUSED.into(), b"not the coordinator dialed");
            let what = match other {
                Some(Ok(id)) => format!("{:?} {:?}", id.role, id.name),
                Some(Err(e)) => e.to_string(),
                None => "no certificate".into(),
            };
            return SessionEnd::Refused(format!(
                "the server at {} is {what}, not coordinator {}",
                config.coordinator, config.coordinator_name
            ));
        }
    }
    // Under TLS 1.3 a refused client certificate shows up here, on the first stream.
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return classify(&e, failed),
    };
    let hello = AgentMessage::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        host,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    let closed = |conn: &quinn::Connection, fallback: String| match conn.close_reason() {
        Some(e) => classify(&e, failed),
        None => failed(fallback),
    };
    if let Err(e) = frame::write_message(&mut send, &hello).await {
        return closed(&conn, e.to_string());
    }
    let welcome = match frame::read_message::<CoordinatorMessage, _>(&mut recv).await {
        Ok(Some(CoordinatorMessage::Welcome(w))) => w,
        Ok(Some(CoordinatorMessage::Refused { reason })) => {
            return SessionEnd::Refused(format!("refused by the coordinator: {reason}"))
        }
        Ok(Some(other)) => return failed(format!("unexpected first answer {other:?}")),
        Ok(None) => return closed(&conn, "the coordinator closed the control stream".into()),
        Err(e) => return closed(&conn, e.to_string()),
    };
    tracing::info!(coordinator = %welcome.coordinator, version = welcome.version, "connected");
    hosting.peers.learn(&welcome.coordinators, &config.coordinator_name);
    hosting.peers.set_connected(&config.coordinator_name, true);
    on_established(conn.clone());
    *hosting.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    let inventory = {
        let (hosting, host) = (hosting.clone(), config.host.clone());
        move || {
            let (hosting, host) = (hosting.clone(), host.clone());
            async move {
                tokio::task::spawn_blocking(move || hosting.inventory(&host))
                    .await
                    .unwrap_or(Inventory { vms: vec![], partition: vec![] })
            }
        }
    };
    let mut reported = inventory().await;
    if let Err(e) = frame::write_message(&mut send, &AgentMessage::Inventory(reported.clone())).await {
        return lost(&conn, e.to_string());
    }
    // Jobs report through this channel; their verdicts wait in `verdicts` by job id.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<AgentMessage>(64);
    let mut verdicts: HashMap<u64, tokio::sync::oneshot::Sender<bool>> = HashMap::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(u64::from(welcome.heartbeat_secs.max(1))));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let now = inventory().await;
                let msg = if now != reported {
                    reported = now.clone();
                    AgentMessage::Inventory(now)
                } else {
                    AgentMessage::Heartbeat
                };
                if let Err(e) = frame::write_message(&mut send, &msg).await {
                    return lost(&conn, e.to_string());
                }
                verdicts.retain(|_, v| !v.is_closed());
            }
            Some(msg) = out_rx.recv() => {
                if let Err(e) = frame::write_message(&mut send, &msg).await {
                    return lost(&conn, e.to_string());
                }
            }
            msg = frame::read_message::<CoordinatorMessage, _>(&mut recv) => match msg {
                Ok(Some(CoordinatorMessage::Heartbeat)) => {}
                Ok(Some(CoordinatorMessage::Coordinators { list })) => {
                    hosting.peers.learn(&list, &config.coordinator_name);
                }
                Ok(Some(CoordinatorMessage::InventoryNow)) => {
                    reported = inventory().await;
                    if let Err(e) = frame::write_message(&mut send, &AgentMessage::InventoryAnswer(reported.clone())).await {
                        return lost(&conn, e.to_string());
                    }
                }
                Ok(Some(CoordinatorMessage::JobRequest(job))) => {
                    let Some(env) = job_env(&hosting, config, &conn, &out_tx, job.job).await else { continue };
                    tracing::info!(job_id = %job.job, vm = %job.vm, kind = ?job.kind, "job requested");
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    verdicts.insert(job.job.0, tx);
                    actix_rt::spawn(crate::job::run(env, job, rx));
                }
                Ok(Some(CoordinatorMessage::RestoreRequest(req))) => {
                    let Some(env) = job_env(&hosting, config, &conn, &out_tx, req.job).await else { continue };
                    tracing::info!(job_id = %req.job, vm = %req.vm, "restore requested");
                    actix_rt::spawn(crate::job::restore(env, req));
                }
                Ok(Some(CoordinatorMessage::ItemsRequest { job, dest, keep_modes })) => {
                    tracing::info!(job_id = %job, %dest, keep_modes, "item recovery requested");
                    let opts = crate::items_writer::WriteOptions { keep_modes };
                    actix_rt::spawn(crate::job::items(opener(&conn), out_tx.clone(), job, dest, opts));
                }
                Ok(Some(CoordinatorMessage::InstantFinish { job, vm })) => {
                    tracing::info!(job_id = %job, %vm, "finishing an instant recovery");
                    let (backend, exports, out) = (hosting.backend.clone(), hosting.exports.clone(), out_tx.clone());
                    actix_rt::spawn(crate::job::instant_finish(backend, exports, out, job, vm));
                }
                Ok(Some(CoordinatorMessage::Claim { vm, mode })) => {
                    tracing::info!(%vm, ?mode, "claim requested");
                    let (hosting, host, me, out) =
                        (hosting.clone(), config.host.clone(), config.coordinator_name.clone(), out_tx.clone());
                    actix_rt::spawn(async move {
                        let asked = vm.clone();
                        let answer = match tokio::task::spawn_blocking(move || claim(&hosting, &host, &me, &asked, mode)).await {
                            Ok(answer) => answer,
                            Err(e) => AgentMessage::Claim {
                                vm,
                                owner: None,
                                refused: Some(format!("worker thread failed: {e}")),
                                requested: true,
                            },
                        };
                        let _ = out.send(answer).await;
                    });
                }
                Ok(Some(CoordinatorMessage::JobDone { job, committed })) => {
                    match verdicts.remove(&job.0) {
                        Some(v) => { let _ = v.send(committed); }
                        None => tracing::warn!(job_id = %job, "a verdict for a job this agent is not running"),
                    }
                }
                Ok(Some(other)) => tracing::warn!(?other, "unexpected message from the coordinator"),
                Ok(None) => return lost(&conn, "the coordinator closed the control stream".into()),
                Err(e) => return lost(&conn, e.to_string()),
            },
        }
    }
}

/// A coordinator's claim request on `vm`: granted only for a VM of this host (a host acts on
/// its own VMs only), under the claims' lock.
fn claim(hosting: &Hosting, host: &str, me: &str, vm: &VmId, mode: ClaimMode) -> AgentMessage {
    let answer = |owner: Option<Owner>, refused: Option<String>| AgentMessage::Claim {
        vm: vm.clone(),
        owner,
        refused,
        requested: true,
    };
    let Some(backend) = &hosting.backend else {
        return answer(None, Some("this agent has no hypervisor configured".into()));
    };
    match backend.is_here(vm.as_str(), host) {
        Ok(true) => {}
        Ok(false) => return answer(None, Some(format!("{vm} is not on {host}"))),
        Err(e) => return answer(None, Some(e.to_string())),
    }
    let claims = crate::claims::Claims::new(backend.claims_dir());
    match claims.claim(vm.as_str(), me, mode) {
        Ok(owner) => {
            tracing::info!(%vm, coordinator = %owner.coordinator, epoch = owner.epoch, "VM claimed");
            answer(Some(owner), None)
        }
        Err(e) => {
            tracing::warn!(%vm, error = %e, "claim refused");
            answer(claims.read(vm.as_str()).ok().flatten(), Some(e.to_string()))
        }
    }
}

/// What a job needs of this session; without a hypervisor the job is refused at once.
async fn job_env(
    hosting: &Hosting,
    config: &AgentConfig,
    conn: &quinn::Connection,
    out: &tokio::sync::mpsc::Sender<AgentMessage>,
    job: bulwark_protocol::JobId,
) -> Option<JobEnv> {
    let Some(backend) = hosting.backend.clone() else {
        let outcome =
            JobOutcome::Failed { kind: FailureKind::Other, reason: "this agent has no hypervisor configured".into() };
        let _ = out.send(AgentMessage::JobResult(JobResult { job, outcome })).await;
        return None;
    };
    Some(JobEnv {
        backend,
        host: config.host.clone(),
        coordinator: config.coordinator_name.clone(),
        open_stream: opener(conn),
        out: out.clone(),
        scratch: hosting.scratch.clone(),
        slots: hosting.slots.clone(),
        exports: hosting.exports.clone(),
        current: hosting.current.clone(),
    })
}

/// Transfer streams of this connection, as jobs open them.
fn opener(conn: &quinn::Connection) -> crate::job::OpenStream {
    let conn = conn.clone();
    std::sync::Arc::new(move || {
        let conn = conn.clone();
        Box::pin(async move {
            let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            Ok((Box::new(send) as crate::job::StreamSend, Box::new(recv) as crate::job::StreamRecv))
        })
    })
}

fn lost(conn: &quinn::Connection, fallback: String) -> SessionEnd {
    match conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => SessionEnd::Closed,
        Some(e) => match classify(&e, SessionEnd::ConnectFailed) {
            SessionEnd::ConnectFailed(r) => SessionEnd::Lost(format!("connection to the coordinator lost: {r}")),
            other => other,
        },
        None => SessionEnd::Lost(format!("connection to the coordinator lost: {fallback}")),
    }
}

/// Refusals of our certificate are `Refused` (an operator must act); the rest may heal.
fn classify(e: &quinn::ConnectionError, failed: impl FnOnce(String) -> SessionEnd) -> SessionEnd {
    if matches!(e, quinn::ConnectionError::LocallyClosed) {
        return SessionEnd::Closed;
    }
    let text = quic::explain(e);
    if text.starts_with("refused by the coordinator") {
        SessionEnd::Refused(text)
    } else {
        failed(text)
    }
}
