//! The coordinator's network side: a QUIC endpoint requiring client certificates of the
//! deployment CA, a listener actor accepting connections, a registry of connected agents, one
//! session actor per agent, and the admin API.

pub mod admin;
pub mod boot_check;
pub mod connection;
pub mod crl_sync;
pub mod export;
pub mod fds;
pub mod history;
pub mod instant;
pub mod lists;
pub mod metrics;
pub mod ownership;
pub mod partition;
pub mod protect;
pub mod registry;
pub mod scheduler;
pub mod session;
pub mod store_actor;
pub mod verifier;

use crate::authority::{Authority, AuthorityError};
use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use actix::prelude::*;
use bulwark_pki::quic::close;
use registry::{CloseAll, Registry};
use std::sync::Arc;
use std::time::Duration;

/// Why the coordinator could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Runs `f` on a blocking thread (catalog and store work) and waits for it.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())
}

/// What every connection handler shares.
pub struct State {
    pub authority: Arc<Authority>,
    pub endpoint: quinn::Endpoint,
    pub registry: Addr<Registry>,
    /// The store, for quick reads; its work goes through `store_workers`.
    pub store: Arc<crate::store::Store>,
    pub store_workers: Addr<store_actor::StoreActor>,
    pub router: Arc<crate::jobs::JobRouter>,
    pub jobs: Addr<crate::jobs::JobQueue>,
}

impl State {
    /// Rebuilds the TLS config from the CRL on disk and swaps it in: new handshakes see the
    /// revocation at once (rustls fixes CRLs when a verifier is built).
    pub async fn apply_revocation(&self) {
        match self.authority.server_config() {
            Ok(cfg) => {
                self.endpoint.set_server_config(Some(cfg));
                tracing::info!("server TLS configuration rebuilt with the new CRL");
            }
            Err(e) => tracing::error!(error = %e, "cannot rebuild the server configuration after a revocation"),
        }
    }
}

/// The listener actor: accepts connections and hands each to its own task.
struct Listener {
    state: Arc<State>,
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let state = self.state.clone();
        ctx.spawn(
            async move {
                while let Some(incoming) = state.endpoint.accept().await {
                    actix_rt::spawn(connection::handle(state.clone(), incoming));
                }
            }
            .into_actor(self)
            .map(|(), _, ctx| ctx.stop()),
        );
    }
}

/// What `serve` checks of the secrets in `coordinator.toml` at start: a file holding the SMTP
/// password that others may read is made 0600 (with a warning); SMTP credentials that would
/// cross the network in cleartext are warned about (each notification then refuses, and says
/// why), because a mail setting must not stop backups.
fn check_secrets(dir: &DataDir, config: &CoordinatorConfig) -> Result<(), crate::config::ConfigError> {
    if let Some(mode) = config.tighten_mode(dir)? {
        tracing::warn!(
            path = %dir.config().display(),
            was = format!("{mode:o}"),
            "coordinator.toml holds the SMTP password and was readable by others: its mode is now 600"
        );
    }
    if let Some(Err(e)) = config.smtp.as_ref().map(|s| s.check()) {
        tracing::warn!(error = %e, "[smtp]: recovery notifications will not be sent");
    }
    Ok(())
}

/// Runs the coordinator of `dir` until `shutdown` resolves.
pub async fn serve(dir: DataDir, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
    let catalog = Catalog::open(&dir.catalog())?;
    let failed = crate::jobs::recover_interrupted(&catalog, crate::catalog::now_secs())?;
    if !failed.is_empty() {
        tracing::warn!(jobs = ?failed, "jobs left running by the previous run were marked failed");
    }
    let mut authority = Authority::open(dir.clone(), catalog.clone())?;
    authority.refresh_crl()?;
    let config = authority.config().clone();
    check_secrets(&dir, &config)?;
    let fd_budget = match fds::raise_limit() {
        Ok(limit) => fds::FdBudget::for_limit(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the file descriptor limit");
            fds::FdBudget::for_limit(fds::soft_limit())
        }
    };
    tracing::info!(limit = fd_budget.limit, reserve = fd_budget.reserve, "file descriptors");
    // The store (and its key) before anything listens: a store without its key does not open.
    let store = Arc::new(crate::store::Store::open(&dir, catalog.clone(), crate::store::StoreConfig::default())?);
    let server_config = authority.server_config()?;
    let endpoint = quinn::Endpoint::server(server_config, config.listen)
        .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    let local = endpoint.local_addr().map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    if config.listen.port() == 0 {
        let chosen = CoordinatorConfig { listen: local, ..config.clone() };
        chosen.save(&dir)?;
        authority.set_config(chosen);
    }
    let addr_path = dir.addr_file();
    bulwark_pki::files::write_atomic(&addr_path, format!("{local}\n").as_bytes(), 0o644)
        .map_err(|source| ServeError::Write { path: addr_path.display().to_string(), source })?;
    tracing::info!(addr = %local, name = %authority.config().name, "coordinator listening");
    // Agents learn the deployment's coordinators from each of them, this one included.
    if let Err(e) = authority.note_self() {
        tracing::warn!(error = %e, "this coordinator is not in the deployment's list agents are given");
    }

    let workers = {
        let store = store.clone();
        SyncArbiter::start(2, move || store_actor::StoreActor { store: store.clone() })
    };
    let registry = Registry::default().start();
    let router = Arc::new(crate::jobs::JobRouter::default());
    let limits = authority.config().jobs.clone();
    let lease = humantime::parse_duration(&limits.snapshot_lease).map_err(|e| crate::config::ConfigError::Parse {
        path: dir.config(),
        message: format!("[jobs] snapshot_lease: {e}"),
    })?;
    let jitter = humantime::parse_duration(&limits.start_jitter).map_err(|e| crate::config::ConfigError::Parse {
        path: dir.config(),
        message: format!("[jobs] start_jitter: {e}"),
    })?;
    let job_ctx = Arc::new(crate::jobs::JobContext {
        store: store.clone(),
        registry: registry.clone().recipient(),
        router: router.clone(),
        lease,
        disks_in_parallel: limits.disks_in_parallel,
        smtp: authority.config().smtp.clone(),
        coordinator: authority.config().name.clone(),
    });
    let retention = limits.retention()?;
    let jobs = crate::jobs::JobQueue::new(job_ctx, limits.max_running, limits.per_agent).start();
    registry.do_send(registry::WatchHosts(jobs.clone().recipient()));
    history::start(catalog.clone(), retention);
    let _scheduler = scheduler::Scheduler::new(catalog.clone(), jobs.clone(), workers.clone(), jitter).start();
    let _verifier = verifier::Verifier::new(
        store.clone(),
        workers.clone(),
        authority.config().smtp.clone(),
        authority.config().verify.clone(),
    )
    .start();
    let state = Arc::new(State {
        authority: Arc::new(authority),
        endpoint: endpoint.clone(),
        registry: registry.clone(),
        store,
        store_workers: workers,
        router,
        jobs,
    });
    let _listener = Listener { state: state.clone() }.start();
    if let Some(first) = state.authority.config().authority.clone() {
        actix_rt::spawn(crl_sync::run(state.clone(), first));
    }
    if let Some(m) = &state.authority.config().metrics {
        let listener = tokio::net::TcpListener::bind(m.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: m.listen, source })?;
        let local = listener.local_addr().map_err(|source| ServeError::Bind { addr: m.listen, source })?;
        tracing::info!(addr = %local, "metrics endpoint listening (GET /metrics)");
        std::fs::write(dir.root.join("metrics.addr"), local.to_string()).map_err(|source| ServeError::Write {
            path: dir.root.join("metrics.addr").display().to_string(),
            source,
        })?;
        actix_rt::spawn(metrics::serve(state.clone(), listener, fd_budget));
    }

    shutdown.await;
    tracing::info!("shutting down");
    let _ = registry.send(CloseAll).await;
    endpoint.close(close::SHUTDOWN.into(), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    catalog.flush()?;
    let _ = std::fs::remove_file(&addr_path);
    tracing::info!("stopped");
    Ok(())
}
