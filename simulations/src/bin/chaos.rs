//! `bulwark-chaos`: seeded fault runs against the real daemons as processes on loopback (see
//! `bulwark_simulations::chaos`). Also a multi-call launcher: `bulwark-chaos x-coordinator …`
//! and `x-agent …` run exactly the daemons' code, so a run needs nothing else built.

use bulwark_protocol::units::parse_size;
use bulwark_simulations::chaos::{self, schedule::Scenario, Options};
use bulwark_simulations::dsim;
use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// Bulwark chaos runs.
#[derive(Debug, Parser)]
#[command(name = "bulwark-chaos", version, about)]
struct Cli {
    /// The first seed; runs use seed, seed+1, …
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds to run.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Length of each run's fault phase, in minutes (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// mixed, agents, coordinator, hosts, network, store-full (root: mounts a tmpfs); sim (or sim-mixed): the deterministic simulation.
    #[arg(long, default_value = "mixed")]
    scenario: String,
    /// Cluster nodes (agents).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Coordinators sharing the cluster (`--scenario sim` and `multi`, which defaults to 3):
    /// VMs are spread over them and take-overs move them between them.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// VMs.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Size of each VM's disk.
    #[arg(long, default_value = "32MiB")]
    disk: String,
    /// Where the runs' directories go (a failing seed's is kept there).
    #[arg(long, default_value = "target/chaos")]
    work: PathBuf,
    /// Keep every run's directory (its logs), not only those of runs that found a violation.
    #[arg(long)]
    keep: bool,
    /// text or json (the summary on stdout).
    #[arg(long, default_value = "text")]
    output: String,
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("x-coordinator") => {
            if let Ok(exe) = std::env::current_exe() {
                bulwark_coordinator::items::sandbox::set_worker_command(exe, vec!["x-coordinator".into()]);
            }
            args.remove(1);
            args[0] = "bulwark-coordinator".into();
            return bulwark_coordinator::cli::main_with(args);
        }
        Some("x-agent") => {
            args.remove(1);
            args[0] = "bulwark-agent".into();
            return bulwark_agent::cli::main_with(args);
        }
        _ => {}
    }
    match run(Cli::parse_from(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    anyhow::ensure!(
        cli.nodes >= 1 && cli.vms >= 1 && cli.runs >= 1 && cli.coordinators >= 1,
        "--nodes, --vms, --coordinators and --runs must be at least 1"
    );
    anyhow::ensure!(cli.minutes > 0.0 && cli.minutes <= 24.0 * 60.0, "--minutes must be above 0, at most a day");
    anyhow::ensure!(["text", "json"].contains(&cli.output.as_str()), "--output: text or json");
    let disk_bytes = parse_size(&cli.disk)?;
    anyhow::ensure!(disk_bytes >= 1 << 20, "--disk must be at least 1MiB");
    if cli.scenario == "sim" || cli.scenario == "sim-mixed" {
        return run_sim(&cli, disk_bytes);
    }
    let scenario = Scenario::parse(&cli.scenario).map_err(anyhow::Error::msg)?;
    // Several coordinators only in the multi scenario (three unless said otherwise).
    let coordinators = match (scenario, cli.coordinators) {
        (Scenario::Multi, 1) => 3,
        (Scenario::Multi, n) => n,
        (_, 1) => 1,
        (_, _) => anyhow::bail!("--coordinators: only the multi scenario and the simulation run several"),
    };
    std::fs::create_dir_all(&cli.work)?;
    let opts = Options {
        seed: cli.seed,
        runs: cli.runs,
        minutes: cli.minutes,
        scenario,
        nodes: cli.nodes,
        coordinators,
        vms: cli.vms,
        disk_bytes,
        work: std::fs::canonicalize(&cli.work)?,
        exe: std::env::current_exe()?,
        keep: cli.keep,
    };
    let summary = chaos::sweep(&opts)?;
    print_summary(&cli, &summary)
}

/// The deterministic simulation: `--minutes` of simulated time per seed, `--disk` sized
/// disks (default for it: 1MiB), files on /dev/shm where there is one.
fn run_sim(cli: &Cli, disk_bytes: u64) -> anyhow::Result<bool> {
    let broken = match std::env::var("BULWARK_SIM_BREAK").as_deref() {
        Ok("commit-early") => Some(dsim::nodes::Break::CommitEarly),
        Ok("second-job") => Some(dsim::nodes::Break::SecondJob),
        Ok("confirm-early") => Some(dsim::nodes::Break::ConfirmEarly),
        Ok("restore-out-of-order") => Some(dsim::nodes::Break::RestoreOutOfOrder),
        Ok("items-reversed") => Some(dsim::nodes::Break::ItemsReversed),
        Ok("ignore-claims") => Some(dsim::nodes::Break::IgnoreClaims),
        Ok(other) => {
            anyhow::bail!("BULWARK_SIM_BREAK={other}: the simulation knows commit-early, second-job, confirm-early, restore-out-of-order, items-reversed and ignore-claims")
        }
        Err(_) => None,
    };
    let template = dsim::Options {
        seed: cli.seed,
        hosts: cli.nodes,
        coordinators: cli.coordinators,
        vms: cli.vms,
        duration_ms: (cli.minutes * 60_000.0) as u64,
        disk_bytes,
        scratch: dsim::default_scratch(),
        broken,
    };
    let summary = dsim::sweep(cli.seed, cli.runs, &template)?;
    print_summary(cli, &summary)
}

fn print_summary(cli: &Cli, summary: &chaos::Summary) -> anyhow::Result<bool> {
    if cli.output == "json" {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        // A sweep's seeds are a range: print it as one.
        let seeds = match (summary.seeds.first(), summary.seeds.last()) {
            (Some(a), Some(b)) if b - a + 1 == summary.seeds.len() as u64 && a != b => format!("{a}..={b}"),
            _ => format!("{:?}", summary.seeds),
        };
        println!(
            "runs {}, seeds {seeds}, recovery points checked {}, restores verified {}, item recoveries verified {}",
            summary.runs, summary.recovery_points_checked, summary.restores_verified, summary.items_verified
        );
        for (k, n) in &summary.faults {
            println!("  fault {k}: {n}");
        }
        println!("violations: {}", summary.violations.len());
        for v in &summary.violations {
            println!("  seed {}: {}: {}", v.seed, v.invariant, v.detail);
        }
    }
    if let Some(rate) = summary.seeds_per_minute {
        eprintln!("{rate} seeds per minute");
    }
    for (seed, timeline) in &summary.timelines {
        eprintln!("fault timeline of seed {seed} (replay: bulwark-chaos --seed {seed} --scenario {}):", cli.scenario);
        for line in timeline {
            eprintln!("  {line}");
        }
    }
    Ok(summary.violations.is_empty())
}
