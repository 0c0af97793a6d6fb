//! Bulwark's PKI: one private CA per deployment, and everything that makes and checks
//! certificates with it.
//!
//! Owns: creating the CA, issuing the coordinator's, the admin's and (from CSRs) the agents'
//! certificates with fields the CA chooses (never the ones a CSR asks for), join tokens, the
//! certificate revocation list, reading a peer's identity out of its certificate, and building
//! the rustls configurations for mutual TLS. Never opens a socket and never touches the catalog:
//! callers persist what it returns.
//!
//! Modules in reading order:
//! - [`files`]: durable, permission-aware file writes (temp → fsync → rename → fsync dir).
//! - [`ca`]: the CA, issuance and the CRL.
//! - [`identity`]: who a certificate says its holder is (role, name, serial).
//! - [`token`]: one-time join tokens.
//! - [`tls`]: rustls client/server configurations on the ring provider.
//! - [`quic`]: quinn endpoint settings (stream and window limits) and close codes.

#![forbid(unsafe_code)]

pub mod ca;
pub mod files;
pub mod identity;
pub mod quic;
pub mod tls;
pub mod token;

pub use ca::{AgentCsr, Ca, IssuedCert, PkiError};
pub use identity::{PeerIdentity, Role};
pub use token::JoinToken;
