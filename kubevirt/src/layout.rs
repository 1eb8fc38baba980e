//! Where the sockets go in the `virt-launcher` pod, for KubeVirt's two hook layouts.
//!
//! - **Plugins** (VEP-190): the pod's emptyDir `kubevirt-plugin-sockets` is mounted whole at
//!   `/var/run/kubevirt-plugin` in `compute`, and with `subPath: NAME` at
//!   `/var/run/kubevirt-plugin/NAME` in the plugin's container, so both see the same paths.
//!   KubeVirt admits a Plugin's `socketPath` only under `/var/run/kubevirt-plugin/NAME/`,
//!   ending in `.sock`.
//! - **Legacy hook sidecars** (`hooks.kubevirt.io/hookSidecars`): the emptyDir is mounted
//!   whole at `/var/run/kubevirt-hooks` in `compute`, and with `subPath: CONTAINER` at the
//!   same path in the sidecar container `CONTAINER` (KubeVirt names them `hook-sidecar-N` and
//!   says so in `CONTAINER_NAME`). virt-launcher calls `Info` on *every file* in each
//!   container's directory and fails the VM on any error, so the sidecar's socket lives in a
//!   nested directory, which it skips.
//!
//! In both, this container's directory holds `coco-hook.sock` (the gRPC hook) and
//! `coco/sidecar.sock` (coco-sidecar's socket, which QEMU connects to). QEMU runs in
//! `compute`, so the domain names the socket by `compute`'s path, which must fit a Unix
//! socket address: at most 107 bytes.

use std::path::{Path, PathBuf};

use coco_sidecar::listen::MAX_SOCKET_PATH;
use thiserror::Error;

/// Where `compute` mounts the Plugins' socket volume.
pub const PLUGIN_ROOT: &str = "/var/run/kubevirt-plugin";
/// Where `compute` and the legacy hook sidecars mount the hooks' socket volume.
pub const HOOKS_ROOT: &str = "/var/run/kubevirt-hooks";
/// The gRPC hook's socket, in this container's directory.
pub const HOOK_SOCKET: &str = "coco-hook.sock";
/// coco-sidecar's socket, in this container's directory: nested, for the legacy layout.
pub const SIDECAR_SOCKET: &str = "coco/sidecar.sock";
/// The longest plugin or container name: a DNS label, which also keeps the longest plugin
/// path (`/var/run/kubevirt-plugin/` + 63 + `/coco/sidecar.sock`) at 106 bytes.
pub const MAX_NAME: usize = 63;

/// A layout that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "'{0}' is not a usable plugin or container name: 1 to 63 lowercase letters, digits and \
         '-', starting and ending with a letter or digit"
    )]
    Name(String),
    #[error(
        "the legacy layout needs the hook sidecar's container name (KubeVirt sets CONTAINER_NAME)"
    )]
    NoContainerName,
    #[error("{what} {path} is not an absolute path")]
    NotAbsolute { what: &'static str, path: String },
    #[error("{what} {path} is {len} bytes; a Unix socket path holds at most 107")]
    TooLong {
        what: &'static str,
        path: String,
        len: usize,
    },
}

/// Which of KubeVirt's hook mechanisms runs this container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `Plugin` resource's sidecar domain hook (KubeVirt 1.9 with the `Plugins` gate).
    Plugin,
    /// A `hooks.kubevirt.io/hookSidecars` entry (KubeVirt 1.7 and 1.8, gate `Sidecar`).
    Legacy,
}

/// The socket paths of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The gRPC hook's socket, as this container sees it.
    pub hook_socket: PathBuf,
    /// coco-sidecar's socket, as this container sees it.
    pub sidecar_socket: PathBuf,
    /// coco-sidecar's socket as QEMU's container (`compute`) sees it: what the domain names.
    pub qemu_socket: String,
}

/// A DNS label: what KubeVirt's container names are, and what a plugin name must be here.
fn check_name(name: &str) -> Result<(), LayoutError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LayoutError::Name(name.to_owned()))
    }
}

fn check_socket(what: &'static str, path: &Path) -> Result<(), LayoutError> {
    let text = path.to_string_lossy().into_owned();
    if !path.is_absolute() {
        return Err(LayoutError::NotAbsolute { what, path: text });
    }
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(LayoutError::TooLong {
            what,
            path: text,
            len,
        });
    }
    Ok(())
}

impl Layout {
    /// The layout of a container whose directory is `dir` here and `qemu_dir` in `compute`.
    pub fn in_dirs(dir: &Path, qemu_dir: &Path) -> Result<Layout, LayoutError> {
        let hook_socket = dir.join(HOOK_SOCKET);
        let sidecar_socket = dir.join(SIDECAR_SOCKET);
        let qemu = qemu_dir.join(SIDECAR_SOCKET);
        check_socket("the hook socket", &hook_socket)?;
        check_socket("the sidecar socket", &sidecar_socket)?;
        check_socket("the sidecar socket as QEMU sees it", &qemu)?;
        Ok(Layout {
            hook_socket,
            sidecar_socket,
            qemu_socket: qemu.to_string_lossy().into_owned(),
        })
    }

    /// The defaults of `kind`: the plugin `name`, or the legacy sidecar container `name`.
    pub fn default_dirs(kind: Kind, name: Option<&str>) -> Result<(PathBuf, PathBuf), LayoutError> {
        match kind {
            Kind::Plugin => {
                let name = name.unwrap_or("coco-sidecar");
                check_name(name)?;
                let dir = Path::new(PLUGIN_ROOT).join(name);
                Ok((dir.clone(), dir))
            }
            Kind::Legacy => {
                let name = name.ok_or(LayoutError::NoContainerName)?;
                check_name(name)?;
                Ok((PathBuf::from(HOOKS_ROOT), Path::new(HOOKS_ROOT).join(name)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(kind: Kind, name: Option<&str>) -> Result<Layout, LayoutError> {
        let (dir, qemu_dir) = Layout::default_dirs(kind, name)?;
        Layout::in_dirs(&dir, &qemu_dir)
    }

    #[test]
    fn plugin_paths_are_the_same_in_both_containers_and_pass_kubevirts_rules() {
        let l = layout(Kind::Plugin, Some("coco-sidecar")).expect("layout");
        assert_eq!(
            l.hook_socket,
            Path::new("/var/run/kubevirt-plugin/coco-sidecar/coco-hook.sock")
        );
        assert_eq!(
            l.qemu_socket,
            "/var/run/kubevirt-plugin/coco-sidecar/coco/sidecar.sock"
        );
        assert_eq!(l.sidecar_socket, Path::new(&l.qemu_socket));
        // KubeVirt's admission rules for a Plugin's socketPath
        let hook = l.hook_socket.to_str().expect("utf-8");
        assert!(hook.starts_with("/var/run/kubevirt-plugin/coco-sidecar/"));
        assert!(hook.ends_with(".sock"));
        assert!(hook.len() <= 108);
    }

    #[test]
    fn legacy_paths_differ_by_the_subpath_and_nest_the_sidecar_socket() {
        let l = layout(Kind::Legacy, Some("hook-sidecar-0")).expect("layout");
        assert_eq!(
            l.hook_socket,
            Path::new("/var/run/kubevirt-hooks/coco-hook.sock")
        );
        assert_eq!(
            l.sidecar_socket,
            Path::new("/var/run/kubevirt-hooks/coco/sidecar.sock")
        );
        assert_eq!(
            l.qemu_socket,
            "/var/run/kubevirt-hooks/hook-sidecar-0/coco/sidecar.sock"
        );
        // virt-launcher calls Info on the files of the container's directory: only the hook
        assert_eq!(l.hook_socket.parent(), Some(Path::new(HOOKS_ROOT)));
        assert_ne!(l.sidecar_socket.parent(), Some(Path::new(HOOKS_ROOT)));
        assert_eq!(
            layout(Kind::Legacy, None),
            Err(LayoutError::NoContainerName)
        );
    }

    #[test]
    fn names_are_dns_labels_that_keep_paths_within_107_bytes() {
        let longest = "a".repeat(MAX_NAME);
        let l = layout(Kind::Plugin, Some(&longest)).expect("63 bytes fit");
        assert_eq!(l.qemu_socket.len(), 106);
        for bad in [
            "a".repeat(MAX_NAME + 1),
            String::new(),
            "Coco".into(),
            "-coco".into(),
            "coco-".into(),
            "../x".into(),
            "a/b".into(),
            "a.b".into(),
        ] {
            assert_eq!(
                layout(Kind::Plugin, Some(&bad)),
                Err(LayoutError::Name(bad.clone())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn overridden_directories_are_checked_for_length_and_absoluteness() {
        let long = Path::new("/").join("d".repeat(90));
        let err = Layout::in_dirs(Path::new("/tmp/x"), &long).expect_err("too long");
        assert!(
            matches!(err, LayoutError::TooLong { len: 109, .. }),
            "{err}"
        );
        let l = Layout::in_dirs(Path::new("/tmp/x"), &Path::new("/").join("d".repeat(88)))
            .expect("107 bytes fit");
        assert_eq!(l.qemu_socket.len(), 107);
        assert!(matches!(
            Layout::in_dirs(Path::new("rel"), Path::new("/q")),
            Err(LayoutError::NotAbsolute { .. })
        ));
    }
}
