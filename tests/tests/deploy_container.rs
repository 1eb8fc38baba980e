//! End-to-end, with a real container engine: builds the image from deploy/Containerfile (a
//! static coco-sidecar FROM scratch), runs it as the Kubernetes manifests do (non-root, read-only
//! root filesystem, no capabilities, no new privileges, no network) with the socket directory
//! and the blob mounted (the blob read-only), and serves certificate requests from the host
//! through the mounted socket with sealed memfd guest memory. Also shows that an updater's
//! exclusive OFD lock on the host reaches the containerised sidecar through the read-only
//! mount, and that `health` works inside the container. Issue 7.
//!
//! Needs root and podman (with runc). Without them it prints one `SKIPPED:` line and passes,
//! unless COCO_REQUIRE_PODMAN=1, which makes their absence a failure (CI sets it).
//! COCO_SIDECAR_STATIC_BIN names a prebuilt static binary; otherwise deploy/build-static.sh
//! builds one (release profile, in its own target directory).

mod deploy_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::{CertsRet, Frontend};
use coco_tests::{table_of_size, workspace_root, write_blob, GuestMem, HeldLock};
use deploy_support::serve_one_request;

/// The numeric user of deploy/Containerfile.
const IMAGE_UID: u32 = 65532;

/// Runs podman with the project's containers.conf (runc, ulimits), bounded in time.
fn podman(args: &[&str]) -> Output {
    let conf = std::env::var_os("CONTAINERS_CONF").unwrap_or_else(|| {
        workspace_root()
            .join("deploy/podman/containers.conf")
            .into()
    });
    Command::new("timeout")
        .arg("300")
        .arg("podman")
        .args(args)
        .env("CONTAINERS_CONF", conf)
        .output()
        .expect("run podman")
}

fn ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the test runs rootful podman)".into());
    }
    match Command::new("podman").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("podman is not installed (apt-get install podman runc)".into()),
    }
    match Command::new("runc").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("runc is not installed (apt-get install runc)".into()),
    }
}

fn static_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("COCO_SIDECAR_STATIC_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new(workspace_root().join("deploy/build-static.sh"))
        .output()
        .expect("run deploy/build-static.sh");
    assert!(
        out.status.success(),
        "deploy/build-static.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Removes the container and the image however the test ends.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.container]);
        let _ = podman(&["rmi", "--force", &self.image]);
    }
}

fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn wait_for_socket(socket: &Path, container: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the containerised sidecar did not accept within 30 s:\n{}",
        ok(&["logs", container])
    );
}

/// Host side of a container test: the socket directory (owned by `uid`, the image's user)
/// and the blob directory with a blob of `table` (mode 0644).
struct HostDirs {
    /// Removed with the test.
    _dir: tempfile::TempDir,
    sockets: PathBuf,
    blob: PathBuf,
}

impl HostDirs {
    fn new(uid: u32, table: &[u8]) -> HostDirs {
        let dir = tempfile::tempdir().expect("tempdir");
        let sockets = dir.path().join("run");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&sockets).expect("mkdir");
        std::fs::create_dir(&certs).expect("mkdir");
        std::os::unix::fs::chown(&sockets, Some(uid), Some(uid)).expect("chown");
        let blob = write_blob(&certs, "certs.blob", table);
        std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        HostDirs {
            _dir: dir,
            sockets,
            blob,
        }
    }

    /// `podman run` of `image` as the manifests run it (no network, read-only root, no
    /// capabilities, no new privileges), the socket directory at `socket_dir` and the blob's
    /// directory read-only at /var/lib/coco-sidecar, with `args`.
    fn run_confined(&self, name: &str, image: &str, socket_dir: &str, args: &[&str]) {
        let sockets = format!("{}:{socket_dir}", self.sockets.display());
        let certs = format!(
            "{}:/var/lib/coco-sidecar:ro",
            self.blob.parent().expect("certs dir").display()
        );
        let mut all = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "none",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            &sockets,
            "--volume",
            &certs,
            image,
        ];
        all.extend_from_slice(args);
        ok(&all);
    }
}

/// Whether podman can run here; one `SKIPPED:` line when not (a failure under
/// COCO_REQUIRE_PODMAN=1).
fn podman_usable(what: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    coco_tests::skip_unless_required("COCO_REQUIRE_PODMAN", what, &why);
    false
}

/// Builds an image with one of deploy/'s build scripts and checks its numeric user.
fn build_image(script: &str, args: &[&str], tag: &str, user: &str) {
    let build = Command::new(workspace_root().join(script))
        .args(["--tag", tag])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        build.status.success(),
        "image build failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    assert_eq!(
        ok(&["image", "inspect", "--format", "{{.Config.User}}", tag]),
        user,
        "the image runs as a numeric non-root user"
    );
}

/// Checks on the host that `pid` runs as `uid` with no capabilities and no new privileges.
fn assert_confined(pid: &str, uid: u32) {
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "{pid}: uids {uids}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
}

#[test]
fn the_image_serves_requests_through_a_mounted_socket() {
    if !podman_usable("container test") {
        return;
    }
    let tag = format!("localhost/coco-sidecar:test-{}", std::process::id());
    let name = format!("coco-sidecar-test-{}", std::process::id());
    let _cleanup = Cleanup {
        container: name.clone(),
        image: tag.clone(),
    };
    let bin = static_binary();
    let bin = bin.to_str().expect("utf-8 path");
    build_image(
        "deploy/build-image.sh",
        &["--bin", bin],
        &tag,
        &format!("{IMAGE_UID}:{IMAGE_UID}"),
    );

    let table = table_of_size(6000, 8);
    let host = HostDirs::new(IMAGE_UID, &table);
    let (run, blob) = (&host.sockets, &host.blob);
    host.run_confined(
        &name,
        &tag,
        "/run/coco-sidecar",
        &[
            "serve",
            "--socket",
            "/run/coco-sidecar/sidecar.sock",
            "--certs",
            "/var/lib/coco-sidecar/certs.blob",
            // The host test connects as root: only it (and the sidecar's own uid) may connect.
            "--allow-uid",
            "0",
        ],
    );
    let socket = run.join("sidecar.sock");
    wait_for_socket(&socket, &name);

    // The process really runs confined: its uid, capabilities and no_new_privs, seen on the host.
    let pid = ok(&["inspect", "--format", "{{.State.Pid}}", &name]);
    assert_confined(&pid, IMAGE_UID);
    let socket_mode = std::fs::metadata(&socket)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(socket_mode, 0o600, "the default socket mode");

    // A real request from the host through the mounted socket, with memfd guest memory.
    serve_one_request(&socket, &table);

    // An updater on the host holds the exclusive lock: the sidecar in the container sees it
    // through the read-only mount (OFD locks are the kernel's, per file) and answers EAGAIN.
    let mut vmm = Frontend::connect(&socket).expect("connect");
    let mem = GuestMem::new(1 << 20, 0);
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let updater = HeldLock::take("exclusive", blob);
    let r = vmm
        .request_certs(Abi::CocoRfc, 1, 0x8000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Again, "locked by the host's updater");
    let exec_health = |extra: &[&str]| {
        let mut args = vec![
            "exec",
            name.as_str(),
            "/coco-sidecar",
            "health",
            "--socket",
            "/run/coco-sidecar/sidecar.sock",
            "--certs",
            "/var/lib/coco-sidecar/certs.blob",
        ];
        args.extend_from_slice(extra);
        podman(&args)
    };
    let out = exec_health(&["--lock-wait-ms", "200"]);
    assert_eq!(out.status.code(), Some(2), "the probe sees the lock too");
    updater.release();
    let r = vmm
        .request_certs(Abi::CocoRfc, 1, 0x8000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x8000, table.len()), table);
    // While the lease is held, the host's updater waits: the sidecar's shared lock is real.
    assert!(
        !coco_tests::exclusive_lock_free(blob),
        "lease holds the lock"
    );
    vmm.done(r.lease).expect("done");
    drop(vmm);

    // The probe the manifests use, inside the container (its uid is always allowed).
    let out = exec_health(&[]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && line.starts_with("healthy: "),
        "{line}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    println!(
        "containerised sidecar after the requests: VmRSS {}, VmHWM {}, threads {}",
        status_field(&pid, "VmRSS"),
        status_field(&pid, "VmHWM"),
        status_field(&pid, "Threads")
    );

    // SIGTERM (podman stop): a clean exit that removes the socket.
    ok(&["stop", "--time", "10", &name]);
    assert_eq!(
        ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]),
        "0"
    );
    assert!(
        !socket.exists(),
        "the sidecar removed its socket on SIGTERM"
    );
    let logs = ok(&["logs", &name]);
    let all_logs = format!(
        "{logs}{}",
        String::from_utf8_lossy(&podman(&["logs", &name]).stderr)
    );
    assert!(all_logs.contains("stopped"), "{all_logs}");
}

/// The PIDs of `pid`'s children and their first argument after the program (the subcommand).
fn children_of(pid: &str) -> Vec<(String, String)> {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .map(|c| {
            let cmd = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            let sub = cmd
                .split(|&b| b == 0)
                .nth(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            (c.to_owned(), sub)
        })
        .collect()
}

/// The KubeVirt image (deploy/Containerfile.kubevirt, issue 17) run as the admission policy
/// runs it in a launcher pod: its user 107, read-only root, no capabilities, no new
/// privileges, no network, the plugin's socket directory and the blob (read-only) mounted.
/// `coco-kubevirt-hook run` is PID 1 with coco-sidecar and the hook server as children; a
/// request from the host goes through the socket the domain names; coco-sidecar killed from
/// the host serves again; `podman stop` ends it cleanly and removes the sockets.
#[test]
fn the_kubevirt_image_supervises_the_sidecar_in_the_plugin_layout() {
    if !podman_usable("KubeVirt container test") {
        return;
    }
    let tag = format!("localhost/coco-kubevirt:test-{}", std::process::id());
    let name = format!("coco-kubevirt-test-{}", std::process::id());
    let _cleanup = Cleanup {
        container: name.clone(),
        image: tag.clone(),
    };
    // 107: QEMU's uid and group in KubeVirt's launcher pods
    build_image("deploy/build-kubevirt-image.sh", &[], &tag, "107:107");

    let table = table_of_size(5000, 0x6b);
    let host = HostDirs::new(107, &table);
    let plugin = &host.sockets;
    host.run_confined(
        &name,
        &tag,
        "/var/run/kubevirt-plugin/coco-sidecar",
        &[
            // The admission policy's arguments; the host test connects as root
            "run",
            "--layout",
            "plugin",
            "--plugin",
            "coco-sidecar",
            "--certs",
            "/var/lib/coco-sidecar/certs.blob",
            "--allow-uid",
            "0",
        ],
    );
    let socket = plugin.join("coco/sidecar.sock");
    wait_for_socket(&socket, &name);
    assert!(plugin.join("coco-hook.sock").exists());

    let pid = ok(&["inspect", "--format", "{{.State.Pid}}", &name]);
    let children = children_of(&pid);
    let subs: Vec<&str> = children.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(subs, ["serve", "hook"], "{children:?}");
    for p in std::iter::once(pid.as_str()).chain(children.iter().map(|(p, _)| p.as_str())) {
        assert_confined(p, 107);
    }
    let mode = std::fs::metadata(&socket)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);

    serve_one_request(&socket, &table);
    // coco-sidecar dies; the supervisor in the container restarts it on the same socket
    let sidecar = &children[0].0;
    let killed = Instant::now();
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(sidecar.parse().expect("pid"), libc::SIGKILL) };
    assert_eq!(rc, 0);
    let deadline = killed + Duration::from_secs(25);
    while children_of(&pid).first().is_none_or(|(p, _)| p == sidecar) {
        assert!(
            Instant::now() < deadline,
            "not restarted:\n{}",
            ok(&["logs", &name])
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    serve_one_request(&socket, &table);
    println!(
        "containerised coco-sidecar SIGKILLed and serving again after {} ms",
        killed.elapsed().as_millis()
    );

    ok(&["stop", "--time", "10", &name]);
    assert_eq!(
        ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]),
        "0"
    );
    assert!(!socket.exists() && !plugin.join("coco-hook.sock").exists());
}
