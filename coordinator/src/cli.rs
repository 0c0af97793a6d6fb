//! The `bulwark-coordinator` command line. `run` is shared with the `bulwark` multi-call
//! launcher, so the daemon started by the console is exactly this one.

use crate::admin_client::{AdminClient, AdminTarget};
use crate::authority::Authority;
use crate::catalog::{Catalog, CatalogError};
use crate::config::DataDir;
use crate::init::{init, InitOptions};
use bulwark_protocol::messages::{AdminRequest, AdminResponse};
use bulwark_protocol::HostId;
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// What a command prints.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Bulwark's backup server.
#[derive(Debug, Parser)]
#[command(name = "bulwark-coordinator", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value = "human")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: CA, certificates, empty catalog and chunk store.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// The coordinator's name (its certificate identity); defaults to the host name.
        #[arg(long)]
        name: Option<String>,
        /// UDP address to listen on (port 0: pick a free port at `serve`).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Address agents dial (put into join tokens) when it differs from --listen.
        #[arg(long)]
        advertise: Option<String>,
        /// Encrypt the chunk store (AES-256-GCM; the key is written to pki/store.key, mode
        /// 0600, apart from the store: keep a recovery copy with `key export`).
        #[arg(long)]
        encrypt: bool,
    },
    /// Run the coordinator until SIGINT/SIGTERM.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The store key of an encrypted store: a printable recovery copy, and restoring it.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print a recovery copy of the store key (one `bwk1_…` line with a checksum): keep it
    /// apart from the backups; without the key the store reads nothing.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Restore the store key from its recovery copy (the argument, or one line on stdin).
    /// Refuses to overwrite a different key.
    Import {
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the key (recorded as `key_file` in coordinator.toml); default: where
        /// coordinator.toml says, else pki/store.key.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The recovery copy (`bwk1_…`); `-` or absent: read from stdin.
        key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a one-time join token for an agent.
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the token stays valid ("1h", "30m", "2days").
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Only this host may enroll with the token.
        #[arg(long)]
        host: Option<HostId>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// Sets up `tracing` on stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn,rustls=warn,sled=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses `args` (with the program name first) and runs the command.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "bulwark-coordinator", &mut std::io::stdout());
            Ok(())
        }
        Command::Init { data_dir, name, listen, advertise, encrypt } => {
            let config = init(&data_dir, &InitOptions { name, listen, advertise, encrypt })?;
            println!("initialized coordinator {:?} in {} (listen {})", config.name, data_dir.display(), config.listen);
            Ok(())
        }
        Command::Serve { data_dir } => {
            let dir = DataDir::new(data_dir);
            actix_rt::System::new().block_on(crate::server::serve(dir, shutdown_signal()))?;
            Ok(())
        }
        Command::Key { command: KeyCommand::Export { data_dir, output } } => {
            let (copy, path) = crate::store::key::export(&DataDir::new(data_dir))?;
            if output == Output::Json {
                println!("{}", serde_json::json!({ "key": copy, "key_file": path }));
            } else {
                println!("{copy}");
            }
            Ok(())
        }
        Command::Key { command: KeyCommand::Import { data_dir, key_file, key } } => {
            let copy = match key.filter(|k| k != "-") {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line
                }
            };
            // A relative --key-file is relative to where the command runs, as on any command line.
            let key_file = key_file.map(std::path::absolute).transpose()?;
            match crate::store::key::import(&DataDir::new(&data_dir), &copy, key_file.as_deref())? {
                crate::store::key::Imported::Written(p) => println!("store key written to {}", p.display()),
                crate::store::key::Imported::AlreadyThere(p) => {
                    println!("store key already in place at {}", p.display())
                }
            }
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { data_dir, ttl, host, output } } => {
            let (token, expires_at) = create_token(&data_dir, ttl, host)?;
            if output == Output::Json {
                println!("{}", serde_json::json!({ "token": token, "expires_at": expires_at }));
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}

/// Creates a token through the running coordinator when one holds the catalog, else directly
/// in the catalog (a stale `coordinator.addr` left by a killed coordinator is not trusted).
fn create_token(
    data_dir: &std::path::Path,
    ttl: std::time::Duration,
    host: Option<HostId>,
) -> anyhow::Result<(String, u64)> {
    let dir = DataDir::new(data_dir);
    crate::config::CoordinatorConfig::load(&dir)?;
    if Catalog::in_use(&dir.catalog()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let via_admin = rt.block_on(async {
            let target = AdminTarget::from_data_dir(data_dir)?;
            let client = AdminClient::connect(&target).await?;
            let r = client.request(AdminRequest::TokenCreate { ttl_secs: ttl.as_secs(), host: host.clone() }).await;
            client.close().await;
            match r? {
                AdminResponse::Token { token, expires_at } => Ok((token, expires_at)),
                other => anyhow::bail!("unexpected answer from the coordinator: {other:?}"),
            }
        });
        match via_admin {
            Ok(t) => return Ok(t),
            // A refusal from a running coordinator is final.
            Err(e)
                if e.downcast_ref::<crate::admin_client::AdminClientError>()
                    .is_some_and(|e| matches!(e, crate::admin_client::AdminClientError::Refused(_))) =>
            {
                return Err(e.context("the running coordinator refused to create the token"))
            }
            Err(e) => return Err(e.context("the coordinator holds the catalog but could not be asked for a token")),
        }
    }
    match Catalog::open(&dir.catalog()) {
        Ok(catalog) => {
            let authority = Authority::open(dir, catalog)?;
            Ok(authority.create_token(ttl, host.as_ref())?)
        }
        Err(CatalogError::Locked(reason)) => {
            anyhow::bail!("the catalog was taken by another process meanwhile ({reason}); try again")
        }
        Err(e) => Err(e.into()),
    }
}
