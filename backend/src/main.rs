use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use coco_sidecar::daemon::monitor;
use coco_sidecar::daemon::seccomp;
use coco_sidecar::health::HealthOptions;
use coco_sidecar::listen::{self, Listen};
use coco_sidecar::tool::{self, check, files, install::InstallOptions};
use coco_sidecar::{cli_docs, logging, metrics, Config, MissingCerts, Server, Shutdown};

/// Serves AMD SEV-SNP certificate tables to a VMM's confidential guests.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines on standard error as text, or as one JSON object per line for log collectors
    /// (journald, Kubernetes log pipelines).
    #[arg(
        long,
        value_enum,
        global = true,
        default_value = "text",
        value_name = "FORMAT"
    )]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one VM's VMM on a Unix socket.
    Serve(ServeArgs),
    /// Probe a running sidecar (and its blob): exit 0 healthy, 1 socket, 2 blob, 64 usage.
    Health(HealthArgs),
    /// Run a complete request flow against a sample blob (no hardware needed).
    Demo,
    /// Build, inspect, check and update the certificate blob (see docs/operations.md).
    #[command(subcommand, after_help = BLOB_EXIT_STATUSES)]
    Blob(BlobCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: cli_docs::Shell,
    },
    /// Write the man pages (coco-sidecar.1, coco-sidecar-serve.1, ...) into DIR.
    Man {
        /// Directory to write into (created if missing), e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

const BLOB_EXIT_STATUSES: &str = "Exit statuses: 0 good; 1 valid with warnings (check); \
2 invalid (check, recover), input refused (install, import); 3 failed (I/O, bad option value); \
4 blob still locked after --wait-ms (install, import, recover); 64 usage error. \
`blob lock` exits with COMMAND's status (128+N if signal N ended it), or 124 lock busy, \
125 other failure, 126 COMMAND not executable, 127 COMMAND not found.";

/// The `blob` subcommands.
#[derive(Debug, Subcommand)]
enum BlobCommand {
    /// Build a blob from DIR's ark.*, ask.* or asvk.*, vcek.* or vlek.*, crl.* (PEM or DER)
    /// and install it at BLOB.
    Import(ImportArgs),
    /// Write each entry of BLOB into DIR as ark.pem, ask.pem, vcek.pem, ... (or .der).
    Export(ExportArgs),
    /// Show every entry: GUID, kind, offset, length, subject, issuer, validity, AMD TCB.
    Show(ShowArgs),
    /// Check structure, certificates, the ARK -> ASK -> VCEK/VLEK chain, validity and TCB.
    Check(CheckArgs),
    /// Validate NEW, then replace BLOB's contents in place under the exclusive OFD lock.
    Install(InstallArgs),
    /// Run COMMAND while holding the exclusive OFD lock on BLOB; exit with its status.
    Lock(LockArgs),
    /// Finish or roll back an interrupted install of BLOB and remove its leftover temporary
    /// files (install and lock do this first); exit 0 when BLOB is then a valid table.
    Recover(RecoverArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum VekArg {
    Vcek,
    Vlek,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Pem,
    Der,
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// Longest wait for the exclusive lock (sidecar leases hold shared locks until DONE).
    #[arg(long, default_value_t = tool::DEFAULT_WAIT_MS, value_name = "MS")]
    wait_ms: u64,
}

#[derive(Debug, clap::Args)]
struct ValidateArgs {
    /// Refuse the new blob when `blob check` would warn, not only when it finds errors.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// Directory of certificate files, named as snphost names them.
    dir: PathBuf,
    /// Blob to create or update.
    blob: PathBuf,
    /// DIR has both a VCEK and a VLEK: use this one.
    #[arg(long = "use", value_enum, value_name = "KIND")]
    use_vek: Option<VekArg>,
    /// Accept a DIR without the ARK, the ASK/ASVK or the VCEK/VLEK (verifiers must then get
    /// them elsewhere).
    #[arg(long, alias = "allow-no-vek")]
    allow_incomplete: bool,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    validate: ValidateArgs,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The blob.
    blob: PathBuf,
    /// Directory to write into (created if missing).
    dir: PathBuf,
    /// File encoding.
    #[arg(long, value_enum, default_value = "pem")]
    format: FormatArg,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// The blob.
    blob: PathBuf,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The blob.
    blob: PathBuf,
    /// Expected VCEK/VLEK TCB, e.g. bl=3,tee=0,snp=8,ucode=115 (also fmc, spl4..spl7).
    #[arg(long, value_name = "KEY=VALUE,...")]
    expect_tcb: Option<String>,
    /// Check validity at this time: now, RFC 3339 (2025-06-01T00:00:00Z) or @UNIX_SECONDS.
    #[arg(long, default_value = "now", value_name = "TIME")]
    at: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// The new blob.
    new: PathBuf,
    /// The blob the sidecars serve (created if absent).
    blob: PathBuf,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    validate: ValidateArgs,
}

#[derive(Debug, clap::Args)]
struct RecoverArgs {
    /// The blob the sidecars serve.
    blob: PathBuf,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, clap::Args)]
struct LockArgs {
    /// The blob the sidecars serve.
    blob: PathBuf,
    #[command(flatten)]
    wait: WaitArgs,
    /// After COMMAND succeeds, install this blob under the same lock (validated first).
    #[arg(long, value_name = "NEW")]
    install: Option<PathBuf>,
    #[command(flatten)]
    validate: ValidateArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Longest `--wait-ms` accepted: a day (a longer wait is a mistake, and must not overflow).
const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

impl WaitArgs {
    fn duration(&self) -> Result<Duration, String> {
        if self.wait_ms > MAX_WAIT_MS {
            return Err(format!("--wait-ms must be at most {MAX_WAIT_MS}"));
        }
        Ok(Duration::from_millis(self.wait_ms))
    }
}

fn install_options(wait: &WaitArgs, validate: &ValidateArgs) -> Result<InstallOptions, String> {
    Ok(InstallOptions {
        wait: wait.duration()?,
        strict: validate.strict,
        check: check::CheckOptions::now(),
    })
}

impl TryFrom<BlobCommand> for tool::Command {
    type Error = String;

    fn try_from(c: BlobCommand) -> Result<tool::Command, String> {
        Ok(match c {
            BlobCommand::Import(a) => tool::Command::Import {
                install: install_options(&a.wait, &a.validate)?,
                import: files::ImportOptions {
                    use_vek: a.use_vek.map(|v| match v {
                        VekArg::Vcek => files::UseVek::Vcek,
                        VekArg::Vlek => files::UseVek::Vlek,
                    }),
                    allow_incomplete: a.allow_incomplete,
                },
                dir: a.dir,
                blob: a.blob,
            },
            BlobCommand::Export(a) => tool::Command::Export {
                blob: a.blob,
                dir: a.dir,
                format: match a.format {
                    FormatArg::Pem => files::Format::Pem,
                    FormatArg::Der => files::Format::Der,
                },
                force: a.force,
            },
            BlobCommand::Show(a) => tool::Command::Show {
                blob: a.blob,
                json: a.json,
            },
            BlobCommand::Check(a) => tool::Command::Check {
                opts: check::CheckOptions {
                    at: tool::parse_time(&a.at).map_err(|e| e.to_string())?,
                    expect_tcb: match a.expect_tcb {
                        Some(t) => check::parse_expect_tcb(&t).map_err(|e| e.to_string())?,
                        None => Vec::new(),
                    },
                },
                blob: a.blob,
                json: a.json,
            },
            BlobCommand::Install(a) => tool::Command::Install {
                opts: install_options(&a.wait, &a.validate)?,
                new: a.new,
                blob: a.blob,
            },
            BlobCommand::Recover(a) => tool::Command::Recover {
                wait: a.wait.duration()?,
                blob: a.blob,
            },
            BlobCommand::Lock(a) => {
                let opts = install_options(&a.wait, &a.validate)?;
                let mut command = a.command.into_iter();
                let program = command.next().ok_or("COMMAND is missing after --")?;
                tool::Command::Lock {
                    blob: a.blob,
                    wait: opts.wait,
                    install: a.install.map(|p| (p, opts)),
                    program,
                    args: command.collect(),
                }
            }
        })
    }
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

/// Parses a permission mode in octal: `600`, `0600` or `0o600`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "{s:?} is not an octal permission mode (e.g. 0600, 0660)"
        )),
    }
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exactly one socket source: --socket PATH, --fd N, or systemd socket \
activation (LISTEN_PID/LISTEN_FDS=1, used when neither option is given)."
)]
struct ServeArgs {
    /// Create the listening socket at this path (a stale one is replaced).
    #[arg(long, conflicts_with = "fd")]
    socket: Option<PathBuf>,
    /// Serve on this already listening AF_UNIX stream socket, inherited as descriptor N.
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// Permission bits of the socket file created by --socket (octal).
    #[arg(long, default_value = "0600", value_parser = parse_mode, value_name = "MODE")]
    socket_mode: u32,
    /// Accept connections only from this uid (SO_PEERCRED); repeatable. The sidecar's own uid
    /// is always allowed. Without it, whoever can open the socket file may connect.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
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
    /// Longest run of EAGAIN for the blob (locked, invalid, unreadable, missing with
    /// --missing-certs again) a connection's guest sees; then the empty table until it is
    /// servable. Linux guests give up after 60 s of EAGAIN.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    max_eagain_ms: u64,
    /// Connections that may hold guest memory or leases at once (4 more may be open without).
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    /// Leases one connection may hold at once.
    #[arg(long, default_value_t = 64)]
    max_leases: usize,
    /// Drop a peer that leaves a message unfinished for this long.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    io_timeout_ms: u64,
    /// Close a connection that has not completed the handshake this long after connecting.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    handshake_timeout_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port; off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Do not install the seccomp filter (see docs/hardening.md).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Prints one line: `healthy: ...` on standard output, or the reason on \
standard error. Exit statuses: 0 healthy; 1 the sidecar does not answer properly on SOCKET; \
2 it answers but BLOB is not servable now (locked by an updater past --lock-wait-ms, invalid, \
unreadable, or missing under --missing-certs again/eio); 64 usage error."
)]
struct HealthArgs {
    /// The sidecar's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Also check that this blob is servable now (validated as `serve` validates it).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Longest wait for each answer from the sidecar.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
    /// Longest wait for the shared lock on BLOB (an updater holds it briefly).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    lock_wait_ms: u64,
    /// The sidecar's --missing-certs: whether an absent BLOB is servable.
    #[arg(long, value_enum, default_value = "empty")]
    missing_certs: MissingArg,
}

impl TryFrom<HealthArgs> for HealthOptions {
    type Error = String;

    fn try_from(a: HealthArgs) -> Result<HealthOptions, String> {
        if a.timeout_ms == 0 || a.timeout_ms > MAX_WAIT_MS || a.lock_wait_ms > MAX_WAIT_MS {
            return Err(format!(
                "--timeout-ms must be 1 to {MAX_WAIT_MS}, --lock-wait-ms at most {MAX_WAIT_MS}"
            ));
        }
        Ok(HealthOptions {
            socket: a.socket,
            certs: a.certs,
            timeout: Duration::from_millis(a.timeout_ms),
            lock_wait: Duration::from_millis(a.lock_wait_ms),
            missing: a.missing_certs.into(),
        })
    }
}

impl From<MissingArg> for MissingCerts {
    fn from(m: MissingArg) -> MissingCerts {
        match m {
            MissingArg::Empty => MissingCerts::Empty,
            MissingArg::Again => MissingCerts::Again,
            MissingArg::Eio => MissingCerts::Io,
        }
    }
}

fn health(args: HealthArgs) -> ExitCode {
    let opts = match HealthOptions::try_from(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("coco-sidecar health: {e}");
            return ExitCode::from(tool::exit::USAGE);
        }
    };
    match coco_sidecar::health::check(&opts) {
        Ok(healthy) => {
            println!("{healthy}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = String;

    fn try_from(a: ServeArgs) -> Result<Config, String> {
        if a.lease_timeout_ms == 0 || a.io_timeout_ms == 0 || a.handshake_timeout_ms == 0 {
            return Err(
                "--lease-timeout-ms, --io-timeout-ms and --handshake-timeout-ms must be positive"
                    .into(),
            );
        }
        if a.max_connections == 0 || a.max_leases == 0 {
            return Err("--max-connections and --max-leases must be positive".into());
        }
        if a.lease_timeout_ms > u64::from(u32::MAX) {
            return Err("--lease-timeout-ms is too large".into());
        }
        if a.max_eagain_ms > MAX_WAIT_MS {
            return Err(format!("--max-eagain-ms must be at most {MAX_WAIT_MS}"));
        }
        let systemd = listen::from_systemd(
            std::env::var_os("LISTEN_PID").as_deref(),
            std::env::var_os("LISTEN_FDS").as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let listen = match (a.socket, a.fd, systemd) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(
                    "systemd passed a socket (LISTEN_FDS) and --socket or --fd was \
                            given too: use one"
                        .into(),
                )
            }
            (Some(path), None, None) => Listen::Path(path),
            (None, Some(n), None) => {
                Listen::Inherited(listen::inherit(n, "--fd").map_err(|e| e.to_string())?)
            }
            (None, None, Some(inherited)) => Listen::Inherited(inherited),
            (None, None, None) => {
                return Err(
                    "no socket: give --socket PATH or --fd N, or start the sidecar \
                            by systemd socket activation"
                        .into(),
                )
            }
            (Some(_), Some(_), None) => return Err("--socket and --fd exclude each other".into()),
        };
        let mut c = Config::new(PathBuf::new(), a.certs);
        c.listen = listen;
        c.socket_mode = a.socket_mode;
        c.allow_uids = a.allow_uids;
        c.lock_wait = Duration::from_millis(a.lock_wait_ms);
        c.lease_timeout = Duration::from_millis(a.lease_timeout_ms);
        c.missing_certs = a.missing_certs.into();
        c.max_eagain = Duration::from_millis(a.max_eagain_ms);
        c.max_connections = a.max_connections;
        c.max_leases = a.max_leases;
        c.io_timeout = Duration::from_millis(a.io_timeout_ms);
        c.handshake_timeout = Duration::from_millis(a.handshake_timeout_ms);
        c.metrics = a.metrics;
        c.seccomp = !a.no_seccomp;
        Ok(c)
    }
}

/// Why a command failed, and its exit status.
struct Failure {
    message: String,
    code: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, code: 1 }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = Config::try_from(args)?;
    // Before anything exists: a --certs that cannot be a blob is a mistake to fail on now.
    let monitor = monitor::start(&config).map_err(|e| Failure {
        message: e.to_string(),
        code: tool::exit::INVALID,
    })?;
    // Read once (by the conversion above); children must not mistake them for their own.
    // Single-threaded here, so changing the environment races with nothing.
    for var in listen::SYSTEMD_VARS {
        std::env::remove_var(var);
    }
    let shutdown = Shutdown::new()
        .and_then(Shutdown::on_signals)
        .map_err(|e| format!("cannot set up signal handling: {e}"))?;
    coco_sidecar::daemon::rlimit::prepare(config.max_connections, config.max_leases);
    // What can fail for a bad option comes before the socket exists.
    let exporter = config.metrics.as_deref().map(metrics::Exporter::bind);
    let exporter = exporter.transpose().map_err(|e| e.to_string())?;
    let filter = config.seccomp.then(seccomp::program).transpose();
    let filter = filter.map_err(|e| e.to_string())?;
    let readiness = metrics::Readiness {
        certs: config.certs.clone(),
        lock_wait: config.lock_wait,
        missing: config.missing_certs,
    };
    let server = Server::bind(config).map_err(|e| e.to_string())?;
    monitor
        .spawn(server.metrics())
        .map_err(|e| format!("cannot start the blob monitor: {e}"))?;
    if let Some(exporter) = exporter {
        exporter
            .serve(server.metrics(), server.store(), readiness)
            .map_err(|e| e.to_string())?;
    }
    // Every socket exists from here on: the filter forbids making new ones.
    if let Some(filter) = filter {
        seccomp::install(&filter).map_err(|e| e.to_string())?;
    }
    Ok(server.run(&shutdown).map_err(|e| e.to_string())?)
}

fn blob(command: BlobCommand) -> ExitCode {
    match tool::Command::try_from(command) {
        Ok(cmd) => ExitCode::from(tool::run(cmd)),
        Err(e) => {
            eprintln!("coco-sidecar: {e}");
            ExitCode::from(tool::exit::FAILED)
        }
    }
}

/// Writes to standard output; a reader that went away (`| head`) is not an error.
fn print_out(bytes: &[u8]) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(bytes);
}

fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE), not clap's 2, which `blob check` uses for "invalid".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(tool::exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Demo | Command::Blob(_) | Command::Completions { .. } | Command::Man { .. } => {
            "warn"
        }
        // The probe prints its one line itself.
        Command::Health(_) => "off",
    };
    let format = match cli.log_format {
        LogFormatArg::Text => logging::Format::Text,
        LogFormatArg::Json => logging::Format::Json,
    };
    logging::init(default_level, format);
    let result = match cli.command {
        Command::Blob(command) => return blob(command),
        Command::Health(args) => return health(args),
        Command::Serve(args) => serve(args),
        Command::Completions { shell } => {
            print_out(&cli_docs::completions(Cli::command(), shell));
            Ok(())
        }
        Command::Man { dir } => cli_docs::man_pages(Cli::command(), &dir)
            .map(|pages| {
                let list: String = pages.iter().map(|p| format!("{}\n", p.display())).collect();
                print_out(list.as_bytes());
            })
            .map_err(|e| Failure::from(format!("DIR {}: {e}", dir.display()))),
        Command::Demo => coco_sidecar::demo::run()
            .map(|report| print!("{report}"))
            .map_err(|e| Failure::from(e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { message, code }) => {
            // One line: through the log where it is on (in its format), else plainly.
            if log::log_enabled!(log::Level::Error) {
                log::error!("{message}");
            } else {
                eprintln!("coco-sidecar: {message}");
            }
            ExitCode::from(code)
        }
    }
}
