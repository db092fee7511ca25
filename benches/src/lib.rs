//! Helpers the benchmark binaries share.

pub mod nemesis;
pub mod processes;
