//! The domain hook served over gRPC on a Unix socket, for both of KubeVirt's hook APIs at once:
//! the Plugins API (`DomainHookService.MutateDomain`) and the legacy hook sidecars' (`Info`
//! and `v1alpha3` `Callbacks.OnDefineDomain`). Each call is [`crate::domain::mutate`]; this
//! module only maps requests, answers and errors.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use log::{info, warn};
use serde_json::Value;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::domain::{self, Outcome};

/// Code generated from proto/ (KubeVirt's published hook APIs).
pub mod pb {
    /// `kubevirt.hooks.info`
    pub mod info {
        tonic::include_proto!("kubevirt.hooks.info");
    }
    /// `kubevirt.hooks.v1alpha3`
    pub mod v1alpha3 {
        tonic::include_proto!("kubevirt.hooks.v1alpha3");
    }
    /// `kubevirt.hooks.plugins.v1alpha1`
    pub mod plugins {
        tonic::include_proto!("kubevirt.hooks.plugins.v1alpha1");
    }
}

use pb::info::info_server::{Info, InfoServer};
use pb::info::{HookPoint, InfoParams, InfoResult};
use pb::plugins::domain_hook_service_server::{DomainHookService, DomainHookServiceServer};
use pb::plugins::{MutateDomainRequest, MutateDomainResponse};
use pb::v1alpha3::callbacks_server::{Callbacks, CallbacksServer};
use pb::v1alpha3::{
    OnDefineDomainParams, OnDefineDomainResult, PreCloudInitIsoParams, PreCloudInitIsoResult,
    ShutdownParams, ShutdownResult,
};

/// The name `Info` reports.
pub const HOOK_NAME: &str = "coco-sidecar";
/// The legacy hook point this hook subscribes to.
pub const ON_DEFINE_DOMAIN: &str = "OnDefineDomain";
/// The legacy callbacks version it implements.
pub const CALLBACKS_VERSION: &str = "v1alpha3";
/// The only domain type virt-launcher sends.
pub const DOMAIN_TYPE: &str = "libvirt";
/// Longest a call may take; virt-launcher waits 30 s (Plugins) or a minute (legacy).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The hook's services; `qemu_socket` is coco-sidecar's socket as QEMU's container sees it.
#[derive(Debug, Clone)]
pub struct Hook {
    qemu_socket: String,
}

impl Hook {
    /// A hook whose domains name `qemu_socket`.
    pub fn new(qemu_socket: String) -> Hook {
        Hook { qemu_socket }
    }

    /// One call: the domain to return, or why not (as `InvalidArgument`: the request is bad).
    fn mutate(&self, call: &str, vmi: &[u8], domain: &[u8]) -> Result<Vec<u8>, Status> {
        let who = vmi_name(vmi);
        match domain::mutate(vmi, domain, &self.qemu_socket) {
            Ok(Outcome::NotSnp) => {
                info!("{call} for {who}: not an SEV-SNP VMI; domain unchanged");
                Ok(domain.to_vec())
            }
            Ok(Outcome::Mutated(xml)) => {
                info!(
                    "{call} for {who}: shared memfd guest RAM and the coco-sidecar object for {}",
                    self.qemu_socket
                );
                Ok(xml.into_bytes())
            }
            Err(e) => {
                warn!("{call} for {who}: refused: {e}");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

/// `namespace/name` of a VMI for logs, whatever it holds.
fn vmi_name(vmi: &[u8]) -> String {
    let v: Value = serde_json::from_slice(vmi).unwrap_or(Value::Null);
    let field = |f: &str| {
        v.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .chars()
            .filter(|c| !c.is_control())
            .take(253)
            .collect::<String>()
    };
    format!("VMI {}/{}", field("namespace"), field("name"))
}

#[tonic::async_trait]
impl Info for Hook {
    async fn info(&self, _: Request<InfoParams>) -> Result<Response<InfoResult>, Status> {
        Ok(Response::new(InfoResult {
            name: HOOK_NAME.to_owned(),
            hook_points: vec![HookPoint {
                name: ON_DEFINE_DOMAIN.to_owned(),
                priority: 0,
            }],
            versions: vec![CALLBACKS_VERSION.to_owned()],
        }))
    }
}

#[tonic::async_trait]
impl Callbacks for Hook {
    async fn on_define_domain(
        &self,
        request: Request<OnDefineDomainParams>,
    ) -> Result<Response<OnDefineDomainResult>, Status> {
        let p = request.into_inner();
        let domain_xml = self.mutate("OnDefineDomain", &p.vmi, &p.domain_xml)?;
        Ok(Response::new(OnDefineDomainResult { domain_xml }))
    }

    /// Not a hook point this hook subscribes to; answered with the data unchanged.
    async fn pre_cloud_init_iso(
        &self,
        request: Request<PreCloudInitIsoParams>,
    ) -> Result<Response<PreCloudInitIsoResult>, Status> {
        let p = request.into_inner();
        Ok(Response::new(PreCloudInitIsoResult {
            cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
            cloud_init_data: p.cloud_init_data,
        }))
    }

    /// Not subscribed either: the supervisor stops coco-sidecar when the pod stops.
    async fn shutdown(
        &self,
        _: Request<ShutdownParams>,
    ) -> Result<Response<ShutdownResult>, Status> {
        Ok(Response::new(ShutdownResult {}))
    }
}

#[tonic::async_trait]
impl DomainHookService for Hook {
    async fn mutate_domain(
        &self,
        request: Request<MutateDomainRequest>,
    ) -> Result<Response<MutateDomainResponse>, Status> {
        let r = request.into_inner();
        if r.domain_type != DOMAIN_TYPE {
            return Err(Status::invalid_argument(format!(
                "domain_type {:?} is not {DOMAIN_TYPE:?}",
                r.domain_type
            )));
        }
        // The same domain whatever the invocation context: QEMU refuses to migrate a VM that
        // has a coco-sidecar object, and KubeVirt does not live-migrate SEV-SNP VMs.
        let context = r
            .sidecar_context
            .map(|c| c.invocation_context)
            .unwrap_or_default();
        let call = format!("MutateDomain ({})", context.escape_debug());
        let domain = self.mutate(&call, &r.vmi, &r.domain)?;
        Ok(Response::new(MutateDomainResponse { domain }))
    }
}

/// Serves `hook` on `listener` until SIGTERM or SIGINT.
pub fn serve(listener: UnixListener, hook: Hook) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        tonic::transport::Server::builder()
            .timeout(CALL_TIMEOUT)
            .add_service(InfoServer::new(hook.clone()))
            .add_service(CallbacksServer::new(hook.clone()))
            .add_service(DomainHookServiceServer::new(hook))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
            .await
            .map_err(std::io::Error::other)
    })
}
