//! A QEMU VM for tests: real `qemu-system-x86_64` under TCG with no guest OS, one disk, its
//! definition in `DIR/vms/NAME.toml`; guest writes go through HMP `qemu-io` on the device's
//! backend. Shared by the agent's and the console's QEMU tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_agent::qemu::defs::VmDef;
use bulwark_agent::qemu::launch;
use bulwark_agent::qemu::qmp::Qmp;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// A QEMU VM with one disk, its definition in `dir/vms/NAME.toml`.
pub struct Vm {
    pub dir: PathBuf,
    pub name: String,
    pub image: PathBuf,
    pub format: &'static str,
    pub qemu: Option<Child>,
}

impl Vm {
    pub fn create(dir: &Path, name: &str, size: u64, format: &'static str) -> Vm {
        std::fs::create_dir_all(dir.join("vms")).unwrap();
        let image = dir.join(format!("{name}.{format}"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&image)
            .arg(size.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let def = format!(
            "name = \"{name}\"\nqmp = \"{}\"\nos = \"linux\"\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"{}\"\nformat = \"{format}\"\n",
            dir.join(format!("{name}.qmp")).display(),
            image.display()
        );
        std::fs::write(dir.join("vms").join(format!("{name}.toml")), def).unwrap();
        Vm { dir: dir.to_owned(), name: name.to_owned(), image, format, qemu: None }
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join(format!("{}.qmp", self.name))
    }

    pub fn start(&mut self) {
        let _ = std::fs::remove_file(self.qmp_path());
        let def = VmDef::load(&self.dir.join("vms").join(format!("{}.toml", self.name))).unwrap();
        let child = launch::headless(&def, "tcg", 64).spawn().expect("qemu-system-x86_64 runs (installed by .ci/run)");
        self.qemu = Some(child);
        launch::wait_for_qmp(&self.qmp_path(), Duration::from_secs(20)).expect("QEMU's QMP socket answers");
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path(), Duration::from_secs(10)).unwrap()
    }

    /// A guest write of `len` bytes of `pattern` at `offset`.
    pub fn write(&self, offset: u64, len: u64, pattern: u8) {
        let out = self
            .qmp()
            .hmp(&format!("qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {pattern} {offset} {len}\""))
            .unwrap();
        // qemu-io prints its report on QEMU's stdout; HMP returns only errors, as text.
        assert!(out.trim().is_empty(), "qemu-io: {out}");
    }

    /// Clean shutdown (QEMU writes its persistent bitmaps).
    pub fn quit(&mut self) {
        let _ = self.qmp().execute("quit", json!({}));
        if let Some(mut c) = self.qemu.take() {
            c.wait().unwrap();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn status(&self) -> String {
        self.qmp().status().unwrap()
    }

    /// Names of the block nodes QEMU has.
    pub fn nodes(&self) -> Vec<String> {
        let v = self.qmp().execute("query-named-block-nodes", json!({ "flat": true })).unwrap();
        v.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap().to_owned()).collect()
    }

    pub fn bitmap_count(&self, name: &str) -> Option<u64> {
        let v = self.qmp().execute("query-named-block-nodes", json!({ "flat": true })).unwrap();
        let node = v.as_array().unwrap().iter().find(|n| n["node-name"] == "disk0").unwrap().clone();
        node["dirty-bitmaps"].as_array()?.iter().find(|b| b["name"] == name).map(|b| b["count"].as_u64().unwrap())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Vm {
    /// The image's guest view now, as raw bytes (`qemu-img convert`; QEMU must not run).
    pub fn raw(&self) -> Vec<u8> {
        let out = self.dir.join(format!("{}-view.raw", self.name));
        let ok = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&self.image).arg(&out).status().unwrap();
        assert!(ok.success(), "qemu-img convert {}", self.image.display());
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }
}
