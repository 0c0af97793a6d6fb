//! Recovery options with a real SMTP server on loopback (aiosmtpd from PyPI, started by the
//! test): `--notify` mails the outcome of a recovery job and of a disk recovery; `--limit`
//! with a `--window` still recovers bit-exact (the rate itself is the throttle's unit tests'
//! and the benchmark's business, not a pass/fail timing).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bulwark_agent::sim::{self, CreateVm, DiskConfig};
use common::*;
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
