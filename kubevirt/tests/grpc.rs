//! The container's entry point, `coco-kubevirt-hook run`, as virt-launcher meets it (issue 17):
//! the real binary supervising the real coco-sidecar, gRPC over the real Unix sockets with
//! KubeVirt's hook APIs (clients generated from the same .proto files virt-launcher's are
//! generated from): Info, OnDefineDomain and MutateDomain; the legacy layout walked the way
//! virt-launcher walks it; a certificate request through the socket the returned domain names;
//! coco-sidecar and the hook server killed and back; SIGTERM.
//!
//! Needs the workspace's binaries (`cargo build --workspace --bins`, or `cargo test
//! --workspace`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coco_kubevirt::grpc::pb::info::info_client::InfoClient;
use coco_kubevirt::grpc::pb::info::InfoParams;
use coco_kubevirt::grpc::pb::plugins::domain_hook_service_client::DomainHookServiceClient;
use coco_kubevirt::grpc::pb::plugins::{MutateDomainRequest, SidecarContext};
use coco_kubevirt::grpc::pb::v1alpha3::callbacks_client::CallbacksClient;
use coco_kubevirt::grpc::pb::v1alpha3::OnDefineDomainParams;
use coco_protocol::exit::Abi;
use coco_protocol::{CertsRet, Frontend};
use coco_tests::{table_of_size, workspace_bin, write_blob, GuestMem};
use tonic::transport::{Channel, Endpoint, Uri};

const SNP_VMI: &[u8] = include_bytes!("fixtures/vmi-snp.json");
const PLAIN_VMI: &[u8] = include_bytes!("fixtures/vmi-plain.json");
const PLUGIN: &str = include_str!("fixtures/domain-plugin.xml");
const LEGACY: &str = include_str!("fixtures/domain-legacy.xml");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A gRPC channel over the Unix socket `path`, as virt-launcher dials it.
async fn channel(path: &Path) -> Channel {
    let path = path.to_owned();
    let endpoint = Endpoint::from_static("http://[::]:0");
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    }));
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .expect("connect in time")
        .expect("connect")
}

/// `coco-kubevirt-hook run`, killed when dropped.
struct Pod {
    child: Child,
    dir: tempfile::TempDir,
    hook_socket: PathBuf,
    sidecar_socket: PathBuf,
    table: Vec<u8>,
}

impl Pod {
    /// Runs the container's entry point with `layout_args`, sockets under `sockets` (a path
    /// relative to the temporary directory).
    fn start(layout_args: &[&str], sockets: &str) -> Pod {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_of_size(3000, 0x5a);
        let blob = write_blob(dir.path(), "certs.blob", &table);
        let sock_dir = dir.path().join(sockets);
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_coco-kubevirt-hook"))
            .arg("run")
            .args(layout_args)
            .arg("--dir")
            .arg(&sock_dir)
            .arg("--certs")
            .arg(&blob)
            .arg("--sidecar")
            .arg(workspace_bin("coco-sidecar", "COCO_SIDECAR_BIN"))
            // the test connects as root
            .args(["--allow-uid", "0"])
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn coco-kubevirt-hook run");
        let pod = Pod {
            child,
            hook_socket: sock_dir.join("coco-hook.sock"),
            sidecar_socket: sock_dir.join("coco/sidecar.sock"),
            dir,
            table,
        };
        pod.wait_for(&pod.hook_socket);
        pod.wait_for(&pod.sidecar_socket);
        pod
    }

    fn wait_for(&self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "no {}:\n{}",
                socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The supervised children, by program name, from the kernel's view.
    fn children(&self) -> Vec<(u32, String)> {
        let pid = self.child.id();
        let list =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        list.split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter_map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                let args: Vec<String> = cmd
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Some((p, args.get(1).cloned().unwrap_or_default()))
            })
            .collect()
    }

    fn child_pid(&self, subcommand: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((p, _)) = self.children().into_iter().find(|(_, s)| s == subcommand) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no {subcommand} child:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One certificate request through `socket`, as QEMU makes it.
    fn serves(&self, socket: &Path) -> bool {
        let Ok(mut vmm) = Frontend::connect(socket) else {
            return false;
        };
        let mem = GuestMem::new(1 << 20, 0);
        if vmm.set_mem_table(&[mem.region(0)]).is_err() {
            return false;
        }
        match vmm.request_certs(Abi::SnpReqCerts, 0, 0x10000, 1) {
            Ok(r) if r.ret == CertsRet::Ok => {
                let _ = vmm.done(r.lease);
                mem.read(0x10000, self.table.len()) == self.table
            }
            _ => false,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let children = self.children();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (p, _) in children {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

fn info_of(socket: &Path) -> (String, Vec<(String, i32)>, Vec<String>) {
    runtime().block_on(async {
        let mut c = InfoClient::new(channel(socket).await);
        let r = c.info(InfoParams {}).await.expect("Info").into_inner();
        let points = r
            .hook_points
            .into_iter()
            .map(|p| (p.name, p.priority))
            .collect();
        (r.name, points, r.versions)
    })
}

async fn mutate_domain(
    socket: &Path,
    domain_type: &str,
    vmi: &[u8],
    domain: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    let mut c = DomainHookServiceClient::new(channel(socket).await);
    c.mutate_domain(MutateDomainRequest {
        domain_type: domain_type.into(),
        domain: domain.to_vec(),
        vmi: vmi.to_vec(),
        sidecar_context: Some(SidecarContext {
            invocation_context: "Boot".into(),
        }),
    })
    .await
    .map(|r| r.into_inner().domain)
}

fn sidecar_path_in(domain: &[u8]) -> String {
    let text = String::from_utf8_lossy(domain)
        .replace("&quot;", "\"")
        .replace("&#34;", "\"");
    let start = text.find(r#""path":""#).expect("a socket path") + 8;
    text[start..].split('"').next().expect("path").to_owned()
}

#[test]
fn plugins_mutate_domain_gives_a_domain_whose_socket_serves_certificates() {
    let pod = Pod::start(&["--layout", "plugin"], "kubevirt-plugin/coco-sidecar");
    runtime().block_on(async {
        let out = mutate_domain(&pod.hook_socket, "libvirt", SNP_VMI, PLUGIN.as_bytes())
            .await
            .expect("MutateDomain");
        let expected = coco_kubevirt::domain::mutate(
            SNP_VMI,
            PLUGIN.as_bytes(),
            pod.sidecar_socket.to_str().expect("utf-8"),
        )
        .expect("mutate")
        .into_domain(PLUGIN.as_bytes());
        assert_eq!(out, expected);
        // Plugins: QEMU's path is this container's path
        assert_eq!(
            sidecar_path_in(&out),
            pod.sidecar_socket.to_str().expect("utf-8")
        );

        let plain = mutate_domain(&pod.hook_socket, "libvirt", PLAIN_VMI, PLUGIN.as_bytes())
            .await
            .expect("MutateDomain");
        assert_eq!(plain, PLUGIN.as_bytes(), "not SNP: unchanged");

        let e = mutate_domain(&pod.hook_socket, "qemu", SNP_VMI, PLUGIN.as_bytes())
            .await
            .expect_err("wrong domain type");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = mutate_domain(&pod.hook_socket, "libvirt", SNP_VMI, b"<domain")
            .await
            .expect_err("broken XML");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("not well-formed"), "{}", e.message());
    });
    assert!(pod.serves(&pod.sidecar_socket), "{}", pod.log());
}

#[test]
fn the_legacy_layout_has_one_hook_socket_per_sidecar_directory() {
    // The pod's hooks emptyDir is the temporary directory's "hooks"; this container mounts
    // its subPath "hook-sidecar-0" (so QEMU's path is /var/run/kubevirt-hooks/hook-sidecar-0/).
    let pod = Pod::start(
        &[
            "--layout",
            "legacy",
            "--container-name",
            "hook-sidecar-0",
            "--qemu-dir",
            "/var/run/kubevirt-hooks/hook-sidecar-0",
        ],
        "hooks/hook-sidecar-0",
    );
    let hooks = pod.dir.path().join("hooks");
    // What virt-launcher does: Info on every file in every directory of the volume
    let mut sockets = Vec::new();
    for d in std::fs::read_dir(&hooks).expect("hooks dir") {
        let d = d.expect("entry").path();
        assert!(d.is_dir(), "{}", d.display());
        for f in std::fs::read_dir(&d).expect("sidecar dir") {
            let f = f.expect("entry").path();
            if !f.is_dir() {
                sockets.push(f);
            }
        }
    }
    assert_eq!(sockets, vec![pod.hook_socket.clone()]);
    let (name, points, versions) = info_of(&sockets[0]);
    assert_eq!(name, "coco-sidecar");
    assert_eq!(points, vec![("OnDefineDomain".to_owned(), 0)]);
    assert_eq!(versions, vec!["v1alpha3".to_owned()]);

    let out = runtime().block_on(async {
        let mut c = CallbacksClient::new(channel(&pod.hook_socket).await);
        c.on_define_domain(OnDefineDomainParams {
            domain_xml: LEGACY.as_bytes().to_vec(),
            vmi: SNP_VMI.to_vec(),
        })
        .await
        .expect("OnDefineDomain")
        .into_inner()
        .domain_xml
    });
    let path = sidecar_path_in(&out);
    assert_eq!(
        path,
        "/var/run/kubevirt-hooks/hook-sidecar-0/coco/sidecar.sock"
    );
    // ... which is, in the shared volume, the socket this container serves
    let in_volume = hooks.join(path.trim_start_matches("/var/run/kubevirt-hooks/"));
    assert_eq!(in_volume, pod.sidecar_socket);
    assert!(pod.serves(&in_volume), "{}", pod.log());
}

#[test]
fn killed_children_are_back_well_within_qemus_grace_period() {
    let pod = Pod::start(&[], "p/coco-sidecar");
    assert!(pod.serves(&pod.sidecar_socket));
    for round in 0..2 {
        let old = pod.child_pid("serve");
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        // QEMU keeps connecting to the same path: the supervisor's socket stays
        let deadline = killed + Duration::from_secs(25);
        while !pod.serves(&pod.sidecar_socket) {
            assert!(
                Instant::now() < deadline,
                "round {round}: not back:\n{}",
                pod.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "round {round}: coco-sidecar SIGKILLed, serving again after {} ms",
            killed.elapsed().as_millis()
        );
        assert_ne!(pod.child_pid("serve"), old);
    }
    let old = pod.child_pid("hook");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(25);
    while pod.child_pid("hook") == old {
        assert!(
            Instant::now() < deadline,
            "hook not restarted:\n{}",
            pod.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(info_of(&pod.hook_socket).0, "coco-sidecar");
    let log = pod.log();
    assert!(log.contains("coco-sidecar exited (signal: 9"), "{log}");
    assert!(log.contains("hook server exited (signal: 9"), "{log}");
}

#[test]
fn sigterm_stops_both_children_and_removes_the_sockets() {
    let mut pod = Pod::start(&[], "p/coco-sidecar");
    let children: Vec<u32> = ["serve", "hook"].iter().map(|s| pod.child_pid(s)).collect();
    // Both answer, so both have their own SIGTERM handling in place (a child killed by a
    // SIGTERM that came before it is stopped too, but not with status 0)
    assert!(pod.serves(&pod.sidecar_socket));
    assert_eq!(info_of(&pod.hook_socket).0, "coco-sidecar");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pod.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = pod.child.wait().expect("wait");
    assert!(status.success(), "{status}:\n{}", pod.log());
    for p in children {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        assert!(!stat.contains("coco-"), "child {p} still there: {stat}");
    }
    assert!(!pod.hook_socket.exists());
    assert!(!pod.sidecar_socket.exists());
    let log = pod.log();
    assert!(
        log.contains("coco-sidecar exited (exit status: 0)"),
        "{log}"
    );
    assert!(log.contains("hook server exited (exit status: 0)"), "{log}");
}

#[test]
fn a_socket_path_qemu_cannot_use_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = format!("/{}", "q".repeat(90));
    let out = Command::new(env!("CARGO_BIN_EXE_coco-kubevirt-hook"))
        .args(["run", "--certs", "/nonexistent", "--dir"])
        .arg(dir.path())
        .args(["--qemu-dir", &long])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is 109 bytes; a Unix socket path holds at most 107"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_coco-kubevirt-hook"))
        .args(["run", "--certs", "/x", "--layout", "legacy"])
        .env_remove("CONTAINER_NAME")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONTAINER_NAME"));
}
