//! Updaters waiting for the blob's exclusive lock, as the kernel lists them in `/proc/locks`.
//!
//! Linux grants a shared OFD lock whenever no exclusive one is *held*, even while an exclusive
//! request waits, so requests whose leases overlap would keep an updater out for as long as
//! they keep coming. The sidecar therefore looks for waiting updaters (at most every few
//! hundred milliseconds, see [`crate::blob`]) and stops granting new leases while one waits.
//! `/proc/locks` is the only place the kernel shows a waiter: F_OFD_GETLK reports held locks
//! only. It shows two kinds:
//! - an updater blocked in `F_OFD_SETLKW` (or `F_SETLKW`) for a write lock: a `->` line under
//!   the lock it waits behind, naming the same file;
//! - an updater that polls with a bounded wait (`coco-sidecar blob install` and `blob lock`):
//!   it holds an exclusive lock on the single byte [`INTENT_OFFSET`] while it waits, which no
//!   shared lock covers ([`super::locks`]).
//!
//! Lines name the file as `MAJOR:MINOR:INODE` (major and minor in hex, of the filesystem's
//! device); the store learns its file's name from `/proc/self/fdinfo` while it holds a lock
//! (that is the kernel's own spelling, which on Btrfs differs from `stat`'s device), and
//! starts from `stat`'s.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::locks::INTENT_OFFSET;

/// Where the kernel lists every file lock and every waiting lock request.
pub const PROC_LOCKS: &str = "/proc/locks";

/// How `/proc/locks` names `file`, from its `stat` (right for every filesystem whose files
/// report the device of their superblock; see [`held_lock_id`] for the others).
pub fn stat_lock_id(meta: &std::fs::Metadata) -> String {
    let dev = meta.dev();
    format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    )
}

/// How `/proc/locks` names `file`, read from this process's `fdinfo` of it; needs a lock held
/// through `file` (the kernel lists it there). `None` when it cannot be read.
pub fn held_lock_id(file: &File, ino: u64) -> Option<String> {
    let path = format!("/proc/self/fdinfo/{}", file.as_raw_fd());
    let info = std::fs::read_to_string(path).ok()?;
    let suffix = format!(":{ino}");
    info.lines()
        .filter(|l| l.starts_with("lock:"))
        .flat_map(str::split_whitespace)
        .find(|t| t.ends_with(&suffix) && t.matches(':').count() == 2)
        .map(str::to_owned)
}

/// Whether `line` of `/proc/locks` shows an updater waiting for the file named `id`.
fn shows_updater(line: &str, id: &str) -> bool {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let Some(at) = tokens.iter().position(|t| *t == id) else {
        return false;
    };
    // "N: [->] OFDLCK ADVISORY WRITE PID ID START END|EOF"
    let kind = at.checked_sub(2).and_then(|i| tokens.get(i)).copied();
    if tokens.contains(&"->") {
        return kind == Some("WRITE");
    }
    let intent = INTENT_OFFSET.to_string();
    kind == Some("WRITE")
        && tokens.get(at + 1) == Some(&intent.as_str())
        && tokens.get(at + 2) == Some(&intent.as_str())
}

/// Whether the lock table `locks` (the text of `/proc/locks`) shows an updater waiting for
/// the file named `id`.
pub fn updater_waiting_in(locks: impl BufRead, id: &str) -> io::Result<bool> {
    for line in locks.lines() {
        if shows_updater(&line?, id) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether an updater waits for the exclusive lock on the file named `id` now.
pub fn updater_waiting(id: &str) -> io::Result<bool> {
    updater_waiting_in(BufReader::new(File::open(PROC_LOCKS)?), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::locks::{self, LockKind};

    const ID: &str = "fe:00:10010916";

    fn waiting(text: &str) -> bool {
        updater_waiting_in(text.as_bytes(), ID).expect("parse")
    }

    #[test]
    fn the_kernels_lines_are_read_as_written() {
        // Lines as Linux 6.18 prints them (hand-copied from /proc/locks).
        let held = "2: OFDLCK ADVISORY  READ -1 fe:00:10010916 0 4611686018427387903\n";
        assert!(!waiting(held), "a sidecar's shared lock is no updater");
        assert!(waiting(&format!(
            "{held}2: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010916 0 EOF\n"
        )));
        assert!(waiting(&format!(
            "{held}2:  -> POSIX  ADVISORY  WRITE 4242 fe:00:10010916 0 EOF\n"
        )));
        assert!(
            !waiting("1: -> OFDLCK ADVISORY  READ -1 fe:00:10010916 0 EOF\n"),
            "a reader waiting behind a writer is no updater"
        );
        assert!(!waiting(
            "1: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010917 0 EOF\n"
        ));
        assert!(!waiting(
            "1: -> OFDLCK ADVISORY  WRITE -1 fe:01:10010916 0 EOF\n"
        ));
        assert!(waiting(
            "1: OFDLCK ADVISORY  WRITE -1 fe:00:10010916 4611686018427387904 4611686018427387904\n"
        ));
        assert!(
            !waiting("1: OFDLCK ADVISORY  READ -1 fe:00:10010916 4611686018427387904 4611686018427387904\n"),
            "a shared lock on the byte needs no write access: it announces nothing"
        );
        assert!(!waiting(
            "1: OFDLCK ADVISORY  WRITE -1 fe:00:10010916 4611686018427387904 EOF\n"
        ));
        assert!(
            !waiting("1: OFDLCK ADVISORY  WRITE -1 fe:00:10010916 0 EOF\n"),
            "an updater holding the lock does not wait"
        );
        assert!(!waiting(
            "1: FLOCK  ADVISORY  WRITE 28807 fe:00:10010916 0 EOF\n"
        ));
        assert!(!waiting(""));
    }

    #[test]
    fn an_announced_wait_shows_in_proc_locks_under_the_kernels_name() {
        let p = std::env::temp_dir().join(format!("waiters-{}", std::process::id()));
        std::fs::write(&p, b"x").expect("write");
        let reader = File::open(&p).expect("open");
        assert!(locks::try_lock(&reader, LockKind::Shared).expect("lock"));
        let ino = reader.metadata().expect("stat").ino();
        let id = held_lock_id(&reader, ino).expect("fdinfo lists the held lock");
        let meta = std::fs::metadata(&p).expect("stat");
        // tmp is ext4 or tmpfs here: stat names the superblock's device.
        assert_eq!(id, stat_lock_id(&meta));
        assert!(!updater_waiting(&id).expect("read /proc/locks"));
        let updater = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        assert!(locks::announce_intent(&updater).expect("announce"));
        assert!(updater_waiting(&id).expect("read /proc/locks"));
        drop(updater);
        assert!(!updater_waiting(&id).expect("read /proc/locks"));
        std::fs::remove_file(&p).expect("rm");
    }
}
