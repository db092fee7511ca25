//! One worker connection on the coordinator side.
//!
//! Order of a session: read `Hello` (it may arrive as 0-RTT early data, and is
//! idempotent), refuse a wrong protocol version or a follower politely, wait for the
//! handshake to authenticate the worker's certificate, reconcile what the worker says
//! it still holds with what the scheduler thinks, send `Welcome`, then serve heartbeats
//! and reports until the connection ends. A malformed frame ends the session with a log
//! line; the worker reconnects and loses nothing.
//!
//! A worker that says `Draining` is marked so in the scheduler (nothing new is placed on
//! it) and answered `DrainAck` behind every `Run` already sent; the attempts it hands
//! back (`FailureKind::Drained`) queue again at once, without a retry backoff. A worker
//! an operator drained (`crate::workers::drain_worker`, protocol 7) says
//! `Drain { on: true }` and is handled alike, but shown as drained by the operator; its
//! `Drain { on: false }` (resumed) un-marks it. Being stopped wins over both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use swarm_proto::api::{DrainKind, WorkerView};
use swarm_proto::worker::{
    relay_proof_context, CoordinatorMsg, FailureKind, Hello, Outcome, TaskReport, WorkerMsg,
};
use swarm_proto::{
    protocol_supported, MIN_PROTOCOL_VERSION, OUTPUT_PROTOCOL, PROTOCOL_VERSION,
    REVOCATIONS_PROTOCOL,
};
use swarm_transport::{
    peer_subject, Accepted, CertName, FrameReader, FrameWriter, IdentityProof, Role, TransportError,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::node::{not_leader_msg, now_ms, Node, SessionHandle};
use crate::state::{Op, OpResult};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// How long a new connection has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a turned-away worker gets to read its last frame before the connection closes.
const LAST_FRAME_GRACE: Duration = Duration::from_secs(2);
/// The first worker protocol that proves a relayed member's identity.
const PROOF_PROTOCOL: u32 = 4;

/// Serve one worker connection until it ends.
pub(crate) async fn serve(node: Arc<Node>, mut accepted: Accepted) {
    let remote = accepted.conn.remote_address();
    match run(&node, &mut accepted).await {
        Ok(()) => debug!(%remote, "worker connection closed"),
        Err(SessionError::Transport(e)) if e.is_malformed() => {
            metrics::counter!("swarm_protocol_errors_total").increment(1);
            warn!(%remote, error = %e, "closing worker connection: malformed frame");
            accepted
                .conn
                .close(quinn::VarInt::from_u32(0x5702), b"malformed frame");
        }
        Err(e) => {
            info!(%remote, error = %e, "worker connection ended");
            accepted
                .conn
                .close(quinn::VarInt::from_u32(0x5703), e.to_string().as_bytes());
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Protocol(String),
}

impl From<swarm_transport::FrameError> for SessionError {
    fn from(e: swarm_transport::FrameError) -> Self {
        SessionError::Transport(e.into())
    }
}

async fn run(node: &Arc<Node>, accepted: &mut Accepted) -> Result<(), SessionError> {
    let (mut writer, mut reader) = accepted.accept_stream().await?;
    let Some(hello) = read_hello(&mut reader).await? else {
        return Ok(());
    };
    if !protocol_supported(hello.protocol) {
        let message = format!(
            "worker speaks protocol version {}, this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade one of them",
            hello.protocol
        );
        reject(&mut writer, &accepted.conn, "protocol_version", &message).await;
        return Err(SessionError::Protocol(message));
    }
    if let Err(e) = validate_hello(&hello) {
        reject(&mut writer, &accepted.conn, "bad_hello", &e).await;
        return Err(SessionError::Protocol(e));
    }
    if !node.is_leader() {
        let msg = not_leader_msg(node.id(), node.leader().as_ref());
        send_last(&mut writer, &accepted.conn, &msg).await;
        return Err(SessionError::Protocol("turned away: not the leader".into()));
    }
    // Everything before this point was idempotent; from here on the worker must be
    // authenticated and its data not a replay.
    let zero_rtt = accepted.handshake.is_some() && reader.is_0rtt();
    accepted.authenticate_as(Role::Worker).await?;
    // A resumed (0-RTT) session skips certificate verification: check the deny list
    // here as well as in the handshake.
    swarm_transport::require_not_revoked(&accepted.conn, node.identity().revocations())?;
    // The id is the one the certificate names (or one its pool may use), never just
    // what the `Hello` says.
    let cert = peer_subject(&accepted.conn)?.name;
    if !cert.allows(&hello.worker_id) {
        metrics::counter!("swarm_worker_identity_refused_total", "how" => "direct").increment(1);
        let message = format!(
            "worker id {:?} is not the one this worker's certificate names ({cert})",
            hello.worker_id
        );
        reject(&mut writer, &accepted.conn, "identity", &message).await;
        return Err(SessionError::Protocol(message));
    }
    metrics::counter!("swarm_worker_connections_total", "zero_rtt" => if zero_rtt { "true" } else { "false" })
        .increment(1);
    // Further streams on this connection are members' sessions the worker relays as
    // their lead (a hierarchical swarm).
    let conn = accepted.conn.clone();
    let relays = tokio::spawn(accept_relayed(
        node.clone(),
        conn.clone(),
        hello.worker_id.clone(),
    ));
    let cut = tokio::spawn(cut_when_distrusted(conn.clone(), node.identity().clone()));
    let result = session(node, &hello, cert, writer, reader, &conn, zero_rtt, None).await;
    relays.abort();
    cut.abort();
    result
}

/// Close `conn` (and so every session on it, relayed ones included) as soon as its
/// peer's certificate is revoked or no longer valid under the trusted CAs.
async fn cut_when_distrusted(conn: quinn::Connection, identity: swarm_transport::Identity) {
    if swarm_transport::close_when_distrusted(conn, identity).await {
        metrics::counter!("swarm_sessions_revoked_total", "peer" => "worker").increment(1);
    }
}

/// Accept the streams a lead opens for its members, each one worker session.
async fn accept_relayed(node: Arc<Node>, conn: quinn::Connection, lead: String) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let node = node.clone();
        let conn = conn.clone();
        let lead = lead.clone();
        tokio::spawn(async move {
            let writer = FrameWriter::new(send);
            let reader = FrameReader::new(recv);
            match relayed(&node, writer, reader, &conn, &lead).await {
                Ok(()) => debug!(%lead, "relayed session closed"),
                Err(e) => info!(%lead, error = %e, "relayed session ended"),
            }
        });
    }
}

/// One member's session, relayed by `lead` on a stream of the lead's connection. The
/// connection is authenticated already; a refusal ends only this stream.
async fn relayed(
    node: &Arc<Node>,
    mut writer: FrameWriter,
    mut reader: FrameReader,
    conn: &quinn::Connection,
    lead: &str,
) -> Result<(), SessionError> {
    let Some(hello) = read_hello(&mut reader).await? else {
        return Ok(());
    };
    let refusal = if !protocol_supported(hello.protocol) {
        Some(CoordinatorMsg::Rejected {
            code: "protocol_version".into(),
            message: format!(
                "worker speaks protocol version {}, this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade one of them",
                hello.protocol
            ),
        })
    } else if let Err(e) = validate_hello(&hello) {
        Some(CoordinatorMsg::Rejected {
            code: "bad_hello".into(),
            message: e,
        })
    } else if hello.worker_id == lead {
        Some(CoordinatorMsg::Rejected {
            code: "bad_hello".into(),
            message: "a lead cannot relay its own session".into(),
        })
    } else if hello.protocol < PROOF_PROTOCOL {
        Some(CoordinatorMsg::Rejected {
            code: "identity_proof_required".into(),
            message: format!(
                "a relayed member must prove its identity (worker protocol {PROOF_PROTOCOL}); this one speaks {}: upgrade it or let it connect directly",
                hello.protocol
            ),
        })
    } else if !node.is_leader() {
        Some(not_leader_msg(node.id(), node.leader().as_ref()))
    } else {
        None
    };
    if let Some(msg) = refusal {
        return refuse_relayed(writer, &hello, msg).await;
    }
    // The lead's word is not enough: the member signs a fresh nonce, this lead's id and
    // the id it claims with the key of its certificate, across the relay.
    let cert = match prove_member(node, &mut writer, &mut reader, &hello, lead).await {
        Ok(cert) => cert,
        Err(message) => {
            metrics::counter!("swarm_worker_identity_refused_total", "how" => "relayed")
                .increment(1);
            warn!(%lead, member = %hello.worker_id, "relayed session refused: {message}");
            let msg = CoordinatorMsg::Rejected {
                code: "identity".into(),
                message,
            };
            return refuse_relayed(writer, &hello, msg).await;
        }
    };
    // Only members the plan routes through this lead: a lead cannot gather workers it
    // was not given (the member falls back to a direct session and is routed anew).
    let routed_here = node
        .lock_dispatch()
        .topologies
        .relays_through(&hello.worker_id, lead);
    if !routed_here {
        metrics::counter!("swarm_relayed_sessions_refused_total", "reason" => "not_assigned")
            .increment(1);
        let msg = CoordinatorMsg::Rejected {
            code: "not_assigned".into(),
            message: format!(
                "worker {} is not a member the plan routes through {lead}",
                hello.worker_id
            ),
        };
        return refuse_relayed(writer, &hello, msg).await;
    }
    metrics::counter!("swarm_relayed_sessions_total").increment(1);
    session(
        node,
        &hello,
        cert,
        writer,
        reader,
        conn,
        false,
        Some(lead.to_string()),
    )
    .await
}

async fn refuse_relayed(
    mut writer: FrameWriter,
    hello: &Hello,
    msg: CoordinatorMsg,
) -> Result<(), SessionError> {
    let _ = writer.send(&msg).await;
    let _ = writer.finish();
    Err(SessionError::Protocol(format!(
        "relayed session of {} refused",
        hello.worker_id
    )))
}

/// Asks a relayed member to prove who it is and checks the answer: a chain valid under
/// the cluster CA, naming a worker the claimed id belongs to, whose key signed this
/// session's nonce, lead and id. Returns the name its certificate gives.
async fn prove_member(
    node: &Node,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    hello: &Hello,
    lead: &str,
) -> Result<CertName, String> {
    let nonce: [u8; 32] = rand::random();
    writer
        .send(&CoordinatorMsg::Prove {
            nonce: nonce.to_vec(),
        })
        .await
        .map_err(|e| format!("asking for a proof: {e}"))?;
    let answer = tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<WorkerMsg>())
        .await
        .map_err(|_| "no identity proof within 10 s".to_string())?
        .map_err(|e| format!("reading the identity proof: {e}"))?;
    let Some(WorkerMsg::Proof(proof)) = answer else {
        return Err("expected an identity proof".into());
    };
    let proof = IdentityProof {
        chain: proof.chain,
        scheme: proof.scheme,
        signature: proof.signature,
    };
    let context = relay_proof_context(&nonce, lead, &hello.worker_id);
    let subject = node
        .identity()
        .verify_proof(&proof, &context)
        .map_err(|e| e.to_string())?;
    if subject.role != Role::Worker {
        return Err(format!("the proof is by a {} certificate", subject.role));
    }
    if proof
        .chain
        .first()
        .is_some_and(|leaf| node.identity().revocations().is_revoked_der(leaf))
    {
        return Err("the member's certificate is revoked".into());
    }
    if !subject.name.allows(&hello.worker_id) {
        return Err(format!(
            "worker id {:?} is not the one the member's certificate names ({})",
            hello.worker_id, subject.name
        ));
    }
    Ok(subject.name)
}

/// A worker session after its `Hello` was accepted: register, serve, unregister.
#[allow(clippy::too_many_arguments)]
async fn session(
    node: &Arc<Node>,
    hello: &Hello,
    cert: CertName,
    writer: FrameWriter,
    mut reader: FrameReader,
    conn: &quinn::Connection,
    zero_rtt: bool,
    via: Option<String>,
) -> Result<(), SessionError> {
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    if let Err(message) = register(
        node,
        hello,
        cert,
        conn_id,
        tx.clone(),
        stop,
        conn,
        zero_rtt,
        via.clone(),
    ) {
        metrics::counter!("swarm_worker_identity_refused_total", "how" => "pool").increment(1);
        let _ = tx.send(CoordinatorMsg::Rejected {
            code: "identity".into(),
            message: message.clone(),
        });
        drop(tx);
        let _ = write_loop(writer, rx, hello.protocol).await;
        // Let the refusal arrive before the connection closes (see `send_last`).
        if via.is_none() {
            let _ = tokio::time::timeout(LAST_FRAME_GRACE, conn.closed()).await;
        }
        return Err(SessionError::Protocol(message));
    }
    info!(worker = %hello.worker_id, slots = hello.slots, zero_rtt, via = ?via, remote = %conn.remote_address(), "worker connected");
    let mut writer_task = tokio::spawn(write_loop(writer, rx, hello.protocol));
    let push = (hello.protocol >= REVOCATIONS_PROTOCOL).then(|| {
        tokio::spawn(push_revocations(
            tx.clone(),
            node.identity().revocations().clone(),
        ))
    });
    node.poke();
    // A new session starts with no watches: ask again for the watched attempts it runs.
    crate::live::rewatch_worker(node, &hello.worker_id);

    let result = tokio::select! {
        r = read_loop(node, &hello.worker_id, &mut reader, &tx, hello.protocol) => r,
        // A frame that cannot be written ends the session: left leased, every later
        // `Run`, `Ack` and `Cancel` to the worker would be dropped unseen. The worker
        // reconnects, and registration reconciles what it holds.
        w = &mut writer_task => match w {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                metrics::counter!("swarm_worker_write_failures_total").increment(1);
                warn!(worker = %hello.worker_id, error = %e, "ending the worker session: a write to it failed");
                Err(SessionError::Transport(e.into()))
            }
            Err(e) => Err(SessionError::Protocol(format!("the session's writer stopped: {e}"))),
        },
        // Replaced by a newer session of the same worker. (A dropped sender, e.g. when
        // leadership is lost, does not end the session: its `NotLeader` must get out.)
        Ok(()) = &mut stopped => Err(SessionError::Protocol(
            "replaced by a newer session of the same worker".into(),
        )),
    };
    writer_task.abort();
    if let Some(push) = push {
        push.abort();
    }
    unregister(node, &hello.worker_id, conn_id);
    info!(worker = %hello.worker_id, "worker disconnected");
    result
}

/// Send the worker the deny list now (after `Welcome`, which is already queued) and
/// again whenever it changes, so it refuses revoked coordinators, leads and mesh peers
/// too. The whole list each time: it changes rarely, and at its cap (100,000 serials)
/// is some 4 MB, within a frame.
async fn push_revocations(
    tx: mpsc::UnboundedSender<CoordinatorMsg>,
    revocations: swarm_transport::Revocations,
) {
    let mut changed = revocations.subscribe();
    loop {
        let mut serials = revocations.serials();
        serials.sort_unstable();
        if tx.send(CoordinatorMsg::Revoked { serials }).is_err() || changed.changed().await.is_err()
        {
            return;
        }
    }
}

/// A session's first frame, which must be `Hello` and arrive in time; `None` if the
/// stream ended first.
async fn read_hello(reader: &mut FrameReader) -> Result<Option<Hello>, SessionError> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<WorkerMsg>())
        .await
        .map_err(|_| SessionError::Protocol("no hello within 10 s".into()))??;
    match first {
        Some(WorkerMsg::Hello(h)) => Ok(Some(h)),
        Some(other) => {
            metrics::counter!("swarm_protocol_errors_total").increment(1);
            Err(SessionError::Protocol(format!(
                "expected Hello first, got {}",
                msg_name(&other)
            )))
        }
        None => Ok(None),
    }
}

fn validate_hello(h: &Hello) -> Result<(), String> {
    if h.worker_id.is_empty() || h.worker_id.len() > 128 {
        return Err("worker id must be 1 to 128 bytes".into());
    }
    if h.slots == 0 || h.slots > 100_000 {
        return Err(format!("slots must be 1 to 100000, got {}", h.slots));
    }
    Ok(())
}

async fn reject(writer: &mut FrameWriter, conn: &quinn::Connection, code: &str, message: &str) {
    let msg = CoordinatorMsg::Rejected {
        code: code.into(),
        message: message.into(),
    };
    send_last(writer, conn, &msg).await;
}

/// Send a session's last frame and let it arrive: closing the connection at once could
/// discard it in flight. The worker closes the connection when it reads the frame;
/// a peer that does not is cut off after a short grace.
async fn send_last(writer: &mut FrameWriter, conn: &quinn::Connection, msg: &CoordinatorMsg) {
    let _ = writer.send(msg).await;
    let _ = writer.finish();
    let _ = tokio::time::timeout(LAST_FRAME_GRACE, conn.closed()).await;
}

fn msg_name(m: &WorkerMsg) -> &'static str {
    match m {
        WorkerMsg::Hello(_) => "Hello",
        WorkerMsg::Heartbeat { .. } => "Heartbeat",
        WorkerMsg::Finished(_) => "Finished",
        WorkerMsg::Retrieve { .. } => "Retrieve",
        WorkerMsg::Stole { .. } => "Stole",
        WorkerMsg::PeerLost { .. } => "PeerLost",
        WorkerMsg::Draining => "Draining",
        WorkerMsg::Proof(_) => "Proof",
        WorkerMsg::Output(_) => "Output",
        WorkerMsg::Drain { .. } => "Drain",
    }
}

/// Add the session and reconcile the worker's view of its attempts with ours.
///
/// Refused (nothing changes) when a worker of a pool certificate claims the id of a
/// connected worker whose certificate names it.
#[allow(clippy::too_many_arguments)]
fn register(
    node: &Arc<Node>,
    hello: &Hello,
    cert: CertName,
    conn_id: u64,
    tx: mpsc::UnboundedSender<CoordinatorMsg>,
    stop: tokio::sync::oneshot::Sender<()>,
    conn: &quinn::Connection,
    zero_rtt: bool,
    via: Option<String>,
) -> Result<(), String> {
    let now = now_ms();
    let id = hello.worker_id.as_str();
    // Which of the attempts the worker holds may carry on: `Some(timeout)` when the task
    // still wants that attempt (read before locking dispatch: lock order is table, then
    // dispatch).
    type Keep = Option<(u64, Option<String>)>;
    let held: Vec<(swarm_proto::worker::AttemptRef, Keep)> = node.read_table(|t| {
        hello
            .running
            .iter()
            .map(|a| {
                let keep = t.get(a.task_id).filter(|task| {
                    !task.state.is_final() && task.next_attempt() <= a.attempt
                        || task
                            .running_attempt()
                            .is_some_and(|r| r.number == a.attempt)
                });
                (
                    *a,
                    keep.map(|task| {
                        (
                            task.spec.timeout_ms,
                            task.concurrency_key().map(str::to_string),
                        )
                    }),
                )
            })
            .collect()
    });
    let mut start_ops = Vec::new();
    let mut lost = Vec::new();
    {
        let mut d = node.lock_dispatch();
        if let Some(old) = d.sessions.get(id) {
            if matches!(old.cert, CertName::Node(_)) && !matches!(cert, CertName::Node(_)) {
                return Err(format!(
                    "worker {id} is connected with a certificate naming it; a pool certificate ({cert}) cannot take its place"
                ));
            }
        }
        // Welcome goes first: registering may already queue Cancels, and dispatch may
        // queue Runs, as soon as the session is visible. It names the worker's own
        // (supported) version: this session speaks that one.
        let _ = tx.send(CoordinatorMsg::Welcome {
            protocol: hello.protocol,
            heartbeat_interval_ms: node.config().heartbeat_interval_ms,
            max_output_bytes: node.config().limits.max_output_bytes,
            term: node.raft_term_led().unwrap_or(0),
        });
        if let Some(old) = d.sessions.remove(id) {
            // A newer session of the same worker wins. The old one is usually dead or
            // dying; if it is not (the worker is still on it, and the newer one is a
            // stray), ending it makes the worker reconnect instead of staying on a
            // session the dispatcher no longer knows.
            if let Some(stop) = old.stop {
                let _ = stop.send(());
            }
        }
        d.scheduler.worker_joined(
            id,
            hello.slots,
            hello.labels.clone(),
            hello.agents.iter().cloned().collect(),
            hello.peer_addr.clone(),
            now,
        );
        for (attempt, keep) in &held {
            match keep {
                Some(_) if d.scheduler.is_given_up(*attempt) => {
                    // Given up while the worker was away; its `Lose` is on its way.
                    let _ = tx.send(CoordinatorMsg::Cancel(*attempt));
                }
                Some((timeout, key)) => {
                    let tracked = d
                        .scheduler
                        .in_flight(attempt.task_id)
                        .is_some_and(|f| f.attempt == *attempt);
                    if !tracked {
                        // Dispatched by an earlier leader, or before our records caught up.
                        d.scheduler
                            .adopt(id, *attempt, *timeout, key.as_deref(), now);
                        start_ops.push(Op::Start {
                            attempt: *attempt,
                            worker: id.to_string(),
                            now_ms: now,
                        });
                    }
                }
                // Unknown, final or superseded: the worker should stop it. A finished
                // report for it will still be acknowledged.
                _ => {
                    let _ = tx.send(CoordinatorMsg::Cancel(*attempt));
                }
            }
        }
        // Attempts we think run there but the worker does not hold: it restarted.
        for f in d.scheduler.in_flight_on(id) {
            if !f.reported && !hello.running.contains(&f.attempt) {
                lost.push(f.attempt);
            }
        }
        lost.sort();
        for a in &lost {
            d.scheduler.give_up(a.task_id);
        }
        let running = d.scheduler.workers().get(id).map_or(0, |w| w.busy);
        d.sessions.insert(
            id.to_string(),
            SessionHandle {
                stop: Some(stop),
                protocol: hello.protocol,
                conn_id,
                tx,
                cert,
                info: WorkerView {
                    id: id.to_string(),
                    addr: conn.remote_address().to_string(),
                    slots: hello.slots,
                    running,
                    labels: hello.labels.clone(),
                    agents: hello.agents.clone(),
                    connected_at_ms: now,
                    last_heartbeat_ms: now,
                    zero_rtt,
                    via,
                    draining: false,
                    drain: None,
                },
            },
        );
        for a in &lost {
            let retry_at_ms = d.scheduler.retry_at(now, *a);
            start_ops.extend(Op::give_up(
                *a,
                id,
                format!("worker {id} reconnected without it (restarted)"),
                now,
                retry_at_ms,
            ));
        }
    }
    if !start_ops.is_empty() {
        let node = node.clone();
        tokio::spawn(async move {
            match node.propose(start_ops).await {
                Ok(r) => node.count_results(&r),
                Err(e) => warn!(error = %e, "recording a reconnected worker's attempts failed"),
            }
        });
    }
    Ok(())
}

fn unregister(node: &Arc<Node>, worker: &str, conn_id: u64) {
    let mut d = node.lock_dispatch();
    if d.sessions.get(worker).is_some_and(|s| s.conn_id == conn_id) {
        d.sessions.remove(worker);
        d.scheduler.worker_disconnected(worker);
    }
}

/// Frames to the worker leave through one task, batched: whatever queued up while the
/// last write was in progress goes out in one write, in the frames of the worker's
/// `protocol`. Returns when the channel closes or after a closing frame (`Ok`), or at the
/// first failed write (the session then ends).
async fn write_loop(
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<CoordinatorMsg>,
    protocol: u32,
) -> Result<(), swarm_transport::FrameError> {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let closing = batch
            .iter()
            .any(|m| matches!(m, CoordinatorMsg::Rejected { .. }));
        if protocol < 3 {
            let old: Vec<swarm_proto::worker::legacy::CoordinatorMsg> =
                batch.drain(..).map(Into::into).collect();
            writer.send_batch(&old).await?;
        } else {
            writer.send_batch(&batch).await?;
        }
        batch.clear();
        if closing {
            let _ = writer.finish();
            return Ok(());
        }
    }
    Ok(())
}

async fn read_loop(
    node: &Arc<Node>,
    worker: &str,
    reader: &mut FrameReader,
    tx: &mpsc::UnboundedSender<CoordinatorMsg>,
    protocol: u32,
) -> Result<(), SessionError> {
    loop {
        // Workers before protocol 6 send reports without a log tail.
        let msg = if protocol < OUTPUT_PROTOCOL {
            reader
                .recv::<swarm_proto::worker::legacy::WorkerMsg>()
                .await?
                .map(WorkerMsg::from)
        } else {
            reader.recv::<WorkerMsg>().await?
        };
        let Some(msg) = msg else { break };
        let now = now_ms();
        match msg {
            WorkerMsg::Output(chunk) => {
                let attempt = chunk.attempt;
                if !node.live.output(chunk) {
                    // Nobody watches it (any more): stop the stream.
                    let _ = tx.send(CoordinatorMsg::Watch {
                        attempt,
                        on: false,
                        from: 0,
                    });
                }
            }
            WorkerMsg::Heartbeat { running } => on_heartbeat(node, worker, &running, tx, now),
            WorkerMsg::Finished(report) => on_report(node, worker, report, tx.clone(), now),
            WorkerMsg::Retrieve {
                request_id,
                query,
                k,
            } => {
                // Served from this replica's memory: a short read lock, no Raft round trip.
                // Answered here when the embedder is immediate (the hash embedder);
                // otherwise (an HTTP embedder) in its own task, so the session keeps
                // reading heartbeats and reports meanwhile. Either way the worker gets an
                // answer, an error one when embedding failed.
                let (node, tx) = (node.clone(), tx.clone());
                let mut answer = Box::pin(async move {
                    let result = crate::memory::retrieve_for_worker(&node, &query, k).await;
                    let _ = tx.send(fit_frame(CoordinatorMsg::Retrieved { request_id, result }));
                });
                if futures::FutureExt::now_or_never(&mut answer).is_none() {
                    tokio::spawn(answer);
                }
            }
            WorkerMsg::Stole { attempt, from } => {
                crate::swarms::on_stole(node, worker, attempt, &from);
            }
            WorkerMsg::PeerLost { peer } => {
                metrics::counter!("swarm_peer_lost_total").increment(1);
                debug!(worker, peer = %peer, "worker lost its peer link");
            }
            WorkerMsg::Draining => on_draining(node, worker, tx, DrainKind::Stopping),
            WorkerMsg::Drain { on: true } => on_draining(node, worker, tx, DrainKind::Operator),
            WorkerMsg::Drain { on: false } => on_resumed(node, worker),
            WorkerMsg::Hello(_) => {
                metrics::counter!("swarm_protocol_errors_total").increment(1);
                return Err(SessionError::Protocol(
                    "second Hello on one connection".into(),
                ));
            }
            WorkerMsg::Proof(_) => {
                metrics::counter!("swarm_protocol_errors_total").increment(1);
                return Err(SessionError::Protocol(
                    "an identity proof nobody asked for".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Reconciles a heartbeat's list of the attempts the worker holds with ours: attempts
/// placed on it that it has stopped listing for over a lease are lost (and run again);
/// attempts it lists that neither this leader placed there nor the table records as
/// running there (final, superseded, given up) are cancelled on it. Attempts the table
/// records as running there are left for the adoption scan.
fn on_heartbeat(
    node: &Arc<Node>,
    worker: &str,
    running: &[swarm_proto::worker::AttemptRef],
    tx: &mpsc::UnboundedSender<CoordinatorMsg>,
    now: u64,
) {
    let (lost, untracked) = {
        let mut d = node.lock_dispatch();
        d.scheduler.worker_seen(worker, now);
        if let Some(s) = d.sessions.get_mut(worker) {
            s.info.last_heartbeat_ms = now;
            s.info.running = running.len() as u32;
        }
        let lost: Vec<_> = d
            .scheduler
            .heartbeat(worker, running, now)
            .into_iter()
            .map(|a| (a, d.scheduler.retry_at(now, a)))
            .collect();
        (lost, d.scheduler.untracked(worker, running))
    };
    if !untracked.is_empty() {
        // Read after the dispatch lock is released (lock order: table, then dispatch).
        let stale: Vec<_> = node.read_table(|t| {
            untracked
                .into_iter()
                .filter(|a| {
                    !t.get(a.task_id).is_some_and(|task| {
                        task.running_attempt()
                            .is_some_and(|r| r.number == a.attempt && r.worker == worker)
                    })
                })
                .collect()
        });
        for a in stale {
            debug!(
                worker,
                task = a.task_id,
                attempt = a.attempt,
                "cancelling an attempt the worker holds and nobody expects"
            );
            metrics::counter!("swarm_stale_attempts_cancelled_total").increment(1);
            let _ = tx.send(CoordinatorMsg::Cancel(a));
        }
    }
    if lost.is_empty() {
        return;
    }
    let ops: Vec<Op> = lost
        .iter()
        .flat_map(|(a, retry_at_ms)| {
            warn!(
                worker,
                task = a.task_id,
                attempt = a.attempt,
                "attempt lost: the worker's heartbeats have not listed it for over a lease"
            );
            Op::give_up(
                *a,
                worker,
                format!("worker {worker} no longer holds it"),
                now,
                *retry_at_ms,
            )
        })
        .collect();
    let node = node.clone();
    tokio::spawn(async move {
        match node.propose(ops).await {
            Ok(r) => node.count_results(&r),
            Err(e) => {
                warn!(error = %e, "recording attempts lost from a heartbeat failed; their deadlines will")
            }
        }
    });
}

/// A `Retrieved` answer too large for one frame becomes an error answer that says so
/// (sent as it is, it would fail the session's write and end the session).
fn fit_frame(msg: CoordinatorMsg) -> CoordinatorMsg {
    let CoordinatorMsg::Retrieved { request_id, .. } = &msg else {
        return msg;
    };
    let limit = swarm_transport::DEFAULT_MAX_FRAME - 1024;
    match swarm_codec::encoded_len(&msg) {
        Ok(n) if n <= limit => msg,
        Ok(n) => CoordinatorMsg::Retrieved {
            request_id: *request_id,
            result: Err(format!(
                "the patterns retrieved take {n} bytes, over the frame limit of {limit}; ask for fewer (a smaller k)"
            )),
        },
        Err(e) => CoordinatorMsg::Retrieved {
            request_id: *request_id,
            result: Err(format!("the answer could not be encoded: {e}")),
        },
    }
}

/// The worker is draining (`kind`: being stopped, or drained by an operator): place
/// nothing more on it, and tell it so behind every `Run` already queued for it (both
/// under the dispatch lock, which dispatch holds while it queues a `Run`). Being stopped
/// wins: a worker shown stopping stays so.
fn on_draining(
    node: &Arc<Node>,
    worker: &str,
    tx: &mpsc::UnboundedSender<CoordinatorMsg>,
    kind: DrainKind,
) {
    let (newly, running) = {
        let mut d = node.lock_dispatch();
        let newly = d.scheduler.worker_draining(worker);
        if let Some(s) = d.sessions.get_mut(worker) {
            s.info.draining = true;
            if s.info.drain != Some(DrainKind::Stopping) {
                s.info.drain = Some(kind);
            }
        }
        let _ = tx.send(CoordinatorMsg::DrainAck);
        let running = d.scheduler.workers().get(worker).map_or(0, |w| w.busy);
        (newly, running)
    };
    if newly {
        info!(
            worker,
            running,
            drain = kind.as_str(),
            "worker draining: no new work goes to it; its swarms re-plan without it"
        );
        // Layouts drop it at the next dispatch round.
        node.poke();
    }
}

/// The worker takes work again (an operator resumed it): un-mark it, unless it is being
/// stopped (it never says so then; a stop wins).
fn on_resumed(node: &Arc<Node>, worker: &str) {
    let newly = {
        let mut d = node.lock_dispatch();
        let Some(s) = d.sessions.get_mut(worker) else {
            return;
        };
        if s.info.drain == Some(DrainKind::Stopping) {
            warn!(worker, "a stopping worker said it was resumed; ignored");
            return;
        }
        s.info.draining = false;
        s.info.drain = None;
        d.scheduler.worker_resumed(worker)
    };
    if newly {
        info!(worker, "worker resumed: it takes new work again");
        node.poke();
    }
}

fn is_drained(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed {
            kind: FailureKind::Drained,
            ..
        }
    )
}

fn on_report(
    node: &Arc<Node>,
    worker: &str,
    report: TaskReport,
    tx: mpsc::UnboundedSender<CoordinatorMsg>,
    now: u64,
) {
    if node.handing_off() {
        // This leader is handing leadership over and takes no more writes: without an
        // Ack the worker re-sends the report to the next leader.
        debug!(
            worker,
            task = report.attempt.task_id,
            "report left for the next leader"
        );
        return;
    }
    // Handed back by a draining worker: not a try at the task (no backoff, not counted as
    // a retry, nothing for the ReasoningBank to learn from).
    let drained = is_drained(&report.outcome);
    // Whether the table records the attempt, and on this worker (read before locking
    // dispatch: lock order is table, then dispatch). `None`: the task is not in memory
    // (archived, so final: the report will be ignored as stale).
    let recorded: Option<Option<bool>> = node.read_table(|t| {
        t.get(report.attempt.task_id).map(|task| {
            task.attempts
                .iter()
                .find(|a| a.number == report.attempt.attempt)
                .map(|a| a.worker == worker)
        })
    });
    let (retry_at_ms, moves) = {
        let mut d = node.lock_dispatch();
        d.scheduler.worker_seen(worker, now);
        // Only the worker that holds an attempt reports it: the one it is in flight on,
        // or, when this leader does not track it, the one the table records it on. A
        // report for an attempt that is neither (another worker's, or one never handed
        // out) would let any worker decide any task.
        let holder = d
            .scheduler
            .in_flight(report.attempt.task_id)
            .filter(|f| f.attempt == report.attempt)
            .map(|f| f.worker.clone());
        let refused = match holder {
            Some(h) => (h != worker).then(|| format!("it is held by worker {h}")),
            None if recorded == Some(None) => Some("it was never handed to this worker".into()),
            None => None,
        };
        if let Some(why) = refused {
            drop(d);
            metrics::counter!("swarm_reports_refused_total").increment(1);
            warn!(
                worker,
                task = report.attempt.task_id,
                attempt = report.attempt.attempt,
                "report refused: {why}"
            );
            // Not this worker's to report: it may forget it and stop running it.
            let _ = tx.send(CoordinatorMsg::Cancel(report.attempt));
            let _ = tx.send(CoordinatorMsg::Ack(report.attempt));
            return;
        }
        // Steals that brought the attempt here: their `Move`s go first in the proposal.
        let moves = d
            .scheduler
            .in_flight(report.attempt.task_id)
            .filter(|f| f.attempt == report.attempt && f.worker == worker)
            .map(|f| f.moves.clone())
            .unwrap_or_default();
        d.scheduler.reported(worker, report.attempt);
        if let Some(s) = d.sessions.get_mut(worker) {
            s.info.running = s.info.running.saturating_sub(1);
        }
        let retry_at_ms = if drained {
            now
        } else {
            d.scheduler.retry_at(now, report.attempt)
        };
        (retry_at_ms, moves)
    };
    node.poke();
    let run_ms = report.finished_at_ms.saturating_sub(report.started_at_ms);
    if drained {
        debug!(
            worker,
            task = report.attempt.task_id,
            attempt = report.attempt.attempt,
            "attempt handed back by a draining worker"
        );
    } else {
        metrics::histogram!("swarm_task_duration_seconds").record(run_ms as f64 / 1000.0);
    }
    let limit = node.config().limits.max_output_bytes;
    let outcome = match report.outcome {
        Outcome::Succeeded { output } if output.len() as u64 > limit => Outcome::Failed {
            kind: FailureKind::OutputTooLarge,
            message: format!(
                "output of {} bytes exceeds the limit of {limit} bytes",
                output.len()
            ),
        },
        o => o,
    };
    let attempt = report.attempt;
    let patterns_used = report.patterns_used;
    let succeeded = matches!(outcome, Outcome::Succeeded { .. });
    let learn = !drained && crate::memory::distills(node, &outcome);
    // Each `Move` is a no-op if it already committed; the report's result is the first
    // op's after them.
    let first = moves.len();
    let mut ops: Vec<Op> = moves
        .into_iter()
        .map(|(from, to)| Op::Move {
            attempt,
            from,
            to,
            now_ms: now,
        })
        .collect();
    let mut log = report.log;
    trim_log(&mut log, node.config().limits.max_log_tail_bytes);
    if let Some(u) = &report.usage {
        let agent = node
            .read_table(|t| {
                t.get(attempt.task_id)
                    .map(|t| t.current_agent().to_string())
            })
            .unwrap_or_default();
        for (kind, n) in [
            ("prompt", u.prompt_tokens),
            ("completion", u.completion_tokens),
        ] {
            metrics::counter!("swarm_llm_tokens_total", "agent" => agent.clone(), "model" => u.model.clone(), "kind" => kind)
                .increment(n);
        }
    }
    if log.is_empty() && log.offset == 0 && report.usage.is_none() {
        ops.push(Op::Finish {
            attempt,
            worker: worker.to_string(),
            outcome,
            started_at_ms: report.started_at_ms,
            finished_at_ms: report.finished_at_ms,
            now_ms: now,
            retry_at_ms,
        });
    } else {
        ops.push(Op::Report(Box::new(crate::state::Report {
            attempt,
            worker: worker.to_string(),
            outcome,
            started_at_ms: report.started_at_ms,
            finished_at_ms: report.finished_at_ms,
            now_ms: now,
            retry_at_ms,
            log,
            usage: report.usage,
        })));
    }
    if !drained && !patterns_used.is_empty() {
        ops.push(crate::memory::judge_op(
            attempt.task_id,
            patterns_used,
            succeeded,
            now,
        ));
    }
    // Into the replicated outbox with the result (see `memory::distill_loop`).
    if learn {
        ops.push(crate::memory::distill_queue_op(
            attempt.task_id,
            attempt.attempt,
            now,
        ));
    }
    let node = node.clone();
    tokio::spawn(async move {
        let committed = node.propose(ops).await.and_then(|r| {
            if let Some(OpResult::Memory(Ok(swarm_memory::OpOutcome::DistillQueued {
                queued: false,
                waiting,
            }))) = r.last()
            {
                if *waiting >= swarm_memory::DISTILL_OUTBOX_LIMIT as u64 {
                    metrics::counter!("swarm_distill_dropped_total").increment(1);
                }
            }
            r.into_iter()
                .nth(first)
                .ok_or_else(|| crate::proposer::ProposeError::Raft("empty response".into()))
        });
        match committed {
            Ok(result) => {
                if let OpResult::Ignored { state } = &result {
                    metrics::counter!("swarm_stale_reports_total").increment(1);
                    debug!(
                        task = attempt.task_id,
                        attempt = attempt.attempt,
                        ?state,
                        "stale report ignored"
                    );
                }
                // Committed (or known stale): the worker may forget it.
                if drained {
                    if let OpResult::Applied { .. } = result {
                        metrics::counter!("swarm_attempts_drained_total").increment(1);
                    }
                    let _ = tx.send(CoordinatorMsg::Ack(attempt));
                    return;
                }
                match &result {
                    // A ring stage succeeded and the task queued for its next stage: an
                    // advance, not a retry.
                    OpResult::Applied {
                        state: swarm_proto::api::TaskState::Queued,
                    } if succeeded => {
                        metrics::counter!("swarm_ring_stages_advanced_total").increment(1)
                    }
                    _ => node.count_results(std::slice::from_ref(&result)),
                }
                let _ = tx.send(CoordinatorMsg::Ack(attempt));
                if !succeeded {
                    return;
                }
                // The stage time of a ring stage that succeeded (the task may have moved
                // on to its next stage).
                if let Ok(crate::state::Lookup::Found(t)) = node.table.lookup(attempt.task_id) {
                    if !t.spec.stages.is_empty() {
                        let stage = t
                            .attempts
                            .iter()
                            .find(|a| a.number == attempt.attempt)
                            .map_or(t.stage, |a| a.stage);
                        metrics::histogram!(
                            "swarm_ring_stage_seconds",
                            "swarm" => t.spec.swarm.clone(),
                            "stage" => stage.to_string()
                        )
                        .record(run_ms as f64 / 1000.0);
                    }
                }
            }
            // Not committed: no ack, so the worker re-sends it after reconnecting.
            Err(e) => debug!(error = %e, "report not committed"),
        }
    });
}

/// Keep only the last `max` bytes of `log` (a worker configured with a longer tail than
/// this coordinator stores).
fn trim_log(log: &mut swarm_proto::worker::LogTail, max: u64) {
    let mut excess = (log.len() as u64).saturating_sub(max);
    while excess > 0 {
        let Some(first) = log.pieces.first_mut() else {
            break;
        };
        let cut = excess.min(first.data.len() as u64) as usize;
        first.data.drain(..cut);
        log.offset += cut as u64;
        excess -= cut as u64;
        if first.data.is_empty() {
            log.pieces.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole deny list at its cap (100,000 serials of the longest form, 40 hex
    /// digits) goes out as one `Revoked` frame, within the frame limit workers read.
    #[test]
    fn the_deny_list_at_its_cap_fits_one_frame() {
        let serials: Vec<String> = (0..crate::state::access::MAX_REVOKED as u128)
            .map(|i| format!("{:040x}", u128::MAX - i))
            .collect();
        let frame = swarm_transport::codec::encode(&CoordinatorMsg::Revoked { serials }).unwrap();
        assert!(
            frame.len() < swarm_transport::DEFAULT_MAX_FRAME,
            "{} bytes",
            frame.len()
        );
        let back: CoordinatorMsg =
            swarm_transport::codec::decode(&frame, swarm_transport::DEFAULT_MAX_FRAME).unwrap();
        let CoordinatorMsg::Revoked { serials } = back else {
            panic!("not a Revoked frame");
        };
        assert_eq!(serials.len(), crate::state::access::MAX_REVOKED);
    }
}
