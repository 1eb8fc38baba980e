//! Knowing, with one `read` of an inotify descriptor, that nothing changed what a path names or
//! what that file holds.
//!
//! The blob store asks this before serving its cached version; checking the path itself would
//! take a `stat` that walks every component (2.2 us here against 0.9 us for the `read`).
//! A [`PathWatch`] resolves the path one component at a time, symbolic links included (the
//! `..data` links of Kubernetes volumes), watching every directory it looks a name up in
//! *before* looking it up, and then the file it ends at. Any later change to one of those
//! names (create, delete, rename to or from), to one of those directories (deleted, moved),
//! or to the file (write, truncate, attribute change, moved, deleted) queues an event before
//! the system call that made it returns. So an empty queue, read after the change returned,
//! proves no such change happened since the watch was made.
//!
//! What inotify does not see: writes through a shared mapping, changes made on another host
//! (network filesystems) and mounts over a component. Only filesystems whose changes all pass
//! through this kernel are watched ([`LOCAL_FILESYSTEMS`]); the store re-checks the path and
//! re-reads the file at least every `REVERIFY_INTERVAL` whatever the watch says.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use thiserror::Error;

/// Symbolic links followed before giving up, as the kernel's own limit (`ELOOP`).
const MAX_LINKS: usize = 40;

/// `statfs` magic numbers of filesystems whose every change goes through the local kernel:
/// ext2/3/4, XFS, Btrfs, tmpfs, ramfs, F2FS, ZFS and overlayfs (a container's root).
pub const LOCAL_FILESYSTEMS: &[i64] = &[
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0x0102_1994,
    0x8584_58F6,
    0xF2F5_2010,
    0x2FC1_2FC1,
    0x794C_7630,
];

/// Why a path cannot be watched (the store then checks it with `stat` on every request).
#[derive(Debug, Error)]
pub enum WatchError {
    #[error("inotify: {0}")]
    Inotify(io::Error),
    #[error("cannot watch {path}: {error}")]
    Path { path: PathBuf, error: io::Error },
    #[error("{path} is on a filesystem whose changes inotify may not see (type {kind:#x})")]
    NotLocal { path: PathBuf, kind: i64 },
    #[error("more than {MAX_LINKS} symbolic links")]
    Loop,
}

/// What a watch descriptor stands for.
#[derive(Debug)]
enum Interest {
    /// A directory, for the names looked up in it.
    Names(Vec<OsString>),
    /// The file the path ends at.
    File,
}

/// An inotify instance watching everything the path's resolution went through.
#[derive(Debug)]
pub struct PathWatch {
    inotify: Inotify,
    interest: HashMap<WatchDescriptor, Interest>,
    /// Where the path led when the watch was made.
    target: PathBuf,
    buf: Vec<u8>,
}

impl PathWatch {
    /// An inotify instance watching nothing yet. Keep it: closing an inotify descriptor waits
    /// for an RCU grace period (milliseconds), far too long for a request to pay.
    pub fn new() -> Result<PathWatch, WatchError> {
        Ok(PathWatch {
            inotify: Inotify::init().map_err(WatchError::Inotify)?,
            interest: HashMap::new(),
            target: PathBuf::new(),
            buf: vec![0u8; 4096],
        })
    }

    /// Forgets what was reported so far and watches `path` as it resolves now. Changes made
    /// before this returns may or may not be reported; the caller looks at the path and the
    /// file afterwards. After an error nothing is watched until a call succeeds.
    pub fn watch(&mut self, path: &Path) -> Result<(), WatchError> {
        self.drain().map_err(WatchError::Inotify)?;
        let old = std::mem::take(&mut self.interest);
        let result = self.resolve(path).and_then(|target| {
            let file = self.add(
                &target,
                WatchMask::MODIFY
                    | WatchMask::ATTRIB
                    | WatchMask::CLOSE_WRITE
                    | WatchMask::MOVE_SELF
                    | WatchMask::DELETE_SELF
                    | WatchMask::DONT_FOLLOW,
            )?;
            self.interest.insert(file, Interest::File);
            self.target = target;
            Ok(())
        });
        // What the path no longer goes through (the directory of an old version behind a
        // swapped link, say) is not watched any more. Removing a watch does not wait.
        for wd in old.into_keys() {
            if !self.interest.contains_key(&wd) {
                let _ = self.inotify.watches().remove(wd);
            }
        }
        if result.is_err() {
            self.interest.clear();
        }
        result
    }

    /// The file the path resolved to when it was last watched.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Whether anything watched changed since [`PathWatch::watch`]. Reads the queue without
    /// blocking: one `read` when it is empty. Once `true` (or after a failed watch), `true`
    /// until the path is watched again.
    pub fn changed(&mut self) -> io::Result<bool> {
        if self.interest.is_empty() {
            return Ok(true);
        }
        loop {
            let events = match self.inotify.read_events(&mut self.buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut changed = false;
            for event in events {
                changed |= relevant(self.interest.get(&event.wd), event.mask, event.name);
            }
            if changed {
                // Watched no more until the caller looked at the path again.
                self.interest.clear();
                return Ok(true);
            }
        }
    }

    /// Empties the queue.
    fn drain(&mut self) -> io::Result<()> {
        loop {
            match self.inotify.read_events(&mut self.buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn add(&mut self, path: &Path, mask: WatchMask) -> Result<WatchDescriptor, WatchError> {
        let failed = |error| WatchError::Path {
            path: path.to_owned(),
            error,
        };
        let wd = self.inotify.watches().add(path, mask).map_err(failed)?;
        let kind = fs_type(path).map_err(failed)?;
        if !LOCAL_FILESYSTEMS.contains(&kind) {
            return Err(WatchError::NotLocal {
                path: path.to_owned(),
                kind,
            });
        }
        Ok(wd)
    }

    /// Follows `path` component by component, watching each directory before looking a name
    /// up in it; returns the path of what it ends at, free of symbolic links.
    fn resolve(&mut self, path: &Path) -> Result<PathBuf, WatchError> {
        let mut at = if path.is_absolute() {
            PathBuf::from("/")
        } else {
            std::env::current_dir().map_err(|error| WatchError::Path {
                path: path.to_owned(),
                error,
            })?
        };
        let mut todo: Vec<OsString> = Vec::new();
        push_front(&mut todo, path);
        let mut links = 0;
        let dir_mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
            | WatchMask::DONT_FOLLOW;
        while let Some(name) = todo.pop() {
            match name.as_bytes() {
                b"/" => at = PathBuf::from("/"),
                b"." => {}
                b".." => {
                    // `at` holds no symbolic link, so its parent is the lexical one.
                    at.pop();
                }
                _ => {
                    let wd = self.add(&at, dir_mask)?;
                    match self
                        .interest
                        .entry(wd)
                        .or_insert(Interest::Names(Vec::new()))
                    {
                        Interest::Names(names) => names.push(name.clone()),
                        Interest::File => {}
                    }
                    let next = at.join(&name);
                    let meta =
                        std::fs::symlink_metadata(&next).map_err(|error| WatchError::Path {
                            path: next.clone(),
                            error,
                        })?;
                    if meta.file_type().is_symlink() {
                        links += 1;
                        if links > MAX_LINKS {
                            return Err(WatchError::Loop);
                        }
                        let link = std::fs::read_link(&next).map_err(|error| WatchError::Path {
                            path: next.clone(),
                            error,
                        })?;
                        push_front(&mut todo, &link);
                    } else {
                        at = next;
                    }
                }
            }
        }
        Ok(at)
    }
}

/// Puts `path`'s components in front of the stack `todo` (whose next item is its last).
fn push_front(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .map(|c| match c {
            Component::RootDir => OsString::from("/"),
            Component::CurDir => OsString::from("."),
            Component::ParentDir => OsString::from(".."),
            Component::Normal(n) => n.to_owned(),
            // Windows prefixes do not exist here.
            Component::Prefix(p) => p.as_os_str().to_owned(),
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

/// Whether an event can change what the path names or what the file holds.
fn relevant(interest: Option<&Interest>, mask: EventMask, name: Option<&OsStr>) -> bool {
    // A full queue lost events.
    if mask.contains(EventMask::Q_OVERFLOW) {
        return true;
    }
    match interest {
        // A watch removed by the kernel (its inode gone, its filesystem unmounted) watches
        // nothing any more.
        Some(_) if mask.intersects(EventMask::IGNORED | EventMask::UNMOUNT) => true,
        Some(Interest::File) => true,
        Some(Interest::Names(names)) => {
            mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                || name.is_some_and(|n| names.iter().any(|m| m == n))
        }
        // A watch of an earlier resolution, removed or about to be.
        None => false,
    }
}

fn fs_type(path: &Path) -> io::Result<i64> {
    let fs = rustix::fs::statfs(path)?;
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 and other types elsewhere
    Ok(fs.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn watched(path: &Path) -> PathWatch {
        let mut w = PathWatch::new().expect("inotify");
        w.watch(path).expect("watch");
        w
    }

    #[test]
    fn quiet_until_the_file_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("certs.bin");
        std::fs::write(&file, b"one").expect("write");
        let mut w = watched(&file);
        assert!(!w.changed().expect("read"));
        // Reading it, or touching other names in its directory, changes nothing.
        let _ = std::fs::read(&file).expect("read");
        std::fs::write(dir.path().join("other"), b"x").expect("other");
        std::fs::rename(dir.path().join("other"), dir.path().join("other2")).expect("mv");
        assert!(!w.changed().expect("read"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"t", 0))
            .expect("write in place");
        assert!(w.changed().expect("read"));
        assert!(w.changed().expect("read"), "until watched again");
        w.watch(&file).expect("watch again");
        assert!(!w.changed().expect("read"));
    }

    #[test]
    fn a_rename_over_the_path_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("certs.bin");
        std::fs::write(&file, b"one").expect("write");
        let mut w = watched(&file);
        std::fs::write(dir.path().join("new"), b"two").expect("new");
        assert!(!w.changed().expect("read"), "a new name is not the path");
        std::fs::rename(dir.path().join("new"), &file).expect("rename over");
        assert!(w.changed().expect("read"));
    }

    #[test]
    fn kubernetes_style_link_swaps_are_seen_and_resolved() {
        // certs.bin -> ..data/certs.bin, ..data -> ..v1; the update makes ..v2 and renames a
        // new link over ..data.
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for v in ["..v1", "..v2"] {
            std::fs::create_dir(d.join(v)).expect("mkdir");
            std::fs::write(d.join(v).join("certs.bin"), v).expect("write");
        }
        symlink("..v1", d.join("..data")).expect("ln");
        symlink("..data/certs.bin", d.join("certs.bin")).expect("ln");
        let mut w = watched(&d.join("certs.bin"));
        let real = std::fs::canonicalize(d.join("..v1/certs.bin")).expect("canonical");
        assert_eq!(
            std::fs::canonicalize(w.target()).expect("canonical"),
            real,
            "resolved through both links"
        );
        assert!(!w.changed().expect("read"));
        symlink("..v2", d.join("..data_tmp")).expect("ln");
        assert!(!w.changed().expect("read"), "an unrelated name");
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("swap");
        assert!(w.changed().expect("read"));
        w.watch(&d.join("certs.bin")).expect("watch again");
        assert_eq!(
            std::fs::read(w.target()).expect("read"),
            b"..v2",
            "watching again follows the new link"
        );
        assert!(
            !w.changed().expect("read"),
            "what was reported is forgotten"
        );
        // The old version's directory is no longer watched; the new one's is.
        std::fs::write(d.join("..v1/certs.bin"), b"old").expect("write old");
        std::fs::remove_dir_all(d.join("..v1")).expect("rm old");
        assert!(
            !w.changed().expect("read"),
            "the old version is nothing to us now"
        );
        std::fs::write(d.join("..v2/certs.bin"), b"new").expect("write new");
        assert!(w.changed().expect("read"));
    }

    #[test]
    fn a_change_above_the_file_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("blobs");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("certs.bin"), b"one").expect("write");
        let mut w = watched(&sub.join("certs.bin"));
        std::fs::rename(&sub, dir.path().join("blobs.old")).expect("move the directory");
        assert!(w.changed().expect("read"));
    }

    #[test]
    fn a_missing_path_or_a_link_loop_cannot_be_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PathWatch::new().expect("inotify");
        assert!(matches!(
            w.watch(&dir.path().join("nothing")),
            Err(WatchError::Path { .. })
        ));
        assert!(w.changed().expect("read"), "nothing watched proves nothing");
        symlink("loop", dir.path().join("loop")).expect("ln");
        assert!(matches!(
            w.watch(&dir.path().join("loop")),
            Err(WatchError::Loop)
        ));
        std::fs::write(dir.path().join("real"), b"x").expect("write");
        w.watch(&dir.path().join("real"))
            .expect("a good path after bad ones");
        assert!(!w.changed().expect("read"));
    }
}
