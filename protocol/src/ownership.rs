//! Which coordinator of a deployment owns a VM: a claim (owner, epoch) kept where every node of
//! the VM's cluster sees it, and the rules for changing it and for admitting a job under it.
//! Plain decisions only: the agent reads and writes the claim (compare-and-swap under a file
//! lock, `bulwark_agent::claims`) and asks these functions what to do.
//!
//! The rules:
//! - a VM is owned by at most one coordinator at a time;
//! - an unclaimed VM is claimed by the first coordinator that asks (epoch 1); asking again
//!   changes nothing (the same claim is the answer);
//! - a VM claimed by another coordinator is refused, naming the owner, unless the request is an
//!   explicit take-over: that writes a new claim with the next epoch, whoever held it;
//! - every job names the epoch its coordinator holds; a job whose (coordinator, epoch) is not the
//!   claim now is refused, so an old owner's requests stop the moment a take-over is written.
//!   A job with epoch 0 ("this coordinator holds no claim yet") acquires the VM first.

use serde::{Deserialize, Serialize};

/// The longest coordinator name a claim holds (a certificate identity).
pub const MAX_OWNER_NAME: usize = 253;

/// A VM's owner: the coordinator's name (its certificate identity) and the epoch of its claim.
/// Epochs only grow for a VM: a take-over writes the next one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub coordinator: String,
    pub epoch: u64,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "coordinator {} (epoch {})", self.coordinator, self.epoch)
    }
}

/// What a claim request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimMode {
    /// Claim the VM if nobody owns it; keep it if this coordinator already does.
    Acquire,
    /// Take the VM whoever owns it (`bulwark vm take-over`): the next epoch.
    TakeOver,
}

/// Why a claim or a job was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClaimRefusal {
    /// Another coordinator owns the VM.
    #[error("VM {vm} is owned by {owner}; take it over explicitly (`bulwark vm take-over {vm}` on the coordinator that should protect it)")]
    OwnedBy { vm: String, owner: Owner },
    /// This coordinator's claim was superseded (a take-over, or a claim it no longer remembers).
    #[error("VM {vm}: this coordinator's epoch {held} is stale; the VM is now owned by {owner}")]
    Stale { vm: String, held: u64, owner: Owner },
    /// The job names an epoch but the VM carries no claim (it was deleted or never written).
    #[error("VM {vm} carries no claim, but the job names epoch {held}: the coordinator must claim it again")]
    Unclaimed { vm: String, held: u64 },
    /// The coordinator's name cannot be a claim's owner.
    #[error("{0:?} cannot own a VM (empty or longer than {MAX_OWNER_NAME} bytes)")]
    BadOwner(String),
}

impl ClaimRefusal {
    /// The claim that stood in the way, when there is one.
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            ClaimRefusal::OwnedBy { owner, .. } | ClaimRefusal::Stale { owner, .. } => Some(owner),
            ClaimRefusal::Unclaimed { .. } | ClaimRefusal::BadOwner(_) => None,
        }
    }
}

fn check_name(me: &str) -> Result<(), ClaimRefusal> {
    if me.is_empty() || me.len() > MAX_OWNER_NAME {
        return Err(ClaimRefusal::BadOwner(me.chars().take(64).collect()));
    }
    Ok(())
}

/// The claim to hold after `me` asks for VM `vm` in `mode`, given the claim now (`None`: never
/// claimed). Equal to `current` when nothing changes.
pub fn claim(vm: &str, current: Option<&Owner>, me: &str, mode: ClaimMode) -> Result<Owner, ClaimRefusal> {
    check_name(me)?;
    match (current, mode) {
        (None, _) => Ok(Owner { coordinator: me.to_owned(), epoch: 1 }),
        (Some(o), ClaimMode::Acquire) if o.coordinator == me => Ok(o.clone()),
        (Some(o), ClaimMode::Acquire) => Err(ClaimRefusal::OwnedBy { vm: vm.to_owned(), owner: o.clone() }),
        (Some(o), ClaimMode::TakeOver) => {
            // An epoch at the top of the range cannot be superseded: refusing beats wrapping
            // to an epoch an old owner might still hold.
            let epoch =
                o.epoch.checked_add(1).ok_or_else(|| ClaimRefusal::OwnedBy { vm: vm.to_owned(), owner: o.clone() })?;
            Ok(Owner { coordinator: me.to_owned(), epoch })
        }
    }
}

/// Whether `me`'s job naming `epoch` may act on VM `vm` under the claim now. Epoch 0 is decided
/// by [`claim`] with [`ClaimMode::Acquire`] instead (the agent writes that claim first).
pub fn admit(vm: &str, current: Option<&Owner>, me: &str, epoch: u64) -> Result<(), ClaimRefusal> {
    check_name(me)?;
    debug_assert!(epoch > 0, "epoch 0 acquires; it is not admitted");
    match current {
        None => Err(ClaimRefusal::Unclaimed { vm: vm.to_owned(), held: epoch }),
        Some(o) if o.coordinator == me && o.epoch == epoch => Ok(()),
        Some(o) if o.coordinator == me => Err(ClaimRefusal::Stale { vm: vm.to_owned(), held: epoch, owner: o.clone() }),
        Some(o) if o.epoch > epoch => Err(ClaimRefusal::Stale { vm: vm.to_owned(), held: epoch, owner: o.clone() }),
        Some(o) => Err(ClaimRefusal::OwnedBy { vm: vm.to_owned(), owner: o.clone() }),
    }
}

/// What a job with `epoch` from `me` does on VM `vm`: acquires it (the claim to write, `Some`
/// only when it changes) or is admitted under the claim now. A VM without a claim is acquired
/// by the first job that reaches it: with epoch 0 ("this coordinator holds none yet") at epoch
/// 1, with the epoch the job names otherwise (the claims directory was emptied or replaced, or
/// the VM now runs where another one is kept: nobody owns it there, and the coordinator keeps
/// the epoch it knows).
pub fn for_job(vm: &str, current: Option<&Owner>, me: &str, epoch: u64) -> Result<Option<Owner>, ClaimRefusal> {
    if epoch == 0 {
        let next = claim(vm, current, me, ClaimMode::Acquire)?;
        return Ok((current != Some(&next)).then_some(next));
    }
    if current.is_none() {
        check_name(me)?;
        return Ok(Some(Owner { coordinator: me.to_owned(), epoch }));
    }
    admit(vm, current, me, epoch).map(|()| None)
}

/// The coordinator rendezvous hashing (highest random weight) gives VM `key` among
/// `candidates`: each candidate's weight is a hash of (candidate, key), the highest wins. Every
/// coordinator that sees the same candidates picks the same one; a candidate added takes only
/// the keys it now wins, a candidate gone gives up only its own. `None` without candidates.
pub fn rendezvous<'a>(key: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            let mut h = blake3::Hasher::new_derive_key("bulwark rendezvous v1");
            h.update(&(c.len() as u64).to_le_bytes());
            h.update(c.as_bytes());
            h.update(key.as_bytes());
            (*h.finalize().as_bytes(), c.as_str())
        })
        .max()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("coord-{i}")).collect()
    }

    #[test]
    fn rendezvous_spreads_vms_and_a_new_coordinator_moves_only_what_it_wins() {
        let three = names(3);
        let four = names(4);
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        let mut moved = 0;
        for i in 0..3000 {
            let key = format!("vm-{i}");
            let a = rendezvous(&key, &three).unwrap();
            *counts.entry(a).or_default() += 1;
            let b = rendezvous(&key, &four).unwrap();
            if a != b {
                assert_eq!(b, "coord-3", "a key only ever moves to the new coordinator");
                moved += 1;
            }
            // The order candidates are listed in does not matter.
            let mut reversed = three.clone();
            reversed.reverse();
            assert_eq!(rendezvous(&key, &reversed), Some(a));
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| (800..1200).contains(&n)), "{counts:?}");
        assert!((600..900).contains(&moved), "about a quarter moves: {moved}");
        assert_eq!(rendezvous("vm", &[]), None);
    }
    use proptest::prelude::*;

    fn owner(c: &str, epoch: u64) -> Owner {
        Owner { coordinator: c.into(), epoch }
    }

    #[test]
    fn the_first_coordinator_to_ask_owns_an_unclaimed_vm_and_asking_again_changes_nothing() {
        assert_eq!(claim("web", None, "a", ClaimMode::Acquire), Ok(owner("a", 1)));
        assert_eq!(claim("web", Some(&owner("a", 3)), "a", ClaimMode::Acquire), Ok(owner("a", 3)));
        match claim("web", Some(&owner("a", 3)), "b", ClaimMode::Acquire) {
            Err(e @ ClaimRefusal::OwnedBy { .. }) => {
                let text = e.to_string();
                assert!(text.contains("owned by coordinator a (epoch 3)"), "{text}");
                assert!(text.contains("take-over web"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_take_over_writes_the_next_epoch_and_the_old_owner_is_refused_from_then_on() {
        let taken = claim("web", Some(&owner("a", 3)), "b", ClaimMode::TakeOver);
        assert_eq!(taken, Ok(owner("b", 4)));
        let now = owner("b", 4);
        assert_eq!(admit("web", Some(&now), "b", 4), Ok(()));
        assert!(matches!(admit("web", Some(&now), "a", 3), Err(ClaimRefusal::Stale { held: 3, .. })));
        // The old owner cannot win it back by acquiring, only by taking it over again.
        assert!(matches!(for_job("web", Some(&now), "a", 0), Err(ClaimRefusal::OwnedBy { .. })));
        assert_eq!(claim("web", Some(&now), "a", ClaimMode::TakeOver), Ok(owner("a", 5)));
        // Taking over one's own VM still moves the epoch (a coordinator rebuilt under its old name).
        assert_eq!(claim("web", Some(&now), "b", ClaimMode::TakeOver), Ok(owner("b", 5)));
        assert!(matches!(admit("web", Some(&owner("b", 5)), "b", 4), Err(ClaimRefusal::Stale { .. })));
        // The top of the range is never wrapped.
        assert!(claim("web", Some(&owner("a", u64::MAX)), "b", ClaimMode::TakeOver).is_err());
    }

    #[test]
    fn a_job_acquires_with_epoch_zero_and_is_admitted_only_under_its_own_claim() {
        assert_eq!(for_job("web", None, "a", 0), Ok(Some(owner("a", 1))));
        assert_eq!(for_job("web", Some(&owner("a", 2)), "a", 0), Ok(None));
        assert_eq!(for_job("web", Some(&owner("a", 2)), "a", 2), Ok(None));
        // A claim that vanished (claims directory emptied, another storage) is taken again by
        // the first job that reaches the VM, under the epoch its coordinator holds.
        assert_eq!(for_job("web", None, "a", 2), Ok(Some(owner("a", 2))));
        assert!(matches!(admit("web", None, "a", 2), Err(ClaimRefusal::Unclaimed { .. })));
        assert!(matches!(for_job("web", Some(&owner("b", 1)), "a", 2), Err(ClaimRefusal::OwnedBy { .. })));
        for bad in ["", &"x".repeat(MAX_OWNER_NAME + 1)] {
            assert!(matches!(for_job("web", None, bad, 0), Err(ClaimRefusal::BadOwner(_))));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Job { who: usize, epoch: u64 },
        Claim { who: usize, take_over: bool },
    }

    proptest! {
        /// Whatever the interleaving of claims, take-overs and jobs from three coordinators,
        /// each coordinator remembering only the epochs its own requests returned: epochs never
        /// go down, and a job is admitted only for the one owner of the claim now, under the
        /// epoch of that claim.
        #[test]
        fn one_owner_acts_at_a_time(ops in proptest::collection::vec(
            prop_oneof![
                (0usize..3, 0u64..6).prop_map(|(who, epoch)| Op::Job { who, epoch }),
                (0usize..3, any::<bool>()).prop_map(|(who, take_over)| Op::Claim { who, take_over }),
            ],
            1..60,
        )) {
            let names = ["a", "b", "c"];
            let mut current: Option<Owner> = None;
            for op in ops {
                let before = current.clone();
                match op {
                    Op::Claim { who, take_over } => {
                        let mode = if take_over { ClaimMode::TakeOver } else { ClaimMode::Acquire };
                        if let Ok(next) = claim("vm", current.as_ref(), names[who], mode) {
                            current = Some(next);
                        }
                    }
                    Op::Job { who, epoch } => {
                        if let Ok(write) = for_job("vm", current.as_ref(), names[who], epoch) {
                            if let Some(next) = write {
                                current = Some(next);
                            }
                            let now = current.clone();
                            prop_assert!(now.as_ref().is_some_and(|o| o.coordinator == names[who]));
                            prop_assert!(epoch == 0 || now.as_ref().is_some_and(|o| o.epoch == epoch));
                        }
                    }
                }
                let (b, a) = (before.map_or(0, |o| o.epoch), current.as_ref().map_or(0, |o| o.epoch));
                prop_assert!(a >= b, "epoch went down: {b} -> {a}");
            }
        }
    }
}
