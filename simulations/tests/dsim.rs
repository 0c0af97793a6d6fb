//! The deterministic simulation (`bulwark-chaos --scenario sim`): a seed replays exactly, a
//! CI-sized sweep keeps every invariant, and a deliberately broken coordinator is caught.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

fn sim(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["--scenario", "sim", "--disk", "1MiB", "--vms", "3", "--nodes", "2"];
    all.extend_from_slice(args);
    common::chaos(&all, env)
}

/// Three coordinators over six VMs on two hosts.
fn multi(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["--scenario", "sim", "--disk", "1MiB", "--vms", "6", "--nodes", "2", "--coordinators", "3"];
    all.extend_from_slice(args);
    common::chaos(&all, env)
}

#[test]
fn a_seed_replays_the_same_faults_and_the_same_final_catalog() {
    let args = ["--seed", "7", "--runs", "4", "--minutes", "0.5"];
    let (code, first, stderr) = sim(&args, &[]);
    assert_eq!(code, Some(0), "{first}\n{stderr}");
    let (_, second, _) = sim(&args, &[]);
    assert_eq!(first["digests"], second["digests"], "the same seeds, the same timelines and final catalogs");
    assert_eq!(first["faults"], second["faults"]);
    assert_eq!(first["recovery_points_checked"], second["recovery_points_checked"]);
    let d = first["digests"].as_object().unwrap();
    assert_eq!(d.len(), 4);
    let distinct: std::collections::BTreeSet<String> = d.values().map(|v| v.to_string()).collect();
    assert_eq!(distinct.len(), 4, "another seed, another run: {d:?}");
}

#[test]
fn two_thousand_simulated_seeds_keep_every_invariant() {
    let (code, s, stderr) = sim(&["--seed", "1000", "--runs", "2000", "--minutes", "0.3"], &[]);
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    assert_eq!(s["runs"], 2000);
    let faults = s["faults"].as_object().unwrap();
    for kind in [
        "kill_agent",
        "kill_agent_mid_job",
        "kill_coordinator",
        "kill_coordinator_mid_job",
        "crash_host",
        "migrate",
        "migrate_storage",
        "partition",
        "packet_loss",
        "delay",
    ] {
        assert!(faults.get(kind).and_then(|n| n.as_u64()).unwrap_or(0) >= 100, "{kind}: {s}");
    }
    // About ten per seed (the real queue's retry delays and back-off after failures hold
    // express fulls back while faults are frequent): 21,000 on this machine kind.
    assert!(s["recovery_points_checked"].as_u64().unwrap() >= 15_000, "{s}");
    eprintln!("{} seeds per minute", s["seeds_per_minute"]);
}

#[test]
fn a_coordinator_that_commits_before_every_block_arrived_is_caught() {
    let (code, s, stderr) =
        sim(&["--seed", "1", "--runs", "20", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "commit-early")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "rp-ground-truth" || v["invariant"] == "replica-current"),
        "recovery points or replicas that miss blocks still on their way: {s}"
    );
    let seed = violations[0]["seed"].as_u64().unwrap();
    assert!(stderr.contains(&format!("fault timeline of seed {seed}")), "the timeline is printed for replay: {stderr}");
}

#[test]
fn a_queue_that_starts_a_second_job_for_a_busy_vm_is_caught() {
    let (code, s, stderr) =
        sim(&["--seed", "1", "--runs", "20", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "second-job")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "one-job-per-vm"),
        "a scheduled check and an express full of one VM ran at once: {s}"
    );
}

#[test]
fn an_agent_that_confirms_before_the_verdict_is_caught() {
    let (code, s, stderr) =
        sim(&["--seed", "1", "--runs", "20", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "confirm-early")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "agent-not-ahead"),
        "an agent's token ahead of every commit: {s}"
    );
}

#[test]
fn an_item_recovery_that_writes_wrong_contents_is_caught() {
    let (code, s, stderr) =
        sim(&["--seed", "1", "--runs", "6", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "items-reversed")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "items-exact"),
        "item recoveries that did not give the recovery point's files: {s}"
    );
    let (_, good, _) = sim(&["--seed", "1", "--runs", "3", "--minutes", "0.5"], &[]);
    assert!(good["items_verified"].as_u64().unwrap() >= 3, "the correct build recovers items exactly: {good}");
    assert!(good["violations"].as_array().unwrap().is_empty(), "{good}");
}

#[test]
fn a_restore_that_sends_blocks_out_of_order_is_caught() {
    let (code, s, stderr) =
        sim(&["--seed", "1", "--runs", "20", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "restore-out-of-order")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "restore-exact"),
        "recoveries that did not give the recovery point: {s}"
    );
    let (_, good, _) = sim(&["--seed", "1", "--runs", "3", "--minutes", "0.5"], &[]);
    assert!(good["restores_verified"].as_u64().unwrap() >= 6, "the correct build restores bit-exact: {good}");
}

/// Several coordinators over one cluster: VMs start spread over them and take-overs move them
/// (`bulwark vm take-over`, through the VM's host like any request, under every other fault).
/// Only a VM's owner ever snapshots it, epochs never go down, and every coordinator's recovery
/// points — the old owners' too — match the guest at a snapshot point and restore exactly.
#[test]
fn several_coordinators_keep_one_owner_per_vm_through_take_overs() {
    let (code, s, stderr) = multi(&["--seed", "5000", "--runs", "150", "--minutes", "0.3"], &[]);
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    let faults = s["faults"].as_object().unwrap();
    let n = |k: &str| faults.get(k).and_then(|n| n.as_u64()).unwrap_or(0);
    assert!(n("take_over") >= 100 && n("take_over_done") >= 50, "{s}");
    assert!(n("kill_coordinator") + n("kill_coordinator_mid_job") >= 100, "{s}");
    assert!(s["restores_verified"].as_u64().unwrap() >= 150 * 5, "every VM's owner restores it: {s}");
    // The same seeds replay the same timelines and final catalogs.
    let few = ["--seed", "5000", "--runs", "3", "--minutes", "0.3"];
    let (_, first, _) = multi(&few, &[]);
    let (_, second, _) = multi(&few, &[]);
    assert_eq!(first["digests"], second["digests"]);
}

#[test]
fn an_agent_that_admits_a_stale_epoch_is_caught() {
    let (code, s, stderr) =
        multi(&["--seed", "1", "--runs", "20", "--minutes", "0.5"], &[("BULWARK_SIM_BREAK", "ignore-claims")]);
    assert_eq!(code, Some(1), "{s}\n{stderr}");
    let violations = s["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|v| v["invariant"] == "one-owner"
            && v["detail"].as_str().is_some_and(|d| d.contains("while the claim is coord"))),
        "a snapshot for the old owner after a take-over: {s}"
    );
}

/// Eight coordinators over 400 VMs on eight hosts, one seed: hundreds of VMs per run settle
/// (more jobs asked for than slots), every replica consistent, every VM restored exactly. The
/// full 8 × 1,250 run is in docs/operations.md ("The deterministic simulation").
#[test]
fn eight_coordinators_with_hundreds_of_vms_settle_and_restore_exactly() {
    let (code, s, stderr) = common::chaos(
        &[
            "--scenario",
            "sim",
            "--disk",
            "1MiB",
            "--vms",
            "400",
            "--nodes",
            "8",
            "--coordinators",
            "8",
            "--seed",
            "7",
            "--runs",
            "1",
            "--minutes",
            "0.2",
        ],
        &[],
    );
    assert_eq!(s["violations"], serde_json::json!([]), "{stderr}");
    assert_eq!(code, Some(0));
    assert_eq!(s["restores_verified"], 400, "{s}");
}
