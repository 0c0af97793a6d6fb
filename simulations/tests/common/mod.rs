//! Runs `bulwark-chaos` with JSON output: (exit code, summary, stderr).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

pub fn chaos(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, serde_json::Value, String) {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark-chaos"))
        .args(args)
        .args(["--output", "json", "--work"])
        .arg(work.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON summary ({e}): {stderr}"));
    (out.status.code(), summary, stderr)
}
