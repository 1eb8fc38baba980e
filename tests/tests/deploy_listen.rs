//! End-to-end, through the real binary: where the listening socket comes from (`--socket`
//! with `--socket-mode`, `--fd N`, systemd socket activation) and who may connect
//! (`--allow-uid`, checked with SO_PEERCRED). Issue 7.

mod deploy_support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use coco_tests::{table_of_size, write_blob};
use deploy_support::{bin, command_with_fd, health, raw, serve_one_request, Proc};

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn serve_args<'a>(certs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["serve", "--certs", certs];
    v.extend_from_slice(extra);
    v
}

#[test]
fn an_inherited_fd_is_served_and_left_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 3);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let socket = dir.path().join("pre-bound.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let certs = blob.to_str().expect("utf-8");
    let cmd = command_with_fd(
        &bin(),
        &serve_args(certs, &["--fd", "5"]),
        raw(&listener),
        5,
    );
    let mut sidecar = Proc::spawn(cmd, &dir.path().join("log"));
    // The parent's copy goes away: only the sidecar holds the socket now.
    drop(listener);
    sidecar.wait_accepting(&socket);
    serve_one_request(&socket, &table);
    assert!(sidecar.terminate().success());
    let log = sidecar.log();
    assert!(log.contains("descriptor 5 from --fd"), "{log}");
    assert!(
        socket.exists(),
        "an inherited socket's path belongs to whoever created it"
    );
}

/// What a supervisor that keeps the socket (systemd, a parent process) gives: a VMM that
/// connects while the sidecar is down is queued by the kernel and served by the next sidecar,
/// instead of getting ECONNREFUSED.
#[test]
fn an_inherited_socket_queues_connections_across_a_sidecar_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(2500, 5);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let socket = dir.path().join("kept.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let certs = blob.to_str().expect("utf-8");
    let start = |log: &str| {
        let cmd = command_with_fd(
            &bin(),
            &serve_args(certs, &["--fd", "4"]),
            raw(&listener),
            4,
        );
        let mut p = Proc::spawn(cmd, &dir.path().join(log));
        p.wait_accepting(&socket);
        p
    };
    let mut first = start("log1");
    serve_one_request(&socket, &table);
    let mut child = first.child.take().expect("running");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    // Nobody accepts now, but the socket still listens: the connection is queued.
    let queued = UnixStream::connect(&socket).expect("queued by the kernel");
    let second = start("log2");
    let mut vmm = coco_protocol::Frontend::handshake(queued).expect("served by the new sidecar");
    assert_eq!(vmm.caps().expect("caps").coco_subtypes, 1);
    serve_one_request(&socket, &table);
    drop(second);
}

#[test]
fn an_fd_that_is_not_a_listening_unix_stream_socket_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (connected, _peer) = UnixStream::pair().expect("pair");
    let file = std::fs::File::create(dir.path().join("plain")).expect("file");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let cases: [(i32, &str); 4] = [
        (raw(&connected), "not listening"),
        (raw(&file), "not a socket"),
        (raw(&tcp), "not an AF_UNIX socket"),
        (-1, "not open"),
    ];
    for (fd, why) in cases {
        let args = serve_args("/nonexistent", &["--fd", "7"]);
        let out = if fd < 0 {
            Command::new(bin()).args(&args).output()
        } else {
            command_with_fd(&bin(), &args, fd, 7).output()
        }
        .expect("run");
        assert_eq!(out.status.code(), Some(1), "{why}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("descriptor 7 (--fd) is not usable") && err.contains(why),
            "expected {why:?}: {err}"
        );
    }
    let out = Command::new(bin())
        .args(serve_args("/x", &["--fd", "2"]))
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("it must be 3 or more"));
    let out = Command::new(bin())
        .args(serve_args("/x", &[]))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no socket"), "{err}");
}

/// systemd's protocol: descriptor 3, LISTEN_FDS=1 and LISTEN_PID = the sidecar's own pid
/// (set by a shell that then execs the sidecar, keeping its pid).
#[test]
fn systemd_socket_activation_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(2000, 9);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let sidecar_path = bin();
    let certs = blob.to_str().expect("utf-8");
    let script = r#"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=coco exec "$0" "$@""#;
    let mut args = vec!["-c", script, sidecar_path.to_str().expect("utf-8")];
    args.extend(serve_args(certs, &[]));
    let cmd = command_with_fd(Path::new("/bin/sh"), &args, raw(&listener), 3);
    let mut sidecar = Proc::spawn(cmd, &dir.path().join("log"));
    drop(listener);
    sidecar.wait_accepting(&socket);
    serve_one_request(&socket, &table);
    assert!(sidecar.terminate().success());
    assert!(sidecar.log().contains("descriptor 3 from systemd"));

    // Variables meant for another process (a parent's pid) are ignored, so there is no socket.
    let mut args = vec!["-c", r#"LISTEN_PID=1 LISTEN_FDS=1 exec "$0" "$@""#];
    args.push(sidecar_path.to_str().expect("utf-8"));
    args.extend(serve_args(certs, &[]));
    let out = Command::new("/bin/sh").args(&args).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no socket"));

    // Two sockets, or an explicit --socket as well, are refused with the reason.
    let listener = UnixListener::bind(dir.path().join("second.sock")).expect("bind");
    for (fds, extra, why) in [
        ("2", vec![], "LISTEN_FDS=2"),
        ("1", vec!["--socket", "/tmp/x.sock"], "use one"),
    ] {
        let script = format!(r#"LISTEN_PID=$$ LISTEN_FDS={fds} exec "$0" "$@""#);
        let mut args = vec!["-c", script.as_str(), sidecar_path.to_str().expect("utf-8")];
        args.extend(serve_args(certs, &extra));
        let out = command_with_fd(Path::new("/bin/sh"), &args, raw(&listener), 3)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{why}: {err}");
    }
}

/// The socket file gets exactly --socket-mode, whatever the umask, and 0600 by default.
#[test]
fn the_socket_is_created_with_the_configured_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(1000, 1));
    let certs = blob.to_str().expect("utf-8");
    for (umask, mode_arg, want) in [
        (0o000, None, 0o600),
        (0o077, Some("0660"), 0o660),
        (0o022, Some("666"), 0o666),
        (0o000, Some("0o640"), 0o640),
    ] {
        let socket = dir.path().join(format!("m{want:o}.sock"));
        let mut args = serve_args(certs, &["--socket", socket.to_str().expect("utf-8")]);
        if let Some(m) = mode_arg {
            args.extend(["--socket-mode", m]);
        }
        let mut cmd = Command::new(bin());
        cmd.args(&args);
        // SAFETY: umask(2) is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let mut sidecar = Proc::spawn(cmd, &dir.path().join("log"));
        sidecar.wait_accepting(&socket);
        assert_eq!(mode_of(&socket), want, "umask {umask:o}, {mode_arg:?}");
        assert!(sidecar.terminate().success());
        assert!(
            !socket.exists(),
            "a socket the sidecar bound is removed on exit"
        );
    }
    let out = Command::new(bin())
        .args(serve_args(
            certs,
            &["--socket", "/tmp/x", "--socket-mode", "0999"],
        ))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("octal permission mode"));
}

/// `--allow-uid`: another user is refused (and logged with its uid) until allowed; the mode
/// keeps it out before that. Needs root to run a client as another user.
#[test]
fn peers_are_checked_against_the_allowed_uids() {
    if !coco_tests::root_or_skip("peers_are_checked_against_the_allowed_uids") {
        return;
    }
    const OTHER: u32 = 65534;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let table = table_of_size(1500, 4);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let certs = blob.to_str().expect("utf-8");
    let socket = dir.path().join("s.sock");
    let sock = socket.to_str().expect("utf-8");
    let probe_as_other = || {
        Command::new(bin())
            .args(["health", "--socket", sock])
            .uid(OTHER)
            .gid(OTHER)
            .output()
            .expect("run health as another user")
    };

    // Default mode 0600: the other user cannot even open the socket.
    let mut sidecar = Proc::spawn(
        {
            let mut c = Command::new(bin());
            c.args(serve_args(certs, &["--socket", sock]));
            c
        },
        &dir.path().join("log0"),
    );
    sidecar.wait_accepting(&socket);
    let out = probe_as_other();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    sidecar.terminate();

    // Mode 0666 but only uid 107 allowed: the connection is accepted, then refused and logged.
    let args = serve_args(
        certs,
        &[
            "--socket",
            sock,
            "--socket-mode",
            "0666",
            "--allow-uid",
            "107",
        ],
    );
    let mut sidecar = Proc::spawn(
        {
            let mut c = Command::new(bin());
            c.args(&args);
            c
        },
        &dir.path().join("log1"),
    );
    sidecar.wait_accepting(&socket);
    let out = probe_as_other();
    assert_eq!(out.status.code(), Some(1), "refused peer is unhealthy");
    let log = sidecar.log();
    assert!(
        log.contains(&format!("peer uid {OTHER} (pid")) && log.contains("is not allowed"),
        "{log}"
    );
    // The sidecar's own uid (root here) is always allowed: its probe and a real request work.
    let out = health(&["--socket", sock]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serve_one_request(&socket, &table);
    sidecar.terminate();

    // Allowing the other uid lets it in.
    let args = serve_args(
        certs,
        &[
            "--socket",
            sock,
            "--socket-mode",
            "0666",
            "--allow-uid",
            "107",
            "--allow-uid",
            "65534",
        ],
    );
    let mut sidecar = Proc::spawn(
        {
            let mut c = Command::new(bin());
            c.args(&args);
            c
        },
        &dir.path().join("log2"),
    );
    sidecar.wait_accepting(&socket);
    let out = probe_as_other();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.log()
    );
    sidecar.terminate();
}
