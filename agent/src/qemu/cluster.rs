//! QEMU clusters on shared storage: several nodes share one definitions directory (`[hypervisor]
//! shared = true`, or `run --qemu-shared`). A node reports only the VMs whose QEMU runs on it,
//! and each VM's tracking state (generation, confirmed token, what is frozen or held, a restore
//! in progress, the node that last ran it) lives beside the definitions in `vm_dir/state/`, so
//! a live migration keeps incremental backups: QEMU carries the persistent dirty bitmap in the
//! qcow2 image, and the state the token is checked against moves with it.
//!
//! Decisions only; the backend probes QMP and reads the state.

use super::defs::VmDef;

/// What this node sees of a VM's QEMU through its QMP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// QEMU answered with this run state (`running`, `paused`, `inmigrate`, …).
    Status(String),
    /// The socket accepted but QEMU did not answer in time (hung, or busy).
    NoAnswer,
    /// Nothing listens: no QEMU runs this VM on this node.
    Off,
}

/// Whether the VM is this node's (`me`): its QEMU runs here — a migration's destination that
/// has not taken over yet (`inmigrate`), a source that handed over (`postmigrate`) and a QEMU
/// waiting to be started (`prelaunch`) are not the VM's node — or, when it runs nowhere, this
/// node ran it last.
pub(super) fn runs_here(seen: &Seen, last_host: Option<&str>, me: &str) -> bool {
    match seen {
        Seen::Status(s) => !matches!(s.as_str(), "inmigrate" | "postmigrate" | "prelaunch"),
        Seen::NoAnswer => true,
        Seen::Off => last_host == Some(me),
    }
}

/// A definition's socket paths for node `me`: `{host}` in `qmp` and `guest_agent` is replaced
/// by the node's name (each node's QEMU listens on its own sockets, as two nodes sharing one
/// machine must).
pub(super) fn for_node(mut def: VmDef, me: &str) -> VmDef {
    def.qmp = expand(&def.qmp, me);
    def.guest_agent = def.guest_agent.as_deref().map(|p| expand(p, me));
    def
}

fn expand(path: &std::path::Path, me: &str) -> std::path::PathBuf {
    match path.to_str() {
        Some(p) if p.contains("{host}") => std::path::PathBuf::from(p.replace("{host}", me)),
        // Any other path (one that is not UTF-8 too) stays exactly as written.
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_the_node_s_where_its_qemu_runs_or_last_ran() {
        let running = Seen::Status("running".into());
        assert!(runs_here(&running, Some("node1"), "node2"), "it runs here now, wherever it ran before");
        assert!(runs_here(&Seen::Status("paused".into()), None, "node2"));
        for elsewhere in ["inmigrate", "postmigrate", "prelaunch"] {
            assert!(!runs_here(&Seen::Status(elsewhere.into()), Some("node2"), "node2"), "{elsewhere}");
        }
        assert!(runs_here(&Seen::NoAnswer, None, "node2"), "a hung QEMU here is still here");
        assert!(runs_here(&Seen::Off, Some("node2"), "node2"));
        assert!(!runs_here(&Seen::Off, Some("node1"), "node2"));
        assert!(!runs_here(&Seen::Off, None, "node2"), "an off VM no node ran is nobody's");
    }

    #[test]
    fn host_in_socket_paths_names_the_node() {
        let text = "name = \"web1\"\nqmp = \"/run/{host}/web1.qmp\"\nguest_agent = \"/run/{host}/web1.qga\"\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"/vm/web1.qcow2\"\nformat = \"qcow2\"\n";
        let def: VmDef = toml::from_str(text).unwrap();
        let def = for_node(def, "node2");
        assert_eq!(def.qmp, std::path::PathBuf::from("/run/node2/web1.qmp"));
        assert_eq!(def.guest_agent, Some(std::path::PathBuf::from("/run/node2/web1.qga")));
        assert_eq!(def.disks[0].path, std::path::PathBuf::from("/vm/web1.qcow2"));
    }
}
