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
    /// Where the store key lives: absolute, or relative to the data directory. `init
    /// --encrypt` writes `pki/store.key`; absent, the key is read from `store/key` (data
    /// directories made before this setting existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Validity of agent certificates, humantime ("730days").
    #[serde(default = "default_agent_cert_validity")]
    pub agent_cert_validity: String,
    /// Job concurrency.
    #[serde(default)]
    pub jobs: JobLimits,
    /// `[tokens]`: join token limits.
    #[serde(default)]
    pub tokens: TokenLimits,
    /// `[agents]`: what one host may report.
    #[serde(default)]
    pub agents: AgentLimits,
    /// The mail server for `--notify` (absent: notifications fail with a clear reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpConfig>,
    /// `[metrics]`: the Prometheus endpoint, off unless a listen address is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `[verify]`: how restore verification boots recovery points (`boot_check = true`).
    #[serde(default, skip_serializing_if = "VerifyConfig::is_default")]
    pub verify: VerifyConfig,
    /// `[authority]`, in a coordinator that joined the deployment (`init --join`): the first
    /// coordinator, which holds the CA key (agents enroll and tokens are made there; its CRL is
    /// fetched from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<AuthorityRef>,
}

/// The deployment's first coordinator, as a joined one knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityRef {
    pub name: String,
    /// `HOST:PORT` it listens on.
    pub addr: String,
}

impl std::fmt::Display for AuthorityRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.name, self.addr)
    }
}

/// `[verify]` in `coordinator.toml`: the isolated QEMU that boots recovery points of VMs whose
/// definition asks for a boot check. Nothing of it comes from a host: a definition only says
/// whether to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// The QEMU to run.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// Boot this kernel (with `boot_initrd` and `boot_append`) instead of the disk's own boot
    /// loader: for guests started that way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_append: Option<String>,
    /// QEMU's accelerators, in order of preference (`tcg` where KVM is missing or unusable).
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The booted guest's memory.
    #[serde(default = "default_boot_memory")]
    pub boot_memory_mib: u64,
    /// How long the guest agent has to answer.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
fn default_accel() -> String {
    "kvm:tcg".to_owned()
}
fn default_boot_memory() -> u64 {
    512
}
fn default_boot_timeout() -> u64 {
    300
}

impl VerifyConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            qemu: default_qemu(),
            boot_kernel: None,
            boot_initrd: None,
            boot_append: None,
            accel: default_accel(),
            boot_memory_mib: default_boot_memory(),
            boot_timeout_secs: default_boot_timeout(),
        }
    }
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
    /// Send the username and password even over `tls = "none"` (they cross the network in
    /// cleartext). Off: such a configuration sends no mail and says why.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_plaintext_auth: bool,
    /// Who hears about problems the coordinator finds by itself (a recovery point that fails
    /// its verification).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts_to: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    None,
    StartTls,
    Tls,
}

/// Why an `[smtp]` section cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("[smtp] tls = {0:?} is not one of \"none\", \"starttls\", \"tls\"")]
    UnknownTls(String),
    #[error(
        "refusing to send the SMTP username and password to {server} in cleartext ([smtp] tls = \"none\"): \
         set tls = \"starttls\" or \"tls\", or allow_plaintext_auth = true if nobody can read that path"
    )]
    PlaintextAuth { server: String },
}

impl SmtpConfig {
    /// The `tls` setting, checked.
    pub fn tls_mode(&self) -> Result<SmtpTls, SmtpConfigError> {
        match self.tls.as_str() {
            "none" => Ok(SmtpTls::None),
            "starttls" => Ok(SmtpTls::StartTls),
            "tls" => Ok(SmtpTls::Tls),
            other => Err(SmtpConfigError::UnknownTls(other.to_owned())),
        }
    }

    /// Whether mail would authenticate (both a username and a password are set).
    pub fn authenticates(&self) -> bool {
        self.username.is_some() && self.password.is_some()
    }

    /// The `tls` setting, refused when it would put the credentials on the wire in cleartext
    /// without `allow_plaintext_auth`.
    pub fn check(&self) -> Result<SmtpTls, SmtpConfigError> {
        let tls = self.tls_mode()?;
        if tls == SmtpTls::None && self.authenticates() && !self.allow_plaintext_auth {
            return Err(SmtpConfigError::PlaintextAuth { server: format!("{}:{}", self.server, self.port) });
        }
        Ok(tls)
    }
}

fn default_smtp_port() -> u16 {
    25
}

fn default_smtp_tls() -> String {
    "starttls".into()
}

/// `[jobs]` in `coordinator.toml`: how many VM jobs run at once, and how long job records
/// are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobLimits {
    /// VM jobs running at once on this coordinator.
    pub max_running: usize,
    /// VM jobs running at once per agent (host).
    pub per_agent: usize,
    /// Disks of one VM transferred at once (1 to 8).
    pub disks_in_parallel: usize,
    /// How long an agent keeps a job's snapshot without hearing from the coordinator.
    pub snapshot_lease: String,
    /// Members of a group whose schedule fires together start spread over this window.
    pub start_jitter: String,
    /// Finished job records older than this are purged (humantime, "30days").
    pub keep: String,
    /// At most this many job records are kept; past it the oldest finished ones are purged.
    /// Queued and running jobs and the newest job of each VM are never purged.
    pub keep_count: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_running: 8,
            per_agent: 2,
            disks_in_parallel: 2,
            snapshot_lease: "2m".into(),
            start_jitter: "1m".into(),
            keep: "30days".into(),
            keep_count: 10_000,
        }
    }
}

impl JobLimits {
    /// Checks what `load` cannot leave to the first job: `disks_in_parallel` fits one job.
    pub fn check(&self) -> Result<(), String> {
        let max = usize::from(bulwark_protocol::messages::MAX_PARALLEL_DISKS);
        if !(1..=max).contains(&self.disks_in_parallel) {
            return Err(format!("[jobs] disks_in_parallel = {}: it must be 1 to {max}", self.disks_in_parallel));
        }
        Ok(())
    }

    /// The job history retention these settings ask for.
    pub fn retention(&self) -> Result<Retention, ConfigError> {
        let keep = humantime::parse_duration(&self.keep).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("coordinator.toml"),
            message: format!("[jobs] keep {:?}: {e}", self.keep),
        })?;
        Ok(Retention { keep_secs: keep.as_secs(), keep_count: self.keep_count })
    }
}

/// `[tokens]` in `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenLimits {
    /// The longest `--ttl` a join token may have, humantime ("7days").
    pub max_ttl: String,
}

impl Default for TokenLimits {
    fn default() -> Self {
        Self { max_ttl: humantime::format_duration(crate::enrollment::DEFAULT_MAX_TTL).to_string() }
    }
}

/// `[agents]` in `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentLimits {
    /// VMs one host may report; the rest of a longer inventory is refused and logged.
    pub max_vms_per_host: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self { max_vms_per_host: crate::catalog::DEFAULT_MAX_VMS_PER_HOST }
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
    /// Where data directories made before `key_file` existed keep the store key.
    pub fn store_key(&self) -> PathBuf {
        self.store().join("key")
    }
    /// Where `init --encrypt` and `key import` put the store key: apart from the store.
    pub fn default_key_file(&self) -> PathBuf {
        self.pki_file("store.key")
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
        let config: Self =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        config.jobs.check().map_err(|message| ConfigError::Parse { path: path.clone(), message })?;
        if let Some(smtp) = &config.smtp {
            smtp.tls_mode().map_err(|e| ConfigError::Parse { path, message: e.to_string() })?;
        }
        Ok(config)
    }

    /// Writes `DIR/coordinator.toml` atomically, mode 0600: it may hold the SMTP password.
    pub fn save(&self, dir: &DataDir) -> Result<(), ConfigError> {
        let path = dir.config();
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        bulwark_pki::files::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(|source| ConfigError::Write { path, source })
    }

    /// Whether the file holds a secret (the SMTP password).
    pub fn holds_secret(&self) -> bool {
        self.smtp.as_ref().is_some_and(|s| s.password.is_some())
    }

    /// If the file holds a secret and others than its owner may read it, makes it 0600;
    /// answers the mode it had then.
    pub fn tighten_mode(&self, dir: &DataDir) -> Result<Option<u32>, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        if !self.holds_secret() {
            return Ok(None);
        }
        let path = dir.config();
        let mode = std::fs::metadata(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o077 == 0 {
            return Ok(None);
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(|source| ConfigError::Write { path, source })?;
        Ok(Some(mode))
    }

    /// The store key's file: `key_file` (relative to the data directory unless absolute), or
    /// `store/key` where `key_file` is not set.
    pub fn store_key_path(&self, dir: &DataDir) -> PathBuf {
        match &self.key_file {
            Some(p) => dir.root.join(p),
            None => dir.store_key(),
        }
    }

    /// Validity of agent certificates.
    pub fn agent_validity(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(&self.agent_cert_validity).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("coordinator.toml"),
            message: format!("agent_cert_validity {:?}: {e}", self.agent_cert_validity),
        })
    }

    /// The cap on a join token's lifetime.
    pub fn max_token_ttl(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(&self.tokens.max_ttl).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("coordinator.toml"),
            message: format!("[tokens] max_ttl {:?}: {e}", self.tokens.max_ttl),
        })
    }
}

/// True if `dir` already holds anything of a coordinator.
pub fn is_initialized(dir: &Path) -> bool {
    dir.join("coordinator.toml").exists() || dir.join("pki").exists() || dir.join("catalog").exists()
}

/// `[jobs] keep` and `keep_count`, as the job history's purge applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Seconds a finished job is kept.
    pub keep_secs: u64,
    /// Records kept at most (beyond those that are never purged).
    pub keep_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn smtp(tls: &str, auth: bool, allow: bool) -> SmtpConfig {
        SmtpConfig {
            server: "mail.test".into(),
            port: 25,
            from: "b@test".into(),
            tls: tls.into(),
            username: auth.then(|| "u".to_owned()),
            password: auth.then(|| "p".to_owned()),
            allow_plaintext_auth: allow,
            alerts_to: vec![],
        }
    }

    #[test]
    fn smtp_credentials_never_go_out_in_cleartext_unless_allowed() {
        assert_eq!(smtp("starttls", true, false).check(), Ok(SmtpTls::StartTls));
        assert_eq!(smtp("tls", true, false).check(), Ok(SmtpTls::Tls));
        assert_eq!(smtp("none", false, false).check(), Ok(SmtpTls::None), "a relay without AUTH is fine");
        assert_eq!(smtp("none", true, true).check(), Ok(SmtpTls::None), "explicitly allowed");
        let refused = smtp("none", true, false).check().unwrap_err();
        assert!(matches!(refused, SmtpConfigError::PlaintextAuth { .. }));
        assert!(refused.to_string().contains("cleartext"), "{refused}");
        assert!(refused.to_string().contains("mail.test:25"), "{refused}");
        assert_eq!(smtp("ssl", false, false).check(), Err(SmtpConfigError::UnknownTls("ssl".into())));
    }

    fn data_dir(extra: &str) -> (tempfile::TempDir, DataDir) {
        let t = tempfile::tempdir().unwrap();
        let dir = DataDir::new(t.path());
        let text = format!("name = \"c\"\nlisten = \"127.0.0.1:0\"\n{extra}");
        std::fs::write(dir.config(), text).unwrap();
        (t, dir)
    }

    #[test]
    fn an_unknown_smtp_tls_mode_is_refused_at_load() {
        let (_t, dir) = data_dir("[smtp]\nserver = \"m\"\nfrom = \"b@test\"\ntls = \"STARTTLS\"\n");
        let e = CoordinatorConfig::load(&dir).unwrap_err();
        assert!(e.to_string().contains("\"STARTTLS\" is not one of"), "{e}");
    }

    #[test]
    fn disks_in_parallel_outside_one_to_eight_is_refused_at_load() {
        for bad in [0, 9] {
            let (_t, dir) = data_dir(&format!("[jobs]\ndisks_in_parallel = {bad}\n"));
            let e = CoordinatorConfig::load(&dir).unwrap_err();
            assert!(e.to_string().contains("it must be 1 to 8"), "{e}");
        }
        let (_t, dir) = data_dir("[jobs]\ndisks_in_parallel = 4\n");
        assert_eq!(CoordinatorConfig::load(&dir).unwrap().jobs.disks_in_parallel, 4);
        let (_t, dir) = data_dir("");
        assert_eq!(CoordinatorConfig::load(&dir).unwrap().jobs.disks_in_parallel, 2, "the default");
    }

    #[test]
    fn a_config_holding_a_password_is_made_private_and_saved_private() {
        let (_t, dir) = data_dir("[smtp]\nserver = \"m\"\nfrom = \"b@test\"\nusername = \"u\"\npassword = \"p\"\n");
        std::fs::set_permissions(dir.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = CoordinatorConfig::load(&dir).unwrap();
        assert!(config.holds_secret());
        assert_eq!(config.tighten_mode(&dir).unwrap(), Some(0o644));
        assert_eq!(std::fs::metadata(dir.config()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(config.tighten_mode(&dir).unwrap(), None, "already private");
        std::fs::set_permissions(dir.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
        config.save(&dir).unwrap();
        assert_eq!(std::fs::metadata(dir.config()).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_config_without_a_secret_keeps_its_mode() {
        let (_t, dir) = data_dir("");
        std::fs::set_permissions(dir.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = CoordinatorConfig::load(&dir).unwrap();
        assert_eq!(config.tighten_mode(&dir).unwrap(), None);
        assert_eq!(std::fs::metadata(dir.config()).unwrap().permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn the_key_file_is_relative_to_the_data_dir_unless_absolute() {
        let (_t, dir) = data_dir("");
        let mut config = CoordinatorConfig::load(&dir).unwrap();
        assert_eq!(config.store_key_path(&dir), dir.root.join("store/key"), "older data dirs");
        config.key_file = Some("pki/store.key".into());
        assert_eq!(config.store_key_path(&dir), dir.root.join("pki/store.key"));
        config.key_file = Some("/etc/bulwark/store.key".into());
        assert_eq!(config.store_key_path(&dir), PathBuf::from("/etc/bulwark/store.key"));
        config.save(&dir).unwrap();
        assert_eq!(CoordinatorConfig::load(&dir).unwrap().key_file, config.key_file, "round trip");
    }
}
