//! Support for the end-to-end tests: the real `coco-sidecar` binary in a temporary directory,
//! memfd guest memory, and a second process holding OFD locks.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use coco_protocol::table::{CertKind, Table};

pub mod qemu;
use coco_protocol::wire::{self, Header, Request};
use coco_protocol::{Frontend, FrontendError, MemoryRegion};

pub mod updaters;

/// A binary of this workspace, next to the test executable's `deps` directory, or from the
/// environment variable `var` when set.
pub fn workspace_bin(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --bins) or set {var}",
        bin.display()
    );
    bin
}

/// The workspace's top directory (the deploy scripts, the docs, qemu-patches/).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Path of the `coco-sidecar` binary under test (`COCO_SIDECAR_BIN` overrides).
pub fn sidecar_bin() -> PathBuf {
    workspace_bin("coco-sidecar", "COCO_SIDECAR_BIN")
}

/// Path of `coco-test-locker`, the raw-fcntl second process (`COCO_TEST_LOCKER_BIN` overrides).
pub fn locker_bin() -> PathBuf {
    workspace_bin("coco-test-locker", "COCO_TEST_LOCKER_BIN")
}

/// `coco-sidecar serve` on `socket` for `certs`, stderr to the file `log`, no stdin or stdout.
pub fn serve_command(socket: &Path, certs: &Path, extra: &[&str], log: &Path) -> Command {
    let mut cmd = Command::new(sidecar_bin());
    serve_args(&mut cmd, socket, certs, extra, log);
    cmd
}

/// Appends `serve` and its arguments to `cmd`, and sets its standard streams.
fn serve_args(cmd: &mut Command, socket: &Path, certs: &Path, extra: &[&str], log: &Path) {
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--certs")
        .arg(certs)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
}

/// A running `coco-sidecar serve` in its own temporary directory.
#[derive(Debug)]
pub struct Sidecar {
    child: Option<Child>,
    /// The listening socket.
    pub socket: PathBuf,
    /// The blob path it serves.
    pub certs: PathBuf,
    log: PathBuf,
    /// The temporary directory holding socket, log (and usually the blob).
    pub dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts the sidecar serving `certs` with extra arguments, and waits until it accepts.
    pub fn start(certs: &Path, extra: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        Sidecar::start_in(dir, certs, extra)
    }

    /// Like [`Sidecar::start`], logging at `level` (RUST_LOG) instead of debug.
    pub fn start_logging(certs: &Path, extra: &[&str], level: &str) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sidecar.sock");
        let log = dir.path().join("sidecar.log");
        let mut cmd = serve_command(&socket, certs, extra, &log);
        cmd.env("RUST_LOG", level);
        Sidecar::launch(dir, socket, certs, cmd, log)
    }

    /// Like [`Sidecar::start`], in a given directory.
    pub fn start_in(dir: tempfile::TempDir, certs: &Path, extra: &[&str]) -> Sidecar {
        let socket = dir.path().join("sidecar.sock");
        Sidecar::start_at(dir, socket, certs, extra)
    }

    /// Like [`Sidecar::start_in`], listening on `socket`.
    pub fn start_at(
        dir: tempfile::TempDir,
        socket: PathBuf,
        certs: &Path,
        extra: &[&str],
    ) -> Sidecar {
        let log = dir.path().join("sidecar.log");
        let cmd = serve_command(&socket, certs, extra, &log);
        Sidecar::launch(dir, socket, certs, cmd, log)
    }

    /// Like [`Sidecar::start`], run through `wrapper`: a program and its arguments that end by
    /// executing the program and arguments appended to them (as `unshare ...` does).
    pub fn start_wrapped(wrapper: &[&str], certs: &Path, extra: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sidecar.sock");
        let log = dir.path().join("sidecar.log");
        let (program, args) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = Command::new(program);
        cmd.args(args).arg(sidecar_bin());
        serve_args(&mut cmd, &socket, certs, extra, &log);
        Sidecar::launch(dir, socket, certs, cmd, log)
    }

    fn launch(
        dir: tempfile::TempDir,
        socket: PathBuf,
        certs: &Path,
        mut cmd: Command,
        log: PathBuf,
    ) -> Sidecar {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "debug");
        }
        let child = cmd.spawn().expect("spawn coco-sidecar");
        let mut s = Sidecar {
            child: Some(child),
            socket,
            certs: certs.to_owned(),
            log,
            dir,
        };
        s.wait_accepting();
        s
    }

    fn wait_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(probe) = std::os::unix::net::UnixStream::connect(&self.socket) {
                // connect() succeeds as soon as the socket listens, before the accept loop
                // runs; wait for an answer (or a refusal) so that the probe has been accepted,
                // and counted, before the test starts looking at the sidecar.
                Self::answered(probe);
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("coco-sidecar exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("coco-sidecar did not accept within 10 s:\n{}", self.log());
    }

    /// Sends GET_FEATURES and waits for the reply or for the sidecar to close the connection;
    /// either shows that it accepted it.
    fn answered(mut probe: std::os::unix::net::UnixStream) {
        use std::io::Read;
        let header = Header::request(Request::GetFeatures, 0, false).encode();
        probe
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("probe timeout");
        if probe.write_all(&header).is_ok() {
            // The whole reply (header and u64), so that closing leaves nothing unread and
            // the sidecar sees an orderly end, not a reset.
            let mut reply = [0u8; wire::HEADER_SIZE + 8];
            let _ = probe.read_exact(&mut reply);
        }
    }

    /// A negotiated frontend connection.
    pub fn connect(&self) -> Frontend {
        Frontend::connect(&self.socket).expect("connect and negotiate")
    }

    /// A raw connection, for sending malformed bytes.
    pub fn raw(&self) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::connect(&self.socket).expect("connect")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Everything the sidecar logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().expect("wait")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Guest RAM: a shrink-sealed memfd.
#[derive(Debug)]
pub struct GuestMem {
    /// The memfd.
    pub memfd: memfd::Memfd,
    /// Its size.
    pub size: u64,
}

impl GuestMem {
    /// A sealed memfd of `size` bytes filled with `fill`.
    pub fn new(size: u64, fill: u8) -> GuestMem {
        let g = GuestMem::sparse(size);
        g.write(0, &vec![fill; size as usize]);
        g
    }

    /// A sealed memfd of `size` bytes, untouched (sparse, reading as zeros), as QEMU's guest
    /// RAM is before the guest uses it.
    pub fn sparse(size: u64) -> GuestMem {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("guest")
            .expect("memfd");
        memfd.as_file().set_len(size).expect("size");
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .expect("seal");
        GuestMem { memfd, size }
    }

    /// The whole memfd as one region at `gpa`.
    pub fn region(&self, gpa: u64) -> MemoryRegion<'_> {
        MemoryRegion {
            guest_phys_addr: gpa,
            size: self.size,
            mmap_offset: 0,
            userspace_addr: 0,
            fd: self.memfd.as_file().as_fd(),
        }
    }

    /// Reads `len` bytes at file offset `at`.
    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.memfd
            .as_file()
            .read_exact_at(&mut buf, at)
            .expect("read memfd");
        buf
    }

    /// Writes at file offset `at`.
    pub fn write(&self, at: u64, data: &[u8]) {
        self.memfd
            .as_file()
            .write_all_at(data, at)
            .expect("write memfd");
    }
}

/// The errno of a request the sidecar refused; panics on anything else.
pub fn rejected(r: Result<(), FrontendError>) -> i32 {
    match r {
        Err(FrontendError::Rejected { errno, .. }) => errno as i32,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Runs `coco-sidecar health --socket SOCKET` as `uid` (the caller must be root), for a peer
/// that `--allow-uid` refuses; its exit status.
pub fn health_as_uid(socket: &Path, uid: u32) -> ExitStatus {
    std::os::unix::process::CommandExt::uid(
        Command::new(sidecar_bin())
            .args(["health", "--timeout-ms", "100", "--socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        uid,
    )
    .status()
    .expect("run health as another uid")
}

/// Another process (`coco-test-locker`, raw fcntl) holding an OFD lock on the whole file until
/// dropped.
#[derive(Debug)]
pub struct HeldLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl HeldLock {
    /// Takes `kind` ("shared" or "exclusive") on `path` in a new process, waiting for it in
    /// `F_OFD_SETLKW` as a third-party updater does; returns once held.
    pub fn take(kind: &str, path: &Path) -> HeldLock {
        let mut child = Command::new(locker_bin())
            .args(["hold", kind])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn locker");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read locker");
        assert_eq!(
            line.trim(),
            "locked",
            "the locker could not take the {kind} lock"
        );
        let stdin = child.stdin.take();
        HeldLock { child, stdin }
    }

    /// Releases the lock and waits for the process to end.
    pub fn release(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether another process can take the exclusive lock on `path` right now.
pub fn exclusive_lock_free(path: &Path) -> bool {
    lock_free("exclusive", path)
}

/// Whether another process can take `kind` ("shared" or "exclusive") on `path` right now.
pub fn lock_free(kind: &str, path: &Path) -> bool {
    let status = Command::new(locker_bin())
        .args(["try", kind])
        .arg(path)
        .status()
        .expect("run locker");
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("locker failed: {other:?}"),
    }
}

/// A DER SEQUENCE of exactly `len` bytes (len >= 260), filled with `fill`.
pub fn der_blob(len: usize, fill: u8) -> Vec<u8> {
    assert!((260..=0xffff + 4).contains(&len));
    let content = len - 4;
    let mut v = vec![0x30, 0x82, (content >> 8) as u8, content as u8];
    v.resize(len, fill);
    v
}

/// A valid table of exactly `total` bytes: ARK, ASK and VCEK entries of synthetic DER.
pub fn table_of_size(total: usize, fill: u8) -> Vec<u8> {
    let header = 4 * 24;
    let data = total - header;
    let (a, b) = (data / 3, data / 3);
    let c = data - a - b;
    let certs = [
        (CertKind::Ark.guid(), der_blob(a, fill)),
        (CertKind::Ask.guid(), der_blob(b, fill.wrapping_add(1))),
        (CertKind::Vcek.guid(), der_blob(c, fill.wrapping_add(2))),
    ];
    let refs: Vec<_> = certs.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    let t = Table::build(&refs).expect("valid table").into_bytes();
    assert_eq!(t.len(), total);
    t
}

/// Writes `bytes` as the blob `name` in `dir` and returns its path.
pub fn write_blob(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write blob");
    p
}

/// The address of the sidecar's metrics endpoint, read from its log (started with
/// `--metrics 127.0.0.1:0`, so that the kernel picks a free port).
pub fn metrics_addr(sidecar: &Sidecar) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = sidecar.log();
        if let Some(addr) = log
            .lines()
            .filter_map(|l| l.split("metrics on http://").nth(1))
            .filter_map(|rest| rest.strip_suffix("/metrics"))
            .find_map(|a| a.parse().ok())
        {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An HTTP/1.1 response: status code, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a fresh TCP connection; reads the response to its end.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> HttpResponse {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: coco-tests\r\nAccept: text/plain\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let resp = HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    };
    if let Some(len) = resp.header("content-length") {
        assert_eq!(
            len.parse::<usize>().expect("length"),
            resp.body.len(),
            "Content-Length matches the body"
        );
    }
    resp
}

/// The number that the line `field: N ...` of a `/proc` file such as `/proc/meminfo` or
/// `/proc/PID/status` begins with.
fn proc_number(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A field of `/proc/PID/status` (in KiB for the `Vm*` and `Rss*` fields); panics if it is
/// missing.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    proc_number(&status, field).unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A field of `/proc/meminfo` (`HugePages_Free`, ...); 0 if the kernel does not have it.
pub fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    proc_number(&text, field).unwrap_or(0)
}

/// Sets its flag when dropped, also while a panic unwinds: a test that runs load threads in a
/// `thread::scope` holds one so that a failed assertion stops them instead of hanging.
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Prints one `SKIPPED:` line for `test` saying `why` (one write to the real standard error,
/// past the test harness's capture, so that parallel tests cannot split it), or fails instead
/// when the environment variable `require` is `1`: CI sets each `COCO_REQUIRE_*` where it has
/// the resource, so that a test it needs cannot pass by skipping.
pub fn skip_unless_required(require: &str, test: &str, why: &str) {
    assert!(
        std::env::var(require).as_deref() != Ok("1"),
        "{test}: {require}=1 but {why}"
    );
    let line = format!("SKIPPED: {why} ({test})\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Set to `1` to make the tests that mount a small tmpfs or ramfs (root, CAP_SYS_ADMIN) fail
/// instead of skipping (CI runs as root).
pub const REQUIRE_MOUNT_VAR: &str = "COCO_REQUIRE_MOUNT";

/// Set to `1` to make the tests that act as another uid (root) fail instead of skipping.
pub const REQUIRE_ROOT_VAR: &str = "COCO_REQUIRE_ROOT";

/// Set to `1` to make the tests that run the sidecar in a user namespace without inotify
/// instances (`unshare --user --map-root-user`) fail instead of skipping.
pub const REQUIRE_USERNS_VAR: &str = "COCO_REQUIRE_USERNS";

/// Set to `1` to make the tests of guest RAM in huge pages (MFD_HUGETLB memfds, growing the
/// pool by a page as root) fail instead of skipping.
pub const REQUIRE_HUGETLB_VAR: &str = "COCO_REQUIRE_HUGETLB";

/// Whether this process is root (and may run a client as another uid); otherwise one
/// `SKIPPED:` line for `test`, or a failure under [`REQUIRE_ROOT_VAR`].
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip_unless_required(
            REQUIRE_ROOT_VAR,
            test,
            "not root, cannot act as another uid",
        );
    }
    root
}

/// A wrapper for [`Sidecar::start_wrapped`] that runs the sidecar in a new user namespace
/// whose inotify instances are limited to 0, as when a node's sidecars have used up their
/// user's `fs.inotify.max_user_instances`: it cannot watch the blob's path. `None` after a
/// `SKIPPED:` line (or a failure under [`REQUIRE_USERNS_VAR`]) where no such namespace can
/// be made.
pub fn without_inotify(test: &str) -> Option<[&'static str; 6]> {
    let wrapper = [
        "unshare",
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        "echo 0 > /proc/sys/user/max_inotify_instances && exec \"$0\" \"$@\"",
    ];
    // The wrapper itself, running `true`.
    let works = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        let why = "cannot make a user namespace without inotify instances here";
        skip_unless_required(REQUIRE_USERNS_VAR, test, why);
        return None;
    }
    Some(wrapper)
}

/// A small tmpfs (or a ramfs) mounted on a fresh temporary directory, unmounted when dropped.
#[derive(Debug)]
pub struct TmpfsMount {
    dir: tempfile::TempDir,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `bytes` (a multiple of the page size); `Err` says why not.
    pub fn new(bytes: u64) -> Result<TmpfsMount, String> {
        TmpfsMount::mount(c"tmpfs", &format!("size={bytes},mode=0700"))
    }

    fn mount(fstype: &std::ffi::CStr, options: &str) -> Result<TmpfsMount, String> {
        use std::ffi::CString;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let target =
            CString::new(dir.path().as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let options = CString::new(options).map_err(|e| e.to_string())?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"coco-test".as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mount -t {}: {}",
                fstype.to_string_lossy(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(TmpfsMount { dir })
    }

    /// Mounts one, or prints one `SKIPPED:` line for `test` and returns `None` (a failure
    /// when [`REQUIRE_MOUNT_VAR`] is `1`).
    pub fn or_skip(test: &str, bytes: u64) -> Option<TmpfsMount> {
        TmpfsMount::new(bytes)
            .map_err(|why| skip_unless_required(REQUIRE_MOUNT_VAR, test, &why))
            .ok()
    }

    /// A ramfs, like [`TmpfsMount::or_skip`]. Its timestamps are coarse (one scheduler tick;
    /// unlike tmpfs and ext4, no fine-grained stamp after the file was looked at), so
    /// rewrites made back to back usually leave size and stamps as they were.
    pub fn ramfs_or_skip(test: &str) -> Option<TmpfsMount> {
        TmpfsMount::mount(c"ramfs", "mode=0700")
            .map_err(|why| skip_unless_required(REQUIRE_MOUNT_VAR, test, &why))
            .ok()
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free 4 KiB blocks on it now.
    pub fn free_pages(&self) -> u64 {
        let path =
            std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: statvfs is plain data for which all-zero bytes are valid.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs writes into `st`, which outlives the call; the path is NUL-terminated.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bavail * st.f_frsize / 4096
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads the NUL-terminated path during the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A blob of AMD's real Turin chain (tests/fixtures/amd: ARK, ASK, VCEK), built in `dir` by
/// `coco-sidecar blob import` as an operator builds one from `snphost fetch`'s files.
pub fn amd_turin_blob(dir: &Path) -> PathBuf {
    let src = dir.join("turin-files");
    std::fs::create_dir_all(&src).expect("mkdir");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/amd");
    for (from, to) in [
        ("ark-turin.pem", "ark.pem"),
        ("ask-turin.pem", "ask.pem"),
        ("vcek-turin.der", "vcek.der"),
    ] {
        std::fs::copy(fixtures.join(from), src.join(to)).expect("copy fixture");
    }
    let blob = dir.join("turin.blob");
    let out = Command::new(sidecar_bin())
        .args(["blob", "import"])
        .arg(&src)
        .arg(&blob)
        .output()
        .expect("blob import");
    assert!(out.status.success(), "{out:?}");
    blob
}
