//! What this coordinator knows of its VMs' ownership (tree `vm_owner`): the epoch of its own
//! claim and the claim the VM's host last reported (in an inventory, or answering a claim or a
//! job). The claim itself lives on the cluster's shared storage and only agents change it
//! (`bulwark_protocol::ownership` holds the rules); the catalog keeps what it was told, so
//! `vm list` can say `lost` and jobs are not sent for a VM another coordinator owns.

use super::{decode, encode, Catalog, CatalogError};
use bulwark_protocol::ownership::Owner;
use serde::{Deserialize, Serialize};

/// A VM's ownership as this coordinator knows it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOwnership {
    /// The epoch of this coordinator's claim (0: it holds none).
    pub epoch: u64,
    /// The claim on the VM as its host last reported it (`None`: unclaimed, or never told).
    pub reported: Option<Owner>,
}

impl VmOwnership {
    /// The claim that supersedes this coordinator's, if one does: another coordinator's, or
    /// one under this coordinator's name with an epoch it does not hold (a take-over it never
    /// heard the answer of, or a catalog older than the claim).
    pub fn lost_to(&self, me: &str) -> Option<&Owner> {
        self.reported.as_ref().filter(|o| o.coordinator != me || (self.epoch > 0 && o.epoch != self.epoch))
    }

    /// The epoch a job of this coordinator (`me`) carries for the VM (0: it holds no claim
    /// yet, and the agent claims the VM first), or why it sends none: another claim supersedes
    /// its own.
    pub fn job_epoch(&self, vm: &str, me: &str) -> Result<u64, String> {
        match self.lost_to(me) {
            Some(owner) => Err(format!("{vm} is {}", lost_reason(owner, self.epoch))),
            None => Ok(self.epoch),
        }
    }

    /// The coordinator `vm list` names as the VM's owner: the claim's, else this one (an
    /// unclaimed VM is claimed by the first coordinator whose job reaches it; with one
    /// coordinator, every VM is its own, as `vm list` always said).
    pub fn owner_name(&self, me: &str) -> String {
        self.reported.as_ref().map_or_else(|| me.to_owned(), |o| o.coordinator.clone())
    }
}

/// Why `vm list` shows a VM as `lost`.
pub fn lost_reason(owner: &Owner, held: u64) -> String {
    if held == 0 {
        format!("owned by {owner}: this coordinator holds no claim on it (`bulwark vm take-over` takes it)")
    } else {
        format!(
            "taken over by {owner}; this coordinator's epoch {held} is stale (`bulwark vm take-over` takes it back)"
        )
    }
}

impl Catalog {
    pub fn vm_ownership(&self, name: &str) -> Result<VmOwnership, CatalogError> {
        Ok(self.vm_owner.get(name.as_bytes())?.map(|v| decode("vm_owner", &v)).transpose()?.unwrap_or_default())
    }

    fn put_ownership(&self, name: &str, before: &VmOwnership, after: &VmOwnership) -> Result<(), CatalogError> {
        if before != after {
            self.vm_owner.insert(name.as_bytes(), encode("vm_owner", after)?)?;
        }
        Ok(())
    }

    /// The claim on `name` as an agent reported it. `granted`: the agent wrote or confirmed it
    /// for this coordinator (`me`), whose epoch it then is; a refusal only records who owns it.
    pub fn note_claim(&self, name: &str, owner: Option<&Owner>, granted: bool, me: &str) -> Result<(), CatalogError> {
        let before = self.vm_ownership(name)?;
        let mut after = before.clone();
        after.reported = owner.cloned();
        if let Some(o) = owner.filter(|o| granted && o.coordinator == me) {
            // An epoch below one held means the claims were reset on the storage (what an
            // agent says is not our invariant to assert): the claim now is what counts.
            if o.epoch < before.epoch {
                tracing::warn!(
                    vm = name,
                    held = before.epoch,
                    granted = o.epoch,
                    "a claim granted below the epoch held"
                );
            }
            after.epoch = o.epoch;
        }
        self.put_ownership(name, &before, &after)
    }

    /// The claim an inventory reported for `name` (written only when it changed).
    pub(super) fn note_reported_owner(&self, name: &str, owner: Option<&Owner>) -> Result<(), CatalogError> {
        let before = self.vm_ownership(name)?;
        let after = VmOwnership { reported: owner.cloned(), ..before.clone() };
        self.put_ownership(name, &before, &after)
    }

    pub(super) fn forget_ownership(&self, name: &str) -> Result<(), CatalogError> {
        self.vm_owner.remove(name.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &str, epoch: u64) -> Owner {
        Owner { coordinator: c.into(), epoch }
    }

    #[test]
    fn a_vm_is_lost_to_another_coordinators_claim_or_a_newer_epoch_of_our_name() {
        let mine = VmOwnership { epoch: 2, reported: Some(owner("a", 2)) };
        assert_eq!(mine.lost_to("a"), None);
        assert_eq!(mine.owner_name("a"), "a");
        let taken = VmOwnership { epoch: 2, reported: Some(owner("b", 3)) };
        assert_eq!(taken.lost_to("a"), Some(&owner("b", 3)));
        assert_eq!(taken.owner_name("a"), "b");
        let newer = VmOwnership { epoch: 2, reported: Some(owner("a", 3)) };
        assert!(newer.lost_to("a").is_some());
        // Not claimed yet, or claimed by us before we heard the epoch: not lost.
        assert_eq!(VmOwnership::default().lost_to("a"), None);
        assert_eq!(VmOwnership { epoch: 0, reported: Some(owner("a", 1)) }.lost_to("a"), None);
        assert_eq!(VmOwnership::default().owner_name("a"), "a");
        assert!(lost_reason(&owner("b", 3), 2).contains("epoch 2 is stale"));
    }

    #[test]
    fn only_a_grant_gives_this_coordinator_its_epoch() -> Result<(), CatalogError> {
        let dir = tempfile::tempdir().map_err(CatalogError::Sync)?;
        let cat = Catalog::open(dir.path())?;
        cat.note_claim("web", Some(&owner("a", 4)), false, "a")?;
        assert_eq!(cat.vm_ownership("web")?, VmOwnership { epoch: 0, reported: Some(owner("a", 4)) });
        cat.note_claim("web", Some(&owner("a", 4)), true, "a")?;
        assert_eq!(cat.vm_ownership("web")?.epoch, 4);
        cat.note_reported_owner("web", Some(&owner("b", 5)))?;
        assert_eq!(cat.vm_ownership("web")?, VmOwnership { epoch: 4, reported: Some(owner("b", 5)) });
        assert!(cat.vm_ownership("web")?.lost_to("a").is_some());
        cat.forget_ownership("web")?;
        assert_eq!(cat.vm_ownership("web")?, VmOwnership::default());
        Ok(())
    }
}
