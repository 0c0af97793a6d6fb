//! The QEMU backend's VM definitions: one `NAME.toml` per VM in the `vm_dir` (CONTRACT, "The
//! QEMU/KVM backend"), and `bulwark-agent qemu check`, which validates them and probes sockets.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One disk of a QEMU VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    /// The disk's name in Bulwark.
    pub name: String,
    /// The QEMU block node name (`-blockdev node-name=…`) of the image's format node.
    pub node: String,
    /// The qdev id of the guest device (`-device …,id=…`).
    pub device: String,
    /// The image file.
    pub path: PathBuf,
    /// `qcow2` (persistent dirty bitmaps) or `raw`.
    pub format: String,
}

/// `NAME.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub name: String,
    /// The VM's stable identity (a UUID); written into the file when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// QEMU's QMP unix socket; absent or silent means the VM is off.
    pub qmp: PathBuf,
    /// The qemu-guest-agent chardev socket, if the guest has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
    /// `linux` or `windows`.
    #[serde(default = "default_os")]
    pub os: String,
    /// The guest's fsfreeze hooks quiesce its applications (the snapshot is then `app`).
    #[serde(default)]
    pub app_hooks: bool,
    /// Where point-in-time fleecing images go (default: the agent's state directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleece_dir: Option<PathBuf>,
    /// How much of each disk the guest may write while one backup reads it (its churn over the
    /// backup window), in percent of the disk's size (default 10): the fleecing images may grow
    /// that large, so a snapshot is refused when the fleece directory has less free space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleece_reserve_percent: Option<u8>,
    /// Opaque VM configuration kept with each recovery point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// A host command run before the snapshot (`sh -c`); failing lowers consistency to crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_snapshot: Option<String>,
    /// A host command run after the snapshot point (`sh -c`); its failure is logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_snapshot: Option<String>,
    /// Bound on each hook, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout_secs: Option<u64>,
    /// What a failing pre-snapshot hook leads to: `freeze` (default: the guest agent's freeze,
    /// file-system consistent), `pause` (crash-consistent) or `fail` (no backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_hook_failure: Option<String>,
    /// How long the guest agent has to answer and freeze (default 10 s); after it, the VM is
    /// paused instead and the snapshot is crash-consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_timeout_secs: Option<u64>,
    /// Restore verification also boots each recovery point (on the coordinator, isolated)
    /// and passes when the guest agent answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_check: bool,
    pub disks: Vec<DiskDef>,
}

fn default_os() -> String {
    "linux".to_owned()
}

/// Why a definition is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DefError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A name that is safe as a file-name part and a QEMU node-name part.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.')
}

impl VmDef {
    /// Parses and validates one definition.
    /// A definition kept with a recovery point (possibly from another host), checked as a file
    /// would be; `None` when there is none or it is unusable.
    pub fn from_kept(config: &[u8]) -> Option<VmDef> {
        if config.is_empty() || config.len() > bulwark_protocol::messages::MAX_VM_CONFIG {
            return None;
        }
        let def: VmDef = toml::from_str(std::str::from_utf8(config).ok()?).ok()?;
        def.validate().ok()?;
        Some(def)
    }

    /// Gives the definition at `path` the settings of `kept` (a recovery point's definition):
    /// the guest's OS, its application hooks and the opaque `config`, nothing else — the name,
    /// identity, sockets, host hooks, fleece directory and disks stay this host's. The rest of
    /// the file is kept as the operator wrote it (comments included), and its mode. Answers
    /// whether anything changed.
    pub fn restore_settings(path: &Path, kept: &VmDef) -> Result<bool, DefError> {
        let current = VmDef::load(path)?;
        if (&current.os, current.app_hooks, &current.config) == (&kept.os, kept.app_hooks, &kept.config) {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path).map_err(|source| DefError::Read { path: path.to_owned(), source })?;
        let invalid = |message: String| DefError::Invalid { path: path.to_owned(), message };
        let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| invalid(e.to_string()))?;
        doc["os"] = toml_edit::value(kept.os.as_str());
        if kept.app_hooks || doc.contains_key("app_hooks") {
            doc["app_hooks"] = toml_edit::value(kept.app_hooks);
        }
        match &kept.config {
            Some(c) => doc["config"] = toml_edit::value(c.as_str()),
            None => {
                doc.remove("config");
            }
        }
        let with = doc.to_string();
        // What is written must load as this VM, with exactly the settings asked for.
        let check: VmDef = toml::from_str(&with).map_err(|e| invalid(e.to_string()))?;
        check.validate().map_err(invalid)?;
        let want = VmDef { os: kept.os.clone(), app_hooks: kept.app_hooks, config: kept.config.clone(), ..current };
        if check != want {
            return Err(invalid("the definition's settings could not be rewritten alone".into()));
        }
        let mode = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0o644);
        bulwark_pki::files::write_atomic(path, with.as_bytes(), mode)
            .map_err(|source| DefError::Read { path: path.to_owned(), source })?;
        Ok(true)
    }

    pub fn load(path: &Path) -> Result<VmDef, DefError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefError::Read { path: path.to_owned(), source })?;
        let invalid = |message: String| DefError::Invalid { path: path.to_owned(), message };
        let mut def: VmDef = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        def.validate().map_err(invalid)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if stem != def.name {
            return Err(invalid(format!("the file must be named after the VM: {}.toml", def.name)));
        }
        if def.uuid.is_none() {
            // A top-level key goes before the first table: prepend it, keeping the rest as the
            // operator wrote it (comments included), and the file's mode.
            let id = uuid::Uuid::new_v4().to_string();
            let mode = std::fs::metadata(path)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .unwrap_or(0o644);
            let with = format!("uuid = \"{id}\"  # written by bulwark-agent: the VM's identity, keep it\n{text}");
            bulwark_pki::files::write_atomic(path, with.as_bytes(), mode)
                .map_err(|source| DefError::Read { path: path.to_owned(), source })?;
            def.uuid = Some(id);
        }
        Ok(def)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!("VM name {:?}: use letters, digits, '-', '_' and '.'", self.name));
        }
        if let Some(id) = &self.uuid {
            uuid::Uuid::parse_str(id).map_err(|e| format!("uuid {id:?}: {e}"))?;
        }
        if !matches!(self.os.as_str(), "linux" | "windows") {
            return Err(format!("os {:?}: use linux or windows", self.os));
        }
        if self.disks.is_empty() {
            return Err("no [[disks]]".into());
        }
        if let Some(p) = self.fleece_reserve_percent.filter(|p| !(1..=100).contains(p)) {
            return Err(format!("fleece_reserve_percent {p}: use 1 to 100"));
        }
        if let Some(f) = &self.on_hook_failure {
            if !matches!(f.as_str(), "freeze" | "pause" | "fail") {
                return Err(format!("on_hook_failure {f:?}: use freeze, pause or fail"));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_name(&d.name) {
                return Err(format!("disk name {:?}: use letters, digits, '-', '_' and '.'", d.name));
            }
            if self.disks[..i].iter().any(|o| o.name == d.name || o.node == d.node || o.device == d.device) {
                return Err(format!("disk {:?}: name, node and device must each be unique", d.name));
            }
            if d.node.is_empty() || d.device.is_empty() {
                return Err(format!("disk {:?}: node and device are required", d.name));
            }
            if !matches!(d.format.as_str(), "qcow2" | "raw") {
                return Err(format!("disk {:?}: format {:?}: use qcow2 or raw", d.name, d.format));
            }
            if !d.path.is_absolute() {
                return Err(format!("disk {:?}: path {} must be absolute", d.name, d.path.display()));
            }
        }
        Ok(())
    }

    pub fn disk(&self, name: &str) -> Option<&DiskDef> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// The hook bound.
    pub fn freeze_timeout(&self) -> Duration {
        Duration::from_secs(self.freeze_timeout_secs.unwrap_or(10).clamp(1, 60))
    }

    /// What a failing pre-snapshot hook leads to.
    pub fn on_hook_failure(&self) -> HookFailure {
        match self.on_hook_failure.as_deref() {
            Some("pause") => HookFailure::Pause,
            Some("fail") => HookFailure::Fail,
            _ => HookFailure::Freeze,
        }
    }

    pub fn hook_timeout(&self) -> Duration {
        Duration::from_secs(self.hook_timeout_secs.unwrap_or(60).clamp(1, 3600))
    }
}

/// `on_hook_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookFailure {
    /// What the guest can still give: its agent's freeze (file-system consistent), else a pause.
    Freeze,
    /// A pause: crash-consistent.
    Pause,
    /// No backup: the job fails with the hook's reason.
    Fail,
}

/// Every `*.toml` of `dir`, parsed; unusable files come back as errors beside the good ones.
pub fn load_dir(dir: &Path) -> Result<Vec<Result<VmDef, DefError>>, DefError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DefError::Read { path: dir.to_owned(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths.iter().map(|p| VmDef::load(p)).collect())
}

/// `bulwark-agent qemu check`: one line per problem (empty: all good). Sockets that do not
/// answer are not problems (the VM is off) unless they exist and refuse to speak QMP.
pub fn check_dir(dir: &Path) -> Result<Vec<String>, DefError> {
    let mut problems = vec![];
    let mut seen: Vec<(String, PathBuf)> = vec![];
    for def in load_dir(dir)? {
        let def = match def {
            Ok(d) => d,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        for d in &def.disks {
            if let Some((other, _)) = seen.iter().find(|(_, p)| *p == d.path) {
                problems.push(format!("{}: disk {} uses {}, as {other} does", def.name, d.name, d.path.display()));
            }
            seen.push((def.name.clone(), d.path.clone()));
            if !d.path.is_file() {
                problems.push(format!("{}: disk {}: no image at {}", def.name, d.name, d.path.display()));
            }
        }
        if def.qmp.exists() {
            match super::qmp::Qmp::connect(&def.qmp, Duration::from_secs(5)) {
                Ok(mut q) => {
                    if let Err(e) = super::graph_matches(&mut q, &def) {
                        problems.push(format!("{}: {e}", def.name));
                    }
                }
                Err(super::qmp::QmpError::Connect { .. }) => {} // a stale socket of a VM that is off
                Err(e) => problems.push(format!("{}: {e}", def.name)),
            }
        }
        if let Some(ga) = &def.guest_agent {
            if !ga.exists() && def.qmp.exists() {
                problems.push(format!("{}: guest agent socket {} does not exist", def.name, ga.display()));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_restore_gives_back_the_settings_and_keeps_everything_of_this_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let text = "# web1, by the operator\nname = \"web1\"\nuuid = \"6f1c1b2e-4a8e-4f43-9d7a-0c5a3e9f2b11\"\nqmp = \"/run/web1.qmp\"\nconfig = \"-m 2048\"  # doubled last week\npre_snapshot = \"/usr/local/bin/quiesce\"\n\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"/v/web1.qcow2\"\nformat = \"qcow2\"\n";
        let path = write(dir.path(), "web1.toml", text);
        let kept_text = "name = \"elsewhere\"\nqmp = \"/other/x.qmp\"\nos = \"windows\"\napp_hooks = true\nconfig = \"-m 512\"\npre_snapshot = \"rm -rf /\"\n[[disks]]\nname = \"os\"\nnode = \"n9\"\ndevice = \"vdz\"\npath = \"/other/x.qcow2\"\nformat = \"raw\"\n";
        let kept = VmDef::from_kept(kept_text.as_bytes()).unwrap();
        assert!(VmDef::restore_settings(&path, &kept).unwrap());
        let after = std::fs::read_to_string(&path).unwrap();
        let def = VmDef::load(&path).unwrap();
        assert_eq!((def.os.as_str(), def.app_hooks, def.config.as_deref()), ("windows", true, Some("-m 512")));
        assert_eq!(def.name, "web1");
        assert_eq!(def.uuid.as_deref(), Some("6f1c1b2e-4a8e-4f43-9d7a-0c5a3e9f2b11"), "its own identity");
        assert_eq!(def.pre_snapshot.as_deref(), Some("/usr/local/bin/quiesce"), "this host's hook, never the point's");
        assert_eq!(def.qmp, PathBuf::from("/run/web1.qmp"));
        assert_eq!((def.disks[0].node.as_str(), def.disks[0].path.to_str()), ("disk0", Some("/v/web1.qcow2")));
        assert!(after.starts_with("# web1, by the operator\n"), "{after}");
        assert!(!VmDef::restore_settings(&path, &kept).unwrap(), "nothing left to change");
        // A point without a config takes it away; the file still loads.
        let bare = VmDef::from_kept(kept_text.replace("config = \"-m 512\"\n", "").as_bytes()).unwrap();
        assert!(VmDef::restore_settings(&path, &bare).unwrap());
        assert_eq!(VmDef::load(&path).unwrap().config, None);
    }

    #[test]
    fn definitions_are_validated_with_clear_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let good = "name = \"web1\"\nqmp = \"/run/web1.qmp\"\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"/v/web1.qcow2\"\nformat = \"qcow2\"\n";
        let def = VmDef::load(&write(dir.path(), "web1.toml", good)).unwrap();
        assert_eq!(def.os, "linux");
        assert_eq!(def.disk("os").map(|d| d.node.as_str()), Some("disk0"));
        let cases = [
            ("other.toml", good.to_owned(), "named after the VM"),
            ("web1.toml", good.replace("qcow2\"", "vmdk\""), "format"),
            ("web1.toml", good.replace("/v/web1", "v/web1"), "absolute"),
            ("web1.toml", good.replace("name = \"web1\"", "name = \"../x\""), "VM name"),
            ("web1.toml", good.replace("name = \"os\"", "name = \"os\"\nextra = 1"), "unknown field"),
            ("web1.toml", format!("{good}[[disks]]\nname = \"os\"\nnode = \"d1\"\ndevice = \"vdb\"\npath = \"/v/b\"\nformat = \"raw\"\n"), "unique"),
        ];
        for (file, text, want) in cases {
            let d = tempfile::tempdir().unwrap();
            let e = VmDef::load(&write(d.path(), file, &text)).unwrap_err().to_string();
            assert!(e.contains(want), "{file}: {e} should mention {want}");
        }
    }

    #[test]
    fn check_reports_every_problem_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        std::fs::write(&img, b"x").unwrap();
        let a = format!(
            "name = \"a\"\nqmp = \"{}/a.qmp\"\n[[disks]]\nname = \"os\"\nnode = \"n\"\ndevice = \"vda\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            dir.path().display(),
            img.display()
        );
        write(dir.path(), "a.toml", &a);
        write(dir.path(), "b.toml", &a.replace("name = \"a\"", "name = \"b\""));
        write(dir.path(), "c.toml", "name = \"c\"\n");
        let problems = check_dir(dir.path()).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("as a does")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("c.toml")), "{problems:?}");
    }
}
