//! A backup job on the agent as a plain state machine: no actix, QUIC, hypervisor or clock.
//! It owns the change-token rule: the snapshot's changes are confirmed (the token advances)
//! only when the coordinator's verdict says it committed; any failure, a lost report or a
//! verdict that never comes releases the snapshot with its changes kept for the next run.
//! `job::run` performs its effects (the snapshot through the snapshot actor, each disk's
//! transfer stream, the report, the release) and feeds it what happened; the deterministic
//! simulation performs them against the sim hypervisor.

use bulwark_protocol::messages::{
    ChangeToken, Consistency, DiskJob, FailureKind, JobKind, JobOutcome, JobRequest, MAX_PARALLEL_DISKS,
};
use std::collections::VecDeque;

/// What the driver is to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEffect {
    /// Take the snapshot (freeze → take → thaw); answer [`AgentJob::taken`].
    Take,
    /// Send disk `disk` of the snapshot (its changed, allocated or, for a check, compared
    /// blocks); answer [`AgentJob::disk_sent`]. Up to the request's `parallel_disks` are
    /// asked for before the first answer.
    SendDisk(DiskJob),
    /// Report the outcome to the coordinator; answer [`AgentJob::reported`].
    Report(JobOutcome),
    /// Release the snapshot: confirm its changes up to `commit`, or keep them (None); answer
    /// [`AgentJob::released`].
    Release { commit: Option<ChangeToken> },
    /// The job is over.
    Done,
}

/// What the snapshot gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub token: ChangeToken,
    pub consistency: Consistency,
    pub note: Option<String>,
    /// The VM's definition at the snapshot (empty when it could not be read).
    pub config: Vec<u8>,
}

/// A broken build, for the simulation to catch (`broken-builds` feature).
#[cfg(feature = "broken-builds")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Confirms the snapshot's changes as soon as the result is reported, before the verdict.
    ConfirmBeforeVerdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Taking,
    /// Sending the request's disks: those before `next` were asked for, `in_flight` of them
    /// are not answered yet. After a failure no disk is asked for; the failure is reported
    /// once every disk in flight has answered (none still reads the snapshot).
    Sending {
        snapshot: Snapshot,
        next: usize,
        in_flight: usize,
        failed: Option<Failed>,
    },
    Reporting {
        next: Option<ChangeToken>,
    },
    /// The coordinator has the result; its verdict is due before `deadline`.
    AwaitingVerdict {
        next: ChangeToken,
        deadline: u64,
    },
    Releasing,
    Done,
}

/// One backup job of one VM on the agent.
#[derive(Debug)]
pub struct AgentJob {
    kind: JobKind,
    disks: Vec<DiskJob>,
    /// Disks sent at once (at least 1).
    parallel: usize,
    lease_ms: u64,
    phase: Phase,
    bytes_read: u64,
    blocks_sent: u64,
    effects: VecDeque<AgentEffect>,
    #[cfg(feature = "broken-builds")]
    broken: Option<Broken>,
}

/// A failure of the job: what kind, and why.
pub type Failed = (FailureKind, String);

/// The token the replica is current with once this run commits: one past the snapshot's, or
/// past the coordinator's when that is one ahead (a confirmation that was lost).
pub fn next_token(snapshot: ChangeToken, disks: &[DiskJob]) -> ChangeToken {
    let ahead = disks
        .iter()
        .filter_map(|d| d.token)
        .filter(|t| t.generation == snapshot.generation)
        .map(|t| t.sequence)
        .max()
        .unwrap_or(0);
    ChangeToken { generation: snapshot.generation, sequence: snapshot.sequence.max(ahead) + 1 }
}

impl AgentJob {
    /// A job for `req`; the verdict is awaited for `lease_ms` after the report. Its first
    /// effect is to take the snapshot.
    pub fn new(req: &JobRequest, lease_ms: u64) -> Self {
        Self {
            kind: req.kind,
            disks: req.disks.clone(),
            parallel: usize::from(req.parallel_disks.clamp(1, MAX_PARALLEL_DISKS)),
            lease_ms,
            phase: Phase::Taking,
            bytes_read: 0,
            blocks_sent: 0,
            effects: VecDeque::from([AgentEffect::Take]),
            #[cfg(feature = "broken-builds")]
            broken: None,
        }
    }

    /// Turns on a broken build (the simulation's check that it catches it).
    #[cfg(feature = "broken-builds")]
    pub fn break_with(&mut self, broken: Broken) {
        self.broken = Some(broken);
    }

    /// The next thing to do.
    pub fn poll_effect(&mut self) -> Option<AgentEffect> {
        self.effects.pop_front()
    }

    /// When [`AgentJob::timeout`] is due (while the verdict is awaited).
    pub fn next_timeout(&self) -> Option<u64> {
        match self.phase {
            Phase::AwaitingVerdict { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Whether the job is over.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// A failure before the report: report it; nothing is confirmed.
    fn fail(&mut self, (kind, reason): Failed) {
        self.phase = Phase::Reporting { next: None };
        self.effects.push_back(AgentEffect::Report(JobOutcome::Failed { kind, reason }));
    }

    /// The snapshot was taken, or why not.
    pub fn taken(&mut self, r: Result<Snapshot, Failed>) {
        if self.phase != Phase::Taking {
            return;
        }
        match r {
            Ok(snapshot) => {
                self.phase = Phase::Sending { snapshot, next: 0, in_flight: 0, failed: None };
                self.send_next();
            }
            Err(f) => self.fail(f),
        }
    }

    /// Asks for disks until `parallel` are in flight; once every disk is answered, reports.
    fn send_next(&mut self) {
        let Phase::Sending { snapshot, next, in_flight, failed } = &mut self.phase else { return };
        if let Some(f) = failed.as_ref().filter(|_| *in_flight == 0).cloned() {
            return self.fail(f);
        }
        while *in_flight < self.parallel && failed.is_none() {
            let Some(d) = self.disks.get(*next) else { break };
            self.effects.push_back(AgentEffect::SendDisk(d.clone()));
            *next += 1;
            *in_flight += 1;
        }
        // Every disk sent and answered, none failed: the report.
        if *next >= self.disks.len() && *in_flight == 0 && failed.is_none() {
            let outcome = JobOutcome::Succeeded {
                consistency: snapshot.consistency,
                consistency_note: snapshot.note.clone(),
                bytes_read: self.bytes_read,
                blocks_sent: self.blocks_sent,
                next_token: next_token(snapshot.token, &self.disks),
                config: snapshot.config.clone(),
            };
            let next = next_token(snapshot.token, &self.disks);
            self.phase = Phase::Reporting { next: Some(next) };
            self.effects.push_back(AgentEffect::Report(outcome));
        }
    }

    /// A disk asked for was sent (blocks sent, bytes read), or why not. The first failure
    /// fails the job, reported once the disks still in flight have answered.
    pub fn disk_sent(&mut self, r: Result<(u64, u64), Failed>) {
        let Phase::Sending { in_flight, failed, .. } = &mut self.phase else { return };
        if *in_flight == 0 {
            // An answer for no disk asked for: nothing to count.
            return;
        }
        *in_flight -= 1;
        match r {
            Ok((sent, read)) => {
                self.blocks_sent += sent;
                self.bytes_read += read;
            }
            Err(f) => {
                failed.get_or_insert(f);
            }
        }
        self.send_next();
    }

    /// The report went out (`delivered`) or could not.
    pub fn reported(&mut self, delivered: bool, now_ms: u64) {
        let Phase::Reporting { next } = self.phase.clone() else { return };
        match (next, delivered) {
            (Some(next), true) => {
                #[cfg(feature = "broken-builds")]
                if self.broken == Some(Broken::ConfirmBeforeVerdict) {
                    return self.release(Some(next));
                }
                self.phase = Phase::AwaitingVerdict { next, deadline: now_ms.saturating_add(self.lease_ms) };
            }
            _ => self.release(None),
        }
    }

    /// The coordinator's verdict: `committed` confirms the changes, otherwise they are kept.
    pub fn verdict(&mut self, committed: bool) {
        if let Phase::AwaitingVerdict { next, .. } = self.phase {
            self.release(committed.then_some(next));
        }
    }

    /// The time passed: a verdict that did not come by its deadline keeps the changes.
    pub fn timeout(&mut self, now_ms: u64) {
        if let Phase::AwaitingVerdict { deadline, .. } = self.phase {
            if now_ms >= deadline {
                self.release(None);
            }
        }
    }

    /// The job is abandoned whatever its phase (the connection or the process is going away):
    /// the snapshot, if any, is released with its changes kept.
    pub fn abort(&mut self) {
        match self.phase {
            Phase::Releasing | Phase::Done => {}
            _ => self.release(None),
        }
    }

    fn release(&mut self, commit: Option<ChangeToken>) {
        self.phase = Phase::Releasing;
        self.effects.push_back(AgentEffect::Release { commit });
    }

    /// The snapshot is released.
    pub fn released(&mut self) {
        if self.phase == Phase::Releasing {
            self.phase = Phase::Done;
            self.effects.push_back(AgentEffect::Done);
        }
    }

    /// The kind of job (what each disk's sending means).
    pub fn kind(&self) -> JobKind {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_protocol::{DiskId, JobId, VmId};

    fn t(generation: u64, sequence: u64) -> ChangeToken {
        ChangeToken { generation, sequence }
    }

    fn req(disks: &[&str], token: Option<ChangeToken>) -> JobRequest {
        JobRequest {
            job: JobId(3),
            vm: VmId::new("web").unwrap(),
            kind: JobKind::ExpressFull,
            block_size: 65536,
            disks: disks
                .iter()
                .map(|d| DiskJob { disk: DiskId::new(*d).unwrap(), token, exclude: vec![], witness: vec![] })
                .collect(),
            id_key: None,
            lease_secs: 30,
            parallel_disks: 1,
            epoch: 1,
        }
    }

    fn drain(m: &mut AgentJob) -> Vec<AgentEffect> {
        std::iter::from_fn(|| m.poll_effect()).collect()
    }

    fn snap(seq: u64) -> Snapshot {
        Snapshot { token: t(2, seq), consistency: Consistency::App, note: None, config: vec![] }
    }

    /// A job through its report, both disks sent.
    fn reported(token: Option<ChangeToken>) -> AgentJob {
        let mut m = AgentJob::new(&req(&["os", "data"], token), 30_000);
        assert_eq!(drain(&mut m), vec![AgentEffect::Take]);
        m.taken(Ok(snap(5)));
        assert!(matches!(&drain(&mut m)[..], [AgentEffect::SendDisk(d)] if d.disk.as_str() == "os"));
        m.disk_sent(Ok((3, 300)));
        assert!(matches!(&drain(&mut m)[..], [AgentEffect::SendDisk(d)] if d.disk.as_str() == "data"));
        m.disk_sent(Ok((4, 400)));
        let report = drain(&mut m);
        assert!(matches!(
            &report[..],
            [AgentEffect::Report(JobOutcome::Succeeded { blocks_sent: 7, bytes_read: 700, .. })]
        ));
        m.reported(true, 1_000);
        assert!(drain(&mut m).is_empty(), "the verdict is awaited");
        m
    }

    #[test]
    fn changes_are_confirmed_only_on_a_committed_verdict() {
        let mut m = reported(None);
        assert_eq!(m.next_timeout(), Some(31_000));
        m.verdict(true);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: Some(t(2, 6)) }]);
        m.released();
        assert_eq!(drain(&mut m), vec![AgentEffect::Done]);
        assert!(m.is_done());
        let mut m = reported(None);
        m.verdict(false);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }]);
    }

    #[test]
    fn silence_a_lost_report_and_failures_keep_the_changes() {
        let mut m = reported(None);
        m.timeout(30_999);
        assert!(drain(&mut m).is_empty());
        m.timeout(31_000);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }]);
        m.verdict(true);
        assert!(drain(&mut m).is_empty(), "a verdict after the deadline changes nothing");
        // The report could not be sent.
        let mut m = AgentJob::new(&req(&["os"], None), 30_000);
        m.taken(Ok(snap(5)));
        m.disk_sent(Ok((1, 1)));
        drain(&mut m);
        m.reported(false, 0);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }]);
        // The snapshot could not be taken; a disk could not be sent.
        let mut m = AgentJob::new(&req(&["os"], None), 30_000);
        drain(&mut m);
        m.taken(Err((FailureKind::TrackingLost, "bitmap gone".into())));
        let e = drain(&mut m);
        assert!(matches!(&e[..], [AgentEffect::Report(JobOutcome::Failed { kind: FailureKind::TrackingLost, .. })]));
        m.reported(true, 0);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }]);
        let mut m = AgentJob::new(&req(&["os", "data"], None), 30_000);
        m.taken(Ok(snap(5)));
        m.disk_sent(Err((FailureKind::Other, "stream reset".into())));
        drain(&mut m);
        m.reported(true, 0);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }], "a failed job is never confirmed");
        // Aborted in the middle: released, changes kept; inputs after the end change nothing.
        let mut m = AgentJob::new(&req(&["os"], None), 30_000);
        drain(&mut m);
        m.taken(Ok(snap(5)));
        m.abort();
        assert_eq!(
            drain(&mut m),
            vec![AgentEffect::SendDisk(req(&["os"], None).disks[0].clone()), AgentEffect::Release { commit: None }]
        );
        m.disk_sent(Ok((1, 1)));
        m.verdict(true);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn the_next_token_is_one_past_the_snapshot_or_past_a_coordinator_one_ahead() {
        let disk = |token| DiskJob { disk: DiskId::new("os").unwrap(), token, exclude: vec![], witness: vec![] };
        assert_eq!(next_token(t(2, 5), &[disk(Some(t(2, 5)))]), t(2, 6));
        assert_eq!(next_token(t(2, 5), &[disk(Some(t(2, 6)))]), t(2, 7), "a lost confirmation");
        assert_eq!(next_token(t(3, 0), &[disk(Some(t(2, 9)))]), t(3, 1), "tracking was reset");
        assert_eq!(next_token(t(0, 0), &[disk(None)]), t(0, 1));
        let mut m = reported(Some(t(2, 6)));
        m.verdict(true);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: Some(t(2, 7)) }]);
    }

    #[test]
    fn disks_go_out_as_many_at_once_as_asked_and_a_failure_waits_for_the_others() {
        let sends = |e: &[AgentEffect]| -> Vec<String> {
            e.iter()
                .filter_map(|e| match e {
                    AgentEffect::SendDisk(d) => Some(d.disk.as_str().to_owned()),
                    _ => None,
                })
                .collect()
        };
        let mut r = req(&["os", "data", "logs"], None);
        r.parallel_disks = 2;
        let mut m = AgentJob::new(&r, 30_000);
        drain(&mut m);
        m.taken(Ok(snap(5)));
        assert_eq!(sends(&drain(&mut m)), ["os", "data"], "two at once");
        m.disk_sent(Ok((1, 100)));
        assert_eq!(sends(&drain(&mut m)), ["logs"], "the next as soon as one is sent");
        m.disk_sent(Ok((2, 200)));
        assert!(drain(&mut m).is_empty(), "the report waits for the last disk");
        m.disk_sent(Ok((3, 300)));
        let e = drain(&mut m);
        assert!(
            matches!(&e[..], [AgentEffect::Report(JobOutcome::Succeeded { blocks_sent: 6, bytes_read: 600, .. })]),
            "{e:?}"
        );
        m.disk_sent(Ok((9, 9)));
        assert!(drain(&mut m).is_empty(), "an answer for no disk counts nothing");

        // A failure: nothing more is asked for, and it is reported only when the disk still
        // in flight has answered (nothing reads the snapshot once it is released).
        let mut m = AgentJob::new(&r, 30_000);
        drain(&mut m);
        m.taken(Ok(snap(5)));
        drain(&mut m);
        m.disk_sent(Err((FailureKind::Other, "read error".into())));
        assert!(drain(&mut m).is_empty(), "data is still being read");
        m.disk_sent(Ok((1, 1)));
        let e = drain(&mut m);
        assert!(
            matches!(&e[..], [AgentEffect::Report(JobOutcome::Failed { reason, .. })] if reason == "read error"),
            "{e:?}"
        );
        m.reported(true, 0);
        assert_eq!(drain(&mut m), vec![AgentEffect::Release { commit: None }]);

        // A request without the count sends one disk at a time; past the cap, the cap.
        r.parallel_disks = 0;
        let mut m = AgentJob::new(&r, 30_000);
        drain(&mut m);
        m.taken(Ok(snap(5)));
        assert_eq!(sends(&drain(&mut m)), ["os"]);
        r.parallel_disks = u8::MAX;
        assert_eq!(AgentJob::new(&r, 30_000).parallel, usize::from(MAX_PARALLEL_DISKS));
    }
}
