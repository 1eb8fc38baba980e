use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use coco_sidecar::{Config, MissingCerts, Server, Shutdown};

/// Serves AMD SEV-SNP certificate tables to a VMM's confidential guests.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one VM's VMM on a Unix socket.
    Serve(ServeArgs),
    /// Run a complete request flow against a sample blob (no hardware needed).
    Demo,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MissingArg {
    /// Serve the empty table (ret 0).
    Empty,
    /// Answer EAGAIN.
    Again,
    /// Answer EIO.
    Eio,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Path of the listening socket (a stale one is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Certificate blob: a GHCB certificate table, updated under an exclusive OFD lock.
    #[arg(long)]
    certs: PathBuf,
    /// Wait this long for the shared lock before answering EAGAIN.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    lock_wait_ms: u64,
    /// Drop a lease (and its lock) not released by DONE after this long.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    lease_timeout_ms: u64,
    /// What a request gets while the blob does not exist.
    #[arg(long, value_enum, default_value = "empty")]
    missing_certs: MissingArg,
    /// Connections served at once.
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    /// Leases one connection may hold at once.
    #[arg(long, default_value_t = 64)]
    max_leases: usize,
    /// Drop a peer that leaves a message unfinished for this long.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    io_timeout_ms: u64,
    /// Accept guest memory files without F_SEAL_SHRINK (size-checked before each write).
    #[arg(long)]
    allow_unsealed_memory: bool,
}

impl TryFrom<ServeArgs> for Config {
    type Error = String;

    fn try_from(a: ServeArgs) -> Result<Config, String> {
        if a.lease_timeout_ms == 0 || a.io_timeout_ms == 0 {
            return Err("--lease-timeout-ms and --io-timeout-ms must be positive".into());
        }
        if a.max_connections == 0 || a.max_leases == 0 {
            return Err("--max-connections and --max-leases must be positive".into());
        }
        if a.lease_timeout_ms > u64::from(u32::MAX) {
            return Err("--lease-timeout-ms is too large".into());
        }
        let mut c = Config::new(a.socket, a.certs);
        c.lock_wait = Duration::from_millis(a.lock_wait_ms);
        c.lease_timeout = Duration::from_millis(a.lease_timeout_ms);
        c.missing_certs = match a.missing_certs {
            MissingArg::Empty => MissingCerts::Empty,
            MissingArg::Again => MissingCerts::Again,
            MissingArg::Eio => MissingCerts::Io,
        };
        c.max_connections = a.max_connections;
        c.max_leases = a.max_leases;
        c.io_timeout = Duration::from_millis(a.io_timeout_ms);
        c.allow_unsealed_memory = a.allow_unsealed_memory;
        Ok(c)
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let config = Config::try_from(args)?;
    let shutdown = Shutdown::new()
        .and_then(Shutdown::on_signals)
        .map_err(|e| format!("cannot set up signal handling: {e}"))?;
    let server = Server::bind(config).map_err(|e| e.to_string())?;
    server.run(&shutdown).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Demo => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo => coco_sidecar::demo::run()
            .map(|report| print!("{report}"))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("coco-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
