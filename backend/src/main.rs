use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use coco_sidecar::args::{ArgsError, Cli, Command, LogFormatArg};
use coco_sidecar::daemon::{self, DaemonError};
use coco_sidecar::demo::DemoError;
use coco_sidecar::health::{self, HealthOptions};
use coco_sidecar::{cli_docs, logging, tool, Config};
use thiserror::Error;

/// Why a command failed; each maps to its exit status (`--help` lists them per command).
#[derive(Debug, Error)]
enum MainError {
    #[error(transparent)]
    BlobOptions(ArgsError),
    #[error(transparent)]
    HealthOptions(ArgsError),
    #[error(transparent)]
    ServeOptions(ArgsError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Demo(#[from] DemoError),
    #[error("DIR {dir}: {source}")]
    Man {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            MainError::BlobOptions(_) => tool::exit::FAILED,
            MainError::HealthOptions(_) => tool::exit::USAGE,
            MainError::Daemon(e) => e.exit_code(),
            MainError::ServeOptions(_) | MainError::Demo(_) | MainError::Man { .. } => 1,
        }
    }
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
    logging::init(
        default_level,
        match cli.log_format {
            LogFormatArg::Text => logging::Format::Text,
            LogFormatArg::Json => logging::Format::Json,
        },
    );
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: through the log where it is on (in its format), else plainly.
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e}");
            } else {
                eprintln!("coco-sidecar: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command; `Ok` carries its own exit status (`blob check`'s warnings, `health`'s
/// verdict), `Err` a failure to do it at all.
fn run(command: Command) -> Result<u8, MainError> {
    match command {
        Command::Blob(command) => {
            let command = tool::Command::try_from(command).map_err(MainError::BlobOptions)?;
            Ok(tool::run(command))
        }
        Command::Health(args) => {
            let opts = HealthOptions::try_from(args).map_err(MainError::HealthOptions)?;
            match health::check(&opts) {
                Ok(healthy) => {
                    print_out(format!("{healthy}\n").as_bytes());
                    Ok(tool::exit::OK)
                }
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    Ok(e.exit_code())
                }
            }
        }
        Command::Serve(args) => {
            daemon::run(Config::try_from(args).map_err(MainError::ServeOptions)?)?;
            Ok(tool::exit::OK)
        }
        Command::Completions { shell } => {
            print_out(&cli_docs::completions(Cli::command(), shell));
            Ok(tool::exit::OK)
        }
        Command::Man { dir } => {
            let pages = cli_docs::man_pages(Cli::command(), &dir)
                .map_err(|source| MainError::Man { dir, source })?;
            let list: String = pages.iter().map(|p| format!("{}\n", p.display())).collect();
            print_out(list.as_bytes());
            Ok(tool::exit::OK)
        }
        Command::Demo => {
            print_out(coco_sidecar::demo::run()?.as_bytes());
            Ok(tool::exit::OK)
        }
    }
}

/// Writes to standard output; a reader that went away (`| head`) is not an error.
fn print_out(bytes: &[u8]) {
    let _ = std::io::stdout().write_all(bytes);
}
