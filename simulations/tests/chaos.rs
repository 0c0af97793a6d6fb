//! The chaos harness with the real daemons: a short sweep finds nothing, and a deliberately
//! broken build (the sim lets guest writes reach the image a held snapshot reads) is caught —
//! so the harness is known to bite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::chaos;

#[test]
fn a_short_mixed_sweep_keeps_every_invariant() {
    let (code, s, stderr) = chaos(
        &["--seed", "11", "--runs", "2", "--minutes", "0.3", "--nodes", "2", "--vms", "3", "--disk", "8MiB"],
        &[],
    );
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    assert_eq!(s["runs"], 2);
    assert_eq!(s["seeds"], serde_json::json!([11, 12]));
    let faults: u64 = s["faults"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(faults >= 4, "faults were injected: {s}");
    assert!(s["recovery_points_checked"].as_u64().unwrap() >= 6, "{s}");
    assert!(s["restores_verified"].as_u64().unwrap() >= 6, "{s}");
}

#[test]
fn a_short_multi_coordinator_sweep_keeps_one_owner_per_vm() {
    let (code, s, stderr) = chaos(
        &[
            "--scenario",
            "multi",
            "--seed",
            "1",
            "--runs",
            "1",
            "--minutes",
            "0.3",
            "--nodes",
            "3",
            "--vms",
            "6",
            "--disk",
            "4MiB",
        ],
        &[],
    );
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    assert!(s["faults"]["take_over"].as_u64().unwrap_or(0) >= 1, "take-overs were injected: {s}");
    // Every coordinator's recovery points of every VM were restored and matched the guest.
    assert!(s["restores_verified"].as_u64().unwrap() >= 6, "{s}");
    assert!(stderr.contains("taken over from coordinator"), "{stderr}");
}

#[test]
fn the_harness_catches_a_build_whose_snapshots_are_not_a_point_in_time() {
    let (code, s, stderr) = chaos(
        &["--seed", "1", "--runs", "3", "--minutes", "0.3", "--vms", "2", "--disk", "16MiB"],
        &[("BULWARK_SIM_BREAK", "write-through-snapshot")],
    );
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "rp-ground-truth"),
        "a backup that saw later writes matches no snapshot point of the guest: {s}"
    );
    let seed = violations[0]["seed"].as_u64().unwrap();
    assert!(stderr.contains(&format!("fault timeline of seed {seed}")), "the timeline is printed for replay: {stderr}");
}

/// The coordinator's store on a small tmpfs of its own, filled to the last byte while backups
/// run and the coordinator is killed: jobs fail with a clear "store is full", a coordinator
/// that cannot start says so, and once there is room every recovery point still restores and
/// every replica is repaired. Mounting the tmpfs needs root, which CI has.
#[test]
fn a_full_store_disk_fails_jobs_cleanly_and_loses_nothing() {
    let (code, s, stderr) = chaos(
        &["--scenario", "store-full", "--seed", "3", "--runs", "1", "--minutes", "0.3", "--vms", "3", "--disk", "8MiB"],
        &[],
    );
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    assert!(s["faults"]["store_full"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["full_disk_errors"].as_u64().unwrap() >= 1, "the full disk made jobs fail: {s}\n{stderr}");
    assert!(s["recovery_points_checked"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["recovery_points_checked"], s["restores_verified"], "{s}");
}
