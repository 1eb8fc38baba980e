//! What the container runs: the two sockets of the [`Layout`], coco-sidecar and the hook
//! server on them, under [`crate::supervise`].

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use coco_sidecar::listen::{self, ListenError};
use log::info;
use thiserror::Error;

use crate::layout::Layout;
use crate::supervise::{ChildSpec, SuperviseError, Supervisor, CHILD_FD};

/// QEMU's uid in KubeVirt's launcher pods (`qemu`, 107), the default peer allowed.
pub const QEMU_UID: u32 = 107;
/// Mode of both sockets: the container's user and group (KubeVirt's `fsGroup` 107).
pub const SOCKET_MODE: u32 = 0o660;

/// What `coco-kubevirt-hook run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where the sockets go.
    pub layout: Layout,
    /// The certificate blob coco-sidecar serves.
    pub certs: PathBuf,
    /// The coco-sidecar executable.
    pub sidecar: PathBuf,
    /// This program, for the hook server.
    pub hook: PathBuf,
    /// Peers coco-sidecar serves besides its own uid.
    pub allow_uids: Vec<u32>,
    /// Mode of both sockets.
    pub socket_mode: u32,
    /// More arguments for `coco-sidecar serve`.
    pub sidecar_args: Vec<OsString>,
}

/// Why the container could not run.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("cannot create {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
}

fn make_parent(path: &Path) -> Result<(), RunError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| RunError::Dir(dir.to_owned(), e))?;
    }
    Ok(())
}

/// The arguments of `coco-sidecar serve` on the inherited socket.
pub fn sidecar_args(c: &RunConfig) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        "--fd".into(),
        CHILD_FD.to_string().into(),
        "--certs".into(),
        c.certs.clone().into(),
    ];
    for uid in &c.allow_uids {
        args.push("--allow-uid".into());
        args.push(uid.to_string().into());
    }
    args.extend(c.sidecar_args.iter().cloned());
    args
}

/// Binds the sockets and supervises coco-sidecar and the hook until SIGTERM.
pub fn run(c: RunConfig) -> Result<(), RunError> {
    let supervisor = Supervisor::new()?;
    let l = &c.layout;
    make_parent(&l.hook_socket)?;
    make_parent(&l.sidecar_socket)?;
    let (hook, hook_path) = listen::bind(&l.hook_socket, c.socket_mode)?;
    let (sidecar, sidecar_path) = listen::bind(&l.sidecar_socket, c.socket_mode)?;
    info!(
        "hook on {}; coco-sidecar on {} (QEMU connects to {}); blob {}",
        l.hook_socket.display(),
        l.sidecar_socket.display(),
        l.qemu_socket,
        c.certs.display()
    );
    let specs = vec![
        ChildSpec {
            name: "coco-sidecar".into(),
            program: c.sidecar.clone(),
            args: sidecar_args(&c),
            listener: sidecar,
        },
        ChildSpec {
            name: "hook server".into(),
            program: c.hook.clone(),
            args: vec![
                "hook".into(),
                "--fd".into(),
                CHILD_FD.to_string().into(),
                "--qemu-socket".into(),
                l.qemu_socket.clone().into(),
            ],
            listener: hook,
        },
    ];
    supervisor.run(specs, &[hook_path, sidecar_path])?;
    Ok(())
}
