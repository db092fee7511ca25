//! End-to-end tests: real `swarm` processes on loopback.

mod bad_input;
mod faults;
mod harness;
mod lifecycle;
mod raft_cluster;
mod replication;
