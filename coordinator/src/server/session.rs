//! The session actor: one per connected agent. It owns the control stream's sending half and
//! is the only way to talk to that agent; a reader task feeds it what the agent sends.

use crate::catalog::{now_secs, Catalog};
use crate::jobs::JobRouter;
use crate::server::registry::{ListConnected, Registry, SetInventory, Unregister};
use actix::prelude::*;
use bulwark_pki::quic::close;
use bulwark_protocol::frame;
use bulwark_protocol::messages::{AgentMessage, JobOutcome, JobResult};
use bulwark_protocol::ownership::{ClaimMode, Owner};
use bulwark_protocol::text::{self, Escaped};
use std::sync::Arc;
use tokio::sync::Mutex;

/// One agent's session.
pub struct AgentSession {
    pub host: String,
    pub conn: quinn::Connection,
    pub send: Arc<Mutex<quinn::SendStream>>,
    pub registry: Addr<Registry>,
    pub catalog: Catalog,
    pub router: Arc<JobRouter>,
    /// `[agents] max_vms_per_host`.
    pub max_vms: usize,
    pub span: tracing::Span,
    /// Who waits for the answer to an [`RefreshInventory`]: told once it is in the catalog.
    pub waiting: Vec<tokio::sync::oneshot::Sender<()>>,
    /// This coordinator's name: the owner its claims name.
    pub coordinator: String,
    /// Who waits for the answer to a [`ClaimVm`], by VM: told once it is in the catalog.
    pub claims_waiting: std::collections::HashMap<String, Vec<tokio::sync::oneshot::Sender<ClaimAnswer>>>,
    /// The coordinator's state, for protecting the host's cluster whole (auto groups).
    pub state: Arc<crate::server::State>,
    /// This host's auto-protection runs.
    pub auto: Arc<crate::server::partition::AutoQueue>,
}

/// An agent's answer to a claim request: the claim on the VM now, and why it was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimAnswer {
    pub owner: Option<Owner>,
    pub refused: Option<String>,
}

/// Most claim requests one session keeps waiting at once (the rest are answered at once).
const MAX_CLAIMS_WAITING: usize = 1024;

/// Ask the agent to claim `vm` for this coordinator; `done` is told the answer once it is in
/// the catalog (it is dropped, unanswered, if the agent goes away first).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClaimVm {
    pub vm: bulwark_protocol::VmId,
    pub mode: ClaimMode,
    pub done: tokio::sync::oneshot::Sender<ClaimAnswer>,
}

impl Handler<ClaimVm> for AgentSession {
    type Result = ();
    fn handle(&mut self, ClaimVm { vm, mode, done }: ClaimVm, ctx: &mut Context<Self>) {
        // Those who gave up waiting are forgotten first.
        self.claims_waiting.retain(|_, w| {
            w.retain(|s| !s.is_closed());
            !w.is_empty()
        });
        let waiting: usize = self.claims_waiting.values().map(Vec::len).sum();
        if waiting >= MAX_CLAIMS_WAITING {
            let _ =
                done.send(ClaimAnswer { owner: None, refused: Some("too many claims waiting for this host".into()) });
            return;
        }
        self.claims_waiting.entry(vm.as_str().to_owned()).or_default().push(done);
        <Self as Handler<crate::jobs::ToAgent>>::handle(
            self,
            crate::jobs::ToAgent(bulwark_protocol::messages::CoordinatorMessage::Claim { vm, mode }),
            ctx,
        );
    }
}

/// Ask the agent for its inventory now; `done` is told once its answer is in the catalog (it is
/// dropped, unanswered, if the agent goes away first).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefreshInventory(pub tokio::sync::oneshot::Sender<()>);

impl Handler<RefreshInventory> for AgentSession {
    type Result = ();
    fn handle(&mut self, RefreshInventory(done): RefreshInventory, ctx: &mut Context<Self>) {
        self.waiting.push(done);
        <Self as Handler<crate::jobs::ToAgent>>::handle(
            self,
            crate::jobs::ToAgent(bulwark_protocol::messages::CoordinatorMessage::InventoryNow),
            ctx,
        );
    }
}

impl Actor for AgentSession {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.router.connection_lost(&self.host, self.conn.stable_id());
        self.registry.do_send(Unregister { host: self.host.clone(), stable_id: self.conn.stable_id() });
        let _ = self.catalog.touch_agent(&self.host, now_secs(), None);
        let _ = self.catalog.flush();
        self.span.in_scope(|| tracing::info!("agent disconnected"));
    }
}

/// A message the agent sent on its control stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Inbound(pub AgentMessage);

/// The agent's connection is gone (closed, timed out, or violated the protocol).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Closed;

impl Handler<Inbound> for AgentSession {
    type Result = ();
    fn handle(&mut self, Inbound(msg): Inbound, ctx: &mut Context<Self>) {
        let _g = self.span.enter();
        let answer = matches!(msg, AgentMessage::InventoryAnswer(_));
        match msg {
            AgentMessage::Hello(_) => {
                tracing::warn!("second hello on an established session: protocol violation");
                self.conn.close(close::PROTOCOL_VIOLATION.into(), b"second hello");
                ctx.stop();
            }
            AgentMessage::Inventory(inv) | AgentMessage::InventoryAnswer(inv) => {
                tracing::debug!(vms = inv.vms.len(), "inventory");
                // Only an answer says the agent saw the request: one sent before it may be stale.
                let answered = if answer { std::mem::take(&mut self.waiting) } else { vec![] };
                let vms = u32::try_from(inv.vms.len()).unwrap_or(u32::MAX);
                self.registry.do_send(SetInventory { host: self.host.clone(), stable_id: self.conn.stable_id(), vms });
                let (catalog, host, span) = (self.catalog.clone(), self.host.clone(), self.span.clone());
                let (registry, max_vms) = (self.registry.clone(), self.max_vms);
                let auto = (self.auto.clone(), self.state.clone(), ctx.address(), inv.clone());
                actix_rt::spawn(async move {
                    // Which hosts are connected decides whether a VM reported from two hosts
                    // moved (its old host is gone) or is claimed twice at once.
                    let online: std::collections::HashSet<String> =
                        registry.send(ListConnected).await.unwrap_or_default().into_iter().map(|c| c.host).collect();
                    let host_name = host.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        catalog.apply_inventory(&host, &inv, now_secs(), &|h| online.contains(h), max_vms)
                    })
                    .await;
                    let _g = span.enter();
                    match r {
                        Ok(Ok(c)) => {
                            for vm in &c.new {
                                tracing::info!(vm = %Escaped(vm), "new VM reported");
                            }
                            for (vm, from) in &c.moved {
                                tracing::info!(vm = %Escaped(vm), from = %Escaped(from), "VM migrated here");
                            }
                            for (vm, reason) in &c.tracking_reset {
                                tracing::warn!(vm = %Escaped(vm), reason = %Escaped(reason), "replica marked inconsistent");
                            }
                            for (vm, reason) in &c.refused {
                                tracing::warn!(
                                    target: "bulwark::security",
                                    vm = %Escaped(vm),
                                    reason = %Escaped(reason),
                                    "VM claim refused"
                                );
                            }
                            for vm in &c.missing {
                                tracing::warn!(vm = %Escaped(vm), "VM no longer reported by its host: shown as missing");
                            }
                            for (vm, to) in &c.handed_over {
                                tracing::info!(vm = %Escaped(vm), to = %Escaped(to), "VM migrated: its old host let go of it");
                            }
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot record the inventory"),
                        Err(e) => tracing::error!(error = %e, "inventory worker failed"),
                    }
                    for done in answered {
                        let _ = done.send(());
                    }
                    let (queue, state, session, inv) = auto;
                    queue.offer(state, session, host_name, inv);
                });
            }
            AgentMessage::JobResult(r) => {
                let r = capped(r);
                let job = r.job;
                tracing::info!(job_id = %job, outcome = ?r.outcome, "job result");
                if !self.router.result(&self.host, r) {
                    tracing::warn!(job_id = %job, "a result for a job that is not waiting for one from this host");
                }
            }
            AgentMessage::Claim { vm, owner, refused, requested } => {
                let refused = refused.map(text::cap_reason);
                match &refused {
                    Some(r) => tracing::warn!(vm = %vm, reason = %Escaped(r), "claim not granted"),
                    None => tracing::info!(vm = %vm, owner = ?owner, "claim granted"),
                }
                // Only the answer to a claim request answers those waiting for one (a job's claim
                // of the same VM may come first).
                let waiters =
                    if requested { self.claims_waiting.remove(vm.as_str()).unwrap_or_default() } else { vec![] };
                // A claim names a coordinator by its certificate identity: anything longer is not one.
                let owner = owner.filter(|o| o.coordinator.len() <= bulwark_protocol::ownership::MAX_OWNER_NAME);
                let (catalog, me, span) = (self.catalog.clone(), self.coordinator.clone(), self.span.clone());
                let host = self.host.clone();
                actix_rt::spawn(async move {
                    let answer = ClaimAnswer { owner, refused };
                    let noted = {
                        let (owner, granted) = (answer.owner.clone(), answer.refused.is_none());
                        tokio::task::spawn_blocking(move || {
                            // Only what a host says of its own VMs is kept (a VM a recovery
                            // just made is recorded by its first job's claim).
                            match catalog.vm(vm.as_str())? {
                                Some(v) if v.host == host => {
                                    catalog.note_claim(vm.as_str(), owner.as_ref(), granted, &me)
                                }
                                _ => Ok(()),
                            }
                        })
                        .await
                    };
                    match noted {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(parent: &span, error = %e, "cannot record a VM's claim"),
                        Err(e) => tracing::error!(parent: &span, error = %e, "claim worker failed"),
                    }
                    for w in waiters {
                        let _ = w.send(answer.clone());
                    }
                });
            }
            AgentMessage::Heartbeat => {}
        }
    }
}

/// A job result with its reason or note cut to [`text::MAX_REASON_BYTES`]: what an agent says
/// is logged and stored, so it is bounded where it enters.
fn capped(mut r: JobResult) -> JobResult {
    match &mut r.outcome {
        JobOutcome::Succeeded { consistency_note: Some(note), .. } => *note = text::cap_reason(std::mem::take(note)),
        JobOutcome::Failed { reason, .. } => *reason = text::cap_reason(std::mem::take(reason)),
        JobOutcome::Succeeded { .. } | JobOutcome::Restored { .. } => {}
    }
    r
}

impl Handler<Closed> for AgentSession {
    type Result = ();
    fn handle(&mut self, _: Closed, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Sends a job's message to the agent.
impl Handler<crate::jobs::ToAgent> for AgentSession {
    type Result = ();
    fn handle(&mut self, crate::jobs::ToAgent(msg): crate::jobs::ToAgent, ctx: &mut Context<Self>) {
        let send = self.send.clone();
        let conn = self.conn.clone();
        ctx.spawn(
            async move {
                let mut s = send.lock().await;
                if let Err(e) = frame::write_message(&mut *s, &msg).await {
                    tracing::warn!(error = %e, "cannot send to agent");
                    conn.close(close::PROTOCOL_VIOLATION.into(), b"send failed");
                }
            }
            .into_actor(self),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::messages::{ChangeToken, Consistency, FailureKind};
    use bulwark_protocol::JobId;

    #[test]
    fn an_agents_900_kb_reason_and_note_are_capped_where_they_enter() {
        let failed = JobResult {
            job: JobId(1),
            outcome: JobOutcome::Failed { kind: FailureKind::Other, reason: "r".repeat(900_000) },
        };
        let JobOutcome::Failed { reason, .. } = capped(failed).outcome else { panic!("not failed") };
        assert!(reason.len() <= text::MAX_REASON_BYTES && reason.ends_with("truncated]"));
        let succeeded = JobResult {
            job: JobId(2),
            outcome: JobOutcome::Succeeded {
                consistency: Consistency::Crash,
                consistency_note: Some("n".repeat(10_000)),
                bytes_read: 0,
                blocks_sent: 0,
                next_token: ChangeToken { generation: 1, sequence: 1 },
                config: vec![],
            },
        };
        let JobOutcome::Succeeded { consistency_note: Some(note), .. } = capped(succeeded).outcome else {
            panic!("note lost")
        };
        assert!(note.len() <= text::MAX_REASON_BYTES);
    }
}
