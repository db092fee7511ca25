//! `/v1/tasks*`: submit (one or a batch), read, list and cancel tasks (the logic is
//! [`crate::tasks`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use swarm_proto::api::{SubmitBatch, SubmitTask, TaskList, TaskView};
use swarm_proto::TaskId;

use super::ApiError;
use crate::node::Node;
use crate::tasks;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `?wait=5s` style query.
#[derive(Debug, Deserialize)]
pub(super) struct WaitQuery {
    wait: Option<String>,
}

/// `POST /v1/tasks`: `201` with the new task's id, `200` when an idempotency key named
/// an existing one.
pub(super) async fn submit(
    State(node): State<Arc<Node>>,
    Query(q): Query<WaitQuery>,
    body: Result<Json<SubmitTask>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(task) = body?;
    let wait = tasks::wait_of(&node, q.wait.as_deref())?;
    let submitted = tasks::submit(&node, task, wait).await?;
    let status = if submitted.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(submitted)).into_response())
}

/// `POST /v1/tasks/batch`: one Raft entry of submits.
pub(super) async fn submit_batch(
    State(node): State<Arc<Node>>,
    body: Result<Json<SubmitBatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(batch) = body?;
    let submitted = tasks::submit_batch(&node, batch).await?;
    Ok((StatusCode::CREATED, Json(submitted)).into_response())
}

/// `GET /v1/tasks/{id}`
pub(super) async fn get_task(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<TaskView> {
    let id = tasks::parse_id(&id)?;
    let wait = tasks::wait_of(&node, q.wait.as_deref())?;
    Ok(Json(tasks::get(&node, id, wait).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    after: Option<TaskId>,
    limit: Option<usize>,
}

/// `GET /v1/tasks`
pub(super) async fn list_tasks(
    State(node): State<Arc<Node>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<TaskList> {
    Ok(Json(
        tasks::list(&node, q.state.as_deref(), q.after, q.limit).await?,
    ))
}

/// `POST /v1/tasks/{id}/cancel`
pub(super) async fn cancel_task(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> ApiResult<TaskView> {
    let id = tasks::parse_id(&id)?;
    Ok(Json(tasks::cancel(&node, id).await?))
}
