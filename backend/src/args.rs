//! The command line: what `coco-sidecar` parses (clap), and its conversion into the settings
//! of each command ([`Config`], [`HealthOptions`], [`tool::Command`]). `main.rs` only runs it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::config::defaults;
use crate::health::HealthOptions;
use crate::listen::{self, Listen, ListenError};
use crate::tool::{self, check, files, install::InstallOptions, ToolError};
use crate::{cli_docs, Config, MissingCerts};

/// An option value that parses but cannot be used.
#[derive(Debug, Error)]
pub enum ArgsError {
    /// `--wait-ms` beyond [`MAX_WAIT_MS`].
    #[error("--wait-ms must be at most {MAX_WAIT_MS}")]
    WaitTooLong,
    /// `blob check --at` that is not a time.
    #[error(transparent)]
    Time(#[from] ToolError),
    /// `blob check --expect-tcb` that is not a TCB.
    #[error(transparent)]
    ExpectTcb(#[from] check::CheckError),
    /// `blob lock` without COMMAND.
    #[error("COMMAND is missing after --")]
    NoCommand,
    /// `health --timeout-ms` or `--lock-wait-ms` out of range.
    #[error("--timeout-ms must be 1 to {MAX_WAIT_MS}, --lock-wait-ms at most {MAX_WAIT_MS}")]
    HealthWaits,
    /// A `serve` timeout of zero.
    #[error("--lease-timeout-ms, --io-timeout-ms and --handshake-timeout-ms must be positive")]
    ZeroTimeout,
    /// A `serve` limit of zero.
    #[error("--max-connections and --max-leases must be positive")]
    ZeroLimit,
    /// A lease timeout that does not fit the lease's millisecond counter.
    #[error("--lease-timeout-ms is too large")]
    LeaseTimeoutTooLong,
    /// `--max-eagain-ms` beyond [`MAX_WAIT_MS`].
    #[error("--max-eagain-ms must be at most {MAX_WAIT_MS}")]
    EagainTooLong,
    /// A socket from systemd or `--fd` that cannot be served on.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// systemd passed a socket and `--socket` or `--fd` was given too.
    #[error("systemd passed a socket (LISTEN_FDS) and --socket or --fd was given too: use one")]
    TwoSources,
    /// No socket source at all.
    #[error(
        "no socket: give --socket PATH or --fd N, or start the sidecar by systemd socket \
         activation"
    )]
    NoSocket,
    /// Both `--socket` and `--fd`.
    #[error("--socket and --fd exclude each other")]
    SocketAndFd,
}

/// Serves AMD SEV-SNP certificate tables to a VMM's confidential guests.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log lines on standard error as text, or as one JSON object per line for log collectors
    /// (journald, Kubernetes log pipelines).
    #[arg(
        long,
        value_enum,
        global = true,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormatArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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

pub const BLOB_EXIT_STATUSES: &str = "Exit statuses: 0 good; 1 valid with warnings (check); \
2 invalid (check, recover), input refused (install, import); 3 failed (I/O, bad option value); \
4 blob still locked after --wait-ms (install, import, recover); 64 usage error. \
`blob lock` exits with COMMAND's status (128+N if signal N ended it), or 124 lock busy, \
125 other failure, 126 COMMAND not executable, 127 COMMAND not found.";

/// The `blob` subcommands.
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
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
pub enum VekArg {
    Vcek,
    Vlek,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Pem,
    Der,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Longest wait for the exclusive lock (sidecar leases hold shared locks until DONE).
    #[arg(long, default_value_t = tool::DEFAULT_WAIT_MS, value_name = "MS")]
    pub wait_ms: u64,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Refuse the new blob when `blob check` would warn, not only when it finds errors.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Directory of certificate files, named as snphost names them.
    pub dir: PathBuf,
    /// Blob to create or update.
    pub blob: PathBuf,
    /// DIR has both a VCEK and a VLEK: use this one.
    #[arg(long = "use", value_enum, value_name = "KIND")]
    pub use_vek: Option<VekArg>,
    /// Accept a DIR without the ARK, the ASK/ASVK or the VCEK/VLEK (verifiers must then get
    /// them elsewhere).
    #[arg(long, alias = "allow-no-vek")]
    pub allow_incomplete: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub validate: ValidateArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The blob.
    pub blob: PathBuf,
    /// Directory to write into (created if missing).
    pub dir: PathBuf,
    /// File encoding.
    #[arg(long, value_enum, default_value = "pem")]
    pub format: FormatArg,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The blob.
    pub blob: PathBuf,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The blob.
    pub blob: PathBuf,
    /// Expected VCEK/VLEK TCB, e.g. bl=3,tee=0,snp=8,ucode=115 (also fmc, spl4..spl7).
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub expect_tcb: Option<String>,
    /// Check validity at this time: now, RFC 3339 (2025-06-01T00:00:00Z) or @UNIX_SECONDS.
    #[arg(long, default_value = "now", value_name = "TIME")]
    pub at: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The new blob.
    pub new: PathBuf,
    /// The blob the sidecars serve (created if absent).
    pub blob: PathBuf,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub validate: ValidateArgs,
}

#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The blob the sidecars serve.
    pub blob: PathBuf,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, clap::Args)]
pub struct LockArgs {
    /// The blob the sidecars serve.
    pub blob: PathBuf,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// After COMMAND succeeds, install this blob under the same lock (validated first).
    #[arg(long, value_name = "NEW")]
    pub install: Option<PathBuf>,
    #[command(flatten)]
    pub validate: ValidateArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Longest `--wait-ms` accepted: a day (a longer wait is a mistake, and must not overflow).
pub const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

impl WaitArgs {
    fn duration(&self) -> Result<Duration, ArgsError> {
        if self.wait_ms > MAX_WAIT_MS {
            return Err(ArgsError::WaitTooLong);
        }
        Ok(Duration::from_millis(self.wait_ms))
    }
}

pub fn install_options(
    wait: &WaitArgs,
    validate: &ValidateArgs,
) -> Result<InstallOptions, ArgsError> {
    Ok(InstallOptions {
        wait: wait.duration()?,
        strict: validate.strict,
        check: check::CheckOptions::now(),
    })
}

impl TryFrom<BlobCommand> for tool::Command {
    type Error = ArgsError;

    fn try_from(c: BlobCommand) -> Result<tool::Command, ArgsError> {
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
                    at: tool::parse_time(&a.at)?,
                    expect_tcb: match a.expect_tcb {
                        Some(t) => check::parse_expect_tcb(&t)?,
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
                let program = command.next().ok_or(ArgsError::NoCommand)?;
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
pub enum MissingArg {
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
pub struct ServeArgs {
    /// Create the listening socket at this path (a stale one is replaced).
    #[arg(long, conflicts_with = "fd")]
    pub socket: Option<PathBuf>,
    /// Serve on this already listening AF_UNIX stream socket, inherited as descriptor N.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Permission bits of the socket file created by --socket (octal).
    // Text, so that `--help` shows it in octal; a test holds it to `defaults::SOCKET_MODE`.
    #[arg(long, default_value = "0600", value_parser = parse_mode, value_name = "MODE")]
    pub socket_mode: u32,
    /// Accept connections only from this uid (SO_PEERCRED); repeatable. The sidecar's own uid
    /// is always allowed. Without it, whoever can open the socket file may connect.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// Certificate blob: a GHCB certificate table, updated under an exclusive OFD lock.
    #[arg(long)]
    pub certs: PathBuf,
    /// Wait this long for the shared lock before answering EAGAIN.
    #[arg(long, default_value_t = defaults::LOCK_WAIT_MS, value_name = "MS")]
    pub lock_wait_ms: u64,
    /// Drop a lease (and its lock) not released by DONE after this long.
    #[arg(long, default_value_t = defaults::LEASE_TIMEOUT_MS, value_name = "MS")]
    pub lease_timeout_ms: u64,
    /// What a request gets while the blob does not exist.
    #[arg(long, value_enum, default_value = "empty")]
    pub missing_certs: MissingArg,
    /// Longest run of EAGAIN for the blob (locked, invalid, unreadable, missing with
    /// --missing-certs again) a connection's guest sees; then the empty table until it is
    /// servable. Linux guests give up after 60 s of EAGAIN.
    #[arg(long, default_value_t = defaults::MAX_EAGAIN_MS, value_name = "MS")]
    pub max_eagain_ms: u64,
    /// Connections that may hold guest memory or leases at once (4 more may be open without).
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Leases one connection may hold at once.
    #[arg(long, default_value_t = defaults::MAX_LEASES)]
    pub max_leases: usize,
    /// Drop a peer that leaves a message unfinished for this long.
    #[arg(long, default_value_t = defaults::IO_TIMEOUT_MS, value_name = "MS")]
    pub io_timeout_ms: u64,
    /// Close a connection that has not completed the handshake this long after connecting.
    #[arg(long, default_value_t = defaults::HANDSHAKE_TIMEOUT_MS, value_name = "MS")]
    pub handshake_timeout_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port; off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Do not install the seccomp filter (see docs/hardening.md).
    #[arg(long)]
    pub no_seccomp: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Prints one line: `healthy: ...` on standard output, or the reason on \
standard error. Exit statuses: 0 healthy; 1 the sidecar does not answer properly on SOCKET; \
2 it answers but BLOB is not servable now (locked by an updater past --lock-wait-ms, invalid, \
unreadable, or missing under --missing-certs again/eio); 64 usage error."
)]
pub struct HealthArgs {
    /// The sidecar's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Also check that this blob is servable now (validated as `serve` validates it).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Longest wait for each answer from the sidecar.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub timeout_ms: u64,
    /// Longest wait for the shared lock on BLOB (an updater holds it briefly).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub lock_wait_ms: u64,
    /// The sidecar's --missing-certs: whether an absent BLOB is servable.
    #[arg(long, value_enum, default_value = "empty")]
    pub missing_certs: MissingArg,
}

impl TryFrom<HealthArgs> for HealthOptions {
    type Error = ArgsError;

    fn try_from(a: HealthArgs) -> Result<HealthOptions, ArgsError> {
        if a.timeout_ms == 0 || a.timeout_ms > MAX_WAIT_MS || a.lock_wait_ms > MAX_WAIT_MS {
            return Err(ArgsError::HealthWaits);
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

impl TryFrom<ServeArgs> for Config {
    type Error = ArgsError;

    /// Also reads systemd's `LISTEN_PID` and `LISTEN_FDS`: a third socket source.
    fn try_from(a: ServeArgs) -> Result<Config, ArgsError> {
        if a.lease_timeout_ms == 0 || a.io_timeout_ms == 0 || a.handshake_timeout_ms == 0 {
            return Err(ArgsError::ZeroTimeout);
        }
        if a.max_connections == 0 || a.max_leases == 0 {
            return Err(ArgsError::ZeroLimit);
        }
        if a.lease_timeout_ms > u64::from(u32::MAX) {
            return Err(ArgsError::LeaseTimeoutTooLong);
        }
        if a.max_eagain_ms > MAX_WAIT_MS {
            return Err(ArgsError::EagainTooLong);
        }
        let systemd = listen::from_systemd(
            std::env::var_os("LISTEN_PID").as_deref(),
            std::env::var_os("LISTEN_FDS").as_deref(),
        )?;
        let listen = match (a.socket, a.fd, systemd) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => return Err(ArgsError::TwoSources),
            (Some(path), None, None) => Listen::Path(path),
            (None, Some(n), None) => Listen::Inherited(listen::inherit(n, "--fd")?),
            (None, None, Some(inherited)) => Listen::Inherited(inherited),
            (None, None, None) => return Err(ArgsError::NoSocket),
            (Some(_), Some(_), None) => return Err(ArgsError::SocketAndFd),
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("coco-sidecar").chain(args.iter().copied()))
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut all = vec!["serve", "--certs", "/b"];
        all.extend_from_slice(args);
        match parse(&all).map(|c| c.command) {
            Ok(Command::Serve(a)) => a,
            other => panic!("{all:?} parsed as {other:?}"),
        }
    }

    fn blob(args: &[&str]) -> Result<tool::Command, ArgsError> {
        let mut all = vec!["blob"];
        all.extend_from_slice(args);
        match parse(&all).map(|c| c.command) {
            Ok(Command::Blob(b)) => tool::Command::try_from(b),
            other => panic!("{all:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// The command line's defaults are those of `Config::new`, which tests and the demo use.
    #[test]
    fn serve_defaults_are_configs() {
        let c = Config::try_from(serve(&["--socket", "/s"])).expect("config");
        let d = Config::new("/s", "/b");
        assert!(matches!(&c.listen, Listen::Path(p) if p == std::path::Path::new("/s")));
        assert_eq!(c.certs, d.certs);
        assert_eq!(c.socket_mode, defaults::SOCKET_MODE);
        assert_eq!(d.socket_mode, 0o600);
        assert!(c.allow_uids.is_empty());
        assert_eq!(c.lock_wait, d.lock_wait);
        assert_eq!(c.lease_timeout, d.lease_timeout);
        assert_eq!(c.max_eagain, d.max_eagain);
        assert_eq!(c.missing_certs, d.missing_certs);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.max_leases, d.max_leases);
        assert_eq!(c.io_timeout, d.io_timeout);
        assert_eq!(c.handshake_timeout, d.handshake_timeout);
        assert_eq!(c.metrics, None);
        // The one difference: the CLI filters system calls unless told not to.
        assert!(c.seccomp && !d.seccomp);
    }

    #[test]
    fn serve_options_reach_the_config() {
        let c = Config::try_from(serve(&[
            "--socket",
            "/s",
            "--socket-mode",
            "0o660",
            "--allow-uid",
            "107",
            "--allow-uid",
            "0",
            "--lock-wait-ms",
            "7",
            "--lease-timeout-ms",
            "8",
            "--max-eagain-ms",
            "9",
            "--missing-certs",
            "eio",
            "--max-connections",
            "3",
            "--max-leases",
            "4",
            "--io-timeout-ms",
            "10",
            "--handshake-timeout-ms",
            "11",
            "--metrics",
            "127.0.0.1:0",
            "--no-seccomp",
        ]))
        .expect("config");
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.allow_uids, [107, 0]);
        assert_eq!(c.lock_wait, Duration::from_millis(7));
        assert_eq!(c.lease_timeout, Duration::from_millis(8));
        assert_eq!(c.max_eagain, Duration::from_millis(9));
        assert_eq!(c.missing_certs, MissingCerts::Io);
        assert_eq!((c.max_connections, c.max_leases), (3, 4));
        assert_eq!(c.io_timeout, Duration::from_millis(10));
        assert_eq!(c.handshake_timeout, Duration::from_millis(11));
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:0"));
        assert!(!c.seccomp);
    }

    #[test]
    fn serve_values_out_of_range_are_refused() {
        let refused = |args: &[&str]| {
            let mut all = vec!["--socket", "/s"];
            all.extend_from_slice(args);
            Config::try_from(serve(&all)).expect_err("refused")
        };
        for zero in [
            "--lease-timeout-ms",
            "--io-timeout-ms",
            "--handshake-timeout-ms",
        ] {
            assert!(matches!(refused(&[zero, "0"]), ArgsError::ZeroTimeout));
        }
        for zero in ["--max-connections", "--max-leases"] {
            assert!(matches!(refused(&[zero, "0"]), ArgsError::ZeroLimit));
        }
        let lease = (u64::from(u32::MAX) + 1).to_string();
        assert!(matches!(
            refused(&["--lease-timeout-ms", &lease]),
            ArgsError::LeaseTimeoutTooLong
        ));
        let eagain = (MAX_WAIT_MS + 1).to_string();
        assert!(matches!(
            refused(&["--max-eagain-ms", &eagain]),
            ArgsError::EagainTooLong
        ));
        // The largest accepted values are accepted.
        let max = MAX_WAIT_MS.to_string();
        let lease = u32::MAX.to_string();
        Config::try_from(serve(&[
            "--socket",
            "/s",
            "--max-eagain-ms",
            &max,
            "--lease-timeout-ms",
            &lease,
        ]))
        .expect("largest values");
    }

    /// A test process has no LISTEN_FDS, so without --socket or --fd there is no socket.
    #[test]
    fn serve_needs_a_socket_source() {
        assert!(std::env::var_os("LISTEN_FDS").is_none());
        assert!(matches!(
            Config::try_from(serve(&[])),
            Err(ArgsError::NoSocket)
        ));
        let both = parse(&["serve", "--certs", "/b", "--socket", "/s", "--fd", "3"]);
        assert_eq!(
            both.expect_err("conflict").kind(),
            ErrorKind::ArgumentConflict
        );
        // Descriptor 0 is standard input, never a listening socket.
        assert!(matches!(
            Config::try_from(serve(&["--fd", "0"])),
            Err(ArgsError::Listen(_))
        ));
    }

    #[test]
    fn socket_modes_parse_in_octal() {
        for (text, mode) in [("600", 0o600), ("0600", 0o600), ("0o660", 0o660), ("0", 0)] {
            assert_eq!(parse_mode(text), Ok(mode), "{text}");
        }
        for bad in ["", "0o", "0800", "1000", "rw", "-1", "0x1ff"] {
            assert!(parse_mode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn blob_commands_convert() {
        let Ok(tool::Command::Install {
            opts,
            new,
            blob: current,
        }) = blob(&["install", "--wait-ms", "250", "--strict", "new", "cur"])
        else {
            panic!("install")
        };
        assert_eq!(opts.wait, Duration::from_millis(250));
        assert!(opts.strict);
        assert_eq!((new, current), (PathBuf::from("new"), PathBuf::from("cur")));

        let Ok(tool::Command::Recover { wait, .. }) = blob(&["recover", "b"]) else {
            panic!("recover")
        };
        assert_eq!(wait, Duration::from_millis(tool::DEFAULT_WAIT_MS));

        let Ok(tool::Command::Lock {
            program,
            args,
            install,
            ..
        }) = blob(&["lock", "b", "--install", "n", "--", "cp", "-a", "x"])
        else {
            panic!("lock")
        };
        assert_eq!(program, "cp");
        assert_eq!(args, ["-a", "x"]);
        assert_eq!(install.map(|(p, _)| p), Some(PathBuf::from("n")));

        let Ok(tool::Command::Check { opts, .. }) =
            blob(&["check", "b", "--at", "@86400", "--expect-tcb", "bl=3,snp=8"])
        else {
            panic!("check")
        };
        assert_eq!(opts.at, std::time::UNIX_EPOCH + Duration::from_secs(86400));
        assert_eq!(
            opts.expect_tcb,
            [("bl".to_owned(), 3), ("snp".to_owned(), 8)]
        );
    }

    #[test]
    fn blob_values_out_of_range_are_refused() {
        let long = (MAX_WAIT_MS + 1).to_string();
        for cmd in [
            vec!["install", "--wait-ms", &long, "n", "b"],
            vec!["import", "--wait-ms", &long, "d", "b"],
            vec!["recover", "--wait-ms", &long, "b"],
            vec!["lock", "--wait-ms", &long, "b", "--", "true"],
        ] {
            assert!(matches!(blob(&cmd), Err(ArgsError::WaitTooLong)), "{cmd:?}");
        }
        assert!(matches!(
            blob(&["check", "b", "--at", "yesterday"]),
            Err(ArgsError::Time(_))
        ));
        assert!(matches!(
            blob(&["check", "b", "--expect-tcb", "snp"]),
            Err(ArgsError::ExpectTcb(_))
        ));
        let no_command = parse(&["blob", "lock", "b"]).expect_err("COMMAND required");
        assert_eq!(no_command.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn health_options() {
        let health = |args: &[&str]| {
            let mut all = vec!["health", "--socket", "/s"];
            all.extend_from_slice(args);
            match parse(&all).map(|c| c.command) {
                Ok(Command::Health(a)) => HealthOptions::try_from(a),
                other => panic!("{all:?} parsed as {other:?}"),
            }
        };
        let o = health(&[]).expect("defaults");
        assert_eq!(o.timeout, Duration::from_millis(2000));
        assert_eq!(o.lock_wait, Duration::from_millis(1000));
        assert_eq!(o.missing, MissingCerts::Empty);
        assert_eq!(o.certs, None);
        let o = health(&["--certs", "/b", "--missing-certs", "again"]).expect("options");
        assert_eq!(o.certs, Some(PathBuf::from("/b")));
        assert_eq!(o.missing, MissingCerts::Again);
        let long = (MAX_WAIT_MS + 1).to_string();
        for bad in [
            ["--timeout-ms", "0"],
            ["--timeout-ms", &long],
            ["--lock-wait-ms", &long],
        ] {
            assert!(
                matches!(health(&bad), Err(ArgsError::HealthWaits)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn log_format_is_global() {
        let cli = parse(&["blob", "show", "b", "--log-format", "json"]).expect("parse");
        assert!(matches!(cli.log_format, LogFormatArg::Json));
        let cli = parse(&["demo"]).expect("parse");
        assert!(matches!(cli.log_format, LogFormatArg::Text));
        let bad = parse(&["--log-format", "xml", "demo"]).expect_err("xml");
        assert_eq!(bad.kind(), ErrorKind::InvalidValue);
    }
}
