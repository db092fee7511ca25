//! Worker ⇄ coordinator messages, carried as length-delimited codec (postcard) frames on one
//! bidirectional QUIC stream per worker connection.
//!
//! Only [`WorkerMsg::Hello`] and [`WorkerMsg::Heartbeat`] may be sent as 0-RTT early
//! data: both are idempotent (replaying them changes nothing the coordinator would not
//! also do for the original). Everything else waits for the handshake to complete.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::TaskId;

/// One execution attempt of one task. Attempts are numbered from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttemptRef {
    pub task_id: TaskId,
    pub attempt: u32,
}

/// One execution: attempt `attempt` as dispatched by the leader of Raft term `term`.
///
/// A leader sends `Run` before the attempt's `Start` commits, so after a failover a new
/// leader may dispatch the same attempt number again while an earlier leader's `Run` of
/// it still runs somewhere; the term tells the two executions apart. Only the leader of
/// `term` dispatches executions of that term, and it dispatches each attempt once, so an
/// execution id is unique across the cluster's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutionId {
    pub attempt: AttemptRef,
    pub term: u64,
}

impl std::fmt::Display for ExecutionId {
    /// `<task>.<attempt>.<term>`, as agents see it in `SWARM_EXECUTION_ID`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.attempt.task_id, self.attempt.attempt, self.term
        )
    }
}

/// First message of every worker connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The worker's [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Stable name of the worker (survives reconnects).
    pub worker_id: String,
    /// How many tasks the worker runs at once.
    pub slots: u32,
    /// Labels a task may require (`k=v`).
    pub labels: BTreeMap<String, String>,
    /// Agents this worker can run.
    pub agents: Vec<String>,
    /// Attempts this worker still holds (non-empty after a reconnect): running, queued
    /// locally for a slot, or finished with the report not yet acknowledged. An attempt
    /// the coordinator placed here that is missing from this list is treated as lost.
    pub running: Vec<AttemptRef>,
    /// Where this worker accepts peer links (`HOST:PORT`, QUIC with ALPN
    /// [`crate::ALPN_PEER`]); `None` when it takes no part in a mesh.
    pub peer_addr: Option<String>,
}

/// Messages a worker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    Hello(Hello),
    /// Liveness, and the attempts the worker is running right now.
    Heartbeat {
        running: Vec<AttemptRef>,
    },
    /// An attempt ended. Re-sent after a reconnect until the coordinator acks it.
    Finished(TaskReport),
    /// Retrieve up to `k` ReasoningBank patterns for `query` (answered by `Retrieved`).
    Retrieve {
        request_id: u64,
        query: String,
        k: u32,
    },
    /// This worker took `attempt` over from peer `from` (a mesh steal) and runs it now.
    /// The coordinator records the move, or answers `Cancel` when the attempt is no
    /// longer `from`'s to give.
    Stole {
        attempt: AttemptRef,
        from: String,
    },
    /// The peer link to `peer` was lost (idle timeout or refused reconnects).
    PeerLost {
        peer: String,
    },
    /// The worker is draining (it is being stopped): place nothing new on it. It finishes
    /// and reports what it runs, hands back what it has not started (`Finished` with
    /// [`FailureKind::Drained`]) and hands back any `Run` that still arrives. Sent first
    /// on every session from the moment the drain begins, since a new session starts
    /// with a clean slate on the coordinator. Answered by [`CoordinatorMsg::DrainAck`].
    Draining,
    /// The answer to [`CoordinatorMsg::Prove`] (protocol 4): the worker's certificate
    /// chain and its signature over [`relay_proof_context`].
    Proof(IdentityProof),
    /// A piece of a watched attempt's output (protocol 6), sent while the coordinator
    /// watches it ([`CoordinatorMsg::Watch`]). Never blocks the agent: a piece that finds
    /// the session's queue full is dropped, and the next piece's `offset` shows the gap.
    Output(OutputChunk),
    /// The worker's remote drain (protocol 7), as asked by [`CoordinatorMsg::Drain`].
    /// `on: true`: it takes no new work (as for [`WorkerMsg::Draining`]: it hands back
    /// what it has not started and finishes what it runs; answered by
    /// [`CoordinatorMsg::DrainAck`]) but stays connected. `on: false`: it takes work
    /// again. Sent when it changes, and `on: true` first on every session while drained,
    /// as `Draining` is; a worker being stopped sends `Draining` instead, which wins.
    Drain {
        on: bool,
    },
}

/// Which of an attempt's output streams a piece comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    /// An `exec` agent's standard output (its result, also shown live).
    Stdout,
    /// An `exec` agent's standard error.
    Stderr,
    /// Text an `llm` agent's model streamed (tokens).
    Tokens,
    /// A piece of an `http` agent's response body.
    Body,
}

impl OutputStream {
    /// Stable lower-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
            OutputStream::Tokens => "tokens",
            OutputStream::Body => "body",
        }
    }
}

/// One piece of an attempt's output. All the streams of an attempt share one sequence of
/// bytes: `offset` is where this piece starts in it, so a receiver sees a gap (pieces it
/// never got) and drops a piece it has seen already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub attempt: AttemptRef,
    pub stream: OutputStream,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl OutputChunk {
    /// The offset just past this piece.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.data.len() as u64)
    }
}

/// The last bytes of an attempt's output (all streams in the order produced), kept by the
/// worker within its configured size and reported with the attempt's end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    /// Where `text` starts in the attempt's output: bytes before it were dropped.
    pub offset: u64,
    /// Pieces of the tail, oldest first, each with its stream.
    pub pieces: Vec<LogPiece>,
}

/// A run of consecutive output bytes from one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPiece {
    pub stream: OutputStream,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl LogTail {
    /// Bytes the tail holds.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.data.len()).sum()
    }

    /// Whether the tail holds nothing.
    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(|p| p.data.is_empty())
    }

    /// The offset just past the tail: the attempt's whole output length.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len() as u64)
    }
}

/// Tokens an `llm` attempt used, as the model's server counted them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The model that answered (as the server named it; else the one asked for).
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A signature by a worker's certificate key, proving who it is across a lead's relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityProof {
    /// The certificate chain, leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// TLS signature scheme code.
    pub scheme: u16,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What a relayed member signs to prove its identity: the coordinator's fresh nonce, the
/// lead relaying it and the id it claims, so the proof is good for this one session
/// through this one lead only.
pub fn relay_proof_context(nonce: &[u8], lead: &str, member: &str) -> Vec<u8> {
    let mut ctx = b"relay\0".to_vec();
    for part in [nonce, lead.as_bytes(), member.as_bytes()] {
        ctx.extend_from_slice(&(part.len() as u32).to_be_bytes());
        ctx.extend_from_slice(part);
    }
    ctx
}

/// The end of one attempt, as observed by the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub attempt: AttemptRef,
    pub outcome: Outcome,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// ReasoningBank pattern ids handed to the agent; the outcome is judged against them.
    pub patterns_used: Vec<String>,
    /// The last bytes of the attempt's output (protocol 6; empty for older workers).
    pub log: LogTail,
    /// Tokens used, for `llm` agents (protocol 6).
    pub usage: Option<Usage>,
}

/// A ReasoningBank pattern as handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternHit {
    pub id: String,
    pub title: String,
    pub description: String,
    pub content: String,
    /// `success` or `failure`: what the pattern was learnt from.
    pub outcome: String,
    /// Posterior mean of the pattern working, 0..1.
    pub confidence: f64,
    /// Retrieval score (similarity, recency and confidence combined).
    pub score: f64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The agent succeeded; `output` is its result (stdout for `exec` agents).
    Succeeded {
        /// Bytes encoded as one string, not a sequence of numbers: the same wire bytes,
        /// copied instead of visited one by one.
        #[serde(with = "serde_bytes")]
        output: Vec<u8>,
    },
    /// The agent failed; `message` is human-readable (stderr tail for `exec` agents).
    Failed { kind: FailureKind, message: String },
}

/// Why an attempt failed. [`FailureKind::retryable`] decides whether another attempt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The process exited with a non-zero status or was killed by a signal.
    Exit,
    /// The attempt ran past its timeout and was killed.
    Timeout,
    /// The attempt was cancelled on request.
    Cancelled,
    /// The worker has no agent of that name.
    UnknownAgent,
    /// The agent could not be started (missing binary, bad working dir, …).
    Spawn,
    /// The result exceeded the coordinator's result size limit.
    OutputTooLarge,
    /// The agent rejected its input (a built-in's payload did not parse).
    BadPayload,
    /// The worker is draining (it is being stopped): it handed the attempt back before
    /// starting it, or cut it short at its drain timeout. The task runs again elsewhere,
    /// and the attempt does not count against `max_attempts`.
    Drained,
}

impl FailureKind {
    /// Whether running the same task again could plausibly succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureKind::Exit | FailureKind::Timeout | FailureKind::Spawn
        )
    }

    /// Stable lower-case name used in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Exit => "exit",
            FailureKind::Timeout => "timeout",
            FailureKind::Cancelled => "cancelled",
            FailureKind::UnknownAgent => "unknown_agent",
            FailureKind::Spawn => "spawn",
            FailureKind::OutputTooLarge => "output_too_large",
            FailureKind::BadPayload => "bad_payload",
            FailureKind::Drained => "drained",
        }
    }
}

/// Messages the coordinator sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMsg {
    /// Reply to an accepted [`Hello`].
    Welcome {
        protocol: u32,
        /// How often the worker must send a heartbeat.
        heartbeat_interval_ms: u64,
        /// Largest task output the coordinator will store.
        max_output_bytes: u64,
        /// The Raft term this coordinator leads in (protocol 3). A worker refuses a `Run`
        /// of an older term than the newest it was welcomed in: only a deposed leader
        /// sends one. (Sent to older workers without it, see [`legacy`].)
        term: u64,
    },
    /// The coordinator refuses this worker; the connection closes after it.
    Rejected { code: String, message: String },
    /// Start an attempt.
    Run(TaskAssignment),
    /// Stop an attempt (kill its process group).
    Cancel(AttemptRef),
    /// The attempt's report is committed: the worker may forget it.
    Ack(AttemptRef),
    /// The answer to a `Retrieve`: the patterns, best first, or why there are none.
    Retrieved {
        request_id: u64,
        result: Result<Vec<PatternHit>, String>,
    },
    /// This coordinator is not the Raft leader (or stopped being it): reconnect to
    /// `leader`, the leader's QUIC `host:port`, or to another coordinator when it is not
    /// known yet. The connection closes after it.
    NotLeader {
        leader: Option<String>,
        message: String,
    },
    /// The peers this worker should hold links to in mesh swarm `swarm` (replaces any
    /// earlier list for that swarm; an empty list drops the links).
    Peers { swarm: String, peers: Vec<PeerInfo> },
    /// The answer to [`WorkerMsg::Draining`]: this session's worker is marked draining,
    /// and no `Run` follows this frame on this session. A draining worker leaves only
    /// after it, so no attempt can be on its way to a worker that is gone.
    DrainAck,
    /// Reach the coordinator through this lead (a hierarchical swarm): connect to its
    /// relay listener (ALPN [`crate::ALPN_RELAY`]) and say `Hello` there, on a stream the
    /// lead relays to the coordinator. `None`: connect to the coordinator directly.
    Parent { lead: Option<PeerInfo> },
    /// Sent on a relayed session after `Hello` (protocol 4): prove you hold the
    /// certificate of the id you claim by signing [`relay_proof_context`] with this
    /// nonce (answered by [`WorkerMsg::Proof`]); `Welcome` follows a good proof.
    Prove {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// The serials of every revoked certificate (protocol 5), as the cluster's replicated
    /// deny list holds them; replaces any earlier list. Sent after `Welcome` and whenever
    /// the list changes: the worker refuses these certificates at its next handshake
    /// (coordinators, its lead, mesh peers) and closes live connections that use one.
    Revoked { serials: Vec<String> },
    /// Someone watches `attempt`'s output (protocol 6; `on: false`: nobody does any more).
    /// The worker answers with what it holds of the output from `from` on (its tail), then
    /// sends each new piece as [`WorkerMsg::Output`] until unwatched or the attempt ends.
    /// Ignored for an attempt the worker does not hold.
    Watch {
        attempt: AttemptRef,
        on: bool,
        from: u64,
    },
    /// An operator drains this worker (protocol 7; `on: false`: resumes it). Drained, it
    /// starts nothing new, hands back what waits and steals from no mesh peer, lets what
    /// runs finish, and stays; it answers with [`WorkerMsg::Drain`]. Resumed, it takes work
    /// again. A worker being stopped ignores a resume. Never sent to older workers.
    Drain { on: bool },
}

/// A mesh peer: its worker id and where it accepts peer links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub worker_id: String,
    pub addr: String,
}

/// Everything a worker needs to run one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub attempt: AttemptRef,
    pub agent: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub timeout_ms: u64,
    pub idempotency_key: Option<String>,
    /// ReasoningBank patterns to retrieve (by the payload text) before running; 0: none.
    pub patterns: u32,
    /// The swarm the task runs in. A worker lends a queued attempt to a mesh peer only if
    /// this is one of its mesh swarms.
    pub swarm: String,
    /// The Raft term of the leader that dispatched this execution (protocol 3).
    pub term: u64,
}

impl TaskAssignment {
    /// The execution this assignment starts.
    pub fn execution(&self) -> ExecutionId {
        ExecutionId {
            attempt: self.attempt,
            term: self.term,
        }
    }
}

/// What a coordinator sends a worker of protocol 1 or 2: the same messages, without the
/// term in `Welcome` and `Run` (added in protocol 3). Such a worker does not fence stale
/// `Run`s; everything the coordinator checks works as for a current worker.
pub mod legacy {
    use serde::Serialize;

    use super::{AttemptRef, PatternHit, PeerInfo};

    /// [`super::CoordinatorMsg`] as protocol 1 and 2 encode it (same variants, same
    /// order).
    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub enum CoordinatorMsg {
        Welcome {
            protocol: u32,
            heartbeat_interval_ms: u64,
            max_output_bytes: u64,
        },
        Rejected {
            code: String,
            message: String,
        },
        Run(TaskAssignment),
        Cancel(AttemptRef),
        Ack(AttemptRef),
        Retrieved {
            request_id: u64,
            result: Result<Vec<PatternHit>, String>,
        },
        NotLeader {
            leader: Option<String>,
            message: String,
        },
        Peers {
            swarm: String,
            peers: Vec<PeerInfo>,
        },
        DrainAck,
        Parent {
            lead: Option<PeerInfo>,
        },
    }

    /// [`super::TaskAssignment`] without the term.
    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub struct TaskAssignment {
        pub attempt: AttemptRef,
        pub agent: String,
        #[serde(with = "serde_bytes")]
        pub payload: Vec<u8>,
        pub timeout_ms: u64,
        pub idempotency_key: Option<String>,
        pub patterns: u32,
        pub swarm: String,
    }

    impl From<super::CoordinatorMsg> for CoordinatorMsg {
        fn from(m: super::CoordinatorMsg) -> Self {
            use super::CoordinatorMsg as M;
            match m {
                M::Welcome {
                    protocol,
                    heartbeat_interval_ms,
                    max_output_bytes,
                    term: _,
                } => CoordinatorMsg::Welcome {
                    protocol,
                    heartbeat_interval_ms,
                    max_output_bytes,
                },
                M::Rejected { code, message } => CoordinatorMsg::Rejected { code, message },
                M::Run(t) => CoordinatorMsg::Run(TaskAssignment {
                    attempt: t.attempt,
                    agent: t.agent,
                    payload: t.payload,
                    timeout_ms: t.timeout_ms,
                    idempotency_key: t.idempotency_key,
                    patterns: t.patterns,
                    swarm: t.swarm,
                }),
                M::Cancel(a) => CoordinatorMsg::Cancel(a),
                M::Ack(a) => CoordinatorMsg::Ack(a),
                M::Retrieved { request_id, result } => {
                    CoordinatorMsg::Retrieved { request_id, result }
                }
                M::NotLeader { leader, message } => CoordinatorMsg::NotLeader { leader, message },
                M::Peers { swarm, peers } => CoordinatorMsg::Peers { swarm, peers },
                M::DrainAck => CoordinatorMsg::DrainAck,
                M::Parent { lead } => CoordinatorMsg::Parent { lead },
                // Only sent to protocol 4 workers; an older one is refused instead.
                M::Prove { .. } => CoordinatorMsg::Rejected {
                    code: "identity_proof_required".into(),
                    message: "a relayed session must prove its identity (protocol 4)".into(),
                },
                // Never sent to workers before protocol 5 (see `REVOCATIONS_PROTOCOL`):
                // they would fail to decode it.
                M::Revoked { .. } => CoordinatorMsg::Rejected {
                    code: "protocol_version".into(),
                    message: "the deny list is sent only to workers of protocol 5".into(),
                },
                // Never sent to workers before protocol 6 (see `OUTPUT_PROTOCOL`).
                M::Watch { .. } => CoordinatorMsg::Rejected {
                    code: "protocol_version".into(),
                    message: "output is watched only on workers of protocol 6".into(),
                },
                // Never sent to workers before protocol 7 (see `DRAIN_PROTOCOL`).
                M::Drain { .. } => CoordinatorMsg::Rejected {
                    code: "protocol_version".into(),
                    message: "workers are drained remotely only from protocol 7".into(),
                },
            }
        }
    }

    /// [`super::WorkerMsg`] as protocols 1 to 5 encode it: the same variants up to
    /// `Proof`, and a [`TaskReport`] without the log tail and usage.
    #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
    pub enum WorkerMsg {
        Hello(super::Hello),
        Heartbeat {
            running: Vec<AttemptRef>,
        },
        Finished(TaskReport),
        Retrieve {
            request_id: u64,
            query: String,
            k: u32,
        },
        Stole {
            attempt: AttemptRef,
            from: String,
        },
        PeerLost {
            peer: String,
        },
        Draining,
        Proof(super::IdentityProof),
    }

    /// [`super::TaskReport`] before protocol 6.
    #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
    pub struct TaskReport {
        pub attempt: AttemptRef,
        pub outcome: super::Outcome,
        pub started_at_ms: u64,
        pub finished_at_ms: u64,
        pub patterns_used: Vec<String>,
    }

    impl From<WorkerMsg> for super::WorkerMsg {
        fn from(m: WorkerMsg) -> Self {
            use super::WorkerMsg as M;
            match m {
                WorkerMsg::Hello(h) => M::Hello(h),
                WorkerMsg::Heartbeat { running } => M::Heartbeat { running },
                WorkerMsg::Finished(r) => M::Finished(super::TaskReport {
                    attempt: r.attempt,
                    outcome: r.outcome,
                    started_at_ms: r.started_at_ms,
                    finished_at_ms: r.finished_at_ms,
                    patterns_used: r.patterns_used,
                    log: super::LogTail::default(),
                    usage: None,
                }),
                WorkerMsg::Retrieve {
                    request_id,
                    query,
                    k,
                } => M::Retrieve {
                    request_id,
                    query,
                    k,
                },
                WorkerMsg::Stole { attempt, from } => M::Stole { attempt, from },
                WorkerMsg::PeerLost { peer } => M::PeerLost { peer },
                WorkerMsg::Draining => M::Draining,
                WorkerMsg::Proof(p) => M::Proof(p),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an older worker is sent is the current frame without the term: every other
    /// message is byte for byte the same, and `Run` and `Welcome` lose only their last
    /// field (postcard writes fields in order, the term last).
    #[test]
    fn legacy_frames_are_current_frames_without_the_term() {
        let a = AttemptRef {
            task_id: 300,
            attempt: 2,
        };
        let run = CoordinatorMsg::Run(TaskAssignment {
            attempt: a,
            agent: "echo".into(),
            payload: b"hi".to_vec(),
            timeout_ms: 1000,
            idempotency_key: Some("k".into()),
            patterns: 1,
            swarm: "default".into(),
            term: 1 << 40,
        });
        let welcome = CoordinatorMsg::Welcome {
            protocol: 2,
            heartbeat_interval_ms: 1000,
            max_output_bytes: 1 << 20,
            term: 1 << 40,
        };
        let term_len = swarm_codec::encode(&(1u64 << 40)).unwrap().len();
        for m in [run, welcome] {
            let now = swarm_codec::encode(&m).unwrap();
            let old = swarm_codec::encode(&legacy::CoordinatorMsg::from(m)).unwrap();
            assert_eq!(old[..], now[..now.len() - term_len]);
        }
        for m in [
            CoordinatorMsg::Cancel(a),
            CoordinatorMsg::Ack(a),
            CoordinatorMsg::DrainAck,
            CoordinatorMsg::Rejected {
                code: "c".into(),
                message: "m".into(),
            },
            CoordinatorMsg::NotLeader {
                leader: None,
                message: "m".into(),
            },
            CoordinatorMsg::Parent { lead: None },
        ] {
            let now = swarm_codec::encode(&m).unwrap();
            let old = swarm_codec::encode(&legacy::CoordinatorMsg::from(m)).unwrap();
            assert_eq!(old, now);
        }
    }

    /// An older worker's report is the current one without its last three fields' bytes
    /// (an empty tail: offset 0 and no pieces; no usage), and reads as the current one.
    #[test]
    fn legacy_reports_read_as_current_reports_without_a_tail() {
        let report = TaskReport {
            attempt: AttemptRef {
                task_id: 1 << 33,
                attempt: 3,
            },
            outcome: Outcome::Failed {
                kind: FailureKind::Exit,
                message: "boom".into(),
            },
            started_at_ms: 1 << 41,
            finished_at_ms: (1 << 41) + 5,
            patterns_used: vec!["p1".into()],
            log: LogTail::default(),
            usage: None,
        };
        let now = swarm_codec::encode(&WorkerMsg::Finished(report.clone())).unwrap();
        let old = &now[..now.len() - 3];
        let read: legacy::WorkerMsg = swarm_codec::decode(old, old.len()).unwrap();
        assert_eq!(WorkerMsg::from(read), WorkerMsg::Finished(report));
        // Every other message an old worker sends is byte for byte the same.
        let hb = WorkerMsg::Heartbeat { running: vec![] };
        let bytes = swarm_codec::encode(&hb).unwrap();
        let read: legacy::WorkerMsg = swarm_codec::decode(&bytes, bytes.len()).unwrap();
        assert_eq!(WorkerMsg::from(read), hb);
    }

    /// Protocol 7 appended `Drain` to both enums and changed nothing else: what a
    /// protocol-6 worker sends reads unchanged as the current [`WorkerMsg`] (the
    /// coordinator reads protocol 6 and 7 frames with one decoder), and every message a
    /// protocol-6 worker may be sent is byte for byte the frame it knows. `Drain` is a
    /// frame it cannot read, which is why it is never sent one.
    #[test]
    fn protocol_6_frames_read_unchanged_and_drain_is_new_in_7() {
        /// The enums as protocol 6 had them (same variants, same order).
        mod v6 {
            use serde::{Deserialize, Serialize};

            use super::super::*;

            #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
            pub enum WorkerMsg {
                Hello(Hello),
                Heartbeat {
                    running: Vec<AttemptRef>,
                },
                Finished(TaskReport),
                Retrieve {
                    request_id: u64,
                    query: String,
                    k: u32,
                },
                Stole {
                    attempt: AttemptRef,
                    from: String,
                },
                PeerLost {
                    peer: String,
                },
                Draining,
                Proof(IdentityProof),
                Output(OutputChunk),
            }

            #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
            pub enum CoordinatorMsg {
                Welcome {
                    protocol: u32,
                    heartbeat_interval_ms: u64,
                    max_output_bytes: u64,
                    term: u64,
                },
                Rejected {
                    code: String,
                    message: String,
                },
                Run(TaskAssignment),
                Cancel(AttemptRef),
                Ack(AttemptRef),
                Retrieved {
                    request_id: u64,
                    result: Result<Vec<PatternHit>, String>,
                },
                NotLeader {
                    leader: Option<String>,
                    message: String,
                },
                Peers {
                    swarm: String,
                    peers: Vec<PeerInfo>,
                },
                DrainAck,
                Parent {
                    lead: Option<PeerInfo>,
                },
                Prove {
                    #[serde(with = "serde_bytes")]
                    nonce: Vec<u8>,
                },
                Revoked {
                    serials: Vec<String>,
                },
                Watch {
                    attempt: AttemptRef,
                    on: bool,
                    from: u64,
                },
            }
        }

        let a = AttemptRef {
            task_id: 1 << 35,
            attempt: 4,
        };
        let report = TaskReport {
            attempt: a,
            outcome: Outcome::Succeeded {
                output: b"ok".to_vec(),
            },
            started_at_ms: 1 << 41,
            finished_at_ms: (1 << 41) + 9,
            patterns_used: vec!["p".into()],
            log: LogTail {
                offset: 2,
                pieces: vec![LogPiece {
                    stream: OutputStream::Stderr,
                    data: b"warn".to_vec(),
                }],
            },
            usage: Some(Usage {
                model: "m".into(),
                prompt_tokens: 7,
                completion_tokens: 3,
            }),
        };
        let chunk = OutputChunk {
            attempt: a,
            stream: OutputStream::Stdout,
            offset: 5,
            data: b"out".to_vec(),
        };
        let hello = Hello {
            protocol: 6,
            worker_id: "w".into(),
            slots: 2,
            labels: BTreeMap::from([("k".into(), "v".into())]),
            agents: vec!["echo".into()],
            running: vec![a],
            peer_addr: Some("h:1".into()),
        };
        let proof = IdentityProof {
            chain: vec![vec![1, 2]],
            scheme: 0x0807,
            signature: vec![3; 4],
        };
        // What a protocol-6 worker sends, and what a coordinator must read it as.
        let sent = [
            (v6::WorkerMsg::Hello(hello.clone()), WorkerMsg::Hello(hello)),
            (
                v6::WorkerMsg::Heartbeat { running: vec![a] },
                WorkerMsg::Heartbeat { running: vec![a] },
            ),
            (
                v6::WorkerMsg::Finished(report.clone()),
                WorkerMsg::Finished(report),
            ),
            (
                v6::WorkerMsg::Retrieve {
                    request_id: 3,
                    query: "q".into(),
                    k: 2,
                },
                WorkerMsg::Retrieve {
                    request_id: 3,
                    query: "q".into(),
                    k: 2,
                },
            ),
            (
                v6::WorkerMsg::Stole {
                    attempt: a,
                    from: "p".into(),
                },
                WorkerMsg::Stole {
                    attempt: a,
                    from: "p".into(),
                },
            ),
            (
                v6::WorkerMsg::PeerLost { peer: "p".into() },
                WorkerMsg::PeerLost { peer: "p".into() },
            ),
            (v6::WorkerMsg::Draining, WorkerMsg::Draining),
            (v6::WorkerMsg::Proof(proof.clone()), WorkerMsg::Proof(proof)),
            (
                v6::WorkerMsg::Output(chunk.clone()),
                WorkerMsg::Output(chunk),
            ),
        ];
        for (old, now) in sent {
            let bytes = swarm_codec::encode(&old).unwrap();
            assert_eq!(bytes, swarm_codec::encode(&now).unwrap(), "{now:?}");
            let read: WorkerMsg = swarm_codec::decode(&bytes, bytes.len()).unwrap();
            assert_eq!(read, now);
        }

        // What a protocol-6 worker may be sent reads as the frame it knows.
        let assignment = TaskAssignment {
            attempt: a,
            agent: "echo".into(),
            payload: b"hi".to_vec(),
            timeout_ms: 1000,
            idempotency_key: None,
            patterns: 0,
            swarm: "default".into(),
            term: 9,
        };
        for m in [
            CoordinatorMsg::Welcome {
                protocol: 6,
                heartbeat_interval_ms: 1000,
                max_output_bytes: 1 << 20,
                term: 9,
            },
            CoordinatorMsg::Run(assignment),
            CoordinatorMsg::Cancel(a),
            CoordinatorMsg::Ack(a),
            CoordinatorMsg::Retrieved {
                request_id: 1,
                result: Err("none".into()),
            },
            CoordinatorMsg::Peers {
                swarm: "mesh".into(),
                peers: vec![PeerInfo {
                    worker_id: "p".into(),
                    addr: "h:2".into(),
                }],
            },
            CoordinatorMsg::DrainAck,
            CoordinatorMsg::Parent { lead: None },
            CoordinatorMsg::Prove { nonce: vec![7; 32] },
            CoordinatorMsg::Revoked {
                serials: vec!["0a".into()],
            },
            CoordinatorMsg::Watch {
                attempt: a,
                on: true,
                from: 3,
            },
        ] {
            let bytes = swarm_codec::encode(&m).unwrap();
            let old: v6::CoordinatorMsg = swarm_codec::decode(&bytes, bytes.len()).unwrap();
            assert_eq!(swarm_codec::encode(&old).unwrap(), bytes, "{m:?}");
        }

        // The new variants come after every old one: a protocol-6 reader refuses them,
        // and a protocol-7 reader takes them back as sent.
        for on in [true, false] {
            let drain = swarm_codec::encode(&CoordinatorMsg::Drain { on }).unwrap();
            assert!(swarm_codec::decode::<v6::CoordinatorMsg>(&drain, drain.len()).is_err());
            let back: CoordinatorMsg = swarm_codec::decode(&drain, drain.len()).unwrap();
            assert_eq!(back, CoordinatorMsg::Drain { on });
            let state = swarm_codec::encode(&WorkerMsg::Drain { on }).unwrap();
            assert!(swarm_codec::decode::<v6::WorkerMsg>(&state, state.len()).is_err());
            let back: WorkerMsg = swarm_codec::decode(&state, state.len()).unwrap();
            assert_eq!(back, WorkerMsg::Drain { on });
        }
        // Written to a worker before protocol 3, it could only be a refusal (it never is).
        assert!(matches!(
            legacy::CoordinatorMsg::from(CoordinatorMsg::Drain { on: true }),
            legacy::CoordinatorMsg::Rejected { .. }
        ));
    }

    /// Byte fields are encoded as one byte string; in postcard that is the same bytes as
    /// the sequence of numbers serde makes of a plain `Vec<u8>`, so the change to
    /// `serde_bytes` left the wire format as it was.
    #[test]
    fn byte_fields_keep_the_sequence_encoding() {
        #[derive(Serialize)]
        enum PlainOutcome {
            Succeeded { output: Vec<u8> },
        }
        let output: Vec<u8> = (0..=255).chain(0..44).collect();
        let ours = swarm_codec::encode(&Outcome::Succeeded {
            output: output.clone(),
        })
        .unwrap();
        let plain = swarm_codec::encode(&PlainOutcome::Succeeded {
            output: output.clone(),
        })
        .unwrap();
        assert_eq!(ours, plain);
        let back: Outcome = swarm_codec::decode(&plain, plain.len()).unwrap();
        assert_eq!(back, Outcome::Succeeded { output });
    }
}
