//! Replays every crasher of the `walk` fuzz target (fuzz/regressions/walk/) through
//! `items::fuzz_walk`, the function the target calls: a disk image that once made the partition
//! table or file system readers panic, allocate without bound or loop stays fixed, without
//! libFuzzer or a nightly flag (a loop come back shows as this test not ending). To add one:
//! copy the artifact into fuzz/regressions/walk/ under a name that says what it found. The
//! protocol targets' seeds and crashers are replayed by protocol/tests/fuzz_regressions.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bulwark_coordinator::items::fuzz_walk;
use std::path::Path;

#[test]
fn walk_crashers_end_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/walk");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no crashers in {}", dir.display());
    for path in inputs {
        let image = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| fuzz_walk(&image));
        assert!(outcome.is_ok(), "{} makes fuzz_walk panic again", path.display());
    }
}
