//! A peer's identity, read from its certificate: the common name is the host (or coordinator
//! or admin) name, the organizational unit is the role the CA gave it. Both are set by our CA,
//! never copied from a CSR, so an agent cannot enroll its way into the admin role.

use x509_parser::prelude::{FromDer, X509Certificate};

/// What a certificate holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Agent,
    Admin,
    /// A console serving a recovery point over NBD with TLS (`bulwark mount --nbd tcp:`):
    /// a server certificate only, never accepted as a client anywhere.
    Export,
}

impl Role {
    /// The organizational-unit value our CA writes for this role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Coordinator => "bulwark-coordinator",
            Role::Agent => "bulwark-agent",
            Role::Admin => "bulwark-admin",
            Role::Export => "bulwark-export",
        }
    }

    fn from_ou(ou: &str) -> Option<Role> {
        [Role::Coordinator, Role::Agent, Role::Admin, Role::Export].into_iter().find(|r| r.ou() == ou)
    }
}

/// How an agent certificate names the host's cluster: a URI subject alternative name.
pub const CLUSTER_URI_PREFIX: &str = "urn:bulwark:cluster:";

/// Who the peer is, as its (already verified) certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
    /// Lowercase hex of the certificate's serial number.
    pub serial: String,
    /// An agent's cluster, when its certificate names one (certificates issued before
    /// protocol 11 do not: the enrolling coordinator's catalog knows it).
    pub cluster: Option<String>,
}

/// Why a certificate carries no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate has no single common name")]
    NoCommonName,
    #[error("certificate has no Bulwark role (organizational unit)")]
    NoRole,
}

/// Reads the identity of a DER certificate.
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let mut cns = subject.iter_common_name();
    let name = match (cns.next(), cns.next()) {
        (Some(cn), None) => cn.as_str().map_err(|_| IdentityError::NoCommonName)?.to_owned(),
        _ => return Err(IdentityError::NoCommonName),
    };
    let role = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(Role::from_ou)
        .ok_or(IdentityError::NoRole)?;
    let cluster = cert.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(CLUSTER_URI_PREFIX).map(str::to_owned),
            _ => None,
        })
    });
    Ok(PeerIdentity { role, name, serial: hex(cert.raw_serial()), cluster })
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// This machine's host name (the kernel's), if it has a usable one.
pub fn local_host_name() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name = raw.trim();
    (!name.is_empty()).then(|| name.to_owned())
}
