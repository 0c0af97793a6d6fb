//! `DIR/coordinator.toml` and the data directory's layout (CONTRACT: "layout").

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The coordinator's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The coordinator's name: its certificate's identity and the TLS server name clients check.
    pub name: String,
    /// UDP address to listen on. Port 0 picks a free port at `serve`, written back here.
    pub listen: SocketAddr,
    /// Address agents dial, put into join tokens; defaults to `listen` (which must then not be
    /// a wildcard address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Whether the chunk store encrypts (set at `init`, never changes).
    #[serde(default)]
    pub encrypt: bool,
    /// Validity of agent certificates, humantime ("730days").
    #[serde(default = "default_agent_cert_validity")]
    pub agent_cert_validity: String,
    /// Job concurrency.
    #[serde(default)]
    pub jobs: JobLimits,
    /// The mail server for `--notify` (absent: notifications fail with a clear reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpConfig>,
    /// `[metrics]`: the Prometheus endpoint, off unless a listen address is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]` in `coordinator.toml`: `listen = "127.0.0.1:9464"` serves `GET /metrics` in
/// Prometheus' text format (plain HTTP: bind it to loopback or a management network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[smtp]` in `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub server: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// The sender address.
    pub from: String,
    /// `none` (plain, e.g. a local relay), `starttls` or `tls`.
    #[serde(default = "default_smtp_tls")]
    pub tls: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

fn default_smtp_port() -> u16 {
    25
}

fn default_smtp_tls() -> String {
    "starttls".into()
}

/// `[jobs]` in `coordinator.toml`: how many VM jobs run at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobLimits {
    /// VM jobs running at once on this coordinator.
    pub max_running: usize,
    /// VM jobs running at once per agent (host).
    pub per_agent: usize,
    /// How long an agent keeps a job's snapshot without hearing from the coordinator.
    pub snapshot_lease: String,
    /// Members of a group whose schedule fires together start spread over this window.
    pub start_jitter: String,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self { max_running: 8, per_agent: 2, snapshot_lease: "2m".into(), start_jitter: "1m".into() }
    }
}

fn default_agent_cert_validity() -> String {
    "730days".to_owned()
}

/// Paths inside a coordinator data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("coordinator.toml")
    }
    pub fn addr_file(&self) -> PathBuf {
        self.root.join("coordinator.addr")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.pki().join(name)
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    pub fn packs(&self) -> PathBuf {
        self.store().join("packs")
    }
    pub fn store_key(&self) -> PathBuf {
        self.store().join("key")
    }
}

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path} is not a coordinator data directory (no coordinator.toml); run `bulwark-coordinator init` first")]
    NotInitialized { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl CoordinatorConfig {
    /// Reads `DIR/coordinator.toml`.
    pub fn load(dir: &DataDir) -> Result<Self, ConfigError> {
        let path = dir.config();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotInitialized { path: dir.root.clone() })
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path, message: e.to_string() })
    }

    /// Writes `DIR/coordinator.toml` atomically.
    pub fn save(&self, dir: &DataDir) -> Result<(), ConfigError> {
        let path = dir.config();
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        bulwark_pki::files::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|source| ConfigError::Write { path, source })
    }

    /// Validity of agent certificates.
    pub fn agent_validity(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(&self.agent_cert_validity).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("coordinator.toml"),
            message: format!("agent_cert_validity {:?}: {e}", self.agent_cert_validity),
        })
    }
}

/// True if `dir` already holds anything of a coordinator.
pub fn is_initialized(dir: &Path) -> bool {
    dir.join("coordinator.toml").exists() || dir.join("pki").exists() || dir.join("catalog").exists()
}
