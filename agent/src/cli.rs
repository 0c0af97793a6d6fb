//! The `bulwark-agent` command line. `main_with` is shared with the `bulwark` multi-call
//! launcher, so the agent started by the console is exactly this one.

use crate::config::AgentDir;
use crate::enroll::enroll;
use crate::run::{run, RunOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Bulwark's protection agent.
#[derive(Debug, Parser)]
#[command(name = "bulwark-agent", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value = "human")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host with a coordinator using a one-time join token.
    Enroll {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        token: String,
        /// This host's name (defaults to the machine's).
        #[arg(long)]
        host: Option<String>,
    },
    /// Run the agent until SIGINT/SIGTERM.
    Run {
        #[arg(long)]
        data_dir: PathBuf,
        /// Use the sim hypervisor on this storage root.
        #[arg(long)]
        sim_root: Option<PathBuf>,
    },
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn,rustls=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Parses `args` (with the program name first) and runs the command.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let result: anyhow::Result<()> = match cli.command {
        Command::Enroll { data_dir, token, host } => (|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let config = rt.block_on(enroll(&AgentDir::new(&data_dir), &token, host))?;
            println!(
                "enrolled host {:?} with coordinator {} ({})",
                config.host, config.coordinator_name, config.coordinator
            );
            Ok(())
        })(),
        Command::Run { data_dir, sim_root } => actix_rt::System::new()
            .block_on(run(AgentDir::new(data_dir), RunOptions { sim_root }, shutdown_signal()))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.contains(&c) {
                    line = format!("{line}: {c}");
                }
            }
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}
