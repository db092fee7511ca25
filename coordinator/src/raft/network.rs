//! Raft RPCs between coordinators over mutual-TLS QUIC (ALPN `swarm-raft/1`).
//!
//! Each RPC is one bidirectional stream carrying one [`RaftRequest`] frame and one
//! [`RaftResponse`] frame, on a single long-lived connection per peer. Streams are cheap in
//! QUIC, so concurrent RPCs (a replication stream, votes, snapshot chunks) never queue behind
//! each other.
//!
//! * Client: [`QuicRaftNetwork`] (the openraft network factory) shares one [`quinn::Connection`]
//!   per peer among all the openraft clients for that peer; it dials lazily and redials when
//!   the connection died or stopped answering.
//! * Server: [`serve_raft_connection`] serves one accepted connection, for coordinators only.
//! * Besides openraft's RPCs the channel carries [`RaftRequest::TimeoutNow`], the last step
//!   of a leadership hand-off (`crate::handoff`): the leader tells a caught-up voter to
//!   start an election at once. It travels only here, between coordinator certificates,
//!   never over the HTTP API.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, LogId, ServerState, Vote};
use serde::{Deserialize, Serialize};
use swarm_transport::{
    peer_role, FrameError, FrameReader, FrameWriter, Identity, Role, TransportError,
};
use tokio::sync::Semaphore;

use super::sm_store::Arrivals;
use super::types::{NodeAddr, NodeId, TypeConfig};

/// Largest Raft frame, either way ([`crate::limits`]). An AppendEntries that does not fit is
/// reported to openraft as [`PayloadTooLarge`], which makes it retry with fewer entries; one
/// entry always fits.
pub use crate::limits::RAFT_MAX_FRAME;

/// Concurrent RPC streams served per peer connection; further streams wait (QUIC flow
/// control then pushes back on the peer).
pub const MAX_CONCURRENT_RPCS: usize = 64;

/// Upper bound for dialing a peer, whatever the RPC's own timeout.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// After this many RPCs in a row failed or timed out on one connection, it is considered dead
/// (e.g. the peer restarted: QUIC would only notice after its idle timeout) and is redialed.
const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Application close code: the peer's certificate is not a coordinator's.
pub const CLOSE_NOT_COORDINATOR: u32 = 0x5721;
/// Application close code: the connection stopped answering and is being replaced.
const CLOSE_UNRESPONSIVE: u32 = 0x5722;
/// Stream error code: the request frame was malformed.
const STREAM_MALFORMED: u32 = 0x5723;

/// One Raft RPC request, as sent on the wire.
#[derive(Serialize, Deserialize)]
pub enum RaftRequest {
    /// Log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Leader election.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Leadership transfer: start an election now (Raft thesis §3.10).
    TimeoutNow(TimeoutNowRequest),
}

/// A leader handing leadership over asks the receiver, a voter its log has caught up
/// with, to start an election at once instead of waiting for an election timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeoutNowRequest {
    /// The sender's vote: the receiver acts only if it follows exactly this leadership
    /// (same term, same leader, committed).
    pub vote: Vote<NodeId>,
    /// The sender's last log entry, which the receiver's log must hold.
    pub last_log_id: Option<LogId<NodeId>>,
}

/// The answer to a [`RaftRequest`]: the receiving Raft node's result, error included.
#[derive(Serialize, Deserialize)]
pub enum RaftResponse {
    /// Answer to [`RaftRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RaftRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RaftRequest::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// Answer to [`RaftRequest::TimeoutNow`]: the election started, or why not.
    TimeoutNow(Result<(), String>),
}

impl RaftResponse {
    fn kind(&self) -> &'static str {
        match self {
            RaftResponse::AppendEntries(_) => "AppendEntries",
            RaftResponse::Vote(_) => "Vote",
            RaftResponse::InstallSnapshot(_) => "InstallSnapshot",
            RaftResponse::TimeoutNow(_) => "TimeoutNow",
        }
    }
}

/// A network-level failure, as text (openraft's error types want a `std::error::Error`).
#[derive(Debug)]
struct NetError(String);

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for NetError {}

fn unreachable<E: StdError>(msg: String) -> RPCError<NodeId, NodeAddr, E> {
    RPCError::Unreachable(Unreachable::new(&NetError(msg)))
}

fn network_error<E: StdError>(msg: String) -> RPCError<NodeId, NodeAddr, E> {
    RPCError::Network(NetworkError::new(&NetError(msg)))
}

/// The openraft network factory: creates per-peer clients that share one QUIC connection per
/// peer. Cheap to clone.
#[derive(Clone)]
pub struct QuicRaftNetwork {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    identity: Identity,
    peers: Arc<Mutex<HashMap<NodeId, Arc<PeerConn>>>>,
}

impl QuicRaftNetwork {
    /// Dial peers from `endpoint` (usually the coordinator's own server endpoint) with
    /// `client`, a client config offering ALPN `swarm-raft/1` with a coordinator identity.
    /// A connection to a peer whose certificate is on `identity`'s deny list, or no
    /// longer valid under the CAs it trusts, is closed, then and whenever either changes.
    pub fn new(endpoint: quinn::Endpoint, client: quinn::ClientConfig, identity: Identity) -> Self {
        Self {
            endpoint,
            client,
            identity,
            peers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<NodeId, Arc<PeerConn>>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl QuicRaftNetwork {
    /// Send [`RaftRequest::TimeoutNow`] to node `target` at `node`, on the same shared
    /// connection as its other RPCs; `Err` says why it did not start an election.
    pub async fn timeout_now(
        &self,
        target: NodeId,
        node: &NodeAddr,
        req: TimeoutNowRequest,
        timeout: Duration,
    ) -> Result<(), String> {
        let client = self.clone().new_client(target, node).await;
        let answer = tokio::time::timeout(timeout, async {
            let conn = client.connect().await?;
            exchange(&conn, &RaftRequest::TimeoutNow(req))
                .await
                .map_err(|e| match e {
                    CallError::TooLarge(len) => format!("request of {len} bytes too large"),
                    CallError::Connection(e) => format!("connection: {e}"),
                    CallError::Stream(e) => e,
                })
        })
        .await
        .map_err(|_| format!("no answer from {} within {timeout:?}", node.raft_addr))??;
        match answer {
            RaftResponse::TimeoutNow(res) => res.map_err(|e| format!("refused: {e}")),
            other => Err(format!(
                "expected a TimeoutNow response, got {}",
                other.kind()
            )),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicRaftNetwork {
    type Network = QuicRaftClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> QuicRaftClient {
        let peer = {
            let mut peers = self.peers();
            match peers.get(&target) {
                Some(p) if p.addr == node.raft_addr => p.clone(),
                // New peer, or its address changed: start over with a fresh connection slot.
                _ => {
                    let p = Arc::new(PeerConn::new(target, node.raft_addr.clone()));
                    if let Some(old) = peers.insert(target, p.clone()) {
                        old.close(b"peer address changed");
                    }
                    p
                }
            }
        };
        QuicRaftClient {
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            identity: self.identity.clone(),
            peer,
        }
    }
}

/// Close a Raft connection (dialed or accepted) as soon as its peer's certificate is
/// revoked or no longer trusted.
pub(crate) async fn cut_when_distrusted(conn: quinn::Connection, identity: Identity) {
    if swarm_transport::close_when_distrusted(conn, identity).await {
        metrics::counter!("swarm_sessions_revoked_total", "peer" => "coordinator").increment(1);
    }
}

/// The connection slot of one peer, shared by all clients for that peer.
struct PeerConn {
    target: NodeId,
    addr: String,
    conn: Mutex<Option<quinn::Connection>>,
    /// Serializes dialing, so concurrent RPCs to a disconnected peer make one connection.
    dial_lock: Arc<tokio::sync::Mutex<()>>,
    failures: AtomicU32,
    /// The large AppendEntries being sent to this peer, if any (see [`BULK_APPEND_BYTES`]).
    bulk: Mutex<Option<Bulk>>,
}

/// An AppendEntries carrying more than this many bytes of entries is sent by a task of
/// its own, which outlives openraft's deadline for the call (one heartbeat interval,
/// 100 ms): at the budget an entry holds 8 MiB, which a slow link or a loaded follower
/// cannot take in that time, and a transfer cut at every deadline would never complete.
/// openraft retries the same request after its deadline; the retry waits for the transfer
/// already under way instead of starting over, and takes its answer.
pub const BULK_APPEND_BYTES: usize = 256 << 10;

/// Longest a bulk transfer may take (a dead peer is noticed by the connection long before).
const BULK_TIMEOUT: Duration = Duration::from_secs(120);

/// What identifies an AppendEntries for its retries: same leader vote, same place in the
/// log, same entries.
#[derive(Debug, Clone, PartialEq)]
struct BulkKey {
    vote: Vote<NodeId>,
    prev: Option<LogId<NodeId>>,
    first: Option<LogId<NodeId>>,
    last: Option<LogId<NodeId>>,
    count: usize,
}

impl BulkKey {
    fn of(rpc: &AppendEntriesRequest<TypeConfig>) -> Self {
        BulkKey {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            first: rpc.entries.first().map(|e| e.log_id),
            last: rpc.entries.last().map(|e| e.log_id),
            count: rpc.entries.len(),
        }
    }
}

/// A large AppendEntries under way, and where its answer will be.
struct Bulk {
    key: BulkKey,
    /// Turns true when `answer` is in.
    done: tokio::sync::watch::Receiver<bool>,
    answer: Arc<Mutex<Option<Result<AppendAnswer, BulkError>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The follower's answer to an AppendEntries.
type AppendAnswer = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;

/// Why a bulk transfer failed.
#[derive(Debug)]
enum BulkError {
    TooLarge(usize),
    Connection(String),
    Stream(String),
}

/// Bytes the entries of an AppendEntries take, roughly (by the ops' size hints).
fn entries_bytes(rpc: &AppendEntriesRequest<TypeConfig>) -> usize {
    rpc.entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(cmd) => cmd.ops.iter().map(crate::state::Op::size_hint).sum(),
            _ => 256,
        })
        .sum()
}

impl PeerConn {
    fn new(target: NodeId, addr: String) -> Self {
        Self {
            target,
            addr,
            conn: Mutex::new(None),
            dial_lock: Arc::new(tokio::sync::Mutex::new(())),
            failures: AtomicU32::new(0),
            bulk: Mutex::new(None),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<quinn::Connection>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached connection, if it is still alive.
    fn live(&self) -> Option<quinn::Connection> {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            *slot = None;
        }
        slot.clone()
    }

    /// Drop the connection with stable id `id` if it is still the cached one.
    fn discard(&self, id: usize, reason: &[u8]) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|c| c.stable_id() == id) {
            if let Some(conn) = slot.take() {
                conn.close(quinn::VarInt::from_u32(CLOSE_UNRESPONSIVE), reason);
            }
        }
    }

    fn close(&self, reason: &[u8]) {
        if let Some(conn) = self.slot().take() {
            conn.close(quinn::VarInt::from_u32(CLOSE_UNRESPONSIVE), reason);
        }
    }

    fn record_failure(&self, conn_id: usize) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= MAX_CONSECUTIVE_FAILURES {
            tracing::info!(
                target_node = self.target,
                addr = %self.addr,
                failures = n,
                "raft connection stopped answering; will redial"
            );
            self.failures.store(0, Ordering::Relaxed);
            self.discard(conn_id, b"unresponsive");
        }
    }
}

/// Counts an RPC as failed unless it is marked done: also when its future is dropped by
/// openraft's timeout, which is exactly the case of a peer that silently went away.
struct InFlight<'a> {
    peer: &'a PeerConn,
    conn_id: usize,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.done {
            self.peer.failures.store(0, Ordering::Relaxed);
        } else {
            self.peer.record_failure(self.conn_id);
        }
    }
}

/// `host` of `host:port` / `[v6]:port`, as the TLS server name to verify.
fn server_name(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((host, _)) = rest.split_once(']') {
            return host;
        }
    }
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

/// Resolve `addr`, connect, and complete the handshake.
async fn dial(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: &str,
) -> Result<quinn::Connection, String> {
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .collect();
    // A socket bound to an IPv4 address cannot reach an IPv6 peer and vice versa.
    let local_v4 = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    let sock = candidates
        .iter()
        .find(|a| a.is_ipv4() == local_v4)
        .or(candidates.first())
        .copied()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let mut dialed = swarm_transport::dial(endpoint, client, sock, server_name(addr))
        .await
        .map_err(|e| format!("dialing {addr} ({sock}): {e}"))?;
    // Raft RPCs wait for the full handshake: nothing is sent as replayable 0-RTT data.
    dialed
        .handshake()
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))?;
    Ok(dialed.conn)
}

/// The openraft client for one peer.
#[derive(Clone)]
pub struct QuicRaftClient {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    identity: Identity,
    peer: Arc<PeerConn>,
}

impl QuicRaftClient {
    async fn connect(&self) -> Result<quinn::Connection, String> {
        if let Some(conn) = self.peer.live() {
            return Ok(conn);
        }
        // Whoever holds the lock is dialing; wait for it, then use its connection.
        let dialing = self.peer.dial_lock.clone().lock_owned().await;
        if let Some(conn) = self.peer.live() {
            return Ok(conn);
        }
        // Dial in a task that owns the lock: openraft drops an RPC at its deadline (75 ms for
        // a heartbeat), and a handshake abandoned at every deadline would never complete on a
        // loaded machine. The task finishes the handshake and stores the connection for the
        // next RPC even if this one gives up.
        let (endpoint, client, identity, peer) = (
            self.endpoint.clone(),
            self.client.clone(),
            self.identity.clone(),
            self.peer.clone(),
        );
        let task = tokio::spawn(async move {
            let _dialing = dialing;
            let addr = peer.addr.as_str();
            let conn = tokio::time::timeout(DIAL_TIMEOUT, dial(&endpoint, &client, addr))
                .await
                .map_err(|_| format!("dialing {addr}: timed out after {DIAL_TIMEOUT:?}"))??;
            // A resumed session skips certificate verification: check the deny list
            // now, and again whenever it changes.
            swarm_transport::require_not_revoked(&conn, identity.revocations())
                .map_err(|e| format!("{addr}: {e}"))?;
            tokio::spawn(cut_when_distrusted(conn.clone(), identity));
            tracing::debug!(target_node = peer.target, %addr, "raft connection established");
            peer.failures.store(0, Ordering::Relaxed);
            *peer.slot() = Some(conn.clone());
            Ok(conn)
        });
        task.await
            .map_err(|e| format!("dialing {}: {e}", self.peer.addr))?
    }

    /// Send a large AppendEntries from a task of its own (see [`BULK_APPEND_BYTES`]), or join
    /// the transfer of the same request already under way; wait for its answer until the
    /// RPC's soft deadline.
    async fn bulk_append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        bytes: usize,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let key = BulkKey::of(&rpc);
        let count = rpc.entries.len();
        if bytes > RAFT_MAX_FRAME && count > 1 {
            // Cannot fit one frame: ask openraft for fewer entries before encoding any.
            let fit =
                (count as u64 * RAFT_MAX_FRAME as u64 / bytes as u64).clamp(1, count as u64 - 1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit).with_source_error(&NetError(format!(
                    "{count} entries of about {bytes} bytes"
                ))),
            ));
        }
        let (mut done, answer) = {
            let mut slot = self
                .peer
                .bulk
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(b) if b.key == key => (b.done.clone(), b.answer.clone()),
                _ => {
                    // openraft moved on to another request: the old transfer is moot.
                    if let Some(old) = slot.take() {
                        old.task.abort();
                    }
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    let answer = Arc::new(Mutex::new(None));
                    let client = self.clone();
                    let put = answer.clone();
                    let task = tokio::spawn(async move {
                        let req = RaftRequest::AppendEntries(rpc);
                        let sent = tokio::time::timeout(BULK_TIMEOUT, async {
                            let conn = client.connect().await.map_err(BulkError::Connection)?;
                            match exchange(&conn, &req).await {
                                Ok(RaftResponse::AppendEntries(answer)) => Ok(answer),
                                Ok(other) => Err(BulkError::Stream(format!(
                                    "expected an AppendEntries response, got {}",
                                    other.kind()
                                ))),
                                Err(CallError::TooLarge(n)) => Err(BulkError::TooLarge(n)),
                                Err(CallError::Connection(e)) => {
                                    client.peer.discard(conn.stable_id(), b"connection failed");
                                    Err(BulkError::Connection(e.to_string()))
                                }
                                Err(CallError::Stream(e)) => Err(BulkError::Stream(e)),
                            }
                        })
                        .await
                        .unwrap_or_else(|_| {
                            Err(BulkError::Stream(format!(
                                "not sent within {BULK_TIMEOUT:?}"
                            )))
                        });
                        *put.lock().unwrap_or_else(PoisonError::into_inner) = Some(sent);
                        let _ = tx.send(true);
                    });
                    *slot = Some(Bulk {
                        key: key.clone(),
                        done: rx.clone(),
                        answer: answer.clone(),
                        task,
                    });
                    (rx, answer)
                }
            }
        };
        let ttl = option.soft_ttl();
        let arrived = matches!(
            tokio::time::timeout(ttl, done.wait_for(|d| *d)).await,
            Ok(Ok(_))
        );
        let answer = match arrived {
            true => answer.lock().unwrap_or_else(PoisonError::into_inner).take(),
            false => None,
        };
        let Some(answer) = answer else {
            return Err(network_error(format!(
                "{count} entries ({bytes} bytes) still on their way to {}",
                self.peer.addr
            )));
        };
        // Answered: the next request, even an identical one, is sent afresh.
        {
            let mut slot = self
                .peer
                .bulk
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if slot.as_ref().is_some_and(|b| b.key == key) {
                *slot = None;
            }
        }
        match answer {
            Ok(res) => {
                res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.peer.target, e)))
            }
            Err(BulkError::TooLarge(len)) => Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint((count as u64 / 2).max(1))
                    .with_source_error(&NetError(format!("request of {len} bytes"))),
            )),
            Err(BulkError::Connection(e)) => Err(unreachable(format!(
                "connection to {}: {e}",
                self.peer.addr
            ))),
            Err(BulkError::Stream(e)) => {
                Err(network_error(format!("rpc to {}: {e}", self.peer.addr)))
            }
        }
    }

    /// Send one request and read its response, within the RPC's soft deadline (openraft drops
    /// the call at the hard one).
    async fn call<E: StdError>(
        &self,
        req: &RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftResponse, RPCError<NodeId, NodeAddr, E>> {
        let ttl = option.soft_ttl();
        let conn = match tokio::time::timeout(ttl, self.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => {
                return Err(unreachable(format!(
                    "connecting to {}: timed out",
                    self.peer.addr
                )))
            }
        };
        let mut in_flight = InFlight {
            peer: &self.peer,
            conn_id: conn.stable_id(),
            done: false,
        };
        let res = match tokio::time::timeout(ttl, exchange(&conn, req)).await {
            Ok(res) => res,
            Err(_) => {
                return Err(network_error(format!(
                    "no answer from {} within {ttl:?}",
                    self.peer.addr
                )))
            }
        };
        match res {
            Ok(resp) => {
                in_flight.done = true;
                Ok(resp)
            }
            Err(CallError::TooLarge(len)) => {
                // Our own request was refused before sending; the connection is fine.
                in_flight.done = true;
                let hint = match req {
                    RaftRequest::AppendEntries(r) => (r.entries.len() as u64 / 2).max(1),
                    _ => 1,
                };
                Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(hint)
                        .with_source_error(&NetError(format!("request of {len} bytes"))),
                ))
            }
            Err(CallError::Connection(e)) => {
                // The connection is gone: forget it, and let openraft back off before retrying.
                self.peer.discard(conn.stable_id(), b"connection failed");
                Err(unreachable(format!(
                    "connection to {}: {e}",
                    self.peer.addr
                )))
            }
            Err(CallError::Stream(e)) => {
                Err(network_error(format!("rpc to {}: {e}", self.peer.addr)))
            }
        }
    }
}

enum CallError {
    TooLarge(usize),
    Connection(quinn::ConnectionError),
    Stream(String),
}

async fn exchange(conn: &quinn::Connection, req: &RaftRequest) -> Result<RaftResponse, CallError> {
    let (send, recv) = conn.open_bi().await.map_err(CallError::Connection)?;
    let mut writer = FrameWriter::with_max_frame(send, RAFT_MAX_FRAME);
    match writer.send(req).await {
        Ok(()) => {}
        Err(FrameError::TooLarge { len, .. }) => return Err(CallError::TooLarge(len)),
        Err(e) => return Err(CallError::Stream(e.to_string())),
    }
    // Only one request per stream; finishing tells the server nothing else follows.
    writer
        .finish()
        .map_err(|e| CallError::Stream(e.to_string()))?;
    let mut reader = FrameReader::with_max_frame(recv, RAFT_MAX_FRAME);
    match reader.recv::<RaftResponse>().await {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err(CallError::Stream(
            "peer closed the stream without answering".into(),
        )),
        Err(e) => Err(CallError::Stream(e.to_string())),
    }
}

fn unexpected<E: StdError>(want: &str, got: &RaftResponse) -> RPCError<NodeId, NodeAddr, E> {
    network_error(format!("expected a {want} response, got {}", got.kind()))
}

impl RaftNetwork<TypeConfig> for QuicRaftClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let bytes = entries_bytes(&rpc);
        if bytes >= BULK_APPEND_BYTES {
            return self.bulk_append(rpc, bytes, &option).await;
        }
        match self.call(&RaftRequest::AppendEntries(rpc), &option).await? {
            RaftResponse::AppendEntries(res) => {
                res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.peer.target, e)))
            }
            other => Err(unexpected("AppendEntries", &other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeAddr, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(&RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RaftResponse::InstallSnapshot(res) => {
                res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.peer.target, e)))
            }
            other => Err(unexpected("InstallSnapshot", &other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        match self.call(&RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(res) => {
                res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.peer.target, e)))
            }
            other => Err(unexpected("Vote", &other)),
        }
    }
}

/// Serve Raft RPCs on an accepted connection until it closes.
///
/// Call it once the TLS handshake has completed (e.g. after
/// `swarm_transport::Accepted::authenticate`): the peer must have authenticated with a
/// coordinator certificate, otherwise — a worker, most importantly — the connection is closed
/// with [`CLOSE_NOT_COORDINATOR`] and nothing is read from it. Each stream carries one request;
/// a malformed one only costs its own stream.
///
/// `arrivals` is told while a large request is read or answered, so that this node does
/// not campaign meanwhile (see [`super::sm_store::Receiving`]).
pub async fn serve_raft_connection(
    conn: quinn::Connection,
    raft: openraft::Raft<TypeConfig>,
    arrivals: Arrivals,
) {
    let remote = conn.remote_address();
    match peer_role(&conn) {
        Ok(Role::Coordinator) => {}
        Ok(role) => {
            tracing::warn!(%remote, %role, "refusing Raft RPCs from a non-coordinator peer");
            conn.close(
                quinn::VarInt::from_u32(CLOSE_NOT_COORDINATOR),
                b"raft requires a coordinator certificate",
            );
            return;
        }
        Err(e) => {
            tracing::warn!(%remote, error = %e, "refusing Raft RPCs: cannot establish the peer's role");
            conn.close(
                quinn::VarInt::from_u32(CLOSE_NOT_COORDINATOR),
                b"raft requires a coordinator certificate",
            );
            return;
        }
    }
    serve_streams(conn, raft, arrivals).await;
}

async fn serve_streams(
    conn: quinn::Connection,
    raft: openraft::Raft<TypeConfig>,
    arrivals: Arrivals,
) {
    let remote = conn.remote_address();
    let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_RPCS));
    loop {
        // Take a slot before accepting, so a peer cannot make us hold unbounded requests.
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "raft connection closed");
                return;
            }
        };
        let raft = raft.clone();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            serve_stream(send, recv, raft, remote, arrivals).await;
            drop(permit);
        });
    }
}

async fn serve_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    raft: openraft::Raft<TypeConfig>,
    remote: SocketAddr,
    arrivals: Arrivals,
) {
    let mut reader = FrameReader::with_max_frame(recv, RAFT_MAX_FRAME);
    let mut writer = FrameWriter::with_max_frame(send, RAFT_MAX_FRAME);
    // Only the leader sends large requests (entries, snapshot chunks); while one arrives
    // and until it is answered, the leader's heartbeats to this node wait behind it. A
    // request that stops arriving (a leader stopped or cut off mid-send) no longer
    // counts, so this node campaigns again without waiting for the connection to die.
    let mut under_way = None;
    let mut arrival = Arrival::default();
    let received = loop {
        tokio::select! {
            r = reader.recv::<RaftRequest>() => break r,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let now = tokio::time::Instant::now();
                match arrival.observe(reader.buffered(), now.into_std()) {
                    true if under_way.is_none() => under_way = Some(arrivals.append()),
                    false if under_way.is_some() => {
                        tracing::debug!(%remote, "a large Raft request stalled");
                        under_way = None;
                    }
                    _ => {}
                }
            }
        }
    };
    let req = match received {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            if e.is_malformed() {
                tracing::warn!(%remote, error = %e, "malformed Raft request; closing its stream");
            } else {
                tracing::debug!(%remote, error = %e, "Raft request stream failed");
            }
            let code = quinn::VarInt::from_u32(STREAM_MALFORMED);
            // Already-closed streams are fine here: we are giving up on this one anyway.
            let _ = reader.get_mut().stop(code);
            let _ = writer.get_mut().reset(code);
            return;
        }
    };
    let resp = match req {
        RaftRequest::AppendEntries(rpc) if !consecutive(&rpc) => {
            // openraft would append it after the wrong entry; the sender retries anew.
            tracing::warn!(
                %remote,
                prev = ?rpc.prev_log_id,
                first = ?rpc.entries.first().map(|e| e.log_id),
                "refusing an AppendEntries whose entries do not follow its prev_log_id"
            );
            let code = quinn::VarInt::from_u32(STREAM_MALFORMED);
            let _ = writer.get_mut().reset(code);
            return;
        }
        RaftRequest::AppendEntries(rpc) => {
            if under_way.is_none() && entries_bytes(&rpc) >= BULK_APPEND_BYTES {
                under_way = Some(arrivals.append());
            }
            RaftResponse::AppendEntries(raft.append_entries(rpc).await)
        }
        RaftRequest::Vote(rpc) => RaftResponse::Vote(raft.vote(rpc).await),
        RaftRequest::InstallSnapshot(rpc) => {
            RaftResponse::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
        RaftRequest::TimeoutNow(req) => RaftResponse::TimeoutNow(timeout_now(&raft, req).await),
    };
    if let Err(e) = send_response(&mut writer, &resp).await {
        tracing::debug!(%remote, error = %e, "could not send Raft response");
    }
    drop(under_way);
}

/// Whether an AppendEntries' entries run without a gap from just after `prev_log_id`.
fn consecutive(rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
    let first = rpc.prev_log_id.map_or(0, |p| p.index + 1);
    rpc.entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.log_id.index == first + i as u64)
}

/// How long a large request may receive nothing before it stops holding elections off.
const APPEND_STALL: Duration = Duration::from_secs(1);

/// Whether a request being read counts as a large append under way: at least
/// [`BULK_APPEND_BYTES`] received and some of it within [`APPEND_STALL`].
#[derive(Debug, Default)]
struct Arrival {
    buffered: usize,
    since: Option<std::time::Instant>,
}

impl Arrival {
    /// Note `buffered` bytes received at `now`; returns whether the request counts.
    fn observe(&mut self, buffered: usize, now: std::time::Instant) -> bool {
        if buffered != self.buffered || self.since.is_none() {
            self.buffered = buffered;
            self.since = Some(now);
        }
        buffered >= BULK_APPEND_BYTES
            && self
                .since
                .is_some_and(|t| now.saturating_duration_since(t) < APPEND_STALL)
    }
}

/// Start an election at once if `req` comes from the leader this node follows and this
/// node's log holds the leader's last entry (a leadership hand-off), else say why not.
async fn timeout_now(
    raft: &openraft::Raft<TypeConfig>,
    req: TimeoutNowRequest,
) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    check_timeout_now(&m, &req)?;
    tracing::info!(
        leader = %req.vote.leader_id(),
        "the leader hands leadership over to this node: starting an election now"
    );
    raft.trigger()
        .elect()
        .await
        .map_err(|e| format!("cannot start an election: {e}"))
}

/// Whether a node in state `m` may act on `req` (see [`timeout_now`]).
fn check_timeout_now(
    m: &openraft::RaftMetrics<NodeId, NodeAddr>,
    req: &TimeoutNowRequest,
) -> Result<(), String> {
    if !req.vote.is_committed() || m.vote != req.vote {
        return Err(format!(
            "node {} follows {}, not the sender's leadership {}",
            m.id, m.vote, req.vote
        ));
    }
    if m.state != ServerState::Follower {
        return Err(format!("node {} is {:?}, not a follower", m.id, m.state));
    }
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == m.id)
    {
        return Err(format!("node {} is not a voter", m.id));
    }
    let want = req.last_log_id.map(|l| l.index);
    if m.last_log_index < want {
        return Err(format!(
            "node {}'s log ends at {:?}, before the leader's last entry {want:?}",
            m.id, m.last_log_index
        ));
    }
    Ok(())
}

async fn send_response(
    writer: &mut FrameWriter,
    resp: &RaftResponse,
) -> Result<(), TransportError> {
    writer.send(resp).await?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, Membership, RaftMetrics, StoredMembership};

    use super::*;

    #[test]
    fn only_entries_that_follow_prev_log_id_are_taken() {
        let lid = |i| openraft::LogId::new(CommittedLeaderId::new(2, 2), i);
        let rpc = |prev: Option<u64>, ids: &[u64]| AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(2, 2),
            prev_log_id: prev.map(lid),
            leader_commit: None,
            entries: ids
                .iter()
                .map(|i| openraft::Entry {
                    log_id: lid(*i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
        };
        assert!(consecutive(&rpc(Some(105), &[106, 107])));
        assert!(consecutive(&rpc(None, &[0, 1])));
        assert!(consecutive(&rpc(Some(105), &[])));
        // Seed 1035: prev 105, entries from 130 (the leader had purged 106..129).
        assert!(!consecutive(&rpc(Some(105), &[130, 131])));
        assert!(!consecutive(&rpc(Some(105), &[106, 108])));
    }

    /// A large request holds elections off while it arrives, not once it stalls, and
    /// again once it moves on.
    #[test]
    fn a_stalled_large_request_stops_holding_elections_off() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut a = Arrival::default();
        assert!(!a.observe(1000, at(0)), "small so far");
        assert!(a.observe(BULK_APPEND_BYTES, at(50)));
        assert!(a.observe(BULK_APPEND_BYTES + 10, at(100)));
        // Nothing more arrives.
        assert!(a.observe(BULK_APPEND_BYTES + 10, at(1050)));
        assert!(
            !a.observe(BULK_APPEND_BYTES + 10, at(1100)),
            "stalled for 1 s"
        );
        assert!(!a.observe(BULK_APPEND_BYTES + 10, at(5000)));
        // It moves again.
        assert!(a.observe(BULK_APPEND_BYTES + 20, at(5050)));
    }

    /// Node 2 following leader 1 in term 5, its log ending at 40; voters 1, 2, 3 and
    /// learner 4.
    fn follower() -> RaftMetrics<NodeId, NodeAddr> {
        let mut m = RaftMetrics::new_initial(2);
        m.vote = Vote::new_committed(5, 1);
        m.state = ServerState::Follower;
        m.current_leader = Some(1);
        m.last_log_index = Some(40);
        let nodes: BTreeMap<NodeId, NodeAddr> =
            (1..=4).map(|id| (id, NodeAddr::default())).collect();
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        m.membership_config = Arc::new(StoredMembership::new(
            None,
            Membership::new(vec![voters], nodes),
        ));
        m
    }

    fn request(term: u64, leader: NodeId, last: u64) -> TimeoutNowRequest {
        TimeoutNowRequest {
            vote: Vote::new_committed(term, leader),
            last_log_id: Some(LogId::new(CommittedLeaderId::new(term, leader), last)),
        }
    }

    #[test]
    fn timeout_now_is_obeyed_only_from_the_current_leader_by_a_caught_up_voter() {
        let m = follower();
        assert_eq!(check_timeout_now(&m, &request(5, 1, 40)), Ok(()));
        assert_eq!(check_timeout_now(&m, &request(5, 1, 39)), Ok(()));
        let refused = |m: &RaftMetrics<NodeId, NodeAddr>, req: TimeoutNowRequest, why: &str| {
            let e = check_timeout_now(m, &req).expect_err(why);
            assert!(e.contains(why), "{e}");
        };
        refused(&m, request(4, 1, 40), "not the sender's leadership");
        refused(&m, request(6, 1, 40), "not the sender's leadership");
        refused(&m, request(5, 3, 40), "not the sender's leadership");
        let mut uncommitted = request(5, 1, 40);
        uncommitted.vote = Vote::new(5, 1);
        refused(&m, uncommitted, "not the sender's leadership");
        refused(&m, request(5, 1, 41), "before the leader's last entry");
        let mut candidate = follower();
        candidate.state = ServerState::Candidate;
        refused(&candidate, request(5, 1, 40), "not a follower");
        let mut learner = follower();
        learner.id = 4;
        refused(&learner, request(5, 1, 40), "not a voter");
    }

    #[test]
    fn server_name_is_the_host_part() {
        assert_eq!(server_name("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(
            server_name("coord-1.example.com:7000"),
            "coord-1.example.com"
        );
        assert_eq!(server_name("[::1]:7000"), "::1");
        assert_eq!(server_name("localhost"), "localhost");
    }
}
