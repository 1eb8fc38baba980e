//! Everything that crosses a coco-sidecar boundary, and nothing else.
//!
//! - [`wire`]: the channel's message format (vhost-user framing, payloads, feature bits,
//!   limits), with validating encode/decode. `docs/protocol.md` is the normative text; this
//!   module follows it.
//! - [`exit`]: the two KVM exit records the channel carries verbatim.
//! - [`table`]: the GHCB certificate table (parse, validate, build).
//! - [`transport`]: sending and receiving one framed message with file descriptors.
//! - [`client`]: a blocking frontend (VMM side) client.

#![deny(missing_docs)]

pub mod client;
pub mod exit;
mod le;
pub mod table;
pub mod transport;
pub mod wire;

pub use client::{CertsReply, Frontend, FrontendError, MemoryRegion};
pub use exit::{Abi, CertsRequest, CertsRet};
pub use table::{CertEntry, CertKind, Table, TableError};
