//! The deployment CA: creation, issuance and revocation lists.
//!
//! Every certificate's fields are chosen here. A CSR contributes its public key and nothing
//! else — rcgen would otherwise copy whatever the CSR asks for (CA flag, usages, validity,
//! names). Serials are 16 random bytes (first byte 0x01..=0x7f so the DER integer is exactly
//! these bytes), so a re-issued certificate never shares a serial with a revoked one.

use crate::identity::{hex, Role};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;

/// How long the CA itself is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
/// Default validity of coordinator and admin certificates.
pub const SERVICE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86_400);
/// Default validity of an agent certificate.
pub const AGENT_VALIDITY: Duration = Duration::from_secs(2 * 365 * 86_400);
/// Certificates start this long before "now", so clocks a little behind still accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("{what} is not valid PEM")]
    BadPem { what: &'static str },
    #[error("{0}")]
    Time(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("the CRL is not acceptable: {0}")]
    BadCrl(String),
}

/// What a CRL says: its number and the serials it revokes (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlContents {
    pub number: u64,
    pub serials: Vec<String>,
}

/// Reads a CRL (PEM) issued by `ca_der`'s CA: its signature is checked against the CA's key,
/// and at most `max` revocations are read (a larger one is refused).
pub fn read_crl(pem: &str, ca_der: &[u8], max: usize) -> Result<CrlContents, PkiError> {
    use x509_parser::prelude::FromDer;
    let der = crate::tls::crl_from_pem(pem)?;
    let bad = |e: String| PkiError::BadCrl(e);
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
        .map_err(|e| bad(e.to_string()))?;
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca_der).map_err(|e| bad(e.to_string()))?;
    if crl.issuer() != ca.subject() {
        return Err(bad("it was not issued by this deployment's CA".into()));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| bad(format!("its signature does not verify: {e}")))?;
    let number =
        crl.crl_number().and_then(|n| u64::try_from(n).ok()).ok_or_else(|| bad("it carries no CRL number".into()))?;
    let mut serials = vec![];
    for r in crl.iter_revoked_certificates() {
        if serials.len() >= max {
            return Err(bad(format!("it lists more than {max} certificates")));
        }
        serials.push(crate::identity::hex(r.raw_serial()));
    }
    Ok(CrlContents { number, serials })
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub serial_hex: String,
    /// Unix seconds after which the certificate is no longer valid.
    pub not_after: u64,
}

/// One revoked certificate for the CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub serial_hex: String,
    /// Unix seconds when it was revoked.
    pub revoked_at: u64,
}

/// The deployment CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &hex(&self.fingerprint())).finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs = t.duration_since(UNIX_EPOCH).map_err(|e| PkiError::Time(e.to_string()))?.as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| PkiError::Time(e.to_string()))
}

/// 16 random bytes usable verbatim as a positive DER serial.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn serial_from_hex(s: &str) -> Option<SerialNumber> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect();
    bytes.map(|b| SerialNumber::from_slice(&b))
}

/// What to put into a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub role: Role,
    /// The common name: host name, coordinator name or admin name.
    pub name: String,
    /// Subject alternative names (DNS names or IP addresses as text).
    pub sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// An agent's cluster, written as a URI subject alternative name
    /// ([`crate::identity::CLUSTER_URI_PREFIX`]): every coordinator of the deployment reads it
    /// from the certificate, not only the one that enrolled the host.
    pub cluster: Option<String>,
}

impl LeafSpec {
    /// A spec valid from now (minus clock skew) for `validity`.
    pub fn new(role: Role, name: impl Into<String>, sans: Vec<String>, validity: Duration) -> Self {
        let now = SystemTime::now();
        Self { role, name: name.into(), sans, not_before: now - CLOCK_SKEW, not_after: now + validity, cluster: None }
    }
}

impl Ca {
    /// Creates a new CA for the deployment named `deployment`.
    pub fn generate(deployment: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let params = Self::ca_params(deployment)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), cert_der: cert.der().clone(), key })
    }

    fn ca_params(deployment: &str) -> Result<CertificateParams, PkiError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Bulwark");
        dn.push(DnType::CommonName, format!("Bulwark CA {deployment}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = offset(now - CLOCK_SKEW)?;
        params.not_after = offset(now + CA_VALIDITY)?;
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        Ok(params)
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        use rustls_pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| PkiError::BadPem { what: "CA certificate" })?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::BadPem { what: "CA key" })?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), cert_der, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA key, PEM (PKCS#8). Write it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the CA certificate's DER: what a join token pins.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues a leaf certificate for `public_key` with exactly the fields of `spec`.
    pub fn issue(&self, spec: &LeafSpec, public_key: &impl PublicKeyData) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Bulwark");
        dn.push(DnType::OrganizationalUnitName, spec.role.ou());
        dn.push(DnType::CommonName, spec.name.clone());
        params.distinguished_name = dn;
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        if let Some(cluster) = &spec.cluster {
            let uri = format!("{}{cluster}", crate::identity::CLUSTER_URI_PREFIX);
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = match spec.role {
            // QEMU's TLS credentials (an agent's certificate as NBD client, an export's as
            // server) refuse a certificate whose critical key usage lacks key encipherment.
            Role::Agent | Role::Export => vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment],
            Role::Coordinator | Role::Admin => vec![KeyUsagePurpose::DigitalSignature],
        };
        params.extended_key_usages = match spec.role {
            Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Role::Agent | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Export => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        params.not_before = offset(spec.not_before)?;
        params.not_after = offset(spec.not_after)?;
        let serial = random_serial();
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        let not_after = spec.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(IssuedCert { pem: cert.pem(), der: cert.der().clone(), serial_hex, not_after })
    }

    /// Issues a certificate together with a freshly generated key (coordinator, admin).
    pub fn issue_with_new_key(&self, spec: &LeafSpec) -> Result<(IssuedCert, KeyPair), PkiError> {
        let key = KeyPair::generate()?;
        let cert = self.issue(spec, &key)?;
        Ok((cert, key))
    }

    /// Signs an agent's CSR for `host`. Only the CSR's public key is used (after its
    /// signature is checked); every field comes from the CA.
    pub fn sign_agent_csr(&self, csr_pem: &str, host: &str, validity: Duration) -> Result<IssuedCert, PkiError> {
        self.sign_agent(&AgentCsr::parse(csr_pem)?, host, None, validity)
    }

    /// Signs a CSR already checked by [`AgentCsr::parse`] for `host` of `cluster`.
    pub fn sign_agent(
        &self,
        csr: &AgentCsr,
        host: &str,
        cluster: Option<&str>,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let mut spec = LeafSpec::new(Role::Agent, host, vec![host.to_owned()], validity);
        spec.cluster = cluster.map(str::to_owned);
        self.issue(&spec, &csr.0.public_key)
    }

    /// Signs a CSR checked by [`AgentCsr::parse`] for a certificate of `role` named `name`
    /// (a joining coordinator's own, valid for `sans`, or its administrator's).
    pub fn sign_csr(
        &self,
        csr: &AgentCsr,
        role: Role,
        name: &str,
        sans: Vec<String>,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::new(role, name, sans, validity), &csr.0.public_key)
    }

    /// Signs an NBD export's CSR (`bulwark mount --nbd tcp:`): a server certificate for
    /// `sans` named `name`, with the export role. Only the CSR's public key is used.
    pub fn sign_export_csr(
        &self,
        csr_pem: &str,
        name: &str,
        sans: Vec<String>,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let csr = AgentCsr::parse(csr_pem)?;
        self.issue(&LeafSpec::new(Role::Export, name, sans, validity), &csr.0.public_key)
    }

    /// A CRL (PEM) listing `revoked`, numbered `crl_number`, valid for a year.
    pub fn crl(&self, revoked: &[Revocation], crl_number: u64) -> Result<String, PkiError> {
        let now = SystemTime::now();
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial_number = serial_from_hex(&r.serial_hex)
                    .ok_or_else(|| PkiError::Time(format!("bad serial {:?}", r.serial_hex)))?;
                Ok(RevokedCertParams {
                    serial_number,
                    revocation_time: offset(UNIX_EPOCH + Duration::from_secs(r.revoked_at))?,
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: offset(now - CLOCK_SKEW)?,
            next_update: offset(now + Duration::from_secs(365 * 86_400))?,
            crl_number: SerialNumber::from_slice(&crl_number.max(1).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer()?)?.pem()?)
    }
}

/// An agent's certificate signing request whose signature has been checked: parsing is
/// separate from signing so a coordinator can refuse a broken CSR before it spends anything
/// (a join token), and sign only once everything else has been decided.
pub struct AgentCsr(CertificateSigningRequestParams);

impl std::fmt::Debug for AgentCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCsr").finish_non_exhaustive()
    }
}

impl AgentCsr {
    /// Parses a PEM CSR and checks its signature.
    pub fn parse(csr_pem: &str) -> Result<Self, PkiError> {
        CertificateSigningRequestParams::from_pem(csr_pem).map(Self).map_err(|e| PkiError::BadCsr(e.to_string()))
    }
}

/// A new key (PEM, PKCS#8) and a CSR (PEM) for it naming `name`: what a console sends to
/// have an export certificate signed.
pub fn key_and_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name.to_owned());
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_of;

    #[test]
    fn agent_certificates_take_nothing_from_the_csr_but_its_key() {
        let ca = Ca::generate("test").unwrap();
        let agent_key = KeyPair::generate().unwrap();
        // A hostile CSR asks to be a CA, an admin, valid forever, for another name.
        let mut asked = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        asked.distinguished_name.push(DnType::OrganizationalUnitName, Role::Admin.ou());
        asked.distinguished_name.push(DnType::CommonName, "admin");
        let csr = asked.serialize_request(&agent_key).unwrap().pem().unwrap();
        let issued = ca.sign_agent_csr(&csr, "node1", AGENT_VALIDITY).unwrap();
        let id = identity_of(&issued.der).unwrap();
        assert_eq!(id.role, Role::Agent);
        assert_eq!(id.name, "node1");
        assert_eq!(id.serial, issued.serial_hex);
        let (_, parsed) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
        assert!(!parsed.is_ca());
        let days = (parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp()) / 86_400;
        assert!(days <= 2 * 365 + 1, "validity {days} days");
    }

    #[test]
    fn a_crl_is_read_only_from_its_own_ca() {
        let ca = Ca::generate("test").unwrap();
        let revoked = [Revocation { serial_hex: "0a0b".into(), revoked_at: 1 }];
        let pem = ca.crl(&revoked, 7).unwrap();
        let read = read_crl(&pem, ca.cert_der(), 10).unwrap();
        assert_eq!(read, CrlContents { number: 7, serials: vec!["0a0b".into()] });
        assert!(matches!(read_crl(&pem, ca.cert_der(), 0), Err(PkiError::BadCrl(_))));
        let other = Ca::generate("other").unwrap();
        assert!(matches!(read_crl(&pem, other.cert_der(), 10), Err(PkiError::BadCrl(_))));
    }

    #[test]
    fn an_agent_certificate_names_its_cluster_beside_its_role() {
        let ca = Ca::generate("test").unwrap();
        let (_, csr) = key_and_csr("x").unwrap();
        let csr = AgentCsr::parse(&csr).unwrap();
        let id = identity_of(&ca.sign_agent(&csr, "node1", Some("rack-7"), AGENT_VALIDITY).unwrap().der).unwrap();
        assert_eq!((id.role, id.name.as_str(), id.cluster.as_deref()), (Role::Agent, "node1", Some("rack-7")));
        let id = identity_of(&ca.sign_agent(&csr, "node2", None, AGENT_VALIDITY).unwrap().der).unwrap();
        assert_eq!((id.role, id.cluster), (Role::Agent, None));
    }

    #[test]
    fn a_csr_with_a_bad_signature_is_refused() {
        let ca = Ca::generate("test").unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["n".to_owned()]).unwrap().serialize_request(&key).unwrap();
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", b64(&der));
        assert!(matches!(ca.sign_agent_csr(&pem, "n", AGENT_VALIDITY), Err(PkiError::BadCsr(_))));
    }

    fn b64(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn serials_are_unique_and_round_trip_through_the_crl() {
        let ca = Ca::generate("test").unwrap();
        let spec = LeafSpec::new(Role::Agent, "n1", vec!["n1".into()], AGENT_VALIDITY);
        let (a, _) = ca.issue_with_new_key(&spec).unwrap();
        let (b, _) = ca.issue_with_new_key(&spec).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        let pem = ca.crl(&[Revocation { serial_hex: a.serial_hex.clone(), revoked_at: 1_700_000_000 }], 2).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let serials: Vec<String> = crl.iter_revoked_certificates().map(|r| hex(r.raw_serial())).collect();
        assert_eq!(serials, vec![a.serial_hex]);
    }

    #[test]
    fn the_ca_round_trips_through_pem() {
        let ca = Ca::generate("test").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }
}
