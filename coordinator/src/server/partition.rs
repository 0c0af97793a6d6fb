//! Groups that protect a whole cluster (`group create NAME --cluster C --auto`), partitioned
//! among the deployment's coordinators. Each host's agent lists, in its inventory, the
//! coordinators alive for it (connected now: `partition`); every one of them picks the same
//! owner for an unclaimed VM by rendezvous hashing over that list (`ownership::rendezvous`),
//! and only the one picked asks the agent to claim it, if it has an auto group for the
//! cluster (a coordinator without one leaves its share unprotected, shown as such). The claim is a
//! compare-and-swap on the cluster's shared storage, so two coordinators that see different
//! lists for a moment still cannot both own a VM: the second is told who won. A VM claimed by
//! this coordinator is added to the auto group; one another coordinator claimed is left to it
//! (adding a coordinator moves only VMs nobody claimed yet).

use crate::server::session::{AgentSession, ClaimAnswer, ClaimVm};
use crate::server::State;
use actix::prelude::*;
use bulwark_protocol::messages::Inventory;
use bulwark_protocol::ownership::{rendezvous, ClaimMode};
use bulwark_protocol::VmId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a claim request waits for the agent's answer.
const CLAIM_WAIT: Duration = Duration::from_secs(15);

/// The VMs of one inventory this coordinator should protect through an auto group.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Picked {
    pub group: String,
    /// Unclaimed VMs rendezvous hashing gives this coordinator: claim, then add.
    pub to_claim: Vec<String>,
    /// VMs this coordinator already owns but no group protects: add.
    pub owned: Vec<String>,
}

/// Decides, for host `host`'s inventory, what this coordinator (`me`) takes into the auto group
/// of the host's cluster (`None`: no auto group covers it). `known(vm)` says whether the
/// catalog records the VM on `host` with no group yet.
pub fn pick(
    me: &str,
    group: Option<String>,
    inv: &Inventory,
    mut unprotected_here: impl FnMut(&str) -> bool,
) -> Option<Picked> {
    let group = group?;
    let mut picked = Picked { group, ..Default::default() };
    // An agent's list longer than a deployment can be is not believed (each VM hashes every
    // name in it): nobody is picked, and VMs already owned are still added.
    let partition: &[String] =
        if inv.partition.len() <= bulwark_protocol::messages::MAX_COORDINATORS { &inv.partition } else { &[] };
    for v in &inv.vms {
        if !unprotected_here(&v.name) {
            continue;
        }
        match &v.owner {
            Some(o) if o.coordinator == me => picked.owned.push(v.name.clone()),
            Some(_) => {}
            None if rendezvous(&v.name, partition) == Some(me) => picked.to_claim.push(v.name.clone()),
            None => {}
        }
    }
    Some(picked)
}

/// One session's auto-protection runs: at most one at a time, always on the latest inventory.
#[derive(Debug, Default)]
pub struct AutoQueue {
    pending: Mutex<Option<Inventory>>,
    busy: AtomicBool,
}

impl AutoQueue {
    /// Offers `inv` (it replaces one not yet looked at); runs unless a run is going on, which
    /// then takes it next.
    pub fn offer(self: &Arc<Self>, state: Arc<State>, session: Addr<AgentSession>, host: String, inv: Inventory) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(inv);
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        actix_rt::spawn(async move {
            loop {
                let next = me.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
                match next {
                    Some(inv) => run(&state, &session, &host, inv).await,
                    None => {
                        me.busy.store(false, Ordering::Release);
                        // An offer that came between the take and the store runs now.
                        let again = me.pending.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                        if !again || me.busy.swap(true, Ordering::AcqRel) {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn run(state: &Arc<State>, session: &Addr<AgentSession>, host: &str, inv: Inventory) {
    let catalog = state.store.catalog().clone();
    let me = state.authority.config().name.clone();
    let (h, m) = (host.to_owned(), me.clone());
    let picked = tokio::task::spawn_blocking(move || {
        let cluster = catalog.cluster_of(&h).map_err(|e| e.to_string())?;
        let group = catalog.auto_group_of(&cluster).map_err(|e| e.to_string())?;
        Ok::<_, String>(pick(&m, group, &inv, |vm| {
            matches!(catalog.vm(vm), Ok(Some(r)) if r.host == h && r.group.is_none())
                && !matches!(catalog.vm_identity(vm), Ok(Some(i)) if i.conflict.is_some())
        }))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let picked = match picked {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => return tracing::error!(host, error = %e, "cannot decide which VMs to protect"),
    };
    let mut add = picked.owned;
    let mut waiting = vec![];
    for vm in picked.to_claim {
        let Ok(id) = VmId::new(vm.clone()) else { continue };
        let (done, answer) = tokio::sync::oneshot::channel::<ClaimAnswer>();
        session.do_send(ClaimVm { vm: id, mode: ClaimMode::Acquire, done });
        waiting.push((vm, answer));
    }
    for (vm, answer) in waiting {
        match tokio::time::timeout(CLAIM_WAIT, answer).await {
            Ok(Ok(a)) if a.owner.as_ref().is_some_and(|o| o.coordinator == me) => add.push(vm),
            Ok(Ok(a)) => {
                tracing::info!(%vm, owner = ?a.owner, refused = ?a.refused, "VM claimed by another coordinator: left to it")
            }
            Ok(Err(_)) | Err(_) => tracing::warn!(%vm, "no answer to the claim: tried again with the next inventory"),
        }
    }
    if add.is_empty() {
        return;
    }
    add.sort();
    tracing::info!(host, group = %picked.group, vms = add.len(), "protecting the cluster's VMs this coordinator owns");
    if let bulwark_protocol::messages::AdminResponse::Error { message } =
        crate::server::protect::group_add(state, picked.group.clone(), add).await
    {
        tracing::warn!(host, group = %picked.group, error = %message, "cannot add the cluster's VMs to the group");
    }
}

/// Asks every connected host of `cluster` for its inventory now (an auto group was made).
pub async fn refresh(state: &Arc<State>, cluster: &str) {
    let hosts = state.registry.send(crate::server::registry::ListConnected).await.unwrap_or_default();
    let hosts: Vec<String> = hosts
        .into_iter()
        .map(|h| h.host)
        .filter(|h| matches!(state.store.catalog().cluster_of(h), Ok(c) if c == cluster))
        .collect();
    crate::server::protect::fresh_inventory_of(state, hosts).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::messages::{GuestOs, PowerState, VmInfo};
    use bulwark_protocol::ownership::Owner;

    fn vm(name: &str, owner: Option<&str>) -> VmInfo {
        VmInfo {
            id: VmId::new(name).unwrap(),
            name: name.into(),
            power: PowerState::Running,
            os: GuestOs::Linux,
            integration_services: false,
            disks: vec![],
            change_generation: None,
            owner: owner.map(|c| Owner { coordinator: c.into(), epoch: 1 }),
        }
    }

    #[test]
    fn each_unclaimed_vm_is_picked_by_exactly_one_coordinator_and_claimed_ones_by_none() {
        let partition: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut vms: Vec<VmInfo> = (0..300).map(|i| vm(&format!("vm-{i}"), None)).collect();
        vms.push(vm("theirs", Some("b")));
        vms.push(vm("mine", Some("a")));
        let inv = Inventory { vms, partition };
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for me in ["a", "b", "c"] {
            let p = pick(me, Some("all".into()), &inv, |_| true).unwrap();
            assert!(p.to_claim.len() > 60, "{me}: {}", p.to_claim.len());
            for v in p.to_claim {
                *seen.entry(v).or_default() += 1;
            }
            let owned: Vec<String> = match me {
                "a" => vec!["mine".into()],
                "b" => vec!["theirs".into()],
                _ => vec![],
            };
            assert_eq!(p.owned, owned, "{me} adds the VMs it already owns");
        }
        assert_eq!(seen.len(), 300);
        assert!(seen.values().all(|&n| n == 1));
        // A coordinator the agent does not list (not connected, or no auto group) picks none.
        assert!(pick("d", Some("all".into()), &inv, |_| true).unwrap().to_claim.is_empty());
        assert_eq!(pick("a", None, &inv, |_| true), None);
        // A hostile agent's endless list picks nobody.
        let flood = Inventory { partition: (0..100_000).map(|i| format!("c{i}")).collect(), ..inv };
        assert!(pick("c7", Some("all".into()), &flood, |_| true).unwrap().to_claim.is_empty());
    }
}
