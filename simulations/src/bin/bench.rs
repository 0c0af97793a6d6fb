//! `bulwark-bench`: the benchmark table — Bulwark against its peers and against the machine's
//! own limits, on the same data in one run. Timing lives here, never in tests.

use anyhow::Context as _;
use bulwark_protocol::units::{format_size, parse_size};
use bulwark_simulations::limits;
use bulwark_simulations::peers::Peer;
use bulwark_simulations::protectbench::{Churn, Plan};
use bulwark_simulations::report::{bar_chart_svg, line_chart_svg, Limits, Machine, Report};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Bulwark benchmarks.
#[derive(Debug, Parser)]
#[command(name = "bulwark-bench", version, about)]
struct Cli {
    /// initial, incremental, cc, restore, smart-restore, limits, store, read, qemu, items, disks,
    /// all (several: comma-separated; `qemu` needs qemu-system-x86_64 and uses the first size;
    /// `disks` splits the first size over --disks disks and copies them one at a time, then all
    /// at once).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,
    /// Disk sizes for initial, incremental and cc, comma-separated (restores use the first).
    #[arg(long, value_delimiter = ',', default_value = "1GiB,4GiB,16GiB")]
    sizes: Vec<String>,
    /// Churn between backups: this percentage of the disk's 1 MiB blocks. Without --churn or
    /// --churn-bytes, both 1 % and 64MiB run, one after the other.
    #[arg(long, conflicts_with = "churn_bytes")]
    churn: Option<f64>,
    /// Churn between backups: this many bytes, whatever the disk's size.
    #[arg(long)]
    churn_bytes: Option<String>,
    /// Peers to compare with (restic, borg; `none` for none). Installed from Debian if missing.
    #[arg(long, value_delimiter = ',', default_value = "restic,borg")]
    peers: Vec<String>,
    /// Bulwark with an unencrypted store (restic and borg encrypt theirs; by default so does
    /// Bulwark here).
    #[arg(long)]
    plain_store: bool,
    /// Bytes used to measure the machine's limits (read, BLAKE3, QUIC, write).
    #[arg(long, default_value = "1GiB")]
    limit_bytes: String,
    /// Size of the random sim disk of the `read` scenario.
    #[arg(long, default_value = "4GiB")]
    read_bytes: String,
    /// Chunks in the store for the GC benchmark.
    #[arg(long, default_value_t = 1_048_576)]
    gc_chunks: u64,
    /// Disks of the `disks` scenario's VM (2 to 8).
    #[arg(long, default_value_t = 4)]
    disks: usize,
    /// The `disks` scenario again on slow storage: each block read takes this many
    /// milliseconds more (0: only the plain run).
    #[arg(long, default_value_t = 5)]
    read_delay_ms: u64,
    /// VM counts of the `scale` scenario, comma-separated (one coordinator, one group each).
    #[arg(long, value_delimiter = ',', default_value = "800,10000")]
    scale_vms: Vec<usize>,
    /// Where bench-results.json and the charts go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// text or json (the report on stdout).
    #[arg(long, default_value = "text")]
    output: String,
}

/// Scenarios `all` leaves out: long, run when named.
const OPT_IN: &[&str] = &["scale"];
const SCENARIOS: &[&str] =
    &["limits", "store", "read", "initial", "incremental", "cc", "restore", "smart-restore", "qemu", "items", "disks"];

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("cannot statvfs {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut scenarios: Vec<&str> = vec![];
    for s in &cli.scenario {
        match s.as_str() {
            "all" => scenarios.extend(SCENARIOS),
            s if SCENARIOS.contains(&s) || OPT_IN.contains(&s) => scenarios.push(s),
            s => anyhow::bail!("unknown scenario {s:?} (known: {}, {}, all)", SCENARIOS.join(", "), OPT_IN.join(", ")),
        }
    }
    let has = |s: &str| scenarios.contains(&s);
    let sizes =
        cli.sizes.iter().map(|s| parse_size(s).map_err(anyhow::Error::from)).collect::<anyhow::Result<Vec<u64>>>()?;
    anyhow::ensure!(!sizes.is_empty() && sizes.iter().all(|&s| s >= 16 << 20), "--sizes: each at least 16MiB");
    let churns = match (cli.churn, &cli.churn_bytes) {
        (Some(p), _) if !(p > 0.0 && p <= 100.0) => {
            anyhow::bail!("--churn {p}: give a percentage above 0, at most 100")
        }
        (Some(p), _) => vec![Churn::Percent(p)],
        (None, Some(b)) => vec![Churn::Bytes(parse_size(b)?)],
        (None, None) => vec![Churn::Percent(1.0), Churn::Bytes(64 << 20)],
    };
    let peers = if cli.peers.iter().any(|p| p == "none") {
        vec![]
    } else {
        cli.peers.iter().map(|p| Peer::parse(p)).collect::<anyhow::Result<Vec<_>>>()?
    };
    let sample = parse_size(&cli.limit_bytes)?;
    anyhow::ensure!(sample >= 1 << 20, "--limit-bytes must be at least 1MiB");
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;

    let protecting = has("initial") || has("incremental") || has("cc");
    if protecting {
        // The largest image, one repository or store of it at a time, and some slack.
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let need = largest.saturating_mul(23) / 10 + (1 << 30);
        let free = free_bytes(&cli.out)?;
        anyhow::ensure!(
            free >= need,
            "{} has {} free; sizes up to {} need about {} (give smaller --sizes or another --out)",
            cli.out.display(),
            format_size(free),
            format_size(largest),
            format_size(need)
        );
    }
    let restoring = has("restore") || has("smart-restore");
    if protecting || restoring {
        for p in &peers {
            eprintln!("peer: {}", p.ensure_installed()?);
        }
    }

    let mut lim = Limits { sample_bytes: sample, ..Limits::default() };
    if has("limits") || has("store") || restoring || protecting || has("qemu") {
        let file = cli.out.join("limits-sample.bin");
        eprintln!("measuring limits on {} of random data", format_size(sample));
        lim.write_bps = limits::write_bps(&cli.out.join("limits-write.bin"), sample)?;
        limits::write_random_file(&file, sample, 1)?;
        lim.read_bps_cached = limits::read_bps(&file)?;
        match limits::direct_read_bps(&file)? {
            Some(bps) => (lim.read_bps, lim.read_direct) = (bps, true),
            None => lim.read_bps = lim.read_bps_cached,
        }
        lim.blake3_bps_one_thread = limits::blake3_bps(&file, 1)?;
        lim.blake3_bps = limits::blake3_bps(&file, limits::cores())?;
        std::fs::remove_file(&file)?;
        lim.quic_bps_1_stream = limits::quic_bps(sample, 1)?;
        lim.quic_bps_4_streams = limits::quic_bps(sample, 4)?;
        lim.quic_bps = lim.quic_bps_1_stream.max(lim.quic_bps_4_streams);
    }
    let mut store = None;
    if has("store") {
        let work = tempfile::tempdir_in(&cli.out)?;
        let mut f = bulwark_simulations::storebench::StoreFigures::default();
        eprintln!("store: ingest of {} vs a plain file write", format_size(sample));
        bulwark_simulations::storebench::ingest(work.path(), sample, &mut f)?;
        eprintln!("store: metadata per recovery point after 1% churn on a 100 GiB sparse disk");
        bulwark_simulations::storebench::metadata(work.path(), &mut f)?;
        eprintln!("store: dedup of 10 clones of a {} image", format_size(sample / 4));
        bulwark_simulations::storebench::dedup(work.path(), sample / 4, &mut f)?;
        eprintln!("store: GC of a store with {} chunks", cli.gc_chunks);
        bulwark_simulations::storebench::gc(work.path(), cli.gc_chunks, &mut f)?;
        store = Some(f);
    }
    let mut agent_read = None;
    if has("read") {
        let size = parse_size(&cli.read_bytes)?;
        let work = tempfile::tempdir_in(&cli.out)?;
        eprintln!("read: initial read of a {} random sim disk vs cat and BLAKE3", format_size(size));
        agent_read = Some(bulwark_simulations::agentbench::initial_read(work.path(), size)?);
    }
    let mut results = vec![];
    if protecting {
        let plan = Plan {
            sizes: sizes.clone(),
            churns,
            peers: peers.clone(),
            incremental: has("incremental"),
            cc: has("cc"),
            encrypt: !cli.plain_store,
        };
        results.extend(bulwark_simulations::protectbench::run(&cli.out, &plan)?);
    }
    if has("disks") {
        for delay in std::iter::once(0).chain((cli.read_delay_ms > 0).then_some(cli.read_delay_ms)) {
            results.extend(bulwark_simulations::protectbench::parallel_disks(
                &cli.out,
                sizes[0],
                cli.disks,
                delay,
                !cli.plain_store,
            )?);
        }
    }
    let mut restore = None;
    if restoring {
        let work = tempfile::tempdir_in(&cli.out)?;
        let (figures, rows) = bulwark_simulations::restorebench::restores(work.path(), sizes[0], &peers)?;
        results.extend(rows);
        restore = Some(figures);
    }
    let mut qemu = None;
    if has("qemu") {
        let work = tempfile::tempdir_in(&cli.out)?;
        let (figures, rows) = bulwark_simulations::qemubench::run_bench(work.path(), sizes[0])?;
        results.extend(rows);
        qemu = Some(figures);
    }
    let mut items = None;
    if has("items") {
        let work = tempfile::tempdir_in(&cli.out)?;
        items = Some(bulwark_simulations::itemsbench::run_bench(work.path())?);
    }
    let mut scale = vec![];
    if has("scale") {
        for &n in &cli.scale_vms {
            let work = tempfile::tempdir_in(&cli.out)?;
            eprintln!("scale: {n} VMs");
            scale.push(bulwark_simulations::scalebench::run(work.path(), n)?);
        }
    }
    let mut report = Report {
        machine: Machine { cores: limits::cores(), mem_bytes: limits::mem_bytes() },
        limits: lim,
        results,
        store,
        agent_read,
        restore,
        qemu,
        items,
        scale,
        findings: vec![],
    };
    report.compute_findings();
    let series = report.incremental_series();
    if !series.is_empty() {
        let svg = line_chart_svg("Incremental backup time vs disk size", "disk size (GiB)", "seconds", &series);
        std::fs::write(cli.out.join("bench-incremental.svg"), svg)?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(cli.out.join("bench-results.json"), &json)?;
    let l = &report.limits;
    let bars = vec![
        (if l.read_direct { "raw read (O_DIRECT)" } else { "raw read (cached)" }.to_owned(), l.read_bps),
        ("read, warm page cache".to_owned(), l.read_bps_cached),
        ("BLAKE3, 1 thread".to_owned(), l.blake3_bps_one_thread),
        (format!("BLAKE3, {} threads", report.machine.cores), l.blake3_bps),
        ("QUIC + mTLS, 1 stream".to_owned(), l.quic_bps_1_stream),
        ("QUIC + mTLS, 4 streams".to_owned(), l.quic_bps_4_streams),
        ("write + fsync".to_owned(), l.write_bps),
    ];
    std::fs::write(cli.out.join("bench-limits.svg"), bar_chart_svg("Machine limits (loopback)", &bars))?;

    if cli.output == "json" {
        println!("{json}");
    } else {
        let mib = |v: f64| v / 1048576.0;
        println!("machine: {} cores, {}", report.machine.cores, format_size(report.machine.mem_bytes));
        // (Scenarios that do not need the machine's limits leave them unmeasured.)
        if l.read_bps > 0.0 {
            println!("{:<28} {:>12}  {:>10}", "limit", "MiB/s", "vs read");
            for (name, v) in &bars {
                println!("{name:<28} {:>12.1}  {:>9.2}x", mib(*v), v / l.read_bps.max(1.0));
            }
        }
        if let Some(s) = &report.store {
            println!(
                "store ingest                 {:>12.1}  {:>9.2}x plain file write ({:.1} MiB/s)",
                mib(s.ingest_bps),
                s.ingest_vs_plain_write,
                mib(s.plain_write_bps)
            );
            println!(
                "metadata per RP, 1% churn    {:>12} bytes, {:.2}% of a full index ({} bytes; {} of {} blocks changed)",
                s.meta_bytes_per_rp,
                100.0 * s.meta_ratio,
                s.full_index_bytes,
                s.meta_churn_blocks,
                s.meta_blocks
            );
            println!(
                "dedup, 10 clones             {:>12.1}x ({} logical, {} stored)",
                s.dedup_ratio,
                format_size(s.dedup_logical_bytes),
                format_size(s.dedup_stored_bytes)
            );
            println!(
                "GC, {} chunks           {:>12.2} s ({} dropped, {} moved, peak RSS {})",
                s.gc_chunks,
                s.gc_seconds,
                s.gc_chunks_dropped,
                s.gc_chunks_moved,
                format_size(s.gc_peak_rss_bytes)
            );
        }
        if let Some(r) = &report.agent_read {
            println!(
                "agent initial read           {:>12.1}  {:.2}x cat ({:.1} MiB/s), {:.2}x BLAKE3 one thread ({:.1} MiB/s){}",
                mib(r.agent_read_bps),
                r.vs_cat,
                mib(r.cat_bps),
                r.vs_blake3,
                mib(r.blake3_bps),
                if r.cold_cache { ", cold cache" } else { ", warm cache" }
            );
        }
        if let Some(r) = &report.restore {
            println!(
                "full restore (new VM)        {:>12.1}  {:.2}x raw read, {:.2}x QUIC ({} in {:.2} s)",
                mib(r.full_bps),
                r.full_bps / l.read_bps.max(1.0),
                r.full_bps / l.quic_bps.max(1.0),
                format_size(r.disk_bytes),
                r.full_seconds
            );
            println!(
                "smart restore, 1% diverged   {:>12.2} s  {:.1}x faster than the full restore ({} written)",
                r.smart_seconds,
                r.smart_speedup,
                format_size(r.smart_bytes_written)
            );
        }
        if let Some(f) = &report.items {
            for d in &f.dirs {
                println!(
                    "items: {:>6} files, {:<6}  ls paged {:>7.3} s  (a worker per page {:>7.3} s)  copy out {:>7.3} s",
                    d.entries,
                    if d.htree { "htree" } else { "linear" },
                    d.ls_seconds,
                    d.ls_per_page_seconds,
                    d.copy_seconds
                );
            }
            for htree in [false, true] {
                if let Some((ls, per_page, copy)) = f.ratios(htree) {
                    println!(
                        "items: 20,000 / 5,000 files, {:<6}  ls {ls:.1}x  (a worker per page {per_page:.1}x)  copy {copy:.1}x  (4x is linear, 16x quadratic)",
                        if htree { "htree" } else { "linear" }
                    );
                }
            }
        }
        for r in &report.scale {
            println!(
                "scale: {:>6} VMs  inventory {:>6.1} s  group create {:>6.2} s  initial replicas {:>7.1} s ({:>6.1}/s)  vm list {:>6.2} s  job list {:>6.2} s  catalog {}  peak RSS {}",
                r.vms,
                r.inventory_seconds,
                r.group_create_seconds,
                r.initial_seconds,
                r.replicas_per_second,
                r.vm_list_seconds,
                r.job_list_seconds,
                format_size(r.catalog_bytes),
                format_size(r.peak_rss_bytes)
            );
        }
        if let (Some(small), Some(large)) = (report.scale.first(), report.scale.last()) {
            if large.vms > small.vms {
                println!(
                    "scale: per-VM initial rate at {} VMs is {:.2}x the rate at {} VMs",
                    large.vms,
                    large.replicas_per_second / small.replicas_per_second.max(1e-9),
                    small.vms
                );
            }
        }
        if !report.results.is_empty() {
            println!();
            println!(
                "{:<8} {:<14} {:>8} {:>7} {:>9} {:>10} {:>11} {:>11} {:>11}",
                "tool", "scenario", "size", "churn", "seconds", "MiB/s", "read", "sent", "stored"
            );
            for r in &report.results {
                println!(
                    "{:<8} {:<14} {:>8} {:>7} {:>9.2} {:>10.1} {:>11} {:>11} {:>11}",
                    r.tool,
                    r.scenario,
                    format_size(r.size_bytes),
                    r.churn.as_deref().unwrap_or("-"),
                    r.seconds,
                    mib(r.size_bytes as f64 / r.seconds.max(1e-9)),
                    format_size(r.bytes_read),
                    format_size(r.bytes_sent),
                    format_size(r.bytes_stored)
                );
            }
        }
        if !report.findings.is_empty() {
            println!();
            for f in &report.findings {
                println!("- {f}");
            }
        }
        println!("wrote {}", cli.out.join("bench-results.json").display());
    }
    Ok(())
}
