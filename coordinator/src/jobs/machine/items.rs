//! An item-level recovery onto a host as a plain state machine: the request to the host's
//! agent, the `Items` stream it opens (which the driver fills from the recovery point through
//! the items worker), the agent's result. A stream the agent stopped reading is only the
//! symptom: the agent's result carries the cause (a full disk, say), so it is awaited for a
//! while before the symptom is reported. Never retried on its own.

use super::{Effect, JobCore, JobMachine};
use crate::catalog::{ItemsTarget, JobRecord, RecoveryPointRecord, RpDisk};
use crate::jobs::plan::Failure;
use bulwark_protocol::messages::{CoordinatorMessage, JobOutcome};
use bulwark_protocol::transfer::{TransferMessage, TransferMode};
use bulwark_protocol::JobId;
use std::collections::VecDeque;

/// How long the agent's result is awaited after a stream that failed on our side.
const AFTER_FAILED_STREAM_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The request is out; the agent's stream is awaited.
    AwaitStream,
    /// The driver is streaming the items.
    Streaming,
    /// The stream ended (items sent, or why not); the agent's result is awaited.
    AwaitResult {
        sent: Result<u64, String>,
    },
    Finished,
}

/// One item recovery.
#[derive(Debug)]
pub struct ItemsRecovery {
    core: JobCore,
    disk: RpDisk,
    items: ItemsTarget,
    host: String,
    lease_ms: u64,
    deadline: u64,
    phase: Phase,
    /// The agent's result, come while the driver was streaming.
    pending: Option<Option<JobOutcome>>,
}

impl ItemsRecovery {
    /// Finds the disk and queues the request to `host`'s agent.
    pub fn start(
        record: JobRecord,
        rp: &RecoveryPointRecord,
        items: ItemsTarget,
        host: String,
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<ItemsRecovery, Failure> {
        let disk = rp
            .disks
            .iter()
            .find(|d| d.name == items.disk)
            .cloned()
            .ok_or_else(|| Failure::stop(format!("the recovery point has no disk {}", items.disk)))?;
        let request = CoordinatorMessage::ItemsRequest {
            job: JobId(record.id),
            dest: items.dest.clone(),
            keep_modes: items.keep_modes,
        };
        Ok(ItemsRecovery {
            core: JobCore::new(record, VecDeque::from([Effect::Send(request)])),
            disk,
            items,
            host,
            lease_ms,
            deadline: now_ms.saturating_add(lease_ms),
            phase: Phase::AwaitStream,
            pending: None,
        })
    }

    pub fn next_timeout(&self) -> Option<u64> {
        matches!(self.phase, Phase::AwaitStream | Phase::AwaitResult { .. }).then_some(self.deadline)
    }

    /// Whether a stream is awaited.
    pub fn wants_stream(&self) -> bool {
        self.phase == Phase::AwaitStream
    }

    fn finish(&mut self, r: Result<(), Failure>) {
        if self.phase == Phase::Finished {
            return;
        }
        self.phase = Phase::Finished;
        self.core.end(r);
    }

    fn stop(&mut self, why: impl Into<String>) {
        self.finish(Err(Failure::stop(why)));
    }

    /// The agent opened a stream: answers the disk and the paths to stream, or why not (then
    /// the recovery has failed).
    pub fn stream_opened(&mut self, mode: TransferMode) -> Result<(RpDisk, Vec<String>), String> {
        if self.phase != Phase::AwaitStream {
            return Err("no stream was awaited".into());
        }
        if mode != TransferMode::Items {
            let why = "the agent opened the wrong kind of stream";
            self.stop(why);
            return Err(why.into());
        }
        self.phase = Phase::Streaming;
        Ok((self.disk.clone(), self.items.paths.clone()))
    }

    /// The items went down the stream (how many frames), or why not: answers the message that
    /// ends the stream.
    pub fn streamed(&mut self, sent: Result<u64, String>, now_ms: u64) -> TransferMessage {
        let end = match &sent {
            Ok(n) => TransferMessage::End { blocks_sent: *n, bytes_read: 0 },
            Err(reason) => TransferMessage::Failed { reason: reason.clone() },
        };
        if self.phase != Phase::Streaming {
            return end;
        }
        let wait = if sent.is_ok() { self.lease_ms } else { self.lease_ms.min(AFTER_FAILED_STREAM_MS) };
        self.deadline = now_ms.saturating_add(wait);
        self.phase = Phase::AwaitResult { sent };
        if let Some(pending) = self.pending.take() {
            match pending {
                Some(outcome) => self.agent_result(outcome),
                None => self.connection_lost(),
            }
        }
        end
    }

    /// The agent's result.
    pub fn agent_result(&mut self, outcome: JobOutcome) {
        match self.phase.clone() {
            Phase::AwaitStream => self.stop(match outcome {
                JobOutcome::Failed { reason, .. } => reason,
                _ => format!("the agent of {} did not open the item stream", self.host),
            }),
            Phase::Streaming => self.pending = Some(Some(outcome)),
            Phase::AwaitResult { sent } => match (outcome, sent) {
                (JobOutcome::Failed { reason, .. }, _) => self.stop(reason),
                (_, Err(why)) => self.stop(why),
                (JobOutcome::Restored { bytes_written, skipped, .. }, Ok(sent)) => {
                    self.core.record.bytes_transferred = bytes_written;
                    self.core.record.blocks_changed = sent;
                    self.core.record.detail =
                        Some(items_detail(self.items.paths.len(), &self.host, &self.items.dest, &skipped));
                    self.finish(Ok(()));
                }
                (JobOutcome::Succeeded { .. }, Ok(_)) => self.stop("the agent answered an item recovery with a backup"),
            },
            Phase::Finished => {}
        }
    }

    /// The connection to the agent was lost.
    pub fn connection_lost(&mut self) {
        match self.phase.clone() {
            Phase::AwaitStream => self.stop(format!("the agent of {} did not open the item stream", self.host)),
            Phase::Streaming => self.pending = Some(None),
            Phase::AwaitResult { sent: Err(why) } => self.stop(why),
            Phase::AwaitResult { sent: Ok(_) } => self.stop(format!("the connection to {} was lost", self.host)),
            Phase::Finished => {}
        }
    }

    /// The time passed.
    pub fn timeout(&mut self, now_ms: u64) {
        if now_ms < self.deadline {
            return;
        }
        match self.phase.clone() {
            Phase::AwaitStream | Phase::AwaitResult { sent: Ok(_) } => {
                self.stop(format!("no word from the agent of {}", self.host))
            }
            Phase::AwaitResult { sent: Err(why) } => self.stop(why),
            Phase::Streaming | Phase::Finished => {}
        }
    }
}

/// What an item recovery to a host did, with the entries the agent skipped (at most 4 KiB).
pub fn items_detail(paths: usize, host: &str, dest: &str, skipped: &[String]) -> String {
    let mut d = format!("{paths} path(s) recovered into {host}:{dest}");
    if !skipped.is_empty() {
        d.push_str("; skipped: ");
        d.push_str(&skipped.join("; "));
    }
    if d.len() > 4096 {
        let mut end = 4093;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        d.truncate(end);
        d.push('…');
    }
    d
}

impl JobMachine for ItemsRecovery {
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
    use crate::catalog::JobKind;
    use bulwark_protocol::blockmap::TreeRoot;
    use bulwark_protocol::messages::{Consistency, FailureKind};

    fn start() -> ItemsRecovery {
        let rp = RecoveryPointRecord {
            id: [1; 16],
            vm: "web".into(),
            created_at: 0,
            consistency: Consistency::App,
            config: vec![],
            disks: vec![RpDisk {
                name: "os".into(),
                size_bytes: 1 << 20,
                block_size: 65536,
                root: TreeRoot { digest: [2; 32], levels: 1, blocks: 16 },
            }],
            logical_bytes: 1 << 20,
            stored_bytes: 0,
        };
        let items =
            ItemsTarget { disk: "os".into(), paths: vec!["/p1/etc".into()], dest: "/srv".into(), keep_modes: false };
        ItemsRecovery::start(
            JobRecord::queued(4, JobKind::Recovery, Some("web".into())),
            &rp,
            items,
            "node2".into(),
            30_000,
            0,
        )
        .unwrap()
    }

    fn restored(skipped: Vec<String>) -> JobOutcome {
        JobOutcome::Restored { bytes_read: 0, bytes_written: 900, skipped }
    }

    #[test]
    fn items_go_down_the_stream_and_the_agents_result_ends_the_job() {
        let mut m = start();
        assert!(
            matches!(m.poll_effect(), Some(Effect::Send(CoordinatorMessage::ItemsRequest { dest, .. })) if dest == "/srv")
        );
        let (disk, paths) = m.stream_opened(TransferMode::Items).unwrap();
        assert_eq!((disk.name.as_str(), paths), ("os", vec!["/p1/etc".to_owned()]));
        assert_eq!(m.next_timeout(), None, "streaming waits for nobody");
        m.agent_result(restored(vec!["/p1/etc/bad: name".into()]));
        assert!(m.outcome().is_none(), "a result during the stream waits for its end");
        assert_eq!(m.streamed(Ok(7), 100), TransferMessage::End { blocks_sent: 7, bytes_read: 0 });
        assert_eq!(m.outcome(), Some(&Ok(())));
        assert_eq!((m.record().bytes_transferred, m.record().blocks_changed), (900, 7));
        assert_eq!(
            m.record().detail.as_deref(),
            Some("1 path(s) recovered into node2:/srv; skipped: /p1/etc/bad: name")
        );
    }

    #[test]
    fn the_agents_reason_wins_over_the_broken_stream_it_caused() {
        let mut m = start();
        m.stream_opened(TransferMode::Items).unwrap();
        let end = m.streamed(Err("stream error: sending stopped by peer".into()), 1_000);
        assert!(matches!(end, TransferMessage::Failed { .. }));
        assert_eq!(m.next_timeout(), Some(11_000), "the agent's result is awaited 10 s");
        m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "no space left on the device".into() });
        assert_eq!(
            m.outcome().cloned().and_then(Result::err).map(|f| f.reason),
            Some("no space left on the device".into())
        );
        // Without the agent's word, the symptom is the reason.
        let mut m = start();
        m.stream_opened(TransferMode::Items).unwrap();
        m.streamed(Err("stream reset".into()), 0);
        m.timeout(9_999);
        assert!(m.outcome().is_none());
        m.timeout(10_000);
        assert_eq!(m.outcome().cloned().and_then(Result::err).map(|f| f.reason), Some("stream reset".into()));
    }

    #[test]
    fn refusals_silence_and_the_wrong_stream_end_it_for_good() {
        let mut m = start();
        m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "not an absolute path".into() });
        assert_eq!(
            m.outcome().cloned().and_then(Result::err).map(|f| (f.reason, f.retry)),
            Some(("not an absolute path".into(), false))
        );
        let mut m = start();
        assert!(m.stream_opened(TransferMode::Blocks).is_err());
        assert!(m.outcome().is_some_and(Result::is_err));
        let mut m = start();
        m.timeout(30_000);
        assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("no word")));
        let mut m = start();
        m.stream_opened(TransferMode::Items).unwrap();
        m.connection_lost();
        m.streamed(Ok(1), 0);
        assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("was lost")));
        let long = items_detail(1, "h", "/d", &vec!["x".repeat(100); 100]);
        assert!(long.len() <= 4096 && long.ends_with('…'));
    }
}
