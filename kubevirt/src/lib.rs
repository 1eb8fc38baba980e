//! coco-sidecar for KubeVirt: the domain hook that gives an SEV-SNP VM's QEMU its per-VM
//! sidecar, served over KubeVirt's two hook APIs, and the supervisor that runs the sidecar and
//! the hook in the `virt-launcher` pod.

pub mod domain;
