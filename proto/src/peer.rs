//! Worker ⇄ worker messages on a mesh peer link: length-delimited codec (postcard) frames on one
//! bidirectional QUIC stream, opened by the dialing worker, mutual TLS with worker
//! certificates on both ends (ALPN [`crate::ALPN_PEER`]).
//!
//! A link carries load gossip both ways and work steals: an idle worker asks a peer with
//! queued attempts for some of them; the peer hands over attempts it has accepted but not
//! started, and forgets them. The thief then tells the coordinator ([`Stole`]).
//!
//! [`Stole`]: crate::worker::WorkerMsg::Stole

use serde::{Deserialize, Serialize};

use crate::worker::TaskAssignment;

/// Messages on a peer link (both directions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// First frame of each side: who is speaking, and its [`crate::PROTOCOL_VERSION`].
    Hello { protocol: u32, worker_id: String },
    /// The sender's load, sent when it changes and periodically as a keep-alive.
    Load {
        running: u32,
        queued: u32,
        slots: u32,
    },
    /// Ask for up to `max` queued attempts; answered by exactly one `Given`.
    Steal { request_id: u64, max: u32 },
    /// The answer to `Steal`: attempts the sender gave up (possibly none).
    Given {
        request_id: u64,
        assignments: Vec<TaskAssignment>,
    },
}
