//! `coco-sidecar blob ...`: the operator's tool for the certificate blob (issue 3). It builds
//! the blob from certificate files (`import`), takes it apart (`export`), shows it (`show`),
//! checks it (`check`), replaces it under the exclusive OFD lock (`install`), and runs firmware
//! updates under that lock (`lock`). See docs/operations.md for the workflow.
//!
//! [`crate::args`] turns arguments into a [`Command`]; [`run`] does the work, prints, and returns
//! the exit status (see [`exit`]).

/// `print!` that a reader going away (`blob show | head`) does not turn into a panic: the
/// write error is dropped, as nothing more can be told to a closed standard output.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `println!`, as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub mod cert;
pub mod check;
pub mod files;
pub mod install;
pub mod journal;
pub mod lock;
pub mod locking;
pub mod show;

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coco_protocol::table::MAX_TABLE_BYTES;
use thiserror::Error;

use crate::argpath::{self, ArgPathError, Want};

use check::CheckOptions;
use files::{FilesError, Format, ImportOptions};
use install::{InstallError, InstallOptions, Installed};
use locking::LockingError;
use show::ShowError;

/// Exit statuses of `coco-sidecar blob ...` (docs/operations.md, "Exit statuses").
pub mod exit {
    /// Good: the blob is valid without warnings, or the command did what it was asked.
    pub const OK: u8 = 0;
    /// `check`: valid, but with warnings.
    pub const WARNINGS: u8 = 1;
    /// Invalid: `check` found errors; `install`/`import` refused their input.
    pub const INVALID: u8 = 2;
    /// The command could not do its work (I/O error, missing file, bad option value).
    pub const FAILED: u8 = 3;
    /// `install`/`import`: the blob stayed locked for all of `--wait-ms`.
    pub const BUSY: u8 = 4;
    /// Command-line usage error (unknown option, missing argument).
    pub const USAGE: u8 = 64;
    /// `lock`: the blob stayed locked for all of `--wait-ms`; COMMAND did not run.
    pub const LOCK_BUSY: u8 = 124;
    /// `lock`: any other failure of `blob lock` itself.
    pub const LOCK_FAILED: u8 = 125;
    /// `lock`: COMMAND was found but could not be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// `lock`: COMMAND was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// Default `--wait-ms`: twice the sidecar's default lease timeout, so a lease that never gets
/// its COCO_DONE still expires within the wait.
pub const DEFAULT_WAIT_MS: u64 = 10_000;

/// Failures of the tool outside the other modules' domains.
#[derive(Debug, Error)]
pub enum ToolError {
    /// A `--at` value that is not a time.
    #[error(
        "--at {0:?}: expected \"now\", an RFC 3339 time (2025-06-01T00:00:00Z) or @UNIX_SECONDS"
    )]
    BadTime(String),
    /// A blob that cannot be read: the argument, what is wrong and what to do.
    #[error(transparent)]
    Read(#[from] ArgPathError),
    /// A blob larger than any table.
    #[error("{path}: {size} bytes is more than the {MAX_TABLE_BYTES} bytes a certificate table may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// Formats a time as RFC 3339, seconds precision, UTC.
pub fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Parses `now`, an RFC 3339 time (`2025-06-01T00:00:00Z`, `2025-06-01 00:00:00`), or
/// `@SECONDS` since the Unix epoch.
pub fn parse_time(text: &str) -> Result<SystemTime, ToolError> {
    let bad = || ToolError::BadTime(text.to_owned());
    if text == "now" {
        return Ok(SystemTime::now());
    }
    if let Some(secs) = text.strip_prefix('@') {
        let secs: u64 = secs.parse().map_err(|_| bad())?;
        return UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(bad);
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| bad())
}

/// Reads a blob given as `arg` (`BLOB`, `NEW`), refusing anything larger than a table can be.
pub fn read_blob(arg: &'static str, path: &Path) -> Result<Vec<u8>, ToolError> {
    argpath::check(arg, path, Want::Blob)?;
    let err = |source| ToolError::Read(argpath::explain(arg, path, Want::Blob, source));
    let file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    if size > MAX_TABLE_BYTES as u64 {
        return Err(ToolError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_TABLE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    Ok(bytes)
}

/// A validated `blob` command.
#[derive(Debug)]
pub enum Command {
    /// Build a blob from a directory of certificate files and install it.
    Import {
        /// The directory.
        dir: PathBuf,
        /// The blob to install into.
        blob: PathBuf,
        /// VCEK/VLEK choices.
        import: ImportOptions,
        /// Lock wait and validation.
        install: InstallOptions,
    },
    /// Write one file per entry into a directory.
    Export {
        /// The blob.
        blob: PathBuf,
        /// The directory (created if missing).
        dir: PathBuf,
        /// PEM or DER.
        format: Format,
        /// Overwrite existing files.
        force: bool,
    },
    /// Describe every entry.
    Show {
        /// The blob.
        blob: PathBuf,
        /// JSON instead of text.
        json: bool,
    },
    /// Validate structure, certificates, chain, validity and TCB.
    Check {
        /// The blob.
        blob: PathBuf,
        /// Time and TCB.
        opts: CheckOptions,
        /// JSON instead of text.
        json: bool,
    },
    /// Validate NEW and install it at BLOB under the exclusive lock.
    Install {
        /// The new blob.
        new: PathBuf,
        /// The blob to replace.
        blob: PathBuf,
        /// Lock wait and validation.
        opts: InstallOptions,
    },
    /// Finish or roll back an interrupted install, then validate.
    Recover {
        /// The blob.
        blob: PathBuf,
        /// Longest wait for the exclusive lock.
        wait: Duration,
    },
    /// Run a command with the exclusive lock held.
    Lock {
        /// The blob.
        blob: PathBuf,
        /// Longest wait for the lock.
        wait: Duration,
        /// A new blob to install under the same lock once the command succeeded.
        install: Option<(PathBuf, InstallOptions)>,
        /// The program.
        program: OsString,
        /// Its arguments.
        args: Vec<OsString>,
    },
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> u8 {
    eprintln!("coco-sidecar: {e}");
    code
}

/// Prints the report's warnings (an installed blob has no errors) on stderr, and returns what
/// the success line says of them.
fn show_warnings(report: &check::Report) -> String {
    let problems = report.problems();
    if !problems.is_empty() {
        eprint!("{problems}");
    }
    match report.warnings() {
        0 => "no warnings".to_owned(),
        n => format!("{n} warning(s), printed above: `coco-sidecar blob check` says more"),
    }
}

fn install_code(e: &InstallError) -> u8 {
    match e {
        InstallError::Invalid { .. } => exit::INVALID,
        InstallError::Locking(LockingError::Timeout { .. }) => exit::BUSY,
        _ => exit::FAILED,
    }
}

fn files_code(e: &FilesError) -> u8 {
    match e {
        FilesError::Io { .. } | FilesError::Exists(_) | FilesError::Path(_) => exit::FAILED,
        _ => exit::INVALID,
    }
}

fn installed_word(i: Installed) -> &'static str {
    match i {
        Installed::Created => "created",
        Installed::Rewritten => "rewritten under the exclusive lock",
        Installed::Unchanged => "unchanged (it already held these bytes)",
    }
}

/// Runs `cmd`, printing results on stdout and problems on stderr; returns the exit status.
pub fn run(cmd: Command) -> u8 {
    match cmd {
        Command::Import {
            dir,
            blob,
            import,
            install,
        } => {
            let table = match files::import(&dir, import) {
                Ok(t) => t,
                Err(e) => return fail(&e, files_code(&e)),
            };
            let what = format!("the blob built from {}", dir.display());
            match install::install(table.as_bytes(), &what, &blob, &install) {
                Ok((done, report)) => {
                    let warnings = show_warnings(&report);
                    outln!(
                        "{}: {} ({} entries, {} bytes; {warnings})",
                        blob.display(),
                        installed_word(done),
                        table.entries().len(),
                        table.as_bytes().len()
                    );
                    exit::OK
                }
                Err(e) => fail(&e, install_code(&e)),
            }
        }
        Command::Export {
            blob,
            dir,
            format,
            force,
        } => {
            let bytes = match read_blob("BLOB", &blob) {
                Ok(b) => b,
                Err(e) => return fail(&e, exit::FAILED),
            };
            let table = match coco_protocol::table::Table::parse(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    let e = format!("{}: not a valid certificate table: {e}", blob.display());
                    return fail(&e, exit::INVALID);
                }
            };
            match files::export(&table, &dir, format, force) {
                Ok(paths) => {
                    for p in paths {
                        outln!("{}", p.display());
                    }
                    exit::OK
                }
                Err(e) => fail(&e, files_code(&e)),
            }
        }
        Command::Show { blob, json } => {
            let bytes = match read_blob("BLOB", &blob) {
                Ok(b) => b,
                Err(e) => return fail(&e, exit::FAILED),
            };
            let shown = show::view(&bytes).and_then(|v| {
                if json {
                    show::to_json(&v)
                } else {
                    Ok(show::to_text(&v))
                }
            });
            match shown {
                Ok(text) => {
                    out!("{text}");
                    exit::OK
                }
                Err(e @ ShowError::Table(_)) => {
                    fail(&format!("{}: {e}", blob.display()), exit::INVALID)
                }
                Err(e) => fail(&e, exit::FAILED),
            }
        }
        Command::Check { blob, opts, json } => {
            let report = match read_blob("BLOB", &blob) {
                Ok(b) => check::check(&b, &opts),
                Err(e @ ToolError::TooLarge { .. }) => return fail(&e, exit::INVALID),
                Err(e) => return fail(&e, exit::FAILED),
            };
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => outln!("{s}"),
                    Err(e) => return fail(&e, exit::FAILED),
                }
            } else {
                out!("{}: {report}", blob.display());
            }
            report.exit_code()
        }
        Command::Install { new, blob, opts } => {
            let bytes = match read_blob("NEW", &new) {
                Ok(b) => b,
                Err(e @ ToolError::TooLarge { .. }) => return fail(&e, exit::INVALID),
                Err(e) => return fail(&e, exit::FAILED),
            };
            let what = new.display().to_string();
            match install::install(&bytes, &what, &blob, &opts) {
                Ok((done, report)) => {
                    let warnings = show_warnings(&report);
                    outln!(
                        "{}: {} ({} bytes from {what}; {warnings})",
                        blob.display(),
                        installed_word(done),
                        bytes.len()
                    );
                    exit::OK
                }
                Err(e) => fail(&e, install_code(&e)),
            }
        }
        Command::Recover { blob, wait } => match install::recover(&blob, wait) {
            Ok(r) => {
                let found = match &r.found {
                    journal::Recovered::Clean => "no interrupted install".to_owned(),
                    journal::Recovered::Finished => "finished an interrupted install".to_owned(),
                    journal::Recovered::Discarded(why) => {
                        format!("dropped the journal of an interrupted install ({why})")
                    }
                };
                let removed = match r.removed {
                    0 => String::new(),
                    n => format!(", removed {n} leftover temporary file(s)"),
                };
                match r.valid {
                    Ok(size) => {
                        outln!("{}: {found}{removed}; valid ({size} bytes)", blob.display());
                        exit::OK
                    }
                    Err(e) => fail(
                        &format!(
                            "{}: {found}{removed}; not a valid certificate table: {e} \
                             (install a good blob)",
                            blob.display()
                        ),
                        exit::INVALID,
                    ),
                }
            }
            Err(e) => fail(&e, install_code(&e)),
        },
        Command::Lock {
            blob,
            wait,
            install,
            program,
            args,
        } => {
            let new = match &install {
                Some((path, _)) => match read_blob("--install NEW", path) {
                    Ok(b) => Some(b),
                    Err(e) => return fail(&e, exit::LOCK_FAILED),
                },
                None => None,
            };
            let what = install
                .as_ref()
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_default();
            let install_new = match (&new, &install) {
                (Some(bytes), Some((_, opts))) => Some((bytes.as_slice(), what.as_str(), opts)),
                _ => None,
            };
            if let Err(e) = argpath::check("BLOB", &blob, Want::Blob) {
                return fail(&e, exit::LOCK_FAILED);
            }
            match lock::run_locked(&blob, &program, &args, wait, install_new) {
                Ok(outcome) => {
                    match outcome.installed {
                        Some(done) => eprintln!(
                            "coco-sidecar: {}: {} with {what}",
                            blob.display(),
                            installed_word(done)
                        ),
                        None if install.is_some() => eprintln!(
                            "coco-sidecar: the command failed (status {}); {} is unchanged",
                            outcome.status,
                            blob.display()
                        ),
                        None => {}
                    }
                    outcome.status
                }
                Err(e) => fail(&e, e.exit_code()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lock::LockError;
    use super::*;
    use std::io;

    #[test]
    fn times_parse() {
        assert_eq!(
            parse_time("@86400").expect("unix"),
            UNIX_EPOCH + Duration::from_secs(86400)
        );
        assert_eq!(
            fmt_time(parse_time("2025-06-01T00:00:00Z").expect("rfc3339")),
            "2025-06-01T00:00:00Z"
        );
        assert!(parse_time("2025-06-01 12:00:00").is_ok());
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("@x").is_err());
    }

    #[test]
    fn lock_errors_map_to_the_documented_statuses() {
        // docs/operations.md, "Exit statuses": 127 COMMAND not found, 126 not executable,
        // 124 the lock stayed busy.
        let spawn = |kind| LockError::Spawn {
            program: "x".into(),
            source: io::Error::from(kind),
        };
        assert_eq!(spawn(io::ErrorKind::NotFound).exit_code(), 127);
        assert_eq!(spawn(io::ErrorKind::PermissionDenied).exit_code(), 126);
        let e = LockError::Locking(LockingError::Timeout {
            path: "b".into(),
            waited_ms: 1,
            holder: locking::Holder::Shared,
        });
        assert_eq!(e.exit_code(), 124);
    }
}
