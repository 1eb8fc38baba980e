//! Where the listening socket comes from, and who may connect to it.
//!
//! Three sources, one per deployment style:
//! - a path the sidecar binds itself, created with a restrictive mode (`--socket`,
//!   `--socket-mode`);
//! - a listening socket inherited as a descriptor (`--fd N`), e.g. from a supervisor;
//! - systemd socket activation (`LISTEN_PID` / `LISTEN_FDS`, descriptor 3).
//!
//! An inherited descriptor is checked to be a listening `AF_UNIX` `SOCK_STREAM` socket before
//! it is used. Every accepted connection's peer is identified with `SO_PEERCRED`; with an
//! allow-list (`--allow-uid`) a peer whose uid is not on it (nor the sidecar's own uid, which
//! its `health` probe runs as) is refused.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use rustix::fs::{FileType, Mode, RenameFlags, CWD};
use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use thiserror::Error;

use crate::sys;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const SD_LISTEN_FDS_START: RawFd = 3;
/// Mode of a socket the sidecar creates, unless configured otherwise: only its own user.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 64;
/// The longest socket path: `sun_path` has 108 bytes, with room for the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why no listening socket could be had, or a peer was refused.
#[derive(Debug, Error)]
pub enum ListenError {
    #[error("{0} is in use by a running process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotSocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot listen on {0}: a socket path must be 1 to 107 bytes without NUL")]
    PathTooLong(PathBuf),
    #[error("--socket-mode {0:o} is not a permission mode (0 to 0777)")]
    Mode(u32),
    #[error("descriptor {fd} ({how}) is not usable: {why}")]
    Inherited {
        fd: RawFd,
        how: &'static str,
        #[source]
        why: Unusable,
    },
    #[error("systemd socket activation: LISTEN_PID={0:?} is not a pid")]
    SystemdPid(OsString),
    #[error("systemd socket activation: LISTEN_PID is set but LISTEN_FDS is not")]
    SystemdNoFds,
    #[error(
        "systemd socket activation: LISTEN_FDS={0} but the sidecar serves exactly one socket \
         (set it to 1: one ListenStream= in the .socket unit)"
    )]
    SystemdFds(String),
}

/// Why a descriptor cannot be the listening socket.
#[derive(Debug, Error)]
pub enum Unusable {
    #[error("it must be 3 or more (0, 1 and 2 are standard I/O)")]
    StandardIo,
    #[error("not open: {0}")]
    NotOpen(io::Error),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: io::Error,
    },
    #[error("not a socket")]
    NotSocket,
    #[error("not an AF_UNIX socket (domain {0})")]
    NotUnix(u16),
    #[error("not a SOCK_STREAM socket (type {0})")]
    NotStream(u32),
    #[error("not listening (listen(2) was not called on it)")]
    NotListening,
    #[error("cannot set close-on-exec: {0}")]
    CloseOnExec(io::Error),
    #[error("cannot duplicate it: {0}")]
    Duplicate(io::Error),
}

/// Why a connection's peer is refused.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot read SO_PEERCRED: {0}")]
    Credentials(io::Error),
    #[error("peer uid {uid} (pid {pid}) is not allowed (--allow-uid)")]
    NotAllowed { uid: u32, pid: i32 },
}

/// How the listening socket is obtained.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Bind a new socket at this path (a stale socket left by a dead sidecar is replaced).
    Path(PathBuf),
    /// A validated listening socket handed over by whoever started the sidecar.
    Inherited(Inherited),
}

/// A listening socket the sidecar did not create. Shared so that [`crate::Config`] stays
/// cheap to clone; [`Listener::open`] duplicates it.
#[derive(Debug, Clone)]
pub struct Inherited {
    fd: Arc<OwnedFd>,
    /// The descriptor number it arrived as.
    pub number: RawFd,
    /// "--fd" or "systemd".
    pub how: &'static str,
}

impl Listen {
    /// A description for logs: the path, or the descriptor and the address it is bound to.
    pub fn describe(&self) -> String {
        match self {
            Listen::Path(p) => p.display().to_string(),
            Listen::Inherited(i) => {
                let addr = local_path(i.fd.as_fd())
                    .map_or_else(|| "unnamed".to_owned(), |p| p.display().to_string());
                format!("{addr} (descriptor {} from {})", i.number, i.how)
            }
        }
    }
}

/// Checks that `fd` is a listening `AF_UNIX` `SOCK_STREAM` socket; the reason when not.
pub fn check_listening_unix_stream(fd: BorrowedFd<'_>) -> Result<(), Unusable> {
    let query = |what| {
        move |e: rustix::io::Errno| Unusable::Query {
            what,
            source: e.into(),
        }
    };
    let st = rustix::fs::fstat(fd).map_err(query("fstat"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(Unusable::NotSocket);
    }
    let domain = sockopt::socket_domain(fd).map_err(query("SO_DOMAIN"))?;
    if domain != AddressFamily::UNIX {
        return Err(Unusable::NotUnix(domain.as_raw()));
    }
    let kind = sockopt::socket_type(fd).map_err(query("SO_TYPE"))?;
    if kind != SocketType::STREAM {
        return Err(Unusable::NotStream(kind.as_raw()));
    }
    if !sockopt::socket_acceptconn(fd).map_err(query("SO_ACCEPTCONN"))? {
        return Err(Unusable::NotListening);
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor after checking that it is open and a listening
/// Unix stream socket, and marks it close-on-exec.
///
/// Call this once per descriptor, early in `main`, before anything else could open or own
/// descriptor `number` (it only accepts a *listening socket*, which nothing in this process
/// creates before it runs, so it cannot take over a descriptor the process opened itself).
/// Descriptors 0 to 2 are refused: they are standard input, output and error.
pub fn inherit(number: RawFd, how: &'static str) -> Result<Inherited, ListenError> {
    let bad = |why| ListenError::Inherited {
        fd: number,
        how,
        why,
    };
    if number < 3 {
        return Err(bad(Unusable::StandardIo));
    }
    sys::fd_is_open(number).map_err(|e| bad(Unusable::NotOpen(e)))?;
    // SAFETY: see the function's contract: `number` is open (checked just above), this process
    // inherited it and no other object owns it, and callers claim each number once. What is
    // not a listening socket is handed back below without being closed.
    let fd = unsafe { OwnedFd::from_raw_fd(number) };
    if let Err(why) = check_listening_unix_stream(fd.as_fd()) {
        let _ = fd.into_raw_fd();
        return Err(bad(why));
    }
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| bad(Unusable::CloseOnExec(e.into())))?;
    Ok(Inherited {
        fd: Arc::new(fd),
        number,
        how,
    })
}

/// The socket passed by systemd socket activation, if the environment says there is one for
/// this process: `LISTEN_PID` equal to our pid and `LISTEN_FDS` = 1 (descriptor 3). `Ok(None)`
/// when `LISTEN_PID` is absent or names another process (the variables were inherited from a
/// parent and are not meant for us). Takes ownership as [`inherit`] does, with the same
/// contract. The caller should unset the variables afterwards (see [`SYSTEMD_VARS`]).
pub fn from_systemd(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
) -> Result<Option<Inherited>, ListenError> {
    let Some(pid) = listen_pid else {
        return Ok(None);
    };
    let pid: u32 = std::str::from_utf8(pid.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ListenError::SystemdPid(pid.to_owned()))?;
    if pid != std::process::id() {
        return Ok(None);
    }
    let fds = listen_fds.ok_or(ListenError::SystemdNoFds)?;
    match fds.as_bytes() {
        b"1" => inherit(SD_LISTEN_FDS_START, "systemd").map(Some),
        other => Err(ListenError::SystemdFds(
            String::from_utf8_lossy(other).into_owned(),
        )),
    }
}

/// The variables of systemd socket activation, to unset once read.
pub const SYSTEMD_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The path a Unix socket is bound to, if it has one.
fn local_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    let addr = SocketAddrUnix::try_from(rustix::net::getsockname(fd).ok()?).ok()?;
    Some(PathBuf::from(OsStr::from_bytes(addr.path_bytes()?)))
}

/// A listening socket, and what to clean up when done.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub listener: UnixListener,
    /// The path to remove on shutdown: the one we bound (an inherited socket's path belongs to
    /// whoever created it).
    pub owned: Option<OwnedPath>,
}

/// The socket file this sidecar created: its path and the file's identity, so that shutdown
/// removes it only while it is still ours (another sidecar may have replaced it since).
#[derive(Debug, Clone)]
pub struct OwnedPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedPath {
    /// Removes the socket file if the path still names the file we bound.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => info!(
                "leaving {} alone: it is no longer this sidecar's socket",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

impl Listener {
    /// Binds `listen`'s path with `mode`, or takes a duplicate of the inherited socket.
    pub fn open(listen: &Listen, mode: u32) -> Result<Listener, ListenError> {
        match listen {
            Listen::Path(path) => {
                let (listener, owned) = bind(path, mode)?;
                Ok(Listener {
                    listener,
                    owned: Some(owned),
                })
            }
            Listen::Inherited(i) => {
                let fd = i.fd.try_clone().map_err(|e| ListenError::Inherited {
                    fd: i.number,
                    how: i.how,
                    why: Unusable::Duplicate(e),
                })?;
                Ok(Listener {
                    listener: UnixListener::from(fd),
                    owned: None,
                })
            }
        }
    }
}

/// Checks what is at `path`: nothing, or a stale socket (one nobody accepts on), which is
/// removed; refuses anything else.
fn prepare_path(path: &Path) -> Result<(), ListenError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ListenError::Bind {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(ListenError::NotSocket(path.to_owned())),
    }
}

/// The socket address of `path`; `None` if the path does not fit one (with its NUL).
fn sockaddr(path: &Path) -> Option<SocketAddrUnix> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_SOCKET_PATH || bytes.contains(&0) {
        return None;
    }
    SocketAddrUnix::new(path).ok()
}

/// Renames `from` to `to` unless `to` exists (RENAME_NOREPLACE, or a plain rename where the
/// filesystem lacks it).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) => std::fs::rename(from, to),
        Err(e) => Err(e.into()),
    }
}

/// The name a socket for `path` is bound under before it is renamed into place: `PATH~PID`,
/// with as much of the file name cut off as a socket address needs, so that every path that
/// fits one has a temporary name too (a Plugin's socket in KubeVirt can be 106 bytes).
fn temporary_name(path: &Path) -> Option<PathBuf> {
    const MAX: usize = MAX_SOCKET_PATH;
    let suffix = format!("~{:x}", std::process::id());
    let name = path.file_name()?.as_bytes();
    // Not for a path that ends in `.` or `/`, whose file name is not its last bytes.
    if !path.as_os_str().as_bytes().ends_with(name) {
        return None;
    }
    let dir = path.as_os_str().len() - name.len();
    let keep = name.len().min(MAX.checked_sub(dir + suffix.len())?);
    if keep == 0 {
        return None;
    }
    let mut tmp = path.as_os_str().as_bytes()[..dir + keep].to_vec();
    tmp.extend_from_slice(suffix.as_bytes());
    Some(PathBuf::from(std::ffi::OsString::from_vec(tmp)))
}

/// Creates a listening socket at `path` whose file has exactly `mode`, and that appears at
/// `path` only once it accepts connections: it is bound under a temporary name next to `path`
/// (`PATH~PID`, `temporary_name`), given its mode (fchmod before bind, so the file is created with `mode` minus
/// the umask, never wider; then chmod to exactly `mode`), put in the listening state, and
/// renamed to `path`. A client that sees the path can connect; none can connect under a
/// wider mode. Returns the socket and the identity of its file.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, OwnedPath), ListenError> {
    if mode & !0o777 != 0 {
        return Err(ListenError::Mode(mode));
    }
    let Some((tmp, addr)) = sockaddr(path)
        .and_then(|_| temporary_name(path))
        .and_then(|tmp| sockaddr(&tmp).map(|a| (tmp, a)))
    else {
        return Err(ListenError::PathTooLong(path.to_owned()));
    };
    prepare_path(path)?;
    let fail = |source: io::Error| ListenError::Bind {
        path: path.to_owned(),
        source,
    };
    // A socket left under this name by a crashed process of the same pid.
    let _ = std::fs::remove_file(&tmp);

    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| fail(e.into()))?;
    // On Linux this sets the socket inode's mode, which bind(2) gives the new file (less the
    // umask).
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| fail(e.into()))?;
    rustix::net::bind(&fd, &addr).map_err(|e| fail(e.into()))?;
    let finish = || -> io::Result<OwnedPath> {
        let made = std::fs::symlink_metadata(&tmp)?;
        if !made.file_type().is_socket() {
            return Err(io::Error::other("the bound path is not a socket"));
        }
        if made.permissions().mode() & 0o777 != mode {
            // Only ever widens towards `mode` (the umask removed bits); nobody can connect yet.
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        }
        rustix::net::listen(&fd, BACKLOG)?;
        rename_noreplace(&tmp, path).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => io::Error::other("another sidecar created it meanwhile"),
            _ => e,
        })?;
        Ok(OwnedPath {
            path: path.to_owned(),
            dev: made.dev(),
            ino: made.ino(),
        })
    };
    match finish() {
        Ok(owned) => Ok((UnixListener::from(fd), owned)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(fail(e))
        }
    }
}

/// Who is on the other end of a connection (`SO_PEERCRED`: as of its `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// The peer's credentials.
pub fn peer(stream: &UnixStream) -> io::Result<Peer> {
    let cred = sys::peer_credentials(stream.as_fd())?;
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Who may connect: everyone when `allowed` is empty; otherwise the listed uids and the
/// sidecar's own effective uid (its `health` probe runs as that user).
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allowed: Vec<u32>,
}

impl PeerPolicy {
    /// A policy over `allowed` (empty: anyone who can open the socket file).
    pub fn new(allowed: &[u32]) -> PeerPolicy {
        let mut allowed = allowed.to_vec();
        if !allowed.is_empty() {
            allowed.push(rustix::process::geteuid().as_raw());
            allowed.sort_unstable();
            allowed.dedup();
        }
        PeerPolicy { allowed }
    }

    /// Whether the list is in force.
    pub fn restricts(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// Admits `peer`, or says why not.
    pub fn admit(&self, peer: &Peer) -> Result<(), PeerError> {
        if self.allowed.is_empty() || self.allowed.binary_search(&peer.uid).is_ok() {
            Ok(())
        } else {
            Err(PeerError::NotAllowed {
                uid: peer.uid,
                pid: peer.pid,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("listen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn bind_gives_the_exact_mode() {
        let d = tmpdir("mode");
        for mode in [0o600, 0o660, 0o666, 0o700] {
            let p = d.join(format!("s{mode:o}"));
            let (l, _) = bind(&p, mode).expect("bind");
            let got = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(got, mode);
            check_listening_unix_stream(l.as_fd()).expect("listening");
            // Bound under the temporary name, then renamed into place.
            let bound = local_path(l.as_fd()).expect("named");
            assert!(
                bound
                    .to_string_lossy()
                    .starts_with(&format!("{}~", p.display())),
                "{}",
                bound.display()
            );
        }
        assert!(matches!(
            bind(&d.join("x"), 0o1777),
            Err(ListenError::Mode(_))
        ));
        let long = d.join("y".repeat(120));
        assert!(matches!(
            bind(&long, 0o600),
            Err(ListenError::PathTooLong(_))
        ));
        // A path of exactly 107 bytes is bound (under a shortened temporary name).
        let dir_len = d.as_os_str().len() + 1;
        let longest = d.join("z".repeat(107 - dir_len));
        assert_eq!(longest.as_os_str().len(), 107);
        let (_l, owned) = bind(&longest, 0o600).expect("107 bytes");
        assert!(std::fs::symlink_metadata(&longest)
            .expect("bound")
            .file_type()
            .is_socket());
        owned.remove();
        std::fs::remove_dir_all(&d).expect("rm");
    }

    #[test]
    fn shutdown_removes_the_socket_only_while_it_is_ours() {
        let d = tmpdir("owned");
        let p = d.join("s");
        let (_l, owned) = bind(&p, 0o600).expect("bind");
        // Replaced by someone else (another sidecar's socket, say): left alone.
        std::fs::remove_file(&p).expect("rm");
        std::fs::write(&p, b"not ours").expect("write");
        owned.remove();
        assert_eq!(std::fs::read(&p).expect("still there"), b"not ours");
        std::fs::remove_file(&p).expect("rm");
        let (_l, owned) = bind(&p, 0o600).expect("bind again");
        owned.remove();
        assert!(std::fs::symlink_metadata(&p).is_err(), "ours: removed");
        std::fs::remove_dir_all(&d).expect("rm");
    }

    #[test]
    fn only_listening_unix_stream_sockets_pass() {
        let d = tmpdir("kinds");
        let (a, _b) = UnixStream::pair().expect("pair");
        let why = check_listening_unix_stream(a.as_fd()).expect_err("connected");
        assert!(matches!(why, Unusable::NotListening), "{why}");
        let f = std::fs::File::open("/dev/null").expect("open");
        assert!(matches!(
            check_listening_unix_stream(f.as_fd()),
            Err(Unusable::NotSocket)
        ));
        let dgram = std::os::unix::net::UnixDatagram::unbound().expect("dgram");
        let why = check_listening_unix_stream(dgram.as_fd()).expect_err("dgram");
        assert!(
            matches!(why, Unusable::NotStream(t) if t == libc::SOCK_DGRAM as u32),
            "{why}"
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let why = check_listening_unix_stream(tcp.as_fd()).expect_err("tcp");
        assert!(
            matches!(why, Unusable::NotUnix(d) if d == libc::AF_INET as u16),
            "{why}"
        );
        std::fs::remove_dir_all(&d).expect("rm");
    }

    #[test]
    fn an_inherited_listener_is_taken_over() {
        let d = tmpdir("inherit");
        let p = d.join("s");
        let (l, _) = bind(&p, 0o600).expect("bind");
        let number = std::os::fd::IntoRawFd::into_raw_fd(l);
        let i = inherit(number, "--fd").expect("a listening socket");
        assert!(Listen::Inherited(i.clone())
            .describe()
            .contains(&p.display().to_string()));
        let opened = Listener::open(&Listen::Inherited(i), 0o600).expect("dup");
        assert!(opened.owned.is_none(), "not ours to remove");
        let _client = UnixStream::connect(&p).expect("connect");
        opened.listener.accept().expect("accept");
        assert!(matches!(
            inherit(1, "--fd"),
            Err(ListenError::Inherited { fd: 1, .. })
        ));
        std::fs::remove_dir_all(&d).expect("rm");
    }

    #[test]
    fn systemd_variables_for_another_process_are_ignored() {
        let other = OsStr::new("1");
        assert!(from_systemd(None, Some(OsStr::new("1")))
            .expect("absent")
            .is_none());
        assert!(from_systemd(Some(other), Some(OsStr::new("1")))
            .expect("pid 1 is not us")
            .is_none());
        assert!(matches!(
            from_systemd(Some(OsStr::new("x")), None),
            Err(ListenError::SystemdPid(_))
        ));
        let me = std::process::id().to_string();
        let err =
            from_systemd(Some(OsStr::new(&me)), Some(OsStr::new("2"))).expect_err("two sockets");
        assert!(err.to_string().contains("LISTEN_FDS=2"), "{err}");
    }

    #[test]
    fn the_allow_list_admits_listed_uids_and_our_own() {
        let open = PeerPolicy::new(&[]);
        let peer = |uid| Peer {
            pid: 1,
            uid,
            gid: 0,
        };
        assert!(!open.restricts());
        assert!(open.admit(&peer(12345)).is_ok());
        let list = PeerPolicy::new(&[107]);
        assert!(list.restricts());
        assert!(list.admit(&peer(107)).is_ok());
        // SAFETY: geteuid(2) has no preconditions.
        assert!(list.admit(&peer(unsafe { libc::geteuid() })).is_ok());
        let why = list.admit(&peer(4242)).expect_err("not listed");
        assert!(why.to_string().contains("uid 4242"), "{why}");
    }
}
