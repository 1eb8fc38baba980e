use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use coco_kubevirt::container::{self, RunConfig, QEMU_UID, SOCKET_MODE};
use coco_kubevirt::domain;
use coco_kubevirt::grpc::{self, Hook};
use coco_kubevirt::layout::{Kind, Layout};
use coco_sidecar::listen::{self, Listen, Listener};

/// KubeVirt domain hook and supervisor that give SEV-SNP VMs their per-VM coco-sidecar.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The container's entry point: bind both sockets, run and supervise coco-sidecar and
    /// the hook server on them until SIGTERM.
    Run(RunArgs),
    /// Serve the hook over gRPC (Plugins and legacy APIs); `run` starts it.
    Hook(HookArgs),
    /// Print what the hook makes of a domain for a VMI (JSON), as virt-launcher would get it.
    Mutate(MutateArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayoutKind {
    /// A Plugin resource's sidecar (KubeVirt 1.9, gate Plugins).
    Plugin,
    /// A hooks.kubevirt.io/hookSidecars entry (KubeVirt 1.7, 1.8; gate Sidecar).
    Legacy,
}

#[derive(Debug, Args)]
struct LayoutArgs {
    /// Which KubeVirt hook mechanism runs this container.
    #[arg(long, value_enum, default_value = "plugin")]
    layout: LayoutKind,
    /// The Plugin resource's name (plugin layout): sockets under /var/run/kubevirt-plugin/NAME.
    #[arg(long, default_value = "coco-sidecar")]
    plugin: String,
    /// This hook sidecar container's name (legacy layout; default: $CONTAINER_NAME, which
    /// KubeVirt sets).
    #[arg(long)]
    container_name: Option<String>,
    /// This container's socket directory, instead of the layout's.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The same directory as QEMU's container sees it (default: the layout's, or --dir).
    #[arg(long)]
    qemu_dir: Option<PathBuf>,
}

impl TryFrom<&LayoutArgs> for Layout {
    type Error = String;

    fn try_from(a: &LayoutArgs) -> Result<Layout, String> {
        let container = a
            .container_name
            .clone()
            .or_else(|| std::env::var("CONTAINER_NAME").ok());
        let (kind, name) = match a.layout {
            LayoutKind::Plugin => (Kind::Plugin, Some(a.plugin.as_str())),
            LayoutKind::Legacy => (Kind::Legacy, container.as_deref()),
        };
        let (dir, qemu_dir) = match (&a.dir, &a.qemu_dir) {
            (Some(d), Some(q)) => (d.clone(), q.clone()),
            (Some(d), None) => (d.clone(), d.clone()),
            (None, q) => {
                let (d, default_q) = Layout::default_dirs(kind, name).map_err(|e| e.to_string())?;
                (d, q.clone().unwrap_or(default_q))
            }
        };
        Layout::in_dirs(&dir, &qemu_dir).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    layout: LayoutArgs,
    /// The certificate blob coco-sidecar serves.
    #[arg(long)]
    certs: PathBuf,
    /// The coco-sidecar executable.
    #[arg(long, default_value = "/coco-sidecar")]
    sidecar: PathBuf,
    /// Peer uids coco-sidecar serves besides its own (repeatable; default QEMU's, 107).
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Mode of both sockets (octal).
    #[arg(long, value_parser = parse_mode, default_value = "0660")]
    socket_mode: u32,
    /// More arguments for `coco-sidecar serve`, after `--`.
    #[arg(last = true)]
    sidecar_args: Vec<OsString>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| m & !0o777 == 0)
        .ok_or_else(|| format!("{s} is not a permission mode (octal, 0 to 0777)"))
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = String;

    fn try_from(a: RunArgs) -> Result<RunConfig, String> {
        let layout = Layout::try_from(&a.layout)?;
        let hook = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let allow_uids = if a.allow_uids.is_empty() {
            vec![QEMU_UID]
        } else {
            a.allow_uids
        };
        Ok(RunConfig {
            layout,
            certs: a.certs,
            sidecar: a.sidecar,
            hook,
            allow_uids,
            socket_mode: a.socket_mode,
            sidecar_args: a.sidecar_args,
        })
    }
}

#[derive(Debug, Args)]
struct HookArgs {
    /// Serve on this inherited listening socket.
    #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
    fd: Option<i32>,
    /// Create the listening socket here (mode 0660).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// coco-sidecar's socket as QEMU's container sees it.
    #[arg(long)]
    qemu_socket: String,
}

#[derive(Debug, Args)]
struct MutateArgs {
    #[command(flatten)]
    layout: LayoutArgs,
    /// The VirtualMachineInstance as JSON.
    #[arg(long)]
    vmi: PathBuf,
    /// The libvirt domain XML.
    #[arg(long)]
    domain: PathBuf,
}

fn hook(a: HookArgs) -> Result<(), String> {
    let listen = match (a.fd, a.socket) {
        (Some(fd), _) => Listen::Inherited(listen::inherit(fd, "--fd").map_err(|e| e.to_string())?),
        (None, Some(path)) => Listen::Path(path),
        (None, None) => return Err("--fd or --socket is required".into()),
    };
    let Listener { listener, owned } =
        Listener::open(&listen, SOCKET_MODE).map_err(|e| e.to_string())?;
    let result = grpc::serve(listener, Hook::new(a.qemu_socket));
    if let Some(p) = owned {
        p.remove();
    }
    result.map_err(|e| format!("hook server: {e}"))
}

fn mutate(a: MutateArgs) -> Result<(), String> {
    let layout = Layout::try_from(&a.layout)?;
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let vmi = read(&a.vmi)?;
    let dom = read(&a.domain)?;
    let out = domain::mutate(&vmi, &dom, &layout.qemu_socket).map_err(|e| e.to_string())?;
    std::io::stdout()
        .write_all(&out.into_domain(&dom))
        .map_err(|e| format!("stdout: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match cli.command {
        Command::Run(a) => {
            RunConfig::try_from(a).and_then(|c| container::run(c).map_err(|e| e.to_string()))
        }
        Command::Hook(a) => hook(a),
        Command::Mutate(a) => mutate(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coco-kubevirt-hook: {e}");
            ExitCode::FAILURE
        }
    }
}
