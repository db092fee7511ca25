//! The cluster side of the HTTP API: any node accepts any request (followers forward what
//! needs the leader), each node reports on itself, the leader reports on everyone, and
//! membership changes online.
//!
//! * **Forwarding** ([`leader_only`]): a request that needs the leader and arrives at a
//!   follower is replayed against the leader's API with the same method, path, query,
//!   token and body, and the leader's answer is returned as is. A forwarded request is
//!   marked ([`FORWARDED_BY`]) and is never forwarded twice: a node that receives one
//!   and is not the leader (leadership moved meanwhile) answers `503 not_leader` with
//!   the leader it knows, and clients retry.
//! * **Node reports** (`GET /v1/node`): the node's own Raft state and health.
//! * **Cluster view** (`GET /v1/cluster`, and `cluster` in `/v1/status`): the leader's
//!   membership with each node's replication lag and its own report, fetched in parallel
//!   with a short timeout so one dead node does not stall the answer.
//! * **Membership** (`POST /v1/cluster/nodes`, `DELETE /v1/cluster/nodes/{id}`): a new
//!   node joins as a learner, is caught up (from a snapshot when far behind), then
//!   becomes a voter; removal is one joint-consensus change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::{self, header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::future::BoxFuture;
use openraft::error::{ClientWriteError, RaftError};
use swarm_proto::api::{AddNode, ClusterView, NodeStatus, NodeView};

use crate::api::ApiError;
use crate::node::Node;
use crate::raft::types::{NodeAddr, NodeId};

/// Header naming the node that forwarded a request to the leader.
pub const FORWARDED_BY: &str = "x-swarm-forwarded-by";

/// How long the leader waits for a node's own report.
const NODE_REPORT_TIMEOUT: Duration = Duration::from_millis(500);

/// Middleware for routes that must run on the leader: run here if leading, else forward.
pub(crate) async fn leader_only(
    State(node): State<Arc<Node>>,
    req: Request,
    next: Next,
) -> Response {
    if node.is_leader() {
        return next.run(req).await;
    }
    forward_or_refuse(&node, req).await
}

/// For streamed requests (backups, restores): run here if leading, else refuse with
/// `not_leader` naming the leader, where the client goes itself (a forward would hold
/// the whole stream in this node's memory).
pub(crate) async fn leader_here(
    State(node): State<Arc<Node>>,
    req: Request,
    next: Next,
) -> Response {
    if node.is_leader() {
        return next.run(req).await;
    }
    ApiError::NotLeader {
        leader_api: node
            .leader()
            .filter(|(id, _)| *id != node.id())
            .map(|(_, a)| a.api_addr),
    }
    .into_response()
}

/// Replay `req` against the leader, or refuse with `not_leader` when that is impossible
/// or the request was forwarded already.
pub(crate) async fn forward_or_refuse(node: &Node, req: Request) -> Response {
    let leader = node.leader().filter(|(id, _)| *id != node.id());
    match leader {
        Some((_, addr)) if !req.headers().contains_key(FORWARDED_BY) => {
            forward(node, &addr.api_addr, req).await
        }
        other => ApiError::NotLeader {
            leader_api: other.map(|(_, a)| a.api_addr),
        }
        .into_response(),
    }
}

async fn forward(node: &Node, leader_api: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let limit = node.body_limit();
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::PayloadTooLarge(format!("request body: {e}")).into_response();
        }
    };
    let url = format!("http://{leader_api}{path}");
    // Long enough for the longest `?wait=` the leader allows.
    let timeout = node.config().limits.max_wait + Duration::from_secs(30);
    let mut rb = http::Request::builder()
        .method(parts.method.clone())
        .uri(&url)
        .header(FORWARDED_BY, node.id().to_string());
    for h in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&h) {
            rb = rb.header(h, v.clone());
        }
    }
    let fwd = match rb.body(body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::Internal(format!("cannot forward to {url}: {e}")).into_response()
        }
    };
    metrics::counter!("swarm_api_forwarded_total").increment(1);
    let resp = match node.peer_http().send(fwd, timeout).await {
        Ok(r) => r,
        Err(e) => {
            return ApiError::Unavailable(format!(
            "this node is not the leader and forwarding to the leader at {leader_api} failed: {e}"
        ))
            .into_response()
        }
    };
    let (head, bytes) = resp.into_parts();
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = head.status;
    if let Some(ct) = head.headers.get(header::CONTENT_TYPE) {
        out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    out
}

/// How a node talks HTTP to its peers' APIs: forwarding requests to the leader and asking
/// nodes for their reports. The default ([`ReqwestPeers`]) uses real sockets; a
/// deterministic simulation supplies one over its simulated network.
pub trait PeerHttp: Send + Sync + 'static {
    /// Send `req` (its URI is absolute: `http://host:port/path?query`) and read the whole
    /// answer, giving up after `timeout`. `Err` when no complete answer arrived.
    fn send(
        &self,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, String>>;
}

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
}

impl Default for ReqwestPeers {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerHttp for ReqwestPeers {
    fn send(
        &self,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, String>> {
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
            let mut out = http::Response::new(bytes);
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

/// Raft runs and the data directory takes a durable write. Never depends on quorum.
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
    let probe = node.data_dir.join(".health-probe");
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"ok")?;
        f.sync_all()
    })
    .await;
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("storage: {e}")),
        Err(e) => Err(format!("storage probe: {e}")),
    }
}

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

/// `GET /v1/node`.
pub(crate) async fn get_node(State(node): State<Arc<Node>>) -> Json<NodeStatus> {
    Json(node_status(&node).await)
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
    let req = http::Request::get(format!("http://{api}/v1/node"))
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", node.config().api_token),
        )
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

/// `GET /v1/cluster`: the leader's view with every node's report (forwarded to the leader
/// when one is known; otherwise this node's own view, which says there is no leader).
pub(crate) async fn get_cluster(State(node): State<Arc<Node>>, req: Request) -> Response {
    if !node.is_leader() && !req.headers().contains_key(FORWARDED_BY) && node.leader().is_some() {
        return forward_or_refuse(&node, req).await;
    }
    Json(cluster_view(&node).await).into_response()
}

fn membership_error(
    node: &Node,
    e: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>,
) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ApiError::NotLeader {
            leader_api: f
                .leader_node
                .map(|n| n.api_addr)
                .or_else(|| node.leader().map(|(_, n)| n.api_addr)),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ApiError::Conflict(format!("membership change refused: {c}"))
        }
        RaftError::Fatal(f) => ApiError::Unavailable(format!("raft stopped: {f}")),
    }
}

/// `POST /v1/cluster/nodes` (leader): add a learner, wait until it has caught up, then
/// make it a voter unless `voter` is false.
pub(crate) async fn add_node(
    State(node): State<Arc<Node>>,
    body: Result<Json<AddNode>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(add) = body?;
    if add.id == 0 {
        return Err(ApiError::BadRequest("node ids start at 1".into()));
    }
    for (what, a) in [("raft_addr", &add.raft_addr), ("api_addr", &add.api_addr)] {
        if a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(ApiError::BadRequest(format!(
                "{what} must be host:port, got {a:?}"
            )));
        }
    }
    if let Some(theirs) = add.pattern_dimension {
        let ours = node.table.memory(|m| m.config().pattern_dimension);
        if theirs != ours {
            return Err(ApiError::Coded {
                status: StatusCode::CONFLICT,
                code: "embedder_dimension_mismatch".into(),
                message: format!(
                    "node {} embeds patterns in {theirs} dimensions but this cluster's \
                     ReasoningBank holds {ours}-dimensional embeddings; start it with the \
                     cluster's embedder",
                    add.id
                ),
            });
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
            return Err(ApiError::Conflict(format!(
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
        .map_err(|e| membership_error(&node, e))?;
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
                .map_err(|e| membership_error(&node, e))?;
        }
    }
    Ok((StatusCode::OK, Json(cluster_view(&node).await)).into_response())
}

/// `DELETE /v1/cluster/nodes/{id}` (leader): remove a voter or learner.
pub(crate) async fn remove_node(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: NodeId = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("node id must be a number, got {id:?}")))?;
    let membership = node
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&id).is_none() {
        return Err(ApiError::NotFound(format!("no node {id} in the cluster")));
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
    if voters.is_empty() {
        return Err(ApiError::Conflict(
            "cannot remove the last voter of the cluster".into(),
        ));
    }
    tracing::info!(node = id, "removing from the cluster");
    // `retain = false`: a removed voter does not stay on as a learner.
    node.raft()
        .change_membership(voters, false)
        .await
        .map_err(|e| membership_error(&node, e))?;
    Ok((StatusCode::OK, Json(local_cluster_view(&node))).into_response())
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
