//! Crash-safe in-place rewrites of the blob, and their recovery.
//!
//! The blob is rewritten in place (the sidecars lock the file they opened), so a rewrite cut
//! short by SIGKILL, a full disk, an I/O error or a power loss must never leave the node
//! without its blob, and must never leave a file that a sidecar would serve as a table it is
//! not. Under the exclusive lock a rewrite:
//!
//! 1. writes the journal beside the blob, `.NAME.coco-install`: the blob's device and inode,
//!    the new content and its SHA-256, staged in a temporary file, fsynced, renamed into place,
//!    and the directory fsynced. From here on the new content is on disk: nothing can be lost.
//! 2. reserves space for the new size (`fallocate`, or, where the filesystem has none, by
//!    growing the file with zeros), so that ENOSPC comes before the old content is touched; on
//!    failure the journal is removed and the blob is as it was.
//! 3. overwrites the first entry with [`INSTALL_MARKER`] (an entry no table may hold) and
//!    syncs; writes the rest of the new content and truncates to its length, syncs; writes the
//!    new first entry, syncs. At every instant, on disk too, the file is the old table, the
//!    new one, or invalid: never a mix that validates (a sidecar answers EAGAIN for it).
//! 4. removes the journal and syncs the directory.
//!
//! [`recover`] (`blob recover`, and the start of every `blob install` and `blob lock`) finds
//! a journal left by an interrupted rewrite and finishes it (step 3 again, from the journal:
//! idempotent), or drops a journal that no longer applies (written for another file at that
//! path, or damaged) and so leaves the blob as it is. It also removes leftover temporary files.
//!
//! Temporary files are `.NAME.XXXXXX.tmp` in the blob's directory, and each is OFD-locked by
//! the process writing it for as long as it exists: a temporary file nobody holds a lock on
//! is a leftover of a process that died, and only those are removed.
//!
//! On copy-on-write filesystems (Btrfs, ZFS, bcachefs) an overwrite needs new blocks that
//! `fallocate` does not reserve; ENOSPC in step 3 leaves the blob invalid with its journal
//! complete, and `blob recover` finishes the rewrite once there is space.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use coco_protocol::table::{Table, MAX_TABLE_BYTES};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use thiserror::Error;

use crate::blob::locks::{self, LockKind};
use crate::blob::INSTALL_MARKER;

/// First bytes of a journal.
const MAGIC: &[u8; 16] = b"coco-install-v1\n";
/// Magic, device, inode, length, SHA-256 of the content.
const HEADER: usize = 16 + 8 + 8 + 8 + 32;
/// The part of the table rewritten last (its first entry).
const FIRST_ENTRY: usize = INSTALL_MARKER.len();

/// Why a rewrite or a recovery did not complete.
#[derive(Debug, Error)]
pub enum JournalError {
    /// Not enough space for the journal or for the new size: the blob was not touched.
    #[error(
        "{path}: no space left for the new blob ({needed} bytes, and as many for its journal \
         beside it); {blob} is unchanged: free some space and install again"
    )]
    NoSpace {
        /// What could not be written.
        path: PathBuf,
        /// The blob.
        blob: PathBuf,
        /// Bytes of the new content.
        needed: usize,
    },
    /// A step before the blob was touched failed: the blob is as it was.
    #[error("{path}: cannot {what}: {source}; {blob} is unchanged")]
    Before {
        /// The file.
        path: PathBuf,
        /// The blob.
        blob: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Writing the blob failed part-way: the blob is invalid (sidecars answer EAGAIN) and the
    /// journal holds the complete new content.
    #[error(
        "{blob}: cannot {what}: {source}; the blob is left half-written (sidecars answer EAGAIN \
         for it) and the new content is safe in {journal}: fix the problem, then run \
         `coco-sidecar blob recover {blob}`"
    )]
    Interrupted {
        /// The blob.
        blob: PathBuf,
        /// The journal.
        journal: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Listing the directory or reading a journal failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// What [`recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// No journal: no rewrite was interrupted.
    Clean,
    /// An interrupted rewrite was finished: the blob holds its new content.
    Finished,
    /// A journal that does not apply was removed (why); the blob was not touched.
    Discarded(String),
}

/// `.NAME.coco-install` beside `blob`.
pub fn journal_path(blob: &Path) -> PathBuf {
    sibling(blob, "coco-install")
}

/// `.NAME.SUFFIX` in the directory of `blob`.
fn sibling(blob: &Path, suffix: &str) -> PathBuf {
    directory(blob).join(format!(".{}.{suffix}", file_name(blob)))
}

/// The directory holding `blob`.
pub fn directory(blob: &Path) -> &Path {
    match blob.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn file_name(blob: &Path) -> String {
    blob.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A new temporary file `.NAME.XXXXXX.tmp` beside `blob`, OFD-locked for as long as it lives
/// (see the module docs), removed when dropped unless persisted.
pub fn staging_file(blob: &Path) -> io::Result<NamedTempFile> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name(blob)))
        .suffix(".tmp")
        .tempfile_in(directory(blob))?;
    // A cleaner that looks between the creation and this lock can remove the file; the
    // writer then fails cleanly when it renames it (journals are written under the blob's
    // exclusive lock, which every cleaner holds, so only a blob's creation can meet this).
    if !locks::try_lock(tmp.as_file(), LockKind::Exclusive)? {
        return Err(io::Error::other(
            "a fresh temporary file is locked by another process",
        ));
    }
    Ok(tmp)
}

/// Makes the directory's entries (a rename, a removal) durable.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

fn encode(dev: u64, ino: u64, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + content.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&dev.to_le_bytes());
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(content));
    out.extend_from_slice(content);
    out
}

/// A journal's target (device, inode) and content, or why it is damaged.
fn decode(bytes: &[u8]) -> Result<(u64, u64, &[u8]), String> {
    if bytes.len() < HEADER || &bytes[..16] != MAGIC {
        return Err("not a journal of this version (bad header)".into());
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (dev, ino, len) = (u64_at(16), u64_at(24), u64_at(32));
    let content = &bytes[HEADER..];
    if content.len() as u64 != len {
        return Err(format!(
            "damaged: {} bytes of content, the header says {len}",
            content.len()
        ));
    }
    if Sha256::digest(content)[..] != bytes[40..HEADER] {
        return Err("damaged: the content does not match its SHA-256".into());
    }
    Ok((dev, ino, content))
}

/// Replaces the content of `file`, the exclusively locked blob at `blob`, with `new` (a
/// validated table), as the module docs describe.
pub fn rewrite(file: &File, blob: &Path, new: &[u8]) -> Result<(), JournalError> {
    let before = |path: &Path, what| {
        let (path, blob) = (path.to_owned(), blob.to_owned());
        move |source: io::Error| {
            if is_no_space(&source) {
                JournalError::NoSpace {
                    path,
                    blob,
                    needed: new.len(),
                }
            } else {
                JournalError::Before {
                    path,
                    blob,
                    what,
                    source,
                }
            }
        }
    };
    let journal = journal_path(blob);
    // Nothing was touched when these fail: take the journal back, so that no recovery
    // installs what this call reports as not installed.
    let take_back = || {
        let _ = remove(&journal);
    };
    let meta = file.metadata().map_err(before(blob, "stat"))?;
    write_journal(file, blob, new).map_err(|(path, what, e)| {
        take_back();
        before(&path, what)(e)
    })?;
    reserve(file, meta.len(), new.len()).map_err(|e| {
        take_back();
        before(blob, "reserve space in")(e)
    })?;
    apply(file, new).map_err(|(what, source)| JournalError::Interrupted {
        blob: blob.to_owned(),
        journal: journal.clone(),
        what,
        source,
    })?;
    remove(&journal).map_err(|source| JournalError::Io {
        path: journal,
        what: "remove the finished journal",
        source,
    })
}

/// Removes `journal` (gone already is fine: a recovery on a file renamed over the blob may
/// have dropped it) and makes that durable.
fn remove(journal: &Path) -> io::Result<()> {
    match std::fs::remove_file(journal) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_directory(directory(journal))
}

/// Step 1 of the module docs: the journal for rewriting `file` (the blob at `blob`) with
/// `new` is on disk, complete, under its name. On failure: which file, doing what.
pub fn write_journal(
    file: &File,
    blob: &Path,
    new: &[u8],
) -> Result<(), (PathBuf, &'static str, io::Error)> {
    let fail = |path: &Path, what| {
        let path = path.to_owned();
        move |e| (path, what, e)
    };
    let journal = journal_path(blob);
    let dir = directory(blob);
    let meta = file.metadata().map_err(fail(blob, "stat"))?;
    let mut tmp = staging_file(blob).map_err(fail(dir, "create a file in"))?;
    tmp.as_file_mut()
        .write_all(&encode(meta.dev(), meta.ino(), new))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(fail(tmp.path(), "write the journal"))?;
    tmp.persist(&journal)
        .map_err(|e| fail(&journal, "create")(e.error))?;
    sync_directory(dir).map_err(fail(dir, "sync"))
}

/// Makes sure `file` (now `len` bytes) can grow to `new_len` without running out of space.
fn reserve(file: &File, len: u64, new_len: usize) -> io::Result<()> {
    let new_len = new_len as u64;
    // KEEP_SIZE: the blocks are allocated, the file's size and bytes unchanged.
    let keep_size = rustix::fs::FallocateFlags::KEEP_SIZE;
    match rustix::io::retry_on_intr(|| rustix::fs::fallocate(file, keep_size, 0, new_len)) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    // No fallocate here: grow the file with zeros (the old bytes stay as they are), and shrink
    // it back if that fails.
    if new_len <= len {
        return Ok(());
    }
    let zeros = vec![0u8; (new_len - len) as usize];
    file.write_all_at(&zeros, len)
        .and_then(|()| file.sync_data())
        .inspect_err(|_| {
            let _ = file.set_len(len);
        })
}

/// Step 3 of the module docs; on failure, what failed.
fn apply(file: &File, new: &[u8]) -> Result<(), (&'static str, io::Error)> {
    let step = |what: &'static str| move |e: io::Error| (what, e);
    file.write_all_at(&INSTALL_MARKER, 0)
        .and_then(|()| file.sync_data())
        .map_err(step("mark the blob as being rewritten"))?;
    file.write_all_at(&new[FIRST_ENTRY..], FIRST_ENTRY as u64)
        .and_then(|()| file.set_len(new.len() as u64))
        .and_then(|()| file.sync_data())
        .map_err(step("write the new content into"))?;
    file.write_all_at(&new[..FIRST_ENTRY], 0)
        .and_then(|()| file.sync_all())
        .map_err(step("write the first entry of"))
}

/// Finishes or drops an interrupted rewrite of `file`, the exclusively locked blob at `blob`,
/// and removes leftover temporary files beside it; returns what it found and how many
/// temporary files it removed.
pub fn recover(file: &File, blob: &Path) -> Result<(Recovered, usize), JournalError> {
    let removed = remove_leftovers(blob)?;
    let journal = journal_path(blob);
    let io = |what: &'static str| {
        let path = journal.clone();
        move |source: io::Error| JournalError::Io { path, what, source }
    };
    let mut bytes = Vec::new();
    match File::open(&journal) {
        Ok(f) => f
            .take((HEADER + MAX_TABLE_BYTES + 1) as u64)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Recovered::Clean, removed)),
        Err(e) => return Err(io("open")(e)),
    };
    let meta = file.metadata().map_err(io("stat the blob for"))?;
    let applies = decode(&bytes).and_then(|(dev, ino, content)| {
        if (dev, ino) != (meta.dev(), meta.ino()) {
            return Err("it was written for another file at that path".into());
        }
        match Table::parse(content) {
            Ok(_) if content.len() >= FIRST_ENTRY => Ok(content),
            _ => Err("it holds no valid table".into()),
        }
    });
    let outcome = match applies {
        Ok(content) => {
            let interrupted = |what, source| JournalError::Interrupted {
                blob: blob.to_owned(),
                journal: journal.clone(),
                what,
                source,
            };
            reserve(file, meta.len(), content.len())
                .map_err(|e| interrupted("reserve space in", e))?;
            apply(file, content).map_err(|(what, e)| interrupted(what, e))?;
            Recovered::Finished
        }
        Err(why) => Recovered::Discarded(why),
    };
    remove(&journal).map_err(io("remove"))?;
    Ok((outcome, removed))
}

/// Removes `.NAME.*.tmp` beside `blob` that no live process holds locked.
fn remove_leftovers(blob: &Path) -> Result<usize, JournalError> {
    let dir = directory(blob);
    let prefix = format!(".{}.", file_name(blob));
    let entries = std::fs::read_dir(dir).map_err(|source| JournalError::Io {
        path: dir.to_owned(),
        what: "list",
        source,
    })?;
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name.len() > prefix.len() + ".tmp".len()
            && name.starts_with(&prefix)
            && name.ends_with(".tmp");
        if !leftover {
            continue;
        }
        let path = entry.path();
        let Ok(f) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        let unowned = f.metadata().is_ok_and(|m| m.is_file())
            && locks::try_lock(&f, LockKind::Exclusive).unwrap_or(false);
        if unowned && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coco_protocol::table::CertKind;

    fn table(fill: u8, len: usize) -> Vec<u8> {
        let content = len - 4;
        let mut der = vec![0x30, 0x82, (content >> 8) as u8, content as u8];
        der.resize(len, fill);
        Table::build(&[(CertKind::Vcek.guid(), &der)])
            .expect("valid")
            .into_bytes()
    }

    /// A blob holding `old` in a fresh directory, locked as an updater locks it.
    fn locked_blob(old: &[u8]) -> (tempfile::TempDir, PathBuf, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = dir.path().join("certs.blob");
        std::fs::write(&blob, old).expect("write");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&blob)
            .expect("open");
        assert!(locks::try_lock(&file, LockKind::Exclusive).expect("lock"));
        (dir, blob, file)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Every state a rewrite can be cut short in (on disk, by SIGKILL or a power loss after
    /// the syncs): recovery finishes it to the new content, and again changes nothing.
    #[test]
    fn every_interrupted_state_is_finished_by_recover() {
        let (old, new) = (table(1, 1500), table(2, 6000));
        // What the blob holds in each state, built by hand from the module docs.
        let marked = [&INSTALL_MARKER[..], &old[FIRST_ENTRY..]].concat();
        let body = [&INSTALL_MARKER[..], &new[FIRST_ENTRY..]].concat();
        for (state, on_disk) in [
            ("journal written", old.clone()),
            ("first entry marked", marked),
            ("body written", body),
            ("first entry written", new.clone()),
        ] {
            let (dir, blob, file) = locked_blob(&on_disk);
            write_journal(&file, &blob, &new).expect("journal");
            std::fs::write(&blob, &on_disk).expect("state");
            assert_eq!(
                recover(&file, &blob).expect("recover"),
                (Recovered::Finished, 0),
                "{state}"
            );
            assert_eq!(std::fs::read(&blob).expect("read"), new, "{state}");
            assert_eq!(names(dir.path()), ["certs.blob"], "{state}");
            assert_eq!(recover(&file, &blob).expect("again"), (Recovered::Clean, 0));
            assert_eq!(std::fs::read(&blob).expect("read"), new);
        }
    }

    #[test]
    fn a_journal_that_does_not_apply_is_dropped_and_the_blob_kept() {
        let (old, new) = (table(3, 1500), table(4, 1500));
        let (dir, blob, file) = locked_blob(&old);
        // Written for the file that was at the path before it was renamed over.
        let other = dir.path().join("other");
        std::fs::write(&other, &old).expect("write");
        let other = File::open(&other).expect("open");
        write_journal(&other, &blob, &new).expect("journal");
        let (found, _) = recover(&file, &blob).expect("recover");
        assert!(
            matches!(&found, Recovered::Discarded(why) if why.contains("another file")),
            "{found:?}"
        );
        assert_eq!(std::fs::read(&blob).expect("read"), old);
        // Damaged.
        write_journal(&file, &blob, &new).expect("journal");
        let journal = journal_path(&blob);
        let mut bytes = std::fs::read(&journal).expect("read");
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&journal, bytes).expect("damage");
        let (found, _) = recover(&file, &blob).expect("recover");
        assert!(
            matches!(&found, Recovered::Discarded(why) if why.contains("damaged")),
            "{found:?}"
        );
        assert_eq!(std::fs::read(&blob).expect("read"), old);
        assert_eq!(names(dir.path()), ["certs.blob", "other"]);
    }

    #[test]
    fn only_unlocked_temporary_files_of_this_blob_are_removed() {
        let (dir, blob, file) = locked_blob(&table(5, 1500));
        let live = staging_file(&blob).expect("staging");
        for name in [
            ".certs.blob.abc123.tmp",
            ".certs.blob.tmp",
            ".other.abc.tmp",
            "x.tmp",
        ] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        assert_eq!(
            recover(&file, &blob).expect("recover"),
            (Recovered::Clean, 1)
        );
        let live_name = live
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let mut want = vec![
            ".certs.blob.tmp".to_owned(),
            ".other.abc.tmp".into(),
            "certs.blob".into(),
            live_name,
            "x.tmp".into(),
        ];
        want.sort();
        assert_eq!(names(dir.path()), want, "a live writer's file stays");
        drop(live);
    }

    #[test]
    fn a_rewrite_leaves_the_new_content_and_nothing_else() {
        let (old, new) = (table(6, 5000), table(7, 1500));
        let (dir, blob, file) = locked_blob(&old);
        rewrite(&file, &blob, &new).expect("rewrite");
        assert_eq!(std::fs::read(&blob).expect("read"), new);
        assert_eq!(names(dir.path()), ["certs.blob"]);
    }

    #[test]
    fn a_journal_round_trips_and_damage_is_named() {
        let content = b"some table bytes";
        let record = encode(7, 42, content);
        assert_eq!(decode(&record), Ok((7, 42, &content[..])));
        let mut flipped = record.clone();
        *flipped.last_mut().expect("content") ^= 1;
        assert!(decode(&flipped).expect_err("damaged").contains("SHA-256"));
        assert!(decode(&record[..record.len() - 1])
            .expect_err("short")
            .contains("header says"));
        assert!(decode(b"nonsense").expect_err("bad").contains("header"));
    }
}
