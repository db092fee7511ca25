//! The swarm coordinator: a Raft-replicated task queue that dispatches work to workers
//! over mutual-TLS QUIC and serves an HTTP API.
//!
//! Layers, top-down:
//! * [`start`] wires one coordinator process together and returns a [`CoordinatorHandle`];
//! * [`http`] (the HTTP API) and [`worker_session`] (QUIC) turn requests and frames into
//!   calls of the domain modules and answers; `http` is the only module that knows the
//!   HTTP server framework and status codes, and nothing depends on it but [`start`];
//! * the domain modules, which return their own errors and know nothing of the HTTP API:
//!   [`tasks`] (submit checks and admission, reads, cancel), [`approvals`] (approve,
//!   reject, and the leader's loop that expires approvals past their deadline), [`status`] (workers and the
//!   status view), [`cluster`] (node reports, cluster views, membership, joining, the
//!   [`cluster::PeerHttp`] client), [`memory`] (vector memory and the ReasoningBank),
//!   [`swarms`] (definitions, layouts, placement), [`schedules`] (schedules and the
//!   leader's loop that fires their ticks), [`backup`] (backups and restores),
//!   [`workers`] (draining and resuming a worker remotely), and [`commit`] (the commit
//!   and read-barrier failures they share);
//! * [`node`] runs the loops: applied-entry events, dispatch, gauges;
//! * [`handoff`] hands leadership to a caught-up voter when a leader stops;
//! * [`proposer`] group-commits ops into Raft entries;
//! * [`raft`] is the openraft plumbing: durable log (redb), state machine store, network;
//! * [`state`] (the replicated [`state::TaskTable`]) and [`scheduler`] are pure logic with
//!   no I/O: everything that decides is testable without sockets or clocks.

pub mod access;
pub mod admission;
pub mod approvals;
pub mod backup;
pub mod callbacks;
pub mod cluster;
pub mod commit;
pub mod events;
pub mod flow_limits;
pub mod handoff;
pub mod http;
pub mod limits;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod proposer;
pub mod raft;
pub mod scheduler;
pub mod schedules;
mod server;
pub mod state;
pub mod status;
pub mod swarms;
pub mod tasks;
mod worker_session;
pub mod workers;

pub use node::{ApiEdges, CoordinatorConfig, Limits, Node, TaskDefaults};
pub use server::{coordinator_server_config, start, start_with, CoordinatorHandle, Parts};
