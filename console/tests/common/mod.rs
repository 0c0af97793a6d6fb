//! Test harness: real `bulwark` processes (the multi-call binary runs the coordinator and the
//! agents), real QUIC on loopback, real certificates from a real `init`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_pki::{quic, tls};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bulwark"))
}

/// Runs `bulwark ARGS` to completion.
pub fn bulwark(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("RUST_LOG", "info").output().expect("run bulwark")
}

/// Runs and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = bulwark(args);
    assert!(out.status.success(), "bulwark {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A child process that is killed when dropped, with its stderr in a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(args: &[&str], log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn daemon");
        Daemon { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_until(&format!("log line containing {needle:?}"), Duration::from_secs(20), || {
            self.log_text().contains(needle)
        });
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        let rc = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
        assert!(rc.success());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator, initialized and serving in `root/coord`.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub coordinator: Daemon,
    pub agents: Vec<Daemon>,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(|_| {})
    }

    /// Initializes the coordinator, lets `prepare` work on its data directory, then serves.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> Cluster {
        Self::start_as("coord1", prepare)
    }

    /// A coordinator named `name` (several in one test: each its own deployment).
    pub fn start_as(name: &str, prepare: impl FnOnce(&Path)) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("coord");
        ok(&["x-coordinator", "init", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--name", name]);
        prepare(&dir);
        let coordinator = Daemon::spawn(
            &["x-coordinator", "serve", "--data-dir", dir.to_str().unwrap()],
            root.path().join("coord.log"),
        );
        wait_until("coordinator.addr", Duration::from_secs(20), || dir.join("coordinator.addr").exists());
        Cluster { root, coordinator, agents: vec![] }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join("coord")
    }

    pub fn dir_str(&self) -> String {
        self.dir().to_str().unwrap().to_owned()
    }

    pub fn token(&self, extra: &[&str]) -> String {
        let dir = self.dir_str();
        let mut args = vec!["x-coordinator", "token", "create", "--data-dir", &dir];
        args.extend_from_slice(extra);
        ok(&args).trim().to_owned()
    }

    pub fn agent_dir(&self, host: &str) -> PathBuf {
        self.root.path().join(format!("agent-{host}"))
    }

    /// The cluster [`Cluster::enroll`] puts every host in (VMs migrate between them).
    pub const CLUSTER: &'static str = "cluster1";

    /// Enrolls `host` with a fresh token for it, in [`Cluster::CLUSTER`].
    pub fn enroll(&self, host: &str) -> PathBuf {
        let token = self.token(&["--host", host, "--cluster", Self::CLUSTER]);
        let dir = self.agent_dir(host);
        ok(&["x-agent", "enroll", "--data-dir", dir.to_str().unwrap(), "--token", &token, "--host", host]);
        dir
    }

    /// Starts `bulwark-agent run` for an enrolled host; returns its index in `agents`.
    pub fn run_agent(&mut self, host: &str) -> usize {
        let dir = self.agent_dir(host);
        let log = self.root.path().join(format!("agent-{host}.log"));
        self.agents.push(Daemon::spawn(&["x-agent", "run", "--data-dir", dir.to_str().unwrap()], log));
        self.agents.len() - 1
    }

    /// Starts an agent with extra `run` arguments (`--qemu-vm-dir DIR`, say).
    pub fn run_agent_with(&mut self, host: &str, extra: &[&str]) -> usize {
        let dir = self.agent_dir(host);
        let log = self.root.path().join(format!("agent-{host}.log"));
        let mut args = vec!["x-agent", "run", "--data-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.agents.push(Daemon::spawn(&args, log));
        self.agents.len() - 1
    }

    /// Starts an agent on a sim storage root.
    pub fn run_sim_agent(&mut self, host: &str, root: &Path) -> usize {
        let dir = self.agent_dir(host);
        let log = self.root.path().join(format!("agent-{host}.log"));
        let args = ["x-agent", "run", "--data-dir", dir.to_str().unwrap(), "--sim-root", root.to_str().unwrap()];
        self.agents.push(Daemon::spawn(&args, log));
        self.agents.len() - 1
    }

    /// `bulwark --data-dir DIR ARGS --output json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let dir = self.dir_str();
        let mut all = vec!["--data-dir", dir.as_str()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--output", "json"]);
        serde_json::from_str(&ok(&all)).unwrap()
    }

    /// `bulwark --data-dir DIR ARGS` (any outcome).
    pub fn run(&self, args: &[&str]) -> Output {
        let dir = self.dir_str();
        let mut all = vec!["--data-dir", dir.as_str()];
        all.extend_from_slice(args);
        bulwark(&all)
    }

    /// `vm list` as (name → entry).
    pub fn vm(&self, name: &str) -> Option<serde_json::Value> {
        self.json(&["vm", "list"]).as_array().unwrap().iter().find(|v| v["name"] == name).cloned()
    }

    /// Puts `vm` (already reported) alone in group `g` with no schedule and no recovery-point
    /// goal, and waits for its initial replica.
    pub fn protect_and_wait(&self, vm: &str) {
        self.json(&["group", "create", "g", "--vm", vm, "--sync-every", "off", "--recovery-points", "none"]);
        wait_until("initial replica", Duration::from_secs(120), || {
            self.vm(vm).is_some_and(|v| v["replica_state"] == "consistent")
        });
    }

    /// Waits (up to `timeout`) for a job of `kind` of `vm` to have succeeded; answers it.
    pub fn wait_succeeded(&self, vm: &str, kind: &str, timeout: Duration) -> serde_json::Value {
        let find = || {
            self.json(&["job", "list", "--vm", vm])
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["kind"] == kind && j["state"] == "succeeded")
                .cloned()
        };
        wait_until(&format!("a {kind} job of {vm} succeeded"), timeout, || find().is_some());
        find().unwrap()
    }

    /// `recover-disk VM --rp RP --disk DISK` into a scratch file; answers its bytes.
    pub fn recover_disk(&self, vm: &str, rp: &str, disk: &str) -> Vec<u8> {
        let out = self.root.path().join(format!("recovered-{vm}-{disk}.img"));
        let dir = self.dir_str();
        let args =
            ["--data-dir", &dir, "recover-disk", vm, "--rp", rp, "--disk", disk, "--output", out.to_str().unwrap()];
        ok(&args);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    /// `agent list --output json`.
    pub fn agents_json(&self) -> Vec<serde_json::Value> {
        let out = ok(&["--data-dir", &self.dir_str(), "agent", "list", "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
    }

    pub fn agent_connected(&self, host: &str) -> Option<bool> {
        self.agents_json().iter().find(|a| a["host"] == host).map(|a| a["connected"].as_bool().unwrap())
    }

    pub fn wait_connected(&self, host: &str, want: bool) {
        wait_until(&format!("{host} connected={want}"), Duration::from_secs(30), || {
            self.agent_connected(host) == Some(want)
        });
    }

    pub fn coordinator_addr(&self) -> std::net::SocketAddr {
        std::fs::read_to_string(self.dir().join("coordinator.addr")).unwrap().trim().parse().unwrap()
    }

    pub fn ca_der(&self) -> rustls_pki_types::CertificateDer<'static> {
        let pem = std::fs::read_to_string(self.dir().join("pki/ca.pem")).unwrap();
        tls::certs_from_pem(&pem, "ca").unwrap().remove(0)
    }

    /// The deployment CA, for tests that mint their own (expired, odd) certificates.
    pub fn ca(&self) -> bulwark_pki::Ca {
        let cert = std::fs::read_to_string(self.dir().join("pki/ca.pem")).unwrap();
        let key = std::fs::read_to_string(self.dir().join("pki/ca.key")).unwrap();
        bulwark_pki::Ca::from_pem(&cert, &key).unwrap()
    }
}

/// Creates sim VM `name` on `host` under the sim root `root` with these disks (`NAME:SIZE`),
/// filled with random bytes, through `bulwark x-agent sim create-vm`.
pub fn random_sim_vm(root: &Path, name: &str, host: &str, disks: &[&str]) {
    let mut args =
        vec!["x-agent", "sim", "create-vm", "--root", root.to_str().unwrap(), "--name", name, "--host", host];
    for d in disks {
        args.extend(["--disk", d]);
    }
    args.extend(["--fill", "random"]);
    ok(&args);
}

/// Creates sim VM `name` on node1 under the sim root `root`, with one disk `os` of `size`
/// bytes, and writes `image` at its start through `bulwark x-agent sim write`.
pub fn sim_vm_from_image(root: &Path, name: &str, size: u64, image: &Path) {
    use bulwark_agent::sim::{self, CreateVm, DiskConfig};
    let req =
        CreateVm { os: "linux".into(), ..CreateVm::new(name, "node1", vec![DiskConfig { name: "os".into(), size }]) };
    sim::create_vm(root, &req).unwrap();
    let root = root.to_str().unwrap();
    let image = image.to_str().unwrap();
    ok(&["x-agent", "sim", "write", "--root", root, "--vm", name, "--disk", "os", "--offset", "0", "--input", image]);
}

/// A sim VM's disk as the guest sees it now.
pub fn sim_disk(root: &Path, vm: &str, disk: &str) -> Vec<u8> {
    let mut out = vec![];
    bulwark_agent::sim::read_disk(root, vm, disk, &mut out).unwrap();
    out
}

/// A primary MBR partition entry.
pub fn mbr_entry(starting_lba: u32, sectors: u32, sys: u8) -> mbrman::MBRPartitionEntry {
    mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_INACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys,
        last_chs: mbrman::CHS::empty(),
        starting_lba,
        sectors,
    }
}

/// Credentials for a raw test client.
pub struct Creds {
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
}

impl Creds {
    pub fn from_agent_dir(dir: &Path) -> Creds {
        let chain = tls::certs_from_pem(&std::fs::read_to_string(dir.join("pki/agent.pem")).unwrap(), "c").unwrap();
        let key = tls::key_from_pem(&std::fs::read_to_string(dir.join("pki/agent.key")).unwrap(), "k").unwrap();
        Creds { chain, key }
    }

    pub fn from_pem(cert: &str, key: &str) -> Creds {
        Creds { chain: tls::certs_from_pem(cert, "c").unwrap(), key: tls::key_from_pem(key, "k").unwrap() }
    }
}

/// Connects a raw QUIC client (ALPN `bulwark/1`) with `creds` (or none) to the cluster.
pub async fn raw_connect(
    cluster: &Cluster,
    creds: Option<Creds>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let ca = cluster.ca_der();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match creds {
        Some(c) => builder.with_client_auth_cert(c.chain, c.key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![bulwark_protocol::ALPN.to_vec()];
    let addr = cluster.coordinator_addr();
    let mut endpoint = quinn::Endpoint::client(quic::client_bind_addr(addr)).unwrap();
    endpoint.set_default_client_config(quic::client(cfg).unwrap());
    let conn = endpoint.connect(addr, "coord1").unwrap().await.map_err(|e| quic::explain(&e))?;
    Ok((endpoint, conn))
}

/// Opens the control stream and sends `hello`-like first bytes; returns the coordinator's
/// first answer or the error that ended the connection, as text.
pub async fn first_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let explain = |conn: &quinn::Connection, fallback: String| match conn.close_reason() {
        Some(e) => quic::explain(&e),
        None => fallback,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| quic::explain(&e))?;
    send.write_all(bytes).await.map_err(|e| explain(conn, e.to_string()))?;
    let _ = send.finish();
    match tokio::time::timeout(Duration::from_secs(15), bulwark_protocol::frame::read_frame(&mut recv, 1 << 20)).await {
        Ok(Ok(Some(body))) => Ok(body),
        Ok(Ok(None)) => Err(explain(conn, "stream ended".into())),
        Ok(Err(e)) => Err(explain(conn, e.to_string())),
        Err(_) => Err("no answer in 15 s".into()),
    }
}

/// A framed, encoded message.
pub fn framed<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let body = bulwark_protocol::codec::encode(msg).unwrap();
    bulwark_protocol::frame::encode_frame(&body, 1 << 20).unwrap()
}
