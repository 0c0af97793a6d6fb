//! rustls configurations for mutual TLS on QUIC, all on the ring provider (building a config
//! with `builder()` would panic with two providers in the tree) and TLS 1.3 only (QUIC's).
//!
//! - [`server_config`]: the coordinator. Client certificates from the deployment CA are
//!   verified against the current CRL; a client without a certificate is let through the TLS
//!   handshake only so it can enroll — the coordinator closes such a connection at once unless
//!   it negotiated ALPN `bulwark-enroll/1`. A CRL is fixed when the verifier is built, so a
//!   revocation builds a new server config.
//! - [`client_config`]: agents and the console, with their certificate.
//! - [`enroll_client_config`]: an agent without a certificate yet, trusting exactly the CA
//!   whose fingerprint its join token carries.

use crate::ca::{fingerprint, PkiError};
use crate::identity::{identity_of, IdentityError, PeerIdentity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use std::sync::Arc;

/// The one crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::BadPem { what })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem { what });
    }
    Ok(certs)
}

/// Parses a private key PEM.
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadPem { what })
}

/// Parses a CRL PEM.
pub fn crl_from_pem(pem: &str) -> Result<CertificateRevocationListDer<'static>, PkiError> {
    CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadPem { what: "CRL" })
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(tls_err)?;
    Ok(Arc::new(roots))
}

/// The coordinator's server config: `chain` is its certificate followed by the CA's.
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crl: CertificateRevocationListDer<'static>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .with_crls([crl])
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// The server config of an NBD export over TLS: TLS 1.3, a client certificate of the
/// deployment required (checked against the CRL); who may read is decided after the handshake
/// from [`peer_identity`].
pub fn export_server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crl: CertificateRevocationListDer<'static>,
) -> Result<ServerConfig, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .with_crls([crl])
        .build()
        .map_err(tls_err)?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)
}

/// A client config that presents `chain`/`key` and trusts only `ca`.
pub fn client_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<ClientConfig, PkiError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// A client config for enrollment: no client certificate; the server must present a chain
/// containing the CA with this SHA-256 fingerprint, and its certificate must verify against
/// that CA for the expected server name.
pub fn enroll_client_config(ca_fingerprint: [u8; 32], alpn: &[u8]) -> Result<ClientConfig, PkiError> {
    let verifier = PinnedCaVerifier { fingerprint: ca_fingerprint, provider: provider() };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The text an enrolling agent sees when the coordinator's CA is not the one its token pins.
pub const FINGERPRINT_MISMATCH: &str = "the coordinator's CA does not match the join token's CA fingerprint";

/// Trusts a server whose chain carries the CA pinned by fingerprint, then verifies the server
/// certificate against that CA as usual (name, validity, usage).
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| rustls::Error::General(FINGERPRINT_MISMATCH.into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The identity of a connection's peer, from the certificate chain TLS verified.
/// `None` if the peer presented no certificate.
pub fn peer_identity(chain: Option<&[CertificateDer<'static>]>) -> Option<Result<PeerIdentity, IdentityError>> {
    let leaf = chain?.first()?;
    Some(identity_of(leaf))
}
