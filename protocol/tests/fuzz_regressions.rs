//! Replays every seed and every crasher of the protocol fuzz targets (fuzz/seeds/TARGET/ and
//! fuzz/regressions/TARGET/) through the targets' own checks, which this test includes by path
//! from fuzz/src/: a crash libFuzzer once found stays fixed, without libFuzzer or a nightly
//! flag. To add one: copy the artifact into fuzz/regressions/TARGET/ under a name that says
//! what it found.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../fuzz/src/protocol.rs"]
mod protocol;
#[path = "../../fuzz/src/stream.rs"]
mod stream;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found.sort();
    found
}

fn replay(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "no seeds for the {target} target");
    for (path, bytes) in inputs {
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{} fails the {target} target's checks again", path.display());
    }
}

#[test]
fn frame_seeds_and_crashers_pass_the_frame_target() {
    replay("frame", protocol::check_frame);
}

#[test]
fn transfer_seeds_and_crashers_pass_the_transfer_target() {
    replay("transfer", protocol::check_transfer);
}

#[test]
fn codec_seeds_and_crashers_pass_the_codec_target() {
    replay("codec", protocol::check_codec);
}

#[test]
fn handshake_seeds_and_crashers_pass_the_handshake_target() {
    replay("handshake", protocol::check_handshake);
}
