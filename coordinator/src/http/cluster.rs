//! `/v1/node`, `/v1/cluster` and `/v1/cluster/nodes*`: reports and membership changes
//! (the logic is [`crate::cluster`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{AddNode, NodeStatus};

use super::forward::{forward_or_refuse, leader_answers};
use super::ApiError;
use crate::cluster;
use crate::node::Node;

/// `GET /v1/node`: this node's report on itself.
pub(super) async fn get_node(State(node): State<Arc<Node>>) -> Json<NodeStatus> {
    Json(cluster::node_status(&node).await)
}

/// `GET /v1/cluster`: the leader's view with every node's report (forwarded to the leader
/// when one is known; otherwise this node's own view, which says there is no leader).
pub(super) async fn get_cluster(State(node): State<Arc<Node>>, req: Request) -> Response {
    if leader_answers(&node, &req) {
        return forward_or_refuse(&node, req).await;
    }
    Json(cluster::cluster_view(&node).await).into_response()
}

/// `POST /v1/cluster/nodes` (leader): add a learner, wait until it has caught up, then
/// make it a voter unless `voter` is false.
pub(super) async fn add_node(
    State(node): State<Arc<Node>>,
    body: Result<Json<AddNode>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(add) = body?;
    let view = cluster::add_node(&node, add).await?;
    Ok((StatusCode::OK, Json(view)).into_response())
}

/// `DELETE /v1/cluster/nodes/{id}` (leader): remove a voter or learner.
pub(super) async fn remove_node(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = cluster::remove_node(&node, &id).await?;
    Ok((StatusCode::OK, Json(view)).into_response())
}
