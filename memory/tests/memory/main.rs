//! Integration tests of swarm-memory, one binary with a module per area.

mod bank;
mod codec_roundtrip;
mod common;
mod http;
mod vector;
