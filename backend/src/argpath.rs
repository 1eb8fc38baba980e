//! Paths given on the command line, and what to tell an operator when one is not what its
//! argument needs: which argument, what the path turned out to be, and the likely fix, instead
//! of a bare `Is a directory (os error 21)`. `serve --certs` and every `blob` command use it.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// What an argument must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A certificate blob (a GHCB certificate table file).
    Blob,
    /// A directory of certificate files (`blob import`).
    CertDir,
    /// A directory to write certificate files into, created if missing (`blob export`).
    OutDir,
}

/// A file error on a path given as an argument, explained.
#[derive(Debug, Error)]
#[error("{arg} {}: {advice}", .path.display())]
pub struct ArgPathError {
    /// The argument, as `--help` names it (`--certs`, `BLOB`, `NEW`, `DIR`).
    pub arg: &'static str,
    /// The path given.
    pub path: PathBuf,
    /// What the path turned out to be, and what to do.
    pub advice: String,
    /// The error, when one was returned.
    #[source]
    pub source: Option<io::Error>,
}

const BLOB_FIX: &str = "name the certificate blob file itself (to build a blob from a \
directory of certificate files: `coco-sidecar blob import DIR BLOB`)";
const DIR_FIX: &str = "import reads a directory holding ark.*, ask.* (or asvk.*) and vcek.* \
(or vlek.*), as `snphost fetch` writes them; put the certificate files in one (to install a \
blob file: `coco-sidecar blob install NEW BLOB`)";

/// The first ancestor of `path` that exists but is not a directory (the cause of ENOTDIR).
fn file_in_the_way(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .skip(1)
        .find(|a| std::fs::metadata(a).is_ok_and(|m| !m.is_dir()))
        .map(Path::to_owned)
}

/// The nearest ancestor of `path` that does not exist, when its parent does not either.
fn missing_parent(path: &Path) -> Option<PathBuf> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    if parent.exists() {
        return None;
    }
    let mut first = parent;
    while let Some(up) = first
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        first = up;
    }
    Some(first.to_owned())
}

/// What is at `path` when it is not what `want` needs: `None` when it is (or when nothing is).
pub fn misfit(path: &Path, want: Want) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    match want {
        Want::Blob if meta.is_dir() => Some(format!("is a directory, not a blob file: {BLOB_FIX}")),
        Want::Blob if !meta.is_file() => Some(format!(
            "is not a regular file (a FIFO, socket or device): {BLOB_FIX}"
        )),
        Want::CertDir if !meta.is_dir() => Some(format!("is a file, not a directory: {DIR_FIX}")),
        Want::OutDir if !meta.is_dir() => Some(
            "is a file, not a directory: export writes one file per entry (ark.pem, ask.pem, \
             vcek.pem, ...) into DIR, and creates it if missing: name a directory"
                .to_owned(),
        ),
        _ => None,
    }
}

/// Explains `error`, returned for `path` given as `arg`, which must name a `want`.
pub fn explain(arg: &'static str, path: &Path, want: Want, error: io::Error) -> ArgPathError {
    let advice = match (misfit(path, want), error.raw_os_error()) {
        (Some(misfit), _) => misfit,
        (None, Some(libc::ENOTDIR)) => match file_in_the_way(path) {
            Some(file) => format!(
                "{} is a file, not a directory, so nothing can be under it: check the path",
                file.display()
            ),
            None => format!("{error}: check the path"),
        },
        (None, Some(libc::ENOENT)) => match missing_parent(path) {
            Some(dir) => format!(
                "does not exist ({} does not exist either): check the path",
                dir.display()
            ),
            None => "does not exist: check the path".to_owned(),
        },
        (None, Some(libc::EACCES)) => format!(
            "permission denied for uid {}: the file and every directory above it must be \
             readable (and the directories searchable) by that user",
            rustix::process::geteuid().as_raw()
        ),
        (None, Some(libc::ELOOP)) => {
            "too many levels of symbolic links (a link pointing to itself?): check the path"
                .to_owned()
        }
        (None, _) => error.to_string(),
    };
    ArgPathError {
        arg,
        path: path.to_owned(),
        advice,
        source: Some(error),
    }
}

/// An error for `path` given as `arg` when it is not what `want` needs, found before any
/// system call failed (a directory opens as well as a file does).
pub fn check(arg: &'static str, path: &Path, want: Want) -> Result<(), ArgPathError> {
    match misfit(path, want) {
        Some(advice) => Err(ArgPathError {
            arg,
            path: path.to_owned(),
            advice,
            source: None,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mistake_gets_its_own_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("vcek.der");
        std::fs::write(&file, b"x").expect("write");
        let e = check("BLOB", dir.path(), Want::Blob).expect_err("a directory");
        assert!(
            e.to_string().contains("is a directory, not a blob file"),
            "{e}"
        );
        assert!(e.to_string().contains("blob import DIR BLOB"), "{e}");
        let e = check("DIR", &file, Want::CertDir).expect_err("a file");
        assert!(e
            .to_string()
            .starts_with(&format!("DIR {}: is a file", file.display())));
        assert!(check("DIR", dir.path(), Want::CertDir).is_ok());

        let under = file.join("certs.blob");
        let err = std::fs::File::open(&under).expect_err("ENOTDIR");
        let e = explain("--certs", &under, Want::Blob, err);
        assert!(
            e.to_string()
                .contains(&format!("{} is a file, not a directory", file.display())),
            "{e}"
        );
        let gone = dir.path().join("a/b/certs.blob");
        let err = std::fs::File::open(&gone).expect_err("ENOENT");
        let e = explain("BLOB", &gone, Want::Blob, err);
        assert!(
            e.to_string().contains(&format!(
                "({} does not exist either)",
                dir.path().join("a").display()
            )),
            "{e}"
        );
    }
}
