//! The swarm coordinator: a Raft-replicated task queue that dispatches work to workers
//! over mutual-TLS QUIC and serves an HTTP API.
//!
//! Layers, top-down:
//! * [`start`] wires one coordinator process together and returns a [`CoordinatorHandle`];
//! * [`api`] (HTTP) and [`worker_session`] (QUIC) turn requests and frames into ops;
//! * [`node`] runs the loops: applied-entry events, dispatch, gauges;
//! * [`handoff`] hands leadership to a caught-up voter when a leader stops;
//! * [`proposer`] group-commits ops into Raft entries;
//! * [`raft`] is the openraft plumbing: durable log (redb), state machine store, network;
//! * [`state`] (the replicated [`state::TaskTable`]) and [`scheduler`] are pure logic with
//!   no I/O: everything that decides is testable without sockets or clocks.

pub mod api;
pub mod backup;
pub mod cluster;
pub mod handoff;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod proposer;
pub mod raft;
pub mod scheduler;
mod server;
pub mod state;
pub mod swarms;
mod worker_session;

pub use node::{CoordinatorConfig, Limits, Node, TaskDefaults};
pub use server::{coordinator_server_config, start, start_with, CoordinatorHandle, Parts};
