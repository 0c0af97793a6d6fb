//! A tiny real Linux guest for the QEMU backend's freeze tests: Debian's cloud kernel and a
//! busybox initramfs running Debian's `qemu-guest-agent`, booted under TCG, with one ext4
//! disk mounted on `/mnt`. `tests/guest/build-guest.sh` builds the kernel and initramfs once;
//! they are cached under the target directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::launch;
use bulwark_agent::qemu::qmp::{Qga, Qmp};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Bump when `build-guest.sh` changes what it builds.
const GUEST_VERSION: &str = "v2";

/// The directory with `vmlinuz` and `initrd.gz`, built on first use.
pub fn guest_image() -> PathBuf {
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let dir = target.join(format!("bulwark-guest-{GUEST_VERSION}"));
    if !dir.join("initrd.gz").is_file() {
        // From the agent's tests and the console's alike.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/guest/build-guest.sh");
        let out = Command::new("sh").arg(&script).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "building the test guest failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Boots the test guest's kernel and initramfs with the disks of `def` (its guest agent
/// defined), its console in `console`, plus `extra` QEMU arguments; answers QEMU once the
/// guest agent answers.
pub fn boot_def(def: &VmDef, console: &Path, extra: &[String]) -> Child {
    let img = guest_image();
    let ga = def.guest_agent.clone().expect("the definition has a guest agent");
    let child = launch::headless(def, "tcg", 256)
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.gz"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .spawn()
        .expect("qemu-system-x86_64 runs (installed by .ci/run)");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        assert!(!text.contains("BULWARK-GUEST-FAILED"), "the guest failed to start:\n{text}");
        if text.contains("BULWARK-GUEST-READY") {
            break;
        }
        assert!(Instant::now() < deadline, "the guest never came up:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent answers once it has opened its port.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Qga::connect(&ga, Duration::from_secs(2)).is_err() {
        assert!(Instant::now() < deadline, "the guest agent never answered");
    }
    child
}

/// A booted guest, its definition in `dir/vms/NAME.toml`.
pub struct LinuxVm {
    pub dir: PathBuf,
    pub name: String,
    pub image: PathBuf,
    pub qemu: Option<Child>,
}

impl LinuxVm {
    /// A qcow2 disk of `size` bytes holding a fresh ext4 filesystem.
    pub fn create(dir: &Path, name: &str, size: u64) -> LinuxVm {
        std::fs::create_dir_all(dir.join("vms")).unwrap();
        let raw = dir.join(format!("{name}.raw"));
        std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
        // No lazy initialisation: the guest's disk is still unless the test writes.
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfs.ext4");
        let image = dir.join(format!("{name}.qcow2"));
        let ok =
            Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&image).status().unwrap();
        assert!(ok.success(), "qemu-img convert");
        std::fs::remove_file(&raw).unwrap();
        let vm = LinuxVm { dir: dir.to_owned(), name: name.to_owned(), image, qemu: None };
        vm.define("");
        vm
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join(format!("{}.qmp", self.name))
    }

    /// The guest agent's socket (`org.qemu.guest_agent.0`).
    pub fn ga_path(&self) -> PathBuf {
        self.dir.join(format!("{}.qga", self.name))
    }

    /// A second virtio-serial port that nothing in the guest listens on: an agent that never
    /// answers.
    pub fn silent_path(&self) -> PathBuf {
        self.dir.join(format!("{}.silent", self.name))
    }

    /// (Re)writes the VM's definition; `extra` is more TOML keys (guest_agent, hooks...).
    pub fn define(&self, extra: &str) {
        let def = format!(
            "name = \"{}\"\nqmp = \"{}\"\nos = \"linux\"\n{extra}\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            self.name,
            self.qmp_path().display(),
            self.image.display()
        );
        std::fs::write(self.dir.join("vms").join(format!("{}.toml", self.name)), def).unwrap();
    }

    /// Boots the guest and waits for its agent.
    pub fn boot(&mut self) {
        let console = self.dir.join(format!("{}.console", self.name));
        for p in [self.qmp_path(), self.ga_path(), self.silent_path(), console.clone()] {
            let _ = std::fs::remove_file(p);
        }
        // Booted with the guest agent defined, so the command line has its port; a second
        // port, that nothing in the guest opens, is the silent agent.
        self.define(&format!("guest_agent = \"{}\"", self.ga_path().display()));
        let def = VmDef::load(&self.dir.join("vms").join(format!("{}.toml", self.name))).unwrap();
        let silent = [
            "-chardev".to_owned(),
            format!("socket,id=silent,path={},server=on,wait=off", self.silent_path().display()),
            "-device".to_owned(),
            "virtserialport,chardev=silent,name=org.bulwark.silent".to_owned(),
        ];
        self.qemu = Some(boot_def(&def, &console, &silent));
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path(), Duration::from_secs(10)).unwrap()
    }

    pub fn qga(&self) -> Qga {
        Qga::connect(&self.ga_path(), Duration::from_secs(10)).unwrap()
    }

    pub fn status(&self) -> String {
        self.qmp().status().unwrap()
    }

    /// Runs `sh -c script` in the guest through its agent; answers its exit code.
    pub fn exec(&self, script: &str) -> i64 {
        let mut ga = self.qga();
        let pid = ga.execute("guest-exec", json!({ "path": "/bin/sh", "arg": ["-c", script] })).unwrap()["pid"]
            .as_i64()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = ga.execute("guest-exec-status", json!({ "pid": pid })).unwrap();
            if st["exited"] == true {
                return st["exitcode"].as_i64().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "guest command {script:?} did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `guest-fsfreeze-status`: `frozen` or `thawed`.
    pub fn freeze_status(&self) -> String {
        self.qga().execute("guest-fsfreeze-status", json!({})).unwrap().as_str().unwrap().to_owned()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        self.kill9();
    }
}
