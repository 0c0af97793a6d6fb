//! The coordinator's authority: its CA, its own certificate, the CRL, join tokens and the
//! decisions of enrollment and revocation. Plain code over the catalog and `DIR/pki/`; the
//! server actors call it and apply what it returns (a new server config, connections to close).

use crate::catalog::{now_secs, AgentRecord, Catalog, CatalogError, RevocationRecord, TokenRecord, TokenRefusal};
use crate::config::{ConfigError, CoordinatorConfig, DataDir};
use crate::enrollment::{self, EnrolledHost, ScopeError, TokenScope};
use bulwark_pki::ca::{PkiError, Revocation};
use bulwark_pki::{tls, AgentCsr, Ca, JoinToken};
use bulwark_protocol::messages::{
    CoordinatorAddr, EnrollRequest, EnrollResponse, JoinRequest, JoinResponse, TokenInfo,
};
use bulwark_protocol::paging::{Page, PageBuilder, PageRequest};
use bulwark_protocol::{HostId, ALPN, ALPN_ENROLL, ALPN_JOIN};
use std::sync::Mutex;
use std::time::Duration;

/// Why an authority operation failed (not a refusal: refusals are answers).
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Token(#[from] ScopeError),
    #[error("{0}")]
    BadCursor(String),
    #[error(
        "this coordinator joined the deployment and holds no CA key: {what} at the deployment's first coordinator{}",
        .authority.as_ref().map(|a| format!(" ({a})")).unwrap_or_default()
    )]
    NotAuthority { what: &'static str, authority: Option<crate::config::AuthorityRef> },
}

/// A join token just made.
#[derive(Debug, Clone)]
pub struct CreatedToken {
    /// The text the agent enrolls with (carries the secret).
    pub token: String,
    /// Its public id.
    pub id: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// What an enrollment decided.
#[derive(Debug)]
pub struct Enrollment {
    pub response: EnrollResponse,
    /// Serials this enrollment revoked (a re-enrolled host's previous certificate).
    pub revoked: Vec<String>,
    /// The host that asked.
    pub host: String,
}

/// How long an export certificate is valid (a mount that outlives it is restarted).
pub const EXPORT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// A signed export certificate with what its server needs beside it (PEM).
#[derive(Debug, Clone)]
pub struct ExportCert {
    pub cert_pem: String,
    pub ca_pem: String,
    pub crl_pem: String,
    pub not_after: u64,
}

/// The CA, the coordinator's credentials, and the catalog they are recorded in.
pub struct Authority {
    dir: DataDir,
    config: CoordinatorConfig,
    /// The CA with its key: only the deployment's first coordinator holds it (a coordinator
    /// that joined signs nothing, see [`AuthorityError::NotAuthority`]).
    ca: Option<Ca>,
    ca_pem: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    catalog: Catalog,
    /// Serializes CRL rewrites.
    crl_lock: Mutex<()>,
    /// Serializes enrollments, so two tokens cannot both enroll one new host name.
    enroll_lock: Mutex<()>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("name", &self.config.name).finish_non_exhaustive()
    }
}

fn read(path: std::path::PathBuf) -> Result<String, AuthorityError> {
    std::fs::read_to_string(&path).map_err(|source| AuthorityError::Read { path: path.display().to_string(), source })
}

impl Authority {
    /// Loads the CA and configuration of an initialized data directory.
    pub fn open(dir: DataDir, catalog: Catalog) -> Result<Self, AuthorityError> {
        let config = CoordinatorConfig::load(&dir)?;
        let ca_pem = read(dir.pki_file("ca.pem"))?;
        let ca_der = tls::certs_from_pem(&ca_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or_else(|| AuthorityError::Invalid("pki/ca.pem holds no certificate".into()))?;
        let ca = match dir.pki_file("ca.key").exists() {
            true => Some(Ca::from_pem(&ca_pem, &read(dir.pki_file("ca.key"))?)?),
            false => None,
        };
        Ok(Self { dir, config, ca, ca_pem, ca_der, catalog, crl_lock: Mutex::new(()), enroll_lock: Mutex::new(()) })
    }

    /// The CA that signs, or why this coordinator cannot `what`.
    fn signer(&self, what: &'static str) -> Result<&Ca, AuthorityError> {
        self.ca.as_ref().ok_or_else(|| AuthorityError::NotAuthority { what, authority: self.config.authority.clone() })
    }

    /// The deployment CA's certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        self.ca_der.as_ref()
    }

    /// Whether this coordinator holds the CA key (the deployment's first one).
    pub fn is_authority(&self) -> bool {
        self.ca.is_some()
    }

    /// Records this coordinator in the deployment's list under the address agents dial (at
    /// `serve`, once its port is chosen).
    pub fn note_self(&self) -> Result<(), AuthorityError> {
        let addr = self.advertised_addr()?;
        let known = self.catalog.coordinators()?.into_iter().find(|c| c.name == self.config.name);
        if known.as_ref().map(|c| &c.addr) != Some(&addr) {
            let joined_at = known.map_or(0, |c| c.joined_at);
            let rec = crate::catalog::deployment::CoordinatorRecord { name: self.config.name.clone(), addr, joined_at };
            self.catalog.put_coordinator(&rec)?;
            self.catalog.flush()?;
        }
        Ok(())
    }

    /// The deployment's coordinators as agents are told them.
    pub fn coordinators(&self) -> Result<Vec<CoordinatorAddr>, AuthorityError> {
        Ok(self.catalog.coordinator_addrs()?)
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn dir(&self) -> &DataDir {
        &self.dir
    }

    /// Replaces the configuration (after `serve` chose a port).
    pub fn set_config(&mut self, config: CoordinatorConfig) {
        self.config = config;
    }

    /// The rustls server config with the CRL as it is on disk now.
    pub fn server_tls(&self) -> Result<rustls::ServerConfig, AuthorityError> {
        let chain = tls::certs_from_pem(&read(self.dir.pki_file("coordinator.pem"))?, "coordinator certificate")?;
        let key = tls::key_from_pem(&read(self.dir.pki_file("coordinator.key"))?, "coordinator key")?;
        let crl = tls::crl_from_pem(&read(self.dir.pki_file("crl.pem"))?)?;
        Ok(tls::server_config(&self.ca_der, chain, key, crl, &[ALPN, ALPN_ENROLL, ALPN_JOIN])?)
    }

    /// The quinn server config with the current CRL.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, AuthorityError> {
        Ok(bulwark_pki::quic::server(self.server_tls()?)?)
    }

    /// The address agents dial.
    pub fn advertised_addr(&self) -> Result<String, AuthorityError> {
        if let Some(a) = &self.config.advertise {
            return Ok(a.clone());
        }
        let listen = self.config.listen;
        if listen.ip().is_unspecified() {
            return Err(AuthorityError::Invalid(format!(
                "the coordinator listens on {listen}, which agents cannot dial; set `advertise = \"HOST:PORT\"` in coordinator.toml"
            )));
        }
        if listen.port() == 0 {
            return Err(AuthorityError::Invalid(
                "the coordinator has not chosen its port yet (listen port 0): start `serve` first".into(),
            ));
        }
        Ok(listen.to_string())
    }

    /// The host enrolled as `host`, as enrollment decisions see it.
    fn enrolled(&self, host: &str) -> Result<Option<EnrolledHost>, CatalogError> {
        self.catalog.agent(host)?.map(|rec| self.as_enrolled(&rec)).transpose()
    }

    fn as_enrolled(&self, rec: &AgentRecord) -> Result<EnrolledHost, CatalogError> {
        let active = !rec.revoked && !self.catalog.is_revoked(&rec.cert_serial)?;
        Ok(EnrolledHost { cluster: rec.cluster.clone(), active })
    }

    /// Creates a one-time join token for `scope` (see [`enrollment`] for the rules). Purges a
    /// bounded number of tokens finished more than a day ago first.
    pub fn create_token(&self, ttl: Duration, scope: &TokenScope) -> Result<CreatedToken, AuthorityError> {
        let ca = self.signer("make join tokens")?;
        let cap = self.config.max_token_ttl()?;
        let mut lookup_failed = None;
        let checked = enrollment::check_scope(scope, ttl, cap, |host| {
            self.enrolled(host.as_str()).unwrap_or_else(|e| {
                lookup_failed = Some(e);
                None
            })
        });
        if let Some(e) = lookup_failed {
            return Err(e.into());
        }
        let checked = checked?;
        let token = JoinToken::new(self.advertised_addr()?, self.config.name.clone(), ca.fingerprint());
        let now = now_secs();
        if let Some(name) = &checked.coordinator {
            if name.as_str() == self.config.name || self.catalog.coordinators()?.iter().any(|c| c.name == name.as_str())
            {
                return Err(AuthorityError::Invalid(format!(
                    "coordinator {name} is already in the deployment: choose another name"
                )));
            }
            let expires_at = now.saturating_add(ttl.as_secs());
            let record = crate::catalog::deployment::JoinTokenRecord {
                name: name.to_string(),
                created_at: now,
                expires_at,
                used_at: None,
            };
            let hash = token.secret_hash();
            self.catalog.insert_join_token(hash, &record)?;
            let id = enrollment::token_id(&hash);
            tracing::info!(token = %id, coordinator = %name, "coordinator join token created");
            return Ok(CreatedToken { token: token.encode(), id, expires_at });
        }
        let purged = self.catalog.purge_tokens(enrollment::PURGE_SCAN_LIMIT, |t| enrollment::purgeable(t, now))?;
        if purged > 0 {
            tracing::info!(purged, "purged finished join tokens");
        }
        let expires_at = now.saturating_add(ttl.as_secs());
        let record = TokenRecord {
            created_at: now,
            expires_at,
            host: checked.host.as_ref().map(|h| h.to_string()),
            used_at: None,
            used_by: None,
            cluster: checked.cluster.as_ref().map(|c| c.to_string()),
            replace: checked.replace.as_ref().map(|h| h.to_string()),
            revoked_at: None,
        };
        let hash = token.secret_hash();
        self.catalog.insert_token(hash, &record)?;
        let id = enrollment::token_id(&hash);
        tracing::info!(token = %id, host = ?record.host, cluster = ?record.cluster, replace = ?record.replace, "join token created");
        Ok(CreatedToken { token: token.encode(), id, expires_at })
    }

    /// One page of the tokens not yet purged, by id.
    pub fn list_tokens(&self, req: &PageRequest) -> Result<Page<TokenInfo>, AuthorityError> {
        let after = req.after_key().map_err(|e| AuthorityError::BadCursor(e.to_string()))?;
        let mut page = PageBuilder::new(req);
        for r in self.catalog.tokens_after(after.as_deref()) {
            let (key, t) = r?;
            let Ok(hash) = <[u8; 32]>::try_from(key.as_slice()) else { continue };
            if !page.offer(&key, Some(token_info(&hash, t))) {
                break;
            }
        }
        Ok(page.finish())
    }

    /// Revokes an unused token by its public id; answers whether it was revoked just now
    /// (false: it already was).
    pub fn revoke_token(&self, id: &str) -> Result<bool, AuthorityError> {
        let prefix = enrollment::parse_token_id(id)?;
        let hashes = self.catalog.token_hashes_with_prefix(&prefix)?;
        let [hash] = hashes.as_slice() else {
            // 64 bits of a hash: two tokens sharing an id would be a broken hash.
            return Err(ScopeError::UnknownId(id.to_owned()).into());
        };
        let now = now_secs();
        let changed = self.catalog.update_token(*hash, |t| {
            if t.revoked_at.is_some() {
                return Ok(false);
            }
            if let Some(by) = &t.used_by {
                return Err(ScopeError::AlreadyUsed { id: id.to_owned(), by: by.clone() });
            }
            t.revoked_at = Some(now);
            Ok(true)
        })?;
        let revoked = changed.ok_or_else(|| ScopeError::UnknownId(id.to_owned()))??;
        if revoked {
            tracing::warn!(token = id, "join token revoked");
        }
        Ok(revoked)
    }

    /// Decides an enrollment request. The CSR is checked first (a broken one spends nothing),
    /// then the token is checked against the host asked for and consumed, atomically; only
    /// then is the certificate signed and, for a `--replace` token, the host's previous
    /// certificate revoked. A refusal at any step leaves the catalog and the CRL as they were.
    pub fn enroll(&self, req: &EnrollRequest) -> Result<Enrollment, AuthorityError> {
        let refuse = |reason: String| Enrollment {
            response: EnrollResponse::Refused { reason },
            revoked: vec![],
            host: req.host.to_string(),
        };
        if let Err(e) = bulwark_protocol::handshake::check_version(req.version) {
            return Ok(refuse(e.to_string()));
        }
        let Ok(secret): Result<[u8; 32], _> = req.token_secret.as_slice().try_into() else {
            return Ok(refuse(TokenRefusal::Unknown.to_string()));
        };
        let host = req.host.as_str();
        let ca = match self.signer("enroll agents") {
            Ok(ca) => ca,
            Err(e) => return Ok(refuse(e.to_string())),
        };
        let validity = self.config.agent_validity()?;
        let csr = match AgentCsr::parse(&req.csr_pem) {
            Ok(c) => c,
            Err(e) => return Ok(refuse(e.to_string())),
        };
        let _one_at_a_time = self.enroll_lock.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.catalog.agent(host)?;
        let existing = previous.as_ref().map(|rec| self.as_enrolled(rec)).transpose()?;
        let now = now_secs();
        let hash = bulwark_pki::token::secret_hash(&secret);
        let admission = match self
            .catalog
            .consume_token(hash, host, now, |t| enrollment::admit(t, &req.host, existing.as_ref(), now))?
        {
            Ok(a) => a,
            Err(refusal) => return Ok(refuse(refusal.to_string())),
        };
        let cert = match ca.sign_agent(&csr, host, Some(&admission.cluster), validity) {
            Ok(c) => c,
            Err(e) => {
                self.catalog.release_token(hash, host)?;
                return Err(e.into());
            }
        };
        let revoked: Vec<String> = match previous {
            Some(old) if admission.revoke_previous => vec![old.cert_serial],
            _ => vec![],
        };
        self.catalog.put_agent(&AgentRecord {
            host: host.to_owned(),
            cert_serial: cert.serial_hex.clone(),
            enrolled_at: now,
            cert_not_after: cert.not_after,
            revoked: false,
            last_seen: None,
            agent_version: None,
            vms: 0,
            cluster: admission.cluster.clone(),
        })?;
        if !revoked.is_empty() {
            self.revoke_serials(host, &revoked)?;
        } else {
            self.catalog.flush()?;
        }
        tracing::info!(host, cluster = %admission.cluster, replaced = !revoked.is_empty(), "host enrolled");
        Ok(Enrollment {
            response: EnrollResponse::Accepted {
                cert_pem: cert.pem,
                ca_pem: self.ca_pem.clone(),
                coordinator: self.config.name.clone(),
                coordinators: self.coordinators()?,
            },
            revoked,
            host: host.to_owned(),
        })
    }

    /// Decides a coordinator's request to join the deployment: the token is checked and
    /// consumed for exactly that name, then its certificate (valid for its name and `sans`) and
    /// an administrator's are signed, and it is recorded among the deployment's coordinators.
    pub fn join(&self, req: &JoinRequest) -> Result<JoinResponse, AuthorityError> {
        let refuse = |reason: String| Ok(JoinResponse::Refused { reason });
        if let Err(e) = bulwark_protocol::handshake::check_version(req.version) {
            return refuse(e.to_string());
        }
        let ca = match self.signer("let coordinators join") {
            Ok(ca) => ca,
            Err(e) => return refuse(e.to_string()),
        };
        let Ok(secret): Result<[u8; 32], _> = req.token_secret.as_slice().try_into() else {
            return refuse(TokenRefusal::Unknown.to_string());
        };
        let asked = req.name.as_ref().map(|n| n.as_str());
        if req.sans.len() > 16
            || req.sans.iter().any(|s| HostId::new(s.clone()).is_err() && s.parse::<std::net::IpAddr>().is_err())
        {
            return refuse("the names asked for the certificate are not host names or addresses".into());
        }
        if req.addr.len() > 255 || req.addr.is_empty() {
            return refuse("the address agents should dial is empty or too long".into());
        }
        let coord_csr = match AgentCsr::parse(&req.coordinator_csr) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        let admin_csr = match AgentCsr::parse(&req.admin_csr) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        let _one_at_a_time = self.enroll_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.catalog.coordinators()?.len() >= bulwark_protocol::messages::MAX_COORDINATORS {
            return refuse("the deployment has as many coordinators as it may".into());
        }
        let now = now_secs();
        let hash = bulwark_pki::token::secret_hash(&secret);
        let token = match self.catalog.consume_join_token(hash, asked, now)? {
            Ok(t) => t,
            Err(refusal) => return refuse(refusal.to_string()),
        };
        let name = token.name.as_str();
        // Its certificate is valid for its own name and addresses, never for another
        // coordinator's name (agents also check the name the CA wrote, see `uplink`).
        let taken: std::collections::HashSet<String> =
            self.catalog.coordinators()?.into_iter().map(|c| c.name).chain([self.config.name.clone()]).collect();
        let mut sans = vec![name.to_owned()];
        sans.extend(req.sans.iter().filter(|s| !taken.contains(*s)).cloned());
        sans.sort();
        sans.dedup();
        let signed = ca
            .sign_csr(&coord_csr, bulwark_pki::Role::Coordinator, name, sans, bulwark_pki::ca::SERVICE_VALIDITY)
            .and_then(|c| {
                let admin = ca.sign_csr(
                    &admin_csr,
                    bulwark_pki::Role::Admin,
                    "admin",
                    vec![],
                    bulwark_pki::ca::SERVICE_VALIDITY,
                )?;
                Ok((c, admin))
            });
        let (coord, admin) = match signed {
            Ok(pair) => pair,
            Err(e) => {
                self.catalog.release_join_token(hash)?;
                return Err(e.into());
            }
        };
        let rec = crate::catalog::deployment::CoordinatorRecord {
            name: name.to_owned(),
            addr: req.addr.clone(),
            joined_at: now,
        };
        self.catalog.put_coordinator(&rec)?;
        self.catalog.flush()?;
        tracing::info!(coordinator = name, addr = %req.addr, "coordinator joined the deployment");
        Ok(JoinResponse::Accepted {
            name: name.to_owned(),
            coordinator_pem: format!("{}{}", coord.pem, self.ca_pem),
            admin_pem: admin.pem,
            ca_pem: self.ca_pem.clone(),
            crl_pem: read(self.dir.pki_file("crl.pem"))?,
            coordinators: self.coordinators()?,
            authority: CoordinatorAddr { name: self.config.name.clone(), addr: self.advertised_addr()? },
        })
    }

    /// Revokes the current certificate of `host`; returns the serials revoked (empty if it was
    /// already revoked). The caller must rebuild the server config and close connections.
    pub fn revoke_host(&self, host: &HostId) -> Result<Vec<String>, AuthorityError> {
        let Some(mut rec) = self.catalog.agent(host.as_str())? else {
            return Err(AuthorityError::Invalid(format!("no enrolled agent named {host}")));
        };
        rec.revoked = true;
        self.catalog.put_agent(&rec)?;
        if self.catalog.is_revoked(&rec.cert_serial)? {
            self.catalog.flush()?;
            return Ok(vec![]);
        }
        let serials = vec![rec.cert_serial.clone()];
        self.revoke_serials(host.as_str(), &serials)?;
        Ok(serials)
    }

    fn revoke_serials(&self, host: &str, serials: &[String]) -> Result<(), AuthorityError> {
        let _guard = self.crl_lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_secs();
        let records: Vec<_> = serials
            .iter()
            .map(|s| RevocationRecord { serial: s.clone(), host: host.to_owned(), revoked_at: now })
            .collect();
        let number = self.catalog.revoke(&records)?;
        self.write_crl(number)
    }

    /// Signs an NBD export's server certificate for `names` (an admin asked: `mount --nbd
    /// tcp:`); answers it with the CA and the current CRL, all PEM.
    pub fn issue_export_cert(&self, csr_pem: &str, names: &[String]) -> Result<ExportCert, AuthorityError> {
        let name = names.first().cloned().unwrap_or_default();
        let cert = self.signer("sign export certificates")?.sign_export_csr(
            csr_pem,
            &name,
            names.to_vec(),
            EXPORT_CERT_VALIDITY,
        )?;
        tracing::info!(names = ?names, serial = %cert.serial_hex, "export certificate issued");
        Ok(ExportCert {
            cert_pem: cert.pem,
            ca_pem: self.ca_pem.clone(),
            crl_pem: read(self.dir.pki_file("crl.pem"))?,
            not_after: cert.not_after,
        })
    }

    /// Writes `pki/crl.pem` from the catalog's revocations.
    pub fn write_crl(&self, number: u64) -> Result<(), AuthorityError> {
        let revoked: Vec<Revocation> = self
            .catalog
            .revocations()?
            .into_iter()
            .map(|r| Revocation { serial_hex: r.serial, revoked_at: r.revoked_at })
            .collect();
        let pem = self.signer("revoke certificates")?.crl(&revoked, number)?;
        let path = self.dir.pki_file("crl.pem");
        bulwark_pki::files::write_atomic(&path, pem.as_bytes(), 0o644)
            .map_err(|source| AuthorityError::Write { path: path.display().to_string(), source })
    }

    /// Re-issues the CRL (fresh `next_update`) at start-up.
    pub fn refresh_crl(&self) -> Result<(), AuthorityError> {
        if self.ca.is_none() {
            // A joined coordinator keeps the CRL it was given (see docs/security.md).
            return Ok(());
        }
        let _guard = self.crl_lock.lock().unwrap_or_else(|p| p.into_inner());
        let number = self.catalog.revoke(&[])?;
        self.write_crl(number)
    }
}

/// A token as `token list` shows it (never its secret).
fn token_info(hash: &[u8; 32], t: TokenRecord) -> TokenInfo {
    TokenInfo {
        id: enrollment::token_id(hash),
        host: t.host,
        cluster: t.cluster,
        replace: t.replace,
        created_at: t.created_at,
        expires_at: t.expires_at,
        used_at: t.used_at,
        used_by: t.used_by,
        revoked_at: t.revoked_at,
    }
}
