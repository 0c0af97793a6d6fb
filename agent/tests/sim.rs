//! The sim hypervisor against a model: whatever the interleaving of guest writes, snapshots,
//! releases and agent restarts, a snapshot reads exactly the disk at its snapshot point, the
//! guest always sees every write it made, and change tracking covers every write since the
//! last confirmed token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_agent::sim::bitmap::GRANULARITY;
use bulwark_agent::sim::{
    self, ChangeToken, CreateVm, DiskConfig, Power, ReplicaHealth, SimError, SnapConsistency, Vm,
};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

const SIZE: u64 = 16 * GRANULARITY;

fn make(root: &Path, name: &str, os: &str, power: Power, is: bool, replica: Option<ReplicaHealth>) {
    let req = CreateVm {
        os: os.into(),
        power,
        integration_services: is,
        replica,
        ..CreateVm::new(name, "node1", vec![DiskConfig { name: "os".into(), size: SIZE }])
    };
    sim::create_vm(root, &req).unwrap();
}

fn guest_view(root: &Path, name: &str) -> Vec<u8> {
    let mut out = vec![];
    sim::read_disk(root, name, "os", &mut out).unwrap();
    out
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Snapshot,
    ReleaseConfirm,
    ReleaseAbandon,
    AgentRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..SIZE, 1u64..(3 * GRANULARITY), any::<u8>()).prop_map(|(offset, len, byte)| Op::Write { offset, len: len.min(SIZE - offset), byte }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::ReleaseConfirm),
        1 => Just(Op::ReleaseAbandon),
        1 => Just(Op::AgentRestart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn snapshots_read_the_snapshot_point_and_no_write_is_ever_lost(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make(root, "vm", "windows", Power::Running, true, None);
        let mut model = vec![0u8; SIZE as usize];
        let mut at_snapshot: Option<Vec<u8>> = None;
        // Tracking blocks written since the last confirmed token (what must be re-sent).
        let mut unconfirmed: BTreeSet<u64> = BTreeSet::new();
        let mut since_snapshot: BTreeSet<u64> = BTreeSet::new();
        let mut token = None::<ChangeToken>;
        for op in ops {
            match op {
                Op::Write { offset, len, byte } => {
                    let data = vec![byte; len as usize];
                    Vm::open(root, "vm").unwrap().guest_write("os", offset, &data).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(byte);
                    for t in offset / GRANULARITY..(offset + len).div_ceil(GRANULARITY) {
                        unconfirmed.insert(t);
                        since_snapshot.insert(t);
                    }
                }
                Op::Snapshot => {
                    let mut vm = Vm::open(root, "vm").unwrap();
                    if vm.config.snapshot.is_none() {
                        let (_, t) = vm.take_snapshot("node1", 1).unwrap();
                        at_snapshot = Some(model.clone());
                        since_snapshot.clear();
                        if token.is_some() {
                            prop_assert_eq!(token, Some(t));
                        }
                        token = Some(t);
                        // Changes since the confirmed token cover every unconfirmed write.
                        let changes = vm.changes_since("os", Some(t)).unwrap();
                        for b in &unconfirmed {
                            prop_assert!(changes.is_dirty(*b), "write in tracking block {} not reported", b);
                        }
                    } else {
                        prop_assert!(matches!(vm.take_snapshot("node1", 1), Err(SimError::Busy(_))));
                    }
                }
                Op::ReleaseConfirm | Op::ReleaseAbandon => {
                    let mut vm = Vm::open(root, "vm").unwrap();
                    if vm.config.snapshot.is_some() {
                        vm.release_snapshot().unwrap();
                        if matches!(op, Op::ReleaseConfirm) {
                            token = Some(vm.confirm().unwrap());
                            // Only the writes made after the snapshot point remain unconfirmed.
                            unconfirmed = since_snapshot.clone();
                        } else {
                            vm.abandon().unwrap();
                        }
                        at_snapshot = None;
                    }
                }
                Op::AgentRestart => {
                    // The agent died holding whatever it held; start-up cleans up.
                    sim::cleanup_orphans(root, "node1").unwrap();
                    at_snapshot = None;
                }
            }
            // The guest always sees every write it made.
            prop_assert_eq!(guest_view(root, "vm"), model.clone());
            // A held snapshot reads the disk at its snapshot point.
            if let Some(snap) = &at_snapshot {
                let vm = Vm::open(root, "vm").unwrap();
                let mut buf = vec![0u8; SIZE as usize];
                vm.snapshot_read("os", 0, &mut buf).unwrap();
                prop_assert_eq!(&buf, snap);
            }
        }
        // After everything is released the image itself holds every write.
        sim::cleanup_orphans(root, "node1").unwrap();
        let vm = Vm::open(root, "vm").unwrap();
        prop_assert!(!vm.dir().join("os.overlay").exists());
        prop_assert_eq!(std::fs::read(vm.image("os")).unwrap(), model);
    }
}

#[test]
fn each_kind_of_vm_gets_its_consistency_or_a_refusal_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make(root, "win", "windows", Power::Running, true, None);
    make(root, "lin", "linux", Power::Running, true, None);
    make(root, "nois", "windows", Power::Running, false, None);
    make(root, "off", "windows", Power::Off, true, None);
    make(root, "rep", "windows", Power::Running, true, Some(ReplicaHealth::Healthy));
    make(root, "resync", "windows", Power::Running, true, Some(ReplicaHealth::Resyncing));
    make(root, "crit", "linux", Power::Running, true, Some(ReplicaHealth::Critical));
    let take = |name: &str| Vm::open(root, name).unwrap().take_snapshot("node1", 1).map(|(s, _)| s);
    assert_eq!(take("win").unwrap().consistency, SnapConsistency::App);
    assert_eq!(take("lin").unwrap().consistency, SnapConsistency::Filesystem);
    let paused = take("nois").unwrap();
    assert_eq!(paused.consistency, SnapConsistency::Crash);
    assert!(paused.paused_for_snapshot, "a running VM without integration services is paused for the snapshot");
    assert_eq!(take("off").unwrap().consistency, SnapConsistency::Crash);
    assert_eq!(take("rep").unwrap().consistency, SnapConsistency::Crash, "replica VMs: crash-consistent only");
    let e = take("resync").unwrap_err().to_string();
    assert!(e.contains("resynchronizing"), "{e}");
    let e = take("crit").unwrap_err().to_string();
    assert!(e.contains("critical health"), "{e}");
    // Release resumes what the snapshot paused.
    let mut vm = Vm::open(root, "nois").unwrap();
    vm.config.power = Power::Paused;
    vm.save().unwrap();
    vm.release_snapshot().unwrap();
    assert_eq!(vm.config.power, Power::Running);
}

#[test]
fn live_migration_keeps_tracking_while_storage_migration_and_host_crashes_lose_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make(root, "a", "windows", Power::Running, true, None);
    make(root, "b", "windows", Power::Running, true, None);
    make(root, "c", "windows", Power::Off, true, None);
    let confirmed = |name: &str| {
        let mut vm = Vm::open(root, name).unwrap();
        vm.take_snapshot("node1", 1).unwrap();
        vm.release_snapshot().unwrap();
        vm.confirm().unwrap()
    };
    let ta = confirmed("a");
    let tb = confirmed("b");
    let tc = confirmed("c");
    Vm::open(root, "a").unwrap().guest_write("os", 5, b"hello").unwrap();
    sim::migrate(root, "a", "node2", false).unwrap();
    let mut a = Vm::open(root, "a").unwrap();
    let (_, t) = a.take_snapshot("node2", 2).unwrap();
    assert_eq!(t, ta, "live migration keeps the token");
    let changes = a.changes_since("os", Some(ta)).unwrap();
    assert_eq!(changes.dirty_blocks(GRANULARITY), vec![0], "only the churn is reported after migrating");
    drop(a);

    sim::migrate(root, "b", "node2", true).unwrap();
    let mut b = Vm::open(root, "b").unwrap();
    b.take_snapshot("node2", 2).unwrap();
    assert!(
        matches!(b.changes_since("os", Some(tb)), Err(SimError::TrackingLost { .. })),
        "storage migration resets tracking"
    );
    drop(b);

    let lost = sim::crash_host(root, "node1").unwrap();
    assert!(lost.is_empty(), "c is off, a and b moved away: {lost:?}");
    sim::set_state(root, "c", Power::Running).unwrap();
    assert_eq!(sim::crash_host(root, "node1").unwrap(), vec!["c".to_owned()]);
    let mut c = Vm::open(root, "c").unwrap();
    c.take_snapshot("node1", 3).unwrap();
    assert!(
        matches!(c.changes_since("os", Some(tc)), Err(SimError::TrackingLost { .. })),
        "a host crash loses tracking"
    );
    assert!(matches!(c.changes_since("os", None), Err(SimError::TrackingLost { .. })));
}

#[test]
fn a_failed_transfer_does_not_lose_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make(root, "vm", "linux", Power::Running, true, None);
    let mut vm = Vm::open(root, "vm").unwrap();
    vm.take_snapshot("node1", 1).unwrap();
    vm.release_snapshot().unwrap();
    let t = vm.confirm().unwrap();
    vm.guest_write("os", 3 * GRANULARITY, b"x").unwrap();
    let (_, t2) = vm.take_snapshot("node1", 2).unwrap();
    assert_eq!(t, t2);
    vm.release_snapshot().unwrap();
    vm.abandon().unwrap(); // the transfer died
    vm.guest_write("os", 9 * GRANULARITY, b"y").unwrap();
    let (_, t3) = vm.take_snapshot("node1", 3).unwrap();
    assert_eq!(t3, t, "the token did not advance");
    let blocks = vm.changes_since("os", Some(t3)).unwrap().dirty_blocks(GRANULARITY);
    assert_eq!(blocks, vec![3, 9], "the next run re-sends the first change too");
}
