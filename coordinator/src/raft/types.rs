//! The openraft type configuration of the coordinator cluster.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResponse};

openraft::declare_raft_types!(
    /// The Raft type configuration: log payloads are task-table [`Command`]s, node ids are
    /// `u64`, nodes carry their addresses, and snapshots are in-memory byte buffers.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft node id.
pub type NodeId = u64;

/// A log entry of the coordinator's Raft log.
pub type Entry = openraft::Entry<TypeConfig>;

/// A log id of the coordinator's Raft log.
pub type LogId = openraft::LogId<NodeId>;

/// Where a coordinator can be reached; stored in the Raft membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// `host:port` of the QUIC endpoint that serves Raft RPCs (ALPN `swarm-raft/1`).
    pub raft_addr: String,
    /// `host:port` of the HTTP API.
    pub api_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}
