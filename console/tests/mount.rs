//! `bulwark mount` (issue 21, instant recovery's first half): a recovery point's disk served as
//! an NBD export read by real qemu-img and qemu-io; bit-exact, read-only unless `--writable`,
//! whose writes go to a throw-away overlay and never reach the recovery point; an existing path
//! is never replaced; the socket is private and gone after SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A cluster with one backed-up sim VM `vm1` with disks `os` (12 MiB) and `data` (1.5 MiB, not
/// a whole number of blocks), both random.
fn backed_up() -> Cluster {
    let mut c = Cluster::start();
    let root = c.root.path().join("sim");
    random_sim_vm(&root, "vm1", "node1", &["os:12MiB", "data:1536KiB"]);
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("vm1").is_some());
    c.protect_and_wait("vm1");
    c
}

/// A qemu tool with a bound: a hang fails the test instead of the run.
fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout").arg("120").arg(tool).args(args).output().expect("qemu-utils installed")
}

fn mount(c: &Cluster, sock: &Path, extra: &[&str]) -> Daemon {
    let (nbd, dir) = (format!("unix:{}", sock.display()), c.dir_str());
    let mut args = vec!["--data-dir", &dir, "mount", "vm1", "--rp", "latest", "--nbd", &nbd];
    args.extend_from_slice(extra);
    let log = sock.with_extension("log");
    let d = Daemon::spawn(&args, log);
    wait_until("the export is served", Duration::from_secs(30), || {
        std::fs::symlink_metadata(sock).is_ok_and(|m| m.file_type().is_socket())
    });
    d
}

fn uri(sock: &Path, disk: &str) -> String {
    format!("nbd+unix:///{disk}?socket={}", sock.display())
}

fn copy_out(sock: &Path, disk: &str, out: &Path) -> Vec<u8> {
    let r = qemu("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri(sock, disk), out.to_str().unwrap()]);
    assert!(r.status.success(), "qemu-img: {}", String::from_utf8_lossy(&r.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn a_recovery_point_is_served_over_nbd_bit_exact_and_writes_stay_in_the_overlay() {
    let c = backed_up();
    let sim = c.root.path().join("sim");
    let (os, data) = (sim_disk(&sim, "vm1", "os"), sim_disk(&sim, "vm1", "data"));
    let dir = c.root.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();

    // Two disks and none named: refused, naming them.
    let sock = dir.join("os.sock");
    let nbd = format!("unix:{}", sock.display());
    let out = c.run(&["mount", "vm1", "--rp", "latest", "--nbd", &nbd]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("--disk") && said.contains("os") && said.contains("data"), "{said}");
    assert!(!sock.exists());

    // Read-only: qemu-img copies it bit-exact; the socket is private.
    let m = mount(&c, &sock, &["--disk", "os"]);
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(copy_out(&sock, "os", &dir.join("os.raw")) == os, "the os disk read back bit-exact");
    let r = qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 4096", &uri(&sock, "os")]);
    assert!(!r.status.success(), "a read-only export is not opened for writing");
    // An existing path is never replaced: not the live socket, not a file.
    let out = c.run(&["mount", "vm1", "--rp", "latest", "--disk", "os", "--nbd", &nbd]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let file = dir.join("precious");
    std::fs::write(&file, b"keep\n").unwrap();
    let out = c.run(&["mount", "vm1", "--rp", "latest", "--disk", "os", "--nbd", &format!("unix:{}", file.display())]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep\n");
    // The mount still serves after those, and SIGTERM ends it and removes the socket.
    assert!(copy_out(&sock, "os", &dir.join("os2.raw")) == os);
    m.signal(15);
    wait_until("the socket is removed", Duration::from_secs(20), || !sock.exists());

    // Writable: the data disk (its last block short); writes read back, including one that
    // crosses a block boundary and one past the last whole block.
    let wsock = dir.join("data.sock");
    let _w = mount(&c, &wsock, &["--disk", "data", "--writable", "--overlay-dir", dir.to_str().unwrap()]);
    let u = uri(&wsock, "data");
    let r = qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1044480 8192",
            "-c",
            "write -P 0xa5 1572352 512",
            "-c",
            "write -z 4096 4096",
            &u,
        ],
    );
    assert!(r.status.success(), "{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    let mut want = data.clone();
    want[1044480..1044480 + 8192].fill(0x5a);
    want[1572352..1572352 + 512].fill(0xa5);
    want[4096..8192].fill(0);
    assert!(copy_out(&wsock, "data", &dir.join("data.raw")) == want, "the overlay's writes read back in place");
    // The overlay's file is unlinked: nothing new in its directory but the socket and logs.
    let names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(
        names.iter().all(|n| n.ends_with(".sock") || n.ends_with(".log") || n.ends_with(".raw") || n == "precious"),
        "{names:?}"
    );
    // The recovery point never changed.
    assert!(c.recover_disk("vm1", "latest", "data") == data);
}

/// A directory of QEMU's x509 credentials for a client: the deployment's CA and the
/// certificate and key of the enrolled host `host`.
fn creds(c: &Cluster, host: &str, dir: &Path) -> String {
    let agent = c.agent_dir(host).join("pki");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(agent.join("ca.pem"), dir.join("ca-cert.pem")).unwrap();
    std::fs::copy(agent.join("agent.pem"), dir.join("client-cert.pem")).unwrap();
    std::fs::copy(agent.join("agent.key"), dir.join("client-key.pem")).unwrap();
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn over_tcp_the_export_is_served_only_inside_tls_and_only_to_the_allowed_host() {
    let c = backed_up();
    c.enroll("node2");
    let sim = c.root.path().join("sim");
    let os = sim_disk(&sim, "vm1", "os");
    let dir = c.root.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();

    // TCP without a host allowed to read: refused before anything is served.
    let port = free_port();
    let nbd = format!("tcp:127.0.0.1:{port}");
    let out = c.run(&["mount", "vm1", "--rp", "latest", "--disk", "os", "--nbd", &nbd]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--allow-host"));

    let dd = c.dir_str();
    let args =
        ["--data-dir", &dd, "mount", "vm1", "--rp", "latest", "--disk", "os", "--nbd", &nbd, "--allow-host", "node1"];
    let m = Daemon::spawn(&args, dir.join("tcp.log"));
    wait_until("the export listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let opts = |tls: bool| {
        let t = if tls { ",tls-creds=tls0" } else { "" };
        format!("driver=nbd,host=127.0.0.1,port={port},export=os{t}")
    };
    let copy = |object: Option<&str>, tls: bool, out: &Path| {
        let mut a: Vec<String> = vec!["convert".into()];
        if let Some(o) = object {
            a.extend(["--object".into(), o.to_owned()]);
        }
        a.extend(["--image-opts".into(), opts(tls), "-O".into(), "raw".into(), out.to_str().unwrap().into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        qemu("qemu-img", &a)
    };

    // The allowed host's certificate reads it bit-exact.
    let node1 = creds(&c, "node1", &dir.join("creds1"));
    let r = copy(Some(&node1), true, &dir.join("tls.raw"));
    assert!(r.status.success(), "{}\n{}", String::from_utf8_lossy(&r.stderr), m.log_text());
    assert!(std::fs::read(dir.join("tls.raw")).unwrap() == os, "read over TLS bit-exact");

    // Another enrolled host's certificate: refused after the handshake, nothing read.
    let node2 = creds(&c, "node2", &dir.join("creds2"));
    let r = copy(Some(&node2), true, &dir.join("other.raw"));
    assert!(!r.status.success());
    wait_until("the refusal is logged", Duration::from_secs(10), || m.log_text().contains("is not allowed to read"));
    // No TLS at all: the server requires it.
    let r = copy(None, false, &dir.join("plain.raw"));
    let said = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && said.to_lowercase().contains("tls"), "{said}");
    // A certificate of another CA (a fresh deployment): the handshake fails.
    let stranger = Cluster::start();
    stranger.enroll("node1");
    let foreign = creds(&stranger, "node1", &dir.join("creds3"));
    let r = copy(Some(&foreign), true, &dir.join("foreign.raw"));
    assert!(!r.status.success());
    // The allowed host still reads after all that.
    let r = copy(Some(&node1), true, &dir.join("tls2.raw"));
    assert!(r.status.success() && std::fs::read(dir.join("tls2.raw")).unwrap() == os);
}
