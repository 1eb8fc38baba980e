//! The `serve` process around the server: the blob judged for the operator at start and after
//! every change ([`monitor`]), the descriptor limit ([`rlimit`]) and the seccomp filter it runs
//! under ([`seccomp`]).

pub mod monitor;
pub mod rlimit;
pub mod seccomp;
