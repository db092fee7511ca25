//! `/v1/tasks*` and `/v1/graphs`: submit (one, a batch or a graph), read, list, cancel,
//! retry, approve and reject tasks (the logic is [`crate::tasks`] and
//! [`crate::approvals`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use swarm_proto::api::{
    ApprovalDecision, SubmitBatch, SubmitGraph, SubmitTask, TaskList, TaskView,
};
use swarm_proto::TaskId;

use super::auth::check_swarm;
use super::ApiError;
use crate::access::Principal;
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
    Extension(p): Extension<Principal>,
    Query(q): Query<WaitQuery>,
    body: Result<Json<SubmitTask>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(task) = body?;
    check_swarm(&p, task.swarm.as_deref().unwrap_or_default())?;
    check_parents(&node, &p, &task.depends_on).await?;
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
    Extension(p): Extension<Principal>,
    body: Result<Json<SubmitBatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(batch) = body?;
    for t in &batch.tasks {
        check_swarm(&p, t.swarm.as_deref().unwrap_or_default())?;
        check_parents(&node, &p, &t.depends_on).await?;
    }
    let submitted = tasks::submit_batch(&node, batch).await?;
    Ok((StatusCode::CREATED, Json(submitted)).into_response())
}

/// `POST /v1/graphs`: named steps with edges, committed together (`201`; `200` when
/// every step existed already under its idempotency key).
pub(super) async fn submit_graph(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    body: Result<Json<SubmitGraph>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(graph) = body?;
    for s in &graph.steps {
        check_swarm(&p, s.task.swarm.as_deref().unwrap_or_default())?;
        check_parents(&node, &p, &s.task.depends_on).await?;
    }
    let submitted = tasks::submit_graph(&node, graph).await?;
    let status = if submitted.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(submitted)).into_response())
}

/// A token limited to swarms may name as parents only tasks of those swarms: a
/// dependant receives its parents' outputs.
async fn check_parents(node: &Node, p: &Principal, parents: &[TaskId]) -> Result<(), ApiError> {
    if p.swarms.is_none() {
        return Ok(());
    }
    for id in parents {
        task_of(node, p, &id.to_string()).await?;
    }
    Ok(())
}

/// `GET /v1/tasks/{id}`
pub(super) async fn get_task(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<TaskView> {
    let wait = tasks::wait_of(&node, q.wait.as_deref())?;
    // Not a wait on a task this token may not see.
    let id = task_of(&node, &p, &id).await?;
    Ok(Json(tasks::get(&node, id, wait).await?))
}

/// The task `id` names, if the caller may act on its swarm (`403` otherwise): a token
/// limited to swarms costs a read of the task first.
async fn task_of(node: &Node, p: &Principal, id: &str) -> Result<TaskId, ApiError> {
    let id = tasks::parse_id(id)?;
    if p.swarms.is_some() {
        check_swarm(p, &tasks::get(node, id, None).await?.swarm)?;
    }
    Ok(id)
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    order: Option<String>,
    after: Option<TaskId>,
    limit: Option<usize>,
    agent: Option<String>,
    swarm: Option<String>,
    label: Option<String>,
    text: Option<String>,
}

/// `GET /v1/tasks?order=&after=&limit=&state=&agent=&swarm=&label=&text=` — one page
/// of tasks by id, every parameter optional, the filters combined with AND:
///
/// * `order`: `asc` (default) or `desc` (newest first); anything else is a `400`;
/// * `after`: the last id of the previous page in this order (`desc`: ids below it;
///   without it, from the newest); `next_after` in the reply leads on the same way;
/// * `limit`: 1 to 1000 (default 100);
/// * `state`: one task state;
/// * `agent`: the task's agent, or any stage agent of a ring task;
/// * `swarm`: the task's swarm, exactly;
/// * `label`: `k=v`, several comma-separated, each among the task's labels (malformed:
///   `400`);
/// * `text`: a substring of the payload, ASCII case-insensitive, UTF-8 payloads only, at
///   most 256 bytes (longer: `400`).
///
/// One request examines at most [`tasks::LIST_SCAN_BUDGET`] tasks: with filters a page
/// may hold fewer than `limit`, even none, and still carry `next_after` (where the scan
/// stopped); `next_after` is absent only when the listing is exhausted. A token limited
/// to swarms sees only their tasks: a page may then hold fewer too (`next_after` still
/// leads on).
pub(super) async fn list_tasks(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> ApiResult<TaskList> {
    let params = tasks::ListParams {
        state: q.state,
        order: q.order,
        after: q.after,
        limit: q.limit,
        agent: q.agent,
        swarm: q.swarm,
        label: q.label,
        text: q.text,
    };
    let mut list = tasks::list(&node, params).await?;
    list.tasks.retain(|t| p.may_use_swarm(&t.swarm));
    Ok(Json(list))
}

/// `POST /v1/tasks/{id}/retry`: run a `failed` or `dead_lettered` task again (`409`
/// for a task in another state).
pub(super) async fn retry_task(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<TaskView> {
    let id = task_of(&node, &p, &id).await?;
    Ok(Json(tasks::retry(&node, id).await?))
}

/// `POST /v1/tasks/retry` with `{"state": "failed"|"dead_lettered", "agent", "swarm",
/// "label", "text", "after", "limit"}`: run again one page (oldest first, at most 1000)
/// of the tasks the filter selects; `{"retried": [ids], "next_after"}`.
pub(super) async fn retry_tasks(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    body: Result<Json<tasks::BulkRetry>, JsonRejection>,
) -> ApiResult<tasks::BulkRetried> {
    let Json(b) = body?;
    Ok(Json(
        tasks::retry_matching(&node, b, |swarm| p.may_use_swarm(swarm)).await?,
    ))
}

/// `POST /v1/tasks/{id}/cancel`
pub(super) async fn cancel_task(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<TaskView> {
    let id = task_of(&node, &p, &id).await?;
    Ok(Json(tasks::cancel(&node, id).await?))
}

/// `POST /v1/tasks/{id}/approve` with an optional `{"comment": "…"}`: queue a task
/// awaiting approval (`409 not_awaiting_approval` for a task in another state). The
/// caller's token name is recorded as who decided.
pub(super) async fn approve_task(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<TaskView> {
    decide(&node, &p, &id, true, &body).await
}

/// `POST /v1/tasks/{id}/reject` with an optional `{"comment": "…"}`: cancel a task
/// awaiting approval (its error names the rejection and the comment; its dependants are
/// cancelled with `dependency_failed`).
pub(super) async fn reject_task(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<TaskView> {
    decide(&node, &p, &id, false, &body).await
}

/// A decision: the body is empty or an [`ApprovalDecision`].
async fn decide(
    node: &Node,
    p: &Principal,
    id: &str,
    approve: bool,
    body: &[u8],
) -> ApiResult<TaskView> {
    let decision: ApprovalDecision = if body.iter().all(u8::is_ascii_whitespace) {
        ApprovalDecision::default()
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?
    };
    let id = task_of(node, p, id).await?;
    Ok(Json(
        crate::approvals::decide(node, id, approve, &p.name, decision.comment).await?,
    ))
}
