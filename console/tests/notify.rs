//! Recovery options with a real SMTP server on loopback (aiosmtpd from PyPI, started by the
//! test): `--notify` mails the outcome of a recovery job and of a disk recovery; `--limit`
//! with a `--window` still recovers bit-exact (the rate itself is the throttle's unit tests'
//! and the benchmark's business, not a pass/fail timing). SMTP credentials never cross the
//! network in cleartext unless the configuration allows it (an aiosmtpd server that accepts
//! AUTH without TLS records what it was sent). A group's `--verify every-rp` reads each
//! recovery point back; one whose chunk was damaged after the backup fails, and the failure
//! is mailed to `[smtp] alerts_to`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Smtp {
    child: std::process::Child,
    mbox: std::path::PathBuf,
    port: u16,
}

impl Smtp {
    fn start(dir: &std::path::Path) -> Smtp {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mbox = dir.join("maildir");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&mbox)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
        wait_until("the SMTP server listens", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Smtp { child, mbox, port }
    }

    /// Every message delivered so far (the Mailbox handler keeps a Maildir).
    fn mail(&self) -> String {
        let Ok(entries) = std::fs::read_dir(self.mbox.join("new")) else { return String::new() };
        entries.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect::<Vec<_>>().join("\n")
    }
}

/// An SMTP server that accepts AUTH PLAIN/LOGIN over a plain connection and writes every
/// login it is sent to `auth.log`.
const AUTH_SERVER: &str = r#"
import signal, sys
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult
port, mbox, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def authenticator(server, session, envelope, mechanism, auth_data):
    with open(log, "a") as f:
        f.write(f"{mechanism} {auth_data.login.decode()} {auth_data.password.decode()}\n")
    return AuthResult(success=True)
controller = Controller(Mailbox(mbox), hostname="127.0.0.1", port=port, authenticator=authenticator,
                        auth_require_tls=False)
controller.start()
open(log, "a").close()
signal.pause()
"#;

impl Smtp {
    fn start_with_auth(dir: &std::path::Path) -> (Smtp, std::path::PathBuf) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mbox = dir.join("maildir");
        let log = dir.join("auth.log");
        let child = Command::new("python3")
            .args(["-c", AUTH_SERVER, &port.to_string()])
            .arg(&mbox)
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with aiosmtpd (pip install aiosmtpd)");
        wait_until("the SMTP server with AUTH is ready", Duration::from_secs(20), || log.exists());
        (Smtp { child, mbox, port }, log)
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn recoveries_mail_their_outcome_and_throttled_ones_stay_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(tmp.path());
    let port = smtp.port;
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[smtp]\nserver = \"127.0.0.1\"\nport = {port}\nfrom = \"bulwark@backup.test\"\ntls = \"none\"\n"
        ));
        std::fs::write(&path, text).unwrap();
    });
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 3,
        ..CreateVm::new("m", "node1", vec![DiskConfig { name: "os".into(), size: 16 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("m").is_some());
    c.json(&["group", "create", "g", "--vm", "m", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("m").unwrap()["replica_state"] == "consistent");
    let mut want = vec![];
    sim::read_disk(&root, "m", "os", &mut want).unwrap();

    let out = c.root.path().join("m.img");
    ok(&[
        "--data-dir",
        &c.dir_str(),
        "recover-disk",
        "m",
        "--rp",
        "latest",
        "--disk",
        "os",
        "--output",
        out.to_str().unwrap(),
        "--limit",
        "64MiB/s",
        "--window",
        "00:00-23:59",
        "--notify",
        "ops@example.test",
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), want, "a throttled disk recovery is bit-exact");
    wait_until("the disk recovery's mail", Duration::from_secs(30), || {
        smtp.mail().contains("Subject: Bulwark: recovery of disk os of m (latest) succeeded")
    });
    assert!(smtp.mail().contains("To: ops@example.test"));

    let job = c.json(&[
        "recover",
        "m",
        "--rp",
        "latest",
        "--to",
        "host",
        "--host",
        "node1",
        "--name",
        "m2",
        "--wait",
        "--limit",
        "64MiB/s",
        "--notify",
        "ops@example.test",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let mut got = vec![];
    sim::read_disk(&root, "m2", "os", &mut got).unwrap();
    assert_eq!(got, want);
    wait_until("the recovery job's mail", Duration::from_secs(30), || {
        smtp.mail().contains("Subject: Bulwark: recovery of m succeeded")
    });
    let id = job["id"].as_u64().unwrap();
    assert!(smtp.mail().contains(&format!("Job {id} (recovery) succeeded")), "{}", smtp.mail());

    // A failed recovery mails too: m2 exists now.
    let failed = c.run(&[
        "recover",
        "m",
        "--rp",
        "latest",
        "--to",
        "host",
        "--host",
        "node1",
        "--name",
        "m2",
        "--wait",
        "--notify",
        "ops@example.test",
    ]);
    assert_eq!(failed.status.code(), Some(1));
    wait_until("the failure's mail", Duration::from_secs(30), || smtp.mail().contains("recovery of m FAILED"));
}

#[test]
fn smtp_credentials_are_not_sent_in_cleartext_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let (smtp, auth_log) = Smtp::start_with_auth(tmp.path());
    let port = smtp.port;
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[smtp]\nserver = \"127.0.0.1\"\nport = {port}\nfrom = \"bulwark@backup.test\"\ntls = \"none\"\n\
             username = \"bulwark\"\npassword = \"s3cret-pw\"\n"
        ));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    });
    // The file holds a password: serve made it private, and both facts are in the log.
    c.coordinator.wait_log("its mode is now 600");
    c.coordinator.wait_log("recovery notifications will not be sent");
    assert!(c.coordinator.log_text().contains("in cleartext"), "{}", c.coordinator.log_text());
    let config = c.dir().join("coordinator.toml");
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);

    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 4,
        ..CreateVm::new("p", "node1", vec![DiskConfig { name: "os".into(), size: 8 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("p").is_some());
    c.json(&["group", "create", "g", "--vm", "p", "--sync-every", "off", "--recovery-points", "none"]);
    wait_until("initial replica", Duration::from_secs(60), || c.vm("p").unwrap()["replica_state"] == "consistent");

    let recover = |c: &Cluster, name: &str| {
        let job = c.json(&[
            "recover",
            "p",
            "--rp",
            "latest",
            "--to",
            "host",
            "--host",
            "node1",
            "--name",
            name,
            "--wait",
            "--notify",
            "ops@example.test",
        ]);
        assert_eq!(job["state"], "succeeded", "{job}");
        job["id"].as_u64().unwrap().to_string()
    };
    // The recovery succeeds; its notification is refused, and the job says why.
    let id = recover(&c, "p2");
    wait_until("the refusal in the job's detail", Duration::from_secs(30), || {
        c.json(&["job", "show", &id])["detail"].as_str().is_some_and(|d| d.contains("not sent"))
    });
    let detail = c.json(&["job", "show", &id])["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("notification to ops@example.test not sent"), "{detail}");
    assert!(detail.contains("in cleartext") && detail.contains("allow_plaintext_auth"), "{detail}");
    c.coordinator.wait_log("recovery notification not sent");
    assert_eq!(std::fs::read_to_string(&auth_log).unwrap(), "", "no credentials reached the server");
    assert_eq!(smtp.mail(), "", "no mail was sent");

    // Allowed explicitly: the same server gets the login (so the refusal above was the fix).
    c.coordinator.signal(15);
    wait_until("the coordinator stops", Duration::from_secs(30), || !c.coordinator.is_running());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("tls = \"none\"", "tls = \"none\"\nallow_plaintext_auth = true");
    std::fs::write(&config, text).unwrap();
    c.coordinator =
        Daemon::spawn(&["x-coordinator", "serve", "--data-dir", &c.dir_str()], c.root.path().join("coord2.log"));
    wait_until("coordinator.addr", Duration::from_secs(20), || c.dir().join("coordinator.addr").exists());
    c.wait_connected("node1", true);
    let id = recover(&c, "p3");
    wait_until("the mail", Duration::from_secs(30), || {
        smtp.mail().contains("Subject: Bulwark: recovery of p succeeded")
    });
    assert!(smtp.mail().contains(&format!("Job {id} (recovery) succeeded")), "{}", smtp.mail());
    assert!(std::fs::read_to_string(&auth_log).unwrap().contains("bulwark s3cret-pw"));
}

/// Flips one byte in the middle of the largest pack: inside a chunk's payload (the test's
/// blocks are random, stored whole, and fill the packs).
fn damage_largest_pack(data_dir: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let packs = bulwark_coordinator::config::DataDir::new(data_dir).packs();
    let largest = std::fs::read_dir(&packs)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&largest).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    f.sync_all().unwrap();
}

fn rp_list(c: &Cluster, vm: &str) -> Vec<serde_json::Value> {
    c.json(&["rp", "list", vm]).as_array().unwrap().clone()
}

#[test]
fn recovery_points_are_read_back_and_a_damaged_one_is_reported_by_mail() {
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(tmp.path());
    let port = smtp.port;
    let mut c = Cluster::start_with(|dir| {
        let path = dir.join("coordinator.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[smtp]\nserver = \"127.0.0.1\"\nport = {port}\nfrom = \"bulwark@backup.test\"\ntls = \"none\"\nalerts_to = [\"ops@example.test\"]\n"
        ));
        std::fs::write(&path, text).unwrap();
    });
    let root = c.root.path().join("sim");
    let req = CreateVm {
        random_fill: true,
        seed: 11,
        ..CreateVm::new("v", "node1", vec![DiskConfig { name: "os".into(), size: 24 << 20 }])
    };
    sim::create_vm(&root, &req).unwrap();
    c.enroll("node1");
    c.run_sim_agent("node1", &root);
    wait_until("the VM is reported", Duration::from_secs(30), || c.vm("v").is_some());
    c.json(&[
        "group",
        "create",
        "g",
        "--vm",
        "v",
        "--sync-every",
        "off",
        "--recovery-points",
        "none",
        "--verify",
        "every-rp",
        "--no-cc-when-inconsistent",
    ]);
    let group = c.json(&["group", "show", "g"]);
    assert_eq!(group["verify"], "every-rp", "{group}");
    wait_until("initial replica", Duration::from_secs(60), || c.vm("v").unwrap()["replica_state"] == "consistent");
    let job = c.json(&["backup", "v", "--kind", "express-full", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");

    // Every point of the group is read back, and a good one passes.
    wait_until("every recovery point verified", Duration::from_secs(60), || {
        let rps = rp_list(&c, "v");
        !rps.is_empty() && rps.iter().all(|r| r["verified"] == true)
    });
    let good: Vec<String> = rp_list(&c, "v").iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert!(rp_list(&c, "v").iter().all(|r| r["verified_at"].is_string() && r["boot_verified"].is_null()));
    let verify_jobs = c.json(&["job", "list", "--vm", "v"]);
    let verify_jobs: Vec<&serde_json::Value> =
        verify_jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "verify").collect();
    assert_eq!(verify_jobs.len(), good.len(), "one verification job per point");
    assert!(verify_jobs.iter().all(|j| j["state"] == "succeeded" && j["bytes_scanned"].as_u64() > Some(0)));

    // A chunk damaged after the backup: the next point shares it (nothing changed in the
    // guest), so its verification fails, names the damage, and is mailed.
    damage_largest_pack(&c.dir());
    let job = c.json(&["backup", "v", "--kind", "express-full", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    wait_until("the new point's verification", Duration::from_secs(60), || {
        rp_list(&c, "v").iter().all(|r| !r["verified"].is_null())
    });
    let rps = rp_list(&c, "v");
    let bad: Vec<&serde_json::Value> =
        rps.iter().filter(|r| !good.contains(&r["id"].as_str().unwrap().to_owned())).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["verified"], false, "{rps:?}");
    for r in rps.iter().filter(|r| good.contains(&r["id"].as_str().unwrap().to_owned())) {
        assert_eq!(r["verified"], true, "earlier verdicts stand (every-rp reads each point once)");
    }
    let id = bad[0]["id"].as_str().unwrap();
    wait_until("the failure's mail", Duration::from_secs(30), || smtp.mail().contains("FAILED verification"));
    // Unfolded headers, quoted-printable soft breaks joined.
    let mail = smtp.mail().replace("\n ", " ").replace("=\n", "");
    assert!(mail.contains(&format!("Subject: Bulwark: recovery point {id} of v FAILED verification")), "{mail}");
    assert!(mail.contains("To: ops@example.test") && mail.contains("corrupt"), "{mail}");
    let failed = c.json(&["job", "list", "--vm", "v", "--state", "failed"]);
    let failed = failed.as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["kind"], "verify");
    assert!(failed[0]["error"].as_str().unwrap().contains("corrupt"), "{failed:?}");
    // The replica shares the damaged chunk: it is doubted, so the next check fetches it again.
    assert_eq!(c.vm("v").unwrap()["replica_state"], "inconsistent");
}
