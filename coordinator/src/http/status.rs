//! What a node reports: `/v1/status`, `/v1/workers` (and an operator's drain and resume
//! of one worker), and for orchestrators and Prometheus `/health`, `/ready` and
//! `/metrics` (outside `/v1`, no token).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{WorkerList, WorkerView};

use super::forward::{forward_or_refuse, leader_answers};
use super::ApiError;
use crate::cluster::{cluster_view, health_check, ready_check};
use crate::node::Node;
use crate::status::{status_view, worker_views};

/// `GET /v1/workers` (leader)
pub(super) async fn workers(State(node): State<Arc<Node>>) -> Result<Json<WorkerList>, ApiError> {
    Ok(Json(WorkerList {
        workers: worker_views(&node),
    }))
}

/// `POST /v1/workers/{id}/drain` (leader, scope `operate`): the worker takes no new work,
/// finishes what it runs and stays connected (see [`crate::workers`]). `202 Accepted`
/// with its view (`draining: true`, `drain: "operator"`): the worker acts on it
/// asynchronously; `404` when no such worker is connected, `409` when it speaks a
/// protocol older than 7.
pub(super) async fn drain_worker(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WorkerView>), ApiError> {
    let view = crate::workers::drain_worker(&node, &id, true)?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// `POST /v1/workers/{id}/resume` (leader, scope `operate`): the drained worker takes
/// work again. `202` with its view; `404`, `409` as for a drain, and `409` for a worker
/// being stopped.
pub(super) async fn resume_worker(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WorkerView>), ApiError> {
    let view = crate::workers::drain_worker(&node, &id, false)?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// `GET /v1/status`: answered by the leader (forwarded there when one is known), since
/// only the leader has the workers; without a leader, this node's own view says so.
pub(super) async fn status(State(node): State<Arc<Node>>, req: Request) -> Response {
    if leader_answers(&node, &req) {
        return forward_or_refuse(&node, req).await;
    }
    let cluster = cluster_view(&node).await;
    Json(status_view(&node, cluster)).into_response()
}

/// Liveness: the process answers, Raft runs and the data dir accepts a durable write.
/// Never depends on quorum.
pub(super) async fn health(State(node): State<Arc<Node>>) -> Response {
    match health_check(&node).await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Readiness: a leader exists and this node has applied (almost) all of its log.
pub(super) async fn ready(State(node): State<Arc<Node>>) -> Response {
    match ready_check(&node) {
        Ok(m) => (StatusCode::OK, format!("{m}\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// `GET /metrics`: the Prometheus text format.
pub(super) async fn metrics_text() -> Response {
    match crate::metrics::handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::Unavailable("metrics recorder not installed".into()).into_response(),
    }
}
