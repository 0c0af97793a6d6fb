//! The snapshot actor with the sim backend, in a real actix system: thaw and release always
//! happen — after a normal take, when the lease runs out, when the freeze outlasts its bound,
//! when the hypervisor refuses — and a committed snapshot advances the change token while an
//! abandoned one keeps its changes for the next run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use actix::prelude::*;
use bulwark_agent::backend::{Hypervisor, SimBackend};
use bulwark_agent::sim::{self, CreateVm, DiskConfig, Power, ReplicaHealth, Vm};
use bulwark_agent::snapshot::{Finish, GetState, SnapshotActor, Take};
use bulwark_protocol::messages::{ChangeToken, Consistency};
use bulwark_protocol::snapshot::SnapshotState;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn make(root: &std::path::Path, name: &str, is: bool, replica: Option<ReplicaHealth>) {
    let req = CreateVm {
        integration_services: is,
        replica,
        ..CreateVm::new(name, "node1", vec![DiskConfig { name: "os".into(), size: 1 << 20 }])
    };
    sim::create_vm(root, &req).unwrap();
}

fn held(root: &std::path::Path, vm: &str) -> bool {
    Vm::open(root, vm).unwrap().config.snapshot.is_some()
}

/// Waits (with a deadline) until the VM holds no snapshot and no freeze.
async fn wait_released(root: &std::path::Path, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = Vm::open(root, vm).unwrap().config;
        if c.snapshot.is_none() && c.frozen.is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "{vm} is still frozen or held");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix_rt::System::new().block_on(f);
}

#[test]
fn a_taken_snapshot_is_thawed_held_and_released_with_the_token_advanced_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    make(&root, "win", true, None);
    make(&root, "nois", false, None);
    let backend: Arc<dyn Hypervisor> = Arc::new(SimBackend { root: root.clone() });
    run(async move {
        let a = SnapshotActor::new(backend.clone(), "win", "node1", Duration::from_secs(60)).start();
        let taken = a.send(Take).await.unwrap().unwrap();
        assert_eq!(taken.consistency, Consistency::App);
        assert_eq!(a.send(GetState).await.unwrap(), SnapshotState::Thawed);
        assert!(held(&root, "win"));
        assert!(Vm::open(&root, "win").unwrap().config.frozen.is_none(), "thawed");
        let next = ChangeToken { sequence: taken.token.sequence + 1, ..taken.token };
        a.send(Finish { commit: Some(next) }).await.unwrap().unwrap();
        assert!(!held(&root, "win"));
        assert_eq!(Vm::open(&root, "win").unwrap().config.sequence, 1, "the token advanced");

        // No integration services: paused for the snapshot point, running again right after.
        let b = SnapshotActor::new(backend.clone(), "nois", "node1", Duration::from_secs(60)).start();
        let taken = b.send(Take).await.unwrap().unwrap();
        assert_eq!(taken.consistency, Consistency::Crash);
        let vm = Vm::open(&root, "nois").unwrap();
        assert_eq!(vm.config.power, Power::Running, "resumed after the snapshot point");
        assert!(vm.config.snapshot.as_ref().unwrap().paused_for_snapshot);
        drop(vm);
        b.send(Finish { commit: None }).await.unwrap().unwrap();
        assert_eq!(Vm::open(&root, "nois").unwrap().config.sequence, 0, "abandoned: the token stays");
    });
}

#[test]
fn an_expired_lease_releases_the_snapshot_and_keeps_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    make(&root, "vm", true, None);
    let token = {
        let mut vm = Vm::open(&root, "vm").unwrap();
        vm.take_snapshot("node1", 0).unwrap();
        vm.release_snapshot().unwrap();
        vm.confirm().unwrap()
    };
    Vm::open(&root, "vm").unwrap().guest_write("os", 70_000, b"change").unwrap();
    let backend: Arc<dyn Hypervisor> = Arc::new(SimBackend { root: root.clone() });
    run(async move {
        let a = SnapshotActor::new(backend.clone(), "vm", "node1", Duration::from_millis(200)).start();
        a.send(Take).await.unwrap().unwrap();
        assert!(held(&root, "vm"));
        // The coordinator goes silent: no Renew.
        let deadline = Instant::now() + Duration::from_secs(10);
        while held(&root, "vm") {
            assert!(Instant::now() < deadline, "the lease never expired");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut vm = Vm::open(dir.path(), "vm").unwrap();
    vm.take_snapshot("node1", 2).unwrap();
    let changed = vm.changes_since("os", Some(token)).unwrap().dirty_blocks(65536);
    assert_eq!(changed, vec![1], "the change is still there for the next run");
}

#[test]
fn a_refused_snapshot_touches_nothing_and_an_overlong_freeze_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    make(&root, "resync", true, Some(ReplicaHealth::Resyncing));
    make(&root, "slow", false, None);
    let backend: Arc<dyn Hypervisor> = Arc::new(SimBackend { root: root.clone() });
    run(async move {
        let a = SnapshotActor::new(backend.clone(), "resync", "node1", Duration::from_secs(60)).start();
        let err = a.send(Take).await.unwrap().unwrap_err().to_string();
        assert!(err.contains("resynchronizing"), "{err}");
        let vm = Vm::open(&root, "resync").unwrap();
        assert!(vm.config.snapshot.is_none() && vm.config.frozen.is_none() && vm.config.power == Power::Running);
        drop(vm);

        let b = SnapshotActor::new(backend.clone(), "slow", "node1", Duration::from_secs(60))
            .with_freeze_bound(Duration::ZERO)
            .start();
        let err = b.send(Take).await.unwrap().unwrap_err().to_string();
        assert!(err.contains("over the"), "{err}");
        // The take is answered at the bound; the undoing follows as the hypervisor answers.
        wait_released(&root, "slow").await;
        let vm = Vm::open(&root, "slow").unwrap();
        assert!(vm.config.snapshot.is_none(), "released");
        assert!(vm.config.frozen.is_none(), "thawed");
        assert_eq!(vm.config.power, Power::Running, "resumed");
    });
}
