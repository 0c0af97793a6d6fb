//! `bulwark mount VM --rp ID --nbd unix:PATH|tcp:HOST:PORT [--writable]`: a disk of a recovery
//! point as an NBD export on this machine, read from the coordinator block by block as clients
//! ask. Over TCP the export is served only inside TLS (NBD's STARTTLS) with a server
//! certificate the coordinator signs for HOST, and read only by the enrolled hosts named with
//! `--allow-host` (their agent certificates, checked against the CA and its CRL).
//!
//! The reading and the overlay are [`bulwark_agent::export`]'s (an agent serves an instant
//! recovery's disks the same way).

use anyhow::Context as _;
use bulwark_agent::export::{Link, Overlay, RemoteDisk};
use bulwark_coordinator::admin_client::{AdminClient, AdminTarget};
use bulwark_protocol::messages::{AdminRequest, AdminResponse};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the export is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    /// Over TCP, always inside TLS (NBD's STARTTLS) with a certificate of the deployment.
    Tcp {
        host: String,
        port: u16,
    },
}

impl NbdAddress {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            anyhow::ensure!(!path.is_empty(), "--nbd unix:PATH needs a path");
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let (host, port) =
                addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--nbd tcp:HOST:PORT, not {s:?}"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            anyhow::ensure!(!host.is_empty(), "--nbd tcp:HOST:PORT needs a host");
            let port = port.parse().map_err(|_| anyhow::anyhow!("--nbd tcp:HOST:PORT: {port:?} is not a port"))?;
            return Ok(Self::Tcp { host: host.to_owned(), port });
        }
        anyhow::bail!("--nbd takes unix:PATH or tcp:HOST:PORT, not {s:?}")
    }

    /// How a client reaches the export (qemu-img's syntax).
    pub fn client_hint(&self, name: &str) -> String {
        match self {
            Self::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Self::Tcp { host, port } => format!(
                "--object tls-creds-x509,id=tls0,dir=CREDS,endpoint=client --image-opts \
                 driver=nbd,host={host},port={port},export={name},tls-creds=tls0 \
                 (CREDS holds ca-cert.pem and an allowed host's client-cert.pem and client-key.pem)"
            ),
        }
    }
}

/// What `bulwark mount` was asked for.
pub struct MountArgs {
    pub vm: String,
    pub rp: String,
    pub disk: Option<String>,
    pub nbd: NbdAddress,
    pub writable: bool,
    pub overlay_dir: Option<PathBuf>,
    /// Over TCP: the hosts whose certificates may read the export.
    pub allow_hosts: Vec<String>,
}

/// Serves the export until SIGINT or SIGTERM, or until the coordinator goes away.
pub fn run(target: &AdminTarget, args: MountArgs) -> anyhow::Result<()> {
    match &args.nbd {
        NbdAddress::Unix(path) => {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                let kind = if m.file_type().is_symlink() {
                    "link"
                } else if m.is_dir() {
                    "directory"
                } else {
                    "file or socket"
                };
                anyhow::bail!(
                    "{} already exists (a {kind}): mount never replaces anything; remove it or choose another path",
                    path.display()
                );
            }
        }
        NbdAddress::Tcp { .. } => anyhow::ensure!(
            !args.allow_hosts.is_empty(),
            "--nbd tcp: needs --allow-host HOST: the enrolled host whose certificate may read the export"
        ),
    }
    // A long-running server: what happens to its clients goes to stderr like a daemon's log.
    bulwark_coordinator::cli::init_logging(bulwark_coordinator::cli::LogFormat::Human);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let mut interrupted = crate::disk_output::Interrupted::catch()?;
        let client = AdminClient::connect(target).await?;
        let req = AdminRequest::Mount { vm: args.vm.clone(), rp: args.rp.clone(), disk: args.disk.clone() };
        let (head, send, recv) = client.request_upload(req).await?;
        let AdminResponse::DiskStream { rp, disk, size_bytes, block_size } = head else {
            anyhow::bail!("unexpected answer: {head:?}");
        };
        let overlay = match args.writable {
            true => {
                let dir = args.overlay_dir.clone().unwrap_or_else(std::env::temp_dir);
                Some(Overlay::create(&dir, size_bytes, block_size)?)
            }
            false => None,
        };
        let export = Arc::new(RemoteDisk::new(
            Link::new(Box::new(send), Box::new(recv), size_bytes, block_size, None)?,
            overlay,
        ));
        let mut _socket = None;
        let listener = match &args.nbd {
            NbdAddress::Unix(path) => {
                let l = bind_private(path)?;
                _socket = Some(RemoveOnDrop(path.clone()));
                Listener::Unix(l)
            }
            NbdAddress::Tcp { host, port } => {
                let acceptor = tls_acceptor(&client, host).await?;
                let l = tokio::net::TcpListener::bind((host.as_str(), *port))
                    .await
                    .with_context(|| format!("cannot listen on {host}:{port}"))?;
                Listener::Tcp(l, acceptor, Arc::new(args.allow_hosts.clone()))
            }
        };
        let tls = matches!(listener, Listener::Tcp(..));
        let policy = bulwark_nbd::Policy { name: disk.clone(), tls_offered: tls, tls_required: tls };
        println!(
            "serving disk {disk} of recovery point {rp} of {} ({size_bytes} bytes, {}) as export {disk:?}",
            args.vm,
            if args.writable { "writes kept in a throw-away overlay" } else { "read-only" },
        );
        println!("clients: {}", args.nbd.client_hint(&disk));
        println!("stop with Ctrl-C");
        let ended: anyhow::Result<()> = tokio::select! {
            r = listener.serve(export, policy) => r,
            sig = interrupted.next() => {
                println!("{sig}: the mount ends");
                Ok(())
            }
        };
        client.close().await;
        ended
    })
}

/// Has the coordinator sign a server certificate for `host` (a key made here, never sent).
async fn tls_acceptor(client: &AdminClient, host: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use bulwark_pki::tls;
    let (key_pem, csr_pem) = bulwark_pki::ca::key_and_csr(host)?;
    let answer = client.request(AdminRequest::ExportCert { csr_pem, names: vec![host.to_owned()] }).await?;
    let AdminResponse::ExportCert { cert_pem, ca_pem, crl_pem, .. } = answer else {
        anyhow::bail!("unexpected answer to the export certificate request: {answer:?}");
    };
    let ca = tls::certs_from_pem(&ca_pem, "deployment CA")?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the coordinator sent no CA certificate"))?;
    let mut chain = tls::certs_from_pem(&cert_pem, "export certificate")?;
    chain.push(ca.clone());
    let key = tls::key_from_pem(&key_pem, "export key")?;
    let config = tls::export_server_config(&ca, chain, key, tls::crl_from_pem(&crl_pem)?)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener, tokio_rustls::TlsAcceptor, Arc<Vec<String>>),
}

impl Listener {
    /// Accepts clients until an accept fails; each is served on a task of its own.
    async fn serve(self, export: Arc<RemoteDisk>, policy: bulwark_nbd::Policy) -> anyhow::Result<()> {
        loop {
            let (export, policy) = (export.clone(), policy.clone());
            match &self {
                Listener::Unix(l) => {
                    let (mut s, _) = l.accept().await.context("cannot accept an NBD client")?;
                    tokio::spawn(async move {
                        if let Err(e) = bulwark_nbd::serve(&mut s, &*export, &policy).await {
                            tracing::warn!(error = %e, "an NBD client was dropped");
                        }
                    });
                }
                Listener::Tcp(l, acceptor, allowed) => {
                    let (s, peer) = l.accept().await.context("cannot accept an NBD client")?;
                    let (acceptor, allowed) = (acceptor.clone(), allowed.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve_tls(s, acceptor, &allowed, &export, &policy).await {
                            tracing::warn!(%peer, error = %e, "an NBD client was dropped");
                        }
                    });
                }
            }
        }
    }
}

/// One TCP client: options until it starts TLS, the handshake, its certificate checked
/// against the allowed hosts, then options and transmission inside TLS.
async fn serve_tls(
    mut s: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    allowed: &[String],
    export: &RemoteDisk,
    policy: &bulwark_nbd::Policy,
) -> anyhow::Result<()> {
    use bulwark_nbd::Choice;
    let mut h = bulwark_nbd::greet(&mut s).await?;
    match h.options(&mut s, export, policy).await? {
        Choice::StartTls => {}
        Choice::Abort => return Ok(()),
        Choice::Go => anyhow::bail!("the client chose the export without TLS"),
    }
    let mut tls = acceptor.accept(s).await.context("TLS handshake")?;
    let who = bulwark_pki::tls::peer_identity(tls.get_ref().1.peer_certificates())
        .ok_or_else(|| anyhow::anyhow!("no client certificate"))?
        .map_err(|e| anyhow::anyhow!("the client certificate: {e}"))?;
    if !(who.role == bulwark_pki::identity::Role::Agent && allowed.contains(&who.name)) {
        anyhow::bail!("{:?} {} is not allowed to read this export (--allow-host)", who.role, who.name);
    }
    tracing::info!(host = %who.name, "an NBD client is reading over TLS");
    h.tls_started();
    match h.options(&mut tls, export, policy).await? {
        Choice::Go => bulwark_nbd::transmit(&mut tls, export).await?,
        Choice::Abort => {}
        Choice::StartTls => anyhow::bail!("the client asked for TLS twice"),
    }
    use tokio::io::AsyncWriteExt as _;
    let _ = tls.shutdown().await;
    Ok(())
}

/// A new private socket at `path` (never replacing anything).
fn bind_private(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    Ok(bulwark_agent::export::bind_private(path)?)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
