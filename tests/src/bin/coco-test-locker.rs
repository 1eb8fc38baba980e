//! A second process that takes OFD locks on a file, for tests that must see the sidecar's
//! locks from outside its process. It is written from fcntl(2) alone, as a third-party tool
//! would be, and shares no code with the sidecar's own locking, so that a mistake there (a
//! wrong range, a wrong command) cannot hide itself. Every lock covers the whole file.
//!
//! `coco-test-locker hold shared|exclusive PATH`: waits in `F_OFD_SETLKW` for the lock (at
//! most 10 s, then SIGALRM ends it), prints `locked`, holds it until stdin closes or says
//! anything, then exits 0.
//! `coco-test-locker try shared|exclusive PATH`: exit 0 if the lock could be taken at once,
//! 1 if another open file holds a conflicting lock, 2 on error.
//! `coco-test-locker wait exclusive PATH`: a third-party updater: prints `waiting`, blocks in
//! `F_OFD_SETLKW` for an exclusive lock on the whole file as the kernel documentation
//! describes (no announcement, no deadline), prints `locked` once it has it, and holds it
//! until stdin closes or says anything.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

/// Longest wait of `hold`, so that a test cannot hang on it.
const HOLD_WAIT_SECS: u32 = 10;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(kind), Some(path)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: coco-test-locker hold|try|wait shared|exclusive PATH");
        return ExitCode::from(2);
    };
    let (l_type, writable) = match kind.as_str() {
        "shared" => (libc::F_RDLCK, false),
        "exclusive" => (libc::F_WRLCK, true),
        other => {
            eprintln!("unknown lock kind {other}");
            return ExitCode::from(2);
        }
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("open {path}: {e}");
            return ExitCode::from(2);
        }
    };
    match mode.as_str() {
        "try" => match setlk(&file, l_type, libc::F_OFD_SETLK) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("F_OFD_SETLK: {e}");
                ExitCode::from(2)
            }
        },
        "hold" => {
            // SAFETY: alarm(2) has no preconditions; SIGALRM's default action ends the process,
            // which the test sees as a locker that never said `locked`.
            unsafe { libc::alarm(HOLD_WAIT_SECS) };
            if let Err(e) = setlk(&file, l_type, libc::F_OFD_SETLKW) {
                eprintln!("F_OFD_SETLKW: {e}");
                return ExitCode::from(2);
            }
            // SAFETY: as above; cancels the pending alarm.
            unsafe { libc::alarm(0) };
            hold()
        }
        "wait" if writable => {
            println!("waiting");
            let _ = std::io::stdout().flush();
            if let Err(e) = setlk(&file, l_type, libc::F_OFD_SETLKW) {
                eprintln!("F_OFD_SETLKW: {e}");
                return ExitCode::from(2);
            }
            hold()
        }
        other => {
            eprintln!("unknown mode {other} for a {kind} lock");
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

/// `fcntl(fd, cmd, &flock)` for an `l_type` lock on the whole file (`l_start` 0, `l_len` 0).
fn setlk(file: &std::fs::File, l_type: libc::c_int, cmd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock is plain data for which all-zero bytes are valid (l_start 0, l_len 0: the
    // whole file, however it grows).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // SAFETY: fcntl reads the flock we pass, which outlives the call; the descriptor is
        // open for as long as `file` is borrowed.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
