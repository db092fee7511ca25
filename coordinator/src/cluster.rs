//! The cluster as the coordinators see it: each node reports on itself, the leader
//! reports on everyone, membership changes online, and a new node asks to join.
//!
//! * **Node reports** ([`node_status`], `GET /v1/node`): the node's own Raft state and
//!   health ([`health_check`], [`ready_check`]).
//! * **Cluster view** ([`cluster_view`], `GET /v1/cluster`, and `cluster` in
//!   `/v1/status`): the leader's membership with each node's replication lag and its own
//!   report, fetched in parallel with a short timeout so one dead node does not stall the
//!   answer.
//! * **Membership** ([`add_node`], [`remove_node`]): a new node joins as a learner, is
//!   caught up (from a snapshot when far behind), then becomes a voter; removal is one
//!   joint-consensus change. Refusals are [`ClusterError`]s.
//! * **Peers** ([`PeerHttp`]): how a node talks HTTP to the other nodes' APIs, for their
//!   reports here and for forwarding requests to the leader (`http::forward`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::http::header;
use bytes::Bytes;
use futures::future::BoxFuture;
use openraft::error::{ClientWriteError, RaftError};
use swarm_proto::api::{AddNode, ClusterView, NodeStatus, NodeView};

use crate::commit::CommitError;
use crate::node::Node;
use crate::raft::types::{NodeAddr, NodeId};

/// How long the leader waits for a node's own report.
const NODE_REPORT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such node in the cluster.
    #[error("no node {0} in the cluster")]
    UnknownNode(NodeId),
    /// The change conflicts with the membership (or Raft refused it).
    #[error("{0}")]
    Conflict(String),
    /// The joining node embeds patterns in another dimension than the cluster's
    /// ReasoningBank holds; no retry changes that.
    #[error("{0}")]
    DimensionMismatch(String),
    /// Not the leader, or Raft stopped.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// How a node talks HTTP to its peers' APIs: forwarding requests to the leader and asking
/// nodes for their reports. The default ([`ReqwestPeers`]) uses real sockets; a
/// deterministic simulation supplies one over its simulated network.
pub trait PeerHttp: Send + Sync + 'static {
    /// Send `req` (its URI is absolute: `http://host:port/path?query`) and read the whole
    /// answer, giving up after `timeout`. `Err` when no complete answer arrived.
    fn send(
        &self,
        req: ::http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<::http::Response<Bytes>, String>>;

    /// Send `req` and return as soon as the answer's head arrived (within `timeout`),
    /// with its body as the pieces come: for answers that do not end by themselves (an
    /// event stream). The body ends with an `Err` if the connection breaks.
    fn open(
        &self,
        req: ::http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, OpenResult>;
}

/// A streamed answer: its head, and its body piece by piece.
pub type OpenResult = Result<::http::Response<BodyStream>, String>;

/// The body of an [`PeerHttp::open`] answer.
pub type BodyStream = futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// [`PeerHttp`] over a [`reqwest::Client`].
pub struct ReqwestPeers(pub reqwest::Client);

impl ReqwestPeers {
    /// A client with a short connect timeout, as coordinators use by default.
    pub fn new() -> Self {
        ReqwestPeers(
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        )
    }

    /// A client for peers serving HTTPS: `tls` verifies them against the cluster CA and
    /// presents this coordinator's certificate (see
    /// [`swarm_transport::https_client_config`]).
    pub fn with_tls(tls: rustls::ClientConfig) -> Result<Self, String> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .use_preconfigured_tls(tls)
            .build()
            .map(ReqwestPeers)
            .map_err(|e| format!("building the HTTPS client for peers: {e}"))
    }
}

impl Default for ReqwestPeers {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerHttp for ReqwestPeers {
    fn send(
        &self,
        req: ::http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<::http::Response<Bytes>, String>> {
        let (parts, body) = req.into_parts();
        let rb = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .timeout(timeout)
            .body(body);
        Box::pin(async move {
            let resp = rb.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| format!("the answer did not finish: {e}"))?;
            let mut out = ::http::Response::new(bytes);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok(out)
        })
    }

    fn open(
        &self,
        req: ::http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, OpenResult> {
        let (parts, body) = req.into_parts();
        let rb = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body);
        Box::pin(async move {
            let resp = tokio::time::timeout(timeout, rb.send())
                .await
                .map_err(|_| format!("no answer within {timeout:?}"))?
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body: BodyStream = Box::pin(futures::TryStreamExt::map_err(
                resp.bytes_stream(),
                std::io::Error::other,
            ));
            let mut out = ::http::Response::new(body);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok(out)
        })
    }
}

fn role_name(state: openraft::ServerState) -> &'static str {
    match state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    }
}

/// Raft runs and the data directory takes a durable write (probed at most every
/// [`HEALTH_PROBE_EVERY`]). Never depends on quorum.
pub(crate) async fn health_check(node: &Node) -> Result<(), String> {
    if let Err(e) = &node.raft().metrics().borrow().running_state {
        return Err(format!("raft stopped: {e}"));
    }
    let dead = node
        .dead_loops
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if !dead.is_empty() {
        return Err(format!(
            "node loops stopped after repeated panics: {}",
            dead.join(", ")
        ));
    }
    // One probe at a time, and its result reused for a while: `/health` needs no token,
    // and a durable write per request would let anyone load the disk.
    let mut last = node.storage_probe.lock().await;
    if let Some((at, result)) = last.as_ref() {
        if at.elapsed() < HEALTH_PROBE_EVERY {
            return result.clone();
        }
    }
    let probe = node.data_dir.join(".health-probe");
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"ok")?;
        f.sync_all()
    })
    .await;
    let result = match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("storage: {e}")),
        Err(e) => Err(format!("storage probe: {e}")),
    };
    metrics::counter!("swarm_health_probes_total").increment(1);
    *last = Some((tokio::time::Instant::now(), result.clone()));
    result
}

/// How long a `/health` storage probe's result stands.
pub(crate) const HEALTH_PROBE_EVERY: Duration = Duration::from_secs(5);

/// A leader is known and this node has applied (almost) all of its log.
pub(crate) fn ready_check(node: &Node) -> Result<String, String> {
    let m = node.raft().metrics().borrow().clone();
    if let Err(e) = &m.running_state {
        return Err(format!("raft stopped: {e}"));
    }
    let applied = m.last_applied.map_or(0, |l| l.index);
    let lag = m.last_log_index.unwrap_or(0).saturating_sub(applied);
    let max_lag = node.config().limits.ready_max_lag;
    match m.current_leader {
        None => Err("no leader".into()),
        Some(_) if lag > max_lag => Err(format!("applied index trails the log by {lag}")),
        Some(l) => Ok(format!("ready (leader {l}, applied {applied})")),
    }
}

/// This node's report on itself.
pub(crate) async fn node_status(node: &Node) -> NodeStatus {
    let health = health_check(node).await;
    let ready = ready_check(node).is_ok();
    let m = node.raft().metrics().borrow().clone();
    NodeStatus {
        id: m.id,
        role: role_name(m.state).into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        healthy: health.is_ok(),
        health: health.err().unwrap_or_else(|| "ok".into()),
        ready,
    }
}

/// The highest index stored on a majority of voters (leader only; `None` elsewhere).
fn quorum_committed(
    leader_last: Option<u64>,
    me: NodeId,
    voters: &[NodeId],
    matched: &BTreeMap<NodeId, u64>,
) -> Option<u64> {
    if voters.is_empty() {
        return None;
    }
    let mut idx: Vec<u64> = voters
        .iter()
        .map(|v| {
            if *v == me {
                leader_last.unwrap_or(0)
            } else {
                matched.get(v).copied().unwrap_or(0)
            }
        })
        .collect();
    idx.sort_unstable_by(|a, b| b.cmp(a));
    idx.get(voters.len() / 2).copied()
}

/// The cluster as this node sees it from its own metrics (no network).
pub fn local_cluster_view(node: &Node) -> ClusterView {
    let m = node.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let matched: BTreeMap<u64, u64> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let is_leader = m.state == openraft::ServerState::Leader;
    let last = m.last_log_index;
    let nodes = membership
        .nodes()
        .map(|(id, addr)| {
            let role = if Some(*id) == m.current_leader {
                "leader"
            } else if *id == m.id {
                role_name(m.state)
            } else if voters.contains(id) {
                "follower"
            } else {
                "learner"
            };
            let matched_index = if *id == m.id {
                last
            } else {
                matched.get(id).copied()
            };
            NodeView {
                id: *id,
                raft_addr: addr.raft_addr.clone(),
                api_addr: addr.api_addr.clone(),
                role: role.into(),
                voter: voters.contains(id),
                matched_index,
                lag: if is_leader {
                    matched_index.map(|mi| last.unwrap_or(0).saturating_sub(mi))
                } else {
                    None
                },
                status: None,
                error: None,
            }
        })
        .collect();
    ClusterView {
        node_id: m.id,
        role: role_name(m.state).into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: last,
        committed_index: if is_leader {
            quorum_committed(last, m.id, &voters, &matched)
        } else {
            None
        },
        applied_index: m.last_applied.map(|l| l.index),
        nodes,
    }
}

/// The local view plus every node's own report, asked for in parallel.
pub async fn cluster_view(node: &Node) -> ClusterView {
    let mut view = local_cluster_view(node);
    let me = node.id();
    let asks = view.nodes.iter().map(|n| {
        let api = n.api_addr.clone();
        let id = n.id;
        async move {
            if id == me {
                return Ok(node_status(node).await);
            }
            ask_node(node, &api).await
        }
    });
    let answers = futures::future::join_all(asks).await;
    for (n, a) in view.nodes.iter_mut().zip(answers) {
        match a {
            Ok(s) => {
                if s.id != n.id {
                    n.error = Some(format!("{} answers as node {}", n.api_addr, s.id));
                } else {
                    n.status = Some(s);
                }
            }
            Err(e) => n.error = Some(e),
        }
    }
    view
}

async fn ask_node(node: &Node, api: &str) -> Result<NodeStatus, String> {
    let mut req = ::http::Request::get(node.peer_api_url(api, "/v1/node"));
    if let Some(auth) = node.peer_api_auth() {
        req = req.header(header::AUTHORIZATION, auth);
    }
    let req = req
        .body(Bytes::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = node
        .peer_http()
        .send(req, NODE_REPORT_TIMEOUT)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    serde_json::from_slice::<NodeStatus>(resp.body()).map_err(|e| format!("bad report: {e}"))
}

fn membership_error(
    node: &Node,
    e: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>,
) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => CommitError::NotLeader {
            leader_api: f
                .leader_node
                .map(|n| n.api_addr)
                .or_else(|| node.leader().map(|(_, n)| n.api_addr)),
        }
        .into(),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ClusterError::Conflict(format!("membership change refused: {c}"))
        }
        RaftError::Fatal(f) => CommitError::Unavailable(format!("raft stopped: {f}")).into(),
    }
}

/// Add a node (leader): add it as a learner, wait until it has caught up, then make it a
/// voter unless `voter` is false. Returns the cluster view afterwards.
pub(crate) async fn add_node(node: &Node, add: AddNode) -> Result<ClusterView, ClusterError> {
    if add.id == 0 {
        return Err(ClusterError::Invalid("node ids start at 1".into()));
    }
    for (what, a) in [("raft_addr", &add.raft_addr), ("api_addr", &add.api_addr)] {
        if a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(ClusterError::Invalid(format!(
                "{what} must be host:port, got {a:?}"
            )));
        }
    }
    if let Some(theirs) = add.pattern_dimension {
        let ours = node.table.memory(|m| m.config().pattern_dimension);
        if theirs != ours {
            return Err(ClusterError::DimensionMismatch(format!(
                "node {} embeds patterns in {theirs} dimensions but this cluster's \
                 ReasoningBank holds {ours}-dimensional embeddings; start it with the \
                 cluster's embedder",
                add.id
            )));
        }
    }
    let addr = NodeAddr {
        raft_addr: add.raft_addr.clone(),
        api_addr: add.api_addr.clone(),
    };
    let m = node.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    if let Some(existing) = membership.get_node(&add.id) {
        if *existing != addr {
            return Err(ClusterError::Conflict(format!(
                "node {} is already a member at {existing}; remove it first",
                add.id
            )));
        }
    }
    tracing::info!(node = add.id, %addr, "adding a learner");
    // Blocks until the learner has caught up with the leader's log (or its snapshot).
    node.raft()
        .add_learner(add.id, addr, true)
        .await
        .map_err(|e| membership_error(node, e))?;
    if add.voter {
        let mut voters: BTreeSet<NodeId> = node
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.insert(add.id) {
            tracing::info!(node = add.id, "promoting to voter");
            node.raft()
                .change_membership(voters, false)
                .await
                .map_err(|e| membership_error(node, e))?;
        }
    }
    Ok(cluster_view(node).await)
}

/// Remove node `id` (leader), a voter or a learner, as a client wrote it. Returns this
/// node's view of the cluster afterwards.
pub(crate) async fn remove_node(node: &Node, id: &str) -> Result<ClusterView, ClusterError> {
    let id: NodeId = id
        .parse()
        .map_err(|_| ClusterError::Invalid(format!("node id must be a number, got {id:?}")))?;
    let membership = node
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&id).is_none() {
        return Err(ClusterError::UnknownNode(id));
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
    if voters.is_empty() {
        return Err(ClusterError::Conflict(
            "cannot remove the last voter of the cluster".into(),
        ));
    }
    tracing::info!(node = id, "removing from the cluster");
    // `retain = false`: a removed voter does not stay on as a learner.
    node.raft()
        .change_membership(voters, false)
        .await
        .map_err(|e| membership_error(node, e))?;
    Ok(local_cluster_view(node))
}

/// How often the leader looks for a membership change left joint.
const FINISH_JOINT_EVERY: Duration = Duration::from_secs(1);
/// Longest the leader waits for the change that leaves a joint configuration.
const FINISH_JOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// On the leader, every [`FINISH_JOINT_EVERY`]: finish a membership change that a former
/// leader left half done. A change is two entries, the joint configuration (old and new
/// voters) and then the new one alone; a leader deposed between them leaves the cluster
/// joint, where every decision needs a majority of both sets, and nothing finishes it
/// (openraft does not; an operator's retried request would). So a leader that has seen
/// the same committed joint configuration on two rounds in a row moves to its newest
/// voter set, as the change intended (etcd's auto-leave). The round of grace lets a
/// change under way on this leader finish by itself. Found by the simulation (seed
/// 1004: a leader replaced while promoting its replacement). Runs until shutdown.
pub(crate) async fn finish_joint_loop(
    node: std::sync::Arc<Node>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    crate::node::every_while_leading(node, shutdown, FINISH_JOINT_EVERY, move |n| {
        let seen = seen.clone();
        async move { finish_joint(&n, &seen).await }
    })
    .await
}

async fn finish_joint(node: &Node, seen: &std::sync::Mutex<Option<openraft::LogId<NodeId>>>) {
    let m = node.raft().metrics().borrow().clone();
    let stored = &m.membership_config;
    let joint = stored.membership().get_joint_config();
    let committed = stored.log_id().is_some() && stored.log_id() <= &m.last_applied;
    let goal = {
        let mut seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.state != openraft::ServerState::Leader || joint.len() < 2 || !committed {
            *seen = None;
            return;
        }
        if *seen != *stored.log_id() {
            *seen = *stored.log_id();
            return;
        }
        let Some(goal) = joint.last().cloned() else {
            return;
        };
        goal
    };
    tracing::warn!(
        voters = ?goal,
        joint = ?joint,
        "finishing a membership change a former leader left joint"
    );
    // `retain = false`, as `add_node` and `remove_node` ask: a voter the change dropped
    // does not stay on as a learner.
    match tokio::time::timeout(
        FINISH_JOINT_TIMEOUT,
        node.raft().change_membership(goal, false),
    )
    .await
    {
        Ok(Ok(_)) => {
            metrics::counter!("swarm_membership_joint_finished_total").increment(1);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "leaving the joint configuration failed; retrying")
        }
        Err(_) => tracing::warn!("leaving the joint configuration timed out; retrying"),
    }
}

/// Ask the cluster behind `apis` (any member) to add this node; retried until it
/// succeeds or `shutdown` fires. Used by `swarm coordinator --join`. A refusal that no
/// retry can change (the node's embedder disagrees with the cluster's) is returned.
pub async fn join(
    http: reqwest::Client,
    apis: Vec<String>,
    token: String,
    add: AddNode,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let mut attempt = 0usize;
    loop {
        let api = &apis[attempt % apis.len()];
        attempt += 1;
        let url = format!("{}/v1/cluster/nodes", api.trim_end_matches('/'));
        let res = http
            .post(&url)
            .bearer_auth(&token)
            .json(&add)
            .timeout(Duration::from_secs(600))
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {
                tracing::info!(via = %api, "joined the cluster");
                return Ok(());
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if body.contains("embedder_dimension_mismatch") {
                    return Err(format!("the cluster at {api} refused this node: {body}"));
                }
                tracing::warn!(via = %api, %status, %body, "join refused; retrying");
            }
            Err(e) => tracing::warn!(via = %api, error = %e, "join failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quorum_committed;
    use std::collections::BTreeMap;

    #[test]
    fn commit_index_is_the_majority_match() {
        let matched: BTreeMap<u64, u64> = [(2, 7), (3, 4)].into();
        assert_eq!(quorum_committed(Some(9), 1, &[1, 2, 3], &matched), Some(7));
        let matched: BTreeMap<u64, u64> = [(2, 7), (3, 4), (4, 1), (5, 9)].into();
        assert_eq!(
            quorum_committed(Some(10), 1, &[1, 2, 3, 4, 5], &matched),
            Some(7)
        );
        assert_eq!(
            quorum_committed(Some(3), 1, &[1], &BTreeMap::new()),
            Some(3)
        );
        assert_eq!(quorum_committed(Some(3), 1, &[], &BTreeMap::new()), None);
    }
}
