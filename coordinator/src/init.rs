//! `bulwark-coordinator init`: a new data directory with its CA, certificates, empty catalog
//! and chunk store. Everything is built in a temporary sibling directory and renamed into place,
//! so a failed init leaves nothing behind and an initialized directory is never touched.

use crate::catalog::Catalog;
use crate::config::{is_initialized, CoordinatorConfig, DataDir};
use crate::store::key as store_key;
use bulwark_pki::ca::{LeafSpec, SERVICE_VALIDITY};
use bulwark_pki::files::{create_private_dir, write_atomic};
use bulwark_pki::{Ca, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What `init` is asked to create.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub name: Option<String>,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub encrypt: bool,
    /// Credentials from joining a deployment (`init --join`): no CA of its own.
    pub joined: Option<crate::join::Joined>,
}

/// Why `init` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} is already initialized; nothing was changed")]
    AlreadyInitialized(PathBuf),
    #[error("{0} exists and is not empty; choose an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("coordinator name {0:?} is not a valid host-like name")]
    BadName(String),
    #[error("cannot create {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pki(#[from] bulwark_pki::PkiError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Key(#[from] store_key::KeyError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io { path: path.to_owned(), source }
}

/// The names the coordinator's certificate is valid for.
pub fn coordinator_sans(name: &str, listen: SocketAddr) -> Vec<String> {
    let mut sans = vec![name.to_owned()];
    if let Some(h) = bulwark_pki::identity::local_host_name() {
        if bulwark_protocol::HostId::new(h.clone()).is_ok() {
            sans.push(h);
        }
    }
    let ip = listen.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        sans.push("localhost".into());
        sans.push("127.0.0.1".into());
        sans.push("::1".into());
    }
    if !ip.is_unspecified() {
        sans.push(ip.to_string());
    }
    sans.sort();
    sans.dedup();
    sans
}

/// Creates a coordinator data directory at `root`.
pub fn init(root: &Path, opts: &InitOptions) -> Result<CoordinatorConfig, InitError> {
    if is_initialized(root) {
        return Err(InitError::AlreadyInitialized(root.to_owned()));
    }
    if root.exists() && std::fs::read_dir(root).map_err(io(root))?.next().is_some() {
        return Err(InitError::NotEmpty(root.to_owned()));
    }
    let name = match (&opts.joined, &opts.name) {
        (Some(j), _) => j.name.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => bulwark_pki::identity::local_host_name().unwrap_or_else(|| "bulwark-coordinator".into()),
    };
    if bulwark_protocol::HostId::new(name.clone()).is_err() {
        return Err(InitError::BadName(name));
    }
    let parent = root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let leaf = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "coordinator".into());
    let tmp = parent.join(format!(".{leaf}.init.{}", std::process::id()));
    let result = build(&tmp, &name, opts).and_then(|config| {
        std::fs::rename(&tmp, root).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => InitError::NotEmpty(root.to_owned()),
            _ => InitError::Io { path: root.to_owned(), source: e },
        })?;
        bulwark_pki::files::sync_dir(parent).map_err(io(parent))?;
        Ok(config)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn build(root: &Path, name: &str, opts: &InitOptions) -> Result<CoordinatorConfig, InitError> {
    let dir = DataDir::new(root);
    create_private_dir(root).map_err(io(root))?;
    create_private_dir(&dir.pki()).map_err(io(&dir.pki()))?;

    let files: Vec<(&str, String, u32)> = match &opts.joined {
        // A joined coordinator holds no CA key: the deployment's first coordinator signed its
        // certificates (see docs/security.md).
        Some(j) => vec![
            ("ca.pem", j.ca_pem.clone(), 0o644),
            ("coordinator.pem", j.coordinator_pem.clone(), 0o644),
            ("coordinator.key", j.coordinator_key.clone(), 0o600),
            ("admin.pem", j.admin_pem.clone(), 0o644),
            ("admin.key", j.admin_key.clone(), 0o600),
            ("crl.pem", j.crl_pem.clone(), 0o644),
        ],
        None => {
            let ca = Ca::generate(name)?;
            let spec = LeafSpec::new(Role::Coordinator, name, coordinator_sans(name, opts.listen), SERVICE_VALIDITY);
            let (coord, coord_key) = ca.issue_with_new_key(&spec)?;
            let admin_spec = LeafSpec::new(Role::Admin, "admin", vec![], SERVICE_VALIDITY);
            let (admin, admin_key) = ca.issue_with_new_key(&admin_spec)?;
            let crl = ca.crl(&[], 1)?;
            vec![
                ("ca.pem", ca.cert_pem().to_owned(), 0o644),
                ("ca.key", ca.key_pem(), 0o600),
                // The chain carries the CA so an enrolling agent can check the token's fingerprint.
                ("coordinator.pem", format!("{}{}", coord.pem, ca.cert_pem()), 0o644),
                ("coordinator.key", coord_key.serialize_pem(), 0o600),
                ("admin.pem", admin.pem, 0o644),
                ("admin.key", admin_key.serialize_pem(), 0o600),
                ("crl.pem", crl, 0o644),
            ]
        }
    };
    for (file, body, mode) in files {
        let path = dir.pki_file(file);
        write_atomic(&path, body.as_bytes(), mode).map_err(io(&path))?;
    }

    let catalog = Catalog::create(&dir.catalog())?;
    if let Some(j) = &opts.joined {
        for c in &j.coordinators {
            let rec = crate::catalog::deployment::CoordinatorRecord {
                name: c.name.clone(),
                addr: c.addr.clone(),
                joined_at: 0,
            };
            catalog.put_coordinator(&rec)?;
        }
    }
    std::fs::create_dir_all(dir.packs()).map_err(io(&dir.packs()))?;
    // The key lives apart from the packs it protects, and the catalog knows it by its check
    // value from the start.
    let key_file = if opts.encrypt {
        let key = store_key::generate();
        store_key::write(&dir.default_key_file(), &key)?;
        catalog.set_store_key_check(store_key::check_value(&key))?;
        dir.default_key_file().strip_prefix(root).ok().map(Path::to_path_buf)
    } else {
        None
    };
    drop(catalog);
    let config = CoordinatorConfig {
        name: name.to_owned(),
        listen: opts.listen,
        advertise: opts.advertise.clone(),
        encrypt: opts.encrypt,
        key_file,
        agent_cert_validity: "730days".into(),
        jobs: crate::config::JobLimits::default(),
        tokens: crate::config::TokenLimits::default(),
        agents: crate::config::AgentLimits::default(),
        smtp: None,
        metrics: None,
        verify: crate::config::VerifyConfig::default(),
        authority: opts
            .joined
            .as_ref()
            .map(|j| crate::config::AuthorityRef { name: j.authority.name.clone(), addr: j.authority.addr.clone() }),
    };
    config.save(&dir)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn opts() -> InitOptions {
        InitOptions {
            name: Some("coord".into()),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            encrypt: true,
            joined: None,
        }
    }

    #[test]
    fn init_creates_the_layout_with_private_keys() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("c");
        init(&root, &opts()).unwrap();
        for f in ["ca.pem", "ca.key", "coordinator.pem", "coordinator.key", "admin.pem", "admin.key", "crl.pem"] {
            let mode = std::fs::metadata(root.join("pki").join(f)).unwrap().permissions().mode() & 0o777;
            let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
            assert_eq!(mode, want, "{f}");
        }
        assert!(root.join("catalog").is_dir());
        assert!(root.join("store/packs").is_dir());
        assert_eq!(std::fs::metadata(root.join("pki/store.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!root.join("store/key").exists(), "the key lives apart from the store");
        assert_eq!(std::fs::metadata(root.join("coordinator.toml")).unwrap().permissions().mode() & 0o777, 0o600);
        let config = CoordinatorConfig::load(&DataDir::new(&root)).unwrap();
        assert_eq!(config.key_file.as_deref(), Some(Path::new("pki/store.key")), "recorded relative");
        let catalog = Catalog::open(&root.join("catalog")).unwrap();
        let key = store_key::read(&root.join("pki/store.key")).unwrap().unwrap();
        assert_eq!(catalog.store_key_check().unwrap(), Some(store_key::check_value(&key)));
    }

    #[test]
    fn init_refuses_an_initialized_directory_and_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("c");
        init(&root, &opts()).unwrap();
        let before = std::fs::read(root.join("pki/ca.pem")).unwrap();
        assert!(matches!(init(&root, &opts()), Err(InitError::AlreadyInitialized(_))));
        assert_eq!(std::fs::read(root.join("pki/ca.pem")).unwrap(), before);
    }

    #[test]
    fn init_accepts_an_existing_empty_directory() {
        let t = tempfile::tempdir().unwrap();
        init(t.path(), &opts()).unwrap();
        assert!(t.path().join("coordinator.toml").exists());
    }
}
