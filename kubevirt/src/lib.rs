//! coco-sidecar for KubeVirt: the domain hook that gives an SEV-SNP VM's QEMU its per-VM
//! sidecar ([`domain`]), served over KubeVirt's two hook APIs ([`grpc`]), with the socket
//! paths of both hook layouts ([`layout`]), and the supervisor that keeps coco-sidecar and the
//! hook running in the `virt-launcher` pod ([`supervise`], [`container`]).

pub mod container;
pub mod domain;
pub mod grpc;
pub mod layout;
pub mod supervise;
