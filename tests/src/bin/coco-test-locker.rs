//! A second process that takes OFD locks on a file, for tests that must see the sidecar's
//! locks from outside its process (OFD locks never conflict within one open file).
//!
//! `coco-test-locker hold shared|exclusive PATH`: takes the lock (waiting up to 10 s), prints
//! `locked`, holds it until stdin closes or says anything, then exits 0.
//! `coco-test-locker try shared|exclusive PATH`: exit 0 if the lock could be taken at once,
//! 1 if another open file holds a conflicting lock, 2 on error.
//! `coco-test-locker wait exclusive PATH`: a third-party updater written from fcntl(2) alone:
//! prints `waiting`, blocks in `F_OFD_SETLKW` for an exclusive lock on the whole file as the
//! kernel documentation describes (no announcement, no deadline), prints `locked` once it has
//! it, and holds it until stdin closes or says anything.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use coco_sidecar::ofd::{self, LockKind};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(kind), Some(path)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: coco-test-locker hold|try shared|exclusive PATH");
        return ExitCode::from(2);
    };
    let kind = match kind.as_str() {
        "shared" => LockKind::Shared,
        "exclusive" => LockKind::Exclusive,
        other => {
            eprintln!("unknown lock kind {other}");
            return ExitCode::from(2);
        }
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(kind == LockKind::Exclusive)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("open {path}: {e}");
            return ExitCode::from(2);
        }
    };
    match mode.as_str() {
        "wait" if kind == LockKind::Exclusive => {
            println!("waiting");
            let _ = std::io::stdout().flush();
            if let Err(e) = wait_exclusive(&file) {
                eprintln!("F_OFD_SETLKW: {e}");
                return ExitCode::from(2);
            }
            hold()
        }
        "try" => match ofd::try_lock(&file, kind) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("lock: {e}");
                ExitCode::from(2)
            }
        },
        "hold" => {
            match ofd::lock_within(&file, kind, Duration::from_secs(10)) {
                Ok(true) => {}
                Ok(false) => {
                    eprintln!("lock not available within 10 s");
                    return ExitCode::from(1);
                }
                Err(e) => {
                    eprintln!("lock: {e}");
                    return ExitCode::from(2);
                }
            }
            hold()
        }
        other => {
            eprintln!("unknown mode {other}");
            ExitCode::from(2)
        }
    }
}

/// Says `locked`, then holds the lock until stdin closes or says anything.
fn hold() -> ExitCode {
    println!("locked");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    ExitCode::SUCCESS
}

/// Waits in the kernel for an exclusive OFD lock on the whole file.
fn wait_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock is plain data for which all-zero bytes are valid (l_start 0, l_len 0: the
    // whole file).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // SAFETY: F_OFD_SETLKW reads the flock we pass, which outlives the call; the
        // descriptor is open for as long as `file` is borrowed.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
