//! coco-sidecar: serves AMD SEV-SNP certificate tables to a VMM's guests over a
//! vhost-user-framed Unix socket. `main.rs` only parses arguments; everything else is here.

pub mod argpath;
pub mod blob;
pub mod certs;
pub mod cli_docs;
pub mod config;
pub mod demo;
pub mod eagain;
pub mod health;
pub mod lease;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod ofd;
pub mod rlimit;
pub mod seccomp;
pub mod server;
pub mod session;
pub mod slots;
pub mod tool;
pub mod waiters;
pub mod watch;

pub use config::{Config, MissingCerts};
pub use server::{Server, ServerError, Shutdown, ShutdownHandle};
