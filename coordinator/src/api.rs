//! The HTTP API (axum): `/v1/*` behind a bearer token, plus `/health`, `/ready` and
//! `/metrics` for orchestrators and Prometheus.
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a stable `code`
//! ([`ApiError::code`]); bad JSON, oversize bodies and unknown fields are errors, never
//! panics, and a refused submit changes nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use swarm_proto::api::{
    ClusterView, ErrorBody, ErrorDetail, QueueCounts, StatusView, SubmitBatch, SubmitBatchResponse,
    SubmitResponse, SubmitTask, TaskList, TaskState, TaskView, Throughput, WorkerList, WorkerView,
};
use swarm_proto::TaskId;

use crate::cluster::{
    self, cluster_view, forward_or_refuse, health_check, ready_check, FORWARDED_BY,
};
use crate::limits::{ENTRY_BUDGET, MAX_OP_BYTES};
use crate::node::{now_ms, Node};
use crate::proposer::ProposeError;
use crate::state::{Lookup, Op, OpResult, TaskSpec};
use crate::{backup, memory};

/// Why a request failed; each variant has a stable code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("queue full: {limit} unfinished tasks; retry later")]
    QueueFull { limit: u64 },
    #[error("this coordinator is not the leader")]
    NotLeader { leader_api: Option<String> },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A refused request with its own stable code (memory, ReasoningBank and swarm
    /// errors).
    #[error("{message}")]
    Coded {
        status: StatusCode,
        code: String,
        message: String,
    },
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Coded { code, .. } => code,
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Coded { status, .. } => *status,
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotLeader { .. } | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let leader_api = match &self {
            ApiError::NotLeader { leader_api } => leader_api.clone(),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
                leader_api,
            },
        };
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::InvalidJson(r.body_text())
        }
    }
}

impl ApiError {
    pub(crate) fn from_propose(node: &Node, e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => ApiError::NotLeader {
                leader_api: leader.or_else(|| node.leader()).map(|(_, n)| n.api_addr),
            },
            ProposeError::Raft(m) => ApiError::Unavailable(format!("could not commit: {m}")),
            e @ (ProposeError::Busy(_) | ProposeError::Timeout(_)) => {
                ApiError::Unavailable(e.to_string())
            }
            e @ ProposeError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Build the router. `/v1/*` requires `Authorization: Bearer <token>`.
pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.body_limit();
    // Routes that need the leader; a follower forwards them.
    // Handlers that need the leader; on a follower the request is forwarded.
    let lead = || middleware::from_fn_with_state(node.clone(), cluster::leader_only);
    // Streamed handlers run on the leader only; elsewhere the client is sent there.
    let here = || middleware::from_fn_with_state(node.clone(), cluster::leader_here);
    let v1 = Router::new()
        .route(
            "/tasks",
            post(submit.layer(lead())).get(list_tasks.layer(lead())),
        )
        .route("/tasks/batch", post(submit_batch.layer(lead())))
        .route("/tasks/{id}", get(get_task.layer(lead())))
        .route("/tasks/{id}/cancel", post(cancel_task.layer(lead())))
        .route("/workers", get(workers.layer(lead())))
        .route("/cluster/nodes", post(cluster::add_node.layer(lead())))
        .route(
            "/cluster/nodes/{id}",
            delete(cluster::remove_node.layer(lead())),
        )
        // Status and cluster views forward by themselves (and answer locally without a
        // leader); memory reads are served by this node's replica.
        .route("/status", get(status))
        .route("/node", get(cluster::get_node))
        .route("/cluster", get(cluster::get_cluster))
        .route("/memory", get(memory::list_collections))
        .route(
            "/memory/{collection}",
            get(memory::get_collection)
                .put(memory::create_collection.layer(lead()))
                .delete(memory::drop_collection.layer(lead())),
        )
        .route(
            "/memory/{collection}/points",
            post(memory::upsert.layer(lead())),
        )
        .route(
            "/memory/{collection}/delete",
            post(memory::delete_points.layer(lead())),
        )
        .route("/memory/{collection}/search", post(memory::search))
        .route(
            "/patterns",
            get(memory::list_patterns).post(memory::add_patterns.layer(lead())),
        )
        .route("/patterns/retrieve", post(memory::retrieve))
        .route("/patterns/judge", post(memory::judge.layer(lead())))
        .route(
            "/swarms",
            get(crate::swarms::list.layer(lead())).post(crate::swarms::create.layer(lead())),
        )
        .route(
            "/swarms/{name}",
            get(crate::swarms::get.layer(lead())).delete(crate::swarms::delete.layer(lead())),
        )
        .route("/backup", get(backup::backup.layer(here())))
        .route(
            "/restore",
            post(
                backup::restore
                    .layer(here())
                    .layer(DefaultBodyLimit::disable()),
            ),
        )
        .route(
            "/patterns/consolidate",
            post(memory::consolidate.layer(lead())),
        )
        .layer(middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(node)
}

async fn require_token(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return ApiError::Unauthorized("missing bearer token (Authorization: Bearer <token>)")
            .into_response();
    };
    let given = value.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
    let expected = node.config().api_token.as_bytes();
    if given.is_empty() || !bool::from(given.ct_eq(expected)) {
        return ApiError::Unauthorized("invalid bearer token").into_response();
    }
    next.run(req).await
}

/// `?wait=5s` style query.
#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

/// Parse `250ms`, `5s`, `2m`, `3h`, `7d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 5s, 2m, 7d"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn wait_of(node: &Node, q: &WaitQuery) -> Result<Option<Duration>, ApiError> {
    let Some(w) = &q.wait else { return Ok(None) };
    let d = parse_duration(w).map_err(ApiError::BadRequest)?;
    let max = node.config().limits.max_wait;
    if d > max {
        return Err(ApiError::BadRequest(format!(
            "wait {w} exceeds the maximum of {}s",
            max.as_secs()
        )));
    }
    Ok(Some(d))
}

/// Turn a submit body into a spec, applying defaults and limits.
fn to_spec(node: &Node, t: SubmitTask) -> Result<TaskSpec, ApiError> {
    let limits = node.config().limits;
    let defaults = node.config().defaults;
    let swarm = t
        .swarm
        .clone()
        .unwrap_or_else(|| swarm_topology::DEFAULT_SWARM_NAME.to_string());
    let Some(record) = node.read_table(|tb| tb.swarm(&swarm)) else {
        return Err(crate::swarms::unknown_swarm(&swarm));
    };
    let stages = match &record.spec.topology {
        swarm_topology::TopologySpec::Ring { stages } => stages.clone(),
        _ => Vec::new(),
    };
    let mut agent = t.agent.clone();
    if !stages.is_empty() {
        if !agent.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "swarm {swarm:?} is a ring: its stages name the agents; omit `agent`"
            )));
        }
        agent = stages[0].agent.clone();
    }
    if agent.is_empty() || agent.len() > 128 {
        return Err(ApiError::BadRequest(
            "`agent` must be 1 to 128 bytes".into(),
        ));
    }
    let payload = t.payload_bytes().map_err(ApiError::BadRequest)?;
    if payload.len() as u64 > limits.max_payload_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "payload of {} bytes exceeds the limit of {} bytes",
            payload.len(),
            limits.max_payload_bytes
        )));
    }
    let timeout_ms = t.timeout_ms.unwrap_or(defaults.timeout_ms);
    if timeout_ms == 0 || timeout_ms > 7 * 24 * 3600 * 1000 {
        return Err(ApiError::BadRequest(
            "`timeout_ms` must be between 1 and 604800000 (7 days)".into(),
        ));
    }
    let max_attempts = t.max_attempts.unwrap_or(defaults.max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(ApiError::BadRequest(
            "`max_attempts` must be between 1 and 100".into(),
        ));
    }
    if t.idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 256)
    {
        return Err(ApiError::BadRequest(
            "`idempotency_key` must be 1 to 256 bytes".into(),
        ));
    }
    if t.labels.len() > 32
        || t.labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256)
    {
        return Err(ApiError::BadRequest(
            "at most 32 `labels`, keys 1-64 bytes, values up to 256 bytes".into(),
        ));
    }
    if t.patterns > MAX_TASK_PATTERNS {
        return Err(ApiError::BadRequest(format!(
            "`patterns` is at most {MAX_TASK_PATTERNS}, got {}",
            t.patterns
        )));
    }
    let retain_ms = t
        .retain_ms
        .unwrap_or(node.config().retain_finished.as_millis() as u64);
    if retain_ms > MAX_RETAIN_MS {
        return Err(ApiError::BadRequest(format!(
            "`retain_ms` is at most {MAX_RETAIN_MS} (10 years), got {retain_ms}"
        )));
    }
    let spec = TaskSpec {
        agent,
        swarm,
        stages,
        payload,
        priority: t.priority,
        timeout_ms,
        max_attempts,
        idempotency_key: t.idempotency_key,
        labels: t.labels,
        patterns: t.patterns,
        retain_ms,
    };
    if spec.size_hint() > MAX_OP_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "the task takes {} bytes; one task is at most {MAX_OP_BYTES} bytes (a Raft entry holds {ENTRY_BUDGET})",
            spec.size_hint()
        )));
    }
    Ok(spec)
}

/// Longest retention a task may ask for.
const MAX_RETAIN_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The API view of task `id`, wherever it is; `404 task_expired` once purged.
pub(crate) fn task_view(node: &Node, id: TaskId) -> Result<TaskView, ApiError> {
    match node.table.lookup(id) {
        Ok(Lookup::Found(t)) => Ok(t.view()),
        Ok(Lookup::Expired) => Err(expired(id)),
        Ok(Lookup::Unknown) => Err(ApiError::NotFound(format!("no task {id}"))),
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}

fn expired(id: TaskId) -> ApiError {
    ApiError::Coded {
        status: StatusCode::NOT_FOUND,
        code: "task_expired".into(),
        message: format!(
            "task {id} finished and was purged when its retention ended \
             (`retain_ms` at submit, default --retain-finished)"
        ),
    }
}

/// The answer while a restore is in progress.
pub(crate) fn restoring() -> ApiError {
    ApiError::Coded {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "restore_in_progress".into(),
        message: "a restore is in progress; the cluster takes no other change until it ends".into(),
    }
}

/// Most ReasoningBank patterns one task may ask for.
const MAX_TASK_PATTERNS: u32 = 64;

fn submit_ops(node: &Node, specs: Vec<TaskSpec>) -> Vec<Op> {
    let now = now_ms();
    let queue_limit = node.config().limits.queue_limit;
    specs
        .into_iter()
        .map(|spec| Op::Submit {
            spec,
            now_ms: now,
            queue_limit,
        })
        .collect()
}

/// Refuses `n` submits (`429`, before anything is proposed) when the queue has no room
/// for them. The queue limit is checked again when the submits apply (the authoritative,
/// replicated check); this one keeps a refused submit from costing a Raft entry. A
/// single submit with an idempotency key skips it: it may name a task that exists.
fn admit_to_queue(node: &Node, n: usize) -> Result<(), ApiError> {
    let limit = node.config().limits.queue_limit;
    let room = node.read_table(|t| limit.saturating_sub(t.unfinished()));
    if n as u64 > room {
        metrics::counter!("swarm_submit_rejected_total", "reason" => "queue_full")
            .increment(n as u64);
        return Err(ApiError::QueueFull { limit });
    }
    Ok(())
}

/// Longest a submit waits for checkpoints to catch up before it is refused.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// Holds a submit while the changes held since the last checkpoint exceed half of
/// `--snapshot-bytes` (twice what triggers a checkpoint): checkpoints are falling behind
/// the applied stream, and the memory those changes take would otherwise grow with
/// throughput × checkpoint time. Admission resumes as soon as a checkpoint lands; after
/// [`CHECKPOINT_WAIT`] the submit is refused (503, nothing committed).
async fn wait_for_checkpoints(node: &Node) -> Result<(), ApiError> {
    let cap = (node.config().snapshot_bytes / 2) as usize;
    if node.table.changes_bytes() <= cap {
        return Ok(());
    }
    metrics::counter!("swarm_submit_held_total", "reason" => "checkpoint_behind").increment(1);
    let deadline = tokio::time::Instant::now() + CHECKPOINT_WAIT;
    while node.table.changes_bytes() > cap {
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable(format!(
                "state checkpoints are behind (over {cap} bytes of changes held); retry later"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn submit(
    State(node): State<Arc<Node>>,
    Query(q): Query<WaitQuery>,
    body: Result<Json<SubmitTask>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(task) = body?;
    let wait = wait_of(&node, &q)?;
    let spec = to_spec(&node, task)?;
    if spec.idempotency_key.is_none() {
        admit_to_queue(&node, 1)?;
    }
    wait_for_checkpoints(&node).await?;
    let results = node
        .propose_client(submit_ops(&node, vec![spec]))
        .await
        .map_err(|e| ApiError::from_propose(&node, e))?;
    node.count_results(&results);
    let (id, duplicate) = match results.first() {
        Some(OpResult::Submitted { id, duplicate }) => (*id, *duplicate),
        Some(OpResult::QueueFull { limit }) => return Err(ApiError::QueueFull { limit: *limit }),
        Some(OpResult::Swarm(Err(f))) => return Err(crate::swarms::fault(f)),
        Some(OpResult::Restoring) => return Err(restoring()),
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected submit result {other:?}"
            )))
        }
    };
    let mut task = None;
    if let Some(wait) = wait {
        node.wait_final(id, wait).await;
        task = Some(task_view(&node, id)?);
    }
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(SubmitResponse {
            id,
            duplicate,
            task,
        }),
    )
        .into_response())
}

async fn submit_batch(
    State(node): State<Arc<Node>>,
    body: Result<Json<SubmitBatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(batch) = body?;
    let max = node.config().limits.max_batch;
    if batch.tasks.is_empty() || batch.tasks.len() > max {
        return Err(ApiError::BadRequest(format!(
            "a batch holds 1 to {max} tasks, got {}",
            batch.tasks.len()
        )));
    }
    let specs = batch
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            to_spec(&node, t).map_err(|e| match e {
                ApiError::BadRequest(m) => ApiError::BadRequest(format!("tasks[{i}]: {m}")),
                ApiError::PayloadTooLarge(m) => {
                    ApiError::PayloadTooLarge(format!("tasks[{i}]: {m}"))
                }
                other => other,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One batch is one Raft entry (all or nothing), so it must fit one.
    let bytes: usize = specs.iter().map(TaskSpec::size_hint).sum();
    if bytes > MAX_OP_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "the batch takes {bytes} bytes; a batch is at most {MAX_OP_BYTES} bytes (one Raft entry holds {ENTRY_BUDGET}): split it"
        )));
    }
    // Refuse the whole batch if it does not fit the queue.
    admit_to_queue(&node, specs.len())?;
    wait_for_checkpoints(&node).await?;
    let results = node
        .propose_client(submit_ops(&node, specs))
        .await
        .map_err(|e| ApiError::from_propose(&node, e))?;
    node.count_results(&results);
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            OpResult::Submitted { id, duplicate } => out.push(SubmitResponse {
                id,
                duplicate,
                task: None,
            }),
            OpResult::Restoring => return Err(restoring()),
            // The swarm was deleted between the check and the commit.
            OpResult::Swarm(Err(f)) => {
                let committed: Vec<String> = out.iter().map(|r| r.id.to_string()).collect();
                return Err(ApiError::Conflict(format!(
                    "{} part-way through the batch; committed before it: [{}]",
                    f.message,
                    committed.join(",")
                )));
            }
            // Another client filled the queue between the check and the commit: the tasks
            // before this one are committed; report honestly which.
            OpResult::QueueFull { limit } => {
                let committed: Vec<String> = out.iter().map(|r| r.id.to_string()).collect();
                return Err(ApiError::Unavailable(format!(
                    "queue full ({limit} unfinished tasks) part-way through the batch; \
                     committed before it filled: [{}]",
                    committed.join(",")
                )));
            }
            other => {
                return Err(ApiError::Internal(format!(
                    "unexpected submit result {other:?}"
                )))
            }
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(SubmitBatchResponse { tasks: out }),
    )
        .into_response())
}

/// Make the next read of the local table linearizable: confirm leadership with a quorum
/// and wait until everything committed before this call is applied here.
pub(crate) async fn linearizable(node: &Node) -> Result<(), ApiError> {
    match node.raft().ensure_linearizable().await {
        Ok(_) => Ok(()),
        Err(openraft::error::RaftError::APIError(
            openraft::error::CheckIsLeaderError::ForwardToLeader(f),
        )) => Err(ApiError::NotLeader {
            leader_api: f
                .leader_node
                .map(|n| n.api_addr)
                .or_else(|| node.leader().map(|(_, n)| n.api_addr)),
        }),
        Err(e) => Err(ApiError::Unavailable(format!(
            "cannot confirm leadership for a linearizable read: {e}"
        ))),
    }
}

fn parse_id(s: &str) -> Result<TaskId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("task id must be a number, got {s:?}")))
}

async fn get_task(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<TaskView> {
    let id = parse_id(&id)?;
    if let Some(wait) = wait_of(&node, &q)? {
        node.wait_final(id, wait).await;
    }
    linearizable(&node).await?;
    task_view(&node, id).map(Json)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    after: Option<TaskId>,
    limit: Option<usize>,
}

async fn list_tasks(
    State(node): State<Arc<Node>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<TaskList> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!("unknown state {s:?}; one of {}", names.join(", ")))
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    linearizable(&node).await?;
    let tasks: Vec<TaskView> = node
        .table
        .list(state, q.after.unwrap_or(0), limit)
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .iter()
        .map(|t| t.view())
        .collect();
    let next_after = if tasks.len() == limit {
        tasks.last().map(|t| t.id)
    } else {
        None
    };
    Ok(Json(TaskList { tasks, next_after }))
}

async fn cancel_task(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult<TaskView> {
    let id = parse_id(&id)?;
    let result = node
        .propose_client(vec![Op::Cancel {
            task_id: id,
            now_ms: now_ms(),
        }])
        .await
        .map_err(|e| ApiError::from_propose(&node, e))?
        .pop()
        .ok_or_else(|| ApiError::Internal("empty cancel result".into()))?;
    node.count_results(std::slice::from_ref(&result));
    match result {
        OpResult::NotFound => return Err(ApiError::NotFound(format!("no task {id}"))),
        OpResult::Expired => return Err(expired(id)),
        OpResult::Restoring => return Err(restoring()),
        OpResult::Cancelled {
            running: Some((worker, attempt)),
        } => {
            node.send_to_worker(
                &worker,
                swarm_proto::worker::CoordinatorMsg::Cancel(attempt),
            );
        }
        // Already final (cancel is idempotent) or cancelled while queued.
        _ => {}
    }
    task_view(&node, id).map(Json)
}

fn worker_views(node: &Node) -> Vec<WorkerView> {
    let d = node.lock_dispatch();
    let mut v: Vec<WorkerView> = d
        .sessions
        .values()
        .map(|s| {
            let mut w = s.info.clone();
            w.running = d
                .scheduler
                .workers()
                .get(&w.id)
                .map_or(w.running, |e| e.busy);
            w
        })
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

async fn workers(State(node): State<Arc<Node>>) -> ApiResult<WorkerList> {
    Ok(Json(WorkerList {
        workers: worker_views(&node),
    }))
}

/// `GET /v1/status`: answered by the leader (forwarded there when one is known), since
/// only the leader has the workers; without a leader, this node's own view says so.
async fn status(State(node): State<Arc<Node>>, req: Request) -> Response {
    if !node.is_leader() && !req.headers().contains_key(FORWARDED_BY) && node.leader().is_some() {
        return forward_or_refuse(&node, req).await;
    }
    let cluster = cluster_view(&node).await;
    Json(status_view(&node, cluster)).into_response()
}

fn status_view(node: &Node, cluster: ClusterView) -> StatusView {
    let now = now_ms();
    let (queue, finished) = node.read_table(|t| {
        (
            QueueCounts {
                queued: t.count(TaskState::Queued),
                running: t.count(TaskState::Running),
                succeeded: t.count(TaskState::Succeeded),
                failed: t.count(TaskState::Failed),
                cancelled: t.count(TaskState::Cancelled),
                dead_lettered: t.count(TaskState::DeadLettered),
            },
            t.finished_since(now),
        )
    });
    StatusView {
        cluster,
        workers: worker_views(node),
        queue,
        queue_limit: node.config().limits.queue_limit,
        throughput: Throughput {
            finished_last_minute: finished,
            per_second: finished as f64 / 60.0,
        },
        swarms: {
            let names: Vec<String> =
                node.read_table(|t| t.defined_swarms().keys().cloned().collect());
            names
                .iter()
                .filter_map(|n| crate::swarms::swarm_view(node, n))
                .collect()
        },
    }
}

/// Liveness: the process answers, Raft runs and the data dir accepts a durable write.
/// Never depends on quorum.
async fn health(State(node): State<Arc<Node>>) -> Response {
    match health_check(&node).await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Readiness: a leader exists and this node has applied (almost) all of its log.
async fn ready(State(node): State<Arc<Node>>) -> Response {
    match ready_check(&node) {
        Ok(m) => (StatusCode::OK, format!("{m}\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn metrics_text() -> Response {
    match crate::metrics::handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::Unavailable("metrics recorder not installed".into()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(
            parse_duration("3d").unwrap(),
            Duration::from_secs(3 * 86400)
        );
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
