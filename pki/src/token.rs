//! Join tokens: `bwt1_` + base64url(no padding) of a bincode-encoded [`JoinToken`].
//!
//! A token carries where the coordinator is, the SHA-256 fingerprint of the deployment CA (so
//! the enrolling agent can verify the coordinator before trusting anything it says) and a
//! 32-byte random secret. The coordinator stores only [`secret_hash`] of the secret.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "bwt1_";
const MAX_TOKEN_LEN: usize = 2048;

/// The contents of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// `HOST:PORT` the agent dials.
    pub addr: String,
    /// The TLS server name of the coordinator's certificate.
    pub server_name: String,
    /// SHA-256 of the CA certificate's DER.
    pub ca_fingerprint: [u8; 32],
    pub secret: [u8; 32],
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Bulwark join token (it should start with {PREFIX:?})")]
    Prefix,
    #[error("join token is malformed: {0}")]
    Malformed(String),
}

impl JoinToken {
    /// A token with a fresh random secret.
    pub fn new(addr: String, server_name: String, ca_fingerprint: [u8; 32]) -> Self {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self { addr, server_name, ca_fingerprint, secret }
    }

    /// The printable form.
    pub fn encode(&self) -> String {
        let cfg = bincode::config::standard();
        // Encoding a struct of strings and arrays into a Vec cannot fail.
        let bytes = bincode::serde::encode_to_vec(self, cfg).unwrap_or_default();
        format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the printable form.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let body = text.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        if body.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long".into()));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let cfg = bincode::config::standard().with_limit::<MAX_TOKEN_LEN>();
        let (token, used): (JoinToken, usize) =
            bincode::serde::decode_from_slice(&bytes, cfg).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(TokenError::Malformed("trailing bytes".into()));
        }
        Ok(token)
    }

    /// What the coordinator stores and looks the token up by.
    pub fn secret_hash(&self) -> [u8; 32] {
        secret_hash(&self.secret)
    }
}

/// BLAKE3 (derive-key mode) of a token secret.
pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("bulwark join token v1");
    h.update(secret);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_carry_fresh_secrets() {
        let a = JoinToken::new("127.0.0.1:7443".into(), "coord".into(), [3; 32]);
        let b = JoinToken::new("127.0.0.1:7443".into(), "coord".into(), [3; 32]);
        assert_ne!(a.secret, b.secret);
        assert_eq!(JoinToken::decode(&a.encode()), Ok(a));
    }

    #[test]
    fn garbage_is_not_a_token() {
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::Prefix));
        assert!(matches!(JoinToken::decode("bwt1_!!!"), Err(TokenError::Malformed(_))));
        assert!(matches!(JoinToken::decode("bwt1_AAAA"), Err(TokenError::Malformed(_))));
    }
}
