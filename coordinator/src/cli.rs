//! The `bulwark-coordinator` command line. `run` is shared with the `bulwark` multi-call
//! launcher, so the daemon started by the console is exactly this one.

use crate::admin_client::{AdminClient, AdminTarget};
use crate::authority::Authority;
use crate::authority::{AuthorityError, CreatedToken};
use crate::catalog::{Catalog, CatalogError};
use crate::config::DataDir;
use crate::enrollment::TokenScope;
use crate::init::{init, InitOptions};
use bulwark_protocol::messages::{AdminRequest, AdminResponse, TokenInfo};
use bulwark_protocol::paging::PageRequest;
use bulwark_protocol::{ClusterId, HostId};
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
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
        /// Join an existing deployment as another coordinator (same CA; its own catalog and
        /// store) with a token from `token create --coordinator NAME` on its first coordinator.
        #[arg(long, value_name = "TOKEN")]
        join: Option<String>,
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
    /// The items worker (started by the coordinator itself; reads one request on stdin).
    #[command(name = "x-items", hide = true)]
    XItems,
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
    /// Print a one-time join token for an agent: for one host (--host), a new host of a
    /// cluster (--cluster), or both; or for another coordinator of the deployment
    /// (--coordinator NAME, used by `init --join`).
    #[command(group(ArgGroup::new("scope").required(true).multiple(true).args(["host", "cluster", "coordinator"])))]
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the token stays valid ("1h", "30m", "2days"); at most `[tokens] max_ttl`
        /// of coordinator.toml (default 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Only this host may enroll with the token (alone: a standalone host, its own cluster).
        #[arg(long)]
        host: Option<HostId>,
        /// The enrolling host joins this cluster; without --host, any new host name may enroll.
        #[arg(long)]
        cluster: Option<ClusterId>,
        /// Re-enroll this enrolled host: its certificate is revoked when the new one is issued,
        /// and it keeps its cluster unless --cluster says otherwise.
        #[arg(long)]
        replace: Option<HostId>,
        /// A token that lets coordinator NAME join this deployment (`init --join`).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["host", "cluster", "replace"])]
        coordinator: Option<HostId>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List join tokens (used, expired and revoked ones until purged, about a day later).
    List {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Revoke an unused join token by the id `token list` shows.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        id: String,
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
    if matches!(cli.command, Command::XItems) {
        // No logging: stdout is the pipe to the coordinator, stderr its error report.
        return crate::items::worker::main();
    }
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
        Command::XItems => Ok(()),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "bulwark-coordinator", &mut std::io::stdout());
            Ok(())
        }
        Command::Init { data_dir, name, listen, advertise, encrypt, join } => {
            let joined = match join {
                Some(token) => Some(join_deployment(&data_dir, &token, name.clone(), listen, advertise.clone())?),
                None => None,
            };
            let config = init(&data_dir, &InitOptions { name, listen, advertise, encrypt, joined })?;
            println!("initialized coordinator {:?} in {} (listen {})", config.name, data_dir.display(), config.listen);
            if let Some(authority) = &config.authority {
                println!("joined the deployment of {authority}; agents and coordinators enroll there");
            }
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
        Command::Token { command } => token(command),
    }
}

/// The network half of `init --join`: checked before anything is asked (the data directory
/// must be new and the address agents dial known), written by `init` afterwards.
fn join_deployment(
    data_dir: &std::path::Path,
    token: &str,
    name: Option<String>,
    listen: SocketAddr,
    advertise: Option<String>,
) -> anyhow::Result<crate::join::Joined> {
    if crate::config::is_initialized(data_dir) {
        anyhow::bail!("{} is already initialized; nothing was changed", data_dir.display());
    }
    let addr = match advertise {
        Some(a) => a,
        None if listen.port() == 0 || listen.ip().is_unspecified() => anyhow::bail!(
            "a coordinator that joins must say where agents dial it: --listen with an address and a port, or --advertise HOST:PORT"
        ),
        None => listen.to_string(),
    };
    let name = name.map(HostId::new).transpose()?;
    let sans = crate::init::coordinator_sans(name.as_ref().map_or("localhost", |n| n.as_str()), listen);
    let joined = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crate::join::join(token, name, addr, sans))?;
    Ok(joined)
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { data_dir, ttl, host, cluster, replace, coordinator, output } => {
            let scope = TokenScope { host, cluster, replace, coordinator };
            let request = AdminRequest::TokenCreate {
                ttl_secs: ttl.as_secs(),
                host: scope.host.clone(),
                cluster: scope.cluster.clone(),
                replace: scope.replace.clone(),
                coordinator: scope.coordinator.clone(),
            };
            let created = with_authority(
                &data_dir,
                "create the token",
                request,
                |answer| match answer {
                    AdminResponse::Token { token, id, expires_at } => Some(CreatedToken { token, id, expires_at }),
                    _ => None,
                },
                |authority| authority.create_token(ttl, &scope),
            )?;
            if output == Output::Json {
                let CreatedToken { token, id, expires_at } = created;
                println!("{}", serde_json::json!({ "token": token, "id": id, "expires_at": expires_at }));
            } else {
                println!("{}", created.token);
            }
            Ok(())
        }
        TokenCommand::List { data_dir, output } => {
            // Page by page, each printed as it arrives: memory stays bounded however many.
            let now = crate::catalog::now_secs();
            let mut req = PageRequest::default();
            let mut first = true;
            if output == Output::Json {
                print!("[");
            }
            loop {
                let page = with_authority(
                    &data_dir,
                    "list the tokens",
                    AdminRequest::TokenList { page: req.clone() },
                    |answer| match answer {
                        AdminResponse::Tokens(t) => Some(t),
                        _ => None,
                    },
                    |authority| authority.list_tokens(&req),
                )?;
                print_tokens(output, &page.items, now, &mut first);
                match page.next {
                    Some(next) => req = req.after(next),
                    None => break,
                }
            }
            if output == Output::Json {
                println!("]");
            } else if first {
                print_tokens(output, &[], now, &mut first);
            }
            Ok(())
        }
        TokenCommand::Revoke { data_dir, id, output } => {
            let message = with_authority(
                &data_dir,
                "revoke the token",
                AdminRequest::TokenRevoke { id: id.clone() },
                |answer| match answer {
                    AdminResponse::Done { message } => Some(message),
                    _ => None,
                },
                |authority| Ok(crate::enrollment::revoked_message(&id, authority.revoke_token(&id)?)),
            )?;
            if output == Output::Json {
                println!("{}", serde_json::json!({ "id": id, "revoked": true, "message": message }));
            } else {
                println!("{message}");
            }
            Ok(())
        }
    }
}

/// Prints a page of tokens: JSON items of the array the caller opened and closes, or table
/// lines under a header printed before the first page (`first`).
fn print_tokens(output: Output, tokens: &[TokenInfo], now: u64, first: &mut bool) {
    let state = |t: &TokenInfo| match (&t.used_by, t.revoked_at) {
        (Some(by), _) => format!("used by {by}"),
        (None, Some(_)) => "revoked".to_owned(),
        (None, None) if now >= t.expires_at => "expired".to_owned(),
        (None, None) => "unused".to_owned(),
    };
    if output == Output::Json {
        for t in tokens {
            let item = serde_json::json!({
                "id": t.id, "host": t.host, "cluster": t.cluster, "replace": t.replace,
                "created_at": t.created_at, "expires_at": t.expires_at,
                "used": t.used_by.is_some(), "used_by": t.used_by, "used_at": t.used_at,
                "revoked": t.revoked_at.is_some(), "expired": now >= t.expires_at,
                "state": state(t),
            });
            print!("{}{item}", if *first { "" } else { "," });
            *first = false;
        }
        return;
    }
    let time = |s: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)).to_string()
    };
    if *first {
        println!("{:<16}  {:<20} {:<20} {:<20} {:<21} STATE", "ID", "HOST", "CLUSTER", "REPLACES", "EXPIRES");
        *first = false;
    }
    for t in tokens {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        println!(
            "{:<16}  {:<20} {:<20} {:<20} {:<21} {}",
            t.id,
            dash(&t.host),
            dash(&t.cluster),
            dash(&t.replace),
            time(t.expires_at),
            state(t)
        );
    }
}

/// Runs a token command through the running coordinator when one holds the catalog (its
/// admin API: `request`, answered as `answer` picks), else directly on the catalog with
/// `offline` (a stale `coordinator.addr` left by a killed coordinator is not trusted).
fn with_authority<T>(
    data_dir: &std::path::Path,
    what: &str,
    request: AdminRequest,
    answer: impl FnOnce(AdminResponse) -> Option<T>,
    offline: impl FnOnce(&Authority) -> Result<T, AuthorityError>,
) -> anyhow::Result<T> {
    let dir = DataDir::new(data_dir);
    crate::config::CoordinatorConfig::load(&dir)?;
    if Catalog::in_use(&dir.catalog()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let via_admin = rt.block_on(async {
            let target = AdminTarget::from_data_dir(data_dir)?;
            let client = AdminClient::connect(&target).await?;
            let r = client.request(request).await;
            client.close().await;
            let r = r?;
            match answer(r.clone()) {
                Some(t) => Ok(t),
                None => anyhow::bail!("unexpected answer from the coordinator: {r:?}"),
            }
        });
        return match via_admin {
            Ok(t) => Ok(t),
            // A refusal from a running coordinator is final, and says why itself.
            Err(e) => {
                let refused = match e.downcast_ref::<crate::admin_client::AdminClientError>() {
                    Some(crate::admin_client::AdminClientError::Refused(reason)) => Some(reason.clone()),
                    _ => None,
                };
                match refused {
                    Some(reason) => Err(anyhow::anyhow!(reason)),
                    None => {
                        Err(e.context(format!("the coordinator holds the catalog but could not be asked to {what}")))
                    }
                }
            }
        };
    }
    match Catalog::open(&dir.catalog()) {
        Ok(catalog) => {
            let authority = Authority::open(dir, catalog)?;
            Ok(offline(&authority)?)
        }
        Err(CatalogError::Locked(reason)) => {
            anyhow::bail!("the catalog was taken by another process meanwhile ({reason}); try again")
        }
        Err(e) => Err(e.into()),
    }
}
