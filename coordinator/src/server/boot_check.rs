//! The boot check of restore verification: a recovery point of a VM whose definition says
//! `boot_check = true` is booted on the coordinator, through the instant path, in an isolated
//! QEMU, and passes when its guest agent answers within `[verify] boot_timeout_secs`.
//!
//! Isolation: the point's disks are served read-only from the store over NBD on Unix sockets in
//! a private temporary directory; QEMU writes into throw-away qcow2 overlays there; it has no
//! network (`-nic none`), no default devices, no display, QEMU's seccomp sandbox, and only the
//! operator's `[verify]` settings — nothing of the host's definition but whether to boot (a
//! host's QEMU arguments are never run on the coordinator). QEMU is killed at the deadline.

use crate::catalog::{RecoveryPointRecord, RpDisk};
use crate::config::VerifyConfig;
use crate::items::disk::{Geometry, StoreBlocks};
use crate::store::Store;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// The most of QEMU's error output kept for the verdict.
const STDERR_KEPT: usize = 2048;

/// Whether a recovery point's VM definition (the QEMU backend's, kept with the point) asks
/// for a boot check. Anything unreadable asks for none.
pub fn wants_boot_check(rp: &RecoveryPointRecord) -> bool {
    #[derive(serde::Deserialize)]
    struct Kept {
        #[serde(default)]
        boot_check: bool,
    }
    !rp.config.is_empty()
        && rp.config.len() <= bulwark_protocol::messages::MAX_VM_CONFIG
        && std::str::from_utf8(&rp.config)
            .ok()
            .and_then(|t| toml::from_str::<Kept>(t).ok())
            .is_some_and(|k| k.boot_check)
}

/// QEMU's arguments for a boot check of `disks` (overlays `dir/dN.qcow2`), with the guest
/// agent's socket `dir/qga.sock`.
pub fn qemu_args(dir: &Path, disks: usize, cfg: &VerifyConfig) -> Vec<String> {
    let p = |name: &str| dir.join(name).display().to_string().replace(',', ",,");
    let mut a: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-smp",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-machine".into(), format!("q35,accel={}", cfg.accel.replace(',', ""))]);
    a.extend(["-m".into(), cfg.boot_memory_mib.to_string()]);
    a.extend(["-serial".into(), format!("file:{}", p("console.log"))]);
    for i in 0..disks {
        a.push("-blockdev".into());
        a.push(format!("node-name=f{i},driver=file,filename={}", p(&format!("d{i}.qcow2"))));
        a.push("-blockdev".into());
        a.push(format!("node-name=d{i},driver=qcow2,file=f{i}"));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive=d{i},bootindex={}", i + 1));
    }
    a.extend(["-device".into(), "virtio-serial-pci,id=vser".into()]);
    a.extend(["-chardev".into(), format!("socket,id=qga,path={},server=on,wait=off", p("qga.sock"))]);
    a.extend(["-device".into(), "virtserialport,chardev=qga,name=org.qemu.guest_agent.0".into()]);
    if let Some(k) = &cfg.boot_kernel {
        a.extend(["-kernel".into(), k.display().to_string()]);
        if let Some(i) = &cfg.boot_initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        if let Some(line) = &cfg.boot_append {
            a.extend(["-append".into(), line.clone()]);
        }
    }
    a
}

/// A disk of a recovery point as a read-only NBD export.
struct PointDisk {
    store: Arc<Store>,
    disk: RpDisk,
}

impl bulwark_nbd::Export for PointDisk {
    fn size(&self) -> u64 {
        self.disk.size_bytes
    }

    fn writable(&self) -> bool {
        false
    }

    fn preferred_block(&self) -> u32 {
        self.disk.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let (store, d) = (self.store.clone(), self.disk.clone());
        tokio::task::spawn_blocking(move || {
            let g = Geometry { block_size: d.block_size, disk_size: d.size_bytes };
            let mut source = StoreBlocks::new(store, d.root, g);
            let bs = u64::from(d.block_size);
            let end = offset + u64::from(len);
            let mut out = Vec::with_capacity(len as usize);
            for index in offset / bs..end.div_ceil(bs) {
                let (_, block) = source.read_block_with_id(index)?;
                let start = index * bs;
                let (from, to) = ((offset.max(start) - start) as usize, (end.min(start + bs) - start) as usize);
                out.extend_from_slice(block.get(from..to).unwrap_or_default());
            }
            Ok(out)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn write(&self, _: u64, _: Vec<u8>) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }

    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots `rp` and waits for its guest agent: answers how long it took, or why it failed.
pub async fn boot_check(store: Arc<Store>, rp: &RecoveryPointRecord, cfg: &VerifyConfig) -> Result<Duration, String> {
    let dir =
        tempfile::Builder::new().prefix("bulwark-boot-").tempdir().map_err(|e| format!("no scratch directory: {e}"))?;
    // The point's chunks stay while it boots, even if it is pruned meanwhile.
    let _holds: Vec<_> = rp.disks.iter().map(|d| store.hold(d.root)).collect();
    let mut servers = vec![];
    for (i, d) in rp.disks.iter().enumerate() {
        let socket = dir.path().join(format!("d{i}.nbd"));
        let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        let export = Arc::new(PointDisk { store: store.clone(), disk: d.clone() });
        servers.push(AbortOnDrop(tokio::spawn(serve(listener, export, d.name.clone()))));
        overlay(&dir.path().join(format!("d{i}.qcow2")), &socket, d).await?;
    }
    let started = Instant::now();
    let mut qemu = tokio::process::Command::new(&cfg.qemu)
        .args(qemu_args(dir.path(), rp.disks.len(), cfg))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cfg.qemu.display()))?;
    let deadline = started + Duration::from_secs(cfg.boot_timeout_secs);
    // QEMU's error output is read as it comes (a full pipe would stall it); the first bytes kept.
    let stderr = qemu.stderr.take().map(|mut e| {
        tokio::spawn(async move {
            let (mut kept, mut chunk) = (Vec::with_capacity(STDERR_KEPT), [0u8; 4096]);
            while let Ok(n @ 1..) = e.read(&mut chunk).await {
                let room = STDERR_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            String::from_utf8_lossy(&kept).trim().to_owned()
        })
    });
    let answered = loop {
        if let Ok(Some(status)) = qemu.try_wait() {
            let err = match stderr {
                Some(t) => {
                    tokio::time::timeout(Duration::from_secs(2), t).await.ok().and_then(Result::ok).unwrap_or_default()
                }
                None => String::new(),
            };
            break Err(format!("QEMU ended ({status}) before the guest agent answered: {err}"));
        }
        if Instant::now() >= deadline {
            break Err(format!("the guest agent did not answer within {} s", cfg.boot_timeout_secs));
        }
        if guest_sync(&dir.path().join("qga.sock")).await {
            break Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = qemu.kill().await;
    drop(servers);
    answered.map_err(|e| match console_tail(&dir.path().join("console.log")) {
        Some(tail) => format!("{e}; the guest's console ended with: {tail}"),
        None => e,
    })
}

/// An overlay of `d` backed by its export on `socket`.
async fn overlay(path: &Path, socket: &Path, d: &RpDisk) -> Result<(), String> {
    let backing = serde_json::json!({
        "driver": "raw",
        "file": { "driver": "nbd", "server": { "type": "unix", "path": socket }, "export": d.name },
    });
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(format!("json:{backing}"))
        .arg(path)
        .arg(d.size_bytes.to_string())
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// Whether the guest agent behind `socket` answers a `guest-sync` within two seconds.
async fn guest_sync(socket: &Path) -> bool {
    let attempt = async {
        let s = tokio::net::UnixStream::connect(socket).await.ok()?;
        let (r, mut w) = s.into_split();
        let id = 0x6275_6c77u64; // "bulw"
        w.write_all(format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes()).await.ok()?;
        let mut lines = tokio::io::BufReader::new(r.take(64 << 10)).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).ok()?;
            if v.get("return").and_then(serde_json::Value::as_u64) == Some(id) {
                return Some(());
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().is_some()
}

/// The last line of the guest's console, if any (for the verdict's detail): only its last
/// 4 KiB are read, whatever the guest wrote.
fn console_tail(path: &Path) -> Option<String> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = vec![];
    f.take(4096).read_to_end(&mut tail).ok()?;
    let s = String::from_utf8_lossy(&tail);
    let line = s.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(line.trim().chars().take(200).collect())
}

async fn serve(listener: tokio::net::UnixListener, export: Arc<PointDisk>, name: String) {
    let policy = bulwark_nbd::Policy { name, tls_offered: false, tls_required: false };
    while let Ok((mut s, _)) = listener.accept().await {
        let (export, policy) = (export.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(e) = bulwark_nbd::serve(&mut s, &*export, &policy).await {
                tracing::debug!(error = %e, "a boot check's NBD client was dropped");
            }
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(config: &str) -> RecoveryPointRecord {
        RecoveryPointRecord {
            id: [1; 16],
            vm: "web".into(),
            created_at: 0,
            consistency: bulwark_protocol::messages::Consistency::Crash,
            config: config.as_bytes().to_vec(),
            disks: vec![],
            logical_bytes: 0,
            stored_bytes: 0,
        }
    }

    #[test]
    fn only_a_definition_that_asks_gets_a_boot_check() {
        assert!(wants_boot_check(&rp("name = \"web\"\nboot_check = true\n")));
        assert!(!wants_boot_check(&rp("name = \"web\"\n")));
        assert!(!wants_boot_check(&rp("")));
        assert!(!wants_boot_check(&rp("boot_check = \"yes\"")));
        assert!(!wants_boot_check(&rp("\u{0}not toml")));
    }

    #[test]
    fn the_boot_is_isolated_and_takes_nothing_from_the_host() {
        let cfg = VerifyConfig {
            boot_kernel: Some("/k".into()),
            boot_append: Some("quiet".into()),
            ..VerifyConfig::default()
        };
        let a = qemu_args(Path::new("/tmp/b,x"), 2, &cfg);
        let line = a.join(" ");
        assert!(line.contains("-nic none") && line.contains("-nodefaults") && line.contains("-sandbox on"));
        assert!(line.contains("filename=/tmp/b,,x/d1.qcow2"), "commas in paths are escaped: {line}");
        assert!(line.contains("-kernel /k") && line.contains("-append quiet") && !line.contains("-initrd"));
        assert!(!qemu_args(Path::new("/t"), 1, &VerifyConfig::default()).iter().any(|x| x == "-kernel"));
    }
}
