//! The registry actor: which agents are connected right now, over which connection. The only
//! place that closes an agent's connection for a reason of the coordinator's (revocation,
//! replacement by a newer connection, shutdown).

use crate::jobs::HostPresence;
use crate::server::session::AgentSession;
use actix::prelude::*;
use bulwark_pki::quic::close;
use std::collections::HashMap;
use std::net::SocketAddr;

struct Entry {
    conn: quinn::Connection,
    remote: SocketAddr,
    agent_version: String,
    since: u64,
    vms: u32,
    session: Addr<AgentSession>,
}

/// A connected agent, as `agent list` shows it.
#[derive(Debug, Clone)]
pub struct ConnectedAgent {
    pub host: String,
    pub remote: SocketAddr,
    pub agent_version: String,
    pub since: u64,
    pub vms: u32,
}

/// Connected agents by host name.
#[derive(Default)]
pub struct Registry {
    agents: HashMap<String, Entry>,
    /// Told of every host that connects or goes away (the job queue).
    watcher: Option<Recipient<HostPresence>>,
}

impl Registry {
    fn tell(&self, host: &str, up: bool) {
        if let Some(w) = &self.watcher {
            w.do_send(HostPresence { host: host.to_owned(), up });
        }
    }
}

/// From now on, tell `0` of every host that connects or goes away (sent before any agent can
/// connect, so the watcher misses none).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchHosts(pub Recipient<HostPresence>);

impl Handler<WatchHosts> for Registry {
    type Result = ();
    fn handle(&mut self, msg: WatchHosts, _: &mut Context<Self>) {
        for host in self.agents.keys() {
            msg.0.do_send(HostPresence { host: host.clone(), up: true });
        }
        self.watcher = Some(msg.0);
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// An agent finished its handshake on `conn`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub host: String,
    pub conn: quinn::Connection,
    pub agent_version: String,
    pub session: Addr<AgentSession>,
    pub now: u64,
}

/// The connection `stable_id` of `host` is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub host: String,
    pub stable_id: usize,
}

/// The agent reported its inventory.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetInventory {
    pub host: String,
    pub stable_id: usize,
    pub vms: u32,
}

/// Who is connected.
#[derive(Message)]
#[rtype(result = "Vec<ConnectedAgent>")]
pub struct ListConnected;

/// Close every connection of `host`; answers how many were closed.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct CloseHost {
    pub host: String,
    pub code: u32,
    pub reason: String,
}

impl Handler<crate::jobs::SessionOf> for Registry {
    type Result = Option<(Recipient<crate::jobs::ToAgent>, usize)>;
    fn handle(&mut self, msg: crate::jobs::SessionOf, _: &mut Context<Self>) -> Self::Result {
        self.agents.get(&msg.host).map(|e| (e.session.clone().recipient(), e.conn.stable_id()))
    }
}

/// Where to ask `host`'s agent for a fresh inventory, when it is connected.
#[derive(Message)]
#[rtype(result = "Option<Recipient<crate::server::session::RefreshInventory>>")]
pub struct RefresherOf {
    pub host: String,
}

impl Handler<RefresherOf> for Registry {
    type Result = Option<Recipient<crate::server::session::RefreshInventory>>;
    fn handle(&mut self, msg: RefresherOf, _: &mut Context<Self>) -> Self::Result {
        self.agents.get(&msg.host).map(|e| e.session.clone().recipient())
    }
}

/// Where to ask `host`'s agent to claim a VM, when it is connected.
#[derive(Message)]
#[rtype(result = "Option<Recipient<crate::server::session::ClaimVm>>")]
pub struct ClaimerOf {
    pub host: String,
}

impl Handler<ClaimerOf> for Registry {
    type Result = Option<Recipient<crate::server::session::ClaimVm>>;
    fn handle(&mut self, msg: ClaimerOf, _: &mut Context<Self>) -> Self::Result {
        self.agents.get(&msg.host).map(|e| e.session.clone().recipient())
    }
}

/// Close every agent connection (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Context<Self>) {
        let entry = Entry {
            remote: msg.conn.remote_address(),
            conn: msg.conn,
            agent_version: msg.agent_version,
            since: msg.now,
            vms: 0,
            session: msg.session,
        };
        self.tell(&msg.host, true);
        if let Some(old) = self.agents.insert(msg.host.clone(), entry) {
            tracing::info!(host = %msg.host, old = %old.remote, "a newer connection of this host replaces the old one");
            old.conn.close(close::REPLACED.into(), b"replaced by a newer connection");
        }
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        if self.agents.get(&msg.host).is_some_and(|e| e.conn.stable_id() == msg.stable_id) {
            self.agents.remove(&msg.host);
            self.tell(&msg.host, false);
        }
    }
}

impl Handler<SetInventory> for Registry {
    type Result = ();
    fn handle(&mut self, msg: SetInventory, _: &mut Context<Self>) {
        if let Some(e) = self.agents.get_mut(&msg.host).filter(|e| e.conn.stable_id() == msg.stable_id) {
            e.vms = msg.vms;
        }
    }
}

impl Handler<ListConnected> for Registry {
    type Result = MessageResult<ListConnected>;
    fn handle(&mut self, _: ListConnected, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.agents
                .iter()
                .map(|(host, e)| ConnectedAgent {
                    host: host.clone(),
                    remote: e.remote,
                    agent_version: e.agent_version.clone(),
                    since: e.since,
                    vms: e.vms,
                })
                .collect(),
        )
    }
}

impl Handler<CloseHost> for Registry {
    type Result = u32;
    fn handle(&mut self, msg: CloseHost, _: &mut Context<Self>) -> u32 {
        match self.agents.remove(&msg.host) {
            Some(e) => {
                e.conn.close(msg.code.into(), msg.reason.as_bytes());
                1
            }
            None => 0,
        }
    }
}

impl Handler<CloseAll> for Registry {
    type Result = ();
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) {
        for (_, e) in self.agents.drain() {
            e.conn.close(close::SHUTDOWN.into(), b"coordinator shutting down");
        }
    }
}
