//! Shared by the deploy_* end-to-end tests: starting `coco-sidecar` with arbitrary arguments
//! and inherited descriptors, and checking that it serves a real certificate request.

#![allow(dead_code)] // each test crate uses its own subset

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::{CertsRet, Frontend};
use coco_tests::{sidecar_bin, GuestMem};

/// A `coco-sidecar` process started by a test, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its standard error going to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let child = cmd
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn");
        Proc {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `socket` accepts a connection; panics with the log if the process exits.
    pub fn wait_accepting(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!("coco-sidecar exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("coco-sidecar did not accept within 10 s:\n{}", self.log());
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(s) = self.try_status() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("coco-sidecar still running after 10 s:\n{}", self.log());
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `coco-sidecar` with `args`, and `fd` of the parent duplicated onto descriptor `target` in
/// the child (without close-on-exec), as a supervisor or systemd would pass it.
pub fn command_with_fd(program: &Path, args: &[&str], fd: RawFd, target: RawFd) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl,
    // which are async-signal-safe; `fd` stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps close-on-exec: clear it explicitly.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The sidecar binary under test.
pub fn bin() -> PathBuf {
    sidecar_bin()
}

/// Serves one certificate request through `socket` with sealed memfd guest memory and checks
/// that the guest received exactly `table`; releases the lease.
pub fn serve_one_request(socket: &Path, table: &[u8]) {
    let mut vmm = Frontend::connect(socket).expect("connect and negotiate");
    let mem = GuestMem::new(1 << 20, 0xa5);
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let pages = table.len().div_ceil(4096) as u64;
    let reply = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x10000, pages)
        .expect("request");
    assert_eq!(reply.ret, CertsRet::Ok);
    assert_ne!(reply.lease, 0);
    assert_eq!(
        mem.read(0x10000, table.len()),
        table,
        "the table, byte for byte"
    );
    vmm.done(reply.lease).expect("done");
}

/// Runs `coco-sidecar health` with `args`.
pub fn health(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("health")
        .args(args)
        .output()
        .expect("run health")
}

/// The raw descriptor of anything that has one.
pub fn raw<T: AsRawFd>(t: &T) -> RawFd {
    t.as_raw_fd()
}

/// Prints one `SKIPPED: ...` line to the real standard error (one write, past the test
/// harness's capture, so that it shows in `cargo test` output and cannot be split).
pub fn skipped(why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}
