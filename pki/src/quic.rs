//! QUIC settings shared by every Bulwark endpoint, and the meaning of connection close codes.
//!
//! Limits here are what keep a hostile or broken peer from growing our memory: few concurrent
//! streams, bounded flow-control windows, an idle timeout that notices a dead peer.

use crate::ca::PkiError;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::sync::Arc;
use std::time::Duration;

/// How often an idle connection is pinged.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Application close codes: why one side closed the connection.
pub mod close {
    /// Normal shutdown.
    pub const DONE: u32 = 0;
    /// The peer broke the protocol (malformed or oversized frame, unexpected stream).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The coordinator refused the peer's hello (version, identity).
    pub const REFUSED: u32 = 2;
    /// The peer's certificate was revoked.
    pub const REVOKED: u32 = 3;
    /// The protocol needs a client certificate and none was presented.
    pub const CERT_REQUIRED: u32 = 4;
    /// A newer connection of the same host replaced this one.
    pub const REPLACED: u32 = 5;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 6;
    /// The peer did not say hello in time.
    pub const TIMEOUT: u32 = 7;
}

fn transport(max_bidi: u32, max_uni: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_bidi.into());
    t.max_concurrent_uni_streams(max_uni.into());
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s always fits a VarInt.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    Arc::new(t)
}

/// A quinn server config from a rustls one.
pub fn server(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, PkiError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(16, 16));
    Ok(cfg)
}

/// A quinn client config from a rustls one.
pub fn client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, PkiError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(16, 4));
    Ok(cfg)
}

/// A bind address of the same family as `peer`, any port.
pub fn client_bind_addr(peer: std::net::SocketAddr) -> std::net::SocketAddr {
    match peer {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn alert_text(alert: u8) -> Option<&'static str> {
    Some(match alert {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired",
        46 => "certificate unknown",
        48 => "unknown CA (certificate not issued by this deployment's CA)",
        116 => "certificate required",
        120 => "no application protocol in common",
        _ => return None,
    })
}

/// Turns a connection error into words an operator understands. Under TLS 1.3 a refused
/// client certificate surfaces only here, after `connect()` looked successful.
pub fn explain(err: &quinn::ConnectionError) -> String {
    match err {
        quinn::ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            let reason = String::from_utf8_lossy(&c.reason);
            if (0x100..0x200).contains(&code) {
                let alert = (code - 0x100) as u8;
                match alert_text(alert) {
                    Some(t) => format!("refused by the coordinator: {t}"),
                    None => format!("TLS handshake failed (alert {alert}): {reason}"),
                }
            } else {
                format!("connection closed by peer: {reason} (code {code:#x})")
            }
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = u64::from(c.error_code);
            let reason = String::from_utf8_lossy(&c.reason);
            let what = match u32::try_from(code).unwrap_or(u32::MAX) {
                close::REVOKED => "refused by the coordinator: certificate revoked",
                close::CERT_REQUIRED => "refused by the coordinator: a client certificate is required",
                close::REFUSED => "refused by the coordinator",
                close::PROTOCOL_VIOLATION => "closed for a protocol violation",
                close::REPLACED => "replaced by a newer connection of the same host",
                close::SHUTDOWN => "the peer is shutting down",
                close::TIMEOUT => "closed: no hello in time",
                _ => "closed by peer",
            };
            if reason.is_empty() {
                what.to_owned()
            } else {
                format!("{what}: {reason}")
            }
        }
        quinn::ConnectionError::TimedOut => "no answer from the peer (timed out)".to_owned(),
        quinn::ConnectionError::TransportError(e) => format!("TLS/QUIC error: {e}"),
        other => other.to_string(),
    }
}
