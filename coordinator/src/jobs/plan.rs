//! A VM job's decisions in plain code, with no actors and no I/O: which job really runs and
//! with which change tokens, and what a failure means for the replica. `vm_job` performs
//! them over QUIC; the deterministic simulation (`bulwark-chaos --scenario sim`) drives the
//! same functions with a simulated clock.

use crate::catalog::{JobKind, ReplicaRecord, ReplicaState};
use bulwark_protocol::messages::{DiskInfo, DiskJob, FailureKind};
use std::collections::HashMap;

/// Why a job failed, and what that means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    /// Worth running again later (the agent was away, the transfer broke).
    pub retry: bool,
    /// The replica's continuity is broken: mark it inconsistent with this reason.
    pub inconsistent: Option<String>,
}

impl Failure {
    pub fn stop(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), retry: false, inconsistent: None }
    }

    pub fn retry(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), retry: true, inconsistent: None }
    }

    /// A transfer that died after it started. The replica itself is untouched (it changes
    /// only at commit), but for a synchronization or express full the agent may have
    /// released what it read as committed: the replica's continuity is no longer known.
    pub fn midway(reason: impl Into<String>, kind: JobKind) -> Self {
        let reason = reason.into();
        let inconsistent =
            matches!(kind, JobKind::Sync | JobKind::ExpressFull).then(|| format!("a transfer died midway: {reason}"));
        Self { reason, retry: true, inconsistent }
    }

    /// What an agent's refusal or failure means; `started`: some disk had arrived already.
    pub fn from_agent(kind: FailureKind, reason: String, started: bool, job: JobKind) -> Self {
        match kind {
            FailureKind::TrackingLost => Failure { reason: reason.clone(), retry: false, inconsistent: Some(reason) },
            FailureKind::Refused => Failure::stop(reason),
            FailureKind::NotHere => Failure::retry(reason),
            // Another coordinator owns the VM: nothing this one retries changes that.
            FailureKind::NotOwner => Failure::stop(reason),
            FailureKind::Other if started => Failure::midway(reason, job),
            FailureKind::Other => Failure::retry(reason),
        }
    }
}

/// The job that runs: its kind and what each disk's transfer starts from (the disks the
/// policy leaves out are not among them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kind: JobKind,
    pub disks: Vec<DiskJob>,
}

/// The block size of `vm`'s job: the one its replicas were made with while they are whole
/// copies of its disks as they are (a group's block size changes only new members), else the
/// group's `policy` one (an initial copy is due anyway).
pub fn block_size(disks: &[DiskInfo], replicas: &HashMap<String, ReplicaRecord>, policy: u32) -> u32 {
    let mut sizes = disks.iter().map(|d| {
        replicas.get(d.name.as_str()).filter(|r| r.is_complete(d.size_bytes, r.block_size)).map(|r| r.block_size)
    });
    match sizes.next() {
        Some(Some(first)) if sizes.all(|b| b == Some(first)) => first,
        _ => policy,
    }
}

/// Plans a backup job of `vm` (disks as inventoried, less those in `left_out`) against its
/// replicas. A VM without a complete replica (any disk missing, still being created, resized
/// or at another block size) gets its initial copy first, whatever was asked; a
/// synchronization or express full of an inconsistent replica is refused: a consistency check
/// must repair it first. Swap is left out of synchronizations and express fulls only with the
/// witness that lets the agent check it still is swap.
pub fn plan(
    requested: JobKind,
    vm: &str,
    disks: &[DiskInfo],
    replicas: &HashMap<String, ReplicaRecord>,
    block_size: u32,
    left_out: &[String],
) -> Result<Plan, Failure> {
    let disks: Vec<&DiskInfo> = disks.iter().filter(|d| !left_out.iter().any(|l| l == d.name.as_str())).collect();
    if disks.is_empty() {
        return Err(Failure::stop(format!("{vm} has no disk to protect: every disk is left out (--exclude-disk)")));
    }
    let complete =
        disks.iter().all(|d| replicas.get(d.name.as_str()).is_some_and(|r| r.is_complete(d.size_bytes, block_size)));
    // (A consistency check needs no complete replica: it builds what is missing.)
    let kind = if !complete && matches!(requested, JobKind::Sync | JobKind::ExpressFull) {
        JobKind::Initial
    } else {
        requested
    };
    if matches!(kind, JobKind::Sync | JobKind::ExpressFull) {
        if let Some(r) =
            disks.iter().filter_map(|d| replicas.get(d.name.as_str())).find(|r| r.state == ReplicaState::Inconsistent)
        {
            return Err(Failure::stop(format!(
                "the replica of {vm}/{} is inconsistent ({}): a consistency check must run first",
                r.disk,
                r.reason.as_deref().unwrap_or("no reason recorded")
            )));
        }
    }
    let disks = disks
        .iter()
        .map(|d| DiskJob {
            disk: d.name.clone(),
            token: if kind == JobKind::Initial {
                None
            } else {
                replicas.get(d.name.as_str()).and_then(|r| r.change_token)
            },
            // Only synchronizations and express fulls leave swap out: an initial copy and a
            // consistency check take everything, so the tree always matches its source.
            exclude: swap(kind, replicas.get(d.name.as_str())).map(|r| r.excluded.clone()).unwrap_or_default(),
            witness: swap(kind, replicas.get(d.name.as_str())).map(|r| r.swap_witness.clone()).unwrap_or_default(),
        })
        .collect();
    Ok(Plan { kind, disks })
}

/// The replica whose swap a job of `kind` may leave out: a synchronization's or express
/// full's, when its exclusion has a witness (one read before witnesses were kept has none).
fn swap(kind: JobKind, r: Option<&ReplicaRecord>) -> Option<&ReplicaRecord> {
    r.filter(|r| {
        matches!(kind, JobKind::Sync | JobKind::ExpressFull) && !r.excluded.is_empty() && !r.swap_witness.is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::messages::ChangeToken;
    use bulwark_protocol::DiskId;

    fn disk(name: &str, size: u64) -> DiskInfo {
        DiskInfo { name: DiskId::new(name).unwrap(), size_bytes: size }
    }

    fn replica(disk: &str, size: u64, state: ReplicaState) -> ReplicaRecord {
        ReplicaRecord {
            vm: "web1".into(),
            disk: disk.into(),
            size_bytes: size,
            block_size: 65536,
            state,
            root: (state != ReplicaState::Creating).then_some(bulwark_protocol::blockmap::TreeRoot {
                digest: [0; 32],
                levels: 1,
                blocks: size / 65536,
            }),
            change_token: Some(ChangeToken { generation: 1, sequence: 4 }),
            reason: Some("tracking lost".into()),
            updated_at: 0,
            excluded: vec![(2, 5)],
            swap_witness: vec![(2, [7; 32])],
        }
    }

    fn replicas(rs: Vec<ReplicaRecord>) -> HashMap<String, ReplicaRecord> {
        rs.into_iter().map(|r| (r.disk.clone(), r)).collect()
    }

    #[test]
    fn an_express_full_without_a_complete_replica_is_an_initial_copy() {
        let disks = [disk("os", 1 << 20), disk("data", 1 << 20)];
        let only_os = replicas(vec![replica("os", 1 << 20, ReplicaState::Consistent)]);
        let p = plan(JobKind::ExpressFull, "web1", &disks, &only_os, 65536, &[]).unwrap();
        assert_eq!(p.kind, JobKind::Initial);
        assert!(p.disks.iter().all(|d| d.token.is_none() && d.exclude.is_empty()));
        let resized = replicas(vec![
            replica("os", 1 << 20, ReplicaState::Consistent),
            replica("data", 2 << 20, ReplicaState::Consistent),
        ]);
        assert_eq!(plan(JobKind::Sync, "web1", &disks, &resized, 65536, &[]).unwrap().kind, JobKind::Initial);
        let whole = replicas(vec![
            replica("os", 1 << 20, ReplicaState::Consistent),
            replica("data", 1 << 20, ReplicaState::Consistent),
        ]);
        assert_eq!(plan(JobKind::ExpressFull, "web1", &disks, &whole, 4096, &[]).unwrap().kind, JobKind::Initial);
        let p = plan(JobKind::ExpressFull, "web1", &disks, &whole, 65536, &[]).unwrap();
        assert_eq!(p.kind, JobKind::ExpressFull);
        assert!(p.disks.iter().all(|d| d.token == Some(ChangeToken { generation: 1, sequence: 4 })));
        assert!(p.disks.iter().all(|d| d.exclude == vec![(2, 5)]), "swap is left out of express fulls");
        assert!(p.disks.iter().all(|d| d.witness == vec![(2, [7; 32])]), "with what the agent checks it by");
    }

    #[test]
    fn an_inconsistent_replica_takes_a_check_first_and_a_check_takes_everything() {
        let disks = [disk("os", 1 << 20)];
        let bad = replicas(vec![replica("os", 1 << 20, ReplicaState::Inconsistent)]);
        let err = plan(JobKind::ExpressFull, "web1", &disks, &bad, 65536, &[]).unwrap_err();
        assert!(!err.retry && err.reason.contains("web1/os is inconsistent (tracking lost)"), "{err:?}");
        let p = plan(JobKind::ConsistencyCheck, "web1", &disks, &bad, 65536, &[]).unwrap();
        assert_eq!(p.kind, JobKind::ConsistencyCheck);
        assert!(p.disks[0].exclude.is_empty(), "a check reads swap too");
    }

    #[test]
    fn swap_without_a_witness_is_not_left_out() {
        let disks = [disk("os", 1 << 20)];
        let mut r = replica("os", 1 << 20, ReplicaState::Consistent);
        r.swap_witness.clear();
        let p = plan(JobKind::Sync, "web1", &disks, &replicas(vec![r]), 65536, &[]).unwrap();
        assert!(p.disks[0].exclude.is_empty() && p.disks[0].witness.is_empty());
    }

    #[test]
    fn disks_left_out_are_not_planned_and_a_vm_with_none_left_is_refused() {
        let disks = [disk("os", 1 << 20), disk("scratch", 1 << 20)];
        let only_os = replicas(vec![replica("os", 1 << 20, ReplicaState::Consistent)]);
        let p = plan(JobKind::ExpressFull, "web1", &disks, &only_os, 65536, &["scratch".into()]).unwrap();
        assert_eq!(p.kind, JobKind::ExpressFull, "the left-out disk needs no initial copy");
        assert_eq!(p.disks.len(), 1);
        assert_eq!(p.disks[0].disk.as_str(), "os");
        let err = plan(JobKind::Sync, "web1", &disks, &only_os, 65536, &["os".into(), "scratch".into()]).unwrap_err();
        assert!(!err.retry && err.reason.contains("every disk is left out"), "{err:?}");
    }

    #[test]
    fn a_member_keeps_its_block_size_until_it_needs_a_new_copy() {
        let disks = [disk("os", 1 << 20), disk("data", 1 << 20)];
        let whole = replicas(vec![
            replica("os", 1 << 20, ReplicaState::Consistent),
            replica("data", 1 << 20, ReplicaState::Inconsistent),
        ]);
        assert_eq!(block_size(&disks, &whole, 1 << 20), 65536, "the replicas' own");
        let only_os = replicas(vec![replica("os", 1 << 20, ReplicaState::Consistent)]);
        assert_eq!(block_size(&disks, &only_os, 1 << 20), 1 << 20, "a disk without a replica: the group's");
        let mut odd = whole.clone();
        odd.get_mut("data").unwrap().block_size = 4096;
        assert_eq!(block_size(&disks, &odd, 1 << 20), 1 << 20, "mixed sizes: the group's");
    }

    #[test]
    fn failures_say_what_they_mean_for_the_replica() {
        let f = Failure::from_agent(FailureKind::TrackingLost, "crash".into(), false, JobKind::ExpressFull);
        assert_eq!((f.retry, f.inconsistent.as_deref()), (false, Some("crash")));
        assert!(Failure::from_agent(FailureKind::NotHere, "moved".into(), false, JobKind::Sync).retry);
        assert!(!Failure::from_agent(FailureKind::Refused, "restoring".into(), false, JobKind::Sync).retry);
        let f = Failure::from_agent(FailureKind::Other, "io".into(), true, JobKind::ExpressFull);
        assert!(f.retry && f.inconsistent.is_some(), "a transfer that died midway breaks continuity");
        let f = Failure::from_agent(FailureKind::Other, "io".into(), true, JobKind::Initial);
        assert!(f.inconsistent.is_none(), "an initial copy has no continuity to break");
        assert!(Failure::from_agent(FailureKind::Other, "io".into(), false, JobKind::ExpressFull)
            .inconsistent
            .is_none());
    }
}
