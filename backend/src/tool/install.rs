//! `blob install NEW BLOB`: validate NEW, then replace BLOB's contents under the exclusive OFD
//! lock, so that no sidecar ever reads a torn table and no request that holds a lease sees its
//! chain change before it reached firmware.
//!
//! The rewrite is *in place* because the sidecars lock the file they open: a rename would put
//! a new, unlocked file at the path while leases still hold the old one. It is crash-safe: the
//! new content is journalled beside the blob first and space is reserved before the old
//! content is touched ([`super::journal`]); an interrupted install is finished by
//! `blob recover`, which every install runs first. Only a BLOB that does not exist yet is
//! created by renaming a complete temporary file into place (never replacing anything), so no
//! sidecar ever sees it half written. A symbolic link at BLOB is refused, not followed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use coco_protocol::table::{Table, TableError, MAX_TABLE_BYTES};
use thiserror::Error;

use super::check::{self, CheckOptions, Report};
use super::journal::{self, JournalError, Recovered};
use super::locking::{self, LockingError};
use crate::argpath::{self, ArgPathError, Want};

/// Permissions of a blob `install` creates: the sidecars may run as another user.
const CREATE_MODE: u32 = 0o644;

/// Why NEW was not installed.
#[derive(Debug, Error)]
pub enum InstallError {
    /// NEW failed validation (or, under `--strict`, had warnings); BLOB is untouched.
    #[error("{}", refusal(what, blob, report))]
    Invalid {
        /// What was validated (a path, or "the imported files").
        what: String,
        /// The blob that was to be updated.
        blob: PathBuf,
        /// The findings.
        report: Box<Report>,
    },
    /// BLOB is not a path a blob can be installed at.
    #[error(transparent)]
    Path(#[from] ArgPathError),
    /// The lock was not taken; BLOB is untouched.
    #[error(transparent)]
    Locking(#[from] LockingError),
    /// The rewrite (or the recovery of an earlier one) did not complete; the message says in
    /// which state it left BLOB.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Reading NEW, or writing BLOB, failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Why NEW was refused: errors, or (under `--strict`) warnings alone, which do not make it
/// invalid.
fn refusal(what: &str, blob: &Path, report: &Report) -> String {
    let (errors, warnings) = (report.errors(), report.warnings());
    let problems = report.problems();
    if errors > 0 {
        format!(
            "refused: {what} is not a valid certificate blob ({errors} error(s), {warnings} \
             warning(s)); {} is unchanged:\n{problems}",
            blob.display()
        )
    } else {
        format!(
            "refused under --strict: {what} is valid but has {warnings} warning(s); {} is \
             unchanged (without --strict it would be installed with them):\n{problems}",
            blob.display()
        )
    }
}

/// Checks BLOB before anything is written: a blob file, or nothing yet in a directory that
/// exists (it is then created).
pub fn check_blob_path(blob: &Path) -> Result<(), InstallError> {
    argpath::check("BLOB", blob, Want::Blob)?;
    match std::fs::symlink_metadata(blob) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = journal::directory(blob);
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(argpath::explain(
                    "BLOB",
                    blob,
                    Want::Blob,
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                )
                .into()),
                Err(e) => Err(argpath::explain("BLOB", blob, Want::Blob, e).into()),
            }
        }
        Err(e) => Err(argpath::explain("BLOB", blob, Want::Blob, e).into()),
    }
}

/// What `install` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// BLOB did not exist and was created.
    Created,
    /// BLOB was rewritten in place under the lock.
    Rewritten,
    /// BLOB already held exactly these bytes; nothing was written.
    Unchanged,
}

/// How to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// Longest wait for the exclusive lock.
    pub wait: Duration,
    /// Refuse NEW on warnings too.
    pub strict: bool,
    /// What NEW is checked against (time, TCB).
    pub check: CheckOptions,
}

/// Checks `new` as `blob check` does: errors refuse it, and so do warnings when `strict`.
/// Returns the report, whose warnings the caller should show.
pub fn validate(
    new: &[u8],
    what: &str,
    blob: &Path,
    opts: &InstallOptions,
) -> Result<Report, InstallError> {
    let report = check::check(new, &opts.check);
    if report.errors() > 0 || (opts.strict && report.warnings() > 0) {
        return Err(InstallError::Invalid {
            what: what.to_owned(),
            blob: blob.to_owned(),
            report: Box::new(report),
        });
    }
    Ok(report)
}

/// Validates `new` and installs it at `blob`.
pub fn install(
    new: &[u8],
    what: &str,
    blob: &Path,
    opts: &InstallOptions,
) -> Result<(Installed, Report), InstallError> {
    let report = validate(new, what, blob, opts)?;
    Ok((write_blob(new, blob, opts.wait)?, report))
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Replaces the contents of `blob` (already validated bytes), creating it if absent.
pub fn write_blob(new: &[u8], blob: &Path, wait: Duration) -> Result<Installed, InstallError> {
    locking::refuse_symlink(blob)?;
    check_blob_path(blob)?;
    if !blob.exists() && create(new, blob)? {
        return Ok(Installed::Created);
    }
    let file = lock_and_recover(blob, wait)?;
    let changed = write_locked(&file, blob, new)?;
    // Dropping the file closes it, which releases the lock.
    drop(file);
    Ok(if changed {
        Installed::Rewritten
    } else {
        Installed::Unchanged
    })
}

/// What `blob recover` found and left.
#[derive(Debug)]
pub struct Recovery {
    /// The interrupted install it finished or dropped, if any.
    pub found: Recovered,
    /// Leftover temporary files removed.
    pub removed: usize,
    /// BLOB now: its size when it is a valid table, or why not.
    pub valid: Result<usize, TableError>,
}

/// `blob recover BLOB`: under the exclusive lock, finishes or drops an interrupted install
/// and removes leftover temporary files, then validates BLOB as the sidecars do.
pub fn recover(blob: &Path, wait: Duration) -> Result<Recovery, InstallError> {
    argpath::check("BLOB", blob, Want::Blob)?;
    let file = locking::lock_exclusive(blob, wait)?;
    let (found, removed) = journal::recover(&file, blob)?;
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_TABLE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(blob, "read"))?;
    Ok(Recovery {
        found,
        removed,
        valid: Table::parse(&bytes).map(|_| bytes.len()),
    })
}

/// Takes the exclusive lock on `blob` and recovers from an interrupted install (logged when
/// there was one), as every updater does before it changes the blob.
pub fn lock_and_recover(blob: &Path, wait: Duration) -> Result<File, InstallError> {
    let file = locking::lock_exclusive(blob, wait)?;
    match journal::recover(&file, blob)? {
        (Recovered::Clean, _) => {}
        (Recovered::Finished, _) => log::warn!(
            "{}: finished the rewrite an interrupted install had started",
            blob.display()
        ),
        (Recovered::Discarded(why), _) => log::warn!(
            "{}: dropped the journal of an interrupted install: {why}",
            journal::journal_path(blob).display()
        ),
    }
    Ok(file)
}

/// Rewrites the locked `file` unless it already holds `new` (crash-safe, see
/// [`super::journal`]). Returns whether it wrote.
pub fn write_locked(file: &File, path: &Path, new: &[u8]) -> Result<bool, InstallError> {
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    if len == new.len() as u64 {
        let mut current = vec![0u8; new.len()];
        file.read_exact_at(&mut current, 0)
            .map_err(io_err(path, "read"))?;
        if current == new {
            return Ok(false);
        }
    }
    journal::rewrite(file, path, new)?;
    Ok(true)
}

/// Creates `blob` from a complete temporary file renamed into place without replacing
/// anything. `Ok(false)` when someone else created it first.
fn create(new: &[u8], blob: &Path) -> Result<bool, InstallError> {
    let dir = journal::directory(blob);
    let mut tmp = journal::staging_file(blob).map_err(io_err(dir, "create a temporary file in"))?;
    tmp.write_all(new).map_err(io_err(tmp.path(), "write"))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(CREATE_MODE))
        .map_err(io_err(blob, "set permissions of"))?;
    tmp.as_file().sync_all().map_err(io_err(blob, "fsync"))?;
    match tmp.persist_noclobber(blob) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err(blob, "create")(e.error)),
    }
    // Make the new directory entry durable too.
    let _ = journal::sync_directory(dir);
    Ok(true)
}
