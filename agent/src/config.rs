//! `DIR/agent.toml` and the agent's data directory (`DIR/pki/agent.pem`, `agent.key`, `ca.pem`).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which hypervisor backend the agent drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// `sim` (the embedded simulator), `qemu` (real QEMU/KVM VMs) or `none` (no VMs yet).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The sim's shared storage root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The QEMU backend's VM definitions (one `NAME.toml` per VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_dir: Option<PathBuf>,
    /// Where restores to new QEMU VMs write images and definitions (default `vm_dir/restored`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_dir: Option<PathBuf>,
    /// Where the QEMU VMs' ownership claims live, on the storage the cluster's nodes share
    /// (default `vm_dir/claims`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims_dir: Option<PathBuf>,
    /// The QEMU `vm_dir` is shared by the nodes of a cluster: this node reports only the VMs
    /// whose QEMU runs on it, and the VMs' tracking state lives in `vm_dir/state`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

fn default_kind() -> String {
    "none".to_owned()
}

/// The agent's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name: the identity in its certificate.
    pub host: String,
    /// `HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// The coordinator's TLS server name.
    pub coordinator_name: String,
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
}

/// Paths of an agent data directory.
#[derive(Debug, Clone)]
pub struct AgentDir {
    pub root: PathBuf,
}

impl AgentDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn cert(&self) -> PathBuf {
        self.pki().join("agent.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.pki().join("agent.key")
    }
    pub fn ca(&self) -> PathBuf {
        self.pki().join("ca.pem")
    }
    /// The deployment's coordinators learned at enrollment and since (`peers`).
    pub fn coordinators(&self) -> PathBuf {
        self.root.join("coordinators.json")
    }
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("{0} is not an enrolled agent (no agent.toml); run `bulwark-agent enroll` first")]
    NotEnrolled(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

impl AgentConfig {
    pub fn load(dir: &AgentDir) -> Result<Self, AgentConfigError> {
        let path = dir.config();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AgentConfigError::NotEnrolled(dir.root.clone()))
            }
            Err(source) => return Err(AgentConfigError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|e| AgentConfigError::Parse { path, message: e.to_string() })
    }
}

/// Reads a file to a string with its path in the error.
pub fn read_text(path: &Path) -> Result<String, AgentConfigError> {
    std::fs::read_to_string(path).map_err(|source| AgentConfigError::Read { path: path.to_owned(), source })
}
