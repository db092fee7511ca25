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
/// * 3: `Welcome` and `Run` carry the leader's Raft term, which makes each execution's
///   id unique ([`worker::ExecutionId`]); a worker refuses a `Run` of a term older than
///   the newest it was welcomed in. Nothing a worker sends changed; a coordinator sends
///   older workers [`worker::legacy`] frames.
/// * 4: a session relayed by a lead proves the member's identity: the coordinator
///   answers its `Hello` with `CoordinatorMsg::Prove`, the member signs with its
///   certificate key (`WorkerMsg::Proof`). Direct sessions are unchanged; relayed
///   sessions of older members are refused.
/// * 5: the coordinator sends `CoordinatorMsg::Revoked` (the cluster's deny list of
///   certificate serials) after `Welcome` and whenever it changes; the worker refuses
///   those certificates from then on (a revoked coordinator, lead or mesh peer). Older
///   workers are never sent it; nothing a worker sends changed.
/// * 6: live output. The coordinator asks for an attempt's output with
///   `CoordinatorMsg::Watch` while someone watches the task; the worker answers with
///   `WorkerMsg::Output` chunks (what it holds of the attempt's output first, then each
///   piece as it is produced) until unwatched or the attempt ends. `TaskReport` carries the
///   attempt's log tail and, for LLM agents, the tokens used. Older workers are never sent
///   `Watch`; the coordinator reads their frames as [`worker::legacy::WorkerMsg`].
/// * 7: remote drain. The coordinator asks a worker to drain or resume with
///   `CoordinatorMsg::Drain { on }` (an operator's request); the worker states its remote
///   drain with `WorkerMsg::Drain { on }` when it changes and first on every session
///   while on. Both are variants appended to their enums, so the frames of protocol 6
///   read unchanged both ways; older workers are never sent `Drain`.
pub const PROTOCOL_VERSION: u32 = 7;

/// The first worker protocol that may be drained and resumed remotely
/// ([`worker::CoordinatorMsg::Drain`]).
pub const DRAIN_PROTOCOL: u32 = 7;

/// The first worker protocol that streams output ([`worker::CoordinatorMsg::Watch`]) and
/// reports log tails and usage.
pub const OUTPUT_PROTOCOL: u32 = 6;

/// The first worker protocol that is sent the deny list ([`worker::CoordinatorMsg::Revoked`]).
pub const REVOCATIONS_PROTOCOL: u32 = 5;

/// The oldest worker protocol a coordinator still serves: what an older worker sends is
/// a subset of what a current one sends, and the coordinator writes it the frames of its
/// version, so old workers keep working while the coordinators are upgraded first. A
/// coordinator answers `Welcome` with the worker's version.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol a mesh peer links to: from protocol 3 a stolen assignment carries
/// its term, so earlier peers' `Given` frames differ.
pub const MIN_PEER_PROTOCOL_VERSION: u32 = 3;

/// Whether a worker speaking protocol `version` is served by a coordinator.
pub fn protocol_supported(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Whether a mesh peer speaking protocol `version` is linked to.
pub fn peer_protocol_supported(version: u32) -> bool {
    (MIN_PEER_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
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
