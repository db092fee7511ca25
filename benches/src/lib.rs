//! Helpers the benchmark binaries share.

pub mod inproc;
pub mod nemesis;
pub mod processes;
