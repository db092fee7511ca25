//! Raft plumbing: type config, durable log store, state machine store, network.
//!
//! * [`types`]: the openraft [`TypeConfig`] and the node address type [`NodeAddr`].
//! * [`log_store`]: [`RedbLogStore`], the durable log (redb, fsync per group commit).
//! * [`sm_store`]: [`StateMachineStore`], the replica (task table and memory store) and
//!   its checkpoints; [`checkpoint`]: [`checkpoint::CheckpointStore`], the state at the
//!   last checkpoint in redb; [`dump`]: the streamed format of snapshots and backups;
//!   [`snapshot_data`]: snapshot bytes as files.
//! * [`network`]: Raft RPCs over mutual-TLS QUIC ([`QuicRaftNetwork`],
//!   [`serve_raft_connection`]).

pub mod checkpoint;
pub mod dump;
pub mod log_store;
pub mod network;
pub mod sm_store;
pub mod snapshot_data;
pub mod types;

pub use log_store::{RedbLogReader, RedbLogStore};
pub use network::{serve_raft_connection, QuicRaftClient, QuicRaftNetwork};
pub use sm_store::{Arrivals, StateMachineStore, TableGuard, TableHandle};
pub use types::{seed_thread_rng, NodeAddr, NodeId, SwarmRuntime, TypeConfig};

/// A Raft node of the coordinator cluster.
pub type Raft = openraft::Raft<TypeConfig>;

/// Heartbeat interval. Elections start after 3–6 missed heartbeats, so a dead leader is
/// replaced well within the 2 s failover target.
pub const HEARTBEAT_MS: u64 = 100;
/// Lower bound of the randomized election timeout.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 300;
/// Upper bound of the randomized election timeout.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// Build a snapshot after this many applied entries (~6,700 tasks at 3 entries per task).
pub const SNAPSHOT_EVERY_LOGS: u64 = 20_000;
/// ...or after this many bytes of log or of changes held in memory since the last one
/// (group commit packs thousands of ops into an entry, so entries alone do not bound
/// either).
pub const SNAPSHOT_EVERY_BYTES: u64 = 64 << 20;

/// The openraft configuration of a coordinator node.
///
/// The values are constants known to pass [`openraft::Config::validate`] (a unit test checks
/// it); `Raft::new` is still the place where a bad config would be reported.
pub fn raft_config(cluster_name: &str, snapshot_every: u64) -> openraft::Config {
    let snapshot_every = snapshot_every.max(1);
    openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        // A snapshot travels in chunks; the last one's answer waits for the follower to
        // build its store from the whole snapshot, which takes minutes at tens of
        // millions of tasks.
        install_snapshot_timeout: 600_000,
        snapshot_max_chunk_size: crate::limits::SNAPSHOT_CHUNK as u64,
        // Bounds one AppendEntries message (and one follower fsync batch).
        max_payload_entries: 512,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        // Must exceed the snapshot interval, or a snapshot may not cure the lag.
        replication_lag_threshold: 2 * snapshot_every,
        // Followers slightly behind catch up from the log instead of a whole snapshot.
        max_in_snapshot_log_to_keep: 1_000.min(snapshot_every / 2),
        // Purge in large steps: each purge is a write transaction with an fsync.
        purge_batch_size: 1_024.min(snapshot_every),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn raft_config_is_valid() {
        let config = super::raft_config("test", super::SNAPSHOT_EVERY_LOGS)
            .validate()
            .expect("valid config");
        assert!(config.election_timeout_min > 2 * config.heartbeat_interval);
        assert!(config.election_timeout_max < 2_000);
    }
}
