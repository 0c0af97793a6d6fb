//! The client side of the admin API: connect with the admin certificate, one request per
//! stream. Used by the `bulwark` console and by `token create` while the coordinator runs.

use crate::config::{CoordinatorConfig, DataDir};
use bulwark_pki::{quic, tls};
use bulwark_protocol::frame;
use bulwark_protocol::messages::{AdminEnvelope, AdminRequest, AdminResponse};
use bulwark_protocol::paging::{Page, PageRequest};
use bulwark_protocol::{ALPN, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("the coordinator of {0} is not running (no coordinator.addr); start `bulwark-coordinator serve`")]
    NotRunning(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pki(#[from] bulwark_pki::PkiError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("admin request failed: {0}")]
    Request(String),
    #[error("the coordinator refused: {0}")]
    Refused(String),
}

/// Where the coordinator is and the admin credentials to use.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    pub addr: SocketAddr,
    pub server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn read(path: &Path) -> Result<String, AdminClientError> {
    std::fs::read_to_string(path).map_err(|source| AdminClientError::Read { path: path.to_owned(), source })
}

impl AdminTarget {
    /// Everything from a coordinator's data directory.
    pub fn from_data_dir(root: &Path) -> Result<Self, AdminClientError> {
        let dir = DataDir::new(root);
        let config = CoordinatorConfig::load(&dir)?;
        let addr_text = match std::fs::read_to_string(dir.addr_file()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AdminClientError::NotRunning(root.to_owned()))
            }
            Err(source) => return Err(AdminClientError::Read { path: dir.addr_file(), source }),
        };
        let addr = addr_text
            .trim()
            .parse()
            .map_err(|e| AdminClientError::Invalid(format!("{}: {e}", dir.addr_file().display())))?;
        Ok(Self {
            addr,
            server_name: config.name,
            ca_pem: read(&dir.pki_file("ca.pem"))?,
            cert_pem: read(&dir.pki_file("admin.pem"))?,
            key_pem: read(&dir.pki_file("admin.key"))?,
        })
    }

    /// From explicit files.
    pub fn from_files(
        addr: SocketAddr,
        server_name: String,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, AdminClientError> {
        Ok(Self { addr, server_name, ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }
}

/// A connected admin client.
pub struct AdminClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").field("remote", &self.conn.remote_address()).finish()
    }
}

impl AdminClient {
    /// Connects to the coordinator with the admin certificate.
    pub async fn connect(target: &AdminTarget) -> Result<Self, AdminClientError> {
        let ca = tls::certs_from_pem(&target.ca_pem, "CA certificate")?;
        let ca = ca.into_iter().next().ok_or(AdminClientError::Invalid("empty CA file".into()))?;
        let chain = tls::certs_from_pem(&target.cert_pem, "admin certificate")?;
        let key = tls::key_from_pem(&target.key_pem, "admin key")?;
        let cfg = quic::client(tls::client_config(&ca, chain, key, ALPN)?)?;
        let connect_err = |reason: String| AdminClientError::Connect { addr: target.addr, reason };
        let mut endpoint =
            quinn::Endpoint::client(quic::client_bind_addr(target.addr)).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(cfg);
        let connecting = endpoint.connect(target.addr, &target.server_name).map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
            .await
            .map_err(|_| connect_err("no answer within 10 s".into()))?
            .map_err(|e| connect_err(quic::explain(&e)))?;
        Ok(Self { endpoint, conn })
    }

    /// Opens a request stream and sends the request (the sending half stays open).
    async fn send_request(
        &self,
        request: AdminRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), AdminClientError> {
        let explain = |e: quinn::ConnectionError| AdminClientError::Request(quic::explain(&e));
        let (mut send, recv) = self.conn.open_bi().await.map_err(explain)?;
        let env = AdminEnvelope { version: PROTOCOL_VERSION, request };
        frame::write_message(&mut send, &env).await.map_err(|e| self.frame_error(e))?;
        Ok((send, recv))
    }

    /// Reads one answer; an `Error` answer becomes `Refused`.
    async fn read_answer(&self, recv: &mut quinn::RecvStream) -> Result<AdminResponse, AdminClientError> {
        match frame::read_message::<AdminResponse, _>(recv).await {
            Ok(Some(AdminResponse::Error { message })) => Err(AdminClientError::Refused(message)),
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.closed_reason("the coordinator closed the stream without answering")),
            Err(e) => Err(self.frame_error(e)),
        }
    }

    /// Sends one request and waits for its answer. An `Error` answer becomes `Refused`.
    pub async fn request(&self, request: AdminRequest) -> Result<AdminResponse, AdminClientError> {
        self.request_stream(request).await.map(|(r, _)| r)
    }

    /// Every item of a paged list, for callers that want it whole (small lists: the console
    /// itself streams pages): `make` builds the request of one page, `take` finds the page in
    /// its answer.
    pub async fn list_all<T>(
        &self,
        make: impl Fn(PageRequest) -> AdminRequest,
        take: impl Fn(AdminResponse) -> Option<Page<T>>,
    ) -> Result<Vec<T>, AdminClientError> {
        let mut req = PageRequest::first();
        let mut all = vec![];
        loop {
            let page = take(self.request(make(req.clone())).await?)
                .ok_or_else(|| AdminClientError::Invalid("unexpected answer to a list request".into()))?;
            all.extend(page.items);
            match page.next {
                Some(next) => req = req.after(next),
                None => return Ok(all),
            }
        }
    }

    /// Sends a request whose answer is followed by a stream of transfer frames (recover-disk):
    /// answers the first response and the stream to read the rest from.
    pub async fn request_stream(
        &self,
        request: AdminRequest,
    ) -> Result<(AdminResponse, quinn::RecvStream), AdminClientError> {
        let (mut send, mut recv) = self.send_request(request).await?;
        let _ = send.finish();
        Ok((self.read_answer(&mut recv).await?, recv))
    }

    /// Sends a request that uploads after its first answer (seed import): answers that
    /// answer and both halves of the stream.
    pub async fn request_upload(
        &self,
        request: AdminRequest,
    ) -> Result<(AdminResponse, quinn::SendStream, quinn::RecvStream), AdminClientError> {
        let (send, mut recv) = self.send_request(request).await?;
        Ok((self.read_answer(&mut recv).await?, send, recv))
    }

    /// Reads the final answer of an upload.
    pub async fn finish_upload(&self, mut recv: quinn::RecvStream) -> Result<AdminResponse, AdminClientError> {
        self.read_answer(&mut recv).await
    }

    fn frame_error(&self, e: frame::FrameError) -> AdminClientError {
        self.closed_reason(&e.to_string())
    }

    fn closed_reason(&self, fallback: &str) -> AdminClientError {
        match self.conn.close_reason() {
            Some(reason) => AdminClientError::Request(quic::explain(&reason)),
            None => AdminClientError::Request(fallback.to_owned()),
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(quic::close::DONE.into(), b"done");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Receives the blocks of a disk stream (after a [`AdminResponse::DiskStream`] answer) into
/// `file`, which must already have the disk's size (zero blocks stay holes, or are written
/// with `write_zeros`, for a device that holds older data). Every block's
/// place is checked against the disk's size; the stream must end with the coordinator's
/// `End` naming exactly the blocks that arrived. Returns the number of blocks.
pub async fn receive_disk(
    recv: &mut quinn::RecvStream,
    size_bytes: u64,
    block_size: u32,
    file: &std::fs::File,
    write_zeros: bool,
) -> Result<u64, AdminClientError> {
    use bulwark_protocol::transfer::{self, TransferFrame, TransferMessage};
    use std::os::unix::fs::FileExt;
    bulwark_protocol::block::check_block_size(block_size as usize)
        .map_err(|e| AdminClientError::Invalid(format!("the disk stream's block size: {e}")))?;
    let bs = u64::from(block_size);
    let zeros = if write_zeros { vec![0u8; block_size as usize] } else { vec![] };
    let mut blocks = 0u64;
    loop {
        let frame = transfer::read(recv, block_size as usize)
            .await
            .map_err(|e| AdminClientError::Request(format!("the disk stream broke off: {e}")))?;
        match frame {
            Some(TransferFrame::Block { index, data, .. }) => {
                let at = index
                    .checked_mul(bs)
                    .filter(|&o| o.checked_add(data.len() as u64).is_some_and(|end| end <= size_bytes))
                    .ok_or_else(|| {
                        AdminClientError::Invalid(format!("block {index} lies outside the {size_bytes}-byte disk"))
                    })?;
                file.write_all_at(&data, at)
                    .map_err(|e| AdminClientError::Request(format!("cannot write the disk: {e}")))?;
                blocks += 1;
            }
            // A new file is sparse; a device holds old data, so its zero blocks are written.
            Some(TransferFrame::Zero { index }) => {
                let at = index.checked_mul(bs).filter(|&o| o < size_bytes).ok_or_else(|| {
                    AdminClientError::Invalid(format!("block {index} lies outside the {size_bytes}-byte disk"))
                })?;
                if write_zeros {
                    let len = bs.min(size_bytes - at) as usize;
                    file.write_all_at(zeros.get(..len).unwrap_or_default(), at)
                        .map_err(|e| AdminClientError::Request(format!("cannot write the disk: {e}")))?;
                }
                blocks += 1;
            }
            Some(TransferFrame::Message(TransferMessage::End { blocks_sent, .. })) if blocks_sent == blocks => {
                return Ok(blocks)
            }
            Some(TransferFrame::Message(TransferMessage::Failed { reason })) => {
                return Err(AdminClientError::Refused(format!("the coordinator could not read the disk: {reason}")))
            }
            other => return Err(AdminClientError::Invalid(format!("unexpected frame in the disk stream: {other:?}"))),
        }
    }
}
