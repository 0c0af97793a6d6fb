use super::*;
use bulwark_protocol::messages::{ChangeToken, FailureKind};
use bulwark_protocol::DiskId;

const BS: u32 = 65536;
const MB: u64 = 1 << 20;

fn disk(name: &str) -> DiskInfo {
    DiskInfo { name: DiskId::new(name).unwrap(), size_bytes: MB }
}

fn root(n: u8) -> TreeRoot {
    TreeRoot { digest: [n; 32], levels: 1, blocks: MB / u64::from(BS) }
}

fn replica(name: &str, state: ReplicaState) -> ReplicaRecord {
    ReplicaRecord {
        vm: "web".into(),
        disk: name.into(),
        size_bytes: MB,
        block_size: BS,
        state,
        root: Some(root(1)),
        change_token: Some(ChangeToken { generation: 1, sequence: 4 }),
        reason: None,
        updated_at: 0,
        excluded: vec![(3, 4)],
        swap_witness: vec![(0, [5; 32])],
    }
}

/// A job of `kind` on a VM with disks os and data; `complete`: both have consistent replicas.
/// One disk at a time.
fn job(kind: JobKind, complete: bool) -> VmJob {
    job_with(kind, complete, 1)
}

/// [`job`], with `parallel` disks at once.
fn job_with(kind: JobKind, complete: bool, parallel: usize) -> VmJob {
    let replicas = if complete {
        ["os", "data"].iter().map(|d| (d.to_string(), replica(d, ReplicaState::Consistent))).collect()
    } else {
        HashMap::new()
    };
    let setup = Setup {
        record: JobRecord::queued(7, kind, Some("web".into())),
        vm: "web".into(),
        disks: vec![disk("os"), disk("data")],
        replicas,
        block_size: BS,
        id_key: None,
        lease_ms: 30_000,
        left_out: vec![],
        parallel,
        epoch: 1,
    };
    VmJob::start(setup, 1_000).unwrap()
}

fn drain(m: &mut VmJob) -> Vec<Effect> {
    std::iter::from_fn(|| m.poll_effect()).collect()
}

fn success() -> JobOutcome {
    JobOutcome::Succeeded {
        consistency: Consistency::App,
        consistency_note: None,
        bytes_read: 99,
        blocks_sent: 2,
        next_token: ChangeToken { generation: 1, sequence: 9 },
        config: b"name = \"web\"".to_vec(),
    }
}

fn verdict(e: &Effect) -> Option<bool> {
    match e {
        Effect::Send(CoordinatorMessage::JobDone { committed, .. }) => Some(*committed),
        _ => None,
    }
}

/// Both disks stored in blocks mode.
fn store_both(m: &mut VmJob) {
    for (i, d) in ["os", "data"].iter().enumerate() {
        let start = m.stream_opened(d, TransferMode::Blocks, 16, BS, 2_000).unwrap();
        assert_eq!(start.blocks, 16);
        m.disk_done(d, DiskDone { root: root(10 + i as u8), changed: 3 }, 3_000);
    }
}

#[test]
fn an_express_full_commits_a_recovery_point_once_every_disk_and_the_result_are_in() {
    let mut m = job(JobKind::ExpressFull, true);
    let first = drain(&mut m);
    assert!(matches!(&first[..], [Effect::Send(CoordinatorMessage::JobRequest(r))]
        if r.disks.iter().all(|d| d.token == Some(ChangeToken { generation: 1, sequence: 4 }) && d.exclude == vec![(3, 4)] && d.witness == vec![(0, [5; 32])])));
    let start = m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    assert_eq!(start.old, Some(root(1)), "an express full applies to the replica's tree");
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 3_000).unwrap();
    m.disk_done("data", DiskDone { root: root(11), changed: 3 }, 3_000);
    assert!(drain(&mut m).iter().all(|e| matches!(e, Effect::Save)));
    m.agent_result(success(), 4_000);
    let commit = drain(&mut m);
    let [Effect::Commit { replicas, rp: Some(rp) }] = &commit[..] else { panic!("{commit:?}") };
    assert_eq!(replicas.iter().map(|r| r.root).collect::<Vec<_>>(), vec![Some(root(10)), Some(root(11))]);
    assert!(replicas.iter().all(|r| r.change_token == Some(ChangeToken { generation: 1, sequence: 9 })
        && r.state == ReplicaState::Consistent
        && r.excluded == vec![(3, 4)]));
    assert_eq!((rp.disks.len(), rp.created_at, rp.consistency), (2, 4_000, Consistency::App));
    assert_eq!(m.next_timeout(), None, "committing waits for nobody");
    m.committed(Ok(Some([0xab; 16])));
    let end = drain(&mut m);
    assert_eq!(end.iter().filter_map(verdict).collect::<Vec<_>>(), vec![true]);
    assert!(matches!(end.last(), Some(Effect::Finished)));
    assert!(end.iter().any(|e| matches!(e, Effect::FindSwap(r) if r.len() == 2)));
    assert_eq!(m.outcome(), Some(&Ok(())));
    assert_eq!(m.record().blocks_changed, 6);
    assert_eq!(m.record().bytes_scanned, 99);
    assert!(m.record().detail.as_deref().unwrap_or("").starts_with("recovery point abababab"));
}

#[test]
fn a_result_that_overtakes_the_last_disk_waits_for_it() {
    let mut m = job(JobKind::ExpressFull, true);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 3_000).unwrap();
    m.agent_result(success(), 3_500);
    assert!(!drain(&mut m).iter().any(|e| matches!(e, Effect::Commit { .. })), "data is still arriving");
    assert_eq!(m.next_timeout(), Some(33_000), "still waiting for the disk");
    m.disk_done("data", DiskDone { root: root(11), changed: 3 }, 4_000);
    let effects = drain(&mut m);
    let commit = effects.iter().find_map(|e| match e {
        Effect::Commit { replicas, .. } => Some(replicas.iter().map(|r| r.root).collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(commit, Some(vec![Some(root(10)), Some(root(11))]));
    // A failure that overtakes the disk ends the job at once.
    let mut m = job(JobKind::ExpressFull, true);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "io".into() }, 2_500);
    assert!(matches!(m.outcome(), Some(Err(_))));
}

#[test]
fn disks_arrive_at_once_up_to_the_bound_and_the_commit_waits_for_all_of_them() {
    let mut m = job_with(JobKind::ExpressFull, true, 2);
    let request = drain(&mut m);
    assert!(matches!(&request[..], [Effect::Send(CoordinatorMessage::JobRequest(r))] if r.parallel_disks == 2));
    let os = m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    let data = m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_100).unwrap();
    assert_ne!(os.slot, data.slot, "each disk has its own ingest slot");
    assert!(m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_200).is_err(), "a disk open twice");
    // The result overtakes both disks; the second to end lets it commit, whichever it is.
    let mut m = job_with(JobKind::ExpressFull, true, 2);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_100).unwrap();
    m.agent_result(success(), 2_500);
    m.disk_done("data", DiskDone { root: root(11), changed: 2 }, 3_000);
    assert!(!drain(&mut m).iter().any(|e| matches!(e, Effect::Commit { .. })), "os is still arriving");
    // Blocks arriving keep the agent's lease.
    m.heard(40_000);
    m.timeout("node1", 40_001);
    assert!(m.outcome().is_none(), "heard from a moment ago");
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 41_000);
    let commit = drain(&mut m).into_iter().find_map(|e| match e {
        Effect::Commit { replicas, .. } => Some(replicas.iter().map(|r| r.root).collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(commit, Some(vec![Some(root(10)), Some(root(11))]), "in the VM's disk order");
    assert_eq!(m.record().blocks_changed, 5);
    // One disk failing fails the job, the other still arriving.
    let mut m = job_with(JobKind::ExpressFull, true, 2);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_100).unwrap();
    m.disk_failed("data", "digest mismatch");
    let effects = drain(&mut m);
    assert!(effects.iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "an express full that died midway");
    assert!(matches!(m.outcome(), Some(Err(f)) if f.reason.contains("disk data: digest mismatch")));
    // Silence past the lease with both streams open fails it too.
    let mut m = job_with(JobKind::ExpressFull, true, 2);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.timeout("node1", 32_001);
    assert!(matches!(m.outcome(), Some(Err(f)) if f.reason.contains("no word from the agent of node1")));
}

#[test]
fn a_success_without_every_disk_is_not_committed() {
    let mut m = job(JobKind::ExpressFull, true);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    m.agent_result(success(), 4_000);
    // It waits a while for the missing disk's stream, then fails.
    assert!(drain(&mut m).iter().filter_map(verdict).next().is_none());
    assert_eq!(m.next_timeout(), Some(4_000 + STREAM_GRACE_MS));
    m.timeout("node1", 4_000 + STREAM_GRACE_MS - 1);
    assert!(m.outcome().is_none());
    m.timeout("node1", 4_000 + STREAM_GRACE_MS);
    let effects = drain(&mut m);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Commit { .. })), "{effects:?}");
    assert_eq!(effects.iter().filter_map(verdict).collect::<Vec<_>>(), vec![false]);
    assert!(effects.iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "midway: continuity unknown");
    let Some(Err(f)) = m.outcome() else { panic!() };
    assert!(f.reason.contains("never sent disk data") && f.retry);
}

#[test]
fn a_success_that_overtakes_a_disks_stream_waits_for_it_and_commits() {
    let mut m = job(JobKind::ExpressFull, true);
    drain(&mut m);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    m.agent_result(success(), 4_000);
    assert!(m.outcome().is_none(), "the other disk's stream may still come");
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 4_500).unwrap();
    m.disk_done("data", DiskDone { root: root(11), changed: 1 }, 4_600);
    let effects = drain(&mut m);
    assert!(effects.iter().any(|e| matches!(e, Effect::Commit { .. })), "{effects:?}");
}

#[test]
fn without_a_complete_replica_an_express_full_is_an_initial_copy_that_creates_replicas_first() {
    let mut m = job(JobKind::ExpressFull, false);
    assert_eq!(m.record().kind, JobKind::Initial);
    let effects = drain(&mut m);
    assert!(
        matches!(&effects[..], [Effect::PutReplica(a), Effect::PutReplica(b), Effect::Send(CoordinatorMessage::JobRequest(_))]
        if a.state == ReplicaState::Creating && b.state == ReplicaState::Creating)
    );
    let start = m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    assert_eq!(start.old, None, "an initial copy starts from an empty tree");
    m.disk_done("os", DiskDone { root: root(10), changed: 16 }, 3_000);
    m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.disk_done("data", DiskDone { root: root(11), changed: 16 }, 3_000);
    m.agent_result(success(), 4_000);
    assert!(drain(&mut m).iter().any(|e| matches!(e, Effect::Commit { rp: Some(_), .. })));
    m.committed(Err("disk full".into()));
    let end = drain(&mut m);
    assert_eq!(end.iter().filter_map(verdict).collect::<Vec<_>>(), vec![false]);
    assert!(!end.iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "nothing was committed: no doubt");
    assert_eq!(m.outcome().cloned().and_then(Result::err).map(|f| f.retry), Some(true));
}

#[test]
fn a_check_takes_compare_streams_and_commits_no_recovery_point() {
    let mut m = job(JobKind::ConsistencyCheck, true);
    drain(&mut m);
    assert!(m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).is_err(), "a check compares");
    assert!(matches!(m.outcome(), Some(Err(_))));
    let mut m = job(JobKind::ConsistencyCheck, true);
    drain(&mut m);
    for d in ["os", "data"] {
        assert_eq!(m.stream_opened(d, TransferMode::Compare, 16, BS, 2_000).unwrap().old, Some(root(1)));
        m.disk_done(d, DiskDone { root: root(5), changed: 1 }, 2_000);
    }
    m.agent_result(success(), 4_000);
    assert!(drain(&mut m).iter().any(|e| matches!(e, Effect::Commit { rp: None, .. })));
    assert_eq!(m.record().bytes_scanned, 0, "a check counts what it compared, not the agent's reads");
    m.committed(Ok(None));
    drain(&mut m);
    assert_eq!(m.record().detail.as_deref(), Some("2 block(s) differed and were repaired; replica consistent"));
}

#[test]
fn streams_that_do_not_fit_fail_the_job_midway() {
    let cases: [(&str, TransferMode, u64, u32); 4] = [
        ("swap", TransferMode::Blocks, 16, BS),
        ("os", TransferMode::Blocks, 17, BS),
        ("os", TransferMode::Blocks, 16, 4096),
        ("os", TransferMode::Restore, 16, BS),
    ];
    for (d, mode, blocks, bs) in cases {
        let mut m = job(JobKind::Sync, true);
        drain(&mut m);
        assert!(m.stream_opened(d, mode, blocks, bs, 2_000).is_err(), "{d} {mode:?} {blocks} {bs}");
        let effects = drain(&mut m);
        assert!(effects.iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "a sync that died midway");
        assert!(matches!(effects.last(), Some(Effect::Finished)));
        assert!(m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).is_err(), "the job is over");
    }
    let mut m = job(JobKind::Sync, true);
    store_both(&mut m);
    assert!(m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).is_err(), "a disk sent twice");
    let mut m = job(JobKind::Sync, true);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    assert!(m.stream_opened("data", TransferMode::Blocks, 16, BS, 2_000).is_err(), "one disk at a time");
    let mut m = job(JobKind::Sync, true);
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    assert!(matches!(m.outcome(), Some(Err(_))), "a disk that ends without a stream");
}

#[test]
fn agent_failures_silence_and_lost_connections_end_the_job_as_plan_says() {
    // The agent's refusals and failures, before and after a disk arrived.
    let mut m = job(JobKind::Sync, true);
    m.agent_result(JobOutcome::Failed { kind: FailureKind::TrackingLost, reason: "crash".into() }, 2_000);
    let effects = drain(&mut m);
    assert!(effects.iter().any(|e| matches!(e, Effect::MarkInconsistent(w) if w == "crash")));
    assert_eq!(m.outcome().cloned().and_then(Result::err).map(|f| f.retry), Some(false));
    let mut m = job(JobKind::Sync, true);
    m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "io".into() }, 2_000);
    assert!(!drain(&mut m).iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "nothing moved yet");
    let mut m = job(JobKind::Sync, true);
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 2_000).unwrap();
    m.disk_done("os", DiskDone { root: root(10), changed: 3 }, 3_000);
    m.agent_result(JobOutcome::Failed { kind: FailureKind::Other, reason: "io".into() }, 3_000);
    assert!(drain(&mut m).iter().any(|e| matches!(e, Effect::MarkInconsistent(_))), "after a disk: midway");
    let mut m = job(JobKind::Sync, true);
    m.agent_result(JobOutcome::Restored { bytes_read: 0, bytes_written: 0, skipped: vec![] }, 2_000);
    assert_eq!(m.outcome().cloned().and_then(Result::err).map(|f| f.retry), Some(false));
    // Silence: the deadline moves with every input, and passes only when it is reached.
    let mut m = job(JobKind::Sync, true);
    assert_eq!(m.next_timeout(), Some(31_000));
    m.stream_opened("os", TransferMode::Blocks, 16, BS, 5_000).unwrap();
    assert_eq!(m.next_timeout(), Some(35_000));
    m.timeout("node1", 34_999);
    assert!(m.outcome().is_none());
    m.timeout("node1", 35_000);
    let Some(Err(f)) = m.outcome() else { panic!() };
    assert!(f.reason.contains("no word from the agent of node1") && f.inconsistent.is_some());
    assert_eq!(m.next_timeout(), None);
    let mut m = job(JobKind::ExpressFull, true);
    m.connection_lost("node1");
    assert!(m.outcome().cloned().and_then(Result::err).is_some_and(|f| f.reason.contains("lost")));
    // Inputs after the end change nothing.
    let effects = drain(&mut m).len();
    m.agent_result(success(), 40_000);
    m.committed(Ok(None));
    m.disk_failed("os", "late");
    m.timeout("node1", 90_000);
    assert_eq!(drain(&mut m).len(), 0);
    assert!(effects > 0);
    assert!(m.record().error.as_deref().is_some_and(|e| e.contains("lost")));
}

#[test]
fn a_sync_of_an_inconsistent_replica_is_refused_before_anything_is_sent() {
    let mut replicas: HashMap<String, ReplicaRecord> =
        ["os", "data"].iter().map(|d| (d.to_string(), replica(d, ReplicaState::Consistent))).collect();
    replicas.insert("data".into(), replica("data", ReplicaState::Inconsistent));
    let setup = Setup {
        record: JobRecord::queued(7, JobKind::Sync, Some("web".into())),
        vm: "web".into(),
        disks: vec![disk("os"), disk("data")],
        replicas,
        block_size: BS,
        id_key: None,
        lease_ms: 30_000,
        left_out: vec![],
        parallel: 1,
        epoch: 1,
    };
    let f = VmJob::start(setup, 0).err().unwrap();
    assert!(f.reason.contains("consistency check must run first") && !f.retry);
}

#[test]
fn a_block_stream_ends_with_its_count() {
    let mut r = BlockReceiver::default();
    assert!(matches!(r.frame(TransferFrame::Zero { index: 1 }), Ok(Received::Zero { index: 1 })));
    let block = TransferFrame::Block { index: 2, id: [1; 32], data: vec![0; 4] };
    assert!(matches!(r.frame(block), Ok(Received::Block { index: 2, .. })));
    let end = |n| TransferFrame::Message(TransferMessage::End { blocks_sent: n, bytes_read: 0 });
    assert!(r.frame(end(3)).is_err_and(|e| e.contains("3 blocks, 2 arrived")));
    let mut r = BlockReceiver::default();
    assert_eq!(r.frame(end(0)), Ok(Received::End));
    assert!(r.frame(TransferFrame::Zero { index: 1 }).is_err(), "nothing after the end");
    let mut r = BlockReceiver::default();
    let failed = TransferFrame::Message(TransferMessage::Failed { reason: "disk gone".into() });
    assert!(r.frame(failed).is_err_and(|e| e.contains("disk gone")));
}
