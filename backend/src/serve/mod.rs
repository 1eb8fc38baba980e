//! Serving VMMs: the socket, the connections, and what each message does.
//!
//! Transport glue, with socket I/O (the listening socket itself comes from [`crate::listen`]):
//! - [`server`]: the accept loop, one thread per connection, an orderly stop;
//! - [`shutdown`]: the signals that stop the sidecar and those it ignores;
//! - [`connection`]: one connection's receive, handle, reply loop and its time limits;
//! - [`slots`]: which connections may hold memory, and which one gives way to a newcomer.
//!
//! Protocol logic, free of socket I/O (driven message by message in tests and fuzzing):
//! - [`session`]: one connection's protocol state and message handling;
//! - [`answer`]: answering one certificate-request record;
//! - [`memory`]: one connection's guest RAM, region checks and writes that cannot fault;
//! - [`lease`]: locks held from the write into the guest until COCO_DONE;
//! - [`eagain`]: one connection's run of EAGAIN and its bound (`--max-eagain-ms`).

pub mod answer;
pub mod connection;
pub mod eagain;
pub mod lease;
pub mod memory;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod slots;

pub use server::{Server, ServerError};
pub use shutdown::{Shutdown, ShutdownHandle};
