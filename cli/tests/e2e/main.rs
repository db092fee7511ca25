//! End-to-end tests: real `swarm` processes on loopback.

mod access;
mod approvals;
mod backup;
mod bad_input;
mod callbacks;
mod drain;
mod embedder;
mod events;
mod faults;
mod graphs;
mod harness;
mod identity;
mod lifecycle;
mod limits;
mod live;
mod memory;
mod python_client;
mod raft_cluster;
mod redrive;
mod replication;
mod scale;
mod schedules;
mod task_list;
mod topology;
