//! Wire types: every message that crosses a process boundary between a worker, a
//! coordinator and an operator's client lives here, and nothing else does.
//!
//! * [`worker`]: the QUIC protocol between a worker and the coordinator (postcard frames).
//! * [`peer`]: the QUIC protocol between mesh peers (work stealing).
//! * [`api`]: the JSON bodies of the HTTP API, shared by the server and the `swarm` CLI.
//!
//! The protocol is versioned explicitly by [`PROTOCOL_VERSION`], carried in the worker's
//! `Hello`, and by the ALPN strings below; a peer speaking another version is refused
//! with a message that names both versions.

pub mod api;
pub mod peer;
pub mod worker;

/// Version of the worker ⇄ coordinator protocol. Bump on any incompatible change to [`worker`].
///
/// * 1: the first version.
/// * 2: workers may send `WorkerMsg::Draining` and report `FailureKind::Drained`, which
///   a version-1 coordinator cannot decode; the coordinator answers `Draining` with
///   `CoordinatorMsg::DrainAck`. Nothing else a coordinator sends changed.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest worker protocol a coordinator still serves: version 1 is version 2 without
/// the messages a version-1 worker never sends (and `DrainAck`, which only answers one of
/// them), so old workers keep working while the coordinators are upgraded first. A
/// coordinator answers `Welcome` with the worker's version.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Whether a peer speaking worker protocol `version` is served (coordinators) or linked
/// to (mesh peers, whose messages are the same in every supported version).
pub fn protocol_supported(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// ALPN for worker ⇄ coordinator connections.
pub const ALPN_WORKER: &[u8] = b"swarm-worker/1";
/// ALPN for coordinator ⇄ coordinator Raft RPC connections.
pub const ALPN_RAFT: &[u8] = b"swarm-raft/1";
/// ALPN for worker ⇄ worker mesh peer links.
pub const ALPN_PEER: &[u8] = b"swarm-peer/1";
/// ALPN for a member's link to its lead in a hierarchical swarm: the member speaks the
/// worker protocol, and the lead relays the stream to the coordinator on its own
/// connection.
pub const ALPN_RELAY: &[u8] = b"swarm-relay/1";

/// Task identifiers are assigned by the replicated state machine, in commit order.
pub type TaskId = u64;
