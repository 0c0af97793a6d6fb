//! The agent's inventory: the VMs of its host, as the hypervisor backend reports them.

use crate::sim::{self, Power, SimError};
use bulwark_protocol::messages::{DiskInfo, GuestOs, Inventory, PowerState, VmInfo};
use bulwark_protocol::{DiskId, VmId};
use std::path::Path;

/// The VMs on `root` whose current host is `host`.
pub fn sim_inventory(root: &Path, host: &str) -> Result<Inventory, SimError> {
    let mut vms = vec![];
    for name in sim::vm::list_vms(root)? {
        let mut vm = sim::Vm::open(root, &name)?;
        if vm.config.host != host {
            continue;
        }
        if vm.config.uuid.is_none() {
            vm.config.uuid = Some(uuid::Uuid::new_v4().to_string());
            vm.save()?;
        }
        let c = &vm.config;
        let uuid = c.uuid.clone().unwrap_or_default();
        let disks = c
            .disks
            .iter()
            .map(|d| {
                Ok(DiskInfo {
                    name: DiskId::new(d.name.clone()).map_err(|e| SimError::Invalid(e.to_string()))?,
                    size_bytes: d.size,
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        vms.push(VmInfo {
            id: VmId::new(uuid).map_err(|e| SimError::Invalid(e.to_string()))?,
            name: c.name.clone(),
            power: match c.power {
                Power::Running => PowerState::Running,
                Power::Paused => PowerState::Paused,
                Power::Off => PowerState::Off,
            },
            os: if c.os == "linux" { GuestOs::Linux } else { GuestOs::Windows },
            integration_services: c.integration_services,
            disks,
            change_generation: Some(c.generation),
            owner: None,
        });
    }
    Ok(Inventory { vms, partition: vec![] })
}
