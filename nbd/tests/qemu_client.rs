//! The server against real clients: qemu-img and qemu-io (qemu-utils) read and write an
//! export over a Unix socket; a client that sends hostile lengths is dropped without harming
//! the next one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_nbd::{serve, Export, Policy};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Memory {
    bytes: Mutex<Vec<u8>>,
    writable: bool,
}

impl Export for Memory {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let b = self.bytes.lock().unwrap();
        Ok(b[offset as usize..offset as usize + len as usize].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// Serves `export` on a socket in `dir` until the test ends; answers the socket's URI.
fn start(rt: &tokio::runtime::Runtime, dir: &std::path::Path, export: Arc<Memory>) -> String {
    let path = dir.join("nbd.sock");
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&path) }).unwrap();
    let policy = Policy { name: "disk".into(), tls_offered: false, tls_required: false };
    rt.spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (export, policy) = (export.clone(), policy.clone());
            tokio::spawn(async move {
                let _ = serve(&mut s, &*export, &policy).await;
            });
        }
    });
    format!("nbd+unix:///disk?socket={}", path.display())
}

/// Runs a qemu tool with a bound: a client that hangs fails the test instead of the run.
fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout").arg("60").arg(tool).args(args).output().expect("qemu-utils installed")
}

#[test]
fn qemu_img_reads_and_qemu_io_writes_an_export() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Not a multiple of the 2 MiB qemu-img reads at a time (virtual disks are whole sectors: an
    // export of a size that is not makes qemu-img 10 wait forever after the copy).
    let want = pattern((5 << 20) + 3 * 4096);
    let export = Arc::new(Memory { bytes: Mutex::new(want.clone()), writable: true });
    let uri = start(&rt, tmp.path(), export.clone());

    let out = tmp.path().join("copy.raw");
    let r = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), want, "read back bit-exact");

    let r = run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 8192 65536", "-c", "flush", &uri]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = run("qemu-io", &["-f", "raw", "-c", "write -z 1048576 4096", &uri]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut expect = want.clone();
    expect[8192..8192 + 65536].fill(0x5a);
    expect[1 << 20..(1 << 20) + 4096].fill(0);
    assert!(*export.bytes.lock().unwrap() == expect, "the writes landed where they were aimed");

    let r = run("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 8192 65536", &uri]);
    assert!(r.status.success() && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"));
}

#[test]
fn a_read_only_export_refuses_writes_and_a_hostile_client_harms_nobody() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let want = pattern(1 << 20);
    let export = Arc::new(Memory { bytes: Mutex::new(want.clone()), writable: false });
    let uri = start(&rt, tmp.path(), export.clone());

    // qemu-io sees the read-only flag and will not open the export for writing.
    let r = run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4096", &uri]);
    let said = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(!r.status.success() && said.contains("Permission denied"), "{said}");
    // A client that writes anyway is answered EPERM, and nothing is written.
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(tmp.path().join("nbd.sock")).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut opt = vec![];
        opt.extend_from_slice(&bulwark_nbd::wire::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&bulwark_nbd::wire::OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&4u32.to_be_bytes());
        opt.extend_from_slice(b"disk");
        s.write_all(&opt).await.unwrap();
        let mut answer = [0u8; 10];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), 1 << 20, "the export's size");
        let mut req = vec![];
        req.extend_from_slice(&bulwark_nbd::wire::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&bulwark_nbd::wire::CMD_WRITE.to_be_bytes());
        req.extend_from_slice(&42u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.extend_from_slice(&[0x11; 4096]);
        s.write_all(&req).await.unwrap();
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, bulwark_nbd::wire::simple_reply(42, bulwark_nbd::wire::EPERM));
    });
    assert!(*export.bytes.lock().unwrap() == want, "nothing written");

    // A client announcing a 4 GiB option: dropped before anything is allocated for it.
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(tmp.path().join("nbd.sock")).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        let mut opt = vec![];
        opt.extend_from_slice(&bulwark_nbd::wire::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&bulwark_nbd::wire::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&opt).await.unwrap();
        let mut rest = vec![];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "the connection is closed with nothing more said");
    });
    // The next client is served as if nothing happened.
    let out = tmp.path().join("copy.raw");
    let r = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), want);
}
