//! The QEMU command line a VM definition expects: the QMP socket, each disk as a `file` node
//! plus a format node named `node`, the guest device with id `device`, and the guest agent's
//! virtio-serial port. `bulwark-agent qemu command` prints it, so an operator starts QEMU the
//! way the agent will find it; the tests and the benchmark start their VMs with it.

use super::defs::VmDef;
use super::qmp::{Qmp, QmpError};
use std::path::Path;
use std::time::{Duration, Instant};

/// A path inside a QEMU option value, where a comma is written twice.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The device-side arguments of `def` (no machine, memory or boot options).
pub fn device_args(def: &VmDef) -> Vec<String> {
    let mut a = vec!["-qmp".to_owned(), format!("unix:{},server=on,wait=off", opt_path(&def.qmp))];
    for d in &def.disks {
        a.push("-blockdev".into());
        a.push(format!("node-name={}-file,driver=file,filename={}", d.node, opt_path(&d.path)));
        a.push("-blockdev".into());
        a.push(format!("node-name={},driver={},file={}-file", d.node, d.format, d.node));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive={},id={}", d.node, d.device));
    }
    if let Some(ga) = &def.guest_agent {
        a.extend(["-device".into(), "virtio-serial-pci,id=bulwark-vser".into()]);
        a.push("-chardev".into());
        a.push(format!("socket,id=bulwark-qga,path={},server=on,wait=off", opt_path(ga)));
        a.push("-device".into());
        a.push("virtserialport,chardev=bulwark-qga,name=org.qemu.guest_agent.0".into());
    }
    a
}

/// A whole command line: `qemu-system-x86_64` on a q35 machine with `accel` (`kvm:tcg` uses
/// KVM where the host has it) and `memory_mib` of RAM, plus [`device_args`].
pub fn command_line(def: &VmDef, accel: &str, memory_mib: u64) -> Vec<String> {
    let mut a = vec![
        "qemu-system-x86_64".to_owned(),
        "-machine".into(),
        format!("q35,accel={accel}"),
        "-m".into(),
        memory_mib.to_string(),
    ];
    a.extend(device_args(def));
    a
}

/// [`command_line`] as a `Command` for a VM with no default devices and no display, its
/// stdin and stdout closed (QEMU's own errors still reach stderr): how the tests and the
/// benchmark run their VMs.
pub fn headless(def: &VmDef, accel: &str, memory_mib: u64) -> std::process::Command {
    let line = command_line(def, accel, memory_mib);
    let mut cmd = std::process::Command::new(&line[0]);
    cmd.args(&line[1..])
        .args(["-nodefaults", "-display", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    cmd
}

/// Quotes `arg` for a POSIX shell when it needs it.
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=,.:/+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Waits until QEMU's monitor at `qmp` answers, for at most `timeout`.
pub fn wait_for_qmp(qmp: &Path, timeout: Duration) -> Result<(), QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Qmp::connect(qmp, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_every_node_device_and_socket() {
        let text = "name = \"web1\"\nqmp = \"/run/b/web1.qmp\"\nguest_agent = \"/run/b/web1.qga\"\n[[disks]]\nname = \"os\"\nnode = \"disk0\"\ndevice = \"vda\"\npath = \"/vm/web 1,a.qcow2\"\nformat = \"qcow2\"\n";
        let def: VmDef = toml::from_str(text).unwrap();
        let line = command_line(&def, "tcg", 64).iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ");
        assert_eq!(
            line,
            "qemu-system-x86_64 -machine q35,accel=tcg -m 64 -qmp unix:/run/b/web1.qmp,server=on,wait=off \
             -blockdev 'node-name=disk0-file,driver=file,filename=/vm/web 1,,a.qcow2' \
             -blockdev node-name=disk0,driver=qcow2,file=disk0-file -device virtio-blk-pci,drive=disk0,id=vda \
             -device virtio-serial-pci,id=bulwark-vser \
             -chardev socket,id=bulwark-qga,path=/run/b/web1.qga,server=on,wait=off \
             -device virtserialport,chardev=bulwark-qga,name=org.qemu.guest_agent.0"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
