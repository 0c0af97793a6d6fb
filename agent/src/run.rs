//! `bulwark-agent run`: load the agent's credentials, start the uplink, run until told to stop.

use crate::backend::{Hypervisor, SimBackend};
use crate::config::{read_text, AgentConfig, AgentConfigError, AgentDir};
use crate::qemu::QemuBackend;
use crate::uplink::{Hosting, Shutdown, Uplink};
use actix::prelude::*;
use bulwark_pki::{quic, tls};
use bulwark_protocol::ALPN;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] AgentConfigError),
    #[error(transparent)]
    Pki(#[from] bulwark_pki::PkiError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Options of `run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub sim_root: Option<PathBuf>,
    /// Use the QEMU backend on this VM directory (overrides agent.toml).
    pub qemu_vm_dir: Option<PathBuf>,
    /// The QEMU VM directory is shared by the nodes of a cluster.
    pub qemu_shared: bool,
}

/// The quinn client config of an enrolled agent.
pub fn client_config(dir: &AgentDir) -> Result<quinn::ClientConfig, RunError> {
    let ca = tls::certs_from_pem(&read_text(&dir.ca())?, "CA certificate")?;
    let ca = ca.into_iter().next().ok_or_else(|| RunError::Invalid("empty CA file".into()))?;
    let chain = tls::certs_from_pem(&read_text(&dir.cert())?, "agent certificate")?;
    let key = tls::key_from_pem(&read_text(&dir.key())?, "agent key")?;
    Ok(quic::client(tls::client_config(&ca, chain, key, ALPN)?)?)
}

/// Runs the agent of `dir` until `shutdown` resolves.
pub async fn run(
    dir: AgentDir,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let mut config = AgentConfig::load(&dir)?;
    if let Some(root) = opts.sim_root {
        config.hypervisor.kind = "sim".into();
        config.hypervisor.root = Some(root);
    }
    if let Some(vm_dir) = opts.qemu_vm_dir {
        config.hypervisor.kind = "qemu".into();
        config.hypervisor.vm_dir = Some(vm_dir);
    }
    config.hypervisor.shared |= opts.qemu_shared;
    let client = client_config(&dir)?;
    let bind = match config.coordinator.parse::<std::net::SocketAddr>() {
        Ok(a) => quic::client_bind_addr(a),
        Err(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(RunError::Socket)?;
    endpoint.set_default_client_config(client);
    tracing::info!(host = %config.host, coordinator = %config.coordinator, hypervisor = %config.hypervisor.kind, "agent starting");
    let backend: Option<Arc<dyn Hypervisor>> = match (config.hypervisor.kind.as_str(), config.hypervisor.root.clone()) {
        ("sim", Some(root)) => {
            // Snapshots an earlier run of this host left held: release them before anything else.
            let cleaned =
                crate::sim::cleanup_orphans(&root, &config.host).map_err(|e| RunError::Invalid(e.to_string()))?;
            if !cleaned.is_empty() {
                tracing::warn!(vms = ?cleaned, "released snapshots an earlier run left behind (overlays merged, changes kept)");
            }
            Some(Arc::new(SimBackend { root }))
        }
        ("sim", None) => return Err(RunError::Invalid("the sim hypervisor needs a storage root (--sim-root)".into())),
        ("qemu", _) => {
            let vm_dir = config.hypervisor.vm_dir.clone().ok_or_else(|| {
                RunError::Invalid("the qemu hypervisor needs vm_dir in agent.toml (or --qemu-vm-dir)".into())
            })?;
            let mut qemu = QemuBackend::new(vm_dir, config.hypervisor.restore_dir.clone(), dir.root.join("qemu"))
                .map_err(|e| RunError::Invalid(e.to_string()))?;
            if let Some(claims) = config.hypervisor.claims_dir.clone() {
                qemu = qemu.with_claims_dir(claims);
            }
            if config.hypervisor.shared {
                qemu = qemu.shared_by_cluster(&config.host).map_err(|e| RunError::Invalid(e.to_string()))?;
            }
            // A killed run's leftovers: thaw, resume, tear down, merge the bits back.
            let cleaned = qemu.cleanup_orphans().map_err(|e| RunError::Invalid(e.to_string()))?;
            if !cleaned.is_empty() {
                tracing::warn!(vms = ?cleaned, "cleaned snapshots an earlier run left behind (VMs resumed, changes kept)");
            }
            Some(Arc::new(qemu))
        }
        (other, _) => {
            tracing::warn!(kind = other, "no hypervisor backend of this kind in this build: the agent serves no VMs");
            None
        }
    };
    let peers = Arc::new(crate::peers::Peers::load(dir.coordinators()));
    let hosting = Hosting {
        backend,
        scratch: dir.root.join("scratch"),
        slots: Default::default(),
        exports: Default::default(),
        current: Default::default(),
        peers: peers.clone(),
    };
    if let Some(b) = &hosting.backend {
        crate::job::resume_instants(b, &hosting.exports, &hosting.current, &config.coordinator_name, true);
    }
    // One uplink per coordinator of the deployment: agent.toml's, those learned before, and
    // those any of them names from now on. Jobs share the VMs' slots; each uplink has its own
    // connection.
    let (tx, mut learned) = tokio::sync::mpsc::unbounded_channel();
    peers.on_new(tx);
    let primary = config.coordinator_name.clone();
    let mut uplinks = vec![];
    let mut started = std::collections::BTreeSet::from([primary.clone()]);
    let others: Vec<_> = peers.known().into_iter().filter(|c| c.name != primary).collect();
    peers.expect(&primary);
    uplinks.push(Uplink::new(config.clone(), endpoint.clone(), hosting.clone()).start());
    let uplink_for = |c: &bulwark_protocol::messages::CoordinatorAddr| {
        let cfg = AgentConfig { coordinator: c.addr.clone(), coordinator_name: c.name.clone(), ..config.clone() };
        let own = Hosting { current: Default::default(), ..hosting.clone() };
        if let Some(b) = &own.backend {
            crate::job::resume_instants(b, &own.exports, &own.current, &c.name, false);
        }
        tracing::info!(coordinator = %c.name, addr = %c.addr, "connecting to another coordinator of the deployment");
        peers.expect(&c.name);
        Uplink::new(cfg, endpoint.clone(), own).start()
    };
    for c in &others {
        started.insert(c.name.clone());
        uplinks.push(uplink_for(c));
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(c) = learned.recv() => {
                if started.insert(c.name.clone()) {
                    uplinks.push(uplink_for(&c));
                }
            }
        }
    }
    tracing::info!("shutting down");
    for uplink in &uplinks {
        let _ = uplink.send(Shutdown).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    tracing::info!("stopped");
    Ok(())
}
