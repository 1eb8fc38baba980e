//! coco-sidecar: serves AMD SEV-SNP certificate tables to a VMM's guests over a
//! vhost-user-framed Unix socket. `main.rs` only runs [`args`]' commands and maps their
//! failures to exit statuses; everything else is here.
//!
//! Modules, each depending only on those below it:
//!
//! | module | holds |
//! |---|---|
//! | [`args`] | the command line (clap) and its conversion into each command's settings |
//! | [`daemon`] | the `serve` process: start-up, the operator's blob monitor, descriptor limit, seccomp filter |
//! | [`demo`], [`tool`] | the demo flow; the `blob` subcommands |
//! | [`metrics`] | counters, their Prometheus rendering, the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) |
//! | [`health`] | the `health` probe (also `/readyz`) |
//! | [`serve`] | the accept loop and connections (transport glue), and a connection's protocol logic without socket I/O: [`serve::session`], [`serve::answer`], [`serve::memory`], [`serve::lease`] |
//! | [`blob`] | the certificate blob: store and cache, inotify watch, OFD locks, waiting updaters |
//! | [`config`] | validated settings and their defaults |
//! | [`listen`] | the listening socket (a path, an inherited descriptor, systemd) and who may connect; shared with the KubeVirt hook |
//! | [`histogram`], [`logging`], [`argpath`], [`cli_docs`] | latency histograms, rate-limited logs, explained path arguments, man pages and completions |
//! | [`sys`] | the few raw system calls that neither std nor `rustix` offers safely |

pub mod argpath;
pub mod args;
pub mod blob;
pub mod cli_docs;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod health;
pub mod histogram;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod serve;
pub mod sys;
pub mod tool;

pub use config::{Config, MissingCerts};
pub use serve::{Server, ServerError, Shutdown, ShutdownHandle};
