//! `bulwark-agent sim …` as users run it: the real binary, real files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulwark-agent")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(out.status.success(), "bulwark-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sim_commands_create_write_read_churn_migrate_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let r = root.to_str().unwrap();
    ok(&[
        "sim",
        "create-vm",
        "--root",
        r,
        "--name",
        "web1",
        "--host",
        "node1",
        "--disk",
        "os:8MiB",
        "--disk",
        "data:3MiB",
        "--fill",
        "random",
        "--seed",
        "7",
    ]);
    ok(&["sim", "create-vm", "--root", r, "--name", "db1", "--host", "node1", "--os", "linux", "--state", "off"]);
    let vm = std::fs::read_to_string(root.join("vms/web1/vm.toml")).unwrap();
    assert!(vm.contains("host = \"node1\"") && vm.contains("name = \"data\""), "{vm}");

    // A guest write lands where it should and the guest view shows it.
    let input = dir.path().join("in.bin");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&input, &payload).unwrap();
    let before = dir.path().join("before.img");
    ok(&["sim", "read", "--root", r, "--vm", "web1", "--disk", "os", "--output", before.to_str().unwrap()]);
    ok(&[
        "sim",
        "write",
        "--root",
        r,
        "--vm",
        "web1",
        "--disk",
        "os",
        "--offset",
        "1MiB",
        "--input",
        input.to_str().unwrap(),
    ]);
    let after = dir.path().join("after.img");
    ok(&["sim", "read", "--root", r, "--vm", "web1", "--disk", "os", "--output", after.to_str().unwrap()]);
    let (b, a) = (std::fs::read(&before).unwrap(), std::fs::read(&after).unwrap());
    assert_eq!(a.len(), 8 << 20);
    assert_eq!(&a[1 << 20..(1 << 20) + payload.len()], &payload[..]);
    assert_eq!(&a[..1 << 20], &b[..1 << 20], "the rest is untouched");
    assert!(b.iter().any(|x| *x != 0), "--fill random filled the disk");

    let out = ok(&["sim", "churn", "--root", r, "--vm", "web1", "--percent", "25", "--seed", "1"]);
    assert!(out.contains("churned"), "{out}");
    ok(&["sim", "migrate", "--root", r, "--vm", "web1", "--to", "node2"]);
    assert!(std::fs::read_to_string(root.join("vms/web1/vm.toml")).unwrap().contains("host = \"node2\""));
    ok(&["sim", "set-state", "--root", r, "--vm", "db1", "running"]);
    let crashed = ok(&["sim", "crash-host", "--root", r, "--host", "node1"]);
    assert!(crashed.contains("db1") && !crashed.contains("web1"), "{crashed}");
}

#[test]
fn sim_commands_refuse_bad_input_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().to_str().unwrap();
    ok(&["sim", "create-vm", "--root", r, "--name", "vm", "--host", "n1", "--disk", "os:1MiB"]);
    let input = dir.path().join("big.bin");
    std::fs::write(&input, vec![1u8; 4096]).unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "sim",
                "write",
                "--root",
                r,
                "--vm",
                "vm",
                "--disk",
                "os",
                "--offset",
                "1MiB",
                "--input",
                input.to_str().unwrap(),
            ],
            "does not fit",
        ),
        (
            &[
                "sim",
                "write",
                "--root",
                r,
                "--vm",
                "ghost",
                "--disk",
                "os",
                "--offset",
                "0",
                "--input",
                input.to_str().unwrap(),
            ],
            "no VM named",
        ),
        (&["sim", "read", "--root", r, "--vm", "vm", "--disk", "nope", "--output", "/dev/null"], "has no disk"),
        (&["sim", "create-vm", "--root", r, "--name", "vm", "--host", "n1"], "already exists"),
        (&["sim", "create-vm", "--root", r, "--name", "../escape", "--host", "n1"], "VM name"),
    ];
    for (args, want) in cases {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("error: ") && err.contains(want) && err.lines().count() == 1, "{args:?}: {err}");
    }
    assert!(!dir.path().join("escape").exists() && !dir.path().join("vms/../escape").exists());
    let usage = agent(&["sim", "create-vm", "--root", r]);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
}
