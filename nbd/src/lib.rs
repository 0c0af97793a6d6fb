//! The server side of the NBD protocol (the network block device protocol QEMU, qemu-img,
//! qemu-nbd and the Linux kernel's client speak): fixed newstyle negotiation with
//! `NBD_OPT_GO`/`NBD_OPT_INFO`/`NBD_OPT_EXPORT_NAME`/`NBD_OPT_LIST`/`NBD_OPT_ABORT`,
//! `NBD_OPT_STARTTLS` left to the caller (it owns the TLS stack), and transmission with simple
//! replies: read, write, write zeroes, flush, disconnect.
//!
//! What serves the bytes is an [`Export`]. Every length a client sends is bounded before
//! anything is allocated for it ([`wire`]): option payloads, the number of options, and each
//! request's length (advertised as the maximum block size).
//!
//! No crate on crates.io did this: `nbd` is synchronous and its API is a sketch, and
//! `tokio-nbd` has no STARTTLS (NBD's TLS must be negotiated inside the option phase) and no
//! bound on what a client may ask for.

pub mod wire;

use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wire::*;

/// What a client may read (and write, when writable).
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are taken.
    fn writable(&self) -> bool;
    /// The request size that serves best (a block of the recovery point).
    fn preferred_block(&self) -> u32 {
        4096
    }
    /// `len` bytes from `offset` (within the size: the server checked).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = std::io::Result<Vec<u8>>> + Send;
    /// Writes `data` at `offset` (within the size).
    fn write(&self, offset: u64, data: Vec<u8>) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Makes what was written durable as far as the export promises.
    fn flush(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client asked for export {0:?}, which is not served here")]
    UnknownExport(String),
    #[error("the client chose an export before starting TLS, which this server requires")]
    TlsRequired,
}

/// How the option phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The export was chosen: transmission follows.
    Go,
    /// The client asked for TLS and was told yes: the caller wraps the connection in TLS and
    /// calls [`Handshake::options`] again on it.
    StartTls,
    /// The client gave up (`NBD_OPT_ABORT`).
    Abort,
}

/// What the server allows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The export's name (a client asking for the default name `""` gets it too).
    pub name: String,
    /// The caller can start TLS (answer `NBD_OPT_STARTTLS` with yes).
    pub tls_offered: bool,
    /// Nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered before TLS.
    pub tls_required: bool,
}

/// The state of one connection's negotiation.
#[derive(Debug)]
pub struct Handshake {
    no_zeroes: bool,
    tls_started: bool,
    options: usize,
}

/// Sends the greeting and reads the client's flags.
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Handshake, NbdError> {
    s.write_all(&greeting()).await?;
    s.flush().await?;
    let flags = s.read_u32().await?;
    let no_zeroes = client_flags(flags)?;
    Ok(Handshake { no_zeroes, tls_started: false, options: 0 })
}

impl Handshake {
    /// The connection now runs inside TLS.
    pub fn tls_started(&mut self) {
        self.tls_started = true;
    }

    /// Answers options until the client chooses the export, asks for TLS or gives up.
    pub async fn options<S: AsyncRead + AsyncWrite + Unpin, E: Export>(
        &mut self,
        s: &mut S,
        export: &E,
        policy: &Policy,
    ) -> Result<Choice, NbdError> {
        let flags = transmission_flags(export);
        let locked = policy.tls_required && !self.tls_started;
        loop {
            self.options += 1;
            if self.options > MAX_OPTIONS {
                return Err(WireError::TooManyOptions.into());
            }
            let mut h = [0u8; 16];
            s.read_exact(&mut h).await?;
            let (option, len) = option_header(&h)?;
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            let reply = |kind: u32, d: &[u8]| option_reply(option, kind, d);
            match option {
                OPT_EXPORT_NAME => {
                    // No error reply exists for this option: a refusal closes the connection.
                    if locked {
                        return Err(NbdError::TlsRequired);
                    }
                    let name = String::from_utf8_lossy(&data).into_owned();
                    if !(name.is_empty() || name == policy.name) {
                        return Err(NbdError::UnknownExport(name));
                    }
                    let mut r = Vec::with_capacity(10 + 124);
                    r.extend_from_slice(&export.size().to_be_bytes());
                    r.extend_from_slice(&flags.to_be_bytes());
                    if !self.no_zeroes {
                        r.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&r).await?;
                    s.flush().await?;
                    return Ok(Choice::Go);
                }
                OPT_ABORT => {
                    // The client may already be gone: the acknowledgement is a courtesy.
                    let _ = s.write_all(&reply(REP_ACK, &[])).await;
                    let _ = s.flush().await;
                    return Ok(Choice::Abort);
                }
                OPT_STARTTLS => {
                    let kind = if !policy.tls_offered {
                        REP_ERR_UNSUP
                    } else if self.tls_started || !data.is_empty() {
                        REP_ERR_INVALID
                    } else {
                        REP_ACK
                    };
                    s.write_all(&reply(kind, &[])).await?;
                    s.flush().await?;
                    if kind == REP_ACK {
                        return Ok(Choice::StartTls);
                    }
                }
                _ if locked => {
                    s.write_all(&reply(REP_ERR_TLS_REQD, &[])).await?;
                    s.flush().await?;
                }
                OPT_LIST => {
                    let mut d = Vec::with_capacity(4 + policy.name.len());
                    d.extend_from_slice(&(policy.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(policy.name.as_bytes());
                    let mut out = if data.is_empty() { reply(REP_SERVER, &d) } else { reply(REP_ERR_INVALID, &[]) };
                    if data.is_empty() {
                        out.extend_from_slice(&reply(REP_ACK, &[]));
                    }
                    s.write_all(&out).await?;
                    s.flush().await?;
                }
                OPT_INFO | OPT_GO => {
                    let out = match go_export_name(&data) {
                        None => reply(REP_ERR_INVALID, &[]),
                        Some(name) if !(name.is_empty() || name == policy.name.as_bytes()) => {
                            reply(REP_ERR_UNKNOWN, &[])
                        }
                        Some(_) => {
                            let mut out = reply(REP_INFO, &info_export(export.size(), flags));
                            out.extend_from_slice(&reply(REP_INFO, &info_block_size(export.preferred_block())));
                            out.extend_from_slice(&reply(REP_ACK, &[]));
                            if option == OPT_GO {
                                s.write_all(&out).await?;
                                s.flush().await?;
                                return Ok(Choice::Go);
                            }
                            out
                        }
                    };
                    s.write_all(&out).await?;
                    s.flush().await?;
                }
                _ => {
                    // Structured replies, meta contexts, extended headers…: not spoken.
                    s.write_all(&reply(REP_ERR_UNSUP, &[])).await?;
                    s.flush().await?;
                }
            }
        }
    }
}

fn transmission_flags<E: Export>(export: &E) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
    if export.writable() {
        // No FUA: the exports promise nothing per write beyond what flush promises.
        f |= TFLAG_SEND_WRITE_ZEROES;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    f
}

/// Serves requests until the client disconnects. Requests are answered one after the other.
/// An error of the export is the request's error (`EIO`), never the connection's.
pub async fn transmit<S: AsyncRead + AsyncWrite + Unpin, E: Export>(s: &mut S, export: &E) -> Result<(), NbdError> {
    let size = export.size();
    loop {
        let mut h = [0u8; 28];
        match s.read_exact(&mut h).await {
            Ok(_) => {}
            // A client that just goes away has disconnected.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let r = request(&h)?;
        let within = r.offset.checked_add(u64::from(r.len)).is_some_and(|end| end <= size);
        match r.command {
            CMD_READ => {
                if !within || r.len > MAX_REQUEST_LEN {
                    s.write_all(&simple_reply(r.cookie, EINVAL)).await?;
                } else {
                    match export.read(r.offset, r.len).await {
                        Ok(data) if data.len() == r.len as usize => {
                            s.write_all(&simple_reply(r.cookie, 0)).await?;
                            s.write_all(&data).await?;
                        }
                        Ok(data) => {
                            tracing::error!(offset = r.offset, want = r.len, got = data.len(), "export read short");
                            s.write_all(&simple_reply(r.cookie, EIO)).await?;
                        }
                        Err(e) => {
                            tracing::warn!(offset = r.offset, len = r.len, error = %e, "export read failed");
                            s.write_all(&simple_reply(r.cookie, EIO)).await?;
                        }
                    }
                }
            }
            CMD_WRITE => {
                let mut data = vec![0u8; r.len as usize];
                s.read_exact(&mut data).await?;
                let error = if !export.writable() {
                    EPERM
                } else if !within {
                    ENOSPC
                } else {
                    io_errno(export.write(r.offset, data).await)
                };
                s.write_all(&simple_reply(r.cookie, error)).await?;
            }
            CMD_WRITE_ZEROES => {
                let error = if !export.writable() {
                    EPERM
                } else if !within {
                    ENOSPC
                } else {
                    let mut error = 0;
                    let (mut at, end) = (r.offset, r.offset + u64::from(r.len));
                    while at < end && error == 0 {
                        let n = (end - at).min(1 << 20);
                        error = io_errno(export.write(at, vec![0u8; n as usize]).await);
                        at += n;
                    }
                    error
                };
                s.write_all(&simple_reply(r.cookie, error)).await?;
            }
            CMD_FLUSH => {
                let error = io_errno(export.flush().await);
                s.write_all(&simple_reply(r.cookie, error)).await?;
            }
            CMD_DISC => {
                s.flush().await?;
                return Ok(());
            }
            _ => s.write_all(&simple_reply(r.cookie, EINVAL)).await?,
        }
        s.flush().await?;
    }
}

fn io_errno(r: std::io::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) if e.raw_os_error() == Some(28) => ENOSPC,
        Err(e) => {
            tracing::warn!(error = %e, "export write failed");
            EIO
        }
    }
}

/// A whole connection without TLS: greeting, options, transmission.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin, E: Export>(
    s: &mut S,
    export: &E,
    policy: &Policy,
) -> Result<(), NbdError> {
    let mut h = greet(s).await?;
    match h.options(s, export, policy).await? {
        Choice::Go => transmit(s, export).await,
        Choice::Abort => Ok(()),
        // Only offered when the caller can start TLS: it uses greet/options itself.
        Choice::StartTls => Err(NbdError::TlsRequired),
    }
}
