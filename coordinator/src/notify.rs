//! E-mail when a recovery finishes (`--notify ADDR`), through the SMTP server of `[smtp]` in
//! `coordinator.toml`. Sending happens after the job is recorded and never changes its
//! outcome: a mail that cannot be sent is logged with the reason. Credentials never cross the
//! network in cleartext: with `tls = "none"` and a username and password, nothing is sent
//! unless `allow_plaintext_auth` says so ([`SmtpConfig::check`]), and the refusal is the reason.

use crate::config::{SmtpConfig, SmtpConfigError, SmtpTls};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Why a notification was not sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("no [smtp] server is configured in coordinator.toml")]
    NotConfigured,
    #[error("address {0:?}: {1}")]
    Address(String, String),
    #[error("building the message: {0}")]
    Message(String),
    #[error("SMTP server {server}: {reason}")]
    Smtp { server: String, reason: String },
    #[error(transparent)]
    Config(#[from] SmtpConfigError),
}

/// Sends one plain-text message.
pub async fn send(smtp: Option<&SmtpConfig>, to: &str, subject: &str, body: String) -> Result<(), NotifyError> {
    let smtp = smtp.ok_or(NotifyError::NotConfigured)?;
    // Before anything else: a refused configuration never opens a connection.
    let tls = smtp.check()?;
    let from = smtp
        .from
        .parse()
        .map_err(|e: lettre::address::AddressError| NotifyError::Address(smtp.from.clone(), e.to_string()))?;
    let to_box =
        to.parse().map_err(|e: lettre::address::AddressError| NotifyError::Address(to.to_owned(), e.to_string()))?;
    let msg = Message::builder()
        .from(from)
        .to(to_box)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| NotifyError::Message(e.to_string()))?;
    let server = format!("{}:{}", smtp.server, smtp.port);
    let smtp_err = |reason: String| NotifyError::Smtp { server: server.clone(), reason };
    let mut builder = match tls {
        SmtpTls::Tls => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.server).map_err(|e| smtp_err(e.to_string()))?
        }
        SmtpTls::StartTls => {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.server).map_err(|e| smtp_err(e.to_string()))?
        }
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.server),
    }
    .port(smtp.port)
    .timeout(Some(std::time::Duration::from_secs(30)));
    if let (Some(u), Some(p)) = (&smtp.username, &smtp.password) {
        builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
    }
    builder.build().send(msg).await.map_err(|e| smtp_err(e.to_string()))?;
    Ok(())
}
