//! A recovery of a VM's disks — onto the VM itself, or as a new VM on a host — as a plain
//! state machine beside [`super::VmJob`], with the same effects: the request to the agent, a
//! restore stream per disk (each driven by `compare::RestoreDisk`), the agent's result. A
//! recovery is never retried on its own: the target may be half-written, and it stays marked
//! as being restored until a recovery completes; the operator decides.

use super::{Effect, JobCore, JobMachine};
use crate::catalog::{JobRecord, RecoveryPointRecord};
use crate::jobs::plan::Failure;
use bulwark_protocol::blockmap::TreeRoot;
use bulwark_protocol::messages::{CoordinatorMessage, DiskInfo, GuestOs, JobOutcome, NewVm, RestoreRequest};
use bulwark_protocol::transfer::TransferMode;
use bulwark_protocol::{DiskId, JobId, VmId};
use std::collections::{BTreeSet, VecDeque};

/// What a recovery starts from.
pub struct RecoverySetup {
    pub record: JobRecord,
    /// The recovery point (of the job's VM).
    pub rp: RecoveryPointRecord,
    /// Where the VM runs now (a recovery onto it goes there).
    pub vm_host: String,
    pub os: GuestOs,
    /// None: onto the original VM; else a new VM on this host…
    pub to_host: Option<String>,
    /// …named this (default `VM-restored`).
    pub name: Option<String>,
    pub id_key: Option<[u8; 32]>,
    pub lease_ms: u64,
    /// Instant recovery (with `to_host` only): the agent makes the VM's disks overlays of
    /// exports it serves; no disk is streamed by the job.
    pub instant: bool,
    /// The epoch of this coordinator's claim on the original VM (0: none; a new VM is claimed
    /// by the agent that makes it).
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Finished,
}

/// One recovery of one recovery point.
#[derive(Debug)]
pub struct Recovery {
    core: JobCore,
    rp: RecoveryPointRecord,
    target: String,
    host: String,
    block_size: u32,
    lease_ms: u64,
    deadline: u64,
    phase: Phase,
    open: Option<String>,
    restored: BTreeSet<String>,
    /// The agent's result, come while a disk's stream was still open.
    pending: Option<JobOutcome>,
    instant: bool,
}

impl Recovery {
    /// Checks the recovery point and queues the request to the target's agent.
    pub fn start(setup: RecoverySetup, now_ms: u64) -> Result<Recovery, Failure> {
        let RecoverySetup { record, rp, vm_host, os, to_host, name, id_key, lease_ms, instant, epoch } = setup;
        if instant && to_host.is_none() {
            return Err(Failure::stop("an instant recovery makes a new VM: it needs a host"));
        }
        let (target, host, create, epoch) = match to_host {
            None => (rp.vm.clone(), vm_host, None, epoch),
            Some(h) => (
                name.unwrap_or_else(|| format!("{}-restored", rp.vm)),
                h,
                Some(NewVm { os, integration_services: true }),
                0,
            ),
        };
        let block_size = rp.disks.first().map_or(crate::policy::DEFAULT_BLOCK_SIZE, |d| d.block_size);
        if rp.disks.iter().any(|d| d.block_size != block_size) {
            return Err(Failure::stop("the recovery point's disks have different block sizes"));
        }
        let disks = rp
            .disks
            .iter()
            .map(|d| Ok(DiskInfo { name: DiskId::new(d.name.clone())?, size_bytes: d.size_bytes }))
            .collect::<Result<Vec<_>, bulwark_protocol::ids::IdError>>()
            .map_err(|e| Failure::stop(e.to_string()))?;
        let request = RestoreRequest {
            job: JobId(record.id),
            vm: VmId::new(target.clone()).map_err(|e| Failure::stop(e.to_string()))?,
            create,
            disks,
            block_size,
            id_key,
            lease_secs: (lease_ms / 1000).min(u64::from(u32::MAX)) as u32,
            config: rp.config.clone(),
            instant,
            epoch,
        };
        Ok(Recovery {
            core: JobCore::new(record, VecDeque::from([Effect::Send(CoordinatorMessage::RestoreRequest(request))])),
            rp,
            target,
            host,
            block_size,
            lease_ms,
            deadline: now_ms.saturating_add(lease_ms),
            phase: Phase::Running,
            open: None,
            restored: BTreeSet::new(),
            pending: None,
            instant,
        })
    }

    /// The host the recovery runs on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The VM written.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn next_timeout(&self) -> Option<u64> {
        (self.phase == Phase::Running).then_some(self.deadline)
    }

    fn finish(&mut self, r: Result<(), Failure>) {
        if self.phase == Phase::Finished {
            return;
        }
        self.phase = Phase::Finished;
        self.open = None;
        self.core.end(r);
    }

    fn not_fully_restored(&self, why: String) -> Failure {
        Failure::stop(format!("{why}; {} is marked as not fully restored: recover it again", self.target))
    }

    /// The agent opened the restore stream of `disk`: answers the recovery point's tree of
    /// it, or why the stream does not fit (then the recovery has failed).
    pub fn stream_opened(
        &mut self,
        disk: &str,
        mode: TransferMode,
        blocks: u64,
        block_size: u32,
        now_ms: u64,
    ) -> Result<TreeRoot, String> {
        if self.phase != Phase::Running {
            return Err("the recovery is over".into());
        }
        self.deadline = now_ms.saturating_add(self.lease_ms);
        let fits = self.rp.disks.iter().find(|d| d.name == disk).and_then(|d| {
            let want = d.size_bytes.div_ceil(u64::from(self.block_size));
            (mode == TransferMode::Restore
                && !self.instant
                && blocks == want
                && block_size == self.block_size
                && self.open.is_none()
                && !self.restored.contains(disk))
            .then_some(d.root)
        });
        match fits {
            Some(root) => {
                self.open = Some(disk.to_owned());
                Ok(root)
            }
            None => {
                let why = format!("the agent's restore stream for disk {disk} does not fit the recovery point");
                self.finish(Err(Failure::stop(why.clone())));
                Err(why)
            }
        }
    }

    /// Disk `disk` is written and the agent said so.
    pub fn disk_restored(&mut self, disk: &str, now_ms: u64) {
        if self.phase != Phase::Running || self.open.as_deref() != Some(disk) {
            return;
        }
        self.deadline = now_ms.saturating_add(self.lease_ms);
        self.open = None;
        self.restored.insert(disk.to_owned());
        self.core.push(Effect::Save);
        if let Some(outcome) = self.pending.take() {
            self.agent_result(outcome, now_ms);
        }
    }

    /// Disk `disk`'s restore failed.
    pub fn disk_failed(&mut self, disk: &str, reason: &str) {
        if self.phase == Phase::Running {
            let f = self.not_fully_restored(format!("disk {disk}: {reason}"));
            self.finish(Err(f));
        }
    }

    /// The agent's result: a restore of every disk, or why not.
    pub fn agent_result(&mut self, outcome: JobOutcome, now_ms: u64) {
        if self.phase != Phase::Running {
            return;
        }
        if self.open.is_some() && matches!(outcome, JobOutcome::Restored { .. }) {
            self.pending = Some(outcome);
            return;
        }
        let r = match outcome {
            // Nothing was streamed: the VM's disks read from the exports its agent serves.
            JobOutcome::Restored { .. } if self.instant && self.restored.is_empty() => {
                self.core.record.consistency = Some(self.rp.consistency);
                self.core.record.detail = Some(format!(
                    "{} created on {} from recovery point {}, its disks backed by the recovery point: \
                     start it now; `bulwark recover-finish {}` copies the rest",
                    self.target,
                    self.host,
                    crate::store::hex(&self.rp.id),
                    self.target
                ));
                Ok(())
            }
            JobOutcome::Restored { bytes_read, .. } if self.restored.len() == self.rp.disks.len() => {
                self.core.record.bytes_scanned = bytes_read;
                self.core.record.consistency = Some(self.rp.consistency);
                self.core.record.detail = Some(format!(
                    "recovery point {} restored onto {} on {}: {} block(s) written",
                    crate::store::hex(&self.rp.id),
                    self.target,
                    self.host,
                    self.core.record.blocks_changed
                ));
                Ok(())
            }
            JobOutcome::Restored { .. } => Err(Failure::stop("the agent reported a restore of fewer disks than sent")),
            JobOutcome::Failed { reason, .. } => Err(Failure::stop(reason)),
            JobOutcome::Succeeded { .. } => Err(Failure::stop("the agent answered a restore with a backup")),
        };
        let _ = now_ms;
        self.finish(r);
    }

    /// The connection to the agent was lost: not retried (the target may be half-written).
    pub fn connection_lost(&mut self) {
        if self.phase == Phase::Running {
            let f = self.not_fully_restored(format!("the connection to {} was lost during the recovery", self.host));
            self.finish(Err(f));
        }
    }

    /// The time passed: an agent silent for its lease has failed the recovery.
    pub fn timeout(&mut self, now_ms: u64) {
        if self.phase == Phase::Running && now_ms >= self.deadline {
            let why = format!(
                "no word from the agent of {} for {:?}",
                self.host,
                std::time::Duration::from_millis(self.lease_ms)
            );
            self.finish(Err(Failure::stop(why)));
        }
    }
}

impl JobMachine for Recovery {
    fn core(&self) -> &JobCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut JobCore {
        &mut self.core
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{JobKind, RpDisk};
    use bulwark_protocol::messages::{Consistency, FailureKind};

    fn rp(disks: &[(&str, u32)]) -> RecoveryPointRecord {
        RecoveryPointRecord {
            id: [0xcd; 16],
            vm: "web".into(),
            created_at: 0,
            consistency: Consistency::App,
            config: vec![],
            disks: disks
                .iter()
                .map(|(n, bs)| RpDisk {
                    name: (*n).into(),
                    size_bytes: 1 << 20,
                    block_size: *bs,
                    root: TreeRoot { digest: [1; 32], levels: 1, blocks: (1u64 << 20) / u64::from(*bs) },
                })
                .collect(),
            logical_bytes: 2 << 20,
            stored_bytes: 0,
        }
    }

    fn setup(to_host: Option<&str>, name: Option<&str>, instant: bool) -> RecoverySetup {
        RecoverySetup {
            record: JobRecord::queued(9, JobKind::Recovery, Some("web".into())),
            rp: rp(&[("os", 65536), ("data", 65536)]),
            vm_host: "node1".into(),
            os: GuestOs::Linux,
            to_host: to_host.map(str::to_owned),
            name: name.map(str::to_owned),
            id_key: None,
            lease_ms: 30_000,
            instant,
            epoch: 1,
        }
    }

    fn start(to_host: Option<&str>) -> Recovery {
        Recovery::start(setup(to_host, None, false), 0).unwrap()
    }

    fn start_instant(to_host: Option<&str>) -> Result<Recovery, Failure> {
        Recovery::start(setup(to_host, Some("web-i"), true), 0)
    }

    #[test]
    fn an_instant_recovery_streams_nothing_and_ends_with_the_agents_result() {
        assert!(start_instant(None).is_err(), "an instant recovery makes a new VM");
        let mut m = start_instant(Some("node2")).unwrap();
        assert!(matches!(&drain(&mut m)[..], [Effect::Send(CoordinatorMessage::RestoreRequest(r))]
            if r.instant && r.create.is_some() && r.vm.as_str() == "web-i"));
        // A restore stream does not belong to it: the recovery fails rather than write.
        let mut other = start_instant(Some("node2")).unwrap();
        assert!(other.stream_opened("os", TransferMode::Restore, 16, 65536, 1).is_err());
        assert!(other.outcome().is_some_and(Result::is_err));
        // The agent made the VM: done, no disk streamed.
        m.agent_result(JobOutcome::Restored { bytes_read: 0, bytes_written: 0, skipped: vec![] }, 2);
        assert_eq!(m.outcome(), Some(&Ok(())));
        assert!(m.record().detail.as_deref().unwrap_or("").contains("recover-finish web-i"));
        // Or it could not.
        let mut m = start_instant(Some("node2")).unwrap();
        m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "needs a QEMU host".into() }, 2);
        assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("QEMU")));
    }

    fn drain(m: &mut Recovery) -> Vec<Effect> {
        std::iter::from_fn(|| m.poll_effect()).collect()
    }

    #[test]
    fn a_recovery_ends_when_every_disk_and_the_result_are_in() {
        let mut m = start(Some("node2"));
        assert_eq!((m.host(), m.target()), ("node2", "web-restored"));
        let first = drain(&mut m);
        assert!(matches!(&first[..], [Effect::Send(CoordinatorMessage::RestoreRequest(r))]
            if r.create.is_some() && r.disks.len() == 2 && r.vm.as_str() == "web-restored"));
        assert!(m.stream_opened("os", TransferMode::Restore, 16, 65536, 10).is_ok());
        m.disk_restored("os", 20);
        m.stream_opened("data", TransferMode::Restore, 16, 65536, 30).unwrap();
        m.agent_result(JobOutcome::Restored { bytes_read: 5, bytes_written: 6, skipped: vec![] }, 40);
        assert!(m.outcome().is_none(), "the result waits for the disk still open");
        m.disk_restored("data", 50);
        assert_eq!(m.outcome(), Some(&Ok(())));
        assert!(m.record().detail.as_deref().unwrap_or("").contains("restored onto web-restored on node2"));
        let onto = start(None);
        assert_eq!((onto.host(), onto.target()), ("node1", "web"));
    }

    #[test]
    fn anything_amiss_fails_the_recovery_for_good_and_says_the_target_is_not_whole() {
        let cases: [(&str, TransferMode, u64, u32); 4] = [
            ("swap", TransferMode::Restore, 16, 65536),
            ("os", TransferMode::Blocks, 16, 65536),
            ("os", TransferMode::Restore, 17, 65536),
            ("os", TransferMode::Restore, 16, 4096),
        ];
        for (d, mode, blocks, bs) in cases {
            let mut m = start(None);
            assert!(m.stream_opened(d, mode, blocks, bs, 0).is_err(), "{d} {mode:?}");
            assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| !f.retry));
        }
        let mut m = start(None);
        m.stream_opened("os", TransferMode::Restore, 16, 65536, 0).unwrap();
        m.disk_failed("os", "stream reset");
        let f = m.outcome().cloned().and_then(Result::err).unwrap();
        assert!(f.reason.contains("web is marked as not fully restored") && !f.retry);
        let mut m = start(None);
        m.connection_lost();
        assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("lost")));
        let mut m = start(None);
        m.timeout(29_999);
        assert!(m.outcome().is_none());
        m.timeout(30_000);
        assert!(m.outcome().is_some());
        let mut m = start(None);
        m.stream_opened("os", TransferMode::Restore, 16, 65536, 0).unwrap();
        m.disk_restored("os", 1);
        m.agent_result(JobOutcome::Restored { bytes_read: 0, bytes_written: 0, skipped: vec![] }, 2);
        assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("fewer disks")));
        let setup = RecoverySetup {
            record: JobRecord::queued(9, JobKind::Recovery, Some("web".into())),
            rp: rp(&[("os", 65536), ("data", 4096)]),
            vm_host: "node1".into(),
            os: GuestOs::Linux,
            to_host: None,
            name: None,
            id_key: None,
            lease_ms: 30_000,
            instant: false,
            epoch: 1,
        };
        assert!(Recovery::start(setup, 0).is_err(), "disks of different block sizes");
    }
}
