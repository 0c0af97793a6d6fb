//! Crash safety of the store with real processes: a child ingests and commits recovery points
//! (and prunes and collects garbage) while the test kills it with SIGKILL at random moments.
//! After every kill: the store opens, every recovery point in the catalog reads back exactly
//! its ground truth, no committed recovery point is missing, and verify is clean.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_simulations::torture;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kill_loop(gc: bool, kills: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Highest version each VM announced as committed.
    let mut announced: HashMap<u32, u64> = HashMap::new();
    let (mut commits, mut gcs, mut torn) = (0usize, 0usize, 0usize);
    for kill in 0..kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark-store-torture"))
            .arg(dir.path())
            .arg(seed.to_string())
            .args(if gc { vec!["--gc"] } else { vec![] })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The kill is placed by the child's progress, not by the clock (a loaded machine would
        // otherwise kill every child before it commits anything): wait for 0 to 3 lines, then
        // kill at a random point of what a round has been taking.
        let lines = {
            let (tx, rx) = std::sync::mpsc::channel();
            let stdout = child.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let (started, mut last, mut round) = (Instant::now(), Instant::now(), Duration::from_millis(100));
            let mut lines = vec![];
            for _ in 0..rng.gen_range(0..=3) {
                let line = rx
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_else(|e| panic!("kill {kill}: the child made no progress in 120 s: {e}"));
                round = last.elapsed().max(Duration::from_millis(1));
                last = Instant::now();
                lines.push(line);
            }
            if lines.is_empty() {
                round = round.max(started.elapsed());
            }
            std::thread::sleep(round.mul_f64(rng.gen_range(0.0..1.2)));
            sigkill(child.id());
            reader.join().unwrap();
            lines.extend(rx.try_iter());
            lines
        };
        let status = child.wait().unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.code().is_none(), "the child must die by the signal, not exit: {status:?}\n{err}");
        assert!(!err.contains("panicked"), "kill {kill}: the child panicked:\n{err}");
        for line in &lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["COMMITTED", vm, version, _] => {
                    let (vm, version): (u32, u64) = (vm.parse().unwrap(), version.parse().unwrap());
                    let v = announced.entry(vm).or_default();
                    *v = (*v).max(version);
                    commits += 1;
                }
                ["GC"] => gcs += 1,
                _ => {}
            }
        }

        // Did this kill land mid-write? (A pack longer than its committed length, or a pack no
        // commit knows, is what a crash between append and commit leaves.)
        {
            let data = bulwark_coordinator::config::DataDir::new(dir.path());
            let catalog = bulwark_coordinator::catalog::Catalog::open(&data.catalog()).unwrap();
            let known: HashMap<u32, u64> = catalog.packs().unwrap().into_iter().collect();
            for entry in std::fs::read_dir(data.packs()).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                let id: u32 = name.trim_end_matches(".pack").parse().unwrap();
                let len = entry.metadata().unwrap().len();
                if known.get(&id).is_none_or(|&durable| len > durable) {
                    torn += 1;
                    break;
                }
            }
        }
        let store = torture::open(dir.path()).unwrap_or_else(|e| panic!("kill {kill}: the store does not open: {e:#}"));
        let mut present: HashMap<u32, u64> = HashMap::new();
        for rp in store.catalog().all_recovery_points().unwrap() {
            let (vm, version) = torture::parse_config(&rp.config).unwrap();
            let got = store
                .disk_digest(&rp.disks[0])
                .unwrap_or_else(|e| panic!("kill {kill}: vm{vm} v{version} unreadable: {e}"));
            assert_eq!(
                got,
                torture::image_digest(seed, vm, version),
                "kill {kill}: vm{vm} v{version} is not bit-exact"
            );
            let p = present.entry(vm).or_default();
            *p = (*p).max(version);
        }
        for (vm, v) in &announced {
            assert!(present.get(vm).is_some_and(|p| p >= v), "kill {kill}: vm{vm} v{v} was committed and is gone");
        }
        let report = store.verify().unwrap();
        assert!(report.is_clean(), "kill {kill}: verify: {report:?}");
    }
    eprintln!("{kills} kills, {commits} commits announced, {gcs} GCs, {torn} kills left uncommitted writes behind");
    assert!(commits > kills, "the workload made progress ({commits} commits over {kills} kills)");
    assert!(torn >= kills / 10, "too few kills landed mid-write ({torn} of {kills}): the test would not bite");
    if gc {
        assert!(gcs > 0, "garbage collections ran between the kills");
    }
}

/// SIGKILL through the `kill` command (the crate forbids unsafe code, so no libc::kill).
fn sigkill(pid: u32) {
    let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
    assert!(ok);
}

#[test]
fn kill_9_during_ingest_and_commit_never_loses_or_corrupts_a_recovery_point() {
    kill_loop(false, 60, 1);
}

#[test]
fn kill_9_during_prune_and_gc_never_loses_or_corrupts_a_recovery_point() {
    kill_loop(true, 60, 2);
}
