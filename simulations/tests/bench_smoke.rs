//! The benchmark binary runs end to end on a small sample and writes a report of the
//! contract's shape. (Figures are checked for being measured, never for being fast.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn bench_limits_writes_the_contract_report() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark-bench"))
        .args(["--scenario", "limits", "--limit-bytes", "8MiB", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("bench-results.json")).unwrap()).unwrap();
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(report["machine"]["mem_bytes"].as_u64().unwrap() > 0);
    for limit in ["read_bps", "blake3_bps", "quic_bps", "quic_bps_1_stream", "quic_bps_4_streams"] {
        assert!(report["limits"][limit].as_f64().unwrap() > 0.0, "{limit} not measured: {report}");
    }
    assert!(report["results"].is_array());
    let svg = std::fs::read_to_string(out.path().join("bench-limits.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("QUIC + mTLS"));
    assert!(!out.path().join("limits-sample.bin").exists(), "the sample file is cleaned up");
}

#[test]
fn bench_refuses_unknown_scenarios_and_bad_sizes() {
    let run =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_bulwark-bench")).args(args).output().unwrap();
    let out = run(&["--scenario", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
    let out = run(&["--scenario", "limits", "--limit-bytes", "lots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
}

/// Runs `bulwark-bench ARGS --out DIR` successfully and returns its bench-results.json.
fn run_bench(args: &[&str], out: &std::path::Path) -> serde_json::Value {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark-bench"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("bench-results.json")).unwrap()).unwrap()
}

#[test]
fn bench_restores_run_end_to_end_and_report_both_rows() {
    let out = tempfile::tempdir().unwrap();
    let report = run_bench(&["--scenario", "restore", "--sizes", "16MiB", "--limit-bytes", "8MiB"], out.path());
    let rows = report["results"].as_array().unwrap();
    let full = rows.iter().find(|r| r["scenario"] == "restore").unwrap();
    let smart = rows.iter().find(|r| r["scenario"] == "smart-restore").unwrap();
    assert_eq!(full["tool"], "bulwark");
    assert_eq!(full["bytes_sent"], 16 << 20, "a full restore writes every block of the random disk");
    assert!(smart["bytes_sent"].as_u64().unwrap() < 16 << 20, "a smart restore writes only what diverged");
    assert!(report["restore"]["full_seconds"].as_f64().unwrap() > 0.0);
    // The peers restore the same image (checked byte for byte by the bench) in the same run.
    for peer in ["restic", "borg"] {
        let r = rows.iter().find(|r| r["tool"] == peer && r["scenario"] == "restore").unwrap();
        assert_eq!(r["bytes_sent"], 16 << 20, "{r}");
    }
    let findings: Vec<&str> = report["findings"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(findings.iter().any(|f| f.starts_with("full restore") && f.contains("restic") && f.contains("borg")));
}

#[test]
fn bench_disks_copies_one_vms_disks_one_at_a_time_then_at_once() {
    let out = tempfile::tempdir().unwrap();
    let args = ["--scenario", "disks", "--sizes", "16MiB", "--disks", "2", "--read-delay-ms", "2", "--peers", "none"];
    let report = run_bench(&args, out.path());
    let rows = report["results"].as_array().unwrap();
    for scenario in ["initial 2x1", "initial 2x2", "initial 2x1+2ms", "initial 2x2+2ms"] {
        let r = rows.iter().find(|r| r["scenario"] == scenario).unwrap_or_else(|| panic!("no {scenario}: {report}"));
        assert_eq!(r["bytes_read"], 16 << 20, "both random disks read whole: {r}");
        assert!(r["seconds"].as_f64().unwrap() > 0.0);
    }
    let findings: Vec<&str> = report["findings"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(findings.iter().filter(|f| f.starts_with("initial copy of 2 disks")).count(), 2, "{findings:?}");
}

#[test]
fn bench_incremental_compares_with_restic_and_borg_on_the_same_churn() {
    let out = tempfile::tempdir().unwrap();
    let args =
        ["--scenario", "incremental", "--sizes", "16MiB,32MiB", "--churn-bytes", "2MiB", "--limit-bytes", "8MiB"];
    let report = run_bench(&args, out.path());
    let rows = report["results"].as_array().unwrap();
    let find = |tool: &str, scenario: &str, size: u64| {
        rows.iter()
            .find(|r| r["tool"] == tool && r["scenario"] == scenario && r["size_bytes"] == size)
            .unwrap_or_else(|| panic!("no {tool} {scenario} row at {size}: {report}"))
    };
    for size in [16u64 << 20, 32 << 20] {
        for tool in ["bulwark", "restic", "borg"] {
            let initial = find(tool, "initial", size);
            // (The peers' figure includes the small sibling file of their directory.)
            let read = initial["bytes_read"].as_u64().unwrap();
            assert!((size..size + 4096).contains(&read), "{tool} reads the whole random image once: {initial}");
            assert!(initial["bytes_stored"].as_u64().unwrap() >= size * 9 / 10, "random data does not shrink");
            let inc = find(tool, "incremental", size);
            assert_eq!(inc["churn_bytes"], 2 << 20, "the same churn for every tool");
            assert_eq!(inc["churn"], "2.0 MiB");
            assert!(inc["seconds"].as_f64().unwrap() > 0.0);
        }
        // Bulwark reads and stores only the churn; the peers re-read the whole image.
        let b = find("bulwark", "incremental", size);
        assert_eq!(b["bytes_read"], 2 << 20, "{b}");
        assert!(b["bytes_stored"].as_u64().unwrap() < 3 << 20, "{b}");
        for peer in ["restic", "borg"] {
            let read = find(peer, "incremental", size)["bytes_read"].as_u64().unwrap();
            assert!((size..size + 4096).contains(&read), "{peer} re-reads the image: {read}");
        }
    }
    let findings: Vec<&str> = report["findings"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(findings.iter().any(|f| f.contains("faster")), "{findings:?}");
    let svg = std::fs::read_to_string(out.path().join("bench-incremental.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3, "one line per tool");
}

#[test]
fn bench_qemu_compares_nbd_reads_with_the_sim_and_qemu_img_convert() {
    let out = tempfile::tempdir().unwrap();
    let report = run_bench(&["--scenario", "qemu", "--sizes", "128MiB", "--limit-bytes", "8MiB"], out.path());
    let rows = report["results"].as_array().unwrap();
    let find = |tool: &str, scenario: &str| {
        rows.iter()
            .find(|r| r["tool"] == tool && r["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no {tool} {scenario} row: {report}"))
    };
    for tool in ["bulwark-qemu", "bulwark-sim"] {
        assert_eq!(find(tool, "qemu-initial")["bytes_read"], 128 << 20, "{tool} reads the whole random disk");
        assert_eq!(find(tool, "qemu-incremental")["bytes_read"], 1 << 20, "{tool}: 1 % of 128 MiB is one 1 MiB block");
    }
    assert!(find("qemu-img convert", "qemu-initial")["seconds"].as_f64().unwrap() > 0.0);
    let q = &report["qemu"];
    assert!(q["qemu_initial_bps"].as_f64().unwrap() > 0.0 && q["convert_bps"].as_f64().unwrap() > 0.0, "{q}");
    let findings = report["findings"].as_array().unwrap();
    assert!(findings.iter().any(|f| f.as_str().unwrap().contains("qemu-img convert")), "{findings:?}");
}

/// The `scale` scenario end to end with small counts: every VM gets its replica, and each row
/// has its figures (the long counts run only when asked for).
#[test]
fn bench_scale_protects_every_vm_and_reports_each_count() {
    let out = tempfile::tempdir().unwrap();
    let report = run_bench(&["--scenario", "scale", "--scale-vms", "6,12"], out.path());
    let rows = report["scale"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    for (row, vms) in rows.iter().zip([6, 12]) {
        assert_eq!(row["vms"], vms);
        assert!(row["replicas_per_second"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["catalog_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["peak_rss_bytes"].as_u64().unwrap() > 0, "{row}");
    }
}
