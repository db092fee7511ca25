//! Helpers the benchmark binaries share.

pub mod processes;
pub mod nemesis;
